//! Data-parallel runs under a real `mpirun` (Open MPI), two ranks on this machine, one thread
//! each: they take the steps one process takes over the same global batches; with BatchNorm
//! they learn and stay bitwise identical; a checkpoint is not resumed by another rank count.
//! Only built with the `mpi` feature (scripts/test turns it on).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::common::{pipeline_yaml, square_dataset};

/// A file:// data set (ranks are separate processes: memory:// would not be shared) of 13
/// training and 6 validation images, and a pipeline over it, batch 4, two epochs; `extra` is
/// appended to the pipeline. With 2 ranks, rank 0 gets 7 training images and rank 1 6, so each
/// epoch's last step has one image, rank 0's, and rank 1 takes it with none (an idle step).
fn setup(dir: &Path, extra: &str) -> PathBuf {
    setup_with(dir, 13, extra)
}

fn setup_with(dir: &Path, train: usize, extra: &str) -> PathBuf {
    let root = dir.join("data").display().to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (images, labels) = rt.block_on(square_dataset(&root, 32, 8, train, 6, 3));
    let out = dir.join("out").display().to_string();
    let yaml = pipeline_yaml(&images, &labels, &out, 16, 2, extra)
        .replace("batch_size: 8", "batch_size: 4")
        .replace("sampling_fraction: 0.25", "sampling_fraction: 0.5");
    let file = dir.join("p.yaml");
    std::fs::write(&file, yaml).unwrap();
    file
}

/// `patchgd run FILE --no-progress --set output=OUT`, under `mpirun -np N` when `ranks` > 1.
fn run(file: &Path, ranks: usize, out: &Path, extra: &[&str]) -> Output {
    let output = format!("output={}", out.display());
    let args: Vec<String> = ["run", file.to_str().unwrap(), "--no-progress", "--set"]
        .iter()
        .map(|s| s.to_string())
        .chain([output])
        .chain(
            extra
                .iter()
                .flat_map(|s| ["--set".to_string(), s.to_string()]),
        )
        .collect();
    launch(ranks, &args)
        .output()
        .expect("mpirun (apt-get install openmpi-bin; scripts/setup mpi)")
}

/// `patchgd ARGS`, under `mpirun -np N` when `ranks` > 1, in the ranks' environment.
fn launch(ranks: usize, args: &[String]) -> Command {
    let exe = env!("CARGO_BIN_EXE_patchgd");
    let mut cmd = if ranks == 1 {
        Command::new(exe)
    } else {
        let mut c = Command::new("mpirun");
        c.args([
            "-np",
            &ranks.to_string(),
            "--oversubscribe",
            "--bind-to",
            "none",
            exe,
        ]);
        c
    };
    cmd.args(args);
    mpi_environment(&mut cmd);
    cmd
}

fn mpi_environment(cmd: &mut Command) {
    // One intra-op thread per rank (and for the single process: the same kernels).
    cmd.env("OMP_NUM_THREADS", "1")
        // CI runs as root; Open MPI refuses that unless told twice.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        // No network interfaces to probe beyond the loopback.
        .env("OMPI_MCA_btl", "self,vader,tcp")
        .env("OMPI_MCA_btl_tcp_if_include", "lo")
        .env("OMPI_MCA_oob_tcp_if_include", "lo");
}

/// stdout then stderr.
fn text_of(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The output of a command that must succeed.
fn ok(o: &Output, what: &str) -> String {
    let text = text_of(o);
    assert!(o.status.success(), "{what} failed:\n{text}");
    text
}

/// The output of a command that must fail.
fn refused(o: &Output, what: &str) -> String {
    let text = text_of(o);
    assert!(!o.status.success(), "{what} was accepted:\n{text}");
    text
}

fn weights(out: &Path) -> Vec<(String, tch::Tensor)> {
    let mut w = tch::Tensor::read_safetensors(out.join("model.safetensors")).unwrap();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

fn summary(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap()
}

/// The weights the optimizer moves (not BatchNorm's running statistics, which move at any lr).
fn learned(w: &[(String, tch::Tensor)]) -> Vec<(String, tch::Tensor)> {
    w.iter()
        .filter(|(n, _)| !n.contains("running_") && !n.contains("num_batches"))
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect()
}

/// Largest |a - b| over every tensor, with the tensor it is in.
fn max_difference(a: &[(String, tch::Tensor)], b: &[(String, tch::Tensor)]) -> (f64, String) {
    assert_eq!(
        a.iter().map(|t| &t.0).collect::<Vec<_>>(),
        b.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    a.iter()
        .zip(b)
        .map(|((n, x), (_, y))| {
            let d = (x.to_kind(tch::Kind::Double) - y.to_kind(tch::Kind::Double))
                .abs()
                .max()
                .double_value(&[]);
            (d, n.clone())
        })
        .fold((0.0, String::new()), |m, d| if d.0 > m.0 { d } else { m })
}

#[test]
fn two_ranks_take_the_steps_of_one_process_over_the_same_global_batches() {
    // Nothing looks across a batch's images: frozen BatchNorm in backbone and head, no dropout.
    let frozen = [
        "model.batch_norm=frozen",
        "model.head_batch_norm=frozen",
        "model.head_dropout=0",
    ];
    // 13 images in batches of 4: each epoch ends with a step that rank 1 takes with no images.
    // 17 in batches of 6: each epoch ends with a step of 3 images on rank 0 and 2 on rank 1, so
    // the ranks' gradients only average to the whole batch's when weighted by their images;
    // with the foreground filter on (class 0's cells are not encoded). And GD (frozen BatchNorm,
    // a linear classifier) in batches of 4.
    let foreground = [
        "patch.foreground.background=dark",
        "patch.foreground.threshold=100",
        "patch.foreground.min_fraction=0.01",
    ];
    let gd = "method: gd\ngd:\n  image_size: 32\n";
    for (train, batch, extra, sets) in [
        (13, 4, "", &[][..]),
        (17, 6, "", &foreground[..]),
        (13, 4, gd, &[][..]),
    ] {
        let case = format!("{train} images, batch {batch}, {extra:?} {sets:?}");
        let dir = tempfile::tempdir().unwrap();
        let file = setup_with(dir.path(), train, extra);
        let set_batch = format!("train.batch_size={batch}");
        let mut settings = vec![frozen[0], frozen[1], frozen[2], set_batch.as_str()];
        settings.extend(sets);
        let (one, two) = (dir.path().join("one"), dir.path().join("two"));
        ok(&run(&file, 1, &one, &settings), "the single process");
        let text = ok(&run(&file, 2, &two, &settings), "the 2-rank run");
        assert!(text.contains("trained data-parallel on 2 ranks"), "{text}");
        let (w1, w2) = (weights(&one), weights(&two));
        let (d, name) = max_difference(&w1, &w2);
        eprintln!("{case}: 1 process vs 2 ranks: largest weight difference {d:e} in '{name}'");
        // The same arithmetic up to the order of a few sums: float rounding, not another step.
        assert!(d < 1e-5, "{case}: weights differ by {d:e} in '{name}'");
        // Both moved: the identity is not that of an untrained model.
        let start = dir.path().join("zero");
        let mut barely = settings.to_vec();
        barely.push("train.lr=1e-12");
        ok(&run(&file, 1, &start, &barely), "lr 1e-12");
        let (moved, _) = max_difference(&learned(&w1), &learned(&weights(&start)));
        assert!(
            moved > 1e-3,
            "{case}: training moved the weights by only {moved:e}"
        );
        let (s1, s2) = (summary(&one), summary(&two));
        assert_eq!((&s1["ranks"], &s2["ranks"]), (&1.into(), &2.into()));
        for key in ["images_used", "images_failed", "train_images", "val_images"] {
            assert_eq!(s1[key], s2[key], "{case}: {key}");
        }
        let (a1, a2) = (
            s1["final_val_accuracy"].as_f64().unwrap(),
            s2["final_val_accuracy"].as_f64().unwrap(),
        );
        assert!((a1 - a2).abs() < 1e-9, "{case}: val accuracy {a1} vs {a2}");
    }
}

#[test]
fn with_batch_norm_two_ranks_learn_and_keep_identical_weights() {
    let dir = tempfile::tempdir().unwrap();
    // With latent reuse too: each rank reuses the cells of the images it trained on last.
    let file = setup(
        dir.path(),
        "checkpoint:\n  every_steps: 2\nlatent:\n  reuse: true\n  max_age_steps: 6\n",
    );
    let two = dir.path().join("two");
    // Every checkpoint (every 2 steps, and the final one) compares the ranks' weight checksums:
    // a run that ends has had bitwise-equal weights on both ranks at each of them.
    let text = ok(&run(&file, 2, &two, &[]), "the 2-rank run with BatchNorm");
    assert!(text.contains("trained data-parallel on 2 ranks"), "{text}");
    let reused = summary(&two)["latent_cells_reused"].as_u64().unwrap();
    assert!(reused > 0, "no cell was reused under 2 ranks");
    // bf16 too: the ranks round the same averaged update the same way.
    let half = dir.path().join("bf16");
    ok(
        &run(&file, 2, &half, &["train.precision=bf16"]),
        "the 2-rank bf16 run with BatchNorm",
    );
    let steps = std::fs::read_dir(two.join("checkpoints"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .join("latents-rank-1.arrow")
                .exists()
        })
        .count();
    assert!(steps >= 1, "no sharded checkpoint under {}", two.display());
    let start = dir.path().join("zero");
    ok(&run(&file, 2, &start, &["train.lr=1e-12"]), "lr 1e-12");
    let (moved, _) = max_difference(&learned(&weights(&two)), &learned(&weights(&start)));
    assert!(moved > 1e-3, "training moved the weights by only {moved:e}");
}

#[test]
fn a_checkpoint_is_not_resumed_by_another_rank_count() {
    let dir = tempfile::tempdir().unwrap();
    let file = setup(dir.path(), "checkpoint:\n  every_steps: 2\n");
    let out = dir.path().join("out");
    ok(&run(&file, 1, &out, &[]), "the single process");
    let text = refused(&run(&file, 2, &out, &[]), "a 2-rank resume of a 1-rank run");
    assert!(
        text.contains("was written by 1 rank, and this run has 2"),
        "{text}"
    );
}

#[test]
fn a_batch_size_the_ranks_cannot_share_is_refused_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let file = setup(dir.path(), "");
    let o = run(&file, 2, &dir.path().join("o"), &["train.batch_size=5"]);
    let text = refused(&o, "batch 5 on 2 ranks");
    assert!(text.contains("5 does not divide by the 2 ranks"), "{text}");
}

#[test]
fn the_allreduce_bench_averages_over_two_ranks_and_checks_the_result() {
    let dir = tempfile::tempdir().unwrap();
    let args = |only: &str| -> Vec<String> {
        [
            "bench", "--quick", "--device", "cpu", "--only", only, "--dir",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([dir.path().display().to_string()])
        .collect()
    };
    // The bench fails unless the averaged gradient is the known weighted mean, g (2N + 1) / 3.
    let text = ok(
        &launch(2, &args("allreduce")).output().unwrap(),
        "the 2-rank allreduce bench",
    );
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("| small_cnn"))
        .collect();
    assert_eq!(rows.len(), 1, "rank 0 alone prints:\n{text}");
    assert!(rows[0].contains("| 2 | MPI on cpu |"), "{text}");
    let text = refused(
        &launch(2, &args("efficiency")).output().unwrap(),
        "a single-process bench part on 2 ranks",
    );
    assert!(text.contains("launched as 2 ranks"), "{text}");
}

#[test]
fn each_rank_reads_only_its_share_of_the_images() {
    use std::collections::BTreeSet;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(square_dataset(&data.display().to_string(), 32, 8, 13, 6, 3));
    let server = patchgd::testkit::HttpServer::start(&data);
    let out = dir.path().join("out").display().to_string();
    let yaml = pipeline_yaml(
        &format!("{}/images", server.url()),
        &format!("{}/labels.csv", server.url()),
        &out,
        16,
        1,
        "storage:\n  options:\n    allow_http: \"true\"\n",
    )
    .replace("batch_size: 8", "batch_size: 4");
    let file = dir.path().join("p.yaml");
    std::fs::write(&file, yaml).unwrap();
    ok(
        &run(&file, 2, &dir.path().join("out"), &[]),
        "the 2-rank run over HTTP",
    );
    // Image GETs by rank, from nginx's access log (each rank names itself in its User-Agent).
    let mut by_rank: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (method, path, agent) in server.requests() {
        if method == "GET" && path.starts_with("/images/") {
            let rank = agent
                .split_once("(rank ")
                .map_or(format!("unnamed: {agent}"), |(_, r)| r.to_string());
            by_rank.entry(rank).or_default().push(path);
        }
    }
    let ranks: Vec<&String> = by_rank.keys().collect();
    assert_eq!(ranks, ["0 of 2)", "1 of 2)"], "{by_rank:?}");
    let sets: Vec<BTreeSet<&String>> = by_rank.values().map(|v| v.iter().collect()).collect();
    assert!(
        sets[0].is_disjoint(&sets[1]),
        "an image was read by both ranks: {by_rank:?}"
    );
    assert_eq!(sets[0].len() + sets[1].len(), 13 + 6, "{by_rank:?}");
    // Rank 0's share: 7 of the 13 training images (every other one, from the first) and 3 of
    // the 6 validation images; rank 1's: 6 and 3.
    assert_eq!((sets[0].len(), sets[1].len()), (10, 9), "{by_rank:?}");
}

/// The process ids of `mpirun`'s ranks, by rank (read from each child's environment).
fn ranks_of(mpirun: u32) -> BTreeMap<usize, u32> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let parent = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .map(|p| p.trim().parse::<u32>().unwrap_or(0));
        if parent != Some(mpirun) {
            continue;
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let rank = environ
            .split(|b| *b == 0)
            .filter_map(|v| std::str::from_utf8(v).ok())
            .find_map(|v| v.strip_prefix("OMPI_COMM_WORLD_RANK="))
            .and_then(|r| r.parse().ok());
        if let Some(rank) = rank {
            out.insert(rank, pid);
        }
    }
    out
}

#[test]
fn a_killed_rank_stops_the_run_and_the_rerun_resumes_to_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let file = setup(dir.path(), "checkpoint:\n  every_steps: 1\n  keep: 2\n");
    // Six epochs of four steps: time to kill it at step 2 before it ends.
    let yaml = std::fs::read_to_string(&file)
        .unwrap()
        .replace("epochs: 2", "epochs: 6");
    std::fs::write(&file, yaml).unwrap();
    let (killed, whole) = (dir.path().join("killed"), dir.path().join("whole"));
    ok(&run(&file, 2, &whole, &[]), "the uninterrupted 2-rank run");
    // The same run, with rank 1 killed once a checkpoint of the first epoch is complete.
    let mut child = spawn(&file, 2, &killed);
    let manifest = killed.join("checkpoints/step-0000000002/MANIFEST.json");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !manifest.exists() {
        assert!(
            Instant::now() < deadline,
            "no checkpoint at step 2 in 120 s"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let ranks = ranks_of(child.id());
    let victim = *ranks
        .get(&1)
        .unwrap_or_else(|| panic!("rank 1 not found among {ranks:?}"));
    let killed_at = Instant::now();
    unsafe { libc_kill(victim as i32, 9) };
    let output = child.wait_with_output().unwrap();
    let stopped_in = killed_at.elapsed();
    eprintln!("rank 1 killed; mpirun exited {stopped_in:?} later");
    let text = refused(&output, "a run with a killed rank");
    assert!(
        text.contains("rank 1"),
        "the lost rank is not named:\n{text}"
    );
    assert!(
        stopped_in < Duration::from_secs(STOP_BOUND_SECONDS),
        "the other rank took {stopped_in:?} to stop (bound {STOP_BOUND_SECONDS} s):\n{text}"
    );
    let survivor = ranks[&0];
    let gone = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{survivor}/status")).exists()
        && !std::fs::read_to_string(format!("/proc/{survivor}/status"))
            .unwrap_or_default()
            .contains("zombie")
    {
        assert!(
            Instant::now() < gone,
            "rank 0 (pid {survivor}) outlived mpirun"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The same command again resumes from the last complete checkpoint and ends where the
    // uninterrupted run ended, bit for bit.
    let text = ok(&run(&file, 2, &killed, &[]), "the rerun");
    assert!(text.contains("resuming from"), "{text}");
    let (a, b) = (weights(&whole), weights(&killed));
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(x.equal(y), "'{name}' differs after the resumed run");
    }
}

/// How long the surviving rank may take to stop after another is killed (docs/distributed.md).
const STOP_BOUND_SECONDS: u64 = 30;

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, signal: i32) -> i32;
}

/// [`run`] in the background (no `--set` extras), its output captured.
fn spawn(file: &Path, ranks: usize, out: &Path) -> std::process::Child {
    let args = [
        "run".to_string(),
        file.display().to_string(),
        "--no-progress".into(),
        "--set".into(),
        format!("output={}", out.display()),
    ];
    launch(ranks, &args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("mpirun")
}
