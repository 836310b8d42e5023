//! Reading artifacts back: verification, decompression to a dense model,
//! and inspection.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use hcx_kernels::{Part, PartDtype, decode_tensor, row_pieces};
use hcx_protocol::manifest::{FORMAT, MANIFEST_FILE};
use hcx_protocol::{Manifest, TensorEntry};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::SafeTensors;
use serde::Serialize;

use crate::PipelineError;
use crate::attribution::{Subset, is_compressed, subset, tensor_bytes};
use crate::model::{f32_to_bytes, parse_dtype};
use crate::run::{WAVE_ELEMENTS, waves};
use crate::writer::sha256_file;

/// The attribution charts every artifact carries beside `attribution.json`
/// and `attribution.md` (see [`crate::charts`]); a report, not counted in the
/// artifact's bytes.
pub const CHARTS_FILE: &str = "attribution.svg";

/// Reads and checks an artifact's manifest.
pub fn read_manifest(artifact: &Path) -> Result<Manifest, PipelineError> {
    let path = artifact.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        PipelineError::io(
            &path,
            "cannot read the manifest (is this an hcx artifact?)",
            e,
        )
    })?;
    let m: Manifest = serde_json::from_str(&text).map_err(|e| PipelineError::Artifact {
        path: path.clone(),
        why: format!("malformed manifest: {e}"),
    })?;
    if m.format != FORMAT {
        return Err(PipelineError::Artifact {
            path,
            why: format!("format `{}` is not `{FORMAT}`", m.format),
        });
    }
    Ok(m)
}

/// Checks every tensor file's and every copied file's size and SHA-256
/// against the manifest.
pub fn verify(artifact: &Path, m: &Manifest) -> Result<(), PipelineError> {
    for f in m.files.iter().chain(&m.source.copied) {
        if f.name.contains('/') || f.name.contains("..") {
            return Err(PipelineError::Artifact {
                path: artifact.to_path_buf(),
                why: format!("file name `{}` leaves the folder", f.name),
            });
        }
        let p = artifact.join(&f.name);
        let len = std::fs::metadata(&p)
            .map_err(|e| PipelineError::io(&p, "cannot open", e))?
            .len();
        if len != f.bytes {
            return Err(PipelineError::Artifact {
                path: p,
                why: format!("{len} bytes on disk, the manifest says {}", f.bytes),
            });
        }
        let h = sha256_file(&p)?;
        if h != f.sha256 {
            return Err(PipelineError::Artifact {
                path: p,
                why: "SHA-256 does not match the manifest: the file is corrupt".into(),
            });
        }
    }
    Ok(())
}

/// The artifact's tensor files, mapped, with their headers parsed once.
struct TensorFiles {
    maps: BTreeMap<String, (Mmap, usize, safetensors::tensor::Metadata)>,
}

impl TensorFiles {
    fn open(artifact: &Path, m: &Manifest) -> Result<TensorFiles, PipelineError> {
        let mut maps = BTreeMap::new();
        for f in &m.files {
            let p = artifact.join(&f.name);
            let file = File::open(&p).map_err(|e| PipelineError::io(&p, "cannot open", e))?;
            // SAFETY: read-only map of a file we just verified; see Model::open.
            let map =
                unsafe { Mmap::map(&file) }.map_err(|e| PipelineError::io(&p, "cannot map", e))?;
            let (n, meta) =
                SafeTensors::read_metadata(&map).map_err(|e| PipelineError::Artifact {
                    path: p.clone(),
                    why: format!("not a valid safetensors file: {e:?}"),
                })?;
            maps.insert(f.name.clone(), (map, 8 + n, meta));
        }
        Ok(TensorFiles { maps })
    }

    /// Drops every mapped page from this process's resident memory (see
    /// [`crate::model::Model::release`]): decompression calls it behind
    /// each wave.
    fn release_all(&self) {
        for (map, _, _) in self.maps.values() {
            crate::model::release_range(map, 0, map.len());
        }
    }

    fn parts(&self, artifact: &Path, t: &TensorEntry) -> Result<Vec<Part>, PipelineError> {
        let (map, start, meta) = self
            .maps
            .get(&t.file)
            .ok_or_else(|| PipelineError::Artifact {
                path: artifact.to_path_buf(),
                why: format!(
                    "tensor `{}` names file `{}`, which the manifest does not list",
                    t.name, t.file
                ),
            })?;
        let prefix = format!("{}.", t.name);
        let mut out = Vec::with_capacity(t.parts.len());
        for p in &t.parts {
            // read_metadata checked every range lies inside the file.
            let info = meta.info(&p.name).ok_or_else(|| PipelineError::Artifact {
                path: artifact.join(&t.file),
                why: format!("part `{}` of tensor `{}` is missing", p.name, t.name),
            })?;
            let (a, b) = info.data_offsets;
            let local = p.name.strip_prefix(&prefix).unwrap_or(&p.name).to_string();
            let dtype = PartDtype::parse(&format!("{:?}", info.dtype)).unwrap_or(PartDtype::U8);
            out.push(Part {
                name: local,
                dtype,
                shape: info.shape.clone(),
                data: map[start + a..start + b].to_vec(),
            });
        }
        Ok(out)
    }
}

/// Checks that a tensor's declared shape, dtype and source size agree, so
/// that nothing larger than the declared source is ever allocated for it.
fn check_entry_size(artifact: &Path, t: &TensorEntry) -> Result<(), PipelineError> {
    let bad = |why: String| PipelineError::Artifact {
        path: artifact.join(MANIFEST_FILE),
        why: format!("tensor `{}`: {why}", t.name),
    };
    let dtype = parse_dtype(&t.dtype).ok_or_else(|| bad(format!("unknown dtype {}", t.dtype)))?;
    let bytes = t
        .shape
        .iter()
        .try_fold(dtype.bitsize() as u64, |a, d| a.checked_mul(*d as u64))
        .ok_or_else(|| bad(format!("shape {:?} overflows", t.shape)))?
        .div_ceil(8);
    if bytes != t.source_bytes {
        return Err(bad(format!(
            "shape {:?} of {} is {bytes} bytes, the manifest says {}",
            t.shape, t.dtype, t.source_bytes
        )));
    }
    Ok(())
}

/// Checks every tensor's declared size, and that together they fit in the
/// source the manifest describes.
fn check_sizes(artifact: &Path, m: &Manifest) -> Result<(), PipelineError> {
    let mut total = 0u64;
    for t in &m.tensors {
        check_entry_size(artifact, t)?;
        total = total.saturating_add(t.stored());
    }
    if total > m.source.bytes {
        return Err(PipelineError::Artifact {
            path: artifact.join(MANIFEST_FILE),
            why: format!(
                "the tensors declare {total} bytes, more than the {} bytes of source files",
                m.source.bytes
            ),
        });
    }
    Ok(())
}

/// Decodes one tensor to its source dtype's bytes; the caller has run
/// [`check_sizes`] on the manifest.
fn decode_entry(
    artifact: &Path,
    files: &TensorFiles,
    t: &TensorEntry,
) -> Result<Vec<u8>, PipelineError> {
    let parts = files.parts(artifact, t)?;
    if t.steps.is_empty() {
        let p = parts
            .into_iter()
            .next()
            .ok_or_else(|| PipelineError::Artifact {
                path: artifact.to_path_buf(),
                why: format!("tensor `{}` has no data", t.name),
            })?;
        if p.data.len() as u64 != t.source_bytes {
            return Err(PipelineError::Artifact {
                path: artifact.to_path_buf(),
                why: format!(
                    "tensor `{}`: {} bytes stored, {} expected",
                    t.name,
                    p.data.len(),
                    t.source_bytes
                ),
            });
        }
        return Ok(p.data);
    }
    let values =
        decode_tensor(&t.steps, parts, &t.shape).map_err(|source| PipelineError::Tensor {
            tensor: t.name.clone(),
            source,
        })?;
    let dtype = parse_dtype(&t.dtype).ok_or_else(|| PipelineError::Artifact {
        path: artifact.to_path_buf(),
        why: format!("tensor `{}`: unknown dtype {}", t.name, t.dtype),
    })?;
    Ok(f32_to_bytes(&values, dtype))
}

/// The manifest entry of tensor `name`.
fn entry_of<'a>(
    artifact: &Path,
    m: &'a Manifest,
    name: &str,
) -> Result<&'a TensorEntry, PipelineError> {
    m.tensors
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| PipelineError::Artifact {
            path: artifact.to_path_buf(),
            why: format!("no tensor `{name}`"),
        })
}

/// Decodes one tensor of an artifact to its source dtype's bytes (any
/// dtype: a tensor kept as stored comes back as it was).
pub fn decode_bytes(artifact: &Path, m: &Manifest, name: &str) -> Result<Vec<u8>, PipelineError> {
    let t = entry_of(artifact, m, name)?;
    check_entry_size(artifact, t)?;
    let files = TensorFiles::open(artifact, m)?;
    decode_entry(artifact, &files, t)
}

/// Decodes one tensor of an artifact to f32 values (float tensors only).
pub fn decode_values(artifact: &Path, m: &Manifest, name: &str) -> Result<Vec<f32>, PipelineError> {
    let t = entry_of(artifact, m, name)?;
    check_entry_size(artifact, t)?;
    let files = TensorFiles::open(artifact, m)?;
    if t.steps.is_empty() {
        // Kept as stored: the source dtype's bytes.
        let dtype = parse_dtype(&t.dtype).ok_or_else(|| PipelineError::Artifact {
            path: artifact.to_path_buf(),
            why: format!("tensor `{}`: unknown dtype {}", t.name, t.dtype),
        })?;
        let raw = decode_entry(artifact, &files, t)?;
        let values = crate::model::raw_to_f32(&raw, dtype);
        if values.len() != t.shape.iter().product::<usize>() {
            return Err(PipelineError::Artifact {
                path: artifact.to_path_buf(),
                why: format!("tensor `{}` is {}, not a float tensor", t.name, t.dtype),
            });
        }
        return Ok(values);
    }
    let parts = files.parts(artifact, t)?;
    decode_tensor(&t.steps, parts, &t.shape).map_err(|source| PipelineError::Tensor {
        tensor: t.name.clone(),
        source,
    })
}

/// Decodes tensor `t` a piece of rows at a time into the dense writer (its
/// chain must code rows independently: `row_pieces::decodes_by_rows`).
fn decode_entry_by_rows(
    artifact: &Path,
    files: &TensorFiles,
    t: &TensorEntry,
    w: &mut crate::dense::DenseWriter,
) -> Result<(), PipelineError> {
    let dtype = parse_dtype(&t.dtype).ok_or_else(|| PipelineError::Artifact {
        path: artifact.to_path_buf(),
        why: format!("tensor `{}`: unknown dtype {}", t.name, t.dtype),
    })?;
    let parts = files.parts(artifact, t)?;
    let cols = t.shape.last().copied().unwrap_or(1).max(1);
    let per = row_pieces::piece_rows(cols, WAVE_ELEMENTS);
    let numel: usize = t.shape.iter().product();
    let len = (numel * (dtype.bitsize() / 8)) as u64;
    let tensor_err = |source| PipelineError::Tensor {
        tensor: t.name.clone(),
        source,
    };
    w.add_with(&t.name, &t.dtype, &t.shape, len, |write| {
        // A write error stops the decoding and is the one reported.
        let mut failed: Option<PipelineError> = None;
        let decoded = row_pieces::decode_by_rows(&t.steps, parts, &t.shape, per, |_, values| {
            write(&f32_to_bytes(&values, dtype)).map_err(|e| {
                failed = Some(e);
                hcx_kernels::KernelError::Values("the dense file could not be written".into())
            })
        });
        match failed {
            Some(e) => Err(e),
            None => decoded.map_err(tensor_err),
        }
    })
}

/// Writes a dense safetensors model (`model.safetensors`, the source's
/// names, shapes and dtypes) plus the copied config and tokenizer files.
pub fn decompress(artifact: &Path, output: &Path) -> Result<PathBuf, PipelineError> {
    decompress_sharded(artifact, output, crate::dense::DEFAULT_MAX_SHARD_BYTES)
}

/// [`decompress`], splitting the model into safetensors shards of at most
/// `max_shard_bytes` each (with `model.safetensors.index.json`) when it is larger.
pub fn decompress_sharded(
    artifact: &Path,
    output: &Path,
    max_shard_bytes: u64,
) -> Result<PathBuf, PipelineError> {
    let m = read_manifest(artifact)?;
    verify(artifact, &m)?;
    check_sizes(artifact, &m)?;
    let files = TensorFiles::open(artifact, &m)?;
    let parent = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(PipelineError::Output {
            path: output.to_path_buf(),
            why: format!("parent folder {} does not exist", parent.display()),
        });
    }
    if output.exists()
        && std::fs::read_dir(output)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(PipelineError::Output {
            path: output.to_path_buf(),
            why: "exists and is not empty".into(),
        });
    }
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| PipelineError::io(&tmp, "cannot create", e))?;
    let result = (|| {
        let planned: Vec<(String, u64)> = m
            .tensors
            .iter()
            .map(|t| {
                let elem = crate::model::parse_dtype(&t.dtype).map_or(4, |d| d.bitsize() / 8);
                (
                    t.name.clone(),
                    (t.shape.iter().product::<usize>() * elem) as u64,
                )
            })
            .collect();
        let mut w = crate::dense::DenseWriter::new(&tmp, &planned, max_shard_bytes);
        let sizes: Vec<usize> = m.tensors.iter().map(|t| t.shape.iter().product()).collect();
        for range in waves(&sizes) {
            let (i, j) = (range.start, range.end);
            let t = &m.tensors[i];
            if j == i + 1 && sizes[i] > WAVE_ELEMENTS && row_pieces::decodes_by_rows(&t.steps) {
                // A tensor larger than a wave that decodes by rows goes to
                // the file a piece at a time.
                decode_entry_by_rows(artifact, &files, t, &mut w)?;
                files.release_all();
                continue;
            }
            let wave: Vec<Result<Vec<u8>, PipelineError>> = m.tensors[i..j]
                .par_iter()
                .map(|t| decode_entry(artifact, &files, t))
                .collect();
            files.release_all();
            for (t, bytes) in m.tensors[i..j].iter().zip(wave) {
                w.add(&t.name, &t.dtype, &t.shape, &bytes?)?;
            }
        }
        w.finish()?;
        // `verify` checked every name stays in the folder and every hash.
        for c in &m.source.copied {
            let from = artifact.join(&c.name);
            std::fs::copy(&from, tmp.join(&c.name))
                .map_err(|e| PipelineError::io(&from, "cannot copy", e))?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if output.exists() {
        std::fs::remove_dir(output)
            .map_err(|e| PipelineError::io(output, "cannot replace the empty folder", e))?;
    }
    std::fs::rename(&tmp, output)
        .map_err(|e| PipelineError::io(output, "cannot move into place", e))?;
    Ok(output.to_path_buf())
}

/// One tensor in an inspection.
#[derive(Debug, Clone, Serialize)]
pub struct TensorRow {
    /// Name.
    pub name: String,
    /// Parameters.
    pub params: u64,
    /// Stored bytes (parts and header entries).
    pub bytes: u64,
    /// 8 × bytes / params.
    pub bits_per_weight: f64,
    /// SQNR against the source, dB (`null` when exact).
    pub sqnr_db: Option<f64>,
    /// The stage chain, e.g. `hadamard→uniform→zstd` (`keep` when copied).
    pub chain: String,
}

/// What `hcx-cluster inspect` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// Job name.
    pub job: String,
    /// Source safetensors bytes on disk.
    pub source_bytes: u64,
    /// Tensor files plus manifest, bytes on disk.
    pub artifact_bytes: u64,
    /// source_bytes / artifact_bytes.
    pub ratio: f64,
    /// The compressed tensors (quantizer other than a cast).
    pub compressed: Subset,
    /// Tensors selected by the caller's glob (all compressed ones by default).
    pub selected: Subset,
    /// Every tensor.
    pub tensors: Vec<TensorRow>,
}

/// Summarises an artifact; `select` picks the tensors of `selected`.
pub fn inspect(
    artifact: &Path,
    select: Option<&dyn Fn(&str) -> bool>,
) -> Result<Inspection, PipelineError> {
    let m = read_manifest(artifact)?;
    let mut artifact_bytes = 0u64;
    for name in m
        .files
        .iter()
        .map(|f| f.name.as_str())
        .chain([MANIFEST_FILE])
    {
        let p = artifact.join(name);
        artifact_bytes += std::fs::metadata(&p)
            .map_err(|e| PipelineError::io(&p, "cannot open", e))?
            .len();
    }
    let tensors = m
        .tensors
        .iter()
        .map(|t| {
            let params = t.shape.iter().product::<usize>() as u64;
            let bytes = tensor_bytes(t);
            let chain = if t.steps.is_empty() {
                "keep".to_string()
            } else {
                t.steps
                    .iter()
                    .map(|s| s.spec.kind())
                    .collect::<Vec<_>>()
                    .join("→")
            };
            TensorRow {
                name: t.name.clone(),
                params,
                bytes,
                bits_per_weight: if params > 0 {
                    8.0 * bytes as f64 / params as f64
                } else {
                    0.0
                },
                sqnr_db: t.sqnr_db,
                chain,
            }
        })
        .collect();
    let selected = match select {
        Some(f) => subset(m.tensors.iter().filter(|t| f(&t.name))),
        None => subset(m.tensors.iter().filter(|t| is_compressed(t))),
    };
    Ok(Inspection {
        job: m.job.name.clone(),
        source_bytes: m.source.bytes,
        artifact_bytes,
        ratio: m.source.bytes as f64 / artifact_bytes.max(1) as f64,
        compressed: subset(m.tensors.iter().filter(|t| is_compressed(t))),
        selected,
        tensors,
    })
}
