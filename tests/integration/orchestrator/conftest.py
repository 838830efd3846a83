"""Fixtures for the orchestrator's integration tests: real SQLite files, real PostgreSQL, real processes.

PostgreSQL: `KICI_TEST_DATABASE_URL` names a server and a database to connect to for administration
(e.g. `postgresql://postgres@127.0.0.1:5432/test`). The session creates its own database
`kici_t_<random>` there and drops it at the end; each test gets an empty `public` schema. Without the
variable the PostgreSQL variants skip — except under `CI=true`, where they fail: CI must run them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from kici.orchestrator.db import schema
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.migrate import migrate
from tests.conftest import die_with_test_run

REVISIONS = tuple(f"{n:04d}" for n in range(1, 20))
"""Every migration in order: a new migration is added here, so a renumbered or re-chained one is noticed."""

PG_ENV = "KICI_TEST_DATABASE_URL"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def _asyncpg_dsn(url: str) -> str:
    # asyncpg takes libpq-style URLs without a SQLAlchemy driver suffix
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _pg_execute(url: str, *statements: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(_asyncpg_dsn(url), timeout=10)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def _pg_run(url: str, *statements: str) -> None:
    """Run `statements` on their own connection, from sync code. In a thread of its own: a session fixture
    is set up from inside whichever test first asks for it, and that may be an async test whose event
    loop is running (where `asyncio.run` refuses)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, _pg_execute(url, *statements)).result()


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    url = os.environ.get(PG_ENV, "").strip()
    if not url:
        if in_ci():
            pytest.fail(f"CI=true but {PG_ENV} is not set: the PostgreSQL tests must run in CI, not skip")
        pytest.skip(f"{PG_ENV} not set (e.g. postgresql://postgres@127.0.0.1:5432/test): PostgreSQL variant skipped")
    return url


@pytest.fixture(scope="session")
def postgres_session_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh database for this test session, dropped at the end."""
    name = f"kici_t_{secrets.token_hex(6)}"
    try:
        _pg_run(postgres_admin_url, f'CREATE DATABASE "{name}"')
    except Exception as exc:  # unreachable server, bad credentials: a set variable means "test PostgreSQL"
        pytest.fail(f"{PG_ENV}={postgres_admin_url}: cannot create a test database: {type(exc).__name__}: {exc}")
    url = make_url(postgres_admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        # FORCE (PostgreSQL 13+) ends connections a failed test may have left behind
        _pg_run(postgres_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def reset_postgres_schema(url: str) -> None:
    _pg_run(url, "DROP SCHEMA IF EXISTS public CASCADE", "CREATE SCHEMA public")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a new SQLite file, or the session's PostgreSQL database with a fresh schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'kici.db'}"
    url: str = request.getfixturevalue("postgres_session_url")
    reset_postgres_schema(url)
    return url


async def _migrate_url(url: str) -> None:
    db = Database.connect(url)
    try:
        await migrate(db)
    finally:
        await db.close()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database file migrated once per session: a test's `database` starts as a copy of it, which
    costs a file copy instead of replaying every migration (the migration tests still migrate from empty,
    through `database_url`)."""
    path = tmp_path_factory.mktemp("sqlite-template") / "kici.db"
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:  # may be asked for inside a running loop
        pool.submit(asyncio.run, _migrate_url(f"sqlite:///{path}")).result()
    return path


@pytest.fixture
async def database(database_url: str, request: pytest.FixtureRequest) -> AsyncIterator[Database]:
    """A migrated database, closed after the test."""
    if database_url.startswith("sqlite:///"):
        path = Path(database_url.removeprefix("sqlite:///"))
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
    db = Database.connect(database_url)
    try:
        await migrate(db)  # a copy of the template is up to date already: one version read
        yield db
    finally:
        await db.close()


WORKFLOW_SPEC: dict[str, Any] = {
    "name": "ci",
    "source": {"file": ".kici/workflows/ci.py", "export": "#ci"},
    "contentHash": "0" * 64,
    "compileSchemaVersion": 1,
    "triggers": [],
    "jobs": [{"name": "build", "steps": [{"name": "s"}]}],
}
"""A minimal lock-file workflow entry, for runs that must be dispatchable or rerunnable."""


async def insert_run(conn: Any, **values: Any) -> str:
    """A run row with plausible defaults (the run-creation store comes with the pipeline)."""
    row = {"workflow": "ci", "repo": "acme/app", "sha": "a" * 40, "status": "pending", **values}
    result = await conn.execute(schema.runs.insert().values(**row).returning(schema.runs.c.id))
    return str(result.scalar_one())


async def insert_job(conn: Any, run_id: str, name: str = "build", **values: Any) -> str:
    row = {"run_id": run_id, "name": name, "job": name, **values}
    result = await conn.execute(schema.jobs.insert().values(**row).returning(schema.jobs.c.id))
    return str(result.scalar_one())


# -- real orchestrator processes ---------------------------------------------------------------------


def orchestrator_env(tmp_path: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without any KICI_* variable, with XDG dirs inside `tmp_path` (so
    nothing can touch the real home), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KICI_")}
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg-data")
    env.update(extra or {})
    return env


class OrchestratorProcess:
    """A `python -m kici.orchestrator` child whose stderr is collected line by line in the background."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def stderr(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def events(self) -> list[dict[str, Any]]:
        found = []
        with self._changed:
            lines = list(self.lines)
        for line in lines:
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    found.append(json.loads(line))
        return found

    def wait_for_event(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for event in self.events():
                    if event.get("event") == name:
                        return event
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"orchestrator exited ({self.proc.returncode}) before {name}:\n{self.stderr}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {name} event within {timeout}s:\n{self.stderr}")
                self._changed.wait(min(remaining, 0.2))

    @property
    def url(self) -> str:
        return str(self.wait_for_event("orchestrator.listening")["url"])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def wait(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


StartOrchestrator = Callable[..., OrchestratorProcess]


@pytest.fixture
def start_orchestrator(tmp_path: Path) -> Iterator[StartOrchestrator]:
    """Start `kici-orchestrator` (on a free port unless KICI_PORT is given); every process started is
    killed at teardown, whatever the test did."""
    started: list[OrchestratorProcess] = []

    def start(env: Mapping[str, str] | None = None, args: tuple[str, ...] = ()) -> OrchestratorProcess:
        full_env = orchestrator_env(tmp_path, {"KICI_PORT": "0", **(env or {})})
        proc = subprocess.Popen(
            [sys.executable, "-m", "kici.orchestrator", *args],
            env=full_env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=die_with_test_run,
        )
        process = OrchestratorProcess(proc)
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            process.kill()
