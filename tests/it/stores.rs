//! `gs://`, `az://` and `http://` against real servers on 127.0.0.1 (`patchgd::testkit`; S3 is
//! in s3.rs): fake-gcs-server, Azurite and nginx, which `scripts/test` installs. For each: the
//! same data set reads to the same record batches as from `file://`, a missing object is named,
//! and a server that stops mid-run is retried, then every image is reported.

use std::path::Path;

use patchgd::source::tiff::write::TileCompression;
use patchgd::source::{Catalog, SourceItem, Split, StreamConfig, stream_images};
use patchgd::storage::{Location, StorageError, StoreOptions};
use patchgd::synth::{ImageFormat, Recipe, write_ultramnist};
use patchgd::testkit::{AzuriteServer, GcsServer, HttpServer};

use crate::common::stream_all;

/// The two formats each store is read in: whole-object PNG, and a tiled TIFF read by ranges.
fn formats() -> [(&'static str, ImageFormat); 2] {
    let tiff = ImageFormat::Tiff {
        tile: 64,
        compression: TileCompression::Jpeg { quality: 85 },
        bigtiff: false,
    };
    [("png", ImageFormat::Png), ("tiff", tiff)]
}

/// Three 300 px images per format under `{png,tiff}/` of a local directory, labels included:
/// what each server serves, and the reference it is compared with.
async fn local_data_set() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let recipe = Recipe::new(300, 10, 11);
    for (name, format) in formats() {
        let loc = Location::parse(&dir.path().join(name).display().to_string()).unwrap();
        write_ultramnist(&loc, &recipe, 3, 0, None, format)
            .await
            .unwrap();
    }
    dir
}

/// `root` (a store URL) reads to the same batches as the local copy at `local`, and a missing
/// object under it is named.
async fn reads_like_file(root: &str, options: &StoreOptions, local: &Path) {
    for (name, _) in formats() {
        let config = StreamConfig::new(64, 1);
        let remote = format!("{root}/{name}");
        let (from_store, failed, n) = stream_all(
            &format!("{remote}/images"),
            &format!("{remote}/labels.csv"),
            options,
            config.clone(),
        )
        .await;
        let file = local.join(name).display().to_string();
        let (from_file, _, _) = stream_all(
            &format!("{file}/images"),
            &format!("{file}/labels.csv"),
            &StoreOptions::default(),
            config,
        )
        .await;
        assert!(failed.is_empty(), "{root} {name}: {failed:?}");
        assert_eq!(n, 3, "{root} {name}: images listed");
        // 300 px at 64 px patches: a 5 x 5 grid, one batch per grid row.
        assert_eq!(from_store.len(), 3 * 5, "{root} {name}");
        assert_eq!(
            from_store, from_file,
            "{root} {name}: patches differ from file://"
        );
    }
    let loc = Location::parse_with(&format!("{root}/png/images/train"), options).unwrap();
    let missing = loc.get_relative("absent.png").await.unwrap_err();
    let message = missing.to_string();
    assert!(
        matches!(missing, StorageError::NotFound { .. }),
        "{root}: {message}"
    );
    assert!(
        message.contains(&format!("{root}/png/images/train/absent.png"))
            && message.contains("does not exist"),
        "{message}"
    );
}

/// With few, short retries: list the images, stop the server, then stream. Every image must be
/// reported as a read failure that says it was retried.
async fn a_stopped_server_is_retried_then_reported(
    server: impl Sized,
    root: &str,
    options: &StoreOptions,
) {
    let mut options = options.clone();
    options.max_retries = 2;
    options.retry_timeout_secs = 5.0;
    let images = Location::parse_with(&format!("{root}/png/images"), &options).unwrap();
    let entries = Catalog::load(&images, &format!("{root}/png/labels.csv"), &options)
        .await
        .unwrap()
        .split(Split::Train);
    assert_eq!(entries.len(), 3);
    drop(server);
    let mut rx = stream_images(images, entries, StreamConfig::new(32, 1));
    let mut failures = Vec::new();
    while let Some(item) = rx.recv().await {
        match item {
            SourceItem::Batch(_) => panic!("{root}: no patches can arrive from a stopped server"),
            SourceItem::Failed(f) => failures.push(f),
        }
    }
    assert_eq!(
        failures.len(),
        3,
        "{root}: seen 3 = used 0 + failed {}",
        failures.len()
    );
    for f in &failures {
        assert_eq!(f.stage, "read");
        assert!(
            f.url.starts_with(&format!("{root}/png/images/train/")),
            "{f:?}"
        );
        assert!(f.message.contains("retries"), "not retried: {}", f.message);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_reads_like_file_names_missing_objects_and_reports_a_stopped_server() {
    let local = local_data_set().await;
    let server = GcsServer::start();
    server.create_bucket("slides");
    server.upload("slides", local.path());
    let options = server.options();
    reads_like_file("gs://slides", &options, local.path()).await;
    a_stopped_server_is_retried_then_reported(server, "gs://slides", &options).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_reads_like_file_names_missing_objects_and_reports_a_stopped_server() {
    let local = local_data_set().await;
    let server = AzuriteServer::start();
    server.upload_public("slides", local.path());
    let options = server.options();
    reads_like_file("az://slides", &options, local.path()).await;
    a_stopped_server_is_retried_then_reported(server, "az://slides", &options).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_with_ranges_reads_like_file_names_missing_objects_and_reports_a_stopped_server() {
    let local = local_data_set().await;
    let server = HttpServer::start(local.path());
    let options = server.options();
    let root = server.url();
    reads_like_file(&root, &options, local.path()).await;
    a_stopped_server_is_retried_then_reported(server, &root, &options).await;
}
