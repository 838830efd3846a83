"""Alembic migrations of the orchestrator database; run them with `kici.orchestrator.db.migrate`."""
