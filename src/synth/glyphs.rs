//! Digit glyphs shipped with the code: each digit 0-9 as polylines in a 6 x 10 box (x right,
//! y down), drawn with jittered control points, shear, scale and stroke width, so that a data
//! set needs no download. The same jitter draws from the same seed give the same pixels.

use crate::rng::Rng;

type Stroke = Vec<(f64, f64)>;

fn ellipse(cx: f64, cy: f64, rx: f64, ry: f64, points: usize) -> Stroke {
    (0..=points)
        .map(|i| {
            let t = i as f64 / points as f64 * std::f64::consts::TAU;
            (cx + rx * t.cos(), cy + ry * t.sin())
        })
        .collect()
}

/// The strokes of `digit` (0-9).
pub fn strokes(digit: u8) -> Vec<Stroke> {
    let s = |pts: &[(f64, f64)]| pts.to_vec();
    match digit {
        0 => vec![ellipse(3.0, 5.0, 2.5, 4.5, 16)],
        1 => vec![s(&[(1.4, 2.2), (3.3, 0.5), (3.3, 9.5)])],
        2 => vec![s(&[
            (0.8, 2.4),
            (1.7, 0.8),
            (3.0, 0.4),
            (4.4, 0.8),
            (5.0, 2.1),
            (4.7, 3.6),
            (3.6, 5.0),
            (0.6, 9.5),
            (5.4, 9.5),
        ])],
        3 => vec![s(&[
            (0.8, 1.2),
            (2.5, 0.4),
            (4.2, 0.7),
            (5.0, 2.0),
            (4.5, 3.5),
            (2.6, 4.6),
            (4.5, 5.4),
            (5.2, 7.0),
            (4.6, 8.8),
            (2.8, 9.6),
            (0.7, 8.8),
        ])],
        4 => vec![s(&[(4.1, 9.6), (4.1, 0.4), (0.5, 6.8), (5.6, 6.8)])],
        5 => vec![s(&[
            (5.0, 0.5),
            (1.3, 0.5),
            (0.9, 4.3),
            (2.6, 3.8),
            (4.3, 4.3),
            (5.2, 6.0),
            (5.0, 8.2),
            (3.6, 9.5),
            (1.8, 9.5),
            (0.6, 8.6),
        ])],
        6 => vec![s(&[
            (4.6, 0.8),
            (3.0, 0.4),
            (1.5, 1.4),
            (0.7, 3.5),
            (0.6, 6.5),
            (1.2, 8.7),
            (3.0, 9.6),
            (4.7, 8.9),
            (5.3, 7.2),
            (4.8, 5.5),
            (3.2, 4.8),
            (1.6, 5.3),
            (0.7, 6.5),
        ])],
        7 => vec![s(&[(0.6, 0.5), (5.4, 0.5), (2.4, 9.6)])],
        8 => vec![
            ellipse(3.0, 2.6, 2.0, 2.1, 14),
            ellipse(3.0, 7.2, 2.5, 2.4, 14),
        ],
        9 => vec![
            ellipse(3.0, 3.0, 2.3, 2.5, 14),
            s(&[(5.3, 3.0), (5.0, 6.5), (4.0, 8.8), (2.5, 9.6), (1.0, 9.0)]),
        ],
        _ => panic!("digit {digit} is not 0-9"),
    }
}

fn distance_to_segment(p: (f64, f64), a: (f64, f64), b: (f64, f64)) -> f64 {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len2 = dx * dx + dy * dy;
    let t = if len2 == 0.0 {
        0.0
    } else {
        (((p.0 - a.0) * dx + (p.1 - a.1) * dy) / len2).clamp(0.0, 1.0)
    };
    let (cx, cy) = (a.0 + t * dx, a.1 + t * dy);
    ((p.0 - cx).powi(2) + (p.1 - cy).powi(2)).sqrt()
}

/// Render `digit` into a `size` x `size` grey tile (MNIST-like: the glyph fills the central
/// 20/28 of the box), with random stroke width, scale, shear and per-point jitter.
pub fn render(digit: u8, size: usize, rng: &mut Rng) -> Vec<u8> {
    let shear = rng.uniform(-0.3, 0.3);
    let (sx, sy) = (rng.uniform(0.8, 1.1), rng.uniform(0.85, 1.05));
    let width_frac = rng.uniform(0.06, 0.12);
    let unit = size as f64 * 20.0 / 28.0 / 10.0; // px per glyph unit
    let (cx, cy) = (size as f64 / 2.0, size as f64 / 2.0);
    let segments: Vec<((f64, f64), (f64, f64))> = strokes(digit)
        .into_iter()
        .flat_map(|stroke| {
            let pts: Vec<(f64, f64)> = stroke
                .into_iter()
                .map(|(x, y)| {
                    let (x, y) = (x + rng.uniform(-0.25, 0.25), y + rng.uniform(-0.25, 0.25));
                    let (x, y) = ((x - 3.0) * sx, (y - 5.0) * sy);
                    (cx + (x - shear * y) * unit, cy + y * unit)
                })
                .collect();
            pts.windows(2).map(|w| (w[0], w[1])).collect::<Vec<_>>()
        })
        .collect();
    let half = (width_frac * size as f64 / 2.0).max(0.6);
    let mut tile = vec![0u8; size * size];
    for y in 0..size {
        for x in 0..size {
            let p = (x as f64 + 0.5, y as f64 + 0.5);
            let d = segments
                .iter()
                .map(|&(a, b)| distance_to_segment(p, a, b))
                .fold(f64::MAX, f64::min);
            let ink = (half - d + 0.5).clamp(0.0, 1.0);
            tile[y * size + x] = (ink * 255.0).round() as u8;
        }
    }
    tile
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glyphs_have_ink_inside_the_tile_and_digits_differ() {
        let mut tiles = Vec::new();
        for d in 0..10 {
            let t = render(d, 28, &mut Rng::new(d as u64));
            let ink = t.iter().filter(|&&v| v > 128).count();
            assert!(
                ink > 20 && ink < 28 * 28 / 2,
                "digit {d}: {ink} inked pixels"
            );
            tiles.push(t);
        }
        for i in 0..10 {
            for j in i + 1..10 {
                assert_ne!(tiles[i], tiles[j]);
            }
        }
    }
}
