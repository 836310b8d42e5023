//! The `hcx-cluster` command line: the main entry point. Each subcommand
//! parses its arguments and calls into the library crates (`hcx-protocol`,
//! `hcx-pipeline`, `hcx-eval`); nothing here does tensor math.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use hcx_coordinator::dashboard::DashboardListen;
use hcx_pipeline::artifact::{self, Inspection};
use hcx_pipeline::attribution;
use hcx_protocol::JobSpec;

mod cluster;
mod plan;
mod progress;

/// The example job run when `hcx-cluster run` is given no file.
const DEFAULT_JOB: &str = include_str!("../configs/jobs/minilm-4bit.yaml");

#[derive(Parser)]
#[command(
    name = "hcx-cluster",
    version,
    about = "Compresses neural-network models and reports what each stage cost and saved"
)]
struct Cli {
    /// How log lines are written to stderr: text, or json (one object a
    /// line, with the job, shard and tensor spans it was written in).
    /// `$HCX_LOG` filters them (warn by default; info, debug, or per
    /// crate as hcx_node=debug).
    #[arg(long, global = true, default_value = "text", value_name = "text|json")]
    log_format: hcx_telemetry::LogFormat,
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
        /// Number of in-process worker nodes of the embedded cluster.
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        /// Run the pipeline directly in this process, without the embedded
        /// cluster (same artifact; for comparison).
        #[arg(long, conflicts_with = "nodes")]
        local: bool,
        /// Print the plan (shards, placement on --nodes N, each shard's
        /// estimated seconds and peak memory, the estimated artifact size
        /// and bits per weight) from a cost model measured on this machine,
        /// and run nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Make, inspect and revoke the cluster's certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Run a coordinator (a raft voter serving the cluster API and data plane).
    Coordinator {
        /// This coordinator's id in --peers (or $HCX_ID: a Kubernetes
        /// StatefulSet passes its pod index).
        #[arg(long, env = "HCX_ID")]
        id: u64,
        /// Address to serve gRPC (TCP) and the data plane (UDP) on.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Every voter as ID=HOST:PORT, comma-separated; the same on every coordinator.
        #[arg(long)]
        peers: String,
        /// Where the raft log and snapshots live.
        #[arg(long)]
        data_dir: PathBuf,
        #[command(flatten)]
        tls: TlsArgs,
        /// Milliseconds a node may stay silent before its shards are re-assigned.
        #[arg(long, default_value_t = 5000)]
        lease_ms: u64,
        /// Folder submitted jobs may write their artifacts inside (repeatable);
        /// a job whose `output` resolves elsewhere is refused. With none,
        /// every artifact stays in the cluster until fetched.
        #[arg(long = "output-root", value_name = "DIR")]
        output_roots: Vec<PathBuf>,
        /// Folder (or model file) submitted jobs may read their model from
        /// in place (repeatable). A model elsewhere is sent by `submit`,
        /// unless the job marks it `shared`, which is then refused.
        #[arg(long = "model-root", value_name = "DIR")]
        model_roots: Vec<PathBuf>,
        /// Join a running group (after `coordinators add ID=ADDR`) instead
        /// of founding one with --peers; --peers then needs only this
        /// coordinator's own entry.
        #[arg(long)]
        join: bool,
        /// Keep at most this many finished jobs; the leader deletes the
        /// oldest beyond it.
        #[arg(long, default_value_t = 10_000)]
        retain_jobs: usize,
        /// Delete finished jobs this long after they ended (90s, 30m, 12h, 7d).
        #[arg(long, value_parser = cluster::parse_age)]
        retain_age: Option<std::time::Duration>,
        /// Delete the oldest finished jobs while the bytes the cluster keeps
        /// for jobs (sent models, artifacts kept in the cluster) pass this
        /// (500MB, 20GB).
        #[arg(long, value_parser = parse_size)]
        retain_bytes: Option<u64>,
        /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP:
        /// counts and timings only; bind it to loopback or a private network).
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<std::net::SocketAddr>,
        /// Serve the web dashboard over plain HTTP at http://ADDR/ (a
        /// loopback address only: reach it through an SSH tunnel).
        #[arg(long, value_name = "ADDR", conflicts_with = "https_listen")]
        http_listen: Option<std::net::SocketAddr>,
        /// Serve the web dashboard over HTTPS at https://ADDR/ with this
        /// coordinator's certificate; browsers present a client certificate
        /// from the cluster CA (`certs issue --role client`).
        #[arg(long, value_name = "ADDR")]
        https_listen: Option<std::net::SocketAddr>,
    },
    /// Run a worker node.
    Node {
        /// Local address of the node's QUIC endpoint.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// Unique node name. With --certs it comes from the certificate
        /// and, if given, must agree with it.
        #[arg(long)]
        name: Option<String>,
        /// KEY=VALUE label (repeatable), e.g. gpu=h100. With --certs the
        /// labels come from the certificate (`certs issue --label`), and one
        /// given here must agree with it.
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Where shard files are built.
        #[arg(long)]
        work_dir: PathBuf,
        #[command(flatten)]
        connect: ClusterArgs,
        /// Cores to offer (default: all).
        #[arg(long)]
        cores: Option<u32>,
        /// Milliseconds between heartbeats.
        #[arg(long, default_value_t = 500)]
        heartbeat_ms: u64,
        /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP:
        /// counts and timings only; bind it to loopback or a private network).
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<std::net::SocketAddr>,
        /// Remove a downloaded model or calibration file from the work dir
        /// once no job has used it for this long (90s, 30m, 12h, 7d).
        #[arg(long, value_parser = cluster::parse_age, default_value = "24h")]
        cache_keep: std::time::Duration,
    },
    /// Submit a job to a cluster and print its id.
    Submit {
        /// The job file.
        job: PathBuf,
        #[command(flatten)]
        connect: ClientArgs,
        /// Keep the artifact in the cluster, follow the job, and download the
        /// artifact into this folder on this machine (checking every file's
        /// SHA-256) once it succeeds.
        #[arg(long, conflicts_with_all = ["cluster_output", "in_cluster"])]
        output: Option<PathBuf>,
        /// Keep the artifact in the cluster, to download later with `fetch`.
        #[arg(long, conflicts_with = "cluster_output")]
        in_cluster: bool,
        /// Have the coordinators write the artifact here instead of the
        /// job's `output` (a folder inside their --output-root).
        #[arg(long, value_name = "PATH")]
        cluster_output: Option<PathBuf>,
        /// Follow the job until it ends; exit non-zero unless it succeeds.
        #[arg(long)]
        watch: bool,
        /// A retried submit with the same key returns the same job.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Print the plan on the cluster's registered nodes and its
        /// estimates (the cost model measured on this machine, which must
        /// read the model), and submit nothing.
        #[arg(long)]
        dry_run: bool,
        /// With --dry-run: print JSON.
        #[arg(long, requires = "dry_run")]
        json: bool,
    },
    /// Show one job or all jobs.
    Status {
        /// The job id; all jobs without it.
        job: Option<String>,
        #[command(flatten)]
        connect: ClientArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Follow a job until it ends: progress bars on a terminal (per node:
    /// tensors and bytes through, the shard and step it is on; an ETA),
    /// plain lines otherwise; exits non-zero unless the job succeeds.
    Watch {
        /// The job id.
        job: String,
        #[command(flatten)]
        connect: ClientArgs,
    },
    /// Cancel a running job.
    Cancel {
        /// The job id.
        job: String,
        #[command(flatten)]
        connect: ClientArgs,
    },
    /// List the worker nodes.
    Nodes {
        #[command(flatten)]
        connect: ClientArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Forget a finished job: its record and idempotency key, and what it
    /// left in its output folder's staging area (its artifact stays).
    Delete {
        /// The job id.
        job: String,
        #[command(flatten)]
        connect: ClientArgs,
    },
    /// Download a succeeded job's artifact kept in the cluster, checking
    /// every file's SHA-256 (an interrupted fetch resumes).
    Fetch {
        /// The job id.
        job: String,
        /// The folder to create (it must not exist, or be empty).
        #[arg(long)]
        output: PathBuf,
        #[command(flatten)]
        connect: ClientArgs,
    },
    /// Add or remove raft voters (coordinators).
    Coordinators {
        #[command(subcommand)]
        command: CoordinatorsCommand,
    },
    /// Stop giving a node new shards (it finishes those it holds).
    Drain {
        /// The node name.
        node: String,
        #[command(flatten)]
        connect: ClientArgs,
    },
    /// Give a drained node new shards again.
    Undrain {
        /// The node name.
        node: String,
        #[command(flatten)]
        connect: ClientArgs,
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
        /// Largest safetensors file; a larger model is split into shards
        /// with `model.safetensors.index.json` (e.g. 5GB, 500MB, 2GiB).
        #[arg(long, default_value = "5GB", value_parser = parse_size)]
        max_shard_size: u64,
    },
    /// Write a source model (a GGUF file, dequantized to f32 under Hugging
    /// Face names; or a safetensors model) as a dense HF folder.
    Convert {
        /// The source: a `.gguf` file, a safetensors file or a model folder.
        source: PathBuf,
        /// Where the HF folder goes (must not exist).
        #[arg(long)]
        output: PathBuf,
        /// Largest safetensors file (e.g. 5GB, 500MB, 2GiB).
        #[arg(long, default_value = "5GB", value_parser = parse_size)]
        max_shard_size: u64,
    },
    /// Write an artifact in a format an inference engine loads: `gguf`
    /// (llama.cpp) for Llama-family decoders, `compressed-tensors` (vLLM)
    /// for integer-quantized linear weights.
    Export {
        /// The artifact folder.
        artifact: PathBuf,
        /// The format.
        #[arg(long, value_enum)]
        format: ExportFormat,
        /// Where the exported model goes (must not exist or be empty).
        #[arg(long)]
        output: PathBuf,
        /// GGUF block type of the 2-D weights (q8_0, q4_0, q4_k, q6_k); a
        /// tensor whose rows do not split into its blocks is written as
        /// Q8_0, or F32.
        #[arg(long, default_value = "q8_0", value_parser = parse_block_type)]
        gguf_type: hcx_export::gguf::BlockType,
        /// compressed-tensors: bits per code (4 or 8); default, the
        /// artifact's own `rtn` bits (with --ct-group).
        #[arg(long, requires = "ct_group")]
        ct_bits: Option<u8>,
        /// compressed-tensors: codes per scale along a row (0: one scale
        /// per row).
        #[arg(long, requires = "ct_bits")]
        ct_group: Option<usize>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
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
        /// The candidate: a dense model folder, an hcx artifact, or a GGUF
        /// file (one `export` wrote, say).
        #[arg(long)]
        candidate: PathBuf,
        /// Sentences, one per line (default: the project's own set).
        #[arg(long)]
        sentences: Option<PathBuf>,
        /// Skip the embedding comparison.
        #[arg(long)]
        no_embeddings: bool,
        /// Decoders: held-out text files (repeat the flag for several; default:
        /// the held-out license texts, never used for calibration).
        #[arg(long)]
        text: Vec<PathBuf>,
        /// Decoders: tokens per window.
        #[arg(long, default_value_t = 256)]
        ctx: usize,
        /// Decoders: most tokens compared.
        #[arg(long, default_value_t = 8192)]
        max_tokens: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// How a command secures its links: `--certs DIR`, or `--insecure`.
#[derive(clap::Args)]
struct TlsArgs {
    /// This machine's folder made by `certs issue` (ca.pem, cert.pem, key.pem).
    #[arg(long, env = "HCX_CERTS")]
    certs: Option<PathBuf>,
    /// No TLS (plaintext gRPC, unauthenticated QUIC); loopback addresses only.
    #[arg(long)]
    insecure: bool,
}

impl TlsArgs {
    fn security(self) -> Result<cluster::Security> {
        cluster::Security::from_flags(self.certs, self.insecure)
    }
}

/// Where the coordinators are and how to reach them.
#[derive(clap::Args)]
struct ClusterArgs {
    /// Coordinator addresses, comma-separated.
    #[arg(long, env = "HCX_COORDINATORS")]
    coordinators: String,
    #[command(flatten)]
    tls: TlsArgs,
}

/// A client command's connection: the cluster, and how long to wait for it.
#[derive(clap::Args)]
struct ClientArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Seconds to keep trying to reach a coordinator (and its leader) before giving up.
    #[arg(long, value_name = "SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
}

impl ClientArgs {
    /// A client of the coordinators (call inside the runtime).
    fn client(self) -> Result<hcx_net::client::CoordinatorClient> {
        let sec = self.cluster.tls.security()?;
        cluster::client(
            &self.cluster.coordinators,
            &sec,
            std::time::Duration::from_secs(self.timeout),
        )
    }
}

#[derive(Subcommand)]
enum CoordinatorsCommand {
    /// Add voters: each must already run with `coordinator --join` (and a
    /// coordinator certificate valid for its address); it catches up as a
    /// learner, then becomes a voter.
    Add {
        /// ID=HOST:PORT, repeatable or comma-separated.
        #[arg(required = true, value_delimiter = ',')]
        members: Vec<String>,
        #[command(flatten)]
        connect: ClientArgs,
    },
    /// Remove voters by raft id (a dead coordinator, or one being moved).
    Remove {
        /// Raft ids, repeatable or comma-separated.
        #[arg(required = true, value_delimiter = ',')]
        ids: Vec<u64>,
        #[command(flatten)]
        connect: ClientArgs,
    },
}

/// A role as `certs issue --role` takes it.
#[derive(Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    /// A raft coordinator.
    Coordinator,
    /// A worker node.
    Node,
    /// An operator's command line or program.
    Client,
}

impl From<RoleArg> for hcx_net::tls::Role {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Coordinator => Self::Coordinator,
            RoleArg::Node => Self::Node,
            RoleArg::Client => Self::Client,
        }
    }
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create the cluster CA (ca.pem, ca.key). It issues every machine's
    /// certificate and stays on the operator's machine.
    Init {
        /// Folder to write them to.
        #[arg(long)]
        dir: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue one machine's certificate with the CA: writes its key, its
    /// certificate and the CA certificate (key.pem, cert.pem, ca.pem) into
    /// --dir, which is what that machine's --certs then names.
    Issue {
        /// The CA folder made by `certs init` (holds ca.key).
        #[arg(long)]
        ca: PathBuf,
        /// The machine's folder; never the CA's.
        #[arg(long)]
        dir: PathBuf,
        /// What the machine is.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Its name (a node's name in the cluster).
        #[arg(long)]
        name: String,
        /// A DNS name or IP address the machine serves on, which its
        /// clients dial (repeatable; loopback names are always in).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// KEY=VALUE label (repeatable), e.g. site=a or gpu=h100: the
        /// coordinators take a node's labels from its certificate.
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Print what a machine's certificate says: role, name, labels,
    /// serial, hosts.
    Show {
        /// The machine's folder (made by `certs issue`).
        dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a certificate: the revocation is committed through raft and
    /// every coordinator refuses the certificate from then on.
    Revoke {
        /// Its serial number (as `certs issue` and `certs show` print it).
        serial: String,
        #[command(flatten)]
        connect: ClientArgs,
    },
}

fn main() -> ExitCode {
    // Forward passes (calibration, distillation, eval) free and reallocate
    // large tensors all the time; keep that memory in the process.
    hcx_pipeline::keep_freed_memory();
    let cli = Cli::parse();
    hcx_telemetry::init_logging(cli.log_format, "warn");
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", render_error(&e));
            ExitCode::FAILURE
        }
    }
}

/// Sends the kernels to this machine's first CUDA device where the build
/// (`--features cuda`) and the machine have one; the bytes are the CPU's
/// either way.
fn use_gpu() {
    match hcx_kernels::gpu::install() {
        Ok(device) => tracing::info!("kernels run on {device}"),
        Err(why) => tracing::debug!("kernels run on the CPU: {why}"),
    }
}

/// An error and its causes joined with `: `, each said once: many errors
/// already put their source's text in their own message, and a cause whose
/// text is already there is skipped.
fn render_error(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Resolves a job's `target` into per-tensor rates (reading the model
/// here), saying on stderr what it chose when `tell`.
fn resolve_target(
    spec: &JobSpec,
    tell: bool,
) -> Result<(JobSpec, Option<hcx_pipeline::target::Allocation>)> {
    let (resolved, allocation) = hcx_pipeline::target::resolve(spec)?;
    if let (Some(a), true) = (&allocation, tell) {
        let (lo, hi) = a
            .rates
            .iter()
            .fold((f64::INFINITY, 0f64), |(lo, hi), (_, r)| {
                (lo.min(*r), hi.max(*r))
            });
        eprintln!(
            "target: {} tensors at {lo:.2}–{hi:.2} bits, {:.0} bytes expected for a budget of {:.0}; the even spread, {:.2} bits for all, would have {:.2} dB more squared error{}",
            a.rates.len(),
            a.expected_bytes,
            a.budget_bytes,
            a.even_rate,
            10.0 * (a.even_error / a.expected_error.max(1e-300)).log10(),
            if a.weighted {
                " (output error on the calibration inputs)"
            } else {
                " (weight error)"
            }
        );
    }
    Ok((resolved, allocation))
}

fn load_job(path: Option<&Path>) -> Result<JobSpec> {
    match path {
        Some(p) => Ok(JobSpec::load(p)?),
        None => {
            let cwd = std::env::current_dir().context("cannot read the current folder")?;
            let mut spec =
                JobSpec::parse(DEFAULT_JOB, Path::new("<embedded minilm-4bit.yaml>"), &cwd)?;
            spec.model.path = std::env::var_os("HCX_MODEL_DIR")
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

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Runs a job on an in-process cluster of `nodes` nodes.
fn run_embedded(
    spec: &JobSpec,
    output: Option<&Path>,
    nodes: usize,
    display: progress::Display,
) -> Result<(hcx_pipeline::run::RunOutcome, Vec<String>)> {
    if nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    // A federated job's in-process nodes take its sites in turn.
    let sites: Vec<String> = spec
        .calibration
        .as_ref()
        .map(|c| c.sites.keys().cloned().collect())
        .unwrap_or_default();
    if nodes < sites.len() {
        bail!(
            "the job's calibration has {} sites ({}), each read only by its own nodes: give --nodes {} or more",
            sites.len(),
            sites.join(", "),
            sites.len()
        );
    }
    // The embedded coordinator may read this job's model and write its
    // output, and nothing else.
    let model = std::path::absolute(&spec.model.path)
        .with_context(|| format!("{}", spec.model.path.display()))?;
    let out = output.unwrap_or(&spec.output);
    let out = std::path::absolute(out).with_context(|| format!("{}", out.display()))?;
    // The nearest existing folder above each: the run itself creates
    // missing output folders (and says so when it cannot).
    let folder_above = |p: &Path| {
        p.ancestors()
            .skip(1)
            .find(|a| a.is_dir())
            .unwrap_or(p)
            .to_path_buf()
    };
    let (model_root, output_root) = (folder_above(&model), folder_above(&out));
    // The group's nodes read the calibration files too.
    let mut model_roots = vec![model_root];
    if let Some(c) = &spec.calibration {
        for f in [&c.text, &c.sentences].into_iter().flatten() {
            for p in f.as_slice() {
                let p = std::path::absolute(p).with_context(|| format!("{}", p.display()))?;
                model_roots.push(folder_above(&p));
            }
        }
    }
    model_roots.sort();
    model_roots.dedup();
    let rt = runtime()?;
    let st = rt.block_on(async {
        let cluster =
            cluster::Embedded::start(nodes, &sites, model_roots, vec![output_root]).await?;
        let st = cluster.run(spec, output, display).await;
        cluster.stop().await;
        st
    })?;
    if st.state != "succeeded" {
        bail!(
            "job {} {}: at {}: {}",
            st.job_id,
            st.state,
            st.failed_stage,
            st.reason
        );
    }
    let out = PathBuf::from(&st.output);
    let path = out.join("attribution.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let attribution = serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
    Ok((
        hcx_pipeline::run::RunOutcome {
            output: out,
            attribution,
        },
        st.gates,
    ))
}

fn dispatch(cli: Cli) -> Result<()> {
    let display = progress::Display::choose(cli.log_format);
    match cli.command {
        Command::Certs {
            command: CertsCommand::Init { dir, force },
        } => {
            let ca = hcx_net::certs::init_ca(&dir, force)?;
            println!(
                "cluster CA written to {} (CA SHA-256 {}); keep ca.key on this machine and give each machine what `certs issue` writes",
                ca.dir.display(),
                ca.sha256
            );
            Ok(())
        }
        Command::Certs {
            command:
                CertsCommand::Issue {
                    ca,
                    dir,
                    role,
                    name,
                    hosts,
                    labels,
                    force,
                },
        } => {
            let labels = labels
                .iter()
                .map(|l| hcx_net::certs::parse_label(l))
                .collect::<Result<_, _>>()?;
            let req = hcx_net::certs::IssueRequest {
                role: role.into(),
                name,
                hosts,
                labels,
            };
            let got = hcx_net::certs::issue(&ca, &dir, &req, force)?;
            let f = &got.facts;
            println!(
                "{} certificate of {} (serial {}) written to {}; valid for {}",
                f.role,
                f.name,
                f.serial,
                got.dir.display(),
                if f.hosts.is_empty() {
                    "client use only".to_string()
                } else {
                    f.hosts.join(", ")
                }
            );
            Ok(())
        }
        Command::Certs {
            command: CertsCommand::Show { dir, json },
        } => {
            let id = hcx_net::tls::Identity::load(&dir)?;
            let f = id.facts();
            if json {
                let v = serde_json::json!({
                    "role": f.role.as_str(),
                    "name": f.name,
                    "labels": f.labels,
                    "serial": f.serial,
                    "hosts": f.hosts,
                    "not_after": f.not_after,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("role     {}", f.role);
                println!("name     {}", f.name);
                let labels: Vec<String> =
                    f.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!("labels   {}", labels.join(" "));
                println!("serial   {}", f.serial);
                println!("hosts    {}", f.hosts.join(" "));
            }
            Ok(())
        }
        Command::Certs {
            command: CertsCommand::Revoke { serial, connect },
        } => {
            let serial = hcx_net::certs::parse_serial(&serial)?;
            runtime()?.block_on(async {
                let c = connect.client()?;
                cluster::revoke(&c, &serial).await
            })
        }
        Command::Coordinator {
            id,
            listen,
            peers,
            data_dir,
            tls,
            lease_ms,
            output_roots,
            model_roots,
            join,
            retain_jobs,
            retain_age,
            retain_bytes,
            metrics_listen,
            http_listen,
            https_listen,
        } => {
            let sec = tls.security()?;
            let rt = runtime()?;
            if let Some(addr) = metrics_listen {
                rt.block_on(hcx_telemetry::serve_metrics(addr))?;
                hcx_telemetry::show_counters(hcx_protocol::metrics::COORDINATOR_COUNTERS);
            }
            rt.block_on(cluster::coordinator(
                cluster::CoordinatorArgs {
                    id,
                    listen,
                    peers,
                    data_dir,
                    lease_ms,
                    model_roots,
                    output_roots,
                    join,
                    retention: hcx_coordinator::Retention {
                        max_jobs: retain_jobs,
                        max_age: retain_age,
                        max_bytes: retain_bytes,
                    },
                    dashboard: match (http_listen, https_listen) {
                        (Some(addr), _) => Some(DashboardListen { addr, tls: false }),
                        (None, Some(addr)) => Some(DashboardListen { addr, tls: true }),
                        (None, None) => None,
                    },
                },
                &sec,
            ))
        }
        Command::Node {
            connect: ClusterArgs { coordinators, tls },
            listen,
            name,
            labels,
            work_dir,
            cores,
            heartbeat_ms,
            metrics_listen,
            cache_keep,
        } => {
            let sec = tls.security()?;
            let rt = runtime()?;
            if let Some(addr) = metrics_listen {
                rt.block_on(hcx_telemetry::serve_metrics(addr))?;
                hcx_telemetry::show_counters(hcx_protocol::metrics::NODE_COUNTERS);
            }
            rt.block_on(cluster::node(
                &coordinators,
                listen,
                name,
                &labels,
                work_dir,
                &sec,
                cores,
                heartbeat_ms,
                cache_keep,
            ))
        }
        Command::Submit {
            job,
            connect,
            output,
            in_cluster,
            cluster_output,
            watch,
            idempotency_key,
            dry_run,
            json,
        } => {
            let (spec, allocation) = resolve_target(&JobSpec::load(&job)?, !json)?;
            if dry_run {
                let nodes = runtime()?.block_on(async {
                    let c = connect.client()?;
                    cluster::registered_nodes(&c).await
                })?;
                let mut d = plan::dry_run(&spec, &nodes, false)?;
                d.allocation = allocation;
                return plan::show(&d, json);
            }
            let opts = cluster::SubmitOptions {
                download: output,
                in_cluster,
                cluster_output,
                key: idempotency_key,
                follow: watch,
                display,
            };
            let ok = runtime()?.block_on(async {
                let c = connect.client()?;
                cluster::submit(&c, &spec, &opts).await
            })?;
            if !ok {
                bail!("the job did not succeed");
            }
            Ok(())
        }
        Command::Status { job, connect, json } => runtime()?.block_on(async {
            let c = connect.client()?;
            cluster::status(&c, job, json).await.map(|_| ())
        }),
        Command::Watch { job, connect } => runtime()?.block_on(async {
            let c = connect.client()?;
            let st = cluster::watch(&c, &job, display).await?;
            println!("{}", cluster::describe(&st));
            if st.state != "succeeded" {
                bail!("{job} did not succeed");
            }
            Ok(())
        }),
        Command::Cancel { job, connect } => runtime()?.block_on(async {
            let c = connect.client()?;
            cluster::cancel(&c, job).await
        }),
        Command::Nodes { connect, json } => runtime()?.block_on(async {
            let c = connect.client()?;
            cluster::nodes(&c, json).await
        }),
        Command::Delete { job, connect } => runtime()?.block_on(async {
            let c = connect.client()?;
            cluster::delete(&c, job).await
        }),
        Command::Fetch {
            job,
            output,
            connect,
        } => runtime()?.block_on(async {
            let c = connect.client()?;
            cluster::fetch(&c, &job, &output).await
        }),
        Command::Coordinators {
            command: CoordinatorsCommand::Add { members, connect },
        } => {
            let add = cluster::parse_peers(&members.join(","), "coordinators add")?;
            runtime()?.block_on(async {
                let c = connect.client()?;
                cluster::change_membership(&c, add, Vec::new()).await
            })
        }
        Command::Coordinators {
            command: CoordinatorsCommand::Remove { ids, connect },
        } => runtime()?.block_on(async {
            let c = connect.client()?;
            cluster::change_membership(&c, BTreeMap::new(), ids).await
        }),
        Command::Drain { node, connect } => runtime()?.block_on(async {
            let c = connect.client()?;
            cluster::drain(&c, node, false).await
        }),
        Command::Undrain { node, connect } => runtime()?.block_on(async {
            let c = connect.client()?;
            cluster::drain(&c, node, true).await
        }),
        Command::Run {
            job,
            output,
            json,
            nodes,
            local,
            dry_run,
        } => {
            use_gpu();
            let (spec, allocation) = resolve_target(&load_job(job.as_deref())?, !json)?;
            if dry_run {
                let mut d = plan::dry_run(
                    &spec,
                    &plan::local_nodes(if local { 1 } else { nodes }),
                    true,
                )?;
                d.allocation = allocation;
                return plan::show(&d, json);
            }
            let (out, gates) = if local {
                let to = output.as_deref().unwrap_or(&spec.output);
                let g = hcx_pipeline::gates::run_gated(&spec, to, |s, o| {
                    hcx_pipeline::run::run_job(s, Some(o))
                })?;
                (g.outcome, g.notes)
            } else {
                let display = if json {
                    progress::Display::Quiet
                } else {
                    display
                };
                run_embedded(&spec, output.as_deref(), nodes, display)?
            };
            let a = &out.attribution;
            if json {
                println!("{}", serde_json::to_string_pretty(a)?);
                return Ok(());
            }
            println!("job `{}` → {}", a.job, out.output.display());
            for g in &gates {
                println!("gate {g}");
            }
            println!(
                "ratio {:.3}× ({} → {} bytes on disk); compressed tensors: {} at {:.3} bits per weight; SQNR: parameter-weighted mean {} dB, pooled {} dB; {:.1} s",
                a.ratio,
                a.source_bytes,
                a.artifact_bytes,
                a.compressed.tensors,
                a.compressed.bits_per_weight,
                db_or_exact(a.compressed.mean_sqnr_db),
                db_or_exact(a.compressed.pooled_sqnr_db),
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
        Command::Decompress {
            artifact,
            output,
            max_shard_size,
        } => {
            use_gpu();
            let out = artifact::decompress_sharded(&artifact, &output, max_shard_size)?;
            println!("dense model written to {}", out.display());
            Ok(())
        }
        Command::Convert {
            source,
            output,
            max_shard_size,
        } => {
            let model = hcx_pipeline::model::Model::open(&source)?;
            hcx_pipeline::dense::write_model(&model, &output, max_shard_size)?;
            println!(
                "{} tensors written to {}",
                model.tensors.len(),
                output.display()
            );
            Ok(())
        }
        Command::Export {
            artifact,
            format,
            output,
            gguf_type,
            ct_bits,
            ct_group,
            json,
        } => {
            let r = match format {
                ExportFormat::Gguf => hcx_export::gguf::export(&artifact, &output, gguf_type)?,
                ExportFormat::CompressedTensors => {
                    let scheme = ct_bits.map(|bits| hcx_export::compressed::Scheme {
                        bits,
                        group: ct_group.filter(|g| *g > 0),
                    });
                    hcx_export::compressed::export(&artifact, &output, scheme)?
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
                return Ok(());
            }
            let mut by_type: std::collections::BTreeMap<&str, (usize, u64)> = Default::default();
            for t in &r.tensors {
                let e = by_type.entry(&t.encoding).or_default();
                e.0 += 1;
                e.1 += t.bytes;
            }
            for (ty, (n, bytes)) in by_type {
                println!("{ty:>6}: {n} tensors, {bytes} bytes");
            }
            match r.worst_sqnr_db() {
                Some(db) => println!("worst tensor against the artifact: {db:.1} dB SQNR"),
                None => println!("every tensor equals the artifact's"),
            }
            println!("{} bytes written to {}", r.bytes, r.file.display());
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
            text,
            ctx,
            max_tokens,
            json,
        } => eval(
            &reference,
            &candidate,
            sentences.as_deref(),
            no_embeddings,
            &DecoderText {
                files: text,
                ctx,
                max_tokens,
            },
            json,
        ),
    }
}

/// A dB figure with two decimals, or `exact` where there is no error.
fn db_or_exact(v: Option<f64>) -> String {
    v.map(|d| format!("{d:.2}"))
        .unwrap_or_else(|| "exact".into())
}

fn print_inspection(ins: &Inspection) {
    println!(
        "job `{}`: source {} bytes, artifact {} bytes, ratio {:.3}×",
        ins.job, ins.source_bytes, ins.artifact_bytes, ins.ratio
    );
    let s = &ins.selected;
    println!(
        "selected: {} tensors, {} parameters, {:.3} bits per weight (parts, header and manifest entries); SQNR: parameter-weighted mean {} dB, pooled {} dB",
        s.tensors,
        s.params,
        s.bits_per_weight,
        db_or_exact(s.mean_sqnr_db),
        db_or_exact(s.pooled_sqnr_db)
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

/// What a decoder is evaluated on.
struct DecoderText {
    files: Vec<PathBuf>,
    ctx: usize,
    max_tokens: usize,
}

/// The formats `export` writes.
#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    /// llama.cpp's GGUF.
    Gguf,
    /// compressed-tensors' pack-quantized safetensors (vLLM, transformers).
    CompressedTensors,
}

fn parse_block_type(s: &str) -> std::result::Result<hcx_export::gguf::BlockType, String> {
    s.parse()
}

fn parse_size(s: &str) -> std::result::Result<u64, String> {
    hcx_pipeline::dense::parse_size(s)
}

fn eval(
    reference: &Path,
    candidate: &Path,
    sentences: Option<&Path>,
    no_embeddings: bool,
    text: &DecoderText,
    json: bool,
) -> Result<()> {
    // A GGUF file (the reference, or an exported candidate) is expanded to
    // a dense HF folder first.
    let is_gguf = |p: &Path| p.is_file() && p.extension().is_some_and(|e| e == "gguf");
    let expand = |p: &Path, dir: &Path| -> Result<PathBuf> {
        let model = hcx_pipeline::model::Model::open(p)?;
        hcx_pipeline::dense::write_model(&model, dir, u64::MAX)?;
        Ok(dir.to_path_buf())
    };
    let ref_tmp;
    let reference = if is_gguf(reference) {
        ref_tmp = tempfile::tempdir().context("cannot create a temporary folder")?;
        expand(reference, &ref_tmp.path().join("reference"))?
    } else {
        reference.to_path_buf()
    };
    let reference = reference.as_path();
    // An artifact is decompressed to a temporary folder first.
    let tmp;
    let dense = if is_gguf(candidate) {
        tmp = tempfile::tempdir().context("cannot create a temporary folder")?;
        expand(candidate, &tmp.path().join("candidate"))?
    } else if candidate
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
    if hcx_eval::is_decoder(reference) {
        return eval_decoder(reference, &dense, &tensors, text, json);
    }
    let encoder = tensors.weighted_mean_sqnr(hcx_eval::is_encoder_linear_weight);
    let all = tensors.weighted_mean_sqnr(|_| true);
    let encoder_pooled = tensors.pooled_sqnr(hcx_eval::is_encoder_linear_weight);
    let all_pooled = tensors.pooled_sqnr(|_| true);
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
            "encoder_linear_pooled_sqnr_db": encoder_pooled,
            "all_pooled_sqnr_db": all_pooled,
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
        "parameter-weighted mean of per-tensor SQNR: encoder linear weights {}, all lossy tensors {}",
        f(encoder),
        f(all)
    );
    println!(
        "pooled SQNR, 10·log10(Σ signal / Σ noise): encoder linear weights {}, all lossy tensors {}",
        f(encoder_pooled),
        f(all_pooled)
    );
    if let Some(e) = emb {
        println!(
            "sentence embeddings ({} sentences): mean cosine {:.6}, min {:.6}",
            e.sentences, e.mean_cosine, e.min_cosine
        );
    }
    Ok(())
}

fn eval_decoder(
    reference: &Path,
    dense: &Path,
    tensors: &hcx_eval::TensorComparison,
    text: &DecoderText,
    json: bool,
) -> Result<()> {
    let files: Vec<PathBuf> = if text.files.is_empty() {
        hcx_forward::text::HELD_OUT_TEXT
            .iter()
            .map(PathBuf::from)
            .collect()
    } else {
        text.files.clone()
    };
    let d = hcx_eval::decoder_comparison(reference, dense, &files, text.ctx, text.max_tokens)?;
    let linear = tensors.weighted_mean_sqnr(hcx_eval::is_decoder_linear_weight);
    let linear_pooled = tensors.pooled_sqnr(hcx_eval::is_decoder_linear_weight);
    if json {
        let v = serde_json::json!({
            "tensors": tensors.tensors,
            "linear_mean_sqnr_db": linear,
            "linear_pooled_sqnr_db": linear_pooled,
            "decoder": d,
            "text": files,
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
            db_or_exact(t.sqnr_db)
        );
    }
    println!(
        "linear weights of the blocks: parameter-weighted mean SQNR {} dB, pooled {} dB",
        db_or_exact(linear),
        db_or_exact(linear_pooled)
    );
    println!(
        "{} windows of {} tokens ({} tokens; the second half of each window scored, {} positions) from {}",
        d.windows,
        d.ctx,
        d.tokens,
        d.scored,
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "perplexity: reference {:.4}, candidate {:.4}; KL(reference ‖ candidate) mean {:.5} nats (max {:.3}; over every position {:.5}); top-1 agreement {:.4}",
        d.reference_perplexity,
        d.candidate_perplexity,
        d.mean_kl,
        d.max_kl,
        d.mean_kl_all_positions,
        d.top1_agreement
    );
    Ok(())
}
