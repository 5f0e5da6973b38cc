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

/// Write a checkpoint: every file, then the manifest. A crash before the manifest leaves a
/// directory that readers ignore. Returns the manifest.
pub async fn write(root: &Location, step: u64, files: Vec<(String, Bytes)>) -> Result<Manifest> {
    let dir = dir_name(step);
    // Rewriting a step (the final checkpoint at a step an earlier one had): the old manifest
    // goes first, so the directory is never complete-looking while its files change.
    root.delete(&root.path(&format!("{dir}/{MANIFEST}")))
        .await?;
    let mut entries = Vec::new();
    for (name, bytes) in files {
        entries.push(FileEntry {
            name: name.clone(),
            bytes: bytes.len() as u64,
            crc32: crc(&bytes),
        });
        root.put(&format!("{dir}/{name}"), bytes).await?;
    }
    let manifest = Manifest {
        format: FORMAT,
        step,
        files: entries,
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest to JSON");
    root.put(&format!("{dir}/{MANIFEST}"), json).await?;
    Ok(manifest)
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

/// A checkpoint read back and verified against its manifest.
#[derive(Debug)]
pub struct Loaded {
    pub manifest: Manifest,
    pub files: BTreeMap<String, Bytes>,
}

/// Read and verify the checkpoint at `step`.
pub async fn read(root: &Location, step: u64) -> Result<Loaded> {
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
    let mut files = BTreeMap::new();
    for entry in &manifest.files {
        let bytes = match root.get_relative(&format!("{dir}/{}", entry.name)).await {
            Ok(b) => b,
            Err(StorageError::NotFound { .. }) => {
                return Err(invalid(format!("{} is missing", entry.name)));
            }
            Err(e) => return Err(e.into()),
        };
        if bytes.len() as u64 != entry.bytes {
            return Err(invalid(format!(
                "{} has {} bytes, the manifest says {} (partial write?)",
                entry.name,
                bytes.len(),
                entry.bytes
            )));
        }
        if crc(&bytes) != entry.crc32 {
            return Err(invalid(format!(
                "{} does not match its checksum (corrupt)",
                entry.name
            )));
        }
        files.insert(entry.name.clone(), bytes);
    }
    Ok(Loaded { manifest, files })
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
        assert_eq!(&loaded.files["model.safetensors"][..], b"weights b");
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
