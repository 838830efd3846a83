"""Schedules and manual runs through real `kici-orchestrator` processes and the real `kici-admin` CLI:
manual runs with valid and invalid inputs; a `* * * * *` schedule fires once per minute and not again
after a restart (SQLite and PostgreSQL); two orchestrators on one PostgreSQL fire each slot exactly once.

The schedule tests bring the next slot forward in the database rather than wait for a minute boundary."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from kici.orchestrator.db import schema
from kici.orchestrator.db.database import Database
from tests.conftest import kici_env
from tests.integration.orchestrator.conftest import OrchestratorProcess, StartOrchestrator
from tests.integration.orchestrator.schedule_harness import next_fire, schedule_repo, set_next_fire

PINNED = "pinned-admin-token-for-schedule-tests"


def orchestrator_settings(tmp_path: Path, database_url: str, name: str) -> dict[str, str]:
    return {
        "KICI_DATA_DIR": str(tmp_path / name),
        "KICI_DATABASE_URL": database_url,
        "KICI_BOOTSTRAP_ADMIN_TOKEN": PINNED,
        "KICI_SECRET_KEY": "cd" * 32,
    }


def kici_admin(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kici.admin", *args],
        env=kici_env({"KICI_ADMIN_URL": url, "KICI_ADMIN_TOKEN": PINNED}),
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )


def ready(orch: OrchestratorProcess) -> str:
    orch.wait_for_event("orchestrator.ready")
    return orch.url


def runs_of(database_url: str, workflow: str) -> list[Any]:
    async def read() -> list[Any]:
        db = Database.connect(database_url)
        try:
            async with db.read() as conn:
                query = sa.select(schema.runs).where(schema.runs.c.workflow == workflow)
                return list(await conn.execute(query.order_by(schema.runs.c.created_at)))
        finally:
            await db.close()

    return asyncio.run(read())


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def wait_until(condition: Any, *, within: float, what: str) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g}s waiting for {what}")
        time.sleep(0.2)


def test_manual_runs_through_the_cli(start_orchestrator: StartOrchestrator, database_url: str, tmp_path: Path) -> None:
    repo, head = schedule_repo(tmp_path / "repo")
    url = ready(start_orchestrator(orchestrator_settings(tmp_path, database_url, "data")))
    added = kici_admin(url, "source", "add", "git", "local", "--url", str(repo.path), "--repo", "acme/app", "--json")
    assert added.returncode == 0, added.stderr

    started = kici_admin(url, "runs", "start", "deploy", "--source", "local", "--ref", "main",
                         "--input", "count=2", "--input", "mode=slow", "--json")
    assert started.returncode == 0, started.stderr
    run = json.loads(started.stdout)
    assert run["id"] and run["workflow"] == "deploy" and run["sha"] == head
    assert run["event"]["inputs"] == {"count": 2, "mode": "slow", "dry_run": False}

    human = kici_admin(url, "runs", "start", "deploy", "--source", "local", "--input", "count=1")
    assert human.returncode == 0, human.stderr
    assert human.stdout.startswith("Started run ") and "inputs count=1, dry_run=False, mode=fast" in human.stdout

    invalid = kici_admin(url, "runs", "start", "deploy", "--source", "local", "--input", "mode=medium",
                         "--input", "count=1")
    assert invalid.returncode == 1 and invalid.stdout == ""
    assert "input 'mode' must be one of fast, slow; got 'medium'" in invalid.stderr and "HTTP 422" in invalid.stderr
    missing = kici_admin(url, "runs", "start", "deploy", "--source", "local")
    assert missing.returncode == 1 and "input 'count' is required" in missing.stderr
    malformed = kici_admin(url, "runs", "start", "deploy", "--source", "local", "--input", "count")
    assert malformed.returncode == 2 and "'count' must look like KEY=VALUE" in malformed.stderr
    both = kici_admin(url, "runs", "start", "deploy", "--source", "local", "--ref", "main", "--sha", head)
    assert both.returncode == 2 and "--ref or --sha, not both" in both.stderr
    assert len(runs_of(database_url, "deploy")) == 2

    listed = kici_admin(url, "schedules", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [schedule] = json.loads(listed.stdout)
    assert (schedule["workflow"], schedule["cron"], schedule["timezone"], schedule["source"]) == (
        "nightly", "* * * * *", "UTC", "local")
    table = kici_admin(url, "schedules", "list")
    assert table.returncode == 0 and "nightly" in table.stdout and "* * * * *" in table.stdout


def _slot_fired(orch: OrchestratorProcess) -> dict[str, Any] | None:
    fires = _fires(orch)
    return fires[0] if fires else None


@pytest.mark.slow
def test_every_minute_fires_once_across_a_restart(
    start_orchestrator: StartOrchestrator, database_url: str, tmp_path: Path
) -> None:
    """One orchestrator fires a slot and is restarted at once: the restarted one does not fire that slot
    again, and fires the next one once. A missed slot (the database says it is long overdue, as after a
    downtime) fires once, not once per missed minute."""
    repo, _ = schedule_repo(tmp_path / "repo")
    settings = orchestrator_settings(tmp_path, database_url, "data")
    first = start_orchestrator(settings)
    url = ready(first)
    assert kici_admin(url, "source", "add", "git", "local", "--url", str(repo.path), "--json").returncode == 0
    # down for ten minutes, as far as the schedule knows: one late fire, no burst
    overdue = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10, seconds=30)
    set_next_fire(database_url, overdue)
    wait_until(lambda: any(dt.datetime.fromisoformat(e["slot"]) == overdue for e in _fires(first)), within=15,
               what="the overdue slot to fire")
    assert first.stop() == 0
    slots = [e["slot"] for e in _fires(first)]
    assert len(slots) == len(set(slots)) and len(runs_of(database_url, "nightly")) == len(slots)

    # the fire moved the schedule to its next minute boundary
    boundary = next_fire(database_url)
    assert boundary is not None and boundary.second == 0 and boundary > overdue
    second = start_orchestrator(settings)
    url = ready(second)
    # the next slot fires once, in the restarted process (brought forward: no wait for a minute boundary)
    soon = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)).replace(microsecond=0)
    set_next_fire(database_url, soon)
    nxt = second.wait_for_event("schedule.fired", timeout=20)
    assert nxt["slot"] not in slots and dt.datetime.fromisoformat(nxt["slot"]) == soon
    ticks = metric(url, "kici_scheduler_ticks_total")
    wait_until(lambda: metric(url, "kici_scheduler_ticks_total") >= ticks + 2, within=15, what="two more ticks")
    # each slot once; the wait may cross a minute boundary, whose slot then rightly fires too
    later = [e["slot"] for e in _fires(second)]
    assert later[0] == nxt["slot"] and len(later) == len(set(later)), later
    assert all(dt.datetime.fromisoformat(slot).second == 0 and dt.datetime.fromisoformat(slot) > soon
               for slot in later[1:]), later
    assert len(runs_of(database_url, "nightly")) == len(slots) + len(later)
    assert second.stop() == 0


def _fires(orch: OrchestratorProcess) -> list[dict[str, Any]]:
    return [e for e in orch.events() if e.get("event") == "schedule.fired"]


@pytest.mark.slow
def test_two_orchestrators_on_one_postgresql_fire_once(
    start_orchestrator: StartOrchestrator, postgres_session_url: str, tmp_path: Path
) -> None:
    from tests.integration.orchestrator.conftest import reset_postgres_schema

    reset_postgres_schema(postgres_session_url)
    repo, _ = schedule_repo(tmp_path / "repo")
    one = start_orchestrator(orchestrator_settings(tmp_path, postgres_session_url, "one"))
    url_one = ready(one)
    two = start_orchestrator(orchestrator_settings(tmp_path, postgres_session_url, "two"))
    url_two = ready(two)
    assert kici_admin(url_one, "source", "add", "git", "local", "--url", str(repo.path), "--json").returncode == 0

    # the next slot (brought forward: no wait for a minute boundary): exactly one of the two fires it
    wait_until(lambda: next_fire(postgres_session_url) is not None, within=15, what="the schedule registered")
    soon = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)).replace(microsecond=0)
    set_next_fire(postgres_session_url, soon)
    fired = wait_until(lambda: _slot_fired(one) or _slot_fired(two), within=20, what="the next slot to fire")
    slot = fired["slot"]
    assert dt.datetime.fromisoformat(slot) == soon
    # the scheduler is a leader duty (kici.orchestrator.cluster): the leader has ticked twice since, and
    # only one run exists
    ticks = metric(url_one, "kici_scheduler_ticks_total") + metric(url_two, "kici_scheduler_ticks_total")
    wait_until(lambda: metric(url_one, "kici_scheduler_ticks_total") + metric(url_two, "kici_scheduler_ticks_total")
               >= ticks + 2, within=15, what="ticks")
    # each slot fired exactly once (the wait may cross a minute boundary: then the next slot fired too)
    fires = _fires(one) + _fires(two)
    slots = [e["slot"] for e in fires]
    assert slot in slots and len(slots) == len(set(slots)), fires
    assert metric(url_one, "kici_schedules_fired_total") + metric(url_two, "kici_schedules_fired_total") == len(slots)
    assert len(runs_of(postgres_session_url, "nightly")) == len(slots)
    assert one.stop() == 0 and two.stop() == 0
