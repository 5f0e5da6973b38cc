//! The checks a pipeline file passes before anything runs, one function per section; each
//! failure names the key and what is allowed.

use super::definition::{Definition, DefinitionError};

/// A key and what is wrong with its value.
type Check = Result<(), (String, String)>;

fn bad(key: &str, message: impl Into<String>) -> Check {
    Err((key.to_string(), message.into()))
}

impl Definition {
    /// Every check, in file order; the first failure is reported with `file` and its key.
    pub(super) fn validate(&self, file: &str) -> Result<(), DefinitionError> {
        self.check_source_and_patch()
            .and_then(|()| self.check_storage_and_checkpoints())
            .and_then(|()| self.check_method())
            .and_then(|()| self.check_model())
            .and_then(|()| self.check_train())
            .and_then(|()| self.check_synth())
            .map_err(|(key, message)| DefinitionError::Invalid {
                file: file.into(),
                key,
                message,
            })
    }

    fn check_source_and_patch(&self) -> Check {
        if self.patch.size == 0 {
            return bad("patch.size", "must be a positive number of pixels");
        }
        if let Some(sql) = &self.select
            && let Err(e) = crate::sql::select::check_query(sql)
        {
            return bad("select", e.to_string());
        }
        if let Some(url) = &self.select_cluster {
            if self.select.is_none() {
                return bad(
                    "select_cluster",
                    "is set but there is no select: query to run",
                );
            }
            if !url.starts_with("df://") {
                return bad(
                    "select_cluster",
                    format!("is '{url}'; expected a scheduler as df://HOST:PORT"),
                );
            }
        }
        if self.patch.stride == Some(0) {
            return bad("patch.stride", "must be a positive number of pixels");
        }
        if !matches!(self.source.channels, 1 | 3) {
            return bad(
                "source.channels",
                format!("is {}; allowed: 1 (grey) or 3 (RGB)", self.source.channels),
            );
        }
        if self.source.decode_workers == 0 {
            return bad("source.decode_workers", "must be at least 1");
        }
        if let Some(mpp) = self.source.target_mpp
            && !(mpp > 0.0)
        {
            return bad("source.target_mpp", format!("is {mpp}; must be positive"));
        }
        let f = self.patch.foreground.min_fraction;
        if !(0.0..=1.0).contains(&f) {
            return bad(
                "patch.foreground.min_fraction",
                format!("is {f}; allowed: 0 to 1"),
            );
        }
        if self.source.buffer_mib == 0 {
            return bad("source.buffer_mib", "must be at least 1");
        }
        if let Err(e) = self.source.normalize.check(self.source.channels) {
            return bad("source.normalize", e);
        }
        let input = self
            .source
            .normalize
            .input_channels(self.source.channels as i64);
        if self.model.backbone == crate::model::BackboneKind::SmallCnn
            && input != self.source.channels as i64
        {
            return bad(
                "source.normalize",
                format!(
                    "has RGB statistics, which turn grey data into 3 channels, but small_cnn takes the data's {} channel; use 1 value of mean and std",
                    self.source.channels
                ),
            );
        }
        Ok(())
    }

    fn check_storage_and_checkpoints(&self) -> Check {
        if self.checkpoint.keep == 0 {
            return bad("checkpoint.keep", "must be at least 1");
        }
        if let Err(e) = self.storage.validate() {
            return bad("storage", e.to_string());
        }
        Ok(())
    }

    fn check_method(&self) -> Check {
        let rho = self.patchgd.sampling_fraction;
        if !(rho > 0.0 && rho <= 1.0) {
            return bad(
                "patchgd.sampling_fraction",
                format!("is {rho}; allowed: 0 < value <= 1"),
            );
        }
        if self.patchgd.fill_chunk < 1 {
            return bad("patchgd.fill_chunk", "must be at least 1");
        }
        if self.gd.image_size == 0 {
            return bad("gd.image_size", "must be a positive number of pixels");
        }
        Ok(())
    }

    fn check_model(&self) -> Check {
        if self.model.latent_dim < 1 {
            return bad("model.latent_dim", "must be at least 1");
        }
        if self.model.head_width < 1 {
            return bad("model.head_width", "must be at least 1");
        }
        if !(0.0..1.0).contains(&self.model.head_dropout) {
            return bad(
                "model.head_dropout",
                format!(
                    "is {}; must be at least 0 and below 1",
                    self.model.head_dropout
                ),
            );
        }
        if self.model.pretrained.is_some() && self.model.init_from.is_some() {
            return bad(
                "model.init_from",
                "is set together with model.pretrained; a run starts from one of them",
            );
        }
        if let Some(c) = self.model.classes
            && c < 2
        {
            return bad(
                "model.classes",
                format!("is {c}; at least 2 classes are needed"),
            );
        }
        Ok(())
    }

    fn check_train(&self) -> Check {
        let t = &self.train;
        if t.epochs == 0 {
            return bad("train.epochs", "must be at least 1");
        }
        if t.batch_size == 0 {
            return bad("train.batch_size", "must be at least 1");
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return bad(
                "train.lr",
                format!("is {}; must be a positive number", t.lr),
            );
        }
        if !(t.warmup_epochs >= 0.0) {
            return bad("train.warmup_epochs", "must be 0 or more");
        }
        if let Some(h) = t.decay_epochs
            && !(h > t.warmup_epochs)
        {
            return bad(
                "train.decay_epochs",
                format!(
                    "is {h}; must be greater than warmup_epochs ({})",
                    t.warmup_epochs
                ),
            );
        }
        if !(t.weight_decay >= 0.0) {
            return bad("train.weight_decay", "must be 0 or more");
        }
        if t.spool_above_mib.is_nan() || t.spool_above_mib < 0.0 {
            return bad("train.spool_above_mib", "must be 0 or more (MiB)");
        }
        Ok(())
    }

    fn check_synth(&self) -> Check {
        if let Some(s) = &self.synth
            && let Err(e) = s.validate()
        {
            return bad(&format!("synth.{}", e.key), e.reason);
        }
        Ok(())
    }
}
