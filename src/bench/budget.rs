//! Target 3: PatchGD against GD under one peak-memory budget and one wall time, on generated
//! UltraMNIST. The budget is PatchGD's own peak RSS at full resolution, measured by a probe run
//! (one epoch on a small set); GD gets the largest input size (the image shrunk) whose probe
//! peak stays within it. Each method then trains for the whole number of epochs closest to the
//! wall time (estimated from its probe) and reports validation accuracy; the report shows the
//! seconds and peak each run really took, and whether GD stayed under PatchGD's real peak.

use super::child::{ChildRun, default_cap, run_pipeline};
use super::{BenchOptions, generate, write_pipeline};
use crate::synth::ImageFormat;

#[derive(Clone, Debug)]
pub struct BudgetRow {
    pub method: &'static str,
    /// Input size the method sees (GD: the shrunk image).
    pub input_px: u32,
    pub run: ChildRun,
}

#[derive(Clone, Debug)]
pub struct Budget {
    pub image_px: u32,
    pub budget_bytes: u64,
    /// GD sizes probed: (size, peak RSS, fits).
    pub probes: Vec<(u32, u64, bool)>,
    pub rows: Vec<BudgetRow>,
}

pub fn measure(opts: &BenchOptions) -> Result<Budget, String> {
    let (size, patch, train, val, probe_n) = if opts.quick {
        (128, 32, 48, 16, 16)
    } else {
        (512, 64, 384, 256, 64)
    };
    let batch = 16;
    let dir = opts.dir.join("budget");
    let (images, labels) = generate(&dir.join("data"), size, 2, train, val, ImageFormat::Png)?;
    let (p_images, p_labels) = generate(
        &dir.join("probe-data"),
        size,
        2,
        probe_n,
        batch,
        ImageFormat::Png,
    )?;
    let cap = default_cap();
    let write = |name: &str, images: &str, labels: &str, epochs: u64| {
        write_pipeline(opts, &dir, name, (images, labels, 2), patch, epochs, batch)
    };
    // The budget: PatchGD's peak at full resolution, one probe epoch.
    let (file, out) = write("probe-patchgd", &p_images, &p_labels, 1)?;
    let probe = run_pipeline(&opts.exe, &file, &out, &[], cap)?;
    if !probe.ok {
        return Err(format!("the PatchGD probe failed: {}", probe.tail));
    }
    let budget = probe.peak_rss_bytes;
    let patchgd_epoch_s = probe.epochs[0].seconds * (train + val) as f64 / (probe_n + batch) as f64;
    // GD: the largest input that fits, from full size down.
    let mut probes = Vec::new();
    let mut gd = None;
    let mut last_probe = None;
    let mut s = size;
    while s >= 32 {
        let (file, out) = write(&format!("probe-gd-{s}"), &p_images, &p_labels, 1)?;
        let sets = ["method=gd".to_string(), format!("gd.image_size={s}")];
        let run = run_pipeline(&opts.exe, &file, &out, &sets, cap)?;
        let fits = run.ok && run.peak_rss_bytes <= budget;
        probes.push((s, run.peak_rss_bytes, fits));
        if run.ok {
            let epoch_s = run.epochs[0].seconds * (train + val) as f64 / (probe_n + batch) as f64;
            last_probe = Some((s, epoch_s));
            if fits {
                gd = Some((s, epoch_s));
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
    for (method, input, epoch_s) in [
        ("PatchGD", size, patchgd_epoch_s),
        ("GD", gd_size, gd_epoch_s),
    ] {
        let name = method.to_lowercase();
        let (file, out) = write(&name, &images, &labels, epochs(epoch_s))?;
        let sets = [format!("method={name}"), format!("gd.image_size={gd_size}")];
        let run = run_pipeline(&opts.exe, &file, &out, &sets, cap)?;
        rows.push(BudgetRow {
            method,
            input_px: input,
            run,
        });
    }
    Ok(Budget {
        image_px: size,
        budget_bytes: budget,
        probes,
        rows,
    })
}
