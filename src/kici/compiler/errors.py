"""Compile errors: each names the file, workflow, job and step it concerns."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CompileError:
    file: str
    message: str
    workflow: str | None = None
    job: str | None = None
    step: str | None = None

    def __str__(self) -> str:
        where = [self.file]
        if self.workflow is not None:
            where.append(f"workflow {self.workflow!r}")
        if self.job is not None:
            where.append(f"job {self.job!r}")
        if self.step is not None:
            where.append(f"step {self.step!r}")
        return f"{' › '.join(where)}: {self.message}"


class CompileFailed(Exception):
    def __init__(self, errors: list[CompileError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


class Collector:
    """Collects errors at one location so conversion code can report many problems in one pass."""

    def __init__(self, errors: list[CompileError], file: str, workflow: str | None = None,
                 job: str | None = None, step: str | None = None) -> None:
        self.errors = errors
        self.file = file
        self.workflow = workflow
        self.job = job
        self.step = step

    def error(self, message: str) -> None:
        self.errors.append(CompileError(self.file, message, self.workflow, self.job, self.step))

    def at(self, *, job: str | None = None, step: str | None = None) -> Collector:
        return Collector(self.errors, self.file, self.workflow, job if job is not None else self.job, step)
