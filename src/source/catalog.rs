//! The images table: every object under the images URL joined with the labels table.
//!
//! An image's id is its path under the images URL without the extension
//! (`images/train/000001.png` under `images/` has id `train/000001`). The labels table (CSV with
//! a header, or Parquet) needs the columns `image_id`, `label` (integer) and `split`
//! (`train` or `val`); its `image_id` may be given with or without the extension.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, Int64Array, StringArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use object_store::path::Path;

use super::{Failure, Result, SourceError};
use crate::storage::{Location, StorageError, StoreOptions};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Val,
}

impl Split {
    pub fn as_str(&self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ImageEntry {
    pub image_id: String,
    pub path: Path,
    pub url: String,
    /// Object size in bytes (from the listing): ranged reads are checked against it.
    pub size: u64,
    /// `None` for an image listed without a labels table (SQL over unlabelled data).
    pub label: Option<i64>,
    pub split: Option<Split>,
}

impl ImageEntry {
    /// An object listed under `images`, without a label: its id is its path under the prefix
    /// without the extension.
    pub fn unlabelled(images: &Location, meta: object_store::ObjectMeta) -> Self {
        let rel = images
            .relative(&meta.location)
            .unwrap_or_else(|| meta.location.to_string());
        Self {
            image_id: strip_extension(&rel).to_string(),
            url: images.url_of(&meta.location),
            size: meta.size,
            path: meta.location,
            label: None,
            split: None,
        }
    }
}

/// The labelled images under a URL, and the objects that could not be labelled.
#[derive(Debug, Default)]
pub struct Catalog {
    pub images: Vec<ImageEntry>,
    pub failures: Vec<Failure>,
    /// Number of objects listed (images seen at listing time).
    pub objects: usize,
    /// Labels rows that match no object (reported in the run summary, not an image error).
    pub labels_without_image: Vec<String>,
}

impl Catalog {
    pub fn split(&self, split: Split) -> Vec<ImageEntry> {
        self.images
            .iter()
            .filter(|e| e.split == Some(split))
            .cloned()
            .collect()
    }

    /// Largest label + 1: the number of classes the data implies.
    pub fn implied_classes(&self) -> usize {
        self.images
            .iter()
            .filter_map(|e| e.label)
            .map(|l| l + 1)
            .max()
            .unwrap_or(0) as usize
    }

    pub async fn load(images: &Location, labels_url: &str, options: &StoreOptions) -> Result<Self> {
        let labels = load_labels(labels_url, options).await?;
        let (labels_loc, labels_path) = Location::parse_object(labels_url, options)?;
        let mut objects = images.list().await?;
        // The labels table may live under the images prefix; it is not an image.
        objects.retain(|meta| labels_loc.url_of(&labels_path) != images.url_of(&meta.location));
        let mut catalog = Catalog::default();
        let mut matched = std::collections::HashSet::new();
        let (objects, ambiguous) = unique_ids(images, objects);
        catalog.objects = objects.len() + ambiguous.len();
        catalog.failures = ambiguous;
        for meta in objects {
            let rel = images
                .relative(&meta.location)
                .unwrap_or_else(|| meta.location.to_string());
            let id = strip_extension(&rel).to_string();
            let url = images.url_of(&meta.location);
            let key = if labels.contains_key(&id) { &id } else { &rel };
            match labels.get(key) {
                Some((label, split)) => {
                    matched.insert(key.clone());
                    catalog.images.push(ImageEntry {
                        image_id: id,
                        size: meta.size,
                        path: meta.location,
                        url,
                        label: Some(*label),
                        split: Some(*split),
                    })
                }
                None => catalog.failures.push(Failure {
                    message: format!("no row with image_id '{id}' in labels table '{labels_url}'"),
                    image_id: id,
                    url,
                    stage: "labels".into(),
                }),
            }
        }
        catalog.labels_without_image = labels
            .keys()
            .filter(|k| !matched.contains(*k))
            .cloned()
            .collect();
        catalog.labels_without_image.sort();
        if catalog.objects == 0 {
            return Err(SourceError::Empty {
                url: images.url.clone(),
            });
        }
        Ok(catalog)
    }
}

/// Split the listed objects into those whose image id is theirs alone and failures for those
/// that share one (`boxes.png` and `boxes.tiff` are both `boxes`): which of them a label, a
/// latent or a prediction would belong to is ambiguous, so none is used. Each failure keeps
/// its object's extension in `image_id`, so the two stay two in the accounting.
pub fn unique_ids(
    images: &Location,
    objects: Vec<object_store::ObjectMeta>,
) -> (Vec<object_store::ObjectMeta>, Vec<Failure>) {
    let rel = |meta: &object_store::ObjectMeta| {
        images
            .relative(&meta.location)
            .unwrap_or_else(|| meta.location.to_string())
    };
    let mut by_id: HashMap<String, Vec<String>> = HashMap::new();
    for meta in &objects {
        let rel = rel(meta);
        by_id
            .entry(strip_extension(&rel).to_string())
            .or_default()
            .push(rel);
    }
    let (mut unique, mut failures) = (Vec::new(), Vec::new());
    for meta in objects {
        let rel = rel(&meta);
        let id = strip_extension(&rel);
        let sharing = &by_id[id];
        if sharing.len() == 1 {
            unique.push(meta);
            continue;
        }
        failures.push(Failure {
            message: format!(
                "objects {} all have image id '{id}' (the path without its extension): rename all but one",
                sharing
                    .iter()
                    .map(|r| format!("'{r}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            image_id: rel,
            url: images.url_of(&meta.location),
            stage: "listing".into(),
        });
    }
    (unique, failures)
}

/// An object's id: its path under the images URL without the extension.
pub fn strip_extension(rel: &str) -> &str {
    match rel.rfind('.') {
        Some(dot) if !rel[dot..].contains('/') => &rel[..dot],
        _ => rel,
    }
}

/// Splits `scheme://.../dir/file` into the directory's location and the file's path.
/// image_id -> (label, split), from CSV or Parquet.
pub async fn load_labels(
    url: &str,
    options: &StoreOptions,
) -> Result<HashMap<String, (i64, Split)>> {
    let err = |reason: String| SourceError::Labels {
        url: url.to_string(),
        reason,
    };
    let (loc, path) = Location::parse_object(url, options)?;
    let bytes = match loc.get(&path).await {
        Err(StorageError::NotFound { .. }) => return Err(err("does not exist".into())),
        other => other?,
    };
    let batches: Vec<RecordBatch> = if url.ends_with(".parquet") {
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
            .and_then(|b| b.build())
            .map_err(|e| err(format!("not a readable Parquet file: {e}")))?;
        reader
            .collect::<Result<_, _>>()
            .map_err(|e| err(e.to_string()))?
    } else {
        let format = arrow::csv::reader::Format::default().with_header(true);
        let (schema, _) = format
            .infer_schema(std::io::Cursor::new(&bytes), Some(100))
            .map_err(|e| err(format!("not a readable CSV file with a header: {e}")))?;
        let reader = arrow::csv::ReaderBuilder::new(Arc::new(schema))
            .with_format(format)
            .build(std::io::Cursor::new(bytes))
            .map_err(|e| err(e.to_string()))?;
        reader
            .collect::<Result<_, _>>()
            .map_err(|e| err(e.to_string()))?
    };
    let mut out = HashMap::new();
    let mut row_number = 0usize;
    for batch in batches {
        let col = |name: &str, ty: &DataType| -> Result<Arc<dyn Array>> {
            let c = batch.column_by_name(name).ok_or_else(|| {
                let names: Vec<_> = batch
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| f.name().clone())
                    .collect();
                err(format!(
                    "has no column '{name}' (it has: {}); expected image_id, label, split",
                    names.join(", ")
                ))
            })?;
            cast(c, ty).map_err(|e| err(format!("column '{name}' cannot be read as {ty}: {e}")))
        };
        let ids = col("image_id", &DataType::Utf8)?;
        let labels = col("label", &DataType::Int64)?;
        let splits = col("split", &DataType::Utf8)?;
        let ids = ids.as_any().downcast_ref::<StringArray>().unwrap();
        let labels = labels.as_any().downcast_ref::<Int64Array>().unwrap();
        let splits = splits.as_any().downcast_ref::<StringArray>().unwrap();
        for i in 0..batch.num_rows() {
            row_number += 1;
            if ids.is_null(i) || labels.is_null(i) || splits.is_null(i) {
                return Err(err(format!(
                    "row {row_number} has an empty image_id, label or split"
                )));
            }
            if labels.value(i) < 0 {
                return Err(err(format!(
                    "row {row_number}: label {} is negative; labels are 0..classes-1",
                    labels.value(i)
                )));
            }
            let split = match splits.value(i) {
                "train" => Split::Train,
                "val" => Split::Val,
                other => {
                    return Err(err(format!(
                        "row {row_number}: split '{other}' is not one of: train, val"
                    )));
                }
            };
            out.insert(ids.value(i).to_string(), (labels.value(i), split));
        }
    }
    if out.is_empty() {
        return Err(err("has no rows".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_drop_only_the_file_extension() {
        assert_eq!(strip_extension("train/001.png"), "train/001");
        assert_eq!(strip_extension("a.b/c"), "a.b/c");
        assert_eq!(strip_extension("noext"), "noext");
    }

    #[tokio::test]
    async fn labels_are_joined_and_unlabelled_images_are_failures() {
        let root = Location::parse("memory://catalog-test/ds").unwrap();
        root.put(
            "labels.csv",
            "image_id,label,split\ntrain/a,1,train\nval/b,0,val\nval/gone,1,val\n",
        )
        .await
        .unwrap();
        root.put("images/train/a.png", "x").await.unwrap();
        root.put("images/val/b.png", "x").await.unwrap();
        root.put("images/val/c.png", "x").await.unwrap();
        let images = Location::parse("memory://catalog-test/ds/images").unwrap();
        let cat = Catalog::load(
            &images,
            "memory://catalog-test/ds/labels.csv",
            &Default::default(),
        )
        .await
        .unwrap();
        assert_eq!(cat.objects, 3);
        assert_eq!(cat.images.len(), 2);
        assert_eq!(cat.split(Split::Train)[0].label, Some(1));
        assert_eq!(cat.failures.len(), 1);
        assert!(
            cat.failures[0].message.contains("val/c"),
            "{:?}",
            cat.failures
        );
        assert_eq!(cat.implied_classes(), 2);
        assert_eq!(cat.labels_without_image, vec!["val/gone".to_string()]);
    }

    #[tokio::test]
    async fn bad_labels_tables_name_what_is_wrong() {
        let root = Location::parse("memory://catalog-test2/ds").unwrap();
        root.put("nolabel.csv", "image_id,split\na,train\n")
            .await
            .unwrap();
        root.put("badsplit.csv", "image_id,label,split\na,1,test\n")
            .await
            .unwrap();
        let e = load_labels("memory://catalog-test2/ds/missing.csv", &Default::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing.csv") && e.contains("does not exist"),
            "{e}"
        );
        let e = load_labels("memory://catalog-test2/ds/nolabel.csv", &Default::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("no column 'label'"), "{e}");
        let e = load_labels(
            "memory://catalog-test2/ds/badsplit.csv",
            &Default::default(),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("split 'test'"), "{e}");
    }
}
