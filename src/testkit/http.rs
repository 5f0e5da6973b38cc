//! Plain HTTP: nginx from Debian's packages, serving a local directory with Range requests (as
//! nginx always does for static files) and WebDAV `PROPFIND` listings from
//! `libnginx-mod-http-dav-ext` (`scripts/setup nginx` installs both).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Process, free_port, require};
use crate::storage::StoreOptions;

/// Debian's nginx and its WebDAV listing module.
const NGINX: &str = "/usr/sbin/nginx";
const DAV_EXT: &str = "/usr/lib/nginx/modules/ngx_http_dav_ext_module.so";

/// A running nginx serving one directory; stopped when dropped.
pub struct HttpServer {
    _process: Process,
    _state: tempfile::TempDir,
    pub port: u16,
}

impl HttpServer {
    /// Serve `root` (read-only) on a free port, one process in the foreground, running as the
    /// calling user.
    pub fn start(root: &Path) -> Self {
        require(Path::new(NGINX), "nginx");
        require(Path::new(DAV_EXT), "nginx");
        let state = tempfile::tempdir().expect("nginx state directory");
        let port = free_port();
        let s = state.path().display();
        let config = format!(
            "daemon off;\nmaster_process off;\nerror_log {s}/error.log;\npid {s}/nginx.pid;\n\
             load_module {DAV_EXT};\nevents {{}}\nhttp {{\n\
             \x20 log_format requests '$request_method $uri $http_user_agent';\n\
             \x20 access_log {s}/access.log requests;\n\
             \x20 client_body_temp_path {s}/tmp;\n  proxy_temp_path {s}/tmp;\n\
             \x20 fastcgi_temp_path {s}/tmp;\n  uwsgi_temp_path {s}/tmp;\n  scgi_temp_path {s}/tmp;\n\
             \x20 server {{\n    listen 127.0.0.1:{port};\n    root {root};\n\
             \x20   location / {{ dav_ext_methods PROPFIND OPTIONS; }}\n  }}\n}}\n",
            root = root.display()
        );
        let conf: PathBuf = state.path().join("nginx.conf");
        std::fs::write(&conf, config).expect("write nginx.conf");
        std::fs::create_dir_all(state.path().join("tmp")).expect("nginx temp directory");
        let process = Process::start(
            "nginx",
            Command::new(NGINX)
                .arg("-c")
                .arg(&conf)
                .arg("-p")
                .arg(state.path()),
            port,
        );
        Self {
            _process: process,
            _state: state,
            port,
        }
    }

    /// Every request served so far, as (method, path, user agent), in order: how a test counts
    /// who read what.
    pub fn requests(&self) -> Vec<(String, String, String)> {
        let log =
            std::fs::read_to_string(self._state.path().join("access.log")).unwrap_or_default();
        log.lines()
            .filter_map(|line| {
                let mut parts = line.splitn(3, ' ');
                Some((
                    parts.next()?.to_string(),
                    parts.next()?.to_string(),
                    parts.next().unwrap_or("").to_string(),
                ))
            })
            .collect()
    }

    /// The URL of the served directory's root.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Settings for `http://` URLs on this server (plain HTTP must be allowed explicitly).
    pub fn options(&self) -> StoreOptions {
        let mut o = StoreOptions::default();
        o.options.insert("allow_http".into(), "true".into());
        o
    }
}
