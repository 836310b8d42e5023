//! Runs a job on this machine and writes its artifact.
//!
//! Tensors are processed in name order, in waves of at most
//! [`WAVE_ELEMENTS`] source values (a larger tensor forms a wave alone)
//! encoded in parallel; each wave's parts go straight to the artifact's
//! spill file, so memory tracks the largest wave, not the model. The
//! artifact is built in a temporary folder beside the output and renamed
//! into place only when complete.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use hcx_kernels::EncodedTensor;
use hcx_kernels::chain::encode_tensor_calibrated;
use hcx_kernels::row_pieces;
use hcx_protocol::manifest::{FORMAT, MANIFEST_FILE};
use hcx_protocol::{FileEntry, JobSpec, Manifest, PartEntry, StageSpec, TensorEntry};
use rayon::prelude::*;
use sha2::Digest;

use crate::PipelineError;
use crate::attribution::{self, Attribution, ReportSection};
use crate::model::{Model, dtype_str, is_integer_dtype, raw_to_f32};
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

/// One tensor after its stage chain, ready to be written: its manifest
/// entry (part header sizes not known yet), each part's bytes, and each
/// step's seconds.
#[derive(Debug, Clone)]
pub struct EncodedEntry {
    /// The manifest entry.
    pub entry: TensorEntry,
    /// Bytes of each part, in the order of `entry.parts`.
    pub data: Vec<Vec<u8>>,
    /// Seconds each step took (empty for copied tensors).
    pub seconds: Vec<f64>,
}

/// Runs a tensor's stage chain on its stored bytes. Integer tensors and
/// tensors with no stages are copied as they are.
pub fn encode_raw(
    name: &str,
    dtype: safetensors::Dtype,
    shape: &[usize],
    raw: &[u8],
    stages: &[StageSpec],
    seed: u64,
) -> Result<EncodedEntry, PipelineError> {
    encode_raw_calibrated(name, dtype, shape, raw, stages, seed, None).map(|(e, _)| e)
}

/// Whether a tensor of `numel` values is encoded a piece of rows at a time
/// (see [`encode_raw_calibrated`]): larger than a wave, no calibration
/// statistics, a chain that codes rows independently (with `vq`
/// codebooks trained on a sample).
fn by_rows(shape: &[usize], stages: &[StageSpec], calibrated: bool) -> bool {
    let numel: usize = shape.iter().product();
    !calibrated && numel > WAVE_ELEMENTS && row_pieces::encodes_by_rows(stages, shape)
}

/// Values of tensor `t` a run holds at once while encoding it through
/// `stages` (with calibration statistics when `calibrated`): one piece of
/// rows where it is encoded by rows, else the whole tensor. The planner's
/// memory estimate for a shard is built on it.
pub fn working_values(
    t: &crate::model::TensorInfo,
    stages: &[StageSpec],
    calibrated: bool,
) -> usize {
    let numel = t.numel();
    if is_integer_dtype(t.dtype) || !by_rows(&t.shape, stages, calibrated) {
        return numel;
    }
    let cols = t.shape.last().copied().unwrap_or(1).max(1);
    (row_pieces::piece_rows(cols, WAVE_ELEMENTS) * cols).min(numel)
}

/// [`encode_raw`] for tensor `t` of `model`: where it is encoded a piece of
/// rows at a time (see [`encode_raw_calibrated`]), each piece's source
/// pages are dropped from resident memory once read.
pub fn encode_model_tensor(
    model: &Model,
    t: &crate::model::TensorInfo,
    stages: &[StageSpec],
    seed: u64,
) -> Result<EncodedEntry, PipelineError> {
    encode_raw_inner(
        &t.name,
        t.dtype,
        &t.shape,
        model.raw(t),
        None,
        stages,
        seed,
        None,
        &|bytes| model.release_bytes(t, bytes),
    )
    .map(|(e, _)| e)
}

/// [`encode_raw`] with the statistics H = Σ x xᵀ of the tensor's inputs
/// (row-major, columns × columns) where calibration collected them; also
/// returns the decoded values of an encoded tensor (what the compressed
/// model will hold), for sequential calibration.
///
/// A tensor of more than [`WAVE_ELEMENTS`] values without statistics whose
/// chain codes rows independently (`hcx_kernels::row_pieces`) is encoded a
/// piece of rows at a time, with the same bytes, so that memory holds one
/// piece and the parts rather than the tensor (its decoded values are not
/// returned: no calibration asks for them).
pub fn encode_raw_calibrated(
    name: &str,
    dtype: safetensors::Dtype,
    shape: &[usize],
    raw: &[u8],
    stages: &[StageSpec],
    seed: u64,
    hessian: Option<&[f64]>,
) -> Result<(EncodedEntry, Option<Vec<f32>>), PipelineError> {
    encode_raw_inner(
        name,
        dtype,
        shape,
        raw,
        None,
        stages,
        seed,
        hessian,
        &|_| {},
    )
}

/// [`encode_raw_calibrated`] coding `tuned` (the weight as distillation
/// left it before its encoding) in place of the source values `raw`; the
/// entry still describes the source (its dtype, bytes and energy) and its
/// errors are measured against it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn encode_tuned_calibrated(
    name: &str,
    dtype: safetensors::Dtype,
    shape: &[usize],
    raw: &[u8],
    tuned: Vec<f32>,
    stages: &[StageSpec],
    seed: u64,
    hessian: Option<&[f64]>,
) -> Result<(EncodedEntry, Option<Vec<f32>>), PipelineError> {
    encode_raw_inner(
        name,
        dtype,
        shape,
        raw,
        Some(tuned),
        stages,
        seed,
        hessian,
        &|_| {},
    )
}

/// [`encode_raw_calibrated`], calling `read` with each span of `raw` a
/// piece-wise encoding has finished with.
#[allow(clippy::too_many_arguments)]
fn encode_raw_inner(
    name: &str,
    dtype: safetensors::Dtype,
    shape: &[usize],
    raw: &[u8],
    tuned: Option<Vec<f32>>,
    stages: &[StageSpec],
    seed: u64,
    hessian: Option<&[f64]>,
    read: &dyn Fn(&[u8]),
) -> Result<(EncodedEntry, Option<Vec<f32>>), PipelineError> {
    let mut entry = TensorEntry {
        name: name.to_string(),
        dtype: dtype_str(dtype),
        shape: shape.to_vec(),
        source_bytes: raw.len() as u64,
        energy: 0.0,
        file: TENSOR_FILE.into(),
        steps: Vec::new(),
        parts: Vec::new(),
        sqnr_db: None,
        stored_bytes: None,
        output_sqnr_db: None,
    };
    if stages.is_empty() || is_integer_dtype(dtype) {
        entry.parts.push(PartEntry {
            name: name.to_string(),
            dtype: entry.dtype.clone(),
            shape: shape.to_vec(),
            bytes: raw.len() as u64,
            header_bytes: 0,
        });
        return Ok((
            EncodedEntry {
                entry,
                data: vec![raw.to_vec()],
                seconds: Vec::new(),
            },
            None,
        ));
    }
    let numel: usize = shape.iter().product();
    let elem = dtype.bitsize() / 8;
    if elem == 0 || raw.len() != numel * elem {
        return Err(PipelineError::Model {
            path: PathBuf::from(name),
            why: format!(
                "tensor holds {} bytes, its shape {shape:?} and dtype {} need {}",
                raw.len(),
                entry.dtype,
                numel * elem
            ),
        });
    }
    let tensor_err = |source| PipelineError::Tensor {
        tensor: name.to_string(),
        source,
    };
    if tuned.as_ref().is_some_and(|t| t.len() != numel) {
        return Err(PipelineError::Model {
            path: PathBuf::from(name),
            why: format!("the tuned weight holds other than the {numel} values of {shape:?}"),
        });
    }
    let e: EncodedTensor = if tuned.is_none() && by_rows(shape, stages, hessian.is_some()) {
        let cols = shape.last().copied().unwrap_or(1).max(1);
        let per = row_pieces::piece_rows(cols, WAVE_ELEMENTS);
        let r = row_pieces::encode_by_rows(name, shape, stages, seed, elem, per, |rows| {
            let bytes = &raw[rows.start * cols * elem..rows.end * cols * elem];
            let values = raw_to_f32(bytes, dtype);
            read(bytes);
            Ok(values)
        })
        .map_err(tensor_err)?;
        entry.energy = r.energy;
        r.tensor
    } else {
        let values = raw_to_f32(raw, dtype);
        entry.energy = hcx_kernels::stats::energy(&values);
        match tuned {
            None => encode_tensor_calibrated(name, values, shape, stages, seed, elem, hessian)
                .map_err(tensor_err)?,
            Some(t) => {
                let mut e = encode_tensor_calibrated(name, t, shape, stages, seed, elem, hessian)
                    .map_err(tensor_err)?;
                hcx_kernels::chain::measure_against(&mut e, &values, shape, hessian);
                e
            }
        }
    };
    let mut data = Vec::with_capacity(e.parts.len());
    for p in e.parts {
        entry.parts.push(PartEntry {
            name: format!("{name}.{}", p.name),
            dtype: p.dtype.name().into(),
            shape: p.shape.clone(),
            bytes: p.len() as u64,
            header_bytes: 0,
        });
        data.push(p.data);
    }
    for (stage, secs) in stages.iter().zip(&e.seconds) {
        metrics::histogram!(hcx_protocol::metrics::STAGE_SECONDS, "stage" => stage.kind())
            .record(*secs);
    }
    entry.steps = e.steps;
    entry.sqnr_db = e.sqnr_db;
    entry.output_sqnr_db = e.output_sqnr_db;
    Ok((
        EncodedEntry {
            entry,
            data,
            seconds: e.seconds,
        },
        hessian.map(|_| e.decoded),
    ))
}

/// Appends an encoded tensor's parts to a tensor file.
pub fn write_entry(writer: &mut TensorFileWriter, e: &EncodedEntry) -> Result<(), PipelineError> {
    for (p, d) in e.entry.parts.iter().zip(&e.data) {
        writer.add(&p.name, &p.dtype, &p.shape, d)?;
    }
    Ok(())
}

/// Checks the output can be written: its parent exists (or is created) and
/// it is absent, or an earlier artifact (which is replaced), or an empty
/// folder. Returns the temporary folder the artifact is built in.
pub fn check_output(output: &Path) -> Result<PathBuf, PipelineError> {
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

/// The files a model at `path` (a folder or a file) consists of, as a run
/// reads them: its tensor files, their index, and the files copied into the
/// artifact. Returns the folder they lie in, their names in it (sorted),
/// and the model file's name when `path` is a file.
pub fn model_files(path: &Path) -> Result<(PathBuf, Vec<String>, Option<String>), PipelineError> {
    let model = Model::open(path)?;
    let meta =
        std::fs::metadata(path).map_err(|e| PipelineError::io(path, "cannot open the model", e))?;
    let file = meta.is_file().then(|| {
        path.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default()
    });
    let dir = if meta.is_file() {
        path.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else {
        path.to_path_buf()
    };
    let mut names: Vec<String> = match &file {
        Some(f) => vec![f.clone()],
        None => model.files.clone(),
    };
    if file.is_none() && dir.join("model.safetensors.index.json").is_file() {
        names.push("model.safetensors.index.json".into());
    }
    names.extend(extra_files(&model)?);
    names.sort();
    names.dedup();
    Ok((dir, names, file))
}

/// Files of the model folder copied into the artifact (config, tokenizer…):
/// every regular file but the safetensors files and their index, up to 64 MiB each.
fn extra_files(model: &Model) -> Result<Vec<String>, PipelineError> {
    let mut out = Vec::new();
    if model.is_gguf() || (model.files.len() == 1 && !model.dir.join("config.json").exists()) {
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
    let output = output.unwrap_or(&spec.output).to_path_buf();
    write_artifact(spec, &output, |model, tmp, started| {
        if spec.calibration.is_some() {
            let mut alone = crate::calibrate::one_rank("setting up a one-rank run")?;
            crate::calibrate::build_calibrated(spec, model, tmp, started, &mut alone, &[])
        } else {
            build(spec, model, tmp, started)
        }
    })
}

/// Builds an artifact for `spec` at `output`: opens the model, makes a
/// temporary folder beside the output, lets `fill` write the artifact's
/// files into it, and renames it into place only when `fill` succeeds.
pub fn write_artifact(
    spec: &JobSpec,
    output: &Path,
    fill: impl FnOnce(&Model, &Path, Instant) -> Result<Attribution, PipelineError>,
) -> Result<RunOutcome, PipelineError> {
    let started = Instant::now();
    let model = Model::open(spec.model.read_path())?;
    let tmp = check_output(output)?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| PipelineError::io(&tmp, "cannot clear", e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| PipelineError::io(&tmp, "cannot create", e))?;
    match fill(&model, &tmp, started) {
        Ok(attribution) => {
            publish(&tmp, output)?;
            Ok(RunOutcome {
                output: output.to_path_buf(),
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
///
/// Every file of the new folder and the folder itself are fsynced first;
/// then one atomic step puts it in place: a rename where there was nothing,
/// an exchange of the two folders where there was an earlier artifact
/// (`renameat2(RENAME_EXCHANGE)` on Linux), so the output path always names
/// a complete artifact, the old one or the new one, even across a crash.
/// The parent folder is fsynced last so the step itself is durable.
pub fn publish(tmp: &Path, output: &Path) -> Result<(), PipelineError> {
    sync_tree(tmp)?;
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if output.exists() {
        match exchange(tmp, output) {
            Ok(()) => {
                // `tmp` now holds the earlier artifact.
                let _ = std::fs::remove_dir_all(tmp);
            }
            Err(e) if exchange_unsupported(&e) => {
                // No atomic exchange on this system or file system: fall back
                // to two renames, with a moment when the output is absent.
                let old = tmp.with_extension("old");
                std::fs::rename(output, &old).map_err(|e| {
                    PipelineError::io(output, "cannot move the earlier artifact aside", e)
                })?;
                std::fs::rename(tmp, output).map_err(|e| {
                    PipelineError::io(output, "cannot move the artifact into place", e)
                })?;
                let _ = std::fs::remove_dir_all(&old);
            }
            Err(e) => {
                return Err(PipelineError::io(
                    output,
                    "cannot exchange the earlier artifact for the new one",
                    e,
                ));
            }
        }
    } else {
        std::fs::rename(tmp, output)
            .map_err(|e| PipelineError::io(output, "cannot move the artifact into place", e))?;
    }
    sync_dir(&parent)
}

/// fsyncs every regular file directly in `dir`, then `dir` itself.
fn sync_tree(dir: &Path) -> Result<(), PipelineError> {
    let rd = std::fs::read_dir(dir).map_err(|e| PipelineError::io(dir, "cannot list", e))?;
    for e in rd {
        let e = e.map_err(|e| PipelineError::io(dir, "cannot list", e))?;
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_file()) {
            File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(|e| PipelineError::io(&p, "cannot fsync", e))?;
        }
    }
    sync_dir(dir)
}

/// fsyncs a folder, so the names in it (a rename, a new file) are durable.
fn sync_dir(dir: &Path) -> Result<(), PipelineError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| PipelineError::io(dir, "cannot fsync the folder", e))
}

/// Atomically swaps the two paths (both must exist).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes())?;
    let cb = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both are valid NUL-terminated paths that outlive the call;
    // renameat2 only reads them.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// No atomic exchange off Linux: the caller falls back to two renames.
#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

/// True when `e` says the exchange itself is not available here.
fn exchange_unsupported(e: &std::io::Error) -> bool {
    #[cfg(target_os = "linux")]
    if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EINVAL)) {
        return true;
    }
    e.kind() == std::io::ErrorKind::Unsupported
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
        let wave: Vec<Result<EncodedEntry, PipelineError>> = (i..j)
            .into_par_iter()
            .map(|k| encode_model_tensor(model, &model.tensors[k], &plans[k], spec.seed))
            .collect();
        for k in i..j {
            model.release(&model.tensors[k]);
        }
        for enc in wave {
            let enc = enc?;
            write_entry(&mut writer, &enc)?;
            entries.push(enc.entry);
            seconds.push(enc.seconds);
        }
    }
    finish_artifact(spec, model, tmp, writer, entries, &seconds, started, &[])
}

/// Writes everything of an artifact but the tensor data: closes the tensor
/// file, copies the model's extra files, writes the manifest and the
/// attribution report. `entries` are in model order, their parts already
/// in `writer`. `sections` are added to the report as it is written, so the
/// report is complete before the artifact is published.
#[allow(clippy::too_many_arguments)]
pub fn finish_artifact(
    spec: &JobSpec,
    model: &Model,
    tmp: &Path,
    writer: TensorFileWriter,
    mut entries: Vec<TensorEntry>,
    seconds: &[Vec<f64>],
    started: Instant,
    sections: &[ReportSection],
) -> Result<Attribution, PipelineError> {
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    let written = writer.finish(&meta)?;
    for e in &mut entries {
        for p in &mut e.parts {
            p.header_bytes = written.header_bytes.get(&p.name).copied().unwrap_or(0);
        }
    }
    // Source bytes are charged as the source stores them (a GGUF tensor's
    // quantized blocks, not its f32 expansion).
    let stored: HashMap<&str, u64> = model
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.stored_bytes))
        .collect();
    for e in &mut entries {
        if let Some(b) = stored.get(e.name.as_str())
            && *b != e.source_bytes
        {
            e.stored_bytes = Some(*b);
        }
    }
    let mut copied = Vec::new();
    for name in extra_files(model)? {
        let from = model.dir.join(&name);
        let to = tmp.join(&name);
        let bytes =
            std::fs::copy(&from, &to).map_err(|e| PipelineError::io(&from, "cannot copy", e))?;
        copied.push(FileEntry {
            sha256: crate::writer::sha256_file(&to)?,
            name,
            bytes,
        });
    }
    for (name, data) in &model.generated {
        let to = tmp.join(name);
        std::fs::write(&to, data).map_err(|e| PipelineError::io(&to, "cannot write", e))?;
        copied.push(FileEntry {
            sha256: hex::encode(sha2::Sha256::digest(data)),
            name: name.clone(),
            bytes: data.len() as u64,
        });
    }
    let sizes = model.file_sizes();
    // Hashed by reading each file through a buffer: hashing through the
    // map would make the whole source resident at once.
    let source_files: Vec<FileEntry> = model
        .files
        .iter()
        .enumerate()
        .map(|(i, name)| {
            Ok(FileEntry {
                name: name.clone(),
                bytes: sizes[i],
                sha256: crate::writer::sha256_file(&model.dir.join(name))?,
            })
        })
        .collect::<Result<_, PipelineError>>()?;
    let mut job = spec.clone();
    job.output = PathBuf::from(".");
    // The manifest records where the model was read, not how it travelled.
    job.model = hcx_protocol::job::ModelRef::at(
        std::fs::canonicalize(&spec.model.path).unwrap_or_else(|_| spec.model.path.clone()),
    );
    // Calibration files as canonical paths too, so the manifest does not
    // depend on how the job named them. A federated job's site files are
    // not at the merging coordinator: they are written as absolute paths.
    if let Some(c) = &mut job.calibration {
        // Where the files were read, not how they travelled.
        c.sent.clear();
        for f in c.shared_files_mut() {
            let _ = f.try_map(|p| {
                Ok::<_, std::convert::Infallible>(
                    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()),
                )
            });
        }
        for f in c.sites.values_mut() {
            let _ = f.try_map(|p| std::path::absolute(p));
        }
    }
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
    let mut report = attribution::build(
        &manifest,
        written.bytes + manifest_bytes,
        seconds,
        started.elapsed().as_secs_f64(),
    );
    let mut md_text = attribution::markdown(&report);
    for s in sections {
        report.extra.insert(s.key.clone(), s.json.clone());
        md_text.push('\n');
        md_text.push_str(&s.markdown);
    }
    write_json(&tmp.join("attribution.json"), &report, true)?;
    let md = tmp.join("attribution.md");
    std::fs::write(&md, md_text).map_err(|e| PipelineError::io(&md, "cannot write", e))?;
    let svg = tmp.join(crate::artifact::CHARTS_FILE);
    let drawing = crate::charts::attribution_svg(&report).map_err(PipelineError::Charts)?;
    std::fs::write(&svg, drawing).map_err(|e| PipelineError::io(&svg, "cannot write", e))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::{BTreeMap, JobSpec, Model, WAVE_ELEMENTS, run_job, waves};

    #[test]
    fn replacing_an_artifact_never_leaves_the_output_missing() {
        use super::publish;
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("art");
        let make = |n: usize| {
            let tmp = dir.path().join(format!(".art.partial-{n}"));
            std::fs::create_dir(&tmp).unwrap();
            std::fs::write(tmp.join("hcx-manifest.json"), n.to_string()).unwrap();
            tmp
        };
        publish(&make(0), &output).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let missing = Arc::new(AtomicUsize::new(0));
        let watcher = {
            let (done, missing, output) = (done.clone(), missing.clone(), output.clone());
            std::thread::spawn(move || {
                let mut looks = 0usize;
                while !done.load(Ordering::Relaxed) {
                    if !output.join("hcx-manifest.json").is_file() {
                        missing.fetch_add(1, Ordering::Relaxed);
                    }
                    looks += 1;
                }
                looks
            })
        };
        for n in 1..=300 {
            publish(&make(n), &output).unwrap();
            assert_eq!(
                std::fs::read_to_string(output.join("hcx-manifest.json")).unwrap(),
                n.to_string()
            );
        }
        done.store(true, Ordering::Relaxed);
        let looks = watcher.join().unwrap();
        assert!(looks > 0);
        assert_eq!(
            missing.load(Ordering::Relaxed),
            0,
            "output missing in some of {looks} looks"
        );
        // Nothing is left beside the output.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("art")]);
    }

    #[test]
    fn a_tensor_larger_than_a_wave_is_encoded_by_rows_with_the_same_bytes() {
        use crate::model::f32_to_bytes;
        use hcx_protocol::stage::{
            HadamardSpec, RansSpec, RtnSpec, StageSpec, TernarySpec, UniformSpec, VqSpec,
        };
        // 16,400 × 4,096 bf16 values: more than a wave, so four pieces of
        // 16,360 rows and a last one of 40.
        let (rows, cols) = (16_400usize, 4_096usize);
        assert!(rows * cols > WAVE_ELEMENTS);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| {
                ((i.wrapping_mul(2_654_435_761) % 1_000) as f32 - 500.0)
                    * (1.0 + (i / cols % 5) as f32)
            })
            .collect();
        let raw = f32_to_bytes(&values, safetensors::Dtype::BF16);
        drop(values);
        let rtn = vec![
            StageSpec::Rtn(RtnSpec {
                bits: 4,
                group: Some(128),
                symmetric: false,
                search: false,
            }),
            StageSpec::Rans(RansSpec {}),
        ];
        // `uniform` fits its step and offsets over the pieces first: each
        // piece is read three times (sample, tally, code).
        let uniform = vec![
            StageSpec::Hadamard(HadamardSpec::default()),
            StageSpec::Uniform(UniformSpec {
                bits: 4.4,
                deadzone: 0.0,
            }),
            StageSpec::Rans(RansSpec {}),
        ];
        // `ternary` without a group sums the magnitudes for its one scale
        // over the pieces first: each piece is read twice.
        let ternary = vec![
            StageSpec::Ternary(TernarySpec { group: None }),
            StageSpec::Rans(RansSpec {}),
        ];
        // `vq` gathers its codebook's seeded subsample first: twice.
        let vq = vec![
            StageSpec::Vq(VqSpec {
                dim: 2,
                bits: 4,
                iterations: 3,
                residual: false,
            }),
            StageSpec::Rans(RansSpec {}),
        ];
        for (stages, reads) in [(rtn, 1), (uniform, 3), (ternary, 2), (vq, 2)] {
            let read = std::sync::atomic::AtomicUsize::new(0);
            let (pieces, _) = super::encode_raw_inner(
                "w",
                safetensors::Dtype::BF16,
                &[rows, cols],
                &raw,
                None,
                &stages,
                3,
                None,
                &|b| {
                    read.fetch_add(b.len(), std::sync::atomic::Ordering::Relaxed);
                },
            )
            .unwrap();
            assert_eq!(read.into_inner(), reads * raw.len(), "{stages:?}");
            let whole = hcx_kernels::encode_tensor(
                "w",
                crate::model::raw_to_f32(&raw, safetensors::Dtype::BF16),
                &[rows, cols],
                &stages,
                3,
                2,
            )
            .unwrap();
            assert_eq!(pieces.data.len(), whole.parts.len());
            for (a, b) in pieces.data.iter().zip(&whole.parts) {
                assert!(a == &b.data, "part {} differs in {stages:?}", b.name);
            }
            assert_eq!(pieces.entry.steps.len(), whole.steps.len());
            for (a, b) in pieces.entry.steps.iter().zip(&whole.steps) {
                assert_eq!(a.meta, b.meta);
            }
        }
    }

    #[test]
    fn a_tensor_larger_than_a_wave_decompresses_by_rows_to_the_whole_decode() {
        use crate::model::f32_to_bytes;
        use crate::writer::TensorFileWriter;
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("model.safetensors");
        let (rows, cols) = (16_440usize, 4_096usize);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i.wrapping_mul(40_503) % 997) as f32 - 498.0) * 1e-3)
            .collect();
        let mut w = TensorFileWriter::create(&src).unwrap();
        w.add(
            "big.weight",
            "BF16",
            &[rows, cols],
            &f32_to_bytes(&values, safetensors::Dtype::BF16),
        )
        .unwrap();
        drop(values);
        w.add("small.weight", "F32", &[2, 128], &[0u8; 1024])
            .unwrap();
        w.finish(&BTreeMap::new()).unwrap();
        let out = dir.path().join("art");
        let spec: JobSpec = serde_json::from_value(serde_json::json!({
            "name": "t", "seed": 3, "model": &src, "output": &out,
            "pipeline": [{"hadamard": {}}, {"rtn": {"bits": 4, "group": 128}}, {"rans": {}}],
        }))
        .unwrap();
        run_job(&spec, None).unwrap();
        let dense = dir.path().join("dense");
        crate::artifact::decompress(&out, &dense).unwrap();
        let m = crate::artifact::read_manifest(&out).unwrap();
        let whole = crate::artifact::decode_values(&out, &m, "big.weight").unwrap();
        let written = Model::open(&dense).unwrap();
        let t = written
            .tensors
            .iter()
            .find(|t| t.name == "big.weight")
            .unwrap();
        assert!(
            written.raw(t) == f32_to_bytes(&whole, safetensors::Dtype::BF16).as_slice(),
            "the dense tensor differs from the whole decode"
        );
    }

    #[test]
    fn waves_cover_everything_in_order_within_the_cap() {
        let big = WAVE_ELEMENTS + 1;
        let sizes = [10, WAVE_ELEMENTS - 10, 1, big, 5, 5];
        let w = waves(&sizes);
        assert_eq!(w, vec![0..2, 2..3, 3..4, 4..6]);
        assert!(waves(&[]).is_empty());
    }
}
