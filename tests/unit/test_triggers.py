"""Trigger matching (`kici.engine.triggers`): reference authoring.md §5 behaviours 1-13 and 35, every
trigger type, first-match reporting, `needs_changed_files`, the JSONPath helper and `match` semantics."""

from __future__ import annotations

import gc
import json
import weakref
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kici.engine import triggers as trig
from kici.engine.events import PR_ACTIONS_DEFAULT, Event
from kici.engine.glob import matches as glob_matches
from kici.engine.lockfile import (
    BranchPattern,
    CommentTrigger,
    CreateTrigger,
    DeleteTrigger,
    DispatchTrigger,
    ForkTrigger,
    GenericWebhookTrigger,
    JobCompleteTrigger,
    KiciEventTrigger,
    PrTrigger,
    PushTrigger,
    ReleaseTrigger,
    ReviewCommentTrigger,
    ReviewTrigger,
    ScheduleTrigger,
    SourceRef,
    StarTrigger,
    StatusTrigger,
    TagTrigger,
    Trigger,
    WatchTrigger,
    WebhookTrigger,
    Workflow,
    WorkflowCompleteTrigger,
    WorkflowRunTrigger,
    build_lock_file,
    parse_lock_file,
    render_lock_file,
)
from kici.engine.triggers import (
    MatchDecision,
    json_path_get,
    match_all,
    match_trigger,
    match_values,
    match_workflow,
    needs_changed_files,
    parse_json_path,
)
from tests.paths import GITHUB_FIXTURES

# ---------------------------------------------------------------------------------------------------- helpers


def G(pattern: str) -> BranchPattern:
    return BranchPattern(type="glob", pattern=pattern)


def R(pattern: str, flags: str | None = None) -> BranchPattern:
    # model_construct: the matcher must cope even with regexes the lock-file parser would refuse
    # (JS named groups, lookbehind, invalid ones) — see test_lock_file_refuses_unsafe_regexes
    return BranchPattern.model_construct(type="regex", pattern=pattern, flags=flags)


def wf(name: str, *triggers: Trigger) -> Workflow:
    return Workflow(
        name=name,
        source=SourceRef(file=f".kici/workflows/{name}.py", export=f"#{name}"),
        content_hash="0" * 64,
        compile_schema_version=1,
        triggers=list(triggers),
        jobs=[],
    )


def push_event(branch: str | None = "main", files: list[str] | None = None, **kw: Any) -> Event:
    return Event(type="push", name="push", branch=branch, target_branch=branch, changed_files=files, **kw)


def pr_event(
    action: str | None = "opened",
    target: str | None = "main",
    source: str | None = "feature/x",
    files: list[str] | None = None,
    **kw: Any,
) -> Event:
    return Event(
        type="pr",
        name="pull_request",
        action=action,
        target_branch=target,
        source_branch=source,
        branch=source,
        changed_files=files,
        **kw,
    )


def ok(trigger: Trigger, event: Event) -> bool:
    return match_trigger(trigger, event)[0]


def why(trigger: Trigger, event: Event) -> str:
    matched, reason = match_trigger(trigger, event)
    assert not matched, f"expected no match, got: {reason}"
    return reason


PR_DEFAULT = list(PR_ACTIONS_DEFAULT)

# Real GitHub payloads (octokit/webhooks examples), committed under tests/fixtures.
def gh(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((GITHUB_FIXTURES / name).read_text(encoding="utf-8"))
    return data


# ------------------------------------------------------------------------------------------------ §5.1-2 push


def test_push_branches_main_matches_main_only() -> None:
    t = PushTrigger(branches=[G("main")])
    matched, reason = match_trigger(t, push_event("main"))
    assert matched
    assert reason == "push to 'main' matched branches [main]"
    assert why(t, push_event("develop")) == "branch 'develop' not in branches [main]"


def test_push_without_filters_matches_every_push() -> None:
    t = PushTrigger()
    assert ok(t, push_event("main"))
    assert ok(t, push_event("feature/deep/name", files=[]))
    assert ok(t, push_event(None))


def test_push_branch_filter_without_branch_does_not_match() -> None:
    assert "no branch" in why(PushTrigger(branches=[G("main")]), push_event(None))


def test_push_glob_star_does_not_cross_slash_but_globstar_does() -> None:
    one = PushTrigger(branches=[G("release/*")])
    assert ok(one, push_event("release/1.0"))
    assert not ok(one, push_event("release/1.0/x"))
    two = PushTrigger(branches=[G("release/**")])
    assert ok(two, push_event("release/1.0"))
    assert ok(two, push_event("release/1.0/x"))


def test_push_any_of_several_branch_patterns() -> None:
    t = PushTrigger(branches=[G("main"), G("release/*"), R(r"^hotfix/")])
    assert ok(t, push_event("main"))
    assert ok(t, push_event("release/2"))
    assert ok(t, push_event("hotfix/urgent"))
    assert why(t, push_event("dev")) == "branch 'dev' not in branches [main, release/*, /^hotfix//]"


def test_branch_negations() -> None:
    only_neg = PushTrigger(branches=[G("!main")])
    assert ok(only_neg, push_event("develop"))
    assert why(only_neg, push_event("main")) == "branch 'main' excluded by branches [!main]"
    mixed = PushTrigger(branches=[G("release/*"), G("!release/old-*")])
    assert ok(mixed, push_event("release/new-1"))
    assert not ok(mixed, push_event("release/old-1"))
    assert not ok(mixed, push_event("main"))  # no positive pattern matches
    # `!(…)` is a picomatch extglob, not an exclusion marker.
    extglob = PushTrigger(branches=[G("!(main)")])
    assert ok(extglob, push_event("develop"))
    assert why(extglob, push_event("main")) == "branch 'main' not in branches [!(main)]"


def test_push_trigger_never_matches_tag_event() -> None:
    tag_event = Event(type="tag", name="push", tag="v1.0")
    assert why(PushTrigger(), tag_event) == "push trigger does not match tag events"


# ------------------------------------------------------------------------------------------------- §5.3 regex


def test_pr_target_regex() -> None:
    t = PrTrigger(events=PR_DEFAULT, target_branches=[R(r"^release/v\d+$")])
    assert ok(t, pr_event(target="release/v12"))
    assert why(t, pr_event(target="release/v1.2")) == (
        r"target branch 'release/v1.2' not in target branches [/^release/v\d+$/]"
    )


def test_regex_flags_and_search_semantics() -> None:
    insensitive = PushTrigger.model_construct(branches=[R("^MAIN$", "i")])
    assert ok(insensitive, push_event("main"))
    assert not ok(PushTrigger.model_construct(branches=[R("^MAIN$")]), push_event("main"))
    # re.search: an unanchored regex matches anywhere.
    assert ok(PushTrigger.model_construct(branches=[R("feat")]), push_event("my-feature"))
    # JS-only flags are accepted and ignored.
    assert ok(PushTrigger.model_construct(branches=[R("^main$", "gu")]), push_event("main"))
    # JS named groups and backreferences are translated.
    named = PushTrigger.model_construct(branches=[R(r"^(?<p>[a-z]+)-\k<p>$")])
    assert ok(named, push_event("ab-ab"))
    assert not ok(named, push_event("ab-cd"))
    # Lookbehind stays a lookbehind.
    assert ok(PushTrigger.model_construct(branches=[R(r"(?<=v)\d")]), push_event("v1"))


def test_lock_file_refuses_unsafe_regexes() -> None:
    for pattern in (r"^(?<p>[a-z]+)-\k<p>$", r"(?<=v)\d", "(unclosed", "(a+)+$"):
        with pytest.raises(ValueError):
            BranchPattern(type="regex", pattern=pattern)


def test_invalid_regex_never_matches() -> None:
    t = PushTrigger.model_construct(branches=[R("(unclosed")])
    assert not ok(t, push_event("(unclosed"))


def test_regex_compiled_once() -> None:
    trig._regex.cache_clear()
    t1 = PushTrigger.model_construct(branches=[R(r"^x\d+$")])
    t2 = PushTrigger.model_construct(branches=[R(r"^x\d+$")])
    for _ in range(5):
        ok(t1, push_event("x1"))
        ok(t2, push_event("x2"))
    info = trig._regex.cache_info()
    assert info.misses == 1


# ----------------------------------------------------------------------------------------------- §5.4-6 paths


def test_paths_positive_and_negative() -> None:
    t = PushTrigger(paths=["src/**", "!docs/**"])
    assert why(t, push_event(files=["docs/a.md", "docs/b/c.md"])) == (
        "all changed files excluded by paths [src/**, !docs/**]"
    )
    matched, reason = match_trigger(t, push_event(files=["docs/a.md", "src/x.py"]))
    assert matched
    assert reason == "push to 'main' (any push), changed file 'src/x.py' matched paths [src/**, !docs/**]"
    assert why(t, push_event(files=["README.md"])) == "no changed file matches paths [src/**, !docs/**]"


def test_paths_only_negations() -> None:
    t = PushTrigger(paths=["!docs/**"])
    assert ok(t, push_event(files=["README.md"]))
    assert ok(t, push_event(files=["docs/x.md", "README.md"]))
    assert not ok(t, push_event(files=["docs/x.md"]))


def test_paths_without_changed_files_never_match() -> None:
    for t in (PushTrigger(paths=["src/**"]), PushTrigger(paths=["!docs/**"])):
        assert why(t, push_event(files=None)) == f"no changed files for paths filter [{t.paths[0]}]"
        assert not ok(t, push_event(files=[]))
    # …but without a paths filter, an unknown file list does not matter.
    assert ok(PushTrigger(), push_event(files=None))


def test_paths_use_path_semantics() -> None:
    t = PrTrigger(events=PR_DEFAULT, paths=["src/*.py"])
    assert ok(t, pr_event(files=["src/a.py"]))
    assert not ok(t, pr_event(files=["src/pkg/a.py"]))
    deep = PrTrigger(events=PR_DEFAULT, paths=["**/*.md"])
    assert ok(deep, pr_event(files=["a/b/c.md"]))


_NEGATIONS = ["docs/**", "*.md", "build/*", "**/*.lock", "tests/**"]
_FILES = [
    "README.md",
    "docs/index.md",
    "docs/a/b.txt",
    "build/out.bin",
    "build/x/y.bin",
    "src/main.py",
    "uv.lock",
    "pkg/poetry.lock",
    "tests/test_a.py",
    "setup.cfg",
]


@settings(max_examples=200, deadline=None)
@given(
    negs=st.lists(st.sampled_from(_NEGATIONS), min_size=1, max_size=4, unique=True),
    files=st.lists(st.sampled_from(_FILES), max_size=6),
)
def test_property_only_negations_match_iff_some_file_survives(negs: list[str], files: list[str]) -> None:
    t = PushTrigger(paths=[f"!{n}" for n in negs])
    survives = any(not any(glob_matches(n, f, "path") for n in negs) for f in files)
    assert ok(t, push_event(files=files)) == survives


@settings(max_examples=200, deadline=None)
@given(
    pos=st.lists(st.sampled_from(["src/**", "*.md", "**/*.py", "docs/*"]), min_size=1, max_size=3),
    negs=st.lists(st.sampled_from(_NEGATIONS), max_size=3),
    files=st.lists(st.sampled_from(_FILES), max_size=6),
)
def test_property_paths_oracle(pos: list[str], negs: list[str], files: list[str]) -> None:
    t = PushTrigger(paths=pos + [f"!{n}" for n in negs])
    remaining = [f for f in files if not any(glob_matches(n, f, "path") for n in negs)]
    expected = any(any(glob_matches(p, f, "path") for p in pos) for f in remaining)
    assert ok(t, push_event(files=files)) == expected


@settings(max_examples=200, deadline=None)
@given(
    pats=st.lists(st.sampled_from(["main", "release/*", "release/**", "!release/old*", "feat-*", "!main"])),
    branch=st.sampled_from(["main", "release/1", "release/old1", "release/a/b", "feat-x", "dev"]),
)
def test_property_branch_list_oracle(pats: list[str], branch: str) -> None:
    t = PushTrigger(branches=[G(p) for p in pats])
    pos = [p for p in pats if not p.startswith("!")]
    neg = [p[1:] for p in pats if p.startswith("!")]
    expected = (not pos or any(glob_matches(p, branch) for p in pos)) and not any(glob_matches(n, branch) for n in neg)
    assert ok(t, push_event(branch)) == expected


_GLOBS = [
    "src/**",
    "src/app/**",
    ".github/**",
    "docs",
    "*.md",
    "**/*.py",
    "src/*",
    "{a,b}/**",
    "a.b",
    "!(main)",
    "src",
    "**",
    "@(a|src)/**",
    "a.b/**",
    "é/**",
]


@settings(max_examples=500, deadline=None)
@given(
    globs=st.lists(st.sampled_from(_GLOBS), min_size=1, max_size=4),
    value=st.text(alphabet=["s", "r", "c", "a", "b", "/", ".", "p", "y", "m", "d", "\n", "\u2028", "é", "😀"]),
    kind=st.sampled_from(["branch", "path"]),
)
def test_property_compiled_glob_sets_agree_with_glob_matches(globs: list[str], value: str, kind: Any) -> None:
    """The precompiled sets (one alternation, `<dir>/**` string tests) answer like `glob.matches`."""
    compiled = trig._glob_set(globs, kind)
    assert compiled.hit(value) == any(glob_matches(g, value, kind) for g in globs)
    for prefix in ("src/", "src/app/", ".github/", "a/", "a.b/", "é/", "src"):
        v = prefix + value
        assert compiled.hit(v) == any(glob_matches(g, v, kind) for g in globs), v


# -------------------------------------------------------------------------------------------------- §5.7-8 pr


def test_pr_default_events() -> None:
    t = PrTrigger(events=PR_DEFAULT)
    for action in PR_DEFAULT:
        assert ok(t, pr_event(action))
    assert why(t, pr_event("labeled")) == ("action 'labeled' not in events [opened, synchronize, reopened, closed]")
    assert not ok(t, pr_event(None))


def test_pr_source_filter_without_source_branch() -> None:
    t = PrTrigger(events=PR_DEFAULT, source_branches=[G("feature/*")])
    assert ok(t, pr_event(source="feature/x"))
    assert not ok(t, pr_event(source="bugfix/x"))
    assert "no source branch" in why(t, pr_event(source=None))


def test_pr_reason_on_match() -> None:
    t = PrTrigger(events=["opened"], target_branches=[G("main")])
    matched, reason = match_trigger(t, pr_event())
    assert matched
    assert reason == "pr opened 'feature/x' -> 'main' matched events [opened], target branches [main]"


def test_pr_from_real_payloads() -> None:
    t = PrTrigger(events=PR_DEFAULT, target_branches=[G("master")], source_branches=[G("chang*")])
    for name in ["opened", "synchronize", "reopened", "closed", "labeled"]:
        data = gh(f"pull_request.{name}.json")
        pr = data["pull_request"]
        event = Event(
            type="pr",
            name="pull_request",
            action=data["action"],
            target_branch=pr["base"]["ref"],
            source_branch=pr["head"]["ref"],
            branch=pr["head"]["ref"],
            repo=data["repository"]["full_name"],
            source_repo=pr["head"]["repo"]["full_name"],
            payload=data,
        )
        assert ok(t, event) == (name != "labeled"), name


# --------------------------------------------------------------------------------------------- §5.9 workflows


def test_workflow_without_triggers_never_matches() -> None:
    decision = match_workflow(wf("empty"), push_event())
    assert decision == MatchDecision("empty", False, None, ["workflow has no triggers"])


def test_first_matching_trigger_is_reported() -> None:
    w = wf(
        "ci",
        PrTrigger(events=PR_DEFAULT),
        PushTrigger(branches=[G("develop")]),
        PushTrigger(branches=[G("main")]),
        PushTrigger(),
    )
    decision = match_workflow(w, push_event("main"))
    assert decision.matched
    assert decision.match is not None
    assert decision.match.trigger_index == 2
    assert decision.match.trigger_type == "push"
    assert decision.match.workflow == "ci"
    assert decision.match.reason == "push to 'main' matched branches [main]"
    assert decision.reasons == [
        "pr[0]: pr trigger does not match push events",
        "push[1]: branch 'main' not in branches [develop]",
    ]


def test_no_match_lists_every_reason() -> None:
    w = wf("ci", PushTrigger(branches=[G("main")]), TagTrigger(patterns=[G("v*")]))
    decision = match_workflow(w, push_event("dev"))
    assert not decision.matched and decision.match is None
    assert decision.reasons == [
        "push[0]: branch 'dev' not in branches [main]",
        "tag[1]: tag trigger does not match push events",
    ]


def test_match_all_keeps_order() -> None:
    ws = [wf("a", PushTrigger()), wf("b", TagTrigger()), wf("c")]
    assert [d.matched for d in match_all(ws, push_event())] == [True, False, False]
    assert [d.workflow for d in match_all(ws, push_event())] == ["a", "b", "c"]


# ------------------------------------------------------------------------------------------------- §5.10 tags


def test_push_with_tags_compiles_to_push_plus_tag() -> None:
    w = wf("release", PushTrigger(branches=[G("main")]), TagTrigger(patterns=[G("v*")]))
    on_tag = match_workflow(w, Event(type="tag", name="push", tag="v1.0"))
    assert on_tag.match is not None and on_tag.match.trigger_index == 1
    assert on_tag.match.reason == "tag 'v1.0' matched patterns [v*]"
    on_push = match_workflow(w, push_event("main"))
    assert on_push.match is not None and on_push.match.trigger_index == 0
    assert not match_workflow(w, Event(type="tag", name="push", tag="latest")).matched


def test_tag_trigger() -> None:
    assert ok(TagTrigger(), Event(type="tag", tag="anything"))
    t = TagTrigger(patterns=[R(r"^v\d+\.\d+$")])
    assert ok(t, Event(type="tag", tag="v1.2"))
    assert not ok(t, Event(type="tag", tag="v1.2.3"))
    assert "no tag" in why(t, Event(type="tag"))
    assert not ok(TagTrigger(), push_event())
    data = gh("push.tag-created.json")
    event = Event(type="tag", name="push", tag=data["ref"].removeprefix("refs/tags/"), payload=data)
    assert ok(TagTrigger(patterns=[G("simple-*")]), event)


# ---------------------------------------------------------------------------------------------- §5.11 comment


def _comment_event(data: dict[str, Any]) -> Event:
    return Event(
        type="comment",
        name="issue_comment",
        action=data["action"],
        repo=data["repository"]["full_name"],
        payload=data,
    )


def test_comment_source_pr_requires_pull_request() -> None:
    data = gh("issue_comment.created.json")
    on_issue = _comment_event(data)
    on_pr = _comment_event({**data, "issue": {**data["issue"], "pull_request": {"url": "x"}}})
    pr_only = CommentTrigger(source="pr")
    issue_only = CommentTrigger(source="issue")
    assert why(pr_only, on_issue) == "comment is on an issue, not a pull request"
    assert ok(pr_only, on_pr)
    assert ok(issue_only, on_issue)
    assert why(issue_only, on_pr) == "comment is on a pull request, not an issue"
    assert ok(CommentTrigger(), on_issue) and ok(CommentTrigger(), on_pr)


def test_comment_actions_and_body() -> None:
    data = gh("issue_comment.created.json")
    event = _comment_event(data)
    assert ok(CommentTrigger(actions=["created"]), event)
    assert "action 'created' not in actions [edited]" in why(CommentTrigger(actions=["edited"]), event)
    assert ok(CommentTrigger(body_match=R("totally right", "i")), event)
    assert ok(CommentTrigger(body_match=R("^you are", "i")), event)
    assert not ok(CommentTrigger(body_match=R("^you are")), event)
    deploy = Event(type="comment", action="created", payload={"comment": {"body": "/deploy"}})
    assert ok(CommentTrigger(body_match=G("/deploy")), deploy)
    assert not ok(CommentTrigger(body_match=G("/deploy")), event)
    assert why(CommentTrigger(body_match=G("x")), Event(type="comment")) == "comment has no body"


def test_odd_payload_shapes_do_not_crash() -> None:
    event = Event(type="comment", action="created", payload={"issue": "nope", "comment": ["x"]})
    assert not ok(CommentTrigger(source="pr"), event)
    assert ok(CommentTrigger(source="issue"), event)
    assert not ok(CommentTrigger(body_match=G("*")), event)
    assert not ok(ReviewTrigger(states=["approved"]), Event(type="review", payload={"review": None}))


# ------------------------------------------------------------------------------------------- §5.12 kici_event


def _kici(payload: dict[str, Any], name: str = "deploy", source: str | None = None) -> Event:
    return Event(type="kici_event", name=name, payload=payload, source=source)


def test_kici_event_match() -> None:
    t = KiciEventTrigger(event_name="deploy", match={"$.env": "prod"})
    assert ok(t, _kici({"env": "prod"}))
    assert why(t, _kici({"env": "staging"})) == 'payload $.env = "staging" does not match "prod"'
    assert why(t, _kici({})) == 'payload has no $.env (match "prod")'
    assert why(t, _kici({"env": "prod"}, name="other")) == "event name 'other' is not 'deploy'"


def test_kici_event_regex_and_not() -> None:
    rx = KiciEventTrigger(event_name="deploy", match={"$.env": "/^prod/"})
    assert ok(rx, _kici({"env": "production"}))
    assert not ok(rx, _kici({"env": "preprod"}))
    blocked = KiciEventTrigger(event_name="deploy", not_={"$.env": "staging"})
    assert ok(blocked, _kici({"env": "prod"}))
    assert ok(blocked, _kici({}))
    assert why(blocked, _kici({"env": "staging"})) == 'payload $.env matches not "staging"'
    both = KiciEventTrigger(
        event_name="deploy", match={"$.env": ["prod", "staging"]}, not_={"$.dry_run": True, "$.x": 1}
    )
    assert ok(both, _kici({"env": "staging", "dry_run": False}))
    assert not ok(both, _kici({"env": "staging", "dry_run": True}))
    assert not ok(both, _kici({"env": "staging", "x": 1}))  # any `not` entry blocks


def test_kici_event_source() -> None:
    t = KiciEventTrigger(event_name="deploy", source="org/infra")
    assert ok(t, _kici({}, source="org/infra"))
    assert not ok(t, _kici({}, source="org/other"))
    assert "no source" in why(t, _kici({}))


def test_kici_event_invalid_json_path_never_matches() -> None:
    t = KiciEventTrigger(event_name="deploy", match={"$..env": "prod"})
    assert why(t, _kici({"env": "prod"})).startswith("invalid JSONPath in match")


def test_kici_event_lock_file_roundtrip_uses_not_alias() -> None:
    w = wf("k", KiciEventTrigger(event_name="deploy", not_={"$.env": "staging"}))
    lock = parse_lock_file(render_lock_file(build_lock_file([w])))
    parsed = lock.workflows[0]
    assert not match_workflow(parsed, _kici({"env": "staging"})).matched
    assert match_workflow(parsed, _kici({"env": "prod"})).matched


# ------------------------------------------------------------------------------------------------ §5.13 repos


def test_repos_filter() -> None:
    t = PushTrigger(repos=["myorg/*", "!myorg/archived-*"])
    assert why(t, push_event(repo="myorg/archived-x")) == (
        "repo 'myorg/archived-x' excluded by repos [myorg/*, !myorg/archived-*]"
    )
    assert ok(t, push_event(repo="myorg/app"))
    assert why(t, push_event()) == "event has no repo for repos [myorg/*, !myorg/archived-*]"
    assert not ok(t, push_event(repo="other/app"))
    assert not ok(t, push_event(repo="myorg/app/extra"))
    assert ok(PushTrigger(repos=[]), push_event())
    assert ok(PushTrigger(repos=["!myorg/secret"]), push_event(repo="myorg/app"))
    pr = PrTrigger(events=PR_DEFAULT, repos=["myorg/*"])
    assert ok(pr, pr_event(repo="myorg/app"))
    assert not ok(pr, pr_event())


# --------------------------------------------------------------------------------------------- §5.35 schedule


def test_schedule_only_matches_schedule_events() -> None:
    t = ScheduleTrigger(cron_expression="0 3 * * *")
    # Registration on the default branch is the orchestrator's job; a push never fires a schedule trigger.
    assert not ok(t, push_event("main"))
    assert ok(t, Event(type="schedule"))
    assert ok(t, Event(type="schedule", name="0 3 * * *"))
    assert why(t, Event(type="schedule", name="0 4 * * *")) == (
        "schedule '0 4 * * *' is not this trigger's cron '0 3 * * *'"
    )
    w = wf("nightly", ScheduleTrigger(cron_expression="0 9 * * 1"), ScheduleTrigger(cron_expression="0 18 * * 5"))
    decision = match_workflow(w, Event(type="schedule", name="0 18 * * 5"))
    assert decision.match is not None and decision.match.trigger_index == 1


# --------------------------------------------------------------------------------------------- other triggers


def test_review_trigger() -> None:
    data = gh("pull_request_review.submitted.json")
    event = Event(type="review", name="pull_request_review", action=data["action"], payload=data)
    assert ok(ReviewTrigger(), event)
    assert ok(ReviewTrigger(actions=["submitted"], states=["commented"]), event)
    assert ok(ReviewTrigger(states=["COMMENTED"]), event)
    assert why(ReviewTrigger(states=["approved"]), event) == ("review state 'commented' not in states [approved]")
    upper = Event(type="review", action="submitted", payload={"review": {"state": "APPROVED"}})
    assert ok(ReviewTrigger(states=["approved"]), upper)
    assert not ok(ReviewTrigger(actions=["dismissed"]), event)


@pytest.mark.parametrize(
    ("model", "event_type", "fixture", "gh_name"),
    [
        (ReviewCommentTrigger, "review_comment", "pull_request_review_comment.created.json", "created"),
        (ReleaseTrigger, "release", "release.published.json", "published"),
        (StarTrigger, "star", "star.created.json", "created"),
        (WatchTrigger, "watch", "watch.started.json", "started"),
    ],
)
def test_action_only_triggers(model: Any, event_type: Any, fixture: str, gh_name: str) -> None:
    data = gh(fixture)
    event = Event(type=event_type, name=fixture.split(".")[0], action=data["action"], payload=data)
    assert data["action"] == gh_name
    assert ok(model(), event)
    assert ok(model(actions=[gh_name, "other"]), event)
    assert why(model(actions=["other"]), event) == f"action {gh_name!r} not in actions [other]"
    assert not ok(model(), push_event())
    assert not ok(model(actions=["other"]), Event(type=event_type))


def test_fork_trigger() -> None:
    data = gh("fork.json")
    assert ok(ForkTrigger(), Event(type="fork", name="fork", payload=data))
    assert not ok(ForkTrigger(), Event(type="star", action="created"))


def test_dispatch_trigger() -> None:
    assert ok(DispatchTrigger(), Event(type="dispatch", name="deploy"))
    t = DispatchTrigger(types=["deploy", "rollback"])
    assert ok(t, Event(type="dispatch", name="rollback"))
    assert why(t, Event(type="dispatch", name="build")) == ("dispatch type 'build' not in types [deploy, rollback]")
    assert not ok(t, Event(type="dispatch"))
    # A raw GitHub repository_dispatch carries the type as its action.
    data = gh("repository_dispatch.on-demand-test.json")
    event = Event(type="dispatch", name="repository_dispatch", action=data["action"], payload=data)
    assert ok(DispatchTrigger(types=["on-demand-test"]), event)
    assert not ok(DispatchTrigger(types=["repository_dispatch"]), event)


@pytest.mark.parametrize(("model", "kind"), [(CreateTrigger, "create"), (DeleteTrigger, "delete")])
def test_create_delete_triggers(model: Any, kind: Any) -> None:
    data = gh(f"{kind}.json")
    event = Event(type=kind, name=kind, payload=data)
    assert ok(model(), event)
    assert ok(model(ref_types=["tag"]), event)
    assert why(model(ref_types=["branch"]), event) == "ref type 'tag' not in ref types [branch]"
    assert ok(model(patterns=[G("simple-*")]), event)
    assert why(model(patterns=[G("v*")]), event) == "ref 'simple-tag' not in patterns [v*]"
    assert ok(model(ref_types=["branch"], patterns=[G("temp/*")]), Event(type=kind, branch="temp/x"))
    assert not ok(model(), push_event())


def test_status_trigger() -> None:
    data = gh("status.json")
    event = Event(type="status", name="status", payload=data)
    assert ok(StatusTrigger(), event)
    assert ok(StatusTrigger(contexts=["default"], states=["success"]), event)
    assert why(StatusTrigger(states=["failure"]), event) == "state 'success' not in states [failure]"
    ci = Event(type="status", payload={"context": "ci/circleci: build", "state": "success"})
    assert ok(StatusTrigger(contexts=["ci/*"]), ci)
    assert not ok(StatusTrigger(contexts=["ci/*", "!ci/circle*"]), ci)
    assert why(StatusTrigger(contexts=["ci/*"]), event) == "context 'default' not in contexts [ci/*]"


def test_workflow_run_trigger() -> None:
    data = gh("workflow_run.completed.json")
    event = Event(type="workflow_run", name="workflow_run", action=data["action"], payload=data)
    assert ok(WorkflowRunTrigger(), event)
    # The example's run name is empty, so the workflow's own name is used.
    t = WorkflowRunTrigger(actions=["completed"], workflows=["test"], conclusions=["success"])
    assert ok(t, event)
    assert why(WorkflowRunTrigger(workflows=["CI"]), event) == "workflow 'test' not in workflows [CI]"
    assert not ok(WorkflowRunTrigger(conclusions=["failure"]), event)
    assert not ok(WorkflowRunTrigger(actions=["requested"]), event)
    named = Event(type="workflow_run", action="completed", payload={"workflow_run": {"name": "CI"}})
    assert ok(WorkflowRunTrigger(workflows=["CI"]), named)


def test_webhook_catch_all() -> None:
    deployment = Event(type="webhook", name="deployment", action="created")
    assert ok(WebhookTrigger(events=["deployment"]), deployment)
    assert ok(WebhookTrigger(events=["deployment"], actions=["created"]), deployment)
    assert why(WebhookTrigger(events=["deployment"], actions=["deleted"]), deployment) == (
        "action 'created' not in actions [deleted]"
    )
    # Any event type, by raw provider name (falling back to the normalized type).
    assert ok(WebhookTrigger(events=["pull_request"]), pr_event())
    assert ok(WebhookTrigger(events=["push"]), Event(type="push"))
    assert ok(WebhookTrigger(), Event(type="star", name="star"))
    assert why(WebhookTrigger(events=["deployment"]), pr_event()) == ("event 'pull_request' not in events [deployment]")


def test_generic_webhook_trigger() -> None:
    def ev(name: str, payload: dict[str, Any], source: str | None = "argocd") -> Event:
        return Event(type="generic_webhook", name=name, source=source, payload=payload)

    t = GenericWebhookTrigger(source="argocd")
    assert ok(t, ev("deploy.success", {}))
    assert why(t, ev("deploy.success", {}, source="stripe")) == "source 'stripe' is not 'argocd'"
    assert not ok(t, ev("deploy.success", {}, source=None))
    filtered = GenericWebhookTrigger(
        source="argocd",
        events=["deploy.success"],
        match={"$.app.env": "prod", "$.replicas": 3},
        not_={"$.dry_run": True},
        path="argocd/hooks",
    )
    assert ok(filtered, ev("deploy.success", {"app": {"env": "prod"}, "replicas": 3}))
    assert not ok(filtered, ev("deploy.failed", {"app": {"env": "prod"}, "replicas": 3}))
    assert not ok(filtered, ev("deploy.success", {"app": {"env": "prod"}, "replicas": "3"}))
    assert not ok(filtered, ev("deploy.success", {"app": {"env": "prod"}, "replicas": 3, "dry_run": True}))
    assert not ok(t, Event(type="kici_event", name="x", source="argocd"))


def test_workflow_complete_trigger() -> None:
    def ev(**kw: Any) -> Event:
        return Event(type="workflow_complete", **kw)

    assert ok(WorkflowCompleteTrigger(), ev(workflow="CI", status="success"))
    t = WorkflowCompleteTrigger(name="CI", status=["success"], source="org/repo")
    assert ok(t, ev(workflow="CI", status="success", source="org/repo"))
    assert why(t, ev(workflow="CD", status="success", source="org/repo")) == "workflow 'CD' is not 'CI'"
    assert why(t, ev(workflow="CI", status="failed", source="org/repo")) == ("status 'failed' not in status [success]")
    assert not ok(t, ev(workflow="CI", status="success"))
    assert not ok(WorkflowCompleteTrigger(status=[]), Event(type="job_complete"))
    assert ok(WorkflowCompleteTrigger(status=[]), ev())


def test_job_complete_trigger() -> None:
    def ev(**kw: Any) -> Event:
        return Event(type="job_complete", **kw)

    assert ok(JobCompleteTrigger(), ev())
    t = JobCompleteTrigger(workflow="CI", job="build", status=["success", "failed"], source="s")
    assert ok(t, ev(workflow="CI", job="build", status="failed", source="s"))
    assert why(t, ev(workflow="CI", job="test", status="failed", source="s")) == "job 'test' is not 'build'"
    assert not ok(t, ev(workflow="CI", job="build", status="skipped", source="s"))
    assert not ok(t, ev(workflow="CI", job="build", status="success"))
    assert not ok(t, Event(type="workflow_complete", workflow="CI", status="success", source="s"))


def test_push_from_real_payload() -> None:
    data = gh("push.branch-with-commits.json")
    files = sorted({f for c in data["commits"] for k in ("added", "modified", "removed") for f in c[k]})
    event = Event(
        type="push",
        name="push",
        branch=data["ref"].removeprefix("refs/heads/"),
        repo=data["repository"]["full_name"],
        changed_files=files,
        payload=data,
    )
    assert ok(PushTrigger(branches=[G("changes")], paths=["*.md"], repos=["baxterthehacker/*"]), event)
    assert not ok(PushTrigger(branches=[G("changes")], paths=["src/**"]), event)
    assert not ok(PushTrigger(branches=[G("main")]), event)


# ---------------------------------------------------------------------------------------- needs_changed_files


def test_needs_changed_files() -> None:
    with_paths = wf("ci", PushTrigger(branches=[G("main")], paths=["src/**"]))
    assert needs_changed_files([with_paths], push_event("main"))
    # The branch filter already rules the trigger out.
    assert not needs_changed_files([with_paths], push_event("dev"))
    # The event type cannot match the path trigger.
    assert not needs_changed_files([with_paths], Event(type="tag", tag="v1"))
    # No trigger filters on paths.
    no_paths = wf("n", PushTrigger(), PrTrigger(events=PR_DEFAULT), TagTrigger())
    assert not needs_changed_files([no_paths], push_event("main"))
    assert not needs_changed_files([], push_event())
    # A PR trigger with paths: only for the actions it listens to.
    pr = wf("pr", PrTrigger(events=PR_DEFAULT, paths=["!docs/**"]))
    assert needs_changed_files([pr], pr_event("synchronize"))
    assert not needs_changed_files([pr], pr_event("labeled"))
    # An earlier trigger without paths already matches: the path trigger is never consulted.
    first = wf("first", PushTrigger(branches=[G("main")]), PushTrigger(paths=["src/**"]))
    assert not needs_changed_files([first], push_event("main"))
    assert needs_changed_files([first], push_event("dev"))
    # Any workflow needing them is enough.
    assert needs_changed_files([no_paths, with_paths], push_event("main"))


# --------------------------------------------------------------------------------------------------- JSONPath


DOC: dict[str, Any] = {
    "a": {"b": 1, "list": [{"b": "x"}, {"b": "y"}], "null": None},
    "x-y": "dash",
    "a.b": "dotted",
    "it's": 2,
    "top": [10, 20, 30],
}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("$", (True, DOC)),
        ("$.a.b", (True, 1)),
        ("a.b", (True, 1)),
        ("$.a.list[0].b", (True, "x")),
        ("$.a.list[1].b", (True, "y")),
        ("$.a.list[-1].b", (True, "y")),
        ("a.list[0].b", (True, "x")),
        ("$.a.list.0.b", (True, "x")),
        ("$['x-y']", (True, "dash")),
        ('$["x-y"]', (True, "dash")),
        ("$.x-y", (True, "dash")),
        ("$['a.b']", (True, "dotted")),
        ("$['a']['b']", (True, 1)),
        ("$['it\\'s']", (True, 2)),
        ("$.top[ 2 ]", (True, 30)),
        ("$.a.null", (True, None)),
        ("$.a.missing", (False, None)),
        ("$.a.b.c", (False, None)),
        ("$.a.list[5]", (False, None)),
        ("$.a.list[-3]", (False, None)),
        ("$.a[0]", (False, None)),
        ("$.top.x", (False, None)),
        ("top", (True, [10, 20, 30])),
    ],
)
def test_json_path_get(path: str, expected: tuple[bool, Any]) -> None:
    assert json_path_get(DOC, path) == expected


def test_json_path_on_non_containers() -> None:
    assert json_path_get("text", "$.a") == (False, None)
    assert json_path_get(None, "$") == (True, None)
    assert json_path_get([1, 2], "$[1]") == (True, 2)


@pytest.mark.parametrize("path", ["", "   ", "$.", "$..a", "$.a[", "$[x]", "$.*", "$a", "$.a]", "[0]", ".a"])
def test_json_path_malformed(path: str) -> None:
    with pytest.raises(ValueError):
        parse_json_path(path)


# ----------------------------------------------------------------------------------------------- match_values


@pytest.mark.parametrize(
    ("match", "data", "expected"),
    [
        ({}, {}, True),
        ({"$.env": "prod"}, {"env": "prod"}, True),
        ({"$.env": "prod"}, {"env": "Prod"}, False),
        ({"$.env": "prod"}, {}, False),
        ({"$.n": 1}, {"n": 1}, True),
        ({"$.n": 1}, {"n": 1.0}, True),
        ({"$.n": 1}, {"n": "1"}, False),  # no string/number coercion
        ({"$.n": "1"}, {"n": 1}, False),
        ({"$.n": ["1", 1]}, {"n": "1"}, True),
        ({"$.b": True}, {"b": True}, True),
        ({"$.b": True}, {"b": 1}, False),  # booleans only equal booleans
        ({"$.n": 1}, {"n": True}, False),
        ({"$.v": None}, {"v": None}, True),
        ({"$.v": None}, {}, False),
        ({"$.v": None}, {"v": 0}, False),
        ({"$.env": ["prod", "staging"]}, {"env": "staging"}, True),
        ({"$.env": ["prod", "staging"]}, {"env": "dev"}, False),
        ({"$.env": []}, {"env": "dev"}, False),
        ({"$.env": "/^prod/"}, {"env": "production"}, True),
        ({"$.env": "/^prod/"}, {"env": "PRODUCTION"}, False),
        ({"$.env": "/^prod/i"}, {"env": "PRODUCTION"}, True),
        ({"$.env": ["/^prod/", "dev"]}, {"env": "dev"}, True),
        ({"$.ver": "/^2\\./"}, {"ver": 2.5}, True),  # numbers are searched as JSON text
        ({"$.flag": "/true/"}, {"flag": True}, False),  # regexes apply to strings and numbers only
        ({"$.path": "/deploy"}, {"path": "/deploy"}, True),  # no closing slash: a literal
        ({"$.path": "/a/b"}, {"path": "/a/b"}, True),  # `b` is not a regex flag: a literal
        ({"$.env": "/[/"}, {"env": "["}, False),  # invalid regex never matches
        ({"$.obj": {"a": 1}}, {"obj": {"a": 1}}, True),
        ({"$.obj": {"a": 1}}, {"obj": {"a": 2}}, False),
        ({"$.arr": [[1, 2]]}, {"arr": [1, 2]}, True),  # a list of one list: any-of with deep equality
        ({"$.a": 1, "$.b": 2}, {"a": 1, "b": 2}, True),
        ({"$.a": 1, "$.b": 2}, {"a": 1, "b": 3}, False),
        ({"$.items[0].id": 7}, {"items": [{"id": 7}]}, True),
    ],
)
def test_match_values(match: dict[str, Any], data: Any, expected: bool) -> None:
    assert match_values(match, data) is expected


def test_match_values_malformed_path_raises() -> None:
    with pytest.raises(ValueError):
        match_values({"$..x": 1}, {"x": 1})


# ---------------------------------------------------------------------------------------------------- caching


def test_compiled_cache_releases_dropped_triggers() -> None:
    t = PushTrigger(branches=[G("main")], paths=["src/**"])
    assert ok(t, push_event(files=["src/a.py"]))
    key = id(t)
    assert key in trig._cache
    ref = weakref.ref(t)
    del t
    gc.collect()
    assert ref() is None
    assert key not in trig._cache


def test_cache_is_keyed_by_identity_not_equality() -> None:
    a = PushTrigger(branches=[G("main")])
    b = PushTrigger(branches=[G("main")])
    assert ok(a, push_event("main")) and ok(b, push_event("main"))
    assert trig._compiled(a) is trig._compiled(a)
    assert trig._compiled(a) is not trig._compiled(b)


@pytest.mark.parametrize(
    "trigger",
    [
        PushTrigger(),
        PrTrigger(events=[]),
        TagTrigger(),
        CommentTrigger(),
        ReviewTrigger(),
        ReviewCommentTrigger(),
        ReleaseTrigger(),
        StarTrigger(),
        WatchTrigger(),
        ForkTrigger(),
        DispatchTrigger(),
        CreateTrigger(),
        DeleteTrigger(),
        StatusTrigger(),
        WorkflowRunTrigger(),
        WebhookTrigger(),
        KiciEventTrigger(event_name="e"),
        WorkflowCompleteTrigger(),
        JobCompleteTrigger(),
        GenericWebhookTrigger(source="s"),
        ScheduleTrigger(cron_expression="* * * * *"),
    ],
)
def test_every_trigger_type_matches_only_its_event_type(trigger: Trigger) -> None:
    event_type = trigger.type
    for other in ("push", "pr", "tag", "star", "kici_event", "schedule", "generic_webhook"):
        event = Event(type=other, name="e" if other == "kici_event" else None, source="s")  # type: ignore[arg-type]
        expected = event_type == "webhook" or event_type == other
        assert ok(trigger, event) is expected, (event_type, other)


def test_glob_set_falls_back_when_sources_cannot_be_joined() -> None:
    # An escaped backslash before a digit looks like a backreference, so the globs are tried one by one.
    globs = [r"a\\1*", "docs", "main*"]
    compiled = trig._glob_set(globs, "branch")
    for value in [r"a\1x", "docs", "mainx", "a1x", "x", ""]:
        assert compiled.hit(value) == any(glob_matches(g, value) for g in globs), value


def test_empty_globs_match_nothing() -> None:
    assert not ok(PushTrigger(branches=[G("")]), push_event("main"))
    assert ok(PushTrigger(branches=[G("!")]), push_event("main"))  # an empty exclusion excludes nothing
    assert not ok(PushTrigger(paths=[""]), push_event(files=["a"]))
