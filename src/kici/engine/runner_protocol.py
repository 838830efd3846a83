"""Messages between a job's runner child process and its parent (the agent, or `kici run local`).

The parent starts `python -m kici.runner` in a new session and writes one `JobSpec` line to its stdin;
later stdin lines are control messages (`CancelRequest`). The runner writes JSON lines of `RunnerMessage`
to the file descriptor named by `--protocol-fd`; everything the runner process or its commands write to
stdout/stderr becomes `LogLine`s of the current step. Secret masking is the parent's job, so a step
cannot bypass it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from kici.engine.events import Event

SETUP_STEP_INDEX = -1
"""`step_index` of output that belongs to no step (setup, drift gate, job hooks)."""

WORKFLOW_HOOKS_JOB = "__workflow_hooks__"
"""`JobSpec.job` that runs the workflow's own hooks (`on_success`/`on_failure`/`on_cancel`, then
`cleanup`) after all its jobs finished; `JobSpec.run_status` says how the run ended."""

StepState = Literal["running", "success", "failed", "skipped", "cancelled", "timed_out"]
JobResultStatus = Literal["success", "failed", "cancelled", "skipped"]


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobSpec(_Msg):
    """Everything the runner needs to run one job (one matrix child) of one workflow."""

    workspace: str
    """The checkout; steps run here."""
    workflow_file: str
    """Path of the workflow module relative to the workspace, e.g. `.kici/workflows/ci.py`."""
    export: str
    """Which module global holds the workflow: `#ci` or `#pipelines[1]`."""
    workflow: str
    job: str
    """The job's name in the lock file (before matrix expansion)."""
    display_name: str
    """The name shown for this job (the matrix child name, e.g. `test (3.11)`)."""
    matrix: dict[str, Any] | None = None
    event: Event
    env: dict[str, str] = {}
    """Base environment for commands (already allow-listed by the parent)."""
    secrets: dict[str, str] = {}
    upstream_outputs: dict[str, Any] = {}
    """Upstream job name → outputs (`{step: {...}}`, or `{by_matrix, merged}` for a matrix upstream)."""
    expected_content_hash: str | None = None
    """Drift gate: the lock file's contentHash; the runner recomputes it and refuses to run on mismatch."""
    default_step_timeout_ms: int = 30 * 60 * 1000
    job_timeout_ms: int | None = None
    grace_period_ms: int | None = None
    """The job's `grace_period` from the lock file: how long cancelled commands get between SIGTERM and
    SIGKILL (None: the runner's default)."""
    hook_timeout_ms: int = 5 * 60 * 1000
    kici_dir: str = ".kici"
    run_id: str | None = None
    job_id: str | None = None
    run_status: Literal["success", "failed", "cancelled"] | None = None
    """Only for `WORKFLOW_HOOKS_JOB`: the run's result, which picks the hooks to run."""


class CancelRequest(_Msg):
    type: Literal["cancel"] = "cancel"
    force: bool = False
    reason: str = "cancelled"


class CacheReply(_Msg):
    """The parent's answer to a `CacheRequest` (a control line on the runner's stdin)."""

    type: Literal["cache.reply"] = "cache.reply"
    id: int
    matched: str | None = None
    """`restore`: the key restored (None on a miss)."""
    saved: bool = False
    """`save`: whether the cache was stored."""
    error: str | None = None
    """Set when the request itself is wrong (an unresolvable key, a path leaving the workspace): the step's
    `ctx.cache` call raises it. Storage trouble is not an error here (a miss, or `saved` false)."""
    lines: list[str] = []
    """What to show in the step's log (hit, miss, saved, why not)."""


class StepStatus(_Msg):
    type: Literal["step.status"] = "step.status"
    step_index: int
    step_name: str
    state: StepState
    attempt: int = 1
    duration_ms: int | None = None
    error: str | None = None
    outputs: dict[str, Any] | None = None


class LogLine(_Msg):
    type: Literal["log"] = "log"
    step_index: int
    stream: Literal["stdout", "stderr", "system"] = "stdout"
    line: str


class LogLines(_Msg):
    """Several lines of one step and stream in one message: what the runner sends for output that comes
    in bursts (one message per line was most of the cost of a chatty step)."""

    type: Literal["logs"] = "logs"
    step_index: int
    stream: Literal["stdout", "stderr", "system"] = "stdout"
    lines: list[str]


def log_lines(message: object) -> list[str]:
    """The output lines a runner message carries (none for messages that are not logs)."""
    if isinstance(message, LogLine):
        return [message.line]
    if isinstance(message, LogLines):
        return message.lines
    return []


class JobStarted(_Msg):
    type: Literal["job.started"] = "job.started"
    steps: list[str]


class JobResult(_Msg):
    type: Literal["job.result"] = "job.result"
    status: JobResultStatus
    outputs: dict[str, Any] = {}
    error: str | None = None
    failure_category: str | None = None
    """`drift`, `import`, `step`, `hook`, `timeout`, `cancelled`, `internal` — for reports and retries."""
    artifacts: list[str] = []
    """Workspace-relative files the steps asked to keep (`ctx.upload_artifact`); the agent uploads them."""


class CacheRequest(_Msg):
    """A step's `ctx.cache.restore` or `ctx.cache.save`: the parent transfers the cache and answers with a
    `CacheReply` of the same `id` on the runner's stdin; the step waits for it."""

    type: Literal["cache.request"] = "cache.request"
    id: int
    step_index: int
    op: Literal["restore", "save"]
    key: str
    """A key template, like `cache=`'s (`kici.sdk.caching`): the parent resolves it."""
    paths: list[str]
    restore_keys: list[str] = []


RunnerMessage = Annotated[
    StepStatus | LogLine | LogLines | JobStarted | JobResult | CacheRequest,
    Field(discriminator="type"),
]

_runner_message: TypeAdapter[RunnerMessage] = TypeAdapter(RunnerMessage)


def parse_runner_message(line: str | bytes) -> RunnerMessage:
    """Parse one JSON line the runner wrote (raises pydantic.ValidationError on garbage)."""
    return _runner_message.validate_json(line)
