"""Export seeded torchvision models as a user would save them, for tests/it/pretrained.rs.

    export_pretrained.py OUT_DIR

For resnet18 and mobilenet_v2: OUT_DIR/ARCH.pt (torch.save(model.state_dict())) and
OUT_DIR/ARCH.safetensors (the same state dict), and OUT_DIR/ARCH-io.safetensors with an input
batch `x` and torchvision's eval-mode features for it (the trunk's pooled output, before `fc` or
`classifier`). BatchNorm running statistics are moved off their initial (0, 1) by a few
training-mode passes, so that eval mode really reads them.
"""

import sys
from pathlib import Path

import torch
import torchvision
from safetensors.torch import save_file


def features(model, arch, x):
    if arch == "resnet18":
        return torch.flatten(model.avgpool(model.layer4(model.layer3(model.layer2(model.layer1(
            model.maxpool(model.relu(model.bn1(model.conv1(x))))))))), 1)
    return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(model.features(x), 1), 1)


def main(out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for seed, arch in enumerate(["resnet18", "mobilenet_v2"]):
        torch.manual_seed(100 + seed)
        model = getattr(torchvision.models, arch)(weights=None)
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(4, 3, 64, 64) * 2 + 0.3)
        model.eval()
        state = model.state_dict()
        torch.save(state, out / f"{arch}.pt")
        save_file({k: v.contiguous() for k, v in state.items()}, out / f"{arch}.safetensors")
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            f = features(model, arch, x)
        save_file({"x": x, "features": f.contiguous()}, out / f"{arch}-io.safetensors")


if __name__ == "__main__":
    main(sys.argv[1])
