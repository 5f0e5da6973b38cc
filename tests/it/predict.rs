//! `patchgd predict`: a trained run's model over images, labelled or not, from its output or
//! a checkpoint; bad images are named and counted.

use std::collections::HashMap;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float32Type, Int64Type};
use arrow::record_batch::RecordBatch;
use patchgd::pipeline::{Definition, LogObserver, RunOptions, predict, run_with};
use patchgd::source::decode::encode_png;
use patchgd::storage::Location;

use crate::common::{
    memory_url, pipeline_yaml, predict_request, read_parquet, square_dataset, trained_gd_run,
    trained_run,
};

/// image_id -> (label or None, predicted, probabilities).
type Rows = HashMap<String, (Option<i64>, i64, Vec<f32>)>;

fn rows(batches: &[RecordBatch]) -> Rows {
    let mut out = HashMap::new();
    for b in batches {
        let ids = b.column_by_name("image_id").unwrap().as_string::<i32>();
        let labels = b
            .column_by_name("label")
            .unwrap()
            .as_primitive::<Int64Type>();
        let predicted = b
            .column_by_name("predicted")
            .unwrap()
            .as_primitive::<Int64Type>();
        let probs = b.column_by_name("probabilities").unwrap().as_list::<i32>();
        for i in 0..b.num_rows() {
            let p = probs.value(i);
            let p: Vec<f32> = p.as_primitive::<Float32Type>().values().to_vec();
            let label = (!labels.is_null(i)).then(|| labels.value(i));
            out.insert(ids.value(i).to_string(), (label, predicted.value(i), p));
        }
    }
    out
}

#[test]
fn predict_gives_a_runs_own_validation_predictions_from_its_output_and_its_checkpoint() {
    let (root, images, labels, run) = trained_run("predict-run");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let own = rows(&rt.block_on(read_parquet(
        &Location::parse(&run).unwrap(),
        "predictions.parquet",
    )));
    assert_eq!(own.len(), 8, "the run predicted its 8 validation images");
    let checkpoints = Location::parse(&format!("{run}/checkpoints")).unwrap();
    let step = rt
        .block_on(checkpoints.list())
        .unwrap()
        .iter()
        .filter_map(|m| checkpoints.relative(&m.location))
        .filter_map(|rel| rel.split('/').next().map(String::from))
        .filter(|d| d.starts_with("step-"))
        .max()
        .expect("a final checkpoint");
    let mut results = Vec::new();
    for (name, model) in [
        ("from-output", run.clone()),
        ("from-checkpoint", format!("{run}/checkpoints/{step}")),
    ] {
        let out = format!("{root}/{name}");
        let summary = predict(
            &predict_request(&model, &images, Some(&labels), &out),
            &LogObserver,
        )
        .unwrap();
        assert_eq!(
            (
                summary.images_seen,
                summary.images_predicted,
                summary.images_failed,
                summary.images_labelled
            ),
            (24, 24, 0, 24),
            "{name}: every train and val image is predicted"
        );
        let loc = Location::parse(&out).unwrap();
        let got = rows(&rt.block_on(read_parquet(&loc, "predictions.parquet")));
        for (id, (label, predicted, probs)) in &own {
            let (l, p, q) = &got[id];
            assert_eq!((l, p), (label, predicted), "{name}: {id}");
            for (a, b) in probs.iter().zip(q) {
                assert!((a - b).abs() < 1e-5, "{name}: {id}: {probs:?} vs {q:?}");
            }
        }
        // metrics.json agrees with the predictions it summarises.
        let metrics: serde_json::Value =
            serde_json::from_slice(&rt.block_on(loc.get_relative("metrics.json")).unwrap())
                .unwrap();
        let right = got.values().filter(|(l, p, _)| *l == Some(*p)).count();
        assert_eq!(metrics["images"], 24);
        assert!((metrics["accuracy"].as_f64().unwrap() - right as f64 / 24.0).abs() < 1e-12);
        let confusion = metrics["confusion"].as_array().unwrap();
        let total: u64 = confusion
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()))
            .sum();
        assert_eq!(total, 24);
        assert_eq!(metrics["recall"].as_array().unwrap().len(), 2);
        let summary_json: serde_json::Value =
            serde_json::from_slice(&rt.block_on(loc.get_relative("summary.json")).unwrap())
                .unwrap();
        assert_eq!(summary_json["images_predicted"], 24);
        results.push(got);
    }
    assert_eq!(
        results[0], results[1],
        "the final checkpoint is the output's model"
    );
}

#[test]
fn unlabelled_images_are_predicted_and_a_bad_one_is_named_and_counted() {
    let (root, _, _, run) = trained_run("predict-unlabelled");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let new = Location::parse(&format!("{root}/new")).unwrap();
    for i in 0..3u8 {
        let px: Vec<u8> = (0..32 * 32)
            .map(|p| ((p * 7 + i as usize * 50) % 256) as u8)
            .collect();
        rt.block_on(new.put(&format!("scene-{i}.png"), encode_png(32, 32, 1, &px)))
            .unwrap();
    }
    rt.block_on(new.put("broken.png", "not a png")).unwrap();
    let out = format!("{root}/out");
    let summary = predict(&predict_request(&run, &new.url, None, &out), &LogObserver).unwrap();
    assert_eq!(
        (
            summary.images_seen,
            summary.images_predicted,
            summary.images_failed,
            summary.images_labelled
        ),
        (4, 3, 1, 0)
    );
    assert_eq!(summary.accuracy, None);
    let loc = Location::parse(&out).unwrap();
    let got = rows(&rt.block_on(read_parquet(&loc, "predictions.parquet")));
    assert_eq!(got.len(), 3);
    assert!(
        got.values()
            .all(|(label, p, probs)| label.is_none() && *p >= 0 && probs.len() == 2)
    );
    let errors = rt.block_on(read_parquet(&loc, "errors.parquet"));
    let ids: Vec<&str> = errors
        .iter()
        .flat_map(|b| {
            b.column_by_name("image_id")
                .unwrap()
                .as_string::<i32>()
                .iter()
                .flatten()
        })
        .collect();
    assert_eq!(ids, ["broken"]);
    assert!(
        rt.block_on(loc.get_relative("metrics.json")).is_err(),
        "no labels, no metrics"
    );
}

#[test]
fn a_model_url_that_holds_no_run_is_refused_by_name() {
    let root = memory_url("predict-nothing");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let loc = Location::parse(&root).unwrap();
    rt.block_on(loc.put("images/a.png", encode_png(8, 8, 1, &[0; 64])))
        .unwrap();
    let model = format!("{root}/not-a-run");
    let err = predict(
        &predict_request(
            &model,
            &format!("{root}/images"),
            None,
            &format!("{root}/out"),
        ),
        &LogObserver,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(&model) && err.contains("neither a run output"),
        "{err}"
    );
}

#[test]
fn the_command_line_predicts_a_run_on_disk_and_says_what_it_did() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().display().to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (images, labels) = rt.block_on(square_dataset(&root, 32, 8, 8, 4, 10));
    let run = format!("{root}/run");
    let def =
        Definition::from_yaml(&pipeline_yaml(&images, &labels, &run, 16, 1, ""), "p.yaml").unwrap();
    run_with(&def, &RunOptions::default()).unwrap();
    let out = format!("{root}/predicted");
    let done = std::process::Command::new(env!("CARGO_BIN_EXE_patchgd"))
        .args([
            "predict", "--model", &run, "--images", &images, "--labels", &labels,
        ])
        .args(["--output", &out, "--no-progress", "--heatmaps"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&done.stdout);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(
        stdout.starts_with("predicted 12 of 12 images (0 failed); accuracy ")
            && stdout.contains("over 12 labelled"),
        "{stdout}"
    );
    for file in [
        "predictions.parquet",
        "errors.parquet",
        "summary.json",
        "metrics.json",
        "heatmaps.parquet",
        "heatmaps/train/0000.png",
        "heatmaps/val/0003.png",
    ] {
        assert!(std::path::Path::new(&out).join(file).exists(), "no {file}");
    }
    assert!(
        stdout.contains("heatmaps: 12 images (96 rows) in heatmaps.parquet, 12 pictures"),
        "{stdout}"
    );
    // `patchgd sql --run` reads a prediction's tables, joinable with the images' patches.
    let query = "SELECT count(DISTINCT p.image_id) AS n FROM predictions p \
                 JOIN patches q ON p.image_id = q.image_id WHERE p.label IS NOT NULL";
    let sql = std::process::Command::new(env!("CARGO_BIN_EXE_patchgd"))
        .args([
            "sql",
            "--run",
            &out,
            "--images",
            &images,
            "--patch",
            "16",
            "--channels",
            "1",
        ])
        .args(["--format", "csv", query])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&sql.stdout);
    assert!(
        sql.status.success(),
        "{}",
        String::from_utf8_lossy(&sql.stderr)
    );
    assert_eq!(stdout.trim(), "n\n12", "{stdout}");
    // Heatmap cells join the patches table cell for cell: the 20 cells with the most class-1
    // evidence, with their brightness.
    let query = "SELECT count(*) AS n, count(DISTINCT h.image_id) AS images \
                 FROM (SELECT * FROM heatmaps WHERE class = 1 ORDER BY score DESC LIMIT 20) h \
                 JOIN patches q ON h.image_id = q.image_id AND h.row = q.row AND h.col = q.col";
    let sql = std::process::Command::new(env!("CARGO_BIN_EXE_patchgd"))
        .args(["sql", "--run", &out, "--images", &images])
        .args(["--patch", "16", "--channels", "1", "--format", "csv", query])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&sql.stdout);
    assert!(
        sql.status.success(),
        "{}",
        String::from_utf8_lossy(&sql.stderr)
    );
    let counts: Vec<&str> = stdout
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split(',')
        .collect();
    assert_eq!(counts[0], "20", "every top cell has its patch: {stdout}");
    assert!(counts[1].parse::<u32>().unwrap() >= 5, "{stdout}");
}

#[test]
fn a_gd_model_predicts_whole_resized_images() {
    let (root, images, labels, run) = trained_gd_run("predict-gd", 8, 4, 11);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let own = rows(&rt.block_on(read_parquet(
        &Location::parse(&run).unwrap(),
        "predictions.parquet",
    )));
    let out = format!("{root}/out");
    let summary = predict(
        &predict_request(&run, &images, Some(&labels), &out),
        &LogObserver,
    )
    .unwrap();
    assert_eq!((summary.images_predicted, summary.images_failed), (12, 0));
    // One pass per image: GD sees each image whole, as a 1 x 1 grid.
    assert_eq!(summary.patch_passes, 12);
    let got = rows(&rt.block_on(read_parquet(
        &Location::parse(&out).unwrap(),
        "predictions.parquet",
    )));
    for (id, (_, predicted, probs)) in &own {
        assert_eq!(&got[id].1, predicted, "{id}");
        assert!(
            probs
                .iter()
                .zip(&got[id].2)
                .all(|(a, b)| (a - b).abs() < 1e-5),
            "{id}"
        );
    }
}
