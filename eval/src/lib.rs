//! Measures a compressed model against its source.
//!
//! Two views of the damage compression did, both over dense safetensors
//! model folders (the reference and a decoded candidate):
//!
//! - [`compare_tensors`] reads every tensor of both folders and reports the
//!   signal-to-quantisation-noise ratio (SQNR, in dB) of each; a
//!   [`TensorComparison`] summarises them with
//!   [`TensorComparison::weighted_mean_sqnr`], usually filtered with
//!   [`is_encoder_linear_weight`].
//! - [`embedding_cosine`] runs a BERT-family sentence encoder
//!   ([`sentence_embeddings`]: mean pooling, L2 normalisation) from both
//!   folders over the same sentences, by default [`default_sentences`], and
//!   reports the cosine between the two embeddings of each sentence in an
//!   [`EmbeddingComparison`].
//!
//! - [`decoder_comparison`] runs a Llama-family decoder from both folders
//!   over held-out text and reports perplexity, KL divergence of the
//!   next-token distributions and top-1 agreement ([`DecoderComparison`]).
//!
//! Every failure is an [`EvalError`] naming the file or tensor at fault;
//! nothing here panics on bad input.
#![warn(missing_docs, unreachable_pub)]

mod decoder;
mod embeddings;
mod tensors;

pub use decoder::{DecoderComparison, decoder_comparison, is_decoder, is_decoder_linear_weight};
pub use embeddings::{
    EmbeddingComparison, default_sentences, embedding_cosine, sentence_embeddings,
};
pub use tensors::{TensorComparison, TensorSqnr, compare_tensors, is_encoder_linear_weight};

use std::path::PathBuf;

/// Why an evaluation failed; each variant names the file, folder or tensor
/// at fault.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A file or folder could not be read.
    #[error("cannot read `{}`: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A model folder holds no `*.safetensors` file.
    #[error("no `*.safetensors` file in `{}`", dir.display())]
    NoSafetensors {
        /// The folder.
        dir: PathBuf,
    },
    /// A file is not valid safetensors.
    #[error("cannot parse `{}` as safetensors: {source}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: safetensors::SafeTensorError,
    },
    /// Two safetensors files of one folder hold a tensor of the same name.
    #[error("tensor `{tensor}` appears in more than one safetensors file of `{}`", dir.display())]
    DuplicateTensor {
        /// The tensor.
        tensor: String,
        /// The folder.
        dir: PathBuf,
    },
    /// A tensor of the reference is not in the candidate.
    #[error("tensor `{tensor}` of the reference is missing from the candidate `{}`", candidate.display())]
    MissingTensor {
        /// The tensor.
        tensor: String,
        /// The candidate folder.
        candidate: PathBuf,
    },
    /// A tensor has different shapes in the reference and the candidate.
    #[error(
        "tensor `{tensor}` has shape {reference:?} in the reference but {candidate:?} in the candidate"
    )]
    ShapeMismatch {
        /// The tensor.
        tensor: String,
        /// Its shape in the reference.
        reference: Vec<usize>,
        /// Its shape in the candidate.
        candidate: Vec<usize>,
    },
    /// A tensor's dtype is one this crate cannot compare.
    #[error(
        "tensor `{tensor}` has dtype {dtype}, which eval cannot compare (only f32, f16, bf16, f64 and integers)"
    )]
    UnsupportedDtype {
        /// The tensor.
        tensor: String,
        /// Its dtype.
        dtype: String,
    },
    /// A tensor is floating-point on one side and integer on the other.
    #[error("tensor `{tensor}` is {reference} in the reference but {candidate} in the candidate")]
    DtypeMismatch {
        /// The tensor.
        tensor: String,
        /// Its dtype in the reference.
        reference: String,
        /// Its dtype in the candidate.
        candidate: String,
    },
    /// An integer tensor (e.g. `position_ids`) differs; integer tensors
    /// must come through compression unchanged.
    #[error("integer tensor `{tensor}` differs between the reference and the candidate")]
    IntegerMismatch {
        /// The tensor.
        tensor: String,
    },
    /// A `config.json` could not be parsed.
    #[error("cannot parse `{}`: {source}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: serde_json::Error,
    },
    /// The model is not BERT-family, the only kind the embedding eval runs.
    #[error("sentence-embedding eval supports BERT-family models; `{}` says model_type `{model_type}`", path.display())]
    NotBert {
        /// The `config.json` consulted.
        path: PathBuf,
        /// Its `model_type` (`<none>` when absent).
        model_type: String,
    },
    /// The tokenizer could not be loaded or failed on the input.
    #[error("tokenizer `{}`: {source}", path.display())]
    Tokenizer {
        /// The `tokenizer.json`.
        path: PathBuf,
        /// The underlying error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Loading or running the BERT model failed.
    #[error("bert model in `{}`: {source}", dir.display())]
    Model {
        /// The model folder.
        dir: PathBuf,
        /// The underlying error.
        source: candle_core::Error,
    },
    /// The two models' embeddings cannot be compared.
    #[error(
        "embeddings differ in shape: the reference gives {reference} of width {reference_dim}, the candidate {candidate} of width {candidate_dim}"
    )]
    EmbeddingMismatch {
        /// Number of reference embeddings.
        reference: usize,
        /// Their width.
        reference_dim: usize,
        /// Number of candidate embeddings.
        candidate: usize,
        /// Their width.
        candidate_dim: usize,
    },
    /// No sentences were given to compare over.
    #[error("no sentences to compare embeddings over")]
    NoSentences,
    /// A decoder could not be loaded or run, or its text cannot be used.
    #[error(transparent)]
    Forward(#[from] hcx_forward::ForwardError),
}

impl From<candle_core::Error> for EvalError {
    fn from(e: candle_core::Error) -> EvalError {
        EvalError::Forward(hcx_forward::ForwardError::Candle(e))
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::path::PathBuf;

    /// The real test model: `$HCX_MODEL_DIR`, else `../models/all-MiniLM-L6-v2`
    /// beside this crate. A missing model fails the test that asked for it:
    /// `scripts/test.sh` fetches it first, so absence is a broken setup.
    pub(crate) fn model_dir() -> PathBuf {
        let dir = std::env::var_os("HCX_MODEL_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/all-MiniLM-L6-v2")
            });
        assert!(
            dir.join("model.safetensors").is_file(),
            "the test model is missing at `{}`: run scripts/fetch-model.sh (scripts/test.sh does) or set HCX_MODEL_DIR",
            dir.join("model.safetensors").display()
        );
        dir
    }
}
