"""patchgd from Python: patches as Arrow, a PyTorch loop on them, SQL in datafusion-python.

Run from the repository root after `scripts/setup python`:

    .venv/bin/python examples/python_patches.py [IMAGES]

IMAGES defaults to the H&E slide in tests/data (any prefix or object patchgd reads works:
a folder, s3://bucket/prefix/ with credentials in the environment, ...).
"""

import sys
import time

import datafusion
import torch

import patchgd
from patchgd.torch import PatchDataset

images = sys.argv[1] if len(sys.argv) > 1 else "tests/data/CMU-1-Small-Region.svs"

# 1. The patch stream: a pyarrow.RecordBatchReader, pixels included.
failures = []
start = time.perf_counter()
table = patchgd.patches(images, 256, foreground="light:220", min_fraction=0.5,
                        failures=failures).read_all()
background = table["pixels"].null_count  # below min_fraction: the row stays, pixels null
print(f"{table.num_rows} patches of 256 px from {images} in {time.perf_counter() - start:.2f} s; "
      f"{table.num_rows - background} with at least half foreground; "
      f"{len(failures)} images failed")
print(table.drop_columns(["pixels"]).slice(0, 3).to_pylist())

# 2. A plain PyTorch loop on the same stream: learn each patch's mean brightness.
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.ReLU(),
                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                            torch.nn.Linear(8, 1))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for epoch in range(3):
    total, n = 0.0, 0
    for item in torch.utils.data.DataLoader(PatchDataset(images, 128), batch_size=None):
        x = item["pixels"].float() / 255
        loss = torch.nn.functional.mse_loss(model(x), x.mean(dim=(1, 2, 3)).unsqueeze(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        total, n = total + loss.item() * len(x), n + len(x)
    print(f"epoch {epoch + 1}: mean squared error {total / n:.5f} over {n} patches")

# 3. patchgd's tables in datafusion-python.
ctx = datafusion.SessionContext()
patchgd.register(ctx, images=images, patch=256)
print(ctx.sql("SELECT image_id, count(*) AS patches, round(avg(fg_fraction), 3) AS fg "
              "FROM patches GROUP BY image_id ORDER BY image_id").to_arrow_table().to_pylist())
