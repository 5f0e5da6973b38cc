//! Azure Blob Storage: Azurite, Microsoft's emulator, from npm (`scripts/setup azurite`
//! installs it and `@azure/storage-blob` into `.venv/node`).
//!
//! Reads go through object_store with anonymous requests to a public container, so no key ever
//! appears in a store's options (they are refused there: credentials come from the
//! environment). Creating the container and uploading a directory use the Azure SDK for
//! JavaScript with Azurite's published development key (`azurite_upload.js`).

use std::path::Path;
use std::process::Command;

use super::{Process, free_port, require, venv};
use crate::storage::StoreOptions;

/// Azurite's fixed development account.
const ACCOUNT: &str = "devstoreaccount1";

/// A running Azurite blob service (in memory); stopped when dropped.
pub struct AzuriteServer {
    _process: Process,
    pub port: u16,
}

impl AzuriteServer {
    /// Start Azurite's blob service on a free port and wait until it accepts connections.
    pub fn start() -> Self {
        let bin = venv("node/node_modules/.bin/azurite-blob");
        require(&bin, "azurite");
        let port = free_port();
        let process = Process::start(
            "azurite-blob",
            Command::new(bin).args([
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                &port.to_string(),
                "--inMemoryPersistence",
                "--disableTelemetry",
                "--skipApiVersionCheck",
                "--silent",
            ]),
            port,
        );
        Self {
            _process: process,
            port,
        }
    }

    /// The account's endpoint (Azurite puts the account in the path).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{ACCOUNT}", self.port)
    }

    /// Create `container` with public read access and upload every file under `dir` into it,
    /// named by its path relative to `dir`.
    pub fn upload_public(&self, container: &str, dir: &Path) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/testkit/azurite_upload.js");
        let out = Command::new("node")
            .arg(script)
            .arg(format!("http://127.0.0.1:{}", self.port))
            .arg(container)
            .arg(dir)
            .env("NODE_PATH", venv("node/node_modules"))
            .output()
            .expect("run node (scripts/setup azurite installs what it needs)");
        assert!(
            out.status.success(),
            "upload to Azurite: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Settings for `az://CONTAINER/...` URLs on this server: anonymous reads of a public
    /// container.
    pub fn options(&self) -> StoreOptions {
        let mut o = StoreOptions::default();
        for (k, v) in [
            ("endpoint", self.endpoint().as_str()),
            ("account_name", ACCOUNT),
            ("allow_http", "true"),
            ("skip_signature", "true"),
        ] {
            o.options.insert(k.into(), v.into());
        }
        o
    }
}
