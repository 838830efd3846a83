"""Dashboard benchmark: a real orchestrator process, a simulated agent over a real WebSocket, signed git
webhooks over HTTP, and a signed-in HTTP client standing in for the browser.

- runs page: 10,000 runs in the database (inserted directly, as history), then time to first byte of
  `/` (newest page), of a filtered page, and of a page deep in history through its cursor;
- run page: a job whose (simulated) agent sent a 200,000-line log in 50-line chunks, then time to first
  byte of `/runs/<id>` (opens at the log's last page), of its first page and of the page of its middle line;
- live log: the agent sends a one-line chunk every 100 ms carrying its send time; a client follows the
  job's server-sent-event stream (`/runs/<id>/jobs/<job>/live`) and records, per line, the delay from the
  agent's send to the line arriving in the stream; then the same with the run page open in headless
  Chromium, to the line appearing in the page's DOM (`--no-browser` skips that part).

Prints one JSON object.

    .venv/bin/python bench/dashboard.py                # SQLite, full sizes
    .venv/bin/python bench/dashboard.py --db postgresql
    .venv/bin/python bench/dashboard.py --quick        # small sizes (the test suite runs this)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import re
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dispatch import (  # the sibling benchmark's orchestrator and webhook helpers
    ADMIN_TOKEN,
    WEBHOOK_SECRET,
    Orchestrator,
    cpu_reference,
    make_repo,
    on_each_database,
    percentile,
    post_push,
)


class LogAgent:
    """A simulated agent: on each dispatch, acks, reports running, then plays the job's script: `big`
    sends `lines` lines in 50-line chunks and succeeds; `live` waits for `follow` to be set, then sends a
    one-line chunk every `interval` s with its send time, `count` times, and succeeds."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        self.ws: ClientConnection | None = None
        self.task: asyncio.Task[None] | None = None
        self.script: dict[str, Any] = {}
        self.jobs: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.follow = asyncio.Event()
        self.done = asyncio.Event()
        self.playing: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.ws = await connect(self.url, open_timeout=10, max_size=None)
        await self.ws.send(json.dumps({"type": "auth.request", "token": self.token, "protocolVersion": 1}))
        assert json.loads(await self.ws.recv())["type"] == "auth.success"
        await self.ws.send(json.dumps({"type": "agent.register", "message_id": "m", "agent_id": "sim-log",
                                       "labels": [], "max_concurrency": 1}))
        assert json.loads(await self.ws.recv())["type"] == "register.ack"
        self.task = asyncio.create_task(self.serve())

    async def send(self, message: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send(json.dumps(message))

    async def serve(self) -> None:
        assert self.ws is not None
        with contextlib.suppress(ConnectionClosed):
            async for frame in self.ws:
                message = json.loads(frame)
                if message["type"] == "job.dispatch":
                    task = asyncio.create_task(self.play(message["run_id"], message["job_id"]))
                    self.playing.add(task)
                    task.add_done_callback(self.playing.discard)

    async def play(self, run_id: str, job_id: str) -> None:
        ids = {"run_id": run_id, "job_id": job_id}
        await self.send({"type": "job.ack", **ids})
        await self.send({"type": "job.status", **ids, "state": "running", "timestamp": time.time()})
        await self.jobs.put((run_id, job_id))
        script = dict(self.script)
        if script["kind"] == "big":
            n = 0
            for seq in range(0, script["lines"] // 50):
                lines = [f"line {n + i + 1} \x1b[32mok\x1b[0m" for i in range(50)]
                n += 50
                await self.send({"type": "log.chunk", **ids, "step_index": 0, "lines": lines,
                                 "timestamp": time.time(), "seq": seq})
        else:
            await asyncio.wait_for(self.follow.wait(), 60)
            for seq in range(script["count"]):
                await self.send({"type": "log.chunk", **ids, "step_index": 0, "lines": [f"sent {time.time():.6f}"],
                                 "timestamp": time.time(), "seq": seq})
                await asyncio.sleep(script["interval"])
        await self.send({"type": "job.status", **ids, "state": "success", "timestamp": time.time()})
        self.done.set()

    async def stop(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, 5)


async def seed_runs(database_url: str, count: int) -> None:
    """`count` finished runs of a few workflows and branches, a minute apart (history, not work)."""
    from kici.orchestrator.db import schema
    from kici.orchestrator.db.database import Database

    database = Database.connect(database_url)
    try:
        start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=count + 10)
        rows = []
        for i in range(count):
            created = start + dt.timedelta(minutes=i)
            rows.append({
                "id": str(uuid.uuid4()), "org_id": "default", "workflow": f"wf{i % 7}",
                "status": "success" if i % 5 else "failed", "repo": f"acme/app{i % 3}", "ref": f"refs/heads/b{i % 11}",
                "branch": f"b{i % 11}", "trigger": "push", "sha": f"{i:040x}",
                "event": {"type": "push", "branch": f"b{i % 11}",
                          "payload": {"head_commit": {"message": f"commit number {i}"}}},
                "created_at": created, "started_at": created, "finished_at": created + dt.timedelta(seconds=42),
            })
        for offset in range(0, count, 1000):
            async with database.transaction() as conn:
                await conn.execute(schema.runs.insert(), rows[offset:offset + 1000])
    finally:
        await database.close()


async def sign_in(client: httpx.AsyncClient, base: str) -> None:
    page = await client.get(f"{base}/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert csrf, "no CSRF field on the sign-in page"
    response = await client.post(f"{base}/login", data={"token": ADMIN_TOKEN, "csrf_token": csrf.group(1)})
    if response.status_code != 303:
        raise RuntimeError(f"sign-in answered {response.status_code}")


async def ttfb(client: httpx.AsyncClient, url: str, samples: int) -> dict[str, Any]:
    """Time to first byte: request sent → status line and headers in (the page is rendered before them)."""
    times = []
    size = 0
    for i in range(samples + 2):  # two warm-ups: templates compiled, connection open
        start = time.perf_counter()
        async with client.stream("GET", url) as response:
            first = time.perf_counter() - start
            if response.status_code != 200:
                raise RuntimeError(f"{url} answered {response.status_code}")
            size = len(await response.aread())
        if i >= 2:
            times.append(first * 1000)
    return {"median_ms": round(statistics.median(times), 1), "p95_ms": round(percentile(times, 95), 1),
            "samples": len(times), "bytes": size}


async def wait_run(client: httpx.AsyncClient, base: str, delivery: str, source_id: str) -> str:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        response = await client.get(f"{base}/api/v1/admin/events/git:{source_id}:{delivery}", headers=admin)
        if response.status_code == 200 and response.json().get("run_ids"):
            return str(response.json()["run_ids"][0])
        await asyncio.sleep(0.05)
    raise RuntimeError(f"no run for delivery {delivery}")


def _summary(delays: list[float]) -> dict[str, Any]:
    return {"lines": len(delays), "median_ms": round(statistics.median(delays), 1),
            "p95_ms": round(percentile(delays, 95), 1), "max_ms": round(max(delays), 1)}


OBSERVE_LOG = """() => {
  window.__delays = [];
  new MutationObserver(records => {
    const now = Date.now() / 1000;
    for (const r of records) for (const node of r.addedNodes) {
      const m = /sent (\\d+\\.\\d+)/.exec(node.textContent || "");
      if (m) window.__delays.push((now - parseFloat(m[1])) * 1000);
    }
  }).observe(document.getElementById("log"), { childList: true });
}"""


async def browser_delays(client: httpx.AsyncClient, base: str, run_id: str, agent: LogAgent) -> dict[str, Any]:
    """The run page in headless Chromium (the distribution's), signed in with the client's session: the
    delay from the agent sending each line to the page's DOM showing it (a MutationObserver's clock)."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"],
        )
        try:
            context = await browser.new_context()
            host = base.split("//", 1)[1].split(":")[0]
            await context.add_cookies([{"name": c.name, "value": c.value or "", "domain": host, "path": "/"}
                                       for c in client.cookies.jar])
            page = await context.new_page()
            opened = asyncio.get_running_loop().create_future()
            page.on("request", lambda r: "/live" in r.url and not opened.done() and opened.set_result(True))
            await page.goto(f"{base}/runs/{run_id}")
            await page.evaluate(OBSERVE_LOG)
            await asyncio.wait_for(opened, 10)  # the page's EventSource asked for the stream
            await asyncio.sleep(0.5)  # and the server has had time to answer its first poll
            agent.follow.set()
            await asyncio.wait_for(agent.done.wait(), 120)
            await asyncio.sleep(0.5)  # the last line's way to the page
            delays = [float(x) for x in await page.evaluate("window.__delays")]
        finally:
            await browser.close()
    return _summary(delays)


async def bench_one(database_url: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    repo = work / "repo"
    sha = make_repo(repo, 1)
    orch = Orchestrator(database_url, work / "data")
    agent: LogAgent | None = None
    result: dict[str, Any] = {}
    try:
        async with httpx.AsyncClient(timeout=120) as client:
            await orch.wait_ready(client)
            admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            api = f"{orch.url}/api/v1/admin"
            token = (await client.post(f"{api}/agent-tokens", json={"name": "sim", "labels": []},
                                       headers=admin)).json()["token"]
            source = (await client.post(f"{api}/sources", headers=admin, json={
                "name": "bench", "kind": "git", "config": {"url": str(repo)},
                "secrets": {"webhook_secret": WEBHOOK_SECRET}})).json()
            hook = f"{orch.url}/webhook/default/git/bench"
            agent = LogAgent(orch.url.replace("http", "ws") + "/ws", token)
            await agent.start()

            started = time.perf_counter()
            await seed_runs(database_url, args.runs)
            result["seed_runs_s"] = round(time.perf_counter() - started, 2)
            await sign_in(client, orch.url)

            # the big log: dispatched to the simulated agent, which sends every line
            agent.script = {"kind": "big", "lines": args.lines}
            delivery = f"big-{uuid.uuid4().hex[:8]}"
            started = time.perf_counter()
            await post_push(client, hook, "main", sha, delivery)
            big_run = await wait_run(client, orch.url, delivery, source["id"])
            await asyncio.wait_for(agent.done.wait(), 600)
            agent.done.clear()
            big_job = (await agent.jobs.get())[1]
            # measured once the orchestrator has stored every line (it records the job's end after them)
            deadline = time.monotonic() + 600
            while (await client.get(f"{api}/runs/{big_run}", headers=admin)).json()["finished_at"] is None:
                if time.monotonic() > deadline:
                    raise RuntimeError("the big-log run did not finish")
                await asyncio.sleep(0.05)
            result["big_log_stored_s"] = round(time.perf_counter() - started, 2)

            result["runs_page"] = {
                "runs_in_database": args.runs,
                "newest": await ttfb(client, f"{orch.url}/", args.samples),
                "filtered": await ttfb(client, f"{orch.url}/?workflow=wf3&branch=b5", args.samples),
            }
            page = await client.get(f"{orch.url}/")
            cursor = None
            for _ in range(min(100, args.runs // 50 - 1)):  # follow "Older runs" deep into history
                match = re.search(r'href="\?before=([^"&]+)" rel="next"', page.text)
                if not match:
                    break
                cursor = match.group(1)
                page = await client.get(f"{orch.url}/?before={cursor}")
            if cursor:
                result["runs_page"]["deep_page"] = await ttfb(client, f"{orch.url}/?before={cursor}", args.samples)

            run_url = f"{orch.url}/runs/{big_run}"
            result["run_page"] = {
                "log_lines": args.lines,
                "last_page": await ttfb(client, run_url, args.samples),
                "first_page": await ttfb(client, f"{run_url}?job={big_job}&page=1", args.samples),
                "middle_line": await ttfb(client, f"{run_url}?job={big_job}&line={args.lines // 2}", args.samples),
            }

            # live log: agent → stream delay per line
            agent.script = {"kind": "live", "count": args.live_lines, "interval": 0.1}
            delivery = f"live-{uuid.uuid4().hex[:8]}"
            await post_push(client, hook, "main", sha, delivery)
            await wait_run(client, orch.url, delivery, source["id"])
            live_run, live_job = await asyncio.wait_for(agent.jobs.get(), 60)
            delays: list[float] = []
            async with client.stream("GET", f"{orch.url}/runs/{live_run}/jobs/{live_job}/live",
                                     headers={"Accept": "text/event-stream"}) as stream:
                agent.follow.set()
                async for line in stream.aiter_lines():
                    now = time.time()
                    for sent in re.findall(r"sent (\d+\.\d+)", line):
                        delays.append((now - float(sent)) * 1000)
                    if line.startswith("event: end"):
                        break
            result["live_log"] = _summary(delays)
            if args.browser:
                agent.follow.clear()
                agent.done.clear()
                delivery = f"live-browser-{uuid.uuid4().hex[:8]}"
                await post_push(client, hook, "main", sha, delivery)
                await wait_run(client, orch.url, delivery, source["id"])
                live_run, _ = await asyncio.wait_for(agent.jobs.get(), 60)
                result["live_log_chromium"] = await browser_delays(client, orch.url, live_run, agent)
    finally:
        if agent is not None:
            await agent.stop()
        orch.stop()
    return result


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count(), "host_cpu_reference_s": cpu_reference()},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    result.update(await on_each_database(args, "kici-bench-dashboard", bench_one))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--runs", type=int, default=10_000, help="runs in the database for the runs page")
    parser.add_argument("--lines", type=int, default=200_000, help="lines of the big log")
    parser.add_argument("--samples", type=int, default=30, help="requests per TTFB measurement")
    parser.add_argument("--live-lines", type=int, default=100, help="lines of the live-log phase")
    parser.add_argument("--postgres-url", default=os.environ.get(
        "KICI_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script works")
    parser.add_argument("--no-browser", dest="browser", action="store_false",
                        help="skip the live-log measurement in Chromium (/usr/bin/chromium, playwright)")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.lines, args.samples, args.live_lines = 300, 5_000, 3, 10
    print(json.dumps(asyncio.run(main_async(args)), indent=1))


if __name__ == "__main__":
    main()
