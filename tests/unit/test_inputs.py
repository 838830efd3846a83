"""Typed dispatch inputs, shared by `kici run local` and the orchestrator."""

from __future__ import annotations

import pytest

from kici.engine.inputs import InputError, coerce_input, resolve_inputs
from kici.engine.lockfile import InputSpec

SPECS = {
    "version": InputSpec(type="string", required=True),
    "n": InputSpec(type="number", default=2),
    "flag": InputSpec(type="boolean"),
    "env": InputSpec(type="choice", options=["a", "b"], default="a"),
}


def test_resolve_fills_defaults_and_converts() -> None:
    assert resolve_inputs(SPECS, {"version": "1", "flag": "yes", "n": "2.5"}) == {
        "version": "1", "n": 2.5, "flag": True, "env": "a"}
    assert resolve_inputs(None, {"anything": "x"}) == {"anything": "x"}


@pytest.mark.parametrize(("raw", "message"), [
    ({}, "input 'version' is required"),
    ({"version": "1", "x": "1"}, "unknown input(s) x"),
    ({"version": "1", "n": True}, "must be a number"),
    ({"version": "1", "flag": "maybe"}, "must be true or false"),
    ({"version": "1", "env": "c"}, "must be one of a, b"),
    ({"version": ["list"]}, "must be a string"),
])
def test_bad_inputs(raw: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_inputs(SPECS, raw)


def test_numbers_keep_their_kind() -> None:
    spec = InputSpec(type="number")
    assert coerce_input("n", spec, "3") == 3 and isinstance(coerce_input("n", spec, "3"), int)
    assert coerce_input("n", spec, 1.5) == 1.5


def test_a_missing_required_input_is_described() -> None:
    specs = {"target": InputSpec(type="string", required=True, description="where to deploy")}
    with pytest.raises(InputError, match=r"input 'target' \(where to deploy\) is required"):
        resolve_inputs(specs, {})
