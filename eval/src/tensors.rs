//! Per-tensor SQNR between two dense safetensors model folders.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::Serialize;

use crate::EvalError;

/// One tensor's fidelity: its size and its SQNR in the candidate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorSqnr {
    /// The tensor's name.
    pub name: String,
    /// Its number of elements.
    pub params: usize,
    /// `10 log10(Σ ref² / Σ (ref − cand)²)` in dB; `None` when the candidate
    /// equals the reference exactly (integer tensors always, since they must
    /// match). Minus infinity when the reference is all zeros but the
    /// candidate is not.
    pub sqnr_db: Option<f64>,
    /// Σ ref² (0 for integer tensors).
    pub signal: f64,
    /// Σ (ref − cand)² (0 for integer tensors).
    pub noise: f64,
}

/// Every tensor of the reference, in name order, with its SQNR in the
/// candidate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorComparison {
    /// One entry per reference tensor, sorted by name.
    pub tensors: Vec<TensorSqnr>,
}

impl TensorComparison {
    /// Parameter-weighted mean of the per-tensor SQNR (dB) over the tensors
    /// whose name `filter` accepts and that are not exact; `None` when no
    /// such tensor is left (none match, or all that match are exact).
    pub fn weighted_mean_sqnr(&self, filter: impl Fn(&str) -> bool) -> Option<f64> {
        let (mut sum, mut weight) = (0.0f64, 0.0f64);
        for tensor in &self.tensors {
            if let Some(sqnr) = tensor.sqnr_db
                && filter(&tensor.name)
            {
                sum += sqnr * tensor.params as f64;
                weight += tensor.params as f64;
            }
        }
        (weight > 0.0).then(|| sum / weight)
    }

    /// Pooled SQNR (dB) over the same tensors: `10 log10(Σ signal / Σ noise)`.
    /// Unlike the weighted mean, tensors with large values dominate it.
    pub fn pooled_sqnr(&self, filter: impl Fn(&str) -> bool) -> Option<f64> {
        let (mut signal, mut noise, mut any) = (0.0f64, 0.0f64, false);
        for tensor in &self.tensors {
            if tensor.sqnr_db.is_some() && filter(&tensor.name) {
                signal += tensor.signal;
                noise += tensor.noise;
                any = true;
            }
        }
        (any && noise > 0.0).then(|| 10.0 * (signal / noise).log10())
    }
}

/// The Linear layers of a BERT-style encoder block, after `encoder.layer.N.`.
const ENCODER_LINEAR_WEIGHTS: [&str; 6] = [
    "attention.self.query.weight",
    "attention.self.key.weight",
    "attention.self.value.weight",
    "attention.output.dense.weight",
    "intermediate.dense.weight",
    "output.dense.weight",
];

/// Whether `name` is the (2-D) weight of a Linear layer of a BERT-style
/// encoder block: `[prefix.]encoder.layer.N.` followed by the query, key,
/// value, attention-output, intermediate or output dense weight. LayerNorm
/// weights, biases, embeddings and the pooler are not (36 tensors match in
/// all-MiniLM-L6-v2).
pub fn is_encoder_linear_weight(name: &str) -> bool {
    const MARK: &str = "encoder.layer.";
    name.match_indices(MARK).any(|(at, _)| {
        if at > 0 && !name[..at].ends_with('.') {
            return false;
        }
        let rest = &name[at + MARK.len()..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        digits > 0
            && rest[digits..]
                .strip_prefix('.')
                .is_some_and(|tail| ENCODER_LINEAR_WEIGHTS.contains(&tail))
    })
}

/// The `*.safetensors` files directly inside `dir`, sorted by name; an error
/// when there are none.
pub(crate) fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, EvalError> {
    let io = |source| EvalError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.extension().is_some_and(|ext| ext == "safetensors") && path.is_file() {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(EvalError::NoSafetensors {
            dir: dir.to_path_buf(),
        });
    }
    files.sort();
    Ok(files)
}

/// The memory-mapped safetensors files of one folder.
struct MappedFolder {
    dir: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
}

impl MappedFolder {
    fn open(dir: &Path) -> Result<Self, EvalError> {
        let files = safetensors_files(dir)?
            .into_iter()
            .map(|path| {
                let io = |source| EvalError::Io {
                    path: path.clone(),
                    source,
                };
                let file = File::open(&path).map_err(io)?;
                // SAFETY: the map is only read, and only while `self` lives;
                // like every reader of model files we assume nobody truncates
                // or rewrites them while the comparison runs.
                let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
                Ok((path, mmap))
            })
            .collect::<Result<Vec<_>, EvalError>>()?;
        Ok(MappedFolder {
            dir: dir.to_path_buf(),
            files,
        })
    }

    /// Every tensor of the folder by name.
    fn tensors(&self) -> Result<BTreeMap<String, TensorView<'_>>, EvalError> {
        let mut all = BTreeMap::new();
        for (path, mmap) in &self.files {
            let file = SafeTensors::deserialize(mmap).map_err(|source| EvalError::Safetensors {
                path: path.clone(),
                source,
            })?;
            for (name, view) in file.tensors() {
                if all.contains_key(&name) {
                    return Err(EvalError::DuplicateTensor {
                        tensor: name,
                        dir: self.dir.clone(),
                    });
                }
                all.insert(name, view);
            }
        }
        Ok(all)
    }
}

/// How a dtype's values are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Float,
    Integer,
}

fn kind(dtype: Dtype, tensor: &str) -> Result<Kind, EvalError> {
    match dtype {
        Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64 => Ok(Kind::Float),
        Dtype::BOOL
        | Dtype::U8
        | Dtype::I8
        | Dtype::U16
        | Dtype::I16
        | Dtype::U32
        | Dtype::I32
        | Dtype::U64
        | Dtype::I64 => Ok(Kind::Integer),
        other => Err(EvalError::UnsupportedDtype {
            tensor: tensor.to_string(),
            dtype: format!("{other:?}"),
        }),
    }
}

/// Bytes per element of a dtype `kind` admits (all whole bytes wide).
fn element_bytes(dtype: Dtype) -> usize {
    dtype.bitsize() / 8
}

/// Decodes little-endian float elements of `dtype` from `bytes` into `out`
/// (which has exactly as many slots as `bytes` holds elements).
fn decode_float(dtype: Dtype, bytes: &[u8], out: &mut [f64]) {
    match dtype {
        Dtype::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64;
            }
        }
        Dtype::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([b[0], b[1]]).to_f64();
            }
        }
        Dtype::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([b[0], b[1]]).to_f64();
            }
        }
        Dtype::F64 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *o = f64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
            }
        }
        // `kind` admits only the four dtypes above as floats.
        _ => out.fill(f64::NAN),
    }
}

/// Decodes little-endian integer (or bool) elements of `dtype` into `out`.
fn decode_integer(dtype: Dtype, bytes: &[u8], out: &mut [i128]) {
    fn fill<const N: usize>(bytes: &[u8], out: &mut [i128], f: impl Fn([u8; N]) -> i128) {
        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(N)) {
            *o = f(b.try_into().unwrap_or([0; N]));
        }
    }
    match dtype {
        Dtype::BOOL | Dtype::U8 => fill::<1>(bytes, out, |b| b[0] as i128),
        Dtype::I8 => fill::<1>(bytes, out, |b| i8::from_le_bytes(b) as i128),
        Dtype::U16 => fill::<2>(bytes, out, |b| u16::from_le_bytes(b) as i128),
        Dtype::I16 => fill::<2>(bytes, out, |b| i16::from_le_bytes(b) as i128),
        Dtype::U32 => fill::<4>(bytes, out, |b| u32::from_le_bytes(b) as i128),
        Dtype::I32 => fill::<4>(bytes, out, |b| i32::from_le_bytes(b) as i128),
        Dtype::U64 => fill::<8>(bytes, out, |b| u64::from_le_bytes(b) as i128),
        Dtype::I64 => fill::<8>(bytes, out, |b| i64::from_le_bytes(b) as i128),
        // `kind` admits only the dtypes above as integers.
        _ => out.fill(i128::MIN),
    }
}

/// Elements decoded per step, so no tensor is ever expanded whole.
const CHUNK: usize = 1 << 14;

/// Σ ref² and Σ (ref − cand)² over two float tensors of `n` elements.
fn float_energies(reference: &TensorView<'_>, candidate: &TensorView<'_>, n: usize) -> (f64, f64) {
    let (rd, cd) = (reference.dtype(), candidate.dtype());
    let (rs, cs) = (element_bytes(rd), element_bytes(cd));
    let (rbytes, cbytes) = (reference.data(), candidate.data());
    let mut a = vec![0f64; CHUNK.min(n)];
    let mut b = vec![0f64; CHUNK.min(n)];
    let (mut signal, mut noise) = (0f64, 0f64);
    let mut start = 0;
    while start < n {
        let len = CHUNK.min(n - start);
        let end = start + len;
        decode_float(rd, &rbytes[start * rs..end * rs], &mut a[..len]);
        decode_float(cd, &cbytes[start * cs..end * cs], &mut b[..len]);
        for (&x, &y) in a[..len].iter().zip(&b[..len]) {
            signal += x * x;
            let d = x - y;
            noise += d * d;
        }
        start = end;
    }
    (signal, noise)
}

/// Whether two integer tensors of `n` elements hold the same values.
fn integers_equal(reference: &TensorView<'_>, candidate: &TensorView<'_>, n: usize) -> bool {
    let (rd, cd) = (reference.dtype(), candidate.dtype());
    let (rs, cs) = (element_bytes(rd), element_bytes(cd));
    let (rbytes, cbytes) = (reference.data(), candidate.data());
    if rd == cd {
        return rbytes == cbytes;
    }
    let mut a = vec![0i128; CHUNK.min(n)];
    let mut b = vec![0i128; CHUNK.min(n)];
    let mut start = 0;
    while start < n {
        let len = CHUNK.min(n - start);
        let end = start + len;
        decode_integer(rd, &rbytes[start * rs..end * rs], &mut a[..len]);
        decode_integer(cd, &cbytes[start * cs..end * cs], &mut b[..len]);
        if a[..len] != b[..len] {
            return false;
        }
        start = end;
    }
    true
}

/// Compares one reference tensor with its candidate counterpart.
fn compare_one(
    name: &str,
    reference: &TensorView<'_>,
    candidate: &TensorView<'_>,
) -> Result<TensorSqnr, EvalError> {
    if reference.shape() != candidate.shape() {
        return Err(EvalError::ShapeMismatch {
            tensor: name.to_string(),
            reference: reference.shape().to_vec(),
            candidate: candidate.shape().to_vec(),
        });
    }
    let (rk, ck) = (
        kind(reference.dtype(), name)?,
        kind(candidate.dtype(), name)?,
    );
    if rk != ck {
        return Err(EvalError::DtypeMismatch {
            tensor: name.to_string(),
            reference: format!("{:?}", reference.dtype()),
            candidate: format!("{:?}", candidate.dtype()),
        });
    }
    let params: usize = reference.shape().iter().product();
    // safetensors checks on parsing that each tensor's bytes match its shape
    // and dtype; re-check so a slice below can never be out of range.
    for (view, folder) in [(reference, "reference"), (candidate, "candidate")] {
        if view.data().len() != params * element_bytes(view.dtype()) {
            return Err(EvalError::ShapeMismatch {
                tensor: format!("{name} (byte length in the {folder})"),
                reference: reference.shape().to_vec(),
                candidate: candidate.shape().to_vec(),
            });
        }
    }
    let (sqnr_db, signal, noise) = match rk {
        Kind::Integer => {
            if !integers_equal(reference, candidate, params) {
                return Err(EvalError::IntegerMismatch {
                    tensor: name.to_string(),
                });
            }
            (None, 0.0, 0.0)
        }
        Kind::Float => {
            let (signal, noise) = float_energies(reference, candidate, params);
            (
                (noise != 0.0).then(|| 10.0 * (signal / noise).log10()),
                signal,
                noise,
            )
        }
    };
    Ok(TensorSqnr {
        name: name.to_string(),
        params,
        sqnr_db,
        signal,
        noise,
    })
}

/// Compares every tensor of the dense safetensors model in folder
/// `reference` with the same-named tensor in folder `candidate`.
///
/// Each folder's `*.safetensors` files (one `model.safetensors` or several
/// shards) are memory-mapped and read together. Every reference tensor must
/// exist in the candidate with the same shape; float tensors (F32, F16,
/// BF16, F64, in any mix) are compared as numbers, giving their SQNR;
/// integer tensors must hold equal values. Tensors only the candidate has
/// are ignored.
pub fn compare_tensors(reference: &Path, candidate: &Path) -> Result<TensorComparison, EvalError> {
    let reference_folder = MappedFolder::open(reference)?;
    let candidate_folder = MappedFolder::open(candidate)?;
    let reference_tensors = reference_folder.tensors()?;
    let candidate_tensors = candidate_folder.tensors()?;
    let tensors = reference_tensors
        .iter()
        .map(|(name, view)| {
            let other = candidate_tensors
                .get(name)
                .ok_or_else(|| EvalError::MissingTensor {
                    tensor: name.clone(),
                    candidate: candidate.to_path_buf(),
                })?;
            compare_one(name, view, other)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TensorComparison { tensors })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::model_dir;
    use hcx_kernels::rng::gaussian_vec;

    /// Writes `(name, dtype, shape, bytes)` tensors to `dir/file`.
    fn write(dir: &Path, file: &str, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(name, dtype, shape, bytes)| {
                (
                    name.to_string(),
                    TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(file)).unwrap();
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn f16_bytes(v: &[f32]) -> Vec<u8> {
        v.iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect()
    }

    fn bf16_bytes(v: &[f32]) -> Vec<u8> {
        v.iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect()
    }

    fn sqnr_of<'a>(cmp: &'a TensorComparison, name: &str) -> &'a TensorSqnr {
        cmp.tensors.iter().find(|t| t.name == name).unwrap()
    }

    #[test]
    fn encoder_linear_weights_are_recognised() {
        for yes in [
            "encoder.layer.0.attention.self.query.weight",
            "encoder.layer.5.attention.self.key.weight",
            "encoder.layer.11.attention.self.value.weight",
            "encoder.layer.2.attention.output.dense.weight",
            "encoder.layer.3.intermediate.dense.weight",
            "encoder.layer.4.output.dense.weight",
            "bert.encoder.layer.0.output.dense.weight",
        ] {
            assert!(is_encoder_linear_weight(yes), "{yes}");
        }
        for no in [
            "encoder.layer.0.attention.self.query.bias",
            "encoder.layer.0.attention.output.LayerNorm.weight",
            "encoder.layer.0.output.LayerNorm.weight",
            "encoder.layer.0.output.dense.bias",
            "encoder.layer.x.output.dense.weight",
            "encoder.layer..output.dense.weight",
            "xencoder.layer.0.output.dense.weight",
            "decoder.layer.0.output.dense.weight",
            "encoder.layer.0.output.dense.weight.extra",
            "embeddings.word_embeddings.weight",
            "pooler.dense.weight",
            "",
        ] {
            assert!(!is_encoder_linear_weight(no), "{no}");
        }
    }

    #[test]
    fn sqnr_matches_the_added_noise_across_dtypes_and_shards() {
        let reference = tempfile::tempdir().unwrap();
        let candidate = tempfile::tempdir().unwrap();
        let n = 4096;
        let w = gaussian_vec(1, n);
        let noise = gaussian_vec(2, n);
        let noisy: Vec<f32> = w.iter().zip(&noise).map(|(a, b)| a + 0.01 * b).collect();
        let ids: Vec<u8> = (0..8i64).flat_map(|i| i.to_le_bytes()).collect();
        let ids32: Vec<u8> = (0..8i32).flat_map(|i| i.to_le_bytes()).collect();
        write(
            reference.path(),
            "model-00001-of-00002.safetensors",
            &[
                ("a", Dtype::F32, vec![64, 64], f32_bytes(&w)),
                ("ids", Dtype::I64, vec![1, 8], ids.clone()),
            ],
        );
        write(
            reference.path(),
            "model-00002-of-00002.safetensors",
            &[
                ("b", Dtype::F32, vec![n], f32_bytes(&w)),
                ("c", Dtype::F32, vec![n], f32_bytes(&w)),
            ],
        );
        // The candidate is sharded differently and mixes dtypes.
        write(
            candidate.path(),
            "model.safetensors",
            &[
                ("a", Dtype::F32, vec![64, 64], f32_bytes(&noisy)),
                ("b", Dtype::F16, vec![n], f16_bytes(&w)),
                ("c", Dtype::BF16, vec![n], bf16_bytes(&w)),
                ("ids", Dtype::I32, vec![1, 8], ids32),
                ("extra", Dtype::F32, vec![1], f32_bytes(&[1.0])),
            ],
        );
        let cmp = compare_tensors(reference.path(), candidate.path()).unwrap();
        let names: Vec<&str> = cmp.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "ids"]);

        // SQNR of noise at 1% of a unit-variance signal: 40 dB.
        let a = sqnr_of(&cmp, "a");
        assert_eq!(a.params, n);
        let expected = 10.0
            * (w.iter().map(|x| (*x as f64).powi(2)).sum::<f64>()
                / noise
                    .iter()
                    .map(|x| (0.01 * *x as f64).powi(2))
                    .sum::<f64>())
            .log10();
        assert!((a.sqnr_db.unwrap() - expected).abs() < 0.01, "{a:?}");
        assert!((a.sqnr_db.unwrap() - 40.0).abs() < 0.5, "{a:?}");
        // f16 keeps 11 significant bits (~ 6.02 * 11 + 10.8 dB ≈ 77 dB for
        // Gaussians), bf16 8 (~ 59 dB).
        let b = sqnr_of(&cmp, "b").sqnr_db.unwrap();
        let c = sqnr_of(&cmp, "c").sqnr_db.unwrap();
        assert!((70.0..85.0).contains(&b), "f16 {b}");
        assert!((50.0..65.0).contains(&c), "bf16 {c}");
        assert_eq!(sqnr_of(&cmp, "ids").sqnr_db, None);

        let mean = cmp.weighted_mean_sqnr(|_| true).unwrap();
        let by_hand = (a.sqnr_db.unwrap() + b + c) / 3.0;
        assert!((mean - by_hand).abs() < 1e-9);
        assert_eq!(cmp.weighted_mean_sqnr(|name| name == "ids"), None);
        assert_eq!(cmp.weighted_mean_sqnr(|_| false), None);
        let json = serde_json::to_value(&cmp).unwrap();
        assert_eq!(json["tensors"][3]["sqnr_db"], serde_json::Value::Null);
    }

    #[test]
    fn weighted_mean_weighs_by_params() {
        let cmp = TensorComparison {
            tensors: vec![
                TensorSqnr {
                    name: "big".into(),
                    params: 300,
                    sqnr_db: Some(10.0),
                    signal: 100.0,
                    noise: 10.0,
                },
                TensorSqnr {
                    name: "small".into(),
                    params: 100,
                    sqnr_db: Some(30.0),
                    signal: 1.0,
                    noise: 0.001,
                },
                TensorSqnr {
                    name: "exact".into(),
                    params: 1000,
                    sqnr_db: None,
                    signal: 5.0,
                    noise: 0.0,
                },
            ],
        };
        assert_eq!(cmp.weighted_mean_sqnr(|_| true), Some(15.0));
        assert_eq!(cmp.weighted_mean_sqnr(|n| n != "big"), Some(30.0));
        assert_eq!(cmp.weighted_mean_sqnr(|n| n == "exact"), None);
        // Pooled: 10·log10(101 / 10.001), dominated by the big tensor.
        let pooled = cmp.pooled_sqnr(|_| true).unwrap();
        assert!((pooled - 10.0 * (101.0f64 / 10.001).log10()).abs() < 1e-12);
        assert_eq!(cmp.pooled_sqnr(|n| n == "exact"), None);
    }

    #[test]
    fn errors_name_the_tensor() {
        let reference = tempfile::tempdir().unwrap();
        write(
            reference.path(),
            "model.safetensors",
            &[
                ("w", Dtype::F32, vec![2, 3], f32_bytes(&[1.0; 6])),
                ("ids", Dtype::I64, vec![2], vec![0; 16]),
            ],
        );
        let run = |tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]| {
            let candidate = tempfile::tempdir().unwrap();
            write(candidate.path(), "model.safetensors", tensors);
            compare_tensors(reference.path(), candidate.path())
                .unwrap_err()
                .to_string()
        };
        let ids = ("ids", Dtype::I64, vec![2], vec![0; 16]);

        let missing = run(std::slice::from_ref(&ids));
        assert!(
            missing.contains("tensor `w`") && missing.contains("missing"),
            "{missing}"
        );

        let shape = run(&[
            ("w", Dtype::F32, vec![3, 2], f32_bytes(&[1.0; 6])),
            ids.clone(),
        ]);
        assert!(
            shape.contains("tensor `w`") && shape.contains("[2, 3]") && shape.contains("[3, 2]"),
            "{shape}"
        );

        let dtype = run(&[("w", Dtype::I32, vec![2, 3], vec![0; 24]), ids.clone()]);
        assert!(
            dtype.contains("tensor `w`") && dtype.contains("I32"),
            "{dtype}"
        );

        let mut changed = vec![0u8; 16];
        changed[8] = 1;
        let integer = run(&[
            ("w", Dtype::F32, vec![2, 3], f32_bytes(&[1.0; 6])),
            ("ids", Dtype::I64, vec![2], changed),
        ]);
        assert!(
            integer.contains("integer tensor `ids` differs"),
            "{integer}"
        );

        let unsupported = run(&[("w", Dtype::F8_E4M3, vec![2, 3], vec![0; 6]), ids.clone()]);
        assert!(
            unsupported.contains("tensor `w`") && unsupported.contains("F8_E4M3"),
            "{unsupported}"
        );
    }

    #[test]
    fn bad_folders_are_errors() {
        let empty = tempfile::tempdir().unwrap();
        let err = compare_tensors(empty.path(), empty.path()).unwrap_err();
        assert!(matches!(err, EvalError::NoSafetensors { .. }), "{err}");
        assert!(err.to_string().contains("no `*.safetensors` file in"));

        let missing = empty.path().join("nope");
        let err = compare_tensors(&missing, empty.path()).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");

        std::fs::write(empty.path().join("model.safetensors"), b"not safetensors").unwrap();
        let err = compare_tensors(empty.path(), empty.path()).unwrap_err();
        assert!(matches!(err, EvalError::Safetensors { .. }), "{err}");
        assert!(err.to_string().contains("model.safetensors"), "{err}");

        let dup = tempfile::tempdir().unwrap();
        for file in ["a.safetensors", "b.safetensors"] {
            write(
                dup.path(),
                file,
                &[("w", Dtype::F32, vec![1], f32_bytes(&[1.0]))],
            );
        }
        let err = compare_tensors(dup.path(), dup.path()).unwrap_err();
        assert!(
            err.to_string()
                .contains("tensor `w` appears in more than one"),
            "{err}"
        );
    }

    #[test]
    fn minilm_has_36_encoder_linear_weights_and_matches_itself() {
        let dir = model_dir();
        let cmp = compare_tensors(&dir, &dir).unwrap();
        assert!(cmp.tensors.iter().all(|t| t.sqnr_db.is_none()));
        assert_eq!(
            cmp.tensors
                .iter()
                .filter(|t| is_encoder_linear_weight(&t.name))
                .count(),
            36
        );
        assert_eq!(cmp.weighted_mean_sqnr(|_| true), None);
        let total: usize = cmp.tensors.iter().map(|t| t.params).sum();
        assert!(total > 22_000_000, "{total}");
    }
}
