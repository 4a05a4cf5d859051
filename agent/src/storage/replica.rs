//! Quorum replication of one volume: a change is applied to the local
//! brick, sent in order to every peer that is up, and acknowledged only
//! when a quorum of the replica set (this node included) applied it.
//! It waits for every peer that is up (so an acknowledged change is visible
//! through every connected mount); peers that miss a change get it recorded
//! in the change log for heal. A sync, which changes nothing a mount shows,
//! returns once a quorum made it durable (see [`Volume::submit_sync`]).
//!
//! [`Volume`] is shared by the FUSE threads (blocking callers, see
//! [`Volume::submit`]), the peer connections and the heal threads.

use std::{
    collections::BTreeMap,
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Condvar, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use futures_util::{stream::FuturesUnordered, StreamExt};
use tokio::{
    runtime::Handle,
    sync::{mpsc, oneshot},
};
use tracing::{info, warn};

use super::{
    brick::{Brick, Entry, Op},
    dir_sync::DirSyncs,
    heal::ChangeLog,
    kernel_cache::{KernelCache, Stale},
    protocol::{PeerStatus, Request, Response, StatusReport},
};
use crate::config::storage::SplitBrainPolicy;

/// How long a FUSE call waits for this replica to become current.
const CURRENT_WAIT: Duration = Duration::from_secs(15);

/// A request on its way to a peer and where its answer goes.
#[derive(Debug)]
pub struct Outgoing {
    pub body: Request,
    pub reply: oneshot::Sender<Response>,
}

pub type Reply = oneshot::Receiver<Response>;

/// A change applied here and queued for the peers whose quorum is still
/// being counted (see [`Volume::submit_behind`]).
pub type Behind = tokio::task::JoinHandle<Result<(), i32>>;

/// A change queued for the peers: the paths it touches (recorded for a
/// peer that misses it) and where each peer's answer arrives.
#[derive(Debug)]
struct Sent {
    paths: Vec<String>,
    replies: Vec<(usize, Reply)>,
}

/// One other replica of the volume.
#[derive(Debug)]
pub struct Peer {
    pub name: String,
    pub addr: SocketAddr,
    pub(super) tx: mpsc::Sender<Outgoing>,
    up: AtomicBool,
    transitions: AtomicU64,
    healed: AtomicU64,
    heal_running: AtomicBool,
}

/// Counters exported on /metrics and in `heal-info`.
#[derive(Debug, Default)]
pub struct Stats {
    pub writes: AtomicU64,
    pub writes_refused: AtomicU64,
    pub writes_failed: AtomicU64,
    pub split_brains: AtomicU64,
    pub bad_frames: Mutex<BTreeMap<&'static str, u64>>,
    peers: BTreeMap<String, usize>,
}

/// Per-peer views of the counters, for the heal threads.
#[derive(Debug)]
pub struct PeerStats<'a> {
    volume: &'a Volume,
}

impl PeerStats<'_> {
    pub fn healed(&self, peer: &str) {
        if let Some(index) = self.volume.stats.peers.get(peer) {
            self.volume.peers[*index]
                .healed
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn heal_running(&self, peer: &str, running: bool) {
        if let Some(index) = self.volume.stats.peers.get(peer) {
            self.volume.peers[*index]
                .heal_running
                .store(running, Ordering::Relaxed);
        }
    }
}

/// What a volume is made of (see `mod.rs` for how it is built).
#[derive(Debug)]
pub struct VolumeSetup {
    pub name: String,
    pub node: String,
    pub brick: Brick,
    pub quorum: usize,
    pub peers: Vec<(String, SocketAddr)>,
    pub log: ChangeLog,
    pub policy: SplitBrainPolicy,
    pub source: Option<String>,
    pub heal_rate: u64,
    pub timeout: Duration,
    /// What this node's mount's kernel caches (shared with `fs.rs`).
    pub kernel: Arc<KernelCache>,
}

#[derive(Debug)]
pub struct Volume {
    name: String,
    node: String,
    brick: Brick,
    quorum: usize,
    peers: Vec<Peer>,
    log: ChangeLog,
    order: Mutex<()>,
    policy: SplitBrainPolicy,
    source: Option<String>,
    heal_rate: u64,
    timeout: Duration,
    /// Per connected peer: changes it holds that this replica missed.
    remote_pending: Mutex<BTreeMap<String, u64>>,
    stats: Stats,
    runtime: Handle,
    stop: AtomicBool,
    wakeup: (Mutex<bool>, Condvar),
    /// Until peers had a chance to answer, a lone replica does not know
    /// whether it is a minority or just early: it waits.
    started: Instant,
    /// Heal copies on their way to a peer (peer index, path), from their
    /// capture until the peer answered; see [`Volume::begin_stream`].
    streams: Mutex<Vec<InFlightHeal>>,
    kernel: Arc<KernelCache>,
    /// Directory syncs of this brick, shared and started early.
    dir_syncs: Arc<DirSyncs>,
}

/// A heal copy on its way to a peer; see [`Volume::begin_stream`].
#[derive(Debug)]
struct InFlightHeal {
    peer: usize,
    path: String,
    captured_under_lock: bool,
}

/// Where a change applied to this brick came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChangeFrom {
    /// This replica's mount: sent to the peers after any heal copy queued
    /// before it, on the same connections.
    Here,
    /// Another replica: it may also reach the healed peer directly, on
    /// another connection, before this replica's heal copy does.
    Peer,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its data consistent; a panic elsewhere
    // must not take the volume down with it.
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// The errno of an IO error (EIO when it has none).
pub fn errno(error: &io::Error) -> i32 {
    error.raw_os_error().unwrap_or(libc::EIO)
}

impl Volume {
    /// The volume and, per peer, the receiving end of its request queue
    /// (for the connection task).
    pub fn new(
        setup: VolumeSetup,
        runtime: Handle,
    ) -> (Arc<Volume>, Vec<mpsc::Receiver<Outgoing>>) {
        let mut peers = Vec::new();
        let mut receivers = Vec::new();
        let mut stats = Stats::default();
        for (index, (name, addr)) in setup.peers.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel(4096);
            stats.peers.insert(name.clone(), index);
            peers.push(Peer {
                name,
                addr,
                tx,
                up: AtomicBool::new(false),
                transitions: AtomicU64::new(0),
                healed: AtomicU64::new(0),
                heal_running: AtomicBool::new(false),
            });
            receivers.push(rx);
        }
        let volume = Volume {
            name: setup.name,
            node: setup.node,
            brick: setup.brick,
            quorum: setup.quorum,
            peers,
            log: setup.log,
            order: Mutex::new(()),
            policy: setup.policy,
            source: setup.source,
            heal_rate: setup.heal_rate,
            timeout: setup.timeout,
            remote_pending: Mutex::new(BTreeMap::new()),
            stats,
            runtime,
            stop: AtomicBool::new(false),
            wakeup: (Mutex::new(false), Condvar::new()),
            started: Instant::now(),
            streams: Mutex::new(Vec::new()),
            kernel: setup.kernel,
            dir_syncs: Arc::new(DirSyncs::default()),
        };
        (Arc::new(volume), receivers)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn brick(&self) -> &Brick {
        &self.brick
    }

    pub fn log(&self) -> &ChangeLog {
        &self.log
    }

    pub fn kernel_cache(&self) -> &Arc<KernelCache> {
        &self.kernel
    }

    pub fn peers(&self) -> &[Peer] {
        &self.peers
    }

    pub fn peer_name(&self, peer: usize) -> &str {
        &self.peers[peer].name
    }

    pub fn peer_index(&self, name: &str) -> Option<usize> {
        self.stats.peers.get(name).copied()
    }

    pub fn peer_up(&self, peer: usize) -> bool {
        self.peers[peer].up.load(Ordering::Acquire)
    }

    /// The replica that heals `peer` before this one does: the
    /// lowest-named other replica that is up, when its name sorts before
    /// this node's. None: this node heals `peer` first.
    pub fn first_healer(&self, peer: usize) -> Option<usize> {
        (0..self.peers.len())
            .filter(|&other| other != peer && self.peer_up(other))
            .filter(|&other| self.peers[other].name.as_str() < self.node.as_str())
            .min_by(|&a, &b| self.peers[a].name.cmp(&self.peers[b].name))
    }

    pub fn heal_rate(&self) -> u64 {
        self.heal_rate
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn quorum(&self) -> usize {
        self.quorum
    }

    pub fn policy(&self) -> SplitBrainPolicy {
        self.policy
    }

    pub fn source(&self) -> Option<&str> {
        self.source.as_deref()
    }

    pub fn stats(&self) -> PeerStats<'_> {
        PeerStats { volume: self }
    }

    pub fn counters(&self) -> &Stats {
        &self.stats
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake_heal();
    }

    /// Serialises local changes with what is sent to peers, so every
    /// replica applies them in the same order.
    pub fn apply_lock(&self) -> MutexGuard<'_, ()> {
        lock(&self.order)
    }

    pub fn wake_heal(&self) {
        let (flag, cond) = &self.wakeup;
        *lock(flag) = true;
        cond.notify_all();
    }

    pub fn wait_heal_wakeup(&self, max: Duration) {
        let (flag, cond) = &self.wakeup;
        let guard = lock(flag);
        let (mut guard, _) = cond
            .wait_timeout_while(guard, max, |woken| !*woken)
            .unwrap_or_else(|poison| poison.into_inner());
        *guard = false;
    }

    /// Peer connection state changes (called by the connection task).
    pub fn set_peer_up(&self, peer: usize, up: bool, pending_for_us: u64, reason: &str) {
        let p = &self.peers[peer];
        let was = p.up.swap(up, Ordering::AcqRel);
        {
            let mut remote = lock(&self.remote_pending);
            if up {
                remote.insert(p.name.clone(), pending_for_us);
            } else {
                remote.remove(&p.name);
            }
        }
        if was != up {
            p.transitions.fetch_add(1, Ordering::Relaxed);
            if up {
                info!(volume = %self.name, peer = %p.name, addr = %p.addr, reason, missed_here = pending_for_us, "peer up");
                self.wake_heal();
            } else {
                warn!(volume = %self.name, peer = %p.name, addr = %p.addr, reason, "peer down");
            }
        }
    }

    /// A peer says how many changes it still holds for this replica.
    pub fn set_remote_pending(&self, peer: &str, remaining: u64) {
        let mut remote = lock(&self.remote_pending);
        if let Some(count) = remote.get_mut(peer) {
            if *count != 0 && remaining == 0 {
                info!(volume = %self.name, peer, "healed by peer");
            }
            *count = remaining;
        }
    }

    pub fn up_count(&self) -> usize {
        self.peers
            .iter()
            .filter(|p| p.up.load(Ordering::Acquire))
            .count()
    }

    /// Whether writes may go ahead (this side holds a quorum).
    pub fn has_quorum(&self) -> bool {
        self.up_count() + 1 >= self.quorum
    }

    /// Whether the local brick is known to hold every acknowledged change:
    /// enough peers answered and none holds changes this replica missed.
    /// Right after start, every peer gets a chance to say what it holds
    /// for this replica before the quorum alone decides.
    pub fn is_current(&self) -> bool {
        let remote = lock(&self.remote_pending);
        let heard_enough = remote.len() == self.peers.len()
            || (remote.len() + 1 >= self.quorum && self.started.elapsed() > self.timeout * 2);
        heard_enough && remote.values().all(|count| *count == 0)
    }

    /// Waits until the local brick may serve reads. A minority side serves
    /// what it has (it cannot learn better); otherwise it waits for heal.
    pub fn readable(&self) -> bool {
        let deadline = Instant::now() + CURRENT_WAIT;
        loop {
            if self.is_current() {
                return true;
            }
            if !self.has_quorum() && self.started.elapsed() > self.timeout * 2 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Queues `body` for `peer`; None when it is down or its queue is full.
    pub fn send_peer(&self, peer: usize, body: Request) -> Option<Reply> {
        let p = &self.peers[peer];
        if !p.up.load(Ordering::Acquire) {
            return None;
        }
        let (reply, rx) = oneshot::channel();
        p.tx.try_send(Outgoing { body, reply }).ok().map(|()| rx)
    }

    /// Waits (blocking) for a reply; None on timeout or a lost connection.
    pub fn wait_reply(&self, reply: Reply) -> Option<Response> {
        let limit = self.reply_timeout();
        self.runtime
            .block_on(async move { tokio::time::timeout(limit, reply).await.ok()?.ok() })
    }

    /// Sends and waits (blocking).
    pub fn call_peer(&self, peer: usize, body: Request) -> Option<Response> {
        let reply = self.send_peer(peer, body)?;
        self.wait_reply(reply)
    }

    fn reply_timeout(&self) -> Duration {
        (self.timeout * 5).max(Duration::from_secs(10))
    }

    fn missed(&self, peer: usize, paths: &[String]) {
        for path in paths {
            self.log.record(&self.peers[peer].name, path);
        }
    }

    /// Applies `op` here (through `local`, which may use an open file) and
    /// on the peers that are up; succeeds when a quorum applied it, else
    /// an errno.
    /// Blocking: call from FUSE threads, never from the async runtime.
    pub fn submit<T>(
        self: &Arc<Self>,
        op: Op,
        local: impl FnOnce(&Brick) -> io::Result<T>,
    ) -> Result<T, i32> {
        let (value, sent) = self.start(op, local)?;
        let volume = Arc::clone(self);
        self.runtime
            .block_on(async move { volume.settle(sent).await })?;
        Ok(value)
    }

    /// Like [`Volume::submit`], but returns once `op` is applied here and
    /// queued (in order) for the peers: the quorum is counted by the
    /// returned task (write-behind; `fs.rs` waits for it at flush and
    /// fsync, and reports a missed quorum there). Refused at once without
    /// a quorum.
    pub fn submit_behind<T>(
        self: &Arc<Self>,
        op: Op,
        local: impl FnOnce(&Brick) -> io::Result<T>,
    ) -> Result<(T, Behind), i32> {
        let (value, sent) = self.start(op, local)?;
        let volume = Arc::clone(self);
        let behind = self.runtime.spawn(async move { volume.settle(sent).await });
        Ok((value, behind))
    }

    /// Waits (blocking) for a change submitted with
    /// [`Volume::submit_behind`].
    pub fn wait_behind(&self, behind: Behind) -> Result<(), i32> {
        self.runtime.block_on(behind).unwrap_or(Err(libc::EIO))
    }

    /// Makes a file durable on a quorum: the `Fsync` is queued behind every
    /// earlier change to the peers, and the local `sync` runs while they
    /// sync theirs (it changes nothing, so it needs no place in the order;
    /// the disk can commit the three in one journal transaction). Then
    /// `earlier` waits for the quorums of the earlier changes still being
    /// counted (write-behind): their answers arrive meanwhile, so the
    /// peers are waited for once, not once for the writes and once more
    /// for the sync. Succeeds when all of it did. The sync itself is
    /// waited for on a quorum only (see [`Volume::settle_durable`]).
    pub fn submit_sync(
        self: &Arc<Self>,
        op: Op,
        sync: impl FnOnce(&Brick) -> io::Result<()>,
        earlier: impl FnOnce() -> Result<(), i32>,
    ) -> Result<(), i32> {
        let started = self.start(op, |_| Ok(()));
        let local = sync(&self.brick).map_err(|error| errno(&error));
        let earlier = earlier();
        let ((), sent) = started?;
        let volume = Arc::clone(self);
        let quorum = self
            .runtime
            .block_on(async move { volume.settle_durable(sent).await });
        earlier.and(local).and(quorum)
    }

    /// Checks the quorum, applies `op` locally and queues it for every
    /// peer that is up (recording it for the others), under the apply
    /// lock so every replica sees changes in the same order.
    fn start<T>(
        &self,
        op: Op,
        local: impl FnOnce(&Brick) -> io::Result<T>,
    ) -> Result<(T, Sent), i32> {
        if !self.has_quorum() {
            self.stats.writes_refused.fetch_add(1, Ordering::Relaxed);
            return Err(libc::EROFS);
        }
        if !self.readable() {
            self.stats.writes_refused.fetch_add(1, Ordering::Relaxed);
            return Err(libc::EAGAIN);
        }
        let paths: Vec<String> = op.paths().into_iter().map(str::to_owned).collect();
        let _order = self.apply_lock();
        let value = local(&self.brick);
        self.changed_dirs(&op);
        let value = value.map_err(|error| errno(&error))?;
        self.touch_streams(&paths, ChangeFrom::Here);
        let missed: Vec<String> = self
            .peers
            .iter()
            .filter(|p| !p.up.load(Ordering::Acquire))
            .map(|p| p.name.clone())
            .collect();
        let mut body = Some(Request::Apply { op, missed });
        let mut replies = Vec::new();
        let last = self.peers.len().saturating_sub(1);
        for index in 0..self.peers.len() {
            // The last peer takes the body itself (a write's data is
            // copied once less).
            let request = if index == last {
                body.take()
            } else {
                body.clone()
            };
            let Some(request) = request else { break };
            match self.send_peer(index, request) {
                Some(reply) => replies.push((index, reply)),
                None => self.missed(index, &paths),
            }
        }
        Ok((value, Sent { paths, replies }))
    }

    /// Counts the peers' answers: Ok when a quorum applied the change.
    async fn settle(self: Arc<Self>, sent: Sent) -> Result<(), i32> {
        let acked = Arc::clone(&self).collect(sent, usize::MAX).await;
        self.judge(acked)
    }

    /// [`Volume::settle`] for an `Fsync`, which changes nothing a mount
    /// can see: it returns as soon as a quorum of replicas (this one
    /// counted by the caller) made the earlier changes durable, without
    /// waiting for the slowest peer's disk; the other answers are
    /// collected in the background (a failure is logged and counted, as
    /// before: a missed sync records no path, the writes it covers are
    /// recorded themselves). Every earlier change was acknowledged by
    /// every peer that was up already (see [`Volume::submit_sync`]).
    async fn settle_durable(self: Arc<Self>, sent: Sent) -> Result<(), i32> {
        let need = self.quorum - 1;
        let acked = Arc::clone(&self).collect(sent, need).await;
        self.judge(acked)
    }

    fn judge(&self, acked: usize) -> Result<(), i32> {
        let need = self.quorum - 1;
        if acked >= need {
            self.stats.writes.fetch_add(1, Ordering::Relaxed);
            Ok(())
        } else {
            self.stats.writes_failed.fetch_add(1, Ordering::Relaxed);
            warn!(volume = %self.name, acked = acked + 1, quorum = self.quorum, "a change missed its quorum");
            Err(if self.has_quorum() {
                libc::EIO
            } else {
                libc::EROFS
            })
        }
    }

    /// Waits for every peer the change was sent to (as GlusterFS's AFR
    /// does), so a change is visible on every connected replica when it is
    /// acknowledged; a peer that fails or times out is recorded for heal.
    /// Returns how many acknowledged. With `enough` below the number of
    /// peers, returns once that many acknowledged and collects the rest
    /// in the background (see [`Volume::settle_durable`]).
    async fn collect(self: Arc<Self>, sent: Sent, enough: usize) -> usize {
        let limit = self.reply_timeout();
        let Sent { paths, replies } = sent;
        let mut waiting: FuturesUnordered<_> = replies
            .into_iter()
            .map(|(index, reply)| async move {
                let ok = matches!(
                    tokio::time::timeout(limit, reply).await,
                    Ok(Ok(Response::Ok))
                );
                (index, ok)
            })
            .collect();
        let mut acked = 0;
        while acked < enough {
            let Some((index, ok)) = waiting.next().await else {
                break;
            };
            if ok {
                acked += 1;
            } else {
                self.missed(index, &paths);
            }
        }
        if !waiting.is_empty() {
            let volume = Arc::clone(&self);
            tokio::spawn(async move {
                while let Some((index, ok)) = waiting.next().await {
                    if !ok {
                        warn!(volume = %volume.name, peer = %volume.peers[index].name, "a peer failed or missed a change already acknowledged by a quorum");
                        volume.missed(index, &paths);
                    }
                }
            });
        }
        acked
    }

    /// The heal captures `path` for `peer`. Until [`Volume::end_stream`]
    /// (called once the peer answered), a change here that touches `path`
    /// (or a directory above it) records it again for `peer`, so the path
    /// stays pending and is sent again. Two reasons: a large file is
    /// streamed without the apply lock, so its copy may mix states; and a
    /// copy from this replica can reach the peer after a newer change to
    /// the same path sent to it directly by another replica (its own
    /// connection, its own order), which the copy would undo. The chaos
    /// suite found the second: a file acknowledged on two replicas was left
    /// empty on the third by a heal copy taken just after its create.
    pub fn begin_stream(&self, peer: usize, path: &str) {
        let _order = self.apply_lock();
        lock(&self.streams).push(InFlightHeal {
            peer,
            path: path.to_owned(),
            captured_under_lock: false,
        });
    }

    /// [`Volume::begin_stream`] for a copy captured whole under the apply
    /// lock (the caller holds it): changes made here reach the peer after
    /// it on the same connection, so only changes from other replicas
    /// record it again.
    pub fn begin_stream_locked(&self, _order: &MutexGuard<'_, ()>, peer: usize, path: &str) {
        lock(&self.streams).push(InFlightHeal {
            peer,
            path: path.to_owned(),
            captured_under_lock: true,
        });
    }

    /// The heal copy of `path` was answered by `peer` (or given up): later
    /// changes no longer need to record it again. Under the apply lock, so
    /// no change falls between the two.
    pub fn end_stream(&self, peer: usize, path: &str) {
        let _order = self.apply_lock();
        let mut streams = lock(&self.streams);
        if let Some(at) = streams
            .iter()
            .position(|heal| heal.peer == peer && heal.path == path)
        {
            streams.swap_remove(at);
        }
    }

    /// Called under the apply lock for every change: re-records streamed
    /// paths the change touches (see [`Volume::begin_stream`]).
    fn touch_streams(&self, changed: &[String], from: ChangeFrom) {
        let streams = lock(&self.streams);
        if streams.is_empty() {
            return;
        }
        for heal in streams.iter() {
            if heal.captured_under_lock && from == ChangeFrom::Here {
                continue;
            }
            let (peer, streamed) = (&heal.peer, &heal.path);
            let touched = changed.iter().any(|path| {
                path.is_empty()
                    || streamed == path
                    || streamed
                        .strip_prefix(path.as_str())
                        .is_some_and(|rest| rest.starts_with('/'))
            });
            if touched {
                let name = &self.peers[*peer].name;
                self.log.record(name, streamed);
                for path in changed {
                    self.log.record(name, path);
                }
            }
        }
    }

    /// A peer's change, applied here (blocking); what it made stale in
    /// this node's kernel cache is delivered without waiting (the
    /// connection uses [`Volume::apply_remote_stale`] and waits).
    pub fn apply_remote(&self, op: &Op, missed: &[String]) -> Response {
        let (response, stale) = self.apply_remote_stale(op, missed);
        self.kernel.invalidate_detached(&self.runtime, stale);
        response
    }

    /// A peer's change, applied here (blocking), and what it made stale in
    /// this node's kernel cache (to deliver before answering the peer).
    pub fn apply_remote_stale(&self, op: &Op, missed: &[String]) -> (Response, Stale) {
        if let Op::Fsync { path } = op {
            // Changes nothing, so it needs no place in the order: the
            // earlier changes of this connection are applied already, and
            // other changes go on while the disk syncs.
            let result = self.brick.apply(&Op::Fsync { path: path.clone() });
            return (Self::response(result), Stale::default());
        }
        let order = self.apply_lock();
        self.apply_remote_locked(&order, op, missed)
    }

    /// [`Volume::apply_remote_stale`] when the apply lock is free at once;
    /// None when it is taken (or for a sync), and nothing was done. Lets
    /// the connection apply a small change on its own async thread
    /// without ever waiting there for a lock a heal may hold for long.
    pub fn try_apply_remote_stale(&self, op: &Op, missed: &[String]) -> Option<(Response, Stale)> {
        if matches!(op, Op::Fsync { .. }) {
            return None;
        }
        let order = match self.order.try_lock() {
            Ok(order) => order,
            Err(std::sync::TryLockError::Poisoned(poison)) => poison.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(self.apply_remote_locked(&order, op, missed))
    }

    fn apply_remote_locked(
        &self,
        _order: &MutexGuard<'_, ()>,
        op: &Op,
        missed: &[String],
    ) -> (Response, Stale) {
        let before = self.kernel.before(&self.brick, &op.paths());
        let result = self.brick.apply(op);
        self.changed_dirs(op);
        let range = match op {
            Op::Write { offset, data, .. } => Some((*offset, data.len() as u64)),
            _ => None,
        };
        if result.is_ok() {
            self.kernel.follow(op);
        }
        let stale = self.kernel.stale(&self.brick, before, range);
        let paths: Vec<String> = op.paths().into_iter().map(str::to_owned).collect();
        self.touch_streams(&paths, ChangeFrom::Peer);
        for name in missed {
            if name != &self.node && self.peer_index(name).is_some() {
                for path in op.paths() {
                    self.log.record(name, path);
                }
            }
        }
        (Self::response(result), stale)
    }

    /// A peer's sync of `path`: opens it, says so on `opened` (the
    /// connection applies later changes from then on), then syncs it
    /// (blocking). A directory's sync may be shared with one running or
    /// done since its changes (see `dir_sync.rs`).
    pub fn sync_remote(&self, path: &str, opened: oneshot::Sender<()>) -> Response {
        let file = std::fs::File::open(self.brick.abs(path));
        let dir = file
            .as_ref()
            .ok()
            .and_then(|file| file.metadata().ok())
            .is_some_and(|meta| meta.is_dir());
        // What it must cover is fixed in order, before later changes.
        let needed = dir.then(|| self.dir_syncs.needed(path));
        let _ = opened.send(());
        let result = file.and_then(|file| match needed {
            Some(needed) => self.dir_syncs.sync(path, needed, true, || file.sync_all()),
            None => file.sync_all(),
        });
        Self::response(result)
    }

    /// This mount's `fsyncdir` of `rel` on this brick: shared with a sync
    /// running or done since its changes (see `dir_sync.rs`).
    pub fn sync_dir(&self, rel: &str) -> io::Result<()> {
        let needed = self.dir_syncs.needed(rel);
        let abs = self.brick.abs(rel);
        self.dir_syncs
            .sync(rel, needed, true, || std::fs::File::open(&abs)?.sync_all())
    }

    /// Counts a change applied to this brick for the directory syncs (under
    /// the apply lock, so the count follows the order of the brick), and
    /// starts the syncs it asks for: they run while the change travels to
    /// the peers, and are not waited for here.
    fn changed_dirs(&self, op: &Op) {
        let early = self
            .dir_syncs
            .changed(&op.paths(), matches!(op, Op::Rename { .. }));
        for dir in early {
            let syncs = Arc::clone(&self.dir_syncs);
            let abs = self.brick.abs(&dir);
            self.runtime.spawn_blocking(move || {
                let needed = syncs.needed(&dir);
                // A failure records nothing: the request syncs itself.
                let _ = syncs.sync(&dir, needed, false, || {
                    std::fs::File::open(&abs)?.sync_all()
                });
            });
        }
    }

    fn response(result: io::Result<()>) -> Response {
        match result {
            Ok(()) => Response::Ok,
            Err(error) => Response::Errno(errno(&error)),
        }
    }

    /// A peer heals `path` here (blocking). When this replica changed the
    /// same path while the peer was away, that is a split brain: the
    /// policy picks the copy that wins.
    pub fn heal_from(&self, peer: &str, path: &str, entry: &Entry) -> Response {
        let _order = self.apply_lock();
        if self.log.contains(peer, path) {
            let mine = match self.brick.meta(path) {
                Ok(meta) => meta.mtime_ns,
                Err(_) => i64::MIN,
            };
            let theirs = entry.mtime_ns();
            let peer_wins = match (self.policy, self.source.as_deref()) {
                (SplitBrainPolicy::Source, Some(source)) if source == peer => true,
                (SplitBrainPolicy::Source, Some(source)) if source == self.node => false,
                _ => theirs > mine || (theirs == mine && peer < self.node.as_str()),
            };
            self.stats.split_brains.fetch_add(1, Ordering::Relaxed);
            let winner = if peer_wins { peer } else { self.node.as_str() };
            warn!(
                volume = %self.name, path, peer, winner, policy = ?self.policy,
                mtime_here = mine, mtime_peer = theirs,
                "split brain: both sides changed this path apart; resolved by policy"
            );
            if !peer_wins {
                return Response::Rejected;
            }
            self.log.resolve(peer, path);
        }
        let tmp = self.brick.state_dir().join(format!("heal-from-{peer}.tmp"));
        // What the kernel of this node's mount may hold of the path (and,
        // for a directory, of the names the heal removes from it).
        let changes_path = match entry {
            Entry::File { last, .. } => *last,
            _ => true,
        };
        let mut paths = Vec::new();
        if changes_path {
            paths.push(path.to_owned());
            if let Entry::Dir { children, .. } = entry {
                if let Ok(names) = self.brick.children(path) {
                    paths.extend(
                        names
                            .iter()
                            .filter(|name| children.binary_search(name).is_err())
                            .map(|name| super::brick::join(path, name)),
                    );
                }
            }
        }
        let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
        let before = self.kernel.before(&self.brick, &refs);
        let installed = self.brick.install(path, entry, &tmp);
        let _ = self.dir_syncs.changed(&[path], false);
        let stale = self.kernel.stale(&self.brick, before, None);
        self.kernel.invalidate_detached(&self.runtime, stale);
        match installed {
            Ok(()) => Response::Ok,
            Err(error) => {
                warn!(volume = %self.name, path, peer, %error, "cannot install a healed entry");
                Response::Errno(errno(&error))
            }
        }
    }

    pub fn status(&self) -> StatusReport {
        let stats = &self.stats;
        let mut counters = vec![
            ("writes".to_owned(), stats.writes.load(Ordering::Relaxed)),
            (
                "writes_refused".to_owned(),
                stats.writes_refused.load(Ordering::Relaxed),
            ),
            (
                "writes_failed".to_owned(),
                stats.writes_failed.load(Ordering::Relaxed),
            ),
            (
                "split_brains".to_owned(),
                stats.split_brains.load(Ordering::Relaxed),
            ),
        ];
        let bad: u64 = lock(&stats.bad_frames).values().sum();
        counters.push(("bad_frames".to_owned(), bad));
        StatusReport {
            node: self.node.clone(),
            volume: self.name.clone(),
            current: self.is_current(),
            peers: self
                .peers
                .iter()
                .map(|p| PeerStatus {
                    node: p.name.clone(),
                    up: p.up.load(Ordering::Acquire),
                    pending: self.log.pending(&p.name),
                    sample: self.log.sample(&p.name, 10),
                })
                .collect(),
            counters,
        }
    }

    pub fn count_bad_frame(&self, reason: &'static str) {
        *lock(&self.stats.bad_frames).entry(reason).or_default() += 1;
    }

    /// Snapshot of counters for the metrics collector.
    pub fn metric_snapshot(&self) -> MetricSnapshot {
        MetricSnapshot {
            current: self.is_current(),
            writes: self.stats.writes.load(Ordering::Relaxed),
            writes_refused: self.stats.writes_refused.load(Ordering::Relaxed),
            writes_failed: self.stats.writes_failed.load(Ordering::Relaxed),
            split_brains: self.stats.split_brains.load(Ordering::Relaxed),
            bad_frames: lock(&self.stats.bad_frames).clone(),
            kernel_invalidations: self.kernel.invalidations.load(Ordering::Relaxed),
            kernel_invalidations_unwaited: self
                .kernel
                .invalidations_unwaited
                .load(Ordering::Relaxed),
            kernel_inodes_held: self.kernel.held_count() as u64,
            peers: self
                .peers
                .iter()
                .map(|p| PeerSnapshot {
                    name: p.name.clone(),
                    up: p.up.load(Ordering::Acquire),
                    transitions: p.transitions.load(Ordering::Relaxed),
                    pending: self.log.pending(&p.name),
                    healed: p.healed.load(Ordering::Relaxed),
                    heal_running: p.heal_running.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct MetricSnapshot {
    pub current: bool,
    pub writes: u64,
    pub writes_refused: u64,
    pub writes_failed: u64,
    pub split_brains: u64,
    pub bad_frames: BTreeMap<&'static str, u64>,
    pub peers: Vec<PeerSnapshot>,
    pub kernel_invalidations: u64,
    pub kernel_invalidations_unwaited: u64,
    pub kernel_inodes_held: u64,
}

#[derive(Debug, Clone)]
pub struct PeerSnapshot {
    pub name: String,
    pub up: bool,
    pub transitions: u64,
    pub pending: u64,
    pub healed: u64,
    pub heal_running: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::brick::Meta;

    fn make_volume(
        test: &str,
        quorum: usize,
        policy: SplitBrainPolicy,
        source: Option<&str>,
    ) -> (Arc<Volume>, std::path::PathBuf, tokio::runtime::Runtime) {
        let dir = std::env::temp_dir().join(format!("farol-replica-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let brick = Brick::open(&dir).unwrap();
        let log = ChangeLog::open(&brick.state_dir()).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let kernel = Arc::new(KernelCache::for_brick(&brick).unwrap());
        let setup = VolumeSetup {
            name: "v".into(),
            node: "a".into(),
            brick,
            quorum,
            peers: vec![("b".into(), "127.0.0.1:9".parse().unwrap())],
            log,
            policy,
            source: source.map(str::to_owned),
            heal_rate: 1 << 20,
            timeout: Duration::from_secs(1),
            kernel,
        };
        let (volume, _receivers) = Volume::new(setup, runtime.handle().clone());
        (volume, dir, runtime)
    }

    fn theirs(mtime_ns: i64) -> Entry {
        Entry::File {
            meta: Meta {
                mode: 0o644,
                uid: 0,
                gid: 0,
                atime_ns: mtime_ns,
                mtime_ns,
                xattrs: Vec::new(),
            },
            offset: 0,
            data: b"theirs".to_vec(),
            last: true,
        }
    }

    /// Both sides changed `x`; ours is newer (mtime now, theirs 1 s after
    /// the epoch).
    fn diverged(volume: &Volume, dir: &std::path::Path) {
        std::fs::write(dir.join("x"), b"ours").unwrap();
        volume.log().record("b", "x");
    }

    #[test]
    fn latest_mtime_keeps_the_newer_copy_and_counts_the_split_brain() {
        let (volume, dir, _rt) = make_volume("latest", 1, SplitBrainPolicy::LatestMtime, None);
        diverged(&volume, &dir);
        assert_eq!(
            volume.heal_from("b", "x", &theirs(1_000_000_000)),
            Response::Rejected
        );
        assert_eq!(std::fs::read(dir.join("x")).unwrap(), b"ours");
        assert_eq!(volume.counters().split_brains.load(Ordering::Relaxed), 1);
        // A newer copy from the peer wins and clears what we owed it.
        assert_eq!(
            volume.heal_from("b", "x", &theirs(i64::MAX / 2)),
            Response::Ok
        );
        assert_eq!(std::fs::read(dir.join("x")).unwrap(), b"theirs");
        assert_eq!(volume.log().pending("b"), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_source_policy_keeps_the_sources_copy_even_when_older() {
        let (volume, dir, _rt) = make_volume("source", 1, SplitBrainPolicy::Source, Some("b"));
        diverged(&volume, &dir);
        assert_eq!(
            volume.heal_from("b", "x", &theirs(1_000_000_000)),
            Response::Ok
        );
        assert_eq!(std::fs::read(dir.join("x")).unwrap(), b"theirs");
        std::fs::remove_dir_all(&dir).unwrap();

        let (volume, dir, _rt) = make_volume("source-here", 1, SplitBrainPolicy::Source, Some("a"));
        diverged(&volume, &dir);
        assert_eq!(
            volume.heal_from("b", "x", &theirs(i64::MAX / 2)),
            Response::Rejected
        );
        assert_eq!(std::fs::read(dir.join("x")).unwrap(), b"ours");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_change_from_another_replica_while_a_heal_copy_is_on_its_way_keeps_the_path_pending() {
        let (volume, dir, _rt) = make_volume("in-flight", 1, SplitBrainPolicy::LatestMtime, None);
        std::fs::write(dir.join("x"), b"").unwrap();
        {
            let order = volume.apply_lock();
            volume.begin_stream_locked(&order, 0, "x");
        }
        // Another replica's write to x reaches this brick (and, directly,
        // the healed peer b) before b has answered the copy: the copy may
        // land after the write there, so x must be sent to b again.
        let write = Op::Write {
            path: "x".into(),
            offset: 0,
            data: b"acknowledged".to_vec(),
            mtime_ns: 2_000_000_000,
        };
        assert_eq!(volume.apply_remote(&write, &[]), Response::Ok);
        assert!(volume.log().contains("b", "x"));

        // Once b answered the copy, a later write needs nothing more.
        volume.end_stream(0, "x");
        let (_, generation) = volume.log().next_after("b", None).unwrap();
        assert!(volume.log().resolve_at("b", "x", generation));
        assert_eq!(volume.apply_remote(&write, &[]), Response::Ok);
        assert!(!volume.log().contains("b", "x"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A volume with two connected peers (b and c), quorum 2, whose
    /// request queues the test answers itself.
    fn two_peers(
        test: &str,
    ) -> (
        Arc<Volume>,
        std::path::PathBuf,
        tokio::runtime::Runtime,
        Vec<mpsc::Receiver<Outgoing>>,
    ) {
        let dir = std::env::temp_dir().join(format!("farol-replica-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let brick = Brick::open(&dir).unwrap();
        let log = ChangeLog::open(&brick.state_dir()).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let kernel = Arc::new(KernelCache::for_brick(&brick).unwrap());
        let setup = VolumeSetup {
            name: "v".into(),
            node: "a".into(),
            brick,
            quorum: 2,
            peers: vec![
                ("b".into(), "127.0.0.1:9".parse().unwrap()),
                ("c".into(), "127.0.0.1:9".parse().unwrap()),
            ],
            log,
            policy: SplitBrainPolicy::LatestMtime,
            source: None,
            heal_rate: 1 << 20,
            // Replies are waited for max(5 x 3 s, 10 s) = 15 s.
            timeout: Duration::from_secs(3),
            kernel,
        };
        let (volume, receivers) = Volume::new(setup, runtime.handle().clone());
        volume.set_peer_up(0, true, 0, "test");
        volume.set_peer_up(1, true, 0, "test");
        (volume, dir, runtime, receivers)
    }

    #[test]
    fn a_sync_returns_once_a_quorum_synced_without_the_slowest_peer() {
        let (volume, dir, _rt, mut receivers) = two_peers("sync-quorum");
        let mut slow = receivers.pop().unwrap();
        let mut fast = receivers.pop().unwrap();
        let answering = std::thread::spawn(move || {
            let sync = fast.blocking_recv().unwrap();
            assert!(matches!(
                sync.body,
                Request::Apply {
                    op: Op::Fsync { .. },
                    ..
                }
            ));
            sync.reply.send(Response::Ok).unwrap();
            fast
        });
        let started = Instant::now();
        let result = volume.submit_sync(Op::Fsync { path: "".into() }, |_| Ok(()), || Ok(()));
        assert_eq!(result, Ok(()));
        // c was sent the sync and has not answered: the sync returned on
        // a quorum (here and b) without waiting for c's disk (15 s).
        let withheld = slow.try_recv().expect("c was sent the sync too");
        assert!(!withheld.reply.is_closed(), "c's answer is still awaited");
        assert!(started.elapsed() < Duration::from_secs(10));
        let _fast = answering.join().unwrap();
        withheld.reply.send(Response::Ok).unwrap();
        assert_eq!(volume.counters().writes_failed.load(Ordering::Relaxed), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_sync_without_a_quorum_of_syncs_fails() {
        let (volume, dir, _rt, mut receivers) = two_peers("sync-no-quorum");
        let mut c = receivers.pop().unwrap();
        let mut b = receivers.pop().unwrap();
        let answering = std::thread::spawn(move || {
            for queue in [&mut b, &mut c] {
                let sync = queue.blocking_recv().unwrap();
                sync.reply.send(Response::Errno(libc::EIO)).unwrap();
            }
        });
        let result = volume.submit_sync(Op::Fsync { path: "".into() }, |_| Ok(()), || Ok(()));
        assert_eq!(result, Err(libc::EIO));
        answering.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_change_still_waits_for_every_peer_that_is_up() {
        let (volume, dir, _rt, mut receivers) = two_peers("change-all");
        let mut c = receivers.pop().unwrap();
        let mut b = receivers.pop().unwrap();
        let answering = std::thread::spawn(move || {
            b.blocking_recv().unwrap().reply.send(Response::Ok).unwrap();
            let late = c.blocking_recv().unwrap();
            std::thread::sleep(Duration::from_millis(300));
            late.reply.send(Response::Ok).unwrap();
        });
        let op = Op::Mkdir {
            path: "d".into(),
            mode: 0o755,
            uid: 0,
            gid: 0,
        };
        let started = Instant::now();
        let result = volume.submit(op.clone(), |brick| brick.apply(&op));
        assert_eq!(result, Ok(()));
        // Visible on every connected replica once acknowledged: c's
        // answer was waited for although b made the quorum.
        assert!(started.elapsed() >= Duration::from_millis(300));
        answering.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_peers_sync_says_when_the_file_is_open_then_syncs_it() {
        let (volume, dir, _rt) = make_volume("sync-remote", 1, SplitBrainPolicy::LatestMtime, None);
        std::fs::write(dir.join("x"), b"data").unwrap();
        let (opened_tx, mut opened) = oneshot::channel();
        assert_eq!(volume.sync_remote("x", opened_tx), Response::Ok);
        assert_eq!(opened.try_recv(), Ok(()));
        // A path gone meanwhile: told as opened (the connection goes on),
        // answered with the errno.
        let (opened_tx, mut opened) = oneshot::channel();
        assert_eq!(
            volume.sync_remote("gone", opened_tx),
            Response::Errno(libc::ENOENT)
        );
        assert_eq!(opened.try_recv(), Ok(()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn without_a_quorum_changes_are_refused_with_erofs() {
        let (volume, dir, _rt) = make_volume("erofs", 2, SplitBrainPolicy::LatestMtime, None);
        let op = Op::Mkdir {
            path: "d".into(),
            mode: 0o755,
            uid: 0,
            gid: 0,
        };
        let result = volume.submit(op.clone(), |brick| brick.apply(&op));
        assert_eq!(result, Err(libc::EROFS));
        assert!(!dir.join("d").exists(), "nothing applied locally");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
