"""Sandbox backends: how a job's runner process is started and contained.

One small interface (in the spirit of Woodpecker's backend interface): `probe` says whether the backend
can work on this machine (checked at start-up, so a misconfigured agent refuses to start instead of
failing every job), `start` launches the runner for a spec, and `kill`/`wait` end it. Every backend runs
the same runner code (`kici.runner`) as `kici run local`; only the wrapper around it differs.
"""

from __future__ import annotations

from kici.agent.sandbox.base import SandboxBackend, SandboxUnavailable
from kici.agent.sandbox.process import ProcessSandbox
from kici.agent.sandbox.userns import UsernsSandbox

BACKENDS: dict[str, type[SandboxBackend]] = {"process": ProcessSandbox, "userns": UsernsSandbox}


def get_backend(name: str) -> SandboxBackend:
    """The backend called `name`, probed; `SandboxUnavailable` says why it cannot run here."""
    try:
        backend = BACKENDS[name]()
    except KeyError:
        raise SandboxUnavailable(f"unknown sandbox {name!r} (choose from {', '.join(BACKENDS)})") from None
    backend.probe()
    return backend


__all__ = ["BACKENDS", "ProcessSandbox", "SandboxBackend", "SandboxUnavailable", "UsernsSandbox", "get_backend"]
