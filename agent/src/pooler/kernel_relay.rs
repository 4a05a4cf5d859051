//! Session mode's in-kernel relay (`pooler.kernel_relay`): once a client
//! is paired with its server connection, the bytes go from one socket to
//! the other in the kernel (`dataplane::socket_relay`), so the pooler is
//! not woken per message. The pooler keeps watching both sockets and
//! takes the pair back when the session ends or it must speak.
//!
//! Handover (`Relay::try_kernel_relay` in `session.rs`): only at a point
//! where the pooler holds no half-handled bytes (its buffers empty, no
//! message half passed on) and neither socket has a half-read buffer
//! (`FIONREAD` 0). Everything the pooler read is then already written to
//! the other side's socket, and everything after it is relayed by the
//! kernel in arrival order (bytes that arrived between the check and the
//! insertion are relayed first, by the wake-up in `pair`): no byte can
//! overtake another, whatever the client pipelines.
//!
//! Watching: both sockets leave tokio while the kernel relays (the kernel
//! signals "data ready" after every buffer it relays, which would wake a
//! reader per message); a [`HangupWatch`] asks only for hang-ups.
//!
//! Take-back: a client's Terminate ('X', alone in its buffer) is passed up
//! by the program and found when the client closes, right after it; the
//! pooler unpairs and resets the server with a strict `DISCARD ALL` (its
//! answer must come first, else the server is closed) before reusing it.
//! A client that closes without Terminate, a server that closes, anything
//! unexpected: the pooler cannot know where the server stands, so the
//! server is cancelled and closed (degraded, never wrong). A primary that
//! moved: unpair, 57P01 as today. A client that sends Terminate and keeps
//! its socket open keeps its server until it closes.
//!
//! Known gap: no backpressure. The verdict takes each buffer off the
//! server socket as it arrives and the kernel queues it for the client's
//! egress without a bound, so a client that stops reading lets the kernel
//! buffer the server's whole answer (the userspace relay stops reading
//! instead). Hence off by default, for trusted clients only.
//!
//! What the kernel relays is not in SHOW STATS (queries, transactions,
//! bytes of the pool): only the program's totals and the counters here.

use std::sync::{
    atomic::{AtomicBool, AtomicU64, Ordering},
    Arc,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
};
use tracing::{info, warn};

use crate::dataplane::socket_relay::{Pair, PairError, SocketRelay};

/// Why a session stays on the userspace relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fallback {
    /// The program could not be loaded (no privileges, no eBPF object).
    Unavailable,
    /// The client came over TLS or a Unix socket.
    ClientNotPlainTcp,
    /// The server connection is a Unix socket (`unix_socket_dir`).
    ServerUnixSocket,
    /// `read_write_split` routes statements: the pooler must see them.
    ReadWriteSplit,
    /// The map refused the pair (full, or a socket in an odd state).
    PairFailed,
    /// Bytes were always in flight when a handover was tried.
    NeverQuiet,
}

impl Fallback {
    pub(crate) const ALL: [Fallback; 6] = [
        Fallback::Unavailable,
        Fallback::ClientNotPlainTcp,
        Fallback::ServerUnixSocket,
        Fallback::ReadWriteSplit,
        Fallback::PairFailed,
        Fallback::NeverQuiet,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Fallback::Unavailable => "unavailable",
            Fallback::ClientNotPlainTcp => "client_not_plain_tcp",
            Fallback::ServerUnixSocket => "server_unix_socket",
            Fallback::ReadWriteSplit => "read_write_split",
            Fallback::PairFailed => "pair_failed",
            Fallback::NeverQuiet => "never_quiet",
        }
    }
}

/// Why the pooler took a pair back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TakeBack {
    /// The client's Terminate: the server is reset and reused.
    Terminate,
    /// The client closed without Terminate.
    ClientClosed,
    /// The server closed or failed.
    ServerClosed,
    /// The primary moved (57P01 to the client).
    PrimaryMoved,
    /// Bytes the program should have relayed reached the pooler.
    Unexpected,
}

impl TakeBack {
    pub(crate) const ALL: [TakeBack; 5] = [
        TakeBack::Terminate,
        TakeBack::ClientClosed,
        TakeBack::ServerClosed,
        TakeBack::PrimaryMoved,
        TakeBack::Unexpected,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            TakeBack::Terminate => "terminate",
            TakeBack::ClientClosed => "client_closed",
            TakeBack::ServerClosed => "server_closed",
            TakeBack::PrimaryMoved => "primary_moved",
            TakeBack::Unexpected => "unexpected",
        }
    }
}

/// Handovers tried before a busy session is left in userspace.
pub(crate) const HANDOVER_ATTEMPTS: u32 = 64;

/// The relay shared by every session of the pooler.
#[derive(Debug)]
pub(crate) struct KernelRelay {
    relay: Option<SocketRelay>,
    handovers: AtomicU64,
    active: AtomicU64,
    take_backs: [AtomicU64; TakeBack::ALL.len()],
    fallbacks: [AtomicU64; Fallback::ALL.len()],
    logged: [AtomicBool; Fallback::ALL.len()],
}

impl KernelRelay {
    /// Loads the program; when that fails, sessions fall back (the reason
    /// is logged here, once).
    pub(crate) fn start() -> KernelRelay {
        let relay = match SocketRelay::load() {
            Ok(relay) => {
                info!("pooler: kernel relay loaded; session-mode sessions over plain TCP are relayed in the kernel");
                Some(relay)
            }
            Err(error) => {
                warn!(error = %crate::error_chain(&error), "pooler: kernel relay unavailable; every session uses the userspace relay");
                None
            }
        };
        KernelRelay {
            logged: std::array::from_fn(|i| {
                AtomicBool::new(Fallback::ALL[i] == Fallback::Unavailable && relay.is_none())
            }),
            relay,
            handovers: AtomicU64::new(0),
            active: AtomicU64::new(0),
            take_backs: Default::default(),
            fallbacks: Default::default(),
        }
    }

    pub(crate) fn available(&self) -> bool {
        self.relay.is_some()
    }

    /// A session stays in userspace: counted, and logged the first time
    /// for each reason.
    pub(crate) fn fall_back(&self, reason: Fallback, detail: Option<&PairError>) {
        let index = reason as usize;
        self.fallbacks[index].fetch_add(1, Ordering::Relaxed);
        if !self.logged[index].swap(true, Ordering::Relaxed) {
            match detail {
                Some(error) => {
                    warn!(reason = reason.label(), error = %crate::error_chain(error), "pooler: a session stays on the userspace relay (logged once per reason)")
                }
                None => info!(
                    reason = reason.label(),
                    "pooler: a session stays on the userspace relay (logged once per reason)"
                ),
            }
        }
    }

    /// Hands a client socket and its server socket to the kernel (see the
    /// module's notes for when that is safe).
    pub(crate) fn hand_over(
        self: &Arc<Self>,
        client: std::os::fd::BorrowedFd<'_>,
        server: std::os::fd::BorrowedFd<'_>,
    ) -> Result<Handed, PairError> {
        let Some(relay) = &self.relay else {
            return Err(PairError::NotLoaded);
        };
        let pair = relay.pair(client, server)?;
        self.handovers.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        Ok(Handed {
            relay: self.clone(),
            pair: Some(pair),
        })
    }
}

/// A pair the kernel relays; taken back explicitly, or when dropped (the
/// session task ended some other way).
#[derive(Debug)]
pub(crate) struct Handed {
    relay: Arc<KernelRelay>,
    pair: Option<Pair>,
}

impl Handed {
    pub(crate) fn take_back(mut self, reason: TakeBack) {
        self.release(reason);
    }

    fn release(&mut self, reason: TakeBack) {
        let Some(pair) = self.pair.take() else { return };
        if let Some(relay) = &self.relay.relay {
            relay.unpair(&pair);
        }
        self.relay.active.fetch_sub(1, Ordering::Relaxed);
        self.relay.take_backs[reason as usize].fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Handed {
    fn drop(&mut self) {
        self.release(TakeBack::Unexpected);
    }
}

/// The relay's figures as `farol_pooler_kernel_relay_*` metrics.
#[derive(Debug)]
pub struct KernelRelayCollector(pub Arc<super::Pooler>);

impl Collector for KernelRelayCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(kernel) = &self.0.kernel_relay else {
            return Ok(());
        };
        let load = |value: &AtomicU64| value.load(Ordering::Relaxed);
        ConstGauge::new(i64::from(kernel.available())).encode(encoder.encode_descriptor(
            "farol_pooler_kernel_relay_available",
            "1 when the in-kernel relay of session-mode sessions is loaded (pooler.kernel_relay)",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(load(&kernel.active) as i64).encode(encoder.encode_descriptor(
            "farol_pooler_kernel_relay_sessions",
            "Sessions the kernel relays now",
            None,
            MetricType::Gauge,
        )?)?;
        ConstCounter::new(load(&kernel.handovers)).encode(encoder.encode_descriptor(
            "farol_pooler_kernel_relay_handovers",
            "Sessions handed to the in-kernel relay",
            None,
            MetricType::Counter,
        )?)?;
        let mut family = encoder.encode_descriptor(
            "farol_pooler_kernel_relay_take_backs",
            "Sessions the pooler took back from the kernel, by reason",
            None,
            MetricType::Counter,
        )?;
        for (reason, value) in TakeBack::ALL.iter().zip(&kernel.take_backs) {
            ConstCounter::new(load(value))
                .encode(family.encode_family(&[("reason", reason.label())])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "farol_pooler_kernel_relay_fallbacks",
            "Session-mode sessions left on the userspace relay, by reason",
            None,
            MetricType::Counter,
        )?;
        for (reason, value) in Fallback::ALL.iter().zip(&kernel.fallbacks) {
            ConstCounter::new(load(value))
                .encode(family.encode_family(&[("reason", reason.label())])?)?;
        }
        if let Some(relay) = &kernel.relay {
            let totals = relay.totals();
            for (name, help, value) in [
                (
                    "farol_pooler_kernel_relay_bytes",
                    "Bytes the kernel relayed between clients and servers",
                    totals.bytes,
                ),
                (
                    "farol_pooler_kernel_relay_buffers",
                    "Socket buffers the kernel relayed",
                    totals.buffers,
                ),
                (
                    "farol_pooler_kernel_relay_terminates",
                    "Client Terminate messages the kernel passed up to the pooler",
                    totals.terminates,
                ),
                (
                    "farol_pooler_kernel_relay_unpaired_drops",
                    "Buffers dropped because their socket's partner had closed",
                    totals.unpaired,
                ),
            ] {
                ConstCounter::new(value).encode(encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    MetricType::Counter,
                )?)?;
            }
        }
        Ok(())
    }
}

/// The relay's figures at one moment (tests, and what the metrics show).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelRelaySnapshot {
    pub available: bool,
    pub handovers: u64,
    pub sessions: u64,
    pub take_backs: Vec<(&'static str, u64)>,
    pub fallbacks: Vec<(&'static str, u64)>,
    pub bytes: u64,
    pub terminates: u64,
    /// Buffers dropped for want of a partner (a handover race, or a
    /// partner that closed).
    pub unpaired: u64,
}

impl KernelRelaySnapshot {
    pub fn take_backs(&self, reason: &str) -> u64 {
        self.take_backs
            .iter()
            .find(|(label, _)| *label == reason)
            .map_or(0, |(_, n)| *n)
    }

    pub fn fallbacks(&self, reason: &str) -> u64 {
        self.fallbacks
            .iter()
            .find(|(label, _)| *label == reason)
            .map_or(0, |(_, n)| *n)
    }
}

impl super::Pooler {
    /// `None` when `kernel_relay` is off.
    pub fn kernel_relay_snapshot(&self) -> Option<KernelRelaySnapshot> {
        let kernel = self.kernel_relay.as_ref()?;
        let load = |value: &AtomicU64| value.load(Ordering::Relaxed);
        let totals = kernel
            .relay
            .as_ref()
            .map(SocketRelay::totals)
            .unwrap_or_default();
        Some(KernelRelaySnapshot {
            available: kernel.available(),
            handovers: load(&kernel.handovers),
            sessions: load(&kernel.active),
            take_backs: TakeBack::ALL
                .iter()
                .zip(&kernel.take_backs)
                .map(|(reason, n)| (reason.label(), load(n)))
                .collect(),
            fallbacks: Fallback::ALL
                .iter()
                .zip(&kernel.fallbacks)
                .map(|(reason, n)| (reason.label(), load(n)))
                .collect(),
            bytes: totals.bytes,
            terminates: totals.terminates,
            unpaired: totals.unpaired,
        })
    }
}

/// Watches relayed sockets for a close only. The kernel signals "data
/// ready" on a socket after each buffer its program relays; a watcher
/// registered for reading (tokio's) would wake per message, which is what
/// the relay is for avoiding. This epoll instance asks for `EPOLLRDHUP`
/// alone (hang-ups and errors are always reported), so those signals are
/// filtered out in the kernel; tokio waits on the epoll descriptor itself.
#[derive(Debug)]
pub(crate) struct HangupWatch {
    epoll: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

/// Which socket hung up (the epoll data of its registration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hangup {
    Client,
    Server,
}

impl HangupWatch {
    pub(crate) fn new(
        client: std::os::fd::BorrowedFd<'_>,
        server: std::os::fd::BorrowedFd<'_>,
    ) -> std::io::Result<HangupWatch> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        // SAFETY: plain syscall; the result is checked before use.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor owned by nobody else.
        let epoll = unsafe { OwnedFd::from_raw_fd(raw) };
        for (fd, which) in [(client, Hangup::Client), (server, Hangup::Server)] {
            let mut event = libc::epoll_event {
                events: libc::EPOLLRDHUP as u32,
                u64: which as u64,
            };
            // SAFETY: both descriptors are valid; `event` outlives the call.
            let rc = unsafe {
                libc::epoll_ctl(
                    epoll.as_raw_fd(),
                    libc::EPOLL_CTL_ADD,
                    fd.as_raw_fd(),
                    &mut event,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        // SAFETY: the AsyncFd owns the epoll descriptor, so it stays open
        // as long as it is registered.
        let epoll = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(epoll, tokio::io::Interest::READABLE)
        }
        .map_err(|error| error.into_parts().1)?;
        Ok(HangupWatch { epoll })
    }

    /// Waits for a hang-up (or an error) on either socket.
    pub(crate) async fn next(&self) -> std::io::Result<Hangup> {
        use std::os::fd::AsRawFd;
        loop {
            let mut guard = self.epoll.readable().await?;
            let mut events = [libc::epoll_event { events: 0, u64: 0 }; 2];
            // SAFETY: the epoll descriptor is valid; `events` holds 2.
            let n = unsafe {
                libc::epoll_wait(self.epoll.get_ref().as_raw_fd(), events.as_mut_ptr(), 2, 0)
            };
            if n < 0 {
                let error = std::io::Error::last_os_error();
                if error.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error);
            }
            if n == 0 {
                guard.clear_ready();
                continue;
            }
            let data = events[0].u64;
            return Ok(if data == Hangup::Server as u64 {
                Hangup::Server
            } else {
                Hangup::Client
            });
        }
    }
}

/// A socket that stands in for one the kernel relays while it is out of
/// tokio's hands (unconnected, never used).
pub(crate) fn placeholder_stream() -> std::io::Result<tokio::net::TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    tokio::net::TcpStream::from_std(socket.into())
}
