//! Reader for PyTorch `torch.save` files (torch >= 1.6: a zip archive holding `data.pkl` and one
//! raw little-endian file per storage under `data/`).
//!
//! The pickle is run by a small virtual machine that only builds data: no Python callable is ever
//! looked up or executed. Globals become [`PyValue::Global`] values; calling one (REDUCE, NEWOBJ)
//! yields a [`PyValue::Object`] that records the class, its arguments and its BUILD state, except
//! for a short list of well-known callables interpreted as data (`torch._utils._rebuild_tensor_v2`,
//! `_rebuild_parameter`, `collections.OrderedDict`, `builtins.set`, numpy scalars, ...). Tensors
//! are kept as lazy [`TensorRef`]s (storage key plus layout) and only the ones needed are read
//! from the archive.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;
use std::rc::Rc;

use super::ck;
use super::st::{checked_numel, decode_le, AnyTensor};
use crate::error::{AsaError, Result};

/// Element type of a torch storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageDtype {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
    /// A storage class this reader cannot decode (complex, quantized, untyped, ...).
    Other(String),
}

impl StorageDtype {
    fn from_storage_class(name: &str) -> Self {
        match name {
            "FloatStorage" => StorageDtype::F32,
            "DoubleStorage" => StorageDtype::F64,
            "HalfStorage" => StorageDtype::F16,
            "BFloat16Storage" => StorageDtype::BF16,
            "LongStorage" => StorageDtype::I64,
            "IntStorage" => StorageDtype::I32,
            "ShortStorage" => StorageDtype::I16,
            "CharStorage" => StorageDtype::I8,
            "ByteStorage" => StorageDtype::U8,
            "BoolStorage" => StorageDtype::Bool,
            other => StorageDtype::Other(other.to_string()),
        }
    }

    /// From a `torch.<dtype>` global name (used by `_rebuild_tensor_v3`).
    fn from_torch_dtype(name: &str) -> Option<Self> {
        Some(match name {
            "float32" | "float" => StorageDtype::F32,
            "float64" | "double" => StorageDtype::F64,
            "float16" | "half" => StorageDtype::F16,
            "bfloat16" => StorageDtype::BF16,
            "int64" | "long" => StorageDtype::I64,
            "int32" | "int" => StorageDtype::I32,
            "int16" | "short" => StorageDtype::I16,
            "int8" => StorageDtype::I8,
            "uint8" => StorageDtype::U8,
            "bool" => StorageDtype::Bool,
            _ => return None,
        })
    }

    /// (safetensors-style dtype name, element size) for decodable dtypes.
    fn layout(&self) -> Option<(&'static str, usize)> {
        Some(match self {
            StorageDtype::F32 => ("F32", 4),
            StorageDtype::F64 => ("F64", 8),
            StorageDtype::F16 => ("F16", 2),
            StorageDtype::BF16 => ("BF16", 2),
            StorageDtype::I64 => ("I64", 8),
            StorageDtype::I32 => ("I32", 4),
            StorageDtype::I16 => ("I16", 2),
            StorageDtype::I8 => ("I8", 1),
            StorageDtype::U8 => ("U8", 1),
            StorageDtype::Bool => ("BOOL", 1),
            StorageDtype::Other(_) => return None,
        })
    }
}

/// A storage reference from a BINPERSID `('storage', type, key, location, numel)` tuple.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    pub dtype: StorageDtype,
    pub key: String,
    pub location: String,
    pub numel: i64,
}

/// A tensor view of a storage (`_rebuild_tensor_v2` arguments), not yet read from the archive.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub dtype: StorageDtype,
    pub offset: usize,
    pub size: Vec<usize>,
    pub stride: Vec<usize>,
}

/// A value built by the pickle VM.
#[derive(Debug, Clone, PartialEq)]
pub enum PyValue {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<PyValue>),
    Tuple(Vec<PyValue>),
    /// Insertion-ordered (key, value) pairs.
    Dict(Vec<(PyValue, PyValue)>),
    Global {
        module: String,
        name: String,
    },
    /// An instance of a class this reader does not interpret. `state` is what BUILD set
    /// (a dataclass or `argparse.Namespace` keeps its fields there as a dict); `list_items` and
    /// `dict_items` hold what APPEND(S)/SETITEM(S) added, if anything.
    Object {
        module: String,
        name: String,
        args: Vec<PyValue>,
        state: Option<Box<PyValue>>,
        list_items: Vec<PyValue>,
        dict_items: Vec<(PyValue, PyValue)>,
    },
    Storage(StorageRef),
    Tensor(TensorRef),
}

impl PyValue {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            PyValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The (key, value) pairs of a dict, or of an object whose BUILD state is a dict (a
    /// dataclass, `argparse.Namespace`), or whose SETITEMS filled it (a dict subclass).
    pub fn dict_items(&self) -> Option<&[(PyValue, PyValue)]> {
        match self {
            PyValue::Dict(items) => Some(items),
            PyValue::Object {
                state, dict_items, ..
            } => {
                if !dict_items.is_empty() {
                    return Some(dict_items);
                }
                match state.as_deref() {
                    Some(PyValue::Dict(items)) => Some(items),
                    // (dict_state, slots_state) from objects with __slots__
                    Some(PyValue::Tuple(t)) if t.len() == 2 => match (&t[0], &t[1]) {
                        (PyValue::Dict(items), _) if !items.is_empty() => Some(items),
                        (_, PyValue::Dict(items)) => Some(items),
                        _ => None,
                    },
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// Looks up a string key in [`PyValue::dict_items`].
    pub fn get(&self, key: &str) -> Option<&PyValue> {
        self.dict_items()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }

    /// A JSON rendering of plain data (dicts with string or int keys, lists, tuples, numbers,
    /// strings; objects through their dict state). Tensors, bytes and unrenderable values become
    /// `null`; NaN and infinities too.
    pub fn to_json(&self) -> serde_json::Value {
        self.to_json_depth(0)
    }

    fn to_json_depth(&self, depth: usize) -> serde_json::Value {
        use serde_json::Value as J;
        if depth > 64 {
            return J::Null;
        }
        match self {
            PyValue::None => J::Null,
            PyValue::Bool(b) => J::Bool(*b),
            PyValue::Int(i) => J::from(*i),
            PyValue::Float(f) => serde_json::Number::from_f64(*f)
                .map(J::Number)
                .unwrap_or(J::Null),
            PyValue::Str(s) => J::String(s.clone()),
            PyValue::List(v) | PyValue::Tuple(v) => {
                J::Array(v.iter().map(|x| x.to_json_depth(depth + 1)).collect())
            }
            PyValue::Global { module, name } => J::String(format!("{module}.{name}")),
            PyValue::Dict(_) | PyValue::Object { .. } => match self.dict_items() {
                Some(items) => {
                    let mut m = serde_json::Map::new();
                    for (k, v) in items {
                        let key = match k {
                            PyValue::Str(s) => s.clone(),
                            PyValue::Int(i) => i.to_string(),
                            PyValue::Bool(b) => if *b { "True" } else { "False" }.to_string(),
                            _ => continue,
                        };
                        m.insert(key, v.to_json_depth(depth + 1));
                    }
                    J::Object(m)
                }
                None => match self {
                    PyValue::Object { list_items, .. } if !list_items.is_empty() => J::Array(
                        list_items
                            .iter()
                            .map(|x| x.to_json_depth(depth + 1))
                            .collect(),
                    ),
                    _ => J::Null,
                },
            },
            PyValue::Bytes(_) | PyValue::Storage(_) | PyValue::Tensor(_) => J::Null,
        }
    }

    /// The Python type of the value, for messages ("dict", "tensor", ...).
    pub fn kind(&self) -> &'static str {
        match self {
            PyValue::None => "None",
            PyValue::Bool(_) => "bool",
            PyValue::Int(_) => "int",
            PyValue::Float(_) => "float",
            PyValue::Str(_) => "str",
            PyValue::Bytes(_) => "bytes",
            PyValue::List(_) => "list",
            PyValue::Tuple(_) => "tuple",
            PyValue::Dict(_) => "dict",
            PyValue::Global { .. } => "global",
            PyValue::Object { .. } => "object",
            PyValue::Storage(_) => "storage",
            PyValue::Tensor(_) => "tensor",
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The pickle VM. Compound values live in an arena so that memo references share (and see later
// mutations of) one object, as in Python; cycles are harmless until conversion, which is bounded.

#[derive(Debug, Clone)]
enum V {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Ref(usize),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum KeyRepr {
    None,
    Bool(bool),
    Int(i64),
    Str(Rc<str>),
}

#[derive(Debug, Default)]
struct DictNode {
    items: Vec<(V, V)>,
    index: HashMap<KeyRepr, usize>,
}

impl DictNode {
    fn set(&mut self, k: V, v: V) {
        let repr = match &k {
            V::None => Some(KeyRepr::None),
            V::Bool(b) => Some(KeyRepr::Bool(*b)),
            V::Int(i) => Some(KeyRepr::Int(*i)),
            V::Str(s) => Some(KeyRepr::Str(s.clone())),
            _ => None,
        };
        if let Some(r) = repr {
            if let Some(&i) = self.index.get(&r) {
                self.items[i].1 = v;
                return;
            }
            self.index.insert(r, self.items.len());
        }
        self.items.push((k, v));
    }
}

#[derive(Debug)]
enum Node {
    List(Vec<V>),
    Tuple(Vec<V>),
    Dict(DictNode),
    Global(String, String),
    Object {
        module: String,
        name: String,
        args: Vec<V>,
        state: Option<V>,
        list_items: Vec<V>,
        dict: DictNode,
    },
    Storage(StorageRef),
    Tensor(TensorRef),
}

/// Limits that keep a hostile pickle from exhausting memory.
const MAX_NODES: usize = 50_000_000;
const MAX_CONVERTED: usize = 2_000_000;

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<V>,
    marks: Vec<usize>,
    memo: HashMap<u64, V>,
    arena: Vec<Node>,
    /// Elements held by arena nodes when they were created.
    stored: usize,
}

fn perr(at: usize, msg: impl std::fmt::Display) -> AsaError {
    AsaError::Checkpoint(format!("pickle error at byte {at}: {msg}"))
}

impl<'a> Vm<'a> {
    fn new(data: &'a [u8]) -> Self {
        Vm {
            data,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            arena: Vec::new(),
            stored: 0,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                perr(
                    self.pos,
                    format!(
                        "truncated: needs {n} more bytes, {} left",
                        self.data.len() - self.pos
                    ),
                )
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| perr(self.pos, "truncated: unterminated text line"))?;
        let s = std::str::from_utf8(&rest[..n])
            .map_err(|_| perr(self.pos, "text line is not UTF-8"))?;
        self.pos += n + 1;
        Ok(s)
    }

    fn alloc(&mut self, n: Node) -> Result<V> {
        // Bound what copies of existing containers can add (each byte of input adds O(1) otherwise).
        let size = 1 + match &n {
            Node::List(v) | Node::Tuple(v) => v.len(),
            Node::Dict(d) => 2 * d.items.len(),
            Node::Object { args, .. } => args.len(),
            _ => 0,
        };
        self.stored = self.stored.saturating_add(size);
        if self.arena.len() >= MAX_NODES || self.stored > 4 * self.data.len() + 1_000_000 {
            return Err(perr(self.pos, "too many objects"));
        }
        self.arena.push(n);
        Ok(V::Ref(self.arena.len() - 1))
    }
    fn pop(&mut self, at: usize) -> Result<V> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(perr(at, "stack underflow"));
        }
        self.stack.pop().ok_or_else(|| perr(at, "stack underflow"))
    }
    fn top(&self, at: usize) -> Result<&V> {
        self.stack.last().ok_or_else(|| perr(at, "stack underflow"))
    }
    fn pop_mark(&mut self, at: usize) -> Result<Vec<V>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| perr(at, "no MARK on the stack"))?;
        if m > self.stack.len() {
            return Err(perr(at, "corrupt MARK"));
        }
        Ok(self.stack.split_off(m))
    }
    fn push(&mut self, v: V) {
        self.stack.push(v);
    }
    fn memo_put(&mut self, at: usize, idx: u64) -> Result<()> {
        let v = self.top(at)?.clone();
        self.memo.insert(idx, v);
        Ok(())
    }
    fn memo_get(&mut self, at: usize, idx: u64) -> Result<()> {
        let v = self
            .memo
            .get(&idx)
            .cloned()
            .ok_or_else(|| perr(at, format!("memo key {idx} not found")))?;
        self.push(v);
        Ok(())
    }
    fn str_val(&self, at: usize, b: &[u8]) -> Result<V> {
        let s = std::str::from_utf8(b).map_err(|_| perr(at, "string is not valid UTF-8"))?;
        Ok(V::Str(Rc::from(s)))
    }
    fn node(&self, v: &V) -> Option<&Node> {
        match v {
            V::Ref(i) => self.arena.get(*i),
            _ => None,
        }
    }
    fn seq(&self, v: &V) -> Option<Vec<V>> {
        match self.node(v)? {
            Node::Tuple(x) | Node::List(x) => Some(x.clone()),
            _ => None,
        }
    }
    fn global(&self, v: &V) -> Option<(String, String)> {
        match self.node(v)? {
            Node::Global(m, n) => Some((m.clone(), n.clone())),
            _ => None,
        }
    }

    fn append(&mut self, at: usize, target: &V, items: Vec<V>) -> Result<()> {
        let idx = match target {
            V::Ref(i) => *i,
            _ => return Err(perr(at, "APPEND to a non-list")),
        };
        match self.arena.get_mut(idx) {
            Some(Node::List(l)) => l.extend(items),
            Some(Node::Object { list_items, .. }) => list_items.extend(items),
            _ => return Err(perr(at, "APPEND to a non-list")),
        }
        Ok(())
    }

    fn set_items(&mut self, at: usize, target: &V, items: Vec<V>) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            return Err(perr(at, "SETITEMS with an odd number of items"));
        }
        let idx = match target {
            V::Ref(i) => *i,
            _ => return Err(perr(at, "SETITEM on a non-dict")),
        };
        let d = match self.arena.get_mut(idx) {
            Some(Node::Dict(d)) => d,
            Some(Node::Object { dict, .. }) => dict,
            _ => return Err(perr(at, "SETITEM on a non-dict")),
        };
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.set(k, v);
        }
        Ok(())
    }

    fn usize_of(&self, v: &V, at: usize, what: &str) -> Result<usize> {
        match v {
            V::Int(i) if *i >= 0 => {
                usize::try_from(*i).map_err(|_| perr(at, format!("{what} too large")))
            }
            _ => Err(perr(at, format!("{what} must be a non-negative int"))),
        }
    }
    fn usizes_of(&self, v: &V, at: usize, what: &str) -> Result<Vec<usize>> {
        let items = self
            .seq(v)
            .ok_or_else(|| perr(at, format!("{what} must be a tuple")))?;
        items.iter().map(|x| self.usize_of(x, at, what)).collect()
    }

    /// `_rebuild_tensor*(storage, storage_offset, size, stride, ...)`.
    fn rebuild_tensor(
        &mut self,
        at: usize,
        args: &[V],
        dtype_override: Option<StorageDtype>,
    ) -> Result<V> {
        if args.len() < 4 {
            return Err(perr(at, "_rebuild_tensor: expected at least 4 arguments"));
        }
        let storage = match self.node(&args[0]) {
            Some(Node::Storage(s)) => s.clone(),
            _ => return Err(perr(at, "_rebuild_tensor: first argument is not a storage")),
        };
        let offset = self.usize_of(&args[1], at, "storage_offset")?;
        let size = self.usizes_of(&args[2], at, "tensor size")?;
        let stride = self.usizes_of(&args[3], at, "tensor stride")?;
        if size.len() != stride.len() {
            return Err(perr(at, "tensor size and stride differ in length"));
        }
        let dtype = dtype_override.unwrap_or_else(|| storage.dtype.clone());
        self.alloc(Node::Tensor(TensorRef {
            storage,
            dtype,
            offset,
            size,
            stride,
        }))
    }

    fn new_object(&mut self, module: String, name: String, args: Vec<V>) -> Result<V> {
        self.alloc(Node::Object {
            module,
            name,
            args,
            state: None,
            list_items: Vec::new(),
            dict: DictNode::default(),
        })
    }

    /// Interprets calling `func(*args)`. Never executes anything: known callables are data
    /// constructors, everything else becomes an `Object`.
    fn call(&mut self, at: usize, func: &V, args: Vec<V>) -> Result<V> {
        let (module, name) = match self.global(func) {
            Some(g) => g,
            None => return self.new_object("?".into(), "?".into(), args),
        };
        match (module.as_str(), name.as_str()) {
            ("torch._utils", "_rebuild_tensor") | ("torch._utils", "_rebuild_tensor_v2") => {
                self.rebuild_tensor(at, &args, None)
            }
            ("torch._utils", "_rebuild_tensor_v3") => {
                let dt = args
                    .get(6)
                    .and_then(|d| self.global(d))
                    .filter(|(m, _)| m == "torch")
                    .and_then(|(_, n)| StorageDtype::from_torch_dtype(&n));
                self.rebuild_tensor(at, &args, dt)
            }
            ("torch._utils", "_rebuild_parameter")
            | ("torch._utils", "_rebuild_parameter_with_state") => args
                .into_iter()
                .next()
                .ok_or_else(|| perr(at, "_rebuild_parameter without arguments")),
            ("torch._tensor", "_rebuild_from_type_v2")
            | ("torch._tensor", "_rebuild_from_type") => {
                // (func, new_type, args, state): rebuild with func(*args), ignore the subclass
                if args.len() < 3 {
                    return Err(perr(
                        at,
                        "_rebuild_from_type: expected (func, type, args, ...)",
                    ));
                }
                let inner = self
                    .seq(&args[2])
                    .ok_or_else(|| perr(at, "_rebuild_from_type: args is not a tuple"))?;
                let f = args[0].clone();
                if self
                    .global(&f)
                    .map(|(m, n)| m == "torch._tensor" && n.starts_with("_rebuild_from_type"))
                    == Some(true)
                {
                    return Err(perr(at, "_rebuild_from_type nested in itself"));
                }
                self.call(at, &f, inner)
            }
            ("collections", "OrderedDict")
            | ("builtins", "dict")
            | ("__builtin__", "dict")
            | ("collections", "defaultdict") => {
                let mut d = DictNode::default();
                // OrderedDict(pairs) / dict(pairs); defaultdict(factory) has no pairs
                if name != "defaultdict" {
                    if let Some(src) = args.first() {
                        match self.node(src) {
                            Some(Node::List(pairs)) | Some(Node::Tuple(pairs)) => {
                                for p in pairs.clone() {
                                    let kv = self.seq(&p).filter(|kv| kv.len() == 2).ok_or_else(
                                        || {
                                            perr(
                                                at,
                                                "OrderedDict argument is not a sequence of pairs",
                                            )
                                        },
                                    )?;
                                    d.set(kv[0].clone(), kv[1].clone());
                                }
                            }
                            Some(Node::Dict(src)) => {
                                for (k, v) in src.items.clone() {
                                    d.set(k, v);
                                }
                            }
                            _ => {}
                        }
                    }
                }
                self.alloc(Node::Dict(d))
            }
            ("builtins", "set")
            | ("builtins", "frozenset")
            | ("builtins", "list")
            | ("__builtin__", "set")
            | ("__builtin__", "frozenset")
            | ("__builtin__", "list") => {
                let items = args.first().and_then(|a| self.seq(a)).unwrap_or_default();
                self.alloc(Node::List(items))
            }
            ("builtins", "tuple") | ("__builtin__", "tuple") => {
                let items = args.first().and_then(|a| self.seq(a)).unwrap_or_default();
                self.alloc(Node::Tuple(items))
            }
            ("copyreg", "__newobj__")
            | ("copy_reg", "__newobj__")
            | ("copyreg", "_reconstructor")
            | ("copy_reg", "_reconstructor") => {
                let (m, n) = args.first().and_then(|c| self.global(c)).ok_or_else(|| {
                    perr(
                        at,
                        format!("{module}.{name}: first argument is not a class"),
                    )
                })?;
                let rest = if name == "__newobj__" {
                    args[1..].to_vec()
                } else {
                    Vec::new()
                };
                self.class_instance(at, m, n, rest)
            }
            ("numpy.core.multiarray", "scalar") | ("numpy._core.multiarray", "scalar") => {
                Ok(self.numpy_scalar(&args).unwrap_or(V::None))
            }
            _ => self.new_object(module, name, args),
        }
    }

    /// `cls.__new__(cls, *args)` (NEWOBJ): dict-like classes become dicts, others objects.
    fn class_instance(
        &mut self,
        at: usize,
        module: String,
        name: String,
        args: Vec<V>,
    ) -> Result<V> {
        match (module.as_str(), name.as_str()) {
            ("collections", "OrderedDict")
            | ("builtins", "dict")
            | ("collections", "defaultdict") => self.alloc(Node::Dict(DictNode::default())),
            ("builtins", "list") | ("builtins", "set") => self.alloc(Node::List(Vec::new())),
            _ => {
                let _ = at;
                self.new_object(module, name, args)
            }
        }
    }

    /// `numpy.core.multiarray.scalar(dtype, bytes)` for float and int scalars.
    fn numpy_scalar(&self, args: &[V]) -> Option<V> {
        let (dt, raw) = (args.first()?, args.get(1)?);
        let raw: &[u8] = match raw {
            V::Bytes(b) => b,
            V::Str(s) => s.as_bytes(),
            _ => return None,
        };
        let code = match self.node(dt)? {
            Node::Object { args, .. } => match args.first()? {
                V::Str(s) => s.to_string(),
                _ => return None,
            },
            _ => return None,
        };
        let a8 = |r: &[u8]| -> Option<[u8; 8]> { r.try_into().ok() };
        let a4 = |r: &[u8]| -> Option<[u8; 4]> { r.try_into().ok() };
        Some(match code.as_str() {
            "f8" => V::Float(f64::from_le_bytes(a8(raw)?)),
            "f4" => V::Float(f32::from_le_bytes(a4(raw)?) as f64),
            "i8" => V::Int(i64::from_le_bytes(a8(raw)?)),
            "i4" => V::Int(i32::from_le_bytes(a4(raw)?) as i64),
            "u4" => V::Int(u32::from_le_bytes(a4(raw)?) as i64),
            "b1" => V::Bool(raw.first()? != &0),
            _ => return None,
        })
    }

    /// BINPERSID: torch's `('storage', storage_type, key, location, numel)`.
    fn persistent_load(&mut self, at: usize, pid: &V) -> Result<V> {
        let t = self
            .seq(pid)
            .ok_or_else(|| perr(at, "persistent id is not a tuple"))?;
        match t.first() {
            Some(V::Str(s)) if &**s == "storage" => {}
            _ => {
                return Err(perr(
                    at,
                    "unsupported persistent id (expected ('storage', ...))",
                ))
            }
        }
        if t.len() < 5 {
            return Err(perr(at, "storage persistent id needs 5 fields"));
        }
        let dtype = match self.global(&t[1]) {
            Some((_, n)) => StorageDtype::from_storage_class(&n),
            None => return Err(perr(at, "storage type is not a class")),
        };
        let key = match &t[2] {
            V::Str(s) => s.to_string(),
            V::Int(i) => i.to_string(),
            _ => return Err(perr(at, "storage key is not a string")),
        };
        let location = match &t[3] {
            V::Str(s) => s.to_string(),
            _ => String::new(),
        };
        let numel = match &t[4] {
            V::Int(i) => *i,
            _ => return Err(perr(at, "storage numel is not an int")),
        };
        self.alloc(Node::Storage(StorageRef {
            dtype,
            key,
            location,
            numel,
        }))
    }

    fn long_from_le(&self, at: usize, b: &[u8]) -> Result<V> {
        if b.is_empty() {
            return Ok(V::Int(0));
        }
        if b.len() > 8 {
            // Accept wider encodings whose value still fits (sign extension only).
            let fill = if b[b.len() - 1] & 0x80 != 0 { 0xff } else { 0 };
            if b[8..].iter().any(|&x| x != fill) || (b[7] & 0x80 != 0) != (fill == 0xff) {
                return Err(perr(at, "integer does not fit in 64 bits"));
            }
            return self.long_from_le(at, &b[..8]);
        }
        let mut a = if b[b.len() - 1] & 0x80 != 0 {
            [0xffu8; 8]
        } else {
            [0u8; 8]
        };
        a[..b.len()].copy_from_slice(b);
        Ok(V::Int(i64::from_le_bytes(a)))
    }

    fn run(&mut self) -> Result<V> {
        loop {
            let at = self.pos;
            let op = self
                .u8()
                .map_err(|_| perr(at, "truncated: pickle ended without STOP"))?;
            match op {
                0x80 => {
                    let p = self.u8()?;
                    if p > 5 {
                        return Err(perr(at, format!("unsupported pickle protocol {p}")));
                    }
                }
                0x95 => {
                    self.take(8)?;
                }
                b'.' => {
                    let v = self.pop(at)?;
                    return Ok(v);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'}' => {
                    let v = self.alloc(Node::Dict(DictNode::default()))?;
                    self.push(v)
                }
                b']' => {
                    let v = self.alloc(Node::List(Vec::new()))?;
                    self.push(v)
                }
                b')' => {
                    let v = self.alloc(Node::Tuple(Vec::new()))?;
                    self.push(v)
                }
                0x8f => {
                    // EMPTY_SET: a list
                    let v = self.alloc(Node::List(Vec::new()))?;
                    self.push(v)
                }
                b'd' => {
                    let items = self.pop_mark(at)?;
                    if items.len() % 2 != 0 {
                        return Err(perr(at, "DICT with an odd number of items"));
                    }
                    let mut d = DictNode::default();
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        d.set(k, v);
                    }
                    let v = self.alloc(Node::Dict(d))?;
                    self.push(v)
                }
                b'l' | 0x91 => {
                    let items = self.pop_mark(at)?;
                    let v = self.alloc(Node::List(items))?;
                    self.push(v)
                }
                b't' => {
                    let items = self.pop_mark(at)?;
                    let v = self.alloc(Node::Tuple(items))?;
                    self.push(v)
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop(at)?);
                    }
                    items.reverse();
                    let v = self.alloc(Node::Tuple(items))?;
                    self.push(v)
                }
                b'q' => {
                    let i = self.u8()? as u64;
                    self.memo_put(at, i)?
                }
                b'r' => {
                    let i = u32::from_le_bytes(self.arr()?) as u64;
                    self.memo_put(at, i)?
                }
                0x94 => {
                    let i = self.memo.len() as u64;
                    self.memo_put(at, i)?
                }
                b'p' => {
                    let i: u64 = self
                        .line()?
                        .trim()
                        .parse()
                        .map_err(|_| perr(at, "bad PUT index"))?;
                    self.memo_put(at, i)?
                }
                b'h' => {
                    let i = self.u8()? as u64;
                    self.memo_get(at, i)?
                }
                b'j' => {
                    let i = u32::from_le_bytes(self.arr()?) as u64;
                    self.memo_get(at, i)?
                }
                b'g' => {
                    let i: u64 = self
                        .line()?
                        .trim()
                        .parse()
                        .map_err(|_| perr(at, "bad GET index"))?;
                    self.memo_get(at, i)?
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.arr()?) as i64;
                    self.push(V::Int(v))
                }
                b'K' => {
                    let v = self.u8()? as i64;
                    self.push(V::Int(v))
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.arr()?) as i64;
                    self.push(V::Int(v))
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    let v = self.long_from_le(at, b)?;
                    self.push(v)
                }
                0x8b => {
                    let n = i32::from_le_bytes(self.arr()?);
                    if n < 0 {
                        return Err(perr(at, "LONG4 with negative length"));
                    }
                    let b = self.take(n as usize)?;
                    let v = self.long_from_le(at, b)?;
                    self.push(v)
                }
                b'I' | b'L' => {
                    let s = self.line()?.trim().trim_end_matches('L');
                    let v = match s {
                        "00" => V::Bool(false),
                        "01" => V::Bool(true),
                        _ => V::Int(
                            s.parse()
                                .map_err(|_| perr(at, format!("bad integer literal '{s}'")))?,
                        ),
                    };
                    self.push(v)
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.arr()?);
                    self.push(V::Float(v))
                }
                b'F' => {
                    let s = self.line()?.trim();
                    let v: f64 = s
                        .parse()
                        .map_err(|_| perr(at, format!("bad float literal '{s}'")))?;
                    self.push(V::Float(v))
                }
                b'N' => self.push(V::None),
                0x88 => self.push(V::Bool(true)),
                0x89 => self.push(V::Bool(false)),
                b'X' => {
                    let n = u32::from_le_bytes(self.arr()?) as usize;
                    let b = self.take(n)?;
                    let v = self.str_val(at, b)?;
                    self.push(v)
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    let v = self.str_val(at, b)?;
                    self.push(v)
                }
                0x8d => {
                    let n = u64::from_le_bytes(self.arr()?);
                    let n = usize::try_from(n).map_err(|_| perr(at, "string too long"))?;
                    let b = self.take(n)?;
                    let v = self.str_val(at, b)?;
                    self.push(v)
                }
                b'T' => {
                    // BINSTRING: Python 2 str; torch reads it as latin-1 / bytes
                    let n = i32::from_le_bytes(self.arr()?);
                    if n < 0 {
                        return Err(perr(at, "BINSTRING with negative length"));
                    }
                    let b = self.take(n as usize)?;
                    let s: String = b.iter().map(|&c| c as char).collect();
                    self.push(V::Str(Rc::from(s.as_str())))
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    let s: String = b.iter().map(|&c| c as char).collect();
                    self.push(V::Str(Rc::from(s.as_str())))
                }
                b'B' => {
                    let n = u32::from_le_bytes(self.arr()?) as usize;
                    let b = self.take(n)?;
                    self.push(V::Bytes(Rc::from(b)))
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    self.push(V::Bytes(Rc::from(b)))
                }
                0x8e | 0x96 => {
                    let n = u64::from_le_bytes(self.arr()?);
                    let n = usize::try_from(n).map_err(|_| perr(at, "bytes too long"))?;
                    let b = self.take(n)?;
                    self.push(V::Bytes(Rc::from(b)))
                }
                b'a' => {
                    let item = self.pop(at)?;
                    let target = self.top(at)?.clone();
                    self.append(at, &target, vec![item])?
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark(at)?;
                    let target = self.top(at)?.clone();
                    self.append(at, &target, items)?
                }
                b's' => {
                    let v = self.pop(at)?;
                    let k = self.pop(at)?;
                    let target = self.top(at)?.clone();
                    self.set_items(at, &target, vec![k, v])?
                }
                b'u' => {
                    let items = self.pop_mark(at)?;
                    let target = self.top(at)?.clone();
                    self.set_items(at, &target, items)?
                }
                b'c' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    let v = self.alloc(Node::Global(module, name))?;
                    self.push(v)
                }
                0x93 => {
                    let name = self.pop(at)?;
                    let module = self.pop(at)?;
                    let (V::Str(m), V::Str(n)) = (module, name) else {
                        return Err(perr(at, "STACK_GLOBAL needs two strings"));
                    };
                    let v = self.alloc(Node::Global(m.to_string(), n.to_string()))?;
                    self.push(v)
                }
                b'R' => {
                    let args = self.pop(at)?;
                    let func = self.pop(at)?;
                    let args = self
                        .seq(&args)
                        .ok_or_else(|| perr(at, "REDUCE arguments are not a tuple"))?;
                    let v = self.call(at, &func, args)?;
                    self.push(v)
                }
                0x81 => {
                    let args = self.pop(at)?;
                    let cls = self.pop(at)?;
                    let args = self
                        .seq(&args)
                        .ok_or_else(|| perr(at, "NEWOBJ arguments are not a tuple"))?;
                    let (m, n) = self
                        .global(&cls)
                        .unwrap_or_else(|| ("?".into(), "?".into()));
                    let v = self.class_instance(at, m, n, args)?;
                    self.push(v)
                }
                0x92 => {
                    let _kwargs = self.pop(at)?;
                    let args = self.pop(at)?;
                    let cls = self.pop(at)?;
                    let args = self
                        .seq(&args)
                        .ok_or_else(|| perr(at, "NEWOBJ_EX arguments are not a tuple"))?;
                    let (m, n) = self
                        .global(&cls)
                        .unwrap_or_else(|| ("?".into(), "?".into()));
                    let v = self.class_instance(at, m, n, args)?;
                    self.push(v)
                }
                b'o' => {
                    let mut items = self.pop_mark(at)?;
                    if items.is_empty() {
                        return Err(perr(at, "OBJ without a class"));
                    }
                    let cls = items.remove(0);
                    let (m, n) = self
                        .global(&cls)
                        .unwrap_or_else(|| ("?".into(), "?".into()));
                    let v = self.class_instance(at, m, n, items)?;
                    self.push(v)
                }
                b'i' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    let items = self.pop_mark(at)?;
                    let v = self.class_instance(at, module, name, items)?;
                    self.push(v)
                }
                b'b' => {
                    let state = self.pop(at)?;
                    let target = self.top(at)?.clone();
                    if let V::Ref(i) = target {
                        if let Some(Node::Object { state: s, .. }) = self.arena.get_mut(i) {
                            *s = Some(state);
                        }
                        // BUILD on dicts (OrderedDict `_metadata`), tensors, ...: ignored
                    }
                }
                b'Q' => {
                    let pid = self.pop(at)?;
                    let v = self.persistent_load(at, &pid)?;
                    self.push(v)
                }
                b'0' => {
                    self.pop(at)?;
                }
                b'1' => {
                    self.pop_mark(at)?;
                }
                b'2' => {
                    let v = self.top(at)?.clone();
                    self.push(v)
                }
                other => {
                    return Err(perr(
                        at,
                        format!(
                            "unsupported pickle opcode 0x{other:02x} ({:?})",
                            other as char
                        ),
                    ))
                }
            }
        }
    }

    /// Python type name of a value, for messages.
    fn kind(&self, v: &V) -> &'static str {
        match v {
            V::None => "None",
            V::Bool(_) => "bool",
            V::Int(_) => "int",
            V::Float(_) => "float",
            V::Str(_) => "str",
            V::Bytes(_) => "bytes",
            V::Ref(_) => match self.node(v) {
                Some(Node::List(_)) => "list",
                Some(Node::Tuple(_)) => "tuple",
                Some(Node::Dict(_)) => "dict",
                Some(Node::Global(..)) => "global",
                Some(Node::Object { .. }) => "object",
                Some(Node::Storage(_)) => "storage",
                Some(Node::Tensor(_)) => "tensor",
                None => "?",
            },
        }
    }

    /// Shallow (key, value) pairs of a dict, or of an object filled by SETITEMS or whose BUILD
    /// state is a dict (see [`PyValue::dict_items`]).
    fn entries(&self, v: &V) -> Option<Vec<(V, V)>> {
        match self.node(v)? {
            Node::Dict(d) => Some(d.items.clone()),
            Node::Object { dict, state, .. } => {
                if !dict.items.is_empty() {
                    return Some(dict.items.clone());
                }
                let state = state.as_ref()?;
                match self.node(state)? {
                    Node::Dict(d) => Some(d.items.clone()),
                    Node::Tuple(t) if t.len() == 2 => match (self.node(&t[0]), self.node(&t[1])) {
                        (Some(Node::Dict(d)), _) if !d.items.is_empty() => Some(d.items.clone()),
                        (_, Some(Node::Dict(d))) => Some(d.items.clone()),
                        _ => None,
                    },
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// Converts an arena value into a plain tree, bounded in depth and total size.
    fn convert(&self, v: &V, depth: usize, budget: &mut usize) -> Result<PyValue> {
        if depth > 256 {
            return Err(perr(self.pos, "objects nested too deep (or cyclic)"));
        }
        if *budget == 0 {
            return Err(perr(self.pos, "pickle expands to too many objects"));
        }
        *budget -= 1;
        let conv_all = |xs: &[V], budget: &mut usize| -> Result<Vec<PyValue>> {
            xs.iter()
                .map(|x| self.convert(x, depth + 1, budget))
                .collect()
        };
        let conv_pairs = |d: &DictNode, budget: &mut usize| -> Result<Vec<(PyValue, PyValue)>> {
            d.items
                .iter()
                .map(|(k, v)| {
                    Ok((
                        self.convert(k, depth + 1, budget)?,
                        self.convert(v, depth + 1, budget)?,
                    ))
                })
                .collect()
        };
        Ok(match v {
            V::None => PyValue::None,
            V::Bool(b) => PyValue::Bool(*b),
            V::Int(i) => PyValue::Int(*i),
            V::Float(f) => PyValue::Float(*f),
            V::Str(s) => PyValue::Str(s.to_string()),
            V::Bytes(b) => PyValue::Bytes(b.to_vec()),
            V::Ref(i) => match self.arena.get(*i) {
                None => PyValue::None,
                Some(Node::List(x)) => PyValue::List(conv_all(x, budget)?),
                Some(Node::Tuple(x)) => PyValue::Tuple(conv_all(x, budget)?),
                Some(Node::Dict(d)) => PyValue::Dict(conv_pairs(d, budget)?),
                Some(Node::Global(m, n)) => PyValue::Global {
                    module: m.clone(),
                    name: n.clone(),
                },
                Some(Node::Object {
                    module,
                    name,
                    args,
                    state,
                    list_items,
                    dict,
                }) => PyValue::Object {
                    module: module.clone(),
                    name: name.clone(),
                    args: conv_all(args, budget)?,
                    state: match state {
                        Some(s) => Some(Box::new(self.convert(s, depth + 1, budget)?)),
                        None => None,
                    },
                    list_items: conv_all(list_items, budget)?,
                    dict_items: conv_pairs(dict, budget)?,
                },
                Some(Node::Storage(s)) => PyValue::Storage(s.clone()),
                Some(Node::Tensor(t)) => PyValue::Tensor(t.clone()),
            },
        })
    }
}

/// Runs a pickle (protocol 0-5 opcodes that build data; no code is executed) and returns its
/// value. Tensors stay [`TensorRef`]s.
pub fn load_pickle(data: &[u8]) -> Result<PyValue> {
    let mut vm = Vm::new(data);
    let v = vm.run()?;
    let mut budget = MAX_CONVERTED;
    vm.convert(&v, 0, &mut budget)
}

// ------------------------------------------------------------------------------------------------
// The zip archive.

/// Largest `data.pkl` we read (the pickle holds no tensor data).
const MAX_PICKLE_BYTES: u64 = 1 << 30;

/// An opened `torch.save` zip archive.
pub struct TorchArchive {
    zip: zip::ZipArchive<std::io::BufReader<std::fs::File>>,
    /// Top folder inside the zip, with its trailing '/', e.g. `checkpoint/`.
    pub prefix: String,
    what: String,
    /// Size of the archive file, the bound for any member's declared size.
    file_len: u64,
}

impl TorchArchive {
    /// Opens `path` as a torch zip archive, rejecting the pre-1.6 (non-zip) format clearly.
    pub fn open(path: &Path) -> Result<Self> {
        let what = path.display().to_string();
        let mut file =
            std::fs::File::open(path).map_err(|e| ck(format!("cannot open {what}: {e}")))?;
        let mut magic = [0u8; 4];
        let got = file
            .read(&mut magic)
            .map_err(|e| ck(format!("cannot read {what}: {e}")))?;
        if got >= 1 && magic[0] == 0x80 {
            return Err(ck(format!(
                "{what}: pre-1.6 torch.save format is not supported; re-save with torch>=1.6 \
                 (torch.save(obj, path) with the default _use_new_zipfile_serialization=True)"
            )));
        }
        if got < 4 || &magic[..2] != b"PK" {
            return Err(ck(format!(
                "{what}: not a PyTorch checkpoint (torch.save files are zip archives; this file has no zip signature)"
            )));
        }
        let file = std::fs::File::open(path).map_err(|e| ck(format!("cannot open {what}: {e}")))?;
        let file_len = file
            .metadata()
            .map_err(|e| ck(format!("cannot read {what}: {e}")))?
            .len();
        let zip = zip::ZipArchive::new(std::io::BufReader::new(file))
            .map_err(|e| ck(format!("{what}: corrupt or truncated zip archive: {e}")))?;
        // `<prefix>data.pkl` with the shortest prefix: `archive/data.pkl`, or `data.pkl`.
        let mut best: Option<String> = None;
        for name in zip.file_names() {
            let prefix = if name == "data.pkl" {
                Some("")
            } else {
                name.strip_suffix("/data.pkl")
                    .filter(|p| !p.contains('/'))
                    .map(|_| &name[..name.len() - 8])
            };
            if let Some(p) = prefix {
                if best.as_ref().is_none_or(|b| p.len() < b.len()) {
                    best = Some(p.to_string());
                }
            }
        }
        let prefix = best.ok_or_else(|| {
            ck(format!(
                "{what}: zip archive has no data.pkl: not a torch.save checkpoint"
            ))
        })?;
        let mut ar = TorchArchive {
            zip,
            prefix,
            what,
            file_len,
        };
        if let Some(b) = ar.read_small(&format!("{}byteorder", ar.prefix))? {
            if b.trim_ascii() == b"big" {
                return Err(ck(format!(
                    "{}: big-endian checkpoints are not supported",
                    ar.what
                )));
            }
        }
        Ok(ar)
    }

    /// Reads an optional small entry (None when absent).
    fn read_small(&mut self, name: &str) -> Result<Option<Vec<u8>>> {
        match self.zip.by_name(name) {
            Ok(f) => {
                let mut buf = Vec::new();
                f.take(4096)
                    .read_to_end(&mut buf)
                    .map_err(|e| ck(format!("{}: cannot read {name}: {e}", self.what)))?;
                Ok(Some(buf))
            }
            Err(zip::result::ZipError::FileNotFound) => Ok(None),
            Err(e) => Err(ck(format!("{}: cannot read {name}: {e}", self.what))),
        }
    }

    /// Reads an entry of exactly the expected length (or at least `min_len` bytes).
    fn read_entry(&mut self, name: &str, min_len: u64, max_len: u64) -> Result<Vec<u8>> {
        let what = &self.what;
        let f = self.zip.by_name(name).map_err(|e| match e {
            zip::result::ZipError::FileNotFound => {
                ck(format!("{what}: archive entry {name} is missing"))
            }
            e => ck(format!("{what}: cannot read archive entry {name}: {e}")),
        })?;
        let size = f.size();
        if size < min_len {
            return Err(ck(format!(
                "{what}: archive entry {name} holds {size} bytes, needs at least {min_len} (truncated?)"
            )));
        }
        if size > max_len {
            return Err(ck(format!(
                "{what}: archive entry {name} is implausibly large ({size} bytes)"
            )));
        }
        // The declared size comes from the (possibly corrupt) central directory: never reserve
        // more than the archive itself could hold (deflate expands at most ~1032x; torch stores
        // its members uncompressed, so this bound is loose for real files).
        let bound =
            self.file_len
                .saturating_mul(if f.compression() == zip::CompressionMethod::Stored {
                    1
                } else {
                    1032
                });
        if size > bound {
            return Err(ck(format!(
                "{what}: archive entry {name} claims {size} bytes, more than the {}-byte file can hold (corrupt zip directory)",
                self.file_len
            )));
        }
        let mut f = f;
        let mut buf = Vec::with_capacity(size.min(1 << 26) as usize);
        (&mut f)
            .take(size)
            .read_to_end(&mut buf)
            .map_err(|e| ck(format!("{what}: cannot read archive entry {name}: {e}")))?;
        if (buf.len() as u64) < min_len || (buf.len() as u64) < size {
            return Err(ck(format!("{what}: archive entry {name} is truncated")));
        }
        // `take(size)` stops before the zip reader sees its end, which is where it checks the
        // CRC-32: one more read reaches that end (and must find no extra byte). Without it a
        // member whose bytes were overwritten reads back without complaint.
        let mut extra = [0u8; 1];
        match f.read(&mut extra) {
            Ok(0) => {}
            Ok(_) => {
                return Err(ck(format!(
                    "{what}: archive entry {name} holds more than its declared {size} bytes (corrupt zip)"
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(ck(format!(
                    "{what}: archive entry {name} fails its CRC-32 check: its bytes were changed \
                     after it was written (corrupt or tampered file)"
                )))
            }
            Err(e) => {
                return Err(ck(format!(
                    "{what}: cannot read archive entry {name}: {e}"
                )))
            }
        }
        Ok(buf)
    }

    /// Runs `data.pkl`.
    pub fn load(&mut self) -> Result<PyValue> {
        let name = format!("{}data.pkl", self.prefix);
        let data = self.read_entry(&name, 0, MAX_PICKLE_BYTES)?;
        load_pickle(&data).map_err(|e| match e {
            AsaError::Checkpoint(m) => ck(format!("{}: {name}: {m}", self.what)),
            e => e,
        })
    }

    /// Raw bytes of storage `key` (`<prefix>data/<key>`).
    pub fn storage_bytes(&mut self, key: &str, min_len: u64) -> Result<Vec<u8>> {
        if key.is_empty() || key.contains('/') || key.contains("..") {
            return Err(ck(format!("{}: invalid storage key '{key}'", self.what)));
        }
        let name = format!("{}data/{key}", self.prefix);
        self.read_entry(&name, min_len, u64::MAX)
    }

    /// Reads the tensors `t` from the archive as contiguous row-major copies; `name` is used in
    /// messages. `cache` keeps storage bytes shared between several tensors.
    pub fn materialize(
        &mut self,
        name: &str,
        t: &TensorRef,
        cache: &mut HashMap<String, Rc<Vec<u8>>>,
    ) -> Result<AnyTensor> {
        let what = self.what.clone();
        let (dtype, esize) = t.dtype.layout().ok_or_else(|| {
            ck(format!(
                "{what}: tensor '{name}' has an unsupported storage type {:?}",
                t.dtype
            ))
        })?;
        let bad = |m: String| ck(format!("{what}: tensor '{name}': {m}"));
        let numel =
            checked_numel(&t.size).ok_or_else(|| bad(format!("size {:?} overflows", t.size)))?;
        // highest element index touched
        let mut max_index = t.offset;
        if numel > 0 {
            for (&s, &st) in t.size.iter().zip(&t.stride) {
                max_index = (s - 1)
                    .checked_mul(st)
                    .and_then(|x| max_index.checked_add(x))
                    .ok_or_else(|| bad("strides overflow".to_string()))?;
            }
        }
        let needed_elems = if numel == 0 { 0 } else { max_index + 1 };
        let needed = (needed_elems as u64)
            .checked_mul(esize as u64)
            .ok_or_else(|| bad("storage size overflows".to_string()))?;

        let bytes = match cache.get(&t.storage.key) {
            Some(b) => b.clone(),
            None => {
                let b = Rc::new(self.storage_bytes(&t.storage.key, 0)?);
                cache.insert(t.storage.key.clone(), b.clone());
                b
            }
        };
        let storage_elems = bytes.len() / esize;
        if numel > storage_elems.max(1).saturating_mul(16) {
            return Err(bad(format!(
                "a view of {numel} elements over a storage of {storage_elems} (expanded tensors are not supported)"
            )));
        }
        if (bytes.len() as u64) < needed {
            return Err(bad(format!(
                "storage {} holds {} bytes but the view (offset {}, size {:?}, stride {:?}) needs {needed}",
                t.storage.key,
                bytes.len(),
                t.offset,
                t.size,
                t.stride
            )));
        }
        // Gather a contiguous row-major copy.
        let mut contiguous = true;
        let mut expect = 1usize;
        for (&s, &st) in t.size.iter().zip(&t.stride).rev() {
            if s != 1 && st != expect {
                contiguous = false;
            }
            expect = expect.saturating_mul(s);
        }
        let raw: Vec<u8> = if numel == 0 {
            Vec::new()
        } else if contiguous {
            bytes[t.offset * esize..(t.offset + numel) * esize].to_vec()
        } else {
            let mut out = Vec::with_capacity(numel * esize);
            let nd = t.size.len();
            let mut idx = vec![0usize; nd];
            for _ in 0..numel {
                let off: usize =
                    t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
                out.extend_from_slice(&bytes[off * esize..(off + 1) * esize]);
                for d in (0..nd).rev() {
                    idx[d] += 1;
                    if idx[d] < t.size[d] {
                        break;
                    }
                    idx[d] = 0;
                }
            }
            out
        };
        let data =
            decode_le(dtype, &raw).ok_or_else(|| bad(format!("cannot decode dtype {dtype}")))?;
        Ok(AnyTensor {
            shape: t.size.clone(),
            data,
            stored_dtype: dtype,
        })
    }
}

/// What a training checkpoint holds, as far as this crate cares.
#[derive(Debug, Clone)]
pub struct PtCheckpoint {
    /// The training config (a dict, or a dataclass / namespace's fields) as JSON.
    pub cfg: Option<serde_json::Value>,
    /// The model's state dict with the file's key names.
    pub state_dict: BTreeMap<String, AnyTensor>,
    pub step: Option<i64>,
    pub best_val: Option<f64>,
    /// Whether an optimizer state was saved alongside (it is not read).
    pub has_optimizer: bool,
}

/// Reads a `torch.save` file: the notebooks' `{cfg, model, opt, step, best_val}` dict (the model
/// may also be under `model_state_dict` / `state_dict`; cfg may be a dict or a dataclass /
/// namespace object), or a bare state dict (string keys to tensors). Only the parts needed are
/// interpreted: the optimizer state is neither converted nor read.
pub fn read_pt(path: &Path) -> Result<PtCheckpoint> {
    let what = path.display().to_string();
    let mut ar = TorchArchive::open(path)?;
    let pkl_name = format!("{}data.pkl", ar.prefix);
    let data = ar.read_entry(&pkl_name, 0, MAX_PICKLE_BYTES)?;
    let wrap = |e: AsaError| match e {
        AsaError::Checkpoint(m) => ck(format!("{what}: {pkl_name}: {m}")),
        e => e,
    };
    let mut vm = Vm::new(&data);
    let root = vm.run().map_err(wrap)?;
    let top = vm.entries(&root).ok_or_else(|| {
        ck(format!(
            "{what}: the checkpoint holds a {}, expected a dict (a state dict or {{cfg, model, ...}})",
            vm.kind(&root)
        ))
    })?;
    let find = |key: &str| {
        top.iter()
            .find(|(k, _)| matches!(k, V::Str(s) if &**s == key))
            .map(|(_, v)| v)
    };

    let model = ["model", "model_state_dict", "state_dict"]
        .iter()
        .find_map(|k| find(k).and_then(|v| vm.entries(v)));
    let is_bare = model.is_none();
    let sd_items = match model {
        Some(m) => m,
        None => {
            let all_tensors = !top.is_empty()
                && top
                    .iter()
                    .all(|(k, v)| matches!(k, V::Str(_)) && vm.kind(v) == "tensor");
            if !all_tensors {
                let keys: Vec<String> = top
                    .iter()
                    .take(20)
                    .map(|(k, _)| match k {
                        V::Str(s) => format!("'{s}'"),
                        other => vm.kind(other).to_string(),
                    })
                    .collect();
                return Err(ck(format!(
                    "{what}: no model state dict found: expected a 'model' (or 'model_state_dict' / \
                     'state_dict') entry or a bare state dict; top-level keys: {}",
                    keys.join(", ")
                )));
            }
            top.clone()
        }
    };

    // Collect tensor refs and count storage uses so shared storages are read once.
    let mut refs: Vec<(String, TensorRef)> = Vec::with_capacity(sd_items.len());
    for (k, v) in &sd_items {
        let key = match k {
            V::Str(s) => s.to_string(),
            other => {
                return Err(ck(format!(
                    "{what}: state dict has a non-string key ({})",
                    vm.kind(other)
                )))
            }
        };
        match vm.node(v) {
            Some(Node::Tensor(t)) => refs.push((key, t.clone())),
            _ => {
                return Err(ck(format!(
                    "{what}: state dict entry '{key}' is not a tensor (found {})",
                    vm.kind(v)
                )))
            }
        }
    }
    let mut uses: HashMap<String, usize> = HashMap::new();
    for (_, t) in &refs {
        *uses.entry(t.storage.key.clone()).or_default() += 1;
    }
    let mut cache = HashMap::new();
    let mut state_dict = BTreeMap::new();
    for (key, t) in &refs {
        let tensor = ar.materialize(key, t, &mut cache)?;
        if let Some(n) = uses.get_mut(&t.storage.key) {
            *n -= 1;
            if *n == 0 {
                cache.remove(&t.storage.key);
            }
        }
        state_dict.insert(key.clone(), tensor);
    }

    if is_bare {
        return Ok(PtCheckpoint {
            cfg: None,
            state_dict,
            step: None,
            best_val: None,
            has_optimizer: false,
        });
    }
    let cfg = match ["cfg", "config"].iter().find_map(|k| find(k)) {
        Some(v) => {
            let mut budget = MAX_CONVERTED;
            match vm.convert(v, 0, &mut budget).map_err(wrap)?.to_json() {
                serde_json::Value::Object(m) => Some(serde_json::Value::Object(m)),
                _ => None,
            }
        }
        None => None,
    };
    let step = ["step", "global_step"]
        .iter()
        .find_map(|k| find(k))
        .and_then(|v| match v {
            V::Int(i) => Some(*i),
            V::Float(f) if f.fract() == 0.0 && f.abs() < 9e15 => Some(*f as i64),
            _ => None,
        });
    let best_val = ["best_val", "best_val_loss"]
        .iter()
        .find_map(|k| find(k))
        .and_then(|v| match v {
            V::Float(f) => Some(*f),
            V::Int(i) => Some(*i as f64),
            _ => match vm.node(v) {
                Some(Node::Tensor(t)) if checked_numel(&t.size) == Some(1) => ar
                    .materialize("best_val", t, &mut HashMap::new())
                    .ok()
                    .and_then(|a| a.to_f64()?.first().copied()),
                _ => None,
            },
        });
    let has_optimizer = ["opt", "optimizer", "optimizer_state_dict"]
        .iter()
        .any(|k| find(k).is_some_and(|v| !matches!(v, V::None)));
    Ok(PtCheckpoint {
        cfg,
        state_dict,
        step,
        best_val,
        has_optimizer,
    })
}

/// Builders for small `torch.save`-style files in tests.
#[cfg(test)]
pub(crate) mod test_support {
    use std::io::Write;
    use std::path::Path;

    /// SHORT_BINUNICODE.
    pub fn s(x: &str) -> Vec<u8> {
        let mut v = vec![0x8c, x.len() as u8];
        v.extend_from_slice(x.as_bytes());
        v
    }

    fn tuple_of_ints(xs: &[usize]) -> Vec<u8> {
        let mut v = vec![b'('];
        for &x in xs {
            v.push(b'J');
            v.extend_from_slice(&(x as i32).to_le_bytes());
        }
        v.push(b't');
        v
    }

    /// Pushes `_rebuild_tensor_v2(FloatStorage key, offset, size, stride, False, OrderedDict())`.
    pub fn tensor(
        key: &str,
        numel: usize,
        offset: usize,
        size: &[usize],
        stride: &[usize],
    ) -> Vec<u8> {
        let mut v = b"ctorch._utils\n_rebuild_tensor_v2\n((".to_vec();
        v.extend(s("storage"));
        v.extend_from_slice(b"ctorch\nFloatStorage\n");
        v.extend(s(key));
        v.extend(s("cpu"));
        v.push(b'J');
        v.extend_from_slice(&(numel as i32).to_le_bytes());
        v.extend_from_slice(b"tQ");
        v.push(b'J');
        v.extend_from_slice(&(offset as i32).to_le_bytes());
        v.extend(tuple_of_ints(size));
        v.extend(tuple_of_ints(stride));
        v.push(0x89);
        v.extend_from_slice(b"ccollections\nOrderedDict\n)RtR");
        v
    }

    /// Writes a zip with `arch/data.pkl` = PROTO 2 + `body` + STOP and f32 storages.
    pub fn write_pt(path: &Path, body: &[u8], storages: &[(&str, &[f32])]) {
        let mut w = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
        let opt = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        let mut pkl = vec![0x80, 2];
        pkl.extend_from_slice(body);
        pkl.push(b'.');
        w.start_file("arch/data.pkl", opt).unwrap();
        w.write_all(&pkl).unwrap();
        w.start_file("arch/byteorder", opt).unwrap();
        w.write_all(b"little").unwrap();
        for (key, data) in storages {
            w.start_file(format!("arch/data/{key}"), opt).unwrap();
            for x in data.iter() {
                w.write_all(&x.to_le_bytes()).unwrap();
            }
        }
        w.finish().unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn legacy_pt() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/legacy_pt/checkpoint.pt")
    }

    /// Raw bytes of a zip entry, read independently of `TorchArchive`.
    fn zip_entry(path: &Path, name: &str) -> Vec<u8> {
        let mut z = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
        let mut f = z.by_name(name).unwrap();
        let mut b = Vec::new();
        f.read_to_end(&mut b).unwrap();
        b
    }

    #[test]
    fn reads_legacy_checkpoint() {
        let p = legacy_pt();
        let ck = read_pt(&p).unwrap();
        let cfg = ck.cfg.as_ref().unwrap();
        assert_eq!(cfg["vocab_size"], 97);
        assert_eq!(cfg["embed_dim"], 48);
        assert_eq!(cfg["betas"], serde_json::json!([0.9, 0.95]));
        assert!(ck.has_optimizer);
        // values as the pickle stores them (see `python3 -m pickletools` on data.pkl)
        assert_eq!(ck.step, Some(7500));
        assert_eq!(ck.best_val, Some(3.3));
        let tok = &ck.state_dict["tok.weight"];
        assert_eq!(tok.shape, vec![97, 48]);
        assert_eq!(tok.dtype_name(), "F32");
        assert_eq!(
            ck.state_dict["blocks.0.asa.slot_keys"].shape,
            vec![4, 6, 12]
        );
        assert_eq!(
            ck.state_dict["blocks.0.asa._alibi_strength_param"].shape,
            Vec::<usize>::new()
        );
        assert!(!ck.state_dict.keys().any(|k| k.ends_with("mlp.0.bias")));
    }

    #[test]
    fn tensor_values_match_raw_storage() {
        // Find each tensor's storage key from the pickle, then compare the decoded values with an
        // independent little-endian decode of the zip entry (all these tensors are contiguous views
        // at offset 0 of their own storage).
        let p = legacy_pt();
        let mut ar = TorchArchive::open(&p).unwrap();
        assert_eq!(ar.prefix, "checkpoint/");
        let top = ar.load().unwrap();
        let model = top.get("model").unwrap();
        let ck = read_pt(&p).unwrap();
        let mut checked = 0;
        for name in [
            "blocks.0.asa.slot_keys",
            "tok.weight",
            "blocks.1.mlp.3.weight",
            "norm.bias",
        ] {
            let Some(PyValue::Tensor(t)) = model.get(name) else {
                panic!("{name} is not a tensor")
            };
            assert_eq!(t.offset, 0);
            let raw = zip_entry(&p, &format!("checkpoint/data/{}", t.storage.key));
            let want: Vec<f32> = raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            assert_eq!(
                ck.state_dict[name].to_f32().unwrap(),
                want[..ck.state_dict[name].len()].to_vec()
            );
            checked += 1;
        }
        assert_eq!(checked, 4);
    }

    #[test]
    fn strided_views_are_gathered() {
        use test_support::*;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.pt");
        let storage: Vec<f32> = (0..8).map(|i| i as f32).collect();
        // {'w': transposed view size (3, 2) stride (1, 3) at offset 1, 'v': contiguous [2] at 6,
        //  'bad': a view past the end of its storage}
        let mut body = b"}(".to_vec();
        body.extend(s("w"));
        body.extend(tensor("0", 8, 1, &[3, 2], &[1, 3]));
        body.extend(s("v"));
        body.extend(tensor("0", 8, 6, &[2], &[1]));
        body.push(b'u');
        write_pt(&path, &body, &[("0", &storage)]);
        let ck = read_pt(&path).unwrap();
        assert!(ck.cfg.is_none() && !ck.has_optimizer);
        let w = &ck.state_dict["w"];
        assert_eq!(w.shape, vec![3, 2]);
        // element (i, j) sits at 1 + i * 1 + j * 3
        assert_eq!(w.to_f32().unwrap(), vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        assert_eq!(ck.state_dict["v"].to_f32().unwrap(), vec![6.0, 7.0]);

        let mut body = b"}(".to_vec();
        body.extend(s("bad"));
        body.extend(tensor("0", 8, 5, &[2, 2], &[2, 1]));
        body.push(b'u');
        write_pt(&path, &body, &[("0", &storage)]);
        let e = read_pt(&path).unwrap_err().to_string();
        assert!(e.contains("'bad'") && e.contains("storage 0"), "{e}");
        // a storage entry missing from the archive
        write_pt(&path, &body, &[]);
        let e = read_pt(&path).unwrap_err().to_string();
        assert!(e.contains("arch/data/0") && e.contains("missing"), "{e}");
    }

    #[test]
    fn dataclass_cfg_and_state_dict_variants() {
        use test_support::*;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.pt");
        let storage = [0.5f32, -1.5];
        // {'cfg': __main__.ASMTrainConfig (NEWOBJ + BUILD {...}), 'model_state_dict':
        //  OrderedDict() filled by SETITEMS, 'optimizer': None, 'step': 12, 'best_val': 2.5}
        let mut body = b"}(".to_vec();
        body.extend(s("cfg"));
        body.extend_from_slice(b"c__main__\nASMTrainConfig\n)\x81}(");
        body.extend(s("vocab_size"));
        body.extend_from_slice(&[b'K', 97]);
        body.extend(s("betas"));
        body.extend_from_slice(
            b"G\x3f\xec\xcc\xcc\xcc\xcc\xcc\xcdG\x3f\xee\x66\x66\x66\x66\x66\x66\x86",
        );
        body.extend_from_slice(b"ub");
        body.extend(s("model_state_dict"));
        body.extend_from_slice(b"ccollections\nOrderedDict\n)R(");
        body.extend(s("a.weight"));
        body.extend(tensor("k", 2, 0, &[2], &[1]));
        body.extend(s("scalar"));
        body.extend(tensor("k", 2, 1, &[], &[]));
        body.push(b'u');
        body.extend(s("optimizer"));
        body.push(b'N');
        body.extend(s("step"));
        body.extend_from_slice(&[b'K', 12]);
        body.extend(s("best_val"));
        body.extend_from_slice(b"G\x40\x04\x00\x00\x00\x00\x00\x00");
        body.push(b'u');
        write_pt(&path, &body, &[("k", &storage)]);
        let ck = read_pt(&path).unwrap();
        let cfg = ck.cfg.unwrap();
        assert_eq!(cfg["vocab_size"], 97);
        assert_eq!(cfg["betas"], serde_json::json!([0.9, 0.95]));
        assert_eq!(ck.state_dict["a.weight"].to_f32().unwrap(), vec![0.5, -1.5]);
        assert_eq!(ck.state_dict["scalar"].shape, Vec::<usize>::new());
        assert_eq!(ck.state_dict["scalar"].to_f32().unwrap(), vec![-1.5]);
        assert!(!ck.has_optimizer);
        assert_eq!(ck.step, Some(12));
        assert_eq!(ck.best_val, Some(2.5));

        // a dict that is neither: a clear message listing its keys
        let mut body = b"}(".to_vec();
        body.extend(s("foo"));
        body.extend_from_slice(&[b'K', 1]);
        body.push(b'u');
        write_pt(&path, &body, &[]);
        let e = read_pt(&path).unwrap_err().to_string();
        assert!(
            e.contains("no model state dict") && e.contains("'foo'"),
            "{e}"
        );
        // a state dict entry that is not a tensor names the key
        let mut body = b"}(".to_vec();
        body.extend(s("model"));
        body.extend_from_slice(b"}(");
        body.extend(s("x.weight"));
        body.extend_from_slice(&[b'K', 1]);
        body.extend_from_slice(b"uu");
        write_pt(&path, &body, &[]);
        let e = read_pt(&path).unwrap_err().to_string();
        assert!(
            e.contains("'x.weight'") && e.contains("not a tensor"),
            "{e}"
        );
    }

    #[test]
    fn pickle_objects_keep_state() {
        // A dataclass-like object: __main__.Cfg via NEWOBJ, BUILD with a field dict.
        let mut p = vec![0x80, 2];
        p.extend_from_slice(
            b"c__main__\nCfg\n)\x81}(\x8c\x0avocab_size\x4b\x61\x8c\x03tagX\x01\x00\x00\x00xub.",
        );
        let v = load_pickle(&p).unwrap();
        assert_eq!(
            v.to_json(),
            serde_json::json!({"vocab_size": 97, "tag": "x"})
        );
        let PyValue::Object { module, name, .. } = &v else {
            panic!()
        };
        assert_eq!((module.as_str(), name.as_str()), ("__main__", "Cfg"));
        // memo sharing: a list put in the memo, filled later, fetched again
        let p = b"\x80\x02]q\x00(K\x01K\x02eh\x00\x86.";
        let v = load_pickle(p).unwrap();
        assert_eq!(
            v,
            PyValue::Tuple(vec![
                PyValue::List(vec![PyValue::Int(1), PyValue::Int(2)]),
                PyValue::List(vec![PyValue::Int(1), PyValue::Int(2)])
            ])
        );
        // LONG1 negative and wide
        assert_eq!(
            load_pickle(b"\x80\x02\x8a\x02\x00\xff.").unwrap(),
            PyValue::Int(-256)
        );
        assert_eq!(
            load_pickle(b"\x80\x02\x8a\x09\xff\xff\xff\xff\xff\xff\xff\xff\xff.").unwrap(),
            PyValue::Int(-1)
        );
        assert!(load_pickle(b"\x80\x02\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01.").is_err());
    }

    #[test]
    fn pickle_errors_are_clear() {
        let e = load_pickle(b"\x80\x02\xff.").unwrap_err().to_string();
        assert!(e.contains("opcode 0xff") && e.contains("byte 2"), "{e}");
        let e = load_pickle(b"\x80\x02X\x10\x00\x00\x00ab")
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
        let e = load_pickle(b"\x80\x02}").unwrap_err().to_string();
        assert!(e.contains("STOP"), "{e}");
        // a cycle: list appended to itself
        let e = load_pickle(b"\x80\x02]q\x00h\x00a.")
            .unwrap_err()
            .to_string();
        assert!(e.contains("deep"), "{e}");
        // exponential sharing is bounded
        let mut p = b"\x80\x02]q\x00".to_vec();
        for i in 0..40u8 {
            p.extend_from_slice(&[b'h', i, b'h', i, 0x86, b'q', i + 1]);
        }
        p.push(b'.');
        assert!(load_pickle(&p).is_err());
    }

    #[test]
    fn truncated_and_corrupt_pt_files() {
        let full = std::fs::read(legacy_pt()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trunc.pt");
        std::fs::write(&path, &full[..1000]).unwrap();
        let e = read_pt(&path).unwrap_err().to_string();
        assert!(e.contains("trunc.pt"), "{e}");
        // prefixes and byte flips: errors or success, never a panic
        for cut in (0..full.len())
            .step_by(4099)
            .chain([full.len() - 1, full.len() - 22])
        {
            std::fs::write(&path, &full[..cut]).unwrap();
            let _ = read_pt(&path);
        }
        for i in (0..8000)
            .step_by(37)
            .chain((full.len() - 6000..full.len()).step_by(53))
        {
            let mut b = full.clone();
            b[i] ^= 0x41;
            std::fs::write(&path, &b).unwrap();
            let _ = read_pt(&path);
        }
        // pickle bytes themselves truncated at every position
        let pkl = zip_entry(&legacy_pt(), "checkpoint/data.pkl");
        for cut in 0..pkl.len() {
            assert!(load_pickle(&pkl[..cut]).is_err());
        }
        // legacy (pre-1.6) format and non-zip files
        std::fs::write(&path, b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.").unwrap();
        let e = read_pt(&path).unwrap_err().to_string();
        assert!(e.contains("pre-1.6"), "{e}");
        std::fs::write(&path, b"hello").unwrap();
        let e = read_pt(&path).unwrap_err().to_string();
        assert!(e.contains("not a PyTorch checkpoint"), "{e}");
        let e = read_pt(&dir.path().join("nope.pt"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.pt"), "{e}");
    }
    #[test]
    fn overwritten_tensor_bytes_fail_the_crc_check() {
        // Overwrite a few bytes inside one storage member (stored uncompressed, so its bytes sit
        // in the file as they are): the zip's CRC-32 no longer matches and the member is named.
        let full = std::fs::read(legacy_pt()).unwrap();
        let tok = read_pt(&legacy_pt()).unwrap().state_dict["tok.weight"]
            .to_f32()
            .unwrap();
        let raw: Vec<u8> = tok[..16].iter().flat_map(|x| x.to_le_bytes()).collect();
        let at = full
            .windows(64)
            .position(|w| w == &raw[..])
            .expect("stored member bytes in the file");
        let mut b = full.clone();
        for x in &mut b[at + 16..at + 24] {
            *x ^= 0xff;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tampered.pt");
        std::fs::write(&path, &b).unwrap();
        let e = read_pt(&path).unwrap_err().to_string();
        assert!(
            e.contains("tampered.pt") && e.contains("/data/") && e.contains("CRC-32"),
            "{e}"
        );
        // the untouched file still reads
        read_pt(&legacy_pt()).unwrap();
    }
}
