"""`kici-admin`: manage a KiCI orchestrator through its admin REST API.

Human-readable tables by default, `--json` for scripts. Every error — from the API, the network, or the
command line — is one line on stderr; the exit code is 1 for API and network errors, 2 for usage errors.
"""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import click
from click.core import ParameterSource

from kici.admin.client import DEFAULT_TIMEOUT_S, AdminClient, AdminCLIError, check_base_url
from kici.admin.follow import RunLogs, Watcher, print_logs
from kici.admin.follow import follow as follow_logs
from kici.admin.git_hooks import install_advice
from kici.admin.output import duration, millis_text, print_fields, print_json, print_table, status_text
from kici.engine.junit import counts_text

DEFAULT_URL = "http://127.0.0.1:4000"
ROLES = ("owner", "admin", "auditor", "viewer")

T = TypeVar("T")

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


@dataclass
class Config:
    url: str
    token: str | None
    token_file: str | None
    timeout: float
    _client: AdminClient | None = field(default=None, repr=False)

    def client(self) -> AdminClient:
        """The API client; the token (file) is read here, not at start-up, so `--help` always works."""
        if self._client is None:
            token = _read_token_file(self.token_file) if self.token_file else self.token
            if not token:
                raise AdminCLIError(
                    "no admin token: pass --token or --token-file, or set KICI_ADMIN_TOKEN", exit_code=2
                )
            self._client = AdminClient(self.url, token, timeout=self.timeout)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _read_token_file(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise AdminCLIError(f"cannot read the token file {path}: {exc.strerror or exc}", exit_code=2) from None
    token = text.strip()
    if not token or "\n" in token:
        raise AdminCLIError(f"the token file {path} must contain exactly one token", exit_code=2)
    return token


def _token_source(ctx: click.Context, token: str | None, token_file: str | None) -> tuple[str | None, str | None]:
    """(token, token file to read): a token given on the command line beats one from the environment;
    giving both --token and --token-file on the command line is ambiguous."""
    token = token.strip() if token else None
    if token and token_file:
        token_cli = ctx.get_parameter_source("token") == ParameterSource.COMMANDLINE
        file_cli = ctx.get_parameter_source("token_file") == ParameterSource.COMMANDLINE
        if token_cli and file_cli:
            raise click.UsageError("give either --token or --token-file, not both", ctx=ctx)
        return (None, token_file) if file_cli else (token, None)
    return token, token_file


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "-u", "--url", envvar="KICI_ADMIN_URL", default=DEFAULT_URL, show_default=True, metavar="URL",
    help="Orchestrator URL, including KICI_BASE_PATH if it has one. Env: KICI_ADMIN_URL.",
)
@click.option("-t", "--token", envvar="KICI_ADMIN_TOKEN", metavar="TOKEN",
              help="Admin token. Env: KICI_ADMIN_TOKEN.")
@click.option("--token-file", envvar="KICI_ADMIN_TOKEN_FILE", metavar="PATH",
              help="Read the admin token from this file. Env: KICI_ADMIN_TOKEN_FILE.")
@click.option("--timeout", envvar="KICI_ADMIN_TIMEOUT", type=click.FloatRange(min=0.1), default=DEFAULT_TIMEOUT_S,
              show_default=True, help="Seconds to wait for the orchestrator. Env: KICI_ADMIN_TIMEOUT.")
@click.pass_context
def cli(ctx: click.Context, url: str, token: str | None, token_file: str | None, timeout: float) -> None:
    """Manage a KiCI orchestrator through its admin API."""
    token, token_file = _token_source(ctx, token, token_file)
    config = Config(url=url, token=token, token_file=token_file, timeout=timeout)
    ctx.obj = config
    ctx.call_on_close(config.close)


def _path_part(value: str) -> str:
    return quote(value, safe="")


def _client() -> AdminClient:
    config: Config = click.get_current_context().find_object(Config)  # type: ignore[assignment]
    return config.client()


# -- whoami -----------------------------------------------------------------------------------------


@cli.command()
@json_option
def whoami(as_json: bool) -> None:
    """Show the token in use: name, role and permissions."""
    me = _client().get("/whoami")
    if as_json:
        print_json(me)
        return
    print_fields(me, [("name", "Token"), ("id", "Id"), ("role", "Role"), ("org_id", "Org")])
    click.echo("Permissions: " + ", ".join(me.get("permissions", [])))


# -- admin tokens -----------------------------------------------------------------------------------

TOKEN_COLUMNS = [("id", "id"), ("name", "name"), ("role", "role"), ("created_at", "created"),
                 ("last_used_at", "last used"), ("expires", "expires")]


def _check_duration(_: click.Context, __: click.Parameter, value: str | None) -> str | None:
    """`--expires-in 30d`: checked here so a typo is a usage error before any request."""
    if value is None:
        return None
    from kici.engine.durations import DurationError, parse_duration

    try:
        parse_duration(value)
    except DurationError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


expires_in_option = click.option(
    "--expires-in", callback=_check_duration, metavar="DURATION",
    help="The token stops working after this long: a whole number and s, m, h or d (e.g. 30d). Default: never.",
)


def _with_expiry(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table rows: `expires` is the expiry time, `EXPIRED` once past it, `never` without one."""
    return [{**t, "expires": "EXPIRED" if t.get("expired") else (t.get("expires_at") or "never")} for t in found]


def _show_created(created: dict[str, Any], kind: str, details: str) -> None:
    click.echo(f"Created {kind} {created['name']!r} ({details}, id {created['id']}).")
    click.echo("The token is shown once; store it now:")
    click.echo("")
    click.echo(f"    {created['token']}")
    click.echo("")


@cli.group()
def token() -> None:
    """Admin tokens: create, list, revoke."""


@token.command("create")
@click.option("--name", required=True, help="Who or what uses the token.")
@click.option("--role", required=True, type=click.Choice(ROLES), help="Only owners may create owner tokens.")
@expires_in_option
@json_option
def token_create(name: str, role: str, expires_in: str | None, as_json: bool) -> None:
    """Create an admin token (its value is printed once)."""
    created = _client().post("/tokens", {"name": name, "role": role, "expires_in": expires_in})
    if as_json:
        print_json(created)
    else:
        expiry = f", expires {created['expires_at']}" if created.get("expires_at") else ""
        _show_created(created, "admin token", f"role {created['role']}{expiry}")


@token.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked tokens.")
@json_option
def token_list(include_revoked: bool, as_json: bool) -> None:
    """List admin tokens (never their values)."""
    found = _client().get("/tokens", include_revoked=str(include_revoked).lower())
    if as_json:
        print_json(found)
        return
    columns = TOKEN_COLUMNS + ([("revoked_at", "revoked")] if include_revoked else [])
    print_table(_with_expiry(found), columns, empty="No admin tokens.")


@token.command("revoke")
@click.argument("token_id", metavar="ID")
@json_option
def token_revoke(token_id: str, as_json: bool) -> None:
    """Revoke an admin token by id (see `token list`)."""
    revoked = _client().delete(f"/tokens/{token_id}")
    if as_json:
        print_json(revoked)
    else:
        click.echo(f"Revoked admin token {revoked['name']!r} (id {revoked['id']}).")


# -- agent tokens -----------------------------------------------------------------------------------


def _labels(_: click.Context, __: click.Parameter, value: str | None) -> list[str]:
    if value is None or not value.strip():
        return []
    from kici.engine.labels import validate_user_labels  # the lock-file models behind it cost ~0.2 s to import

    try:
        return validate_user_labels(value.split(","))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@cli.group("agent-token")
def agent_token() -> None:
    """Agent tokens (`kat_…`): create, list, revoke."""


@agent_token.command("create")
@click.option("--name", required=True, help="Which agent or agent pool uses the token.")
@click.option("--labels", callback=_labels, metavar="A,B,…",
              help="Comma-separated labels agents using this token may register with.")
@click.option("--allow-root-steps", is_flag=True,
              help="Let agents using this token run job steps as root (refused otherwise).")
@expires_in_option
@json_option
def agent_token_create(name: str, labels: list[str], allow_root_steps: bool, expires_in: str | None,
                       as_json: bool) -> None:
    """Create an agent token (its value is printed once)."""
    created = _client().post("/agent-tokens", {"name": name, "labels": labels, "allow_root_steps": allow_root_steps,
                                               "expires_in": expires_in})
    if as_json:
        print_json(created)
    else:
        detail = "labels " + (",".join(created["labels"]) or "none")
        if created.get("allow_root_steps"):
            detail += ", root steps allowed"
        if created.get("expires_at"):
            detail += f", expires {created['expires_at']}"
        _show_created(created, "agent token", detail)


@agent_token.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked tokens.")
@json_option
def agent_token_list(include_revoked: bool, as_json: bool) -> None:
    """List agent tokens (never their values)."""
    found = _client().get("/agent-tokens", include_revoked=str(include_revoked).lower())
    if as_json:
        print_json(found)
        return
    columns = [("id", "id"), ("name", "name"), ("labels", "labels"), ("created_at", "created"),
               ("last_used_at", "last used"), ("expires", "expires")] + (
                   [("revoked_at", "revoked")] if include_revoked else [])
    print_table(_with_expiry(found), columns, empty="No agent tokens.")


@agent_token.command("revoke")
@click.argument("token_id", metavar="ID")
@json_option
def agent_token_revoke(token_id: str, as_json: bool) -> None:
    """Revoke an agent token by id (see `agent-token list`)."""
    revoked = _client().delete(f"/agent-tokens/{token_id}")
    if as_json:
        print_json(revoked)
    else:
        click.echo(f"Revoked agent token {revoked['name']!r} (id {revoked['id']}).")


# -- database ---------------------------------------------------------------------------------------


@cli.group()
def db() -> None:
    """The orchestrator's database schema."""


@db.command("migrate")
@click.option("--status", "status_only", is_flag=True, help="Only show where the schema stands.")
@json_option
def db_migrate(status_only: bool, as_json: bool) -> None:
    """Apply pending schema migrations (or, with --status, show them)."""
    client = _client()
    if status_only:
        status = client.get("/db/migrate")
        if as_json:
            print_json(status)
            return
        click.echo(f"Current revision: {status['current'] or '(empty database)'}")
        click.echo(f"Head revision:    {status['head']}")
        pending = status.get("pending") or []
        click.echo("Up to date." if status["up_to_date"] else f"Pending: {', '.join(pending)}")
        return
    result = client.post("/db/migrate")
    if as_json:
        print_json(result)
    elif result["applied"]:
        click.echo(f"Applied {', '.join(result['applied'])}; schema now at {result['after']}.")
    else:
        click.echo(f"Nothing to apply; schema already at {result['after']}.")


# -- runs -------------------------------------------------------------------------------------------


@cli.group()
def runs() -> None:
    """Runs: list, show, jobs, logs, watch, cancel, rerun, start, artifacts, tests."""


def _short_sha(value: Any) -> str | None:
    return str(value)[:12] if value else None


@runs.command("list")
@click.option("--status", help="Only runs with this status (several separated by commas).")
@click.option("--repo", help="Only runs of this repository (e.g. acme/app).")
@click.option("--workflow", help="Only runs of this workflow.")
@click.option("--branch", help="Only runs of this branch (a pull request's head branch).")
@click.option("--sha", help="Only runs of this commit (a full SHA or a prefix).")
@click.option("--source", help="Only runs from this source (name or id).")
@click.option("--trigger", help="Only runs started by this event type (push, pr, tag, schedule, …).")
@click.option("--before", metavar="CURSOR", help="The next page: the cursor printed after the previous page.")
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True, help="At most this many runs.")
@json_option
def runs_list(
    status: str | None, repo: str | None, workflow: str | None, branch: str | None, sha: str | None,
    source: str | None, trigger: str | None, before: str | None, limit: int, as_json: bool,
) -> None:
    """List runs, newest first. When more runs follow, the command that lists them is printed to stderr."""
    found, next_cursor = _client().get_page(
        "/runs", "X-Next-Cursor", status=status, repo=repo, workflow=workflow, branch=branch, sha=sha,
        source=source, trigger=trigger, before=before, limit=limit,
    )
    if as_json:
        print_json(found)
    else:
        rows = [{**r, "sha": _short_sha(r.get("sha")), "status": status_text(r)} for r in found]
        print_table(
            rows,
            [("id", "id"), ("workflow", "workflow"), ("status", "status"), ("repo", "repo"), ("ref", "ref"),
             ("sha", "sha"), ("created_at", "created")],
            empty="No runs.",
        )
    if next_cursor:
        click.echo(f"More runs: kici-admin runs list --before {next_cursor} (with the same filters)", err=True)


@runs.command("show")
@click.argument("run_id", metavar="ID")
@json_option
def runs_show(run_id: str, as_json: bool) -> None:
    """Show one run: its fields, then each job with its steps (status, duration) and outputs."""
    run = _client().get(f"/runs/{run_id}")
    if as_json:
        print_json(run)
        return
    print_fields(
        {**run, "status": status_text(run)},
        [("id", "Run"), ("workflow", "Workflow"), ("status", "Status"), ("repo", "Repository"), ("ref", "Ref"),
         ("sha", "Commit"), ("created_at", "Created"), ("started_at", "Started"), ("finished_at", "Finished"),
         ("failure_reason", "Reason"), ("cancelled_by", "Cancelled by"), ("delivery_id", "Delivery"),
         ("original_run_id", "Re-run of"), ("trust", "Trust"), ("hold_reason", "Held"),
         ("hold_expires_at", "Hold expires")],
    )
    _print_jobs_detail(run.get("jobs") or [])


def _print_jobs_detail(jobs: list[dict[str, Any]]) -> None:
    """`Jobs:` then one line per job and one indented line per step (numbered from 1, as in `runs logs`)."""
    if not jobs:
        return
    click.echo("\nJobs:")
    width = max(len(str(j.get("name"))) for j in jobs)
    for job in jobs:
        agent = f"  on {job['agent']}" if job.get("agent") else ""
        error = f"  {job['error']}" if job.get("error") else ""
        click.echo(f"  {job.get('name')!s:<{width}}  {status_text(job)}{agent}{error}")
        for step in job.get("steps") or []:
            took = millis_text(step.get("duration_ms"))
            step_error = f"  {step['error']}" if step.get("error") else ""
            click.echo(f"    {int(step.get('index', 0)) + 1}. {step.get('name')}  {step.get('status')}"
                       f"{'  ' + took if took else ''}{step_error}")
        if job.get("outputs"):
            click.echo(f"    outputs: {json.dumps(job['outputs'], sort_keys=True)}")
        if job.get("tests"):
            tests = job["tests"]
            unread = f", {tests['unread_files']} file(s) not read" if tests.get("unread_files") else ""
            click.echo(f"    tests: {_counts_text(tests)}{unread}")
        deliveries = job.get("secret_deliveries") or []
        if deliveries:  # the latest dispatch's: what the job's current attempt received
            names = ", ".join(f"{s['name']} ({s['scope']})" for s in deliveries[-1].get("secrets") or [])
            click.echo(f"    secrets: {names}")


@runs.command("jobs")
@click.argument("run_id", metavar="ID")
@json_option
def runs_jobs(run_id: str, as_json: bool) -> None:
    """List a run's jobs."""
    found = _client().get(f"/runs/{run_id}/jobs")
    if as_json:
        print_json(found)
        return
    print_table(
        [{**j, "status": status_text(j)} for j in found],
        [("id", "id"), ("name", "name"), ("status", "status"), ("agent", "agent"), ("attempt", "attempt"),
         ("started_at", "started"), ("finished_at", "finished"), ("error", "error")],
        empty="No jobs.",
    )


@runs.command("cancel")
@click.argument("run_id", metavar="ID")
@click.option("--force", is_flag=True, help="Agents kill running steps at once, without a grace period.")
@json_option
def runs_cancel(run_id: str, force: bool, as_json: bool) -> None:
    """Cancel a run: jobs not started are cancelled at once, running jobs are told to stop."""
    result = _client().post(f"/runs/{run_id}/cancel", {"force": force})
    if as_json:
        print_json(result)
        return
    if result["status"] == "cancelled":
        click.echo(f"Run {run_id} cancelled ({len(result['cancelled_jobs'])} job(s) cancelled; "
                   f"run status {result['run_status']}).")
    else:
        click.echo(f"Run {run_id} cancelling: {len(result['cancelled_jobs'])} job(s) cancelled, "
                   f"{len(result['running_jobs'])} running job(s) told to stop.")


def _until_interrupted(action: Callable[[], T]) -> T:
    """Run a long-polling `action`; Ctrl-C ends the command quietly with exit code 130 (128 + SIGINT), the
    shell's convention for a command stopped by the user, without click's "Aborted!"."""
    try:
        return action()
    except KeyboardInterrupt:
        click.echo("", err=True)  # ends the terminal's "^C" line
        raise click.exceptions.Exit(130) from None


@runs.command("logs")
@click.argument("run_id", metavar="ID")
@click.option("--job", metavar="NAME_OR_ID", help="Only this job (default: every job, in plan order).")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until the run has finished.")
def runs_logs(run_id: str, job: str | None, follow: bool) -> None:
    """Print a run's job logs.

    Every job's, in plan order, each line starting with its job's name; or only the one --job names. A
    header line (`── step 2: test ──`, numbered from 1) starts each step's lines."""
    logs = RunLogs(_client(), run_id, job=job)
    if follow:
        _until_interrupted(lambda: follow_logs(logs))
    else:
        _until_interrupted(lambda: print_logs(logs))


@runs.command("artifacts")
@click.argument("run_id", metavar="ID")
@click.option("--download", "download_dir", metavar="DIR", type=click.Path(file_okay=False, path_type=Path),
              help="Download every artifact into DIR/<job>/<path> (checked against its SHA-256).")
@json_option
def runs_artifacts(run_id: str, download_dir: Path | None, as_json: bool) -> None:
    """List a run's artifacts (files its jobs uploaded), or download them with --download DIR."""
    client = _client()
    found = client.get(f"/runs/{_path_part(run_id)}/artifacts")
    if download_dir is not None:
        root = download_dir.absolute()
        saved = []
        for item in found:
            dest = _artifact_dest(root, str(item["job"]), str(item["path"]))
            size, sha = client.download(f"/runs/{_path_part(run_id)}/artifacts/{_path_part(item['id'])}", dest)
            saved.append({**item, "file": str(dest)})
            if not as_json:
                click.echo(f"{dest}  ({size} bytes, sha256 {sha[:12]})")
        if as_json:
            print_json(saved)
        elif not found:
            click.echo("No artifacts.")
        return
    if as_json:
        print_json(found)
        return
    print_table(found, [("id", "id"), ("job", "job"), ("path", "path"), ("size", "size"),
                        ("sha256", "sha256"), ("created_at", "created")], empty="No artifacts.")


def _artifact_dest(root: Path, job: str, path: str) -> Path:
    """DIR/<job>/<path>, refusing anything that would land outside DIR (the server checks paths too)."""
    job_dir = job.replace("/", "_").replace("\\", "_").strip() or "_"
    if job_dir in (".", ".."):
        job_dir = "_" + job_dir
    dest = (root / job_dir / path).resolve()
    if root.resolve() not in dest.parents:
        raise AdminCLIError(f"artifact path {path!r} of job {job!r} would be written outside {root}")
    return dest


@runs.command("tests")
@click.argument("run_id", metavar="ID")
@click.option("--failed", is_flag=True, help="Only failing tests (status failed or error).")
@click.option("--job", metavar="NAME_OR_ID", help="Only this job's tests.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=1000, show_default=True,
              help="At most this many tests.")
@json_option
def runs_tests(run_id: str, failed: bool, job: str | None, limit: int, as_json: bool) -> None:
    """Show a run's test results: the JUnit XML reports its jobs sent (`test_reports=`).

    A table of the tests, then one line per report file that was not read, then the summary line
    (`Tests: 120 passed, 2 failed, 3 skipped`)."""
    found = _client().get(f"/runs/{_path_part(run_id)}/tests", status="failing" if failed else None, job=job,
                          limit=limit)
    if as_json:
        print_json(found)
        return
    rows = [{**t, "test": _test_name(t), "took": millis_text(t.get("duration_ms")),
             "message": (t.get("message") or "").splitlines()[0][:120] if t.get("message") else None}
            for t in found["tests"]]
    if not found["jobs"]:
        click.echo("No test reports.")
        return
    print_table(rows, [("job", "job"), ("status", "status"), ("test", "test"), ("took", "time"),
                       ("message", "message")], empty="No failing tests." if failed else "No tests.")
    if found["total"] > len(rows):
        click.echo(f"(showing {len(rows)} of {found['total']} tests; --limit for more)")
    for job_tests in found["jobs"]:
        for item in job_tests["files"]:
            if item.get("error"):
                click.echo(f"{job_tests['job']}: {item['path']} not read: {item['error']}")
    summaries = [j["summary"] for j in found["jobs"]]
    totals = {k: sum(int(s[k]) for s in summaries) for k in ("passed", "failed", "errors", "skipped", "total",
                                                             "duration_ms", "files")}
    click.echo(f"Tests: {_counts_text(totals)} ({totals['total']} in {totals['files']} file(s), "
               f"{millis_text(totals['duration_ms'])})")


def _test_name(test: dict[str, Any]) -> str:
    owner = test.get("classname") or test.get("suite")
    return f"{owner}::{test['name']}" if owner else str(test["name"])


def _counts_text(counts: dict[str, Any]) -> str:
    return counts_text(*(int(counts.get(key) or 0) for key in ("passed", "failed", "errors", "skipped")))


@runs.command("watch")
@click.argument("run_id", metavar="ID")
def runs_watch(run_id: str) -> None:
    """Watch a run live until it finishes.

    Shows job status changes and log lines as they come, then a summary line. Exits 0 when the run
    succeeded, 1 when it failed, was cancelled or timed out.
    """
    run = _until_interrupted(lambda: Watcher(RunLogs(_client(), run_id)).watch())
    if run.get("status") != "success":
        raise click.exceptions.Exit(1)


@runs.command("rerun")
@click.argument("run_id", metavar="ID")
@json_option
def runs_rerun(run_id: str, as_json: bool) -> None:
    """Start a new run of the same workflow, commit and event."""
    result = _client().post(f"/runs/{_path_part(run_id)}/rerun")
    if as_json:
        print_json(result)
        return
    new = result["run"]
    click.echo(f"Started run {new['id']} ({new.get('workflow')}, {new.get('status')}), a re-run of {run_id}.")
    click.echo(f"Watch it: kici-admin runs watch {new['id']}")


def _input_pairs(_: click.Context, __: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} must look like KEY=VALUE")
        if key.strip() in pairs:
            raise click.BadParameter(f"input {key.strip()!r} given twice")
        pairs[key.strip()] = value
    return pairs


@runs.command("start")
@click.argument("workflow")
@click.option("--source", required=True, metavar="NAME", help="The source (name or id) holding the workflow.")
@click.option("--ref", metavar="REF", help="Branch or tag to run at (default: the head of the default branch).")
@click.option("--sha", metavar="SHA", help="Commit to run at (instead of --ref).")
@click.option("--repo", metavar="OWNER/NAME", help="The repository, for a GitHub source (a git source has one).")
@click.option("--input", "inputs", multiple=True, metavar="KEY=VALUE", callback=_input_pairs,
              help="A value for one of the workflow's dispatch inputs (repeatable); converted and checked "
              "against the declared type by the orchestrator.")
@json_option
def runs_start(workflow: str, source: str, ref: str | None, sha: str | None, repo: str | None,
               inputs: dict[str, str], as_json: bool) -> None:
    """Start WORKFLOW by hand through its dispatch() trigger."""
    if ref is not None and sha is not None:
        raise click.UsageError("give --ref or --sha, not both")
    body: dict[str, Any] = {"source": source, "workflow": workflow, "inputs": inputs}
    for key, value in (("ref", ref), ("sha", sha), ("repo", repo)):
        if value is not None:
            body[key] = value
    run = _client().post("/runs", body)
    if as_json:
        print_json(run)
        return
    given = run.get("event", {}).get("inputs") or {}
    shown = ", ".join(f"{k}={v}" for k, v in sorted(given.items()))
    click.echo(f"Started run {run['id']} ({run['workflow']} at {_short_sha(run['sha'])}"
               f"{', inputs ' + shown if shown else ''}).")
    click.echo(f"Watch it: kici-admin runs watch {run['id']}")


# -- queue, agents, events ------------------------------------------------------------------------


@cli.group()
def queue() -> None:
    """The dispatch queue: list.

    Jobs waiting for an agent, handed to one, or held for an agent that disconnected."""


@queue.command("list")
@click.option("--status", type=click.Choice(("pending", "dispatched", "recovering")), help="Only this status.")
@click.option("--limit", type=click.IntRange(1, 500), default=100, show_default=True, help="At most this many rows.")
@json_option
def queue_list(status: str | None, limit: int, as_json: bool) -> None:
    """List the active queue (pending, dispatched, recovering), oldest first."""
    found = _client().get("/queue", status=status, limit=limit)
    if as_json:
        print_json(found)
        return
    rows = [{**r, "age": duration(r.get("age_seconds")), "dispatched": duration(r.get("dispatched_seconds"))}
            for r in found]
    print_table(
        rows,
        [("job_name", "job"), ("workflow", "workflow"), ("repo", "repo"), ("status", "status"), ("agent", "agent"),
         ("attempts", "attempts"), ("age", "age"), ("dispatched", "dispatched"), ("run_id", "run")],
        empty="The queue is empty.",
    )


@cli.group()
def cache() -> None:
    """Job caches: list, purge.

    Caches jobs saved (`job(..., cache=Cache(...))`, `ctx.cache`), per repository and namespace (`trusted`,
    or `untrusted:<ref>` for held-then-approved runs)."""


def _size(value: Any) -> str:
    size = int(value or 0)
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


@cache.command("list")
@click.option("--repo", metavar="OWNER/NAME", help="Only this repository's caches.")
@click.option("--key", "key_prefix", metavar="PREFIX", help="Only keys starting with PREFIX.")
@click.option("--limit", type=click.IntRange(1, 1000), default=1000, show_default=True, help="At most this many.")
@json_option
def cache_list(repo: str | None, key_prefix: str | None, limit: int, as_json: bool) -> None:
    """List caches by repository, namespace and key, with their size and last use."""
    found = _client().get("/caches", repo=repo, key_prefix=key_prefix, limit=limit)
    if as_json:
        print_json(found)
        return
    rows = [{**c, "size_text": _size(c.get("size"))} for c in found]
    print_table(
        rows,
        [("repo", "repo"), ("namespace", "namespace"), ("key", "key"), ("size_text", "size"),
         ("created_at", "saved"), ("last_used_at", "last used")],
        empty="No caches.",
    )
    if found:
        click.echo(f"{len(found)} cache(s), {_size(sum(int(c.get('size') or 0) for c in found))}.")


@cache.command("purge")
@click.option("--repo", required=True, metavar="OWNER/NAME", help="The repository whose caches go.")
@click.option("--key", "key_prefix", metavar="PREFIX", help="Only keys starting with PREFIX.")
@json_option
def cache_purge(repo: str, key_prefix: str | None, as_json: bool) -> None:
    """Delete a repository's caches (all namespaces), or only those whose key starts with --key."""
    purged = _client().delete("/caches", repo=repo, key_prefix=key_prefix)
    if as_json:
        print_json(purged)
        return
    what = f" with keys starting with {key_prefix!r}" if key_prefix else ""
    click.echo(f"Purged {purged['deleted']} cache(s) of {repo}{what} ({_size(purged['bytes'])}).")


@cli.group()
def reports() -> None:
    """Reports: GitHub check-run updates and notifications owed by the orchestrator (list, retry)."""


@reports.command("list")
@click.option("--status", type=click.Choice(("pending", "sent", "failed")), help="Only this status.")
@click.option("--run", "run_id", metavar="RUN_ID", help="Only this run's reports.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True, help="At most this many.")
@json_option
def reports_list(status: str | None, run_id: str | None, limit: int, as_json: bool) -> None:
    """List reports, newest first (pending and failed ones show their last error)."""
    found = _client().get("/reports", status=status, run_id=run_id, limit=limit)
    if as_json:
        print_json(found)
        return
    rows = [{**r, "to": r.get("target") or "github"} for r in found]
    print_table(
        rows,
        [("id", "id"), ("kind", "kind"), ("event", "event"), ("status", "status"), ("attempts", "attempts"),
         ("to", "to"), ("next_attempt_at", "next attempt"), ("run_id", "run"), ("last_error", "last error")],
        empty="No reports.",
    )


@reports.command("retry")
@click.argument("report_id", type=click.IntRange(min=1), metavar="ID")
@json_option
def reports_retry(report_id: int, as_json: bool) -> None:
    """Send a failed report again (it becomes pending, due now)."""
    retried = _client().post(f"/reports/{report_id}/retry")
    if as_json:
        print_json(retried)
    else:
        click.echo(f"Report {retried['id']} ({retried['kind']} {retried['event']}) is pending again.")


@cli.group()
def audit() -> None:
    """The audit log: every mutation (who, what, on which target) and every denied request."""


def _check_time(_: click.Context, __: click.Parameter, value: str | None) -> str | None:
    """`--from`/`--to`: an ISO time or an age; checked here so a typo is a usage error before any request."""
    if value is None:
        return None
    import datetime as dt

    from kici.engine.durations import DurationError, parse_time

    try:
        parse_time(value, now=dt.datetime.now(dt.UTC))
    except DurationError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


@audit.command("list")
@click.option("--action", help="Only this action (secret.set), or every action under a prefix ending in a dot "
                               "(secret.).")
@click.option("--actor", help="Only this actor: token:<id>, github:<login> or system.")
@click.option("--from", "from_", callback=_check_time, metavar="TIME",
              help="Entries at or after TIME: ISO 8601 (UTC without an offset) or an age like 24h, 7d.")
@click.option("--to", callback=_check_time, metavar="TIME", help="Entries before TIME (same forms as --from).")
@click.option("--outcome", type=click.Choice(["allowed", "denied"]), help="Only mutations or only denials.")
@click.option("--before", metavar="CURSOR", help="The next page: the cursor printed after the previous page.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True, help="At most this many.")
@json_option
def audit_list(action: str | None, actor: str | None, from_: str | None, to: str | None, outcome: str | None,
               before: str | None, limit: int, as_json: bool) -> None:
    """List audit entries, newest first."""
    found, next_cursor = _client().get_page(
        "/audit", "X-Next-Cursor", action=action, actor=actor, to=to, outcome=outcome, before=before, limit=limit,
        **{"from": from_},
    )
    if as_json:
        print_json(found)
    else:
        rows = [{**e, "outcome": e["outcome"] + (f" x{e['count']}" if e.get("count", 1) > 1 else "")}
                for e in found]
        print_table(
            rows,
            [("created_at", "when"), ("action", "action"), ("outcome", "outcome"), ("status", "status"),
             ("actor", "actor"), ("target", "target"), ("reason", "reason"), ("permission", "permission"),
             ("method", "method"), ("path", "path"), ("client", "client")],
            empty="No audit entries.",
        )
    if next_cursor:
        click.echo(f"More entries: kici-admin audit list --before {next_cursor} (with the same filters)", err=True)


@cli.group()
def agents() -> None:
    """Agents: list, show."""


def _agent_rows(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table rows: jobs as `running/capacity`; a connected agent that drains shows `draining`."""
    return [{
        **a, "busy": f"{a.get('running_jobs', 0)}/{a.get('max_concurrency', '?')}",
        "connected": "draining" if a.get("connected") and a.get("draining") else a.get("connected"),
    } for a in found]


@agents.command("list")
@click.option("--connected", is_flag=True, help="Only agents connected now.")
@json_option
def agents_list(connected: bool, as_json: bool) -> None:
    """List agents: labels, connection, and jobs running out of their capacity."""
    found = _client().get("/agents", connected=str(connected).lower())
    if as_json:
        print_json(found)
        return
    print_table(
        _agent_rows(found),
        [("id", "id"), ("hostname", "hostname"), ("labels", "labels"), ("connected", "connected"),
         ("busy", "jobs"), ("version", "version"), ("last_seen_at", "last seen")],
        empty="No connected agents." if connected else "No agents.",
    )


@agents.command("show")
@click.argument("agent_id", metavar="ID")
@json_option
def agents_show(agent_id: str, as_json: bool) -> None:
    """Show one agent."""
    agent = _client().get(f"/agents/{_path_part(agent_id)}")
    if as_json:
        print_json(agent)
        return
    print_fields(
        _agent_rows([agent])[0],
        [("id", "Agent"), ("hostname", "Hostname"), ("version", "Version"), ("labels", "Labels"),
         ("connected", "Connected"), ("busy", "Jobs"), ("last_seen_at", "Last seen"),
         ("registered_at", "Registered")],
    )


@cli.group()
def cluster() -> None:
    """The orchestrator nodes sharing the database: status."""


@cluster.command("status")
@json_option
def cluster_status(as_json: bool) -> None:
    """Nodes (address, version, lease, agents), the leader and its fencing term."""
    found = _client().get("/cluster")
    if as_json:
        print_json(found)
        return
    lease = found.get("lease") or {}
    leader = found.get("leader") or "none (the lease has run out; a node takes it within a heartbeat)"
    print_fields(
        {**found, "leader": leader, "lease_expires_at": lease.get("expires_at")},
        [("node", "Answered by"), ("leader", "Leader"), ("term", "Term"), ("lease_expires_at", "Lease until")],
    )
    click.echo("")
    rows = [{**n, "role": "leader" if n.get("leader") else "", "state": "alive" if n.get("alive") else "expired"}
            for n in found.get("nodes") or []]
    print_table(
        rows,
        [("id", "node"), ("role", "role"), ("state", "state"), ("address", "address"), ("version", "version"),
         ("agents", "agents"), ("started_at", "started"), ("lease_expires_at", "lease until")],
        empty="No nodes.",
    )
    orphans = found.get("agents_without_node") or 0
    if orphans:
        click.echo(f"\n{orphans} connected agent(s) belong to no live node; the next heartbeat takes them over.")


EVENT_STATUSES = ("received", "processed", "duplicate", "lockfile_missing", "lockfile_corrupt", "filtered", "failed")


@cli.group()
def events() -> None:
    """The webhook event log: list, show.

    Every webhook delivery received, and what became of it."""


@events.command("list")
@click.option("--status", type=click.Choice(EVENT_STATUSES), help="Only deliveries with this outcome.")
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True, help="At most this many.")
@json_option
def events_list(status: str | None, limit: int, as_json: bool) -> None:
    """List deliveries, newest first."""
    found = _client().get("/events", status=status, limit=limit)
    if as_json:
        print_json(found)
        return
    rows = [{**e, "sha": _short_sha(e.get("sha"))} for e in found]
    print_table(
        rows,
        [("delivery_id", "delivery"), ("provider", "provider"), ("event", "event"), ("repo", "repo"),
         ("ref", "ref"), ("sha", "sha"), ("status", "status"), ("matched_count", "matched"),
         ("created_at", "received")],
        empty="No events.",
    )


@events.command("show")
@click.argument("delivery_id", metavar="DELIVERY_ID")
@json_option
def events_show(delivery_id: str, as_json: bool) -> None:
    """Show one delivery and the runs it started."""
    event = _client().get(f"/events/{_path_part(delivery_id)}")
    if as_json:
        print_json(event)
        return
    print_fields(
        event,
        [("delivery_id", "Delivery"), ("provider", "Provider"), ("event", "Event"), ("action", "Action"),
         ("repo", "Repository"), ("ref", "Ref"), ("sha", "Commit"), ("status", "Status"), ("reason", "Reason"),
         ("matched_count", "Matched"), ("source_id", "Source"), ("created_at", "Received"),
         ("processed_at", "Processed"), ("run_ids", "Runs")],
    )


# -- sources ----------------------------------------------------------------------------------------

SOURCE_COLUMNS = [("name", "name"), ("kind", "kind"), ("enabled", "enabled"), ("id", "id"),
                  ("webhook_path", "webhook"), ("created_at", "created")]
GENERIC_AUTH = ("hmac_sha256", "bearer_token", "ip_allowlist", "none")
GENERIC_SECRET_FIELD = {"hmac_sha256": "hmac_secret", "bearer_token": "bearer_token"}


def _csv(_: click.Context, __: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _read_file(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise AdminCLIError(f"cannot read the {what} {path}: {reason}", exit_code=2) from None


def _new_secret() -> str:
    return secrets.token_urlsafe(32)


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _show_source(source: dict[str, Any]) -> None:
    print_fields(source, [("name", "Source"), ("id", "Id"), ("kind", "Kind"), ("enabled", "Enabled"),
                          ("webhook_path", "Webhook"), ("secret_fields", "Secrets"), ("created_at", "Created"),
                          ("updated_at", "Updated")])
    config = source.get("config") or {}
    if config:
        click.echo("Config:")
        for key in sorted(config):
            value = config[key]
            click.echo(f"  {key}: {value if isinstance(value, str) else json.dumps(value)}")


def _create_source(kind: str, name: str, config: dict[str, Any], secret_values: dict[str, str],
                   generated: dict[str, str], as_json: bool) -> None:
    created = _client().post("/sources", {"kind": kind, "name": name, "config": _drop_none(config),
                                          "secrets": secret_values})
    if as_json:
        print_json({**created, **({"generated_secrets": generated} if generated else {})})
        return
    click.echo(f"Created {kind} source {created['name']!r} (id {created['id']}); webhook: {created['webhook_path']}")
    for field_name, value in generated.items():
        click.echo(f"Generated {field_name} (shown once; store it now):")
        click.echo("")
        click.echo(f"    {value}")
        click.echo("")
    if kind == "git":
        click.echo(install_advice(created["name"], str(config.get("url", ""))))


def notify_options(command: Any) -> Any:
    """`--notify-url`, `--notify-job-events`, `--notify-secret` for `source add …`."""
    command = click.option("--notify-secret", help="Key that signs this source's notifications (default: the "
                           "orchestrator's KICI_NOTIFY_SECRET).")(command)
    command = click.option("--notify-job-events", is_flag=True, default=None,
                           help="Also notify job.finished, not only run.finished.")(command)
    return click.option("--notify-url", "notify_urls", multiple=True, metavar="URL",
                        help="POST a signed event to URL when a run of this source finishes (repeatable).")(command)


def _notify_config(notify_urls: tuple[str, ...], notify_job_events: bool | None) -> dict[str, Any]:
    return {"notify_urls": list(notify_urls) or None, "notify_job_events": notify_job_events}


@cli.group()
def source() -> None:
    """Sources: where events come from (git, github, generic)."""


@source.group("add")
def source_add() -> None:
    """Add a source: git, github or generic."""


@source_add.command("git")
@click.argument("name")
@click.option("--url", "repo_url", required=True, metavar="URL_OR_PATH", help="Any git URL, or a local path.")
@click.option("--secret", help="The webhook secret the git hook signs with (default: generated, printed once).")
@click.option("--poll", type=click.IntRange(min=1), metavar="SECONDS",
              help="Also poll the branches every SECONDS (stored as config.poll_seconds).")
@click.option("--repo", help="The repository name events carry (default: derived from the URL).")
@click.option("--default-branch", help="New branches are compared with it; its lock file registers schedules "
              "(default: a bare or remote repository's HEAD; in a working repository main, else master).")
@click.option("--mirror", is_flag=True, default=None, help="Read through a bare mirror even for a local path.")
@notify_options
@json_option
def source_add_git(name: str, repo_url: str, secret: str | None, poll: int | None, repo: str | None,
                   default_branch: str | None, mirror: bool | None, notify_urls: tuple[str, ...],
                   notify_job_events: bool | None, notify_secret: str | None, as_json: bool) -> None:
    """Add a git source notified by a git hook (see `source hook`)."""
    generated = {} if secret else {"webhook_secret": _new_secret()}
    config = {"url": repo_url, "poll_seconds": poll, "repo": repo, "default_branch": default_branch, "mirror": mirror,
              **_notify_config(notify_urls, notify_job_events)}
    secret_values = {"webhook_secret": secret or generated["webhook_secret"]}
    if notify_secret:
        secret_values["notify_secret"] = notify_secret
    _create_source("git", name, config, secret_values, generated, as_json)


@source_add.command("github")
@click.argument("name")
@click.option("--app-id", required=True, type=click.IntRange(min=1), help="The GitHub App's id.")
@click.option("--private-key-file", required=True, metavar="PEM", help="The GitHub App's private key (PEM file).")
@click.option("--webhook-secret", required=True, help="The GitHub App's webhook secret.")
@click.option("--api-url", help="GitHub API URL (default https://api.github.com; GitHub Enterprise: …/api/v3).")
@click.option("--installation-id", type=click.IntRange(min=1), help="Default: taken from each delivery.")
@notify_options
@json_option
def source_add_github(name: str, app_id: int, private_key_file: str, webhook_secret: str, api_url: str | None,
                      installation_id: int | None, notify_urls: tuple[str, ...], notify_job_events: bool | None,
                      notify_secret: str | None, as_json: bool) -> None:
    """Add a GitHub App source (its runs are reported as check runs)."""
    key = _read_file(private_key_file, "private key file")
    config = {"app_id": app_id, "api_url": api_url, "installation_id": installation_id,
              **_notify_config(notify_urls, notify_job_events)}
    secret_values = {"private_key": key, "webhook_secret": webhook_secret}
    if notify_secret:
        secret_values["notify_secret"] = notify_secret
    _create_source("github", name, config, secret_values, {}, as_json)


@source_add.command("generic")
@click.argument("name")
@click.option("--auth", type=click.Choice(GENERIC_AUTH), default="hmac_sha256", show_default=True)
@click.option("--secret", help="HMAC secret (hmac_sha256) or bearer token (bearer_token); default: generated.")
@click.option("--allow-ip", "allow_ips", multiple=True, metavar="CIDR", help="Allowed client address (repeatable).")
@click.option("--events", callback=_csv, metavar="A,B", help="Only these event names are accepted.")
@click.option("--event-header", help="Header carrying the event name.")
@click.option("--event-path", help="Dotted path of the event name in the JSON body.")
@click.option("--signature-header", help="Header carrying the HMAC signature.")
@click.option("--idempotency-header", help="Header carrying the delivery id used for dedup.")
@click.option("--dedup-window", type=click.IntRange(min=1), metavar="SECONDS")
@click.option("--rate-limit", type=click.IntRange(min=1), metavar="PER_MINUTE")
@click.option("--max-payload-bytes", type=click.IntRange(min=1))
@click.option("--lock-source", help="The git or github source whose lock file the events run.")
@click.option("--repo", help="For a github lock source: owner/name.")
@click.option("--ref", help="The branch whose head is read (default: main).")
@notify_options
@json_option
def source_add_generic(name: str, auth: str, secret: str | None, allow_ips: tuple[str, ...],
                       events: list[str] | None, event_header: str | None, event_path: str | None,
                       signature_header: str | None, idempotency_header: str | None, dedup_window: int | None,
                       rate_limit: int | None, max_payload_bytes: int | None, lock_source: str | None,
                       repo: str | None, ref: str | None, notify_urls: tuple[str, ...],
                       notify_job_events: bool | None, notify_secret: str | None, as_json: bool) -> None:
    """Add a generic webhook source."""
    field_name = GENERIC_SECRET_FIELD.get(auth)
    if secret and field_name is None:
        raise click.UsageError(f"--secret does not apply to --auth {auth}")
    generated = {field_name: _new_secret()} if field_name and not secret else {}
    secret_values = {field_name: secret or generated[field_name]} if field_name else {}
    config = {
        "auth": auth, "allowed_ips": list(allow_ips) or None, "allowed_events": events,
        "event_header": event_header, "event_path": event_path, "signature_header": signature_header,
        "idempotency_header": idempotency_header, "dedup_window_seconds": dedup_window,
        "rate_limit_rpm": rate_limit, "max_payload_bytes": max_payload_bytes, "lock_source": lock_source,
        "repo": repo, "ref": ref, **_notify_config(notify_urls, notify_job_events),
    }
    if notify_secret:
        secret_values["notify_secret"] = notify_secret
    _create_source("generic", name, config, secret_values, generated, as_json)


@source.command("list")
@click.option("--kind", type=click.Choice(("git", "github", "generic")), help="Only sources of this kind.")
@json_option
def source_list(kind: str | None, as_json: bool) -> None:
    """List sources (never their secrets)."""
    found = _client().get("/sources", kind=kind)
    if as_json:
        print_json(found)
    else:
        print_table(found, SOURCE_COLUMNS, empty="No sources.")


@source.command("show")
@click.argument("name", metavar="NAME_OR_ID")
@json_option
def source_show(name: str, as_json: bool) -> None:
    """Show a source: config and which secrets are set."""
    found = _client().get(f"/sources/{_path_part(name)}")
    if as_json:
        print_json(found)
    else:
        _show_source(found)


def _key_value(_: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[tuple[str, str]]:
    out = []
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {value!r}", param=param)
        out.append((key.strip(), rest))
    return out


@source.command("update")
@click.argument("name", metavar="NAME_OR_ID")
@click.option("--url", "repo_url", metavar="URL_OR_PATH", help="git: the repository's URL or path.")
@click.option("--poll", type=click.IntRange(min=0), metavar="SECONDS", help="git: poll every SECONDS (0: stop).")
@click.option("--set", "sets", multiple=True, callback=_key_value, metavar="KEY=VALUE",
              help="Set a config key (VALUE is parsed as JSON when it can be, e.g. 60, true, [\"a\"]).")
@click.option("--unset", "unsets", multiple=True, metavar="KEY", help="Remove a config key.")
@click.option("--secret", "secret_sets", multiple=True, callback=_key_value, metavar="FIELD=VALUE",
              help="Set a secret (git: webhook_secret; github: webhook_secret, private_key; generic: "
                   "hmac_secret, bearer_token).")
@click.option("--secret-file", "secret_files", multiple=True, callback=_key_value, metavar="FIELD=PATH",
              help="Set a secret from a file (e.g. private_key=app.pem).")
@click.option("--remove-secret", "secret_removes", multiple=True, metavar="FIELD", help="Remove a secret.")
@click.option("--notify-url", "notify_urls", multiple=True, metavar="URL",
              help="Replace the source's notification URLs (repeatable; `--unset notify_urls` removes them).")
@click.option("--notify-job-events/--no-notify-job-events", default=None, help="Also notify job.finished.")
@click.option("--notify-secret", help="Set the key that signs this source's notifications.")
@json_option
def source_update(name: str, repo_url: str | None, poll: int | None, sets: list[tuple[str, str]],
                  unsets: tuple[str, ...], secret_sets: list[tuple[str, str]], secret_files: list[tuple[str, str]],
                  secret_removes: tuple[str, ...], notify_urls: tuple[str, ...], notify_job_events: bool | None,
                  notify_secret: str | None, as_json: bool) -> None:
    """Change a source's config and/or secrets (only what is given changes)."""
    config: dict[str, Any] = {}
    if notify_urls:
        config["notify_urls"] = list(notify_urls)
    if notify_job_events is not None:
        config["notify_job_events"] = notify_job_events
    for key, raw in sets:
        try:
            config[key] = json.loads(raw)
        except ValueError:
            config[key] = raw
    if repo_url is not None:
        config["url"] = repo_url
    if poll is not None:
        config["poll_seconds"] = poll or None
    config.update(dict.fromkeys(unsets))
    secret_values: dict[str, str | None] = dict.fromkeys(secret_removes)
    secret_values.update(dict(secret_sets))
    secret_values.update({k: _read_file(p, f"{k} file") for k, p in secret_files})
    if notify_secret:
        secret_values["notify_secret"] = notify_secret
    if not config and not secret_values:
        raise click.UsageError("nothing to change: give --url, --poll, --set, --unset, --secret, --secret-file, "
                               "--remove-secret or a --notify option")
    body: dict[str, Any] = {}
    if config:
        body["config"] = config
    if secret_values:
        body["secrets"] = secret_values
    updated = _client().patch(f"/sources/{_path_part(name)}", body)
    if as_json:
        print_json(updated)
    else:
        click.echo(f"Updated source {updated['name']!r} (id {updated['id']}).")


@source.command("remove")
@click.argument("name", metavar="NAME_OR_ID")
@json_option
def source_remove(name: str, as_json: bool) -> None:
    """Delete a source (its webhooks then answer 404)."""
    removed = _client().delete(f"/sources/{_path_part(name)}")
    if as_json:
        print_json(removed)
    else:
        click.echo(f"Removed {removed['kind']} source {removed['name']!r} (id {removed['id']}).")


def _toggle(name: str, action: str, as_json: bool) -> None:
    changed = _client().post(f"/sources/{_path_part(name)}/{action}")
    if as_json:
        print_json(changed)
    else:
        click.echo(f"Source {changed['name']!r} {action}d.")


@source.command("enable")
@click.argument("name", metavar="NAME_OR_ID")
@json_option
def source_enable(name: str, as_json: bool) -> None:
    """Enable a source."""
    _toggle(name, "enable", as_json)


@source.command("disable")
@click.argument("name", metavar="NAME_OR_ID")
@json_option
def source_disable(name: str, as_json: bool) -> None:
    """Disable a source: its webhooks answer 404 until it is enabled again."""
    _toggle(name, "disable", as_json)


@source.command("hook")
@click.argument("name", metavar="NAME_OR_ID")
@click.option("--url", "hook_url", metavar="ORCHESTRATOR_URL",
              help="The orchestrator's URL as the git host reaches it (default: kici-admin's --url).")
def source_hook(name: str, hook_url: str | None) -> None:
    """Print a git hook script for a git source: post-commit in a working repository, post-receive in a
    bare one. After each commit or push it prints the runs that started (with their URLs when the
    orchestrator has KICI_PUBLIC_URL).

    It embeds the source's webhook secret: install it readable by its owner only, e.g.
    `kici-admin source hook NAME > .git/hooks/post-commit && chmod 700 .git/hooks/post-commit`.
    """
    client = _client()
    url = check_base_url(hook_url) if hook_url else client.base_url
    click.echo(client.get_text(f"/sources/{_path_part(name)}/hook", url=url), nl=False)


# -- trust policies and held runs -------------------------------------------------------------------

TRUST_ACTIONS = ("hold", "allow", "reject")


def _print_trust(view: dict[str, Any]) -> None:
    if not view.get("applies"):
        click.echo(f"Source {view['source']!r} ({view['kind']}) has no trust policy: its events come from the "
                   "operator's own systems and are trusted.")
        return
    policy = view["policy"]
    click.echo(f"Trust policy of source {view['source']!r}:")
    print_fields(
        {**policy, "hold_expiry": view["hold_expiry"] + ("" if policy.get("hold_expiry") else " (default)"),
         "trusted_associations": ", ".join(policy["trusted_associations"]) or "–",
         "trusted_users": ", ".join(policy["trusted_users"]) or "–",
         "trusted_teams": ", ".join(policy["trusted_teams"]) or "–",
         "secrets_for_approved": "yes" if policy["secrets_for_approved"] else "no"},
        [("fork_pull_requests", "Fork pull requests"), ("untrusted_authors", "Untrusted authors"),
         ("trusted_associations", "Trusted associations"), ("trusted_users", "Trusted users"),
         ("trusted_teams", "Trusted teams"), ("secrets_for_approved", "Secrets for approved runs"),
         ("hold_expiry", "Hold expiry")],
    )


@source.command("trust")
@click.argument("name", metavar="NAME_OR_ID")
@click.option("--fork-pull-requests", type=click.Choice(TRUST_ACTIONS),
              help="What pull requests from forks do: held for approval, allowed (no secrets), or rejected.")
@click.option("--untrusted-authors", type=click.Choice(TRUST_ACTIONS),
              help="What events whose author is not trusted do.")
@click.option("--trusted-association", "associations", multiple=True, metavar="ASSOCIATION",
              help="Replace the trusted GitHub author associations (repeatable; default OWNER, MEMBER, "
                   "COLLABORATOR).")
@click.option("--trusted-user", "users", multiple=True, metavar="LOGIN",
              help="Add a GitHub login that is trusted whatever its association (repeatable).")
@click.option("--remove-trusted-user", "removed_users", multiple=True, metavar="LOGIN", help="Remove a trusted login.")
@click.option("--trusted-team", "teams", multiple=True, metavar="ORG/TEAM",
              help="Add a GitHub team whose members are trusted (repeatable; the App needs members: read).")
@click.option("--remove-trusted-team", "removed_teams", multiple=True, metavar="ORG/TEAM",
              help="Remove a trusted team.")
@click.option("--secrets-for-approved/--no-secrets-for-approved", default=None,
              help="Whether approved runs of untrusted code receive the secrets their jobs declare.")
@click.option("--hold-expiry", metavar="DURATION",
              help="How long a held run waits for a decision (e.g. 72h, 3d, 30m; `default`: KICI_HOLD_EXPIRY_HOURS).")
@json_option
def source_trust(name: str, fork_pull_requests: str | None, untrusted_authors: str | None,
                 associations: tuple[str, ...], users: tuple[str, ...], removed_users: tuple[str, ...],
                 teams: tuple[str, ...], removed_teams: tuple[str, ...], secrets_for_approved: bool | None,
                 hold_expiry: str | None, as_json: bool) -> None:
    """Show a GitHub source's trust policy, or change it (only what is given changes)."""
    client = _client()
    path = f"/sources/{_path_part(name)}/trust"
    view = client.get(path)
    changes: dict[str, Any] = {}
    if fork_pull_requests is not None:
        changes["fork_pull_requests"] = fork_pull_requests
    if untrusted_authors is not None:
        changes["untrusted_authors"] = untrusted_authors
    if associations:
        changes["trusted_associations"] = list(associations)
    if secrets_for_approved is not None:
        changes["secrets_for_approved"] = secrets_for_approved
    if hold_expiry is not None:
        changes["hold_expiry"] = None if hold_expiry == "default" else hold_expiry
    if changes or users or removed_users or teams or removed_teams:
        if not view.get("applies"):
            raise AdminCLIError(f"source {name!r} is a {view['kind']} source: only github sources have a trust "
                                "policy (git and generic events are trusted)")
        policy = dict(view["policy"])
        drop_users = {u.lower() for u in removed_users}
        policy["trusted_users"] = [u for u in policy["trusted_users"] if u.lower() not in drop_users]
        policy["trusted_users"] += [u for u in users if u not in policy["trusted_users"]]
        policy["trusted_teams"] = [t for t in policy["trusted_teams"] if t not in removed_teams]
        policy["trusted_teams"] += [t for t in teams if t not in policy["trusted_teams"]]
        view = client.put(path, {**policy, **changes})
        if not as_json:
            click.echo(f"Updated the trust policy of source {view['source']!r}.")
    if as_json:
        print_json(view)
    else:
        _print_trust(view)


@cli.group()
def held() -> None:
    """Held runs (untrusted code waiting for approval) and jobs waiting for an approval: list, approve, reject."""


@held.command("list")
@json_option
def held_list(as_json: bool) -> None:
    """List what waits for a decision, oldest first."""
    found = _client().get("/held")
    if as_json:
        print_json(found)
        return
    rows = [{**g, "sha": _short_sha(g.get("sha")), "job": g.get("job_id") or "(run)"} for g in found]
    print_table(
        rows,
        [("run_id", "run"), ("kind", "kind"), ("job", "job"), ("repo", "repo"), ("workflow", "workflow"),
         ("sha", "sha"), ("expires_at", "expires"), ("reason", "reason")],
        empty="Nothing is held.",
    )


def _decided(result: dict[str, Any], verb: str, as_json: bool) -> None:
    if as_json:
        print_json(result)
        return
    released = result.get("released_job_ids") or []
    suffix = f" ({len(released)} job(s) queued)" if verb == "approved" else ""
    click.echo(f"Run {result['run_id']} {verb}{suffix}.")


@held.command("approve")
@click.argument("run_id", metavar="RUN_ID")
@json_option
def held_approve(run_id: str, as_json: bool) -> None:
    """Approve a held run: it runs at exactly the commit it was created for."""
    _decided(_client().post(f"/held/{_path_part(run_id)}/approve"), "approved", as_json)


@held.command("reject")
@click.argument("run_id", metavar="RUN_ID")
@click.option("--reason", help="Why (recorded on the run and in the audit log).")
@json_option
def held_reject(run_id: str, reason: str | None, as_json: bool) -> None:
    """Reject a held run: it is cancelled with the reason."""
    _decided(_client().post(f"/held/{_path_part(run_id)}/reject", {"reason": reason}), "rejected", as_json)


# -- entry point ------------------------------------------------------------------------------------


def _error(prefix: str, message: str) -> None:
    click.echo(f"{prefix}: error: {' '.join(message.split())}", err=True)



@cli.group()
def schedules() -> None:
    """Schedules: the schedule() triggers registered from each source's default branch."""


@schedules.command("list")
@click.option("--source", metavar="NAME", help="Only this source's schedules.")
@json_option
def schedules_list(source: str | None, as_json: bool) -> None:
    """List registered schedules with their next and last fire times."""
    found = _client().get("/schedules", source=source)
    if as_json:
        print_json(found)
        return
    print_table(
        found,
        [("workflow", "workflow"), ("cron", "cron"), ("timezone", "timezone"), ("next_fire_at", "next fire"),
         ("last_fired_at", "last fire"), ("source", "source"), ("repo", "repo"), ("branch", "branch")],
        empty="No schedules (none of the sources' default branches has a schedule() trigger).",
    )


# -- secrets and key rotation -----------------------------------------------------------------------

SECRET_COLUMNS = [("name", "name"), ("scope", "scope"), ("fingerprint", "fingerprint"), ("updated_at", "updated"),
                  ("created_at", "created"), ("updated_by", "updated by")]
SCOPE_HELP = "org, repo:<owner/name> or env:<environment>."


@cli.group()
def secret() -> None:
    """Scoped secrets: set, list, delete. Values go in, never come out."""


def _without_final_newline(text: str) -> str:
    # `echo value |` and most editors end the input with a newline that is not part of the value.
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def _secret_value(from_file: str | None) -> str:
    """The value from --from-file, else stdin when it is not a terminal, else a hidden prompt (typed twice)."""
    if from_file is not None:
        value = _without_final_newline(_read_file(from_file, "secret file"))
    elif not sys.stdin.isatty():
        try:
            value = _without_final_newline(sys.stdin.read())
        except UnicodeDecodeError:
            raise AdminCLIError("the value on stdin is not UTF-8 text", exit_code=2) from None
    else:
        value = click.prompt("Value", hide_input=True, confirmation_prompt=True, err=True)
    if not value:
        raise AdminCLIError("the secret value is empty", exit_code=2)
    return value


@secret.command("set", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("stray", nargs=-1, type=click.UNPROCESSED, metavar="")
@click.option("--scope", required=True, help="The secret's scope: " + SCOPE_HELP)
@click.option("--from-file", metavar="PATH", help="Read the value from this file (one final newline is dropped).")
@json_option
def secret_set(name: str, stray: tuple[str, ...], scope: str, from_file: str | None, as_json: bool) -> None:
    """Create or replace secret NAME. The value is read from --from-file, from stdin, or from a hidden
    prompt — never from the command line, where `ps` and shell history would show it."""
    if stray:
        # Never echo them: one of them may well be the value.
        raise AdminCLIError(
            f"unexpected argument(s) after NAME ({len(stray)} not shown): the value is never taken from the "
            "command line; pipe it on stdin, use --from-file PATH, or type it at the prompt",
            exit_code=2,
        )
    value = _secret_value(from_file)
    stored = _client().put(f"/secrets/{_path_part(name)}", {"scope": scope, "value": value})
    if as_json:
        print_json(stored)
        return
    verb = "Created" if stored.get("created") else "Updated"
    click.echo(f"{verb} secret {stored['name']} in scope {stored['scope']} (fingerprint {stored['fingerprint']}).")


@secret.command("list")
@click.option("--scope", help="Only this scope: " + SCOPE_HELP)
@json_option
def secret_list(scope: str | None, as_json: bool) -> None:
    """List secrets: names, scopes, fingerprints and dates (never values)."""
    found = _client().get("/secrets", scope=scope)
    if as_json:
        print_json(found)
        return
    print_table(found, SECRET_COLUMNS, empty="No secrets" + (f" in scope {scope}." if scope else "."))


@secret.command("delete")
@click.argument("name")
@click.option("--scope", required=True, help="The secret's scope: " + SCOPE_HELP)
@json_option
def secret_delete(name: str, scope: str, as_json: bool) -> None:
    """Delete secret NAME from SCOPE."""
    deleted = _client().delete(f"/secrets/{_path_part(name)}", scope=scope)
    if as_json:
        print_json(deleted)
        return
    click.echo(f"Deleted secret {deleted['name']} from scope {deleted['scope']}.")


@cli.command("rotate-key")
@json_option
def rotate_key(as_json: bool) -> int:
    """Re-encrypt every secret and source secret under the orchestrator's current key (KICI_SECRET_KEY),
    opening what is not yet re-encrypted with KICI_SECRET_KEY_OLD. Safe to interrupt and to run again.
    Exits 1 when some value could not be opened."""
    result = _client().post("/rotate-key")
    if as_json:
        print_json(result)
    else:
        click.echo(f"Key {result['key_id']} (old key: {result['old_key_id'] or 'none configured'}): "
                   f"{result['secrets_resealed']} secrets and {result['source_secrets_resealed']} source secrets "
                   "re-encrypted.")
        for failed in result["failed"]:
            click.echo(f"  cannot open {failed} with the current or the old key", err=True)
        if result["remaining"]:
            click.echo(f"{result['remaining']} values are still sealed under another key: keep "
                       "KICI_SECRET_KEY_OLD until they are re-encrypted or deleted.", err=True)
        else:
            click.echo("Nothing remains under another key: KICI_SECRET_KEY_OLD can be removed.")
    return 1 if result["failed"] or result["remaining"] else 0


# -- deployment environments ------------------------------------------------------------------------


def _wait_timer(_: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """`90`, `90s`, `5m`, `1h30m`, `2d` → seconds (`0`: no wait)."""
    from kici.engine.durations import DurationError, parse_duration

    if value is None:
        return None
    try:
        return int(parse_duration(value, bare_unit="s", allow_zero=True).total_seconds())
    except DurationError:
        raise click.BadParameter(f"expected a duration like 90s, 5m, 1h30m or 2d, got {value!r}", param=param) from None


_CLEARABLE = {"branches": "branches", "tags": "tags", "reviewer-roles": "reviewer_roles",
              "reviewers": "reviewer_users", "vars": "variables"}


def _environment_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The policy options shared by `environment create` and `environment set-policy`."""
    options = [
        click.option("--branch", "branches", multiple=True, metavar="GLOB",
                     help="A branch allowed to deploy (glob, repeatable). No --branch and no --tag: every ref."),
        click.option("--tag", "tags", multiple=True, metavar="GLOB",
                     help="A tag allowed to deploy (glob, repeatable)."),
        click.option("--reviewers", "required_approvals", type=click.IntRange(0, 10), metavar="N",
                     help="Approvals a deployment needs (0: none)."),
        click.option("--reviewer-role", "reviewer_roles", multiple=True, metavar="ROLE",
                     help="Who may approve, by role (repeatable): admin-token roles owner/admin/auditor/viewer, "
                          "GitHub associations OWNER/MEMBER/COLLABORATOR/… Default: owner, admin, OWNER, MEMBER."),
        click.option("--reviewer", "reviewer_users", multiple=True, metavar="token:ID|github:LOGIN",
                     help="A named reviewer (repeatable)."),
        click.option("--prevent-self-review/--allow-self-review", "prevent_self_review", default=None,
                     help="Whether the run's own author may approve it."),
        click.option("--wait-timer", "wait_timer_s", callback=_wait_timer, metavar="DURATION",
                     help="Wait this long after approval before deploying (90s, 5m, 1h, …; 0: no wait)."),
        click.option("--var", "variables", multiple=True, callback=_key_value, metavar="KEY=VALUE",
                     help="A plain (not secret) variable for the environment's jobs (repeatable; replaces all)."),
        json_option,
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _policy_body(given: dict[str, Any]) -> dict[str, Any]:
    """The REST body for the options given on the command line (a repeatable option given replaces the list)."""
    ctx = click.get_current_context()
    body: dict[str, Any] = {}
    for key, value in given.items():
        if ctx.get_parameter_source(key) != ParameterSource.COMMANDLINE:
            continue
        if key == "variables":
            body[key] = dict(value)
        elif isinstance(value, tuple):
            body[key] = list(value)
        else:
            body[key] = value
    return body


def _print_environment(env: dict[str, Any]) -> None:
    shown = {
        **env,
        "branches": ", ".join(env["branches"]) or "-",
        "tags": ", ".join(env["tags"]) or "-",
        "reviewers": ", ".join(env["reviewers"]),
        "wait_timer_s": f"{env['wait_timer_s']}s",
        "variables": ", ".join(f"{k}={v}" for k, v in sorted(env["variables"].items())) or "-",
        "secrets": ", ".join(env["secrets"]) or "-",
    }
    if not env["branches"] and not env["tags"]:
        shown["branches"] = "any (no branch or tag rule)"
    print_fields(shown, [("name", "Environment"), ("branches", "Branches"), ("tags", "Tags"),
                         ("required_approvals", "Approvals"), ("reviewers", "Reviewers"),
                         ("prevent_self_review", "No self-review"), ("wait_timer_s", "Wait timer"),
                         ("variables", "Variables"), ("secrets", "Secrets"), ("pending", "Waiting jobs"),
                         ("updated_at", "Updated")])


ENVIRONMENT_COLUMNS = [("name", "name"), ("rules", "refs"), ("required_approvals", "approvals"),
                       ("wait", "wait timer"), ("secret_count", "secrets"), ("pending", "waiting")]


@cli.group()
def environment() -> None:
    """Deployment environments: allowed refs, reviewers, wait timer, variables (secrets: `secret set --scope
    env:NAME`)."""


@environment.command("create")
@click.argument("name")
@_environment_options
def environment_create(name: str, as_json: bool, **policy: Any) -> None:
    """Create environment NAME."""
    created = _client().post("/environments", {"name": name, **_policy_body(policy)})
    if as_json:
        print_json(created)
        return
    click.echo(f"Created environment {created['name']}.")
    _print_environment(created)


@environment.command("set-policy")
@click.argument("name")
@click.option("--clear", "clears", multiple=True, type=click.Choice(sorted(_CLEARABLE)),
              help="Empty this list (repeatable).")
@_environment_options
def environment_set_policy(name: str, clears: tuple[str, ...], as_json: bool, **policy: Any) -> None:
    """Change environment NAME: each option given replaces that part of its policy; the rest is kept."""
    body = _policy_body(policy)
    for clear in clears:
        key = _CLEARABLE[clear]
        if key in body:
            raise click.UsageError(f"--clear {clear} contradicts the {clear} given")
        body[key] = {} if key == "variables" else []
    if not body:
        raise click.UsageError("nothing to change: give at least one option")
    changed = _client().put(f"/environments/{_path_part(name)}", body)
    if as_json:
        print_json(changed)
        return
    click.echo(f"Updated environment {changed['name']}.")
    _print_environment(changed)


@environment.command("list")
@json_option
def environment_list(as_json: bool) -> None:
    """List environments."""
    found = _client().get("/environments")
    if as_json:
        print_json(found)
        return
    rows = [{**e, "rules": ", ".join([*e["branches"], *(f"tag:{t}" for t in e["tags"])]) or "any",
             "wait": f"{e['wait_timer_s']}s", "secret_count": len(e["secrets"])} for e in found]
    print_table(rows, ENVIRONMENT_COLUMNS, empty="No environments.")


@environment.command("show")
@click.argument("name")
@json_option
def environment_show(name: str, as_json: bool) -> None:
    """Show environment NAME: its policy, variables and the names of its secrets."""
    found = _client().get(f"/environments/{_path_part(name)}")
    if as_json:
        print_json(found)
        return
    _print_environment(found)


@environment.command("delete")
@click.argument("name")
@json_option
def environment_delete(name: str, as_json: bool) -> None:
    """Delete environment NAME (refused while jobs wait at its gate). Its `env:NAME` secrets are kept."""
    deleted = _client().delete(f"/environments/{_path_part(name)}")
    if as_json:
        print_json(deleted)
        return
    click.echo(f"Deleted environment {deleted['name']}.")
@cli.command("prune")
@click.option("--dry-run", is_flag=True, help="Only show what would be deleted; delete nothing.")
@json_option
def prune(dry_run: bool, as_json: bool) -> None:
    """Delete finished runs (with their jobs and logs), event log entries and audit entries older than the
    orchestrator's retention settings (KICI_RETENTION_*_DAYS), now. The background sweep does the same
    every KICI_RETENTION_INTERVAL_SECONDS."""
    result = _client().post("/prune", {"dry_run": dry_run})
    if as_json:
        print_json(result)
        return
    counts, cutoffs = result["counts"], result["cutoffs"]
    click.echo("Would delete (dry run, nothing deleted):" if dry_run else "Deleted:")
    rows = [
        {"kind": "runs", "count": f"{counts['runs']} ({counts['jobs']} jobs)", "older": cutoffs["runs"]},
        {"kind": "events", "count": counts["events"], "older": cutoffs["events"]},
        {"kind": "audit", "count": counts["audit"], "older": cutoffs["audit"]},
    ]
    print_table([{**r, "older": r["older"] or "kept forever"} for r in rows],
                [("kind", "kind"), ("count", "count"), ("older", "older than")], empty="")
    if not result["complete"]:
        click.echo("Stopped early: another orchestrator is pruning now.", err=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Run `kici-admin`; exits with 0, 1 (API or network error) or 2 (usage error)."""
    try:
        result = cli.main(args=list(argv) if argv is not None else None, prog_name="kici-admin",
                          standalone_mode=False)
    except AdminCLIError as exc:
        _error("kici-admin", exc.message)
        sys.exit(exc.exit_code)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help(), err=True)
        sys.exit(2)
    except click.UsageError as exc:
        path = exc.ctx.command_path if exc.ctx is not None else "kici-admin"
        _error(path, f"{exc.format_message()} (see '{path} --help')")
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        _error("kici-admin", exc.format_message())
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("kici-admin: aborted", err=True)
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
