"""The job state machine and the run result derived from job states.

Every job status write on the orchestrator goes through this table: a write is a guarded
`UPDATE … SET status = :to WHERE id = :id AND status IN allowed_sources(:to)`, so terminal states never
change and late or duplicate agent messages simply update zero rows.

The table is the reference's 25 transitions plus these additions (each needed by a behaviour the
reference describes but its table, which the original never enforced at runtime, does not cover):

- ``STALE`` → ``timed_out_stale`` from ``queued`` (dispatched but never started, or past the queue
  timeout), ``running`` (heartbeat too old), ``recovering`` and ``cancelling`` (the agent went silent
  while the job was still in its hands). Not from ``pending``/``held``/``waiting``: no agent owns those,
  so there is no heartbeat to go stale; their exits are needs decisions, approvals, timers and cancel.
- ``DRIFT_DROP`` → ``drift_dropped`` from ``pending``, ``held``, ``waiting`` and ``queued``: the
  orchestrator drops a job it has not yet handed to a step because the lock file it was planned from no
  longer holds (e.g. a held untrusted-PR run whose workflows changed). A job already running that meets
  drift is *failed* by the agent's drift gate ("lock file is out of date"), not dropped.
- ``pending`` + ``FAIL`` → ``failed``: a job that cannot even be enqueued ("queue full", a lock file
  that cannot be resolved) is recorded failed rather than left pending forever.
- ``running`` + ``SKIP`` → ``skipped``: job rules run on the agent, after the job has started; a failing
  job rule skips the job.
- ``held`` + ``WAIT`` → ``waiting``: a root job of an approved held run whose workflow or job concurrency
  group has no free place waits its turn there, as a job of a run that was never held would; likewise for
  its deployment environment's gate (approvals, wait timer).
- ``held`` + ``FAIL`` → ``failed``: a root job of an approved held run that cannot go on — its deployment
  environment does not exist or refuses the run's ref — fails before any step, as it would unheld.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class JobState(StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    RECOVERING = "recovering"
    CANCELLING = "cancelling"
    HELD = "held"
    WAITING = "waiting"
    SUCCESS = "success"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"
    TIMED_OUT_STALE = "timed_out_stale"
    DRIFT_DROPPED = "drift_dropped"


class JobEvent(StrEnum):
    ENQUEUE = "ENQUEUE"
    CANCEL = "CANCEL"
    SKIP = "SKIP"
    HOLD = "HOLD"
    WAIT = "WAIT"
    APPROVE = "APPROVE"
    REJECT = "REJECT"
    EXPIRE = "EXPIRE"
    TIMER_DONE = "TIMER_DONE"
    START = "START"
    FAIL = "FAIL"
    SUCCEED = "SUCCEED"
    CANCEL_GRACEFUL = "CANCEL_GRACEFUL"
    RECOVER = "RECOVER"
    CANCEL_FORCE = "CANCEL_FORCE"
    COMPLETE = "COMPLETE"
    STALE = "STALE"
    DRIFT_DROP = "DRIFT_DROP"


class RunStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    CANCELLING = "cancelling"
    HELD = "held"
    SUCCESS = "success"
    FAILED = "failed"
    CANCELLED = "cancelled"


class RunTrust(StrEnum):
    """What a source's trust policy decided for the event that created a run."""

    TRUSTED = "trusted"
    UNTRUSTED = "untrusted"
    """Held before anything is dispatched, until approved or rejected (or the hold expires)."""
    APPROVED = "approved"
    """Untrusted code a trusted person approved, at the exact head SHA the run is for."""


class InvalidTransitionError(ValueError):
    """`event` is not allowed in `state`; the caller ignores the message or reports a bug."""

    def __init__(self, state: JobState | str, event: JobEvent | str) -> None:
        self.state = state
        self.event = event
        if str(state) not in _STATE_VALUES:
            why = f"unknown job state {str(state)!r}"
        elif str(event) not in _EVENT_VALUES:
            why = f"unknown job event {str(event)!r}"
        elif str(state) in _TERMINAL_VALUES:
            why = f"{state!s} is terminal"
        else:
            allowed = ", ".join(sorted(e.value for (s, e) in _TABLE if s == state))
            why = f"allowed from {state!s}: {allowed}"
        super().__init__(f"invalid job transition: {event!s} in state {state!s} ({why})")


_S = JobState
_E = JobEvent

REFERENCE_TRANSITIONS: dict[tuple[JobState, JobEvent], JobState] = {
    (_S.PENDING, _E.ENQUEUE): _S.QUEUED,
    (_S.PENDING, _E.CANCEL): _S.CANCELLED,
    (_S.PENDING, _E.SKIP): _S.SKIPPED,
    (_S.PENDING, _E.HOLD): _S.HELD,
    (_S.PENDING, _E.WAIT): _S.WAITING,
    (_S.HELD, _E.APPROVE): _S.QUEUED,
    (_S.HELD, _E.REJECT): _S.CANCELLED,
    (_S.HELD, _E.EXPIRE): _S.CANCELLED,
    (_S.HELD, _E.CANCEL): _S.CANCELLED,
    (_S.WAITING, _E.TIMER_DONE): _S.QUEUED,
    (_S.WAITING, _E.CANCEL): _S.CANCELLED,
    (_S.QUEUED, _E.START): _S.RUNNING,
    (_S.QUEUED, _E.FAIL): _S.FAILED,
    (_S.QUEUED, _E.CANCEL): _S.CANCELLED,
    (_S.RUNNING, _E.SUCCEED): _S.SUCCESS,
    (_S.RUNNING, _E.FAIL): _S.FAILED,
    (_S.RUNNING, _E.CANCEL): _S.CANCELLED,
    (_S.RUNNING, _E.CANCEL_GRACEFUL): _S.CANCELLING,
    (_S.RUNNING, _E.RECOVER): _S.RECOVERING,
    (_S.RECOVERING, _E.START): _S.RUNNING,
    (_S.RECOVERING, _E.FAIL): _S.FAILED,
    (_S.RECOVERING, _E.CANCEL): _S.CANCELLED,
    (_S.CANCELLING, _E.CANCEL_FORCE): _S.CANCELLED,
    (_S.CANCELLING, _E.COMPLETE): _S.CANCELLED,
    (_S.CANCELLING, _E.FAIL): _S.FAILED,
}
"""The 25 transitions of the reference table (`reference/orchestrator.md` §2)."""

ADDED_TRANSITIONS: dict[tuple[JobState, JobEvent], JobState] = {
    **{(s, _E.STALE): _S.TIMED_OUT_STALE for s in (_S.QUEUED, _S.RUNNING, _S.RECOVERING, _S.CANCELLING)},
    **{(s, _E.DRIFT_DROP): _S.DRIFT_DROPPED for s in (_S.PENDING, _S.HELD, _S.WAITING, _S.QUEUED)},
    (_S.PENDING, _E.FAIL): _S.FAILED,
    (_S.RUNNING, _E.SKIP): _S.SKIPPED,
    (_S.HELD, _E.WAIT): _S.WAITING,
    (_S.HELD, _E.FAIL): _S.FAILED,
}
"""Transitions this project adds to the reference table; the module docstring says why."""

_TABLE: dict[tuple[JobState, JobEvent], JobState] = {**REFERENCE_TRANSITIONS, **ADDED_TRANSITIONS}

TRANSITIONS: dict[tuple[JobState, JobEvent], JobState] = dict(_TABLE)
"""Every valid `(state, event) → state` pair (a copy; mutating it changes nothing)."""

TERMINAL_STATES: frozenset[JobState] = frozenset(
    {
        JobState.SUCCESS,
        JobState.FAILED,
        JobState.CANCELLED,
        JobState.SKIPPED,
        JobState.TIMED_OUT_STALE,
        JobState.DRIFT_DROPPED,
    }
)
_TERMINAL_VALUES = frozenset(s.value for s in TERMINAL_STATES)

FAILED_STATES: frozenset[JobState] = frozenset({JobState.FAILED, JobState.TIMED_OUT_STALE, JobState.DRIFT_DROPPED})
"""Terminal states that make the run `failed`."""

NOT_STARTED_STATES: frozenset[JobState] = frozenset(
    {JobState.PENDING, JobState.QUEUED, JobState.HELD, JobState.WAITING}
)
"""Non-terminal states in which no agent has started the job yet."""

_SOURCES: dict[JobState, frozenset[JobState]] = {
    target: frozenset(s for (s, _), t in _TABLE.items() if t == target) for target in JobState
}


_STATE_VALUES = frozenset(s.value for s in JobState)
_EVENT_VALUES = frozenset(e.value for e in JobEvent)


def _state(value: JobState | str) -> JobState:
    # Statuses come back from the database as plain strings; JobState(...) rejects unknown ones.
    return value if isinstance(value, JobState) else JobState(value)


def transition(state: JobState | str, event: JobEvent | str) -> JobState:
    """The state after `event`; `InvalidTransitionError` when the table has no such pair (including an
    unknown state or event string)."""
    try:
        key = (_state(state), JobEvent(event))
    except ValueError:
        raise InvalidTransitionError(state, event) from None
    try:
        return _TABLE[key]
    except KeyError:
        raise InvalidTransitionError(key[0], key[1]) from None


def can_transition(state: JobState | str, event: JobEvent | str) -> bool:
    try:
        transition(state, event)
    except InvalidTransitionError:
        return False
    return True


def is_terminal(state: JobState | str) -> bool:
    return str(state) in _TERMINAL_VALUES


def allowed_sources(target_state: JobState | str) -> frozenset[JobState]:
    """States from which some event leads to `target_state` (empty for `pending`, the initial state)."""
    return _SOURCES[_state(target_state)]


def aggregate_run_status(job_statuses: Iterable[JobState | str]) -> RunStatus:
    """The run status implied by its jobs.

    While any job is non-terminal the run is `pending` if nothing has started yet — every job is
    pending/queued/held/waiting and none has finished — and `running` otherwise. Once all jobs are
    terminal: any failed/timed_out_stale/drift_dropped → `failed`; else any cancelled → `cancelled`;
    else `success` (skipped counts as success, and a run with no jobs is a success).

    The run statuses `held` and `cancelling` are never derived here: they record run-level actions
    (holding an untrusted PR run, a cancel request) that the orchestrator writes itself.
    """
    states = [_state(s) for s in job_statuses]
    if any(s not in TERMINAL_STATES for s in states):
        if all(s in NOT_STARTED_STATES for s in states):
            return RunStatus.PENDING
        return RunStatus.RUNNING
    if any(s in FAILED_STATES for s in states):
        return RunStatus.FAILED
    if any(s == JobState.CANCELLED for s in states):
        return RunStatus.CANCELLED
    return RunStatus.SUCCESS


RUN_TERMINAL_STATUSES: frozenset[RunStatus] = frozenset({RunStatus.SUCCESS, RunStatus.FAILED, RunStatus.CANCELLED})

_RUN_TERMINAL_VALUES = frozenset(s.value for s in RUN_TERMINAL_STATUSES)


def is_run_terminal(status: RunStatus | str) -> bool:
    return str(status) in _RUN_TERMINAL_VALUES
