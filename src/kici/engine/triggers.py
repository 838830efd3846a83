"""Trigger matching: does a lock-file workflow fire for a normalized `Event`, and why (not)?

Pure and I/O-free; this is the orchestrator's hot path, so each trigger is compiled once into a small
matcher (patterns, regexes and reason labels precomputed) and reused for every later event. The cache is
keyed by the trigger object's identity and cleared when the object is garbage-collected.

Semantics (see `reference/authoring.md` §1.B and §2 "Matching rules"):

- A trigger matches only events of its own type (`push` ↔ `push`, `pr` ↔ `pr`, `tag` ↔ `tag`, …; a push
  trigger never matches a tag event). `webhook` is the catch-all: it matches any event whose raw provider
  name (`event.name`, else `event.type`) is in `events` and whose action is in `actions`.
- Within a trigger every filter must pass; an empty filter list means "no filter". A workflow's triggers
  are OR-combined, the first match wins and is reported; a workflow without triggers never matches.
- A filter set on a field the event does not carry (no branch, no action, no repo, …) does not match.

Pattern lists (branches, target/source branches, tag/ref patterns, status contexts, repos):

- A glob is matched with picomatch semantics by `kici.engine.glob` (`*` does not cross `/`); a regex
  (`BranchPattern(type="regex")`) is searched (`re.search`, so anchor it with `^…$` to match whole
  names) with its JS flags mapped to Python (`i`, `m`, `s`; `g`, `y`, `u`, `d`, `v` have no effect).
  JS named groups `(?<n>…)` / `\\k<n>` are translated; an invalid regex never matches.
- A glob starting with `!` (but not the extglob `!(…)`) is an exclusion: the value must match some
  positive pattern — or the list has only exclusions — and no exclusion. Regexes are always positive.

Paths (`push`/`pr` `paths`), where every entry starting with `!` is an exclusion:

- no changed files (`None` or empty) → no match;
- every changed file matched by an exclusion is removed; nothing left → no match;
- only exclusions → match whatever remains; otherwise match if a remaining file matches a positive.

Payload matching (`kici_event` / `generic_webhook` `match` and `not`): see `match_values`. A `match` passes
when every entry matches; a `not` blocks the trigger when **any** of its entries matches. An entry whose
key is not a valid JSONPath makes the trigger never match (the reason says so).

Per trigger (fields read from the event, or from the raw provider `event.payload`):

- push: `branches` ↔ `event.branch`, `repos` ↔ `event.repo`, then `paths` ↔ `event.changed_files`.
- pr: `events` ↔ `event.action`, `target_branches` ↔ `event.target_branch`, `source_branches` ↔
  `event.source_branch`, `repos`, `paths`. tag: `patterns` ↔ `event.tag`.
- comment: `actions`; `source="pr"` needs `payload.issue.pull_request`, `"issue"` needs it absent;
  `body_match` (a glob matched against the whole body, or a regex searched in it) ↔ `payload.comment.body`.
- review: `actions`, `states` ↔ `payload.review.state` (case-insensitive). review_comment, release, star,
  watch: `actions`. fork: no filters.
- dispatch: `types` ↔ `event.name`, or `event.action` when `event.name` is GitHub's raw
  `repository_dispatch` (GitHub carries the dispatch type as the action).
- create/delete: `ref_types` ↔ `payload.ref_type`, `patterns` ↔ `payload.ref`; without a payload they fall
  back to `event.tag` / `event.branch`.
- status: `contexts` (globs, `!` exclusions) ↔ `payload.context`, `states` ↔ `payload.state` (else
  `event.status`). workflow_run: `actions`, `workflows` (exact names) ↔ `payload.workflow_run.name`, or
  `payload.workflow.name` when that is empty, `conclusions` ↔ `payload.workflow_run.conclusion`.
- kici_event: `event_name` == `event.name`, `source` == `event.source`, `match`/`not` on `event.payload`.
- generic_webhook: `source` == `event.source`, `events` ∋ `event.name`, `match`/`not`. `path` is not
  matched here: it selects the source's URL at ingest (routing), after which the event carries the source.
- workflow_complete: `name` == `event.workflow`, `status` ∋ `event.status`, `source` == `event.source`;
  job_complete adds `job` == `event.job` (its workflow filter is `workflow`).
- schedule: a `schedule` event whose `event.name`, when set, equals the trigger's cron expression (so the
  scheduler can fire one trigger); an unnamed schedule event matches every schedule trigger. Whether a
  schedule is registered at all (only from the default branch) is the orchestrator's business.
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any

from kici.engine.events import Event
from kici.engine.glob import GlobKind, compile_glob, is_glob
from kici.engine.glob import matches as glob_matches
from kici.engine.lockfile import (
    BranchPattern,
    CommentTrigger,
    CreateTrigger,
    DeleteTrigger,
    DispatchTrigger,
    ForkTrigger,
    GenericWebhookTrigger,
    JobCompleteTrigger,
    KiciEventTrigger,
    PrTrigger,
    PushTrigger,
    ReleaseTrigger,
    ReviewCommentTrigger,
    ReviewTrigger,
    ScheduleTrigger,
    StarTrigger,
    StatusTrigger,
    TagTrigger,
    Trigger,
    WatchTrigger,
    WebhookTrigger,
    Workflow,
    WorkflowCompleteTrigger,
    WorkflowRunTrigger,
)

__all__ = [
    "MatchDecision",
    "TriggerMatch",
    "json_path_get",
    "match_all",
    "match_trigger",
    "match_values",
    "match_workflow",
    "needs_changed_files",
    "parse_json_path",
]


@dataclass(frozen=True, slots=True)
class TriggerMatch:
    """The trigger that fired a workflow."""

    workflow: str
    trigger_index: int
    trigger_type: str
    reason: str
    """Human-readable why, e.g. "push to 'main' matched branches [main]"."""


@dataclass(frozen=True, slots=True)
class MatchDecision:
    """The outcome for one workflow. `reasons` lists, per trigger tried before the match (all of them when
    nothing matched), why it did not match, as `"<type>[<index>]: <why>"` — what `kici preview` shows."""

    workflow: str
    matched: bool
    match: TriggerMatch | None
    reasons: list[str]


_new = object.__new__
_set_tm = tuple(TriggerMatch.__dict__[f].__set__ for f in ("workflow", "trigger_index", "trigger_type", "reason"))
_set_md = tuple(MatchDecision.__dict__[f].__set__ for f in ("workflow", "matched", "match", "reasons"))


def _trigger_match(workflow: str, index: int, trigger_type: str, reason: str) -> TriggerMatch:
    """`TriggerMatch(...)` without the frozen-dataclass `__init__` overhead (it goes through
    `object.__setattr__` per field); writes the slots directly, so the result is identical."""
    obj: TriggerMatch = _new(TriggerMatch)
    _set_tm[0](obj, workflow)
    _set_tm[1](obj, index)
    _set_tm[2](obj, trigger_type)
    _set_tm[3](obj, reason)
    return obj


def _decision(workflow: str, matched: bool, match: TriggerMatch | None, reasons: list[str]) -> MatchDecision:
    obj: MatchDecision = _new(MatchDecision)
    _set_md[0](obj, workflow)
    _set_md[1](obj, matched)
    _set_md[2](obj, match)
    _set_md[3](obj, reasons)
    return obj


# ------------------------------------------------------------------------------------------------- public API


def match_trigger(trigger: Trigger, event: Event) -> tuple[bool, str]:
    """Match one trigger against an event: `(matched, reason)`."""
    return _compiled(trigger).match(event)


def match_workflow(workflow: Workflow, event: Event, *, explain: bool = True) -> MatchDecision:
    """OR over the workflow's triggers; the first trigger that matches wins and is reported.

    With `explain=False` the per-trigger reasons of triggers that did not match are not built (the
    orchestrator's hot path needs only the decision and the winning trigger's reason)."""
    reasons: list[str] = []
    name = workflow.name
    for index, compiled in enumerate(_compiled_triggers(workflow)):
        ok, reason = compiled.match(event)
        if ok:
            return _decision(name, True, _trigger_match(name, index, compiled.type, reason), reasons)
        if explain:
            reasons.append(f"{compiled.type}[{index}]: {reason}")
    if explain and not workflow.triggers:
        reasons.append("workflow has no triggers")
    return _decision(name, False, None, reasons)


def match_all(workflows: Sequence[Workflow], event: Event, *, explain: bool = True) -> list[MatchDecision]:
    """One decision per workflow, in order."""
    return [match_workflow(w, event, explain=explain) for w in workflows]


def needs_changed_files(workflows: Sequence[Workflow], event: Event) -> bool:
    """Whether matching `event` needs its changed files: True only if some trigger that filters on `paths`
    would be consulted and passes every other filter (type, branches, actions, repos).

    Triggers after one that already matches without paths are not consulted (first match wins), so they
    do not count. Whether the event already carries `changed_files` is not considered; that is the
    caller's business.
    """
    for workflow in workflows:
        for trigger in workflow.triggers:
            compiled = _compiled(trigger)
            if compiled.event_type is not None and compiled.event_type != event.type:
                continue
            if compiled.paths is None:
                if compiled.match(event)[0]:
                    break  # this workflow matches before any path trigger is reached
                continue
            if compiled.prefilter(event) is None:
                return True
    return False


# --------------------------------------------------------------------------------------------------- JSONPath


_JSONPATH_NAME = re.compile(r"[^.\[\]]+")
_JSONPATH_INDEX = re.compile(r"\[\s*(-?\d+)\s*\]")
_JSONPATH_QUOTED = re.compile(r"""\[\s*(?:'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)")\s*\]""")
_UNESCAPE = re.compile(r"\\(.)")

PathSegment = str | int


@lru_cache(maxsize=4096)
def parse_json_path(path: str) -> tuple[PathSegment, ...]:
    """Parse the minimal JSONPath subset used by `match`/`not` into segments; `ValueError` if malformed.

    Supported: `$` (the root), `$.a.b`, `$.a[0].b`, `$.a[-1]`, `$['x-y']`, `$["a.b"]`, and the same without
    the leading `$` (`a.b`, `a[0]`). Names in dotted form are any characters except `.`, `[` and `]`.
    Wildcards, recursive descent (`..`), slices and filters are not supported.
    """
    text = path.strip()
    if not text:
        raise ValueError("empty JSONPath")
    segments: list[PathSegment] = []
    pos = 0
    if text.startswith("$"):
        pos = 1
    else:
        m = _JSONPATH_NAME.match(text)
        if m is None:
            raise ValueError(f"JSONPath {path!r} must start with '$' or a name")
        segments.append(m.group(0))
        pos = m.end()
    while pos < len(text):
        ch = text[pos]
        if ch == ".":
            m = _JSONPATH_NAME.match(text, pos + 1)
            if m is None:
                raise ValueError(f"JSONPath {path!r}: expected a name after '.' at offset {pos}")
            name = m.group(0)
            if name == "*":
                raise ValueError(f"JSONPath {path!r}: wildcards are not supported")
            segments.append(name)
            pos = m.end()
        elif ch == "[":
            m = _JSONPATH_INDEX.match(text, pos)
            if m is not None:
                segments.append(int(m.group(1)))
                pos = m.end()
                continue
            m = _JSONPATH_QUOTED.match(text, pos)
            if m is None:
                raise ValueError(f"JSONPath {path!r}: expected [<integer>] or ['<name>'] at offset {pos}")
            raw = m.group(1) if m.group(1) is not None else m.group(2)
            segments.append(_UNESCAPE.sub(r"\1", raw))
            pos = m.end()
        else:
            raise ValueError(f"JSONPath {path!r}: unexpected {ch!r} at offset {pos}")
    return tuple(segments)


def _walk(data: Any, segments: tuple[PathSegment, ...]) -> tuple[bool, Any]:
    current = data
    for seg in segments:
        if isinstance(current, Mapping):
            key = seg if isinstance(seg, str) else str(seg)
            if isinstance(seg, int) or key not in current:
                return False, None
            current = current[key]
        elif isinstance(current, list | tuple):
            if isinstance(seg, str):
                if not seg.isdecimal():
                    return False, None
                seg = int(seg)
            if not -len(current) <= seg < len(current):
                return False, None
            current = current[seg]
        else:
            return False, None
    return True, current


def json_path_get(data: Any, path: str) -> tuple[bool, Any]:
    """`(found, value)` at `path` in `data` (see `parse_json_path` for the syntax).

    `[n]` indexes lists only; a dotted or quoted name made of digits also indexes a list (`a.0`).
    A present key whose value is `null` is found (`(True, None)`). Raises `ValueError` for a malformed path.
    """
    return _walk(data, parse_json_path(path))


ValuePredicate = Callable[[Any], bool]


def match_values(match: Mapping[str, Any], data: Any) -> bool:
    """Reference `match` semantics: every `JSONPath → expected` entry must match `data`.

    - A path that is not present never matches (a present `null` matches only an expected `None`).
    - A list is any-of: the actual value must match one of its elements.
    - A string of the form `"/re/"` or `"/re/flags"` is a regex searched in the actual value, which must
      be a string or a number (numbers are searched in their JSON text); flags `i`, `m`, `s` apply.
    - Any other value compares strictly: strings only equal strings, numbers only numbers (`1 == 1.0`),
      booleans only booleans, `None` only `null`; objects and arrays by deep equality. There is no
      string/number coercion (`"1"` does not match `1`); list both forms, or use a regex, to accept either.

    An empty mapping matches anything. Raises `ValueError` for a malformed JSONPath.
    """
    for path, expected in match.items():
        found, actual = json_path_get(data, path)
        if not found or not _value_predicate(expected)(actual):
            return False
    return True


_REGEX_VALUE = re.compile(r"^/(.+)/([dgimsuyv]*)$", re.DOTALL)


def _value_predicate(expected: Any) -> ValuePredicate:
    if isinstance(expected, list | tuple):
        preds = tuple(_scalar_predicate(e) for e in expected)
        return lambda actual: any(p(actual) for p in preds)
    return _scalar_predicate(expected)


def _scalar_predicate(expected: Any) -> ValuePredicate:
    if isinstance(expected, str):
        m = _REGEX_VALUE.match(expected)
        if m is not None:
            rx = _regex(m.group(1), m.group(2))
            return partial(_regex_value_matches, rx)
        return partial(_str_equals, expected)
    if isinstance(expected, bool):
        return partial(_bool_equals, expected)
    if isinstance(expected, int | float):
        return partial(_number_equals, expected)
    if expected is None:
        return _is_none
    return partial(_deep_equals, expected)


def _str_equals(expected: str, actual: Any) -> bool:
    return isinstance(actual, str) and actual == expected


def _bool_equals(expected: bool, actual: Any) -> bool:
    return isinstance(actual, bool) and actual is expected


def _number_equals(expected: float, actual: Any) -> bool:
    return isinstance(actual, int | float) and not isinstance(actual, bool) and actual == expected


def _is_none(actual: Any) -> bool:
    return actual is None


def _deep_equals(expected: Any, actual: Any) -> bool:
    return type(expected) is type(actual) and bool(expected == actual)


def _regex_value_matches(rx: re.Pattern[str] | None, actual: Any) -> bool:
    if rx is None:
        return False
    if isinstance(actual, str):
        return rx.search(actual) is not None
    if isinstance(actual, int | float) and not isinstance(actual, bool):
        return rx.search(json.dumps(actual)) is not None
    return False


# ----------------------------------------------------------------------------------------------- regex & glob


_FLAG_MAP = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL}
_JS_NAMED_GROUP = re.compile(r"(?<!\\)\(\?<(?![=!])")
_JS_BACKREF = re.compile(r"\\k<([A-Za-z_][A-Za-z0-9_]*)>")


@lru_cache(maxsize=2048)
def _regex(pattern: str, flags: str | None) -> re.Pattern[str] | None:
    """Compile a lock-file (JS-syntax) regex once; None if it is not valid Python syntax."""
    py_flags = 0
    for ch in flags or "":
        py_flags |= _FLAG_MAP.get(ch, 0)
    source = _JS_BACKREF.sub(r"(?P=\1)", _JS_NAMED_GROUP.sub("(?P<", pattern))
    try:
        return re.compile(source, py_flags)
    except (re.error, OverflowError):
        return None


Matcher = Callable[[str], object | None]


def _is_negation(pattern: str) -> bool:
    return pattern.startswith("!") and not pattern.startswith("!(")


def _fmt_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(items) + "]"


def _pattern_label(p: BranchPattern) -> str:
    return p.pattern if p.type == "glob" else f"/{p.pattern}/{p.flags or ''}"


def _needs_units(value: str) -> bool:
    """Whether `value` has characters outside the BMP (glob regexes see JS UTF-16 code units)."""
    return not value.isascii() and max(value) > "\uffff"


@dataclass(frozen=True, slots=True)
class _GlobSet:
    """Any-of over globs (and, for positives, regexes) with `glob.matches` semantics, precompiled: every
    glob's cached regex (a literal glob as an exact-string regex) joined into one alternation, so a value
    costs one regex call. Values with characters outside the BMP take the exact `glob.matches` path.

    The common `<dir>/**` globs skip the regex: with picomatch they match `<dir>` itself and anything
    under `<dir>/` with no segment starting with `.` and no line terminator, which plain string tests
    decide (checked against `glob.matches` by the tests)."""

    dirs: tuple[tuple[str, str], ...]
    """`(<dir>, <dir>/)` for each `<dir>/**` glob."""
    dir_names: frozenset[str]
    dir_prefixes: tuple[str, ...]
    globs: tuple[str, ...]
    fast: Matcher | None
    searches: tuple[Matcher, ...]
    kind: GlobKind

    def hit(self, value: str) -> bool:
        if value in self.dir_names:
            return True
        if self.dir_prefixes and value.startswith(self.dir_prefixes):
            for _, d_slash in self.dirs:
                if value.startswith(d_slash):
                    rest = value[len(d_slash) :]
                    if (
                        not rest.startswith(".")
                        and "/." not in rest
                        and "\n" not in rest
                        and "\r" not in rest
                        and (rest.isascii() or ("\u2028" not in rest and "\u2029" not in rest))
                    ):
                        return True
        fast = self.fast
        if fast is not None and value:
            if value.isascii() or not _needs_units(value):
                if fast(value) is not None:
                    return True
            else:
                for g in self.globs:
                    if glob_matches(g, value, self.kind):
                        return True
        for s in self.searches:  # noqa: SIM110 - a plain loop is faster than any() on this hot path
            if s(value) is not None:
                return True
        return False


_BACKREF = re.compile(r"\\[1-9]|\(\?P=|\(\?\(")


def _alternation(globs: Sequence[str], kind: GlobKind) -> Matcher | None:
    """One `match` callable answering like `any(glob.matches(g, v) for g in globs)` for non-empty BMP `v`."""
    if not globs:
        return None
    sources: list[str] = []
    compiled: list[re.Pattern[str]] = []
    for g in globs:
        if is_glob(g):
            rx = compile_glob(g, kind)
            compiled.append(rx)
            sources.append(rx.pattern)
        else:  # `matches(g, v)` is exactly `v == g`
            sources.append(f"^{re.escape(g)}\\Z")
    if len(globs) == 1 and compiled:
        return compiled[0].match
    if any(_BACKREF.search(src) for src in sources):  # numbered references would shift when joined
        matchers = tuple(rx.match for rx in compiled)
        literals = frozenset(g for g in globs if not is_glob(g))
        return partial(_first_match, literals, matchers)
    return re.compile("|".join(f"(?:{src})" for src in sources), re.ASCII).match


def _first_match(literals: frozenset[str], matchers: tuple[Matcher, ...], value: str) -> object | None:
    if value in literals:
        return True
    for m in matchers:
        hit = m(value)
        if hit is not None:
            return hit
    return None


def _globstar_dir(glob: str) -> str | None:
    """`<dir>` if `glob` is exactly `<dir>/**` with a plain (non-glob) `<dir>`, else None."""
    if not glob.endswith("/**"):
        return None
    d = glob[:-3]
    if not d or d.endswith("/") or is_glob(d) or d.startswith(".") or "/." in d:
        return None
    return d


def _glob_set(globs: Sequence[str], kind: GlobKind, regexes: Sequence[BranchPattern] = ()) -> _GlobSet:
    usable = tuple(dict.fromkeys(g for g in globs if g))  # an empty glob matches nothing
    dirs = [(d, d + "/") for d in map(_globstar_dir, usable) if d is not None]
    rest = tuple(g for g in usable if _globstar_dir(g) is None)
    searches = tuple(rx.search for rx in (_regex(r.pattern, r.flags) for r in regexes) if rx is not None)
    return _GlobSet(
        tuple(dirs),
        frozenset(d for d, _ in dirs),
        tuple(d_slash for _, d_slash in dirs),
        rest,
        _alternation(rest, kind),
        searches,
        kind,
    )


@dataclass(frozen=True, slots=True)
class _Patterns:
    """A compiled pattern list: a value passes if it matches a positive (or there are no positives)
    and no `!` exclusion."""

    label: str
    positives: _GlobSet | None
    negatives: _GlobSet | None

    def verdict(self, value: str) -> str | None:
        """None if `value` passes; else "excluded by" or "not in"."""
        if self.negatives is not None and self.negatives.hit(value):
            return "excluded by"
        if self.positives is None or self.positives.hit(value):
            return None
        return "not in"


def _split(globs: Sequence[str]) -> tuple[list[str], list[str]]:
    positives = [g for g in globs if not _is_negation(g)]
    negatives = [g[1:] for g in globs if _is_negation(g)]
    return positives, negatives


def _branch_patterns(patterns: Sequence[BranchPattern]) -> _Patterns | None:
    if not patterns:
        return None
    regexes = [p for p in patterns if p.type == "regex"]
    positives, negatives = _split([p.pattern for p in patterns if p.type == "glob"])
    label = _fmt_list([_pattern_label(p) for p in patterns])
    return _Patterns(
        label,
        _glob_set(positives, "branch", regexes) if positives or regexes else None,
        _glob_set(negatives, "branch") if negatives else None,
    )


def _glob_patterns(patterns: Sequence[str] | None, kind: GlobKind = "branch") -> _Patterns | None:
    if not patterns:
        return None
    positives, negatives = _split(patterns)
    return _Patterns(
        _fmt_list(list(patterns)),
        _glob_set(positives, kind) if positives else None,
        _glob_set(negatives, kind) if negatives else None,
    )


@dataclass(frozen=True, slots=True)
class _PathFilter:
    label: str
    positives: _GlobSet | None
    negatives: _GlobSet | None

    def check(self, files: list[str] | None) -> tuple[bool, str]:
        if not files:
            return False, f"no changed files for paths filter {self.label}"
        negatives, positives = self.negatives, self.positives
        remaining = 0
        for f in files:
            if negatives is not None and negatives.hit(f):
                continue
            if positives is None:
                return True, f"changed file {f!r} not excluded by paths {self.label}"
            remaining += 1
            if positives.hit(f):
                return True, f"changed file {f!r} matched paths {self.label}"
        if remaining == 0:
            return False, f"all changed files excluded by paths {self.label}"
        return False, f"no changed file matches paths {self.label}"


def _path_filter(paths: Sequence[str]) -> _PathFilter | None:
    if not paths:
        return None
    positives, negatives = _split(paths)
    return _PathFilter(
        _fmt_list(list(paths)),
        _glob_set(positives, "path") if positives else None,
        _glob_set(negatives, "path") if negatives else None,
    )


# ------------------------------------------------------------------------------------------ compiled triggers

Check = Callable[[Event], str | None]
"""A filter: None when the event passes, else the reason it does not."""


@dataclass(frozen=True, slots=True)
class _Compiled:
    type: str
    event_type: str | None
    """The event type this trigger can match; None for the catch-all webhook trigger."""
    checks: tuple[Check, ...]
    paths: _PathFilter | None
    describe: Callable[[Event], str]
    """The reason text for a match (before any paths detail)."""

    mismatch: dict[str, str] = field(default_factory=dict)
    """Cached "does not match <type> events" reasons, by event type."""

    def prefilter(self, event: Event) -> str | None:
        if self.event_type is not None and event.type != self.event_type:
            why = self.mismatch.get(event.type)
            if why is None:
                why = self.mismatch[event.type] = f"{self.type} trigger does not match {event.type} events"
            return why
        for check in self.checks:
            why = check(event)
            if why is not None:
                return why
        return None

    def match(self, event: Event) -> tuple[bool, str]:
        why = self.prefilter(event)
        if why is not None:
            return False, why
        if self.paths is None:
            return True, self.describe(event)
        ok, detail = self.paths.check(event.changed_files)
        if not ok:
            return False, detail
        return True, f"{self.describe(event)}, {detail}"


_cache: dict[int, tuple[weakref.ref[Any], _Compiled]] = {}
_workflow_cache: dict[int, tuple[weakref.ref[Any], tuple[_Compiled, ...]]] = {}


def _compiled_triggers(workflow: Workflow) -> tuple[_Compiled, ...]:
    """A workflow's compiled triggers, cached by workflow identity (lock files are parsed once and
    cached, so the same objects come back for every event)."""
    key = id(workflow)
    entry = _workflow_cache.get(key)
    if entry is not None and entry[0]() is workflow:
        return entry[1]
    compiled = tuple(_compiled(t) for t in workflow.triggers)

    def _forget(ref: weakref.ref[Any], key: int = key) -> None:
        current = _workflow_cache.get(key)
        if current is not None and current[0] is ref:
            _workflow_cache.pop(key, None)

    _workflow_cache[key] = (weakref.ref(workflow, _forget), compiled)
    return compiled


def _compiled(trigger: Trigger) -> _Compiled:
    key = id(trigger)
    entry = _cache.get(key)
    if entry is not None and entry[0]() is trigger:
        return entry[1]
    compiled = _compile(trigger)

    def _forget(ref: weakref.ref[Any], key: int = key) -> None:
        current = _cache.get(key)
        if current is not None and current[0] is ref:
            _cache.pop(key, None)

    _cache[key] = (weakref.ref(trigger, _forget), compiled)
    return compiled


# The compile functions below must not let closures capture the trigger model itself: the cache entry
# would then keep it alive forever.


def _in_list(label: str, what: str, allowed: Sequence[str], get: Callable[[Event], str | None]) -> Check:
    """A filter requiring `get(event)` to be one of `allowed` (skipped when `allowed` is empty)."""
    allowed_set = frozenset(allowed)
    shown = _fmt_list(list(allowed))

    def check(event: Event) -> str | None:
        value = get(event)
        if value in allowed_set:
            return None
        if value is None:
            return f"event has no {what} for {label} {shown}"
        return f"{what} {value!r} not in {label} {shown}"

    return check


def _equals(label: str, expected: str, get: Callable[[Event], str | None]) -> Check:
    def check(event: Event) -> str | None:
        value = get(event)
        if value == expected:
            return None
        if value is None:
            return f"event has no {label} (want {expected!r})"
        return f"{label} {value!r} is not {expected!r}"

    return check


def _patterns_check(what: str, label: str, pats: _Patterns, get: Callable[[Event], str | None]) -> Check:
    def check(event: Event) -> str | None:
        value = get(event)
        if value is None:
            return f"event has no {what} for {label} {pats.label}"
        verdict = pats.verdict(value)
        if verdict is None:
            return None
        return f"{what} {value!r} {verdict} {label} {pats.label}"

    return check


def _payload(event: Event, *keys: str) -> Any:
    current: Any = event.payload
    for k in keys:
        if not isinstance(current, Mapping):
            return None
        current = current.get(k)
    return current


def _payload_str(*keys: str) -> Callable[[Event], str | None]:
    def get(event: Event) -> str | None:
        value = _payload(event, *keys)
        return value if isinstance(value, str) else None

    return get


def _action(event: Event) -> str | None:
    return event.action


def _actions_check(actions: Sequence[str]) -> list[Check]:
    return [_in_list("actions", "action", actions, _action)] if actions else []


def _repos_check(repos: Sequence[str] | None) -> list[Check]:
    pats = _glob_patterns(repos)
    if pats is None:
        return []
    return [_patterns_check("repo", "repos", pats, lambda e: e.repo)]


def _filters_suffix(parts: Sequence[tuple[str, str | None]]) -> str:
    shown = [f"{name} {label}" for name, label in parts if label is not None]
    return " matched " + ", ".join(shown) if shown else ""


def _compile(trigger: Trigger) -> _Compiled:
    compiler = _COMPILERS.get(type(trigger))
    if compiler is None:  # pragma: no cover - every lock-file trigger model is registered
        raise TypeError(f"unknown trigger model {type(trigger).__name__}")
    return compiler(trigger)


def _compile_push(t: PushTrigger) -> _Compiled:
    checks: list[Check] = []
    branches = _branch_patterns(t.branches)
    if branches is not None:
        checks.append(_patterns_check("branch", "branches", branches, lambda e: e.branch))
    checks += _repos_check(t.repos)
    suffix = _filters_suffix(
        [
            ("branches", branches.label if branches else None),
            ("repos", _fmt_list(t.repos) if t.repos else None),
        ]
    )

    def describe(event: Event) -> str:
        return f"push to {event.branch!r}{suffix or ' (any push)'}"

    return _Compiled("push", "push", tuple(checks), _path_filter(t.paths), describe)


def _compile_pr(t: PrTrigger) -> _Compiled:
    checks: list[Check] = []
    if t.events:
        checks.append(_in_list("events", "action", t.events, _action))
    target = _branch_patterns(t.target_branches)
    if target is not None:
        checks.append(_patterns_check("target branch", "target branches", target, lambda e: e.target_branch))
    source = _branch_patterns(t.source_branches)
    if source is not None:
        checks.append(_patterns_check("source branch", "source branches", source, lambda e: e.source_branch))
    checks += _repos_check(t.repos)
    suffix = _filters_suffix(
        [
            ("events", _fmt_list(t.events) if t.events else None),
            ("target branches", target.label if target else None),
            ("source branches", source.label if source else None),
            ("repos", _fmt_list(t.repos) if t.repos else None),
        ]
    )

    def describe(event: Event) -> str:
        return f"pr {event.action} {event.source_branch!r} -> {event.target_branch!r}{suffix}"

    return _Compiled("pr", "pr", tuple(checks), _path_filter(t.paths), describe)


def _compile_tag(t: TagTrigger) -> _Compiled:
    patterns = _branch_patterns(t.patterns)
    checks: list[Check] = []
    if patterns is not None:
        checks.append(_patterns_check("tag", "patterns", patterns, lambda e: e.tag))
    suffix = f" matched patterns {patterns.label}" if patterns else " (any tag)"

    def describe(event: Event) -> str:
        return f"tag {event.tag!r}{suffix}"

    return _Compiled("tag", "tag", tuple(checks), None, describe)


def _comment_on_pr(event: Event) -> bool:
    issue = _payload(event, "issue")
    return isinstance(issue, Mapping) and issue.get("pull_request") is not None


def _compile_comment(t: CommentTrigger) -> _Compiled:
    checks = _actions_check(t.actions)
    if t.source == "pr":
        checks.append(lambda e: None if _comment_on_pr(e) else "comment is on an issue, not a pull request")
    elif t.source == "issue":
        checks.append(lambda e: "comment is on a pull request, not an issue" if _comment_on_pr(e) else None)
    if t.body_match is not None:
        body = _branch_patterns([t.body_match])
        assert body is not None
        get_body = _payload_str("comment", "body")

        def body_check(event: Event) -> str | None:
            text = get_body(event)
            if text is None:
                return "comment has no body"
            if body.verdict(text) is None:
                return None
            return f"comment body does not match {body.label}"

        checks.append(body_check)
    suffix = _filters_suffix(
        [
            ("actions", _fmt_list(t.actions) if t.actions else None),
            ("source", t.source),
            ("body", _pattern_label(t.body_match) if t.body_match else None),
        ]
    )
    return _Compiled("comment", "comment", tuple(checks), None, lambda e: f"comment {e.action}{suffix}")


def _compile_review(t: ReviewTrigger) -> _Compiled:
    checks = _actions_check(t.actions)
    if t.states:
        get_state = _payload_str("review", "state")
        checks.append(_in_list("states", "review state", [s.lower() for s in t.states], lambda e: _lower(get_state(e))))
    suffix = _filters_suffix(
        [
            ("actions", _fmt_list(t.actions) if t.actions else None),
            ("states", _fmt_list(t.states) if t.states else None),
        ]
    )
    return _Compiled("review", "review", tuple(checks), None, lambda e: f"review {e.action}{suffix}")


def _lower(value: str | None) -> str | None:
    return value.lower() if value is not None else None


def _compile_actions_only(
    t: ReviewCommentTrigger | ReleaseTrigger | StarTrigger | WatchTrigger,
) -> _Compiled:
    kind = t.type
    suffix = _filters_suffix([("actions", _fmt_list(t.actions) if t.actions else None)])
    return _Compiled(kind, kind, tuple(_actions_check(t.actions)), None, lambda e: f"{kind} {e.action}{suffix}")


def _compile_fork(t: ForkTrigger) -> _Compiled:
    return _Compiled("fork", "fork", (), None, lambda e: "fork (any fork)")


def _dispatch_type(event: Event) -> str | None:
    """The dispatch type: `event.name`, except for a raw GitHub `repository_dispatch` (whose type is
    carried as the action, as GitHub's payload does)."""
    if event.name == "repository_dispatch" and event.action is not None:
        return event.action
    return event.name


def _compile_dispatch(t: DispatchTrigger) -> _Compiled:
    checks: list[Check] = []
    if t.types:
        checks.append(_in_list("types", "dispatch type", t.types, _dispatch_type))
    suffix = f" matched types {_fmt_list(t.types)}" if t.types else " (any dispatch)"
    return _Compiled("dispatch", "dispatch", tuple(checks), None, lambda e: f"dispatch {_dispatch_type(e)!r}{suffix}")


def _ref_type(event: Event) -> str | None:
    value = _payload(event, "ref_type")
    if isinstance(value, str):
        return value
    if event.tag is not None:
        return "tag"
    if event.branch is not None:
        return "branch"
    return None


def _ref_name(event: Event) -> str | None:
    value = _payload(event, "ref")
    if isinstance(value, str):
        return value
    return event.tag if event.tag is not None else event.branch


def _compile_ref(t: CreateTrigger | DeleteTrigger) -> _Compiled:
    kind = t.type
    checks: list[Check] = []
    if t.ref_types:
        checks.append(_in_list("ref types", "ref type", list(t.ref_types), _ref_type))
    patterns = _branch_patterns(t.patterns)
    if patterns is not None:
        checks.append(_patterns_check("ref", "patterns", patterns, _ref_name))
    suffix = _filters_suffix(
        [
            ("ref types", _fmt_list(list(t.ref_types)) if t.ref_types else None),
            ("patterns", patterns.label if patterns else None),
        ]
    )
    return _Compiled(kind, kind, tuple(checks), None, lambda e: f"{kind} {_ref_type(e)} {_ref_name(e)!r}{suffix}")


def _compile_status(t: StatusTrigger) -> _Compiled:
    checks: list[Check] = []
    contexts = _glob_patterns(t.contexts)
    if contexts is not None:
        checks.append(_patterns_check("context", "contexts", contexts, _payload_str("context")))
    if t.states:
        get_state = _payload_str("state")
        checks.append(_in_list("states", "state", t.states, lambda e: get_state(e) or e.status))
    suffix = _filters_suffix(
        [
            ("contexts", contexts.label if contexts else None),
            ("states", _fmt_list(t.states) if t.states else None),
        ]
    )
    return _Compiled("status", "status", tuple(checks), None, lambda e: f"status{suffix or ' (any)'}")


def _workflow_run_name(event: Event) -> str | None:
    name = _payload(event, "workflow_run", "name")
    if isinstance(name, str) and name:
        return name
    name = _payload(event, "workflow", "name")  # GitHub sends an empty run name at times
    return name if isinstance(name, str) and name else None


def _compile_workflow_run(t: WorkflowRunTrigger) -> _Compiled:
    checks = _actions_check(t.actions)
    if t.workflows:
        checks.append(_in_list("workflows", "workflow", t.workflows, _workflow_run_name))
    if t.conclusions:
        checks.append(_in_list("conclusions", "conclusion", t.conclusions, _payload_str("workflow_run", "conclusion")))
    suffix = _filters_suffix(
        [
            ("actions", _fmt_list(t.actions) if t.actions else None),
            ("workflows", _fmt_list(t.workflows) if t.workflows else None),
            ("conclusions", _fmt_list(t.conclusions) if t.conclusions else None),
        ]
    )
    return _Compiled(
        "workflow_run",
        "workflow_run",
        tuple(checks),
        None,
        lambda e: f"workflow_run {_workflow_run_name(e)!r} {e.action}{suffix}",
    )


def _raw_name(event: Event) -> str | None:
    return event.name or event.type


def _compile_webhook(t: WebhookTrigger) -> _Compiled:
    checks: list[Check] = []
    if t.events:
        checks.append(_in_list("events", "event", t.events, _raw_name))
    checks += _actions_check(t.actions)
    suffix = _filters_suffix(
        [
            ("events", _fmt_list(t.events) if t.events else None),
            ("actions", _fmt_list(t.actions) if t.actions else None),
        ]
    )
    return _Compiled("webhook", None, tuple(checks), None, lambda e: f"webhook {_raw_name(e)!r}{suffix or ' (any)'}")


def _payload_checks(match: Mapping[str, Any] | None, not_: Mapping[str, Any] | None) -> list[Check]:
    """Precompiled `match` (all entries must match) and `not` (any entry matching blocks) filters."""
    checks: list[Check] = []
    for path, expected in (match or {}).items():
        checks.append(_payload_entry(path, expected, negate=False))
    for path, expected in (not_ or {}).items():
        checks.append(_payload_entry(path, expected, negate=True))
    return checks


def _payload_entry(path: str, expected: Any, *, negate: bool) -> Check:
    try:
        segments = parse_json_path(path)
    except ValueError as exc:
        message = f"invalid JSONPath in {'not' if negate else 'match'}: {exc}"
        return lambda e: message
    pred = _value_predicate(expected)
    shown = json.dumps(expected, ensure_ascii=False, default=str)

    def check(event: Event) -> str | None:
        found, actual = _walk(event.payload, segments)
        hit = found and pred(actual)
        if negate:
            return f"payload {path} matches not {shown}" if hit else None
        if hit:
            return None
        if not found:
            return f"payload has no {path} (match {shown})"
        return f"payload {path} = {json.dumps(actual, default=str)[:80]} does not match {shown}"

    return check


def _source(event: Event) -> str | None:
    return event.source


def _compile_kici_event(t: KiciEventTrigger) -> _Compiled:
    checks: list[Check] = [_equals("event name", t.event_name, lambda e: e.name)]
    if t.source is not None:
        checks.append(_equals("source", t.source, _source))
    checks += _payload_checks(t.match, t.not_)
    name = t.event_name
    return _Compiled("kici_event", "kici_event", tuple(checks), None, lambda e: f"kici_event {name!r} matched")


def _compile_generic_webhook(t: GenericWebhookTrigger) -> _Compiled:
    # `path` is not matched here: it selects the generic source's URL at ingest, which is the
    # orchestrator's routing concern (the event then carries the source name in `event.source`).
    checks: list[Check] = [_equals("source", t.source, _source)]
    if t.events:
        checks.append(_in_list("events", "event", t.events, lambda e: e.name))
    checks += _payload_checks(t.match, t.not_)
    source = t.source
    return _Compiled(
        "generic_webhook",
        "generic_webhook",
        tuple(checks),
        None,
        lambda e: f"generic_webhook {e.name!r} from {source!r} matched",
    )


def _compile_workflow_complete(t: WorkflowCompleteTrigger) -> _Compiled:
    checks: list[Check] = []
    if t.name is not None:
        checks.append(_equals("workflow", t.name, lambda e: e.workflow))
    if t.status:
        checks.append(_in_list("status", "status", t.status, lambda e: e.status))
    if t.source is not None:
        checks.append(_equals("source", t.source, _source))
    return _Compiled(
        "workflow_complete",
        "workflow_complete",
        tuple(checks),
        None,
        lambda e: f"workflow {e.workflow!r} completed with {e.status!r}",
    )


def _compile_job_complete(t: JobCompleteTrigger) -> _Compiled:
    checks: list[Check] = []
    if t.workflow is not None:
        checks.append(_equals("workflow", t.workflow, lambda e: e.workflow))
    if t.job is not None:
        checks.append(_equals("job", t.job, lambda e: e.job))
    if t.status:
        checks.append(_in_list("status", "status", t.status, lambda e: e.status))
    if t.source is not None:
        checks.append(_equals("source", t.source, _source))
    return _Compiled(
        "job_complete",
        "job_complete",
        tuple(checks),
        None,
        lambda e: f"job {e.workflow!r}/{e.job!r} completed with {e.status!r}",
    )


def _compile_schedule(t: ScheduleTrigger) -> _Compiled:
    cron = t.cron_expression

    def check(event: Event) -> str | None:
        if event.name is None or event.name == cron:
            return None
        return f"schedule {event.name!r} is not this trigger's cron {cron!r}"

    return _Compiled("schedule", "schedule", (check,), None, lambda e: f"schedule {cron!r}")


_COMPILERS: dict[type, Callable[[Any], _Compiled]] = {
    PushTrigger: _compile_push,
    PrTrigger: _compile_pr,
    TagTrigger: _compile_tag,
    CommentTrigger: _compile_comment,
    ReviewTrigger: _compile_review,
    ReviewCommentTrigger: _compile_actions_only,
    ReleaseTrigger: _compile_actions_only,
    StarTrigger: _compile_actions_only,
    WatchTrigger: _compile_actions_only,
    ForkTrigger: _compile_fork,
    DispatchTrigger: _compile_dispatch,
    CreateTrigger: _compile_ref,
    DeleteTrigger: _compile_ref,
    StatusTrigger: _compile_status,
    WorkflowRunTrigger: _compile_workflow_run,
    WebhookTrigger: _compile_webhook,
    KiciEventTrigger: _compile_kici_event,
    WorkflowCompleteTrigger: _compile_workflow_complete,
    JobCompleteTrigger: _compile_job_complete,
    GenericWebhookTrigger: _compile_generic_webhook,
    ScheduleTrigger: _compile_schedule,
}
