//! The GPU language model: `model::lm::Lm`'s forward, loss and backward, `AdamW::step` and
//! `clip_grad_norm`, composed from the CUDA launchers and `super::layer` in the order the CPU
//! composes them (the comments name the CPU steps); the step's batch upload, its one read-back,
//! and the step as one body that a CUDA graph captures and replays (`super::graph`).
//!
//! Side by side with `model/lm.rs`, in the same order: `new`, `set_intervention`, `reseed`,
//! `rng_mut` (both check their ids with `ModelConfig::check_ids`), then the forward (`Lm::forward` is `upload_batch` +
//! `forward_body`), the loss (`Lm::loss`: `head_loss`), the backward (`Lm::backward`:
//! `backward_body`), and after them what the CPU leaves to `optim` and `engine`: the AdamW
//! update (`begin_update`, `update_body`, `finish_update`) and the steps that compose them.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::ops::SortedIds;
use super::{AsDv, Backend, CudaBackend, Dv, Temp};
use crate::config::AdamWConfig;
use crate::config::ModelConfig;
use crate::config::Precision;
use crate::error::{AsaError, Result};
use crate::vocab::options::{AsaOptions, Info, Intervention};
use crate::vocab::params::{LmIds, ParamId, ParamStore};

use super::layer::*;

#[derive(Default)]
struct GpuBlockCache {
    ln1: DBuf,
    ln1_16: Twin,
    ln1_mean: DBuf,
    ln1_rstd: DBuf,
    attn: GpuAsaCache,
    attn_out: DBuf,
    x1: DBuf,
    ln2: DBuf,
    ln2_16: Twin,
    ln2_mean: DBuf,
    ln2_rstd: DBuf,
    h: DBuf,
    g: DBuf,
    g16: Twin,
    gd: DBuf,
    gmask: DBuf,
    m: DBuf,
    md: DBuf,
    mmask: DBuf,
    dropped: bool,
}

impl GpuBlockCache {
    fn ln1_bufs(&mut self) -> NormBufs<'_> {
        (
            &mut self.ln1,
            &mut self.ln1_16,
            &mut self.ln1_mean,
            &mut self.ln1_rstd,
        )
    }
    fn ln2_bufs(&mut self) -> NormBufs<'_> {
        (
            &mut self.ln2,
            &mut self.ln2_16,
            &mut self.ln2_mean,
            &mut self.ln2_rstd,
        )
    }
}

/// One call's batch on the device, uploaded as one queued copy (no host sync): token ids
/// [B*T], targets [B*T] (when given), the positions sorted by id for the embedding gradient,
/// and the step's scalar block (f64, [`STEP_SCALARS`] a layer: what the kernels would otherwise
/// get by value from the host, so that their arguments stay the same from step to step).
struct DevBatch {
    _buf: Temp<u8>,
    ids: Dv<u32>,
    targets: Dv<i64>,
    sorted: SortedIds,
    scalars: Dv<f64>,
    /// the step's draws ([`StepDraws`]): the dropout seeds and the slot keep masks
    seeds: Dv<u64>,
    keep: Dv<f32>,
}

impl DevBatch {
    fn upload<B: Backend>(
        be: &B,
        ids: &[u32],
        targets: Option<&[i64]>,
        vocab: usize,
        scalars: &[f64],
        draws: &StepDraws,
    ) -> Result<Self> {
        let (mut uniq, mut start, order) = super::ops::sort_positions_by_id(ids, vocab)?;
        // padded to one run per position (empty runs, which `encoder_backward` skips): the same
        // layout and launch for every batch of this shape
        let n = ids.len();
        uniq.resize(n.max(uniq.len()), 0);
        start.resize(uniq.len() + 1, n as i32);
        let mut bytes: Vec<u8> = Vec::new();
        // each part at a 256-byte offset (device alignment for any element type)
        let mut part = |x: &[u8]| {
            let off = bytes.len().div_ceil(256) * 256;
            bytes.resize(off, 0);
            bytes.extend_from_slice(x);
            off
        };
        let o_ids = part(plain_bytes(ids));
        let o_tg = part(plain_bytes(targets.unwrap_or(&[])));
        let o_uniq = part(plain_bytes(&uniq));
        let o_start = part(plain_bytes(&start));
        let o_order = part(plain_bytes(&order));
        let o_sc = part(plain_bytes(scalars));
        let o_seeds = part(plain_bytes(&draws.seeds));
        let o_keep = part(plain_bytes(&draws.keep));
        let buf = be.temp_uninit::<u8>(bytes.len())?; // the upload writes every byte
        be.upload_async(buf.dv(), &bytes)?;
        let base = buf.dv().ptr;
        // SAFETY: each range lies inside `buf` (offsets and lengths of the parts above) at a
        // 256-byte aligned address, and holds plain data of its type (integers, floats).
        unsafe {
            Ok(DevBatch {
                ids: Dv::from_raw(base + o_ids as u64, ids.len()),
                targets: Dv::from_raw(base + o_tg as u64, targets.map_or(0, |t| t.len())),
                sorted: SortedIds {
                    uniq: Dv::from_raw(base + o_uniq as u64, uniq.len()),
                    start: Dv::from_raw(base + o_start as u64, start.len()),
                    order: Dv::from_raw(base + o_order as u64, order.len()),
                },
                scalars: Dv::from_raw(base + o_sc as u64, scalars.len()),
                seeds: Dv::from_raw(base + o_seeds as u64, draws.seeds.len()),
                keep: Dv::from_raw(base + o_keep as u64, draws.keep.len()),
                _buf: buf,
            })
        }
    }
}

/// An f64 range as its f32 words (for device copies, which move f32s).
fn f64_words(x: Dv<f64>) -> Dv<f32> {
    // SAFETY: the same bytes, twice as many 4-byte words.
    unsafe { Dv::from_raw(x.ptr, 2 * x.len) }
}

/// Plain numbers: no padding, every byte initialised.
trait Plain: Copy {}

impl Plain for u32 {}

impl Plain for i32 {}

impl Plain for i64 {}

impl Plain for u64 {}

impl Plain for f32 {}

impl Plain for f64 {}

/// The bytes of a slice of plain numbers (host and device are both little-endian).
fn plain_bytes<T: Plain>(x: &[T]) -> &[u8] {
    // SAFETY: `x` is `size_of_val(x)` initialised bytes of padding-free numbers.
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, std::mem::size_of_val(x)) }
}

#[derive(Default)]
struct GpuLmCache {
    b: usize,
    t: usize,
    batch: Option<DevBatch>,
    emb: DBuf,
    emask: DBuf,
    emb_dropped: bool,
    /// residual stream entering block l (xs[L] = final residual)
    xs: Vec<DBuf>,
    blocks: Vec<GpuBlockCache>,
    lnf: DBuf,
    lnf16: Twin,
    lnf_mean: DBuf,
    lnf_rstd: DBuf,
}

impl GpuLmCache {
    fn lnf_bufs(&mut self) -> NormBufs<'_> {
        (
            &mut self.lnf,
            &mut self.lnf16,
            &mut self.lnf_mean,
            &mut self.lnf_rstd,
        )
    }
}

/// The ASM language model on one CUDA device: f32 master weights, gradients and AdamW state on
/// the device; forward, fused classifier + cross-entropy, backward, clipping and AdamW on the GPU.
pub struct GpuLm<B: Backend = CudaBackend> {
    be: B,
    pub cfg: ModelConfig,
    ids: LmIds,
    template: ParamStore,
    params: GpuParams,
    grads: Temp<f32>,
    /// sum of the micro-batch gradients under gradient accumulation (allocated on first use)
    grad_acc: Option<Temp<f32>>,
    adam: Option<(Temp<f32>, Temp<f32>, u64)>,
    /// the AdamW scalars of the step being run ([`super::ops::adamw_step_scalars`] for its
    /// learning rate and step count), set before its forward so that they go up in the step's
    /// scalar block with the batch
    adam_pending: Option<[f32; 3]>,
    /// what a training step reads back ([`GpuLm::update_body`]), kept from step to step
    readback: Option<Temp<f32>>,
    /// CUDA graph capture of the training step ([`super::graph`])
    graph: super::graph::GraphState,
    /// fine-tuning with frozen parameters ([`GpuLm::set_frozen`]): the flat ranges that train
    /// (AdamW runs on each) and the frozen parameters' ranges (their gradients are zeroed
    /// before the global norm); None: everything trains in one AdamW launch
    frozen: Option<FrozenRanges>,
    layers: Vec<GpuAsaLayer>,
    cache: GpuLmCache,
    rng: ChaCha8Rng,
    pub precision: Precision,
    /// rows of logits materialised at once by the fused classifier are capped so that a block
    /// holds at most this many floats
    pub logits_budget: usize,
}

/// (trained ranges, frozen ranges) of the flat parameter buffer, as (offset, length)
type FrozenRanges = (Vec<(usize, usize)>, Vec<(usize, usize)>);

/// One optimizer update's numbers ([`GpuLm::begin_update`] to [`GpuLm::finish_update`]): the
/// step it makes (1-based), its learning rate, and the loss sums it reads back.
#[derive(Clone, Copy, Debug)]
struct Update {
    step: u64,
    lr: f64,
    losses: usize,
}

impl Update {
    /// f32 words read back: the norm and the loss sums as f64s, then `scalars` parameters.
    fn words(&self, scalars: usize) -> usize {
        2 * (1 + self.losses) + scalars
    }
}

impl GpuLm<CudaBackend> {
    /// Uploads `params` (laid out as `LmIds::build(cfg)` lays them out) to device 0.
    pub fn new(cfg: &ModelConfig, params: &ParamStore, precision: Precision) -> Result<Self> {
        GpuLm::with_backend(CudaBackend::new(0)?, cfg, params, precision)
    }
}

impl<B: Backend> GpuLm<B> {
    /// The model on `be` (a CUDA device, or the tests' emulator).
    pub fn with_backend(
        be: B,
        cfg: &ModelConfig,
        params: &ParamStore,
        precision: Precision,
    ) -> Result<Self> {
        cfg.validate()?;
        be.set_precision(precision);
        let (template, ids) = LmIds::build(cfg);
        if template.names != params.names || template.shapes != params.shapes {
            return Err(AsaError::Input(
                "GpuLm::new: the parameters do not match the model config (names or shapes differ)"
                    .into(),
            ));
        }
        let gp = GpuParams::upload(&be, params)?;
        let grads = be.temp::<f32>(gp.layout.total)?;
        let layers = ids
            .blocks
            .iter()
            .map(|bl| GpuAsaLayer::new(&be, cfg, bl.attn.clone()))
            .collect::<Result<Vec<_>>>()?;
        Ok(GpuLm {
            be,
            cfg: cfg.clone(),
            ids,
            template: params.clone(),
            params: gp,
            grads,
            grad_acc: None,
            adam: None,
            adam_pending: None,
            readback: None,
            graph: super::graph::GraphState::default(),
            frozen: None,
            layers,
            cache: GpuLmCache::default(),
            rng: ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5eed_d20b),
            precision,
            logits_budget: 1 << 25,
        })
    }

    /// Keeps the parameters with `frozen[i]` fixed in the training steps (as `AdamW::frozen` on
    /// the CPU): their gradients are zeroed before the global norm, and AdamW (with its weight
    /// decay) runs only over the ranges of the others, merged where they lie back to back.
    /// Set before the first step (a captured step graph keeps the launches it was made with).
    pub fn set_frozen(&mut self, frozen: &[bool]) -> Result<()> {
        let lay = &self.params.layout;
        if frozen.len() != lay.offs.len() {
            return Err(AsaError::Input(format!(
                "set_frozen: {} flags for {} parameters",
                frozen.len(),
                lay.offs.len()
            )));
        }
        let mut train: Vec<(usize, usize)> = Vec::new();
        let mut fixed = Vec::new();
        // parameters in layout order (ascending offsets)
        let mut order: Vec<usize> = (0..frozen.len()).collect();
        order.sort_by_key(|&i| lay.offs[i]);
        let mut prev_trained = false;
        for i in order {
            let (a, n) = (lay.offs[i], lay.lens[i]);
            if frozen[i] {
                fixed.push((a, n));
                prev_trained = false;
            } else {
                match train.last_mut() {
                    // extend over the alignment gap (zero gradients, zero weights) since the last
                    Some(r) if prev_trained => r.1 = a + n - r.0,
                    _ => train.push((a, n)),
                }
                prev_trained = true;
            }
        }
        self.frozen = frozen.iter().any(|&f| f).then_some((train, fixed));
        Ok(())
    }

    /// The backend (device name, stream).
    pub fn backend(&self) -> &B {
        &self.be
    }

    /// Sets the intervention of every layer (intervene variant; `Lm::set_intervention`).
    pub fn set_intervention(&mut self, it: &Intervention) {
        for l in &mut self.layers {
            l.intervention = it.clone();
        }
    }

    /// Fused write scan + read on (the default, unless `ASA_CUDA_FUSED=0`) or off (op by op).
    pub fn set_fused(&mut self, on: bool) {
        for l in &mut self.layers {
            l.fused = on;
        }
    }

    /// Reseeds the dropout / slot-dropout generator.
    pub fn reseed(&mut self, seed: u64) {
        self.rng = ChaCha8Rng::seed_from_u64(seed);
    }

    /// The dropout / slot-dropout generator (its stream position is saved with checkpoints).
    /// Replaces the generator (e.g. by the CPU model's, so that routing noise draws the same).
    pub fn set_rng(&mut self, rng: ChaCha8Rng) {
        self.rng = rng;
    }

    pub fn rng_mut(&mut self) -> &mut ChaCha8Rng {
        &mut self.rng
    }

    /// Draws an eval forward's routing noise for every layer (after the batch's own draws, of
    /// which an eval forward has none: the CPU model's order).
    fn draw_noise(&mut self, o: &mut DevOpts, b: usize, t: usize) -> Result<()> {
        let n = b * self.cfg.num_heads * t * self.cfg.num_slots;
        o.draw_noise(&self.be, &mut self.rng, self.layers.len(), n)
    }

    /// Sends a forward's batch up in one queued copy: the ids, the `targets` when given, the
    /// step's scalar block (the learned scalars, and AdamW's for a training step) and its
    /// random draws (a `training` forward's; [`StepDraws`]).
    fn upload_batch(
        &mut self,
        ids: &[u32],
        targets: Option<&[i64]>,
        b: usize,
        t: usize,
        training: bool,
    ) -> Result<()> {
        self.cfg.check_ids(ids, b, t)?;
        let draws = StepDraws::draw(&mut self.rng, &self.cfg, self.layers.len(), training);
        let p = &self.params;
        let mut scalars: Vec<f64> = self.layers.iter().flat_map(|l| l.step_scalars(p)).collect();
        // then AdamW's of the step (a training step's forward)
        scalars.extend(self.adam_pending.iter().flatten().map(|&x| x as f64));
        self.cache.batch = None; // the last call's buffer back to the cache first: it serves this one
        let up = DevBatch::upload(
            &self.be,
            ids,
            targets,
            self.cfg.vocab_size,
            &scalars,
            &draws,
        )?;
        self.cache.batch = Some(up);
        self.cache.b = b;
        self.cache.t = t;
        Ok(())
    }

    /// Forward of the uploaded batch ([`GpuLm::upload_batch`]) to the final LayerNorm output
    /// (`Lm::forward` up to `ln_f`).
    fn forward_body(&mut self, b: usize, t: usize, o: &DevOpts) -> Result<()> {
        let be = &self.be;
        let cfg = &self.cfg;
        let (c, hid) = (cfg.embed_dim, cfg.hidden_dim());
        let n = b * t;
        let p = &self.params;
        let cache = &mut self.cache;
        assert_eq!(
            (cache.b, cache.t),
            (b, t),
            "forward_body: the batch uploaded"
        );
        // the last forward's activations are written again from here on
        be.clear_bf16_twins();
        let batch = cache.batch.as_ref().expect("a batch uploaded");
        let ids_d = batch.ids;
        let step_scalars = batch.scalars;
        let (seeds, keep) = (batch.seeds, batch.keep);
        let hk = cfg.num_heads * cfg.num_slots;
        // a site's seed: 0 the embeddings', then SEEDS_PER_LAYER per block
        let seed = |l: usize, site: usize| (0, seeds.sub(1 + SEEDS_PER_LAYER * l + site, 1));
        let pdrop = if o.training { cfg.dropout as f32 } else { 0.0 };
        let nl = cfg.num_layers;
        cache.xs.resize_with(nl + 1, DBuf::default);
        cache.blocks.resize_with(nl, GpuBlockCache::default);

        // embeddings [B,T,C]
        let wpe = self.ids.pos_emb.map(|i| p.p(i)).unwrap_or_else(Dv::null);
        let x0 = cache.xs[0].ensure(be, n * c)?;
        cache.emb_dropped = pdrop > 0.0;
        if cache.emb_dropped {
            let emb = cache.emb.ensure(be, n * c)?;
            be.encoder_forward(emb, ids_d, p.p(self.ids.token_emb), wpe, b, t, c)?;
            let em = cache.emask.ensure(be, n * c)?;
            be.dropout_forward(x0, em, emb, pdrop, (0, seeds.sub(0, 1)))?;
        } else {
            be.encoder_forward(x0, ids_d, p.p(self.ids.token_emb), wpe, b, t, c)?;
        }

        // the first norm (block 0's LN1, or LNf without blocks); every later one is fused with
        // the residual step before it (`residual_layernorm_forward`)
        let (ln_w, ln_b) = match self.ids.blocks.first() {
            Some(bid) => (p.p(bid.ln_1_w), p.p(bid.ln_1_b)),
            None => (p.p(self.ids.ln_f_w), p.p(self.ids.ln_f_b)),
        };
        let ((ln, lm, lr), l16) = match cache.blocks.first_mut() {
            Some(bc) => norm_out(be, bc.ln1_bufs(), n, c)?,
            None => norm_out(be, cache.lnf_bufs(), n, c)?,
        };
        be.layernorm_forward(ln, lm, lr, x0, ln_w, ln_b, n, c, l16)?;
        for l in 0..nl {
            let bid = &self.ids.blocks[l];
            let x = cache.xs[l].dv();
            let xn = cache.xs[l + 1].ensure(be, n * c)?;
            let (done, next) = cache.blocks.split_at_mut(l + 1);
            let bc = &mut done[l];
            let ln1 = bc.ln1.dv(); // made by the norm before this block
            let attn_out = bc.attn_out.ensure(be, n * c)?;
            bc.attn.step_scalars = Some(step_scalars.sub(l * STEP_SCALARS, STEP_SCALARS));
            let draws = LayerDraws {
                seeds: seeds.sub(1 + SEEDS_PER_LAYER * l, 2),
                keep: keep.sub(l * hk, hk),
                noise: o.noise_of(l),
            };
            self.layers[l].forward(be, p, ln1, b, t, o, &mut bc.attn, draws, attn_out)?;
            // x1 = x + attn, ln2 = LN2(x1)
            let x1 = bc.x1.ensure(be, n * c)?;
            let ((ln2, m2, r2), ln2_16) = norm_out(be, bc.ln2_bufs(), n, c)?;
            let (w2, b2) = (p.p(bid.ln_2_w), p.p(bid.ln_2_b));
            let io = ((x1, ln2, m2, r2), (x, attn_out, Dv::null()));
            be.residual_layernorm_forward(io.0, io.1, w2, b2, n, c, ln2_16)?;
            // h = ln2 W0^T (+ b0, added by the GELU's pass), g = gelu(h)
            let hh = bc.h.ensure(be, n * hid)?;
            be.matmul_forward(hh, ln2, p.p(bid.mlp_0_w), Dv::null(), n, c, hid)?;
            let g = bc.g.ensure(be, n * hid)?;
            bc.dropped = pdrop > 0.0;
            // the GEMM reads g itself only without dropout
            let g16 = if bc.dropped {
                Dv::null()
            } else {
                bc.g16.of(be, g)?
            };
            match bid.mlp_0_b {
                Some(b0) => be.bias_gelu_forward(g, hh, p.p(b0), n, hid, g16)?,
                None => be.gelu_forward(g, hh, g16)?,
            }
            let gd = if bc.dropped {
                let gd = bc.gd.ensure(be, n * hid)?;
                let gm = bc.gmask.ensure(be, n * hid)?;
                be.dropout_forward(gd, gm, g, pdrop, seed(l, 2))?;
                gd
            } else {
                g
            };
            // without dropout the second MLP GEMM's bias joins the residual step below
            let bias3 = bid.mlp_3_b.map(|i| p.p(i)).unwrap_or_else(Dv::null);
            let (gemm_bias, res_bias) = if bc.dropped {
                (bias3, Dv::null())
            } else {
                (Dv::null(), bias3)
            };
            let mm = bc.m.ensure(be, n * c)?;
            be.matmul_forward(mm, gd, p.p(bid.mlp_3_w), gemm_bias, n, hid, c)?;
            let md = if bc.dropped {
                let md = bc.md.ensure(be, n * c)?;
                let mk = bc.mmask.ensure(be, n * c)?;
                be.dropout_forward(md, mk, mm, pdrop, seed(l, 3))?;
                md
            } else {
                mm
            };
            // xn = x1 + mlp, then the next norm: the next block's LN1, or LNf
            let (((ln, lm, lr), l16), lw, lb) = match next.first_mut() {
                Some(nb) => {
                    let nbid = &self.ids.blocks[l + 1];
                    let o = norm_out(be, nb.ln1_bufs(), n, c)?;
                    (o, p.p(nbid.ln_1_w), p.p(nbid.ln_1_b))
                }
                None => {
                    let o = norm_out(be, cache.lnf_bufs(), n, c)?;
                    (o, p.p(self.ids.ln_f_w), p.p(self.ids.ln_f_b))
                }
            };
            let io = ((xn, ln, lm, lr), (x1, md, res_bias));
            be.residual_layernorm_forward(io.0, io.1, lw, lb, n, c, l16)?;
        }
        Ok(())
    }

    /// Logits [B,T,V] of an eval-mode forward (`Lm::forward` with default options and an
    /// optional attention mask [B,T]).
    pub fn forward_logits(
        &mut self,
        ids: &[u32],
        b: usize,
        t: usize,
        mask: Option<&[bool]>,
    ) -> Result<Vec<f32>> {
        let opts = AsaOptions {
            attention_mask: mask.map(|m| m.to_vec()),
            ..Default::default()
        };
        self.forward_logits_opts(ids, b, t, &opts)
    }

    /// Logits [B,T,V] and every layer's info tensors (`Lm::forward` with `return_info`; the
    /// options' own `return_info` is implied): the GPU twin of the CPU's analysis forward.
    pub fn forward_infos(
        &mut self,
        ids: &[u32],
        b: usize,
        t: usize,
        opts: &AsaOptions,
    ) -> Result<(Vec<f32>, Vec<Info>)> {
        let opts = AsaOptions {
            return_info: true,
            ..opts.clone()
        };
        let logits = self.forward_logits_opts(ids, b, t, &opts)?;
        let c = self.cfg.embed_dim;
        let infos = self
            .layers
            .iter()
            .zip(&self.cache.blocks)
            .map(|(layer, bc)| {
                let mut info = layer.info(&self.be, &self.params, &bc.attn)?;
                // the LM adds the layer's output, as `Lm::forward` does
                let out = self.be.download(bc.attn_out.dv())?;
                info.insert("attn_out".into(), (vec![b, t, c], out));
                Ok(info)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((logits, infos))
    }

    /// Logits [B,T,V] with explicit forward options (routing modes, slot masks, ...).
    pub fn forward_logits_opts(
        &mut self,
        ids: &[u32],
        b: usize,
        t: usize,
        opts: &AsaOptions,
    ) -> Result<Vec<f32>> {
        let mut o = DevOpts::new(&self.be, &self.cfg, opts, b, t)?;
        self.upload_batch(ids, None, b, t, opts.training)?;
        self.draw_noise(&mut o, b, t)?;
        self.forward_body(b, t, &o)?;
        let (c, v, n) = (self.cfg.embed_dim, self.cfg.vocab_size, b * t);
        let (_s, logits) = tmp_uninit(&self.be, n * v)?; // the GEMM stores it whole
        self.be.matmul_forward(
            logits,
            self.cache.lnf.dv(),
            self.params.p(self.ids.head()),
            Dv::null(),
            n,
            c,
            v,
        )?;
        self.be.download(logits)
    }

    /// Counted rows (valid and target >= 0); a counted target >= V is an input error.
    fn count_targets(&self, targets: &[i64], valid: Option<&[bool]>, n: usize) -> Result<usize> {
        let v = self.cfg.vocab_size;
        if targets.len() != n {
            return Err(AsaError::Input(format!(
                "expected {n} targets, got {}",
                targets.len()
            )));
        }
        if let Some(m) = valid {
            if m.len() != n {
                return Err(AsaError::Input(format!(
                    "attention_mask has {} entries, expected B*T = {n}",
                    m.len()
                )));
            }
        }
        let mut count = 0;
        for (r, &tg) in targets.iter().enumerate() {
            if valid.is_none_or(|m| m[r]) && tg >= 0 {
                if tg as u64 >= v as u64 {
                    return Err(AsaError::Input(format!(
                        "target id {tg} out of range for vocab {v}"
                    )));
                }
                count += 1;
            }
        }
        if count == 0 {
            return Err(AsaError::Input(
                "no valid target positions in the batch".into(),
            ));
        }
        Ok(count)
    }

    /// Fused classifier + cross-entropy forward (and, given `dlnf`, backward), in row blocks:
    /// per block the logits [R,V] are formed (cuBLAS), turned into probabilities and row
    /// losses, then in place into dlogits, which flow to d(lnf) and d(head weight) right away.
    /// At most `logits_budget` floats of logits exist at once. Returns the summed loss on the
    /// device.
    fn head_loss(
        &self,
        targets_d: Dv<i64>,
        valid: Dv<u8>,
        count: usize,
        dlnf: Option<Dv<f32>>,
    ) -> Result<Temp<f64>> {
        let be = &self.be;
        let (b, t) = (self.cache.b, self.cache.t);
        let (c, v, n) = (self.cfg.embed_dim, self.cfg.vocab_size, b * t);
        let rows = (self.logits_budget / v.max(1)).clamp(1, n);
        let (_s, blk) = tmp_uninit(be, rows * v)?; // each block's GEMM stores it whole
        let mut blk16 = Twin::default(); // the logits gradient's bf16 twin
        let blk16 = blk16.scoped(be, if dlnf.is_some() { rows * v } else { 0 })?;
        let row_loss = be.temp::<f64>(n)?;
        let lnf = self.cache.lnf.dv();
        let head = self.ids.head();
        let w = self.params.p(head);
        let gw = self
            .params
            .layout
            .range(self.grads.dv().sub(0, self.params.layout.total), head);
        let scale = 1.0 / count as f32;
        let mut r0 = 0;
        while r0 < n {
            let r = rows.min(n - r0);
            let lg = blk.sub(0, r * v);
            let x = lnf.sub(r0 * c, r * c);
            let tg = targets_d.sub(r0, r);
            let vl = if valid.is_null() {
                valid
            } else {
                valid.sub(r0, r)
            };
            be.matmul_forward(lg, x, w, Dv::null(), r, c, v)?;
            let rl = row_loss.dv().sub(r0, r);
            if let Some(dlnf) = dlnf {
                let lg16 = if blk16.is_null() {
                    blk16
                } else {
                    blk16.sub(0, r * v)
                };
                // the row losses, and dlogits in place of the logits, in one pass
                be.crossentropy_forward_backward(lg, rl, tg, vl, scale, r, v, lg16)?;
                let dx = dlnf.sub(r0 * c, r * c);
                be.with_bf16_twin(lg, lg16, || {
                    be.matmul_backward(dx, gw, Dv::null(), lg, x, w, r, c, v)
                })?;
            } else {
                be.crossentropy_forward(lg, rl, lg, tg, vl, r, v)?;
            }
            r0 += r;
        }
        let sum = be.temp::<f64>(1)?;
        be.sum_f64(sum.dv(), row_loss.dv(), false)?;
        Ok(sum)
    }

    /// Backward from d(lnf) through the blocks to the embeddings (`Lm::backward_from_logits`
    /// after the head). Gradients are added into the flat gradient buffer.
    fn backward_body(&mut self, dlnf: Dv<f32>, o: &DevOpts) -> Result<()> {
        let be = &self.be;
        let cfg = &self.cfg;
        let (b, t) = (self.cache.b, self.cache.t);
        let (c, hid) = (cfg.embed_dim, cfg.hidden_dim());
        let n = b * t;
        let p = &self.params;
        let g = self.grads.dv().sub(0, p.layout.total);
        let gr = |id: ParamId| p.layout.range(g, id);
        let nl = cfg.num_layers;
        let (_sx, dx) = tmp(be, n * c)?;
        // bf16 twins of the gradients that GEMMs read: dx (the residual stream's), dh (the MLP's)
        let (mut dx16, mut dh16) = (Twin::default(), Twin::default());
        let dx16 = dx16.scoped(be, n * c)?;
        let dh16 = dh16.scoped(be, n * hid)?;
        be.layernorm_backward(
            dx,
            gr(self.ids.ln_f_w),
            gr(self.ids.ln_f_b),
            dlnf,
            self.cache.xs[nl].dv(),
            p.p(self.ids.ln_f_w),
            self.cache.lnf_mean.dv(),
            self.cache.lnf_rstd.dv(),
            n,
            c,
            dx16,
        )?;
        let (_s1, dm_buf) = tmp(be, n * c)?;
        // stored whole by their producers: matmul_backward_store, gelu_backward, the layer's
        // backward (no memsets)
        let (_s2, dgd) = tmp_uninit(be, n * hid)?;
        let (_s3, dg_buf) = tmp(be, n * hid)?;
        let (_s4, dh) = tmp_uninit(be, n * hid)?;
        let (_s5, dln2) = tmp_uninit(be, n * c)?;
        let (_s6, dln1) = tmp_uninit(be, n * c)?;
        for l in (0..nl).rev() {
            let bid = &self.ids.blocks[l];
            let bc = &mut self.cache.blocks[l];
            // x2 = x1 + drop(mlp3(drop(gelu(mlp0(ln2(x1))))))
            let (dm, dm16) = if bc.dropped {
                be.memset_zero(dm_buf)?;
                be.dropout_backward(dm_buf, dx, bc.mmask.dv())?;
                (dm_buf, Dv::null())
            } else {
                (dx, dx16)
            };
            let gd = if bc.dropped { bc.gd.dv() } else { bc.g.dv() };
            // (mlp_3's bias gradient joins gelu_backward's launch below)
            be.with_bf16_twin(dm, dm16, || {
                be.matmul_backward_store(
                    dgd,
                    gr(bid.mlp_3_w),
                    Dv::null(),
                    dm,
                    gd,
                    p.p(bid.mlp_3_w),
                    n,
                    hid,
                    c,
                )
            })?;
            let dg = if bc.dropped {
                be.memset_zero(dg_buf)?;
                be.dropout_backward(dg_buf, dgd, bc.gmask.dv())?;
                dg_buf
            } else {
                dgd
            };
            // with the first MLP GEMM's bias gradient (the column sums of dh) and, in the same
            // launch, the second's (of dm)
            let dbias0 = bid.mlp_0_b.map(gr).unwrap_or_else(Dv::null);
            let bias3 = match bid.mlp_3_b {
                Some(id) => (gr(id), dm),
                None => (Dv::null(), Dv::null()),
            };
            be.gelu_backward(dh, bc.h.dv(), dg, dh16, dbias0, bias3)?;
            be.with_bf16_twin(dh, dh16, || {
                be.matmul_backward_store(
                    dln2,
                    gr(bid.mlp_0_w),
                    Dv::null(),
                    dh,
                    bc.ln2.dv(),
                    p.p(bid.mlp_0_w),
                    n,
                    c,
                    hid,
                )
            })?;
            // dx1 = dx + LN2 backward (in place on dx)
            be.layernorm_backward(
                dx,
                gr(bid.ln_2_w),
                gr(bid.ln_2_b),
                dln2,
                bc.x1.dv(),
                p.p(bid.ln_2_w),
                bc.ln2_mean.dv(),
                bc.ln2_rstd.dv(),
                n,
                c,
                dx16,
            )?;
            // x1 = x + attn(ln1(x))
            self.layers[l].backward(be, p, g, &mut bc.attn, o, (dx, dx16), dln1)?;
            be.layernorm_backward(
                dx,
                gr(bid.ln_1_w),
                gr(bid.ln_1_b),
                dln1,
                self.cache.xs[l].dv(),
                p.p(bid.ln_1_w),
                bc.ln1_mean.dv(),
                bc.ln1_rstd.dv(),
                n,
                c,
                dx16,
            )?;
        }
        let demb = if self.cache.emb_dropped {
            be.memset_zero(dm_buf)?;
            be.dropout_backward(dm_buf, dx, self.cache.emask.dv())?;
            dm_buf
        } else {
            dx
        };
        let gwpe = self.ids.pos_emb.map(gr).unwrap_or_else(Dv::null);
        let sorted = self.cache.batch.as_ref().expect("a forward before").sorted;
        be.encoder_backward_sorted(gr(self.ids.token_emb), gwpe, demb, sorted, b, t, c)?;
        Ok(())
    }

    /// Forward, loss and backward of the uploaded batch into the (zeroed) gradient buffer;
    /// returns the summed loss, still on the device.
    fn loss_backward_body(&mut self, count: usize, o: &DevOpts) -> Result<Temp<f64>> {
        let (b, t) = (self.cache.b, self.cache.t);
        let n = b * t;
        self.forward_body(b, t, o)?;
        self.be.memset_zero(self.grads.dv())?;
        let (_s, dlnf) = tmp(&self.be, n * self.cfg.embed_dim)?;
        let targets_d = self.cache.batch.as_ref().expect("uploaded before").targets;
        let sum = self.head_loss(targets_d, o.valid(), count, Some(dlnf))?;
        self.backward_body(dlnf, o)?;
        Ok(sum)
    }

    /// Uploads a batch, then forward, loss and backward (`loss_backward_body`); returns the
    /// summed loss on the device and the target count.
    fn loss_backward(
        &mut self,
        ids: &[u32],
        targets: &[i64],
        b: usize,
        t: usize,
        opts: &AsaOptions,
    ) -> Result<(Temp<f64>, usize)> {
        let n = b * t;
        let count = self.count_targets(targets, opts.attention_mask.as_deref(), n)?;
        let mut o = DevOpts::new(&self.be, &self.cfg, opts, b, t)?;
        self.upload_batch(ids, Some(targets), b, t, opts.training)?;
        self.draw_noise(&mut o, b, t)?;
        let sum = self.loss_backward_body(count, &o)?;
        Ok((sum, count))
    }

    /// Mean loss and the gradients of every parameter (eval mode: no dropout), for parity tests.
    pub fn loss_and_grads(
        &mut self,
        ids: &[u32],
        targets: &[i64],
        mask: Option<&[bool]>,
        b: usize,
        t: usize,
    ) -> Result<(f64, ParamStore)> {
        let opts = AsaOptions {
            attention_mask: mask.map(|m| m.to_vec()),
            ..Default::default()
        };
        self.loss_and_grads_opts(ids, targets, b, t, &opts)
    }

    /// `loss_and_grads` with explicit forward options.
    pub fn loss_and_grads_opts(
        &mut self,
        ids: &[u32],
        targets: &[i64],
        b: usize,
        t: usize,
        opts: &AsaOptions,
    ) -> Result<(f64, ParamStore)> {
        let (sum, count) = self.loss_backward(ids, targets, b, t, opts)?;
        let loss = self.be.download(sum.dv())?[0] / count as f64;
        let flat = self
            .be
            .download(self.grads.dv().sub(0, self.params.layout.total))?;
        Ok((loss, self.unflatten(&flat)))
    }

    /// [`GpuLm::train_step`] in one micro-batch. The step's device work, from the forward to
    /// the read-back gather, is one body run the graph way ([`super::graph::run_step`]): after
    /// the first step it is captured once and replayed while each step makes the same
    /// requests; the batch upload before it and the read-back after it are the step's only
    /// host transfers.
    #[allow(clippy::too_many_arguments)]
    fn train_step_whole(
        &mut self,
        inputs: &[u32],
        targets: &[i64],
        b: usize,
        t: usize,
        lr: f64,
        adam: &AdamWConfig,
        clip: Option<f64>,
        training: bool,
    ) -> Result<(f64, f64)> {
        let opts = AsaOptions {
            training,
            ..Default::default()
        };
        let count = self.count_targets(targets, None, b * t)?;
        let o = DevOpts::new(&self.be, &self.cfg, &opts, b, t)?;
        let up = self.begin_update(adam, lr, 1)?;
        self.upload_batch(inputs, Some(targets), b, t, training)?;
        let body = |s: &mut Self| {
            let sum = s.loss_backward_body(count, &o)?;
            s.update_body(&[sum], adam, clip, up)
        };
        super::graph::run_step(self, |s| &s.be, |s| &mut s.graph, body)?;
        self.finish_update(&[count], up)
    }

    /// One training step: forward with the dropouts on (`training`) or off (eval-mode, as the
    /// fixtures train), loss, backward, global norm (and clipping to `clip`), AdamW with
    /// learning rate `lr`; returns (loss, gradient norm before clipping). The `b` rows run as
    /// `b / micro` micro-batches of `micro` rows (gradient accumulation, as the CPU engine):
    /// each micro-batch's mean loss weighs `micro / b`; the micro-batch gradients are summed in
    /// order on the device, scaled by `micro / b`, then clipped and applied once. `micro == b`
    /// runs as one graph body (`train_step_whole`); more micro-batches run eagerly (each
    /// micro-batch's upload lies between device work).
    #[allow(clippy::too_many_arguments)]
    pub fn train_step(
        &mut self,
        inputs: &[u32],
        targets: &[i64],
        b: usize,
        t: usize,
        micro: usize,
        lr: f64,
        adam: &AdamWConfig,
        clip: Option<f64>,
        training: bool,
    ) -> Result<(f64, f64)> {
        if micro == 0 || !b.is_multiple_of(micro) {
            return Err(AsaError::Config(format!(
                "batch of {b} rows does not split into micro-batches of {micro}"
            )));
        }
        if inputs.len() != b * t || targets.len() != b * t {
            return Err(AsaError::Input(format!(
                "expected {b}x{t} inputs and targets, got {} and {}",
                inputs.len(),
                targets.len()
            )));
        }
        let accum = b / micro;
        if accum == 1 {
            return self.train_step_whole(inputs, targets, b, t, lr, adam, clip, training);
        }
        let opts = AsaOptions {
            training,
            ..Default::default()
        };
        let total = self.params.layout.total;
        if self.grad_acc.is_none() {
            self.grad_acc = Some(self.be.temp::<f32>(total)?);
        }
        let acc = self
            .grad_acc
            .as_ref()
            .expect("allocated above")
            .dv()
            .sub(0, total);
        self.be.memset_zero(acc)?;
        let up = self.begin_update(adam, lr, accum)?;
        // the per-micro-batch loss sums stay on the device until the end (no sync per micro-batch)
        let mut sums = Vec::with_capacity(accum);
        let mut counts = Vec::with_capacity(accum);
        for k in 0..accum {
            let rows = k * micro * t..(k + 1) * micro * t;
            let (sum, count) =
                self.loss_backward(&inputs[rows.clone()], &targets[rows], micro, t, &opts)?;
            self.be.axpy(acc, self.grads.dv().sub(0, total), 1.0)?;
            sums.push(sum);
            counts.push(count);
        }
        // grads = acc * (1/accum), the f32 product the CPU trainer forms
        let inv = 1.0 / accum as f32;
        self.be
            .scale_f64(self.grads.dv().sub(0, total), acc, inv as f64)?;
        self.update_body(&sums, adam, clip, up)?;
        self.finish_update(&counts, up)
    }

    /// Before a step's upload: AdamW's scalars for step `n + 1` at `lr` go up with the batch
    /// (`adam_pending`), and the read-back buffer is sized for `losses` loss sums.
    fn begin_update(&mut self, adam: &AdamWConfig, lr: f64, losses: usize) -> Result<Update> {
        let step = self.adam.as_ref().map_or(0, |a| a.2) + 1;
        self.adam_pending = Some(super::ops::adamw_step_scalars(adam, lr, step));
        let up = Update { step, lr, losses };
        let words = up.words(self.params.scalar_ids.len());
        if self.readback.as_ref().is_none_or(|r| r.len() != words) {
            self.readback = Some(self.be.temp::<f32>(words)?);
        }
        if self.adam.is_none() {
            let total = self.params.layout.total;
            self.adam = Some((self.be.temp::<f32>(total)?, self.be.temp::<f32>(total)?, 0));
        }
        Ok(up)
    }

    /// Global gradient norm, clipping and AdamW on the gradient buffer, and the read-back
    /// gathered: [norm, the loss sums of `sums`] as f64 (two f32 words each), then the scalar
    /// parameters. A non-finite loss or gradient norm skips the update (as the CPU trainer):
    /// AdamW checks them on the device and does nothing. Device work only (a step body).
    fn update_body(
        &self,
        sums: &[Temp<f64>],
        adam: &AdamWConfig,
        clip: Option<f64>,
        up: Update,
    ) -> Result<()> {
        let be = &self.be;
        let total = self.params.layout.total;
        let g = self.grads.dv().sub(0, total);
        let nf = 1 + sums.len();
        let nsc = self.params.scalar_ids.len();
        let back = self.readback.as_ref().expect("sized by begin_update").dv();
        assert_eq!(back.len, up.words(nsc), "update_body: the read-back's size");
        // SAFETY: the first 2 nf words of `back` (256-byte aligned) as nf f64s.
        let head: Dv<f64> = unsafe { Dv::from_raw(back.ptr, nf) };
        let norm = head.sub(0, 1);
        if let Some((_, fixed)) = &self.frozen {
            for &(a, n) in fixed {
                be.fill(g.sub(a, n), 0.0)?;
            }
        }
        be.global_norm(norm, g)?;
        for (i, sum) in sums.iter().enumerate() {
            be.copy(f64_words(head.sub(1 + i, 1)), f64_words(sum.dv().sub(0, 1)))?;
        }
        if let Some(cn) = clip {
            be.clip_scale(g, norm, cn)?;
        }
        let (m, v, _) = self.adam.as_ref().expect("allocated by begin_update");
        // read at the step's scalar block, where `begin_update` sent them up with the batch
        let at = match (self.adam_pending, &self.cache.batch) {
            (Some(_), Some(batch)) => {
                let nl = self.layers.len() * STEP_SCALARS;
                batch.scalars.sub(nl, 3)
            }
            _ => Dv::null(),
        };
        let whole = [(0, total)];
        let ranges: &[(usize, usize)] = match &self.frozen {
            Some((train, _)) => train,
            None => &whole,
        };
        for &(a, n) in ranges {
            be.adamw_update(
                self.params.data.dv().sub(a, n),
                m.dv().sub(a, n),
                v.dv().sub(a, n),
                g.sub(a, n),
                adam,
                up.lr,
                up.step,
                head,
                self.params
                    .bf16
                    .as_ref()
                    .map_or(Dv::null(), |c| c.dv().sub(a, n)),
                at,
            )?;
        }
        self.params.gather_scalars(be, back.sub(2 * nf, nsc))
    }

    /// The step's one host sync: the read-back of `update_body`. The loss is the mean over
    /// micro-batches of each one's mean (`counts`: their target counts). A non-finite loss or
    /// norm leaves the step count (AdamW skipped itself). Returns (loss, gradient norm before
    /// clipping).
    fn finish_update(&mut self, counts: &[usize], up: Update) -> Result<(f64, f64)> {
        self.adam_pending = None;
        let back = self.readback.as_ref().expect("sized by begin_update").dv();
        let host = self.be.download(back)?;
        let f64_at = |i: usize| {
            f64::from_bits(host[2 * i].to_bits() as u64 | (host[2 * i + 1].to_bits() as u64) << 32)
        };
        let gn = f64_at(0);
        let mut loss = 0.0;
        for (i, count) in counts.iter().enumerate() {
            loss += f64_at(1 + i) / *count as f64 / counts.len() as f64;
        }
        if !(loss.is_finite() && gn.is_finite()) {
            return Ok((loss, gn));
        }
        self.adam.as_mut().expect("allocated by begin_update").2 = up.step;
        self.params.set_scalars(&host[2 * (1 + up.losses)..]);
        Ok((loss, gn))
    }

    /// How this model's training steps have used CUDA graphs.
    pub fn graph_stats(&self) -> super::graph::GraphStats {
        self.graph.stats
    }

    /// CUDA graph capture of the training step on or off (default: on, unless
    /// `ASA_CUDA_GRAPH=0`).
    pub fn set_graphs(&mut self, on: bool) {
        self.graph.set_enabled(on);
    }

    /// Mean loss of an eval-mode forward (no dropout, no backward): validation.
    pub fn eval_loss(
        &mut self,
        inputs: &[u32],
        targets: &[i64],
        b: usize,
        t: usize,
    ) -> Result<f64> {
        self.eval_loss_opts(inputs, targets, b, t, &AsaOptions::default())
    }

    /// `eval_loss` with forward options (routing mode, slot mask; no attention mask).
    pub fn eval_loss_opts(
        &mut self,
        inputs: &[u32],
        targets: &[i64],
        b: usize,
        t: usize,
        opts: &AsaOptions,
    ) -> Result<f64> {
        let n = b * t;
        let count = self.count_targets(targets, None, n)?;
        let mut o = DevOpts::new(&self.be, &self.cfg, opts, b, t)?;
        self.upload_batch(inputs, Some(targets), b, t, false)?;
        self.draw_noise(&mut o, b, t)?;
        self.forward_body(b, t, &o)?;
        let targets_d = self.cache.batch.as_ref().expect("uploaded above").targets;
        let sum = self.head_loss(targets_d, o.valid(), count, None)?;
        Ok(self.be.download(sum.dv())?[0] / count as f64)
    }

    /// Restores the AdamW moments and step count (resuming a run); `m`, `v` have the
    /// parameters' layout.
    pub fn set_adam_state(&mut self, m: &ParamStore, v: &ParamStore, step: u64) -> Result<()> {
        for st in [m, v] {
            if st.names != self.template.names || st.shapes != self.template.shapes {
                return Err(AsaError::Input(
                    "optimizer state does not match the model's parameters".into(),
                ));
            }
        }
        let total = self.params.layout.total;
        let md = self.be.temp::<f32>(total)?;
        let vd = self.be.temp::<f32>(total)?;
        self.be
            .upload_into(md.dv().sub(0, total), &self.params.layout.flatten(m))?;
        self.be
            .upload_into(vd.dv().sub(0, total), &self.params.layout.flatten(v))?;
        self.adam = Some((md, vd, step));
        Ok(())
    }

    /// The AdamW moments and step count (None before the first step).
    pub fn adam_state(&self) -> Result<Option<(ParamStore, ParamStore, u64)>> {
        let Some((m, v, step)) = &self.adam else {
            return Ok(None);
        };
        let total = self.params.layout.total;
        let mh = self.be.download(m.dv().sub(0, total))?;
        let vh = self.be.download(v.dv().sub(0, total))?;
        Ok(Some((self.unflatten(&mh), self.unflatten(&vh), *step)))
    }

    /// The optimizer's step count.
    pub fn step(&self) -> u64 {
        self.adam.as_ref().map(|a| a.2).unwrap_or(0)
    }

    fn unflatten(&self, flat: &[f32]) -> ParamStore {
        let mut out = self.template.clone();
        for (i, d) in out.data.iter_mut().enumerate() {
            let (o, l) = (self.params.layout.offs[i], self.params.layout.lens[i]);
            d.copy_from_slice(&flat[o..o + l]);
        }
        out
    }

    /// The current parameters (f32 master weights).
    pub fn download_params(&self) -> Result<ParamStore> {
        let flat = self
            .be
            .download(self.params.data.dv().sub(0, self.params.layout.total))?;
        Ok(self.unflatten(&flat))
    }
}

// ------------------------------------------------------------------------------------------------
// one layer alone (layer fixtures, op tests, benches)
