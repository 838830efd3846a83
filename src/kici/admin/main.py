"""`kici-admin`: manage a KiCI orchestrator through its admin REST API.

Human-readable tables by default, `--json` for scripts. Every error — from the API, the network, or the
command line — is one line on stderr; the exit code is 1 for API and network errors, 2 for usage errors.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from kici.admin.client import DEFAULT_TIMEOUT_S, AdminClient, AdminCLIError
from kici.admin.output import print_fields, print_json, print_table

DEFAULT_URL = "http://127.0.0.1:4000"
ROLES = ("owner", "admin", "auditor")

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
                 ("last_used_at", "last used")]


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
@json_option
def token_create(name: str, role: str, as_json: bool) -> None:
    """Create an admin token (its value is printed once)."""
    created = _client().post("/tokens", {"name": name, "role": role})
    if as_json:
        print_json(created)
    else:
        _show_created(created, "admin token", f"role {created['role']}")


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
    print_table(found, columns, empty="No admin tokens.")


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
@json_option
def agent_token_create(name: str, labels: list[str], as_json: bool) -> None:
    """Create an agent token (its value is printed once)."""
    created = _client().post("/agent-tokens", {"name": name, "labels": labels})
    if as_json:
        print_json(created)
    else:
        _show_created(created, "agent token", "labels " + (",".join(created["labels"]) or "none"))


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
               ("last_used_at", "last used")] + ([("revoked_at", "revoked")] if include_revoked else [])
    print_table(found, columns, empty="No agent tokens.")


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
    """Runs: list, show, jobs, cancel."""


def _short_sha(value: Any) -> str | None:
    return str(value)[:12] if value else None


@runs.command("list")
@click.option("--status", help="Only runs with this status (several separated by commas).")
@click.option("--repo", help="Only runs of this repository (e.g. acme/app).")
@click.option("--workflow", help="Only runs of this workflow.")
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True, help="At most this many runs.")
@json_option
def runs_list(status: str | None, repo: str | None, workflow: str | None, limit: int, as_json: bool) -> None:
    """List runs, newest first."""
    found = _client().get("/runs", status=status, repo=repo, workflow=workflow, limit=limit)
    if as_json:
        print_json(found)
        return
    rows = [{**r, "sha": _short_sha(r.get("sha"))} for r in found]
    print_table(
        rows,
        [("id", "id"), ("workflow", "workflow"), ("status", "status"), ("repo", "repo"), ("ref", "ref"),
         ("sha", "sha"), ("created_at", "created")],
        empty="No runs.",
    )


@runs.command("show")
@click.argument("run_id", metavar="ID")
@json_option
def runs_show(run_id: str, as_json: bool) -> None:
    """Show one run."""
    run = _client().get(f"/runs/{run_id}")
    if as_json:
        print_json(run)
        return
    print_fields(
        run,
        [("id", "Run"), ("workflow", "Workflow"), ("status", "Status"), ("repo", "Repository"), ("ref", "Ref"),
         ("sha", "Commit"), ("created_at", "Created"), ("started_at", "Started"), ("finished_at", "Finished"),
         ("failure_reason", "Reason"), ("cancelled_by", "Cancelled by"), ("delivery_id", "Delivery"),
         ("original_run_id", "Re-run of")],
    )


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
        found,
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


# -- entry point ------------------------------------------------------------------------------------


def _error(prefix: str, message: str) -> None:
    click.echo(f"{prefix}: error: {' '.join(message.split())}", err=True)


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
