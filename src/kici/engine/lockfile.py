"""The lock file (`.kici/kici.lock.json`): the only view of a repository's workflows that the orchestrator has.

The shape follows the original KiCI lock file (camelCase keys, `_type` discriminators, `schemaVersion`,
per-workflow `contentHash`) with this project's own version numbering. Parsing is strict: unknown keys,
a foreign `schemaVersion` and wrong types are all errors, reported as one readable line.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from kici.engine.regex_safety import glob_problem, regex_problem
from kici.engine.resources import ResourceLimits

SCHEMA_VERSION = 1
"""Version of the lock-file format. The orchestrator and agent accept exactly this value."""

COMPILE_SCHEMA_VERSION = 1
"""Version of the per-workflow hash formula (the prefix of the hashed text)."""

LOCK_FILE_PATH = ".kici/kici.lock.json"

JOB_STATUSES: tuple[str, ...] = (
    "success",
    "failed",
    "cancelled",
    "skipped",
    "timed_out_stale",
    "drift_dropped",
)
"""Terminal job statuses a `needs` edge can name in its `runOn` set."""


class LockModel(BaseModel):
    """Base for every lock-file model: camelCase on the wire, strict, immutable."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        populate_by_name=True,
        alias_generator=to_camel,
        defer_build=True,  # most trigger models are never used in a process; build them on first use
    )


class SourceRef(LockModel):
    file: str
    export: str


class BranchPattern(LockModel):
    """A branch/tag/ref pattern: a picomatch glob or a regular expression (JS/Python common syntax)."""

    type: Literal["glob", "regex"]
    pattern: str
    flags: str | None = None

    @model_validator(mode="after")
    def _safe(self) -> BranchPattern:
        # lock files come from repositories: a pattern that backtracks catastrophically must not reach
        # the orchestrator's matcher
        problem = regex_problem(self.pattern) if self.type == "regex" else glob_problem(self.pattern)
        if problem:
            raise ValueError(problem)
        return self


def _safe_paths(paths: list[str]) -> list[str]:
    for path in paths:
        problem = glob_problem(path.removeprefix("!"))
        if problem:
            raise ValueError(problem)
    return paths


class InlineExpr(LockModel):
    """A pure `lambda event: ...` kept as source; evaluated by `kici.engine.inline_expr`."""

    type: Literal["inline"] = Field(default="inline", alias="_type")
    expression: str

    @field_validator("expression")
    @classmethod
    def _pure(cls, value: str) -> str:
        # checked at parse time so a bad expression is a lock-file error, not a failure at dispatch
        from kici.engine.inline_expr import check_pure

        check_pure(value)
        return value


class InputSpec(LockModel):
    """A typed dispatch/schedule input."""

    type: Literal["string", "number", "boolean", "choice", "environment"]
    description: str | None = None
    required: bool = False
    default: str | int | float | bool | None = None
    options: list[str] | None = None


# ---------------------------------------------------------------------------------------------- triggers


class PushTrigger(LockModel):
    type: Literal["push"] = Field(default="push", alias="_type")
    branches: list[BranchPattern] = []
    paths: list[str] = []
    repos: list[str] | None = None

    _paths = field_validator("paths")(_safe_paths)


class PrTrigger(LockModel):
    type: Literal["pr"] = Field(default="pr", alias="_type")
    events: list[str]
    target_branches: list[BranchPattern] = []
    source_branches: list[BranchPattern] = []
    paths: list[str] = []
    repos: list[str] | None = None

    _paths = field_validator("paths")(_safe_paths)


class TagTrigger(LockModel):
    type: Literal["tag"] = Field(default="tag", alias="_type")
    patterns: list[BranchPattern] = []


class CommentTrigger(LockModel):
    type: Literal["comment"] = Field(default="comment", alias="_type")
    actions: list[str] = []
    source: Literal["pr", "issue"] | None = None
    body_match: BranchPattern | None = None


class ReviewTrigger(LockModel):
    type: Literal["review"] = Field(default="review", alias="_type")
    actions: list[str] = []
    states: list[str] = []


class ReviewCommentTrigger(LockModel):
    type: Literal["review_comment"] = Field(default="review_comment", alias="_type")
    actions: list[str] = []


class ReleaseTrigger(LockModel):
    type: Literal["release"] = Field(default="release", alias="_type")
    actions: list[str] = []


class StarTrigger(LockModel):
    type: Literal["star"] = Field(default="star", alias="_type")
    actions: list[str] = []


class WatchTrigger(LockModel):
    type: Literal["watch"] = Field(default="watch", alias="_type")
    actions: list[str] = []


class ForkTrigger(LockModel):
    type: Literal["fork"] = Field(default="fork", alias="_type")


class DispatchTrigger(LockModel):
    type: Literal["dispatch"] = Field(default="dispatch", alias="_type")
    types: list[str] = []
    inputs: dict[str, InputSpec] | None = None


class CreateTrigger(LockModel):
    type: Literal["create"] = Field(default="create", alias="_type")
    ref_types: list[Literal["branch", "tag"]] = []
    patterns: list[BranchPattern] = []


class DeleteTrigger(LockModel):
    type: Literal["delete"] = Field(default="delete", alias="_type")
    ref_types: list[Literal["branch", "tag"]] = []
    patterns: list[BranchPattern] = []


class StatusTrigger(LockModel):
    type: Literal["status"] = Field(default="status", alias="_type")
    contexts: list[str] = []
    states: list[str] = []


class WorkflowRunTrigger(LockModel):
    type: Literal["workflow_run"] = Field(default="workflow_run", alias="_type")
    actions: list[str] = []
    workflows: list[str] = []
    conclusions: list[str] = []


class WebhookTrigger(LockModel):
    """Catch-all: any provider event by its raw name (e.g. GitHub's `X-GitHub-Event`)."""

    type: Literal["webhook"] = Field(default="webhook", alias="_type")
    events: list[str] = []
    actions: list[str] = []


class KiciEventTrigger(LockModel):
    type: Literal["kici_event"] = Field(default="kici_event", alias="_type")
    event_name: str
    match: dict[str, Any] | None = None
    not_: dict[str, Any] | None = Field(default=None, alias="not")
    source: str | None = None


class WorkflowCompleteTrigger(LockModel):
    type: Literal["workflow_complete"] = Field(default="workflow_complete", alias="_type")
    name: str | None = None
    status: list[str] | None = None
    source: str | None = None


class JobCompleteTrigger(LockModel):
    type: Literal["job_complete"] = Field(default="job_complete", alias="_type")
    workflow: str | None = None
    job: str | None = None
    status: list[str] | None = None
    source: str | None = None


class GenericWebhookTrigger(LockModel):
    type: Literal["generic_webhook"] = Field(default="generic_webhook", alias="_type")
    source: str
    events: list[str] | None = None
    match: dict[str, Any] | None = None
    not_: dict[str, Any] | None = Field(default=None, alias="not")
    path: str | None = None


class ScheduleTrigger(LockModel):
    type: Literal["schedule"] = Field(default="schedule", alias="_type")
    cron_expression: str
    timezone: str = "UTC"
    inputs: dict[str, str | int | float | bool] | None = None


Trigger = Annotated[
    PushTrigger
    | PrTrigger
    | TagTrigger
    | CommentTrigger
    | ReviewTrigger
    | ReviewCommentTrigger
    | ReleaseTrigger
    | StarTrigger
    | WatchTrigger
    | ForkTrigger
    | DispatchTrigger
    | CreateTrigger
    | DeleteTrigger
    | StatusTrigger
    | WorkflowRunTrigger
    | WebhookTrigger
    | KiciEventTrigger
    | WorkflowCompleteTrigger
    | JobCompleteTrigger
    | GenericWebhookTrigger
    | ScheduleTrigger,
    Field(discriminator="type"),
]

# ---------------------------------------------------------------------------------------------- jobs


class LabelMatcher(LockModel):
    """`exact` compares case-sensitively; `regex` (globs are compiled to regexes) is searched anchored."""

    kind: Literal["exact", "regex"]
    value: str | None = None
    source: str | None = None
    flags: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> LabelMatcher:
        if self.kind == "exact" and not self.value:
            raise ValueError("an exact label matcher needs `value`")
        if self.kind == "regex" and not self.source:
            raise ValueError("a regex label matcher needs `source`")
        return self


SECRET_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,127}")
"""Declared secret names: they become `ctx.secrets` keys and environment variable names in steps."""


def secret_names_problem(names: list[str]) -> str | None:
    """Why `names` is not a valid `secrets` declaration (None when it is)."""
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str) or not SECRET_NAME.fullmatch(name):
            return (f"secret name {name!r} is invalid: use upper-case letters, digits and '_', not starting "
                    "with a digit (at most 128 characters)")
        if name in seen:
            return f"secret {name!r} is declared twice"
        seen.add(name)
    return None


class Need(LockModel):
    name: str
    run_on: list[str] = ["success"]

    @field_validator("run_on")
    @classmethod
    def _statuses(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if v not in JOB_STATUSES]
        if bad or not value:
            raise ValueError(f"runOn must be a non-empty list of {', '.join(JOB_STATUSES)}; got {value}")
        return value


class SourceLocation(LockModel):
    file: str
    index: int


class RuleRef(LockModel):
    """A rule runs on the agent; the lock file keeps only its label and where it is defined."""

    type: Literal["dynamic"] = Field(default="dynamic", alias="_type")
    label: str
    source: SourceLocation


class RetryPolicy(LockModel):
    max_attempts: int
    delay_ms: int = 1000
    backoff: Literal["exponential", "fixed"] = "exponential"
    max_delay_ms: int = 30_000
    has_retry_if: bool = False


class CacheSpec(LockModel):
    key: str
    paths: list[str]
    restore_keys: list[str] = []


class HookFlags(LockModel):
    """Which hooks a workflow/job/step defines; the code itself only runs on agents."""

    has_on_success: bool = False
    has_on_failure: bool = False
    has_cleanup: bool = False
    has_on_cancel: bool = False
    has_before_step: bool = False
    has_after_step: bool = False


class Step(LockModel):
    name: str
    has_outputs: bool = False
    continue_on_error: bool | None = None
    timeout: int | None = None
    """Milliseconds; absent means the 30-minute default."""
    retry: RetryPolicy | None = None
    cache: list[CacheSpec] | None = None
    rules: list[RuleRef] | None = None
    hooks: HookFlags | None = None
    source_location: SourceLocation | None = None


class StaticMatrix(LockModel):
    type: Literal["static"] = Field(default="static", alias="_type")
    values: list[Any] | dict[str, list[Any]]


class EnvironmentRef(LockModel):
    value: str | InlineExpr
    dynamic: bool = False


class Job(LockModel):
    type: Literal["static"] = Field(default="static", alias="_type")
    name: str
    runs_on: list[LabelMatcher] = []
    exclude_labels: list[LabelMatcher] | None = None
    runs_on_pick: Literal["deterministic"] = "deterministic"
    needs: list[Need] = []
    steps: list[Step]
    matrix: StaticMatrix | None = None
    include: list[dict[str, Any]] | None = None
    exclude: list[dict[str, Any]] | None = None
    rules: list[RuleRef] | None = None
    environments: list[EnvironmentRef] | None = None
    secrets: list[str] | None = None
    """The secret names the job declares: dispatch resolves exactly these (env > repo > org scope)."""
    env: dict[str, str] | None = None
    concurrency_group: str | InlineExpr | None = None
    timeout: int | None = None
    grace_period: int | None = None
    cache: list[CacheSpec] | None = None
    hooks: HookFlags | None = None
    continue_on_error: bool | None = None
    artifacts: list[str] | None = None
    """Globs (relative to the workspace) of the files the agent uploads after the job."""
    artifacts_when: Literal["success", "on_failure", "always"] | None = None
    """When: after a successful job (None: the default), a failed one, or always."""
    test_reports: list[str] | None = None
    """Globs (relative to the workspace) of the JUnit XML files the agent sends after the job."""
    python: str | None = None
    """`python=`: "3", "3.12" or "3.12.7"; the job runs on an agent labelled `kici:python:<it>`."""
    python_venv: bool | None = None
    """`python_venv=True`: the steps run in a fresh virtualenv of that interpreter."""
    resources: ResourceLimits | None = None
    """`resources=Resources(...)`: CPU, memory (bytes) and process limits the agent enforces."""

    @field_validator("secrets")
    @classmethod
    def _secret_names(cls, value: list[str] | None) -> list[str] | None:
        # the orchestrator reads lock files from repositories: a hand-edited one gets no further than this
        if value is None:
            return None
        problem = secret_names_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value


class Concurrency(LockModel):
    has_group: bool
    group: str | InlineExpr | None = None
    cancel_in_progress: bool | None = None
    max: int | None = None


class Workflow(LockModel):
    name: str
    source: SourceRef
    content_hash: str
    compile_schema_version: int
    triggers: list[Trigger]
    jobs: list[Job]
    description: str | None = None
    rules: list[RuleRef] | None = None
    env: dict[str, str] | None = None
    timeout: int | None = None
    concurrency: Concurrency | None = None
    hooks: HookFlags | None = None

    def job(self, name: str) -> Job | None:
        return next((j for j in self.jobs if j.name == name), None)


class LockFile(LockModel):
    schema_version: int
    content_hash: str
    workflows: list[Workflow]

    def workflow(self, name: str) -> Workflow | None:
        return next((w for w in self.workflows if w.name == name), None)


# ---------------------------------------------------------------------------------------------- I/O-free codec


class LockFileError(ValueError):
    """The lock file cannot be used; the message is one line naming the problem."""


def dump_workflows(workflows: list[Workflow]) -> list[dict[str, Any]]:
    return [w.model_dump(by_alias=True, exclude_none=True, mode="json") for w in workflows]


def compute_lock_hash(schema_version: int, workflows: list[dict[str, Any]]) -> str:
    """Top-level hash: sha256 of the compact JSON of `{schemaVersion, workflows}` in key order."""
    text = json.dumps(
        {"schemaVersion": schema_version, "workflows": workflows},
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def build_lock_file(workflows: list[Workflow]) -> LockFile:
    dumped = dump_workflows(workflows)
    return LockFile(
        schema_version=SCHEMA_VERSION,
        content_hash=compute_lock_hash(SCHEMA_VERSION, dumped),
        workflows=workflows,
    )


def render_lock_file(lock: LockFile) -> str:
    """Deterministic text: same input, byte-identical output (2-space indent, trailing newline)."""
    data = lock.model_dump(by_alias=True, exclude_none=True, mode="json")
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def parse_lock_file(text: str | bytes) -> LockFile:
    """Parse and validate a lock file; raise `LockFileError` with a one-line reason."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise LockFileError(f"lock file is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise LockFileError("lock file must be a JSON object")
    version = data.get("schemaVersion")
    if version != SCHEMA_VERSION:
        raise LockFileError(
            f"lock file schemaVersion {version!r} is not supported (this KiCI reads {SCHEMA_VERSION}); "
            "recompile with `kici compile`"
        )
    try:
        lock = LockFile.model_validate(data)
    except ValidationError as exc:
        raise LockFileError(f"lock file is malformed: {_first_error(exc)}") from None
    expected = compute_lock_hash(lock.schema_version, data["workflows"])
    if lock.content_hash != expected:
        raise LockFileError(
            f"lock file contentHash {lock.content_hash} does not match its content ({expected}); "
            "it was edited by hand — recompile with `kici compile`"
        )
    return lock


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {err['msg']}{more}"
