"""`ctx.cache` in a real runner child: the step's request reaches the parent as a `cache.request`, the
parent's `cache.reply` answers it (its lines in the step's log, an error raised in the step), and a cancel
while the step waits stops it."""

from __future__ import annotations

from pathlib import Path

from kici.engine.runner_protocol import CacheReply, CacheRequest, RunnerMessage
from kici.runner.client import RunnerProcess

from .test_runner import make_spec, run_job, write_workflow

WORKFLOW = """
from kici import hash_files

@step
def take(ctx):
    hit = ctx.cache.restore("deps-" + hash_files("*.txt"), ["./.venv/", "out"], restore_keys=["deps-"])
    print("HIT", hit)
    print("SAVED", ctx.cache.save("deps-2", [".venv"]))

@step
def bad(ctx):
    ctx.cache.restore("k", ["../escape"])

@step
def refused(ctx):
    ctx.cache.restore("k", ["x"])

ci = workflow("ci", jobs=[job("j", steps=[take]), job("b", steps=[bad]), job("r", steps=[refused])])
"""


async def test_requests_reach_the_parent_and_replies_the_step(tmp_path: Path) -> None:
    write_workflow(tmp_path, WORKFLOW)
    seen: list[CacheRequest] = []

    async def answer(message: RunnerMessage, proc: RunnerProcess) -> None:
        if isinstance(message, CacheRequest):
            seen.append(message)
            if message.op == "restore":
                await proc.send_control(CacheReply(id=message.id, matched="deps-old", lines=["[cache] hit deps-old"]))
            else:
                await proc.send_control(CacheReply(id=message.id, saved=True))

    run = await run_job(make_spec(tmp_path), answer)
    assert run.result.status == "success", run.log_text()
    restore, save = seen
    assert restore.op == "restore" and restore.key.startswith("deps-{{hash_files:")  # resolved by the parent
    assert restore.paths == [".venv", "out"] and restore.restore_keys == ["deps-"] and restore.step_index == 0
    assert (save.op, save.key, save.paths) == ("save", "deps-2", [".venv"])
    assert {"[cache] hit deps-old", "HIT deps-old", "SAVED True"} <= set(run.logs(0))

    bad = await run_job(make_spec(tmp_path, job="b"), answer)
    assert bad.result.status == "failed" and "climbs out of the workspace" in (bad.result.error or "")

    async def refuse(message: RunnerMessage, proc: RunnerProcess) -> None:
        if isinstance(message, CacheRequest):
            await proc.send_control(CacheReply(id=message.id, error="hash_files: 'x' matches no file"))

    refused = await run_job(make_spec(tmp_path, job="r"), refuse)
    assert refused.result.status == "failed"
    assert "ctx.cache.restore: hash_files: 'x' matches no file" in (refused.result.error or "")


async def test_a_cancel_stops_a_step_waiting_for_its_cache(tmp_path: Path) -> None:
    write_workflow(tmp_path, WORKFLOW)

    async def never_answer(message: RunnerMessage, proc: RunnerProcess) -> None:
        if isinstance(message, CacheRequest):
            await proc.send_cancel(reason="stop waiting")

    run = await run_job(make_spec(tmp_path), never_answer, timeout=20)
    assert run.result.status == "cancelled" and run.final(0).state == "cancelled"
