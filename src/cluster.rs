//! The cluster subcommands: `certs revoke`, `coordinator`, `node`, `submit`,
//! `status`, `cancel`, `nodes`, `drain`, and the embedded cluster behind
//! `run`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hcx_coordinator::{CoordinatorConfig, CoordinatorHandle};
use hcx_net::client::CoordinatorClient;
use hcx_net::proto::{
    BlobRef, ClusterInfoRequest, DrainNodeRequest, JobRef, JobStatus, ListJobsRequest,
    ListNodesRequest, MembershipChange, RevokeRequest, SubmitJobRequest,
};
use hcx_net::tls::{Identity, Role};
use hcx_node::NodeConfig;
use hcx_protocol::JobSpec;
use hcx_protocol::job::{BlobFile, SentModel};
use tokio::sync::watch;

use crate::progress::{Display, Watcher};
use tokio_stream::StreamExt;

/// Parses `1=host:port,2=host:port,…` as given to `what` (`--peers`, say).
pub fn parse_peers(s: &str, what: &str) -> Result<BTreeMap<u64, String>> {
    let mut out = BTreeMap::new();
    for (i, item) in s.split(',').filter(|p| !p.trim().is_empty()).enumerate() {
        let Some((id, addr)) = item.split_once('=') else {
            bail!("{what} entry {} ({item:?}) is not ID=HOST:PORT", i + 1);
        };
        let id: u64 = id
            .trim()
            .parse()
            .with_context(|| format!("{what} entry {} ({item:?}): bad id", i + 1))?;
        let addr = addr.trim();
        if !addr.contains(':') {
            bail!("{what} entry {} ({item:?}): address has no port", i + 1);
        }
        if out.insert(id, addr.to_string()).is_some() {
            bail!("{what} lists id {id} twice");
        }
    }
    if out.is_empty() {
        bail!("{what} is empty");
    }
    Ok(out)
}

/// Parses `k=v` labels.
pub fn parse_labels(items: &[String]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for l in items {
        let Some((k, v)) = l.split_once('=') else {
            bail!("--label {l:?} is not KEY=VALUE");
        };
        if k.is_empty() {
            bail!("--label {l:?} has an empty key");
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

fn identity(certs: &Path, role: Role) -> Result<Identity> {
    Ok(Identity::load_as(certs, role)?)
}

/// How a command secures its links: `--certs DIR`, or `--insecure`.
#[derive(Clone, Debug)]
pub enum Security {
    /// Mutual TLS with the certificates in this folder.
    Certs(PathBuf),
    /// Plaintext gRPC and unauthenticated QUIC, loopback only.
    Insecure,
}

impl Security {
    /// From the `--certs` and `--insecure` flags.
    pub fn from_flags(certs: Option<PathBuf>, insecure: bool) -> Result<Security> {
        match (certs, insecure) {
            (Some(_), true) => bail!("give either --certs or --insecure, not both"),
            (Some(c), false) => Ok(Security::Certs(c)),
            (None, true) => Ok(Security::Insecure),
            (None, false) => bail!(
                "no TLS material: give --certs DIR (or set HCX_CERTS), the folder `hcx-cluster certs issue --dir DIR` made for this machine, or --insecure on loopback addresses"
            ),
        }
    }

    fn identity(&self, role: Role) -> Result<Option<Identity>> {
        match self {
            Security::Certs(dir) => identity(dir, role).map(Some),
            Security::Insecure => Ok(None),
        }
    }
}

fn sec_dir(sec: &Security) -> &Path {
    match sec {
        Security::Certs(d) => d,
        Security::Insecure => Path::new("-"),
    }
}

/// A client of the coordinators, authenticated with the client certificate,
/// that gives up a call after `timeout` and says on stderr what it waits for
/// when a call keeps failing.
pub fn client(coordinators: &str, sec: &Security, timeout: Duration) -> Result<CoordinatorClient> {
    let addrs: Vec<String> = coordinators
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    let tls = match sec.identity(Role::Client)? {
        Some(id) => Some(hcx_net::tls::tonic_client_tls(&id)),
        None => {
            for a in &addrs {
                hcx_net::tls::check_insecure_host(a)?;
            }
            None
        }
    };
    Ok(CoordinatorClient::new(addrs, tls)?
        .with_patience(timeout)
        .on_wait(|w| eprintln!("{w}")))
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}

/// The `coordinator` subcommand's settings.
pub struct CoordinatorArgs {
    /// Raft id.
    pub id: u64,
    /// gRPC and data-plane address.
    pub listen: SocketAddr,
    /// `--peers` as given.
    pub peers: String,
    /// Raft data folder.
    pub data_dir: PathBuf,
    /// Node lease in milliseconds.
    pub lease_ms: u64,
    /// `--model-root` folders.
    pub model_roots: Vec<PathBuf>,
    /// `--output-root` folders.
    pub output_roots: Vec<PathBuf>,
    /// `--join`: wait to be added to a running group.
    pub join: bool,
    /// `--retain-jobs` and `--retain-age`.
    pub retention: hcx_coordinator::Retention,
    /// `--http-listen` or `--https-listen`.
    pub dashboard: Option<hcx_coordinator::dashboard::DashboardListen>,
}

/// `hcx-cluster coordinator`: serves until interrupted.
pub async fn coordinator(a: CoordinatorArgs, sec: &Security) -> Result<()> {
    let id = a.id;
    let cfg = CoordinatorConfig {
        dashboard: a.dashboard,
        id,
        listen: a.listen,
        peers: parse_peers(&a.peers, "--peers")?,
        data_dir: a.data_dir,
        tls: sec.identity(Role::Coordinator)?,
        join: a.join,
        retention: a.retention,
        lease: Duration::from_millis(a.lease_ms),
        model_roots: a.model_roots,
        output_roots: a.output_roots,
    };
    let h = hcx_coordinator::start(cfg).await?;
    eprintln!("coordinator {id} serving on {}", h.addr);
    if let (Some(d), Some(l)) = (h.dashboard_addr, a.dashboard) {
        let scheme = if l.tls { "https" } else { "http" };
        eprintln!("coordinator {id} dashboard on {scheme}://{d}/");
    }
    shutdown_signal().await;
    h.shutdown().await;
    Ok(())
}

/// `hcx-cluster node`: works until interrupted.
#[allow(clippy::too_many_arguments)]
pub async fn node(
    coordinators: &str,
    listen: SocketAddr,
    name: Option<String>,
    labels: &[String],
    work_dir: PathBuf,
    sec: &Security,
    cores: Option<u32>,
    heartbeat_ms: u64,
    cache_keep: Duration,
) -> Result<()> {
    let claimed = parse_labels(labels)?;
    let tls = match sec {
        Security::Certs(dir) => Some(identity(dir, Role::Node)?),
        Security::Insecure => None,
    };
    let (name, labels) = match &tls {
        Some(id) => {
            if let Some(n) = name.as_deref()
                && n != id.name()
            {
                bail!(
                    "--name {n} disagrees with the node certificate in {}, which is issued to {}",
                    sec_dir(sec).display(),
                    id.name()
                );
            }
            for (k, v) in &claimed {
                match id.labels().get(k) {
                    Some(c) if c == v => {}
                    other => bail!(
                        "--label {k}={v} disagrees with the node certificate in {}, which says {}; a node's labels come from its certificate (`certs issue --label`)",
                        sec_dir(sec).display(),
                        other.map_or(format!("no {k}"), |c| format!("{k}={c}"))
                    ),
                }
            }
            (id.name().to_string(), id.labels().clone())
        }
        None => match name {
            Some(n) => (n, claimed),
            None => bail!(
                "--name is needed with --insecure (with --certs it comes from the certificate)"
            ),
        },
    };
    let cfg = NodeConfig {
        name,
        coordinators: coordinators
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        listen,
        labels,
        work_dir,
        tls,
        cores: cores.unwrap_or_else(hcx_node::machine_cores),
        memory_bytes: hcx_node::machine_memory(),
        heartbeat: Duration::from_millis(heartbeat_ms),
        cache_keep,
    };
    if cfg.coordinators.is_empty() {
        bail!("no coordinator addresses given (use --coordinators or HCX_COORDINATORS)");
    }
    let (stop_tx, stop) = watch::channel(false);
    let mut task = tokio::spawn(hcx_node::run(cfg, stop));
    // The node stops on a signal, or on its own when the coordinators
    // refuse it for good.
    tokio::select! {
        _ = shutdown_signal() => {
            let _ = stop_tx.send(true);
            task.await.context("node task")??;
        }
        ended = &mut task => ended.context("node task")??,
    }
    Ok(())
}

/// The request for a parsed job.
pub fn submit_request(
    spec: &JobSpec,
    output: Option<&Path>,
    key: Option<&str>,
) -> Result<SubmitJobRequest> {
    let mut spec = spec.clone();
    if let Some(o) = output {
        spec.output = std::path::absolute(o).with_context(|| format!("{}", o.display()))?;
    }
    spec.model.path = std::path::absolute(&spec.model.path).unwrap_or(spec.model.path);
    spec.output = std::path::absolute(&spec.output).unwrap_or(spec.output);
    if let Some(c) = &mut spec.calibration {
        for f in c.files_mut() {
            f.try_map(|p| std::path::absolute(p))
                .context("cannot make a calibration path absolute")?;
        }
    }
    Ok(SubmitJobRequest {
        spec_json: serde_json::to_string(&spec)?,
        idempotency_key: key.unwrap_or_default().to_string(),
        ..Default::default()
    })
}

/// Watches a job until it ends, showing its progress as `display` says;
/// returns its final state.
pub async fn watch(client: &CoordinatorClient, job: &str, display: Display) -> Result<JobStatus> {
    let mut shown = Watcher::new(display);
    loop {
        let mut stream = client
            .call(|mut c| {
                let job_id = job.to_string();
                async move { c.watch_job(JobRef { job_id }).await }
            })
            .await?;
        loop {
            match stream.message().await {
                Ok(Some(st)) => {
                    shown.update(&st);
                    if !matches!(st.state.as_str(), "running" | "merging") {
                        shown.finish(&st);
                        return Ok(st);
                    }
                }
                // The coordinator went away (leader change, restart): watch again.
                Ok(None) | Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
            }
        }
    }
}

/// One line per job state.
pub fn describe(st: &JobStatus) -> String {
    let to = if st.in_cluster {
        "kept in the cluster"
    } else {
        st.output.as_str()
    };
    let mut s = format!(
        "{} `{}` {} ({}/{} shards) → {to}",
        st.job_id, st.name, st.state, st.shards_done, st.shards_total
    );
    if st.state == "failed" {
        s.push_str(&format!("\n  failed at {}: {}", st.failed_stage, st.reason));
    }
    for g in &st.gates {
        s.push_str(&format!("\n  gate {g}"));
    }
    if st.state == "succeeded" && st.artifact_bytes > 0 {
        s.push_str(&format!(
            "; {} → {} bytes ({:.3}×)",
            st.source_bytes,
            st.artifact_bytes,
            st.source_bytes as f64 / st.artifact_bytes as f64
        ));
    }
    s
}

/// How `submit` hands a job over and what it waits for.
#[derive(Debug, Default, Clone)]
pub struct SubmitOptions {
    /// Download the artifact here once the job succeeds (keeps it in the
    /// cluster; implies `follow`).
    pub download: Option<PathBuf>,
    /// Keep the artifact in the cluster (fetched later with `fetch`).
    pub in_cluster: bool,
    /// Have the coordinators write the artifact here instead of the job's
    /// `output` (inside their `--output-root`).
    pub cluster_output: Option<PathBuf>,
    /// The idempotency key.
    pub key: Option<String>,
    /// Follow the job to its end.
    pub follow: bool,
    /// How a followed job's progress is shown.
    pub display: Display,
}

/// `submit`: prints the job id; with `follow`, follows it to the end, and
/// with `download`, fetches the artifact. A model the coordinators cannot
/// read where the job says is sent to the cluster first.
pub async fn submit(client: &CoordinatorClient, spec: &JobSpec, o: &SubmitOptions) -> Result<bool> {
    if let Some(d) = &o.download {
        check_fetch_target(d)?;
    }
    let in_cluster = o.in_cluster || o.download.is_some();
    let mut req = submit_request(spec, o.cluster_output.as_deref(), o.key.as_deref())?;
    req.in_cluster = in_cluster;
    let send = |req: SubmitJobRequest| async move {
        client
            .call(|mut c| {
                let r = req.clone();
                async move { c.submit_job(r).await }
            })
            .await
            .map_err(anyhow::Error::from)
    };
    let mut reply = send(req).await?;
    let mut spec = spec.clone();
    // The model first, then the calibration files: a reply may ask for
    // either or both, and asks again for what is still missing.
    for _ in 0..3 {
        if !(reply.model_wanted || reply.calibration_wanted) {
            break;
        }
        if reply.model_wanted {
            if spec.model.sent.is_some() {
                bail!("the cluster asked for the model again: {}", reply.why);
            }
            eprintln!(
                "the coordinators do not read the model in place ({}); sending it",
                reply.why
            );
            spec.model.sent = Some(send_model(client, &spec.model.path).await?);
        }
        if reply.calibration_wanted {
            let c = spec
                .calibration
                .as_mut()
                .context("the cluster asked for calibration files the job does not have")?;
            if !c.sent.is_empty() {
                bail!(
                    "the cluster asked for the calibration files again: {}",
                    reply.why
                );
            }
            eprintln!(
                "the coordinators do not read the calibration files in place ({}); sending them",
                reply.why
            );
            c.sent = send_calibration(client, c).await?;
        }
        let mut req = submit_request(&spec, o.cluster_output.as_deref(), o.key.as_deref())?;
        req.in_cluster = in_cluster;
        reply = send(req).await?;
    }
    if reply.model_wanted || reply.calibration_wanted {
        bail!("the cluster still asks for the job's inputs: {}", reply.why);
    }
    println!("{}", reply.job_id);
    if !(o.follow || o.download.is_some()) {
        return Ok(true);
    }
    let st = watch(client, &reply.job_id, o.display).await?;
    println!("{}", describe(&st));
    if st.state != "succeeded" {
        return Ok(false);
    }
    if let Some(d) = &o.download {
        fetch(client, &reply.job_id, d).await?;
    }
    Ok(true)
}

/// Sends a job's `text` or `sentences` calibration files to the cluster,
/// each resumed where the cluster's copy stops and skipped when the
/// cluster holds it; returns what the job's `calibration.sent` then names
/// (the paths as the job names them once absolute). A site's files are
/// never sent.
pub async fn send_calibration(
    client: &CoordinatorClient,
    c: &hcx_protocol::Calibration,
) -> Result<Vec<hcx_protocol::job::SentFile>> {
    let mut out: Vec<hcx_protocol::job::SentFile> = Vec::new();
    for files in c.shared_files() {
        for p in files.as_slice() {
            let path = std::path::absolute(p).with_context(|| format!("{}", p.display()))?;
            if out.iter().any(|f| f.path == path) {
                continue;
            }
            let pp = path.clone();
            let (sha256, bytes) =
                tokio::task::spawn_blocking(move || hcx_coordinator::blobs::hash_file(&pp))
                    .await??;
            put_blob(client, &path, &sha256, bytes)
                .await
                .with_context(|| format!("sending {}", path.display()))?;
            out.push(hcx_protocol::job::SentFile {
                path,
                sha256,
                bytes,
            });
        }
    }
    eprintln!("sent {} calibration file(s)", out.len());
    Ok(out)
}

/// Sends the model at `path` to the cluster, file by file, each resumed
/// where the cluster's copy stops and skipped when the cluster holds it;
/// returns what the job then names.
pub async fn send_model(client: &CoordinatorClient, path: &Path) -> Result<SentModel> {
    let p = path.to_path_buf();
    let (dir, names, file) =
        tokio::task::spawn_blocking(move || hcx_pipeline::run::model_files(&p)).await??;
    let mut files = Vec::with_capacity(names.len());
    let started = Instant::now();
    let mut sent_bytes = 0u64;
    for name in names {
        let f = dir.join(&name);
        let ff = f.clone();
        let (sha256, bytes) =
            tokio::task::spawn_blocking(move || hcx_coordinator::blobs::hash_file(&ff)).await??;
        sent_bytes += put_blob(client, &f, &sha256, bytes)
            .await
            .with_context(|| format!("sending {}", f.display()))?;
        files.push(BlobFile {
            name,
            sha256,
            bytes,
        });
    }
    eprintln!(
        "sent {} file(s) of {}: {sent_bytes} new bytes in {:.1} s",
        files.len(),
        path.display(),
        started.elapsed().as_secs_f64()
    );
    let sent = SentModel { files, file };
    sent.validate().map_err(anyhow::Error::msg)?;
    Ok(sent)
}

/// Sends one file as blob `sha` until the leader holds it and a majority
/// of the voters do; returns the bytes that travelled.
async fn put_blob(client: &CoordinatorClient, path: &Path, sha: &str, total: u64) -> Result<u64> {
    let mut moved = 0u64;
    for _ in 0..8 {
        let have = client
            .call(|mut c| {
                let sha = sha.to_string();
                async move {
                    c.blob_status(BlobRef {
                        sha256: sha,
                        ..Default::default()
                    })
                    .await
                }
            })
            .await?;
        let from = if have.complete { total } else { have.held };
        let got = client
            .call(|mut c| {
                let rx =
                    hcx_coordinator::transfer::file_chunks(path.to_path_buf(), sha, from, false);
                let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
                    .take_while(|r| r.is_ok())
                    .filter_map(|r| r.ok());
                async move { c.put_blob(stream).await }
            })
            .await?;
        moved += got.held.saturating_sub(from);
        if got.complete {
            return Ok(moved);
        }
    }
    bail!("the cluster holds only part of it after 8 tries")
}

fn check_fetch_target(dir: &Path) -> Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                bail!(
                    "{}: exists and is not empty; fetch writes a new folder",
                    dir.display()
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("{}", dir.display())),
    }
}

/// `fetch JOB --output DIR`: downloads a succeeded job's artifact kept in the
/// cluster into DIR, checking every file's SHA-256 against the committed
/// one; an interrupted fetch resumes.
pub async fn fetch(client: &CoordinatorClient, job: &str, dir: &Path) -> Result<()> {
    check_fetch_target(dir)?;
    let st = client
        .call(|mut c| {
            let job_id = job.to_string();
            async move { c.get_job(JobRef { job_id }).await }
        })
        .await?;
    if !st.in_cluster {
        bail!(
            "{job} wrote its artifact to {} on the coordinators; nothing is kept in the cluster",
            st.output
        );
    }
    if st.state != "succeeded" {
        bail!(
            "{job} is {}; only a succeeded job has an artifact",
            st.state
        );
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "artifact".into());
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = parent.join(format!(".{name}.fetch-{job}"));
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    let started = Instant::now();
    let mut total = 0u64;
    for f in &st.artifact {
        if f.name.contains('/') || f.name.starts_with('.') {
            bail!(
                "{job}: the cluster lists an artifact file named {:?}",
                f.name
            );
        }
        let to = tmp.join(&f.name);
        get_blob(client, &to, &f.sha256, f.bytes)
            .await
            .with_context(|| format!("fetching {} of {job}", f.name))?;
        total += f.bytes;
    }
    if dir.exists() {
        std::fs::remove_dir(dir).with_context(|| format!("{}: cannot replace", dir.display()))?;
    }
    std::fs::rename(&tmp, dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    eprintln!(
        "fetched {job}: {} file(s), {total} bytes into {} in {:.1} s; every SHA-256 matches",
        st.artifact.len(),
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Downloads blob `sha` into `to`, resuming a partial file, and checks it.
async fn get_blob(client: &CoordinatorClient, to: &Path, sha: &str, bytes: u64) -> Result<()> {
    use std::io::Write;
    for _ in 0..8 {
        let held = std::fs::metadata(to).map(|m| m.len()).unwrap_or(0);
        if held == bytes {
            let t = to.to_path_buf();
            let (got, _) =
                tokio::task::spawn_blocking(move || hcx_coordinator::blobs::hash_file(&t))
                    .await??;
            if got == sha {
                return Ok(());
            }
            std::fs::remove_file(to).with_context(|| format!("{}", to.display()))?;
            eprintln!(
                "{}: SHA-256 {got} is not the committed {sha}; fetching again",
                to.display()
            );
            continue;
        }
        if held > bytes {
            std::fs::remove_file(to).with_context(|| format!("{}", to.display()))?;
            continue;
        }
        let mut stream = client
            .call(|mut c| {
                let r = BlobRef {
                    sha256: sha.to_string(),
                    offset: held,
                    ..Default::default()
                };
                async move { c.get_blob(r).await }
            })
            .await?;
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(to)
            .with_context(|| format!("{}: cannot open", to.display()))?;
        loop {
            match stream.message().await {
                Ok(Some(chunk)) => out
                    .write_all(&chunk.data)
                    .with_context(|| format!("{}: cannot write", to.display()))?,
                Ok(None) => break,
                Err(s) => {
                    eprintln!(
                        "{}: download broke ({}); resuming",
                        to.display(),
                        s.message()
                    );
                    break;
                }
            }
        }
        out.sync_all()
            .with_context(|| format!("{}: cannot sync", to.display()))?;
    }
    bail!("{}: no whole, matching copy after 8 tries", to.display())
}

/// `status [JOB]`.
pub async fn status(client: &CoordinatorClient, job: Option<String>, json: bool) -> Result<bool> {
    let jobs = match job {
        Some(id) => vec![
            client
                .call(|mut c| {
                    let job_id = id.clone();
                    async move { c.get_job(JobRef { job_id }).await }
                })
                .await?,
        ],
        None => {
            client
                .call(|mut c| async move { c.list_jobs(ListJobsRequest {}).await })
                .await?
                .jobs
        }
    };
    if json {
        let v: Vec<serde_json::Value> = jobs.iter().map(status_json).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for j in &jobs {
            println!("{}", describe(j));
            for s in &j.shards {
                println!(
                    "  {:<14} {:<10} attempt {} {}{}",
                    s.label,
                    if s.node.is_empty() { "-" } else { &s.node },
                    s.attempt,
                    if s.done { "done" } else { "pending" },
                    if s.last_error.is_empty() {
                        String::new()
                    } else {
                        format!(" (last error: {})", s.last_error)
                    }
                );
            }
        }
    }
    Ok(true)
}

fn status_json(j: &JobStatus) -> serde_json::Value {
    serde_json::json!({
        "job_id": j.job_id, "name": j.name, "state": j.state, "reason": j.reason,
        "failed_stage": j.failed_stage, "output": j.output, "shards_done": j.shards_done,
        "shards_total": j.shards_total, "source_bytes": j.source_bytes,
        "artifact_bytes": j.artifact_bytes, "submitted_ms": j.submitted_ms,
        "finished_ms": j.finished_ms, "in_cluster": j.in_cluster,
        "gates": j.gates, "raises": j.raises,
        "artifact": j.artifact.iter().map(|f| serde_json::json!({
            "name": f.name, "sha256": f.sha256, "bytes": f.bytes,
        })).collect::<Vec<_>>(),
        "shards": j.shards.iter().map(|s| serde_json::json!({
            "id": s.id, "label": s.label, "tensors": s.tensors, "node": s.node,
            "attempt": s.attempt, "done": s.done, "last_error": s.last_error,
            "kernel_seconds": s.kernel_seconds, "bytes_in": s.bytes_in, "bytes_out": s.bytes_out,
            "step": s.step, "tensors_done": s.tensors_done, "bytes_done": s.bytes_done,
        })).collect::<Vec<_>>(),
    })
}

/// `cancel JOB`.
pub async fn cancel(client: &CoordinatorClient, job: String) -> Result<()> {
    let r = client
        .call(|mut c| {
            let job_id = job.clone();
            async move { c.cancel_job(JobRef { job_id }).await }
        })
        .await?;
    println!("{job}: {}", r.message);
    Ok(())
}

/// `nodes`.
/// The nodes registered with the cluster, as the planner sees them.
pub async fn registered_nodes(
    client: &CoordinatorClient,
) -> Result<Vec<hcx_coordinator::scheduler::NodeCapacity>> {
    let r = client
        .call(|mut c| async move { c.list_nodes(ListNodesRequest {}).await })
        .await?;
    Ok(r.nodes
        .into_iter()
        .map(|n| {
            let i = n.info.unwrap_or_default();
            hcx_coordinator::scheduler::NodeCapacity {
                name: i.name,
                cores: i.cores,
                memory_bytes: i.memory_bytes,
                labels: i.labels.into_iter().collect(),
                draining: n.draining,
                gpu: !i.gpu_kernels.is_empty(),
            }
        })
        .collect())
}

pub async fn nodes(client: &CoordinatorClient, json: bool) -> Result<()> {
    let r = client
        .call(|mut c| async move { c.list_nodes(ListNodesRequest {}).await })
        .await?;
    let info = client
        .call(|mut c| async move { c.cluster_info(ClusterInfoRequest {}).await })
        .await?;
    let leader = serde_json::json!({
        "id": info.leader_id, "addr": info.leader_addr, "term": info.term,
        "voters": info.voters, "last_applied": info.last_applied,
    });
    if json {
        let v: Vec<serde_json::Value> = r
            .nodes
            .iter()
            .map(|n| {
                let i = n.info.clone().unwrap_or_default();
                serde_json::json!({
                    "name": i.name, "listen": i.listen, "cores": i.cores,
                    "memory_bytes": i.memory_bytes, "gpus": i.gpus, "nccl": i.nccl,
                    "gpu_kernels": (!i.gpu_kernels.is_empty()).then_some(&i.gpu_kernels),
                    "labels": i.labels.into_iter().collect::<BTreeMap<_, _>>(),
                    "draining": n.draining, "last_seen_ms_ago": n.last_seen_ms_ago,
                    "shards": n.shards,
                })
            })
            .collect();
        let out = serde_json::json!({ "leader": leader, "nodes": v });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    match info.leader_id {
        Some(id) => println!(
            "leader: coordinator {id} at {} (term {}); voters {}",
            info.leader_addr,
            info.term,
            info.voters.join(",")
        ),
        None => println!("leader: none known (election in progress)"),
    }
    for n in &r.nodes {
        let i = n.info.clone().unwrap_or_default();
        let labels: BTreeMap<_, _> = i.labels.into_iter().collect();
        println!(
            "{:<12} {:>3} cores {:>7.1} GiB  gpus {}{}{}  labels {:?}  {}  shards {}  seen {}",
            i.name,
            i.cores,
            i.memory_bytes as f64 / (1u64 << 30) as f64,
            i.gpus.len(),
            if i.nccl { " (nccl)" } else { "" },
            if i.gpu_kernels.is_empty() {
                String::new()
            } else {
                format!(" (kernels on {})", i.gpu_kernels)
            },
            labels,
            if n.draining { "draining" } else { "active" },
            n.shards,
            n.last_seen_ms_ago
                .map(|ms| format!("{ms} ms ago"))
                .unwrap_or_else(|| "never (by this leader)".into())
        );
    }
    Ok(())
}

/// `drain NODE` and `undrain NODE` (`resume`).
pub async fn drain(client: &CoordinatorClient, name: String, resume: bool) -> Result<()> {
    let r = client
        .call(|mut c| {
            let name = name.clone();
            async move { c.drain_node(DrainNodeRequest { name, resume }).await }
        })
        .await?;
    println!("{}", r.message);
    Ok(())
}

/// `hcx-cluster coordinators add ID=ADDR… / remove ID…`: one membership
/// change through the leader; prints the voters after it.
pub async fn change_membership(
    client: &CoordinatorClient,
    add: BTreeMap<u64, String>,
    remove: Vec<u64>,
) -> Result<()> {
    let r = client
        .call(|mut c| {
            let req = MembershipChange {
                add: add.clone().into_iter().collect(),
                remove: remove.clone(),
            };
            async move { c.change_membership(req).await }
        })
        .await?;
    println!("{}", r.message);
    Ok(())
}

/// `hcx-cluster delete JOB`.
pub async fn delete(client: &CoordinatorClient, job: String) -> Result<()> {
    let r = client
        .call(|mut c| {
            let job_id = job.clone();
            async move { c.delete_job(JobRef { job_id }).await }
        })
        .await?;
    println!("{}", r.message);
    Ok(())
}

/// Reads a duration as `--retain-age` takes it: a number with `s`, `m`,
/// `h` or `d` (`90s`, `30m`, `12h`, `7d`).
pub fn parse_age(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 90s, 30m, 12h or 7d"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: the unit is one of s, m, h, d (e.g. 7d)")),
    };
    n.checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// `hcx-cluster certs revoke`: commits the revocation of `serial` (as
/// [`hcx_net::certs::parse_serial`] reads it) through the leader.
pub async fn revoke(client: &CoordinatorClient, serial: &str) -> Result<()> {
    let r = client
        .call(|mut c| {
            let serial = serial.to_string();
            async move { c.revoke_certificate(RevokeRequest { serial }).await }
        })
        .await?;
    println!("{}", r.message);
    Ok(())
}

/// An in-process cluster: one coordinator (a single raft voter) and `n`
/// nodes on loopback, with TLS from a throwaway CA — the same code as a
/// real cluster.
pub struct Embedded {
    coordinator: CoordinatorHandle,
    nodes: Vec<tokio::task::JoinHandle<Result<(), hcx_node::NodeError>>>,
    stop: watch::Sender<bool>,
    /// A client of it.
    pub client: CoordinatorClient,
    _dir: tempfile::TempDir,
}

impl Embedded {
    /// Starts the cluster with `n` nodes; its coordinator reads models only
    /// under `model_roots` and writes artifacts only inside `output_roots`.
    /// With `sites`, node i's certificate places it at site i mod the
    /// number of sites (a federated job's sites, in turn).
    pub async fn start(
        n: usize,
        sites: &[String],
        model_roots: Vec<PathBuf>,
        output_roots: Vec<PathBuf>,
    ) -> Result<Embedded> {
        let dir = tempfile::Builder::new()
            .prefix("hcx-embedded-")
            .tempdir()
            .context("cannot create a temporary folder")?;
        let certs = hcx_net::certs::DevCerts::create(&dir.path().join("certs"), &[])?;
        for i in 1..=n {
            let site = (!sites.is_empty()).then(|| sites[(i - 1) % sites.len()].as_str());
            let labels: Vec<(&str, &str)> = site.map(|s| ("site", s)).into_iter().collect();
            certs.add_node(&format!("node-{i}"), &[], &labels)?;
        }
        let coordinator = hcx_coordinator::start(CoordinatorConfig {
            dashboard: None,
            id: 1,
            listen: "127.0.0.1:0".parse()?,
            peers: BTreeMap::from([(1, "127.0.0.1:0".to_string())]),
            data_dir: dir.path().join("raft"),
            tls: Some(identity(&certs.coordinator(), Role::Coordinator)?),
            join: false,
            retention: Default::default(),
            lease: Duration::from_secs(10),
            model_roots,
            output_roots,
        })
        .await?;
        let addr = coordinator.addr.to_string();
        let (stop, stop_rx) = watch::channel(false);
        let cores = (hcx_node::machine_cores() / n as u32).max(1);
        let mut nodes = Vec::new();
        for i in 1..=n {
            let cfg = NodeConfig {
                name: format!("node-{i}"),
                coordinators: vec![addr.clone()],
                listen: "127.0.0.1:0".parse()?,
                labels: BTreeMap::new(),
                work_dir: dir.path().join(format!("node-{i}")),
                tls: Some(identity(&certs.node(&format!("node-{i}")), Role::Node)?),
                cores,
                memory_bytes: hcx_node::machine_memory(),
                heartbeat: Duration::from_millis(100),
                cache_keep: hcx_node::DEFAULT_CACHE_KEEP,
            };
            nodes.push(tokio::spawn(hcx_node::run(cfg, stop_rx.clone())));
        }
        let client = client(
            &addr,
            &Security::Certs(certs.client()),
            hcx_net::client::DEFAULT_PATIENCE,
        )?;
        // Wait until every node has registered, so the first plan uses them all.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = client
                .call(|mut c| async move { c.list_nodes(ListNodesRequest {}).await })
                .await?;
            if r.nodes.len() >= n {
                break;
            }
            if Instant::now() > deadline {
                bail!("only {} of {n} in-process nodes registered", r.nodes.len());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Embedded {
            coordinator,
            nodes,
            stop,
            client,
            _dir: dir,
        })
    }

    /// Runs a job to its end and returns its final state.
    pub async fn run(
        &self,
        spec: &JobSpec,
        output: Option<&Path>,
        display: Display,
    ) -> Result<JobStatus> {
        // The embedded coordinator shares this machine's files: the model
        // is read in place, never sent.
        let mut spec = spec.clone();
        spec.model.shared = true;
        let req = submit_request(&spec, output, None)?;
        let reply = self
            .client
            .call(|mut c| {
                let r = req.clone();
                async move { c.submit_job(r).await }
            })
            .await?;
        watch(&self.client, &reply.job_id, display).await
    }

    /// Stops the nodes and the coordinator.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for n in self.nodes {
            let _ = n.await;
        }
        self.coordinator.shutdown().await;
    }
}
