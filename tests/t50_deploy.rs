//! The deploy/ files: every flag they pass to `hcx-cluster` exists, and,
//! where a Docker engine is present (skipped with a message where not),
//! the compose cluster of deploy/compose.yaml, built FROM scratch around
//! this binary, with containers of their own addresses: a job submitted
//! from the host gives the bytes of `run --local`, and so do jobs through
//! faults (kill -9 of a node and then the leader, the leader cut off into
//! a minority, a node paused past its lease, every container restarted,
//! a dead coordinator replaced by a new one on another address, a node's
//! disk filled mid-shard),
//! with no job lost or made twice.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{hcx, hcx_ok, minilm, root};

/// The subcommands deploy files run.
const SUBCOMMANDS: [&str; 2] = ["coordinator", "node"];

/// Files under deploy/ that start `hcx-cluster` (the image's entry point).
fn deploy_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root().join("deploy")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                if !p.ends_with(".state") {
                    stack.push(p);
                }
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "service") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Each subcommand's flags as its `--help` lists them.
fn flags_of(sub: &str) -> BTreeSet<String> {
    let help = hcx_ok(&[sub, "--help"]);
    help.split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '[' || c == ']')
        .filter(|t| t.starts_with("--") && t.len() > 2)
        .map(|t| {
            t.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_string()
        })
        .collect()
}

/// The (subcommand, flag) pairs a deploy file passes: outside comments,
/// each flag belongs to the last subcommand word before it.
fn flags_used(text: &str) -> Vec<(String, String, usize)> {
    let mut out = Vec::new();
    let mut current: Option<&str> = None;
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        for tok in line.split(|c: char| {
            c.is_whitespace() || matches!(c, ',' | '[' | ']' | '"' | '\'' | '=' | '(' | ')')
        }) {
            if let Some(s) = SUBCOMMANDS.iter().find(|s| **s == tok) {
                current = Some(s);
            } else if tok.starts_with("--")
                && tok.as_bytes().get(2).is_some_and(u8::is_ascii_alphabetic)
            {
                let sub = current.unwrap_or("(none)");
                out.push((sub.to_string(), tok.to_string(), i + 1));
            }
        }
    }
    out
}

#[test]
fn every_flag_the_deploy_files_pass_exists() {
    let files = deploy_files();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    for want in [
        "compose.yaml",
        "hcx-coordinator.service",
        "hcx-node.service",
        "coordinators.yaml",
        "nodes.yaml",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "deploy/ has no {want}: {names:?}"
        );
    }
    let known: BTreeMap<&str, BTreeSet<String>> =
        SUBCOMMANDS.iter().map(|s| (*s, flags_of(s))).collect();
    assert!(
        known["coordinator"].contains("--peers"),
        "{:?}",
        known["coordinator"]
    );
    let mut checked = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for (sub, flag, line) in flags_used(&text) {
            let flags = known
                .get(sub.as_str())
                .unwrap_or_else(|| panic!("{}:{line}: {flag} outside a subcommand", f.display()));
            assert!(
                flags.contains(&flag),
                "{}:{line}: `hcx-cluster {sub}` has no flag {flag} (it has {flags:?})",
                f.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 30, "only {checked} flags found in {files:?}");
}

#[test]
fn the_flag_check_catches_a_flag_that_does_not_exist() {
    let used = flags_used("ExecStart=/usr/local/bin/hcx-cluster node --work-dir /w --nmae x\n");
    assert_eq!(
        used,
        [
            ("node".to_string(), "--work-dir".to_string(), 1),
            ("node".to_string(), "--nmae".to_string(), 1)
        ]
    );
    assert!(!flags_of("node").contains("--nmae"));
}

/// Whether a Docker engine answers, with docker-compose beside it.
fn docker_ready() -> Result<(), String> {
    let ok = |cmd: &mut Command| cmd.output().is_ok_and(|o| o.status.success());
    if !ok(Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"])) {
        return Err("no Docker engine answers `docker info`".into());
    }
    if !ok(Command::new("docker-compose").arg("version")) {
        return Err("no docker-compose".into());
    }
    Ok(())
}

/// A compose cluster of deploy/compose.yaml under its own project and
/// subnet, stopped (volumes and all) when dropped.
struct Compose {
    env: Vec<(String, String)>,
    project: String,
    subnet: String,
    state: PathBuf,
}

impl Compose {
    /// Builds the image from this test binary's `hcx-cluster` and starts
    /// the cluster (no folder shared with the host but each container's
    /// certificate); waits for the three nodes.
    fn up(dir: &Path, prefix: &str, subnet: &str) -> Compose {
        // A project of its own, so that nothing an earlier run left (its
        // volumes hold a whole raft log) is ever picked up again.
        let project = format!("{prefix}{}", std::process::id());
        let state = dir.join("state");
        let env: Vec<(String, String)> = [
            ("HCX_STATE", state.display().to_string()),
            ("HCX_BIN", env!("CARGO_BIN_EXE_hcx-cluster").to_string()),
            ("HCX_IMAGE", "hcx-cluster:test".to_string()),
            ("HCX_SUBNET", subnet.to_string()),
            ("HCX_PROJECT", project.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let c = Compose {
            env,
            project,
            subnet: subnet.into(),
            state,
        };
        // A project left over by an earlier run that was killed holds this
        // subnet: take it down, volumes and all.
        c.down_leftovers(prefix);
        let up = Command::new("bash")
            .arg(root().join("deploy/compose-up.sh"))
            .envs(c.env())
            .output()
            .unwrap();
        assert!(
            up.status.success(),
            "compose-up.sh failed:\n{}\n{}",
            String::from_utf8_lossy(&up.stdout),
            String::from_utf8_lossy(&up.stderr)
        );
        c.wait_nodes(3);
        let jobs = c.cli_ok(&["status", "--json"]);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&jobs).unwrap(),
            serde_json::json!([]),
            "a new cluster already holds jobs"
        );
        c
    }

    /// Takes down every compose project named `prefix` and digits but
    /// this one.
    fn down_leftovers(&self, prefix: &str) {
        let out = Command::new("docker")
            .args([
                "network",
                "ls",
                "--format",
                "{{.Label \"com.docker.compose.project\"}}",
            ])
            .output()
            .unwrap();
        let listed = String::from_utf8_lossy(&out.stdout).to_string();
        let stale = listed.lines().filter(|p| {
            p.strip_prefix(prefix)
                .is_some_and(|rest| rest.chars().all(|c| c.is_ascii_digit()))
                && *p != self.project
        });
        for project in stale {
            let out = Command::new("bash")
                .arg(root().join("deploy/compose-up.sh"))
                .arg("down")
                .envs(self.env())
                .env("HCX_PROJECT", project)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "taking down the leftover project {project} failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    fn env(&self) -> impl Iterator<Item = (&str, &str)> {
        self.env.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    fn down(&self) {
        let _ = Command::new("bash")
            .arg(root().join("deploy/compose-up.sh"))
            .arg("down")
            .envs(self.env())
            .output();
    }

    fn coordinators(&self) -> String {
        (1..=3)
            .map(|i| format!("{}.1{i}:7101", self.subnet))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `hcx-cluster ARGS --coordinators … --certs operator` from the host.
    fn cli(&self, args: &[&str]) -> std::process::Output {
        let operator = self.state.join("certs/operator");
        let coordinators = self.coordinators();
        let mut v: Vec<&str> = args.to_vec();
        v.extend([
            "--coordinators",
            &coordinators,
            "--certs",
            operator.to_str().unwrap(),
        ]);
        hcx(&v)
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "hcx-cluster {args:?} failed:\n{}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn compose(&self) -> Command {
        let mut cmd = Command::new("docker-compose");
        cmd.args(["--project-name", &self.project, "--file"])
            .arg(root().join("deploy/compose.yaml"))
            .envs(self.env());
        cmd
    }

    /// [`Compose::compose`] with the overlay that adds n4, a node with a
    /// 512 KiB disk.
    fn compose_with_small_disk(&self) -> Command {
        let mut cmd = self.compose();
        cmd.arg("--file")
            .arg(root().join("tests/fixtures/compose-small-disk.yaml"));
        cmd
    }

    /// Submits `job` with `--watch` and insists that it succeeds.
    /// Submits `job` from the host with `--output`: its model is sent, and
    /// the artifact downloaded into a new folder `name`, which it returns.
    fn submit_fetch(&self, job: &Path, name: &str) -> PathBuf {
        let to = self.state.join("fetched").join(name);
        let out = self.cli(&[
            "submit",
            job.to_str().unwrap(),
            "--output",
            to.to_str().unwrap(),
            "--timeout",
            "60",
        ]);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.success() && stdout.contains("succeeded"),
            "{stdout}\n{stderr}\n{}",
            self.logs()
        );
        assert!(stderr.contains("every SHA-256 matches"), "{stderr}");
        to
    }

    fn logs(&self) -> String {
        let out = self
            .compose()
            .args(["logs", "--no-color", "--tail", "15"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// The container of a service (`c1`, `n2`, …).
    fn container(&self, service: &str) -> String {
        let out = self.compose().args(["ps", "-q", service]).output().unwrap();
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(!id.is_empty(), "no container for {service}");
        id
    }

    /// `docker ARGS… CONTAINER(service)`, insisting on success.
    fn docker(&self, args: &[&str], service: &str) {
        let out = Command::new("docker")
            .args(args)
            .arg(self.container(service))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "docker {args:?} {service}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn network(&self) -> String {
        format!("{}_hcx", self.project)
    }

    fn nodes_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.cli_ok(&["nodes", "--json"])).unwrap()
    }

    fn wait_nodes(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let out = self.cli(&["nodes", "--json", "--timeout", "5"]);
            if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                if v["nodes"].as_array().map_or(0, |a| a.len()) >= n {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the compose nodes did not register:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The service of the raft leader (`c1`…`c3`).
    fn leader(&self) -> String {
        let v = self.nodes_json();
        format!("c{}", v["leader"]["id"].as_u64().expect("a leader"))
    }

    fn status(&self, job: &str) -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&self.cli_ok(&["status", job, "--json"])).unwrap();
        v[0].clone()
    }

    fn wait_job(&self, job: &str, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let out = self.cli(&["status", job, "--json", "--timeout", "10"]);
            if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                if pred(&v[0]) {
                    return;
                }
                assert!(
                    !matches!(v[0]["state"].as_str(), Some("failed" | "cancelled")),
                    "{job} ended while waiting for {what}: {v}\n{}",
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what} of {job}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Waits until a shard is done and another is held; the holder's
    /// service, read from the same status that showed it.
    fn wait_mid_job(&self, job: &str) -> String {
        let holder = |v: &serde_json::Value| {
            let shards = v["shards"].as_array().cloned().unwrap_or_default();
            if !shards.iter().any(|s| s["done"] == true) {
                return None;
            }
            shards
                .iter()
                .find(|s| s["done"] == false && !s["node"].as_str().unwrap_or("").is_empty())
                .map(|s| s["node"].as_str().unwrap().to_string())
        };
        let seen = std::cell::RefCell::new(None);
        self.wait_job(job, "a shard in flight after one is done", |v| {
            *seen.borrow_mut() = holder(v);
            seen.borrow().is_some()
        });
        seen.into_inner().unwrap()
    }

    /// Submits `job`, keeping its artifact in the cluster; the job id.
    fn submit(&self, job: &Path, key: &str) -> String {
        self.cli_ok(&[
            "submit",
            job.to_str().unwrap(),
            "--in-cluster",
            "--idempotency-key",
            key,
        ])
        .trim()
        .to_string()
    }

    /// Downloads a succeeded job's artifact from the cluster (`fetch`).
    fn artifact(&self, job: &str) -> PathBuf {
        let to = self.state.join("fetched").join(job);
        self.cli_ok(&["fetch", job, "--output", to.to_str().unwrap()]);
        to
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        self.down();
    }
}

/// Rewrites a job file for the compose cluster: its model at `model` on
/// this host (sent by `submit`), its output unused (the artifact stays in
/// the cluster until fetched).
fn container_job(text: &str, model: &Path) -> String {
    text.lines()
        .map(|l| {
            if l.starts_with("model:") {
                format!("model: {}", model.display())
            } else if l.starts_with("output:") {
                "output: unused".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

#[test]
fn the_compose_cluster_runs_a_job_like_run_local() {
    if let Err(why) = docker_ready() {
        eprintln!("skipped: {why}; the compose cluster needs a Docker engine");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = Compose::up(dir.path(), "hcxtest", "172.29.7");
    // No container's certificate folder holds the CA key.
    for d in std::fs::read_dir(c.state.join("certs")).unwrap() {
        let d = d.unwrap().path();
        assert!(!d.join("ca.key").exists(), "{}", d.display());
    }
    let text = std::fs::read_to_string(root().join("configs/jobs/minilm-int8.yaml")).unwrap();
    let job = dir.path().join("job.yaml");
    std::fs::write(&job, container_job(&text, &minilm())).unwrap();

    let fetched = c.submit_fetch(&job, "minilm-int8");
    // The same job on this machine, straight through the pipeline.
    let local = common::example_job(
        dir.path(),
        "minilm-int8",
        &minilm(),
        &dir.path().join("reference"),
    );
    hcx_ok(&["run", local.to_str().unwrap(), "--local"]);
    assert_same_artifact(&dir.path().join("reference"), &fetched);
    // Each container serves its metrics on its own address: every
    // coordinator's copy of the state shows the job done, and the nodes
    // together uploaded what its shards hold.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for ip in [".11", ".12", ".13"] {
        loop {
            let m = scrape(&format!("172.29.7{ip}:9100"));
            if m.contains("hcx_jobs{state=\"succeeded\"} 1") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{ip}: {m}");
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
    }
    let uploaded: f64 = [".21", ".22", ".23"]
        .iter()
        .map(|ip| {
            let m = scrape(&format!("172.29.7{ip}:9100"));
            m.lines()
                .find_map(|l| l.strip_prefix("hcx_node_uploaded_bytes_total "))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("{ip}: {m}"))
        })
        .sum();
    assert!(uploaded > 0.0);

    // A node whose disk fills mid-shard: n4, with a 512 KiB work folder,
    // and only n3 beside it taking work. n4's shards fail, go to n3, and
    // the artifact is the same.
    let ca = c.state.join("ca");
    let n4 = c.state.join("certs/n4");
    hcx_ok(&[
        "certs",
        "issue",
        "--ca",
        ca.to_str().unwrap(),
        "--dir",
        n4.to_str().unwrap(),
        "--role",
        "node",
        "--name",
        "n4",
        "--host",
        &format!("{}.24", c.subnet),
    ]);
    let chown = Command::new("chown")
        .args(["-R", "10001:10001"])
        .arg(&n4)
        .status()
        .unwrap();
    assert!(chown.success());
    c.cli_ok(&["drain", "n1"]);
    c.cli_ok(&["drain", "n2"]);
    let out = c
        .compose_with_small_disk()
        .args(["up", "--detach", "n4"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.wait_nodes(4);
    let fetched = c.submit_fetch(&job, "minilm-int8-full-disk");
    assert_same_artifact(&dir.path().join("reference"), &fetched);
    let v: serde_json::Value = serde_json::from_str(&c.cli_ok(&["status", "--json"])).unwrap();
    let shards = v[0]["shards"].as_array().unwrap().clone();
    // Every shard n4's full disk failed went to n3 and finished there; a
    // shard small enough for n4's folder (the pooler's 151 KB) may finish
    // on n4 at its first attempt.
    let failed_on_n4: Vec<_> = shards
        .iter()
        .filter(|s| {
            s["last_error"]
                .as_str()
                .is_some_and(|e| e.starts_with("n4:") && e.contains("No space left on device"))
        })
        .collect();
    assert!(
        !failed_on_n4.is_empty()
            && failed_on_n4
                .iter()
                .all(|s| s["node"] == "n3" && s["attempt"].as_u64().unwrap_or(0) >= 2)
            && shards
                .iter()
                .all(|s| s["done"] == true
                    && (s["node"] == "n3" || s["attempt"].as_u64() == Some(1))),
        "n4's failed shards did not move to n3: {shards:?}"
    );
    let logs = c
        .compose_with_small_disk()
        .args(["logs", "--no-color", "n4"])
        .output()
        .unwrap();
    let logs = String::from_utf8_lossy(&logs.stdout);
    assert!(logs.contains("No space left on device"), "{logs}");
}

/// A client that calls the job API until `stop` (submits of tiny jobs
/// under new and repeated idempotency keys, status, cancel), recording
/// every call and answer; a call without a known answer retires its
/// thread id. Returns how many calls it answered.
fn history_client(
    c: &Compose,
    rec: &history::Recorder,
    client: u64,
    job: &Path,
    stop: &std::sync::atomic::AtomicBool,
) -> usize {
    use history::{Op, Ret};
    let mut thread = client * 1000;
    let mut answered = 0;
    let mut keys: Vec<String> = Vec::new();
    let mut last_job: Option<String> = None;
    let mut n = 0u32;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let (op, args): (Op, Vec<String>) = match (n % 4, &last_job) {
            (0, _) | (_, None) => {
                let key = format!("client{client}-{n}");
                keys.push(key.clone());
                (Op::Submit(key), Vec::new())
            }
            (1, Some(j)) => (Op::Status(j.clone()), Vec::new()),
            (2, _) => (Op::Submit(keys[0].clone()), Vec::new()),
            (_, Some(j)) => (Op::Cancel(j.clone()), Vec::new()),
        };
        let _ = args;
        n += 1;
        rec.invoke(thread, op.clone());
        let ret = match &op {
            Op::Submit(key) => {
                let out = c.cli(&[
                    "submit",
                    job.to_str().unwrap(),
                    "--in-cluster",
                    "--idempotency-key",
                    key,
                    "--timeout",
                    "15",
                ]);
                out.status.success().then(|| {
                    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
                    last_job = Some(id.clone());
                    Ret::Job(id)
                })
            }
            Op::Status(j) => {
                let out = c.cli(&["status", j, "--json", "--timeout", "15"]);
                out.status
                    .success()
                    .then(|| serde_json::from_slice::<serde_json::Value>(&out.stdout).ok())
                    .flatten()
                    .and_then(|v| v[0]["state"].as_str().map(|s| Ret::State(s.to_string())))
            }
            Op::Cancel(j) => {
                let out = c.cli(&["cancel", j, "--timeout", "15"]);
                if out.status.success() {
                    Some(Ret::Cancelled)
                } else if String::from_utf8_lossy(&out.stderr).contains("has already ended") {
                    Some(Ret::Ended)
                } else {
                    None
                }
            }
        };
        match ret {
            Some(r) => {
                rec.answer(thread, r);
                answered += 1;
            }
            None => thread += 1,
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    answered
}

/// `Compose::submit`, recorded as client 0's call.
fn recorded_submit(c: &Compose, rec: &history::Recorder, job: &Path, key: &str) -> String {
    rec.invoke(0, history::Op::Submit(key.into()));
    let id = c.submit(job, key);
    rec.answer(0, history::Ret::Job(id.clone()));
    id
}

#[test]
fn container_faults_leave_the_artifact_unchanged() {
    if let Err(why) = docker_ready() {
        eprintln!("skipped: {why}; the container fault tests need a Docker engine");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The containers run as uid 10001: the models must be readable to it.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(models.join("slow")).unwrap();
    common::write_slow_model(&models.join("slow/model.safetensors"));
    for (p, mode) in [
        (models.clone(), 0o755),
        (models.join("slow"), 0o755),
        (models.join("slow/model.safetensors"), 0o644),
    ] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let reference = dir.path().join("reference");
    let local = common::write_job(
        dir.path(),
        "slow",
        &models.join("slow/model.safetensors"),
        &reference,
        common::SLOW_PIPELINE,
    );
    hcx_ok(&["run", "--local", local.to_str().unwrap()]);
    // A tiny model for the jobs of the history clients.
    std::fs::create_dir_all(models.join("tiny")).unwrap();
    let tiny: Vec<u8> = (0..64 * 64)
        .flat_map(|i| (i as f32 / 4096.0).to_le_bytes())
        .collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![64, 64], &tiny).unwrap();
    safetensors::serialize_to_file(
        [("w.weight".to_string(), view)],
        None,
        &models.join("tiny/model.safetensors"),
    )
    .unwrap();
    for (p, mode) in [
        (models.join("tiny"), 0o755),
        (models.join("tiny/model.safetensors"), 0o644),
    ] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let tiny_job = dir.path().join("tiny.yaml");
    std::fs::write(
        &tiny_job,
        format!(
            "name: tiny\nseed: 1\nmodel: {}\noutput: unused\npipeline:\n  - rtn: {{bits: 8}}\n",
            models.join("tiny/model.safetensors").display()
        ),
    )
    .unwrap();
    let rec = history::Recorder::default();
    let c = Compose::up(dir.path(), "hcxfault", "172.29.8");
    let job = dir.path().join("slow-container.yaml");
    std::fs::write(
        &job,
        container_job(
            &std::fs::read_to_string(&local).unwrap(),
            &models.join("slow/model.safetensors"),
        ),
    )
    .unwrap();
    let reassigned = |id: &str| {
        let v = c.status(id);
        v["shards"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["attempt"].as_u64().unwrap_or(0) >= 2)
    };
    let mut submitted = 0;

    // Two clients call the job API throughout every fault.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let answered = std::thread::scope(|scope| {
        // The clients stop however the scenarios end: a failed assertion
        // below must not leave the scope waiting on them for ever.
        struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let stopping = StopOnDrop(&stop);
        let clients: Vec<_> = (1..=2)
            .map(|k| {
                let (c, rec, tiny_job, stop) = (&c, &rec, &tiny_job, &stop);
                scope.spawn(move || history_client(c, rec, k, tiny_job, stop))
            })
            .collect();

        // 1. kill -9 a node holding a shard, then the leader.
        let id = recorded_submit(&c, &rec, &job, "kill");
        submitted += 1;
        let victim = c.wait_mid_job(&id);
        c.docker(&["kill", "--signal", "KILL"], &victim);
        let leader = c.leader();
        c.docker(&["kill", "--signal", "KILL"], &leader);
        c.wait_job(&id, "success", |v| v["state"] == "succeeded");
        assert_same_artifact(&reference, &c.artifact(&id));
        assert!(reassigned(&id), "no shard of {id} was re-assigned");
        assert_ne!(c.leader(), leader);
        c.docker(&["start"], &victim);
        c.docker(&["start"], &leader);
        c.wait_nodes(3);

        // 2. Cut the leader off into a minority, then heal.
        let id = recorded_submit(&c, &rec, &job, "partition");
        submitted += 1;
        c.wait_mid_job(&id);
        let leader = c.leader();
        let ip = format!("{}.1{}", c.subnet, &leader[1..]);
        c.docker(&["network", "disconnect", "--force", &c.network()], &leader);
        c.wait_job(&id, "success", |v| v["state"] == "succeeded");
        assert_same_artifact(&reference, &c.artifact(&id));
        c.docker(&["network", "connect", "--ip", &ip, &c.network()], &leader);

        // 3. Pause a node past its lease, then resume it: its shard went to
        //    another node, and the job's bytes are the same.
        let id = recorded_submit(&c, &rec, &job, "pause");
        submitted += 1;
        let victim = c.wait_mid_job(&id);
        c.docker(&["pause"], &victim);
        std::thread::sleep(Duration::from_secs(8));
        c.docker(&["unpause"], &victim);
        c.wait_job(&id, "success", |v| v["state"] == "succeeded");
        assert_same_artifact(&reference, &c.artifact(&id));
        assert!(reassigned(&id), "no shard of {id} was re-assigned");

        // 4. Restart every container mid-job.
        let id = recorded_submit(&c, &rec, &job, "restart");
        submitted += 1;
        c.wait_mid_job(&id);
        let out = c
            .compose()
            .args(["restart", "--timeout", "0"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        c.wait_job(&id, "success", |v| v["state"] == "succeeded");
        assert_same_artifact(&reference, &c.artifact(&id));

        // 5. A coordinator dies for good; a new one on another address
        //    replaces it, and then carries the majority when a second
        //    founder dies mid-job.
        let leader = c.leader();
        let dead = ["c1", "c2", "c3"]
            .into_iter()
            .find(|s| *s != leader)
            .unwrap();
        c.docker(&["kill", "--signal", "KILL"], dead);
        let out = c
            .compose()
            .env("COMPOSE_PROFILES", "spare")
            .args(["up", "--detach", "c4"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let added = c.cli_ok(&["coordinators", "add", &format!("4={}.14:7101", c.subnet)]);
        assert!(added.contains("voters now"), "{added}");
        let removed = c.cli_ok(&["coordinators", "remove", &dead[1..]]);
        assert!(
            removed.contains("voters now") && removed.contains('4'),
            "{removed}"
        );
        let id = recorded_submit(&c, &rec, &job, "replaced");
        submitted += 1;
        c.wait_mid_job(&id);
        let second = ["c1", "c2", "c3"]
            .into_iter()
            .find(|s| *s != dead && *s != c.leader())
            .or_else(|| ["c1", "c2", "c3"].into_iter().find(|s| *s != dead))
            .unwrap();
        c.docker(&["kill", "--signal", "KILL"], second);
        c.wait_job(&id, "success", |v| v["state"] == "succeeded");
        assert_same_artifact(&reference, &c.artifact(&id));
        let voters = c.nodes_json()["leader"]["voters"].to_string();
        assert!(
            voters.contains(&format!("4={}.14:7101", c.subnet)),
            "{voters}"
        );

        drop(stopping);
        let answered = clients
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum::<usize>();
        (answered, second)
    });
    let (answered, second) = answered;
    assert!(
        answered >= 20,
        "the history clients got only {answered} answers"
    );

    // No job was lost or made twice: every job the fault scenarios
    // submitted succeeded, the clients' jobs ended or were cancelled, and
    // the whole history of calls is linearizable.
    let all: serde_json::Value = serde_json::from_str(&c.cli_ok(&["status", "--json"])).unwrap();
    let all = all.as_array().unwrap();
    let main: Vec<_> = all.iter().filter(|j| j["name"] == "slow").collect();
    assert_eq!(main.len(), submitted, "{all:?}");
    assert!(main.iter().all(|j| j["state"] == "succeeded"), "{main:?}");
    assert!(
        all.iter().all(|j| matches!(
            j["state"].as_str(),
            Some("succeeded" | "cancelled" | "running" | "merging")
        )),
        "{all:?}"
    );
    let events = rec.events();
    match history::check(&events) {
        Ok(n) => println!("{n} recorded client events, linearizable"),
        Err(why) => panic!("{why}"),
    }

    // 6. A follower kept down while 2,000 jobs finish and the log is
    //    compacted past it catches up by snapshot within 30 s, and the
    //    next job still gives the same bytes.
    c.docker(&["start"], second);
    let metrics = |svc: &str| format!("{}.1{}:9100", c.subnet, &svc[1..]);
    let live_founders: Vec<&str> = ["c1", "c2", "c3"]
        .into_iter()
        .filter(|s| {
            c.nodes_json()["leader"]["voters"]
                .to_string()
                .contains(&format!("{}.1{}:7101", c.subnet, &s[1..]))
        })
        .collect();
    let leader = c.leader();
    let leader_metrics = if leader == "c4" {
        format!("{}.14:9100", c.subnet)
    } else {
        metrics(&leader)
    };
    let applied = |addr: &str| gauge(addr, "hcx_raft_applied_index");
    let caught_up = |svc: &str, limit: Duration| -> Duration {
        let started = Instant::now();
        let target = applied(&leader_metrics).unwrap_or(f64::MAX);
        loop {
            if applied(&metrics(svc)).is_some_and(|a| a >= target) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < limit,
                "{svc} did not reach the leader's applied index {target} in {limit:?}:\n{}",
                c.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    caught_up(second, Duration::from_secs(60));
    let behind = *live_founders
        .iter()
        .find(|s| **s != leader)
        .expect("a live founder that does not lead");
    c.docker(&["kill", "--signal", "KILL"], behind);
    // Nothing it lacks can be in its log: the leader has applied all of it.
    std::thread::sleep(Duration::from_secs(1));
    let stopped_at = applied(&leader_metrics).expect("the leader's metrics");
    let started = Instant::now();
    let finished = finish_jobs(&c, &models.join("tiny/model.safetensors"), 2000);
    let purged = gauge(&leader_metrics, "hcx_raft_purged_index").unwrap_or(0.0);
    let snapshot = gauge(&leader_metrics, "hcx_raft_snapshot_index").unwrap_or(0.0);
    println!(
        "2000 jobs finished in {:?} with {behind} down (stopped at {stopped_at}): leader snapshot at {snapshot}, purged to {purged}",
        started.elapsed()
    );
    assert_eq!(finished, 2000);
    assert!(
        purged > stopped_at,
        "the leader kept its log from {stopped_at} on (purged to {purged}): no snapshot is needed"
    );
    c.docker(&["start"], behind);
    let took = caught_up(behind, Duration::from_secs(30));
    let installed = gauge(&metrics(behind), "hcx_raft_snapshot_index").unwrap_or(0.0);
    println!("{behind} caught up by snapshot in {took:?} (its snapshot at {installed})");
    assert!(
        installed > stopped_at,
        "{behind} caught up without a snapshot past {stopped_at} ({installed})"
    );
    let id = c.submit(&job, "snapshot");
    c.wait_job(&id, "success", |v| v["state"] == "succeeded");
    assert_same_artifact(&reference, &c.artifact(&id));
    // Every one of the 2,000 jobs is there once, ended.
    let all: serde_json::Value = serde_json::from_str(&c.cli_ok(&["status", "--json"])).unwrap();
    let bulk: Vec<_> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["name"] == "bulk")
        .collect();
    assert_eq!(bulk.len(), 2000);
    assert!(
        bulk.iter()
            .all(|j| matches!(j["state"].as_str(), Some("cancelled" | "succeeded"))),
        "{bulk:?}"
    );
}

/// A gauge's value from the Prometheus endpoint at `addr`, or `None` while
/// it does not answer.
fn gauge(addr: &str, name: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    reply
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

/// Submits `n` jobs named `bulk` on the sent model `model` (a file the
/// cluster already holds) and cancels each, over the cluster API from the
/// host, eight at a time; returns how many ended.
fn finish_jobs(c: &Compose, model: &Path, n: usize) -> usize {
    use hcx_net::proto::{JobRef, SubmitJobRequest};
    let bytes = std::fs::read(model).unwrap();
    let sha256 = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    let name = model.file_name().unwrap().to_string_lossy().to_string();
    let mut spec = hcx_protocol::JobSpec::parse(
        "name: bulk\nseed: 1\nmodel: m\noutput: unused\npipeline:\n  - rtn: {bits: 8}\n",
        Path::new("bulk.yaml"),
        model.parent().unwrap(),
    )
    .unwrap();
    spec.model.path = model.to_path_buf();
    spec.model.sent = Some(hcx_protocol::job::SentModel {
        files: vec![hcx_protocol::job::BlobFile {
            name: name.clone(),
            sha256,
            bytes: bytes.len() as u64,
        }],
        file: Some(name),
    });
    let spec_json = serde_json::to_string(&spec).unwrap();
    let id = hcx_net::tls::Identity::load_as(
        &c.state.join("certs/operator"),
        hcx_net::tls::Role::Client,
    )
    .unwrap();
    let addrs: Vec<String> = c.coordinators().split(',').map(String::from).collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // The client's channels need the runtime.
        let client = hcx_net::client::CoordinatorClient::new(
            addrs,
            Some(hcx_net::tls::tonic_client_tls(&id)),
        )
        .unwrap()
        .with_patience(Duration::from_secs(60));
        let client = &client;
        let next = std::sync::atomic::AtomicUsize::new(0);
        let one = || async {
            let mut done = 0;
            while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < n {
                let req = SubmitJobRequest {
                    spec_json: spec_json.clone(),
                    in_cluster: true,
                    ..Default::default()
                };
                let reply = client
                    .call(|mut g| {
                        let r = req.clone();
                        async move { g.submit_job(r).await }
                    })
                    .await
                    .unwrap();
                assert!(!reply.job_id.is_empty(), "{reply:?}");
                let job = reply.job_id;
                let cancelled = client
                    .call(|mut g| {
                        let r = JobRef {
                            job_id: job.clone(),
                        };
                        async move { g.cancel_job(r).await }
                    })
                    .await;
                match cancelled {
                    Ok(_) => {}
                    Err(e) if e.to_string().contains("has already ended") => {}
                    Err(e) => panic!("cancel {job}: {e}"),
                }
                done += 1;
            }
            done
        };
        let counts = futures::future::join_all((0..8).map(|_| one())).await;
        counts.into_iter().sum()
    })
}

/// Two artifacts are the same: the tensor file and the manifest byte for
/// byte (the manifest names the model by the path the job gave, which the
/// host's `run --local` and the cluster's job share), every file the same.
fn assert_same_artifact(a: &Path, b: &Path) {
    let (fa, fb) = (common::read_dir_bytes(a), common::read_dir_bytes(b));
    for f in ["model.hcx.safetensors", "hcx-manifest.json"] {
        assert!(
            fa.contains_key(f) && fa.get(f) == fb.get(f),
            "{f} differs: {} vs {}",
            a.display(),
            b.display()
        );
    }
    let (na, nb): (Vec<_>, Vec<_>) = (fa.keys().collect(), fb.keys().collect());
    assert_eq!(
        na,
        nb,
        "{} and {} hold different files",
        a.display(),
        b.display()
    );
}

/// Client histories and their linearizability check: what operators see
/// of the job API (submit with idempotency keys, cancel, status) must be
/// explained by some order of the operations, each taking effect at one
/// instant between its call and its answer, on a sequential model of jobs.
mod history {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use stateright::semantics::{ConsistencyTester, LinearizabilityTester, SequentialSpec};

    /// A client call.
    #[derive(Clone, Debug, PartialEq)]
    pub enum Op {
        /// `submit` with an idempotency key (one job spec per key).
        Submit(String),
        /// `cancel JOB`.
        Cancel(String),
        /// `status JOB`.
        Status(String),
    }

    /// Its answer.
    #[derive(Clone, Debug, PartialEq)]
    pub enum Ret {
        /// The job id `submit` printed.
        Job(String),
        /// `cancel` succeeded.
        Cancelled,
        /// `cancel` was refused: the job had ended.
        Ended,
        /// The state `status` printed.
        State(String),
    }

    #[derive(Clone, Debug, PartialEq)]
    enum Phase {
        Active,
        Cancelled,
        /// Ended on its own (succeeded or failed); `None` until seen.
        Done(Option<String>),
    }

    /// The sequential model: ids handed out in order, one per new key;
    /// a job is active until cancelled or until it ends on its own (which
    /// no client call causes, so a step may assume it happened).
    #[derive(Clone, Debug, Default)]
    pub struct Jobs {
        keys: BTreeMap<String, String>,
        next: u64,
        phase: BTreeMap<String, Phase>,
    }

    impl SequentialSpec for Jobs {
        type Op = Op;
        type Ret = Ret;

        fn invoke(&mut self, op: &Op) -> Ret {
            match op {
                Op::Submit(key) => {
                    if let Some(id) = self.keys.get(key) {
                        return Ret::Job(id.clone());
                    }
                    self.next += 1;
                    let id = format!("j{:06}", self.next);
                    self.keys.insert(key.clone(), id.clone());
                    self.phase.insert(id.clone(), Phase::Active);
                    Ret::Job(id)
                }
                Op::Cancel(job) => match self.phase.get_mut(job) {
                    Some(p @ Phase::Active) => {
                        *p = Phase::Cancelled;
                        Ret::Cancelled
                    }
                    _ => Ret::Ended,
                },
                Op::Status(job) => match self.phase.get(job) {
                    Some(Phase::Cancelled) => Ret::State("cancelled".into()),
                    Some(Phase::Done(Some(s))) => Ret::State(s.clone()),
                    _ => Ret::State("running".into()),
                },
            }
        }

        fn is_valid_step(&mut self, op: &Op, ret: &Ret) -> bool {
            match (op, ret) {
                (Op::Submit(_), _) => self.invoke(op) == *ret,
                (Op::Cancel(job), Ret::Cancelled) => {
                    self.phase.get(job) == Some(&Phase::Active) && {
                        self.phase.insert(job.clone(), Phase::Cancelled);
                        true
                    }
                }
                (Op::Cancel(job), Ret::Ended) => match self.phase.get_mut(job) {
                    Some(p @ Phase::Active) => {
                        *p = Phase::Done(None);
                        true
                    }
                    Some(_) => true,
                    None => false,
                },
                (Op::Status(job), Ret::State(s)) => {
                    let active = matches!(s.as_str(), "running" | "merging");
                    match self.phase.get_mut(job) {
                        Some(Phase::Cancelled) => s == "cancelled",
                        Some(Phase::Done(Some(d))) => d == s,
                        Some(p @ Phase::Done(None)) if !active && s != "cancelled" => {
                            *p = Phase::Done(Some(s.clone()));
                            true
                        }
                        Some(Phase::Done(None)) => false,
                        Some(p @ Phase::Active) => {
                            if active {
                                true
                            } else if s == "cancelled" {
                                false
                            } else {
                                *p = Phase::Done(Some(s.clone()));
                                true
                            }
                        }
                        None => false,
                    }
                }
                _ => false,
            }
        }
    }

    /// One event of a history, in the order they happened.
    #[derive(Clone, Debug)]
    pub enum Event {
        /// Client `thread` called.
        Invoke(u64, Op),
        /// Client `thread`'s call answered.
        Return(u64, Ret),
    }

    /// Every call and answer of every client, in real-time order. A call
    /// whose answer is unknown (a timeout, a lost connection) never
    /// returns: it may or may not have taken effect, and its client
    /// continues under a new thread id.
    #[derive(Clone, Default)]
    pub struct Recorder(Arc<Mutex<Vec<Event>>>);

    impl Recorder {
        /// Records a call by `thread`.
        pub fn invoke(&self, thread: u64, op: Op) {
            self.0.lock().unwrap().push(Event::Invoke(thread, op));
        }

        /// Records `thread`'s answer.
        pub fn answer(&self, thread: u64, ret: Ret) {
            self.0.lock().unwrap().push(Event::Return(thread, ret));
        }

        /// The history so far.
        pub fn events(&self) -> Vec<Event> {
            self.0.lock().unwrap().clone()
        }
    }

    /// Checks a history; on a violation, the error holds the history.
    pub fn check(events: &[Event]) -> Result<usize, String> {
        let mut t = LinearizabilityTester::new(Jobs::default());
        for e in events {
            let r = match e.clone() {
                Event::Invoke(th, op) => t.on_invoke(th, op).map(|_| ()),
                Event::Return(th, ret) => t.on_return(th, ret).map(|_| ()),
            };
            r.map_err(|why| format!("malformed history ({why}): {events:#?}"))?;
        }
        if t.is_consistent() {
            Ok(events.len())
        } else {
            Err(format!("not linearizable: {events:#?}"))
        }
    }

    #[test]
    fn the_checker_accepts_linearizable_histories_and_catches_others() {
        use Event::*;
        let key = |k: &str| Op::Submit(k.into());
        let job = |j: &str| Ret::Job(j.into());
        // Two clients submit concurrently; a retry with a key gets its job;
        // a cancel races a status.
        let good = vec![
            Invoke(1, key("a")),
            Invoke(2, key("b")),
            Return(2, job("j000001")),
            Return(1, job("j000002")),
            Invoke(1, key("a")),
            Return(1, job("j000002")),
            Invoke(1, Op::Cancel("j000002".into())),
            Invoke(2, Op::Status("j000002".into())),
            Return(2, Ret::State("cancelled".into())),
            Return(1, Ret::Cancelled),
            // A call that never answered may have taken effect.
            Invoke(3, key("c")),
            Invoke(2, key("d")),
            Return(2, job("j000004")),
        ];
        assert_eq!(check(&good), Ok(good.len()));
        // A key answered with two jobs (a duplicated submit).
        let dup = vec![
            Invoke(1, key("a")),
            Return(1, job("j000001")),
            Invoke(2, key("a")),
            Return(2, job("j000002")),
        ];
        assert!(check(&dup).is_err());
        // A job seen cancelled before any cancel was called.
        let early = vec![
            Invoke(1, key("a")),
            Return(1, job("j000001")),
            Invoke(2, Op::Status("j000001".into())),
            Return(2, Ret::State("cancelled".into())),
            Invoke(1, Op::Cancel("j000001".into())),
            Return(1, Ret::Cancelled),
        ];
        assert!(check(&early).is_err());
        // A job that succeeded and then ran again.
        let back = vec![
            Invoke(1, key("a")),
            Return(1, job("j000001")),
            Invoke(1, Op::Status("j000001".into())),
            Return(1, Ret::State("succeeded".into())),
            Invoke(2, Op::Status("j000001".into())),
            Return(2, Ret::State("running".into())),
        ];
        assert!(check(&back).is_err());
    }
}

/// The Prometheus text a container serves at `addr`.
fn scrape(addr: &str) -> String {
    common::get_metrics(addr).1
}
