"""Serving: the listening socket, uvicorn, start-up preparation in the background, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Iterator
from types import FrameType

import click
import uvicorn

from kici.orchestrator.app import create_app
from kici.orchestrator.cluster.identity import node_address
from kici.orchestrator.cluster.node import NodeNameInUse
from kici.orchestrator.config import Settings
from kici.orchestrator.container import Readiness, services_of
from kici.orchestrator.db.database import Database
from kici.orchestrator.logs import log_event
from kici.orchestrator.startup import FatalStartupError, GeneratedToken, check_blob_storage, prepare_database

PROG = "kici-orchestrator"
GRACEFUL_SHUTDOWN_S = 5


class _Server(uvicorn.Server):
    """uvicorn re-raises a caught SIGTERM/SIGINT once its graceful shutdown is done, which would end the
    process by the signal (exit status -15) before we close the database. We take the signals here and
    return normally instead, so shutdown runs to the end and exits 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            log_event("orchestrator.stopping", signal=signal.Signals(sig).name)
        super().handle_exit(sig, frame)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one). Bound here rather than by uvicorn so the
    actual port is known and logged before serving, and so a busy port is a clear start-up error."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart without waiting out TIME_WAIT
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def print_bootstrap_token(generated: GeneratedToken) -> None:
    # Printed straight to the terminal, never through logging: log lines get shipped and retained.
    rule = "=" * 72
    click.echo(
        f"\n{rule}\nKiCI bootstrap admin token (role owner) - shown once:\n\n    {generated.plaintext}\n\n"
        f"Also saved to {generated.file} (mode 0600).\n"
        f"Use it as KICI_ADMIN_TOKEN for kici-admin; store it safely, then delete that file.\n{rule}\n",
        err=True,
    )


async def serve(
    settings: Settings, sock: socket.socket, secret_key: bytes, old_secret_key: bytes | None = None
) -> int:
    """Serve on `sock` until a signal (exit code 0) or a fatal start-up error (1). The database is
    prepared in the background so `/health` answers from the first moment."""
    database = Database.connect(settings.database_url)
    readiness = Readiness(prepared=False)
    app = create_app(settings, database, readiness=readiness, secret_key=secret_key, old_secret_key=old_secret_key)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(
        app,
        host=host,
        port=port,  # only for uvicorn's own messages; it serves on `sock`
        log_config=None,  # our handler (kici.orchestrator.logs) formats uvicorn's records too
        access_log=False,
        lifespan="on",
        server_header=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = _Server(config)
    exit_code = 0
    services = services_of(app)
    services.node.address = node_address(settings, port)

    async def join() -> None:
        try:
            await services.node.join()
        except NodeNameInUse as exc:
            raise FatalStartupError(f"KICI_NODE_NAME: {exc}") from None

    async def prepare() -> None:
        nonlocal exit_code
        try:
            readiness.waiting("checking the blob storage")
            await check_blob_storage(settings, services.blobs)
            await prepare_database(settings, database, readiness, on_generated_token=print_bootstrap_token,
                                   before_ready=join)
        except FatalStartupError as exc:
            log_event("orchestrator.startup_failed", level="error", reason=str(exc))
            click.echo(f"{PROG}: {exc}", err=True)
            exit_code = 1
            server.should_exit = True

    task = asyncio.create_task(prepare())
    try:
        await server.serve(sockets=[sock])
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await database.close()
    log_event("orchestrator.stopped", exit_code=exit_code)
    return exit_code
