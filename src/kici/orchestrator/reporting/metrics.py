"""Metrics of the reporting worker, registered on the app's registry (`Metrics.registry`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

SEND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ReportMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.sent = Counter(
            "kici_reports_sent", "Reports delivered (check-run calls, notifications), by kind.", ["kind"],
            registry=registry,
        )
        self.retries = Counter(
            "kici_report_retries", "Failed report deliveries that will be retried, by kind.", ["kind"],
            registry=registry,
        )
        self.failed = Counter(
            "kici_reports_failed", "Reports given up on (status `failed`), by kind.", ["kind"], registry=registry
        )
        self.send_seconds = Histogram(
            "kici_report_send_seconds", "Time one delivery attempt took, by kind.", ["kind"], buckets=SEND_BUCKETS,
            registry=registry,
        )
        self.pending = Gauge(
            "kici_reports_pending", "Reports waiting to be sent (all orchestrators), as last counted.",
            registry=registry,
        )
