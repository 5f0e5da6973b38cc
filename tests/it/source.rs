//! The source stage: patch batches as a DataFusion stream, failures accounted, and a buffer
//! bounded in bytes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::TryStreamExt;
use patchgd::patch::patch_schema;
use patchgd::source::{Catalog, Split, StreamConfig, stream_images};
use patchgd::sql::adapter::into_record_batch_stream;
use patchgd::storage::Location;

use crate::common::{memory_url, square_dataset};

fn config(buffer_bytes: usize) -> StreamConfig {
    StreamConfig {
        buffer_bytes,
        ..StreamConfig::new(16, 1)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patches_stream_as_a_datafusion_record_batch_stream_and_failures_are_collected() {
    let root = memory_url("source-stream");
    let (images, labels) = square_dataset(&root, 40, 8, 4, 2, 1).await;
    Location::parse(&root)
        .unwrap()
        .put("images/val/0001.png", "broken")
        .await
        .unwrap();
    let loc = Location::parse(&images).unwrap();
    let catalog = Catalog::load(&loc, &labels, &Default::default())
        .await
        .unwrap();
    let entries = [catalog.split(Split::Train), catalog.split(Split::Val)].concat();
    let failures = Arc::new(Mutex::new(Vec::new()));
    let stream = into_record_batch_stream(
        stream_images(loc, entries, config(1 << 20)),
        failures.clone(),
    );
    assert_eq!(stream.schema(), patch_schema());
    let batches: Vec<_> = stream.try_collect().await.unwrap();
    // 40 px at 16 px patches: a 3 x 3 grid (padded), one batch per grid row; 5 good images.
    assert_eq!(batches.len(), 5 * 3);
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 5 * 9);
    let failures = failures.lock().unwrap();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].image_id, "val/0001");
    assert!(
        failures[0].url.ends_with("images/val/0001.png"),
        "{:?}",
        failures[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_buffer_is_bounded_in_bytes() {
    let root = memory_url("source-bound");
    let (images, labels) = square_dataset(&root, 64, 8, 12, 0, 2).await;
    let loc = Location::parse(&images).unwrap();
    let entries = Catalog::load(&loc, &labels, &Default::default())
        .await
        .unwrap()
        .split(Split::Train);
    // One band of a 64 px image at 16 px patches holds 4 x 256 pixel bytes: over 1 KiB.
    let small = stream_images(loc.clone(), entries.clone(), config(1024));
    let large = stream_images(loc, entries, config(64 << 20));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        small.len() <= 1,
        "a 1 KiB budget let {} batches wait",
        small.len()
    );
    assert_eq!(
        large.len(),
        12 * 4,
        "a large budget lets the whole set wait"
    );
}
