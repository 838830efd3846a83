"""Admin API: admin tokens, agent tokens, migrations and runs, on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlalchemy as sa

from kici.orchestrator.db.schema import AdminRole, admin_tokens, agent_tokens, runs
from kici.orchestrator.store.tokens import hash_token

from .conftest import insert_job, insert_run
from .test_admin_auth import Admin, admin  # noqa: F401 - the fixture

OWNER, ADMIN, AUDITOR = AdminRole.OWNER, AdminRole.ADMIN, AdminRole.AUDITOR


async def test_admin_token_lifecycle(admin: Admin) -> None:  # noqa: F811
    created = await admin.request(ADMIN, "POST", "/tokens", json={"name": "  deploy bot ", "role": "auditor"})
    assert created.status_code == 201
    body = created.json()
    assert body["name"] == "deploy bot" and body["role"] == "auditor" and body["token"].startswith("kici_")
    plaintext = body["token"]
    async with admin.database.read() as conn:
        row = (await conn.execute(sa.select(admin_tokens).where(admin_tokens.c.id == body["id"]))).one()
    assert row.token_hash == hash_token(plaintext)
    assert plaintext not in [str(v) for v in row]

    listed = (await admin.request(ADMIN, "GET", "/tokens")).json()
    assert body["id"] in [t["id"] for t in listed]
    assert all("token" not in t and "token_hash" not in t for t in listed)

    # the new token works, with its role
    me = await admin.http.get("/api/v1/admin/whoami", headers={"Authorization": f"Bearer {plaintext}"})
    assert me.json()["role"] == "auditor"

    revoked = await admin.request(ADMIN, "DELETE", f"/tokens/{body['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert "token" not in revoked.json()
    again = await admin.request(ADMIN, "DELETE", f"/tokens/{body['id']}")
    assert again.status_code == 404 and again.json() == {"error": f"no active admin token with id {body['id']!r}"}
    assert body["id"] not in [t["id"] for t in (await admin.request(ADMIN, "GET", "/tokens")).json()]
    with_revoked = (await admin.request(ADMIN, "GET", "/tokens", params={"include_revoked": "true"})).json()
    assert body["id"] in [t["id"] for t in with_revoked]
    gone = await admin.http.get("/api/v1/admin/whoami", headers={"Authorization": f"Bearer {plaintext}"})
    assert gone.status_code == 401


async def test_only_owners_manage_owner_tokens(admin: Admin) -> None:  # noqa: F811
    denied = await admin.request(ADMIN, "POST", "/tokens", json={"name": "x", "role": "owner"})
    assert denied.status_code == 403
    assert denied.json() == {"error": "permission 'tokens:owner' required; your role 'admin' does not have it"}
    owner_id = (await admin.request(OWNER, "GET", "/whoami")).json()["id"]
    assert (await admin.request(ADMIN, "DELETE", f"/tokens/{owner_id}")).status_code == 403
    created = await admin.request(OWNER, "POST", "/tokens", json={"name": "second owner", "role": "owner"})
    assert created.status_code == 201


async def test_the_last_owner_token_cannot_be_revoked(admin: Admin) -> None:  # noqa: F811
    owner_id = (await admin.request(OWNER, "GET", "/whoami")).json()["id"]
    response = await admin.request(OWNER, "DELETE", f"/tokens/{owner_id}")
    assert response.status_code == 409
    assert "last active owner token" in response.json()["error"]
    second = (await admin.request(OWNER, "POST", "/tokens", json={"name": "o2", "role": "owner"})).json()
    assert (await admin.request(OWNER, "DELETE", f"/tokens/{owner_id}")).status_code == 200
    # the old owner token is now revoked; the new one still works
    assert (await admin.request(OWNER, "GET", "/whoami")).status_code == 401
    me = await admin.http.get("/api/v1/admin/whoami", headers={"Authorization": f"Bearer {second['token']}"})
    assert me.status_code == 200


async def test_agent_token_is_shown_once_and_only_its_hash_is_stored(admin: Admin) -> None:  # noqa: F811
    created = await admin.request(ADMIN, "POST", "/agent-tokens", json={"name": "pool-a", "labels": ["linux", "gpu"]})
    assert created.status_code == 201
    body = created.json()
    assert body["token"].startswith("kat_") and len(body["token"]) == 4 + 64
    assert body["labels"] == ["linux", "gpu"]
    async with admin.database.read() as conn:
        row = (await conn.execute(sa.select(agent_tokens).where(agent_tokens.c.id == body["id"]))).one()
    assert row.token_hash == hash_token(body["token"])
    assert body["token"] not in [str(v) for v in row]
    listed = (await admin.request(AUDITOR, "GET", "/agent-tokens"))
    assert listed.status_code == 403  # auditors do not see credentials
    listed = await admin.request(ADMIN, "GET", "/agent-tokens")
    assert [t for t in listed.json() if t["id"] == body["id"]] == [
        {k: v for k, v in body.items() if k != "token"}
    ]
    assert all("token" not in t for t in listed.json())
    assert (await admin.request(ADMIN, "DELETE", f"/agent-tokens/{body['id']}")).status_code == 200
    assert (await admin.request(ADMIN, "DELETE", f"/agent-tokens/{body['id']}")).status_code == 404


async def test_agent_token_labels_are_validated(admin: Admin) -> None:  # noqa: F811
    for labels, fragment in [(["kici:os:linux"], "reserved"), (["a b"], "whitespace"), ([""], "empty")]:
        response = await admin.request(ADMIN, "POST", "/agent-tokens", json={"name": "x", "labels": labels})
        assert response.status_code == 422, labels
        assert response.json()["error"].startswith("invalid request: labels: ") and fragment in response.json()["error"]
    blank = await admin.request(ADMIN, "POST", "/agent-tokens", json={"name": "  ", "labels": []})
    assert blank.status_code == 422 and "name" in blank.json()["error"]


async def test_db_migrate_status_and_apply(admin: Admin) -> None:  # noqa: F811
    status = (await admin.request(AUDITOR, "GET", "/db/migrate")).json()
    assert status["up_to_date"] is True and status["pending"] == [] and status["current"] == status["head"]
    applied = (await admin.request(ADMIN, "POST", "/db/migrate")).json()
    assert applied == {"before": status["head"], "after": status["head"], "applied": []}


async def test_runs_list_show_jobs_and_filters(admin: Admin) -> None:  # noqa: F811
    async with admin.database.transaction() as conn:
        first = await insert_run(conn, workflow="ci", repo="acme/app", ref="refs/heads/main")
        await insert_job(conn, first, "build", agent_id="agent-1", status="queued")
        second = await insert_run(conn, workflow="deploy", repo="acme/web", status="success")
    everything = (await admin.request(AUDITOR, "GET", "/runs")).json()
    assert [r["id"] for r in everything] == [second, first]  # newest first
    for key in ("id", "workflow", "status", "repo", "ref", "sha", "created_at"):
        assert key in everything[0]
    by_status = (await admin.request(AUDITOR, "GET", "/runs", params={"status": "success"})).json()
    assert [r["id"] for r in by_status] == [second]
    both = (await admin.request(AUDITOR, "GET", "/runs", params={"status": "success,pending"})).json()
    assert len(both) == 2
    assert [r["id"] for r in (await admin.request(AUDITOR, "GET", "/runs", params={"repo": "acme/app"})).json()] == [
        first
    ]
    by_workflow = (await admin.request(AUDITOR, "GET", "/runs", params={"workflow": "deploy"})).json()
    assert [r["id"] for r in by_workflow] == [second]
    assert len((await admin.request(AUDITOR, "GET", "/runs", params={"limit": 1})).json()) == 1
    bad = await admin.request(AUDITOR, "GET", "/runs", params={"status": "done"})
    assert bad.status_code == 422 and "unknown run status 'done'" in bad.json()["error"]
    assert (await admin.request(AUDITOR, "GET", "/runs", params={"limit": 501})).status_code == 422

    shown = (await admin.request(AUDITOR, "GET", f"/runs/{first}")).json()
    assert shown["id"] == first and shown["ref"] == "refs/heads/main" and shown["event"] == {}
    jobs = (await admin.request(AUDITOR, "GET", f"/runs/{first}/jobs")).json()
    assert [(j["name"], j["status"], j["agent"]) for j in jobs] == [("build", "queued", "agent-1")]
    for path in ("/runs/nope", "/runs/nope/jobs"):
        missing = await admin.request(AUDITOR, "GET", path)
        assert missing.status_code == 404 and missing.json() == {"error": "no run with id 'nope'"}


async def test_cancel_a_run_then_409(admin: Admin) -> None:  # noqa: F811
    async with admin.database.transaction() as conn:
        run_id = await insert_run(conn)
        job_id = await insert_job(conn, run_id, "build")
    cancelled = await admin.request(ADMIN, "POST", f"/runs/{run_id}/cancel", json={"force": True})
    assert cancelled.status_code == 200
    assert cancelled.json() == {
        "run_id": run_id,
        "status": "cancelled",
        "run_status": "cancelled",
        "cancelled_jobs": [job_id],
        "running_jobs": [],
        "force": True,
    }
    async with admin.database.read() as conn:
        row = (await conn.execute(sa.select(runs).where(runs.c.id == run_id))).one()
    assert row.status == "cancelled" and row.cancelled_by == "admin token 'admin-token'"
    again = await admin.request(ADMIN, "POST", f"/runs/{run_id}/cancel")
    assert again.status_code == 409
    assert again.json() == {"error": f"run {run_id} has already finished (cancelled); nothing to cancel"}
    missing = await admin.request(ADMIN, "POST", "/runs/nope/cancel")
    assert missing.status_code == 404
