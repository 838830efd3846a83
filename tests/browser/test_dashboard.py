"""The dashboard in Chromium against a real orchestrator and agent: sign-in, the runs list updating by
itself, a running step's log line on the run page within a second, cancel from the page, a viewer with
no buttons and a 403 when forcing, CSRF-less posts refused, a 200,000-line log that loads and scrolls,
the Schedules page, a draining agent on the Agents page, and the screenshots in docs/images/."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

from tests.browser.conftest import ARTIFACTS, REPO_ROOT
from tests.e2e.conftest import OWNER_TOKEN, WORKFLOW_HEADER, System, wait_for

DOCS_IMAGES = REPO_ROOT / "docs" / "images"

QUICK = WORKFLOW_HEADER + '''

quick = workflow("quick", on=[push(branches=["main"])], jobs=[job("hello", steps=[step("say", "echo hello")])])
'''

LIVE = WORKFLOW_HEADER + '''
import pathlib
import time


@step
def chatty(ctx: Context) -> None:
    """Answers each `ping-N` file in GO with a timestamped line, until `stop` appears or 120 s pass."""
    go = pathlib.Path({go!r})
    ctx.log.info("live step started")
    answered: set[str] = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (go / "stop").exists():
        for ping in sorted(go.glob("ping-*")):
            if ping.name not in answered:
                answered.add(ping.name)
                ctx.log.info(f"pong {{ping.name}} at {{time.time():.3f}}")
        time.sleep(0.02)


build = job("build", steps=[step("prepare", "echo preparing"), chatty])
deploy = job("deploy", needs=[build], steps=[step("ship", "echo shipping")])
live = workflow("live", on=[push(branches=["main"])], jobs=[build, deploy])
'''

BIG = WORKFLOW_HEADER + '''

big = workflow("big", on=[push(branches=["main"])],
               jobs=[job("spew", steps=[step("count", "seq 1 200000")])])
'''


def commit_only(system: System, name: str, text: str, message: str) -> str:
    """Commit `text` as the repository's only workflow (so one push starts one run)."""
    for old in (system.repo / ".kici" / "workflows").glob("*.py") if (system.repo / ".kici").exists() else ():
        if old.name != f"{name}.py":
            old.unlink()
    return system.commit({f".kici/workflows/{name}.py": text}, message)


def new_context(browser: Any, contexts: list[Any], system: System) -> Any:
    context = browser.new_context(base_url=system.url, viewport={"width": 1280, "height": 900})
    contexts.append(context)
    return context


def sign_in(context: Any, token: str, path: str = "/") -> Any:
    page = context.new_page()
    page.goto(path)
    assert "/login" in page.url
    page.get_by_label("Admin token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"^(?!.*/login)"))
    return page


def viewer_token(system: System) -> str:
    response = system.admin("POST", "/tokens", json={"name": "dev-viewer", "role": "viewer"})
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


def test_sign_in_and_a_push_appears_without_reload(system: System, browser: Any, contexts: list[Any]) -> None:
    page = sign_in(new_context(browser, contexts, system), OWNER_TOKEN)
    assert page.get_by_role("heading", name="Runs").is_visible()
    page.evaluate("window.__sameDocument = true")
    sha = commit_only(system, "quick", QUICK, "Add the quick workflow")
    page.locator("#runs-rows").get_by_text(sha[:8]).wait_for(timeout=15_000)
    row = page.locator("#runs-rows tr", has_text=sha[:8])
    assert "quick" in row.inner_text() and "push" in row.inner_text()
    assert page.evaluate("window.__sameDocument") is True  # updated in place, not reloaded
    system.wait_run(sha, "success")
    row.get_by_text("success").wait_for(timeout=15_000)


def test_live_log_cancel_and_roles(
    system: System, browser: Any, contexts: list[Any], tmp_path: Path
) -> None:
    go = tmp_path / "go"
    go.mkdir()
    sha = commit_only(system, "live", LIVE.format(go=str(go)), "live workflow")
    run = system.wait_run(sha, "running")
    wait_for(lambda: system.jobs(run["id"])["build"]["status"] == "running", what="build running")

    owner = sign_in(new_context(browser, contexts, system), OWNER_TOKEN, f"/runs/{run['id']}?job=build")
    owner.locator("#log").get_by_text("live step started").wait_for(timeout=15_000)
    assert owner.locator("svg.graph .edge").count() == 1  # build → deploy

    # a line printed by the running step shows up within a second, without a reload
    (go / "ping-1").touch()
    line = owner.locator("#log .ln", has_text="pong ping-1 at")
    line.wait_for(timeout=10_000)
    shown_at = time.time()
    printed_at = float(re.search(r"at (\d+\.\d+)", line.inner_text()).group(1))  # type: ignore[union-attr]
    assert shown_at - printed_at <= 1.0, f"the line took {shown_at - printed_at:.2f} s to reach the page"

    # a viewer: the same page without buttons, and 403 when forcing the request (with a valid CSRF token)
    viewer = sign_in(new_context(browser, contexts, system), viewer_token(system), f"/runs/{run['id']}")
    viewer.locator("#log").get_by_text("live step started").wait_for(timeout=15_000)
    assert viewer.locator("#cancel, #force-cancel, #rerun").count() == 0
    assert viewer.get_by_role("link", name="Sources").count() == 0
    csrf = viewer.locator('meta[name="csrf-token"]').get_attribute("content")
    forced = viewer.request.post(f"/runs/{run['id']}/cancel", form={"csrf_token": csrf or "", "force": "true"},
                                 max_redirects=0)
    assert forced.status == 403

    # the owner's post without the CSRF token is refused; the run goes on
    no_csrf = owner.request.post(f"/runs/{run['id']}/cancel", form={"force": "true"}, max_redirects=0)
    assert no_csrf.status == 403
    assert system.jobs(run["id"])["build"]["status"] == "running"

    # cancel from the page stops the job
    owner.get_by_role("button", name="Cancel", exact=True).click()
    owner.wait_for_url(re.compile(r"notice=cancel-requested"))
    system.wait_run(sha, "cancelled", "failed", within=30)
    assert system.jobs(run["id"])["build"]["status"] == "cancelled"
    owner.get_by_role("button", name="Rerun").wait_for(timeout=15_000)


def test_a_200000_line_log_loads_and_scrolls(system: System, browser: Any, contexts: list[Any]) -> None:
    sha = commit_only(system, "big", BIG, "a very long log")
    run = system.wait_run(sha, "success", "failed", within=120)
    assert run["status"] == "success", system.diagnostics()
    page = sign_in(new_context(browser, contexts, system), OWNER_TOKEN, f"/runs/{run['id']}")
    pager = re.search(r"Page (\d+) of (\d+) · (\d+) lines", page.locator("nav.pager").inner_text())
    assert pager, page.locator("nav.pager").inner_text()
    page_no, pages, total = (int(x) for x in pager.groups())
    assert page_no == pages == -(-total // 1000) and total >= 200_000  # the count, plus the set-up lines
    log = page.locator("#log")
    assert 0 < log.locator(".ln").count() <= 1000  # never the whole log in the DOM
    last = log.locator(f"#L{total}")
    assert last.inner_text().split() == [str(total), "200000"]
    log.evaluate("el => { el.scrollTop = 0; }")
    log.evaluate("el => { el.scrollTop = el.scrollHeight; }")
    assert last.is_visible()
    page.get_by_role("link", name="First").click()
    page.wait_for_url(re.compile(r"page=1"))
    assert page.locator(".ln").count() == 1000 and page.locator("#L1").count() == 1
    page.get_by_label("Line", exact=True).fill("123456")
    page.get_by_role("button", name="Go").click()
    page.wait_for_url(re.compile(r"line=123456"))
    assert page.locator("#L123456").count() == 1 and page.locator(".ln").count() == 1000
    assert page.get_by_text(f"Page 124 of {pages}").is_visible()
    page.goto(f"/runs/{run['id']}?job=spew&q=199999")
    assert page.get_by_text("1 matching line").is_visible()


SCHEDULED = WORKFLOW_HEADER + '''
from kici import schedule

nightly = workflow("nightly", on=[push(branches=["main"]), schedule("0 3 * * *", timezone="Europe/Berlin")],
                   jobs=[job("suite", steps=[step("test", "echo testing")])])
'''


def test_schedules_page(system: System, browser: Any, contexts: list[Any]) -> None:
    """A schedule registered by a push to the default branch is listed on the Schedules page, reached from
    the navigation by a viewer; its workflow links to its runs."""
    sha = commit_only(system, "nightly", SCHEDULED, "Run the suite every night")

    def registered() -> list[dict[str, Any]]:
        return [s for s in system.admin("GET", "/schedules").json() if s["workflow"] == "nightly"]

    wait_for(lambda: registered() and registered()[0]["lock_commit"] == sha, what="the nightly schedule")
    system.wait_run(sha, "success", "failed")
    page = sign_in(new_context(browser, contexts, system), viewer_token(system))
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Schedules").click()
    page.wait_for_url(re.compile(r"/schedules$"))
    assert page.get_by_role("heading", name="Schedules").is_visible()
    row = page.locator("table.schedules tbody tr", has_text="nightly")
    cells = [c.strip() for c in row.locator("td").all_inner_texts()]
    assert cells[1:3] == ["0 3 * * *", "Europe/Berlin"], cells
    assert "never" in cells[4] and "main" in cells[6] and sha[:8] in cells[6]
    next_fire = row.locator("td").nth(3).locator("time")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T0[12]:00:00Z", next_fire.get_attribute("datetime") or "")  # 03:00 Berlin
    target = DOCS_IMAGES if os.environ.get("KICI_DOCS_SCREENSHOTS") == "1" else ARTIFACTS / "docs-images"
    target.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(target / "dashboard-schedules.png"))
    row.get_by_role("link", name="nightly").click()
    page.wait_for_url(re.compile(r"trigger=schedule"))
    assert page.get_by_role("heading", name="Runs").is_visible()


DRAINED = WORKFLOW_HEADER + '''
import pathlib
import time


@step
def hold(ctx: Context) -> None:
    """Runs until `release` appears in GO (or 120 s pass), so the agent is busy while it drains."""
    go = pathlib.Path({go!r})
    ctx.log.info("holding")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (go / "release").exists():
        time.sleep(0.05)


held = workflow("held", on=[push(branches=["main"])], jobs=[job("hold", runs_on="drainer", steps=[hold])])
'''


def test_agents_page_shows_a_draining_agent(
    system: System, browser: Any, contexts: list[Any], tmp_path: Path
) -> None:
    """SIGUSR1 to a busy agent: the Agents page shows it draining (from its agent.status) until its job is
    done and it leaves."""
    go = tmp_path / "go"
    go.mkdir()
    drainer = system.start_agent("drainer", labels="drainer")
    try:
        sha = commit_only(system, "held", DRAINED.format(go=str(go)), "hold the drainer busy")
        run = system.wait_run(sha, "running")
        wait_for(lambda: system.jobs(run["id"])["hold"]["status"] == "running", what="hold running")
        page = sign_in(new_context(browser, contexts, system), viewer_token(system), "/agents")
        row = page.locator("tbody tr", has_text="drainer")
        assert row.locator(".badge").inner_text() == "connected"
        drainer.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: any(a["id"] == "drainer" and a["draining"] for a in system.admin("GET", "/agents").json()),
                 what="the orchestrator to know the agent drains")
        page.reload()
        assert row.locator(".badge").inner_text() == "draining"
        assert row.get_by_role("link", name="hold").is_visible()  # its job, still running
        (go / "release").touch()
        system.wait_run(sha, "success", "failed")
        assert drainer.proc.wait(timeout=30) == 0  # drained: it exits once its job is done
        page.reload()
        assert row.locator(".badge").inner_text() == "disconnected"
    finally:
        (go / "release").touch()
        drainer.stop()


DOC_SHOTS = ("runs", "run", "schedules", "agents", "queue", "sources", "audit")


def test_docs_screenshots(system: System, browser: Any, contexts: list[Any]) -> None:
    """Screenshots of every page, for docs/operator/dashboard.md: written to docs/images/ with
    KICI_DOCS_SCREENSHOTS=1 (to regenerate them after a page changed), else to the test artifacts."""
    target = DOCS_IMAGES if os.environ.get("KICI_DOCS_SCREENSHOTS") == "1" else ARTIFACTS / "docs-images"
    target.mkdir(parents=True, exist_ok=True)
    sha = commit_only(system, "live", LIVE.format(go="/nonexistent-dir"), "Ship the new checkout flow")
    run = system.wait_run(sha, "running", "success", "failed")
    page = sign_in(new_context(browser, contexts, system), OWNER_TOKEN)
    page.screenshot(path=str(target / "dashboard-runs.png"))
    page.goto(f"/runs/{run['id']}?job=build")
    page.locator("#log").get_by_text("live step started").wait_for(timeout=15_000)
    page.screenshot(path=str(target / "dashboard-run.png"), full_page=True)
    for name in ("agents", "queue", "sources", "audit"):
        page.goto(f"/{name}")
        page.screenshot(path=str(target / f"dashboard-{name}.png"))
    system.admin("POST", f"/runs/{run['id']}/cancel", json={"force": True})
    taken_here = [name for name in DOC_SHOTS if name != "schedules"]  # that one: test_schedules_page
    assert all((target / f"dashboard-{name}.png").stat().st_size > 0 for name in taken_here)
    assert all((DOCS_IMAGES / f"dashboard-{name}.png").is_file() for name in DOC_SHOTS), "committed screenshots"
