//! A device for tests: memory (upload, zeroed buffers, download) plus kernel launches, so one
//! test body runs on a GPU (tests/cuda_ops.rs) and in the SIMT emulator (tests/cuda_emu.rs).

#![allow(dead_code)]

use asa::backend::cuda::{Dv, GridLaunch};
use cudarc::driver::{DeviceRepr, ValidAsZeroBits};

/// Element types of test buffers.
pub trait Elem: DeviceRepr + ValidAsZeroBits + Copy + Default + 'static {}
impl<T: DeviceRepr + ValidAsZeroBits + Copy + Default + 'static> Elem for T {}

pub trait TestDev: GridLaunch {
    /// A new buffer holding `x` (kept alive as long as the device).
    fn put<T: Elem>(&mut self, x: &[T]) -> Dv<T>;
    /// A new zeroed buffer of `n` elements.
    fn zeroed<T: Elem>(&mut self, n: usize) -> Dv<T> {
        self.put(&vec![T::default(); n])
    }
    /// The contents of a buffer.
    fn get<T: Elem>(&self, x: Dv<T>) -> Vec<T>;
}
