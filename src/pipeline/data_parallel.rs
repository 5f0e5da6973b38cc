//! What a run does differently as one rank of several (docs/distributed.md): which images are
//! this rank's, how the ranks' passes add up to the epoch's, and who speaks.
//!
//! The step itself (gradients averaged, BatchNorm statistics shared, weights compared) is the
//! trainer's ([`crate::train::Trainer::join`]); checkpoints are sharded in
//! [`super::checkpoint`].

#![warn(missing_docs)]

use std::ops::Range;

use super::observer::RunObserver;
use crate::dist::{Group, share};
use crate::train::PassOutcome;

/// This rank's contiguous share of `len` validation images.
pub fn rank_share(len: usize, group: &Group) -> Range<usize> {
    share(len, group.rank(), group.size())
}

/// The epoch's pass as one process would have reported it, from every rank's part: counts and
/// sums added, failures and predictions in rank order (for validation's contiguous shares, the
/// validation set's order), the slowest rank's time. Every rank gets the same result.
pub fn merge_pass(group: &Group, mine: &PassOutcome) -> PassOutcome {
    if group.size() == 1 {
        return mine.clone();
    }
    // YAML: its floats round-trip exactly, so the merged sums are the ranks' to the bit.
    let yaml = serde_norway::to_string(mine).expect("a pass outcome is YAML");
    let parts: Vec<PassOutcome> = group
        .all_gather_bytes(yaml.as_bytes())
        .iter()
        .map(|bytes| serde_norway::from_slice(bytes).expect("a rank's pass outcome"))
        .collect();
    let mut out = PassOutcome::default();
    for p in parts {
        // Steps taken with images of one's own (a rank's weight-0 steps are not counted).
        out.optimizer_steps = out.optimizer_steps.max(p.optimizer_steps);
        out.images += p.images;
        out.loss_sum += p.loss_sum;
        out.correct += p.correct;
        out.patch_passes += p.patch_passes;
        out.loss_skipped += p.loss_skipped;
        out.failures.extend(p.failures);
        out.predictions.extend(p.predictions);
        out.seconds = out.seconds.max(p.seconds);
    }
    out
}

/// Rank 0 reports progress; the other ranks are silent (their errors still stop the run, and
/// the command line prints them with the rank's number).
pub fn quiet_unless_root<'a>(observer: &'a dyn RunObserver, group: &Group) -> &'a dyn RunObserver {
    if group.is_root() { observer } else { &Silent }
}

struct Silent;

impl RunObserver for Silent {
    fn note(&self, _line: &str) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_of_one_keeps_its_pass_and_its_voice() {
        let g = Group::single();
        let pass = PassOutcome {
            images: 3,
            loss_sum: 0.1 + 0.2,
            ..PassOutcome::default()
        };
        assert_eq!(merge_pass(&g, &pass), pass);
        assert_eq!(rank_share(5, &g), 0..5);
    }
}
