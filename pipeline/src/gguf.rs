//! Reading a Llama-family GGUF file (llama.cpp's format) as a source model.
//!
//! Every tensor is dequantized to f32 (candle's GGUF reader and ggml block
//! decoders) and renamed to its Hugging Face name, undoing the row
//! permutation llama.cpp's converter applies to the query and key
//! projections, so that the model looks exactly like the HF folder it was
//! converted from. `config.json` is rebuilt from the GGUF metadata and
//! `tokenizer.json` from its vocabulary and merges, so a decompressed
//! artifact is a standard HF folder.
//!
//! The dequantized values are the reference: a GGUF already quantized (the
//! test decoder is Q4_1) is measured against its own f32 expansion.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::Device;
use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::{Value as Json, json};

use crate::PipelineError;

/// One dequantized tensor under its HF name.
#[derive(Debug)]
pub struct GgufTensor {
    /// HF name (`model.layers.0.self_attn.q_proj.weight`).
    pub name: String,
    /// Shape in HF order (`[out_features, in_features]` for a linear weight).
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub values: Vec<f32>,
    /// Bytes the tensor takes in the GGUF file, as stored (quantized).
    pub stored_bytes: u64,
}

/// A GGUF file read in full: tensors, and the HF files made from its metadata.
#[derive(Debug)]
pub struct GgufModel {
    /// Every tensor, sorted by HF name.
    pub tensors: Vec<GgufTensor>,
    /// `config.json` (pretty JSON).
    pub config_json: String,
    /// `tokenizer.json` (JSON), when the file holds a BPE vocabulary.
    pub tokenizer_json: Option<String>,
}

fn bad(path: &Path, why: impl Into<String>) -> PipelineError {
    PipelineError::Model {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

/// The architectures whose tensor names and layout this reader knows.
pub const ARCHITECTURES: &[&str] = &["llama"];

/// Reads and dequantizes a GGUF file.
pub fn read(path: &Path) -> Result<GgufModel, PipelineError> {
    let file = File::open(path).map_err(|e| PipelineError::io(path, "cannot open", e))?;
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader).map_err(|e| {
        bad(
            path,
            format!(
                "not a GGUF file this build can read: {e} (tensor types read: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q8_K)"
            ),
        )
    })?;
    let md = &content.metadata;
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| bad(path, "no `general.architecture` in the metadata"))?;
    if !ARCHITECTURES.contains(&arch.as_str()) {
        return Err(bad(
            path,
            format!(
                "architecture `{arch}` is not supported (supported: {})",
                ARCHITECTURES.join(", ")
            ),
        ));
    }
    let hp = Hyper::read(path, md, &arch)?;
    let mut tensors = Vec::with_capacity(content.tensor_infos.len());
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for gname in names {
        let info = &content.tensor_infos[gname];
        let Some(name) = hf_name(gname) else {
            if gname == "rope_freqs.weight" {
                // llama-3 rope scaling factors: derived from config, not a weight.
                continue;
            }
            return Err(bad(
                path,
                format!("tensor `{gname}` has no Hugging Face name this reader knows"),
            ));
        };
        let q = content
            .tensor(&mut reader, gname, &Device::Cpu)
            .map_err(|e| bad(path, format!("tensor `{gname}`: {e}")))?;
        let stored_bytes = q.storage_size_in_bytes() as u64;
        let t = q
            .dequantize(&Device::Cpu)
            .map_err(|e| bad(path, format!("tensor `{gname}`: cannot dequantize: {e}")))?;
        let shape = t.dims().to_vec();
        let mut values = t
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| bad(path, format!("tensor `{gname}`: {e}")))?;
        if values.iter().any(|v| !v.is_finite()) {
            return Err(bad(
                path,
                format!("tensor `{gname}` holds values that are not finite"),
            ));
        }
        let heads = if gname.contains(".attn_q.") {
            Some(hp.heads)
        } else if gname.contains(".attn_k.") {
            Some(hp.kv_heads)
        } else {
            None
        };
        if let Some(h) = heads {
            let rows = shape[0];
            let cols = values.len() / rows.max(1);
            if h == 0 || !rows.is_multiple_of(2 * h) {
                return Err(bad(
                    path,
                    format!("tensor `{gname}`: {rows} rows do not split into {h} heads of pairs"),
                ));
            }
            values = unpermute_rows(&values, rows, cols, h);
        }
        if info.shape.dims().is_empty() {
            return Err(bad(path, format!("tensor `{gname}` has no dimensions")));
        }
        tensors.push(GgufTensor {
            name,
            shape,
            values,
            stored_bytes,
        });
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let embed = tensors
        .iter()
        .find(|t| t.name == "model.embed_tokens.weight")
        .ok_or_else(|| bad(path, "no token embedding (`token_embd.weight`)"))?;
    let vocab = embed.shape[0];
    let tied = !tensors.iter().any(|t| t.name == "lm_head.weight");
    let config_json = hp.config(md, vocab, tied);
    let tokenizer_json = tokenizer(path, md)?;
    Ok(GgufModel {
        tensors,
        config_json,
        tokenizer_json,
    })
}

/// The HF name of a llama.cpp tensor name, or `None` when unknown.
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// The llama.cpp name of a Hugging Face tensor name (the inverse of
/// [`hf_name`]), or `None` when it has none.
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let g = match part {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// Undoes llama.cpp's permutation of q/k rows: within each head, GGUF row
/// `2i + j` holds HF row `j·half + i` (rotary pairs interleaved).
pub fn unpermute_rows(values: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    move_rows(values, rows, cols, heads, false)
}

/// Applies llama.cpp's permutation (the inverse of [`unpermute_rows`]).
pub fn permute_rows(values: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    move_rows(values, rows, cols, heads, true)
}

/// Moves rows between HF order (row `j·half + i` of a head) and GGUF order
/// (row `2i + j`): to GGUF order when `to_gguf`, back otherwise.
fn move_rows(values: &[f32], rows: usize, cols: usize, heads: usize, to_gguf: bool) -> Vec<f32> {
    let per_head = rows / heads;
    let half = per_head / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let gguf = h * per_head + 2 * i + j;
                let hf = h * per_head + j * half + i;
                let (src, dst) = if to_gguf { (hf, gguf) } else { (gguf, hf) };
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

struct Hyper {
    arch: String,
    hidden: usize,
    ffn: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    eps: f64,
    rope_theta: f64,
    context: usize,
}

fn num(v: &Value) -> Option<f64> {
    match v {
        Value::U8(x) => Some(*x as f64),
        Value::I8(x) => Some(*x as f64),
        Value::U16(x) => Some(*x as f64),
        Value::I16(x) => Some(*x as f64),
        Value::U32(x) => Some(*x as f64),
        Value::I32(x) => Some(*x as f64),
        Value::U64(x) => Some(*x as f64),
        Value::I64(x) => Some(*x as f64),
        Value::F32(x) => Some(*x as f64),
        Value::F64(x) => Some(*x),
        _ => None,
    }
}

impl Hyper {
    fn read(path: &Path, md: &HashMap<String, Value>, arch: &str) -> Result<Hyper, PipelineError> {
        let get = |key: &str| -> Result<f64, PipelineError> {
            let k = format!("{arch}.{key}");
            md.get(&k)
                .and_then(num)
                .ok_or_else(|| bad(path, format!("metadata `{k}` is missing or not a number")))
        };
        let heads = get("attention.head_count")? as usize;
        Ok(Hyper {
            arch: arch.to_string(),
            hidden: get("embedding_length")? as usize,
            ffn: get("feed_forward_length")? as usize,
            layers: get("block_count")? as usize,
            heads,
            kv_heads: get("attention.head_count_kv")
                .map(|v| v as usize)
                .unwrap_or(heads),
            eps: get("attention.layer_norm_rms_epsilon")?,
            rope_theta: get("rope.freq_base").unwrap_or(10_000.0),
            context: get("context_length").unwrap_or(2048.0) as usize,
        })
    }

    fn config(&self, md: &HashMap<String, Value>, vocab: usize, tied: bool) -> String {
        let id = |k: &str| md.get(k).and_then(num).map(|v| v as u64);
        let mut c = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": self.arch,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "intermediate_size": self.ffn,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.hidden / self.heads.max(1),
            "rms_norm_eps": self.eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.context,
            "vocab_size": vocab,
            "tie_word_embeddings": tied,
            "attention_bias": false,
            "mlp_bias": false,
            "torch_dtype": "float32",
        });
        if let Some(b) = id("tokenizer.ggml.bos_token_id") {
            c["bos_token_id"] = json!(b);
        }
        if let Some(e) = id("tokenizer.ggml.eos_token_id") {
            c["eos_token_id"] = json!(e);
        }
        if let Some(p) = id("tokenizer.ggml.padding_token_id") {
            c["pad_token_id"] = json!(p);
        }
        let mut s = serde_json::to_string_pretty(&c).unwrap_or_default();
        s.push('\n');
        s
    }
}

fn strings(
    path: &Path,
    md: &HashMap<String, Value>,
    key: &str,
) -> Result<Vec<String>, PipelineError> {
    let Some(v) = md.get(key) else {
        return Ok(Vec::new());
    };
    let arr = v
        .to_vec()
        .map_err(|_| bad(path, format!("metadata `{key}` is not an array")))?;
    arr.iter()
        .map(|x| {
            x.to_string().cloned().map_err(|_| {
                bad(
                    path,
                    format!("metadata `{key}` holds a value that is not a string"),
                )
            })
        })
        .collect()
}

/// Builds an HF `tokenizer.json` for a GGUF byte-level BPE vocabulary.
fn tokenizer(path: &Path, md: &HashMap<String, Value>) -> Result<Option<String>, PipelineError> {
    let model = md
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .cloned();
    match model.as_deref() {
        None => return Ok(None),
        Some("gpt2") => {}
        Some(other) => {
            return Err(bad(
                path,
                format!(
                    "tokenizer model `{other}` is not supported (supported: gpt2 byte-level BPE)"
                ),
            ));
        }
    }
    let tokens = strings(path, md, "tokenizer.ggml.tokens")?;
    let merges = strings(path, md, "tokenizer.ggml.merges")?;
    let types: Vec<i64> = match md.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|_| bad(path, "metadata `tokenizer.ggml.token_type` is not an array"))?
            .iter()
            .map(|x| num(x).unwrap_or(1.0) as i64)
            .collect(),
        None => Vec::new(),
    };
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(i));
        // llama.cpp token types: 3 = control, 4 = user-defined.
        let ty = types.get(i).copied().unwrap_or(1);
        if ty == 3 || ty == 4 {
            added.push(json!({
                "id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty == 3,
            }));
        }
    }
    let pre = md
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    let byte_level = json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
    });
    // SmolLM's pre-tokenizer splits digits one by one before the byte-level split.
    let pre_tokenizer = if pre == "smollm" {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level
        ]})
    } else {
        byte_level.clone()
    };
    let t = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": Json::Object(vocab), "merges": merges,
        }
    });
    Ok(Some(serde_json::to_string(&t).unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hf() {
        assert_eq!(
            hf_name("blk.0.attn_q.weight").unwrap(),
            "model.layers.0.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.29.ffn_down.weight").unwrap(),
            "model.layers.29.mlp.down_proj.weight"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        for g in [
            "blk.3.attn_q.weight",
            "blk.0.attn_norm.weight",
            "blk.11.ffn_gate.weight",
            "blk.2.attn_output.bias",
            "token_embd.weight",
            "output_norm.weight",
            "output.weight",
        ] {
            assert_eq!(gguf_name(&hf_name(g).unwrap()).unwrap(), g);
        }
        assert!(gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq").is_none());
        assert!(gguf_name("encoder.layer.0.attention.self.query.weight").is_none());
        assert!(hf_name("blk.x.attn_q.weight").is_none());
        assert!(hf_name("blk.0.attn_qkv.weight").is_none());
    }

    #[test]
    fn permutation_round_trips_and_interleaves() {
        let (rows, cols, heads) = (8, 3, 2);
        let v: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let p = permute_rows(&v, rows, cols, heads);
        // Head 0 of HF rows [0 1 2 3] becomes [0 2 1 3] in GGUF order.
        let first: Vec<f32> = p.chunks(cols).map(|r| r[0] / cols as f32).collect();
        assert_eq!(first, vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
        assert_eq!(unpermute_rows(&p, rows, cols, heads), v);
    }
}
