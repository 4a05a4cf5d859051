//! Self-heal: the change log of what each peer missed, and the background
//! task that pushes those paths to a peer when it is back (with progress
//! and a rate limit).
//!
//! The log is per peer, a set of brick paths, kept in memory and appended
//! to `.farol/changelog` (one JSON line per change of the set), so a
//! restarted agent still knows what its peers missed. It is compacted when
//! the agent starts.

use std::{
    collections::{BTreeMap, BTreeSet},
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
    replica::Volume,
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

#[derive(Debug)]
struct LogState {
    pending: BTreeMap<String, BTreeSet<String>>,
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
        let mut pending: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
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
                        set.insert(entry.path);
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
                for p in paths {
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
            state: Mutex::new(LogState { pending, file }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LogState> {
        // A panic while holding the lock leaves a consistent set (each
        // method changes it in one step): keep going.
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn append(&self, state: &mut LogState, peer: &str, add: bool, path: &str) {
        let line = LogLine {
            peer: peer.to_owned(),
            add,
            path: path.to_owned(),
        };
        // A missed change must survive a crash of this node (it is the
        // only record that the peer needs healing): sync additions.
        // Removals may be lost; the heal then just repeats.
        let written = serde_json::to_string(&line)
            .map_err(io::Error::other)
            .and_then(|text| writeln!(state.file, "{text}"))
            .and_then(|()| if add { state.file.sync_data() } else { Ok(()) });
        if let Err(error) = written {
            warn!(log = %self.path.display(), %error, "cannot append to the change log (kept in memory)");
        }
    }

    /// Records that `peer` missed a change of `path`.
    pub fn record(&self, peer: &str, path: &str) {
        let mut state = self.lock();
        let inserted = state
            .pending
            .entry(peer.to_owned())
            .or_default()
            .insert(path.to_owned());
        if inserted {
            self.append(&mut state, peer, true, path);
        }
    }

    /// `peer` has `path` as this node has it now.
    pub fn resolve(&self, peer: &str, path: &str) {
        let mut state = self.lock();
        let removed = state
            .pending
            .get_mut(peer)
            .is_some_and(|set| set.remove(path));
        if removed {
            self.append(&mut state, peer, false, path);
        }
    }

    pub fn contains(&self, peer: &str, path: &str) -> bool {
        self.lock()
            .pending
            .get(peer)
            .is_some_and(|set| set.contains(path))
    }

    pub fn pending(&self, peer: &str) -> u64 {
        self.lock()
            .pending
            .get(peer)
            .map_or(0, |set| set.len() as u64)
    }

    /// The next path to heal for `peer`: parents sort before children.
    pub fn first(&self, peer: &str) -> Option<String> {
        self.lock()
            .pending
            .get(peer)
            .and_then(|set| set.iter().next().cloned())
    }

    pub fn sample(&self, peer: &str, count: usize) -> Vec<String> {
        self.lock()
            .pending
            .get(peer)
            .map(|set| set.iter().take(count).cloned().collect())
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

/// Outcome of healing one path.
enum Healed {
    Done {
        bytes: u64,
        dir: bool,
    },
    /// The peer's copy wins (split brain); it will heal us instead.
    Rejected,
    Failed,
}

/// Heals `peer` (an index into the volume's peers) whenever it is up and
/// has missed changes, until the volume stops. Runs on its own thread:
/// brick reads are blocking.
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
        info!(volume = %volume.name(), peer = %name, pending = total, "heal started");
        volume.stats().heal_running(&name, true);
        let started = Instant::now();
        let mut limit = RateLimit::new(volume.heal_rate());
        let mut healed = 0u64;
        let mut bytes = 0u64;
        let mut last_report = Instant::now();
        let mut failed = false;
        while let Some(path) = volume.log().first(&name) {
            if volume.stopping() || !volume.peer_up(peer) {
                failed = true;
                break;
            }
            match heal_path(&volume, peer, &path) {
                Healed::Done { bytes: sent, dir } => {
                    volume.log().resolve(&name, &path);
                    if dir {
                        // The peer's directory may lack any of its
                        // children (a renamed tree, say): heal them too.
                        if let Ok(children) = volume.brick().children(&path) {
                            for child in children {
                                volume.log().record(&name, &brick::join(&path, &child));
                            }
                        }
                    }
                    healed += 1;
                    bytes += sent;
                    volume.stats().healed(&name);
                    std::thread::sleep(limit.charge(sent));
                }
                Healed::Rejected => volume.log().resolve(&name, &path),
                Healed::Failed => {
                    failed = true;
                    break;
                }
            }
            if last_report.elapsed() >= Duration::from_secs(2) {
                let remaining = volume.log().pending(&name);
                info!(volume = %volume.name(), peer = %name, healed, remaining, "heal progress");
                let _ = volume.call_peer(peer, Request::HealProgress { remaining });
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

fn heal_path(volume: &Volume, peer: usize, path: &str) -> Healed {
    // Capture and enqueue under the apply lock, so the entry reaches the
    // peer in order with the writes around it.
    let replies = {
        let _order = volume.apply_lock();
        let mut replies = Vec::new();
        let mut bytes = 0u64;
        let mut dir = false;
        let mut complete = true;
        let captured = volume.brick().capture(path, MAX_CHUNK, &mut |entry| {
            if let brick::Entry::File { data, .. } = &entry {
                bytes += data.len() as u64;
            }
            dir |= matches!(entry, brick::Entry::Dir { .. });
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
        if let Err(error) = captured {
            warn!(volume = %volume.name(), path, %error, "cannot read a path to heal");
            return Healed::Failed;
        }
        if !complete {
            // The peer went away or its queue is full: part of the entry
            // was not sent, so the path stays pending.
            return Healed::Failed;
        }
        (replies, bytes, dir)
    };
    let (replies, bytes, dir) = replies;
    if replies.is_empty() {
        return Healed::Failed;
    }
    for reply in replies {
        match volume.wait_reply(reply) {
            Some(Response::Ok) => {}
            Some(Response::Rejected) => return Healed::Rejected,
            Some(other) => {
                warn!(volume = %volume.name(), path, reply = ?other, "peer refused a heal");
                return Healed::Failed;
            }
            None => return Healed::Failed,
        }
    }
    Healed::Done { bytes, dir }
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
    fn the_rate_limit_spreads_bytes_over_time() {
        let mut limit = RateLimit::new(1_000_000);
        let wait = limit.charge(500_000);
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500));
    }
}
