//! Mixed precision's effect on speed and accuracy: the same run (same data, seed and image
//! order) in each precision the device takes (f32 and bf16; f16 on CUDA only), each a
//! `patchgd run` child. Besides speed and accuracy, the table gives how often a run's final
//! validation predictions agree with f32's: the numerical effect of the precision, apart from
//! the sampling noise of an accuracy measured on a few hundred images. A second f32 run with
//! another seed gives that share its scale: how much two equally good f32 runs agree.
//!
//! The task is one digit per canvas, ten classes (UltraMNIST's recipe with a single digit): the
//! 2-class UltraMNIST of the other parts barely leaves chance in the epochs a CPU affords, and
//! an accuracy comparison needs runs that learn.

use std::collections::HashMap;
use std::path::Path;

use arrow::array::{Array, Int64Array, StringArray, UInt64Array};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::child::{ChildRun, default_cap, run_pipeline};
use super::{BenchOptions, generate_recipe, write_pipeline};
use crate::pipeline::definition::DeviceChoice;
use crate::synth::ImageFormat;
use crate::synth::ultramnist::Recipe;
use crate::train::Precision;

/// One digit per image: its class is the digit.
pub const CLASSES: u32 = 10;

/// The seed of the reference f32 run's twin (the pipeline's own seed is 42).
pub const OTHER_SEED: u64 = 43;

#[derive(Clone, Debug)]
pub struct PrecisionRow {
    pub precision: Precision,
    /// Trained with [`OTHER_SEED`] instead of the pipeline's seed.
    pub other_seed: bool,
    pub run: ChildRun,
    /// Share of the last epoch's validation predictions equal to the f32 run's (f32: none).
    pub agreement_with_f32: Option<f64>,
}

impl PrecisionRow {
    pub fn label(&self) -> String {
        if self.other_seed {
            format!("{}, seed {OTHER_SEED}", self.precision.name())
        } else {
            self.precision.name().to_string()
        }
    }
}

#[derive(Clone, Debug)]
pub struct PrecisionReport {
    pub image_px: u32,
    pub patch_px: usize,
    pub train_images: usize,
    pub val_images: usize,
    pub epochs: u64,
    pub rows: Vec<PrecisionRow>,
    /// Precisions left out, and why (f16 without CUDA).
    pub skipped: Vec<String>,
}

/// The precisions a run on this device can use, and those it cannot.
pub fn precisions(device: DeviceChoice) -> (Vec<Precision>, Vec<String>) {
    let cuda = match device {
        DeviceChoice::Cpu => false,
        DeviceChoice::Cuda => true,
        DeviceChoice::Auto => tch::Cuda::is_available(),
    };
    if cuda {
        (
            vec![Precision::F32, Precision::Bf16, Precision::F16],
            vec![],
        )
    } else {
        (
            vec![Precision::F32, Precision::Bf16],
            vec!["f16: needs CUDA (autocast), not measured on this device".into()],
        )
    }
}

pub fn measure(opts: &BenchOptions) -> Result<PrecisionReport, String> {
    let (size, patch, train, val, epochs) = if opts.quick {
        (64, 32, 20, 20, 1)
    } else {
        (128, 32, 640, 320, 8)
    };
    let batch = 16;
    let dir = opts.dir.join("precision");
    let recipe = Recipe {
        min_digits: 1,
        max_digits: 1,
        ..Recipe::new(size, CLASSES, 42)
    };
    let (images, labels) =
        generate_recipe(&dir.join("data"), &recipe, train, val, ImageFormat::Png)?;
    let (wanted, skipped) = precisions(opts.device);
    let mut rows: Vec<PrecisionRow> = Vec::new();
    let mut f32_predictions = None;
    let mut runs: Vec<(Precision, bool)> = wanted.into_iter().map(|p| (p, false)).collect();
    runs.insert(1, (Precision::F32, true));
    for (precision, other_seed) in runs {
        let name = precision.name();
        let file_name = if other_seed {
            format!("{name}-seed{OTHER_SEED}")
        } else {
            name.to_string()
        };
        let (file, out) = write_pipeline(
            opts,
            &dir,
            &file_name,
            (&images, &labels, CLASSES),
            patch,
            epochs,
            batch,
        )?;
        let mut sets = vec![format!("train.precision={name}")];
        if other_seed {
            sets.push(format!("train.seed={OTHER_SEED}"));
        }
        let run = run_pipeline(&opts.exe, &file, &out, &sets, default_cap())?;
        let predictions = if run.ok {
            Some(last_epoch_predictions(&out.join("predictions.parquet"))?)
        } else {
            None
        };
        let agreement_with_f32 = match (&f32_predictions, &predictions) {
            (Some(base), Some(mine)) => Some(agreement(base, mine)),
            _ => None,
        };
        if precision == Precision::F32 && !other_seed {
            f32_predictions = predictions;
        }
        rows.push(PrecisionRow {
            precision,
            other_seed,
            run,
            agreement_with_f32,
        });
    }
    Ok(PrecisionReport {
        image_px: size,
        patch_px: patch,
        train_images: train,
        val_images: val,
        epochs,
        rows,
        skipped,
    })
}

/// Share of the images in `base` that `other` predicts the same class for.
pub fn agreement(base: &HashMap<String, i64>, other: &HashMap<String, i64>) -> f64 {
    if base.is_empty() {
        return f64::NAN;
    }
    let same = base
        .iter()
        .filter(|(id, p)| other.get(*id) == Some(*p))
        .count();
    same as f64 / base.len() as f64
}

/// image_id -> predicted class, from the last epoch of a run's predictions.parquet.
pub fn last_epoch_predictions(path: &Path) -> Result<HashMap<String, i64>, String> {
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(|e| err(&e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| err(&e))?;
    let mut rows: Vec<(u64, String, i64)> = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| err(&e))?;
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| err(&format!("no column '{name}'")))
        };
        let epoch = column("epoch")?.as_any().downcast_ref::<UInt64Array>();
        let id = column("image_id")?.as_any().downcast_ref::<StringArray>();
        let predicted = column("predicted")?.as_any().downcast_ref::<Int64Array>();
        let (Some(epoch), Some(id), Some(predicted)) = (epoch, id, predicted) else {
            return Err(err(&"epoch, image_id, predicted: unexpected column types"));
        };
        for i in 0..batch.num_rows() {
            rows.push((epoch.value(i), id.value(i).to_string(), predicted.value(i)));
        }
    }
    let last = rows.iter().map(|r| r.0).max().unwrap_or(0);
    Ok(rows
        .into_iter()
        .filter(|r| r.0 == last)
        .map(|(_, id, p)| (id, p))
        .collect())
}
