"""Sandbox backends: how a job's runner is started, contained, stopped and cleaned up.

`base` holds the seam (`SandboxBackend.prepare` → an `Execution` that owns the runner's life) and
documents how a backend fits; `process`, `userns` and `bwrap` are the backends, `limits` the resource
limits every backend applies. Every backend runs the same runner code (`kici.runner`) as `kici run local`;
only what surrounds it differs.
"""

from __future__ import annotations

from kici.agent.sandbox.base import Execution, ExecutionRequest, Network, SandboxBackend, SandboxUnavailable
from kici.agent.sandbox.bwrap import BwrapSandbox
from kici.agent.sandbox.limits import Limiter
from kici.agent.sandbox.process import ProcessSandbox
from kici.agent.sandbox.userns import UsernsSandbox

BACKENDS: dict[str, type[SandboxBackend]] = {"process": ProcessSandbox, "userns": UsernsSandbox, "bwrap": BwrapSandbox}


def get_backend(
    name: str, *, network: Network = "host", limiter: Limiter | None = None, run_as: tuple[int, int] | None = None
) -> SandboxBackend:
    """The backend called `name`, probed for jobs running as `run_as`; `SandboxUnavailable` says why it
    cannot run here."""
    try:
        backend = BACKENDS[name](network=network, limiter=limiter)
    except KeyError:
        raise SandboxUnavailable(f"unknown sandbox {name!r} (choose from {', '.join(BACKENDS)})") from None
    backend.probe(run_as)
    return backend


__all__ = [
    "BACKENDS", "BwrapSandbox", "Execution", "ExecutionRequest", "ProcessSandbox", "SandboxBackend",
    "SandboxUnavailable", "UsernsSandbox", "get_backend",
]
