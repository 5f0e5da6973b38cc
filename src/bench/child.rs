//! A `patchgd run` in a child process, watched for memory: its resident set is sampled every
//! 20 ms and the child is killed when it passes the cap, so a run that cannot fit is reported
//! as such instead of taking the machine down.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One epoch's row of the child's metrics.csv.
#[derive(Clone, Debug, Default)]
pub struct EpochRow {
    pub seconds: f64,
    pub train_loss: f64,
    pub val_loss: f64,
    pub val_accuracy: f64,
    pub patches_per_s: f64,
    pub peak_rss_bytes: u64,
}

#[derive(Clone, Debug, Default)]
pub struct ChildRun {
    /// Exit status 0 and not killed.
    pub ok: bool,
    /// Killed at the memory cap.
    pub capped: bool,
    /// Highest resident set seen (sampled, and the child's own VmHWM where it reported it).
    pub peak_rss_bytes: u64,
    pub seconds: f64,
    /// The last lines of its output (the error, when it failed).
    pub tail: String,
    pub epochs: Vec<EpochRow>,
}

fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Run `exe run PIPELINE --fresh --no-progress` with `sets` overrides; stop it above `cap` bytes.
pub fn run_pipeline(
    exe: &Path,
    pipeline: &Path,
    output_dir: &Path,
    sets: &[String],
    cap: u64,
) -> Result<ChildRun, String> {
    let log = pipeline.with_extension("log");
    let log_file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("run")
        .arg(pipeline)
        .args(["--fresh", "--no-progress"])
        .stdout(Stdio::from(
            log_file.try_clone().map_err(|e| e.to_string())?,
        ))
        .stderr(Stdio::from(log_file));
    for s in sets {
        cmd.args(["--set", s]);
    }
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", exe.display()))?;
    let pid = child.id();
    let mut out = ChildRun::default();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        let rss = rss_of(pid);
        out.peak_rss_bytes = out.peak_rss_bytes.max(rss);
        if rss > cap {
            out.capped = true;
            let _ = child.kill();
            break child.wait().map_err(|e| e.to_string())?;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    out.seconds = started.elapsed().as_secs_f64();
    out.ok = status.success() && !out.capped;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    out.tail = lines[lines.len().saturating_sub(3)..].join(" / ");
    if out.ok {
        out.epochs = read_metrics(&output_dir.join("metrics.csv"))?;
        for e in &out.epochs {
            out.peak_rss_bytes = out.peak_rss_bytes.max(e.peak_rss_bytes);
        }
    }
    Ok(out)
}

/// The rows of a run's metrics.csv (columns by name).
pub fn read_metrics(path: &Path) -> Result<Vec<EpochRow>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| format!("{} has no column '{name}'", path.display()))
    };
    let (tl, vl) = (col("train_loss")?, col("val_loss")?);
    let (s, a, p, r) = (
        col("seconds")?,
        col("val_accuracy")?,
        col("patches_per_s")?,
        col("peak_rss_bytes")?,
    );
    Ok(lines
        .map(|l| {
            let v: Vec<&str> = l.split(',').collect();
            let f = |i: usize| {
                v.get(i)
                    .and_then(|x| x.parse::<f64>().ok())
                    .unwrap_or(f64::NAN)
            };
            EpochRow {
                seconds: f(s),
                train_loss: f(tl),
                val_loss: f(vl),
                val_accuracy: f(a),
                patches_per_s: f(p),
                peak_rss_bytes: f(r) as u64,
            }
        })
        .collect())
}

/// The memory cap for children: three quarters of this machine's memory, at most 16 GiB.
pub fn default_cap() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(8 << 30, |kib| kib * 1024);
    (total / 4 * 3).min(16 << 30)
}
