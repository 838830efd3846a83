"""Declared secrets with the real processes: `kici-admin secret set`, a commit whose job declares
`secrets=[...]`, the orchestrator resolving them at dispatch and the real agent handing them to the step —
masked in the stored logs (a multi-line value line by line, its base64 form too), absent from jobs that
declare nothing, never written to the agent's disk or its log; `kici-admin runs show` names them and
their scopes. SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import kici_env

from .conftest import OWNER_TOKEN, WORKFLOW_HEADER, System

TOKEN = "pypi-AgEIcHlwaS5vcmc-e2e-secret-token"
KEY_LINES = ["-----BEGIN KEY-----", "c2VjcmV0LWxpbmUtb25lLWFiY2RlZg", "second-line-of-the-key-XYZ", "-----END KEY-----"]

WORKFLOW = WORKFLOW_HEADER + '''
import base64
import hashlib


@step
def use(ctx: Context) -> dict[str, str]:
    token = ctx.secrets.get("PYPI_TOKEN")
    key = ctx.secrets.get("DEPLOY_KEY")
    print("token:", token)
    print("b64:", base64.b64encode(token.encode()).decode())
    print("key follows")
    print(key)
    ctx.sh('echo "not exported: ${PYPI_TOKEN:-absent}"')
    return {"token_sha": hashlib.sha256(token.encode()).hexdigest(), "names": ",".join(sorted(ctx.secrets.list()))}


@step
def names(ctx: Context) -> dict[str, str]:
    return {"names": ",".join(sorted(ctx.secrets.list())) or "none"}


deploy = job("deploy", secrets=["PYPI_TOKEN", "DEPLOY_KEY"], steps=[use])
other = job("other", steps=[names])

ci = workflow("ci", on=[push(branches=["main"])], jobs=[deploy, other])
'''


def _set_secret(system: System, name: str, scope: str, value: str, tmp: Path) -> None:
    path = tmp / f"{name}.value"
    path.write_text(value + "\n")  # one final newline is dropped
    env = kici_env({"KICI_ADMIN_URL": system.url, "KICI_ADMIN_TOKEN": OWNER_TOKEN})
    done = subprocess.run([sys.executable, "-m", "kici.admin", "secret", "set", name, "--scope", scope,
                           "--from-file", str(path)], env=env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    path.unlink()


def _files_containing(root: Path, needle: bytes) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if needle in path.read_bytes():
                    found.append(path)
            except OSError:
                continue
    return found


def test_declared_secrets_reach_the_step_masked(system: System, tmp_path: Path) -> None:
    system.start_orchestrator(KICI_SECRET_KEY=os.urandom(32).hex())
    system.register_source()
    secrets_dir = tmp_path / "values"
    secrets_dir.mkdir()
    _set_secret(system, "PYPI_TOKEN", "org", "org-value-not-this-one", secrets_dir)
    _set_secret(system, "PYPI_TOKEN", "repo:acme/app", TOKEN, secrets_dir)
    _set_secret(system, "DEPLOY_KEY", "org", "\n".join(KEY_LINES), secrets_dir)
    _set_secret(system, "UNDECLARED", "org", "undeclared-value-e2e", secrets_dir)
    agent = system.start_agent("a1")
    sha = system.commit({".kici/workflows/ci.py": WORKFLOW}, "deploy with secrets")
    run = system.wait_run(sha, "success", "failed")
    assert run["status"] == "success", system.diagnostics()
    jobs = system.jobs(run["id"])
    # the step had the repo-scoped value (not the org one) and only the declared names
    assert jobs["deploy"]["outputs"] == {"use": {"token_sha": hashlib.sha256(TOKEN.encode()).hexdigest(),
                                                 "names": "DEPLOY_KEY,PYPI_TOKEN"}}
    assert jobs["other"]["outputs"] == {"names": {"names": "none"}}
    log = system.log_lines(run["id"], "deploy")
    text = "\n".join(log)
    assert "token: ***" in log and "b64: ***" in log, log
    assert "key follows" in log and "not exported: absent" in log, log
    for secret in [TOKEN, *KEY_LINES[1:3], "org-value-not-this-one"]:
        assert secret not in text, (secret, log)
    # the delivery is recorded and shown, names and scopes only
    shown = system.kici_admin("runs", "show", run["id"])
    assert shown.returncode == 0, shown.stderr
    assert "secrets: DEPLOY_KEY (org), PYPI_TOKEN (repo:acme/app)" in shown.stdout
    assert TOKEN not in shown.stdout
    # never on the agent's disk, never in its log
    assert _files_containing(agent.work_dir, TOKEN.encode()) == []
    assert _files_containing(agent.work_dir, KEY_LINES[2].encode()) == []
    assert TOKEN not in agent.output() and KEY_LINES[2] not in agent.output()
