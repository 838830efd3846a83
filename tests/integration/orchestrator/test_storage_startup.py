"""The orchestrator process and its blob storage: it refuses to start on an S3 store it cannot use (a missing
bucket, an endpoint that does not answer, no bucket named), saying why — never a silent fallback to `fs` —
and starts on a real one (SeaweedFS)."""

from __future__ import annotations

import signal

from tests.s3server import S3Server, free_ports

from .conftest import StartOrchestrator


def test_missing_bucket_refuses_to_start(start_orchestrator: StartOrchestrator, s3_server: S3Server) -> None:
    env = {**s3_server.orchestrator_env(), "KICI_STORAGE_BUCKET": "no-such-bucket-kici"}
    orchestrator = start_orchestrator(env)
    assert orchestrator.wait(timeout=60) == 1, orchestrator.stderr
    assert "blob storage (KICI_STORAGE_BACKEND=s3): bucket 'no-such-bucket-kici' does not exist" in orchestrator.stderr


def test_unreachable_endpoint_refuses_to_start(start_orchestrator: StartOrchestrator, s3_server: S3Server) -> None:
    env = {**s3_server.orchestrator_env(), "KICI_STORAGE_ENDPOINT": f"http://127.0.0.1:{free_ports(1)[0]}"}
    orchestrator = start_orchestrator(env)
    assert orchestrator.wait(timeout=90) == 1, orchestrator.stderr
    assert "blob storage (KICI_STORAGE_BACKEND=s3): S3 storage" in orchestrator.stderr
    assert "unreachable" in orchestrator.stderr


def test_s3_without_a_bucket_is_a_settings_error(start_orchestrator: StartOrchestrator) -> None:
    orchestrator = start_orchestrator({"KICI_STORAGE_BACKEND": "s3"})
    assert orchestrator.wait(timeout=30) == 2
    assert "KICI_STORAGE_BACKEND=s3 needs KICI_STORAGE_BUCKET" in orchestrator.stderr


def test_starts_on_a_real_s3_server(start_orchestrator: StartOrchestrator, s3_server: S3Server) -> None:
    orchestrator = start_orchestrator(s3_server.orchestrator_env(prefix="startup"))
    ready = orchestrator.wait_for_event("orchestrator.ready", timeout=60)
    assert ready
    assert any(e.get("event") == "storage.ready" and e.get("backend") == "s3" for e in orchestrator.events())
    assert orchestrator.stop(signal.SIGTERM, timeout=15) == 0, orchestrator.stderr
