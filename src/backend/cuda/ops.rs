//! Launchers: one method of the [`Ops`] trait per kernel, named after (and taking the arguments
//! of) the CPU twin in `backend::cpu::ops` / `backend::cpu::slot_ops`, with device ranges (`Dv`) in
//! place of slices. `Ops` is implemented for every [`Device`]: the CUDA backend, and the SIMT
//! emulator of the tests (the same launch code runs on both). Shapes are checked like the CPU twins check them (`assert!`: a mismatch is a
//! programming error); kernel failures are `AsaError::Device`.
//!
//! Differences from the CPU signatures, all documented at the launcher:
//! - randomness: `dropout_forward` takes a seed (counter-based hash RNG) instead of an `Rng`;
//! - optional tensors are null ranges (`Dv::null()`), boolean masks are `u8` ranges;
//! - reductions to one parameter (ALiBi strength, content gamma, refine gate) finish on the
//!   device in the last block of the kernel that makes their partials (`asa_last_block`:
//!   `gate_backward`, the fused backward's keys kernel, [`KeysFinish`]), or leave an f64 sum
//!   there for `scalar_grad_add` (the op-by-op path);
//! - `slot_scan_backward` consumes its `dstate` input (overwritten with scratch values);
//! - `crossentropy_forward` leaves per-row losses on the device (`sum_f64` adds them up).

use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::driver::LaunchConfig;

pub use super::kern::{step_arg, Learned};
use super::linear::{LinearAlgo, LinearPlan};
use super::{i32_of, kern, tensor_cores, CudaBackend, Device, Dv, Precision};
use crate::error::{AsaError, Result};
use crate::vocab::dims::SlotDims;
use crate::vocab::options::ReadMask;

/// Rows per chunk of the deterministic two-stage column sums.
const COLSUM_ROWS: usize = 256;

/// How a GEMM operand is stored.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    N,
    T,
}

/// One GEMM with cuBLAS' conventions: C [m,n] = op(A) [m,k] op(B) [k,n] + beta C, column-major
/// with leading dimensions (`Device::gemm`).
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub ta: Op,
    pub tb: Op,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: Dv<f32>,
    pub lda: usize,
    pub b: Dv<f32>,
    pub ldb: usize,
    pub c: Dv<f32>,
    pub ldc: usize,
    pub beta: f32,
    /// null, or where C is written instead, rounded to bf16 (beta 0, bf16 operands): C is then
    /// an output that only bf16 GEMMs read, and `c` names the f32 range it stands for (not
    /// written)
    pub c16: Dv<u16>,
}

impl Gemm {
    /// This call as a graph request ([`super::graph`]): its shape, ranges and beta, with the
    /// operands as the BLAS library gets them (`a`, `b` after [`gemm_operands`], `bf16`) and
    /// whether f32 operands are rounded to bf16 by the library (`fast`).
    pub fn hash(&self, a: u64, b: u64, bf16: bool, fast: bool) -> u64 {
        let op = |o: Op| matches!(o, Op::T) as u64;
        super::graph::hash_words(
            4,
            &[
                op(self.ta),
                op(self.tb),
                self.m as u64,
                self.n as u64,
                self.k as u64,
                a,
                self.lda as u64,
                b,
                self.ldb as u64,
                self.c.ptr,
                self.ldc as u64,
                self.beta.to_bits() as u64,
                self.c16.ptr,
                bf16 as u64,
                fast as u64,
            ],
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        ta: Op,
        tb: Op,
        (m, n, k): (usize, usize, usize),
        (a, lda): (Dv<f32>, usize),
        (b, ldb): (Dv<f32>, usize),
        (c, ldc): (Dv<f32>, usize),
        beta: f32,
    ) -> Gemm {
        Gemm {
            ta,
            tb,
            m,
            n,
            k,
            a,
            lda,
            b,
            ldb,
            c,
            ldc,
            beta,
            c16: Dv::null(),
        }
    }

    /// C written as bf16 into `c16` (see [`Gemm::c16`]).
    fn to_bf16(mut self, c16: Dv<u16>) -> Gemm {
        assert!(
            c16.is_null() || c16.len == self.c.len,
            "GEMM: bf16 output shape"
        );
        assert!(
            c16.is_null() || self.beta == 0.0,
            "GEMM: a bf16 output is stored, not added to"
        );
        self.c16 = c16;
        self
    }
}

/// The layer prologue that [`Ops::write_logits_forward`] computes along (each optional).
#[derive(Debug, Clone, Copy, Default)]
pub struct WritePrologue {
    /// (the slot keys parameter [H,K,d], the slot keep mask [H*K]): the keys are their product
    /// (the slot dropout), stored into the `slot_keys` range for the kernels after it
    pub keys: Option<(Dv<f32>, Dv<f32>)>,
    /// (the heads' slopes [H], the learned strength's raw parameter [1] or null, the init
    /// strength, the minimum strength): the ALiBi bias per head (then `bias_h` must be null)
    pub alibi: Option<(Dv<f32>, Dv<f32>, f64, f64)>,
}

/// What [`Ops::write_logits_backward`] also finishes in the last block of its slot-key
/// partials (each optional): the slot keys parameter's gradient, += dkeys * keep per slot row
/// (the slot dropout's backward), and the learned ALiBi strength's gradient.
#[derive(Debug, Clone, Copy, Default)]
pub struct KeysFinish {
    /// (the parameter's gradient [H,K,d], the slot keep mask [H*K])
    pub param: Option<(Dv<f32>, Dv<f32>)>,
    /// the learned ALiBi strength's gradient
    pub alibi: Option<AlibiFinish>,
}

/// The learned ALiBi strength's gradient in [`KeysFinish`].
#[derive(Debug, Clone, Copy)]
pub struct AlibiFinish {
    /// [1] the strength's raw parameter's gradient
    pub grad: Dv<f32>,
    /// [H] the heads' slopes
    pub slopes: Dv<f32>,
    /// d strength / d raw, or where the kernel reads it instead (nullable: [_, factor] of the
    /// step's scalar block, as [`Learned::at`])
    pub factor: f64,
    pub at: Dv<f64>,
}

/// Slot-mask arguments of the read kernels: (keep [K] i32 or null, last_pos_only, mask_mode).
#[derive(Debug, Clone, Copy)]
pub struct DevSlotMask {
    pub keep: Dv<i32>,
    pub last_pos_only: bool,
    pub mode: ReadMask,
}

impl DevSlotMask {
    /// The (keep, last_pos_only, mask_mode) kernel argument of `m` (none: null, 0, 0).
    pub fn arg(m: Option<DevSlotMask>) -> kern::SlotMask {
        match m {
            Some(m) => kern::SlotMask {
                keep: m.keep,
                last_pos_only: m.last_pos_only as i32,
                mask_mode: match m.mode {
                    ReadMask::Read => 0,
                    ReadMask::ContentOnly => 1,
                },
            },
            None => kern::SlotMask {
                keep: Dv::null(),
                last_pos_only: 0,
                mask_mode: 0,
            },
        }
    }
}

/// Routing of `read_weights_forward` on the device (`Routing` of the CPU twin).
#[derive(Debug, Clone, Copy)]
pub enum DevRouting {
    Softmax,
    Top1,
    TopK(usize),
    External(Dv<f32>),
    Override(Dv<f32>),
}

impl DevRouting {
    fn code(&self) -> (i32, i32, Dv<f32>) {
        match *self {
            DevRouting::Softmax => (0, 0, Dv::null()),
            DevRouting::Top1 => (1, 0, Dv::null()),
            DevRouting::TopK(kk) => (2, kk.min(i32::MAX as usize) as i32, Dv::null()),
            DevRouting::External(w) => (3, 0, w),
            DevRouting::Override(w) => (4, 0, w),
        }
    }
}

/// The launchers: one method per kernel, named after its CPU twin (see the module docs), for any
/// [`Device`]: the CUDA backend, or the SIMT emulator in the tests.
pub trait Ops: Device {
    // --------------------------------------------------------------------------------------------
    // encoder

    /// out: [B,T,C]; ids: [B,T] (validated on the host); wte: [V,C]; wpe: null or [maxT,C].
    fn encoder_forward(
        &self,
        out: Dv<f32>,
        ids: Dv<u32>,
        wte: Dv<f32>,
        wpe: Dv<f32>,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        assert_eq!(out.len, b * t * c, "encoder_forward: out shape");
        assert_eq!(ids.len, b * t, "encoder_forward: ids shape");
        if c == 0 || b * t == 0 {
            return Ok(());
        }
        assert_eq!(wte.len % c, 0, "encoder_forward: wte shape");
        if !wpe.is_null() {
            assert!(
                wpe.len >= t * c,
                "encoder_forward: T={t} exceeds the position table"
            );
        }
        let v = wte.len / c;
        kern::encoder_forward(
            out,
            ids,
            wte,
            wpe,
            i32_of("B*T", b * t)?,
            i32_of("T", t)?,
            i32_of("C", c)?,
            i32_of("V", v)?,
        )
        .on(self, self.cfg_elems(b * t * c))
    }

    /// dwte [V,C] += scatter of dout [B,T,C] by `ids` (host copy); dwpe: null or [maxT,C].
    /// Deterministic: the host sorts positions by id and each (id, column) sums in position order.
    /// (Uploads the sort; the training step uploads it with its batch and calls
    /// [`Ops::encoder_backward_sorted`].)
    fn encoder_backward(
        &self,
        dwte: Dv<f32>,
        dwpe: Dv<f32>,
        dout: Dv<f32>,
        ids: &[u32],
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        assert_eq!(ids.len(), b * t, "encoder_backward: ids shape");
        if c == 0 || b * t == 0 {
            return Ok(());
        }
        let (uniq, start, order) = sort_positions_by_id(ids, dwte.len / c)?;
        let (uniq_d, start_d, order_d) = (
            self.temp_from(&uniq)?,
            self.temp_from(&start)?,
            self.temp_from(&order)?,
        );
        use super::AsDv;
        let sorted = SortedIds {
            uniq: uniq_d.dv(),
            start: start_d.dv(),
            order: order_d.dv(),
        };
        self.encoder_backward_sorted(dwte, dwpe, dout, sorted, b, t, c)
    }

    /// [`Ops::encoder_backward`] with the positions already sorted by id on the device.
    #[allow(clippy::too_many_arguments)]
    fn encoder_backward_sorted(
        &self,
        dwte: Dv<f32>,
        dwpe: Dv<f32>,
        dout: Dv<f32>,
        sorted: SortedIds,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        assert_eq!(dout.len, b * t * c, "encoder_backward: dout shape");
        assert_eq!(
            sorted.order.len,
            b * t,
            "encoder_backward: sorted ids shape"
        );
        assert_eq!(
            sorted.start.len,
            sorted.uniq.len + 1,
            "encoder_backward: run starts shape"
        );
        if c == 0 || b * t == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: (sorted.uniq.len as u32, c.div_ceil(128) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        kern::encoder_backward(
            dwte,
            dout,
            sorted.uniq,
            sorted.start,
            sorted.order,
            i32_of("ids", sorted.uniq.len)?,
            i32_of("C", c)?,
        )
        .on(self, cfg)?;
        if !dwpe.is_null() {
            assert!(
                dwpe.len >= t * c,
                "encoder_backward: T={t} exceeds the position table"
            );
            kern::encoder_backward_wpe(dwpe, dout, b as i32, t as i32, c as i32)
                .on(self, self.cfg_elems(t * c))?;
        }
        Ok(())
    }

    // --------------------------------------------------------------------------------------------
    // layernorm

    /// out, inp: [N,C]; weight, bias: [C]; mean, rstd: [N]; out16: null, or out's bf16 twin
    /// (see [`twin16`]).
    fn layernorm_forward(
        &self,
        out: Dv<f32>,
        mean: Dv<f32>,
        rstd: Dv<f32>,
        inp: Dv<f32>,
        weight: Dv<f32>,
        bias: Dv<f32>,
        n: usize,
        c: usize,
        out16: Dv<u16>,
    ) -> Result<()> {
        twin16("layernorm_forward", out, out16);
        assert_eq!(out.len, n * c, "layernorm_forward: out shape");
        assert_eq!(inp.len, n * c, "layernorm_forward: inp shape");
        assert_eq!(mean.len, n, "layernorm_forward: mean shape");
        assert_eq!(rstd.len, n, "layernorm_forward: rstd shape");
        assert_eq!(weight.len, c, "layernorm_forward: weight shape");
        assert_eq!(bias.len, c, "layernorm_forward: bias shape");
        if n == 0 || c == 0 {
            return Ok(());
        }
        kern::layernorm_forward(
            out,
            mean,
            rstd,
            inp,
            weight,
            bias,
            i32_of("N", n)?,
            i32_of("C", c)?,
            out16,
        )
        .on(self, self.cfg_warps(n)?)
    }

    /// res = a + b (+ bias_b per column; null: none) then out = LayerNorm(res) (mean, rstd,
    /// out16 as [`Ops::layernorm_forward`]): the residual step and the next norm in one pass
    /// (CPU: `residual_forward`, the bias of the GEMM that made b, `layernorm_forward`).
    /// res, out, a, b: [N,C]; bias_b, weight, bias: [C].
    fn residual_layernorm_forward(
        &self,
        (res, out, mean, rstd): (Dv<f32>, Dv<f32>, Dv<f32>, Dv<f32>),
        (a, b, bias_b): (Dv<f32>, Dv<f32>, Dv<f32>),
        weight: Dv<f32>,
        bias: Dv<f32>,
        n: usize,
        c: usize,
        out16: Dv<u16>,
    ) -> Result<()> {
        for x in [res, out, a, b] {
            assert_eq!(x.len, n * c, "residual_layernorm_forward: [N,C] shapes");
        }
        assert!(
            mean.len == n && rstd.len == n,
            "residual_layernorm_forward: [N]"
        );
        assert!(
            weight.len == c && bias.len == c,
            "residual_layernorm_forward: [C]"
        );
        assert!(
            bias_b.is_null() || bias_b.len == c,
            "residual_layernorm_forward: bias_b"
        );
        twin16("residual_layernorm_forward", out, out16);
        if n == 0 || c == 0 {
            return Ok(());
        }
        kern::residual_layernorm_forward(
            res,
            out,
            mean,
            rstd,
            a,
            b,
            bias_b,
            weight,
            bias,
            i32_of("N", n)?,
            i32_of("C", c)?,
            out16,
        )
        .on(self, self.cfg_warps(n)?)
    }

    /// dinp [N,C] += ...; dweight, dbias [C] += ... (deterministic column sums, one launch);
    /// dinp16: null, or the bf16 twin of the updated dinp.
    fn layernorm_backward(
        &self,
        dinp: Dv<f32>,
        dweight: Dv<f32>,
        dbias: Dv<f32>,
        dout: Dv<f32>,
        inp: Dv<f32>,
        weight: Dv<f32>,
        mean: Dv<f32>,
        rstd: Dv<f32>,
        n: usize,
        c: usize,
        dinp16: Dv<u16>,
    ) -> Result<()> {
        twin16("layernorm_backward", dinp, dinp16);
        assert_eq!(dinp.len, n * c, "layernorm_backward: dinp shape");
        assert_eq!(dout.len, n * c, "layernorm_backward: dout shape");
        assert_eq!(inp.len, n * c, "layernorm_backward: inp shape");
        assert_eq!(mean.len, n, "layernorm_backward: mean shape");
        assert_eq!(rstd.len, n, "layernorm_backward: rstd shape");
        assert_eq!(weight.len, c, "layernorm_backward: weight shape");
        assert_eq!(dweight.len, c, "layernorm_backward: dweight shape");
        assert_eq!(dbias.len, c, "layernorm_backward: dbias shape");
        if n == 0 || c == 0 {
            return Ok(());
        }
        let (ni, ci) = (i32_of("N", n)?, i32_of("C", c)?);
        // one launch: the parameter gradients' column-tile x row-chunk blocks (as
        // `colsum_add`'s grid, flattened), then dinp's rows, 4 a block (one warp a row)
        let (cfg, chunks) = colsum_cfg(n, c)?;
        let tiles = cfg.grid_dim.0;
        let blocks = u64::from(tiles) * chunks as u64 + n.div_ceil(4) as u64;
        let blocks = u32::try_from(blocks).map_err(|_| {
            AsaError::Device(format!("layernorm_backward of {n} rows: grid too large"))
        })?;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let pw = self.scratch64(chunks * c, false)?;
        let pb = self.scratch64(chunks * c, true)?;
        kern::layernorm_backward(
            dinp,
            dweight,
            dbias,
            pw,
            pb,
            self.tickets()?,
            dout,
            inp,
            weight,
            mean,
            rstd,
            ni,
            ci,
            COLSUM_ROWS as i32,
            tiles as i32,
            dinp16,
        )
        .on(self, cfg)
    }

    // --------------------------------------------------------------------------------------------
    // matmul (cuBLAS)

    /// nn.Linear: out[N,O] = inp[N,I] @ weight[O,I]^T (+ bias[O]; bias null = none).
    fn matmul_forward(
        &self,
        out: Dv<f32>,
        inp: Dv<f32>,
        weight: Dv<f32>,
        bias: Dv<f32>,
        n: usize,
        i: usize,
        o: usize,
    ) -> Result<()> {
        assert_eq!(out.len, n * o, "matmul_forward: out shape");
        assert_eq!(inp.len, n * i, "matmul_forward: inp shape");
        assert_eq!(weight.len, o * i, "matmul_forward: weight shape");
        if n == 0 || o == 0 {
            return Ok(());
        }
        let beta = if bias.is_null() {
            0.0
        } else {
            assert_eq!(bias.len, o, "matmul_forward: bias shape");
            kern::matmul_forward_bias(out, bias, i32_of("N", n)?, i32_of("O", o)?)
                .on(self, self.cfg_elems(n * o))?;
            1.0
        };
        // out^T [O,N] = W [O,I] (col-major view of W^T, transposed) x inp^T [I,N]
        self.gemm(&Gemm::new(
            Op::T,
            Op::N,
            (o, n, i),
            (weight, i),
            (inp, i),
            (out, o),
            beta,
        ))
    }

    /// [`Ops::matmul_forward`] without bias for an output that only bf16 GEMMs read: with
    /// `out16` (its twin; non-null only with the device's twins on, see
    /// [`Device::bf16_twins`]) cuBLAS writes the bf16 rounding of out straight into it and
    /// `out` itself is not written (no f32 output, no conversion after); else into `out`.
    fn matmul_forward_to_bf16(
        &self,
        (out, out16): (Dv<f32>, Dv<u16>),
        inp: Dv<f32>,
        weight: Dv<f32>,
        n: usize,
        i: usize,
        o: usize,
    ) -> Result<()> {
        if out16.is_null() {
            return self.matmul_forward(out, inp, weight, Dv::null(), n, i, o);
        }
        assert!(
            bf16_converted(self),
            "matmul_forward_to_bf16: bf16 GEMMs only"
        );
        assert_eq!(out.len, n * o, "matmul_forward: out shape");
        assert_eq!(inp.len, n * i, "matmul_forward: inp shape");
        assert_eq!(weight.len, o * i, "matmul_forward: weight shape");
        if n == 0 || o == 0 {
            return Ok(());
        }
        let g = Gemm::new(
            Op::T,
            Op::N,
            (o, n, i),
            (weight, i),
            (inp, i),
            (out, o),
            0.0,
        );
        self.gemm(&g.to_bf16(out16))
    }

    /// [`Ops::matmul_backward_store`] without bias for a dinp that only bf16 GEMMs read: with
    /// `dinp16` non-null (as in [`Ops::matmul_forward_to_bf16`]) dinp is written only as its
    /// bf16 rounding, into `dinp16`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward_store_to_bf16(
        &self,
        (dinp, dinp16): (Dv<f32>, Dv<u16>),
        dweight: Dv<f32>,
        dout: Dv<f32>,
        inp: Dv<f32>,
        weight: Dv<f32>,
        n: usize,
        i: usize,
        o: usize,
    ) -> Result<()> {
        if dinp16.is_null() {
            return self.matmul_backward_store(
                dinp,
                dweight,
                Dv::null(),
                dout,
                inp,
                weight,
                n,
                i,
                o,
            );
        }
        assert!(
            bf16_converted(self),
            "matmul_backward_store_to_bf16: bf16 GEMMs only"
        );
        assert_eq!(dinp.len, n * i, "matmul_backward: dinp shape");
        assert_eq!(dout.len, n * o, "matmul_backward: dout shape");
        assert_ne!(dinp.ptr, dout.ptr, "matmul_backward: dinp aliases dout");
        // dout is an operand of both
        self.with_bf16(dout, || {
            // dinp^T [I,N] = W^T [I,O] x dout^T [O,N], in bf16
            let g = Gemm::new(
                Op::N,
                Op::N,
                (i, n, o),
                (weight, i),
                (dout, o),
                (dinp, i),
                0.0,
            );
            self.gemm(&g.to_bf16(dinp16))?;
            let null = Dv::null();
            self.matmul_backward_beta(null, 1.0, dweight, null, dout, inp, weight, n, i, o)
        })
    }

    /// bf16 GEMMs: `twin`, the bf16 rounding of `x` that `x`'s producer wrote beside it, serves
    /// the GEMMs that `f` runs (null twin: [`Ops::with_bf16`], one conversion). `x` must not
    /// change inside `f`.
    fn with_bf16_twin<R>(
        &self,
        x: Dv<f32>,
        twin: Dv<u16>,
        f: impl FnOnce() -> Result<R>,
    ) -> Result<R> {
        if twin.is_null() {
            return self.with_bf16(x, f);
        }
        twin16("with_bf16_twin", x, twin);
        self.push_bf16_held(x, twin);
        let r = f();
        self.pop_bf16_held();
        r
    }

    /// bf16 GEMMs: `x` rounded to bf16 once for the GEMMs that `f` runs, which read it from
    /// there instead of converting it each (one input of several projections; the output
    /// gradient of a linear layer's two backward GEMMs). `x` must not change inside `f`.
    fn with_bf16<R>(&self, x: Dv<f32>, f: impl FnOnce() -> Result<R>) -> Result<R> {
        if !bf16_converted(self) || x.len == 0 || self.bf16_copy_of(x).is_some() {
            return f();
        }
        use super::AsDv;
        let copy = self.temp_uninit::<u16>(x.len)?;
        self.convert_f32_bf16(copy.dv(), x)?;
        self.push_bf16_held(x, copy.dv());
        let r = f();
        self.pop_bf16_held();
        r
    }

    /// dinp[N,I] += dout[N,O] @ weight[O,I]; dweight[O,I] += dout^T @ inp; dbias[O] += column
    /// sums of dout (f64, deterministic; null = none). dinp may be null (not needed).
    fn matmul_backward(
        &self,
        dinp: Dv<f32>,
        dweight: Dv<f32>,
        dbias: Dv<f32>,
        dout: Dv<f32>,
        inp: Dv<f32>,
        weight: Dv<f32>,
        n: usize,
        i: usize,
        o: usize,
    ) -> Result<()> {
        let dinp_beta = 1.0;
        self.matmul_backward_beta(dinp, dinp_beta, dweight, dbias, dout, inp, weight, n, i, o)
    }

    /// [`Ops::matmul_backward`] with dinp stored (=) instead of added to: a fresh dinp needs no
    /// memset.
    fn matmul_backward_store(
        &self,
        dinp: Dv<f32>,
        dweight: Dv<f32>,
        dbias: Dv<f32>,
        dout: Dv<f32>,
        inp: Dv<f32>,
        weight: Dv<f32>,
        n: usize,
        i: usize,
        o: usize,
    ) -> Result<()> {
        self.matmul_backward_beta(dinp, 0.0, dweight, dbias, dout, inp, weight, n, i, o)
    }

    /// dinp = dinp_beta * dinp + dout @ weight; the rest as [`Ops::matmul_backward`].
    fn matmul_backward_beta(
        &self,
        dinp: Dv<f32>,
        dinp_beta: f32,
        dweight: Dv<f32>,
        dbias: Dv<f32>,
        dout: Dv<f32>,
        inp: Dv<f32>,
        weight: Dv<f32>,
        n: usize,
        i: usize,
        o: usize,
    ) -> Result<()> {
        assert!(
            dinp.is_null() || dinp.len == n * i,
            "matmul_backward: dinp shape"
        );
        assert_eq!(dweight.len, o * i, "matmul_backward: dweight shape");
        assert_eq!(dout.len, n * o, "matmul_backward: dout shape");
        assert_eq!(inp.len, n * i, "matmul_backward: inp shape");
        assert_eq!(weight.len, o * i, "matmul_backward: weight shape");
        let gemms = || {
            if !dinp.is_null() {
                // dinp^T [I,N] (+)= W^T [I,O] x dout^T [O,N]
                self.gemm(&Gemm::new(
                    Op::N,
                    Op::N,
                    (i, n, o),
                    (weight, i),
                    (dout, o),
                    (dinp, i),
                    dinp_beta,
                ))?;
            }
            // dW^T [I,O] += inp^T [I,N] x dout [N,O]
            self.gemm(&Gemm::new(
                Op::N,
                Op::T,
                (i, o, n),
                (inp, i),
                (dout, o),
                (dweight, i),
                1.0,
            ))
        };
        if dinp.is_null() {
            gemms()?;
        } else {
            assert_ne!(dinp.ptr, dout.ptr, "matmul_backward: dinp aliases dout");
            // dout is an operand of both
            self.with_bf16(dout, gemms)?;
        }
        if !dbias.is_null() {
            assert_eq!(dbias.len, o, "matmul_backward: dbias shape");
            self.colsum_add(dbias, dout, n, o)?;
        }
        Ok(())
    }

    /// dst[C] += column sums of x [N,C] (f64, fixed order).
    fn colsum_add(&self, dst: Dv<f32>, x: Dv<f32>, n: usize, c: usize) -> Result<()> {
        if n == 0 || c == 0 {
            return Ok(());
        }
        let (cfg, chunks) = colsum_cfg(n, c)?;
        let part = self.scratch64(chunks * c, false)?;
        let (ni, ci) = (i32_of("N", n)?, i32_of("C", c)?);
        kern::colsum_add(dst, part, self.tickets()?, x, ni, ci, COLSUM_ROWS as i32).on(self, cfg)
    }

    // --------------------------------------------------------------------------------------------
    // elementwise

    /// Exact GELU. out, inp: [N]; out16: null, or out's bf16 twin.
    fn gelu_forward(&self, out: Dv<f32>, inp: Dv<f32>, out16: Dv<u16>) -> Result<()> {
        assert_eq!(out.len, inp.len, "gelu_forward: shape");
        twin16("gelu_forward", out, out16);
        kern::gelu_forward(out, inp, inp.len as i64, out16).on(self, self.cfg_elems(inp.len))
    }

    /// h [rows,cols] += bias [cols] (in place), out = gelu(h): the bias of the GEMM that made h
    /// and the GELU in one pass (CPU: `matmul_forward`'s bias, `gelu_forward`); out16: null,
    /// or out's bf16 twin.
    fn bias_gelu_forward(
        &self,
        out: Dv<f32>,
        h: Dv<f32>,
        bias: Dv<f32>,
        rows: usize,
        cols: usize,
        out16: Dv<u16>,
    ) -> Result<()> {
        assert!(
            out.len == rows * cols && h.len == out.len,
            "bias_gelu_forward: shapes"
        );
        assert_eq!(bias.len, cols, "bias_gelu_forward: bias shape");
        twin16("bias_gelu_forward", out, out16);
        kern::bias_gelu_forward(
            out,
            h,
            bias,
            i32_of("rows", rows)?,
            i32_of("cols", cols)?,
            out16,
        )
        .on(self, self.cfg_rows(rows))
    }

    /// dinp = dout * gelu'(inp) (stored: the CPU twin's += into zeros), dinp16: null or its
    /// bf16 twin; dbias: null, or [C] += the column sums of dinp [N,C] (the bias gradient of
    /// the GEMM that made inp, in the same pass: `gelu_backward_colsum`, one launch with its
    /// reduction). `(dbias2, x2)`: nulls, or dbias2 [C2] += the column sums of x2 [N,C2] (the
    /// next GEMM's bias gradient, an independent job that joins the same launch).
    fn gelu_backward(
        &self,
        dinp: Dv<f32>,
        inp: Dv<f32>,
        dout: Dv<f32>,
        dinp16: Dv<u16>,
        dbias: Dv<f32>,
        (dbias2, x2): (Dv<f32>, Dv<f32>),
    ) -> Result<()> {
        assert_eq!(dinp.len, inp.len, "gelu_backward: shape");
        assert_eq!(dout.len, inp.len, "gelu_backward: shape");
        twin16("gelu_backward", dinp, dinp16);
        assert_eq!(
            dbias2.is_null(),
            x2.is_null(),
            "gelu_backward: dbias2 without x2"
        );
        if dbias.is_null() {
            kern::gelu_backward(dinp, inp, dout, inp.len as i64, dinp16)
                .on(self, self.cfg_elems(inp.len))?;
            if !dbias2.is_null() {
                let c2 = dbias2.len;
                assert!(
                    c2 > 0 && x2.len.is_multiple_of(c2),
                    "gelu_backward: dbias2 shape"
                );
                self.colsum_add(dbias2, x2, x2.len / c2, c2)?;
            }
            return Ok(());
        }
        let c = dbias.len;
        assert!(
            c > 0 && inp.len.is_multiple_of(c),
            "gelu_backward: dbias shape"
        );
        let n = inp.len / c;
        if n == 0 {
            return Ok(());
        }
        let (mut cfg, chunks) = colsum_cfg(n, c)?;
        let part = self.scratch64(chunks * c, false)?;
        let (c2, part2) = if dbias2.is_null() {
            (0, Dv::null())
        } else {
            let c2 = dbias2.len;
            assert_eq!(x2.len, n * c2, "gelu_backward: x2 shape");
            let (cfg2, _) = colsum_cfg(n, c2)?;
            cfg.grid_dim.0 += cfg2.grid_dim.0;
            if cfg.grid_dim.0 as usize > super::TICKETS {
                return Err(AsaError::Device(format!(
                    "gelu_backward: {} column tiles exceed the tickets",
                    cfg.grid_dim.0
                )));
            }
            (c2, self.scratch64(chunks * c2, true)?)
        };
        kern::gelu_backward_colsum(
            dinp,
            dbias,
            part,
            self.tickets()?,
            inp,
            dout,
            i32_of("N", n)?,
            i32_of("C", c)?,
            COLSUM_ROWS as i32,
            dinp16,
            dbias2,
            part2,
            x2,
            i32_of("C2", c2)?,
        )
        .on(self, cfg)
    }

    /// Inverted dropout with probability p; mask = 0 or 1/(1-p). The draw of element i is a hash
    /// of (seed, i) (see `cuda/common.cuh`): reproducible per seed, not the CPU's ChaCha8 stream.
    /// The seed is read at `seed_at` (one u64 on the device) where that is not null.
    fn dropout_forward(
        &self,
        out: Dv<f32>,
        mask: Dv<f32>,
        inp: Dv<f32>,
        p: f32,
        (seed, seed_at): (u64, Dv<u64>),
    ) -> Result<()> {
        assert_eq!(out.len, inp.len, "dropout_forward: out shape");
        assert_eq!(mask.len, inp.len, "dropout_forward: mask shape");
        assert!(
            seed_at.is_null() || seed_at.len == 1,
            "dropout_forward: one seed"
        );
        let scale = if p > 0.0 && p < 1.0 {
            (1.0 / (1.0 - p as f64)) as f32
        } else {
            1.0
        };
        kern::dropout_forward(
            out,
            mask,
            inp,
            p,
            scale,
            step_arg(seed, seed_at),
            seed_at,
            inp.len as i64,
        )
        .on(self, self.cfg_elems(inp.len))
    }

    /// dinp += dout * mask.
    fn dropout_backward(&self, dinp: Dv<f32>, dout: Dv<f32>, mask: Dv<f32>) -> Result<()> {
        assert_eq!(dinp.len, dout.len, "dropout_backward: shape");
        assert_eq!(mask.len, dout.len, "dropout_backward: shape");
        kern::dropout_backward(dinp, dout, mask, dout.len as i64).on(self, self.cfg_elems(dout.len))
    }

    /// out = a + b.
    fn residual_forward(&self, out: Dv<f32>, a: Dv<f32>, b: Dv<f32>) -> Result<()> {
        assert_eq!(out.len, a.len, "residual_forward: shape");
        assert_eq!(out.len, b.len, "residual_forward: shape");
        kern::residual_forward(out, a, b, out.len as i64).on(self, self.cfg_elems(out.len))
    }

    /// y += alpha * x.
    fn axpy(&self, y: Dv<f32>, x: Dv<f32>, alpha: f32) -> Result<()> {
        assert_eq!(y.len, x.len, "axpy: shape");
        kern::axpy(y, x, alpha, x.len as i64).on(self, self.cfg_elems(x.len))
    }

    /// y = (f32)(alpha * x) in f64.
    fn scale_f64(&self, y: Dv<f32>, x: Dv<f32>, alpha: f64) -> Result<()> {
        assert_eq!(y.len, x.len, "scale_f64: shape");
        kern::scale_f64(y, x, alpha, x.len as i64).on(self, self.cfg_elems(x.len))
    }

    /// x = value.
    fn fill(&self, x: Dv<f32>, value: f32) -> Result<()> {
        kern::fill(x, value, x.len as i64).on(self, self.cfg_elems(x.len))
    }

    // --------------------------------------------------------------------------------------------
    // deterministic reductions

    fn partial_blocks(n: usize) -> usize {
        n.div_ceil(256).clamp(1, 1024)
    }

    /// The backward of y = x + gate * delta in one launch: ddelta = (f32)(gate * dy) (stored)
    /// and dgrad[0] += (f32)(factor * sum(dy * delta)) (f64, fixed order); factor is d gate /
    /// d(its raw parameter). dy, delta, ddelta: [N]; dgrad: [1].
    #[allow(clippy::too_many_arguments)]
    fn gate_backward(
        &self,
        ddelta: Dv<f32>,
        dgrad: Dv<f32>,
        dy: Dv<f32>,
        delta: Dv<f32>,
        gate: f64,
        factor: f64,
    ) -> Result<()> {
        assert_eq!(dy.len, delta.len, "gate_backward: delta shape");
        assert_eq!(dy.len, ddelta.len, "gate_backward: ddelta shape");
        assert_eq!(dgrad.len, 1, "gate_backward: dgrad shape");
        let nb = Self::partial_blocks(dy.len);
        let part = self.scratch64(nb, true)?;
        let cfg = partial_cfg(nb);
        kern::gate_backward(
            ddelta,
            dgrad,
            part,
            self.tickets()?,
            dy,
            delta,
            gate,
            factor,
            dy.len as i64,
        )
        .on(self, cfg)
    }

    /// `split_heads` of merged [B,T,H*d] into out_h [B,H,T,d] and [`Ops::gate_backward`] on it
    /// (dy = out_h) in one pass: ddelta [B,H,T,d] = gate * out_h (stored), dgrad[0] +=
    /// (f32)(factor * sum(out_h * delta)) (f64, fixed order). `(gate, factor, at)`: the
    /// host's values, or with `at` (non-null: [gate, factor] of the step's scalar block, as
    /// [`Learned::at`]) read there.
    #[allow(clippy::too_many_arguments)]
    fn gate_backward_split(
        &self,
        ddelta: Dv<f32>,
        dgrad: Dv<f32>,
        out_h: Dv<f32>,
        merged: Dv<f32>,
        delta: Dv<f32>,
        (gate, factor, at): (f64, f64, Dv<f64>),
        (b, t, h, d): (usize, usize, usize, usize),
    ) -> Result<()> {
        let n = b * t * h * d;
        assert_eq!(merged.len, n, "gate_backward_split: merged shape");
        assert_eq!(out_h.len, n, "gate_backward_split: out_h shape");
        assert_eq!(delta.len, n, "gate_backward_split: delta shape");
        assert_eq!(ddelta.len, n, "gate_backward_split: ddelta shape");
        assert_eq!(dgrad.len, 1, "gate_backward_split: dgrad shape");
        if n == 0 {
            return Ok(());
        }
        let (gate, factor) = (step_arg(gate, at), step_arg(factor, at));
        // a block per row (b, t) as split_heads, at most 1,024 (grid-stride): one partial each
        let nb = (b * t).min(1024);
        let part = self.scratch64(nb, true)?;
        let cfg = partial_cfg(nb);
        kern::gate_backward_split(
            ddelta,
            dgrad,
            part,
            self.tickets()?,
            out_h,
            merged,
            delta,
            gate,
            factor,
            i32_of("B", b)?,
            i32_of("T", t)?,
            i32_of("H", h)?,
            i32_of("d", d)?,
            at,
        )
        .on(self, cfg)
    }

    /// out[0] = sum of part (fixed order), or its square root.
    fn sum_f64(&self, out: Dv<f64>, part: Dv<f64>, sqrt: bool) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        kern::sum_f64(out, part, part.len as i64, sqrt as i32).on(self, cfg)
    }

    /// dst[0] += (f32)(src[0] * factor).
    fn scalar_grad_add(&self, dst: Dv<f32>, src: Dv<f64>, factor: f64) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        kern::scalar_grad_add(dst, src, factor).on(self, cfg)
    }

    /// out[0] = sqrt(sum of x^2) (f64, fixed order): `optim::global_norm` over a flat buffer.
    fn global_norm(&self, out: Dv<f64>, x: Dv<f32>) -> Result<()> {
        let nb = Self::partial_blocks(x.len);
        let part = self.scratch64(nb, true)?;
        let cfg = partial_cfg(nb);
        kern::global_norm(part, x, x.len as i64).on(self, cfg)?;
        self.sum_f64(out, part, true)
    }

    /// `clip_grad_norm` with the norm already on the device: x *= max_norm/(norm+1e-6) if < 1.
    fn clip_scale(&self, x: Dv<f32>, norm: Dv<f64>, max_norm: f64) -> Result<()> {
        kern::clip_scale(x, norm, max_norm, x.len as i64).on(self, self.cfg_elems(x.len))
    }

    /// AdamW over flat buffers (see `optim::AdamW::step`); `step` is the step count after
    /// incrementing. Scalars are computed here exactly as the CPU computes them
    /// ([`adamw_step_scalars`]); with `at` (nullable) the kernel reads this step's from there
    /// instead (the step's scalar block: its arguments stay the same from step to step). Nothing
    /// is updated when a value of `guard` (the step's loss sums and gradient norm; may be null)
    /// is not finite.
    #[allow(clippy::too_many_arguments)]
    fn adamw_update(
        &self,
        p: Dv<f32>,
        m: Dv<f32>,
        v: Dv<f32>,
        g: Dv<f32>,
        cfg: &crate::config::AdamWConfig,
        lr: f64,
        step: u64,
        guard: Dv<f64>,
        p16: Dv<u16>,
        at: Dv<f64>,
    ) -> Result<()> {
        assert!(
            p.len == m.len && p.len == v.len && p.len == g.len,
            "adamw_update: shapes"
        );
        twin16("adamw_update", p, p16);
        let lerp_w = (1.0 - cfg.beta1) as f32;
        let beta2 = cfg.beta2 as f32;
        let one_minus_beta2 = (1.0 - cfg.beta2) as f32;
        let eps = cfg.eps as f32;
        // the scalars of this step: by value, or read at `at`
        assert!(at.is_null() || at.len >= 3, "adamw_update: at shape");
        let [decay, neg_step_size, bc2_sqrt] = step_arg(adamw_step_scalars(cfg, lr, step), at);
        kern::adamw_update(
            p,
            m,
            v,
            g,
            decay,
            lerp_w,
            beta2,
            one_minus_beta2,
            neg_step_size,
            bc2_sqrt,
            eps,
            guard,
            guard.len as i32,
            p.len as i64,
            p16,
            at,
        )
        .on(self, self.cfg_elems(p.len))
    }

    // --------------------------------------------------------------------------------------------
    // cross-entropy

    /// probs [N,V] = softmax(logits) (probs may be the logits range: in place); row_loss [N]
    /// (f64, device) = logsumexp - logit[target] on counted rows (valid != 0, 0 <= target < V),
    /// else 0. The host validates targets and counts rows (see `count_targets`).
    fn crossentropy_forward(
        &self,
        probs: Dv<f32>,
        row_loss: Dv<f64>,
        logits: Dv<f32>,
        targets: Dv<i64>,
        valid: Dv<u8>,
        n: usize,
        v: usize,
    ) -> Result<()> {
        assert_eq!(probs.len, n * v, "crossentropy_forward: probs shape");
        crossentropy_launch(self, probs, row_loss, logits, targets, valid, (n, v), None)
    }

    /// The classifier's loss and its gradient in one pass (`crossentropy_forward`, then
    /// `crossentropy_backward` in place): row_loss as `crossentropy_forward`; logits [N,V] is
    /// overwritten by dlogits = scale * (probs - onehot) on counted rows, 0 on the others;
    /// dlogits16: null, or its bf16 twin.
    #[allow(clippy::too_many_arguments)]
    fn crossentropy_forward_backward(
        &self,
        logits: Dv<f32>,
        row_loss: Dv<f64>,
        targets: Dv<i64>,
        valid: Dv<u8>,
        scale: f32,
        n: usize,
        v: usize,
        dlogits16: Dv<u16>,
    ) -> Result<()> {
        twin16("crossentropy_forward_backward", logits, dlogits16);
        let grad = Some((scale, dlogits16));
        crossentropy_launch(self, logits, row_loss, logits, targets, valid, (n, v), grad)
    }

    /// dlogits [N,V] (+)= scale * (probs - onehot) on counted rows; `inplace`: dlogits may be the
    /// probs range and is overwritten (0 on uncounted rows); dlogits16: null, or the bf16 twin
    /// of the result.
    fn crossentropy_backward(
        &self,
        dlogits: Dv<f32>,
        probs: Dv<f32>,
        targets: Dv<i64>,
        valid: Dv<u8>,
        scale: f32,
        n: usize,
        v: usize,
        inplace: bool,
        dlogits16: Dv<u16>,
    ) -> Result<()> {
        twin16("crossentropy_backward", dlogits, dlogits16);
        assert_eq!(dlogits.len, n * v, "crossentropy_backward: dlogits shape");
        assert_eq!(probs.len, n * v, "crossentropy_backward: probs shape");
        assert_eq!(targets.len, n, "crossentropy_backward: targets shape");
        kern::crossentropy_backward(
            dlogits,
            probs,
            targets,
            valid,
            scale,
            i32_of("N", n)?,
            i32_of("V", v)?,
            inplace as i32,
            dlogits16,
        )
        .on(self, self.cfg_elems(n * v))
    }

    // --------------------------------------------------------------------------------------------
    // ASA ops

    /// The launch shape of `rope_forward` / `rope_backward` (`rope_walk` in cuda/common.cuh).
    fn rope_cfg(&self, n: usize, t: usize, d: usize) -> LaunchConfig {
        super::refine::pair_cfg(self.max_grid(), n, t, d)
    }

    /// out = x*cos + rotate_half(x)*sin. out, inp: [N,T,D]; cos, sin: [T,D].
    fn rope_forward(
        &self,
        out: Dv<f32>,
        inp: Dv<f32>,
        cos: Dv<f32>,
        sin: Dv<f32>,
        n: usize,
        t: usize,
        d: usize,
    ) -> Result<()> {
        assert_eq!(inp.len, n * t * d, "rope_forward: shape");
        assert_eq!(out.len, inp.len, "rope_forward: shape");
        assert!(
            cos.len >= t * d && sin.len >= t * d,
            "rope_forward: table shape"
        );
        kern::rope_forward(
            out,
            inp,
            cos,
            sin,
            i32_of("N", n)?,
            i32_of("T", t)?,
            i32_of("D", d)?,
        )
        .on(self, self.rope_cfg(n, t, d))
    }

    /// dinp += J^T dout. dinp, dout: [N,T,D].
    fn rope_backward(
        &self,
        dinp: Dv<f32>,
        dout: Dv<f32>,
        cos: Dv<f32>,
        sin: Dv<f32>,
        n: usize,
        t: usize,
        d: usize,
    ) -> Result<()> {
        assert_eq!(dout.len, n * t * d, "rope_backward: shape");
        assert_eq!(dinp.len, dout.len, "rope_backward: shape");
        assert!(
            cos.len >= t * d && sin.len >= t * d,
            "rope_backward: table shape"
        );
        kern::rope_backward(
            dinp,
            dout,
            cos,
            sin,
            i32_of("N", n)?,
            i32_of("T", t)?,
            i32_of("D", d)?,
        )
        .on(self, self.rope_cfg(n, t, d))
    }

    /// out: [B,H,T,d] <- inp: [B,T,H*d]
    fn split_heads(
        &self,
        out: Dv<f32>,
        inp: Dv<f32>,
        b: usize,
        t: usize,
        h: usize,
        d: usize,
    ) -> Result<()> {
        assert_eq!(out.len, b * t * h * d, "split_heads: shape");
        assert_eq!(inp.len, out.len, "split_heads: shape");
        kern::split_heads(out, inp, b as i32, i32_of("T", t)?, h as i32, d as i32)
            .on(self, self.cfg_rows(b * t))
    }

    /// out: [B,T,H*d] += inp: [B,H,T,d] (`merge_heads_acc` of the CPU).
    /// The three heads layouts of a fused QKV projection: inp [B,T,3C] (k | v | q per row) ->
    /// outs[i] [B,H,T,d] (CPU: `split_heads` of each third).
    #[allow(clippy::too_many_arguments)]
    fn split_heads3(
        &self,
        outs: [Dv<f32>; 3],
        inp: Dv<f32>,
        b: usize,
        t: usize,
        h: usize,
        d: usize,
        rope: Option<(Dv<f32>, Dv<f32>)>,
    ) -> Result<()> {
        for o in outs {
            assert_eq!(o.len, b * t * h * d, "split_heads3: shape");
        }
        assert_eq!(inp.len, 3 * b * t * h * d, "split_heads3: shape");
        let (cos, sin) = rope3("split_heads3", rope, t, d);
        let [o0, o1, o2] = outs;
        kern::split_heads3(
            o0,
            o1,
            o2,
            inp,
            b as i32,
            i32_of("T", t)?,
            h as i32,
            d as i32,
            cos,
            sin,
        )
        .on(self, self.cfg_rows(b * t))
    }

    /// out [B,T,3C] (=) <- ins[i] [B,H,T,d] merged side by side (the fused QKV projection's
    /// output gradient; CPU: `merge_heads_acc` of each into a zero third); out16: null, or
    /// out's bf16 twin.
    #[allow(clippy::too_many_arguments)]
    fn merge_heads3(
        &self,
        out: Dv<f32>,
        ins: [Dv<f32>; 3],
        b: usize,
        t: usize,
        h: usize,
        d: usize,
        out16: Dv<u16>,
        rope: Option<(Dv<f32>, Dv<f32>)>,
    ) -> Result<()> {
        twin16("merge_heads3", out, out16);
        let (cos, sin) = rope3("merge_heads3", rope, t, d);
        for x in ins {
            assert_eq!(x.len, b * t * h * d, "merge_heads3: shape");
        }
        assert_eq!(out.len, 3 * b * t * h * d, "merge_heads3: shape");
        let [i0, i1, i2] = ins;
        kern::merge_heads3(
            out,
            i0,
            i1,
            i2,
            b as i32,
            i32_of("T", t)?,
            h as i32,
            d as i32,
            out16,
            cos,
            sin,
        )
        .on(self, self.cfg_rows(b * t))
    }

    /// out [B,T,C] = inp [B,H,T,d] (stored; CPU twin: `merge_heads`); out16:
    /// null, or out's bf16 twin.
    fn merge_heads(
        &self,
        out: Dv<f32>,
        inp: Dv<f32>,
        b: usize,
        t: usize,
        h: usize,
        d: usize,
        out16: Dv<u16>,
    ) -> Result<()> {
        twin16("merge_heads", out, out16);
        assert_eq!(out.len, b * t * h * d, "merge_heads: shape");
        assert_eq!(inp.len, out.len, "merge_heads: shape");
        kern::merge_heads(
            out,
            inp,
            b as i32,
            i32_of("T", t)?,
            h as i32,
            d as i32,
            out16,
        )
        .on(self, self.cfg_rows(b * t))
    }

    /// F.normalize(x, dim=-1, eps=1e-8). out, inp: [rows,d]; norm: [rows].
    fn l2normalize_forward(
        &self,
        out: Dv<f32>,
        norm: Dv<f32>,
        inp: Dv<f32>,
        d: usize,
    ) -> Result<()> {
        let rows = inp.len / d.max(1);
        assert_eq!(out.len, inp.len, "l2normalize_forward: shape");
        assert_eq!(norm.len, rows, "l2normalize_forward: norm shape");
        kern::l2normalize_forward(out, norm, inp, i32_of("rows", rows)?, d as i32)
            .on(self, self.cfg_warps(rows)?)
    }

    fn l2normalize_backward(
        &self,
        dinp: Dv<f32>,
        dout: Dv<f32>,
        out: Dv<f32>,
        norm: Dv<f32>,
        d: usize,
    ) -> Result<()> {
        let rows = dout.len / d.max(1);
        assert_eq!(dinp.len, dout.len, "l2normalize_backward: shape");
        assert_eq!(norm.len, rows, "l2normalize_backward: norm shape");
        kern::l2normalize_backward(dinp, dout, out, norm, i32_of("rows", rows)?, d as i32)
            .on(self, self.cfg_warps(rows)?)
    }

    /// raw, wl: [B,H,K,T]; slot_keys: [H,K,d]; k: [B,H,T,d]; bias_h: null or [H]; valid: null or [B,T].
    fn write_logits_forward(
        &self,
        raw: Dv<f32>,
        wl: Dv<f32>,
        slot_keys: Dv<f32>,
        kk: Dv<f32>,
        wtemp: f32,
        bias_h: Dv<f32>,
        valid: Dv<u8>,
        dm: SlotDims,
        prologue: WritePrologue,
    ) -> Result<()> {
        let SlotDims { b, h, t, k: nk, d } = dm;
        assert_eq!(raw.len, b * h * nk * t, "write_logits_forward: raw shape");
        let (kparam, keep) = prologue.keys.unwrap_or((Dv::null(), Dv::null()));
        if !kparam.is_null() {
            assert_eq!(kparam.len, h * nk * d, "write_logits_forward: param shape");
            assert_eq!(keep.len, h * nk, "write_logits_forward: keep shape");
        }
        let (slopes, araw, init, min) =
            prologue.alibi.unwrap_or((Dv::null(), Dv::null(), 0.0, 0.0));
        if !slopes.is_null() {
            assert!(bias_h.is_null(), "write_logits_forward: two biases");
            assert_eq!(slopes.len, h, "write_logits_forward: slopes shape");
        }
        assert_eq!(wl.len, raw.len, "write_logits_forward: wl shape");
        assert_eq!(
            slot_keys.len,
            h * nk * d,
            "write_logits_forward: keys shape"
        );
        assert_eq!(kk.len, b * h * t * d, "write_logits_forward: k shape");
        // a block per (b, h, tile of positions), the tile's rows in shared memory (<= 48 KiB)
        let tile = if 64 * (d + 1) * 4 <= super::SMEM_DEFAULT {
            64
        } else {
            32
        };
        let blocks = u32::try_from(b * h * t.div_ceil(tile))
            .map_err(|_| AsaError::Device("write_logits_forward: too many blocks".into()))?;
        kern::write_logits_forward(
            raw,
            wl,
            slot_keys,
            kk,
            wtemp,
            bias_h,
            valid,
            b as i32,
            h as i32,
            i32_of("T", t)?,
            nk as i32,
            d as i32,
            tile as i32,
            kparam,
            keep,
            slopes,
            araw,
            init,
            min,
        )
        .grid(self, blocks, 256, (tile * (d + 1) * 4) as u32)
    }

    /// Backward of `write_logits_forward`: dslot_keys [H,K,d] +=, dk [B,H,T,d] +=, and, when
    /// `pbias` is non-null, the per-(b,h,s) sums `sum_t dwl * t` (f64 [B,H,K]); `finish`: the
    /// parameter gradients its last block also adds (the slot keys', the ALiBi strength's).
    fn write_logits_backward(
        &self,
        dslot_keys: Dv<f32>,
        dk: Dv<f32>,
        pbias: Dv<f64>,
        dwl: Dv<f32>,
        slot_keys: Dv<f32>,
        kk: Dv<f32>,
        wtemp: f32,
        valid: Dv<u8>,
        dm: SlotDims,
        finish: KeysFinish,
    ) -> Result<()> {
        let SlotDims { b, h, t, k: nk, d } = dm;
        assert_eq!(dwl.len, b * h * nk * t, "write_logits_backward: dwl shape");
        assert_eq!(dk.len, b * h * t * d, "write_logits_backward: dk shape");
        assert_eq!(
            dslot_keys.len,
            h * nk * d,
            "write_logits_backward: dkeys shape"
        );
        assert!(
            pbias.is_null() || pbias.len == b * h * nk,
            "write_logits_backward: pbias shape"
        );
        let (bi, hi, ti, ki, di) = (b as i32, h as i32, i32_of("T", t)?, nk as i32, d as i32);
        kern::write_logits_backward(dk, dwl, slot_keys, wtemp, valid, bi, hi, ti, ki, di)
            .on(self, self.cfg_elems(dk.len))?;
        let pkeys = self.scratch64(b * h * nk * d, false)?;
        let (dparam, keep) = finish.param.unwrap_or((Dv::null(), Dv::null()));
        if !dparam.is_null() {
            assert_eq!(
                dparam.len,
                h * nk * d,
                "write_logits_backward: dparam shape"
            );
            assert_eq!(keep.len, h * nk, "write_logits_backward: keep shape");
        }
        let null = Dv::null();
        let (dalibi, slopes, factor, at) = match finish.alibi {
            Some(a) => (a.grad, a.slopes, a.factor, a.at),
            None => (null, null, 0.0, Dv::null()),
        };
        let factor = step_arg(factor, at);
        if !dalibi.is_null() {
            assert!(
                !pbias.is_null(),
                "write_logits_backward: ALiBi without pbias"
            );
            assert_eq!(slopes.len, h, "write_logits_backward: slopes shape");
        }
        // the last block's finish (`wl_keys_finish`): dkeys += the batches' partials, then
        // the slot keys parameter's and the ALiBi strength's gradients
        let tickets = self.tickets()?;
        let keys_kernel = |bf16: bool| {
            let f = if bf16 {
                kern::write_logits_backward_keys_bf16
            } else {
                kern::write_logits_backward_keys
            };
            f(
                pkeys, pbias, dwl, kk, wtemp, valid, bi, hi, ti, ki, di, tickets, dslot_keys,
                dparam, keep, dalibi, slopes, factor, at,
            )
        };
        let (kp, dp) = (nk.div_ceil(16) * 16, d.div_ceil(16) * 16);
        // tensor cores: a block per (b, h) walks T in chunks of 64 (each warp's output tiles,
        // at most four, in registers); WK_CHUNK, WK_TILES of the kernel
        let smem = 4 * (kp * 65 + 64 * (dp + 1));
        if tensor_cores(self) && kp * dp <= 4 * 8 * 128 && smem <= self.max_smem() {
            keys_kernel(true).walk(self, (b * h) as u32, 256, smem as u32, t.div_ceil(64))?;
        } else {
            // a thread per (b, h, slot, dim) walks T, four positions at a time
            let c = self.cfg_elems(pkeys.len);
            keys_kernel(false).walk(self, c.grid_dim.0, c.block_dim.0, 0, t.div_ceil(4))?;
        }
        Ok(())
    }

    /// The write scan. state: [B,H,T,K,d]; den, rmax: [B,H,K,T]; wl: [B,H,K,T]; v: [B,H,T,d].
    fn slot_scan_forward(
        &self,
        state: Dv<f32>,
        den: Dv<f32>,
        rmax: Dv<f32>,
        wl: Dv<f32>,
        v: Dv<f32>,
        chunk: usize,
        dm: SlotDims,
    ) -> Result<()> {
        let SlotDims { t, k: nk, d, .. } = dm;
        let nbh = dm.bh();
        check_head_dim(d)?;
        assert_eq!(
            state.len,
            nbh * t * nk * d,
            "slot_scan_forward: state shape"
        );
        assert_eq!(den.len, nbh * nk * t, "slot_scan_forward: den shape");
        assert_eq!(rmax.len, den.len, "slot_scan_forward: rmax shape");
        assert_eq!(wl.len, den.len, "slot_scan_forward: wl shape");
        assert_eq!(v.len, nbh * t * d, "slot_scan_forward: v shape");
        let chunk = chunk.max(1).min(t.max(1));
        kern::slot_scan_forward(
            state,
            den,
            rmax,
            wl,
            v,
            i32_of("chunk", chunk)?,
            i32_of("B*H", nbh)?,
            i32_of("T", t)?,
            nk as i32,
            d as i32,
        )
        .on(self, self.cfg_warps_small(nbh * nk)?)
    }

    /// Backward of the write scan: dwl [B,H,K,T] +=, dv [B,H,T,d] +=. `dstate` [B,H,T,K,d] is
    /// consumed (overwritten with the numerator gradients).
    fn slot_scan_backward(
        &self,
        dwl: Dv<f32>,
        dv: Dv<f32>,
        dstate: Dv<f32>,
        state: Dv<f32>,
        den: Dv<f32>,
        rmax: Dv<f32>,
        wl: Dv<f32>,
        v: Dv<f32>,
        chunk: usize,
        dm: SlotDims,
    ) -> Result<()> {
        let SlotDims { t, k: nk, d, .. } = dm;
        let nbh = dm.bh();
        check_head_dim(d)?;
        assert_eq!(
            dstate.len,
            nbh * t * nk * d,
            "slot_scan_backward: dstate shape"
        );
        assert_eq!(state.len, dstate.len, "slot_scan_backward: state shape");
        assert_eq!(dwl.len, nbh * nk * t, "slot_scan_backward: dwl shape");
        assert_eq!(dv.len, nbh * t * d, "slot_scan_backward: dv shape");
        let chunk = chunk.max(1).min(t.max(1));
        let cm = self.temp::<f32>(nbh * nk * t)?;
        let cidx = self.temp::<i32>(nbh * nk * t)?;
        use super::AsDv;
        let (ci, ni, ti) = (
            i32_of("chunk", chunk)?,
            i32_of("B*H", nbh)?,
            i32_of("T", t)?,
        );
        let (cm, cidx) = (cm.dv(), cidx.dv());
        kern::slot_scan_backward(
            dwl, dstate, cm, cidx, state, den, rmax, wl, v, ci, ni, ti, nk as i32, d as i32,
        )
        .on(self, self.cfg_warps_small(nbh * nk)?)?;
        kern::slot_scan_backward_dv(
            dv, dstate, wl, rmax, nbh as i32, t as i32, nk as i32, d as i32,
        )
        .on(self, self.cfg_elems(dv.len))
    }

    /// lkey, lcont (null: no content read), logits: [B,H,T,K]; q: [B,H,T,d]; slot_keys: [H,K,d];
    /// state: [B,H,T,K,d].
    fn read_logits_forward(
        &self,
        lkey: Dv<f32>,
        lcont: Dv<f32>,
        logits: Dv<f32>,
        q: Dv<f32>,
        slot_keys: Dv<f32>,
        state: Dv<f32>,
        gamma: f32,
        mask: Option<DevSlotMask>,
        dm: SlotDims,
    ) -> Result<()> {
        let SlotDims { h, t, k: nk, d, .. } = dm;
        let nbh = dm.bh();
        assert_eq!(lkey.len, nbh * t * nk, "read_logits_forward: lkey shape");
        assert_eq!(logits.len, lkey.len, "read_logits_forward: logits shape");
        assert!(
            lcont.is_null() || lcont.len == lkey.len,
            "read_logits_forward: lcont shape"
        );
        assert_eq!(q.len, nbh * t * d, "read_logits_forward: q shape");
        assert_eq!(
            state.len,
            nbh * t * nk * d,
            "read_logits_forward: state shape"
        );
        let (ni, ti) = (i32_of("B*H", nbh)?, i32_of("T", t)?);
        let mask = DevSlotMask::arg(mask);
        kern::read_logits_forward(
            lkey, lcont, logits, q, slot_keys, state, gamma, mask, ni, h as i32, ti, nk as i32,
            d as i32,
        )
        .on(self, self.cfg_warps(nbh * t * nk)?)
    }

    /// Backward of `read_logits_forward`: dq [B,H,T,d] +=, dslot_keys [H,K,d] +=, dstate (null
    /// without content read) +=; d(gamma) = sum dlogits*lcont is left in `dgamma[0]` (device f64).
    fn read_logits_backward(
        &self,
        dq: Dv<f32>,
        dslot_keys: Dv<f32>,
        dstate: Dv<f32>,
        dgamma: Dv<f64>,
        dlogits: Dv<f32>,
        lcont: Dv<f32>,
        q: Dv<f32>,
        slot_keys: Dv<f32>,
        state: Dv<f32>,
        gamma: f32,
        mask: Option<DevSlotMask>,
        dm: SlotDims,
    ) -> Result<()> {
        let SlotDims { b, h, t, k: nk, d } = dm;
        let nbh = dm.bh();
        check_head_dim(d)?;
        assert_eq!(
            dlogits.len,
            nbh * t * nk,
            "read_logits_backward: dlogits shape"
        );
        assert_eq!(dq.len, nbh * t * d, "read_logits_backward: dq shape");
        assert_eq!(
            dslot_keys.len,
            h * nk * d,
            "read_logits_backward: dkeys shape"
        );
        let content = !dstate.is_null() && !lcont.is_null();
        let pg = if content && !dgamma.is_null() {
            self.temp::<f64>(nbh * t)?
        } else {
            self.temp::<f64>(1)?
        };
        use super::AsDv;
        let pgd = if content && !dgamma.is_null() {
            pg.dv()
        } else {
            Dv::null()
        };
        let (ni, ti) = (i32_of("B*H", nbh)?, i32_of("T", t)?);
        let mask = DevSlotMask::arg(mask);
        let dstate = if content { dstate } else { Dv::null() };
        kern::read_logits_backward(
            dq, dstate, pgd, dlogits, lcont, q, slot_keys, state, gamma, mask, ni, h as i32, ti,
            nk as i32, d as i32,
        )
        .on(self, self.cfg_warps(nbh * t)?)?;
        if !pgd.is_null() {
            self.sum_f64(dgamma, pgd, false)?;
        } else if !dgamma.is_null() {
            self.memset_zero(dgamma.sub(0, 1))?;
        }
        let pkeys = self.scratch64(nbh * nk * d, false)?;
        kern::read_logits_backward_keys(pkeys, dlogits, q, mask, ni, ti, nk as i32, d as i32)
            .on(self, self.cfg_elems(pkeys.len))?;
        kern::sum_batch_add(dslot_keys, pkeys, b as i32, (h * nk * d) as i64)
            .on(self, self.cfg_elems(h * nk * d))
    }

    /// rw = routing(logits), then the hard read mask (keep: null or [K] i32) with renormalisation.
    fn read_weights_forward(
        &self,
        rw: Dv<f32>,
        logits: Dv<f32>,
        routing: DevRouting,
        rtemp: f32,
        keep: Option<(Dv<i32>, bool)>,
        dm: SlotDims,
    ) -> Result<()> {
        let SlotDims { t, k: nk, .. } = dm;
        let rows = dm.bh() * t;
        assert_eq!(rw.len, rows * nk, "read_weights_forward: rw shape");
        assert_eq!(logits.len, rw.len, "read_weights_forward: logits shape");
        let (code, kk, ext) = routing.code();
        if code >= 3 {
            assert_eq!(ext.len, rw.len, "read_weights_forward: override shape");
        }
        let (kp, lpo) = keep
            .map(|(kp, l)| (kp, l as i32))
            .unwrap_or((Dv::null(), 0));
        kern::read_weights_forward(
            rw,
            logits,
            ext,
            code,
            kk,
            rtemp,
            kp,
            lpo,
            i32_of("rows", rows)?,
            i32_of("T", t)?,
            nk as i32,
        )
        .on(self, self.cfg_elems(rows))
    }

    /// Backward of `read_weights_forward` to the logits (softmax and topk; other routings carry
    /// no gradient and launch nothing).
    fn read_weights_backward(
        &self,
        dlogits: Dv<f32>,
        drw: Dv<f32>,
        rw: Dv<f32>,
        logits: Dv<f32>,
        routing: DevRouting,
        rtemp: f32,
        keep: Option<(Dv<i32>, bool)>,
        dm: SlotDims,
    ) -> Result<()> {
        let SlotDims { t, k: nk, .. } = dm;
        let rows = dm.bh() * t;
        let (code, kk, _) = routing.code();
        if code != 0 && code != 2 {
            return Ok(());
        }
        check_slots(nk)?;
        assert_eq!(dlogits.len, rows * nk, "read_weights_backward: shape");
        assert_eq!(drw.len, dlogits.len, "read_weights_backward: shape");
        let (kp, lpo) = keep
            .map(|(kp, l)| (kp, l as i32))
            .unwrap_or((Dv::null(), 0));
        kern::read_weights_backward(
            dlogits,
            drw,
            rw,
            logits,
            code,
            kk,
            rtemp,
            kp,
            lpo,
            i32_of("rows", rows)?,
            i32_of("T", t)?,
            nk as i32,
        )
        .on(self, self.cfg_elems(rows))
    }

    /// out [R,d] = sum_k w [R,K] * state [R,K,d].
    fn slot_mix_forward(
        &self,
        out: Dv<f32>,
        w: Dv<f32>,
        state: Dv<f32>,
        dm: SlotDims,
    ) -> Result<()> {
        let rows = dm.bh() * dm.t;
        assert_eq!(out.len, rows * dm.d, "slot_mix_forward: out shape");
        assert_eq!(w.len, rows * dm.k, "slot_mix_forward: w shape");
        assert_eq!(
            state.len,
            rows * dm.k * dm.d,
            "slot_mix_forward: state shape"
        );
        kern::slot_mix_forward(out, w, state, rows as i64, dm.k as i32, dm.d as i32)
            .on(self, self.cfg_elems(out.len))
    }

    /// dw += dout . state; dstate += w * dout.
    fn slot_mix_backward(
        &self,
        dw: Dv<f32>,
        dstate: Dv<f32>,
        dout: Dv<f32>,
        w: Dv<f32>,
        state: Dv<f32>,
        dm: SlotDims,
    ) -> Result<()> {
        let rows = dm.bh() * dm.t;
        assert_eq!(dw.len, rows * dm.k, "slot_mix_backward: dw shape");
        assert_eq!(
            dstate.len,
            rows * dm.k * dm.d,
            "slot_mix_backward: dstate shape"
        );
        assert_eq!(dout.len, rows * dm.d, "slot_mix_backward: dout shape");
        kern::slot_mix_backward(
            dw,
            dstate,
            dout,
            w,
            state,
            rows as i64,
            dm.k as i32,
            dm.d as i32,
        )
        .on(self, self.cfg_warps(rows * dm.k)?)
    }

    /// dst [n] = src [n] rounded to bf16 (nearest even; the bits as u16): the bf16 GEMMs'
    /// inputs.
    fn convert_f32_bf16(&self, dst: Dv<u16>, src: Dv<f32>) -> Result<()> {
        assert!(dst.len >= src.len, "convert_f32_bf16: dst too short");
        kern::convert_f32_bf16(dst, src, src.len as i64)
            .on(self, self.cfg_elems(src.len.div_ceil(4)))
    }

    /// f64 elements of the carries that [`Ops::linear_attn_forward`] can keep for its backward
    /// (0: a one-chunk plan has none), for n sequences of t positions of width m.
    fn linear_attn_carries(
        &self,
        n: usize,
        t: usize,
        m: usize,
        algo: Option<LinearAlgo>,
    ) -> Result<usize> {
        Ok(LinearPlan::for_device(self, n, t, m, algo)?.ws_forward())
    }

    /// Causal linear attention (`linear_attn_forward` of the CPU twin): out [N,T,M], den [N,T]
    /// from qf, kf, v [N,T,M] by `algo` (see [`super::linear`]; `None`: [`LinearAlgo::choose`]).
    /// keep: null, or [`Ops::linear_attn_carries`] f64s where the forward leaves its carries
    /// for the backward (which then does not recompute them). out16: null, or out's bf16 twin.
    #[allow(clippy::too_many_arguments)]
    fn linear_attn_forward(
        &self,
        out: Dv<f32>,
        den: Dv<f32>,
        qf: Dv<f32>,
        kf: Dv<f32>,
        v: Dv<f32>,
        t: usize,
        m: usize,
        algo: Option<LinearAlgo>,
        keep: Dv<f64>,
        out16: Dv<u16>,
    ) -> Result<()> {
        check_slotspace_dim(m)?;
        let n = out.len / (t * m).max(1);
        assert_eq!(out.len, n * t * m, "linear_attn_forward: shape");
        assert_eq!(den.len, n * t, "linear_attn_forward: den shape");
        assert!(
            qf.len == out.len && kf.len == out.len && v.len == out.len,
            "linear_attn_forward: shapes"
        );
        let plan = LinearPlan::for_device(self, n, t, m, algo)?;
        super::linear::forward_scratch(self, &plan, keep, [out, den, qf, kf, v], out16)
    }

    /// Backward of `linear_attn_forward` (dqf, dkf, dv +=), any `algo`; kept: what the forward
    /// kept (null: the carries are recomputed).
    #[allow(clippy::too_many_arguments)]
    fn linear_attn_backward(
        &self,
        dqf: Dv<f32>,
        dkf: Dv<f32>,
        dv: Dv<f32>,
        dout: Dv<f32>,
        out: Dv<f32>,
        den: Dv<f32>,
        qf: Dv<f32>,
        kf: Dv<f32>,
        v: Dv<f32>,
        t: usize,
        m: usize,
        algo: Option<LinearAlgo>,
        kept: Dv<f64>,
    ) -> Result<()> {
        check_slotspace_dim(m)?;
        let n = out.len / (t * m).max(1);
        assert_eq!(out.len, n * t * m, "linear_attn_backward: shape");
        assert!(
            dqf.len == out.len && dkf.len == out.len && dv.len == out.len && dout.len == out.len,
            "linear_attn_backward: shapes"
        );
        assert_eq!(den.len, n * t, "linear_attn_backward: den shape");
        let plan = LinearPlan::for_device(self, n, t, m, algo)?;
        let io = [dqf, dkf, dv, dout, out, den, qf, kf, v];
        super::linear::backward_scratch(self, &plan, kept, io)
    }

    fn tanh_forward(&self, out: Dv<f32>, inp: Dv<f32>) -> Result<()> {
        assert_eq!(out.len, inp.len, "tanh_forward: shape");
        kern::tanh_forward(out, inp, inp.len as i64).on(self, self.cfg_elems(inp.len))
    }

    /// dinp += dout * (1 - out^2); dinp16: null, or the bf16 twin of the updated dinp.
    fn tanh_backward(
        &self,
        dinp: Dv<f32>,
        out: Dv<f32>,
        dout: Dv<f32>,
        dinp16: Dv<u16>,
    ) -> Result<()> {
        assert!(
            dinp.len == out.len && dout.len == out.len,
            "tanh_backward: shape"
        );
        twin16("tanh_backward", dinp, dinp16);
        kern::tanh_backward(dinp, out, dout, out.len as i64, dinp16)
            .on(self, self.cfg_elems(out.len))
    }

    /// softmax over rows of k. out, inp: [R,k].
    fn softmax_slots_forward(&self, out: Dv<f32>, inp: Dv<f32>, nk: usize) -> Result<()> {
        assert_eq!(out.len, inp.len, "softmax_slots_forward: shape");
        let rows = inp.len / nk.max(1);
        kern::softmax_slots_forward(out, inp, rows as i64, nk as i32).on(self, self.cfg_elems(rows))
    }

    fn softmax_slots_backward(
        &self,
        dinp: Dv<f32>,
        out: Dv<f32>,
        dout: Dv<f32>,
        nk: usize,
    ) -> Result<()> {
        assert_eq!(dinp.len, out.len, "softmax_slots_backward: shape");
        let rows = out.len / nk.max(1);
        kern::softmax_slots_backward(dinp, out, dout, rows as i64, nk as i32)
            .on(self, self.cfg_elems(rows))
    }

    /// Slot mask on the slotspace weights (in place); pre receives the weights before masking.
    fn slot_mask_weights_forward(
        &self,
        w: Dv<f32>,
        pre: Dv<f32>,
        keep: Dv<i32>,
        last_pos_only: bool,
        renorm: bool,
        dm: SlotDims,
    ) -> Result<()> {
        let rows = dm.bh() * dm.t;
        assert_eq!(w.len, rows * dm.k, "slot_mask_weights_forward: shape");
        assert_eq!(pre.len, w.len, "slot_mask_weights_forward: shape");
        kern::slot_mask_weights_forward(
            w,
            pre,
            keep,
            last_pos_only as i32,
            renorm as i32,
            rows as i64,
            i32_of("T", dm.t)?,
            dm.k as i32,
        )
        .on(self, self.cfg_elems(rows))
    }

    fn slot_mask_weights_backward(
        &self,
        dpre: Dv<f32>,
        dw: Dv<f32>,
        out: Dv<f32>,
        pre: Dv<f32>,
        keep: Dv<i32>,
        last_pos_only: bool,
        renorm: bool,
        dm: SlotDims,
    ) -> Result<()> {
        let rows = dm.bh() * dm.t;
        assert_eq!(dpre.len, rows * dm.k, "slot_mask_weights_backward: shape");
        kern::slot_mask_weights_backward(
            dpre,
            dw,
            out,
            pre,
            keep,
            last_pos_only as i32,
            renorm as i32,
            rows as i64,
            i32_of("T", dm.t)?,
            dm.k as i32,
        )
        .on(self, self.cfg_elems(rows))
    }
}

impl Ops for CudaBackend {}

/// The RoPE tables of split_heads3 / merge_heads3's first third (null: none); d must be even.
fn rope3(op: &str, rope: Option<(Dv<f32>, Dv<f32>)>, t: usize, d: usize) -> (Dv<f32>, Dv<f32>) {
    match rope {
        Some((cos, sin)) => {
            assert!(d.is_multiple_of(2), "{op}: RoPE of an odd head_dim {d}");
            assert!(cos.len >= t * d && sin.len >= t * d, "{op}: table shape");
            (cos, sin)
        }
        None => (Dv::null(), Dv::null()),
    }
}

/// The launch of the single-launch column sums (`colsum_add`, `layernorm_backward_params`):
/// 128 columns by [`COLSUM_ROWS`] rows a block, one arrival ticket per column tile; and the
/// number of row chunks.
/// `crossentropy_forward` (a block of 512 threads a row), with `grad` = (scale, the bf16
/// twin) its gradient in place of the probabilities.
#[allow(clippy::too_many_arguments)]
fn crossentropy_launch<D: Ops + ?Sized>(
    dev: &D,
    probs: Dv<f32>,
    row_loss: Dv<f64>,
    logits: Dv<f32>,
    targets: Dv<i64>,
    valid: Dv<u8>,
    (n, v): (usize, usize),
    grad: Option<(f32, Dv<u16>)>,
) -> Result<()> {
    assert_eq!(logits.len, n * v, "crossentropy_forward: logits shape");
    assert_eq!(targets.len, n, "crossentropy_forward: targets shape");
    assert!(row_loss.len >= n, "crossentropy_forward: row_loss shape");
    if n == 0 || v == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig {
        grid_dim: (i32_of("rows", n)? as u32, 1, 1),
        block_dim: (512, 1, 1),
        shared_mem_bytes: 0,
    };
    let (scale, out16) = grad.unwrap_or((0.0, Dv::null()));
    kern::crossentropy_forward(
        probs,
        row_loss,
        logits,
        targets,
        valid,
        n as i32,
        i32_of("V", v)?,
        grad.is_some() as i32,
        scale,
        out16,
    )
    .on(dev, cfg)
}

/// `nb` blocks of 256 threads, one f64 partial each: the launch of the reductions whose
/// partials `sum_f64` or their last block adds (`global_norm`, `gate_backward*`).
fn partial_cfg(nb: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (nb as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn colsum_cfg(n: usize, c: usize) -> Result<(LaunchConfig, usize)> {
    let (tiles, chunks) = (c.div_ceil(128), n.div_ceil(COLSUM_ROWS));
    if tiles > super::TICKETS || chunks > 65535 {
        return Err(AsaError::Device(format!(
            "column sums of [{n},{c}]: more than {} column tiles or 65,535 row chunks",
            super::TICKETS
        )));
    }
    let cfg = LaunchConfig {
        grid_dim: (tiles as u32, chunks as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    Ok((cfg, chunks))
}

fn check_head_dim(d: usize) -> Result<()> {
    if d == 0 || d > 256 {
        return Err(AsaError::Device(format!(
            "head_dim {d} is not supported by the CUDA scan kernels (1..=256)"
        )));
    }
    Ok(())
}

fn check_slotspace_dim(m: usize) -> Result<()> {
    if m == 0 || m > 128 {
        return Err(AsaError::Device(format!(
            "slotspace_dim {m} is not supported by the CUDA linear attention (1..=128)"
        )));
    }
    Ok(())
}

fn check_slots(nk: usize) -> Result<()> {
    if nk == 0 || nk > 128 {
        return Err(AsaError::Device(format!(
            "num_slots {nk} is not supported by the CUDA routing kernels (1..=128)"
        )));
    }
    Ok(())
}

/// Token positions sorted by id, on the device ([`sort_positions_by_id`]'s three vectors): the
/// distinct ids [U], where each id's run starts in `order` [U+1], the positions in id order
/// [B*T]. For [`Ops::encoder_backward_sorted`].
#[derive(Debug, Clone, Copy)]
pub struct SortedIds {
    pub uniq: Dv<i32>,
    pub start: Dv<i32>,
    pub order: Dv<i32>,
}

/// Counting sort of token positions by id: (distinct ids ascending, start offsets [n+1],
/// positions grouped by id, ascending within each id).
pub fn sort_positions_by_id(ids: &[u32], v: usize) -> Result<(Vec<i32>, Vec<i32>, Vec<i32>)> {
    let mut count = vec![0usize; v];
    for &id in ids {
        let id = id as usize;
        if id >= v {
            return Err(AsaError::Input(format!(
                "token id {id} out of range for vocab {v}"
            )));
        }
        count[id] += 1;
    }
    let mut uniq = Vec::new();
    let mut start = vec![0i32];
    let mut slot = vec![usize::MAX; v];
    for (id, &c) in count.iter().enumerate() {
        if c > 0 {
            slot[id] = uniq.len();
            uniq.push(id as i32);
            start.push(start.last().unwrap() + c as i32);
        }
    }
    let mut fill: Vec<i32> = start[..uniq.len()].to_vec();
    let mut order = vec![0i32; ids.len()];
    for (pos, &id) in ids.iter().enumerate() {
        let u = slot[id as usize];
        order[fill[u] as usize] = pos as i32;
        fill[u] += 1;
    }
    Ok((uniq, start, order))
}

/// Checks that a producer's bf16 twin `out16` (null: none) covers its f32 output `out`. A twin
/// holds the round-to-nearest-even bf16 of every element the producer writes, exactly what
/// `convert_f32_bf16` would make of it, so that the bf16 GEMMs reading `out` read the twin
/// instead of converting (issue 11: activations produced in bf16 by the kernels that make them).
fn twin16(op: &str, out: Dv<f32>, out16: Dv<u16>) {
    assert!(
        out16.is_null() || out16.len >= out.len,
        "{op}: bf16 twin shorter than its output"
    );
}

/// Row-major GEMM through cuBLAS' column-major interface:
/// C[m,n] (col-major, ldc) = op(A) op(B) + beta*C, f32 accumulation. With `Precision::Bf16`
/// A and B are first rounded to bf16 (a weight: read from the model's bf16 copy of them,
/// [`Device::set_bf16_copy`]; anything else: converted into scratch) and multiplied with f32
/// accumulation.
/// Environment switch of the bf16 GEMMs: `cublas` hands cuBLAS the f32 inputs with
/// `CUBLAS_COMPUTE_32F_FAST_16BF` (it rounds them to bf16 itself); `convert` (the default)
/// rounds them with `convert_f32_bf16` into scratch first. Both: bf16 products, f32 sums.
pub const BF16_GEMM_ENV: &str = "ASA_CUDA_BF16_GEMM";

fn bf16_in_cublas() -> bool {
    static IN_CUBLAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *IN_CUBLAS.get_or_init(|| match std::env::var(BF16_GEMM_ENV) {
        Ok(v) if v.trim().eq_ignore_ascii_case("cublas") => true,
        Ok(v) if !v.trim().is_empty() && !v.trim().eq_ignore_ascii_case("convert") => {
            eprintln!("warning: {BF16_GEMM_ENV}='{v}' is neither cublas nor convert; converting");
            false
        }
        _ => false,
    })
}

/// Whether `be`'s GEMMs take bf16 operands converted by us (`Precision::Bf16`, unless cuBLAS
/// rounds the f32 inputs itself): then a bf16 copy of the weights saves their conversions.
pub fn bf16_converted<D: Device + ?Sized>(be: &D) -> bool {
    be.precision() == Precision::Bf16 && !bf16_in_cublas()
}

/// The A and B operands one GEMM call hands cuBLAS, prepared as on every device (cuBLAS, and
/// the counting device of `cost`): None when there is nothing to multiply (an empty output; an
/// empty sum, which zeroes C when beta is 0); else their pointers and whether they were
/// converted to bf16 in scratch (`Precision::Bf16`, unless cuBLAS rounds the f32 inputs itself).
/// Public for devices outside the crate (the SIMT emulator of the tests).
/// The AdamW scalars that change from step to step, [decay, -step size, sqrt(bias correction 2)]
/// as `adamw_update` takes them (computed in f64, cast to f32 as PyTorch does) for step `step`
/// (1-based) at learning rate `lr`.
pub fn adamw_step_scalars(cfg: &crate::config::AdamWConfig, lr: f64, step: u64) -> [f32; 3] {
    let step = step as f64;
    let bc1 = 1.0 - cfg.beta1.powf(step);
    let bc2 = 1.0 - cfg.beta2.powf(step);
    [
        (1.0 - lr * cfg.weight_decay) as f32,
        (-(lr / bc1)) as f32,
        bc2.sqrt() as f32,
    ]
}

pub fn gemm_operands<D: Ops>(be: &D, g: &Gemm) -> Result<Option<(u64, u64, bool)>> {
    if g.m == 0 || g.n == 0 {
        return Ok(None);
    }
    if g.k == 0 {
        if g.beta == 0.0 {
            be.memset_zero(g.c)?;
        }
        return Ok(None);
    }
    if bf16_converted(be) {
        // the weights' bf16 copy where an operand is a weight, else a conversion into scratch
        let operand = |x: Dv<f32>, second: bool| -> Result<u64> {
            if let Some(c) = be.bf16_copy_of(x) {
                return Ok(c.ptr);
            }
            let s = be.scratch_bf16(x.len, second)?;
            be.convert_f32_bf16(s, x)?;
            Ok(s.ptr)
        };
        return Ok(Some((operand(g.a, false)?, operand(g.b, true)?, true)));
    }
    Ok(Some((g.a.ptr, g.b.ptr, false)))
}

pub(crate) fn cublas_gemm(be: &CudaBackend, g: &Gemm) -> Result<()> {
    let Gemm {
        ta,
        tb,
        m,
        n,
        k: kk,
        lda,
        ldb,
        c,
        ldc,
        beta,
        ..
    } = *g;
    let Some((aptr, bptr, converted)) = gemm_operands(be, g)? else {
        return Ok(());
    };
    // C in f32, or (bf16 operands) rounded to bf16 into c16
    let (cptr, ctype) = if g.c16.is_null() {
        (c.ptr, cudaDataType_t::CUDA_R_32F)
    } else {
        assert!(converted, "cuBLAS GEMM: a bf16 output needs bf16 operands");
        (g.c16.ptr, cudaDataType_t::CUDA_R_16BF)
    };
    let op = |o: Op| match o {
        Op::N => cublasOperation_t::CUBLAS_OP_N,
        Op::T => cublasOperation_t::CUBLAS_OP_T,
    };
    let alpha = 1.0f32;
    let (mi, ni, ki) = (
        i32_of("GEMM m", m)?,
        i32_of("GEMM n", n)?,
        i32_of("GEMM k", kk)?,
    );
    let (ldai, ldbi, ldci) = (
        i32_of("lda", lda)?,
        i32_of("ldb", ldb)?,
        i32_of("ldc", ldc)?,
    );
    let (dtype, compute) = match (be.precision.get(), converted) {
        (_, true) => (
            cudaDataType_t::CUDA_R_16BF,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
        ),
        // cuBLAS rounds the f32 inputs to bf16 itself (tensor cores, f32 accumulation)
        (Precision::Bf16, false) => (
            cudaDataType_t::CUDA_R_32F,
            cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF,
        ),
        (Precision::F32, false) => (
            cudaDataType_t::CUDA_R_32F,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
        ),
    };
    let fast = matches!(compute, cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF);
    let h = || g.hash(aptr, bptr, converted, fast);
    if be.graph.note(h) == super::graph::Issue::Skip {
        return Ok(());
    }
    let t0 = be.profile_start()?;
    // SAFETY: the ranges are live device memory of the right sizes (checked by the callers);
    // alpha/beta are host scalars (cuBLAS' default pointer mode).
    let r = unsafe {
        cudarc::cublas::result::gemm_ex(
            *be.blas.handle(),
            op(ta),
            op(tb),
            mi,
            ni,
            ki,
            (&alpha) as *const f32 as *const _,
            aptr as *const _,
            dtype,
            ldai,
            bptr as *const _,
            dtype,
            ldbi,
            (&beta) as *const f32 as *const _,
            cptr as *mut _,
            ctype,
            ldci,
            compute,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| AsaError::Device(format!("cuBLAS GEMM {m}x{n}x{kk}: {e:?}")));
    r?;
    if t0.is_some() {
        // profiling: booked per shape (transposes, m x n x k)
        let name = format!("cublas_gemm {ta:?}{tb:?} {m}x{n}x{kk}");
        be.profile_end(&name, t0)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_sorted_by_id() {
        let (u, s, o) = sort_positions_by_id(&[3, 1, 3, 0, 1], 5).unwrap();
        assert_eq!(u, vec![0, 1, 3]);
        assert_eq!(s, vec![0, 1, 3, 5]);
        assert_eq!(o, vec![3, 1, 4, 0, 2]);
        assert!(sort_positions_by_id(&[5], 5).is_err());
    }
}
