"""Settings: precedence (env > YAML > shared > defaults), validation messages, unknown variables.

Reference behaviours 34 (unknown KICI_* variable), 35 (platform mode needs its relay settings) and 36
(precedence; here env beats YAML beats the defaults, the YAML file standing in for the DB layer).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kici.orchestrator.config import (
    Settings,
    SettingsError,
    default_data_dir,
    known_env_names,
    load_settings,
)

KEY = "ab" * 32


def load(env: dict[str, str], **kw: object) -> Settings:
    return load_settings({"HOME": "/home/op", **env}, **kw)  # type: ignore[arg-type]


def error_lines(env: dict[str, str], **kw: object) -> list[str]:
    with pytest.raises(SettingsError) as caught:
        load(env, **kw)
    return caught.value.lines


def test_defaults_are_the_embedded_default() -> None:
    settings = load({})
    assert settings.mode == "independent"
    assert settings.data_dir == Path("/home/op/.local/share/kici")
    assert settings.database_url == "sqlite:////home/op/.local/share/kici/kici.db"
    assert (settings.host, settings.port, settings.base_path) == ("127.0.0.1", 4000, "")
    assert settings.auto_migrate is True and settings.dev is False
    assert settings.secret_key is None and settings.bootstrap_admin_token is None
    assert (settings.log_level, settings.log_format) == ("info", "auto")
    assert settings.queue_max_depth == 1000
    assert settings.queue_timeout_ms == 3_600_000
    assert settings.dispatch_ack_timeout_ms == 10_000
    assert settings.dispatch_max_attempts == 5
    assert settings.job_heartbeat_interval_ms == 60_000
    assert settings.stale_detector_threshold_multiplier == 2
    assert settings.heartbeat_stale_after_ms == 120_000
    assert settings.agent_max_reconnect_delay_ms == 60_000
    assert settings.lockfile_cache_max == 500
    assert settings.lockfile_cache_ttl_ms == 3_600_000
    assert settings.dedup_ttl_seconds == 86_400
    assert settings.max_log_size_bytes == 10 * 1024 * 1024


def test_data_dir_follows_xdg_and_the_database_follows_the_data_dir(tmp_path: Path) -> None:
    assert load({"XDG_DATA_HOME": "/xdg"}).data_dir == Path("/xdg/kici")
    assert default_data_dir({"XDG_DATA_HOME": "relative", "HOME": "/h"}) == Path("/h/.local/share/kici")
    settings = load({"KICI_DATA_DIR": str(tmp_path)})
    assert settings.data_dir == tmp_path
    assert settings.database_url == f"sqlite:///{tmp_path}/kici.db"
    assert load({"KICI_DATABASE_URL": "postgresql://kici@db/kici"}).database_url == "postgresql://kici@db/kici"


def test_every_field_is_documented() -> None:
    assert all(info.description for info in Settings.model_fields.values())


# -- behaviour 34: unknown variables ------------------------------------------------------------------


def test_unknown_variable_refuses_with_a_suggestion() -> None:
    [line] = error_lines({"KICI_QUEUE_MAX_DEPHT": "5"})
    assert "unknown variable KICI_QUEUE_MAX_DEPHT" in line
    assert "did you mean KICI_QUEUE_MAX_DEPTH?" in line
    assert "KICI_DEV=true" in line


def test_unknown_variable_without_close_match_points_to_the_reference() -> None:
    [line] = error_lines({"KICI_ZZZZZZZZZZZZ": "1"})
    assert "KICI_ZZZZZZZZZZZZ" in line and "configuration.md" in line


def test_dev_mode_only_warns_about_unknown_variables() -> None:
    settings = load({"KICI_FOOO": "1", "KICI_DEV": "true"})
    assert settings.dev is True
    [warning] = settings.load_warnings
    assert "KICI_FOOO" in warning and "did you mean" in warning


@pytest.mark.parametrize(
    "name", ["KICI_TEST_DATABASE_URL", "KICI_ADMIN_TOKEN", "KICI_ADMIN_URL", "KICI_AGENT_ENV_FOO", "KICI_ENV"]
)
def test_other_tools_variables_are_exempt(name: str) -> None:
    assert load({name: "x"}).load_warnings == ()


# -- behaviour 35: modes ------------------------------------------------------------------------------


def test_platform_mode_without_relay_settings_names_both() -> None:
    [line] = error_lines({"KICI_MODE": "platform"})
    assert "KICI_PLATFORM_URL" in line and "KICI_PLATFORM_TOKEN" in line


def test_hybrid_mode_names_the_missing_one() -> None:
    [line] = error_lines({"KICI_MODE": "hybrid", "KICI_PLATFORM_URL": "wss://relay.example"})
    assert "missing: KICI_PLATFORM_TOKEN" in line


def test_platform_mode_with_relay_settings_loads() -> None:
    settings = load({"KICI_MODE": "Platform", "KICI_PLATFORM_URL": "wss://relay.example", "KICI_PLATFORM_TOKEN": "t"})
    assert settings.mode == "platform"
    assert settings.platform_token is not None and settings.platform_token.get_secret_value() == "t"


def test_independent_boots_with_only_a_database_url_and_a_key() -> None:
    settings = load({"KICI_DATABASE_URL": "postgresql://kici@db/kici", "KICI_SECRET_KEY": KEY})
    assert settings.mode == "independent"
    assert settings.secret_key is not None and settings.secret_key.get_secret_value() == KEY


def test_mode_problem_is_reported_alongside_field_errors() -> None:
    lines = error_lines({"KICI_MODE": "platform", "KICI_PORT": "abc"})
    assert any(line.startswith("KICI_PORT:") for line in lines)
    assert any("KICI_PLATFORM_URL" in line for line in lines)


# -- behaviour 36: precedence -------------------------------------------------------------------------


def test_env_beats_yaml_beats_default(tmp_path: Path) -> None:
    config = tmp_path / "orchestrator.yaml"
    config.write_text("queue_max_depth: 500\n")
    assert load({"KICI_CONFIG": str(config), "KICI_QUEUE_MAX_DEPTH": "2000"}).queue_max_depth == 2000
    assert load({"KICI_CONFIG": str(config)}).queue_max_depth == 500
    assert load({}).queue_max_depth == 1000


def test_shared_layer_sits_between_yaml_and_defaults(tmp_path: Path) -> None:
    config = tmp_path / "orchestrator.yaml"
    config.write_text("queue_max_depth: 500\n")
    assert load({}, shared={"queue_max_depth": 700}).queue_max_depth == 700
    assert load({"KICI_CONFIG": str(config)}, shared={"queue_max_depth": 700}).queue_max_depth == 500


def test_config_file_argument_overrides_kici_config(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("port: 5001\n")
    b.write_text("port: 5002\n")
    assert load({"KICI_CONFIG": str(a)}, config_file=b).port == 5002


def test_yaml_null_and_empty_env_mean_not_set(tmp_path: Path) -> None:
    config = tmp_path / "orchestrator.yaml"
    config.write_text("port: null\nhost: 0.0.0.0\n")
    settings = load({"KICI_CONFIG": str(config), "KICI_HOST": "", "KICI_BASE_PATH": " "})
    assert (settings.port, settings.host, settings.base_path) == (4000, "0.0.0.0", "")


def test_empty_yaml_file_is_fine(tmp_path: Path) -> None:
    config = tmp_path / "orchestrator.yaml"
    config.write_text("# nothing yet\n")
    assert load({"KICI_CONFIG": str(config)}).port == 4000


# -- bad values: one line naming the variable ---------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"KICI_PORT": "abc"}, "valid integer"),
        ({"KICI_PORT": "70000"}, "less than or equal to 65535"),
        ({"KICI_AUTO_MIGRATE": "maybe"}, "valid boolean"),
        ({"KICI_LOG_LEVEL": "verbose"}, "'debug', 'info', 'warning' or 'error'"),
        ({"KICI_LOG_FORMAT": "xml"}, "'auto', 'json' or 'text'"),
        ({"KICI_MODE": "solo"}, "'independent', 'platform' or 'hybrid'"),
        ({"KICI_DATABASE_URL": "mysql://db/kici"}, "unsupported database scheme 'mysql'"),
        ({"KICI_DATABASE_URL": "sqlite:///:memory:"}, "SQLite needs a file path"),
        ({"KICI_DATABASE_URL": "postgresql://db"}, "names no database"),
        ({"KICI_DATABASE_URL": "not a url"}, "not a database URL"),
        ({"KICI_BASE_PATH": "orch"}, "must be a path such as /orch"),
        ({"KICI_QUEUE_MAX_DEPTH": "0"}, "greater than or equal to 1"),
        ({"KICI_STALE_DETECTOR_THRESHOLD_MULTIPLIER": "0.5"}, "greater than or equal to 1"),
        ({"KICI_PLATFORM_URL": "relay.example", "KICI_MODE": "hybrid", "KICI_PLATFORM_TOKEN": "t"}, "ws://"),
        ({"KICI_HOST": "   x  ", "KICI_PORT": "-1"}, "greater than or equal to 0"),
    ],
)
def test_bad_values_give_one_line_naming_the_variable(env: dict[str, str], expected: str) -> None:
    lines = error_lines(env)
    assert len(lines) == 1, lines
    [line] = lines
    variable = next(name for name in env if name in line)
    assert line.startswith(variable + ":"), line
    assert expected in line, line


def test_secrets_are_not_echoed_in_errors() -> None:
    [line] = error_lines({"KICI_SECRET_KEY": "hunter2-is-not-hex"})
    assert line.startswith("KICI_SECRET_KEY:") and "64 hex characters" in line
    assert "hunter2" not in line
    [line] = error_lines({"KICI_BOOTSTRAP_ADMIN_TOKEN": "tiny secret"})
    assert line.startswith("KICI_BOOTSTRAP_ADMIN_TOKEN:") and "tiny" not in line


def test_several_problems_are_all_reported() -> None:
    lines = error_lines({"KICI_PORT": "x", "KICI_DEV": "nope", "KICI_FOOO": "1"})
    assert {line.split(":")[0].split()[-1] for line in lines} >= {"KICI_PORT", "KICI_DEV"}
    assert any("KICI_FOOO" in line for line in lines)


def test_normalisation() -> None:
    settings = load({"KICI_BASE_PATH": "/orch/", "KICI_LOG_LEVEL": "DEBUG", "KICI_DEV": "yes", "KICI_PORT": "0"})
    assert (settings.base_path, settings.log_level, settings.dev, settings.port) == ("/orch", "debug", True, 0)


# -- YAML file problems -------------------------------------------------------------------------------


def test_yaml_unknown_key_suggests(tmp_path: Path) -> None:
    config = tmp_path / "orchestrator.yaml"
    config.write_text("queue_max_dept: 5\n")
    [line] = error_lines({"KICI_CONFIG": str(config)})
    assert str(config) in line and "queue_max_dept" in line and "did you mean queue_max_depth?" in line


def test_yaml_bad_value_names_file_key_and_variable(tmp_path: Path) -> None:
    config = tmp_path / "orchestrator.yaml"
    config.write_text("port: many\n")
    [line] = error_lines({"KICI_CONFIG": str(config)})
    assert line.startswith(f"{config}: key 'port' (KICI_PORT):") and "valid integer" in line


def test_yaml_syntax_error_has_a_line_number(tmp_path: Path) -> None:
    config = tmp_path / "orchestrator.yaml"
    config.write_text("port: 1\nhost: [unclosed\n")
    [line] = error_lines({"KICI_CONFIG": str(config)})
    assert "invalid YAML" in line and "line" in line


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n"])
def test_yaml_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    config = tmp_path / "orchestrator.yaml"
    config.write_text(text)
    [line] = error_lines({"KICI_CONFIG": str(config)})
    assert "must be a mapping" in line


def test_missing_yaml_file(tmp_path: Path) -> None:
    [line] = error_lines({"KICI_CONFIG": str(tmp_path / "nope.yaml")})
    assert line.startswith("KICI_CONFIG") and "file not found" in line


def test_yaml_cannot_name_another_config(tmp_path: Path) -> None:
    config = tmp_path / "orchestrator.yaml"
    config.write_text("config: other.yaml\n")
    [line] = error_lines({"KICI_CONFIG": str(config)})
    assert "cannot name another" in line


def test_known_env_names_cover_the_brief() -> None:
    assert {
        "KICI_MODE", "KICI_DATA_DIR", "KICI_DATABASE_URL", "KICI_HOST", "KICI_PORT", "KICI_BASE_PATH",
        "KICI_SECRET_KEY", "KICI_BOOTSTRAP_ADMIN_TOKEN", "KICI_AUTO_MIGRATE", "KICI_DEV", "KICI_LOG_LEVEL",
        "KICI_LOG_FORMAT", "KICI_QUEUE_MAX_DEPTH", "KICI_QUEUE_TIMEOUT_MS", "KICI_DISPATCH_ACK_TIMEOUT_MS",
        "KICI_DISPATCH_MAX_ATTEMPTS", "KICI_JOB_HEARTBEAT_INTERVAL_MS", "KICI_STALE_DETECTOR_THRESHOLD_MULTIPLIER",
        "KICI_AGENT_MAX_RECONNECT_DELAY_MS", "KICI_LOCKFILE_CACHE_MAX", "KICI_LOCKFILE_CACHE_TTL_MS",
        "KICI_DEDUP_TTL_SECONDS", "KICI_MAX_LOG_SIZE_BYTES", "KICI_PLATFORM_URL", "KICI_PLATFORM_TOKEN",
        "KICI_CONFIG",
    } <= known_env_names()


def test_public_url_builds_run_links_and_refuses_junk() -> None:
    assert load({"KICI_PUBLIC_URL": "https://ci.example.com/orch/"}).run_url("r1") == "https://ci.example.com/orch/runs/r1"
    assert load({}).run_url("r1") is None
    for bad in ("ci.example.com", "ftp://ci.example.com", "https://ci.example.com/?x=1"):
        assert any("KICI_PUBLIC_URL" in line for line in error_lines({"KICI_PUBLIC_URL": bad})), bad


def test_old_key_settings_and_one_source_per_key(tmp_path: Path) -> None:
    settings = load({"KICI_SECRET_KEY_OLD": KEY, "KICI_SECRET_KEY_FILE": str(tmp_path / "k")})
    assert settings.secret_key_old is not None and settings.secret_key_old.get_secret_value() == KEY
    assert settings.secret_key_file == tmp_path / "k"
    assert load({"KICI_SECRET_KEY_OLD_FILE": "old-key"}).secret_key_old_file == Path("old-key").absolute()
    [line] = error_lines({"KICI_SECRET_KEY_OLD": "hunter2-old"})
    assert line.startswith("KICI_SECRET_KEY_OLD:") and "64 hex characters" in line and "hunter2" not in line
    [line] = error_lines({"KICI_SECRET_KEY": KEY, "KICI_SECRET_KEY_FILE": "/k"})
    assert line == "set KICI_SECRET_KEY or KICI_SECRET_KEY_FILE, not both"
    [line] = error_lines({"KICI_SECRET_KEY_OLD": KEY, "KICI_SECRET_KEY_OLD_FILE": "/k"})
    assert line == "set KICI_SECRET_KEY_OLD or KICI_SECRET_KEY_OLD_FILE, not both"
