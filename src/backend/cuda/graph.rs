//! CUDA graphs for the training step: capture the step's device work once, check each later
//! step against it, replay it as one graph launch.
//!
//! A training step makes the same device requests with the same arguments every step once its
//! buffers are allocated: what the host computes per step (the learned scalars, AdamW's
//! scalars, the dropout seeds and slot keep masks) travels in the batch's upload and is read
//! there by the kernels (ROADMAP, "replayable step"). The step's body (forward, loss, backward,
//! norm, clipping, AdamW and the read-back gather) is then one graph:
//!
//! - a step with no graph held runs eagerly (the first: it allocates), the next one is
//!   **captured** (the device records the requests instead of running them; an allocation or a
//!   host transfer inside the body fails the capture) and the graph launched;
//! - every later step runs the body's host code in **check** mode: each request is compared
//!   (as a 64-bit hash of kernel, launch shape and arguments) with the captured one and
//!   nothing is issued; when all match, the graph is launched. A step that differs (another
//!   shape, another target count, a buffer that moved) runs eagerly and drops the graph, and
//!   the next step captures again; after [`MAX_FAILURES`] graphs in a row that did not hold
//!   (shapes that keep changing), the model stays eager.
//!
//! So a replay runs exactly the requests the eager step would make, or does not run at all.
//! [`StepGraph`] is the bookkeeping that the devices share (the CUDA backend captures with
//! the driver's stream capture; the tests' SIMT emulator records and replays in software);
//! [`run_step`] is the driver.

use std::cell::{Cell, RefCell};

use cudarc::driver::LaunchConfig;

use super::{Device, KArg};
use crate::error::{AsaError, Result};

/// Graphs in a row that did not hold (a failed capture, or a step that differed from the
/// graph, with no replay since) before a model stays eager.
pub const MAX_FAILURES: u32 = 3;

/// `ASA_CUDA_GRAPH=0` turns graph capture off (A/B timing, debugging).
pub const GRAPH_ENV: &str = "ASA_CUDA_GRAPH";

/// Whether graph capture is on for new models (`ASA_CUDA_GRAPH` unset, or not "0").
pub fn graphs_from_env() -> bool {
    std::env::var(GRAPH_ENV).map_or(true, |v| v != "0")
}

/// What the device does with the requests it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// issue and run them
    Eager,
    /// record them into the graph (not run)
    Capture,
    /// compare them with the graph's (neither run nor recorded)
    Check,
}

/// What a device does with one request ([`StepGraph::note`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Issue {
    /// run it now
    Run,
    /// record it (a CUDA stream under capture records what it is given)
    Record,
    /// nothing: it was only checked
    Skip,
}

/// A device's graph bookkeeping: the mode and the captured requests' hashes.
#[derive(Debug)]
pub struct StepGraph {
    mode: Cell<Mode>,
    trace: RefCell<Vec<u64>>,
    at: Cell<usize>,
    differs: Cell<bool>,
}

impl Default for StepGraph {
    fn default() -> Self {
        StepGraph {
            mode: Cell::new(Mode::Eager),
            trace: RefCell::new(Vec::new()),
            at: Cell::new(0),
            differs: Cell::new(false),
        }
    }
}

impl StepGraph {
    pub fn mode(&self) -> Mode {
        self.mode.get()
    }

    /// Starts capturing (a new trace) or checking (against the trace held).
    pub fn begin(&self, mode: Mode) {
        if mode == Mode::Capture {
            self.trace.borrow_mut().clear();
        }
        self.at.set(0);
        self.differs.set(false);
        self.mode.set(mode);
    }

    /// Back to eager: whether the capture took every request (none refused), or for a check,
    /// whether every request matched the trace and none was missing.
    pub fn end(&self) -> bool {
        let ok = !self.differs.get() && self.at.get() == self.trace.borrow().len();
        self.mode.set(Mode::Eager);
        ok
    }

    /// The captured requests (0 before a capture).
    pub fn len(&self) -> usize {
        self.trace.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One request, as its hash: what the device does with it.
    pub fn note(&self, hash: impl FnOnce() -> u64) -> Issue {
        match self.mode.get() {
            Mode::Eager => Issue::Run,
            Mode::Capture => {
                self.trace.borrow_mut().push(hash());
                self.at.set(self.at.get() + 1);
                Issue::Record
            }
            Mode::Check => {
                let i = self.at.get();
                if self.trace.borrow().get(i) != Some(&hash()) {
                    self.differs.set(true);
                }
                self.at.set(i + 1);
                Issue::Skip
            }
        }
    }

    /// A request that a graph cannot hold (a host transfer or synchronisation, an
    /// allocation): an error while capturing or checking, so that the step runs eagerly.
    pub fn refuse(&self, what: &str) -> Result<()> {
        match self.mode.get() {
            Mode::Eager => Ok(()),
            m => {
                self.differs.set(true);
                Err(AsaError::Device(format!(
                    "{what} inside a graph-captured step ({m:?})"
                )))
            }
        }
    }
}

/// FNV-1a over 64-bit words.
struct Fnv(u64);

impl Fnv {
    fn new(tag: u64) -> Self {
        let mut h = Fnv(0xcbf2_9ce4_8422_2325);
        h.word(tag);
        h
    }
    fn word(&mut self, x: u64) {
        for b in x.to_le_bytes() {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn bytes(&mut self, x: &[u8]) {
        self.word(x.len() as u64);
        for &b in x {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// A kernel launch: its name, grid, block, dynamic shared memory and arguments (bit patterns).
pub fn hash_launch(name: &str, cfg: &LaunchConfig, args: &[KArg]) -> u64 {
    let mut h = Fnv::new(1);
    h.bytes(name.as_bytes());
    let (g, b) = (cfg.grid_dim, cfg.block_dim);
    for x in [g.0, g.1, g.2, b.0, b.1, b.2, cfg.shared_mem_bytes] {
        h.word(x as u64);
    }
    for a in args {
        let (tag, x) = match *a {
            KArg::Ptr(p, n) => {
                h.word(n);
                (0, p)
            }
            KArg::I32(x) => (1, x as u32 as u64),
            KArg::I64(x) => (2, x as u64),
            KArg::U64(x) => (3, x),
            KArg::F32(x) => (4, x.to_bits() as u64),
            KArg::F64(x) => (5, x.to_bits()),
        };
        h.word(tag);
        h.word(x);
    }
    h.0
}

/// A request of kind `tag` made of `words` (a memset, a copy, a GEMM call: `Gemm::hash`).
pub fn hash_words(tag: u64, words: &[u64]) -> u64 {
    let mut h = Fnv::new(tag);
    for &x in words {
        h.word(x);
    }
    h.0
}

/// A memset of `bytes` bytes at `ptr`.
pub fn hash_memset(ptr: u64, bytes: usize) -> u64 {
    hash_words(2, &[ptr, bytes as u64])
}

/// A device copy of `n` f32s.
pub fn hash_copy(dst: u64, src: u64, n: usize) -> u64 {
    hash_words(3, &[dst, src, n as u64])
}

/// How a model's steps have used graphs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GraphStats {
    /// steps run eagerly (no graph, or graphs off)
    pub eager: u64,
    /// graphs captured (each also launched once)
    pub captures: u64,
    /// steps launched as the held graph after a check
    pub replays: u64,
    /// graphs dropped: a failed capture, or a step that differed from the graph
    pub dropped: u64,
    /// requests in the last graph captured
    pub nodes: u64,
}

/// A model's graph state ([`run_step`]).
#[derive(Debug)]
pub struct GraphState {
    /// graphs on (`ASA_CUDA_GRAPH`, [`GraphState::set_enabled`])
    enabled: bool,
    /// a graph is held by the device
    held: bool,
    /// the last body ran eagerly (its buffers exist: a capture needs no allocation)
    warm: bool,
    failures: u32,
    pub stats: GraphStats,
}

impl Default for GraphState {
    fn default() -> Self {
        GraphState {
            enabled: graphs_from_env(),
            held: false,
            warm: false,
            failures: 0,
            stats: GraphStats::default(),
        }
    }
}

impl GraphState {
    pub fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }
}

/// Runs a step's `body` on `s` the graph way (module docs): eagerly, captured and launched,
/// or checked and launched; `dev` and `state` pick the device and the graph state out of
/// `s`. The body must be re-runnable: all of its host-side effects are the same when it runs
/// twice (it allocates on its first run only, uploads and downloads nothing).
pub fn run_step<S, D: Device + ?Sized>(
    s: &mut S,
    dev: fn(&S) -> &D,
    state: fn(&mut S) -> &mut GraphState,
    body: impl Fn(&mut S) -> Result<()>,
) -> Result<()> {
    let st = state(s);
    let usable = st.enabled && st.failures < MAX_FAILURES && dev(s).graph().is_some();
    let st = state(s);
    if !usable || !st.warm {
        return run_eager(s, state, &body, false);
    }
    if st.held {
        let g = dev(s).graph().expect("checked above");
        g.begin(Mode::Check);
        let r = body(s);
        let g = dev(s).graph().expect("checked above");
        if g.end() && r.is_ok() {
            let st = state(s);
            st.stats.replays += 1;
            st.failures = 0;
            return dev(s).graph_launch();
        }
        // the step differs from the graph: eager, and a new capture next step
        return run_eager(s, state, &body, true);
    }
    if dev(s).graph_capture_begin().is_err() {
        // the device cannot capture: eager from now on
        state(s).failures = MAX_FAILURES;
        return run_eager(s, state, &body, false);
    }
    let r = body(s);
    let ended = dev(s).graph_capture_end();
    if r.is_err() || ended.is_err() {
        // nothing of the body ran: run it eagerly
        return run_eager(s, state, &body, true);
    }
    let nodes = dev(s).graph().map_or(0, |g| g.len() as u64);
    let st = state(s);
    st.held = true;
    st.stats.captures += 1;
    st.stats.nodes = nodes;
    dev(s).graph_launch()
}

/// Runs the body eagerly, with no graph held (`dropped`: after one that did not hold); its
/// buffers then exist, so the next step may capture.
fn run_eager<S>(
    s: &mut S,
    state: fn(&mut S) -> &mut GraphState,
    body: &impl Fn(&mut S) -> Result<()>,
    dropped: bool,
) -> Result<()> {
    let st = state(s);
    st.held = false;
    if dropped {
        st.failures += 1;
        st.stats.dropped += 1;
    }
    st.stats.eager += 1;
    body(s)?;
    state(s).warm = true;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_matches_only_the_same_requests_in_the_same_order() {
        let g = StepGraph::default();
        let reqs = [hash_memset(64, 8), hash_copy(1, 2, 3), hash_memset(64, 16)];
        g.begin(Mode::Capture);
        for &r in &reqs {
            assert_eq!(g.note(|| r), Issue::Record);
        }
        assert!(g.end());
        assert_eq!(g.len(), 3);
        g.begin(Mode::Check);
        for &r in &reqs {
            assert_eq!(g.note(|| r), Issue::Skip);
        }
        assert!(g.end(), "the same requests");
        g.begin(Mode::Check);
        for &r in &[reqs[0], reqs[2], reqs[1]] {
            g.note(|| r);
        }
        assert!(!g.end(), "another order");
        g.begin(Mode::Check);
        g.note(|| reqs[0]);
        assert!(!g.end(), "a request missing");
        g.begin(Mode::Check);
        for &r in reqs.iter().chain(&reqs[..1]) {
            g.note(|| r);
        }
        assert!(!g.end(), "one more");
        assert_eq!(g.note(|| 0), Issue::Run, "eager after end");
        g.begin(Mode::Check);
        assert!(g.refuse("a download").is_err());
        assert!(!g.end(), "a refused request fails the check");
        assert!(g.refuse("a download").is_ok(), "eager");
    }

    #[test]
    fn launch_hashes_see_every_argument_bit() {
        let cfg = LaunchConfig {
            grid_dim: (4, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [KArg::Ptr(256, 64), KArg::F32(0.5), KArg::I64(3)];
        let h = hash_launch("k", &cfg, &args);
        assert_eq!(h, hash_launch("k", &cfg, &args));
        assert_ne!(h, hash_launch("k2", &cfg, &args));
        let mut other = cfg;
        other.shared_mem_bytes = 16;
        assert_ne!(h, hash_launch("k", &other, &args));
        for (i, a) in [KArg::Ptr(512, 64), KArg::F32(0.25), KArg::I64(4)]
            .into_iter()
            .enumerate()
        {
            let mut changed = args;
            changed[i] = a;
            assert_ne!(h, hash_launch("k", &cfg, &changed), "argument {i}");
        }
        // -0.0 and 0.0 are different arguments
        assert_ne!(
            hash_launch("k", &cfg, &[KArg::F32(0.0)]),
            hash_launch("k", &cfg, &[KArg::F32(-0.0)])
        );
    }
}
