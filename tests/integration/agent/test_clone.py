"""Cloning the dispatched commit: exact SHA when the branch moved on, fallbacks for servers that refuse
fetching by SHA, clear failures, and the clone token kept out of argv, `.git/config` and logs (against a
real `git http-backend` behind a small HTTP server that requires the token)."""

from __future__ import annotations

import base64
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest

from kici.agent.git import auth_header, git_env, redact
from tests.conftest import git

from .conftest import AgentFactory, FakeOrchestrator, dispatch, wait_until, workflow_repo

pytestmark = pytest.mark.timeout(120)

CHECK = """
import os, subprocess

def where(ctx):
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    print("HEAD=" + head)
    print("borrowed" if os.path.exists(".git/objects/info/alternates") else "fetched")
    return {"head": head}

w = job("w", steps=[step("where", where)])
ci = workflow("ci", on=[push(branches=["main"])], jobs=[w])
"""


async def test_clones_the_exact_sha_when_the_branch_moved_on(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    repo = workflow_repo(tmp_path / "repo", CHECK)
    (repo.path / "later.txt").write_text("later\n")
    git(repo.path, "add", "-A")
    git(repo.path, "commit", "-q", "-m", "moved on")
    assert git(repo.path, "rev-parse", "HEAD").strip() != repo.sha
    start_agent(orchestrator)
    await orchestrator.wait_registered()
    message = dispatch(repo, "w", repo_url="file://" + str(repo.path))
    await orchestrator.send(message)
    final = await orchestrator.wait_terminal(message["job_id"])
    assert final["state"] == "success", final
    assert final["outputs"] == {"where": {"head": repo.sha}}
    # a repository on this machine lends its objects instead of being fetched
    assert "borrowed" in orchestrator.log_lines(message["job_id"], 0)


async def test_falls_back_to_the_ref_when_the_server_refuses_fetching_by_sha(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    repo = workflow_repo(tmp_path / "repo", CHECK)
    (repo.path / "later.txt").write_text("later\n")
    git(repo.path, "add", "-A")
    git(repo.path, "commit", "-q", "-m", "moved on")
    # protocol v0 without allowReachableSHA1InWant: the server only serves advertised refs
    config = tmp_path / "gitconfig"
    config.write_text("[protocol]\n\tversion = 0\n[uploadpack]\n\tallowReachableSHA1InWant = false\n")
    start_agent(orchestrator, GIT_CONFIG_GLOBAL=str(config), KICI_CLONE_LOCAL_SHARED="false")
    await orchestrator.wait_registered()
    message = dispatch(repo, "w")
    await orchestrator.send(message)
    final = await orchestrator.wait_terminal(message["job_id"])
    assert final["state"] == "success", final
    assert final["outputs"] == {"where": {"head": repo.sha}}
    assert any("fetching the ref instead" in line for line in orchestrator.log_lines(message["job_id"], -1))


async def test_falls_back_to_a_full_fetch_when_the_sha_is_deeper_than_the_ref_fetch(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    repo = workflow_repo(tmp_path / "repo", CHECK)
    for n in range(55):  # the dispatched commit ends up deeper than the --depth=50 ref fetch reaches
        git(repo.path, "commit", "-q", "--allow-empty", "-m", f"later {n}")
    config = tmp_path / "gitconfig"
    config.write_text("[protocol]\n\tversion = 0\n")
    start_agent(orchestrator, GIT_CONFIG_GLOBAL=str(config), KICI_CLONE_LOCAL_SHARED="false")
    await orchestrator.wait_registered()
    message = dispatch(repo, "w")
    await orchestrator.send(message)
    final = await orchestrator.wait_terminal(message["job_id"])
    assert final["state"] == "success", final
    assert final["outputs"] == {"where": {"head": repo.sha}}


async def test_unknown_sha_fails_clearly_before_any_step(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    repo = workflow_repo(tmp_path / "repo", CHECK)
    start_agent(orchestrator)
    await orchestrator.wait_registered()
    missing = "0123456789abcdef0123456789abcdef01234567"
    message = dispatch(repo, "w", sha=missing)
    await orchestrator.send(message)
    final = await orchestrator.wait_terminal(message["job_id"])
    assert final["state"] == "failed" and final["failure_category"] == "clone"
    assert final["error"] == f"SHA mismatch: commit {missing} was not found in {repo.path} (ref main)"
    assert orchestrator.messages("step.status", message["job_id"]) == []
    assert f"[error] {final['error']}" in orchestrator.log_lines(message["job_id"], -1)
    assert not any((tmp_path / "agent-work" / "jobs").iterdir())


async def test_unreachable_repository_fails_the_job(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    repo = workflow_repo(tmp_path / "repo", CHECK)
    start_agent(orchestrator)
    await orchestrator.wait_registered()
    message = dispatch(repo, "w", repo_url=str(tmp_path / "nowhere"))
    await orchestrator.send(message)
    final = await orchestrator.wait_terminal(message["job_id"])
    assert final["state"] == "failed" and final["failure_category"] == "clone"
    assert "git fetch from" in final["error"] and "failed" in final["error"]


# ------------------------------------------------------------------------------------------ token handling


def test_git_env_and_redaction() -> None:
    env = git_env({"PATH": "/bin", "KICI_AGENT_TOKEN": "agent-secret", "GIT_CONFIG_COUNT": "3"}, "tok-123")
    assert "KICI_AGENT_TOKEN" not in env and env["GIT_TERMINAL_PROMPT"] == "0"
    assert env["GIT_CONFIG_COUNT"] == "1" and env["GIT_CONFIG_KEY_0"] == "http.extraHeader"
    assert env["GIT_CONFIG_VALUE_0"] == "Authorization: Basic " + base64.b64encode(b"x-access-token:tok-123").decode()
    assert "tok-123" not in " ".join(f"{k}={v}" for k, v in env.items() if k != "GIT_CONFIG_VALUE_0")
    assert redact(f"> {auth_header('tok-123')}", "tok-123") == "> Authorization: Basic [REDACTED]"
    assert redact("fatal: unable to access 'https://user:pw@host/r.git/'") == (
        "fatal: unable to access 'https://[REDACTED]@host/r.git/'"
    )
    assert redact("token tok-123 here", "tok-123") == "token [REDACTED] here"


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class GitHttpServer:
    """`git http-backend` as CGI behind wsgiref; requires `Authorization: Basic b64(x-access-token:TOKEN)`."""

    def __init__(self, root: Path, token: str) -> None:
        self.root = root
        self.expected = auth_header(token).split(": ", 1)[1]
        self.authorizations: list[str] = []
        self.hold: threading.Event | None = None
        """When set, requests wait for it (a slow server, to cancel a clone in progress)."""
        self.server = make_server("127.0.0.1", 0, self.app, server_class=_ThreadingWSGIServer,
                                  handler_class=_QuietHandler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def app(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        auth = environ.get("HTTP_AUTHORIZATION", "")
        self.authorizations.append(auth)
        if self.hold is not None:
            self.hold.wait(30)
        if auth != self.expected:
            start_response("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="git"')])
            return [b"unauthorized\n"]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        cgi_env = {
            "PATH": os.environ["PATH"], "GIT_PROJECT_ROOT": str(self.root), "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": environ.get("PATH_INFO", ""), "REQUEST_METHOD": environ["REQUEST_METHOD"],
            "QUERY_STRING": environ.get("QUERY_STRING", ""), "CONTENT_TYPE": environ.get("CONTENT_TYPE", ""),
            "CONTENT_LENGTH": str(len(body)), "REMOTE_USER": "x-access-token", "REMOTE_ADDR": "127.0.0.1",
            "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
        }
        if environ.get("HTTP_GIT_PROTOCOL"):
            cgi_env["GIT_PROTOCOL"] = environ["HTTP_GIT_PROTOCOL"]
        out = subprocess.run(["git", "http-backend"], input=body, env=cgi_env, capture_output=True, check=False).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        status = "200 OK"
        headers = []
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = value.strip()
            elif name:
                headers.append((name, value.strip()))
        start_response(status, headers)
        return [payload]


@pytest.fixture
def git_http(tmp_path: Path) -> Iterator[GitHttpServer]:
    server = GitHttpServer(tmp_path / "served", "clone-token-abc123xyz")
    server.thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()


COPY_CONFIG = """
import shutil, subprocess

def inspect(ctx):
    shutil.copy(".git/config", {copy!r})
    remotes = subprocess.run(["git", "remote", "-v"], capture_output=True, text=True).stdout
    with open({copy!r} + ".remotes", "w") as f:
        f.write(remotes)

i = job("i", steps=[step("inspect", inspect)])
ci = workflow("ci", on=[push(branches=["main"])], jobs=[i])
"""


def _git_shim(bin_dir: Path, log: Path) -> None:
    """A `git` first on PATH that records each command line (argv only), then runs the real git."""
    real = subprocess.run(["sh", "-c", "command -v git"], capture_output=True, text=True, check=True).stdout.strip()
    bin_dir.mkdir()
    shim = bin_dir / "git"
    shim.write_text(f'#!/bin/sh\nprintf "%s\\n" "git $*" >> {log}\nexec {real} "$@"\n')
    shim.chmod(0o755)


async def test_token_goes_in_a_header_never_in_argv_config_or_logs(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path, git_http: GitHttpServer
) -> None:
    token = "clone-token-abc123xyz"
    copy = tmp_path / "config-copy"
    repo = workflow_repo(tmp_path / "repo", COPY_CONFIG.format(copy=str(copy)))
    served = tmp_path / "served" / "r.git"
    served.parent.mkdir()
    git(tmp_path, "clone", "-q", "--bare", str(repo.path), str(served))
    argv_log = tmp_path / "git-argv.log"
    _git_shim(tmp_path / "shim", argv_log)
    agent_env_path = f"{tmp_path / 'shim'}:{os.environ['PATH']}"
    # the direct fetch (the mirror cache's own token handling: test_git_mirror.py)
    start_agent(orchestrator, PATH=agent_env_path, KICI_GIT_MIRRORS="false")
    await orchestrator.wait_registered()

    message = dispatch(repo, "i", repo_url=f"{git_http.url}/r.git", token=token)
    await orchestrator.send(message)
    final = await orchestrator.wait_terminal(message["job_id"])
    assert final["state"] == "success", final
    assert git_http.expected in git_http.authorizations  # the header reached the server
    assert token not in argv_log.read_text() and git_http.expected not in argv_log.read_text()
    assert "fetch --depth=1 --no-tags origin " + repo.sha in argv_log.read_text()
    config = copy.read_text()
    assert token not in config and "extraHeader" not in config and "Authorization" not in config
    assert f"{git_http.url}/r.git" in config
    assert token not in Path(str(copy) + ".remotes").read_text()
    everything = str(orchestrator.job_messages(message["job_id"])) + (tmp_path / "agent-0.log").read_text()
    assert token not in everything and git_http.expected.split()[1] not in everything

    # a wrong token: the clone fails, and nothing in the failure shows either token
    bad = dispatch(repo, "i", repo_url=f"{git_http.url}/r.git", token="wrong-token-987654")
    await orchestrator.send(bad)
    final = await orchestrator.wait_terminal(bad["job_id"])
    assert final["state"] == "failed" and final["failure_category"] == "clone"
    everything = str(orchestrator.job_messages(bad["job_id"])) + (tmp_path / "agent-0.log").read_text()
    assert "wrong-token-987654" not in everything
    assert base64.b64encode(b"x-access-token:wrong-token-987654").decode() not in everything


async def test_cancel_while_cloning_aborts_the_clone(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path, git_http: GitHttpServer
) -> None:
    repo = workflow_repo(tmp_path / "repo", CHECK)
    served = tmp_path / "served" / "r.git"
    served.parent.mkdir()
    git(tmp_path, "clone", "-q", "--bare", str(repo.path), str(served))
    git_http.hold = threading.Event()
    start_agent(orchestrator)
    await orchestrator.wait_registered()
    message = dispatch(repo, "w", repo_url=f"{git_http.url}/r.git", token="clone-token-abc123xyz")
    await orchestrator.send(message)
    await wait_until(lambda: git_http.authorizations, 30, "the clone to reach the server")
    started = time.monotonic()
    await orchestrator.send({"type": "job.cancel", "run_id": message["run_id"], "job_id": message["job_id"],
                             "reason": "cancelled while cloning"})
    final = await orchestrator.wait_terminal(message["job_id"], timeout=20)
    git_http.hold.set()
    assert final["state"] == "cancelled" and final["error"] == "cancelled while cloning"
    assert time.monotonic() - started < 10
    assert orchestrator.messages("step.status", message["job_id"]) == []
    await wait_until(lambda: not any((tmp_path / "agent-work" / "jobs").iterdir()), 10, "workspace removal")
