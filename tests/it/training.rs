//! End to end: a pipeline file over a generated set, run by the runner, learns.

use std::sync::{Arc, Mutex};

use patchgd::pipeline::{Definition, RunObserver, RunOptions, run, run_with};
use patchgd::sink::EpochMetrics;
use patchgd::storage::Location;

use crate::common::{memory_url, pipeline_yaml, read_parquet, safetensors_header, square_dataset};

fn column_f64(batches: &[arrow::record_batch::RecordBatch], name: &str) -> Vec<f64> {
    batches
        .iter()
        .flat_map(|b| {
            let c = b
                .column_by_name(name)
                .unwrap()
                .as_any()
                .downcast_ref::<arrow::array::Float64Array>()
                .unwrap();
            c.values().to_vec()
        })
        .collect()
}

/// Everything a run reports, for the test to compare with what it wrote.
#[derive(Default)]
struct Recorder(Mutex<Heard>);

#[derive(Default)]
struct Heard {
    notes: Vec<String>,
    started: Vec<String>,
    most_images: usize,
    epochs: Vec<EpochMetrics>,
}

impl RunObserver for Recorder {
    fn note(&self, line: &str) {
        self.0.lock().unwrap().notes.push(line.to_string());
    }
    fn epoch_started(&self, label: &str, _images: usize) {
        self.0.lock().unwrap().started.push(label.to_string());
    }
    fn images_done(&self, images: usize) {
        let mut h = self.0.lock().unwrap();
        h.most_images = h.most_images.max(images);
    }
    fn epoch_finished(&self, metrics: &EpochMetrics) {
        self.0.lock().unwrap().epochs.push(metrics.clone());
    }
}

#[test]
fn tiny_cnn_lowers_the_loss_and_beats_chance_on_held_out_images() {
    let root = memory_url("training");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (images, labels) = rt.block_on(square_dataset(&root, 64, 14, 96, 48, 3));
    let out = format!("{root}/out");
    let def = Definition::from_yaml(
        &pipeline_yaml(&images, &labels, &out, 16, 6, ""),
        "training.yaml",
    )
    .unwrap();
    let observer = Arc::new(Recorder::default());
    let options = RunOptions {
        observer: Some(observer.clone()),
        ..Default::default()
    };
    let summary = run_with(&def, &options).unwrap();
    let loc = Location::parse(&out).unwrap();
    let metrics = rt.block_on(read_parquet(&loc, "metrics.parquet"));
    let loss = column_f64(&metrics, "train_loss");
    assert_eq!(loss.len(), 6);
    // The observer heard every epoch, with the metrics the run wrote, and progress up to all
    // 144 images of each epoch.
    let seen = observer.0.lock().unwrap();
    let heard: Vec<f64> = seen.epochs.iter().map(|m| m.train_loss).collect();
    assert_eq!(heard, loss);
    assert_eq!(
        seen.started,
        (1..=6).map(|e| format!("epoch {e}/6")).collect::<Vec<_>>()
    );
    assert_eq!(seen.most_images, 144);
    assert!(
        seen.notes[0].contains("96 train / 48 val images"),
        "{:?}",
        seen.notes
    );
    assert!(
        loss[5] < loss[0] * 0.8,
        "training loss did not fall: {loss:?}"
    );
    // 48 held-out images, 2 balanced classes: chance is 0.5.
    assert!(
        summary.final_val_accuracy >= 0.8,
        "validation accuracy {} is not well above chance",
        summary.final_val_accuracy
    );
    assert_eq!(
        (
            summary.images_seen,
            summary.images_used,
            summary.images_failed
        ),
        (144, 144, 0)
    );
    // The run's other outputs exist and are what they claim to be.
    let preds = rt.block_on(read_parquet(&loc, "predictions.parquet"));
    assert_eq!(preds.iter().map(|b| b.num_rows()).sum::<usize>(), 48);
    let png = rt
        .block_on(loc.get_relative("learning_curves.png"))
        .unwrap();
    assert!(image::load_from_memory(&png).is_ok());
    let weights = rt.block_on(loc.get_relative("model.safetensors")).unwrap();
    let header = safetensors_header(&weights);
    assert!(
        header.get("head.classifier.weight").is_some()
            && header.get("backbone.project.weight").is_some()
    );
    let csv = rt.block_on(loc.get_relative("metrics.csv")).unwrap();
    assert_eq!(String::from_utf8_lossy(&csv).lines().count(), 7);
}

#[test]
fn gd_baseline_runs_from_the_same_definition() {
    let root = memory_url("training-gd");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (images, labels) = rt.block_on(square_dataset(&root, 64, 14, 32, 16, 4));
    let out = format!("{root}/out");
    let yaml = pipeline_yaml(&images, &labels, &out, 16, 1, "");
    let def =
        Definition::from_yaml_with_overrides(&yaml, "gd.yaml", &["method=gd", "gd.image_size=32"])
            .unwrap();
    let summary = run(&def).unwrap();
    assert_eq!(summary.images_used, 48);
    let weights = rt
        .block_on(
            Location::parse(&out)
                .unwrap()
                .get_relative("model.safetensors"),
        )
        .unwrap();
    let header = safetensors_header(&weights);
    assert!(
        header.get("classifier.weight").is_some() && header.get("head.classifier.weight").is_none()
    );
}

#[test]
fn spooled_images_train_to_the_same_weights_as_images_held_in_memory() {
    let root = memory_url("training-spool");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (images, labels) = rt.block_on(square_dataset(&root, 64, 14, 24, 8, 5));
    let mut weights = Vec::new();
    for (name, spool) in [("memory", "16"), ("spooled", "0")] {
        let out = format!("{root}/out-{name}");
        let def = Definition::from_yaml_with_overrides(
            &pipeline_yaml(&images, &labels, &out, 16, 2, ""),
            "spool.yaml",
            &[&format!("train.spool_above_mib={spool}")],
        )
        .unwrap();
        let summary = run(&def).unwrap();
        // 24 training images x 2 epochs + 8 validation images x 2 evaluations.
        let expected = if spool == "0" { 64 } else { 0 };
        assert_eq!(summary.images_spooled, expected, "{name}");
        let loc = Location::parse(&out).unwrap();
        weights.push(rt.block_on(loc.get_relative("model.safetensors")).unwrap());
    }
    assert!(
        weights[0] == weights[1],
        "spooling changed the trained weights"
    );
}

#[test]
fn mixed_precision_on_the_cpu_is_refused_by_name() {
    let root = memory_url("training-f16");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (images, labels) = rt.block_on(square_dataset(&root, 32, 8, 4, 2, 6));
    let def = Definition::from_yaml_with_overrides(
        &pipeline_yaml(&images, &labels, &format!("{root}/out"), 16, 1, ""),
        "f16.yaml",
        &["train.precision=f16"],
    )
    .unwrap();
    let err = run(&def).unwrap_err().to_string();
    assert!(
        err.contains("train.precision f16") && err.contains("cpu"),
        "{err}"
    );
}

#[test]
fn bf16_training_tracks_f32_and_saves_f32_weights() {
    let root = memory_url("training-bf16");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (images, labels) = rt.block_on(square_dataset(&root, 64, 14, 48, 16, 8));
    let mut losses = Vec::new();
    let mut accuracies = Vec::new();
    let mut weights = Vec::new();
    for precision in ["f32", "bf16"] {
        let out = format!("{root}/out-{precision}");
        let def = Definition::from_yaml_with_overrides(
            &pipeline_yaml(&images, &labels, &out, 16, 3, ""),
            "bf16.yaml",
            &[&format!("train.precision={precision}")],
        )
        .unwrap();
        accuracies.push(run(&def).unwrap().final_val_accuracy);
        let loc = Location::parse(&out).unwrap();
        let metrics = rt.block_on(read_parquet(&loc, "metrics.parquet"));
        losses.push(column_f64(&metrics, "train_loss"));
        weights.push(rt.block_on(loc.get_relative("model.safetensors")).unwrap());
    }
    // The checkpointed weights are the fp32 masters, in the same layout as an f32 run's.
    let (f32_header, bf16_header) = (
        safetensors_header(&weights[0]),
        safetensors_header(&weights[1]),
    );
    for (name, entry) in bf16_header.as_object().unwrap() {
        if name == "__metadata__" {
            continue;
        }
        assert_eq!(entry["dtype"], "F32", "{name}");
        assert_eq!(entry["shape"], f32_header[name]["shape"], "{name}");
    }
    // bf16 really computed (the weights differ from f32's), and learned as f32 did. (Loss
    // curves are not compared epoch by epoch: bf16's rounding sends a 6-step epoch on 48
    // images down another path, as it does in PyTorch.)
    assert!(weights[0] != weights[1], "bf16 trained exactly like f32");
    for (precision, loss, accuracy) in [
        ("f32", &losses[0], accuracies[0]),
        ("bf16", &losses[1], accuracies[1]),
    ] {
        assert!(
            loss[2] < loss[0] * 0.9,
            "{precision} training loss did not fall: {loss:?}"
        );
        // 16 held-out images, 2 balanced classes: chance is 0.5.
        assert!(
            accuracy >= 0.75,
            "{precision} validation accuracy {accuracy}"
        );
    }
}

/// Every f32 of a safetensors file's tensors (all are F32 here).
fn safetensors_values(bytes: &[u8]) -> Vec<(String, Vec<f32>)> {
    let header = safetensors_header(bytes);
    let start = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .map(|(name, entry)| {
            let offsets = &entry["data_offsets"];
            let (a, b) = (
                offsets[0].as_u64().unwrap() as usize,
                offsets[1].as_u64().unwrap() as usize,
            );
            let values = bytes[start + a..start + b]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name.clone(), values)
        })
        .collect()
}

#[test]
fn a_one_cell_image_alone_in_its_batch_leaves_every_batchnorm_finite() {
    // Found with odd inputs: a 16 x 16 px training image with 16 px patches is a one-cell grid,
    // and alone in its mini-batch (images of another grid shape never share one) the backbone's
    // last block sees one value per channel. Training-mode BatchNorm then wrote NaN into
    // `backbone.block4.bn.running_var`, and every later prediction was NaN.
    let root = memory_url("training-one-cell");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (images, labels) = rt.block_on(square_dataset(&root, 64, 14, 16, 8, 12));
    let loc = Location::parse(&root).unwrap();
    let tiny: Vec<u8> = (0..256).map(|i| (i * 7 % 200) as u8).collect();
    rt.block_on(async {
        loc.put(
            "images/train/tiny.png",
            patchgd::source::decode::encode_png(16, 16, 1, &tiny),
        )
        .await
        .unwrap();
        let mut csv =
            String::from_utf8(loc.get_relative("labels.csv").await.unwrap().to_vec()).unwrap();
        csv.push_str("train/tiny,1,train\n");
        loc.put("labels.csv", csv).await.unwrap();
    });
    let out = format!("{root}/out");
    let def = Definition::from_yaml(
        &pipeline_yaml(&images, &labels, &out, 16, 2, ""),
        "one-cell.yaml",
    )
    .unwrap();
    let summary = run(&def).unwrap();
    assert_eq!(summary.images_used, 25);
    assert!(
        summary.final_val_loss.is_finite(),
        "{}",
        summary.final_val_loss
    );
    let out = Location::parse(&out).unwrap();
    let weights = rt.block_on(out.get_relative("model.safetensors")).unwrap();
    for (name, values) in safetensors_values(&weights) {
        assert!(values.iter().all(|v| v.is_finite()), "{name} is not finite");
    }
}

#[test]
fn a_run_that_diverges_stops_with_an_error_naming_where_and_writes_no_nan() {
    let root = memory_url("training-diverge");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (images, labels) = rt.block_on(square_dataset(&root, 64, 14, 32, 8, 13));
    let out = format!("{root}/out");
    // A learning rate no one means: the weights explode within a few steps.
    let def = Definition::from_yaml_with_overrides(
        &pipeline_yaml(&images, &labels, &out, 16, 2, ""),
        "diverge.yaml",
        &[
            "train.lr=1e30",
            "train.warmup_epochs=0",
            "checkpoint.every_steps=1",
        ],
    )
    .unwrap();
    let err = run(&def).unwrap_err();
    let message = err.to_string();
    let patchgd::pipeline::runner::RunError::Train(patchgd::train::TrainError::NonFinite(e)) = &err
    else {
        panic!("expected a non-finite error, got: {message}");
    };
    assert_eq!(e.epoch, 1, "{message}");
    assert!(e.step >= 1, "{message}");
    // The batch's images are named (batch size 8), and so are epoch and step.
    assert_eq!(e.images.len(), 8, "{message}");
    assert!(
        e.images.iter().all(|id| id.starts_with("train/")),
        "{message}"
    );
    assert!(
        message.contains("in epoch 1")
            && message.contains(&format!("training step {}", e.step))
            && message.contains(&e.images[0]),
        "{message}"
    );
    // Nothing with NaN was written: no weights, no metrics (the first epoch never finished),
    // and every checkpoint holds finite weights.
    let loc = Location::parse(&out).unwrap();
    assert!(rt.block_on(loc.get_relative("model.safetensors")).is_err());
    assert!(rt.block_on(loc.get_relative("metrics.parquet")).is_err());
    let checkpoints = rt.block_on(async {
        let ckpt = Location::parse(&def.checkpoint_url()).unwrap();
        let mut found = Vec::new();
        for meta in ckpt.list().await.unwrap() {
            if meta.location.as_ref().ends_with("model.safetensors") {
                found.push(ckpt.get(&meta.location).await.unwrap());
            }
        }
        found
    });
    for bytes in checkpoints {
        for (name, values) in safetensors_values(&bytes) {
            assert!(values.iter().all(|v| v.is_finite()), "checkpoint {name}");
        }
    }
}

/// The checksum data-parallel ranks compare (docs/distributed.md) sees every weight and
/// BatchNorm statistic: changing any one value changes it.
#[test]
fn the_weights_checksum_changes_with_any_single_value() {
    let yaml = pipeline_yaml(
        "memory://x/images",
        "memory://x/l.csv",
        "memory://x/o",
        16,
        1,
        "",
    );
    let def = Definition::from_yaml(&yaml, "p.yaml").unwrap();
    let trainer =
        patchgd::pipeline::setup::build_trainer(&def, def.model_spec(2), tch::Device::Cpu, 8)
            .unwrap();
    let before = trainer.weights_checksum();
    assert_eq!(
        before,
        trainer.weights_checksum(),
        "not a function of the weights"
    );
    // A group of one agrees with itself.
    trainer.check_ranks_agree("now").unwrap();
    for (name, t) in trainer.model.named_tensors() {
        if t.kind() != tch::Kind::Float {
            continue;
        }
        let old = t.flatten(0, -1).double_value(&[0]);
        let _ = tch::no_grad(|| t.flatten(0, -1).get(0).fill_(old + 1e-3));
        assert_ne!(
            trainer.weights_checksum(),
            before,
            "'{name}' is not in the checksum"
        );
        let _ = tch::no_grad(|| t.flatten(0, -1).get(0).fill_(old));
        assert_eq!(
            trainer.weights_checksum(),
            before,
            "'{name}' did not restore"
        );
    }
}
