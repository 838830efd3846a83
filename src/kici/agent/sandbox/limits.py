"""Resource limits of a job: CPU, memory and processes for everything the job runs, on every backend.

A `Limiter` is chosen once at agent start (`KICI_RESOURCE_LIMITS`, default `auto`: the first that works
here of `cgroup2`, `cgroup1`, `rlimit`). For each job with limits it makes a `JobCage`: the command
prefix that puts the runner (and so every step) under the limits before the sandbox backend's own
wrapper starts, what happened (`hit`: memory or process limit reached) and the release afterwards.

- `cgroup2`: a delegated cgroup v2 subtree with the `memory`, `pids` and `cpu` controllers. The agent
  moves itself into a leaf `kici-agent` of its own cgroup (the "no internal processes" rule) and makes one
  `kici-job-<id>` cgroup per job (`memory.max`, `memory.swap.max=0`, `pids.max`, `cpu.max`). A job over
  its memory is OOM-killed inside its cgroup and `memory.events` says so.
- `cgroup1`: the v1 `memory`, `pids` and `cpu` hierarchies (below the agent's own cgroup in each), the same
  limits through `memory.limit_in_bytes`, `pids.max` and `cpu.cfs_quota_us`; `memory.oom_control` counts
  the OOM kills.
- `rlimit`: the last resort, with `prlimit`/`taskset`: `RLIMIT_AS` per process (not for the job as a
  whole), `RLIMIT_NPROC` (counted per user, ignored for root) and a CPU affinity of `ceil(cpus)` CPUs.
  Nothing reports that a limit was reached: a program over it sees its own allocation or `fork` fail.

With cgroups the runner joins the job's cgroup through a tiny `sh` wrapper before anything else runs (it
writes its own pid, then `exec`s), so there is no window in which a step runs outside; when steps run as
a step user, the wrapper drops to it afterwards with `setpriv` (joining needs the agent's rights).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shlex
import shutil
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kici.engine.resources import ResourceLimits, format_cpus, format_memory

LIMITERS = ("auto", "cgroup2", "cgroup1", "rlimit")
CPU_PERIOD_US = 100_000
JOIN_FAILED_EXIT = 125


class LimitsUnavailable(Exception):
    """The chosen limit mechanism cannot work here; the message says why."""


@dataclass(frozen=True)
class LimitHit:
    category: str
    """`memory_limit` or `pids_limit`: the job's failure category."""
    message: str


def effective_limits(
    requested: ResourceLimits | None, defaults: ResourceLimits, maxima: ResourceLimits
) -> ResourceLimits | str:
    """The job's limits: each field the job sets, else the agent's default; a value above the agent's
    maximum is refused (the text saying so), never lowered behind the job's back."""
    values: dict[str, float | int] = {}
    problems = []
    for name in ("cpus", "memory", "pids"):
        asked = getattr(requested, name) if requested is not None else None
        value = asked if asked is not None else getattr(defaults, name)
        if value is None:
            continue
        ceiling = getattr(maxima, name)
        if asked is not None and ceiling is not None and asked > ceiling:
            problems.append(f"{name}={_show(name, asked)} is above this agent's maximum {_show(name, ceiling)}")
        values[name] = value
    if problems:
        return "resources: " + "; ".join(problems) + " (KICI_JOB_MAX_" + "/".join(
            p.split("=")[0].upper() for p in problems) + ")"
    return ResourceLimits(**values)


def _show(name: str, value: float) -> str:
    if name == "memory":
        return format_memory(int(value))
    if name == "cpus":
        return format_cpus(value)
    return str(int(value))


class JobCage(ABC):
    """One job's limits while it runs."""

    def __init__(self, limits: ResourceLimits) -> None:
        self.limits = limits

    @abstractmethod
    def prefix(self, run_as: tuple[int, int] | None) -> list[str]:
        """The command the runner (with the backend's own wrapper) starts under."""

    def drops_privileges(self) -> bool:
        """Whether `prefix` itself switches to `run_as` (then the process must start as the agent)."""
        return False

    @abstractmethod
    def describe(self) -> str:
        """For the job's setup log: the limits and how they are enforced."""

    def hit(self) -> LimitHit | None:
        """After the job: the limit it ran into, when the mechanism can tell."""
        return None

    def release(self) -> None:  # noqa: B027 - nothing to release for the rlimit mechanism
        """Kill whatever is left inside and remove the job's cgroup(s); idempotent."""


class Limiter(ABC):
    name: str

    @abstractmethod
    def probe(self) -> None:
        """Raise `LimitsUnavailable` when this mechanism does not work here."""

    @abstractmethod
    def cage(self, job_id: str, limits: ResourceLimits) -> JobCage:
        """Make the job's limits ready (OSError when that fails)."""


# -- cgroups ---------------------------------------------------------------------------------------------


def _mounts(mountinfo: str) -> list[tuple[str, str, list[str]]]:
    """(mount point, file system type, super options) of each line of /proc/self/mountinfo."""
    found = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        point = fields[4].replace("\\040", " ")
        found.append((point, tail[0], tail[2].split(",")))
    return found


def cgroup1_mounts(mountinfo: str) -> dict[str, str]:
    """Controller → mount point of the cgroup v1 hierarchies."""
    out: dict[str, str] = {}
    for point, fstype, options in _mounts(mountinfo):
        if fstype == "cgroup":
            for option in options:
                out.setdefault(option, point)
    return out


def cgroup2_mount(mountinfo: str) -> str | None:
    return next((point for point, fstype, _ in _mounts(mountinfo) if fstype == "cgroup2"), None)


def own_cgroups(proc_cgroup: str) -> dict[str, str]:
    """Controller → this process's cgroup path (`""` for the v2 hierarchy), from /proc/self/cgroup."""
    out: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for controller in controllers.split(",") if controllers else [""]:
            out[controller] = path
    return out


def _read(path: Path) -> str:
    return path.read_text(encoding="ascii", errors="replace")


def _write(path: Path, value: str) -> None:
    with open(path, "w", encoding="ascii") as handle:
        handle.write(value)


def _counter(path: Path, name: str) -> int:
    """`name N` out of a flat-keyed cgroup file such as memory.events (0 when absent)."""
    try:
        for line in _read(path).splitlines():
            key, _, value = line.partition(" ")
            if key == name and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _job_dir_name(job_id: str) -> str:
    return "kici-job-" + re.sub(r"[^A-Za-z0-9_.-]", "_", job_id)[:200]


def _kill_and_remove(dirs: Sequence[Path]) -> None:
    """SIGKILL every process still in the cgroups (repeatedly: one may fork meanwhile), then rmdir them."""
    deadline = time.monotonic() + 5.0
    for directory in dirs:
        procs = directory / "cgroup.procs"
        while procs.exists():
            try:
                pids = [int(p) for p in _read(procs).split()]
            except OSError:
                break
            if not pids or time.monotonic() > deadline:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
    for directory in dirs:
        for _ in range(50):  # the kernel may need a moment to let go of the last exited task
            try:
                directory.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)


def _fresh(directory: Path) -> Path:
    """A new, empty cgroup at `directory`: one left over by an agent that died is emptied and replaced, so
    its counters (an old OOM kill) never speak for this job."""
    if directory.exists():
        _kill_and_remove([directory])
    directory.mkdir()
    return directory


def _join_prefix(sh: str, procs_files: Sequence[Path], run_as: tuple[int, int] | None,
                 setpriv: str | None) -> list[str]:
    files = " ".join(shlex.quote(str(f)) for f in procs_files)
    script = (f'for f in {files}; do echo $$ > "$f" || {{ echo "kici: cannot join the job\'s cgroup $f" >&2; '
              f"exit {JOIN_FAILED_EXIT}; }}; done; exec \"$@\"")
    argv = [sh, "-c", script, "kici-limits"]
    if run_as is not None:
        assert setpriv is not None
        argv += [setpriv, f"--reuid={run_as[0]}", f"--regid={run_as[1]}", "--clear-groups", "--"]
    return argv


class _CgroupCage(JobCage):
    def __init__(self, limits: ResourceLimits, mechanism: str, dirs: list[Path], sh: str,
                 setpriv: str | None) -> None:
        super().__init__(limits)
        self.mechanism = mechanism
        self.dirs = dirs
        self._sh = sh
        self._setpriv = setpriv
        self._released = False

    def prefix(self, run_as: tuple[int, int] | None) -> list[str]:
        return _join_prefix(self._sh, [d / "cgroup.procs" for d in self.dirs], run_as, self._setpriv)

    def drops_privileges(self) -> bool:
        return True

    def describe(self) -> str:
        where = ", ".join(str(d) for d in self.dirs)
        return f"resource limits {self.limits.describe()} enforced by {self.mechanism} ({where})"

    def release(self) -> None:
        if not self._released:
            self._released = True
            _kill_and_remove(self.dirs)


class _Cgroup1Cage(_CgroupCage):
    def __init__(self, limits: ResourceLimits, dirs: dict[str, Path], sh: str, setpriv: str | None) -> None:
        super().__init__(limits, "cgroup v1", list(dirs.values()), sh, setpriv)
        self.by_controller = dirs

    def hit(self) -> LimitHit | None:
        memory = self.by_controller.get("memory")
        if memory is not None and self.limits.memory is not None:
            kills = _counter(memory / "memory.oom_control", "oom_kill")
            if kills:
                return _memory_hit(self.limits.memory, kills)
        pids = self.by_controller.get("pids")
        if pids is not None and self.limits.pids is not None and _counter(pids / "pids.events", "max"):
            return _pids_hit(self.limits.pids)
        return None


class _Cgroup2Cage(_CgroupCage):
    def __init__(self, limits: ResourceLimits, directory: Path, sh: str, setpriv: str | None) -> None:
        super().__init__(limits, "cgroup v2", [directory], sh, setpriv)

    def hit(self) -> LimitHit | None:
        directory = self.dirs[0]
        if self.limits.memory is not None:
            kills = _counter(directory / "memory.events", "oom_kill")
            if kills:
                return _memory_hit(self.limits.memory, kills)
        if self.limits.pids is not None and _counter(directory / "pids.events", "max"):
            return _pids_hit(self.limits.pids)
        return None

    def release(self) -> None:
        kill = self.dirs[0] / "cgroup.kill"
        if not self._released and kill.exists():
            with contextlib.suppress(OSError):
                _write(kill, "1")
        super().release()


def _memory_hit(limit: int, kills: int) -> LimitHit:
    return LimitHit("memory_limit", f"memory limit exceeded: the job's processes reached their limit of "
                    f"{format_memory(limit)} and the kernel killed {kills} of them")


def _pids_hit(limit: int) -> LimitHit:
    return LimitHit("pids_limit", f"process limit reached: the job tried to run more than {limit} processes "
                    "and threads at once (pids); process creation failed")


def _tools() -> tuple[str, str | None]:
    sh = shutil.which("sh") or "/bin/sh"
    return sh, shutil.which("setpriv")


class Cgroup1Limiter(Limiter):
    name = "cgroup1"
    CONTROLLERS = ("memory", "pids", "cpu")

    def __init__(self, mountinfo: str | None = None, proc_cgroup: str | None = None) -> None:
        mountinfo = mountinfo if mountinfo is not None else _safe_read("/proc/self/mountinfo")
        proc_cgroup = proc_cgroup if proc_cgroup is not None else _safe_read("/proc/self/cgroup")
        mounts, own = cgroup1_mounts(mountinfo), own_cgroups(proc_cgroup)
        self.bases: dict[str, Path] = {}
        for controller in self.CONTROLLERS:
            if controller in mounts and controller in own:
                self.bases[controller] = Path(mounts[controller] + own[controller].rstrip("/"))
        self.sh, self.setpriv = _tools()

    def probe(self) -> None:
        missing = [c for c in self.CONTROLLERS if c not in self.bases]
        if missing:
            raise LimitsUnavailable(f"cgroup v1: no {', '.join(missing)} hierarchy mounted for this process")
        if os.geteuid() == 0 and self.setpriv is None:
            raise LimitsUnavailable("cgroup v1: `setpriv` (util-linux) is needed to drop to the step user")
        for controller, base in self.bases.items():
            probe = base / f"kici-probe-{os.getpid()}"
            try:
                probe.mkdir()
                probe.rmdir()
            except OSError as exc:
                raise LimitsUnavailable(
                    f"cgroup v1: cannot create a cgroup in {base} ({exc.strerror or exc}); the {controller} "
                    "hierarchy is not writable for the agent's user"
                ) from None

    def cage(self, job_id: str, limits: ResourceLimits) -> JobCage:
        wanted = {"memory": limits.memory, "pids": limits.pids, "cpu": limits.cpus}
        dirs: dict[str, Path] = {}
        try:
            for controller, value in wanted.items():
                if value is None:
                    continue
                directory = _fresh(self.bases[controller] / _job_dir_name(job_id))
                dirs[controller] = directory
                if controller == "memory":
                    _write(directory / "memory.limit_in_bytes", str(limits.memory))
                    swap = directory / "memory.memsw.limit_in_bytes"
                    if swap.exists():  # memory + swap: the limit holds even where swap exists
                        with contextlib.suppress(OSError):
                            _write(swap, str(limits.memory))
                elif controller == "pids":
                    _write(directory / "pids.max", str(limits.pids))
                else:
                    assert limits.cpus is not None
                    _write(directory / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                    _write(directory / "cpu.cfs_quota_us", str(max(1000, round(limits.cpus * CPU_PERIOD_US))))
        except OSError:
            _kill_and_remove(list(dirs.values()))
            raise
        return _Cgroup1Cage(limits, dirs, self.sh, self.setpriv)


class Cgroup2Limiter(Limiter):
    name = "cgroup2"
    CONTROLLERS = ("memory", "pids", "cpu")
    AGENT_LEAF = "kici-agent"

    def __init__(self, mountinfo: str | None = None, proc_cgroup: str | None = None) -> None:
        mountinfo = mountinfo if mountinfo is not None else _safe_read("/proc/self/mountinfo")
        proc_cgroup = proc_cgroup if proc_cgroup is not None else _safe_read("/proc/self/cgroup")
        mount, own = cgroup2_mount(mountinfo), own_cgroups(proc_cgroup).get("")
        self.base = Path(mount + own.rstrip("/")) if mount is not None and own is not None else None
        self.sh, self.setpriv = _tools()

    def probe(self) -> None:
        if self.base is None:
            raise LimitsUnavailable("cgroup v2: no cgroup2 file system mounted for this process")
        try:
            available = _read(self.base / "cgroup.controllers").split()
        except OSError as exc:
            raise LimitsUnavailable(f"cgroup v2: cannot read {self.base}/cgroup.controllers ({exc})") from None
        missing = [c for c in self.CONTROLLERS if c not in available]
        if missing:
            raise LimitsUnavailable(f"cgroup v2: the controller(s) {', '.join(missing)} are not delegated to "
                                    f"{self.base} (cgroup.controllers: {' '.join(available) or 'none'})")
        if os.geteuid() == 0 and self.setpriv is None:
            raise LimitsUnavailable("cgroup v2: `setpriv` (util-linux) is needed to drop to the step user")
        try:
            self._enable()
            probe = self.base / f"kici-probe-{os.getpid()}"
            probe.mkdir()
            probe.rmdir()
        except OSError as exc:
            raise LimitsUnavailable(f"cgroup v2: {self.base} is not delegated to the agent's user "
                                    f"({exc.strerror or exc})") from None

    def _enable(self) -> None:
        """Turn the controllers on for the agent's cgroup's children; the agent moves into a leaf first, as
        a cgroup with processes cannot hand controllers to its children."""
        assert self.base is not None
        enabled = _read(self.base / "cgroup.subtree_control").split()
        if all(c in enabled for c in self.CONTROLLERS):
            return
        leaf = self.base / self.AGENT_LEAF
        leaf.mkdir(exist_ok=True)
        _write(leaf / "cgroup.procs", str(os.getpid()))
        _write(self.base / "cgroup.subtree_control", " ".join(f"+{c}" for c in self.CONTROLLERS))

    def cage(self, job_id: str, limits: ResourceLimits) -> JobCage:
        assert self.base is not None
        directory = _fresh(self.base / _job_dir_name(job_id))
        try:
            if limits.memory is not None:
                _write(directory / "memory.max", str(limits.memory))
                if (directory / "memory.swap.max").exists():
                    _write(directory / "memory.swap.max", "0")
            if limits.pids is not None:
                _write(directory / "pids.max", str(limits.pids))
            if limits.cpus is not None:
                _write(directory / "cpu.max", f"{max(1000, round(limits.cpus * CPU_PERIOD_US))} {CPU_PERIOD_US}")
        except OSError:
            _kill_and_remove([directory])
            raise
        return _Cgroup2Cage(limits, directory, self.sh, self.setpriv)


class _RlimitCage(JobCage):
    def __init__(self, limits: ResourceLimits, prlimit: str, taskset: str) -> None:
        super().__init__(limits)
        self._prlimit = prlimit
        self._taskset = taskset

    def _cpus(self) -> list[int]:
        assert self.limits.cpus is not None
        return sorted(os.sched_getaffinity(0))[: max(1, math.ceil(self.limits.cpus))]

    def prefix(self, run_as: tuple[int, int] | None) -> list[str]:
        argv: list[str] = []
        if self.limits.memory is not None or self.limits.pids is not None:
            argv.append(self._prlimit)
            if self.limits.memory is not None:
                argv.append(f"--as={self.limits.memory}")
            if self.limits.pids is not None:
                argv.append(f"--nproc={self.limits.pids}")
            argv.append("--")
        if self.limits.cpus is not None:
            argv += [self._taskset, "--cpu-list", ",".join(map(str, self._cpus())), "--"]
        return argv

    def describe(self) -> str:
        parts = []
        if self.limits.memory is not None:
            parts.append(f"address space {format_memory(self.limits.memory)} per process (RLIMIT_AS)")
        if self.limits.pids is not None:
            parts.append(f"{self.limits.pids} processes per user (RLIMIT_NPROC)")
        if self.limits.cpus is not None:
            parts.append(f"CPU affinity {','.join(map(str, self._cpus()))}")
        return (f"resource limits {self.limits.describe()} enforced by rlimits (no usable cgroup): "
                + "; ".join(parts))


class RlimitLimiter(Limiter):
    name = "rlimit"

    def __init__(self) -> None:
        self.prlimit = shutil.which("prlimit")
        self.taskset = shutil.which("taskset")

    def probe(self) -> None:
        missing = [n for n, p in (("prlimit", self.prlimit), ("taskset", self.taskset)) if p is None]
        if missing:
            raise LimitsUnavailable(f"rlimit: {' and '.join(missing)} (util-linux) not found")

    def cage(self, job_id: str, limits: ResourceLimits) -> JobCage:
        assert self.prlimit is not None and self.taskset is not None
        return _RlimitCage(limits, self.prlimit, self.taskset)


def _safe_read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


def get_limiter(name: str) -> tuple[Limiter, list[str]]:
    """The limiter for `KICI_RESOURCE_LIMITS`, probed, and why better ones were skipped (for `auto`);
    `LimitsUnavailable` when the one asked for (or, for `auto`, every one) cannot work here."""
    makers = {"cgroup2": Cgroup2Limiter, "cgroup1": Cgroup1Limiter, "rlimit": RlimitLimiter}
    if name not in LIMITERS:
        raise LimitsUnavailable(f"unknown limit mechanism {name!r} (choose from {', '.join(LIMITERS)})")
    candidates = list(makers) if name == "auto" else [name]
    skipped: list[str] = []
    for candidate in candidates:
        limiter = makers[candidate]()
        try:
            limiter.probe()
        except LimitsUnavailable as exc:
            if name != "auto":
                raise
            skipped.append(str(exc))
            continue
        return limiter, skipped
    raise LimitsUnavailable("no resource limit mechanism works here: " + "; ".join(skipped))
