//! The Prometheus metrics hcx-cluster processes export: one table of names,
//! kinds and help texts, so every crate records under the same names and
//! the exporter describes each one. Names follow Prometheus' conventions:
//! counters end in `_total`, and a name carries its base unit (`_seconds`,
//! `_bytes`).

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up (restarts from zero with the process).
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// Observations in buckets, with their sum and count.
    Histogram,
}

/// One exported metric.
#[derive(Debug, Clone, Copy)]
pub struct MetricDef {
    /// The series name.
    pub name: &'static str,
    /// Its kind.
    pub kind: MetricKind,
    /// The help text.
    pub help: &'static str,
}

macro_rules! metrics_table {
    ($($(#[$doc:meta])* $id:ident = $name:literal, $kind:ident, $help:literal;)*) => {
        $($(#[$doc])* pub const $id: &str = $name;)*
        /// Every metric any hcx-cluster process exports.
        pub const ALL: &[MetricDef] = &[
            $(MetricDef { name: $name, kind: MetricKind::$kind, help: $help },)*
        ];
    };
}

metrics_table! {
    /// Jobs in this coordinator's applied state, by `state`.
    JOBS = "hcx_jobs", Gauge,
        "Jobs in this coordinator's copy of the replicated state, by state";
    /// Shards of running jobs, by `state` (waiting, running, done).
    SHARDS = "hcx_shards", Gauge,
        "Shards of jobs still running or merging, by state (waiting, running, done)";
    /// Nodes registered in the state.
    NODES = "hcx_nodes", Gauge,
        "Worker nodes registered in the replicated state, by state (active, draining)";
    /// Whether this coordinator leads (1) or not (0).
    RAFT_IS_LEADER = "hcx_raft_is_leader", Gauge,
        "1 while this coordinator is the raft leader, else 0";
    /// The raft term this coordinator is in.
    RAFT_TERM = "hcx_raft_term", Gauge, "The raft term this coordinator is in";
    /// The index of the last log entry applied here.
    RAFT_APPLIED_INDEX = "hcx_raft_applied_index", Gauge,
        "Index of the last raft log entry applied to this coordinator's state";
    /// The last log index this coordinator's latest snapshot covers.
    RAFT_SNAPSHOT_INDEX = "hcx_raft_snapshot_index", Gauge,
        "Last raft log index covered by this coordinator's latest snapshot (built or installed)";
    /// The last log index this coordinator has purged.
    RAFT_PURGED_INDEX = "hcx_raft_purged_index", Gauge,
        "Last raft log index this coordinator has purged from its log (covered by a snapshot)";
    /// Leader changes this coordinator has seen.
    RAFT_LEADER_CHANGES = "hcx_raft_leader_changes_total", Counter,
        "Times this coordinator saw the raft leader change (including to none)";
    /// Time from proposing a command to its being applied on the leader.
    RAFT_COMMIT_SECONDS = "hcx_raft_commit_seconds", Histogram,
        "Seconds from proposing a command on the leader until it is committed and applied";
    /// Shards taken back from nodes silent past their lease.
    LEASE_EXPIRIES = "hcx_lease_expiries_total", Counter,
        "Shards the leader took back from a node silent past its lease";
    /// Source tensors the data plane sent to nodes.
    TENSORS_SERVED = "hcx_tensors_served_total", Counter,
        "Source tensors this coordinator's data plane sent to nodes";
    /// Bytes of source tensors the data plane sent.
    TENSOR_SERVED_BYTES = "hcx_tensor_served_bytes_total", Counter,
        "Bytes of source tensors this coordinator's data plane sent to nodes";
    /// Bytes of shard uploads received from nodes.
    SHARD_RECEIVED_BYTES = "hcx_shard_received_bytes_total", Counter,
        "Bytes of shard files nodes uploaded to this coordinator";
    /// Bytes of blobs (sent models, artifacts, peer copies) received.
    BLOB_RECEIVED_BYTES = "hcx_blob_received_bytes_total", Counter,
        "Bytes of blobs (sent models, shards, artifacts) received into this coordinator's store";
    /// Bytes of blobs sent to clients, nodes and peers.
    BLOB_SENT_BYTES = "hcx_blob_sent_bytes_total", Counter,
        "Bytes of blobs this coordinator streamed to clients, nodes and peer coordinators";
    /// Heartbeats a node sent.
    NODE_HEARTBEATS = "hcx_node_heartbeats_total", Counter,
        "Heartbeats this node sent to the leader";
    /// Shards a node is working on now.
    NODE_RUNNING_SHARDS = "hcx_node_running_shards", Gauge,
        "Shards this node is working on now";
    /// Shards a node finished, by `outcome` (done, failed).
    NODE_SHARDS = "hcx_node_shards_total", Counter,
        "Shards this node finished, by outcome (done, failed)";
    /// Source tensors a node fetched.
    NODE_TENSORS_FETCHED = "hcx_node_tensors_fetched_total", Counter,
        "Source tensors this node fetched from the coordinators";
    /// Bytes of source tensors a node fetched.
    NODE_FETCHED_BYTES = "hcx_node_fetched_bytes_total", Counter,
        "Bytes of source tensors this node fetched from the coordinators";
    /// Bytes of shards a node uploaded.
    NODE_UPLOADED_BYTES = "hcx_node_uploaded_bytes_total", Counter,
        "Bytes of shard files this node uploaded to the leader";
    /// Seconds one tensor spent in one stage, by `stage`.
    STAGE_SECONDS = "hcx_stage_seconds", Histogram,
        "Seconds one tensor spent in one compression stage, by stage (sum: kernel seconds by stage)";
    /// Seconds one collective operation took, by `op`.
    COLLECTIVE_SECONDS = "hcx_collective_seconds", Histogram,
        "Seconds one collective operation (all-reduce, broadcast, ...) took on this node, by op";
    /// Bytes of buffers reduced or moved by collectives, by `op`.
    COLLECTIVE_BYTES = "hcx_collective_bytes_total", Counter,
        "Bytes of the buffers this node's collective operations worked on, by op";
}

/// The unlabelled counters a coordinator exports from its start.
pub const COORDINATOR_COUNTERS: &[&str] = &[
    RAFT_LEADER_CHANGES,
    LEASE_EXPIRIES,
    TENSORS_SERVED,
    TENSOR_SERVED_BYTES,
    SHARD_RECEIVED_BYTES,
    BLOB_RECEIVED_BYTES,
    BLOB_SENT_BYTES,
];

/// The unlabelled counters a node exports from its start.
pub const NODE_COUNTERS: &[&str] = &[
    NODE_HEARTBEATS,
    NODE_TENSORS_FETCHED,
    NODE_FETCHED_BYTES,
    NODE_UPLOADED_BYTES,
];

/// Whether `name` follows the conventions this module promises for `kind`.
pub fn follows_conventions(name: &str, kind: MetricKind) -> Result<(), String> {
    let ok_chars = name
        .chars()
        .enumerate()
        .all(|(i, c)| c == '_' || c.is_ascii_lowercase() || (i > 0 && c.is_ascii_digit()));
    if !ok_chars || !name.starts_with("hcx_") {
        return Err(format!(
            "{name}: a name is hcx_ then lowercase letters, digits and _"
        ));
    }
    let base = name.strip_suffix("_total").unwrap_or(name);
    match kind {
        MetricKind::Counter if base == name => {
            return Err(format!("{name}: a counter's name ends in _total"));
        }
        MetricKind::Gauge | MetricKind::Histogram if base != name => {
            return Err(format!("{name}: only a counter's name ends in _total"));
        }
        _ => {}
    }
    for unit in ["seconds", "bytes"] {
        if base.contains(unit) && !base.ends_with(&format!("_{unit}")) {
            return Err(format!("{name}: the unit ({unit}) comes last"));
        }
    }
    for wrong in ["_ms", "_millis", "_kb", "_mb", "_secs"] {
        if base.contains(wrong) {
            return Err(format!("{name}: use base units (seconds, bytes)"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_follows_the_conventions_and_is_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for m in ALL {
            follows_conventions(m.name, m.kind).unwrap();
            assert!(seen.insert(m.name), "{} twice", m.name);
            assert!(!m.help.is_empty());
        }
    }

    #[test]
    fn the_convention_check_catches_bad_names() {
        assert!(follows_conventions("hcx_jobs", MetricKind::Counter).is_err());
        assert!(follows_conventions("hcx_jobs_total", MetricKind::Gauge).is_err());
        assert!(follows_conventions("hcx_seconds_commit", MetricKind::Histogram).is_err());
        assert!(follows_conventions("hcx_commit_ms", MetricKind::Histogram).is_err());
        assert!(follows_conventions("jobs", MetricKind::Gauge).is_err());
        assert!(follows_conventions("hcx_Jobs", MetricKind::Gauge).is_err());
        assert!(follows_conventions("hcx_sent_bytes_total", MetricKind::Counter).is_ok());
    }
}
