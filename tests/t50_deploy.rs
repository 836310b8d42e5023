//! The deploy/ files: every flag they pass to `hcx-cluster` exists, and
//! (where a Docker engine is present) the compose cluster of
//! deploy/compose.yaml, built FROM scratch around this binary, runs a job
//! submitted from the host to the same bytes as `run --local`.

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

/// Stops the compose project (and its volumes) however the test ends.
struct ComposeDown {
    env: Vec<(String, String)>,
}

impl Drop for ComposeDown {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(root().join("deploy/compose-up.sh"))
            .arg("down")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output();
    }
}

fn compose_logs(env: &[(String, String)]) -> String {
    let project = &env.iter().find(|(k, _)| k == "HCX_PROJECT").unwrap().1;
    let out = Command::new("docker-compose")
        .args(["--project-name", project, "--file"])
        .arg(root().join("deploy/compose.yaml"))
        .args(["logs", "--no-color", "--tail", "20"])
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn the_compose_cluster_runs_a_job_like_run_local() {
    if let Err(why) = docker_ready() {
        eprintln!("skipped: {why}; the compose cluster needs a Docker engine");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let models = minilm().parent().unwrap().to_path_buf();
    let env: Vec<(String, String)> = [
        ("HCX_STATE", state.display().to_string()),
        ("HCX_MODELS", models.display().to_string()),
        ("HCX_BIN", env!("CARGO_BIN_EXE_hcx-cluster").to_string()),
        ("HCX_IMAGE", "hcx-cluster:test".to_string()),
        ("HCX_SUBNET", "172.29.7".to_string()),
        ("HCX_PROJECT", "hcxtest".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    // A project left over by an earlier run that was killed.
    drop(ComposeDown { env: env.clone() });
    let up = Command::new("bash")
        .arg(root().join("deploy/compose-up.sh"))
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    let _down = ComposeDown { env: env.clone() };
    assert!(
        up.status.success(),
        "compose-up.sh failed:\n{}\n{}",
        String::from_utf8_lossy(&up.stdout),
        String::from_utf8_lossy(&up.stderr)
    );
    // No container's certificate folder holds the CA key.
    for d in std::fs::read_dir(state.join("certs")).unwrap() {
        let d = d.unwrap().path();
        assert!(!d.join("ca.key").exists(), "{}", d.display());
    }
    let coordinators = "172.29.7.11:7101,172.29.7.12:7101,172.29.7.13:7101";
    let operator = state.join("certs/operator");
    let cli = |args: &[&str]| {
        let mut v: Vec<&str> = args.to_vec();
        v.extend([
            "--coordinators",
            coordinators,
            "--certs",
            operator.to_str().unwrap(),
        ]);
        hcx(&v)
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = cli(&["nodes", "--json", "--timeout", "5"]);
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if v["nodes"].as_array().map_or(0, |a| a.len()) == 3 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the compose nodes did not register:\n{}",
            compose_logs(&env)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The job as the containers see it: the model under /models, the
    // artifact under /artifacts (the host's state/artifacts).
    let name = minilm().file_name().unwrap().to_string_lossy().to_string();
    let job = dir.path().join("job.yaml");
    let text = std::fs::read_to_string(root().join("configs/jobs/minilm-int8.yaml")).unwrap();
    let mut lines: Vec<String> = Vec::new();
    for l in text.lines() {
        if l.starts_with("model:") {
            lines.push(format!("model: /models/{name}"));
        } else if l.starts_with("output:") {
            lines.push("output: /artifacts/minilm-int8".into());
        } else {
            lines.push(l.to_string());
        }
    }
    std::fs::write(&job, lines.join("\n") + "\n").unwrap();
    let out = cli(&[
        "submit",
        job.to_str().unwrap(),
        "--watch",
        "--timeout",
        "60",
    ]);
    assert!(
        out.status.success(),
        "the job failed on the compose cluster:\n{}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        compose_logs(&env)
    );
    // The same job on this machine, straight through the pipeline.
    let local_job = dir.path().join("local.yaml");
    let local_text = std::fs::read_to_string(&job)
        .unwrap()
        .replace(&format!("/models/{name}"), &minilm().display().to_string());
    std::fs::write(&local_job, local_text).unwrap();
    let reference = dir.path().join("reference");
    hcx_ok(&[
        "run",
        local_job.to_str().unwrap(),
        "--local",
        "--output",
        reference.to_str().unwrap(),
    ]);
    assert_same_tensor_files(&reference, &state.join("artifacts/minilm-int8"));
}

/// Every `.safetensors` file of `a` is in `b` with the same bytes.
fn assert_same_tensor_files(a: &Path, b: &Path) {
    let mut n = 0;
    for e in std::fs::read_dir(a).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let other = b.join(p.file_name().unwrap());
            assert!(
                std::fs::read(&p).unwrap() == std::fs::read(&other).unwrap_or_default(),
                "{} differs from {}",
                other.display(),
                p.display()
            );
            n += 1;
        }
    }
    assert!(n > 0, "no tensor files in {}", a.display());
}
