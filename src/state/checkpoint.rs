//! Checkpoints on any object store URL, written so that a crash never leaves a half checkpoint
//! that looks whole: each checkpoint is a directory `step-NNNNNNNNNN/` whose data files are
//! written first and whose `MANIFEST.json` (names, sizes, CRC-32 of every file) is written last.
//! A directory without a manifest is ignored; a file that does not match its manifest entry
//! makes that checkpoint unusable (a clear error), and the next older complete one is used.
//!
//! Pure functions over a [`Location`]: tested against the in-memory store, used on any.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::storage::{Location, StorageError};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("checkpoint '{url}': {reason}")]
    Invalid { url: String, reason: String },
}

pub type Result<T, E = CheckpointError> = std::result::Result<T, E>;

pub const MANIFEST: &str = "MANIFEST.json";
const FORMAT: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub crc32: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// Optimizer steps taken when the checkpoint was written (its name).
    pub step: u64,
    pub files: Vec<FileEntry>,
}

/// The directory name of the checkpoint at `step` (zero-padded, so names sort by step).
pub fn dir_name(step: u64) -> String {
    format!("step-{step:010}")
}

fn crc(bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(bytes);
    h.finalize()
}

/// A checkpoint being written: each file streamed to the store with its CRC-32 computed on the
/// way, then the manifest by [`Writer::finish`]. Dropped without `finish` (a crash), it leaves
/// a directory without a manifest, which readers ignore.
pub struct Writer<'a> {
    root: &'a Location,
    step: u64,
    dir: String,
    entries: Vec<FileEntry>,
}

impl<'a> Writer<'a> {
    pub async fn begin(root: &'a Location, step: u64) -> Result<Self> {
        let dir = dir_name(step);
        // Rewriting a step (the final checkpoint at a step an earlier one had): the old manifest
        // goes first, so the directory is never complete-looking while its files change.
        root.delete(&root.path(&format!("{dir}/{MANIFEST}")))
            .await?;
        Ok(Self {
            root,
            step,
            dir,
            entries: Vec::new(),
        })
    }

    /// Another process's part of the checkpoint at `step` (a data-parallel rank other than 0):
    /// it writes files into the directory but leaves the manifest to the one that began it.
    pub fn join(root: &'a Location, step: u64) -> Self {
        Self {
            root,
            step,
            dir: dir_name(step),
            entries: Vec::new(),
        }
    }

    /// The files written so far.
    pub fn entries(&self) -> &[FileEntry] {
        &self.entries
    }

    /// Files that other processes wrote into this checkpoint, for the manifest.
    pub fn add_entries(&mut self, entries: Vec<FileEntry>) {
        self.entries.extend(entries);
    }

    /// One file from bytes in memory.
    pub async fn put(&mut self, name: &str, bytes: Bytes) -> Result<()> {
        self.entries.push(FileEntry {
            name: name.to_string(),
            bytes: bytes.len() as u64,
            crc32: crc(&bytes),
        });
        self.root
            .put(&format!("{}/{name}", self.dir), bytes)
            .await?;
        Ok(())
    }

    /// One file from pieces (a multipart upload on cloud stores): never whole in memory.
    pub async fn put_pieces<E: std::fmt::Display>(
        &mut self,
        name: &str,
        pieces: impl Iterator<Item = std::result::Result<Vec<u8>, E>>,
    ) -> Result<()> {
        let path = self.root.path(&format!("{}/{name}", self.dir));
        let url = self.root.url_of(&path);
        let io = |source: object_store::Error| {
            CheckpointError::Storage(StorageError::Io {
                action: "write",
                url: url.clone(),
                source,
            })
        };
        let mut writer = object_store::buffered::BufWriter::new(self.root.store.clone(), path);
        let (mut hasher, mut bytes) = (crc32fast::Hasher::new(), 0u64);
        for piece in pieces {
            let piece = piece.map_err(|e| CheckpointError::Invalid {
                url: url.clone(),
                reason: e.to_string(),
            })?;
            hasher.update(&piece);
            bytes += piece.len() as u64;
            writer.put(Bytes::from(piece)).await.map_err(io)?;
        }
        tokio::io::AsyncWriteExt::shutdown(&mut writer)
            .await
            .map_err(|e| {
                io(object_store::Error::Generic {
                    store: "checkpoint",
                    source: Box::new(e),
                })
            })?;
        self.entries.push(FileEntry {
            name: name.to_string(),
            bytes,
            crc32: hasher.finalize(),
        });
        Ok(())
    }

    /// Write the manifest: from now on the checkpoint exists.
    pub async fn finish(self) -> Result<Manifest> {
        let manifest = Manifest {
            format: FORMAT,
            step: self.step,
            files: self.entries,
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("manifest to JSON");
        self.root
            .put(&format!("{}/{MANIFEST}", self.dir), json)
            .await?;
        Ok(manifest)
    }
}

/// Write a checkpoint of in-memory files: every file, then the manifest.
pub async fn write(root: &Location, step: u64, files: Vec<(String, Bytes)>) -> Result<Manifest> {
    let mut w = Writer::begin(root, step).await?;
    for (name, bytes) in files {
        w.put(&name, bytes).await?;
    }
    w.finish().await
}

/// Steps of the checkpoints that have a manifest, newest first.
pub async fn complete_steps(root: &Location) -> Result<Vec<u64>> {
    let mut steps: Vec<u64> = root
        .list()
        .await?
        .iter()
        .filter_map(|m| {
            let rel = root.relative(&m.location)?;
            let (dir, file) = rel.split_once('/')?;
            (file == MANIFEST).then(|| dir.strip_prefix("step-")?.parse().ok())?
        })
        .collect();
    steps.sort_unstable_by(|a, b| b.cmp(a));
    Ok(steps)
}

/// A checkpoint read back and verified against its manifest: its files are streamed into a
/// local temporary directory (never whole in memory) and removed when this is dropped.
#[derive(Debug)]
pub struct Loaded {
    pub manifest: Manifest,
    dir: tempfile::TempDir,
}

impl Loaded {
    /// The local copy of a file of the checkpoint.
    pub fn path(&self, name: &str) -> Option<std::path::PathBuf> {
        self.manifest
            .files
            .iter()
            .any(|f| f.name == name)
            .then(|| self.dir.path().join(name))
    }

    /// A (small) file's bytes.
    pub fn bytes(&self, name: &str) -> Option<Vec<u8>> {
        std::fs::read(self.path(name)?).ok()
    }
}

/// Read and verify the checkpoint at `step`.
pub async fn read(root: &Location, step: u64) -> Result<Loaded> {
    use futures::StreamExt;
    use std::io::Write;
    let dir = dir_name(step);
    let url = format!("{}/{dir}", root.url);
    let invalid = |reason: String| CheckpointError::Invalid {
        url: url.clone(),
        reason,
    };
    let json = root.get_relative(&format!("{dir}/{MANIFEST}")).await?;
    let manifest: Manifest = serde_json::from_slice(&json)
        .map_err(|e| invalid(format!("{MANIFEST} is not a manifest: {e}")))?;
    if manifest.format != FORMAT || manifest.step != step {
        return Err(invalid(format!(
            "{MANIFEST} says format {} step {}; expected format {FORMAT} step {step}",
            manifest.format, manifest.step
        )));
    }
    let local = tempfile::Builder::new()
        .prefix("patchgd-checkpoint-")
        .tempdir()
        .map_err(|e| invalid(format!("no local temporary directory: {e}")))?;
    for entry in &manifest.files {
        if entry.name.contains('/') || entry.name.starts_with('.') {
            return Err(invalid(format!("{MANIFEST} names a file '{}'", entry.name)));
        }
        let path = root.path(&format!("{dir}/{}", entry.name));
        let get = match object_store::ObjectStoreExt::get(&root.store, &path).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(invalid(format!("{} is missing", entry.name)));
            }
            Err(source) => {
                return Err(StorageError::Io {
                    action: "read",
                    url: root.url_of(&path),
                    source,
                }
                .into());
            }
        };
        let mut file = std::fs::File::create(local.path().join(&entry.name))
            .map_err(|e| invalid(format!("cannot copy {} locally: {e}", entry.name)))?;
        let (mut hasher, mut bytes) = (crc32fast::Hasher::new(), 0u64);
        let mut chunks = get.into_stream();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|source| StorageError::Io {
                action: "read",
                url: root.url_of(&path),
                source,
            })?;
            hasher.update(&chunk);
            bytes += chunk.len() as u64;
            file.write_all(&chunk)
                .map_err(|e| invalid(format!("cannot copy {} locally: {e}", entry.name)))?;
        }
        if bytes != entry.bytes {
            return Err(invalid(format!(
                "{} has {bytes} bytes, the manifest says {} (partial write?)",
                entry.name, entry.bytes
            )));
        }
        if hasher.finalize() != entry.crc32 {
            return Err(invalid(format!(
                "{} does not match its checksum (corrupt)",
                entry.name
            )));
        }
    }
    Ok(Loaded {
        manifest,
        dir: local,
    })
}

/// The newest checkpoint that reads back whole, and the errors of newer ones that did not.
pub async fn newest(root: &Location) -> Result<(Option<Loaded>, Vec<CheckpointError>)> {
    let mut skipped = Vec::new();
    for step in complete_steps(root).await? {
        match read(root, step).await {
            Ok(loaded) => return Ok((Some(loaded), skipped)),
            Err(e) => skipped.push(e),
        }
    }
    Ok((None, skipped))
}

/// Keep the newest `keep` complete checkpoints; delete older ones (manifest first, so a
/// deletion cut short leaves an ignored directory, never a broken complete one) and any
/// incomplete directory older than the newest complete checkpoint.
pub async fn prune(root: &Location, keep: usize) -> Result<()> {
    let complete = complete_steps(root).await?;
    let Some(&newest) = complete.first() else {
        return Ok(());
    };
    let kept: Vec<u64> = complete.iter().take(keep.max(1)).copied().collect();
    let objects = root.list().await?;
    let mut by_dir: BTreeMap<String, Vec<object_store::path::Path>> = BTreeMap::new();
    for m in objects {
        if let Some((dir, _)) = root.relative(&m.location).and_then(|r| {
            let (d, f) = r.split_once('/')?;
            Some((d.to_string(), f.to_string()))
        }) {
            by_dir.entry(dir).or_default().push(m.location);
        }
    }
    for (dir, mut paths) in by_dir {
        let Some(step) = dir
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if kept.contains(&step) || step > newest {
            continue; // kept, or possibly being written right now
        }
        paths.sort_by_key(|p| !p.as_ref().ends_with(MANIFEST));
        for p in paths {
            root.delete(&p).await?;
        }
    }
    Ok(())
}

/// Delete every checkpoint under `root` (manifests first), for a run started over.
pub async fn delete_all(root: &Location) -> Result<usize> {
    let mut objects = root.list().await?;
    objects.sort_by_key(|m| !m.location.as_ref().ends_with(MANIFEST));
    let n = objects.len();
    for m in objects {
        root.delete(&m.location).await?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(tag: &str) -> Vec<(String, Bytes)> {
        vec![
            (
                "model.safetensors".into(),
                Bytes::from(format!("weights {tag}")),
            ),
            (
                "state.json".into(),
                Bytes::from(format!("{{\"tag\": \"{tag}\"}}")),
            ),
        ]
    }

    #[tokio::test]
    async fn newest_complete_checkpoint_wins_and_a_missing_manifest_is_ignored() {
        let root = Location::parse("memory://ckpt-test-1/run/checkpoints").unwrap();
        write(&root, 10, files("a")).await.unwrap();
        write(&root, 20, files("b")).await.unwrap();
        // A crash while writing step 30: data files, no manifest.
        root.put(&format!("{}/model.safetensors", dir_name(30)), "partial")
            .await
            .unwrap();
        assert_eq!(complete_steps(&root).await.unwrap(), vec![20, 10]);
        let (loaded, skipped) = newest(&root).await.unwrap();
        let loaded = loaded.unwrap();
        assert!(skipped.is_empty());
        assert_eq!(loaded.manifest.step, 20);
        assert_eq!(loaded.bytes("model.safetensors").unwrap(), b"weights b");
    }

    #[tokio::test]
    async fn corrupt_or_short_files_are_named_and_the_previous_checkpoint_is_used() {
        let root = Location::parse("memory://ckpt-test-2/checkpoints").unwrap();
        write(&root, 1, files("a")).await.unwrap();
        write(&root, 2, files("b")).await.unwrap();
        write(&root, 3, files("c")).await.unwrap();
        // Step 3: same length, one byte changed. Step 2: truncated.
        root.put(&format!("{}/model.safetensors", dir_name(3)), "weights X")
            .await
            .unwrap();
        root.put(&format!("{}/state.json", dir_name(2)), "{")
            .await
            .unwrap();
        let (loaded, skipped) = newest(&root).await.unwrap();
        assert_eq!(loaded.unwrap().manifest.step, 1);
        let messages: Vec<String> = skipped.iter().map(|e| e.to_string()).collect();
        assert!(
            messages[0].contains("step-0000000003")
                && messages[0].contains("model.safetensors")
                && messages[0].contains("checksum"),
            "{messages:?}"
        );
        assert!(
            messages[1].contains("step-0000000002")
                && messages[1].contains("state.json")
                && messages[1].contains("partial write"),
            "{messages:?}"
        );
        // A manifest that is not JSON is named too.
        root.put(&format!("{}/{MANIFEST}", dir_name(1)), "garbage")
            .await
            .unwrap();
        let err = read(&root, 1).await.unwrap_err().to_string();
        assert!(err.contains("MANIFEST.json is not a manifest"), "{err}");
    }

    #[tokio::test]
    async fn prune_keeps_the_newest_k() {
        let root = Location::parse("memory://ckpt-test-3/checkpoints").unwrap();
        for step in [5, 10, 15, 20] {
            write(&root, step, files(&step.to_string())).await.unwrap();
        }
        root.put(&format!("{}/model.safetensors", dir_name(7)), "orphan")
            .await
            .unwrap();
        prune(&root, 2).await.unwrap();
        assert_eq!(complete_steps(&root).await.unwrap(), vec![20, 15]);
        let left: Vec<String> = root
            .list()
            .await
            .unwrap()
            .iter()
            .map(|m| root.relative(&m.location).unwrap())
            .collect();
        assert!(
            left.iter()
                .all(|p| p.starts_with("step-0000000020") || p.starts_with("step-0000000015")),
            "{left:?}"
        );
        assert_eq!(delete_all(&root).await.unwrap(), 6);
        assert!(complete_steps(&root).await.unwrap().is_empty());
    }
}
