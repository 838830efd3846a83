"""Where a run is reported, decided once when it is created and stored on the run (`runs.reporting`).

Shape (JSON): `{"github": {"installation_id": 42}, "notify": [{"url": …, "scope": "global" | "source",
"job_events": bool}]}`; None when there is nothing to report, which keeps such runs off the outbox.

- `github`: the run comes from a GitHub App source and its installation is known (the source's
  `installation_id`, else the delivery's `installation.id`) → one check run per job.
- `notify`: `KICI_NOTIFY_URLS` (scope `global`, job events per `KICI_NOTIFY_JOB_EVENTS`) plus the
  source's `notify_urls` (scope `source`, job events per its `notify_job_events`); a URL listed twice is
  notified once (the source's entry wins).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kici.engine.events import Event
from kici.orchestrator.config import Settings
from kici.orchestrator.db.schema import SourceKind
from kici.orchestrator.store.sources import Source


def _installation_id(source: Source, event: Event | Mapping[str, Any] | None) -> int | None:
    configured = source.config.get("installation_id")
    if isinstance(configured, int) and not isinstance(configured, bool):
        return configured
    payload = event.payload if isinstance(event, Event) else (event or {}).get("payload")
    installation = payload.get("installation") if isinstance(payload, Mapping) else None
    found = installation.get("id") if isinstance(installation, Mapping) else None
    return found if isinstance(found, int) and not isinstance(found, bool) else None


def reporting_targets(
    settings: Settings, source: Source | None, event: Event | Mapping[str, Any] | None
) -> dict[str, Any] | None:
    targets: dict[str, Any] = {}
    if source is not None and source.kind is SourceKind.GITHUB:
        installation = _installation_id(source, event)
        if installation is not None:
            targets["github"] = {"installation_id": installation}
    notify: dict[str, dict[str, Any]] = {}
    for url in settings.notify_urls:
        notify[url] = {"url": url, "scope": "global", "job_events": settings.notify_job_events}
    if source is not None:
        job_events = source.config.get("notify_job_events") is True
        for url in source.config.get("notify_urls") or ():
            notify[str(url)] = {"url": str(url), "scope": "source", "job_events": job_events}
    if notify:
        targets["notify"] = list(notify.values())
    return targets or None
