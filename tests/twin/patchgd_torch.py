"""PatchGD in plain PyTorch: the oracle patchgd's training step is checked against.

Written the way a PyTorch user would write the method (docs/method.md), independently of the
Rust code: `nn` modules with PyTorch's default initialisation, torchvision's own ResNet-18/50 and
MobileNetV2 trunks, `torch.optim.Adam`, `F.cross_entropy`, PyTorch's learning-rate schedulers,
and a latent grid Z indexed as Z[b, :, r, c] the way the reference code indexes it.

Used by check_step.py (one step, against a case written by the Rust test) and by parity.py
(whole runs side by side with `patchgd run`). Needs torch 2.11.0, torchvision 0.26.0 and
safetensors (scripts/test installs them into .venv).
"""

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision


class ConvBnRelu(nn.Module):
    """The small CNN's block: conv3x3 stride 2 (no bias), BatchNorm, ReLU."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class SmallCnn(nn.Module):
    features = 128

    def __init__(self, channels):
        super().__init__()
        self.block1 = ConvBnRelu(channels, 32)
        self.block2 = ConvBnRelu(32, 64)
        self.block3 = ConvBnRelu(64, 128)
        self.block4 = ConvBnRelu(128, 128)

    def forward(self, x):
        x = self.block4(self.block3(self.block2(self.block1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def trunk(name, channels):
    """The backbone's trunk (patch -> feature vector) and its width. torchvision's models lose
    their classification layer; they take RGB (grey patches are repeated)."""
    if name == "small_cnn":
        return SmallCnn(channels), SmallCnn.features
    model = getattr(torchvision.models, name)(weights=None)
    if name.startswith("resnet"):
        features = model.fc.in_features
        model.fc = nn.Identity()
    elif name == "mobilenet_v2":
        features = model.classifier[-1].in_features
        model.classifier = nn.Identity()
    else:
        raise ValueError(f"unknown backbone {name}")
    return model, features


class Backbone(nn.Module):
    """Trunk + Linear(features -> D). The trunk's modules sit at this module's top level so that
    parameter names read as torchvision's (`conv1.weight`, `features.0.0.weight`, `project.*`)."""

    def __init__(self, name, channels, latent_dim):
        super().__init__()
        self.rgb = name != "small_cnn"
        t, features = trunk(name, channels)
        self.trunk_forward = t.forward
        for child_name, child in t.named_children():
            self.add_module(child_name, child)
        self.project = nn.Linear(features, latent_dim)

    def forward(self, x):
        if self.rgb and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.project(self.trunk_forward(x))


class HeadBlock(nn.Module):
    def __init__(self, c_in, width, stride):
        super().__init__()
        self.conv = nn.Conv2d(c_in, width, 3, stride=stride, padding=1)
        self.bn = nn.BatchNorm2d(width)


class Head(nn.Module):
    """f2: conv3x3 at stride 1, then three at stride 2, each Conv -> ReLU -> BN -> Dropout2d;
    adaptive average pooling; Linear(width -> classes).

    `replay_masks`, when set (a list, consumed from the front), replaces Dropout2d's random
    draws by given masks (bool B x C, True = channel zeroed) and applies them with
    F.dropout2d's own arithmetic: replay.py replays patchgd's run this way."""

    def __init__(self, latent_dim, width, classes, dropout):
        super().__init__()
        for i in range(4):
            c_in = latent_dim if i == 0 else width
            self.add_module(f"block{i}", HeadBlock(c_in, width, 1 if i == 0 else 2))
        self.classifier = nn.Linear(width, classes)
        self.dropout = dropout
        self.replay_masks = None

    def dropout2d(self, x):
        if not self.training or self.dropout == 0 or self.replay_masks is None:
            return F.dropout2d(x, self.dropout, self.training)
        if not self.replay_masks:
            raise ValueError("the trace has fewer dropout masks than the step draws")
        zeroed = self.replay_masks.pop(0)
        b, c = x.shape[:2]
        if zeroed.numel() != b * c:
            raise ValueError(f"a traced dropout mask has {zeroed.numel()} values for {b} x {c}")
        # ATen's feature dropout: noise = bernoulli(1 - p) of shape B x C x 1 x 1, then
        # noise.div_(1 - p), then input * noise.
        noise = (~zeroed).to(x.dtype).view(b, c, 1, 1)
        noise.div_(1 - self.dropout)
        return x * noise

    def forward(self, z):
        x = z
        for i in range(4):
            block = getattr(self, f"block{i}")
            x = block.bn(F.relu(block.conv(x)))
            x = self.dropout2d(x)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class PatchGdModel(nn.Module):
    def __init__(self, backbone, channels, latent_dim, head_width, classes, dropout=0.2):
        super().__init__()
        self.backbone = Backbone(backbone, channels, latent_dim)
        self.head = Head(latent_dim, head_width, classes, dropout)
        self.latent_dim = latent_dim


class GdModel(nn.Module):
    def __init__(self, backbone, channels, latent_dim, classes):
        super().__init__()
        self.backbone = Backbone(backbone, channels, latent_dim)
        self.classifier = nn.Linear(latent_dim, classes)


def build(spec):
    """A model from a spec dict (method, backbone, channels, latent_dim, head_width, classes)."""
    if spec["method"] == "patchgd":
        return PatchGdModel(
            spec["backbone"],
            spec["channels"],
            spec["latent_dim"],
            spec["head_width"],
            spec["classes"],
            spec.get("head_dropout", 0.2),
        )
    return GdModel(spec["backbone"], spec["channels"], spec["latent_dim"], spec["classes"])


def load_weights(model, tensors):
    """Load patchgd's weights (names as patchgd writes them) strictly: every tensor must find
    its place with its shape; only BatchNorm's num_batches_tracked (unused with a momentum) may
    be missing."""
    result = model.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"weights do not match the PyTorch model: missing {missing}, "
            f"unexpected {result.unexpected_keys}"
        )


def plan(cells, rho, accumulation, perm):
    """The inner iterations of one outer step over the permutation `perm` (docs/method.md):
    n = ceil(cells * rho) patches per iteration, zeta = ceil(1 / rho) iterations at most; the
    optimizer steps every epsilon iterations and after the last."""
    n = min(max(math.ceil(cells * rho), 1), cells)
    zeta = math.ceil(1 / rho)
    chunks = [perm[i : i + n] for i in range(0, cells, n)][:zeta]
    epsilon = zeta if accumulation == "zeta" else 1
    k = len(chunks)
    step_after = [(j + 1) % epsilon == 0 or j + 1 == k for j in range(k)]
    group_size = [min(j // epsilon * epsilon + epsilon, k) - j // epsilon * epsilon for j in range(k)]
    return chunks, step_after, group_size


def patchgd_step(model, optimizer, patches, labels, rows, cols, chunks, step_after, group_size,
                 fill_chunk, present=None, on_step=None, losses_out=None):
    """One PatchGD outer step. `patches`: B x K x C x m x m, cell index r * cols + c. The fill
    encodes, with no gradient and the backbone in training mode, each chunk's cells of every
    image (at most `fill_chunk` per call): the batches the inner iterations will encode.
    Returns (mean loss over the inner iterations, last logits); each inner iteration's loss is
    appended to `losses_out` if given."""
    model.train()
    b, k = patches.shape[:2]
    flat = patches.reshape(b * k, *patches.shape[2:])
    if present is None:
        present = [True] * (b * k)

    def cells_of_all(cells):
        return [i * k + c for i in range(b) for c in cells if present[i * k + c]]

    def where(idx):
        idx = torch.tensor(idx, dtype=torch.long)
        return idx // k, (idx % k) // cols, idx % cols

    z = torch.zeros(b, model.latent_dim, rows, cols)
    with torch.no_grad():
        for cells in chunks:
            idx = cells_of_all(cells)
            for s in range(0, len(idx), fill_chunk):
                piece = idx[s : s + fill_chunk]
                img, r, c = where(piece)
                z[img, :, r, c] = model.backbone(flat[piece])
    optimizer.zero_grad()
    losses = []
    logits = None
    for j, cells in enumerate(chunks):
        z = z.detach().clone()
        idx = cells_of_all(cells)
        if idx:
            img, r, c = where(idx)
            z[img, :, r, c] = model.backbone(flat[idx])
        logits = model.head(z)
        loss = F.cross_entropy(logits, labels)
        losses.append(loss.item())
        (loss / group_size[j]).backward()
        if step_after[j]:
            if on_step is not None:
                on_step(model)
            optimizer.step()
            optimizer.zero_grad()
    if losses_out is not None:
        losses_out.extend(losses)
    return sum(losses) / len(losses), logits.detach()


def gd_step(model, optimizer, images, labels, on_step=None):
    """One GD step: whole images through the backbone and a linear classifier."""
    model.train()
    optimizer.zero_grad()
    logits = model.classifier(model.backbone(images))
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    if on_step is not None:
        on_step(model)
    optimizer.step()
    optimizer.zero_grad()
    return loss.item(), logits.detach()


def adam(model, lr, weight_decay=0.0):
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=weight_decay)


def scheduler(optimizer, warmup_steps, horizon_steps):
    """Linear warm-up from peak / warmup to the peak over `warmup_steps`, then linear decay to 0
    at `horizon_steps`, from PyTorch's own schedulers; stepped once per outer step."""
    decay = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0, end_factor=0.0,
        total_iters=max(horizon_steps - warmup_steps, 1))
    if warmup_steps == 0:
        return decay
    warm = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0,
        total_iters=warmup_steps - 1)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, decay],
                                                 milestones=[warmup_steps])


# ---------------------------------------------------------------------------------------------
# Whole runs (parity.py): the same algorithm, trained end to end on a data set that
# `patchgd synth ultramnist` wrote (labels.csv with image_id,label,split; images/ID.png).


def load_split(data_dir, split, patch):
    """Images of one split as (uint8 N x K x m x m patches, labels, rows, cols), cell r * cols + c."""
    _, patches, labels, rows, cols = load_images(Path(data_dir) / "images",
                                                 Path(data_dir) / "labels.csv", split, patch)
    return patches, labels, rows, cols


def load_images(images_dir, labels_csv, split, patch):
    """Images of one split, sorted by id, as (ids, uint8 N x K x m x m patches, labels, rows,
    cols), cell r * cols + c."""
    import csv

    from PIL import Image

    rows_out, labels = [], []
    with open(labels_csv) as f:
        entries = [r for r in csv.DictReader(f) if r["split"] == split]
    entries = sorted(entries, key=lambda r: r["image_id"])
    for entry in entries:
        with Image.open(Path(images_dir) / f"{entry['image_id']}.png") as im:
            im = im.convert("L")
            img = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
            img = img.view(im.height, im.width)
        h, w = img.shape
        rows, cols = h // patch, w // patch
        cells = img[: rows * patch, : cols * patch].reshape(rows, patch, cols, patch)
        rows_out.append(cells.permute(0, 2, 1, 3).reshape(rows * cols, patch, patch))
        labels.append(int(entry["label"]))
    ids = [e["image_id"] for e in entries]
    return ids, torch.stack(rows_out), torch.tensor(labels), rows, cols


# MNIST's statistics, which the reference code normalises UltraMNIST with (patchgd's `mnist`).
MNIST = (0.1307, 0.3081)


def normalise(u8, stats=MNIST):
    """uint8 -> (x / 255 - mean) / std, one channel: N x K x 1 x m x m. Computed as
    x / (255 std) - mean / std, the operations patchgd's `source.normalize` uses."""
    mean, std = stats
    return (u8.float() / (255.0 * std) - mean / std).unsqueeze(2)


@torch.no_grad()
def eval_logits(model, x, rows, cols, fill_chunk):
    """Inference on one normalised batch (B x K x C x m x m): fill Z with every patch in eval
    mode, `fill_chunk` patches per backbone call, writing z[b, :, r, c] as the training step
    does (so the head sees the same contiguous B x D x rows x cols layout); one head pass."""
    model.eval()
    b, k = x.shape[:2]
    flat = x.reshape(b * k, *x.shape[2:])
    z = torch.zeros(b, model.latent_dim, rows, cols)
    cells = torch.arange(b * k)
    for s in range(0, b * k, fill_chunk):
        piece = cells[s : s + fill_chunk]
        z[piece // k, :, (piece % k) // cols, piece % cols] = model.backbone(flat[piece])
    return model.head(z)


@torch.no_grad()
def evaluate(model, patches, labels, rows, cols, batch_size, fill_chunk, stats=MNIST):
    """Inference over a split in batches. Returns (loss, accuracy)."""
    loss, right = 0.0, 0
    for s in range(0, len(labels), batch_size):
        logits = eval_logits(model, normalise(patches[s : s + batch_size], stats), rows, cols,
                             fill_chunk)
        y = labels[s : s + batch_size]
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        right += (logits.argmax(1) == y).sum().item()
    return loss / len(labels), right / len(labels)


def schedule_steps(epochs, warmup_epochs, train_images, batch_size, decay_epochs=None):
    """(warm-up steps, horizon steps) from epochs, as `train.warmup_epochs` and
    `train.decay_epochs` define them: epochs times ceil(images / B) outer steps, rounded half
    away from zero."""
    per_epoch = math.ceil(train_images / batch_size)
    half_up = lambda v: math.floor(v + 0.5)  # noqa: E731
    horizon = epochs if decay_epochs is None else decay_epochs
    return half_up(warmup_epochs * per_epoch), half_up(horizon * per_epoch)


def train_run(data_dir, s, log=print):
    """Train PatchGD from scratch with settings `s` (a dict: patch, backbone, latent_dim,
    head_width, head_dropout, epochs, batch_size, lr, warmup_epochs, rho, accumulation,
    fill_chunk, seed; optionally normalize as (mean, std), MNIST's by default). Returns
    per-epoch metrics."""
    import random
    import time

    torch.manual_seed(s["seed"])
    random.seed(s["seed"])
    stats = tuple(s.get("normalize", MNIST))
    train_x, train_y, rows, cols = load_split(data_dir, "train", s["patch"])
    val_x, val_y, _, _ = load_split(data_dir, "val", s["patch"])
    classes = int(max(train_y.max(), val_y.max())) + 1
    model = build(dict(method="patchgd", backbone=s["backbone"], channels=1,
                       latent_dim=s["latent_dim"], head_width=s["head_width"],
                       classes=max(classes, 2), head_dropout=s["head_dropout"]))
    optimizer = adam(model, s["lr"])
    sched = scheduler(optimizer, *schedule_steps(s["epochs"], s["warmup_epochs"], len(train_y),
                                                 s["batch_size"]))
    k = rows * cols
    metrics = []
    for epoch in range(1, s["epochs"] + 1):
        start = time.time()
        order = torch.randperm(len(train_y))
        loss_sum, right = 0.0, 0
        for i in range(0, len(order), s["batch_size"]):
            idx = order[i : i + s["batch_size"]]
            perm = torch.randperm(k).tolist()
            chunks, step_after, group_size = plan(k, s["rho"], s["accumulation"], perm)
            loss, logits = patchgd_step(model, optimizer, normalise(train_x[idx], stats),
                                        train_y[idx], rows, cols, chunks, step_after,
                                        group_size, s["fill_chunk"])
            sched.step()
            loss_sum += loss * len(idx)
            right += (logits.argmax(1) == train_y[idx]).sum().item()
        val_loss, val_acc = evaluate(model, val_x, val_y, rows, cols, s["batch_size"],
                                     s["fill_chunk"], stats)
        row = dict(epoch=epoch, train_loss=loss_sum / len(train_y),
                   train_accuracy=right / len(train_y), val_loss=val_loss,
                   val_accuracy=val_acc, seconds=time.time() - start)
        log(f"epoch {epoch}/{s['epochs']}: train loss {row['train_loss']:.4f} acc "
            f"{row['train_accuracy']:.3f} | val loss {val_loss:.4f} acc {val_acc:.3f} | "
            f"{row['seconds']:.1f} s")
        metrics.append(row)
    return metrics
