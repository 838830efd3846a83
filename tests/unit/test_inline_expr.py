from __future__ import annotations

import ast
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kici.engine import inline_expr
from kici.engine.events import Event
from kici.engine.inline_expr import (
    MAX_NODES,
    MAX_SOURCE_LENGTH,
    MAX_STRING_LENGTH,
    ImpureExpressionError,
    InlineEvalError,
    InlineExprError,
    check_pure,
    evaluate,
    resolve_str,
)
from kici.engine.lockfile import InlineExpr

PUSH = Event(
    type="push",
    branch="main",
    target_branch="main",
    ref="refs/heads/main",
    sha="0123456789abcdef",
    repo="acme/app",
    actor="Alice",
    payload={"pusher": {"name": "alice"}, "commits": [{"id": "c1"}, {"id": "c2"}], "size": 2},
    inputs={"env": "qa"},
)
PR = Event(
    type="pr",
    action="opened",
    branch="feature/X",
    source_branch="feature/X",
    target_branch="release/1.0",
    repo="acme/app",
    source_repo="fork/app",
)


# ---------------------------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize(
    ("source", "event", "expected"),
    [
        ('lambda event: f"deploy-{event.target_branch}"', PUSH, "deploy-main"),
        ('lambda e: "prod" if e.branch == "main" else "staging"', PUSH, "prod"),
        ('lambda e: "prod" if e.branch == "main" else "staging"', PR, "staging"),
        ("lambda e: e.branch.lower()", PR, "feature/x"),
        ("lambda e: e.actor.upper()", PUSH, "ALICE"),
        ("lambda e: e.sha[:7]", PUSH, "0123456"),
        ("lambda e: e.sha[-4:]", PUSH, "cdef"),
        ("lambda e: e.ref.removeprefix('refs/heads/')", PUSH, "main"),
        ("lambda e: e.branch.replace('/', '-')", PR, "feature-X"),
        ("lambda e: e.target_branch.split('/')[0]", PR, "release"),
        ("lambda e: '-'.join([e.repo, e.branch])", PUSH, "acme/app-main"),
        ("lambda e: e.branch.startswith('feature/')", PR, True),
        ("lambda e: e.branch.endswith(('x', 'X'))", PR, True),
        ("lambda e: '  a '.strip()", PUSH, "a"),
        ('lambda e: e.payload["pusher"]["name"]', PUSH, "alice"),
        ('lambda e: e.payload["commits"][1]["id"]', PUSH, "c2"),
        ('lambda e: e.payload.get("missing", "dflt")', PUSH, "dflt"),
        ('lambda e: e.payload.get("missing")', PUSH, None),
        ('lambda e: e.inputs.get("env", "prod")', PUSH, "qa"),
        ('lambda e: len(e.payload["commits"])', PUSH, 2),
        ('lambda e: e.payload["size"] * 2 + 1', PUSH, 5),
        ("lambda e: 7 // 2 - 7 % 2 + 1 / 4", PUSH, 2.25),
        ("lambda e: -e.depth - 1", PUSH, -1),
        ('lambda e: int("42") + 1', PUSH, 43),
        ("lambda e: str(e.depth)", PUSH, "0"),
        ('lambda e: f"{e.depth:03d}-{e.branch!r}"', PUSH, "000-'main'"),
        ("lambda e: e.tag is None", PUSH, True),
        ("lambda e: e.tag is not None", PUSH, False),
        ("lambda e: e.is_fork", PR, True),
        ("lambda e: e.type == 'pr' and e.action in ('opened', 'reopened')", PR, True),
        ("lambda e: e.tag or 'no-tag'", PUSH, "no-tag"),
        ("lambda e: not e.changed_files", PUSH, True),
        ("lambda e: 'feature' in e.branch", PR, True),
        ("lambda e: 'x' not in e.payload", PUSH, True),
        ("lambda e: 1 < e.payload['size'] <= 2", PUSH, True),
        ("lambda e: [e.branch, 1]", PUSH, ["main", 1]),
        ("lambda e: (e.branch,)", PUSH, ("main",)),
        ("lambda e: {'b': e.branch}['b']", PUSH, "main"),
        ("lambda e: 'static'", PUSH, "static"),
        ("lambda _: None", PUSH, None),
        ("lambda e, /: e.repo", PUSH, "acme/app"),
        ("  lambda e: e.repo  ", PUSH, "acme/app"),
    ],
)
def test_evaluate(source: str, event: Event, expected: Any) -> None:
    check_pure(source)
    assert evaluate(source, event) == expected


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("lambda e: e.targt_branch", r"no field `targt_branch` \(did you mean `target_branch`\?\)"),
        ("lambda e: e.payload['nope']", "key 'nope' not found"),
        ("lambda e: e.payload.pusher", r"read keys with \['pusher'\]"),
        ("lambda e: e.payload['commits'][5]", "index 5 out of range"),
        ("lambda e: e.branch.nope", "str value has no attribute `nope`"),
        ("lambda e: e", "event itself"),
        ("lambda e: str(e)", "event itself"),
        ("lambda e: f'{e}'", "event itself"),
        ("lambda e: e.get('x')", "the event has no method `get`"),
        ("lambda e: e.branch.get('x')", "str value has no method `get`"),
        ("lambda e: e.payload.lower()", "dict value has no method `lower`"),
        ("lambda e: 'a' * 3", "unsupported operand types for \\*: str and int"),
        ("lambda e: 'a' + 1", "unsupported operand"),
        ("lambda e: 1 / 0", "division by zero"),
        ("lambda e: e.depth % 0", "division by zero"),
        ("lambda e: int('x1')", "cannot parse"),
        ("lambda e: len(5)", "len\\(\\) takes"),
        ("lambda e: str(e.payload)", "plain value"),
        ("lambda e: f'{e.payload}'", "plain values"),
        ("lambda e: -e.branch", "unary -"),
        ("lambda e: e.depth < 'a'", "TypeError"),
        ("lambda e: 1 in 5", "`in` needs"),
        ("lambda e: e.tag.lower()", "NoneType value has no method `lower`"),
        ("lambda e: e.payload[[1]]", "TypeError"),
        ("lambda e: e.depth[0]", "not subscriptable"),
        ("lambda e: e.branch['a']", "index must be an integer"),
        ("lambda e: e.payload[1:]", "cannot be sliced"),
        ("lambda e: ''.join([1])", "list of strings"),
    ],
)
def test_evaluation_errors(source: str, message: str) -> None:
    check_pure(source)
    with pytest.raises(InlineEvalError, match=message):
        evaluate(source, PUSH)


def test_errors_share_a_value_error_base() -> None:
    assert issubclass(ImpureExpressionError, InlineExprError)
    assert issubclass(InlineEvalError, InlineExprError)
    assert issubclass(InlineExprError, ValueError)


# ---------------------------------------------------------------------------------------------- purity


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ('lambda e: __import__("os")', "call of `__import__`"),
        ("lambda e: e.__class__", "attribute `__class__`"),
        ("lambda e: e._private", "attribute `_private`"),
        ("lambda e: e.branch.__len__()", "call of"),
        ('lambda e: open("x")', "call of `open`"),
        ("lambda e: [x for x in e.payload]", "list comprehension"),
        ("lambda e: {x: 1 for x in e.payload}", "dict comprehension"),
        ("lambda e: (x for x in e.payload)", "generator expression"),
        ("lambda e: {1, 2}", "set literal"),
        ("lambda e: (y := 1)", "assignment expression"),
        ("lambda e: lambda: 1", "nested lambda"),
        ("lambda e: e.branch.format()", "call of `e.branch.format`"),
        ("lambda e: print(*e.payload)", "star-arguments"),
        ("lambda e: str(object=1)", "keyword arguments"),
        ("lambda e: {**e.payload}", r"`\*\*` unpacking"),
        ("lambda e: [*e.payload]", "star-unpacking"),
        ("lambda e: str", "`str` may only be called"),
        ("lambda e: x", "name `x` is not allowed"),
        ("lambda e: getattr(e, 'branch')", "call of `getattr`"),
        ("lambda e: e(1)", "call of `e`"),
        ("lambda len: len(len)", "call of `len`"),
        ("lambda e: len(1, 2)", r"`len\(\)` takes 1..1 arguments"),
        ("lambda e: 2 ** 10", "operator Pow"),
        ("lambda e: 1 << 2", "operator LShift"),
        ("lambda e: ~1", "unary operator Invert"),
        ("lambda e: e.branch is 'main'", "`is` / `is not`"),
        ("lambda e: b'x'", "constant of type bytes"),
        ("lambda e: 1j", "constant of type complex"),
        ("lambda e: ...", "constant of type ellipsis"),
        (f"lambda e: {2**200}", "larger than"),
        ("lambda e: f'{e.branch:{e.sha}}'", "format specs must be constant"),
        ("lambda e: f'{e.branch:>100000}'", "format spec '>100000'"),
        ("lambda e: await e", "await"),
        ("lambda e: e.branch if e else (yield)", "yield"),
    ],
)
def test_impure_expressions_are_rejected(source: str, message: str) -> None:
    with pytest.raises(ImpureExpressionError, match=message):
        check_pure(source)
    with pytest.raises(ImpureExpressionError):
        evaluate(source, PUSH)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("lambda e, f: 1", "exactly one parameter"),
        ("lambda: 1", "exactly one parameter"),
        ("lambda *a: 1", "exactly one parameter"),
        ("lambda **k: 1", "exactly one parameter"),
        ("lambda e, *, k: 1", "exactly one parameter"),
        ("lambda e=1: 1", "must not have a default"),
        ("1 + 1", "single `lambda"),
        ("e.branch", "single `lambda"),
        ("def f(e): return 1", "does not parse"),
        ("import os", "does not parse"),
        ("lambda e: (", "does not parse"),
        ("lambda e: 1\nlambda e: 2", "does not parse"),
        ("", "does not parse"),
        ("lambda e: 1\x00", "does not parse"),
        ("(event) => `deploy-${event.targetBranch}`", "does not parse"),
    ],
)
def test_shape_errors(source: str, message: str) -> None:
    with pytest.raises(ImpureExpressionError, match=message):
        check_pure(source)


def test_non_string_source() -> None:
    with pytest.raises(ImpureExpressionError, match="must be a string"):
        check_pure(123)  # type: ignore[arg-type]


def test_size_limits_at_check_time() -> None:
    with pytest.raises(ImpureExpressionError, match="longer than"):
        check_pure("lambda e: " + "1" * MAX_SOURCE_LENGTH)
    many = "lambda e: " + " + ".join(["1"] * MAX_NODES)
    with pytest.raises(ImpureExpressionError, match="too large"):
        check_pure(many)
    # Deep nesting that exhausts the parser is reported, not raised as RecursionError.
    with pytest.raises(ImpureExpressionError):
        check_pure("lambda e: " + "-" * 4000 + "1")


def test_size_limits_at_run_time() -> None:
    big = Event(type="push", payload={"s": "x" * 6000, "n": 2**100})
    with pytest.raises(InlineEvalError, match="longer than"):
        evaluate("lambda e: e.payload['s'] + e.payload['s']", big)
    with pytest.raises(InlineEvalError, match="longer than"):
        evaluate("lambda e: e.payload['s'].replace('x', 'yy')", big)
    with pytest.raises(InlineEvalError, match="longer than"):
        evaluate("lambda e: 'ab'.replace('', e.payload['s'])", big)
    with pytest.raises(InlineEvalError, match="longer than"):
        evaluate("lambda e: '-'.join([e.payload['s'], e.payload['s']])", big)
    with pytest.raises(InlineEvalError, match="longer than"):
        evaluate("lambda e: f\"{e.payload['s']}{e.payload['s']}\"", big)
    with pytest.raises(InlineEvalError, match="bits"):
        evaluate("lambda e: e.payload['n'] * e.payload['n']", big)
    with pytest.raises(InlineEvalError, match="64 characters"):
        evaluate("lambda e: int(e.payload['s'])", big)
    # Reading a large value is fine; only building one is capped.
    assert evaluate("lambda e: len(e.payload['s'])", big) == 6000
    assert evaluate("lambda e: e.payload['s'][:3]", big) == "xxx"
    assert len(evaluate("lambda e: e.payload['s'].replace('x', 'y', 10)", big)) == 6000
    at_cap = Event(type="push", payload={"s": "x" * (MAX_STRING_LENGTH // 2)})
    assert len(evaluate("lambda e: e.payload['s'] + e.payload['s']", at_cap)) == MAX_STRING_LENGTH


def test_short_circuit_skips_failing_branches() -> None:
    assert evaluate("lambda e: e.tag and e.tag.lower()", PUSH) is None
    assert evaluate("lambda e: e.branch or e.payload['nope']", PUSH) == "main"
    assert evaluate("lambda e: 'x' if True else 1 / 0", PUSH) == "x"
    assert evaluate("lambda e: 1 > 2 > e.payload['nope']", PUSH) is False


def test_no_eval_exec_or_compile_is_used() -> None:
    # The module must be an interpreter; these names may not be called anywhere in it.
    with open(inline_expr.__file__, encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    called = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert not called & {"eval", "exec", "compile", "__import__"}


def test_event_is_not_mutated() -> None:
    event = Event(type="push", payload={"a": {"b": 1}})
    evaluate("lambda e: e.payload.get('a')", event)
    assert event.payload == {"a": {"b": 1}}


def test_resolve_str() -> None:
    assert resolve_str(None, PUSH) is None
    assert resolve_str("production", PUSH) == "production"
    assert resolve_str(InlineExpr(expression="lambda e: f'deploy-{e.branch}'"), PUSH) == "deploy-main"
    with pytest.raises(InlineEvalError, match="not a string"):
        resolve_str(InlineExpr(expression="lambda e: e.depth"), PUSH)
    with pytest.raises(ImpureExpressionError):  # a lock file that bypassed validation is still refused
        resolve_str(InlineExpr.model_construct(expression="lambda e: open('x')"), PUSH)
    with pytest.raises(ValueError, match=r"not allowed|not a pure|call"):
        InlineExpr(expression="lambda e: open('x')")  # and parsing rejects it in the first place


# ---------------------------------------------------------------------------------------------- fuzzing

_TOKENS = [
    "lambda", " ", "e", ":", "e.", "branch", "payload", "(", ")", "[", "]", "{", "}", "'a'", '"b"', "1",
    "0", "-", "+", "*", "/", "%", "**", "if", "else", "and", "or", "not", "in", "is", "None", ",",
    "f'{", "}'", "!r", ":>3", ".lower()", "str", "len", "int", "__class__", "_x", "for", "x", "=",
    ":=", "\\", "\n", "yield", "await", "lambda e:", "...", "[::-1]", "'''", "#",
]  # fmt: skip


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_random_text_only_raises_impure_expression_error(source: str) -> None:
    try:
        check_pure(source)
    except ImpureExpressionError:
        pass


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_TOKENS), max_size=40).map("".join))
def test_token_soup_only_raises_inline_errors(source: str) -> None:
    source = "lambda e: " + source
    try:
        check_pure(source)
    except ImpureExpressionError:
        return
    # Whatever passes the check evaluates to data or fails with InlineEvalError — nothing else.
    try:
        evaluate(source, PUSH)
    except InlineEvalError:
        pass


_LEAVES = [
    "e.branch", "e.tag", "e.depth", "e.sha", "e.payload", "e.inputs", "e.changed_files", "e.is_fork",
    "e.payload['commits']", "e.payload['size']", "'a'", "'main'", "''", "1", "0", "-3", "2.5", "None",
    "True", "[]",
]  # fmt: skip
_BINARY = ["+", "-", "*", "/", "//", "%", "==", "!=", "<", ">=", "in", "not in", "and", "or"]
_UNARY = [
    "(not {})", "(-{})", "{}[0]", "{}[1:-1]", "{}['k']", "str({})", "len({})", "int({})", "({}).lower()",
    "({}).split('/')", "({} is None)",
]  # fmt: skip
_PAIR = ["({}).replace('a', {})", "({}).get('k', {})", "'-'.join([{}, {}])", "[{}, {}]", "{{'k': {}, 'v': {}}}"]


@st.composite
def _expression(draw: st.DrawFn, depth: int = 0) -> str:
    """A random expression from the accepted grammar (a composite keeps hypothesis' reprs small)."""
    kind = draw(st.integers(0, 4)) if depth < 4 else 0
    if kind == 0:
        return draw(st.sampled_from(_LEAVES))
    if kind == 1:
        return draw(st.sampled_from(_UNARY)).format(draw(_expression(depth + 1)))
    if kind == 2:
        return draw(st.sampled_from(_PAIR)).format(draw(_expression(depth + 1)), draw(_expression(depth + 1)))
    if kind == 3:
        parts = [draw(_expression(depth + 1)) for _ in range(3)]
        return f"({parts[0]} if {parts[1]} else {parts[2]})"
    left, right = draw(_expression(depth + 1)), draw(_expression(depth + 1))
    return f"({left} {draw(st.sampled_from(_BINARY))} {right})"


_BODIES = st.one_of(_expression(), _expression().map(lambda a: f'f"<{{ ({a}) }}>"'))


@settings(max_examples=250, suppress_health_check=[HealthCheck.too_slow])
@given(_BODIES)
def test_grammar_expressions_pass_and_evaluate_safely(body: str) -> None:
    source = f"lambda e: {body}"
    check_pure(source)  # everything this grammar builds is allowed
    for event in (PUSH, PR):
        try:
            result = evaluate(source, event)
        except InlineEvalError:
            continue
        assert not isinstance(result, Event)
