"""Admin API authentication and the role → permission matrix, on SQLite and PostgreSQL.

`ROUTES` lists every admin route with the permissions it needs, in the order they are checked; a new
route is covered by adding a row (and `test_matrix_covers_every_admin_route` fails until it is added).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from kici.orchestrator.app import create_app
from kici.orchestrator.auth import ROLE_PERMISSIONS, Permission
from kici.orchestrator.config import Settings
from kici.orchestrator.crypto import Keyring
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import AdminRole, new_id
from kici.orchestrator.store import audit, environments, outbox, secrets, tokens
from kici.orchestrator.store.agents import register_agent
from kici.orchestrator.store.events import begin_delivery
from kici.orchestrator.store.sources import create_source

from .conftest import WORKFLOW_SPEC, insert_job, insert_run

API = "/api/v1/admin"
ROLES = list(AdminRole)
SECRET_KEY = os.urandom(32)


@dataclass
class Admin:
    """An in-process orchestrator app with one token per role."""

    http: httpx.AsyncClient
    database: Database
    token: dict[AdminRole, str]
    app: Any

    def auth(self, role: AdminRole) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token[role]}"}

    async def request(self, role: AdminRole | None, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**(self.auth(role) if role is not None else {}), **kwargs.pop("headers", {})}
        return await self.http.request(method, API + path, headers=headers, **kwargs)


@pytest.fixture
async def admin(database: Database, tmp_path: Path) -> AsyncIterator[Admin]:
    async with database.transaction() as conn:
        made = {role: await tokens.create_admin_token(conn, name=f"{role.value}-token", role=role) for role in ROLES}
    app = create_app(Settings(data_dir=tmp_path, database_url=database.url), database, secret_key=SECRET_KEY)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://orchestrator") as http:
        yield Admin(http=http, database=database, token={r: c.plaintext for r, c in made.items()}, app=app)


# -- the matrix -------------------------------------------------------------------------------------

Setup = Callable[[Admin], Awaitable[dict[str, str]]]


async def _targets(admin: Admin) -> dict[str, str]:
    """Fresh things for a write route to act on, named for the path placeholders."""
    async with admin.database.transaction() as conn:
        auditor = await tokens.create_admin_token(conn, name="target-auditor", role=AdminRole.AUDITOR)
        owner = await tokens.create_admin_token(conn, name="target-owner", role=AdminRole.OWNER)
        agent = await tokens.create_agent_token(conn, name="target-agent", labels=["linux"])
        run = await insert_run(conn, workflow_spec=WORKFLOW_SPEC, event={"type": "push", "branch": "main"})
        await insert_job(conn, run, "build")
        source = await create_source(conn, key=SECRET_KEY, name=f"src-{new_id()}", kind="git",
                                     config={"url": "/srv/git/app.git"}, secrets={"webhook_secret": "s"})
        agent_id = f"agent-{new_id()}"
        await register_agent(conn, agent_id=agent_id, org_id="default", agent_token_id=agent.token.id,
                             labels=["linux"], max_concurrency=1, version="1.0", hostname="h")
        delivery = f"delivery-{new_id()}"
        await begin_delivery(conn, delivery_id=delivery, provider="git", ttl_seconds=60)
        failed_report = outbox.run_finished_rows({"notify": [{"url": "http://receiver.invalid/h"}]}, "default", run)
        await outbox.insert_rows(conn, [{**r, "status": "failed"} for r in failed_report])
        report = (await outbox.list_reports(conn, org_id="default", run_id=run, limit=1))[0].id
        secret = f"S_{new_id()[:8]}"
        await secrets.set_secret(conn, Keyring(SECRET_KEY), name=secret, scope="repo:acme/app", value="v")
        environment = f"env-{new_id()[:8]}"
        await environments.create_environment(conn, environment, environments.EnvironmentPolicy())
        held = await insert_run(conn, workflow_spec=WORKFLOW_SPEC, event={"type": "pr", "branch": "f"}, status="held",
                                trust="untrusted", secrets_allowed=False, hold_reason="pull request from a fork")
        await insert_job(conn, held, "build", status="held")
        github = await create_source(conn, key=SECRET_KEY, name=f"gh-{new_id()}", kind="github",
                                     config={"app_id": 1}, secrets={})
    return {"held": held, "github": github.name, "environment": environment,
            "secret": secret, "secret_name": f"N_{new_id()[:8]}",
            "auditor_token": auditor.token.id, "owner_token": owner.token.id, "agent_token": agent.token.id,
            "report": str(report), "run": run, "source": source.name, "new_name": f"new-{new_id()}", "agent": agent_id,
            "delivery": delivery}


@dataclass(frozen=True)
class Route:
    method: str
    route: str
    """The route's template as declared (what the coverage test compares)."""
    needs: tuple[Permission, ...]
    """Checked in this order: a denial names the first one the role lacks. Empty: any valid token."""
    ok: int
    path: str | None = None
    """The path requested, with `{placeholders}` from `_targets`; defaults to `route`."""
    body: dict[str, Any] | None = None
    label: str = ""
    params: dict[str, str] | None = None
    """Query parameters sent (not part of the audited path)."""

    @property
    def id(self) -> str:
        return f"{self.method} {self.path or self.route}{' ' + self.label if self.label else ''}"


ROUTES = [
    Route("GET", "/whoami", (), 200),
    Route("GET", "/tokens", (Permission.TOKENS_READ,), 200),
    Route("POST", "/tokens", (Permission.TOKENS_WRITE,), 201, body={"name": "n", "role": "auditor"}),
    Route("POST", "/tokens", (Permission.TOKENS_WRITE,), 201, body={"name": "n", "role": "admin"}, label="admin"),
    Route("POST", "/tokens", (Permission.TOKENS_WRITE, Permission.TOKENS_OWNER), 201,
          body={"name": "n", "role": "owner"}, label="owner"),
    Route("DELETE", "/tokens/{token_id}", (Permission.TOKENS_WRITE,), 200, path="/tokens/{auditor_token}"),
    Route("DELETE", "/tokens/{token_id}", (Permission.TOKENS_WRITE, Permission.TOKENS_OWNER), 200,
          path="/tokens/{owner_token}"),
    Route("GET", "/agent-tokens", (Permission.AGENT_TOKENS_READ,), 200),
    Route("POST", "/agent-tokens", (Permission.AGENT_TOKENS_WRITE,), 201, body={"name": "n", "labels": ["gpu"]}),
    Route("DELETE", "/agent-tokens/{token_id}", (Permission.AGENT_TOKENS_WRITE,), 200,
          path="/agent-tokens/{agent_token}"),
    Route("GET", "/db/migrate", (Permission.DB_READ,), 200),
    Route("POST", "/db/migrate", (Permission.DB_MIGRATE,), 200),
    Route("GET", "/runs", (Permission.RUNS_READ,), 200),
    Route("GET", "/runs/{run_id}", (Permission.RUNS_READ,), 200, path="/runs/{run}"),
    Route("GET", "/runs/{run_id}/jobs", (Permission.RUNS_READ,), 200, path="/runs/{run}/jobs"),
    Route("GET", "/runs/{run_id}/jobs/{job}/logs", (Permission.RUNS_READ,), 200, path="/runs/{run}/jobs/build/logs"),
    Route("POST", "/runs/{run_id}/rerun", (Permission.RUNS_RERUN,), 201, path="/runs/{run}/rerun"),
    # past the permission check the handler looks the source up (a full start is in test_manual_runs.py)
    Route("POST", "/runs", (Permission.RUNS_WRITE,), 404, body={"source": "no-such-source", "workflow": "deploy"},
          label="(unknown source)"),
    Route("GET", "/schedules", (Permission.RUNS_READ,), 200),
    Route("POST", "/runs/{run_id}/cancel", (Permission.RUNS_CANCEL,), 200, path="/runs/{run}/cancel",
          body={"force": False}),
    Route("GET", "/audit", (Permission.AUDIT_READ,), 200),
    Route("GET", "/reports", (Permission.REPORTS_READ,), 200),
    Route("POST", "/reports/{report_id}/retry", (Permission.REPORTS_RETRY,), 200, path="/reports/{report}/retry"),
    Route("GET", "/sources", (Permission.SOURCES_READ,), 200),
    Route("POST", "/sources", (Permission.SOURCES_WRITE,), 201,
          body={"kind": "generic", "name": "{new_name}", "config": {"auth": "none"}}),
    Route("GET", "/sources/{id_or_name}", (Permission.SOURCES_READ,), 200, path="/sources/{source}"),
    Route("PATCH", "/sources/{id_or_name}", (Permission.SOURCES_WRITE,), 200, path="/sources/{source}",
          body={"config": {"default_branch": "trunk"}, "secrets": {"webhook_secret": "s2"}}),
    Route("POST", "/sources/{id_or_name}/enable", (Permission.SOURCES_WRITE,), 200, path="/sources/{source}/enable"),
    Route("POST", "/sources/{id_or_name}/disable", (Permission.SOURCES_WRITE,), 200,
          path="/sources/{source}/disable"),
    Route("DELETE", "/sources/{id_or_name}", (Permission.SOURCES_WRITE,), 200, path="/sources/{source}"),
    Route("GET", "/queue", (Permission.QUEUE_READ,), 200),
    Route("GET", "/agents", (Permission.AGENTS_READ,), 200),
    Route("GET", "/cluster", (Permission.AGENTS_READ,), 200),
    Route("GET", "/agents/{agent_id}", (Permission.AGENTS_READ,), 200, path="/agents/{agent}"),
    Route("GET", "/events", (Permission.EVENTS_READ,), 200),
    Route("GET", "/events/{delivery_id}", (Permission.EVENTS_READ,), 200, path="/events/{delivery}"),
    Route("GET", "/sources/{id_or_name}/hook", (Permission.SOURCES_WRITE,), 200, path="/sources/{source}/hook",
          label="(reveals the secret)"),
    Route("GET", "/secrets", (Permission.SECRETS_READ_METADATA,), 200),
    Route("PUT", "/secrets/{name}", (Permission.SECRETS_WRITE,), 201, path="/secrets/{secret_name}",
          body={"scope": "org", "value": "v"}),
    Route("DELETE", "/secrets/{name}", (Permission.SECRETS_WRITE,), 200, path="/secrets/{secret}",
          params={"scope": "repo:acme/app"}),
    Route("POST", "/rotate-key", (Permission.KEY_ROTATE,), 200),
    Route("GET", "/environments", (Permission.ENVIRONMENTS_READ,), 200),
    Route("POST", "/environments", (Permission.ENVIRONMENTS_WRITE,), 201,
          body={"name": "{new_name}", "branches": ["main"], "required_approvals": 1}),
    Route("GET", "/environments/{name}", (Permission.ENVIRONMENTS_READ,), 200, path="/environments/{environment}"),
    Route("PUT", "/environments/{name}", (Permission.ENVIRONMENTS_WRITE,), 200, path="/environments/{environment}",
          body={"wait_timer_s": 30}),
    Route("DELETE", "/environments/{name}", (Permission.ENVIRONMENTS_WRITE,), 200,
          path="/environments/{environment}"),
    Route("GET", "/caches", (Permission.CACHES_READ,), 200),
    Route("DELETE", "/caches", (Permission.CACHES_WRITE,), 200, params={"repo": "acme/app"}),
    Route("GET", "/runs/{run_id}/artifacts", (Permission.RUNS_READ,), 200, path="/runs/{run}/artifacts"),
    # past the permission check the handler looks the artifact up (downloads: tests/e2e/test_artifacts.py)
    Route("GET", "/runs/{run_id}/artifacts/{artifact_id}", (Permission.RUNS_READ,), 404,
          path="/runs/{run}/artifacts/no-such-artifact", label="(unknown artifact)"),
    Route("GET", "/runs/{run_id}/tests", (Permission.RUNS_READ,), 200, path="/runs/{run}/tests"),
    # past the permission check the handler looks the file up (downloads: tests/e2e/test_test_reports.py)
    Route("GET", "/runs/{run_id}/tests/files/{file_id}", (Permission.RUNS_READ,), 404,
          path="/runs/{run}/tests/files/no-such-file", label="(unknown file)"),
    Route("POST", "/prune", (Permission.DATA_PRUNE,), 200, body={"dry_run": True}, label="(dry run)"),
    Route("POST", "/prune", (Permission.DATA_PRUNE,), 200, body={"dry_run": False}),
    Route("GET", "/sources/{id_or_name}/trust", (Permission.SOURCES_READ,), 200, path="/sources/{github}/trust"),
    Route("PUT", "/sources/{id_or_name}/trust", (Permission.SOURCES_WRITE,), 200, path="/sources/{github}/trust",
          body={"fork_pull_requests": "reject"}),
    Route("GET", "/held", (Permission.RUNS_READ,), 200),
    Route("POST", "/held/{run_id}/approve", (Permission.APPROVALS_WRITE,), 200, path="/held/{held}/approve"),
    Route("POST", "/held/{run_id}/reject", (Permission.APPROVALS_WRITE,), 200, path="/held/{held}/reject",
          body={"reason": "no"}),
]


def _format(body: Any, targets: dict[str, str]) -> Any:
    """`body` with `{placeholders}` in its string values filled from `_targets`."""
    if isinstance(body, dict):
        return {k: _format(v, targets) for k, v in body.items()}
    return body.format(**targets) if isinstance(body, str) else body


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.id)
async def test_role_matrix(admin: Admin, route: Route, caplog: pytest.LogCaptureFixture) -> None:
    for role in ROLES:
        targets = await _targets(admin)
        path = (route.path or route.route).format(**targets)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="kici.orchestrator"):
            response = await admin.request(role, route.method, path, json=_format(route.body, targets),
                                           params=route.params)
        missing = [p for p in route.needs if p not in ROLE_PERMISSIONS[role]]
        if missing:
            assert response.status_code == 403, (role, response.text)
            assert response.json() == {
                "error": f"permission '{missing[0].value}' required; your role '{role.value}' does not have it"
            }
            denials = [r for r in caplog.records if getattr(r, "kici_event", None) == "admin.denied"]
            assert len(denials) == 1, (role, caplog.records)
            fields = denials[0].kici_fields  # type: ignore[attr-defined]
            assert fields["permission"] == missing[0].value and fields["role"] == role.value
            assert fields["status"] == 403 and fields["path"] == API + path
            async with admin.database.read() as conn:
                [row] = [r for r in await audit.list_audit(conn, outcome="denied", limit=1000) if r.path == API + path
                         and r.role == role.value]
            assert (row.status, row.permission, row.action) == (403, missing[0].value, "admin.request")
        else:
            assert response.status_code == route.ok, (role, response.text)


def test_matrix_covers_every_admin_route(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'k.db'}"), None)  # type: ignore[arg-type]
    declared = {
        (method.upper(), path.removeprefix(API))
        for path, operations in app.openapi()["paths"].items()
        if path.startswith(API)
        for method in operations
    }
    covered = {(r.method, r.route) for r in ROUTES}
    assert declared - covered == set(), "admin routes without a row in ROUTES"
    assert covered - declared == set(), "rows in ROUTES for routes that do not exist"


def test_role_table() -> None:
    owner, admin, auditor, viewer = (ROLE_PERMISSIONS[r] for r in ROLES)
    assert owner == frozenset(Permission)
    assert viewer == {Permission.RUNS_READ, Permission.QUEUE_READ, Permission.AGENTS_READ}
    assert viewer < auditor
    assert owner - admin == {Permission.TOKENS_OWNER, Permission.KEY_ROTATE}
    assert auditor < admin
    assert all(p.value.endswith((":read", ":read-metadata")) for p in auditor)
    assert Permission.SECRETS_READ_METADATA in auditor and Permission.SECRETS_WRITE not in auditor


# -- authentication ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer kici_" + "0" * 64},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "kici_" + "0" * 64},
    ],
    ids=["missing", "empty", "unknown", "basic", "no-scheme"],
)
async def test_unauthenticated(admin: Admin, headers: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="kici.orchestrator"):
        response = await admin.http.get(API + "/whoami", headers=headers)
    assert response.status_code == 401
    assert response.json() == {"error": "missing or invalid admin token"}
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert [getattr(r, "kici_event", None) for r in caplog.records].count("admin.denied") == 1
    async with admin.database.read() as conn:
        [row] = await audit.list_audit(conn, outcome="denied")
    assert (row.status, row.path, row.token_id, row.action) == (401, API + "/whoami", None, "admin.request")
    assert row.reason in ("missing_token", "unknown_token")


async def test_revoked_token_is_refused(admin: Admin, caplog: pytest.LogCaptureFixture) -> None:
    me = (await admin.request(AdminRole.ADMIN, "GET", "/whoami")).json()
    revoked = await admin.request(AdminRole.OWNER, "DELETE", f"/tokens/{me['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    with caplog.at_level(logging.INFO, logger="kici.orchestrator"):
        response = await admin.request(AdminRole.ADMIN, "GET", "/whoami")
    assert response.status_code == 401
    assert response.json() == {"error": "missing or invalid admin token"}
    denial = next(r for r in caplog.records if getattr(r, "kici_event", None) == "admin.denied")
    assert denial.kici_fields["reason"] == "revoked_token"  # type: ignore[attr-defined]
    assert denial.kici_fields["token_id"] == me["id"]  # type: ignore[attr-defined]
    async with admin.database.read() as conn:
        [row] = await audit.list_audit(conn, outcome="denied")
    assert (row.status, row.reason, row.token_id) == (401, "revoked_token", me["id"])
    listed = (await admin.request(AdminRole.AUDITOR, "GET", "/audit", params={"outcome": "denied"})).json()
    assert [(e["status"], e["reason"], e["token_id"]) for e in listed] == [(401, "revoked_token", me["id"])]


async def test_whoami_and_last_used(admin: Admin) -> None:
    async with admin.database.read() as conn:
        before = await tokens.find_admin_token(conn, admin.token[AdminRole.AUDITOR])
    assert before is not None and before.last_used_at is None
    me = (await admin.request(AdminRole.AUDITOR, "GET", "/whoami")).json()
    assert me["name"] == "auditor-token" and me["role"] == "auditor"
    assert me["permissions"] == sorted(p.value for p in ROLE_PERMISSIONS[AdminRole.AUDITOR])
    async with admin.database.read() as conn:
        first = await tokens.find_admin_token(conn, admin.token[AdminRole.AUDITOR])
    assert first is not None and first.last_used_at is not None
    await admin.request(AdminRole.AUDITOR, "GET", "/whoami")
    async with admin.database.read() as conn:
        second = await tokens.find_admin_token(conn, admin.token[AdminRole.AUDITOR])
    assert second is not None and second.last_used_at == first.last_used_at  # not rewritten within a minute


# -- the error shape --------------------------------------------------------------------------------


async def test_validation_errors_are_one_line(admin: Admin) -> None:
    response = await admin.request(AdminRole.OWNER, "POST", "/tokens", json={"role": "root"})
    assert response.status_code == 422
    assert response.json() == {
        "error": "invalid request: name: Field required; role: Input should be 'owner', 'admin', 'auditor' or 'viewer'"
    }
    bad_json = await admin.request(
        AdminRole.OWNER, "POST", "/tokens", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert bad_json.status_code == 422
    assert bad_json.json()["error"].startswith("invalid request: the request body is not valid JSON (")
    no_body = await admin.request(AdminRole.OWNER, "POST", "/tokens")
    assert no_body.json() == {"error": "invalid request: request body: Field required"}
    query = await admin.request(AdminRole.OWNER, "GET", "/tokens", params={"include_revoked": "perhaps"})
    assert query.status_code == 422
    assert query.json()["error"].startswith("invalid request: include_revoked (query): ")


async def test_validation_happens_after_authentication(admin: Admin) -> None:
    response = await admin.http.post(API + "/tokens", json={"role": "root"})
    assert response.status_code == 401


async def test_unknown_admin_route(admin: Admin) -> None:
    response = await admin.request(AdminRole.OWNER, "GET", "/nope")
    assert response.status_code == 404
    assert response.json() == {"error": f"no admin route GET {API}/nope"}


async def test_other_routes_keep_their_shape(admin: Admin) -> None:
    assert (await admin.http.get("/health")).json()["status"] == "ok"
    assert (await admin.http.get("/nope")).json() == {"detail": "Not Found"}


async def test_openapi_lists_admin_routes_with_security(admin: Admin) -> None:
    schema = (await admin.http.get("/openapi.json")).json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["HTTPBearer"]["description"],
    }
    listed = {
        (method.upper(), path.removeprefix(API))
        for path, ops in schema["paths"].items()
        if path.startswith(API)
        for method in ops
    }
    assert listed == {(r.method, r.route) for r in ROUTES}
    for path, ops in schema["paths"].items():
        if not path.startswith(API):
            continue
        for method, op in ops.items():
            assert op["security"] == [{"HTTPBearer": []}], (method, path)
            assert "401" in op["responses"] and "403" in op["responses"], (method, path)
            error_ref = op["responses"]["401"]["content"]["application/json"]["schema"]["$ref"]
            assert error_ref.endswith("/ErrorResponse")
            if "422" in op["responses"]:
                ref = op["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorResponse"), (method, path)
