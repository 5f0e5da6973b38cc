//! Data-parallel training's process group: which rank this process is, how many there are, and
//! the few collectives a data-parallel run needs (docs/distributed.md).
//!
//! The transport is MPI (the `mpi` cargo feature, Open MPI or any MPI the `mpi` crate builds
//! against): it launches the ranks (`mpirun`, `srun`), finds them, and reduces on the CPU.
//! patchgd implements no collective of its own. Started without an MPI launcher, a process is a
//! group of one and every collective is the identity, with no MPI library involved.

// Without MPI, every collective is the identity and ignores its buffer.
#![cfg_attr(not(feature = "mpi"), allow(unused_variables))]

use std::rc::Rc;

mod average;
#[cfg(feature = "mpi")]
mod mpi_world;
pub mod nccl;

pub use average::{BucketPlan, GradientAverager, Transport};

/// Why the group could not be formed.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// Launched by an MPI launcher, but this build has no MPI.
    #[error(
        "this process was started by an MPI launcher as one of {size} ranks ({variable} is set), \
         but this patchgd was built without MPI. Install MPI and build with the `mpi` feature: \
         `apt-get install openmpi-bin libopenmpi-dev libclang-dev` (Debian, Ubuntu), then \
         `cargo build --release --features mpi` (docs/distributed.md)"
    )]
    NoMpi {
        /// The launcher's variable that gave it away.
        variable: &'static str,
        /// The rank count it announced.
        size: String,
    },
    /// MPI was there but could not be initialised.
    #[error("MPI could not be initialised: {0}")]
    Init(String),
    /// Averaging on a GPU needs NCCL, and this process has none.
    #[error(
        "averaging gradients on the GPU needs NCCL, which comes with the CUDA build of PyTorch \
         (`pip install torch==2.11.0`): {0}"
    )]
    NcclMissing(String),
    /// NCCL was there but failed.
    #[error("NCCL: {0}")]
    Nccl(String),
}

/// The ranks of one run. Cheap to share (`Rc`): the trainer's optimizer and the runner hold it.
pub struct Group {
    rank: usize,
    size: usize,
    local_rank: usize,
    backend: Backend,
}

enum Backend {
    /// A process on its own: every collective is the identity.
    Single,
    #[cfg(feature = "mpi")]
    Mpi(mpi_world::World),
}

/// Variables by which MPI launchers (Open MPI's `mpirun`, MPICH's Hydra, Slurm's `srun` through
/// PMI or PMIx) tell a process it is one of several ranks.
const LAUNCHER_SIZE_VARIABLES: &[&str] = &[
    "OMPI_COMM_WORLD_SIZE",
    "PMIX_SIZE",
    "PMI_SIZE",
    "MPI_LOCALNRANKS",
];

impl Group {
    /// A process on its own.
    pub fn single() -> Rc<Self> {
        Rc::new(Self {
            rank: 0,
            size: 1,
            local_rank: 0,
            backend: Backend::Single,
        })
    }

    /// The group this process was launched into: MPI's world when an MPI launcher started it,
    /// a group of one otherwise. Call once per process (MPI initialises once).
    pub fn from_environment() -> Result<Rc<Self>, DistError> {
        let launched = LAUNCHER_SIZE_VARIABLES
            .iter()
            .find_map(|v| std::env::var(v).ok().map(|s| (*v, s)))
            .or_else(|| {
                std::env::var("PMIX_RANK")
                    .ok()
                    .map(|_| ("PMIX_RANK", "?".into()))
            });
        let Some((variable, size)) = launched else {
            return Ok(Self::single());
        };
        Self::mpi(variable, size)
    }

    #[cfg(feature = "mpi")]
    fn mpi(_variable: &'static str, _size: String) -> Result<Rc<Self>, DistError> {
        let world = mpi_world::World::init()?;
        let (rank, size) = (world.rank(), world.size());
        let local_rank = [
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "MPI_LOCALRANKID",
            "SLURM_LOCALID",
        ]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(rank);
        Ok(Rc::new(Self {
            rank,
            size,
            local_rank,
            backend: Backend::Mpi(world),
        }))
    }

    #[cfg(not(feature = "mpi"))]
    fn mpi(variable: &'static str, size: String) -> Result<Rc<Self>, DistError> {
        if size == "1" {
            // `mpirun -np 1`: a group of one needs no MPI.
            return Ok(Self::single());
        }
        Err(DistError::NoMpi { variable, size })
    }

    /// This process's rank, 0-based.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// How many ranks train together.
    pub fn size(&self) -> usize {
        self.size
    }

    /// This process's rank among those on its machine (the GPU it takes).
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// Rank 0: the one that logs, writes the run's outputs and checkpoint manifests.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// Sum `values` element-wise over every rank; every rank gets the sum.
    pub fn all_reduce_sum_f32(&self, values: &mut [f32]) {
        match &self.backend {
            Backend::Single => {}
            #[cfg(feature = "mpi")]
            Backend::Mpi(w) => w.all_reduce_sum(values),
        }
    }

    /// [`Group::all_reduce_sum_f32`] in f64 (counts, loss sums, metrics).
    pub fn all_reduce_sum_f64(&self, values: &mut [f64]) {
        match &self.backend {
            Backend::Single => {}
            #[cfg(feature = "mpi")]
            Backend::Mpi(w) => w.all_reduce_sum(values),
        }
    }

    /// Every rank gets rank 0's `values`.
    pub fn broadcast_f32(&self, values: &mut [f32]) {
        match &self.backend {
            Backend::Single => {}
            #[cfg(feature = "mpi")]
            Backend::Mpi(w) => w.broadcast(values),
        }
    }

    /// Every rank gets rank 0's bytes (an NCCL id).
    pub fn broadcast_bytes(&self, bytes: &mut [u8]) {
        match &self.backend {
            Backend::Single => {}
            #[cfg(feature = "mpi")]
            Backend::Mpi(w) => w.broadcast(bytes),
        }
    }

    /// Each rank's `values` (the same length on every rank), in rank order.
    pub fn all_gather_u64(&self, values: &[u64]) -> Vec<Vec<u64>> {
        match &self.backend {
            Backend::Single => vec![values.to_vec()],
            #[cfg(feature = "mpi")]
            Backend::Mpi(w) => w
                .all_gather(values)
                .chunks(values.len().max(1))
                .map(<[u64]>::to_vec)
                .collect(),
        }
    }

    /// Each rank's bytes (any length), in rank order: how ranks exchange records (predictions,
    /// failures) that have no fixed size.
    pub fn all_gather_bytes(&self, bytes: &[u8]) -> Vec<Vec<u8>> {
        match &self.backend {
            Backend::Single => vec![bytes.to_vec()],
            #[cfg(feature = "mpi")]
            Backend::Mpi(w) => {
                let lengths = w.all_gather(&[bytes.len() as u64]);
                let all = w.all_gather_varcount(bytes, &lengths);
                let mut at = 0;
                lengths
                    .iter()
                    .map(|&n| {
                        let part = all[at..at + n as usize].to_vec();
                        at += n as usize;
                        part
                    })
                    .collect()
            }
        }
    }

    /// Wait until every rank has got here.
    pub fn barrier(&self) {
        match &self.backend {
            Backend::Single => {}
            #[cfg(feature = "mpi")]
            Backend::Mpi(w) => w.barrier(),
        }
    }
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Group(rank {} of {})", self.rank, self.size)
    }
}

/// `[start, end)` of the `i`-th of `n` ranks' shares of `len` items, for splitting work that is
/// not batched (validation images): contiguous, sizes differing by at most one.
pub fn share(len: usize, rank: usize, size: usize) -> std::ops::Range<usize> {
    let (q, r) = (len / size, len % size);
    let start = rank * q + rank.min(r);
    start..start + q + usize::from(rank < r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_of_one_is_the_identity() {
        let g = Group::single();
        let mut v = [1.5f32, -2.0];
        g.all_reduce_sum_f32(&mut v);
        g.broadcast_f32(&mut v);
        assert_eq!(v, [1.5, -2.0]);
        assert_eq!(g.all_gather_u64(&[3, 4]), vec![vec![3, 4]]);
        assert_eq!(g.all_gather_bytes(b"abc"), vec![b"abc".to_vec()]);
        assert!(g.is_root());
    }

    #[test]
    fn shares_cover_every_item_once_in_order() {
        for len in 0..12 {
            for size in 1..5 {
                let all: Vec<usize> = (0..size).flat_map(|r| share(len, r, size)).collect();
                assert_eq!(all, (0..len).collect::<Vec<_>>(), "len {len} size {size}");
                let sizes: Vec<usize> = (0..size).map(|r| share(len, r, size).len()).collect();
                assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
            }
        }
    }
}
