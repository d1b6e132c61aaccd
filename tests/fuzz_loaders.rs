//! Fuzzed loaders: every loader of a file a user may hand us, fed thousands of mutated copies of a
//! valid file (bit flips, byte overwrites, truncation at every length class, inserted and deleted
//! bytes, huge counts and lengths written into header fields, structure-aware edits of the
//! headers). Each case must end in a valid load or a clear error (one line): never a panic (caught
//! with `catch_unwind` and reported with its case), an abort, or a single allocation larger than
//! the file justifies (a counting global allocator; over a hard cap it refuses, which aborts with
//! a message naming the size).
//!
//! Loaders: safetensors (`parse_safetensors`, `read_checkpoint`), `.pt` (`read_pt` on the raw
//! file, on re-zipped mutated pickles with valid CRCs, and `load_pickle`), token shards + meta
//! (`open_prepared`), run configs (`read_run_config`, TOML and JSON) and run checkpoints
//! (`train::load_run`). Deterministic (ChaCha8, fixed seeds); per-loader counts are printed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[path = "support/runs.rs"]
mod runs;

// ------------------------------------------------------------------------------------------------
// Allocation guard

// Per-thread limit on the bytes a case holds at once (usize::MAX outside a case), the bytes it
// holds now, and the most it held over the limit. Counting live bytes, not single requests,
// also catches a model of 100000 small layers built from a corrupt header.
thread_local! {
    static LIMIT: Cell<usize> = const { Cell::new(usize::MAX) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static OVER: Cell<usize> = const { Cell::new(0) };
}

/// Requests that would take a case over this are refused outright (the process aborts, after
/// saying why) instead of being tried: gigabytes from a kilobyte file is the bug being hunted.
const HARD_CAP: usize = 1 << 31;

struct Guard;

/// Accounts `delta` bytes to this thread's case; false when the request must be refused.
fn admit(delta: isize) -> bool {
    let Ok(lim) = LIMIT.try_with(|c| c.get()) else {
        return true;
    };
    if lim == usize::MAX {
        return true;
    }
    let live = LIVE.with(|l| {
        let v = l.get().saturating_add(delta);
        l.set(v);
        v
    });
    if live > 0 && live as usize > lim {
        OVER.with(|o| o.set(o.get().max(live as usize)));
        if live as usize > HARD_CAP {
            let msg = b"fuzz_loaders: a loader asked for over 2 GiB from a small file\n";
            // SAFETY: writes a static buffer to stderr; no allocation.
            unsafe {
                libc::write(2, msg.as_ptr().cast(), msg.len());
            }
            LIVE.with(|l| l.set(l.get() - delta));
            return false;
        }
    }
    true
}

// SAFETY: forwards to the system allocator; only refuses (null) requests over HARD_CAP.
unsafe impl GlobalAlloc for Guard {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if !admit(l.size() as isize) {
            return std::ptr::null_mut();
        }
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if !admit(l.size() as isize) {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        admit(-(l.size() as isize));
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        if !admit(new_size as isize - l.size() as isize) {
            return std::ptr::null_mut();
        }
        System.realloc(p, l, new_size)
    }
}

#[global_allocator]
static GUARD: Guard = Guard;

// ------------------------------------------------------------------------------------------------
// Harness

/// Outcomes of one loader's cases.
struct Tally {
    loader: &'static str,
    ok: usize,
    err: usize,
    failures: Vec<String>,
}

impl Tally {
    fn new(loader: &'static str) -> Self {
        Tally {
            loader,
            ok: 0,
            err: 0,
            failures: Vec::new(),
        }
    }

    /// Runs one case. `input_bytes` sizes the allocation limit: max(32 MiB, 32 x input).
    fn case<F: FnOnce() -> asa::Result<()>>(&mut self, label: &str, input_bytes: usize, f: F) {
        let limit = (32usize << 20).max(input_bytes.saturating_mul(32));
        LIVE.with(|l| l.set(0));
        OVER.with(|o| o.set(0));
        LIMIT.with(|c| c.set(limit));
        let res = catch_unwind(AssertUnwindSafe(f));
        LIMIT.with(|c| c.set(usize::MAX));
        let over = OVER.with(|o| o.get());
        // a panic first (its backtrace may allocate a lot), then the allocation, then the result
        let res = match res {
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                self.failures.push(format!("{label}: PANIC: {msg}"));
                return;
            }
            Ok(r) => r,
        };
        if over > 0 {
            self.failures.push(format!(
                "{label}: held {over} bytes at once for a {input_bytes}-byte input (limit {limit})"
            ));
            return;
        }
        match res {
            Ok(()) => self.ok += 1,
            Err(e) => {
                let m = e.to_string();
                if m.trim().is_empty() || m.contains('\n') {
                    self.failures.push(format!(
                        "{label}: unclear error (empty or multi-line): {m:?}"
                    ));
                } else {
                    self.err += 1;
                }
            }
        }
    }

    /// Prints the counts (uncaptured, so plain `cargo test` shows them) and fails on any bad case.
    fn finish(self, min_cases: usize) {
        let _ = writeln!(
            std::io::stderr(),
            "fuzz_loaders {}: {} cases: {} loaded, {} clear errors, {} bad",
            self.loader,
            self.ok + self.err + self.failures.len(),
            self.ok,
            self.err,
            self.failures.len()
        );
        assert!(
            self.failures.is_empty(),
            "{}: {} bad case(s):\n{}",
            self.loader,
            self.failures.len(),
            self.failures
                .iter()
                .take(30)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(
            self.ok + self.err >= min_cases,
            "{}: only {} cases ran",
            self.loader,
            self.ok + self.err
        );
    }
}

/// The harness itself can fail: a panic, an over-sized allocation and a multi-line error are
/// each reported as a bad case.
#[test]
fn harness_reports_panics_big_allocations_and_unclear_errors() {
    let mut t = Tally::new("self-test");
    t.case("panic", 10, || panic!("boom"));
    t.case("alloc", 10, || {
        let v = std::hint::black_box(vec![1u8; std::hint::black_box(64 << 20)]);
        assert_eq!(v[12345], 1);
        Ok(())
    });
    t.case("multi-line", 10, || {
        Err(asa::AsaError::Io {
            path: "x".into(),
            source: std::io::Error::other("a\nb"),
        })
    });
    t.case("fine", 10, || Ok(()));
    t.case("clear", 10, || Err(asa::AsaError::Input("clear".into())));
    assert_eq!((t.ok, t.err), (1, 1), "{:?}", t.failures);
    assert_eq!(t.failures.len(), 3, "{:?}", t.failures);
    assert!(t.failures[0].contains("PANIC: boom"));
    assert!(
        t.failures[1].contains("held 67108864 bytes"),
        "{:?}",
        t.failures
    );
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// Huge and edge values written into binary header fields.
const HUGE: [u64; 8] = [
    u64::MAX,
    u64::MAX / 2,
    1 << 62,
    1 << 40,
    u32::MAX as u64,
    0x8000_0000,
    0,
    1,
];

/// One random mutation of `b` (described in the returned label).
fn mutate(rng: &mut ChaCha8Rng, b: &[u8], hot: &[usize]) -> (Vec<u8>, String) {
    let mut v = b.to_vec();
    let n = v.len().max(1);
    // positions in the first bytes (headers) are chosen more often than the data
    let pos = |rng: &mut ChaCha8Rng| -> usize {
        match rng.gen_range(0..4) {
            0 if !hot.is_empty() => hot[rng.gen_range(0..hot.len())].min(n - 1),
            1 => rng.gen_range(0..n.min(256)),
            _ => rng.gen_range(0..n),
        }
    };
    let kind = rng.gen_range(0..8);
    let label = match kind {
        0 => {
            let k = rng.gen_range(1..=4);
            for _ in 0..k {
                let i = pos(rng);
                if i < v.len() {
                    v[i] ^= 1 << rng.gen_range(0..8);
                }
            }
            format!("{k} bit flip(s)")
        }
        1 => {
            let i = pos(rng);
            let x: u8 = rng.gen();
            if i < v.len() {
                v[i] = x;
            }
            format!("byte {i} = {x:#x}")
        }
        2 => {
            // truncation at every length class: tiny, around the header, random, just short
            let len = match rng.gen_range(0..4) {
                0 => rng.gen_range(0..16.min(n)),
                1 => rng.gen_range(0..n.min(512)),
                2 => rng.gen_range(0..n),
                _ => n.saturating_sub(rng.gen_range(1..=16)),
            };
            v.truncate(len);
            format!("truncated to {len}")
        }
        3 => {
            let i = pos(rng);
            let h = HUGE[rng.gen_range(0..HUGE.len())];
            let w = [2usize, 4, 8][rng.gen_range(0..3)];
            let bytes = h.to_le_bytes();
            for j in 0..w {
                if i + j < v.len() {
                    v[i + j] = bytes[j];
                }
            }
            format!("{w} bytes at {i} = {h:#x}")
        }
        4 => {
            let i = pos(rng).min(v.len());
            let x: u8 = rng.gen();
            v.insert(i, x);
            format!("inserted {x:#x} at {i}")
        }
        5 => {
            let i = pos(rng);
            if i < v.len() {
                v.remove(i);
            }
            format!("deleted byte {i}")
        }
        6 => {
            // copy a random range over another (duplicated structures)
            let a = rng.gen_range(0..n);
            let c = pos(rng);
            let len = rng.gen_range(1..=64).min(n - a);
            let src: Vec<u8> = v.get(a..a + len).map(|s| s.to_vec()).unwrap_or_default();
            for (j, x) in src.into_iter().enumerate() {
                if c + j < v.len() {
                    v[c + j] = x;
                }
            }
            format!("copied {len} bytes from {a} to {c}")
        }
        _ => {
            let i = pos(rng);
            let len = rng.gen_range(1..=32);
            for j in i..(i + len).min(v.len()) {
                v[j] = rng.gen();
            }
            format!("{len} random bytes at {i}")
        }
    };
    (v, label)
}

/// Replaces one number in `text` with an edge value (huge, negative, fractional, NaN, a string).
fn mutate_number(rng: &mut ChaCha8Rng, text: &str) -> (String, String) {
    const EDGE: [&str; 16] = [
        "18446744073709551615",
        "18446744073709551616",
        "9223372036854775807",
        "-1",
        "0",
        "1e308",
        "-1e308",
        "1048576",
        "100000",
        "4294967296",
        "0.5",
        "nan",
        "inf",
        "NaN",
        "\"x\"",
        "null",
    ];
    let bytes = text.as_bytes();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() && (i == 0 || !bytes[i - 1].is_ascii_alphanumeric()) {
            let s = i;
            while i < bytes.len() && (bytes[i].is_ascii_digit() || b".eE-+".contains(&bytes[i])) {
                i += 1;
            }
            spans.push((s, i));
        } else {
            i += 1;
        }
    }
    if spans.is_empty() {
        return (text.to_string(), "no number".into());
    }
    let (s, e) = spans[rng.gen_range(0..spans.len())];
    let v = EDGE[rng.gen_range(0..EDGE.len())];
    (
        format!("{}{v}{}", &text[..s], &text[e..]),
        format!("number {:?} -> {v}", &text[s..e]),
    )
}

/// A text mutation: a number edge value, a dropped or duplicated line, or a byte mutation.
fn mutate_text(rng: &mut ChaCha8Rng, text: &str) -> (Vec<u8>, String) {
    match rng.gen_range(0..6) {
        0 | 1 => {
            let (t, l) = mutate_number(rng, text);
            (t.into_bytes(), l)
        }
        2 => {
            let lines: Vec<&str> = text.lines().collect();
            let k = rng.gen_range(0..lines.len());
            let out: Vec<&str> = lines
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != k)
                .map(|(_, l)| *l)
                .collect();
            (out.join("\n").into_bytes(), format!("dropped line {k}"))
        }
        3 => {
            let lines: Vec<&str> = text.lines().collect();
            let k = rng.gen_range(0..lines.len());
            let mut out = lines.clone();
            out.insert(k, lines[k]);
            (out.join("\n").into_bytes(), format!("duplicated line {k}"))
        }
        _ => mutate(rng, text.as_bytes(), &[]),
    }
}

// ------------------------------------------------------------------------------------------------
// safetensors

/// A small model checkpoint as `save_params` writes it (with `asa_config` metadata).
fn small_model_file(dir: &Path) -> (PathBuf, asa::config::ModelConfig) {
    let cfg = asa::config::ModelConfig {
        vocab_size: 11,
        embed_dim: 8,
        num_layers: 1,
        num_heads: 2,
        num_slots: 3,
        slotspace_dim: 4,
        mlp_bias: Some(false),
        ..Default::default()
    };
    let (_, store) = asa::model::lm::Lm::new(&cfg).unwrap();
    let p = dir.join("model.safetensors");
    asa::checkpoint::save_params(&p, &store, cfg.tie_weights, Some(&cfg)).unwrap();
    (p, cfg)
}

/// Structure-aware header edits: a tensor's shape or offsets set to huge values, the header
/// length field set to a value, the metadata config's sizes set huge.
fn mutate_st_header(rng: &mut ChaCha8Rng, b: &[u8]) -> Option<(Vec<u8>, String)> {
    let n = u64::from_le_bytes(b.get(..8)?.try_into().ok()?) as usize;
    let text = std::str::from_utf8(b.get(8..8 + n)?).ok()?;
    let mut h: serde_json::Value = serde_json::from_str(text.trim_end()).ok()?;
    let obj = h.as_object_mut()?;
    let keys: Vec<String> = obj.keys().cloned().collect();
    let key = keys[rng.gen_range(0..keys.len())].clone();
    let big = HUGE[rng.gen_range(0..HUGE.len())];
    let label;
    if key == "__metadata__" {
        let m = obj.get_mut(&key)?.as_object_mut()?;
        let cfg_key = ["asa_config", "config"]
            .into_iter()
            .find(|k| m.contains_key(*k))?;
        let mut c: serde_json::Value = serde_json::from_str(m[cfg_key].as_str()?).ok()?;
        let f = [
            "embed_dim",
            "vocab_size",
            "num_layers",
            "max_seq_len",
            "num_heads",
            "num_slots",
        ][rng.gen_range(0..6)];
        let v = [1u64 << 20, 100_000, 1 << 32, u32::MAX as u64, 0][rng.gen_range(0..5)];
        c.as_object_mut()?.insert(f.into(), v.into());
        if f == "embed_dim" {
            c.as_object_mut()?.insert("num_heads".into(), 1.into());
        }
        m.insert(cfg_key.into(), c.to_string().into());
        label = format!("metadata {cfg_key}.{f} = {v}");
    } else {
        let t = obj.get_mut(&key)?.as_object_mut()?;
        match rng.gen_range(0..3) {
            0 => {
                let shape = t.get_mut("shape")?.as_array_mut()?;
                if shape.is_empty() {
                    shape.push(big.into());
                } else {
                    let i = rng.gen_range(0..shape.len());
                    shape[i] = big.into();
                }
                label = format!("{key}.shape[..] = {big}");
            }
            1 => {
                let off = t.get_mut("data_offsets")?.as_array_mut()?;
                let i = rng.gen_range(0..off.len());
                off[i] = big.into();
                label = format!("{key}.data_offsets[{i}] = {big}");
            }
            _ => {
                let d = ["F32", "I32", "BF16", "F64", "U8", "C64", ""][rng.gen_range(0..7)];
                t.insert("dtype".into(), d.into());
                label = format!("{key}.dtype = {d}");
            }
        }
    }
    let mut text = h.to_string();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&b[8 + n..]);
    Some((out, label))
}

#[test]
fn fuzz_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let (model, cfg) = small_model_file(dir.path());
    let bases: Vec<(String, Vec<u8>)> = vec![
        (
            "io.safetensors".into(),
            std::fs::read(fixture("legacy_pt/io.safetensors")).unwrap(),
        ),
        ("model.safetensors".into(), std::fs::read(&model).unwrap()),
    ];
    let mut t = Tally::new("safetensors");
    let mut rng = ChaCha8Rng::seed_from_u64(0x5afe);
    let case_path = dir.path().join("case.safetensors");
    for i in 0..3000 {
        let (name, base) = &bases[i % bases.len()];
        let hdr = 8 + u64::from_le_bytes(base[..8].try_into().unwrap()) as usize;
        let hot: Vec<usize> = (0..8).chain([hdr - 1, hdr, hdr + 1]).collect();
        let (bytes, what) = if rng.gen_range(0..3) == 0 {
            mutate_st_header(&mut rng, base).unwrap_or_else(|| mutate(&mut rng, base, &hot))
        } else {
            mutate(&mut rng, base, &hot)
        };
        let label = format!("{name} case {i}: {what}");
        let len = bytes.len();
        if i % 4 == 0 {
            // the file path: format detection, metadata config, strict load into a model
            std::fs::write(&case_path, &bytes).unwrap();
            t.case(&label, len, || {
                let c = asa::checkpoint::read_checkpoint(&case_path)?;
                if let Some(cfg) = &c.config {
                    asa::checkpoint::ensure_config_fits(cfg, &c.tensors, "case")?;
                    cfg.validate()?;
                    let (_, mut store) = asa::model::lm::Lm::new(cfg)?;
                    asa::checkpoint::load_into(&mut store, &c.tensors, "case")?;
                }
                Ok(())
            });
        } else {
            t.case(&label, len, || {
                asa::checkpoint::st::parse_safetensors(&bytes, "case").map(|_| ())
            });
        }
    }
    let _ = cfg;
    t.finish(2900);
}

// ------------------------------------------------------------------------------------------------
// .pt (zip + pickle)

/// The members of a zip, in order.
fn zip_members(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    (0..z.len())
        .map(|i| {
            let mut f = z.by_index(i).unwrap();
            let mut b = Vec::new();
            f.read_to_end(&mut b).unwrap();
            (f.name().to_string(), b)
        })
        .collect()
}

/// A stored (uncompressed) zip of `members`, as torch.save writes: valid CRCs.
fn write_zip(path: &Path, members: &[(String, Vec<u8>)]) {
    let mut w = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opt =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, b) in members {
        w.start_file(name.as_str(), opt).unwrap();
        w.write_all(b).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn fuzz_torch_pt() {
    let dir = tempfile::tempdir().unwrap();
    let full = std::fs::read(fixture("legacy_pt/checkpoint.pt")).unwrap();
    let members = zip_members(&full);
    let pkl_i = members
        .iter()
        .position(|(n, _)| n.ends_with("/data.pkl"))
        .unwrap();
    let pkl = members[pkl_i].1.clone();
    // zip structure offsets: local headers (PK\x03\x04), central directory (PK\x01\x02), end
    // record (PK\x05\x06): the size, offset and count fields sit right after them
    let mut hot = Vec::new();
    for w in full.windows(4).enumerate() {
        if w.1[..2] == *b"PK" && matches!((w.1[2], w.1[3]), (3, 4) | (1, 2) | (5, 6)) {
            hot.extend((w.0..w.0 + 48).step_by(2));
        }
    }
    let case = dir.path().join("case.pt");

    // 1. the raw file
    let mut t = Tally::new("pt (raw zip)");
    let mut rng = ChaCha8Rng::seed_from_u64(0x7070);
    for i in 0..1500 {
        let (bytes, what) = mutate(&mut rng, &full, &hot);
        std::fs::write(&case, &bytes).unwrap();
        t.case(
            &format!("checkpoint.pt case {i}: {what}"),
            bytes.len(),
            || asa::checkpoint::read_pt(&case).map(|_| ()),
        );
    }
    // every read member is CRC-checked: one flipped byte in any member's data is an error
    t.finish(1400);

    // 2. mutated pickles inside a valid zip (the CRC does not stop them: the VM must)
    let mut t = Tally::new("pt (pickle in valid zip)");
    let mut rng = ChaCha8Rng::seed_from_u64(0x7071);
    let pkl_hot: Vec<usize> = (0..pkl.len()).step_by(7).collect();
    for i in 0..1000 {
        let (p, what) = mutate(&mut rng, &pkl, &pkl_hot);
        let mut m = members.clone();
        m[pkl_i].1 = p;
        if i % 5 == 0 {
            // and a storage member cut short or grown
            let j = rng.gen_range(0..m.len());
            let keep = rng.gen_range(0..=m[j].1.len());
            m[j].1.truncate(keep);
        }
        write_zip(&case, &m);
        let len = std::fs::metadata(&case).unwrap().len() as usize;
        t.case(&format!("data.pkl case {i}: {what}"), len, || {
            let c = asa::checkpoint::read_pt(&case)?;
            for (k, v) in &c.state_dict {
                if let Some(x) = v.to_f32() {
                    asa::checkpoint::ensure_finite(k, &x)?;
                }
            }
            Ok(())
        });
    }
    t.finish(900);

    // 3. the pickle VM alone
    let mut t = Tally::new("pt (pickle VM)");
    let mut rng = ChaCha8Rng::seed_from_u64(0x7072);
    for i in 0..3000 {
        let (p, what) = mutate(&mut rng, &pkl, &pkl_hot);
        t.case(&format!("data.pkl case {i}: {what}"), p.len(), || {
            asa::checkpoint::load_pickle(&p).map(|_| ())
        });
    }
    t.finish(2900);
}

// ------------------------------------------------------------------------------------------------
// token shards + meta.json

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn fuzz_token_shards() {
    let dir = tempfile::tempdir().unwrap();
    let text: String = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/corpus/sonnets.txt"),
    )
    .unwrap()
    .chars()
    .take(6000)
    .collect();
    let src = dir.path().join("in.txt");
    std::fs::write(&src, text).unwrap();
    let base = dir.path().join("base");
    let mut o = asa::data::shards::PrepareOptions::new(
        vec![src],
        base.clone(),
        asa::data::tokenizer::Tokenizer::byte(),
    );
    o.progress = false;
    o.val_frac = 0.1;
    o.shard_tokens = 2500; // several train shards
    asa::data::shards::prepare(&o).unwrap();
    let files: Vec<String> = {
        let mut v: Vec<String> = std::fs::read_dir(&base)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert!(files.len() >= 4, "{files:?}");
    let case = dir.path().join("case");
    let mut t = Tally::new("token shards + meta");
    let mut rng = ChaCha8Rng::seed_from_u64(0x5ad);
    let hot: Vec<usize> = (0..32).collect();
    for i in 0..2000 {
        copy_dir(&base, &case);
        let f = &files[rng.gen_range(0..files.len())];
        let p = case.join(f);
        let b = std::fs::read(&p).unwrap();
        let (nb, what) = if f.ends_with(".json") {
            let text = String::from_utf8(b.clone()).unwrap();
            mutate_text(&mut rng, &text)
        } else {
            mutate(&mut rng, &b, &hot)
        };
        if i % 50 == 0 {
            std::fs::remove_file(&p).unwrap(); // a missing file
        } else {
            std::fs::write(&p, &nb).unwrap();
        }
        let total: usize = files
            .iter()
            .map(|f| std::fs::metadata(case.join(f)).map_or(0, |m| m.len() as usize))
            .sum();
        t.case(&format!("{f} case {i}: {what}"), total, || {
            let set = asa::data::shards::open_prepared(&case, 256)?;
            let all = set.train_concat();
            assert_eq!(all.len() as u64, set.train_tokens());
            let _ = set.val.tokens.window(0, set.val.tokens.len().min(8));
            Ok(())
        });
    }
    t.finish(1900);
}

// ------------------------------------------------------------------------------------------------
// run configs

/// The tiny run config of the CLI tests, with relative data and run folders.
fn run_toml() -> String {
    format!(
        "data = \"data\"\noutdir = \"runs\"\nname = \"fuzz\"\n{}",
        runs::TINY_RUN_KEYS
    )
}

#[test]
fn fuzz_run_configs() {
    let dir = tempfile::tempdir().unwrap();
    // the reference's JSON form of the same config
    let toml_v: toml::Value = toml::from_str(&run_toml()).unwrap();
    let json = serde_json::to_string_pretty(&serde_json::to_value(toml_v).unwrap()).unwrap();
    let bases = [("toml", run_toml()), ("json", json)];
    for (ext, text) in &bases {
        let p = dir.path().join(format!("base.{ext}"));
        std::fs::write(&p, text).unwrap();
        asa::train::read_run_config(&p).unwrap();
    }
    let mut t = Tally::new("run configs");
    let mut rng = ChaCha8Rng::seed_from_u64(0xc0f);
    for i in 0..3000 {
        let (ext, text) = &bases[i % 2];
        let (b, what) = mutate_text(&mut rng, text);
        let p = dir.path().join(format!("case.{ext}"));
        std::fs::write(&p, &b).unwrap();
        t.case(&format!("{ext} case {i}: {what}"), b.len(), || {
            asa::train::read_run_config(&p).map(|_| ())
        });
    }
    // deep nesting must not overflow the stack
    for (ext, text) in [
        (
            "toml",
            format!("a = {}1{}\n", "[".repeat(100_000), "]".repeat(100_000)),
        ),
        (
            "json",
            format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000)),
        ),
        (
            "toml",
            format!("a = {}\n", "{b = ".repeat(50_000) + &"}".repeat(50_000)),
        ),
    ] {
        let p = dir.path().join(format!("deep.{ext}"));
        std::fs::write(&p, &text).unwrap();
        t.case(&format!("deeply nested {ext}"), text.len(), || {
            asa::train::read_run_config(&p).map(|_| ())
        });
    }
    t.finish(2900);
}

// ------------------------------------------------------------------------------------------------
// run checkpoints (--resume)

/// A tiny `train-mini` run (byte tokenizer, 2 steps) in `dir/runs/tiny`.
fn tiny_run(dir: &Path) -> asa::train::RunDir {
    let text: String = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/corpus/sonnets.txt"),
    )
    .unwrap()
    .chars()
    .take(4000)
    .collect();
    let src = dir.join("in.txt");
    std::fs::write(&src, text).unwrap();
    let a = asa::train::TrainMiniArgs {
        outdir: dir.join("runs"),
        name: "tiny".into(),
        steps: 2,
        batch_size: 2,
        seq_len: 8,
        eval_interval: 1,
        data: vec![src],
        tokenizer: "byte".into(),
        embed_dim: 16,
        num_layers: 1,
        num_heads: 2,
        num_slots: 4,
        quiet: true,
        ..Default::default()
    };
    asa::train::train_mini(&a).unwrap();
    asa::train::RunDir {
        dir: dir.join("runs/tiny"),
    }
}

#[test]
fn fuzz_run_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_run(dir.path());
    let ck = run.checkpoint();
    let base = std::fs::read(&ck).unwrap();
    asa::train::load_run(&run).unwrap();
    let hdr = 8 + u64::from_le_bytes(base[..8].try_into().unwrap()) as usize;
    let hot: Vec<usize> = (0..8).chain(hdr.saturating_sub(4)..hdr + 4).collect();
    let mut t = Tally::new("run checkpoints");
    let mut rng = ChaCha8Rng::seed_from_u64(0x4e5);
    for i in 0..2000 {
        let (bytes, what) = if rng.gen_range(0..3) == 0 {
            mutate_st_header(&mut rng, &base).unwrap_or_else(|| mutate(&mut rng, &base, &hot))
        } else {
            mutate(&mut rng, &base, &hot)
        };
        std::fs::write(&ck, &bytes).unwrap();
        t.case(
            &format!("checkpoint.safetensors case {i}: {what}"),
            bytes.len(),
            || asa::train::load_run(&run).map(|_| ()),
        );
    }
    std::fs::write(&ck, &base).unwrap();
    t.finish(1900);
}

/// `--resume` refuses a run whose weights hold NaN, naming the tensor (it used to train on).
#[test]
fn resume_refuses_non_finite_weights() {
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_run(dir.path());
    let ck = run.checkpoint();
    let (mut tensors, meta) = asa::checkpoint::read_safetensors_with_metadata(&ck).unwrap();
    let key = "blocks.0.ln_1.weight";
    let t = tensors.get_mut(key).unwrap();
    let mut v = t.to_f32().unwrap();
    v[1] = f32::NAN;
    v[2] = f32::INFINITY;
    *t = asa::checkpoint::AnyTensor::from_f32(t.shape.clone(), v);
    let owned: Vec<(String, Vec<usize>, Vec<f32>)> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.shape.clone(), t.to_f32().unwrap()))
        .collect();
    let refs: Vec<(String, Vec<usize>, &[f32])> = owned
        .iter()
        .map(|(k, s, d)| (k.clone(), s.clone(), d.as_slice()))
        .collect();
    asa::checkpoint::write_safetensors(&ck, &refs, Some(meta)).unwrap();
    let e = asa::train::load_run(&run).unwrap_err().to_string();
    assert!(
        e.contains(&format!("'{key}'")) && e.contains("2 of") && e.contains("not finite"),
        "{e}"
    );
}
