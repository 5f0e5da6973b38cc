//! Helpers shared by the integration tests: small generated data sets in memory:// stores.

use arrow::record_batch::RecordBatch;
use patchgd::source::decode::encode_png;
use patchgd::source::{Catalog, Failure, SourceItem, Split, StreamConfig, stream_images};
use patchgd::storage::{Location, StoreOptions};

/// A unique memory:// URL per test, so tests in one process never share objects.
pub fn memory_url(test: &str) -> String {
    format!("memory://it-{test}")
}

/// A PatchGD run trained for two epochs on a square set of 16 + 8 images (32 px, patch 16);
/// returns (root, images, labels, run output).
pub fn trained_run(test: &str) -> (String, String, String, String) {
    trained(test, (16, 8, 9), 2, "")
}

/// A GD run (32 px whole images) trained for one epoch on `train` + `val` square images;
/// returns (root, images, labels, run output).
pub fn trained_gd_run(
    test: &str,
    train: usize,
    val: usize,
    seed: u64,
) -> (String, String, String, String) {
    trained(
        test,
        (train, val, seed),
        1,
        "method: gd\ngd:\n  image_size: 32\n",
    )
}

fn trained(
    test: &str,
    (train, val, seed): (usize, usize, u64),
    epochs: u64,
    extra: &str,
) -> (String, String, String, String) {
    let root = memory_url(test);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (images, labels) = rt.block_on(square_dataset(&root, 32, 8, train, val, seed));
    let out = format!("{root}/run");
    let yaml = pipeline_yaml(&images, &labels, &out, 16, epochs, extra);
    let def = patchgd::pipeline::Definition::from_yaml(&yaml, "p.yaml").unwrap();
    patchgd::pipeline::run_with(&def, &Default::default()).unwrap();
    (root, images, labels, out)
}

/// A `patchgd predict` request of 5 images per head pass, without heatmaps.
pub fn predict_request(
    model: &str,
    images: &str,
    labels: Option<&str>,
    output: &str,
) -> patchgd::pipeline::PredictRequest {
    patchgd::pipeline::PredictRequest {
        model: model.into(),
        images: images.into(),
        labels: labels.map(String::from),
        output: output.into(),
        storage: Default::default(),
        batch_size: Some(5),
        device: None,
        heatmaps: false,
    }
}

/// A two-class "find the square" set: every image is `size` x `size` grey with low noise;
/// class 1 images also have a bright square of `square` px at a random place. Returns the
/// images URL and labels URL.
pub async fn square_dataset(
    root: &str,
    size: usize,
    square: usize,
    train: usize,
    val: usize,
    seed: u64,
) -> (String, String) {
    let loc = Location::parse(root).unwrap();
    let mut rng = patchgd::rng::Rng::new(seed);
    let mut csv = String::from("image_id,label,split\n");
    for (split, count) in [("train", train), ("val", val)] {
        for i in 0..count {
            let label = i % 2;
            let mut px: Vec<u8> = (0..size * size).map(|_| rng.below(40) as u8).collect();
            if label == 1 {
                let x0 = rng.below((size - square) as u64) as usize;
                let y0 = rng.below((size - square) as u64) as usize;
                for y in y0..y0 + square {
                    for x in x0..x0 + square {
                        px[y * size + x] = 220;
                    }
                }
            }
            let id = format!("{split}/{i:04}");
            loc.put(
                &format!("images/{id}.png"),
                encode_png(size as u32, size as u32, 1, &px),
            )
            .await
            .unwrap();
            csv.push_str(&format!("{id},{label},{split}\n"));
        }
    }
    loc.put("labels.csv", csv).await.unwrap();
    (format!("{root}/images"), format!("{root}/labels.csv"))
}

/// A pipeline file over the given data, small CNN, small head; `extra` is appended verbatim.
pub fn pipeline_yaml(
    images: &str,
    labels: &str,
    output: &str,
    patch: usize,
    epochs: u64,
    extra: &str,
) -> String {
    format!(
        "name: test\nsource:\n  images: {images}\n  labels: {labels}\n  channels: 1\npatch:\n  size: {patch}\nmodel:\n  backbone: small_cnn\n  latent_dim: 16\n  head_width: 16\npatchgd:\n  sampling_fraction: 0.25\ntrain:\n  epochs: {epochs}\n  batch_size: 8\n  lr: 0.003\n  warmup_epochs: 0.5\n  device: cpu\n  seed: 7\noutput: {output}\n{extra}"
    )
}

/// Every record batch of a Parquet object.
pub async fn read_parquet(loc: &Location, name: &str) -> Vec<arrow::record_batch::RecordBatch> {
    let bytes = loc.get_relative(name).await.unwrap();
    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect()
}

/// The JSON header of a safetensors file: tensor names to dtype, shape and offsets.
pub fn safetensors_header(bytes: &[u8]) -> serde_json::Value {
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[8..8 + len]).unwrap()
}

/// Every batch of a split, in order, and the failures.
pub async fn stream_all(
    images: &str,
    labels: &str,
    options: &StoreOptions,
    config: StreamConfig,
) -> (Vec<RecordBatch>, Vec<Failure>, usize) {
    let loc = Location::parse_with(images, options).unwrap();
    let catalog = Catalog::load(&loc, labels, options).await.unwrap();
    let entries = catalog.split(Split::Train);
    let n = entries.len();
    let mut rx = stream_images(loc, entries, config);
    let (mut batches, mut failures) = (Vec::new(), Vec::new());
    while let Some(item) = rx.recv().await {
        match item {
            SourceItem::Batch(b) => batches.push(b.batch.clone()),
            SourceItem::Failed(f) => failures.push(f),
        }
    }
    (batches, failures, n)
}
