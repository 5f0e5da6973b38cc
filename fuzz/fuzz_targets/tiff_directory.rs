//! Any bytes as a TIFF object: parsing its header and directory chain returns a directory
//! list or a named error, never panics, and allocates no more than the object allows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use patchgd::source::tiff::TiffFile;
use patchgd::storage::Location;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let loc = Location::parse("memory://fuzz-tiff").unwrap();
        loc.put("x.tif", bytes::Bytes::copy_from_slice(data))
            .await
            .unwrap();
        let path = object_store::path::Path::from("x.tif");
        // The head as the source fetches it: the first 64 KiB (or all of a smaller object).
        let head = bytes::Bytes::copy_from_slice(&data[..data.len().min(65536)]);
        if let Ok(file) = TiffFile::open(&loc, &path, data.len() as u64, head).await {
            for level in 0..file.levels.len() {
                let dir = file.level(level).unwrap();
                let _ = patchgd::source::tiff::chunk::check_supported(dir);
            }
        }
    });
});
