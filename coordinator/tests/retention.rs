//! The retention policy keeps a coordinator's state and disk bounded as
//! jobs pile up: 2,000 jobs finish on a coordinator that keeps 100, and
//! its state holds at most 100 finished jobs, its data folder stays small,
//! and the figures per retained job are printed (docs/PERFORMANCE.md).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use hcx_coordinator::scheduler::{self, TensorCost};
use hcx_coordinator::service::plan_options;
use hcx_coordinator::state::{ClusterState, Command};
use hcx_coordinator::{CoordinatorConfig, CoordinatorHandle, Retention};
use hcx_net::certs::DevCerts;
use hcx_net::tls::Identity;
use hcx_protocol::JobSpec;

const JOBS: usize = 2000;
const KEEP: usize = 100;

/// The tensors of a 6-layer, MiniLM-shaped model.
fn tensors() -> Vec<TensorCost> {
    let mut out = Vec::new();
    for l in 0..6 {
        for (name, numel) in [
            ("attention.self.query", 384 * 384),
            ("attention.self.key", 384 * 384),
            ("attention.self.value", 384 * 384),
            ("attention.output.dense", 384 * 384),
            ("intermediate.dense", 384 * 1536),
            ("output.dense", 1536 * 384),
        ] {
            out.push(TensorCost {
                name: format!("encoder.layer.{l}.{name}.weight"),
                numel,
                bytes: numel * 4,
                cost_per_value: 1.0,
                gpu_cost_per_value: 0.0,
                working_values: None,
            });
        }
    }
    out
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        total += if m.is_dir() {
            dir_bytes(&e.path())
        } else {
            m.len()
        };
    }
    total
}

async fn coordinator(dir: &Path, retention: Retention) -> CoordinatorHandle {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let h = hcx_coordinator::start(CoordinatorConfig {
        dashboard: None,
        id: 1,
        listen: addr.parse().unwrap(),
        peers: BTreeMap::from([(1, addr)]),
        data_dir: dir.join("raft"),
        tls: Some(Identity::load(&dir.join("certs/coordinator")).unwrap()),
        join: false,
        retention,
        lease: Duration::from_secs(60),
        model_roots: vec![dir.to_path_buf()],
        output_roots: vec![dir.to_path_buf()],
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !h.is_leader() {
        assert!(Instant::now() < deadline, "a single voter elects itself");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_state_and_disk_bounded_as_jobs_pile_up() {
    let dir = tempfile::tempdir().unwrap();
    DevCerts::create(&dir.path().join("certs"), &[]).unwrap();
    let h = coordinator(
        dir.path(),
        Retention {
            max_jobs: KEEP,
            max_age: None,
            max_bytes: None,
        },
    )
    .await;
    let base = JobSpec::parse(
        "name: minilm\nseed: 1\nmodel: /models/minilm\noutput: /out/minilm\npipeline:\n  - rtn: {bits: 8}\n",
        Path::new("job.yaml"),
        Path::new("/"),
    )
    .unwrap();
    let tensors = tensors();
    let started = Instant::now();
    let mut peak_jobs = 0;
    let mut per_job_json = 0;
    let mut halfway_disk = 0;
    for n in 0..JOBS {
        let mut spec = base.clone();
        spec.output = format!("/out/minilm-{n:05}").into();
        let shards = scheduler::make_shards(&tensors, &plan_options(&spec));
        let r = h
            .propose(Command::SubmitJob {
                idempotency_key: Some(format!("k{n}")),
                output: spec.output.display().to_string(),
                spec: Box::new(spec),
                shards,
                placements: vec![],
                now_ms: 1_700_000_000_000 + n as u64,
            })
            .await
            .unwrap();
        assert!(r.ok, "{r:?}");
        let r = h
            .propose(Command::CancelJob {
                job: r.job.unwrap(),
                now_ms: 1_700_000_000_000 + n as u64,
            })
            .await
            .unwrap();
        assert!(r.ok, "{r:?}");
        let (jobs, json) = h
            .view()
            .read(|s| (s.jobs.len(), serde_json::to_vec(s).unwrap().len()));
        if jobs > peak_jobs {
            peak_jobs = jobs;
        }
        if n == KEEP - 1 {
            per_job_json = json / jobs;
        }
        if n == JOBS / 2 - 1 {
            halfway_disk = dir_bytes(&dir.path().join("raft"));
        }
    }
    let wait = Instant::now() + Duration::from_secs(10);
    while h.view().read(|s| s.jobs.len()) > KEEP {
        assert!(Instant::now() < wait, "retention did not catch up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let state: ClusterState = h.view().read(ClusterState::clone);
    let keys = state.keys.len();
    assert_eq!(state.jobs.len(), KEEP);
    assert_eq!(
        keys, KEEP,
        "the deleted jobs' idempotency keys went with them"
    );
    // The newest jobs are the ones kept.
    assert!(state.jobs.contains_key(&format!("j{JOBS:06}")));
    assert!(!state.jobs.contains_key("j000001"));
    let disk = dir_bytes(&dir.path().join("raft"));
    let m = h.metrics();
    println!(
        "{JOBS} jobs (submit + cancel, 8 shards each) in {:.1} s, keeping {KEEP}: at most {peak_jobs} jobs in the state at once; \
         {per_job_json} bytes of state (JSON) per retained job; raft data folder {:.1} MiB; \
         log at {:?}, snapshot at {:?}, purged to {:?}",
        started.elapsed().as_secs_f64(),
        disk as f64 / (1 << 20) as f64,
        m.last_log_index,
        m.snapshot.map(|s| s.index),
        m.purged.map(|p| p.index),
    );
    // The folder holds the log since the last snapshot (a fixed window of
    // entries) and snapshots of at most KEEP jobs: twice the jobs do not
    // make it grow, while their state alone would have doubled.
    println!(
        "raft data folder after {} jobs {:.1} MiB, after {JOBS} {:.1} MiB",
        JOBS / 2,
        halfway_disk as f64 / (1 << 20) as f64,
        disk as f64 / (1 << 20) as f64
    );
    assert!(
        disk < halfway_disk + halfway_disk / 4,
        "the raft folder grew from {halfway_disk} to {disk} bytes with retention on"
    );
    let snapshot_json = serde_json::to_vec(&state).unwrap().len();
    assert!(
        snapshot_json < (KEEP + KEEP / 2) * per_job_json,
        "the state is {snapshot_json} bytes for {KEEP} jobs of {per_job_json} bytes"
    );
    h.shutdown().await;
}
