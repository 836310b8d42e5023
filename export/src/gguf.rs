//! GGUF export for Llama-family decoders, the file llama.cpp runs.
//!
//! Every tensor is decoded from the artifact, renamed to llama.cpp's name
//! (q and k rows permuted back to llama.cpp's interleaved rotary order) and
//! encoded with candle's ggml block encoders: 2-D weights in the chosen
//! block type, falling back to Q8_0 (and then F32) for a tensor whose rows
//! do not split into that type's blocks; 1-D tensors (norms, biases) as F32.
//! The metadata holds the hyperparameters from the artifact's
//! `config.json` and the byte-level BPE vocabulary, token types and merges
//! from its `tokenizer.json` (and the chat template from
//! `tokenizer_config.json` when the artifact carries one).

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::str::FromStr;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use hcx_pipeline::artifact;
use hcx_pipeline::gguf::{gguf_name, permute_rows};
use rayon::prelude::*;
use serde_json::Value as Json;

use crate::{ExportError, ExportReport, ExportedTensor, distance};

/// The file an export writes in its output folder.
pub const FILE: &str = "model.gguf";

/// The ggml block type of the exported 2-D weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockType {
    /// 8-bit, blocks of 32 with an f16 scale (8.5 bits per weight).
    Q8_0,
    /// 4-bit, blocks of 32 with an f16 scale (4.5 bits per weight).
    Q4_0,
    /// 4-bit k-quant, super-blocks of 256 (4.5 bits per weight).
    Q4K,
    /// 6-bit k-quant, super-blocks of 256 (6.56 bits per weight).
    Q6K,
}

impl BlockType {
    /// Every block type, as the command line names them.
    pub const NAMES: &[&str] = &["q8_0", "q4_0", "q4_k", "q6_k"];

    fn ggml(self) -> GgmlDType {
        match self {
            BlockType::Q8_0 => GgmlDType::Q8_0,
            BlockType::Q4_0 => GgmlDType::Q4_0,
            BlockType::Q4K => GgmlDType::Q4K,
            BlockType::Q6K => GgmlDType::Q6K,
        }
    }

    /// llama.cpp's `general.file_type` for a file mostly of this type.
    fn file_type(self) -> u32 {
        match self {
            BlockType::Q8_0 => 7,
            BlockType::Q4_0 => 2,
            BlockType::Q4K => 14,
            BlockType::Q6K => 18,
        }
    }
}

impl FromStr for BlockType {
    type Err = String;
    fn from_str(s: &str) -> Result<BlockType, String> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" => Ok(BlockType::Q8_0),
            "q4_0" => Ok(BlockType::Q4_0),
            "q4_k" => Ok(BlockType::Q4K),
            "q6_k" => Ok(BlockType::Q6K),
            _ => Err(format!(
                "unknown GGUF block type `{s}` (known: {})",
                BlockType::NAMES.join(", ")
            )),
        }
    }
}

fn unsupported(path: &Path, why: impl Into<String>) -> ExportError {
    ExportError::Unsupported {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

fn read_json(path: &Path) -> Result<Json, ExportError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| ExportError::io(path, "cannot read", e))?;
    serde_json::from_str(&text).map_err(|e| unsupported(path, format!("not JSON: {e}")))
}

/// The hyperparameters of a Llama config, as llama.cpp's metadata.
struct Hyper {
    layers: u32,
    hidden: u32,
    ffn: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    eps: f32,
    rope_theta: f32,
    context: u32,
    vocab: u32,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
}

impl Hyper {
    fn read(path: &Path, c: &Json) -> Result<Hyper, ExportError> {
        let llama = c["model_type"] == "llama"
            || c["architectures"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == "LlamaForCausalLM"));
        if !llama {
            return Err(unsupported(
                path,
                format!(
                    "GGUF export covers Llama-family decoders; this model's `model_type` is {}",
                    c["model_type"]
                ),
            ));
        }
        let int = |key: &str| -> Result<u32, ExportError> {
            c[key]
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| unsupported(path, format!("`{key}` is missing or not an integer")))
        };
        let float = |key: &str, default: Option<f64>| -> Result<f32, ExportError> {
            c[key]
                .as_f64()
                .or(default)
                .map(|v| v as f32)
                .ok_or_else(|| unsupported(path, format!("`{key}` is missing or not a number")))
        };
        let opt = |key: &str| c[key].as_u64().and_then(|v| u32::try_from(v).ok());
        let heads = int("num_attention_heads")?;
        let hidden = int("hidden_size")?;
        if heads == 0 || !hidden.is_multiple_of(heads) {
            return Err(unsupported(
                path,
                format!("hidden_size {hidden} does not split into {heads} heads"),
            ));
        }
        Ok(Hyper {
            layers: int("num_hidden_layers")?,
            hidden,
            ffn: int("intermediate_size")?,
            heads,
            kv_heads: opt("num_key_value_heads").unwrap_or(heads),
            head_dim: opt("head_dim").unwrap_or(hidden / heads),
            eps: float("rms_norm_eps", None)?,
            rope_theta: float("rope_theta", Some(10_000.0))?,
            context: opt("max_position_embeddings").unwrap_or(2048),
            vocab: int("vocab_size")?,
            bos: opt("bos_token_id"),
            eos: opt("eos_token_id"),
            pad: opt("pad_token_id"),
        })
    }
}

/// A byte-level BPE vocabulary as llama.cpp's metadata.
#[derive(Debug, PartialEq)]
pub struct Vocabulary {
    /// Every token, by id.
    pub tokens: Vec<String>,
    /// llama.cpp's token type of each (1 normal, 3 control, 4 user-defined).
    pub types: Vec<i32>,
    /// The merges, `a b` each.
    pub merges: Vec<String>,
    /// llama.cpp's pre-tokenizer name (`gpt2`, `smollm`).
    pub pre: String,
}

/// Reads a `tokenizer.json` holding a byte-level BPE model.
pub fn vocabulary(path: &Path, t: &Json) -> Result<Vocabulary, ExportError> {
    let model = &t["model"];
    if model["type"] != "BPE" {
        return Err(unsupported(
            path,
            format!(
                "GGUF export covers byte-level BPE tokenizers; `model.type` is {}",
                model["type"]
            ),
        ));
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| unsupported(path, "`model.vocab` is not a map"))?;
    let mut by_id: Vec<Option<String>> = vec![None; vocab.len()];
    let mut place = |token: &str, id: Option<u64>| -> Result<(), ExportError> {
        let id = id
            .and_then(|i| usize::try_from(i).ok())
            .ok_or_else(|| unsupported(path, format!("token {token:?} has no integer id")))?;
        if id >= by_id.len() {
            by_id.resize(id + 1, None);
        }
        by_id[id] = Some(token.to_string());
        Ok(())
    };
    for (token, id) in vocab {
        place(token, id.as_u64())?;
    }
    let added = t["added_tokens"].as_array().cloned().unwrap_or_default();
    for a in &added {
        let content = a["content"]
            .as_str()
            .ok_or_else(|| unsupported(path, "an added token has no `content`"))?;
        place(content, a["id"].as_u64())?;
    }
    let tokens = by_id
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.ok_or_else(|| unsupported(path, format!("no token has id {i}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let mut types = vec![1i32; tokens.len()];
    for a in &added {
        if let Some(id) = a["id"].as_u64().and_then(|i| usize::try_from(i).ok()) {
            types[id] = if a["special"] == true { 3 } else { 4 };
        }
    }
    let merges = model["merges"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|x| match x {
                    Json::String(s) => Some(s.clone()),
                    Json::Array(p) if p.len() == 2 => {
                        Some(format!("{} {}", p[0].as_str()?, p[1].as_str()?))
                    }
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| unsupported(path, "a merge is neither `a b` nor [a, b]"))
        })
        .transpose()?
        .unwrap_or_default();
    let pre = &t["pre_tokenizer"];
    let is_byte_level = |p: &Json| p["type"] == "ByteLevel";
    let pre = if is_byte_level(pre) {
        "gpt2"
    } else if pre["type"] == "Sequence"
        && pre["pretokenizers"].as_array().is_some_and(|s| {
            s.len() == 2
                && s[0]["type"] == "Digits"
                && s[0]["individual_digits"] == true
                && is_byte_level(&s[1])
        })
    {
        "smollm"
    } else {
        return Err(unsupported(
            path,
            format!(
                "pre-tokenizer {} has no llama.cpp name (known: ByteLevel as gpt2, Digits then ByteLevel as smollm)",
                pre["type"]
            ),
        ));
    };
    Ok(Vocabulary {
        tokens,
        types,
        merges,
        pre: pre.to_string(),
    })
}

/// The ggml type a tensor of `shape` is written in: 1-D as F32, 2-D in
/// `block` when its rows split into `block`'s blocks, else Q8_0, else F32.
pub fn encoding_for(shape: &[usize], block: BlockType) -> GgmlDType {
    let cols = shape.last().copied().unwrap_or(0);
    if shape.len() < 2 {
        return GgmlDType::F32;
    }
    [block.ggml(), GgmlDType::Q8_0]
        .into_iter()
        .find(|t| cols > 0 && cols.is_multiple_of(t.block_size()))
        .unwrap_or(GgmlDType::F32)
}

fn strings(v: &[String]) -> Value {
    Value::Array(v.iter().cloned().map(Value::String).collect())
}

/// Writes `artifact` as `output/model.gguf` with its 2-D weights in
/// `block`; `output` must not exist or be empty.
pub fn export(
    artifact_dir: &Path,
    output: &Path,
    block: BlockType,
) -> Result<ExportReport, ExportError> {
    let m = artifact::read_manifest(artifact_dir)?;
    artifact::verify(artifact_dir, &m)?;
    let config_path = artifact_dir.join("config.json");
    let hp = Hyper::read(&config_path, &read_json(&config_path)?)?;
    let tok_path = artifact_dir.join("tokenizer.json");
    let vocab = vocabulary(&tok_path, &read_json(&tok_path)?)?;
    let chat_template = {
        let p = artifact_dir.join("tokenizer_config.json");
        if p.is_file() {
            read_json(&p)?["chat_template"].as_str().map(String::from)
        } else {
            None
        }
    };
    let mut named = Vec::with_capacity(m.tensors.len());
    for t in &m.tensors {
        let g = gguf_name(&t.name).ok_or_else(|| {
            unsupported(
                artifact_dir,
                format!("tensor `{}` has no llama.cpp name", t.name),
            )
        })?;
        named.push((t, g));
    }
    // Decode and encode tensor by tensor in parallel; each holds its f32
    // values only while it is encoded.
    let encoded: Vec<(QTensor, ExportedTensor)> = named
        .par_iter()
        .map(|(t, g)| {
            let err = |why: String| ExportError::Tensor {
                tensor: t.name.clone(),
                why,
            };
            let mut values = artifact::decode_values(artifact_dir, &m, &t.name)?;
            let heads = if g.contains(".attn_q.") {
                Some(hp.heads as usize)
            } else if g.contains(".attn_k.") {
                Some(hp.kv_heads as usize)
            } else {
                None
            };
            if let Some(h) = heads {
                let rows = t.shape[0];
                let cols = values.len() / rows.max(1);
                if h == 0 || !rows.is_multiple_of(2 * h) {
                    return Err(err(format!(
                        "{rows} rows do not split into {h} heads of rotary pairs"
                    )));
                }
                values = permute_rows(&values, rows, cols, h);
            }
            let dtype = encoding_for(&t.shape, block);
            let dense = Tensor::from_vec(values, t.shape.as_slice(), &Device::Cpu)
                .map_err(|e| err(e.to_string()))?;
            let q = QTensor::quantize(&dense, dtype).map_err(|e| err(e.to_string()))?;
            let back = q
                .dequantize(&Device::Cpu)
                .and_then(|d| d.flatten_all())
                .and_then(|d| d.to_vec1::<f32>())
                .map_err(|e| err(e.to_string()))?;
            let ours = dense
                .flatten_all()
                .and_then(|d| d.to_vec1::<f32>())
                .map_err(|e| err(e.to_string()))?;
            let (max_abs_error, sqnr_db) = distance(&ours, &back);
            let report = ExportedTensor {
                name: t.name.clone(),
                exported_name: g.clone(),
                encoding: format!("{dtype:?}"),
                bytes: q.storage_size_in_bytes() as u64,
                max_abs_error,
                sqnr_db,
            };
            Ok((q, report))
        })
        .collect::<Result<_, ExportError>>()?;

    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.name".into(), Value::String(m.job.name.clone())),
        ("general.file_type".into(), Value::U32(block.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        ("llama.context_length".into(), Value::U32(hp.context)),
        ("llama.embedding_length".into(), Value::U32(hp.hidden)),
        ("llama.block_count".into(), Value::U32(hp.layers)),
        ("llama.feed_forward_length".into(), Value::U32(hp.ffn)),
        ("llama.attention.head_count".into(), Value::U32(hp.heads)),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(hp.kv_heads),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(hp.eps),
        ),
        ("llama.rope.freq_base".into(), Value::F32(hp.rope_theta)),
        ("llama.rope.dimension_count".into(), Value::U32(hp.head_dim)),
        ("llama.vocab_size".into(), Value::U32(hp.vocab)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        (
            "tokenizer.ggml.pre".into(),
            Value::String(vocab.pre.clone()),
        ),
        ("tokenizer.ggml.tokens".into(), strings(&vocab.tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(vocab.types.iter().map(|t| Value::I32(*t)).collect()),
        ),
        ("tokenizer.ggml.merges".into(), strings(&vocab.merges)),
    ];
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", hp.bos),
        ("tokenizer.ggml.eos_token_id", hp.eos),
        ("tokenizer.ggml.padding_token_id", hp.pad),
    ] {
        if let Some(id) = id {
            md.push((key.into(), Value::U32(id)));
        }
    }
    if let Some(t) = chat_template {
        md.push(("tokenizer.chat_template".into(), Value::String(t)));
    }

    crate::require_empty(output)?;
    std::fs::create_dir_all(output).map_err(|e| ExportError::io(output, "cannot create", e))?;
    let file = output.join(FILE);
    let partial = output.join(format!(".{FILE}.partial"));
    {
        let f =
            File::create(&partial).map_err(|e| ExportError::io(&partial, "cannot create", e))?;
        let mut w = BufWriter::new(f);
        let meta: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensors: Vec<(&str, &QTensor)> = encoded
            .iter()
            .map(|(q, r)| (r.exported_name.as_str(), q))
            .collect();
        candle_core::quantized::gguf_file::write(&mut w, &meta, &tensors).map_err(|e| {
            ExportError::Io {
                path: partial.clone(),
                what: "cannot write",
                source: std::io::Error::other(e.to_string()),
            }
        })?;
        let f = w
            .into_inner()
            .map_err(|e| ExportError::io(&partial, "cannot write", e.into_error()))?;
        f.sync_all()
            .map_err(|e| ExportError::io(&partial, "cannot sync", e))?;
    }
    std::fs::rename(&partial, &file).map_err(|e| ExportError::io(&file, "cannot rename", e))?;
    let bytes = std::fs::metadata(&file)
        .map_err(|e| ExportError::io(&file, "cannot stat", e))?
        .len();
    Ok(ExportReport {
        file,
        bytes,
        tensors: encoded.into_iter().map(|(_, r)| r).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn block_types_parse_and_fall_back_where_rows_do_not_split() {
        for n in BlockType::NAMES {
            assert!(n.parse::<BlockType>().is_ok(), "{n}");
        }
        let e = "q3_k".parse::<BlockType>().unwrap_err();
        assert!(e.contains("q3_k") && e.contains("q8_0"), "{e}");
        assert_eq!(encoding_for(&[576], BlockType::Q4K), GgmlDType::F32);
        assert_eq!(encoding_for(&[8, 512], BlockType::Q4K), GgmlDType::Q4K);
        // SmolLM2's rows of 576 do not split into super-blocks of 256.
        assert_eq!(encoding_for(&[8, 576], BlockType::Q6K), GgmlDType::Q8_0);
        assert_eq!(encoding_for(&[8, 576], BlockType::Q4_0), GgmlDType::Q4_0);
        assert_eq!(encoding_for(&[8, 20], BlockType::Q8_0), GgmlDType::F32);
    }

    fn tokenizer(pre: Json) -> Json {
        json!({
            "added_tokens": [
                {"id": 0, "content": "<|endoftext|>", "special": true},
                {"id": 3, "content": "<tool>", "special": false},
            ],
            "pre_tokenizer": pre,
            "model": {
                "type": "BPE",
                "vocab": {"<|endoftext|>": 0, "a": 1, "b": 2, "<tool>": 3, "ab": 4},
                "merges": ["a b"],
            }
        })
    }

    #[test]
    fn a_bpe_tokenizer_becomes_llama_cpp_metadata() {
        let p = Path::new("tokenizer.json");
        let v = vocabulary(p, &tokenizer(json!({"type": "ByteLevel"}))).unwrap();
        assert_eq!(v.tokens, ["<|endoftext|>", "a", "b", "<tool>", "ab"]);
        assert_eq!(v.types, [3, 1, 1, 4, 1]);
        assert_eq!(v.merges, ["a b"]);
        assert_eq!(v.pre, "gpt2");
        let smollm = json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, {"type": "ByteLevel"}
        ]});
        assert_eq!(vocabulary(p, &tokenizer(smollm)).unwrap().pre, "smollm");
        // Merges as pairs, as newer tokenizers write them.
        let mut t = tokenizer(json!({"type": "ByteLevel"}));
        t["model"]["merges"] = json!([["a", "b"]]);
        assert_eq!(vocabulary(p, &t).unwrap().merges, ["a b"]);
    }

    #[test]
    fn tokenizers_it_cannot_name_are_refused_with_the_reason() {
        let p = Path::new("tokenizer.json");
        let mut t = tokenizer(json!({"type": "Whitespace"}));
        let e = vocabulary(p, &t).unwrap_err().to_string();
        assert!(
            e.contains("tokenizer.json") && e.contains("Whitespace"),
            "{e}"
        );
        t["model"]["type"] = json!("WordPiece");
        let e = vocabulary(p, &t).unwrap_err().to_string();
        assert!(e.contains("WordPiece"), "{e}");
        // A hole in the ids.
        let mut t = tokenizer(json!({"type": "ByteLevel"}));
        t["model"]["vocab"] = json!({"a": 0, "b": 2});
        t["added_tokens"] = json!([]);
        let e = vocabulary(p, &t).unwrap_err().to_string();
        assert!(e.contains("id 1"), "{e}");
    }

    #[test]
    fn a_config_that_is_not_llama_is_refused_by_name() {
        let p = Path::new("config.json");
        let e = Hyper::read(p, &json!({"model_type": "bert"}))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("config.json") && e.contains("bert"), "{e}");
        let e = Hyper::read(p, &json!({"model_type": "llama", "hidden_size": 64}))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("num_attention_heads"), "{e}");
    }
}
