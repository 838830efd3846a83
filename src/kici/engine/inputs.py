"""Dispatch inputs: check and convert raw values (`--input k=v` strings, API JSON) against the typed
input specs a workflow's dispatch trigger declares in the lock file. Used by `kici run local` and by
the orchestrator, so both accept and refuse the same values."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kici.engine.lockfile import DispatchTrigger, InputSpec, Workflow

Scalar = str | int | float | bool


class InputError(ValueError):
    """One line naming the input and what is wrong with it."""


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def coerce_input(name: str, spec: InputSpec, raw: object) -> Scalar:
    if spec.type == "number":
        if isinstance(raw, bool):
            raise InputError(f"input {name!r} must be a number, not {raw!r}")
        if isinstance(raw, int | float):
            return raw
        text = str(raw).strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            raise InputError(f"input {name!r} must be a number, not {raw!r}") from None
    if spec.type == "boolean":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise InputError(f"input {name!r} must be true or false, not {raw!r}")
    if not isinstance(raw, str | int | float) or isinstance(raw, bool):
        raise InputError(f"input {name!r} must be a string, not {raw!r}")
    value = str(raw)
    if spec.type == "choice" and spec.options is not None and value not in spec.options:
        raise InputError(f"input {name!r} must be one of {', '.join(spec.options)}; got {value!r}")
    return value


def resolve_inputs(specs: Mapping[str, InputSpec] | None, raw: Mapping[str, Any]) -> dict[str, Scalar]:
    """Typed values for every declared input: given values converted, defaults filled in; unknown or
    missing required inputs are errors. Without specs, the raw values pass through unchanged."""
    if not specs:
        return dict(raw)
    unknown = sorted(set(raw) - set(specs))
    if unknown:
        raise InputError(f"unknown input(s) {', '.join(unknown)}; declared: {', '.join(sorted(specs))}")
    out: dict[str, Scalar] = {}
    for name, spec in specs.items():
        if name in raw:
            out[name] = coerce_input(name, spec, raw[name])
        elif spec.default is not None:
            out[name] = spec.default
        elif spec.required:
            about = f" ({spec.description})" if spec.description else ""
            raise InputError(f"input {name!r}{about} is required")
    return out


def dispatch_input_specs(workflow: Workflow, trigger_index: int | None) -> dict[str, InputSpec] | None:
    """The input specs of the dispatch trigger that matched (None if it was not a dispatch trigger)."""
    if trigger_index is None or not 0 <= trigger_index < len(workflow.triggers):
        return None
    trigger = workflow.triggers[trigger_index]
    return trigger.inputs if isinstance(trigger, DispatchTrigger) else None
