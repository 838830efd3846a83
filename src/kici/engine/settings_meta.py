"""What the orchestrator's and the agent's settings models share: checking `KICI_*` variables (unknown
names with a "did you mean" hint) and rendering a model as the env-var table of a generated reference
page. Pure functions; the services own their models, file I/O and page texts."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr
from pydantic.fields import FieldInfo


def did_you_mean(name: str, candidates: Collection[str], reference: str) -> str:
    """`did you mean KICI_X?`, or a pointer to the reference page when nothing is close."""
    close = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.6)
    return f"did you mean {close[0]}?" if close else f"no similar setting; see {reference}"


def unknown_env_vars(
    environ: Mapping[str, str],
    *,
    prefix: str,
    known: Collection[str],
    exempt_names: Collection[str] = (),
    exempt_prefixes: tuple[str, ...] = (),
) -> list[str]:
    """Variables in `environ` starting with `prefix` that are neither settings nor exempt, sorted."""
    return sorted(
        name
        for name in environ
        if name.startswith(prefix)
        and name not in known
        and name not in exempt_names
        and not name.startswith(exempt_prefixes)
    )


def type_name(annotation: Any) -> str:
    """A field's type as the reference table shows it."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(annotation) if a is not type(None))
    if origin is Literal:
        return " \\| ".join(f"`{v}`" for v in typing.get_args(annotation))
    if origin is list:
        return "comma-separated list"
    if annotation is bool:
        return "boolean"
    if annotation is int:
        return "integer"
    if annotation is float:
        return "number"
    if annotation is SecretStr:
        return "secret"
    if isinstance(annotation, type) and issubclass(annotation, Path):
        return "path"
    return "string"


def default_text(info: FieldInfo) -> str:
    """A field's default as the table shows it (`doc_default` in `json_schema_extra` overrides it)."""
    extra = info.json_schema_extra
    if isinstance(extra, dict) and "doc_default" in extra:
        return str(extra["doc_default"])
    value = info.get_default(call_default_factory=True)
    if value is None or value == "" or value == []:
        return "—"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`"


def cell(text: str) -> str:
    """Text that fits one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def env_table(
    fields: Iterable[tuple[str, FieldInfo]],
    env_name: Callable[[str], str],
    describe: Callable[[FieldInfo], str] = lambda info: info.description or "",
) -> list[str]:
    """The `| Variable | Type | Default | Description |` table of a settings model's fields."""
    lines = ["| Variable | Type | Default | Description |", "|---|---|---|---|"]
    for name, info in fields:
        lines.append(
            f"| `{env_name(name)}` | {type_name(info.annotation)} | {cell(default_text(info))} | "
            f"{cell(describe(info))} |"
        )
    return lines
