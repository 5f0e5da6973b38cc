//! Data set generators. `ultramnist`: the paper's synthetic benchmark, written as PNG images and
//! a labels table to any object store URL.

pub mod glyphs;
pub mod mnist;
pub mod ultramnist;

use crate::storage::{Location, StorageError};
pub use ultramnist::{Recipe, SynthImage, render_image, split_labels};

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
) -> Result<Written, StorageError> {
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
