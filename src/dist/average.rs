//! Averaging gradients across ranks before each optimizer step, as Horovod and PyTorch DDP do:
//! the gradients are packed into a few large flat buffers (buckets of about 64 MiB), each summed
//! over the ranks by one collective, not one collective per tensor.
//!
//! Each rank's gradient is the mean over its own images of the step. The average the optimizer
//! needs is the mean over all the step's images, so each rank's gradient is weighted by its
//! image count: `sum_r n_r g_r / sum_r n_r`. That is exactly the gradient one process would
//! compute over the whole global batch (when nothing in the model uses batch statistics), also
//! when the ranks' shares differ, at the end of an epoch or after a failed image, and when a rank
//! has no images at all in a step (it contributes zeros and a weight of 0).
//!
//! Where the buckets are summed ([`Transport`]): parameters on a GPU are summed there by NCCL,
//! without leaving the device; parameters on the CPU by MPI. The step's small header (image
//! counts, which parameters have gradients) always goes through MPI: its values are on the
//! host already.

use std::ops::Range;
use std::rc::Rc;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::nccl::Communicator;
use super::{DistError, Group};

/// How the flat buffers are summed over the ranks.
pub enum Transport {
    /// On the host, by the group's MPI (the identity in a group of one).
    Mpi,
    /// On the GPU, by NCCL.
    Nccl(Communicator),
}

impl Transport {
    /// NCCL for parameters on a GPU, MPI for parameters on the CPU. With one rank there is
    /// nothing to sum, and no NCCL communicator is made.
    pub fn for_parameters(group: &Group, masters: &[Tensor]) -> Result<Self, DistError> {
        match masters.first().map(Tensor::device) {
            Some(Device::Cuda(gpu)) if group.size() > 1 => {
                Ok(Self::Nccl(Communicator::for_group(group, gpu)?))
            }
            _ => Ok(Self::Mpi),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Mpi => "MPI",
            Self::Nccl(_) => "NCCL",
        }
    }
}

/// Which parameters go into which flat buffer: consecutive parameters, each bucket up to
/// `bucket_elements` values (a parameter larger than that has a bucket of its own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketPlan {
    pub buckets: Vec<Range<usize>>,
}

impl BucketPlan {
    pub fn new(numels: &[i64], bucket_elements: i64) -> Self {
        let mut buckets = Vec::new();
        let (mut start, mut filled) = (0, 0);
        for (i, &n) in numels.iter().enumerate() {
            if filled > 0 && filled + n > bucket_elements {
                buckets.push(start..i);
                (start, filled) = (i, 0);
            }
            filled += n;
        }
        if start < numels.len() {
            buckets.push(start..numels.len());
        }
        Self { buckets }
    }
}

/// Averages a step's gradients over the group (see the module's comment).
pub struct GradientAverager {
    group: Rc<Group>,
    transport: Transport,
    plan: BucketPlan,
    numels: Vec<i64>,
    /// Each parameter's shape and device, for the averaged gradients.
    shapes: Vec<(Vec<i64>, Device)>,
    /// Seconds spent averaging (packing, the collectives, unpacking): the benchmark's share of
    /// step time spent in communication. With NCCL it is the host's time to queue the work (the
    /// GPU runs it asynchronously); `patchgd bench --only allreduce` synchronises to time it.
    pub seconds: f64,
    /// Collectives issued (one header and one per bucket, per step).
    pub collectives: u64,
}

impl GradientAverager {
    /// 16 Mi values: 64 MiB of f32 per buffer. resnet50's 25.6 M parameters take two.
    pub const BUCKET_ELEMENTS: i64 = 1 << 24;

    /// For parameters shaped as `masters`, in this order on every rank, summed where they are
    /// ([`Transport::for_parameters`]). Every rank must call it: NCCL's set-up is collective.
    pub fn new(group: Rc<Group>, masters: &[Tensor]) -> Result<Self, DistError> {
        let transport = Transport::for_parameters(&group, masters)?;
        Ok(Self::with_transport(
            group,
            masters,
            transport,
            Self::BUCKET_ELEMENTS,
        ))
    }

    pub fn with_transport(
        group: Rc<Group>,
        masters: &[Tensor],
        transport: Transport,
        bucket_elements: i64,
    ) -> Self {
        let numels: Vec<i64> = masters.iter().map(|m| m.numel() as i64).collect();
        Self {
            group,
            transport,
            plan: BucketPlan::new(&numels, bucket_elements),
            numels,
            shapes: masters.iter().map(|m| (m.size(), m.device())).collect(),
            seconds: 0.0,
            collectives: 0,
        }
    }

    pub fn group(&self) -> &Rc<Group> {
        &self.group
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// How many flat buffers (collectives after the header) a step takes.
    pub fn buckets(&self) -> usize {
        self.plan.buckets.len()
    }

    /// `grads[i]`: this rank's gradient of parameter `i`, the mean over its `images` images
    /// (undefined when it has none). Returns every parameter's average over the group's images,
    /// fp32, shaped like its master and on its device; undefined where no rank had a gradient.
    pub fn average(&mut self, grads: &[Tensor], images: f64) -> Vec<Tensor> {
        let started = Instant::now();
        // Header: the step's image count and, per parameter, how many ranks have a gradient (a
        // rank without images has none, whatever zeros its gradients hold from earlier steps).
        let mut header: Vec<f64> = std::iter::once(images)
            .chain(
                grads
                    .iter()
                    .map(|g| f64::from(u8::from(images > 0.0 && g.defined()))),
            )
            .collect();
        self.group.all_reduce_sum_f64(&mut header);
        self.collectives += 1;
        let total = header[0];
        let mut out: Vec<Tensor> = (0..grads.len()).map(|_| Tensor::new()).collect();
        if total <= 0.0 {
            self.seconds += started.elapsed().as_secs_f64();
            return out;
        }
        // The buffers live where the sum is taken: on NCCL's GPU, or on the host for MPI.
        let home = match &self.transport {
            Transport::Mpi => Device::Cpu,
            Transport::Nccl(comm) => Device::Cuda(comm.gpu()),
        };
        for range in &self.plan.buckets {
            let parts: Vec<Tensor> = range
                .clone()
                .map(|i| {
                    let g = &grads[i];
                    if images > 0.0 && g.defined() {
                        (g.to_kind(Kind::Float).to_device(home) * images).reshape([-1])
                    } else {
                        Tensor::zeros([self.numels[i]], (Kind::Float, home))
                    }
                })
                .collect();
            let flat = tch::no_grad(|| Tensor::cat(&parts, 0));
            let summed = match &self.transport {
                Transport::Mpi => {
                    let mut values: Vec<f32> =
                        Vec::try_from(&flat).expect("a flat f32 gradient buffer");
                    self.group.all_reduce_sum_f32(&mut values);
                    Tensor::from_slice(&values)
                }
                Transport::Nccl(comm) => {
                    comm.all_reduce_sum_in_place(&flat);
                    flat
                }
            } / total;
            self.collectives += 1;
            let sizes: Vec<i64> = range.clone().map(|i| self.numels[i]).collect();
            for (i, part) in range.clone().zip(summed.split_with_sizes(&sizes, 0)) {
                if header[1 + i] > 0.0 {
                    let (shape, device) = &self.shapes[i];
                    out[i] = part.reshape(shape.as_slice()).to_device(*device);
                }
            }
        }
        self.seconds += started.elapsed().as_secs_f64();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_take_consecutive_parameters_up_to_the_size() {
        let plan = BucketPlan::new(&[3, 3, 3, 10, 1], 6);
        assert_eq!(plan.buckets, vec![0..2, 2..3, 3..4, 4..5]);
        assert_eq!(BucketPlan::new(&[1, 1], 100).buckets, vec![0..2]);
        assert!(BucketPlan::new(&[], 100).buckets.is_empty());
    }

    #[test]
    fn in_a_group_of_one_the_average_is_the_gradient_and_undefined_stays_undefined() {
        let masters = [
            Tensor::zeros([2, 2], (Kind::Float, Device::Cpu)),
            Tensor::zeros([3], (Kind::Float, Device::Cpu)),
        ];
        let g = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2]);
        let mut avg =
            GradientAverager::with_transport(Group::single(), &masters, Transport::Mpi, 4);
        let out = avg.average(&[g.shallow_clone(), Tensor::new()], 3.0);
        assert!(out[0].equal(&g));
        assert!(!out[1].defined());
        assert_eq!(avg.collectives, 3, "a header and one per bucket");
    }
}
