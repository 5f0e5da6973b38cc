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

/// Every patch of a PNG streamed row by row, checked against a crop of the whole decode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_png_read_row_by_row_gives_the_patches_of_a_whole_decode_with_overlapping_strides() {
    use arrow::array::{Array, BinaryArray, UInt32Array};
    use patchgd::source::decode::{decode, encode_png};
    let (w, h) = (100usize, 70usize);
    let rgb: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
    let png = encode_png(w as u32, h as u32, 3, &rgb);
    let root = memory_url("source-png-rows");
    let out = Location::parse(&root).unwrap();
    out.put("images/a.png", png.clone()).await.unwrap();
    out.put("labels.csv", "image_id,label,split\na,1,train\n")
        .await
        .unwrap();
    let loc = Location::parse(&format!("{root}/images")).unwrap();
    let entries = Catalog::load(&loc, &format!("{root}/labels.csv"), &Default::default())
        .await
        .unwrap()
        .split(Split::Train);
    for (channels, stride) in [(3, 12), (1, 16), (3, 20)] {
        let whole = decode(&png, channels, None).unwrap().pixels;
        let config = StreamConfig {
            stride,
            png_rows_above_bytes: 0, // this small PNG too is read row by row
            ..StreamConfig::new(16, channels)
        };
        let mut rx = stream_images(loc.clone(), entries.clone(), config);
        let mut patches = 0;
        while let Some(item) = rx.recv().await {
            let batch = match item {
                patchgd::source::SourceItem::Batch(b) => b.batch.clone(),
                patchgd::source::SourceItem::Failed(f) => panic!("{f:?}"),
            };
            let col = |name: &str| batch.column_by_name(name).unwrap().clone();
            let xs = col("x");
            let xs = xs.as_any().downcast_ref::<UInt32Array>().unwrap();
            let ys = col("y");
            let ys = ys.as_any().downcast_ref::<UInt32Array>().unwrap();
            let px = col("pixels");
            let px = px.as_any().downcast_ref::<BinaryArray>().unwrap();
            for i in 0..batch.num_rows() {
                let (x0, y0) = (xs.value(i) as usize, ys.value(i) as usize);
                let mut want = vec![0u8; 16 * 16 * channels];
                for dy in 0..16 {
                    for dx in 0..16 {
                        let (x, y) = (x0 + dx, y0 + dy);
                        if x < w && y < h {
                            let (src, dst) = ((y * w + x) * channels, (dy * 16 + dx) * channels);
                            want[dst..dst + channels].copy_from_slice(&whole[src..src + channels]);
                        }
                    }
                }
                assert!(!px.is_null(i));
                assert_eq!(
                    px.value(i),
                    &want[..],
                    "channels {channels}, stride {stride}, patch at ({x0}, {y0})"
                );
                patches += 1;
            }
        }
        let grid = patchgd::patch::Grid::new(w, h, 16, stride).unwrap();
        assert_eq!(patches, grid.rows * grid.cols, "stride {stride}");
    }
}
