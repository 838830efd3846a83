"""Typed views of a source's `config`, one model per kind (`GitSourceConfig`, `GithubSourceConfig`,
`GenericSourceConfig`), chosen by the source's kind (`CONFIG_MODELS`).

Two ways in:
- `check_config(kind, config)` — a config being created or changed (admin API, `kici-admin`): strict.
  An unknown key, or a value of the wrong type, is a `SourceError` naming the field (`config.<key>: …`).
  (`sources.validate_config` runs the finer checks first: branch names, URLs, trust policies.)
- `parse_config(kind, config)` — a stored config, where it is used (poller interval, webhook auth,
  lock-file provider): lenient. Rows written before configs were typed may hold keys no kind knows (the
  admin API stored any key), or a `poll_seconds` nothing checked: unknown keys are ignored and a field
  that does not validate reads as unset, as the code reading the raw dict treated it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
)

from kici.orchestrator.db.schema import SourceKind
from kici.orchestrator.holds.policy import TrustPolicy

GenericAuth = Literal["hmac_sha256", "bearer_token", "ip_allowlist", "none"]


class SourceConfigError(ValueError):
    """A config that does not validate; the message names the field."""


class _SourceConfig(BaseModel):
    """Keys every kind has."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_payload_bytes: StrictInt | None = Field(default=None, gt=0)
    """Webhook bodies over this many bytes are refused (413); unset: 1 MiB."""
    notify_urls: list[str] | None = None
    """URLs that receive the source's runs' signed `run.finished` events."""
    notify_job_events: StrictBool | None = None
    """Also send `job.finished`."""


class GitSourceConfig(_SourceConfig):
    url: str
    """A local path, `file://…`, or any git URL."""
    repo: str | None = None
    """The name events carry; unset: derived from the URL."""
    default_branch: str | None = None
    """Unset: the repository's (`scheduling.registrations.git_default_branch`)."""
    mirror: StrictBool | None = None
    """True: read through a bare mirror under the data dir even for a local path."""
    poll_seconds: float | None = Field(default=None, gt=0)
    """Poll the branches this often; unset: no polling."""

    @field_validator("poll_seconds", mode="before")
    @classmethod
    def _poll_number(cls, value: Any) -> Any:
        if isinstance(value, bool) or not (value is None or isinstance(value, int | float)):
            raise ValueError("must be a positive number of seconds")
        return value


class GithubSourceConfig(_SourceConfig):
    app_id: StrictInt = Field(gt=0)
    installation_id: StrictInt | None = Field(default=None, gt=0)
    """Unset: taken from each delivery."""
    api_url: str | None = None
    """Unset: https://api.github.com."""
    trust: TrustPolicy | None = None
    """What the source does with untrusted events (`kici.orchestrator.holds.policy`); unset: defaults."""


class GenericSourceConfig(_SourceConfig):
    auth: GenericAuth = "hmac_sha256"
    signature_header: str | None = None
    allowed_ips: list[str] | None = None
    allowed_events: list[str] | None = None
    event_header: str | None = None
    event_path: str | None = None
    idempotency_header: str | None = None
    dedup_window_seconds: StrictInt | None = Field(default=None, gt=0)
    rate_limit_rpm: StrictInt | None = Field(default=None, gt=0)
    lock_source: str | None = None
    """The name or id of a git or github source of the same org, where the workflows come from."""
    repo: str | None = None
    ref: str | None = None
    """The branch whose lock file is read; unset: `main`."""


SourceConfig = GitSourceConfig | GithubSourceConfig | GenericSourceConfig

CONFIG_MODELS: dict[SourceKind, type[GitSourceConfig] | type[GithubSourceConfig] | type[GenericSourceConfig]] = {
    SourceKind.GIT: GitSourceConfig,
    SourceKind.GITHUB: GithubSourceConfig,
    SourceKind.GENERIC: GenericSourceConfig,
}


def _problem(error: Mapping[str, Any], kind: SourceKind) -> str:
    field = ".".join(str(part) for part in error.get("loc", ()))
    if error.get("type") == "extra_forbidden":
        known = ", ".join(sorted(CONFIG_MODELS[kind].model_fields))
        return f"config.{field}: unknown key for a {kind.value} source (known: {known})"
    if error.get("type") == "missing":
        return f"config.{field} is required"
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    return f"config.{field}: {message}" if field else f"config: {message}"


def check_config(kind: SourceKind, config: Mapping[str, Any]) -> SourceConfig:
    """A config being written, as its kind's model; `SourceConfigError` names the first problem."""
    try:
        return CONFIG_MODELS[kind].model_validate(dict(config))
    except ValidationError as exc:
        raise SourceConfigError(_problem(exc.errors()[0], kind)) from None


def parse_config(kind: SourceKind, config: Mapping[str, Any]) -> SourceConfig:
    """A stored config, as its kind's model: unknown keys ignored, an optional field that does not
    validate read as unset. `SourceConfigError` only when a required field is missing or invalid."""
    model = CONFIG_MODELS[kind]
    known = {key: value for key, value in config.items() if key in model.model_fields}
    while True:
        try:
            return model.model_validate(known)
        except ValidationError as exc:
            bad = {str(error["loc"][0]) for error in exc.errors() if error.get("loc")}
            required = {name for name in bad if name in model.model_fields and model.model_fields[name].is_required()}
            if required or not bad or not bad & set(known):
                raise SourceConfigError(_problem(exc.errors()[0], kind)) from None
            for name in bad:
                known.pop(name, None)
