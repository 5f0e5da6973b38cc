//! Learning curves as a PNG: loss and accuracy per epoch, train and validation, drawn with a
//! tiny built-in renderer (no font or plotting dependency to install).

use crate::source::decode::encode_png;

const W: usize = 720;
const H: usize = 320;
const TRAIN: [u8; 3] = [31, 119, 180];
const VAL: [u8; 3] = [255, 127, 14];
const AXIS: [u8; 3] = [60, 60, 60];

/// 3 x 5 glyphs, rows top to bottom, 3 bits a row (MSB = left).
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        'A' => [2, 5, 7, 5, 5],
        'C' => [3, 4, 4, 4, 3],
        'E' => [7, 4, 6, 4, 7],
        'H' => [5, 5, 7, 5, 5],
        'I' => [7, 2, 2, 2, 7],
        'L' => [4, 4, 4, 4, 7],
        'N' => [6, 5, 5, 5, 5],
        'O' => [2, 5, 5, 5, 2],
        'P' => [6, 5, 6, 4, 4],
        'R' => [6, 5, 6, 5, 5],
        'S' => [3, 4, 2, 1, 6],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        'V' => [5, 5, 5, 5, 2],
        'Y' => [5, 5, 2, 2, 2],
        _ => return None,
    })
}

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3]) {
        let steps = (x1 - x0).abs().max((y1 - y0).abs()).ceil().max(1.0) as i64;
        for s in 0..=steps {
            let t = s as f64 / steps as f64;
            let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
            for (dx, dy) in [(0, 0), (1, 0), (0, 1)] {
                self.set(x.round() as i64 + dx, y.round() as i64 + dy, c);
            }
        }
    }

    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) {
        let scale = 2;
        for (i, ch) in s.chars().enumerate() {
            let Some(g) = glyph(ch.to_ascii_uppercase()) else {
                continue;
            };
            for (row, bits) in g.iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        for sy in 0..scale {
                            for sx in 0..scale {
                                self.set(
                                    x + (i as i64 * 4 + col) * scale + sx,
                                    y + row as i64 * scale + sy,
                                    c,
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// One panel: series of (name colour, values by epoch), drawn in the box at `left`.
fn panel(cv: &mut Canvas, left: f64, title: &str, series: &[([u8; 3], &[f64])]) {
    let (top, width, height) = (40.0, 300.0, 230.0);
    let finite: Vec<f64> = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .collect();
    let (mut lo, mut hi) = finite
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    if finite.is_empty() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    cv.text(left as i64, 12, title, AXIS);
    cv.line((left, top), (left, top + height), AXIS);
    cv.line((left, top + height), (left + width, top + height), AXIS);
    cv.text(left as i64 - 4, (top + height + 8.0) as i64, "EPOCH", AXIS);
    cv.text(
        left as i64 + 250,
        (top + height + 8.0) as i64,
        &series.first().map_or(0, |s| s.1.len()).to_string(),
        AXIS,
    );
    cv.text(left as i64 + 4, top as i64 - 12, &format!("{hi:.2}"), AXIS);
    cv.text(
        left as i64 + 4,
        (top + height) as i64 - 14,
        &format!("{lo:.2}"),
        AXIS,
    );
    for (colour, values) in series {
        let n = values.len().max(2) - 1;
        let point = |i: usize, v: f64| {
            (
                left + width * i as f64 / n as f64,
                top + height * (1.0 - (v - lo) / (hi - lo)),
            )
        };
        for i in 1..values.len() {
            if values[i - 1].is_finite() && values[i].is_finite() {
                cv.line(point(i - 1, values[i - 1]), point(i, values[i]), *colour);
            }
        }
        if values.len() == 1 && values[0].is_finite() {
            let (x, y) = point(0, values[0]);
            cv.line((x - 2.0, y), (x + 2.0, y), *colour);
        }
    }
}

/// Loss and accuracy curves as PNG bytes.
pub fn learning_curves(
    train_loss: &[f64],
    val_loss: &[f64],
    train_acc: &[f64],
    val_acc: &[f64],
) -> Vec<u8> {
    let mut cv = Canvas {
        px: vec![255; W * H * 3],
    };
    panel(
        &mut cv,
        40.0,
        "LOSS",
        &[(TRAIN, train_loss), (VAL, val_loss)],
    );
    panel(
        &mut cv,
        400.0,
        "ACCURACY",
        &[(TRAIN, train_acc), (VAL, val_acc)],
    );
    cv.text(560, 300, "TRAIN", TRAIN);
    cv.text(640, 300, "VAL", VAL);
    encode_png(W as u32, H as u32, 3, &cv.px)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_are_a_png_with_both_series_colours() {
        let png = learning_curves(
            &[2.0, 1.5, 1.0],
            &[2.1, 1.7, 1.2],
            &[0.2, 0.4, 0.6],
            &[0.2, 0.3, 0.5],
        );
        let img = image::load_from_memory(&png).unwrap().into_rgb8();
        assert_eq!(img.dimensions(), (W as u32, H as u32));
        let has = |c: [u8; 3]| img.pixels().any(|p| p.0 == c);
        assert!(has(TRAIN) && has(VAL));
    }
}
