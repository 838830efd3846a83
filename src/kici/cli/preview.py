"""`kici preview EVENT`: which workflows and jobs would run, and why."""

from __future__ import annotations

import json
from typing import Any

import click

from kici.cli.common import fail, prepare
from kici.engine.plan import PlannedJob, plan_workflow


def run_preview(event: str, *, job_filter: tuple[str, ...], as_json: bool, **kw: Any) -> int:
    prepared = prepare(event, **kw)
    result: list[dict[str, Any]] = []
    for decision in prepared.decisions:
        wf = prepared.lock.workflow(decision.workflow)
        assert wf is not None
        jobs = plan_workflow(wf) if decision.matched else []
        if job_filter:
            known = {j.name for j in wf.jobs}
            missing = [j for j in job_filter if j not in known]
            if missing and decision.matched:
                fail(f"workflow {wf.name!r} has no job(s) {', '.join(missing)}")
            jobs = [j for j in jobs if j.job in job_filter or j.name in job_filter]
        result.append(
            {
                "workflow": wf.name,
                "file": wf.source.file,
                "description": wf.description,
                "matched": decision.matched,
                "trigger": None if decision.match is None else {
                    "index": decision.match.trigger_index,
                    "type": decision.match.trigger_type,
                    "reason": decision.match.reason,
                },
                "reasons": list(decision.reasons),
                "jobs": [_job_json(j) for j in jobs],
            }
        )
    if as_json:
        click.echo(json.dumps({"event": prepared.event.model_dump(mode="json", exclude={"payload"}),
                               "workflows": result}, indent=2))
        return 0
    ev = prepared.event
    where = ev.branch or ev.target_branch or ev.tag or ev.name or ""
    click.echo(f"event: {ev.type}{':' + ev.action if ev.action else ''} {where}".rstrip()
               + (f" ({len(ev.changed_files)} changed file(s))" if ev.changed_files is not None else ""))
    matched = [r for r in result if r["matched"]]
    for r in result:
        if r["matched"]:
            click.secho(f"✓ {r['workflow']}", fg="green", bold=True, nl=False)
            click.echo(f"  ({r['file']}) — trigger #{r['trigger']['index'] + 1} {r['trigger']['type']}: "
                       f"{r['trigger']['reason']}")
            if r["description"]:
                click.echo(f"    {r['description']}")
            for j in r["jobs"]:
                needs = ", ".join(n["name"] for n in j["needs"])
                click.echo(f"    • {j['name']}" + (f"  (needs {needs})" if needs else ""))
        else:
            click.secho(f"✗ {r['workflow']}", fg="bright_black", nl=False)
            why = "; ".join(r["reasons"]) or "no triggers"
            click.echo(f"  ({r['file']}) — {why}")
    click.echo(f"{len(matched)} of {len(result)} workflow(s) would run")
    return 0


def _job_json(job: PlannedJob) -> dict[str, Any]:
    return {
        "name": job.name,
        "job": job.job,
        "matrix": job.matrix,
        "needs": [{"name": n.name, "run_on": list(n.run_on)} for n in job.needs],
        "steps": [s.name for s in job.lock_job.steps] if job.lock_job else [],
    }
