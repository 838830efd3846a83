"""Key rotation benchmark: how long `rotate_key` takes to re-encrypt N scoped secrets and M sources' secrets,
and how long a concurrent `secret set` waits meanwhile (rotation runs in batches of 100 rows, one
transaction each, so writers — and SQLite's single write lock — keep moving).

Per database (SQLite file, and a fresh PostgreSQL database): N secrets (64-byte values) and M generic sources
(two secret fields each) are written under key K1; then, with K2 current and K1 old, one full rotation runs
while a writer task sets a secret in a loop; reported: the rotation's wall time and rows per second, and
the writer's median and worst latency during the rotation (and before it, as the baseline).

    .venv/bin/python bench/rotate_key.py                  # both databases, 5,000 secrets, 200 sources
    .venv/bin/python bench/rotate_key.py --quick          # a short pass (the test suite runs this)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dispatch import cpu_reference, on_each_database  # the sibling benchmark's helpers

from kici.orchestrator.crypto import Keyring
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.migrate import migrate
from kici.orchestrator.key_rotation import rotate_key
from kici.orchestrator.store import secrets as secret_store
from kici.orchestrator.store.sources import create_source

K1, K2 = os.urandom(32), os.urandom(32)


async def _writer(database: Database, keys: Keyring, stop: asyncio.Event, latencies: list[float]) -> None:
    n = 0
    while not stop.is_set():
        start = time.perf_counter()
        async with database.transaction() as conn:
            await secret_store.set_secret(conn, keys, name=f"W{n % 10}", scope="org", value=f"w-{n}")
        latencies.append((time.perf_counter() - start) * 1000)
        n += 1
        await asyncio.sleep(0.005)


def _ms(values: list[float]) -> dict[str, float]:
    return {"samples": len(values), "median": round(statistics.median(values), 2) if values else 0.0,
            "max": round(max(values), 2) if values else 0.0}


async def bench_one(database_url: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    database = Database.connect(database_url)
    try:
        await migrate(database)
        old = Keyring(K1)
        for start in range(0, args.secrets, 500):
            async with database.transaction() as conn:
                for i in range(start, min(start + 500, args.secrets)):
                    await secret_store.set_secret(conn, old, name=f"S{i}", scope=f"repo:acme/r{i % 50}",
                                                  value=os.urandom(32).hex())
        async with database.transaction() as conn:
            for i in range(args.sources):
                await create_source(conn, key=K1, name=f"src{i}", kind="generic", config={"auth": "hmac_sha256"},
                                    secrets={"hmac_secret": os.urandom(16).hex(), "notify_secret": "n" * 32})
        rotating = Keyring(K2, old=K1)
        stop, baseline = asyncio.Event(), []
        task = asyncio.create_task(_writer(database, rotating, stop, baseline))
        await asyncio.sleep(1.0)  # the writer's latency without a rotation
        stop.set()
        await task
        stop, during = asyncio.Event(), []
        task = asyncio.create_task(_writer(database, rotating, stop, during))
        began = time.perf_counter()
        result = await rotate_key(database, rotating)
        seconds = time.perf_counter() - began
        stop.set()
        await task
        rows = result.secrets_resealed + result.source_secrets_resealed
        assert result.remaining == 0 and not result.failed, result
        return {"secrets": args.secrets, "sources": args.sources, "resealed": rows,
                "rotation_s": round(seconds, 3), "rows_per_s": round(rows / seconds),
                "writer_ms_before": _ms(baseline), "writer_ms_during": _ms(during)}
    finally:
        await database.close()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count(), "host_cpu_reference_s": cpu_reference()},
        "date": time.strftime("%Y-%m-%d"),
    }
    result.update(await on_each_database(args, "kici-bench-rotate", bench_one))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--secrets", type=int, default=5000)
    parser.add_argument("--sources", type=int, default=200)
    parser.add_argument("--postgres-url", default=os.environ.get(
        "KICI_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--quick", action="store_true", help="a short pass: 200 secrets, 10 sources")
    args = parser.parse_args()
    if args.quick:
        args.secrets, args.sources = 200, 10
    print(json.dumps(asyncio.run(main_async(args)), indent=2))


if __name__ == "__main__":
    main()
