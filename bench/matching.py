"""Trigger-matching throughput: (event, workflow) evaluations per second through kici.engine.triggers.

Builds 50 workflows shaped like real ones (push with branches and paths, pr with targets and path
exclusions, tags) and a mix of push / pr / tag events with a handful of changed files each, then times
`match_all` over every event. Prints one JSON object; `--quick` runs a shorter pass (used by the test
suite to keep this script working).

    .venv/bin/python bench/matching.py
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

from kici.engine import lockfile as lf
from kici.engine.events import Event
from kici.engine.triggers import match_all


def glob(p: str) -> lf.BranchPattern:
    return lf.BranchPattern(type="glob", pattern=p)


def make_workflows(n: int) -> list[lf.Workflow]:
    out = []
    for i in range(n):
        triggers: list[lf.Trigger] = [
            lf.PushTrigger(branches=[glob("main"), glob(f"release/{i}.*")], paths=[f"svc{i}/**", "!**/*.md"]),
            lf.PrTrigger(events=["opened", "synchronize", "reopened"], target_branches=[glob("main")],
                         paths=[f"svc{i}/**", "lib/**/*.py", "!docs/**"]),
            lf.TagTrigger(patterns=[glob("v*")]),
        ]
        out.append(lf.Workflow(
            name=f"wf{i}", source=lf.SourceRef(file=f".kici/workflows/wf{i}.py", export="#wf"),
            content_hash="0" * 64, compile_schema_version=1, triggers=triggers,
            jobs=[lf.Job(name="j", steps=[lf.Step(name="s")])],
        ))
    return out


def make_events(n: int, rng: random.Random) -> list[Event]:
    events = []
    for _ in range(n):
        files = [f"svc{rng.randrange(60)}/src/mod{rng.randrange(9)}.py" for _ in range(4)] + ["docs/index.md"]
        kind = rng.choice(["push", "push", "pr", "tag"])
        if kind == "push":
            events.append(Event(type="push", branch=rng.choice(["main", "dev", "release/3.1"]), changed_files=files))
        elif kind == "pr":
            events.append(Event(type="pr", action="synchronize", target_branch="main", source_branch="feat/x",
                                changed_files=files))
        else:
            events.append(Event(type="tag", tag=rng.choice(["v1.2.3", "nightly"])))
    return events


def measure(wfs: list[lf.Workflow], evs: list[Event], repeats: int, explain: bool) -> tuple[list[float], int, int]:
    """(workflow evaluations/s per repeat, matched pairs, triggers evaluated per pass)."""
    rates = []
    matched = triggers = 0
    for _ in range(repeats):
        start = time.perf_counter()
        matched = triggers = 0
        for ev in evs:
            for d in match_all(wfs, ev, explain=explain):
                if d.matched:
                    matched += 1
                    assert d.match is not None
                    triggers += d.match.trigger_index + 1
                else:
                    triggers += 3
        elapsed = time.perf_counter() - start
        rates.append(len(wfs) * len(evs) / elapsed)
    return rates, matched, triggers


def run(workflows: int, events: int, repeats: int) -> dict[str, object]:
    rng = random.Random(7)
    wfs = make_workflows(workflows)
    evs = make_events(events, rng)
    match_all(wfs, evs[0])  # warm caches (compiled globs) as a running orchestrator would have them
    hot, matched, triggers = measure(wfs, evs, repeats, explain=False)
    explained, _, _ = measure(wfs, evs, repeats, explain=True)
    per_pair = triggers / (workflows * events)
    return {
        "benchmark": "trigger matching",
        "workflows": workflows,
        "events": events,
        "triggers_per_workflow": 3,
        "matched_pairs": matched,
        "triggers_evaluated_per_pair": round(per_pair, 2),
        "orchestrator_path": {
            "workflow_evaluations_per_s_median": round(statistics.median(hot)),
            "workflow_evaluations_per_s_min": round(min(hot)),
            "workflow_evaluations_per_s_best": round(max(hot)),
            "trigger_evaluations_per_s_median": round(statistics.median(hot) * per_pair),
        },
        "preview_path_with_reasons": {
            "workflow_evaluations_per_s_median": round(statistics.median(explained)),
        },
        "python": platform.python_version(),
        "host_cpu_reference_s": cpu_reference(),
    }


def cpu_reference() -> float:
    """Seconds for a fixed pure-Python loop: this host's speed varies over time (shared machine), so
    results are recorded with it (the same loop took 0.31-0.50 s on the dev machine on one day)."""
    start = time.perf_counter()
    sum(i * i for i in range(3_000_000))
    return round(time.perf_counter() - start, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    result = run(50, 200 if args.quick else 2000, 1 if args.quick else 5)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
