"""The `github` provider: a GitHub App, through the REST API.

Authentication: an RS256 JWT signed with the App's private key (`iss` = App id, valid 9 minutes, `iat`
back-dated 60 s for clock drift) is exchanged for an installation token
(`POST /app/installations/{id}/access_tokens`), cached until a minute before it expires.

Reads, with the installation token:
- lock file: `GET /repos/{owner}/{repo}/contents/.kici/kici.lock.json?ref={sha}` (base64 `content`; a
  file over 1 MB comes back without content, and is then fetched raw); 404 → no lock file;
- changed files: `GET /repos/{owner}/{repo}/compare/{base}...{head}` → `files[].filename`;
- a branch head: `GET /repos/{owner}/{repo}/commits/{ref}` → `sha`.

`api_url` (source config) points at GitHub Enterprise Server (`https://ghe.example/api/v3`) or, in
tests, at a local fake.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from kici.orchestrator.providers.base import (
    LOCK_FILE_PATH,
    MAX_LOCK_FILE_BYTES,
    CloneAccess,
    LockFileTooLarge,
    ProviderError,
    check_ref,
    check_sha,
)

JWT_LIFETIME_SECONDS = 540
JWT_BACKDATE_SECONDS = 60
TOKEN_REFRESH_MARGIN_SECONDS = 60
HTTP_TIMEOUT_SECONDS = 30.0
_ACCEPT = "application/vnd.github+json"
_API_VERSION = "2022-11-28"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def app_jwt(app_id: int | str, private_key_pem: str, *, now: float | None = None) -> str:
    """The GitHub App JWT (RS256)."""
    try:
        key = serialization.load_pem_private_key(private_key_pem.encode("utf-8"), password=None)
    except (ValueError, TypeError) as exc:
        raise ProviderError(f"the GitHub App private key is not a usable PEM key: {exc}") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ProviderError("the GitHub App private key must be an RSA key")
    issued = int(now if now is not None else time.time())
    header = {"alg": "RS256", "typ": "JWT"}
    claims = {"iat": issued - JWT_BACKDATE_SECONDS, "exp": issued + JWT_LIFETIME_SECONDS, "iss": str(app_id)}
    signing_input = ".".join(_b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims))
    signature = key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64url(signature)}"


@dataclass
class _Token:
    value: str
    expires_monotonic: float


CLONE_PERMISSIONS = {"contents": "read"}
"""What a token handed to an agent may do: read the one repository's contents (clone/fetch), nothing else."""


_TokenKey = tuple[str, int, tuple[str, ...], tuple[tuple[str, str], ...]]


class InstallationTokens:
    """Installation tokens per (api_url, installation id, repositories, permissions), shared by every
    request of the process. A token asked for with `repositories`/`permissions` is scoped down to them
    (the reporting worker's `checks: write` token for one repository); without, it has the installation's
    full access (what reading lock files and cloning use)."""

    def __init__(self) -> None:
        self._tokens: dict[_TokenKey, _Token] = {}
        self._locks: dict[_TokenKey, asyncio.Lock] = {}

    async def get(
        self,
        client: httpx.AsyncClient,
        api_url: str,
        installation_id: int,
        app_id: int,
        private_key: str,
        *,
        repositories: Sequence[str] = (),
        permissions: Mapping[str, str] | None = None,
    ) -> str:
        key = _token_key(api_url, installation_id, repositories, permissions)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(key)
            if cached is not None and cached.expires_monotonic > time.monotonic():
                return cached.value
            scope: dict[str, object] = {}
            if repositories:
                scope["repositories"] = list(repositories)
            if permissions:
                scope["permissions"] = dict(permissions)
            response = await _request(
                client,
                "POST",
                f"{api_url}/app/installations/{installation_id}/access_tokens",
                headers={"Authorization": f"Bearer {app_jwt(app_id, private_key)}"},
                **({"json": scope} if scope else {}),
            )
            if response.status_code != 201:
                raise ProviderError(
                    f"GitHub refused an installation token for installation {installation_id}: "
                    f"HTTP {response.status_code} {_message(response)}"
                )
            body = response.json()
            token = body.get("token") if isinstance(body, dict) else None
            if not isinstance(token, str) or not token:
                raise ProviderError("GitHub's installation token response has no token")
            lifetime = 3600.0
            expires_at = body.get("expires_at")
            if isinstance(expires_at, str):
                try:
                    expiry = dt.datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
                    lifetime = (expiry - dt.datetime.now(dt.UTC)).total_seconds()
                except ValueError:
                    pass
            self._tokens[key] = _Token(token, time.monotonic() + lifetime - TOKEN_REFRESH_MARGIN_SECONDS)
            return token

    def forget(
        self,
        api_url: str,
        installation_id: int,
        *,
        repositories: Sequence[str] = (),
        permissions: Mapping[str, str] | None = None,
    ) -> None:
        self._tokens.pop(_token_key(api_url, installation_id, repositories, permissions), None)


def _token_key(
    api_url: str, installation_id: int, repositories: Sequence[str], permissions: Mapping[str, str] | None
) -> _TokenKey:
    return (api_url, installation_id, tuple(sorted(repositories)), tuple(sorted((permissions or {}).items())))


def message_of(response: httpx.Response) -> str:
    """GitHub's `message` of an error response (or the start of its body)."""
    return _message(response)


async def request(client: httpx.AsyncClient, method: str, url: str, **kwargs: object) -> httpx.Response:
    """A GitHub REST call with GitHub's headers; `ProviderError` when GitHub cannot be reached."""
    return await _request(client, method, url, **kwargs)


def repo_path(repo: str) -> str:
    """`owner/name`, each part URL-quoted; `ProviderError` for anything else."""
    return _repo_path(repo)


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    return str(body.get("message", ""))[:200] if isinstance(body, dict) else ""


async def _request(client: httpx.AsyncClient, method: str, url: str, **kwargs: object) -> httpx.Response:
    headers = {"Accept": _ACCEPT, "X-GitHub-Api-Version": _API_VERSION, "User-Agent": "kici-orchestrator"}
    extra = kwargs.pop("headers", None)
    if isinstance(extra, dict):
        headers.update(extra)
    try:
        return await client.request(method, url, headers=headers, timeout=HTTP_TIMEOUT_SECONDS, **kwargs)  # type: ignore[arg-type]
    except httpx.HTTPError as exc:
        raise ProviderError(f"GitHub API unreachable ({method} {url}): {type(exc).__name__}: {exc}") from None


def _repo_path(repo: str) -> str:
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts) or any(p in (".", "..") for p in parts):
        raise ProviderError(f"not an owner/name repository: {repo!r}")
    return "/".join(quote(p, safe="") for p in parts)


class GitHubProvider:
    def __init__(
        self,
        source_id: str,
        *,
        client: httpx.AsyncClient,
        tokens: InstallationTokens,
        app_id: int,
        private_key: str,
        installation_id: int | None,
        api_url: str,
    ) -> None:
        self.source_id = source_id
        self.client = client
        self.tokens = tokens
        self.app_id = app_id
        self.private_key = private_key
        self.installation_id = installation_id
        self.api_url = api_url.rstrip("/")

    @property
    def cache_prefix(self) -> str:
        return f"github:{self.source_id}"

    async def _installation_id(self, repo: str) -> int:
        if self.installation_id is not None:
            return self.installation_id
        response = await _request(
            self.client,
            "GET",
            f"{self.api_url}/repos/{_repo_path(repo)}/installation",
            headers={"Authorization": f"Bearer {app_jwt(self.app_id, self.private_key)}"},
        )
        body = response.json() if response.status_code == 200 else None
        if not isinstance(body, dict) or not isinstance(body.get("id"), int):
            raise ProviderError(f"the GitHub App is not installed on {repo} (HTTP {response.status_code})")
        self.installation_id = int(body["id"])
        return self.installation_id

    async def _get(
        self, repo: str, path: str, *, params: dict[str, str] | None = None, accept: str | None = None
    ) -> httpx.Response:
        installation = await self._installation_id(repo)
        for attempt in (1, 2):
            token = await self.tokens.get(self.client, self.api_url, installation, self.app_id, self.private_key)
            headers = {"Authorization": f"token {token}"}
            if accept:
                headers["Accept"] = accept
            response = await _request(
                self.client, "GET", f"{self.api_url}/repos/{_repo_path(repo)}" + (f"/{path}" if path else ""),
                params=params, headers=headers,
            )
            if response.status_code == 401 and attempt == 1:  # revoked or expired early: mint a new one
                self.tokens.forget(self.api_url, installation)
                continue
            return response
        raise AssertionError("unreachable")

    async def clone_access(self, repo: str) -> CloneAccess:
        """`https://<host>/<owner>/<name>.git` with an installation token scoped to that one repository and
        `contents: read` (GitHub Enterprise: the host of the API URL). The token goes to an agent, and from
        there within reach of the job's steps: it must not open anything else."""
        path = _repo_path(repo)
        parsed = urlsplit(self.api_url)
        host = "github.com" if parsed.hostname == "api.github.com" else parsed.netloc
        installation = await self._installation_id(repo)
        token = await self.tokens.get(
            self.client, self.api_url, installation, self.app_id, self.private_key,
            repositories=[repo.split("/")[1]], permissions=CLONE_PERMISSIONS,
        )
        return CloneAccess(f"{parsed.scheme or 'https'}://{host}/{path}.git", token)

    async def read_lock_file(self, repo: str, sha: str) -> bytes | None:
        sha = check_sha(sha)
        response = await self._get(repo, f"contents/{LOCK_FILE_PATH}", params={"ref": sha})
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise ProviderError(f"GitHub contents API: HTTP {response.status_code} {_message(response)}")
        body = response.json()
        if not isinstance(body, dict) or body.get("type") != "file":
            return None  # a directory (or submodule/symlink) where the lock file should be
        size = body.get("size")
        if isinstance(size, int) and size > MAX_LOCK_FILE_BYTES:
            raise LockFileTooLarge(size, MAX_LOCK_FILE_BYTES)
        if body.get("encoding") == "base64" and isinstance(body.get("content"), str):
            try:
                return base64.b64decode(body["content"])
            except ValueError:
                raise ProviderError("GitHub contents API returned invalid base64") from None
        raw = await self._get(
            repo, f"contents/{LOCK_FILE_PATH}", params={"ref": sha}, accept="application/vnd.github.raw"
        )
        if raw.status_code != 200:
            raise ProviderError(f"GitHub contents API (raw): HTTP {raw.status_code}")
        return raw.content

    async def changed_files(self, repo: str, base: str, head: str) -> list[str]:
        base, head = check_ref(base), check_sha(head)
        response = await self._get(repo, f"compare/{quote(base, safe='')}...{head}")
        if response.status_code != 200:
            raise ProviderError(f"GitHub compare API: HTTP {response.status_code} {_message(response)}")
        body = response.json()
        files = body.get("files") if isinstance(body, dict) else None
        if not isinstance(files, list):
            return []
        return sorted({f["filename"] for f in files if isinstance(f, dict) and isinstance(f.get("filename"), str)})

    async def resolve_ref(self, repo: str, ref: str) -> str | None:
        ref = check_ref(ref)
        response = await self._get(repo, f"commits/{quote(ref, safe='')}")
        if response.status_code in (404, 422):
            return None
        if response.status_code != 200:
            raise ProviderError(f"GitHub commits API: HTTP {response.status_code} {_message(response)}")
        body = response.json()
        sha = body.get("sha") if isinstance(body, dict) else None
        return sha if isinstance(sha, str) else None

    async def default_branch(self, repo: str) -> str | None:
        """The repository's default branch (`GET /repos/{owner}/{repo}`); None when it is not visible."""
        response = await self._get(repo, "")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise ProviderError(f"GitHub repository API: HTTP {response.status_code} {_message(response)}")
        body = response.json()
        branch = body.get("default_branch") if isinstance(body, dict) else None
        return branch if isinstance(branch, str) and branch else None

    async def pull_request_head(self, repo: str, number: int) -> str | None:
        """The head commit of pull request `number` now (`GET /repos/{o}/{r}/pulls/{n}`); None when there is
        no such pull request."""
        response = await self._get(repo, f"pulls/{int(number)}")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise ProviderError(f"GitHub pulls API: HTTP {response.status_code} {_message(response)}")
        body = response.json()
        sha = body.get("head", {}).get("sha") if isinstance(body, dict) and isinstance(body.get("head"), dict) else None
        return sha if isinstance(sha, str) else None

    async def team_member(self, repo: str, team: str, login: str) -> bool:
        """Whether `login` is an active member of `team` (`org/slug`), asked with the installation token of
        `repo` (`GET /orgs/{org}/teams/{slug}/memberships/{login}`; the App needs `members: read`)."""
        org, _, slug = team.partition("/")
        installation = await self._installation_id(repo)
        token = await self.tokens.get(self.client, self.api_url, installation, self.app_id, self.private_key)
        path = f"orgs/{quote(org, safe='')}/teams/{quote(slug, safe='')}/memberships/{quote(login, safe='')}"
        response = await _request(
            self.client, "GET", f"{self.api_url}/{path}",
            headers={"Authorization": f"token {token}"},
        )
        if response.status_code == 404:
            return False
        if response.status_code != 200:
            raise ProviderError(f"GitHub team membership API: HTTP {response.status_code} {_message(response)}")
        body = response.json()
        return isinstance(body, dict) and body.get("state") == "active"

    async def installation_repositories(self) -> list[tuple[str, str | None]]:
        """`(owner/name, default branch)` of every repository the installation can see
        (`GET /installation/repositories`, all pages); needs a configured `installation_id`."""
        if self.installation_id is None:
            raise ProviderError("the source has no installation_id: its repositories cannot be listed")
        found: list[tuple[str, str | None]] = []
        page = 1
        while True:
            token = await self.tokens.get(
                self.client, self.api_url, self.installation_id, self.app_id, self.private_key
            )
            response = await _request(
                self.client, "GET", f"{self.api_url}/installation/repositories",
                params={"per_page": "100", "page": str(page)}, headers={"Authorization": f"token {token}"},
            )
            if response.status_code != 200:
                raise ProviderError(f"GitHub installation repositories API: HTTP {response.status_code} "
                                    f"{_message(response)}")
            body = response.json()
            repos = body.get("repositories") if isinstance(body, dict) else None
            if not isinstance(repos, list):
                raise ProviderError("GitHub installation repositories API: no `repositories` list")
            for item in repos:
                if isinstance(item, dict) and isinstance(item.get("full_name"), str):
                    branch = item.get("default_branch")
                    found.append((item["full_name"], branch if isinstance(branch, str) else None))
            total = body.get("total_count")
            if not repos or not isinstance(total, int) or len(found) >= total:
                return found
            page += 1
