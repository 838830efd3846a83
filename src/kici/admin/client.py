"""A small synchronous client for the admin API: every failure becomes one `AdminCLIError` line."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

API_PREFIX = "/api/v1/admin"
DEFAULT_TIMEOUT_S = 30.0


class AdminCLIError(Exception):
    """An error to show as one line on stderr; `exit_code` 1 for API and network errors, 2 for usage."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def check_base_url(url: str) -> str:
    """`url` without a trailing slash, or a usage error naming what is wrong with it."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AdminCLIError(
            f"invalid orchestrator URL {url!r}: expected http(s)://host[:port][/base-path]", exit_code=2
        )
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise AdminCLIError(f"invalid orchestrator URL {url!r}: {exc}", exit_code=2) from None
    return url


def _api_message(response: httpx.Response) -> str:
    """The API's `{"error": …}` line, or FastAPI's `detail`, or the start of the body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("error", "detail"):
            value = body.get(key)
            if isinstance(value, str) and value:
                return value
    text = " ".join(response.text.split())[:200]
    return text or response.reason_phrase or "no details"


class AdminClient:
    def __init__(self, base_url: str, token: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.base_url = check_base_url(base_url)
        self._http = httpx.Client(
            base_url=self.base_url + API_PREFIX,
            headers={"Authorization": f"Bearer {token}", "User-Agent": "kici-admin"},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            follow_redirects=False,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def request(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        response = self._send(method, path, json=json, params=params)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise AdminCLIError(
                f"unexpected non-JSON answer from {self.base_url} (HTTP {response.status_code}); "
                "is --url pointing at a KiCI orchestrator?"
            ) from None

    def get_text(self, path: str, **params: Any) -> str:
        """A plain-text answer (e.g. a hook script)."""
        return self._send("GET", path, json=None, params=params).text

    def get_page(self, path: str, cursor_header: str, **params: Any) -> tuple[Any, str | None]:
        """A JSON list answer and the cursor of the next page from `cursor_header` (None on the last page)."""
        response = self._send("GET", path, json=None, params=params)
        return response.json(), response.headers.get(cursor_header)

    def _send(self, method: str, path: str, *, json: Any, params: dict[str, Any] | None) -> httpx.Response:
        clean_params = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = self._http.request(method, path, json=json, params=clean_params or None)
        except httpx.TimeoutException:
            raise AdminCLIError(f"the orchestrator at {self.base_url} did not answer in time") from None
        except httpx.ConnectError as exc:
            raise AdminCLIError(f"cannot connect to the orchestrator at {self.base_url}: {_reason(exc)}") from None
        except httpx.HTTPError as exc:
            raise AdminCLIError(f"request to {self.base_url} failed: {_reason(exc)}") from None
        if response.status_code == 404 and not _is_admin_error(response):
            raise AdminCLIError(
                f"no KiCI admin API at {self.base_url} (HTTP 404); check --url, including the orchestrator's "
                "KICI_BASE_PATH"
            )
        if response.status_code >= 400:
            raise AdminCLIError(f"{_api_message(response)} (HTTP {response.status_code})")
        return response

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def download(self, path: str, dest: Path) -> tuple[int, str]:
        """Stream a download into `dest` (written to a temporary file beside it, renamed when complete);
        its size and SHA-256. A `X-Kici-Sha256` header that does not match the bytes received is an error,
        and nothing is left at `dest`."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".part")
        digest = hashlib.sha256()
        size = 0
        try:
            with self._http.stream("GET", path) as response:
                if response.status_code >= 400:
                    response.read()
                    raise AdminCLIError(f"{_api_message(response)} (HTTP {response.status_code})")
                expected = response.headers.get("x-kici-sha256")
                with open(partial, "wb") as handle:
                    for chunk in response.iter_bytes():
                        digest.update(chunk)
                        size += len(chunk)
                        handle.write(chunk)
            if expected and expected != digest.hexdigest():
                raise AdminCLIError(f"download of {dest.name} is corrupt: SHA-256 {digest.hexdigest()}, "
                                    f"expected {expected}")
            os.replace(partial, dest)
        except httpx.HTTPError as exc:
            raise AdminCLIError(f"download from {self.base_url} failed: {_reason(exc)}") from None
        finally:
            partial.unlink(missing_ok=True)
        return size, digest.hexdigest()

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json=body)

    def patch(self, path: str, body: Any = None) -> Any:
        return self.request("PATCH", path, json=body)

    def put(self, path: str, body: Any = None) -> Any:
        return self.request("PUT", path, json=body)

    def delete(self, path: str, **params: Any) -> Any:
        return self.request("DELETE", path, params=params)


def _is_admin_error(response: httpx.Response) -> bool:
    """The admin API answers every error as `{"error": …}`; anything else came from something else."""
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and isinstance(body.get("error"), str)


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
