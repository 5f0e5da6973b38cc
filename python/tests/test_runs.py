"""patchgd.run and patchgd.predict against the command line; errors; Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow.parquet as pq
import pytest

import patchgd
from conftest import ROOT, run_cli

# Columns that hold time, not results.
TIMING = {"seconds", "patches_per_s", "images_per_s", "wall_seconds", "peak_rss_bytes"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, patchgd_bin):
    """128 px UltraMNIST, 2 classes, 32 training and 8 validation images; a pipeline for it."""
    folder = tmp_path_factory.mktemp("tiny")
    r = run_cli(patchgd_bin, "synth", "ultramnist", "--out", str(folder / "data"), "--size", "128",
                "--classes", "2", "--train", "32", "--val", "8", "--seed", "3")
    assert r.returncode == 0, r.stderr
    pipeline = folder / "tiny.yaml"
    pipeline.write_text(textwrap.dedent(f"""\
        name: tiny
        source:
          images: {folder}/data/images
          labels: {folder}/data/labels.csv
          channels: 1
          normalize: mnist
        patch:
          size: 32
          foreground: {{background: dark, threshold: 32}}
        model: {{backbone: small_cnn, latent_dim: 16, head_width: 16}}
        patchgd: {{sampling_fraction: 0.5}}
        train: {{epochs: 2, batch_size: 8, lr: 0.003, device: cpu, seed: 5}}
        checkpoint: {{every_steps: 1}}
        output: {folder}/out
        """))
    return folder, pipeline


def comparable(path):
    t = pq.read_table(path)
    return t.drop_columns([c for c in t.column_names if c in TIMING])


def test_run_and_predict_write_what_the_cli_writes(tiny, patchgd_bin):
    folder, pipeline = tiny
    events = []
    summary = patchgd.run(str(pipeline), {"output": str(folder / "py")}, fresh=True,
                          progress=lambda event, value: events.append(event))
    r = run_cli(patchgd_bin, "run", str(pipeline), "--fresh", "--no-progress", "--set",
                f"output={folder / 'cli'}")
    assert r.returncode == 0, r.stderr
    cli_summary = json.loads((folder / "cli" / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["images_seen"] == 40
    for key in ("final_val_accuracy", "final_val_loss", "images_used", "images_failed"):
        assert summary[key] == cli_summary[key], key
    assert comparable(folder / "py" / "metrics.parquet").equals(
        comparable(folder / "cli" / "metrics.parquet"))
    assert {"note", "epoch", "images", "metrics", "finished"} <= set(events)

    images = str(folder / "data" / "images")
    preds = patchgd.predict(str(folder / "py"), images, str(folder / "py-pred"), progress=False)
    r = run_cli(patchgd_bin, "predict", "--model", str(folder / "cli"), "--images", images,
                "--output", str(folder / "cli-pred"))
    assert r.returncode == 0, r.stderr
    assert preds.num_rows == 40
    cli_preds = pq.read_table(folder / "cli-pred" / "predictions.parquet")
    key = [("image_id", "ascending")]
    assert preds.sort_by(key).drop_columns([]).select(cli_preds.column_names).equals(
        cli_preds.sort_by(key))
    assert json.loads(preds.schema.metadata[b"patchgd.summary"])["images_predicted"] == 40


def test_a_bad_pipeline_key_and_a_missing_file_raise_patchgd_errors(tiny):
    _, pipeline = tiny
    with pytest.raises(patchgd.PatchgdError, match="learning_rate"):
        patchgd.run(str(pipeline), {"train.learning_rate": 0.1}, progress=False)
    with pytest.raises(patchgd.PatchgdError, match="nope.yaml"):
        patchgd.run("nope.yaml", progress=False)
    with pytest.raises(patchgd.PatchgdError, match="device='tpu'"):
        patchgd.predict("out/x", "data/", device="tpu", progress=False)


CTRL_C = """
import sys, patchgd
def progress(event, value):
    if event == "images":
        print("images", value, flush=True)
try:
    patchgd.run(sys.argv[1], {"output": sys.argv[2], "train.epochs": 3}, fresh=True,
                progress=progress)
    print("finished", flush=True)
except KeyboardInterrupt as e:
    print("interrupted:", e, flush=True)
"""


def test_ctrl_c_stops_after_a_step_with_a_checkpoint_and_the_run_resumes(tiny):
    folder, pipeline = tiny
    out = folder / "interrupted"
    child = subprocess.Popen([sys.executable, "-c", CTRL_C, str(pipeline), str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=ROOT)
    for line in child.stdout:
        if line.startswith("images"):
            child.send_signal(signal.SIGINT)
            break
    rest, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert "interrupted: stopped at step" in rest, rest + err
    step = int(rest.split("stopped at step ")[1].split()[0])
    assert step >= 1
    # The run resumes from the checkpoint written at that step, and finishes.
    notes = []
    summary = patchgd.run(str(pipeline), {"output": str(out), "train.epochs": 3},
                          progress=lambda e, v: notes.append(v) if e == "note" else None)
    assert any(f"optimizer step {step}," in n and n.startswith("resuming from") for n in notes), notes
    assert summary["epochs"] == 3
