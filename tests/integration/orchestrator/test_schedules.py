"""Schedules on SQLite and PostgreSQL, in process with the scheduler's clock in the test's hands:
registration from the default branch (source add, pushes), firing once per slot, no double fire across
schedulers or restarts, no burst after downtime; and `GET /schedules`."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import subprocess
import zoneinfo
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from kici.orchestrator.container import ingest_for, services_of
from kici.orchestrator.db.database import Database
from kici.orchestrator.providers.git import GitProvider
from kici.orchestrator.scheduling.cron import CronError, check_cron, next_fire
from kici.orchestrator.scheduling.scheduler import Scheduler, SchedulerMetrics
from kici.orchestrator.store.sources import create_source
from tests.integration.orchestrator.schedule_harness import WORKFLOWS, Clock, orchestrator, schedule_repo
from tests.integration.orchestrator.test_providers_git import GitRepo, compile_into
from tests.integration.orchestrator.test_providers_github import INSTALLATION_ID, FakeGitHub

ZERO = "0" * 40


def _metrics() -> SchedulerMetrics:
    return SchedulerMetrics(CollectorRegistry())


def _at(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


async def test_every_minute_fires_once(database: Database, tmp_path: Path) -> None:
    repo, head = schedule_repo(tmp_path / "repo")
    async with orchestrator(database, tmp_path / "data") as orch:
        before = dt.datetime.now(dt.UTC)
        source = await orch.add_git_source(repo)
        [listed] = await orch.schedules()
        assert {k: listed[k] for k in ("source", "repo", "workflow", "cron", "timezone", "branch", "lock_commit")} == {
            "source": "local", "repo": "acme/app", "workflow": "nightly", "cron": "* * * * *", "timezone": "UTC",
            "branch": "main", "lock_commit": head,
        }
        assert listed["last_fired_at"] is None and listed["inputs"] == {"level": "full"}
        slot = _at(listed["next_fire_at"])
        assert before < slot <= before + dt.timedelta(minutes=1) and slot.second == 0 and slot.microsecond == 0

        clock = Clock(slot - dt.timedelta(seconds=1))
        scheduler = orch.scheduler
        scheduler.clock = clock
        assert await scheduler.tick() == []  # not yet

        clock.now = slot + dt.timedelta(milliseconds=300)
        [run_id] = await scheduler.tick()
        assert await scheduler.tick() == []  # the same slot never fires twice
        [run] = await orch.runs("nightly")
        assert run.id == run_id and run.sha == head and run.ref == "refs/heads/main" and run.repo == "acme/app"
        assert run.source_id == source["id"] and run.delivery_id is None
        assert run.event["type"] == "schedule" and run.event["name"] == "* * * * *"
        assert run.event["inputs"] == {"level": "full"} and run.event["branch"] == "main"
        assert run.event["payload"]["scheduled_at"] == slot.isoformat()
        [listed] = await orch.schedules()
        assert _at(listed["last_fired_at"]) == slot and listed["last_run_id"] == run_id
        assert _at(listed["next_fire_at"]) == slot + dt.timedelta(minutes=1)

        # a restarted orchestrator (a fresh scheduler on the same database) does not fire the slot again
        restarted = Scheduler(scheduler.state, ingest_for(orch.app), clock=clock, metrics=_metrics())
        assert await restarted.tick() == []

        # one run per minute: the next slot fires once, a little late is fine
        clock.now = slot + dt.timedelta(minutes=1, seconds=2)
        assert len(await restarted.tick()) == 1
        assert await scheduler.tick() == [] and await restarted.tick() == []
        assert len(await orch.runs("nightly")) == 2


async def test_missed_slots_fire_once_after_downtime(database: Database, tmp_path: Path) -> None:
    repo, _ = schedule_repo(tmp_path / "repo")
    async with orchestrator(database, tmp_path / "data") as orch:
        await orch.add_git_source(repo)
        [listed] = await orch.schedules()
        slot = _at(listed["next_fire_at"])
        # down for ten minutes: ten slots were missed; one run, then the next slot after now
        clock = Clock(slot + dt.timedelta(minutes=10, seconds=20))
        orch.scheduler.clock = clock
        assert len(await orch.scheduler.tick()) == 1
        assert await orch.scheduler.tick() == []
        [listed] = await orch.schedules()
        assert _at(listed["last_fired_at"]) == slot
        assert _at(listed["next_fire_at"]) == slot + dt.timedelta(minutes=11)
        assert len(await orch.runs("nightly")) == 1


async def test_concurrent_schedulers_fire_exactly_once(database: Database, tmp_path: Path) -> None:
    """Several schedulers, each with its own connection pool (as separate orchestrators have), race for
    the same due slots: each slot yields exactly one run."""
    repo, _ = schedule_repo(tmp_path / "repo")
    async with orchestrator(database, tmp_path / "data") as orch:
        await orch.add_git_source(repo)
        [listed] = await orch.schedules()
        slot = _at(listed["next_fire_at"])
        others = [Database.connect(database.url) for _ in range(3)]
        try:
            schedulers = [orch.scheduler] + [
                Scheduler(dataclasses.replace(orch.scheduler.state, database=db), ingest_for(orch.app),
                          metrics=_metrics())
                for db in others
            ]
            for minute in range(3):
                clock = Clock(slot + dt.timedelta(minutes=minute, seconds=1))
                for scheduler in schedulers:
                    scheduler.clock = clock
                results = await asyncio.gather(*(s.tick() for s in schedulers))
                assert sum(len(r) for r in results) == 1, results
        finally:
            for db in others:
                await db.close()
        assert len(await orch.runs("nightly")) == 3


async def test_registrations_follow_the_default_branch(database: Database, tmp_path: Path) -> None:
    repo, first = schedule_repo(tmp_path / "repo")
    async with orchestrator(database, tmp_path / "data") as orch:
        await orch.add_git_source(repo)
        [original] = await orch.schedules()

        # a push to another branch changes nothing
        repo.git("checkout", "-q", "-b", "feature")
        repo.compile(WORKFLOWS.replace('"* * * * *"', '"0 3 * * *", timezone="Europe/Berlin"'))
        feature = repo.commit("feature cron")
        assert (await orch.notify("local", "refs/heads/feature", ZERO, feature)).status_code == 202
        repo.git("checkout", "-q", "main")
        assert await orch.schedules() == [original]

        # a push to the default branch that keeps the trigger keeps its fire times
        repo.write("src/a.py", "a = 1\n")
        second = repo.commit("code")
        assert (await orch.notify("local", "refs/heads/main", first, second)).status_code == 202
        [kept] = await orch.schedules()
        assert kept["next_fire_at"] == original["next_fire_at"] and kept["lock_commit"] == second

        # a changed cron is re-registered with its own next slot (time zone aware)
        repo.compile(WORKFLOWS.replace('"* * * * *"', '"0 3 * * *", timezone="Europe/Berlin"'))
        third = repo.commit("nightly at 03:00 Berlin")
        assert (await orch.notify("local", "refs/heads/main", second, third)).status_code == 202
        [changed] = await orch.schedules()
        assert (changed["cron"], changed["timezone"]) == ("0 3 * * *", "Europe/Berlin")
        next_at = _at(changed["next_fire_at"]).astimezone(dt.UTC)
        berlin = next_at.astimezone(zoneinfo.ZoneInfo("Europe/Berlin"))
        assert (berlin.hour, berlin.minute) == (3, 0)

        # a lock file without the schedule removes it
        repo.compile(WORKFLOWS.replace('on=[schedule("* * * * *", inputs={"level": "full"})]', 'on=[]'))
        fourth = repo.commit("no more nightly")
        assert (await orch.notify("local", "refs/heads/main", third, fourth)).status_code == 202
        assert await orch.schedules() == []


async def test_workflow_gone_at_the_head_does_not_fire(database: Database, tmp_path: Path) -> None:
    """The default branch moved on without a notification: the lock file at the head rules."""
    repo, _ = schedule_repo(tmp_path / "repo")
    async with orchestrator(database, tmp_path / "data") as orch:
        await orch.add_git_source(repo)
        [listed] = await orch.schedules()
        repo.compile(WORKFLOWS.replace('on=[schedule("* * * * *", inputs={"level": "full"})]', 'on=[]'))
        repo.commit("no more nightly (no hook installed)")
        orch.scheduler.clock = Clock(_at(listed["next_fire_at"]) + dt.timedelta(seconds=1))
        assert await orch.scheduler.tick() == []
        assert await orch.schedules() == [] and await orch.runs("nightly") == []


async def test_schedules_listing_by_source(database: Database, tmp_path: Path) -> None:
    repo, _ = schedule_repo(tmp_path / "repo")
    async with orchestrator(database, tmp_path / "data") as orch:
        await orch.add_git_source(repo)
        assert len((await orch.admin("GET", "/schedules", params={"source": "local"})).json()) == 1
        missing = await orch.admin("GET", "/schedules", params={"source": "nope"})
        assert missing.status_code == 404 and missing.json() == {"error": "no source 'nope'"}
        # deleting the source removes its schedules
        assert (await orch.admin("DELETE", "/sources/local")).status_code == 200
        assert await orch.schedules() == []


async def test_github_source_registers_and_fires_through_the_api(database: Database, tmp_path: Path) -> None:
    fake = FakeGitHub()
    try:
        lock = compile_into(tmp_path / "work", WORKFLOWS)
        sha = "e" * 40
        fake.files[("acme/app", sha)] = lock
        fake.refs[("acme/app", "release")] = sha
        fake.repositories["acme/app"] = {"default_branch": "release"}
        fake.installations["acme/app"] = INSTALLATION_ID
        fake.installation_repos[INSTALLATION_ID] = ["acme/app"]
        async with orchestrator(database, tmp_path / "data") as orch:
            created = await orch.admin("POST", "/sources", json={
                "kind": "github", "name": "gh",
                "config": {"app_id": fake.app_id, "api_url": fake.url, "installation_id": INSTALLATION_ID},
                "secrets": {"private_key": fake.private_key_pem, "webhook_secret": "w"},
            })
            assert created.status_code == 201, created.text
            [listed] = await orch.schedules()
            assert (listed["source"], listed["repo"], listed["branch"], listed["lock_commit"]) == (
                "gh", "acme/app", "release", sha)
            orch.scheduler.clock = Clock(_at(listed["next_fire_at"]) + dt.timedelta(seconds=1))
            [run_id] = await orch.scheduler.tick()
            [run] = await orch.runs("nightly")
            assert run.id == run_id and run.sha == sha and run.ref == "refs/heads/release"
    finally:
        fake.close()


async def test_default_branch_of_git_repositories(tmp_path: Path) -> None:
    """A git source without `default_branch`: a bare (or remote) repository's HEAD; a working repository's
    `main`/`master` whatever is checked out."""
    work = GitRepo(tmp_path / "work", branch="trunk")
    work.write("a", "a\n")
    work.commit()
    work.git("checkout", "-q", "-b", "feature")
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work.path), str(bare)], check=True, capture_output=True)
    subprocess.run(["git", "-C", str(bare), "symbolic-ref", "HEAD", "refs/heads/trunk"], check=True)
    mirrors = tmp_path / "mirrors"
    assert await GitProvider("s", str(bare), mirror_root=mirrors).head_branch() == "trunk"
    assert await GitProvider("s", f"file://{bare}", mirror_root=mirrors, force_mirror=True).head_branch() == "trunk"
    assert await GitProvider("s", str(work.path), mirror_root=mirrors).head_branch() == "feature"
    work.git("branch", "main", "trunk")
    assert await GitProvider("s", str(work.path), mirror_root=mirrors).head_branch() == "main"


async def test_many_schedules_due_together_fire_in_one_tick(database: Database, tmp_path: Path) -> None:
    many = "from kici import job, schedule, step, workflow\n" + "".join(
        f'w{i} = workflow("w{i}", on=[schedule("0 3 * * *")], jobs=[job("j", steps=[step("s", "echo")])])\n'
        for i in range(20)
    )
    repo, head = schedule_repo(tmp_path / "repo", many)
    async with orchestrator(database, tmp_path / "data") as orch:
        await orch.add_git_source(repo)
        listed = await orch.schedules()
        assert len(listed) == 20 and len({s["next_fire_at"] for s in listed}) == 1
        orch.scheduler.clock = Clock(_at(listed[0]["next_fire_at"]) + dt.timedelta(seconds=1))
        assert len(await orch.scheduler.tick()) == 20
        runs = await orch.runs()
        assert sorted(r.workflow for r in runs) == sorted(f"w{i}" for i in range(20))
        assert {r.sha for r in runs} == {head}


async def test_first_poll_registers_schedules(database: Database, tmp_path: Path) -> None:
    """A polled git source created behind the API's back (no refresh at `source add`): its first poll, which
    reports no pushes, reads the default branch's schedules."""
    repo, head = schedule_repo(tmp_path / "repo")
    async with orchestrator(database, tmp_path / "data") as orch:
        async with database.transaction() as conn:
            source = await create_source(conn, key=None, name="polled", kind="git",
                                         config={"url": str(repo.path), "repo": "acme/app", "poll_seconds": 60})
        assert await orch.schedules() == []
        assert await services_of(orch.app).poller.poll(source.id) == []  # the baseline: no pushes reported
        [listed] = await orch.schedules()
        assert (listed["source"], listed["workflow"], listed["lock_commit"]) == ("polled", "nightly", head)


def test_cron_slots_follow_the_time_zone() -> None:
    utc = dt.UTC

    def at(*args: int) -> dt.datetime:
        return dt.datetime(*args, tzinfo=utc)

    assert next_fire("* * * * *", "UTC", at(2026, 12, 4, 21, 30, 0)) == at(2026, 12, 4, 21, 31)
    assert next_fire("@daily", "UTC", at(2026, 12, 4, 21, 30)) == at(2026, 12, 5)
    # 09:00 on weekdays in New York, from a Friday evening: Monday 14:00 UTC (EST)
    assert next_fire("0 9 * * 1-5", "America/New_York", at(2026, 12, 4, 21, 0)) == at(2026, 12, 7, 14)
    # spring forward in Berlin: 02:30 does not exist on 29 March; it fires at 03:00 local (01:00 UTC)
    assert next_fire("30 2 * * *", "Europe/Berlin", at(2026, 3, 28, 23, 0)) == at(2026, 3, 29, 1, 0)
    # fall back: 02:30 happens twice on 25 October; it fires once (summer time), then the next day
    first = next_fire("30 2 * * *", "Europe/Berlin", at(2026, 10, 25, 0, 0))
    assert first == at(2026, 10, 25, 0, 30)
    assert next_fire("30 2 * * *", "Europe/Berlin", first) == at(2026, 10, 26, 1, 30)
    for cron, timezone, problem in (("61 * * * *", "UTC", "is not valid"), ("* * *", "UTC", "5 fields"),
                                    ("* * * * *", "Mars/Olympus", "unknown time zone")):
        with pytest.raises(CronError, match=problem):
            check_cron(cron, timezone)
