"""patchgd.torch.PatchDataset in a plain PyTorch loop."""

from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import torch

import patchgd
from patchgd.torch import PatchDataset, batch_tensors


def test_pixels_are_a_view_of_the_arrow_buffer(image_dir):
    batch = next(iter(patchgd.patches(str(image_dir / "img0.png"), 32)))
    t = batch_tensors(batch)
    pixels = batch.column("pixels")
    offsets = pixels.buffers()[1]
    start = int.from_bytes(offsets.to_pybytes()[pixels.offset * 4: pixels.offset * 4 + 4],
                           "little")
    assert t["pixels"].data_ptr() == pixels.buffers()[2].address + start  # no copy
    assert t["pixels"].shape == (batch.num_rows, 3, 32, 32)
    first = pixels[0].as_py()
    hwc = torch.frombuffer(bytearray(first), dtype=torch.uint8).view(32, 32, 3)
    assert torch.equal(t["pixels"][0], hwc.permute(2, 0, 1))


def test_a_dataloader_trains_a_small_model_on_the_stream(image_dir):
    torch.manual_seed(0)
    ds = PatchDataset(str(image_dir), 32, channels=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=None)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    losses, patches = [], 0
    for step, item in enumerate(loader):
        x = item["pixels"].float() / 255
        target = x.mean(dim=(1, 2, 3)).unsqueeze(1)  # learn each patch's brightness
        loss = torch.nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        patches += x.shape[0]
        if step == 40:
            break
    assert patches > 200 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert sum(losses[-5:]) < sum(losses[:5])


def test_the_dataset_is_reached_from_a_plain_import_patchgd():
    # A fresh interpreter: in this one other tests have imported patchgd.torch already.
    out = subprocess.run([sys.executable, "-c",
                          "import patchgd; print(patchgd.torch.PatchDataset.__name__)"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "PatchDataset", out.stderr
