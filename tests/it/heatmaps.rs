//! `patchgd predict --heatmaps`: Grad-CAM evidence per cell in heatmaps.parquet, a PNG per
//! image over a thumbnail read from a coarse pyramid level.

use std::collections::HashMap;

use arrow::array::AsArray;
use arrow::datatypes::{Float32Type, Int64Type, UInt32Type};
use patchgd::model::Model;
use patchgd::model::grad_cam::grad_cam;
use patchgd::pipeline::predict::TrainedModel;
use patchgd::pipeline::{LogObserver, PredictRequest, predict};
use patchgd::source::decode::decode;
use patchgd::source::thumbnail::thumbnail;
use patchgd::source::tiff::write::{PyramidSpec, TileCompression, write_pyramid};
use patchgd::source::{ImageEntry, StreamConfig};
use patchgd::storage::Location;
use patchgd::train::patchgd::grid_view;
use tch::{Device, Tensor};

use crate::common::{memory_url, predict_request, read_parquet, trained_gd_run, trained_run};

/// (image_id, row, col, class) -> score.
type Scores = HashMap<(String, u32, u32, i64), f32>;

fn scores(batches: &[arrow::record_batch::RecordBatch]) -> Scores {
    let mut out = HashMap::new();
    for b in batches {
        let col = |n: &str| b.column_by_name(n).unwrap();
        let ids = col("image_id").as_string::<i32>();
        let rows = col("row").as_primitive::<UInt32Type>();
        let cols = col("col").as_primitive::<UInt32Type>();
        let classes = col("class").as_primitive::<Int64Type>();
        let s = col("score").as_primitive::<Float32Type>();
        for i in 0..b.num_rows() {
            let key = (
                ids.value(i).to_string(),
                rows.value(i),
                cols.value(i),
                classes.value(i),
            );
            assert!(out.insert(key, s.value(i)).is_none(), "a repeated row");
        }
    }
    out
}

/// Grad-CAM of one image computed outside the pipeline: the PNG decoded and cut into 16 px
/// patches by hand (row-major), encoded by the trained model, laid out as a grid.
fn grad_cam_by_hand(rt: &tokio::runtime::Runtime, run: &str, png: &[u8]) -> Tensor {
    let trained = rt
        .block_on(TrainedModel::load(run, &Default::default()))
        .unwrap();
    let model = Model::new(trained.spec(), Device::Cpu);
    model.load_named(&trained.weights).unwrap();
    let image = decode(png, 1, None).unwrap();
    let (size, patch) = (image.width, 16);
    let grid = size / patch;
    let mut cells = Vec::new();
    for r in 0..grid {
        for c in 0..grid {
            for y in 0..patch {
                for x in 0..patch {
                    let v = image.pixels[(r * patch + y) * size + c * patch + x];
                    cells.push(v as f32 / 127.5 - 1.0);
                }
            }
        }
    }
    let n = (grid * grid) as i64;
    let patches = Tensor::from_slice(&cells).view([n, 1, 16, 16]);
    let z = tch::no_grad(|| model.encode(&patches, false)).view([1, n, -1]);
    grad_cam(&model, &grid_view(&z, grid as i64, grid as i64)).0
}

#[test]
fn heatmaps_hold_each_cells_grad_cam_for_every_class_and_a_picture_per_image() {
    let (root, images, _, run) = trained_run("heatmaps");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let out = format!("{root}/out");
    let request = PredictRequest {
        heatmaps: true,
        ..predict_request(&run, &images, None, &out)
    };
    let summary = predict(&request, &LogObserver).unwrap();
    let h = summary.heatmaps.expect("a heatmap outcome");
    // 24 images of 2 x 2 cells, 2 classes.
    assert_eq!((h.images, h.rows, h.pictures), (24, 24 * 4 * 2, 24));
    assert!(h.failures.is_empty(), "{:?}", h.failures);
    let out_loc = Location::parse(&out).unwrap();
    let table = scores(&rt.block_on(read_parquet(&out_loc, "heatmaps.parquet")));
    assert_eq!(table.len(), 24 * 4 * 2);
    assert!(table.values().all(|s| s.is_finite() && *s >= 0.0));
    assert!(table.values().any(|s| *s > 0.0), "all evidence is zero");
    // Three images against Grad-CAM by hand: same cells, same classes, same place.
    let image_loc = Location::parse(&images).unwrap();
    for id in ["train/0001", "train/0004", "val/0003"] {
        let png = rt
            .block_on(image_loc.get_relative(&format!("{id}.png")))
            .unwrap();
        let want = grad_cam_by_hand(&rt, &run, &png);
        for class in 0..2 {
            for r in 0..2 {
                for c in 0..2 {
                    let w = want.double_value(&[0, class, r, c]) as f32;
                    let got = table[&(id.to_string(), r as u32, c as u32, class)];
                    assert!(
                        (got - w).abs() <= 1e-4 * w.abs().max(1e-3),
                        "{id} class {class} cell ({r}, {c}): {got} vs {w}"
                    );
                }
            }
        }
    }
    // One picture per image, a real PNG.
    let png = rt
        .block_on(out_loc.get_relative("heatmaps/val/0003.png"))
        .unwrap();
    let img = image::load_from_memory(&png).unwrap();
    assert!(
        img.width() > 640 && img.height() > 640,
        "{:?}",
        (img.width(), img.height())
    );
    let summary_json: serde_json::Value =
        serde_json::from_slice(&rt.block_on(out_loc.get_relative("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary_json["heatmaps"]["pictures"], 24);
}

#[test]
fn a_gd_model_has_no_latent_grid_to_explain_and_says_so() {
    let (root, images, _, run) = trained_gd_run("heatmaps-gd", 4, 2, 11);
    let request = PredictRequest {
        heatmaps: true,
        ..predict_request(&run, &images, None, &format!("{root}/out"))
    };
    let err = predict(&request, &LogObserver).unwrap_err().to_string();
    assert!(err.contains("--heatmaps needs a PatchGD model"), "{err}");
}

#[test]
fn a_pyramids_thumbnail_comes_from_a_coarse_level_never_the_full_image() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let loc = Location::parse(&memory_url("thumbnail")).unwrap();
    // 2048 px in 256 px tiles: levels 2048, 1024, 512, 256. Each level is painted its own grey,
    // so the thumbnail's pixels say which level was read.
    let spec = PyramidSpec {
        levels: PyramidSpec::halving(2048, 2048, 256),
        tile: 256,
        channels: 1,
        compression: TileCompression::Deflate,
        bigtiff: false,
        description: String::new(),
    };
    assert_eq!(spec.levels.len(), 4);
    let grey = |level: usize| [10u8, 200, 120, 60][level];
    rt.block_on(write_pyramid(&loc, "slide.tif", &spec, |level, _, _| {
        vec![grey(level); 256 * 256]
    }))
    .unwrap();
    let meta = rt.block_on(loc.head(&loc.path("slide.tif"))).unwrap();
    let entry = ImageEntry::unlabelled(&loc, meta);
    for grid_level in [0, 2] {
        let mut config = StreamConfig::new(256, 3);
        config.level = grid_level;
        let t = rt.block_on(thumbnail(&loc, &entry, &config)).unwrap();
        // Level 1 (1024 px) is the coarsest still at least 768 px; shrunk by 2.
        assert_eq!(t.source, "TIFF level 1 (1024 x 1024)");
        assert_eq!((t.width, t.height), (512, 512));
        assert!(t.pixels.iter().all(|&p| p == grey(1)), "read another level");
        // The grid's own level, whichever it is, is what the picture is laid over.
        assert_eq!(t.grid_width, 2048 >> grid_level);
    }
}
