//! The coordinator's Prometheus gauges: what its copy of the replicated
//! state holds (jobs, shards, nodes by state) and where its raft member
//! stands (leader or not, term, applied index), refreshed every second, and
//! the leader changes it sees as they happen.

use std::sync::Arc;
use std::time::Duration;

use hcx_protocol::metrics as names;
use openraft::ServerState;
use tokio::sync::watch;

use crate::Shared;
use crate::state::ClusterState;

/// Counts in one look at the state.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct StateCounts {
    /// Jobs by state name.
    pub(crate) jobs: [(&'static str, u64); 5],
    /// Shards of active jobs: waiting, running, done.
    pub(crate) shards: [u64; 3],
    /// Nodes: active, draining.
    pub(crate) nodes: [u64; 2],
}

/// Counts jobs, shards and nodes by state.
pub(crate) fn count(s: &ClusterState) -> StateCounts {
    let mut c = StateCounts {
        jobs: [
            ("running", 0),
            ("merging", 0),
            ("succeeded", 0),
            ("failed", 0),
            ("cancelled", 0),
        ],
        ..Default::default()
    };
    for j in s.jobs.values() {
        let name = j.state.name();
        if let Some(e) = c.jobs.iter_mut().find(|e| e.0 == name) {
            e.1 += 1;
        }
        if j.state.is_active() {
            for sh in &j.shards {
                let i = match (&sh.result, &sh.node) {
                    (Some(_), _) => 2,
                    (None, Some(_)) => 1,
                    (None, None) => 0,
                };
                c.shards[i] += 1;
            }
        }
    }
    for n in s.nodes.values() {
        c.nodes[usize::from(n.draining)] += 1;
    }
    c
}

/// Keeps the gauges current until `stop`.
pub(crate) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut raft = shared.raft.metrics();
    let mut leader = raft.borrow().current_leader;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            changed = raft.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = raft.borrow().current_leader;
                if now != leader {
                    leader = now;
                    metrics::counter!(names::RAFT_LEADER_CHANGES).increment(1);
                }
            }
            _ = tick.tick() => {
                let m = raft.borrow().clone();
                metrics::gauge!(names::RAFT_IS_LEADER)
                    .set(f64::from(u8::from(m.state == ServerState::Leader)));
                metrics::gauge!(names::RAFT_TERM).set(m.current_term as f64);
                metrics::gauge!(names::RAFT_APPLIED_INDEX)
                    .set(m.last_applied.map(|l| l.index).unwrap_or(0) as f64);
                metrics::gauge!(names::RAFT_SNAPSHOT_INDEX)
                    .set(m.snapshot.map(|l| l.index).unwrap_or(0) as f64);
                metrics::gauge!(names::RAFT_PURGED_INDEX)
                    .set(m.purged.map(|l| l.index).unwrap_or(0) as f64);
                let c = shared.view.read(count);
                for (state, n) in c.jobs {
                    metrics::gauge!(names::JOBS, "state" => state).set(n as f64);
                }
                for (state, n) in ["waiting", "running", "done"].into_iter().zip(c.shards) {
                    metrics::gauge!(names::SHARDS, "state" => state).set(n as f64);
                }
                for (state, n) in ["active", "draining"].into_iter().zip(c.nodes) {
                    metrics::gauge!(names::NODES, "state" => state).set(n as f64);
                }
            }
        }
    }
}
