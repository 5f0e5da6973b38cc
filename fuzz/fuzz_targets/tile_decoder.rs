//! Any bytes as one stored tile or strip: the first bytes choose the directory's settings
//! (compression, predictor, photometric, samples, tile size), the rest is the chunk. Decoding
//! returns pixels of exactly the chunk's size or a named error, never panics, and never
//! decodes more than the chunk holds (LZW and Deflate bombs are cut off).
#![no_main]

use libfuzzer_sys::fuzz_target;
use patchgd::source::tiff::Directory;
use patchgd::source::tiff::chunk::{check_supported, decode_chunk};

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let (settings, chunk) = data.split_at(6);
    let compression = [1, 5, 7, 8, 32946][settings[0] as usize % 5];
    let samples = [1, 3, 4][settings[1] as usize % 3];
    let photometric = [0, 1, 2, 6][settings[2] as usize % 4];
    let predictor = 1 + (settings[3] % 2) as u16;
    let tile = 16 * (1 + (settings[4] % 8) as u32);
    let tiled = settings[5] % 2 == 0;
    let (width, height) = (tile + settings[5] as u32 % 7, tile * 2);
    let dir = Directory {
        index: 0,
        width,
        height,
        samples,
        bits: 8,
        compression,
        photometric,
        predictor,
        planar: 1,
        tiled,
        chunk_width: if tiled { tile } else { width },
        chunk_height: tile,
        offsets: vec![8; 4],
        byte_counts: vec![chunk.len() as u64; 4],
        jpeg_tables: None,
        subfile_type: 0,
        description: None,
    };
    if check_supported(&dir).is_err() {
        return;
    }
    if let Ok(decoded) = decode_chunk(&dir, 0, 0, chunk) {
        assert_eq!(
            decoded.pixels.len(),
            decoded.width * decoded.rows * decoded.samples
        );
    }
});
