//! A real S3-compatible server on 127.0.0.1: moto's server, which `scripts/test` installs into
//! .venv. The same data read from s3:// and from memory:// gives the same patches; credentials
//! come from the environment and are never printed; a server that goes away is retried, then
//! every image is reported.

use std::process::Command;

use patchgd::source::tiff::write::TileCompression;
use patchgd::source::{Catalog, SourceItem, Split, StreamConfig, stream_images};
use patchgd::storage::Location;
use patchgd::synth::{ImageFormat, Recipe, write_ultramnist};
use patchgd::testkit::S3Server;

use crate::common::{memory_url, stream_all};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_gives_the_same_patches_as_memory_for_png_and_tiled_tiff() {
    let server = S3Server::start();
    server.create_bucket("slides");
    let opts = server.options();
    let recipe = Recipe::new(300, 10, 11);
    let tiff = ImageFormat::Tiff {
        tile: 64,
        compression: TileCompression::Jpeg { quality: 85 },
        bigtiff: false,
    };
    for (name, format) in [("png", ImageFormat::Png), ("tiff", tiff)] {
        let s3 = format!("s3://slides/{name}");
        let mem = memory_url(&format!("s3-twin-{name}"));
        for url in [&s3, &mem] {
            let loc = Location::parse_with(url, &opts).unwrap();
            write_ultramnist(&loc, &recipe, 3, 0, None, format)
                .await
                .unwrap();
        }
        let config = StreamConfig::new(64, 1);
        let (from_s3, f1, n) = stream_all(
            &format!("{s3}/images"),
            &format!("{s3}/labels.csv"),
            &opts,
            config.clone(),
        )
        .await;
        let (from_mem, f2, _) = stream_all(
            &format!("{mem}/images"),
            &format!("{mem}/labels.csv"),
            &opts,
            config,
        )
        .await;
        assert!(f1.is_empty() && f2.is_empty(), "{f1:?} {f2:?}");
        assert_eq!(n, 3);
        // 300 px at 64 px patches: a 5 x 5 grid, one batch per grid row.
        assert_eq!(from_s3.len(), 3 * 5, "{name}");
        assert_eq!(
            from_s3, from_mem,
            "{name}: s3:// and memory:// patches differ"
        );
    }
}

#[test]
fn inspect_reads_s3_with_credentials_from_the_environment_and_never_prints_them() {
    let server = S3Server::start();
    server.create_bucket("creds");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let loc = Location::parse_with("s3://creds/ds", &server.options()).unwrap();
    let format = ImageFormat::Tiff {
        tile: 128,
        compression: TileCompression::Deflate,
        bigtiff: false,
    };
    rt.block_on(write_ultramnist(
        &loc,
        &Recipe::new(512, 10, 1),
        1,
        0,
        None,
        format,
    ))
    .unwrap();
    let secret = "s3cr3t-Value-9f8e7d";
    let out = Command::new(env!("CARGO_BIN_EXE_patchgd"))
        .args([
            "inspect",
            "s3://creds/ds/images/train/000000.tif",
            "--patch",
            "128",
            "--storage",
            &format!("endpoint={}", server.endpoint()),
            "--storage",
            "allow_http=true",
            "--storage",
            "region=us-east-1",
        ])
        .env("AWS_ACCESS_KEY_ID", "AKIATESTING")
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    // 512 -> 256 -> 128: three levels; 16 patches of 128 px at level 0.
    assert!(text.contains("TIFF"), "{text}");
    assert!(text.contains("level 2"), "{text}");
    assert!(text.contains("16 patches (4 x 4)"), "{text}");
    assert!(text.contains("Deflate (8)"), "{text}");
    assert!(!text.contains(secret), "the secret was printed: {text}");
    // A private bucket read anonymously: access denied, named, with where credentials come from.
    server.create_bucket_with("private", false);
    rt.block_on(
        Location::parse_with("s3://private/x", &server.options())
            .unwrap()
            .put("a.png", "x"),
    )
    .unwrap(); // moto lets anonymous clients write, not read
    let denied = Command::new(env!("CARGO_BIN_EXE_patchgd"))
        .args([
            "inspect",
            "s3://private/x/a.png",
            "--storage",
            &format!("endpoint={}", server.endpoint()),
            "--storage",
            "allow_http=true",
            "--storage",
            "skip_signature=true",
        ])
        .output()
        .unwrap();
    let err = format!(
        "{}{}",
        String::from_utf8_lossy(&denied.stdout),
        String::from_utf8_lossy(&denied.stderr)
    );
    assert!(!denied.status.success());
    assert!(
        err.contains("s3://private/x/a.png") && err.contains("denied") && err.contains("AWS_"),
        "{err}"
    );
    // A secret in the options is refused before anything runs.
    let refused = Command::new(env!("CARGO_BIN_EXE_patchgd"))
        .args([
            "inspect",
            "s3://creds/ds",
            "--storage",
            &format!("aws_secret_access_key={secret}"),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        err.contains("aws_secret_access_key") && err.contains("environment"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_goes_away_is_retried_then_every_image_is_reported() {
    let server = S3Server::start();
    server.create_bucket("flaky");
    let mut opts = server.options();
    opts.max_retries = 2;
    opts.retry_timeout_secs = 5.0;
    let loc = Location::parse_with("s3://flaky/ds", &opts).unwrap();
    write_ultramnist(&loc, &Recipe::new(64, 10, 2), 4, 0, None, ImageFormat::Png)
        .await
        .unwrap();
    let images = Location::parse_with("s3://flaky/ds/images", &opts).unwrap();
    let entries = Catalog::load(&images, "s3://flaky/ds/labels.csv", &opts)
        .await
        .unwrap()
        .split(Split::Train);
    drop(server); // the server goes away after listing
    let mut rx = stream_images(images, entries, StreamConfig::new(32, 1));
    let mut failures = Vec::new();
    while let Some(item) = rx.recv().await {
        match item {
            SourceItem::Batch(_) => panic!("no patches can arrive from a stopped server"),
            SourceItem::Failed(f) => failures.push(f),
        }
    }
    assert_eq!(
        failures.len(),
        4,
        "seen 4 = used 0 + failed {}",
        failures.len()
    );
    for f in &failures {
        assert_eq!(f.stage, "read");
        assert!(f.url.starts_with("s3://flaky/ds/images/train/"), "{f:?}");
        assert!(f.message.contains("retries"), "not retried: {}", f.message);
    }
}
