//! The model vocabulary, below both backends and the model: what a call of the model asks for
//! ([`options`]: routing, slot masks, interventions) and the parameters by their PyTorch names
//! with their layout and initialisation ([`params`]), and what the CPU ops and the GPU kernels
//! share: dimensions and constants ([`dims`]), the ALiBi slopes and RoPE tables
//! ([`positions`]). It imports only the config and the errors.

pub mod dims;
pub mod info;
pub mod options;
pub mod params;
pub mod positions;
