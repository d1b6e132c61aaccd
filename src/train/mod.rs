//! Training: what a run is asked to do ([`config`]), the learning-rate schedule
//! ([`schedule`]), the run directory and its lock ([`run_dir`], [`lock`]), the loop that every
//! training command runs ([`run_loop`]), and the two commands: `train-mini` ([`mini`], the small
//! end-to-end run on the embedded default data) and `train --config` ([`command`]); both can start
//! from a checkpoint and freeze parameters ([`finetune`]). The batches
//! they draw are in `crate::data::batch`; the step itself is the [`crate::engine::Engine`]'s.

pub mod command;
pub mod config;
pub mod finetune;
pub mod lock;
pub mod mini;
pub mod run_dir;
pub mod run_loop;
pub mod schedule;

pub use command::*;
pub use config::*;
pub use lock::*;
pub use mini::*;
pub use run_dir::*;
pub use run_loop::*;
pub use schedule::*;

pub use crate::data::batch::{Batches, ShardBatches};
