"""The agent protocol models: both directions parse strictly, errors are one line, close reasons fit."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kici.engine import protocol as p


def test_round_trip_both_directions() -> None:
    reg = p.AgentRegister(message_id="m1", agent_id="a1", labels=["linux"],
                          in_flight_jobs=[p.InFlightJob(job_id="j", run_id="r")])
    assert p.parse_agent_message(p.encode(reg)) == reg
    auth = p.parse_agent_message('{"type": "auth.request", "token": "kat_x", "protocolVersion": 1}')
    assert isinstance(auth, p.AuthRequest) and auth.protocol_version == 1
    assert json.loads(p.encode(auth))["protocolVersion"] == 1
    dispatch = p.JobDispatch(message_id="m", run_id="r", job_id="j", repo_url="/srv/repo", sha="a" * 40,
                             workflow="ci", job="build", display_name="build (3.11)", matrix={"py": "3.11"},
                             workflow_file=".kici/workflows/ci.py", export="#ci", content_hash="h",
                             event={"type": "push"}, timestamp=1.0)
    assert p.parse_orchestrator_message(p.encode(dispatch)) == dispatch


@pytest.mark.parametrize(("frame", "where"), [
    ("not json", "invalid agent message"),
    ('{"type": "job.ack"}', "job.ack.job_id"),
    ('{"type": "nope"}', "does not match any of the expected tags"),
    ('{"type": "heartbeat", "timestamp": 1, "extra": 1}', "heartbeat.extra"),
    ('{"type": "agent.status", "active_jobs": -1}', "active_jobs"),
    ('[]', "invalid agent message"),
])
def test_bad_frames_give_one_line_errors(frame: str, where: str) -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.parse_agent_message(frame)
    assert where in str(info.value) and "\n" not in str(info.value)


@given(st.text(max_size=200))
def test_junk_only_raises_protocol_error(frame: str) -> None:
    try:
        p.parse_agent_message(frame)
    except p.ProtocolError:
        pass


def test_close_reason_is_cut_to_123_bytes_on_a_character_boundary() -> None:
    reason = p.close_reason("é" * 100)
    assert len(reason.encode()) <= 123 and reason == "é" * 61
    assert p.CloseCode.DISPATCH_ACK_TIMEOUT == 4031
