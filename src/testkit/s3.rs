//! S3: moto's server (`.venv/bin/moto_server`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;

use super::{Process, free_port, require, venv};
use crate::storage::StoreOptions;

/// A running moto_server; stopped when dropped.
pub struct S3Server {
    _process: Process,
    pub port: u16,
}

impl S3Server {
    /// Where `scripts/test` installs the server.
    pub fn binary() -> std::path::PathBuf {
        venv("bin/moto_server")
    }

    /// Start moto_server on a free port and wait until it accepts connections.
    pub fn start() -> Self {
        let bin = Self::binary();
        require(&bin, "moto");
        let port = free_port();
        let process = Process::start(
            "moto_server",
            Command::new(bin).args(["-H", "127.0.0.1", "-p", &port.to_string()]),
            port,
        );
        Self {
            _process: process,
            port,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Create a bucket that anonymous clients may read and write (`public` = true), or a
    /// private one, with a plain HTTP request (object stores cannot create buckets).
    pub fn create_bucket_with(&self, bucket: &str, public: bool) {
        let acl = if public {
            "x-amz-acl: public-read-write\r\n"
        } else {
            ""
        };
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n{acl}Content-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "create bucket: {reply}");
    }

    /// A public bucket (read with [`S3Server::options`], which sends unsigned requests).
    pub fn create_bucket(&self, bucket: &str) {
        self.create_bucket_with(bucket, true)
    }

    /// Endpoint settings as a pipeline file gives them; anonymous (unsigned) requests.
    pub fn options(&self) -> StoreOptions {
        let mut o = StoreOptions::default();
        for (k, v) in [
            ("endpoint", self.endpoint().as_str()),
            ("allow_http", "true"),
            ("region", "us-east-1"),
            ("skip_signature", "true"),
        ] {
            o.options.insert(k.into(), v.into());
        }
        o
    }
}
