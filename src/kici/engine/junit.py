"""Reading JUnit XML test reports (`job(..., test_reports=["reports/*.xml"])`) into per-test results.

The dialects written by pytest (`--junitxml`), unittest-xml-reporting, Maven surefire and go-junit-report:
a `<testsuites>` or a single `<testsuite>` root, suites nested in suites, and `<testcase name classname time
file line>` elements whose first `<error>`, `<failure>` or `<skipped>` child gives the status (error over
failure over skipped; none: passed). `<system-out>`, `<system-err>`, `<properties>` and whatever else a tool
adds are ignored. Reports come from job code, so they are hostile input: parsing goes through defusedxml with
DTDs refused (which refuses entity declarations, so no billion laughs, and external references), streams the
document (`iterparse`, each test case dropped once read), and stops at `max_bytes`.

A document that is not well-formed, too large, or not a JUnit report yields no results and an error saying
why; the caller records it with the file and carries on with the next one.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Literal

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import iterparse

TestStatus = Literal["passed", "failed", "error", "skipped"]
STATUSES: tuple[TestStatus, ...] = ("passed", "failed", "error", "skipped")

MAX_MESSAGE_CHARS = 2_000
MAX_DETAILS_CHARS = 16_000
"""Failure details (usually a traceback) are cut here: the database keeps results, not whole logs."""
MAX_NAME_CHARS = 1_000

_ROOTS = frozenset({"testsuites", "testsuite"})
# one outcome per test case: an error wins over a failure, which wins over a skip
_OUTCOMES: dict[str, TestStatus] = {"error": "error", "failure": "failed", "skipped": "skipped"}
_RANK: dict[TestStatus, int] = {"error": 3, "failed": 2, "skipped": 1, "passed": 0}
_NOISE = frozenset({"system-out", "system-err", "properties"})


@dataclass(slots=True)
class TestCase:
    __test__ = False  # not a pytest test class, whatever its name

    suite: str | None
    classname: str | None
    name: str
    status: TestStatus
    duration_ms: int | None
    message: str | None = None
    details: str | None = None
    file: str | None = None
    line: int | None = None


@dataclass(slots=True)
class TestCounts:
    __test__ = False  # not a pytest test class, whatever its name

    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    duration_ms: int = 0

    @property
    def total(self) -> int:
        return self.passed + self.failed + self.errors + self.skipped

    def add(self, case: TestCase) -> None:
        if case.status == "passed":
            self.passed += 1
        elif case.status == "failed":
            self.failed += 1
        elif case.status == "error":
            self.errors += 1
        else:
            self.skipped += 1
        self.duration_ms += case.duration_ms or 0


@dataclass
class JUnitReport:
    cases: list[TestCase] = field(default_factory=list)
    error: str | None = None
    """Why the document was not read (its `cases` are then empty); None when it was."""

    def counts(self) -> TestCounts:
        counts = TestCounts()
        for case in self.cases:
            counts.add(case)
        return counts


def counts_text(passed: int, failed: int, errors: int, skipped: int) -> str:
    """`120 passed, 2 failed, 1 error, 3 skipped`: the non-zero counts, or `no tests`. One wording for the
    agent's log, kici-admin and check runs."""
    parts = [f"{n} {label}" for n, label in ((passed, "passed"), (failed, "failed"),
                                              (errors, "error" if errors == 1 else "errors"), (skipped, "skipped"))
             if n]
    return ", ".join(parts) or "no tests"


class ReportTooLarge(ValueError):
    pass


class _Bounded:
    """A binary reader that refuses to read past `limit` bytes (the file may grow while it is read)."""

    def __init__(self, source: IO[bytes], limit: int) -> None:
        self.source = source
        self.limit = limit
        self.seen = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.source.read(size if size is not None and size >= 0 else self.limit + 1)
        self.seen += len(chunk)
        if self.seen > self.limit:
            raise ReportTooLarge(f"the report is over {self.limit} bytes")
        return chunk


def parse_junit(source: IO[bytes], *, max_bytes: int) -> JUnitReport:
    """The test cases of one JUnit XML document read from `source`, or the reason it could not be read."""
    report = JUnitReport()
    try:
        report.cases = list(_cases(_Bounded(source, max_bytes)))
    except ReportTooLarge as exc:
        return JUnitReport(error=str(exc))
    except DefusedXmlException as exc:
        return JUnitReport(error=f"refused: {_defused_reason(exc)}")
    except ET.ParseError as exc:
        return JUnitReport(error=f"not well-formed XML: {exc}")
    except _NotJUnit as exc:
        return JUnitReport(error=str(exc))
    return report


class _NotJUnit(ValueError):
    pass


def _defused_reason(exc: DefusedXmlException) -> str:
    name = type(exc).__name__
    if name == "DTDForbidden":
        return "the document has a DTD (<!DOCTYPE …>); test reports may not declare one"
    if name == "EntitiesForbidden":
        return "the document declares entities; test reports may not"
    if name == "ExternalReferenceForbidden":
        return "the document references an external resource; test reports may not"
    return f"{name}: {exc}"


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1] if tag.startswith("{") else tag


def _cases(reader: _Bounded) -> Iterator[TestCase]:
    suites: list[str | None] = []
    parents: list[ET.Element] = []
    for event, elem in iterparse(reader, events=("start", "end"), forbid_dtd=True):
        tag = _local(elem.tag)
        if event == "start":
            if not parents and tag not in _ROOTS:
                raise _NotJUnit(f"not a JUnit XML report: the root element is <{tag[:100]}>, "
                                "not <testsuites> or <testsuite>")
            parents.append(elem)
            if tag == "testsuite":
                suites.append(_text_attr(elem, "name"))
            continue
        parents.pop()
        if tag == "testsuite":
            suites.pop()
        elif tag == "testcase":
            yield _case(elem, next((s for s in reversed(suites) if s), None))
        if tag == "testcase" or tag in _NOISE:
            elem.clear()  # read: drop its content so a long report streams in bounded memory
            if parents and tag == "testcase":
                parents[-1].remove(elem)


def _case(elem: ET.Element, suite: str | None) -> TestCase:
    status: TestStatus = "passed"
    outcome: ET.Element | None = None
    for child in elem:
        found = _OUTCOMES.get(_local(child.tag))
        if found is not None and _RANK[found] > _RANK[status]:
            status, outcome = found, child
    message = details = None
    if outcome is not None:
        details = _clip((outcome.text or "").strip(), MAX_DETAILS_CHARS) or None
        message = _message(outcome, status, details)
    return TestCase(
        suite=_clip(suite, MAX_NAME_CHARS) if suite else None,
        classname=_text_attr(elem, "classname"),
        name=_text_attr(elem, "name") or "(unnamed)",
        status=status,
        duration_ms=_millis(elem.get("time")),
        message=message,
        details=details,
        file=_text_attr(elem, "file"),
        line=_line(elem.get("line")),
    )


def _message(outcome: ET.Element, status: TestStatus, details: str | None) -> str | None:
    message = (outcome.get("message") or "").strip()
    kind = (outcome.get("type") or "").strip()
    if status in ("failed", "error") and kind and kind not in message:
        message = f"{kind}: {message}" if message else kind
    if not message and details:
        message = next((ln.strip() for ln in details.splitlines() if ln.strip()), "")
    return _clip(message, MAX_MESSAGE_CHARS) or None


def _text_attr(elem: ET.Element, name: str) -> str | None:
    value = (elem.get(name) or "").strip()
    return _clip(value, MAX_NAME_CHARS) if value else None


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _millis(value: str | None) -> int | None:
    """`time` in seconds, as `0.013`, or `1,234.5` (surefire under some locales)."""
    if not value:
        return None
    try:
        seconds = float(value.replace(",", "").strip())
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return round(seconds * 1000)


def _line(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit():
        return None
    number = int(value.strip())
    return number if number < 2**31 else None
