"""Python toolchains on a real agent: detection (PATH, /usr/bin, a pyenv root with a working and a broken
interpreter), `kici:python:*` labels in the registration, `KICI_PYTHONS` and `KICI_PYTHON_DETECT`, and a
job's `python=` / `python_venv=` seen by its steps: the chosen interpreter first on PATH, a fresh venv, and
none of the agent's own interpreter or virtualenv directories."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from kici.runner import toolchains
from kici.runner.spawn import kici_bin_dirs
from kici.runner.toolchains import Interpreter

from .conftest import AgentFactory, FakeOrchestrator, dispatch, wait_until, workflow_repo
from .test_token_secrecy import NOBODY, SYSTEM_PYTHON, _system_python_env, needs_system_python

pytestmark = pytest.mark.timeout(180)


def _quiet(*args: object, **kwargs: object) -> None:
    pass


async def _other_interpreter() -> Interpreter:
    """A real interpreter of this machine that is not the agent's own (the test's venv runs the agent)."""
    found = await toolchains.detect(log=_quiet)
    others = [i for i in found if i.version[:2] != sys.version_info[:2]] or found
    if not others:
        pytest.skip("no Python interpreter besides the agent's own on this machine")
    return max(others, key=lambda i: i.version)


PROBE = (
    'command -v python; command -v python3; '
    "python -c 'import sys; print(\"PY=%d.%d.%d\" % sys.version_info[:3]); print(\"PREFIX=\" + sys.prefix)'; "
    'echo "PATH=$PATH"; echo "VENV=${VIRTUAL_ENV:-none}"'
)


def _body(version: str, venv: bool) -> str:
    return (
        f"t = job('t', steps=[step('probe', {PROBE!r})], python={version!r}, python_venv={venv!r})\n"
        "ci = workflow('ci', on=[push(branches=['main'])], jobs=[t])\n"
    )


def _value(lines: list[str], key: str) -> str:
    found = [line.split("=", 1)[1] for line in lines if line.startswith(key + "=")]
    assert found, f"{key}= not in {lines}"
    return found[-1]


def _assert_no_agent_dirs(path: str) -> None:
    hidden = kici_bin_dirs()  # the test's venv is the agent's
    leaked = [e for e in path.split(os.pathsep) if os.path.normpath(e) in hidden or os.path.realpath(e) in hidden]
    assert leaked == [], f"the agent's interpreter/venv directories reached the step: {leaked}"


async def test_detection_finds_interpreters_skips_broken_ones_and_registers_labels(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    other = await _other_interpreter()
    pyenv = tmp_path / "pyenv"
    good = pyenv / "versions" / other.full / "bin"
    good.mkdir(parents=True)
    (good / "python").symlink_to(other.real_path)
    broken = pyenv / "versions" / "9.9.9" / "bin" / "python"
    broken.parent.mkdir(parents=True)
    broken.write_text("#!/bin/sh\necho 'this interpreter is broken' >&2\nexit 3\n")
    broken.chmod(0o755)
    # uv: its data dir under the agent's HOME, and `uv python list` (a stand-in printing its JSON)
    all_found = await toolchains.detect(log=_quiet)
    uv_dir_python = tmp_path / "home" / ".local" / "share" / "uv" / "python" / "cpython-x" / "bin" / "python3"
    uv_list_python = tmp_path / "uv-managed" / "bin" / "python3"
    # interpreters the agent finds nowhere else (not on PATH, not in /usr): only through uv
    on_path = {os.path.realpath(os.path.join(d, n)) for d in os.environ["PATH"].split(os.pathsep)
               if os.path.isdir(d) for n in os.listdir(d) if n.startswith("python3")}
    extra = [i for i in all_found if i.real_path != other.real_path and i.real_path not in on_path
             and not i.real_path.startswith(("/usr/", "/bin/"))]
    if len(extra) >= 2:
        for link, target in ((uv_dir_python, extra[0]), (uv_list_python, extra[1])):
            link.parent.mkdir(parents=True)
            link.symlink_to(target.real_path)
    bin_dir = tmp_path / "uv-bin"
    bin_dir.mkdir()
    (bin_dir / "uv").write_text(f"#!/bin/sh\necho '[{{\"path\": \"{uv_list_python}\"}}]'\n")
    (bin_dir / "uv").chmod(0o755)
    agent = start_agent(orchestrator, PYENV_ROOT=str(pyenv), PATH=f"{bin_dir}:{os.environ['PATH']}")
    conn = await orchestrator.wait_registered()
    assert conn.register is not None
    labels = conn.register["labels"]
    assert f"kici:python:{other.minor}" in labels and f"kici:python:{other.full}" in labels
    [found] = agent.events("toolchains.found")
    paths = [entry["path"] for entry in found["interpreters"]]
    assert str(good / "python") in paths
    if len(extra) >= 2:
        assert f"kici:python:{extra[0].full}" in labels and f"kici:python:{extra[1].full}" in labels
        assert str(uv_dir_python) in paths and str(uv_list_python) in paths
    assert not any(p.startswith(sys.prefix + os.sep) for p in paths), "the agent's own venv was advertised"
    skipped = {event["path"]: event["reason"] for event in agent.events("toolchains.skipped")}
    assert skipped[str(broken)] == "this interpreter is broken"
    assert "kici:python:9.9" not in labels


async def test_detection_off_and_an_explicit_list(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    other = await _other_interpreter()
    start_agent(orchestrator, KICI_PYTHON_DETECT="false")
    conn = await orchestrator.wait_registered()
    assert conn.register is not None
    assert not [label for label in conn.register["labels"] if label.startswith("kici:python:")]

    bad = start_agent(orchestrator, KICI_PYTHONS=f"{other.path},{tmp_path / 'missing' / 'python3'}")
    assert await bad.wait_exit() == 2
    assert f"KICI_PYTHONS: unusable interpreter(s) {tmp_path / 'missing' / 'python3'}: each must be" in bad.output
    venv = start_agent(orchestrator, KICI_PYTHONS=sys.executable)  # the agent's own venv: refused too
    assert await venv.wait_exit() == 2
    assert f"KICI_PYTHONS: unusable interpreter(s) {sys.executable}" in venv.output
    assert "a virtualenv, not a base interpreter" in venv.output
    relative = start_agent(orchestrator, KICI_PYTHONS="python3")
    assert await relative.wait_exit() == 2
    assert "KICI_PYTHONS: 'python3' is not an absolute path" in relative.output

    start_agent(orchestrator, KICI_PYTHONS=other.path, KICI_AGENT_ID="explicit")
    await orchestrator.wait_registered(count=2)
    reg = orchestrator.connections[-1].register
    assert reg is not None and reg["agent_id"] == "explicit"
    assert sorted(label for label in reg["labels"] if label.startswith("kici:python:")) == sorted(
        [f"kici:python:{other.minor}", f"kici:python:{other.full}"]
    )


async def test_step_runs_the_chosen_python_first_on_path(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    other = await _other_interpreter()
    repo = workflow_repo(tmp_path / "repo", _body(other.minor, False))
    assert repo.workflow()["jobs"][0]["python"] == other.minor
    start_agent(orchestrator, KICI_PYTHONS=other.path)
    await orchestrator.wait_registered()
    message = dispatch(repo, "t", python=other.minor)
    await orchestrator.send(message)
    final = await orchestrator.wait_terminal(message["job_id"])
    assert final["state"] == "success", final
    lines = orchestrator.log_lines(message["job_id"], 0)
    assert _value(lines, "PY") == other.full
    assert _value(lines, "VENV") == "none"
    path = _value(lines, "PATH")
    _assert_no_agent_dirs(path)
    first = path.split(os.pathsep)[0]
    assert os.path.realpath(os.path.join(first, "python")) == other.real_path
    assert any(f"python {other.full}: {other.path}" in line for line in orchestrator.log_lines(message["job_id"], -1))


async def test_an_interpreter_without_a_python_name_gets_a_job_bin_dir(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    # a directory holding only `python3.X` for this version: `python`/`python3` must still run it
    other = await _other_interpreter()
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / f"python{other.minor}").symlink_to(other.real_path)
    repo = workflow_repo(tmp_path / "repo", _body(other.full, False))
    start_agent(orchestrator, KICI_PYTHONS=str(lonely / f"python{other.minor}"))
    await orchestrator.wait_registered()
    message = dispatch(repo, "t", python=other.full)
    await orchestrator.send(message)
    final = await orchestrator.wait_terminal(message["job_id"])
    assert final["state"] == "success", final
    lines = orchestrator.log_lines(message["job_id"], 0)
    assert _value(lines, "PY") == other.full
    path = _value(lines, "PATH").split(os.pathsep)
    assert path[0].endswith(".tools/python-bin") and path[1] == str(lonely)
    assert lines[1] == os.path.join(path[0], "python") and lines[2] == os.path.join(path[0], "python3")
    _assert_no_agent_dirs(os.pathsep.join(path))


async def test_python_venv_gives_each_job_a_fresh_virtualenv(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    other = await _other_interpreter()
    repo = workflow_repo(tmp_path / "repo", _body(other.minor, True))
    start_agent(orchestrator, KICI_PYTHONS=other.path)
    await orchestrator.wait_registered()
    prefixes = []
    for _ in range(2):
        message = dispatch(repo, "t", python=other.minor, python_venv=True)
        await orchestrator.send(message)
        final = await orchestrator.wait_terminal(message["job_id"], timeout=120)
        assert final["state"] == "success", final
        lines = orchestrator.log_lines(message["job_id"], 0)
        venv = _value(lines, "VENV")
        assert _value(lines, "PREFIX") == venv and _value(lines, "PY") == other.full
        assert Path(venv).name == "venv" and Path(venv).parent.name == message["job_id"] + ".tools"
        path = _value(lines, "PATH")
        assert path.split(os.pathsep)[0] == os.path.join(venv, "bin")
        _assert_no_agent_dirs(path)
        prefixes.append(venv)
        # the job's scratch space goes with it
        gone = Path(venv)
        await wait_until(lambda: not gone.exists(), 10, "the job's venv to be removed")  # noqa: B023
    assert prefixes[0] != prefixes[1]


async def test_a_version_this_agent_lacks_fails_the_job_clearly(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    other = await _other_interpreter()
    repo = workflow_repo(tmp_path / "repo", _body("3.99", False))
    start_agent(orchestrator, KICI_PYTHONS=other.path)
    await orchestrator.wait_registered()
    message = dispatch(repo, "t", python="3.99")
    await orchestrator.send(message)
    final = await orchestrator.wait_terminal(message["job_id"])
    assert final["state"] == "failed" and final["failure_category"] == "toolchain"
    assert final["error"] == f"python='3.99': no matching interpreter here (found: {other.full})"


@needs_system_python
async def test_the_step_user_owns_the_job_venv(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, agent_env: Any
) -> None:
    """A root agent with steps as `nobody`: the job's venv is the step user's, so `pip install` into it works."""
    assert NOBODY is not None
    shared = Path(tempfile.mkdtemp(prefix="kici-toolchains-"))
    try:
        os.chmod(shared, 0o755)
        system = (await toolchains.explicit([SYSTEM_PYTHON]))[0]
        write = (
            "python -c 'import os, sys, pathlib; pathlib.Path(sys.prefix, \"written\").write_text(\"x\"); "
            "print(\"UID=%d\" % os.getuid()); print(\"PREFIX=\" + sys.prefix)'"
        )
        body = (f"t = job('t', steps=[step('write', {write!r})], python={system.minor!r}, python_venv=True)\n"
                "ci = workflow('ci', on=[push(branches=['main'])], jobs=[t])\n")
        repo = workflow_repo(shared / "repo", body)
        env = agent_env(orchestrator, KICI_WORK_DIR=str(shared / "work"), KICI_AGENT_STEP_USER="nobody",
                        KICI_PYTHONS=SYSTEM_PYTHON, **_system_python_env())
        start_agent(env=env, command=[SYSTEM_PYTHON, "-m", "kici.agent"])
        await orchestrator.wait_registered()
        message = dispatch(repo, "t", python=system.minor, python_venv=True)
        await orchestrator.send(message)
        final = await orchestrator.wait_terminal(message["job_id"], timeout=120)
        assert final["state"] == "success", (final, orchestrator.log_lines(message["job_id"]))
        lines = orchestrator.log_lines(message["job_id"], 0)
        assert _value(lines, "UID") == str(NOBODY.pw_uid)
        assert _value(lines, "PREFIX").endswith(".tools/venv")
    finally:
        shutil.rmtree(shared, ignore_errors=True)
