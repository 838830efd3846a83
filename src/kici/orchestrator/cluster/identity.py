"""This orchestrator's identity in the cluster: its node id and the address shown for it.

The default node id is the host name plus 8 hex digits of the data dir's path hash: stable across
restarts, so a restarted node recognises the connections its previous incarnation held, and different
for two orchestrators on one host with their own data dirs. Uniqueness among live processes is enforced
at start (`Node.join`): a data-dir lock file proves that no live process on this host uses the default
name; anything else waits out the holder's lease and refuses to start if it is renewed.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
from pathlib import Path
from typing import IO

from kici.orchestrator.config import Settings

LOCK_FILE = "node.lock"


def node_name(settings: Settings) -> str:
    if settings.node_name:
        return settings.node_name
    digest = hashlib.sha256(str(settings.data_dir).encode()).hexdigest()[:8]
    return f"{socket.gethostname()}-{digest}"


def node_address(settings: Settings, port: int | None = None) -> str:
    """`KICI_NODE_ADDRESS`, else `http://<host>:<port>` with the listening address when it is a specific one
    (not a wildcard), the host name otherwise."""
    if settings.node_address:
        return settings.node_address
    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else socket.gethostname()
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port if port is not None else settings.port}{settings.base_path}"


def lock_data_dir(data_dir: Path) -> IO[str] | None:
    """An exclusive lock on `<data dir>/node.lock`, held as long as the returned file stays open (the
    kernel drops it when the process dies, however it dies); None when another live process holds it."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    handle = open(data_dir / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 - held open on purpose
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle
