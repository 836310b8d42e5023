//! A BERT-family sentence encoder (all-MiniLM-L6-v2 and its kin in
//! sentence-transformers layout: `embeddings.*`, `encoder.layer.N.*` at the
//! root, or under `bert.`), run one block at a time on one sentence at a
//! time (no padding), with every linear layer's input handed to a callback.
//! Post-norm blocks: self-attention with biases, residual and LayerNorm,
//! GELU (erf) MLP, residual and LayerNorm.

use std::path::Path;

use candle_core::{D, DType, Device, Tensor};
use serde_json::Value;

use crate::llama::{Site, WeightSource};
use crate::{ForwardError, LinearCorrection, Tunable};

/// A block's normalisation parameters, by name under `encoder.layer.N.`.
const NORMS: [&str; 4] = [
    "attention.output.LayerNorm.weight",
    "attention.output.LayerNorm.bias",
    "output.LayerNorm.weight",
    "output.LayerNorm.bias",
];

/// A block's linear biases, by name under `encoder.layer.N.`.
const BIASES: [&str; 6] = [
    "attention.self.query.bias",
    "attention.self.key.bias",
    "attention.self.value.bias",
    "attention.output.dense.bias",
    "intermediate.dense.bias",
    "output.dense.bias",
];

/// A block's tensor by its name under `encoder.layer.N.` (`mut` for a
/// mutable borrow).
macro_rules! block_tensor {
    ($b:expr, $suffix:expr $(, $m:tt)?) => {
        match $suffix {
            "attention.self.query.weight" => Some(&$($m)? $b.q.w),
            "attention.self.query.bias" => Some(&$($m)? $b.q.b),
            "attention.self.key.weight" => Some(&$($m)? $b.k.w),
            "attention.self.key.bias" => Some(&$($m)? $b.k.b),
            "attention.self.value.weight" => Some(&$($m)? $b.v.w),
            "attention.self.value.bias" => Some(&$($m)? $b.v.b),
            "attention.output.dense.weight" => Some(&$($m)? $b.o.w),
            "attention.output.dense.bias" => Some(&$($m)? $b.o.b),
            "attention.output.LayerNorm.weight" => Some(&$($m)? $b.attn_norm.w),
            "attention.output.LayerNorm.bias" => Some(&$($m)? $b.attn_norm.b),
            "intermediate.dense.weight" => Some(&$($m)? $b.up.w),
            "intermediate.dense.bias" => Some(&$($m)? $b.up.b),
            "output.dense.weight" => Some(&$($m)? $b.down.w),
            "output.dense.bias" => Some(&$($m)? $b.down.b),
            "output.LayerNorm.weight" => Some(&$($m)? $b.out_norm.w),
            "output.LayerNorm.bias" => Some(&$($m)? $b.out_norm.b),
            _ => None,
        }
    };
}

/// The shape of a BERT encoder, from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    /// Width of the residual stream.
    pub hidden: usize,
    /// Width of the MLP.
    pub intermediate: usize,
    /// Number of blocks.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// LayerNorm epsilon.
    pub eps: f64,
    /// Vocabulary size.
    pub vocab: usize,
    /// Longest input.
    pub max_positions: usize,
}

impl BertConfig {
    /// Parses `config.json` text (`path` is for messages).
    pub fn parse(path: &Path, text: &str) -> Result<BertConfig, ForwardError> {
        let bad = |why: String| ForwardError::Config {
            path: path.to_path_buf(),
            why,
        };
        let v: Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let is_bert = v.get("model_type").and_then(|m| m.as_str()) == Some("bert")
            || v.get("architectures")
                .and_then(|a| a.as_array())
                .is_some_and(|a| a.iter().any(|x| x.as_str() == Some("BertModel")));
        if !is_bert {
            return Err(bad("not a BERT-family encoder".into()));
        }
        if let Some(act) = v.get("hidden_act").and_then(|a| a.as_str())
            && act != "gelu"
        {
            return Err(bad(format!("hidden_act `{act}` is not supported (gelu)")));
        }
        let get = |k: &str| -> Result<usize, ForwardError> {
            v.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .ok_or_else(|| bad(format!("`{k}` is missing or not a whole number")))
        };
        let cfg = BertConfig {
            hidden: get("hidden_size")?,
            intermediate: get("intermediate_size")?,
            layers: get("num_hidden_layers")?,
            heads: get("num_attention_heads")?,
            eps: v
                .get("layer_norm_eps")
                .and_then(|x| x.as_f64())
                .unwrap_or(1e-12),
            vocab: get("vocab_size")?,
            max_positions: get("max_position_embeddings")?,
        };
        if cfg.heads == 0 || !cfg.hidden.is_multiple_of(cfg.heads) {
            return Err(bad(format!(
                "{} heads do not divide the width {}",
                cfg.heads, cfg.hidden
            )));
        }
        Ok(cfg)
    }
}

/// The site and layer of a BERT linear weight, by name (with or without a
/// `bert.` prefix).
pub fn site_of_weight(name: &str) -> Option<(usize, Site)> {
    let name = name.strip_prefix("bert.").unwrap_or(name);
    let rest = name.strip_prefix("encoder.layer.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    let site = match rest {
        "attention.self.query.weight"
        | "attention.self.key.weight"
        | "attention.self.value.weight" => Site::Attention,
        "attention.output.dense.weight" => Site::AttentionOutput,
        "intermediate.dense.weight" => Site::Mlp,
        "output.dense.weight" => Site::MlpDown,
        _ => return None,
    };
    Some((layer, site))
}

struct Linear {
    w: Tensor,
    b: Tensor,
    /// Distillation's correction of `w`, if any.
    c: Option<LinearCorrection>,
}

impl Linear {
    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        crate::corrected_matmul(x, &self.w, self.c.as_ref(), train)?.broadcast_add(&self.b)
    }
}

/// A block's linear weights, by name under `encoder.layer.N.`.
const LINEARS: [&str; 6] = [
    "attention.self.query.weight",
    "attention.self.key.weight",
    "attention.self.value.weight",
    "attention.output.dense.weight",
    "intermediate.dense.weight",
    "output.dense.weight",
];

struct Norm {
    w: Tensor,
    b: Tensor,
}

impl Norm {
    fn forward(&self, x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let c = x.broadcast_sub(&mean)?;
        let var = c.sqr()?.mean_keepdim(D::Minus1)?;
        c.broadcast_div(&(var + eps)?.sqrt()?)?
            .broadcast_mul(&self.w)?
            .broadcast_add(&self.b)
    }
}

struct Block {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    attn_norm: Norm,
    up: Linear,
    down: Linear,
    out_norm: Norm,
}

/// A loaded BERT encoder (f32, CPU).
pub struct Bert {
    /// Its shape.
    pub cfg: BertConfig,
    prefix: String,
    /// The embeddings (absent from a part without them).
    embeddings: Option<Embeddings>,
    /// Blocks by layer; `None` for a layer outside the loaded part.
    blocks: Vec<Option<Block>>,
}

/// Word, position and token-type embeddings and their LayerNorm.
struct Embeddings {
    words: Tensor,
    positions: Tensor,
    types: Tensor,
    norm: Norm,
}

impl Bert {
    /// Builds the encoder from its config and a weight source; the weights
    /// may sit at the root or under `bert.`.
    pub fn load(cfg: BertConfig, weights: &mut WeightSource<'_>) -> Result<Bert, ForwardError> {
        let whole = crate::Part::whole(cfg.layers);
        Bert::load_part(cfg, weights, &whole)
    }

    /// As [`Bert::load`], reading only the weights of `part` (an encoder
    /// has no head: `part.head` is ignored).
    pub fn load_part(
        cfg: BertConfig,
        weights: &mut WeightSource<'_>,
        part: &crate::Part,
    ) -> Result<Bert, ForwardError> {
        let prefix = if weights("embeddings.word_embeddings.weight")?.is_some() {
            String::new()
        } else {
            "bert.".to_string()
        };
        let mut get = |name: &str, shape: &[usize]| -> Result<Tensor, ForwardError> {
            let full = format!("{prefix}{name}");
            let (v, s) = weights(&full)?.ok_or_else(|| ForwardError::Weight {
                name: full.clone(),
                why: "missing from the model".into(),
            })?;
            if s != shape {
                return Err(ForwardError::Weight {
                    name: full,
                    why: format!("shape {s:?}, the config needs {shape:?}"),
                });
            }
            Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
        };
        let (h, f) = (cfg.hidden, cfg.intermediate);
        let embeddings = if part.embeddings {
            Some(Embeddings {
                words: get("embeddings.word_embeddings.weight", &[cfg.vocab, h])?,
                positions: get(
                    "embeddings.position_embeddings.weight",
                    &[cfg.max_positions, h],
                )?,
                types: get("embeddings.token_type_embeddings.weight", &[2, h])?,
                norm: Norm {
                    w: get("embeddings.LayerNorm.weight", &[h])?,
                    b: get("embeddings.LayerNorm.bias", &[h])?,
                },
            })
        } else {
            None
        };
        let mut blocks = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            if !part.blocks.contains(&l) {
                blocks.push(None);
                continue;
            }
            let p = format!("encoder.layer.{l}");
            let mut lin = |n: &str, o: usize, i: usize| -> Result<Linear, ForwardError> {
                Ok(Linear {
                    w: get(&format!("{p}.{n}.weight"), &[o, i])?,
                    b: get(&format!("{p}.{n}.bias"), &[o])?,
                    c: None,
                })
            };
            let q = lin("attention.self.query", h, h)?;
            let k = lin("attention.self.key", h, h)?;
            let v = lin("attention.self.value", h, h)?;
            let o = lin("attention.output.dense", h, h)?;
            let up = lin("intermediate.dense", f, h)?;
            let down = lin("output.dense", h, f)?;
            blocks.push(Some(Block {
                q,
                k,
                v,
                o,
                attn_norm: Norm {
                    w: get(&format!("{p}.attention.output.LayerNorm.weight"), &[h])?,
                    b: get(&format!("{p}.attention.output.LayerNorm.bias"), &[h])?,
                },
                up,
                down,
                out_norm: Norm {
                    w: get(&format!("{p}.output.LayerNorm.weight"), &[h])?,
                    b: get(&format!("{p}.output.LayerNorm.bias"), &[h])?,
                },
            }));
        }
        Ok(Bert {
            cfg,
            prefix,
            embeddings,
            blocks,
        })
    }

    /// Replaces a linear weight (calibration swaps in quantized layers).
    pub fn set_weight(&mut self, name: &str, values: Vec<f32>) -> Result<(), ForwardError> {
        if site_of_weight(name).is_none() {
            return Err(ForwardError::Weight {
                name: name.into(),
                why: "not a linear weight of a block".into(),
            });
        }
        let shape = self.tensor(name)?.dims().to_vec();
        if values.len() != shape.iter().product::<usize>() {
            return Err(ForwardError::Weight {
                name: name.into(),
                why: "wrong number of values".into(),
            });
        }
        self.set_tensor(name, Tensor::from_vec(values, shape, &Device::Cpu)?)
    }

    /// Splits a block tensor's name into its layer and its name in the block.
    fn locate<'n>(&self, name: &'n str) -> Result<(usize, &'n str), ForwardError> {
        let rest = name.strip_prefix(&self.prefix).unwrap_or(name);
        crate::split_block_name(rest, "encoder.layer.", self.blocks.len())
    }

    /// Block `layer`, if this part of the model holds it.
    fn block(&self, layer: usize) -> Result<&Block, ForwardError> {
        self.blocks
            .get(layer)
            .and_then(Option::as_ref)
            .ok_or_else(|| crate::not_loaded(format!("{}encoder.layer.{layer}", self.prefix)))
    }

    /// A block tensor (linear weight or bias, LayerNorm gain or shift) by
    /// its HF name.
    pub fn tensor(&self, name: &str) -> Result<&Tensor, ForwardError> {
        let (layer, suffix) = self.locate(name)?;
        block_tensor!(self.block(layer)?, suffix).ok_or_else(|| ForwardError::Weight {
            name: name.into(),
            why: "not a tensor of a block".into(),
        })
    }

    /// Replaces a block tensor by its HF name; the shape must not change.
    /// Distillation swaps in trainable variables this way.
    pub fn set_tensor(&mut self, name: &str, t: Tensor) -> Result<(), ForwardError> {
        let (layer, suffix) = self.locate(name)?;
        let prefix = &self.prefix;
        let block = self
            .blocks
            .get_mut(layer)
            .and_then(Option::as_mut)
            .ok_or_else(|| crate::not_loaded(format!("{prefix}encoder.layer.{layer}")))?;
        crate::replace_block_tensor(block_tensor!(block, suffix, mut), name, t)
    }

    /// The HF names of block `layer`'s parameters of one kind.
    pub fn tunable(&self, layer: usize, kind: Tunable) -> Vec<String> {
        let names: &[&str] = match kind {
            Tunable::Norms => &NORMS,
            Tunable::Biases => &BIASES,
        };
        names
            .iter()
            .map(|n| format!("{}encoder.layer.{layer}.{n}", self.prefix))
            .collect()
    }

    /// The HF names of block `layer`'s linear weights.
    pub fn linear_weights(&self, layer: usize) -> Vec<String> {
        LINEARS
            .iter()
            .map(|n| format!("{}encoder.layer.{layer}.{n}", self.prefix))
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
        if let Some(c) = &c {
            c.check(name, self.tensor(name)?.dims())?;
        }
        let prefix = &self.prefix;
        let block = self
            .blocks
            .get_mut(layer)
            .and_then(Option::as_mut)
            .ok_or_else(|| crate::not_loaded(format!("{prefix}encoder.layer.{layer}")))?;
        let lin = match suffix {
            "attention.self.query.weight" => &mut block.q,
            "attention.self.key.weight" => &mut block.k,
            "attention.self.value.weight" => &mut block.v,
            "attention.output.dense.weight" => &mut block.o,
            "intermediate.dense.weight" => &mut block.up,
            "output.dense.weight" => &mut block.down,
            _ => {
                return Err(ForwardError::Weight {
                    name: name.into(),
                    why: "not a linear weight of a block".into(),
                });
            }
        };
        lin.c = c;
        Ok(())
    }

    /// Embeds one sentence's tokens: `[len, hidden]`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor, ForwardError> {
        let len = tokens.len();
        if len > self.cfg.max_positions {
            return Err(ForwardError::Weight {
                name: "embeddings.position_embeddings.weight".into(),
                why: format!(
                    "{len} tokens, more than {} positions",
                    self.cfg.max_positions
                ),
            });
        }
        if let Some(t) = tokens.iter().find(|t| **t as usize >= self.cfg.vocab) {
            return Err(ForwardError::Weight {
                name: "embeddings.word_embeddings.weight".into(),
                why: format!(
                    "token id {t} is beyond the vocabulary of {}",
                    self.cfg.vocab
                ),
            });
        }
        let e = self.embeddings.as_ref().ok_or_else(|| {
            crate::not_loaded(format!("{}embeddings.word_embeddings.weight", self.prefix))
        })?;
        let ids = Tensor::from_slice(tokens, len, &Device::Cpu)?;
        let x = e.words.index_select(&ids, 0)?;
        let x = (x + e.positions.narrow(0, 0, len)?)?;
        let x = x.broadcast_add(&e.types.get(0)?)?;
        Ok(e.norm.forward(&x, self.cfg.eps)?)
    }

    /// Runs block `layer` over one sentence `x` (`[len, hidden]`); `capture`
    /// sees each linear layer's input.
    pub fn layer(
        &self,
        layer: usize,
        x: &Tensor,
        capture: &mut dyn FnMut(Site, &Tensor) -> Result<(), ForwardError>,
    ) -> Result<Tensor, ForwardError> {
        self.run_block(layer, x, capture, false)
    }

    /// Runs block `layer` over one sentence with operations that record
    /// gradients (candle's fused softmax has no backward pass), for
    /// distillation.
    pub fn layer_for_training(&self, layer: usize, x: &Tensor) -> Result<Tensor, ForwardError> {
        self.run_block(layer, x, &mut |_, _| Ok(()), true)
    }

    fn run_block(
        &self,
        layer: usize,
        x: &Tensor,
        capture: &mut dyn FnMut(Site, &Tensor) -> Result<(), ForwardError>,
        train: bool,
    ) -> Result<Tensor, ForwardError> {
        let b = self.block(layer)?;
        let (len, h) = x.dims2()?;
        let heads = self.cfg.heads;
        let hd = h / heads;
        capture(Site::Attention, x)?;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((len, heads, hd))?.transpose(0, 1)?.contiguous()
        };
        let q = split(b.q.forward(x, train)?)?;
        let k = split(b.k.forward(x, train)?)?;
        let v = split(b.v.forward(x, train)?)?;
        let att = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        let att = if train {
            candle_nn::ops::softmax(&att, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&att)?
        };
        let y = att.matmul(&v)?.transpose(0, 1)?.reshape((len, h))?;
        capture(Site::AttentionOutput, &y)?;
        let x = b
            .attn_norm
            .forward(&(x + b.o.forward(&y, train)?)?, self.cfg.eps)?;
        capture(Site::Mlp, &x)?;
        let m = b.up.forward(&x, train)?.gelu_erf()?;
        capture(Site::MlpDown, &m)?;
        Ok(b.out_norm
            .forward(&(x + b.down.forward(&m, train)?)?, self.cfg.eps)?)
    }

    /// Mean-pooled, L2-normalised sentence embedding of a block stack's output.
    pub fn pool(x: &Tensor) -> Result<Tensor, ForwardError> {
        let m = x.mean(0)?;
        let n = m.sqr()?.sum_all()?.sqrt()?;
        Ok(m.broadcast_div(&n)?.to_dtype(DType::F32)?)
    }

    /// Sentence embedding of one sentence's tokens.
    pub fn embed_sentence(&self, tokens: &[u32]) -> Result<Tensor, ForwardError> {
        let mut x = self.embed(tokens)?;
        for l in 0..self.cfg.layers {
            x = self.layer(l, &x, &mut |_, _| Ok(()))?;
        }
        Bert::pool(&x)
    }
}
