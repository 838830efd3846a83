"""Typed inputs for `dispatch(inputs=…)`: `kici.inputs.string(required=True)`, `choice([...])`, …

Only this closed set of types exists, so the orchestrator can validate values it receives without
running any workflow code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

InputType = Literal["string", "number", "boolean", "choice", "environment"]
Scalar = str | int | float | bool


@dataclass(frozen=True)
class Input:
    type: InputType
    description: str | None = None
    required: bool = False
    default: Scalar | None = None
    options: tuple[str, ...] | None = None


def string(*, description: str | None = None, required: bool = False, default: str | None = None) -> Input:
    return Input("string", description, required, default)


def number(
    *, description: str | None = None, required: bool = False, default: int | float | None = None
) -> Input:
    return Input("number", description, required, default)


def boolean(*, description: str | None = None, required: bool = False, default: bool | None = None) -> Input:
    return Input("boolean", description, required, default)


def choice(
    options: Sequence[str], *, description: str | None = None, required: bool = False, default: str | None = None
) -> Input:
    return Input("choice", description, required, default, tuple(options))


def environment(*, description: str | None = None, required: bool = False, default: str | None = None) -> Input:
    """The name of a deployment environment."""
    return Input("environment", description, required, default)


def coerce(name: str, spec: Input, raw: object) -> Scalar:
    """Turn a raw value (often a `--input k=v` string) into the input's type, or raise ValueError."""
    if spec.type == "number":
        if isinstance(raw, bool):
            raise ValueError(f"input {name!r} must be a number, got {raw!r}")
        if isinstance(raw, int | float):
            return raw
        try:
            text = str(raw)
            return int(text) if text.lstrip("-").isdigit() else float(text)
        except ValueError:
            raise ValueError(f"input {name!r} must be a number, got {raw!r}") from None
    if spec.type == "boolean":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"input {name!r} must be true or false, got {raw!r}")
    value = str(raw)
    if spec.type == "choice" and spec.options is not None and value not in spec.options:
        raise ValueError(f"input {name!r} must be one of {', '.join(spec.options)}; got {value!r}")
    return value
