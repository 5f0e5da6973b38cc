//! `patchgd bench --quick`: every part runs end to end through the real binary and reports
//! numbers that hang together.

use std::process::Command;

/// The cells of the rows of the Markdown table under `heading` (header and rule skipped).
fn table(report: &str, heading: &str) -> Vec<Vec<String>> {
    let start = report
        .find(heading)
        .unwrap_or_else(|| panic!("no '{heading}' in:\n{report}"));
    report[start..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

#[test]
fn quick_bench_measures_every_target() {
    let dir = tempfile::tempdir().unwrap();
    let report_file = dir.path().join("bench.md");
    let out = Command::new(env!("CARGO_BIN_EXE_patchgd"))
        .args(["bench", "--quick", "--device", "cpu", "--dir"])
        .arg(dir.path().join("work"))
        .arg("--output")
        .arg(&report_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = std::fs::read_to_string(&report_file).unwrap();

    let eff = table(&report, "## 1.");
    assert_eq!(eff.len(), 2, "{report}");
    for row in &eff {
        let num = |i: usize| row[i].parse::<f64>().unwrap();
        let (ceiling, pipeline, ratio) = (num(5), num(6), num(7));
        assert!(ceiling > 0.0 && pipeline > 0.0, "{row:?}");
        // One round in --quick: the ratio is pipeline / ceiling, up to the rounding of the
        // printed passes/s (whole numbers; resnet18 makes ~100 a second here).
        assert!((pipeline / ceiling - ratio).abs() < 0.03, "{row:?}");
    }
    assert_eq!(
        (eff[0][0].as_str(), eff[1][0].as_str()),
        ("small_cnn", "resnet18")
    );

    // Quick sizes 128, 256, 512 px with 32 px patches: 16, 64, 256 patches per image.
    let mem = table(&report, "## 2.");
    let patchgd: Vec<&Vec<String>> = mem.iter().filter(|r| r[0] == "PatchGD").collect();
    assert_eq!(
        patchgd.iter().map(|r| r[2].as_str()).collect::<Vec<_>>(),
        ["16", "64", "256"]
    );
    for r in &patchgd {
        assert_eq!(r[6], "ok", "{r:?}");
        assert!(
            r[3].parse::<f64>().unwrap() > 50.0,
            "a peak RSS in MiB: {r:?}"
        );
    }
    assert!(mem.iter().any(|r| r[0] == "GD"));

    // GD trains at a size it probed (at these tiny sizes both peaks are libtorch's baseline,
    // so whether it "fits" is noise); both report an accuracy, one seed each in --quick, and
    // the summary's mean is that accuracy.
    let budget = table(&report, "## 3.");
    assert_eq!(budget.len(), 2, "{report}");
    assert_eq!(
        (
            budget[0][0].as_str(),
            budget[0][1].as_str(),
            budget[0][2].as_str()
        ),
        ("PatchGD", "128", "42")
    );
    let gd_px = &budget[1][1];
    assert!(report.contains(&format!(" {gd_px} px: ")), "{report}");
    for r in &budget {
        let acc: f64 = r[6].parse().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&acc), "{r:?}");
        assert!(r[4].parse::<u32>().unwrap() >= 1, "epochs: {r:?}");
    }
    let section = &report[report.find("## 3.").unwrap()..report.find("## 4.").unwrap()];
    let summary = table(
        &section[section.find("| method | seeds").unwrap()..],
        "| method",
    );
    assert_eq!(summary[0][..3], ["PatchGD", "1", budget[0][6].as_str()]);
    assert_eq!(summary[1][..3], ["GD", "1", budget[1][6].as_str()]);
    assert!(section.contains("PatchGD - GD: "), "{section}");

    // Mixed precision on the CPU: f32, its twin with another seed, and bf16 (f16 needs CUDA and
    // is named as not run); the speed ratio is bf16 / f32, and the others' predictions are
    // compared with f32's.
    let precision = table(&report, "## 4.");
    assert_eq!(
        precision.iter().map(|r| r[0].as_str()).collect::<Vec<_>>(),
        ["f32", "f32, seed 43", "bf16"],
        "{report}"
    );
    assert!(report.contains("Not run: f16"), "{report}");
    let speed = |r: &Vec<String>| r[1].parse::<f64>().unwrap();
    let ratio: f64 = precision[2][2].parse().unwrap();
    assert!(
        (speed(&precision[2]) / speed(&precision[0]) - ratio).abs() < 0.01,
        "{precision:?}"
    );
    for r in &precision {
        let acc: f64 = r[7].parse().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&acc), "{r:?}");
    }
    assert_eq!(precision[0][8], "-");
    for r in &precision[1..] {
        let agreement: f64 = r[8].parse().unwrap();
        assert!((0.0..=1.0).contains(&agreement), "{r:?}");
    }

    // Prediction against training's fill pass, both backbones, 8 images of 16 patches.
    let predict = table(&report, "## 5.");
    assert_eq!(predict.len(), 2, "{report}");
    for row in &predict {
        let num = |i: usize| row[i].parse::<f64>().unwrap();
        let (fill, in_memory, pipeline, images_per_s, ratio) =
            (num(4), num(5), num(6), num(7), num(8));
        assert!(fill > 0.0 && in_memory > 0.0 && pipeline > 0.0, "{row:?}");
        assert_eq!(row[2], "8", "{row:?}");
        // 16 patches per image: images/s is the pipeline's passes/s over 16.
        assert!(
            (pipeline / 16.0 - images_per_s).abs() / images_per_s < 0.02,
            "{row:?}"
        );
        assert!((pipeline / fill - ratio).abs() / ratio < 0.02, "{row:?}");
    }

    // Gradient averaging in a group of one, on the CPU: MPI's path (the identity), small_cnn's
    // whole gradient in one bucket; 4 bytes per parameter; the average is checked exactly.
    let allreduce = table(&report, "## 6.");
    assert_eq!(allreduce.len(), 1, "{report}");
    let r = &allreduce[0];
    assert_eq!(
        (r[0].as_str(), r[3].as_str(), r[4].as_str(), r[5].as_str()),
        ("small_cnn", "1", "MPI on cpu", "1"),
        "{r:?}"
    );
    let millions: f64 = r[1].trim_end_matches(" M").parse().unwrap();
    let mb: f64 = r[2].parse().unwrap();
    assert!((millions * 4.0 - mb).abs() < 0.1, "{r:?}");
    assert!(r[7].parse::<f64>().unwrap() > 0.0, "{r:?}");
    assert_eq!(
        r[10], "0e0",
        "one rank's average is its own gradient: {r:?}"
    );
}
