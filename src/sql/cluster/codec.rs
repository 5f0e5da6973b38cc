//! Ballista's extension codecs for patchgd: how the tables, table functions, plan nodes and
//! UDFs travel from the client to the scheduler (logical plans) and from the scheduler to the
//! executors (physical plans).
//!
//! A patchgd node is encoded as a frame that no protobuf message starts with (a zero byte, then
//! `patchgd`, a version, a JSON header and binary blobs: Arrow IPC for in-memory tables and
//! schemas, protobuf for pushed filters). Everything else goes to Ballista's own codecs, so
//! shuffles, file formats and DataFusion's nodes keep working.
//!
//! What travels is what the receiving side needs to redo the work, never the work's results:
//! a `patches` scan carries its data set, the chosen images (the listing is done once, where
//! the plan was made), each partition's slice, the projection and the pushed filters; the
//! executor rebuilds the cell selector from the cell filter and reads the images itself.

use std::ops::Range;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use arrow::record_batch::RecordBatch;
use ballista_core::serde::{BallistaLogicalExtensionCodec, BallistaPhysicalExtensionCodec};
use datafusion::catalog::TableProvider;
use datafusion::common::{Result, TableReference, internal_err};
use datafusion::datasource::MemTable;
use datafusion::datasource::file_format::FileFormatFactory;
use datafusion::error::DataFusionError;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Expr, Extension, LogicalPlan, ScalarUDF};
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::logical_plan::LogicalExtensionCodec;
use datafusion_proto::logical_plan::from_proto::parse_expr;
use datafusion_proto::logical_plan::to_proto::serialize_expr;
use datafusion_proto::physical_plan::{PhysicalExtensionCodec, PhysicalProtoConverterExtension};
use datafusion_proto::protobuf::LogicalExprNode;
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::patch::Foreground;
use crate::source::stream::Read;
use crate::source::{Failure, ImageEntry, Split, StreamConfig};
use crate::sql::images::{ImagesExec, ImagesTable};
use crate::sql::patches::{PatchScan, PatchesExec, PatchesTable, cell_selector_for};
use crate::sql::run::{LatentFile, LatentsExec, LatentsTable};
use crate::sql::{DataSet, functions};
use crate::storage::{Location, StoreOptions};

/// The first bytes of every patchgd frame. Field number 0 is invalid in protobuf, so no message
/// of Ballista's or DataFusion's starts with a zero byte.
const MAGIC: &[u8] = b"\0patchgd\x01";

/// The logical codec: patchgd's table providers (and the in-memory run tables) on top of
/// Ballista's.
#[derive(Debug, Default)]
pub struct LogicalCodec {
    ballista: BallistaLogicalExtensionCodec,
}

/// The physical codec: patchgd's scans on top of Ballista's.
#[derive(Debug, Default)]
pub struct PhysicalCodec {
    ballista: BallistaPhysicalExtensionCodec,
}

/// What a frame carries.
#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "node", rename_all = "snake_case")]
enum Node {
    PatchesTable {
        data: WireDataSet,
    },
    ImagesTable {
        data: WireDataSet,
    },
    /// Blobs: one Arrow IPC stream per partition.
    MemTable,
    LatentsTable {
        latents: WireLatents,
    },
    /// Blobs: the image filter and the cell filter (protobuf `LogicalExprNode`, empty = none).
    PatchesExec {
        data: WireDataSet,
        /// One partition's stage: its share of bytes and workers, read mode.
        stage: WireStream,
        entries: Vec<WireEntry>,
        slices: Vec<(usize, usize)>,
        listed: usize,
        listing_failures: Vec<Failure>,
        projection: Option<Vec<usize>>,
    },
    ImagesExec {
        data: WireDataSet,
        entries: Vec<WireEntry>,
        slices: Vec<(usize, usize)>,
        listed: usize,
        projection: Option<Vec<usize>>,
    },
    /// Blobs: the table's schema (Arrow IPC).
    LatentsExec {
        latents: WireLatents,
        projection: Option<Vec<usize>>,
    },
}

#[derive(Serialize, Deserialize, Debug)]
struct WireDataSet {
    images: String,
    labels: Option<String>,
    storage: StoreOptions,
    stream: WireStream,
}

/// A [`StreamConfig`] without its run-time parts (cell selector, counters), rebuilt on arrival.
#[derive(Serialize, Deserialize, Debug)]
struct WireStream {
    patch: usize,
    stride: usize,
    channels: usize,
    resize_to: Option<u32>,
    decode_workers: usize,
    buffer_bytes: usize,
    level: usize,
    target_mpp: Option<f64>,
    foreground: (u8, bool, f32),
    segment_px: usize,
    png_rows_above_bytes: u64,
    read: String,
    drop_unselected: bool,
}

#[derive(Serialize, Deserialize, Debug)]
struct WireEntry {
    image_id: String,
    path: String,
    url: String,
    size: u64,
    label: Option<i64>,
    split: Option<String>,
}

#[derive(Serialize, Deserialize, Debug)]
struct WireLatents {
    root: String,
    step: u64,
    storage: StoreOptions,
}

fn err(message: String) -> DataFusionError {
    DataFusionError::Internal(format!("patchgd codec: {message}"))
}

impl WireStream {
    fn from(c: &StreamConfig) -> Self {
        Self {
            patch: c.patch,
            stride: c.stride,
            channels: c.channels,
            resize_to: c.resize_to,
            decode_workers: c.decode_workers,
            buffer_bytes: c.buffer_bytes,
            level: c.level,
            target_mpp: c.target_mpp,
            foreground: (
                c.foreground.threshold,
                c.foreground.light_background,
                c.foreground.min_fraction,
            ),
            segment_px: c.segment_px,
            png_rows_above_bytes: c.png_rows_above_bytes,
            read: format!("{:?}", c.read),
            drop_unselected: c.drop_unselected,
        }
    }

    fn config(&self) -> Result<StreamConfig> {
        let mut c = StreamConfig::new(self.patch, self.channels);
        c.stride = self.stride;
        c.resize_to = self.resize_to;
        c.decode_workers = self.decode_workers;
        c.buffer_bytes = self.buffer_bytes;
        c.level = self.level;
        c.target_mpp = self.target_mpp;
        let (threshold, light_background, min_fraction) = self.foreground;
        c.foreground = Foreground {
            threshold,
            light_background,
            min_fraction,
        };
        c.segment_px = self.segment_px;
        c.png_rows_above_bytes = self.png_rows_above_bytes;
        c.read = match self.read.as_str() {
            "Geometry" => Read::Geometry,
            "Statistics" => Read::Statistics,
            "Pixels" => Read::Pixels,
            other => return Err(err(format!("unknown read mode '{other}'"))),
        };
        c.drop_unselected = self.drop_unselected;
        Ok(c)
    }
}

/// Store options without secrets: credentials come from each process's environment and never
/// travel with a plan (a library caller could have put one in).
fn without_secrets(storage: &StoreOptions) -> StoreOptions {
    let mut storage = storage.clone();
    storage
        .options
        .retain(|key, _| !crate::storage::is_secret_key(key));
    storage
}

impl WireDataSet {
    fn from(d: &DataSet) -> Self {
        Self {
            images: d.images.clone(),
            labels: d.labels.clone(),
            storage: without_secrets(&d.storage),
            stream: WireStream::from(&d.stream),
        }
    }

    fn data_set(&self) -> Result<DataSet> {
        Ok(DataSet {
            images: self.images.clone(),
            labels: self.labels.clone(),
            storage: self.storage.clone(),
            stream: self.stream.config()?,
        })
    }

    fn location(&self) -> Result<Location> {
        Location::parse_with(&self.images, &self.storage)
            .map_err(|e| err(format!("data set URL '{}': {e}", self.images)))
    }
}

impl WireEntry {
    fn from(e: &ImageEntry) -> Self {
        Self {
            image_id: e.image_id.clone(),
            path: e.path.to_string(),
            url: e.url.clone(),
            size: e.size,
            label: e.label,
            split: e.split.map(|s| s.as_str().to_string()),
        }
    }

    fn entry(&self) -> Result<ImageEntry> {
        Ok(ImageEntry {
            image_id: self.image_id.clone(),
            path: object_store::path::Path::parse(&self.path)
                .map_err(|e| err(format!("image '{}': bad path: {e}", self.image_id)))?,
            url: self.url.clone(),
            size: self.size,
            label: self.label,
            split: match self.split.as_deref() {
                None => None,
                Some("train") => Some(Split::Train),
                Some("val") => Some(Split::Val),
                Some(other) => return Err(err(format!("unknown split '{other}'"))),
            },
        })
    }
}

fn entries(wire: &[WireEntry]) -> Result<Vec<ImageEntry>> {
    wire.iter().map(WireEntry::entry).collect()
}

fn slices_to_wire(slices: &[Range<usize>]) -> Vec<(usize, usize)> {
    slices.iter().map(|r| (r.start, r.end)).collect()
}

fn slices_from_wire(wire: &[(usize, usize)], entries: usize) -> Result<Vec<Range<usize>>> {
    if wire.is_empty() || wire.iter().any(|&(a, b)| a > b || b > entries) {
        return Err(err(format!("bad slices {wire:?} of {entries} images")));
    }
    Ok(wire.iter().map(|&(a, b)| a..b).collect())
}

impl WireLatents {
    fn from(f: &LatentFile) -> Self {
        Self {
            root: f.root.clone(),
            step: f.step,
            storage: without_secrets(&f.storage),
        }
    }

    fn file(&self) -> Arc<LatentFile> {
        Arc::new(LatentFile::new(
            self.root.clone(),
            self.step,
            self.storage.clone(),
        ))
    }
}

/// `MAGIC`, the header's length and JSON, then each blob's length and bytes.
fn write_frame(node: &Node, blobs: &[Vec<u8>], buf: &mut Vec<u8>) -> Result<()> {
    let header = serde_json::to_vec(node).map_err(|e| err(format!("encoding: {e}")))?;
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&(header.len() as u64).to_le_bytes());
    buf.extend_from_slice(&header);
    buf.extend_from_slice(&(blobs.len() as u64).to_le_bytes());
    for b in blobs {
        buf.extend_from_slice(&(b.len() as u64).to_le_bytes());
        buf.extend_from_slice(b);
    }
    Ok(())
}

/// Reads a frame front to back.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(err("truncated frame".into()));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn length(&mut self) -> Result<usize> {
        let bytes: [u8; 8] = self.take(8)?.try_into().expect("8 bytes");
        Ok(u64::from_le_bytes(bytes) as usize)
    }
}

/// The node and blobs of a patchgd frame; `None` when `buf` is not one (Ballista's own).
fn read_frame(buf: &[u8]) -> Result<Option<(Node, Vec<Vec<u8>>)>> {
    let Some(rest) = buf.strip_prefix(MAGIC) else {
        return Ok(None);
    };
    let mut c = Cursor(rest);
    let n = c.length()?;
    let node: Node =
        serde_json::from_slice(c.take(n)?).map_err(|e| err(format!("decoding: {e}")))?;
    let count = c.length()?;
    let mut blobs = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        let n = c.length()?;
        blobs.push(c.take(n)?.to_vec());
    }
    Ok(Some((node, blobs)))
}

fn ipc(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut w = StreamWriter::try_new(&mut out, schema)?;
    for b in batches {
        w.write(b)?;
    }
    w.finish()?;
    drop(w);
    Ok(out)
}

fn from_ipc(bytes: &[u8]) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let reader = StreamReader::try_new(bytes, None)?;
    let schema = reader.schema();
    let batches = reader.collect::<Result<Vec<_>, _>>()?;
    Ok((schema, batches))
}

fn expr_bytes(expr: &Option<Expr>) -> Result<Vec<u8>> {
    match expr {
        None => Ok(Vec::new()),
        Some(e) => Ok(serialize_expr(e, &LogicalCodec::default())?.encode_to_vec()),
    }
}

fn expr_from_bytes(bytes: &[u8], ctx: &TaskContext) -> Result<Option<Expr>> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let node = LogicalExprNode::decode(bytes).map_err(|e| err(format!("filter: {e}")))?;
    Ok(Some(parse_expr(&node, ctx, &LogicalCodec::default())?))
}

/// A scan's one input, its slice source ([`crate::sql::slices`]).
fn input(inputs: &[Arc<dyn ExecutionPlan>], node: &str) -> Result<Arc<dyn ExecutionPlan>> {
    match inputs {
        [one] => Ok(one.clone()),
        _ => Err(err(format!(
            "{node} arrived with {} inputs, not 1",
            inputs.len()
        ))),
    }
}

fn blob(blobs: &[Vec<u8>], i: usize) -> Result<&[u8]> {
    blobs
        .get(i)
        .map(Vec::as_slice)
        .ok_or_else(|| err(format!("frame has no blob {i}")))
}

/// Every scalar function a patchgd client can plan: DataFusion's (with the features this build
/// has, nested and regex functions included) and patchgd's UDFs, by name and alias.
pub fn scalar_functions() -> &'static std::collections::HashMap<String, Arc<ScalarUDF>> {
    static FUNCTIONS: std::sync::LazyLock<std::collections::HashMap<String, Arc<ScalarUDF>>> =
        std::sync::LazyLock::new(|| {
            let state = datafusion::execution::SessionStateBuilder::new()
                .with_default_features()
                .build();
            let mut all = state.scalar_functions().clone();
            for udf in functions::udfs() {
                for name in
                    std::iter::once(udf.name()).chain(udf.aliases().iter().map(String::as_str))
                {
                    all.insert(name.to_string(), udf.clone());
                }
            }
            all
        });
    &FUNCTIONS
}

/// A scalar function by name, for plans whose receiver's registry lacks it (Ballista's
/// processes know DataFusion's core functions only).
fn udf(name: &str) -> Option<Arc<ScalarUDF>> {
    scalar_functions().get(name).cloned()
}

impl LogicalExtensionCodec for LogicalCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[LogicalPlan],
        ctx: &TaskContext,
    ) -> Result<Extension> {
        self.ballista.try_decode(buf, inputs, ctx)
    }

    fn try_encode(&self, node: &Extension, buf: &mut Vec<u8>) -> Result<()> {
        self.ballista.try_encode(node, buf)
    }

    fn try_decode_table_provider(
        &self,
        buf: &[u8],
        table_ref: &TableReference,
        schema: SchemaRef,
        ctx: &TaskContext,
    ) -> Result<Arc<dyn TableProvider>> {
        let Some((node, blobs)) = read_frame(buf)? else {
            return self
                .ballista
                .try_decode_table_provider(buf, table_ref, schema, ctx);
        };
        Ok(match node {
            Node::PatchesTable { data } => Arc::new(PatchesTable::new(data.data_set()?)),
            Node::ImagesTable { data } => {
                // Objects the listing cannot use are logged where it runs (the scheduler);
                // the patches scan carries them to its executors instead.
                let mut table = ImagesTable::new(data.data_set()?);
                table.log_failures = true;
                Arc::new(table)
            }
            Node::MemTable => {
                let partitions = blobs
                    .iter()
                    .map(|b| from_ipc(b).map(|(_, batches)| batches))
                    .collect::<Result<Vec<_>>>()?;
                Arc::new(MemTable::try_new(schema, partitions)?)
            }
            Node::LatentsTable { latents } => Arc::new(LatentsTable {
                file: latents.file(),
                schema,
            }),
            other => {
                return internal_err!("patchgd codec: {other:?} is not a table ({table_ref})");
            }
        })
    }

    fn try_encode_table_provider(
        &self,
        table_ref: &TableReference,
        node: Arc<dyn TableProvider>,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        let any = node.as_ref();
        if let Some(t) = any.downcast_ref::<PatchesTable>() {
            let data = WireDataSet::from(&t.data);
            write_frame(&Node::PatchesTable { data }, &[], buf)
        } else if let Some(t) = any.downcast_ref::<ImagesTable>() {
            let data = WireDataSet::from(&t.data);
            write_frame(&Node::ImagesTable { data }, &[], buf)
        } else if let Some(t) = any.downcast_ref::<MemTable>() {
            // Run tables are small: their rows travel with the plan.
            let schema = t.schema();
            let mut blobs = Vec::with_capacity(t.batches.len());
            for partition in &t.batches {
                let batches = partition
                    .try_read()
                    .map_err(|_| err(format!("table {table_ref} is being written")))?;
                blobs.push(ipc(&schema, &batches)?);
            }
            write_frame(&Node::MemTable, &blobs, buf)
        } else if let Some(t) = any.downcast_ref::<LatentsTable>() {
            let latents = WireLatents::from(&t.file);
            write_frame(&Node::LatentsTable { latents }, &[], buf)
        } else {
            self.ballista
                .try_encode_table_provider(table_ref, node, buf)
        }
    }

    fn try_decode_file_format(
        &self,
        buf: &[u8],
        ctx: &TaskContext,
    ) -> Result<Arc<dyn FileFormatFactory>> {
        self.ballista.try_decode_file_format(buf, ctx)
    }

    fn try_encode_file_format(
        &self,
        buf: &mut Vec<u8>,
        node: Arc<dyn FileFormatFactory>,
    ) -> Result<()> {
        self.ballista.try_encode_file_format(buf, node)
    }

    fn try_decode_udf(&self, name: &str, buf: &[u8]) -> Result<Arc<ScalarUDF>> {
        match udf(name) {
            Some(u) => Ok(u),
            None => self.ballista.try_decode_udf(name, buf),
        }
    }
}

impl PhysicalExtensionCodec for PhysicalCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let Some((node, blobs)) = read_frame(buf)? else {
            return self.ballista.try_decode(buf, inputs, ctx, proto_converter);
        };
        Ok(match node {
            Node::PatchesExec {
                data,
                stage,
                entries: wire_entries,
                slices,
                listed,
                listing_failures,
                projection,
            } => {
                let location = data.location()?;
                let entries = entries(&wire_entries)?;
                let slices = slices_from_wire(&slices, entries.len())?;
                let pushed = [
                    expr_from_bytes(blob(&blobs, 0)?, ctx)?,
                    expr_from_bytes(blob(&blobs, 1)?, ctx)?,
                ];
                let mut config = stage.config()?;
                if let Some(f) = &pushed[1] {
                    config.select = Some(cell_selector_for(f, config.channels)?);
                }
                let table_schema = crate::patch::patch_schema();
                let schema = match &projection {
                    Some(p) => Arc::new(table_schema.project(p)?),
                    None => table_schema,
                };
                let scan = PatchScan {
                    data: data.data_set()?,
                    images: location,
                    entries: entries.into(),
                    slices,
                    listed,
                    listing_failures,
                    config,
                    projection,
                    schema,
                    pushed,
                };
                let mut exec = PatchesExec::with_stage_config(
                    scan,
                    Default::default(),
                    input(inputs, "PatchesExec")?,
                );
                exec.log_failures = true;
                Arc::new(exec)
            }
            Node::ImagesExec {
                data,
                entries: wire_entries,
                slices,
                listed,
                projection,
            } => {
                let entries = entries(&wire_entries)?;
                let slices = slices_from_wire(&slices, entries.len())?;
                let mut exec = ImagesExec::new(
                    data.data_set()?,
                    data.location()?,
                    entries.into(),
                    listed,
                    slices,
                    projection,
                    Default::default(),
                    Some(input(inputs, "ImagesExec")?),
                )?;
                exec.log_failures = true;
                Arc::new(exec)
            }
            Node::LatentsExec {
                latents,
                projection,
            } => {
                let (schema, _) = from_ipc(blob(&blobs, 0)?)?;
                Arc::new(LatentsExec::new(latents.file(), schema, projection)?)
            }
            other => return internal_err!("patchgd codec: {other:?} is not a plan node"),
        })
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<()> {
        let any = node.as_ref();
        if let Some(e) = any.downcast_ref::<PatchesExec>() {
            let e = &e.scan;
            let blobs = [expr_bytes(&e.pushed[0])?, expr_bytes(&e.pushed[1])?];
            let node = Node::PatchesExec {
                data: WireDataSet::from(&e.data),
                stage: WireStream::from(&e.config),
                entries: e.entries.iter().map(WireEntry::from).collect(),
                slices: slices_to_wire(&e.slices),
                listed: e.listed,
                listing_failures: e.listing_failures.clone(),
                projection: e.projection.clone(),
            };
            write_frame(&node, &blobs, buf)
        } else if let Some(e) = any.downcast_ref::<ImagesExec>() {
            let node = Node::ImagesExec {
                data: WireDataSet::from(&e.data),
                entries: e.entries.iter().map(WireEntry::from).collect(),
                slices: slices_to_wire(&e.slices),
                listed: e.listed,
                projection: e.projection.clone(),
            };
            write_frame(&node, &[], buf)
        } else if let Some(e) = any.downcast_ref::<LatentsExec>() {
            let node = Node::LatentsExec {
                latents: WireLatents::from(&e.file),
                projection: e.projection.clone(),
            };
            write_frame(&node, &[ipc(&e.table_schema, &[])?], buf)
        } else {
            self.ballista.try_encode(node, buf, proto_converter)
        }
    }

    fn try_decode_udf(&self, name: &str, buf: &[u8]) -> Result<Arc<ScalarUDF>> {
        match udf(name) {
            Some(u) => Ok(u),
            None => self.ballista.try_decode_udf(name, buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_travels_without_secrets_and_comes_back_the_same() {
        let mut data = DataSet::new("s3://bucket/slides/", 256);
        data.labels = Some("s3://bucket/labels.csv".into());
        data.stream.level = 2;
        data.storage
            .options
            .insert("endpoint".into(), "http://127.0.0.1:9000".into());
        data.storage.options.insert(
            "aws_secret_access_key".into(),
            "hunter2-not-to-travel".into(),
        );
        let codec = LogicalCodec::default();
        let mut buf = Vec::new();
        let table = Arc::new(PatchesTable::new(data));
        codec
            .try_encode_table_provider(&TableReference::bare("patches"), table.clone(), &mut buf)
            .unwrap();
        let text = String::from_utf8_lossy(&buf);
        assert!(!text.contains("hunter2"), "a secret travelled: {text}");
        assert!(text.contains("http://127.0.0.1:9000"), "{text}");
        let ctx = TaskContext::default();
        let back = codec
            .try_decode_table_provider(&buf, &TableReference::bare("patches"), table.schema(), &ctx)
            .unwrap();
        let back = back.as_ref().downcast_ref::<PatchesTable>().unwrap();
        assert_eq!(back.data.images, "s3://bucket/slides/");
        assert_eq!(back.data.labels.as_deref(), Some("s3://bucket/labels.csv"));
        assert_eq!((back.data.stream.patch, back.data.stream.level), (256, 2));
        assert_eq!(back.data.storage.options.len(), 1);
        // A truncated frame is an error that says so, not a panic.
        let short = &buf[..buf.len() - 3];
        let err = codec
            .try_decode_table_provider(short, &TableReference::bare("p"), table.schema(), &ctx)
            .unwrap_err();
        assert!(err.to_string().contains("truncated frame"), "{err}");
    }
}
