"""`job(resources=Resources(...))` at compile time (sizes, CPUs, processes; bad values refused with a clear
error), the lock file and dispatch models, how a job's request combines with the agent's defaults and
maxima, and the parsing of /proc cgroup and mount tables the limiters rely on."""

from __future__ import annotations

from pathlib import Path

import pytest

from kici.agent.sandbox.limits import cgroup1_mounts, cgroup2_mount, effective_limits, own_cgroups
from kici.compiler.errors import CompileFailed
from kici.compiler.project import Project, compile_project
from kici.engine import protocol as p
from kici.engine.lockfile import LockFile
from kici.engine.resources import ResourceLimits, format_memory, parse_memory

HEADER = "from kici import *\n"


def _compile(tmp_path: Path, options: str) -> LockFile:
    (tmp_path / ".kici/workflows").mkdir(parents=True, exist_ok=True)
    (tmp_path / ".kici/workflows/wf.py").write_text(
        HEADER + f'ci = workflow("ci", on=push(), jobs=[job("j", run="true", {options})])\n'
    )
    return compile_project(Project(root=tmp_path, kici_dir=tmp_path / ".kici"))


@pytest.mark.parametrize(
    ("given", "expected"),
    [("512M", 512 << 20), ("4G", 4 << 30), ("1.5G", 3 << 29), ("8192K", 8 << 20), ("2g", 2 << 30),
     ("64MiB", 64 << 20), ("1T", 1 << 40), (8 << 20, 8 << 20), (" 100M ", 100 << 20)],
)
def test_memory_sizes(given: object, expected: int) -> None:
    assert parse_memory(given) == expected


@pytest.mark.parametrize("given", ["", "lots", "4 GB of RAM", "-1G", "1.5.G", True, 1.5, "1M", 1024])
def test_bad_memory_sizes(given: object) -> None:
    with pytest.raises(ValueError, match="memory="):
        parse_memory(given)


def test_format_memory() -> None:
    assert format_memory(128 << 20) == "128 MiB"
    assert format_memory(3 << 29) == "1.5 GiB"
    assert format_memory(512) == "512 B"


def test_resources_compile_into_the_lock_file(tmp_path: Path) -> None:
    result = _compile(tmp_path, 'resources=Resources(cpus=1.5, memory="1.5G", pids=1024)')
    [lock_job] = result.workflows[0].jobs
    assert lock_job.resources == ResourceLimits(cpus=1.5, memory=3 << 29, pids=1024)
    dumped = lock_job.model_dump(by_alias=True, exclude_none=True)["resources"]
    assert dumped == {"cpus": 1.5, "memory": 3 << 29, "pids": 1024}
    only_memory = _compile(tmp_path, 'resources=Resources(memory="64M")').workflows[0].jobs[0]
    assert only_memory.resources == ResourceLimits(memory=64 << 20)
    assert _compile(tmp_path, "").workflows[0].jobs[0].resources is None
    dispatch = p.JobDispatch.model_validate({
        "message_id": "m", "run_id": "r", "job_id": "j", "repo_url": "/r", "sha": "0" * 40, "workflow": "ci",
        "job": "j", "display_name": "j", "workflow_file": "wf.py", "export": "ci", "content_hash": "h",
        "event": {}, "timestamp": 0.0, "resources": dumped,
    })
    assert dispatch.resources == lock_job.resources


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ('resources=Resources(memory="lots")', "resources: memory='lots' must be a size such as 512M"),
        ("resources=Resources(memory=True)", "resources: memory=True must be a size"),
        ('resources=Resources(memory="2M")', "is below the smallest limit a job can run with (4M)"),
        ("resources=Resources(cpus=0)", "resources: cpus=0 must be a number of CPUs greater than 0"),
        ("resources=Resources(cpus=-1)", "cpus=-1 must be a number of CPUs greater than 0"),
        ('resources=Resources(cpus="two")', "cpus='two' must be a number of CPUs"),
        ("resources=Resources(pids=0)", "resources: pids=0 must be a whole number of processes, at least 1"),
        ("resources=Resources(pids=2.5)", "pids=2.5 must be a whole number"),
        ("resources=Resources()", "resources=Resources() sets no limit"),
        ('resources={"memory": "4G"}', "must be kici.Resources(cpus=…, memory=…, pids=…)"),
    ],
)
def test_bad_resources_refused(tmp_path: Path, options: str, message: str) -> None:
    with pytest.raises(CompileFailed) as failed:
        _compile(tmp_path, options)
    errors = [str(e) for e in failed.value.errors]
    assert any(message in e and "job 'j'" in e for e in errors), errors


def test_a_job_request_combines_with_the_agent_defaults_and_maxima() -> None:
    defaults = ResourceLimits(cpus=1, memory=1 << 30, pids=512)
    maxima = ResourceLimits(cpus=4, memory=8 << 30)
    assert effective_limits(None, defaults, maxima) == defaults
    assert effective_limits(ResourceLimits(memory=4 << 30), defaults, maxima) == ResourceLimits(
        cpus=1, memory=4 << 30, pids=512)
    assert effective_limits(ResourceLimits(pids=100_000), defaults, maxima) == ResourceLimits(
        cpus=1, memory=1 << 30, pids=100_000)  # no maximum for pids
    refused = effective_limits(ResourceLimits(cpus=8, memory=16 << 30), defaults, maxima)
    assert refused == ("resources: cpus=8 is above this agent's maximum 4; memory=16 GiB is above this "
                       "agent's maximum 8 GiB (KICI_JOB_MAX_CPUS/MEMORY)")
    assert effective_limits(None, ResourceLimits(), ResourceLimits()) == ResourceLimits()
    assert ResourceLimits().is_empty()


MOUNTINFO = """\
25 30 0:22 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
26 25 0:23 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
27 25 0:24 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
28 25 0:25 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
29 25 0:26 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
"""
PROC_CGROUP = """\
12:pids:/user.slice
4:memory:/process_api/abc
3:cpu,cpuacct:/
0::/user.slice/agent.service
"""


def test_cgroup_tables() -> None:
    assert cgroup1_mounts(MOUNTINFO) == {
        "rw": "/sys/fs/cgroup/memory", "memory": "/sys/fs/cgroup/memory", "cpu": "/sys/fs/cgroup/cpu,cpuacct",
        "cpuacct": "/sys/fs/cgroup/cpu,cpuacct", "pids": "/sys/fs/cgroup/pids",
    }
    assert cgroup2_mount(MOUNTINFO) == "/sys/fs/cgroup/unified"
    assert own_cgroups(PROC_CGROUP) == {
        "pids": "/user.slice", "memory": "/process_api/abc", "cpu": "/", "cpuacct": "/",
        "": "/user.slice/agent.service",
    }
