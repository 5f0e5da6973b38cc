"""Reading slides: patchgd's source stage against OpenSlide, tiffslide and cuCIM, in one run.

Every reader cuts the same objects into the same grid of 256 px tiles at level 0, edge tiles
included, and hands each tile over as an RGB uint8 array with its mean (patchgd's stage computes
its statistics per patch; the others call ``numpy.mean``). Each measurement is a fresh process
pinned to 1 or 2 cores (``sched_setaffinity``), so "1 thread" is one core for every reader,
runtime threads included. Rounds alternate the readers; the table shows medians.

Readers:
- ``patchgd.patches``: the source stage (fetch, decode, cut, statistics, Arrow batches) from
  Python, timed from the stream's start; its workers = the cores (``--patchgd-workers N``
  instead: bands fetched and decoded at once);
- ``patchgd sql``: the command line, ``SELECT count(*), avg(mean) FROM patches``, the whole
  process (start, listing, planning) timed;
- openslide-python (openslide-bin): ``read_region`` -> RGB -> array, a thread pool of N;
- tiffslide (tifffile, imagecodecs; fsspec/s3fs for S3): ``read_region(as_array=True)``;
- cuCIM's CPU reader (cucim-cu12 without its CUDA packages): ``read_region`` per tile in a
  thread pool of N, and its batch API (a list of locations, ``num_workers`` = N).

Objects: 32 copies of ``tests/data/CMU-1-Small-Region.svs`` (H&E, 2220 x 2967, 240 px JPEG tiles),
and a generated 32k px JPEG-tiled pyramidal TIFF (``patchgd synth ultramnist --format tiff``,
grey digits on black). Sources: the local disk, and moto's S3 server on 127.0.0.1 for the
readers that read S3 (patchgd, tiffslide).

Run with ``scripts/bench-slides`` (it makes ``.venv-readers`` with the foreign readers, away
from the demo's ``.venv``). Prints a Markdown table; ``--json FILE`` also writes the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = ROOT / ".venv" / "bin" / "python3"
READERS_PY = ROOT / ".venv-readers" / "bin" / "python3"
TILE = 256
RGB_BYTES = TILE * TILE * 3

# Each child prints: tiles, seconds, sum of the tile means (a check that it read pixels).
FOREIGN = r"""
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
import numpy as np
reader, threads, tile = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
paths, storage = json.loads(sys.argv[4]), json.loads(sys.argv[5])

def grid(w, h):
    return [(x, y) for y in range(0, h, tile) for x in range(0, w, tile)]

def open_slide(path):
    if reader == "openslide":
        import openslide
        s = openslide.OpenSlide(path)
        read = lambda xy: np.asarray(s.read_region(xy, 0, (tile, tile)).convert("RGB"))
        return s.dimensions, read
    if reader == "tiffslide":
        import tiffslide
        s = tiffslide.TiffSlide(path, storage_options=storage or None)
        read = lambda xy: s.read_region(xy, 0, (tile, tile), as_array=True)
        return s.dimensions, read
    from cucim import CuImage
    s = CuImage(path)
    h, w = s.shape[:2]
    if reader == "cucim-batch":
        return (w, h), s
    read = lambda xy: np.asarray(s.read_region(xy, (tile, tile), 0))
    return (w, h), read

n, total = 0, 0.0
start = time.perf_counter()
with ThreadPoolExecutor(threads) as pool:
    for path in paths:
        (w, h), read = open_slide(path)
        cells = grid(w, h)
        if reader == "cucim-batch":
            for batch in read.read_region(cells, (tile, tile), 0, num_workers=threads,
                                          batch_size=32):
                a = np.asarray(batch)
                a = a if a.ndim == 4 else a[None]
                assert a.shape[1:] == (tile, tile, 3), a.shape
                total += float(a.mean(axis=(1, 2, 3)).sum())
                n += len(a)
            continue
        one = lambda xy: read(xy)[..., :3].mean()
        means = list(map(one, cells)) if threads == 1 else list(pool.map(one, cells))
        n += len(means)
        total += float(sum(means))
print(n, time.perf_counter() - start, total)
"""

PATCHGD = r"""
import json, sys, time
import pyarrow.compute as pc
import patchgd
url, threads, tile, storage = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
failures = []
reader = patchgd.patches(url, tile, channels=3, workers=threads, buffer_mib=128,
                         storage=storage or None, failures=failures)
start = time.perf_counter()
n, total = 0, 0.0
for batch in reader:
    n += batch.num_rows
    total += pc.sum(batch.column("mean")).as_py()
secs = time.perf_counter() - start
assert not failures, failures
print(n, secs, total)
"""


def pinned(cores: int):
    """A preexec_fn that keeps the child (and every thread it starts) on `cores` cores."""
    cpus = sorted(os.sched_getaffinity(0))[:cores]
    return lambda: os.sched_setaffinity(0, cpus)


class ReaderFailed(Exception):
    """A foreign reader that cannot read an object: the table says so, with its last error."""


def child(cmd: list[str], cores: int) -> tuple[int, float, float]:
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, preexec_fn=pinned(cores))
    if out.returncode != 0:
        status = f"signal {-out.returncode}" if out.returncode < 0 else f"exit {out.returncode}"
        lines = out.stderr.strip().splitlines()
        raise ReaderFailed(f"{status}: {lines[-1] if lines else 'no message'}")
    n, secs, total = out.stdout.split()[-3:]
    return int(n), float(secs), float(total)


def cli(exe: Path, url: str, cores: int, storage: dict) -> tuple[int, float, float]:
    cmd = [str(exe), "sql", "--images", url, "--patch", str(TILE), "--channels", "3",
           "--format", "csv"]
    for k, v in storage.items():
        cmd += ["--storage", f"{k}={v}"]
    cmd.append("SELECT count(*) AS n, sum(mean) AS total FROM patches")
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, preexec_fn=pinned(cores))
    secs = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"patchgd sql: exit {out.returncode}\n{out.stderr}")
    n, total = out.stdout.strip().splitlines()[-1].split(",")
    return int(n), secs, float(total)


class S3:
    """moto's S3 server on 127.0.0.1, as the tests start it (python/tests/s3server.py), with a
    public bucket for the objects."""

    def __init__(self):
        sys.path.insert(0, str(ROOT / "python" / "tests"))
        import s3server

        try:
            self.proc, self.endpoint, self.client = s3server.start()
        except RuntimeError as e:
            raise SystemExit(str(e)) from None
        self.client.create_bucket(Bucket="slides", ACL="public-read-write")
        self.patchgd = s3server.patchgd_options(self.endpoint)
        self.fsspec = {"anon": True, "client_kwargs": {"endpoint_url": self.endpoint,
                                                       "region_name": "us-east-1"}}

    def upload(self, files: list[Path], prefix: str) -> list[str]:
        keys = []
        for f in files:
            key = f"{prefix}/{f.name}"
            self.client.upload_file(str(f), "slides", key, ExtraArgs={"ACL": "public-read"})
            keys.append(f"s3://slides/{key}")
        return keys

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def objects(exe: Path, work: Path, size: int, copies: int) -> list[tuple[str, Path, list[Path]]]:
    """(name, folder, files): the SVS copies, and the generated TIFF."""
    svs = work / "svs"
    if len(list(svs.glob("*.svs"))) != copies:
        shutil.rmtree(svs, ignore_errors=True)
        svs.mkdir(parents=True)
        for i in range(copies):
            shutil.copy(ROOT / "tests" / "data" / "CMU-1-Small-Region.svs", svs / f"{i:03}.svs")
    tiff = work / f"tiff{size}"
    path = tiff / "images" / "train" / "000000.tif"
    if not path.exists():
        subprocess.run([str(exe), "synth", "ultramnist", "--format", "tiff", "--tile", str(TILE),
                        "--classes", "10", "--train", "1", "--val", "0", "--size", str(size),
                        "--bigtiff", "--out", str(tiff)], check=True, capture_output=True)
    return [
        (f"{copies} x CMU-1-Small-Region.svs (H&E)", svs, sorted(svs.glob("*.svs"))),
        (f"UltraMNIST {size} px tiled TIFF (grey, JPEG)", path.parent, [path]),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--patchgd", default=str(ROOT / "target" / "debug" / "patchgd"))
    p.add_argument("--size", type=int, default=32768)
    p.add_argument("--copies", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--patchgd-workers", type=int,
                   help="patchgd's decode workers (bands in flight); default: the cores")
    p.add_argument("--no-s3", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    exe = Path(args.patchgd)
    work = ROOT / "out" / "bench-slides"
    s3 = None if args.no_s3 else S3()
    rows = []
    try:
        for name, folder, files in objects(exe, work, args.size, args.copies):
            local = [str(f) for f in files]
            sources = [("file", str(folder), local, {}, {})]
            if s3:
                keys = s3.upload(files, folder.name)
                prefix = keys[0].rsplit("/", 1)[0]
                sources.append(("S3", prefix, keys, s3.patchgd, s3.fsspec))
            for source, url, paths, storage, fsspec in sources:
                for threads in args.threads:
                    workers = args.patchgd_workers or threads
                    runs = {
                        "patchgd.patches": lambda: child(
                            [str(PY), "-c", PATCHGD, url, str(workers), str(TILE),
                             json.dumps(storage)], threads),
                        "patchgd sql (whole command)": lambda: cli(exe, url, threads, storage),
                    }
                    foreign = ["tiffslide"] if source == "S3" else [
                        "openslide", "tiffslide", "cucim", "cucim-batch"]
                    for reader in foreign:
                        runs[reader] = (lambda r=reader: child(
                            [str(READERS_PY), "-c", FOREIGN, r, str(threads), str(TILE),
                             json.dumps(paths), json.dumps(fsspec)], threads))
                    measured = {r: [] for r in runs}
                    failed = {}
                    for _ in range(args.repeat):  # interleaved rounds
                        for reader, run in runs.items():
                            if reader in failed:
                                continue
                            try:
                                measured[reader].append(run())
                            except ReaderFailed as e:
                                if reader.startswith("patchgd"):
                                    raise SystemExit(f"{reader} failed on {url}: {e}")
                                failed[reader] = str(e)
                    for reader, error in failed.items():
                        rows.append({"object": name, "source": source, "threads": threads,
                                     "reader": reader, "error": error})
                        print(f"{name} | {source} | {threads} | {reader}: fails: {error}",
                              file=sys.stderr, flush=True)
                    for reader, m in measured.items():
                        if reader in failed:
                            continue
                        n = m[0][0]
                        if any(x[0] != n for x in m):
                            raise SystemExit(f"{reader}: tile counts differ between runs {m}")
                        secs = statistics.median(x[1] for x in m)
                        row = {"object": name, "source": source, "threads": threads,
                               "reader": reader, "tiles": n, "seconds": secs,
                               "tiles_per_s": n / secs, "mb_per_s": n * RGB_BYTES / secs / 1e6,
                               "mean": m[0][2] / n, "runs": m}
                        rows.append(row)
                        print(f"{name} | {source} | {threads} | {reader}: {n} tiles in "
                              f"{secs:.2f} s, {n / secs:.0f} tiles/s", file=sys.stderr,
                              flush=True)
    finally:
        if s3:
            s3.close()
    ref = {(r["object"], r["threads"]): r["tiles_per_s"] for r in rows
           if r["reader"] == "patchgd.patches" and r["source"] == "file"}
    print("| object | source | cores | reader | tiles | median s | tiles/s | tiles/s per core "
          "| MB/s (RGB) | patchgd.patches from file / reader |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['object']} | {r['source']} | {r['threads']} | {r['reader']} | "
                  f"fails ({r['error'][:100]}) | | | | | |")
            continue
        print(f"| {r['object']} | {r['source']} | {r['threads']} | {r['reader']} | {r['tiles']} "
              f"| {r['seconds']:.2f} | {r['tiles_per_s']:.0f} | "
              f"{r['tiles_per_s'] / r['threads']:.0f} | {r['mb_per_s']:.0f} | "
              f"{ref[(r['object'], r['threads'])] / r['tiles_per_s']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
