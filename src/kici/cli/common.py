"""What `kici preview` and `kici run local` share: compile in memory, build the event, match."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import click

from kici.cli.events import EventOptions, EventSpecError, build_event, load_payload, parse_pairs
from kici.compiler.errors import CompileFailed
from kici.compiler.project import Project, compile_project
from kici.engine.events import Event
from kici.engine.lockfile import LockFile
from kici.engine.triggers import MatchDecision, match_all


@dataclass
class Prepared:
    project: Project
    lock: LockFile
    event: Event
    decisions: list[MatchDecision]


def prepare(
    event: str,
    *,
    branch: str | None = None,
    source_branch: str | None = None,
    tag: str | None = None,
    files: str | None = None,
    repo: str | None = None,
    sha: str | None = None,
    inputs: tuple[str, ...] = (),
    payload: str | None = None,
    workflow_filter: tuple[str, ...] = (),
    kici_dir: str | None = None,
) -> Prepared:
    """Compile the working tree's workflows and match EVENT; exits with a message on bad input."""
    project = Project.locate(kici_dir)
    try:
        opts = EventOptions(
            branch=branch,
            source_branch=source_branch,
            tag=tag,
            files=[f.strip() for f in files.split(",") if f.strip()] if files is not None else None,
            repo=repo,
            sha=sha,
            inputs=parse_pairs(inputs, "--input"),
            payload=load_payload(payload),
        )
        ev = build_event(event, opts, project.root)
    except EventSpecError as exc:
        fail(str(exc))
    try:
        lock = compile_project(project)
    except CompileFailed as exc:
        for err in exc.errors:
            click.secho(f"error: {err}", fg="red", err=True)
        sys.exit(1)
    known = {w.name for w in lock.workflows}
    unknown = [w for w in workflow_filter if w not in known]
    if unknown:
        fail(f"unknown workflow(s) {', '.join(unknown)}; workflows: {', '.join(sorted(known))}")
    workflows = [w for w in lock.workflows if not workflow_filter or w.name in workflow_filter]
    return Prepared(project, lock, ev, match_all(workflows, ev))


def fail(message: str) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(2)
