//! The `hcx-cluster` command line: the main entry point. Each subcommand
//! parses its arguments and calls into the library crates (`hcx-protocol`,
//! `hcx-pipeline`, `hcx-eval`); nothing here does tensor math.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use hcx_pipeline::artifact::{self, Inspection};
use hcx_pipeline::attribution;
use hcx_protocol::JobSpec;

/// The example job run when `hcx-cluster run` is given no file.
const DEFAULT_JOB: &str = include_str!("../configs/jobs/minilm-4bit.yaml");

#[derive(Parser)]
#[command(
    name = "hcx-cluster",
    version,
    about = "Compresses neural-network models and reports what each stage cost and saved"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a job on this machine and write its artifact.
    Run {
        /// The job file; without it, the embedded MiniLM 4-bit example runs on
        /// `models/all-MiniLM-L6-v2` (or $HCX_MODEL_DIR) into `out/minilm-4bit`.
        job: Option<PathBuf>,
        /// Write the artifact here instead of the job's `output`.
        #[arg(long)]
        output: Option<PathBuf>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a job file without running it.
    Validate {
        /// The job file.
        job: PathBuf,
    },
    /// Print the JSON Schema of job files.
    Schema,
    /// Turn an artifact back into a dense safetensors model.
    Decompress {
        /// The artifact folder.
        artifact: PathBuf,
        /// Where the dense model goes (must not exist or be empty).
        #[arg(long)]
        output: PathBuf,
    },
    /// Show an artifact's sizes, ratio and per-tensor quality.
    Inspect {
        /// The artifact folder.
        artifact: PathBuf,
        /// Glob selecting the tensors of the `selected` totals (default: the compressed ones).
        #[arg(long = "match")]
        pattern: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Compare a candidate model with a reference: per-tensor SQNR and, for
    /// BERT-family sentence-embedding models, embedding cosine.
    Eval {
        /// The reference model folder.
        #[arg(long)]
        reference: PathBuf,
        /// The candidate: a dense model folder or an hcx artifact.
        #[arg(long)]
        candidate: PathBuf,
        /// Sentences, one per line (default: the project's own set).
        #[arg(long)]
        sentences: Option<PathBuf>,
        /// Skip the embedding comparison.
        #[arg(long)]
        no_embeddings: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HCX_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match dispatch(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_job(path: Option<&Path>) -> Result<JobSpec> {
    match path {
        Some(p) => Ok(JobSpec::load(p)?),
        None => {
            let cwd = std::env::current_dir().context("cannot read the current folder")?;
            let mut spec =
                JobSpec::parse(DEFAULT_JOB, Path::new("<embedded minilm-4bit.yaml>"), &cwd)?;
            spec.model = std::env::var_os("HCX_MODEL_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| cwd.join("models/all-MiniLM-L6-v2"));
            spec.output = cwd.join("out/minilm-4bit");
            Ok(spec)
        }
    }
}

fn glob(pattern: &str) -> Result<globset::GlobMatcher> {
    Ok(globset::GlobBuilder::new(pattern)
        .literal_separator(false)
        .build()
        .with_context(|| format!("bad glob `{pattern}`"))?
        .compile_matcher())
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run { job, output, json } => {
            let spec = load_job(job.as_deref())?;
            let out = hcx_pipeline::run::run_job(&spec, output.as_deref())?;
            let a = &out.attribution;
            if json {
                println!("{}", serde_json::to_string_pretty(a)?);
                return Ok(());
            }
            println!("job `{}` → {}", a.job, out.output.display());
            println!(
                "ratio {:.3}× ({} → {} bytes on disk); compressed tensors: {} at {:.3} bits per weight, mean SQNR {} dB; {:.1} s",
                a.ratio,
                a.source_bytes,
                a.artifact_bytes,
                a.compressed.tensors,
                a.compressed.bits_per_weight,
                a.compressed
                    .mean_sqnr_db
                    .map(|d| format!("{d:.2}"))
                    .unwrap_or_else(|| "exact".into()),
                a.seconds
            );
            println!();
            print!("{}", attribution::stage_table(a));
            Ok(())
        }
        Command::Validate { job } => {
            let spec = JobSpec::load(&job)?;
            println!(
                "{}: ok (job `{}`, {} default stages, {} rules)",
                job.display(),
                spec.name,
                spec.pipeline.len(),
                spec.rules.len()
            );
            Ok(())
        }
        Command::Schema => {
            println!(
                "{}",
                serde_json::to_string_pretty(&hcx_protocol::job_schema())?
            );
            Ok(())
        }
        Command::Decompress { artifact, output } => {
            let out = artifact::decompress(&artifact, &output)?;
            println!("dense model written to {}", out.display());
            Ok(())
        }
        Command::Inspect {
            artifact,
            pattern,
            json,
        } => {
            let matcher = pattern.as_deref().map(glob).transpose()?;
            let f = matcher.as_ref().map(|m| move |n: &str| m.is_match(n));
            let ins = artifact::inspect(&artifact, f.as_ref().map(|f| f as &dyn Fn(&str) -> bool))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&ins)?);
            } else {
                print_inspection(&ins);
            }
            Ok(())
        }
        Command::Eval {
            reference,
            candidate,
            sentences,
            no_embeddings,
            json,
        } => eval(
            &reference,
            &candidate,
            sentences.as_deref(),
            no_embeddings,
            json,
        ),
    }
}

fn print_inspection(ins: &Inspection) {
    println!(
        "job `{}`: source {} bytes, artifact {} bytes, ratio {:.3}×",
        ins.job, ins.source_bytes, ins.artifact_bytes, ins.ratio
    );
    let s = &ins.selected;
    println!(
        "selected: {} tensors, {} parameters, {:.3} bits per weight, mean SQNR {} dB",
        s.tensors,
        s.params,
        s.bits_per_weight,
        s.mean_sqnr_db
            .map(|d| format!("{d:.2}"))
            .unwrap_or_else(|| "exact".into())
    );
    println!(
        "{:<60} {:>10} {:>8} {:>9}  chain",
        "tensor", "params", "bpw", "SQNR dB"
    );
    for t in &ins.tensors {
        println!(
            "{:<60} {:>10} {:>8.3} {:>9}  {}",
            t.name,
            t.params,
            t.bits_per_weight,
            t.sqnr_db
                .map(|d| format!("{d:.2}"))
                .unwrap_or_else(|| "exact".into()),
            t.chain
        );
    }
}

fn eval(
    reference: &Path,
    candidate: &Path,
    sentences: Option<&Path>,
    no_embeddings: bool,
    json: bool,
) -> Result<()> {
    // An artifact is decompressed to a temporary folder first.
    let tmp;
    let dense = if candidate
        .join(hcx_protocol::manifest::MANIFEST_FILE)
        .is_file()
    {
        tmp = tempfile::tempdir().context("cannot create a temporary folder")?;
        let out = tmp.path().join("dense");
        artifact::decompress(candidate, &out)?;
        out
    } else {
        candidate.to_path_buf()
    };
    let tensors = hcx_eval::compare_tensors(reference, &dense)?;
    let encoder = tensors.weighted_mean_sqnr(hcx_eval::is_encoder_linear_weight);
    let all = tensors.weighted_mean_sqnr(|_| true);
    let emb = if no_embeddings {
        None
    } else {
        let list = match sentences {
            Some(p) => std::fs::read_to_string(p)
                .with_context(|| format!("{}: cannot read sentences", p.display()))?
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(String::from)
                .collect(),
            None => hcx_eval::default_sentences(),
        };
        if list.is_empty() {
            bail!("the sentence file has no sentences");
        }
        Some(hcx_eval::embedding_cosine(reference, &dense, &list)?)
    };
    if json {
        let v = serde_json::json!({
            "tensors": tensors.tensors,
            "encoder_linear_mean_sqnr_db": encoder,
            "all_mean_sqnr_db": all,
            "embeddings": emb,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{:<60} {:>10} {:>9}", "tensor", "params", "SQNR dB");
    for t in &tensors.tensors {
        println!(
            "{:<60} {:>10} {:>9}",
            t.name,
            t.params,
            t.sqnr_db
                .map(|d| format!("{d:.2}"))
                .unwrap_or_else(|| "exact".into())
        );
    }
    let f = |v: Option<f64>| {
        v.map(|d| format!("{d:.2} dB"))
            .unwrap_or_else(|| "exact".into())
    };
    println!(
        "parameter-weighted mean SQNR: encoder linear weights {}, all lossy tensors {}",
        f(encoder),
        f(all)
    );
    if let Some(e) = emb {
        println!(
            "sentence embeddings ({} sentences): mean cosine {:.6}, min {:.6}",
            e.sentences, e.mean_cosine, e.min_cosine
        );
    }
    Ok(())
}
