"""The orchestrator ↔ agent WebSocket protocol (`/ws`, JSON text frames, protocol version 1).

Handshake: the agent sends `auth.request` within 5 s (answered by `auth.success` or `auth.failure` and
close 4010), then `agent.register` within 10 s (answered by `register.ack`). Afterwards either side may
send the messages below. Every frame is validated against the union of its direction; an invalid frame
is answered with `error{code: INVALID_MESSAGE}` and close 4003. Job messages from an agent that does not
own the job are ignored by the orchestrator.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from kici.engine.resources import ResourceLimits

PROTOCOL_VERSION = 1

AUTH_TIMEOUT_S = 5.0
REGISTER_TIMEOUT_S = 10.0
HEARTBEAT_INTERVAL_S = 30.0
HEARTBEAT_UNHEALTHY_S = 90.0
HEARTBEAT_TIMEOUT_S = 180.0
MAX_CLOSE_REASON_BYTES = 123


class CloseCode(IntEnum):
    GOING_AWAY = 1001
    UNAUTHORIZED = 4001
    HANDSHAKE_TIMEOUT = 4002
    INVALID_MESSAGE = 4003
    HEARTBEAT_TIMEOUT = 4004
    PROTOCOL_ERROR = 4005
    INTERNAL_ERROR = 4006
    AUTH_FAILED = 4010
    PLAN_LIMIT = 4020
    RUN_NOT_FOUND = 4030
    DISPATCH_ACK_TIMEOUT = 4031


def close_reason(text: str) -> str:
    """WebSocket close reasons are at most 123 bytes of UTF-8; cut on a character boundary."""
    data = text.encode("utf-8")[:MAX_CLOSE_REASON_BYTES]
    return data.decode("utf-8", "ignore")


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------- agent → orchestrator


class AuthRequest(Message):
    type: Literal["auth.request"] = "auth.request"
    token: str
    protocol_version: int = Field(alias="protocolVersion", default=PROTOCOL_VERSION)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class InFlightJob(Message):
    job_id: str
    run_id: str


class AgentRegister(Message):
    type: Literal["agent.register"] = "agent.register"
    message_id: str
    agent_id: str
    labels: list[str] = []
    max_concurrency: int = Field(default=1, ge=1, le=256)
    platform: str | None = None
    arch: str | None = None
    version: str | None = None
    hostname: str | None = None
    cpu_count: int | None = None
    total_memory_mb: int | None = None
    running_as_uid: int | None = None
    step_uid: int | None = None
    """The uid job steps run as (None: the agent's own, `running_as_uid`). 0 needs a token that allows
    root steps."""
    in_flight_jobs: list[InFlightJob] = []


class Heartbeat(Message):
    type: Literal["heartbeat"] = "heartbeat"
    timestamp: float


class AgentStatus(Message):
    type: Literal["agent.status"] = "agent.status"
    active_jobs: int = Field(ge=0)
    draining: bool = False


class JobAck(Message):
    type: Literal["job.ack"] = "job.ack"
    job_id: str
    run_id: str


class JobReject(Message):
    type: Literal["job.reject"] = "job.reject"
    job_id: str
    run_id: str
    reason: Literal["busy", "draining", "unsupported"]


AgentJobState = Literal["running", "success", "failed", "cancelled", "skipped"]


class JobStatusUpdate(Message):
    type: Literal["job.status"] = "job.status"
    run_id: str
    job_id: str
    state: AgentJobState
    timestamp: float
    error: str | None = None
    failure_category: str | None = None
    outputs: dict[str, Any] | None = None


class StepStatusUpdate(Message):
    type: Literal["step.status"] = "step.status"
    run_id: str
    job_id: str
    step_index: int = Field(ge=0)
    step_name: str
    state: Literal["running", "success", "failed", "skipped", "cancelled", "timed_out"]
    attempt: int = 1
    duration_ms: int | None = None
    error: str | None = None
    timestamp: float


class LogChunk(Message):
    type: Literal["log.chunk"] = "log.chunk"
    run_id: str
    job_id: str
    step_index: int = Field(ge=-1)
    """-1: job setup output outside any step."""
    lines: list[str]
    timestamp: float
    seq: int | None = None
    """Per-job sequence number, so a replayed chunk after a reconnect is stored once."""


class JobHeartbeat(Message):
    type: Literal["job.heartbeat"] = "job.heartbeat"
    run_id: str
    job_id: str
    timestamp: float


class DeliverySync(Message):
    """Asks the orchestrator to confirm that every message the agent sent before this one has been
    processed durably (written to the database and the log store). The agent keeps job messages, and
    the jobs themselves, until that confirmation: a transport-level acknowledgement (a WebSocket pong)
    only says the frames were read, and an orchestrator killed right after reading them loses them."""

    type: Literal["delivery.sync"] = "delivery.sync"
    id: int = Field(ge=0)


AgentMessage = Annotated[
    AuthRequest
    | AgentRegister
    | Heartbeat
    | AgentStatus
    | JobAck
    | JobReject
    | JobStatusUpdate
    | StepStatusUpdate
    | LogChunk
    | JobHeartbeat
    | DeliverySync,
    Field(discriminator="type"),
]

# ---------------------------------------------------------------------------------------------- orchestrator → agent


class AuthSuccess(Message):
    type: Literal["auth.success"] = "auth.success"
    connection_id: str


class AuthFailure(Message):
    type: Literal["auth.failure"] = "auth.failure"
    reason: str


class RegisterAck(Message):
    type: Literal["register.ack"] = "register.ack"
    agent_id: str
    labels: list[str]
    scaler_managed: bool = False
    pending_dispatch: bool = False
    reclaimed_jobs: list[str] = []
    """In-flight jobs the orchestrator accepted back after a reconnect; others must be abandoned."""


class DispatchCache(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str
    """A key template (`kici.sdk.caching`): resolved by the agent on the checkout."""
    paths: list[str]
    restore_keys: list[str] = []


class JobDispatch(Message):
    type: Literal["job.dispatch"] = "job.dispatch"
    message_id: str
    run_id: str
    job_id: str
    repo_url: str
    ref: str | None = None
    sha: str
    workflow: str
    job: str
    """The job's name in the lock file (before matrix expansion)."""
    display_name: str
    matrix: dict[str, Any] | None = None
    workflow_file: str
    export: str
    content_hash: str
    event: dict[str, Any]
    env: dict[str, str] = {}
    secrets: dict[str, str] = {}
    upstream_outputs: dict[str, Any] = {}
    token: str | None = None
    """Clone credential (sent in an HTTP header by the agent, never on a command line)."""
    job_timeout_ms: int | None = None
    grace_period_ms: int | None = None
    """The job's `grace_period` (lock file): on a cancel, how long its commands get between SIGTERM and
    SIGKILL; None → the runner's default (5 s)."""
    max_log_size_bytes: int | None = None
    artifacts: list[str] = []
    """The job's `artifacts` globs (lock file): files the agent uploads after the job."""
    artifacts_when: Literal["success", "on_failure", "always"] = "success"
    test_reports: list[str] = []
    """The job's `test_reports` globs (lock file): JUnit XML files the agent sends after the job."""
    python: str | None = None
    """The job's `python=` ("3", "3.12" or "3.12.7"): the agent puts that interpreter first on PATH."""
    python_venv: bool = False
    """With `python`: the steps run in a fresh virtualenv of that interpreter (VIRTUAL_ENV set)."""
    resources: ResourceLimits | None = None
    """The job's `resources=` (lock file); the agent combines them with its defaults and maxima."""
    caches: list[DispatchCache] = []
    """The job's `cache=` (lock file): key templates and paths the agent restores before the steps and
    saves after a successful job (kici.agent.caches)."""
    attempt: int = 1
    timestamp: float


class JobCancel(Message):
    type: Literal["job.cancel"] = "job.cancel"
    run_id: str
    job_id: str
    reason: str = "cancelled"
    force: bool = False


class ErrorMessage(Message):
    type: Literal["error"] = "error"
    code: str
    message: str


class DeliverySynced(Message):
    """The answer to `delivery.sync` with the same id: everything the agent sent before it is durable."""

    type: Literal["delivery.synced"] = "delivery.synced"
    id: int = Field(ge=0)


OrchestratorMessage = Annotated[
    AuthSuccess | AuthFailure | RegisterAck | JobDispatch | JobCancel | ErrorMessage | DeliverySynced,
    Field(discriminator="type"),
]

_agent_adapter: TypeAdapter[AgentMessage] = TypeAdapter(AgentMessage)
_orchestrator_adapter: TypeAdapter[OrchestratorMessage] = TypeAdapter(OrchestratorMessage)


class ProtocolError(ValueError):
    """A frame that is not a valid message of its direction; `str()` is one line."""


def _first(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "message"
    return f"{where}: {err['msg']}"


def parse_agent_message(frame: str | bytes) -> AgentMessage:
    try:
        return _agent_adapter.validate_json(frame)
    except ValidationError as exc:
        raise ProtocolError(f"invalid agent message: {_first(exc)}") from None


def parse_orchestrator_message(frame: str | bytes) -> OrchestratorMessage:
    try:
        return _orchestrator_adapter.validate_json(frame)
    except ValidationError as exc:
        raise ProtocolError(f"invalid orchestrator message: {_first(exc)}") from None


def encode(message: Message) -> str:
    return message.model_dump_json(by_alias=True, exclude_none=True)
