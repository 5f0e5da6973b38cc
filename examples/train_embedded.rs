//! Training from your own program, with the library alone (docs/integration.md).
//!
//! Run: `cargo run --example train_embedded`. It generates 24 small UltraMNIST images in a
//! temporary directory, trains PatchGD on them for two epochs, and shows the run's progress
//! through an observer of its own instead of the command line's progress bar. It builds with
//! `default-features = false` (scripts/test checks that): no clap, no terminal UI.

use std::sync::Arc;

use patchgd::pipeline::{Definition, RunObserver, RunOptions, run_with};
use patchgd::sink::EpochMetrics;
use patchgd::storage::Location;
use patchgd::synth::{ImageFormat, Recipe, write_ultramnist};

/// Your platform's progress reporting: here, plain lines on stdout.
struct PrintProgress;

impl RunObserver for PrintProgress {
    fn note(&self, line: &str) {
        println!("note: {line}");
    }
    fn epoch_finished(&self, m: &EpochMetrics) {
        println!(
            "epoch {}: train loss {:.3}, validation accuracy {:.3}",
            m.epoch, m.train_loss, m.val_accuracy
        );
    }
}

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().to_str().expect("a UTF-8 temporary path");
    tokio::runtime::Runtime::new()?.block_on(write_ultramnist(
        &Location::parse(root)?,
        &Recipe::new(256, 4, 7),
        16,
        8,
        None,
        ImageFormat::Png,
    ))?;
    let yaml = format!(
        "name: embedded
source: {{images: {root}/images, labels: {root}/labels.csv, channels: 1}}
patch: {{size: 64, foreground: {{background: dark, threshold: 32}}}}
model: {{backbone: small_cnn, latent_dim: 16, head_width: 16}}
train: {{epochs: 2, batch_size: 4, lr: 0.003, device: cpu}}
output: {root}/out
"
    );
    let def = Definition::from_yaml(&yaml, "embedded.yaml")?;
    let options = RunOptions {
        observer: Some(Arc::new(PrintProgress)),
        ..Default::default()
    };
    let summary = run_with(&def, &options)?;
    println!(
        "images seen {} = used {} + failed {}; results in {}",
        summary.images_seen, summary.images_used, summary.images_failed, summary.output
    );
    Ok(())
}
