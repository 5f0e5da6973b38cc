//! SQL on a Ballista cluster: the codecs' round trips on their own, then a scheduler and two
//! executors started as `patchgd` processes on 127.0.0.1 (ports chosen free) that run the
//! tests/sql files, the pushdown counters and a lost executor.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::util::pretty::pretty_format_batches;
use datafusion::physical_plan::{ExecutionPlan, collect, displayable};
use datafusion::prelude::SessionContext;
use datafusion_proto::bytes::{
    logical_plan_from_bytes_with_extension_codec, logical_plan_to_bytes_with_extension_codec,
    physical_plan_from_bytes_with_extension_codec, physical_plan_to_bytes_with_extension_codec,
};
use patchgd::source::decode::encode_png;
use patchgd::sql::cluster::codec::{LogicalCodec, PhysicalCodec};
use patchgd::sql::cluster::connect;
use patchgd::sql::{DataSet, Sources, query, register, session_with_partitions};
use patchgd::storage::Location;
use patchgd::testkit::LocalCluster;

use patchgd::pipeline::{Definition, RunOptions, run_with};
use patchgd::sql::select;

use crate::common::pipeline_yaml;
use crate::sql::{context_in, data_set, fixture, run_slt_files};

/// Rows of `batches` as printed, sorted (partitions interleave rows of unordered queries).
fn sorted_rows(batches: &[arrow::record_batch::RecordBatch]) -> Vec<String> {
    let text = pretty_format_batches(batches).unwrap().to_string();
    let mut rows: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with('|'))
        .map(str::to_string)
        .collect();
    rows.sort();
    rows
}

fn names(plan: &Arc<dyn ExecutionPlan>, out: &mut Vec<String>) {
    out.push(plan.name().to_string());
    for c in plan.children() {
        names(c, out);
    }
}

#[test]
fn the_codecs_round_trip_every_patchgd_node_and_table_function() {
    let f = fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ctx = context_in(f, session_with_partitions(2)).await;
        let (images, run) = (&f.images, &f.run);
        // Each query and the patchgd node its physical plan must carry.
        let cases = [
            (
                "SELECT image_id, count(*), avg(mean) FROM patches WHERE split = 'train' AND row < 2 GROUP BY image_id".to_string(),
                "PatchesExec",
            ),
            (
                "SELECT x, y FROM patches WHERE image_id = 'train/d' AND col = 1".to_string(),
                "PatchesExec",
            ),
            ("SELECT image_id, format, width, levels, error FROM images".to_string(), "ImagesExec"),
            ("SELECT image_id, bytes FROM images WHERE bytes > 100".to_string(), "DataSourceExec"),
            (format!("SELECT count(*) FROM patches('{images}', 32, 1)"), "PatchesExec"),
            (format!("SELECT image_id, height FROM images('{images}')"), "ImagesExec"),
            (
                format!("SELECT image_id, count(*), max(vector_norm(vector)) FROM latents('{run}') GROUP BY image_id"),
                "LatentsExec",
            ),
            ("SELECT count(*) FROM latents WHERE row = 0".to_string(), "LatentsExec"),
            ("SELECT * FROM metrics".to_string(), "DataSourceExec"),
            ("SELECT image_id, byte_length(pixels) FROM patches WHERE image_id = 'val/c'".to_string(), "PatchesExec"),
        ];
        let task = ctx.task_ctx();
        for (sql, node) in cases {
            let expected = query(&ctx, &sql).await.unwrap().collect().await.unwrap();
            // Client to scheduler: the logical plan, with its table providers.
            let logical = query(&ctx, &sql).await.unwrap().into_optimized_plan().unwrap();
            let bytes =
                logical_plan_to_bytes_with_extension_codec(&logical, &LogicalCodec::default())
                    .unwrap_or_else(|e| panic!("{sql}: logical encode: {e}"));
            let back =
                logical_plan_from_bytes_with_extension_codec(&bytes, &task, &LogicalCodec::default())
                    .unwrap_or_else(|e| panic!("{sql}: logical decode: {e}"));
            assert_eq!(
                back.display_indent().to_string(),
                logical.display_indent().to_string(),
                "{sql}"
            );
            // Scheduler to executor: the physical plan, with the scans.
            let physical = ctx.state().create_physical_plan(&back).await.unwrap();
            let bytes =
                physical_plan_to_bytes_with_extension_codec(physical.clone(), &PhysicalCodec::default())
                    .unwrap_or_else(|e| panic!("{sql}: physical encode: {e}"));
            let decoded =
                physical_plan_from_bytes_with_extension_codec(&bytes, &task, &PhysicalCodec::default())
                    .unwrap_or_else(|e| panic!("{sql}: physical decode: {e}"));
            let shown = displayable(decoded.as_ref()).indent(true).to_string();
            assert_eq!(
                shown,
                displayable(physical.as_ref()).indent(true).to_string(),
                "{sql}: the decoded plan (pushdown included) is the plan that was sent"
            );
            let mut nodes = vec![];
            names(&decoded, &mut nodes);
            assert!(nodes.iter().any(|n| n == node), "{sql}: {nodes:?}");
            let got = collect(decoded, task.clone()).await.unwrap();
            assert_eq!(sorted_rows(&got), sorted_rows(&expected), "{sql}");
        }
        // Pushdown travels: the cell filter is rebuilt on arrival and still prunes.
        let sql = "SELECT x FROM patches WHERE image_id = 'train/d' AND col = 1";
        let physical = query(&ctx, sql).await.unwrap().create_physical_plan().await.unwrap();
        let bytes = physical_plan_to_bytes_with_extension_codec(physical, &PhysicalCodec::default()).unwrap();
        let decoded = physical_plan_from_bytes_with_extension_codec(&bytes, &task, &PhysicalCodec::default()).unwrap();
        let shown = displayable(decoded.as_ref()).indent(true).to_string();
        assert!(shown.contains("image_filter=[image_id = Utf8(\"train/d\")]"), "{shown}");
        assert!(shown.contains("cell_filter=[col = "), "{shown}");
        assert_eq!(collect(decoded, task.clone()).await.unwrap().iter().map(|b| b.num_rows()).sum::<usize>(), 4);
        // Not a patchgd frame, not Ballista's: a clear error, not a panic.
        let err = PhysicalCodec::default();
        let bad = datafusion_proto::physical_plan::PhysicalExtensionCodec::try_decode(
            &err,
            b"\0patchgd\x01\xff",
            &[],
            &task,
            &datafusion_proto::physical_plan::DefaultPhysicalProtoConverter {},
        );
        assert!(bad.unwrap_err().to_string().contains("truncated frame"));
    });
}

/// The counter `name` summed over the EXPLAIN ANALYZE text of a cluster query.
fn counter(text: &str, name: &str) -> usize {
    text.match_indices(&format!("{name}="))
        .map(|(i, m)| {
            text[i + m.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse::<usize>()
                .unwrap_or(0)
        })
        .sum()
}

#[test]
fn a_scheduler_and_two_executors_answer_like_the_local_session() {
    let f = fixture();
    let cluster = LocalCluster::start(Path::new(env!("CARGO_BIN_EXE_patchgd")), 2, 1, 3).unwrap();
    // The SQL files, unchanged: every table, table function and UDF, and `select:`.
    run_slt_files(Some(&cluster.url));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ctx = context_in(f, connect(&cluster.url, 2).await.unwrap()).await;
        // Pushdown survives: the scheduler's plan shows the filters the executors apply.
        let plan = query(
            &ctx,
            "EXPLAIN SELECT x FROM patches WHERE image_id = 'train/d' AND col = 1",
        )
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
        let text = pretty_format_batches(&plan).unwrap().to_string();
        assert!(
            text.contains("image_filter=[image_id = Utf8(\"train/d\")]"),
            "{text}"
        );
        assert!(text.contains("cell_filter=[col = "), "{text}");
        // The executors' counters: each image opened once, none skipped, none decoded twice.
        for (sql, opened, decoded, failed) in [
            (
                "SELECT image_id, count(*) FROM patches GROUP BY image_id",
                5,
                0,
                1,
            ),
            (
                "SELECT image_id, count(*), avg(fg_fraction) FROM patches GROUP BY image_id",
                5,
                4,
                1,
            ),
            ("SELECT avg(mean) FROM patches WHERE row = 3", 5, 1, 1),
            ("SELECT sum(mean) FROM patches WHERE split = 'val'", 1, 1, 0),
        ] {
            let batches = query(&ctx, &format!("EXPLAIN ANALYZE {sql}"))
                .await
                .unwrap()
                .collect()
                .await
                .unwrap();
            let text = pretty_format_batches(&batches).unwrap().to_string();
            assert_eq!(
                (
                    counter(&text, "images_opened"),
                    counter(&text, "images_decoded"),
                    counter(&text, "images_failed")
                ),
                (opened, decoded, failed),
                "{sql}:\n{text}"
            );
        }
    });
    // A pipeline's `select:` on the cluster chooses what the local one chooses.
    rt.block_on(async {
        let sql = "SELECT image_id FROM images WHERE format = 'PNG' AND split = 'train'";
        let local = select::run(&data_set(f), sql).await.unwrap();
        let remote = select::run_on(Some(&cluster.url), &data_set(f), sql)
            .await
            .unwrap();
        assert_eq!(remote.images, local.images);
        assert_eq!(remote.images.len(), 2, "train/a and train/b");
        let cells =
            "SELECT image_id, row, col FROM patches WHERE image_id = 'train/d' AND row = col";
        let local = select::run(&data_set(f), cells).await.unwrap();
        let remote = select::run_on(Some(&cluster.url), &data_set(f), cells)
            .await
            .unwrap();
        assert_eq!(remote.cells, local.cells);
        assert_eq!(
            remote.cells.unwrap()["train/d"].len(),
            4,
            "the diagonal of a 4 x 4 grid"
        );
    });
    // A whole pipeline whose `select:` runs on the cluster (training stays here). The image that
    // cannot be read fails on an executor, so the query does not choose it: it is left out, not
    // counted as failed as a local `select:` counts it (docs/cluster.md, "Failures").
    let out = tempfile::tempdir().unwrap();
    let yaml = pipeline_yaml(
        &f.images,
        &f.labels,
        out.path().to_str().unwrap(),
        crate::sql::PATCH,
        1,
        &format!(
            "select: SELECT image_id FROM images WHERE format = 'PNG'\nselect_cluster: {}\n",
            cluster.url
        ),
    );
    let def = Definition::from_yaml(&yaml, "cluster-select.yaml").unwrap();
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
        (2, 1, 0, 2),
        "a, b, c chosen; d and broken left out"
    );
    // The broken image was read on an executor: its log names it.
    let logs = cluster.log("executor0.err") + &cluster.log("executor1.err");
    assert!(
        logs.contains("broken"),
        "an executor logs the image it could not read:\n{logs}"
    );
}

#[test]
fn a_query_survives_an_executor_killed_mid_scan() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let loc = Location::parse(images.to_str().unwrap()).unwrap();
    // Enough work for several seconds on 2 cores: 96 images of 1024 x 1024.
    let n = 96;
    rt.block_on(async {
        for i in 0..n {
            let px: Vec<u8> = (0..1024 * 1024)
                .map(|p: usize| ((p / 7 + i * 17 + (p % 1024) * (p / 1024) / 64) % 251) as u8)
                .collect();
            loc.put(&format!("img{i:03}.png"), encode_png(1024, 1024, 1, &px))
                .await
                .unwrap();
        }
    });
    let mut cluster =
        LocalCluster::start(Path::new(env!("CARGO_BIN_EXE_patchgd")), 2, 1, 3).unwrap();
    let mut data = DataSet::new(images.to_str().unwrap(), 32);
    data.stream.channels = 1;
    let sql = "SELECT image_id, count(*) AS n, avg(mean) AS m FROM patches GROUP BY image_id";
    let expected = rt.block_on(async {
        let ctx = SessionContext::new();
        let sources = Sources {
            data: Some(data.clone()),
            ..Default::default()
        };
        register(&ctx, &sources).await.unwrap();
        query(&ctx, &format!("SELECT count(*), sum(n) FROM ({sql})"))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap()
    });
    let url = cluster.url.clone();
    let running = rt.spawn(async move {
        let ctx = connect(&url, 4).await.unwrap();
        let sources = Sources {
            data: Some(data),
            ..Default::default()
        };
        register(&ctx, &sources).await.unwrap();
        query(&ctx, &format!("SELECT count(*), sum(n) FROM ({sql})"))
            .await?
            .collect()
            .await
    });
    // Once the second executor runs a task of the query, kill it (SIGKILL: no goodbye).
    let started = Instant::now();
    while !cluster.log("executor1.err").contains("Execute task") {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "executor 1 never got a task"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut lost = cluster.executors.pop().unwrap();
    let lost_pid = lost.id();
    lost.kill().unwrap();
    lost.wait().unwrap();
    assert!(
        !running.is_finished(),
        "the query ended before the executor was killed: make it longer"
    );
    let start = Instant::now();
    let outcome = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(120), running).await })
        .expect("the query must not hang after an executor is lost")
        .unwrap();
    match outcome {
        // Ballista ran the lost executor's tasks on the other one: the full answer.
        Ok(got) => {
            eprintln!(
                "killed executor {lost_pid} after {:?}; the query ended {:?} later",
                started.elapsed() - start.elapsed(),
                start.elapsed()
            );
            assert_eq!(sorted_rows(&got), sorted_rows(&expected));
            // How: the scheduler saw the executor gone (its heartbeats stopped, or, sooner,
            // launching a task on it failed), removed it and gave its tasks to the other one
            // (docs/cluster.md, "Failures"). Which of the two comes first is a race.
            let scheduler = cluster.log("scheduler.err");
            assert!(
                scheduler.contains("heartbeat timed out")
                    || scheduler.contains("Failed to launch new task"),
                "{scheduler}"
            );
            assert!(scheduler.contains("on lost Executor"), "{scheduler}");
        }
        Err(e) => panic!(
            "the query failed {:?} after executor (pid {lost_pid}) was killed: {e}",
            start.elapsed()
        ),
    }
}
