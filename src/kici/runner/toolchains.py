"""Python interpreters on the agent's host: found at start-up, advertised as labels, chosen per job.

Detection looks at `python3`/`python3.X` on PATH, `/usr/bin/python3.*`, `/usr/local/bin/python3.*`,
pyenv's versions (`$PYENV_ROOT/versions/*/bin/python`, default `~/.pyenv`) and uv's managed interpreters
(`uv python list --only-installed` when `uv` is on PATH, and its data dir
`~/.local/share/uv/python/*/bin/python3`). Every candidate is asked its version once (in parallel, with a
short timeout); broken ones are skipped with a log line. Candidates are deduplicated by real path.

The agent's own environment is never offered to jobs: an interpreter living in one of KiCI's own `bin`
directories (its virtualenv, its base interpreter's prefix, its executable's directory — the same set the
runner strips from a step's PATH, `kici.runner.spawn.kici_bin_dirs`) is left out unless it is a plain
system interpreter in a shared directory such as `/usr/bin`.

Each interpreter gives two labels, `kici:python:3.12` and `kici:python:3.12.7`; a job with
`python="3.12"` runs on an agent advertising that label, with that interpreter first on its steps' PATH.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kici.engine import aio
from kici.runner import proctree
from kici.runner.spawn import SHARED_BIN_DIRS, kici_bin_dirs

LABEL_PREFIX = "kici:python:"
VERSION_TIMEOUT_S = 5.0
VENV_TIMEOUT_S = 120.0
_PROBE = (
    "import sys; print('%d.%d.%d %s %d %s' % (sys.version_info[:3] + (sys.implementation.name, "
    "sys.prefix != getattr(sys, 'base_prefix', sys.prefix), sys.executable)))"
)
_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+) (\w+) ([01]) (/.*)$")
_NAME = re.compile(r"^python3(\.\d+)?$")

LogFn = Callable[..., None]
"""`log_event`-shaped: the agent passes its own; `kici run local` keeps quiet (its output is for humans)."""


def _quiet(*_: object, **__: object) -> None:
    """The default `log`: nothing."""


class ToolchainError(Exception):
    """A job's `python=` cannot be served here; the message says why."""


@dataclass(frozen=True)
class Interpreter:
    path: str
    """The path it was found under (a pyenv or uv `bin/python3`, `/usr/bin/python3.11`, …)."""
    real_path: str
    version: tuple[int, int, int]

    @property
    def minor(self) -> str:
        return f"{self.version[0]}.{self.version[1]}"

    @property
    def full(self) -> str:
        return ".".join(map(str, self.version))

    def matches(self, wanted: str) -> bool:
        """`wanted` is "3", "3.12" or "3.12.7": a prefix of the version by components."""
        parts = wanted.split(".")
        return [str(v) for v in self.version[: len(parts)]] == parts


def labels(interpreters: Iterable[Interpreter]) -> list[str]:
    """`kici:python:3.12` and `kici:python:3.12.7` per interpreter, without duplicates, sorted."""
    found: set[str] = set()
    for interpreter in interpreters:
        found.add(LABEL_PREFIX + interpreter.minor)
        found.add(LABEL_PREFIX + interpreter.full)
    return sorted(found)


def label_for(wanted: str) -> str:
    """The routing label of a job's `python=` ("3.12" → `kici:python:3.12`)."""
    return LABEL_PREFIX + wanted


def choose(interpreters: Sequence[Interpreter], wanted: str) -> Interpreter | None:
    """The newest interpreter matching `wanted` (a major-only "3" takes the newest 3.x)."""
    matching = [i for i in interpreters if i.matches(wanted)]
    return max(matching, key=lambda i: i.version) if matching else None


# -- finding candidates ---------------------------------------------------------------------------


def _home(environ: Mapping[str, str]) -> Path:
    return Path(environ.get("HOME") or str(Path.home()))


def candidates(environ: Mapping[str, str]) -> list[str]:
    """Paths that may be interpreters, in discovery order (not yet checked)."""
    found: list[str] = []
    for entry in environ.get("PATH", "").split(os.pathsep):
        if not entry or not os.path.isdir(entry) or os.path.basename(os.path.normpath(entry)) == "shims":
            continue  # pyenv/asdf shims pick a version per directory: their versions are found directly
        with contextlib.suppress(OSError):
            for name in sorted(os.listdir(entry)):
                if _NAME.match(name):
                    found.append(os.path.join(entry, name))
    for directory in ("/usr/bin", "/usr/local/bin"):
        found += sorted(p for p in glob.glob(f"{directory}/python3.*") if _NAME.match(os.path.basename(p)))
    pyenv_root = Path(environ.get("PYENV_ROOT") or _home(environ) / ".pyenv")
    found += sorted(glob.glob(str(pyenv_root / "versions" / "*" / "bin" / "python")))
    uv_data = Path(environ.get("UV_PYTHON_INSTALL_DIR") or _home(environ) / ".local" / "share" / "uv" / "python")
    found += sorted(glob.glob(str(uv_data / "*" / "bin" / "python3")))
    return found


async def _uv_candidates(environ: Mapping[str, str], log: LogFn) -> list[str]:
    uv = shutil.which("uv", path=environ.get("PATH"))
    if uv is None:
        return []
    try:
        proc = await asyncio.create_subprocess_exec(
            uv, "python", "list", "--only-installed", "--output-format", "json",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            env=dict(environ),
        )
        out, _ = await aio.wait_for(proc.communicate(), VERSION_TIMEOUT_S * 2)
    except (OSError, TimeoutError) as exc:
        log("toolchains.uv_failed", level="warning", error=str(exc))
        return []
    try:
        entries = json.loads(out or b"[]")
        return [str(e["path"]) for e in entries if isinstance(e, dict) and e.get("path")]
    except (ValueError, KeyError, TypeError):
        log("toolchains.uv_failed", level="warning", error="unreadable output of `uv python list`")
        return []


def _is_own(real_path: str, hidden: frozenset[str]) -> bool:
    """Whether the interpreter is one of KiCI's own (its venv or base prefix), not a shared system one."""
    directory = os.path.dirname(real_path)
    if directory in SHARED_BIN_DIRS:
        return False
    own_executables = {os.path.realpath(sys.executable)}
    return directory in hidden or real_path in own_executables


async def _probe(path: str, log: LogFn) -> tuple[tuple[int, int, int], str] | None:
    """The interpreter's version and `sys.executable`, or None (logged) when it is unusable."""
    try:
        proc = await asyncio.create_subprocess_exec(
            path, "-I", "-c", _PROBE, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={"PATH": os.defpath}, start_new_session=True,
        )
    except OSError as exc:
        log("toolchains.skipped", level="warning", path=path, reason=exc.strerror or str(exc))
        return None
    try:
        out, err = await aio.wait_for(proc.communicate(), VERSION_TIMEOUT_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        log("toolchains.skipped", level="warning", path=path, reason=f"no answer in {VERSION_TIMEOUT_S:.0f}s")
        return None
    match = _VERSION.match(out.decode("utf-8", "replace").strip())
    if proc.returncode != 0 or match is None:
        reason = (err.decode("utf-8", "replace").strip().splitlines() or [f"exit code {proc.returncode}"])[0]
        log("toolchains.skipped", level="warning", path=path, reason=reason[:200])
        return None
    if match.group(4) != "cpython" or int(match.group(1)) < 3:
        log("toolchains.skipped", level="info", path=path,
                  reason=f"{match.group(4)} {match.group(1)}.{match.group(2)} (only CPython 3 is advertised)")
        return None
    if match.group(5) == "1":
        # a virtualenv carries someone's packages: jobs get base interpreters (and their own venv if asked)
        log("toolchains.skipped", level="info", path=path, reason="a virtualenv, not a base interpreter")
        return None
    return (int(match.group(1)), int(match.group(2)), int(match.group(3))), match.group(6)


async def inspect_paths(paths: Iterable[str], *, exclude_own: bool, log: LogFn = _quiet) -> list[Interpreter]:
    """Ask each distinct interpreter (by real path) its version; broken or foreign ones are skipped."""
    hidden = kici_bin_dirs()
    unique: dict[str, str] = {}
    for path in paths:
        real = os.path.realpath(path)
        if real in unique:
            continue
        if not (os.path.isfile(real) and os.access(real, os.X_OK)):
            log("toolchains.skipped", level="warning", path=path, reason="not an executable file")
            continue
        if exclude_own and _is_own(real, hidden):
            log("toolchains.skipped", level="debug", path=path, reason="the agent's own interpreter")
            continue
        unique[real] = path
    answers = await asyncio.gather(*(_probe(path, log) for path in unique.values()))
    found: dict[str, Interpreter] = {}
    for (real, path), answer in zip(unique.items(), answers, strict=True):
        if answer is None:
            continue
        # a launcher script (not a symlink) runs another binary: that one is the interpreter
        version, executable = answer
        actual = os.path.realpath(executable) if os.path.isabs(executable) else real
        if actual in found:
            continue
        if exclude_own and _is_own(actual, hidden):
            log("toolchains.skipped", level="debug", path=path, reason="the agent's own interpreter")
            continue
        found[actual] = Interpreter(path=path, real_path=actual, version=version)
    return list(found.values())


async def detect(environ: Mapping[str, str] | None = None, *, log: LogFn = _quiet) -> list[Interpreter]:
    """Every usable interpreter on this host (see the module docstring), minus the agent's own."""
    environ = os.environ if environ is None else environ
    paths = candidates(environ) + await _uv_candidates(environ, log)
    return await inspect_paths(paths, exclude_own=True, log=log)


async def explicit(paths: Sequence[str], *, log: LogFn = _quiet) -> list[Interpreter]:
    """The interpreters an operator listed (`KICI_PYTHONS`); ValueError naming each unusable one."""
    answers = await asyncio.gather(*(_probe(path, log) for path in paths))
    bad = [path for path, answer in zip(paths, answers, strict=True) if answer is None]
    if bad:
        raise ValueError(
            f"unusable interpreter(s) {', '.join(bad)}: each must be a working CPython 3 that is not a "
            "virtualenv (the toolchains.skipped log lines say why)"
        )
    return await inspect_paths(paths, exclude_own=False)


# -- a job's interpreter --------------------------------------------------------------------------


def python_bin_dir(interpreter: Interpreter, scratch: Path) -> str:
    """A directory where `python`, `python3` and `python3.X` all run `interpreter`.

    The interpreter's own directory when it already has those names pointing at it (a pyenv or uv
    `bin`); otherwise (e.g. `/usr/bin`, whose `python3` may be another version) a per-job directory in
    `scratch` with the three symlinks, put before the interpreter's directory on PATH.
    """
    directory = os.path.dirname(interpreter.path)
    names = ("python", "python3", f"python{interpreter.minor}")
    if all(os.path.realpath(os.path.join(directory, n)) == interpreter.real_path for n in names):
        return directory
    bin_dir = scratch / "python-bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        link = bin_dir / name
        link.unlink(missing_ok=True)
        link.symlink_to(interpreter.path)
    return str(bin_dir)


async def create_venv(interpreter: Interpreter, target: Path) -> None:
    """`<interpreter> -m venv target`; RuntimeError with its output when it fails."""
    proc = await asyncio.create_subprocess_exec(
        interpreter.path, "-I", "-m", "venv", str(target), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env={"PATH": os.defpath},
        start_new_session=True,
    )
    try:
        out, _ = await aio.wait_for(proc.communicate(), VENV_TIMEOUT_S)
    except TimeoutError:
        raise RuntimeError(f"{interpreter.path} -m venv did not finish in {VENV_TIMEOUT_S:.0f}s") from None
    finally:
        if proc.returncode is None:  # timed out, or the job's task was cancelled: nothing may outlive it
            await asyncio.to_thread(proctree.kill_tree, proc.pid, grace=0)
            await proc.wait()
    if proc.returncode != 0:
        tail = out.decode("utf-8", "replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{interpreter.path} -m venv failed: {' / '.join(tail) or proc.returncode}")


async def prepare(
    interpreters: Sequence[Interpreter], wanted: str, *, venv: bool, scratch: Path
) -> tuple[Interpreter, dict[str, str]]:
    """A job's `python=` (and `python_venv`): the interpreter chosen and the variables to put in front of
    the step environment — `PATH` (the venv's `bin`, then the interpreter's `python`/`python3` directory)
    and, with `venv`, `VIRTUAL_ENV`. The venv lives in `scratch` (the job's, removed with it).
    ToolchainError when no interpreter matches or the venv cannot be created."""
    interpreter = choose(interpreters, wanted)
    if interpreter is None:
        have = ", ".join(sorted({i.full for i in interpreters}, key=_version_key)) or "none"
        raise ToolchainError(f"python={wanted!r}: no matching interpreter here (found: {have})")
    scratch.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = [python_bin_dir(interpreter, scratch)]
    if paths[0] != os.path.dirname(interpreter.path):
        paths.append(os.path.dirname(interpreter.path))
    env: dict[str, str] = {}
    if venv:
        target = scratch / "venv"
        try:
            await create_venv(interpreter, target)
        except RuntimeError as exc:
            raise ToolchainError(str(exc)) from None
        paths.insert(0, str(target / "bin"))
        env["VIRTUAL_ENV"] = str(target)
    env["PATH"] = os.pathsep.join(paths)
    return interpreter, env


def install_paths(interpreter: Interpreter) -> tuple[Path, ...]:
    """The directories an interpreter's installation lives in (its prefix: the parent of its `bin`, else its
    own directory), as found and resolved: what a filesystem sandbox must show for it to run."""
    found: list[Path] = []
    for path in (Path(interpreter.path), Path(interpreter.real_path)):
        home = path.parent
        prefix = home.parent if home.name == "bin" else home
        if prefix not in found:
            found.append(prefix)
    return tuple(found)


def apply(base: Mapping[str, str], python_env: Mapping[str, str]) -> dict[str, str]:
    """`base` (an already cleaned step environment) with `prepare`'s variables in front."""
    env = dict(base)
    if python_env.get("PATH"):
        env["PATH"] = os.pathsep.join(p for p in (python_env["PATH"], base.get("PATH", "")) if p)
    if "VIRTUAL_ENV" in python_env:
        env["VIRTUAL_ENV"] = python_env["VIRTUAL_ENV"]
    return env


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))
