//! What an images URL names: every object under a prefix, or the one object it points at.
//! Used wherever images are read without a labels table (`inspect`, SQL over unlabelled data),
//! so that "an object or a prefix" means the same everywhere.

#![warn(missing_docs)]

use super::catalog::unique_ids;
use super::{Failure, ImageEntry, Result, SourceError};
use crate::storage::{Location, StorageError, StoreOptions};

/// The unlabelled images of one URL.
#[derive(Debug)]
pub struct Listing {
    /// Where the entries' paths are relative to: the prefix, or the object's parent.
    pub location: Location,
    /// One entry per object whose image id is its own.
    pub images: Vec<ImageEntry>,
    /// Objects that could not be images (two objects with one image id).
    pub failures: Vec<Failure>,
}

/// List `url` as a prefix; when nothing is under it, read it as one object. An id is the
/// path under the prefix (or the file name) without its extension.
pub async fn list_images(url: &str, options: &StoreOptions) -> Result<Listing> {
    let prefix = Location::parse_with(url, options)?;
    let listed = prefix.list().await?;
    if !listed.is_empty() {
        let (objects, failures) = unique_ids(&prefix, listed);
        let images = objects
            .into_iter()
            .map(|meta| ImageEntry::unlabelled(&prefix, meta))
            .collect();
        return Ok(Listing {
            location: prefix,
            images,
            failures,
        });
    }
    let (parent, path) = Location::parse_object(url, options)?;
    match parent.head(&path).await {
        Ok(meta) => Ok(Listing {
            images: vec![ImageEntry::unlabelled(&parent, meta)],
            location: parent,
            failures: Vec::new(),
        }),
        Err(StorageError::NotFound { .. }) => Err(SourceError::Empty {
            url: url.to_string(),
        }),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_prefix_lists_its_objects_and_an_object_url_names_itself() {
        let root = Location::parse("memory://listing-test/ds").unwrap();
        root.put("images/a.png", "x").await.unwrap();
        root.put("images/sub/b.png", "xy").await.unwrap();
        let options = StoreOptions::default();
        let prefix = list_images("memory://listing-test/ds/images", &options)
            .await
            .unwrap();
        let ids: Vec<&str> = prefix.images.iter().map(|e| e.image_id.as_str()).collect();
        assert_eq!(ids, ["a", "sub/b"]);
        let one = list_images("memory://listing-test/ds/images/sub/b.png", &options)
            .await
            .unwrap();
        assert_eq!(one.images.len(), 1);
        assert_eq!(one.images[0].image_id, "b");
        assert_eq!(one.images[0].size, 2);
        let err = list_images("memory://listing-test/ds/nothing", &options)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("memory://listing-test/ds/nothing"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn two_objects_with_one_id_both_fail_naming_each_other() {
        let root = Location::parse("memory://listing-test2/ds").unwrap();
        for name in ["boxes.png", "boxes.tiff", "other.png"] {
            root.put(&format!("images/train/{name}"), "x")
                .await
                .unwrap();
        }
        let listing = list_images("memory://listing-test2/ds/images", &StoreOptions::default())
            .await
            .unwrap();
        let ids: Vec<&str> = listing.images.iter().map(|e| e.image_id.as_str()).collect();
        assert_eq!(ids, ["train/other"]);
        let failed: Vec<&str> = listing
            .failures
            .iter()
            .map(|f| f.image_id.as_str())
            .collect();
        assert_eq!(failed, ["train/boxes.png", "train/boxes.tiff"]);
        for f in &listing.failures {
            assert!(
                f.message.contains("'train/boxes.png'") && f.message.contains("'train/boxes.tiff'"),
                "{}",
                f.message
            );
        }
    }
}
