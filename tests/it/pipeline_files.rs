//! Pipeline files: bad definitions and bad data give clear errors; bad images are counted.

use arrow::array::Array;
use patchgd::pipeline::{Definition, run};
use patchgd::storage::Location;

use crate::common::{memory_url, pipeline_yaml, read_parquet, square_dataset};

fn err(yaml: &str) -> String {
    Definition::from_yaml(yaml, "bad.yaml")
        .unwrap_err()
        .to_string()
}

const GOOD: &str = "source: {images: d/i, labels: d/l.csv}\npatch: {size: 32}\nmodel: {backbone: small_cnn}\ntrain: {epochs: 1, batch_size: 2}\noutput: o\n";

#[test]
fn good_file_parses() {
    assert!(Definition::from_yaml(GOOD, "good.yaml").is_ok());
}

#[test]
fn unknown_key_is_named_with_the_allowed_keys() {
    let e = err(&GOOD.replace("{size: 32}", "{size: 32, strid: 16}"));
    assert!(
        e.contains("bad.yaml") && e.contains("strid") && e.contains("stride"),
        "{e}"
    );
    let e = err(&format!("{GOOD}learning_rate: 3\n"));
    assert!(e.contains("learning_rate") && e.contains("train"), "{e}");
}

#[test]
fn bad_values_name_the_key_and_what_is_allowed() {
    let e = err(&format!("{GOOD}patchgd: {{sampling_fraction: 1.5}}\n"));
    assert!(
        e.contains("patchgd.sampling_fraction") && e.contains("0 < value <= 1"),
        "{e}"
    );
    let e = err(&GOOD.replace("small_cnn", "resnet19"));
    assert!(
        e.contains("resnet19") && e.contains("resnet18") && e.contains("mobilenet_v2"),
        "{e}"
    );
    let e = err(&GOOD.replace("epochs: 1", "epochs: 0"));
    assert!(e.contains("train.epochs"), "{e}");
    let e = err(&GOOD.replace("batch_size: 2", "batch_size: two"));
    assert!(e.contains("batch_size"), "{e}");
    let e = Definition::from_yaml_with_overrides(GOOD, "bad.yaml", &["train.device=gpu"])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("gpu") && e.contains("cuda") && e.contains("cpu"),
        "{e}"
    );
}

#[test]
fn patch_larger_than_the_image_is_a_clear_error() {
    let root = memory_url("patch-too-large");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (images, labels) = rt.block_on(square_dataset(&root, 32, 8, 4, 2, 1));
    let def = Definition::from_yaml(
        &pipeline_yaml(&images, &labels, &format!("{root}/out"), 64, 1, ""),
        "p.yaml",
    )
    .unwrap();
    let e = run(&def).unwrap_err().to_string();
    assert!(
        e.contains("patch size 64 is larger than the image (32 x 32 px)"),
        "{e}"
    );
}

#[test]
fn missing_labels_are_clear_errors() {
    let root = memory_url("missing-labels");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (images, _) = rt.block_on(square_dataset(&root, 32, 8, 4, 2, 1));
    let missing = format!("{root}/nope.csv");
    let def = Definition::from_yaml(
        &pipeline_yaml(&images, &missing, &format!("{root}/out"), 16, 1, ""),
        "p.yaml",
    )
    .unwrap();
    let e = run(&def).unwrap_err().to_string();
    assert!(
        e.contains("nope.csv") && e.contains("does not exist"),
        "{e}"
    );
    // A labels table without the label column.
    let loc = Location::parse(&root).unwrap();
    rt.block_on(loc.put("nolabel.csv", "image_id,split\ntrain/0000,train\n"))
        .unwrap();
    let def = Definition::from_yaml(
        &pipeline_yaml(
            &images,
            &format!("{root}/nolabel.csv"),
            &format!("{root}/out"),
            16,
            1,
            "",
        ),
        "p.yaml",
    )
    .unwrap();
    let e = run(&def).unwrap_err().to_string();
    assert!(
        e.contains("nolabel.csv") && e.contains("no column 'label'"),
        "{e}"
    );
}

#[test]
fn corrupt_and_unlabelled_images_are_reported_counted_and_skipped() {
    let root = memory_url("corrupt");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (images, labels) = rt.block_on(square_dataset(&root, 32, 8, 8, 4, 2));
    let loc = Location::parse(&root).unwrap();
    // Overwrite one labelled image with garbage, and add an image that has no label.
    rt.block_on(loc.put("images/train/0003.png", "this is not a png"))
        .unwrap();
    rt.block_on(loc.put("images/train/extra.png", "x")).unwrap();
    let out = format!("{root}/out");
    let def =
        Definition::from_yaml(&pipeline_yaml(&images, &labels, &out, 16, 2, ""), "p.yaml").unwrap();
    let s = run(&def).unwrap();
    assert_eq!((s.images_seen, s.images_used, s.images_failed), (13, 11, 2));
    assert_eq!(s.images_seen, s.images_used + s.images_failed);
    let batches = rt.block_on(read_parquet(
        &Location::parse(&out).unwrap(),
        "errors.parquet",
    ));
    let ids = batches[0]
        .column_by_name("image_id")
        .unwrap()
        .as_any()
        .downcast_ref::<arrow::array::StringArray>()
        .unwrap()
        .clone();
    let messages = batches[0]
        .column_by_name("message")
        .unwrap()
        .as_any()
        .downcast_ref::<arrow::array::StringArray>()
        .unwrap()
        .clone();
    let rows: Vec<(String, String)> = (0..ids.len())
        .map(|i| (ids.value(i).to_string(), messages.value(i).to_string()))
        .collect();
    assert!(
        rows.iter()
            .any(|(id, m)| id == "train/0003" && m.contains("not an image")),
        "{rows:?}"
    );
    assert!(
        rows.iter()
            .any(|(id, m)| id == "train/extra" && m.contains("labels table")),
        "{rows:?}"
    );
    // With on_error: stop the same data ends the run, naming the image.
    let yaml = pipeline_yaml(&images, &labels, &format!("{out}-stop"), 16, 1, "")
        .replace("channels: 1", "channels: 1\n  on_error: stop");
    let e = run(&Definition::from_yaml(&yaml, "p.yaml").unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("train/extra") || e.contains("train/0003"), "{e}");
}

/// The keys serde names as allowed when it refuses `zzz` in `section` ("" = top level).
fn allowed_keys(section: &str) -> std::collections::BTreeSet<String> {
    let yaml = match section {
        "" => format!("{GOOD}zzz: 1\n"),
        "source" | "patch" | "model" | "train" => GOOD.replacen(
            &format!("{section}: {{"),
            &format!("{section}: {{zzz: 1, "),
            1,
        ),
        other => format!("{GOOD}{other}: {{zzz: 1}}\n"),
    };
    let e = err(&yaml);
    let expected = e
        .split("expected")
        .nth(1)
        .unwrap_or_else(|| panic!("{section}: {e}"));
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

#[test]
fn json_schema_lists_exactly_the_keys_the_parser_accepts() {
    let schema: serde_json::Value =
        serde_json::from_str(include_str!("../../schemas/pipeline.schema.json")).unwrap();
    let keys = |v: &serde_json::Value| {
        v["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(allowed_keys(""), keys(&schema), "top level");
    for section in [
        "source",
        "patch",
        "model",
        "patchgd",
        "gd",
        "train",
        "synth",
        "storage",
        "checkpoint",
        "latent",
    ] {
        assert_eq!(
            allowed_keys(section),
            keys(&schema["properties"][section]),
            "section {section}"
        );
    }
}

#[test]
fn every_example_pipeline_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            Definition::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 3, "{n} pipelines");
}
