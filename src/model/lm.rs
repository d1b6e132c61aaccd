//! The ASM language model: token (+ position) embedding, pre-LN blocks
//! (`x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`), final LayerNorm and a tied or untied head.
//! Forward, loss and backward are explicit; activations live in an `LmCache` reused across steps.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::backend::cpu::ops;
use crate::config::ModelConfig;
use crate::error::{AsaError, Result};
use crate::model::layer::{
    AsaCache, AsaLayer, AsaOptions, Info, Intervention, RoutingMode, ScanForm,
};
use crate::model::params::{BlockIds, LmIds, ParamStore};

/// Activations of one block.
#[derive(Debug, Default, Clone)]
pub struct BlockCache {
    x: Vec<f32>, // [B,T,C] block input (residual stream)
    ln1_mean: Vec<f32>,
    ln1_rstd: Vec<f32>,
    pub attn: AsaCache,
    x1: Vec<f32>,  // [B,T,C] x + attn(ln1(x))
    ln2: Vec<f32>, // [B,T,C]
    ln2_mean: Vec<f32>,
    ln2_rstd: Vec<f32>,
    h: Vec<f32>,  // [B,T,hid] mlp.0 output
    g: Vec<f32>,  // [B,T,hid] GELU
    gd: Vec<f32>, // [B,T,hid] after dropout (empty without dropout: g itself)
    gmask: Vec<f32>,
    mmask: Vec<f32>,
}

/// Activations of the whole model for one batch.
#[derive(Debug, Default, Clone)]
pub struct LmCache {
    pub b: usize,
    pub t: usize,
    ids: Vec<u32>,
    emask: Vec<f32>, // dropout mask
    pub blocks: Vec<BlockCache>,
    xf: Vec<f32>,  // [B,T,C] final residual
    lnf: Vec<f32>, // [B,T,C]
    lnf_mean: Vec<f32>,
    lnf_rstd: Vec<f32>,
    pub logits: Vec<f32>, // [B,T,V]
    /// [B,T,V] exp(logits - row max) after `loss`, the softmax being probs * row_inv [B*T];
    /// `backward` turns it into dlogits in place (`probs_valid` false afterwards, and a second
    /// `backward` recomputes it)
    probs: Vec<f32>,
    row_inv: Vec<f32>,
    probs_valid: bool,
    targets: Vec<i64>,
    valid: Option<Vec<bool>>,
    count: usize,
}

/// Analysis interventions of one forward: per-layer routing (e.g. read weights forced through
/// `RoutingMode::Override`) and additions to the residual stream at a block's input.
#[derive(Debug, Clone, Default)]
pub struct LmHooks {
    /// `layer_routing[l]`: routing used by layer `l` instead of the call's routing
    pub layer_routing: Vec<Option<RoutingMode>>,
    /// `residual_add[l]`: [B,T,C] added to the residual stream entering block `l`
    pub residual_add: Vec<Option<Vec<f32>>>,
}

impl LmHooks {
    pub fn new(num_layers: usize) -> Self {
        LmHooks {
            layer_routing: vec![None; num_layers],
            residual_add: vec![None; num_layers],
        }
    }

    fn check(&self, layers: usize, btc: usize) -> Result<()> {
        if self.layer_routing.len() > layers || self.residual_add.len() > layers {
            return Err(AsaError::Input(format!(
                "hooks name more than the model's {layers} layers"
            )));
        }
        for d in self.residual_add.iter().flatten() {
            if d.len() != btc {
                return Err(AsaError::Input(format!(
                    "residual hook has {} values, expected B*T*C = {btc}",
                    d.len()
                )));
            }
        }
        Ok(())
    }
}

impl LmCache {
    /// The residual stream entering block `l` (after any `residual_add` hook): [B,T,C]
    pub fn block_input(&self, l: usize) -> &[f32] {
        &self.blocks[l].x
    }
}

/// The language model: config, parameter ids, one `AsaLayer` per block.
#[derive(Debug, Clone)]
pub struct Lm {
    pub cfg: ModelConfig,
    pub ids: LmIds,
    pub layers: Vec<AsaLayer>,
    rng: ChaCha8Rng,
}

impl LmCache {
    /// The unnormalised softmax rows of the logits (`probs`, `row_inv`) against the saved targets
    /// and mask; returns (mean loss, counted rows).
    fn softmax_rows(&mut self, v: usize) -> Result<(f64, usize)> {
        let n = self.b * self.t;
        resize(&mut self.probs, n * v);
        resize(&mut self.row_inv, n);
        ops::crossentropy_forward_rows(
            &mut self.probs,
            &mut self.row_inv,
            &self.logits,
            &self.targets,
            self.valid.as_deref(),
            n,
            v,
        )
    }
}

/// Sizes a cache buffer that its producer overwrites whole (LayerNorm, GEMM without bias
/// accumulation, GELU, residual, softmax rows): kept as it is when the length already fits, so
/// the steady step does not zero what it is about to overwrite. `tests/model_contract.rs` holds
/// a reused cache to a fresh one, bit for bit.
fn resize(v: &mut Vec<f32>, n: usize) {
    if v.len() != n {
        v.clear();
        v.resize(n, 0.0);
    }
}

impl Lm {
    /// Builds the model and its freshly initialised parameters (seeded by `cfg.seed`).
    pub fn new(cfg: &ModelConfig) -> Result<(Lm, ParamStore)> {
        cfg.validate()?;
        let (store, ids) = LmIds::build(cfg);
        let layers = ids
            .blocks
            .iter()
            .map(|b| AsaLayer::new(cfg, b.attn.clone()))
            .collect();
        let rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5eed_d20b);
        Ok((
            Lm {
                cfg: cfg.clone(),
                ids,
                layers,
                rng,
            },
            store,
        ))
    }

    /// Sets the intervention of every layer (intervene variant).
    /// Which form of the write scan every layer runs (the chunk form by default).
    pub fn set_scan_form(&mut self, form: ScanForm) {
        for l in &mut self.layers {
            l.scan_form = form;
        }
    }

    pub fn set_intervention(&mut self, it: &Intervention) {
        for l in &mut self.layers {
            l.intervention = it.clone();
        }
    }

    /// Reseeds the dropout / noise generator.
    pub fn reseed(&mut self, seed: u64) {
        self.rng = ChaCha8Rng::seed_from_u64(seed);
    }

    pub fn rng_mut(&mut self) -> &mut ChaCha8Rng {
        &mut self.rng
    }

    /// Forward to logits [B,T,V]. With `opts.return_info`, returns each layer's info, plus
    /// `attn_out` [B,T,C] of every layer.
    pub fn forward(
        &mut self,
        p: &ParamStore,
        ids: &[u32],
        b: usize,
        t: usize,
        opts: &AsaOptions,
        cache: &mut LmCache,
    ) -> Result<Option<Vec<Info>>> {
        self.forward_hooked(p, ids, b, t, opts, &LmHooks::default(), cache)
    }

    /// `forward` with interventions for analysis (see `LmHooks`).
    pub fn forward_hooked(
        &mut self,
        p: &ParamStore,
        ids: &[u32],
        b: usize,
        t: usize,
        opts: &AsaOptions,
        hooks: &LmHooks,
        cache: &mut LmCache,
    ) -> Result<Option<Vec<Info>>> {
        self.cfg.check_ids(ids, b, t)?;
        hooks.check(self.cfg.num_layers, b * t * self.cfg.embed_dim)?;
        let cfg = self.cfg.clone();
        let (c, v, hid) = (cfg.embed_dim, cfg.vocab_size, cfg.hidden_dim());
        let n = b * t;
        cache.b = b;
        cache.t = t;
        cache.ids.clear();
        cache.ids.extend_from_slice(ids);
        let pdrop = if opts.training {
            cfg.dropout as f32
        } else {
            0.0
        };

        // embeddings: [B,T,C]
        let mut emb = ops::zeros(n * c);
        let wpe = self.ids.pos_emb.map(|i| p.data[i].as_slice());
        ops::encoder_forward(&mut emb, ids, &p.data[self.ids.token_emb], wpe, b, t, c);
        let mut x0 = Vec::new();
        ops::dropout_saved(&mut x0, &mut cache.emask, &emb, pdrop, &mut self.rng);

        cache
            .blocks
            .resize_with(cfg.num_layers, BlockCache::default);
        let mut infos = opts.return_info.then(Vec::new);
        // the residual stream (the embeddings themselves are not kept: the backward needs ids)
        let mut x = if x0.is_empty() { emb } else { x0 };
        for (l, bc) in cache.blocks.iter_mut().enumerate() {
            let bid: &BlockIds = &self.ids.blocks[l];
            if let Some(Some(delta)) = hooks.residual_add.get(l) {
                x.iter_mut().zip(delta).for_each(|(a, d)| *a += d);
            }
            bc.x.clone_from(&x);
            // ln1, the attention's and the MLP's outputs are not kept: the attention saves its
            // input itself and the residual adds need no backward input
            let mut ln1 = ops::zeros(n * c);
            resize(&mut bc.ln1_mean, n);
            resize(&mut bc.ln1_rstd, n);
            ops::layernorm_forward(
                &mut ln1,
                &mut bc.ln1_mean,
                &mut bc.ln1_rstd,
                &x,
                &p.data[bid.ln_1_w],
                &p.data[bid.ln_1_b],
                n,
                c,
            );
            let mut attn_out = ops::zeros(n * c);
            let layer_opts;
            let lo = match hooks.layer_routing.get(l) {
                Some(Some(r)) => {
                    layer_opts = AsaOptions {
                        routing: r.clone(),
                        ..opts.clone()
                    };
                    &layer_opts
                }
                _ => opts,
            };
            let info = self.layers[l].forward(
                p,
                &ln1,
                b,
                t,
                lo,
                &mut bc.attn,
                &mut self.rng,
                &mut attn_out,
            )?;
            if let (Some(infos), Some(mut info)) = (infos.as_mut(), info) {
                info.insert("attn_out".into(), (vec![b, t, c], attn_out.clone()));
                infos.push(info);
            }
            resize(&mut bc.x1, n * c);
            ops::residual_forward(&mut bc.x1, &x, &attn_out);
            drop((ln1, attn_out));
            resize(&mut bc.ln2, n * c);
            resize(&mut bc.ln2_mean, n);
            resize(&mut bc.ln2_rstd, n);
            ops::layernorm_forward(
                &mut bc.ln2,
                &mut bc.ln2_mean,
                &mut bc.ln2_rstd,
                &bc.x1,
                &p.data[bid.ln_2_w],
                &p.data[bid.ln_2_b],
                n,
                c,
            );
            resize(&mut bc.h, n * hid);
            ops::matmul_forward(
                &mut bc.h,
                &bc.ln2,
                &p.data[bid.mlp_0_w],
                bid.mlp_0_b.map(|i| p.data[i].as_slice()),
                n,
                c,
                hid,
            );
            resize(&mut bc.g, n * hid);
            ops::gelu_forward(&mut bc.g, &bc.h);
            ops::dropout_saved(&mut bc.gd, &mut bc.gmask, &bc.g, pdrop, &mut self.rng);
            let mut m = ops::zeros(n * c);
            ops::matmul_forward(
                &mut m,
                ops::dropped(&bc.gd, &bc.g),
                &p.data[bid.mlp_3_w],
                bid.mlp_3_b.map(|i| p.data[i].as_slice()),
                n,
                hid,
                c,
            );
            let mut md = Vec::new();
            ops::dropout_saved(&mut md, &mut bc.mmask, &m, pdrop, &mut self.rng);
            ops::residual_forward(&mut x, &bc.x1, ops::dropped(&md, &m));
        }
        cache.xf = x;
        resize(&mut cache.lnf, n * c);
        resize(&mut cache.lnf_mean, n);
        resize(&mut cache.lnf_rstd, n);
        ops::layernorm_forward(
            &mut cache.lnf,
            &mut cache.lnf_mean,
            &mut cache.lnf_rstd,
            &cache.xf,
            &p.data[self.ids.ln_f_w],
            &p.data[self.ids.ln_f_b],
            n,
            c,
        );
        resize(&mut cache.logits, n * v);
        ops::matmul_forward(
            &mut cache.logits,
            &cache.lnf,
            &p.data[self.ids.head()],
            None,
            n,
            c,
            v,
        );
        Ok(infos)
    }

    /// Mean cross-entropy of the last forward's logits against `targets` [B,T] over valid positions
    /// (`valid` [B,T]; targets < 0 are ignored too). Saves what `backward` needs.
    pub fn loss(
        &self,
        cache: &mut LmCache,
        targets: &[i64],
        valid: Option<&[bool]>,
    ) -> Result<f64> {
        let (n, v) = (cache.b * cache.t, self.cfg.vocab_size);
        if targets.len() != n {
            return Err(AsaError::Input(format!(
                "expected {n} targets, got {}",
                targets.len()
            )));
        }
        cache.targets = targets.to_vec();
        cache.valid = valid.map(|x| x.to_vec());
        cache.probs_valid = false;
        let (loss, count) = cache.softmax_rows(v)?;
        if count == 0 {
            return Err(AsaError::Input(
                "no valid target positions in the batch".into(),
            ));
        }
        cache.count = count;
        cache.probs_valid = true;
        Ok(loss)
    }

    /// Backward of `loss` through the whole model; gradients are added into `grads`.
    pub fn backward(
        &self,
        p: &ParamStore,
        cache: &mut LmCache,
        opts: &AsaOptions,
        grads: &mut ParamStore,
    ) {
        let (n, v) = (cache.b * cache.t, self.cfg.vocab_size);
        if !cache.probs_valid {
            // consumed by an earlier backward of this forward: recompute (rare)
            cache
                .softmax_rows(v)
                .expect("targets were checked by loss()");
        }
        // dlogits in place of the probabilities: no [B,T,V] buffer to allocate or clear
        let mut dlogits = std::mem::take(&mut cache.probs);
        cache.probs_valid = false;
        ops::crossentropy_backward_inplace(
            &mut dlogits,
            Some(&cache.row_inv),
            &cache.targets,
            cache.valid.as_deref(),
            1.0 / cache.count as f32,
            n,
            v,
        );
        self.backward_from_logits(p, cache, opts, &dlogits, grads);
        cache.probs = dlogits;
    }

    /// Backward from an arbitrary dL/dlogits [B,T,V].
    pub fn backward_from_logits(
        &self,
        p: &ParamStore,
        cache: &LmCache,
        opts: &AsaOptions,
        dlogits: &[f32],
        grads: &mut ParamStore,
    ) {
        let cfg = &self.cfg;
        let (b, t) = (cache.b, cache.t);
        let (c, v, hid) = (cfg.embed_dim, cfg.vocab_size, cfg.hidden_dim());
        let n = b * t;
        let head = self.ids.head();
        let mut dlnf = ops::zeros(n * c);
        ops::matmul_backward(
            &mut dlnf,
            &mut grads.data[head],
            None,
            dlogits,
            &cache.lnf,
            &p.data[head],
            n,
            c,
            v,
        );
        let mut dx = ops::zeros(n * c);
        {
            let [gw, gb] = grads
                .data
                .get_disjoint_mut([self.ids.ln_f_w, self.ids.ln_f_b])
                .expect("distinct ids");
            ops::layernorm_backward(
                &mut dx,
                gw,
                gb,
                &dlnf,
                &cache.xf,
                &p.data[self.ids.ln_f_w],
                &cache.lnf_mean,
                &cache.lnf_rstd,
                n,
                c,
            );
        }
        for l in (0..cfg.num_layers).rev() {
            let bc = &cache.blocks[l];
            let bid = &self.ids.blocks[l];
            // x2 = x1 + drop(mlp3(drop(gelu(mlp0(ln2(x1))))))
            let dm = ops::dropout_grad(&dx, &bc.mmask);
            let mut dgd = ops::zeros(n * hid);
            {
                let (w, bias) = (bid.mlp_3_w, bid.mlp_3_b);
                let (gw, gb) = two_mut(&mut grads.data, w, bias);
                let gd = ops::dropped(&bc.gd, &bc.g);
                ops::matmul_backward(&mut dgd, gw, gb, &dm, gd, &p.data[w], n, hid, c);
            }
            drop(dm);
            let dg = ops::dropout_grad(&dgd, &bc.gmask);
            let mut dh = ops::zeros(n * hid);
            ops::gelu_backward(&mut dh, &bc.h, &dg);
            let mut dln2 = ops::zeros(n * c);
            {
                let (w, bias) = (bid.mlp_0_w, bid.mlp_0_b);
                let (gw, gb) = two_mut(&mut grads.data, w, bias);
                ops::matmul_backward(&mut dln2, gw, gb, &dh, &bc.ln2, &p.data[w], n, c, hid);
            }
            let mut dx1 = ops::copied(&dx);
            {
                let [gw, gb] = grads
                    .data
                    .get_disjoint_mut([bid.ln_2_w, bid.ln_2_b])
                    .expect("distinct ids");
                ops::layernorm_backward(
                    &mut dx1,
                    gw,
                    gb,
                    &dln2,
                    &bc.x1,
                    &p.data[bid.ln_2_w],
                    &bc.ln2_mean,
                    &bc.ln2_rstd,
                    n,
                    c,
                );
            }
            // x1 = x + attn(ln1(x))
            let mut dln1 = ops::zeros(n * c);
            let ag = self.layers[l].backward(p, &bc.attn, opts, &dx1, &mut dln1);
            ag.accumulate_into(grads, &bid.attn);
            let mut dxin = dx1;
            {
                let [gw, gb] = grads
                    .data
                    .get_disjoint_mut([bid.ln_1_w, bid.ln_1_b])
                    .expect("distinct ids");
                ops::layernorm_backward(
                    &mut dxin,
                    gw,
                    gb,
                    &dln1,
                    &bc.x,
                    &p.data[bid.ln_1_w],
                    &bc.ln1_mean,
                    &bc.ln1_rstd,
                    n,
                    c,
                );
            }
            dx = dxin;
        }
        let demb = ops::dropout_grad(&dx, &cache.emask);
        match self.ids.pos_emb {
            Some(pi) => {
                let [gt, gp] = grads
                    .data
                    .get_disjoint_mut([self.ids.token_emb, pi])
                    .expect("distinct ids");
                ops::encoder_backward(gt, Some(gp), &demb, &cache.ids, b, t, c);
            }
            None => ops::encoder_backward(
                &mut grads.data[self.ids.token_emb],
                None,
                &demb,
                &cache.ids,
                b,
                t,
                c,
            ),
        }
    }
}

/// Mutable weight gradient and optional bias gradient of one Linear.
fn two_mut(data: &mut [Vec<f32>], w: usize, b: Option<usize>) -> (&mut [f32], Option<&mut [f32]>) {
    match b {
        Some(bi) => {
            let [gw, gb] = data.get_disjoint_mut([w, bi]).expect("distinct ids");
            (gw.as_mut_slice(), Some(gb.as_mut_slice()))
        }
        None => (data[w].as_mut_slice(), None),
    }
}
