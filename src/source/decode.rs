//! Decoding PNG and JPEG (grey or RGB) into interleaved u8 pixels with the channel count the
//! pipeline asks for, optionally resized (the GD baseline's whole-image input).

use image::imageops::FilterType;

/// A decoded image, HWC u8.
#[derive(Clone, Debug)]
pub struct Decoded {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub pixels: Vec<u8>,
}

/// Why a PNG or JPEG could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a PNG or JPEG image (unrecognised content)")]
    NotAnImage,
    #[error("{0:?} images are not supported; expected PNG or JPEG")]
    Unsupported(image::ImageFormat),
    #[error("cannot decode {format:?}: {source}")]
    Invalid {
        format: image::ImageFormat,
        source: image::ImageError,
    },
    #[error("image has zero size")]
    ZeroSize,
    #[error("{0} channels requested; expected 1 or 3")]
    Channels(usize),
}

/// Decode `bytes` (PNG or JPEG, detected from content) into `channels` (1 = grey, 3 = RGB).
/// With `resize_to`, the whole image is resized to `resize_to` x `resize_to` (bilinear).
pub fn decode(
    bytes: &[u8],
    channels: usize,
    resize_to: Option<u32>,
) -> Result<Decoded, DecodeError> {
    let format = image::guess_format(bytes).map_err(|_| DecodeError::NotAnImage)?;
    if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg) {
        return Err(DecodeError::Unsupported(format));
    }
    if channels != 1 && channels != 3 {
        return Err(DecodeError::Channels(channels));
    }
    let mut img = image::load_from_memory_with_format(bytes, format)
        .map_err(|source| DecodeError::Invalid { format, source })?;
    if img.width() == 0 || img.height() == 0 {
        return Err(DecodeError::ZeroSize);
    }
    if let Some(size) = resize_to {
        img = img.resize_exact(size, size, FilterType::Triangle);
    }
    let (width, height) = (img.width() as usize, img.height() as usize);
    let pixels = match channels {
        1 => img.into_luma8().into_raw(),
        _ => img.into_rgb8().into_raw(),
    };
    Ok(Decoded {
        width,
        height,
        channels,
        pixels,
    })
}

/// Resize interleaved pixels to `size` x `size` (bilinear), as `decode` does with `resize_to`.
pub fn resize(pixels: &[u8], width: usize, height: usize, channels: usize, size: u32) -> Vec<u8> {
    let (w, h) = (width as u32, height as u32);
    let img = if channels == 1 {
        image::DynamicImage::ImageLuma8(
            image::GrayImage::from_raw(w, h, pixels.to_vec()).expect("pixel count matches"),
        )
    } else {
        image::DynamicImage::ImageRgb8(
            image::RgbImage::from_raw(w, h, pixels.to_vec()).expect("pixel count matches"),
        )
    };
    let out = img.resize_exact(size, size, FilterType::Triangle);
    if channels == 1 {
        out.into_luma8().into_raw()
    } else {
        out.into_rgb8().into_raw()
    }
}

/// Encode grey or RGB pixels as PNG.
pub fn encode_png(width: u32, height: u32, channels: usize, pixels: &[u8]) -> Vec<u8> {
    let color = if channels == 1 {
        image::ExtendedColorType::L8
    } else {
        image::ExtendedColorType::Rgb8
    };
    let mut out = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut out),
        pixels,
        width,
        height,
        color,
    )
    .expect("PNG encoding of an in-memory buffer");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_and_jpeg_decode_to_requested_channels() {
        let grey: Vec<u8> = (0..64).map(|i| (i * 4) as u8).collect();
        let png = encode_png(8, 8, 1, &grey);
        let d = decode(&png, 1, None).unwrap();
        assert_eq!((d.width, d.height, d.pixels), (8, 8, grey.clone()));
        let rgb = decode(&png, 3, None).unwrap();
        assert_eq!(rgb.pixels.len(), 8 * 8 * 3);
        assert_eq!(&rgb.pixels[3..6], &[4, 4, 4]);
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95)
            .encode(&rgb.pixels, 8, 8, image::ExtendedColorType::Rgb8)
            .unwrap();
        let j = decode(&jpeg, 1, Some(4)).unwrap();
        assert_eq!((j.width, j.height, j.pixels.len()), (4, 4, 16));
    }

    #[test]
    fn garbage_is_a_clear_error() {
        assert!(
            decode(b"hello world", 1, None)
                .unwrap_err()
                .to_string()
                .contains("not a PNG or JPEG")
        );
        let png = encode_png(8, 8, 1, &[0; 64]);
        let err = decode(&png[..png.len() / 2], 1, None).unwrap_err();
        assert!(
            matches!(err, DecodeError::Invalid { .. }) && err.to_string().contains("cannot decode"),
            "{err}"
        );
    }
}
