//! The tables a run writes: per-epoch metrics, validation predictions and errors, as Arrow
//! record batches encoded to Parquet (and CSV for metrics). Schemas: schemas/*.md.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, Float32Builder, Float64Array, Int64Array, ListBuilder, StringArray,
    UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;

use crate::source::Failure;
use crate::train::Prediction;

/// One row of metrics.parquet / metrics.csv.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochMetrics {
    pub epoch: u64,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub val_loss: f64,
    pub val_accuracy: f64,
    pub val_qwk: f64,
    pub lr: f64,
    pub optimizer_steps: u64,
    /// Backbone patch passes (fill + gradient) per second of the training pass.
    pub patches_per_s: f64,
    /// Training images per second.
    pub images_per_s: f64,
    pub peak_rss_bytes: u64,
    pub seconds: f64,
}

/// Metrics per epoch. A value that does not exist (the validation loss of a run without
/// validation images) is null, never NaN: training stops on any value that is not finite.
pub fn metrics_batch(rows: &[EpochMetrics]) -> RecordBatch {
    let f = |name: &str, get: &dyn Fn(&EpochMetrics) -> f64| -> (Field, ArrayRef) {
        (
            Field::new(name, DataType::Float64, true),
            Arc::new(Float64Array::from_iter(
                rows.iter().map(|r| Some(get(r)).filter(|v| v.is_finite())),
            )),
        )
    };
    let u = |name: &str, get: &dyn Fn(&EpochMetrics) -> u64| -> (Field, ArrayRef) {
        (
            Field::new(name, DataType::UInt64, false),
            Arc::new(UInt64Array::from_iter_values(rows.iter().map(get))),
        )
    };
    let columns = vec![
        u("epoch", &|r| r.epoch),
        f("train_loss", &|r| r.train_loss),
        f("train_accuracy", &|r| r.train_accuracy),
        f("val_loss", &|r| r.val_loss),
        f("val_accuracy", &|r| r.val_accuracy),
        f("val_qwk", &|r| r.val_qwk),
        f("lr", &|r| r.lr),
        u("optimizer_steps", &|r| r.optimizer_steps),
        f("patches_per_s", &|r| r.patches_per_s),
        f("images_per_s", &|r| r.images_per_s),
        u("peak_rss_bytes", &|r| r.peak_rss_bytes),
        f("seconds", &|r| r.seconds),
    ];
    from_columns(columns)
}

/// The softmax of each prediction, as a `probabilities` column.
fn probabilities_column(rows: &[Prediction]) -> (Field, ArrayRef) {
    let mut probs = ListBuilder::new(Float32Builder::new()).with_field(Field::new(
        "item",
        DataType::Float32,
        false,
    ));
    for r in rows {
        probs.values().append_slice(&r.probabilities);
        probs.append(true);
    }
    let probs = probs.finish();
    (
        Field::new("probabilities", probs.data_type().clone(), false),
        Arc::new(probs),
    )
}

pub fn predictions_batch(epoch: u64, rows: &[Prediction]) -> RecordBatch {
    from_columns(vec![
        (
            Field::new("epoch", DataType::UInt64, false),
            Arc::new(UInt64Array::from(vec![epoch; rows.len()])) as ArrayRef,
        ),
        (
            Field::new("image_id", DataType::Utf8, false),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| &r.image_id),
            )),
        ),
        (
            Field::new("label", DataType::Int64, false),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.label))),
        ),
        (
            Field::new("predicted", DataType::Int64, false),
            Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| r.predicted),
            )),
        ),
        probabilities_column(rows),
    ])
}

/// `predictions.parquet` of `patchgd predict`: image_id, url, label (null when unlabelled),
/// predicted, probabilities.
pub fn predict_predictions_batch(
    rows: &[Prediction],
    urls: &std::collections::HashMap<String, String>,
) -> RecordBatch {
    from_columns(vec![
        (
            Field::new("image_id", DataType::Utf8, false),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| &r.image_id),
            )),
        ),
        (
            Field::new("url", DataType::Utf8, false),
            Arc::new(StringArray::from_iter_values(
                rows.iter()
                    .map(|r| urls.get(&r.image_id).map_or("", String::as_str)),
            )),
        ),
        (
            Field::new("label", DataType::Int64, true),
            Arc::new(Int64Array::from_iter(
                rows.iter().map(|r| (r.label >= 0).then_some(r.label)),
            )),
        ),
        (
            Field::new("predicted", DataType::Int64, false),
            Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| r.predicted),
            )),
        ),
        probabilities_column(rows),
    ])
}

/// Errors with the epoch they were seen in.
pub fn errors_batch(rows: &[(u64, Failure)]) -> RecordBatch {
    let s = |name: &str, get: &dyn Fn(&Failure) -> &str| -> (Field, ArrayRef) {
        (
            Field::new(name, DataType::Utf8, false),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|(_, f)| get(f)),
            )),
        )
    };
    from_columns(vec![
        (
            Field::new("epoch", DataType::UInt64, false),
            Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.0))) as ArrayRef,
        ),
        s("image_id", &|f| &f.image_id),
        s("url", &|f| &f.url),
        s("stage", &|f| &f.stage),
        s("message", &|f| &f.message),
    ])
}

fn from_columns(columns: Vec<(Field, ArrayRef)>) -> RecordBatch {
    let (fields, arrays): (Vec<Field>, Vec<ArrayRef>) = columns.into_iter().unzip();
    RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).expect("columns match their fields")
}

pub fn to_parquet(batch: &RecordBatch) -> Vec<u8> {
    let mut out = Vec::new();
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), None)
        .expect("parquet writer");
    writer.write(batch).expect("parquet write to memory");
    writer.close().expect("parquet close");
    out
}

pub fn to_csv(batch: &RecordBatch) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut writer = arrow::csv::WriterBuilder::new()
            .with_header(true)
            .build(&mut out);
        writer.write(batch).expect("csv write to memory");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    #[test]
    fn metrics_round_trip_through_parquet_and_csv() {
        let row = EpochMetrics {
            epoch: 1,
            train_loss: 1.5,
            train_accuracy: 0.5,
            val_loss: 1.6,
            val_accuracy: 0.4,
            val_qwk: 0.3,
            lr: 1e-3,
            optimizer_steps: 10,
            patches_per_s: 100.0,
            images_per_s: 2.0,
            peak_rss_bytes: 1 << 20,
            seconds: 3.0,
        };
        let batch = metrics_batch(&[row.clone(), EpochMetrics { epoch: 2, ..row }]);
        let bytes = bytes::Bytes::from(to_parquet(&batch));
        let back: Vec<RecordBatch> = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap()
            .map(|b| b.unwrap())
            .collect();
        assert_eq!(back[0], batch);
        let csv = String::from_utf8(to_csv(&batch)).unwrap();
        assert!(
            csv.starts_with("epoch,train_loss,train_accuracy,val_loss,val_accuracy,val_qwk"),
            "{csv}"
        );
        assert_eq!(csv.lines().count(), 3);
    }
}
