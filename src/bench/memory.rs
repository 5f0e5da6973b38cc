//! Target 2: peak RSS of training as images grow, patch size and patches per inner iteration
//! fixed. PatchGD's working set is one fill chunk, one inner iteration's patches and Z (K x D
//! floats); the image itself streams through the source's byte-bounded buffer into a spool
//! file. GD holds the whole image and its activations, so it is run at the same sizes for
//! contrast until it no longer fits under the cap.

use super::child::{ChildRun, default_cap, run_pipeline};
use super::{BenchOptions, generate, write_pipeline};
use crate::source::tiff::write::TileCompression;
use crate::synth::ImageFormat;

#[derive(Clone, Debug)]
pub struct MemoryRow {
    pub method: &'static str,
    pub image_px: u32,
    /// Patches per image (PatchGD) or input pixels (GD).
    pub cells: usize,
    pub run: ChildRun,
}

/// Patch size, patches per inner iteration and fill chunk used at every size.
pub const PATCH: usize = 128;
pub const PER_INNER: usize = 16;
pub const FILL_CHUNK: usize = 64;

pub fn measure(opts: &BenchOptions, sizes: &[u32]) -> Result<Vec<MemoryRow>, String> {
    let cap = default_cap();
    let patch = if opts.quick { 32 } else { PATCH };
    let mut rows = Vec::new();
    let mut gd_failed = false;
    for &size in sizes {
        let dir = opts.dir.join(format!("memory-{size}"));
        let (images, labels) = generate(
            &dir.join("data"),
            size,
            4,
            1,
            0,
            ImageFormat::Tiff {
                tile: 256,
                compression: TileCompression::Jpeg { quality: 90 },
                bigtiff: false,
            },
        )?;
        let cells = (size as usize / patch).pow(2);
        for method in ["patchgd", "gd"] {
            if method == "gd" && gd_failed {
                continue; // it failed at a smaller size already
            }
            let (file, out) =
                write_pipeline(opts, &dir, method, (&images, &labels, 4), patch, 1, 1)?;
            let rho = PER_INNER as f64 / cells as f64;
            let sets = vec![
                format!("method={method}"),
                format!("patchgd.sampling_fraction={rho}"),
                format!("patchgd.fill_chunk={FILL_CHUNK}"),
                format!("gd.image_size={size}"),
            ];
            let run = run_pipeline(&opts.exe, &file, &out, &sets, cap)?;
            if method == "gd" && !run.ok {
                gd_failed = true;
            }
            rows.push(MemoryRow {
                method: if method == "gd" { "GD" } else { "PatchGD" },
                image_px: size,
                cells: if method == "gd" {
                    (size as usize).pow(2)
                } else {
                    cells
                },
                run,
            });
        }
    }
    Ok(rows)
}
