"""Pure `lambda event: …` expressions from the lock file, checked and evaluated without running Python.

Values the orchestrator needs before dispatch (an environment name, a concurrency group) may be given
as a lambda of the event. The compiler stores the lambda's source; the orchestrator — which never runs
workflow code — evaluates it here with a small AST interpreter. Nothing reaches `eval`, `exec` or
`compile`, and only this grammar is accepted:

- one `lambda` with exactly one positional parameter (any name) and no defaults;
- constants (str, int, float, bool, None), the parameter, attribute access (never a name starting with
  `_`), subscripts and slices, f-strings with constant format specs, `and`/`or`/`not`, comparisons
  (`is`/`is not` only against None/True/False), unary `-`, `+ - * / // %` on numbers and `+` on
  strings, `x if c else y`, tuple/list/dict literals;
- calls of `str(x)`, `int(x)`, `len(x)`, the string methods `lower upper strip lstrip rstrip replace
  startswith endswith split join removeprefix removesuffix`, and `dict.get(key[, default])`.

On the event only its fields (and `is_fork`) can be read; dicts (`event.payload`, `event.inputs`) are
read with `["key"]` or `.get("key", default)`.

Cost is bounded without a step counter: the grammar has no loops, comprehensions or user functions,
so evaluation visits each node at most once, and the source may hold at most `MAX_NODES` nodes. Each
operation that builds a string or an integer is capped (`MAX_STRING_LENGTH`, `MAX_INT_BITS`), with
`replace`/`join`/`+` checked *before* building the result, so a hostile lock file cannot make the
orchestrator allocate without bound.
"""

from __future__ import annotations

import ast
import difflib
import re
import warnings
from functools import lru_cache
from typing import Any, NamedTuple, TypeVar

from kici.engine.events import Event
from kici.engine.lockfile import InlineExpr

_T = TypeVar("_T")

MAX_SOURCE_LENGTH = 4096
MAX_NODES = 200
MAX_STRING_LENGTH = 10 * 1024
MAX_INT_BITS = 128


class InlineExprError(ValueError):
    """Base of both inline-expression errors."""


class ImpureExpressionError(InlineExprError):
    """The source is not a pure lambda this module accepts; the message says what is wrong."""


class InlineEvalError(InlineExprError):
    """The expression is well-formed but failed on this event (missing field, wrong type, …)."""


# name → (min args, max args)
_BUILTINS: dict[str, tuple[int, int]] = {"str": (0, 1), "int": (1, 1), "len": (1, 1)}
_STR_METHODS: dict[str, tuple[int, int]] = {
    "lower": (0, 0),
    "upper": (0, 0),
    "strip": (0, 1),
    "lstrip": (0, 1),
    "rstrip": (0, 1),
    "replace": (2, 3),
    "startswith": (1, 3),
    "endswith": (1, 3),
    "split": (0, 2),
    "join": (1, 1),
    "removeprefix": (1, 1),
    "removesuffix": (1, 1),
}
_DICT_METHODS: dict[str, tuple[int, int]] = {"get": (1, 2)}
_METHODS: dict[str, tuple[int, int]] = {**_STR_METHODS, **_DICT_METHODS}

_BIN_OPS: dict[type[ast.operator], str] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
}
_CMP_OPS: tuple[type[ast.cmpop], ...] = (
    ast.Eq,
    ast.NotEq,
    ast.Lt,
    ast.LtE,
    ast.Gt,
    ast.GtE,
    ast.In,
    ast.NotIn,
    ast.Is,
    ast.IsNot,
)
# A fill/align/sign/width/precision/type spec with width and precision of at most three digits:
# `f"{x:>1000000000}"` would otherwise allocate a gigabyte.
_SAFE_FORMAT_SPEC = re.compile(r"(?:.?[<>=^])?[+\- ]?z?#?0?\d{0,3}[,_]?(?:\.\d{1,3})?[bcdeEfFgGnosxX%]?", re.S)

_EVENT_ATTRIBUTES: frozenset[str] = frozenset(Event.model_fields) | {"is_fork"}

_SCALARS = (str, int, float, bool, type(None))
_DATA = (*_SCALARS, list, tuple, dict)

_FRIENDLY: dict[type[ast.AST], str] = {
    ast.Lambda: "a nested lambda",
    ast.ListComp: "a list comprehension",
    ast.SetComp: "a set comprehension",
    ast.DictComp: "a dict comprehension",
    ast.GeneratorExp: "a generator expression",
    ast.NamedExpr: "an assignment expression (:=)",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
    ast.Starred: "star-unpacking",
    ast.Set: "a set literal",
}


class _Compiled(NamedTuple):
    param: str
    body: ast.expr


# ---------------------------------------------------------------------------------------------- purity check


def check_pure(source: str) -> None:
    """Raise `ImpureExpressionError` (with the reason) unless `source` is a lambda this module accepts."""
    _compile_checked(source)


def _compile_checked(source: str) -> _Compiled:
    if not isinstance(source, str):
        raise ImpureExpressionError(f"inline expression must be a string, not {type(source).__name__}")
    return _compile(source)


@lru_cache(maxsize=512)
def _compile(source: str) -> _Compiled:
    if len(source) > MAX_SOURCE_LENGTH:
        raise ImpureExpressionError(f"inline expression is longer than {MAX_SOURCE_LENGTH} characters")
    try:
        # Source the parser warns about (`1if x else 2`, an invalid escape) is rejected rather than left
        # to print warnings on the orchestrator for every evaluation of a hostile lock file.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            tree = ast.parse(source.strip(), mode="eval")
    # Pathological nesting can exhaust the parser's stack rather than produce a SyntaxError.
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError, Warning) as exc:
        detail = exc.msg if isinstance(exc, SyntaxError) else type(exc).__name__
        raise ImpureExpressionError(f"inline expression does not parse: {detail}") from None
    fn = tree.body
    if not isinstance(fn, ast.Lambda):
        raise ImpureExpressionError("inline expression must be a single `lambda event: …`")
    args = fn.args
    params = [*args.posonlyargs, *args.args]
    if len(params) != 1 or args.vararg or args.kwarg or args.kwonlyargs:
        raise ImpureExpressionError("inline lambda must take exactly one parameter (the event)")
    if args.defaults or args.kw_defaults:
        raise ImpureExpressionError("inline lambda parameter must not have a default")
    # Count first, with ast.walk (iterative), so the recursive check below never sees a deep tree.
    nodes = sum(1 for n in ast.walk(fn.body) if isinstance(n, ast.expr))
    if nodes > MAX_NODES:
        raise ImpureExpressionError(f"inline expression is too large ({nodes} nodes; limit {MAX_NODES})")
    param = params[0].arg
    _Checker(param).check(fn.body)
    return _Compiled(param, fn.body)


class _Checker:
    def __init__(self, param: str) -> None:
        self.param = param

    def reject(self, why: str) -> ImpureExpressionError:
        return ImpureExpressionError(f"inline expression is not pure: {why}")

    def check(self, node: ast.expr) -> None:
        if isinstance(node, ast.Constant):
            self.check_constant(node.value)
        elif isinstance(node, ast.Name):
            if node.id == self.param:
                return
            if node.id in _BUILTINS:
                raise self.reject(f"`{node.id}` may only be called")
            raise self.reject(f"name `{node.id}` is not allowed (only the parameter `{self.param}`)")
        elif isinstance(node, ast.Attribute):
            self.check_attr_name(node.attr)
            self.check(node.value)
        elif isinstance(node, ast.Subscript):
            self.check(node.value)
            self.check(node.slice)
        elif isinstance(node, ast.Slice):
            for part in (node.lower, node.upper, node.step):
                if part is not None:
                    self.check(part)
        elif isinstance(node, ast.JoinedStr):
            for value in node.values:
                self.check(value)
        elif isinstance(node, ast.FormattedValue):
            self.check_formatted(node)
        elif isinstance(node, ast.BoolOp):
            for value in node.values:
                self.check(value)
        elif isinstance(node, ast.Compare):
            self.check_compare(node)
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, (ast.Not, ast.USub)):
                raise self.reject(f"unary operator {type(node.op).__name__} is not allowed")
            self.check(node.operand)
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in _BIN_OPS:
                raise self.reject(f"operator {type(node.op).__name__} is not allowed")
            self.check(node.left)
            self.check(node.right)
        elif isinstance(node, ast.IfExp):
            self.check(node.test)
            self.check(node.body)
            self.check(node.orelse)
        elif isinstance(node, (ast.Tuple, ast.List)):
            for elt in node.elts:
                self.check(elt)
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if key is None:
                    raise self.reject("`**` unpacking is not allowed")
                self.check(key)
                self.check(value)
        elif isinstance(node, ast.Call):
            self.check_call(node)
        else:
            what = _FRIENDLY.get(type(node), type(node).__name__)
            raise self.reject(f"{what} is not allowed")

    def check_constant(self, value: object) -> None:
        if not isinstance(value, _SCALARS):
            raise self.reject(f"constant of type {type(value).__name__} is not allowed")
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise self.reject(f"integer constant larger than {MAX_INT_BITS} bits")

    def check_attr_name(self, attr: str) -> None:
        if attr.startswith("_"):
            raise self.reject(f"attribute `{attr}` is not allowed (names starting with `_` are private)")

    def check_formatted(self, node: ast.FormattedValue) -> None:
        if node.conversion not in (-1, ord("s"), ord("r"), ord("a")):
            raise self.reject("unknown f-string conversion")
        self.check(node.value)
        spec = node.format_spec
        if spec is None:
            return
        if not isinstance(spec, ast.JoinedStr) or not all(
            isinstance(v, ast.Constant) and isinstance(v.value, str) for v in spec.values
        ):
            raise self.reject("f-string format specs must be constant")
        text = "".join(str(v.value) for v in spec.values if isinstance(v, ast.Constant))
        if not _SAFE_FORMAT_SPEC.fullmatch(text):
            raise self.reject(f"f-string format spec {text!r} is not allowed")

    def check_compare(self, node: ast.Compare) -> None:
        operands = [node.left, *node.comparators]
        for i, op in enumerate(node.ops):
            if not isinstance(op, _CMP_OPS):
                raise self.reject(f"comparison {type(op).__name__} is not allowed")
            if isinstance(op, (ast.Is, ast.IsNot)) and not any(_is_singleton(o) for o in operands[i : i + 2]):
                raise self.reject("`is` / `is not` may only compare with None, True or False")
        for operand in operands:
            self.check(operand)

    def check_call(self, node: ast.Call) -> None:
        if node.keywords:
            raise self.reject("keyword arguments are not allowed")
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                raise self.reject("star-arguments are not allowed")
        func = node.func
        if isinstance(func, ast.Name) and func.id in _BUILTINS and func.id != self.param:
            arity = _BUILTINS[func.id]
            name = func.id
        elif isinstance(func, ast.Attribute) and func.attr in _METHODS:
            arity = _METHODS[func.attr]
            name = f".{func.attr}"
            self.check(func.value)
        else:
            shown = ast.unparse(func)
            raise self.reject(f"call of `{shown[:60]}` is not allowed (only str, int, len and a few str/dict methods)")
        low, high = arity
        if not low <= len(node.args) <= high:
            raise self.reject(f"`{name}()` takes {low}..{high} arguments, got {len(node.args)}")
        for arg in node.args:
            self.check(arg)


def _is_singleton(node: ast.expr) -> bool:
    # Identity is only deterministic for None/True/False; `x is "a"` depends on string interning.
    return isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, bool))


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate(source: str, event: Event) -> Any:
    """Evaluate the lambda in `source` with `event` as its argument.

    `ImpureExpressionError` if the source is not accepted, `InlineEvalError` if evaluation fails.
    """
    compiled = _compile_checked(source)
    try:
        return _data(_Evaluator(compiled.param, event).ev(compiled.body))
    except InlineExprError:
        raise
    # Whatever Python raises on a bad operand (TypeError, KeyError, ZeroDivisionError, …) is this
    # expression failing on this event, not a bug of the orchestrator.
    except Exception as exc:
        raise InlineEvalError(f"inline expression failed: {type(exc).__name__}: {exc}") from None


def resolve_str(value: str | InlineExpr | None, event: Event) -> str | None:
    """A lock-file value that is either static or an inline lambda (environment name, concurrency
    group), resolved for `event`; an expression must produce a string."""
    if value is None or isinstance(value, str):
        return value
    result = evaluate(value.expression, event)
    if not isinstance(result, str):
        raise InlineEvalError(
            f"inline expression {value.expression[:80]!r} produced {type(result).__name__}, not a string"
        )
    return result


def _data(value: Any) -> Any:
    if isinstance(value, Event):
        raise InlineEvalError("the event itself can only be used to read its fields (e.g. `event.branch`)")
    if not isinstance(value, _DATA):
        raise InlineEvalError(f"value of type {type(value).__name__} cannot be used here")
    return value


def _checked(value: _T) -> _T:
    """Cap the size of a value an operation has just built."""
    if isinstance(value, str) and len(value) > MAX_STRING_LENGTH:
        raise InlineEvalError(f"string result longer than {MAX_STRING_LENGTH} characters")
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        raise InlineEvalError(f"integer result larger than {MAX_INT_BITS} bits")
    return value


def _type(value: Any) -> str:
    return type(value).__name__


class _Evaluator:
    def __init__(self, param: str, event: Event) -> None:
        self.param = param
        self.event = event

    def ev(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return self.event  # the checker allows no other free name outside a call
        if isinstance(node, ast.Attribute):
            return self.attribute(self.ev(node.value), node.attr)
        if isinstance(node, ast.Subscript):
            return self.subscript(node)
        if isinstance(node, ast.JoinedStr):
            return self.fstring(node)
        if isinstance(node, ast.BoolOp):
            return self.boolop(node)
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.UnaryOp):
            operand = _data(self.ev(node.operand))
            if isinstance(node.op, ast.Not):
                return not operand
            if isinstance(operand, (int, float)):
                return _checked(-operand)
            raise InlineEvalError(f"bad operand type for unary -: {_type(operand)}")
        if isinstance(node, ast.BinOp):
            return self.binop(node)
        if isinstance(node, ast.IfExp):
            return self.ev(node.body) if _data(self.ev(node.test)) else self.ev(node.orelse)
        if isinstance(node, ast.Tuple):
            return tuple(_data(self.ev(e)) for e in node.elts)
        if isinstance(node, ast.List):
            return [_data(self.ev(e)) for e in node.elts]
        if isinstance(node, ast.Dict):
            result: dict[Any, Any] = {}
            for key_node, value_node in zip(node.keys, node.values, strict=True):
                if key_node is None:  # pragma: no cover - `**` is rejected by the checker
                    raise InlineEvalError("`**` unpacking is not allowed")
                result[_data(self.ev(key_node))] = _data(self.ev(value_node))
            return result
        if isinstance(node, ast.Call):
            return self.call(node)
        raise InlineEvalError(f"cannot evaluate {type(node).__name__}")  # unreachable after the check

    def attribute(self, obj: Any, attr: str) -> Any:
        if isinstance(obj, Event):
            if attr in _EVENT_ATTRIBUTES:
                return getattr(obj, attr)
            hint = difflib.get_close_matches(attr, sorted(_EVENT_ATTRIBUTES), n=1)
            more = f" (did you mean `{hint[0]}`?)" if hint else ""
            raise InlineEvalError(f"the event has no field `{attr}`{more}")
        if isinstance(obj, dict):
            raise InlineEvalError(f"dict has no attribute `{attr}`; read keys with [{attr!r}] or .get({attr!r})")
        raise InlineEvalError(f"{_type(obj)} value has no attribute `{attr}`")

    def subscript(self, node: ast.Subscript) -> Any:
        obj = _data(self.ev(node.value))
        if isinstance(node.slice, ast.Slice):
            if not isinstance(obj, (str, list, tuple)):
                raise InlineEvalError(f"{_type(obj)} value cannot be sliced")
            parts = [
                None if p is None else _data(self.ev(p)) for p in (node.slice.lower, node.slice.upper, node.slice.step)
            ]
            return _checked(obj[slice(*parts)])
        key = _data(self.ev(node.slice))
        if isinstance(obj, dict):
            try:
                return obj[key]
            except KeyError:
                raise InlineEvalError(f"key {key!r} not found") from None
        if isinstance(obj, (str, list, tuple)):
            if not isinstance(key, int):
                raise InlineEvalError(f"{_type(obj)} index must be an integer, not {_type(key)}")
            try:
                return obj[key]
            except IndexError:
                raise InlineEvalError(f"index {key} out of range (length {len(obj)})") from None
        raise InlineEvalError(f"{_type(obj)} value is not subscriptable")

    def fstring(self, node: ast.JoinedStr) -> str:
        parts: list[str] = []
        size = 0
        for value in node.values:
            if isinstance(value, ast.Constant):
                text = str(value.value)
            elif isinstance(value, ast.FormattedValue):
                text = self.formatted(value)
            else:  # pragma: no cover - the checker admits nothing else
                raise InlineEvalError(f"cannot format {type(value).__name__}")
            size += len(text)
            if size > MAX_STRING_LENGTH:
                raise InlineEvalError(f"string result longer than {MAX_STRING_LENGTH} characters")
            parts.append(text)
        return "".join(parts)

    def formatted(self, node: ast.FormattedValue) -> str:
        value = _data(self.ev(node.value))
        if not isinstance(value, _SCALARS):
            raise InlineEvalError(f"only plain values can go into an f-string, not a {_type(value)}")
        if node.conversion == ord("r"):
            value = repr(value)
        elif node.conversion == ord("a"):
            value = ascii(value)
        elif node.conversion == ord("s"):
            value = str(value)
        spec_text = ""
        if isinstance(node.format_spec, ast.JoinedStr):
            spec_text = "".join(str(v.value) for v in node.format_spec.values if isinstance(v, ast.Constant))
        return _checked(format(value, spec_text))

    def boolop(self, node: ast.BoolOp) -> Any:
        result: Any = None
        for value_node in node.values:
            result = _data(self.ev(value_node))
            if isinstance(node.op, ast.And) and not result:
                return result
            if isinstance(node.op, ast.Or) and result:
                return result
        return result

    def compare(self, node: ast.Compare) -> bool:
        left = _data(self.ev(node.left))
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = _data(self.ev(right_node))
            if not _compare(op, left, right):
                return False
            left = right
        return True

    def binop(self, node: ast.BinOp) -> Any:
        left = _data(self.ev(node.left))
        right = _data(self.ev(node.right))
        symbol = _BIN_OPS[type(node.op)]
        if isinstance(left, str) and isinstance(right, str) and symbol == "+":
            if len(left) + len(right) > MAX_STRING_LENGTH:
                raise InlineEvalError(f"string result longer than {MAX_STRING_LENGTH} characters")
            return left + right
        if not (isinstance(left, (int, float)) and isinstance(right, (int, float))):
            raise InlineEvalError(f"unsupported operand types for {symbol}: {_type(left)} and {_type(right)}")
        if isinstance(node.op, ast.Add):
            return _checked(left + right)
        if isinstance(node.op, ast.Sub):
            return _checked(left - right)
        if isinstance(node.op, ast.Mult):
            return _checked(left * right)
        if right == 0:
            raise InlineEvalError(f"division by zero in {symbol}")
        if isinstance(node.op, ast.Div):
            return _checked(left / right)
        if isinstance(node.op, ast.FloorDiv):
            return _checked(left // right)
        return _checked(left % right)

    def call(self, node: ast.Call) -> Any:
        func = node.func
        if isinstance(func, ast.Name):
            args = [_data(self.ev(a)) for a in node.args]
            return _checked(_call_builtin(func.id, args))
        if not isinstance(func, ast.Attribute):  # pragma: no cover - the checker admits nothing else
            raise InlineEvalError("only builtins and methods can be called")
        obj = self.ev(func.value)
        args = [_data(self.ev(a)) for a in node.args]
        if isinstance(obj, str) and func.attr in _STR_METHODS:
            return _checked(_call_str_method(obj, func.attr, args))
        if isinstance(obj, dict) and func.attr in _DICT_METHODS:
            return obj.get(*args)
        what = "the event" if isinstance(obj, Event) else f"{_type(obj)} value"
        raise InlineEvalError(f"{what} has no method `{func.attr}`")


def _compare(op: ast.cmpop, left: Any, right: Any) -> bool:
    if isinstance(op, ast.Eq):
        return bool(left == right)
    if isinstance(op, ast.NotEq):
        return bool(left != right)
    if isinstance(op, ast.Is):
        return left is right
    if isinstance(op, ast.IsNot):
        return left is not right
    if isinstance(op, (ast.In, ast.NotIn)):
        if not isinstance(right, (str, list, tuple, dict)):
            raise InlineEvalError(f"`in` needs a str, list, tuple or dict on the right, not {_type(right)}")
        if isinstance(right, str) and not isinstance(left, str):
            raise InlineEvalError(f"`in <str>` needs a str on the left, not {_type(left)}")
        found = left in right
        return found if isinstance(op, ast.In) else not found
    if isinstance(op, ast.Lt):
        return bool(left < right)
    if isinstance(op, ast.LtE):
        return bool(left <= right)
    if isinstance(op, ast.Gt):
        return bool(left > right)
    return bool(left >= right)


def _call_builtin(name: str, args: list[Any]) -> Any:
    if name == "str":
        if not args:
            return ""
        if not isinstance(args[0], _SCALARS):
            raise InlineEvalError(f"str() takes a plain value, not a {_type(args[0])}")
        return str(args[0])
    if name == "int":
        value = args[0]
        if isinstance(value, str):
            text = value.strip()
            if len(text) > 64:
                raise InlineEvalError("int() of a string longer than 64 characters")
            try:
                return int(text)
            except ValueError:
                raise InlineEvalError(f"int() cannot parse {value!r}") from None
        if isinstance(value, (int, float)):
            return int(value)
        raise InlineEvalError(f"int() takes a str or a number, not {_type(value)}")
    # len
    value = args[0]
    if not isinstance(value, (str, list, tuple, dict)):
        raise InlineEvalError(f"len() takes a str, list, tuple or dict, not {_type(value)}")
    return len(value)


def _call_str_method(s: str, method: str, args: list[Any]) -> Any:
    if method == "replace":
        old, new = args[0], args[1]
        if not (isinstance(old, str) and isinstance(new, str)):
            raise InlineEvalError("str.replace() takes strings")
        count = args[2] if len(args) > 2 else -1
        if not isinstance(count, int):
            raise InlineEvalError("str.replace() count must be an integer")
        hits = len(s) + 1 if old == "" else s.count(old)
        if count >= 0:
            hits = min(hits, count)
        if len(s) + hits * (len(new) - len(old)) > MAX_STRING_LENGTH:
            raise InlineEvalError(f"string result longer than {MAX_STRING_LENGTH} characters")
    elif method == "join":
        items = args[0]
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
            raise InlineEvalError("str.join() takes a list of strings")
        total = sum(len(i) for i in items) + len(s) * max(len(items) - 1, 0)
        if total > MAX_STRING_LENGTH:
            raise InlineEvalError(f"string result longer than {MAX_STRING_LENGTH} characters")
    return getattr(s, method)(*args)
