//! TIFF by byte range: the real Aperio slides in tests/data against their known values,
//! generated pyramids in every compression (and BigTIFF) against the pixels that made them, and
//! broken files through the source stage.

use std::sync::{Arc, Mutex};

use arrow::array::{Array, Float32Array, UInt32Array};
use futures::TryStreamExt;
use patchgd::source::tiff::write::TileCompression;
use patchgd::source::tiff::{TiffFile, read_rows};
use patchgd::source::{Catalog, Split, StreamConfig, stream_images};
use patchgd::sql::adapter::into_record_batch_stream;
use patchgd::storage::{Location, StoreOptions};
use patchgd::synth::{Recipe, layout_image, write_tiff_image};

use crate::common::memory_url;

/// A file in tests/data (its source, licence and known values: tests/data/README.md).
pub fn test_data(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    assert!(path.exists(), "{} is missing", path.display());
    path.canonicalize().unwrap().display().to_string()
}

async fn open(url: &str) -> (Location, TiffFile) {
    let (loc, path) = Location::parse_object(url, &StoreOptions::default()).unwrap();
    let size = loc.head(&path).await.unwrap().size;
    let head = loc.get_range(&path, 0..size.min(65536)).await.unwrap();
    let file = TiffFile::open(&loc, &path, size, head).await.unwrap();
    (loc, file)
}

/// Per-channel means of an interleaved RGB region.
fn channel_means(px: &[u8], width: usize, x0: usize, y0: usize, w: usize, h: usize) -> [f64; 3] {
    let mut sums = [0u64; 3];
    for y in y0..y0 + h {
        for x in x0..x0 + w {
            for c in 0..3 {
                sums[c] += px[(y * width + x) * 3 + c] as u64;
            }
        }
    }
    sums.map(|s| s as f64 / (w * h) as f64)
}

fn assert_close(got: [f64; 3], want: [f64; 3], what: &str) {
    for c in 0..3 {
        assert!(
            (got[c] - want[c]).abs() < 1.0,
            "{what}: channel {c} mean {:.2}, reference {:.2}",
            got[c],
            want[c]
        );
    }
}

#[tokio::test]
async fn cmu_small_region_svs_has_the_documented_directories_and_pixel_means() {
    let (loc, file) = open(&test_data("CMU-1-Small-Region.svs")).await;
    assert!(!file.bigtiff && file.little_endian);
    let dirs: Vec<_> = file
        .directories
        .iter()
        .map(|d| (d.width, d.height, d.tiled, d.compression, d.samples))
        .collect();
    assert_eq!(
        dirs,
        vec![
            (2220, 2967, true, 7, 3),
            (574, 768, false, 7, 3),
            (387, 463, false, 5, 3),
            (1280, 431, false, 7, 3),
        ]
    );
    let d0 = &file.directories[0];
    assert_eq!((d0.chunk_width, d0.chunk_height), (240, 240));
    assert!(d0.jpeg_tables.is_some(), "SVS tiles share JPEGTables");
    assert!(
        d0.description
            .as_deref()
            .unwrap()
            .starts_with("Aperio Image Library v11.2.1")
    );
    assert_eq!(
        file.levels,
        vec![0],
        "thumbnail, label and macro are not levels"
    );
    assert!(file.mpp().is_some_and(|m| (m - 0.499).abs() < 0.01));
    let px = read_rows(&loc, &file, 0, 0, 2967, 3).await.unwrap();
    assert_close(
        channel_means(&px, 2220, 0, 0, 2220, 2967),
        [214.01, 194.81, 207.90],
        "dir 0",
    );
    assert_close(
        channel_means(&px, 2220, 0, 0, 256, 256),
        [241.97, 240.06, 240.87],
        "dir 0 top-left 256 x 256",
    );
    // A band read alone gives the same rows as the whole (rows 300..556 cross tile rows).
    let band = read_rows(&loc, &file, 0, 300, 256, 3).await.unwrap();
    assert_eq!(&band[..], &px[300 * 2220 * 3..556 * 2220 * 3]);
}

#[tokio::test]
async fn small_svs_with_a_tile_larger_than_the_image() {
    let (loc, file) = open(&test_data("small.svs")).await;
    let d0 = &file.directories[0];
    assert_eq!((d0.width, d0.height, d0.chunk_width), (16, 16, 64));
    let px = read_rows(&loc, &file, 0, 0, 16, 3).await.unwrap();
    assert_close(
        channel_means(&px, 16, 0, 0, 16, 16),
        [238.15, 233.95, 236.82],
        "small.svs dir 0",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_svs_streams_as_patches_with_statistics() {
    let path = test_data("CMU-1-Small-Region.svs");
    let dir = path.rsplit_once('/').unwrap().0.to_string();
    let loc = Location::parse(&dir).unwrap();
    let meta = loc
        .list()
        .await
        .unwrap()
        .into_iter()
        .find(|m| m.location.as_ref().ends_with("CMU-1-Small-Region.svs"))
        .unwrap();
    let entry = patchgd::source::ImageEntry {
        image_id: "cmu".into(),
        url: loc.url_of(&meta.location),
        size: meta.size,
        path: meta.location,
        label: Some(0),
        split: Some(Split::Val),
    };
    let failures = Arc::new(Mutex::new(Vec::new()));
    let config = StreamConfig::new(256, 3);
    let batches: Vec<_> =
        into_record_batch_stream(stream_images(loc, vec![entry], config), failures.clone())
            .try_collect()
            .await
            .unwrap();
    assert!(failures.lock().unwrap().is_empty(), "{failures:?}");
    // 2220 x 2967 at 256 px: 9 columns x 12 rows, one batch per row.
    assert_eq!(batches.len(), 12);
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 108);
    let first = &batches[0];
    let mean = first
        .column_by_name("mean")
        .unwrap()
        .as_any()
        .downcast_ref::<Float32Array>()
        .unwrap()
        .value(0) as f64;
    let reference = (241.97 + 240.06 + 240.87) / 3.0;
    assert!((mean - reference).abs() < 1.0, "patch (0,0) mean {mean}");
    // Glass is bright: the top-left patch is mostly background, the slide as a whole is not.
    let fg: Vec<f32> = batches
        .iter()
        .flat_map(|b| {
            b.column_by_name("fg_fraction")
                .unwrap()
                .as_any()
                .downcast_ref::<Float32Array>()
                .unwrap()
                .values()
                .to_vec()
        })
        .collect();
    assert!(fg[0] < 0.2, "top-left fg {}", fg[0]);
    assert!(fg.iter().any(|&f| f > 0.8), "some patch is mostly tissue");
}

/// Pixels of a generated image's level, drawn directly (the writer's input).
fn expected_level(recipe: &Recipe, level: usize) -> (Vec<u8>, u32) {
    let layout = layout_image(recipe, "train", 0, 7, None);
    let size = recipe.size.div_ceil(1 << level);
    (layout.render_window(1 << level, 0, 0, size, size), size)
}

#[tokio::test]
async fn generated_pyramids_read_back_exactly_in_every_compression_and_bigtiff() {
    let recipe = Recipe::new(1000, 10, 3); // not a multiple of the tile: edge tiles are padded
    let layout = layout_image(&recipe, "train", 0, 7, None);
    let root = memory_url("tiff-roundtrip");
    let out = Location::parse(&root).unwrap();
    for (name, compression, big) in [
        ("none", TileCompression::None, false),
        ("lzw", TileCompression::Lzw, false),
        ("deflate", TileCompression::Deflate, true),
        ("jpeg", TileCompression::Jpeg { quality: 90 }, false),
    ] {
        let file_name = format!("{name}.tif");
        write_tiff_image(&out, &file_name, &layout, 1000, 256, compression, big)
            .await
            .unwrap();
        let (loc, file) = open(&format!("{root}/{file_name}")).await;
        assert_eq!(file.bigtiff, big);
        // 1000 -> 500 -> 250: levels halve until one tile holds the level.
        let widths: Vec<u32> = file
            .levels
            .iter()
            .map(|&d| file.directories[d].width)
            .collect();
        assert_eq!(widths, vec![1000, 500, 250], "{name}");
        for level in [0, 1] {
            let (want, size) = expected_level(&recipe, level);
            let got = read_rows(&loc, &file, level, 0, size as usize, 1)
                .await
                .unwrap();
            assert_eq!(got.len(), want.len());
            if matches!(compression, TileCompression::Jpeg { .. }) {
                let mad = got
                    .iter()
                    .zip(&want)
                    .map(|(&a, &b)| (a as i32 - b as i32).abs() as f64)
                    .sum::<f64>()
                    / got.len() as f64;
                assert!(mad < 2.0, "jpeg level {level}: mean abs diff {mad}");
            } else {
                assert!(got == want, "{name} level {level} differs");
            }
        }
        // Grey to RGB on request.
        let rgb = read_rows(&loc, &file, 1, 0, 2, 3).await.unwrap();
        assert_eq!(rgb.len(), 500 * 2 * 3);
    }
}

/// Replace the first occurrence of `pattern` in `bytes`.
fn patch_bytes(bytes: &mut [u8], pattern: &[u8], replacement: &[u8]) {
    let at = bytes
        .windows(pattern.len())
        .position(|w| w == pattern)
        .expect("pattern present");
    bytes[at..at + replacement.len()].copy_from_slice(replacement);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_images_are_reported_by_name_and_every_image_is_accounted_for() {
    let root = memory_url("tiff-broken");
    let out = Location::parse(&root).unwrap();
    let recipe = Recipe::new(128, 10, 5);
    let layout = layout_image(&recipe, "train", 0, 7, None);
    // A good uncompressed 128 px TIFF, 64 px tiles: 4 tiles at level 0, one at level 1.
    write_tiff_image(
        &out,
        "images/good.tif",
        &layout,
        128,
        64,
        TileCompression::None,
        false,
    )
    .await
    .unwrap();
    let good = out.get_relative("images/good.tif").await.unwrap().to_vec();
    let mut files: Vec<(&str, Vec<u8>)> = vec![("truncated.tif", good[..good.len() / 2].to_vec())];
    let mut short = good.clone();
    let counts: Vec<u8> = [4096u32; 4].iter().flat_map(|c| c.to_le_bytes()).collect();
    let mut shorter = counts.clone();
    shorter[4..8].copy_from_slice(&100u32.to_le_bytes());
    patch_bytes(&mut short, &counts, &shorter);
    files.push(("short_tile.tif", short));
    let (_, file) = open(&format!("{root}/images/good.tif")).await;
    let offsets: Vec<u8> = file.directories[0]
        .offsets
        .iter()
        .flat_map(|&o| (o as u32).to_le_bytes())
        .collect();
    let mut missing = good.clone();
    let mut zeroed = offsets.clone();
    zeroed[8..12].copy_from_slice(&0u32.to_le_bytes());
    patch_bytes(&mut missing, &offsets, &zeroed);
    files.push(("missing_tile.tif", missing));
    // Compression tag (259, SHORT, 1, value 1) rewritten to Aperio's JPEG 2000 code.
    let mut j2k = good.clone();
    patch_bytes(
        &mut j2k,
        &[3, 1, 3, 0, 1, 0, 0, 0, 1, 0],
        &[3, 1, 3, 0, 1, 0, 0, 0, 0xEB, 0x80],
    );
    files.push(("jpeg2000.tif", j2k));
    files.push(("empty.png", Vec::new()));
    files.push((
        "tiny.png",
        patchgd::source::decode::encode_png(8, 8, 1, &[9; 64]),
    ));
    files.push(("notes.txt", b"not an image at all".to_vec()));
    // A PNG cut short: read row by row, its first bands arrive, then the band whose rows are
    // missing fails, and every later band hands that failure on (reported once).
    let noise: Vec<u8> = (0..128 * 128u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let cut = patchgd::source::decode::encode_png(128, 128, 1, &noise);
    files.push(("cut.png", cut[..cut.len() * 2 / 3].to_vec()));
    let mut labels = String::from("image_id,label,split\ngood,1,train\n");
    for (name, bytes) in files {
        out.put(&format!("images/{name}"), bytes).await.unwrap();
        let id = name.rsplit_once('.').map_or(name, |p| p.0);
        labels.push_str(&format!("{id},1,train\n"));
    }
    out.put("labels.csv", labels).await.unwrap();

    let images = Location::parse(&format!("{root}/images")).unwrap();
    let catalog = Catalog::load(&images, &format!("{root}/labels.csv"), &Default::default())
        .await
        .unwrap();
    assert_eq!(catalog.images.len(), 9);
    let config = StreamConfig {
        png_rows_above_bytes: 0, // cut.png is read row by row
        ..StreamConfig::new(32, 1)
    };
    let mut rx = stream_images(images, catalog.split(Split::Train), config);
    let mut failures = Vec::new();
    let mut complete = std::collections::BTreeMap::<String, usize>::new();
    while let Some(item) = rx.recv().await {
        match item {
            patchgd::source::SourceItem::Failed(f) => failures.push(f),
            patchgd::source::SourceItem::Batch(b) => {
                let id = b
                    .batch
                    .column(0)
                    .as_any()
                    .downcast_ref::<arrow::array::StringArray>()
                    .unwrap()
                    .value(0)
                    .to_string();
                let rows = b
                    .batch
                    .column_by_name("row")
                    .unwrap()
                    .as_any()
                    .downcast_ref::<UInt32Array>()
                    .unwrap()
                    .len();
                *complete.entry(id).or_default() += rows;
            }
        }
    }
    let message = |id: &str| {
        failures
            .iter()
            .find(|f| f.image_id == id)
            .map(|f| format!("{}: {}", f.url, f.message))
            .unwrap_or_else(|| panic!("no failure for {id}: {failures:?}"))
    };
    let expect = [
        ("truncated", "truncated"),
        ("short_tile", "short tile"),
        ("missing_tile", "tile 2 (row 1, col 0) is missing"),
        ("jpeg2000", "JPEG 2000 (Aperio) (33003)"),
        ("empty", "empty object"),
        ("tiny", "larger than the image"),
        ("notes", "not an image"),
        ("cut", "cannot decode Png: row"),
    ];
    for (id, words) in expect {
        let m = message(id);
        assert!(m.contains(words) && m.contains(id), "{id}: {m}");
    }
    assert_eq!(failures.len(), expect.len(), "{failures:?}");
    // The missing tile is in the lower half: the upper bands were sent before the failure, and a
    // consumer discards them (as the trainer's assembler does); no band follows a failure.
    assert_eq!(complete.get("missing_tile"), Some(&8));
    let cut_rows = complete.get("cut").copied().unwrap_or(0);
    assert!(
        cut_rows > 0 && cut_rows < 16,
        "cut.png: {cut_rows} of 16 patches before its failure"
    );
    for f in &failures {
        complete.remove(&f.image_id);
    }
    // seen = used + failed: only the good image produced patches, all 16 of them.
    assert_eq!(complete.len(), 1, "{complete:?}");
    assert_eq!(complete.get("good"), Some(&16));
}

#[test]
fn a_pipeline_trains_on_a_tiff_pyramid_level_and_reports_the_broken_file() {
    use patchgd::pipeline::{Definition, run};
    use patchgd::synth::ImageFormat;
    let root = memory_url("tiff-train");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let loc = Location::parse(&root).unwrap();
    let format = ImageFormat::Tiff {
        tile: 64,
        compression: TileCompression::Jpeg { quality: 90 },
        bigtiff: false,
    };
    rt.block_on(patchgd::synth::write_ultramnist(
        &loc,
        &Recipe::new(256, 2, 4),
        6,
        2,
        None,
        format,
    ))
    .unwrap();
    let first = rt
        .block_on(loc.get_relative("images/train/000000.tif"))
        .unwrap();
    rt.block_on(loc.put("images/train/broken.tif", first.slice(..100)))
        .unwrap();
    // A PNG beside a TIFF of the same name: both would be image 'train/000001'.
    rt.block_on(loc.put(
        "images/train/000001.png",
        patchgd::source::decode::encode_png(8, 8, 1, &[0; 64]),
    ))
    .unwrap();
    let mut labels = String::from_utf8(
        rt.block_on(loc.get_relative("labels.csv"))
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    labels.push_str("train/broken,1,train,\n");
    rt.block_on(loc.put("labels.csv", labels)).unwrap();
    let out = format!("{root}/out");
    // Level 1 of 256 px is 128 px: a 2 x 2 grid of 64 px patches; empty patches are skipped.
    let yaml = crate::common::pipeline_yaml(
        &format!("{root}/images"),
        &format!("{root}/labels.csv"),
        &out,
        64,
        1,
        "",
    )
    .replace("channels: 1", "channels: 1\n  level: 1")
    .replace(
        "  size: 64",
        "  size: 64\n  foreground: {background: dark, threshold: 32, min_fraction: 0.01}",
    );
    let s = run(&Definition::from_yaml(&yaml, "t.yaml").unwrap()).unwrap();
    // Every object is accounted for: the two sharing an id are both failures, named apart.
    assert_eq!((s.images_seen, s.images_used, s.images_failed), (10, 7, 3));
    assert_eq!(s.images_seen, s.images_used + s.images_failed);
    let errors = rt.block_on(crate::common::read_parquet(
        &Location::parse(&out).unwrap(),
        "errors.parquet",
    ));
    let column = |name: &str| -> Vec<String> {
        let a = errors[0]
            .column_by_name(name)
            .unwrap()
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .unwrap();
        (0..a.len()).map(|i| a.value(i).to_string()).collect()
    };
    let ids = column("image_id");
    let messages = column("message");
    let message = |id: &str| &messages[ids.iter().position(|i| i == id).unwrap()];
    assert!(message("train/broken").contains("truncated"));
    for id in ["train/000001.png", "train/000001.tif"] {
        let m = message(id);
        assert!(
            m.contains("'train/000001.png'") && m.contains("'train/000001.tif'"),
            "{id}: {m}"
        );
    }
    assert_eq!(ids.len(), 3, "{ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_of_a_grid_row_reassemble_into_the_same_image_as_whole_rows() {
    let root = memory_url("tiff-segments");
    let out = Location::parse(&root).unwrap();
    let recipe = Recipe::new(600, 10, 9);
    let layout = layout_image(&recipe, "train", 0, 7, None);
    write_tiff_image(
        &out,
        "images/a.tif",
        &layout,
        600,
        128,
        TileCompression::Deflate,
        false,
    )
    .await
    .unwrap();
    let loc = Location::parse(&format!("{root}/images")).unwrap();
    let meta = loc.list().await.unwrap().remove(0);
    let entry = patchgd::source::ImageEntry {
        image_id: "a".into(),
        url: loc.url_of(&meta.location),
        size: meta.size,
        path: meta.location,
        label: Some(3),
        split: Some(Split::Train),
    };
    let mut images = Vec::new();
    let mut batch_counts = Vec::new();
    // 600 px at 40 px patches, stride 40: 15 x 15 cells; 200 px segments hold 5 of them.
    for segment_px in [200, 4096] {
        let config = StreamConfig {
            stride: 40,
            segment_px,
            ..StreamConfig::new(40, 1)
        };
        let mut rx = stream_images(loc.clone(), vec![entry.clone()], config);
        let mut asm = patchgd::patch::ImageAssembler::default();
        let mut done = Vec::new();
        let mut batches = 0;
        while let Some(item) = rx.recv().await {
            match item {
                patchgd::source::SourceItem::Batch(b) => {
                    batches += 1;
                    done.extend(asm.push(&b.batch).unwrap());
                }
                patchgd::source::SourceItem::Failed(f) => panic!("{f:?}"),
            }
        }
        batch_counts.push(batches);
        images.push(done.pop().expect("the image completes"));
    }
    assert_eq!(batch_counts, vec![15 * 3, 15]);
    assert_eq!(images[0].pixels.memory(), images[1].pixels.memory());
    // And both equal the image drawn directly, cut at the same places.
    let full = layout.render_window(1, 0, 0, 600, 600);
    let cell = |r: usize, c: usize| -> Vec<u8> {
        (0..40)
            .flat_map(|y| {
                full[(r * 40 + y) * 600 + c * 40..(r * 40 + y) * 600 + c * 40 + 40].to_vec()
            })
            .collect()
    };
    assert_eq!(
        &images[0].pixels.memory().unwrap()[(7 * 15 + 11) * 1600..(7 * 15 + 12) * 1600],
        &cell(7, 11)[..]
    );
}

/// A little-endian classic TIFF with one directory: `entries` are (tag, type, count, value or
/// offset); `tail` is appended after the directory, at the offset this returns first.
fn classic_tiff(entries: &[(u16, u16, u32, u32)], tail: &[u8]) -> (Vec<u8>, u32) {
    let tail_at = 8 + 2 + 12 * entries.len() as u32 + 4;
    let mut b = b"II*\0".to_vec();
    b.extend(8u32.to_le_bytes());
    b.extend((entries.len() as u16).to_le_bytes());
    for &(tag, kind, count, value) in entries {
        b.extend(tag.to_le_bytes());
        b.extend(kind.to_le_bytes());
        b.extend(count.to_le_bytes());
        b.extend(value.to_le_bytes());
    }
    b.extend(0u32.to_le_bytes());
    b.extend(tail);
    (b, tail_at)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sizes_and_offsets_a_file_declares_are_checked_before_anything_is_allocated() {
    const LONG: u16 = 4;
    let root = memory_url("tiff-declared");
    let out = Location::parse(&root).unwrap();
    // 86 bytes claiming a 1,000,000 px square in one uncompressed strip: 10^12 bytes to decode.
    let (strip, _) = classic_tiff(
        &[
            (256, LONG, 1, 1_000_000),
            (257, LONG, 1, 1_000_000),
            (258, 3, 1, 8),
            (273, LONG, 1, 8),
            (279, LONG, 1, 1),
        ],
        &[],
    );
    assert!(strip.len() < 100);
    // 200,000 px square in 4096 px tiles (2401 of them, every offset given): 4 x 10^10 pixels.
    let tiles = 49 * 49;
    let tail_len = 8 * tiles as usize;
    let entries = |tail_at: u32| {
        vec![
            (256, LONG, 1, 200_000),
            (257, LONG, 1, 200_000),
            (258, 3, 1, 8),
            (322, LONG, 1, 4096),
            (323, LONG, 1, 4096),
            (324, LONG, tiles, tail_at),
            (325, LONG, tiles, tail_at + 4 * tiles),
        ]
    };
    let (_, tail_at) = classic_tiff(&entries(0), &[]);
    let tail: Vec<u8> = (0..2 * tiles).flat_map(|_| 8u32.to_le_bytes()).collect();
    let (huge, _) = classic_tiff(&entries(tail_at), &tail);
    assert_eq!(huge.len(), tail_at as usize + tail_len);
    // BigTIFF whose first directory lies at the very end of the 64-bit range: the offset
    // arithmetic must not overflow.
    let mut far = b"II+\0".to_vec();
    far.extend(8u16.to_le_bytes());
    far.extend(0u16.to_le_bytes());
    far.extend((u64::MAX - 3).to_le_bytes());
    // PNGs whose header claims a size (and that have no pixel data). A PNG is read row by row,
    // so what is checked is the pixel count and one band of patches across it.
    let png_claiming = |width: u32, height: u32| {
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend(width.to_be_bytes());
        ihdr.extend(height.to_be_bytes());
        ihdr.extend([8, 0, 0, 0, 0]); // 8-bit grey, not interlaced
        let mut b = b"\x89PNG\r\n\x1a\n".to_vec();
        b.extend(13u32.to_be_bytes());
        b.extend(&ihdr);
        b.extend(crc32fast::hash(&ihdr).to_be_bytes());
        b
    };
    let files = [
        ("strip.tif", strip, "at most 256 MiB is decoded at once"),
        (
            "claims.png",
            png_claiming(200_000, 200_000),
            "declares 200000 x 200000 pixels, more than the 17179869184",
        ),
        (
            "wide.png",
            png_claiming(10_000_000, 1000),
            "one band of 256 px patches across it would take 2441 MiB decoded",
        ),
        (
            "huge.tif",
            huge,
            "declares 200000 x 200000 pixels, more than the 17179869184",
        ),
        ("far.tif", far, "overflows"),
    ];
    let mut labels = String::from("image_id,label,split\n");
    for (name, bytes, _) in &files {
        out.put(&format!("images/{name}"), bytes.clone())
            .await
            .unwrap();
        let id = name.rsplit_once('.').unwrap().0;
        labels.push_str(&format!("{id},0,train\n"));
    }
    out.put("labels.csv", labels).await.unwrap();
    let images = Location::parse(&format!("{root}/images")).unwrap();
    let catalog = Catalog::load(&images, &format!("{root}/labels.csv"), &Default::default())
        .await
        .unwrap();
    assert!(catalog.failures.is_empty(), "{:?}", catalog.failures);
    assert_eq!(catalog.images.len(), files.len());
    for read in [
        patchgd::source::stream::Read::Geometry,
        patchgd::source::stream::Read::Pixels,
    ] {
        let mut config = StreamConfig::new(256, 1);
        config.read = read;
        let mut rx = stream_images(images.clone(), catalog.split(Split::Train), config);
        let mut failures = Vec::new();
        while let Some(item) = rx.recv().await {
            match item {
                patchgd::source::SourceItem::Failed(f) => failures.push(f),
                patchgd::source::SourceItem::Batch(b) => {
                    panic!(
                        "{read:?}: a band of {} rows came through",
                        b.batch.num_rows()
                    )
                }
            }
        }
        for (name, _, words) in &files {
            let id = name.rsplit_once('.').unwrap().0;
            let f = failures
                .iter()
                .find(|f| f.image_id == id)
                .unwrap_or_else(|| panic!("{read:?}: no failure for {id}: {failures:?}"));
            assert!(f.message.contains(words), "{read:?} {id}: {}", f.message);
        }
        assert_eq!(failures.len(), files.len(), "{failures:?}");
    }
}
