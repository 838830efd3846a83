"""The FastAPI application and the orchestrator's composition root: routes under `KICI_BASE_PATH`,
per-app metrics, and the container (`kici.orchestrator.container.AppState`) with the services, built here
and nowhere else. Only the entry points (`server`, `main`, `__main__`) and tests import this module.

`create_app` only assembles; it does not own the database (the caller opens and closes it) and does not
prepare it (migrations and the bootstrap token are `kici.orchestrator.startup`'s job, run by `main`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from kici.orchestrator.agents import mount_agents
from kici.orchestrator.config import Settings
from kici.orchestrator.container import AppState, Readiness, app_state, services_of
from kici.orchestrator.db.database import Database
from kici.orchestrator.metrics import Metrics, MetricsMiddleware
from kici.orchestrator.services import Services
from kici.orchestrator.storage.blob_backends import blob_store_from_settings
from kici.orchestrator.version import kici_version

__all__ = ["AppState", "Readiness", "app_state", "create_app", "services_of"]


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
        state = app.state.kici
        await state.services.start(state.readiness)
        try:
            yield
        finally:
            await state.services.stop()

    app = FastAPI(
        title="KiCI orchestrator",
        version=version,
        openapi_url=f"{base}/openapi.json",
        docs_url=None,  # the interactive docs load assets from a CDN; the schema is enough offline
        redoc_url=None,
        lifespan=lifespan,
    )
    state = app.state.kici = AppState(
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
    state.services = Services.assemble(state, registry, blob_store_from_settings(settings))
    app.add_middleware(MetricsMiddleware, metrics=metrics, base_path=base)
    return app
