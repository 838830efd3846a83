"""The agent's HTTP endpoints on `KICI_PORT`: `/health` (always 200), `/ready` (200 only while registered
with the orchestrator, else 503) and `/metrics` (Prometheus text format).

A few lines of asyncio streams instead of a web framework: three GET routes do not justify the import
cost, and the agent's event loop already runs everything else.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from kici.agent.log import log_event
from kici.engine import aio

Provider = Callable[[], Any]


class HealthServer:
    def __init__(self, host: str, port: int, *, health: Provider, ready: Callable[[], bool],
                 metrics: Callable[[], str]) -> None:
        self.host = host
        self.port = port
        self._health = health
        self._ready = ready
        self._metrics = metrics
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        port = int(self._server.sockets[0].getsockname()[1])
        log_event("health.listening", host=self.host, port=port)
        return port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await aio.wait_for(reader.readline(), 5)
            while True:  # skip the headers
                line = await aio.wait_for(reader.readline(), 5)
                if line in (b"\r\n", b"\n", b""):
                    break
            parts = request.decode("latin-1").split()
            method, path = (parts[0], parts[1].split("?")[0]) if len(parts) >= 2 else ("", "")
            status, content_type, body = self._route(method, path)
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n")
            writer.write(head.encode("latin-1") + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()

    def _route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"method not allowed\n"
        if path == "/health":
            return "200 OK", "application/json", json.dumps(self._health()).encode()
        if path == "/ready":
            ready = self._ready()
            body = json.dumps({"status": "ready" if ready else "not ready"}).encode()
            return ("200 OK" if ready else "503 Service Unavailable"), "application/json", body
        if path == "/metrics":
            return "200 OK", "text/plain; version=0.0.4; charset=utf-8", self._metrics().encode()
        return "404 Not Found", "text/plain", b"not found\n"


def prometheus_text(metrics: list[tuple[str, str, str, list[tuple[dict[str, str], float]]]]) -> str:
    """Render (name, type, help, [(labels, value)]) in the Prometheus text exposition format."""
    out: list[str] = []
    for name, kind, help_text, samples in metrics:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
            out.append(f"{name}{{{label_text}}} {value:g}" if label_text else f"{name} {value:g}")
    return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def uptime_since(started: float) -> float:
    return round(time.monotonic() - started, 3)
