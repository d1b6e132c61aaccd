//! CPU reference ops. Each op has a `_forward` and a `_backward`; backward functions accumulate
//! (`+=`) into their gradient outputs so that a tensor used twice gets both contributions.

pub mod asa;
pub mod ops;
