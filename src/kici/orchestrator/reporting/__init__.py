"""Reporting: the outbox worker and its senders (GitHub check runs, signed notifications).

State changes write outbox rows in their own transaction (`kici.orchestrator.store.outbox`); the worker
(`worker.ReportWorker`) sends them in order per check run / notification URL, with retries, so an outage
of GitHub's API or of a receiver delays reports and loses none, and never slows ingest or dispatch.
"""
