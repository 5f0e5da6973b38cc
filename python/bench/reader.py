"""Patches/s and peak RSS of three readers over the same objects, each in its own process.

- ``patchgd inspect FILE --scan``: the command line's source stage (fetch, decode, cut,
  statistics, Arrow batches), the reference;
- ``patchgd.patches`` from Python: the same stage, the batches handed to pyarrow and iterated;
- openslide-python: ``read_region`` over the same 256 px grid, in a plain Python loop, each
  region turned into a numpy array (what a PyTorch Dataset over OpenSlide does per patch).

Run with ``scripts/bench-python`` (it installs openslide-python and its library into
.venv-readers, ``scripts/setup readers``).
Prints a Markdown table; ``--json FILE`` also writes the measurements. ``peak RSS`` is the
process's during the scan; ``growth`` that minus the RSS before the scan: the reader's own
memory, without the interpreter, torch and libtorch that the process had loaded before, and
(as the command line, which inspects the object first) after its runtime has started and the
object's header has been read.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
READERS_PY = ROOT / ".venv-readers" / "bin" / "python3"

# Each child reports: patches, seconds, peak RSS of the scan (VmHWM, reset just before it:
# the imports' own peak is not the reader's), RSS before the scan.
MEMORY = r"""
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
"""

PATCHGD_READ = MEMORY + r"""
import sys, time
import patchgd
path, patch, fg, workers, buffer = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
failures = []
# As `patchgd inspect FILE --scan` measures: after the runtime has started and the object's
# header has been read (the command line inspects the object before its scan).
patchgd.patches(path, patch, foreground=fg, workers=workers, buffer_mib=buffer,
                read="geometry").read_all()
before = status("VmRSS:")
reset_peak()
reader = patchgd.patches(path, patch, foreground=fg, workers=workers, buffer_mib=buffer,
                         failures=failures)
# Timed from here, as the command line times its scan: the listing is done, the stream starts.
start = time.perf_counter()
n = 0
for batch in reader:
    n += batch.num_rows
secs = time.perf_counter() - start
assert not failures, failures
print(n, secs, status("VmHWM:"), before)
"""

OPENSLIDE_READ = MEMORY + r"""
import sys, time
import numpy as np
import openslide
path, patch = sys.argv[1], int(sys.argv[2])
before = status("VmRSS:")
reset_peak()
start = time.perf_counter()
slide = openslide.OpenSlide(path)
w, h = slide.dimensions
n = 0
for y in range(0, h, patch):
    for x in range(0, w, patch):
        region = np.asarray(slide.read_region((x, y), 0, (patch, patch)))
        n += 1
secs = time.perf_counter() - start
print(n, secs, status("VmHWM:"), before)
"""


def cli(exe: Path, path: Path, patch: int, fg: str, workers: int, buffer: int):
    out = subprocess.run(
        [str(exe), "inspect", str(path), "--scan", "--limit", "1", "--patch", str(patch),
         "--channels", "3", "--foreground", fg, "--workers", str(workers),
         "--buffer-mib", str(buffer)],
        capture_output=True, text=True, check=True).stdout
    m = re.search(r"scan: \d+ images \(0 failed\), (\d+) patches.* in ([\d.]+) s .*"
                  r"RSS before scan (\d+) MiB, peak RSS (\d+) MiB", out)
    if not m:
        raise SystemExit(f"unexpected inspect output:\n{out}")
    return int(m.group(1)), float(m.group(2)), int(m.group(4)) << 20, int(m.group(3)) << 20


def child(script: str, *args, python=PY) -> tuple[int, float, int, int]:
    """(patches, seconds, peak RSS of the scan, RSS before it) from a fresh interpreter."""
    out = subprocess.run([str(python), "-c", script, *map(str, args)], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.split()
    return int(out[0]), float(out[1]), int(out[2]), int(out[3])


def synth_tiff(exe: Path, size: int, folder: Path) -> Path:
    out = folder / f"tiff{size}"
    path = out / "images" / "train" / "000000.tif"
    if not path.exists():
        subprocess.run([str(exe), "synth", "ultramnist", "--format", "tiff", "--tile", "256",
                        "--classes", "10", "--train", "1", "--val", "0", "--size", str(size),
                        "--out", str(out)], check=True, capture_output=True)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--patchgd", default=str(ROOT / "target" / "debug" / "patchgd"))
    p.add_argument("--sizes", type=int, nargs="+", default=[16384])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--buffer-mib", type=int, default=128)
    p.add_argument("--no-openslide", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    exe = Path(args.patchgd)
    work = ROOT / "out" / "bench-python"
    work.mkdir(parents=True, exist_ok=True)
    objects = [(f"UltraMNIST {s} px, tiled TIFF (JPEG, 256 px tiles)", synth_tiff(exe, s, work),
                "dark:32") for s in args.sizes]
    objects.append(("CMU-1-Small-Region.svs (2220 x 2967, H&E)",
                    ROOT / "tests" / "data" / "CMU-1-Small-Region.svs", "light:220"))
    rows = []
    for name, path, fg in objects:
        runs = {"patchgd CLI (inspect --scan)": [], "patchgd.patches (Python)": []}
        if not args.no_openslide:
            runs["openslide-python read_region loop"] = []
        # Interleaved, so that a noisy moment hits every reader alike.
        for _ in range(args.repeat):
            runs["patchgd CLI (inspect --scan)"].append(
                cli(exe, path, 256, fg, args.workers, args.buffer_mib))
            runs["patchgd.patches (Python)"].append(
                child(PATCHGD_READ, path, 256, fg, args.workers, args.buffer_mib))
            if not args.no_openslide:
                runs["openslide-python read_region loop"].append(
                    child(OPENSLIDE_READ, path, 256, python=READERS_PY))
        ref = None
        for reader, measured in runs.items():
            n = measured[0][0]
            secs = statistics.median(m[1] for m in measured)
            rss = statistics.median(m[2] for m in measured)
            growth = statistics.median(m[2] - m[3] for m in measured)
            rate = n / secs
            ref = ref or rate
            rows.append({"object": name, "reader": reader, "patches": n, "seconds": secs,
                         "patches_per_s": rate, "ratio": rate / ref, "peak_rss": rss,
                         "growth": growth,
                         "runs": measured})
    print("| object | reader | patches | median s | patches/s | vs CLI | peak RSS MiB | "
          "growth MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['object']} | {r['reader']} | {r['patches']} | {r['seconds']:.2f} | "
              f"{r['patches_per_s']:.0f} | {r['ratio']:.2f} | {r['peak_rss'] / 2**20:.0f} | "
              f"{r['growth'] / 2**20:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
