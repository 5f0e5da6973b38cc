"""The parity bench: the same PatchGD configuration trained by patchgd and by plain PyTorch
(patchgd_torch.py, the implementation the step test checks patchgd against), a few seeds each,
side by side with their spread (docs/benchmarks.md, "Parity with PyTorch").

    scripts/parity                        # the demo's settings, seeds 42 43 44 (~35 min on 2 cores)
    .venv/bin/python3 tests/twin/parity.py --seeds 42 --epochs 1   # a quick look

Both sides read the demo's data set (`patchgd synth ultramnist --config pipelines/ultramnist.yaml`)
and get every setting from SETTINGS below: patchgd as `--set` overrides of the pipeline file.
Prints a Markdown table and writes it, with every epoch's figures, to OUT/parity.json.
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

# The demo's configuration (pipelines/ultramnist.yaml), key by key.
SETTINGS = {
    "patch": 32,
    "backbone": "small_cnn",
    "latent_dim": 64,
    "head_width": 64,
    "head_dropout": 0.2,
    "epochs": 5,
    "batch_size": 16,
    "lr": 0.003,
    "warmup_epochs": 1.0,
    "rho": 0.25,
    "accumulation": "zeta",
    "fill_chunk": 512,
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


def run_patchgd(exe, pipeline, settings, seed, out):
    sets = [f"{PIPELINE_KEYS[k]}={v}" for k, v in settings.items()]
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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pipeline", default="pipelines/ultramnist.yaml")
    p.add_argument("--data", default="data/ultramnist")
    p.add_argument("--patchgd", default="target/debug/patchgd")
    p.add_argument("--out", default="out/parity")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    p.add_argument("--epochs", type=int, default=SETTINGS["epochs"])
    p.add_argument("--only", choices=["patchgd", "torch"])
    args = p.parse_args()
    settings = dict(SETTINGS, epochs=args.epochs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"settings": settings, "patchgd": {}, "torch": {}}
    for seed in args.seeds:
        if args.only != "torch":
            print(f"patchgd, seed {seed}", flush=True)
            results["patchgd"][seed] = run_patchgd(args.patchgd, args.pipeline, settings, seed,
                                                   str(out / f"patchgd-{seed}"))
        if args.only != "patchgd":
            print(f"PyTorch, seed {seed}", flush=True)
            results["torch"][seed] = run_torch(args.data, settings, seed)
    seeds = " | ".join(f"seed {s}" for s in args.seeds)
    table = [f"| implementation | {seeds} | mean | sd | min-max | median s per run |",
             "|---|" + "---|" * (len(args.seeds) + 4)]
    for name, label in [("patchgd", "patchgd"), ("torch", "PyTorch (tests/twin)")]:
        if not results[name]:
            continue
        finals, mean, sd, secs = summary(results[name])
        cells = " | ".join(f"{v:.3f}" for v in finals)
        table.append(f"| {label} | {cells} | {mean:.3f} | {sd:.3f} | "
                     f"{min(finals):.3f}-{max(finals):.3f} | {secs:.0f} |")
    text = "\n".join(table)
    print("\nFinal validation accuracy, " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    print(text)
    results["table"] = text
    (out / "parity.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
