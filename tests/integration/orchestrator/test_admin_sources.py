"""The sources admin API (`/api/v1/admin/sources`) on SQLite and PostgreSQL: create / list / show /
update / enable / disable / delete, secrets never in a response, and the git hook script route.
(Permissions per route are in `test_admin_auth.ROUTES`; the hook script run for real is in
`tests/integration/test_kici_admin.py`.)"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from kici.orchestrator.app import create_app
from kici.orchestrator.config import Settings
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import AdminRole
from kici.orchestrator.store import audit, tokens
from kici.orchestrator.store.sources import load_source_secrets

API = "/api/v1/admin"
KEY = os.urandom(32)
SECRET = "s3cr3t-hook-value"
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIfake\n-----END RSA PRIVATE KEY-----\n"


@dataclass
class Api:
    http: httpx.AsyncClient
    database: Database
    token: str
    seen: list[str] = field(default_factory=list)
    """Every response body, to check that no secret ever leaves."""

    async def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = await self.http.request(
            method, API + path, headers={"Authorization": f"Bearer {self.token}"}, **kwargs
        )
        self.seen.append(response.text)
        return response


@pytest.fixture
async def api(database: Database, tmp_path: Path) -> AsyncIterator[Api]:
    async with database.transaction() as conn:
        made = await tokens.create_admin_token(conn, name="owner", role=AdminRole.OWNER)
    app = create_app(Settings(data_dir=tmp_path, database_url=database.url), database, secret_key=KEY)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://orch.test") as http:
        yield Api(http=http, database=database, token=made.plaintext)


async def _git(api: Api, name: str = "local", **config: Any) -> dict[str, Any]:
    response = await api.call("POST", "/sources", json={
        "kind": "git", "name": name, "config": {"url": "/srv/git/app.git", **config},
        "secrets": {"webhook_secret": SECRET},
    })
    assert response.status_code == 201, response.text
    return dict(response.json())


async def test_create_show_list(api: Api) -> None:
    created = await _git(api)
    assert created["kind"] == "git" and created["enabled"] is True
    assert created["secret_fields"] == ["webhook_secret"]
    assert created["config"] == {"url": "/srv/git/app.git"}
    assert created["webhook_path"] == "/webhook/default/git/local"
    gh = await api.call("POST", "/sources", json={
        "kind": "github", "name": "gh", "config": {"app_id": "42"},
        "secrets": {"webhook_secret": SECRET, "private_key": PEM},
    })
    assert gh.status_code == 201 and gh.json()["config"]["app_id"] == 42
    assert gh.json()["webhook_path"] == "/webhook/default/github"
    assert gh.json()["secret_fields"] == ["private_key", "webhook_secret"]
    generic = await api.call("POST", "/sources", json={"kind": "generic", "name": "hooks",
                                                         "config": {"auth": "none"}})
    assert generic.status_code == 201 and generic.json()["webhook_path"] == "/webhook/default/generic/hooks"

    by_name = await api.call("GET", "/sources/local")
    by_id = await api.call("GET", f"/sources/{created['id']}")
    assert by_name.status_code == by_id.status_code == 200 and by_name.json() == by_id.json() == created
    listed = (await api.call("GET", "/sources")).json()
    assert [s["name"] for s in listed] == ["local", "gh", "hooks"]
    only_git = (await api.call("GET", "/sources", params={"kind": "git"})).json()
    assert [s["name"] for s in only_git] == ["local"]
    assert (await api.call("GET", "/sources", params={"kind": "svn"})).status_code == 422
    assert all(SECRET not in body and "MIIfake" not in body for body in api.seen)


async def test_duplicate_invalid_and_unknown(api: Api) -> None:
    await _git(api)
    dup = await api.call("POST", "/sources", json={"kind": "git", "name": "local", "config": {"url": "/x"}})
    assert dup.status_code == 409 and dup.json() == {"error": "a source named 'local' already exists"}
    missing_url = await api.call("POST", "/sources", json={"kind": "git", "name": "other"})
    assert missing_url.status_code == 422 and missing_url.json() == {"error": "config.url is required"}
    bad_secret = await api.call("POST", "/sources", json={
        "kind": "git", "name": "other", "config": {"url": "/x"}, "secrets": {"hmac_secret": "x"}})
    assert bad_secret.status_code == 422 and "unknown secret 'hmac_secret'" in bad_secret.json()["error"]
    allowlist = await api.call("POST", "/sources", json={"kind": "generic", "name": "g",
                                                           "config": {"auth": "ip_allowlist"}})
    assert allowlist.json() == {"error": "config.allowed_ips is required for auth ip_allowlist"}
    typo = await api.call("POST", "/sources", json={"kind": "git", "name": "other",
                                                      "config": {"url": "/x", "pol_seconds": 60}})
    assert typo.status_code == 422
    assert typo.json()["error"].startswith("config.pol_seconds: unknown key for a git source (known: ")
    bad_poll = await api.call("POST", "/sources", json={"kind": "git", "name": "other",
                                                          "config": {"url": "/x", "poll_seconds": "often"}})
    assert bad_poll.status_code == 422
    assert bad_poll.json() == {"error": "config.poll_seconds: must be a positive number of seconds"}
    bad_kind = await api.call("POST", "/sources", json={"kind": "svn", "name": "x"})
    assert bad_kind.status_code == 422 and bad_kind.json()["error"].startswith("invalid request: kind: ")
    assert [s["name"] for s in (await api.call("GET", "/sources")).json()] == ["local"]  # nothing half-made
    for method, path in [("GET", "/sources/nope"), ("PATCH", "/sources/nope"), ("POST", "/sources/nope/enable"),
                         ("POST", "/sources/nope/disable"), ("DELETE", "/sources/nope"),
                         ("GET", "/sources/nope/hook")]:
        response = await api.call(method, path, json={"config": {}} if method == "PATCH" else None)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json() == {"error": "no source 'nope'"}


async def test_update_merges_config_and_secrets(api: Api) -> None:
    created = await _git(api, default_branch="trunk")
    patched = await api.call("PATCH", "/sources/local", json={
        "config": {"poll_seconds": 60, "default_branch": None}, "secrets": {"webhook_secret": "rotated-secret"}})
    assert patched.status_code == 200, patched.text
    assert patched.json()["config"] == {"url": "/srv/git/app.git", "poll_seconds": 60}
    assert patched.json()["secret_fields"] == ["webhook_secret"]
    async with api.database.read() as conn:
        assert await load_source_secrets(conn, created["id"], KEY) == {"webhook_secret": "rotated-secret"}
    invalid = await api.call("PATCH", "/sources/local", json={"config": {"url": None}})
    assert invalid.status_code == 422 and invalid.json() == {"error": "config.url is required"}
    typo = await api.call("PATCH", "/sources/local", json={"config": {"mirorr": True}})
    assert typo.status_code == 422 and typo.json()["error"].startswith("config.mirorr: unknown key for a git source")
    removed = await api.call("PATCH", "/sources/local", json={"secrets": {"webhook_secret": None}})
    assert removed.json()["secret_fields"] == []
    no_secret = await api.call("GET", "/sources/local/hook")
    assert no_secret.status_code == 409 and "has no webhook_secret" in no_secret.json()["error"]
    assert all("rotated-secret" not in body and SECRET not in body for body in api.seen)


async def test_enable_disable_delete(api: Api) -> None:
    await _git(api)
    disabled = await api.call("POST", "/sources/local/disable")
    assert disabled.status_code == 200 and disabled.json()["enabled"] is False
    assert (await api.call("GET", "/sources/local")).json()["enabled"] is False
    hook = await api.http.post("/webhook/default/git/local", content=b"{}")
    assert hook.status_code == 404  # a disabled source's webhooks are unknown
    enabled = await api.call("POST", "/sources/local/enable")
    assert enabled.json()["enabled"] is True
    assert (await api.http.post("/webhook/default/git/local", content=b"{}")).status_code == 401  # known: unsigned
    deleted = await api.call("DELETE", "/sources/local")
    assert deleted.status_code == 200 and deleted.json()["name"] == "local"
    assert (await api.call("GET", "/sources/local")).status_code == 404
    assert (await api.call("DELETE", "/sources/local")).status_code == 404


async def test_hook_script(api: Api) -> None:
    await _git(api, name="it's")
    default = await api.call("GET", "/sources/it's/hook")
    assert default.status_code == 200 and default.headers["content-type"].startswith("text/plain")
    script = default.text
    assert script.startswith("#!/bin/sh\n")
    assert "KICI_WEBHOOK_URL='http://orch.test/webhook/default/git/it%27s'" in script
    assert f"KICI_WEBHOOK_SECRET='{SECRET}'" in script
    assert "chmod 0700" in script and "openssl dgst -sha256 -hmac" in script and "curl" in script
    given = await api.call("GET", "/sources/it's/hook", params={"url": "https://ci.example.com/orch/"})
    assert "KICI_WEBHOOK_URL='https://ci.example.com/orch/webhook/default/git/it%27s'" in given.text
    bad = await api.call("GET", "/sources/it's/hook", params={"url": "ci.example.com"})
    assert bad.status_code == 422 and bad.json()["error"].startswith("invalid url ")
    await api.call("POST", "/sources", json={"kind": "generic", "name": "g", "config": {"auth": "none"}})
    generic = await api.call("GET", "/sources/g/hook")
    assert generic.status_code == 409
    assert generic.json() == {"error": "source 'g' is a generic source; hooks are for git sources"}


async def test_secrets_need_a_secret_key(database: Database, tmp_path: Path) -> None:
    async with database.transaction() as conn:
        made = await tokens.create_admin_token(conn, name="owner", role=AdminRole.OWNER)
    app = create_app(Settings(data_dir=tmp_path, database_url=database.url), database)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://orch.test") as http:
        response = await http.post(API + "/sources", headers={"Authorization": f"Bearer {made.plaintext}"}, json={
            "kind": "git", "name": "x", "config": {"url": "/x"}, "secrets": {"webhook_secret": "s"}})
    assert response.status_code == 503 and "no secret key configured" in response.json()["error"]


async def test_branch_names_in_config_follow_git_rules(api: Api) -> None:
    bad_ref = await api.call("POST", "/sources", json={"kind": "generic", "name": "g",
                                                         "config": {"auth": "none", "ref": "release..1"}})
    assert bad_ref.status_code == 422
    assert bad_ref.json() == {"error": "config.ref: invalid branch name 'release..1': it contains '..'"}
    bad_default = await api.call("POST", "/sources", json={"kind": "git", "name": "l",
                                                             "config": {"url": "/x", "default_branch": "-main"}})
    assert bad_default.json() == {"error": "config.default_branch: invalid branch name '-main': it begins with '-'"}
    await _git(api)
    patched = await api.call("PATCH", "/sources/local", json={"config": {"default_branch": "a b"}})
    assert patched.status_code == 422 and "invalid branch name 'a b'" in patched.json()["error"]
    assert [s["name"] for s in (await api.call("GET", "/sources")).json()] == ["local"]
    good = await api.call("POST", "/sources", json={"kind": "generic", "name": "g2",
                                                      "config": {"auth": "none", "ref": "release/1.x"}})
    assert good.status_code == 201


async def test_issuing_a_hook_script_is_audited(api: Api) -> None:
    await _git(api)
    assert (await api.call("GET", "/sources/local/hook")).status_code == 200
    async with api.database.read() as conn:
        [row] = [e for e in await audit.list_audit(conn, outcome="allowed") if e.action == "source.hook"]
    assert row.target is not None and row.target.startswith("source:") and SECRET not in (row.reason or "")
