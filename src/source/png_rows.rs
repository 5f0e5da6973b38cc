//! A PNG decoded row by row (the `png` crate streams rows), so that patching it holds the
//! compressed object and one band of rows, not the decoded image: a 20k x 20k PNG is cut with
//! memory flat in its height, as a TIFF is. Interlaced (Adam7) PNGs cannot be read in row
//! order and are decoded whole instead.
//!
//! Each row is converted to the pipeline's channels by the `image` crate's own conversions
//! (luma weights, 16-bit rounding, alpha dropped), so the pixels are exactly those of a whole
//! decode ([`super::decode::decode`]).

use std::io::Cursor;

use bytes::Bytes;
use image::{DynamicImage, ImageBuffer};

/// The most a row-by-row decoder may allocate for its own buffers (a row, the inflate window).
const DECODER_LIMIT_BYTES: usize = 64 << 20;

/// Whether a PNG with this header is read row by row: it is a PNG, and not interlaced (the
/// interlace method is the last byte of the IHDR chunk, at offset 28).
pub(super) fn streams_by_rows(head: &[u8]) -> bool {
    head.len() > 28
        && head.starts_with(b"\x89PNG\r\n\x1a\n")
        && &head[12..16] == b"IHDR"
        && head[28] == 0
}

/// An open PNG and a window of its decoded rows, converted to the pipeline's channels.
pub(super) struct PngRows {
    reader: png::Reader<Cursor<Bytes>>,
    pub width: usize,
    pub height: usize,
    channels: usize,
    /// Rows `top..top + window.len() / row_bytes` of the image, `channels` per pixel.
    window: Vec<u8>,
    top: usize,
    /// Rows decoded so far.
    read: usize,
}

impl PngRows {
    /// Read the header. `channels` is 1 (grey) or 3 (RGB).
    pub fn open(bytes: Bytes, channels: usize) -> Result<Self, String> {
        if channels != 1 && channels != 3 {
            return Err(format!("{channels} channels requested; expected 1 or 3"));
        }
        let mut decoder = png::Decoder::new_with_limits(
            Cursor::new(bytes),
            png::Limits {
                bytes: DECODER_LIMIT_BYTES,
            },
        );
        // What the image crate asks for: palettes and sub-byte depths expanded, 16 bits kept.
        decoder.set_transformations(png::Transformations::EXPAND);
        let reader = decoder
            .read_info()
            .map_err(|e| format!("cannot decode Png: {e}"))?;
        let info = reader.info();
        if info.interlaced {
            return Err("an interlaced PNG cannot be read row by row".into());
        }
        let (width, height) = (info.width as usize, info.height as usize);
        if width == 0 || height == 0 {
            return Err("image has zero size".into());
        }
        Ok(Self {
            reader,
            width,
            height,
            channels,
            window: Vec::new(),
            top: 0,
            read: 0,
        })
    }

    fn row_bytes(&self) -> usize {
        self.width * self.channels
    }

    /// Rows `top..top + count` (clipped to the image), `channels` per pixel. Calls must not go
    /// back: rows above an earlier call's `top` are forgotten.
    pub fn rows(&mut self, top: usize, count: usize) -> Result<&[u8], String> {
        if top < self.top {
            return Err(format!(
                "rows {top}.. were asked for after rows {}.. (a bug: bands go down)",
                self.top
            ));
        }
        let end = (top + count).min(self.height);
        let row_bytes = self.row_bytes();
        // Forget rows above the band.
        let forget = top
            .saturating_sub(self.top)
            .min(self.window.len() / row_bytes);
        self.window.drain(..forget * row_bytes);
        self.top += forget;
        while self.read < end {
            let converted = self.next_row()?;
            if self.read < top {
                // A row between two bands (stride larger than the patch): never needed.
                self.read += 1;
                self.top = self.read;
                continue;
            }
            self.window.extend_from_slice(&converted);
            self.read += 1;
        }
        let start = (top - self.top) * row_bytes;
        Ok(&self.window[start..start + (end - top) * row_bytes])
    }

    /// The next row, converted.
    fn next_row(&mut self) -> Result<Vec<u8>, String> {
        let (color, depth) = self.reader.output_color_type();
        let width = self.width as u32;
        let y = self.read;
        let row = self
            .reader
            .next_row()
            .map_err(|e| format!("cannot decode Png: row {y}: {e}"))?
            .ok_or_else(|| format!("cannot decode Png: the data ends before row {y}"))?;
        let data = row.data();
        let image = match depth {
            png::BitDepth::Sixteen => {
                let wide: Vec<u16> = data
                    .chunks_exact(2)
                    .map(|b| u16::from_be_bytes([b[0], b[1]]))
                    .collect();
                sixteen_bit(color, width, wide)
            }
            _ => eight_bit(color, width, data.to_vec()),
        }
        .ok_or_else(|| format!("cannot decode Png: row {y} has an unexpected length"))?;
        Ok(match self.channels {
            1 => image.into_luma8().into_raw(),
            _ => image.into_rgb8().into_raw(),
        })
    }
}

/// One row of 8-bit samples as the image crate's type for `color`.
fn eight_bit(color: png::ColorType, width: u32, data: Vec<u8>) -> Option<DynamicImage> {
    use png::ColorType::*;
    Some(match color {
        Grayscale => DynamicImage::ImageLuma8(ImageBuffer::from_raw(width, 1, data)?),
        GrayscaleAlpha => DynamicImage::ImageLumaA8(ImageBuffer::from_raw(width, 1, data)?),
        Rgb => DynamicImage::ImageRgb8(ImageBuffer::from_raw(width, 1, data)?),
        Rgba => DynamicImage::ImageRgba8(ImageBuffer::from_raw(width, 1, data)?),
        Indexed => return None, // EXPAND turns palettes into RGB(A)
    })
}

/// One row of 16-bit samples as the image crate's type for `color`.
fn sixteen_bit(color: png::ColorType, width: u32, data: Vec<u16>) -> Option<DynamicImage> {
    use png::ColorType::*;
    Some(match color {
        Grayscale => DynamicImage::ImageLuma16(ImageBuffer::from_raw(width, 1, data)?),
        GrayscaleAlpha => DynamicImage::ImageLumaA16(ImageBuffer::from_raw(width, 1, data)?),
        Rgb => DynamicImage::ImageRgb16(ImageBuffer::from_raw(width, 1, data)?),
        Rgba => DynamicImage::ImageRgba16(ImageBuffer::from_raw(width, 1, data)?),
        Indexed => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::decode::decode;

    /// A PNG of `color` and `depth` with varied samples (and a palette for Indexed).
    fn png_of(color: png::ColorType, depth: png::BitDepth, w: u32, h: u32) -> Vec<u8> {
        let samples = match color {
            png::ColorType::Grayscale | png::ColorType::Indexed => 1,
            png::ColorType::GrayscaleAlpha => 2,
            png::ColorType::Rgb => 3,
            png::ColorType::Rgba => 4,
        };
        let bits = samples * depth as usize * w as usize;
        let row_bytes = bits.div_ceil(8);
        let data: Vec<u8> = (0..row_bytes * h as usize)
            .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
            .collect();
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(color);
        enc.set_depth(depth);
        if color == png::ColorType::Indexed {
            let entries = 1usize << depth as usize;
            enc.set_palette((0..entries * 3).map(|i| (i * 37) as u8).collect::<Vec<_>>());
        }
        let mut writer = enc.write_header().unwrap();
        writer.write_image_data(&data).unwrap();
        writer.finish().unwrap();
        out
    }

    #[test]
    fn every_png_colour_type_reads_row_by_row_to_the_pixels_of_a_whole_decode() {
        use png::BitDepth::*;
        use png::ColorType::*;
        let kinds = [
            (Grayscale, One),
            (Grayscale, Four),
            (Grayscale, Eight),
            (Grayscale, Sixteen),
            (GrayscaleAlpha, Eight),
            (GrayscaleAlpha, Sixteen),
            (Rgb, Eight),
            (Rgb, Sixteen),
            (Rgba, Eight),
            (Rgba, Sixteen),
            (Indexed, Two),
            (Indexed, Eight),
        ];
        for (color, depth) in kinds {
            let bytes = png_of(color, depth, 13, 11);
            for channels in [1, 3] {
                let whole = decode(&bytes, channels, None).unwrap();
                let mut rows = PngRows::open(Bytes::from(bytes.clone()), channels).unwrap();
                let row = 13 * channels;
                // Overlapping bands (stride < band), then a jump past rows never needed.
                for (top, count) in [(0, 4), (2, 4), (4, 4), (9, 4)] {
                    let got = rows.rows(top, count).unwrap().to_vec();
                    let end = (top + count).min(11);
                    assert_eq!(
                        got,
                        whole.pixels[top * row..end * row],
                        "{color:?} {depth:?} -> {channels} channel(s), rows {top}..{end}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_png_cut_short_is_an_error_naming_the_row() {
        let bytes = png_of(png::ColorType::Rgb, png::BitDepth::Eight, 64, 64);
        let cut = Bytes::from(bytes[..bytes.len() / 2].to_vec());
        let mut rows = PngRows::open(cut, 3).unwrap();
        let err = rows.rows(0, 64).unwrap_err();
        assert!(err.contains("cannot decode Png: row"), "{err}");
    }
}
