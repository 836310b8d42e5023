//! Raft storage on disk: the log, the vote and the state machine's
//! snapshots in one redb file (`raft.redb` in the coordinator's data dir).
//!
//! The state machine itself lives in memory and is rebuilt on start from
//! the last snapshot plus the committed log entries after it (openraft
//! re-applies them because the committed index is saved too). Every log
//! write is a redb transaction committed with fsync before openraft is told
//! it is durable. The committed index is written without a sync of its
//! own: it reaches the disk with the next log or vote write, so a commit
//! costs one fsync. After a crash it may lag (the coordinator then
//! re-applies fewer entries and learns the rest from the leader), never
//! run ahead of the log.

// openraft's trait methods fix the error type (`StorageError`, ~224 bytes);
// the helpers return the same type.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, RwLock};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, LogState, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership,
    Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::state::{ClusterState, Command, CommandResult};

/// Raft node id of a coordinator (`--id`).
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The raft types of the coordinator group.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = BasicNode,
        Entry = Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
);

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

type StorageResult<T> = Result<T, StorageError<NodeId>>;

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read(&e).into()
}
fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write(&e).into()
}

/// Errors opening the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened or created.
    #[error("{path}: cannot open the raft store: {source}")]
    Open {
        /// The file.
        path: String,
        /// Why.
        source: redb::DatabaseError,
    },
    /// The stored snapshot could not be read.
    #[error("{path}: {why}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
}

/// Opens (or creates) the store in `dir` and returns its two halves.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachineStore), StoreError> {
    let path = dir.join("raft.redb");
    let db = Database::create(&path).map_err(|source| StoreError::Open {
        path: path.display().to_string(),
        source,
    })?;
    let db = Arc::new(db);
    let corrupt = |why: String| StoreError::Corrupt {
        path: path.display().to_string(),
        why,
    };
    // Make sure both tables exist so readers never see a missing table.
    let txn = db.begin_write().map_err(|e| corrupt(e.to_string()))?;
    {
        txn.open_table(LOG).map_err(|e| corrupt(e.to_string()))?;
        txn.open_table(META).map_err(|e| corrupt(e.to_string()))?;
    }
    txn.commit().map_err(|e| corrupt(e.to_string()))?;
    let log = LogStore { db: db.clone() };
    let snapshot = read_meta::<StoredSnapshot>(&db, "snapshot")
        .map_err(|e| corrupt(format!("cannot read the snapshot: {e}")))?;
    let mut data = MachineData::default();
    if let Some(s) = &snapshot {
        data = serde_json::from_slice(&s.data)
            .map_err(|e| corrupt(format!("snapshot is not valid: {e}")))?;
    }
    let (tx, _) = watch::channel(0u64);
    let sm = StateMachineStore {
        db,
        data: Arc::new(RwLock::new(data)),
        changes: tx,
        snapshot_seq: 0,
    };
    Ok((log, sm))
}

fn read_meta<T: for<'de> Deserialize<'de>>(db: &Database, key: &str) -> StorageResult<Option<T>> {
    let txn = db.begin_read().map_err(read_err)?;
    let table = txn.open_table(META).map_err(read_err)?;
    match table.get(key).map_err(read_err)? {
        Some(v) => serde_json::from_slice(v.value())
            .map(Some)
            .map_err(read_err),
        None => Ok(None),
    }
}

fn write_meta<T: Serialize>(db: &Database, key: &str, value: &T) -> StorageResult<()> {
    let bytes = serde_json::to_vec(value).map_err(write_err)?;
    let txn = db.begin_write().map_err(write_err)?;
    {
        let mut table = txn.open_table(META).map_err(write_err)?;
        table.insert(key, bytes.as_slice()).map_err(write_err)?;
    }
    txn.commit().map_err(write_err)
}

/// The raft log and vote.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let txn = self.db.begin_read().map_err(read_err)?;
        let table = txn.open_table(LOG).map_err(read_err)?;
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        for item in table.range(start..).map_err(read_err)? {
            let (k, v) = item.map_err(read_err)?;
            if !range.contains(&k.value()) {
                break;
            }
            out.push(serde_json::from_slice(v.value()).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged: Option<LogId<NodeId>> = read_meta(&self.db, "last_purged")?;
        let txn = self.db.begin_read().map_err(read_err)?;
        let table = txn.open_table(LOG).map_err(read_err)?;
        let last = match table.last().map_err(read_err)? {
            Some((_, v)) => {
                let e: Entry<TypeConfig> = serde_json::from_slice(v.value()).map_err(read_err)?;
                Some(e.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        write_meta(&self.db, "vote", vote)
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        read_meta(&self.db, "vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        let bytes = serde_json::to_vec(&committed).map_err(write_err)?;
        let mut txn = self.db.begin_write().map_err(write_err)?;
        // Made durable by the next synced write (see the module notes).
        txn.set_durability(redb::Durability::None)
            .map_err(write_err)?;
        {
            let mut table = txn.open_table(META).map_err(write_err)?;
            table
                .insert("committed", bytes.as_slice())
                .map_err(write_err)?;
        }
        txn.commit().map_err(write_err)
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(read_meta::<Option<LogId<NodeId>>>(&self.db, "committed")?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let txn = self.db.begin_write().map_err(write_err)?;
        {
            let mut table = txn.open_table(LOG).map_err(write_err)?;
            for e in entries {
                let bytes = serde_json::to_vec(&e).map_err(write_err)?;
                table
                    .insert(e.log_id.index, bytes.as_slice())
                    .map_err(write_err)?;
            }
        }
        txn.commit().map_err(write_err)?;
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let txn = self.db.begin_write().map_err(write_err)?;
        {
            let mut table = txn.open_table(LOG).map_err(write_err)?;
            table
                .retain_in(log_id.index.., |_, _| false)
                .map_err(write_err)?;
        }
        txn.commit().map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let bytes = serde_json::to_vec(&log_id).map_err(write_err)?;
        let txn = self.db.begin_write().map_err(write_err)?;
        {
            let mut meta = txn.open_table(META).map_err(write_err)?;
            meta.insert("last_purged", bytes.as_slice())
                .map_err(write_err)?;
            let mut table = txn.open_table(LOG).map_err(write_err)?;
            table
                .retain_in(..=log_id.index, |_, _| false)
                .map_err(write_err)?;
        }
        txn.commit().map_err(write_err)
    }
}

/// The applied state: the cluster state plus raft's own bookkeeping.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MachineData {
    /// Last log entry applied.
    pub last_applied: Option<LogId<NodeId>>,
    /// Membership as of `last_applied`.
    pub membership: StoredMembership<NodeId, BasicNode>,
    /// Jobs, nodes, shards.
    pub state: ClusterState,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

/// The state machine: applies committed commands and keeps snapshots.
pub struct StateMachineStore {
    db: Arc<Database>,
    data: Arc<RwLock<MachineData>>,
    changes: watch::Sender<u64>,
    snapshot_seq: u64,
}

/// A read handle on the applied state, for the API and the leader's loops.
#[derive(Clone)]
pub struct StateView {
    data: Arc<RwLock<MachineData>>,
    changes: watch::Receiver<u64>,
}

impl StateView {
    /// Runs `f` on the current state.
    pub fn read<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        let guard = self.data.read().unwrap_or_else(|p| p.into_inner());
        f(&guard.state)
    }

    /// A receiver that changes whenever a command is applied.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }
}

impl StateMachineStore {
    /// A read handle that stays valid while the store is owned by raft.
    pub fn view(&self) -> StateView {
        StateView {
            data: self.data.clone(),
            changes: self.changes.subscribe(),
        }
    }

    fn snapshot_of(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let (bytes, last_applied, membership) = {
            let d = self.data.read().unwrap_or_else(|p| p.into_inner());
            (
                serde_json::to_vec(&*d).map_err(read_err)?,
                d.last_applied,
                d.membership.clone(),
            )
        };
        self.snapshot_seq += 1;
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, self.snapshot_seq),
            None => format!("none-{}", self.snapshot_seq),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: bytes.clone(),
        };
        write_meta(&self.db, "snapshot", &stored)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

/// Builds snapshots of the state machine.
pub struct SnapshotBuilder {
    inner: StateMachineStore,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        self.inner.snapshot_of()
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>)> {
        let d = self.data.read().unwrap_or_else(|p| p.into_inner());
        Ok((d.last_applied, d.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<CommandResult>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        {
            let mut d = self.data.write().unwrap_or_else(|p| p.into_inner());
            for e in entries {
                d.last_applied = Some(e.log_id);
                match e.payload {
                    EntryPayload::Blank => out.push(CommandResult::default()),
                    EntryPayload::Normal(cmd) => out.push(d.state.apply(cmd)),
                    EntryPayload::Membership(m) => {
                        d.membership = StoredMembership::new(Some(e.log_id), m);
                        out.push(CommandResult::default());
                    }
                }
            }
        }
        self.changes.send_modify(|v| *v += 1);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            inner: StateMachineStore {
                db: self.db.clone(),
                data: self.data.clone(),
                changes: self.changes.clone(),
                snapshot_seq: {
                    self.snapshot_seq += 1;
                    self.snapshot_seq * 1000
                },
            },
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let bytes = snapshot.into_inner();
        let mut new: MachineData = serde_json::from_slice(&bytes).map_err(|e| {
            StorageError::from(StorageIOError::read_snapshot(Some(meta.signature()), &e))
        })?;
        new.last_applied = meta.last_log_id;
        new.membership = meta.last_membership.clone();
        write_meta(
            &self.db,
            "snapshot",
            &StoredSnapshot {
                meta: meta.clone(),
                data: bytes,
            },
        )?;
        *self.data.write().unwrap_or_else(|p| p.into_inner()) = new;
        self.changes.send_modify(|v| *v += 1);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        Ok(
            read_meta::<StoredSnapshot>(&self.db, "snapshot")?.map(|s| Snapshot {
                meta: s.meta,
                snapshot: Box::new(Cursor::new(s.data)),
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use openraft::testing::{StoreBuilder, Suite};

    use super::*;

    struct TempStores;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for TempStores {
        async fn build(&self) -> StorageResult<(tempfile::TempDir, LogStore, StateMachineStore)> {
            let dir = tempfile::tempdir().map_err(write_err)?;
            let (log, sm) = open(dir.path()).map_err(write_err)?;
            Ok((dir, log, sm))
        }
    }

    #[test]
    fn openraft_storage_suite() {
        Suite::test_all(TempStores).expect("storage suite");
    }

    #[tokio::test]
    async fn log_vote_and_snapshot_survive_reopen() {
        use openraft::CommittedLeaderId;
        let dir = tempfile::tempdir().unwrap();
        let lid = |i| LogId::new(CommittedLeaderId::new(1, 1), i);
        {
            let (mut log, mut sm) = open(dir.path()).unwrap();
            log.save_vote(&Vote::new(3, 1)).await.unwrap();
            // Written without a sync: the log write below makes it durable.
            log.save_committed(Some(lid(2))).await.unwrap();
            let cmd = Command::DrainNode {
                name: "x".into(),
                draining: true,
            };
            let entries = vec![
                Entry {
                    log_id: lid(1),
                    payload: EntryPayload::Blank,
                },
                Entry {
                    log_id: lid(2),
                    payload: EntryPayload::Normal(cmd),
                },
            ];
            let txn = log.db.begin_write().unwrap();
            {
                let mut t = txn.open_table(LOG).unwrap();
                for e in &entries {
                    t.insert(e.log_id.index, serde_json::to_vec(e).unwrap().as_slice())
                        .unwrap();
                }
            }
            txn.commit().unwrap();
            sm.apply(entries).await.unwrap();
            let mut b = sm.get_snapshot_builder().await;
            b.build_snapshot().await.unwrap();
        }
        let (mut log, mut sm) = open(dir.path()).unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 1)));
        assert_eq!(log.read_committed().await.unwrap(), Some(lid(2)));
        assert_eq!(log.get_log_state().await.unwrap().last_log_id, Some(lid(2)));
        assert_eq!(sm.applied_state().await.unwrap().0, Some(lid(2)));
        assert!(sm.get_current_snapshot().await.unwrap().is_some());
    }
}
