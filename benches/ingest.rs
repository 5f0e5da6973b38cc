//! Ingest: how fast the source stage turns objects into patch batches, against what the cores
//! could decode, and how much memory patching large tiled TIFFs takes.
//!
//! 1. Throughput, in decoded MB/s and patches/s, for PNG, JPEG and tiled TIFF (JPEG tiles), from
//!    file:// and from a local S3 server (moto, when `scripts/test` has installed it). The data
//!    is the real H&E region `tests/data/CMU-1-Small-Region.svs` (2220 x 2967 RGB) written in
//!    each format. `ratio` divides by (cores x the single-core decode rate of the same files);
//!    `ratio+p` by (cores x the single-core rate of decoding and cutting the patches with their
//!    statistics), i.e. how well the pipeline spreads the same work over the cores.
//! 2. Peak RSS of `patchgd inspect --scan` (a separate process per size) patching generated tiled
//!    TIFFs of 8k, 16k and 32k px, and PNGs (read row by row) of 8k, 16k and 20k px, with the
//!    same settings.
//! 3. Peak RSS of `patchgd predict --heatmaps` (a separate process per size) over the same tiled
//!    TIFFs, with a small_cnn model trained here on 512 px UltraMNIST PNGs at the same patch
//!    size: the fill pass streams the level as training does, and the heatmap's thumbnail is
//!    read from a coarse pyramid level.
//!
//! `scripts/bench` runs it in full (`cargo bench --bench ingest -- rss`: only parts 2 and 3); under
//! `cargo test` (no `--bench`) it runs small sizes as a smoke test.

use std::process::Command;
use std::time::Instant;

use bytes::Bytes;
use patchgd::patch::{Foreground, Grid, Raster};
use patchgd::patch::{ImageKey, band_batch};
use patchgd::source::decode::decode;
use patchgd::source::tiff::chunk::{Region, assemble_region, fetch_region};
use patchgd::source::tiff::write::{PyramidSpec, TileCompression, write_pyramid};
use patchgd::source::tiff::{TiffFile, read_rows};
use patchgd::source::{ImageEntry, SourceItem, Split, StreamConfig, stream_images};
use patchgd::storage::{Location, StoreOptions};
use patchgd::testkit::S3Server;

const PATCH: usize = 256;

/// The SVS region as RGB pixels.
async fn reference_pixels() -> (Vec<u8>, u32, u32) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/CMU-1-Small-Region.svs")
        .canonicalize()
        .expect("tests/data/CMU-1-Small-Region.svs");
    let (loc, p) =
        Location::parse_object(path.to_str().unwrap(), &StoreOptions::default()).unwrap();
    let size = loc.head(&p).await.unwrap().size;
    let head = loc.get_range(&p, 0..size.min(65536)).await.unwrap();
    let file = TiffFile::open(&loc, &p, size, head).await.unwrap();
    let d = &file.directories[0];
    let (w, h) = (d.width, d.height);
    (
        read_rows(&loc, &file, 0, 0, h as usize, 3).await.unwrap(),
        w,
        h,
    )
}

/// Write `copies` of the image in `format` under `loc/format/`.
async fn write_copies(loc: &Location, format: &str, px: &[u8], w: u32, h: u32, copies: usize) {
    let bytes: Bytes = match format {
        "png" => patchgd::source::decode::encode_png(w, h, 3, px).into(),
        "jpeg" => {
            let mut out = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
                .encode(px, w, h, image::ExtendedColorType::Rgb8)
                .unwrap();
            out.into()
        }
        _ => Bytes::new(),
    };
    for i in 0..copies {
        let name = format!("{format}/{i:03}.{format}");
        if format == "tiff" {
            let spec = PyramidSpec {
                levels: vec![(w, h)],
                tile: 256,
                channels: 3,
                compression: TileCompression::Jpeg { quality: 90 },
                bigtiff: false,
                description: String::new(),
            };
            write_pyramid(loc, &name, &spec, |_, tx, ty| tile_of(px, w, h, tx, ty))
                .await
                .unwrap();
        } else {
            loc.put(&name, bytes.clone()).await.unwrap();
        }
    }
}

fn tile_of(px: &[u8], w: u32, h: u32, tx: u32, ty: u32) -> Vec<u8> {
    let mut t = vec![0u8; 256 * 256 * 3];
    for y in 0..256 {
        let sy = ty * 256 + y;
        if sy >= h {
            break;
        }
        let x0 = tx * 256;
        let n = 256.min(w - x0) as usize * 3;
        let src = ((sy * w + x0) * 3) as usize;
        t[(y * 256 * 3) as usize..(y * 256 * 3) as usize + n].copy_from_slice(&px[src..src + n]);
    }
    t
}

async fn entries(loc: &Location, format: &str) -> Vec<ImageEntry> {
    let dir = loc.path(format);
    loc.list()
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.location.prefix_match(&dir).is_some())
        .map(|m| ImageEntry {
            image_id: m.location.to_string(),
            url: loc.url_of(&m.location),
            size: m.size,
            path: m.location,
            label: Some(0),
            split: Some(Split::Train),
        })
        .collect()
}

/// Decode every file on this thread alone (and, with `cut`, cut the patches with their
/// statistics as the source does): seconds.
async fn single_core_seconds(loc: &Location, format: &str, list: &[ImageEntry], cut: bool) -> f64 {
    let key = ImageKey {
        image_id: "x".into(),
        label: None,
        split: Some("train".into()),
    };
    let fg = Foreground::default();
    let start = Instant::now();
    for e in list {
        if format == "tiff" {
            let head = loc.get_range(&e.path, 0..e.size.min(65536)).await.unwrap();
            let file = TiffFile::open(loc, &e.path, e.size, head).await.unwrap();
            let d = file.directories[0].clone();
            let mut y = 0;
            while y < d.height as usize {
                let region = Region {
                    x: 0,
                    y,
                    width: d.width as usize,
                    height: PATCH.min(d.height as usize - y),
                };
                let chunks = fetch_region(loc, &file, 0, region).await.unwrap();
                let px = assemble_region(&d, 0, &chunks, region, 3).unwrap();
                if cut {
                    let (w, h) = (d.width as usize, d.height as usize);
                    let grid = Grid::new(w, h, PATCH, PATCH).unwrap();
                    let raster = Raster {
                        pixels: &px,
                        left: 0,
                        top: y,
                        width: w,
                        rows: region.height,
                        image_width: w,
                        image_height: h,
                        channels: 3,
                    };
                    std::hint::black_box(band_batch(&key, &grid, y / PATCH, &raster, 0, &fg));
                }
                std::hint::black_box(px);
                y += PATCH;
            }
        } else {
            let bytes = loc.get(&e.path).await.unwrap();
            let img = decode(&bytes, 3, None).unwrap();
            if cut {
                let grid = Grid::new(img.width, img.height, PATCH, PATCH).unwrap();
                let raster = Raster::whole(&img.pixels, img.width, img.height, 3);
                for row in 0..grid.rows {
                    std::hint::black_box(band_batch(&key, &grid, row, &raster, 0, &fg));
                }
            }
            std::hint::black_box(img);
        }
    }
    start.elapsed().as_secs_f64()
}

/// Stream every patch with `workers` parallel decodes: (seconds, patches).
async fn pipeline_seconds(loc: &Location, list: Vec<ImageEntry>, workers: usize) -> (f64, usize) {
    let mut config = StreamConfig::new(PATCH, 3);
    config.decode_workers = workers;
    config.buffer_bytes = 128 << 20;
    config.foreground = Foreground::default();
    let start = Instant::now();
    let mut rx = stream_images(loc.clone(), list, config);
    let mut patches = 0;
    while let Some(item) = rx.recv().await {
        match item {
            SourceItem::Batch(b) => patches += b.batch.num_rows(),
            SourceItem::Failed(f) => panic!("{f:?}"),
        }
    }
    (start.elapsed().as_secs_f64(), patches)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let only_rss = std::env::args().any(|a| a == "rss");
    let (copies, repeats) = if full { (8, 3) } else { (1, 1) };
    let dir = tempfile::tempdir().unwrap();
    if !only_rss {
        throughput(cores, copies, repeats, dir.path()).await;
    }
    peak_rss(full, dir.path());
    predict_rss(full, dir.path());
}

/// Part 1: decode and pipeline rates per format and store.
async fn throughput(cores: usize, copies: usize, repeats: usize, dir: &std::path::Path) {
    let (px, w, h) = reference_pixels().await;
    let image_mb = (w * h * 3) as f64 / 1e6;
    let local = Location::parse(dir.to_str().unwrap()).unwrap();
    let server = S3Server::binary().exists().then(S3Server::start);
    let s3 = server.as_ref().map(|s| {
        s.create_bucket("ingest");
        Location::parse_with("s3://ingest/bench", &s.options()).unwrap()
    });
    println!(
        "Ingest: {copies} copies of a {w} x {h} RGB H&E region per format, patches of {PATCH} px, {cores} cores, median of {repeats}"
    );
    println!(
        "{:<6} {:<6} {:>13} {:>13} {:>11} {:>10} {:>8} {:>9}",
        "format",
        "store",
        "decode MB/s",
        "+patch MB/s",
        "pipe MB/s",
        "patches/s",
        "ratio",
        "ratio+p"
    );
    for format in ["png", "jpeg", "tiff"] {
        write_copies(&local, format, &px, w, h, copies).await;
        let list = entries(&local, format).await;
        let (mut singles, mut singles_cut) = (Vec::new(), Vec::new());
        for _ in 0..repeats {
            singles.push(single_core_seconds(&local, format, &list, false).await);
            singles_cut.push(single_core_seconds(&local, format, &list, true).await);
        }
        let single_rate = image_mb * list.len() as f64 / median(singles);
        let cut_rate = image_mb * list.len() as f64 / median(singles_cut);
        let mut stores = vec![("file", local.clone())];
        if let Some(s3) = &s3 {
            write_copies(s3, format, &px, w, h, copies).await;
            stores.push(("s3", s3.clone()));
        }
        for (name, loc) in stores {
            let list = entries(&loc, format).await;
            let mut runs = Vec::new();
            let mut patches = 0;
            for _ in 0..repeats {
                let (s, p) = pipeline_seconds(&loc, list.clone(), cores * 2).await;
                runs.push(s);
                patches = p;
            }
            let secs = median(runs);
            let rate = image_mb * list.len() as f64 / secs;
            println!(
                "{:<6} {:<6} {:>13.1} {:>13.1} {:>11.1} {:>10.0} {:>8.2} {:>9.2}",
                format,
                name,
                single_rate,
                cut_rate,
                rate,
                patches as f64 / secs,
                rate / (cores as f64 * single_rate),
                rate / (cores as f64 * cut_rate)
            );
        }
    }
    if server.is_none() {
        println!(
            "(no S3 rows: {} is missing; scripts/test installs it)",
            S3Server::binary().display()
        );
    }
}

/// Part 2: peak RSS while patching big tiled TIFFs and PNGs, one process per image.
fn peak_rss(full: bool, dir: &std::path::Path) {
    let runs: &[(&str, u32)] = if full {
        &[
            ("tiff", 8192),
            ("tiff", 16384),
            ("tiff", 32768),
            ("png", 8192),
            ("png", 16384),
            ("png", 20480),
        ]
    } else {
        &[("tiff", 1024), ("tiff", 2048), ("png", 1024), ("png", 2048)]
    };
    println!(
        "\nPeak RSS of `patchgd inspect --scan` (patches {PATCH} px, RGB, 2 workers, 128 MiB buffer):"
    );
    println!(
        "{:<6} {:>8} {:>12} {:>10} {:>10} {:>18} {:>14} {:>10}",
        "format",
        "size",
        "object MiB",
        "patches",
        "seconds",
        "RSS before MiB",
        "peak RSS MiB",
        "growth"
    );
    let bin = env!("CARGO_BIN_EXE_patchgd");
    for &(format, size) in runs {
        let file = generated_image(dir, format, size);
        let object_mib = std::fs::metadata(&file).unwrap().len() as f64 / (1 << 20) as f64;
        let scan = Command::new(bin)
            .args([
                "inspect",
                file.to_str().unwrap(),
                "--scan",
                "--patch",
                "256",
                "--channels",
                "3",
                "--foreground",
                "dark:32",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&scan.stdout);
        assert!(
            scan.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&scan.stderr)
        );
        let line = text
            .lines()
            .find(|l| l.starts_with("scan:"))
            .expect("a scan line");
        let field = |after: &str, before: &str| -> String {
            let s = &line[line.find(after).unwrap() + after.len()..];
            s[..s.find(before).unwrap()].trim().to_string()
        };
        let before: f64 = field("RSS before scan ", " MiB").parse().unwrap();
        let peak: f64 = field("peak RSS ", " MiB").parse().unwrap();
        println!(
            "{:<6} {:>8} {:>12.1} {:>10} {:>10} {:>18.0} {:>14.0} {:>10.0}",
            format,
            size,
            object_mib,
            field("failed), ", " patches"),
            field("pixels in ", " s"),
            before,
            peak,
            peak - before
        );
    }
}

/// Run `patchgd ARGS`, failing with its output when it fails; returns stdout.
fn patchgd(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_patchgd"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "patchgd {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One generated UltraMNIST image of `size` px (`tiff`: tiled pyramid, 256 px tiles; `png`),
/// written under `dir` once and shared by parts 2 and 3.
fn generated_image(dir: &std::path::Path, format: &str, size: u32) -> std::path::PathBuf {
    let out = dir.join(format!("{format}{size}"));
    let ext = if format == "tiff" { "tif" } else { format };
    let file = out.join(format!("images/train/000000.{ext}"));
    if !file.exists() {
        let tile: &[&str] = if format == "tiff" {
            &["--tile", "256"]
        } else {
            &[]
        };
        let size = size.to_string();
        let args = [
            &["synth", "ultramnist", "--format", format, "--classes", "10"][..],
            &["--train", "1", "--val", "0", "--size", &size],
            &["--out", out.to_str().unwrap()],
            tile,
        ]
        .concat();
        patchgd(&args);
    }
    file
}

/// Part 3: peak RSS of `patchgd predict --heatmaps` over part 2's tiled TIFFs.
fn predict_rss(full: bool, dir: &std::path::Path) {
    let sizes: &[u32] = if full {
        &[8192, 16384, 32768]
    } else {
        &[1024, 2048]
    };
    // A model for 256 px grey patches, trained for one epoch on small UltraMNIST PNGs.
    let data = dir.join("predict-train");
    let model = dir.join("predict-model");
    let d = data.to_str().unwrap();
    patchgd(&[
        "synth",
        "ultramnist",
        "--out",
        d,
        "--size",
        "512",
        "--classes",
        "2",
        "--train",
        "8",
        "--val",
        "4",
        "--seed",
        "5",
    ]);
    let yaml = format!(
        "name: rss-model
source:
  images: {d}/images
  labels: {d}/labels.csv
  channels: 1
  buffer_mib: 64
patch:
  size: {PATCH}
  foreground:
    background: dark
    threshold: 32
model:
  backbone: small_cnn
  latent_dim: 32
  head_width: 32
patchgd:
  fill_chunk: 32
train:
  epochs: 1
  batch_size: 4
  device: cpu
output: {}
",
        model.display()
    );
    let file = dir.join("predict-model.yaml");
    std::fs::write(&file, yaml).unwrap();
    patchgd(&["run", file.to_str().unwrap(), "--fresh", "--no-progress"]);
    println!(
        "\nPeak RSS of `patchgd predict --heatmaps` (small_cnn, patches {PATCH} px, grey, foreground dark:32, fill_chunk 32, 64 MiB buffer):"
    );
    println!(
        "{:<8} {:>12} {:>8} {:>14} {:>10} {:>14} {:>32}",
        "size", "object MiB", "cells", "patch passes", "seconds", "peak RSS MiB", "picture"
    );
    for &size in sizes {
        let file = generated_image(dir, "tiff", size);
        let out = dir.join(format!("predicted{size}"));
        patchgd(&[
            "predict",
            "--model",
            model.to_str().unwrap(),
            "--images",
            file.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--heatmaps",
            "--no-progress",
        ]);
        let summary: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
        assert_eq!(summary["images_predicted"], 1, "{summary}");
        assert_eq!(summary["heatmaps"]["pictures"], 1, "{summary}");
        let cells = (size as usize / PATCH).pow(2);
        assert_eq!(summary["heatmaps"]["rows"], cells * 2, "{summary}");
        // One object given as --images: its id is its name.
        let picture = image::open(out.join("heatmaps/000000.png")).unwrap();
        let object_mib = std::fs::metadata(&file).unwrap().len() as f64 / (1 << 20) as f64;
        println!(
            "{:<8} {:>12.1} {:>8} {:>14} {:>10.1} {:>14.0} {:>32}",
            size,
            object_mib,
            cells,
            summary["patch_passes"],
            summary["seconds"].as_f64().unwrap(),
            summary["peak_rss_bytes"].as_f64().unwrap() / (1 << 20) as f64,
            format!("{} x {} px", picture.width(), picture.height()),
        );
    }
}
