//! Object store URLs: one place that turns `file://`, `memory://` or a plain path into an
//! [`ObjectStore`] and a prefix inside it, for readers (source) and writers (synth, sinks) alike.
//!
//! `memory://NAME/...` stores live for the whole process and are shared by name, so that a data
//! set generated into memory can be trained on in the same process (tests use this).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("bad storage URL '{url}': {reason}")]
    BadUrl { url: String, reason: String },
    #[error("object '{url}' does not exist")]
    NotFound { url: String },
    #[error("cannot {action} '{url}': {source}")]
    Io {
        action: &'static str,
        url: String,
        #[source]
        source: object_store::Error,
    },
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

static MEMORY_STORES: LazyLock<Mutex<HashMap<String, Arc<InMemory>>>> =
    LazyLock::new(Default::default);

/// A prefix inside an object store, named by the URL the user gave.
#[derive(Clone, Debug)]
pub struct Location {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: Path,
    /// The URL as given, without a trailing slash; used in every message about this location.
    pub url: String,
}

impl Location {
    /// Resolve a URL or a local path. Nothing is created: writes create parent directories,
    /// and reading a missing location fails with the object's name.
    pub fn parse(url: &str) -> Result<Self> {
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
        } else if let Some((scheme, _)) = url.split_once("://") {
            return Err(bad(&format!(
                "scheme '{scheme}' is not supported by this build; supported: file://, memory://, or a local path"
            )));
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
            store: Arc::new(LocalFileSystem::new()),
            prefix,
            url: trimmed,
        })
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
            .map_err(|source| StorageError::Io {
                action: "write",
                url: self.url_of(&path),
                source,
            })?;
        Ok(())
    }

    pub async fn get(&self, path: &Path) -> Result<Bytes> {
        let url = self.url_of(path);
        let result = self.store.get(path).await;
        let get = match result {
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StorageError::NotFound { url });
            }
            other => other.map_err(|source| StorageError::Io {
                action: "read",
                url: url.clone(),
                source,
            })?,
        };
        get.bytes().await.map_err(|source| StorageError::Io {
            action: "read",
            url,
            source,
        })
    }

    pub async fn get_relative(&self, relative: &str) -> Result<Bytes> {
        self.get(&self.path(relative)).await
    }

    /// Every object under the prefix, sorted by path so that listings are deterministic.
    pub async fn list(&self) -> Result<Vec<ObjectMeta>> {
        let prefix = (!self.prefix.as_ref().is_empty()).then_some(&self.prefix);
        let mut objects: Vec<ObjectMeta> =
            self.store
                .list(prefix)
                .try_collect()
                .await
                .map_err(|source| StorageError::Io {
                    action: "list",
                    url: self.url.clone(),
                    source,
                })?;
        objects.sort_by(|a, b| a.location.cmp(&b.location));
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
        assert!(err.contains("ftp") && err.contains("file://"), "{err}");
    }
}
