"""The GitHub App provider against a local fake of GitHub's REST API (real HTTP on a free port, GitHub's
response shapes, JWTs checked with the App's public key). `FakeGitHub` is also used by the ingest tests."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import secrets
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
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
        self.repositories: dict[str, dict[str, Any]] = {}  # repo → fields of GET /repos/{r} (default_branch)
        self.installation_repos: dict[int, list[str]] = {}  # installation id → repos (GET /installation/repositories)
        self.tokens: set[str] = set()
        self.token_installations: dict[str, int] = {}  # token → the installation it was minted for
        self.token_requests: list[dict[str, Any]] = []
        """The JSON bodies of `POST …/access_tokens` ({} for none), in order."""
        self.token_scopes: dict[str, dict[str, Any]] = {}
        """Per minted token: `repositories` (None: every repository of the installation) and `permissions`."""
        self.app_permissions = {"contents": "write", "checks": "write", "metadata": "read", "pull_requests": "write"}
        self.pulls: dict[tuple[str, int], str] = {}  # (repo, number) → head sha (GET /repos/{r}/pulls/{n})
        self.team_members: dict[str, dict[str, str]] = {}  # "org/slug" → login → state (active | pending)
        self.hits: Counter[str] = Counter()
        self.fail_with: int | None = None
        # check runs (the reporting tests): what was asked for, and what exists
        self.check_runs: dict[int, dict[str, Any]] = {}  # id → the check run as GitHub would show it
        self.check_calls: list[tuple[str, int | None, dict[str, Any]]] = []  # (POST|PATCH, id, body), answered 2xx
        self.check_failures: list[tuple[int, dict[str, str]]] = []  # answers given before behaving again
        self.check_calls_changed = threading.Condition()
        self._lock = threading.Lock()
        # git over HTTPS as github.com serves it (smart HTTP through `git http-backend`), for real agents
        self.git_repos: dict[str, Path] = {}  # "owner/name" → a repository on disk
        self.git_auth: list[str] = []  # the installation tokens clones presented
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

            def do_PATCH(self) -> None:
                fake.handle(self, "PATCH")

            def body(self) -> Any:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                return json.loads(raw) if raw else None

            def do_GET(self) -> None:
                fake.handle(self, "GET")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- git smart HTTP (what an agent's clone talks to)
    def _git(self, h: Any, method: str, repo: str, rest: str, query: str) -> None:
        auth = h.headers.get("Authorization") or ""
        token = ""
        if auth.startswith("Basic "):
            user, _, token = base64.b64decode(auth[len("Basic "):]).decode().partition(":")
            token = token if user == "x-access-token" else ""
        if token not in self.tokens:
            h.send_response(401)
            h.send_header("WWW-Authenticate", 'Basic realm="GitHub"')
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        self.git_auth.append(token)
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        root = self.git_repos[repo]
        env = {
            "PATH": os.environ.get("PATH", ""), "GIT_PROJECT_ROOT": str(root.parent), "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": f"/{root.name}{rest}", "QUERY_STRING": query, "REQUEST_METHOD": method,
            "CONTENT_TYPE": h.headers.get("Content-Type") or "", "CONTENT_LENGTH": str(len(body)),
            "GIT_PROTOCOL": h.headers.get("Git-Protocol") or "", "REMOTE_ADDR": "127.0.0.1",
            "HTTP_CONTENT_ENCODING": h.headers.get("Content-Encoding") or "",
        }
        done = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True, timeout=60)
        head, _, payload = done.stdout.partition(b"\r\n\r\n")
        status = 200
        headers: list[tuple[str, str]] = []
        for line in head.decode("latin-1").split("\r\n"):
            key, _, value = line.partition(":")
            if key.lower() == "status":
                status = int(value.strip().split()[0])
            elif key:
                headers.append((key, value.strip()))
        h.send_response(status)
        for key, value in headers:
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    # -- check runs (POST /repos/{o}/{r}/check-runs, PATCH /repos/{o}/{r}/check-runs/{id})
    def _check_run(self, h: Any, method: str, repo: str, check_run_id: int | None) -> None:
        body = h.body() or {}
        token = (h.headers.get("Authorization") or "").removeprefix("token ")
        scope = self.token_scopes.get(token)
        if token not in self.tokens or scope is None:
            h._send(401, {"message": "Bad credentials", "documentation_url": "https://docs.github.com/rest"})
            return
        if scope.get("permissions") != {"checks": "write"} or scope.get("repositories") != [repo.split("/")[1]]:
            h._send(403, {"message": "Resource not accessible by integration", "status": "403"})
            return
        with self._lock:
            if self.check_failures:
                status, headers = self.check_failures.pop(0)
                data = json.dumps({"message": "Server Error" if status >= 500 else "API rate limit exceeded"}).encode()
                h.send_response(status)
                for key, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                                   **headers}.items():
                    h.send_header(key, value)
                h.end_headers()
                h.wfile.write(data)
                return
            if method == "POST":
                missing = [k for k in ("name", "head_sha") if not body.get(k)]
                if missing:
                    h._send(422, {"message": "Invalid request.", "errors": [f"{missing[0]} wasn't supplied."]})
                    return
                check_run_id = len(self.check_runs) + 1000
                self.check_runs[check_run_id] = {"id": check_run_id, "node_id": f"CR_{check_run_id}",
                                                 "html_url": f"https://github.com/{repo}/runs/{check_run_id}",
                                                 "app": {"id": self.app_id}, "repo": repo, **body}
                status = 201
            elif check_run_id not in self.check_runs:
                self._not_found(h, "checks/runs#update-a-check-run")
                return
            else:
                self.check_runs[check_run_id].update(body)
                status = 200
            if body.get("conclusion") and body.get("status") not in (None, "completed"):
                h._send(422, {"message": "Invalid request.", "errors": ["conclusion needs status completed"]})
                return
            answer = dict(self.check_runs[check_run_id])
        with self.check_calls_changed:
            self.check_calls.append((method, check_run_id, body))
            self.check_calls_changed.notify_all()
        h._send(status, answer)

    def wait_check_calls(self, predicate: Any, timeout: float = 20.0) -> list[tuple[str, int | None, dict[str, Any]]]:
        """Wait (bounded) until `predicate(check_calls)` holds; the calls."""
        deadline = time.monotonic() + timeout
        with self.check_calls_changed:
            while not predicate(self.check_calls):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"fake GitHub: condition not met in {timeout}s; calls: {self.check_calls}")
                self.check_calls_changed.wait(left)
            return list(self.check_calls)

    def check_run_named(self, name: str) -> dict[str, Any]:
        found = [c for c in self.check_runs.values() if c.get("name") == name]
        assert len(found) == 1, (name, [c.get("name") for c in self.check_runs.values()])
        return found[0]

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

    def _installation_for_token(self, h: Any) -> int | None:
        auth = h.headers.get("Authorization") or ""
        token = auth[len("token "):] if auth.startswith("token ") else ""
        return self.token_installations.get(token)

    def _repo_body(self, repo: str) -> dict[str, Any]:
        owner, name = repo.split("/")
        fields = self.repositories.get(repo, {})
        return {
            "id": abs(hash(repo)) % 10**9, "node_id": "R_x", "name": name, "full_name": repo, "private": True,
            "owner": {"login": owner, "id": 1, "type": "Organization"},
            "html_url": f"https://github.com/{repo}", "default_branch": fields.get("default_branch", "main"),
            "visibility": "private", **fields,
        }

    def _repository(self, h: Any, repo: str) -> None:
        """`GET /repos/{owner}/{repo}` with an installation token that can see the repository."""
        installation = self._installation_for_token(h)
        if installation is None or self.installations.get(repo) != installation or repo not in self.repositories:
            self._not_found(h, "repos/repos#get-a-repository")
            return
        h._send(200, self._repo_body(repo))

    def _installation_repositories(self, h: Any, query: dict[str, list[str]]) -> None:
        """`GET /installation/repositories` (paged by `per_page`/`page`) with an installation token."""
        installation = self._installation_for_token(h)
        if installation is None:
            h._send(401, {"message": "Bad credentials", "documentation_url": "https://docs.github.com/rest",
                          "status": "401"})
            return
        repos = self.installation_repos.get(installation, [])
        per_page = int(query.get("per_page", ["30"])[0])
        page = int(query.get("page", ["1"])[0])
        chunk = repos[(page - 1) * per_page : page * per_page]
        h._send(200, {"total_count": len(repos), "repository_selection": "selected",
                      "repositories": [self._repo_body(r) for r in chunk]})

    def _team_membership(self, h: Any, team: str, login: str) -> None:
        """`GET /orgs/{org}/teams/{slug}/memberships/{user}` with an installation token (404: not a member)."""
        auth = h.headers.get("Authorization") or ""
        if not auth.startswith("token ") or auth[len("token ") :] not in self.tokens:
            h._send(401, {"message": "Bad credentials", "status": "401"})
            return
        state = self.team_members.get(team, {}).get(login)
        if state is None:
            self._not_found(h, "teams/members#get-team-membership-for-a-user")
            return
        h._send(200, {"url": f"{self.url}/orgs/{team.split('/')[0]}/team/memberships/{login}", "role": "member",
                      "state": state})

    def handle(self, h: Any, method: str) -> None:
        parsed = urlparse(h.path)
        path = unquote(parsed.path)
        query = parse_qs(parsed.query)
        served = re.fullmatch(r"/([^/]+/[^/]+)\.git(/.*)", path)
        if served and served.group(1) in self.git_repos:
            self._git(h, method, served.group(1), served.group(2), parsed.query)
            return
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
            if parts[2].isdigit():
                self.token_installations[token] = int(parts[2])
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
        if parts[0] == "repos" and len(parts) in (4, 5) and parts[3] == "check-runs" and method in ("POST", "PATCH"):
            self._check_run(h, method, f"{parts[1]}/{parts[2]}", int(parts[4]) if len(parts) == 5 else None)
            return
        if method == "GET" and parts == ["installation", "repositories"]:
            self._installation_repositories(h, query)
            return
        if method == "GET" and len(parts) == 6 and (parts[0], parts[2], parts[4]) == ("orgs", "teams", "memberships"):
            self._team_membership(h, f"{parts[1]}/{parts[3]}", parts[5])
            return
        if method != "GET" or parts[0] != "repos" or len(parts) < 3:
            self._not_found(h, "")
            return
        repo = f"{parts[1]}/{parts[2]}"
        if len(parts) == 3:
            self._repository(h, repo)
            return
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
        if parts[3] == "pulls" and len(parts) == 5 and parts[4].isdigit():
            head = self.pulls.get((repo, int(parts[4])))
            if head is None:
                self._not_found(h, "pulls/pulls#get-a-pull-request")
                return
            h._send(200, {"number": int(parts[4]), "state": "open", "head": {"sha": head, "ref": "changes"},
                          "base": {"ref": "master"}})
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


async def test_pull_request_head_and_team_membership(fake_github: FakeGitHub) -> None:
    repo = "Codertocat/Hello-World"
    fake_github.pulls[(repo, 2)] = "c" * 40
    fake_github.team_members["octo-org/maintainers"] = {"erin": "active", "frank": "pending"}
    async with httpx.AsyncClient() as client:
        gh = provider(fake_github, client)
        assert await gh.pull_request_head(repo, 2) == "c" * 40
        assert await gh.pull_request_head(repo, 3) is None
        assert await gh.team_member(repo, "octo-org/maintainers", "erin")
        assert not await gh.team_member(repo, "octo-org/maintainers", "frank")  # invited, not yet a member
        assert not await gh.team_member(repo, "octo-org/maintainers", "mallory")
        assert not await gh.team_member(repo, "octo-org/other", "erin")
        fake_github.fail_with = 502
        with pytest.raises(ProviderError, match="team membership API: HTTP 502"):
            await gh.team_member(repo, "octo-org/maintainers", "erin")
        with pytest.raises(ProviderError, match="pulls API: HTTP 502"):
            await gh.pull_request_head(repo, 2)
