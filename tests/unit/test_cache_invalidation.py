"""What a `source.changed` message drops from a node's caches, and how log wake-ups are cut to fit NOTIFY."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from kici.orchestrator.cluster.bus import NOTIFY_MAX_BYTES
from kici.orchestrator.ingest.lockcache import LockFileCache
from kici.orchestrator.ingest.service import Ingest
from kici.orchestrator.storage.log_wakeups import _batches


async def _value(value: bytes | None) -> bytes | None:
    return value


async def test_forget_source_drops_that_sources_lock_files_and_secrets_only(tmp_path: Path) -> None:
    ingest = Ingest(cache=LockFileCache(100, 3_600_000), mirror_root=tmp_path)
    for key, value in (("github:s1:o/r:" + "a" * 40, None), ("git:s1:r:" + "b" * 40, b"{}"),
                       ("github:s10:o/r:" + "a" * 40, b"{}"), ("git:s2:r:" + "b" * 40, None)):
        await ingest.cache.get(key, lambda v=value: _value(v))  # type: ignore[misc]
    now = dt.datetime.now(dt.UTC)
    ingest.secrets.update({("s1", now): {"k": "v"}, ("s10", now): {"k": "w"}})

    ingest.forget_source("s1")

    assert len(ingest.cache) == 2  # s10 is another source, not a prefix match
    misses = ingest.cache.misses
    assert await ingest.cache.get("github:s10:o/r:" + "a" * 40, lambda: _value(b"x")) == b"{}"
    assert await ingest.cache.get("github:s1:o/r:" + "a" * 40, lambda: _value(b"fresh")) == b"fresh"
    assert ingest.cache.misses == misses + 1
    assert list(ingest.secrets) == [("s10", now)]


def test_log_wakeup_batches_fit_a_notify_payload() -> None:
    ids = [f"job-{i:036d}" for i in range(1000)]
    batches = _batches(ids)
    assert [i for batch in batches for i in batch] == ids and len(batches) > 1
    for batch in batches:
        message = json.dumps({"o": "n" * 60, "i": None, "t": "job-log", "p": {"job_ids": batch}},
                             separators=(",", ":"))  # as the bus sends it
        assert len(message.encode()) <= NOTIFY_MAX_BYTES
    assert _batches([]) == [] and _batches(["one"]) == [["one"]]
