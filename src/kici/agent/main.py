"""`kici-agent`: connect to the orchestrator, take jobs, run them, until stopped.

Exit codes: 0 after a drain (SIGUSR1) or a graceful stop (SIGTERM/SIGINT); 1 when the orchestrator
rejects the agent's token or registration (not retried: a new token is needed); 2 for bad settings, an
unusable step user or an unavailable sandbox.

Start-up protects the agent token from job steps (`kici.agent.secrecy`): the process marks itself
non-dumpable, and a token given in `KICI_AGENT_TOKEN` makes it re-execute itself once without the
variable (`--token-fd N`, internal: the token arrives over that pipe).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from kici.agent import log, workspace
from kici.agent.build_info import kici_build_hash
from kici.agent.config import AgentSettings, SettingsError, agent_labels, load_settings, resolve_agent_id
from kici.agent.connection import AuthRejected, Connection
from kici.agent.health import HealthServer, prometheus_text, uptime_since
from kici.agent.jobs import JobManager, kici_version
from kici.agent.log import log_event
from kici.agent.sandbox import ProcessSandbox, SandboxBackend, SandboxUnavailable, get_backend
from kici.agent.sandbox.limits import Limiter, LimitsUnavailable, get_limiter
from kici.agent.secrecy import (
    TOKEN_FD_FLAG,
    SecrecyError,
    is_dumpable,
    make_non_dumpable,
    read_token_fd,
    reexec_without_token,
)
from kici.agent.step_user import StepUser, StepUserError
from kici.agent.step_user import resolve as resolve_step_user
from kici.runner import toolchains
from kici.runner.forkclient import ForkServer, ForkServerUnavailable
from kici.runner.toolchains import Interpreter


class Agent:
    def __init__(
        self, settings: AgentSettings, agent_id: str, backend: SandboxBackend, step_user: StepUser | None = None,
        interpreters: Sequence[Interpreter] = (),
    ) -> None:
        self.settings = settings
        self.agent_id = agent_id
        self.labels = agent_labels(settings, toolchains.labels(interpreters))
        self.step_user = step_user
        self.jobs = JobManager(settings, agent_id, self.labels, backend, step_user, interpreters)
        self.connection = Connection(
            settings.websocket_urls,
            settings.agent_token.get_secret_value(),
            self.jobs,
            heartbeat_interval_s=settings.heartbeat_interval_ms / 1000,
            job_heartbeat_interval_s=settings.job_heartbeat_interval_ms / 1000,
            max_reconnect_delay_ms=settings.max_reconnect_delay_ms,
        )
        self.jobs.connection = self.connection
        self.backend = backend
        self.started = time.monotonic()
        self._exit: asyncio.Future[int] | None = None
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- signals ------------------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _exit_with(self, code: int) -> None:
        if self._exit is not None and not self._exit.done():
            self._exit.set_result(code)

    def on_drain(self) -> None:
        if self.jobs.draining:
            return
        log_event("agent.drain_requested", signal="SIGUSR1")
        self.jobs.start_draining()
        self._spawn(self._drain())

    async def _drain(self) -> None:
        await self.jobs.wait_idle()
        await self.connection.wait_flushed(self.settings.shutdown_timeout_ms / 1000)
        log_event("agent.drained")
        self._exit_with(0)

    def on_stop(self, signame: str) -> None:
        if self._stopping:  # a second signal: no more grace
            log_event("agent.stop_forced", signal=signame, level="warning")
            self._spawn(self.jobs.stop_all(0))
            self._exit_with(0)
            return
        self._stopping = True
        log_event("agent.stopping", signal=signame, active_jobs=len(self.jobs.active))
        self._spawn(self._stop())

    async def _stop(self) -> None:
        budget = self.settings.shutdown_timeout_ms / 1000
        deadline = time.monotonic() + budget
        self.jobs.start_draining()
        # most of the budget for the jobs' cancel hooks, the rest to get their status out
        await self.jobs.stop_all(budget * 0.7)
        if self.connection.registered:
            await self.connection.wait_flushed(max(0.1, deadline - time.monotonic()))
        self._exit_with(0)

    # -- HTTP endpoints -----------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "agent_id": self.agent_id,
            "version": kici_version(),
            "kici_hash": kici_build_hash(),
            "connected": self.connection.registered,
            "active_jobs": len(self.jobs.active),
            "draining": self.jobs.draining,
            "sandbox": self.backend.name,
            "uptime_s": uptime_since(self.started),
        }

    def metrics(self) -> str:
        counters = self.jobs.counters
        return prometheus_text([
            ("kici_agent_jobs_total", "counter", "Jobs finished, by final state.",
             [({"state": k}, float(v)) for k, v in sorted(counters.jobs_total.items())]),
            ("kici_agent_steps_total", "counter", "Steps finished, by final state.",
             [({"state": k}, float(v)) for k, v in sorted(counters.steps_total.items())]),
            ("kici_agent_jobs_active", "gauge", "Jobs running now.", [({}, float(len(self.jobs.active)))]),
            ("kici_agent_connection_status", "gauge", "1 while registered with the orchestrator.",
             [({}, 1.0 if self.connection.registered else 0.0)]),
            ("kici_agent_reconnects_total", "counter", "Reconnect attempts.",
             [({}, float(self.connection.reconnects))]),
            ("kici_agent_log_bytes_total", "counter", "Log bytes streamed (after the per-step cap).",
             [({}, float(counters.log_bytes))]),
            ("kici_agent_log_lines_dropped_total", "counter",
             "Log lines dropped by the per-step cap or by the offline buffer.",
             [({}, float(counters.log_lines_truncated + self.connection.lines_dropped))]),
            ("kici_agent_events_dropped_total", "counter",
             "Status events dropped from the offline buffer (beyond 5000 while disconnected).",
             [({}, float(self.connection.events_dropped))]),
            ("kici_agent_draining", "gauge", "1 while draining.", [({}, 1.0 if self.jobs.draining else 0.0)]),
        ])

    # -- main loop ----------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._exit = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, self.on_stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self.on_stop, "SIGINT")
        loop.add_signal_handler(signal.SIGUSR1, self.on_drain)
        await asyncio.to_thread(workspace.sweep, self.settings.jobs_dir)
        forkserver = self.backend.forkserver if isinstance(self.backend, ProcessSandbox) else None
        if forkserver is not None:  # ready before the first job comes (a failure is logged; jobs then spawn)
            self._spawn(_prestart(forkserver))
        server: HealthServer | None = None
        if self.settings.port:
            server = HealthServer(self.settings.health_host, self.settings.port, health=self.health,
                                  ready=lambda: self.connection.registered, metrics=self.metrics)
            try:
                await server.start()
            except OSError as exc:
                print(f"kici-agent: KICI_PORT={self.settings.port}: cannot listen on "
                      f"{self.settings.health_host}: {exc.strerror or exc}", file=sys.stderr)
                return 2
        log_event("agent.started", agent_id=self.agent_id, labels=self.labels, urls=self.settings.websocket_urls,
                  max_concurrency=self.settings.max_concurrency, sandbox=self.backend.name,
                  sandbox_network=self.backend.network,
                  resource_limits=self.backend.limiter.name if self.backend.limiter else None, version=kici_version(),
                  kici_hash=kici_build_hash(), uid=os.getuid(),
                  step_user=self.step_user.name if self.step_user else None, non_dumpable=is_dumpable() is False,
                  runner_prestart=forkserver is not None)
        connection = asyncio.create_task(self.connection.run())
        code = 0
        try:
            waiting: set[asyncio.Future[Any]] = {connection, self._exit}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if connection in done:
                failure = connection.exception()
                if isinstance(failure, AuthRejected):
                    print(f"kici-agent: the orchestrator rejected this agent: {failure.reason}", file=sys.stderr)
                    log_event("agent.rejected", level="error", reason=failure.reason)
                    await self.jobs.stop_all(min(5.0, self.settings.shutdown_timeout_ms / 1000))
                    code = 1
                elif failure is not None:
                    raise failure
            else:
                code = self._exit.result()
        finally:
            await self.connection.close()
            connection.cancel()
            with contextlib.suppress(asyncio.CancelledError, AuthRejected):
                await connection
            if self.jobs.active:  # a forced stop: nothing may outlive the agent
                await self.jobs.stop_all(0)
            for task in list(self._tasks):
                task.cancel()
            if forkserver is not None:
                await forkserver.close()
            if server is not None:
                await server.stop()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                loop.remove_signal_handler(sig)
        log_event("agent.stopped", exit_code=code)
        return code


def main(argv: list[str] | None = None) -> None:
    # first of all: nothing of this process (its memory will hold the token) is readable by its own user
    try:
        make_non_dumpable()
    except SecrecyError as exc:
        print(f"kici-agent: {exc}", file=sys.stderr)
        sys.exit(2)
    args = sys.argv[1:] if argv is None else argv
    handed_token: str | None = None
    if len(args) >= 2 and args[0] == TOKEN_FD_FLAG:
        try:
            handed_token = read_token_fd(args[1])
        except SecrecyError as exc:
            print(f"kici-agent: {exc}", file=sys.stderr)
            sys.exit(2)
        args = args[2:]
    if args and args[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nSettings come from KICI_* environment variables; see "
              "docs/operator/agent/configuration.md.")
        sys.exit(0)
    if args and args[0] == "--version":
        print(f"kici-agent {kici_version()}")
        sys.exit(0)
    if args:
        print(f"kici-agent: unexpected argument {args[0]!r} (settings come from KICI_* variables)", file=sys.stderr)
        sys.exit(2)
    if handed_token is None:
        try:  # the token must not stay in this process's initial environment (/proc/<pid>/environ)
            reexec_without_token(os.environ, args)
        except (SecrecyError, OSError) as exc:
            print(f"kici-agent: cannot re-execute without KICI_AGENT_TOKEN: {exc}", file=sys.stderr)
            sys.exit(2)
    try:
        settings, warnings = load_settings(token=handed_token)
    except SettingsError as exc:
        for line in exc.lines:
            print(f"kici-agent: {line}", file=sys.stderr)
        sys.exit(2)
    log.configure(settings.log_level)
    for warning in warnings:
        log_event("config.warning", level="warning", message=warning)
    if shutil.which("git") is None:
        print("kici-agent: git was not found on PATH; the agent needs it to clone repositories", file=sys.stderr)
        sys.exit(2)
    try:
        step_user, user_warnings = resolve_step_user(settings.agent_step_user)
    except StepUserError as exc:
        print(f"kici-agent: {exc}", file=sys.stderr)
        sys.exit(2)
    for warning in user_warnings:
        log_event("config.warning", level="warning", message=warning)
    try:
        limiter = choose_limiter(settings)
        backend = get_backend(settings.sandbox, network=settings.sandbox_network, limiter=limiter,
                              run_as=step_user.run_as if step_user is not None else None)
        if settings.runner_prestart and isinstance(backend, ProcessSandbox):
            backend.forkserver = ForkServer(log=log_event)
        workspace.prepare_work_dir(settings.work_dir, step_user=step_user is not None)
        agent_id = resolve_agent_id(settings)
    except (SandboxUnavailable, LimitsUnavailable) as exc:
        print(f"kici-agent: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        print(f"kici-agent: KICI_WORK_DIR ({settings.work_dir}): {exc.strerror or exc}", file=sys.stderr)
        sys.exit(2)
    try:
        interpreters = asyncio.run(find_interpreters(settings))
    except ValueError as exc:
        print(f"kici-agent: KICI_PYTHONS: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(asyncio.run(Agent(settings, agent_id, backend, step_user, interpreters).run()))


def choose_limiter(settings: AgentSettings) -> Limiter | None:
    """The resource limit mechanism (`KICI_RESOURCE_LIMITS`). `LimitsUnavailable` (start-up fails) when one
    named explicitly, or any while `KICI_JOB_*` defaults are set, cannot work; with `auto` and no defaults
    the agent starts without one and fails only jobs that declare `resources=`."""
    try:
        limiter, skipped = get_limiter(settings.resource_limits)
    except LimitsUnavailable as exc:
        if settings.resource_limits != "auto" or not settings.job_default_limits.is_empty():
            raise LimitsUnavailable(f"KICI_RESOURCE_LIMITS={settings.resource_limits}: {exc}") from None
        log_event("limits.unavailable", level="warning", reason=str(exc),
                  effect="jobs declaring resources= fail on this agent")
        return None
    log_event("limits.mechanism", mechanism=limiter.name, skipped=skipped or None)
    return limiter


async def _prestart(forkserver: ForkServer) -> None:
    with contextlib.suppress(ForkServerUnavailable):  # logged by the server; jobs are spawned meanwhile
        await forkserver.start()


async def find_interpreters(settings: AgentSettings) -> list[Interpreter]:
    """`KICI_PYTHONS` when set (ValueError for an unusable one), else detection unless turned off."""
    if settings.pythons:
        found = await toolchains.explicit(settings.pythons, log=log_event)
        source = "KICI_PYTHONS"
    elif settings.python_detect:
        found = await toolchains.detect(log=log_event)
        source = "detected"
    else:
        return []
    log_event("toolchains.found", source=source,
              interpreters=[{"path": i.path, "version": i.full} for i in found])
    return found


if __name__ == "__main__":
    main()
