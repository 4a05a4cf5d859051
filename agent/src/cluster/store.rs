//! Raft's storage for the cluster state: the log and the vote on disk
//! (`<state_dir>/<node>/`), and the state machine (the primary record) in
//! memory, rebuilt from the snapshot file and the log at start.
//!
//! Files:
//! - `vote.json`: the vote, written to a temporary file, fsynced and renamed
//!   before openraft is told it is saved. Raft's safety needs it: an agent
//!   that forgot its vote after a restart could vote twice in one term.
//! - `log.jsonl`: one JSON entry a line, appended and fsynced before the
//!   append is acknowledged; rewritten whole on truncation and purge (the
//!   log is small: a snapshot every few hundred entries). The fsync of an
//!   append runs on a thread of its own, which tells openraft when it is
//!   done (openraft's `LogFlushed` callback): a disk that takes a second
//!   to sync (an SD card, PostgreSQL writing a base backup next to it)
//!   then delays that entry's commit, not every task of the agent, whose
//!   heartbeats, health checks and lease timers share two worker threads.
//! - `meta.json`: the last purged log id and the last known commit (the
//!   commit is a hint, so a restarted agent shows the record at once).
//! - `snapshot.json`: the last snapshot (state and its metadata).

use std::{
    collections::BTreeMap,
    fmt::Debug,
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Cursor, Write},
    ops::RangeBounds,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use openraft::{
    storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot},
    BasicNode, Entry, EntryPayload, LogId, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::warn;

use super::{
    types::{Command, Outcome, TypeConfig},
    ClusterError, PrimaryRecord,
};

type NodeId = u64;

/// Writes `bytes` to `path` atomically: a crash leaves the old or the new file.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8], sync: bool) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    let mut file = File::create(&temporary)?;
    file.write_all(bytes)?;
    if sync {
        file.sync_all()?;
    }
    drop(file);
    std::fs::rename(&temporary, path)?;
    if sync {
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
    }
    Ok(())
}

pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> std::io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidData, error)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Meta {
    last_purged: Option<LogId<NodeId>>,
    committed: Option<LogId<NodeId>>,
}

#[derive(Debug)]
struct LogInner {
    dir: PathBuf,
    vote: Option<Vote<NodeId>>,
    meta: Meta,
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    /// `log.jsonl`, opened for appending.
    file: File,
}

/// The log and the vote, shared by openraft's log task and its readers.
#[derive(Debug, Clone)]
pub(crate) struct LogStore {
    inner: Arc<Mutex<LogInner>>,
    /// Appends waiting for their fsync, in order (see the module doc).
    flusher: std::sync::mpsc::Sender<PendingFlush>,
}

/// An append written to `log.jsonl`, to be made durable through `file`
/// (a handle on the same open file) before openraft hears of it.
struct PendingFlush {
    file: File,
    callback: LogFlushed<TypeConfig>,
}

/// Syncs each pending append, in the order they were written; one
/// `fdatasync` covers every write before it, so the order of callbacks is
/// the order of durability. Ends when every `LogStore` is gone.
fn start_flusher(dir: &Path) -> std::io::Result<std::sync::mpsc::Sender<PendingFlush>> {
    let (sender, receiver) = std::sync::mpsc::channel::<PendingFlush>();
    std::thread::Builder::new()
        .name("raft-log-fsync".into())
        .spawn(move || {
            for pending in receiver {
                pending.callback.log_io_completed(pending.file.sync_data());
            }
        })
        .map_err(|error| std::io::Error::other(format!("{}: {error}", dir.display())))?;
    Ok(sender)
}

fn io_error(error: impl std::error::Error + 'static) -> openraft::AnyError {
    openraft::AnyError::new(&error)
}

impl LogStore {
    /// Opens (or creates) the log in `dir`.
    pub(crate) fn open(dir: &Path) -> Result<LogStore, ClusterError> {
        let fail = |what: &str, error: std::io::Error| {
            ClusterError::Storage(format!("{}: {what}: {error}", dir.display()))
        };
        std::fs::create_dir_all(dir).map_err(|e| fail("cannot create", e))?;
        let vote = read_json(&dir.join("vote.json")).map_err(|e| fail("vote.json", e))?;
        let meta: Meta = read_json(&dir.join("meta.json"))
            .map_err(|e| fail("meta.json", e))?
            .unwrap_or_default();
        let path = dir.join("log.jsonl");
        let mut entries = BTreeMap::new();
        match File::open(&path) {
            Ok(file) => {
                let lines: Vec<String> = BufReader::new(file)
                    .lines()
                    .collect::<Result<_, _>>()
                    .map_err(|e| fail("log.jsonl", e))?;
                let count = lines.len();
                for (number, line) in lines.into_iter().enumerate() {
                    match serde_json::from_str::<Entry<TypeConfig>>(&line) {
                        Ok(entry) => {
                            entries.insert(entry.log_id.index, entry);
                        }
                        // A crash in the middle of an append leaves a torn
                        // last line, which was never acknowledged.
                        Err(error) if number + 1 == count => {
                            warn!(file = %path.display(), %error, "dropping a torn last log line (an append cut by a crash)");
                        }
                        Err(error) => {
                            return Err(fail(
                                &format!("log.jsonl line {}", number + 1),
                                std::io::Error::new(std::io::ErrorKind::InvalidData, error),
                            ))
                        }
                    }
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(fail("log.jsonl", error)),
        }
        let mut inner = LogInner {
            dir: dir.to_owned(),
            vote,
            meta,
            entries,
            file: OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| fail("log.jsonl", e))?,
        };
        // Rewritten once, so that a torn line is gone before new appends.
        inner.rewrite().map_err(|e| fail("log.jsonl", e))?;
        Ok(LogStore {
            inner: Arc::new(Mutex::new(inner)),
            flusher: start_flusher(dir).map_err(|e| fail("cannot start the fsync thread", e))?,
        })
    }

    fn lock(&self) -> MutexGuard<'_, LogInner> {
        // A panic while holding the lock would be a bug in this file; the
        // data is still consistent with the files, so carry on with it.
        self.inner
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

impl LogInner {
    fn rewrite(&mut self) -> std::io::Result<()> {
        let mut text = Vec::new();
        for entry in self.entries.values() {
            serde_json::to_writer(&mut text, entry).map_err(std::io::Error::other)?;
            text.push(b'\n');
        }
        let path = self.dir.join("log.jsonl");
        write_atomically(&path, &text, true)?;
        self.file = OpenOptions::new().append(true).open(&path)?;
        Ok(())
    }

    fn write_meta(&self, sync: bool) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(&self.meta).map_err(std::io::Error::other)?;
        write_atomically(&self.dir.join("meta.json"), &bytes, sync)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let inner = self.lock();
        Ok(inner
            .entries
            .range(range)
            .map(|(_, entry)| entry.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let inner = self.lock();
        let last_purged_log_id = inner.meta.last_purged;
        let last_log_id = inner
            .entries
            .values()
            .next_back()
            .map(|entry| entry.log_id)
            .or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.lock();
        let bytes =
            serde_json::to_vec(vote).map_err(|e| StorageIOError::write_vote(io_error(e)))?;
        write_atomically(&inner.dir.join("vote.json"), &bytes, true)
            .map_err(|e| StorageIOError::write_vote(io_error(e)))?;
        inner.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.lock().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.lock();
        inner.meta.committed = committed;
        // A hint only (openraft learns the commit from the leader), so no
        // fsync on this frequent write.
        inner
            .write_meta(false)
            .map_err(|e| StorageIOError::write(io_error(e)))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.lock().meta.committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut inner = self.lock();
        let mut text = Vec::new();
        let mut added = Vec::new();
        for entry in entries {
            serde_json::to_writer(&mut text, &entry)
                .map_err(|e| StorageIOError::write_logs(io_error(e)))?;
            text.push(b'\n');
            added.push(entry);
        }
        let written = inner
            .file
            .write_all(&text)
            .and_then(|()| inner.file.try_clone());
        let file = match written {
            Ok(file) => file,
            Err(error) => {
                let message = error.to_string();
                callback.log_io_completed(Err(error));
                return Err(StorageIOError::write_logs(openraft::AnyError::error(message)).into());
            }
        };
        // Readable at once; openraft counts them only once durable.
        for entry in added {
            inner.entries.insert(entry.log_id.index, entry);
        }
        // Sent under the lock, so the flushes keep the order of the writes.
        let sent = self.flusher.send(PendingFlush { file, callback });
        drop(inner);
        if let Err(std::sync::mpsc::SendError(pending)) = sent {
            // The thread is gone (it cannot panic short of a bug): sync here.
            let synced = pending.file.sync_data();
            pending.callback.log_io_completed(synced);
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.lock();
        inner.entries.split_off(&log_id.index);
        inner
            .rewrite()
            .map_err(|e| StorageIOError::write_logs(io_error(e)))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.lock();
        inner.meta.last_purged = Some(log_id);
        inner
            .write_meta(true)
            .map_err(|e| StorageIOError::write(io_error(e)))?;
        let kept = inner.entries.split_off(&(log_id.index + 1));
        inner.entries = kept;
        inner
            .rewrite()
            .map_err(|e| StorageIOError::write_logs(io_error(e)))?;
        Ok(())
    }
}

/// What the agents agree on: the primary record and its lease renewals.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SharedState {
    /// The current epoch: 0 before any primary, +1 at every change.
    pub(crate) epoch: u64,
    pub(crate) primary: Option<PrimaryRecord>,
    /// Committed lease renewals of the current primary in this epoch.
    pub(crate) renewals: u64,
}

/// The state as this agent applied it. (The lease itself is not in the
/// log: the voters' promises, `super::promise`, carry it.)
#[derive(Debug, Clone)]
pub(crate) struct LeaseView {
    pub(crate) state: SharedState,
}

#[derive(Debug, Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta<NodeId, BasicNode>,
    state: SharedState,
}

#[derive(Debug)]
struct MachineInner {
    dir: PathBuf,
    applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
    view: LeaseView,
    snapshot: Option<SnapshotFile>,
    snapshots_built: u64,
}

/// The state machine: applies committed commands, publishes the record.
#[derive(Debug, Clone)]
pub(crate) struct StateMachine {
    inner: Arc<Mutex<MachineInner>>,
    primary: watch::Sender<Option<PrimaryRecord>>,
}

impl StateMachine {
    /// Starts from `snapshot.json` in `dir`, if any.
    pub(crate) fn open(
        dir: &Path,
        primary: watch::Sender<Option<PrimaryRecord>>,
    ) -> Result<StateMachine, ClusterError> {
        let snapshot: Option<SnapshotFile> = read_json(&dir.join("snapshot.json"))
            .map_err(|e| ClusterError::Storage(format!("{}/snapshot.json: {e}", dir.display())))?;
        let mut inner = MachineInner {
            dir: dir.to_owned(),
            applied: None,
            membership: StoredMembership::default(),
            view: LeaseView {
                state: SharedState::default(),
            },
            snapshot: None,
            snapshots_built: 0,
        };
        if let Some(snapshot) = snapshot {
            inner.install(&snapshot.meta, snapshot.state.clone());
            inner.snapshot = Some(snapshot);
        }
        primary.send_replace(inner.view.state.primary.clone());
        Ok(StateMachine {
            inner: Arc::new(Mutex::new(inner)),
            primary,
        })
    }

    fn lock(&self) -> MutexGuard<'_, MachineInner> {
        // See LogStore::lock.
        self.inner
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// The applied state and when its last renewal was applied here.
    pub(crate) fn view(&self) -> LeaseView {
        self.lock().view.clone()
    }

    fn publish(&self, record: Option<PrimaryRecord>) {
        self.primary.send_if_modified(|current| {
            if *current == record {
                false
            } else {
                *current = record;
                true
            }
        });
    }
}

impl MachineInner {
    fn install(&mut self, meta: &SnapshotMeta<NodeId, BasicNode>, state: SharedState) {
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.view.state = state;
    }

    fn apply(&mut self, command: &Command) -> Outcome {
        let state = &mut self.view.state;
        match command {
            Command::SetPrimary {
                node,
                expected_epoch,
                expected_renewals,
                handoff_from,
            } => {
                if state.epoch != *expected_epoch {
                    return Outcome::Refused(ClusterError::EpochMoved {
                        expected: *expected_epoch,
                        current: state.primary.clone(),
                    });
                }
                match &state.primary {
                    Some(current) if current.node == *node => {
                        return Outcome::Primary(current.clone());
                    }
                    Some(current)
                        if handoff_from.as_deref() != Some(current.node.as_str())
                            && state.renewals != *expected_renewals =>
                    {
                        return Outcome::Refused(ClusterError::LeaseHeld {
                            primary: current.node.clone(),
                            since_ms: 0,
                            needed_ms: 0,
                        });
                    }
                    _ => {}
                }
                state.epoch += 1;
                let record = PrimaryRecord {
                    node: node.clone(),
                    epoch: state.epoch,
                };
                let from = state.primary.as_ref().map(|r| r.node.as_str());
                let reason = match (handoff_from, from) {
                    (Some(by), _) => format!("handed over by {by}"),
                    (None, Some(old)) => format!("{old} renewed no lease for lease + margin"),
                    (None, None) => "first primary".to_owned(),
                };
                tracing::info!(primary = %node, epoch = state.epoch, previous = from.unwrap_or("none"), %reason, "primary record changed (committed by a majority of voters)");
                state.primary = Some(record.clone());
                state.renewals = 0;
                Outcome::Primary(record)
            }
            Command::Renew { node, epoch } => match &state.primary {
                Some(current) if current.node == *node && current.epoch == *epoch => {
                    state.renewals += 1;
                    Outcome::Renewed
                }
                _ => Outcome::Refused(ClusterError::EpochMoved {
                    expected: *epoch,
                    current: state.primary.clone(),
                }),
            },
        }
    }

    fn snapshot_bytes(&self) -> Result<(SnapshotFile, Vec<u8>), serde_json::Error> {
        self.to_snapshot().and_then(|file| {
            let bytes = serde_json::to_vec(&file.state)?;
            Ok((file, bytes))
        })
    }

    fn to_snapshot(&self) -> Result<SnapshotFile, serde_json::Error> {
        let snapshot_id = format!(
            "{}-{}",
            self.applied.map_or(0, |id| id.index),
            self.snapshots_built
        );
        Ok(SnapshotFile {
            meta: SnapshotMeta {
                last_log_id: self.applied,
                last_membership: self.membership.clone(),
                snapshot_id,
            },
            state: self.view.state.clone(),
        })
    }

    fn store_snapshot(&mut self, file: SnapshotFile) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(&file).map_err(std::io::Error::other)?;
        write_atomically(&self.dir.join("snapshot.json"), &bytes, true)?;
        self.snapshot = Some(file);
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let mut inner = self.lock();
        inner.snapshots_built += 1;
        let (file, bytes) = inner
            .snapshot_bytes()
            .map_err(|e| StorageIOError::write_snapshot(None, io_error(e)))?;
        let meta = file.meta.clone();
        inner
            .store_snapshot(file)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), io_error(e)))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError<NodeId>>
    {
        let inner = self.lock();
        Ok((inner.applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let record = {
            let mut inner = self.lock();
            let mut outcomes = Vec::new();
            for entry in entries {
                inner.applied = Some(entry.log_id);
                let outcome = match &entry.payload {
                    EntryPayload::Blank => Outcome::Nothing,
                    EntryPayload::Normal(command) => inner.apply(command),
                    EntryPayload::Membership(membership) => {
                        inner.membership =
                            StoredMembership::new(Some(entry.log_id), membership.clone());
                        Outcome::Nothing
                    }
                };
                outcomes.push(outcome);
            }
            (inner.view.state.primary.clone(), outcomes)
        };
        self.publish(record.0);
        Ok(record.1)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let state: SharedState = serde_json::from_slice(snapshot.get_ref())
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), io_error(e)))?;
        let record = {
            let mut inner = self.lock();
            inner.install(meta, state.clone());
            inner
                .store_snapshot(SnapshotFile {
                    meta: meta.clone(),
                    state,
                })
                .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), io_error(e)))?;
            inner.view.state.primary.clone()
        };
        self.publish(record);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let inner = self.lock();
        let Some(file) = &inner.snapshot else {
            return Ok(None);
        };
        let bytes = serde_json::to_vec(&file.state)
            .map_err(|e| StorageIOError::read_snapshot(Some(file.meta.signature()), io_error(e)))?;
        Ok(Some(Snapshot {
            meta: file.meta.clone(),
            snapshot: Box::new(Cursor::new(bytes)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use openraft::{
        storage::RaftLogStorageExt,
        testing::{StoreBuilder, Suite},
        CommittedLeaderId,
    };

    use super::*;

    /// A state directory removed on drop.
    struct Scratch(PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn scratch() -> Scratch {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "farol-cluster-store-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        Scratch(dir)
    }

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, Scratch> for Builder {
        async fn build(&self) -> Result<(Scratch, LogStore, StateMachine), StorageError<NodeId>> {
            let dir = scratch();
            let log = LogStore::open(&dir.0).expect("open the log");
            let machine =
                StateMachine::open(&dir.0, watch::channel(None).0).expect("open the machine");
            Ok((dir, log, machine))
        }
    }

    /// openraft's own storage conformance suite, on the files.
    #[test]
    fn the_storage_passes_openrafts_suite() {
        Suite::test_all(Builder).unwrap();
    }

    fn entry(term: u64, index: u64, command: Command) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(command),
        }
    }

    #[tokio::test]
    async fn vote_log_and_snapshot_survive_a_restart() {
        let dir = scratch();
        let renew = |epoch| Command::Renew {
            node: "a".into(),
            epoch,
        };
        {
            let mut log = LogStore::open(&dir.0).unwrap();
            log.save_vote(&Vote::new(3, 7)).await.unwrap();
            log.blocking_append((1..=6).map(|i| entry(3, i, renew(i))))
                .await
                .unwrap();
            log.truncate(LogId::new(CommittedLeaderId::new(3, 1), 5))
                .await
                .unwrap();
            log.purge(LogId::new(CommittedLeaderId::new(3, 1), 2))
                .await
                .unwrap();
            let mut machine = StateMachine::open(&dir.0, watch::channel(None).0).unwrap();
            machine
                .apply([entry(3, 1, set("a", 0, 0, None))])
                .await
                .unwrap();
            machine
                .get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .unwrap();
        }
        // A crash in the middle of an append: a torn last line.
        let mut file = OpenOptions::new()
            .append(true)
            .open(dir.0.join("log.jsonl"))
            .unwrap();
        file.write_all(b"{\"log_id\":{\"lea").unwrap();
        drop(file);

        let mut log = LogStore::open(&dir.0).unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 7)));
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id.map(|id| id.index), Some(2));
        assert_eq!(state.last_log_id.map(|id| id.index), Some(4));
        let indexes: Vec<u64> = log
            .try_get_log_entries(0..100)
            .await
            .unwrap()
            .iter()
            .map(|e| e.log_id.index)
            .collect();
        assert_eq!(indexes, vec![3, 4]);
        let (tx, rx) = watch::channel(None);
        let mut machine = StateMachine::open(&dir.0, tx).unwrap();
        assert_eq!(
            *rx.borrow(),
            Some(PrimaryRecord {
                node: "a".into(),
                epoch: 1
            })
        );
        assert_eq!(
            machine.applied_state().await.unwrap().0.map(|id| id.index),
            Some(1)
        );
        assert_eq!(machine.view().state.epoch, 1);
    }

    fn set(node: &str, epoch: u64, renewals: u64, handoff: Option<&str>) -> Command {
        Command::SetPrimary {
            node: node.into(),
            expected_epoch: epoch,
            expected_renewals: renewals,
            handoff_from: handoff.map(str::to_owned),
        }
    }

    fn machine() -> MachineInner {
        MachineInner {
            dir: PathBuf::from("/nonexistent"),
            applied: None,
            membership: StoredMembership::default(),
            view: LeaseView {
                state: SharedState::default(),
            },
            snapshot: None,
            snapshots_built: 0,
        }
    }

    #[test]
    fn set_primary_is_a_compare_and_set_on_the_epoch() {
        let mut machine = machine();
        let first = machine.apply(&set("a", 0, 0, None));
        assert_eq!(
            first,
            Outcome::Primary(PrimaryRecord {
                node: "a".into(),
                epoch: 1
            })
        );
        // A stale epoch is refused and changes nothing.
        assert!(matches!(
            machine.apply(&set("b", 0, 0, None)),
            Outcome::Refused(ClusterError::EpochMoved { expected: 0, .. })
        ));
        assert_eq!(machine.view.state.epoch, 1);
        // The same node again is not a change: no new epoch.
        assert_eq!(machine.apply(&set("a", 1, 0, None)), first);
    }

    #[test]
    fn a_renewal_committed_after_the_check_refuses_the_takeover() {
        let mut machine = machine();
        machine.apply(&set("a", 0, 0, None));
        assert_eq!(
            machine.apply(&Command::Renew {
                node: "a".into(),
                epoch: 1
            }),
            Outcome::Renewed
        );
        assert_eq!(machine.view.state.renewals, 1);
        // Checked when there were no renewals; one came in between.
        assert!(matches!(
            machine.apply(&set("b", 1, 0, None)),
            Outcome::Refused(ClusterError::LeaseHeld { .. })
        ));
        // A handoff by the primary itself does not wait for its lease.
        assert!(matches!(
            machine.apply(&set("b", 1, 0, Some("a"))),
            Outcome::Primary(PrimaryRecord { epoch: 2, .. })
        ));
        // The old primary's renewals no longer count.
        assert!(matches!(
            machine.apply(&Command::Renew {
                node: "a".into(),
                epoch: 1
            }),
            Outcome::Refused(ClusterError::EpochMoved { .. })
        ));
    }
}
