"""The KiCI orchestrator (Tier 2): an HTTP + WebSocket service that turns webhooks into runs and jobs and
dispatches them to agents. It never imports or runs workflow code; its only view of a repository's
workflows is the lock file, read through `kici.engine`.

Entry point: `kici-orchestrator` (`kici.orchestrator.main:main`).
"""
