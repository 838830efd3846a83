"""SDK triggers → lock-file triggers, with validation."""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kici.compiler import unsupported
from kici.compiler.errors import Collector
from kici.engine import lockfile as lf
from kici.engine.events import PR_ACTIONS_DEFAULT
from kici.engine.regex_safety import glob_problem, regex_problem
from kici.sdk.inputs import Input
from kici.sdk.triggers import Trigger

PR_ACTIONS = frozenset(
    {
        "opened", "synchronize", "reopened", "closed", "edited", "labeled", "unlabeled",
        "ready_for_review", "converted_to_draft", "assigned", "unassigned", "review_requested",
        "review_request_removed", "locked", "unlocked", "auto_merge_enabled", "auto_merge_disabled",
        "enqueued", "dequeued", "milestoned", "demilestoned",
    }
)
PR_ACTION_ALIASES = {"open": "opened", "sync": "synchronize", "close": "closed", "reopen": "reopened"}
_CRON_FIELD = re.compile(r"^[\d*/,\-A-Za-z?LW#]+$")
_CRON_MACROS = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"})


def regex_flags(pattern: re.Pattern[str], where: Collector) -> str | None:
    flags = ""
    if pattern.flags & re.IGNORECASE:
        flags += "i"
    if pattern.flags & re.MULTILINE:
        flags += "m"
    if pattern.flags & re.DOTALL:
        flags += "s"
    if pattern.flags & re.VERBOSE:
        where.error(f"regex {pattern.pattern!r}: re.VERBOSE is not supported in lock-file regexes")
    return flags or None


def branch_patterns(values: Iterable[Any], where: Collector, what: str) -> list[lf.BranchPattern]:
    out: list[lf.BranchPattern] = []
    for value in values:
        if isinstance(value, re.Pattern):
            problem = regex_problem(value.pattern)
            if problem:
                where.error(f"{what} regex {value.pattern!r}: {problem}")
                continue
            out.append(lf.BranchPattern(type="regex", pattern=value.pattern, flags=regex_flags(value, where)))
        elif isinstance(value, str) and value:
            problem = glob_problem(value)
            if problem:
                where.error(f"{what}: {problem}")
                continue
            out.append(lf.BranchPattern(type="glob", pattern=value))
        else:
            where.error(f"{what}: {value!r} is not a glob string or compiled regex")
    return out


def _strings(values: Iterable[Any] | None, where: Collector, what: str) -> list[str]:
    out: list[str] = []
    for value in values or ():
        if isinstance(value, str) and value:
            out.append(value)
        else:
            where.error(f"{what}: {value!r} is not a non-empty string")
    return out


def _paths(values: Iterable[Any] | None, where: Collector, what: str) -> list[str]:
    out: list[str] = []
    for value in _strings(values, where, what):
        problem = glob_problem(value.removeprefix("!"))
        if problem:
            where.error(f"{what}: {problem}")
        else:
            out.append(value)
    return out


def _json_values(value: Mapping[str, Any] | None, where: Collector, what: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        where.error(f"{what} must be a mapping of JSONPath to value")
        return None
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            where.error(f"{what}: key {key!r} must be a JSONPath string")
        elif not _is_json(item):
            where.error(f"{what}[{key!r}]: {item!r} is not a JSON value")
        else:
            if isinstance(item, str) and len(item) > 2 and item.startswith("/") and item.rstrip("imsu").endswith("/"):
                body = item[1 : item.rstrip("imsu").rindex("/")]
                problem = regex_problem(body)
                if problem:
                    where.error(f"{what}[{key!r}] regex {item!r}: {problem}")
            out[key] = item
    return out


def _is_json(value: Any) -> bool:
    if value is None or isinstance(value, str | int | float | bool):
        return True
    if isinstance(value, list | tuple):
        return all(_is_json(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return False


def _input_spec(name: str, spec: Any, where: Collector) -> lf.InputSpec | None:
    if not isinstance(spec, Input):
        where.error(f"input {name!r} must be declared with kici.inputs.string/number/boolean/choice/environment")
        return None
    if spec.type == "choice" and not spec.options:
        where.error(f"input {name!r}: a choice needs at least one option")
    if spec.default is not None and spec.type == "choice" and spec.options and spec.default not in spec.options:
        where.error(f"input {name!r}: default {spec.default!r} is not one of its options")
    return lf.InputSpec(
        type=spec.type,
        description=spec.description,
        required=spec.required,
        default=spec.default,
        options=list(spec.options) if spec.options is not None else None,
    )


def validate_cron(expr: str) -> str | None:
    """Why `expr` is not a usable cron expression, or None."""
    text = expr.strip()
    if text in _CRON_MACROS:
        return None
    fields = text.split()
    if len(fields) != 5:
        return f"cron expression {expr!r} must have 5 fields (minute hour day month weekday)"
    for f in fields:
        if not _CRON_FIELD.match(f):
            return f"cron expression {expr!r}: bad field {f!r}"
    # the orchestrator's scheduler evaluates it with croniter: refuse here what it would refuse there
    from croniter import croniter

    if not croniter.is_valid(text):
        return f"cron expression {expr!r} is not valid (a value out of range, or an unknown name)"
    return None


def convert_trigger(trigger: Any, where: Collector) -> list[lf.Trigger]:
    """One SDK trigger becomes one lock trigger, except `push(branches, tags=...)`, which becomes two."""
    if not isinstance(trigger, Trigger):
        where.error(f"on=: {trigger!r} is not a trigger (use push(), pr(), tag(), schedule(), …)")
        return []
    o = trigger.options
    kind = trigger.kind
    unsupported.refuse_trigger(kind, dict(o), where)
    if kind == "push":
        out: list[lf.Trigger] = []
        tags = branch_patterns(o["tags"], where, "push tags")
        if o["branches"] or not o["tags"]:
            out.append(
                lf.PushTrigger(
                    branches=branch_patterns(o["branches"], where, "push branches"),
                    paths=_paths(o["paths"], where, "push paths"),
                    repos=_strings(o["repos"], where, "push repos") if o["repos"] is not None else None,
                )
            )
        elif o["paths"]:
            where.error("push(tags=…, paths=…): a tag push has no changed files; add branches= or drop paths=")
        if o["tags"]:
            out.append(lf.TagTrigger(patterns=tags))
        return out
    if kind == "pr":
        events = list(PR_ACTIONS_DEFAULT) if o["events"] is None else []
        for e in o["events"] or ():
            e = PR_ACTION_ALIASES.get(e, e)
            if e not in PR_ACTIONS:
                where.error(f"pr events: unknown action {e!r} (known: {', '.join(sorted(PR_ACTIONS))})")
            else:
                events.append(e)
        return [
            lf.PrTrigger(
                events=events,
                target_branches=branch_patterns(o["target"], where, "pr target"),
                source_branches=branch_patterns(o["source"], where, "pr source"),
                paths=_paths(o["paths"], where, "pr paths"),
                repos=_strings(o["repos"], where, "pr repos") if o["repos"] is not None else None,
            )
        ]
    if kind == "tag":
        return [lf.TagTrigger(patterns=branch_patterns(o["patterns"], where, "tag patterns"))]
    if kind == "schedule":
        problem = validate_cron(o["cron"]) if isinstance(o["cron"], str) else "cron must be a string"
        if problem:
            where.error(problem)
        try:
            zoneinfo.ZoneInfo(o["timezone"])
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError):
            where.error(f"schedule timezone {o['timezone']!r} is not a known time zone")
        inputs: dict[str, str | int | float | bool] = {}
        for name, value in (o["inputs"] or {}).items():
            if isinstance(value, Input):
                if value.default is None:
                    where.error(f"schedule input {name!r} has no default (a schedule has nobody to ask)")
                    continue
                value = value.default
            if not isinstance(value, str | int | float | bool):
                where.error(f"schedule input {name!r}: {value!r} is not a string, number or boolean")
                continue
            inputs[name] = value
        return [lf.ScheduleTrigger(cron_expression=str(o["cron"]), timezone=str(o["timezone"]), inputs=inputs or None)]
    if kind == "dispatch":
        specs: dict[str, lf.InputSpec] = {}
        for name, spec in (o["inputs"] or {}).items():
            converted = _input_spec(name, spec, where)
            if converted is not None:
                specs[name] = converted
        return [lf.DispatchTrigger(types=_strings(o["types"], where, "dispatch types"), inputs=specs or None)]
    if kind == "comment":
        body = branch_patterns([o["body"]], where, "comment body")[0] if o["body"] is not None else None
        if o["source"] not in (None, "pr", "issue"):
            where.error(f"comment source must be 'pr' or 'issue', not {o['source']!r}")
        return [lf.CommentTrigger(actions=_strings(o["actions"], where, "comment actions"), source=o["source"]
                                  if o["source"] in ("pr", "issue") else None, body_match=body)]
    if kind == "review":
        return [lf.ReviewTrigger(actions=_strings(o["actions"], where, "review actions"),
                                 states=[s.lower() for s in _strings(o["states"], where, "review states")])]
    if kind in ("review_comment", "release", "star", "watch"):
        model = {"review_comment": lf.ReviewCommentTrigger, "release": lf.ReleaseTrigger,
                 "star": lf.StarTrigger, "watch": lf.WatchTrigger}[kind]
        return [model(actions=_strings(o["actions"], where, f"{kind} actions"))]
    if kind == "fork":
        return [lf.ForkTrigger()]
    if kind in ("create", "delete"):
        ref_types = _strings(o["ref_types"], where, f"{kind} ref_types")
        bad = [r for r in ref_types if r not in ("branch", "tag")]
        if bad:
            where.error(f"{kind} ref_types must be 'branch' or 'tag', not {bad}")
        ref_model = lf.CreateTrigger if kind == "create" else lf.DeleteTrigger
        return [ref_model(ref_types=[r for r in ref_types if r in ("branch", "tag")],  # type: ignore[misc]
                          patterns=branch_patterns(o["patterns"], where, f"{kind} patterns"))]
    if kind == "status":
        return [lf.StatusTrigger(contexts=_strings(o["contexts"], where, "status contexts"),
                                 states=_strings(o["states"], where, "status states"))]
    if kind == "workflow_run":
        return [lf.WorkflowRunTrigger(actions=_strings(o["actions"], where, "workflow_run actions"),
                                      workflows=_strings(o["workflows"], where, "workflow_run workflows"),
                                      conclusions=_strings(o["conclusions"], where, "workflow_run conclusions"))]
    if kind == "webhook":
        return [lf.WebhookTrigger(events=_strings(o["events"], where, "webhook events"),
                                  actions=_strings(o["actions"], where, "webhook actions"))]
    if kind == "kici_event":
        if not isinstance(o["name"], str) or not o["name"]:
            where.error("kici_event needs an event name")
            return []
        return [lf.KiciEventTrigger(event_name=o["name"], match=_json_values(o["match"], where, "kici_event match"),
                                    not_=_json_values(o["not"], where, "kici_event not_"), source=o["source"])]
    if kind == "generic_webhook":
        if not isinstance(o["source"], str) or not o["source"]:
            where.error("generic_webhook needs a source name")
            return []
        return [lf.GenericWebhookTrigger(
            source=o["source"],
            events=_strings(o["events"], where, "generic_webhook events") if o["events"] is not None else None,
            match=_json_values(o["match"], where, "generic_webhook match"),
            not_=_json_values(o["not"], where, "generic_webhook not_"),
            path=o["path"],
        )]
    if kind == "workflow_complete":
        return [lf.WorkflowCompleteTrigger(name=o["name"], status=_statuses(o["status"], where), source=o["source"])]
    if kind == "job_complete":
        return [lf.JobCompleteTrigger(workflow=o["workflow"], job=o["job"], status=_statuses(o["status"], where),
                                      source=o["source"])]
    where.error(f"unknown trigger type {kind!r}")
    return []


def _statuses(values: Sequence[str] | None, where: Collector) -> list[str] | None:
    if values is None:
        return None
    allowed = set(lf.JOB_STATUSES)
    bad = [v for v in values if v not in allowed]
    if bad:
        where.error(f"status {bad} not among {', '.join(lf.JOB_STATUSES)}")
    return [v for v in values if v in allowed]
