"""The job graph of a run page: matrix children grouped under their lock-file job, laid out in columns by
needs depth, drawn as an SVG (no script) with one edge per `needs`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from kici.engine.states import is_terminal
from kici.orchestrator.store.runs import JobRecord, RunRecord

NODE_W = 190
NODE_H = 46
COL_GAP = 60
ROW_GAP = 16
PAD = 8

_STATUS_ORDER = ("failed", "timed_out_stale", "cancelled", "cancelling", "running", "recovering", "queued",
                 "pending", "waiting", "held", "skipped", "success")


@dataclass
class GraphNode:
    name: str
    """The lock-file job name."""
    jobs: list[JobRecord]
    needs: list[str] = field(default_factory=list)
    column: int = 0
    row: int = 0

    @property
    def status(self) -> str:
        """The group's status: the most telling of its children's (a failure shows over successes)."""
        present = {j.status for j in self.jobs}
        return next((s for s in _STATUS_ORDER if s in present), self.jobs[0].status if self.jobs else "pending")

    @property
    def summary(self) -> str:
        if len(self.jobs) == 1:
            return status_text(self.jobs[0])
        counts = Counter(j.status for j in self.jobs)
        return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))

    @property
    def x(self) -> int:
        return PAD + self.column * (NODE_W + COL_GAP)

    @property
    def y(self) -> int:
        return PAD + self.row * (NODE_H + ROW_GAP)

    @property
    def finished(self) -> bool:
        return all(is_terminal(j.status) for j in self.jobs)


def status_text(item: RunRecord | JobRecord) -> str:
    """A run's or job's status as people read it, as `kici-admin` prints it: one that waits for its
    concurrency group shows `waiting (concurrency: <group>)` (its own status is `pending` meanwhile)."""
    if item.wait_reason and item.status in ("pending", "waiting"):
        return f"waiting ({item.wait_reason})"
    return item.status


@dataclass
class Graph:
    nodes: list[GraphNode]
    edges: list[tuple[GraphNode, GraphNode]]
    width: int
    height: int


def build_graph(jobs: list[JobRecord], needs: dict[str, list[str]]) -> Graph:
    groups: dict[str, GraphNode] = {}
    for job in jobs:
        groups.setdefault(job.job, GraphNode(job.job, [])).jobs.append(job)
    for job in jobs:
        for upstream in needs.get(job.name, []):
            node = groups[job.job]
            if upstream in groups and upstream not in node.needs:
                node.needs.append(upstream)

    depth: dict[str, int] = {}

    def column_of(name: str, seen: frozenset[str] = frozenset()) -> int:
        if name in depth:
            return depth[name]
        if name in seen:  # a cycle cannot be planned; guard anyway
            return 0
        ups = groups[name].needs
        depth[name] = 0 if not ups else 1 + max(column_of(u, seen | {name}) for u in ups)
        return depth[name]

    rows: Counter[int] = Counter()
    for node in groups.values():
        node.column = column_of(node.name)
        node.row = rows[node.column]
        rows[node.column] += 1
    edges = [(groups[u], node) for node in groups.values() for u in node.needs]
    columns = max((n.column for n in groups.values()), default=0) + 1
    height_rows = max(rows.values(), default=1)
    return Graph(
        nodes=list(groups.values()),
        edges=edges,
        width=2 * PAD + columns * NODE_W + (columns - 1) * COL_GAP,
        height=2 * PAD + height_rows * NODE_H + (height_rows - 1) * ROW_GAP,
    )


def edge_path(start: GraphNode, end: GraphNode) -> str:
    x1, y1 = start.x + NODE_W, start.y + NODE_H // 2
    x2, y2 = end.x, end.y + NODE_H // 2
    mid = (x1 + x2) // 2
    return f"M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}"
