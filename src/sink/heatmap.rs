//! Heatmaps of `patchgd predict --heatmaps`: each image's per-cell class evidence as rows of
//! `heatmaps.parquet` (image_id, row, col, class, score), and the evidence for the predicted
//! class as a PNG, laid over the image's thumbnail, with a colour scale.

use std::sync::Arc;

use arrow::array::{Float32Array, Int64Array, StringArray, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use plotters::prelude::*;

use super::plot::{FAMILY, PlotError, canvas, failed};
pub use crate::model::grad_cam::ImageEvidence;
use crate::source::decode::encode_png;
use crate::source::thumbnail::Thumbnail;

/// The columns of `heatmaps.parquet`.
pub fn heatmaps_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("image_id", DataType::Utf8, false),
        Field::new("row", DataType::UInt32, false),
        Field::new("col", DataType::UInt32, false),
        Field::new("class", DataType::Int64, false),
        Field::new("score", DataType::Float32, false),
    ]))
}

/// Every (cell, class) score of the images, one row each, cells in row-major order.
pub fn heatmaps_batch(images: &[ImageEvidence]) -> RecordBatch {
    let (mut ids, mut rows, mut cols, mut classes, mut scores) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for im in images {
        for cell in 0..im.rows * im.cols {
            for (class, s) in im.scores.iter().enumerate() {
                ids.push(im.image_id.as_str());
                rows.push((cell / im.cols) as u32);
                cols.push((cell % im.cols) as u32);
                classes.push(class as i64);
                scores.push(s[cell]);
            }
        }
    }
    RecordBatch::try_new(
        heatmaps_schema(),
        vec![
            Arc::new(StringArray::from(ids)),
            Arc::new(UInt32Array::from(rows)),
            Arc::new(UInt32Array::from(cols)),
            Arc::new(Int64Array::from(classes)),
            Arc::new(Float32Array::from(scores)),
        ],
    )
    .expect("columns match the heatmaps schema")
}

/// The colour scale: dark blue (no evidence) through cyan, green and yellow to red (the most
/// in this image). Perceptually ordered and readable over both dark and light pictures.
pub(crate) fn colour_of(v: f64) -> RGBColor {
    const STOPS: [(f64, [f64; 3]); 5] = [
        (0.0, [48.0, 18.0, 59.0]),
        (0.25, [40.0, 150.0, 240.0]),
        (0.5, [60.0, 220.0, 120.0]),
        (0.75, [250.0, 190.0, 40.0]),
        (1.0, [180.0, 4.0, 38.0]),
    ];
    let v = v.clamp(0.0, 1.0);
    let i = STOPS.iter().rposition(|s| s.0 <= v).unwrap_or(0).min(3);
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let t = (v - a.0) / (b.0 - a.0);
    let c = |k: usize| (a.1[k] + (b.1[k] - a.1[k]) * t).round() as u8;
    RGBColor(c(0), c(1), c(2))
}

/// How strongly a cell's colour covers the picture: none where there is no evidence, up to
/// 65 % where it is strongest, so the image stays visible under the colour.
fn opacity(v: f64) -> f64 {
    0.65 * v.clamp(0.0, 1.0).sqrt()
}

/// What a heatmap picture shows.
pub struct HeatmapPicture<'a> {
    pub image_id: &'a str,
    pub thumbnail: &'a Thumbnail,
    /// Grid geometry in the grid level's pixels.
    pub rows: usize,
    pub cols: usize,
    pub stride: usize,
    /// One score per cell (row-major), for `class`.
    pub scores: &'a [f32],
    pub class: i64,
    pub probability: f32,
}

/// The longer side of the picture's image area.
const DISPLAY_SIDE: usize = 640;

/// The thumbnail with the class evidence laid over it, a title, and a colour scale.
pub fn heatmap_png(p: &HeatmapPicture) -> Result<Vec<u8>, PlotError> {
    let t = p.thumbnail;
    let scale = DISPLAY_SIDE as f64 / t.width.max(t.height) as f64;
    let (dw, dh) = (
        ((t.width as f64 * scale).round() as usize).max(1),
        ((t.height as f64 * scale).round() as usize).max(1),
    );
    let (left, top, bar_gap, bar_w, right) = (20usize, 64usize, 24usize, 22usize, 110usize);
    let width = left + dw + bar_gap + bar_w + right;
    let height = top + dh.max(240) + 24;
    let max = p.scores.iter().copied().fold(0f32, f32::max) as f64;
    let mut buf = vec![255u8; width * height * 3];
    // A cell's stride on screen, and whether a grid-level coordinate lies on a cell's first
    // display pixel (the border drawn between cells).
    let cell_px = p.stride as f64 * dw as f64 / t.grid_width as f64;
    let px_per_grid = dw as f64 / t.grid_width as f64;
    let on_border = |g: f64, _: usize| {
        let offset = g % p.stride as f64;
        g >= p.stride as f64 && offset * px_per_grid < 1.0
    };
    // The image area, pixel by pixel: the thumbnail (nearest pixel), blended with the colour
    // of the cell each pixel falls in.
    for y in 0..dh {
        for x in 0..dw {
            let tx = ((x as f64 + 0.5) / scale) as usize;
            let ty = ((y as f64 + 0.5) / scale) as usize;
            let src = &t.pixels[(ty.min(t.height - 1) * t.width + tx.min(t.width - 1)) * 3..];
            // Where this pixel is on the grid's level, and so which cell it is in.
            let gx = (x as f64 + 0.5) / dw as f64 * t.grid_width as f64;
            let gy = (y as f64 + 0.5) / dh as f64 * t.grid_height as f64;
            let col = ((gx as usize) / p.stride).min(p.cols - 1);
            let row = ((gy as usize) / p.stride).min(p.rows - 1);
            let v = if max > 0.0 {
                p.scores[row * p.cols + col] as f64 / max
            } else {
                0.0
            };
            let (c, a) = (colour_of(v), opacity(v));
            let at = ((top + y) * width + left + x) * 3;
            for (k, ck) in [c.0, c.1, c.2].into_iter().enumerate() {
                buf[at + k] = (src[k] as f64 * (1.0 - a) + ck as f64 * a).round() as u8;
            }
            // Faint cell borders where cells are big enough on screen to tell apart.
            if cell_px >= 12.0 && (on_border(gx, dw) || on_border(gy, dh)) {
                for k in 0..3 {
                    buf[at + k] = ((buf[at + k] as u16 + 160) / 2) as u8;
                }
            }
        }
    }
    {
        let fail = failed("a heatmap");
        let root = canvas(&mut buf, width as u32, height as u32);
        root.draw(&Text::new(
            format!(
                "{}: predicted class {} ({:.0} %)",
                p.image_id,
                p.class,
                p.probability * 100.0
            ),
            (left as i32, 10),
            (FAMILY, 19).into_font().color(&BLACK),
        ))
        .map_err(&fail)?;
        root.draw(&Text::new(
            if max > 0.0 {
                format!(
                    "evidence for class {} per patch (Grad-CAM on Z); picture: {}",
                    p.class, t.source
                )
            } else {
                format!(
                    "no patch has positive evidence for class {} (Grad-CAM on Z is 0 everywhere)",
                    p.class
                )
            },
            (left as i32, 36),
            (FAMILY, 13).into_font().color(&RGBColor(70, 70, 70)),
        ))
        .map_err(&fail)?;
        root.draw(&Rectangle::new(
            [
                (left as i32 - 1, top as i32 - 1),
                ((left + dw) as i32, (top + dh) as i32),
            ],
            RGBColor(120, 120, 120).stroke_width(1),
        ))
        .map_err(&fail)?;
        // The colour scale, in score units, beside the picture: bottom 0, top the image's
        // strongest evidence.
        let (bar_x, bar_bottom) = ((left + dw + bar_gap) as i32, (top + dh) as i32);
        let top_value = if max > 0.0 { max } else { 1.0 };
        let y_of = |v: f64| bar_bottom - (v / top_value * dh as f64).round() as i32;
        for y in top..top + dh {
            let v = (top + dh - y) as f64 / dh as f64;
            root.draw(&Rectangle::new(
                [(bar_x, y as i32), (bar_x + bar_w as i32, y as i32 + 1)],
                colour_of(v).filled(),
            ))
            .map_err(&fail)?;
        }
        root.draw(&Rectangle::new(
            [
                (bar_x - 1, top as i32 - 1),
                (bar_x + bar_w as i32, bar_bottom),
            ],
            RGBColor(120, 120, 120).stroke_width(1),
        ))
        .map_err(&fail)?;
        for v in ticks(top_value) {
            let y = y_of(v);
            root.draw(&PathElement::new(
                vec![(bar_x + bar_w as i32, y), (bar_x + bar_w as i32 + 5, y)],
                BLACK.stroke_width(1),
            ))
            .map_err(&fail)?;
            root.draw(&Text::new(
                format_score(v),
                (bar_x + bar_w as i32 + 8, y - 7),
                (FAMILY, 12).into_font().color(&BLACK),
            ))
            .map_err(&fail)?;
        }
        root.draw(&Text::new(
            "score",
            (bar_x - 2, top as i32 - 22),
            (FAMILY, 13).into_font().color(&BLACK),
        ))
        .map_err(&fail)?;
        root.present().map_err(&fail)?;
    }
    Ok(encode_png(width as u32, height as u32, 3, &buf))
}

/// Tick values from 0 to `max` at a round step (1, 2 or 5 times a power of ten), four to
/// eight of them.
fn ticks(max: f64) -> Vec<f64> {
    let raw = max / 4.0;
    let power = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|s| max / s <= 8.0)
        .unwrap_or(10.0 * power);
    (0..=((max / step).floor() as usize))
        .map(|i| i as f64 * step)
        .collect()
}

/// A score for a tick label: few digits whatever its magnitude.
fn format_score(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1000.0 || v.abs() < 0.001 {
        format!("{v:.1e}")
    } else {
        // Enough decimals for the tick steps (0.005, 0.05, 0.5, ...), no trailing zeros.
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thumbnail() -> Thumbnail {
        // A 64 x 32 grey picture of a 128 x 64 level.
        Thumbnail {
            width: 64,
            height: 32,
            pixels: vec![128; 64 * 32 * 3],
            grid_width: 128,
            grid_height: 64,
            source: "test".into(),
        }
    }

    #[test]
    fn the_strongest_cell_is_red_and_a_cell_without_evidence_shows_the_image() {
        // 2 x 4 cells of 32 px: evidence only in cell (1, 2), the most there.
        let mut scores = vec![0.0; 8];
        scores[6] = 2.5;
        scores[5] = 1.0;
        let t = thumbnail();
        let png = heatmap_png(&HeatmapPicture {
            image_id: "img",
            thumbnail: &t,
            rows: 2,
            cols: 4,
            stride: 32,
            scores: &scores,
            class: 3,
            probability: 0.9,
        })
        .unwrap();
        let img = image::load_from_memory(&png).unwrap().into_rgb8();
        // Display scale 10 (64 -> 640): cell (1, 2) covers x 20 + 320..480, y 64 + 160..320.
        let strong = img.get_pixel(20 + 400, 64 + 240).0;
        let red = colour_of(1.0);
        let blend = |c: u8| (128.0 * 0.35 + c as f64 * 0.65).round() as u8;
        assert_eq!(strong, [blend(red.0), blend(red.1), blend(red.2)]);
        // Cell (0, 0) has no evidence: the thumbnail's own grey.
        assert_eq!(img.get_pixel(20 + 80, 64 + 80).0, [128, 128, 128]);
        // Cell (1, 1), 40 % of the maximum, is coloured but less opaque.
        let weaker = img.get_pixel(20 + 240, 64 + 240).0;
        assert_ne!(weaker, [128, 128, 128]);
        assert_ne!(weaker, strong);
        // The colour scale's top is the strongest colour.
        let bar = |y: u32| img.get_pixel(20 + 640 + 24 + 11, y).0;
        assert_eq!(bar(64), [red.0, red.1, red.2], "no colour scale");
        let blue = colour_of(1.0 / 320.0);
        assert_eq!(bar(64 + 319), [blue.0, blue.1, blue.2]);
    }

    #[test]
    fn the_table_has_one_row_per_cell_and_class() {
        let e = ImageEvidence {
            image_id: "a".into(),
            rows: 2,
            cols: 3,
            scores: vec![vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0], vec![5.0; 6]],
            predicted: 0,
            probability: 0.5,
        };
        let b = heatmaps_batch(&[e]);
        assert_eq!(b.num_rows(), 12);
        let col = |i: usize| {
            b.column(i)
                .as_any()
                .downcast_ref::<UInt32Array>()
                .unwrap()
                .value(6)
        };
        // Row 6: cell 3 = (1, 0), class 0, score 3.
        assert_eq!((col(1), col(2)), (1, 0));
        let score = b
            .column(4)
            .as_any()
            .downcast_ref::<Float32Array>()
            .unwrap()
            .value(6);
        assert_eq!(score, 3.0);
    }

    #[test]
    fn ticks_are_round_and_span_the_scale() {
        let near = |got: Vec<f64>, want: &[f64]| {
            got.len() == want.len() && got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12)
        };
        assert!(near(ticks(2.5), &[0.0, 0.5, 1.0, 1.5, 2.0, 2.5]));
        assert!(near(ticks(1.0), &[0.0, 0.2, 0.4, 0.6, 0.8, 1.0]));
        assert!(near(
            ticks(0.037),
            &(0..8).map(|i| i as f64 * 0.005).collect::<Vec<_>>()
        ));
        assert_eq!(format_score(0.6000000000000001), "0.6");
        assert_eq!(format_score(0.01), "0.01");
        assert_eq!(format_score(2.5), "2.5");
    }

    #[test]
    fn the_colour_scale_runs_from_blue_to_red() {
        let (lo, hi) = (colour_of(0.0), colour_of(1.0));
        assert!(lo.2 > lo.0 && hi.0 > hi.2);
        assert_eq!(colour_of(0.5), RGBColor(60, 220, 120));
    }
}
