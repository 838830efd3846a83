"""`needs` evaluation: compile-time validation of the job graph and run-time scheduling decisions.

An edge says "job X needs upstream U, and runs only if U ends in one of `run_on`". At run time a pending
job waits while any upstream is non-terminal, is skipped if some upstream ended outside its `run_on`,
and is otherwise ready. Skips cascade: a skipped job is itself an upstream with status `skipped`.

Everything here works on names and status strings so the orchestrator can feed it straight from the
database (and recompute it after a restart).
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Literal, TypeAlias

from kici.engine.lockfile import JOB_STATUSES, Need
from kici.engine.states import JobState, is_terminal

Decision = Literal["wait", "ready", "skip"]
Action = Literal["ready", "skip"]

NeedLike: TypeAlias = Need | tuple[str, Sequence[str]] | str
"""A need as the lock file has it (`Need`), as a `(upstream, run_on)` pair, or a bare name (on success)."""

_ALWAYS = list(JOB_STATUSES)
_ON_FAILURE = [JobState.FAILED.value, JobState.TIMED_OUT_STALE.value]

WHEN_STATUSES: Mapping[str, Sequence[str]] = {
    "success": ("success",),
    "on_success": ("success",),
    "on-success": ("success",),
    "always": tuple(_ALWAYS),
    "on_failure": tuple(_ON_FAILURE),
    "on-failure": tuple(_ON_FAILURE),
    "on_skip": ("skipped",),
    "on-skip": ("skipped",),
}
"""`when=` keyword → the `runOn` status set it compiles to."""


def run_on_for(when: str | Sequence[str]) -> list[str]:
    """Compile a `when` (keyword, single terminal status, or list of terminal statuses) to `runOn`.

    Explicit lists are deduplicated and put in the canonical order of `JOB_STATUSES`, so two spellings
    of the same set give the same lock file (and the same content hash).
    """
    if isinstance(when, str):
        if when in WHEN_STATUSES:
            return list(WHEN_STATUSES[when])
        if when in JOB_STATUSES:
            return [when]
        options = ", ".join([*WHEN_STATUSES, *JOB_STATUSES])
        raise ValueError(f"unknown needs `when` value {when!r}; expected one of: {options}")
    statuses = list(when)
    if not statuses:
        raise ValueError("needs `when` status list is empty: the job could never run")
    for status in statuses:
        if status not in JOB_STATUSES:
            raise ValueError(
                f"needs `when` names {status!r}, which is not a terminal job status ({', '.join(JOB_STATUSES)})"
            )
    wanted = set(statuses)
    return [s for s in JOB_STATUSES if s in wanted]


# ---------------------------------------------------------------------------------------------- graph checks


def find_cycle(edges: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A dependency cycle as a path that starts and ends on the same job (`["a", "b", "a"]`), or None.

    `edges` maps a job to the names it needs; names that are not keys are leaves. The search is
    iterative (a long chain must not hit the recursion limit) and deterministic (mapping order).
    """
    done: set[str] = set()
    for root in edges:
        if root in done:
            continue
        path: list[str] = [root]
        on_path: dict[str, int] = {root: 0}
        stack: list[Iterator[str]] = [iter(edges.get(root, ()))]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                finished = path.pop()
                del on_path[finished]
                done.add(finished)
                continue
            if nxt in on_path:
                return [*path[on_path[nxt] :], nxt]
            if nxt in done:
                continue
            on_path[nxt] = len(path)
            path.append(nxt)
            stack.append(iter(edges.get(nxt, ())))
    return None


def validate_needs(job_names: Collection[str], edges: Mapping[str, Sequence[str]]) -> None:
    """Raise ValueError for a need on an unknown job, a job needing itself, or a cycle."""
    known = set(job_names)
    for job, upstreams in edges.items():
        if job not in known:
            raise ValueError(f"needs given for unknown job {job!r}")
        for upstream in upstreams:
            if upstream == job:
                raise ValueError(f"job {job!r} needs itself")
            if upstream not in known:
                hint = difflib.get_close_matches(upstream, sorted(known), n=1)
                more = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise ValueError(f"job {job!r} needs unknown job {upstream!r}{more}")
    cycle = find_cycle(edges)
    if cycle is not None:
        raise ValueError(f"dependency cycle between jobs: {' -> '.join(cycle)}")


# ---------------------------------------------------------------------------------------------- matrix/groups


def as_need(need: NeedLike) -> Need:
    if isinstance(need, Need):
        return need
    if isinstance(need, str):
        return Need(name=need)
    name, run_on = need
    return Need(name=name, run_on=list(run_on))


def expand_needs(
    edges: Mapping[str, Sequence[NeedLike]],
    groups: Mapping[str, Sequence[str]],
) -> dict[str, list[Need]]:
    """Rewrite needs declared on job names into needs between concrete jobs.

    `groups` maps a job name that expanded into several concrete jobs (a matrix job, a dynamic group) to
    its children's names; a name absent from `groups` is its own only child. A need on a group becomes
    a need on every child, with the same `run_on`; a group with zero children is dropped from the needs
    (an empty group counts as satisfied). A grouped *downstream* gives each child the same needs.
    """
    out: dict[str, list[Need]] = {}
    for job, needs in edges.items():
        concrete: list[Need] = []
        for raw in needs:
            need = as_need(raw)
            for child in groups.get(need.name, (need.name,)):
                concrete.append(Need(name=child, run_on=list(need.run_on)))
        for child in groups.get(job, (job,)):
            out[child] = list(concrete)
    return out


# ---------------------------------------------------------------------------------------------- run time


def decide(needs: Sequence[NeedLike], upstream_status: Mapping[str, str]) -> Decision:
    """`wait` while any upstream is non-terminal; then `skip` if any upstream ended outside its
    `run_on`; else `ready`. No needs → `ready`.

    Deciding only once every upstream is final keeps the decision a pure function of final states, so a
    restart recomputing from the database reaches the same answer.
    """
    normalized = [as_need(n) for n in needs]
    statuses: list[tuple[str, Need]] = []
    for need in normalized:
        try:
            status = upstream_status[need.name]
        except KeyError:
            raise ValueError(f"no status known for upstream job {need.name!r}") from None
        if not is_terminal(status):
            JobState(status)  # an unknown status string is a bug upstream, not "still running"
            return "wait"
        statuses.append((status, need))
    if any(status not in need.run_on for status, need in statuses):
        return "skip"
    return "ready"


def next_actions(
    jobs: Mapping[str, str],
    edges: Mapping[str, Sequence[NeedLike]],
) -> dict[str, Action]:
    """One scheduling pass: for each `pending` job, `ready` or `skip` (jobs that must wait are left out).

    `jobs` maps every concrete job of the run to its current status; `edges` its (expanded) needs.
    """
    actions: dict[str, Action] = {}
    for name, status in jobs.items():
        if status != JobState.PENDING:
            continue
        decision = decide(edges.get(name, ()), jobs)
        if decision != "wait":
            actions[name] = decision
    return actions


def settle(
    jobs: Mapping[str, str],
    edges: Mapping[str, Sequence[NeedLike]],
) -> dict[str, Action]:
    """`next_actions` repeated until nothing changes, treating each skip as final before the next pass.

    The result holds every decision reachable now: a failure upstream skips the whole chain below it in
    one call (A failed → B skipped → C skipped). Ready jobs stay non-terminal, so their dependents wait.
    """
    current = dict(jobs)
    decided: dict[str, Action] = {}
    # Each pass either skips at least one more pending job or ends, so len(jobs) + 1 passes suffice.
    for _ in range(len(current) + 1):
        actions = {n: a for n, a in next_actions(current, edges).items() if n not in decided}
        if not actions:
            break
        decided.update(actions)
        skipped = [n for n, a in actions.items() if a == "skip"]
        if not skipped:
            break
        for name in skipped:
            current[name] = JobState.SKIPPED.value
    return decided
