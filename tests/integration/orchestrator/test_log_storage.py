"""Job logs on the database and the blob store: chunks, replays, cursors, sealing thresholds, retention,
legacy files, and two stores (two orchestrators) on one database — on SQLite and PostgreSQL, with the
filesystem blob store and (one test) SeaweedFS."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import log_chunks, log_segments
from kici.orchestrator.storage.blobs import BlobStore, read_all
from kici.orchestrator.storage.blobs_fs import FilesystemBlobStore
from kici.orchestrator.storage.blobs_s3 import S3BlobStore
from kici.orchestrator.storage.logs import LogStore
from tests.s3server import S3Server


@pytest.fixture
async def blobs(tmp_path: Path) -> AsyncIterator[BlobStore]:
    store = FilesystemBlobStore(tmp_path / "blobs")
    yield store
    await store.close()


def new_store(database: Database, blobs: BlobStore, **kw: object) -> LogStore:
    return LogStore(database, blobs, **kw)  # type: ignore[arg-type]


async def read_all_lines(logs: LogStore, run: str, job: str, *, limit: int = 1000) -> list[tuple[int, int, str]]:
    out: list[tuple[int, int, str]] = []
    cursor = 0
    while True:
        page = await logs.read(run, job, after=cursor, limit=limit)
        out.extend((x.n, x.step, x.line) for x in page.lines)
        if page.at_end:
            return out
        assert page.lines, "not at the end, yet no lines"
        cursor = page.next


async def counts(database: Database, job: str) -> tuple[int, int]:
    async with database.read() as conn:
        chunks = (await conn.execute(sa.select(sa.func.count()).where(log_chunks.c.job_id == job))).scalar_one()
        segments = (await conn.execute(sa.select(sa.func.count()).where(log_segments.c.job_id == job))).scalar_one()
    return int(chunks), int(segments)


async def test_append_read_follow_and_cursor_round_trip(database: Database, blobs: BlobStore) -> None:
    logs = new_store(database, blobs)
    assert await logs.append("r1", "j1", 0, ["a", "b"], 0)
    first = await logs.read("r1", "j1")
    assert [(x.n, x.step, x.line) for x in first.lines] == [(1, 0, "a"), (2, 0, "b")] and first.at_end
    assert await logs.append("r1", "j1", 1, ["c"], 1)
    follow = await logs.read("r1", "j1", after=first.next)  # the cursor passed back: only what is new
    assert [(x.n, x.step, x.line) for x in follow.lines] == [(3, 1, "c")] and follow.at_end
    again = await logs.read("r1", "j1", after=follow.next)
    assert again.lines == [] and again.at_end and again.next == follow.next
    await logs.close()


async def test_a_replayed_seq_is_stored_once_also_by_another_store(database: Database, blobs: BlobStore) -> None:
    one = new_store(database, blobs)
    assert await one.append("r1", "j1", 0, ["a"], 0)
    assert await one.append("r1", "j1", 0, ["b"], 1)
    assert not await one.append("r1", "j1", 0, ["b"], 1)
    await one.flush()
    other = new_store(database, blobs)  # the agent reconnected to another orchestrator and replays seq 1
    assert not await other.append("r1", "j1", 0, ["b"], 1)
    assert await other.append("r1", "j1", 0, ["c"], 2)
    await other.flush()  # what another orchestrator reads is what this one wrote to the database
    assert [x[2] for x in await read_all_lines(one, "r1", "j1")] == ["a", "b", "c"]
    assert [x[0] for x in await read_all_lines(other, "r1", "j1")] == [1, 2, 3]
    await one.close()
    await other.close()


async def test_forget_reloads_numbering_written_elsewhere(database: Database, blobs: BlobStore) -> None:
    one, other = new_store(database, blobs), new_store(database, blobs)
    await one.append("r1", "j1", 0, ["a"], 0)
    await one.flush()
    await other.append("r1", "j1", 0, ["b", "c"], 1)  # the agent moved to `other` for a while
    await other.flush()
    await one.forget(["j1"])  # ... and came back: `one` must not number from its stale state
    await one.append("r1", "j1", 0, ["d"], 2)
    assert await read_all_lines(one, "r1", "j1") == [(1, 0, "a"), (2, 0, "b"), (3, 0, "c"), (4, 0, "d")]
    await one.close()
    await other.close()


async def test_pages_of_a_limit_and_whole_log_after_sealing(database: Database, blobs: BlobStore) -> None:
    logs = new_store(database, blobs, segment_bytes=4096)
    expected = []
    for seq in range(60):
        lines = [f"line {seq}-{i}" for i in range(20)]
        await logs.append("r1", "j1", seq % 3, lines, seq)
        expected.extend(lines)
    await logs.flush()
    sealed = await logs.seal("r1", "j1")  # 60 chunks of ~260 bytes into segments of at most 4 KiB
    assert sealed >= 4 and await counts(database, "j1") == (0, sealed)
    await logs.append("r1", "j1", 0, ["tail"], 60)  # one more chunk, not sealed
    got = await read_all_lines(logs, "r1", "j1", limit=7)
    assert [x[2] for x in got] == [*expected, "tail"] and [x[0] for x in got] == list(range(1, 1202))
    page = await logs.read("r1", "j1", after=await logs.seek_line("r1", "j1", 555), limit=3)
    assert page.lines[0].n == 555 and page.lines[0].line == expected[554]
    assert await logs.line_count("r1", "j1") == 1201
    assert [x.line for x in await logs.tail("r1", "j1", lines=2)] == [expected[-1], "tail"]
    found, more = await logs.search("r1", "j1", "LINE 59-1", limit=5)
    assert [x.line for x in found] == ["line 59-1", *(f"line 59-{i}" for i in range(10, 14))] and more
    await logs.close()


async def test_size_threshold_seals_while_the_job_runs_and_end_seals_the_rest(
    database: Database, blobs: BlobStore
) -> None:
    logs = new_store(database, blobs, segment_bytes=4096)
    logs.start()
    try:
        for seq in range(40):
            await logs.append("r1", "j1", 0, ["x" * 100] * 5, seq)  # ~500 bytes a chunk: 4 KiB every ~8
        for _ in range(200):
            chunks, segments = await counts(database, "j1")
            if segments >= 3:
                break
            await asyncio.sleep(0.02)
        assert segments >= 3 and chunks < 40, (chunks, segments)
        logs.finish("r1", "j1")
        for _ in range(200):
            chunks, segments = await counts(database, "j1")
            if chunks == 0:
                break
            await asyncio.sleep(0.02)
        assert chunks == 0
        assert len(await read_all_lines(logs, "r1", "j1")) == 200
        keys = [info.key for info in await blobs.list("logs/r1/j1/")]
        assert len(keys) == segments and all(k.endswith(".ndjson") for k in keys)
        record = json.loads((await read_all(await blobs.open(keys[0]))).splitlines()[0])
        assert record == {"seq": 0, "step": 0, "n": 1, "lines": ["x" * 100] * 5}
    finally:
        await logs.close()


async def test_age_threshold_seals_chunks_any_store_received(database: Database, blobs: BlobStore) -> None:
    receiver = new_store(database, blobs)
    await receiver.append("r1", "j1", 0, ["old"], 0)
    await receiver.flush()  # then the receiving orchestrator dies: nobody will call finish()
    sweeper = new_store(database, blobs, segment_max_age_s=60)
    assert await sweeper.seal_old() == 0  # young chunks stay in the database
    async with database.transaction() as conn:
        await conn.execute(log_chunks.update().values(created_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=2)))
    assert await sweeper.seal_old() == 1
    assert await counts(database, "j1") == (0, 1)
    assert [x[2] for x in await read_all_lines(receiver, "r1", "j1")] == ["old"]


async def test_two_sealers_racing_keep_every_line_once(database: Database, blobs: BlobStore) -> None:
    one, other = new_store(database, blobs, segment_bytes=4096), new_store(database, blobs, segment_bytes=4096)
    for seq in range(50):
        await one.append("r1", "j1", 0, [f"{seq}-{i}" for i in range(30)], seq)
    await one.flush()
    await asyncio.gather(one.seal("r1", "j1"), other.seal("r1", "j1"), one.seal("r1", "j1"))
    await other.seal("r1", "j1")
    assert (await counts(database, "j1"))[0] == 0
    assert [x[0] for x in await read_all_lines(other, "r1", "j1")] == list(range(1, 1501))


async def test_delete_run_removes_chunks_segments_and_blobs(database: Database, blobs: BlobStore) -> None:
    logs = new_store(database, blobs)
    await logs.append("r1", "j1", 0, ["sealed"], 0)
    await logs.flush()
    await logs.seal("r1", "j1")
    await logs.append("r1", "j1", 0, ["pending"], 1)
    await logs.append("r2", "j2", 0, ["kept"], 0)
    await logs.delete_run("r1")
    assert await counts(database, "j1") == (0, 0)
    assert await blobs.list("logs/r1/") == []
    assert (await logs.read("r1", "j1")).lines == []
    assert [x.line for x in (await logs.read("r2", "j2")).lines] == ["kept"]


async def test_legacy_log_files_are_imported_and_read(database: Database, blobs: BlobStore, tmp_path: Path) -> None:
    root = tmp_path / "old-logs"
    (root / "r1").mkdir(parents=True)
    records = [{"seq": 0, "step": -1, "n": 1, "lines": ["setup"]}, {"seq": 1, "step": 0, "n": 2, "lines": ["a", "b"]}]
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"seq": 2, "st'  # a record torn by a crash
    (root / "r1" / "j1.ndjson").write_text(text)
    (root / "r1" / "j2.ndjson").write_text(json.dumps({"seq": 0, "step": 0, "n": 1, "lines": ["bg"]}) + "\n")
    logs = new_store(database, blobs, legacy_root=root)
    # read before the background import: imported on demand
    assert await read_all_lines(logs, "r1", "j1") == [(1, -1, "setup"), (2, 0, "a"), (3, 0, "b")]
    assert not (root / "r1" / "j1.ndjson").exists()
    # the job goes on (an agent replaying seq 1, then a new chunk): numbering continues
    assert not await logs.append("r1", "j1", 0, ["b"], 1)
    assert await logs.append("r1", "j1", 0, ["c"], 2)
    assert [x[0] for x in await read_all_lines(logs, "r1", "j1")] == [1, 2, 3, 4]
    logs.start()  # the start-up import takes the rest
    try:
        for _ in range(200):
            if not (root / "r1").exists():
                break
            await asyncio.sleep(0.02)
        assert not (root / "r1").exists()
        assert await counts(database, "j2") == (0, 1)
        assert [x.line for x in (await logs.read("r1", "j2")).lines] == ["bg"]
    finally:
        await logs.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_wait_for_data_wakes_on_a_local_write_and_times_out_otherwise(
    database: Database, blobs: BlobStore
) -> None:
    logs = new_store(database, blobs)
    assert not await logs.wait_for_data("j1", timeout=0.05)
    waiter = asyncio.create_task(logs.wait_for_data("j1", timeout=5))
    await asyncio.sleep(0)
    await logs.append("r1", "j1", 0, ["x"], 0)
    await logs.flush()
    assert await asyncio.wait_for(waiter, 2)
    other = asyncio.create_task(logs.wait_for_data("j1", timeout=5))
    await asyncio.sleep(0)
    logs.notify_appended("j1")  # the hook a cross-node bus calls
    assert await asyncio.wait_for(other, 2)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_unusable_ids_are_refused(database: Database, blobs: BlobStore) -> None:
    logs = new_store(database, blobs)
    for bad in ("../x", "", "a/b", ".."):
        with pytest.raises(ValueError):
            await logs.append(bad, "j1", 0, ["x"], 0)
        with pytest.raises(ValueError):
            await logs.read("r1", bad)


async def test_a_failed_write_is_reported_and_the_chunks_kept(database: Database, blobs: BlobStore) -> None:
    logs = new_store(database, blobs)
    await logs.append("r1", "j1", 0, ["a"], 0)
    async with database.transaction() as conn:  # the table is gone for a moment: every insert fails
        await conn.execute(sa.text("ALTER TABLE log_chunks RENAME TO log_chunks_away"))
    try:
        with pytest.raises(OSError, match="storing 1 job log chunks failed"):
            await logs.flush()
    finally:
        async with database.transaction() as conn:
            await conn.execute(sa.text("ALTER TABLE log_chunks_away RENAME TO log_chunks"))
    await logs.flush()  # the chunk was kept and is written now
    assert [x.line for x in (await logs.read("r1", "j1")).lines] == ["a"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_segments_on_s3(database: Database, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in s3_server.aws_env.items():
        monkeypatch.setenv(name, value)
    s3 = S3BlobStore(bucket=s3_server.bucket, prefix=f"t-{uuid.uuid4().hex[:12]}", endpoint=s3_server.endpoint,
                     force_path_style=True)
    try:
        logs = new_store(database, s3, segment_bytes=4096)
        for seq in range(30):
            await logs.append("r1", "j1", 0, [f"{seq}:{'y' * 40}"] * 10, seq)
        await logs.flush()
        assert await logs.seal("r1", "j1") >= 2
        reader = new_store(database, s3)  # another orchestrator, cold cache
        got = await read_all_lines(reader, "r1", "j1", limit=100)
        assert len(got) == 300 and got[-1][2].startswith("29:")
        await logs.delete_run("r1")
        assert await s3.list("logs/r1/") == []
    finally:
        await s3.close()
