"""Options the SDK accepts but nothing enforces yet: `kici compile` (and so `kici run local`) refuses them.

A workflow that sets one of these would otherwise compile and run as if it were absent — a cache never
restored, an environment never protected, a trigger the orchestrator never receives an event for. Until a
later issue makes an option work, naming it here turns that silent no-op into a compile error. Deleting an
entry is how the option becomes supported (tests/unit/test_sdk_options.py then needs an enforcing test).
"""

from __future__ import annotations

from typing import Any

from kici.compiler.errors import Collector

STEP_OPTIONS: dict[str, str] = {
    "cache": "caches are per job (`job(..., cache=...)`) or taken in a step with `ctx.cache`",
}
JOB_OPTIONS: dict[str, str] = {
    "environments": "a job deploys to one environment; use `environment=`",
    "continue_on_error": "a job's failure always fails the run; put continue_on_error on its steps",
}
WORKFLOW_OPTIONS: dict[str, str] = {
    "on_success": "the orchestrator does not run workflow hooks",
    "on_failure": "the orchestrator does not run workflow hooks",
    "cleanup": "the orchestrator does not run workflow hooks",
    "on_cancel": "the orchestrator does not run workflow hooks",
}
TRIGGERS: dict[str, str] = {
    "kici_event": "nothing emits KiCI events to the orchestrator",
    "workflow_complete": "the orchestrator does not emit workflow-complete events",
    "job_complete": "the orchestrator does not emit job-complete events",
}
TRIGGER_OPTIONS: dict[tuple[str, str], str] = {
    ("generic_webhook", "path"): "generic sources are addressed by name; a path never selects one",
}


def message(option: str, why: str) -> str:
    return f"{option} is not supported yet ({why}); remove it"


def _is_set(value: Any) -> bool:
    """An option counts as used when it differs from the SDK's default (None, False or empty)."""
    return value is not None and value is not False and value != () and value != []


def refuse_options(owner: Any, unsupported: dict[str, str], where: Collector) -> None:
    for name, why in unsupported.items():
        if _is_set(getattr(owner, name, None)):
            where.error(message(f"`{name}=`", why))


def refuse_trigger(kind: str, options: dict[str, Any], where: Collector) -> None:
    if kind in TRIGGERS:
        where.error(message(f"`{kind}()`", TRIGGERS[kind]))
    for (trigger_kind, name), why in TRIGGER_OPTIONS.items():
        if trigger_kind == kind and _is_set(options.get(name)):
            where.error(message(f"`{kind}({name}=…)`", why))
