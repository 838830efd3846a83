"""The job runner end to end: real `python -m kici.runner` children driven through `RunnerProcess`."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kici import __version__
from kici.engine.content_hash import workflow_content_hash
from kici.engine.events import Event
from kici.engine.runner_protocol import (
    SETUP_STEP_INDEX,
    JobResult,
    JobSpec,
    JobStarted,
    LogLine,
    LogLines,
    RunnerMessage,
    StepStatus,
    log_lines,
    parse_runner_message,
)
from kici.runner import proctree, wire
from kici.runner.client import ALLOWED_ENV, RunnerProcess, runner_env, safe_base_env
from kici.runner.job_runner import retry_policy
from kici.sdk.definitions import Retry

pytestmark = pytest.mark.timeout(60)

WF_FILE = ".kici/workflows/wf.py"
HEADER = "from kici import workflow, job, step, rule, skip, Retry, StepFailure\n"


# --------------------------------------------------------------------------------------------- harness


@dataclass
class Run:
    messages: list[RunnerMessage] = field(default_factory=list)
    returncode: int | None = None

    @property
    def result(self) -> JobResult:
        results = [m for m in self.messages if isinstance(m, JobResult)]
        assert len(results) == 1, self.messages
        assert self.messages[-1] is results[0], "JobResult must be the last message"
        return results[0]

    @property
    def started(self) -> JobStarted | None:
        return next((m for m in self.messages if isinstance(m, JobStarted)), None)

    def statuses(self, index: int | None = None) -> list[StepStatus]:
        return [m for m in self.messages if isinstance(m, StepStatus) and (index is None or m.step_index == index)]

    def final(self, index: int) -> StepStatus:
        terminal = [s for s in self.statuses(index) if s.state != "running"]
        assert len(terminal) == 1, self.statuses(index)
        return terminal[0]

    def states(self) -> list[str]:
        """Terminal state of each step, in step order."""
        started = self.started
        assert started is not None
        return [self.final(i).state for i in range(len(started.steps))]

    def logs(self, index: int | None = None, stream: str | None = None) -> list[str]:
        return [
            line
            for m in self.messages
            if isinstance(m, LogLine | LogLines)
            and (index is None or m.step_index == index)
            and (stream is None or m.stream == stream)
            for line in log_lines(m)
        ]

    def log_text(self) -> str:
        return "\n".join(self.logs())


def write_workflow(workspace: Path, body: str) -> Path:
    path = workspace / WF_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + textwrap.dedent(body), encoding="utf-8")
    return path


def make_spec(workspace: Path, *, job: str = "j", **overrides: Any) -> JobSpec:
    values: dict[str, Any] = {
        "workspace": str(workspace),
        "workflow_file": WF_FILE,
        "export": "#ci",
        "workflow": "ci",
        "job": job,
        "display_name": job,
        "event": Event(type="push", branch="main", target_branch="main"),
        "env": safe_base_env(),
    }
    values.update(overrides)
    return JobSpec(**values)


OnMessage = Callable[[RunnerMessage, RunnerProcess], Awaitable[None]]


async def run_job(spec: JobSpec, on_message: OnMessage | None = None, timeout: float = 40.0) -> Run:
    run = Run()
    proc = await RunnerProcess.start(spec)
    try:
        async with asyncio.timeout(timeout):
            async for message in proc.messages():
                run.messages.append(message)
                if on_message is not None:
                    await on_message(message, proc)
            run.returncode = await proc.wait()
    finally:
        if proc.returncode is None:
            await proc.kill(grace=0.5)
    return run


def marker_pids(marker: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains `marker`."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if marker.encode() in cmdline and proctree.alive(int(name)):
            found.append(int(name))
    return found


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


@pytest.fixture
def marker() -> Iterator[str]:
    """A unique string to put in the argv of processes a test starts; they are all killed afterwards."""
    value = f"kici-test-{uuid.uuid4().hex[:10]}"
    yield value
    for pid in marker_pids(value):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    return workspace


# --------------------------------------------------------------------------------------------- basics


async def test_success_with_outputs_sync_and_async_steps(ws: Path) -> None:
    write_workflow(
        ws,
        """
        import asyncio

        @step
        def build(ctx):
            r = ctx.sh("echo built-$((20 + 22)); echo to-stderr >&2")
            ctx.log.warn("a warning")
            return {"version": r.stdout.strip(), "attempt": ctx.attempt, "job": ctx.job, "step": ctx.step}

        @step("async-one")
        async def async_one(ctx):
            await asyncio.sleep(0.01)
            r = await ctx.sh_async("echo from-async")
            results = await asyncio.gather(ctx.sh_async("echo a"), ctx.sh_async("echo b"))
            return {"out": r.stdout.strip(), "both": [x.stdout.strip() for x in results]}

        ci = workflow("ci", jobs=[job("j", steps=[build, async_one, "echo shell-step", lambda ctx: None])])
        """,
    )
    run = await run_job(make_spec(ws))
    assert run.returncode == 0
    assert run.started is not None and run.started.steps == ["build", "async-one", "step-1", "step-2"]
    assert run.states() == ["success"] * 4
    assert [s.state for s in run.statuses(0)] == ["running", "success"]
    assert run.final(0).outputs == {"version": "built-42", "attempt": 1, "job": "j", "step": "build"}
    assert run.final(1).outputs == {"out": "from-async", "both": ["a", "b"]}
    result = run.result
    assert result.status == "success" and result.error is None
    assert result.outputs == {"build": run.final(0).outputs, "async-one": run.final(1).outputs}
    assert "built-42" in run.logs(0, "stdout")
    assert "to-stderr" in run.logs(0, "stderr")
    assert "[warn] a warning" in run.logs(0, "system")
    assert "shell-step" in run.logs(2, "stdout")


async def test_sh_failure_fails_the_step_and_skips_the_rest(ws: Path) -> None:
    write_workflow(
        ws,
        """
        def ok(ctx):
            ctx.sh("true")

        def bad(ctx):
            ctx.sh("echo before; exit 3")
            ctx.sh("echo never-runs")

        def later(ctx):
            ctx.sh("echo later")

        ci = workflow("ci", jobs=[job("j", steps=[step("ok", ok), step("bad", bad), step("later", later)])])
        """,
    )
    run = await run_job(make_spec(ws))
    assert run.states() == ["success", "failed", "skipped"]
    assert "exit code 3" in (run.final(1).error or "")
    assert "never-runs" not in run.log_text() and "later" not in run.logs(2)
    assert run.statuses(2) == [run.final(2)]  # never `running`
    assert run.result.status == "failed" and run.result.failure_category == "step"
    assert "bad" in (run.result.error or "")


async def test_python_exception_reports_its_type_and_traceback(ws: Path) -> None:
    write_workflow(
        ws,
        """
        def helper():
            raise ValueError("boom in helper")

        def bad(ctx):
            helper()

        ci = workflow("ci", jobs=[job("j", steps=[step("bad", bad)])])
        """,
    )
    run = await run_job(make_spec(ws))
    assert run.final(0).error == "ValueError: boom in helper"
    log = "\n".join(run.logs(0, "system"))
    assert "in helper" in log and "wf.py" in log and "job_runner" not in log


async def test_continue_on_error_runs_next_steps_but_fails_the_job(ws: Path) -> None:
    write_workflow(
        ws,
        """
        def bad(ctx):
            ctx.sh("exit 1")

        ci = workflow("ci", jobs=[job("j", steps=[
            step("bad", bad, continue_on_error=True),
            step("next", lambda ctx: {"ran": True}),
        ])])
        """,
    )
    run = await run_job(make_spec(ws))
    assert run.states() == ["failed", "success"]
    assert run.final(1).outputs == {"ran": True}
    assert run.result.status == "failed"
    assert "continue_on_error" in (run.result.error or "")


async def test_step_return_value_must_be_a_dict(ws: Path) -> None:
    write_workflow(
        ws,
        """
        ci = workflow("ci", jobs=[job("j", steps=[
            step("num", lambda ctx: 42),
            step("obj", lambda ctx: {"x": object()}),
        ])])
        """,
    )
    run = await run_job(make_spec(ws))
    assert run.final(0).state == "failed"
    assert "a step must return a dict of outputs or None" in (run.final(0).error or "")
    write_workflow(ws, 'ci = workflow("ci", jobs=[job("j", steps=[step("obj", lambda ctx: {"x": object()})])])\n')
    run = await run_job(make_spec(ws))
    assert "not JSON-serialisable" in (run.final(0).error or "")


# --------------------------------------------------------------------------------------------- retry


def test_retry_int_uses_the_default_schedule() -> None:
    policy = retry_policy(3)
    assert policy.max_attempts == 3
    assert [policy.wait_before(n) for n in (2, 3)] == [1.0, 2.0]
    assert retry_policy(10).wait_before(10) == 30.0  # capped at 30 s
    assert retry_policy(None).max_attempts == 1
    assert retry_policy(0).max_attempts == 1
    custom = Retry(4, delay=0.5, backoff="fixed")
    assert retry_policy(custom) is custom



def test_retry_backoff_and_max_delay_shape_the_waits() -> None:
    """`Retry(backoff=, max_delay=)`: the waits the runner sleeps between attempts (`wait_before`)."""
    exponential = Retry(6, delay=0.5, backoff="exponential", max_delay=3)
    assert [exponential.wait_before(n) for n in range(2, 7)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    fixed = Retry(4, delay=2, backoff="fixed", max_delay=30)
    assert [fixed.wait_before(n) for n in range(2, 5)] == [2.0, 2.0, 2.0]
    assert Retry(3, delay=5, backoff="fixed", max_delay=1).wait_before(2) == 1.0

async def test_retry_attempts_and_waits(ws: Path) -> None:
    stamps = ws / "stamps"
    write_workflow(
        ws,
        f"""
        import time

        def flaky(ctx):
            with open({str(stamps)!r}, "a") as f:
                f.write(f"{{ctx.attempt}} {{time.monotonic()}}\\n")
            raise RuntimeError(f"attempt {{ctx.attempt}} failed")

        ci = workflow("ci", jobs=[job("j", steps=[step("flaky", flaky, retry=Retry(3, delay=0.2))])])
        """,
    )
    run = await run_job(make_spec(ws))
    rows = [line.split() for line in stamps.read_text().splitlines()]
    assert [int(r[0]) for r in rows] == [1, 2, 3]
    times = [float(r[1]) for r in rows]
    first, second = times[1] - times[0], times[2] - times[1]
    assert 0.18 <= first < 0.6, first
    assert 0.38 <= second < 0.9, second
    assert [(s.state, s.attempt) for s in run.statuses(0)] == [
        ("running", 1), ("running", 2), ("running", 3), ("failed", 3)
    ]
    assert run.final(0).error == "RuntimeError: attempt 3 failed"
    assert any("retrying in 0.2s" in line for line in run.logs(0))
    assert run.result.status == "failed"


async def test_retry_succeeds_on_a_later_attempt_and_retry_if_false_stops(ws: Path) -> None:
    write_workflow(
        ws,
        """
        def second_time(ctx):
            if ctx.attempt < 2:
                raise RuntimeError("not yet")
            return {"attempt": ctx.attempt}

        def value_error(ctx):
            raise ValueError("permanent")

        ci = workflow("ci", jobs=[job("j", steps=[
            step("eventually", second_time, retry=Retry(3, delay=0.05)),
            step("permanent", value_error,
                 retry=Retry(5, delay=0.05, retry_if=lambda exc: not isinstance(exc, ValueError))),
        ])])
        """,
    )
    run = await run_job(make_spec(ws))
    assert run.final(0).state == "success" and run.final(0).outputs == {"attempt": 2}
    assert [s.attempt for s in run.statuses(1)] == [1, 1]  # one attempt, then the terminal state
    assert run.final(1).state == "failed"
    assert any("retry_if returned False" in line for line in run.logs(1))


# --------------------------------------------------------------------------------------------- timeouts


async def test_default_step_timeout_applies_even_with_a_longer_job_timeout(ws: Path, marker: str) -> None:
    write_workflow(
        ws,
        f"""
        def slow(ctx):
            ctx.sh("exec -a {marker} sleep 30")

        def cleanup(ctx):
            ctx.sh("echo cleanup-ran")

        ci = workflow("ci", jobs=[job("j", timeout=120, cleanup=cleanup, steps=[step("slow", slow), "echo x"])])
        """,
    )
    started = time.monotonic()
    run = await run_job(make_spec(ws, default_step_timeout_ms=600, job_timeout_ms=120_000))
    elapsed = time.monotonic() - started
    assert elapsed < 10, elapsed
    assert run.states() == ["timed_out", "skipped"]
    assert run.final(0).error == "timed out after 600ms"
    assert run.result.status == "failed" and run.result.failure_category == "timeout"
    assert "cleanup-ran" in run.logs(SETUP_STEP_INDEX)
    assert marker_pids(marker) == []


async def test_job_timeout_fails_the_job_and_cleanup_still_runs(ws: Path, marker: str) -> None:
    write_workflow(
        ws,
        f"""
        def slow(ctx):
            ctx.sh("exec -a {marker} sleep 30")

        def cleanup(ctx):
            print("cleanup-ran")

        ci = workflow("ci", jobs=[job("j", cleanup=cleanup, steps=[step("slow", slow), "echo x"])])
        """,
    )
    run = await run_job(make_spec(ws, job_timeout_ms=800))
    assert run.states() == ["timed_out", "skipped"]
    assert run.result.status == "failed" and run.result.failure_category == "timeout"
    assert (run.result.error or "").startswith("job_timeout: job exceeded its timeout of 800ms")
    assert "cleanup-ran" in run.logs(SETUP_STEP_INDEX)
    assert marker_pids(marker) == []


async def test_sh_timeout_raises_command_timed_out(ws: Path, marker: str) -> None:
    write_workflow(
        ws,
        f"""
        from kici import CommandTimedOut

        def s(ctx):
            try:
                ctx.sh("exec -a {marker} sleep 30", timeout=0.3)
            except CommandTimedOut as exc:
                error = str(exc)
            try:  # a command that closed its output is still timed out
                ctx.sh("exec >/dev/null 2>&1; exec -a {marker} sleep 30", timeout=0.3)
            except CommandTimedOut:
                return {{"error": error}}

        ci = workflow("ci", jobs=[job("j", steps=[step("s", s)])])
        """,
    )
    run = await run_job(make_spec(ws))
    assert run.final(0).outputs == {"error": f"command timed out after 0.3s: exec -a {marker} sleep 30"}
    assert marker_pids(marker) == []


async def test_a_step_stuck_in_python_is_abandoned_and_the_runner_exits(ws: Path) -> None:
    write_workflow(
        ws,
        """
        import time

        def stuck(ctx):
            time.sleep(120)

        ci = workflow("ci", jobs=[job("j", steps=[step("stuck", stuck, timeout=0.3), "echo never"])])
        """,
    )
    started = time.monotonic()
    run = await run_job(make_spec(ws))
    assert time.monotonic() - started < 15
    assert run.states() == ["timed_out", "skipped"]
    assert "did not return" in (run.final(0).error or "")
    assert run.result.status == "failed"
    assert run.returncode == 0


# --------------------------------------------------------------------------------------------- environment


async def test_set_env_kici_env_and_kici_path_reach_only_later_steps(ws: Path) -> None:
    write_workflow(
        ws,
        """
        def first(ctx):
            ctx.set_env("FROM_SET_ENV", "one")
            ctx.add_path("/opt/added/bin")
            ctx.sh("echo FROM_FILE=two >> $KICI_ENV")
            ctx.sh("printf 'MULTI<<EOF\\nline 1\\nline 2\\nEOF\\n' >> $KICI_ENV")
            ctx.sh("echo /opt/x/bin >> $KICI_PATH")
            same = ctx.sh("echo ${FROM_SET_ENV:-unset} ${FROM_FILE:-unset}").stdout.split()
            return {"same_step": same, "env_has": "FROM_SET_ENV" in ctx.env}

        def second(ctx):
            out = ctx.sh("echo $FROM_SET_ENV $FROM_FILE").stdout.split()
            multi = ctx.sh("printf '%s' \\"$MULTI\\"").stdout
            return {"later": out, "multi": multi, "path": ctx.sh("echo $PATH").stdout.strip()}

        ci = workflow("ci", jobs=[job("j", steps=[step("first", first), step("second", second)])])
        """,
    )
    run = await run_job(make_spec(ws))
    assert run.final(0).outputs == {"same_step": ["unset", "unset"], "env_has": False}
    outputs = run.final(1).outputs or {}
    assert outputs["later"] == ["one", "two"]
    assert outputs["multi"] == "line 1\nline 2"
    path = outputs["path"].split(":")
    assert set(path[:2]) == {"/opt/x/bin", "/opt/added/bin"} and len(path) > 2


async def test_env_changes_cannot_override_a_secret(ws: Path) -> None:
    write_workflow(
        ws,
        """
        def first(ctx):
            ctx.set_env("API_TOKEN", "overridden")
            ctx.sh("echo API_TOKEN=from-file >> $KICI_ENV")

        def second(ctx):
            before = ctx.sh("echo ${API_TOKEN:-absent}", quiet=True).stdout.strip()
            ctx.secrets.expose("API_TOKEN")
            exposed = ctx.sh("printenv API_TOKEN", quiet=True).stdout.strip()
            ctx.secrets.expose("API_TOKEN", "OTHER_NAME")
            other = ctx.sh("printenv OTHER_NAME", quiet=True).stdout.strip()
            secret = ctx.secrets.get("API_TOKEN")
            return {"before": before, "exposed_ok": exposed == secret, "other_ok": other == secret}

        def third(ctx):
            return {"after": ctx.sh("echo ${API_TOKEN:-absent}", quiet=True).stdout.strip()}

        ci = workflow("ci", jobs=[job("j", steps=[step("first", first), step("second", second),
                                                  step("third", third)])])
        """,
    )
    run = await run_job(make_spec(ws, secrets={"API_TOKEN": "the-real-token-value"}))
    assert run.final(1).outputs == {"before": "absent", "exposed_ok": True, "other_ok": True}
    assert run.final(2).outputs == {"after": "absent"}  # expose lasts for its step only
    warnings = [line for line in run.logs(0, "system") if line.startswith("[warn]")]
    assert len(warnings) == 2 and all("API_TOKEN" in w and "secret" in w for w in warnings)


async def test_job_and_step_env_and_the_parent_environment(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KICI_AGENT_TOKEN", "kat_" + "ab" * 32)
    monkeypatch.setenv("KICI_ORCHESTRATOR_URL", "http://orchestrator.invalid")
    monkeypatch.setenv("SOME_PARENT_VAR", "parent")
    write_workflow(
        ws,
        """
        import os

        def look(ctx):
            env_out = ctx.sh("env", quiet=True).stdout
            return {
                "runner_env_kici": sorted(k for k in os.environ if k.startswith("KICI")),
                "step_env_kici": sorted(l.split("=")[0] for l in env_out.splitlines() if l.startswith("KICI")),
                "parent": "SOME_PARENT_VAR" in env_out or "SOME_PARENT_VAR" in os.environ,
                "job": ctx.sh("echo $JOB_VAR $STEP_VAR", quiet=True).stdout.strip(),
                "workflow": ctx.sh("echo $WF_VAR $OVERRIDDEN", quiet=True).stdout.strip(),
                "cwd": ctx.sh("pwd", quiet=True).stdout.strip(),
            }

        ci = workflow("ci", env={"WF_VAR": "wf", "OVERRIDDEN": "wf-level"},
                      jobs=[job("j", env={"JOB_VAR": "job", "STEP_VAR": "job-level", "OVERRIDDEN": "job"},
                                steps=[step("look", look, env={"STEP_VAR": "step"})])])
        """,
    )
    spec = make_spec(ws)
    assert not any(k.startswith("KICI") for k in spec.env)
    assert set(spec.env) <= set(ALLOWED_ENV)
    assert not any(k.startswith("KICI") for k in runner_env())
    run = await run_job(spec)
    outputs = run.final(0).outputs or {}
    assert outputs["runner_env_kici"] == []
    assert outputs["step_env_kici"] == ["KICI_ENV", "KICI_PATH"]
    assert outputs["parent"] is False
    assert outputs["job"] == "job step"
    assert outputs["workflow"] == "wf job"  # workflow env, overridden by the job's
    assert Path(outputs["cwd"]).resolve() == ws.resolve()


# --------------------------------------------------------------------------------------------- rules


async def test_failing_step_rule_skips_the_step_and_the_job_succeeds(ws: Path) -> None:
    write_workflow(
        ws,
        """
        async def async_true(ctx):
            return True

        def boom(ctx):
            raise RuntimeError("rule exploded")

        ci = workflow("ci", jobs=[job("j", steps=[
            step("a", "echo a"),
            step("b", "echo b-ran", rules=[rule("only on dev", lambda ctx: ctx.event.branch == "dev")]),
            step("c", "echo c-ran", rules=[rule("async ok", async_true)]),
            step("d", "echo d-ran", rules=[rule("raises", boom)]),
            step("e", "echo e-ran", rules=[skip("switched off")]),
        ])])
        """,
    )
    run = await run_job(make_spec(ws))
    assert run.states() == ["success", "skipped", "success", "skipped", "skipped"]
    assert "b-ran" not in run.log_text() and "c-ran" in run.logs(2)
    assert any("only on dev" in line for line in run.logs(1, "system"))
    assert any("raises" in line and "rule exploded" in line for line in run.logs(3, "system"))
    assert any("switched off" in line for line in run.logs(4, "system"))
    assert run.result.status == "success"


async def test_failing_job_rule_skips_the_job(ws: Path) -> None:
    created = ws / "created"
    write_workflow(
        ws,
        f"""
        def make(ctx):
            open({str(created)!r}, "w").close()

        def hook(ctx):
            open({str(created)!r} + "-hook", "w").close()

        ci = workflow("ci", jobs=[job("j", rules=[rule("only main", lambda ctx: ctx.event.branch == "main")],
                                      cleanup=hook, on_success=hook, steps=[make, "echo x"])])
        """,
    )
    run = await run_job(make_spec(ws, event=Event(type="push", branch="dev")))
    assert run.states() == ["skipped", "skipped"]
    assert all(s.state == "skipped" for s in run.statuses())
    assert run.result.status == "skipped"
    assert any("only main" in line for line in run.logs(SETUP_STEP_INDEX, "system"))
    assert not created.exists() and not Path(str(created) + "-hook").exists()
    # and on main it runs
    run = await run_job(make_spec(ws))
    assert run.result.status == "success" and created.exists()



async def test_skip_switches_a_job_and_a_step_off(ws: Path) -> None:
    """`kici.skip()` is a rule that always fails: the job (or step) it is on is skipped."""
    write_workflow(
        ws,
        """
        ci = workflow("ci", jobs=[job("j", rules=[skip("switched off")], steps=["echo never"]),
                                  job("k", steps=[step("off", "echo never", rules=[skip()]), "echo on"])])
        """,
    )
    run = await run_job(make_spec(ws))
    assert run.result.status == "skipped" and run.states() == ["skipped"]
    assert any("switched off" in line for line in run.logs(SETUP_STEP_INDEX, "system"))
    run = await run_job(make_spec(ws, job="k"))
    assert run.result.status == "success" and run.states() == ["skipped", "success"]


async def test_run_shorthand_is_the_job_s_one_step(ws: Path) -> None:
    """`job(name, run=...)`: a shell command or a callable as the job's single step, named after the job."""
    write_workflow(
        ws,
        """
        def build(ctx):
            return {"built": "yes"}

        ci = workflow("ci", jobs=[job("j", run="echo from-run"), job("k", run=build)])
        """,
    )
    run = await run_job(make_spec(ws))
    assert run.result.status == "success" and run.states() == ["success"]
    assert "from-run" in run.logs(0)
    run = await run_job(make_spec(ws, job="k"))
    assert run.result.status == "success" and run.final(0).outputs == {"built": "yes"}

async def test_workflow_rules_apply_to_the_job(ws: Path) -> None:
    write_workflow(
        ws,
        """
        ci = workflow("ci", rules=[rule("never", lambda ctx: False)], jobs=[job("j", steps=["echo x"])])
        """,
    )
    run = await run_job(make_spec(ws))
    assert run.result.status == "skipped"


# --------------------------------------------------------------------------------------------- hooks


HOOKS = """
def record(name):
    def hook(ctx):
        with open({path!r}, "a") as f:
            f.write(name + ("@" + ctx.step if name.endswith("_step") else "") + "\\n")
    return hook

hooks = dict(on_success=record("on_success"), on_failure=record("on_failure"), cleanup=record("cleanup"),
             on_cancel=record("on_cancel"), before_step=record("before_step"), after_step=record("after_step"))
"""


async def test_hook_order_on_success_and_on_failure(ws: Path) -> None:
    order = ws / "order"
    write_workflow(
        ws,
        HOOKS.format(path=str(order))
        + """
ci = workflow("ci", jobs=[
    job("good", steps=["true"], **hooks),
    job("bad", steps=["exit 1", "true"], **hooks),
])
""",
    )
    run = await run_job(make_spec(ws, job="good"))
    assert run.result.status == "success"
    assert order.read_text().split() == ["before_step@step-1", "after_step@step-1", "on_success", "cleanup"]
    order.unlink()
    run = await run_job(make_spec(ws, job="bad"))
    assert run.result.status == "failed"
    assert order.read_text().split() == ["before_step@step-1", "after_step@step-1", "on_failure", "cleanup"]


async def test_a_raising_hook_fails_the_job(ws: Path) -> None:
    write_workflow(
        ws,
        """
        def broken(ctx):
            raise RuntimeError("cleanup broke")

        ci = workflow("ci", jobs=[job("j", cleanup=broken, steps=["true"])])
        """,
    )
    run = await run_job(make_spec(ws))
    assert run.states() == ["success"]
    assert run.result.status == "failed" and run.result.failure_category == "hook"
    assert "cleanup broke" in (run.result.error or "")


async def test_step_hooks_run_around_a_failed_step(ws: Path) -> None:
    order = ws / "order"
    write_workflow(
        ws,
        HOOKS.format(path=str(order))
        + """
ci = workflow("ci", jobs=[job("j", steps=[step("s", "exit 2", cleanup=record("step-cleanup"),
                                                on_cancel=record("step-on_cancel"))])])
""",
    )
    run = await run_job(make_spec(ws))
    assert run.result.status == "failed"
    assert order.read_text().split() == ["step-cleanup"]


async def _cancel_when(
    ws: Path, spec: JobSpec, marker: str, *, count: int, force: bool
) -> Run:
    """Run `spec`; once `count` processes carrying `marker` run, cancel the job."""
    run = Run()
    proc = await RunnerProcess.start(spec)

    async def collect() -> None:
        async for message in proc.messages():
            run.messages.append(message)

    collector = asyncio.create_task(collect())
    try:
        await wait_until(lambda: len(marker_pids(marker)) >= count or collector.done(), timeout=15)
        assert not collector.done(), run.messages
        await proc.cancel(force=force, grace=15, reason="cancelled by test")
        async with asyncio.timeout(20):
            await collector
        run.returncode = await proc.wait()
    finally:
        collector.cancel()
        if proc.returncode is None:
            await proc.kill(grace=0.5)
    return run


DETACHING_STEP = """
def detach(ctx):
    ctx.sh(
        "setsid bash -c 'exec -a {marker}-setsid sleep 300' & "
        "(bash -c 'exec -a {marker}-daemon sleep 300' &) ; "
        "(setsid bash -c 'exec -a {marker}-both sleep 300' &) ; "
        "exec -a {marker}-main sleep 300"
    )
"""


async def test_cancel_kills_the_whole_tree_and_runs_cancel_hooks(ws: Path, marker: str) -> None:
    order = ws / "order"
    write_workflow(
        ws,
        HOOKS.format(path=str(order))
        + DETACHING_STEP.format(marker=marker)
        + """
ci = workflow("ci", jobs=[job("j", steps=[step("detach", detach, on_cancel=record("step-on_cancel"),
                                               cleanup=record("step-cleanup")), "echo never"], **hooks)])
""",
    )
    run = await _cancel_when(ws, make_spec(ws), marker, count=4, force=False)
    assert run.states() == ["cancelled", "skipped"]
    assert run.result.status == "cancelled" and run.result.failure_category == "cancelled"
    assert run.result.error == "cancelled by test"
    assert marker_pids(marker) == []  # nothing of the tree survives, detached or not
    assert order.read_text().split() == [
        "before_step@detach", "step-on_cancel", "step-cleanup", "on_cancel", "cleanup"
    ]
    assert run.returncode == 0


async def test_force_cancel_skips_hooks(ws: Path, marker: str) -> None:
    order = ws / "order"
    write_workflow(
        ws,
        HOOKS.format(path=str(order))
        + DETACHING_STEP.format(marker=marker)
        + """
ci = workflow("ci", jobs=[job("j", steps=[step("detach", detach, cleanup=record("step-cleanup"))], **hooks)])
""",
    )
    run = await _cancel_when(ws, make_spec(ws), marker, count=4, force=True)
    assert run.result.status == "cancelled"
    assert marker_pids(marker) == []
    assert order.read_text().split() == ["before_step@detach"]  # no hook after the cancel


async def test_step_timeout_kills_detached_processes_too(ws: Path, marker: str) -> None:
    write_workflow(
        ws,
        DETACHING_STEP.format(marker=marker)
        + """
ci = workflow("ci", jobs=[job("j", steps=[step("detach", detach, timeout=1.5)])])
""",
    )
    run = await run_job(make_spec(ws))
    assert run.final(0).state == "timed_out"
    assert run.result.failure_category == "timeout"
    assert marker_pids(marker) == []


async def test_background_processes_are_killed_when_the_job_ends(ws: Path, marker: str) -> None:
    write_workflow(
        ws,
        f"""
        import subprocess

        def start_server(ctx):
            ctx.sh("(exec -a {marker}-bg sleep 300) &")
            subprocess.Popen(["bash", "-c", "exec -a {marker}-popen sleep 300"])

        def use_server(ctx):
            out = ctx.sh("pgrep -f {marker} | wc -l", quiet=True).stdout.strip()
            return {{"running": int(out)}}

        ci = workflow("ci", jobs=[job("j", steps=[step("start", start_server), step("use", use_server)])])
        """,
    )
    run = await run_job(make_spec(ws))
    assert run.result.status == "success"
    assert (run.final(1).outputs or {})["running"] >= 2  # still alive in the next step
    assert marker_pids(marker) == []


# --------------------------------------------------------------------------------------------- secrets


async def test_missing_secret_lists_the_available_keys(ws: Path) -> None:
    write_workflow(
        ws,
        """
        def s(ctx):
            assert ctx.secrets.has("ALPHA") and not ctx.secrets.has("NOPE")
            assert ctx.secrets.list() == ["ALPHA", "BETA"]
            ctx.secrets.get("NOPE")

        ci = workflow("ci", jobs=[job("j", steps=[step("s", s)])])
        """,
    )
    run = await run_job(make_spec(ws, secrets={"ALPHA": "aaaa1", "BETA": "bbbb2"}))
    error = run.final(0).error or ""
    assert "MissingSecretError" in error and "'NOPE'" in error and "ALPHA, BETA" in error


async def test_secrets_are_masked_in_logs(ws: Path) -> None:
    token = "tok-" + uuid.uuid4().hex
    key = (
        "-----BEGIN TEST KEY-----\nZmlyc3QtbGluZS1vZi10aGUta2V5\nc2Vjb25kLWxpbmUtb2YtdGhlLWtleQ\n"
        "-----END TEST KEY-----"
    )
    write_workflow(
        ws,
        """
        import base64

        def leak(ctx):
            token = ctx.secrets.get("TOKEN")
            print("token is", token)
            ctx.sh("echo shell says $SECRET_TOKEN", env={"SECRET_TOKEN": token})
            print("standalone", base64.b64encode(token.encode()).decode())
            print("embedded", base64.b64encode(b'{"auth": "' + token.encode() + b'"}').decode())
            print(ctx.secrets.get("KEY"))
            path = ctx.secrets.mount_file("KEY")
            ctx.sh(f"cat {path}")
            ctx.log.info(f"logged {token}")
            raise RuntimeError(f"failing with {token}")

        ci = workflow("ci", jobs=[job("j", steps=[step("leak", leak)])])
        """,
    )
    run = await run_job(make_spec(ws, secrets={"TOKEN": token, "KEY": key}))
    text = run.log_text()
    assert token not in text
    assert base64.b64encode(token.encode()).decode() not in text
    for line in key.splitlines():
        assert line not in text
    assert "token is ***" in run.logs(0, "stdout")
    assert "shell says ***" in run.logs(0, "stdout")
    assert "standalone ***" in run.logs(0, "stdout")
    assert any(line.startswith("embedded ") and "***" in line for line in run.logs(0, "stdout"))
    assert "[info] logged ***" in run.logs(0, "system")
    assert token not in (run.final(0).error or "") and token not in (run.result.error or "")
    assert "failing with ***" in (run.final(0).error or "")


# --------------------------------------------------------------------------------------------- output capture


@pytest.fixture(scope="module")
def c_writer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    build = tmp_path_factory.mktemp("c")
    source = build / "writer.c"
    source.write_text(
        '#include <stdio.h>\n#include <unistd.h>\n'
        'int main(int argc, char **argv) { usleep(100000); printf("c-program says %s\\n", argv[1]);'
        ' fflush(stdout); write(2, "c-stderr\\n", 9); return 0; }\n'
    )
    binary = build / "writer"
    subprocess.run([cc, "-o", str(binary), str(source)], check=True)
    return binary


async def test_print_and_background_c_program_output_land_in_the_step_log(ws: Path, c_writer: Path) -> None:
    write_workflow(
        ws,
        f"""
        import subprocess, sys

        print("printed at import")

        def first(ctx):
            print("first-step print")

        def second(ctx):
            proc = subprocess.Popen([{str(c_writer)!r}, "hello"])  # inherits the runner's fds 1 and 2
            print("python keeps going while the C program runs")
            print("to python stderr", file=sys.stderr)
            proc.wait()

        ci = workflow("ci", jobs=[job("j", steps=[step("first", first), step("second", second)])])
        """,
    )
    run = await run_job(make_spec(ws))
    assert run.result.status == "success"
    assert "printed at import" in run.logs(SETUP_STEP_INDEX, "stdout")
    assert run.logs(0, "stdout") == ["first-step print"]
    assert "c-program says hello" in run.logs(1, "stdout")
    assert "python keeps going while the C program runs" in run.logs(1, "stdout")
    assert "c-stderr" in run.logs(1, "stderr") and "to python stderr" in run.logs(1, "stderr")


# --------------------------------------------------------------------------------------------- drift and import


async def test_drift_gate_fails_before_any_step(ws: Path) -> None:
    created = ws / "created"
    body = f"""
        def make(ctx):
            open({str(created)!r}, "w").close()

        ci = workflow("ci", jobs=[job("j", steps=[make])])
        """
    path = write_workflow(ws, body)

    def read(p: str) -> bytes | None:
        target = ws / p
        return target.read_bytes() if target.is_file() else None

    locked = workflow_content_hash(WF_FILE, read, ".kici")
    run = await run_job(make_spec(ws, expected_content_hash=locked))  # matches: runs
    assert run.result.status == "success" and created.exists()
    created.unlink()

    path.write_text(path.read_text() + "\n# edited without recompiling\n")
    actual = workflow_content_hash(WF_FILE, read, ".kici")
    run = await run_job(make_spec(ws, expected_content_hash=locked))
    assert run.result.status == "failed" and run.result.failure_category == "drift"
    assert run.result.error == (
        f"lock file is out of date: {WF_FILE} has contentHash {actual} but the lock file says {locked} "
        f"(kici {__version__}); run `kici compile` and commit .kici/kici.lock.json"
    )
    assert run.started is None and run.statuses() == []
    assert not created.exists()


async def test_drift_gate_covers_imported_local_modules(ws: Path) -> None:
    helper = ws / ".kici" / "helpers.py"
    helper.parent.mkdir(parents=True)
    helper.write_text("VALUE = 1\n")
    write_workflow(ws, "import helpers\nci = workflow('ci', jobs=[job('j', steps=['true'])])\n")

    def read(p: str) -> bytes | None:
        target = ws / p
        return target.read_bytes() if target.is_file() else None

    locked = workflow_content_hash(WF_FILE, read, ".kici")
    helper.write_text("VALUE = 2\n")
    run = await run_job(make_spec(ws, expected_content_hash=locked))
    assert run.result.failure_category == "drift"


async def test_import_error_reports_the_traceback(ws: Path) -> None:
    write_workflow(
        ws,
        """
        def compute():
            return 1 / 0

        VALUE = compute()
        ci = workflow("ci", jobs=[job("j", steps=["true"])])
        """,
    )
    run = await run_job(make_spec(ws))
    result = run.result
    assert result.status == "failed" and result.failure_category == "import"
    error = result.error or ""
    assert "wf.py" in error and "in compute" in error and "ZeroDivisionError: division by zero" in error
    assert "importlib" not in error and "kici/runner" not in error
    assert run.started is None


async def test_unknown_job_and_export_are_import_failures(ws: Path) -> None:
    write_workflow(ws, "ci = workflow('ci', jobs=[job('j', steps=['true']), job(None, steps=['true'])])\n")
    run = await run_job(make_spec(ws, job="nope"))
    assert run.result.failure_category == "import"
    assert "'nope'" in (run.result.error or "") and "j, job-1" in (run.result.error or "")
    run = await run_job(make_spec(ws, job="job-1"))  # unnamed jobs are found by their compiled name
    assert run.result.status == "success"
    run = await run_job(make_spec(ws, export="#other"))
    assert run.result.failure_category == "import"


# --------------------------------------------------------------------------------------------- context


async def test_matrix_inputs_and_event_reach_the_context(ws: Path) -> None:
    write_workflow(
        ws,
        """
        def s(ctx):
            return {"py": ctx.matrix.py, "os": ctx.matrix["os"], "input": ctx.inputs.level,
                    "branch": ctx.event.branch, "type": ctx.event.type, "workflow": ctx.workflow,
                    "job": ctx.job, "cancelled": ctx.cancelled, "workspace": str(ctx.workspace)}

        ci = workflow("ci", jobs=[job("test", steps=[step("s", s)], matrix={"py": ["3.11", "3.12"]})])
        """,
    )
    spec = make_spec(
        ws, job="test", display_name="test (3.12, linux)", matrix={"py": "3.12", "os": "linux"},
        event=Event(type="dispatch", branch="main", inputs={"level": "high"}),
    )
    run = await run_job(spec)
    assert run.final(0).outputs == {
        "py": "3.12", "os": "linux", "input": "high", "branch": "main", "type": "dispatch",
        "workflow": "ci", "job": "test (3.12, linux)", "cancelled": False, "workspace": str(ws),
    }


async def test_outputs_of_steps_and_upstream_jobs(ws: Path) -> None:
    write_workflow(
        ws,
        """
        build = job("build", steps=["true"])

        @step
        def produce(ctx):
            return {"version": "1.2.3"}

        def consume(ctx):
            try:
                ctx.outputs_of("missing")
            except KeyError as exc:
                missing = str(exc)
            return {
                "by_step": ctx.outputs_of(produce).version,
                "by_name": ctx.outputs_of("produce")["version"],
                "upstream": ctx.outputs_of(build).compile.artifact,
                "upstream_by_name": ctx.outputs_of("build").compile.artifact,
                "missing": missing,
            }

        deploy = job("deploy", needs=[build], steps=[produce, step("consume", consume)])
        ci = workflow("ci", jobs=[build, deploy])
        """,
    )
    spec = make_spec(ws, job="deploy", upstream_outputs={"build": {"compile": {"artifact": "app.tar"}}})
    run = await run_job(spec)
    outputs = run.final(1).outputs or {}
    assert outputs["by_step"] == outputs["by_name"] == "1.2.3"
    assert outputs["upstream"] == outputs["upstream_by_name"] == "app.tar"
    assert "missing" in outputs["missing"] and "produce, consume" in outputs["missing"]
    assert "build" in outputs["missing"]


# --------------------------------------------------------------------------------------------- protocol


def test_wire_spec_mirrors_jobspec() -> None:
    mirror = {f.name: f for f in dataclasses.fields(wire.Spec)}
    assert set(mirror) == set(JobSpec.model_fields)
    for name, info in JobSpec.model_fields.items():
        f = mirror[name]
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        assert has_default == (not info.is_required()), name
        if not info.is_required():
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            assert default == info.get_default(call_default_factory=True), name
    assert wire.SETUP_STEP_INDEX == SETUP_STEP_INDEX
    spec = make_spec(Path("/w"), matrix={"a": 1}, job_timeout_ms=5)
    assert dataclasses.asdict(wire.parse_spec(spec.model_dump_json())) == spec.model_dump(mode="json")
    with pytest.raises(wire.SpecError, match="unknown field"):
        wire.parse_spec('{"bogus": 1}')


async def test_a_runner_that_dies_gets_a_synthetic_result(ws: Path, marker: str) -> None:
    write_workflow(ws, f"ci = workflow('ci', jobs=[job('j', steps=['exec -a {marker} sleep 300'])])\n")
    run = Run()
    proc = await RunnerProcess.start(make_spec(ws))
    scratch = proc.scratch
    assert scratch is not None and os.path.isdir(scratch)
    try:
        async with asyncio.timeout(20):
            async for message in proc.messages():
                run.messages.append(message)
                if any(marker in line for line in log_lines(message)):
                    os.kill(proc.pid, signal.SIGKILL)
    finally:
        await proc.kill(grace=0.5)
    assert run.result.status == "failed" and run.result.failure_category == "internal"
    assert (run.result.error or "").startswith("runner exited with code -9")
    assert not os.path.exists(scratch)  # the runner's private files go even when it was killed


async def test_a_bad_spec_is_an_internal_failure(ws: Path) -> None:
    spec = make_spec(ws).model_copy(update={"workspace": str(ws / "does-not-exist")})
    run = await run_job(spec)
    assert run.result.status == "failed" and run.result.failure_category == "internal"
    assert run.returncode == 1


def test_runner_works_with_stdio_on_a_regular_file(ws: Path, tmp_path: Path) -> None:
    """Started by hand (`python -m kici.runner > file`): fds 1 and 2 are seekable files, not pipes."""
    write_workflow(ws, "ci = workflow('ci', jobs=[job('j', steps=[lambda ctx: print('hello')])])\n")
    read_fd, write_fd = os.pipe()
    with open(tmp_path / "out", "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kici.runner", "--protocol-fd", str(write_fd)],
            stdin=subprocess.PIPE, stdout=out, stderr=out, pass_fds=(write_fd,), env=runner_env(),
            start_new_session=True,
        )
    os.close(write_fd)
    try:
        assert proc.stdin is not None
        proc.stdin.write(make_spec(ws).model_dump_json().encode() + b"\n")
        proc.stdin.flush()
        with os.fdopen(read_fd, "rb") as protocol:
            messages = [parse_runner_message(line) for line in protocol]
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proctree.kill_tree(proc.pid, grace=0.5)
            proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()
    assert isinstance(messages[-1], JobResult) and messages[-1].status == "success"
    assert any("hello" in log_lines(m) and m.step_index == 0 for m in messages if isinstance(m, LogLine | LogLines))


async def test_mount_file_is_private_and_removed_after_the_step(ws: Path) -> None:
    write_workflow(
        ws,
        """
        import os, stat

        def mount(ctx):
            path = ctx.secrets.mount_file("KEY")
            mode = stat.S_IMODE(os.stat(path).st_mode)
            with open(path) as f:
                same = f.read() == ctx.secrets.get("KEY")
            return {"path": str(path), "mode": oct(mode), "same": same}

        def later(ctx):
            return {"exists": os.path.exists(ctx.outputs_of("mount").path)}

        ci = workflow("ci", jobs=[job("j", steps=[step("mount", mount), step("later", later)])])
        """,
    )
    run = await run_job(make_spec(ws, secrets={"KEY": "multi\nline\nkey"}))
    outputs = run.final(0).outputs or {}
    assert outputs["mode"] == "0o600" and outputs["same"] is True
    assert run.final(1).outputs == {"exists": False}


async def test_closing_stdin_cancels_the_job(ws: Path, marker: str) -> None:
    write_workflow(ws, f"ci = workflow('ci', jobs=[job('j', steps=['exec -a {marker} sleep 300'])])\n")
    run = Run()
    proc = await RunnerProcess.start(make_spec(ws))
    try:
        async with asyncio.timeout(20):
            async for message in proc.messages():
                run.messages.append(message)
                if any(marker in line for line in log_lines(message)):
                    await wait_until(lambda: bool(marker_pids(marker)))
                    proc._proc.stdin.close()  # type: ignore[union-attr]  # the parent went away
    finally:
        if proc.returncode is None:
            await proc.kill(grace=0.5)
    assert run.result.status == "cancelled"
    assert marker_pids(marker) == []


def test_runner_start_up_does_not_import_pydantic_or_asyncio() -> None:
    """Both cost more than the rest of start-up; the runner loads them only when a job needs them."""
    code = (
        "import sys, kici.runner.__main__\n"
        "print(','.join(m for m in ('pydantic', 'asyncio', 'click', 'rich') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


async def test_adopted_orphans_are_reaped_between_steps(ws: Path) -> None:
    write_workflow(
        ws,
        """
        import os, time
        from kici.runner import proctree

        def spawn(ctx):
            # double forks: the runner adopts them, then they exit (a command that ends before its subshell
            # does is reaped by that subshell: bash reaps background jobs, hence the sleep)
            ctx.sh("for i in 1 2 3; do (sleep 0.2 &) ; done")
            start = time.monotonic()
            while time.monotonic() - start < 5:
                zombies = [c for c in proctree.children(os.getpid()) if c.state == "Z"]
                if len(zombies) >= 3:
                    return {"zombies_seen": len(zombies)}
                time.sleep(0.02)
            return {"zombies_seen": 0}

        def check(ctx):
            return {"zombies": sum(1 for c in proctree.children(os.getpid()) if c.state == "Z")}

        ci = workflow("ci", jobs=[job("j", steps=[step("spawn", spawn), step("check", check)])])
        """,
    )
    run = await run_job(make_spec(ws))
    assert (run.final(0).outputs or {})["zombies_seen"] >= 3
    assert run.final(1).outputs == {"zombies": 0}
