//! Write-behind for FUSE writes: a write is applied to the local brick and
//! queued (in order) to the peers, and the FUSE call returns without
//! waiting for their answers, so a sequential writer does not wait one
//! round trip per block (GlusterFS's write-behind does the same). The
//! quorum of each write is still counted; `flush` (every close) and
//! `fsync` wait for every earlier write of the inode and report the first
//! missed quorum, so `fsync` returns only when a quorum holds every
//! earlier write durably.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
};

use super::replica::{Behind, Volume};

/// At most this many writes of one inode wait for their peers' answers
/// before a write waits for the oldest.
const WINDOW_WRITES: usize = 64;
/// At most this many bytes of one inode's writes wait so (the peers'
/// queues hold at most this much per writing inode).
const WINDOW_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug, Default)]
struct Pending {
    writes: VecDeque<(Behind, u64)>,
    bytes: u64,
    /// The first missed quorum not yet reported.
    error: Option<i32>,
}

/// Writes whose quorum is still being counted, per inode.
#[derive(Debug)]
pub struct WriteBehind {
    volume: Arc<Volume>,
    inodes: Mutex<HashMap<u64, Pending>>,
}

impl WriteBehind {
    pub fn new(volume: Arc<Volume>) -> WriteBehind {
        WriteBehind {
            volume,
            inodes: Mutex::new(HashMap::new()),
        }
    }

    fn inodes(&self) -> MutexGuard<'_, HashMap<u64, Pending>> {
        // Each critical section leaves the map consistent.
        self.inodes
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Queues the quorum count of a write of `bytes` to `ino`; waits for
    /// the oldest writes beyond the window (and collects those already
    /// counted), keeping a missed quorum for the next flush or fsync.
    pub fn queue(&self, ino: u64, behind: Behind, bytes: u64) {
        let mut settled = Vec::new();
        {
            let mut inodes = self.inodes();
            let pending = inodes.entry(ino).or_default();
            pending.writes.push_back((behind, bytes));
            pending.bytes += bytes;
            while let Some((oldest, _)) = pending.writes.front() {
                let over = pending.writes.len() > WINDOW_WRITES || pending.bytes > WINDOW_BYTES;
                if !over && !oldest.is_finished() {
                    break;
                }
                if let Some((oldest, size)) = pending.writes.pop_front() {
                    pending.bytes -= size;
                    settled.push(oldest);
                }
            }
        }
        // Waited for outside the map's lock: other inodes go on meanwhile.
        let mut first_error = None;
        for behind in settled {
            if let Err(errno) = self.volume.wait_behind(behind) {
                first_error.get_or_insert(errno);
            }
        }
        if let Some(errno) = first_error {
            self.inodes()
                .entry(ino)
                .or_default()
                .error
                .get_or_insert(errno);
        }
    }

    /// Waits for every write of `ino` still being counted; the first
    /// missed quorum since the last drain, if any.
    pub fn drain(&self, ino: u64) -> Result<(), i32> {
        let Some(pending) = self.inodes().remove(&ino) else {
            return Ok(());
        };
        let mut first_error = pending.error;
        for (behind, _) in pending.writes {
            if let Err(errno) = self.volume.wait_behind(behind) {
                first_error.get_or_insert(errno);
            }
        }
        match first_error {
            Some(errno) => Err(errno),
            None => Ok(()),
        }
    }
}
