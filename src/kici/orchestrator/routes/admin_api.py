"""The admin REST API under `/api/v1/admin`: one router assembling the admin routers, so `create_app`
mounts it with one line. Unknown admin paths answer 404 in the admin error shape."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from kici.orchestrator.auth import AdminRoute, error_response
from kici.orchestrator.routes import (
    admin_agents,
    admin_artifacts,
    admin_audit,
    admin_caches,
    admin_cluster,
    admin_environments,
    admin_events,
    admin_held,
    admin_manual_runs,
    admin_queue,
    admin_reports,
    admin_retention,
    admin_runs,
    admin_schedules,
    admin_secrets,
    admin_sources,
    admin_system,
    admin_tests,
    admin_tokens,
    admin_trust,
)

ADMIN_PREFIX = "/api/v1/admin"

router = APIRouter(prefix=ADMIN_PREFIX, tags=["admin"], route_class=AdminRoute)
router.include_router(admin_system.router)
router.include_router(admin_tokens.router)
router.include_router(admin_runs.router)
router.include_router(admin_manual_runs.router)
router.include_router(admin_schedules.router)
router.include_router(admin_sources.router)
router.include_router(admin_secrets.router)
router.include_router(admin_audit.router)
router.include_router(admin_queue.router)
router.include_router(admin_agents.router)
router.include_router(admin_events.router)
router.include_router(admin_reports.router)
router.include_router(admin_environments.router)
router.include_router(admin_artifacts.router)
router.include_router(admin_tests.router)
router.include_router(admin_caches.router)
router.include_router(admin_retention.router)
router.include_router(admin_trust.router)
router.include_router(admin_held.router)
router.include_router(admin_cluster.router)


@router.api_route(
    "/{path:path}",
    methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
    include_in_schema=False,
)
async def unknown_admin_route(path: str, request: Request) -> JSONResponse:
    return error_response(404, f"no admin route {request.method} {request.url.path}")
