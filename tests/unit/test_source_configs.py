"""Typed source configs (`kici.orchestrator.store.source_configs`): strict for a config being written,
lenient for one stored before configs were typed."""

from __future__ import annotations

import pytest

from kici.orchestrator.db.schema import SourceKind
from kici.orchestrator.holds.policy import TrustAction
from kici.orchestrator.store.source_configs import (
    GenericSourceConfig,
    GithubSourceConfig,
    GitSourceConfig,
    SourceConfigError,
    check_config,
    parse_config,
)


def test_each_kind_has_its_model_with_typed_fields() -> None:
    git = check_config(SourceKind.GIT, {"url": "/srv/app.git", "poll_seconds": 30, "mirror": True})
    assert isinstance(git, GitSourceConfig) and git.poll_seconds == 30.0 and git.mirror is True
    github = check_config(SourceKind.GITHUB, {"app_id": 7, "trust": {"fork_pull_requests": "reject"}})
    assert isinstance(github, GithubSourceConfig) and github.app_id == 7
    assert github.trust is not None and github.trust.fork_pull_requests is TrustAction.REJECT
    generic = check_config(SourceKind.GENERIC, {"auth": "none", "allowed_events": ["deploy"]})
    assert isinstance(generic, GenericSourceConfig) and generic.auth == "none" and generic.allowed_events == ["deploy"]
    assert check_config(SourceKind.GENERIC, {}).auth == "hmac_sha256"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("kind", "config", "message"),
    [
        (SourceKind.GIT, {"url": "/r", "pol_seconds": 5}, "config.pol_seconds: unknown key for a git source (known: "),
        (SourceKind.GIT, {"url": "/r", "poll_seconds": "60"}, "config.poll_seconds: must be a positive number"),
        (SourceKind.GIT, {"url": "/r", "poll_seconds": 0}, "config.poll_seconds: Input should be greater than 0"),
        (SourceKind.GIT, {"url": "/r", "poll_seconds": True}, "config.poll_seconds: must be a positive number"),
        (SourceKind.GIT, {}, "config.url is required"),
        (SourceKind.GITHUB, {"app_id": "7"}, "config.app_id: Input should be a valid integer"),
        (SourceKind.GITHUB, {"app_id": 7, "url": "/r"}, "config.url: unknown key for a github source"),
        (SourceKind.GENERIC, {"auth": "magic"}, "config.auth: Input should be"),
        (SourceKind.GENERIC, {"rate_limit_rpm": -1}, "config.rate_limit_rpm: Input should be greater than 0"),
    ],
)
def test_a_config_being_written_is_strict_and_names_the_field(
    kind: SourceKind, config: dict[str, object], message: str
) -> None:
    with pytest.raises(SourceConfigError) as raised:
        check_config(kind, config)
    assert str(raised.value).startswith(message), str(raised.value)


def test_a_stored_config_ignores_unknown_keys_and_unusable_optional_values() -> None:
    stored = {"url": "/r", "poll_seconds": "60", "legacy_flag": True, "mirror": None, "repo": "acme/app"}
    parsed = parse_config(SourceKind.GIT, stored)
    assert parsed == GitSourceConfig(url="/r", repo="acme/app")  # no polling, as the raw dict was read
    assert parse_config(SourceKind.GIT, {"url": "/r", "poll_seconds": -3}) == GitSourceConfig(url="/r")


def test_a_stored_config_without_a_required_field_is_an_error_naming_it() -> None:
    with pytest.raises(SourceConfigError, match=r"^config\.app_id is required$"):
        parse_config(SourceKind.GITHUB, {"api_url": "https://ghe.example/api/v3", "old": 1})
    with pytest.raises(SourceConfigError, match=r"^config\.url: Input should be a valid string$"):
        parse_config(SourceKind.GIT, {"url": 5})
