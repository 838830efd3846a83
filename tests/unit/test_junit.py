"""The JUnit XML reader (kici.engine.junit) over the dialects KiCI promises, and hostile or broken input."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from kici.engine.junit import MAX_DETAILS_CHARS, JUnitReport, parse_junit

LIMIT = 1024 * 1024


def parse(text: str | bytes, max_bytes: int = LIMIT) -> JUnitReport:
    data = text.encode() if isinstance(text, str) else text
    return parse_junit(io.BytesIO(data), max_bytes=max_bytes)


PYTEST = """<?xml version="1.0" encoding="utf-8"?>
<testsuites name="pytest tests"><testsuite name="pytest" errors="1" failures="1" skipped="2" tests="5" time="0.051"
 timestamp="2025-01-01T00:00:00" hostname="h">
<testcase classname="tests.test_a" name="test_ok" file="tests/test_a.py" line="3" time="0.001" />
<testcase classname="tests.test_a" name="test_bad[1-2]" file="tests/test_a.py" line="7" time="0.012">
<failure message="assert 1 == 2">def test_bad():
&gt;       assert 1 == 2
E       assert 1 == 2

tests/test_a.py:8: AssertionError</failure></testcase>
<testcase classname="tests.test_a" name="test_setup" time="0.000">
<error message="failed on setup with &quot;RuntimeError: boom&quot;">RuntimeError: boom</error></testcase>
<testcase classname="tests.test_a" name="test_skip" time="0.000">
<skipped type="pytest.skip" message="not on linux">tests/test_a.py:20: not on linux</skipped></testcase>
<testcase classname="tests.test_a" name="test_xfail" time="0.003">
<skipped type="pytest.xfail" message="known" /><system-out>lots of output</system-out></testcase>
</testsuite></testsuites>
"""


def test_pytest_dialect() -> None:
    report = parse(PYTEST)
    assert report.error is None
    by_name = {c.name: c for c in report.cases}
    assert [c.status for c in report.cases] == ["passed", "failed", "error", "skipped", "skipped"]
    ok = by_name["test_ok"]
    assert (ok.suite, ok.classname, ok.file, ok.line, ok.duration_ms) == ("pytest", "tests.test_a",
                                                                         "tests/test_a.py", 3, 1)
    bad = by_name["test_bad[1-2]"]
    assert bad.message == "assert 1 == 2" and bad.details is not None and "tests/test_a.py:8" in bad.details
    assert by_name["test_setup"].message == 'failed on setup with "RuntimeError: boom"'
    assert by_name["test_skip"].message == "not on linux"
    counts = report.counts()
    assert (counts.passed, counts.failed, counts.errors, counts.skipped, counts.total) == (1, 1, 1, 2, 5)
    assert counts.duration_ms == 16


UNITTEST_XML = """<?xml version="1.0" encoding="UTF-8"?>
<testsuite errors="0" failures="1" file="tests/test_m.py" name="tests.test_m.MathTest-20250101" skipped="0"
 tests="2" time="0.002" timestamp="2025-01-01T00:00:00">
  <testcase classname="tests.test_m.MathTest" name="test_add" time="0.001" timestamp="2025-01-01T00:00:00"
   file="tests/test_m.py" line="5"/>
  <testcase classname="tests.test_m.MathTest" name="test_sub" time="0.001" file="tests/test_m.py" line="8">
    <failure type="AssertionError" message="3 != 4"><![CDATA[Traceback (most recent call last):
  File "tests/test_m.py", line 9, in test_sub
AssertionError: 3 != 4
]]></failure>
    <system-out><![CDATA[]]></system-out>
  </testcase>
</testsuite>
"""


def test_unittest_xml_reporting_dialect() -> None:
    report = parse(UNITTEST_XML)
    assert report.error is None
    add, sub = report.cases
    assert (add.status, add.suite, add.line) == ("passed", "tests.test_m.MathTest-20250101", 5)
    assert sub.status == "failed" and sub.message == "AssertionError: 3 != 4"
    assert sub.details is not None and sub.details.startswith("Traceback") and "line 9" in sub.details


SUREFIRE = """<?xml version="1.0" encoding="UTF-8"?>
<testsuite xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" version="3.0" name="com.acme.AppTest"
 time="1,234.5" tests="3" errors="1" skipped="1" failures="0">
  <properties><property name="java.version" value="17"/></properties>
  <testcase name="shouldWork" classname="com.acme.AppTest" time="1,200.25"/>
  <testcase name="shouldThrow" classname="com.acme.AppTest" time="0.01">
    <error message="boom" type="java.lang.IllegalStateException">java.lang.IllegalStateException: boom
	at com.acme.AppTest.shouldThrow(AppTest.java:20)</error>
    <system-err>stack</system-err>
  </testcase>
  <testcase name="ignored" classname="com.acme.AppTest" time="0"><skipped/></testcase>
</testsuite>
"""


def test_maven_surefire_dialect() -> None:
    report = parse(SUREFIRE)
    assert report.error is None
    works, throws, ignored = report.cases
    assert works.duration_ms == 1_200_250 and works.suite == "com.acme.AppTest"
    assert throws.status == "error" and throws.message == "java.lang.IllegalStateException: boom"
    assert ignored.status == "skipped" and ignored.message is None


GO_JUNIT = """<?xml version="1.0" encoding="UTF-8"?>
<testsuites tests="3" failures="1">
	<testsuite name="example.com/pkg" tests="3" failures="1" errors="0" id="0" hostname="h" time="0.010">
		<properties><property name="go.version" value="go1.22.0"></property></properties>
		<testcase name="TestOK" classname="example.com/pkg" time="0.000"></testcase>
		<testcase name="TestFail" classname="example.com/pkg" time="0.010">
			<failure message="Failed" type="">    pkg_test.go:12: got 1, want 2</failure>
		</testcase>
		<testcase name="TestSkip" classname="example.com/pkg" time="0.000">
			<skipped message="    pkg_test.go:20: later"></skipped>
		</testcase>
	</testsuite>
	<testsuite name="example.com/other" tests="0" time="0.000"></testsuite>
</testsuites>
"""


def test_go_junit_report_dialect() -> None:
    report = parse(GO_JUNIT)
    assert report.error is None
    assert [(c.name, c.status) for c in report.cases] == [("TestOK", "passed"), ("TestFail", "failed"),
                                                         ("TestSkip", "skipped")]
    fail = report.cases[1]
    assert fail.message == "Failed" and fail.details == "pkg_test.go:12: got 1, want 2"
    assert report.cases[2].message == "pkg_test.go:20: later"


def test_nested_suites_name_the_innermost_and_error_beats_failure() -> None:
    report = parse("""<testsuites><testsuite name="outer"><testcase name="a"/>
        <testsuite name="inner"><testcase name="b" classname="C"><failure message="f"/><error message="e"/>
        </testcase></testsuite><testcase name="c"><failure>first line
second line</failure></testcase></testsuite></testsuites>""")
    assert [(c.name, c.suite, c.status, c.message) for c in report.cases] == [
        ("a", "outer", "passed", None), ("b", "inner", "error", "e"), ("c", "outer", "failed", "first line")]


def test_odd_attributes_do_not_stop_the_report() -> None:
    report = parse('<testsuite><testcase name="" time="nan" line="x"/><testcase name="t" time="-1"/></testsuite>')
    assert [(c.name, c.duration_ms, c.line) for c in report.cases] == [("(unnamed)", None, None), ("t", None, None)]


def test_long_details_are_truncated() -> None:
    report = parse(f'<testsuite><testcase name="t"><failure>{"x" * (MAX_DETAILS_CHARS * 3)}</failure></testcase>'
                   "</testsuite>")
    details = report.cases[0].details
    assert details is not None and len(details) == MAX_DETAILS_CHARS and details.endswith("…")


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ("<testsuite><testcase name='a'></testsuite>", "not well-formed XML: mismatched tag"),
        ("", "not well-formed XML: no element found"),
        ("<html><body/></html>", "not a JUnit XML report: the root element is <html>"),
        ('<testsuite><testcase name="a"/></testsuite><extra/>', "not well-formed XML: junk after document"),
    ],
)
def test_malformed_documents_give_an_error_and_no_results(document: str, expected: str) -> None:
    report = parse(document)
    assert report.cases == [] and report.error is not None and report.error.startswith(expected), report.error


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol9 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
]>
<testsuite><testcase name="&lol9;"/></testsuite>
"""


def test_billion_laughs_is_refused() -> None:
    report = parse(BILLION_LAUGHS)
    assert report.cases == [] and report.error is not None
    assert report.error.startswith("refused: the document has a DTD")


def test_external_entities_are_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    report = parse(f'<?xml version="1.0"?><!DOCTYPE t [<!ENTITY x SYSTEM "file://{secret}">]>'
                   '<testsuite><testcase name="&x;"/></testsuite>')
    assert report.cases == [] and report.error is not None and "refused" in report.error
    assert "top secret" not in report.error


def test_a_document_over_the_limit_is_refused_without_reading_it_all() -> None:
    body = "<testsuite>" + '<testcase name="t"/>' * 10_000 + "</testsuite>"
    report = parse(body, max_bytes=50_000)
    assert report.cases == [] and report.error == "the report is over 50000 bytes"
    assert parse(body, max_bytes=len(body)).error is None


def test_a_large_report_streams_in_bounded_memory() -> None:
    """100 000 test cases with output: parsed in a child process whose peak RSS growth stays small."""
    code = (
        "import io, resource, sys\n"
        "from kici.engine.junit import parse_junit\n"
        "case = '<testcase classname=\"c\" name=\"t\" time=\"0.1\"><system-out>' + 'o' * 500\n"
        "case += '</system-out></testcase>'\n"
        "data = ('<testsuite>' + case * 100000 + '</testsuite>').encode()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "report = parse_junit(io.BytesIO(data), max_bytes=len(data))\n"
        "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "print(len(report.cases), report.error, grown)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    count, error, grown_kib = out.stdout.split()
    assert (count, error) == ("100000", "None")
    # the document (~56 MB) is in memory before the measure starts: only what parsing adds counts
    assert int(grown_kib) < 20_000, out.stdout  # a whole tree (defusedxml fromstring) grows ~47 MB here
