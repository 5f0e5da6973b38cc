//! Per-patch statistics (mean, standard deviation, foreground fraction) and the foreground
//! filter they feed.

/// Which pixels count as foreground: those on the far side of `threshold` from the background
/// (grey level, the mean of the channels). Slides have a light background (glass); UltraMNIST a
/// dark one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Foreground {
    pub threshold: u8,
    pub light_background: bool,
    /// Patches whose foreground fraction is below this keep their metadata row but not their
    /// pixels (null): they are neither buffered nor encoded; their latent cells stay zero.
    pub min_fraction: f32,
}

impl Default for Foreground {
    fn default() -> Self {
        Self {
            threshold: 220,
            light_background: true,
            min_fraction: 0.0,
        }
    }
}

impl Foreground {
    /// From the command line's and Python's spelling: `220` or `light:220` (slides), `dark:30`
    /// (a black canvas), and the fraction a patch needs to keep its pixels.
    pub fn parse(spec: &str, min_fraction: f32) -> Result<Self, String> {
        let (light_background, threshold) = match spec.strip_prefix("dark:") {
            Some(t) => (false, t),
            None => (true, spec.strip_prefix("light:").unwrap_or(spec)),
        };
        let threshold = threshold.parse().map_err(|_| {
            format!("foreground '{spec}': expected a grey level 0-255, light:N or dark:N")
        })?;
        if !(0.0..=1.0).contains(&min_fraction) {
            return Err(format!(
                "min_fraction {min_fraction}: expected a fraction between 0 and 1"
            ));
        }
        Ok(Self {
            threshold,
            light_background,
            min_fraction,
        })
    }
}

/// Mean and standard deviation of every sample, and the foreground fraction of the pixels, over
/// the part of the patch inside the image (`valid_w` x `valid_h`; zero padding is not counted).
/// A pixel's grey level is the integer mean of its channels; the comparison is done on the
/// channel sum (no division per pixel: this runs over every decoded pixel).
pub fn patch_stats(
    patch: &[u8],
    m: usize,
    channels: usize,
    valid_w: usize,
    valid_h: usize,
    fg: &Foreground,
) -> (f32, f32, f32) {
    let ch = channels as u32;
    let t = fg.threshold as u32;
    // light: floor(sum / ch) < t  <=>  sum < t * ch
    // dark:  floor(sum / ch) > t  <=>  sum >= (t + 1) * ch
    let (light, limit) = if fg.light_background {
        (true, t * ch)
    } else {
        (false, (t + 1) * ch)
    };
    let (mut sum, mut sq, mut fg_pixels) = (0u64, 0u64, 0u64);
    for y in 0..valid_h {
        let row = &patch[y * m * channels..(y * m + valid_w) * channels];
        // Per-row u32 sums cannot overflow: 255^2 x 66,000 samples < 2^32.
        debug_assert!(row.len() <= 66_000);
        // Wrapping arithmetic: no overflow-check branches in the dev profile, so it vectorises.
        let (mut s, mut q) = (0u32, 0u32);
        for &v in row {
            let v = v as u32;
            s = s.wrapping_add(v);
            q = q.wrapping_add(v.wrapping_mul(v));
        }
        sum += s as u64;
        sq += q as u64;
        let mut count = 0u32;
        let hit = |s: u32| (if light { s < limit } else { s >= limit }) as u32;
        match channels {
            1 => {
                for &v in row {
                    count = count.wrapping_add(hit(v as u32));
                }
            }
            3 => {
                for px in row.chunks_exact(3) {
                    let s = (px[0] as u32)
                        .wrapping_add(px[1] as u32)
                        .wrapping_add(px[2] as u32);
                    count = count.wrapping_add(hit(s));
                }
            }
            _ => {
                for px in row.chunks_exact(channels) {
                    let s = px.iter().fold(0u32, |a, &v| a.wrapping_add(v as u32));
                    count = count.wrapping_add(hit(s));
                }
            }
        }
        fg_pixels += count as u64;
    }
    let pixels = (valid_w * valid_h) as f64;
    if pixels == 0.0 {
        return (0.0, 0.0, 0.0);
    }
    let n = pixels * channels as f64;
    let mean = sum as f64 / n;
    let var = (sq as f64 / n - mean * mean).max(0.0);
    (
        mean as f32,
        var.sqrt() as f32,
        (fg_pixels as f64 / pixels) as f32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreground_specs_parse_and_bad_ones_name_what_was_expected() {
        let light = Foreground::parse("light:200", 0.5).unwrap();
        assert_eq!((light.threshold, light.light_background), (200, true));
        assert_eq!(Foreground::parse("220", 0.0).unwrap().threshold, 220);
        let dark = Foreground::parse("dark:30", 0.25).unwrap();
        assert_eq!(
            (dark.threshold, dark.light_background, dark.min_fraction),
            (30, false, 0.25)
        );
        let e = Foreground::parse("dusk:3", 0.0).unwrap_err();
        assert!(e.contains("'dusk:3'") && e.contains("dark:N"), "{e}");
        assert!(Foreground::parse("light:300", 0.0).is_err());
        let e = Foreground::parse("220", 1.5).unwrap_err();
        assert!(e.contains("1.5"), "{e}");
    }
}
