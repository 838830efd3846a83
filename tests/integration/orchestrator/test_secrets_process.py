"""Secrets end to end with real processes: `kici-admin secret set|list|delete` (value on stdin or from a
file, never argv) against a real `kici-orchestrator`, then a key rotation done online — the orchestrator
restarted with the new key and `KICI_SECRET_KEY_OLD`, serving webhooks (whose source secret it must open)
while `kici-admin rotate-key` runs — and a restart without the old key after which everything still opens."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import secrets
import select
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import httpx

from kici.orchestrator.crypto import Keyring, key_id
from kici.orchestrator.db.database import Database
from kici.orchestrator.store import secrets as secret_store
from kici.orchestrator.store.sources import get_source_by_name, load_source_secrets
from tests.conftest import kici_env

from .conftest import OrchestratorProcess, StartOrchestrator

TOKEN = "pinned-owner-token-for-secrets"
VALUE = "s3cr3t-" + secrets.token_hex(8)
PEM = "-----BEGIN KEY-----\n" + secrets.token_hex(16) + "\n-----END KEY-----"
BEARER = "bearer-" + secrets.token_hex(8)


def admin(url: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kici.admin", *args],
        env=kici_env({"KICI_ADMIN_URL": url, "KICI_ADMIN_TOKEN": TOKEN}),
        input=stdin if stdin is not None else "", capture_output=True, text=True, timeout=60, check=False,
    )


def webhook(url: str) -> int:
    response = httpx.post(f"{url}/webhook/default/generic/hooks", json={"ping": 1},
                          headers={"Authorization": f"Bearer {BEARER}", "X-Event-Type": "ping"}, timeout=10)
    return response.status_code


def start(start_orchestrator: StartOrchestrator, env: dict[str, str]) -> OrchestratorProcess:
    orchestrator = start_orchestrator({"KICI_BOOTSTRAP_ADMIN_TOKEN": TOKEN, **env})
    orchestrator.wait_for_event("orchestrator.ready")
    return orchestrator


async def _set_under_another_key(database_url: str) -> None:
    database = Database.connect(database_url)
    try:
        async with database.transaction() as conn:
            await secret_store.set_secret(conn, Keyring(bytes(32)), name="LOST", scope="org", value="unreadable")
    finally:
        await database.close()


async def _open_all(database_url: str, keys: Keyring) -> tuple[dict[str, str | None], dict[str, str]]:
    database = Database.connect(database_url)
    try:
        async with database.read() as conn:
            values = {
                "PYPI_TOKEN": await secret_store.open_secret(conn, keys, name="PYPI_TOKEN", scope="org"),
                "DEPLOY_KEY": await secret_store.open_secret(conn, keys, name="DEPLOY_KEY", scope="env:production"),
            }
            source = await get_source_by_name(conn, "default", "hooks")
            assert source is not None
            return values, await load_source_secrets(conn, source.id, keys)
    finally:
        await database.close()


def test_secrets_and_an_online_key_rotation(start_orchestrator: StartOrchestrator, database_url: str,
                                           tmp_path: Path) -> None:
    data = tmp_path / "data"
    old_key, new_key = secrets.token_hex(32), secrets.token_hex(32)
    new_key_file = tmp_path / "new-key"
    new_key_file.write_text(new_key + "\n")
    base = {"KICI_DATA_DIR": str(data), "KICI_DATABASE_URL": database_url}
    seen: list[str] = []  # every output of every process, checked for values at the end

    first = start(start_orchestrator, {**base, "KICI_SECRET_KEY": old_key})
    try:
        url = first.url
        made = admin(url, "secret", "set", "PYPI_TOKEN", "--scope", "org", stdin=VALUE + "\n")
        assert made.returncode == 0, made.stderr
        assert made.stdout.startswith("Created secret PYPI_TOKEN in scope org (fingerprint ")
        pem = tmp_path / "deploy.pem"
        pem.write_text(PEM + "\n")
        from_file = admin(url, "secret", "set", "DEPLOY_KEY", "--scope", "env:production", "--from-file", str(pem),
                          "--json")
        assert from_file.returncode == 0, from_file.stderr
        assert json.loads(from_file.stdout)["created"] is True
        # A value on the command line is refused without being echoed.
        refused = admin(url, "secret", "set", "OTHER", VALUE, "--scope", "org")
        assert refused.returncode == 2 and "never taken from the command line" in refused.stderr
        gone = admin(url, "secret", "set", "GONE", "--scope", "repo:acme/app", stdin="x")
        deleted = admin(url, "secret", "delete", "GONE", "--scope", "repo:acme/app")
        assert (gone.returncode, deleted.returncode) == (0, 0), deleted.stderr
        assert deleted.stdout.strip() == "Deleted secret GONE from scope repo:acme/app."
        listed = admin(url, "secret", "list", "--json")
        assert [(s["name"], s["scope"]) for s in json.loads(listed.stdout)] == [
            ("DEPLOY_KEY", "env:production"), ("PYPI_TOKEN", "org")]
        table = admin(url, "secret", "list", "--scope", "org")
        assert "PYPI_TOKEN" in table.stdout and "DEPLOY_KEY" not in table.stdout
        source = httpx.post(f"{url}/api/v1/admin/sources", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10,
                            json={"kind": "generic", "name": "hooks", "config": {"auth": "bearer_token"},
                                  "secrets": {"bearer_token": BEARER}})
        assert source.status_code == 201, source.text
        accepted = webhook(url)
        assert accepted in (200, 202), accepted  # authenticated with the source secret (filtered or queued)
        seen += [p.stdout + p.stderr for p in (made, from_file, refused, gone, deleted, listed, table)]
    finally:
        assert first.stop() == 0
        seen.append(first.stderr)

    # The new key, with the old one for what it sealed: everything keeps working before the rotation.
    rotating = start(start_orchestrator, {**base, "KICI_SECRET_KEY_FILE": str(new_key_file),
                                          "KICI_SECRET_KEY_OLD": old_key})
    statuses: list[int] = []
    stop = threading.Event()

    def keep_sending() -> None:
        while not stop.is_set():
            statuses.append(webhook(rotating.url))

    sender = threading.Thread(target=keep_sending)
    try:
        loaded = rotating.wait_for_event("secret_key.loaded")
        assert (loaded["key_id"], loaded["old_key_id"]) == (key_id(bytes.fromhex(new_key)),
                                                            key_id(bytes.fromhex(old_key)))
        assert webhook(rotating.url) == accepted
        sender.start()
        rotated = admin(rotating.url, "rotate-key", "--json")
        assert rotated.returncode == 0, rotated.stderr
        result = json.loads(rotated.stdout)
        assert (result["secrets_resealed"], result["source_secrets_resealed"]) == (2, 1), result
        assert (result["failed"], result["remaining"]) == ([], 0)
        stop.set()
        sender.join(timeout=30)
        assert statuses and set(statuses) == {accepted}, statuses
        # A value under a third key: named, left alone, exit 1; deleting it lets the rotation finish.
        asyncio.run(_set_under_another_key(database_url))
        stuck = admin(rotating.url, "rotate-key")
        assert stuck.returncode == 1 and "cannot open secret LOST (org)" in stuck.stderr, stuck.stderr
        assert "1 values are still sealed under another key" in stuck.stderr
        assert admin(rotating.url, "secret", "delete", "LOST", "--scope", "org").returncode == 0
        again = admin(rotating.url, "rotate-key")
        assert again.returncode == 0 and "Nothing remains under another key" in again.stdout, again.stdout
        audit_rows = admin(rotating.url, "audit", "list", "--json")
        actions = [r["action"] for r in json.loads(audit_rows.stdout)]
        assert actions.count("key.rotate") == 3 and actions.count("secret.set") == 3
        assert actions.count("secret.delete") == 2
        seen += [rotated.stdout, rotated.stderr, audit_rows.stdout]
    finally:
        stop.set()
        if sender.is_alive():
            sender.join(timeout=30)
        assert rotating.stop() == 0
        seen.append(rotating.stderr)

    # The old key removed: the values, the source's secret and the webhook still work.
    after = start(start_orchestrator, {**base, "KICI_SECRET_KEY_FILE": str(new_key_file)})
    try:
        assert webhook(after.url) == accepted
        listed = admin(after.url, "secret", "list", "--json")
        assert len(json.loads(listed.stdout)) == 2
        seen.append(listed.stdout)
    finally:
        assert after.stop() == 0
        seen.append(after.stderr)
    values, source_secrets = asyncio.run(_open_all(database_url, Keyring(bytes.fromhex(new_key))))
    assert values == {"PYPI_TOKEN": VALUE, "DEPLOY_KEY": PEM}
    assert source_secrets == {"bearer_token": BEARER}
    for output in seen:
        assert VALUE not in output and PEM not in output and "-----BEGIN KEY" not in output and BEARER not in output
        assert old_key not in output and new_key not in output


def _read_until(fd: int, wanted: bytes, seen: bytearray, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {wanted!r} in {bytes(seen)!r}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            assert chunk, f"terminal closed before {wanted!r}: {bytes(seen)!r}"
            seen += chunk


def test_secret_set_prompts_without_echo_on_a_terminal(start_orchestrator: StartOrchestrator, tmp_path: Path) -> None:
    orchestrator = start(start_orchestrator, {"KICI_DATA_DIR": str(tmp_path / "data")})
    master, slave = pty.openpty()

    def controlling_terminal() -> None:  # the prompt reads /dev/tty: make the pty the child's terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [sys.executable, "-m", "kici.admin", "secret", "set", "TYPED", "--scope", "org"],
        env=kici_env({"KICI_ADMIN_URL": orchestrator.url, "KICI_ADMIN_TOKEN": TOKEN}),
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True, preexec_fn=controlling_terminal,
    )
    os.close(slave)
    seen = bytearray()
    try:
        _read_until(master, b"Value:", seen)
        os.write(master, VALUE.encode() + b"\n")
        _read_until(master, b"confirmation:", seen)
        os.write(master, VALUE.encode() + b"\n")
        _read_until(master, b"(fingerprint ", seen)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        orchestrator.stop()
    assert b"Created secret TYPED in scope org" in seen
    assert VALUE.encode() not in seen  # typed without echo
    values = asyncio.run(_open_typed(str(tmp_path / "data" / "kici.db")))
    assert values == VALUE


async def _open_typed(sqlite_path: str) -> str | None:
    database = Database.connect(f"sqlite:///{sqlite_path}")
    try:
        key = bytes.fromhex((Path(sqlite_path).parent / "secret-key").read_text().strip())
        async with database.read() as conn:
            return await secret_store.open_secret(conn, Keyring(key), name="TYPED", scope="org")
    finally:
        await database.close()
