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
