//! Target 1: does the data path starve the backbone? The same PatchGD steps are timed twice
//! in one process: fed by the full pipeline (object store → decode → patches → Arrow batches
//! → assembled images → batches), and on batches built beforehand and already on the device
//! (the compute ceiling). Rounds alternate so that drift in the machine hits both alike.

use std::time::Instant;

use tch::Device;

use super::{BenchOptions, generate, median, pipeline_yaml};
use crate::model::{BackboneKind, ModelSpec};
use crate::patch::{ImageAssembler, ImagePatches};
use crate::pipeline::Definition;
use crate::pipeline::setup::{build_trainer, choose_device};
use crate::source::{Catalog, ImageEntry, SourceItem, Split, stream_images};
use crate::storage::Location;
use crate::synth::ImageFormat;
use crate::train::batch::GridBatch;
use crate::train::{PassOutcome, Phase, TrainError, Trainer};

#[derive(Clone, Debug)]
pub struct EfficiencyRow {
    pub backbone: String,
    pub device: String,
    pub image_px: u32,
    pub patch_px: usize,
    pub images: usize,
    pub rounds: usize,
    /// Patch passes per second, median over rounds.
    pub pipeline: f64,
    pub ceiling: f64,
    /// Median over rounds of pipeline / ceiling.
    pub ratio: f64,
}

pub(super) fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

pub(super) struct Setup {
    pub(super) def: Definition,
    pub(super) images: Location,
    pub(super) entries: Vec<ImageEntry>,
    pub(super) spec: ModelSpec,
    pub(super) device: Device,
}

impl Setup {
    pub(super) fn trainer(&self) -> Result<Trainer, String> {
        build_trainer(
            &self.def,
            self.spec.clone(),
            self.device,
            self.entries.len(),
        )
        .map_err(|e| e.to_string())
    }

    /// Every training image, assembled through the real source (not timed).
    pub(super) fn assembled(&self) -> Result<Vec<ImagePatches>, String> {
        let mut rx = stream_images(
            self.images.clone(),
            self.entries.clone(),
            self.def.stream_config(),
        );
        let mut asm = ImageAssembler::default();
        let mut out = Vec::new();
        while let Some(item) = rx.blocking_recv() {
            match item {
                SourceItem::Batch(b) => out.extend(asm.push(&b.batch).map_err(|e| e.to_string())?),
                SourceItem::Failed(f) => return Err(format!("{}: {}", f.image_id, f.message)),
            }
        }
        Ok(out)
    }
}

/// One backbone: `images` generated images of `size` px cut into `patch` px patches.
pub fn measure(
    opts: &BenchOptions,
    backbone: BackboneKind,
    size: u32,
    patch: usize,
    images: usize,
    rounds: usize,
) -> Result<EfficiencyRow, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let _guard = rt.enter();
    let setup = Setup::new(opts, &rt, backbone, size, patch, images)?;
    let assembled = setup.assembled()?;
    let batches: Vec<(&[ImagePatches], GridBatch)> = assembled
        .chunks(setup.def.train.batch_size)
        .map(|c| (c, GridBatch::from_images(c, setup.device)))
        .collect();
    // Warm-up: libtorch's first passes allocate and pick kernels.
    setup
        .trainer()?
        .train_on(batches[0].0, &batches[0].1)
        .map_err(|e| e.to_string())?;
    sync(setup.device);
    let (mut pipe, mut ceil, mut ratios): (Vec<f64>, Vec<f64>, Vec<f64>) = (vec![], vec![], vec![]);
    for round in 0..rounds {
        // Alternate which goes first, so that order effects cancel over rounds.
        let ((c, c_passes), (p, p_passes)) = if round % 2 == 0 {
            let c = setup.in_memory(&batches)?;
            (c, setup.through_pipeline(assembled.len())?)
        } else {
            let p = setup.through_pipeline(assembled.len())?;
            (setup.in_memory(&batches)?, p)
        };
        if p_passes != c_passes {
            return Err(format!(
                "the pipeline made {p_passes} patch passes, the in-memory steps {c_passes}"
            ));
        }
        pipe.push(p);
        ceil.push(c);
        ratios.push(p / c);
    }
    Ok(EfficiencyRow {
        backbone: backbone.name().into(),
        device: match setup.device {
            Device::Cuda(i) => format!("cuda:{i}"),
            _ => format!("cpu ({} threads)", tch::get_num_threads()),
        },
        image_px: size,
        patch_px: patch,
        images: assembled.len(),
        rounds,
        pipeline: median(pipe),
        ceiling: median(ceil),
        ratio: median(ratios),
    })
}

impl Setup {
    /// Generate the images and a pipeline for `backbone`, and list them.
    pub(super) fn new(
        opts: &BenchOptions,
        rt: &tokio::runtime::Runtime,
        backbone: BackboneKind,
        size: u32,
        patch: usize,
        images: usize,
    ) -> Result<Self, String> {
        let dir = opts.dir.join("efficiency");
        let (image_url, labels) =
            generate(&dir.join("data"), size, 4, images, 0, ImageFormat::Png)?;
        let out = dir.join("out").display().to_string();
        let yaml = pipeline_yaml(opts, &image_url, &labels, &out, patch, 1, 8, 4);
        let (latent, head) = match backbone {
            BackboneKind::SmallCnn => (64, 64),
            _ => (256, 256),
        };
        let def = Definition::from_yaml_with_overrides(
            &yaml,
            "efficiency.yaml",
            &[
                format!("model.backbone={}", backbone.name()).as_str(),
                &format!("model.latent_dim={latent}"),
                &format!("model.head_width={head}"),
                "patchgd.fill_chunk=256",
            ],
        )
        .map_err(|e| e.to_string())?;
        let loc = Location::parse(&def.source.images).map_err(|e| e.to_string())?;
        let catalog = rt
            .block_on(Catalog::load(&loc, &def.source.labels, &def.storage))
            .map_err(|e| e.to_string())?;
        Ok(Setup {
            spec: ModelSpec {
                method: def.method,
                backbone,
                channels: def.source.channels as i64,
                latent_dim: latent,
                head_width: head,
                head_dropout: crate::model::head::HEAD_DROPOUT,
                classes: 4,
            },
            device: choose_device(def.train.device).map_err(|e| e.to_string())?,
            entries: catalog.split(Split::Train),
            images: loc,
            def,
        })
    }

    /// The ceiling: the same steps on batches already built and on the device. Returns patch
    /// passes per second and the passes made.
    fn in_memory(&self, batches: &[(&[ImagePatches], GridBatch)]) -> Result<(f64, usize), String> {
        let mut t = self.trainer()?;
        let start = Instant::now();
        let mut passes = 0;
        for (images, batch) in batches {
            passes += t
                .train_on(images, batch)
                .map_err(|e| e.to_string())?
                .patch_passes;
        }
        sync(self.device);
        Ok((passes as f64 / start.elapsed().as_secs_f64(), passes))
    }

    /// One training pass fed by the full pipeline, which must train all `expected` images.
    fn through_pipeline(&self, expected: usize) -> Result<(f64, usize), String> {
        let mut t = self.trainer()?;
        let start = Instant::now();
        let rx = stream_images(
            self.images.clone(),
            self.entries.clone(),
            self.def.stream_config(),
        );
        let pass = t
            .run_pass(
                Phase::Train,
                rx,
                PassOutcome::default(),
                |_| {},
                |_, _| Ok::<(), TrainError>(()),
            )
            .map_err(|e| e.to_string())?;
        sync(self.device);
        if pass.images != expected || !pass.failures.is_empty() {
            return Err(format!(
                "the pipeline pass trained {} of {expected} images ({} failures)",
                pass.images,
                pass.failures.len()
            ));
        }
        let secs = start.elapsed().as_secs_f64();
        Ok((pass.patch_passes as f64 / secs, pass.patch_passes))
    }
}
