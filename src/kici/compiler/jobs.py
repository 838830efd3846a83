"""SDK workflows, jobs and steps → lock-file models, with validation."""

from __future__ import annotations

import ast
import inspect
import json
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kici.compiler import unsupported
from kici.compiler.errors import Collector
from kici.compiler.lambdas import lambda_source
from kici.compiler.triggers import convert_trigger, regex_flags
from kici.engine import lockfile as lf
from kici.engine.glob import glob_to_regex_source, is_glob
from kici.engine.inline_expr import ImpureExpressionError, check_pure
from kici.engine.labels import conflicting_labels
from kici.engine.matrix import MATRIX_LIMIT, MatrixTooLargeError, expand_matrix
from kici.engine.needs import find_cycle, run_on_for
from kici.engine.regex_safety import regex_problem
from kici.engine.resources import ResourceLimits, parse_cpus, parse_memory, parse_pids
from kici.sdk import caching
from kici.sdk import definitions as d
from kici.sdk.naming import job_names, step_names

MAX_RETRY_ATTEMPTS = 20


def millis(value: Any, where: Collector, what: str) -> int | None:
    if value is None:
        return None
    try:
        secs = d.seconds(value)
    except (TypeError, ValueError):
        secs = None
    if secs is None or isinstance(value, bool) or secs <= 0:
        where.error(f"{what} must be a positive number of seconds or a timedelta, not {value!r}")
        return None
    return round(secs * 1000)


def convert_workflow(wf: d.Workflow, file: str, export: str, content_hash: str, where: Collector) -> lf.Workflow:
    triggers: list[lf.Trigger] = []
    unsupported.refuse_options(wf, unsupported.WORKFLOW_OPTIONS, where)
    for t in wf.on:
        triggers.extend(convert_trigger(t, where))
    if not wf.jobs:
        where.error("a workflow needs at least one job")
    names = job_names(wf.jobs)
    by_identity = {id(j): n for j, n in zip(wf.jobs, names, strict=True)}
    seen: set[str] = set()
    for n in names:
        if n in seen:
            where.error(f"duplicate job name {n!r}")
        seen.add(n)
    jobs = [
        convert_job(j, n, by_identity, set(names), file, where.at(job=n))
        for j, n in zip(wf.jobs, names, strict=True)
    ]
    _check_cycles(jobs, where)
    return lf.Workflow(
        name=wf.name,
        source=lf.SourceRef(file=file, export=export),
        content_hash=content_hash,
        compile_schema_version=lf.COMPILE_SCHEMA_VERSION,
        triggers=triggers,
        jobs=jobs,
        description=wf.description,
        rules=_rules(wf.rules, file, where),
        env=_env(wf.env, where, "workflow env"),
        timeout=millis(wf.timeout, where, "workflow timeout"),
        concurrency=_concurrency(wf.concurrency, where),
        hooks=_hooks(wf, where, ("on_success", "on_failure", "cleanup", "on_cancel")),
    )


def _check_cycles(jobs: list[lf.Job], where: Collector) -> None:
    edges = {j.name: [n.name for n in j.needs] for j in jobs}
    cycle = find_cycle(edges)
    if cycle:
        where.error(f"needs cycle: {' → '.join(cycle)}")


def convert_job(
    job: Any, name: str, by_identity: Mapping[int, str], all_names: set[str], file: str, where: Collector
) -> lf.Job:
    if not isinstance(job, d.Job):
        where.error(f"{job!r} is not a job (use kici.job(...))")
        return lf.Job(name=name, steps=[])
    unsupported.refuse_options(job, unsupported.JOB_OPTIONS, where)
    if job.has_run and job.has_steps:
        where.error("`run` and `steps` cannot be combined; use one of them")
    if not job.steps:
        where.error("a job needs at least one step")
    snames = step_names(job.steps)
    seen: set[str] = set()
    for s in snames:
        if s in seen:
            where.error(f"duplicate step name {s!r}")
        seen.add(s)
    runs_on, exclude = _runs_on(job.runs_on, where)
    conflicts = conflicting_labels(runs_on, exclude or [])
    if conflicts:
        where.error(f"label(s) {', '.join(conflicts)} both required and excluded")
    matrix, include, exclude_m = _matrix(job, where)
    environments = _environments(job, where)
    if job.environment is not None and job.concurrency_group is not None:
        where.error("`environment=` cannot be combined with `concurrency_group=`: an environment already runs "
                    "one deployment at a time")
    return lf.Job(
        name=name,
        runs_on=runs_on,
        exclude_labels=exclude,
        needs=_needs(job.needs, name, by_identity, all_names, where),
        steps=[convert_step(s, n, file, where.at(step=n)) for s, n in zip(job.steps, snames, strict=True)],
        matrix=matrix,
        include=include,
        exclude=exclude_m,
        rules=_rules(job.rules, file, where),
        environments=environments,
        secrets=_secrets(job.secrets, where),
        env=_env(job.env, where, "job env"),
        concurrency_group=_dynamic_value(job.concurrency_group, where, "concurrency_group"),
        timeout=millis(job.timeout, where, "job timeout"),
        grace_period=millis(job.grace_period, where, "grace_period"),
        cache=_cache(job.cache, where, job),
        hooks=_hooks(job, where, ("on_success", "on_failure", "cleanup", "on_cancel", "before_step", "after_step")),
        continue_on_error=job.continue_on_error or None,
        **_artifacts(job, where),
        test_reports=_test_reports(job.test_reports, where),
        python=_python(job.python, where),
        python_venv=_python_venv(job, where),
        resources=_resources(job.resources, where),
    )


_PYTHON_VERSION = re.compile(r"^3(\.(0|[1-9]\d{0,2})(\.(0|[1-9]\d{0,3}))?)?$")


def _python(value: Any, where: Collector) -> str | None:
    """`python=`: "3", "3.12" or "3.12.7" (a string: 3.10 as a float would be 3.1)."""
    if value is None:
        return None
    if not isinstance(value, str) or not _PYTHON_VERSION.match(value.strip()):
        where.error(f"python={value!r} must be a Python 3 version as a string: \"3\", \"3.12\" or \"3.12.7\"")
        return None
    return value.strip()


def _python_venv(job: d.Job, where: Collector) -> bool | None:
    if not isinstance(job.python_venv, bool):
        where.error(f"python_venv={job.python_venv!r} must be True or False")
        return None
    if job.python_venv and job.python is None:
        where.error("python_venv=True needs python= (the interpreter to create the virtualenv with)")
        return None
    return job.python_venv or None


def _resources(value: Any, where: Collector) -> ResourceLimits | None:
    """`resources=Resources(cpus=2, memory="4G", pids=1024)`: validated, memory in bytes."""
    if value is None:
        return None
    if not isinstance(value, d.Resources):
        where.error(f"resources={value!r} must be kici.Resources(cpus=…, memory=…, pids=…)")
        return None
    fields: dict[str, Any] = {}
    for name, parse in (("cpus", parse_cpus), ("memory", parse_memory), ("pids", parse_pids)):
        given = getattr(value, name)
        if given is None:
            continue
        try:
            fields[name] = parse(given)
        except ValueError as exc:
            where.error(f"resources: {exc}")
    if not fields:
        if value.cpus is value.memory is value.pids is None:
            where.error("resources=Resources() sets no limit; give cpus=, memory= or pids= (or leave it out)")
        return None
    return ResourceLimits(**fields)


def convert_step(step: d.Step, name: str, file: str, where: Collector) -> lf.Step:
    unsupported.refuse_options(step, unsupported.STEP_OPTIONS, where)
    if not callable(step.fn):
        where.error("a step must be a callable or a shell command")
    return lf.Step(
        name=name,
        has_outputs=step.command is None and _returns_value(step.fn),
        continue_on_error=step.continue_on_error or None,
        timeout=millis(step.timeout, where, "step timeout"),
        retry=_retry(step.retry, where),
        cache=_cache(step.cache, where),
        rules=_rules(step.rules, file, where),
        hooks=_hooks(step, where, ("on_cancel", "cleanup")),
    )


def _returns_value(fn: Callable[..., Any]) -> bool:
    """Whether the function has a `return <something>`: the lock file's `hasOutputs` hint."""
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return False
    root = tree.body[0] if tree.body else None
    if not isinstance(root, ast.FunctionDef | ast.AsyncFunctionDef):
        return False
    stack: list[ast.AST] = list(root.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
            continue
        if (
            isinstance(node, ast.Return)
            and node.value is not None
            and not (isinstance(node.value, ast.Constant) and node.value.value is None)
        ):
            return True
        stack.extend(ast.iter_child_nodes(node))
    return False


def _label_matcher(value: Any, where: Collector) -> lf.LabelMatcher | None:
    if isinstance(value, re.Pattern):
        problem = regex_problem(value.pattern)
        if problem:
            where.error(f"label regex {value.pattern!r}: {problem}")
            return None
        return lf.LabelMatcher(kind="regex", source=value.pattern, flags=regex_flags(value, where))
    if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value.strip()):
        where.error(f"label {value!r} must be a non-empty string without spaces, or a compiled regex")
        return None
    value = value.strip()
    if is_glob(value):
        return lf.LabelMatcher(kind="regex", source=glob_to_regex_source(value, "branch"))
    return lf.LabelMatcher(kind="exact", value=value)


def _labels(values: Any, where: Collector) -> list[lf.LabelMatcher]:
    if isinstance(values, str | re.Pattern):
        values = [values]
    out = []
    for v in values or ():
        m = _label_matcher(v, where)
        if m is not None:
            out.append(m)
    return out


def _runs_on(value: Any, where: Collector) -> tuple[list[lf.LabelMatcher], list[lf.LabelMatcher] | None]:
    if value is None:
        return [], None
    if isinstance(value, Mapping):
        unknown = set(value) - {"labels", "exclude"}
        if unknown:
            where.error(f"runs_on: unknown key(s) {sorted(unknown)} (allowed: labels, exclude)")
        exclude = _labels(value.get("exclude"), where)
        return _labels(value.get("labels"), where), exclude or None
    if isinstance(value, str | re.Pattern | Sequence):
        return _labels(value, where), None
    where.error(f"runs_on must be a label, a list of labels or {{'labels': …, 'exclude': …}}, not {value!r}")
    return [], None


def _needs(
    items: Sequence[Any], own: str, by_identity: Mapping[int, str], all_names: set[str], where: Collector
) -> list[lf.Need]:
    out: list[lf.Need] = []
    for item in items if isinstance(items, list | tuple) else [items]:
        when: Any = "success"
        target = item
        if isinstance(item, d.Need):
            target, when = item.job, item.when
        elif isinstance(item, Mapping):
            target, when = item.get("job"), item.get("when", "success")
        if isinstance(target, d.Job):
            name = by_identity.get(id(target))
            if name is None:
                where.error(f"needs {target!r}, which is not a job of this workflow")
                continue
        elif isinstance(target, str):
            name = target
        else:
            where.error(f"needs: {target!r} is not a job or a job name")
            continue
        if name == own:
            where.error("a job cannot need itself")
            continue
        if name not in all_names:
            where.error(f"needs unknown job {name!r} (jobs: {', '.join(sorted(all_names))})")
            continue
        try:
            run_on = run_on_for(when)
        except ValueError as exc:
            where.error(f"needs {name!r}: {exc}")
            continue
        out.append(lf.Need(name=name, run_on=run_on))
    return out


def _matrix(job: d.Job, where: Collector) -> tuple[lf.StaticMatrix | None, list[dict[str, Any]] | None,
                                                   list[dict[str, Any]] | None]:
    if job.matrix is None:
        if job.include or job.exclude:
            where.error("include/exclude need a matrix")
        return None, None, None
    values: Any = job.matrix
    if isinstance(values, Mapping):
        values = {str(k): list(v) if isinstance(v, list | tuple) else v for k, v in values.items()}
        for k, v in values.items():
            if not isinstance(v, list):
                where.error(f"matrix[{k!r}] must be a list of values")
                return None, None, None
    elif isinstance(values, list | tuple):
        values = list(values)
    else:
        where.error("matrix must be a list of values or a mapping of axis → list of values")
        return None, None, None
    include = [dict(i) for i in job.include] if job.include else None
    exclude = [dict(e) for e in job.exclude] if job.exclude else None
    if not _serialisable(values) or not _serialisable(include) or not _serialisable(exclude):
        where.error("matrix values must be JSON values (strings, numbers, booleans, lists, mappings)")
        return None, None, None
    try:
        combos = expand_matrix(values, include, exclude)
    except MatrixTooLargeError as exc:
        where.error(f"matrix too large: {exc} (limit {MATRIX_LIMIT})")
        return None, None, None
    except ValueError as exc:
        where.error(f"matrix: {exc}")
        return None, None, None
    if not combos:
        where.error("matrix expands to no combinations")
    return lf.StaticMatrix(values=values), include, exclude


def _serialisable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _env(value: Any, where: Collector, what: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        where.error(f"{what} must be a mapping of names to strings (functions are not supported here)")
        return None
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            where.error(f"{what}: {k!r} is not a valid environment variable name")
        elif isinstance(v, bool) or not isinstance(v, str | int | float):
            where.error(f"{what}[{k!r}]: {v!r} is not a string or number")
        else:
            out[k] = str(v)
    return out


def _secrets(value: Any, where: Collector) -> list[str] | None:
    """`secrets=["PYPI_TOKEN", …]`: a list of names (an empty list declares none)."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence):
        where.error(f"secrets must be a list of secret names, like secrets=[\"PYPI_TOKEN\"], not {value!r}")
        return None
    names = list(value)
    problem = lf.secret_names_problem(names)
    if problem is not None:
        where.error(problem)
        return None
    return names or None


def _dynamic_value(value: Any, where: Collector, what: str) -> str | lf.InlineExpr | None:
    if value is None or isinstance(value, str):
        return value
    if callable(value):
        source = lambda_source(value)
        if source is None:
            where.error(f"{what} must be a string or a `lambda event: …` expression written inline")
            return None
        try:
            check_pure(source)
        except ImpureExpressionError as exc:
            where.error(f"{what} {source!r} is not a pure expression of the event: {exc}")
            return None
        return lf.InlineExpr(expression=source)
    where.error(f"{what} must be a string or a `lambda event: …`, not {value!r}")
    return None


def _environments(job: d.Job, where: Collector) -> list[lf.EnvironmentRef] | None:
    values: list[Any] = []
    if job.environment is not None:
        values.append(job.environment)
    values.extend(job.environments or ())
    out = []
    for v in values:
        converted = _dynamic_value(v, where, "environment")
        if converted is not None:
            out.append(lf.EnvironmentRef(value=converted, dynamic=not isinstance(converted, str)))
    return out or None


def _concurrency(value: Any, where: Collector) -> lf.Concurrency | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        unknown = set(value) - {"group", "cancel_in_progress", "max"}
        if unknown:
            where.error(f"concurrency: unknown key(s) {sorted(unknown)}")
        value = d.Concurrency(
            group=value.get("group"),  # type: ignore[arg-type]
            cancel_in_progress=value.get("cancel_in_progress", True),
            max=value.get("max", 1),
        )
    if not isinstance(value, d.Concurrency):
        where.error("concurrency must be kici.Concurrency(...) or a mapping")
        return None
    if not isinstance(value.max, int) or isinstance(value.max, bool) or value.max < 1:
        where.error(f"concurrency max must be a positive integer, not {value.max!r}")
    group = _dynamic_value(value.group, where, "concurrency group")
    return lf.Concurrency(has_group=group is not None, group=group,
                          cancel_in_progress=bool(value.cancel_in_progress), max=value.max)


def _retry(value: Any, where: Collector) -> lf.RetryPolicy | None:
    if value is None:
        return None
    if isinstance(value, bool):
        where.error("retry must be a number of attempts or kici.Retry(...)")
        return None
    if isinstance(value, int):
        value = d.Retry(max_attempts=value)
    if not isinstance(value, d.Retry):
        where.error("retry must be a number of attempts or kici.Retry(...)")
        return None
    if not 1 <= value.max_attempts <= MAX_RETRY_ATTEMPTS:
        where.error(f"retry attempts must be between 1 and {MAX_RETRY_ATTEMPTS}, not {value.max_attempts}")
    if value.backoff not in ("exponential", "fixed"):
        where.error(f"retry backoff must be 'exponential' or 'fixed', not {value.backoff!r}")
    delay = d.seconds(value.delay) or 0.0
    max_delay = d.seconds(value.max_delay) or 0.0
    if delay < 0 or max_delay < 0:
        where.error("retry delays cannot be negative")
    return lf.RetryPolicy(
        max_attempts=value.max_attempts,
        delay_ms=round(delay * 1000),
        backoff=value.backoff,
        max_delay_ms=round(max_delay * 1000),
        has_retry_if=value.retry_if is not None,
    )


def _cache(value: Any, where: Collector, job: d.Job | None = None) -> list[lf.CacheSpec] | None:
    """`cache=Cache(key, paths, restore_keys)` (one, a list, or mappings with those keys): keys are templates
    (`kici.sdk.caching`), paths relative to the workspace."""
    if value is None:
        return None
    items = value if isinstance(value, list | tuple) else [value]
    out = []
    for item in items:
        if isinstance(item, Mapping):
            unknown = set(item) - {"key", "paths", "restore_keys"}
            if unknown:
                where.error(f"cache: unknown key(s) {sorted(unknown)}")
                continue
            item = d.Cache(key=item.get("key"), paths=item.get("paths") or (),  # type: ignore[arg-type]
                           restore_keys=item.get("restore_keys") or ())
        if not isinstance(item, d.Cache) or not isinstance(item.key, str) or not item.key.strip():
            where.error("cache needs a non-empty `key` and `paths` (kici.Cache(key=..., paths=[...]))")
            continue
        raw_paths = [item.paths] if isinstance(item.paths, str) else list(item.paths or ())
        if not raw_paths:
            where.error(f"cache {item.key!r}: `paths` must be a non-empty list of paths")
            continue
        paths: list[str] = []
        for raw in raw_paths:
            try:
                paths.append(caching.normalize_path(raw))
            except ValueError as exc:
                where.error(str(exc))
        restore = [item.restore_keys] if isinstance(item.restore_keys, str) else list(item.restore_keys or ())
        templates_ok = all(_key_template(k, job, where, "restore key" if i else "key")
                           for i, k in enumerate([item.key, *restore]))
        if templates_ok and len(paths) == len(raw_paths):
            out.append(lf.CacheSpec(key=item.key, paths=paths, restore_keys=restore))
    return out or None


def _key_template(template: Any, job: d.Job | None, where: Collector, what: str) -> bool:
    if not isinstance(template, str) or not template.strip():
        where.error(f"cache {what} {template!r} must be a non-empty string")
        return False
    try:
        parts = caching.parse_key(template)
    except caching.KeyTemplateError as exc:
        where.error(f"cache {what} {template!r}: {exc}")
        return False
    ok = True
    for part in parts:
        if part.kind == "python" and (job is None or job.python is None):
            where.error(f"cache {what} {template!r}: {{{{python}}}} needs the job's python= (the version it names)")
            ok = False
        elif part.kind == "matrix" and part.text not in _matrix_axes(job):
            axes = ", ".join(sorted(_matrix_axes(job))) or "none: the job has no matrix"
            where.error(f"cache {what} {template!r}: {{{{matrix.{part.text}}}}} is not an axis of the job's "
                        f"matrix (axes: {axes})")
            ok = False
        elif part.kind == "hash_files":
            for glob in part.globs:
                if glob.startswith("/") or "\\" in glob or ".." in glob.split("/"):
                    where.error(f"cache {what}: hash_files({glob!r}) must be relative to the workspace, "
                                "without `..`")
                    ok = False
    literal = "".join(p.text for p in parts if p.kind == "text")
    if any(ord(c) < 32 or ord(c) == 127 for c in literal) or template != template.strip():
        where.error(f"cache {what} {template[:100]!r} has a control character or white space at an end")
        ok = False
    elif len(literal) > caching.MAX_KEY_LENGTH:
        where.error(f"cache {what} {template[:60]!r}… is longer than {caching.MAX_KEY_LENGTH} characters")
        ok = False
    return ok


def _matrix_axes(job: d.Job | None) -> set[str]:
    if job is None or job.matrix is None:
        return set()
    try:
        combos = expand_matrix(job.matrix, job.include, job.exclude)  # type: ignore[arg-type]
    except (ValueError, TypeError):
        return set()
    axes: set[str] = set()
    for combo in combos:
        axes.update(combo if isinstance(combo, dict) else {"value"})
    return axes


def _rules(rules: Sequence[Any], file: str, where: Collector) -> list[lf.RuleRef] | None:
    out = []
    for i, r in enumerate(rules or ()):
        if not isinstance(r, d.Rule):
            where.error(f"rules: {r!r} is not a rule (use kici.rule(label, check) or kici.skip())")
            continue
        if r.check is not None and not callable(r.check):
            where.error(f"rule {r.label!r}: check must be callable")
        out.append(lf.RuleRef(label=r.label, source=lf.SourceLocation(file=file, index=i)))
    return out or None


def _hooks(owner: Any, where: Collector, names: Sequence[str]) -> lf.HookFlags | None:
    flags: dict[str, bool] = {}
    for n in names:
        hook = getattr(owner, n, None)
        if hook is None:
            continue
        if not callable(hook):
            where.error(f"hook {n} must be callable")
            continue
        flags[f"has_{n}"] = True
    return lf.HookFlags(**flags) if flags else None


ARTIFACT_WHEN = ("success", "on_failure", "always")


def _artifacts(job: d.Job, where: Collector) -> dict[str, Any]:
    """`artifacts=[globs]` and `artifacts_when=`: globs relative to the workspace, never climbing out of it."""
    value, when = job.artifacts, job.artifacts_when
    out: dict[str, Any] = {}
    if when not in ARTIFACT_WHEN:
        where.error(f"artifacts_when must be one of {', '.join(ARTIFACT_WHEN)}, not {when!r}")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        where.error(f"artifacts must be a list of glob patterns, not {type(value).__name__}")
        return out
    globs: list[str] = []
    for item in value:
        if not isinstance(item, str) or not item.strip():
            where.error(f"artifacts: each entry must be a non-empty glob pattern, not {item!r}")
        elif item.startswith("/") or "\\" in item or ".." in item.split("/"):
            where.error(f"artifacts: {item!r} must be relative to the workspace, without `..`")
        else:
            globs.append(item)
    if globs:
        out["artifacts"] = globs
        if when != "success" and when in ARTIFACT_WHEN:
            out["artifacts_when"] = when
    elif when != "success":
        where.error("artifacts_when needs artifacts=[...]")
    return out


def _test_reports(value: Any, where: Collector) -> list[str] | None:
    """`test_reports=[globs]`: JUnit XML files, relative to the workspace, never climbing out of it."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        where.error(f"test_reports must be a list of glob patterns, not {type(value).__name__}")
        return None
    globs: list[str] = []
    for item in value:
        if not isinstance(item, str) or not item.strip():
            where.error(f"test_reports: each entry must be a non-empty glob pattern, not {item!r}")
        elif item.startswith("/") or "\\" in item or ".." in item.split("/"):
            where.error(f"test_reports: {item!r} must be relative to the workspace, without `..`")
        elif item not in globs:
            globs.append(item)
    return globs or None
