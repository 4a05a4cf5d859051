//! Self-heal: the change log of what each peer missed, and the background
//! task that pushes those paths to a peer when it is back (with progress
//! and a rate limit).
//!
//! The log is per peer, a set of brick paths, kept in memory and appended
//! to `.farol/changelog` (one JSON line per change of the set), so a
//! restarted agent still knows what its peers missed. It is compacted when
//! the agent starts.

use std::{
    collections::{BTreeMap, HashSet},
    fs::{self, File, OpenOptions},
    io::{self, BufRead, BufReader, Write},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{
    brick,
    protocol::{Request, Response, MAX_CHUNK},
    replica::{Reply, Volume},
};

#[derive(Debug, thiserror::Error)]
pub enum HealError {
    #[error("change log {path}: {source}")]
    Log {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct LogLine {
    peer: String,
    add: bool,
    path: String,
}

/// Per peer: pending path -> the generation of its latest record. A heal
/// resolves a path only if no change was recorded for it since the heal
/// read it (see [`ChangeLog::resolve_at`]).
type Pending = BTreeMap<String, BTreeMap<String, u64>>;

#[derive(Debug)]
struct LogState {
    pending: Pending,
    generation: u64,
    file: File,
}

/// What each peer missed, persisted.
#[derive(Debug)]
pub struct ChangeLog {
    path: PathBuf,
    state: Mutex<LogState>,
}

impl ChangeLog {
    /// Replays and compacts `state_dir/changelog`.
    pub fn open(state_dir: &Path) -> Result<ChangeLog, HealError> {
        let path = state_dir.join("changelog");
        let error = |source| HealError::Log {
            path: path.clone(),
            source,
        };
        let mut pending: Pending = BTreeMap::new();
        match File::open(&path) {
            Ok(file) => {
                for line in BufReader::new(file).lines() {
                    let line = line.map_err(error)?;
                    // A torn last line (crash mid-append) is skipped.
                    let Ok(entry) = serde_json::from_str::<LogLine>(&line) else {
                        continue;
                    };
                    let set = pending.entry(entry.peer).or_default();
                    if entry.add {
                        set.insert(entry.path, 0);
                    } else {
                        set.remove(&entry.path);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(error(e)),
        }
        let tmp = state_dir.join("changelog.tmp");
        {
            let mut out = io::BufWriter::new(File::create(&tmp).map_err(error)?);
            for (peer, paths) in &pending {
                for p in paths.keys() {
                    let line = LogLine {
                        peer: peer.clone(),
                        add: true,
                        path: p.clone(),
                    };
                    let text = serde_json::to_string(&line)
                        .map_err(io::Error::other)
                        .map_err(error)?;
                    writeln!(out, "{text}").map_err(error)?;
                }
            }
            out.flush().map_err(error)?;
            out.get_ref().sync_all().map_err(error)?;
        }
        fs::rename(&tmp, &path).map_err(error)?;
        let file = OpenOptions::new().append(true).open(&path).map_err(error)?;
        Ok(ChangeLog {
            path,
            state: Mutex::new(LogState {
                pending,
                generation: 0,
                file,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LogState> {
        // A panic while holding the lock leaves a consistent set (each
        // method changes it in one step): keep going.
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Appends one line; additions are synced when `sync` (a missed
    /// change must survive a crash of this node: it is the only record
    /// that the peer needs healing). Removals may be lost; the heal then
    /// just repeats.
    fn append(&self, state: &mut LogState, peer: &str, add: bool, path: &str, sync: bool) {
        let line = LogLine {
            peer: peer.to_owned(),
            add,
            path: path.to_owned(),
        };
        let written = serde_json::to_string(&line)
            .map_err(io::Error::other)
            .and_then(|text| writeln!(state.file, "{text}"))
            .and_then(|()| if sync { state.file.sync_data() } else { Ok(()) });
        if let Err(error) = written {
            warn!(log = %self.path.display(), %error, "cannot append to the change log (kept in memory)");
        }
    }

    fn sync(&self, state: &LogState) {
        if let Err(error) = state.file.sync_data() {
            warn!(log = %self.path.display(), %error, "cannot sync the change log");
        }
    }

    /// Records that `peer` missed a change of `path`.
    pub fn record(&self, peer: &str, path: &str) {
        self.record_many(peer, std::iter::once(path));
    }

    /// Records that `peer` missed changes of `paths` (one sync for all).
    pub fn record_many<'a>(&self, peer: &str, paths: impl IntoIterator<Item = &'a str>) {
        let mut state = self.lock();
        let mut added = false;
        for path in paths {
            state.generation += 1;
            let generation = state.generation;
            let inserted = state
                .pending
                .entry(peer.to_owned())
                .or_default()
                .insert(path.to_owned(), generation)
                .is_none();
            if inserted {
                self.append(&mut state, peer, true, path, false);
                added = true;
            }
        }
        if added {
            self.sync(&state);
        }
    }

    /// `peer` has `path` as this node has it now.
    pub fn resolve(&self, peer: &str, path: &str) {
        let mut state = self.lock();
        let removed = state
            .pending
            .get_mut(peer)
            .is_some_and(|set| set.remove(path).is_some());
        if removed {
            self.append(&mut state, peer, false, path, false);
        }
    }

    /// Like [`ChangeLog::resolve`], unless `path` was recorded again
    /// after `generation` (a change the peer missed while the heal was on
    /// its way): then it stays pending. Returns whether it was resolved.
    pub fn resolve_at(&self, peer: &str, path: &str, generation: u64) -> bool {
        let mut state = self.lock();
        let removed = state.pending.get_mut(peer).is_some_and(|set| {
            if set.get(path) == Some(&generation) {
                set.remove(path);
                true
            } else {
                false
            }
        });
        if removed {
            self.append(&mut state, peer, false, path, false);
        }
        removed
    }

    pub fn contains(&self, peer: &str, path: &str) -> bool {
        self.lock()
            .pending
            .get(peer)
            .is_some_and(|set| set.contains_key(path))
    }

    pub fn pending(&self, peer: &str) -> u64 {
        self.lock()
            .pending
            .get(peer)
            .map_or(0, |set| set.len() as u64)
    }

    /// The next path to heal for `peer`: parents sort before children.
    pub fn first(&self, peer: &str) -> Option<String> {
        self.next_after(peer, None).map(|(path, _)| path)
    }

    /// The first pending path of `peer` after `cursor` (from the start
    /// without one) and its generation.
    pub fn next_after(&self, peer: &str, cursor: Option<&str>) -> Option<(String, u64)> {
        use std::ops::Bound;
        let state = self.lock();
        let set = state.pending.get(peer)?;
        let mut range = match cursor {
            Some(cursor) => set.range::<str, _>((Bound::Excluded(cursor), Bound::Unbounded)),
            None => set.range::<str, _>(..),
        };
        range
            .next()
            .map(|(path, generation)| (path.clone(), *generation))
    }

    pub fn sample(&self, peer: &str, count: usize) -> Vec<String> {
        self.lock()
            .pending
            .get(peer)
            .map(|set| set.keys().take(count).cloned().collect())
            .unwrap_or_default()
    }
}

/// Heal bandwidth: sleeps so that the bytes sent average `rate` per second.
#[derive(Debug)]
pub struct RateLimit {
    rate: u64,
    started: Instant,
    sent: u64,
}

impl RateLimit {
    pub fn new(bytes_per_second: u64) -> RateLimit {
        RateLimit {
            rate: bytes_per_second.max(1),
            started: Instant::now(),
            sent: 0,
        }
    }

    /// How long to wait after sending `bytes` more.
    pub fn charge(&mut self, bytes: u64) -> Duration {
        self.sent += bytes;
        let due = Duration::from_secs_f64(self.sent as f64 / self.rate as f64);
        due.saturating_sub(self.started.elapsed())
    }
}

/// At most this many paths are on their way to a peer before the heal
/// waits for their answers and a sync (pipelining without unbounded
/// memory).
const BATCH_PATHS: usize = 512;
/// At most this many bytes of file data per batch.
const BATCH_BYTES: u64 = 32 * 1024 * 1024;

/// One path sent to the peer, waiting for its answers.
struct Sent {
    path: String,
    generation: u64,
    replies: Vec<Reply>,
    bytes: u64,
    /// Streamed without the apply lock (see [`send_path`]).
    streamed: bool,
}

/// How a batch went.
enum BatchOutcome {
    /// Every path answered; this many were installed, with these bytes.
    Done { healed: u64, bytes: u64 },
    /// The peer went away or refused: retry later.
    Failed,
}

/// Heals `peer` (an index into the volume's peers) whenever it is up and
/// has missed changes, until the volume stops. Runs on its own thread:
/// brick reads are blocking.
///
/// Paths go out in batches without waiting for each answer (the peer
/// applies one connection's requests in order); each batch ends with a
/// `HealSync` that makes the peer's copies durable at once (one syncfs
/// rather than an fsync per file), and only then are its paths resolved.
pub fn heal_loop(volume: Arc<Volume>, peer: usize) {
    let name = volume.peer_name(peer).to_owned();
    let mut last_progress = Instant::now() - Duration::from_secs(10);
    while !volume.stopping() {
        volume.wait_heal_wakeup(Duration::from_millis(500));
        if volume.stopping() {
            break;
        }
        if !volume.peer_up(peer) {
            continue;
        }
        let total = volume.log().pending(&name);
        if total == 0 {
            if last_progress.elapsed() >= Duration::from_secs(1) {
                let _ = volume.call_peer(peer, Request::HealProgress { remaining: 0 });
                last_progress = Instant::now();
            }
            continue;
        }
        if let Some(first) = volume.first_healer(peer) {
            // Every replica that saw `peer` down recorded what it missed;
            // one heals it (the lowest-named), the others wait for it and
            // then only probe: what it already installed is not sent twice.
            wait_for_first_healer(&volume, peer, first);
            if volume.stopping() || !volume.peer_up(peer) {
                continue;
            }
            probe_pass(&volume, peer);
            if volume.log().pending(&name) == 0 {
                continue;
            }
        }
        let total = volume.log().pending(&name);
        info!(volume = %volume.name(), peer = %name, pending = total, "heal started");
        volume.stats().heal_running(&name, true);
        let started = Instant::now();
        let mut limit = RateLimit::new(volume.heal_rate());
        let mut healed = 0u64;
        let mut bytes = 0u64;
        let mut last_report = Instant::now();
        let mut failed = false;
        let mut cursor: Option<String> = None;
        // Large files that changed while they were streamed: sent under
        // the apply lock next time.
        let mut contended = HashSet::new();
        loop {
            if volume.stopping() || !volume.peer_up(peer) {
                failed = true;
                break;
            }
            let (batch, complete) = send_batch(&volume, peer, &mut cursor, &mut limit, &contended);
            if batch.is_empty() {
                if !complete {
                    failed = true;
                    break;
                }
                if cursor.take().is_none() {
                    break;
                }
                // Paths recorded behind the cursor meanwhile: another pass.
                continue;
            }
            match finish_batch(&volume, peer, batch, &mut contended) {
                BatchOutcome::Done {
                    healed: count,
                    bytes: sent,
                } => {
                    healed += count;
                    bytes += sent;
                }
                BatchOutcome::Failed => failed = true,
            }
            if failed || !complete {
                failed = true;
                break;
            }
            if last_report.elapsed() >= Duration::from_secs(2) {
                let remaining = volume.log().pending(&name);
                info!(volume = %volume.name(), peer = %name, healed, remaining, "heal progress");
                let _ = volume.send_peer(peer, Request::HealProgress { remaining });
                last_report = Instant::now();
            }
        }
        let remaining = volume.log().pending(&name);
        let _ = volume.call_peer(peer, Request::HealProgress { remaining });
        last_progress = Instant::now();
        volume.stats().heal_running(&name, false);
        if failed {
            warn!(volume = %volume.name(), peer = %name, healed, remaining, "heal interrupted (peer down or refusing); will retry");
            std::thread::sleep(Duration::from_millis(300));
        } else {
            info!(
                volume = %volume.name(), peer = %name, healed, bytes,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "heal finished"
            );
        }
    }
}

/// Waits until the replica healing `peer` first has nothing left for it
/// (or either goes away).
fn wait_for_first_healer(volume: &Volume, peer: usize, first: usize) {
    let name = volume.peer_name(peer);
    let healer = volume.peer_name(first);
    info!(volume = %volume.name(), peer = %name, healer = %healer, "another replica heals this peer first; waiting for it");
    while !volume.stopping() && volume.peer_up(peer) && volume.peer_up(first) {
        let left = match volume.call_peer(first, Request::Status) {
            Some(Response::Status(report)) => report
                .peers
                .iter()
                .find(|p| p.node == name)
                .map_or(0, |p| p.pending),
            _ => break,
        };
        if left == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Asks `peer` whether it already holds each pending path as this replica
/// has it (another replica healed it); those leave the change log without
/// their data being sent. Paths that differ stay for the heal.
fn probe_pass(volume: &Volume, peer: usize) {
    let name = volume.peer_name(peer);
    let mut cursor: Option<String> = None;
    let (mut same, mut differ) = (0u64, 0u64);
    loop {
        let mut batch = Vec::new();
        while batch.len() < BATCH_PATHS {
            let Some((path, generation)) = volume.log().next_after(name, cursor.as_deref()) else {
                break;
            };
            cursor = Some(path.clone());
            let Ok(digest) = volume.brick().digest(&path) else {
                continue;
            };
            let request = Request::HealProbe {
                path: path.clone(),
                digest,
            };
            match volume.send_peer(peer, request) {
                Some(reply) => batch.push((path, generation, reply)),
                None => return,
            }
        }
        if batch.is_empty() {
            break;
        }
        for (path, generation, reply) in batch {
            match volume.wait_reply(reply) {
                Some(Response::Ok) => {
                    if volume.log().resolve_at(name, &path, generation) {
                        same += 1;
                    }
                }
                Some(_) => differ += 1,
                None => return,
            }
        }
    }
    info!(volume = %volume.name(), peer = %name, same, differ, "probed what the first healer left");
}

/// Sends the pending paths after `cursor` until a batch is full; returns
/// them and whether every capture went out (false: the peer went away,
/// its queue is full, or a path could not be read).
fn send_batch(
    volume: &Volume,
    peer: usize,
    cursor: &mut Option<String>,
    limit: &mut RateLimit,
    contended: &HashSet<String>,
) -> (Vec<Sent>, bool) {
    let name = volume.peer_name(peer);
    let mut batch = Vec::new();
    let mut batch_bytes = 0u64;
    while batch.len() < BATCH_PATHS && batch_bytes < BATCH_BYTES {
        let Some((path, generation)) = volume.log().next_after(name, cursor.as_deref()) else {
            break;
        };
        *cursor = Some(path.clone());
        let hold_lock = contended.contains(&path);
        let Some((replies, bytes, children, streamed)) = send_path(volume, peer, &path, hold_lock)
        else {
            return (batch, false);
        };
        if let Some(children) = children {
            // The peer's directory may lack any of its children (a
            // renamed tree, say): heal them too (they sort after it, so
            // this pass reaches them).
            let paths: Vec<String> = children.iter().map(|c| brick::join(&path, c)).collect();
            volume
                .log()
                .record_many(name, paths.iter().map(String::as_str));
        }
        batch_bytes += bytes;
        batch.push(Sent {
            path,
            generation,
            replies,
            bytes,
            streamed,
        });
        std::thread::sleep(limit.charge(bytes));
    }
    (batch, true)
}

/// Waits for a batch's answers and the peer's sync, then resolves what
/// the peer installed (or refused as the split-brain winner).
fn finish_batch(
    volume: &Volume,
    peer: usize,
    batch: Vec<Sent>,
    contended: &mut HashSet<String>,
) -> BatchOutcome {
    let name = volume.peer_name(peer);
    let sync = volume.send_peer(peer, Request::HealSync);
    let mut installed = Vec::new();
    let mut rejected = Vec::new();
    let mut failed = false;
    for sent in batch {
        let mut outcome = Some(true);
        for reply in sent.replies {
            match volume.wait_reply(reply) {
                Some(Response::Ok) => {}
                Some(Response::Rejected) => outcome = outcome.map(|_| false),
                Some(other) => {
                    warn!(volume = %volume.name(), path = %sent.path, reply = ?other, "peer refused a heal");
                    outcome = None;
                }
                None => outcome = None,
            }
        }
        // The peer has applied (or dropped) the copy: a change from now on
        // reaches it after the copy.
        volume.end_stream(peer, &sent.path);
        match outcome {
            Some(true) => installed.push((sent.path, sent.generation, sent.bytes, sent.streamed)),
            Some(false) => rejected.push((sent.path, sent.generation)),
            None => failed = true,
        }
    }
    let synced = match sync.and_then(|reply| volume.wait_reply(reply)) {
        Some(Response::Ok) => true,
        other => {
            warn!(volume = %volume.name(), peer = %name, reply = ?other, "peer could not sync healed entries");
            false
        }
    };
    for (path, generation) in rejected {
        // The peer's copy wins; it heals this replica instead.
        volume.log().resolve_at(name, &path, generation);
    }
    if !synced {
        return BatchOutcome::Failed;
    }
    let mut healed = 0;
    let mut bytes = 0;
    for (path, generation, sent, streamed) in installed {
        if !volume.log().resolve_at(name, &path, generation) && streamed {
            contended.insert(path);
            continue;
        }
        healed += 1;
        bytes += sent;
        volume.stats().healed(name);
    }
    if failed {
        BatchOutcome::Failed
    } else {
        BatchOutcome::Done { healed, bytes }
    }
}

/// A path queued for the peer: the replies to wait for, the file bytes
/// sent, a directory's children, and whether the file was streamed.
type Captured = (Vec<Reply>, u64, Option<Vec<String>>, bool);

/// Captures `path` and queues it for the peer. Returns the replies to
/// wait for, the file bytes sent, a directory's children, and whether the
/// file was streamed; None when not all of it went out.
///
/// An entry that fits one chunk is captured under the apply lock, so it
/// reaches the peer in order with the changes around it. A larger file is
/// streamed chunk by chunk without holding the lock across the whole read
/// (writes go on meanwhile); a change to it during the stream records it
/// again (see [`Volume::begin_stream`]), so its generation moves and the
/// heal sends it again. A file that changed during its stream once more
/// (`hold_lock`) is captured under the lock, so the heal always ends.
fn send_path(volume: &Volume, peer: usize, path: &str, hold_lock: bool) -> Option<Captured> {
    let large = !hold_lock
        && std::fs::symlink_metadata(volume.brick().abs(path))
            .is_ok_and(|stat| stat.is_file() && stat.len() > MAX_CHUNK as u64);
    let order = if large {
        volume.begin_stream(peer, path);
        None
    } else {
        let order = volume.apply_lock();
        volume.begin_stream_locked(&order, peer, path);
        Some(order)
    };
    let mut replies = Vec::new();
    let mut bytes = 0u64;
    let mut children = None;
    let mut complete = true;
    let captured = volume.brick().capture(path, MAX_CHUNK, &mut |entry| {
        match &entry {
            brick::Entry::File { data, .. } => bytes += data.len() as u64,
            brick::Entry::Dir {
                children: names, ..
            } => children = Some(names.clone()),
            _ => {}
        }
        match volume.send_peer(
            peer,
            Request::Heal {
                path: path.to_owned(),
                entry,
            },
        ) {
            Some(reply) => {
                replies.push(reply);
                true
            }
            None => {
                complete = false;
                false
            }
        }
    });
    drop(order);
    if let Err(error) = captured {
        volume.end_stream(peer, path);
        warn!(volume = %volume.name(), path, %error, "cannot read a path to heal");
        return None;
    }
    // The peer went away or its queue is full: part of the entry was not
    // sent, so the path stays pending.
    if !complete || replies.is_empty() {
        volume.end_stream(peer, path);
        return None;
    }
    Some((replies, bytes, children, large))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_change_log_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("farol-changelog-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        {
            let log = ChangeLog::open(&dir).unwrap();
            log.record("b", "x");
            log.record("b", "y");
            log.record("c", "x");
            log.resolve("b", "x");
        }
        let log = ChangeLog::open(&dir).unwrap();
        assert_eq!(log.pending("b"), 1);
        assert_eq!(log.first("b").as_deref(), Some("y"));
        assert_eq!(log.pending("c"), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_path_recorded_again_while_its_heal_was_on_the_way_stays_pending() {
        let dir = std::env::temp_dir().join(format!("farol-changelog-gen-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let log = ChangeLog::open(&dir).unwrap();
        log.record_many("b", ["a", "b/c", "b/d"]);
        let (first, generation) = log.next_after("b", None).unwrap();
        assert_eq!(first, "a");
        // The heal read "a"; a change the peer missed comes in meanwhile.
        log.record("b", "a");
        assert!(
            !log.resolve_at("b", "a", generation),
            "a newer change is kept"
        );
        assert!(log.contains("b", "a"));
        let (_, newer) = log.next_after("b", None).unwrap();
        assert!(log.resolve_at("b", "a", newer));
        // The cursor walks past what it already sent.
        assert_eq!(log.next_after("b", Some("b/c")).unwrap().0, "b/d");
        assert_eq!(log.next_after("b", Some("b/d")), None);
        assert_eq!(log.pending("b"), 2);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_rate_limit_spreads_bytes_over_time() {
        let mut limit = RateLimit::new(1_000_000);
        let wait = limit.charge(500_000);
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500));
    }
}
