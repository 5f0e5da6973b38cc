//! A Ballista cluster of `patchgd scheduler` and `patchgd executor` processes on 127.0.0.1,
//! ports chosen free, for the tests and the SQL benchmark (docs/cluster.md).

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A scheduler and executors as child processes, killed when dropped; their output goes to
/// log files in a temporary directory.
pub struct LocalCluster {
    /// The scheduler as `df://127.0.0.1:PORT`.
    pub url: String,
    scheduler: Child,
    /// The executors still running, in start order.
    pub executors: Vec<Child>,
    logs: tempfile::TempDir,
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_for_port(port: u16, what: &str, child: &mut Child) -> std::io::Result<()> {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.try_wait()? {
            return Err(std::io::Error::other(format!(
                "{what} exited early: {status}"
            )));
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(std::io::Error::other(format!(
                "{what} did not listen on port {port} within 60 s"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

impl LocalCluster {
    /// Start a scheduler that takes an executor as lost after `executor_timeout_s` seconds
    /// without a heartbeat, and `executors` executors (heartbeat every second) running `tasks`
    /// tasks each, from the `patchgd` binary at `bin`.
    pub fn start(
        bin: &Path,
        executors: usize,
        tasks: usize,
        executor_timeout_s: u64,
    ) -> std::io::Result<Self> {
        let logs = tempfile::tempdir()?;
        let dir = logs.path().to_path_buf();
        let log = |name: &str| std::fs::File::create(dir.join(name));
        let port = free_port()?;
        let mut scheduler = Command::new(bin)
            .args(["scheduler", "--bind", &format!("127.0.0.1:{port}")])
            .args(["--executor-timeout", &executor_timeout_s.to_string()])
            .stdout(log("scheduler.out")?)
            .stderr(Stdio::from(log("scheduler.err")?))
            .spawn()?;
        if let Err(e) = wait_for_port(port, "the scheduler", &mut scheduler) {
            let _ = scheduler.kill();
            return Err(e);
        }
        // From here on, dropping `cluster` stops what has started.
        let mut cluster = Self {
            url: format!("df://127.0.0.1:{port}"),
            scheduler,
            executors: Vec::new(),
            logs,
        };
        for i in 0..executors {
            let (flight, grpc) = (free_port()?, free_port()?);
            let work = dir.join(format!("work{i}"));
            std::fs::create_dir_all(&work)?;
            let mut child = Command::new(bin)
                .args(["executor", "--scheduler", &format!("127.0.0.1:{port}")])
                .args(["--bind", &format!("127.0.0.1:{flight}")])
                .args(["--grpc-port", &grpc.to_string()])
                .args(["--concurrent-tasks", &tasks.to_string(), "--heartbeat", "1"])
                .args(["--work-dir", &work.to_string_lossy()])
                .stdout(log(&format!("executor{i}.out"))?)
                .stderr(Stdio::from(log(&format!("executor{i}.err"))?))
                .spawn()?;
            let started = wait_for_port(flight, "an executor", &mut child);
            cluster.executors.push(child);
            started?;
        }
        // An executor registers as it starts; give the last one a heartbeat's time.
        std::thread::sleep(Duration::from_secs(2));
        Ok(cluster)
    }

    /// A process's log so far: `scheduler.err`, `executor0.err`, ... (stderr: patchgd's own
    /// lines, failures included), or `.out` (stdout).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.logs.path().join(name)).unwrap_or_default()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for c in self.executors.iter_mut().chain([&mut self.scheduler]) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
