//! Compute backends. `cpu` is the reference: one function per op and direction, shapes in
//! comments. `cuda` mirrors these ops by name, kernel by kernel, and is tested against them; it
//! loads the CUDA libraries at run time, so it builds (and reports `cuda_available() == false`)
//! on machines without CUDA.

pub mod cpu;
pub mod cuda;
