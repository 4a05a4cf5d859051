//! What the kernel of this node's mount caches (attributes, names, absent
//! names, file pages) and how it learns that a change it did not see made
//! that stale: a peer's change applied to this brick, or a heal.
//!
//! The kernel keeps attributes for `attr_timeout` and names for
//! `entry_timeout`/`negative_timeout` without asking (GlusterFS's FUSE
//! mount does the same with 1 s). A change this mount makes goes through
//! the kernel, which updates its own cache. A change from elsewhere is
//! followed by an invalidation (fuser's `Notifier`: `inval_inode`,
//! `inval_entry`), sent before the peer is answered, so a change
//! acknowledged on one node is read fresh on every other node's mount.
//!
//! The table here holds, per inode the kernel knows, its brick path and
//! how many lookups the kernel holds (every entry reply adds one, FORGET
//! gives them back, as the kernel counts them): an inode or directory the
//! kernel does not hold needs no invalidation, and its path is dropped
//! when the kernel forgets it.
//!
//! An entry invalidation takes the directory's lock in the kernel. A
//! change this mount is making in that directory holds the lock while it
//! waits for the peers, and a peer may be waiting for our answer to its
//! own change in the same directory: so the invalidation runs on its own
//! thread, and the answer waits for it only when no local change holds
//! the directory, and at most [`INVALIDATION_WAIT`].

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, OnceLock,
    },
    time::Duration,
};

use fuser::{INodeNo, Notifier};
use tracing::debug;

use super::brick::{self, Brick};

/// Longest wait for the kernel to drop what a peer's change made stale
/// before the peer is answered (see the module comment).
pub const INVALIDATION_WAIT: Duration = Duration::from_millis(200);

/// How long the kernel may cache, per volume (see `config::storage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub attr: Duration,
    pub entry: Duration,
    pub negative: Duration,
}

impl Default for Timeouts {
    /// No caching (what tests of the replica logic alone use).
    fn default() -> Timeouts {
        Timeouts {
            attr: Duration::ZERO,
            entry: Duration::ZERO,
            negative: Duration::ZERO,
        }
    }
}

/// A file's identity and version as the brick shows it: unchanged means
/// the kernel's cached pages of it are still right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    pub fn of(meta: &fs::Metadata) -> Stamp {
        Stamp {
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

#[derive(Debug, Default)]
struct Known {
    /// None once the path was removed while the kernel still held it.
    path: Option<String>,
    lookups: u64,
    /// The file as it was when last opened through this mount.
    opened: Option<Stamp>,
}

/// One thing for the kernel to drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// Attributes, and pages from `offset` (`len` 0: to the end; offset
    /// -1: attributes only).
    Inode { ino: u64, offset: i64, len: i64 },
    /// The name (positive or negative) in directory `parent`.
    Entry { parent: u64, name: String },
}

/// What a change made stale in the kernel's cache.
#[derive(Debug, Default)]
pub struct Stale(Vec<Invalidation>);

impl Stale {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn items(&self) -> &[Invalidation] {
        &self.0
    }
}

/// The brick inodes at some paths before a change (see
/// [`KernelCache::before`]).
#[derive(Debug)]
pub struct Before(Vec<(String, Option<u64>)>);

/// This node's mount's view of the kernel cache.
#[derive(Debug)]
pub struct KernelCache {
    /// The brick root's own inode number (FUSE's root is 1).
    root_ino: u64,
    timeouts: Timeouts,
    inodes: Mutex<HashMap<u64, Known>>,
    /// Directories a change through this mount is in (the kernel holds
    /// their lock until it is answered), with how many such changes.
    busy_dirs: Mutex<HashMap<u64, usize>>,
    notifier: OnceLock<Notifier>,
    pub invalidations: AtomicU64,
    pub invalidations_unwaited: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each critical section leaves its map consistent.
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// Marks directories busy while a change through this mount is in them.
#[derive(Debug)]
pub struct BusyDirs<'a> {
    cache: &'a KernelCache,
    dirs: Vec<u64>,
}

impl Drop for BusyDirs<'_> {
    fn drop(&mut self) {
        let mut busy = lock(&self.cache.busy_dirs);
        for dir in &self.dirs {
            if let Some(count) = busy.get_mut(dir) {
                *count -= 1;
                if *count == 0 {
                    busy.remove(dir);
                }
            }
        }
    }
}

impl KernelCache {
    pub fn new(root_ino: u64, timeouts: Timeouts) -> KernelCache {
        let mut inodes = HashMap::new();
        inodes.insert(
            INodeNo::ROOT.0,
            Known {
                path: Some(String::new()),
                lookups: 1,
                opened: None,
            },
        );
        KernelCache {
            root_ino,
            timeouts,
            inodes: Mutex::new(inodes),
            busy_dirs: Mutex::new(HashMap::new()),
            notifier: OnceLock::new(),
            invalidations: AtomicU64::new(0),
            invalidations_unwaited: AtomicU64::new(0),
        }
    }

    /// For `brick`'s root (no caching, no mount: unit tests).
    pub fn for_brick(brick: &Brick) -> std::io::Result<KernelCache> {
        Ok(KernelCache::new(
            fs::metadata(brick.root())?.ino(),
            Timeouts::default(),
        ))
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// Invalidations reach the kernel from now on (called once mounted).
    pub fn set_notifier(&self, notifier: Notifier) {
        let _ = self.notifier.set(notifier);
    }

    /// The FUSE inode number of a brick inode (the brick root and FUSE's
    /// root 1 swap places).
    pub fn fuse_ino(&self, st_ino: u64) -> u64 {
        if st_ino == self.root_ino {
            INodeNo::ROOT.0
        } else if st_ino == INodeNo::ROOT.0 {
            self.root_ino
        } else {
            st_ino
        }
    }

    /// The brick path of an inode the kernel holds.
    pub fn path(&self, ino: u64) -> Option<String> {
        lock(&self.inodes).get(&ino).and_then(|k| k.path.clone())
    }

    /// `ino` is at `path` (seen by a stat).
    pub fn remember(&self, ino: u64, path: &str) {
        let mut inodes = lock(&self.inodes);
        let known = inodes.entry(ino).or_default();
        if known.path.as_deref() != Some(path) {
            known.path = Some(path.to_owned());
        }
    }

    /// An entry reply for `ino` is about to be sent: the kernel holds one
    /// more lookup of it (counted before the reply, so never too few).
    pub fn looked_up(&self, ino: u64, path: &str) {
        let mut inodes = lock(&self.inodes);
        let known = inodes.entry(ino).or_default();
        known.lookups += 1;
        if known.path.as_deref() != Some(path) {
            known.path = Some(path.to_owned());
        }
    }

    /// FORGET: the kernel gives back `n` lookups of `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == INodeNo::ROOT.0 {
            return;
        }
        let mut inodes = lock(&self.inodes);
        if let Some(known) = inodes.get_mut(&ino) {
            known.lookups = known.lookups.saturating_sub(n);
            if known.lookups == 0 {
                inodes.remove(&ino);
            }
        }
    }

    /// Whether the kernel may cache anything about `ino`.
    pub fn held(&self, ino: u64) -> bool {
        lock(&self.inodes).get(&ino).is_some_and(|k| k.lookups > 0)
    }

    /// How many inodes the kernel holds (for tests and metrics).
    pub fn held_count(&self) -> usize {
        lock(&self.inodes)
            .values()
            .filter(|k| k.lookups > 0)
            .count()
    }

    /// `from` was renamed to `to`: paths at and below them follow.
    pub fn renamed(&self, from: &str, to: &str) {
        let mut inodes = lock(&self.inodes);
        let to_prefix = format!("{to}/");
        let from_prefix = format!("{from}/");
        for known in inodes.values_mut() {
            let Some(path) = known.path.as_mut() else {
                continue;
            };
            if path == to || path.starts_with(&to_prefix) {
                known.path = None;
            } else if path == from {
                *path = to.to_owned();
            } else if let Some(rest) = path.strip_prefix(&from_prefix) {
                *path = format!("{to}/{rest}");
            }
        }
    }

    /// `rel` was removed: an inode still held there has no path.
    pub fn removed(&self, rel: &str) {
        for known in lock(&self.inodes).values_mut() {
            if known.path.as_deref() == Some(rel) {
                known.path = None;
            }
        }
    }

    /// Records the file `ino` as opened now; whether its pages cached by
    /// the kernel are still right (it is unchanged since the last open).
    pub fn opened(&self, ino: u64, stamp: Stamp) -> bool {
        let mut inodes = lock(&self.inodes);
        let Some(known) = inodes.get_mut(&ino) else {
            return false;
        };
        let unchanged = known.opened == Some(stamp);
        known.opened = Some(stamp);
        unchanged
    }

    /// Marks `dirs` busy (see the module comment) until the guard drops.
    pub fn busy(&self, dirs: &[u64]) -> BusyDirs<'_> {
        let mut busy = lock(&self.busy_dirs);
        for dir in dirs {
            *busy.entry(*dir).or_default() += 1;
        }
        BusyDirs {
            cache: self,
            dirs: dirs.to_vec(),
        }
    }

    fn brick_ino(&self, brick: &Brick, rel: &str) -> Option<u64> {
        fs::symlink_metadata(brick.abs(rel))
            .ok()
            .map(|meta| self.fuse_ino(meta.ino()))
    }

    /// The inodes at `paths` before a change (under the apply lock).
    pub fn before(&self, brick: &Brick, paths: &[&str]) -> Before {
        Before(
            paths
                .iter()
                .map(|path| ((*path).to_owned(), self.brick_ino(brick, path)))
                .collect(),
        )
    }

    /// What a change made stale, from the inodes at its paths before and
    /// now (under the apply lock). `range`: the bytes an in-place change
    /// wrote (None: the whole file).
    pub fn stale(&self, brick: &Brick, before: Before, range: Option<(u64, u64)>) -> Stale {
        let mut out = Vec::new();
        for (path, old) in before.0 {
            let new = self.brick_ino(brick, &path);
            if old.is_some() && old == new {
                let ino = old.unwrap_or_default();
                if self.held(ino) {
                    let (offset, len) = range.map_or((0, 0), |(offset, len)| {
                        (
                            i64::try_from(offset).unwrap_or(i64::MAX),
                            i64::try_from(len.max(1)).unwrap_or(i64::MAX),
                        )
                    });
                    out.push(Invalidation::Inode { ino, offset, len });
                }
                continue;
            }
            // A name appeared, went, or now names another inode.
            if new.is_none() {
                self.removed(&path);
            }
            let dir = brick::parent(&path);
            if let Some(parent) = self.brick_ino(brick, dir).filter(|p| self.held(*p)) {
                let name = path.rsplit('/').next().unwrap_or(&path).to_owned();
                out.push(Invalidation::Entry { parent, name });
                out.push(Invalidation::Inode {
                    ino: parent,
                    offset: -1,
                    len: 0,
                });
            }
            for ino in [old, new].into_iter().flatten() {
                if self.held(ino) {
                    out.push(Invalidation::Inode {
                        ino,
                        offset: 0,
                        len: 0,
                    });
                }
            }
        }
        Stale(out)
    }

    /// Keeps the path table right after a change applied here from
    /// elsewhere (this mount's own changes update it in `fs.rs`; removed
    /// names are dropped by [`KernelCache::stale`]). Before `stale`.
    pub fn follow(&self, op: &brick::Op) {
        if let brick::Op::Rename { from, to, .. } = op {
            self.renamed(from, to);
        }
    }

    /// Whether an entry invalidation of `stale` is in a directory a
    /// change through this mount holds.
    fn in_busy_dir(&self, stale: &Stale) -> bool {
        let busy = lock(&self.busy_dirs);
        !busy.is_empty()
            && stale.0.iter().any(|item| match item {
                Invalidation::Entry { parent, .. } => busy.contains_key(parent),
                Invalidation::Inode { .. } => false,
            })
    }

    /// Tells the kernel (blocking; may wait for a directory's lock).
    fn send(&self, stale: &Stale) {
        let Some(notifier) = self.notifier.get() else {
            return;
        };
        for item in &stale.0 {
            let result = match item {
                Invalidation::Inode { ino, offset, len } => {
                    notifier.inval_inode(INodeNo(*ino), *offset, *len)
                }
                Invalidation::Entry { parent, name } => {
                    notifier.inval_entry(INodeNo(*parent), std::ffi::OsStr::new(name))
                }
            };
            self.invalidations.fetch_add(1, Ordering::Relaxed);
            if let Err(error) = result {
                // Unmounted meanwhile, or the kernel forgot it already.
                debug!(?item, %error, "kernel cache invalidation not delivered");
            }
        }
    }

    /// Tells the kernel what `stale` lists before returning, unless that
    /// takes longer than [`INVALIDATION_WAIT`] or a change through this
    /// mount holds one of its directories (then it is delivered as soon
    /// as the kernel lets it).
    pub async fn invalidate(self: &Arc<Self>, stale: Stale) {
        if stale.is_empty() || self.notifier.get().is_none() {
            return;
        }
        let wait = !self.in_busy_dir(&stale);
        let cache = Arc::clone(self);
        let task = tokio::task::spawn_blocking(move || cache.send(&stale));
        if !wait || tokio::time::timeout(INVALIDATION_WAIT, task).await.is_err() {
            self.invalidations_unwaited.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Tells the kernel without waiting (heal, where the replica does not
    /// serve reads until it is current).
    pub fn invalidate_detached(self: &Arc<Self>, runtime: &tokio::runtime::Handle, stale: Stale) {
        if stale.is_empty() || self.notifier.get().is_none() {
            return;
        }
        let cache = Arc::clone(self);
        runtime.spawn_blocking(move || cache.send(&stale));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brick(test: &str) -> (Brick, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("farol-kcache-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        (Brick::open(&dir).unwrap(), dir)
    }

    #[test]
    fn lookups_are_counted_and_forgotten_as_the_kernel_does() {
        let cache = KernelCache::new(99, Timeouts::default());
        assert!(cache.held(INodeNo::ROOT.0), "the root is always held");
        cache.looked_up(7, "a");
        cache.looked_up(7, "a");
        assert!(cache.held(7));
        cache.forget(7, 1);
        assert!(cache.held(7));
        assert_eq!(cache.path(7).as_deref(), Some("a"));
        cache.forget(7, 1);
        assert!(!cache.held(7));
        assert_eq!(cache.path(7), None, "a forgotten inode's path is dropped");
        cache.forget(INodeNo::ROOT.0, 5);
        assert!(cache.held(INodeNo::ROOT.0));
    }

    #[test]
    fn renames_move_paths_below_and_drop_the_replaced_ones() {
        let cache = KernelCache::new(99, Timeouts::default());
        cache.looked_up(2, "d");
        cache.looked_up(3, "d/f");
        cache.looked_up(4, "e");
        cache.renamed("d", "e");
        assert_eq!(cache.path(2).as_deref(), Some("e"));
        assert_eq!(cache.path(3).as_deref(), Some("e/f"));
        assert_eq!(cache.path(4), None);
        cache.removed("e/f");
        assert_eq!(cache.path(3), None);
        assert!(cache.held(3), "still held by the kernel, without a path");
    }

    #[test]
    fn only_what_the_kernel_holds_is_invalidated() {
        let (brick, dir) = brick("stale");
        let root_ino = fs::metadata(&dir).unwrap().ino();
        let cache = KernelCache::new(root_ino, Timeouts::default());
        fs::create_dir(dir.join("d")).unwrap();
        fs::write(dir.join("d/f"), b"old").unwrap();
        let f_ino = fs::metadata(dir.join("d/f")).unwrap().ino();
        let d_ino = fs::metadata(dir.join("d")).unwrap().ino();

        // The kernel holds nothing below the root: a write there costs
        // nothing.
        let before = cache.before(&brick, &["d/f"]);
        fs::write(dir.join("d/f"), b"new").unwrap();
        assert!(cache.stale(&brick, before, Some((0, 3))).is_empty());

        // Held: an in-place write invalidates the written range.
        cache.looked_up(d_ino, "d");
        cache.looked_up(f_ino, "d/f");
        let before = cache.before(&brick, &["d/f"]);
        fs::write(dir.join("d/f"), b"newer").unwrap();
        assert_eq!(
            cache.stale(&brick, before, Some((4096, 10))).items(),
            &[Invalidation::Inode {
                ino: f_ino,
                offset: 4096,
                len: 10
            }]
        );

        // A removed name: the entry, the directory's attributes, and the
        // inode (its link count).
        let before = cache.before(&brick, &["d/f"]);
        fs::remove_file(dir.join("d/f")).unwrap();
        let stale = cache.stale(&brick, before, None);
        assert_eq!(
            stale.items(),
            &[
                Invalidation::Entry {
                    parent: d_ino,
                    name: "f".into()
                },
                Invalidation::Inode {
                    ino: d_ino,
                    offset: -1,
                    len: 0
                },
                Invalidation::Inode {
                    ino: f_ino,
                    offset: 0,
                    len: 0
                },
            ]
        );

        // A new name in the root (FUSE inode 1): a negative entry may be
        // cached there.
        let before = cache.before(&brick, &["g"]);
        fs::write(dir.join("g"), b"").unwrap();
        let stale = cache.stale(&brick, before, None);
        assert_eq!(
            stale.items()[0],
            Invalidation::Entry {
                parent: INodeNo::ROOT.0,
                name: "g".into()
            }
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_is_unchanged_only_when_its_stamp_is() {
        let (_brick, dir) = brick("stamp");
        let cache = KernelCache::new(99, Timeouts::default());
        fs::write(dir.join("f"), b"one").unwrap();
        let stamp = Stamp::of(&fs::metadata(dir.join("f")).unwrap());
        assert!(!cache.opened(5, stamp), "an unknown inode is never kept");
        cache.looked_up(5, "f");
        assert!(!cache.opened(5, stamp), "first open: nothing cached yet");
        assert!(cache.opened(5, stamp));
        std::thread::sleep(Duration::from_millis(5));
        fs::write(dir.join("f"), b"two").unwrap();
        let changed = Stamp::of(&fs::metadata(dir.join("f")).unwrap());
        assert!(!cache.opened(5, changed));
        fs::remove_dir_all(&dir).unwrap();
    }
}
