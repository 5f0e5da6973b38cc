//! Plugging patchgd into your own DataFusion platform (docs/integration.md).
//!
//! Run: `cargo run --example datafusion_platform [IMAGES_URL]`. Without a URL it generates 12
//! small UltraMNIST images in a temporary directory first.
//!
//! 1. One call registers patchgd's tables, table functions and UDFs in *your* SessionContext.
//! 2. Your SQL (or DataFrame code) queries image and patch metadata; filters reach the source.
//! 3. The patch stream is a `SendableRecordBatchStream`: hand it to any engine that takes one.

use datafusion::prelude::SessionContext;
use futures::StreamExt;
use patchgd::patch::Foreground;
use patchgd::sql::{DataSet, Sources, register};
use patchgd::storage::Location;
use patchgd::synth::{ImageFormat, Recipe, write_ultramnist};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _tmp;
    let images = match std::env::args().nth(1) {
        Some(url) => url,
        None => {
            let dir = tempfile::tempdir()?;
            let out = Location::parse(dir.path().to_str().unwrap())?;
            write_ultramnist(&out, &Recipe::new(512, 10, 7), 8, 4, None, ImageFormat::Png).await?;
            let url = dir.path().join("images").to_str().unwrap().to_string();
            _tmp = dir;
            url
        }
    };

    // Your platform's context, with its own settings and tables.
    let ctx = SessionContext::new();
    let mut data = DataSet::new(&images, 128);
    data.stream.channels = 1;
    // UltraMNIST: white digits on black, so foreground is brighter than the threshold.
    data.stream.foreground = Foreground {
        threshold: 32,
        light_background: false,
        min_fraction: 0.0,
    };
    register(
        &ctx,
        &Sources {
            data: Some(data),
            ..Default::default()
        },
    )
    .await?;

    println!("Foreground per image (statistics decoded, pixels never kept):");
    ctx.sql(
        "SELECT image_id, count(*) AS patches, round(avg(fg_fraction), 3) AS fg \
         FROM patches GROUP BY image_id ORDER BY fg DESC LIMIT 5",
    )
    .await?
    .show()
    .await?;

    println!("What reaches the source (EXPLAIN):");
    ctx.sql(
        "EXPLAIN SELECT image_id, row, col FROM patches WHERE image_id LIKE 'train/%' AND row < 2",
    )
    .await?
    .show()
    .await?;

    // The patch stream for another engine: only foreground patches, pixels included.
    let mut stream = ctx
        .sql("SELECT image_id, row, col, pixels FROM patches WHERE fg_fraction > 0.05")
        .await?
        .execute_stream()
        .await?;
    let (mut batches, mut rows, mut bytes) = (0, 0, 0);
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        batches += 1;
        rows += batch.num_rows();
        bytes += batch.get_array_memory_size();
    }
    println!(
        "streamed {rows} foreground patches in {batches} record batches ({} KiB)",
        bytes >> 10
    );
    Ok(())
}
