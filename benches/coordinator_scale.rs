//! The coordinator at scale, by simulation: three real coordinator
//! processes (`hcx-cluster coordinator`: raft voters with their redb logs,
//! gRPC and QUIC with mutual TLS) driven by simulated nodes — in-process
//! clients, each with its own node certificate, that register, heartbeat
//! every 500 ms as `hcx-cluster node` does, take the assignments their
//! heartbeats bring, wait a synthetic kernel time and upload a small
//! synthetic shard over the data plane, which the leader stores,
//! replicates to a majority and commits as done.
//!
//! For each node count (10, 100 and 1,000 by default; `HCX_SIM_NODES=10,50`
//! to choose) it measures, on an idle cluster, the leader's CPU per
//! heartbeat; then submits a 70B-shaped job (80 layers of a Llama-3-70B
//! shape, 723 bf16 tensors, 141 GB declared over a sparse file whose bytes
//! are never read) and 100 small jobs at once, and measures the time from
//! each job's submission to each of its shards reaching a node
//! (assignment latency), commits per second, and the leader's CPU until
//! every shard is done. The merge is not simulated: the synthetic shards
//! are not tensor files, so each job fails at its merge, after every shard
//! is done.
//!
//! `cargo bench --bench coordinator_scale` (table in docs/PERFORMANCE.md).

#[path = "../tests/common/ports.rs"]
mod ports;
use ports::free_port;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hcx_net::certs::DevCerts;
use hcx_net::client::CoordinatorClient;
use hcx_net::frames::{Reply, Request, read_frame, write_frame};
use hcx_net::proto::{
    Assignment, ClusterInfoRequest, HeartbeatRequest, ListJobsRequest, NodeInfo, SubmitJobRequest,
};
use hcx_net::tls::Identity;
use sha2::{Digest, Sha256};

/// Between heartbeats, as `hcx-cluster node` sends them by default.
const HEARTBEAT: Duration = Duration::from_millis(500);
/// How long a simulated node "computes" a shard.
const KERNEL_TIME: Duration = Duration::from_secs(1);
/// Bytes of each synthetic shard.
const SHARD_BYTES: usize = 4096;
/// Small jobs submitted beside the large one.
const SMALL_JOBS: usize = 100;
/// How long the idle cluster is measured.
const IDLE_WINDOW: Duration = Duration::from_secs(10);

/// Writes a safetensors file whose header declares `tensors` (bf16) and
/// whose data is a hole: the file takes a few KiB on disk.
fn write_sparse_model(dir: &Path, tensors: &[(String, Vec<u64>)]) -> u64 {
    std::fs::create_dir_all(dir).unwrap();
    let mut header = serde_json::Map::new();
    let mut at = 0u64;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<u64>() * 2;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [at, at + bytes]}),
        );
        at += bytes;
    }
    let mut text = serde_json::to_string(&header).unwrap();
    while !(text.len() + 8).is_multiple_of(8) {
        text.push(' ');
    }
    let path = dir.join("model.safetensors");
    let mut head = (text.len() as u64).to_le_bytes().to_vec();
    head.extend_from_slice(text.as_bytes());
    std::fs::write(&path, &head).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(head.len() as u64 + at).unwrap();
    at
}

/// A Llama-shaped model's tensors: `layers` blocks of the given widths.
fn llama_tensors(
    layers: u64,
    hidden: u64,
    kv: u64,
    inter: u64,
    vocab: u64,
) -> Vec<(String, Vec<u64>)> {
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![vocab, hidden])];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for (name, shape) in [
            ("self_attn.q_proj.weight", vec![hidden, hidden]),
            ("self_attn.k_proj.weight", vec![kv, hidden]),
            ("self_attn.v_proj.weight", vec![kv, hidden]),
            ("self_attn.o_proj.weight", vec![hidden, hidden]),
            ("mlp.gate_proj.weight", vec![inter, hidden]),
            ("mlp.up_proj.weight", vec![inter, hidden]),
            ("mlp.down_proj.weight", vec![hidden, inter]),
            ("input_layernorm.weight", vec![hidden]),
            ("post_attention_layernorm.weight", vec![hidden]),
        ] {
            t.push((format!("{p}.{name}"), shape));
        }
    }
    t.push(("model.norm.weight".into(), vec![hidden]));
    t.push(("lm_head.weight".into(), vec![vocab, hidden]));
    t
}

/// User plus system CPU seconds of a process so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the name.
    let ticks = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// The `p` quantile of sorted samples (nearest rank).
fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// What the simulated nodes saw, shared between them.
#[derive(Default)]
struct Seen {
    heartbeats: AtomicU64,
    heartbeat_micros: AtomicU64,
    uploads: AtomicU64,
    upload_errors: AtomicU64,
    /// Each job's submission time.
    submitted: Mutex<HashMap<String, Instant>>,
    /// Milliseconds from a job's submission to a shard's first assignment.
    assigned_ms: Mutex<Vec<f64>>,
    /// (job, shard) pairs already taken.
    taken: Mutex<HashSet<(String, u32)>>,
}

/// One simulated node: registers, then heartbeats until `stop`.
async fn simulate_node(
    name: String,
    client: CoordinatorClient,
    quic: quinn::ClientConfig,
    endpoint: quinn::Endpoint,
    seen: Arc<Seen>,
    stop: Arc<tokio::sync::Notify>,
) {
    let info = NodeInfo {
        name: name.clone(),
        listen: "127.0.0.1:1".into(),
        cores: 16,
        memory_bytes: 64 << 30,
        gpus: vec![],
        nccl: false,
        gpu_kernels: String::new(),
        labels: Default::default(),
    };
    while client
        .call(|mut c| {
            let info = info.clone();
            async move { c.register_node(info).await }
        })
        .await
        .is_err()
    {
        tokio::time::sleep(HEARTBEAT).await;
    }
    // Spread the heartbeats over the period, as independent nodes would.
    let offset = (name.len() as u64 * 7919 + name.bytes().map(u64::from).sum::<u64>() * 104_729)
        % HEARTBEAT.as_millis() as u64;
    tokio::time::sleep(Duration::from_millis(offset)).await;
    let mut tick = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            _ = stop.notified() => return,
            _ = tick.tick() => {}
        }
        let t = Instant::now();
        let reply = client
            .call(|mut c| {
                let name = name.clone();
                async move {
                    c.heartbeat(HeartbeatRequest {
                        name,
                        progress: vec![],
                    })
                    .await
                }
            })
            .await;
        seen.heartbeats.fetch_add(1, Ordering::Relaxed);
        seen.heartbeat_micros
            .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        let Ok(reply) = reply else { continue };
        for a in reply.assignments {
            let key = (a.job_id.clone(), a.shard);
            if !seen.taken.lock().unwrap().insert(key) {
                continue;
            }
            if let Some(at) = seen.submitted.lock().unwrap().get(&a.job_id) {
                let ms = at.elapsed().as_secs_f64() * 1e3;
                seen.assigned_ms.lock().unwrap().push(ms);
            }
            tokio::spawn(work(
                name.clone(),
                a,
                quic.clone(),
                endpoint.clone(),
                seen.clone(),
            ));
        }
    }
}

/// "Computes" a shard and uploads a synthetic result for it.
async fn work(
    name: String,
    a: Assignment,
    quic: quinn::ClientConfig,
    endpoint: quinn::Endpoint,
    seen: Arc<Seen>,
) {
    tokio::time::sleep(KERNEL_TIME).await;
    let body: Vec<u8> = (0..SHARD_BYTES)
        .map(|i| (i as u32 ^ a.shard).wrapping_mul(2_654_435_761) as u8)
        .collect();
    let sha = hex::encode(Sha256::digest(&body));
    // As a node does, a failed upload is tried again.
    for _ in 0..3 {
        match upload(&name, &a, &quic, &endpoint, &body, &sha).await {
            Ok(()) => {
                seen.uploads.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                eprintln!("{name}: upload of {} shard {}: {e}", a.job_id, a.shard);
                seen.upload_errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Uploads one synthetic shard over the data plane.
async fn upload(
    name: &str,
    a: &Assignment,
    quic: &quinn::ClientConfig,
    endpoint: &quinn::Endpoint,
    body: &[u8],
    sha: &str,
) -> Result<(), String> {
    let quic = quic.clone();
    let sha = sha.to_string();
    let name = name.to_string();
    async {
        let addr: std::net::SocketAddr = a.data_addr.parse().map_err(|e| format!("{e}"))?;
        let conn = endpoint
            .connect_with(quic, addr, &hcx_net::tls::server_name(&a.data_addr))
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let req = Request::Upload {
            job: a.job_id.clone(),
            shard: a.shard,
            attempt: a.attempt,
            node: name.clone(),
            sha256: sha,
            len: body.len() as u64,
            bytes_in: 0,
            kernel_seconds: KERNEL_TIME.as_secs_f64(),
            wall_seconds: KERNEL_TIME.as_secs_f64(),
        };
        write_frame(&mut send, &req)
            .await
            .map_err(|e| e.to_string())?;
        tokio::io::AsyncWriteExt::write_all(&mut send, body)
            .await
            .map_err(|e| e.to_string())?;
        let _ = send.finish();
        match read_frame::<_, Reply>(&mut recv).await {
            Ok(Reply::Stored) => Ok(()),
            Ok(Reply::Error { message, .. }) => Err(message),
            Ok(_) => Err("unexpected reply".to_string()),
            Err(e) => Err(e.to_string()),
        }
    }
    .await
}

/// One row of the table.
struct Row {
    nodes: usize,
    register_s: f64,
    idle_hb_per_s: f64,
    idle_cpu_pct: f64,
    idle_us_per_hb: f64,
    /// The simulated nodes' own CPU (this process) while idle.
    sim_cpu_pct: f64,
    hb_rtt_ms: f64,
    shards: usize,
    submit_s: f64,
    assign_p50: f64,
    assign_p99: f64,
    assign_max: f64,
    done_s: f64,
    commits_per_s: f64,
    load_cpu_pct: f64,
}

/// The coordinator processes, stopped when dropped.
struct Coordinators(Vec<Child>);

impl Drop for Coordinators {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The leader's id and its last applied log index, asking each
/// coordinator in turn (`each`: one client per coordinator) until one says
/// it leads.
async fn leader_info(each: &[CoordinatorClient]) -> (u64, u64) {
    loop {
        for client in each {
            if let Ok(r) = client
                .call(|mut c| async move { c.cluster_info(ClusterInfoRequest {}).await })
                .await
                && r.leader_id == Some(r.id)
            {
                return (r.id, r.last_applied);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn scale(n: usize, dir: &Path, big: &Path, small: &Path) -> Row {
    let bin = env!("CARGO_BIN_EXE_hcx-cluster");
    let certs = DevCerts::create(
        &dir.join("certs"),
        &["127.0.0.2".into(), "127.0.0.3".into()],
    )
    .unwrap();
    let names: Vec<String> = (0..n).map(|i| format!("sim-{i:04}")).collect();
    for name in &names {
        certs.add_node(name, &[], &[]).unwrap();
    }
    let ips = ["127.0.0.1", "127.0.0.2", "127.0.0.3"];
    let addrs: Vec<String> = ips
        .iter()
        .map(|ip| format!("{ip}:{}", free_port(ip)))
        .collect();
    let peers = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let models = big.parent().unwrap();
    let mut children = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let log = std::fs::File::create(dir.join(format!("c{}.log", i + 1))).unwrap();
        let mut cmd = Command::new(bin);
        // SAFETY: prctl is async-signal-safe; the coordinators end with the
        // bench even when it is killed.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        children.push(
            cmd.args([
                "coordinator",
                "--id",
                &(i + 1).to_string(),
                "--listen",
                addr,
            ])
            .args(["--peers", &peers])
            .arg("--data-dir")
            .arg(dir.join(format!("c{}", i + 1)))
            .arg("--certs")
            .arg(certs.coordinator())
            .arg("--model-root")
            .arg(models)
            .arg("--output-root")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
        );
    }
    let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
    let _guard = Coordinators(children);
    let operator = CoordinatorClient::new(
        addrs.clone(),
        Some(hcx_net::tls::tonic_client_tls(
            &Identity::load(&certs.client()).unwrap(),
        )),
    )
    .unwrap();
    let each: Vec<CoordinatorClient> = addrs
        .iter()
        .map(|a| {
            CoordinatorClient::new(
                vec![a.clone()],
                Some(hcx_net::tls::tonic_client_tls(
                    &Identity::load(&certs.client()).unwrap(),
                )),
            )
            .unwrap()
        })
        .collect();
    let (leader, _) = leader_info(&each).await;
    let leader_pid = pids[leader as usize - 1];
    eprintln!("{n} nodes: coordinator {leader} leads");

    // The simulated nodes.
    let seen = Arc::new(Seen::default());
    let stop = Arc::new(tokio::sync::Notify::new());
    let endpoint = quinn::Endpoint::client("0.0.0.0:0".parse().unwrap()).unwrap();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for name in &names {
        let id = Identity::load(&certs.node(name)).unwrap();
        let client =
            CoordinatorClient::new(addrs.clone(), Some(hcx_net::tls::tonic_client_tls(&id)))
                .unwrap();
        let quic = hcx_net::tls::quinn_client_config(&id).unwrap();
        tasks.push(tokio::spawn(simulate_node(
            name.clone(),
            client,
            quic,
            endpoint.clone(),
            seen.clone(),
            stop.clone(),
        )));
    }
    // Every node registered and heartbeating.
    loop {
        let r = operator
            .call(|mut c| async move { c.list_nodes(hcx_net::proto::ListNodesRequest {}).await })
            .await
            .unwrap();
        let hbs = seen.heartbeats.load(Ordering::Relaxed);
        if r.nodes.len() == n && hbs >= 2 * n as u64 {
            break;
        }
        if started.elapsed().as_secs().is_multiple_of(5) {
            eprintln!("{n} nodes: {} registered, {hbs} heartbeats", r.nodes.len());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let register_s = started.elapsed().as_secs_f64();

    // Idle: heartbeats only.
    let (hb0, us0) = (
        seen.heartbeats.load(Ordering::Relaxed),
        seen.heartbeat_micros.load(Ordering::Relaxed),
    );
    let cpu0 = cpu_seconds(leader_pid);
    let sim0 = cpu_seconds(std::process::id());
    tokio::time::sleep(IDLE_WINDOW).await;
    let idle_cpu = cpu_seconds(leader_pid) - cpu0;
    let sim_cpu = cpu_seconds(std::process::id()) - sim0;
    let hbs = seen.heartbeats.load(Ordering::Relaxed) - hb0;
    let hb_us = seen.heartbeat_micros.load(Ordering::Relaxed) - us0;

    // Load: one 70B-shaped job and the small jobs at once.
    let (_, applied0) = leader_info(&each).await;
    let cpu1 = cpu_seconds(leader_pid);
    let load_start = Instant::now();
    let mut submits = Vec::new();
    for i in 0..=SMALL_JOBS {
        let (model, name) = if i == 0 {
            (big.to_path_buf(), "llama-70b-shape".to_string())
        } else {
            (small.to_path_buf(), format!("small-{i:03}"))
        };
        let spec = serde_json::json!({
            "name": name, "seed": 1, "model": model, "output": dir.join("out").join(&name),
            "pipeline": [{"rtn": {"bits": 4, "group": 128}}]
        });
        let op = operator.clone();
        let seen = seen.clone();
        submits.push(tokio::spawn(async move {
            let req = SubmitJobRequest {
                spec_json: spec.to_string(),
                ..Default::default()
            };
            let at = Instant::now();
            let r = op
                .call(|mut c| {
                    let r = req.clone();
                    async move { c.submit_job(r).await }
                })
                .await
                .unwrap_or_else(|e| panic!("submit {name}: {e}"));
            seen.submitted.lock().unwrap().insert(r.job_id.clone(), at);
            r.job_id
        }));
    }
    let mut ids = Vec::new();
    for s in submits {
        ids.push(s.await.unwrap());
    }
    let submit_s = load_start.elapsed().as_secs_f64();
    // Until every shard of every job is done (the jobs then fail at their
    // merge: the shards are synthetic).
    let shards = loop {
        let r = operator
            .call(|mut c| async move { c.list_jobs(ListJobsRequest {}).await })
            .await
            .unwrap();
        let ours: Vec<_> = r.jobs.iter().filter(|j| ids.contains(&j.job_id)).collect();
        let total: u32 = ours.iter().map(|j| j.shards_total).sum();
        let done: u32 = ours.iter().map(|j| j.shards_done).sum();
        if ours.len() == ids.len() && total > 0 && done == total {
            break total as usize;
        }
        if let Some(j) = ours.iter().find(|j| {
            j.state != "running" && j.state != "merging" && j.shards_done < j.shards_total
        }) {
            panic!(
                "{} ended {} before its shards were done: {}",
                j.name, j.state, j.reason
            );
        }
        if load_start.elapsed().as_secs().is_multiple_of(10) {
            eprintln!(
                "{n} nodes: {done} of {total} shards done after {:.0} s ({} uploads, {} failed tries)",
                load_start.elapsed().as_secs_f64(),
                seen.uploads.load(Ordering::Relaxed),
                seen.upload_errors.load(Ordering::Relaxed)
            );
        }
        assert!(
            load_start.elapsed() < Duration::from_secs(900),
            "{done} of {total} shards done after 900 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let done_s = load_start.elapsed().as_secs_f64();
    let (_, applied1) = leader_info(&each).await;
    let load_cpu = cpu_seconds(leader_pid) - cpu1;
    stop.notify_waiters();
    for t in tasks {
        t.abort();
    }
    let mut lat = seen.assigned_ms.lock().unwrap().clone();
    lat.sort_by(f64::total_cmp);
    Row {
        nodes: n,
        register_s,
        idle_hb_per_s: hbs as f64 / IDLE_WINDOW.as_secs_f64(),
        idle_cpu_pct: idle_cpu / IDLE_WINDOW.as_secs_f64() * 100.0,
        idle_us_per_hb: idle_cpu * 1e6 / hbs.max(1) as f64,
        sim_cpu_pct: sim_cpu / IDLE_WINDOW.as_secs_f64() * 100.0,
        hb_rtt_ms: hb_us as f64 / hbs.max(1) as f64 / 1e3,
        shards,
        submit_s,
        assign_p50: quantile(&lat, 0.5),
        assign_p99: quantile(&lat, 0.99),
        assign_max: lat.last().copied().unwrap_or(f64::NAN),
        done_s,
        commits_per_s: (applied1 - applied0) as f64 / done_s,
        load_cpu_pct: load_cpu / done_s * 100.0,
    }
}

fn main() {
    // Criterion's harness flags are not used here.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let counts: Vec<usize> = std::env::var("HCX_SIM_NODES")
        .unwrap_or_else(|_| "10,100,1000".into())
        .split(',')
        .map(|v| {
            v.trim()
                .parse()
                .expect("HCX_SIM_NODES: comma-separated counts")
        })
        .collect();
    let root = tempfile_dir();
    let models = root.join("models");
    // Llama-3-70B's shape: 80 blocks, hidden 8192, 8 KV heads of 128,
    // MLP 28672, vocabulary 128256.
    let big = models.join("llama-70b-shape");
    let bytes = write_sparse_model(&big, &llama_tensors(80, 8192, 1024, 28672, 128_256));
    let small = models.join("small");
    write_sparse_model(&small, &llama_tensors(2, 256, 64, 512, 1000));
    println!(
        "70B-shaped model: {} tensors, {:.1} GB declared (sparse file)",
        80 * 9 + 3,
        bytes as f64 / 1e9
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    for n in counts {
        let dir = root.join(format!("n{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        let row = rt.block_on(scale(n, &dir, &big, &small));
        println!(
            "{n} nodes: registered in {:.1} s; idle {:.0} heartbeats/s, leader {:.1} % CPU, {:.0} µs per heartbeat; {} shards, assigned p50 {:.0} ms p99 {:.0} ms, all done in {:.1} s, {:.0} commits/s, leader {:.1} % CPU",
            row.register_s,
            row.idle_hb_per_s,
            row.idle_cpu_pct,
            row.idle_us_per_hb,
            row.shards,
            row.assign_p50,
            row.assign_p99,
            row.done_s,
            row.commits_per_s,
            row.load_cpu_pct
        );
        rows.push(row);
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!();
    println!(
        "| nodes | register all (s) | idle heartbeats/s | leader CPU idle (%) | leader CPU per heartbeat (µs) | simulator CPU idle (%) | heartbeat round trip (ms) | shards | submit 101 jobs (s) | assignment p50 / p99 / max (ms) | all shards done (s) | commits/s | leader CPU under load (%) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.1} | {:.0} | {:.1} | {:.0} | {:.0} | {:.1} | {} | {:.2} | {:.0} / {:.0} / {:.0} | {:.1} | {:.0} | {:.1} |",
            r.nodes,
            r.register_s,
            r.idle_hb_per_s,
            r.idle_cpu_pct,
            r.idle_us_per_hb,
            r.sim_cpu_pct,
            r.hb_rtt_ms,
            r.shards,
            r.submit_s,
            r.assign_p50,
            r.assign_p99,
            r.assign_max,
            r.done_s,
            r.commits_per_s,
            r.load_cpu_pct
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// A fresh folder under the system's temporary directory.
fn tempfile_dir() -> PathBuf {
    let base = std::env::temp_dir().join(format!("hcx-sim-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    base
}
