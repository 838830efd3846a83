"""Orchestrator settings: one pydantic model, filled from env `KICI_*` > `orchestrator.yaml` > defaults.

Every field's environment variable is `KICI_` + its name in upper case; in `orchestrator.yaml` the key is
the field name itself (e.g. `queue_max_depth: 500`). The configuration reference in
`docs/operator/configuration.md` is generated from this model (`python -m kici.orchestrator.config_docs`),
so a field's `description` is its documentation.

Seam for later: shared configuration stored in the database slots in between the YAML file and the
defaults. `load_settings(…, shared=…)` already accepts that layer as a plain mapping of field values; the
loader that reads it from the database comes with the config-versions table.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlencode

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from kici.engine.durations import DurationError, parse_duration
from kici.engine.settings_meta import did_you_mean
from kici.engine.settings_meta import unknown_env_vars as _unknown_env_vars
from kici.orchestrator.db.url import DatabaseURLError, parse_database_url, sqlite_url_for

ENV_PREFIX = "KICI_"

EXEMPT_ENV_PREFIXES: tuple[str, ...] = ("KICI_TEST_", "KICI_ADMIN_", "KICI_AGENT_ENV_")
"""`KICI_*` variables that belong to someone else: the test suite, the `kici-admin` CLI (which operators
often export in the same shell) and the agent's pass-through environment."""

EXEMPT_ENV_NAMES: frozenset[str] = frozenset({"KICI_ENV", "KICI_PATH", "KICI_LOCAL"})
"""Variables the runner sets inside a job step; an orchestrator started by a CI step (end-to-end tests of
KiCI itself) inherits them and must not refuse to start because of them."""

DEFAULT_DATA_DIR_DOC = "`$XDG_DATA_HOME/kici`, else `~/.local/share/kici`"
SQLITE_FILE_NAME = "kici.db"

Mode = Literal["independent", "platform", "hybrid"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "text"]

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


class SettingsError(Exception):
    """Settings that cannot be used. `lines` holds one self-contained line per problem, each naming the
    variable (or YAML key) at fault; `str()` joins them."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        super().__init__("\n".join(lines))


def _env_only() -> dict[str, Any]:
    return {"env_only": True}


def _doc_default(text: str) -> dict[str, Any]:
    return {"doc_default": text}


class Settings(BaseModel):
    """Every orchestrator setting. Build it with `load_settings()`; constructing it directly skips the
    environment and the YAML file (handy in tests)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    # -- instance ---------------------------------------------------------------------------------
    config: Path | None = Field(
        default=None,
        description="Path of an optional YAML settings file. Its keys are the setting names below without "
        "`KICI_`, in lower case (e.g. `queue_max_depth: 500`). Environment variables win over the file.",
        json_schema_extra=_env_only(),
    )
    mode: Mode = Field(
        default="independent",
        description="`independent`: webhooks arrive directly over HTTP. `platform` (relay only) and `hybrid` "
        "(relay and direct) also connect to a kici-relay and need `KICI_PLATFORM_URL` and "
        "`KICI_PLATFORM_TOKEN`.",
    )
    platform_url: str | None = Field(
        default=None,
        description="WebSocket URL of the kici-relay (`wss://…`). Required in `platform` and `hybrid` modes.",
    )
    platform_token: SecretStr | None = Field(
        default=None,
        description="API key this orchestrator presents to the kici-relay. Required in `platform` and "
        "`hybrid` modes.",
    )
    data_dir: Path = Field(
        description="Directory for everything the orchestrator keeps on disk: the SQLite database (embedded "
        "default), the generated secret key and bootstrap admin token, logs and blobs. Created with mode 0700.",
        json_schema_extra=_doc_default(DEFAULT_DATA_DIR_DOC),
    )
    database_url: str = Field(
        description="`sqlite:///PATH` (embedded default) or `postgresql://USER[:PASSWORD]@HOST[:PORT]/DB` for "
        "production and clusters.",
        json_schema_extra=_doc_default(f"`sqlite:///<data dir>/{SQLITE_FILE_NAME}`"),
    )
    auto_migrate: bool = Field(
        default=True,
        description="Apply pending database migrations at start-up (under a lock, so several orchestrators "
        "starting together migrate once). With `false`, run `kici-orchestrator migrate` yourself.",
    )

    # -- HTTP -------------------------------------------------------------------------------------
    host: str = Field(default="127.0.0.1", description="Address to listen on. `0.0.0.0` listens on every IPv4 "
                      "interface.")
    port: int = Field(
        default=4000, ge=0, le=65535, description="TCP port to listen on; `0` picks a free port (logged at start)."
    )
    base_path: str = Field(
        default="",
        description="Path prefix for every route, for serving behind a reverse proxy under a sub-path "
        "(e.g. `/orch` serves `/orch/health`).",
    )

    public_url: str | None = Field(
        default=None,
        description="The URL people use to reach this orchestrator from a browser (e.g. "
        "`https://ci.example.com`, including `KICI_BASE_PATH` if a proxy keeps it). Links to runs — GitHub "
        "check runs' details, notifications, the git hook's output — are built from it; unset, none are sent.",
    )

    # -- secrets ----------------------------------------------------------------------------------
    secret_key: SecretStr | None = Field(
        default=None,
        description="64 hex characters (32 bytes) used to encrypt source secrets and scoped secrets at rest "
        "(AES-256-GCM). When neither this nor `KICI_SECRET_KEY_FILE` is set, one is generated into "
        "`<data dir>/secret-key` (mode 0600) on first start; keep it with your backups.",
    )
    secret_key_file: Path | None = Field(
        default=None,
        description="A file holding the secret key (64 hex characters), instead of `KICI_SECRET_KEY` — for a key "
        "kept in a mounted secret. Setting both is an error.",
    )
    secret_key_old: SecretStr | None = Field(
        default=None,
        description="The previous secret key (64 hex characters), during a key rotation only: values not yet "
        "re-encrypted are opened with it when the current key does not open them. Never used to encrypt. "
        "Remove it once `kici-admin rotate-key` reports nothing remaining (operator guide: Secrets).",
    )
    secret_key_old_file: Path | None = Field(
        default=None,
        description="A file holding the previous secret key, instead of `KICI_SECRET_KEY_OLD` (e.g. the "
        "`<data dir>/secret-key` that was generated before). Setting both is an error.",
    )
    bootstrap_admin_token: SecretStr | None = Field(
        default=None,
        description="An admin token (at least 16 characters) to create or keep as an `owner` token at "
        "start-up. When unset and no active admin token exists, one is generated, written to "
        "`<data dir>/bootstrap-admin-token` (mode 0600) and printed once to the terminal.",
    )

    # -- dashboard --------------------------------------------------------------------------------
    dashboard_public: bool = Field(
        default=False,
        description="Let anyone who can reach the orchestrator read the dashboard without signing in, with the "
        "`viewer` role's rights (runs, jobs, logs, schedules, agents, queue) in the default org — for open-source "
        "projects. Actions (cancel, rerun) still need a signed-in role that may do them.",
    )
    dashboard_session_ttl_seconds: int = Field(
        default=43_200, ge=60,
        description="How long a dashboard sign-in lasts before the admin token must be entered again. Signing "
        "out or revoking the token ends a session at once.",
    )

    # -- operation --------------------------------------------------------------------------------
    dev: bool = Field(
        default=False, description="Development mode: an unknown `KICI_*` variable only warns instead of "
        "stopping start-up."
    )
    log_level: LogLevel = Field(default="info", description="Minimum level of log lines.")
    log_format: LogFormat = Field(
        default="auto",
        description="`json`: one JSON object per line; `text`: readable lines; `auto`: text when stderr "
        "is a terminal, JSON otherwise.",
    )

    # -- queue and dispatch -----------------------------------------------------------------------
    queue_max_depth: int = Field(
        default=1000, ge=1, description="Pending jobs the queue holds; a job beyond it fails (\"queue full\")."
    )
    queue_timeout_ms: int = Field(
        default=3_600_000, ge=1000,
        description="How long a job may wait in the queue for an agent before it expires (`timed_out_stale`).",
    )
    hold_expiry_hours: float = Field(
        default=72, gt=0, le=24 * 365,
        description="How long a run held by a source's trust policy (an untrusted pull request) waits for "
        "`kici-admin held approve` or a `/kici approve` comment before the sweeper cancels it (\"hold expired "
        "after 72h\"). A source's trust policy may set its own `hold_expiry`.",
    )
    dispatch_ack_timeout_ms: int = Field(
        default=10_000, ge=100,
        description="How long an agent has to acknowledge a dispatched job before it is requeued.",
    )
    dispatch_max_attempts: int = Field(
        default=5, ge=1, description="Dispatch attempts (unacknowledged or rejected) before a job fails."
    )
    dispatch_poll_ms: int = Field(
        default=1000, ge=10,
        description="How often the dispatcher looks for queued jobs without being woken (new runs, finished "
        "jobs and agent status changes wake it at once); the fallback for work queued by another process.",
    )
    sweep_interval_ms: int = Field(
        default=5000, ge=100,
        description="Interval of the sweeps: stale jobs, dispatch-ack deadlines, queue expiry, recovery "
        "windows, workflow timeouts.",
    )
    scheduler_interval_ms: int = Field(
        default=1000, ge=100, le=60_000,
        description="How often the scheduler looks for due `schedule()` triggers. A tick reads only the "
        "registrations whose next fire time has passed (an indexed query), so a short interval is cheap; it "
        "bounds how late after the cron minute a scheduled run starts.",
    )
    job_heartbeat_interval_ms: int = Field(
        default=60_000, ge=1000, description="Interval at which agents send `job.heartbeat` for running jobs."
    )
    stale_detector_threshold_multiplier: float = Field(
        default=2.0, ge=1.0,
        description="A running job whose last heartbeat is older than interval × this is marked "
        "`timed_out_stale`.",
    )
    agent_max_reconnect_delay_ms: int = Field(
        default=60_000, ge=1000, description="Upper bound of the reconnect back-off the orchestrator tells agents "
        "to use."
    )
    lockfile_cache_max: int = Field(
        default=500, ge=0, description="Lock files kept in the in-memory cache (keyed by provider, repo, SHA)."
    )
    lockfile_cache_ttl_ms: int = Field(
        default=3_600_000, ge=0, description="How long a cached lock file stays valid."
    )
    dedup_ttl_seconds: int = Field(
        default=86_400, ge=60, description="How long a webhook delivery id is remembered to drop redeliveries."
    )
    max_log_size_bytes: int = Field(
        default=10 * 1024 * 1024, ge=1024,
        description="Per-step log cap sent to agents; output beyond it is replaced by one truncation marker.",
    )

    # -- reporting --------------------------------------------------------------------------------
    notify_urls: list[str] = Field(
        default_factory=list,
        description="Comma-separated URLs that receive a signed JSON event (`run.finished`, and "
        "`job.finished` with `KICI_NOTIFY_JOB_EVENTS`) for every run, whatever its source. Sources can add "
        "their own (`notify_urls` in the source's config). See docs/operator/notifications.md.",
        json_schema_extra=_doc_default("none"),
    )
    notify_secret: SecretStr | None = Field(
        default=None,
        description="HMAC-SHA256 key that signs notifications (`X-Signature-256: sha256=<hex>`). Required "
        "when `KICI_NOTIFY_URLS` is set; also signs a source's notifications when the source has no "
        "`notify_secret` of its own.",
    )
    notify_job_events: bool = Field(
        default=False, description="Also send `job.finished` to `KICI_NOTIFY_URLS` when each job finishes."
    )
    report_poll_ms: int = Field(
        # Not shorter by default: each idle pass is a few reads, and on SQLite one a second showed up as
        # ~100 ms stalls in the webhook → dispatch p99 (bench/dispatch.py, docs/benchmarks.md).
        default=5000, ge=10,
        description="How often the reporting worker looks for due reports without being woken (job and "
        "run state changes in this process wake it at once, and retries wake it when they are due); the "
        "fallback for reports written by another orchestrator process or by a sweep (stale jobs, timeouts).",
    )
    report_concurrency: int = Field(
        default=8, ge=1, le=256, description="Reports (check runs, notifications) sent at the same time."
    )
    report_retry_base_ms: int = Field(
        default=1000, ge=1,
        description="First retry delay of a report that failed (5xx, network error); doubled per attempt, "
        "with jitter, up to `KICI_REPORT_RETRY_MAX_MS`. A rate limit waits for GitHub's reset instead.",
    )
    report_retry_max_ms: int = Field(
        default=300_000, ge=1, description="Upper bound of the retry delay of a report."
    )
    report_give_up_after_ms: int = Field(
        default=86_400_000, ge=1,
        description="How long a report keeps being retried after its first failure before it is marked "
        "`failed` (kept; `kici-admin reports retry ID` sends it again).",
    )

    report_retention_hours: int = Field(
        default=168, ge=1,
        description="How long sent reports stay in the outbox (`kici-admin reports list --status sent`) "
        "before they are deleted. Pending and failed reports are never deleted.",
    )

    # -- blob storage and artifacts ----------------------------------------------------------------
    storage_backend: Literal["fs", "s3"] = Field(
        default="fs",
        description="Where blobs (job artifacts) are kept: `fs`, files under `<data dir>/blobs` (embedded "
        "default), or `s3`, an S3-compatible object store (AWS S3, SeaweedFS, MinIO) named by "
        "`KICI_STORAGE_BUCKET` and `KICI_STORAGE_ENDPOINT`. With `s3` the orchestrator refuses to start when "
        "the store cannot be reached or the bucket is missing (no fallback to `fs`). S3 credentials come from "
        "the standard AWS chain (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE` and the shared "
        "files, or an instance/container role), never from KiCI settings. See docs/operator/storage.md.",
    )
    storage_bucket: str | None = Field(
        default=None, description="The S3 bucket (it must exist). Required with `KICI_STORAGE_BACKEND=s3`."
    )
    storage_prefix: str = Field(
        default="",
        description="Key prefix of every object KiCI writes in the bucket (e.g. `kici/`), so one bucket can "
        "serve several installations or other tools.",
        json_schema_extra=_doc_default("none (the bucket's root)"),
    )
    storage_endpoint: str | None = Field(
        default=None,
        description="URL of an S3-compatible server (`http://127.0.0.1:8333` for SeaweedFS, "
        "`http://minio:9000`); unset for AWS S3 itself.",
    )
    storage_region: str | None = Field(
        default=None,
        description="S3 region (e.g. `eu-west-1`); unset, the AWS chain's (`AWS_REGION`, the config file).",
    )
    storage_force_path_style: bool = Field(
        default=False,
        description="Address objects as `ENDPOINT/BUCKET/KEY` instead of `BUCKET.ENDPOINT/KEY`: needed by "
        "most self-hosted servers (SeaweedFS, MinIO) reached by IP address or a single host name.",
    )
    log_segment_bytes: int = Field(
        default=1024 * 1024, ge=4096,
        description="Job logs: while a job runs its output is kept in the database (`log_chunks`), readable "
        "from every orchestrator; once a job's unsealed output reaches this many bytes it is sealed into a "
        "segment object in the blob store (`KICI_STORAGE_BACKEND`). See docs/operator/storage.md.",
        json_schema_extra=_doc_default("1048576 (1 MiB)"),
    )
    log_segment_max_age: dt.timedelta = Field(
        default=dt.timedelta(minutes=5),
        description="Job output older than this still in the database is sealed into a segment even when "
        "it is smaller than `KICI_LOG_SEGMENT_BYTES` (a job's output is also sealed when it ends). Any "
        "orchestrator does it, so output received by one that died is sealed too. A duration: `90s`, `5m`, "
        "`1h`.",
        json_schema_extra=_doc_default("5m"),
    )
    artifact_max_bytes: int = Field(
        default=1024 * 1024 * 1024, ge=1,
        description="Largest single artifact an agent may upload; a larger one is refused (413) and "
        "nothing of it is kept.",
    )
    artifact_job_max_bytes: int = Field(
        default=5 * 1024 * 1024 * 1024, ge=1,
        description="Total size of the artifacts of one job; an upload that would go over it is refused (413).",
    )
    test_report_max_bytes: int = Field(
        default=50 * 1024 * 1024, ge=1,
        description="Largest JUnit XML file (`job(..., test_reports=[...])`) an agent may send; a larger one is "
        "refused (413), recorded with the job's test reports as not read, and named in the job's log. The job's "
        "outcome does not change.",
    )
    test_report_max_files: int = Field(
        default=1000, ge=1,
        description="Most JUnit XML files one job may send; the agent is told (409) and says so in the job's log.",
    )
    cache_max_bytes: int = Field(
        default=2 * 1024 * 1024 * 1024, ge=1,
        description="Largest cache archive (compressed) an agent may save; a larger one is refused (413), "
        "nothing of it is kept, and the job's result is unaffected. See docs/operator/caches.md.",
    )
    cache_repo_max_bytes: int = Field(
        default=10 * 1024 * 1024 * 1024, ge=1,
        description="Total size of one repository's caches (all namespaces); when a save goes over it, the "
        "repository's least recently used caches are evicted until it fits.",
    )
    cache_max_age: str = Field(
        default="7d",
        description="Caches not restored (or saved) for this long are evicted by the retention sweep "
        "(`KICI_RETENTION_INTERVAL_SECONDS`): a duration such as `7d` or `36h` (a bare number is days); `0`: "
        "never by age.",
    )
    # -- cluster ----------------------------------------------------------------------------------
    node_name: str | None = Field(
        default=None, min_length=1, max_length=200,
        description="This orchestrator's node id in the cluster (the `nodes` table, `kici-admin cluster "
        "status`). Must be unique among live orchestrators on one database: a start under a name a live node "
        "holds is refused. Unset: the host name plus a suffix derived from the data dir, stable across "
        "restarts (so a restarted node takes its own earlier connections over at once); two orchestrators "
        "sharing one data dir on one host must each set it.",
        json_schema_extra=_doc_default("`<hostname>-<8 hex digits of the data dir's hash>`"),
    )
    node_address: str | None = Field(
        default=None,
        description="How peers and operators reach this node (shown by `kici-admin cluster status`), e.g. "
        "`http://10.0.0.5:4000`.",
        json_schema_extra=_doc_default("`http://<host name>:<port>` (`KICI_HOST` when it is a specific address)"),
    )
    node_lease_seconds: float = Field(
        default=6.0, ge=0.5, le=600,
        description="Lease of a node's row and of the leader lease, renewed every third of it. A node whose "
        "lease runs out is dead to the others: its agents' jobs go `recovering` (reclaimed when the agents "
        "reconnect to another node) and another node takes the leader duties over, under a new fencing term.",
    )
    cluster_poll_ms: int = Field(
        default=1000, ge=10, le=60_000,
        description="How often each node reads the cluster bus's event table: the fallback for cross-node "
        "messages (cancels, wake-ups) whose PostgreSQL NOTIFY was lost, e.g. while the listening connection "
        "was reconnecting.",
    )
    log_follow_poll_ms: int = Field(
        default=1000, ge=10, le=60_000,
        description="How long a job-log follower (`kici-admin runs logs --follow`, the dashboard's live log) "
        "waits before reading the log again when no wake-up came. New lines wake followers at once: on the "
        "node that stored them directly, on the other nodes through the cluster bus (`job-log`); this poll "
        "covers a wake-up lost on the way.",
    )

    # -- audit and retention ----------------------------------------------------------------------
    audit_denial_window_seconds: int = Field(
        default=60, ge=0,
        description="Unauthenticated admin requests (401: no token, an unknown, revoked or expired one) and "
        "failed dashboard sign-ins from one client are counted into one audit row per window of this many "
        "seconds (per client, reason and token), so a flood cannot grow the audit log without bound. `0`: one "
        "row per denial. Permission denials (403) always get a row each: they name a token.",
    )
    retention_runs_days: int = Field(
        default=90, ge=0,
        description="Finished runs older than this many days (by finish time) are deleted with their jobs, "
        "steps, queue and report rows and their log files. Runs that have not finished are never deleted. "
        "`0`: keep forever.",
    )
    retention_events_days: int = Field(
        default=30, ge=0,
        description="Event log entries (webhook deliveries and what became of them) older than this many days "
        "are deleted. `0`: keep forever.",
    )
    retention_audit_days: int = Field(
        default=365, ge=0,
        description="Audit log entries older than this many days are deleted. `0`: keep forever.",
    )
    retention_interval_seconds: int = Field(
        default=3600, ge=1,
        description="How often the retention sweep runs (one orchestrator at a time, under a database lock).",
    )
    retention_batch_size: int = Field(
        default=500, ge=1, le=10_000,
        description="Rows deleted per statement by the retention sweep; it commits between batches so it "
        "never holds long locks.",
    )

    _warnings: tuple[str, ...] = PrivateAttr(default=())

    @property
    def load_warnings(self) -> tuple[str, ...]:
        """Problems tolerated while loading (unknown variables in dev mode); log them once logging is up."""
        return self._warnings

    # -- validation -------------------------------------------------------------------------------

    @model_validator(mode="before")
    @classmethod
    def _fill_path_defaults(cls, data: Any, info: ValidationInfo) -> Any:
        # The data dir default depends on the environment the settings were loaded from (XDG_DATA_HOME,
        # HOME), which load_settings passes as validation context; the SQLite default follows the data dir.
        if not isinstance(data, dict):
            return data
        environ = (info.context or {}).get("environ", os.environ)
        data = dict(data)
        if data.get("data_dir") in (None, ""):
            data["data_dir"] = default_data_dir(environ)
        if data.get("database_url") in (None, ""):
            data["database_url"] = sqlite_url_for(Path(data["data_dir"]).expanduser().absolute() / SQLITE_FILE_NAME)
        return data

    @field_validator("mode", "log_level", "log_format", "storage_backend", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("data_dir", "config", "secret_key_file", "secret_key_old_file")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser().absolute() if value is not None else None

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        try:
            parse_database_url(value)
        except DatabaseURLError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("log_segment_max_age", mode="before")
    @classmethod
    def _log_segment_max_age(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_duration(value)
        return value
    @field_validator("cache_max_age")
    @classmethod
    def _cache_max_age(cls, value: str) -> str:
        try:
            parse_duration(str(value), bare_unit="d", allow_zero=True)
        except DurationError as exc:
            raise ValueError(str(exc)) from None
        return str(value).strip()

    @property
    def cache_max_age_delta(self) -> dt.timedelta | None:
        """`cache_max_age` as a duration; None when caches never expire by age (`0`)."""
        delta = parse_duration(self.cache_max_age, bare_unit="d", allow_zero=True)
        return delta if delta.total_seconds() > 0 else None

    @field_validator("storage_endpoint")
    @classmethod
    def _storage_endpoint(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("platform_url")
    @classmethod
    def _platform_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(wss?|https?)://[^/\s]+", value):
            raise ValueError("must be a ws://, wss://, http:// or https:// URL")
        return value

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("base_path")
    @classmethod
    def _base_path(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value and (not value.startswith("/") or re.search(r"[\s?#%]", value) or "//" in value):
            raise ValueError("must be a path such as /orch (leading slash, no spaces, query or fragment)")
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().rstrip("/")
        if not re.match(r"^https?://[^\s/?#]+(/[^\s?#]*)?$", value):
            raise ValueError("must be an http:// or https:// URL with no query or fragment")
        return value

    @field_validator("notify_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("notify_urls")
    @classmethod
    def _notify_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not re.match(r"^https?://[^\s/?#]+(/[^\s]*)?$", url):
                raise ValueError(f"{url!r} is not an http:// or https:// URL")
        return value

    @field_validator("secret_key", "secret_key_old")
    @classmethod
    def _secret_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _HEX64.match(value.get_secret_value().strip()):
            raise ValueError(
                "must be 64 hex characters (32 bytes); generate one with "
                "python -c 'import secrets; print(secrets.token_hex(32))'"
            )
        return SecretStr(value.get_secret_value().strip()) if value is not None else None

    @field_validator("bootstrap_admin_token")
    @classmethod
    def _bootstrap_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        token = value.get_secret_value()
        if len(token) < 16 or any(c.isspace() for c in token):
            raise ValueError("must be at least 16 characters with no whitespace")
        return value

    @model_validator(mode="after")
    def _one_key_source(self) -> Settings:
        if self.secret_key is not None and self.secret_key_file is not None:
            raise ValueError("set KICI_SECRET_KEY or KICI_SECRET_KEY_FILE, not both")
        if self.secret_key_old is not None and self.secret_key_old_file is not None:
            raise ValueError("set KICI_SECRET_KEY_OLD or KICI_SECRET_KEY_OLD_FILE, not both")
        return self

    @model_validator(mode="after")
    def _notify_needs_secret(self) -> Settings:
        if self.notify_urls and self.notify_secret is None:
            raise ValueError(
                "KICI_NOTIFY_URLS needs KICI_NOTIFY_SECRET (the key notifications are signed with)"
            )
        return self

    @model_validator(mode="after")
    def _s3_needs_bucket(self) -> Settings:
        if self.storage_backend == "s3" and not self.storage_bucket:
            raise ValueError("KICI_STORAGE_BACKEND=s3 needs KICI_STORAGE_BUCKET (an existing bucket)")
        return self

    @model_validator(mode="after")
    def _mode_needs_platform(self) -> Settings:
        problem = _mode_problem(self.mode, self.platform_url, self.platform_token)
        if problem:
            raise ValueError(problem)
        return self

    # -- derived ----------------------------------------------------------------------------------
    def run_url(self, run_id: str, job: str | None = None) -> str | None:
        """The dashboard's page of a run (`<public url>/runs/<id>`), opened on `job` (its name in the run)
        when given, or None without `KICI_PUBLIC_URL`."""
        if not self.public_url:
            return None
        url = f"{self.public_url}/runs/{run_id}"
        return f"{url}?{urlencode({'job': job})}" if job is not None else url

    @property
    def generated_secret_key_file(self) -> Path:
        """Where the secret key is generated when neither KICI_SECRET_KEY nor KICI_SECRET_KEY_FILE is set."""
        return self.data_dir / "secret-key"

    @property
    def bootstrap_token_file(self) -> Path:
        return self.data_dir / "bootstrap-admin-token"

    @property
    def heartbeat_stale_after_ms(self) -> int:
        return int(self.job_heartbeat_interval_ms * self.stale_detector_threshold_multiplier)


def _mode_problem(mode: Any, platform_url: Any, platform_token: Any) -> str | None:
    if str(mode).strip().lower() not in ("platform", "hybrid"):
        return None
    missing = [env_name(name) for name, value in (("platform_url", platform_url), ("platform_token", platform_token))
               if value in (None, "")]
    if not missing:
        return None
    return (
        f"KICI_MODE={str(mode).strip().lower()} needs KICI_PLATFORM_URL and KICI_PLATFORM_TOKEN "
        f"(missing: {', '.join(missing)}); use KICI_MODE=independent to run without a relay"
    )


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def known_env_names() -> frozenset[str]:
    return frozenset(env_name(name) for name in Settings.model_fields)


def yaml_keys() -> frozenset[str]:
    return frozenset(name for name, info in Settings.model_fields.items() if not _is_env_only(info))


def _is_env_only(info: Any) -> bool:
    extra = info.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("env_only"))


def default_data_dir(environ: Mapping[str, str]) -> Path:
    """`$XDG_DATA_HOME/kici`, else `~/.local/share/kici` (the XDG base directory default)."""
    xdg = environ.get("XDG_DATA_HOME", "").strip()
    if xdg and Path(xdg).is_absolute():  # the XDG spec says to ignore relative values
        return Path(xdg) / "kici"
    home = environ.get("HOME") or str(Path.home())
    return Path(home) / ".local" / "share" / "kici"


def _did_you_mean(name: str, candidates: frozenset[str]) -> str:
    return did_you_mean(name, candidates, "docs/operator/configuration.md")


def unknown_env_vars(environ: Mapping[str, str]) -> list[str]:
    """`KICI_*` variables in `environ` that are neither settings nor exempt, sorted."""
    return _unknown_env_vars(
        environ, prefix=ENV_PREFIX, known=known_env_names(), exempt_names=EXEMPT_ENV_NAMES,
        exempt_prefixes=EXEMPT_ENV_PREFIXES,
    )


def load_yaml_file(path: Path) -> dict[str, Any]:
    """The settings in a YAML file, by field name; `SettingsError` for a missing, malformed or unknown key."""
    where = f"KICI_CONFIG ({path})"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingsError([f"{where}: file not found"]) from None
    except OSError as exc:
        raise SettingsError([f"{where}: cannot read: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SettingsError([f"{where}: invalid YAML{at}: {problem}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError([f"{where}: must be a mapping of setting names to values, got {type(data).__name__}"])
    errors = []
    allowed = yaml_keys()
    for key in data:
        if not isinstance(key, str) or key not in allowed:
            hint = _did_you_mean(str(key), allowed) if isinstance(key, str) else "keys must be strings"
            if key == "config":
                hint = "the settings file cannot name another one"
            errors.append(f"{where}: unknown key {key!r} ({hint})")
    if errors:
        raise SettingsError(errors)
    # `null` means "not set here" (the reference's rule), so a lower layer still applies.
    return {key: value for key, value in data.items() if value is not None}


def load_settings(
    environ: Mapping[str, str] | None = None,
    *,
    config_file: Path | None = None,
    shared: Mapping[str, Any] | None = None,
) -> Settings:
    """Settings from env `KICI_*` > the YAML file (`config_file`, else `KICI_CONFIG`) > `shared` (the
    database layer, later) > defaults. Raises `SettingsError` with one line per problem."""
    environ = os.environ if environ is None else environ
    from_env: dict[str, Any] = {}
    for name in Settings.model_fields:
        value = environ.get(env_name(name))
        # An empty variable (common in env files and compose) means "not set" rather than "empty string".
        if value is not None and value.strip() != "":
            from_env[name] = value

    path = config_file or (Path(from_env["config"]).expanduser() if "config" in from_env else None)
    from_yaml = load_yaml_file(path) if path is not None else {}
    if path is not None:
        from_env["config"] = str(path)

    origin: dict[str, str] = {}
    merged: dict[str, Any] = {}
    for layer_name, layer in (("shared", shared or {}), ("yaml", from_yaml), ("env", from_env)):
        for key, value in layer.items():
            merged[key] = value
            origin[key] = layer_name

    errors: list[str] = []
    unknown = unknown_env_vars(environ)
    dev = _lenient_bool(merged.get("dev", False))
    warnings = [f"unknown variable {name} ignored ({_did_you_mean(name, known_env_names())})" for name in unknown]
    if unknown and not dev:
        errors.extend(
            f"unknown variable {name} ({_did_you_mean(name, known_env_names())}); "
            "set KICI_DEV=true to start anyway" for name in unknown
        )
        warnings = []

    settings: Settings | None = None
    try:
        settings = Settings.model_validate(merged, context={"environ": environ})
    except ValidationError as exc:
        errors.extend(_validation_lines(exc, origin, merged, path))
        # The mode rule runs only once every field is valid; report it with the field errors anyway, so
        # one attempt shows every problem.
        problem = _mode_problem(merged.get("mode", "independent"), merged.get("platform_url"),
                                merged.get("platform_token"))
        if problem and problem not in errors:
            errors.append(problem)
    if errors or settings is None:
        raise SettingsError(errors)
    settings._warnings = tuple(warnings)
    return settings


def _lenient_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


_SECRET_FIELDS = frozenset(
    {"secret_key", "secret_key_old", "bootstrap_admin_token", "platform_token", "notify_secret"}
)


def _validation_lines(
    exc: ValidationError, origin: Mapping[str, str], merged: Mapping[str, Any], path: Path | None
) -> list[str]:
    lines = []
    for error in exc.errors():
        loc = error["loc"]
        msg = error["msg"].removeprefix("Value error, ")
        if not loc:  # a model-level rule (e.g. the mode check) already names its variables
            lines.append(msg)
            continue
        field = str(loc[0])
        source = origin.get(field, "default")
        where = f"{path}: key {field!r} ({env_name(field)})" if source == "yaml" else env_name(field)
        shown = "" if field in _SECRET_FIELDS or field not in merged else f" (got {merged[field]!r})"
        lines.append(f"{where}: {msg}{shown}")
    return lines
