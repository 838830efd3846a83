"""The `kici` command end to end: real processes, real git repositories, real runner children."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from tests.conftest import git, kici_env, run_kici, write_files

Repo = Callable[..., Path]

PIPELINE = """
from kici import job, need, push, pr, step, workflow

lint = job("lint", steps=[step("ruff", "{lint_cmd}")])
test = job("test", needs=[lint], steps=[step("pytest", "echo testing")])
report = job("report", needs=[need(test, when="always")], steps=[step("summary", "echo report ran")])
ci = workflow("ci", on=[push(branches=["main"]), pr(target="main", paths=["src/**", "!docs/**"])],
              jobs=[lint, test, report], description="Lint, then test, then report")
"""


def pipeline(lint_cmd: str = "true") -> dict[str, str]:
    return {".kici/workflows/ci.py": PIPELINE.format(lint_cmd=lint_cmd), "src/app.py": "print('hi')\n"}


def test_init_scaffolds_compiles_and_check_tracks_drift(repo_factory: Repo) -> None:
    repo = repo_factory({"README.md": "x\n"})
    out = run_kici("init", cwd=repo)
    assert out.returncode == 0, out.stderr
    assert (repo / ".kici/workflows/ci.py").is_file()
    assert ".secrets" in (repo / ".kici/.gitignore").read_text().splitlines()
    assert json.loads((repo / ".kici/kici.lock.json").read_text())["workflows"][0]["name"] == "ci"
    assert run_kici("compile", "--check", cwd=repo).returncode == 0
    wf = repo / ".kici/workflows/ci.py"
    wf.write_text(wf.read_text().replace('"check"', '"checks"'))
    before = (repo / ".kici/kici.lock.json").read_bytes()
    stale = run_kici("compile", "--check", cwd=repo)
    assert stale.returncode == 1 and "out of date" in stale.stderr
    assert (repo / ".kici/kici.lock.json").read_bytes() == before
    assert run_kici("compile", cwd=repo).returncode == 0
    assert run_kici("compile", "--check", cwd=repo).returncode == 0
    # the scaffolded workflow runs as it is
    ran = run_kici("run", "local", "push", "--branch", "main", cwd=repo)
    assert ran.returncode == 0, ran.stdout + ran.stderr


def test_compile_errors_exit_1_and_name_the_place(repo_factory: Repo) -> None:
    repo = repo_factory({".kici/workflows/ci.py": PIPELINE.format(lint_cmd="true").replace("needs=[lint]",
                                                                                          'needs=["lnt"]')})
    out = run_kici("compile", cwd=repo)
    assert out.returncode == 1
    assert "ci.py › workflow 'ci' › job 'test': needs unknown job 'lnt'" in out.stderr
    assert not (repo / ".kici/kici.lock.json").exists()
    assert run_kici("compile", "--check", cwd=repo).returncode == 1


def test_compile_kici_dir_option(repo_factory: Repo) -> None:
    repo = repo_factory({"sub/.kici/workflows/ci.py": PIPELINE.format(lint_cmd="true")})
    out = run_kici("compile", "--kici-dir", "sub/.kici", cwd=repo)
    assert out.returncode == 0, out.stderr
    lock = json.loads((repo / "sub/.kici/kici.lock.json").read_text())
    assert lock["workflows"][0]["source"]["file"] == ".kici/workflows/ci.py"


def preview(repo: Path, *args: str) -> dict:  # type: ignore[type-arg]
    out = run_kici("preview", *args, "--json", cwd=repo)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_preview_reports_matches_jobs_and_reasons(repo_factory: Repo) -> None:
    repo = repo_factory(pipeline())
    main = preview(repo, "push", "--branch", "main")["workflows"][0]
    assert main["matched"] and main["trigger"]["type"] == "push"
    assert [j["name"] for j in main["jobs"]] == ["lint", "test", "report"]
    assert main["jobs"][2]["needs"][0]["run_on"][0] == "success" and len(main["jobs"][2]["needs"][0]["run_on"]) == 6
    develop = preview(repo, "push", "--branch", "develop")["workflows"][0]
    assert not develop["matched"] and "develop" in develop["reasons"][0]
    docs_only = preview(repo, "pr:open", "--files", "docs/a.md")["workflows"][0]
    assert not docs_only["matched"]
    code = preview(repo, "pr:sync", "--files", "docs/a.md,src/x.py")["workflows"][0]
    assert code["matched"] and code["trigger"]["index"] == 1
    labeled = preview(repo, "pr:labeled", "--files", "src/x.py")["workflows"][0]
    assert not labeled["matched"] and "labeled" in " ".join(labeled["reasons"])


def test_preview_human_output_and_bad_event(repo_factory: Repo) -> None:
    repo = repo_factory(pipeline())
    out = run_kici("preview", "push", "--branch", "main", cwd=repo)
    assert "✓ ci" in out.stdout and "• test  (needs lint)" in out.stdout
    assert "\n    Lint, then test, then report\n" in out.stdout  # the workflow's description
    assert preview(repo, "push", "--branch", "main")["workflows"][0]["description"] == "Lint, then test, then report"
    bad = run_kici("preview", "shove", cwd=repo)
    assert bad.returncode == 2 and "unknown event 'shove'" in bad.stderr
    bad_wf = run_kici("preview", "push", "--workflow", "nope", cwd=repo)
    assert bad_wf.returncode == 2 and "unknown workflow" in bad_wf.stderr


def test_run_local_success_with_json_and_junit(repo_factory: Repo, tmp_path: Path) -> None:
    repo = repo_factory(pipeline())
    junit = tmp_path / "report.xml"
    out = run_kici("run", "local", "push", "--branch", "main", "--json", "--junit", str(junit), cwd=repo)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["status"] == "success"
    jobs = {j["name"]: j for j in summary["workflows"][0]["jobs"]}
    assert [jobs[n]["status"] for n in ("lint", "test", "report")] == ["success"] * 3
    assert "[report] │ report ran" in out.stderr
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == "3" and suite.get("failures") == "0"


def test_failed_lint_skips_test_and_always_report_still_runs(repo_factory: Repo) -> None:
    """authoring §5.22"""
    repo = repo_factory(pipeline(lint_cmd="echo lint broke; exit 3"))
    out = run_kici("run", "local", "push", "--branch", "main", "--json", cwd=repo)
    assert out.returncode == 1
    jobs = {j["name"]: j for j in json.loads(out.stdout)["workflows"][0]["jobs"]}
    assert jobs["lint"]["status"] == "failed"
    assert jobs["lint"]["steps"][0]["status"] == "failed"
    assert jobs["test"]["status"] == "skipped"
    assert jobs["report"]["status"] == "success"
    assert "lint broke" in out.stderr
    keep_going = run_kici("run", "local", "push", "--branch", "main", "--json", "--keep-going", cwd=repo)
    kg = {j["name"]: j["status"] for j in json.loads(keep_going.stdout)["workflows"][0]["jobs"]}
    assert kg == {"lint": "failed", "test": "success", "report": "success"}


def test_matrix_children_run_and_outputs_flow_downstream(repo_factory: Repo) -> None:
    """authoring §5.23, and outputs across jobs"""
    repo = repo_factory({
        ".kici/workflows/m.py": """
from kici import job, push, step, workflow

@step
def build(ctx):
    return {"combo": f"{ctx.matrix.os}-{ctx.matrix.node}"}

@step
def collect(ctx):
    up = ctx.outputs_of("test")
    ctx.log.info("children: " + ",".join(sorted(up["by_matrix"])))

test = job("test", matrix={"os": ["a", "b"], "node": [18, 20]}, exclude=[{"os": "b", "node": 18}],
           include=[{"os": "c", "node": 22}], steps=[build])
after = job("after", needs=[test], steps=[collect])
m = workflow("m", on=push(), jobs=[test, after])
""",
    })
    out = run_kici("run", "local", "push", "--json", cwd=repo)
    assert out.returncode == 0, out.stderr
    jobs = {j["name"]: j for j in json.loads(out.stdout)["workflows"][0]["jobs"]}
    assert sorted(jobs) == ["after", "test (a, 18)", "test (a, 20)", "test (b, 20)", "test (c, 22)"]
    assert jobs["test (c, 22)"]["outputs"] == {"build": {"combo": "c-22"}}
    assert "children: test (a, 18),test (a, 20),test (b, 20),test (c, 22)" in out.stderr


def test_secrets_are_masked_and_env_is_clean(repo_factory: Repo) -> None:
    repo = repo_factory({
        ".kici/workflows/s.py": """
import base64
from kici import job, push, step, workflow

@step
def show(ctx):
    token = ctx.secrets.get("TOKEN")
    print("plain", token)
    print("b64", base64.b64encode(token.encode()).decode())
    ctx.sh('echo "from shell: $EXTRA and ${KICI_AGENT_TOKEN:-unset}"')
    ctx.secrets.get("NOPE")

s = workflow("s", on=push(), jobs=[job("j", steps=[show])])
""",
    })
    (repo / ".kici/.secrets").write_text("# local\nTOKEN=hunter2-very-secret\n")
    out = run_kici("run", "local", "push", "--env", "EXTRA=yes", cwd=repo,
                   env={"KICI_AGENT_TOKEN": "kat_should_not_leak"})
    text = out.stdout + out.stderr
    assert out.returncode == 1
    assert "hunter2" not in text and "plain ***" in text and "b64 ***" in text
    assert "from shell: yes and unset" in text
    assert "secret 'NOPE' is not available (available: TOKEN)" in text



def test_local_jobs_get_only_the_secrets_they_declare(repo_factory: Repo) -> None:
    """`kici run local` reads `.kici/.secrets`: a job declaring `secrets=[...]` gets those names only, and
    one that is missing fails the job before any step; a job declaring nothing sees every local secret."""
    repo = repo_factory({
        ".kici/workflows/s.py": """
from kici import job, push, step, workflow

def names(ctx):
    print("names:", ",".join(sorted(ctx.secrets.list())))

s = workflow("s", on=push(), jobs=[
    job("declared", secrets=["TOKEN"], steps=[step("show", names)]),
    job("undeclared", steps=[step("show", names)]),
    job("missing", secrets=["TOKEN", "NOPE_KEY"], steps=[step("touch", "touch ran-anyway")]),
])
""",
    })
    (repo / ".kici/.secrets").write_text("TOKEN=hunter2-very-secret\nOTHER=other-local-secret\n")
    out = run_kici("run", "local", "push", "--json", "--in-place", cwd=repo)
    assert out.returncode == 1, out.stderr
    jobs = {j["name"]: j for j in json.loads(out.stdout)["workflows"][0]["jobs"]}
    assert jobs["declared"]["status"] == "success" and jobs["undeclared"]["status"] == "success"
    assert "[declared] │ names: TOKEN\n" in out.stderr
    assert "[undeclared] │ names: OTHER,TOKEN\n" in out.stderr
    assert "[missing] secret NOPE_KEY not found (looked in .kici/.secrets)" in out.stderr
    assert jobs["missing"]["status"] == "failed"
    assert jobs["missing"]["error"] == "secret NOPE_KEY not found (looked in .kici/.secrets)"
    assert [st["status"] for st in jobs["missing"]["steps"]] == ["skipped"]
    assert not (repo / "ran-anyway").exists()
    assert "hunter2" not in out.stdout + out.stderr

LEAK_WORKFLOW = """
import subprocess
from kici import job, push, step, workflow

def show(ctx):
    ctx.sh('echo "python=$(command -v python || echo none)"; echo "PATH=$PATH"; env | sed "s/^/sh:/"')
    child = subprocess.run(["sh", "-c", "env"], capture_output=True, text=True, check=True).stdout
    for line in child.splitlines():
        print("child:" + line)

leak = workflow("leak", on=push(), jobs=[
    job("show", steps=[show]),
    job("explicit", env={"PYTHONPATH": "/from/the/job"}, steps=[step("sh", 'echo "job-pythonpath=$PYTHONPATH"')]),
])
"""


def test_kici_virtualenv_does_not_leak_into_steps(repo_factory: Repo, tmp_path: Path) -> None:
    """`kici` run from its virtualenv (bin first on PATH, VIRTUAL_ENV, PYTHONPATH): a step's `python`
    is not KiCI's, and nothing of KiCI's environment reaches the step unless the workflow sets it."""
    assert sys.prefix != sys.base_prefix, "the tests run from KiCI's virtualenv"
    repo = repo_factory({".kici/workflows/leak.py": LEAK_WORKFLOW})
    marker = tmp_path / "on-pythonpath"
    marker.mkdir()
    out = run_kici("run", "local", "push", "--branch", "main", cwd=repo, env={
        "PATH": f"{Path(sys.prefix) / 'bin'}:{os.environ['PATH']}", "VIRTUAL_ENV": sys.prefix,
        "PYTHONPATH": str(marker)})
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [line.split("│")[-1].strip() for line in out.stdout.splitlines()]
    assert any("python=" in line for line in lines) and any("sh:PATH=" in line for line in lines)
    assert any("child:PATH=" in line for line in lines)
    leaks = [line for line in lines if sys.prefix in line or str(marker) in line
             or any(f"{p}{name}=" in line for p in ("sh:", "child:")
                    for name in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH"))]
    assert leaks == [], leaks
    assert "job-pythonpath=/from/the/job" in out.stdout


def test_uncommitted_changes_run_in_an_isolated_copy(repo_factory: Repo) -> None:
    repo = repo_factory(pipeline())
    write_files(repo, {
        "src/app.py": "print('edited, not committed')\n",
        "new_file.txt": "untracked\n",
        ".kici/workflows/extra.py": """
from kici import job, push, step, workflow
extra = workflow("extra", on=push(), jobs=[job("look", steps=[
    step("show", "cat src/app.py new_file.txt && touch made-by-step && git log -1 --format=%s")])])
""",
    })
    out = run_kici("run", "local", "push", "--branch", "main", "--workflow", "extra", cwd=repo)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "edited, not committed" in out.stdout and "untracked" in out.stdout and "initial" in out.stdout
    assert not (repo / "made-by-step").exists()
    assert git(repo, "status", "--porcelain").count("\n") == 3  # the working tree is as we left it



def test_staged_unstaged_and_untracked_changes_all_reach_the_steps(repo_factory: Repo) -> None:
    """The working tree as it is: HEAD plus the index plus the working tree, deletions too."""
    repo = repo_factory({
        ".kici/workflows/look.py": """
from kici import job, push, step, workflow
show = step("show", 'for f in *.txt; do echo "$f=$(cat $f)"; done')
look = workflow("look", on=push(), jobs=[job("look", steps=[show])])
""",
        "kept.txt": "committed\n", "staged-edit.txt": "committed\n", "staged-del.txt": "committed\n",
        "both.txt": "committed\n", "unstaged-del.txt": "committed\n",
    })
    write_files(repo, {"staged-edit.txt": "staged\n", "staged-new.txt": "staged new\n", "both.txt": "staged\n"})
    git(repo, "add", "staged-edit.txt", "staged-new.txt", "both.txt")
    git(repo, "rm", "-q", "staged-del.txt")
    write_files(repo, {"both.txt": "unstaged on top\n", "untracked.txt": "untracked\n"})
    (repo / "unstaged-del.txt").unlink()
    before = git(repo, "status", "--porcelain")
    out = run_kici("run", "local", "push", "--branch", "main", cwd=repo)
    assert out.returncode == 0, out.stdout + out.stderr
    seen = sorted(line.split("│")[-1].strip() for line in out.stdout.splitlines() if ".txt=" in line)
    assert seen == ["both.txt=unstaged on top", "kept.txt=committed", "staged-edit.txt=staged",
                    "staged-new.txt=staged new", "untracked.txt=untracked"], out.stdout
    assert git(repo, "status", "--porcelain") == before  # the repository is left as it was


def test_job_filter_runs_the_job_and_what_it_needs(repo_factory: Repo) -> None:
    repo = repo_factory(pipeline())
    out = run_kici("run", "local", "push", "--branch", "main", "--job", "test", "--json", cwd=repo)
    assert out.returncode == 0, out.stderr
    assert [j["name"] for j in json.loads(out.stdout)["workflows"][0]["jobs"]] == ["lint", "test"]


def test_nothing_matched_exits_0(repo_factory: Repo) -> None:
    repo = repo_factory(pipeline())
    out = run_kici("run", "local", "push", "--branch", "develop", cwd=repo)
    assert out.returncode == 0 and "nothing to run" in out.stdout


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(int(entry))
    return found


def test_ctrl_c_cancels_and_leaves_no_process(repo_factory: Repo) -> None:
    marker = f"kici-test-{uuid.uuid4().hex[:12]}"
    repo = repo_factory({
        ".kici/workflows/slow.py": f"""
from kici import job, push, step, workflow
slow = workflow("slow", on=push(), jobs=[job("wait", steps=[step("sleepy",
    "setsid python3 -c 'import time; time.sleep(300)' {marker}-detached & "
    "python3 -c 'import time; time.sleep(300)' {marker}-fg & sleep 0.5; echo READY; wait")])])
""",
    })
    proc = subprocess.Popen(
        [sys.executable, "-m", "kici", "run", "local", "push"],
        cwd=repo, env=kici_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            if line.rstrip().endswith("│ READY") or time.monotonic() > deadline:
                break
        assert len(_processes_with(marker)) >= 2  # both sleepers (and the shell running them)
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[0]
        assert proc.returncode == 130, rest
        assert "cancelled" in rest
        deadline = time.monotonic() + 10
        while _processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _processes_with(marker) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in _processes_with(marker):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    "args", [["push", "--env", "NOEQUALS"], ["push", "--input", "=x"], ["dispatch", "--payload", "/nonexistent.json"]]
)
def test_bad_arguments_exit_2(repo_factory: Repo, args: list[str]) -> None:
    repo = repo_factory(pipeline())
    out = run_kici("run", "local", *args, cwd=repo)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "error:" in out.stderr


HOOKS = """
from kici import job, push, step, workflow

def note(what):
    def hook(ctx):
        ctx.log.info(f"workflow hook {{what}} ran")
    return hook

a = job("a", steps=[step("go", "{cmd}")])
wf = workflow("wf", on=push(), jobs=[a], on_success=note("on_success"), on_failure=note("on_failure"),
              cleanup=note("cleanup"))
"""


def test_workflow_hooks_are_refused_until_the_orchestrator_runs_them(repo_factory: Repo) -> None:
    """Workflow-level hooks would run under `kici run local` but never in CI (the orchestrator does not
    schedule them): `run local` refuses them like `kici compile`, naming each one, and runs nothing."""
    repo = repo_factory({".kici/workflows/wf.py": HOOKS.format(cmd="touch ran")})
    out = run_kici("run", "local", "push", cwd=repo)
    assert out.returncode == 1, out.stdout + out.stderr
    for hook in ("on_success", "on_failure", "cleanup"):
        assert (f"wf.py › workflow 'wf': `{hook}=` is not supported yet (the orchestrator does not run workflow "
                "hooks); remove it") in out.stderr, out.stderr
    assert " ran" not in out.stdout + out.stderr and not (repo / "ran").exists()


CONCURRENT = """
from kici import job, push, step, workflow
slow = workflow("slow", on=push(), jobs=[job("j", steps=[step("s", "echo STARTED; sleep 30; echo FINISHED")])],
                concurrency={{"group": lambda event: f"deploy-{{event.branch}}", "cancel_in_progress": {cancel}}})
"""


def _start_local(repo: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kici", "run", "local", "push", "--branch", "main"],
        cwd=repo, env=kici_env({"XDG_RUNTIME_DIR": str(repo.parent / "runtime")}), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def _read_until(proc: subprocess.Popen[str], needle: str, timeout: float = 60) -> str:
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if needle in line or time.monotonic() > deadline:
            break
    return "".join(seen)


@pytest.mark.parametrize("cancel", [False, True])
def test_local_concurrency_group_waits_or_cancels(repo_factory: Repo, cancel: bool) -> None:
    """authoring §5.34"""
    repo = repo_factory({".kici/workflows/slow.py": CONCURRENT.format(cancel=cancel)})
    (repo.parent / "runtime").mkdir(exist_ok=True)
    first = _start_local(repo)
    second: subprocess.Popen[str] | None = None
    try:
        assert "│ STARTED" in _read_until(first, "│ STARTED")
        second = _start_local(repo)
        if cancel:
            out2 = _read_until(second, "│ STARTED")
            assert "cancelling the run in progress" in out2 and "│ STARTED" in out2
            first_rest = first.communicate(timeout=60)[0]
            assert first.returncode == 130 and "FINISHED" not in first_rest
        else:
            out2 = _read_until(second, "waiting for the run in progress")
            assert "waiting for the run in progress" in out2
            assert first.poll() is None  # the first run goes on undisturbed
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _runner_processes() -> set[int]:
    return set(_processes_with("kici.runner"))


@pytest.mark.parametrize("case", ["nothing matched", "compile error", "bad argument"])
def test_the_runner_started_ahead_of_time_never_outlives_kici(repo_factory: Repo, case: str) -> None:
    before = _runner_processes()
    if case == "compile error":
        repo = repo_factory({".kici/workflows/ci.py": "raise RuntimeError('broken')\n"})
        args = ["push"]
    else:
        repo = repo_factory(pipeline())
        args = ["push", "--branch", "develop"] if case == "nothing matched" else ["push", "--env", "X"]
    out = run_kici("run", "local", *args, cwd=repo)
    assert out.returncode == {"nothing matched": 0, "compile error": 1, "bad argument": 2}[case], out.stderr
    deadline = time.monotonic() + 10
    while _runner_processes() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _runner_processes() - before == set()


@pytest.mark.parametrize("kind", ["not a git repository", "no commits yet"])
def test_run_local_without_git_history(tmp_path: Path, kind: str) -> None:
    repo = tmp_path / "r"
    write_files(repo, {".kici/workflows/ci.py": 'from kici import job, push, step, workflow\n'
                       'ci = workflow("ci", on=push(), jobs=[job("j", steps=[step("s", "cat data.txt")])])\n',
                       "data.txt": "payload-123\n", ".kici/.secrets": "A=b\n"})
    if kind == "no commits yet":
        git(repo, "init", "-q", "-b", "main")
    out = run_kici("run", "local", "push", "--branch", "main", cwd=repo)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "payload-123" in out.stdout


DISPATCH = """
from kici import dispatch, inputs, job, step, workflow

@step
def show(ctx):
    ctx.log.info(f"inputs: {dict(sorted(ctx.inputs.items()))!r}")

rel = workflow("rel", on=dispatch(inputs={
    "version": inputs.string(required=True),
    "target": inputs.choice(["staging", "production"], default="staging"),
    "dry_run": inputs.boolean(default=True),
    "shards": inputs.number(),
}), jobs=[job("j", steps=[show])])
"""


@pytest.mark.parametrize(("args", "code", "expected"), [
    (["--input", "version=1.2", "--input", "dry_run=no", "--input", "shards=4"], 0,
     "inputs: {'dry_run': False, 'shards': 4, 'target': 'staging', 'version': '1.2'}"),
    ([], 2, "input 'version' is required"),
    (["--input", "version=1", "--input", "target=prod"], 2, "must be one of staging, production"),
    (["--input", "version=1", "--input", "shards=many"], 2, "input 'shards' must be a number"),
    (["--input", "version=1", "--input", "color=red"], 2, "unknown input(s) color"),
])
def test_dispatch_inputs_are_typed_and_checked(repo_factory: Repo, args: list[str], code: int, expected: str) -> None:
    repo = repo_factory({".kici/workflows/rel.py": DISPATCH})
    out = run_kici("run", "local", "dispatch", *args, cwd=repo)
    assert out.returncode == code, out.stdout + out.stderr
    assert expected in out.stdout + out.stderr


def test_local_run_names_the_test_reports_it_does_not_send(repo_factory: Repo) -> None:
    """Only an orchestrator reads test reports: a local run says so instead of silently skipping them."""
    repo = repo_factory({".kici/workflows/ci.py": (
        "from kici import job, push, step, workflow\n"
        "t = job('t', steps=[step('s', 'mkdir -p reports && echo \"<testsuite/>\" > reports/junit.xml')],\n"
        "        test_reports=['reports/*.xml'])\n"
        "ci = workflow('ci', on=push(), jobs=[t])\n")})
    assert run_kici("compile", cwd=repo).returncode == 0
    ran = run_kici("run", "local", "push", "--branch", "main", cwd=repo)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "test reports not sent by a local run (they stay in the workspace): reports/*.xml" in ran.stdout
