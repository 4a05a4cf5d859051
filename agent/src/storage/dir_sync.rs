//! Directory syncs of one brick, shared and started early.
//!
//! A directory `fsync` makes the entries changed before it durable. Two
//! things make it cheaper without weakening that:
//!
//! - Group commit: a sync that *started* after a change was applied has
//!   it on disk once it returns. So a request whose changes an earlier,
//!   still running or finished, sync already covers waits for that sync
//!   instead of running its own (several writers syncing one directory,
//!   or a request meeting the early sync below).
//! - Early start: when the last change to a directory was followed by a
//!   sync request before the next change (delete + `fsyncdir`, a
//!   database's or mail server's create + rename + `fsyncdir`), the next
//!   change to it starts a sync at once, while the change still travels
//!   to the peers; the request that follows finds it running or done.
//!   A workload that stops syncing wastes at most one sync.
//!
//! Changes are numbered in the order they are applied to the brick
//! (every change that may touch a directory's entries or metadata passes
//! [`DirSyncs::changed`] after it is applied). A sync covers every change
//! numbered at or below the count when it started. Only directories that
//! were synced are tracked (at most [`TRACKED`]); for any other, every
//! change so far counts, so a first request always syncs. A rename
//! forgets everything (a path may now name another directory).

use std::{
    collections::HashMap,
    io,
    sync::{Condvar, Mutex, MutexGuard},
};

/// Directories tracked at most; beyond, the table starts over (which only
/// costs syncs that could have been shared).
const TRACKED: usize = 4096;

#[derive(Debug)]
struct Dir {
    /// The number of the last change to this directory.
    changed: u64,
    /// Every change numbered at or below is durable.
    synced: u64,
    /// A sync is running and covers changes up to this number.
    running: Option<u64>,
    /// The last change was followed by a sync request: start the sync
    /// at the next change.
    followed: bool,
}

#[derive(Debug)]
struct State {
    /// Changes counted so far (from 1: a first request never counts as
    /// covered).
    count: u64,
    /// Bumped when the table is dropped: a sync started before does not
    /// record what it covered.
    epoch: u64,
    dirs: HashMap<String, Dir>,
}

/// The directory syncs of one brick.
#[derive(Debug)]
pub struct DirSyncs {
    state: Mutex<State>,
    finished: Condvar,
}

impl Default for DirSyncs {
    fn default() -> DirSyncs {
        DirSyncs {
            state: Mutex::new(State {
                count: 1,
                epoch: 0,
                dirs: HashMap::new(),
            }),
            finished: Condvar::new(),
        }
    }
}

/// The directories a change to `paths` may alter: each path (a directory
/// whose mode or attributes change) and its parent (whose entries change).
fn touched<'a>(paths: &'a [&'a str]) -> impl Iterator<Item = String> + 'a {
    paths
        .iter()
        .flat_map(|path| [(*path).to_owned(), super::brick::parent(path).to_owned()])
}

impl DirSyncs {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the table consistent.
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// A change to `paths` was applied to the brick (or failed part way:
    /// counted all the same). Returns the directories whose sync should
    /// start now (see the module comment).
    pub fn changed(&self, paths: &[&str], rename: bool) -> Vec<String> {
        let mut state = self.lock();
        state.count += 1;
        if rename {
            state.dirs.clear();
            state.epoch += 1;
            return Vec::new();
        }
        let count = state.count;
        let mut early = Vec::new();
        for dir in touched(paths) {
            if let Some(tracked) = state.dirs.get_mut(&dir) {
                tracked.changed = count;
                if std::mem::take(&mut tracked.followed) {
                    early.push(dir);
                }
            }
        }
        early
    }

    /// What a sync of `dir` requested now must cover: its last change
    /// (every change so far when it is not tracked).
    pub fn needed(&self, dir: &str) -> u64 {
        let state = self.lock();
        state
            .dirs
            .get(dir)
            .map_or(state.count, |tracked| tracked.changed)
    }

    /// Makes the changes to `dir` up to `needed` durable: returns at once
    /// when a finished sync covered them, waits for a running one that
    /// does, else runs `sync` (which opens the directory and syncs it).
    /// `requested`: a sync someone waits for (an early one is not), which
    /// makes the next change start one early.
    pub fn sync(
        &self,
        dir: &str,
        needed: u64,
        requested: bool,
        sync: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        let mut state = self.lock();
        loop {
            if !state.dirs.contains_key(dir) && state.dirs.len() >= TRACKED {
                state.dirs.clear();
                state.epoch += 1;
            }
            let count = state.count;
            let tracked = state.dirs.entry(dir.to_owned()).or_insert(Dir {
                changed: count,
                synced: 0,
                running: None,
                followed: false,
            });
            if requested {
                tracked.followed = true;
            }
            if tracked.synced >= needed {
                return Ok(());
            }
            if tracked.running.is_some() {
                // Covering or not, it is waited for: then either it
                // covered these changes, or this request runs its own.
                state = self
                    .finished
                    .wait(state)
                    .unwrap_or_else(|poison| poison.into_inner());
                continue;
            }
            // Every change counted so far is applied: a sync starting now
            // covers them all.
            tracked.running = Some(count);
            let epoch = state.epoch;
            drop(state);
            let result = sync();
            let mut state = self.lock();
            if state.epoch == epoch {
                if let Some(tracked) = state.dirs.get_mut(dir) {
                    tracked.running = None;
                    if result.is_ok() {
                        tracked.synced = tracked.synced.max(count);
                    }
                }
            }
            drop(state);
            self.finished.notify_all();
            return result;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        sync::{
            atomic::{AtomicUsize, Ordering},
            mpsc, Arc,
        },
        thread,
        time::Duration,
    };

    fn counted(syncs: &AtomicUsize) -> impl FnOnce() -> io::Result<()> + '_ {
        move || {
            syncs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn a_finished_sync_covers_the_changes_before_it_and_not_those_after() {
        let syncs = AtomicUsize::new(0);
        let dirs = DirSyncs::default();
        // Untracked: the first request syncs.
        dirs.changed(&["d/a"], false);
        let needed = dirs.needed("d");
        dirs.sync("d", needed, true, counted(&syncs)).unwrap();
        assert_eq!(syncs.load(Ordering::SeqCst), 1);
        // Nothing changed since: covered.
        dirs.sync("d", dirs.needed("d"), true, counted(&syncs))
            .unwrap();
        assert_eq!(syncs.load(Ordering::SeqCst), 1);
        // A change in d (an entry, or d's own mode) needs a new sync.
        dirs.changed(&["d/b"], false);
        dirs.sync("d", dirs.needed("d"), true, counted(&syncs))
            .unwrap();
        assert_eq!(syncs.load(Ordering::SeqCst), 2);
        dirs.changed(&["d"], false);
        dirs.sync("d", dirs.needed("d"), true, counted(&syncs))
            .unwrap();
        assert_eq!(syncs.load(Ordering::SeqCst), 3);
        // A change elsewhere does not.
        dirs.changed(&["e/x"], false);
        dirs.sync("d", dirs.needed("d"), true, counted(&syncs))
            .unwrap();
        assert_eq!(syncs.load(Ordering::SeqCst), 3);
        // An untracked directory always syncs.
        dirs.sync("e", dirs.needed("e"), true, counted(&syncs))
            .unwrap();
        assert_eq!(syncs.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn a_rename_forgets_what_was_synced() {
        let syncs = AtomicUsize::new(0);
        let dirs = DirSyncs::default();
        dirs.sync("d", dirs.needed("d"), true, counted(&syncs))
            .unwrap();
        dirs.changed(&["x", "y"], true);
        // "d" may now name another directory.
        dirs.sync("d", dirs.needed("d"), true, counted(&syncs))
            .unwrap();
        assert_eq!(syncs.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_failed_sync_covers_nothing() {
        let syncs = AtomicUsize::new(0);
        let dirs = DirSyncs::default();
        let failed = dirs.sync("d", dirs.needed("d"), true, || {
            Err(io::Error::from_raw_os_error(libc::EIO))
        });
        assert_eq!(failed.unwrap_err().raw_os_error(), Some(libc::EIO));
        dirs.sync("d", dirs.needed("d"), true, counted(&syncs))
            .unwrap();
        assert_eq!(syncs.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_sync_follows_a_change_early_only_after_a_requested_sync() {
        let dirs = DirSyncs::default();
        dirs.changed(&["d/a"], false);
        dirs.sync("d", dirs.needed("d"), true, || Ok(())).unwrap();
        // The change after a requested sync starts one, once.
        assert_eq!(dirs.changed(&["d/b"], false), vec!["d".to_owned()]);
        assert!(dirs.changed(&["d/c"], false).is_empty());
        // An early sync does not make the next change start another.
        dirs.sync("d", dirs.needed("d"), false, || Ok(())).unwrap();
        assert!(dirs.changed(&["d/e"], false).is_empty());
    }

    /// A request whose changes a running sync covers waits for it and runs
    /// none of its own; a request with a later change runs its own after.
    #[test]
    fn requests_share_a_running_sync_that_covers_them() {
        let dirs = Arc::new(DirSyncs::default());
        let syncs = Arc::new(AtomicUsize::new(0));
        dirs.sync("d", dirs.needed("d"), true, || Ok(())).unwrap();
        dirs.changed(&["d/a"], false);
        let (started_tx, started) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let first = {
            let (dirs, syncs) = (Arc::clone(&dirs), Arc::clone(&syncs));
            thread::spawn(move || {
                dirs.sync("d", dirs.needed("d"), false, || {
                    syncs.fetch_add(1, Ordering::SeqCst);
                    started_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                    Ok(())
                })
            })
        };
        started.recv().unwrap();
        // Covered by the running sync (it started after d/a).
        let covered = {
            let (dirs, syncs) = (Arc::clone(&dirs), Arc::clone(&syncs));
            let needed = dirs.needed("d");
            thread::spawn(move || {
                dirs.sync("d", needed, true, || {
                    syncs.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                })
            })
        };
        // A change after it started: not covered.
        dirs.changed(&["d/b"], false);
        let later = {
            let (dirs, syncs) = (Arc::clone(&dirs), Arc::clone(&syncs));
            let needed = dirs.needed("d");
            thread::spawn(move || {
                dirs.sync("d", needed, true, || {
                    syncs.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                })
            })
        };
        thread::sleep(Duration::from_millis(100));
        assert!(!covered.is_finished(), "waits for the running sync");
        assert!(!later.is_finished());
        assert_eq!(syncs.load(Ordering::SeqCst), 1);
        release.send(()).unwrap();
        first.join().unwrap().unwrap();
        covered.join().unwrap().unwrap();
        later.join().unwrap().unwrap();
        // The first sync, and one more for d/b.
        assert_eq!(syncs.load(Ordering::SeqCst), 2);
    }
}
