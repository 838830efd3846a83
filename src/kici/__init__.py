"""KiCI: a CI/CD system whose workflows are Python code under `.kici/workflows/`.

```python
from kici import workflow, job, step, push, pr

lint = step("lint", "ruff check .")
build = job("build", steps=[lint])
ci = workflow("ci", on=[push(branches=["main"]), pr(target=["main"])], jobs=[build])
```
"""

from kici.sdk import inputs
from kici.sdk.caching import hash_files
from kici.sdk.context import (
    AttrDict,
    CommandFailed,
    CommandTimedOut,
    Context,
    MissingSecretError,
    ShellResult,
    StepFailure,
)
from kici.sdk.definitions import (
    Cache,
    Concurrency,
    Job,
    Need,
    Resources,
    Retry,
    Rule,
    Step,
    Workflow,
    job,
    need,
    rule,
    skip,
    step,
    workflow,
)
from kici.sdk.triggers import (
    Trigger,
    comment,
    create,
    delete,
    dispatch,
    fork,
    generic_webhook,
    job_complete,
    kici_event,
    pr,
    push,
    release,
    review,
    review_comment,
    schedule,
    star,
    status,
    tag,
    watch,
    webhook,
    workflow_complete,
    workflow_run,
)

__version__ = "0.1.0"

__all__ = [
    "AttrDict",
    "Cache",
    "CommandFailed",
    "CommandTimedOut",
    "Concurrency",
    "Context",
    "Job",
    "MissingSecretError",
    "Need",
    "Resources",
    "Retry",
    "Rule",
    "ShellResult",
    "Step",
    "StepFailure",
    "Trigger",
    "Workflow",
    "__version__",
    "comment",
    "create",
    "delete",
    "dispatch",
    "fork",
    "generic_webhook",
    "hash_files",
    "inputs",
    "job",
    "job_complete",
    "kici_event",
    "need",
    "pr",
    "push",
    "release",
    "review",
    "review_comment",
    "rule",
    "schedule",
    "skip",
    "star",
    "status",
    "step",
    "tag",
    "watch",
    "webhook",
    "workflow",
    "workflow_complete",
    "workflow_run",
]
