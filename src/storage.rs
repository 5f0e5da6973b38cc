//! Object store URLs: one place that turns `s3://`, `gs://`, `az://`, `http(s)://`, `file://`,
//! `memory://` or a plain path into an [`ObjectStore`] and a prefix inside it, for readers
//! (source) and writers (synth, sinks) alike.
//!
//! Cloud stores read their credentials from the environment (`AWS_*`, `GOOGLE_*`, `AZURE_*`, as
//! object_store's `from_env` builders do); [`StoreOptions`] adds non-secret settings (endpoint,
//! region, anonymous access, retries) from a pipeline file. Secrets are refused there, so that a
//! pipeline file, its copy in the output and every log line stay free of them.
//!
//! `memory://NAME/...` stores live for the whole process and are shared by name, so that a data
//! set generated into memory can be trained on in the same process (tests use this).

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::http::HttpBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ObjectMeta, ObjectStore, ObjectStoreExt, ObjectStoreScheme, PutPayload,
    RetryConfig,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("bad storage URL '{url}': {reason}")]
    BadUrl { url: String, reason: String },
    #[error("storage option '{key}': {reason}")]
    BadOption { key: String, reason: String },
    #[error("object '{url}' does not exist")]
    NotFound { url: String },
    #[error(
        "access to '{url}' was denied: {source} (credentials come from the environment: AWS_*, GOOGLE_*, AZURE_*)"
    )]
    Denied {
        url: String,
        #[source]
        source: object_store::Error,
    },
    #[error("cannot {action} '{url}': {source}")]
    Io {
        action: &'static str,
        url: String,
        #[source]
        source: object_store::Error,
    },
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// The HTTP `User-Agent` of every store opened from now on in this process (S3, GCS, Azure,
/// HTTP), unless a store's own `user_agent` option says otherwise.
static USER_AGENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Name this process in its requests to object stores: a data-parallel rank says which it is
/// (`patchgd/0.1.0 (rank 1 of 4)`), so a server's access log shows who read what. The first
/// call wins; stores opened before it keep object_store's default.
pub fn identify_as(agent: &str) {
    let _ = USER_AGENT.set(agent.to_string());
}

/// Map an object_store error on `url` to a message that names it and says what went wrong.
fn io_error(action: &'static str, url: String, source: object_store::Error) -> StorageError {
    match source {
        object_store::Error::NotFound { .. } => StorageError::NotFound { url },
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => StorageError::Denied { url, source },
        source => StorageError::Io {
            action,
            url,
            source,
        },
    }
}

static MEMORY_STORES: LazyLock<Mutex<HashMap<String, Arc<InMemory>>>> =
    LazyLock::new(Default::default);

/// Settings for cloud object stores (pipeline key `storage:`). `options` are object_store
/// configuration keys of the URL's store (`endpoint`, `region`, `allow_http`, `skip_signature`
/// for anonymous access, ...); keys that carry secrets are refused: credentials come from the
/// environment. Transient errors (timeouts, 5xx, dropped connections) are retried with
/// exponential backoff up to `max_retries` times or `retry_timeout_secs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreOptions {
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    #[serde(default = "default_max_retries")]
    pub max_retries: usize,
    #[serde(default = "default_retry_timeout")]
    pub retry_timeout_secs: f64,
}

fn default_max_retries() -> usize {
    10
}
fn default_retry_timeout() -> f64 {
    180.0
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            options: BTreeMap::new(),
            max_retries: default_max_retries(),
            retry_timeout_secs: default_retry_timeout(),
        }
    }
}

/// Option keys that would put a secret into a pipeline file.
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "secret",
        "token",
        "password",
        "access_key",
        "account_key",
        "master_key",
        "sas",
        "service_account_key",
        "application_credentials",
    ]
    .iter()
    .any(|s| k.contains(s))
}

impl StoreOptions {
    /// Refuse secrets and nonsensical retry settings before any store is built.
    pub fn validate(&self) -> Result<()> {
        for key in self.options.keys() {
            if is_secret_key(key) {
                return Err(StorageError::BadOption {
                    key: key.clone(),
                    reason: "credentials are not accepted in pipeline files; set them in the environment (e.g. AWS_SECRET_ACCESS_KEY)".into(),
                });
            }
        }
        if !(self.retry_timeout_secs > 0.0) {
            return Err(StorageError::BadOption {
                key: "retry_timeout_secs".into(),
                reason: "must be positive".into(),
            });
        }
        Ok(())
    }

    /// Options from `KEY=VALUE` pairs (the command line's `--storage`): `max_retries` and
    /// `retry_timeout_secs` set the retries, any other key is an object_store option.
    pub fn from_pairs<S: AsRef<str>>(pairs: &[S]) -> Result<Self> {
        let mut opts = Self::default();
        for pair in pairs {
            let pair = pair.as_ref();
            let bad = |key: &str, reason: String| StorageError::BadOption {
                key: key.to_string(),
                reason,
            };
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| bad(pair, "expected KEY=VALUE".into()))?;
            match k {
                "max_retries" => {
                    opts.max_retries = v
                        .parse()
                        .map_err(|e| bad(k, format!("'{v}' is not a count: {e}")))?
                }
                "retry_timeout_secs" => {
                    opts.retry_timeout_secs = v
                        .parse()
                        .map_err(|e| bad(k, format!("'{v}' is not a number: {e}")))?
                }
                _ => {
                    opts.options.insert(k.to_string(), v.to_string());
                }
            }
        }
        opts.validate()?;
        Ok(opts)
    }

    fn retry(&self) -> RetryConfig {
        RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(15),
                base: 2.0,
            },
            max_retries: self.max_retries,
            retry_timeout: Duration::from_secs_f64(self.retry_timeout_secs),
        }
    }
}

/// A prefix inside an object store, named by the URL the user gave.
#[derive(Clone)]
pub struct Location {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: Path,
    /// The URL as given, without a trailing slash; used in every message about this location.
    pub url: String,
}

/// Only the URL: a store's own Debug output may include its configuration.
impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Location({})", self.url)
    }
}

impl Location {
    /// Resolve a URL or a local path with default [`StoreOptions`] (credentials and settings
    /// from the environment only).
    pub fn parse(url: &str) -> Result<Self> {
        Self::parse_with(url, &StoreOptions::default())
    }

    /// Resolve a URL or a local path. Nothing is created or contacted: writes create parent
    /// directories, and reading a missing location fails with the object's name.
    pub fn parse_with(url: &str, options: &StoreOptions) -> Result<Self> {
        options.validate()?;
        let trimmed = url.trim_end_matches('/').to_string();
        let bad = |reason: &str| StorageError::BadUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        if let Some(rest) = url.strip_prefix("memory://") {
            let (name, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if name.is_empty() {
                return Err(bad("expected memory://NAME/prefix"));
            }
            let store = MEMORY_STORES
                .lock()
                .unwrap()
                .entry(name.to_string())
                .or_default()
                .clone();
            let prefix =
                Path::parse(prefix.trim_end_matches('/')).map_err(|e| bad(&e.to_string()))?;
            return Ok(Self {
                store,
                prefix,
                url: trimmed,
            });
        }
        let dir = if url.starts_with("file://") {
            let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
            parsed
                .to_file_path()
                .map_err(|_| bad("expected file:///absolute/path"))?
        } else if url.contains("://") {
            return Self::parse_cloud(url, options);
        } else if url.is_empty() {
            return Err(bad("empty"));
        } else {
            std::path::absolute(url).map_err(|e| bad(&e.to_string()))?
        };
        // Existing directories are canonicalised (listings report canonical paths); a location
        // that does not exist yet (an output) is taken as written.
        let prefix = if dir.exists() {
            Path::from_filesystem_path(&dir)
        } else {
            Path::from_absolute_path(&dir)
        }
        .map_err(|e| bad(&e.to_string()))?;
        Ok(Self {
            // Deleting the last file of a directory removes the directory (pruned checkpoints).
            store: Arc::new(LocalFileSystem::new().with_automatic_cleanup(true)),
            prefix,
            url: trimmed,
        })
    }

    fn parse_cloud(url: &str, options: &StoreOptions) -> Result<Self> {
        let bad = |reason: String| StorageError::BadUrl {
            url: url.to_string(),
            reason,
        };
        let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        let (scheme, prefix) = ObjectStoreScheme::parse(&parsed).map_err(|_| {
            bad(format!(
                "scheme '{}' is not supported; supported: s3://, gs://, az://, http(s)://, file://, memory://, or a local path",
                parsed.scheme()
            ))
        })?;
        let key_error = |key: &str, e: object_store::Error| StorageError::BadOption {
            key: key.to_string(),
            reason: format!("not a setting of {} stores: {e}", parsed.scheme()),
        };
        let build_error = |e: object_store::Error| bad(e.to_string());
        let retry = options.retry();
        // Each store's builder: credentials from the environment, then our settings; a key the
        // store does not know is an error naming it (object_store's own parse_url_opts would
        // drop it silently).
        macro_rules! configured {
            ($builder:expr) => {{
                let mut b = $builder.with_retry(retry);
                if let Some(agent) = USER_AGENT.get() {
                    b = b.with_config(
                        "user_agent"
                            .parse()
                            .map_err(|e| key_error("user_agent", e))?,
                        agent,
                    );
                }
                for (k, v) in &options.options {
                    b = b.with_config(k.parse().map_err(|e| key_error(k, e))?, v);
                }
                Arc::new(b.build().map_err(build_error)?)
            }};
        }
        let store: Arc<dyn ObjectStore> = match scheme {
            ObjectStoreScheme::AmazonS3 => configured!(AmazonS3Builder::from_env().with_url(url)),
            ObjectStoreScheme::GoogleCloudStorage => {
                configured!(GoogleCloudStorageBuilder::from_env().with_url(url))
            }
            ObjectStoreScheme::MicrosoftAzure => {
                configured!(MicrosoftAzureBuilder::from_env().with_url(url))
            }
            ObjectStoreScheme::Http => {
                configured!(HttpBuilder::new().with_url(parsed.origin().ascii_serialization()))
            }
            other => return Err(bad(format!("unexpected store kind {other:?}"))),
        };
        Ok(Self {
            store,
            prefix,
            url: url.trim_end_matches('/').to_string(),
        })
    }

    /// The location of a single object URL: its parent prefix and its path. A bare file name
    /// is taken relative to the current directory.
    pub fn parse_object(url: &str, options: &StoreOptions) -> Result<(Self, Path)> {
        let (dir, file) = url.rsplit_once('/').unwrap_or((".", url));
        let dir = if dir.ends_with(':') || dir.ends_with(":/") {
            format!("{dir}/")
        } else {
            dir.to_string()
        };
        let loc = Self::parse_with(&dir, options)?;
        let path = loc.path(file);
        Ok((loc, path))
    }

    /// The path of `relative` (slash-separated) under this prefix.
    pub fn path(&self, relative: &str) -> Path {
        let mut path = self.prefix.clone();
        for part in relative.split('/').filter(|p| !p.is_empty()) {
            path = path.join(part);
        }
        path
    }

    /// The user-facing URL of an object in this store.
    pub fn url_of(&self, path: &Path) -> String {
        let rel = self.relative(path).unwrap_or_else(|| path.to_string());
        format!("{}/{}", self.url, rel)
    }

    /// `path` relative to this prefix, or `None` if it lies outside.
    pub fn relative(&self, path: &Path) -> Option<String> {
        let parts: Vec<_> = path
            .prefix_match(&self.prefix)?
            .map(|p| p.as_ref().to_string())
            .collect();
        Some(parts.join("/"))
    }

    pub async fn put(&self, relative: &str, bytes: impl Into<Bytes>) -> Result<()> {
        let path = self.path(relative);
        self.store
            .put(&path, PutPayload::from_bytes(bytes.into()))
            .await
            .map_err(|source| io_error("write", self.url_of(&path), source))?;
        Ok(())
    }

    pub async fn get(&self, path: &Path) -> Result<Bytes> {
        let url = self.url_of(path);
        let get = self
            .store
            .get(path)
            .await
            .map_err(|source| io_error("read", url.clone(), source))?;
        get.bytes()
            .await
            .map_err(|source| io_error("read", url, source))
    }

    /// Bytes `range` of an object (one ranged GET).
    pub async fn get_range(&self, path: &Path, range: Range<u64>) -> Result<Bytes> {
        self.store
            .get_range(path, range)
            .await
            .map_err(|source| io_error("read", self.url_of(path), source))
    }

    /// Several ranges of one object; nearby ranges are coalesced into fewer requests.
    pub async fn get_ranges(&self, path: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.store
            .get_ranges(path, ranges)
            .await
            .map_err(|source| io_error("read", self.url_of(path), source))
    }

    /// Delete one object (missing is not an error: deleting is idempotent).
    pub async fn delete(&self, path: &Path) -> Result<()> {
        match self.store.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(io_error("delete", self.url_of(path), source)),
        }
    }

    /// Size and modification time of one object.
    pub async fn head(&self, path: &Path) -> Result<ObjectMeta> {
        self.store
            .head(path)
            .await
            .map_err(|source| io_error("read", self.url_of(path), source))
    }

    pub async fn get_relative(&self, relative: &str) -> Result<Bytes> {
        self.get(&self.path(relative)).await
    }

    /// Every object under the prefix, sorted by path so that listings are deterministic.
    pub async fn list(&self) -> Result<Vec<ObjectMeta>> {
        let prefix = (!self.prefix.as_ref().is_empty()).then_some(&self.prefix);
        let listed = if self.is_http() {
            self.list_level_by_level().await
        } else {
            self.store.list(prefix).try_collect().await
        };
        let mut objects = listed.map_err(|source| io_error("list", self.url.clone(), source))?;
        objects.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(objects)
    }

    fn is_http(&self) -> bool {
        self.url.starts_with("http://") || self.url.starts_with("https://")
    }

    /// A WebDAV listing one directory at a time (`Depth: 1`): object_store lists an HTTP
    /// prefix with one `Depth: infinity` PROPFIND, which RFC 4918 lets servers refuse, and
    /// nginx does (403). A missing directory lists as empty, as a prefix does in other stores.
    async fn list_level_by_level(&self) -> object_store::Result<Vec<ObjectMeta>> {
        let mut objects = Vec::new();
        let mut pending = vec![self.prefix.clone()];
        while let Some(dir) = pending.pop() {
            let at = (!dir.as_ref().is_empty()).then_some(&dir);
            match self.store.list_with_delimiter(at).await {
                Ok(level) => {
                    objects.extend(level.objects);
                    pending.extend(level.common_prefixes);
                }
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(objects)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_stores_are_shared_by_name_and_paths_are_relative() {
        let a = Location::parse("memory://storage-test/data/").unwrap();
        a.put("x/y.txt", Bytes::from_static(b"hi")).await.unwrap();
        let b = Location::parse("memory://storage-test/data").unwrap();
        let listed = b.list().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(b.relative(&listed[0].location).unwrap(), "x/y.txt");
        assert_eq!(
            b.url_of(&listed[0].location),
            "memory://storage-test/data/x/y.txt"
        );
        assert_eq!(&b.get_relative("x/y.txt").await.unwrap()[..], b"hi");
        let missing = b.get_relative("nope").await.unwrap_err().to_string();
        assert!(
            missing.contains("memory://storage-test/data/nope"),
            "{missing}"
        );
    }

    #[tokio::test]
    async fn local_paths_and_file_urls_write_list_and_read() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("new/out");
        let loc = Location::parse(out.to_str().unwrap()).unwrap();
        assert!(!out.exists(), "parsing creates nothing");
        loc.put("a/b.bin", Bytes::from_static(b"1")).await.unwrap();
        assert!(out.join("a/b.bin").exists());
        let url = url::Url::from_file_path(&out).unwrap().to_string();
        let again = Location::parse(&url).unwrap();
        let listed = again.list().await.unwrap();
        assert_eq!(
            listed
                .iter()
                .map(|m| again.relative(&m.location).unwrap())
                .collect::<Vec<_>>(),
            vec!["a/b.bin"]
        );
        let missing = Location::parse(dir.path().join("missing").to_str().unwrap()).unwrap();
        assert!(missing.list().await.map(|v| v.is_empty()).unwrap_or(true));
    }

    #[test]
    fn unsupported_scheme_is_named() {
        let err = Location::parse("ftp://host/x").unwrap_err().to_string();
        assert!(err.contains("ftp") && err.contains("s3://"), "{err}");
    }

    #[test]
    fn cloud_urls_build_stores_without_contacting_them() {
        let mut opts = StoreOptions::default();
        opts.options.insert("region".into(), "eu-west-1".into());
        opts.options
            .insert("endpoint".into(), "http://127.0.0.1:9".into());
        let s3 = Location::parse_with("s3://bucket/slides/", &opts).unwrap();
        assert_eq!(s3.prefix.as_ref(), "slides");
        assert_eq!(s3.url, "s3://bucket/slides");
        let http = Location::parse("https://example.org/data/set").unwrap();
        assert_eq!(http.prefix.as_ref(), "data/set");
        assert_eq!(format!("{s3:?}"), "Location(s3://bucket/slides)");
    }

    #[test]
    fn secrets_and_unknown_keys_are_refused_with_the_key_named() {
        let mut opts = StoreOptions::default();
        opts.options
            .insert("aws_secret_access_key".into(), "x".into());
        let err = Location::parse_with("s3://b/p", &opts)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("aws_secret_access_key") && err.contains("environment"),
            "{err}"
        );
        let mut opts = StoreOptions::default();
        opts.options.insert("colour".into(), "blue".into());
        let err = Location::parse_with("s3://b/p", &opts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("colour"), "{err}");
    }
}
