"""Job caches end to end with real processes: a real agent restores a job's cache after the checkout and saves
it after the job succeeded, through the orchestrator, into the filesystem blob store or a real S3 server
(SeaweedFS). The second run of the same key hits; `kici-admin cache list|purge` sees and removes it; a
`hash_files` glob matching nothing and a cache path leaving the workspace fail their job clearly; storage
down during a save leaves the job's result alone. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass

import pytest

from tests.s3server import S3Server

from .conftest import System

WORKFLOW = '''\
from kici import Cache, Context, hash_files, job, push, step, workflow


@step
def build(ctx: Context) -> None:
    marker = ctx.workspace / ".cache" / "deps" / "built.txt"
    if marker.exists():
        ctx.log.info("WARM from " + marker.read_text())
    else:
        marker.parent.mkdir(parents=True)
        marker.write_text(ctx.run_id or "?")
        (marker.parent / "blob.bin").write_bytes(bytes(range(256)) * 4000)
        ctx.log.info("COLD")


deps = job("deps", steps=[build],
           cache=Cache(key="deps-{{os}}-{{arch}}-" + hash_files("deps*.txt"), paths=[".cache/deps"],
                       restore_keys=["deps-"]))


@step
def by_hand(ctx: Context) -> None:
    key = "manual-" + hash_files("deps*.txt")
    hit = ctx.cache.restore(key, ["build/out"], restore_keys=["manual-"])
    ctx.log.info(f"RESTORED {hit is not None}")
    if hit is None:
        (ctx.workspace / "build" / "out").mkdir(parents=True)
        (ctx.workspace / "build" / "out" / "x.txt").write_text("made by " + (ctx.run_id or "?"))
        ctx.log.info(f"SAVED {ctx.cache.save(key, ['build/out'])} AGAIN {ctx.cache.save(key, ['build/out'])}")
    else:
        ctx.log.info("CONTENT " + (ctx.workspace / "build" / "out" / "x.txt").read_text())


manual = job("manual", steps=[by_hand])

ci = workflow("ci", on=[push(branches=["main"])], jobs=[deps, manual])
'''

BROKEN = '''\
from kici import Cache, hash_files, job, push, step, workflow

nothing = job("nothing", steps=[step("s", "true")],
              cache=Cache(key="k-" + hash_files("requirements*.txt"), paths=["out"]))
escape = job("escape", steps=[step("s", "true")], cache=Cache(key="esc", paths=["outside/x"]))
in_step = job("in_step", steps=[step("s", lambda ctx: ctx.cache.restore("k-" + hash_files("none*.lock"), ["x"]))])

broken = workflow("broken", on=[push(branches=["main"])], jobs=[nothing, escape, in_step])
'''


@dataclass
class Storage:
    env: dict[str, str]
    s3: S3Server | None = None
    prefix: str = ""


@pytest.fixture(params=["fs", "s3"])
def storage(request: pytest.FixtureRequest) -> Storage:
    if request.param == "fs":
        return Storage({})
    server: S3Server = request.getfixturevalue("s3_server")
    prefix = f"e2e-{uuid.uuid4().hex[:10]}"
    return Storage(server.orchestrator_env(prefix=prefix), server, prefix)


def _has(lines: list[str], text: str) -> bool:
    return any(text in line for line in lines)


def test_second_run_hits_the_cache(system: System, storage: Storage) -> None:
    system.start_orchestrator(**storage.env)
    system.register_source()
    system.start_agent("a1", KICI_MAX_CONCURRENCY="2")
    first_sha = system.commit({".kici/workflows/ci.py": WORKFLOW, "deps.txt": "click==8.1\n"}, "cached job")
    first = system.wait_run(first_sha, "success", "failed")
    log = system.log_lines(first["id"], "deps")
    assert first["status"] == "success", log
    assert _has(log, "[cache] cache miss deps-") and _has(log, "COLD"), log
    assert _has(log, "[cache] saved deps-"), log
    manual = system.log_lines(first["id"], "manual")
    assert _has(manual, "RESTORED False") and _has(manual, "SAVED True AGAIN False"), manual
    assert _has(manual, "[cache] cache miss manual-") and _has(manual, "was saved by another job first"), manual

    second_sha = system.commit({"README.md": "changed, deps are not\n"}, "unrelated change")
    second = system.wait_run(second_sha, "success", "failed")
    log = system.log_lines(second["id"], "deps")
    assert second["status"] == "success", log
    assert _has(log, "[cache] cache hit deps-") and _has(log, f"WARM from {first['id']}"), log
    assert not _has(log, "[cache] saved"), log  # the exact key hit: nothing to save
    manual = system.log_lines(second["id"], "manual")
    assert _has(manual, "RESTORED True") and _has(manual, f"CONTENT made by {first['id']}"), manual

    listed = system.kici_admin("cache", "list", "--repo", "acme/app", "--key", "deps-", "--json")
    assert listed.returncode == 0, listed.stderr
    [entry] = json.loads(listed.stdout)
    assert entry["namespace"] == "trusted" and entry["key"].startswith("deps-") and entry["run_id"] == first["id"]
    table = system.kici_admin("cache", "list")
    assert "deps-" in table.stdout and "2 cache(s)" in table.stdout, table.stdout
    if storage.s3 is not None:
        client = storage.s3.client()
        listing = client.list_objects_v2(Bucket=storage.s3.bucket, Prefix=f"{storage.prefix}/caches/")
        assert len(listing.get("Contents", [])) == 2
        client.close()

    purged = system.kici_admin("cache", "purge", "--repo", "acme/app", "--key", "deps-")
    assert purged.returncode == 0 and "Purged 1 cache(s) of acme/app" in purged.stdout, purged.stderr
    assert [c["key"][:7] for c in json.loads(system.kici_admin("cache", "list", "--json").stdout)] == ["manual-"]
    assert system.kici_admin("cache", "purge").returncode == 2  # --repo is required


def test_bad_caches_fail_their_job_clearly(system: System) -> None:
    system.start_orchestrator()
    system.register_source()
    system.start_agent("a1", KICI_MAX_CONCURRENCY="3")
    os.symlink("/tmp", system.repo / "outside")
    sha = system.commit({".kici/workflows/broken.py": BROKEN}, "broken caches")
    run = system.wait_run(sha, "failed", "success")
    jobs = system.jobs(run["id"])
    assert {n: (j["status"], j["failure_category"]) for n, j in jobs.items()} == {
        "nothing": ("failed", "cache"), "escape": ("failed", "cache"), "in_step": ("failed", "step")}
    assert "hash_files: 'requirements*.txt' matches no file in the checkout" in jobs["nothing"]["error"]
    assert "cache path 'outside/x' leaves the workspace" in jobs["escape"]["error"]
    assert "ctx.cache.restore: hash_files: 'none*.lock' matches no file in the checkout" in jobs["in_step"]["error"]


def test_storage_down_during_save_leaves_the_job_alone(system: System) -> None:
    system.start_orchestrator()
    system.register_source()
    system.start_agent("a1", KICI_MAX_CONCURRENCY="2")
    blobs = system.tmp / "data" / "blobs"
    (blobs / "tmp").rmdir()
    (blobs / "tmp").write_text("not a directory: every put fails")
    sha = system.commit({".kici/workflows/ci.py": WORKFLOW, "deps.txt": "x\n"}, "cached job")
    run = system.wait_run(sha, "success", "failed")
    log = system.log_lines(run["id"], "deps")
    assert run["status"] == "success", log
    assert _has(log, "not saved (the job's result is unaffected): HTTP 503: cache storage unavailable"), log
    assert json.loads(system.kici_admin("cache", "list", "--json").stdout) == []

    (blobs / "tmp").unlink()  # storage back: the next run misses and saves, the one after hits
    again = system.wait_run(system.commit({"README.md": "again\n"}), "success", "failed")
    assert _has(system.log_lines(again["id"], "deps"), "[cache] saved deps-")
    third = system.wait_run(system.commit({"README.md": "third\n"}), "success", "failed")
    assert _has(system.log_lines(third["id"], "deps"), "[cache] cache hit deps-")
