//! The MPI backend of [`super::Group`]: MPI's world communicator through the `mpi` crate.

use mpi::Count;
use mpi::collective::SystemOperation;
use mpi::datatype::{Equivalence, PartitionMut};
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use super::DistError;

pub(super) struct World {
    /// Finalises MPI when dropped: kept for the life of the group.
    _universe: Universe,
    comm: SimpleCommunicator,
}

impl World {
    pub(super) fn init() -> Result<Self, DistError> {
        // Serialized: only the trainer's thread calls MPI, but it need not be the main thread
        // (a test harness runs tests on threads of its own).
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or_else(|| DistError::Init("MPI was already initialised in this process".into()))?;
        let comm = universe.world();
        Ok(Self {
            _universe: universe,
            comm,
        })
    }

    pub(super) fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    pub(super) fn size(&self) -> usize {
        self.comm.size() as usize
    }

    pub(super) fn all_reduce_sum<T: Equivalence + Copy + Default>(&self, values: &mut [T]) {
        let send = values.to_vec();
        self.comm
            .all_reduce_into(&send[..], values, SystemOperation::sum());
    }

    pub(super) fn broadcast<T: Equivalence>(&self, values: &mut [T]) {
        self.comm.process_at_rank(0).broadcast_into(values);
    }

    pub(super) fn all_gather<T: Equivalence + Copy + Default>(&self, values: &[T]) -> Vec<T> {
        let mut out = vec![T::default(); values.len() * self.size()];
        self.comm.all_gather_into(values, &mut out[..]);
        out
    }

    pub(super) fn all_gather_varcount(&self, bytes: &[u8], lengths: &[u64]) -> Vec<u8> {
        let counts: Vec<Count> = lengths.iter().map(|&n| n as Count).collect();
        let displs: Vec<Count> = counts
            .iter()
            .scan(0, |at, &n| {
                let start = *at;
                *at += n;
                Some(start)
            })
            .collect();
        let mut out = vec![0u8; lengths.iter().sum::<u64>() as usize];
        let mut partition = PartitionMut::new(&mut out[..], counts, &displs[..]);
        self.comm.all_gather_varcount_into(bytes, &mut partition);
        out
    }

    pub(super) fn barrier(&self) {
        self.comm.barrier();
    }
}
