from __future__ import annotations

import itertools

import pytest

from kici.engine.states import (
    ADDED_TRANSITIONS,
    REFERENCE_TRANSITIONS,
    TERMINAL_STATES,
    TRANSITIONS,
    InvalidTransitionError,
    JobEvent,
    JobState,
    RunStatus,
    aggregate_run_status,
    allowed_sources,
    can_transition,
    is_run_terminal,
    is_terminal,
    transition,
)

S, E = JobState, JobEvent

# The reference table (reference/orchestrator.md §2), written out independently of the module.
REFERENCE = [
    ("pending", "ENQUEUE", "queued"),
    ("pending", "CANCEL", "cancelled"),
    ("pending", "SKIP", "skipped"),
    ("pending", "HOLD", "held"),
    ("pending", "WAIT", "waiting"),
    ("held", "APPROVE", "queued"),
    ("held", "REJECT", "cancelled"),
    ("held", "EXPIRE", "cancelled"),
    ("held", "CANCEL", "cancelled"),
    ("waiting", "TIMER_DONE", "queued"),
    ("waiting", "CANCEL", "cancelled"),
    ("queued", "START", "running"),
    ("queued", "FAIL", "failed"),
    ("queued", "CANCEL", "cancelled"),
    ("running", "SUCCEED", "success"),
    ("running", "FAIL", "failed"),
    ("running", "CANCEL", "cancelled"),
    ("running", "CANCEL_GRACEFUL", "cancelling"),
    ("running", "RECOVER", "recovering"),
    ("recovering", "START", "running"),
    ("recovering", "FAIL", "failed"),
    ("recovering", "CANCEL", "cancelled"),
    ("cancelling", "CANCEL_FORCE", "cancelled"),
    ("cancelling", "COMPLETE", "cancelled"),
    ("cancelling", "FAIL", "failed"),
]

ADDED = [
    ("queued", "STALE", "timed_out_stale"),
    ("running", "STALE", "timed_out_stale"),
    ("recovering", "STALE", "timed_out_stale"),
    ("cancelling", "STALE", "timed_out_stale"),
    ("pending", "DRIFT_DROP", "drift_dropped"),
    ("held", "DRIFT_DROP", "drift_dropped"),
    ("waiting", "DRIFT_DROP", "drift_dropped"),
    ("queued", "DRIFT_DROP", "drift_dropped"),
    ("pending", "FAIL", "failed"),
    ("running", "SKIP", "skipped"),
    ("held", "WAIT", "waiting"),
    ("held", "FAIL", "failed"),
]
VALID = {(s, e): t for s, e, t in REFERENCE + ADDED}


def test_enums_have_the_documented_members() -> None:
    assert {s.value for s in JobState} == {
        "pending", "queued", "running", "recovering", "cancelling", "held", "waiting",
        "success", "failed", "cancelled", "skipped", "timed_out_stale", "drift_dropped",
    }  # fmt: skip
    reference_events = {
        "ENQUEUE", "CANCEL", "SKIP", "HOLD", "WAIT", "APPROVE", "REJECT", "EXPIRE", "TIMER_DONE",
        "START", "FAIL", "SUCCEED", "CANCEL_GRACEFUL", "RECOVER", "CANCEL_FORCE", "COMPLETE",
    }  # fmt: skip
    assert len(reference_events) == 16
    assert {e.value for e in JobEvent} == reference_events | {"STALE", "DRIFT_DROP"}
    assert [s.value for s in RunStatus] == [
        "pending", "running", "cancelling", "held", "success", "failed", "cancelled",
    ]  # fmt: skip


def test_reference_table_is_exactly_the_25_pairs() -> None:
    assert len(REFERENCE) == 25
    assert {(s.value, e.value): t.value for (s, e), t in REFERENCE_TRANSITIONS.items()} == {
        (s, e): t for s, e, t in REFERENCE
    }
    assert {(s.value, e.value): t.value for (s, e), t in ADDED_TRANSITIONS.items()} == {(s, e): t for s, e, t in ADDED}
    assert not set(REFERENCE_TRANSITIONS) & set(ADDED_TRANSITIONS)


@pytest.mark.parametrize(("state", "event", "target"), REFERENCE + ADDED)
def test_each_valid_pair_gives_its_result(state: str, event: str, target: str) -> None:
    assert transition(state, event) == target
    assert transition(JobState(state), JobEvent(event)) is JobState(target)
    assert can_transition(state, event)


def test_every_other_pair_raises() -> None:
    checked = 0
    for state, event in itertools.product(JobState, JobEvent):
        if (state.value, event.value) in VALID:
            continue
        checked += 1
        with pytest.raises(InvalidTransitionError) as info:
            transition(state, event)
        assert info.value.state == state
        assert info.value.event == event
        assert state.value in str(info.value) and event.value in str(info.value)
        assert not can_transition(state, event)
    assert checked == len(JobState) * len(JobEvent) - len(VALID)


@pytest.mark.parametrize("state", sorted(TERMINAL_STATES))
def test_terminal_states_reject_every_event(state: JobState) -> None:
    assert is_terminal(state) and is_terminal(state.value)
    for event in JobEvent:
        with pytest.raises(InvalidTransitionError, match="is terminal"):
            transition(state, event)


def test_terminal_set() -> None:
    assert {s.value for s in TERMINAL_STATES} == {
        "success", "failed", "cancelled", "skipped", "timed_out_stale", "drift_dropped",
    }  # fmt: skip
    for state in set(JobState) - TERMINAL_STATES:
        assert not is_terminal(state)


def test_error_is_a_value_error_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match=r"invalid job transition: SUCCEED in state queued") as info:
        transition("queued", "SUCCEED")
    assert "allowed from queued:" in str(info.value)
    assert "START" in str(info.value)


def test_unknown_strings_raise_invalid_transition() -> None:
    with pytest.raises(InvalidTransitionError, match="unknown job state 'bogus'"):
        transition("bogus", "START")
    with pytest.raises(InvalidTransitionError, match="unknown job event 'JUMP'"):
        transition("queued", "JUMP")
    assert not can_transition("bogus", "START")


def test_transitions_export_is_a_copy() -> None:
    TRANSITIONS[(S.SUCCESS, E.START)] = S.RUNNING
    try:
        with pytest.raises(InvalidTransitionError):
            transition(S.SUCCESS, E.START)
    finally:
        del TRANSITIONS[(S.SUCCESS, E.START)]


def test_allowed_sources_match_the_table() -> None:
    for target in JobState:
        expected = {JobState(s) for (s, _), t in VALID.items() if t == target.value}
        assert allowed_sources(target) == expected
        assert allowed_sources(target.value) == expected
    assert allowed_sources("pending") == frozenset()
    assert allowed_sources("running") == {S.QUEUED, S.RECOVERING}
    assert allowed_sources("timed_out_stale") == {S.QUEUED, S.RUNNING, S.RECOVERING, S.CANCELLING}
    assert allowed_sources("cancelled") == {S.PENDING, S.HELD, S.WAITING, S.QUEUED, S.RUNNING,
                                            S.RECOVERING, S.CANCELLING}  # fmt: skip
    # A guarded UPDATE never moves a terminal row.
    for target in JobState:
        assert not allowed_sources(target) & TERMINAL_STATES


def test_late_success_after_stale_is_rejected() -> None:
    state = transition("running", "STALE")
    assert state == "timed_out_stale"
    assert not can_transition(state, "SUCCEED")
    assert state not in allowed_sources("success")


def test_full_happy_and_recovery_paths() -> None:
    state: JobState = S.PENDING
    for event in (E.HOLD, E.APPROVE, E.START, E.RECOVER, E.START, E.CANCEL_GRACEFUL, E.COMPLETE):
        state = transition(state, event)
    assert state is S.CANCELLED


# ---------------------------------------------------------------------------------------------- run status


@pytest.mark.parametrize(
    ("jobs", "expected"),
    [
        (["success", "skipped"], "success"),
        (["success", "cancelled"], "cancelled"),
        (["cancelled", "timed_out_stale"], "failed"),
        ([], "success"),
        (["skipped"], "success"),
        (["success", "failed", "cancelled"], "failed"),
        (["drift_dropped", "success"], "failed"),
        (["cancelled", "skipped"], "cancelled"),
        (["pending"], "pending"),
        (["pending", "queued", "held", "waiting"], "pending"),
        (["queued", "running"], "running"),
        (["success", "pending"], "running"),  # something finished: the run has started
        (["failed", "pending"], "running"),
        (["recovering"], "running"),
        (["cancelling", "cancelled"], "running"),
    ],
)
def test_aggregate_run_status(jobs: list[str], expected: str) -> None:
    assert aggregate_run_status(jobs) == expected
    assert aggregate_run_status(JobState(j) for j in jobs) is RunStatus(expected)


def test_aggregate_rejects_unknown_status() -> None:
    with pytest.raises(ValueError):
        aggregate_run_status(["success", "exploded"])


def test_run_terminal() -> None:
    assert {s for s in RunStatus if is_run_terminal(s)} == {"success", "failed", "cancelled"}
    assert is_run_terminal("failed") and not is_run_terminal("cancelling")
