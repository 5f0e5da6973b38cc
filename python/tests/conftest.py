"""Shared fixtures: a real file set, the patchgd binary, a real S3 server (moto) on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import s3server
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SLIDE = ROOT / "tests" / "data" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def patchgd_bin() -> Path:
    """The command line, as `cargo test` built it (scripts/test runs cargo first)."""
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    exe = target / "debug" / "patchgd"
    if not exe.exists():
        pytest.fail(f"{exe} not found: build it first (cargo build), as scripts/test does")
    return exe


def write_images(folder: Path, n: int = 5, seed: int = 7) -> list[Path]:
    """PNG and JPEG images of different sizes and contents (deterministic)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = 96 + 32 * i, 160 - 16 * i
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * 3 + i * 40) % 256, (yy * 5) % 256,
                        rng.integers(0, 256, (h, w))], axis=-1).astype(np.uint8)
        ext = "png" if i % 2 == 0 else "jpg"
        path = folder / f"img{i}.{ext}"
        Image.fromarray(img).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    write_images(folder)
    shutil.copy(SLIDE, folder / "slide.svs")
    return folder


def run_cli(exe: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server, as the Rust tests start it; yields (boto3 client, storage options).

    Create buckets with ``ACL="public-read-write"``: patchgd reads them unsigned."""
    try:
        proc, endpoint, client = s3server.start()
    except RuntimeError as e:
        pytest.fail(str(e))
    options = s3server.patchgd_options(endpoint)
    try:
        yield client, options
    finally:
        proc.terminate()
        proc.wait(timeout=10)
