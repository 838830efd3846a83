"""`proctree` reading a process tree by following children, against a scan of every process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from kici.runner import proctree

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc"),
]

TREE = "sleep 30 & sh -c 'sleep 30; true' & echo ready; wait"
"""A child with children and a grandchild."""


def start_tree() -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["sh", "-c", TREE], stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    return proc


def test_following_children_finds_what_a_full_scan_finds_including_children_of_other_threads() -> None:
    procs: list[subprocess.Popen[bytes]] = [start_tree()]
    thread = threading.Thread(target=lambda: procs.append(start_tree()))  # the child of another thread
    thread.start()
    thread.join()
    try:
        me = os.getpid()
        deadline = time.monotonic() + 10
        while True:  # the two reads agree once the shells have forked everything (a busy host is slow)
            followed = set(proctree.descendants(me))
            scanned = set(proctree.descendants(me, proctree.snapshot()))
            children = {c.pid for c in proctree.children(me)}
            if (followed == scanned and len(followed) >= 2 * 4
                    and children == {c.pid for c in proctree.children(me, proctree.snapshot())}):
                break
            assert time.monotonic() < deadline, (followed, scanned)
            time.sleep(0.02)
        assert {p.pid for p in procs} <= followed and {p.pid for p in procs} <= children
    finally:
        for proc in procs:
            proctree.kill_tree(proc.pid, grace=0)
            proc.wait()
    assert not {p.pid for p in procs} & set(proctree.descendants(os.getpid()))


def test_without_children_files_the_whole_machine_is_scanned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proctree, "_CHILDREN_FILES", False)
    proc = start_tree()
    try:
        deadline = time.monotonic() + 10
        # `ready` is printed before the inner shell has forked its sleep: wait for the whole tree
        while len(proctree.descendants(proc.pid, proctree.snapshot())) < 3:
            assert time.monotonic() < deadline, "the tree did not grow to three processes"
            time.sleep(0.02)
        below = proctree.subtree([proc.pid])
        assert os.getppid() in below  # a scan of everything, not only the tree
        assert set(proctree.descendants(proc.pid)) == set(proctree.descendants(proc.pid, proctree.snapshot()))
    finally:
        proctree.kill_tree(proc.pid, grace=0)
        proc.wait()
