//! safetensors reading and (atomic) writing.
//!
//! The reader parses the header itself (instead of going through `safetensors::SafeTensors`) so
//! that every failure can name the file, the tensor and what exactly is wrong. Files written here
//! follow the format exactly (8-byte little-endian header length, JSON header padded with spaces
//! to a multiple of 8, contiguous tensor data), so the `safetensors` crate and Python read them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::ck;
use crate::error::{AsaError, Result};

/// Largest header we accept (the `safetensors` crate uses the same 100 MB bound).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Metadata key of the CRC-32 (8 hex digits) of the data section, written by
/// [`write_safetensors`] and checked on read when present: a weight damaged on disk (or a bit
/// flipped in a copy) is an error, not a silently different model. Other readers ignore it.
pub const CRC_KEY: &str = "asa_crc32";

/// Element data of a tensor read from a file. Half types (F16, BF16) are widened to `F32`;
/// integer and bool types are widened to `I64`.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
}

/// A tensor of any supported dtype, row-major, with its shape (`[]` for a scalar).
#[derive(Debug, Clone, PartialEq)]
pub struct AnyTensor {
    pub shape: Vec<usize>,
    pub data: TensorData,
    /// The dtype as stored in the file ("I32", "BF16", ...), which messages report: the data
    /// may have been widened (an I32 tensor is held as I64 but is not an I64 tensor).
    pub stored_dtype: &'static str,
}

impl AnyTensor {
    pub fn from_f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        Self::new(shape, TensorData::F32(data))
    }

    /// A tensor stored as its in-memory dtype ("F32", "F64" or "I64").
    pub fn new(shape: Vec<usize>, data: TensorData) -> Self {
        let stored_dtype = match &data {
            TensorData::F32(_) => "F32",
            TensorData::F64(_) => "F64",
            TensorData::I64(_) => "I64",
        };
        AnyTensor {
            shape,
            data,
            stored_dtype,
        }
    }

    /// Number of elements held.
    pub fn len(&self) -> usize {
        match &self.data {
            TensorData::F32(v) => v.len(),
            TensorData::F64(v) => v.len(),
            TensorData::I64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The data as f32 (floating dtypes only; `None` for integer tensors).
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        match &self.data {
            TensorData::F32(v) => Some(v.clone()),
            TensorData::F64(v) => Some(v.iter().map(|&x| x as f32).collect()),
            TensorData::I64(_) => None,
        }
    }

    /// The data as f64 (floating dtypes only; `None` for integer tensors).
    pub fn to_f64(&self) -> Option<Vec<f64>> {
        match &self.data {
            TensorData::F32(v) => Some(v.iter().map(|&x| x as f64).collect()),
            TensorData::F64(v) => Some(v.clone()),
            TensorData::I64(_) => None,
        }
    }

    /// The data as i64 (integer dtypes only; `None` for floating tensors).
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        match &self.data {
            TensorData::I64(v) => Some(v.clone()),
            _ => None,
        }
    }

    /// The dtype as stored in the file (see `stored_dtype`), e.g. "I32" for an I32 tensor that
    /// is held widened to I64.
    pub fn dtype_name(&self) -> &'static str {
        self.stored_dtype
    }
}

/// Checked product of a shape.
pub(crate) fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

/// Decodes little-endian elements of `dtype` (a safetensors dtype name) into `TensorData`.
/// `None` for an unsupported dtype. `bytes.len()` must be a multiple of the element size.
pub(crate) fn decode_le(dtype: &str, bytes: &[u8]) -> Option<TensorData> {
    fn arr<const N: usize>(c: &[u8]) -> [u8; N] {
        let mut a = [0u8; N];
        a.copy_from_slice(c);
        a
    }
    Some(match dtype {
        "F32" => TensorData::F32(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(arr(c)))
                .collect(),
        ),
        "F64" => TensorData::F64(
            bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(arr(c)))
                .collect(),
        ),
        "F16" => TensorData::F32(
            bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes(arr(c)).to_f32())
                .collect(),
        ),
        "BF16" => TensorData::F32(
            bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes(arr(c)).to_f32())
                .collect(),
        ),
        "I64" => TensorData::I64(
            bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(arr(c)))
                .collect(),
        ),
        "I32" => TensorData::I64(
            bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(arr(c)) as i64)
                .collect(),
        ),
        "U32" => TensorData::I64(
            bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(arr(c)) as i64)
                .collect(),
        ),
        "I16" => TensorData::I64(
            bytes
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes(arr(c)) as i64)
                .collect(),
        ),
        "U16" => TensorData::I64(
            bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes(arr(c)) as i64)
                .collect(),
        ),
        "I8" => TensorData::I64(bytes.iter().map(|&b| b as i8 as i64).collect()),
        "U8" => TensorData::I64(bytes.iter().map(|&b| b as i64).collect()),
        "BOOL" => TensorData::I64(bytes.iter().map(|&b| (b != 0) as i64).collect()),
        _ => return None,
    })
}

/// The `'static` spelling of a supported safetensors dtype name.
pub(crate) fn static_dtype(dtype: &str) -> &'static str {
    const NAMES: [&str; 14] = [
        "F64", "I64", "U64", "F32", "I32", "U32", "F16", "BF16", "I16", "U16", "I8", "U8", "BOOL",
        "F8_E5M2",
    ];
    NAMES
        .iter()
        .find(|&&n| n == dtype)
        .copied()
        .unwrap_or("unknown")
}

/// Element size in bytes of a supported safetensors dtype name.
pub(crate) fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E5M2" | "F8_E4M3" => 1,
        _ => return None,
    })
}

/// One parsed header entry.
struct Entry {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// Parses the header of a safetensors byte buffer. Returns (data section start, entries,
/// metadata). `what` names the file in messages.
fn parse_header(bytes: &[u8], what: &str) -> Result<(usize, Vec<Entry>, HashMap<String, String>)> {
    let len = bytes.len();
    if len < 8 {
        return Err(ck(format!(
            "{what}: file is only {len} bytes, too short for a safetensors header (truncated or not a safetensors file)"
        )));
    }
    let mut n8 = [0u8; 8];
    n8.copy_from_slice(&bytes[..8]);
    let n = u64::from_le_bytes(n8);
    if n > MAX_HEADER_BYTES {
        return Err(ck(format!(
            "{what}: header length {n} is implausible (over {MAX_HEADER_BYTES} bytes): not a safetensors file?"
        )));
    }
    let n = n as usize;
    if 8 + n > len {
        return Err(ck(format!(
            "{what}: truncated: the header claims {n} bytes but the file has only {} after the length field",
            len - 8
        )));
    }
    let text = std::str::from_utf8(&bytes[8..8 + n]).map_err(|_| {
        ck(format!(
            "{what}: corrupt header: not valid UTF-8 (not a safetensors file?)"
        ))
    })?;
    let header: serde_json::Value = serde_json::from_str(text.trim_end_matches(['\0', ' ']))
        .map_err(|e| ck(format!("{what}: corrupt header: not valid JSON ({e})")))?;
    let obj = header
        .as_object()
        .ok_or_else(|| ck(format!("{what}: corrupt header: expected a JSON object")))?;
    let data_len = len - 8 - n;
    let mut metadata = HashMap::new();
    let mut entries = Vec::with_capacity(obj.len());
    for (name, info) in obj {
        if name == "__metadata__" {
            let m = info.as_object().ok_or_else(|| {
                ck(format!(
                    "{what}: corrupt header: __metadata__ is not an object"
                ))
            })?;
            for (k, v) in m {
                let s = v.as_str().ok_or_else(|| {
                    ck(format!(
                        "{what}: corrupt header: __metadata__ value of '{k}' is not a string"
                    ))
                })?;
                metadata.insert(k.clone(), s.to_string());
            }
            continue;
        }
        let bad = |why: &str| {
            ck(format!(
                "{what}: corrupt header entry for tensor '{name}': {why}"
            ))
        };
        let dtype = info
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| bad("no dtype string"))?
            .to_string();
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("no shape array"))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| bad("shape must hold non-negative integers"))?;
        let offs: Vec<usize> = info
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("no data_offsets"))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| bad("data_offsets must hold non-negative integers"))?;
        if offs.len() != 2 || offs[0] > offs[1] {
            return Err(bad("data_offsets must be [begin, end] with begin <= end"));
        }
        let esize = dtype_size(&dtype).ok_or_else(|| {
            ck(format!(
                "{what}: tensor '{name}' has unsupported dtype '{dtype}'"
            ))
        })?;
        let nbytes = checked_numel(&shape)
            .and_then(|n| n.checked_mul(esize))
            .ok_or_else(|| bad("shape overflows"))?;
        if offs[1] - offs[0] != nbytes {
            return Err(bad(&format!(
                "shape {shape:?} of {dtype} needs {nbytes} bytes but data_offsets span {}",
                offs[1] - offs[0]
            )));
        }
        if offs[1] > data_len {
            return Err(ck(format!(
                "{what}: truncated: tensor '{name}' ends at data byte {} but the file holds only {data_len} data bytes",
                offs[1]
            )));
        }
        entries.push(Entry {
            name: name.clone(),
            dtype,
            shape,
            start: offs[0],
            end: offs[1],
        });
    }
    Ok((8 + n, entries, metadata))
}

/// Decodes a whole safetensors buffer. `what` names the file in messages.
pub fn parse_safetensors(
    bytes: &[u8],
    what: &str,
) -> Result<(BTreeMap<String, AnyTensor>, HashMap<String, String>)> {
    let (base, entries, metadata) = parse_header(bytes, what)?;
    if let Some(want) = metadata.get(CRC_KEY) {
        let want = u32::from_str_radix(want, 16).map_err(|_| {
            ck(format!(
                "{what}: corrupt header: __metadata__ {CRC_KEY} is not 8 hex digits"
            ))
        })?;
        let got = crc32fast::hash(&bytes[base..]);
        if got != want {
            return Err(ck(format!(
                "{what}: the tensor data fails its CRC-32 check (stored {want:08x}, computed \
                 {got:08x}): the file was damaged or changed after it was written"
            )));
        }
    }
    let mut out = BTreeMap::new();
    for e in entries {
        let raw = &bytes[base + e.start..base + e.end];
        let data = decode_le(&e.dtype, raw).ok_or_else(|| {
            ck(format!(
                "{what}: tensor '{}' has unsupported dtype '{}'",
                e.name, e.dtype
            ))
        })?;
        out.insert(
            e.name,
            AnyTensor {
                shape: e.shape,
                data,
                stored_dtype: static_dtype(&e.dtype),
            },
        );
    }
    Ok((out, metadata))
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| ck(format!("cannot read {}: {e}", path.display())))
}

/// Reads every tensor of a safetensors file (F32, F64, I64, F16/BF16 as F32, I32/I16/I8/U32/U16/
/// U8/BOOL as I64). Errors name the file and what is wrong (missing file, truncated or corrupt
/// header, unsupported dtype with its tensor's key).
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, AnyTensor>> {
    let bytes = read_file(path)?;
    Ok(parse_safetensors(&bytes, &path.display().to_string())?.0)
}

/// `read_safetensors` plus the `__metadata__` string map (empty when absent).
pub fn read_safetensors_with_metadata(
    path: &Path,
) -> Result<(BTreeMap<String, AnyTensor>, HashMap<String, String>)> {
    let bytes = read_file(path)?;
    parse_safetensors(&bytes, &path.display().to_string())
}

/// The temporary path used for an atomic write of `path`: `<path>.tmp-<pid>`.
pub fn tmp_path_for(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// Writes a file atomically: `fill` writes into `<path>.tmp-<pid>` (same directory), which is
/// flushed, fsynced and renamed over `path`. On any failure the temporary file is removed.
pub fn write_atomic<F>(path: &Path, fill: F) -> Result<()>
where
    F: FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
{
    if path.file_name().is_none() {
        return Err(AsaError::Input(format!(
            "cannot write {}: not a file path",
            path.display()
        )));
    }
    let tmp = tmp_path_for(path);
    let res = (|| -> std::io::Result<()> {
        let file = File::create(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        fill(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    match res {
        Ok(()) => {
            // Best effort: make the rename itself durable.
            if let Some(dir) = path.parent() {
                let dir = if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                };
                if let Ok(d) = File::open(dir) {
                    let _ = d.sync_all();
                }
            }
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(AsaError::Write {
                path: path.display().to_string(),
                source: e,
            })
        }
    }
}

/// Writes bytes to `path` atomically (see [`write_atomic`]).
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |w| w.write_all(bytes))
}

/// Writes f32 tensors to a safetensors file atomically: the file is written to
/// `<path>.tmp-<pid>` in the same directory, fsynced and renamed over `path`. `metadata` goes into
/// `__metadata__`, with the data's CRC-32 under [`CRC_KEY`]. Tensors are stored in the given
/// order.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    // The data's CRC-32, in the same byte order as written below.
    let mut crc = crc32fast::Hasher::new();
    let mut buf = Vec::with_capacity(1 << 16);
    for (_, _, data) in tensors {
        for chunk in data.chunks(1 << 14) {
            buf.clear();
            for x in chunk {
                buf.extend_from_slice(&x.to_le_bytes());
            }
            crc.update(&buf);
        }
    }
    let mut mm: serde_json::Map<String, serde_json::Value> = metadata
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, serde_json::Value::String(v)))
        .collect();
    mm.insert(
        CRC_KEY.to_string(),
        serde_json::Value::String(format!("{:08x}", crc.finalize())),
    );
    header.insert("__metadata__".to_string(), serde_json::Value::Object(mm));
    let mut seen = HashSet::new();
    let mut offset = 0usize;
    for (name, shape, data) in tensors {
        if name == "__metadata__" {
            return Err(ck(format!(
                "{}: '__metadata__' cannot be a tensor name",
                path.display()
            )));
        }
        if !seen.insert(name.as_str()) {
            return Err(ck(format!(
                "{}: duplicate tensor name '{name}'",
                path.display()
            )));
        }
        let n = checked_numel(shape).unwrap_or(usize::MAX);
        if n != data.len() {
            return Err(ck(format!(
                "{}: tensor '{name}' has shape {shape:?} but {} values",
                path.display(),
                data.len()
            )));
        }
        let end = offset + 4 * n;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut text = serde_json::to_string(&serde_json::Value::Object(header))
        .map_err(|e| ck(format!("{}: cannot encode header: {e}", path.display())))?;
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    write_atomic(path, |w| {
        w.write_all(&(text.len() as u64).to_le_bytes())?;
        w.write_all(text.as_bytes())?;
        let mut buf = Vec::with_capacity(1 << 16);
        for (_, _, data) in tensors {
            for chunk in data.chunks(1 << 14) {
                buf.clear();
                for x in chunk {
                    buf.extend_from_slice(&x.to_le_bytes());
                }
                w.write_all(&buf)?;
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(rel)
    }

    #[test]
    fn write_read_round_trip_and_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
        let s = [3.25f32];
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        write_safetensors(
            &path,
            &[
                ("a.weight".into(), vec![2, 3], &a),
                ("scalar".into(), vec![], &s),
            ],
            Some(meta),
        )
        .unwrap();
        let (t, m) = read_safetensors_with_metadata(&path).unwrap();
        assert_eq!(m.get("format").map(|s| s.as_str()), Some("pt"));
        assert_eq!(t["a.weight"].shape, vec![2, 3]);
        assert_eq!(t["a.weight"].to_f32().unwrap(), a);
        assert_eq!(t["scalar"].shape, Vec::<usize>::new());
        assert_eq!(t["scalar"].to_f32().unwrap(), vec![3.25]);
        // the reference crate accepts the file too
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), 2);
        // no temporary file left behind
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["t.safetensors".to_string()]);
        // overwrite in place
        write_safetensors(&path, &[("b".into(), vec![1], &s)], None).unwrap();
        let t = read_safetensors(&path).unwrap();
        assert!(t.contains_key("b") && !t.contains_key("a.weight"));
    }

    #[test]
    fn write_rejects_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        let a = [1.0f32, 2.0];
        let e = write_safetensors(&path, &[("x".into(), vec![3], &a)], None).unwrap_err();
        assert!(e.to_string().contains("'x'"), "{e}");
        let e = write_safetensors(
            &path,
            &[("x".into(), vec![2], &a), ("x".into(), vec![2], &a)],
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("duplicate"), "{e}");
        assert!(!path.exists());
        // unwritable directory: error, no panic, nothing left
        let e = write_safetensors(&dir.path().join("nope/x.safetensors"), &[], None).unwrap_err();
        assert!(e.to_string().starts_with("cannot write"), "{e}");
        // any file (a report, a bench JSON): not labelled a checkpoint error
        let e = write_bytes_atomic(&dir.path().join("nope/smoke.json"), b"{}").unwrap_err();
        let e = e.to_string();
        assert!(e.contains("smoke.json") && !e.contains("checkpoint"), "{e}");
    }

    #[test]
    fn reads_fixture_dtypes() {
        let p = fixture("legacy_pt/io.safetensors");
        let t = read_safetensors(&p).unwrap();
        let ids = &t["input_ids"];
        assert_eq!(ids.dtype_name(), "I64");
        assert_eq!(ids.stored_dtype, "I64");
        assert!(ids.to_f32().is_none());
        let logits = &t["logits"];
        assert_eq!(logits.dtype_name(), "F64");
        assert_eq!(logits.len(), checked_numel(&logits.shape).unwrap());
    }

    #[test]
    fn half_types_widen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.safetensors");
        let mut bytes = Vec::new();
        let header = r#"{"h":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},"b":{"dtype":"BF16","shape":[1],"data_offsets":[4,6]},"k":{"dtype":"BOOL","shape":[2],"data_offsets":[6,8]}}"#;
        bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&half::f16::from_f32(1.5).to_le_bytes());
        bytes.extend_from_slice(&half::f16::from_f32(-2.0).to_le_bytes());
        bytes.extend_from_slice(&half::bf16::from_f32(0.25).to_le_bytes());
        bytes.extend_from_slice(&[1, 0]);
        std::fs::write(&path, &bytes).unwrap();
        let t = read_safetensors(&path).unwrap();
        assert_eq!(t["h"].to_f32().unwrap(), vec![1.5, -2.0]);
        assert_eq!(t["b"].to_f32().unwrap(), vec![0.25]);
        assert_eq!(t["k"].to_i64().unwrap(), vec![1, 0]);
    }

    #[test]
    fn unsupported_dtype_names_key() {
        let header = r#"{"weird":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&[0; 8]);
        let e = parse_safetensors(&bytes, "x.safetensors")
            .unwrap_err()
            .to_string();
        assert!(e.contains("weird") && e.contains("C64"), "{e}");
    }

    #[test]
    fn truncated_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let full = std::fs::read(fixture("legacy_pt/io.safetensors")).unwrap();
        let path = dir.path().join("trunc.safetensors");
        std::fs::write(&path, &full[..20]).unwrap();
        let e = read_safetensors(&path).unwrap_err().to_string();
        assert!(
            e.contains("trunc.safetensors") && e.contains("truncated"),
            "{e}"
        );
        std::fs::write(&path, &full[..4]).unwrap();
        let e = read_safetensors(&path).unwrap_err().to_string();
        assert!(e.contains("too short"), "{e}");
        std::fs::write(&path, &full[..full.len() - 3]).unwrap();
        let e = read_safetensors(&path).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        let missing = dir.path().join("missing.safetensors");
        let e = read_safetensors(&missing).unwrap_err().to_string();
        assert!(e.contains("missing.safetensors"), "{e}");
        // every prefix and some corruptions: errors, never panics
        for cut in (0..full.len()).step_by(97) {
            let _ = parse_safetensors(&full[..cut], "cut");
        }
        for i in (0..full.len().min(4000)).step_by(13) {
            let mut b = full.clone();
            b[i] ^= 0x5a;
            let _ = parse_safetensors(&b, "flip");
        }
    }
    #[test]
    fn integer_dtypes_keep_their_stored_name() {
        let header = r#"{"i":{"dtype":"I32","shape":[2],"data_offsets":[0,8]},"u":{"dtype":"U8","shape":[1],"data_offsets":[8,9]},"h":{"dtype":"BF16","shape":[1],"data_offsets":[9,11]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&7i32.to_le_bytes());
        bytes.extend_from_slice(&(-1i32).to_le_bytes());
        bytes.push(200);
        bytes.extend_from_slice(&half::bf16::from_f32(0.5).to_le_bytes());
        let (t, _) = parse_safetensors(&bytes, "x").unwrap();
        assert_eq!(t["i"].dtype_name(), "I32");
        assert_eq!(t["i"].to_i64().unwrap(), vec![7, -1]);
        assert_eq!(t["u"].dtype_name(), "U8");
        assert_eq!(t["h"].dtype_name(), "BF16");
        assert_eq!(t["h"].to_f32().unwrap(), vec![0.5]);
    }
    #[test]
    fn damaged_data_fails_the_crc_check() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        let a: Vec<f32> = (0..64).map(|i| i as f32 * 0.25).collect();
        write_safetensors(&path, &[("w".into(), vec![8, 8], &a)], None).unwrap();
        let good = std::fs::read(&path).unwrap();
        let (t, m) = parse_safetensors(&good, "c").unwrap();
        assert_eq!(t["w"].to_f32().unwrap(), a);
        assert_eq!(m[CRC_KEY].len(), 8);
        // one flipped bit in a weight: still a finite number, but not the model that was saved
        let mut bad = good.clone();
        let at = bad.len() - 10;
        bad[at] ^= 0x01;
        let e = parse_safetensors(&bad, "c.safetensors")
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.safetensors") && e.contains("CRC-32"), "{e}");
        // files without the key (other writers, older files) load as before
        let p = fixture("legacy_pt/io.safetensors");
        assert!(!read_safetensors_with_metadata(&p)
            .unwrap()
            .1
            .contains_key(CRC_KEY));
    }
}
