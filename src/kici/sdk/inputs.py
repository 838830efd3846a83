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
