"""Job logs with two orchestrator processes on one PostgreSQL database and a real S3 server (SeaweedFS):
the log is followed through the orchestrator the agent is NOT connected to while the job prints; then the
receiving orchestrator is killed with SIGKILL mid-stream, the agent (given both URLs) fails over to the
other one, and the finished log holds every line exactly once, in order."""

from __future__ import annotations

import secrets
import signal
import uuid
from typing import Any

import httpx
import pytest

from tests.s3server import S3Server

from .conftest import OWNER_TOKEN, System, free_port, wait_for

LINES = 600

WORKFLOW = f'''\
from kici import job, push, step, workflow

ci = workflow("ci", on=[push(branches=["main"])],
              jobs=[job("print", steps=[step("slow", "for i in $(seq 1 {LINES}); do echo line-$i; sleep 0.01; done")])])
'''


def read_log(base: str, run_id: str, job: str, after: int = 0) -> tuple[list[str], int, bool]:
    page = httpx.get(f"{base}/api/v1/admin/runs/{run_id}/jobs/{job}/logs", params={"after": after, "limit": 5000},
                     headers={"Authorization": f"Bearer {OWNER_TOKEN}"}, timeout=30).json()
    return [x["line"] for x in page["lines"]], int(page["next"]), bool(page["complete"])


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_logs_follow_from_another_node_and_survive_kill_9_of_the_receiving_one(
    system: System, s3_server: S3Server
) -> None:
    shared = {**s3_server.orchestrator_env(prefix=f"t-{uuid.uuid4().hex[:10]}"),
              "KICI_SECRET_KEY": secrets.token_hex(32), "KICI_LOG_SEGMENT_BYTES": "4096"}
    a = system.start_orchestrator(**shared, KICI_DATA_DIR=str(system.tmp / "data-a"))
    b_port = free_port()
    b_url = f"http://127.0.0.1:{b_port}"
    system.start_orchestrator(**shared, KICI_DATA_DIR=str(system.tmp / "data-b"), KICI_PORT=str(b_port))
    system.register_source()
    # the agent lists A first: it connects there; B is where it goes when A dies
    system.start_agent("a1", KICI_ORCHESTRATOR_URL=f"{system.url},{b_url}")
    sha = system.commit({".kici/workflows/ci.py": WORKFLOW})
    run = system.wait_run(sha, "running", within=60)

    # follow through B (not the receiving node) until lines flow
    seen: list[str] = []
    cursor = 0

    def more() -> bool:
        nonlocal cursor
        lines, cursor, _ = read_log(b_url, run["id"], "print", cursor)
        seen.extend(lines)
        return any(line.startswith("line-") for line in seen) and len(seen) >= 50

    wait_for(more, within=60, what="lines of the running job, read through the other orchestrator")
    assert [x for x in seen if x.startswith("line-")] == [f"line-{i}" for i in range(1, len(
        [x for x in seen if x.startswith("line-")]) + 1)]

    assert len(seen) < LINES, "the job was still printing when A was killed"
    a.proc.send_signal(signal.SIGKILL)  # mid-stream: chunks it acknowledged are in the database
    a.proc.wait(timeout=10)

    def finished() -> dict[str, Any] | None:
        found = httpx.get(f"{b_url}/api/v1/admin/runs/{run['id']}", timeout=30,
                          headers={"Authorization": f"Bearer {OWNER_TOKEN}"}).json()
        return found if found["status"] in ("success", "failed", "cancelled") else None

    try:
        done = wait_for(finished, within=120, what="the run to finish on the surviving orchestrator")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{system.diagnostics()}") from None
    assert done["status"] == "success", system.diagnostics()
    agent_log = system.agents[0].output()
    assert b_url.replace("http", "ws") + "/ws" in agent_log, "the agent tried the second URL"

    while True:  # the rest of the log, still through B
        lines, cursor, complete = read_log(b_url, run["id"], "print", cursor)
        seen.extend(lines)
        if complete:
            break
    printed = [x for x in seen if x.startswith("line-")]
    assert printed == [f"line-{i}" for i in range(1, LINES + 1)], (len(printed), printed[-3:])
    # a cursor-free read from the start (segments sealed on S3 plus any chunk left) gives the same
    everything: list[str] = []
    after = 0
    while True:
        lines, after, complete = read_log(b_url, run["id"], "print", after)
        everything.extend(lines)
        if complete:
            break
    assert everything == seen
    s3 = s3_server.client()
    prefix = shared["KICI_STORAGE_PREFIX"].strip("/")
    listed = s3.list_objects_v2(Bucket=s3_server.bucket, Prefix=f"{prefix}/logs/{run['id']}/")
    assert listed.get("KeyCount", 0) >= 1, "segments are on the object store"
