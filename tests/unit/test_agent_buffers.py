"""The agent's pure buffering logic: log chunking with the per-step cap, and the offline outbox
(bounds, drops, gap marker placement, seq numbering)."""

from __future__ import annotations

import pytest

from kici.agent.connection import MAX_BUFFERED_EVENTS, MAX_BUFFERED_LOG_LINES, Connection, Item
from kici.agent.logs import LogStreamer, truncation_line
from kici.engine import protocol as p


def test_chunks_hold_at_most_50_lines_and_keep_order() -> None:
    chunks: list[tuple[int, list[str]]] = []
    streamer = LogStreamer(lambda i, lines: chunks.append((i, lines)), 10_000_000)
    for n in range(120):
        streamer.add(0, f"l{n}")
    streamer.add(1, "other")
    streamer.flush()
    assert [len(lines) for _, lines in chunks] == [50, 50, 20, 1]
    assert [x for i, lines in chunks if i == 0 for x in lines] == [f"l{n}" for n in range(120)]


def test_cap_is_per_step_checked_before_adding_and_truncates_once() -> None:
    chunks: list[tuple[int, list[str]]] = []
    streamer = LogStreamer(lambda i, lines: chunks.append((i, lines)), 20)
    for line in ("123456789", "123456789", "x", "more", "and more"):  # 10 + 10 bytes fill the cap exactly
        streamer.add(0, line)
    streamer.add(1, "fits")
    streamer.flush()
    step0 = [x for i, lines in chunks if i == 0 for x in lines]
    assert step0 == ["123456789", "123456789", truncation_line(20)]
    assert [x for i, lines in chunks if i == 1 for x in lines] == ["fits"]
    assert streamer.lines_dropped == 3


class _Hooks:
    def registration(self) -> p.AgentRegister:
        return p.AgentRegister(message_id="m", agent_id="a")

    def agent_status(self) -> p.AgentStatus:
        return p.AgentStatus(active_jobs=0)

    def running_jobs(self) -> list[tuple[str, str]]:
        return []

    def on_registered(self, ack: p.RegisterAck, in_flight: list[p.InFlightJob]) -> set[str]:
        return set()

    def on_message(self, message: p.OrchestratorMessage) -> None:
        pass

    def on_delivered(self, job_id: str) -> None:
        pass


@pytest.fixture
def conn() -> Connection:
    return Connection(["ws://x/ws"], "t", _Hooks(), heartbeat_interval_s=30, job_heartbeat_interval_s=30,
                      max_reconnect_delay_ms=1000)


def _status(job: str) -> p.StepStatusUpdate:
    return p.StepStatusUpdate(run_id="r", job_id=job, step_index=0, step_name="s", state="running", timestamp=0)


def test_offline_buffer_drops_oldest_logs_and_events_but_never_terminal_statuses(conn: Connection) -> None:
    conn.send_job("j", "r", p.JobStatusUpdate(run_id="r", job_id="j", state="success", timestamp=0), terminal=True)
    for n in range(MAX_BUFFERED_LOG_LINES // 50 + 10):
        conn.send_log("j", "r", 0, [f"{n}-{k}" for k in range(50)])
    for _ in range(MAX_BUFFERED_EVENTS + 3):
        conn.send_job("j", "r", _status("j"))
    conn.send_job("j", "r", p.JobHeartbeat(run_id="r", job_id="j", timestamp=0))  # not buffered
    conn.send_control(p.AgentStatus(active_jobs=1))  # not buffered
    items = [i for i in conn._items if not i.dropped]
    assert items[0].kind == "terminal"
    assert sum(len(i.lines) for i in items if i.kind == "log") == MAX_BUFFERED_LOG_LINES
    assert sum(1 for i in items if i.kind == "event") == MAX_BUFFERED_EVENTS
    assert {i.kind for i in items} == {"terminal", "log", "event"}
    first_log = next(i for i in items if i.kind == "log")
    assert first_log.lines[0] == "10-0"  # the ten oldest chunks went
    assert conn.lines_dropped == 500 and conn.events_dropped == 3


def test_gap_marker_goes_after_resent_chunks_and_before_the_buffered_ones(conn: Connection) -> None:
    sent = Item("log", job_id="j", run_id="r", step_index=0, lines=["sent-before"])
    conn._build(sent)  # gets seq 0, as if sent on the old connection but never confirmed
    conn._unconfirmed.append(sent)
    conn._went_offline()
    for _ in range(MAX_BUFFERED_EVENTS + 1):  # one status event too many: the oldest event is dropped
        conn.send_job("j", "r", _status("j"))
    conn.send_log("j", "r", 0, ["buffered"])
    conn.send_log("k", "r2", 0, ["other job, nothing dropped"])
    conn._prepare_replay()
    items = list(conn._items)
    markers = [n for n, item in enumerate(items) if item.lines and item.lines[0].startswith("--- orchestrator")]
    assert markers == [1]  # after the resent chunk (which keeps its lower seq), before everything buffered
    assert items[0] is sent and items[1].job_id == "j"
    assert "1 status events and 0 log lines were dropped" in items[1].lines[0]
    built = [conn._build(item) for item in items if item.job_id == "j"]
    assert [m.seq for m in built if isinstance(m, p.LogChunk)] == [0, 1, 2]


def test_dropped_log_chunks_are_counted_per_job(conn: Connection) -> None:
    for n in range(MAX_BUFFERED_LOG_LINES // 50 + 2):
        conn.send_log("j", "r", 0, [f"{n}-{k}" for k in range(50)])
    conn._prepare_replay()
    marker = conn._items[0]
    assert marker.lines[0].endswith("0 status events and 100 log lines were dropped ---")
