"""moto's S3 server on 127.0.0.1, as the tests and the slide bench (python/bench/slides.py)
start it. Buckets are read unsigned: create them with ``ACL="public-read-write"`` (patchgd takes
credentials from the environment only, never from settings)."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

def patchgd_options(endpoint: str) -> dict[str, str]:
    """patchgd's storage options for a public bucket on the server at `endpoint`."""
    return {"endpoint": endpoint, "allow_http": "true", "region": "us-east-1",
            "skip_signature": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start() -> tuple[subprocess.Popen, str, object]:
    """Start .venv's moto_server on a free port; returns (process, endpoint, boto3 client).
    Raises RuntimeError if it is missing or does not answer within 30 s."""
    server = ROOT / ".venv" / "bin" / "moto_server"
    if not server.exists():
        raise RuntimeError(f"{server} not found: run scripts/setup moto")
    import boto3

    port = free_port()
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
    return proc, endpoint, client
