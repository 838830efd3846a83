"""Lock-file model: strict parsing, one-line errors, hashes, and the regex and content-hash helpers."""

from __future__ import annotations

import hashlib
import json

import pytest

from kici.engine import lockfile as lf
from kici.engine.content_hash import local_imports, workflow_content_hash
from kici.engine.regex_safety import regex_problem


def sample() -> lf.LockFile:
    wf = lf.Workflow(
        name="ci",
        source=lf.SourceRef(file=".kici/workflows/ci.py", export="#ci"),
        content_hash="0" * 64,
        compile_schema_version=lf.COMPILE_SCHEMA_VERSION,
        triggers=[lf.PushTrigger(branches=[lf.BranchPattern(type="glob", pattern="main")]),
                  lf.KiciEventTrigger(event_name="deploy", not_={"$.env": "prod"})],
        jobs=[lf.Job(name="build", steps=[lf.Step(name="s")], needs=[]),
              lf.Job(name="test", steps=[lf.Step(name="t", timeout=1000)], needs=[lf.Need(name="build")])],
    )
    return lf.build_lock_file([wf])


def test_round_trip_and_camel_case_keys() -> None:
    text = lf.render_lock_file(sample())
    data = json.loads(text)
    assert data["workflows"][0]["compileSchemaVersion"] == lf.COMPILE_SCHEMA_VERSION
    assert data["workflows"][0]["triggers"][1] == {"_type": "kici_event", "eventName": "deploy",
                                                   "not": {"$.env": "prod"}}
    assert lf.parse_lock_file(text) == sample()
    assert text.endswith("}\n") and lf.render_lock_file(lf.parse_lock_file(text)) == text


def test_top_level_hash_formula() -> None:
    lock = sample()
    data = json.loads(lf.render_lock_file(lock))
    compact = json.dumps({"schemaVersion": data["schemaVersion"], "workflows": data["workflows"]},
                         separators=(",", ":"), ensure_ascii=False)
    assert lock.content_hash == hashlib.sha256(compact.encode()).hexdigest()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(schemaVersion=29), "schemaVersion 29 is not supported"),
        (lambda d: d.pop("schemaVersion"), "schemaVersion None is not supported"),
        (lambda d: d["workflows"][0]["triggers"][0].update(_type="pushh"), "does not match any of the expected tags"),
        (lambda d: d["workflows"][0].update(surprise=1), "workflows.0.surprise: Extra inputs are not permitted"),
        (lambda d: d["workflows"][0]["jobs"][0].update(steps="x"), "workflows.0.jobs.0.steps"),
        (lambda d: d["workflows"][0].update(name="edited"), "does not match its content"),
        (lambda d: d["workflows"][0]["triggers"][0]["branches"].append({"type": "regex", "pattern": "(a+)+$"}),
         "catastrophic backtracking"),
        (lambda d: d["workflows"][0]["triggers"][0]["paths"].append("!*(a*)"), "backtrack catastrophically"),
        # a hand-edited declaration gets no further than parsing, at the orchestrator as in the compiler
        (lambda d: d["workflows"][0]["jobs"][0].update(secrets=["lower"]), "secret name 'lower' is invalid"),
        (lambda d: d["workflows"][0]["jobs"][0].update(secrets=["A", "A"]), "secret 'A' is declared twice"),
        (lambda d: d["workflows"][0]["jobs"][0].update(secrets="A"), "workflows.0.jobs.0.secrets"),
    ],
)
def test_bad_lock_files_give_one_line_errors(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(lf.render_lock_file(sample()))
    mutate(data)
    with pytest.raises(lf.LockFileError) as info:
        lf.parse_lock_file(json.dumps(data))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["", "{", "[]", "null", b"\xff\xfe"])
def test_garbage_is_rejected_clearly(text: str | bytes) -> None:
    with pytest.raises(lf.LockFileError):
        lf.parse_lock_file(text)


@pytest.mark.parametrize(
    ("source", "ok"),
    [
        (r"^release/v\d+$", True),
        (r"^(feat|fix)/.+", True),
        (r"(a+)+$", False),
        (r"(\w+\s?)*$", False),
        (r"((ab)*c)*", False),
        (r"(?P<x>a)", False),
        (r"(?<=a)b", False),
        (r"a\Z", False),
        (r"[", False),
        (r"[(]+x", True),
    ],
)
def test_regex_safety(source: str, ok: bool) -> None:
    assert (regex_problem(source) is None) is ok


def test_content_hash_follows_local_imports_only() -> None:
    files = {
        ".kici/workflows/ci.py": b"import os\nimport common\nfrom lib import deploy\nfrom kici import step\n",
        ".kici/workflows/common.py": b"from lib.util import x\n",
        ".kici/lib/__init__.py": b"",
        ".kici/lib/deploy.py": b"from . import util\n",
        ".kici/lib/util.py": b"x = 1\n",
        ".kici/lib/unused.py": b"",
    }
    found = local_imports(".kici/workflows/ci.py", files.get)
    assert found == {".kici/workflows/common.py", ".kici/lib/__init__.py", ".kici/lib/deploy.py", ".kici/lib/util.py"}
    h1 = workflow_content_hash(".kici/workflows/ci.py", files.get)
    files[".kici/lib/unused.py"] = b"changed"
    assert workflow_content_hash(".kici/workflows/ci.py", files.get) == h1
    files[".kici/lib/util.py"] = b"x = 2\n"
    assert workflow_content_hash(".kici/workflows/ci.py", files.get) != h1


def test_content_hash_of_a_file_without_imports() -> None:
    files = {".kici/workflows/ci.py": b"a = 1\r\nb = 2\r\n"}
    assert workflow_content_hash(".kici/workflows/ci.py", files.get) == hashlib.sha256(b"1:a = 1\nb = 2\n").hexdigest()
    with pytest.raises(FileNotFoundError):
        workflow_content_hash(".kici/workflows/missing.py", files.get)
