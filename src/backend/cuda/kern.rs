//! The kernels' typed launch handles.
//!
//! For every `extern "C" __global__` kernel of `cuda/*.cu`, build.rs writes a function of the
//! same name here whose parameters are the kernel's, in the kernel's order, typed from its C
//! signature (`float*` -> `Dv<f32>`, `unsigned short*` -> `Dv<u16>`, `int` -> `i32`, `i64` ->
//! `i64`, ...), with its CPU twin named in its documentation. It returns the kernel's
//! [`Launch`]: its name and its erased arguments, which [`Launch::on`], [`Launch::grid`] and
//! [`Launch::walk`] hand to a [`Device`]. A launcher cannot name a kernel that does not exist,
//! nor pass its arguments in the wrong order or of the wrong type: it does not compile.
//!
//! Runs of parameters that recur across kernels are one argument: [`FusedDims`], [`Carry`],
//! [`SlotMask`] (build.rs' `GROUPS`), and `float X_value, const double* X_at` a [`Learned`].
//!
//! ```ignore
//! // float* out, const float* bias, int n, int o
//! kern::matmul_forward_bias(out, bias, n, o).on(dev, dev.cfg_elems(n * o))?;
//! ```

use cudarc::driver::LaunchConfig;

use super::{Device, Dv, KArg};
use crate::error::Result;

/// One launch of a kernel: its name and arguments, in the kernel's order (made by the handle of
/// the same name).
#[must_use = "a Launch does nothing until it is given to a device (on, grid, walk)"]
#[derive(Debug, Clone, Copy)]
pub struct Launch<const N: usize> {
    name: &'static str,
    args: [KArg; N],
}

impl<const N: usize> Launch<N> {
    fn new(name: &'static str, args: [KArg; N]) -> Self {
        Launch { name, args }
    }

    /// The kernel's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The erased arguments, in the kernel's order.
    pub fn args(&self) -> &[KArg] {
        &self.args
    }

    /// Launches on `cfg` ([`Device::launch`]).
    pub fn on<D: Device + ?Sized>(&self, dev: &D, cfg: LaunchConfig) -> Result<()> {
        dev.launch(self.name, cfg, &self.args)
    }

    /// Launches on a 1-D grid ([`Device::grid_launch`]).
    pub fn grid<D: Device + ?Sized>(
        &self,
        dev: &D,
        grid: u32,
        block: u32,
        smem: u32,
    ) -> Result<()> {
        dev.grid_launch(self.name, grid, block, smem, &self.args)
    }

    /// Launches on a 1-D grid whose blocks walk `steps` dependent iterations
    /// ([`Device::walk_launch`]: the cost model's latency term).
    pub fn walk<D: Device + ?Sized>(
        &self,
        dev: &D,
        grid: u32,
        block: u32,
        smem: u32,
        steps: usize,
    ) -> Result<()> {
        dev.walk_launch(self.name, grid, block, smem, &self.args, steps)
    }
}

/// A kernel's scalar that the host computes each step from a learned scalar parameter (the
/// content-read gamma, the refine gate; `asa_step_value` in cuda/common.cuh): by value, or at
/// `at` (nullable), [value, d value / d raw] in the step's scalar block that goes up with the
/// step's batch, where the kernel reads it: then the arguments are the same every step, so that
/// a captured step replays with the current parameter. The kernels take it as
/// `float X_value, const double* X_at`.
#[derive(Debug, Clone, Copy)]
pub struct Learned {
    pub value: f32,
    pub at: Dv<f64>,
}

impl Learned {
    /// A value passed by argument.
    pub fn value(value: f32) -> Learned {
        Learned {
            value,
            at: Dv::null(),
        }
    }

    /// The value argument: 0 where the kernel reads `at`.
    pub fn by_value(&self) -> f32 {
        step_arg(self.value, self.at)
    }
}

/// A kernel argument that the kernel reads from the step's scalar block instead where `at` is
/// given: then 0 (its default), so that the arguments do not change from step to step.
pub fn step_arg<T: Default, U>(value: T, at: Dv<U>) -> T {
    if at.is_null() {
        value
    } else {
        T::default()
    }
}

include!(concat!(env!("OUT_DIR"), "/handles.rs"));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_has_a_handle() {
        let mut kernels: Vec<String> = super::super::KERNELS
            .iter()
            .flat_map(|(_, src)| super::super::kernel_names(src))
            .collect();
        let mut handles: Vec<String> = HANDLES.iter().map(|s| s.to_string()).collect();
        kernels.sort();
        handles.sort();
        assert_eq!(kernels, handles);
    }

    #[test]
    fn a_handle_passes_its_arguments_in_the_kernels_order() {
        // float* out, const float* bias, int n, int o
        // SAFETY: never dereferenced: the addresses only travel into the arguments
        let (out, bias) = unsafe { (Dv::<f32>::from_raw(16, 15), Dv::<f32>::from_raw(32, 5)) };
        let l = matmul_forward_bias(out, bias, 3, 5);
        assert_eq!(l.name(), "matmul_forward_bias");
        match l.args() {
            [KArg::Ptr(16, 60), KArg::Ptr(32, 20), KArg::I32(3), KArg::I32(5)] => {}
            other => panic!("{other:?}"),
        }
        // a group expands in place, in its fields' order; a Learned read from the step block
        // passes 0 by value
        let d = |i: u64| unsafe { Dv::<f64>::from_raw(8 * i, 1) };
        let carry = Carry {
            cn: d(1),
            cd: d(2),
            cp: d(3),
            cpd: d(4),
        };
        let dims = FusedDims {
            nbh: 10,
            h: 11,
            t: 12,
            nk: 13,
            d: 14,
            chunk: 15,
            tile: 16,
            nsub: 17,
            ntiles: 18,
            nchunks: 19,
            group: 20,
        };
        let f = Dv::<f32>::null();
        let l = slot_scan_read_forward_carry(carry, d(5), d(6), d(7), f, dims);
        let ptrs: Vec<u64> = l.args()[..7]
            .iter()
            .map(|a| match a {
                KArg::Ptr(p, _) => *p / 8,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ptrs, [1, 2, 3, 4, 5, 6, 7]);
        let ints: Vec<i32> = l.args()[8..]
            .iter()
            .map(|a| match a {
                KArg::I32(x) => *x,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ints, (10..=20).collect::<Vec<_>>());
        let gamma = Learned {
            value: 0.5,
            at: d(9),
        };
        let l = gamma_args(gamma);
        assert!(matches!(l[0], KArg::F32(v) if v == 0.0), "{l:?}");
        assert!(matches!(l[1], KArg::Ptr(72, 8)), "{l:?}");
        let l = gamma_args(Learned::value(0.5));
        assert!(matches!(l[0], KArg::F32(v) if v == 0.5), "{l:?}");
    }

    /// The (gamma value, gamma at) arguments of `slot_scan_read_forward` with `g`.
    fn gamma_args(g: Learned) -> Vec<KArg> {
        let f = Dv::<f32>::null();
        let mask = SlotMask {
            keep: Dv::null(),
            last_pos_only: 0,
            mask_mode: 0,
        };
        let l = slot_scan_read_forward(
            f,
            f,
            f,
            f,
            f,
            f,
            f,
            f,
            f,
            f,
            f,
            f,
            Carry {
                cn: Dv::null(),
                cd: Dv::null(),
                cp: Dv::null(),
                cpd: Dv::null(),
            },
            g,
            1.0,
            mask,
            0,
            FusedDims {
                nbh: 0,
                h: 0,
                t: 0,
                nk: 0,
                d: 0,
                chunk: 0,
                tile: 0,
                nsub: 0,
                ntiles: 0,
                nchunks: 0,
                group: 0,
            },
            Dv::null(),
        );
        l.args()[16..18].to_vec()
    }
}
