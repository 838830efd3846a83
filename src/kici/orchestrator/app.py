"""The FastAPI application: routes under `KICI_BASE_PATH`, per-app metrics, shared state for handlers.

`create_app` only assembles; it does not own the database (the caller opens and closes it) and does not
prepare it (migrations and the bootstrap token are `kici.orchestrator.startup`'s job, run by `main`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request

from kici.orchestrator.agents import mount_agents
from kici.orchestrator.config import Settings
from kici.orchestrator.crypto import Keyring
from kici.orchestrator.db.database import Database
from kici.orchestrator.metrics import Metrics, MetricsMiddleware
from kici.orchestrator.services import Services
from kici.orchestrator.version import kici_version


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


@dataclass
class AppState:
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

    @property
    def keyring(self) -> Keyring:
        """The keys to open sealed values with: current, then old."""
        return Keyring(current=self.secret_key, old=self.old_secret_key)


def app_state(request: Request) -> AppState:
    """The orchestrator's state for a request handler (FastAPI dependency)."""
    state: AppState = request.app.state.kici
    return state


def create_app(
    settings: Settings,
    database: Database,
    *,
    readiness: Readiness | None = None,
    secret_key: bytes | None = None,
    old_secret_key: bytes | None = None,
) -> FastAPI:
    """The orchestrator app. `readiness` defaults to "prepared" (the caller migrated the database)."""
    from kici.orchestrator.cluster.identity import node_name
    from kici.orchestrator.ingest import routes as ingest_routes
    from kici.orchestrator.routes import admin_api, agent_artifacts, agent_caches, agent_test_reports, health
    from kici.orchestrator.web import mount_dashboard

    version = kici_version()
    metrics = Metrics(version)
    base = settings.base_path

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services: Services = app.state.services
        await services.start(app.state.kici.readiness)
        try:
            yield
        finally:
            await services.stop()

    app = FastAPI(
        title="KiCI orchestrator",
        version=version,
        openapi_url=f"{base}/openapi.json",
        docs_url=None,  # the interactive docs load assets from a CDN; the schema is enough offline
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.kici = AppState(
        settings=settings,
        database=database,
        metrics=metrics,
        readiness=readiness or Readiness(),
        version=version,
        node_id=node_name(settings),
        secret_key=secret_key,
        old_secret_key=old_secret_key,
    )
    # Routers declare their full paths and are mounted only under the base path (see route_label).
    # The agents' WebSocket first: routing tries routes in order, and a reconnect storm opens hundreds of
    # connections a second (behind the ~180 other routes, matching cost ~0.4 ms of CPU per connection).
    registry = mount_agents(app, base)  # agents' WebSocket /ws; registry at app.state.agents
    app.include_router(health.router, prefix=base)
    app.include_router(ingest_routes.router, prefix=base)  # webhooks: /webhook/{org}/{github,git,generic}
    app.include_router(admin_api.router, prefix=base)
    app.include_router(agent_artifacts.router, prefix=base)  # agents upload artifacts with their token
    app.include_router(agent_test_reports.router, prefix=base)  # and test reports
    app.include_router(agent_caches.router, prefix=base)  # agents restore and save caches with their token
    mount_dashboard(app, base)  # the web dashboard at `/` (kici.orchestrator.web)
    app.state.services = Services.assemble(app, registry)
    app.add_middleware(MetricsMiddleware, metrics=metrics, base_path=base)
    return app
