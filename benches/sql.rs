//! SQL over patches: `SELECT image_id, count(*), avg(fg_fraction) FROM patches(...) GROUP BY
//! image_id` over 1,000 generated UltraMNIST images (512 px PNG, 128 px patches: 16,000 patch
//! rows), timed three ways (median of 3 runs each, in one process):
//!
//! - metadata only: `count(*)` alone needs the geometry, which comes from the PNG headers (one
//!   64 KiB read per image, nothing decoded);
//! - statistics: `avg(fg_fraction)` needs the pixels decoded, but they are not kept;
//! - pixels: also `sum(byte_length(pixels))`, so every patch's pixels are cut and carried.
//!
//! Then the statistics query again with one partition per core (the scan split into slices of
//! the images, one source stage each) against one partition, with the same result.
//!
//! Then on a Ballista cluster of local processes (one executor, then one per core), and the
//! cost of a query's plans on the wire (encoded and decoded by patchgd's codecs).
//!
//! `scripts/bench` runs it in full; under `cargo test` it runs 20 images as a smoke test.

use std::time::Instant;

use arrow::record_batch::RecordBatch;
use datafusion_proto::bytes::{
    logical_plan_from_bytes_with_extension_codec, logical_plan_to_bytes_with_extension_codec,
    physical_plan_from_bytes_with_extension_codec, physical_plan_to_bytes_with_extension_codec,
};
use patchgd::sql::cluster::codec::{LogicalCodec, PhysicalCodec};
use patchgd::sql::cluster::connect;
use patchgd::sql::{Sources, register, session_with_partitions};
use patchgd::storage::Location;
use patchgd::synth::{ImageFormat, Recipe, write_ultramnist};
use patchgd::testkit::LocalCluster;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let images = if full { 1000 } else { 20 };
    let runs = if full { 3 } else { 1 };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = Location::parse(dir.path().to_str().unwrap()).unwrap();
    let started = Instant::now();
    rt.block_on(write_ultramnist(
        &out,
        &Recipe::new(512, 10, 11),
        images,
        0,
        None,
        ImageFormat::Png,
    ))
    .unwrap();
    let url = dir.path().join("images").to_str().unwrap().to_string();
    println!(
        "{images} images of 512 x 512 generated in {:.1} s under {url}",
        started.elapsed().as_secs_f64()
    );
    let ctx = session_with_partitions(1);
    rt.block_on(register(&ctx, &Sources::default())).unwrap();
    let from = format!("patches('{url}', 128)");
    let queries = [
        (
            "metadata only",
            format!("SELECT image_id, count(*) FROM {from} GROUP BY image_id"),
        ),
        (
            "statistics (decoded, pixels not kept)",
            format!("SELECT image_id, count(*), avg(fg_fraction) FROM {from} GROUP BY image_id"),
        ),
        (
            "pixels read",
            format!(
                "SELECT image_id, count(*), avg(fg_fraction), sum(byte_length(pixels)) FROM {from} GROUP BY image_id"
            ),
        ),
    ];
    println!("| query | median s | images/s | patch rows/s | result rows |\n|---|---|---|---|---|");
    let mut medians = Vec::new();
    for (name, sql) in &queries {
        let mut times = Vec::new();
        let mut rows = 0;
        let mut patch_rows = 0;
        for _ in 0..runs {
            let started = Instant::now();
            let batches = rt
                .block_on(async { ctx.sql(sql).await?.collect().await })
                .unwrap();
            times.push(started.elapsed().as_secs_f64());
            rows = batches.iter().map(|b| b.num_rows()).sum::<usize>();
            patch_rows = batches
                .iter()
                .map(|b| {
                    let c = b.column(1);
                    let c = arrow::compute::cast(c, &arrow::datatypes::DataType::Int64).unwrap();
                    let c = c
                        .as_any()
                        .downcast_ref::<arrow::array::Int64Array>()
                        .unwrap();
                    c.values().iter().sum::<i64>()
                })
                .sum::<i64>();
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        medians.push(median);
        assert_eq!(rows, images, "{name}: one group per image");
        println!(
            "| {name} | {median:.2} | {:.0} | {:.0} | {rows} |",
            images as f64 / median,
            patch_rows as f64 / median
        );
    }
    println!(
        "statistics / metadata-only time: {:.1}x; pixels / statistics: {:.2}x",
        medians[1] / medians[0],
        medians[2] / medians[1]
    );

    // The statistics query, one partition against one per core.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let sql = format!("{} ORDER BY image_id", queries[1].1);
    let sorted = |ctx: &datafusion::prelude::SessionContext| -> (f64, Vec<RecordBatch>) {
        let mut times = Vec::new();
        let mut last = Vec::new();
        for _ in 0..runs {
            let started = Instant::now();
            last = rt
                .block_on(async { ctx.sql(&sql).await?.collect().await })
                .unwrap();
            times.push(started.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        (times[times.len() / 2], last)
    };
    let (one, one_rows) = sorted(&ctx);
    let split = session_with_partitions(cores);
    rt.block_on(register(&split, &Sources::default())).unwrap();
    let (many, many_rows) = sorted(&split);
    let text = |b: &[RecordBatch]| {
        arrow::util::pretty::pretty_format_batches(b)
            .unwrap()
            .to_string()
    };
    assert_eq!(
        text(&one_rows),
        text(&many_rows),
        "the same result in any partitioning"
    );
    println!(
        "\n| statistics query | median s | images/s |\n|---|---|---|\n| 1 partition | {one:.2} | {:.0} |\n| {cores} partitions | {many:.2} | {:.0} |",
        images as f64 / one,
        images as f64 / many
    );
    println!("{cores} partitions / 1: {:.2}x the speed", one / many);

    // The same query on a Ballista cluster of this machine's processes: one executor running
    // `cores` tasks, then `cores` executors of one task each (docs/cluster.md).
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_patchgd"));
    println!(
        "\n| statistics query on a cluster | median s | images/s | vs local partitioned |\n|---|---|---|---|"
    );
    for executors in [1, cores.max(2)] {
        let cluster = LocalCluster::start(bin, executors, (cores / executors).max(1), 30).unwrap();
        let remote = rt.block_on(connect(&cluster.url, cores)).unwrap();
        rt.block_on(register(&remote, &Sources::default())).unwrap();
        let (t, rows) = sorted(&remote);
        assert_eq!(
            text(&rows),
            text(&one_rows),
            "the cluster's answer is the local one"
        );
        println!(
            "| {executors} executor(s) x {} task(s) | {t:.2} | {:.0} | {:.2}x |",
            (cores / executors).max(1),
            images as f64 / t,
            many / t
        );
    }

    // What a query costs on the wire: its logical plan (client to scheduler) and its physical
    // plan (scheduler to executors, the scan carrying its images) encoded and decoded.
    let (logical_bytes, physical_bytes, seconds) = rt.block_on(async {
        let df = split.sql(&sql).await.unwrap();
        let logical = df.clone().into_optimized_plan().unwrap();
        let physical = df.create_physical_plan().await.unwrap();
        let task = split.task_ctx();
        let mut times = Vec::new();
        let (mut lb, mut pb) = (0, 0);
        for _ in 0..20 {
            let started = Instant::now();
            let l = logical_plan_to_bytes_with_extension_codec(&logical, &LogicalCodec::default())
                .unwrap();
            logical_plan_from_bytes_with_extension_codec(&l, &task, &LogicalCodec::default())
                .unwrap();
            let p = physical_plan_to_bytes_with_extension_codec(
                physical.clone(),
                &PhysicalCodec::default(),
            )
            .unwrap();
            physical_plan_from_bytes_with_extension_codec(&p, &task, &PhysicalCodec::default())
                .unwrap();
            times.push(started.elapsed().as_secs_f64());
            (lb, pb) = (l.len(), p.len());
        }
        times.sort_by(f64::total_cmp);
        (lb, pb, times[times.len() / 2])
    });
    println!(
        "plan serialisation (encode + decode, logical {logical_bytes} B + physical {physical_bytes} B for {images} images): {:.2} ms median of 20",
        seconds * 1e3
    );
}
