"""The orchestrator's shared state, as one typed container: settings, database, keys, node identity,
readiness, the ingest state and the background services (with blob storage and log storage).

The container is built in one place, the composition root (`kici.orchestrator.app.create_app`), and
passed explicitly: services get it (or the parts they need) as constructor arguments, request handlers
through the `app_state` / `services_dep` FastAPI dependencies. This module imports no routes and no
service implementations at run time, so any module can depend on it without forming an import cycle
through the app (tests/unit/test_orchestrator_imports.py keeps it so).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from kici.orchestrator.config import Settings
from kici.orchestrator.crypto import Keyring
from kici.orchestrator.db.database import Database
from kici.orchestrator.ingest.service import Ingest
from kici.orchestrator.metrics import Metrics

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from kici.orchestrator.services import Services
    from kici.orchestrator.storage.blobs import BlobStore


class Readiness:
    """Whether start-up has finished preparing the database. `/ready` is 503 until it has, with the
    reason (waiting for the database, waiting for migrations, …); afterwards `/ready` checks the
    database on every call."""

    def __init__(self, *, prepared: bool = True, reason: str = "starting") -> None:
        self.prepared = prepared
        self.reason = reason
        self.last_failure: str | None = None
        """Reason of the last failed database check, so a probe hammering /ready logs a change once."""

    def waiting(self, reason: str) -> None:
        self.prepared = False
        self.reason = reason

    def mark_prepared(self) -> None:
        self.prepared = True
        self.reason = "ready"


class NotAssembled(RuntimeError):
    """The container's services were asked for before the composition root assembled them."""


@dataclass
class AppState:
    """The orchestrator's container (one per app)."""

    settings: Settings
    database: Database
    metrics: Metrics
    readiness: Readiness
    version: str
    node_id: str = ""
    """This process's node id in the cluster (`kici.orchestrator.cluster.identity.node_name`)."""
    secret_key: bytes | None = None
    old_secret_key: bytes | None = None
    """`KICI_SECRET_KEY_OLD`: opens values not yet re-sealed during a key rotation; never seals."""
    started_monotonic: float = field(default_factory=time.monotonic)
    ingest: Ingest = field(init=False)
    """Process-wide ingest state (lock-file cache, installation tokens, run hooks), from the settings."""
    _services: Services | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.ingest = Ingest.from_settings(self.settings)

    @property
    def keyring(self) -> Keyring:
        """The keys to open sealed values with: current, then old."""
        return Keyring(current=self.secret_key, old=self.old_secret_key)

    @property
    def services(self) -> Services:
        """The background services; set once by the composition root."""
        if self._services is None:
            raise NotAssembled("the orchestrator's services are not assembled (create_app builds them)")
        return self._services

    @services.setter
    def services(self, services: Services) -> None:
        self._services = services

    @property
    def blobs(self) -> BlobStore:
        """Blob storage (`KICI_STORAGE_BACKEND`): artifacts, caches, test reports, log segments."""
        return self.services.blobs


def app_state(request: Request) -> AppState:
    """The orchestrator's container for a request handler (FastAPI dependency)."""
    return state_of(request.app)


def state_of(app: Starlette) -> AppState:
    """The container of an app built by `create_app`."""
    state: AppState = app.state.kici
    return state


def services_of(app: Starlette) -> Services:
    """The background services of an app built by `create_app`."""
    return state_of(app).services


def ingest_for(app: Starlette) -> Ingest:
    """The app's `Ingest`. Set `on_runs_created` on it to be told about new runs (the dispatcher's hook)."""
    return state_of(app).ingest
