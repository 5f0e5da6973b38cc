//! Data set generators. `ultramnist`: the paper's synthetic benchmark, written as PNG images or
//! tiled pyramidal TIFFs, and a labels table, to any object store URL.

pub mod glyphs;
pub mod mnist;
pub mod spec;
pub mod ultramnist;

use crate::source::tiff::write::{PyramidSpec, TileCompression, write_pyramid};
use crate::storage::{Location, StorageError};
pub use spec::{SynthError, SynthOverrides, SynthSpec};
pub use ultramnist::{Layout, Recipe, SynthImage, layout_image, render_image, split_labels};

/// How images are written.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ImageFormat {
    Png,
    /// Tiled pyramidal TIFF: levels halve until one tile holds the level.
    Tiff {
        tile: u32,
        compression: TileCompression,
        bigtiff: bool,
    },
}

/// Write one image as a tiled pyramidal TIFF, tile by tile (the full image is never in memory).
pub async fn write_tiff_image(
    out: &Location,
    relative: &str,
    layout: &Layout,
    size: u32,
    tile: u32,
    compression: TileCompression,
    bigtiff: bool,
) -> Result<u64, StorageError> {
    let spec = PyramidSpec {
        levels: PyramidSpec::halving(size, size, tile),
        tile,
        channels: 1,
        compression,
        bigtiff,
        description: format!(
            "patchgd synth ultramnist {size}x{size} label={}",
            layout.label
        ),
    };
    write_pyramid(out, relative, &spec, |level, tx, ty| {
        layout.render_window(1 << level, tx * tile, ty * tile, tile, tile)
    })
    .await
}

/// Counts of what `write_ultramnist` wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub train: usize,
    pub val: usize,
}

/// Generate and write a data set: `OUT/images/{train,val}/NNNNNN.png` and `OUT/labels.csv`
/// (image_id, label, split, digits). Images render on all cores; output is identical for a seed.
pub async fn write_ultramnist(
    out: &Location,
    recipe: &Recipe,
    train: usize,
    val: usize,
    mnist: Option<&mnist::MnistDigits>,
    format: ImageFormat,
) -> Result<Written, StorageError> {
    if let ImageFormat::Tiff {
        tile,
        compression,
        bigtiff,
    } = format
    {
        let mut csv = String::from("image_id,label,split,digits\n");
        for (split, count) in [("train", train), ("val", val)] {
            let labels = split_labels(recipe, split, count);
            for (i, &label) in labels.iter().enumerate() {
                let layout = layout_image(recipe, split, i, label, mnist);
                let id = format!("{split}/{i:06}");
                write_tiff_image(
                    out,
                    &format!("images/{id}.tif"),
                    &layout,
                    recipe.size,
                    tile,
                    compression,
                    bigtiff,
                )
                .await?;
                let digits: Vec<String> = layout.digits.iter().map(|d| d.to_string()).collect();
                csv.push_str(&format!("{id},{label},{split},{}\n", digits.join(" ")));
            }
        }
        out.put("labels.csv", csv).await?;
        return Ok(Written { train, val });
    }
    let mut csv = String::from("image_id,label,split,digits\n");
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    for (split, count) in [("train", train), ("val", val)] {
        let labels = split_labels(recipe, split, count);
        for chunk_start in (0..count).step_by(threads * 8) {
            let indices: Vec<usize> =
                (chunk_start..(chunk_start + threads * 8).min(count)).collect();
            let images: Vec<SynthImage> = std::thread::scope(|s| {
                let handles: Vec<_> = indices
                    .chunks(8)
                    .map(|part| {
                        s.spawn(|| {
                            part.iter()
                                .map(|&i| render_image(recipe, split, i, labels[i], mnist))
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| h.join().expect("render thread"))
                    .collect()
            });
            for (i, img) in indices.iter().zip(images) {
                let id = format!("{split}/{i:06}");
                out.put(&format!("images/{id}.png"), img.png).await?;
                let digits: Vec<String> = img.digits.iter().map(|d| d.to_string()).collect();
                csv.push_str(&format!(
                    "{id},{},{split},{}\n",
                    img.label,
                    digits.join(" ")
                ));
            }
        }
    }
    out.put("labels.csv", csv).await?;
    Ok(Written { train, val })
}
