"""No silent no-ops: every option the SDK accepts is either enforced (a named test proves it) or refused by
`kici compile` with "not supported yet".

The option names are read from the SDK itself — the `_check_options` allow-lists, the signatures of
`workflow`, `job`, `need`, `rule`, `skip`, the trigger builders and `kici.inputs`, and the fields of
`Retry`, `Concurrency` and `Cache` — so a new option without an entry in `OPTIONS` fails
`test_every_sdk_option_has_an_entry`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kici.compiler import unsupported
from kici.compiler.errors import CompileFailed
from kici.compiler.project import Project, compile_project
from kici.sdk import caching, definitions, inputs, triggers

ROOT = Path(__file__).resolve().parents[2]

RUNNER = "tests/integration/test_runner.py"
DISPATCH = "tests/integration/orchestrator/test_dispatch.py"
TRIGGERS = "tests/unit/test_triggers.py"

# Tests of the orchestrator-side options (issue 8).
CONCURRENCY_FIFO = "tests/integration/orchestrator/test_concurrency.py::test_workflow_concurrency_fifo"
CANCEL_IN_PROGRESS = "tests/integration/orchestrator/test_concurrency.py::test_workflow_cancel_in_progress"
CONCURRENCY_MAX = "tests/integration/orchestrator/test_concurrency.py::test_concurrency_max"
JOB_CONCURRENCY_GROUP = "tests/integration/orchestrator/test_concurrency.py::test_job_concurrency_group"
GRACE_PERIOD = "tests/e2e/test_grace_period.py::test_grace_period_used_for_cancel"
SCHEDULE = "tests/integration/orchestrator/test_schedules.py::test_every_minute_fires_once"
SCHEDULE_TIMEZONE = "tests/integration/orchestrator/test_schedules.py::test_cron_slots_follow_the_time_zone"
ENVIRONMENT_REVIEWERS = "tests/integration/orchestrator/test_environments.py::test_reviewers_then_wait_timer"
DISPATCH_INPUTS = "tests/integration/orchestrator/test_manual_runs.py::test_inputs_validated"
ARTIFACTS = "tests/e2e/test_artifacts.py"
INPUT_DESCRIPTION = "tests/unit/test_inputs.py::test_a_missing_required_input_is_described"
LIMITS_MEMORY = "tests/integration/agent/test_limits.py::test_a_memory_hog_fails_with_the_category_and_the_agent_lives"
CACHE_E2E = "tests/e2e/test_caches_e2e.py::test_second_run_hits_the_cache"
CACHE_PREFIX = "tests/integration/orchestrator/test_caches.py::test_save_restore_exact_prefix_and_miss"

def enforced(node_id: str) -> tuple[str, str]:
    return ("enforced", node_id)


def refused(source: str, message: str) -> tuple[str, str, str]:
    """`source` (after `from kici import *`-style imports) must fail to compile with `message`."""
    return ("refused", source, message)


def _job_with(option: str) -> str:
    return f'ci = workflow("ci", on=push(), jobs=[job("j", steps=[step("s", "true")], {option})])'


def _step_with(option: str) -> str:
    return f'ci = workflow("ci", on=push(), jobs=[job("j", steps=[step("s", "true", {option})])])'


def _workflow_with(option: str) -> str:
    return f'ci = workflow("ci", on=push(), jobs=[job("j", run="true")], {option})'


def _trigger(call: str) -> str:
    return f'ci = workflow("ci", on=[push(), {call}], jobs=[job("j", run="true")])'


def _not_supported(what: str, where: str = "") -> str:
    return f"wf.py › workflow 'ci'{where}: {what} is not supported yet ("


JOB = " › job 'j'"
STEP = " › job 'j' › step 's'"
CACHE = 'Cache("deps", [".cache/pip"], restore_keys=["deps-"])'
HOOK = "lambda ctx: None"

OPTIONS: dict[str, tuple[str, ...]] = {
    # -- step(...)
    "step(timeout)": enforced(f"{RUNNER}::test_step_timeout_kills_detached_processes_too"),
    "step(retry)": enforced(f"{RUNNER}::test_retry_attempts_and_waits"),
    "step(continue_on_error)": enforced(f"{RUNNER}::test_continue_on_error_runs_next_steps_but_fails_the_job"),
    "step(rules)": enforced(f"{RUNNER}::test_failing_step_rule_skips_the_step_and_the_job_succeeds"),
    "step(cache)": refused(_step_with(f"cache={CACHE}"), _not_supported("`cache=`", STEP)),
    "step(on_cancel)": enforced(f"{RUNNER}::test_cancel_kills_the_whole_tree_and_runs_cancel_hooks"),
    "step(cleanup)": enforced(f"{RUNNER}::test_step_hooks_run_around_a_failed_step"),
    "step(env)": enforced(f"{RUNNER}::test_job_and_step_env_and_the_parent_environment"),
    # -- job(...)
    "job(steps)": enforced("tests/e2e/test_end_to_end.py::test_push_runs_to_success_with_logs"),
    "job(run)": enforced(f"{RUNNER}::test_run_shorthand_is_the_job_s_one_step"),
    "job(runs_on)": enforced("tests/e2e/test_end_to_end.py::test_agents_with_different_labels_get_only_their_jobs"),
    "job(needs)": enforced(f"{DISPATCH}::test_needs_dispatch_in_order_with_upstream_outputs"),
    "job(matrix)": enforced(
        "tests/integration/orchestrator/test_runs_store.py::test_create_run_plans_matrix_and_needs_and_queues_only_roots"
    ),
    "job(include)": enforced("tests/unit/test_matrix.py::test_include_merges_into_matching_combinations"),
    "job(exclude)": enforced("tests/unit/test_matrix.py::test_exclude_partial_keys_removes_every_match"),
    "job(env)": enforced(f"{RUNNER}::test_job_and_step_env_and_the_parent_environment"),
    "job(environment)": enforced(ENVIRONMENT_REVIEWERS),
    "job(secrets)": enforced(
        "tests/integration/orchestrator/test_job_secrets.py::test_declared_secrets_by_precedence_and_only_those"
    ),
    "job(environments)": refused(_job_with('environments=["staging", "production"]'),
                                 _not_supported("`environments=`", JOB)),
    "job(concurrency_group)": enforced(JOB_CONCURRENCY_GROUP),
    "job(timeout)": enforced(
        "tests/integration/agent/test_jobs.py::test_job_timeout_from_the_dispatch_fails_the_job_and_kills_its_processes"
    ),
    "job(grace_period)": enforced(GRACE_PERIOD),
    "job(rules)": enforced(f"{RUNNER}::test_failing_job_rule_skips_the_job"),
    "job(cache)": enforced(CACHE_E2E),
    "job(continue_on_error)": refused(_job_with("continue_on_error=True"), _not_supported("`continue_on_error=`", JOB)),
    "job(on_success)": enforced(f"{RUNNER}::test_hook_order_on_success_and_on_failure"),
    "job(on_failure)": enforced(f"{RUNNER}::test_hook_order_on_success_and_on_failure"),
    "job(cleanup)": enforced(f"{RUNNER}::test_hook_order_on_success_and_on_failure"),
    "job(on_cancel)": enforced(f"{RUNNER}::test_cancel_kills_the_whole_tree_and_runs_cancel_hooks"),
    "job(before_step)": enforced(f"{RUNNER}::test_hook_order_on_success_and_on_failure"),
    "job(after_step)": enforced(f"{RUNNER}::test_hook_order_on_success_and_on_failure"),
    "job(artifacts)": enforced(f"{ARTIFACTS}::test_artifacts_round_trip_with_a_real_agent"),
    "job(artifacts_when)": enforced(f"{ARTIFACTS}::test_artifacts_on_failure_only_when_asked"),
    "job(test_reports)": enforced("tests/e2e/test_test_reports.py::test_pytest_reports_round_trip_with_a_real_agent"),
    "job(python)": enforced(
        "tests/integration/agent/test_toolchains.py::test_step_runs_the_chosen_python_first_on_path"
    ),
    "job(resources)": enforced(LIMITS_MEMORY),
    "Resources.memory": enforced(LIMITS_MEMORY),
    "Resources.cpus": enforced(LIMITS_MEMORY),
    "Resources.pids": enforced("tests/integration/agent/test_limits.py::test_a_fork_loop_stops_at_the_pids_limit"),
    "job(python_venv)": enforced(
        "tests/integration/agent/test_toolchains.py::test_python_venv_gives_each_job_a_fresh_virtualenv"
    ),
    # -- need(...), rule(...), skip(...), Retry, Concurrency, Cache
    "need(job)": enforced(f"{DISPATCH}::test_needs_dispatch_in_order_with_upstream_outputs"),
    "need(when)": enforced(f"{DISPATCH}::test_when_always_job_runs_after_a_failure"),
    "rule(label)": enforced(f"{RUNNER}::test_failing_job_rule_skips_the_job"),
    "rule(check)": enforced(f"{RUNNER}::test_failing_step_rule_skips_the_step_and_the_job_succeeds"),
    "skip(label)": enforced(f"{RUNNER}::test_skip_switches_a_job_and_a_step_off"),
    "Retry.max_attempts": enforced(f"{RUNNER}::test_retry_attempts_and_waits"),
    "Retry.delay": enforced(f"{RUNNER}::test_retry_attempts_and_waits"),
    "Retry.backoff": enforced(f"{RUNNER}::test_retry_backoff_and_max_delay_shape_the_waits"),
    "Retry.max_delay": enforced(f"{RUNNER}::test_retry_backoff_and_max_delay_shape_the_waits"),
    "Retry.retry_if": enforced(f"{RUNNER}::test_retry_succeeds_on_a_later_attempt_and_retry_if_false_stops"),
    "Concurrency.group": enforced(CONCURRENCY_FIFO),
    "Concurrency.cancel_in_progress": enforced(CANCEL_IN_PROGRESS),
    "Concurrency.max": enforced(CONCURRENCY_MAX),
    "Cache.key": enforced(CACHE_E2E),
    "Cache.paths": enforced(CACHE_E2E),
    "Cache.restore_keys": enforced(CACHE_PREFIX),
    "hash_files(globs)": enforced("tests/unit/test_cache_keys.py::test_hash_files_over_paths_and_contents"),
    # -- workflow(...)
    "workflow(name)": enforced("tests/e2e/test_end_to_end.py::test_push_runs_to_success_with_logs"),
    "workflow(on)": enforced("tests/integration/orchestrator/test_ingest_github.py::"
                             "test_push_matching_two_workflows_creates_two_runs"),
    "workflow(jobs)": enforced("tests/e2e/test_end_to_end.py::test_push_runs_to_success_with_logs"),
    "workflow(description)": enforced("tests/integration/test_cli.py::test_preview_human_output_and_bad_event"),
    "workflow(rules)": enforced(f"{RUNNER}::test_workflow_rules_apply_to_the_job"),
    "workflow(env)": enforced(f"{RUNNER}::test_job_and_step_env_and_the_parent_environment"),
    "workflow(timeout)": enforced(f"{DISPATCH}::test_workflow_timeout_cancels_the_run"),
    "workflow(concurrency)": enforced(CONCURRENCY_FIFO),
    "workflow(on_success)": refused(_workflow_with(f"on_success={HOOK}"), _not_supported("`on_success=`")),
    "workflow(on_failure)": refused(_workflow_with(f"on_failure={HOOK}"), _not_supported("`on_failure=`")),
    "workflow(cleanup)": refused(_workflow_with(f"cleanup={HOOK}"), _not_supported("`cleanup=`")),
    "workflow(on_cancel)": refused(_workflow_with(f"on_cancel={HOOK}"), _not_supported("`on_cancel=`")),
    # -- triggers: matched by the engine on the events the orchestrator ingests
    "push()": enforced(f"{TRIGGERS}::test_push_without_filters_matches_every_push"),
    "push(branches)": enforced(f"{TRIGGERS}::test_push_branches_main_matches_main_only"),
    "push(tags)": enforced(f"{TRIGGERS}::test_push_with_tags_compiles_to_push_plus_tag"),
    "push(paths)": enforced("tests/integration/orchestrator/test_ingest_git.py::test_paths_are_read_with_git_diff"),
    "push(repos)": enforced(f"{TRIGGERS}::test_repos_filter"),
    "pr()": enforced(f"{TRIGGERS}::test_pr_default_events"),
    "pr(events)": enforced(f"{TRIGGERS}::test_pr_default_events"),
    "pr(target)": enforced(f"{TRIGGERS}::test_pr_target_regex"),
    "pr(source)": enforced(f"{TRIGGERS}::test_pr_source_filter_without_source_branch"),
    "pr(paths)": enforced("tests/integration/orchestrator/test_ingest_github.py::"
                          "test_pull_request_paths_use_the_compare_api"),
    "pr(repos)": enforced(f"{TRIGGERS}::test_repos_filter"),
    "tag()": enforced(f"{TRIGGERS}::test_tag_trigger"),
    "tag(patterns)": enforced(f"{TRIGGERS}::test_tag_trigger"),
    "schedule()": enforced(SCHEDULE),
    "schedule(cron)": enforced(SCHEDULE),
    "schedule(timezone)": enforced(SCHEDULE_TIMEZONE),
    "schedule(inputs)": enforced(SCHEDULE),
    "dispatch()": enforced(f"{TRIGGERS}::test_dispatch_trigger"),
    "dispatch(types)": enforced(f"{TRIGGERS}::test_dispatch_trigger"),
    "dispatch(inputs)": enforced(DISPATCH_INPUTS),
    "comment()": enforced(f"{TRIGGERS}::test_comment_actions_and_body"),
    "comment(actions)": enforced(f"{TRIGGERS}::test_comment_actions_and_body"),
    "comment(source)": enforced(f"{TRIGGERS}::test_comment_source_pr_requires_pull_request"),
    "comment(body)": enforced(f"{TRIGGERS}::test_comment_actions_and_body"),
    "review()": enforced(f"{TRIGGERS}::test_review_trigger"),
    "review(actions)": enforced(f"{TRIGGERS}::test_review_trigger"),
    "review(states)": enforced(f"{TRIGGERS}::test_review_trigger"),
    "review_comment()": enforced(f"{TRIGGERS}::test_action_only_triggers"),
    "review_comment(actions)": enforced(f"{TRIGGERS}::test_action_only_triggers"),
    "release()": enforced(f"{TRIGGERS}::test_action_only_triggers"),
    "release(actions)": enforced(f"{TRIGGERS}::test_action_only_triggers"),
    "star()": enforced(f"{TRIGGERS}::test_action_only_triggers"),
    "star(actions)": enforced(f"{TRIGGERS}::test_action_only_triggers"),
    "watch()": enforced(f"{TRIGGERS}::test_action_only_triggers"),
    "watch(actions)": enforced(f"{TRIGGERS}::test_action_only_triggers"),
    "fork()": enforced(f"{TRIGGERS}::test_fork_trigger"),
    "create()": enforced(f"{TRIGGERS}::test_create_delete_triggers"),
    "create(ref_types)": enforced(f"{TRIGGERS}::test_create_delete_triggers"),
    "create(patterns)": enforced(f"{TRIGGERS}::test_create_delete_triggers"),
    "delete()": enforced(f"{TRIGGERS}::test_create_delete_triggers"),
    "delete(ref_types)": enforced(f"{TRIGGERS}::test_create_delete_triggers"),
    "delete(patterns)": enforced(f"{TRIGGERS}::test_create_delete_triggers"),
    "status()": enforced(f"{TRIGGERS}::test_status_trigger"),
    "status(contexts)": enforced(f"{TRIGGERS}::test_status_trigger"),
    "status(states)": enforced(f"{TRIGGERS}::test_status_trigger"),
    "workflow_run()": enforced(f"{TRIGGERS}::test_workflow_run_trigger"),
    "workflow_run(actions)": enforced(f"{TRIGGERS}::test_workflow_run_trigger"),
    "workflow_run(workflows)": enforced(f"{TRIGGERS}::test_workflow_run_trigger"),
    "workflow_run(conclusions)": enforced(f"{TRIGGERS}::test_workflow_run_trigger"),
    "webhook()": enforced(f"{TRIGGERS}::test_webhook_catch_all"),
    "webhook(events)": enforced(f"{TRIGGERS}::test_webhook_catch_all"),
    "webhook(actions)": enforced(f"{TRIGGERS}::test_webhook_catch_all"),
    "generic_webhook()": enforced("tests/integration/orchestrator/test_ingest_generic.py::"
                                  "test_duplicates_filters_and_payload_match"),
    "generic_webhook(source)": enforced(f"{TRIGGERS}::test_generic_webhook_trigger"),
    "generic_webhook(events)": enforced(f"{TRIGGERS}::test_generic_webhook_trigger"),
    "generic_webhook(match)": enforced(f"{TRIGGERS}::test_generic_webhook_trigger"),
    "generic_webhook(not_)": enforced(f"{TRIGGERS}::test_generic_webhook_trigger"),
    "generic_webhook(path)": refused(_trigger('generic_webhook("deploys", path="/hooks/deploys")'),
                                     _not_supported("`generic_webhook(path=…)`")),
    "kici_event()": refused(_trigger('kici_event("released")'), _not_supported("`kici_event()`")),
    "kici_event(name)": refused(_trigger('kici_event("released")'), _not_supported("`kici_event()`")),
    "kici_event(match)": refused(_trigger('kici_event("released", match={"$.v": 1})'),
                                 _not_supported("`kici_event()`")),
    "kici_event(not_)": refused(_trigger('kici_event("released", not_={"$.v": 1})'),
                                _not_supported("`kici_event()`")),
    "kici_event(source)": refused(_trigger('kici_event("released", source="other")'),
                                  _not_supported("`kici_event()`")),
    "workflow_complete()": refused(_trigger("workflow_complete()"), _not_supported("`workflow_complete()`")),
    "workflow_complete(name)": refused(_trigger('workflow_complete("ci")'), _not_supported("`workflow_complete()`")),
    "workflow_complete(status)": refused(_trigger('workflow_complete(status="failed")'),
                                         _not_supported("`workflow_complete()`")),
    "workflow_complete(source)": refused(_trigger('workflow_complete(source="s")'),
                                         _not_supported("`workflow_complete()`")),
    "job_complete()": refused(_trigger("job_complete()"), _not_supported("`job_complete()`")),
    "job_complete(workflow)": refused(_trigger('job_complete("ci")'), _not_supported("`job_complete()`")),
    "job_complete(job)": refused(_trigger('job_complete("ci", "build")'), _not_supported("`job_complete()`")),
    "job_complete(status)": refused(_trigger('job_complete(status="failed")'), _not_supported("`job_complete()`")),
    "job_complete(source)": refused(_trigger('job_complete(source="s")'), _not_supported("`job_complete()`")),
    # -- kici.inputs: typed inputs of dispatch() and schedule()
    **{f"inputs.{kind}({param})": enforced(DISPATCH_INPUTS)
       for kind in ("string", "number", "boolean", "environment") for param in ("required", "default")},
    **{f"inputs.choice({param})": enforced(DISPATCH_INPUTS) for param in ("options", "required", "default")},
    **{f"inputs.{kind}(description)": enforced(INPUT_DESCRIPTION)
       for kind in ("string", "number", "boolean", "environment", "choice")},
}


def _params(fn: Callable[..., Any], *, skip: tuple[str, ...] = ()) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind is not inspect.Parameter.VAR_KEYWORD and p.name not in skip]


def _trigger_builders() -> dict[str, Callable[..., Any]]:
    return {name: fn for name, fn in vars(triggers).items()
            if inspect.isfunction(fn) and fn.__module__ == triggers.__name__ and not name.startswith("_")}


def sdk_options() -> set[str]:
    """Every option name the SDK accepts, as `OPTIONS` spells it."""
    names = {f"step({o})" for o in definitions._STEP_OPTIONS}
    names |= {f"job({o})" for o in definitions._JOB_OPTIONS}
    names |= {f"job({p})" for p in _params(definitions.job, skip=("name",))}
    names |= {f"workflow({p})" for p in _params(definitions.workflow)}
    for fn in (definitions.need, definitions.rule, definitions.skip):
        names |= {f"{fn.__name__}({p})" for p in _params(fn)}
    names |= {f"hash_files({p})" for p in _params(caching.hash_files)}
    for cls in (definitions.Retry, definitions.Concurrency, definitions.Cache, definitions.Resources):
        names |= {f"{cls.__name__}.{f.name}" for f in dataclasses.fields(cls)}
    for name, fn in _trigger_builders().items():
        names.add(f"{name}()")
        names |= {f"{name}({p})" for p in _params(fn)}
    for name, fn in vars(inputs).items():
        if inspect.isfunction(fn) and fn.__module__ == inputs.__name__ and not name.startswith("_"):
            names |= {f"inputs.{name}({p})" for p in _params(fn)}
    return names


def test_every_sdk_option_has_an_entry() -> None:
    accepted = sdk_options()
    assert len(accepted) > 100  # the introspection found the SDK
    missing = sorted(accepted - set(OPTIONS))
    assert not missing, f"options without an entry (enforce them with a test, or refuse them): {missing}"
    stale = sorted(set(OPTIONS) - accepted)
    assert not stale, f"entries for options the SDK does not accept: {stale}"


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")}


ENFORCED = sorted({entry[1] for entry in OPTIONS.values() if entry[0] == "enforced"})


@pytest.mark.parametrize("node_id", ENFORCED)
def test_the_enforcing_test_exists(node_id: str) -> None:
    file, _, function = node_id.partition("::")
    path = ROOT / file
    assert path.is_file(), f"{node_id}: no such file"
    assert function in _test_functions(path), f"{node_id}: no such test function"


REFUSED = sorted((name, entry[1], entry[2]) for name, entry in OPTIONS.items() if entry[0] == "refused")
HEADER = "from kici import *\nfrom kici import Cache\n"


@pytest.mark.parametrize(("option", "source", "message"), REFUSED, ids=[r[0] for r in REFUSED])
def test_the_refused_option_fails_to_compile(tmp_path: Path, option: str, source: str, message: str) -> None:
    (tmp_path / ".kici/workflows").mkdir(parents=True)
    (tmp_path / ".kici/workflows/wf.py").write_text(HEADER + source + "\n")
    with pytest.raises(CompileFailed) as failed:
        compile_project(Project(root=tmp_path, kici_dir=tmp_path / ".kici"))
    errors = [str(e) for e in failed.value.errors]
    assert any(message in e for e in errors), (option, errors)
    # the option is the only problem: without it, the workflow would compile
    assert all("is not supported yet" in e for e in errors), errors


def test_the_compiler_s_refusals_are_the_refused_entries() -> None:
    """What `kici.compiler.unsupported` refuses and what OPTIONS says is refused agree."""
    listed = {name for name, entry in OPTIONS.items() if entry[0] == "refused"}
    from_compiler = {f"step({o})" for o in unsupported.STEP_OPTIONS} | {f"job({o})" for o in unsupported.JOB_OPTIONS}
    from_compiler |= {f"workflow({o})" for o in unsupported.WORKFLOW_OPTIONS}
    from_compiler |= {f"{kind}()" for kind in unsupported.TRIGGERS}
    from_compiler |= {f"{kind}({o})" for kind, o in unsupported.TRIGGER_OPTIONS}
    assert from_compiler <= listed, sorted(from_compiler - listed)
    builders = _trigger_builders()
    # a refused trigger refuses all its options; a refused option belongs to a refused construct
    for kind in unsupported.TRIGGERS:
        assert {f"{kind}({p})" for p in _params(builders[kind])} <= listed
    others = {n for n in listed - from_compiler if not n.startswith("Cache.")}
    assert all(n.split("(")[0] in unsupported.TRIGGERS for n in others), sorted(others)
