from __future__ import annotations

import pytest

from kici.engine.labels import (
    RESERVED_PREFIX,
    auto_labels,
    compile_label_regex,
    conflicting_labels,
    job_matches_agent,
    validate_matcher,
    validate_user_labels,
)
from kici.engine.lockfile import LabelMatcher


def exact(value: str) -> LabelMatcher:
    return LabelMatcher(kind="exact", value=value)


def regex(source: str, flags: str | None = None) -> LabelMatcher:
    return LabelMatcher(kind="regex", source=source, flags=flags)


# ---------------------------------------------------------------------------------------------- matching


def test_all_runs_on_labels_required() -> None:
    # orchestrator §6.15: [linux, docker] does not go to a [linux] agent, but to [linux, docker, x64].
    runs_on = [exact("linux"), exact("docker")]
    assert not job_matches_agent(runs_on, None, ["linux"])
    assert job_matches_agent(runs_on, None, ["linux", "docker", "x64"])


def test_empty_runs_on_matches_any_agent() -> None:
    assert job_matches_agent([], None, [])
    assert job_matches_agent([], [], ["linux", "gpu"])


def test_exact_is_case_sensitive() -> None:
    assert not job_matches_agent([exact("Linux")], None, ["linux"])
    assert job_matches_agent([exact("Linux")], None, ["Linux"])


def test_regex_is_full_match_with_flags() -> None:
    assert job_matches_agent([regex(r"gpu-\d+")], None, ["gpu-3"])
    assert not job_matches_agent([regex(r"gpu-\d+")], None, ["gpu-3x"])
    assert not job_matches_agent([regex(r"gpu")], None, ["my-gpu-box"])  # anchored, not searched
    assert not job_matches_agent([regex(r"gpu-\d+")], None, ["GPU-3"])
    assert job_matches_agent([regex(r"gpu-\d+", "i")], None, ["GPU-3"])
    assert job_matches_agent([regex(r"kici:os:.*", "g")], None, ["kici:os:linux"])  # JS-only flag ignored


def test_exclude() -> None:
    assert not job_matches_agent([exact("linux")], [exact("gpu")], ["linux", "gpu"])
    assert job_matches_agent([exact("linux")], [exact("gpu")], ["linux"])
    assert not job_matches_agent([], [regex("kici:host:build-.*")], ["kici:host:build-7"])
    assert job_matches_agent([], [regex("kici:host:build-.*")], ["kici:host:dev-1"])


def test_taints_must_be_requested_by_exact_label() -> None:
    agent = ["linux", "prod-deploy"]
    assert not job_matches_agent([exact("linux")], None, agent, agent_taints=["prod-deploy"])
    assert not job_matches_agent([], None, agent, agent_taints=["prod-deploy"])
    assert job_matches_agent([exact("linux"), exact("prod-deploy")], None, agent, agent_taints=["prod-deploy"])
    # A regex that happens to match the taint is not an explicit request.
    assert not job_matches_agent([regex("prod-.*")], None, agent, agent_taints=["prod-deploy"])
    assert not job_matches_agent(
        [exact("prod-deploy")], None, ["prod-deploy", "root"], agent_taints=["prod-deploy", "root"]
    )


def test_bad_matchers_raise() -> None:
    with pytest.raises(ValueError, match="no value"):
        job_matches_agent([LabelMatcher.model_construct(kind="exact")], None, ["x"])
    with pytest.raises(ValueError, match="no source"):
        job_matches_agent([LabelMatcher.model_construct(kind="regex")], None, ["x"])
    with pytest.raises(ValueError, match="needs `value`"):
        LabelMatcher(kind="exact")
    with pytest.raises(ValueError, match=r"label regex /\(/"):
        validate_matcher(regex("("))
    with pytest.raises(ValueError, match="unsupported flag 'x'"):
        validate_matcher(regex("a", "x"))
    validate_matcher(regex("a", "gi"))
    validate_matcher(exact("a"))


def test_regexes_are_compiled_once() -> None:
    compile_label_regex.cache_clear()
    for _ in range(5):
        job_matches_agent([regex("a+")], None, ["aaa", "b"])
    info = compile_label_regex.cache_info()
    assert info.misses == 1 and info.hits >= 4


# ---------------------------------------------------------------------------------------------- conflicts


def test_conflicting_labels() -> None:
    assert conflicting_labels([exact("linux"), exact("gpu")], [exact("gpu")]) == ["gpu"]
    assert conflicting_labels([exact("linux")], None) == []
    assert conflicting_labels([exact("linux")], [exact("Linux")]) == []
    # A required label that an exclude regex matches can never be satisfied either.
    assert conflicting_labels([exact("gpu-1"), exact("linux")], [regex(r"gpu-\d")]) == ["gpu-1"]
    assert conflicting_labels([exact("a"), exact("a")], [exact("a")]) == ["a"]
    assert conflicting_labels([regex("a.*")], [exact("abc")]) == []


# ---------------------------------------------------------------------------------------------- user labels


def test_validate_user_labels_cleans() -> None:
    assert validate_user_labels([" linux ", "docker", "linux", "gpu:2"]) == ["linux", "docker", "gpu:2"]
    assert validate_user_labels([]) == []


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("kici:os:linux", "'kici:os:linux'.*reserved"),
        ("KICI:os:linux", "reserved"),
        ("two words", "'two words'.*whitespace"),
        ("a,b", "'a,b'.*commas"),
        ("tab\there", "whitespace"),
        ("x" * 300, "longer than"),
    ],
)
def test_validate_user_labels_rejects(label: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_user_labels(["ok", label])


# ---------------------------------------------------------------------------------------------- auto labels


def test_auto_labels_linux_x86() -> None:
    assert auto_labels("Linux", "x86_64", "Build-01") == [
        "kici:os:linux",
        "kici:arch:x64",
        "kici:arch:amd64",
        "kici:host:build-01",
    ]
    assert auto_labels("linux", "AMD64", "h")[1:3] == ["kici:arch:x64", "kici:arch:amd64"]


def test_auto_labels_arm_and_others() -> None:
    assert auto_labels("Linux", "aarch64", "pi") == ["kici:os:linux", "kici:arch:arm64", "kici:host:pi"]
    assert auto_labels("Darwin", "arm64", "mac") == [
        "kici:os:darwin",
        "kici:os:macos",
        "kici:arch:arm64",
        "kici:host:mac",
    ]
    assert "kici:os:windows" in auto_labels("Windows", "AMD64", "w")
    assert auto_labels("FreeBSD", "riscv64", "") == ["kici:os:freebsd", "kici:arch:riscv64"]
    assert all(label.startswith(RESERVED_PREFIX) for label in auto_labels("Linux", "x86_64", "h"))
    assert all(label == label.lower() for label in auto_labels("LINUX", "X86_64", "HOST"))


def test_auto_labels_route_jobs() -> None:
    agent = auto_labels("Linux", "x86_64", "box")
    assert job_matches_agent([exact("kici:os:linux"), exact("kici:arch:amd64")], None, agent)
    assert not job_matches_agent([exact("kici:arch:arm64")], None, agent)
