//! The UltraMNIST generator: reproducible bytes, and labels that are the sum of what was drawn.

use patchgd::storage::Location;
use patchgd::synth::mnist::MnistDigits;
use patchgd::synth::{ImageFormat, Recipe, render_image, write_ultramnist};

async fn all_objects(url: &str) -> Vec<(String, bytes::Bytes)> {
    let loc = Location::parse(url).unwrap();
    let mut out = Vec::new();
    for meta in loc.list().await.unwrap() {
        out.push((
            loc.relative(&meta.location).unwrap(),
            loc.get(&meta.location).await.unwrap(),
        ));
    }
    out
}

#[test]
fn same_seed_gives_the_same_bytes_and_another_seed_does_not() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let write = |url: &str, seed: u64| {
        rt.block_on(write_ultramnist(
            &Location::parse(url).unwrap(),
            &Recipe::new(96, 10, seed),
            6,
            3,
            None,
            ImageFormat::Png,
        ))
        .unwrap();
        rt.block_on(all_objects(url))
    };
    let a = write("memory://it-synth-a/ds", 5);
    let b = write("memory://it-synth-b/ds", 5);
    let c = write("memory://it-synth-c/ds", 6);
    assert_eq!(a.len(), 10, "9 images and labels.csv");
    assert_eq!(a, b);
    assert_ne!(a, c);
    let csv = String::from_utf8(
        a.iter()
            .find(|(p, _)| p == "labels.csv")
            .unwrap()
            .1
            .to_vec(),
    )
    .unwrap();
    assert!(
        csv.starts_with("image_id,label,split,digits\ntrain/000000,"),
        "{csv}"
    );
}

#[test]
fn each_label_is_the_sum_of_the_digits_drawn_where_they_were_drawn() {
    let recipe = Recipe::new(256, 28, 3);
    for i in 0..20 {
        let label = (i * 7 % 28) as u32;
        let img = render_image(&recipe, "train", i, label, None);
        assert_eq!(img.digits.iter().map(|&d| d as u32).sum::<u32>(), label);
        assert!((3..=5).contains(&img.digits.len()));
        let px = image::load_from_memory(&img.png).unwrap().into_luma8();
        let inside = |x: u32, y: u32| {
            img.boxes
                .iter()
                .any(|&(bx, by, s)| x >= bx && x < bx + s && y >= by && y < by + s)
        };
        // Ink only inside digit boxes, and every box has ink: each listed digit was drawn.
        assert!(
            px.enumerate_pixels()
                .all(|(x, y, p)| p.0[0] == 0 || inside(x, y))
        );
        for &(bx, by, s) in &img.boxes {
            let ink = (by..by + s)
                .flat_map(|y| (bx..bx + s).map(move |x| (x, y)))
                .filter(|&(x, y)| px.get_pixel(x, y).0[0] > 100)
                .count();
            assert!(ink > 0, "box at ({bx}, {by}) size {s} is empty");
        }
    }
}

#[test]
fn mnist_idx_digits_are_used_when_given() {
    // A tiny IDX pair: ten 28 x 28 samples, digit d filled with value 10 + d.
    let mut images = vec![0, 0, 8, 3, 0, 0, 0, 10, 0, 0, 0, 28, 0, 0, 0, 28];
    let mut labels = vec![0, 0, 8, 1, 0, 0, 0, 10];
    for d in 0..10u8 {
        images.extend(std::iter::repeat_n(10 + d, 28 * 28));
        labels.push(d);
    }
    let set = MnistDigits::parse(&images, &labels).unwrap();
    let img = render_image(&Recipe::new(128, 10, 1), "val", 0, 9, Some(&set));
    let px = image::load_from_memory(&img.png).unwrap().into_luma8();
    let values: std::collections::BTreeSet<u8> =
        px.pixels().map(|p| p.0[0]).filter(|&v| v > 0).collect();
    let expected: std::collections::BTreeSet<u8> = img
        .digits
        .iter()
        .map(|d| 10 + d)
        .filter(|&v| v > 0)
        .collect();
    assert_eq!(values, expected);
    assert!(
        MnistDigits::parse(&images[..100], &labels)
            .unwrap_err()
            .to_string()
            .contains("truncated")
    );
}
