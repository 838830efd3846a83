from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kici.engine.lockfile import JOB_STATUSES, Need
from kici.engine.needs import (
    WHEN_STATUSES,
    NeedLike,
    decide,
    expand_needs,
    find_cycle,
    next_actions,
    run_on_for,
    settle,
    validate_needs,
)
from kici.engine.states import TERMINAL_STATES, JobState

NON_TERMINAL = sorted(s.value for s in set(JobState) - TERMINAL_STATES)

# ---------------------------------------------------------------------------------------------- when → runOn


def test_when_keywords() -> None:
    assert run_on_for("success") == ["success"]
    assert run_on_for("always") == list(JOB_STATUSES)
    assert set(run_on_for("always")) == {
        "success", "failed", "cancelled", "skipped", "timed_out_stale", "drift_dropped",
    }  # fmt: skip
    assert run_on_for("on_failure") == ["failed", "timed_out_stale"]
    assert run_on_for("on-failure") == ["failed", "timed_out_stale"]
    assert run_on_for("on_skip") == run_on_for("on-skip") == ["skipped"]
    assert run_on_for("on-success") == run_on_for("on_success") == ["success"]
    for key, statuses in WHEN_STATUSES.items():
        assert run_on_for(key) == list(statuses)


def test_when_status_lists_are_validated_and_canonical() -> None:
    assert run_on_for(["skipped", "success", "skipped"]) == ["success", "skipped"]
    assert run_on_for(("failed",)) == ["failed"]
    assert run_on_for("cancelled") == ["cancelled"]
    with pytest.raises(ValueError, match="'running'"):
        run_on_for(["success", "running"])
    with pytest.raises(ValueError, match="empty"):
        run_on_for([])
    with pytest.raises(ValueError, match="'sometimes'"):
        run_on_for("sometimes")


# ---------------------------------------------------------------------------------------------- graph checks


def test_find_cycle() -> None:
    assert find_cycle({}) is None
    assert find_cycle({"a": [], "b": ["a"], "c": ["a", "b"]}) is None
    assert find_cycle({"a": ["b"], "b": ["a"]}) == ["a", "b", "a"]
    assert find_cycle({"a": ["a"]}) == ["a", "a"]
    cycle = find_cycle({"x": [], "a": ["x", "b"], "b": ["c"], "c": ["a"]})
    assert cycle == ["a", "b", "c", "a"]
    # Names that are only upstreams are leaves.
    assert find_cycle({"a": ["zzz"]}) is None


def test_find_cycle_on_a_long_chain_does_not_recurse() -> None:
    n = 5000
    chain = {f"j{i}": [f"j{i + 1}"] for i in range(n)}
    assert find_cycle(chain) is None
    chain[f"j{n}"] = ["j0"]
    cycle = find_cycle(chain)
    assert cycle is not None and cycle[0] == cycle[-1] and len(cycle) == n + 2


@given(st.dictionaries(st.sampled_from("abcdefg"), st.lists(st.sampled_from("abcdefg"), max_size=3)))
def test_find_cycle_returns_a_real_cycle_or_a_topological_order_exists(edges: dict[str, list[str]]) -> None:
    cycle = find_cycle(edges)
    if cycle is not None:
        assert cycle[0] == cycle[-1]
        for job, upstream in itertools.pairwise(cycle):
            assert upstream in edges.get(job, [])
    else:
        # Kahn's algorithm must consume every node.
        nodes = set(edges) | {u for ups in edges.values() for u in ups}
        remaining = {n: set(edges.get(n, [])) for n in nodes}
        while remaining:
            free = [n for n, ups in remaining.items() if not ups]
            assert free, "find_cycle missed a cycle"
            for n in free:
                del remaining[n]
            for ups in remaining.values():
                ups.difference_update(free)


def test_validate_needs() -> None:
    validate_needs(["a", "b", "c"], {"b": ["a"], "c": ["a", "b"]})
    with pytest.raises(ValueError, match=r"job 'b' needs unknown job 'lnt' \(did you mean 'lint'\?\)"):
        validate_needs(["lint", "b"], {"b": ["lnt"]})
    with pytest.raises(ValueError, match="job 'a' needs itself"):
        validate_needs(["a"], {"a": ["a"]})
    with pytest.raises(ValueError, match=r"dependency cycle between jobs: a -> b -> c -> a"):
        validate_needs(["a", "b", "c"], {"a": ["b"], "b": ["c"], "c": ["a"]})
    with pytest.raises(ValueError, match="unknown job 'ghost'"):
        validate_needs(["a"], {"ghost": ["a"]})


# ---------------------------------------------------------------------------------------------- decide


def test_decide_basic() -> None:
    assert decide([], {}) == "ready"
    assert decide(["a"], {"a": "success"}) == "ready"
    assert decide(["a"], {"a": "failed"}) == "skip"
    assert decide([("a", ["failed"])], {"a": "failed"}) == "ready"
    assert decide([Need(name="a", run_on=["skipped"])], {"a": "success"}) == "skip"


@pytest.mark.parametrize("status", NON_TERMINAL)
def test_never_ready_before_upstream_is_terminal(status: str) -> None:
    for when in ("success", "always", "on_failure", "on_skip"):
        assert decide([("a", run_on_for(when))], {"a": status}) == "wait"
    # Even when another upstream already decided a skip, the job waits for all of them.
    assert decide(["b", "a"], {"a": status, "b": "failed"}) == "wait"


@pytest.mark.parametrize("status", sorted(s.value for s in TERMINAL_STATES))
def test_always_runs_after_any_terminal_status(status: str) -> None:
    assert decide([("a", run_on_for("always"))], {"a": status}) == "ready"


def test_on_failure_and_on_skip() -> None:
    on_failure = run_on_for("on-failure")
    assert decide([("a", on_failure)], {"a": "failed"}) == "ready"
    assert decide([("a", on_failure)], {"a": "timed_out_stale"}) == "ready"
    assert decide([("a", on_failure)], {"a": "success"}) == "skip"
    assert decide([("a", on_failure)], {"a": "cancelled"}) == "skip"
    on_skip = run_on_for("on_skip")
    assert decide([("a", on_skip)], {"a": "skipped"}) == "ready"
    assert decide([("a", on_skip)], {"a": "success"}) == "skip"


def test_decide_errors() -> None:
    with pytest.raises(ValueError, match="'ghost'"):
        decide(["ghost"], {})
    with pytest.raises(ValueError):
        decide(["a"], {"a": "exploded"})


# ---------------------------------------------------------------------------------------------- next_actions / settle


def test_chain_failure_cascades_skips() -> None:
    jobs = {"A": "failed", "B": "pending", "C": "pending"}
    edges: dict[str, Sequence[NeedLike]] = {"B": ["A"], "C": ["B"]}
    assert next_actions(jobs, edges) == {"B": "skip"}
    assert settle(jobs, edges) == {"B": "skip", "C": "skip"}


def test_chain_with_always_runs_b() -> None:
    jobs = {"A": "failed", "B": "pending", "C": "pending"}
    edges: dict[str, Sequence[NeedLike]] = {"B": [("A", run_on_for("always"))], "C": ["B"]}
    # B is ready; C waits for B, which is not terminal yet.
    assert settle(jobs, edges) == {"B": "ready"}
    assert settle({**jobs, "B": "success"}, edges) == {"C": "ready"}


def test_b_not_ready_while_a_runs() -> None:
    edges: dict[str, Sequence[NeedLike]] = {"B": ["A"], "C": ["B"]}
    for a_status in ("pending", "queued", "running", "recovering", "cancelling", "held", "waiting"):
        jobs = {"A": a_status, "B": "pending", "C": "pending"}
        actions = settle(jobs, edges)
        assert "B" not in actions and "C" not in actions
    assert settle({"A": "pending", "B": "pending", "C": "pending"}, edges) == {"A": "ready"}


def test_only_pending_jobs_get_actions() -> None:
    jobs = {"A": "success", "B": "queued", "C": "held", "D": "pending"}
    edges: dict[str, Sequence[NeedLike]] = {"B": ["A"], "C": ["A"], "D": ["A"]}
    assert next_actions(jobs, edges) == {"D": "ready"}


def test_lint_test_report_example() -> None:
    # authoring §5.22: lint fails → test skipped, report (when=always) runs.
    jobs = {"lint": "failed", "test": "pending", "report": "pending"}
    edges: dict[str, Sequence[NeedLike]] = {"test": ["lint"], "report": [("test", run_on_for("always"))]}
    assert settle(jobs, edges) == {"test": "skip", "report": "ready"}


def test_diamond() -> None:
    edges: dict[str, Sequence[NeedLike]] = {"B": ["A"], "C": ["A"], "D": ["B", "C"]}
    assert settle({"A": "success", "B": "pending", "C": "pending", "D": "pending"}, edges) == {
        "B": "ready",
        "C": "ready",
    }
    assert settle({"A": "success", "B": "success", "C": "running", "D": "pending"}, edges) == {}
    assert settle({"A": "success", "B": "success", "C": "success", "D": "pending"}, edges) == {"D": "ready"}
    assert settle({"A": "success", "B": "failed", "C": "success", "D": "pending"}, edges) == {"D": "skip"}
    # A fails: both arms skip, and so does the join.
    assert settle({"A": "failed", "B": "pending", "C": "pending", "D": "pending"}, edges) == {
        "B": "skip",
        "C": "skip",
        "D": "skip",
    }


def test_diamond_with_on_skip_join() -> None:
    edges: dict[str, Sequence[NeedLike]] = {"B": ["A"], "C": ["A"], "D": [("B", ["skipped"]), ("C", ["skipped"])]}
    jobs = {"A": "failed", "B": "pending", "C": "pending", "D": "pending"}
    assert settle(jobs, edges) == {"B": "skip", "C": "skip", "D": "ready"}


def test_settle_does_not_mutate_input() -> None:
    jobs = {"A": "failed", "B": "pending"}
    settle(jobs, {"B": ["A"]})
    assert jobs == {"A": "failed", "B": "pending"}


def test_settle_is_a_fixed_point() -> None:
    jobs = {"A": "failed", "B": "pending", "C": "pending", "D": "pending", "E": "pending"}
    edges: dict[str, Sequence[NeedLike]] = {"B": ["A"], "C": ["B"], "D": ["C"], "E": [("D", ["success", "skipped"])]}
    decisions = settle(jobs, edges)
    assert decisions == {"B": "skip", "C": "skip", "D": "skip", "E": "ready"}
    applied = {n: ("skipped" if decisions.get(n) == "skip" else s) for n, s in jobs.items()}
    assert {n: a for n, a in next_actions(applied, edges).items() if a == "skip"} == {}


# ---------------------------------------------------------------------------------------------- matrix / groups


def test_expand_needs_on_matrix_children() -> None:
    groups = {"test": ["test (a, 18)", "test (a, 20)", "test (b, 20)"]}
    edges: dict[str, Sequence[NeedLike]] = {"deploy": [Need(name="test", run_on=["success", "skipped"])], "lint": []}
    expanded = expand_needs(edges, groups)
    assert expanded == {
        "deploy": [
            Need(name="test (a, 18)", run_on=["success", "skipped"]),
            Need(name="test (a, 20)", run_on=["success", "skipped"]),
            Need(name="test (b, 20)", run_on=["success", "skipped"]),
        ],
        "lint": [],
    }
    jobs = {"test (a, 18)": "success", "test (a, 20)": "success", "test (b, 20)": "running", "deploy": "pending"}
    assert settle(jobs, expanded) == {}
    jobs["test (b, 20)"] = "success"
    assert settle(jobs, expanded) == {"deploy": "ready"}
    jobs["test (b, 20)"] = "failed"
    assert settle(jobs, expanded) == {"deploy": "skip"}


def test_expand_needs_for_a_matrix_downstream() -> None:
    groups = {"build": ["build (1)", "build (2)"]}
    expanded = expand_needs({"build": ["lint"]}, groups)
    assert expanded == {"build (1)": [Need(name="lint")], "build (2)": [Need(name="lint")]}


def test_empty_group_counts_as_satisfied() -> None:
    expanded = expand_needs({"deploy": ["shards", "lint"]}, {"shards": []})
    assert expanded == {"deploy": [Need(name="lint")]}
    assert settle({"lint": "success", "deploy": "pending"}, expanded) == {"deploy": "ready"}
    only_empty = expand_needs({"deploy": ["shards"]}, {"shards": []})
    assert settle({"deploy": "pending"}, only_empty) == {"deploy": "ready"}
