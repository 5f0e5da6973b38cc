//! Checkpoints and exact resume: a run killed with SIGKILL and resumed ends bit-identical to an
//! uninterrupted one; a corrupt newest checkpoint falls back to an older one and still ends the
//! same; a changed pipeline file is refused by key; `--fresh` starts over.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use arrow::array::{Array, Float64Array, UInt64Array};
use patchgd::pipeline::{Definition, RunOptions, run_with};
use patchgd::rng::Rng;
use patchgd::state::checkpoint;
use patchgd::storage::Location;

use crate::common::{pipeline_yaml, read_parquet, square_dataset};

/// A small file:// data set and a pipeline over it with a checkpoint after every optimizer step
/// and latent reuse on (so that a resume also depends on the restored latent store).
fn setup(dir: &std::path::Path, name: &str, out: &str) -> std::path::PathBuf {
    let root = dir.join("data").display().to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (images, labels) = rt.block_on(square_dataset(&root, 32, 8, 24, 8, 5));
    let yaml = pipeline_yaml(&images, &labels, out, 16, 3, "")
        .replace("batch_size: 8", "batch_size: 4")
        + "checkpoint:\n  every_steps: 1\n  keep: 2\nlatent:\n  reuse: true\n  max_age_steps: 6\n";
    let file = dir.join(name);
    std::fs::write(&file, yaml).unwrap();
    file
}

fn patchgd(file: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_patchgd"));
    c.args(["run", file.to_str().unwrap(), "--no-progress"]);
    c
}

/// Metrics without the timing and memory columns (those differ between any two runs).
fn metrics(out: &str) -> Vec<Vec<String>> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let batches = rt.block_on(read_parquet(
        &Location::parse(out).unwrap(),
        "metrics.parquet",
    ));
    let b = &batches[0];
    let mut rows = vec![Vec::new(); b.num_rows()];
    for name in [
        "epoch",
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "val_qwk",
        "lr",
        "optimizer_steps",
    ] {
        let col = b.column_by_name(name).unwrap();
        for (i, row) in rows.iter_mut().enumerate() {
            let v = if let Some(f) = col.as_any().downcast_ref::<Float64Array>() {
                format!("{:?}", f.value(i))
            } else {
                col.as_any()
                    .downcast_ref::<UInt64Array>()
                    .unwrap()
                    .value(i)
                    .to_string()
            };
            row.push(format!("{name}={v}"));
        }
    }
    rows
}

#[test]
fn a_run_killed_with_sigkill_resumes_to_bit_identical_weights_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let reference_out = dir.path().join("reference").display().to_string();
    let killed_out = dir.path().join("killed").display().to_string();
    let reference = setup(dir.path(), "reference.yaml", &reference_out);
    let killed = setup(dir.path(), "killed.yaml", &killed_out);

    let status = patchgd(&reference).output().unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );

    let mut child = patchgd(&killed)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ckpt = Location::parse(&format!("{killed_out}/checkpoints")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Kill at a (seeded) random point: a few milliseconds after checkpoint `target` of the 18
    // appears, so at least six steps are left whatever the machine's speed.
    let mut rng = Rng::new(2026);
    let target = 1 + rng.below(11) as i64;
    let waiting = Instant::now();
    while rt
        .block_on(checkpoint::complete_steps(&ckpt))
        .unwrap()
        .first()
        .is_none_or(|&s| (s as i64) < target)
    {
        assert!(
            waiting.elapsed() < Duration::from_secs(120),
            "checkpoint {target} did not appear"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(rng.below(20)));
    child.kill().unwrap(); // SIGKILL
    let killed_status = child.wait().unwrap();
    assert!(
        !killed_status.success(),
        "the run finished before it was killed; the test proves nothing"
    );
    let steps_at_kill = rt.block_on(checkpoint::complete_steps(&ckpt)).unwrap();
    assert!(!steps_at_kill.is_empty());

    let resumed = patchgd(&killed).output().unwrap();
    let log = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{log}");
    assert!(log.contains("resuming from"), "{log}");

    let weights = |out: &str| std::fs::read(format!("{out}/model.safetensors")).unwrap();
    assert!(
        weights(&reference_out) == weights(&killed_out),
        "weights differ after resuming from step {steps_at_kill:?}"
    );
    assert_eq!(metrics(&reference_out), metrics(&killed_out));
}

#[test]
fn a_corrupt_newest_checkpoint_falls_back_to_an_older_one_and_still_ends_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run").display().to_string();
    let file = setup(dir.path(), "p.yaml", &out);
    let def = Definition::from_file(&file).unwrap();
    let quiet = RunOptions::default();
    run_with(&def, &quiet).unwrap();
    let first = std::fs::read(format!("{out}/model.safetensors")).unwrap();
    let ckpt = Location::parse(&format!("{out}/checkpoints")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let steps = rt.block_on(checkpoint::complete_steps(&ckpt)).unwrap();
    assert_eq!(steps.len(), 2, "keep: 2");
    // Pruned checkpoints leave no empty directories behind.
    assert_eq!(
        std::fs::read_dir(format!("{out}/checkpoints"))
            .unwrap()
            .count(),
        2
    );
    // Newest (the finished run): one flipped byte. Plus a newer directory with no manifest,
    // as a crash while writing leaves it.
    let newest = format!(
        "{out}/checkpoints/{}/model.safetensors",
        checkpoint::dir_name(steps[0])
    );
    let mut bytes = std::fs::read(&newest).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xFF;
    std::fs::write(&newest, bytes).unwrap();
    let partial = dir
        .path()
        .join(format!("run/checkpoints/{}", checkpoint::dir_name(10_000)));
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("model.safetensors"), b"half").unwrap();
    let (loaded, skipped) = rt.block_on(checkpoint::newest(&ckpt)).unwrap();
    assert_eq!(loaded.unwrap().manifest.step, steps[1]);
    let message = skipped[0].to_string();
    assert!(
        message.contains(&checkpoint::dir_name(steps[0]))
            && message.contains("model.safetensors")
            && message.contains("checksum"),
        "{message}"
    );
    // Resuming from the older checkpoint redoes the last step and ends identical.
    std::fs::remove_file(format!("{out}/model.safetensors")).unwrap();
    run_with(&def, &quiet).unwrap();
    assert!(std::fs::read(format!("{out}/model.safetensors")).unwrap() == first);
}

/// Two byte strings equal, or how many bytes differ (for the message).
fn differing_bytes(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x != y).count() + a.len().abs_diff(b.len())
}

#[test]
fn a_bf16_resume_restores_its_state_exactly_and_ends_identical_wherever_bf16_is_deterministic() {
    // What a bf16 resume guarantees (docs/checkpoints.md): the resumed process starts from the
    // checkpoint's exact state (fp32 masters, the bf16 copies rounded from them, Adam's
    // moments); from there it computes as any bf16 run does. Where two uninterrupted bf16 runs
    // end byte-identical (CPUs without native bf16; with oneDNN's deterministic mode, those with
    // it too), a resumed run must as well. No assertion depends on which CPU runs the test.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run").display().to_string();
    let file = setup(dir.path(), "p.yaml", &out);
    let yaml = std::fs::read_to_string(&file).unwrap();
    let def = Definition::from_yaml_with_overrides(&yaml, "bf16.yaml", &["train.precision=bf16"])
        .unwrap();
    let quiet = RunOptions::default();
    run_with(&def, &quiet).unwrap();
    let first = std::fs::read(format!("{out}/model.safetensors")).unwrap();
    let ckpt = Location::parse(&format!("{out}/checkpoints")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let steps = rt.block_on(checkpoint::complete_steps(&ckpt)).unwrap();
    let older = format!("{out}/checkpoints/{}", checkpoint::dir_name(steps[1]));

    // 1. Everywhere: restoring the older checkpoint reproduces its state bit for bit, and each
    //    bf16 compute copy is its restored master rounded (a stale copy would compute with
    //    other weights than the checkpoint holds).
    let read = |name: &str| tch::Tensor::read_safetensors(format!("{older}/{name}")).unwrap();
    let (weights, moments) = (read("model.safetensors"), read("optimizer.safetensors"));
    let spec = patchgd::model::ModelSpec {
        method: patchgd::model::Method::Patchgd,
        backbone: def.model.backbone,
        channels: 1,
        latent_dim: def.model.latent_dim,
        head_width: def.model.head_width,
        classes: 2,
        head_dropout: def.model.head_dropout,
    };
    // Another seed: every restored value must come from the checkpoint, none from the init.
    let mut other = def.clone();
    other.train.seed += 1;
    let mut trainer =
        patchgd::pipeline::setup::build_trainer(&other, spec, tch::Device::Cpu, 24).unwrap();
    trainer
        .restore(&weights, &moments, steps[1] as i64, 0, [1, 2, 3, 4])
        .unwrap();
    let by_name = |v: &[(String, tch::Tensor)], n: &str| -> tch::Tensor {
        v.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone()
    };
    for (name, t) in trainer.model.named_tensors() {
        assert!(
            t.equal(&by_name(&weights, &name)),
            "restored {name} differs"
        );
    }
    let params = trainer.model.trainable();
    assert!(params.iter().any(|p| p.compute.is_some()), "no bf16 copies");
    for p in &params {
        if let Some(copy) = &p.compute {
            let rounded = p.master.to_kind(tch::Kind::BFloat16);
            assert!(copy.equal(&rounded), "{}'s bf16 copy is stale", p.name);
        }
    }
    for (name, t) in trainer.optimizer.state() {
        assert!(t.equal(&by_name(&moments, &name)), "restored moment {name}");
    }

    // 2. Where bf16 is deterministic, resuming ends where the uninterrupted run ended.
    let again = dir.path().join("again").display().to_string();
    let mut twice = def.clone();
    twice.output = again.clone();
    run_with(&twice, &quiet).unwrap();
    let second = std::fs::read(format!("{again}/model.safetensors")).unwrap();
    std::fs::remove_dir_all(format!(
        "{out}/checkpoints/{}",
        checkpoint::dir_name(steps[0])
    ))
    .unwrap();
    std::fs::remove_file(format!("{out}/model.safetensors")).unwrap();
    run_with(&def, &quiet).unwrap();
    let resumed = std::fs::read(format!("{out}/model.safetensors")).unwrap();
    if second == first {
        assert!(
            resumed == first,
            "bf16 is deterministic here, but the resumed run differs in {} bytes",
            differing_bytes(&resumed, &first)
        );
    } else {
        eprintln!(
            "bf16 is not bit-reproducible on this CPU (two uninterrupted runs differ in {} bytes): \
             only the exact restore was checked",
            differing_bytes(&second, &first)
        );
    }
}

#[test]
fn a_changed_pipeline_is_refused_by_key_and_fresh_starts_over() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run").display().to_string();
    let file = setup(dir.path(), "p.yaml", &out);
    let text = std::fs::read_to_string(&file).unwrap();
    let quiet = RunOptions::default();
    let short = Definition::from_yaml_with_overrides(&text, "p.yaml", &["train.epochs=1"]).unwrap();
    run_with(&short, &quiet).unwrap();
    let changed =
        Definition::from_yaml_with_overrides(&text, "p.yaml", &["train.epochs=1", "train.lr=0.01"])
            .unwrap();
    let err = run_with(&changed, &quiet).unwrap_err().to_string();
    assert!(
        err.contains("'train.lr'") && err.contains("--fresh"),
        "{err}"
    );
    // Harmless changes resume (here: the finished run, whose outputs are written again).
    let harmless = Definition::from_yaml_with_overrides(
        &text,
        "p.yaml",
        &["train.epochs=1", "source.decode_workers=1", "name=renamed"],
    )
    .unwrap();
    let again = run_with(&harmless, &quiet).unwrap();
    let before = run_with(&short, &quiet).unwrap();
    assert_eq!(again.final_val_accuracy, before.final_val_accuracy);
    // With an explicit decay horizon, a finished run can be continued for more epochs.
    let out2 = format!("{out}-longer");
    let one = Definition::from_yaml_with_overrides(
        &text,
        "p.yaml",
        &[
            "train.epochs=1",
            "train.decay_epochs=4",
            &format!("output={out2}"),
        ],
    )
    .unwrap();
    run_with(&one, &quiet).unwrap();
    let two = Definition::from_yaml_with_overrides(
        &text,
        "p.yaml",
        &[
            "train.epochs=2",
            "train.decay_epochs=4",
            &format!("output={out2}"),
        ],
    )
    .unwrap();
    let s = run_with(&two, &quiet).unwrap();
    assert_eq!(s.epochs, 2);
    let rows = metrics(&out2);
    assert_eq!(
        rows.len(),
        2,
        "epoch 1 kept from the checkpoint, epoch 2 trained"
    );
    // ... and it is exact: the same as training 2 epochs at once.
    let out3 = format!("{out}-direct");
    let direct = Definition::from_yaml_with_overrides(
        &text,
        "p.yaml",
        &[
            "train.epochs=2",
            "train.decay_epochs=4",
            &format!("output={out3}"),
        ],
    )
    .unwrap();
    run_with(&direct, &quiet).unwrap();
    let weights = |o: &str| std::fs::read(format!("{o}/model.safetensors")).unwrap();
    assert!(
        weights(&out2) == weights(&out3),
        "continued run differs from a direct one"
    );
    assert_eq!(metrics(&out2), metrics(&out3));
    // --fresh deletes the checkpoints and trains the changed pipeline from scratch.
    let fresh = RunOptions {
        fresh: true,
        ..Default::default()
    };
    run_with(&changed, &fresh).unwrap();
}

#[test]
fn latent_reuse_takes_fill_cells_from_the_store_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run").display().to_string();
    let file = setup(dir.path(), "p.yaml", &out);
    let text = std::fs::read_to_string(&file).unwrap();
    let quiet = RunOptions::default();
    let on = Definition::from_yaml_with_overrides(
        &text,
        "p.yaml",
        &["train.epochs=2", "latent.max_age_steps=1000"],
    )
    .unwrap();
    let s = run_with(&on, &quiet).unwrap();
    // 24 train + 8 val images, each a 2 x 2 grid: the store holds all 32.
    assert_eq!(s.latent_images, 32);
    // Epoch 2 finds every train image's cells from epoch 1: 24 x 4 cells reused.
    assert_eq!(s.latent_cells_reused, 24 * 4);
    // Cells are at least one step old by then: an age limit of 0 reuses none.
    let strict = Definition::from_yaml_with_overrides(
        &text,
        "p.yaml",
        &[
            "train.epochs=2",
            "latent.max_age_steps=0",
            &format!("output={out}-strict"),
        ],
    )
    .unwrap();
    assert_eq!(run_with(&strict, &quiet).unwrap().latent_cells_reused, 0);
    let off = Definition::from_yaml_with_overrides(
        &text,
        "p.yaml",
        &[
            "train.epochs=2",
            "latent.reuse=false",
            &format!("output={out}-off"),
        ],
    )
    .unwrap();
    let s = run_with(&off, &quiet).unwrap();
    assert_eq!((s.latent_cells_reused, s.latent_images), (0, 32));
}
