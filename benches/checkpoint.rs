//! Checkpoint cost: time and bytes to write and to read back a checkpoint holding the latents of
//! 10,000 images at D = 256 on a 16 x 16 grid (k = 16), on file://. The latent store keeps
//! 1 GiB in memory and spills the rest, as in a real run. Weights are left out: they are
//! megabytes (small CNN ~1 MB, resnet50 ~100 MB) next to 2.6 GB of latents.
//!
//! `scripts/bench` runs it in full; under `cargo test` (no `--bench`) it runs 50 images.

use std::time::Instant;

use patchgd::state::checkpoint;
use patchgd::state::{LatentGrid, LatentStore};
use patchgd::storage::Location;

const DIM: u32 = 256;
const K: u32 = 16;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let images = if full { 10_000 } else { 50 };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut store = LatentStore::new(1 << 30, Some(&dir.path().join("spill"))).unwrap();
    let cells = (K * K) as usize;
    let fill_started = Instant::now();
    for i in 0..images {
        let values: Vec<f32> = (0..cells * DIM as usize)
            .map(|j| ((i * 7919 + j) % 1000) as f32 * 1e-3)
            .collect();
        let grid = LatentGrid {
            rows: K,
            cols: K,
            dim: DIM,
            values,
            steps: vec![i as u64; cells],
        };
        store.put(&format!("train/{i:06}"), grid).unwrap();
    }
    let fill_s = fill_started.elapsed().as_secs_f64();
    let root = Location::parse(dir.path().join("checkpoints").to_str().unwrap()).unwrap();

    // The snapshot alone (pieces dropped), then the real write: streamed to the store.
    let started = Instant::now();
    let bytes = store.write_snapshot(|_| Ok(())).unwrap();
    let snapshot_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    rt.block_on(async {
        let mut w = checkpoint::Writer::begin(&root, 1).await?;
        w.put_pieces("latents.arrow", store.snapshot()).await?;
        w.put("state.yaml", b"{}".to_vec().into()).await?;
        w.finish().await
    })
    .unwrap();
    let write_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let loaded = rt.block_on(checkpoint::read(&root, 1)).unwrap();
    let read_s = started.elapsed().as_secs_f64();
    let mut restored = LatentStore::new(1 << 30, Some(&dir.path().join("spill2"))).unwrap();
    let file = std::fs::File::open(loaded.path("latents.arrow").unwrap()).unwrap();
    restored
        .read_snapshot(std::io::BufReader::new(file))
        .unwrap();
    let restore_s = started.elapsed().as_secs_f64();
    assert_eq!(restored.len(), images);

    let mb = bytes as f64 / 1e6;
    println!(
        "Checkpoint of {images} images' latents (D = {DIM}, {K} x {K} cells), file://, store budget 1 GiB ({} spilled; filling it took {fill_s:.1} s)",
        store.spilled()
    );
    println!("{:<44} {:>10} {:>10} {:>10}", "", "seconds", "MB", "MB/s");
    println!(
        "{:<44} {:>10.2} {:>10.1} {:>10.0}",
        "write: snapshot to Arrow IPC (pieces dropped)",
        snapshot_s,
        mb,
        mb / snapshot_s
    );
    println!(
        "{:<44} {:>10.2} {:>10.1} {:>10.0}",
        "write: snapshot streamed + CRC-32, manifest",
        write_s,
        mb,
        mb / write_s
    );
    println!(
        "{:<44} {:>10.2} {:>10.1} {:>10.0}",
        "read: stream to a local file + CRC-32",
        read_s,
        mb,
        mb / read_s
    );
    println!(
        "{:<44} {:>10.2} {:>10.1} {:>10.0}",
        "read: + restore into a store (spilling)",
        restore_s,
        mb,
        mb / restore_s
    );
}
