//! Connections of the volume protocol: one outgoing connection per peer
//! (this node's changes and heals, in order) and the listener that serves
//! peers' changes and the `heal-info`/`heal` commands. A connection that
//! sends a bad frame is counted and closed; it never takes the agent down.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use futures_util::{stream::SplitSink, SinkExt, StreamExt};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot, watch},
    time::Instant,
};
use tokio_util::codec::Framed;
use tracing::{debug, info, warn};

use super::{
    auth::FrameKey,
    brick::Op,
    full_heal,
    protocol::{nonce, FrameCodec, Message, Request, Response},
    replica::{Outgoing, Volume},
};

/// The node name the command-line tools use in `Hello`.
pub const CLI_NODE: &str = "@cli";
/// How long a new connection has to say `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Keeps the connection to `peer` up until shutdown, forwarding queued
/// requests and routing replies.
pub async fn run_peer(
    volume: Arc<Volume>,
    peer: usize,
    key: FrameKey,
    mut rx: mpsc::Receiver<Outgoing>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        let reason = match connection(&volume, peer, &key, &mut rx, &mut shutdown).await {
            Ok(()) => {
                volume.set_peer_up(peer, false, 0, "shutting down");
                return;
            }
            Err(reason) => reason,
        };
        volume.set_peer_up(peer, false, 0, &reason);
        // Requests queued meanwhile fail now (their senders record them
        // for heal) rather than reach the peer out of order later.
        while rx.try_recv().is_ok() {}
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = shutdown.changed() => {}
        }
        while rx.try_recv().is_ok() {}
    }
}

async fn connection(
    volume: &Arc<Volume>,
    peer: usize,
    key: &FrameKey,
    rx: &mut mpsc::Receiver<Outgoing>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    let p = &volume.peers()[peer];
    let timeout = volume.timeout();
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(p.addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            debug!(peer = %p.name, addr = %p.addr, %error, "cannot connect");
            return Err(format!("cannot connect: {error}"));
        }
        Err(_) => return Err("connect timed out".into()),
    };
    let _ = stream.set_nodelay(true);
    // Closing a connection that was given up must throw away what it
    // still had to send (RST, not FIN after the data): otherwise TCP
    // delivers those changes once a partition heals, after the heal that
    // replaced them, and a stale Create truncates a healed file (the
    // chaos suite's partition-1-3 and flapping-link). What was not
    // answered is recorded for heal anyway.
    if let Err(error) = stream.set_zero_linger() {
        warn!(peer = %p.name, %error, "cannot set SO_LINGER on a peer connection");
    }
    let mut framed = Framed::new(stream, FrameCodec::new(key.clone()));
    let ours = nonce().map_err(|e| format!("no randomness: {e}"))?;
    framed
        .send(Message::Hello {
            node: volume.node().to_owned(),
            volume: volume.name().to_owned(),
            nonce: ours,
        })
        .await
        .map_err(|e| e.to_string())?;
    let pending_for_us = match tokio::time::timeout(timeout, framed.next()).await {
        Ok(Some(Ok(Message::HelloAck {
            node,
            pending_for_you,
            nonce: theirs,
        }))) if node == p.name => {
            framed.codec_mut().set_session(&ours, &theirs);
            pending_for_you
        }
        Ok(Some(Ok(other))) => {
            volume.count_bad_frame("unexpected");
            return Err(format!("unexpected handshake answer {other:?}"));
        }
        Ok(Some(Err(error))) => {
            if error.is_garbage() {
                volume.count_bad_frame(error.reason());
            }
            return Err(format!("handshake: {error}"));
        }
        Ok(None) => return Err("closed during the handshake".into()),
        Err(_) => return Err("handshake timed out".into()),
    };
    volume.set_peer_up(peer, true, pending_for_us, "connected");

    // Sending, receiving and the liveness watchdog run side by side.
    // Liveness is judged from any frame received (answers to changes count
    // as much as answers to pings), never from how much data is queued:
    // while a large batch of writes is being pushed (and TCP makes us
    // wait), answers keep being read and the watchdog keeps its own clock.
    // The peer answers pings as soon as it reads them, ahead of changes
    // still being applied (see `serve_connection`).
    let inflight: std::sync::Mutex<HashMap<u64, Option<oneshot::Sender<Response>>>> =
        std::sync::Mutex::new(HashMap::new());
    let last_heard = std::sync::Mutex::new(Instant::now());
    let (mut sink, mut frames) = framed.split();
    let sending = async {
        let mut next_id = 0u64;
        let mut ping = tokio::time::interval(timeout / 4);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // A due ping goes before the next batch of changes.
                biased;
                _ = ping.tick() => {
                    next_id += 1;
                    lock(&inflight).insert(next_id, None);
                    sink.send(Message::Request { id: next_id, body: Request::Ping })
                        .await
                        .map_err(|e| format!("send: {e}"))?;
                }
                outgoing = rx.recv() => {
                    let Some(first) = outgoing else { return Ok(()) };
                    // A batch holds at most BATCH_BYTES of data, so a due
                    // ping is never queued behind more than that.
                    let mut bytes = payload_len(&first.body);
                    let mut batch = vec![first];
                    while batch.len() < 64 && bytes < BATCH_BYTES {
                        match rx.try_recv() {
                            Ok(more) => {
                                bytes += payload_len(&more.body);
                                batch.push(more);
                            }
                            Err(_) => break,
                        }
                    }
                    for Outgoing { body, reply } in batch {
                        let large = payload_len(&body) >= LARGE_FRAME;
                        next_id += 1;
                        lock(&inflight).insert(next_id, Some(reply));
                        sink.feed(Message::Request { id: next_id, body })
                            .await
                            .map_err(|e| format!("send: {e}"))?;
                        if large {
                            // Signing a large frame is CPU work that tokio's
                            // budget does not see: give the other tasks
                            // (pings, answers) their turn between frames.
                            tokio::task::yield_now().await;
                        }
                    }
                    sink.flush().await.map_err(|e| format!("send: {e}"))?;
                }
            }
        }
    };
    let receiving = async {
        loop {
            match frames.next().await {
                Some(Ok(Message::Response { id, body })) => {
                    *lock(&last_heard) = Instant::now();
                    if let Some(Some(reply)) = lock(&inflight).remove(&id) {
                        let _ = reply.send(body);
                    }
                }
                Some(Ok(other)) => {
                    volume.count_bad_frame("unexpected");
                    return Err(format!("unexpected message {}", kind(&other)));
                }
                Some(Err(error)) => {
                    if error.is_garbage() {
                        volume.count_bad_frame(error.reason());
                    }
                    return Err(format!("receive: {error}"));
                }
                None => return Err("connection closed by the peer".into()),
            }
        }
    };
    let watchdog = async {
        let mut check = tokio::time::interval(timeout / 4);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            check.tick().await;
            let silent = lock(&last_heard).elapsed();
            if silent > timeout {
                return Err::<(), _>(format!(
                    "nothing heard for {silent:?} (peer_timeout {timeout:?})"
                ));
            }
        }
    };
    tokio::select! {
        result = sending => result,
        result = receiving => result,
        result = watchdog => result,
        _ = shutdown.wait_for(|stop| *stop) => Ok(()),
    }
}

/// Data bytes a batch of requests carries at most (see `connection`).
const BATCH_BYTES: usize = 4 * 1024 * 1024;
/// From this size on, a frame's signing or checking yields to other tasks.
const LARGE_FRAME: usize = 64 * 1024;

/// The file data a request carries (what makes its frame large).
fn payload_len(body: &Request) -> usize {
    match body {
        Request::Apply {
            op: Op::Write { data, .. },
            ..
        } => data.len(),
        Request::Heal {
            entry: super::brick::Entry::File { data, .. },
            ..
        } => data.len(),
        _ => 0,
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each critical section leaves the map consistent.
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

fn kind(message: &Message) -> &'static str {
    match message {
        Message::Hello { .. } => "Hello",
        Message::HelloAck { .. } => "HelloAck",
        Message::Request { .. } => "Request",
        Message::Response { .. } => "Response",
    }
}

/// Accepts peers and tools until shutdown.
pub async fn serve(
    listener: TcpListener,
    volume: Arc<Volume>,
    key: FrameKey,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(serve_connection(
                        stream,
                        addr,
                        Arc::clone(&volume),
                        key.clone(),
                        shutdown.clone(),
                    ));
                }
                Err(error) => {
                    warn!(volume = %volume.name(), %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    return;
                }
            }
        }
    }
}

fn garbage(volume: &Volume, addr: SocketAddr, reason: &'static str, detail: &str) {
    volume.count_bad_frame(reason);
    warn!(volume = %volume.name(), peer = %addr, reason, detail, "disconnecting a peer that sent a bad frame");
}

async fn serve_connection(
    stream: TcpStream,
    addr: SocketAddr,
    volume: Arc<Volume>,
    key: FrameKey,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut framed = Framed::new(stream, FrameCodec::new(key));
    let (from, client_nonce) = match tokio::time::timeout(HELLO_TIMEOUT, framed.next()).await {
        Ok(Some(Ok(Message::Hello {
            node,
            volume: name,
            nonce,
        }))) => {
            if name != volume.name() {
                garbage(&volume, addr, "wrong_volume", &name);
                return;
            }
            if node != CLI_NODE && volume.peer_index(&node).is_none() {
                garbage(&volume, addr, "unknown_node", &node);
                return;
            }
            (node, nonce)
        }
        Ok(Some(Ok(other))) => {
            garbage(&volume, addr, "unexpected", kind(&other));
            return;
        }
        Ok(Some(Err(error))) => {
            if error.is_garbage() {
                garbage(&volume, addr, error.reason(), &error.to_string());
            }
            return;
        }
        Ok(None) | Err(_) => return,
    };
    let Ok(server_nonce) = nonce() else {
        warn!(volume = %volume.name(), "no randomness for a handshake nonce");
        return;
    };
    let ack = Message::HelloAck {
        node: volume.node().to_owned(),
        pending_for_you: volume.log().pending(&from),
        nonce: server_nonce,
    };
    if framed.send(ack).await.is_err() {
        return;
    }
    framed.codec_mut().set_session(&client_nonce, &server_nonce);
    debug!(volume = %volume.name(), peer = %from, %addr, "peer connected");
    let (sink, mut frames) = framed.split();
    let answers: Answers = Arc::new(tokio::sync::Mutex::new(sink));
    // Unbounded so that reading never stops behind changes still being
    // applied: a ping read later would look like a dead peer. What queues
    // here is bounded by the senders (each FUSE thread waits for its
    // write-behind window, the heal for its batch).
    let (work_tx, mut work_rx) = mpsc::unbounded_channel::<(u64, Request)>();
    let worker = {
        let volume = Arc::clone(&volume);
        let answers = Arc::clone(&answers);
        let from = from.clone();
        tokio::spawn(async move {
            while let Some((id, body)) = work_rx.recv().await {
                if let Request::Apply {
                    op: Op::Fsync { path },
                    ..
                } = &body
                {
                    // A sync changes nothing: the changes before it on this
                    // connection are applied already (so it covers them),
                    // and the ones after it need not wait for this disk's
                    // sync. The file is opened in order (a later rename or
                    // unlink cannot make it sync another file or none),
                    // then synced while later changes go on; its answer
                    // goes out when the disk is done (answers are matched
                    // by id). The sender returns once a quorum synced, and
                    // its next change must not queue here behind the
                    // slowest disk.
                    let (opened_tx, opened) = oneshot::channel();
                    let syncing = {
                        let volume = Arc::clone(&volume);
                        let path = path.clone();
                        tokio::task::spawn_blocking(move || volume.sync_remote(&path, opened_tx))
                    };
                    let _ = opened.await;
                    let answers = Arc::clone(&answers);
                    tokio::spawn(async move {
                        let body = syncing.await.unwrap_or(Response::Errno(libc::EIO));
                        answer(&answers, id, body).await;
                    });
                    continue;
                }
                let body = handle(&volume, &from, body).await;
                if !answer(&answers, id, body).await {
                    return;
                }
            }
        })
    };
    loop {
        tokio::select! {
            frame = frames.next() => match frame {
                Some(Ok(Message::Request { id, body: Request::Ping })) => {
                    // On a task of its own: reading goes on while an
                    // answer is being written.
                    let answers = Arc::clone(&answers);
                    tokio::spawn(async move { answer(&answers, id, Response::Ok).await });
                }
                Some(Ok(Message::Request { id, body })) => {
                    let large = payload_len(&body) >= LARGE_FRAME;
                    if work_tx.send((id, body)).is_err() {
                        break;
                    }
                    if large {
                        // Frames already buffered are decoded (and their
                        // tags checked) without touching the socket, which
                        // tokio's budget would count: yield between large
                        // ones so pings on other connections are answered.
                        tokio::task::yield_now().await;
                    }
                }
                Some(Ok(other)) => {
                    garbage(&volume, addr, "unexpected", kind(&other));
                    break;
                }
                Some(Err(error)) => {
                    if error.is_garbage() {
                        garbage(&volume, addr, error.reason(), &error.to_string());
                    }
                    break;
                }
                None => break,
            },
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break;
                }
            }
        }
    }
    drop(work_tx);
    // Let queued changes finish (they are already applied in order), then
    // close.
    let _ = worker.await;
    // The connection closes once the answers of syncs still running are
    // written (their tasks hold the sending half).
}

/// The sending half of a served connection, shared by whoever answers:
/// the worker writes its answer itself, since handing it to a writer task
/// costs a thread wake-up per change on a loaded machine (answers are
/// matched by id, so their order does not matter).
type Answers = Arc<tokio::sync::Mutex<SplitSink<Framed<TcpStream, FrameCodec>, Message>>>;

/// Writes one answer; false once the connection is gone.
async fn answer(answers: &Answers, id: u64, body: Response) -> bool {
    answers
        .lock()
        .await
        .send(Message::Response { id, body })
        .await
        .is_ok()
}

/// Data a write may carry and still be applied on the connection's async
/// thread (see [`applies_quickly`]).
const QUICK_WRITE: usize = 64 * 1024;

/// Whether a peer's change is a few quick file system calls: applied right
/// on the connection's async thread, which costs less than handing the
/// thread's other tasks to another thread for it (`block_in_place`: a
/// thread wake-up per change on a loaded machine). Not a sync, a large
/// write, a truncation or a rename (each may wait for the disk; a rename
/// over a file frees its blocks, which a `discard` mount waits for).
fn applies_quickly(op: &Op) -> bool {
    match op {
        Op::Write { data, .. } => data.len() <= QUICK_WRITE,
        Op::SetAttr { size, .. } => size.is_none(),
        Op::Fsync { .. } | Op::Rename { .. } => false,
        Op::Create { .. }
        | Op::Mkdir { .. }
        | Op::Symlink { .. }
        | Op::Link { .. }
        | Op::Unlink { .. }
        | Op::Rmdir { .. }
        | Op::SetXattr { .. }
        | Op::RemoveXattr { .. } => true,
    }
}

/// Runs blocking work (a peer's change: a few file system calls) on this
/// very thread, the runtime moving its other tasks elsewhere meanwhile
/// (`block_in_place`): on a loaded machine, handing the work to the
/// blocking pool and back costs two thread wake-ups per change, often
/// more than the change itself. A current-thread runtime (tests) cannot
/// do that: there it goes to the blocking pool as before.
async fn blocking_here<T: Send + 'static>(
    volume: &Arc<Volume>,
    work: impl FnOnce(&Volume) -> T + Send + 'static,
) -> Option<T> {
    if tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::MultiThread
    {
        Some(tokio::task::block_in_place(|| work(volume)))
    } else {
        let volume = Arc::clone(volume);
        tokio::task::spawn_blocking(move || work(&volume))
            .await
            .ok()
    }
}

async fn handle(volume: &Arc<Volume>, from: &str, body: Request) -> Response {
    let blocking = |f: Box<dyn FnOnce() -> Response + Send>| async move {
        tokio::task::spawn_blocking(f)
            .await
            .unwrap_or(Response::Errno(libc::EIO))
    };
    match body {
        Request::Ping => Response::Ok,
        Request::Apply { op, missed } => {
            let quick = if applies_quickly(&op) {
                volume.try_apply_remote_stale(&op, &missed)
            } else {
                None
            };
            let (response, stale) = match quick {
                Some(applied) => applied,
                None => {
                    let Some(applied) = blocking_here(volume, move |volume| {
                        volume.apply_remote_stale(&op, &missed)
                    })
                    .await
                    else {
                        return Response::Errno(libc::EIO);
                    };
                    applied
                }
            };
            // The peer is answered once this node's kernel dropped what the
            // change made stale (see `kernel_cache`).
            volume.kernel_cache().invalidate(stale).await;
            response
        }
        Request::Heal { path, entry } => {
            let volume = Arc::clone(volume);
            let from = from.to_owned();
            blocking(Box::new(move || volume.heal_from(&from, &path, &entry))).await
        }
        Request::HealProbe { path, digest } => {
            let volume = Arc::clone(volume);
            // Not under the apply lock: a change racing the read makes the
            // digests differ, and the path is just healed.
            blocking(Box::new(move || match volume.brick().digest(&path) {
                Ok(mine) if mine == digest => Response::Ok,
                Ok(_) => Response::Differs,
                Err(error) => Response::Errno(super::replica::errno(&error)),
            }))
            .await
        }
        Request::HealSync => {
            let volume = Arc::clone(volume);
            blocking(Box::new(move || match volume.brick().sync_fs() {
                Ok(()) => Response::Ok,
                Err(error) => Response::Errno(super::replica::errno(&error)),
            }))
            .await
        }
        Request::HealProgress { remaining } => {
            volume.set_remote_pending(from, remaining);
            Response::Ok
        }
        Request::Manifest => {
            let volume = Arc::clone(volume);
            blocking(Box::new(move || match volume.brick().manifest() {
                Ok(manifest) => Response::Manifest(manifest),
                Err(error) => Response::Errno(super::replica::errno(&error)),
            }))
            .await
        }
        Request::MarkPending { path, peer } => {
            if volume.peer_index(&peer).is_some() {
                volume.log().record(&peer, &path);
                volume.wake_heal();
                Response::Ok
            } else {
                Response::Errno(libc::EINVAL)
            }
        }
        Request::Status => Response::Status(volume.status()),
        Request::FullHeal => {
            let volume = Arc::clone(volume);
            blocking(Box::new(move || {
                let marked = full_heal::run(&volume);
                info!(volume = %volume.name(), marked, "full heal scanned the bricks");
                volume.wake_heal();
                Response::Ok
            }))
            .await
        }
    }
}
