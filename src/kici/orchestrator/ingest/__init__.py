"""Webhook ingestion: the HTTP endpoints (`routes`), the event → runs pipeline (`pipeline`) and the
lock-file cache (`lockcache`). See docs/operator/sources-and-webhooks.md."""
