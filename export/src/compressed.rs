//! compressed-tensors export: the `pack-quantized` safetensors layout vLLM
//! and Hugging Face transformers load.
//!
//! Every linear weight (a 2-D `*.weight` that is not an embedding) becomes
//! symmetric integer codes with one scale per group of its input dimension:
//! `NAME.weight_packed` (int32, `32 / bits` codes per word, the first in the
//! lowest bits, each stored as code + 2^(bits−1)), `NAME.weight_scale` (f16,
//! `[rows, cols / group]`) and `NAME.weight_shape` (int64 `[rows, cols]`);
//! `config.json` gains the `quantization_config` that names the scheme.
//! Every other tensor is written dense in its source dtype.
//!
//! The codes are found again from the artifact's decoded weights: each
//! group's scale is its largest magnitude over 2^(bits−1) − 1, rounded to
//! f16, as the `rtn` stage chooses it. For an artifact quantized by a
//! symmetric `rtn` with the same bits and group (and only lossless stages
//! after it) that recovers its codes and scales exactly, so the exported
//! weights equal ours; for any other chain the export is one more rounding,
//! which the report measures.

use std::collections::BTreeMap;
use std::path::Path;

use half::f16;
use hcx_pipeline::artifact;
use hcx_pipeline::model::parse_dtype;
use hcx_protocol::Manifest;
use rayon::prelude::*;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde_json::{Value as Json, json};

use crate::{ExportError, ExportReport, ExportedTensor, distance};

/// The tensor file an export writes in its output folder.
pub const FILE: &str = "model.safetensors";

/// The integer scheme of the packed weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheme {
    /// Bits per code: 4 or 8.
    pub bits: u8,
    /// Codes per scale along a row; `None`: one scale per row.
    pub group: Option<usize>,
}

impl Scheme {
    fn qmax(self) -> i32 {
        (1 << (self.bits - 1)) - 1
    }
}

/// Whether a tensor is a linear layer's weight (an `nn.Linear`, which the
/// scheme targets) rather than an embedding or a norm.
pub fn is_linear_weight(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && name.ends_with(".weight") && !name.contains("embed")
}

/// The scheme the artifact's own integer quantizer used on its linear
/// weights (`bits`, `group` and `symmetric` of their `rtn` steps), when
/// they all share one.
pub fn artifact_scheme(m: &Manifest) -> Result<Scheme, String> {
    let mut seen: BTreeMap<(u64, u64), usize> = BTreeMap::new();
    for t in m
        .tensors
        .iter()
        .filter(|t| is_linear_weight(&t.name, &t.shape))
    {
        let Some(step) = t.steps.iter().find(|s| s.spec.kind() == "rtn") else {
            return Err(format!(
                "linear weight `{}` was not quantized by `rtn`",
                t.name
            ));
        };
        let codec = &step.meta["codec"];
        let (Some(bits), Some(group)) = (codec["bits"].as_u64(), codec["group"].as_u64()) else {
            return Err(format!(
                "`{}`: its rtn step records no bits or group",
                t.name
            ));
        };
        if codec["symmetric"] != true {
            return Err(format!("`{}` was quantized asymmetrically", t.name));
        }
        let cols = t.shape[1] as u64;
        *seen
            .entry((bits, if group == cols { 0 } else { group }))
            .or_default() += 1;
    }
    match seen.len() {
        0 => Err("the artifact has no linear weight".into()),
        1 => {
            let (bits, group) = *seen.keys().next().unwrap_or(&(0, 0));
            Ok(Scheme {
                bits: bits as u8,
                group: (group > 0).then_some(group as usize),
            })
        }
        _ => Err(format!(
            "its linear weights use {} different rtn schemes",
            seen.len()
        )),
    }
}

/// Symmetric codes (−qmax..=qmax) and f16 scales of `rows × cols` values
/// in groups of `group` along each row.
pub fn quantize(values: &[f32], cols: usize, group: usize, qmax: i32) -> (Vec<i8>, Vec<f16>) {
    let scales: Vec<f16> = values
        .par_chunks(group)
        .map(|g| {
            let amax = g.iter().fold(0f32, |m, x| m.max(x.abs()));
            f16::from_f32(amax / qmax as f32)
        })
        .collect();
    let mut codes = vec![0i8; values.len()];
    codes
        .par_chunks_mut(group)
        .zip(values.par_chunks(group))
        .zip(scales.par_iter())
        .for_each(|((c, g), s)| {
            let s = s.to_f32();
            let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
            for (c, x) in c.iter_mut().zip(g) {
                *c = (x * inv).round().clamp(-qmax as f32, qmax as f32) as i8;
            }
        });
    debug_assert_eq!(values.len() % cols, 0);
    (codes, scales)
}

/// Packs codes of `bits` into int32 words along each row of `cols`: code
/// `i` of a word at bits `bits·i`, each offset by 2^(bits−1); a row's last
/// word is padded with zeros.
pub fn pack(codes: &[i8], cols: usize, bits: u8) -> Vec<i32> {
    let per = 32 / bits as usize;
    let words = cols.div_ceil(per);
    let offset = 1i32 << (bits - 1);
    let mask = (1u32 << bits) - 1;
    let mut out = vec![0i32; codes.len() / cols * words];
    out.par_chunks_mut(words)
        .zip(codes.par_chunks(cols))
        .for_each(|(w, row)| {
            for (i, c) in row.iter().enumerate() {
                let u = ((*c as i32 + offset) as u32) & mask;
                w[i / per] |= (u << (bits as usize * (i % per))) as i32;
            }
        });
    out
}

/// Unpacks [`pack`]'s words back to codes (for tests and checks).
pub fn unpack(words: &[i32], cols: usize, bits: u8) -> Vec<i8> {
    let per = 32 / bits as usize;
    let per_row = cols.div_ceil(per);
    let offset = 1i32 << (bits - 1);
    let mask = (1u32 << bits) - 1;
    let mut out = Vec::with_capacity(words.len() / per_row.max(1) * cols);
    for row in words.chunks(per_row) {
        for i in 0..cols {
            let u = ((row[i / per] as u32) >> (bits as usize * (i % per))) & mask;
            out.push((u as i32 - offset) as i8);
        }
    }
    out
}

fn unsupported(path: &Path, why: impl Into<String>) -> ExportError {
    ExportError::Unsupported {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

/// One tensor's bytes as written.
struct Written {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn le_bytes<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|x| f(*x)).collect()
}

/// Writes `artifact` in compressed-tensors' `pack-quantized` layout into
/// `output` (which must not exist or be empty): `model.safetensors`, the
/// artifact's config with its `quantization_config`, and every other file
/// the artifact carries (tokenizer and the like). `scheme` defaults to the
/// artifact's own (see [`artifact_scheme`]).
pub fn export(
    artifact_dir: &Path,
    output: &Path,
    scheme: Option<Scheme>,
) -> Result<ExportReport, ExportError> {
    let m = artifact::read_manifest(artifact_dir)?;
    artifact::verify(artifact_dir, &m)?;
    let scheme = match scheme {
        Some(s) => s,
        None => artifact_scheme(&m).map_err(|why| {
            unsupported(
                artifact_dir,
                format!("no scheme to export with: {why}; give --ct-bits and --ct-group"),
            )
        })?,
    };
    if scheme.bits != 4 && scheme.bits != 8 {
        return Err(unsupported(
            artifact_dir,
            format!("{} bits: compressed-tensors packs 4 or 8", scheme.bits),
        ));
    }
    let config_path = artifact_dir.join("config.json");
    let mut config: Json = serde_json::from_str(
        &std::fs::read_to_string(&config_path)
            .map_err(|e| ExportError::io(&config_path, "cannot read", e))?,
    )
    .map_err(|e| unsupported(&config_path, format!("not JSON: {e}")))?;

    let results: Vec<(Vec<Written>, ExportedTensor)> = m
        .tensors
        .par_iter()
        .map(|t| {
            let err = |why: String| ExportError::Tensor {
                tensor: t.name.clone(),
                why,
            };
            let dtype = parse_dtype(&t.dtype).ok_or_else(|| err(format!("dtype {}", t.dtype)))?;
            if !is_linear_weight(&t.name, &t.shape) {
                let data = artifact::decode_bytes(artifact_dir, &m, &t.name)?;
                let bytes = data.len() as u64;
                return Ok((
                    vec![Written {
                        name: t.name.clone(),
                        dtype,
                        shape: t.shape.clone(),
                        data,
                    }],
                    ExportedTensor {
                        name: t.name.clone(),
                        exported_name: t.name.clone(),
                        encoding: t.dtype.clone(),
                        bytes,
                        max_abs_error: 0.0,
                        sqnr_db: None,
                    },
                ));
            }
            let values = artifact::decode_values(artifact_dir, &m, &t.name)?;
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let group = scheme.group.unwrap_or(cols);
            if group == 0 || !cols.is_multiple_of(group) {
                return Err(err(format!(
                    "rows of {cols} do not split into groups of {group}"
                )));
            }
            let (codes, scales) = quantize(&values, cols, group, scheme.qmax());
            let back: Vec<f32> = codes
                .chunks(group)
                .zip(&scales)
                .flat_map(|(c, s)| c.iter().map(move |q| f32::from(*q) * s.to_f32()))
                .collect();
            let (max_abs_error, sqnr_db) = distance(&values, &back);
            let packed = pack(&codes, cols, scheme.bits);
            let base = t.name.strip_suffix(".weight").unwrap_or(&t.name);
            let written = vec![
                Written {
                    name: format!("{base}.weight_packed"),
                    dtype: Dtype::I32,
                    shape: vec![rows, cols.div_ceil(32 / scheme.bits as usize)],
                    data: le_bytes(&packed, i32::to_le_bytes),
                },
                Written {
                    name: format!("{base}.weight_scale"),
                    dtype: Dtype::F16,
                    shape: vec![rows, cols / group],
                    data: le_bytes(&scales, f16::to_le_bytes),
                },
                Written {
                    name: format!("{base}.weight_shape"),
                    dtype: Dtype::I64,
                    shape: vec![2],
                    data: le_bytes(&[rows as i64, cols as i64], i64::to_le_bytes),
                },
            ];
            let bytes = written.iter().map(|w| w.data.len() as u64).sum();
            Ok((
                written,
                ExportedTensor {
                    name: t.name.clone(),
                    exported_name: format!("{base}.weight_packed"),
                    encoding: format!("int{}", scheme.bits),
                    bytes,
                    max_abs_error,
                    sqnr_db,
                },
            ))
        })
        .collect::<Result<_, ExportError>>()?;

    let weights = json!({
        "num_bits": scheme.bits,
        "type": "int",
        "symmetric": true,
        "strategy": if scheme.group.is_some() { "group" } else { "channel" },
        "group_size": scheme.group,
        "dynamic": false,
        "actorder": null,
        "observer": "minmax",
        "observer_kwargs": {},
    });
    config["quantization_config"] = json!({
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": null,
                "output_activations": null,
                "format": "pack-quantized",
            }
        },
        "ignore": [],
        "kv_cache_scheme": null,
        "global_compression_ratio": null,
    });

    crate::require_empty(output)?;
    let parent = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "export".into());
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| ExportError::io(&tmp, "cannot create", e))?;
    let mut views = Vec::new();
    for w in results.iter().flat_map(|(w, _)| w) {
        let v = TensorView::new(w.dtype, w.shape.clone(), &w.data).map_err(|e| {
            ExportError::Tensor {
                tensor: w.name.clone(),
                why: e.to_string(),
            }
        })?;
        views.push((w.name.clone(), v));
    }
    let file = tmp.join(FILE);
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(views, Some(meta), &file).map_err(|e| ExportError::Io {
        path: file.clone(),
        what: "cannot write",
        source: std::io::Error::other(e.to_string()),
    })?;
    let config_out = tmp.join("config.json");
    let text = serde_json::to_string_pretty(&config).unwrap_or_default() + "\n";
    std::fs::write(&config_out, text)
        .map_err(|e| ExportError::io(&config_out, "cannot write", e))?;
    for f in &m.source.copied {
        if f.name == "config.json" {
            continue;
        }
        let (from, to) = (artifact_dir.join(&f.name), tmp.join(&f.name));
        std::fs::copy(&from, &to).map_err(|e| ExportError::io(&from, "cannot copy", e))?;
    }
    if output.exists() {
        std::fs::remove_dir(output).map_err(|e| ExportError::io(output, "cannot replace", e))?;
    }
    std::fs::rename(&tmp, output).map_err(|e| ExportError::io(output, "cannot rename", e))?;
    let file = output.join(FILE);
    let bytes = std::fs::metadata(&file)
        .map_err(|e| ExportError::io(&file, "cannot stat", e))?
        .len();
    Ok(ExportReport {
        file,
        bytes,
        tensors: results.into_iter().map(|(_, r)| r).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn packing_round_trips(bits in prop::sample::select(vec![4u8, 8]), rows in 1usize..4, cols in 1usize..40, seed in any::<u64>()) {
            let qmax = (1i32 << (bits - 1)) - 1;
            let mut s = seed | 1;
            let codes: Vec<i8> = (0..rows * cols)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    ((s % (2 * qmax as u64 + 2)) as i32 - qmax - 1) as i8
                })
                .collect();
            let words = pack(&codes, cols, bits);
            prop_assert_eq!(words.len(), rows * cols.div_ceil(32 / bits as usize));
            prop_assert_eq!(unpack(&words, cols, bits), codes);
        }
    }

    #[test]
    fn the_first_code_sits_in_the_lowest_bits_offset_to_unsigned() {
        // int4 codes [1, 2] → 9 | 10 << 4, the rest of the word the offset
        // zero codes would not be: padding is zero.
        assert_eq!(pack(&[1, 2], 2, 4), vec![9 | (10 << 4)]);
        // int8 [−128 + 1, 2] → 1 | 130 << 8.
        assert_eq!(pack(&[-127, 2], 2, 8), vec![1 | (130 << 8)]);
    }

    #[test]
    fn weights_on_an_rtn_grid_come_back_exactly() {
        // Values k·s with an f16 scale s and the group's largest |k| = qmax.
        let qmax = 7;
        let s = f16::from_f32(0.0123).to_f32();
        let ks = [7, -3, 0, 5, -7, 1, 2, -1];
        let values: Vec<f32> = ks.iter().map(|k| *k as f32 * s).collect();
        let (codes, scales) = quantize(&values, 8, 8, qmax);
        assert_eq!(scales, vec![f16::from_f32(s)]);
        assert_eq!(codes, ks.map(|k| k as i8).to_vec());
    }

    #[test]
    fn linear_weights_are_told_from_embeddings_and_norms() {
        assert!(is_linear_weight(
            "model.layers.0.mlp.up_proj.weight",
            &[8, 4]
        ));
        assert!(is_linear_weight(
            "encoder.layer.0.attention.self.query.weight",
            &[8, 4]
        ));
        assert!(!is_linear_weight("model.embed_tokens.weight", &[8, 4]));
        assert!(!is_linear_weight(
            "embeddings.word_embeddings.weight",
            &[8, 4]
        ));
        assert!(!is_linear_weight("model.norm.weight", &[8]));
        assert!(!is_linear_weight(
            "encoder.layer.0.attention.self.query.bias",
            &[8]
        ));
    }
}
