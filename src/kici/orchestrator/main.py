"""`kici-orchestrator`: serve (the default) or manage the database schema.

Exit codes: 0 after a clean shutdown (SIGTERM/SIGINT), 1 when start-up fails (the data dir, the port, a
schema from a newer version…), 2 for unusable settings or arguments (each problem on one stderr line).
The web stack is imported only once the settings are known to be good, so a bad setting fails fast.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import NoReturn

import click

from kici.orchestrator.config import Settings, SettingsError, load_settings
from kici.orchestrator.db.url import redact
from kici.orchestrator.logs import configure_logging, log_event
from kici.orchestrator.version import kici_version

PROG = "kici-orchestrator"


def _fail(lines: list[str] | str, code: int) -> NoReturn:
    for line in [lines] if isinstance(lines, str) else lines:
        click.echo(f"{PROG}: {line}", err=True)
    sys.exit(code)


def _settings(config: Path | None) -> Settings:
    try:
        settings = load_settings(config_file=config)
    except SettingsError as exc:
        _fail(exc.lines, 2)
    configure_logging(settings.log_level, settings.log_format)
    for warning in settings.load_warnings:
        log_event("config.warning", level="warning", message=warning)
    return settings


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config", type=click.Path(path_type=Path), default=None,
              help="YAML settings file (overrides KICI_CONFIG). Environment variables still win over it.")
@click.version_option(kici_version(), prog_name=PROG)
@click.pass_context
def cli(ctx: click.Context, config: Path | None) -> None:
    """The KiCI orchestrator. Without a command: serve."""
    ctx.obj = config
    if ctx.invoked_subcommand is None:
        ctx.invoke(serve)


@cli.command()
@click.pass_obj
def serve(config: Path | None) -> None:
    """Serve HTTP (webhooks, admin API, health) until SIGTERM or SIGINT."""
    settings = _settings(config)
    from kici.orchestrator import server
    from kici.orchestrator.datadir import (
        DataDirError,
        ensure_data_dir,
        load_old_secret_key,
        load_or_create_secret_key,
    )

    try:
        ensure_data_dir(settings.data_dir)
        secret_key = load_or_create_secret_key(settings)
        old_secret_key = load_old_secret_key(settings)
    except DataDirError as exc:
        _fail(str(exc), 1)
    from kici.orchestrator.crypto import key_id

    # Key ids (HMACs, not the keys) let an operator check which key is current during a rotation.
    log_event("secret_key.loaded", key_id=key_id(secret_key),
              old_key_id=key_id(old_secret_key) if old_secret_key is not None else None)
    try:
        sock = server.bind_socket(settings.host, settings.port)
    except OSError as exc:
        _fail(f"KICI_HOST/KICI_PORT: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}", 1)
    host, port = sock.getsockname()[:2]
    shown_host = f"[{host}]" if ":" in host else host
    log_event("orchestrator.listening", host=host, port=port, mode=settings.mode, version=kici_version(),
              url=f"http://{shown_host}:{port}{settings.base_path}", data_dir=str(settings.data_dir),
              database=redact(settings.database_url))
    if settings.mode != "independent":
        # The relay client is a later increment; say so rather than pretend to be connected.
        log_event("mode.relay_client_unavailable", level="warning", mode=settings.mode,
                  hint="this version serves direct HTTP only; the kici-relay connection is not implemented yet")
    sys.exit(asyncio.run(server.serve(settings, sock, secret_key, old_secret_key)))


@cli.command("migrate")
@click.option("--status", is_flag=True, help="Only show the current and pending revisions.")
@click.pass_obj
def migrate_command(config: Path | None, status: bool) -> None:
    """Apply pending database migrations (for KICI_AUTO_MIGRATE=false deployments)."""
    settings = _settings(config)
    from kici.orchestrator.db.migrate import MigrationError, migrate, migration_status

    try:
        if status:
            state = asyncio.run(migration_status(settings.database_url))
            click.echo(f"current: {state.current or '(empty database)'}")
            click.echo(f"head:    {state.head}")
            click.echo(f"pending: {', '.join(state.pending) or 'none'}")
            return
        result = asyncio.run(migrate(settings.database_url))
    except MigrationError as exc:
        _fail(str(exc), 1)
    except Exception as exc:  # connection failures: one clear line, not a traceback
        from kici.orchestrator.db.database import describe_error

        _fail(f"cannot migrate {redact(settings.database_url)}: {describe_error(exc)}", 1)
    if result.applied:
        click.echo(f"applied {', '.join(result.applied)}; database at {result.after}")
    else:
        click.echo(f"already at {result.after}; nothing to apply")


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name=PROG)


if __name__ == "__main__":
    main()
