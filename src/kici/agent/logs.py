"""Job output on its way to the orchestrator: per-step chunks of at most 50 lines (or what arrived within
100 ms), a per-step byte cap with exactly one truncation line, and masking of setup output.

`LogStreamer.add` is synchronous and cheap; the job's flush loop calls `flush()` every 100 ms, and the job
flushes a step's lines before relaying that step's status, so a step's output always precedes its result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

MAX_CHUNK_LINES = 50
FLUSH_INTERVAL_S = 0.1


def truncation_line(max_bytes: int) -> str:
    return f"[TRUNCATED: log output exceeded {max_bytes} bytes]"


@dataclass
class _Step:
    pending: list[str] = field(default_factory=list)
    size: int = 0
    truncated: bool = False


Emit = Callable[[int, list[str]], None]
"""Receives (step_index, lines) for each chunk, in order."""


class LogStreamer:
    """Chunks the lines of one job, step by step. The byte cap counts each line's UTF-8 bytes plus its
    newline; it is checked before a line is added, so the line that would cross it becomes the truncation
    line and nothing of that step is kept after it."""

    def __init__(self, emit: Emit, max_bytes: int, *, max_lines: int = MAX_CHUNK_LINES) -> None:
        self._emit = emit
        self.max_bytes = max_bytes
        self.max_lines = max_lines
        self._steps: dict[int, _Step] = {}
        self.lines_dropped = 0
        self.bytes_streamed = 0

    def add(self, step_index: int, line: str) -> None:
        step = self._steps.setdefault(step_index, _Step())
        if step.truncated:
            self.lines_dropped += 1
            return
        size = len(line.encode("utf-8", "replace")) + 1
        if step.size + size > self.max_bytes:
            step.truncated = True
            self.lines_dropped += 1
            step.pending.append(truncation_line(self.max_bytes))
            self.flush(step_index)
            return
        step.size += size
        self.bytes_streamed += size
        step.pending.append(line)
        if len(step.pending) >= self.max_lines:
            self.flush(step_index)

    def flush(self, step_index: int | None = None) -> None:
        """Emit the pending lines of one step (or of every step, in step order)."""
        indexes = [step_index] if step_index is not None else sorted(self._steps)
        for index in indexes:
            step = self._steps.get(index)
            if step is None or not step.pending:
                continue
            lines, step.pending = step.pending, []
            for start in range(0, len(lines), self.max_lines):
                self._emit(index, lines[start : start + self.max_lines])
