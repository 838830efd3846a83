"""Per-job resource limits: `job(..., resources=Resources(cpus=2, memory="4G", pids=1024))`.

The compiler turns the SDK's `Resources` into `ResourceLimits` (memory in bytes) in the lock file; the
orchestrator copies them into `job.dispatch`; the agent combines them with its own defaults and maxima
(`KICI_JOB_MEMORY`, `KICI_JOB_MAX_MEMORY`, …) and enforces them (`kici.agent.sandbox.limits`).
"""

from __future__ import annotations

import math
import re

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

MIN_MEMORY = 4 * 1024 * 1024
"""Below this not even the runner's interpreter starts: a smaller limit is a mistake, not a limit."""

MAX_CPUS = 4096.0
MAX_PIDS = 4_194_304

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_MEMORY = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?$", re.IGNORECASE)
MEMORY_FORMS = "a size such as 512M, 4G or 1.5G (K, M, G, T: powers of 1024; a plain integer is bytes)"


class ResourceLimits(BaseModel):
    """What a job may use; None: not limited by the job (the agent's default applies)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, alias_generator=to_camel)

    cpus: float | None = Field(default=None, gt=0, le=MAX_CPUS)
    """CPU time as a number of CPUs (1.5: one and a half CPUs' worth of time)."""
    memory: int | None = Field(default=None, ge=MIN_MEMORY)
    """Bytes of memory (resident, including the page cache the job causes) for all its processes."""
    pids: int | None = Field(default=None, ge=1, le=MAX_PIDS)
    """Processes and threads the job may have at the same time."""

    def is_empty(self) -> bool:
        return self.cpus is None and self.memory is None and self.pids is None

    def describe(self) -> str:
        """`cpus=2 memory=4 GiB pids=1024` (only what is set)."""
        parts = []
        if self.cpus is not None:
            parts.append(f"cpus={format_cpus(self.cpus)}")
        if self.memory is not None:
            parts.append(f"memory={format_memory(self.memory)}")
        if self.pids is not None:
            parts.append(f"pids={self.pids}")
        return " ".join(parts) or "none"


def parse_memory(value: object) -> int:
    """Bytes for `value` ("512M", "4G", "1.5G", "1024K", or an int of bytes); ValueError saying what is
    accepted."""
    if isinstance(value, bool):
        raise ValueError(f"memory={value!r} must be {MEMORY_FORMS}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _MEMORY.match(value.strip())):
        size = math.floor(float(match.group(1)) * _UNITS[match.group(2).upper()])
    else:
        raise ValueError(f"memory={value!r} must be {MEMORY_FORMS}")
    if size < MIN_MEMORY:
        raise ValueError(f"memory={value!r} is below the smallest limit a job can run with (4M)")
    return size


def parse_cpus(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"cpus={value!r} must be a number of CPUs greater than 0 (1, 2, 0.5)")
    try:
        cpus = float(value)
    except ValueError:
        raise ValueError(f"cpus={value!r} must be a number of CPUs greater than 0 (1, 2, 0.5)") from None
    if not math.isfinite(cpus) or cpus <= 0 or cpus > MAX_CPUS:
        raise ValueError(f"cpus={value!r} must be a number of CPUs greater than 0 (1, 2, 0.5)")
    return cpus


def parse_pids(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"pids={value!r} must be a whole number of processes, at least 1")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int) or value < 1 or value > MAX_PIDS:
        raise ValueError(f"pids={value!r} must be a whole number of processes, at least 1")
    return value


def format_memory(size: int) -> str:
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor:
            amount = size / factor
            return f"{amount:.0f} {unit}" if amount == int(amount) else f"{amount:.1f} {unit}"
    return f"{size} B"


def format_cpus(cpus: float) -> str:
    return str(int(cpus)) if cpus == int(cpus) else f"{cpus:g}"
