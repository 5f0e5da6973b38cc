//! Starting from pretrained weights: torchvision's files give torchvision's features, files
//! that do not fit are refused by name, and a run loads what it was given.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use patchgd::model::pretrained::{PretrainedError, load_backbone, read_tensors};
use patchgd::model::{BackboneKind, Method, Model, ModelSpec};
use patchgd::pipeline::{Definition, RunObserver, RunOptions, run_with};
use patchgd::storage::Location;
use tch::{Device, Tensor};

use crate::common::{memory_url, pipeline_yaml, square_dataset};

fn spec(backbone: BackboneKind) -> ModelSpec {
    ModelSpec {
        method: Method::Patchgd,
        backbone,
        channels: 3,
        latent_dim: 16,
        head_width: 8,
        classes: 4,
        head_dropout: 0.0,
    }
}

/// Seeded torchvision models, saved as a user saves them (tests/twin/export_pretrained.py).
fn exported() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let py = root.join(".venv/bin/python3");
    assert!(
        py.exists(),
        "{} is missing: run scripts/test, which sets up .venv with torch and torchvision",
        py.display()
    );
    let out = Command::new(py)
        .arg(root.join("tests/twin/export_pretrained.py"))
        .arg(tmp.path())
        .output()
        .expect("run tests/twin/export_pretrained.py");
    assert!(
        out.status.success(),
        "export_pretrained.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tmp.path().to_path_buf();
    (tmp, dir)
}

fn tensor(file: &[(String, Tensor)], name: &str) -> Tensor {
    file.iter()
        .find(|(n, _)| n == name)
        .unwrap()
        .1
        .shallow_clone()
}

#[test]
fn torchvision_state_dicts_and_safetensors_give_torchvisions_eval_features() {
    let (_tmp, dir) = exported();
    for (kind, arch, head_keys) in [
        (BackboneKind::Resnet18, "resnet18", ["fc.weight", "fc.bias"]),
        (
            BackboneKind::MobilenetV2,
            "mobilenet_v2",
            ["classifier.1.weight", "classifier.1.bias"],
        ),
    ] {
        let io = Tensor::read_safetensors(dir.join(format!("{arch}-io.safetensors"))).unwrap();
        let (x, want) = (tensor(&io, "x"), tensor(&io, "features"));
        for ext in ["pt", "safetensors"] {
            let what = format!("{arch}.{ext}");
            let bytes = std::fs::read(dir.join(&what)).unwrap();
            let file = read_tensors(&bytes, &what).unwrap();
            let model = Model::seeded(spec(kind), Device::Cpu, 1);
            let before = tch::no_grad(|| model.trunk_features(&x, false));
            let report = load_backbone(&model, &file, &what).unwrap();
            let got = tch::no_grad(|| model.trunk_features(&x, false));
            let diff = (&got - &want).abs().max().double_value(&[]);
            assert!(diff < 1e-4, "{what}: features differ by {diff}");
            let moved = (&before - &want).abs().max().double_value(&[]);
            assert!(
                moved > 1e-2,
                "{what}: the fresh model already agreed ({moved})"
            );
            // Every trunk variable loaded; the projection and the head start fresh; torchvision's
            // classifier and BatchNorm counters are not used.
            let trunk = model
                .named_tensors()
                .iter()
                .filter(|(n, _)| n.starts_with("backbone.") && !n.starts_with("backbone.project."))
                .count();
            assert_eq!(report.loaded.len(), trunk, "{what}");
            assert!(
                report
                    .fresh
                    .iter()
                    .all(|n| n.starts_with("head.") || n.starts_with("backbone.project.")),
                "{what}: {:?}",
                report.fresh
            );
            assert!(
                report
                    .fresh
                    .contains(&"backbone.project.weight".to_string())
            );
            for key in head_keys {
                assert!(report.unused.contains(&key.to_string()), "{what}: {key}");
            }
            assert!(
                report
                    .unused
                    .iter()
                    .all(|n| head_keys.contains(&n.as_str()) || n.ends_with(".num_batches_tracked")),
                "{what}: {:?}",
                report.unused
            );
            eprintln!(
                "{what}: {} loaded, max |diff| {diff:.1e}",
                report.loaded.len()
            );
        }
    }
}

#[test]
fn pretrained_files_that_do_not_fit_are_refused_naming_what_was_expected() {
    let (_tmp, dir) = exported();
    let bytes = std::fs::read(dir.join("resnet18.safetensors")).unwrap();
    let file = read_tensors(&bytes, "r18.safetensors").unwrap();
    // A resnet18 file for a resnet50: the first block's 3x3 conv meets a 1x1 one.
    let r50 = Model::seeded(spec(BackboneKind::Resnet50), Device::Cpu, 1);
    let err = load_backbone(&r50, &file, "r18.safetensors").unwrap_err();
    assert!(matches!(err, PretrainedError::Shape { .. }), "{err}");
    let msg = err.to_string();
    for part in [
        "r18.safetensors",
        "'layer1.0.conv1.weight'",
        "[64, 64, 3, 3]",
        "[64, 64, 1, 1]",
    ] {
        assert!(msg.contains(part), "{msg}: no {part}");
    }
    // Not a weights file at all.
    let err = read_tensors(b"hello, not weights", "notes.txt").unwrap_err();
    assert!(
        matches!(err, PretrainedError::UnknownLayout { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("notes.txt") && err.to_string().contains("hello"));
    // A file of other names.
    let other = vec![(
        "encoder.weight".to_string(),
        Tensor::zeros([2, 2], tch::kind::FLOAT_CPU),
    )];
    let r18 = Model::seeded(spec(BackboneKind::Resnet18), Device::Cpu, 1);
    let err = load_backbone(&r18, &other, "other.safetensors").unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, PretrainedError::NoBackboneNames { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("'encoder.weight'") && msg.contains("resnet18"),
        "{msg}"
    );
}

#[derive(Default)]
struct Notes(Mutex<Vec<String>>);

impl RunObserver for Notes {
    fn note(&self, line: &str) {
        self.0.lock().unwrap().push(line.to_string());
    }
}

/// A one-epoch run with `model_keys` added to its `model:` section, at a learning rate (1e-9)
/// that moves no weight measurably; returns its log lines.
fn run_starting_from(images: &str, labels: &str, output: &str, model_keys: &str) -> String {
    let yaml = pipeline_yaml(images, labels, output, 16, 1, "")
        .replace(
            "  head_width: 16\n",
            &format!("  head_width: 16\n{model_keys}"),
        )
        .replace("  lr: 0.003\n", "  lr: 0.000000001\n");
    let def = Definition::from_yaml(&yaml, "b.yaml").unwrap();
    let notes = Arc::new(Notes::default());
    let options = RunOptions {
        observer: Some(notes.clone()),
        ..Default::default()
    };
    run_with(&def, &options).unwrap();
    notes.0.lock().unwrap().join("\n")
}

/// The tensors of a weights file at `url`.
fn read_weights(rt: &tokio::runtime::Runtime, url: &str) -> Vec<(String, Tensor)> {
    let (loc, path) = Location::parse_object(url, &Default::default()).unwrap();
    let bytes = rt.block_on(loc.get(&path)).unwrap();
    read_tensors(&bytes, url).unwrap()
}

#[test]
fn a_run_starts_its_backbone_from_model_pretrained_and_says_what_it_loaded() {
    let root = memory_url("pretrained-run");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (images, labels) = rt.block_on(square_dataset(&root, 32, 8, 16, 8, 4));
    // A first run's weights (patchgd's own names) are the second run's pretrained backbone.
    let first = format!("{root}/first");
    let def = Definition::from_yaml(
        &pipeline_yaml(&images, &labels, &first, 16, 1, ""),
        "a.yaml",
    )
    .unwrap();
    run_with(&def, &RunOptions::default()).unwrap();
    let weights = format!("{first}/model.safetensors");
    let second = format!("{root}/second");
    let notes = run_starting_from(
        &images,
        &labels,
        &second,
        &format!("  pretrained: {weights}\n"),
    );
    // The whole backbone (4 conv-BN blocks of 5 variables, the projection's 2) loads; the head
    // (26 variables) starts fresh, and the file's head goes unused.
    for line in [
        format!("pretrained: loaded 22 tensors from {weights}"),
        "pretrained: starting fresh (26): head.block0.bn.* (4),".to_string(),
        "pretrained: not used from the file (26): head.block0.bn.* (4),".to_string(),
    ] {
        assert!(notes.contains(&line), "no '{line}' in:\n{notes}");
    }
    // With a learning rate of 1e-9, the second run ends where it started: the first run's
    // backbone (to 1e-6).
    let (a, b) = (
        read_weights(&rt, &weights),
        read_weights(&rt, &format!("{second}/model.safetensors")),
    );
    let conv = "backbone.block1.conv.weight";
    let diff = (tensor(&a, conv) - tensor(&b, conv))
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff < 1e-6, "{conv} moved by {diff}");
}

#[test]
fn a_run_started_with_init_from_continues_from_the_earlier_runs_weights() {
    let root = memory_url("init-from");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (images, labels) = rt.block_on(square_dataset(&root, 32, 8, 16, 8, 5));
    let first = format!("{root}/first");
    let def = Definition::from_yaml(
        &pipeline_yaml(&images, &labels, &first, 16, 1, ""),
        "a.yaml",
    )
    .unwrap();
    run_with(&def, &RunOptions::default()).unwrap();
    let earlier = read_weights(&rt, &format!("{first}/model.safetensors"));
    // Run B: every weight from the earlier run's output; run C: from its checkpoint, with
    // another class count, so the head starts fresh. A learning rate of 1e-9 keeps what they
    // start from.
    let checkpoints = Location::parse(&format!("{first}/checkpoints")).unwrap();
    let listed = rt.block_on(checkpoints.list()).unwrap();
    let step_dir = listed
        .iter()
        .find_map(|m| {
            let rel = checkpoints.relative(&m.location)?;
            rel.starts_with("step-")
                .then(|| rel.split('/').next().unwrap().to_string())
        })
        .expect("the first run wrote a checkpoint");
    for (name, from, extra, fresh_head) in [
        ("b", first.clone(), "", false),
        (
            "c",
            format!("{first}/checkpoints/{step_dir}"),
            "  classes: 3\n",
            true,
        ),
    ] {
        let out = format!("{root}/{name}");
        let notes = run_starting_from(
            &images,
            &labels,
            &out,
            &format!("{extra}  init_from: {from}\n"),
        );
        let loaded = if fresh_head { 22 } else { 48 };
        assert!(
            notes.contains(&format!(
                "init_from: loaded {loaded} tensors from {from}/model.safetensors"
            )),
            "{name}: {notes}"
        );
        assert_eq!(
            notes.contains("init_from: the head starts fresh: 'head.classifier.bias' has shape [2] in the earlier run and [3] here"),
            fresh_head,
            "{name}: {notes}"
        );
        let now = read_weights(&rt, &format!("{out}/model.safetensors"));
        for (var, same) in [
            ("backbone.block1.conv.weight", true),
            ("head.block0.conv.weight", !fresh_head),
        ] {
            let diff = (tensor(&earlier, var) - tensor(&now, var))
                .abs()
                .max()
                .double_value(&[]);
            assert_eq!(diff < 1e-6, same, "{name}: {var} differs by {diff}");
        }
    }
}
