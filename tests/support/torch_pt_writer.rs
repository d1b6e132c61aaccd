//! A small writer of PyTorch's `torch.save` format (torch >= 1.6), for tests that need a `.pt`
//! file of a given layout without PyTorch: a zip archive (members stored, not compressed, each
//! aligned to 64 bytes as torch aligns them) holding
//!
//! - `<name>/data.pkl`: a protocol-2 pickle of the saved object, written the way CPython's pickler
//!   writes it (BINPUT after every string, tuple, list and dict; BINGET for a global or a shared
//!   string seen before; MARK ... SETITEMS / APPENDS in batches of 1000), tensors as
//!   `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())` and
//!   storages as the persistent id `('storage', torch.<Class>Storage, key, location, numel)`;
//! - `<name>/.format_version`, `<name>/.storage_alignment`, `<name>/byteorder`;
//! - `<name>/data/<key>`: each storage's raw little-endian bytes, keys `0`, `1`, ... in the order
//!   the pickle first meets the storages (as torch numbers them);
//! - `<name>/version` (`3`).
//!
//! `<name>` is what torch takes from the file name it saves to (the stem: `best` for `best.pt`).
//! Tensors may share a storage (tied weights, views), as in a real state dict.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// A storage added with [`TorchSave::storage_f32`] (or another `storage_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StorageId(usize);

/// A tensor: a view (offset, size, stride in elements) of a storage.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorView {
    pub storage: StorageId,
    pub offset: usize,
    pub size: Vec<usize>,
    pub stride: Vec<usize>,
}

impl TensorView {
    /// A contiguous row-major view of `size` at offset 0.
    pub fn contiguous(storage: StorageId, size: &[usize]) -> Self {
        let mut stride = vec![1usize; size.len()];
        for d in (0..size.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * size[d + 1];
        }
        TensorView {
            storage,
            offset: 0,
            size: size.to_vec(),
            stride,
        }
    }
}

/// The Python values this writer can pickle.
#[derive(Debug, Clone, PartialEq)]
pub enum Py {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<Py>),
    List(Vec<Py>),
    Dict(Vec<(Py, Py)>),
    /// `collections.OrderedDict`, optionally with a `_metadata` attribute (what
    /// `nn.Module.state_dict()` returns: its `_metadata` maps each module path to
    /// `{'version': N}`).
    OrderedDict {
        items: Vec<(Py, Py)>,
        metadata: Option<Box<Py>>,
    },
    Tensor(TensorView),
}

impl Py {
    pub fn str(s: &str) -> Py {
        Py::Str(s.to_string())
    }
    /// A dict with string keys, in the given order.
    pub fn dict<S: AsRef<str>>(items: Vec<(S, Py)>) -> Py {
        Py::Dict(
            items
                .into_iter()
                .map(|(k, v)| (Py::str(k.as_ref()), v))
                .collect(),
        )
    }
}

struct StorageData {
    /// The storage class in module `torch`: `FloatStorage`, `LongStorage`, ...
    class: &'static str,
    location: String,
    numel: usize,
    bytes: Vec<u8>,
}

/// Collects storages, then writes a `torch.save` archive of a [`Py`] value over them.
#[derive(Default)]
pub struct TorchSave {
    storages: Vec<StorageData>,
}

impl TorchSave {
    pub fn new() -> Self {
        Self::default()
    }

    fn storage(
        &mut self,
        class: &'static str,
        location: &str,
        numel: usize,
        bytes: Vec<u8>,
    ) -> StorageId {
        self.storages.push(StorageData {
            class,
            location: location.to_string(),
            numel,
            bytes,
        });
        StorageId(self.storages.len() - 1)
    }

    /// A `torch.FloatStorage` holding `data`, on `location` (`cpu`, `cuda:0`: what
    /// `torch.save` records for the device it was saved from; loaders map it).
    pub fn storage_f32(&mut self, data: &[f32], location: &str) -> StorageId {
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.storage("FloatStorage", location, data.len(), bytes)
    }

    /// A `torch.LongStorage` holding `data`.
    pub fn storage_i64(&mut self, data: &[i64], location: &str) -> StorageId {
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.storage("LongStorage", location, data.len(), bytes)
    }

    /// A new float storage holding `data` and a contiguous tensor of `shape` over it.
    pub fn tensor_f32(&mut self, data: &[f32], shape: &[usize], location: &str) -> Py {
        assert_eq!(
            data.len(),
            shape.iter().product::<usize>(),
            "tensor_f32: {} values for shape {shape:?}",
            data.len()
        );
        let s = self.storage_f32(data, location);
        Py::Tensor(TensorView::contiguous(s, shape))
    }

    /// The pickle of `root` (protocol 2) and the storages in key order (`0`, `1`, ...).
    pub fn pickle(&self, root: &Py) -> (Vec<u8>, Vec<StorageId>) {
        let mut p = Pickler {
            out: vec![0x80, 2],
            memo_len: 0,
            globals: HashMap::new(),
            shared_strs: HashMap::new(),
            keys: HashMap::new(),
            order: Vec::new(),
            storages: &self.storages,
        };
        p.value(root);
        p.out.push(b'.');
        (p.out, p.order)
    }

    /// Writes the archive to `path`, with `archive_name` as its top folder (torch uses the stem
    /// of the file name it saved to).
    pub fn write(&self, path: &Path, archive_name: &str, root: &Py) -> std::io::Result<()> {
        let (pkl, order) = self.pickle(root);
        let file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
        let mut z = zip::ZipWriter::new(file);
        let opt = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .with_alignment(64);
        let member = |z: &mut zip::ZipWriter<_>, name: &str, bytes: &[u8]| {
            z.start_file(format!("{archive_name}/{name}"), opt)
                .map_err(std::io::Error::other)?;
            z.write_all(bytes)
        };
        member(&mut z, "data.pkl", &pkl)?;
        member(&mut z, ".format_version", b"1")?;
        member(&mut z, ".storage_alignment", b"64")?;
        member(&mut z, "byteorder", b"little")?;
        for (key, id) in order.iter().enumerate() {
            member(&mut z, &format!("data/{key}"), &self.storages[id.0].bytes)?;
        }
        member(&mut z, "version", b"3\n")?;
        let mut file = z.finish().map_err(std::io::Error::other)?;
        file.flush()
    }
}

struct Pickler<'a> {
    out: Vec<u8>,
    memo_len: u32,
    /// memo index of each (module, name) global written
    globals: HashMap<(String, String), u32>,
    /// memo index of strings torch's pickler sees as one object ('storage', a location, a key)
    shared_strs: HashMap<String, u32>,
    /// storage index -> its key string's memo index, once written
    keys: HashMap<usize, u32>,
    /// storages in the order their keys were given
    order: Vec<StorageId>,
    storages: &'a [StorageData],
}

const BATCH: usize = 1000;

impl Pickler<'_> {
    fn put(&mut self) -> u32 {
        let i = self.memo_len;
        if i < 256 {
            self.out.extend_from_slice(&[b'q', i as u8]);
        } else {
            self.out.push(b'r');
            self.out.extend_from_slice(&i.to_le_bytes());
        }
        self.memo_len += 1;
        i
    }

    fn get(&mut self, i: u32) {
        if i < 256 {
            self.out.extend_from_slice(&[b'h', i as u8]);
        } else {
            self.out.push(b'j');
            self.out.extend_from_slice(&i.to_le_bytes());
        }
    }

    fn global(&mut self, module: &str, name: &str) {
        let k = (module.to_string(), name.to_string());
        if let Some(&i) = self.globals.get(&k) {
            self.get(i);
            return;
        }
        self.out.push(b'c');
        self.out
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
        let i = self.put();
        self.globals.insert(k, i);
    }

    fn int(&mut self, v: i64) {
        if (0..=0xff).contains(&v) {
            self.out.extend_from_slice(&[b'K', v as u8]);
        } else if (0..=0xffff).contains(&v) {
            self.out.push(b'M');
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else if let Ok(x) = i32::try_from(v) {
            self.out.push(b'J');
            self.out.extend_from_slice(&x.to_le_bytes());
        } else {
            // LONG1: the shortest little-endian two's complement
            let b = v.to_le_bytes();
            let mut n = 8;
            while n > 1 {
                let (last, prev) = (b[n - 1], b[n - 2]);
                if (last == 0 && prev & 0x80 == 0) || (last == 0xff && prev & 0x80 != 0) {
                    n -= 1;
                } else {
                    break;
                }
            }
            self.out.extend_from_slice(&[0x8a, n as u8]);
            self.out.extend_from_slice(&b[..n]);
        }
    }

    /// BINUNICODE + BINPUT.
    fn string(&mut self, s: &str) -> u32 {
        self.out.push(b'X');
        self.out
            .extend_from_slice(&u32::try_from(s.len()).unwrap().to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
        self.put()
    }

    /// A string pickled once and fetched from the memo after.
    fn shared_string(&mut self, s: &str) {
        match self.shared_strs.get(s) {
            Some(&i) => self.get(i),
            None => {
                let i = self.string(s);
                self.shared_strs.insert(s.to_string(), i);
            }
        }
    }

    fn tuple(&mut self, items: &[Py]) {
        match items.len() {
            0 => self.out.push(b')'),
            n @ 1..=3 => {
                for x in items {
                    self.value(x);
                }
                self.out.push(0x84 + n as u8);
                self.put();
            }
            _ => {
                self.out.push(b'(');
                for x in items {
                    self.value(x);
                }
                self.out.push(b't');
                self.put();
            }
        }
    }

    fn usize_tuple(&mut self, xs: &[usize]) {
        let items: Vec<Py> = xs.iter().map(|&x| Py::Int(x as i64)).collect();
        self.tuple(&items);
    }

    fn set_items(&mut self, items: &[(Py, Py)]) {
        for batch in items.chunks(BATCH) {
            if batch.len() == 1 {
                self.value(&batch[0].0);
                self.value(&batch[0].1);
                self.out.push(b's');
            } else {
                self.out.push(b'(');
                for (k, v) in batch {
                    self.value(k);
                    self.value(v);
                }
                self.out.push(b'u');
            }
        }
    }

    fn tensor(&mut self, t: &TensorView) {
        let st = &self.storages[t.storage.0];
        assert_eq!(t.size.len(), t.stride.len(), "tensor size and stride");
        if t.size.iter().all(|&s| s > 0) {
            let last = t.offset
                + t.size
                    .iter()
                    .zip(&t.stride)
                    .map(|(s, st)| (s - 1) * st)
                    .sum::<usize>();
            assert!(last < st.numel, "tensor view past the end of its storage");
        }
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.out.push(b'(');
        // persistent id ('storage', torch.<Class>, key, location, numel), then BINPERSID
        self.out.push(b'(');
        self.shared_string("storage");
        self.global("torch", st.class);
        match self.keys.get(&t.storage.0) {
            Some(&i) => self.get(i),
            None => {
                let key = self.order.len().to_string();
                let i = self.string(&key);
                self.keys.insert(t.storage.0, i);
                self.order.push(t.storage);
            }
        }
        let location = st.location.clone();
        self.shared_string(&location);
        self.int(st.numel as i64);
        self.out.push(b't');
        self.put();
        self.out.push(b'Q');
        self.int(t.offset as i64);
        self.usize_tuple(&t.size);
        self.usize_tuple(&t.stride);
        self.out.push(0x89); // requires_grad False (state dicts hold detached tensors)
        self.global("collections", "OrderedDict"); // backward hooks: OrderedDict()
        self.out.push(b')');
        self.out.push(b'R');
        self.put();
        self.out.push(b't');
        self.put();
        self.out.push(b'R');
        self.put();
    }

    fn value(&mut self, v: &Py) {
        match v {
            Py::None => self.out.push(b'N'),
            Py::Bool(b) => self.out.push(if *b { 0x88 } else { 0x89 }),
            Py::Int(i) => self.int(*i),
            Py::Float(f) => {
                self.out.push(b'G');
                self.out.extend_from_slice(&f.to_be_bytes());
            }
            Py::Str(s) => {
                self.string(s);
            }
            Py::Tuple(items) => self.tuple(items),
            Py::List(items) => {
                self.out.push(b']');
                self.put();
                for batch in items.chunks(BATCH) {
                    if batch.len() == 1 {
                        self.value(&batch[0]);
                        self.out.push(b'a');
                    } else {
                        self.out.push(b'(');
                        for x in batch {
                            self.value(x);
                        }
                        self.out.push(b'e');
                    }
                }
            }
            Py::Dict(items) => {
                self.out.push(b'}');
                self.put();
                self.set_items(items);
            }
            Py::OrderedDict { items, metadata } => {
                // OrderedDict.__reduce__: (cls, (), {'_metadata': ...} or None, None, items)
                self.global("collections", "OrderedDict");
                self.out.push(b')');
                self.out.push(b'R');
                self.put();
                self.set_items(items);
                if let Some(m) = metadata {
                    self.value(&Py::dict(vec![("_metadata", (**m).clone())]));
                    self.out.push(b'b');
                }
            }
            Py::Tensor(t) => self.tensor(t),
        }
    }
}
