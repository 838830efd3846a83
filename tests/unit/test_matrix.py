from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kici.engine.matrix import (
    MATRIX_LIMIT,
    MatrixTooLargeError,
    child_job_name,
    child_job_names,
    expand_matrix,
    render_matrix_value,
)


def test_reference_example() -> None:
    # authoring §5.23: {os:[a,b], node:[18,20]} minus {b,18} plus {c,22} → 4 jobs.
    combos = expand_matrix(
        {"os": ["a", "b"], "node": [18, 20]},
        include=[{"os": "c", "node": 22}],
        exclude=[{"os": "b", "node": 18}],
    )
    assert combos == [
        {"os": "a", "node": 18},
        {"os": "a", "node": 20},
        {"os": "b", "node": 20},
        {"os": "c", "node": 22},
    ]
    assert child_job_names("test", combos) == ["test (a, 18)", "test (a, 20)", "test (b, 20)", "test (c, 22)"]


def test_product_is_in_key_order() -> None:
    assert expand_matrix({"py": ["3.11", "3.12"], "os": ["linux", "mac"]}) == [
        {"py": "3.11", "os": "linux"},
        {"py": "3.11", "os": "mac"},
        {"py": "3.12", "os": "linux"},
        {"py": "3.12", "os": "mac"},
    ]
    assert child_job_name("build", {"py": "3.11", "os": "linux"}) == "build (3.11, linux)"


def test_list_matrix() -> None:
    assert expand_matrix(["3.11", "3.12"]) == ["3.11", "3.12"]
    assert [child_job_name("build", c) for c in expand_matrix([18, 20])] == ["build (18)", "build (20)"]
    assert expand_matrix([1, 2, 3], include=[{"value": 4}], exclude=[{"value": 2}]) == [1, 3, 4]
    assert expand_matrix([1, 2], include=[{"value": 2}]) == [1, 2]  # already there
    with pytest.raises(ValueError, match="list matrix"):
        expand_matrix([1, 2], exclude=[{"os": "a"}])


def test_exclude_partial_keys_removes_every_match() -> None:
    combos = expand_matrix({"os": ["a", "b"], "node": [18, 20], "arch": ["x", "y"]}, exclude=[{"os": "b"}])
    assert len(combos) == 4 and all(c["os"] == "a" for c in combos)
    combos = expand_matrix(
        {"os": ["a", "b"], "node": [18, 20]}, exclude=[{"os": "a", "node": 18}, {"os": "b", "node": 20}]
    )
    assert combos == [{"os": "a", "node": 20}, {"os": "b", "node": 18}]


def test_exclude_with_unknown_key_is_an_error() -> None:
    with pytest.raises(ValueError, match="'nod'"):
        expand_matrix({"os": ["a"], "node": [1]}, exclude=[{"nod": 1}])


def test_exclude_is_applied_before_include() -> None:
    # The include re-adds a combination that the exclude removed.
    combos = expand_matrix({"os": ["a", "b"]}, include=[{"os": "b"}], exclude=[{"os": "b"}])
    assert combos == [{"os": "a"}, {"os": "b"}]


def test_include_merges_into_matching_combinations() -> None:
    combos = expand_matrix(
        {"os": ["a", "b"], "node": [18, 20]},
        include=[{"os": "a", "experimental": True}, {"color": "green"}],
    )
    assert combos == [
        {"os": "a", "node": 18, "experimental": True, "color": "green"},
        {"os": "a", "node": 20, "experimental": True, "color": "green"},
        {"os": "b", "node": 18, "color": "green"},
        {"os": "b", "node": 20, "color": "green"},
    ]
    assert child_job_name("t", combos[0]) == "t (a, 18, true, green)"


def test_include_never_overwrites_matrix_values() -> None:
    combos = expand_matrix({"os": ["a"], "node": [18]}, include=[{"os": "a", "node": 22}])
    # node=22 contradicts the only combination, so it becomes a combination of its own.
    assert combos == [{"os": "a", "node": 18}, {"os": "a", "node": 22}]


def test_later_include_may_overwrite_keys_added_by_include() -> None:
    combos = expand_matrix({"os": ["a"]}, include=[{"x": 1}, {"x": 2}])
    assert combos == [{"os": "a", "x": 2}]


def test_duplicate_appended_includes_collapse() -> None:
    combos = expand_matrix({"os": ["a"]}, include=[{"os": "c"}, {"os": "c"}])
    assert combos == [{"os": "a"}, {"os": "c"}]


def test_empty_matrix_has_zero_combinations() -> None:
    assert expand_matrix({}) == []
    assert expand_matrix([]) == []
    assert expand_matrix({"os": ["a"], "node": []}) == []
    # ...unless include adds some.
    assert expand_matrix({}, include=[{"os": "c"}]) == [{"os": "c"}]


def test_limit() -> None:
    assert len(expand_matrix({"a": list(range(16)), "b": list(range(16))})) == MATRIX_LIMIT
    with pytest.raises(MatrixTooLargeError, match=str(MATRIX_LIMIT)):
        expand_matrix({"a": list(range(16)), "b": list(range(17))})
    with pytest.raises(MatrixTooLargeError):
        expand_matrix(list(range(MATRIX_LIMIT + 1)))
    with pytest.raises(MatrixTooLargeError):
        expand_matrix({"a": list(range(16)), "b": list(range(16))}, include=[{"a": 99}])
    # Exclude can bring a modestly larger product under the limit.
    combos = expand_matrix({"a": list(range(16)), "b": list(range(17))}, exclude=[{"b": 16}])
    assert len(combos) == MATRIX_LIMIT
    assert issubclass(MatrixTooLargeError, ValueError)


def test_huge_matrix_fails_before_building_it() -> None:
    # Materialising either product would exhaust memory or never finish; both fail on the size alone.
    with pytest.raises(MatrixTooLargeError, match="1000000 combinations"):
        expand_matrix({"a": list(range(1000)), "b": list(range(1000))})
    with pytest.raises(MatrixTooLargeError):
        expand_matrix({f"k{i}": list(range(10)) for i in range(30)})  # 10**30 combinations


def test_bad_shapes() -> None:
    with pytest.raises(ValueError, match="list of values"):
        expand_matrix({"os": "linux"})
    with pytest.raises(ValueError, match="list or a dict"):
        expand_matrix("abc")
    with pytest.raises(ValueError, match="non-empty dict"):
        expand_matrix({"os": ["a"]}, include=[{}])
    with pytest.raises(ValueError, match="twice"):
        expand_matrix({"node": [18, 18]})
    with pytest.raises(ValueError, match="twice"):
        expand_matrix([1, "1"])


# ---------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("3.11", "3.11"),
        (18, "18"),
        (3.5, "3.5"),
        (3.0, "3"),
        (True, "true"),
        (False, "false"),
        (None, "null"),
        ([1, "a"], '[1,"a"]'),
        ({"k": "v"}, '{"k":"v"}'),
    ],
)
def test_render_matrix_value(value: Any, shown: str) -> None:
    assert render_matrix_value(value) == shown


def test_child_job_name() -> None:
    assert child_job_name("build", {"py": "3.11", "os": "linux"}) == "build (3.11, linux)"
    assert child_job_name("x", {"flag": False, "n": None}) == "x (false, null)"
    assert child_job_name("x", "solo") == "x (solo)"


def test_child_job_names_detects_collisions() -> None:
    with pytest.raises(ValueError, match=r"two jobs named 'x \(a, b\)'"):
        child_job_names("x", [{"p": "a, b"}, {"p": "a", "q": "b"}])


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=3),
        st.lists(st.integers(0, 9), min_size=1, max_size=4, unique=True),
        max_size=3,
    )
)
def test_product_size_and_uniqueness(axes: dict[str, list[int]]) -> None:
    combos = expand_matrix(axes)
    expected = 1
    for values in axes.values():
        expected *= len(values)
    assert len(combos) == (expected if axes else 0)
    assert len({tuple(c.items()) for c in combos}) == len(combos)
