"""The compiler: discovery, naming, validation errors, hashing and deterministic lock files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from kici.compiler.errors import CompileFailed
from kici.compiler.project import Project, check_lock, compile_project, write_lock
from kici.engine import lockfile as lf
from tests.conftest import write_files

HEADER = "from kici import *\nimport re\n"


def project(tmp_path: Path, files: dict[str, str]) -> Project:
    write_files(tmp_path, files)
    return Project(root=tmp_path, kici_dir=tmp_path / ".kici")


def compile_one(tmp_path: Path, source: str) -> lf.LockFile:
    return compile_project(project(tmp_path, {".kici/workflows/wf.py": HEADER + source}))


def errors_of(tmp_path: Path, source: str, files: dict[str, str] | None = None) -> list[str]:
    p = project(tmp_path, {".kici/workflows/wf.py": HEADER + source, **(files or {})})
    with pytest.raises(CompileFailed) as info:
        compile_project(p)
    return [str(e) for e in info.value.errors]


def test_discovers_every_module_level_workflow_with_export_refs(tmp_path: Path) -> None:
    lock = compile_one(
        tmp_path,
        """
b = job("b", run="true")
ci = workflow("ci", on=push(), jobs=[b])
more = [workflow("x", on=push(), jobs=[job("j", run="true")]), workflow("y", jobs=[job("j", run="true")])]
""",
    )
    assert [(w.name, w.source.export) for w in lock.workflows] == [("ci", "#ci"), ("x", "#more[0]"), ("y", "#more[1]")]
    assert all(w.source.file == ".kici/workflows/wf.py" for w in lock.workflows)
    assert lock.workflow("y") is not None and lock.workflow("y").triggers == []  # type: ignore[union-attr]


def test_unnamed_steps_are_numbered_and_named_ones_do_not_use_numbers(tmp_path: Path) -> None:
    lock = compile_one(
        tmp_path,
        """
@step
def build(ctx): ...
j = job("j", steps=["echo a", build, lambda ctx: None, step("lint", "ruff check ."), "echo b"])
ci = workflow("ci", on=push(), jobs=[j])
""",
    )
    assert [s.name for s in lock.workflows[0].jobs[0].steps] == ["step-1", "build", "step-2", "lint", "step-3"]


def test_unnamed_jobs_get_job_n_and_needs_use_those_names(tmp_path: Path) -> None:
    lock = compile_one(
        tmp_path,
        """
a = job(run="true")
b = job(run="true", needs=[a])
c = job("named", run="true", needs=[b, a])
ci = workflow("ci", on=push(), jobs=[a, b, c])
""",
    )
    jobs = lock.workflows[0].jobs
    assert [j.name for j in jobs] == ["job-1", "job-2", "named"]
    assert [n.name for n in jobs[1].needs] == ["job-1"]
    assert [n.name for n in jobs[2].needs] == ["job-2", "job-1"]


def test_when_compiles_to_run_on_sets(tmp_path: Path) -> None:
    lock = compile_one(
        tmp_path,
        """
a = job("a", run="true")
b = job("b", run="true", needs=[need(a, when="on_failure")])
c = job("c", run="true", needs=[need(a, when="always")])
d = job("d", run="true", needs=[need("a", when=["success", "skipped"])])
e = job("e", run="true", needs=["a"])
ci = workflow("ci", on=push(), jobs=[a, b, c, d, e])
""",
    )
    jobs = {j.name: j for j in lock.workflows[0].jobs}
    assert jobs["b"].needs[0].run_on == ["failed", "timed_out_stale"]
    assert set(jobs["c"].needs[0].run_on) == set(lf.JOB_STATUSES)
    assert jobs["d"].needs[0].run_on == ["success", "skipped"]
    assert jobs["e"].needs[0].run_on == ["success"]


def test_push_with_tags_compiles_to_push_and_tag_triggers(tmp_path: Path) -> None:
    lock = compile_one(
        tmp_path,
        """
ci = workflow("ci", on=[push(branches="main", tags=["v*"]), push(tags="v*")], jobs=[job("j", run="true")])
""",
    )
    types = [t.type for t in lock.workflows[0].triggers]
    # with branches: a push trigger and a tag trigger; tags alone: only the tag trigger
    assert types == ["push", "tag", "tag"]


def test_regex_patterns_keep_their_source_and_flags(tmp_path: Path) -> None:
    lock = compile_one(
        tmp_path,
        r"""
ci = workflow("ci", on=pr(target=re.compile(r"^release/v\d+$", re.I)), jobs=[job("j", run="true")])
""",
    )
    trig = lock.workflows[0].triggers[0]
    assert isinstance(trig, lf.PrTrigger)
    assert trig.events == ["opened", "synchronize", "reopened", "closed"]
    assert trig.target_branches == [lf.BranchPattern(type="regex", pattern=r"^release/v\d+$", flags="i")]


def test_runs_on_forms(tmp_path: Path) -> None:
    lock = compile_one(
        tmp_path,
        """
a = job("a", run="true", runs_on="linux")
b = job("b", run="true", runs_on=["linux", "gpu-*"])
c = job("c", run="true", runs_on={"labels": ["linux"], "exclude": ["slow"]})
d = job("d", run="true")
ci = workflow("ci", on=push(), jobs=[a, b, c, d])
""",
    )
    jobs = {j.name: j for j in lock.workflows[0].jobs}
    assert jobs["a"].runs_on == [lf.LabelMatcher(kind="exact", value="linux")]
    assert jobs["b"].runs_on[1].kind == "regex"
    assert jobs["c"].exclude_labels == [lf.LabelMatcher(kind="exact", value="slow")]
    assert jobs["d"].runs_on == []


def test_inline_lambda_values_are_stored_as_source(tmp_path: Path) -> None:
    lock = compile_one(
        tmp_path,
        """
d = job("deploy", run="true", concurrency_group=lambda event: f"deploy-{event.branch}")
ci = workflow("ci", on=push(), jobs=[d], concurrency={"group": "ci", "cancel_in_progress": False})
""",
    )
    job = lock.workflows[0].jobs[0]
    assert isinstance(job.concurrency_group, lf.InlineExpr)
    assert job.concurrency_group.expression == "lambda event: f'deploy-{event.branch}'"
    assert lock.workflows[0].concurrency == lf.Concurrency(has_group=True, group="ci", cancel_in_progress=False, max=1)


def test_environment_compiles_static_or_as_a_lambda(tmp_path: Path) -> None:
    lock = compile_one(
        tmp_path,
        """
p = job("prod", run="true", environment="production")
s = job("some", run="true", environment=lambda event: "production" if event.branch == "main" else "staging")
ci = workflow("ci", on=push(), jobs=[p, s])
""",
    )
    jobs = {j.name: j for j in lock.workflows[0].jobs}
    assert jobs["prod"].environments == [lf.EnvironmentRef(value="production", dynamic=False)]
    [ref] = jobs["some"].environments or []
    assert ref.dynamic and isinstance(ref.value, lf.InlineExpr)
    assert ref.value.expression.startswith("lambda event: 'production' if event.branch == 'main'")


def test_outputs_flag_timeouts_retry_and_hooks(tmp_path: Path) -> None:
    lock = compile_one(
        tmp_path,
        """
@step("build", timeout=120, retry=3)
def build(ctx):
    return {"version": "1"}

@step(retry=Retry(5, delay=0.5, backoff="fixed", retry_if=lambda e: True), continue_on_error=True)
def flaky(ctx):
    def inner():
        return 1
    inner()

j = job("j", steps=[build, flaky], timeout=600, on_failure=lambda ctx: None, cleanup=lambda ctx: None)
ci = workflow("ci", on=push(), jobs=[j])
""",
    )
    job = lock.workflows[0].jobs[0]
    build, flaky = job.steps
    assert build.has_outputs and build.timeout == 120_000
    assert build.retry == lf.RetryPolicy(max_attempts=3)
    assert not flaky.has_outputs and flaky.continue_on_error
    assert flaky.retry == lf.RetryPolicy(max_attempts=5, delay_ms=500, backoff="fixed", has_retry_if=True)
    assert job.timeout == 600_000
    assert job.hooks == lf.HookFlags(has_on_failure=True, has_cleanup=True)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('a = workflow("ci", on=push(), jobs=[job("j", run="true")])\nb = workflow("ci", jobs=[job("k", run="true")])',
         "duplicate workflow name 'ci'"),
        ('ci = workflow("ci", on=push(), jobs=[job("j", run="true"), job("j", run="true")])', "duplicate job name 'j'"),
        ('a = job("a", run="true", needs=["b"])\nb = job("b", run="true", needs=["a"])\n'
         'ci = workflow("ci", on=push(), jobs=[a, b])', "needs cycle"),
        ('a = job("a", run="true", needs=["a"])\nci = workflow("ci", on=push(), jobs=[a])', "cannot need itself"),
        ('a = job("a", run="true", needs=["ghost"])\nci = workflow("ci", on=push(), jobs=[a])', "unknown job 'ghost'"),
        ('a = job("a", run="true", matrix={"x": list(range(20)), "y": list(range(20))})\n'
         'ci = workflow("ci", on=push(), jobs=[a])', "matrix too large"),
        ('a = job("a", run="true", steps=["echo"])\nci = workflow("ci", on=push(), jobs=[a])',
         "`run` and `steps` cannot be combined"),
        ('a = job("a", run="true", runs_on={"labels": ["linux"], "exclude": ["linux"]})\n'
         'ci = workflow("ci", on=push(), jobs=[a])', "both required and excluded"),
        ('ci = workflow("ci", on=push(branches=re.compile(r"^(a+)+$")), jobs=[job("j", run="true")])',
         "catastrophic backtracking"),
        ('ci = workflow("ci", on=push(paths=["+(a*)/x"]), jobs=[job("j", run="true")])', "backtrack catastrophically"),
        ('ci = workflow("ci", on=tag("*(*|@)"), jobs=[job("j", run="true")])', "backtrack catastrophically"),
        ('ci = workflow("ci", on=schedule("0 * * * *", inputs={"x": inputs.string()}), jobs=[job("j", run="true")])',
         "has no default"),
        ('ci = workflow("ci", on=schedule("61 * * * *"), jobs=[job("j", run="true")])', "is not valid"),
        ('ci = workflow("ci", on=schedule("0 0 * * * *"), jobs=[job("j", run="true")])', "must have 5 fields"),
        ('ci = workflow("ci", on=push(), jobs=[])', "at least one job"),
        ('a = job("a", run="true", env={"K": object()})\nci = workflow("ci", on=push(), jobs=[a])',
         "is not a string or number"),
        ('a = job("a", run="true", matrix={"x": [object()]})\nci = workflow("ci", on=push(), jobs=[a])',
         "matrix values must be JSON values"),
        ('ci = workflow("ci", on=pr(events=["opend"]), jobs=[job("j", run="true")])', "unknown action 'opend'"),
        ('ci = workflow("ci", on=schedule("every day"), jobs=[job("j", run="true")])', "must have 5 fields"),
        ('a = job("a", run="true", concurrency_group=lambda e: open("x"))\nci = workflow("ci", on=push(), jobs=[a])',
         "not a pure expression"),
        ('a = job("a", run="true", timeout=-1)\nci = workflow("ci", on=push(), jobs=[a])', "positive number"),
        ('a = job("a", run="true", environment="p", concurrency_group="g")\nci = workflow("ci", on=push(), jobs=[a])',
         "cannot be combined with `concurrency_group=`"),
        ('a = job("a", run="true", environment=lambda e: open("x"))\nci = workflow("ci", on=push(), jobs=[a])',
         "not a pure expression"),
    ],
)
def test_validation_errors_name_the_place_and_problem(tmp_path: Path, source: str, expected: str) -> None:
    errors = errors_of(tmp_path, source)
    assert any(expected in e for e in errors), errors
    assert all(e.startswith(".kici/workflows/wf.py") for e in errors)


def test_error_names_workflow_job_and_step(tmp_path: Path) -> None:
    source = 'ci = workflow("ci", on=push(), jobs=[job("build", steps=[step("s", "x", timeout=0)])])'
    errors = errors_of(tmp_path, source)
    assert errors == [".kici/workflows/wf.py › workflow 'ci' › job 'build' › step 's': step timeout must be a "
                      "positive number of seconds or a timedelta, not 0"]


def test_unknown_trigger_option_and_import_errors_show_the_traceback_tail(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, 'ci = workflow("ci", on=push(branchez=["main"]), jobs=[])')
    assert len(errors) == 1
    assert "import failed" in errors[0]
    assert "unexpected keyword argument 'branchez'" in errors[0]
    assert "wf.py" in errors[0] and "line 3" in errors[0]
    assert "loader.py" not in errors[0]


def test_syntax_error_is_reported_not_crashed(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, "def broken(:\n")
    assert "SyntaxError" in errors[0]


def test_content_hash_is_prefixed_sha256_of_the_source_and_ignores_line_endings(tmp_path: Path) -> None:
    source = HEADER + 'ci = workflow("ci", on=push(), jobs=[job("j", run="true")])\n'
    lock = compile_project(project(tmp_path / "lf", {".kici/workflows/wf.py": source}))
    expected = hashlib.sha256(f"{lf.COMPILE_SCHEMA_VERSION}:{source}".encode()).hexdigest()
    assert lock.workflows[0].content_hash == expected
    crlf = tmp_path / "crlf"
    (crlf / ".kici/workflows").mkdir(parents=True)
    (crlf / ".kici/workflows/wf.py").write_bytes(source.replace("\n", "\r\n").encode())
    lock2 = compile_project(Project(root=crlf, kici_dir=crlf / ".kici"))
    assert lock2.workflows[0].content_hash == expected


def test_content_hash_covers_imported_local_modules(tmp_path: Path) -> None:
    files = {
        ".kici/workflows/wf.py": HEADER + "from lib.steps import lint\nimport common\n"
        'ci = workflow("ci", on=push(), jobs=[job("j", steps=[lint, common.test])])\n',
        ".kici/lib/__init__.py": "",
        ".kici/lib/steps.py": 'from kici import step\nlint = step("lint", "true")\n',
        ".kici/workflows/_unused.py": "",
        ".kici/workflows/common.py": 'from kici import step\ntest = step("test", "true")\n',
    }
    p = project(tmp_path, files)
    first = compile_project(p).workflows[0].content_hash
    (tmp_path / ".kici/workflows/_unused.py").write_text("x = 1\n")
    assert compile_project(p).workflows[0].content_hash == first
    (tmp_path / ".kici/lib/steps.py").write_text('from kici import step\nlint = step("lint", "false")\n')
    second = compile_project(p).workflows[0].content_hash
    assert second != first
    (tmp_path / ".kici/workflows/common.py").write_text('from kici import step\ntest = step("test", "false")\n')
    assert compile_project(p).workflows[0].content_hash not in (first, second)


def test_compile_is_deterministic_and_check_detects_drift(tmp_path: Path) -> None:
    simple = HEADER + 'ci = workflow("ci", on=push(), jobs=[job("j", run="true")])\n'
    p = project(tmp_path, {".kici/workflows/wf.py": simple})
    assert check_lock(p) == (False, ".kici/kici.lock.json is missing; run `kici compile`")
    first = write_lock(p)
    assert first.changed
    text = p.lock_path.read_bytes()
    again = write_lock(p)
    assert not again.changed and p.lock_path.read_bytes() == text
    assert check_lock(p)[0]
    lf.parse_lock_file(text)  # what we write, we can read
    data = json.loads(text)
    assert list(data) == ["schemaVersion", "contentHash", "workflows"]
    (tmp_path / ".kici/workflows/wf.py").write_text(simple.replace('"j"', '"k"'))
    ok, reason = check_lock(p)
    assert not ok and "out of date" in reason
    assert p.lock_path.read_bytes() == text  # --check never writes


def test_no_workflows_is_an_error(tmp_path: Path) -> None:
    p = project(tmp_path, {".kici/workflows/wf.py": "x = 1\n"})
    with pytest.raises(CompileFailed, match="no workflows found"):
        compile_project(p)
    empty = Project(root=tmp_path / "empty", kici_dir=tmp_path / "empty/.kici")
    with pytest.raises(CompileFailed, match="no workflow files"):
        compile_project(empty)


def test_declared_secrets_are_compiled_in_order(tmp_path: Path) -> None:
    lock = compile_one(tmp_path, 'a = job("a", run="true", secrets=["PYPI_TOKEN", "DEPLOY_KEY", "_X1"])\n'
                                 'b = job("b", run="true", secrets=[])\n'
                                 'ci = workflow("ci", on=push(), jobs=[a, b, job("c", run="true")])')
    jobs = {j.name: j for j in lock.workflows[0].jobs}
    assert jobs["a"].secrets == ["PYPI_TOKEN", "DEPLOY_KEY", "_X1"]
    assert jobs["b"].secrets is None and jobs["c"].secrets is None  # nothing declared: absent from the lock file
    rendered = json.loads(lf.render_lock_file(lock))["workflows"][0]["jobs"]
    assert rendered[0]["secrets"] == ["PYPI_TOKEN", "DEPLOY_KEY", "_X1"]
    assert "secrets" not in rendered[1] and "secrets" not in rendered[2]
    assert lf.parse_lock_file(lf.render_lock_file(lock)) == lock


@pytest.mark.parametrize(
    ("declaration", "expected"),
    [
        ('"PYPI_TOKEN"', 'secrets must be a list of secret names, like secrets=["PYPI_TOKEN"]'),
        ('["pypi_token"]', "secret name 'pypi_token' is invalid: use upper-case letters, digits and '_'"),
        ('["1TOKEN"]', "secret name '1TOKEN' is invalid"),
        ('["A-B"]', "secret name 'A-B' is invalid"),
        ('[""]', "secret name '' is invalid"),
        ('[3]', "secret name 3 is invalid"),
        ('["TOKEN", "TOKEN"]', "secret 'TOKEN' is declared twice"),
        ('["A" * 129]', "at most 128 characters"),
    ],
)
def test_bad_secret_declarations_are_compile_errors(tmp_path: Path, declaration: str, expected: str) -> None:
    errors = errors_of(tmp_path, f'a = job("a", run="true", secrets={declaration})\n'
                                 'ci = workflow("ci", on=push(), jobs=[a])')
    assert len(errors) == 1 and errors[0].startswith(".kici/workflows/wf.py › workflow 'ci' › job 'a': "), errors
    assert expected in errors[0], errors
