//! The parameters (now in the model vocabulary, [`crate::vocab::params`]), re-exported here
//! where they were defined before.

pub use crate::vocab::params::*;
