//! Decoder language models judged at their output: perplexity of the
//! reference and of the candidate on held-out text, the mean KL divergence
//! KL(reference ‖ candidate) of their next-token distributions (llama.cpp's
//! KL-divergence mode), and how often their most likely next token agrees.
//!
//! The text is tokenized with the reference's tokenizer and cut into
//! non-overlapping windows of `ctx` tokens, each run from position 0. As in
//! llama.cpp's perplexity and KL-divergence modes, only the second half of
//! each window is scored — positions ctx/2 … ctx−2, each predicting the next
//! token of the window with at least ctx/2 tokens of context — so early
//! positions with little context do not dominate. The KL divergence over
//! every position of every window is reported beside it.

use std::path::{Path, PathBuf};

use candle_core::{D, Tensor};
use hcx_forward::llama::{Llama, log_softmax};
use hcx_forward::text::{TextTokenizer, read_texts, token_windows};
use serde::Serialize;

use crate::EvalError;

/// Windows evaluated together (bounds the logits held at once).
const BATCH: usize = 4;

/// What [`decoder_comparison`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct DecoderComparison {
    /// Tokens per window.
    pub ctx: usize,
    /// Windows evaluated.
    pub windows: usize,
    /// Tokens of text read (windows × ctx).
    pub tokens: usize,
    /// Positions scored (the second half of each window).
    pub scored: usize,
    /// Perplexity of the reference on the text.
    pub reference_perplexity: f64,
    /// Perplexity of the candidate on the text.
    pub candidate_perplexity: f64,
    /// Mean KL(reference ‖ candidate) over the scored positions, nats.
    pub mean_kl: f64,
    /// Mean KL over every position of every window, nats.
    pub mean_kl_all_positions: f64,
    /// Largest KL at one scored position, nats.
    pub max_kl: f64,
    /// Share of scored positions where both models' most likely next token agree.
    pub top1_agreement: f64,
}

/// True when `dir/config.json` names a decoder architecture with a forward pass.
pub fn is_decoder(dir: &Path) -> bool {
    hcx_forward::llama::LlamaConfig::read(dir).is_ok()
}

fn fw(e: hcx_forward::ForwardError) -> EvalError {
    EvalError::Forward(e)
}

/// Compares two decoder folders over `text` (files joined), at most
/// `max_tokens` positions in windows of `ctx` tokens.
pub fn decoder_comparison(
    reference: &Path,
    candidate: &Path,
    text: &[PathBuf],
    ctx: usize,
    max_tokens: usize,
) -> Result<DecoderComparison, EvalError> {
    let tok = TextTokenizer::load(reference).map_err(fw)?;
    let joined = read_texts(text).map_err(fw)?;
    let ids = tok.encode(&joined).map_err(fw)?;
    let source = text.first().cloned().unwrap_or_default();
    let windows_tokens =
        token_windows(&ids, ctx, (max_tokens / ctx.max(1)).max(1), &source).map_err(fw)?;
    let a = Llama::load_dir(reference, ctx).map_err(fw)?;
    let b = Llama::load_dir(candidate, ctx).map_err(fw)?;
    if a.cfg != b.cfg {
        return Err(EvalError::Forward(hcx_forward::ForwardError::Config {
            path: candidate.join("config.json"),
            why: "describes another model shape than the reference's".into(),
        }));
    }
    let windows = windows_tokens.len() / ctx;
    if ctx < 4 {
        return Err(EvalError::Forward(hcx_forward::ForwardError::Text {
            path: source,
            why: format!("a window of {ctx} tokens is too short to score (at least 4)"),
        }));
    }
    let first = ctx / 2;
    let mut nll_a = 0f64;
    let mut nll_b = 0f64;
    let mut scored = 0usize;
    let mut kl_sum = 0f64;
    let mut kl_all = 0f64;
    let mut kl_max = 0f64;
    let mut agree = 0usize;
    for chunk in windows_tokens.chunks(BATCH * ctx) {
        let batch = chunk.len() / ctx;
        let la = log_softmax(&a.forward(chunk, batch, ctx).map_err(fw)?).map_err(fw)?;
        let lb = log_softmax(&b.forward(chunk, batch, ctx).map_err(fw)?).map_err(fw)?;
        let kl = (la.exp()? * (&la - &lb)?)?
            .sum(D::Minus1)?
            .to_vec1::<f32>()?;
        let ta = la.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let tb = lb.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let mut rows = Vec::new();
        let mut next = Vec::new();
        for (i, v) in kl.iter().enumerate() {
            let v = *v as f64;
            kl_all += v;
            let p = i % ctx;
            if p >= first && p + 1 < ctx {
                kl_sum += v;
                kl_max = kl_max.max(v);
                agree += usize::from(ta[i] == tb[i]);
                rows.push(i as u32);
                next.push(chunk[i + 1]);
            }
        }
        let n = rows.len();
        let rows = Tensor::from_vec(rows, n, la.device())?;
        let next = Tensor::from_vec(next, (n, 1), la.device())?;
        for (lp, acc) in [(&la, &mut nll_a), (&lb, &mut nll_b)] {
            let picked = lp.index_select(&rows, 0)?.gather(&next, 1)?;
            for v in picked.flatten_all()?.to_vec1::<f32>()? {
                *acc -= v as f64;
            }
        }
        scored += n;
    }
    let tokens = windows * ctx;
    let n = scored.max(1) as f64;
    Ok(DecoderComparison {
        ctx,
        windows,
        tokens,
        scored,
        reference_perplexity: (nll_a / n).exp(),
        candidate_perplexity: (nll_b / n).exp(),
        mean_kl: kl_sum / n,
        mean_kl_all_positions: kl_all / tokens.max(1) as f64,
        max_kl: kl_max,
        top1_agreement: agree as f64 / n,
    })
}

/// True for the linear weights of a decoder block (q, k, v, o, gate, up,
/// down): the tensors decoder bits-per-weight and SQNR figures are over.
pub fn is_decoder_linear_weight(name: &str) -> bool {
    hcx_forward::llama::Site::of_weight(name).is_some()
}
