"""`ctx.cache` in the runner: a step's request goes to the parent (the agent) as a `cache.request` message on
the protocol fd, and the step waits for the `cache.reply` of the same id, which the control thread reads from
stdin and hands over here. The parent does the transfer: the runner holds no credential of any kind."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from typing import Any

from kici.runner.calls import Call, StepAborted
from kici.runner.wire import ProtocolWriter
from kici.sdk.caching import normalize_path
from kici.sdk.context import CacheError

_lock = threading.Lock()
_ids = itertools.count(1)
_pending: dict[int, tuple[threading.Event, list[dict[str, Any]]]] = {}
POLL_S = 0.2


def deliver(message: dict[str, Any]) -> None:
    """A `cache.reply` from the control thread: wake the step waiting for it (a late reply is dropped)."""
    request_id = message.get("id")
    with _lock:
        waiting = _pending.pop(request_id, None) if isinstance(request_id, int) else None
    if waiting is not None:
        waiting[1].append(message)
        waiting[0].set()


def request(protocol: ProtocolWriter, call: Call, step_index: int, op: str, key: Any, paths: Any,
            restore_keys: Any = ()) -> dict[str, Any]:
    """Send the request and wait for its reply (or for the step to be stopped: `StepAborted`)."""
    what = f"ctx.cache.{op}"
    if not isinstance(key, str) or not key.strip():
        raise ValueError(f"{what}: the key must be a non-empty string, not {key!r}")
    if isinstance(paths, str) or not isinstance(paths, Sequence) or not paths:
        raise ValueError(f"{what}: paths must be a non-empty list of workspace paths, not {paths!r}")
    normalized = [normalize_path(p) for p in paths]
    if isinstance(restore_keys, str):
        restore_keys = [restore_keys]
    prefixes = list(restore_keys)
    if not all(isinstance(p, str) and p.strip() for p in prefixes):
        raise ValueError(f"{what}: restore_keys must be non-empty strings, not {restore_keys!r}")
    event = threading.Event()
    box: list[dict[str, Any]] = []
    request_id = next(_ids)
    with _lock:
        _pending[request_id] = (event, box)
    if not protocol.cache_request(request_id, step_index, op, key, normalized, prefixes):
        with _lock:
            _pending.pop(request_id, None)
        raise CacheError(f"{what}: the runner's parent is gone")
    while not event.wait(POLL_S):
        if call.aborted:
            with _lock:
                _pending.pop(request_id, None)
            raise StepAborted(call.reason or "stopped")
    return box[0]
