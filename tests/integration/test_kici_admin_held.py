"""`kici-admin source trust` and `kici-admin held list|approve|reject` end to end: the real command in a
subprocess against a real `kici-orchestrator` process (held runs inserted into its database as the ingest
pipeline creates them; the pipeline itself is covered by tests/integration/orchestrator/test_trust.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path

from kici.orchestrator.db.database import Database
from tests.integration.orchestrator.conftest import WORKFLOW_SPEC, insert_job, insert_run
from tests.integration.test_kici_admin import Orchestrator, kici_admin, ok, one_line_error, table
from tests.integration.test_kici_admin import orchestrator as orchestrator  # the module's orchestrator process

REASON = "pull request #2 from fork alice/app by alice (CONTRIBUTOR): held for approval"


def _insert_held(database_url: str, repo: str) -> tuple[str, str]:
    async def insert() -> tuple[str, str]:
        database = Database.connect(database_url)
        try:
            async with database.transaction() as conn:
                run_id = await insert_run(
                    conn, workflow_spec=WORKFLOW_SPEC, repo=repo, status="held", trust="untrusted",
                    secrets_allowed=False, hold_reason=REASON, event={"type": "pr", "branch": "feature"},
                    hold_expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=72),
                )
                job_id = await insert_job(conn, run_id, "build", status="held")
            return run_id, job_id
        finally:
            await database.close()

    return asyncio.run(insert())


def test_source_trust(orchestrator: Orchestrator, tmp_path: Path) -> None:
    url = orchestrator.url
    pem = tmp_path / "app.pem"
    pem.write_text("-----BEGIN RSA PRIVATE KEY-----\nMIIfake\n-----END RSA PRIVATE KEY-----\n")
    ok(kici_admin("source", "add", "github", "trust-gh", "--app-id", "9", "--private-key-file", str(pem),
                  "--webhook-secret", "s", url=url))
    shown = ok(kici_admin("source", "trust", "trust-gh", url=url))
    assert "Fork pull requests:" in shown and "hold" in shown
    assert "OWNER, MEMBER, COLLABORATOR" in shown and "72h (default)" in shown

    changed = json.loads(ok(kici_admin(
        "source", "trust", "trust-gh", "--fork-pull-requests", "allow", "--trusted-user", "dave",
        "--trusted-user", "erin", "--trusted-team", "octo-org/maintainers", "--secrets-for-approved",
        "--hold-expiry", "3d", "--json", url=url)))
    policy = changed["policy"]
    assert policy["fork_pull_requests"] == "allow" and policy["untrusted_authors"] == "hold"
    assert policy["trusted_users"] == ["dave", "erin"] and policy["trusted_teams"] == ["octo-org/maintainers"]
    assert policy["secrets_for_approved"] is True and changed["hold_expiry"] == "72h"
    # (3d is 72h: the policy stores the duration in hours)
    assert policy["hold_expiry"] == "72h"

    human = ok(kici_admin("source", "trust", "trust-gh", "--remove-trusted-user", "DAVE",
                          "--trusted-association", "OWNER", "--hold-expiry", "default", url=url))
    assert human.startswith("Updated the trust policy of source 'trust-gh'.")
    again = json.loads(ok(kici_admin("source", "trust", "trust-gh", "--json", url=url)))["policy"]
    assert again["trusted_users"] == ["erin"] and again["trusted_associations"] == ["OWNER"]
    assert again["hold_expiry"] is None and again["fork_pull_requests"] == "allow"

    bad = kici_admin("source", "trust", "trust-gh", "--trusted-association", "FRIEND", url=url)
    assert "unknown association(s) FRIEND" in one_line_error(bad, 1)
    bad = kici_admin("source", "trust", "trust-gh", "--hold-expiry", "soon", url=url)
    assert "invalid duration" in one_line_error(bad, 1)
    unchanged = json.loads(ok(kici_admin("source", "trust", "trust-gh", "--json", url=url)))["policy"]
    assert unchanged == again

    ok(kici_admin("source", "add", "git", "trust-git", "--url", str(tmp_path / "repo"), url=url))
    assert "has no trust policy" in ok(kici_admin("source", "trust", "trust-git", url=url))
    refused = kici_admin("source", "trust", "trust-git", "--fork-pull-requests", "hold", url=url)
    assert "only github sources have a trust policy" in one_line_error(refused, 1)
    missing = kici_admin("source", "trust", "no-such-source", url=url)
    assert "no source 'no-such-source'" in one_line_error(missing, 1)
    usage = kici_admin("source", "trust", "trust-gh", "--fork-pull-requests", "maybe", url=url)
    assert usage.returncode == 2


def test_held_list_approve_reject(orchestrator: Orchestrator) -> None:
    url = orchestrator.url
    first, first_job = _insert_held(orchestrator.database_url, "acme/held-1")
    second, _ = _insert_held(orchestrator.database_url, "acme/held-2")

    listed = json.loads(ok(kici_admin("held", "list", "--json", url=url)))
    mine = [g for g in listed if g["run_id"] in (first, second)]
    assert [(g["run_id"], g["kind"], g["reason"]) for g in mine] == [(first, "trust", REASON),
                                                                       (second, "trust", REASON)]
    rows = table(ok(kici_admin("held", "list", url=url)))
    assert rows[0][:4] == ["RUN", "KIND", "JOB", "REPO"]
    assert [first, "trust", "(run)", "acme/held-1"] in [r[:4] for r in rows[1:]]

    shown = ok(kici_admin("runs", "show", first, url=url))
    assert "Trust:" in shown and "untrusted" in shown and f"Held:         {REASON}" in shown

    assert ok(kici_admin("held", "approve", first, url=url)) == f"Run {first} approved (1 job(s) queued).\n"
    run = json.loads(ok(kici_admin("runs", "show", first, "--json", url=url)))
    assert run["trust"] == "approved" and run["status"] == "pending" and run["secrets_allowed"] is False
    assert [(j["id"], j["status"]) for j in run["jobs"]] == [(first_job, "queued")]
    twice = kici_admin("held", "approve", first, url=url)
    assert one_line_error(twice, 1) == (
        f"kici-admin: error: run {first} is not held (status pending): nothing to approve (HTTP 409)"
    )

    rejected = json.loads(ok(kici_admin("held", "reject", second, "--reason", "not this one", "--json", url=url)))
    assert rejected["action"] == "reject" and rejected["released_job_ids"] == []
    run = json.loads(ok(kici_admin("runs", "show", second, "--json", url=url)))
    assert run["status"] == "cancelled" and run["failure_reason"].endswith(": not this one")
    assert not [g for g in json.loads(ok(kici_admin("held", "list", "--json", url=url)))
                if g["run_id"] in (first, second)]
    unknown = kici_admin("held", "reject", "no-such-run", url=url)
    assert one_line_error(unknown, 1) == "kici-admin: error: no run 'no-such-run' (HTTP 404)"
    audit = json.loads(ok(kici_admin("audit", "list", "--json", url=url)))
    decided = {(a["action"], a["path"]) for a in audit if a["action"].startswith("held.")}
    assert decided == {("held.approve", f"/api/v1/admin/held/{first}/approve"),
                       ("held.reject", f"/api/v1/admin/held/{second}/reject")}
