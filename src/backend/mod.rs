//! Compute backends. `cpu` is the reference: one function per op and direction, shapes in
//! comments. The CUDA backend (a later milestone) mirrors these ops by name, kernel by kernel,
//! and is tested against them.

pub mod cpu;
