"""The `kici` command: init, compile, preview, run local."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from kici.cli.help_text import EVENT_HELP


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kici", prog_name="kici")
def cli() -> None:
    """KiCI: workflows as Python code under .kici/workflows/."""


@cli.command()
@click.option("--kici-dir", type=click.Path(file_okay=False), default=None, help="The .kici folder (default ./.kici).")
@click.option("--force", is_flag=True, help="Overwrite an existing .kici/workflows/ci.py.")
def init(kici_dir: str | None, force: bool) -> None:
    """Scaffold .kici/ with a working example workflow, then compile it."""
    from importlib import resources

    from kici.compiler.project import Project

    project = Project(root=Path.cwd(), kici_dir=Path(kici_dir or ".kici").resolve())
    project = Project(root=project.kici_dir.parent, kici_dir=project.kici_dir)
    workflows = project.kici_dir / "workflows"
    workflows.mkdir(parents=True, exist_ok=True)
    target = workflows / "ci.py"
    templates = resources.files("kici.cli") / "templates"
    if target.exists() and not force:
        click.echo(f"{project.rel(target)} already exists (use --force to overwrite)")
    else:
        target.write_text(templates.joinpath("ci.py").read_text(encoding="utf-8"), encoding="utf-8")
        click.echo(f"created {project.rel(target)}")
    ignore = project.kici_dir / ".gitignore"
    if not ignore.exists():
        ignore.write_text(templates.joinpath("gitignore").read_text(encoding="utf-8"), encoding="utf-8")
        click.echo(f"created {project.rel(ignore)}")
    _compile(project, check=False)


@cli.command()
@click.option("--check", is_flag=True, help="Exit 1 without writing if the lock file is missing or out of date.")
@click.option("--kici-dir", type=click.Path(file_okay=False), default=None, help="The .kici folder.")
def compile(check: bool, kici_dir: str | None) -> None:
    """Compile .kici/workflows/*.py into .kici/kici.lock.json."""
    from kici.compiler.project import Project

    _compile(Project.locate(kici_dir), check=check)


def _compile(project: object, *, check: bool) -> None:
    from kici.compiler.errors import CompileFailed
    from kici.compiler.project import Project, check_lock, write_lock

    assert isinstance(project, Project)
    try:
        if check:
            ok, reason = check_lock(project)
            click.echo(reason, err=not ok)
            sys.exit(0 if ok else 1)
        result = write_lock(project)
    except CompileFailed as exc:
        for err in exc.errors:
            click.secho(f"error: {err}", fg="red", err=True)
        click.echo(f"{len(exc.errors)} error(s); lock file not written", err=True)
        sys.exit(1)
    jobs = sum(len(w.jobs) for w in result.lock.workflows)
    state = "written" if result.changed else "unchanged"
    click.echo(
        f"compiled {len(result.lock.workflows)} workflow(s), {jobs} job(s) → "
        f"{project.rel(project.lock_path)} ({state})"
    )


def _event_options(f):  # type: ignore[no-untyped-def]
    options = [
        click.option("--branch", "-b", help="Branch pushed to (push) or targeted (pr)."),
        click.option("--source-branch", help="PR head branch (default: the current branch)."),
        click.option("--tag", help="Tag name for tag events."),
        click.option("--files", help="Changed files, comma-separated (default: from git)."),
        click.option("--repo", help="owner/name of the repository (default: from the origin remote)."),
        click.option("--sha", help="Commit SHA (default: HEAD)."),
        click.option("--input", "inputs", multiple=True, metavar="K=V", help="Dispatch input (repeatable)."),
        click.option("--payload", type=click.Path(dir_okay=False), help="JSON file with the event payload."),
        click.option("--workflow", "-w", "workflow_filter", multiple=True, help="Only this workflow (repeatable)."),
        click.option("--kici-dir", type=click.Path(file_okay=False), default=None, help="The .kici folder."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@cli.command(epilog=EVENT_HELP)
@click.argument("event")
@_event_options
@click.option("--job", "-j", "job_filter", multiple=True, help="Only this job (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def preview(event: str, job_filter: tuple[str, ...], as_json: bool, **kw: object) -> None:
    """Show which workflows and jobs EVENT would run, and why, without running anything."""
    from kici.cli.preview import run_preview

    sys.exit(run_preview(event, job_filter=job_filter, as_json=as_json, **kw))  # type: ignore[arg-type]


@cli.group()
def run() -> None:
    """Run workflows."""


@run.command("local", epilog=EVENT_HELP)
@click.argument("event")
@_event_options
@click.option("--job", "-j", "job_filter", multiple=True, help="Only this job and what it needs (repeatable).")
@click.option("--env", "env", multiple=True, metavar="K=V", help="Extra environment variable for steps.")
@click.option("--concurrency", "-c", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Jobs run at once.")
@click.option("--keep-going", is_flag=True, help="Run jobs whose needs failed too (instead of skipping them).")
@click.option("--in-place", is_flag=True, help="Run in the working tree instead of an isolated copy.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary at the end instead of a table.")
@click.option("--junit", type=click.Path(dir_okay=False), help="Write a JUnit XML report here.")
@click.option("--step-timeout", type=click.FloatRange(min=0.001), default=None,
              help="Default step timeout in seconds (default 1800).")
def local(event: str, **kw: object) -> None:
    """Run the workflows EVENT triggers on this machine, in an isolated copy of HEAD plus your changes."""
    from kici.runner.spawn import popen_runner

    # Start the first job's runner now: its interpreter start-up then overlaps with importing and
    # compiling below (on a trivial workflow, most of the wall time).
    spawned = popen_runner()
    try:
        from kici.cli.local_run import run_local

        code = run_local(event, prespawned=spawned, **kw)  # type: ignore[arg-type]
    finally:
        if not spawned.adopted:
            spawned.discard()
    sys.exit(code)


def main() -> None:
    try:
        cli(prog_name="kici")
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    _exit_now(code)


def _exit_now(code: object) -> None:
    """Exit without the interpreter's teardown of every imported module (~0.1 s with pydantic loaded,
    a fifth of a trivial `kici run local`). Everything the CLI owns is closed by then: runner processes
    waited for, temporary directories removed; only the standard streams need flushing."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            status = status or 1
    os._exit(status)


if __name__ == "__main__":  # pragma: no cover
    main()
