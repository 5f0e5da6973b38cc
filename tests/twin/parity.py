"""The parity bench: the same PatchGD configuration trained by patchgd and by plain PyTorch
(patchgd_torch.py, the implementation the step test and the paired replay check patchgd
against), several seeds each, with the difference of the means, its 95% confidence interval and
a Mann-Whitney rank test (docs/benchmarks.md, "Parity with PyTorch").

    scripts/parity                                   # both configurations below
    .venv/bin/python3 tests/twin/parity.py --config demo --seeds 42 --epochs 1   # a quick look

Configurations (CONFIGS): `demo`, the README's demo (pipelines/ultramnist.yaml), 8 seeds a
side; `resnet18`, closer to real use (pipelines/ultramnist-resnet18.yaml: resnet18, 256 px,
10 classes), 3 seeds a side. Both sides read the configuration's data set (`patchgd synth
ultramnist --config PIPELINE`, which scripts/parity runs) and get every setting from CONFIGS:
patchgd as `--set` overrides of the pipeline file. The seeds of the two sides are not paired
(patchgd's generator is not PyTorch's): the runs are two samples. Prints a Markdown table per
configuration and writes it, with every epoch's figures, to OUT/CONFIG/parity.json. A bench
started again keeps the runs that file holds at the same settings (`--again` reruns them).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import patchgd_torch as twin  # noqa: E402
import stats  # noqa: E402

# Each configuration's settings, key by key as its pipeline file has them.
CONFIGS = {
    "demo": {
        "pipeline": "pipelines/ultramnist.yaml",
        "data": "data/ultramnist",
        "seeds": list(range(42, 50)),
        "settings": {
            "patch": 32,
            "backbone": "small_cnn",
            "latent_dim": 64,
            "head_width": 64,
            "head_dropout": 0.2,
            "epochs": 8,
            "batch_size": 16,
            "lr": 0.003,
            "warmup_epochs": 1.0,
            "rho": 0.5,
            "accumulation": "zeta",
            "fill_chunk": 512,
            "normalize": [0.1307, 0.3081],
        },
    },
    "resnet18": {
        "pipeline": "pipelines/ultramnist-resnet18.yaml",
        "data": "data/ultramnist-resnet18",
        "seeds": [42, 43, 44],
        "settings": {
            "patch": 64,
            "backbone": "resnet18",
            "latent_dim": 64,
            "head_width": 64,
            "head_dropout": 0.2,
            "epochs": 2,
            "batch_size": 16,
            "lr": 0.001,
            "warmup_epochs": 0.5,
            "rho": 0.25,
            "accumulation": "zeta",
            "fill_chunk": 512,
            "normalize": [0.1307, 0.3081],
        },
    },
}

PIPELINE_KEYS = {
    "patch": "patch.size",
    "backbone": "model.backbone",
    "latent_dim": "model.latent_dim",
    "head_width": "model.head_width",
    "head_dropout": "model.head_dropout",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "lr": "train.lr",
    "warmup_epochs": "train.warmup_epochs",
    "rho": "patchgd.sampling_fraction",
    "accumulation": "patchgd.accumulation",
    "fill_chunk": "patchgd.fill_chunk",
}


def override(key, value):
    if key == "normalize":
        return f"source.normalize={{mean: [{value[0]}], std: [{value[1]}]}}"
    return f"{PIPELINE_KEYS[key]}={value}"


def run_patchgd(exe, pipeline, settings, seed, out):
    sets = [override(k, v) for k, v in settings.items()]
    sets += [f"train.seed={seed}", f"output={out}", "train.device=cpu"]
    cmd = [exe, "run", pipeline, "--fresh", "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    start = time.time()
    subprocess.run(cmd, check=True)
    seconds = time.time() - start
    lines = (Path(out) / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    epochs = [{"epoch": int(r["epoch"]), "train_accuracy": float(r["train_accuracy"]),
               "val_accuracy": float(r["val_accuracy"]), "val_loss": float(r["val_loss"])}
              for r in rows]
    return {"epochs": epochs, "seconds": seconds}


def run_torch(data, settings, seed):
    start = time.time()
    epochs = twin.train_run(data, dict(settings, seed=seed), log=lambda s: print(f"  torch: {s}"))
    return {"epochs": epochs, "seconds": time.time() - start}


def summary(runs):
    finals = [r["epochs"][-1]["val_accuracy"] for r in runs.values()]
    mean = statistics.mean(finals)
    sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
    secs = statistics.median(r["seconds"] for r in runs.values())
    return finals, mean, sd, secs


def tables(results, seeds):
    """The Markdown table of final accuracies, and the comparison line under it."""
    cells = " | ".join(f"seed {s}" for s in seeds)
    table = [f"| implementation | {cells} | mean | sd | min-max | median s per run |",
             "|---|" + "---|" * (len(seeds) + 4)]
    finals = {}
    for name, label in [("patchgd", "patchgd"), ("torch", "PyTorch (tests/twin)")]:
        if not results[name]:
            continue
        f, mean, sd, secs = summary(results[name])
        finals[name] = f
        row = " | ".join(f"{v:.3f}" for v in f)
        table.append(f"| {label} | {row} | {mean:.3f} | {sd:.3f} | "
                     f"{min(f):.3f}-{max(f):.3f} | {secs:.0f} |")
    if len(finals) == 2 and min(len(v) for v in finals.values()) > 1:
        table.append("")
        table.append(comparison("accuracy", finals["patchgd"], finals["torch"]))
        # The loss moves before the accuracy does: the finer comparison where accuracy is
        # still near chance.
        losses = [[r["epochs"][-1]["val_loss"] for r in results[n].values()]
                  for n in ("patchgd", "torch")]
        table.append("")
        table.append(comparison("validation loss", *losses))
    return "\n".join(table)


def comparison(what, a, b):
    """One line: each side's mean, the difference with its 95% interval, the rank test."""
    diff, lo, hi, df = stats.welch(a, b)
    u, p, how = stats.mann_whitney(a, b)
    return (f"{what}: patchgd {statistics.mean(a):.3f}, PyTorch {statistics.mean(b):.3f}; "
            f"patchgd - PyTorch {diff:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}] (Welch, {df:.1f} "
            f"df); Mann-Whitney U = {u:g} of {len(a) * len(b)}, two-sided p = {p:.3f} ({how})")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=list(CONFIGS), nargs="+", default=list(CONFIGS))
    p.add_argument("--patchgd", default="target/debug/patchgd")
    p.add_argument("--out", default="out/parity")
    p.add_argument("--seeds", type=int, nargs="+", help="instead of the configuration's")
    p.add_argument("--epochs", type=int, help="instead of the configuration's")
    p.add_argument("--only", choices=["patchgd", "torch"])
    p.add_argument("--again", action="store_true", help="rerun seeds already in parity.json")
    args = p.parse_args()
    for name in args.config:
        config = CONFIGS[name]
        settings = dict(config["settings"])
        if args.epochs:
            settings["epochs"] = args.epochs
        seeds = args.seeds or config["seeds"]
        out = Path(args.out) / name
        out.mkdir(parents=True, exist_ok=True)
        results = {"config": name, "settings": settings, "patchgd": {}, "torch": {}}
        earlier = out / "parity.json"
        if earlier.exists() and not args.again:
            # An interrupted bench goes on where it stopped: runs at the same settings are kept.
            old = json.loads(earlier.read_text())
            if old.get("settings") == settings:
                for side in ("patchgd", "torch"):
                    results[side] = {int(s): r for s, r in old[side].items() if int(s) in seeds}
                kept = {side: sorted(results[side]) for side in ("patchgd", "torch")}
                print(f"[{name}] kept from {earlier}: {kept} (--again runs them anew)")
        for seed in seeds:
            if args.only != "torch" and seed not in results["patchgd"]:
                print(f"[{name}] patchgd, seed {seed}", flush=True)
                results["patchgd"][seed] = run_patchgd(args.patchgd, config["pipeline"],
                                                       settings, seed,
                                                       str(out / f"patchgd-{seed}"))
            if args.only != "patchgd" and seed not in results["torch"]:
                print(f"[{name}] PyTorch, seed {seed}", flush=True)
                results["torch"][seed] = run_torch(config["data"], settings, seed)
            # Written after every run, so that an interrupted bench keeps what it measured.
            (out / "parity.json").write_text(json.dumps(results, indent=1))
        text = tables(results, seeds)
        print(f"\n[{name}] final validation accuracy, "
              + ", ".join(f"{k}={v}" for k, v in settings.items()))
        print(text, flush=True)
        results["table"] = text
        (out / "parity.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
