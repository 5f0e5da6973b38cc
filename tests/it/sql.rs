//! SQL: the surface pinned by tests/sql/*.slt (sqllogictest), pushdown measured by the source's
//! own counters, `select:` in a pipeline, and the interactive prompt driven through a real
//! terminal.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use arrow::array::Array;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::error::DataFusionError;
use datafusion::physical_plan::{ExecutionPlan, collect};
use datafusion::prelude::SessionContext;
use patchgd::pipeline::{Definition, RunOptions, run_with};
use patchgd::source::decode::encode_png;
use patchgd::source::tiff::write::{PyramidSpec, TileCompression, write_pyramid};
use patchgd::sql::{DataSet, Sources, query, register, select, session, session_with_partitions};
use patchgd::storage::Location;
use sqllogictest::{DBOutput, DefaultColumnType};

use crate::common::pipeline_yaml;

/// The fixture: grey images whose statistics are known by construction, 32 px patches.
///
/// | image      | size     | pixels                       | grid  |
/// |------------|----------|------------------------------|-------|
/// | train/a    | 64 x 64  | all 0                        | 2 x 2 |
/// | train/b    | 96 x 64  | all 255                      | 2 x 3 |
/// | val/c      | 64 x 64  | x < 32: 0, else 255          | 2 x 2 |
/// | train/d    | 128 x 128| all 128; tiled TIFF, 2 levels| 4 x 4 |
/// | broken     | 12 bytes | not an image                 |   -   |
pub struct Fixture {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub images: String,
    pub labels: String,
    /// A finished run over the fixture (pipeline with a `select:`).
    pub run: String,
}

pub const PATCH: usize = 32;

pub(crate) fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let images = root.join("images");
        let loc = Location::parse(images.to_str().unwrap()).unwrap();
        rt.block_on(async {
            let png = |w: usize, h: usize, f: &dyn Fn(usize, usize) -> u8| {
                let px: Vec<u8> = (0..w * h).map(|i| f(i % w, i / w)).collect();
                encode_png(w as u32, h as u32, 1, &px)
            };
            loc.put("train/a.png", png(64, 64, &|_, _| 0)).await.unwrap();
            loc.put("train/b.png", png(96, 64, &|_, _| 255)).await.unwrap();
            loc.put("val/c.png", png(64, 64, &|x, _| if x < 32 { 0 } else { 255 }))
                .await
                .unwrap();
            loc.put("broken.png", b"not an image".to_vec()).await.unwrap();
            let spec = PyramidSpec {
                levels: PyramidSpec::halving(128, 128, 64),
                tile: 32,
                channels: 1,
                compression: TileCompression::Deflate,
                bigtiff: false,
                description: "sql fixture".into(),
            };
            write_pyramid(&loc, "train/d.tif", &spec, |_, _, _| vec![128; 32 * 32])
                .await
                .unwrap();
        });
        let labels = root.join("labels.csv");
        std::fs::write(
            &labels,
            "image_id,label,split\ntrain/a,0,train\ntrain/b,1,train\nval/c,1,val\ntrain/d,0,train\nbroken,0,train\n",
        )
        .unwrap();
        let images = images.to_str().unwrap().to_string();
        let labels = labels.to_str().unwrap().to_string();
        // A run whose training set is chosen by SQL: the PNG images only (train/a, train/b;
        // val/c). Reading the formats fails for `broken`, which the run reports.
        let run = root.join("run").to_str().unwrap().to_string();
        let yaml = pipeline_yaml(
            &images,
            &labels,
            &run,
            PATCH,
            1,
            "select: SELECT image_id FROM images WHERE format = 'PNG'\n",
        );
        let def = Definition::from_yaml(&yaml, "sql-fixture.yaml").unwrap();
        let summary = run_with(
            &def,
            &RunOptions {
                fresh: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            (
                summary.train_images,
                summary.val_images,
                summary.images_failed,
                summary.images_deselected
            ),
            (2, 1, 1, 1),
            "select: keeps a, b, c; d is left out; broken fails"
        );
        Fixture {
            _dir: dir,
            root,
            images,
            labels,
            run,
        }
    })
}

pub(crate) fn data_set(f: &Fixture) -> DataSet {
    let mut data = DataSet::new(&f.images, PATCH);
    data.labels = Some(f.labels.clone());
    data.stream.channels = 1;
    data
}

async fn context(f: &Fixture) -> SessionContext {
    context_in(f, session()).await
}

/// `ctx` with the fixture's tables and run registered.
pub(crate) async fn context_in(f: &Fixture, ctx: SessionContext) -> SessionContext {
    register(
        &ctx,
        &Sources {
            data: Some(data_set(f)),
            run: Some(f.run.clone()),
            storage: Default::default(),
        },
    )
    .await
    .unwrap();
    ctx
}

/// sqllogictest's view of a patchgd session. A record whose SQL starts with `-- as select:`
/// is planned as a pipeline's `select:` query instead.
struct PatchgdDb {
    ctx: SessionContext,
    data: DataSet,
    /// The cluster the session runs on (`df://HOST:PORT`), if any: `select:` runs there too.
    cluster: Option<String>,
}

fn cell(array: &dyn Array, row: usize) -> String {
    if array.is_null(row) {
        return "NULL".into();
    }
    let options = arrow::util::display::FormatOptions::default();
    arrow::util::display::ArrayFormatter::try_new(array, &options)
        .unwrap()
        .value(row)
        .to_string()
}

fn column_type(t: &arrow::datatypes::DataType) -> DefaultColumnType {
    use arrow::datatypes::DataType::*;
    match t {
        Utf8 | LargeUtf8 | Utf8View => DefaultColumnType::Text,
        Int8 | Int16 | Int32 | Int64 | UInt8 | UInt16 | UInt32 | UInt64 => {
            DefaultColumnType::Integer
        }
        Float16 | Float32 | Float64 => DefaultColumnType::FloatingPoint,
        _ => DefaultColumnType::Any,
    }
}

#[async_trait]
impl sqllogictest::AsyncDB for PatchgdDb {
    type Error = DataFusionError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, DataFusionError> {
        let df = match sql.trim_start().strip_prefix("-- as select:") {
            Some(q) => match &self.cluster {
                None => select::plan(&self.data, q.trim()).await?.0,
                Some(url) => {
                    let ctx = patchgd::sql::cluster::connect(url, 2)
                        .await
                        .map_err(|e| DataFusionError::External(Box::new(e)))?;
                    select::plan_in(ctx, &self.data, q.trim()).await?.0
                }
            },
            None => query(&self.ctx, sql).await?,
        };
        let schema = df.schema().as_arrow().clone();
        let batches: Vec<RecordBatch> = df.collect().await?;
        let types = schema
            .fields()
            .iter()
            .map(|f| column_type(f.data_type()))
            .collect();
        let mut rows = Vec::new();
        for b in &batches {
            for r in 0..b.num_rows() {
                rows.push(b.columns().iter().map(|c| cell(c.as_ref(), r)).collect());
            }
        }
        Ok(DBOutput::Rows { types, rows })
    }

    async fn shutdown(&mut self) {}
}

fn slt_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sql");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .collect();
    files.sort();
    files
}

#[test]
fn sqllogictest_files_pin_the_sql_surface() {
    run_slt_files(None);
}

/// Run every tests/sql/*.slt file in a local session, or in sessions on the cluster at
/// `cluster`: the same files, the same expected results.
pub(crate) fn run_slt_files(cluster: Option<&str>) {
    let f = fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let files = slt_files();
    assert!(files.len() >= 4, "tests/sql holds the .slt files");
    for file in files {
        let images = f.images.clone();
        let data = data_set(f);
        let cluster = cluster.map(str::to_string);
        let mut runner = sqllogictest::Runner::new(|| {
            let (data, cluster) = (data.clone(), cluster.clone());
            async move {
                let ctx = match &cluster {
                    None => session(),
                    Some(url) => patchgd::sql::cluster::connect(url, 2)
                        .await
                        .map_err(|e| DataFusionError::External(Box::new(e)))?,
                };
                Ok::<_, DataFusionError>(PatchgdDb {
                    ctx: context_in(fixture(), ctx).await,
                    data,
                    cluster,
                })
            }
        });
        runner.set_var("IMAGES".into(), images);
        runner.set_var("LABELS".into(), f.labels.clone());
        runner.set_var("RUN".into(), f.run.clone());
        runner.set_var("ROOT".into(), f.root.to_str().unwrap().into());
        let svs = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/CMU-1-Small-Region.svs");
        runner.set_var("SVS".into(), svs.to_str().unwrap().into());
        if let Err(e) = rt.block_on(runner.run_file_async(&file)) {
            panic!(
                "{} ({}): {e}",
                file.display(),
                cluster.as_deref().unwrap_or("local")
            );
        }
    }
}

/// The first node of `plan` named `name`, depth first.
fn find(plan: &Arc<dyn ExecutionPlan>, name: &str) -> Option<Arc<dyn ExecutionPlan>> {
    if plan.name() == name {
        return Some(plan.clone());
    }
    plan.children()
        .into_iter()
        .find_map(|child| find(child, name))
}

/// `EXPLAIN sql` as printed text.
async fn explain(ctx: &SessionContext, sql: &str) -> String {
    let plan = query(ctx, &format!("EXPLAIN {sql}"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    arrow::util::pretty::pretty_format_batches(&plan)
        .unwrap()
        .to_string()
}

/// Runs `sql` and returns the counters of its patches scan: (opened, decoded, failed).
async fn scan_counters(ctx: &SessionContext, sql: &str) -> (usize, usize, usize, usize) {
    let df = query(ctx, sql).await.unwrap();
    let plan = df.create_physical_plan().await.unwrap();
    let batches = collect(plan.clone(), ctx.task_ctx()).await.unwrap();
    let rows = batches.iter().map(|b| b.num_rows()).sum();
    let scan = find(&plan, "PatchesExec").expect("the plan scans patches");
    let metrics = scan.metrics().unwrap();
    let count = |name: &str| {
        metrics
            .sum_by_name(name)
            .map(|v| v.as_usize())
            .unwrap_or_default()
    };
    (
        count("images_opened"),
        count("images_decoded"),
        count("images_failed"),
        rows,
    )
}

#[test]
fn filters_and_projections_reach_the_source_so_excluded_images_are_never_decoded() {
    let f = fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ctx = context(f).await;
        // Statistics of one image: only that image is opened and decoded.
        let one = scan_counters(
            &ctx,
            "SELECT avg(fg_fraction) FROM patches WHERE image_id = 'val/c'",
        )
        .await;
        assert_eq!(one, (1, 1, 0, 1), "(opened, decoded, failed, rows)");
        // Geometry only: every image's header is read, no pixel is decoded.
        let geometry = scan_counters(
            &ctx,
            "SELECT image_id, count(*) FROM patches GROUP BY image_id",
        )
        .await;
        assert_eq!(geometry, (5, 0, 1, 4), "broken fails at its header");
        // The same query with statistics decodes the four good images.
        let stats = scan_counters(
            &ctx,
            "SELECT image_id, count(*), avg(fg_fraction) FROM patches GROUP BY image_id",
        )
        .await;
        assert_eq!(stats, (5, 4, 1, 4));
        // A filter on the split prunes at the listing: the one validation image.
        let val = scan_counters(&ctx, "SELECT sum(mean) FROM patches WHERE split = 'val'").await;
        assert_eq!(val, (1, 1, 0, 1));
        // A cell filter: only patches of the TIFF's last grid row are wanted; the PNGs have no
        // row 3, so they are opened (to learn their grid) and never decoded.
        let cells = scan_counters(&ctx, "SELECT avg(mean) FROM patches WHERE row = 3").await;
        assert_eq!(cells, (5, 1, 1, 1));
        // A filter on a statistic cannot be pushed: every good image is decoded.
        let fg = scan_counters(&ctx, "SELECT count(*) FROM patches WHERE fg_fraction > 0.5").await;
        assert_eq!(fg, (5, 4, 1, 1));
        // EXPLAIN shows what reached the source.
        let text = explain(
            &ctx,
            "SELECT x FROM patches WHERE image_id = 'train/d' AND col = 1",
        )
        .await;
        assert!(text.contains("PatchesExec"), "{text}");
        assert!(text.contains("read=geometry"), "{text}");
        assert!(text.contains("images=1 of 5"), "{text}");
        assert!(
            text.contains("image_filter=[image_id = Utf8(\"train/d\")]"),
            "{text}"
        );
        assert!(text.contains("cell_filter=[col = "), "{text}");
    });
}

/// The patches scan of `sql` in `ctx`, each partition executed on its own: the image ids of its
/// rows, in order, per partition.
async fn rows_by_partition(ctx: &SessionContext, sql: &str) -> Vec<Vec<String>> {
    let plan = query(ctx, sql)
        .await
        .unwrap()
        .create_physical_plan()
        .await
        .unwrap();
    let scan = find(&plan, "PatchesExec").expect("the plan scans patches");
    let mut out = Vec::new();
    for p in 0..scan.properties().partitioning.partition_count() {
        let batches =
            datafusion::physical_plan::common::collect(scan.execute(p, ctx.task_ctx()).unwrap())
                .await
                .unwrap();
        let mut ids = Vec::new();
        for b in &batches {
            let col = b.column_by_name("image_id").unwrap();
            ids.extend((0..b.num_rows()).map(|r| cell(col.as_ref(), r)));
        }
        out.push(ids);
    }
    out
}

#[test]
fn the_scans_split_the_images_across_partitions_each_read_once() {
    let f = fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let sql = "SELECT image_id, row, col FROM patches";
        let one = context_in(f, session_with_partitions(1)).await;
        let single = rows_by_partition(&one, sql).await;
        assert_eq!(single.len(), 1);
        let three = context_in(f, session_with_partitions(3)).await;
        let parts = rows_by_partition(&three, sql).await;
        assert_eq!(parts.len(), 3, "5 images, 3 partitions");
        // Each image's patches come from one partition; together they are the single scan's
        // rows in the same order (the slices are contiguous ranges of the listing).
        let images_of = |rows: &Vec<String>| {
            let mut ids = rows.clone();
            ids.dedup();
            ids
        };
        let per_partition: Vec<Vec<String>> = parts.iter().map(images_of).collect();
        let all: Vec<String> = per_partition.concat();
        let mut unique = all.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(
            all.len(),
            unique.len(),
            "an image in two partitions: {per_partition:?}"
        );
        assert_eq!(parts.concat(), single[0], "{per_partition:?}");
        assert_eq!(
            single[0].len(),
            30,
            "4 readable images: 4 + 6 + 16 + 4 patches"
        );
        // The counters still say every image was opened once, and none decoded for geometry.
        let counted = scan_counters(
            &three,
            "SELECT image_id, count(*) FROM patches GROUP BY image_id",
        )
        .await;
        assert_eq!(counted, (5, 0, 1, 4), "(opened, decoded, failed, rows)");
        let stats = scan_counters(&three, "SELECT avg(fg_fraction) FROM patches").await;
        assert_eq!(stats, (5, 4, 1, 1));
        let text = explain(&three, "SELECT count(*) FROM patches").await;
        assert!(text.contains("partitions=3"), "{text}");

        // The images table reads headers in the same partitions: each image once.
        let df = query(
            &three,
            "SELECT image_id, format, width FROM images ORDER BY image_id",
        )
        .await
        .unwrap();
        let plan = df.create_physical_plan().await.unwrap();
        let rows: usize = collect(plan.clone(), three.task_ctx())
            .await
            .unwrap()
            .iter()
            .map(|b| b.num_rows())
            .sum();
        let scan = find(&plan, "ImagesExec").expect("header columns are read by ImagesExec");
        assert_eq!(scan.properties().partitioning.partition_count(), 3);
        let metrics = scan.metrics().unwrap();
        let count = |name: &str| metrics.sum_by_name(name).map(|v| v.as_usize());
        assert_eq!(
            (rows, count("headers_read"), count("images_failed")),
            (5, Some(5), Some(1)),
            "(rows, headers read, failed)"
        );
    });
}

#[test]
fn a_patch_selection_trains_only_on_the_chosen_cells() {
    let f = fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let selection = rt
        .block_on(select::run(
            &data_set(f),
            "SELECT image_id, row, col FROM patches WHERE fg_fraction > 0.5",
        ))
        .unwrap();
    // Foreground (dark pixels on the light default background): all of a, the left column of
    // c, all of d (128 < 220).
    let mut chosen: Vec<(String, usize)> = selection
        .cells
        .as_ref()
        .unwrap()
        .iter()
        .map(|(id, cells)| (id.clone(), cells.len()))
        .collect();
    chosen.sort();
    assert_eq!(
        chosen,
        vec![
            ("train/a".into(), 4),
            ("train/d".into(), 16),
            ("val/c".into(), 2)
        ]
    );
    assert_eq!(selection.failures.len(), 1);
    assert_eq!(selection.failures[0].image_id, "broken");
    // The stream keeps unchosen cells' rows but not their pixels.
    let mut config = data_set(f).stream;
    config.select = selection.cell_selector();
    let loc = Location::parse(&f.images).unwrap();
    let entries = rt
        .block_on(data_set(f).entries())
        .unwrap()
        .1
        .into_iter()
        .filter(|e| e.image_id == "val/c")
        .collect();
    let mut rx = rt.block_on(async { patchgd::source::stream_images(loc, entries, config) });
    let mut present = Vec::new();
    while let Some(item) = rx.blocking_recv() {
        if let patchgd::source::SourceItem::Batch(b) = item {
            let px = b.batch.column_by_name("pixels").unwrap();
            present.extend((0..px.len()).map(|i| px.is_valid(i)));
        }
    }
    assert_eq!(present, vec![true, false, true, false]);
}

#[test]
fn select_refuses_what_is_not_a_query_when_the_pipeline_is_read() {
    let f = fixture();
    let yaml = pipeline_yaml(
        &f.images,
        &f.labels,
        "/tmp/unused",
        PATCH,
        1,
        "select: DELETE FROM images\n",
    );
    let err = Definition::from_yaml(&yaml, "bad-select.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("select") && err.contains("must be a query"),
        "{err}"
    );
    // `select_cluster:` names a scheduler, and needs a `select:` to run there.
    for (extra, expected) in [
        (
            "select: SELECT image_id FROM images\nselect_cluster: http://host:50050\n",
            "expected a scheduler as df://HOST:PORT",
        ),
        (
            "select_cluster: df://host:50050\n",
            "there is no select: query to run",
        ),
    ] {
        let yaml = pipeline_yaml(&f.images, &f.labels, "/tmp/unused", PATCH, 1, extra);
        let err = Definition::from_yaml(&yaml, "bad-cluster.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("select_cluster") && err.contains(expected),
            "{err}"
        );
    }
}

/// The interactive prompt in a real pseudo-terminal: type a query, read the table off the
/// screen, recall it with the up arrow, quit; a second session finds it in the history file.
#[test]
fn the_interactive_prompt_runs_queries_and_keeps_history() {
    use portable_pty::{CommandBuilder, PtySize, native_pty_system};
    use std::io::{Read, Write};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    let f = fixture();
    let history = f.root.join("history.txt");
    let _ = std::fs::remove_file(&history);
    let session = |keys: &[(&str, &str)]| -> String {
        let pty = native_pty_system()
            .openpty(PtySize {
                rows: 40,
                cols: 120,
                pixel_width: 0,
                pixel_height: 0,
            })
            .unwrap();
        let mut cmd = CommandBuilder::new(env!("CARGO_BIN_EXE_patchgd"));
        cmd.args([
            "sql",
            "--images",
            &f.images,
            "--labels",
            &f.labels,
            "--patch",
            "32",
            "--channels",
            "1",
        ]);
        cmd.env("PATCHGD_HISTORY", &history);
        cmd.env("TERM", "xterm");
        let mut child = pty.slave.spawn_command(cmd).unwrap();
        drop(pty.slave);
        let mut reader = pty.master.try_clone_reader().unwrap();
        let writer = Arc::new(Mutex::new(pty.master.take_writer().unwrap()));
        let screen = Arc::new(Mutex::new(vt100::Parser::new(
            40.try_into().unwrap(),
            120.try_into().unwrap(),
            0,
        )));
        let (s, w) = (screen.clone(), writer.clone());
        // The terminal: render what the program writes, and answer its cursor-position
        // requests (ESC [ 6 n) as a real terminal does.
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut parser = s.lock().unwrap();
                for chunk in buf[..n].split_inclusive(|&b| b == b'n') {
                    parser.process(chunk);
                    if chunk.ends_with(b"\x1b[6n") {
                        let (row, col) = parser.screen().cursor_position();
                        let answer = format!("\x1b[{};{}R", row + 1, col + 1);
                        let mut w = w.lock().unwrap();
                        let _ = w.write_all(answer.as_bytes());
                        let _ = w.flush();
                    }
                }
            }
        });
        let contents =
            |screen: &Arc<Mutex<vt100::Parser>>| screen.lock().unwrap().screen().contents();
        let wait_for = |text: &str| {
            let start = Instant::now();
            while !contents(&screen).contains(text) {
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "waited for {text:?}; the screen shows:\n{}",
                    contents(&screen)
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        for (send, expect) in keys {
            {
                let mut w = writer.lock().unwrap();
                w.write_all(send.as_bytes()).unwrap();
                w.flush().unwrap();
            }
            wait_for(expect);
        }
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the prompt did not exit"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        contents(&screen)
    };
    let first = session(&[
        ("", "patchgd>"),
        ("SELECT split, count(*) AS n\r", "..>"),
        ("FROM patches GROUP BY split ORDER BY split;\r", "2 rows"),
        ("SELECT nope FROM patches;\r", "error:"),
        ("\\q\r", ""),
    ]);
    assert!(first.contains("| train | 26 |"), "{first}");
    assert!(first.contains("| val   | 4  |"), "{first}");
    assert!(
        first.contains("nope"),
        "the error names the column:\n{first}"
    );
    let saved = std::fs::read_to_string(&history).unwrap();
    assert!(saved.contains("GROUP BY split"), "history file: {saved}");
    // A new session: the up arrow brings back the last query of the previous one.
    let second = session(&[
        ("", "patchgd>"),
        ("\x1b[A", "SELECT nope FROM patches;"),
        ("\x1b[A", "GROUP BY split ORDER BY split;"),
        ("\r", "2 rows"),
        ("\\q\r", ""),
    ]);
    assert!(second.contains("| val   | 4  |"), "{second}");
}
