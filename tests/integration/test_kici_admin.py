"""`kici-admin` end to end: the real command in a subprocess against a real `kici-orchestrator` process."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from kici.orchestrator.db import schema
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import EventLogStatus
from kici.orchestrator.store import agents, events, outbox, tokens
from tests.integration.orchestrator.conftest import OrchestratorProcess, insert_job, insert_run, orchestrator_env
from tests.integration.orchestrator.test_providers_git import GIT_ENV, GitRepo, compile_into

OWNER_TOKEN = "kici_e2e_pinned_owner_token_0123456789abcdef"
PUBLIC_URL = "https://ci.example.test/kici"


class Orchestrator:
    def __init__(self, process: OrchestratorProcess, data_dir: Path) -> None:
        self.process = process
        self.url = process.url
        self.database_url = f"sqlite:///{data_dir / 'kici.db'}"


@pytest.fixture(scope="module")
def orchestrator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orchestrator]:
    tmp = tmp_path_factory.mktemp("orchestrator")
    data_dir = tmp / "data"
    env = orchestrator_env(
        tmp, {"KICI_PORT": "0", "KICI_DATA_DIR": str(data_dir), "KICI_BOOTSTRAP_ADMIN_TOKEN": OWNER_TOKEN,
              "KICI_PUBLIC_URL": PUBLIC_URL}
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "kici.orchestrator"],
        env=env,
        cwd=tmp,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    process = OrchestratorProcess(proc)
    try:
        process.wait_for_event("orchestrator.ready")
        yield Orchestrator(process, data_dir)
    finally:
        process.kill()


def kici_admin(
    *args: str, url: str | None = None, token: str | None = OWNER_TOKEN, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KICI_")}
    if url is not None:
        full_env["KICI_ADMIN_URL"] = url
    if token is not None:
        full_env["KICI_ADMIN_TOKEN"] = token
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "kici.admin", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def table(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.strip().splitlines()]


def test_whoami(orchestrator: Orchestrator) -> None:
    out = ok(kici_admin("whoami", url=orchestrator.url))
    assert "Token: bootstrap" in out and "Role:  owner" in out and "tokens:owner" in out
    me = json.loads(ok(kici_admin("whoami", "--json", url=orchestrator.url)))
    assert me["name"] == "bootstrap" and me["role"] == "owner"


def test_token_create_list_revoke(orchestrator: Orchestrator, tmp_path: Path) -> None:
    url = orchestrator.url
    out = ok(kici_admin("token", "create", "--name", "ci-reader", "--role", "auditor", url=url))
    assert "Created admin token 'ci-reader' (role auditor" in out and "shown once" in out
    plaintext = next(line.strip() for line in out.splitlines() if line.strip().startswith("kici_"))

    created = json.loads(ok(kici_admin("token", "create", "--name", "ops", "--role", "admin", "--json", url=url)))
    assert created["token"].startswith("kici_") and created["role"] == "admin"

    rows = table(ok(kici_admin("token", "list", url=url)))
    assert rows[0] == ["ID", "NAME", "ROLE", "CREATED", "LAST", "USED", "EXPIRES"]
    names = {row[1]: row for row in rows[1:]}
    assert set(names) >= {"bootstrap", "ci-reader", "ops"}
    assert names["ci-reader"][2] == "auditor"
    listed = json.loads(ok(kici_admin("token", "list", "--json", url=url)))
    assert all("token" not in t for t in listed)
    reader_id = next(t["id"] for t in listed if t["name"] == "ci-reader")

    # the new token works from a file, and an auditor cannot write
    token_file = tmp_path / "token"
    token_file.write_text(plaintext + "\n")
    me = json.loads(ok(kici_admin("--token-file", str(token_file), "whoami", "--json", url=url)))
    assert me["role"] == "auditor"
    denied = kici_admin("--token-file", str(token_file), "token", "create", "--name", "x", "--role", "admin", url=url)
    assert one_line_error(denied, 1) == (
        "kici-admin: error: permission 'tokens:write' required; your role 'auditor' does not have it (HTTP 403)"
    )

    assert f"Revoked admin token 'ci-reader' (id {reader_id})." in ok(kici_admin("token", "revoke", reader_id, url=url))
    revoked = kici_admin("whoami", url=url, token=plaintext)
    assert one_line_error(revoked, 1) == "kici-admin: error: missing or invalid admin token (HTTP 401)"
    again = kici_admin("token", "revoke", reader_id, "--json", url=url)
    assert one_line_error(again, 1) == f"kici-admin: error: no active admin token with id '{reader_id}' (HTTP 404)"
    assert "ci-reader" not in ok(kici_admin("token", "list", url=url))
    assert "ci-reader" in ok(kici_admin("token", "list", "--all", url=url))


def test_agent_token(orchestrator: Orchestrator) -> None:
    url = orchestrator.url
    created = json.loads(
        ok(kici_admin("agent-token", "create", "--name", "pool", "--labels", "linux,gpu", "--json", url=url))
    )
    assert created["token"].startswith("kat_") and created["labels"] == ["linux", "gpu"]
    assert created["allow_root_steps"] is False
    human = ok(kici_admin("agent-token", "create", "--name", "pool-2", url=url))
    assert "labels none" in human and "    kat_" in human
    rooted = ok(kici_admin("agent-token", "create", "--name", "root-pool", "--allow-root-steps", url=url))
    assert "root steps allowed" in rooted
    rows = table(ok(kici_admin("agent-token", "list", url=url)))
    assert next(row for row in rows if row[1] == "pool")[1:3] == ["pool", "linux,gpu"]
    assert created["token"] not in ok(kici_admin("agent-token", "list", "--json", url=url))
    assert "Revoked agent token 'pool'" in ok(kici_admin("agent-token", "revoke", created["id"], url=url))
    bad = kici_admin("agent-token", "create", "--name", "x", "--labels", "linux,kici:os:linux", url=url)
    assert "reserved 'kici:' prefix" in one_line_error(bad, 2)


def test_db_migrate(orchestrator: Orchestrator) -> None:
    out = ok(kici_admin("db", "migrate", "--status", url=orchestrator.url))
    assert "Up to date." in out
    status = json.loads(ok(kici_admin("db", "migrate", "--status", "--json", url=orchestrator.url)))
    assert status["up_to_date"] is True and status["current"] == status["head"]
    assert "Nothing to apply" in ok(kici_admin("db", "migrate", url=orchestrator.url))


def _insert_run(database_url: str, **values: Any) -> tuple[str, str]:
    async def insert() -> tuple[str, str]:
        database = Database.connect(database_url)
        try:
            async with database.transaction() as conn:
                run_id = await insert_run(conn, **values)
                job_id = await insert_job(conn, run_id, "build", status="queued")
            return run_id, job_id
        finally:
            await database.close()

    return asyncio.run(insert())


def test_runs(orchestrator: Orchestrator) -> None:
    url = orchestrator.url
    run_id, _job_id = _insert_run(orchestrator.database_url, workflow="e2e", repo="acme/e2e", ref="refs/heads/main")
    listed = json.loads(ok(kici_admin("runs", "list", "--repo", "acme/e2e", "--json", url=url)))
    assert [r["id"] for r in listed] == [run_id]
    assert {"id", "workflow", "status", "repo", "ref", "sha", "created_at"} <= set(listed[0])
    rows = table(ok(kici_admin("runs", "list", "--workflow", "e2e", "--status", "pending", url=url)))
    assert rows[0][:4] == ["ID", "WORKFLOW", "STATUS", "REPO"] and rows[1][:4] == [run_id, "e2e", "pending", "acme/e2e"]
    assert "No runs." in ok(kici_admin("runs", "list", "--repo", "acme/none", url=url))
    assert f"Run:          {run_id}" in ok(kici_admin("runs", "show", run_id, url=url))
    jobs = json.loads(ok(kici_admin("runs", "jobs", run_id, "--json", url=url)))
    assert [(j["name"], j["status"], j["agent"]) for j in jobs] == [("build", "queued", None)]
    assert "build" in ok(kici_admin("runs", "jobs", run_id, url=url))
    assert "cancelled" in ok(kici_admin("runs", "cancel", run_id, "--force", url=url))
    finished = kici_admin("runs", "cancel", run_id, url=url)
    assert one_line_error(finished, 1) == (
        f"kici-admin: error: run {run_id} has already finished (cancelled); nothing to cancel (HTTP 409)"
    )
    bad = kici_admin("runs", "list", "--status", "done", url=url)
    assert "unknown run status 'done'" in one_line_error(bad, 1)


def test_runs_list_filters_and_cursor_paging(orchestrator: Orchestrator) -> None:
    url = orchestrator.url
    made = [
        _insert_run(orchestrator.database_url, workflow="paged", repo="acme/paged", sha=f"{i:x}" * 40, branch="dev",
                    created_at=dt.datetime(2026, 11, 1, 8, i, tzinfo=dt.UTC))[0]
        for i in range(5)
    ]
    newest_first = made[::-1]
    first = kici_admin("runs", "list", "--workflow", "paged", "--branch", "dev", "--limit", "2", "--json", url=url)
    assert [r["id"] for r in json.loads(ok(first))] == newest_first[:2]
    hint = first.stderr.strip()
    assert hint.startswith("More runs: kici-admin runs list --before ")
    cursor = hint.split("--before ")[1].split()[0]
    second = kici_admin("runs", "list", "--workflow", "paged", "--before", cursor, "--limit", "2", "--json", url=url)
    assert [r["id"] for r in json.loads(ok(second))] == newest_first[2:4]
    by_sha = json.loads(ok(kici_admin("runs", "list", "--sha", "3333333", "--json", url=url)))
    assert [r["id"] for r in by_sha] == [made[3]]
    assert "No runs." in ok(kici_admin("runs", "list", "--workflow", "paged", "--branch", "main", url=url))
    assert "No runs." in ok(kici_admin("runs", "list", "--workflow", "paged", "--trigger", "pr", url=url))
    bad = kici_admin("runs", "list", "--before", "nonsense", url=url)
    assert "before (query)" in one_line_error(bad, 1)


def test_connection_and_usage_errors(orchestrator: Orchestrator, tmp_path: Path) -> None:
    unreachable = kici_admin("whoami", url="http://127.0.0.1:1")
    assert one_line_error(unreachable, 1).startswith(
        "kici-admin: error: cannot connect to the orchestrator at http://127.0.0.1:1: "
    )
    assert one_line_error(kici_admin("whoami", url="localhost:4000"), 2) == (
        "kici-admin: error: invalid orchestrator URL 'localhost:4000': expected http(s)://host[:port][/base-path]"
    )
    missing = kici_admin("whoami", url=orchestrator.url, token=None)
    assert one_line_error(missing, 2) == (
        "kici-admin: error: no admin token: pass --token or --token-file, or set KICI_ADMIN_TOKEN"
    )
    no_file = kici_admin("--token-file", str(tmp_path / "absent"), "whoami", url=orchestrator.url, token=None)
    assert one_line_error(no_file, 2).startswith(f"kici-admin: error: cannot read the token file {tmp_path / 'absent'}")
    bad_role = kici_admin("token", "create", "--name", "x", "--role", "root", url=orchestrator.url)
    assert one_line_error(bad_role, 2).startswith("kici-admin token create: error: Invalid value for '--role'")
    unknown = kici_admin("tokens", url=orchestrator.url)
    assert "No such command 'tokens'" in one_line_error(unknown, 2)
    not_kici = kici_admin("whoami", url=orchestrator.url + "/not-admin-base")
    assert one_line_error(not_kici, 1) == (
        f"kici-admin: error: no KiCI admin API at {orchestrator.url}/not-admin-base (HTTP 404); "
        "check --url, including the orchestrator's KICI_BASE_PATH"
    )
    # --help needs no token and no server
    assert "Admin tokens" in ok(kici_admin("--help", token=None))
    assert "--role" in ok(kici_admin("token", "create", "--help", token=None))


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "kici-admin"
    if not script.exists():
        pytest.skip("kici-admin console script not installed in this environment (pip install -e .)")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "Manage a KiCI orchestrator" in result.stdout


# -- queue, agents, events --------------------------------------------------------------------------


def _seed_lists(database_url: str) -> dict[str, str]:
    """A queued job, a busy agent, an idle disconnected one, and a processed delivery with its run."""

    async def seed() -> dict[str, str]:
        database = Database.connect(database_url)
        try:
            async with database.transaction() as conn:
                token = await tokens.create_agent_token(conn, name="cli-pool", labels=["linux"])
                for agent_id in ("cli-agent-busy", "cli-agent-idle"):
                    await agents.register_agent(conn, agent_id=agent_id, org_id="default",
                                                agent_token_id=token.token.id, labels=["linux", "docker"],
                                                max_concurrency=2, version="9.9", hostname=f"{agent_id}.lan")
                await agents.mark_agent_disconnected(conn, "cli-agent-idle")
                await agents.set_agent_draining(conn, "cli-agent-busy", True)
                assert await events.begin_delivery(conn, delivery_id="cli-delivery-1", provider="git",
                                                   ttl_seconds=60, event="push", repo="acme/lists",
                                                   ref="refs/heads/main", sha="c" * 40)
                await events.finish_event_log(conn, "cli-delivery-1", EventLogStatus.PROCESSED, matched_count=1)
                run_id = await insert_run(conn, workflow="lists", repo="acme/lists", delivery_id="cli-delivery-1")
                await insert_job(conn, run_id, "busy", status="running", agent_id="cli-agent-busy")
                waiting = await insert_job(conn, run_id, "waiting", status="queued")
                await conn.execute(schema.dispatch_queue.insert().values(job_id=waiting, run_id=run_id,
                                                                         runs_on_labels=["gpu"]))
            return {"run": run_id, "waiting": waiting}
        finally:
            await database.close()

    return asyncio.run(seed())


def test_queue_agents_events(orchestrator: Orchestrator) -> None:
    url = orchestrator.url
    seeded = _seed_lists(orchestrator.database_url)

    queued = json.loads(ok(kici_admin("queue", "list", "--json", url=url)))
    mine = next(r for r in queued if r["job_id"] == seeded["waiting"])
    assert (mine["job_name"], mine["workflow"], mine["repo"], mine["status"], mine["attempts"]) == (
        "waiting", "lists", "acme/lists", "pending", 0)
    rows = table(ok(kici_admin("queue", "list", "--status", "pending", url=url)))
    assert rows[0] == ["JOB", "WORKFLOW", "REPO", "STATUS", "AGENT", "ATTEMPTS", "AGE", "DISPATCHED", "RUN"]
    row = next(r for r in rows if r[-1] == seeded["run"])
    assert row[:6] == ["waiting", "lists", "acme/lists", "pending", "-", "0"] and row[6].endswith("s")
    assert "The queue is empty." in ok(kici_admin("queue", "list", "--status", "recovering", url=url))

    listed = json.loads(ok(kici_admin("agents", "list", "--json", url=url)))
    by_id = {a["id"]: a for a in listed}
    assert (by_id["cli-agent-busy"]["running_jobs"], by_id["cli-agent-busy"]["connected"]) == (1, True)
    assert (by_id["cli-agent-idle"]["running_jobs"], by_id["cli-agent-idle"]["connected"]) == (0, False)
    rows = table(ok(kici_admin("agents", "list", "--connected", url=url)))
    assert rows[0] == ["ID", "HOSTNAME", "LABELS", "CONNECTED", "JOBS", "VERSION", "LAST", "SEEN"]
    assert [r[:6] for r in rows[1:] if r[0].startswith("cli-")] == [
        ["cli-agent-busy", "cli-agent-busy.lan", "linux,docker", "draining", "1/2", "9.9"]]
    shown = ok(kici_admin("agents", "show", "cli-agent-idle", url=url))
    assert "Agent:      cli-agent-idle" in shown and "Connected:  no" in shown and "Jobs:       0/2" in shown
    shown_busy = json.loads(ok(kici_admin("agents", "show", "cli-agent-busy", "--json", url=url)))
    assert (shown_busy["running_jobs"], shown_busy["draining"]) == (1, True)
    assert "Connected:  draining" in ok(kici_admin("agents", "show", "cli-agent-busy", url=url))
    missing = kici_admin("agents", "show", "no-such-agent", url=url)
    assert one_line_error(missing, 1) == "kici-admin: error: no agent with id 'no-such-agent' (HTTP 404)"

    delivered = json.loads(ok(kici_admin("events", "list", "--status", "processed", "--json", url=url)))
    assert "cli-delivery-1" in [e["delivery_id"] for e in delivered]
    rows = table(ok(kici_admin("events", "list", "--limit", "500", url=url)))
    assert rows[0][:8] == ["DELIVERY", "PROVIDER", "EVENT", "REPO", "REF", "SHA", "STATUS", "MATCHED"]
    assert next(r for r in rows if r[0] == "cli-delivery-1")[1:8] == [
        "git", "push", "acme/lists", "refs/heads/main", "c" * 12, "processed", "1"]
    assert "No events." in ok(kici_admin("events", "list", "--status", "lockfile_corrupt", url=url))
    shown = ok(kici_admin("events", "show", "cli-delivery-1", url=url))
    assert "Delivery:   cli-delivery-1" in shown and f"Runs:       {seeded['run']}" in shown
    detail = json.loads(ok(kici_admin("events", "show", "cli-delivery-1", "--json", url=url)))
    assert detail["run_ids"] == [seeded["run"]] and detail["status"] == "processed"
    gone = kici_admin("events", "show", "nope", url=url)
    assert one_line_error(gone, 1) == "kici-admin: error: no delivery with id 'nope' (HTTP 404)"
    bad = kici_admin("events", "list", "--status", "done", url=url)
    assert "Invalid value for '--status'" in one_line_error(bad, 2)


# -- sources ----------------------------------------------------------------------------------------


def test_source_commands(orchestrator: Orchestrator, tmp_path: Path) -> None:
    url = orchestrator.url
    created = json.loads(ok(kici_admin("source", "add", "git", "cli-git", "--url", str(tmp_path / "repo"),
                                       "--poll", "120", "--json", url=url)))
    generated = created["generated_secrets"]["webhook_secret"]
    assert created["kind"] == "git" and created["config"]["poll_seconds"] == 120
    assert created["secret_fields"] == ["webhook_secret"] and len(generated) >= 32
    human = ok(kici_admin("source", "add", "git", "cli-git-2", "--url", "/srv/app.git", "--secret", "given", url=url))
    assert "Created git source 'cli-git-2'" in human and "Generated" not in human and "given" not in human
    pem = tmp_path / "app.pem"
    pem.write_text("-----BEGIN RSA PRIVATE KEY-----\nMIIfake\n-----END RSA PRIVATE KEY-----\n")
    gh = json.loads(ok(kici_admin("source", "add", "github", "cli-gh", "--app-id", "7", "--private-key-file",
                                  str(pem), "--webhook-secret", "ghsecret", "--json", url=url)))
    assert gh["config"]["app_id"] == 7 and gh["secret_fields"] == ["private_key", "webhook_secret"]
    generic = json.loads(ok(kici_admin("source", "add", "generic", "cli-generic", "--auth", "ip_allowlist",
                                       "--allow-ip", "10.0.0.0/8", "--events", "deploy,build", "--rate-limit", "30",
                                       "--json", url=url)))
    assert generic["config"] == {"auth": "ip_allowlist", "allowed_ips": ["10.0.0.0/8"],
                                 "allowed_events": ["deploy", "build"], "rate_limit_rpm": 30}

    listed = json.loads(ok(kici_admin("source", "list", "--json", url=url)))
    names = [s["name"] for s in listed]
    assert {"cli-git", "cli-git-2", "cli-gh", "cli-generic"} <= set(names)
    listed_text = ok(kici_admin("source", "list", "--json", url=url))
    assert generated not in listed_text and "ghsecret" not in listed_text and "MIIfake" not in listed_text
    only_github = json.loads(ok(kici_admin("source", "list", "--kind", "github", "--json", url=url)))
    assert [s["name"] for s in only_github] == ["cli-gh"]
    shown = json.loads(ok(kici_admin("source", "show", "cli-git", "--json", url=url)))
    assert shown["id"] == created["id"] and "generated_secrets" not in shown
    assert "Kind:" in ok(kici_admin("source", "show", "cli-git", url=url))

    updated = json.loads(ok(kici_admin("source", "update", "cli-git", "--poll", "0", "--set", "default_branch=trunk",
                                       "--json", url=url)))
    assert "poll_seconds" not in updated["config"] and updated["config"]["default_branch"] == "trunk"
    disabled = json.loads(ok(kici_admin("source", "disable", "cli-git", "--json", url=url)))
    assert disabled["enabled"] is False
    assert json.loads(ok(kici_admin("source", "show", "cli-git", "--json", url=url)))["enabled"] is False
    assert "enabled" in ok(kici_admin("source", "enable", "cli-git", url=url))

    dup = kici_admin("source", "add", "git", "cli-git", "--url", "/x", url=url)
    assert one_line_error(dup, 1) == "kici-admin: error: a source named 'cli-git' already exists (HTTP 409)"
    bad = kici_admin("source", "add", "generic", "g2", "--auth", "ip_allowlist", url=url)
    assert one_line_error(bad, 1) == (
        "kici-admin: error: config.allowed_ips is required for auth ip_allowlist (HTTP 422)"
    )
    not_git = kici_admin("source", "hook", "cli-gh", url=url)
    assert "hooks are for git sources (HTTP 409)" in one_line_error(not_git, 1)

    for name in ("cli-git", "cli-git-2", "cli-gh", "cli-generic"):
        removed = json.loads(ok(kici_admin("source", "remove", name, "--json", url=url)))
        assert removed["name"] == name
    gone = kici_admin("source", "show", "cli-git", url=url)
    assert one_line_error(gone, 1) == "kici-admin: error: no source 'cli-git' (HTTP 404)"


HOOK_WORKFLOWS = """
from kici import job, push, step, workflow
ci = workflow("ci", on=[push(branches=["main"])], jobs=[job("build", steps=[step("hi", "echo hi")])])
"""


def test_git_hook_notifies_the_orchestrator(orchestrator: Orchestrator, tmp_path: Path) -> None:
    """The script from `kici-admin source hook`, installed as post-commit in a real repository, makes a
    real commit start a run for that commit."""
    missing = [tool for tool in ("curl", "openssl", "git") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the git hook needs {', '.join(missing)}, which is not installed on this machine")
    url = orchestrator.url
    repo = GitRepo(tmp_path / "hooked")
    compile_into(repo.path, HOOK_WORKFLOWS)
    repo.commit("lock file")
    added = ok(kici_admin("source", "add", "git", "hooked", "--url", str(repo.path), "--repo", "acme/hooked",
                          url=url))
    # a working repository: the hook to install is post-commit, at the repository's own hooks directory
    hook = repo.path / ".git" / "hooks" / "post-commit"
    assert f"kici-admin source hook hooked > {hook} && chmod 700 {hook}" in added, added
    assert "post-receive" not in added
    script = ok(kici_admin("source", "hook", "hooked", url=url))
    assert script.startswith("#!/bin/sh") and "/webhook/default/git/hooked" in script
    hook.write_text(script)
    hook.chmod(0o755)

    repo.write("README", "hello\n")
    repo.git("add", "-A")
    committed = subprocess.run(["git", "-C", str(repo.path), "commit", "-m", "a commit the hook reports"],
                               capture_output=True, text=True, env=GIT_ENV, check=True, timeout=60)
    sha = repo.git("rev-parse", "HEAD")
    # the run exists once the hook has returned: the webhook answers after creating it
    found = json.loads(ok(kici_admin("runs", "list", "--repo", "acme/hooked", "--json", url=url)))
    run = next((r for r in found if r["sha"] == sha), None)
    assert run is not None, f"no run for {sha}: {found}; log: {orchestrator.process.lines[-20:]}"
    assert run["workflow"] == "ci" and run["ref"] == "refs/heads/main"
    # and the hook said so, with the run's dashboard URL (KICI_PUBLIC_URL is set); git sends a hook's
    # output to the terminal's stderr
    assert f"kici: refs/heads/main: run {run['id']} {PUBLIC_URL}/runs/{run['id']}" in committed.stderr, (
        committed.stdout + committed.stderr)

    # a wrong secret is refused (401) yet never fails the commit, and starts nothing
    hook.write_text(script.replace("KICI_WEBHOOK_SECRET='", "KICI_WEBHOOK_SECRET='wrong"))
    refused = subprocess.run(["git", "-C", str(repo.path), "commit", "--allow-empty", "-m", "not reported"],
                             capture_output=True, text=True, env=GIT_ENV, check=True, timeout=60)
    assert "kici hook: could not notify" in refused.stderr and "401" in refused.stderr, refused.stderr
    assert repo.git("rev-parse", "HEAD") != sha
    # the hook has returned, so the orchestrator has answered: no run was started
    found = json.loads(ok(kici_admin("runs", "list", "--repo", "acme/hooked", "--json", url=url)))
    assert [r["sha"] for r in found] == [sha]
    ok(kici_admin("source", "remove", "hooked", url=url))


def test_git_hook_as_post_receive(orchestrator: Orchestrator, tmp_path: Path) -> None:
    """The same script installed as post-receive on a bare repository: a push starts a run for the pushed
    commit; with the orchestrator unreachable the push still succeeds."""
    missing = [tool for tool in ("curl", "openssl", "git") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the git hook needs {', '.join(missing)}, which is not installed on this machine")
    url = orchestrator.url
    server = tmp_path / "server.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(server)], check=True, env=GIT_ENV)
    added = ok(kici_admin("source", "add", "git", "pushed", "--url", str(server), "--repo", "acme/pushed", url=url))
    hook = server / "hooks" / "post-receive"
    assert f"kici-admin source hook pushed > {hook} && chmod 700 {hook}" in added, added  # a bare repository
    script = ok(kici_admin("source", "hook", "pushed", "--url", url, url=url))
    hook.write_text(script)
    hook.chmod(0o700)

    work = GitRepo(tmp_path / "work")
    compile_into(work.path, HOOK_WORKFLOWS)
    pushed: list[subprocess.CompletedProcess[str]] = []
    shas = []
    for message in ("first", "second"):
        work.write("README", f"{message}\n")
        shas.append(work.commit(message))
        pushed.append(subprocess.run(["git", "-C", str(work.path), "push", str(server), "main"],
                                     capture_output=True, text=True, env=GIT_ENV, check=True, timeout=60))
    # the push has returned after the hook, which waited for the orchestrator's answer
    runs = json.loads(ok(kici_admin("runs", "list", "--repo", "acme/pushed", "--json", url=url)))
    by_sha = {r["sha"]: r["id"] for r in runs}
    assert set(shas) <= set(by_sha), runs
    for sha, push in zip(shas, pushed, strict=True):
        # what the hook prints reaches the pusher as "remote: …"
        line = f"remote: kici: refs/heads/main: run {by_sha[sha]} {PUBLIC_URL}/runs/{by_sha[sha]}"
        assert line in push.stderr, push.stderr

    hook.write_text(script.replace(url, "http://127.0.0.1:1"))
    work.write("README", "unreachable\n")
    work.commit("third")
    started = time.monotonic()
    work.git("push", "-q", str(server), "main")  # check=True: the push itself succeeds
    assert time.monotonic() - started < 15
    ok(kici_admin("source", "remove", "pushed", url=url))


def test_audit_list_shows_denials(orchestrator: Orchestrator) -> None:
    auditor = json.loads(ok(kici_admin("token", "create", "--name", "audit-reader", "--role", "auditor", "--json",
                                       url=orchestrator.url)))
    denied = kici_admin("token", "create", "--name", "x", "--role", "admin", url=orchestrator.url,
                        token=auditor["token"])
    assert denied.returncode != 0
    kici_admin("whoami", url=orchestrator.url, token="kici_" + "9" * 64)
    entries = json.loads(ok(kici_admin("audit", "list", "--json", url=orchestrator.url, token=auditor["token"])))
    [mine] = [e for e in entries if e["token_id"] == auditor["id"]]
    assert (mine["status"], mine["role"], mine["permission"]) == (403, "auditor", "tokens:write")
    assert any(e["status"] == 401 and e["reason"] == "unknown_token" for e in entries)
    listed = ok(kici_admin("audit", "list", url=orchestrator.url))
    assert "permission_denied" in listed and "tokens:write" in listed


# -- reports and notification options -------------------------------------------------------------------


def _seed_reports(database_url: str) -> tuple[str, dict[str, int]]:
    async def seed() -> tuple[str, dict[str, int]]:
        db = Database.connect(database_url)
        try:
            async with db.transaction() as conn:
                run = await insert_run(conn, workflow="reports", repo="acme/reports")
                targets = {"notify": [{"url": f"http://receiver.invalid/{p}"} for p in ("gone", "ok")]}
                rows = outbox.run_finished_rows(targets, "default", run)
                rows[0] |= {"status": "failed", "attempts": 3}
                rows[1] |= {"status": "sent"}
                for row in rows:  # one INSERT each: a multi-row INSERT needs the same columns in every row
                    await outbox.insert_rows(conn, [row])
                await conn.execute(schema.report_outbox.update().where(schema.report_outbox.c.status == "failed")
                                   .values(last_error="POST http://receiver.invalid/gone: HTTP 410"))
                found = await outbox.list_reports(conn, org_id="default", run_id=run)
            return run, {str(r.target): r.id for r in found}
        finally:
            await db.close()

    return asyncio.run(seed())


def test_reports_list_and_retry(orchestrator: Orchestrator) -> None:
    url = orchestrator.url
    run, ids = _seed_reports(orchestrator.database_url)
    failed_id, sent_id = ids["http://receiver.invalid/gone"], ids["http://receiver.invalid/ok"]
    listed = json.loads(ok(kici_admin("reports", "list", "--status", "failed", "--json", url=url)))
    mine = next(r for r in listed if r["id"] == failed_id)
    assert (mine["kind"], mine["event"], mine["attempts"], mine["run_id"]) == ("notification", "run.finished", 3, run)
    assert mine["last_error"].endswith("HTTP 410")
    rows = table(ok(kici_admin("reports", "list", "--run", run, url=url)))
    assert rows[0][:7] == ["ID", "KIND", "EVENT", "STATUS", "ATTEMPTS", "TO", "NEXT"]
    assert {(r[0], r[3]) for r in rows[1:]} == {(str(failed_id), "failed"), (str(sent_id), "sent")}
    assert "is pending again" in ok(kici_admin("reports", "retry", str(failed_id), url=url))
    # sent again at once: this orchestrator has no KICI_NOTIFY_SECRET, so the attempt fails for good again
    deadline = time.monotonic() + 20
    while True:
        again = {r["id"]: r for r in json.loads(ok(kici_admin("reports", "list", "--run", run, "--json", url=url)))}
        if again[failed_id]["attempts"] == 4 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert again[failed_id]["status"] == "failed" and "no notify secret" in again[failed_id]["last_error"]
    not_failed = kici_admin("reports", "retry", str(sent_id), url=url)
    assert one_line_error(not_failed, 1) == (
        f"kici-admin: error: report {sent_id} is sent, not failed; only a failed report can be retried (HTTP 409)"
    )
    assert "(HTTP 404)" in one_line_error(kici_admin("reports", "retry", "999999", url=url), 1)
    assert "Invalid value for 'ID'" in one_line_error(kici_admin("reports", "retry", "x", url=url), 2)


def test_source_notify_options(orchestrator: Orchestrator) -> None:
    url = orchestrator.url
    created = json.loads(ok(kici_admin(
        "source", "add", "git", "cli-notify", "--url", "/srv/notify.git", "--notify-url", "https://hooks.example/a",
        "--notify-url", "https://hooks.example/b", "--notify-job-events", "--notify-secret", "sign-me", "--json",
        url=url,
    )))
    assert created["config"]["notify_urls"] == ["https://hooks.example/a", "https://hooks.example/b"]
    assert created["config"]["notify_job_events"] is True
    assert created["secret_fields"] == ["notify_secret", "webhook_secret"]
    updated = json.loads(ok(kici_admin("source", "update", "cli-notify", "--notify-url", "https://hooks.example/c",
                                       "--no-notify-job-events", "--json", url=url)))
    assert updated["config"]["notify_urls"] == ["https://hooks.example/c"]
    assert updated["config"]["notify_job_events"] is False
    bad = kici_admin("source", "update", "cli-notify", "--notify-url", "ftp://nope", url=url)
    assert one_line_error(bad, 1) == (
        "kici-admin: error: config.notify_urls: 'ftp://nope' is not an http(s) URL (HTTP 422)"
    )
    ok(kici_admin("source", "remove", "cli-notify", url=url))
