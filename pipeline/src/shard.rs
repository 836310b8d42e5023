//! Shards: a subset of a job's tensors compressed on one node and shipped
//! to the leader as one file, and the merge of a job's shard files into
//! the same artifact a local run writes.
//!
//! A shard file is a safetensors file holding each part under its artifact
//! name; its `__metadata__` holds the format tag and, as JSON, each
//! tensor's manifest entry and step timings. Because every tensor's chain
//! is seeded by the job seed and its own name, which node encoded it and
//! with which others does not change a byte: merging any partition of the
//! model gives the local run's tensor file.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use hcx_protocol::{JobSpec, TensorEntry};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::PipelineError;
use crate::attribution::ReportSection;
use crate::model::dtype_str;
use crate::run::{
    EncodedEntry, RunOutcome, TENSOR_FILE, encode_raw, finish_artifact, waves, write_artifact,
    write_entry,
};
use crate::writer::TensorFileWriter;

/// Format tag in a shard file's metadata.
pub const SHARD_FORMAT: &str = "hcx-shard/1";

/// A source tensor as a node receives it.
#[derive(Debug, Clone)]
pub struct SourceTensor {
    /// Name in the model.
    pub name: String,
    /// Stored dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Stored bytes.
    pub raw: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
struct IndexEntry {
    entry: TensorEntry,
    seconds: Vec<f64>,
}

/// What encoding a shard produced.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardSummary {
    /// Size of the shard file.
    pub bytes: u64,
    /// Its SHA-256, lowercase hex.
    pub sha256: String,
    /// Seconds spent in the stage chains, summed over tensors.
    pub kernel_seconds: f64,
    /// Number of tensors in it.
    pub tensors: usize,
}

/// Writes encoded tensors into a shard file, one entry at a time.
pub(crate) struct ShardWriter {
    path: PathBuf,
    writer: TensorFileWriter,
    index: Vec<IndexEntry>,
    kernel_seconds: f64,
}

impl ShardWriter {
    /// Starts a shard file at `path`.
    pub(crate) fn create(path: &Path) -> Result<ShardWriter, PipelineError> {
        Ok(ShardWriter {
            path: path.to_path_buf(),
            writer: TensorFileWriter::create(path)?,
            index: Vec::new(),
            kernel_seconds: 0.0,
        })
    }

    /// Adds one encoded tensor.
    pub(crate) fn add(&mut self, enc: EncodedEntry) -> Result<(), PipelineError> {
        write_entry(&mut self.writer, &enc)?;
        self.kernel_seconds += enc.seconds.iter().sum::<f64>();
        self.index.push(IndexEntry {
            entry: enc.entry,
            seconds: enc.seconds,
        });
        Ok(())
    }

    /// Writes the entry index and `sections` (report sections the merge
    /// adds to the artifact's report) into the metadata and closes the file.
    pub(crate) fn finish(self, sections: &[ReportSection]) -> Result<ShardSummary, PipelineError> {
        let json = |v: Result<String, serde_json::Error>| {
            v.map_err(|e| PipelineError::Output {
                path: self.path.clone(),
                why: e.to_string(),
            })
        };
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), SHARD_FORMAT.to_string());
        meta.insert(
            "entries".to_string(),
            json(serde_json::to_string(&self.index))?,
        );
        if !sections.is_empty() {
            meta.insert(
                "sections".to_string(),
                json(serde_json::to_string(sections))?,
            );
        }
        let written = self.writer.finish(&meta)?;
        Ok(ShardSummary {
            bytes: written.bytes,
            sha256: written.sha256,
            kernel_seconds: self.kernel_seconds,
            tensors: self.index.len(),
        })
    }
}

/// Encodes `tensors` with `spec`'s stages into a shard file at `path`.
pub fn encode_shard(
    spec: &JobSpec,
    tensors: &[SourceTensor],
    path: &Path,
) -> Result<ShardSummary, PipelineError> {
    encode_shard_reporting(spec, tensors, path, &|_| {})
}

/// [`encode_shard`], calling `written(source_bytes)` as each tensor is
/// written, for a progress report.
pub fn encode_shard_reporting(
    spec: &JobSpec,
    tensors: &[SourceTensor],
    path: &Path,
    written: &(dyn Fn(u64) + Sync),
) -> Result<ShardSummary, PipelineError> {
    let mut order: Vec<&SourceTensor> = tensors.iter().collect();
    order.sort_by(|a, b| a.name.cmp(&b.name));
    let mut writer = ShardWriter::create(path)?;
    let sizes: Vec<usize> = order.iter().map(|t| t.shape.iter().product()).collect();
    // Each tensor's span sits under the caller's (a node's shard span), on
    // whichever worker thread encodes it.
    let parent = tracing::Span::current();
    for range in waves(&sizes) {
        let wave: Vec<Result<EncodedEntry, PipelineError>> = order[range]
            .par_iter()
            .map(|t| {
                let _span =
                    tracing::info_span!(parent: &parent, "tensor", name = %t.name).entered();
                let stages = spec.stages_for(&t.name);
                encode_raw(&t.name, t.dtype, &t.shape, &t.raw, &stages, spec.seed)
            })
            .collect();
        for enc in wave {
            let enc = enc?;
            let source = enc.entry.source_bytes;
            writer.add(enc)?;
            written(source);
        }
    }
    writer.finish(&[])
}

struct OpenShard {
    path: PathBuf,
    map: Mmap,
}

fn shard_err(path: &Path, why: impl Into<String>) -> PipelineError {
    PipelineError::Artifact {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

fn shard_meta(s: &OpenShard) -> Result<std::collections::HashMap<String, String>, PipelineError> {
    let (_, meta) = SafeTensors::read_metadata(&s.map)
        .map_err(|e| shard_err(&s.path, format!("not a shard file: {e}")))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(SHARD_FORMAT) {
        return Err(shard_err(&s.path, format!("not a {SHARD_FORMAT} file")));
    }
    Ok(meta)
}

fn read_index(s: &OpenShard) -> Result<Vec<IndexEntry>, PipelineError> {
    let meta = shard_meta(s)?;
    let entries = meta
        .get("entries")
        .ok_or_else(|| shard_err(&s.path, "shard has no entry index"))?;
    serde_json::from_str(entries).map_err(|e| shard_err(&s.path, format!("bad entry index: {e}")))
}

/// The report sections a shard carries (a collective group's calibration
/// and distillation accounts), none for a plain shard.
fn read_sections(s: &OpenShard) -> Result<Vec<ReportSection>, PipelineError> {
    match shard_meta(s)?.get("sections") {
        Some(text) => serde_json::from_str(text)
            .map_err(|e| shard_err(&s.path, format!("bad report sections: {e}"))),
        None => Ok(Vec::new()),
    }
}

/// Merges shard files into the artifact of `spec` at `output`: the same
/// files a local run writes. Every tensor of the model must be in exactly
/// one shard, with the dtype and shape the model gives it. The report gets
/// the sections the shards carry (each key from the first shard that has
/// it), then `sections`.
pub fn merge_shards(
    spec: &JobSpec,
    shard_files: &[PathBuf],
    output: &Path,
    sections: &[ReportSection],
) -> Result<RunOutcome, PipelineError> {
    let mut shards = Vec::with_capacity(shard_files.len());
    for path in shard_files {
        let f = File::open(path).map_err(|e| PipelineError::io(path, "cannot open", e))?;
        // SAFETY: shard files are written once, before the merge, and not
        // modified while it runs.
        let map = unsafe { Mmap::map(&f) }.map_err(|e| PipelineError::io(path, "cannot map", e))?;
        shards.push(OpenShard {
            path: path.clone(),
            map,
        });
    }
    let mut report: Vec<ReportSection> = Vec::new();
    for s in &shards {
        for section in read_sections(s)? {
            if !report.iter().any(|r| r.key == section.key) {
                report.push(section);
            }
        }
    }
    report.extend(sections.iter().cloned());
    let sections = report.as_slice();
    let mut by_name: BTreeMap<String, (usize, IndexEntry)> = BTreeMap::new();
    for (i, s) in shards.iter().enumerate() {
        for e in read_index(s)? {
            let name = e.entry.name.clone();
            if by_name.insert(name.clone(), (i, e)).is_some() {
                return Err(shard_err(
                    &s.path,
                    format!("tensor `{name}` is in two shards"),
                ));
            }
        }
    }
    let views: Vec<SafeTensors<'_>> = shards
        .iter()
        .map(|s| {
            SafeTensors::deserialize(&s.map)
                .map_err(|e| shard_err(&s.path, format!("not a shard file: {e}")))
        })
        .collect::<Result<_, _>>()?;
    write_artifact(spec, output, |model, tmp, started| {
        let started: Instant = started;
        let mut writer = TensorFileWriter::create(&tmp.join(TENSOR_FILE))?;
        let mut entries = Vec::with_capacity(model.tensors.len());
        let mut seconds = Vec::with_capacity(model.tensors.len());
        for t in &model.tensors {
            let Some((i, e)) = by_name.remove(&t.name) else {
                return Err(shard_err(
                    output,
                    format!("no shard holds tensor `{}`", t.name),
                ));
            };
            let path = &shards[i].path;
            if e.entry.dtype != dtype_str(t.dtype) || e.entry.shape != t.shape {
                return Err(shard_err(
                    path,
                    format!(
                        "tensor `{}` is {} {:?} in the shard but {} {:?} in the model",
                        t.name,
                        e.entry.dtype,
                        e.entry.shape,
                        dtype_str(t.dtype),
                        t.shape
                    ),
                ));
            }
            for p in &e.entry.parts {
                let view = views[i]
                    .tensor(&p.name)
                    .map_err(|err| shard_err(path, format!("part `{}`: {err}", p.name)))?;
                if view.data().len() as u64 != p.bytes {
                    return Err(shard_err(
                        path,
                        format!(
                            "part `{}` has {} bytes, its entry says {}",
                            p.name,
                            view.data().len(),
                            p.bytes
                        ),
                    ));
                }
                writer.add(&p.name, &p.dtype, &p.shape, view.data())?;
                crate::model::release_slice(&shards[i].map, view.data());
            }
            entries.push(e.entry);
            seconds.push(e.seconds);
        }
        if let Some(name) = by_name.keys().next() {
            return Err(shard_err(
                output,
                format!("shards hold tensor `{name}`, which the model does not have"),
            ));
        }
        finish_artifact(
            spec, model, tmp, writer, entries, &seconds, started, sections,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Model, f32_to_bytes};
    use crate::run::run_job;

    fn synthetic_model(dir: &Path) -> PathBuf {
        let path = dir.join("model.safetensors");
        let mut w = TensorFileWriter::create(&path).unwrap();
        let mut rng = hcx_kernels::rng::SplitMix64::new(7);
        for name in [
            "embeddings.weight",
            "encoder.layer.0.attn.weight",
            "encoder.layer.0.attn.bias",
            "encoder.layer.1.attn.weight",
            "encoder.layer.1.mlp.weight",
        ] {
            let (shape, n) = if name.ends_with("bias") {
                (vec![64], 64)
            } else {
                (vec![64, 128], 64 * 128)
            };
            let v: Vec<f32> = (0..n).map(|_| rng.next_f64() as f32 - 0.5).collect();
            w.add(name, "BF16", &shape, &f32_to_bytes(&v, Dtype::BF16))
                .unwrap();
        }
        w.add("position_ids", "I64", &[4], &[0u8; 32]).unwrap();
        w.finish(&BTreeMap::new()).unwrap();
        path
    }

    fn spec(model: &Path, out: &Path) -> JobSpec {
        serde_json::from_value(serde_json::json!({
            "name": "t", "seed": 3, "model": model, "output": out,
            "pipeline": [{"hadamard": {}}, {"rtn": {"bits": 4, "group": 32}}, {"zstd": {}}],
            "rules": [{"match": "*.bias", "keep": "source"}]
        }))
        .unwrap()
    }

    fn sources(model: &Model, names: &[&str]) -> Vec<SourceTensor> {
        model
            .tensors
            .iter()
            .filter(|t| names.contains(&t.name.as_str()))
            .map(|t| SourceTensor {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                raw: model.raw(t).to_vec(),
            })
            .collect()
    }

    #[test]
    fn any_partition_merges_to_the_local_run() {
        let dir = tempfile::tempdir().unwrap();
        let model_path = synthetic_model(dir.path());
        let local = dir.path().join("local");
        let s = spec(&model_path, &local);
        run_job(&s, None).unwrap();
        let model = Model::open(&model_path).unwrap();
        let all: Vec<&str> = model.tensors.iter().map(|t| t.name.as_str()).collect();
        for split in [vec![all.len()], vec![1, 2, 3], vec![3, 3]] {
            let mut files = Vec::new();
            let mut rest: &[&str] = &all;
            for (i, n) in split.iter().enumerate() {
                let (head, tail) = rest.split_at((*n).min(rest.len()));
                rest = tail;
                let p = dir.path().join(format!("shard-{i}.bin"));
                let sum = encode_shard(&s, &sources(&model, head), &p).unwrap();
                assert_eq!(sum.sha256, crate::writer::sha256_file(&p).unwrap());
                files.push(p);
            }
            let merged = dir.path().join(format!("merged-{}", split.len()));
            merge_shards(&s, &files, &merged, &[]).unwrap();
            for f in [TENSOR_FILE, hcx_protocol::manifest::MANIFEST_FILE] {
                assert_eq!(
                    std::fs::read(local.join(f)).unwrap(),
                    std::fs::read(merged.join(f)).unwrap(),
                    "{f} differs for split {split:?}"
                );
            }
        }
    }

    #[test]
    fn missing_or_doubled_tensors_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let model_path = synthetic_model(dir.path());
        let s = spec(&model_path, &dir.path().join("out"));
        let model = Model::open(&model_path).unwrap();
        let a = dir.path().join("a.bin");
        encode_shard(&s, &sources(&model, &["embeddings.weight"]), &a).unwrap();
        let err = merge_shards(&s, std::slice::from_ref(&a), &dir.path().join("o1"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no shard holds tensor"), "{err}");
        let err = merge_shards(&s, &[a.clone(), a.clone()], &dir.path().join("o2"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("is in two shards"), "{err}");
        let junk = dir.path().join("junk.bin");
        std::fs::write(&junk, b"not a shard").unwrap();
        let err = merge_shards(&s, &[junk], &dir.path().join("o3"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a shard file"), "{err}");
        assert!(!dir.path().join("o1").exists());
    }
}
