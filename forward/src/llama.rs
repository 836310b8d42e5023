//! A Llama-family decoder: embedding, `layers` pre-norm blocks (RMSNorm,
//! grouped-query attention with rotary positions, SwiGLU MLP), final norm
//! and language-model head, as Hugging Face's `LlamaForCausalLM` computes
//! them (rotary embedding in the "rotate half" layout). Qwen2's q/k/v biases
//! are read when present.
//!
//! The model runs on batches of equal-length token windows, each window
//! starting at position 0 with a causal mask. [`Llama::layer`] runs one
//! block and hands every linear layer's input to a callback ([`Site`] says
//! which weights read it).

use std::path::Path;

use candle_core::{D, DType, Device, Tensor};
use serde_json::Value;

use crate::{ForwardError, LinearCorrection, Part, Tunable};

/// A block's tensor by its name under `model.layers.N.` (`mut` for a
/// mutable borrow).
macro_rules! block_tensor {
    ($b:expr, $suffix:expr, $opt:ident $(, $m:tt)?) => {
        match $suffix {
            "input_layernorm.weight" => Some(&$($m)? $b.input_norm),
            "self_attn.q_proj.weight" => Some(&$($m)? $b.q),
            "self_attn.k_proj.weight" => Some(&$($m)? $b.k),
            "self_attn.v_proj.weight" => Some(&$($m)? $b.v),
            "self_attn.q_proj.bias" => $b.q_bias.$opt(),
            "self_attn.k_proj.bias" => $b.k_bias.$opt(),
            "self_attn.v_proj.bias" => $b.v_bias.$opt(),
            "self_attn.o_proj.weight" => Some(&$($m)? $b.o),
            "post_attention_layernorm.weight" => Some(&$($m)? $b.post_norm),
            "mlp.gate_proj.weight" => Some(&$($m)? $b.gate),
            "mlp.up_proj.weight" => Some(&$($m)? $b.up),
            "mlp.down_proj.weight" => Some(&$($m)? $b.down),
            _ => None,
        }
    };
}

/// Architectures (`config.json`'s `architectures`) this pass runs.
pub const ARCHITECTURES: &[&str] = &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

/// The shape of a Llama-family model, from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Width of the residual stream.
    pub hidden: usize,
    /// Width of the MLP.
    pub intermediate: usize,
    /// Number of blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub eps: f64,
    /// Rotary base.
    pub rope_theta: f64,
    /// Vocabulary size.
    pub vocab: usize,
    /// The head reuses the embedding matrix.
    pub tied: bool,
}

impl LlamaConfig {
    /// Reads `config.json` from a model folder.
    pub fn read(dir: &Path) -> Result<LlamaConfig, ForwardError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ForwardError::Config {
            path: path.clone(),
            why: format!("cannot read: {e}"),
        })?;
        LlamaConfig::parse(&path, &text)
    }

    /// Parses `config.json` text (`path` is for messages).
    pub fn parse(path: &Path, text: &str) -> Result<LlamaConfig, ForwardError> {
        let bad = |why: String| ForwardError::Config {
            path: path.to_path_buf(),
            why,
        };
        let v: Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let arch = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .unwrap_or("<none>");
        if !ARCHITECTURES.contains(&arch) {
            return Err(bad(format!(
                "architecture `{arch}` has no forward pass here (supported: {})",
                ARCHITECTURES.join(", ")
            )));
        }
        if v.get("rope_scaling").is_some_and(|r| !r.is_null()) {
            return Err(bad(
                "`rope_scaling` is set; scaled rotary embeddings are not supported".into(),
            ));
        }
        let get = |k: &str| -> Result<usize, ForwardError> {
            v.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .ok_or_else(|| bad(format!("`{k}` is missing or not a whole number")))
        };
        let hidden = get("hidden_size")?;
        let heads = get("num_attention_heads")?;
        let kv_heads = get("num_key_value_heads").unwrap_or(heads);
        let head_dim = get("head_dim").unwrap_or(hidden / heads.max(1));
        let cfg = LlamaConfig {
            hidden,
            intermediate: get("intermediate_size")?,
            layers: get("num_hidden_layers")?,
            heads,
            kv_heads,
            head_dim,
            eps: v
                .get("rms_norm_eps")
                .and_then(|x| x.as_f64())
                .unwrap_or(1e-6),
            rope_theta: v
                .get("rope_theta")
                .and_then(|x| x.as_f64())
                .unwrap_or(10_000.0),
            vocab: get("vocab_size")?,
            tied: v
                .get("tie_word_embeddings")
                .and_then(|x| x.as_bool())
                .unwrap_or(false),
        };
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) || head_dim % 2 != 0 {
            return Err(bad(format!(
                "{heads} query heads, {kv_heads} key/value heads and head width {head_dim} do not fit together"
            )));
        }
        Ok(cfg)
    }
}

/// Which linear weights of a block read a captured input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Site {
    /// The normed residual read by q, k and v.
    Attention,
    /// The attention heads' output read by o.
    AttentionOutput,
    /// The normed residual read by gate and up.
    Mlp,
    /// `silu(gate) · up`, read by down.
    MlpDown,
}

impl Site {
    /// Every site, in the order a block reaches them.
    pub const ALL: [Site; 4] = [
        Site::Attention,
        Site::AttentionOutput,
        Site::Mlp,
        Site::MlpDown,
    ];

    /// HF names of the weights of block `layer` that read this site's input.
    pub fn weights(self, layer: usize) -> Vec<String> {
        let p = format!("model.layers.{layer}");
        match self {
            Site::Attention => ["q_proj", "k_proj", "v_proj"]
                .iter()
                .map(|w| format!("{p}.self_attn.{w}.weight"))
                .collect(),
            Site::AttentionOutput => vec![format!("{p}.self_attn.o_proj.weight")],
            Site::Mlp => ["gate_proj", "up_proj"]
                .iter()
                .map(|w| format!("{p}.mlp.{w}.weight"))
                .collect(),
            Site::MlpDown => vec![format!("{p}.mlp.down_proj.weight")],
        }
    }

    /// The site a linear weight's name belongs to, with its layer.
    pub fn of_weight(name: &str) -> Option<(usize, Site)> {
        let rest = name.strip_prefix("model.layers.")?;
        let (layer, rest) = rest.split_once('.')?;
        let layer = layer.parse().ok()?;
        let site = match rest {
            "self_attn.q_proj.weight" | "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => {
                Site::Attention
            }
            "self_attn.o_proj.weight" => Site::AttentionOutput,
            "mlp.gate_proj.weight" | "mlp.up_proj.weight" => Site::Mlp,
            "mlp.down_proj.weight" => Site::MlpDown,
            _ => return None,
        };
        Some((layer, site))
    }
}

/// One block's weights.
struct Block {
    input_norm: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_bias: Option<Tensor>,
    k_bias: Option<Tensor>,
    v_bias: Option<Tensor>,
    o: Tensor,
    post_norm: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    /// Distillation's corrections of the linear weights, in [`LINEARS`] order.
    corrections: [Option<LinearCorrection>; 7],
}

/// A block's linear weights, by name under `model.layers.N.`, in the order
/// of [`Block::corrections`].
const LINEARS: [&str; 7] = [
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
];

impl Block {
    fn correction(&self, i: usize) -> Option<&LinearCorrection> {
        self.corrections[i].as_ref()
    }
}

/// The HF name of the final norm's gain (before the head).
pub const FINAL_NORM: &str = "model.norm.weight";

/// A loaded Llama-family decoder (f32, CPU).
pub struct Llama {
    /// Its shape.
    pub cfg: LlamaConfig,
    /// The token embeddings (absent from a part without them).
    embed: Option<Tensor>,
    /// Blocks by layer; `None` for a layer outside the loaded part.
    blocks: Vec<Option<Block>>,
    /// Final norm and head (absent from a part without them).
    norm: Option<Tensor>,
    head: Option<Tensor>,
    cos: Tensor,
    sin: Tensor,
}

/// A weight as a [`WeightSource`] gives it: values (row-major f32) and
/// shape, or `None` when the model has no such tensor.
pub type Weight = Option<(Vec<f32>, Vec<usize>)>;

/// Supplies a weight by HF name.
pub type WeightSource<'a> = dyn FnMut(&str) -> Result<Weight, ForwardError> + 'a;

fn linear(
    x: &Tensor,
    w: &Tensor,
    c: Option<&LinearCorrection>,
    b: Option<&Tensor>,
    train: bool,
) -> candle_core::Result<Tensor> {
    let y = crate::corrected_matmul(x, w, c, train)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

impl Llama {
    /// Builds the model from its config and a weight source. Positions up
    /// to `max_positions` get rotary tables.
    pub fn load(
        cfg: LlamaConfig,
        weights: &mut WeightSource<'_>,
        max_positions: usize,
    ) -> Result<Llama, ForwardError> {
        let whole = Part::whole(cfg.layers);
        Llama::load_part(cfg, weights, max_positions, &whole)
    }

    /// As [`Llama::load`], reading only the weights of `part`: a stage of a
    /// model split by layer holds its own blocks and nothing else.
    pub fn load_part(
        cfg: LlamaConfig,
        weights: &mut WeightSource<'_>,
        max_positions: usize,
        part: &Part,
    ) -> Result<Llama, ForwardError> {
        let dev = Device::Cpu;
        fn get(
            weights: &mut WeightSource<'_>,
            name: &str,
            shape: &[usize],
        ) -> Result<Tensor, ForwardError> {
            let (v, s) = weights(name)?.ok_or_else(|| ForwardError::Weight {
                name: name.into(),
                why: "missing from the model".into(),
            })?;
            if s != shape {
                return Err(ForwardError::Weight {
                    name: name.into(),
                    why: format!("shape {s:?}, the config needs {shape:?}"),
                });
            }
            Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
        }
        fn bias(
            weights: &mut WeightSource<'_>,
            name: String,
            n: usize,
        ) -> Result<Option<Tensor>, ForwardError> {
            match weights(&name)? {
                None => Ok(None),
                Some((v, s)) if s == [n] => Ok(Some(Tensor::from_vec(v, n, &Device::Cpu)?)),
                Some((_, s)) => Err(ForwardError::Weight {
                    name,
                    why: format!("shape {s:?}, expected [{n}]"),
                }),
            }
        }
        let (h, f, hd) = (cfg.hidden, cfg.intermediate, cfg.head_dim);
        let (qd, kvd) = (cfg.heads * hd, cfg.kv_heads * hd);
        let needs_embed = part.embeddings || (part.head && cfg.tied);
        let embed = if needs_embed {
            Some(get(weights, "model.embed_tokens.weight", &[cfg.vocab, h])?)
        } else {
            None
        };
        let mut blocks = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            if !part.blocks.contains(&l) {
                blocks.push(None);
                continue;
            }
            let p = format!("model.layers.{l}");
            let q_bias = bias(weights, format!("{p}.self_attn.q_proj.bias"), qd)?;
            let k_bias = bias(weights, format!("{p}.self_attn.k_proj.bias"), kvd)?;
            let v_bias = bias(weights, format!("{p}.self_attn.v_proj.bias"), kvd)?;
            blocks.push(Some(Block {
                input_norm: get(weights, &format!("{p}.input_layernorm.weight"), &[h])?,
                q: get(weights, &format!("{p}.self_attn.q_proj.weight"), &[qd, h])?,
                k: get(weights, &format!("{p}.self_attn.k_proj.weight"), &[kvd, h])?,
                v: get(weights, &format!("{p}.self_attn.v_proj.weight"), &[kvd, h])?,
                q_bias,
                k_bias,
                v_bias,
                o: get(weights, &format!("{p}.self_attn.o_proj.weight"), &[h, qd])?,
                post_norm: get(
                    weights,
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[h],
                )?,
                gate: get(weights, &format!("{p}.mlp.gate_proj.weight"), &[f, h])?,
                up: get(weights, &format!("{p}.mlp.up_proj.weight"), &[f, h])?,
                down: get(weights, &format!("{p}.mlp.down_proj.weight"), &[h, f])?,
                corrections: Default::default(),
            }));
        }
        let (norm, head) = if part.head {
            let norm = get(weights, "model.norm.weight", &[h])?;
            let head = if cfg.tied {
                embed.clone()
            } else {
                Some(get(weights, "lm_head.weight", &[cfg.vocab, h])?)
            };
            (Some(norm), head)
        } else {
            (None, None)
        };
        let embed = if part.embeddings { embed } else { None };
        let half = hd / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / hd as f64) as f32)
            .collect();
        let inv = Tensor::from_vec(inv, (1, half), &dev)?;
        let pos = Tensor::arange(0u32, max_positions.max(1) as u32, &dev)?
            .to_dtype(DType::F32)?
            .reshape((max_positions.max(1), 1))?;
        let freqs = pos.broadcast_mul(&inv)?;
        Ok(Llama {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
            cfg,
            embed,
            blocks,
            norm,
            head,
        })
    }

    /// Loads a model folder: `config.json` and its safetensors files.
    pub fn load_dir(dir: &Path, max_positions: usize) -> Result<Llama, ForwardError> {
        let cfg = LlamaConfig::read(dir)?;
        let mut files = Vec::new();
        let rd = std::fs::read_dir(dir).map_err(|e| ForwardError::Config {
            path: dir.to_path_buf(),
            why: format!("cannot list: {e}"),
        })?;
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "safetensors") {
                files.push(p);
            }
        }
        files.sort();
        let mut all = std::collections::HashMap::new();
        for p in &files {
            let t = candle_core::safetensors::load(p, &Device::Cpu)?;
            all.extend(t);
        }
        let mut src = |name: &str| -> Result<Weight, ForwardError> {
            match all.get(name) {
                None => Ok(None),
                Some(t) => {
                    let shape = t.dims().to_vec();
                    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    Ok(Some((v, shape)))
                }
            }
        };
        Llama::load(cfg, &mut src, max_positions)
    }

    /// Replaces a linear weight (calibration swaps in quantized layers).
    pub fn set_weight(&mut self, name: &str, values: Vec<f32>) -> Result<(), ForwardError> {
        if Site::of_weight(name).is_none() {
            return Err(ForwardError::Weight {
                name: name.into(),
                why: "not a linear weight of a block".into(),
            });
        }
        let shape = self.tensor(name)?.dims().to_vec();
        if values.len() != shape.iter().product::<usize>() {
            return Err(ForwardError::Weight {
                name: name.into(),
                why: format!("{} values for shape {shape:?}", values.len()),
            });
        }
        self.set_tensor(name, Tensor::from_vec(values, shape, &Device::Cpu)?)
    }

    /// Splits a block tensor's name into its layer and its name in the block.
    fn locate<'n>(&self, name: &'n str) -> Result<(usize, &'n str), ForwardError> {
        crate::split_block_name(name, "model.layers.", self.blocks.len())
    }

    /// Block `layer`, if this part of the model holds it.
    fn block(&self, layer: usize) -> Result<&Block, ForwardError> {
        self.blocks
            .get(layer)
            .and_then(Option::as_ref)
            .ok_or_else(|| crate::not_loaded(format!("model.layers.{layer}")))
    }

    fn block_mut(&mut self, layer: usize) -> Result<&mut Block, ForwardError> {
        self.blocks
            .get_mut(layer)
            .and_then(Option::as_mut)
            .ok_or_else(|| crate::not_loaded(format!("model.layers.{layer}")))
    }

    /// A block tensor (linear weight or bias, norm gain), or the final
    /// norm's gain ([`FINAL_NORM`]), by its HF name.
    pub fn tensor(&self, name: &str) -> Result<&Tensor, ForwardError> {
        if name == FINAL_NORM {
            return self
                .norm
                .as_ref()
                .ok_or_else(|| crate::not_loaded(name.into()));
        }
        let (layer, suffix) = self.locate(name)?;
        block_tensor!(self.block(layer)?, suffix, as_ref).ok_or_else(|| ForwardError::Weight {
            name: name.into(),
            why: "not a tensor of this model's blocks".into(),
        })
    }

    /// Replaces a block tensor by its HF name; the shape must not change.
    /// Distillation swaps in trainable variables this way.
    pub fn set_tensor(&mut self, name: &str, t: Tensor) -> Result<(), ForwardError> {
        if name == FINAL_NORM {
            return crate::replace_block_tensor(self.norm.as_mut(), name, t);
        }
        let (layer, suffix) = self.locate(name)?;
        crate::replace_block_tensor(
            block_tensor!(self.block_mut(layer)?, suffix, as_mut, mut),
            name,
            t,
        )
    }

    /// The HF names of block `layer`'s parameters of one kind (biases only
    /// where the model has them).
    pub fn tunable(&self, layer: usize, kind: Tunable) -> Vec<String> {
        let p = format!("model.layers.{layer}");
        let Some(b) = self.blocks.get(layer).and_then(Option::as_ref) else {
            return Vec::new();
        };
        match kind {
            Tunable::Norms => vec![
                format!("{p}.input_layernorm.weight"),
                format!("{p}.post_attention_layernorm.weight"),
            ],
            Tunable::Biases => [("q", &b.q_bias), ("k", &b.k_bias), ("v", &b.v_bias)]
                .into_iter()
                .filter(|(_, t)| t.is_some())
                .map(|(n, _)| format!("{p}.self_attn.{n}_proj.bias"))
                .collect(),
        }
    }

    /// The HF names of block `layer`'s linear weights.
    pub fn linear_weights(&self, layer: usize) -> Vec<String> {
        LINEARS
            .iter()
            .map(|n| format!("model.layers.{layer}.{n}"))
            .collect()
    }

    /// Sets (or, with `None`, removes) the correction the forward pass
    /// applies to a linear weight, named by its HF name.
    pub fn set_correction(
        &mut self,
        name: &str,
        c: Option<LinearCorrection>,
    ) -> Result<(), ForwardError> {
        let (layer, suffix) = self.locate(name)?;
        let i = LINEARS
            .iter()
            .position(|n| *n == suffix)
            .ok_or_else(|| ForwardError::Weight {
                name: name.into(),
                why: "not a linear weight of a block".into(),
            })?;
        if let Some(c) = &c {
            c.check(name, self.tensor(name)?.dims())?;
        }
        self.block_mut(layer)?.corrections[i] = c;
        Ok(())
    }

    /// Embeds `batch` windows of `len` tokens each: `[batch·len, hidden]`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor, ForwardError> {
        if let Some(t) = tokens.iter().find(|t| **t as usize >= self.cfg.vocab) {
            return Err(ForwardError::Weight {
                name: "model.embed_tokens.weight".into(),
                why: format!(
                    "token id {t} is beyond the vocabulary of {}",
                    self.cfg.vocab
                ),
            });
        }
        let embed = self
            .embed
            .as_ref()
            .ok_or_else(|| crate::not_loaded("model.embed_tokens.weight".into()))?;
        let ids = Tensor::from_slice(tokens, tokens.len(), &Device::Cpu)?;
        Ok(embed.index_select(&ids, 0)?)
    }

    /// Runs block `layer` over `x` (`[batch·len, hidden]`, `batch` windows
    /// of `len` tokens) and returns its output; `capture` sees each linear
    /// layer's input (`[batch·len, in_features]`).
    pub fn layer(
        &self,
        layer: usize,
        x: &Tensor,
        batch: usize,
        len: usize,
        capture: &mut dyn FnMut(Site, &Tensor) -> Result<(), ForwardError>,
    ) -> Result<Tensor, ForwardError> {
        self.run_block(layer, x, batch, len, capture, false)
    }

    /// Runs block `layer` with operations that record gradients (candle's
    /// fused norm, rotary and softmax kernels have no backward pass), for
    /// distillation.
    pub fn layer_for_training(
        &self,
        layer: usize,
        x: &Tensor,
        batch: usize,
        len: usize,
    ) -> Result<Tensor, ForwardError> {
        self.run_block(layer, x, batch, len, &mut |_, _| Ok(()), true)
    }

    fn run_block(
        &self,
        layer: usize,
        x: &Tensor,
        batch: usize,
        len: usize,
        capture: &mut dyn FnMut(Site, &Tensor) -> Result<(), ForwardError>,
        train: bool,
    ) -> Result<Tensor, ForwardError> {
        let c = &self.cfg;
        let b = self.block(layer)?;
        let eps = c.eps as f32;
        let hd = c.head_dim;
        let rms = |x: &Tensor, w: &Tensor| {
            if train {
                candle_nn::ops::rms_norm_slow(x, w, eps)
            } else {
                candle_nn::ops::rms_norm(x, w, eps)
            }
        };
        let rope = |t: &Tensor, cos: &Tensor, sin: &Tensor| {
            if train {
                candle_nn::rotary_emb::rope_slow(t, cos, sin)
            } else {
                candle_nn::rotary_emb::rope(t, cos, sin)
            }
        };
        let xn = rms(x, &b.input_norm)?;
        capture(Site::Attention, &xn)?;
        let heads = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
            t.reshape((batch, len, n, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(
            linear(&xn, &b.q, b.correction(0), b.q_bias.as_ref(), train)?,
            c.heads,
        )?;
        let k = heads(
            linear(&xn, &b.k, b.correction(1), b.k_bias.as_ref(), train)?,
            c.kv_heads,
        )?;
        let v = heads(
            linear(&xn, &b.v, b.correction(2), b.v_bias.as_ref(), train)?,
            c.kv_heads,
        )?;
        let cos = self.cos.narrow(0, 0, len)?;
        let sin = self.sin.narrow(0, 0, len)?;
        let q = rope(&q, &cos, &sin)?;
        let k = rope(&k, &cos, &sin)?;
        let rep = c.heads / c.kv_heads;
        let expand = |t: Tensor| -> candle_core::Result<Tensor> {
            if rep == 1 {
                return Ok(t);
            }
            t.unsqueeze(2)?
                .expand((batch, c.kv_heads, rep, len, hd))?
                .reshape((batch, c.heads, len, hd))
        };
        let k = expand(k)?;
        let v = expand(v)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?;
        let att = att.broadcast_add(&causal_mask(len)?)?;
        let att = if train {
            candle_nn::ops::softmax(&att, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&att)?
        };
        let y = att
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((batch * len, c.heads * hd))?;
        capture(Site::AttentionOutput, &y)?;
        let x = (x + linear(&y, &b.o, b.correction(3), None, train)?)?;
        let xn = rms(&x, &b.post_norm)?;
        capture(Site::Mlp, &xn)?;
        let g = candle_nn::ops::silu(&linear(&xn, &b.gate, b.correction(4), None, train)?)?;
        let u = linear(&xn, &b.up, b.correction(5), None, train)?;
        let m = (g * u)?;
        capture(Site::MlpDown, &m)?;
        Ok((x + linear(&m, &b.down, b.correction(6), None, train)?)?)
    }

    /// Final norm and head: logits `[rows, vocab]`.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor, ForwardError> {
        let norm = self.tensor(FINAL_NORM)?;
        self.logits_with_norm(x, norm)
    }

    /// Logits `[rows, vocab]` of final hidden states `x` through a final
    /// norm of gain `norm` (another than the model's, such as the original
    /// model's while the model's own is tuned) and the head.
    pub fn logits_with_norm(&self, x: &Tensor, norm: &Tensor) -> Result<Tensor, ForwardError> {
        let head = self
            .head
            .as_ref()
            .ok_or_else(|| crate::not_loaded("lm_head.weight".into()))?;
        let xn = candle_nn::ops::rms_norm(x, norm, self.cfg.eps as f32)?;
        Ok(xn.matmul(&head.t()?)?)
    }

    /// Every block over `x` (`[batch·len, hidden]`, the embedded windows)
    /// with operations that record gradients: the final hidden states,
    /// before the final norm. For end-to-end tuning.
    pub fn hidden_for_training(
        &self,
        x: &Tensor,
        batch: usize,
        len: usize,
    ) -> Result<Tensor, ForwardError> {
        let mut x = x.clone();
        for l in 0..self.cfg.layers {
            x = self.run_block(l, &x, batch, len, &mut |_, _| Ok(()), true)?;
        }
        Ok(x)
    }

    /// Final norm and head with operations that record gradients (the
    /// head itself gets none): logits `[rows, vocab]`.
    pub fn logits_for_training(&self, x: &Tensor) -> Result<Tensor, ForwardError> {
        let norm = self.tensor(FINAL_NORM)?;
        let head = self
            .head
            .as_ref()
            .ok_or_else(|| crate::not_loaded("lm_head.weight".into()))?;
        let xn = candle_nn::ops::rms_norm_slow(x, norm, self.cfg.eps as f32)?;
        Ok(crate::corrected_matmul(&xn, head, None, true)?)
    }

    /// Logits of `batch` windows of `len` tokens: `[batch·len, vocab]`.
    pub fn forward(
        &self,
        tokens: &[u32],
        batch: usize,
        len: usize,
    ) -> Result<Tensor, ForwardError> {
        let mut x = self.embed(tokens)?;
        for l in 0..self.cfg.layers {
            x = self.layer(l, &x, batch, len, &mut |_, _| Ok(()))?;
        }
        self.logits(&x)
    }
}

fn causal_mask(len: usize) -> candle_core::Result<Tensor> {
    let m: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(m, (len, len), &Device::Cpu)
}

/// Log-probabilities over the vocabulary for each row of logits.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor, ForwardError> {
    Ok(candle_nn::ops::log_softmax(logits, D::Minus1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> LlamaConfig {
        LlamaConfig {
            hidden: 16,
            intermediate: 24,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 4,
            eps: 1e-5,
            rope_theta: 10_000.0,
            vocab: 11,
            tied: true,
        }
    }

    fn tiny_model(seed: u64) -> Llama {
        let cfg = tiny();
        let mut state = seed;
        let mut src = |name: &str| -> Result<Weight, ForwardError> {
            let shape: Vec<usize> = if name.ends_with("norm.weight") {
                vec![16]
            } else if name.contains("bias") || name == "lm_head.weight" {
                return Ok(None);
            } else if name.contains("embed") {
                vec![11, 16]
            } else if name.contains("k_proj") || name.contains("v_proj") {
                vec![8, 16]
            } else if name.contains("gate") || name.contains("up_proj") {
                vec![24, 16]
            } else if name.contains("down") {
                vec![16, 24]
            } else {
                vec![16, 16]
            };
            let n = shape.iter().product();
            let v = (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.6
                })
                .collect();
            Ok(Some((v, shape)))
        };
        Llama::load(cfg, &mut src, 32).unwrap()
    }

    #[test]
    fn causal_outputs_do_not_see_the_future() {
        let m = tiny_model(3);
        let a = m.forward(&[1, 2, 3, 4, 5, 6], 1, 6).unwrap();
        let b = m.forward(&[1, 2, 3, 9, 9, 9], 1, 6).unwrap();
        let a = a
            .narrow(0, 0, 3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = b
            .narrow(0, 0, 3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }

    #[test]
    fn a_correction_acts_as_the_corrected_weight_and_gets_gradients() {
        let mut m = tiny_model(9);
        let x = m.embed(&[1, 2, 3, 4, 5, 6]).unwrap();
        let name = "model.layers.0.mlp.down_proj.weight";
        assert_eq!(m.linear_weights(0)[6], name);
        let dev = Device::Cpu;
        let w = m.tensor(name).unwrap().clone();
        let (o, i, r) = (16, 24, 2);
        let ramp = |n: usize, s: f32| -> Vec<f32> {
            (0..n).map(|k| 1.0 + s * ((k % 7) as f32 - 3.0)).collect()
        };
        let rows = candle_core::Var::from_vec(ramp(o, 0.01), o, &dev).unwrap();
        let cols = candle_core::Var::from_vec(ramp(i, 0.02), i, &dev).unwrap();
        let a = candle_core::Var::from_vec(ramp(o * r, 0.1), (o, r), &dev).unwrap();
        let b = candle_core::Var::from_vec(ramp(r * i, -0.1), (r, i), &dev).unwrap();
        // The dense weight diag(rows)·W·diag(cols) + A·B, run without a correction.
        let dense = w
            .broadcast_mul(&rows.as_tensor().unsqueeze(1).unwrap())
            .unwrap()
            .broadcast_mul(&cols.as_tensor().unsqueeze(0).unwrap())
            .unwrap()
            .add(&a.as_tensor().matmul(b.as_tensor()).unwrap())
            .unwrap();
        m.set_tensor(name, dense).unwrap();
        let want = m.layer(0, &x, 1, 6, &mut |_, _| Ok(())).unwrap();
        m.set_tensor(name, w).unwrap();
        let c = LinearCorrection {
            rows: Some(rows.as_tensor().clone()),
            cols: Some(cols.as_tensor().clone()),
            a: Some(a.as_tensor().clone()),
            b: Some(b.as_tensor().clone()),
        };
        m.set_correction(name, Some(c.clone())).unwrap();
        let got = m.layer_for_training(0, &x, 1, 6).unwrap();
        let d = (&got - &want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-4);
        let grads = got.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&rows, &cols, &a, &b] {
            assert!(grads.get(v.as_tensor()).is_some(), "no gradient");
        }
        // Shapes are checked, and a correction can be removed.
        let mut wrong = c.clone();
        wrong.rows = Some(Tensor::ones(5, DType::F32, &dev).unwrap());
        let e = m.set_correction(name, Some(wrong)).unwrap_err().to_string();
        assert!(e.contains("row gain has shape [5]"), "{e}");
        let mut half = c;
        half.b = None;
        assert!(m.set_correction(name, Some(half)).is_err());
        let e = m
            .set_correction("model.layers.0.input_layernorm.weight", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a linear weight"), "{e}");
        m.set_correction(name, None).unwrap();
        let plain = m.layer(0, &x, 1, 6, &mut |_, _| Ok(())).unwrap();
        let d = (&plain - &want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(
            d.to_scalar::<f32>().unwrap() > 1e-3,
            "the correction is gone"
        );
    }

    #[test]
    fn batched_windows_match_single_windows() {
        let m = tiny_model(5);
        let both = m.forward(&[1, 2, 3, 4, 5, 6, 7, 8], 2, 4).unwrap();
        let second = m.forward(&[5, 6, 7, 8], 1, 4).unwrap();
        let x = both
            .narrow(0, 4, 4)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let y = second.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn the_training_pass_matches_the_fast_pass_and_reaches_every_norm() {
        let mut m = tiny_model(7);
        let x = m.embed(&[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        let fast = m.layer(0, &x, 2, 4, &mut |_, _| Ok(())).unwrap();
        let names = m.tunable(0, Tunable::Norms);
        assert_eq!(
            names,
            [
                "model.layers.0.input_layernorm.weight",
                "model.layers.0.post_attention_layernorm.weight"
            ]
        );
        assert!(m.tunable(0, Tunable::Biases).is_empty(), "no biases here");
        let vars: Vec<candle_core::Var> = names
            .iter()
            .map(|n| candle_core::Var::from_tensor(m.tensor(n).unwrap()).unwrap())
            .collect();
        for (n, v) in names.iter().zip(&vars) {
            m.set_tensor(n, v.as_tensor().clone()).unwrap();
        }
        let slow = m.layer_for_training(0, &x, 2, 4).unwrap();
        let d = (&slow - &fast).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-4);
        let grads = slow.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for v in &vars {
            let g = grads.get(v.as_tensor()).expect("a gradient for every norm");
            let g = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(g > 0.0);
        }
        // Shapes are checked and only block tensors can be swapped.
        let wrong = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
        assert!(m.set_tensor(&names[0], wrong.clone()).is_err());
        assert!(m.set_tensor("model.norm.weight", wrong.clone()).is_err());
        assert!(
            m.set_tensor("model.layers.9.input_layernorm.weight", wrong)
                .is_err()
        );
        assert!(m.tensor("model.layers.0.self_attn.q_proj.bias").is_err());
    }

    #[test]
    fn unsupported_architecture_is_named() {
        let e = LlamaConfig::parse(
            Path::new("c.json"),
            r#"{"architectures": ["GPTNeoXForCausalLM"], "hidden_size": 8}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("GPTNeoXForCausalLM") && e.contains("no forward pass"),
            "{e}"
        );
    }

    #[test]
    fn sites_name_their_weights() {
        assert_eq!(
            Site::of_weight("model.layers.3.mlp.up_proj.weight"),
            Some((3, Site::Mlp))
        );
        assert!(
            Site::Mlp
                .weights(3)
                .contains(&"model.layers.3.mlp.up_proj.weight".to_string())
        );
        assert_eq!(Site::of_weight("model.norm.weight"), None);
    }

    #[test]
    fn token_beyond_vocabulary_is_an_error() {
        let m = tiny_model(1);
        assert!(m.forward(&[1, 99], 1, 2).is_err());
    }
}
