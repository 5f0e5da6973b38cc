//! Any bytes as an image object through the whole source stage: sniffing, PNG/JPEG decoding or
//! TIFF parsing and tile reads, the size checks, and cutting patches. The stream ends with the
//! image's patches or exactly one failure naming it; it never panics (a panic would become a
//! failure saying "a bug", which this target treats as a crash).
#![no_main]

use libfuzzer_sys::fuzz_target;
use patchgd::source::{ImageEntry, SourceItem, StreamConfig, stream_images};
use patchgd::storage::Location;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    rt.block_on(async {
        let loc = Location::parse("memory://fuzz-decode").unwrap();
        loc.put("x.img", bytes::Bytes::copy_from_slice(data))
            .await
            .unwrap();
        let entry = ImageEntry {
            image_id: "x".into(),
            path: object_store::path::Path::from("x.img"),
            url: "memory://fuzz-decode/x.img".into(),
            size: data.len() as u64,
            label: Some(0),
            split: None,
        };
        let mut config = StreamConfig::new(32, 3);
        config.decode_workers = 1;
        let mut rx = stream_images(loc, vec![entry], config);
        let mut failures = 0;
        while let Some(item) = rx.recv().await {
            if let SourceItem::Failed(f) = item {
                assert!(
                    !f.message.contains("(a bug)"),
                    "a panic in the source: {}",
                    f.message
                );
                failures += 1;
            }
        }
        assert!(failures <= 1);
    });
});
