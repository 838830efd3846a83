"""The web dashboard (issue 12): server-rendered pages at `/` under `KICI_BASE_PATH`, on the same store
and route functions as the admin REST API. `mount_dashboard` adds its routes, its static files and the
security headers."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATIC_DIR = Path(__file__).parent / "static"

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}


class SecurityHeadersMiddleware:
    """Adds the dashboard's security headers to every HTTP response (the API's JSON included: they cost
    nothing there, and no response of this server may be framed or run inline script)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.raw = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *(h for h in self.raw if h[0] not in present)]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def mount_dashboard(app: FastAPI, base: str) -> None:
    from kici.orchestrator.web import pages

    app.include_router(pages.router, prefix=base)
    app.mount(f"{base}/static", StaticFiles(directory=STATIC_DIR), name="dashboard-static")
    app.add_middleware(SecurityHeadersMiddleware)
