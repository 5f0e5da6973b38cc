"""The PyTorch twin's side of the step bench (benches/patchgd_step.rs).

    .venv/bin/python3 tests/twin/step_server.py '{"backbone": "small_cnn", ...}'

Builds the twin (patchgd_torch.py) at the settings given as JSON, on random input, then reads
lines from stdin: for each line `N` it times N outer steps and prints their seconds on one
line. The bench keeps this process alive and alternates rounds with patchgd's own steps, so
both sides are warm and a noisy moment hits both alike. Settings: backbone, channels,
latent_dim, head_width, classes, images, grid (cells per side), patch, rho, fill_chunk,
threads (torch's intra-op threads, set to patchgd's).
"""

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import patchgd_torch as twin  # noqa: E402


def main():
    s = json.loads(sys.argv[1])
    torch.set_num_threads(s["threads"])
    torch.manual_seed(0)
    model = twin.build(dict(method="patchgd", backbone=s["backbone"], channels=s["channels"],
                            latent_dim=s["latent_dim"], head_width=s["head_width"],
                            classes=s["classes"]))
    optimizer = twin.adam(model, 1e-3)
    grid, cells = s["grid"], s["grid"] * s["grid"]
    x = torch.randn(s["images"], cells, s["channels"], s["patch"], s["patch"])
    y = torch.arange(s["images"]) % s["classes"]
    print(f"ready torch {torch.__version__} threads {torch.get_num_threads()}", flush=True)
    for line in sys.stdin:
        times = []
        for _ in range(int(line)):
            perm = torch.randperm(cells).tolist()
            chunks, step_after, group_size = twin.plan(cells, s["rho"], "zeta", perm)
            start = time.perf_counter()
            twin.patchgd_step(model, optimizer, x, y, grid, grid, chunks, step_after, group_size,
                              s["fill_chunk"])
            times.append(time.perf_counter() - start)
        print(" ".join(f"{t:.6f}" for t in times), flush=True)


if __name__ == "__main__":
    main()
