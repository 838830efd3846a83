"""The agent's mirror cache of remote repositories (`<work dir>/mirrors/`), against a real `git http-backend`
that requires the clone token: a repeated job fetches only the new objects, the job's checkout does not
depend on the mirror afterwards, concurrent jobs of one repository both succeed, a damaged mirror is
recreated (the job still succeeds), the token stays out of argv and every config file, and
`KICI_GIT_MIRRORS=false` turns it off."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kici.agent.git import mirror_path
from tests.conftest import git

from .conftest import AgentFactory, FakeOrchestrator, Message, dispatch, workflow_repo
from .test_clone import CHECK, GitHttpServer, _git_shim

pytestmark = pytest.mark.timeout(180)

TOKEN = "clone-token-abc123xyz"


@pytest.fixture
def git_http(tmp_path: Path) -> Iterator[GitHttpServer]:
    server = GitHttpServer(tmp_path / "served", TOKEN)
    server.thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()


def _serve(tmp_path: Path, repo_path: Path) -> Path:
    served = tmp_path / "served" / "r.git"
    served.parent.mkdir(exist_ok=True)
    git(tmp_path, "clone", "-q", "--bare", str(repo_path), str(served))
    return served


def _commit(repo_path: Path, served: Path, name: str) -> str:
    (repo_path / name).write_text(f"{name}\n")
    git(repo_path, "add", "-A")
    git(repo_path, "commit", "-q", "-m", name)
    git(repo_path, "push", "-q", str(served), "HEAD:refs/heads/main")
    return git(repo_path, "rev-parse", "HEAD").strip()


async def _run(orchestrator: FakeOrchestrator, message: Message) -> Message:
    await orchestrator.send(message)
    final = await orchestrator.wait_terminal(message["job_id"], timeout=90)
    assert final["state"] == "success", (final, orchestrator.log_lines(message["job_id"], -1))
    return final


async def test_a_repeated_job_fetches_only_new_objects_into_the_mirror(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path, git_http: GitHttpServer
) -> None:
    repo = workflow_repo(tmp_path / "repo", CHECK)
    for i in range(20):  # some history, so a full fetch is clearly more than an update
        (repo.path / f"file{i}.txt").write_text(f"{i}\n" * 50)
    git(repo.path, "add", "-A")
    git(repo.path, "commit", "-q", "-m", "files")
    first_sha = git(repo.path, "rev-parse", "HEAD").strip()
    served = _serve(tmp_path, repo.path)
    argv_log = tmp_path / "git-argv.log"
    _git_shim(tmp_path / "shim", argv_log)
    agent = start_agent(orchestrator, PATH=f"{tmp_path / 'shim'}:{os.environ['PATH']}")
    await orchestrator.wait_registered()
    url = f"{git_http.url}/r.git"

    first = dispatch(repo, "w", repo_url=url, token=TOKEN, sha=first_sha)
    final = await _run(orchestrator, first)
    assert final["outputs"] == {"where": {"head": first_sha}}
    # the checkout owns its objects: nothing borrowed from the mirror survives the clone
    assert "fetched" in orchestrator.log_lines(first["job_id"], 0)
    [created] = agent.events("git.mirror")
    assert created["created"] is True and created["objects"] >= 22

    second_sha = _commit(repo.path, served, "later.txt")
    second = dispatch(repo, "w", repo_url=url, token=TOKEN, sha=second_sha)
    final = await _run(orchestrator, second)
    assert final["outputs"] == {"where": {"head": second_sha}}
    updated = agent.events("git.mirror")[1]
    # one commit, one tree, one blob: only what is new crossed the wire
    assert updated["created"] is False and updated["objects"] == 3
    assert "mirror cache: 3 new object(s) fetched" in orchestrator.log_lines(second["job_id"], -1)

    # the same commit again: the mirror is asked, nothing new comes
    again = dispatch(repo, "w", repo_url=url, token=TOKEN, sha=second_sha)
    await _run(orchestrator, again)
    assert agent.events("git.mirror")[2]["objects"] == 0

    # the mirror has the commit, but this job's token may not read the repository: no checkout for it
    denied = dispatch(repo, "w", repo_url=url, token="wrong-token-987654", sha=second_sha)
    await orchestrator.send(denied)
    final = await orchestrator.wait_terminal(denied["job_id"])
    assert final["state"] == "failed" and final["failure_category"] == "clone"
    assert orchestrator.messages("step.status", denied["job_id"]) == []

    mirror = mirror_path(tmp_path / "agent-work" / "mirrors", url)
    assert (mirror / "HEAD").is_file()
    config = (mirror / "config").read_text()
    assert TOKEN not in config and "extraHeader" not in config and "Authorization" not in config
    argv = argv_log.read_text()
    assert TOKEN not in argv and git_http.expected not in argv
    everything = str(orchestrator.job_messages(second["job_id"])) + agent.output
    assert TOKEN not in everything and git_http.expected.split()[1] not in everything


async def test_concurrent_jobs_of_one_repository_share_the_mirror(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path, git_http: GitHttpServer
) -> None:
    repo = workflow_repo(tmp_path / "repo", CHECK)
    _serve(tmp_path, repo.path)
    agent = start_agent(orchestrator, KICI_MAX_CONCURRENCY="3")
    await orchestrator.wait_registered()
    url = f"{git_http.url}/r.git"
    messages = [dispatch(repo, "w", repo_url=url, token=TOKEN) for _ in range(3)]
    finals = await asyncio.gather(*(_run(orchestrator, m) for m in messages))
    assert all(f["outputs"] == {"where": {"head": repo.sha}} for f in finals)
    events = agent.events("git.mirror")
    assert len(events) == 3 and [e["created"] for e in events].count(True) == 1
    assert sorted(e["objects"] for e in events)[:2] == [0, 0]  # the later ones found it all there


@pytest.mark.parametrize("new_commit", [False, True], ids=["same-commit", "new-commit"])
async def test_a_damaged_mirror_is_recreated_and_the_job_still_clones(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path, git_http: GitHttpServer,
    new_commit: bool,
) -> None:
    repo = workflow_repo(tmp_path / "repo", CHECK)
    served = _serve(tmp_path, repo.path)
    agent = start_agent(orchestrator)
    await orchestrator.wait_registered()
    url = f"{git_http.url}/r.git"
    await _run(orchestrator, dispatch(repo, "w", repo_url=url, token=TOKEN))
    mirror = mirror_path(tmp_path / "agent-work" / "mirrors", url)
    # every object's content overwritten: still "there" by name, unreadable
    damaged = [p for p in (mirror / "objects").rglob("*") if p.is_file() and p.parent.name not in ("info",)]
    assert damaged
    for path in damaged:
        path.chmod(0o644)
        path.write_bytes(b"\0garbage" * 8)
    later = _commit(repo.path, served, "later.txt") if new_commit else repo.sha
    message = dispatch(repo, "w", repo_url=url, token=TOKEN, sha=later)
    final = await _run(orchestrator, message)
    assert final["outputs"] == {"where": {"head": later}}
    assert agent.events("git.mirror_recreated")
    assert "the mirror cache of this repository is damaged; recreating it" in orchestrator.log_lines(
        message["job_id"], -1
    )
    assert git(mirror, "cat-file", "-t", later).strip() == "commit"


async def test_mirrors_can_be_turned_off(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path, git_http: GitHttpServer
) -> None:
    repo = workflow_repo(tmp_path / "repo", CHECK)
    _serve(tmp_path, repo.path)
    agent = start_agent(orchestrator, KICI_GIT_MIRRORS="false")
    await orchestrator.wait_registered()
    await _run(orchestrator, dispatch(repo, "w", repo_url=f"{git_http.url}/r.git", token=TOKEN))
    assert not (tmp_path / "agent-work" / "mirrors").exists()
    assert agent.events("git.mirror") == []
