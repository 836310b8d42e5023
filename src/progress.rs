//! How a followed job's progress is shown: progress bars on a terminal
//! (one for the job, one per node: tensors and bytes through, the shard and
//! step each node is on, an ETA), plain lines when stderr is not a terminal,
//! JSON objects under `--log-format json`, or nothing.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use hcx_net::proto::{JobStatus, ShardStatus};
use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Where and how progress goes (always to stderr; stdout keeps the result).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Display {
    /// Nothing (the caller prints a summary only, e.g. `--json`).
    Quiet,
    /// A line each time a shard is assigned or done.
    #[default]
    Lines,
    /// The same events as one JSON object a line.
    Json,
    /// Live bars, redrawn in place.
    Bars,
}

impl Display {
    /// Bars when stderr is a terminal, else lines; JSON when logs are JSON.
    pub fn choose(log: hcx_telemetry::LogFormat) -> Display {
        match log {
            hcx_telemetry::LogFormat::Json => Display::Json,
            hcx_telemetry::LogFormat::Text if std::io::stderr().is_terminal() => Display::Bars,
            hcx_telemetry::LogFormat::Text => Display::Lines,
        }
    }
}

/// Tensors of a shard through encoding, by the step its holder reported.
fn tensors_through(s: &ShardStatus) -> u64 {
    match s.step.as_str() {
        _ if s.done => u64::from(s.tensors),
        "encode" => u64::from(s.tensors_done.min(s.tensors)),
        "upload" => u64::from(s.tensors),
        _ => 0,
    }
}

/// Source bytes of a shard through encoding.
fn bytes_through(s: &ShardStatus) -> u64 {
    match s.step.as_str() {
        _ if s.done => s.bytes_in,
        "encode" | "upload" => s.bytes_done,
        _ => 0,
    }
}

/// Follows one job's statuses and shows them.
pub struct Watcher {
    display: Display,
    started: Instant,
    /// Each shard's (node, attempt, done) when last shown as a line.
    shown: BTreeMap<u32, (String, u32, bool)>,
    bars: Option<Bars>,
}

struct Bars {
    multi: MultiProgress,
    job: ProgressBar,
    nodes: BTreeMap<String, ProgressBar>,
}

impl Watcher {
    /// A watcher showing progress as `display` says.
    pub fn new(display: Display) -> Watcher {
        Watcher {
            display,
            started: Instant::now(),
            shown: BTreeMap::new(),
            bars: None,
        }
    }

    /// Shows a new status of the job.
    pub fn update(&mut self, st: &JobStatus) {
        match self.display {
            Display::Quiet => {}
            Display::Lines | Display::Json => self.lines(st),
            Display::Bars => self.draw(st),
        }
    }

    /// Takes the bars down once the job has ended (lines stay as written).
    pub fn finish(&mut self, st: &JobStatus) {
        if let Some(b) = self.bars.take() {
            for bar in b.nodes.values() {
                bar.finish();
            }
            b.job.finish_with_message(st.state.clone());
        }
    }

    fn lines(&mut self, st: &JobStatus) {
        for s in &st.shards {
            let now = (s.node.clone(), s.attempt, s.done);
            if self.shown.get(&s.id) == Some(&now) || (s.node.is_empty() && !s.done) {
                continue;
            }
            let t = self.started.elapsed().as_secs_f64();
            if self.display == Display::Json {
                let event = serde_json::json!({
                    "seconds": (t * 10.0).round() / 10.0,
                    "job": st.job_id,
                    "shard": s.label,
                    "node": s.node,
                    "attempt": s.attempt,
                    "event": if s.done { "done" } else { "assigned" },
                    "kernel_seconds": s.kernel_seconds,
                    "after_error": s.last_error,
                });
                eprintln!("{event}");
            } else if s.done {
                eprintln!(
                    "[{t:6.1}s] {:<14} done on {} ({:.2} s in kernels)",
                    s.label, s.node, s.kernel_seconds
                );
            } else {
                eprintln!(
                    "[{t:6.1}s] {:<14} → {} (attempt {}){}",
                    s.label,
                    s.node,
                    s.attempt,
                    if s.last_error.is_empty() {
                        String::new()
                    } else {
                        format!(" after: {}", s.last_error)
                    }
                );
            }
            self.shown.insert(s.id, now);
        }
    }

    fn draw(&mut self, st: &JobStatus) {
        let bars = self.bars.get_or_insert_with(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8));
            let job = multi.add(ProgressBar::new(0));
            job.set_style(
                ProgressStyle::with_template(
                    "{prefix:<12} [{bar:30}] {pos}/{len} tensors {msg} ({elapsed}, ETA {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            job.set_prefix(st.job_id.clone());
            job.enable_steady_tick(Duration::from_millis(250));
            Bars {
                multi,
                job,
                nodes: BTreeMap::new(),
            }
        });
        let total: u64 = st.shards.iter().map(|s| u64::from(s.tensors)).sum();
        let through: u64 = st.shards.iter().map(tensors_through).sum();
        let bytes: u64 = st.shards.iter().map(bytes_through).sum();
        bars.job.set_length(total);
        bars.job.set_position(through);
        bars.job.set_message(format!(
            "{}, {} of {} shards, {}",
            HumanBytes(bytes),
            st.shards_done,
            st.shards_total,
            st.state
        ));
        // Per node: the tensors of the shards it holds or finished.
        let mut per: BTreeMap<&str, (u64, u64, u64, Vec<String>)> = BTreeMap::new();
        for s in st.shards.iter().filter(|s| !s.node.is_empty()) {
            let e = per.entry(s.node.as_str()).or_default();
            e.0 += u64::from(s.tensors);
            e.1 += tensors_through(s);
            e.2 += bytes_through(s);
            if !s.done {
                let step = if s.step.is_empty() {
                    "assigned"
                } else {
                    &s.step
                };
                e.3.push(format!("{} {step}", s.label));
            }
        }
        for (node, (len, pos, bytes, now)) in per {
            let bar = bars.nodes.entry(node.to_string()).or_insert_with(|| {
                let b = bars.multi.add(ProgressBar::new(0));
                b.set_style(
                    ProgressStyle::with_template(
                        "{prefix:<12} [{bar:30}] {pos}/{len} tensors {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                b.set_prefix(node.to_string());
                b
            });
            bar.set_length(len);
            bar.set_position(pos);
            let doing = if now.is_empty() {
                "idle".to_string()
            } else {
                now.join(", ")
            };
            bar.set_message(format!("{} · {doing}", HumanBytes(bytes)));
        }
    }
}
