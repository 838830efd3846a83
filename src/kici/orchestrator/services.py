"""The orchestrator's background services, assembled per app and run by its lifespan: log storage, the
dispatcher (which listens to agent sessions and to new runs), the sweeps and the git poller."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kici.orchestrator.agents.registry import AgentRegistry
from kici.orchestrator.storage.logs import FilesystemLogStorage, default_log_root

if TYPE_CHECKING:
    from fastapi import FastAPI

    from kici.orchestrator.app import Readiness
    from kici.orchestrator.dispatch.dispatcher import Dispatcher
    from kici.orchestrator.dispatch.sweeps import Sweeper
    from kici.orchestrator.ingest.poller import GitPoller


@dataclass
class Services:
    logs: FilesystemLogStorage
    dispatcher: Dispatcher
    sweeper: Sweeper
    poller: GitPoller

    @classmethod
    def assemble(cls, app: FastAPI, registry: AgentRegistry) -> Services:
        from kici.orchestrator.dispatch.dispatcher import Dispatcher
        from kici.orchestrator.dispatch.metrics import DispatchMetrics
        from kici.orchestrator.dispatch.sweeps import Sweeper
        from kici.orchestrator.ingest.poller import GitPoller
        from kici.orchestrator.ingest.service import ingest_for

        state = app.state.kici
        logs = FilesystemLogStorage(default_log_root(state.settings.data_dir))
        ingest = ingest_for(app)
        dispatcher = Dispatcher(state, registry, ingest, logs, DispatchMetrics(state.metrics.registry))
        return cls(logs=logs, dispatcher=dispatcher, sweeper=Sweeper(dispatcher), poller=GitPoller(state, ingest))

    async def start(self, readiness: Readiness) -> None:
        await self.dispatcher.start(readiness)
        await self.sweeper.start(readiness)
        await self.poller.start(readiness)

    async def stop(self) -> None:
        await self.poller.stop()
        await self.sweeper.stop()
        await self.dispatcher.stop()
        self.logs.close()


def services_of(app: FastAPI) -> Services:
    services: Services = app.state.services
    return services
