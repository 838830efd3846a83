"""HTTP routes, one module per area; `kici.orchestrator.app.create_app` mounts them under the base path."""
