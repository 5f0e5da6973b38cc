//! patchgd against PyTorch: one PatchGD outer step and one GD step, from the same initial
//! weights, batch and cell permutation, must give the same gradients, BatchNorm statistics and
//! Adam updates as plain PyTorch (tests/twin/check_step.py, run with .venv's torch); the
//! learning-rate schedule must be PyTorch's schedulers'; and the initial weights must come from
//! PyTorch's (torchvision's) distributions. scripts/test installs what the script needs.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;

use patchgd::model::{BackboneKind, Method, Model, ModelSpec};
use patchgd::rng::Rng;
use patchgd::train::optim::Adam;
use patchgd::train::patchgd::{GridBatch, outer_step};
use patchgd::train::{Accumulation, LrSchedule, plan_outer_step};
use serde_json::json;
use tch::{Device, Kind, Tensor};

const SEED: u64 = 5;

fn python() -> PathBuf {
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python3");
    assert!(
        py.exists(),
        "{} is missing: run scripts/test, which sets up .venv with torch, torchvision and safetensors",
        py.display()
    );
    py
}

fn write(path: &Path, tensors: &[(String, Tensor)]) {
    let named: Vec<(&str, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.as_str(), t.detach().to_device(Device::Cpu).contiguous()))
        .collect();
    Tensor::write_safetensors(&named, path).unwrap();
}

struct Case {
    name: String,
    method: Method,
    backbone: BackboneKind,
    channels: i64,
    patch: i64,
    rows: i64,
    cols: i64,
    images: i64,
    accumulation: Accumulation,
    rho: f64,
    fill_chunk: i64,
    /// Cells without a patch (image-major flat indices), as the foreground filter leaves them.
    absent: Vec<usize>,
}

impl Case {
    fn patchgd(name: &str, backbone: BackboneKind, accumulation: Accumulation) -> Self {
        Self {
            name: name.into(),
            method: Method::Patchgd,
            backbone,
            channels: 1,
            // 16 px is the smallest patch whose last feature map still has 1 x 1 pixel; the
            // torchvision trunks downsample 32x.
            patch: if backbone == BackboneKind::SmallCnn {
                16
            } else {
                32
            },
            rows: 3,
            cols: 3,
            images: 2,
            accumulation,
            // 9 cells, n = 3: three chunks where zeta = 4 (the loop is bounded by the chunks).
            rho: 0.25,
            fill_chunk: 512,
            absent: Vec::new(),
        }
    }

    fn gd(name: &str, backbone: BackboneKind) -> Self {
        Self {
            method: Method::Gd,
            patch: 32,
            rows: 1,
            cols: 1,
            images: 3,
            channels: 3,
            ..Self::patchgd(name, backbone, Accumulation::Zeta)
        }
    }

    fn spec(&self) -> ModelSpec {
        ModelSpec {
            method: self.method,
            backbone: self.backbone,
            channels: self.channels,
            latent_dim: 8,
            head_width: 8,
            classes: 3,
            // PyTorch's dropout masks cannot be ours: off on both sides.
            head_dropout: 0.0,
        }
    }

    /// Run the step in patchgd and write everything the PyTorch side needs into `dir/name`.
    fn write(&self, dir: &Path) -> PathBuf {
        let out = dir.join(&self.name);
        std::fs::create_dir_all(&out).unwrap();
        let model = Model::seeded(self.spec(), Device::Cpu, SEED);
        let initial: Vec<(String, Tensor)> = model
            .named_tensors()
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect();
        write(&out.join("initial.safetensors"), &initial);

        let k = self.rows * self.cols;
        let mut rng = Rng::new(SEED);
        let n = self.images * k * self.channels * self.patch * self.patch;
        let values: Vec<f32> = (0..n).map(|_| (rng.unit() * 2.0 - 1.0) as f32).collect();
        let input = Tensor::from_slice(&values).view([
            self.images,
            k,
            self.channels,
            self.patch,
            self.patch,
        ]);
        let labels = Tensor::from_slice(&[2i64, 0, 1][..self.images as usize]);
        write(
            &out.join("batch.safetensors"),
            &[
                ("input".into(), input.shallow_clone()),
                ("labels".into(), labels.shallow_clone()),
            ],
        );
        let present: Option<Vec<bool>> = (!self.absent.is_empty()).then(|| {
            (0..(self.images * k) as usize)
                .map(|i| !self.absent.contains(&i))
                .collect()
        });
        let batch = GridBatch::from_input(input, labels, self.rows, self.cols, present.clone());

        let grads: Rc<RefCell<Vec<(String, Tensor)>>> = Rc::default();
        let mut opt = Adam::new(model.trainable(), 0.0);
        let seen = grads.clone();
        let mut step = 0;
        // Before update j: the gradients it uses, and the weights it starts from (those after
        // update j - 1), so that PyTorch can continue each step from exactly these weights.
        opt.observe(move |params| {
            let mut seen = seen.borrow_mut();
            for p in params {
                let g = p.compute.as_ref().unwrap_or(&p.master).grad();
                if g.defined() {
                    seen.push((format!("grad.{step}.{}", p.name), g.copy()));
                }
                seen.push((format!("before.{step}.{}", p.name), p.master.copy()));
            }
            step += 1;
        });
        let lr = 3e-3;
        let mut case = json!({
            "kind": if self.method == Method::Patchgd { "patchgd" } else { "gd" },
            "seed": SEED,
            "spec": {
                "method": if self.method == Method::Patchgd { "patchgd" } else { "gd" },
                "backbone": self.backbone.name(),
                "channels": self.channels,
                "latent_dim": 8,
                "head_width": 8,
                "classes": 3,
            },
            "lr": lr,
            "rows": self.rows,
            "cols": self.cols,
        });
        let outcome = match self.method {
            Method::Patchgd => {
                let permutation = Rng::new(SEED).permutation(k as usize);
                let plan =
                    plan_outer_step(k as usize, self.rho, self.accumulation, &mut Rng::new(SEED));
                let out =
                    outer_step(&model, &mut opt, lr, &batch, &plan, self.fill_chunk, None).unwrap();
                case["chunks"] = json!(plan.chunks);
                case["step_after"] = json!(plan.step_after);
                case["group_size"] = json!(plan.group_size);
                case["permutation"] = json!(permutation);
                case["rho"] = json!(self.rho);
                case["accumulation"] = json!(match self.accumulation {
                    Accumulation::Zeta => "zeta",
                    Accumulation::One => "one",
                });
                case["fill_chunk"] = json!(self.fill_chunk);
                case["present"] = json!(present);
                out
            }
            Method::Gd => patchgd::train::gd::gd_step(&model, &mut opt, lr, &batch).unwrap(),
        };
        case["loss"] = json!(outcome.loss);
        std::fs::write(out.join("case.json"), case.to_string()).unwrap();
        let mut results: Vec<(String, Tensor)> = grads.take();
        results.extend(
            model
                .named_tensors()
                .into_iter()
                .map(|(n, t)| (format!("after.{n}"), t)),
        );
        results.push(("logits".into(), outcome.logits.to_kind(Kind::Float)));
        write(&out.join("rust.safetensors"), &results);
        out
    }
}

fn schedule_case(dir: &Path, name: &str, warmup: u64, horizon: u64) -> PathBuf {
    let out = dir.join(name);
    std::fs::create_dir_all(&out).unwrap();
    let s = LrSchedule {
        peak: 3e-3,
        warmup_steps: warmup,
        horizon_steps: horizon,
    };
    let lrs: Vec<f64> = (0..horizon + 3).map(|step| s.lr(step)).collect();
    let case = json!({
        "kind": "schedule", "peak": s.peak, "warmup_steps": warmup,
        "horizon_steps": horizon, "lrs": lrs,
    });
    std::fs::write(out.join("case.json"), case.to_string()).unwrap();
    out
}

/// Where the cases go: a temporary directory, or `$TWIN_KEEP` to keep them for a look (run
/// `tests/twin/check_step.py DIR/CASE` on one by hand).
fn cases_dir(tmp: &tempfile::TempDir) -> PathBuf {
    std::env::var_os("TWIN_KEEP").map_or_else(|| tmp.path().to_path_buf(), PathBuf::from)
}

/// Run the PyTorch side over case directories; its report is the failure message.
fn check(cases: &[PathBuf]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/twin/check_step.py");
    let out = Command::new(python())
        .arg(script)
        .args(cases)
        .output()
        .expect("run tests/twin/check_step.py");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{report}");
    assert!(
        out.status.success(),
        "patchgd differs from PyTorch:\n{report}"
    );
}

#[test]
fn small_cnn_steps_match_pytorch() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = &cases_dir(&tmp);
    let mut with_gaps = Case::patchgd("small_cnn-gaps", BackboneKind::SmallCnn, Accumulation::Zeta);
    // Two absent cells in image 0, one in image 1 (foreground filter).
    with_gaps.absent = vec![1, 5, 12];
    let cases = [
        Case::patchgd("small_cnn-zeta", BackboneKind::SmallCnn, Accumulation::Zeta),
        Case::patchgd("small_cnn-one", BackboneKind::SmallCnn, Accumulation::One),
        // A fill chunk smaller than the grid: each chunk's 6 patches go through in 4 + 2.
        Case {
            fill_chunk: 4,
            ..Case::patchgd("small_cnn-fill4", BackboneKind::SmallCnn, Accumulation::One)
        },
        with_gaps,
        Case::gd("small_cnn-gd", BackboneKind::SmallCnn),
    ];
    let mut dirs: Vec<PathBuf> = cases.iter().map(|c| c.write(dir)).collect();
    dirs.push(schedule_case(dir, "schedule-4-12", 4, 12));
    dirs.push(schedule_case(dir, "schedule-1-5", 1, 5));
    dirs.push(schedule_case(dir, "schedule-0-6", 0, 6));
    check(&dirs);
}

#[test]
fn resnet18_steps_match_pytorch() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = &cases_dir(&tmp);
    let cases = [
        Case::patchgd("resnet18-zeta", BackboneKind::Resnet18, Accumulation::Zeta),
        Case {
            fill_chunk: 4,
            ..Case::patchgd(
                "resnet18-one-fill4",
                BackboneKind::Resnet18,
                Accumulation::One,
            )
        },
        Case::gd("resnet18-gd", BackboneKind::Resnet18),
    ];
    check(&cases.iter().map(|c| c.write(dir)).collect::<Vec<_>>());
}

#[test]
fn mobilenet_v2_steps_match_pytorch() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = &cases_dir(&tmp);
    let cases = [
        Case::patchgd(
            "mobilenet_v2-zeta",
            BackboneKind::MobilenetV2,
            Accumulation::Zeta,
        ),
        Case {
            fill_chunk: 4,
            ..Case::patchgd(
                "mobilenet_v2-one-fill4",
                BackboneKind::MobilenetV2,
                Accumulation::One,
            )
        },
        Case::gd("mobilenet_v2-gd", BackboneKind::MobilenetV2),
    ];
    check(&cases.iter().map(|c| c.write(dir)).collect::<Vec<_>>());
}

/// A small UltraMNIST set on local disk (the twin reads PNG files): the demo's recipe (128 px,
/// 2 classes), `train` + 32 images.
fn ultramnist_set(dir: &Path, train: usize) -> (String, String) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = dir.to_str().unwrap().to_string();
    rt.block_on(patchgd::synth::write_ultramnist(
        &patchgd::storage::Location::parse(&url).unwrap(),
        &patchgd::synth::Recipe::new(128, 2, 11),
        train,
        32,
        None,
        patchgd::synth::ImageFormat::Png,
    ))
    .unwrap();
    (format!("{url}/images"), format!("{url}/labels.csv"))
}

/// Train `epochs` of the demo's pipeline on the set with `dropout`, writing the run's trace to
/// `trace`; returns the trace directory.
fn traced_demo_run(data: &(String, String), out: &Path, dropout: f64, epochs: u64) -> PathBuf {
    let demo = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/ultramnist.yaml"),
    )
    .unwrap();
    let run = out.join("run");
    let trace = out.join("trace");
    let sets = [
        format!("source.images={}", data.0),
        format!("source.labels={}", data.1),
        format!("output={}", run.display()),
        format!("model.head_dropout={dropout}"),
        format!("train.epochs={epochs}"),
        "train.device=cpu".to_string(),
        "checkpoint.every_steps=0".to_string(),
    ];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let def =
        patchgd::pipeline::Definition::from_yaml_with_overrides(&demo, "ultramnist.yaml", &sets)
            .unwrap();
    let options = patchgd::pipeline::RunOptions {
        fresh: true,
        trace: Some(patchgd::pipeline::TraceOptions {
            dir: trace.clone(),
            weights_every: 1,
        }),
        ..Default::default()
    };
    patchgd::pipeline::run_with(&def, &options).unwrap();
    trace
}

/// Replay a trace in the twin with the control (`tests/twin/replay.py --check`); its report is
/// the failure message.
fn replay_check(trace: &Path) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/twin/replay.py");
    let out = Command::new(python())
        .arg(script)
        .arg(trace)
        .args(["--check", "--quiet", "--report"])
        .arg(trace.join("report.json"))
        .output()
        .expect("run tests/twin/replay.py");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{report}");
    assert!(
        out.status.success(),
        "patchgd's run parts from the PyTorch twin's:\n{report}"
    );
    report
}

/// The trajectory test (docs/parity.md, "The paired run"): 20 steps of the demo's pipeline
/// (2 epochs of 10 mini-batches, with a validation pass after each), replayed by the PyTorch
/// twin choice for choice. At every step patchgd must be no further from the twin than the
/// control (the twin from weights one unit in the last place away) had come by then, with the
/// head's dropout and without. A change that alters whole runs but not single steps (the
/// schedule across epochs, BatchNorm's running statistics over many steps, the dropout
/// stream, the validation pass) fails here.
#[test]
fn whole_runs_follow_pytorch_step_by_step() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = cases_dir(&tmp);
    let data = ultramnist_set(&dir.join("data"), 160);
    for dropout in [0.2, 0.0] {
        let trace = traced_demo_run(&data, &dir.join(format!("dropout-{dropout}")), dropout, 2);
        let lines = std::fs::read_to_string(trace.join("trace.jsonl")).unwrap();
        let steps = lines
            .lines()
            .filter(|l| l.contains(r#""record":"step""#))
            .count();
        assert_eq!(steps, 20, "2 epochs of 160 images in batches of 16");
        let masks = lines.contains(r#""dropout":[""#);
        assert_eq!(masks, dropout > 0.0, "dropout masks in the trace");
        replay_check(&trace);
    }
}

/// A trace names what it cannot be: a resumed run, and (in the twin) a run it cannot replay.
#[test]
fn a_trace_starts_with_the_run_and_the_twin_refuses_what_it_cannot_replay() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = cases_dir(&tmp);
    let data = ultramnist_set(&dir.join("data"), 16);
    let trace = traced_demo_run(&data, &dir.join("a"), 0.2, 1);
    // The same output again, without --fresh: it would resume from the final checkpoint.
    let demo = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/ultramnist.yaml"),
    )
    .unwrap();
    let sets = [
        format!("source.images={}", data.0),
        format!("source.labels={}", data.1),
        format!("output={}", dir.join("a/run").display()),
        "train.epochs=1".to_string(),
        "train.device=cpu".to_string(),
    ];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let def =
        patchgd::pipeline::Definition::from_yaml_with_overrides(&demo, "ultramnist.yaml", &sets)
            .unwrap();
    let err = patchgd::pipeline::run_with(
        &def,
        &patchgd::pipeline::RunOptions {
            trace: Some(patchgd::pipeline::TraceOptions {
                dir: trace.clone(),
                weights_every: 1,
            }),
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("--trace records a run from its first step") && err.contains("--fresh"),
        "{err}"
    );
    // A trace without weights cannot be compared step by step: the twin says why.
    let lines = std::fs::read_to_string(trace.join("trace.jsonl")).unwrap();
    let first = lines
        .lines()
        .next()
        .unwrap()
        .replace(r#""weights_every":1"#, r#""weights_every":0"#);
    let rest: Vec<&str> = lines.lines().skip(1).collect();
    std::fs::write(
        trace.join("trace.jsonl"),
        format!("{first}\n{}\n", rest.join("\n")),
    )
    .unwrap();
    let out = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/twin/replay.py"))
        .arg(&trace)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("no weights in the trace"), "{text}");
}

/// The parity bench's statistics (Welch's interval, the exact Mann-Whitney test, written
/// without scipy in tests/twin/stats.py) against values from published tables.
#[test]
fn the_parity_benchs_statistics_match_published_tables() {
    let out = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/twin/stats.py"))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("stats: ok"), "{text}");
}
