"""Domain metrics of the dispatcher and sweeps, registered on the app's registry (`Metrics.registry`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class DispatchMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.runs_created = Counter(
            "kici_runs_created", "Runs created from webhooks, reruns, schedules or manual starts.", registry=registry
        )
        self.runs_finished = Counter(
            "kici_runs_finished", "Runs that reached a final status, by status.", ["status"], registry=registry
        )
        self.jobs_dispatched = Counter("kici_jobs_dispatched", "`job.dispatch` messages sent.", registry=registry)
        self.jobs_finished = Counter(
            "kici_jobs_finished", "Jobs that agents reported finished, by status.", ["status"], registry=registry
        )
        self.jobs_swept = Counter(
            "kici_jobs_swept",
            "Jobs ended or requeued by a sweep, by reason (stale, ack_timeout, ack_failed, queue_timeout, "
            "recovery_timeout).",
            ["reason"],
            registry=registry,
        )
        self.dispatch_latency = Histogram(
            "kici_dispatch_latency_seconds",
            "Time from a job entering the queue to its `job.dispatch` being sent.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "kici_queue_depth", "Jobs waiting for an agent (pending queue rows), as of the last sweep.",
            registry=registry,
        )
        self.log_lines = Counter("kici_log_lines_stored", "Job log lines stored.", registry=registry)
