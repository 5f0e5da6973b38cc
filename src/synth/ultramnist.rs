//! The UltraMNIST recipe (docs/method.md): a black M x M canvas with 3 to 5 digits at random
//! non-overlapping positions; label = sum of the digits. Each digit is scaled by r in 1..9
//! with weights `[5,4,3,2,1,1,2,3,4] / 25` (28 * r px; when r = 1, half the time 14 px). Scales
//! whose digit would not fit the canvas are drawn again, and a layout that cannot be placed
//! without overlap after 200 tries per digit is drawn again from new scales.
//!
//! Labels are balanced: image i of a split gets class i mod classes, in a seeded shuffled
//! order. For each image, the number of digits is drawn among those that can reach the
//! label, then one multiset of digits with that sum. Every image has its own RNG stream
//! (seed, split, index), so the output is byte-identical for a seed however it is produced.

use super::glyphs;
use super::mnist::MnistDigits;
use crate::rng::Rng;
use crate::source::decode::encode_png;

const SCALE_WEIGHTS: [f64; 9] = [5.0, 4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 3.0, 4.0];

#[derive(Clone, Debug, PartialEq)]
pub struct Recipe {
    pub size: u32,
    pub classes: u32,
    pub seed: u64,
    pub min_digits: u32,
    pub max_digits: u32,
    /// Every digit drawn this many pixels high instead of UltraMNIST's scales (14 to 252 px):
    /// small digits on a large canvas, whose detail a downscale destroys.
    pub digit_px: Option<u32>,
    /// A faint background texture instead of pure black: each 8 x 8 px block a random grey in
    /// 0..=background (0: black, the paper's canvas). Scans have texture everywhere; a canvas
    /// that is one constant almost everywhere gives a BatchNorm trained on whole images
    /// statistics that do not hold in evaluation.
    pub background: u8,
}

/// Side of the background texture's blocks, in pixels.
pub const TEXTURE_BLOCK: u32 = 8;

impl Recipe {
    pub fn new(size: u32, classes: u32, seed: u64) -> Self {
        Self {
            size,
            classes,
            seed,
            min_digits: 3,
            max_digits: 5,
            digit_px: None,
            background: 0,
        }
    }
}

/// One generated image.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthImage {
    pub label: u32,
    pub digits: Vec<u8>,
    /// Digit boxes: (x, y, size) in pixels.
    pub boxes: Vec<(u32, u32, u32)>,
    pub png: Vec<u8>,
}

/// Labels of a split of `count` images: balanced, in a seeded order.
pub fn split_labels(recipe: &Recipe, split: &str, count: usize) -> Vec<u32> {
    let mut labels: Vec<u32> = (0..count)
        .map(|i| (i % recipe.classes as usize) as u32)
        .collect();
    Rng::derive(recipe.seed, &format!("labels-{split}"), 0).shuffle(&mut labels);
    labels
}

/// A multiset of `min..=max` digits summing to `label`, in random order.
fn digits_for(label: u32, recipe: &Recipe, rng: &mut Rng) -> Vec<u8> {
    let lo = recipe.min_digits.max(label.div_ceil(9));
    let count = rng.int_in(lo as i64, recipe.max_digits.max(lo) as i64) as u32;
    let mut rest = label as i64;
    let mut digits = Vec::new();
    for left in (0..count).rev() {
        let d = if left == 0 {
            rest
        } else {
            rng.int_in((rest - 9 * left as i64).max(0), rest.min(9))
        };
        digits.push(d as u8);
        rest -= d;
    }
    rng.shuffle(&mut digits);
    digits
}

fn digit_size(canvas: u32, fixed: Option<u32>, rng: &mut Rng) -> u32 {
    if let Some(px) = fixed {
        return px.min(canvas);
    }
    loop {
        let r = rng.weighted(&SCALE_WEIGHTS) as u32 + 1;
        let size = if r == 1 && rng.coin() { 14 } else { 28 * r };
        if size <= canvas {
            return size;
        }
    }
}

fn layout(
    canvas: u32,
    count: usize,
    digit_px: Option<u32>,
    rng: &mut Rng,
) -> Option<Vec<(u32, u32, u32)>> {
    let mut boxes: Vec<(u32, u32, u32)> = Vec::new();
    for _ in 0..count {
        let size = digit_size(canvas, digit_px, rng);
        let placed = (0..200).find_map(|_| {
            let x = rng.int_in(0, (canvas - size) as i64) as u32;
            let y = rng.int_in(0, (canvas - size) as i64) as u32;
            let free = boxes.iter().all(|&(bx, by, bs)| {
                x + size <= bx || bx + bs <= x || y + size <= by || by + bs <= y
            });
            free.then_some((x, y, size))
        })?;
        boxes.push(placed);
    }
    Some(boxes)
}

/// One image's content before rasterising: its digits, their boxes (x, y, size) and each
/// digit's glyph pixels (size x size, grey).
pub struct Layout {
    pub label: u32,
    pub digits: Vec<u8>,
    pub boxes: Vec<(u32, u32, u32)>,
    pub glyphs: Vec<Vec<u8>>,
    /// The background texture's brightest grey (0: black) and its seed.
    pub background: u8,
    pub texture_seed: u64,
}

/// Image `index` of `split`: digits summing to `label`, sizes and places drawn from the image's
/// own RNG stream (so any image can be made alone, in any order, on any thread).
pub fn layout_image(
    recipe: &Recipe,
    split: &str,
    index: usize,
    label: u32,
    mnist: Option<&MnistDigits>,
) -> Layout {
    let mut rng = Rng::derive(recipe.seed, &format!("image-{split}"), index as u64);
    // Its own stream: images without a texture stay byte-identical to earlier versions.
    let texture_seed =
        Rng::derive(recipe.seed, &format!("texture-{split}"), index as u64).next_u64();
    let digits = digits_for(label, recipe, &mut rng);
    let m = recipe.size;
    let boxes = (0..1000)
        .find_map(|_| layout(m, digits.len(), recipe.digit_px, &mut rng))
        .unwrap_or_else(|| panic!("cannot place {} digits on a {m} px canvas", digits.len()));
    let glyphs = digits
        .iter()
        .zip(&boxes)
        .map(|(&digit, &(_, _, size))| match mnist {
            Some(set) => {
                let samples = &set.by_digit[digit as usize];
                let sample = &samples[rng.below(samples.len() as u64) as usize];
                let img =
                    image::GrayImage::from_raw(set.cols as u32, set.rows as u32, sample.clone())
                        .expect("MNIST sample size");
                image::imageops::resize(&img, size, size, image::imageops::FilterType::Triangle)
                    .into_raw()
            }
            None => glyphs::render(digit, size as usize, &mut rng),
        })
        .collect();
    Layout {
        label,
        digits,
        boxes,
        glyphs,
        background: recipe.background,
        texture_seed,
    }
}

impl Layout {
    /// Draw the digits that fall into the window (x0, y0, w, h) of the image shrunk by
    /// `factor` (1 = full resolution; 2^l for pyramid level l, by box averaging), onto black or
    /// the background texture (a digit pixel keeps the brighter of the two).
    pub fn render_window(&self, factor: u32, x0: u32, y0: u32, w: u32, h: u32) -> Vec<u8> {
        let mut out = vec![0u8; (w * h) as usize];
        if self.background > 0 {
            // Sampled at each output pixel's centre (at pyramid levels: not box-averaged).
            for ty in 0..h {
                for tx in 0..w {
                    let (fx, fy) = (
                        (x0 + tx) * factor + factor / 2,
                        (y0 + ty) * factor + factor / 2,
                    );
                    out[(ty * w + tx) as usize] =
                        self.texture(fx / TEXTURE_BLOCK, fy / TEXTURE_BLOCK);
                }
            }
        }
        for (glyph, &(bx, by, size)) in self.glyphs.iter().zip(&self.boxes) {
            let (gx, gy, gs) = (bx / factor, by / factor, size.div_ceil(factor));
            if gx >= x0 + w || gy >= y0 + h || gx + gs <= x0 || gy + gs <= y0 {
                continue;
            }
            let shrunk = shrink(glyph, size, factor);
            for ty in gy.max(y0)..(gy + gs).min(y0 + h) {
                for tx in gx.max(x0)..(gx + gs).min(x0 + w) {
                    let v = shrunk[((ty - gy) * gs + (tx - gx)) as usize];
                    let p = &mut out[((ty - y0) * w + (tx - x0)) as usize];
                    *p = (*p).max(v);
                }
            }
        }
        out
    }

    /// The grey of texture block (bx, by): a hash of the image's texture seed and the block.
    fn texture(&self, bx: u32, by: u32) -> u8 {
        let key =
            self.texture_seed ^ ((bx as u64) << 32 | by as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (Rng::new(key).next_u64() % (self.background as u64 + 1)) as u8
    }
}

/// Box-average a size x size glyph by `factor` (partial blocks at the edge average what exists).
fn shrink(glyph: &[u8], size: u32, factor: u32) -> Vec<u8> {
    if factor == 1 {
        return glyph.to_vec();
    }
    let s = size.div_ceil(factor);
    let mut out = vec![0u8; (s * s) as usize];
    for y in 0..s {
        for x in 0..s {
            let (mut sum, mut n) = (0u32, 0u32);
            for yy in y * factor..((y + 1) * factor).min(size) {
                for xx in x * factor..((x + 1) * factor).min(size) {
                    sum += glyph[(yy * size + xx) as usize] as u32;
                    n += 1;
                }
            }
            out[(y * s + x) as usize] = (sum / n.max(1)) as u8;
        }
    }
    out
}

/// Render image `index` of `split` as a PNG.
pub fn render_image(
    recipe: &Recipe,
    split: &str,
    index: usize,
    label: u32,
    mnist: Option<&MnistDigits>,
) -> SynthImage {
    let layout = layout_image(recipe, split, index, label, mnist);
    let m = recipe.size;
    let canvas = layout.render_window(1, 0, 0, m, m);
    SynthImage {
        label,
        digits: layout.digits,
        boxes: layout.boxes,
        png: encode_png(m, m, 1, &canvas),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_sum_to_the_label_and_count_three_to_five() {
        let recipe = Recipe::new(64, 28, 1);
        let mut rng = Rng::new(5);
        for label in 0..28 {
            for _ in 0..20 {
                let d = digits_for(label, &recipe, &mut rng);
                assert!((3..=5).contains(&d.len()), "{d:?}");
                assert_eq!(d.iter().map(|&x| x as u32).sum::<u32>(), label);
                assert!(d.iter().all(|&x| x <= 9));
            }
        }
    }

    #[test]
    fn layouts_do_not_overlap_and_fit() {
        let mut rng = Rng::new(9);
        for _ in 0..50 {
            if let Some(b) = layout(256, 5, None, &mut rng) {
                for (i, a) in b.iter().enumerate() {
                    assert!(a.0 + a.2 <= 256 && a.1 + a.2 <= 256);
                    for c in &b[i + 1..] {
                        assert!(
                            a.0 + a.2 <= c.0
                                || c.0 + c.2 <= a.0
                                || a.1 + a.2 <= c.1
                                || c.1 + c.2 <= a.1
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_fixed_digit_size_draws_every_digit_that_size() {
        let recipe = Recipe {
            min_digits: 1,
            max_digits: 1,
            digit_px: Some(14),
            ..Recipe::new(512, 10, 2)
        };
        for i in 0..30 {
            let label = (i % 10) as u32;
            let l = layout_image(&recipe, "train", i, label, None);
            assert_eq!(l.digits, vec![label as u8], "one digit: the label");
            assert_eq!(l.boxes.len(), 1);
            assert_eq!(l.boxes[0].2, 14);
            assert!(l.glyphs[0].iter().any(|&v| v > 128), "the digit has ink");
        }
    }

    #[test]
    fn a_background_texture_stays_below_its_bound_in_8_px_blocks_under_the_digits() {
        let recipe = Recipe {
            min_digits: 1,
            max_digits: 1,
            digit_px: Some(28),
            background: 16,
            ..Recipe::new(128, 10, 3)
        };
        let l = layout_image(&recipe, "train", 0, 7, None);
        let px = l.render_window(1, 0, 0, 128, 128);
        let (bx, by, size) = l.boxes[0];
        let in_digit = |x: u32, y: u32| x >= bx && x < bx + size && y >= by && y < by + size;
        let mut greys = std::collections::BTreeSet::new();
        for y in 0..128 {
            for x in 0..128 {
                let v = px[(y * 128 + x) as usize];
                if !in_digit(x, y) {
                    assert!(v <= 16, "({x}, {y}) = {v}");
                    // One grey per block.
                    let corner = px[((y / 8 * 8) * 128 + x / 8 * 8) as usize];
                    if !in_digit(x / 8 * 8, y / 8 * 8) {
                        assert_eq!(v, corner);
                    }
                    greys.insert(v);
                }
            }
        }
        assert!(greys.len() > 10, "a texture, not a constant: {greys:?}");
        assert!(px.iter().any(|&v| v > 128), "the digit is drawn over it");
        // The same image rendered again is the same (the texture comes from its own stream).
        assert_eq!(
            layout_image(&recipe, "train", 0, 7, None).render_window(1, 0, 0, 128, 128),
            px
        );
    }

    #[test]
    fn labels_are_balanced() {
        let l = split_labels(&Recipe::new(64, 4, 3), "train", 10);
        let counts: Vec<usize> = (0..4)
            .map(|c| l.iter().filter(|&&x| x == c).count())
            .collect();
        assert_eq!(counts, vec![3, 3, 2, 2]);
    }
}
