//! Pictures a person reads at a glance: the run's learning curves (and, through [`canvas`], the
//! heatmaps of `patchgd predict --heatmaps`). Drawn with plotters into an RGB buffer and
//! encoded as PNG by the image crate. The font is compiled in (DejaVu Sans, cut down to the
//! characters we draw; `src/sink/font/README.md`), so a picture never depends on the
//! machine's fonts.

use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::source::decode::encode_png;

static FONT: &[u8] = include_bytes!("font/DejaVuSans-subset.ttf");

/// The family every picture's text is drawn in (our embedded font, registered under this name).
pub(crate) const FAMILY: &str = "sans-serif";

pub(crate) const TRAIN: RGBColor = RGBColor(31, 119, 180);
pub(crate) const VAL: RGBColor = RGBColor(255, 127, 14);
const GRID: RGBColor = RGBColor(225, 225, 225);

/// Why a picture could not be drawn (plotters' own error, as text).
#[derive(Debug, thiserror::Error)]
#[error("drawing {what}: {reason}")]
pub struct PlotError {
    pub what: String,
    pub reason: String,
}

/// A drawing area over an RGB buffer of `width` x `height`, with the embedded font registered.
pub(crate) fn canvas(
    buf: &mut [u8],
    width: u32,
    height: u32,
) -> DrawingArea<BitMapBackend<'_>, Shift> {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are ours and parsed by a test: a failure here is a build defect.
        plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
            .unwrap_or_else(|_| panic!("the embedded font does not parse"));
    });
    BitMapBackend::with_buffer(buf, (width, height)).into_drawing_area()
}

/// Turn any plotters error into a [`PlotError`] naming the picture.
pub(crate) fn failed<E: std::fmt::Debug>(what: &str) -> impl Fn(E) -> PlotError + '_ {
    move |e| PlotError {
        what: what.to_string(),
        reason: format!("{e:?}"),
    }
}

/// The value range a panel shows: `fixed` when given, else the finite values' range with a
/// margin (a flat series gets a unit-wide range around it).
fn value_range(series: &[(RGBColor, &str, &[f64])], fixed: Option<(f64, f64)>) -> (f64, f64) {
    if let Some(r) = fixed {
        return r;
    }
    let finite: Vec<f64> = series
        .iter()
        .flat_map(|s| s.2.iter().copied())
        .filter(|v| v.is_finite())
        .collect();
    let lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if finite.is_empty() {
        (0.0, 1.0)
    } else if hi - lo < 1e-9 {
        (lo - 0.5, hi + 0.5)
    } else {
        let pad = (hi - lo) * 0.08;
        (
            (lo - pad).max(if lo >= 0.0 { 0.0 } else { f64::MIN }),
            hi + pad,
        )
    }
}

/// One panel: a line (with a dot per epoch) for each series, epochs on x.
fn panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    caption: &str,
    y_desc: &str,
    series: &[(RGBColor, &str, &[f64])],
    fixed: Option<(f64, f64)>,
) -> Result<(), PlotError> {
    let fail = failed(caption);
    let epochs = series.iter().map(|s| s.2.len()).max().unwrap_or(0).max(1) as i32;
    // One epoch still gets an axis with room either side of its point.
    let x_range = if epochs == 1 { 0..2 } else { 1..epochs };
    let (lo, hi) = value_range(series, fixed);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FAMILY, 17))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(62)
        .build_cartesian_2d(x_range, lo..hi)
        .map_err(&fail)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(y_desc)
        .x_labels((epochs as usize + 1).min(11))
        .y_labels(6)
        .label_style((FAMILY, 13))
        .axis_desc_style((FAMILY, 14))
        .light_line_style(WHITE)
        .bold_line_style(GRID)
        .x_label_formatter(&|x| format!("{x}"))
        .y_label_formatter(&|y| format!("{y:.2}"))
        .draw()
        .map_err(&fail)?;
    for (colour, _, values) in series {
        let points: Vec<(i32, f64)> = values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, v)| (i as i32 + 1, *v))
            .collect();
        // A value that is not finite breaks the line rather than being drawn as a cliff.
        let mut run: Vec<(i32, f64)> = Vec::new();
        for p in &points {
            if run.last().is_some_and(|l| l.0 + 1 != p.0) {
                chart
                    .draw_series(LineSeries::new(run.drain(..), colour.stroke_width(2)))
                    .map_err(&fail)?;
            }
            run.push(*p);
        }
        chart
            .draw_series(LineSeries::new(run, colour.stroke_width(2)))
            .map_err(&fail)?;
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))
            .map_err(&fail)?;
    }
    Ok(())
}

/// A legend in its own strip (never over a curve): a short line and the name of each series.
pub(crate) fn legend(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    entries: &[(RGBColor, &str)],
) -> Result<(), PlotError> {
    let fail = failed("the legend");
    let (w, h) = area.dim_in_pixel();
    let widths: Vec<i32> = entries
        .iter()
        .map(|(_, n)| 40 + 9 * n.len() as i32)
        .collect();
    let mut x = (w as i32 - widths.iter().sum::<i32>()) / 2;
    let y = h as i32 / 2;
    for ((colour, name), width) in entries.iter().zip(widths) {
        area.draw(&PathElement::new(
            vec![(x, y), (x + 26, y)],
            colour.stroke_width(3),
        ))
        .map_err(&fail)?;
        area.draw(&Circle::new((x + 13, y), 3, colour.filled()))
            .map_err(&fail)?;
        area.draw(&Text::new(
            name.to_string(),
            (x + 32, y - 8),
            (FAMILY, 15).into_font().color(&BLACK),
        ))
        .map_err(&fail)?;
        x += width;
    }
    Ok(())
}

/// Loss and accuracy per epoch, train and validation, as PNG bytes; `run_name` is in the title.
pub fn learning_curves(
    run_name: &str,
    train_loss: &[f64],
    val_loss: &[f64],
    train_acc: &[f64],
    val_acc: &[f64],
) -> Result<Vec<u8>, PlotError> {
    const W: u32 = 960;
    const H: u32 = 420;
    let mut buf = vec![255u8; (W * H * 3) as usize];
    {
        let fail = failed("learning curves");
        let root = canvas(&mut buf, W, H);
        root.fill(&WHITE).map_err(&fail)?;
        let root = root
            .titled(&format!("{run_name}: learning curves"), (FAMILY, 21))
            .map_err(&fail)?;
        let (key, body) = root.split_vertically(28);
        legend(&key, &[(TRAIN, "train"), (VAL, "validation")])?;
        let (left, right) = body.split_horizontally(W / 2);
        panel(
            &left,
            "loss",
            "cross-entropy",
            &[(TRAIN, "train", train_loss), (VAL, "validation", val_loss)],
            None,
        )?;
        panel(
            &right,
            "accuracy",
            "fraction right",
            &[(TRAIN, "train", train_acc), (VAL, "validation", val_acc)],
            Some((0.0, 1.0)),
        )?;
        root.present().map_err(&fail)?;
    }
    Ok(encode_png(W, H, 3, &buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rgb(png: &[u8]) -> image::RgbImage {
        image::load_from_memory(png).unwrap().into_rgb8()
    }

    #[test]
    fn curves_draw_both_series_a_legend_and_text_in_the_embedded_font() {
        let png = learning_curves(
            "demo",
            &[2.0, 1.5, 1.0],
            &[2.1, 1.7, 1.2],
            &[0.2, 0.4, 0.6],
            &[0.2, 0.3, 0.5],
        )
        .unwrap();
        let img = rgb(&png);
        assert_eq!(img.dimensions(), (960, 420));
        let count = |c: RGBColor| img.pixels().filter(|p| p.0 == [c.0, c.1, c.2]).count();
        // Two panels of lines and dots for each series, and the legend's sample line.
        assert!(
            count(TRAIN) > 300 && count(VAL) > 300,
            "{} {}",
            count(TRAIN),
            count(VAL)
        );
        // The title is text: anti-aliased glyphs leave grey pixels in the top strip.
        let grey_in_title = (0..960)
            .flat_map(|x| (0..26).map(move |y| (x, y)))
            .filter(|&(x, y)| {
                let p = img.get_pixel(x, y).0;
                p[0] == p[1] && p[1] == p[2] && p[0] > 20 && p[0] < 235
            })
            .count();
        assert!(
            grey_in_title > 50,
            "no title text ({grey_in_title} grey pixels)"
        );
        // Tick labels on both axes of both panels: text left of each y axis and under x.
        let dark = |x0: u32, x1: u32, y0: u32, y1: u32| {
            (x0..x1)
                .flat_map(|x| (y0..y1).map(move |y| (x, y)))
                .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&c| c < 128))
                .count()
        };
        assert!(dark(20, 76, 120, 360) > 100, "left panel: no y tick labels");
        assert!(
            dark(500, 556, 120, 360) > 100,
            "right panel: no y tick labels"
        );
        assert!(dark(80, 470, 370, 400) > 50, "left panel: no x tick labels");
    }

    #[test]
    fn a_curve_with_one_epoch_or_a_missing_value_is_still_drawn() {
        let one = learning_curves("r", &[1.0], &[f64::NAN], &[0.5], &[f64::NAN]).unwrap();
        assert!(
            rgb(&one)
                .pixels()
                .any(|p| p.0 == [TRAIN.0, TRAIN.1, TRAIN.2])
        );
        let gap = learning_curves("r", &[1.0, f64::NAN, 0.5], &[], &[0.1, 0.2, 0.3], &[]);
        assert!(gap.is_ok());
    }
}
