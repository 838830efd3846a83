"""End-to-end harness: the real `kici-orchestrator` and `kici-agent` processes, a real git repository with a
compiled workflow registered as a `git` source with its generated post-commit hook, and `kici-admin`.

A commit in the repository fires the hook, which posts to the orchestrator; the orchestrator dispatches to
the agent, which clones the repository at that commit and runs the steps. Every process started here is
stopped at teardown (SIGKILL after a grace period if need be), and each test has its own data dir, work
dir and database (a fresh SQLite file, or a fresh schema in the session's PostgreSQL database)."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import GIT_ENV, die_with_test_run, git, kici_env, write_files
from tests.integration.orchestrator.conftest import (
    OrchestratorProcess,
    orchestrator_env,
    postgres_admin_url,
    postgres_session_url,
    reset_postgres_schema,
)

__all__ = ["postgres_admin_url", "postgres_session_url"]  # fixtures used through `database_url`

OWNER_TOKEN = "kici_e2e_" + "5" * 48
FAST = {
    "KICI_SWEEP_INTERVAL_MS": "200",
    "KICI_DISPATCH_POLL_MS": "200",
    "KICI_LOG_LEVEL": "info",
    "KICI_LOG_FORMAT": "json",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], Any], *, within: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'kici.db'}"
    url: str = request.getfixturevalue("postgres_session_url")
    reset_postgres_schema(url)
    return url


class AgentProcess:
    def __init__(self, proc: subprocess.Popen[str], log: Path, work_dir: Path) -> None:
        self.proc = proc
        self.log = log
        self.work_dir = work_dir

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


@dataclass
class System:
    tmp: Path
    database_url: str
    port: int
    repo: Path
    orchestrators: list[OrchestratorProcess] = field(default_factory=list)
    agents: list[AgentProcess] = field(default_factory=list)
    source: str = "app"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- processes --------------------------------------------------------------------------------

    def start_orchestrator(self, **extra: str) -> OrchestratorProcess:
        env = orchestrator_env(self.tmp, {
            "KICI_PORT": str(self.port), "KICI_DATA_DIR": str(self.tmp / "data"),
            "KICI_DATABASE_URL": self.database_url, "KICI_BOOTSTRAP_ADMIN_TOKEN": OWNER_TOKEN, **FAST, **extra,
        })
        proc = subprocess.Popen([sys.executable, "-m", "kici.orchestrator"], env=env, cwd=self.tmp,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                preexec_fn=die_with_test_run)
        orchestrator = OrchestratorProcess(proc)
        self.orchestrators.append(orchestrator)
        orchestrator.wait_for_event("orchestrator.ready", timeout=60)
        return orchestrator

    def stop_orchestrator(self, orchestrator: OrchestratorProcess) -> int:
        """SIGTERM and wait; on a timeout the failure shows what the processes logged."""
        try:
            return orchestrator.stop(timeout=20)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the orchestrator did not stop within 20 s\n{self.diagnostics()}") from None

    def start_agent(self, name: str, labels: str = "", **extra: str) -> AgentProcess:
        token = self.agent_token(labels)
        work = self.tmp / f"agent-{name}"
        work.mkdir(parents=True, exist_ok=True)
        log = self.tmp / f"agent-{name}.log"
        env = kici_env({
            "KICI_ORCHESTRATOR_URL": self.url, "KICI_AGENT_TOKEN": token, "KICI_AGENT_ID": name,
            "KICI_LABELS": labels, "KICI_WORK_DIR": str(work), "KICI_MAX_RECONNECT_DELAY_MS": "1000",
            "KICI_JOB_HEARTBEAT_INTERVAL_MS": "1000", "KICI_LOG_LEVEL": "debug",
            # as root: root steps on every machine (the tokens allow them), whoever else could run this Python
            **({"KICI_AGENT_STEP_USER": "root"} if os.geteuid() == 0 else {}), **extra,
        })
        handle = open(log, "w")  # noqa: SIM115 - the child writes to it until it exits
        proc = subprocess.Popen([sys.executable, "-m", "kici.agent"], env=env, cwd=work,
                                stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, preexec_fn=die_with_test_run)
        handle.close()
        agent = AgentProcess(proc, log, work)
        self.agents.append(agent)
        wait_for(lambda: any(a["id"] == name and a["connected"] for a in self.admin("GET", "/agents").json())
                 or proc.poll() is not None, within=30, what=f"agent {name} to register")
        assert proc.poll() is None, agent.output()
        return agent

    # -- API --------------------------------------------------------------------------------------

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(method, f"{self.url}/api/v1/admin{path}", timeout=30,
                             headers={"Authorization": f"Bearer {OWNER_TOKEN}"}, **kwargs)

    _agent_tokens: dict[str, str] = field(default_factory=dict)

    def agent_token(self, labels: str) -> str:
        if labels not in self._agent_tokens:
            # the tests run as root and `nobody` cannot run the test venv's Python: steps run as root
            response = self.admin("POST", "/agent-tokens", json={
                "name": f"e2e-{labels or 'any'}", "labels": [x for x in labels.split(",") if x],
                "allow_root_steps": os.geteuid() == 0})
            assert response.status_code == 201, response.text
            self._agent_tokens[labels] = response.json()["token"]
        return self._agent_tokens[labels]

    def kici_admin(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = kici_env({"KICI_ADMIN_URL": self.url, "KICI_ADMIN_TOKEN": OWNER_TOKEN})
        return subprocess.run([sys.executable, "-m", "kici.admin", *args], env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def register_source(self) -> None:
        added = self.kici_admin("source", "add", "git", self.source, "--url", str(self.repo), "--repo", "acme/app")
        assert added.returncode == 0, added.stderr
        hook = self.kici_admin("source", "hook", self.source, "--url", self.url)
        assert hook.returncode == 0, hook.stderr
        path = self.repo / ".git" / "hooks" / "post-commit"
        path.write_text(hook.stdout)
        path.chmod(stat.S_IRWXU)

    # -- the repository ---------------------------------------------------------------------------

    def commit(self, files: dict[str, str], message: str = "change") -> str:
        """Write files, compile the workflows, commit (the hook notifies the orchestrator); the sha."""
        write_files(self.repo, files)
        compiled = subprocess.run([sys.executable, "-m", "kici", "compile"], cwd=self.repo, capture_output=True,
                                  text=True, env=kici_env())
        assert compiled.returncode == 0, compiled.stdout + compiled.stderr
        git(self.repo, "add", "-A")
        git(self.repo, "commit", "-q", "-m", message)
        return git(self.repo, "rev-parse", "HEAD").strip()

    def runs(self) -> list[dict[str, Any]]:
        return list(self.admin("GET", "/runs").json())

    def wait_run(self, sha: str, *statuses: str, within: float = 60.0, workflow: str | None = None) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            for run in self.runs():
                if run["sha"] == sha and (workflow is None or run["workflow"] == workflow) \
                        and run["status"] in statuses:
                    return run
            return None
        try:
            return wait_for(done, within=within, what=f"a run of {sha[:10]} to be {'/'.join(statuses)}")  # type: ignore[no-any-return]
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nruns: {json.dumps(self.runs(), indent=1)}\n{self.diagnostics()}") from None

    def jobs(self, run_id: str) -> dict[str, dict[str, Any]]:
        return {j["name"]: j for j in self.admin("GET", f"/runs/{run_id}/jobs").json()}

    def log_lines(self, run_id: str, job: str) -> list[str]:
        lines: list[str] = []
        after = 0
        while True:
            page = self.admin("GET", f"/runs/{run_id}/jobs/{job}/logs", params={"after": after, "limit": 5000}).json()
            lines += [x["line"] for x in page["lines"]]
            if not page["lines"]:
                return lines
            after = page["next"]

    def diagnostics(self) -> str:
        parts = [f"--- orchestrator {i} ---\n{o.stderr[-6000:]}" for i, o in enumerate(self.orchestrators)]
        parts += [f"--- agent {a.proc.args} ---\n{a.output()[-6000:]}" for a in self.agents]
        return "\n".join(parts)


WORKFLOW_HEADER = '''\
from kici import Context, job, need, push, step, workflow
'''


@pytest.fixture
def system(tmp_path: Path, database_url: str) -> Iterator[System]:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "README.md").write_text("e2e\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "initial")
    sys_ = System(tmp=tmp_path, database_url=database_url, port=free_port(), repo=repo)
    try:
        yield sys_
    finally:
        for agent in sys_.agents:
            agent.stop(signal.SIGKILL if agent.proc.poll() is None else signal.SIGTERM, timeout=5)
            if agent.proc.poll() is None:
                with_group_kill(agent.proc.pid)
        for orchestrator in sys_.orchestrators:
            orchestrator.kill()
        # anything a step left behind in the agents' process groups
        for agent in sys_.agents:
            with_group_kill(agent.proc.pid)


def with_group_kill(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


__all__ += ["GIT_ENV"]
