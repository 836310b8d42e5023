//! Runs a job on this machine and writes its artifact.
//!
//! Tensors are processed in name order, in waves of at most
//! [`WAVE_ELEMENTS`] source values (a larger tensor forms a wave alone)
//! encoded in parallel; each wave's parts go straight to the artifact's
//! spill file, so memory tracks the largest wave, not the model. The
//! artifact is built in a temporary folder beside the output and renamed
//! into place only when complete.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use hcx_kernels::{EncodedTensor, encode_tensor};
use hcx_protocol::manifest::{FORMAT, MANIFEST_FILE};
use hcx_protocol::{FileEntry, JobSpec, Manifest, PartEntry, StageSpec, TensorEntry};
use rayon::prelude::*;
use sha2::Digest;

use crate::PipelineError;
use crate::attribution::{self, Attribution};
use crate::model::{Model, TensorInfo, dtype_str};
use crate::writer::TensorFileWriter;

/// Name of the tensor file inside an artifact.
pub const TENSOR_FILE: &str = "model.hcx.safetensors";
/// Largest number of source values encoded at once.
pub const WAVE_ELEMENTS: usize = 1 << 26;

/// Splits items of the given element counts, in order, into consecutive
/// waves of at most [`WAVE_ELEMENTS`] values (an item larger than that
/// forms a wave alone).
pub fn waves(sizes: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < sizes.len() {
        let mut j = i;
        let mut elems = 0usize;
        while j < sizes.len() && (j == i || elems + sizes[j] <= WAVE_ELEMENTS) {
            elems += sizes[j];
            j += 1;
        }
        out.push(i..j);
        i = j;
    }
    out
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The artifact folder.
    pub output: PathBuf,
    /// The report written beside it.
    pub attribution: Attribution,
}

enum Encoded {
    Kept(Vec<u8>),
    Chain(EncodedTensor, f64),
}

fn encode_one(
    model: &Model,
    t: &TensorInfo,
    stages: &[StageSpec],
    seed: u64,
) -> Result<Encoded, PipelineError> {
    if stages.is_empty() || t.is_integer() {
        return Ok(Encoded::Kept(model.raw(t).to_vec()));
    }
    let values = model.read_f32(t);
    let energy = hcx_kernels::stats::energy(&values);
    let elem = t.dtype.bitsize() / 8;
    encode_tensor(&t.name, values, &t.shape, stages, seed, elem)
        .map(|e| Encoded::Chain(e, energy))
        .map_err(|source| PipelineError::Tensor {
            tensor: t.name.clone(),
            source,
        })
}

/// Checks the output can be written: its parent exists and it is absent, or
/// an earlier artifact (which is replaced), or an empty folder.
fn check_output(output: &Path) -> Result<PathBuf, PipelineError> {
    let bad = |why: String| PipelineError::Output {
        path: output.to_path_buf(),
        why,
    };
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        std::fs::create_dir_all(&parent).map_err(|e| {
            bad(format!(
                "cannot create the parent folder {}: {e}",
                parent.display()
            ))
        })?;
    }
    if output.exists() {
        if !output.is_dir() {
            return Err(bad("exists and is not a folder".into()));
        }
        let empty = std::fs::read_dir(output)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty && !output.join(MANIFEST_FILE).is_file() {
            return Err(bad(
                "exists, is not empty and is not an hcx artifact; refusing to replace it".into(),
            ));
        }
    }
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "artifact".into());
    Ok(parent.join(format!(".{name}.partial-{}", std::process::id())))
}

/// Files of the model folder copied into the artifact (config, tokenizer…):
/// every regular file but the safetensors files and their index, up to 64 MiB each.
fn extra_files(model: &Model) -> Result<Vec<String>, PipelineError> {
    let mut out = Vec::new();
    if model.files.len() == 1 && !model.dir.join("config.json").exists() {
        return Ok(out);
    }
    let rd = std::fs::read_dir(&model.dir)
        .map_err(|e| PipelineError::io(&model.dir, "cannot list", e))?;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Ok(meta) = e.metadata() else { continue };
        if !meta.is_file()
            || name.ends_with(".safetensors")
            || name == "model.safetensors.index.json"
            || name.starts_with('.')
            || meta.len() > 64 << 20
        {
            continue;
        }
        out.push(name);
    }
    out.sort();
    Ok(out)
}

fn write_json(
    path: &Path,
    value: &impl serde::Serialize,
    pretty: bool,
) -> Result<u64, PipelineError> {
    let text = if pretty {
        serde_json::to_string_pretty(value)
    } else {
        serde_json::to_string(value)
    };
    let mut text = text.map_err(|e| PipelineError::Output {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    text.push('\n');
    std::fs::write(path, &text).map_err(|e| PipelineError::io(path, "cannot write", e))?;
    Ok(text.len() as u64)
}

/// Runs `spec`, writing the artifact to `output` (the spec's own output when `None`).
pub fn run_job(spec: &JobSpec, output: Option<&Path>) -> Result<RunOutcome, PipelineError> {
    let started = Instant::now();
    let output = output.unwrap_or(&spec.output).to_path_buf();
    let model = Model::open(&spec.model)?;
    let tmp = check_output(&output)?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| PipelineError::io(&tmp, "cannot clear", e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| PipelineError::io(&tmp, "cannot create", e))?;
    let result = build(spec, &model, &tmp, started);
    match result {
        Ok(attribution) => {
            publish(&tmp, &output)?;
            Ok(RunOutcome {
                output,
                attribution,
            })
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// Moves the finished folder into place, replacing an earlier artifact.
fn publish(tmp: &Path, output: &Path) -> Result<(), PipelineError> {
    if output.exists() {
        let old = tmp.with_extension("old");
        std::fs::rename(output, &old)
            .map_err(|e| PipelineError::io(output, "cannot move the earlier artifact aside", e))?;
        std::fs::rename(tmp, output)
            .map_err(|e| PipelineError::io(output, "cannot move the artifact into place", e))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(tmp, output)
            .map_err(|e| PipelineError::io(output, "cannot move the artifact into place", e))?;
    }
    Ok(())
}

fn build(
    spec: &JobSpec,
    model: &Model,
    tmp: &Path,
    started: Instant,
) -> Result<Attribution, PipelineError> {
    let mut writer = TensorFileWriter::create(&tmp.join(TENSOR_FILE))?;
    let plans: Vec<Vec<StageSpec>> = model
        .tensors
        .iter()
        .map(|t| spec.stages_for(&t.name))
        .collect();
    let mut entries: Vec<TensorEntry> = Vec::with_capacity(model.tensors.len());
    let mut seconds: Vec<Vec<f64>> = Vec::with_capacity(model.tensors.len());
    let sizes: Vec<usize> = model.tensors.iter().map(|t| t.numel()).collect();
    for range in waves(&sizes) {
        let (i, j) = (range.start, range.end);
        let wave: Vec<Result<Encoded, PipelineError>> = (i..j)
            .into_par_iter()
            .map(|k| encode_one(model, &model.tensors[k], &plans[k], spec.seed))
            .collect();
        for (k, enc) in (i..j).zip(wave) {
            let t = &model.tensors[k];
            let enc = enc?;
            let mut entry = TensorEntry {
                name: t.name.clone(),
                dtype: dtype_str(t.dtype),
                shape: t.shape.clone(),
                source_bytes: t.bytes() as u64,
                energy: 0.0,
                file: TENSOR_FILE.into(),
                steps: Vec::new(),
                parts: Vec::new(),
                sqnr_db: None,
            };
            match enc {
                Encoded::Kept(raw) => {
                    writer.add(&t.name, &entry.dtype, &t.shape, &raw)?;
                    entry.parts.push(PartEntry {
                        name: t.name.clone(),
                        dtype: entry.dtype.clone(),
                        shape: t.shape.clone(),
                        bytes: raw.len() as u64,
                        header_bytes: 0,
                    });
                    seconds.push(Vec::new());
                }
                Encoded::Chain(e, energy) => {
                    entry.energy = energy;
                    for p in &e.parts {
                        let name = format!("{}.{}", t.name, p.name);
                        writer.add(&name, p.dtype.name(), &p.shape, &p.data)?;
                        entry.parts.push(PartEntry {
                            name,
                            dtype: p.dtype.name().into(),
                            shape: p.shape.clone(),
                            bytes: p.len() as u64,
                            header_bytes: 0,
                        });
                    }
                    entry.steps = e.steps;
                    entry.sqnr_db = e.sqnr_db;
                    seconds.push(e.seconds);
                }
            }
            entries.push(entry);
        }
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    let written = writer.finish(&meta)?;
    for e in &mut entries {
        for p in &mut e.parts {
            p.header_bytes = written.header_bytes.get(&p.name).copied().unwrap_or(0);
        }
    }
    let copied = extra_files(model)?;
    for name in &copied {
        let from = model.dir.join(name);
        std::fs::copy(&from, tmp.join(name))
            .map_err(|e| PipelineError::io(&from, "cannot copy", e))?;
    }
    let sizes = model.file_sizes();
    let source_files: Vec<FileEntry> = model
        .files
        .iter()
        .enumerate()
        .map(|(i, name)| FileEntry {
            name: name.clone(),
            bytes: sizes[i],
            sha256: hex::encode(sha2::Sha256::digest(model.file_bytes(i))),
        })
        .collect();
    let mut job = spec.clone();
    job.output = PathBuf::from(".");
    job.model = std::fs::canonicalize(&spec.model).unwrap_or_else(|_| spec.model.clone());
    let manifest = Manifest {
        format: FORMAT.into(),
        job,
        source: hcx_protocol::manifest::SourceInfo {
            bytes: sizes.iter().sum(),
            files: source_files,
            copied,
        },
        tensors: entries,
        files: vec![FileEntry {
            name: TENSOR_FILE.into(),
            bytes: written.bytes,
            sha256: written.sha256,
        }],
    };
    // Compact: the manifest's bytes count in the artifact's size.
    let manifest_bytes = write_json(&tmp.join(MANIFEST_FILE), &manifest, false)?;
    let report = attribution::build(
        &manifest,
        written.bytes + manifest_bytes,
        &seconds,
        started.elapsed().as_secs_f64(),
    );
    write_json(&tmp.join("attribution.json"), &report, true)?;
    let md = tmp.join("attribution.md");
    std::fs::write(&md, attribution::markdown(&report))
        .map_err(|e| PipelineError::io(&md, "cannot write", e))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::{WAVE_ELEMENTS, waves};

    #[test]
    fn waves_cover_everything_in_order_within_the_cap() {
        let big = WAVE_ELEMENTS + 1;
        let sizes = [10, WAVE_ELEMENTS - 10, 1, big, 5, 5];
        let w = waves(&sizes);
        assert_eq!(w, vec![0..2, 2..3, 3..4, 4..6]);
        assert!(waves(&[]).is_empty());
    }
}
