//! asa: training and analysis toolkit for Addressed State Models (ASM).
//!
//! Module map:
//! - [`config`]: the model config (reference `ASMTrainConfig` names) and its validation;
//! - [`vocab`]: the model vocabulary below both backends: a layer call's options (routing,
//!   slot masks, interventions) and the parameters with their PyTorch names and layout;
//! - [`model`]: the ASA layer, the block and the language model on the CPU;
//! - [`backend`]: the ops, one function per op and direction (`backend::cpu`), mirrored by the
//!   CUDA kernels of the same names;
//! - [`checkpoint`]: safetensors load/save, legacy key names, PyTorch `.pt` import;
//! - [`optim`]: AdamW (PyTorch semantics) and global-norm clipping;
//! - [`parity`]: runs reference fixture folders and reports the worst error per case;
//! - [`bench`]: tokens/s of a training step (and the reference's), scaling runs over T;
//! - [`kernel_cost`]: the GPU step's launches, syncs, allocations and kernel resources, counted
//!   without a GPU.

// llm.c style: ops take many slices and index them in explicit loops
#![allow(
    clippy::too_many_arguments,
    clippy::needless_range_loop,
    clippy::neg_cmp_op_on_partial_ord
)]

pub mod backend;
pub mod bench;
pub mod bench_decode;
pub mod checkpoint;
pub mod config;
pub mod controls;
pub mod data;
pub mod engine;
pub mod error;
pub mod eval;
pub mod generate;
pub mod host;
pub mod infos;
pub mod kernel_cost;
pub mod model;
pub mod optim;
pub mod parity;
pub mod preflight;
pub mod probe;
pub mod recall;
pub mod smoke;
pub mod train;
pub mod vocab;

pub use error::{AsaError, Result};
