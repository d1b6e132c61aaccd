//! Device memory for tests (upload, zeroed buffers, download), beside the device's launchers, so
//! that one test body runs on a GPU (tests/cuda_ops.rs) and in the SIMT emulator
//! (tests/cuda_emu.rs).

#![allow(dead_code)]

use asa::backend::cuda::{Dv, Precision};

pub use asa::backend::cuda::Elem;

pub trait TestDev {
    /// A new buffer holding `x` (kept alive as long as the device).
    fn put<T: Elem>(&self, x: &[T]) -> Dv<T>;
    /// A new zeroed buffer of `n` elements.
    fn zeroed<T: Elem>(&self, n: usize) -> Dv<T> {
        self.put(&vec![T::default(); n])
    }
    /// The contents of a buffer.
    fn get<T: Elem>(&self, x: Dv<T>) -> Vec<T>;
    /// Sets the GEMM input precision; false (and nothing set) where the device has only f32 (the
    /// emulator).
    fn try_precision(&self, _p: Precision) -> bool {
        false
    }
}
