"""Differential check of patchgd's training step against plain PyTorch (patchgd_torch.py).

Usage: check_step.py CASE_DIR...   (each written by tests/it/twin.rs)

A case directory holds what patchgd started from and what it ended with:
  case.json            settings, the step plan, and patchgd's loss
  initial.safetensors  patchgd's weights before the step (and BatchNorm statistics)
  batch.safetensors    input (B x K x C x m x m, normalised) and labels
  rust.safetensors     grad.<step>.<name>: each parameter's gradient at each optimizer step;
                       after.<name>: every weight and BatchNorm statistic after the step;
                       logits: the last inner iteration's logits
A `schedule` case holds learning rates instead.

The same step runs in PyTorch from the same weights, batch and cell permutation (dropout off):
- the forward and backward: at every optimizer step, PyTorch's gradient of every parameter
  against patchgd's;
- the optimizer: torch.optim.Adam is then stepped with patchgd's gradients (so that both sides
  hold the same weights for the next inner iteration), and the weights after the last step, and
  the BatchNorm running statistics, are compared with patchgd's;
- the initial weights: a fresh PyTorch model of the same shape checks that patchgd's come from
  PyTorch's (torchvision's) distributions, layer by layer.
Why the optimizer is fed patchgd's gradients: a bias just before a BatchNorm has a gradient
that cancels to float noise (1e-4 of the largest gradient here), and Adam's first step moves
each weight by about lr * sign(g) whatever |g| is, so PyTorch run on its own gradients would
move such weights by +-lr at random, and later steps would compare different weights.
Prints one line per case; exits 1 if anything differs.
"""

import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import patchgd_torch as twin  # noqa: E402

# Float32 on the same libtorch: only summation order differs (found: ~1e-7 relative). A real
# difference in the step (a divisor, a BatchNorm batch, an optimizer constant) is >= 1e-3.
GRAD_TOL = 1e-4
# A gradient is compared relative to its own norm, or to this share of the step's largest
# gradient norm if that is larger (cancelled gradients are float noise; see above).
GRAD_FLOOR = 1e-2
STAT_TOL = 1e-4
# Weights after an Adam step, in units in the last place of the weight. patchgd's update is
# torch.optim.Adam's op for op (src/train/adam_update.cpp), so none: its earlier formula of the
# same update (m * b1 + g * (1 - b1), ...) rounded differently by up to 2.5 units, which is how
# fast two whole runs part; a wrong constant is thousands.
UPDATE_ULPS = 0
# Sampling error allowance for comparing two draws of one distribution, in standard errors.
Z = 6.0


def ulps(a, b, before, lr):
    """Largest |a - b| between two weights after one Adam update of `before`, in units of the
    update's rounding: the last place (float32) of the larger of the weight before and after
    (w - update rounds to that, however near 0 the result lands), plus the last place of a
    full-size step lr (Adam's moments round relative to it where 0.9 m + 0.1 g cancels)."""
    scale = torch.maximum(before.float().abs(), b.float().abs())
    spacing = torch.nextafter(scale, torch.full_like(scale, math.inf)) - scale
    unit = spacing + lr * 2.0**-23
    return ((a.float() - b.float()).abs() / unit).max().item()


def rel(a, b, floor=1e-30):
    """||a - b|| / max(||b||, floor)"""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


class Report:
    def __init__(self, name):
        self.name = name
        self.failures = []
        self.worst = {}

    def check(self, what, error, tol, detail=""):
        kind = what.split(" ")[0]
        self.worst[kind] = max(self.worst.get(kind, 0.0), error)
        if not error <= tol:
            self.failures.append(f"{what}: relative error {error:.3g} > {tol:g} {detail}")


def same_distribution(report, name, ours, fresh):
    """Our initial tensor and a fresh PyTorch one: same mean and spread within sampling error.
    (Tensors under 16 values give no usable spread; the Rust test checks their bounds.)"""
    ours, fresh = ours.double().flatten(), fresh.double().flatten()
    n = ours.numel()
    if fresh.std(unbiased=False) == 0 or n < 2:
        error = (ours - fresh).abs().max().item()
        report.check(f"init {name} (constant)", error, 0.0)
        return
    if n < 16:
        return
    sigma = fresh.std(unbiased=False).item()
    # Mean: two samples of n values, standard error sigma * sqrt(2 / n).
    mean_err = abs(ours.mean().item() - fresh.mean().item()) / (sigma * math.sqrt(2.0 / n))
    report.check(f"init {name} mean", mean_err, Z, f"(in standard errors; n={n})")
    # Spread: the standard error of a sample std is sigma * sqrt((kurtosis - 1) / 4n);
    # kurtosis 1.8 (uniform) to 3 (normal): take 3, and two samples.
    s_ours = ours.std(unbiased=False).item()
    std_err = abs(s_ours - sigma) / (sigma * math.sqrt(2.0 * 2.0 / (4.0 * n)))
    report.check(f"init {name} std", std_err, Z, f"(ours {s_ours:.4g}, torch {sigma:.4g})")


def check_init(report, spec, initial, seed):
    torch.manual_seed(seed)
    fresh = twin.build(spec).state_dict()
    for name, t in initial.items():
        if name not in fresh:
            report.failures.append(f"init {name}: no such tensor in the PyTorch model")
            continue
        if tuple(fresh[name].shape) != tuple(t.shape):
            report.failures.append(
                f"init {name}: shape {tuple(t.shape)}, PyTorch {tuple(fresh[name].shape)}")
            continue
        same_distribution(report, name, t, fresh[name])


def check_step(case_dir):
    case = json.loads((case_dir / "case.json").read_text())
    report = Report(case_dir.name)
    if case["kind"] == "schedule":
        return check_schedule(case, report)
    spec = case["spec"]
    initial = load_file(case_dir / "initial.safetensors")
    batch = load_file(case_dir / "batch.safetensors")
    rust = load_file(case_dir / "rust.safetensors")
    check_init(report, spec, initial, case["seed"])

    torch.manual_seed(0)
    model = twin.build(dict(spec, head_dropout=0.0))
    twin.load_weights(model, initial)
    steps = sorted({int(k.split(".")[1]) for k in rust if k.startswith("grad.")})
    optimizer = Forced(twin.adam(model, case["lr"], case.get("weight_decay", 0.0)), model,
                       rust, steps, report)
    grads = optimizer.grads
    labels = batch["labels"].long()
    if case["kind"] == "patchgd":
        loss, logits = twin.patchgd_step(
            model, optimizer, batch["input"], labels, case["rows"], case["cols"],
            case["chunks"], case["step_after"], case["group_size"], case["fill_chunk"],
            case.get("present"))
        # The plan the twin would derive from the same permutation must be patchgd's.
        expect = twin.plan(case["rows"] * case["cols"], case["rho"], case["accumulation"],
                           case["permutation"])
        if list(expect) != [case["chunks"], case["step_after"], case["group_size"]]:
            report.failures.append(f"plan differs: PyTorch {expect}")
    else:
        images = batch["input"][:, 0]
        loss, logits = twin.gd_step(model, optimizer, images, labels)

    report.check("loss", abs(loss - case["loss"]) / abs(loss), GRAD_TOL,
                 f"(patchgd {case['loss']:.6g}, PyTorch {loss:.6g})")
    report.check("logits", rel(rust["logits"], logits), GRAD_TOL)
    if len(steps) != len(grads):
        report.failures.append(f"patchgd stepped {len(steps)} times, PyTorch {len(grads)}")
    for step, torch_grads in zip(steps, grads):
        names = {k.split(".", 2)[2] for k in rust if k.startswith(f"grad.{step}.")}
        if names != set(torch_grads):
            report.failures.append(
                f"step {step}: gradients for {sorted(names ^ set(torch_grads))} on one side only")
        floor = GRAD_FLOOR * max(g.norm().item() for g in torch_grads.values())
        for name in sorted(names & set(torch_grads)):
            error = rel(rust[f"grad.{step}.{name}"], torch_grads[name], floor)
            report.check(f"gradient {name} (step {step})", error, GRAD_TOL)
    # (Weights were compared step by step, in Forced.)
    after = model.state_dict()
    for name in initial:
        if name.endswith("running_mean") or name.endswith("running_var"):
            report.check(f"batchnorm {name}", rel(rust[f"after.{name}"], after[name]), STAT_TOL)
    return report


class Forced:
    """torch.optim.Adam, stepped with patchgd's gradients, whose update is checked against
    patchgd's and which then continues from patchgd's weights exactly: each step is compared
    on its own, not two trajectories that float rounding (amplified by BatchNorm over two or
    three patches) pulls apart. PyTorch's own gradients are kept in `grads` for comparison."""

    def __init__(self, adam, model, rust, steps, report):
        self.adam, self.model, self.rust, self.steps, self.report = adam, model, rust, steps, report
        self.grads = []

    def zero_grad(self):
        self.adam.zero_grad()

    @torch.no_grad()
    def step(self):
        j = len(self.grads)
        self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters()
                           if p.grad is not None})
        if j >= len(self.steps):
            return  # reported as a step count mismatch
        params = dict(self.model.named_parameters())
        before = {n: p.clone() for n, p in params.items()}
        for n, p in params.items():
            key = f"grad.{self.steps[j]}.{n}"
            if key in self.rust:
                p.grad.copy_(self.rust[key])
            else:
                p.grad = None
        self.adam.step()
        # Patchgd's weights after this update: those before its next one, or its final ones.
        later = f"before.{self.steps[j + 1]}." if j + 1 < len(self.steps) else "after."
        for n, p in params.items():
            ours = self.rust[later + n]
            lr = self.adam.param_groups[0]["lr"]
            self.report.check(f"update {n} (step {self.steps[j]})",
                              ulps(ours, p, before[n], lr), UPDATE_ULPS,
                              "(units in the last place)")
            p.copy_(ours)


def check_schedule(case, report):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=case["peak"])
    sched = twin.scheduler(opt, case["warmup_steps"], case["horizon_steps"])
    for step, ours in enumerate(case["lrs"]):
        theirs = opt.param_groups[0]["lr"]
        report.check(f"lr step {step}", abs(ours - theirs) / case["peak"], 1e-12,
                     f"(patchgd {ours:.9g}, PyTorch {theirs:.9g})")
        opt.step()
        sched.step()
    return report


def main():
    failed = 0
    for arg in sys.argv[1:]:
        report = check_step(Path(arg))
        worst = ", ".join(f"{k} {v:.2g}" for k, v in sorted(report.worst.items()))
        status = "ok" if not report.failures else "DIFFERS"
        print(f"{report.name}: {status} (largest: {worst})")
        for f in report.failures[:40]:
            print(f"  {f}")
        if len(report.failures) > 40:
            print(f"  ... and {len(report.failures) - 40} more")
        failed += bool(report.failures)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
