//! Forward passes of the model families hcx-cluster calibrates and
//! evaluates on, written over candle's tensor ops so that every linear
//! layer's input can be seen as it flows: calibration sums those inputs
//! into Hessians, evaluation reads the logits.
//!
//! [`llama::Llama`] runs Llama-family decoders (Llama, SmolLM, Mistral- and
//! Qwen2-style checkpoints in Hugging Face layout) one layer at a time, so a
//! caller can swap a layer's weights between layers (sequential
//! calibration). [`text::token_windows`] cuts text into the fixed windows
//! both use.
#![warn(missing_docs, unreachable_pub)]

pub mod bert;
pub mod llama;
pub mod text;

use std::ops::Range;
use std::path::PathBuf;

/// The part of a model a process loads. A stage of a model split by layer
/// holds only its own blocks (and the embeddings if it is the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// The blocks, by layer index.
    pub blocks: Range<usize>,
    /// Whether the token embeddings are loaded (needed to embed tokens).
    pub embeddings: bool,
    /// Whether the final norm and head are loaded (needed for logits).
    pub head: bool,
}

impl Part {
    /// Every block, the embeddings and the head.
    pub fn whole(layers: usize) -> Part {
        Part {
            blocks: 0..layers,
            embeddings: true,
            head: true,
        }
    }
}

/// The error for a weight outside the loaded part of a model.
pub(crate) fn not_loaded(name: String) -> ForwardError {
    ForwardError::Weight {
        name,
        why: "not loaded in this part of the model".into(),
    }
}

/// Trainable corrections of one linear layer's (quantized) weight Ŵ, which
/// block-wise distillation tunes: the layer computes x·Wᵀ with
/// W = diag(rows)·Ŵ·diag(cols) + a·b (each part optional).
#[derive(Debug, Clone, Default)]
pub struct LinearCorrection {
    /// A gain per output row, `[out]`.
    pub rows: Option<candle_core::Tensor>,
    /// A gain per input column, `[in]`.
    pub cols: Option<candle_core::Tensor>,
    /// The low-rank term's left factor, `[out, rank]`.
    pub a: Option<candle_core::Tensor>,
    /// The low-rank term's right factor, `[rank, in]`.
    pub b: Option<candle_core::Tensor>,
}

impl LinearCorrection {
    /// Checks every part's shape against a weight of `dims` (`[out, in]`).
    pub(crate) fn check(&self, name: &str, dims: &[usize]) -> Result<(), ForwardError> {
        let bad = |why: String| ForwardError::Weight {
            name: name.into(),
            why,
        };
        let &[out, inp] = dims else {
            return Err(bad(format!("a correction needs a matrix, not {dims:?}")));
        };
        let want = |what: &str, t: &Option<candle_core::Tensor>, shape: &[usize]| match t {
            Some(t) if t.dims() != shape => Err(bad(format!(
                "correction {what} has shape {:?}, the weight needs {shape:?}",
                t.dims()
            ))),
            _ => Ok(()),
        };
        want("row gain", &self.rows, &[out])?;
        want("column gain", &self.cols, &[inp])?;
        match (&self.a, &self.b) {
            (None, None) => Ok(()),
            (Some(a), Some(_)) => {
                let rank = a.dims().get(1).copied().unwrap_or(0);
                want("A", &self.a, &[out, rank])?;
                want("B", &self.b, &[rank, inp])
            }
            _ => Err(bad("a low-rank correction needs both A and B".into())),
        }
    }
}

/// x·Wᵀ for a weight that is not trained, whose backward pass gives the
/// gradient of x only: candle's own matmul also computes the weight's,
/// which in a distillation step is a third of the work, thrown away.
struct FrozenMatmul {
    /// The weight, `[out, in]`.
    w: candle_core::Tensor,
}

impl candle_core::CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let candle_core::CpuStorage::F32(v) = s else {
            candle_core::bail!("frozen-matmul takes f32 inputs")
        };
        let dev = candle_core::Device::Cpu;
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("frozen-matmul takes contiguous inputs")
        };
        let x = candle_core::Tensor::from_slice(&v[a..b], l.shape(), &dev)?;
        let y = x.matmul(&self.w.t()?)?;
        let shape = y.shape().clone();
        Ok((
            candle_core::CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?),
            shape,
        ))
    }

    fn bwd(
        &self,
        _x: &candle_core::Tensor,
        _y: &candle_core::Tensor,
        grad: &candle_core::Tensor,
    ) -> candle_core::Result<Option<candle_core::Tensor>> {
        Ok(Some(grad.matmul(&self.w)?))
    }
}

/// x·Wᵀ for a weight `w` (`[out, in]`) with its correction, if any. With
/// `train`, the weight itself gets no gradient (only x and the correction).
pub(crate) fn corrected_matmul(
    x: &candle_core::Tensor,
    w: &candle_core::Tensor,
    c: Option<&LinearCorrection>,
    train: bool,
) -> candle_core::Result<candle_core::Tensor> {
    let product = |x: &candle_core::Tensor| {
        // A weight being tuned (a variable) needs its own gradient.
        if train && x.rank() == 2 && !w.is_variable() {
            x.contiguous()?.apply_op1(FrozenMatmul { w: w.clone() })
        } else {
            x.matmul(&w.t()?)
        }
    };
    let Some(c) = c else {
        return product(x);
    };
    let scaled = match &c.cols {
        Some(g) => x.broadcast_mul(g)?,
        None => x.clone(),
    };
    let mut y = product(&scaled)?;
    if let Some(g) = &c.rows {
        y = y.broadcast_mul(g)?;
    }
    if let (Some(a), Some(b)) = (&c.a, &c.b) {
        y = (y + x.matmul(&b.t()?)?.matmul(&a.t()?)?)?;
    }
    Ok(y)
}

/// A kind of continuous block parameter that block-wise distillation tunes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tunable {
    /// Normalisation gains (and LayerNorm shifts).
    Norms,
    /// The linear layers' biases, where the model has them.
    Biases,
}

/// Splits a block tensor's HF name (`{blocks}{layer}.{suffix}`, e.g.
/// `model.layers.3.input_layernorm.weight`) into its layer, checked against
/// the model's `layers`, and its name in the block.
pub(crate) fn split_block_name<'n>(
    name: &'n str,
    blocks: &str,
    layers: usize,
) -> Result<(usize, &'n str), ForwardError> {
    let bad = |why: &str| ForwardError::Weight {
        name: name.into(),
        why: why.into(),
    };
    let (layer, suffix) = name
        .strip_prefix(blocks)
        .and_then(|r| r.split_once('.'))
        .ok_or_else(|| bad("not a tensor of a block"))?;
    let layer: usize = layer.parse().map_err(|_| bad("not a tensor of a block"))?;
    if layer >= layers {
        return Err(bad("no such layer"));
    }
    Ok((layer, suffix))
}

/// Puts `t` in a block tensor's `slot` (found by name, `None` when the
/// block has no such tensor); the shape must not change.
pub(crate) fn replace_block_tensor(
    slot: Option<&mut candle_core::Tensor>,
    name: &str,
    t: candle_core::Tensor,
) -> Result<(), ForwardError> {
    let slot = slot.ok_or_else(|| ForwardError::Weight {
        name: name.into(),
        why: "not a tensor of this model's blocks".into(),
    })?;
    if slot.dims() != t.dims() {
        return Err(ForwardError::Weight {
            name: name.into(),
            why: format!("shape {:?}, the model has {:?}", t.dims(), slot.dims()),
        });
    }
    *slot = t;
    Ok(())
}

/// Why a model could not be built or run; each variant says what and where.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// `config.json` is missing something or names an unsupported model.
    #[error("{}: {why}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A weight is missing or has the wrong shape.
    #[error("weight `{name}`: {why}")]
    Weight {
        /// The tensor's HF name.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// A candle operation failed.
    #[error("forward pass: {0}")]
    Candle(#[from] candle_core::Error),
    /// The text cannot be used.
    #[error("{}: {why}", path.display())]
    Text {
        /// The text file (or `<text>` for text given in memory).
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}
