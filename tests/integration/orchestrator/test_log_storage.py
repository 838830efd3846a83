"""The filesystem log storage: chunks, replays, cursors, restarts, torn records and unsafe ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from kici.orchestrator.storage.logs import FilesystemLogStorage


async def test_append_read_and_follow(tmp_path: Path) -> None:
    logs = FilesystemLogStorage(tmp_path)
    assert await logs.append("r1", "j1", -1, ["cloning"], 0)
    assert await logs.append("r1", "j1", 0, ["a", "b"], 1)
    page = await logs.read("r1", "j1")
    assert [(x.n, x.step, x.line) for x in page.lines] == [(1, -1, "cloning"), (2, 0, "a"), (3, 0, "b")]
    assert page.at_end
    empty = await logs.read("r1", "j1", after=page.next)
    assert empty.lines == [] and empty.next == page.next and empty.at_end
    assert await logs.append("r1", "j1", 1, ["c"], 2)
    more = await logs.read("r1", "j1", after=page.next)
    assert [(x.n, x.line) for x in more.lines] == [(4, "c")]
    logs.close()


async def test_replayed_seq_is_dropped_also_after_a_restart(tmp_path: Path) -> None:
    logs = FilesystemLogStorage(tmp_path)
    assert await logs.append("r1", "j1", 0, ["one"], 0)
    assert await logs.append("r1", "j1", 0, ["two", "three"], 1)
    assert not await logs.append("r1", "j1", 0, ["two", "three"], 1)
    logs.close()
    restarted = FilesystemLogStorage(tmp_path)
    assert not await restarted.append("r1", "j1", 0, ["one"], 0)
    assert await restarted.append("r1", "j1", 0, ["four"], 2)
    page = await restarted.read("r1", "j1")
    assert [(x.n, x.line) for x in page.lines] == [(1, "one"), (2, "two"), (3, "three"), (4, "four")]
    restarted.close()


async def test_limit_pages_whole_chunks(tmp_path: Path) -> None:
    logs = FilesystemLogStorage(tmp_path, open_files=1)
    for seq in range(5):
        await logs.append("r1", "j1", 0, [f"{seq}-{i}" for i in range(3)], seq)
        await logs.append("r1", "j2", 0, ["other"], seq)  # evicts j1's open file every time
    seen: list[str] = []
    after = 0
    while True:
        page = await logs.read("r1", "j1", after=after, limit=4)
        seen += [x.line for x in page.lines]
        after = page.next
        if page.at_end:
            break
    assert seen == [f"{seq}-{i}" for seq in range(5) for i in range(3)]
    logs.close()


async def test_torn_record_is_skipped(tmp_path: Path) -> None:
    logs = FilesystemLogStorage(tmp_path)
    await logs.append("r1", "j1", 0, ["ok"], 0)
    logs.close()
    with open(tmp_path / "r1" / "j1.ndjson", "ab") as handle:
        handle.write(b'{"seq": 1, "st\n')
    page = await FilesystemLogStorage(tmp_path).read("r1", "j1")
    assert [x.line for x in page.lines] == ["ok"] and page.at_end


async def test_missing_log_reads_empty(tmp_path: Path) -> None:
    page = await FilesystemLogStorage(tmp_path).read("r1", "nothing")
    assert page.lines == [] and page.at_end and page.next == 0


@pytest.mark.parametrize("bad", ["..", "../x", "a/b", "", ".hidden"])
async def test_ids_that_could_escape_the_root_are_refused(tmp_path: Path, bad: str) -> None:
    logs = FilesystemLogStorage(tmp_path / "logs")
    with pytest.raises(ValueError, match="not a usable"):
        await logs.append(bad, "j1", 0, ["x"], 0)
    with pytest.raises(ValueError, match="not a usable"):
        await logs.read("r1", bad)
    assert not (tmp_path / "logs").exists()


async def test_delete_run(tmp_path: Path) -> None:
    logs = FilesystemLogStorage(tmp_path)
    await logs.append("r1", "j1", 0, ["x"], 0)
    await logs.delete_run("r1")
    assert not (tmp_path / "r1").exists()
    assert (await logs.read("r1", "j1")).lines == []


async def test_a_write_failure_is_reported_not_swallowed(tmp_path: Path) -> None:
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the log directory should be")
    logs = FilesystemLogStorage(blocker)
    assert await logs.append("r1", "j1", 0, ["lost"], 0)  # handed to the writer thread, which fails
    await logs.read("r1", "j1")  # waits until the writer has tried
    with pytest.raises(OSError, match=r"writing job logs under .* failed"):
        await logs.append("r1", "j1", 0, ["next"], 1)
    logs.close()
