//! One PatchGD outer step (fill + ζ inner iterations + optimizer step) of patchgd against the
//! same step of the PyTorch twin (`tests/twin/patchgd_torch.py`), side by side in one run.
//!
//! The twin runs in a child Python process that stays alive (`tests/twin/step_server.py`);
//! rounds alternate between the two sides, and which side goes first alternates too, so that
//! a noisy moment on a shared machine hits both alike. Both sides get the same settings, the
//! same number of torch threads and random input of the same shape; each side's first step is
//! a warm-up and is not counted. Prints the median step time of each side, the spread
//! (fastest and slowest step) and the speed-up (the twin's median over patchgd's).
//!
//! `scripts/bench` runs it (`cargo bench --profile dev --bench patchgd_step`); under
//! `cargo test` (no `--bench` argument) it runs one step a side of the demo's setting as a
//! smoke test. Setting names (demo, resnet18, resnet50) as arguments run only those:
//! `cargo bench --profile dev --bench patchgd_step -- resnet18`.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use patchgd::model::{BackboneKind, Method, Model, ModelSpec};
use patchgd::rng::Rng;
use patchgd::train::optim::Adam;
use patchgd::train::patchgd::{GridBatch, fill, inner_forward, outer_step};
use patchgd::train::{Accumulation, plan_outer_step};
use tch::{Device, Kind, Tensor};

/// One setting to time: the model, the batch and the sampling, as a pipeline file sets them.
struct Setting {
    name: &'static str,
    backbone: BackboneKind,
    channels: i64,
    latent: i64,
    head: i64,
    classes: i64,
    images: i64,
    /// Cells per side of the square grid: image side = grid x patch.
    grid: i64,
    patch: i64,
    rho: f64,
    fill_chunk: i64,
    /// Alternating rounds, and steps a side in each.
    rounds: usize,
    steps: usize,
}

const SETTINGS: [Setting; 3] = [
    // The README's demo (pipelines/ultramnist.yaml): 128 px, 4 x 4 patches of 32 px.
    Setting {
        name: "demo",
        backbone: BackboneKind::SmallCnn,
        channels: 1,
        latent: 64,
        head: 64,
        classes: 2,
        images: 16,
        grid: 4,
        patch: 32,
        rho: 0.5,
        fill_chunk: 512,
        rounds: 6,
        steps: 10,
    },
    // resnet18 at 256 px, 8 x 8 patches of 32 px, RGB, the paper's D = 256.
    Setting {
        name: "resnet18",
        backbone: BackboneKind::Resnet18,
        channels: 3,
        latent: 256,
        head: 256,
        classes: 10,
        images: 16,
        grid: 8,
        patch: 32,
        rho: 0.25,
        fill_chunk: 512,
        rounds: 6,
        steps: 2,
    },
    // The reference code's setting: resnet50 at 512 px, 4 x 4 patches of 128 px, ρ = 1/4, B = 4.
    Setting {
        name: "resnet50",
        backbone: BackboneKind::Resnet50,
        channels: 3,
        latent: 256,
        head: 256,
        classes: 6,
        images: 4,
        grid: 4,
        patch: 128,
        rho: 0.25,
        fill_chunk: 512,
        rounds: 6,
        steps: 2,
    },
];

/// patchgd's side: the model, its optimizer and a fixed batch.
struct Ours {
    model: Model,
    opt: Adam,
    batch: GridBatch,
    rng: Rng,
    setting: &'static Setting,
    device: Device,
}

impl Ours {
    fn new(s: &'static Setting, device: Device) -> Self {
        tch::manual_seed(0);
        let model = Model::new(
            ModelSpec {
                method: Method::Patchgd,
                backbone: s.backbone,
                channels: s.channels,
                latent_dim: s.latent,
                head_width: s.head,
                head_dropout: patchgd::model::head::HEAD_DROPOUT,
                classes: s.classes,
            },
            device,
        );
        let opt = Adam::new(model.trainable(), 0.0);
        let cells = s.grid * s.grid;
        let input = Tensor::randn(
            [s.images, cells, s.channels, s.patch, s.patch],
            (Kind::Float, device),
        );
        let labels = Tensor::arange(s.images, (Kind::Int64, device)).remainder(s.classes);
        let batch = GridBatch::from_input(input, labels, s.grid, s.grid, None);
        Ours {
            model,
            opt,
            batch,
            rng: Rng::new(1),
            setting: s,
            device,
        }
    }

    fn steps(&mut self, n: usize) -> Vec<f64> {
        let s = self.setting;
        (0..n)
            .map(|_| {
                let cells = (s.grid * s.grid) as usize;
                let plan = plan_outer_step(cells, s.rho, Accumulation::Zeta, &mut self.rng);
                let start = Instant::now();
                outer_step(
                    &self.model,
                    &mut self.opt,
                    1e-3,
                    &self.batch,
                    &plan,
                    s.fill_chunk,
                    None,
                )
                .expect("patchgd outer step");
                if self.device.is_cuda() {
                    tch::Cuda::synchronize(0);
                }
                start.elapsed().as_secs_f64()
            })
            .collect()
    }
}

/// Where patchgd's step spends its time: the step's own pieces ([`fill`], [`inner_forward`],
/// the backward pass, Adam), called in the order `outer_step` calls them and timed one by one.
/// Seconds per step, medians over `n` steps: fill, inner forward (backbone and head), backward,
/// Adam (with zero_grad). CPU figures: on a GPU the pieces are not synchronised one by one.
fn phases(ours: &mut Ours, n: usize) -> [f64; 4] {
    let s = ours.setting;
    let mut rows: Vec<[f64; 4]> = Vec::new();
    for _ in 0..n {
        let plan = plan_outer_step(
            (s.grid * s.grid) as usize,
            s.rho,
            Accumulation::Zeta,
            &mut ours.rng,
        );
        let mut t = [0.0; 4];
        let start = Instant::now();
        let (mut z, _) = fill(
            &ours.model,
            &ours.batch,
            s.fill_chunk,
            true,
            None,
            Some(&plan.chunks),
        );
        t[0] += start.elapsed().as_secs_f64();
        ours.opt.zero_grad();
        for (j, cells) in plan.chunks.iter().enumerate() {
            let start = Instant::now();
            let (z_new, logits, _) = inner_forward(&ours.model, &ours.batch, &z, cells);
            let loss = logits.cross_entropy_for_logits(&ours.batch.labels);
            t[1] += start.elapsed().as_secs_f64();
            let start = Instant::now();
            (loss / plan.group_size[j] as f64).backward();
            t[2] += start.elapsed().as_secs_f64();
            if plan.step_after[j] {
                let start = Instant::now();
                ours.opt.step(1e-3).expect("finite gradients");
                ours.opt.zero_grad();
                t[3] += start.elapsed().as_secs_f64();
            }
            z = z_new.detach();
        }
        rows.push(t);
    }
    std::array::from_fn(|i| spread(rows.iter().map(|r| r[i]).collect()).median)
}

/// The twin's side: `tests/twin/step_server.py`, alive for the whole setting.
struct Twin {
    child: Child,
    to: ChildStdin,
    from: BufReader<ChildStdout>,
}

impl Twin {
    fn start(s: &Setting, threads: i32) -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let python = root.join(".venv/bin/python3");
        let settings = serde_json::json!({
            "backbone": s.backbone.name(),
            "channels": s.channels,
            "latent_dim": s.latent,
            "head_width": s.head,
            "classes": s.classes,
            "images": s.images,
            "grid": s.grid,
            "patch": s.patch,
            "rho": s.rho,
            "fill_chunk": s.fill_chunk,
            "threads": threads,
        });
        let mut child = Command::new(&python)
            .arg(root.join("tests/twin/step_server.py"))
            .arg(settings.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (scripts/setup makes the .venv with torch)",
                    python.display()
                )
            });
        let to = child.stdin.take().unwrap();
        let mut from = BufReader::new(child.stdout.take().unwrap());
        let mut ready = String::new();
        from.read_line(&mut ready).expect("the twin's first line");
        assert!(
            ready.starts_with("ready"),
            "the twin did not start: {ready:?}"
        );
        Twin { child, to, from }
    }

    fn steps(&mut self, n: usize) -> Vec<f64> {
        writeln!(self.to, "{n}").expect("writing to the twin");
        let mut line = String::new();
        self.from
            .read_line(&mut line)
            .expect("the twin's step times");
        let times: Vec<f64> = line
            .split_whitespace()
            .map(|t| t.parse().unwrap())
            .collect();
        assert_eq!(times.len(), n, "the twin's answer {line:?}");
        times
    }
}

impl Drop for Twin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

fn spread(mut times: Vec<f64>) -> Spread {
    times.sort_by(f64::total_cmp);
    Spread {
        median: times[times.len() / 2],
        min: times[0],
        max: times[times.len() - 1],
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--bench");
    let only: Vec<&str> = args
        .iter()
        .skip(1)
        .filter(|a| SETTINGS.iter().any(|s| s.name == a.as_str()))
        .map(String::as_str)
        .collect();
    let device = Device::cuda_if_available();
    let threads = tch::get_num_threads();
    println!(
        "PatchGD outer step, patchgd against the PyTorch twin, alternating rounds; device {device:?}, torch threads {threads} a side"
    );
    println!(
        "| setting | images x grid x patch | rho | steps a side | patchgd median s (min-max) | twin median s (min-max) | speed-up |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut breakdown = Vec::new();
    for s in &SETTINGS {
        let chosen = if only.is_empty() {
            full || s.name == "demo"
        } else {
            only.contains(&s.name)
        };
        if !chosen {
            continue;
        }
        let (rounds, steps) = if full { (s.rounds, s.steps) } else { (1, 1) };
        let mut ours = Ours::new(s, device);
        let mut twin = Twin::start(s, threads);
        ours.steps(1); // warm-up
        twin.steps(1);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            if round % 2 == 0 {
                a.extend(ours.steps(steps));
                b.extend(twin.steps(steps));
            } else {
                b.extend(twin.steps(steps));
                a.extend(ours.steps(steps));
            }
        }
        let (a, b) = (spread(a), spread(b));
        println!(
            "| {} | {} x {2}x{2} x {3} px | {4} | {5} | {6:.4} ({7:.4}-{8:.4}) | {9:.4} ({10:.4}-{11:.4}) | {12:.2}x |",
            s.name,
            s.images,
            s.grid,
            s.patch,
            s.rho,
            rounds * steps,
            a.median,
            a.min,
            a.max,
            b.median,
            b.min,
            b.max,
            b.median / a.median
        );
        drop(twin);
        if full {
            breakdown.push((s.name, phases(&mut ours, s.rounds * s.steps / 2)));
        }
    }
    if !breakdown.is_empty() {
        println!(
            "\nWhere patchgd's step goes (its pieces timed one by one, medians, seconds per step):"
        );
        println!("| setting | fill | inner forward (backbone + head) | backward | Adam | sum |");
        println!("|---|---|---|---|---|---|");
        for (name, [f, i, b, a]) in breakdown {
            let sum = f + i + b + a;
            let pc = |x: f64| format!("{x:.4} ({:.0}%)", 100.0 * x / sum);
            println!(
                "| {name} | {} | {} | {} | {} | {sum:.4} |",
                pc(f),
                pc(i),
                pc(b),
                pc(a)
            );
        }
    }
}
