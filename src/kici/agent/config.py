"""Agent settings: one pydantic model filled from `KICI_*` environment variables (the only source).

Every field's variable is `KICI_` + its name in upper case. The reference page
`docs/operator/agent/configuration.md` is generated from this model (`python -m kici.agent.config_docs`),
so a field's `description` is its documentation.
"""

from __future__ import annotations

import os
import platform
import secrets
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from kici.engine.labels import auto_labels, validate_user_labels
from kici.engine.resources import ResourceLimits, parse_cpus, parse_memory, parse_pids
from kici.engine.settings_meta import did_you_mean
from kici.engine.settings_meta import unknown_env_vars as _unknown_env_vars

ENV_PREFIX = "KICI_"

EXEMPT_ENV_PREFIXES: tuple[str, ...] = ("KICI_TEST_", "KICI_ADMIN_")
"""`KICI_*` variables that belong to someone else: the test suite and the `kici-admin` CLI."""

EXEMPT_ENV_NAMES: frozenset[str] = frozenset({"KICI_ENV", "KICI_PATH", "KICI_LOCAL", "KICI_RUN_ID", "KICI_JOB_ID"})
"""Variables a job step sees; an agent started from inside a CI step (KiCI testing itself) inherits them
and must not refuse to start because of them."""

AGENT_ID_FILE = "agent-id"
DEFAULT_WORK_DIR_DOC = "`$XDG_STATE_HOME/kici-agent`, else `~/.local/state/kici-agent`"

Sandbox = Literal["process", "userns", "bwrap"]
SandboxNetwork = Literal["host", "none"]
ResourceLimiter = Literal["auto", "cgroup2", "cgroup1", "rlimit"]
LogLevel = Literal["debug", "info", "warning", "error"]


class SettingsError(Exception):
    """Settings that cannot be used; `lines` holds one line per problem, each naming its variable."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        super().__init__("\n".join(lines))


def _doc_default(text: str) -> dict[str, Any]:
    return {"doc_default": text}


class AgentSettings(BaseModel):
    """Every agent setting. Build it with `load_settings()`."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    # -- orchestrator -----------------------------------------------------------------------------
    orchestrator_url: str = Field(
        description="URL of the orchestrator (`http://`, `https://`, `ws://` or `wss://`, optionally "
        "with a base path such as `https://ci.example.com/orch`). The agent connects to its `/ws` endpoint; "
        "`http` becomes `ws` and `https` becomes `wss`. The WebSocket endpoint itself is accepted too: "
        "`ws://host:4000`, `ws://host:4000/` and `ws://host:4000/ws` all connect to `ws://host:4000/ws`, and "
        "`wss://host/orch/ws` to the same endpoint as `wss://host/orch`. Several orchestrators of one cluster: "
        "a comma-separated list (`wss://a.example.com,wss://b.example.com`); the agent connects to the first, "
        "and whenever a connection fails or ends it tries the next one in turn (with the reconnect back-off "
        "once it has tried them all). One load-balanced URL works as well. Artifacts are uploaded to the "
        "orchestrator the agent is connected to. Required.",
        json_schema_extra=_doc_default("— (required)"),
    )
    agent_token: SecretStr = Field(
        description="Agent token (`kat_…`) minted with `kici-admin agent-token create`; sent in `auth.request`. "
        "Required unless `KICI_AGENT_TOKEN_FILE` is set (exactly one of the two). Never logged and never "
        "visible to job steps: the agent re-executes itself at once without this variable (the token travels "
        "over a pipe that is closed after reading), so not even `/proc/<agent pid>/environ` holds it.",
        json_schema_extra=_doc_default("— (required)"),
    )
    agent_token_file: Path | None = Field(
        default=None,
        description="File holding the agent token (surrounding whitespace ignored), instead of "
        "`KICI_AGENT_TOKEN`. Read once at start-up. Must not lie inside `KICI_WORK_DIR`; keep it mode 0600, "
        "owned by a user job steps do not run as (see [security](security.md)).",
        json_schema_extra=_doc_default("unset"),
    )
    agent_step_user: str = Field(
        default="",
        description="Only for an agent running as root: the user (name or numeric uid) job steps run as; the "
        "runner child drops to it and the job's workspace is handed to it. Unset: `kici-step` if that user "
        "exists, else `nobody` — whichever can run the agent's Python; if neither can, steps would run as root, "
        "which the orchestrator refuses unless the agent token allows root steps. `root` runs steps as root "
        "on purpose (the token must allow it). Ignored (with a warning) when the agent does not run as root.",
        json_schema_extra=_doc_default("`kici-step`, else `nobody`"),
    )
    agent_id: str = Field(
        default="",
        description="Stable identity of this agent. When unset, `<hostname>-<8 hex>` is generated once and "
        "kept in `<work dir>/agent-id`, so restarts and reconnects keep the same id.",
        json_schema_extra=_doc_default("generated, kept in `<work dir>/agent-id`"),
    )
    labels: list[str] = Field(
        default=[],
        description="Comma-separated labels jobs can select with `runs_on` (e.g. `linux,gpu`). Labels "
        "starting with `kici:` are reserved; the agent adds `kici:os:*`, `kici:arch:*`, `kici:host:*` "
        "and `kici:python:*` (see [toolchains](toolchains.md)) itself.",
    )
    max_concurrency: int = Field(default=1, ge=1, le=256, description="Jobs this agent runs at the same time.")

    # -- execution --------------------------------------------------------------------------------
    work_dir: Path = Field(
        description="Directory for job workspaces (`<work dir>/jobs/<job id>`, removed after each job) and the "
        "agent id file. Created with mode 0700.",
        json_schema_extra=_doc_default(DEFAULT_WORK_DIR_DOC),
    )
    sandbox: Sandbox = Field(
        default="process",
        description="How the runner of each job is isolated: `process` (own session and process group, "
        "allow-listed environment), `userns` (additionally unprivileged user, PID, mount, IPC and UTS "
        "namespaces via `unshare`) or `bwrap` (bubblewrap: additionally only the job's workspace and the "
        "system directories visible, read-only except the workspace, private `/tmp`). Start-up fails when the "
        "chosen backend cannot work here. See [security](security.md).",
    )
    sandbox_network: SandboxNetwork = Field(
        default="host",
        description="Network of job steps: `host` (the machine's network) or `none` (a network namespace of "
        "their own: only its own loopback with `bwrap`, no interface at all with `userns`; refused with `process`).",
    )
    resource_limits: ResourceLimiter = Field(
        default="auto",
        description="How job resource limits (`resources=` and the `KICI_JOB_*` defaults) are enforced: "
        "`cgroup2` (a delegated cgroup v2 subtree with the memory, pids and cpu controllers), `cgroup1` (the "
        "v1 memory, pids and cpu hierarchies, writable by the agent), `rlimit` (per-process rlimits and CPU "
        "affinity: the last resort) or `auto` (the first of these that works here). A mechanism named "
        "explicitly that does not work stops start-up. See [security](security.md#resource-limits).",
    )
    job_cpus: float | None = Field(
        default=None,
        description="CPU limit (a number of CPUs, e.g. `2` or `0.5`) of jobs whose `resources=` sets none.",
        json_schema_extra=_doc_default("unset (not limited)"),
    )
    job_memory: int | None = Field(
        default=None,
        description="Memory limit (`512M`, `4G`, `1.5G`; K/M/G/T are powers of 1024) of jobs whose "
        "`resources=` sets none.",
        json_schema_extra=_doc_default("unset (not limited)"),
    )
    job_pids: int | None = Field(
        default=None,
        description="Limit of processes and threads at once of jobs whose `resources=` sets none.",
        json_schema_extra=_doc_default("unset (not limited)"),
    )
    job_max_cpus: float | None = Field(
        default=None,
        description="Largest CPU limit a job may ask for; a job asking for more fails (category `resources`) "
        "instead of running with less than it declared.",
        json_schema_extra=_doc_default("unset (no maximum)"),
    )
    job_max_memory: int | None = Field(
        default=None,
        description="Largest memory limit a job may ask for (same form as `KICI_JOB_MEMORY`); a job asking for "
        "more fails (category `resources`).",
        json_schema_extra=_doc_default("unset (no maximum)"),
    )
    job_max_pids: int | None = Field(
        default=None,
        description="Largest process limit a job may ask for; a job asking for more fails (category "
        "`resources`).",
        json_schema_extra=_doc_default("unset (no maximum)"),
    )
    runner_prestart: bool = Field(
        default=True,
        description="With `KICI_SANDBOX=process`: keep a runner forkserver — a process that has started Python "
        "and imported the runner once — and fork each job's runner from it, instead of starting a new "
        "interpreter per job (saves most of a job's fixed CPU cost). Each job still gets a fresh process of "
        "its own (own session, allow-listed environment, the step user); the forkserver never runs job code. "
        "Should it die, the next job starts a new one, and jobs are spawned as without it (logged) while "
        "none can be started. `false`: every runner is a new interpreter. Other sandboxes always start a new "
        "interpreter (they wrap it in a command). See [security](security.md).",
    )
    max_log_size_bytes: int = Field(
        default=10 * 1024 * 1024, ge=1024,
        description="Per-step log cap used when the orchestrator's dispatch does not name one; output beyond "
        "it is replaced by one truncation line.",
    )
    cancel_grace_ms: int = Field(
        default=30_000, ge=0,
        description="How long a cancelled (not forced) job's runner may take for its cancel and cleanup hooks "
        "before its whole process tree is killed.",
    )
    git_timeout_ms: int = Field(default=120_000, ge=1000, description="Time limit of each git command of a clone.")
    clone_local_shared: bool = Field(
        default=True,
        description="Check out repositories on this machine (a local path or `file://` URL) by borrowing their "
        "objects through git's alternates, as `git clone --shared` does, instead of fetching a copy; `false` always "
        "fetches (use it if the source repository may be garbage-collected while jobs run).",
    )

    git_mirrors: bool = Field(
        default=True,
        description="Keep a bare mirror of each remote repository under `<work dir>/mirrors/` and check jobs "
        "out of it, so a repeated job fetches only what is new (local paths and `file://` URLs are borrowed "
        "instead, see `KICI_CLONE_LOCAL_SHARED`). `false`: every job fetches the commit directly.",
    )
    pythons: list[str] = Field(
        default=[],
        description="Comma-separated absolute paths of the Python interpreters jobs may use (e.g. "
        "`/opt/py/bin/python3.12,/usr/bin/python3.11`), instead of detecting them. Each must be a working "
        "CPython 3 that is not a virtualenv, or the agent does not start. See [toolchains](toolchains.md).",
        json_schema_extra=_doc_default("unset (detect)"),
    )
    python_detect: bool = Field(
        default=True,
        description="Detect the host's Python interpreters at start-up (PATH, `/usr/bin/python3.*`, "
        "`/usr/local/bin/python3.*`, pyenv, uv) and advertise them as `kici:python:3.X` and "
        "`kici:python:3.X.Y` labels; `false`: no interpreter is advertised unless `KICI_PYTHONS` lists some, "
        "and jobs with `python=` do not run here. See [toolchains](toolchains.md).",
    )

    # -- connection -------------------------------------------------------------------------------
    heartbeat_interval_ms: int = Field(
        default=30_000, ge=10, description="Interval of the connection `heartbeat` message."
    )
    job_heartbeat_interval_ms: int = Field(
        default=30_000, ge=10,
        description="Interval of `job.heartbeat` for each running job (the orchestrator's stale-job detection "
        "relies on it).",
    )
    max_reconnect_delay_ms: int = Field(
        default=60_000, ge=10,
        description="Upper bound of the reconnect back-off `min(1000·1.5^n·(1+rand/2), max)` ms.",
    )
    shutdown_timeout_ms: int = Field(
        default=30_000, ge=100,
        description="On SIGTERM/SIGINT: how long the agent waits for cancelled jobs to end and their status to "
        "reach the orchestrator before it kills what is left and exits.",
    )

    # -- operation --------------------------------------------------------------------------------
    port: int = Field(
        default=0, ge=0, le=65535,
        description="TCP port of the HTTP endpoints `/health`, `/ready` and `/metrics`; `0` disables them.",
    )
    health_host: str = Field(
        default="127.0.0.1", description="Address the HTTP endpoints listen on (`0.0.0.0`: every interface)."
    )
    dev: bool = Field(
        default=False,
        description="Development mode: an unknown `KICI_*` variable only warns instead of stopping start-up.",
    )
    log_level: LogLevel = Field(default="info", description="Minimum level of the JSON log lines on stderr.")

    # -- validation -------------------------------------------------------------------------------

    @field_validator("orchestrator_url")
    @classmethod
    def _url(cls, value: str) -> str:
        entries = [entry.strip() for entry in value.split(",")]
        several = len(entries) > 1
        checked: list[str] = []
        for number, entry in enumerate(entries, 1):
            where = f"entry {number} ({entry!r}) " if several else ""
            if not entry:
                raise ValueError(f"entry {number} is empty (a stray comma?)" if several else "must not be empty")
            parts = urlsplit(entry)
            if parts.scheme not in ("http", "https", "ws", "wss") or not parts.netloc:
                raise ValueError(f"{where}must be an http://, https://, ws:// or wss:// URL")
            if parts.query or parts.fragment:
                raise ValueError(f"{where}must not have a query or fragment")
            url = entry.rstrip("/")
            if websocket_url(url) in (websocket_url(u) for u in checked):
                raise ValueError(f"{where}names the same orchestrator as an earlier entry")
            checked.append(url)
        return ",".join(checked)

    @field_validator("agent_token")
    @classmethod
    def _token(cls, value: SecretStr) -> SecretStr:
        token = value.get_secret_value().strip()
        if not token or any(c.isspace() for c in token):
            raise ValueError("must be a non-empty token without whitespace")
        return SecretStr(token)

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            return validate_user_labels(str(v) for v in value)
        return value

    @field_validator("pythons", mode="before")
    @classmethod
    def _pythons(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            for path in value:
                if not os.path.isabs(str(path)):
                    raise ValueError(f"{path!r} is not an absolute path")
            return list(dict.fromkeys(str(v) for v in value))
        return value

    @field_validator("agent_id")
    @classmethod
    def _agent_id(cls, value: str) -> str:
        value = value.strip()
        if len(value) > 200 or any(c.isspace() for c in value):
            raise ValueError("must be at most 200 characters without whitespace")
        return value

    @field_validator("job_memory", "job_max_memory", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> Any:
        return None if value is None else parse_memory(value.strip() if isinstance(value, str) else value)

    @field_validator("job_cpus", "job_max_cpus", mode="before")
    @classmethod
    def _cpus(cls, value: Any) -> Any:
        return None if value is None else parse_cpus(value)

    @field_validator("job_pids", "job_max_pids", mode="before")
    @classmethod
    def _pids(cls, value: Any) -> Any:
        return None if value is None else parse_pids(value)

    @model_validator(mode="after")
    def _defaults_within_maxima(self) -> AgentSettings:
        for name in ("cpus", "memory", "pids"):
            default, ceiling = getattr(self, f"job_{name}"), getattr(self, f"job_max_{name}")
            if default is not None and ceiling is not None and default > ceiling:
                raise ValueError(f"KICI_JOB_{name.upper()} is above KICI_JOB_MAX_{name.upper()}")
        return self

    @field_validator("sandbox", "sandbox_network", "resource_limits", "log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("work_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    # -- derived ----------------------------------------------------------------------------------

    @property
    def websocket_urls(self) -> list[str]:
        """The `/ws` endpoint of each orchestrator listed in `orchestrator_url`, in order."""
        return [websocket_url(url) for url in self.orchestrator_url.split(",")]

    @property
    def job_default_limits(self) -> ResourceLimits:
        return ResourceLimits(cpus=self.job_cpus, memory=self.job_memory, pids=self.job_pids)

    @property
    def job_max_limits(self) -> ResourceLimits:
        return ResourceLimits(cpus=self.job_max_cpus, memory=self.job_max_memory, pids=self.job_max_pids)

    @property
    def jobs_dir(self) -> Path:
        return self.work_dir / "jobs"

    @property
    def mirrors_dir(self) -> Path:
        return self.work_dir / "mirrors"


def websocket_url(base: str) -> str:
    """`{base}/ws` with http → ws and https → wss; a base path is kept.

    Operators often write the WebSocket endpoint itself (`ws://host:4000/ws`): a URL whose path already
    ends in `/ws` is that endpoint, not a base path, so `/ws` is not appended twice.
    """
    parts = urlsplit(base.strip())
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/")
    if not path.endswith("/ws"):
        path += "/ws"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def http_base_url(base: str) -> str:
    """`base` with ws → http and wss → https, and without a trailing `/ws` (the WebSocket endpoint)."""
    parts = urlsplit(base.strip())
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/")
    if path.endswith("/ws"):
        path = path[: -len("/ws")]
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def known_env_names() -> frozenset[str]:
    return frozenset(env_name(name) for name in AgentSettings.model_fields)


def default_work_dir(environ: Mapping[str, str]) -> Path:
    """`$XDG_STATE_HOME/kici-agent`, else `~/.local/state/kici-agent` (per user, like the XDG default)."""
    xdg = environ.get("XDG_STATE_HOME", "").strip()
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "kici-agent"
    home = environ.get("HOME") or str(Path.home())
    return Path(home) / ".local" / "state" / "kici-agent"


def _did_you_mean(name: str, candidates: frozenset[str]) -> str:
    return did_you_mean(name, candidates, "docs/operator/agent/configuration.md")


def unknown_env_vars(environ: Mapping[str, str]) -> list[str]:
    """`KICI_*` variables in `environ` that are neither agent settings nor exempt, sorted."""
    return _unknown_env_vars(
        environ, prefix=ENV_PREFIX, known=known_env_names(), exempt_names=EXEMPT_ENV_NAMES,
        exempt_prefixes=EXEMPT_ENV_PREFIXES,
    )


def _lenient_bool(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


_SECRET_FIELDS = frozenset({"agent_token"})
MAX_TOKEN_BYTES = 4096


def _read_token_file(path: Path, work_dir: Path) -> str:
    """The token in `path`; ValueError saying what is wrong (never echoing the content)."""
    resolved = path.expanduser().absolute()
    real, real_work = os.path.realpath(resolved), os.path.realpath(work_dir)
    if real == real_work or real.startswith(real_work.rstrip(os.sep) + os.sep):
        raise ValueError(f"{resolved} is inside KICI_WORK_DIR ({work_dir}); keep the token outside it")
    try:
        with open(resolved, "rb") as handle:
            data = handle.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {resolved}: {exc.strerror or exc}") from None
    if len(data) > MAX_TOKEN_BYTES:
        raise ValueError(f"{resolved} is larger than {MAX_TOKEN_BYTES} bytes; it must hold only the token")
    text = data.decode("utf-8", "replace").strip()
    if not text:
        raise ValueError(f"{resolved} is empty")
    return text


def load_settings(
    environ: Mapping[str, str] | None = None, *, token: str | None = None
) -> tuple[AgentSettings, list[str]]:
    """Settings from `KICI_*` variables plus the warnings to log once logging is up. `token` is the agent
    token handed over by the re-executing parent (it stands for `KICI_AGENT_TOKEN`).

    Raises `SettingsError` with one line per problem (every problem at once, so one attempt shows all).
    An empty variable counts as not set.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name in AgentSettings.model_fields:
        value = environ.get(env_name(name))
        if value is not None and value.strip() != "":
            values[name] = value
    values.setdefault("work_dir", str(default_work_dir(environ)))
    if token is not None:
        values["agent_token"] = token

    errors: list[str] = []
    token_file = values.pop("agent_token_file", None)
    if token_file is not None:
        if "agent_token" in values:
            errors.append("KICI_AGENT_TOKEN_FILE: set either KICI_AGENT_TOKEN or KICI_AGENT_TOKEN_FILE, not both")
        else:
            try:
                values["agent_token"] = _read_token_file(Path(token_file), Path(values["work_dir"]).expanduser())
                values["agent_token_file"] = token_file
            except ValueError as exc:
                errors.append(f"KICI_AGENT_TOKEN_FILE: {exc}")
                values["agent_token"] = "unreadable"  # reported above; keeps "is required" from adding noise
    warnings: list[str] = []
    unknown = unknown_env_vars(environ)
    if unknown and _lenient_bool(values.get("dev", False)):
        warnings = [f"unknown variable {n} ignored ({_did_you_mean(n, known_env_names())})" for n in unknown]
    else:
        errors += [
            f"unknown variable {n} ({_did_you_mean(n, known_env_names())}); set KICI_DEV=true to start anyway"
            for n in unknown
        ]
    settings: AgentSettings | None = None
    try:
        settings = AgentSettings.model_validate(values)
    except ValidationError as exc:
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            msg = error["msg"].removeprefix("Value error, ")
            if error["type"] == "missing":
                msg = "is required" + (" (or set KICI_AGENT_TOKEN_FILE)" if field == "agent_token" else "")
            shown = "" if field in _SECRET_FIELDS or field not in values else f" (got {values[field]!r})"
            errors.append(f"{env_name(field)}: {msg}{shown}" if field else msg)
    if errors or settings is None:
        raise SettingsError(errors)
    return settings, warnings


def resolve_agent_id(settings: AgentSettings) -> str:
    """`KICI_AGENT_ID`, else the id kept in `<work dir>/agent-id`, else a new one written there."""
    if settings.agent_id:
        return settings.agent_id
    path = settings.work_dir / AGENT_ID_FILE
    try:
        existing = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing
    agent_id = f"{hostname()}-{secrets.token_hex(4)}"
    tmp = path.with_name(f".{AGENT_ID_FILE}.{os.getpid()}")
    tmp.write_text(agent_id + "\n", encoding="utf-8")
    os.replace(tmp, path)  # atomic: two agents starting together never see a half-written id
    return agent_id


def hostname() -> str:
    return socket.gethostname().split(".")[0] or "agent"


def agent_labels(settings: AgentSettings, python_labels: Sequence[str] = ()) -> list[str]:
    """The user labels plus the self-reported `kici:os|arch|host:*` ones (with the raw machine name too,
    so `kici:arch:x86_64` routes as well as its aliases `x64`/`amd64`) and the `kici:python:*` labels of
    the interpreters found (`kici.runner.toolchains`)."""
    machine = platform.machine()
    labels = [*settings.labels, *auto_labels(platform.system(), machine, hostname())]
    if machine.strip():
        labels.append(f"kici:arch:{machine.strip().lower()}")
    labels += python_labels
    return list(dict.fromkeys(labels))
