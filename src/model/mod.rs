//! The ASM model: parameters, the ASA attention layer, the pre-LN block and the language model.

pub mod decode;
pub mod layer;
pub mod lm;
pub mod params;
