"""Replay a patchgd run in the PyTorch twin, choice for choice, and say where the two part.

    .venv/bin/python3 tests/twin/replay.py TRACE_DIR [--control] [--report FILE] [--check]

TRACE_DIR is what `patchgd run --trace TRACE_DIR` wrote (docs/parity.md, "The trace"). The twin
(patchgd_torch.py: nn modules, torchvision, torch.optim.Adam, PyTorch's schedulers) starts from
patchgd's initial weights and takes the run's random choices from the trace: each epoch's image
order, each step's cell permutation, each dropout mask. Everything else it computes itself: its
batches from the order, its inner iterations from the permutation, its learning rate from
PyTorch's schedulers, its losses, gradients, updates and BatchNorm statistics, and its
evaluation. After every step it compares with what patchgd wrote:

- the loss of every inner iteration (largest absolute difference);
- every weight and BatchNorm statistic, where the trace has them: for each tensor the largest
  |difference| over the tensor's largest |value|, and the largest of these over the tensors;
- after each epoch: every validation prediction (largest probability difference), accuracy.

--control replays the same trace a second time, from patchgd's initial weights moved by one unit
in the last place (each parameter up or down at random, seeded), and measures the same between
the twin and this control: how far float rounding alone drives two runs apart.

--check (the test suite's trajectory test) exits 1 unless, at every step, patchgd's distance from
the twin is at most the largest the control reached by then, the final accuracies differ by no
more than the control's, and the control moved at all.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import patchgd_torch as twin  # noqa: E402

FORMAT = 1
REPORT_STEPS = [1, 2, 5, 10, 20, 50, 100, 200, 256, 500, 512, 768, 1000, 1024, 1280]


class TraceError(Exception):
    pass


def read_trace(path):
    with open(path / "trace.jsonl") as f:
        for n, line in enumerate(f, 1):
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"{path / 'trace.jsonl'} line {n}: not JSON ({e})") from e


def check_header(run):
    if run.get("record") != "run" or run.get("format") != FORMAT:
        raise TraceError(f"expected a 'run' record of format {FORMAT} first, found "
                         f"{run.get('record')!r} format {run.get('format')!r}")
    p = run["pipeline"]
    refuse = []
    if run["model"]["method"] != "patchgd":
        refuse.append("method gd (the twin replays PatchGD runs)")
    if p["train"].get("precision", "f32") != "f32":
        refuse.append(f"precision {p['train']['precision']} (the twin replays f32)")
    if p.get("latent", {}).get("reuse"):
        refuse.append("latent.reuse (the twin encodes every cell)")
    for key in ("batch_norm", "head_batch_norm"):
        if p["model"].get(key, "train") != "train":
            refuse.append(f"model.{key}: {p['model'][key]}")
    if p["patch"].get("foreground", {}).get("min_fraction", 0.0) > 0:
        refuse.append("patch.foreground.min_fraction (the twin encodes every cell)")
    if p["train"].get("weight_decay", 0.0) != 0.0:
        refuse.append("train.weight_decay")
    if run["weights_every"] == 0:
        refuse.append("no weights in the trace (--trace-weights-every 0)")
    if refuse:
        raise TraceError("this trace cannot be replayed: " + "; ".join(refuse))


def mask_from_hex(text, n):
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8), bitorder="little")
    return torch.from_numpy(bits[:n].astype(bool))


def weight_blocks(trace_dir, tensors):
    """The weights.f32 blocks, as a function of block index -> {name: tensor}."""
    sizes = [math.prod(t["shape"]) for t in tensors]
    per_block = sum(sizes)
    data = np.memmap(trace_dir / "weights.f32", dtype="<f4", mode="r")

    def block(i):
        at = i * per_block
        if at + per_block > data.size:
            raise TraceError(f"weights.f32 has no block {i}")
        out = {}
        for t, size in zip(tensors, sizes):
            out[t["name"]] = torch.from_numpy(np.array(data[at : at + size])).view(t["shape"])
            at += size
        return out

    return block


def relative_difference(a, b):
    """max over tensors of max|a - b| / max|a| (a tensor of zeros: the plain max|a - b|), and the
    tensor where it is largest."""
    worst, where = 0.0, None
    for name, x in a.items():
        y = b[name].to(x.dtype)
        d = (x - y).abs().max().item()
        scale = x.abs().max().item()
        r = d / scale if scale > 0 else d
        if r > worst or where is None:
            worst, where = r, name
    return worst, where


def model_state(model, names):
    state = model.state_dict()
    return {n: state[n].detach() for n in names}


def perturbed(tensors, model_params, seed=0):
    """The initial tensors with every parameter moved one unit in the last place, up or down
    at random (seeded); BatchNorm's statistics unchanged."""
    g = torch.Generator().manual_seed(seed)
    out = dict(tensors)
    for name in model_params:
        t = tensors[name]
        up = torch.rand(t.shape, generator=g) < 0.5
        target = torch.where(up, torch.full_like(t, math.inf), torch.full_like(t, -math.inf))
        out[name] = torch.nextafter(t, target)
    return out


class Replica:
    """One twin model replaying the trace: model, optimizer, scheduler."""

    def __init__(self, spec, weights, lr, warmup, horizon):
        self.model = twin.build(spec)
        twin.load_weights(self.model, weights)
        self.optimizer = twin.adam(self.model, lr)
        self.scheduler = twin.scheduler(self.optimizer, warmup, horizon)

    def lr(self):
        return self.optimizer.param_groups[0]["lr"]

    def step(self, x, y, rows, cols, plan, fill_chunk, masks):
        chunks, step_after, group_size = plan
        self.model.head.replay_masks = list(masks)
        losses = []
        twin.patchgd_step(self.model, self.optimizer, x, y, rows, cols, chunks, step_after,
                          group_size, fill_chunk, losses_out=losses)
        left = len(self.model.head.replay_masks)
        self.model.head.replay_masks = None
        if left:
            raise TraceError(f"the trace has {left} more dropout masks than the step drew")
        self.scheduler.step()
        return losses

    @torch.no_grad()
    def evaluate(self, batches, x_of, y_of, rows, cols, fill_chunk, stats):
        probs, loss, right, n = {}, 0.0, 0, 0
        for ids in batches:
            logits = twin.eval_logits(self.model, twin.normalise(x_of(ids), stats), rows, cols,
                                      fill_chunk)
            y = y_of(ids)
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            right += (logits.argmax(1) == y).sum().item()
            n += len(ids)
            for i, p in zip(ids, logits.softmax(-1)):
                probs[i] = p
        return probs, loss / max(n, 1), right / max(n, 1)


def replay(trace_dir, control=False, log=print, data_images=None, data_labels=None):
    trace_dir = Path(trace_dir)
    records = read_trace(trace_dir)
    run = next(records)
    check_header(run)
    torch.set_num_threads(run["threads"])
    p = run["pipeline"]
    m = run["model"]
    images_dir = data_images or p["source"]["images"]
    labels_csv = data_labels or p["source"]["labels"]
    patch = p["patch"]["size"]
    if p["patch"].get("stride") not in (None, patch):
        raise TraceError("the twin cuts non-overlapping patches (patch.stride = patch.size)")
    stats = (run["normalize"]["mean"][0], run["normalize"]["std"][0])
    if len(run["normalize"]["mean"]) != 1 or m["channels"] != 1:
        raise TraceError("the twin replays one-channel data with one mean and std")
    splits, grids = {}, set()
    for split in ("train", "val"):
        ids, x, y, rows, cols = twin.load_images(images_dir, labels_csv, split, patch)
        splits[split] = ({i: n for n, i in enumerate(ids)}, x, y)
        grids.add((rows, cols))
    if len(grids) != 1:
        raise TraceError(f"the twin replays images of one grid; these have {sorted(grids)}")
    if len(splits["train"][0]) != run["train_images"]:
        raise TraceError(f"{labels_csv} has {len(splits['train'][0])} training images, the "
                         f"run had {run['train_images']}")

    def x_of(split):
        index, x, _ = splits[split]
        return lambda ids: x[[index[i] for i in ids]]

    def y_of(split):
        index, _, y = splits[split]
        return lambda ids: y[[index[i] for i in ids]]

    t = p["train"]
    b = t["batch_size"]
    warmup, horizon = twin.schedule_steps(t["epochs"], t["warmup_epochs"], run["train_images"],
                                          b, t.get("decay_epochs"))
    spec = dict(method="patchgd", backbone=m["backbone"], channels=m["channels"],
                latent_dim=m["latent_dim"], head_width=m["head_width"], classes=m["classes"],
                head_dropout=m["head_dropout"])
    initial = load_file(str(trace_dir / "initial.safetensors"))
    names = [x["name"] for x in run["tensors"]]
    replicas = {"twin": Replica(spec, initial, t["lr"], warmup, horizon)}
    if control:
        params = [n for n, _ in replicas["twin"].model.named_parameters()]
        replicas["control"] = Replica(spec, perturbed(initial, params), t["lr"], warmup, horizon)
    blocks = weight_blocks(trace_dir, run["tensors"])
    rho = p["patchgd"]["sampling_fraction"]
    accumulation = p["patchgd"]["accumulation"]
    fill_chunk = p["patchgd"]["fill_chunk"]
    steps, epochs = [], []
    order, position = [], 0
    started = time.time()
    for rec in records:
        kind = rec["record"]
        if kind == "epoch":
            order, position = rec["order"], 0
            if sorted(order) != sorted(splits["train"][0]):
                raise TraceError(f"epoch {rec['epoch']}'s order is not the training images")
        elif kind == "step":
            ids = order[position : position + b]
            position += len(ids)
            if ids != rec["images"]:
                raise TraceError(f"step {rec['step']}: patchgd trained on {rec['images'][:3]}… "
                                 f"where its epoch order gives {ids[:3]}…")
            x = twin.normalise(x_of("train")(ids), stats)
            y = y_of("train")(ids)
            k = rows * cols
            perm = rec["permutation"]
            if sorted(perm) != list(range(k)):
                raise TraceError(f"step {rec['step']}: the permutation is not one of {k} cells")
            plan = twin.plan(k, rho, accumulation, perm)
            c = m["head_width"]
            masks = [mask_from_hex(h, len(ids) * c) for h in rec["dropout"]]
            lr_patchgd = rec["lr"]
            row = {"step": rec["step"], "epoch": rec["epoch"]}
            losses = {}
            for name, r in replicas.items():
                lr_twin = r.lr()
                if name == "twin":
                    row["lr_relative_difference"] = abs(lr_twin - lr_patchgd) / max(lr_patchgd, 1e-300)
                losses[name] = r.step(x, y, rows, cols, plan, fill_chunk, masks)
            theirs = [v if v is not None else math.nan for v in rec["losses"]]
            if len(theirs) != len(losses["twin"]):
                raise TraceError(f"step {rec['step']}: patchgd ran {len(theirs)} inner "
                                 f"iterations, the twin {len(losses['twin'])}")
            row["loss"] = float(np.mean(theirs))
            row["loss_difference"] = max(abs(a - b) for a, b in zip(theirs, losses["twin"]))
            if control:
                row["control_loss_difference"] = max(
                    abs(a - b) for a, b in zip(losses["twin"], losses["control"]))
            twin_state = model_state(replicas["twin"].model, names)
            if rec.get("weights_block") is not None:
                theirs_w = blocks(rec["weights_block"])
                row["weight_difference"], row["weight_worst"] = relative_difference(
                    theirs_w, twin_state)
            if control:
                row["control_weight_difference"], row["control_weight_worst"] = \
                    relative_difference(twin_state, model_state(replicas["control"].model, names))
            steps.append(row)
            n = rec["step"]
            if n in REPORT_STEPS or n % 256 == 0:
                log(f"step {n}: loss {row['loss']:.4f}, |Δloss| {row['loss_difference']:.2e}, "
                    f"Δweights {row.get('weight_difference', math.nan):.2e}"
                    + (f" | control: |Δloss| {row['control_loss_difference']:.2e}, Δweights "
                       f"{row['control_weight_difference']:.2e}" if control else "")
                    + f" ({time.time() - started:.0f} s)")
        elif kind == "eval":
            batches = [batch["images"] for batch in rec["batches"]]
            theirs = {i: p for batch in rec["batches"]
                      for i, p in zip(batch["images"], batch["probabilities"])}
            row = {"epoch": rec["epoch"], "patchgd_accuracy": rec["accuracy"],
                   "patchgd_loss": rec["loss"]}
            for name, r in replicas.items():
                probs, loss, acc = r.evaluate(batches, x_of("val"), y_of("val"), rows, cols,
                                              fill_chunk, stats)
                row[f"{name}_accuracy"], row[f"{name}_loss"] = acc, loss
                if name == "twin":
                    row["probability_difference"] = max(
                        (abs(probs[i] - torch.tensor(p)).max().item() for i, p in theirs.items()),
                        default=0.0)
            epochs.append(row)
            log(f"epoch {rec['epoch']}: validation accuracy patchgd {rec['accuracy']:.4f}, "
                f"twin {row['twin_accuracy']:.4f}"
                + (f", control {row['control_accuracy']:.4f}" if control else "")
                + f"; largest probability difference {row['probability_difference']:.2e}")
        else:
            raise TraceError(f"unknown record {kind!r}")
    return {"trace": str(trace_dir), "steps": steps, "epochs": epochs, "control": control,
            "seconds": time.time() - started}


def envelope(values):
    """Running maximum: the largest the control reached by each step."""
    out, top = [], 0.0
    for v in values:
        top = max(top, v)
        out.append(top)
    return out


def check(report):
    """The trajectory test's verdict: a list of failures (empty: passed)."""
    steps, epochs = report["steps"], report["epochs"]
    failures = []
    for key in ("loss_difference", "weight_difference"):
        control = envelope(s[f"control_{key}"] for s in steps)
        if control[-1] == 0:
            failures.append(f"the control's {key} stayed 0: the perturbation measured nothing")
        for s, tol in zip(steps, control):
            if s[key] > tol:
                what = ("the loss" if key == "loss_difference"
                        else f"the weights (most in {s['weight_worst']})")
                failures.append(f"step {s['step']}: patchgd and the twin differ by {s[key]:.3e} "
                                f"in {what}; the control had reached {tol:.3e} by then")
                break
    if epochs:
        last = epochs[-1]
        ours = abs(last["patchgd_accuracy"] - last["twin_accuracy"])
        theirs = abs(last["twin_accuracy"] - last["control_accuracy"])
        if ours > theirs:
            failures.append(f"final accuracy: patchgd {last['patchgd_accuracy']:.4f}, twin "
                            f"{last['twin_accuracy']:.4f} (control {last['control_accuracy']:.4f})")
    return failures


def table(report):
    """Markdown: the measures at a few steps."""
    control = report["control"]
    head = "| step | loss | patchgd vs twin: loss | weights |"
    line = "|---|---|---|---|"
    if control:
        head += " control vs twin: loss | weights |"
        line += "---|---|"
    out = [head, line]
    last = report["steps"][-1]["step"] if report["steps"] else 0
    for s in report["steps"]:
        if s["step"] not in REPORT_STEPS and s["step"] != last:
            continue
        cells = [str(s["step"]), f"{s['loss']:.4f}", f"{s['loss_difference']:.1e}",
                 f"{s.get('weight_difference', math.nan):.1e}"]
        if control:
            cells += [f"{s['control_loss_difference']:.1e}",
                      f"{s['control_weight_difference']:.1e}"]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out.append("| epoch | patchgd accuracy | twin | largest probability difference |"
               + (" control |" if control else ""))
    out.append("|---|---|---|---|" + ("---|" if control else ""))
    for e in report["epochs"]:
        out.append(f"| {e['epoch']} | {e['patchgd_accuracy']:.4f} | {e['twin_accuracy']:.4f} | "
                   f"{e['probability_difference']:.1e} |"
                   + (f" {e['control_accuracy']:.4f} |" if control else ""))
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace", type=Path)
    p.add_argument("--control", action="store_true",
                   help="also replay from weights moved by one unit in the last place")
    p.add_argument("--report", type=Path, help="write every step's measures here (JSON)")
    p.add_argument("--check", action="store_true",
                   help="exit 1 unless patchgd stays within the control's distance (implies "
                        "--control)")
    p.add_argument("--images", help="the images' directory (default: the run's source.images)")
    p.add_argument("--labels", help="the labels CSV (default: the run's source.labels)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    control = args.control or args.check
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    try:
        report = replay(args.trace, control, log, args.images, args.labels)
    except TraceError as e:
        print(f"replay: {e}", file=sys.stderr)
        sys.exit(2)
    if args.report:
        args.report.write_text(json.dumps(report, indent=1))
    print(table(report))
    if args.check:
        failures = check(report)
        if failures:
            print("\nFAILED: patchgd's run drifts from the twin's faster than rounding explains:")
            for f in failures:
                print("  " + f)
            sys.exit(1)
        print("\npatchgd's run stays within the control's distance at every step")


if __name__ == "__main__":
    main()
