//! A coordinator that was down while the others committed more than the
//! log they keep after a snapshot rejoins by InstallSnapshot, over the real
//! gRPC/TLS raft transport, once the state is several times tonic's default
//! 4 MiB message limit; and with it back, the group commits without the
//! third coordinator.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hcx_coordinator::scheduler::{self, TensorCost};
use hcx_coordinator::service::plan_options;
use hcx_coordinator::state::{ClusterState, Command, CommandResult, JobState, ShardResult};
use hcx_coordinator::store::NodeId;
use hcx_coordinator::{CoordinatorConfig, CoordinatorHandle};
use hcx_net::certs::DevCerts;
use hcx_net::proto::NodeInfo;
use hcx_net::proto::cluster_client::ClusterClient;
use hcx_net::tls::Identity;
use hcx_protocol::JobSpec;

/// tonic's default decode limit, which the old JSON-only raft messages hit.
const OLD_LIMIT: usize = 4 * 1024 * 1024;

/// The follower must receive a snapshot at least this large.
const SNAPSHOT_AT_LEAST: usize = 3 * OLD_LIMIT + OLD_LIMIT / 4;

const NODES: [&str; 4] = ["gpu-a1", "gpu-a2", "gpu-b1", "gpu-b2"];

const JOB: &str = "\
name: llama-70b-4bit
seed: 1
model: /models/llama-3-70b
output: /out/llama-3-70b-4bit
pipeline:
  - hadamard: {}
  - uniform: {bits: 4.4}
  - zstd: {level: 19}
rules:
  - match: [\"*norm*\"]
    keep: source
placement:
  layers_per_shard: 16
";

/// The tensors of an 80-layer, Llama-70B-shaped model.
fn tensors() -> Vec<TensorCost> {
    let (h, kv, ff, vocab) = (8192u64, 1024u64, 28672u64, 128_256u64);
    let t = |name: String, numel: u64, cost: f64| TensorCost {
        name,
        numel,
        bytes: numel * 2,
        cost_per_value: cost,
        gpu_cost_per_value: 0.0,
        working_values: None,
    };
    let mut out = vec![
        t("model.embed_tokens.weight".into(), vocab * h, 1.0),
        t("model.norm.weight".into(), h, 0.0),
        t("lm_head.weight".into(), vocab * h, 1.0),
    ];
    for l in 0..80 {
        let p = format!("model.layers.{l}");
        for (name, numel) in [
            ("self_attn.q_proj", h * h),
            ("self_attn.k_proj", kv * h),
            ("self_attn.v_proj", kv * h),
            ("self_attn.o_proj", h * h),
            ("mlp.gate_proj", ff * h),
            ("mlp.up_proj", ff * h),
            ("mlp.down_proj", ff * h),
        ] {
            out.push(t(format!("{p}.{name}.weight"), numel, 3.0));
        }
        out.push(t(format!("{p}.input_layernorm.weight"), h, 0.0));
        out.push(t(format!("{p}.post_attention_layernorm.weight"), h, 0.0));
    }
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config(dir: &Path, id: NodeId, peers: &BTreeMap<NodeId, String>) -> CoordinatorConfig {
    CoordinatorConfig {
        dashboard: None,
        id,
        listen: peers[&id].parse::<SocketAddr>().unwrap(),
        peers: peers.clone(),
        data_dir: dir.join(format!("c{id}")),
        tls: Some(Identity::load(&dir.join("certs/coordinator")).unwrap()),
        // The test's nodes never heartbeat: keep their shards theirs.
        join: false,
        retention: Default::default(),
        lease: Duration::from_secs(600),
        // Commands are proposed directly; no job goes through submit.
        model_roots: vec![dir.to_path_buf()],
        output_roots: vec![dir.to_path_buf()],
    }
}

/// Starts a coordinator, retrying while the previous run's sockets and
/// store are still being released.
async fn start(cfg: CoordinatorConfig) -> CoordinatorHandle {
    let mut last = String::new();
    for _ in 0..50 {
        match hcx_coordinator::start(cfg.clone()).await {
            Ok(h) => return h,
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("coordinator {} did not start: {last}", cfg.id);
}

async fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "timed out after {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

type Coordinators = BTreeMap<NodeId, CoordinatorHandle>;

/// The running coordinator that leads now.
fn leader_of(cs: &Coordinators) -> Option<&CoordinatorHandle> {
    cs.values().find(|h| h.is_leader())
}

/// Starts three coordinators under `dir` and waits for a leader every one
/// of them follows: tests name followers by the leader they see, so an
/// election still settling must be over.
async fn group(dir: &Path) -> (Coordinators, BTreeMap<NodeId, String>) {
    let peers: BTreeMap<NodeId, String> = (1..=3)
        .map(|id| (id, format!("127.0.0.1:{}", free_port())))
        .collect();
    let mut cs = Coordinators::new();
    for id in 1..=3 {
        cs.insert(id, start(config(dir, id, &peers)).await);
    }
    wait_for("a leader all three follow", Duration::from_secs(10), || {
        leader_of(&cs).is_some_and(|l| {
            let id = l.metrics().id;
            cs.values().all(|h| h.metrics().current_leader == Some(id))
        })
    })
    .await;
    (cs, peers)
}

/// Restarts coordinator `behind`, stopped at log index `stopped_at`, waits
/// (30 s at most) until it has the leader's state, and checks that it got
/// there by a snapshot; returns its metrics.
async fn rejoin_by_snapshot(
    cs: &mut Coordinators,
    dir: &Path,
    peers: &BTreeMap<NodeId, String>,
    behind: NodeId,
    stopped_at: u64,
) -> openraft::RaftMetrics<NodeId, openraft::BasicNode> {
    cs.insert(behind, start(config(dir, behind, peers)).await);
    wait_for(
        "the restarted follower catches up with the leader",
        Duration::from_secs(30),
        || {
            let (Some(l), f) = (leader_of(cs), &cs[&behind]) else {
                return false;
            };
            f.metrics().last_applied == l.metrics().last_applied && state_of(f) == state_of(l)
        },
    )
    .await;
    let fm = cs[&behind].metrics();
    assert!(
        fm.snapshot.is_some_and(|s| s.index > stopped_at),
        "the follower caught up without a snapshot: {fm:?}"
    );
    fm
}

/// Commits `cmd` through whichever coordinator leads, retrying across a
/// leader change (elections happen when a loaded host delays heartbeats).
async fn commit(cs: &Coordinators, cmd: Command) -> CommandResult {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = String::from("no leader");
    loop {
        if let Some(l) = leader_of(cs) {
            match tokio::time::timeout(Duration::from_secs(5), l.propose(cmd.clone())).await {
                Ok(Ok(r)) => return r,
                Ok(Err(e)) => last = e.message().to_string(),
                Err(_) => last = "no answer within 5 s".into(),
            }
        }
        assert!(
            Instant::now() < deadline,
            "nothing committed within 15 s: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Submits job `n`, finishes its shards on the test's nodes and ends it as a
/// success: what the leader commits for one job run on the cluster.
async fn run_job(cs: &Coordinators, base: &JobSpec, tensors: &[TensorCost], n: usize) {
    let mut spec = base.clone();
    spec.name = format!("{}-{n:04}", base.name);
    spec.output = format!("/out/llama-3-70b-4bit-{n:04}").into();
    let shards = scheduler::make_shards(tensors, &plan_options(&spec));
    let placements: Vec<scheduler::Placement> = shards
        .iter()
        .map(|s| scheduler::Placement {
            shard: s.id,
            node: NODES[(n + s.id as usize) % NODES.len()].into(),
        })
        .collect();
    let ids: Vec<u32> = shards.iter().map(|s| s.id).collect();
    let r = commit(
        cs,
        Command::SubmitJob {
            idempotency_key: Some(format!("submit-{n:04}")),
            output: spec.output.display().to_string(),
            spec: Box::new(spec),
            shards,
            placements: placements.clone(),
            now_ms: 1_700_000_000_000 + n as u64,
        },
    )
    .await;
    assert!(r.ok, "submit refused: {}", r.message);
    let job = r.job.expect("a job id");
    futures::future::join_all(ids.iter().zip(&placements).map(|(&shard, p)| {
        let job = job.clone();
        async move {
            let digest = format!("{:016x}", (n as u64) << 16 | u64::from(shard));
            let r = commit(
                cs,
                Command::ShardDone {
                    job,
                    shard,
                    result: ShardResult {
                        node: p.node.clone(),
                        attempt: 1,
                        sha256: digest.repeat(4),
                        bytes: 9_000_000_000 + u64::from(shard),
                        bytes_in: 28_000_000_000,
                        kernel_seconds: 812.25,
                        wall_seconds: 1033.5,
                    },
                },
            )
            .await;
            assert!(r.ok, "shard result refused: {}", r.message);
        }
    }))
    .await;
    let r = commit(
        cs,
        Command::FinishJob {
            job,
            state: JobState::Succeeded {
                artifact_bytes: 39_000_000_000,
                source_bytes: 141_000_000_000,
            },
            now_ms: 1_700_000_100_000 + n as u64,
            artifact: Vec::new(),
            gate_notes: Vec::new(),
        },
    )
    .await;
    // A retry after a leader change finds the job already ended.
    assert!(
        r.ok || r.message.ends_with("is not active"),
        "finish refused: {}",
        r.message
    );
}

fn state_of(h: &CoordinatorHandle) -> ClusterState {
    h.view().read(ClusterState::clone)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_behind_the_purged_log_catches_up_by_snapshot() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let certs = DevCerts::create(&dir.path().join("certs"), &[]).unwrap();
    for name in NODES {
        certs.add_node(name, &[], &[]).unwrap();
    }
    let (mut cs, peers) = group(dir.path()).await;
    let leader_id = leader_of(&cs).unwrap().metrics().id;
    let followers: Vec<NodeId> = (1..=3).filter(|id| *id != leader_id).collect();
    let (behind, other) = (followers[0], followers[1]);

    // Live nodes to hold the shards, registered the way nodes do.
    for name in NODES {
        let node_id = Identity::load(&certs.node(name)).unwrap();
        // Through whichever coordinator leads now (a loaded host can still
        // move the leadership).
        let mut attempt = 0;
        loop {
            let id = leader_of(&cs).map_or(leader_id, |l| l.metrics().id);
            let ch = hcx_net::client::channel(
                &peers[&id],
                Some(&hcx_net::tls::tonic_client_tls(&node_id)),
            )
            .unwrap();
            let r = ClusterClient::new(ch)
                .register_node(NodeInfo {
                    name: name.into(),
                    listen: "127.0.0.1:1".into(),
                    cores: 64,
                    memory_bytes: 512 << 30,
                    ..Default::default()
                })
                .await;
            match r {
                Ok(_) => break,
                Err(e) if attempt < 50 => {
                    attempt += 1;
                    eprintln!("register {name}: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("node registered: {e}"),
            }
        }
    }
    wait_for(
        "every coordinator has the nodes",
        Duration::from_secs(10),
        || cs.values().all(|h| state_of(h).nodes.len() == NODES.len()),
    )
    .await;

    // One follower goes down; the group goes on without it.
    let stopped_at = cs[&behind].metrics().last_log_index.unwrap_or(0);
    cs.remove(&behind).unwrap().shutdown().await;

    let base = JobSpec::parse(JOB, Path::new("job.yaml"), Path::new("/")).unwrap();
    let tensors = tensors();
    let mut jobs = 0;
    // The log index by which the state is big enough; jobs go on until a
    // snapshot covers it, so that snapshot is at least that big.
    let mut big_at: Option<u64> = None;
    loop {
        futures::stream::iter(jobs..jobs + 32)
            .for_each_concurrent(16, |n| run_job(&cs, &base, &tensors, n))
            .await;
        jobs += 32;
        let Some(leader) = leader_of(&cs) else {
            continue;
        };
        let m = leader.metrics();
        if big_at.is_none()
            && serde_json::to_vec(&state_of(leader)).unwrap().len() >= SNAPSHOT_AT_LEAST
        {
            big_at = m.last_log_index;
        }
        let snap = m.snapshot.map_or(0, |s| s.index);
        let purged = m.purged.map_or(0, |p| p.index);
        if big_at.is_some_and(|b| snap >= b) && purged > stopped_at {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no snapshot over the state after {jobs} jobs: {m:?}"
        );
    }
    let leader = leader_of(&cs).expect("a leader");
    let m = leader.metrics();
    let state_bytes = serde_json::to_vec(&state_of(leader)).unwrap().len();
    eprintln!(
        "{jobs} jobs finished in {:?}: leader {} log at {:?}, snapshot {:?}, purged {:?}; \
         the stopped follower at {stopped_at}; state {state_bytes} bytes as JSON",
        started.elapsed(),
        m.id,
        m.last_log_index.unwrap_or(0),
        m.snapshot.map(|l| l.index),
        m.purged.map(|l| l.index),
    );

    // The follower comes back: its log ends before the leader's first kept
    // entry, so only a snapshot can bring it up to date.
    let rejoin = Instant::now();
    let fm = rejoin_by_snapshot(&mut cs, dir.path(), &peers, behind, stopped_at).await;
    eprintln!(
        "follower {behind} caught up in {:?} (snapshot at {:?})",
        rejoin.elapsed(),
        fm.snapshot.map(|l| l.index)
    );

    // With the other follower down, the leader and the returned follower
    // are a majority and commit.
    cs.remove(&other).unwrap().shutdown().await;
    let r = commit(
        &cs,
        Command::DrainNode {
            name: NODES[0].into(),
            draining: true,
        },
    )
    .await;
    assert!(r.ok, "drain refused: {}", r.message);
    wait_for(
        "both coordinators apply the commit",
        Duration::from_secs(10),
        || cs.values().all(|h| state_of(h).nodes[NODES[0]].draining),
    )
    .await;
    for (_, h) in cs {
        h.shutdown().await;
    }
    eprintln!("done in {:?}", started.elapsed());
}

/// Submits and cancels job `n` of a small (MiniLM-sized) model: one
/// finished job in two commits.
async fn small_job(cs: &Coordinators, base: &JobSpec, n: usize) {
    let mut spec = base.clone();
    spec.name = format!("small-{n:05}");
    spec.output = format!("/out/small-{n:05}").into();
    let tensors: Vec<TensorCost> = (0..36)
        .map(|i| TensorCost {
            name: format!("encoder.layer.{}.w{}.weight", i / 6, i % 6),
            numel: 384 * 384,
            bytes: 384 * 384 * 4,
            cost_per_value: 1.0,
            gpu_cost_per_value: 0.0,
            working_values: None,
        })
        .collect();
    let shards = scheduler::make_shards(&tensors, &plan_options(&spec));
    let r = commit(
        cs,
        Command::SubmitJob {
            idempotency_key: Some(format!("small-{n:05}")),
            output: spec.output.display().to_string(),
            spec: Box::new(spec),
            shards,
            placements: vec![],
            now_ms: 1_700_000_000_000 + n as u64,
        },
    )
    .await;
    assert!(r.ok, "submit refused: {}", r.message);
    let r = commit(
        cs,
        Command::CancelJob {
            job: r.job.expect("a job id"),
            now_ms: 1_700_000_000_000 + n as u64,
        },
    )
    .await;
    assert!(r.ok, "cancel refused: {}", r.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_down_through_2000_finished_jobs_catches_up_by_snapshot_within_30_s() {
    let dir = tempfile::tempdir().unwrap();
    DevCerts::create(&dir.path().join("certs"), &[]).unwrap();
    let (mut cs, peers) = group(dir.path()).await;
    let leader_id = leader_of(&cs).unwrap().metrics().id;
    let behind = (1..=3).find(|id| *id != leader_id).unwrap();
    let stopped_at = cs[&behind].metrics().last_log_index.unwrap_or(0);
    cs.remove(&behind).unwrap().shutdown().await;

    let base = JobSpec::parse(
        "name: small\nseed: 1\nmodel: /models/small\noutput: /out/small\npipeline:\n  - rtn: {bits: 8}\n",
        Path::new("job.yaml"),
        Path::new("/"),
    )
    .unwrap();
    let t = Instant::now();
    futures::stream::iter(0..2000)
        .for_each_concurrent(16, |n| small_job(&cs, &base, n))
        .await;
    let leader = leader_of(&cs).expect("a leader");
    let m = leader.metrics();
    assert_eq!(state_of(leader).jobs.len(), 2000);
    assert!(
        m.purged.is_some_and(|p| p.index > stopped_at),
        "the log was not compacted past the follower: {m:?}"
    );
    eprintln!(
        "2000 jobs finished in {:?}; log at {:?}, snapshot {:?}, purged {:?}",
        t.elapsed(),
        m.last_log_index,
        m.snapshot.map(|s| s.index),
        m.purged.map(|p| p.index)
    );

    let rejoin = Instant::now();
    rejoin_by_snapshot(&mut cs, dir.path(), &peers, behind, stopped_at).await;
    println!(
        "a follower down through 2000 finished jobs caught up by snapshot in {:?}",
        rejoin.elapsed()
    );
    for (_, h) in cs {
        h.shutdown().await;
    }
}
