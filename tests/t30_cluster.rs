//! Whole-system cluster tests with real processes: three coordinators and
//! three nodes on 127.0.0.x ports, each with its own certificate from
//! `certs issue`. Every job's
//! artifact must be byte-identical to the local pipeline's, with or
//! without faults (a node killed, the leader killed, the whole cluster
//! restarted mid-job).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{free_port, hcx, hcx_ok, minilm, write_job};

struct Proc {
    child: Option<Child>,
    args: Vec<String>,
    log: PathBuf,
}

impl Proc {
    fn spawn(args: Vec<String>, log: PathBuf) -> Proc {
        let mut p = Proc {
            child: None,
            args,
            log,
        };
        p.start();
        p
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open log");
        let child = Command::new(env!("CARGO_BIN_EXE_hcx-cluster"))
            .args(&self.args)
            .env("HCX_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn hcx-cluster");
        self.child = Some(child);
    }

    /// Waits up to `limit` for the process to exit on its own; its status.
    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        let c = self.child.as_mut()?;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, no chance to clean up.
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

struct Cluster {
    dir: PathBuf,
    certs: PathBuf,
    coordinators: Vec<Proc>,
    addrs: Vec<String>,
    nodes: Vec<Proc>,
    /// Where each coordinator, then each node, serves its metrics.
    metrics: Vec<String>,
    node_metrics: Vec<String>,
    /// Each coordinator's dashboard: `http://ADDR` on loopback for the
    /// first and third, `https://ADDR` (client certificates) for the second.
    dashboards: Vec<String>,
}

impl Cluster {
    /// Three coordinators writing artifacts only inside `dir` and reading
    /// models only from `models` (or `dir`), and `nodes` nodes, each with a
    /// certificate naming it.
    fn start(dir: &Path, nodes: usize, models: &[&Path]) -> Cluster {
        Cluster::start_with(dir, nodes, Some(models))
    }

    /// Three coordinators that share no folder with anyone (no
    /// `--model-root`, no `--output-root`: models are sent by `submit` and
    /// artifacts stay in the cluster), and `nodes` nodes.
    fn start_bare(dir: &Path, nodes: usize) -> Cluster {
        Cluster::start_with(dir, nodes, None)
    }

    fn start_with(dir: &Path, nodes: usize, models: Option<&[&Path]>) -> Cluster {
        // The CA stays in `ca/`; each machine gets its own folder under
        // `certs/` with only what `certs issue` writes.
        let ca = dir.join("ca");
        hcx_ok(&["certs", "init", "--dir", ca.to_str().unwrap()]);
        let certs = dir.join("certs");
        let issue = |role: &str, name: &str, extra: &[&str]| {
            let out = certs.join(name);
            let mut args = vec![
                "certs",
                "issue",
                "--ca",
                ca.to_str().unwrap(),
                "--dir",
                out.to_str().unwrap(),
                "--role",
                role,
                "--name",
                name,
            ];
            args.extend_from_slice(extra);
            hcx_ok(&args);
        };
        issue(
            "coordinator",
            "coordinator",
            &["--host", "127.0.0.2", "--host", "127.0.0.3"],
        );
        issue("client", "operator", &[]);
        let ips = ["127.0.0.1", "127.0.0.2", "127.0.0.3"];
        for i in 0..nodes {
            // Valid for the address the node serves the node-to-node plane
            // on, which the other ranks of a collective group dial.
            let site = if i == 0 { "site=a" } else { "site=b" };
            issue(
                "node",
                &format!("n{}", i + 1),
                &["--host", ips[i % 3], "--label", site],
            );
        }
        let mut roots: Vec<String> = Vec::new();
        if let Some(models) = models {
            roots.extend(["--output-root".into(), dir.display().to_string()]);
            let own = [dir];
            for m in if models.is_empty() { &own[..] } else { models } {
                roots.extend(["--model-root".into(), m.display().to_string()]);
            }
        }
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
        let metrics: Vec<String> = ips
            .iter()
            .map(|ip| format!("{ip}:{}", free_port(ip)))
            .collect();
        let dashboards: Vec<String> = ips
            .iter()
            .enumerate()
            .map(|(i, ip)| {
                let scheme = if i == 1 { "https" } else { "http" };
                format!("{scheme}://{ip}:{}", free_port(ip))
            })
            .collect();
        let coordinators = (0..3)
            .map(|i| {
                let (flag, addr) = match dashboards[i].split_once("://") {
                    Some(("https", a)) => ("--https-listen", a),
                    Some((_, a)) => ("--http-listen", a),
                    None => unreachable!(),
                };
                let args: Vec<String> = vec![
                    "coordinator".into(),
                    flag.into(),
                    addr.into(),
                    "--id".into(),
                    (i + 1).to_string(),
                    "--listen".into(),
                    addrs[i].clone(),
                    "--peers".into(),
                    peers.clone(),
                    "--data-dir".into(),
                    dir.join(format!("c{}", i + 1)).display().to_string(),
                    "--certs".into(),
                    certs.join("coordinator").display().to_string(),
                    "--lease-ms".into(),
                    "3000".into(),
                    "--metrics-listen".into(),
                    metrics[i].clone(),
                ]
                .into_iter()
                .chain(roots.iter().cloned())
                .collect();
                Proc::spawn(args, dir.join(format!("c{}.log", i + 1)))
            })
            .collect();
        let mut c = Cluster {
            dir: dir.to_path_buf(),
            certs,
            coordinators,
            addrs,
            nodes: Vec::new(),
            metrics,
            node_metrics: Vec::new(),
            dashboards,
        };
        for i in 0..nodes {
            let ip = ips[i % 3];
            let m = format!("{ip}:{}", free_port(ip));
            c.node_metrics.push(m.clone());
            let args = vec![
                "node".into(),
                "--metrics-listen".into(),
                m,
                "--coordinators".into(),
                c.addrs.join(","),
                "--listen".into(),
                format!("{ip}:0"),
                "--name".into(),
                format!("n{}", i + 1),
                "--work-dir".into(),
                dir.join(format!("n{}", i + 1)).display().to_string(),
                "--certs".into(),
                c.certs.join(format!("n{}", i + 1)).display().to_string(),
                "--cores".into(),
                "1".into(),
                "--heartbeat-ms".into(),
                "200".into(),
            ];
            c.nodes
                .push(Proc::spawn(args, dir.join(format!("n{}.log", i + 1))));
        }
        c.wait_nodes(nodes);
        c
    }

    fn args<'a>(&'a self, cmd: &[&'a str]) -> Vec<String> {
        let mut v: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        v.extend([
            "--coordinators".into(),
            self.addrs.join(","),
            "--certs".into(),
            self.certs.join("operator").display().to_string(),
        ]);
        v
    }

    fn run(&self, cmd: &[&str]) -> std::process::Output {
        let args = self.args(cmd);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        hcx(&refs)
    }

    fn run_ok(&self, cmd: &[&str]) -> String {
        let out = self.run(cmd);
        assert!(
            out.status.success(),
            "hcx-cluster {cmd:?} failed:\n{}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for e in std::fs::read_dir(&self.dir).unwrap().flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                s.push_str(&format!("--- {}\n", p.display()));
                for l in tail.iter().rev() {
                    s.push_str(l);
                    s.push('\n');
                }
            }
        }
        s
    }

    fn nodes_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.run_ok(&["nodes", "--json"])).unwrap()
    }

    fn wait_nodes(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.run(&["nodes", "--json"]);
            if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                if v["nodes"].as_array().map_or(0, |a| a.len()) >= n {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "nodes did not register:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn leader(&self) -> usize {
        let v = self.nodes_json();
        let id = v["leader"]["id"].as_u64().expect("a leader");
        id as usize - 1
    }

    fn status(&self, job: &str) -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&self.run_ok(&["status", job, "--json"])).unwrap();
        v[0].clone()
    }

    /// Waits until `pred` holds for the job's status.
    fn wait_job(&self, job: &str, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let out = self.run(&["status", job, "--json"]);
            if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                if pred(&v[0]) {
                    return;
                }
                assert!(
                    !matches!(v[0]["state"].as_str(), Some("failed" | "cancelled")),
                    "job ended while waiting for {what}: {v}\n{}",
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_succeeded(&self, job: &str) {
        self.wait_job(job, "success", |v| v["state"] == "succeeded");
    }
}

/// The tensor file and manifest of an artifact (the rest is run metadata).
fn artifact_bytes(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    (
        std::fs::read(dir.join("model.hcx.safetensors")).expect("tensor file"),
        std::fs::read(dir.join("hcx-manifest.json")).expect("manifest"),
    )
}

fn assert_same_artifact(a: &Path, b: &Path) {
    let (ta, ma) = artifact_bytes(a);
    let (tb, mb) = artifact_bytes(b);
    assert!(
        ta == tb,
        "tensor files differ: {} vs {}",
        a.display(),
        b.display()
    );
    assert!(
        ma == mb,
        "manifests differ: {} vs {}",
        a.display(),
        b.display()
    );
}

/// A synthetic model slow enough (uniform search + zstd 19 on 12 layers)
/// that faults land mid-job, and its local-pipeline artifact.
fn slow_job() -> &'static (PathBuf, PathBuf) {
    static JOB: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    JOB.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let model = dir.join("model.safetensors");
        common::write_slow_model(&model);
        let reference = dir.join("reference");
        let job = write_job(&dir, "slow", &model, &reference, common::SLOW_PIPELINE);
        hcx_ok(&["run", "--local", job.to_str().unwrap()]);
        (job, reference)
    })
}

fn submit(c: &Cluster, job: &Path, output: &Path, key: &str) -> String {
    c.run_ok(&[
        "submit",
        job.to_str().unwrap(),
        "--cluster-output",
        output.to_str().unwrap(),
        "--idempotency-key",
        key,
    ])
    .trim()
    .to_string()
}

/// Arguments of a one-coordinator cluster serving on `addr`, secured by
/// `security` (`--certs DIR` or `--insecure`).
fn lone_coordinator(
    addr: &str,
    data_dir: &Path,
    security: &[String],
    model_root: &Path,
    output_root: &Path,
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "coordinator".into(),
        "--id".into(),
        "1".into(),
        "--listen".into(),
        addr.into(),
        "--peers".into(),
        format!("1={addr}"),
        "--data-dir".into(),
        data_dir.display().to_string(),
    ];
    args.extend_from_slice(security);
    args.extend([
        "--model-root".into(),
        model_root.display().to_string(),
        "--output-root".into(),
        output_root.display().to_string(),
    ]);
    args
}

/// Submits `job` with `--watch` to write `output` and checks that it
/// succeeds (printing the cluster's logs when it does not).
fn submit_and_watch(c: &Cluster, job: &Path, output: &Path) {
    let submitted = c.run_ok(&[
        "submit",
        job.to_str().unwrap(),
        "--cluster-output",
        output.to_str().unwrap(),
        "--watch",
    ]);
    assert!(submitted.contains("succeeded"), "{submitted}\n{}", c.logs());
}

/// Waits until some shard is held by a node and at least one is done, and
/// returns the holder's name.
fn wait_mid_job(c: &Cluster, job: &str) -> String {
    c.wait_job(job, "a shard in flight after one is done", |v| {
        let shards = v["shards"].as_array().cloned().unwrap_or_default();
        shards.iter().any(|s| s["done"] == true)
            && shards
                .iter()
                .any(|s| s["done"] == false && !s["node"].as_str().unwrap_or("").is_empty())
    });
    let v = c.status(job);
    v["shards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["done"] == false && !s["node"].as_str().unwrap_or("").is_empty())
        .map(|s| s["node"].as_str().unwrap().to_string())
        .unwrap()
}

#[test]
fn minilm_on_three_coordinators_and_three_nodes_matches_the_local_run() {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    let job = common::example_job(dir.path(), "minilm-4bit", &minilm(), &local);
    hcx_ok(&["run", "--local", job.to_str().unwrap()]);
    let c = Cluster::start(dir.path(), 3, &[&minilm()]);
    let out = dir.path().join("cluster");
    let out_s = out.to_str().unwrap();
    let submitted = c.run_ok(&[
        "submit",
        job.to_str().unwrap(),
        "--cluster-output",
        out_s,
        "--watch",
        "--idempotency-key",
        "minilm-once",
    ]);
    let id = submitted.lines().next().unwrap().trim().to_string();
    assert!(submitted.contains("succeeded"), "{submitted}");
    assert_same_artifact(&local, &out);
    // Every node took part, and the report says who did what.
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("attribution.json")).unwrap())
            .unwrap();
    let nodes = report["nodes"].as_array().expect("per-node attribution");
    assert_eq!(nodes.len(), 3, "{report}");
    // The same key again: the same job, not a second one.
    let again = submit(&c, &job, &out, "minilm-once");
    assert_eq!(again, id);
    // The key is bound to the spec: the same key for another output is
    // refused, naming the job it belongs to.
    let other = dir.path().join("other");
    let refused = c.run(&[
        "submit",
        job.to_str().unwrap(),
        "--cluster-output",
        other.to_str().unwrap(),
        "--idempotency-key",
        "minilm-once",
    ]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "idempotency key `minilm-once` belongs to job {id}"
        )) && err.contains("spec differs"),
        "{err}"
    );
    let all: serde_json::Value = serde_json::from_str(&c.run_ok(&["status", "--json"])).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 1, "{all}");
    // The embedded cluster writes the same bytes.
    let embedded = dir.path().join("embedded");
    hcx_ok(&[
        "run",
        job.to_str().unwrap(),
        "--nodes",
        "2",
        "--output",
        embedded.to_str().unwrap(),
    ]);
    assert_same_artifact(&local, &embedded);
}

/// A calibrated and distilled MiniLM job small enough for a test, with
/// `steps` distillation steps, and the folder its calibration file lies in.
fn calibrated_job(dir: &Path, name: &str, output: &Path, steps: u32) -> (PathBuf, PathBuf) {
    let sentences = common::root().join("configs/calibration");
    let body = format!(
        "pipeline:\n  - hadamard: {{}}\n  - gptq: {{grid: {{uniform: {{bits: 2.52}}}}}}\nrules:\n  - match: [\"*LayerNorm*\", \"*.bias\"]\n    keep: source\n  - match: [\"embeddings.*\", \"pooler.*\"]\n    keep: int8\ncalibration:\n  sentences: {}\n  samples: 24\n  seq_len: 32\ndistill: {{steps: {steps}, lr: 0.001, batch: 6, params: [norms, offsets]}}\n",
        sentences.join("sentences.txt").display()
    );
    (write_job(dir, name, &minilm(), output, &body), sentences)
}

#[test]
fn a_calibrated_job_runs_as_one_group_on_three_nodes_and_matches_the_local_run() {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    let (job, sentences) = calibrated_job(dir.path(), "group", &local, 4);
    hcx_ok(&["run", "--local", job.to_str().unwrap()]);
    let c = Cluster::start(dir.path(), 3, &[&minilm(), &sentences]);
    let out = dir.path().join("cluster");
    submit_and_watch(&c, &job, &out);
    assert_same_artifact(&local, &out);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("attribution.json")).unwrap())
            .unwrap();
    // The three nodes ran it as one group, and each wrote a shard.
    let group = &report["group"];
    assert_eq!(
        group["members"].as_array().map(Vec::len),
        Some(3),
        "{report}"
    );
    assert_eq!(group["formation"], 1, "{report}");
    assert_eq!(
        report["nodes"].as_array().map(Vec::len),
        Some(3),
        "{report}"
    );
    // The ranks' calibration and distillation accounts reach the report.
    assert_eq!(report["calibration"]["samples"], 24, "{report}");
    let blocks = report["distill"]["blocks"]
        .as_array()
        .expect("distill section");
    assert_eq!(blocks.len(), 6, "{report}");
    // The embedded cluster runs it as a group of two, to the same bytes.
    let embedded = dir.path().join("embedded");
    hcx_ok(&[
        "run",
        job.to_str().unwrap(),
        "--nodes",
        "2",
        "--output",
        embedded.to_str().unwrap(),
    ]);
    assert_same_artifact(&local, &embedded);
    // The model split by layer over the three nodes: each holds only its
    // own blocks and the activations flow from node to node, to the same
    // tensor bytes (the manifest differs by the job's `parallel:` only).
    let staged_job = dir.path().join("staged.yaml");
    let text = std::fs::read_to_string(&job).unwrap();
    std::fs::write(
        &staged_job,
        text.replace("  seq_len: 32\n", "  seq_len: 32\n  parallel: layers\n"),
    )
    .unwrap();
    assert!(
        std::fs::read_to_string(&staged_job)
            .unwrap()
            .contains("parallel: layers")
    );
    let staged = dir.path().join("staged");
    submit_and_watch(&c, &staged_job, &staged);
    assert!(
        artifact_bytes(&staged).0 == artifact_bytes(&local).0,
        "the layer-parallel run gives other tensor bytes"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(staged.join("attribution.json")).unwrap())
            .unwrap();
    assert_eq!(report["group"]["members"].as_array().map(Vec::len), Some(3));
    assert_eq!(
        report["distill"]["blocks"].as_array().map(Vec::len),
        Some(6)
    );
    // A calibration file the coordinators cannot read in place (outside
    // their model roots) is sent by `submit`, and every node of the group
    // reads the cluster's copy: the same tensor bytes.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let stray = elsewhere.join("sentences.txt");
    std::fs::copy(sentences.join("sentences.txt"), &stray).unwrap();
    let text = std::fs::read_to_string(&job).unwrap().replace(
        &sentences.join("sentences.txt").display().to_string(),
        &stray.display().to_string(),
    );
    let outside = dir.path().join("outside.yaml");
    std::fs::write(&outside, &text).unwrap();
    let sent = dir.path().join("sent");
    let out = c.run(&[
        "submit",
        outside.to_str().unwrap(),
        "--cluster-output",
        sent.to_str().unwrap(),
        "--watch",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.contains("sending them"),
        "{err}\n{}",
        c.logs()
    );
    assert!(
        artifact_bytes(&sent).0 == artifact_bytes(&local).0,
        "the sent calibration file gives other tensor bytes"
    );
    let sha = sha256_hex(&std::fs::read(&stray).unwrap());
    for n in ["n1", "n2", "n3"] {
        let copy = dir.path().join(n).join("calibration").join(&sha);
        assert!(copy.is_file(), "{} lacks {}", n, copy.display());
    }
    // The manifest names the file where it was read, not how it travelled.
    let manifest = std::fs::read_to_string(sent.join("hcx-manifest.json")).unwrap();
    assert!(
        manifest.contains(&stray.display().to_string()) && !manifest.contains("\"sent\""),
        "{manifest}"
    );
    // A job that says its storage is shared is not sent: a calibration
    // file outside the model roots is refused at submit.
    let model = minilm().display().to_string();
    let shared = text.replace(
        &format!("model: {model}"),
        &format!("model: {{path: {model}, shared: true}}"),
    );
    assert!(shared.contains("shared: true"), "{shared}");
    let outside = dir.path().join("outside-shared.yaml");
    std::fs::write(&outside, shared).unwrap();
    let refused = c.run(&["submit", outside.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{err}");
    assert!(
        err.contains("calibration file") && err.contains("outside the model root"),
        "{err}"
    );
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[test]
fn a_federated_job_calibrates_each_site_on_its_own_nodes_and_matches_the_local_run() {
    let dir = tempfile::tempdir().unwrap();
    // Each site's sentences in a folder of its own, outside every model root.
    let all =
        std::fs::read_to_string(common::root().join("configs/calibration/sentences.txt")).unwrap();
    let lines: Vec<&str> = all.lines().collect();
    let mut files = Vec::new();
    for (site, part) in [("a", &lines[..40]), ("b", &lines[40..80])] {
        let d = dir.path().join(format!("site-{site}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("sentences.txt"), part.join("\n")).unwrap();
        files.push(d.join("sentences.txt"));
    }
    let local = dir.path().join("local");
    let body = format!(
        "pipeline:\n  - hadamard: {{}}\n  - gptq: {{grid: {{uniform: {{bits: 2.52}}}}}}\nrules:\n  - match: [\"*LayerNorm*\", \"*.bias\"]\n    keep: source\n  - match: [\"embeddings.*\", \"pooler.*\"]\n    keep: int8\ncalibration:\n  sites:\n    a: {}\n    b: {}\n  samples: 10\n  seq_len: 32\n  allow_small_sites: true\ndistill: {{steps: 2, lr: 0.001, batch: 6, params: [norms]}}\n",
        files[0].display(),
        files[1].display()
    );
    let job = write_job(dir.path(), "federated", &minilm(), &local, &body);
    hcx_ok(&["run", "--local", job.to_str().unwrap()]);
    // n1 is at site a, n2 and n3 at site b. Nothing is shared: the
    // coordinators read no file in place, so submit sends the model, every
    // rank downloads it from them, and the artifact comes back by fetch.
    let c = Cluster::start_bare(dir.path(), 3);
    let out = dir.path().join("cluster");
    let said = c.run_ok(&[
        "submit",
        job.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(said.contains("succeeded"), "{said}");
    assert_same_artifact(&local, &out);
    for n in 1..=3 {
        let models: Vec<_> = std::fs::read_dir(dir.path().join(format!("n{n}/models")))
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(
            models.len() == 1 && models[0].join(".complete").is_file(),
            "n{n} did not download the sent model: {models:?}"
        );
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("attribution.json")).unwrap())
            .unwrap();
    assert_eq!(
        report["group"]["members"],
        serde_json::json!(["n1", "n2", "n3"]),
        "{report}"
    );
    assert_eq!(
        report["group"]["sites"],
        serde_json::json!(["a", "b", "b"]),
        "{report}"
    );
    assert_eq!(report["calibration"]["samples"], 20, "{report}");
    // The embedded cluster puts its two nodes at the two sites.
    let embedded = dir.path().join("embedded");
    hcx_ok(&[
        "run",
        job.to_str().unwrap(),
        "--nodes",
        "2",
        "--output",
        embedded.to_str().unwrap(),
    ]);
    assert_same_artifact(&local, &embedded);
    // A site no node is at: refused at submit, by name.
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("    b: ", "    z: ");
    let lost = dir.path().join("lost.yaml");
    std::fs::write(&lost, text).unwrap();
    let refused = c.run(&["submit", lost.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("site=z"), "{err}");
}

#[test]
fn a_killed_rank_breaks_the_group_which_forms_again_and_the_job_still_matches() {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    let (job, sentences) = calibrated_job(dir.path(), "regroup", &local, 40);
    hcx_ok(&["run", "--local", job.to_str().unwrap()]);
    let mut c = Cluster::start(dir.path(), 3, &[&minilm(), &sentences]);
    let out = dir.path().join("out");
    let id = submit(&c, &job, &out, "regroup");
    c.wait_job(&id, "a group of three", |v| {
        let shards = v["shards"].as_array().cloned().unwrap_or_default();
        shards.len() == 3
            && shards
                .iter()
                .all(|s| !s["node"].as_str().unwrap_or("").is_empty())
    });
    // Let the ranks get into the calibration, then kill the middle one.
    let log = dir.path().join("n2.log");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("calibrated block")
    {
        assert!(
            Instant::now() < deadline,
            "n2 never calibrated a block:\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c.nodes[1].kill9();
    c.wait_succeeded(&id);
    assert_same_artifact(&local, &out);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("attribution.json")).unwrap())
            .unwrap();
    let group = &report["group"];
    assert_eq!(group["formation"], 2, "{report}");
    assert_eq!(
        group["members"],
        serde_json::json!(["n1", "n3"]),
        "{report}"
    );
    assert!(
        group["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{report}"
    );
}

#[test]
fn a_killed_node_loses_its_lease_and_the_job_still_matches() {
    let (job, reference) = slow_job();
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 3, &[job.parent().unwrap()]);
    let out = dir.path().join("out");
    let id = submit(&c, job, &out, "k1");
    let victim = wait_mid_job(&c, &id);
    let i: usize = victim.trim_start_matches('n').parse::<usize>().unwrap() - 1;
    c.nodes[i].kill9();
    c.wait_succeeded(&id);
    assert_same_artifact(reference, &out);
    let v = c.status(&id);
    assert!(
        v["shards"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["attempt"].as_u64().unwrap() >= 2),
        "no shard was re-assigned: {v}"
    );
}

#[test]
fn a_killed_leader_is_replaced_and_the_job_still_matches() {
    let (job, reference) = slow_job();
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 3, &[job.parent().unwrap()]);
    let out = dir.path().join("out");
    let id = submit(&c, job, &out, "k2");
    wait_mid_job(&c, &id);
    let leader = c.leader();
    c.coordinators[leader].kill9();
    c.wait_succeeded(&id);
    assert_same_artifact(reference, &out);
    assert_ne!(c.leader(), leader);
}

#[test]
fn a_whole_cluster_restart_resumes_the_job() {
    let (job, reference) = slow_job();
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 3, &[job.parent().unwrap()]);
    let out = dir.path().join("out");
    let id = submit(&c, job, &out, "k3");
    wait_mid_job(&c, &id);
    for p in c.coordinators.iter_mut().chain(c.nodes.iter_mut()) {
        p.kill9();
    }
    for p in c.coordinators.iter_mut().chain(c.nodes.iter_mut()) {
        p.start();
    }
    c.wait_succeeded(&id);
    assert_same_artifact(reference, &out);
    // Still one job: the restart replayed it, nothing was submitted twice.
    let all: serde_json::Value = serde_json::from_str(&c.run_ok(&["status", "--json"])).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 1, "{all}");
}

#[test]
fn foreign_misnamed_and_revoked_certificates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 1, &[]);
    let ca = dir.path().join("ca");
    // A client whose certificate comes from another CA.
    let other_ca = dir.path().join("other-ca");
    let other = dir.path().join("other-client");
    hcx_ok(&["certs", "init", "--dir", other_ca.to_str().unwrap()]);
    hcx_ok(&[
        "certs",
        "issue",
        "--ca",
        other_ca.to_str().unwrap(),
        "--dir",
        other.to_str().unwrap(),
        "--role",
        "client",
        "--name",
        "mallory",
    ]);
    let out = hcx(&[
        "nodes",
        "--coordinators",
        &c.addrs[0],
        "--certs",
        other.to_str().unwrap(),
        "--timeout",
        "4",
    ]);
    assert!(!out.status.success());
    // No machine's folder holds the CA key, and a machine refuses to start
    // from the CA's folder.
    for e in std::fs::read_dir(&c.certs).unwrap() {
        let d = e.unwrap().path();
        assert!(!d.join("ca.key").exists(), "{}", d.display());
    }
    let out = hcx(&[
        "nodes",
        "--coordinators",
        &c.addrs[0],
        "--certs",
        ca.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("the CA key must stay"),
        "{err}"
    );
    // A node's folder cannot serve as a client's.
    let n1 = c.certs.join("n1");
    let out = hcx(&[
        "nodes",
        "--coordinators",
        &c.addrs[0],
        "--certs",
        n1.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("needs a client certificate"),
        "{err}"
    );
    // A coordinator with a cluster certificate that does not name the
    // address it serves on (the certificates name 127.0.0.1-3): its clients
    // refuse it, since they check the host they dialled.
    let addr = format!("127.0.0.4:{}", free_port("127.0.0.4"));
    let mut stray = Proc::spawn(
        lone_coordinator(
            &addr,
            &dir.path().join("stray"),
            &[
                "--certs".into(),
                c.certs.join("coordinator").display().to_string(),
            ],
            dir.path(),
            dir.path(),
        ),
        dir.path().join("stray.log"),
    );
    let operator = c.certs.join("operator");
    let out = hcx(&[
        "nodes",
        "--coordinators",
        &addr,
        "--certs",
        operator.to_str().unwrap(),
        "--timeout",
        "4",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("certificate not valid for name \"127.0.0.4\""),
        "{err}"
    );
    stray.kill9();
    // The cluster is still serving its own clients.
    let v = c.nodes_json();
    assert_eq!(v["nodes"].as_array().unwrap().len(), 1);

    // Revocation: a second operator certificate works until it is revoked,
    // then every coordinator refuses it; n1's certificate too, and the node
    // stops, saying why.
    let auditor = c.certs.join("auditor");
    hcx_ok(&[
        "certs",
        "issue",
        "--ca",
        ca.to_str().unwrap(),
        "--dir",
        auditor.to_str().unwrap(),
        "--role",
        "client",
        "--name",
        "auditor",
    ]);
    let as_auditor = |addr: &str| {
        hcx(&[
            "nodes",
            "--coordinators",
            addr,
            "--certs",
            auditor.to_str().unwrap(),
            "--timeout",
            "4",
        ])
    };
    assert!(as_auditor(&c.addrs[1]).status.success());
    let serial_of = |d: &Path| -> String {
        let v: serde_json::Value =
            serde_json::from_str(&hcx_ok(&["certs", "show", d.to_str().unwrap(), "--json"]))
                .unwrap();
        v["serial"].as_str().unwrap().to_string()
    };
    // Nodes cannot revoke; operators can.
    let out = hcx(&[
        "certs",
        "revoke",
        &serial_of(&auditor),
        "--coordinators",
        &c.addrs.join(","),
        "--certs",
        n1.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    for d in [&auditor, &n1] {
        let said = c.run_ok(&["certs", "revoke", &serial_of(d)]);
        assert!(said.contains("revoked certificate"), "{said}");
    }
    let said = c.run_ok(&["certs", "revoke", &serial_of(&auditor)]);
    assert!(said.contains("already revoked"), "{said}");
    for a in &c.addrs {
        let out = as_auditor(a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("was revoked"),
            "{a}: {err}"
        );
    }
    let st = c.nodes[0].wait_exit(Duration::from_secs(30));
    let log = std::fs::read_to_string(dir.path().join("n1.log")).unwrap_or_default();
    assert!(
        st.is_some_and(|s| !s.success()) && log.contains("was revoked"),
        "n1 did not stop on its revoked certificate ({st:?}):\n{log}"
    );
    // The operator's own certificate still works.
    c.nodes_json();
}

#[test]
fn labels_and_drain_steer_placement() {
    let dir = tempfile::tempdir().unwrap();
    // n1's certificate places it at site a, n2's at site b.
    let c = Cluster::start(dir.path(), 2, &[&minilm()]);
    // A node cannot claim another site than its certificate names.
    let n2 = c.certs.join("n2");
    let out = hcx(&[
        "node",
        "--coordinators",
        &c.addrs.join(","),
        "--listen",
        "127.0.0.1:0",
        "--label",
        "site=a",
        "--work-dir",
        dir.path().join("liar").to_str().unwrap(),
        "--certs",
        n2.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--label site=a disagrees") && err.contains("site=b"),
        "{err}"
    );
    let nodes_of = |job: &str| -> std::collections::BTreeSet<String> {
        c.status(job)["shards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["node"].as_str().unwrap().to_string())
            .collect()
    };
    // A job pinned to site b runs on n2 only.
    let pinned = common::example_job(dir.path(), "minilm-int8", &minilm(), &dir.path().join("x"));
    let mut text = std::fs::read_to_string(&pinned).unwrap();
    text.push_str("\nplacement:\n  labels: {site: b}\n");
    std::fs::write(&pinned, &text).unwrap();
    let id = submit(&c, &pinned, &dir.path().join("pinned"), "p1");
    c.wait_succeeded(&id);
    assert_eq!(nodes_of(&id), ["n2".to_string()].into());
    // A site nobody has is refused at submit, with the reason.
    std::fs::write(&pinned, text.replace("site: b", "site: z")).unwrap();
    let out = c.run(&["submit", pinned.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("lack site=z"),
        "{err}"
    );
    // After draining n2, new work goes to n1 only.
    c.run_ok(&["drain", "n2"]);
    let free = common::example_job(dir.path(), "minilm-int8", &minilm(), &dir.path().join("y"));
    let id = submit(&c, &free, &dir.path().join("free"), "p2");
    c.wait_succeeded(&id);
    assert_eq!(nodes_of(&id), ["n1".to_string()].into());
    let nodes = c.nodes_json();
    let n2 = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "n2")
        .unwrap()
        .clone();
    assert_eq!(n2["draining"], true);
}

#[test]
fn insecure_mode_works_on_loopback_only() {
    let dir = tempfile::tempdir().unwrap();
    // Refused: plaintext on a non-loopback address, and no TLS choice at all.
    let out = hcx(&[
        "coordinator",
        "--id",
        "1",
        "--listen",
        "0.0.0.0:7199",
        "--peers",
        "1=0.0.0.0:7199",
        "--data-dir",
        dir.path().join("x").to_str().unwrap(),
        "--insecure",
        "--output-root",
        dir.path().to_str().unwrap(),
        "--model-root",
        dir.path().to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not loopback"),
        "{err}"
    );
    let out = hcx(&["nodes", "--coordinators", "127.0.0.1:1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--insecure"), "{err}");
    // Allowed on loopback: one coordinator, one node, a real job.
    let addr = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let _c = Proc::spawn(
        lone_coordinator(
            &addr,
            &dir.path().join("c1"),
            &["--insecure".into()],
            &minilm(),
            dir.path(),
        ),
        dir.path().join("c1.log"),
    );
    let _n = Proc::spawn(
        vec![
            "node".into(),
            "--coordinators".into(),
            addr.clone(),
            "--name".into(),
            "n1".into(),
            "--work-dir".into(),
            dir.path().join("n1").display().to_string(),
            "--insecure".into(),
            "--heartbeat-ms".into(),
            "200".into(),
        ],
        dir.path().join("n1.log"),
    );
    let job = common::example_job(dir.path(), "minilm-int8", &minilm(), &dir.path().join("o"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = hcx(&["nodes", "--coordinators", &addr, "--insecure", "--json"]);
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if v["nodes"].as_array().is_some_and(|a| a.len() == 1) {
                break;
            }
        }
        assert!(Instant::now() < deadline, "insecure node did not register");
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = hcx_ok(&[
        "submit",
        job.to_str().unwrap(),
        "--coordinators",
        &addr,
        "--insecure",
        "--watch",
    ]);
    assert!(out.contains("succeeded"), "{out}");
}

#[test]
fn a_cancelled_job_stops_leaves_no_artifact_and_can_be_deleted() {
    let (job, _) = slow_job();
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 2, &[job.parent().unwrap()]);
    let out = dir.path().join("out");
    let id = submit(&c, job, &out, "c1");
    wait_mid_job(&c, &id);
    // A running job cannot be deleted.
    let early = c.run(&["delete", &id]);
    assert!(
        !early.status.success()
            && String::from_utf8_lossy(&early.stderr).contains("cancel it first"),
        "{}",
        String::from_utf8_lossy(&early.stderr)
    );
    let said = c.run_ok(&["cancel", &id]);
    assert!(said.contains("cancelled"), "{said}");
    let v = c.status(&id);
    assert_eq!(v["state"], "cancelled", "{v}");
    // Nothing more is assigned, and no artifact appears.
    std::thread::sleep(Duration::from_secs(2));
    let nodes = c.nodes_json();
    for n in nodes["nodes"].as_array().unwrap() {
        assert_eq!(n["shards"], 0, "{nodes}");
    }
    assert!(!out.join("hcx-manifest.json").exists());
    // Cancelling again says why not.
    let again = c.run(&["cancel", &id]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already ended"));
    // Deleted, it is gone from every listing, its staging folder with it,
    // and its idempotency key is free again.
    let said = c.run_ok(&["delete", &id]);
    assert!(said.contains(&format!("deleted {id}")), "{said}");
    let gone = c.run(&["status", &id]);
    assert!(!gone.status.success());
    let all: serde_json::Value = serde_json::from_str(&c.run_ok(&["status", "--json"])).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 0, "{all}");
    assert!(!dir.path().join(".out.hcx-shards").join(&id).exists());
}

/// The blobs (file names) in each coordinator's blob store.
fn blobs_held(c: &Cluster) -> Vec<std::collections::BTreeSet<String>> {
    (1..=3)
        .map(|i| {
            std::fs::read_dir(c.dir.join(format!("c{i}/blobs")))
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().to_string())
                        .filter(|n| n.len() == 64)
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect()
}

#[test]
fn a_model_sent_by_submit_and_an_artifact_fetched_match_the_local_run() {
    let (job, reference) = slow_job();
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start_bare(dir.path(), 2);
    // A model marked shared is read in place or not at all.
    let shared_job = dir.path().join("shared.yaml");
    let text = std::fs::read_to_string(job).unwrap();
    let model = job.parent().unwrap().join("model.safetensors");
    std::fs::write(
        &shared_job,
        text.replace(
            &format!("model: {}", model.display()),
            &format!("model: {{path: {}, shared: true}}", model.display()),
        ),
    )
    .unwrap();
    assert!(
        std::fs::read_to_string(&shared_job)
            .unwrap()
            .contains("shared: true")
    );
    let refused = c.run(&["submit", shared_job.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("has no --model-root"),
        "{err}"
    );

    // A dry run plans the job on the registered nodes and submits nothing.
    let dry: serde_json::Value =
        serde_json::from_str(&c.run_ok(&["submit", job.to_str().unwrap(), "--dry-run", "--json"]))
            .unwrap();
    let registered: Vec<String> = serde_json::from_str::<serde_json::Value>(
        &c.run_ok(&["nodes", "--json"]),
    )
    .unwrap()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(registered.len(), 2);
    let shards = dry["shards"].as_array().unwrap();
    assert!(!shards.is_empty(), "{dry}");
    assert!(
        shards
            .iter()
            .all(|s| registered.iter().any(|n| s["node"] == n.as_str())),
        "{dry}"
    );
    assert!(
        dry["estimate"]["artifact_bytes"].as_u64().unwrap() > 0,
        "{dry}"
    );
    assert_eq!(c.run_ok(&["status", "--json"]).trim(), "[]");

    // No coordinator can read the model: submit sends it, and the
    // artifact comes back byte-identical to the local run.
    let fetched = dir.path().join("fetched");
    let out = c.run(&[
        "submit",
        job.to_str().unwrap(),
        "--output",
        fetched.to_str().unwrap(),
        "--idempotency-key",
        "sent-1",
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}\n{}", c.logs());
    assert!(
        stderr.contains("sending it") && stderr.contains("every SHA-256 matches"),
        "{stderr}"
    );
    let first = stdout.lines().next().unwrap().trim().to_string();
    assert_same_artifact(reference, &fetched);
    let model_sha = hcx_coordinator::blobs::hash_file(&model).unwrap().0;
    let st = c.status(&first);
    let artifact: Vec<String> = st["artifact"]
        .as_array()
        .expect("artifact files")
        .iter()
        .map(|f| f["sha256"].as_str().unwrap().to_string())
        .collect();
    assert!(!artifact.is_empty(), "{st}");
    // The model and every artifact file are held by a majority.
    let held = blobs_held(&c);
    for sha in artifact.iter().chain([&model_sha]) {
        let n = held.iter().filter(|h| h.contains(sha)).count();
        assert!(n >= 2, "blob {sha} is on {n} of 3 coordinators: {held:?}");
    }

    // The same model again: nothing new travels.
    let out = c.run(&["submit", job.to_str().unwrap(), "--in-cluster"]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(": 0 new bytes"), "{stderr}");
    let second = String::from_utf8_lossy(&out.stdout).trim().to_string();
    c.wait_succeeded(&second);

    // With the leader gone, the artifacts are still there to fetch.
    let leader = c.leader();
    c.coordinators[leader].kill9();
    for (id, name) in [(&first, "again-1"), (&second, "again-2")] {
        let to = dir.path().join(name);
        c.run_ok(&["fetch", id, "--output", to.to_str().unwrap()]);
        assert_same_artifact(reference, &to);
    }
    // Fetch does not write into a folder that holds something.
    let busy = c.run(&["fetch", &first, "--output", fetched.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("is not empty"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );

    // Deleted, the jobs take their bytes with them on every live
    // coordinator.
    c.run_ok(&["delete", &first]);
    c.run_ok(&["delete", &second]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let held = blobs_held(&c);
        let live: Vec<_> = (0..3).filter(|i| *i != leader).map(|i| &held[i]).collect();
        if live.iter().all(|h| h.is_empty()) {
            break;
        }
        if Instant::now() > deadline {
            let mut what = String::new();
            for (i, h) in held.iter().enumerate() {
                for sha in h {
                    let b = std::fs::read(c.dir.join(format!("c{}/blobs/{sha}", i + 1)))
                        .unwrap_or_default();
                    what.push_str(&format!(
                        "c{} {sha}: {} bytes: {:?}\n",
                        i + 1,
                        b.len(),
                        String::from_utf8_lossy(&b[..b.len().min(120)])
                    ));
                }
            }
            panic!(
                "blobs left after deleting every job (leader was c{}):\n{what}",
                leader + 1
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_client_without_coordinators_says_what_it_waits_for_and_gives_up() {
    let t0 = Instant::now();
    let out = hcx(&[
        "status",
        "--coordinators",
        "127.0.0.1:1",
        "--insecure",
        "--timeout",
        "3",
    ]);
    let took = t0.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(took < Duration::from_secs(8), "took {took:?}: {err}");
    assert!(
        err.contains("waiting for a coordinator at 127.0.0.1:1 (connection refused); giving up in"),
        "{err}"
    );
    assert!(
        err.contains("within 3 s") && err.contains("127.0.0.1:1"),
        "{err}"
    );
}

/// One scrape of a Prometheus text endpoint: each series' kind (from its
/// `# TYPE` line), whether it has help, and every sample by its full name
/// with labels (`hcx_jobs{state="running"}`).
struct Scrape {
    text: String,
    kinds: std::collections::BTreeMap<String, String>,
    helped: std::collections::BTreeSet<String>,
    samples: std::collections::BTreeMap<String, f64>,
}

impl Scrape {
    fn get(addr: &str) -> Scrape {
        let (head, body) = common::get_metrics(addr);
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        let mut out = Scrape {
            text: body.to_string(),
            kinds: Default::default(),
            helped: Default::default(),
            samples: Default::default(),
        };
        for line in body.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                out.kinds.insert(name.into(), kind.into());
            } else if let Some(rest) = line.strip_prefix("# HELP ") {
                out.helped.insert(rest.split_once(' ').unwrap().0.into());
            } else if !line.is_empty() && !line.starts_with('#') {
                let (series, value) = line.rsplit_once(' ').unwrap();
                out.samples
                    .insert(series.into(), value.parse().expect("a sample value"));
            }
        }
        out
    }

    /// The value of `series`, 0 when absent.
    fn value(&self, series: &str) -> f64 {
        self.samples.get(series).copied().unwrap_or(0.0)
    }

    /// The sum of every sample of metric `name`, whatever its labels.
    fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(k, _)| *k == name || k.starts_with(&format!("{name}{{")))
            .map(|(_, v)| v)
            .sum()
    }

    /// Every series is one we document, of the kind we say, with help, and
    /// named by Prometheus' conventions.
    fn check_names(&self) {
        use hcx_protocol::metrics::{ALL, MetricKind, follows_conventions};
        assert!(!self.kinds.is_empty(), "no series:\n{}", self.text);
        for (name, kind) in &self.kinds {
            let def = ALL
                .iter()
                .find(|m| m.name == name)
                .unwrap_or_else(|| panic!("{name} is not in hcx_protocol::metrics::ALL"));
            let want = match def.kind {
                MetricKind::Counter => "counter",
                MetricKind::Gauge => "gauge",
                MetricKind::Histogram => "histogram",
            };
            assert_eq!(kind, want, "{name}");
            follows_conventions(name, def.kind).unwrap();
            assert!(self.helped.contains(name), "{name} has no # HELP line");
        }
    }
}

#[test]
fn coordinators_and_nodes_export_metrics_that_move_during_a_job() {
    let (job, reference) = slow_job();
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 2, &[job.parent().unwrap()]);
    let before: Vec<Scrape> = c.metrics.iter().map(|a| Scrape::get(a)).collect();
    let nodes_before: Vec<Scrape> = c.node_metrics.iter().map(|a| Scrape::get(a)).collect();
    for s in before.iter().chain(&nodes_before) {
        s.check_names();
    }
    for s in &nodes_before {
        assert_eq!(s.value("hcx_node_fetched_bytes_total"), 0.0, "{}", s.text);
        assert!(s.value("hcx_node_heartbeats_total") > 0.0, "{}", s.text);
    }
    let out = dir.path().join("out");
    let id = submit(&c, job, &out, "m1");
    wait_mid_job(&c, &id);
    let leader = c.leader();
    // Mid-job: the leader has served tensors and seen a shard come in, and
    // a node has fetched them; the gauges (refreshed every second, so they
    // may lag the status that showed a shard done) show the job running.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mid = loop {
        let s = Scrape::get(&c.metrics[leader]);
        let shown = s.value("hcx_jobs{state=\"running\"}") == 1.0
            && s.value("hcx_shards{state=\"done\"}") >= 1.0;
        if shown || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    mid.check_names();
    assert_eq!(
        mid.value("hcx_jobs{state=\"running\"}"),
        1.0,
        "{}",
        mid.text
    );
    assert!(
        mid.value("hcx_shards{state=\"done\"}") >= 1.0,
        "{}",
        mid.text
    );
    assert!(mid.value("hcx_tensors_served_total") >= 1.0, "{}", mid.text);
    assert!(
        mid.value("hcx_shard_received_bytes_total") > 0.0,
        "{}",
        mid.text
    );
    assert_eq!(mid.value("hcx_raft_is_leader"), 1.0, "{}", mid.text);
    let node_mid: Vec<Scrape> = c.node_metrics.iter().map(|a| Scrape::get(a)).collect();
    println!(
        "--- leader mid-job\n{}\n--- node n1 mid-job\n{}",
        mid.text, node_mid[0].text
    );
    assert!(
        node_mid
            .iter()
            .map(|s| s.value("hcx_node_fetched_bytes_total"))
            .sum::<f64>()
            > 0.0
    );
    // `watch` follows it to the end; without a terminal it prints lines.
    let watched = c.run(&["watch", &id]);
    let (said, progress) = (
        String::from_utf8_lossy(&watched.stdout),
        String::from_utf8_lossy(&watched.stderr),
    );
    assert!(watched.status.success(), "{said}\n{progress}");
    assert!(said.contains(&format!("{id} `slow` succeeded")), "{said}");
    assert!(progress.contains("done on n"), "{progress}");
    assert!(!progress.contains('\x1b'), "{progress}");
    assert_same_artifact(reference, &out);
    let v = c.status(&id);
    let shard_bytes: f64 = v["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["bytes_out"].as_f64().unwrap())
        .sum();
    let source_bytes: f64 = v["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["bytes_in"].as_f64().unwrap())
        .sum();
    std::thread::sleep(Duration::from_millis(1500));
    let after: Vec<Scrape> = c.metrics.iter().map(|a| Scrape::get(a)).collect();
    let nodes_after: Vec<Scrape> = c.node_metrics.iter().map(|a| Scrape::get(a)).collect();
    for s in after.iter().chain(&nodes_after) {
        s.check_names();
    }
    // Every coordinator's copy of the state shows the job done.
    for s in &after {
        assert_eq!(s.value("hcx_jobs{state=\"succeeded\"}"), 1.0, "{}", s.text);
        assert_eq!(s.value("hcx_jobs{state=\"running\"}"), 0.0, "{}", s.text);
        assert!(s.value("hcx_raft_applied_index") > 0.0);
    }
    assert_eq!(
        after
            .iter()
            .map(|s| s.value("hcx_raft_is_leader"))
            .sum::<f64>(),
        1.0
    );
    let l = &after[leader];
    assert!(
        l.value("hcx_raft_commit_seconds_count") >= 12.0,
        "{}",
        l.text
    );
    assert!(l.value("hcx_raft_commit_seconds_sum") > 0.0, "{}", l.text);
    // What the nodes say they moved is what the job's shards account for.
    let uploaded: f64 = nodes_after
        .iter()
        .map(|s| s.value("hcx_node_uploaded_bytes_total"))
        .sum();
    let fetched: f64 = nodes_after
        .iter()
        .map(|s| s.value("hcx_node_fetched_bytes_total"))
        .sum();
    assert_eq!(uploaded, shard_bytes);
    assert_eq!(fetched, source_bytes);
    assert_eq!(
        l.value("hcx_tensor_served_bytes_total"),
        source_bytes,
        "{}",
        l.text
    );
    let done: f64 = nodes_after
        .iter()
        .map(|s| s.value("hcx_node_shards_total{outcome=\"done\"}"))
        .sum();
    assert_eq!(done, 12.0);
    // Kernel seconds by stage: each of the job's stages ran once a tensor.
    for stage in ["hadamard", "uniform", "zstd"] {
        let count: f64 = nodes_after
            .iter()
            .map(|s| s.value(&format!("hcx_stage_seconds_count{{stage=\"{stage}\"}}")))
            .sum();
        assert_eq!(count, 12.0, "{stage}");
    }
    let kernel: f64 = nodes_after
        .iter()
        .map(|s| s.sum("hcx_stage_seconds_sum"))
        .sum();
    assert!(kernel > 0.0);
    for s in &nodes_after {
        assert_eq!(s.value("hcx_node_running_shards"), 0.0, "{}", s.text);
    }
}

/// Runs `hcx-cluster ARGS` under a pseudo-terminal (util-linux `script`),
/// with `env` set; returns what the terminal received.
fn on_a_terminal(args: &[&str], env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let typescript = dir.path().join("typescript");
    let mut cmd = vec![env!("CARGO_BIN_EXE_hcx-cluster").to_string()];
    cmd.extend(args.iter().map(|a| format!("'{a}'")));
    let out = Command::new("script")
        .args(["-q", "-e", "-c", &cmd.join(" ")])
        .arg(&typescript)
        .envs(env.iter().copied())
        .env("COLUMNS", "160")
        .stdin(Stdio::null())
        .output()
        .expect("util-linux `script` (bsdutils) makes the pseudo-terminal");
    let seen = std::fs::read_to_string(&typescript).unwrap_or_default();
    assert!(out.status.success(), "{seen}");
    seen
}

#[test]
fn progress_is_bars_on_a_terminal_lines_without_one_and_json_on_request() {
    let (job, reference) = slow_job();
    let dir = tempfile::tempdir().unwrap();
    // On a terminal: a bar for the job and one per node, redrawn in place.
    let out = dir.path().join("bars");
    let seen = on_a_terminal(
        &[
            "run",
            job.to_str().unwrap(),
            "--nodes",
            "2",
            "--output",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert_same_artifact(reference, &out);
    for want in ["j000001", "node-1", "node-2", "tensors", "[===", "\x1b[2K"] {
        assert!(seen.contains(want), "no {want:?} in:\n{seen}");
    }
    assert!(seen.contains("12/12 tensors"), "{seen}");
    assert!(!seen.contains("(attempt 1)"), "{seen}");
    // Without one: a plain line as each shard is assigned and done.
    let out = dir.path().join("lines");
    let plain = hcx(&[
        "run",
        job.to_str().unwrap(),
        "--nodes",
        "2",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(plain.status.success());
    assert_same_artifact(reference, &out);
    let lines = String::from_utf8_lossy(&plain.stderr);
    assert!(!lines.contains('\x1b'), "{lines}");
    assert_eq!(lines.matches("(attempt 1)").count(), 12, "{lines}");
    assert_eq!(lines.matches(" done on node-").count(), 12, "{lines}");
    // --log-format json: every stderr line is a JSON object; the nodes'
    // lines carry the job and shard of the span they were written in.
    let out = dir.path().join("json");
    let json = Command::new(env!("CARGO_BIN_EXE_hcx-cluster"))
        .args([
            "--log-format",
            "json",
            "run",
            job.to_str().unwrap(),
            "--nodes",
            "2",
        ])
        .args(["--output", out.to_str().unwrap()])
        .env("HCX_LOG", "info")
        .output()
        .unwrap();
    assert!(json.status.success());
    assert_same_artifact(reference, &out);
    let text = String::from_utf8_lossy(&json.stderr);
    let mut in_shard = 0;
    let mut progress = 0;
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["target"] == "hcx_node" && v["span"]["name"] == "shard" {
            assert_eq!(v["span"]["job"], "j000001", "{line}");
            assert!(v["span"]["shard"].is_u64(), "{line}");
            in_shard += 1;
        }
        if v["event"] == "done" {
            progress += 1;
        }
    }
    assert!(in_shard >= 12, "{text}");
    assert_eq!(progress, 12, "{text}");
}

/// Debian's Chromium (scripts/fetch-chromium.sh installs it), or
/// `$HCX_CHROMIUM`; `None` where neither is there.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HCX_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|d| [d.join("chromium"), d.join("chromium-browser")])
        .find(|p| p.is_file())
}

/// Loads `url` in headless Chromium with `args` (`--dump-dom`,
/// `--screenshot=…`), letting the page's script run for three seconds of
/// virtual time; returns what Chromium printed.
fn browse(chrome: &Path, args: &[&str], url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(chrome)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).map(|_| s)
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            assert!(st.success(), "chromium {args:?} {url}: {st}");
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium {args:?} {url} did not finish in 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    reader.join().unwrap().unwrap()
}

/// The attributes of the first tag in `html` holding `marker`
/// (`data-job="j000001"`), as written between `<` and `>`.
fn tag_with<'a>(html: &'a str, marker: &str) -> Option<&'a str> {
    let at = html.find(marker)?;
    let start = html[..at].rfind('<')?;
    let end = at + html[at..].find('>')?;
    Some(&html[start..end])
}

/// The value of `name="…"` in a tag.
fn attr<'a>(tag: &'a str, name: &str) -> &'a str {
    let key = format!("{name}=\"");
    let at = tag
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} in {tag}"))
        + key.len();
    &tag[at..at + tag[at..].find('"').unwrap()]
}

/// Each shard row's state on a job page, by shard id.
fn shard_states(html: &str) -> std::collections::BTreeMap<u32, String> {
    html.match_indices("data-shard=\"")
        .map(|(at, _)| {
            let end = at + html[at..].find('>').unwrap_or(html.len() - at);
            let tag = &html[at..end];
            (
                attr(tag, "data-shard").parse().unwrap(),
                attr(tag, "data-state").to_string(),
            )
        })
        .collect()
}

/// `GET path` over plain HTTP from `addr`: the status line and the body.
fn http_get(addr: &str, path: &str) -> (String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).unwrap();
    let split = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP reply");
    let head = String::from_utf8_lossy(&reply[..split]).to_string();
    let status = head.lines().next().unwrap_or("").to_string();
    (status, reply[split + 4..].to_vec())
}

#[test]
fn the_dashboard_shows_a_job_advancing_in_a_browser_and_its_charts_once_done() {
    let Some(chrome) = chromium() else {
        eprintln!(
            "SKIPPED: no Chromium on this machine (scripts/fetch-chromium.sh installs Debian's \
             `chromium`, or set HCX_CHROMIUM)"
        );
        return;
    };
    let (job, reference) = slow_job();
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 2, &[job.parent().unwrap()]);
    // The nodes hold the job back while the page is looked at: drained,
    // they take no shards; undrained, they do.
    for n in ["n1", "n2"] {
        c.run_ok(&["drain", n]);
    }
    let out = dir.path().join("out");
    let id = submit(&c, job, &out, "dash");
    // A plain-HTTP dashboard: the leader's (which also knows heartbeat ages
    // and shard steps) where it serves plain HTTP.
    let leader = c.leader();
    let base = if c.dashboards[leader].starts_with("http://") {
        c.dashboards[leader].clone()
    } else {
        c.dashboards[0].clone()
    };
    let plain = base.trim_start_matches("http://").to_string();

    // The overview, drawn by the page's script: both nodes, the job running
    // with none of its 12 shards done.
    let overview = browse(&chrome, &["--dump-dom"], &format!("{base}/"));
    let row = tag_with(&overview, &format!("data-job=\"{id}\""))
        .unwrap_or_else(|| panic!("job {id} not on the dashboard:\n{overview}"));
    assert_eq!(attr(row, "data-state"), "running", "{row}");
    assert_eq!(attr(row, "data-done"), "0", "{row}");
    assert_eq!(attr(row, "data-total"), "12", "{row}");
    for n in ["n1", "n2"] {
        assert!(
            overview.contains(&format!("data-node=\"{n}\"")),
            "{overview}"
        );
    }
    let body = tag_with(&overview, "data-polls=").unwrap();
    let polls: u32 = attr(body, "data-polls").parse().unwrap();
    assert!(polls >= 2, "the page redrew {polls} times in 3 s: {body}");

    // The job page: every shard waiting.
    let page = format!("{base}/jobs/{id}");
    let first = shard_states(&browse(&chrome, &["--dump-dom"], &page));
    assert_eq!(first.len(), 12, "{first:?}");
    assert!(first.values().all(|s| s == "waiting"), "{first:?}");

    // Let n1 work (n2 stays drained, so the job runs on one core). The
    // screenshot is taken as soon as two shards are done, most likely with
    // the job part way; the page then shows the shards advanced.
    c.run_ok(&["undrain", "n1"]);
    c.wait_job(&id, "two shards done", |v| {
        v["shards"]
            .as_array()
            .is_some_and(|s| s.iter().filter(|s| s["done"] == true).count() >= 2)
    });
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-job-running.png");
    let _ = std::fs::remove_file(&shot);
    browse(
        &chrome,
        &[
            "--window-size=1280,900",
            &format!("--screenshot={}", shot.display()),
        ],
        &page,
    );
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    println!("screenshot of the job page mid-job: {}", shot.display());
    let second = shard_states(&browse(&chrome, &["--dump-dom"], &page));
    let done = second.values().filter(|s| *s == "done").count();
    assert!(done >= 2, "{second:?}");
    c.run_ok(&["undrain", "n2"]);

    // Once it succeeds, the page shows the artifact's charts.
    c.wait_succeeded(&id);
    let last = browse(&chrome, &["--dump-dom"], &page);
    let head = tag_with(&last, &format!("data-job=\"{id}\"")).unwrap();
    assert_eq!(attr(head, "data-state"), "succeeded", "{head}");
    assert!(shard_states(&last).values().all(|s| s == "done"), "{last}");
    let img = tag_with(&last, "class=\"charts\"").unwrap_or_else(|| panic!("no charts:\n{last}"));
    assert!(img.contains("attribution.svg"), "{img}");
    let (status, svg) = http_get(&plain, &format!("/jobs/{id}/attribution.svg"));
    assert!(status.contains("200"), "{status}");
    assert_eq!(svg, std::fs::read(out.join("attribution.svg")).unwrap());
    // The charts draw no times: the cluster's are the local run's, byte for byte.
    assert_eq!(
        svg,
        std::fs::read(reference.join("attribution.svg")).unwrap()
    );
    // A follower's dashboard lists the job as done too.
    for d in c.dashboards.iter().filter(|d| d.starts_with("http://")) {
        let (status, body) = http_get(d.trim_start_matches("http://"), "/api/overview");
        let text = String::from_utf8_lossy(&body);
        assert!(status.contains("200"), "{d}: {status}");
        assert!(
            text.contains(&format!(
                "\"id\":\"{id}\",\"name\":\"slow\",\"state\":\"succeeded\""
            )),
            "{d}: {text}"
        );
    }
    let shot_done = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-job-done.png");
    browse(
        &chrome,
        &[
            "--window-size=1280,1600",
            &format!("--screenshot={}", shot_done.display()),
        ],
        &page,
    );
    println!("screenshot of the finished job: {}", shot_done.display());
    assert_same_artifact(reference, &out);
    let (status, _) = http_get(&plain, "/jobs/j999999/attribution.svg");
    assert!(status.contains("404"), "{status}");

    // HTTPS: an operator's client certificate is let in, a node's is
    // refused with the reason, and a browser without one fails the handshake.
    let https = &c.dashboards[1];
    let curl = |cert: Option<&str>| {
        let ca = c.certs.join("operator").join("ca.pem");
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "--max-time",
            "20",
            "-w",
            "\n%{http_code}",
            "--cacert",
        ])
        .arg(&ca);
        if let Some(name) = cert {
            let d = c.certs.join(name);
            cmd.arg("--cert")
                .arg(d.join("cert.pem"))
                .arg("--key")
                .arg(d.join("key.pem"));
        }
        cmd.arg(format!("{https}/api/overview"))
            .output()
            .expect("run curl")
    };
    let ok = curl(Some("operator"));
    let said = String::from_utf8_lossy(&ok.stdout);
    assert!(said.trim_end().ends_with("200"), "{said}");
    assert!(said.contains(&format!("\"id\":\"{id}\"")), "{said}");
    assert!(said.contains("\"state\":\"succeeded\""), "{said}");
    let node = curl(Some("n1"));
    let said = String::from_utf8_lossy(&node.stdout);
    assert!(said.trim_end().ends_with("403"), "{said}");
    assert!(said.contains("needs a client certificate"), "{said}");
    let none = curl(None);
    assert!(!none.status.success(), "{none:?}");
}

#[test]
fn a_plain_http_dashboard_off_loopback_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let mut args = lone_coordinator(
        &addr,
        &dir.path().join("c1"),
        &["--insecure".into()],
        dir.path(),
        dir.path(),
    );
    args.extend(["--http-listen".into(), "0.0.0.0:0".into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = hcx(&refs);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("--http-listen 0.0.0.0:0: plain HTTP is served on loopback addresses only"),
        "{said}"
    );
}
