//! Dimensions and constants that the CPU ops and the GPU kernels share.

/// Denominator floor of the reference (`clamp_min(1e-8)`).
pub const DEN_EPS: f32 = 1e-8;

/// Dimensions shared by the slot ops.
#[derive(Debug, Clone, Copy)]
pub struct SlotDims {
    pub b: usize,
    pub h: usize,
    pub t: usize,
    pub k: usize,
    pub d: usize,
}

impl SlotDims {
    pub fn bh(&self) -> usize {
        self.b * self.h
    }
}
