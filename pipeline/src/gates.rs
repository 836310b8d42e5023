//! Quality gates: the finished artifact is measured against the source
//! model at its output (sentence-embedding cosine for encoders; KL
//! divergence and perplexity on held-out text for decoders), and a job
//! whose artifact misses a gate fails with the measured value or, with
//! `on_miss: raise_rate`, runs again one rate step up.
//!
//! The measurement decompresses the artifact into a folder beside it,
//! which is removed afterwards; the artifact itself is never changed, so a
//! gated job's artifact is byte-identical to the ungated job's at the rate
//! it ended on.

use std::fmt;
use std::path::{Path, PathBuf};

use hcx_protocol::JobSpec;
use hcx_protocol::job::{Gates, OnMiss};

use crate::PipelineError;
use crate::run::RunOutcome;

/// Tokens per window of the decoder comparison.
pub const GATE_WINDOW: usize = 256;

/// One gate measured on one artifact.
#[derive(Debug, Clone, PartialEq)]
pub struct GateCheck {
    /// The gate's field (`min_cosine`, `max_kl`, `max_perplexity_increase`).
    pub gate: &'static str,
    /// What was measured.
    pub measured: f64,
    /// The gate's limit.
    pub limit: f64,
    /// Whether the measured value is on the right side of the limit.
    pub passed: bool,
}

impl fmt::Display for GateCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (what, cmp) = match self.gate {
            "min_cosine" => (
                "mean embedding cosine",
                if self.passed { ">=" } else { "<" },
            ),
            "max_kl" => (
                "mean KL divergence (nats)",
                if self.passed { "<=" } else { ">" },
            ),
            _ => ("perplexity increase", if self.passed { "<=" } else { ">" }),
        };
        write!(
            f,
            "{what} {:.6} {cmp} gates.{} {}",
            self.measured, self.gate, self.limit
        )
    }
}

/// The folder a model's config and tokenizer sit in: the model folder, or
/// the folder of a single model file.
fn model_dir(path: &Path) -> PathBuf {
    if path.is_file() {
        path.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        path.to_path_buf()
    }
}

/// Measures the artifact at `artifact` against `spec`'s source model on
/// each of `gates`.
pub fn measure(
    spec: &JobSpec,
    gates: &Gates,
    artifact: &Path,
) -> Result<Vec<GateCheck>, PipelineError> {
    let gate_err = |why: String| PipelineError::Gate { why };
    let name = artifact
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "artifact".into());
    let scratch = artifact
        .parent()
        .unwrap_or(Path::new("."))
        .join(format!(".{name}.gate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)
        .map_err(|e| PipelineError::io(&scratch, "cannot create", e))?;
    let result = (|| {
        let source = spec.model.read_path();
        // A GGUF source is expanded to the dense folder it stands for.
        let reference = if source.extension().is_some_and(|e| e == "gguf") {
            let out = scratch.join("reference");
            let model = crate::model::Model::open(source)?;
            crate::dense::write_model(&model, &out, u64::MAX)?;
            out
        } else {
            model_dir(source)
        };
        let dense = scratch.join("dense");
        crate::artifact::decompress(artifact, &dense)?;
        let mut checks = Vec::new();
        if let Some(limit) = gates.min_cosine {
            if hcx_eval::is_decoder(&reference) {
                return Err(gate_err(
                    "gates.min_cosine measures sentence embeddings, and this model is a decoder: use max_kl or max_perplexity_increase".into(),
                ));
            }
            let c = hcx_eval::embedding_cosine(&reference, &dense, &hcx_eval::default_sentences())
                .map_err(|e| gate_err(format!("embedding cosine: {e}")))?;
            checks.push(GateCheck {
                gate: "min_cosine",
                measured: c.mean_cosine,
                limit,
                passed: c.mean_cosine >= limit,
            });
        }
        if gates.max_kl.is_some() || gates.max_perplexity_increase.is_some() {
            if !hcx_eval::is_decoder(&reference) {
                return Err(gate_err(
                    "gates.max_kl and max_perplexity_increase compare next-token distributions, and this model is not a decoder with a forward pass: use min_cosine".into(),
                ));
            }
            let text: Vec<PathBuf> = hcx_forward::text::HELD_OUT_TEXT
                .iter()
                .map(PathBuf::from)
                .collect();
            let d =
                hcx_eval::decoder_comparison(&reference, &dense, &text, GATE_WINDOW, gates.tokens)
                    .map_err(|e| gate_err(format!("decoder comparison: {e}")))?;
            if let Some(limit) = gates.max_kl {
                checks.push(GateCheck {
                    gate: "max_kl",
                    measured: d.mean_kl,
                    limit,
                    passed: d.mean_kl <= limit,
                });
            }
            if let Some(limit) = gates.max_perplexity_increase {
                let up = d.candidate_perplexity / d.reference_perplexity - 1.0;
                checks.push(GateCheck {
                    gate: "max_perplexity_increase",
                    measured: up,
                    limit,
                    passed: up <= limit,
                });
            }
        }
        Ok(checks)
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// What the gates decided about one try.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Every gate passed.
    Pass,
    /// A gate missed; run again with the job raised this many rate steps.
    Raise(u32),
    /// A gate missed and no raise is left; the job fails with this reason.
    Fail(String),
}

/// Decides what follows a try at `raises` rate steps up that measured
/// `checks`; `notes` are the earlier tries' lines, to which this one's is
/// added.
pub fn verdict(
    spec: &JobSpec,
    gates: &Gates,
    raises: u32,
    checks: &[GateCheck],
    notes: &mut Vec<String>,
) -> Verdict {
    let said: Vec<String> = checks.iter().map(ToString::to_string).collect();
    let at = if raises == 0 {
        "as written".to_string()
    } else {
        format!("{raises} rate step(s) up")
    };
    notes.push(format!("try {} ({at}): {}", raises + 1, said.join("; ")));
    if checks.iter().all(|c| c.passed) {
        return Verdict::Pass;
    }
    let missed: Vec<String> = checks
        .iter()
        .filter(|c| !c.passed)
        .map(ToString::to_string)
        .collect();
    let history = if notes.len() > 1 {
        format!(" (tries: {})", notes.join(" | "))
    } else {
        String::new()
    };
    match gates.on_miss {
        OnMiss::Fail => Verdict::Fail(format!("{}{history}", missed.join("; "))),
        OnMiss::RaiseRate if raises >= gates.max_raises => Verdict::Fail(format!(
            "{} after {raises} rate raise(s), the most gates.max_raises allows{history}",
            missed.join("; ")
        )),
        OnMiss::RaiseRate => match spec.raised_rate(raises + 1) {
            Some(_) => Verdict::Raise(raises + 1),
            None => Verdict::Fail(format!(
                "{}; every quantizer is at its highest rate, nothing is left to raise{history}",
                missed.join("; ")
            )),
        },
    }
}

/// The outcome of a gated run: the artifact's, the number of rate steps it
/// took, and a line per try.
#[derive(Debug)]
pub struct GatedOutcome {
    /// The run that passed.
    pub outcome: RunOutcome,
    /// Rate steps up from the job as written.
    pub raises: u32,
    /// One line per try: what each gate measured.
    pub notes: Vec<String>,
}

/// Runs a job with `run` (given the job at some rate and the output),
/// measures its artifact against the job's gates, and runs again one rate
/// step up while `on_miss: raise_rate` allows. An artifact that misses for
/// good is removed: a failed job leaves no artifact.
pub fn run_gated(
    spec: &JobSpec,
    output: &Path,
    run: impl Fn(&JobSpec, &Path) -> Result<RunOutcome, PipelineError>,
) -> Result<GatedOutcome, PipelineError> {
    let Some(gates) = &spec.gates else {
        return Ok(GatedOutcome {
            outcome: run(spec, output)?,
            raises: 0,
            notes: Vec::new(),
        });
    };
    let mut raises = 0;
    let mut notes = Vec::new();
    loop {
        let at = spec
            .raised_rate(raises)
            .ok_or_else(|| PipelineError::Gate {
                why: format!("the job has no rate {raises} step(s) up"),
            })?;
        let outcome = run(&at, output)?;
        let checks = match measure(spec, gates, &outcome.output) {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&outcome.output);
                return Err(e);
            }
        };
        match verdict(spec, gates, raises, &checks, &mut notes) {
            Verdict::Pass => {
                return Ok(GatedOutcome {
                    outcome,
                    raises,
                    notes,
                });
            }
            Verdict::Raise(n) => raises = n,
            Verdict::Fail(why) => {
                let _ = std::fs::remove_dir_all(&outcome.output);
                return Err(PipelineError::GateMissed { why });
            }
        }
    }
}
