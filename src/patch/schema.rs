//! The patch row: one Arrow row per patch, the schema every patch batch has (docs/sql.md
//! lists its columns), and the image identity each row carries.

use std::sync::{Arc, LazyLock};

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

static PATCH_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("image_id", DataType::Utf8, false),
        Field::new("label", DataType::Int64, true),
        Field::new("split", DataType::Utf8, true),
        Field::new("row", DataType::UInt32, false),
        Field::new("col", DataType::UInt32, false),
        Field::new("x", DataType::UInt32, false),
        Field::new("y", DataType::UInt32, false),
        Field::new("level", DataType::UInt32, false),
        Field::new("grid_rows", DataType::UInt32, false),
        Field::new("grid_cols", DataType::UInt32, false),
        Field::new("size", DataType::UInt32, false),
        Field::new("channels", DataType::UInt8, false),
        Field::new("mean", DataType::Float32, true),
        Field::new("std", DataType::Float32, true),
        Field::new("fg_fraction", DataType::Float32, true),
        Field::new("pixels", DataType::Binary, true),
    ]))
});

/// The schema of every patch batch (its columns: docs/sql.md).
pub fn patch_schema() -> SchemaRef {
    PATCH_SCHEMA.clone()
}

/// What a patch batch says about the image it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageKey {
    pub image_id: String,
    pub label: Option<i64>,
    pub split: Option<String>,
}
