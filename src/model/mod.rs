//! The ASM model: parameters, the ASA attention layer, the pre-LN block and the language model.

pub mod asa;
pub mod lm;
pub mod params;
