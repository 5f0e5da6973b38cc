//! Training: the PatchGD and GD steps, the owned optimizer, schedules, metrics and the trainer.

pub mod batch;
pub mod determinism;
pub mod gd;
pub mod metrics;
pub mod optim;
pub mod patchgd;
pub mod precision;
pub mod schedule;
pub mod trace;
pub mod trainer;

pub use precision::{LossScaler, Precision};
pub use schedule::{Accumulation, LrSchedule, StepPlan, plan_outer_step};
pub use trainer::{
    NonFiniteError, PassOutcome, Phase, Prediction, TrainError, TrainedBatch, Trainer,
    TrainerConfig,
};
