//! Gradient averaging across ranks: how long one step's average takes for a model's whole
//! gradient, through the transport a data-parallel run would use (NCCL on a GPU, MPI on the
//! CPU), in the group this process was launched into (`mpirun -np N patchgd bench --only
//! allreduce`; alone, a group of one).
//!
//! The gradients are made so that the answer is known: every rank holds the same seeded
//! gradient `g` times `rank + 1`, weighted by `rank + 1` images, so the weighted average is
//! `g (2N + 1) / 3`. Each measurement checks it, so a transport that returns the wrong sum fails
//! the benchmark instead of timing it.

use std::rc::Rc;
use std::time::Instant;

use tch::{Device, Tensor};

use super::efficiency::sync;
use super::median;
use crate::dist::nccl::Communicator;
use crate::dist::{GradientAverager, Group, Transport};
use crate::model::{BackboneKind, Method, Model, ModelSpec};

#[derive(Clone, Debug)]
pub struct AllreduceRow {
    pub backbone: String,
    /// Trainable values (backbone and head), and their fp32 bytes.
    pub parameters: usize,
    pub bytes: usize,
    pub ranks: usize,
    /// "MPI", or "NCCL 2.28.9".
    pub transport: String,
    pub buckets: usize,
    pub rounds: usize,
    /// Median seconds of one step's average (packing, collectives, unpacking; the device
    /// synchronised after each).
    pub seconds: f64,
    /// Largest difference from the known average, relative to the gradient's largest value.
    pub error: f64,
}

impl AllreduceRow {
    /// Algorithm bandwidth: the gradient's bytes over the time, GB/s.
    pub fn algbw(&self) -> f64 {
        self.bytes as f64 / self.seconds / 1e9
    }

    /// Bus bandwidth (NCCL's tests' measure): what each rank's links carried, GB/s; 0 for one
    /// rank, which sends nothing.
    pub fn busbw(&self) -> f64 {
        let n = self.ranks as f64;
        self.algbw() * 2.0 * (n - 1.0) / n
    }
}

/// One backbone's measurement on `device` (CUDA: NCCL, even for a group of one, so that a
/// single GPU measures the NCCL path; CPU: MPI).
pub fn measure(
    group: &Rc<Group>,
    device: Device,
    backbone: BackboneKind,
    rounds: usize,
) -> Result<AllreduceRow, String> {
    tch::manual_seed(11);
    let spec = ModelSpec {
        method: Method::Patchgd,
        backbone,
        channels: 3,
        latent_dim: 256,
        head_width: 256,
        classes: 10,
        head_dropout: 0.0,
    };
    let model = Model::new(spec, device);
    let masters: Vec<Tensor> = model.trainable().into_iter().map(|p| p.master).collect();
    let transport = match device {
        Device::Cuda(gpu) => {
            Transport::Nccl(Communicator::for_group(group, gpu).map_err(|e| e.to_string())?)
        }
        _ => Transport::Mpi,
    };
    let transport_name = match &transport {
        Transport::Nccl(_) => format!(
            "NCCL {}",
            crate::dist::nccl::version().map_err(|e| e.to_string())?
        ),
        Transport::Mpi => "MPI".to_string(),
    };
    let mut averager = GradientAverager::with_transport(
        group.clone(),
        &masters,
        transport,
        GradientAverager::BUCKET_ELEMENTS,
    );
    let base: Vec<Tensor> = masters.iter().map(Tensor::randn_like).collect();
    let weight = (group.rank() + 1) as f64;
    let grads: Vec<Tensor> = base.iter().map(|g| g * weight).collect();
    let n = group.size() as f64;
    let expected_factor = (2.0 * n + 1.0) / 3.0;
    let scale = base
        .iter()
        .map(|g| g.abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    let mut times = Vec::new();
    let mut error = 0.0f64;
    // Two rounds warm up (NCCL's first collective sets up its channels), then `rounds` timed.
    for round in 0..rounds + 2 {
        sync(device);
        let start = Instant::now();
        let averaged = averager.average(&grads, weight);
        sync(device);
        if round >= 2 {
            times.push(start.elapsed().as_secs_f64());
        }
        for (a, g) in averaged.iter().zip(&base) {
            let diff = (a - g * expected_factor).abs().max().double_value(&[]);
            error = error.max(diff / scale);
        }
    }
    if !(error < 1e-5) {
        return Err(format!(
            "{} averaging over {} ranks returned the wrong gradient: largest relative error {error:e}",
            transport_name,
            group.size()
        ));
    }
    let parameters: usize = masters.iter().map(Tensor::numel).sum();
    Ok(AllreduceRow {
        backbone: backbone.name().to_string(),
        parameters,
        bytes: parameters * 4,
        ranks: group.size(),
        transport: transport_name,
        buckets: averager.buckets(),
        rounds,
        seconds: median(times),
        error,
    })
}
