//! Cluster figures for docs/PERFORMANCE.md, each measured in one run:
//!
//! - job-state commit latency (p50/p99/max of 1,000) and submit-to-first-
//!   assignment latency (p50/p90/max of 100) on a three-coordinator cluster on loopback (in-process
//!   coordinators, real gRPC + TLS + redb);
//! - QUIC throughput moving 1 GiB between two processes (TLS, the data
//!   plane's transport settings) against a plain TCP loopback copy.
//!
//! `cargo bench --bench cluster` (`-- raft` or `-- transfer` for one part).
//! The end-to-end MiniLM times come from
//! the CLI (see docs/PERFORMANCE.md for the commands).

#[path = "../tests/common/ports.rs"]
mod ports;
use ports::free_port;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use hcx_coordinator::CoordinatorConfig;
use hcx_net::certs::DevCerts;
use hcx_net::client::CoordinatorClient;
use hcx_net::proto::{JobRef, NodeInfo, SubmitJobRequest};
use hcx_net::tls::Identity;

const GIB: u64 = 1 << 30;
const CHUNK: usize = 1 << 20;

/// The `p` quantile of sorted samples (nearest rank). Only asked for when at
/// least 10 samples lie above it, so a printed p99 is never just the maximum.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    assert!(
        sorted.len() as f64 * (1.0 - p) + 1e-9 >= 10.0,
        "{} samples are too few for the {p} quantile",
        sorted.len()
    );
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// The bench's certificates: the coordinators', and nodes `bench-0..3`.
fn bench_certs(dir: &Path) -> DevCerts {
    let certs = DevCerts::create(
        &dir.join("certs"),
        &["127.0.0.2".into(), "127.0.0.3".into()],
    )
    .unwrap();
    for i in 0..3 {
        certs.add_node(&format!("bench-{i}"), &[], &[]).unwrap();
    }
    certs
}

async fn raft_figures(dir: &Path) {
    let certs = bench_certs(dir);
    let ips = ["127.0.0.1", "127.0.0.2", "127.0.0.3"];
    let addrs: Vec<String> = ips
        .iter()
        .map(|ip| format!("{ip}:{}", free_port(ip)))
        .collect();
    let peers: BTreeMap<u64, String> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| (i as u64 + 1, a.clone()))
        .collect();
    let model = std::env::var_os("HCX_MODEL_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2"));
    let model_root = model
        .parent()
        .filter(|p| p.is_dir())
        .unwrap_or(dir)
        .to_path_buf();
    let mut handles = Vec::new();
    for (i, a) in addrs.iter().enumerate() {
        handles.push(
            hcx_coordinator::start(CoordinatorConfig {
                dashboard: None,
                id: i as u64 + 1,
                listen: a.parse().unwrap(),
                peers: peers.clone(),
                data_dir: dir.join(format!("c{i}")),
                tls: Some(Identity::load(&certs.coordinator()).unwrap()),
                join: false,
                retention: Default::default(),
                lease: Duration::from_secs(30),
                model_roots: vec![model_root.clone()],
                output_roots: vec![dir.to_path_buf()],
            })
            .await
            .unwrap(),
        );
    }
    let id = Identity::load(&certs.client()).unwrap();
    let client =
        CoordinatorClient::new(addrs.clone(), Some(hcx_net::tls::tonic_client_tls(&id))).unwrap();
    // Node calls (RegisterNode) need the certificate of the node named.
    let node_clients: Vec<CoordinatorClient> = (0..3)
        .map(|i| {
            let node_id = Identity::load(&certs.node(&format!("bench-{i}"))).unwrap();
            CoordinatorClient::new(
                addrs.clone(),
                Some(hcx_net::tls::tonic_client_tls(&node_id)),
            )
            .unwrap()
        })
        .collect();
    // Warm up: the first call waits for the election.
    let info = |i: u32| NodeInfo {
        name: format!("bench-{}", i % 3),
        listen: "127.0.0.1:1".into(),
        cores: 2,
        memory_bytes: 1 << 34,
        gpus: vec![],
        nccl: false,
        gpu_kernels: String::new(),
        labels: Default::default(),
    };
    for i in 0..20 {
        let n = info(i);
        node_clients[i as usize % 3]
            .call(|mut c| {
                let n = n.clone();
                async move { c.register_node(n).await }
            })
            .await
            .unwrap();
    }
    let mut commits = Vec::new();
    for i in 0..1000 {
        let n = info(i);
        let t = Instant::now();
        node_clients[i as usize % 3]
            .call(|mut c| {
                let n = n.clone();
                async move { c.register_node(n).await }
            })
            .await
            .unwrap();
        commits.push(t.elapsed().as_secs_f64() * 1e3);
    }
    commits.sort_by(f64::total_cmp);
    println!(
        "job-state commit (RegisterNode through the leader, {} sequential, 3 voters): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        commits.len(),
        percentile(&commits, 0.5),
        percentile(&commits, 0.99),
        commits[commits.len() - 1]
    );

    if !model.join("model.safetensors").is_file() {
        println!(
            "submit-to-first-assignment: skipped, no model at {} (run scripts/fetch-model.sh)",
            model.display()
        );
    } else {
        let mut lat = Vec::new();
        for i in 0..100 {
            let spec = serde_json::json!({
                "name": "bench", "seed": 1, "model": model, "output": dir.join(format!("out-{i}")),
                "pipeline": [{"rtn": {"bits": 8}}]
            });
            let req = SubmitJobRequest {
                spec_json: spec.to_string(),
                ..Default::default()
            };
            let t = Instant::now();
            let r = client
                .call(|mut c| {
                    let r = req.clone();
                    async move { c.submit_job(r).await }
                })
                .await
                .unwrap();
            // The first state in which a shard has a node.
            loop {
                let st = client
                    .call(|mut c| {
                        let job_id = r.job_id.clone();
                        async move { c.get_job(JobRef { job_id }).await }
                    })
                    .await
                    .unwrap();
                if st.shards.iter().any(|s| !s.node.is_empty()) {
                    break;
                }
            }
            lat.push(t.elapsed().as_secs_f64() * 1e3);
            let job_id = r.job_id.clone();
            let _ = client
                .call(|mut c| {
                    let job_id = job_id.clone();
                    async move { c.cancel_job(JobRef { job_id }).await }
                })
                .await;
        }
        lat.sort_by(f64::total_cmp);
        println!(
            "submit-to-first-assignment (MiniLM, 104 tensors → 8 shards on 3 registered nodes, {} jobs): p50 {:.2} ms, p90 {:.2} ms, max {:.2} ms",
            lat.len(),
            percentile(&lat, 0.5),
            percentile(&lat, 0.9),
            lat[lat.len() - 1]
        );
    }
    for h in handles {
        h.shutdown().await;
    }
}

/// Child process: receives 1 GiB on one QUIC stream, then answers one byte.
async fn quic_sink(certs: &Path, port_file: &Path) {
    let id = Identity::load(&certs.join("coordinator")).unwrap();
    let ep = hcx_net::tls::bulk_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        Some(hcx_net::tls::quinn_server_config(&id).unwrap()),
    )
    .unwrap();
    std::fs::write(port_file, ep.local_addr().unwrap().port().to_string()).unwrap();
    let conn = ep.accept().await.unwrap().await.unwrap();
    let (mut send, mut recv) = conn.accept_bi().await.unwrap();
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    while got < GIB {
        match tokio::io::AsyncReadExt::read(&mut recv, &mut buf)
            .await
            .unwrap()
        {
            0 => break,
            n => got += n as u64,
        }
    }
    tokio::io::AsyncWriteExt::write_all(&mut send, &[1])
        .await
        .unwrap();
    send.finish().unwrap();
    let _ = send.stopped().await;
}

fn tcp_sink(port_file: &Path) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    std::fs::write(port_file, l.local_addr().unwrap().port().to_string()).unwrap();
    let (mut s, _) = l.accept().unwrap();
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    while got < GIB {
        match s.read(&mut buf).unwrap() {
            0 => break,
            n => got += n as u64,
        }
    }
    s.write_all(&[1]).unwrap();
}

fn spawn_sink(role: &str, dir: &Path) -> (std::process::Child, u16) {
    let port_file = dir.join(format!("{role}.port"));
    let _ = std::fs::remove_file(&port_file);
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .env("HCX_BENCH_ROLE", role)
        .env("HCX_BENCH_DIR", dir)
        .spawn()
        .unwrap();
    for _ in 0..500 {
        if let Ok(p) = std::fs::read_to_string(&port_file)
            && let Ok(p) = p.trim().parse()
        {
            return (child, p);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("sink did not start");
}

async fn transfer_figures(dir: &Path) {
    let certs = dir.join("certs");
    let data = vec![0x5Au8; CHUNK];

    let (mut child, port) = spawn_sink("tcp", dir);
    let t = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    for _ in 0..(GIB / CHUNK as u64) {
        s.write_all(&data).unwrap();
    }
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).unwrap();
    let tcp = t.elapsed().as_secs_f64();
    child.wait().unwrap();

    let (mut child, port) = spawn_sink("quic", dir);
    let id = Identity::load(&certs.join("node-bench-0")).unwrap();
    let mut ep = hcx_net::tls::bulk_endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap();
    ep.set_default_client_config(hcx_net::tls::quinn_client_config(&id).unwrap());
    let t = Instant::now();
    let conn = ep
        .connect(([127, 0, 0, 1], port).into(), "localhost")
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    for _ in 0..(GIB / CHUNK as u64) {
        send.write_all(&data).await.unwrap();
    }
    send.finish().unwrap();
    let mut ack = [0u8; 1];
    recv.read_exact(&mut ack).await.unwrap();
    let quic = t.elapsed().as_secs_f64();
    let path = conn.stats().path;
    child.wait().unwrap();
    println!(
        "1 GiB between two processes on loopback: QUIC+TLS {:.2} s ({:.0} MB/s; {} of {} packets lost, {} congestion events, MTU {}), plain TCP {:.2} s ({:.0} MB/s)",
        quic,
        GIB as f64 / quic / 1e6,
        path.lost_packets,
        path.sent_packets,
        path.congestion_events,
        path.current_mtu,
        tcp,
        GIB as f64 / tcp / 1e6
    );
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    if let Ok(role) = std::env::var("HCX_BENCH_ROLE") {
        let dir = std::path::PathBuf::from(std::env::var("HCX_BENCH_DIR").unwrap());
        let port_file = dir.join(format!("{role}.port"));
        match role.as_str() {
            "quic" => rt.block_on(quic_sink(&dir.join("certs"), &port_file)),
            _ => tcp_sink(&port_file),
        }
        return;
    }
    // `cargo test --benches` runs bench targets with `--bench` absent: skip there.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    // `-- raft` or `-- transfer` runs one part alone.
    let only: Vec<String> = std::env::args()
        .filter(|a| a == "raft" || a == "transfer")
        .collect();
    let run = |part: &str| only.is_empty() || only.iter().any(|a| a == part);
    let dir = tempfile::tempdir().unwrap();
    if run("raft") {
        rt.block_on(raft_figures(dir.path()));
    }
    if run("transfer") {
        if !run("raft") {
            bench_certs(dir.path());
        }
        rt.block_on(transfer_figures(dir.path()));
    }
}
