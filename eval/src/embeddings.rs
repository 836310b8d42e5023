//! Sentence embeddings from a BERT-family encoder, and the cosine between a
//! reference model's embeddings and a candidate's.

use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use serde::Serialize;
use tokenizers::{PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::EvalError;
use crate::tensors::safetensors_files;

/// Sentences per forward pass.
const BATCH: usize = 16;
/// Longest input in tokens (sentence-transformers' limit for MiniLM).
const MAX_TOKENS: usize = 256;

/// The evaluation sentences shipped with the crate
/// (`configs/eval/sentences.txt`), one per non-blank line.
pub fn default_sentences() -> Vec<String> {
    include_str!("../../configs/eval/sentences.txt")
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(String::from)
        .collect()
}

/// How close a candidate's sentence embeddings are to the reference's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EmbeddingComparison {
    /// Number of sentences embedded.
    pub sentences: usize,
    /// Mean over sentences of the cosine between the two embeddings.
    pub mean_cosine: f64,
    /// The smallest of those cosines.
    pub min_cosine: f64,
}

/// A loaded BERT encoder and its tokenizer.
struct Encoder {
    dir: PathBuf,
    tokenizer_path: PathBuf,
    tokenizer: Tokenizer,
    model: BertModel,
}

/// Reads `config.json` at `path`, refusing models that are not BERT-family.
fn read_config(path: &Path) -> Result<Config, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let config_error = |source| EvalError::Config {
        path: path.to_path_buf(),
        source,
    };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(config_error)?;
    let model_type = value.get("model_type").and_then(|v| v.as_str());
    let bert_architecture = value
        .get("architectures")
        .and_then(|v| v.as_array())
        .is_some_and(|archs| archs.iter().any(|a| a.as_str() == Some("BertModel")));
    if model_type != Some("bert") && !bert_architecture {
        return Err(EvalError::NotBert {
            path: path.to_path_buf(),
            model_type: model_type.unwrap_or("<none>").to_string(),
        });
    }
    serde_json::from_value(value).map_err(config_error)
}

impl Encoder {
    /// Loads the weights in `dir` with the given config and tokenizer files.
    fn load(dir: &Path, config_path: &Path, tokenizer_path: &Path) -> Result<Self, EvalError> {
        let config = read_config(config_path)?;
        let files = safetensors_files(dir)?;
        let model_error = |source| EvalError::Model {
            dir: dir.to_path_buf(),
            source,
        };
        // SAFETY: candle memory-maps the files and reads them while the
        // model is built (weights are converted to owned F32 tensors on the
        // CPU); as for every model reader we assume the files are not
        // truncated or rewritten meanwhile.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu) }
            .map_err(model_error)?;
        // BertModel::load looks for `embeddings.*`/`encoder.*` at the root
        // (sentence-transformers checkpoints), under `bert.` (HF `BertModel`
        // exports) or under `{model_type}.`.
        let model = BertModel::load(vb, &config).map_err(model_error)?;

        let tokenizer_error = |source| EvalError::Tokenizer {
            path: tokenizer_path.to_path_buf(),
            source,
        };
        let mut tokenizer = Tokenizer::from_file(tokenizer_path).map_err(tokenizer_error)?;
        // Pad on the right (candle's BERT numbers positions from 0) to the
        // longest sentence of each batch, keeping the tokenizer's pad token.
        let padding = match tokenizer.get_padding() {
            Some(p) => PaddingParams {
                strategy: PaddingStrategy::BatchLongest,
                direction: PaddingDirection::Right,
                pad_to_multiple_of: None,
                ..p.clone()
            },
            None => PaddingParams::default(),
        };
        tokenizer.with_padding(Some(padding));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS.min(config.max_position_embeddings),
                ..TruncationParams::default()
            }))
            .map_err(tokenizer_error)?;
        Ok(Encoder {
            dir: dir.to_path_buf(),
            tokenizer_path: tokenizer_path.to_path_buf(),
            tokenizer,
            model,
        })
    }

    /// Mean-pooled, L2-normalised embeddings of `sentences`, in order.
    fn embed(&self, sentences: &[String]) -> Result<Vec<Vec<f32>>, EvalError> {
        let mut out = Vec::with_capacity(sentences.len());
        for batch in sentences.chunks(BATCH) {
            out.extend(self.embed_batch(batch)?);
        }
        Ok(out)
    }

    fn embed_batch(&self, batch: &[String]) -> Result<Vec<Vec<f32>>, EvalError> {
        let inputs: Vec<&str> = batch.iter().map(String::as_str).collect();
        let encodings = self
            .tokenizer
            .encode_batch(inputs, true)
            .map_err(|source| EvalError::Tokenizer {
                path: self.tokenizer_path.clone(),
                source,
            })?;
        let rows = encodings.len();
        let width = encodings.iter().map(|e| e.len()).max().unwrap_or(0);
        let (mut ids, mut types, mut mask) = (
            vec![0u32; rows * width],
            vec![0u32; rows * width],
            vec![0u32; rows * width],
        );
        // Padding makes every encoding `width` long; copying row by row keeps
        // a short one (were padding ever off) masked out rather than wrong.
        for (row, encoding) in encodings.iter().enumerate() {
            let at = row * width;
            let len = encoding.len();
            ids[at..at + len].copy_from_slice(encoding.get_ids());
            types[at..at + len].copy_from_slice(encoding.get_type_ids());
            mask[at..at + len].copy_from_slice(encoding.get_attention_mask());
        }
        self.pool(ids, types, mask, (rows, width))
            .map_err(|source| EvalError::Model {
                dir: self.dir.clone(),
                source,
            })
    }

    /// Runs the model and mean-pools over the attention mask.
    fn pool(
        &self,
        ids: Vec<u32>,
        types: Vec<u32>,
        mask: Vec<u32>,
        shape: (usize, usize),
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let device = Device::Cpu;
        let ids = Tensor::from_vec(ids, shape, &device)?;
        let types = Tensor::from_vec(types, shape, &device)?;
        let mask = Tensor::from_vec(mask, shape, &device)?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?; // (b, t, h)
        let weights = mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?; // (b, t, 1)
        let summed = hidden.broadcast_mul(&weights)?.sum(1)?; // (b, h)
        let counts = weights.sum(1)?.maximum(1e-9f32)?; // (b, 1)
        let mean = summed.broadcast_div(&counts)?;
        let norms = mean.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(1e-12f32)?;
        mean.broadcast_div(&norms)?.to_vec2::<f32>()
    }
}

/// Sentence embeddings of a BERT-family model folder: `config.json`,
/// `tokenizer.json` and the weights in its `*.safetensors` files (any float
/// dtype; run as F32 on the CPU). Sentences are tokenized in batches of 16,
/// padded to the longest and truncated to 256 tokens; the last hidden
/// state is mean-pooled over the attention mask and L2-normalised, as
/// sentence-transformers does for all-MiniLM-L6-v2.
pub fn sentence_embeddings(
    model_dir: &Path,
    sentences: &[String],
) -> Result<Vec<Vec<f32>>, EvalError> {
    Encoder::load(
        model_dir,
        &model_dir.join("config.json"),
        &model_dir.join("tokenizer.json"),
    )?
    .embed(sentences)
}

/// `name` in `candidate`, or in `reference` when the candidate lacks it.
fn own_or_reference(candidate: &Path, reference: &Path, name: &str) -> PathBuf {
    let own = candidate.join(name);
    if own.is_file() {
        own
    } else {
        reference.join(name)
    }
}

/// Cosine between two vectors, accumulated in f64.
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        dot += x * y;
        aa += x * x;
        bb += y * y;
    }
    dot / (aa.sqrt() * bb.sqrt())
}

/// Embeds `sentences` with the model in `reference` and the model in
/// `candidate` (see [`sentence_embeddings`]) and reports the cosine between
/// each sentence's two embeddings. A candidate folder holding only weights
/// borrows `config.json` and `tokenizer.json` from the reference.
pub fn embedding_cosine(
    reference: &Path,
    candidate: &Path,
    sentences: &[String],
) -> Result<EmbeddingComparison, EvalError> {
    if sentences.is_empty() {
        return Err(EvalError::NoSentences);
    }
    let ours = sentence_embeddings(reference, sentences)?;
    let theirs = Encoder::load(
        candidate,
        &own_or_reference(candidate, reference, "config.json"),
        &own_or_reference(candidate, reference, "tokenizer.json"),
    )?
    .embed(sentences)?;
    let width = |e: &[Vec<f32>]| e.first().map_or(0, Vec::len);
    if ours.len() != theirs.len() || width(&ours) != width(&theirs) {
        return Err(EvalError::EmbeddingMismatch {
            reference: ours.len(),
            reference_dim: width(&ours),
            candidate: theirs.len(),
            candidate_dim: width(&theirs),
        });
    }
    let cosines: Vec<f64> = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| cosine(a, b))
        .collect();
    let mean_cosine = cosines.iter().sum::<f64>() / cosines.len() as f64;
    // NaN-propagating minimum: a NaN cosine must not hide.
    let min_cosine = cosines.iter().fold(
        f64::INFINITY,
        |m, &c| if c.is_nan() || c < m { c } else { m },
    );
    Ok(EmbeddingComparison {
        sentences: sentences.len(),
        mean_cosine,
        min_cosine,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::model_dir;
    use crate::{compare_tensors, is_encoder_linear_weight};
    use hcx_kernels::rng::gaussian_vec;
    use safetensors::SafeTensors;
    use safetensors::tensor::TensorView;
    use std::time::Instant;

    #[test]
    fn calibration_forward_pass_matches_candles_bert() {
        // The encoder forward pass calibration runs (one sentence at a time,
        // every linear input visible) gives the embeddings this crate's
        // candle BertModel gives.
        let dir = model_dir();
        let sentences: Vec<String> = default_sentences().into_iter().take(6).collect();
        let theirs = sentence_embeddings(&dir, &sentences).unwrap();
        let cfg_text = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let cfg =
            hcx_forward::bert::BertConfig::parse(&dir.join("config.json"), &cfg_text).unwrap();
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut src =
            |name: &str| -> Result<hcx_forward::llama::Weight, hcx_forward::ForwardError> {
                Ok(st.tensor(name).ok().map(|t| {
                    let v: Vec<f32> = t
                        .data()
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    (v, t.shape().to_vec())
                }))
            };
        let bert = hcx_forward::bert::Bert::load(cfg, &mut src).unwrap();
        let tok = hcx_forward::text::TextTokenizer::load(&dir).unwrap();
        for (s, t) in sentences.iter().zip(&theirs) {
            let ids = tok.encode_with_special(s).unwrap();
            let ours = bert.embed_sentence(&ids).unwrap().to_vec1::<f32>().unwrap();
            let cos: f32 = ours.iter().zip(t).map(|(a, b)| a * b).sum();
            assert!(cos > 0.99999, "{s}: cosine {cos}");
        }
    }

    #[test]
    fn default_sentences_are_64_varied_lines() {
        let sentences = default_sentences();
        assert_eq!(sentences.len(), 64);
        for s in &sentences {
            let words = s.split_whitespace().count();
            assert!((4..=40).contains(&words), "{words} words: {s}");
        }
    }

    #[test]
    fn reference_matches_itself() {
        let dir = model_dir();
        let sentences = default_sentences();
        let start = Instant::now();
        let embeddings = sentence_embeddings(&dir, &sentences).unwrap();
        eprintln!(
            "embedding {} sentences with the reference model took {:.2?}",
            sentences.len(),
            start.elapsed()
        );
        assert_eq!(embeddings.len(), 64);
        for e in &embeddings {
            assert_eq!(e.len(), 384);
            let norm = e.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "{norm}");
        }

        let cmp = embedding_cosine(&dir, &dir, &sentences).unwrap();
        assert_eq!(cmp.sentences, 64);
        assert!((cmp.mean_cosine - 1.0).abs() < 1e-6, "{cmp:?}");
        assert!((cmp.min_cosine - 1.0).abs() < 1e-6, "{cmp:?}");

        let tensors = compare_tensors(&dir, &dir).unwrap();
        assert!(tensors.tensors.iter().all(|t| t.sqnr_db.is_none()));
    }

    #[test]
    fn paraphrases_are_closer_than_unrelated_sentences() {
        let dir = model_dir();
        // The sentence-transformers quickstart (sbert.net, "Usage") prints
        // these cosines for all-MiniLM-L6-v2: 0.6660, 0.1046 and 0.1411.
        let sentences: Vec<String> = [
            "The weather is lovely today.",
            "It's so sunny outside!",
            "He drove to the stadium.",
        ]
        .map(String::from)
        .to_vec();
        let e = sentence_embeddings(&dir, &sentences).unwrap();
        let paraphrase = cosine(&e[0], &e[1]);
        let unrelated = cosine(&e[0], &e[2]);
        let other = cosine(&e[1], &e[2]);
        eprintln!("cos(paraphrase) = {paraphrase:.4}, cos(unrelated) = {unrelated:.4}, {other:.4}");
        assert!(paraphrase > unrelated + 0.2, "{paraphrase} vs {unrelated}");
        for (got, published) in [(paraphrase, 0.6660), (unrelated, 0.1046), (other, 0.1411)] {
            assert!((got - published).abs() < 2e-3, "{got} vs {published}");
        }

        // Batching and padding do not change a sentence's embedding.
        let alone = sentence_embeddings(&dir, &sentences[2..]).unwrap();
        assert!(cosine(&alone[0], &e[2]) > 1.0 - 1e-5);
    }

    /// Copies the model in `dir` to a temp folder, replacing `tensor` with
    /// `replace(values)` (F32 only) and keeping config and tokenizer.
    fn perturbed_copy(
        dir: &Path,
        tensor: &str,
        replace: impl Fn(&[f32]) -> Vec<f32>,
    ) -> tempfile::TempDir {
        let out = tempfile::tempdir().unwrap();
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let original = file.tensor(tensor).unwrap();
        let values: Vec<f32> = original
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let new_bytes: Vec<u8> = replace(&values)
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let tensors: Vec<(String, TensorView<'_>)> = file
            .tensors()
            .into_iter()
            .map(|(name, view)| {
                if name == tensor {
                    let view =
                        TensorView::new(view.dtype(), view.shape().to_vec(), &new_bytes).unwrap();
                    (name, view)
                } else {
                    (name, view)
                }
            })
            .collect();
        safetensors::serialize_to_file(tensors, None, &out.path().join("model.safetensors"))
            .unwrap();
        for name in ["config.json", "tokenizer.json"] {
            std::fs::copy(dir.join(name), out.path().join(name)).unwrap();
        }
        out
    }

    #[test]
    fn perturbed_weight_shows_in_sqnr_and_cosine() {
        let dir = model_dir();
        let target = "encoder.layer.2.intermediate.dense.weight";
        // Noise at 10% of the weight's RMS: SQNR = -20 log10(0.1) = 20 dB.
        let relative = 0.1f64;
        let candidate = perturbed_copy(&dir, target, |w| {
            let rms = (w.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
            let noise = gaussian_vec(0x5eed, w.len());
            w.iter()
                .zip(&noise)
                .map(|(x, n)| x + (relative * rms) as f32 * n)
                .collect()
        });

        let tensors = compare_tensors(&dir, candidate.path()).unwrap();
        for t in &tensors.tensors {
            if t.name == target {
                let sqnr = t.sqnr_db.expect("the perturbed tensor is not exact");
                let expected = -20.0 * relative.log10();
                eprintln!("{target}: SQNR {sqnr:.3} dB (expected {expected:.1} dB)");
                assert!(sqnr.is_finite() && (sqnr - expected).abs() < 0.5, "{sqnr}");
                assert_eq!(t.params, 1536 * 384);
            } else {
                assert_eq!(t.sqnr_db, None, "{} changed", t.name);
            }
        }
        let mean = tensors
            .weighted_mean_sqnr(is_encoder_linear_weight)
            .unwrap();
        assert!(
            (mean
                - tensors
                    .tensors
                    .iter()
                    .find(|t| t.name == target)
                    .unwrap()
                    .sqnr_db
                    .unwrap())
            .abs()
                < 1e-9
        );

        let cmp = embedding_cosine(&dir, candidate.path(), &default_sentences()).unwrap();
        eprintln!("perturbed model: {cmp:?}");
        assert!(
            cmp.mean_cosine < 1.0 - 1e-6 && cmp.mean_cosine > 0.9,
            "{cmp:?}"
        );
        assert!(
            cmp.min_cosine > 0.9 && cmp.min_cosine <= cmp.mean_cosine,
            "{cmp:?}"
        );
    }

    #[test]
    fn candidate_without_config_borrows_the_references() {
        let dir = model_dir();
        let weights_only = tempfile::tempdir().unwrap();
        // An F16 copy of the weights alone: loads as F32, nearly identical.
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let converted: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = file
            .tensors()
            .into_iter()
            .map(|(name, view)| match view.dtype() {
                safetensors::Dtype::F32 => {
                    let data = view
                        .data()
                        .chunks_exact(4)
                        .flat_map(|b| {
                            half::f16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                                .to_le_bytes()
                        })
                        .collect();
                    (name, safetensors::Dtype::F16, view.shape().to_vec(), data)
                }
                dtype => (name, dtype, view.shape().to_vec(), view.data().to_vec()),
            })
            .collect();
        let views: Vec<(&str, TensorView<'_>)> = converted
            .iter()
            .map(|(name, dtype, shape, data)| {
                (
                    name.as_str(),
                    TensorView::new(*dtype, shape.clone(), data).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &weights_only.path().join("model.safetensors"))
            .unwrap();
        let sentences = default_sentences()[..8].to_vec();
        let cmp = embedding_cosine(&dir, weights_only.path(), &sentences).unwrap();
        eprintln!("f16 weights: {cmp:?}");
        assert!(cmp.min_cosine > 0.999 && cmp.mean_cosine < 1.0, "{cmp:?}");
        let tensors = compare_tensors(&dir, weights_only.path()).unwrap();
        let mean = tensors.weighted_mean_sqnr(|_| true).unwrap();
        assert!((60.0..90.0).contains(&mean), "{mean}");
    }

    #[test]
    fn non_bert_and_broken_folders_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let sentences = vec!["hello there".to_string()];

        let err = sentence_embeddings(dir.path(), &sentences).unwrap_err();
        assert!(matches!(err, EvalError::Io { .. }), "{err}");
        assert!(err.to_string().contains("config.json"), "{err}");

        let config = dir.path().join("config.json");
        std::fs::write(
            &config,
            r#"{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}"#,
        )
        .unwrap();
        let err = sentence_embeddings(dir.path(), &sentences).unwrap_err();
        let message = err.to_string();
        assert!(
            message.starts_with("sentence-embedding eval supports BERT-family models;")
                && message.contains(&format!("`{}`", config.display()))
                && message.contains("model_type `gpt2`"),
            "{message}"
        );

        std::fs::write(&config, r#"{"architectures": ["LlamaForCausalLM"]}"#).unwrap();
        let message = sentence_embeddings(dir.path(), &sentences)
            .unwrap_err()
            .to_string();
        assert!(message.contains("model_type `<none>`"), "{message}");

        std::fs::write(&config, "{ not json").unwrap();
        let err = sentence_embeddings(dir.path(), &sentences).unwrap_err();
        assert!(matches!(err, EvalError::Config { .. }), "{err}");

        // BERT by architecture, but missing fields the config needs.
        std::fs::write(&config, r#"{"architectures": ["BertModel"]}"#).unwrap();
        let err = sentence_embeddings(dir.path(), &sentences).unwrap_err();
        assert!(matches!(err, EvalError::Config { .. }), "{err}");

        let err = embedding_cosine(dir.path(), dir.path(), &[]).unwrap_err();
        assert!(matches!(err, EvalError::NoSentences), "{err}");
    }

    #[test]
    fn model_errors_name_the_folder_and_tensor() {
        let dir = model_dir();
        let broken = tempfile::tempdir().unwrap();
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let dropped = "encoder.layer.3.attention.self.key.weight";
        let kept: Vec<(String, TensorView<'_>)> = file
            .tensors()
            .into_iter()
            .filter(|(name, _)| name != dropped)
            .collect();
        safetensors::serialize_to_file(kept, None, &broken.path().join("model.safetensors"))
            .unwrap();
        let sentences = vec!["one short sentence".to_string()];
        let message = embedding_cosine(&dir, broken.path(), &sentences)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains(&broken.path().display().to_string())
                && message.contains("encoder.layer.3.attention.self.key"),
            "{message}"
        );
        let message = compare_tensors(&dir, broken.path())
            .unwrap_err()
            .to_string();
        assert!(
            message.contains(&format!("tensor `{dropped}`")),
            "{message}"
        );

        // A missing tokenizer is named too.
        std::fs::copy(
            dir.join("model.safetensors"),
            broken.path().join("model.safetensors"),
        )
        .unwrap();
        std::fs::copy(dir.join("config.json"), broken.path().join("config.json")).unwrap();
        let message = sentence_embeddings(broken.path(), &sentences)
            .unwrap_err()
            .to_string();
        assert!(message.contains("tokenizer.json"), "{message}");
    }
}
