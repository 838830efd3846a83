"""Browser tests of the dashboard: Playwright for Python driving the distribution's Chromium, headless,
against real orchestrator and agent processes (the harness of tests/e2e).

One browser for the whole session and one system (orchestrator + agent + git repository) per module keep
the total time small. A failed test leaves a screenshot of each open page under
`$KICI_TEST_ARTIFACTS` (default `test-artifacts/browser/` in the repository, ignored by git)."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import git
from tests.e2e.conftest import System, free_port, with_group_kill

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("KICI_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts")) / "browser"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[_FAILED] = report.failed


_FAILED = pytest.StashKey[bool]()


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        raise AssertionError(f"{CHROMIUM} is missing: scripts/test.sh installs it (apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """An orchestrator (SQLite; the dashboard's queries run on both databases in
    tests/integration/orchestrator/test_dashboard.py), one agent and a git source with its hook."""
    tmp = tmp_path_factory.mktemp("browser")
    repo = tmp / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "README.md").write_text("browser\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "initial")
    made = System(tmp=tmp, database_url=f"sqlite:///{tmp / 'db' / 'kici.db'}", port=free_port(), repo=repo)
    try:
        made.start_orchestrator()
        made.register_source()
        made.start_agent("a1")
        yield made
    finally:
        for agent in made.agents:
            agent.stop(signal.SIGKILL if agent.proc.poll() is None else signal.SIGTERM, timeout=5)
            with_group_kill(agent.proc.pid)
        for orchestrator in made.orchestrators:
            orchestrator.kill()


@pytest.fixture
def contexts(browser: Any, request: pytest.FixtureRequest) -> Iterator[list[Any]]:
    """Browser contexts the test opens (`new_context(browser, contexts)`); on failure every open page is
    screenshotted into the artifacts directory."""
    opened: list[Any] = []
    try:
        yield opened
    finally:
        if request.node.stash.get(_FAILED, False):
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)
            for i, context in enumerate(opened):
                for j, page in enumerate(context.pages):
                    try:
                        page.screenshot(path=str(ARTIFACTS / f"{name}-{i}-{j}.png"), full_page=True)
                    except Exception as exc:  # a crashed page must not hide the test's own failure
                        print(f"screenshot failed: {exc}")
            print(f"screenshots of the failed test's pages: {ARTIFACTS}")
        for context in opened:
            context.close()
