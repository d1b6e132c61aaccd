//! The model vocabulary, below both backends and the model: what a call of the model asks for
//! ([`options`]: routing, slot masks, interventions) and the parameters by their PyTorch names
//! with their layout and initialisation ([`params`]). It imports only the config and the errors.

pub mod options;
pub mod params;
