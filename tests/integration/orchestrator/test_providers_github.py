"""The GitHub App provider against a local fake of GitHub's REST API (real HTTP on a free port, GitHub's
response shapes, JWTs checked with the App's public key). `FakeGitHub` is also used by the ingest tests."""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import httpx
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from kici.orchestrator.providers.base import ProviderError
from kici.orchestrator.providers.github import GitHubProvider, InstallationTokens, app_jwt

APP_ID = 29310
INSTALLATION_ID = 1


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class FakeGitHub:
    """The few endpoints KiCI calls, answering like api.github.com."""

    def __init__(self, app_id: int = APP_ID) -> None:
        self.app_id = app_id
        self.private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private_key_pem = self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        self.installations: dict[str, int] = {}  # repo → installation id (for GET /repos/{r}/installation)
        self.files: dict[tuple[str, str], bytes] = {}  # (repo, sha) → lock file bytes
        self.compare: dict[tuple[str, str, str], list[str]] = {}  # (repo, base, head) → filenames
        self.refs: dict[tuple[str, str], str] = {}  # (repo, branch) → sha
        self.tokens: set[str] = set()
        self.token_requests: list[dict[str, Any]] = []
        """The JSON bodies of `POST …/access_tokens` ({} for none), in order."""
        self.token_scopes: dict[str, dict[str, Any]] = {}
        """Per minted token: `repositories` (None: every repository of the installation) and `permissions`."""
        self.app_permissions = {"contents": "write", "checks": "write", "metadata": "read", "pull_requests": "write"}
        self.hits: Counter[str] = Counter()
        self.fail_with: int | None = None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                fake.handle(self, "POST")

            def do_GET(self) -> None:
                fake.handle(self, "GET")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- helpers for tests
    def lock_fetches(self, repo: str | None = None) -> int:
        return sum(n for k, n in self.hits.items() if "/contents/" in k and (repo is None or f"/repos/{repo}/" in k))

    # -- request handling
    def _jwt_ok(self, auth: str | None) -> bool:
        if not auth or not auth.startswith("Bearer "):
            return False
        try:
            head, claims, sig = auth[len("Bearer ") :].split(".")
            self.private_key.public_key().verify(
                _b64url_decode(sig), f"{head}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
        except (ValueError, InvalidSignature):
            return False
        header = json.loads(_b64url_decode(head))
        body = json.loads(_b64url_decode(claims))
        now = time.time()
        return bool(
            header == {"alg": "RS256", "typ": "JWT"}
            and body["iss"] == str(self.app_id)
            and body["iat"] <= now
            and now < body["exp"] <= now + 600
        )

    def _not_found(self, h: Any, doc: str) -> None:
        h._send(
            404, {"message": "Not Found", "documentation_url": f"https://docs.github.com/rest/{doc}", "status": "404"}
        )

    def handle(self, h: Any, method: str) -> None:
        parsed = urlparse(h.path)
        path = unquote(parsed.path)
        query = parse_qs(parsed.query)
        self.hits[f"{method} {path}"] += 1
        if self.fail_with is not None:
            h._send(self.fail_with, {"message": "Server Error"})
            return
        parts = path.strip("/").split("/")
        if method == "POST" and parts[:2] == ["app", "installations"] and parts[3:] == ["access_tokens"]:
            if not self._jwt_ok(h.headers.get("Authorization")):
                h._send(401, {"message": "A JSON web token could not be decoded", "status": "401"})
                return
            length = int(h.headers.get("Content-Length") or 0)
            body = json.loads(h.rfile.read(length)) if length else {}
            self.token_requests.append(body)
            permissions = body.get("permissions") or dict(self.app_permissions)
            excess = {k: v for k, v in permissions.items() if self.app_permissions.get(k) not in (v, "write")}
            if excess:  # GitHub: a token cannot have more than the App was granted
                h._send(422, {"message": "The permissions requested are not granted to this installation.",
                              "status": "422"})
                return
            token = "ghs_" + secrets.token_hex(18)
            self.tokens.add(token)
            repositories = body.get("repositories")
            self.token_scopes[token] = {"repositories": repositories, "permissions": permissions}
            expires = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
            reply: dict[str, Any] = {
                "token": token,
                "expires_at": expires,
                "permissions": {**permissions, "metadata": "read"},
                "repository_selection": "selected" if repositories else "all",
            }
            if repositories:
                reply["repositories"] = [{"name": name, "private": True} for name in repositories]
            h._send(201, reply)
            return
        if method != "GET" or parts[0] != "repos" or len(parts) < 4:
            self._not_found(h, "")
            return
        repo = f"{parts[1]}/{parts[2]}"
        if parts[3] == "installation":
            if not self._jwt_ok(h.headers.get("Authorization")) or repo not in self.installations:
                self._not_found(h, "apps/apps#get-a-repository-installation-for-the-authenticated-app")
                return
            h._send(200, {"id": self.installations[repo], "app_id": self.app_id, "target_type": "Organization"})
            return
        auth = h.headers.get("Authorization") or ""
        if not auth.startswith("token ") or auth[len("token ") :] not in self.tokens:
            h._send(
                401,
                {"message": "Bad credentials", "documentation_url": "https://docs.github.com/rest", "status": "401"},
            )
            return
        rest = "/".join(parts[3:])
        if rest == "contents/.kici/kici.lock.json":
            ref = query.get("ref", [""])[0]
            content = self.files.get((repo, ref))
            if content is None:
                self._not_found(h, "repos/contents#get-repository-content")
                return
            encoded = base64.b64encode(content).decode()
            wrapped = "\n".join(encoded[i : i + 60] for i in range(0, len(encoded), 60)) + "\n"
            h._send(
                200,
                {
                    "type": "file",
                    "encoding": "base64",
                    "size": len(content),
                    "name": "kici.lock.json",
                    "path": ".kici/kici.lock.json",
                    "content": wrapped,
                    "sha": "b" * 40,
                    "url": f"{self.url}/repos/{repo}/contents/.kici/kici.lock.json?ref={ref}",
                    "git_url": None,
                    "html_url": None,
                    "download_url": None,
                    "_links": {},
                },
            )
            return
        if parts[3] == "compare" and len(parts) == 5 and "..." in parts[4]:
            base, head = parts[4].split("...", 1)
            files = self.compare.get((repo, base, head))
            if files is None:
                self._not_found(h, "commits/commits#compare-two-commits")
                return
            h._send(
                200,
                {
                    "status": "ahead",
                    "ahead_by": 1,
                    "behind_by": 0,
                    "total_commits": 1,
                    "commits": [],
                    "files": [
                        {
                            "sha": "c" * 40,
                            "filename": f,
                            "status": "modified",
                            "additions": 1,
                            "deletions": 0,
                            "changes": 1,
                        }
                        for f in files
                    ],
                },
            )
            return
        if parts[3] == "commits" and len(parts) == 5:
            sha = self.refs.get((repo, parts[4]))
            if sha is None:
                h._send(422, {"message": f"No commit found for SHA: {parts[4]}", "status": "422"})
                return
            h._send(200, {"sha": sha, "commit": {"message": "m"}, "parents": []})
            return
        self._not_found(h, "")


@pytest.fixture
def fake_github() -> Iterator[FakeGitHub]:
    fake = FakeGitHub()
    try:
        yield fake
    finally:
        fake.close()


def provider(
    fake: FakeGitHub,
    client: httpx.AsyncClient,
    tokens: InstallationTokens | None = None,
    installation_id: int | None = INSTALLATION_ID,
) -> GitHubProvider:
    return GitHubProvider(
        "src-1",
        client=client,
        tokens=tokens or InstallationTokens(),
        app_id=fake.app_id,
        private_key=fake.private_key_pem,
        installation_id=installation_id,
        api_url=fake.url,
    )


def test_app_jwt_is_rs256_with_github_claims() -> None:
    fake = FakeGitHub()
    try:
        token = app_jwt(APP_ID, fake.private_key_pem, now=1_700_000_000)
        head, claims, _ = token.split(".")
        assert json.loads(_b64url_decode(head)) == {"alg": "RS256", "typ": "JWT"}
        assert json.loads(_b64url_decode(claims)) == {
            "iat": 1_700_000_000 - 60,
            "exp": 1_700_000_000 + 540,
            "iss": str(APP_ID),
        }
        assert fake._jwt_ok("Bearer " + app_jwt(APP_ID, fake.private_key_pem))
        other = FakeGitHub()
        try:
            assert not other._jwt_ok("Bearer " + app_jwt(APP_ID, fake.private_key_pem)), "signed by another key"
        finally:
            other.close()
    finally:
        fake.close()
    with pytest.raises(ProviderError, match="PEM"):
        app_jwt(1, "not a key")


async def test_reads_lock_file_changed_files_and_refs(fake_github: FakeGitHub) -> None:
    repo, sha = "Codertocat/Hello-World", "a" * 40
    content = b'{"schemaVersion": 1}\n' * 50
    fake_github.files[(repo, sha)] = content
    fake_github.compare[(repo, "f" * 40, sha)] = ["src/b.py", "README.md"]
    fake_github.refs[(repo, "master")] = sha
    tokens = InstallationTokens()
    async with httpx.AsyncClient() as client:
        gh = provider(fake_github, client, tokens)
        assert gh.cache_prefix == "github:src-1"
        assert await gh.read_lock_file(repo, sha) == content
        assert await gh.read_lock_file(repo, "b" * 40) is None
        assert await gh.changed_files(repo, "f" * 40, sha) == ["README.md", "src/b.py"]
        assert await gh.resolve_ref(repo, "master") == sha
        assert await gh.resolve_ref(repo, "gone") is None
        # one installation token for all of it, reused by a second provider sharing the token cache
        await provider(fake_github, client, tokens).read_lock_file(repo, sha)
    assert fake_github.hits[f"POST /app/installations/{INSTALLATION_ID}/access_tokens"] == 1


async def test_clone_tokens_are_scoped_to_the_one_repository_with_contents_read(fake_github: FakeGitHub) -> None:
    """Issue 9, defect 4: the token that goes to agents opens one repository, read-only."""
    repo, sha = "Codertocat/Hello-World", "a" * 40
    fake_github.files[(repo, sha)] = b"{}"
    tokens = InstallationTokens()
    async with httpx.AsyncClient() as client:
        gh = provider(fake_github, client, tokens)
        await gh.read_lock_file(repo, sha)  # the orchestrator's own token: unscoped
        access = await gh.clone_access(repo)
        assert access.url.endswith("/Codertocat/Hello-World.git")
        assert fake_github.token_scopes[access.token] == {
            "repositories": ["Hello-World"], "permissions": {"contents": "read"},
        }
        assert fake_github.token_requests == [
            {}, {"repositories": ["Hello-World"], "permissions": {"contents": "read"}},
        ]
        own = next(t for t, scope in fake_github.token_scopes.items() if scope["repositories"] is None)
        assert own != access.token
        # cached per repository; another repository gets its own token
        assert (await gh.clone_access(repo)).token == access.token
        other = await gh.clone_access("Codertocat/Spoon-Knife")
        assert other.token != access.token
        assert fake_github.token_scopes[other.token]["repositories"] == ["Spoon-Knife"]
    assert len(fake_github.token_requests) == 3


async def test_installation_is_looked_up_when_not_known(fake_github: FakeGitHub) -> None:
    repo = "octo-org/octo-repo"
    fake_github.installations[repo] = 375706
    fake_github.files[(repo, "c" * 40)] = b"{}"
    async with httpx.AsyncClient() as client:
        assert await provider(fake_github, client, installation_id=None).read_lock_file(repo, "c" * 40) == b"{}"
        with pytest.raises(ProviderError, match="not installed"):
            await provider(fake_github, client, installation_id=None).read_lock_file("x/y", "c" * 40)
    assert fake_github.hits["POST /app/installations/375706/access_tokens"] == 1


async def test_errors_are_provider_errors(fake_github: FakeGitHub) -> None:
    async with httpx.AsyncClient() as client:
        gh = provider(fake_github, client)
        with pytest.raises(ProviderError, match="not a commit id"):
            await gh.read_lock_file("a/b", "../../etc")
        with pytest.raises(ProviderError, match="owner/name"):
            await gh.read_lock_file("a/b/c", "a" * 40)
        fake_github.fail_with = 500
        with pytest.raises(ProviderError, match="HTTP 500"):
            await gh.read_lock_file("a/b", "a" * 40)
        wrong_key = GitHubProvider(
            "s",
            client=client,
            tokens=InstallationTokens(),
            app_id=APP_ID,
            private_key=rsa.generate_private_key(public_exponent=65537, key_size=2048)
            .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            .decode(),
            installation_id=1,
            api_url=fake_github.url,
        )
        fake_github.fail_with = None
        with pytest.raises(ProviderError, match="refused an installation token"):
            await wrong_key.read_lock_file("a/b", "a" * 40)
        down = GitHubProvider(
            "s",
            client=client,
            tokens=InstallationTokens(),
            app_id=APP_ID,
            private_key=fake_github.private_key_pem,
            installation_id=1,
            api_url="http://127.0.0.1:9",
        )
        with pytest.raises(ProviderError, match="unreachable"):
            await down.read_lock_file("a/b", "a" * 40)
