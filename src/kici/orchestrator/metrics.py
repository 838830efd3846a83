"""Prometheus metrics. Each app gets its own registry (tests build many apps in one process, and the
global default registry would refuse duplicate metric names); later components register their metrics
on `Metrics.registry` next to these."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE_LATEST
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class Metrics:
    def __init__(self, version: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.up = Gauge("kici_up", "1 while the orchestrator process is serving.", registry=self.registry)
        self.up.set(1)
        self.build_info = Gauge(
            "kici_build_info", "Always 1; the labels describe this build.", ["version"], registry=self.registry
        )
        self.build_info.labels(version=version).set(1)
        self.ready = Gauge(
            "kici_ready", "1 when the last readiness check passed, else 0.", registry=self.registry
        )
        self.http_requests = Counter(
            "kici_http_requests",
            "HTTP requests handled, by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.webhooks = Counter(
            "kici_webhooks_received",
            "Webhook deliveries answered, by provider (github, git, generic) and outcome (accepted, duplicate, "
            "filtered, rejected_<status>).",
            ["provider", "outcome"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "kici_http_request_duration_seconds",
            "Time to produce the response, by route template.",
            ["route"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


def route_label(route: object, base_path: str) -> str:
    """The `route` label: the matched route's template without `KICI_BASE_PATH`, so dashboards do not
    depend on where the orchestrator is mounted. Routers declare full paths (`/api/v1/admin/runs/{run_id}`)
    rather than relying on `include_router(prefix=…)`: recent FastAPI versions report only the
    router-local part of a prefixed route, which would make labels ambiguous."""
    template = getattr(route, "path", None)
    if not isinstance(template, str) or not template:
        return "<unmatched>"
    if base_path and (template == base_path or template.startswith(base_path + "/")):
        template = template[len(base_path):] or "/"
    return template


class MetricsMiddleware:
    """Counts HTTP requests by route *template* (`/api/v1/admin/runs/{run_id}`), never the raw path, so
    ids in URLs cannot blow up the number of series. WebSocket and lifespan traffic pass through."""

    def __init__(self, app: ASGIApp, metrics: Metrics, base_path: str = "") -> None:
        self.app = app
        self.metrics = metrics
        self.base_path = base_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            template = route_label(scope.get("route"), self.base_path)
            self.metrics.http_requests.labels(scope["method"], template, str(status)).inc()
            self.metrics.http_duration.labels(template).observe(time.perf_counter() - start)
