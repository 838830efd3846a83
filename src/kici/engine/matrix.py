"""Static matrix expansion: one job definition → one concrete job per combination.

- A **list** matrix gives one combination per element, and the combination *is* the element (steps read
  it as `ctx.matrix.value`). `include`/`exclude` entries for a list matrix are `{"value": v}`.
- A **dict** matrix gives the Cartesian product of its axes in key order (the first key varies
  slowest), each combination a dict.
- `exclude` is applied first: an entry removes every combination whose values equal the entry's values
  for all the keys it names. An entry naming a key that is not an axis is an error (a typo would
  otherwise silently exclude nothing).
- `include` comes next (GitHub Actions' rule, simplified): an entry is merged into every product
  combination whose axis values it does not contradict; an entry that fits none is appended as a new
  combination. So `{"experimental": True}` adds a key to every combination, `{"os": "a", "extra": 1}`
  extends only the `os == "a"` ones, and `{"os": "c", "node": 22}` is a combination of its own.
- An empty matrix (`[]`, `{}` or an axis with no values) has **zero** combinations — the job expands to
  no concrete jobs, which its dependents treat like an empty group (satisfied) — unless `include` adds
  some.
- At most `MATRIX_LIMIT` combinations in the result. The product size is computed before anything is
  built and may not exceed `MATRIX_PRODUCT_LIMIT` (a little room for `exclude` to trim), so a
  1000 x 1000 matrix fails at once; while building, expansion stops at the first combination over the
  limit.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

MATRIX_LIMIT = 256
"""Most concrete jobs one matrix may produce."""

MATRIX_PRODUCT_LIMIT = 4096
"""Most combinations the Cartesian product may have *before* `exclude` (bounds the work done)."""


class MatrixTooLargeError(ValueError):
    pass


def expand_matrix(
    values: Sequence[Any] | Mapping[str, Sequence[Any]],
    include: Sequence[Mapping[str, Any]] | None = None,
    exclude: Sequence[Mapping[str, Any]] | None = None,
) -> list[Any]:
    """All combinations of a static matrix, in a stable order (product order, then appended includes)."""
    if isinstance(values, Mapping):
        return _expand_dict(values, include or (), exclude or ())
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"a matrix must be a list or a dict of lists, not {type(values).__name__}")
    return _expand_list(values, include or (), exclude or ())


def _expand_list(
    values: Sequence[Any], include: Sequence[Mapping[str, Any]], exclude: Sequence[Mapping[str, Any]]
) -> list[Any]:
    _check_size(len(values))
    _check_unique(values, "matrix")
    removed = [_list_entry(e, "exclude") for e in exclude]
    combos = [v for v in values if v not in removed]
    for entry in include:
        value = _list_entry(entry, "include")
        if value not in combos:
            combos.append(value)
    _check_limit(len(combos))
    return combos


def _list_entry(entry: Mapping[str, Any], where: str) -> Any:
    if not isinstance(entry, Mapping) or set(entry) != {"value"}:
        raise ValueError(f"{where} entry {entry!r} for a list matrix must be {{'value': <element>}}")
    return entry["value"]


def _expand_dict(
    axes: Mapping[str, Sequence[Any]],
    include: Sequence[Mapping[str, Any]],
    exclude: Sequence[Mapping[str, Any]],
) -> list[Any]:
    for key, axis in axes.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"matrix keys must be non-empty strings, not {key!r}")
        if isinstance(axis, (str, bytes)) or not isinstance(axis, Sequence):
            raise ValueError(f"matrix key {key!r} must map to a list of values, not {type(axis).__name__}")
    size = math.prod(len(a) for a in axes.values()) if axes else 0
    _check_size(size)
    for key, axis in axes.items():
        _check_unique(axis, f"matrix key {key!r}")
    keys = list(axes)
    for entry in exclude:
        if not isinstance(entry, Mapping) or not entry:
            raise ValueError(f"exclude entry {entry!r} must be a non-empty dict")
        unknown = [k for k in entry if k not in axes]
        if unknown:
            raise ValueError(f"exclude entry {dict(entry)!r} names {unknown[0]!r}, which is not a matrix key")

    combos: list[dict[str, Any]] = []
    if size:
        for values in itertools.product(*(axes[k] for k in keys)):
            combo = dict(zip(keys, values, strict=True))
            if not any(_matches(combo, entry) for entry in exclude):
                combos.append(combo)
            _check_limit(len(combos))

    product_count = len(combos)
    for entry in include:
        if not isinstance(entry, Mapping) or not entry:
            raise ValueError(f"include entry {entry!r} must be a non-empty dict")
        fixed = {k: v for k, v in entry.items() if k in axes}
        merged = False
        for combo in combos[:product_count]:
            if _matches(combo, fixed):
                combo.update(entry)
                merged = True
        if not merged:
            new = dict(entry)
            if new not in combos[product_count:]:
                combos.append(new)
    _check_limit(len(combos))
    return combos


def _matches(combo: Mapping[str, Any], entry: Mapping[str, Any]) -> bool:
    return all(k in combo and combo[k] == v for k, v in entry.items())


def _check_unique(values: Sequence[Any], where: str) -> None:
    # Compared as rendered in job names: `1` and `"1"` are different values but the same job name.
    seen: set[str] = set()
    for value in values:
        shown = render_matrix_value(value)
        if shown in seen:
            raise ValueError(f"{where} lists {shown!r} twice (two jobs would get the same name)")
        seen.add(shown)


def _check_size(size: int) -> None:
    if size > MATRIX_PRODUCT_LIMIT:
        raise MatrixTooLargeError(
            f"matrix has {size} combinations; the limit is {MATRIX_LIMIT} jobs "
            f"(and {MATRIX_PRODUCT_LIMIT} combinations before exclude)"
        )


def _check_limit(count: int) -> None:
    if count > MATRIX_LIMIT:
        raise MatrixTooLargeError(f"matrix expands to more than {MATRIX_LIMIT} jobs ({count} or more)")


# ---------------------------------------------------------------------------------------------- names


def render_matrix_value(value: Any) -> str:
    """One matrix value as it appears in a job name: strings bare, `true`/`false`/`null`, numbers plain
    (`3.0` as `3`, as JavaScript prints it), anything else as compact JSON."""
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e21:
            return str(int(value))
        return repr(value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def child_job_name(job_name: str, combination: Any) -> str:
    """`build (3.11, linux)`: the combination's values in key order (a list matrix: the element)."""
    if isinstance(combination, Mapping):
        parts = [render_matrix_value(v) for v in combination.values()]
    else:
        parts = [render_matrix_value(combination)]
    return f"{job_name} ({', '.join(parts)})"


def child_job_names(job_name: str, combinations: Sequence[Any]) -> list[str]:
    """`child_job_name` for each combination; ValueError if two of them render the same name
    (e.g. `"1"` and `1`), since concrete job names must be unique within a run."""
    names: list[str] = []
    for combo in combinations:
        name = child_job_name(job_name, combo)
        if name in names:
            raise ValueError(f"matrix of job {job_name!r} gives two jobs named {name!r}")
        names.append(name)
    return names
