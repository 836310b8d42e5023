//! Reading a source model: one `.safetensors` file, or a Hugging Face folder
//! (`model.safetensors`, or shards listed by `model.safetensors.index.json`,
//! or every `*.safetensors` in it). Files are memory-mapped and tensors read
//! one at a time, so memory tracks the largest tensor, not the model.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::PipelineError;

/// One tensor of the source.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Name.
    pub name: String,
    /// Dtype as safetensors spells it.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Which file (index into [`Model::files`]).
    pub file: usize,
    /// Byte range in that file's data section (for a GGUF source, in the
    /// dequantized f32 data).
    pub range: (usize, usize),
    /// Bytes the tensor takes in the source file as stored (for a GGUF
    /// source, its quantized blocks; otherwise the range's length).
    pub stored_bytes: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of data.
    pub fn bytes(&self) -> usize {
        self.range.1 - self.range.0
    }

    /// True for F32, F16 and BF16, the dtypes the codecs take.
    pub fn is_float(&self) -> bool {
        matches!(self.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16)
    }

    /// True for integer and boolean tensors (always copied as they are).
    pub fn is_integer(&self) -> bool {
        is_integer_dtype(self.dtype)
    }
}

/// True for integer and boolean dtypes (tensors always copied as they are).
pub fn is_integer_dtype(d: Dtype) -> bool {
    matches!(
        d,
        Dtype::BOOL
            | Dtype::U8
            | Dtype::I8
            | Dtype::I16
            | Dtype::U16
            | Dtype::I32
            | Dtype::U32
            | Dtype::I64
            | Dtype::U64
    )
}

/// An opened source model.
pub struct Model {
    /// The folder (or the file's folder).
    pub dir: PathBuf,
    /// The safetensors files, names relative to `dir`.
    pub files: Vec<String>,
    maps: Vec<Mmap>,
    headers: Vec<usize>,
    /// For a GGUF source: every tensor dequantized to f32, back to back.
    decoded: Option<Vec<u8>>,
    /// Files made from the source rather than copied from its folder
    /// (`config.json` and `tokenizer.json` of a GGUF source): name, bytes.
    pub generated: Vec<(String, Vec<u8>)>,
    /// Every tensor, sorted by name.
    pub tensors: Vec<TensorInfo>,
}

fn dtype_name(d: Dtype) -> String {
    format!("{d:?}")
}

impl Model {
    /// Opens a model folder or file and reads every header.
    pub fn open(path: &Path) -> Result<Model, PipelineError> {
        let meta = std::fs::metadata(path)
            .map_err(|e| PipelineError::io(path, "cannot open the model", e))?;
        if meta.is_file() && path.extension().is_some_and(|e| e == "gguf") {
            return Model::open_gguf(path);
        }
        let (dir, files): (PathBuf, Vec<String>) = if meta.is_file() {
            let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            (dir, vec![name])
        } else {
            let index = path.join("model.safetensors.index.json");
            let files = if index.is_file() {
                let text = std::fs::read_to_string(&index)
                    .map_err(|e| PipelineError::io(&index, "cannot read", e))?;
                let v: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| PipelineError::Model {
                        path: index.clone(),
                        why: format!("not a valid index: {e}"),
                    })?;
                let map = v
                    .get("weight_map")
                    .and_then(|m| m.as_object())
                    .ok_or_else(|| PipelineError::Model {
                        path: index.clone(),
                        why: "no `weight_map` object".into(),
                    })?;
                let mut f: Vec<String> = map
                    .values()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect();
                f.sort();
                f.dedup();
                for name in &f {
                    if name.contains("..") || name.contains('/') {
                        return Err(PipelineError::Model {
                            path: index.clone(),
                            why: format!("shard name `{name}` leaves the folder"),
                        });
                    }
                }
                f
            } else {
                let mut f: Vec<String> = std::fs::read_dir(path)
                    .map_err(|e| PipelineError::io(path, "cannot list", e))?
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .filter(|n| n.ends_with(".safetensors"))
                    .collect();
                f.sort();
                f
            };
            if files.is_empty() {
                return Err(PipelineError::Model {
                    path: path.to_path_buf(),
                    why: "no *.safetensors file in this folder".into(),
                });
            }
            (path.to_path_buf(), files)
        };
        let mut maps = Vec::new();
        let mut headers = Vec::new();
        let mut by_name: BTreeMap<String, TensorInfo> = BTreeMap::new();
        for (fi, name) in files.iter().enumerate() {
            let p = dir.join(name);
            let f = File::open(&p).map_err(|e| PipelineError::io(&p, "cannot open", e))?;
            // SAFETY: the map is read-only; a source changed while we run is the
            // operator's error and shows up as a hash or decode mismatch, not UB
            // in our code paths, which only copy bytes out of it.
            let map =
                unsafe { Mmap::map(&f) }.map_err(|e| PipelineError::io(&p, "cannot map", e))?;
            let (n, metadata) =
                SafeTensors::read_metadata(&map).map_err(|e| PipelineError::Model {
                    path: p.clone(),
                    why: format!("not a valid safetensors file: {e:?}"),
                })?;
            for (tname, info) in metadata.tensors() {
                if by_name.contains_key(&tname) {
                    return Err(PipelineError::Model {
                        path: p.clone(),
                        why: format!("tensor `{tname}` appears in two files"),
                    });
                }
                by_name.insert(
                    tname.clone(),
                    TensorInfo {
                        name: tname,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        file: fi,
                        range: info.data_offsets,
                        stored_bytes: (info.data_offsets.1 - info.data_offsets.0) as u64,
                    },
                );
            }
            headers.push(8 + n);
            maps.push(map);
        }
        let tensors: Vec<TensorInfo> = by_name.into_values().collect();
        for t in &tensors {
            if !t.is_float() && !t.is_integer() {
                return Err(PipelineError::Model {
                    path: dir.join(&files[t.file]),
                    why: format!(
                        "tensor `{}`: dtype {} is not supported (F32, F16, BF16; integer tensors are copied)",
                        t.name,
                        dtype_name(t.dtype)
                    ),
                });
            }
        }
        Ok(Model {
            dir,
            files,
            maps,
            headers,
            decoded: None,
            generated: Vec::new(),
            tensors,
        })
    }

    /// Opens a GGUF file: every tensor dequantized to f32 under its HF name
    /// (see [`crate::gguf`]); `config.json` and `tokenizer.json` generated.
    fn open_gguf(path: &Path) -> Result<Model, PipelineError> {
        let g = crate::gguf::read(path)?;
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let f = File::open(path).map_err(|e| PipelineError::io(path, "cannot open", e))?;
        // SAFETY: read-only map, used for the file's size and hash only.
        let map = unsafe { Mmap::map(&f) }.map_err(|e| PipelineError::io(path, "cannot map", e))?;
        let total: usize = g.tensors.iter().map(|t| t.values.len() * 4).sum();
        let mut decoded = Vec::with_capacity(total);
        let mut tensors = Vec::with_capacity(g.tensors.len());
        for t in g.tensors {
            let start = decoded.len();
            for v in &t.values {
                decoded.extend_from_slice(&v.to_le_bytes());
            }
            tensors.push(TensorInfo {
                name: t.name,
                dtype: Dtype::F32,
                shape: t.shape,
                file: 0,
                range: (start, decoded.len()),
                stored_bytes: t.stored_bytes,
            });
        }
        let mut generated = vec![("config.json".to_string(), g.config_json.into_bytes())];
        if let Some(tok) = g.tokenizer_json {
            generated.push(("tokenizer.json".to_string(), tok.into_bytes()));
        }
        Ok(Model {
            dir,
            files: vec![name],
            maps: vec![map],
            headers: vec![0],
            decoded: Some(decoded),
            generated,
            tensors,
        })
    }

    /// True when the source is a GGUF file (tensors dequantized to f32).
    pub fn is_gguf(&self) -> bool {
        self.decoded.is_some()
    }

    /// A tensor's bytes: as stored for safetensors, f32 values for GGUF.
    pub fn raw(&self, t: &TensorInfo) -> &[u8] {
        if let Some(d) = &self.decoded {
            return &d[t.range.0..t.range.1];
        }
        let start = self.headers[t.file];
        &self.maps[t.file][start + t.range.0..start + t.range.1]
    }

    /// A float tensor's values as f32.
    pub fn read_f32(&self, t: &TensorInfo) -> Vec<f32> {
        raw_to_f32(self.raw(t), t.dtype)
    }

    /// Drops the mapped pages of `t`'s bytes from this process's resident
    /// memory (the kernel keeps them in its page cache; a later read maps
    /// them again). A run calls it behind each wave, and the data plane
    /// after serving a tensor, so a model larger than memory is never
    /// resident as a whole. No effect on a GGUF source (held decoded).
    pub fn release(&self, t: &TensorInfo) {
        if self.decoded.is_some() {
            return;
        }
        release_range(
            &self.maps[t.file],
            self.headers[t.file] + t.range.0,
            t.range.1 - t.range.0,
        );
    }

    /// [`Model::release`] for `bytes`, a span of `t`'s [`Model::raw`].
    pub fn release_bytes(&self, t: &TensorInfo, bytes: &[u8]) {
        if self.decoded.is_none() {
            release_slice(&self.maps[t.file], bytes);
        }
    }

    /// [`Model::release`] for every mapped file as a whole.
    pub fn release_all(&self) {
        for m in &self.maps {
            release_range(m, 0, m.len());
        }
    }

    /// Size on disk of every safetensors file.
    pub fn file_sizes(&self) -> Vec<u64> {
        self.maps.iter().map(|m| m.len() as u64).collect()
    }
}

/// Drops `len` bytes of a read-only file map from `offset` out of this
/// process's resident memory (memmap2 widens the range to whole pages).
/// Advice only: an error leaves the pages resident and changes nothing else.
pub(crate) fn release_range(map: &Mmap, offset: usize, len: usize) {
    if len == 0 || offset >= map.len() {
        return;
    }
    let len = len.min(map.len() - offset);
    #[cfg(unix)]
    // SAFETY: the map is a read-only, shared file mapping: dropping its pages
    // loses nothing, a later access reads them from the file again.
    unsafe {
        let _ = map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len);
    }
}

/// [`release_range`] for `data`, a slice of `map`.
pub(crate) fn release_slice(map: &Mmap, data: &[u8]) {
    let offset = (data.as_ptr() as usize).wrapping_sub(map.as_ptr() as usize);
    if offset < map.len() {
        release_range(map, offset, data.len());
    }
}

/// A float tensor's stored bytes as f32 values (empty for other dtypes).
pub fn raw_to_f32(raw: &[u8], dtype: Dtype) -> Vec<f32> {
    match dtype {
        Dtype::F32 => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => raw
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => raw
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => Vec::new(),
    }
}

/// Converts f32 values to a float dtype's bytes.
pub fn f32_to_bytes(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Parses a dtype name as safetensors writes it.
pub fn parse_dtype(s: &str) -> Option<Dtype> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
}

/// The name safetensors uses for a dtype.
pub fn dtype_str(d: Dtype) -> String {
    dtype_name(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::TensorFileWriter;

    /// Resident kilobytes of the mappings of `file` in this process, from
    /// /proc/self/smaps (`None` where there is no such file).
    fn resident_kb(file: &Path) -> Option<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let want = file.canonicalize().ok()?.display().to_string();
        let mut total = 0u64;
        let mut ours = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
                ours = line.ends_with(&want);
            } else if ours && let Some(rest) = line.strip_prefix("Rss:") {
                total += rest
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()?;
            }
        }
        Some(total)
    }

    #[test]
    fn released_tensors_leave_resident_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let mut w = TensorFileWriter::create(&path).unwrap();
        // Four tensors of 8 MiB each.
        for i in 0..4 {
            let v: Vec<u8> = (0..8usize << 20).map(|k| (k * 31 + i) as u8).collect();
            w.add(&format!("t{i}"), "U8", &[8 << 20], &v).unwrap();
        }
        w.finish(&BTreeMap::new()).unwrap();
        let model = Model::open(&path).unwrap();
        let Some(before) = resident_kb(&path) else {
            eprintln!("skipped: no /proc/self/smaps on this system");
            return;
        };
        let sum: u64 = model
            .tensors
            .iter()
            .map(|t| {
                model
                    .raw(t)
                    .iter()
                    .step_by(4096)
                    .map(|b| u64::from(*b))
                    .sum::<u64>()
            })
            .sum();
        assert!(sum > 0);
        let touched = resident_kb(&path).unwrap();
        assert!(
            touched >= before + 30 * 1024,
            "reading 32 MiB made {touched} kB resident (from {before})"
        );
        model.release(&model.tensors[0]);
        let one = resident_kb(&path).unwrap();
        assert!(
            one + 7 * 1024 <= touched && one >= touched.saturating_sub(9 * 1024),
            "releasing one 8 MiB tensor took {touched} kB to {one} kB"
        );
        model.release_all();
        let none = resident_kb(&path).unwrap();
        assert!(
            none <= 64,
            "{none} kB still resident after releasing everything"
        );
        // A released tensor reads back the same.
        assert_eq!(model.raw(&model.tensors[2])[12345], (12345 * 31 + 2) as u8);
    }
}
