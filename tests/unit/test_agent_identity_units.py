"""The agent's token hand-over pipe and step-user resolution, in-process (the real-process behaviour is in
tests/integration/agent/test_token_secrecy.py)."""

from __future__ import annotations

import os
import sys

import pytest

from kici.agent import secrecy, step_user
from kici.agent.config import SettingsError, load_settings


def test_the_token_pipe_is_read_once_and_closed() -> None:
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"  kat_abc\n")
    os.close(write_fd)
    assert secrecy.read_token_fd(str(read_fd)) == "kat_abc"
    with pytest.raises(OSError):
        os.fstat(read_fd)  # closed: nothing of this process still holds the token's pipe


@pytest.mark.parametrize("raw, message", [("x", "needs a file descriptor number"), ("99999", "Bad file descriptor")])
def test_bad_token_fds_are_clear_errors(raw: str, message: str) -> None:
    with pytest.raises(secrecy.SecrecyError, match=message):
        secrecy.read_token_fd(raw)


def test_an_empty_pipe_is_refused() -> None:
    read_fd, write_fd = os.pipe()
    os.close(write_fd)
    with pytest.raises(secrecy.SecrecyError, match="no token was handed over"):
        secrecy.read_token_fd(str(read_fd))


def test_no_reexec_without_the_variable() -> None:
    assert secrecy.reexec_without_token({"PATH": "/bin", "KICI_AGENT_TOKEN": "  "}, []) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux-only")
def test_non_dumpable_in_a_child_process() -> None:
    import subprocess

    code = ("from kici.agent import secrecy as s; assert s.is_dumpable(); s.make_non_dumpable(); "
            "assert not s.is_dumpable()")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_step_user_is_ignored_unless_root() -> None:
    assert step_user.resolve("", euid=1000) == (None, [])
    user, warnings = step_user.resolve("nobody", euid=1000)
    assert user is None and "ignored" in warnings[0]


def test_root_steps_on_purpose_and_unknown_users() -> None:
    assert step_user.resolve("root", euid=0) == (None, [])
    assert step_user.resolve("0", euid=0) == (None, [])
    with pytest.raises(step_user.StepUserError, match="no user 'no-such-user-kici'"):
        step_user.resolve("no-such-user-kici", euid=0)


def test_identity_env_of_a_step_user() -> None:
    assert step_user.identity_env(None) == {}
    env = step_user.identity_env(step_user.StepUser("kici-step", 990, 990, "/nonexistent-home"))
    assert env == {"HOME": "/tmp", "USER": "kici-step", "LOGNAME": "kici-step"}


def test_token_settings(tmp_path: os.PathLike[str]) -> None:
    from pathlib import Path

    base = {"KICI_ORCHESTRATOR_URL": "http://o:4000", "KICI_WORK_DIR": str(Path(tmp_path) / "work")}
    token_file = Path(tmp_path) / "token"
    token_file.write_text("kat_fromfile\n")
    settings, _ = load_settings({**base, "KICI_AGENT_TOKEN_FILE": str(token_file)})
    assert settings.agent_token.get_secret_value() == "kat_fromfile"
    settings, _ = load_settings(base, token="kat_handed")
    assert settings.agent_token.get_secret_value() == "kat_handed"
    with pytest.raises(SettingsError) as missing:
        load_settings(base)
    assert missing.value.lines == ["KICI_AGENT_TOKEN: is required (or set KICI_AGENT_TOKEN_FILE)"]
    with pytest.raises(SettingsError) as both:
        load_settings({**base, "KICI_AGENT_TOKEN_FILE": str(token_file)}, token="kat_x")
    assert "not both" in both.value.lines[0] and "kat_" not in "".join(both.value.lines)
