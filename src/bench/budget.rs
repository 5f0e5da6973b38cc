//! Target 3: PatchGD against GD under one peak-memory budget and one wall time, on a task where
//! resolution matters: one MNIST-sized digit (28 px) on a large canvas (1024 px) with a faint
//! texture, ten classes (the digit). The budget is PatchGD's own peak RSS at full resolution,
//! measured by a probe run on a small set; GD gets the largest input size (the image shrunk)
//! whose probe peak stays within it, which leaves it a digit a few pixels high. Each method then
//! trains, for each of three seeds, for the whole number of epochs closest to the wall time
//! (estimated from its probe's second epoch: the first also pays libtorch's warm-up) and reports
//! validation accuracy; the report shows the seconds and peak each run really took, and whether
//! GD stayed under PatchGD's real peak.
//!
//! PatchGD runs with the foreground filter (`patch.foreground.min_fraction`), as one would on a
//! slide: patches without a digit stroke are not encoded and stay zero in Z. That is what lets
//! it see every canvas at full resolution within the wall time on a CPU; the memory budget, not
//! the filter, is what takes the detail away from GD. Its latent store is capped at
//! [`LATENT_BUDGET_MIB`] (the rest spills to disk), so the budget is what the method needs, not
//! what a default cache happens to hold.
//!
//! The texture (grey 0..=16 in 8 px blocks, below the foreground threshold of 32) gives the
//! canvas a scan's variance instead of one constant, on which BatchNorm's batch statistics in
//! training and running statistics in evaluation part ways. Shrunk to GD's size it mostly
//! averages out, and GD's evaluation still suffers from that (docs/benchmarks.md says how much).

use super::child::{ChildRun, default_cap, run_pipeline};
use super::{BenchOptions, generate_recipe, write_pipeline};
use crate::synth::{ImageFormat, Recipe};

/// Seeds each method is trained with (model init, image order, patch permutations).
pub const SEEDS: [u64; 3] = [42, 43, 44];
pub const CLASSES: u32 = 10;
/// Digit height in pixels, on every canvas.
pub const DIGIT_PX: u32 = 28;
/// Brightest grey of the background texture (below the foreground threshold).
pub const BACKGROUND: u8 = 16;
/// PatchGD's latent-store cache (`latent.budget_mib`).
pub const LATENT_BUDGET_MIB: usize = 16;
/// Epochs of each probe run: the last one is timed.
const PROBE_EPOCHS: u64 = 2;
/// Foreground filter for PatchGD: a patch is encoded when this share of its pixels is a
/// stroke (grey level above 32 on the black canvas): one pixel of a 64 px patch is 0.00024.
const MIN_FRACTION: &str = "0.0002";

#[derive(Clone, Debug)]
pub struct BudgetRow {
    pub method: &'static str,
    /// Input size the method sees (GD: the shrunk image).
    pub input_px: u32,
    pub seed: u64,
    pub run: ChildRun,
}

/// One GD probe run at `size` px.
#[derive(Clone, Debug)]
pub struct GdProbe {
    pub size: u32,
    pub peak_rss_bytes: u64,
    /// Finished within the budget.
    pub fits: bool,
    /// Stopped on passing [`probe_cap`]: far over the budget, no need to finish it.
    pub stopped: bool,
}

/// A GD probe is stopped once its resident set passes the budget by a quarter: it cannot fit,
/// and a full-size GD epoch takes minutes on a CPU. (Not at the budget itself: on tiny images
/// both peaks are libtorch's baseline and differ by noise, and the quick run still needs one
/// finished probe to time GD.)
pub fn probe_cap(budget: u64) -> u64 {
    budget + budget / 4
}

#[derive(Clone, Debug)]
pub struct Budget {
    pub image_px: u32,
    pub patch_px: usize,
    pub train_images: usize,
    pub val_images: usize,
    pub budget_bytes: u64,
    /// GD sizes probed, from full size down.
    pub probes: Vec<GdProbe>,
    pub rows: Vec<BudgetRow>,
}

/// One method's final validation accuracies over its seeds.
#[derive(Clone, Copy, Debug)]
pub struct Spread {
    /// Runs that finished.
    pub n: usize,
    pub mean: f64,
    /// Sample standard deviation (0 for one run).
    pub sd: f64,
    pub min: f64,
    pub max: f64,
}

impl Budget {
    /// Final validation accuracies of one method's runs that finished.
    pub fn accuracies(&self, method: &str) -> Vec<f64> {
        self.rows
            .iter()
            .filter(|r| r.method == method && r.run.ok)
            .filter_map(|r| r.run.epochs.last().map(|e| e.val_accuracy))
            .collect()
    }

    /// Mean, spread and range of [`Budget::accuracies`] (NaN mean when no run finished).
    pub fn spread(&self, method: &str) -> Spread {
        let acc = self.accuracies(method);
        let n = acc.len();
        let mean = acc.iter().sum::<f64>() / n as f64;
        let sd = if n > 1 {
            (acc.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Spread {
            n,
            mean,
            sd,
            min: acc.iter().copied().fold(f64::INFINITY, f64::min),
            max: acc.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

pub fn measure(opts: &BenchOptions) -> Result<Budget, String> {
    let (size, patch, train, val, probe_n) = if opts.quick {
        (128, 32, 48, 16, 16)
    } else {
        (1024, 64, 2000, 500, 128)
    };
    let batch = 16;
    let recipe = Recipe {
        min_digits: 1,
        max_digits: 1,
        digit_px: Some(DIGIT_PX),
        background: BACKGROUND,
        ..Recipe::new(size, CLASSES, 42)
    };
    let dir = opts.dir.join("budget");
    let (images, labels) =
        generate_recipe(&dir.join("data"), &recipe, train, val, ImageFormat::Png)?;
    let (p_images, p_labels) = generate_recipe(
        &dir.join("probe-data"),
        &recipe,
        probe_n,
        batch,
        ImageFormat::Png,
    )?;
    let cap = default_cap();
    let write = |name: &str, images: &str, labels: &str, epochs: u64| {
        write_pipeline(
            opts,
            &dir,
            name,
            (images, labels, CLASSES),
            patch,
            epochs,
            batch,
        )
    };
    let patchgd_sets = |seed: u64| {
        vec![
            "method=patchgd".to_string(),
            format!("patch.foreground.min_fraction={MIN_FRACTION}"),
            format!("latent.budget_mib={LATENT_BUDGET_MIB}"),
            format!("train.seed={seed}"),
        ]
    };
    // The budget: PatchGD's peak at full resolution, over the probe's epochs.
    let (file, out) = write("probe-patchgd", &p_images, &p_labels, PROBE_EPOCHS)?;
    let probe = run_pipeline(&opts.exe, &file, &out, &patchgd_sets(SEEDS[0]), cap)?;
    if !probe.ok {
        return Err(format!("the PatchGD probe failed: {}", probe.tail));
    }
    if probe.epochs.is_empty() {
        return Err("the PatchGD probe reported no epoch".into());
    }
    let budget = probe.peak_rss_bytes;
    let per_epoch = |run: &ChildRun| {
        run.epochs.last().map_or(f64::NAN, |e| e.seconds) * (train + val) as f64
            / (probe_n + batch) as f64
    };
    let patchgd_epoch_s = per_epoch(&probe);
    // GD: the largest input that fits, from full size down.
    let mut probes = Vec::new();
    let mut gd = None;
    let mut last_probe = None;
    let mut s = size;
    while s >= 32 {
        let (file, out) = write(&format!("probe-gd-{s}"), &p_images, &p_labels, PROBE_EPOCHS)?;
        let sets = ["method=gd".to_string(), format!("gd.image_size={s}")];
        let run = run_pipeline(&opts.exe, &file, &out, &sets, probe_cap(budget).min(cap))?;
        let fits = run.ok && run.peak_rss_bytes <= budget;
        probes.push(GdProbe {
            size: s,
            peak_rss_bytes: run.peak_rss_bytes,
            fits,
            stopped: run.capped,
        });
        if run.ok && !run.epochs.is_empty() {
            last_probe = Some((s, per_epoch(&run)));
            if fits {
                gd = Some((s, per_epoch(&run)));
                break;
            }
        }
        s = s * 3 / 4 / 8 * 8;
    }
    // Nothing fits (tiny images, where both peaks are libtorch's baseline and differ by
    // noise): GD runs at the smallest size probed, and the probe list says none fit.
    let (gd_size, gd_epoch_s) = match gd {
        Some(g) => g,
        None => last_probe.ok_or("no GD size was probed")?,
    };
    // Whole epochs closest to the wall time (the table reports the seconds each really took).
    let epochs = |epoch_s: f64| ((opts.budget_seconds / epoch_s).round() as u64).max(1);
    let mut rows = Vec::new();
    let seeds = if opts.quick { &SEEDS[..1] } else { &SEEDS[..] };
    for &seed in seeds {
        for (method, input, epoch_s) in [
            ("PatchGD", size, patchgd_epoch_s),
            ("GD", gd_size, gd_epoch_s),
        ] {
            let name = format!("{}-{seed}", method.to_lowercase());
            let (file, out) = write(&name, &images, &labels, epochs(epoch_s))?;
            let sets = if method == "PatchGD" {
                patchgd_sets(seed)
            } else {
                vec![
                    "method=gd".to_string(),
                    format!("gd.image_size={gd_size}"),
                    format!("train.seed={seed}"),
                ]
            };
            let run = run_pipeline(&opts.exe, &file, &out, &sets, cap)?;
            rows.push(BudgetRow {
                method,
                input_px: input,
                seed,
                run,
            });
        }
    }
    Ok(Budget {
        image_px: size,
        patch_px: patch,
        train_images: train,
        val_images: val,
        budget_bytes: budget,
        probes,
        rows,
    })
}
