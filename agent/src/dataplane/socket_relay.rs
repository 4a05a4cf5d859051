//! The pooler's in-kernel relay: `farol_socket_relay` (an `sk_skb` stream
//! verdict program) on a sockhash that pairs a client socket with its
//! server socket, so the bytes of a session-mode session go from one to the
//! other without waking the pooler (see `ebpf/src/socket_relay.rs`).
//!
//! The pooler decides when a pair is handed over and taken back
//! (`pooler::kernel_relay`); this file only loads the program and edits
//! the map. Nothing is pinned: the sockets belong to this process, and
//! the kernel drops a socket from the map when it closes.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    sync::Mutex,
};

use aya::{
    maps::{MapData, PerCpuArray, SockHash},
    programs::SkSkb,
    Ebpf, EbpfLoader,
};
use farol_common::socket_relay::{
    RelayCounter, MAP_SOCKET_RELAY, MAP_SOCKET_RELAY_STATS, PROGRAM_SOCKET_RELAY,
};

use super::{check_privileges, DataplaneError, EBPF_OBJECT};

/// The XDP side's maps, created with the object but never used by the
/// relay: shrunk so the pooler does not hold their full size.
const UNUSED_MAPS: &[&str] = &[
    "PACKET_STATS",
    "MALFORMED",
    "VIPS",
    "OWNED_VIPS",
    "BACKENDS",
    "SVC_BACKENDS",
    "MAGLEV_RING",
    "FLOWS",
    "SVC_STATS",
    "BACKEND_STATS",
    "ACTIVE_FLOWS",
    "RR_CURSOR",
    "SVC_META",
    "NAT_REVERSE",
];

#[derive(Debug, thiserror::Error)]
pub enum PairError {
    #[error("the socket relay is not loaded")]
    NotLoaded,
    #[error("reading the socket cookie")]
    Cookie(#[source] io::Error),
    #[error(
        "the socket relay map refused the socket (full, or not a TCP socket in a state it takes)"
    )]
    Insert(#[source] aya::maps::MapError),
    #[error("waking the relay on data queued before the handover")]
    Kick(#[source] io::Error),
}

/// Totals of the program's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayTotals {
    pub buffers: u64,
    pub bytes: u64,
    pub terminates: u64,
    pub unpaired: u64,
}

/// A client socket and its server socket, both in the map.
#[derive(Debug)]
pub struct Pair {
    cookies: [u64; 2],
}

/// The loaded program and its maps.
pub struct SocketRelay {
    // Holds the program (attached to the map) while the relay is in use.
    _ebpf: Ebpf,
    sockets: Mutex<SockHash<MapData, u64>>,
    stats: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for SocketRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketRelay").finish_non_exhaustive()
    }
}

impl SocketRelay {
    /// Loads the program and attaches it to a fresh sockhash.
    pub fn load() -> Result<SocketRelay, DataplaneError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DataplaneError::NotBuilt);
        }
        check_privileges()?;
        let mut loader = EbpfLoader::new();
        for name in UNUSED_MAPS {
            loader.map_max_entries(name, 64);
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|source| DataplaneError::Load { source })?;
        let map_error = |name: &'static str| move |source| DataplaneError::Map { name, source };
        let sockets: SockHash<MapData, u64> = ebpf
            .take_map(MAP_SOCKET_RELAY)
            .ok_or(DataplaneError::MissingMap {
                name: MAP_SOCKET_RELAY,
            })?
            .try_into()
            .map_err(map_error(MAP_SOCKET_RELAY))?;
        let stats: PerCpuArray<MapData, u64> = ebpf
            .take_map(MAP_SOCKET_RELAY_STATS)
            .ok_or(DataplaneError::MissingMap {
                name: MAP_SOCKET_RELAY_STATS,
            })?
            .try_into()
            .map_err(map_error(MAP_SOCKET_RELAY_STATS))?;
        let name = PROGRAM_SOCKET_RELAY;
        let program: &mut SkSkb = ebpf
            .program_mut(name)
            .ok_or(DataplaneError::MissingProgram { name })?
            .try_into()
            .map_err(|source| DataplaneError::WrongProgramType { name, source })?;
        program
            .load()
            .map_err(|source| DataplaneError::ProgramLoad { name, source })?;
        program
            .attach(sockets.fd())
            .map_err(|source| DataplaneError::ProgramLoad { name, source })?;
        Ok(SocketRelay {
            _ebpf: ebpf,
            sockets: Mutex::new(sockets),
            stats,
        })
    }

    /// Pairs two connected TCP sockets: from now on what arrives on one
    /// leaves by the other, except a lone Terminate message and a bare
    /// FIN, which stay on their socket for the caller to read.
    ///
    /// The caller must have read nothing of either socket that it has not
    /// handled, and nothing must be half-read (no partial message in its
    /// buffers, the receive queues empty or holding only whole buffers
    /// nobody read from): what is queued when the pair enters the map is
    /// then relayed first, in order, by the wake-up below.
    ///
    /// The server must be quiet (waiting for the client): its socket
    /// enters the map first, and a buffer it received before its partner
    /// is there would be dropped (counted as `Unpaired`). The client may
    /// send at any moment: its route is in place before its socket is.
    pub fn pair(&self, client: BorrowedFd<'_>, server: BorrowedFd<'_>) -> Result<Pair, PairError> {
        let cookies = [
            socket_cookie(client).map_err(PairError::Cookie)?,
            socket_cookie(server).map_err(PairError::Cookie)?,
        ];
        {
            let mut sockets = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
            // Under each socket's cookie: its partner. The server's socket
            // goes in first (under the client's cookie), so the client's
            // bytes find their way from the moment its socket is in.
            sockets
                .insert(cookies[0], server.as_raw_fd(), 0)
                .map_err(PairError::Insert)?;
            if let Err(error) = sockets.insert(cookies[1], client.as_raw_fd(), 0) {
                let _ = sockets.remove(&cookies[0]);
                return Err(PairError::Insert(error));
            }
        }
        let pair = Pair { cookies };
        // Data that reached a socket before it entered the map waits in its
        // receive queue until more arrives: setting SO_RCVLOWAT makes TCP
        // signal "data ready" now, which runs the verdict on the queue.
        for fd in [client, server] {
            if let Err(error) = rcvlowat_kick(fd) {
                self.unpair(&pair);
                return Err(PairError::Kick(error));
            }
        }
        Ok(pair)
    }

    /// Takes a pair out of the map: its sockets behave as plain sockets
    /// again. Entries the kernel already dropped (a socket closed) are fine.
    pub fn unpair(&self, pair: &Pair) {
        let mut sockets = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
        for cookie in &pair.cookies {
            let _ = sockets.remove(cookie);
        }
    }

    /// The program's counters, summed over CPUs.
    pub fn totals(&self) -> RelayTotals {
        let read = |counter: RelayCounter| {
            self.stats
                .get(&(counter as u32), 0)
                .map(|values| values.iter().fold(0u64, |sum, v| sum.wrapping_add(*v)))
                .unwrap_or(0)
        };
        RelayTotals {
            buffers: read(RelayCounter::RelayedBuffers),
            bytes: read(RelayCounter::RelayedBytes),
            terminates: read(RelayCounter::TerminatePassed),
            unpaired: read(RelayCounter::Unpaired),
        }
    }
}

/// The kernel's id of a socket (`SO_COOKIE`), the map's key.
fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: fd is a valid descriptor for the call; cookie and len point
    // to a u64 and its size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// `SO_RCVLOWAT` 1 (the default): TCP re-checks the queue and calls the
/// socket's data-ready hook, the relay's verdict once it is in the map.
fn rcvlowat_kick(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: fd is a valid descriptor; the value is a c_int of that size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes queued to be read on a socket (`FIONREAD`): the pooler hands a
/// pair over only when neither socket has a half-read buffer.
pub fn unread_bytes(fd: impl AsFd) -> io::Result<usize> {
    let mut queued: libc::c_int = 0;
    // SAFETY: fd is valid for the call; FIONREAD writes one c_int.
    let rc = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), libc::FIONREAD, &mut queued) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(queued.max(0) as usize)
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::{TcpListener, TcpStream},
        os::fd::AsFd,
        time::Duration,
    };

    use super::*;

    /// Two loopback connections, as the pooler holds them: (client's end,
    /// pooler's end of the client), (pooler's end of the server, server's).
    fn connection() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let outer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (inner, _) = listener.accept().unwrap();
        for s in [&outer, &inner] {
            s.set_nodelay(true).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        (outer, inner)
    }

    fn relay() -> Option<SocketRelay> {
        match SocketRelay::load() {
            Ok(relay) => Some(relay),
            Err(error @ (DataplaneError::NotBuilt | DataplaneError::NotPermitted { .. })) => {
                eprintln!("skipped: {error}");
                None
            }
            Err(error) => panic!("loading the socket relay: {}", crate::error_chain(&error)),
        }
    }

    fn read_exactly(stream: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        stream.read_exact(&mut buf).unwrap();
        buf
    }

    #[test]
    fn bytes_cross_in_the_kernel_both_ways_and_a_terminate_stays_with_the_pooler() {
        let Some(relay) = relay() else { return };
        let (mut client, pooler_client) = connection();
        let (pooler_server, mut server) = connection();
        // Sent before the pair exists: relayed first, by the wake-up.
        client.write_all(b"Q\0\0\0\x0aearly\0").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let before = relay.totals();
        let pair = relay
            .pair(pooler_client.as_fd(), pooler_server.as_fd())
            .unwrap();
        assert_eq!(read_exactly(&mut server, 11), b"Q\0\0\0\x0aearly\0");
        client.write_all(b"Q\0\0\0\x09late\0").unwrap();
        assert_eq!(read_exactly(&mut server, 10), b"Q\0\0\0\x09late\0");
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        server.write_all(&big).unwrap();
        assert_eq!(read_exactly(&mut client, big.len()), big);
        // The pooler's ends saw none of it.
        assert_eq!(unread_bytes(&pooler_client).unwrap(), 0);
        assert_eq!(unread_bytes(&pooler_server).unwrap(), 0);

        client
            .write_all(&farol_common::socket_relay::TERMINATE_MESSAGE)
            .unwrap();
        let mut pooler_client = pooler_client;
        pooler_client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(
            read_exactly(&mut pooler_client, 5),
            farol_common::socket_relay::TERMINATE_MESSAGE
        );
        let after = relay.totals();
        assert!(after.terminates > before.terminates);
        assert!(after.bytes - before.bytes >= 11 + 10 + big.len() as u64);

        // Taken back: plain sockets again, in both directions.
        relay.unpair(&pair);
        let mut pooler_server = pooler_server;
        server.write_all(b"after").unwrap();
        pooler_server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(read_exactly(&mut pooler_server, 5), b"after");
        client.write_all(b"again").unwrap();
        assert_eq!(read_exactly(&mut pooler_client, 5), b"again");
    }

    #[test]
    fn a_client_that_terminates_and_closes_leaves_its_server_socket_usable() {
        let Some(relay) = relay() else { return };
        let (mut client, mut pooler_client) = connection();
        let (mut pooler_server, mut server) = connection();
        let pair = relay
            .pair(pooler_client.as_fd(), pooler_server.as_fd())
            .unwrap();
        client.write_all(b"Q\0\0\0\x09late\0").unwrap();
        assert_eq!(read_exactly(&mut server, 10), b"Q\0\0\0\x09late\0");
        server.write_all(b"answer").unwrap();
        assert_eq!(read_exactly(&mut client, 6), b"answer");
        client
            .write_all(&farol_common::socket_relay::TERMINATE_MESSAGE)
            .unwrap();
        // Closed before the pooler takes the pair back: the FIN must stay
        // with the client's socket, not shut the server's down.
        drop(client);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            read_exactly(&mut pooler_client, 5),
            farol_common::socket_relay::TERMINATE_MESSAGE
        );
        let mut buf = [0u8; 8];
        assert_eq!(pooler_client.read(&mut buf).unwrap(), 0, "EOF seen");
        relay.unpair(&pair);
        drop(pooler_client);
        std::thread::sleep(Duration::from_millis(50));
        pooler_server.write_all(b"discard").unwrap();
        assert_eq!(read_exactly(&mut server, 7), b"discard");
        server.set_nonblocking(true).unwrap();
        let extra = server.read(&mut buf);
        assert!(
            matches!(&extra, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "nothing else reached the server: {extra:?}"
        );
    }

    // Known gap, kept to measure a fix: on this kernel (6.18) a verdict-only
    // redirect has no backpressure. The program takes every buffer off the
    // server socket's receive queue at once and the kernel queues it for
    // the client's egress without a bound: 512 MiB were accepted in about
    // a second for a client that read nothing.
    #[test]
    #[ignore = "known gap: sockmap redirect to egress has no backpressure (README, kernel_relay)"]
    fn a_client_that_stops_reading_holds_the_server_back() {
        let Some(relay) = relay() else { return };
        let (client, pooler_client) = connection();
        let (pooler_server, mut server) = connection();
        let pair = relay
            .pair(pooler_client.as_fd(), pooler_server.as_fd())
            .unwrap();
        // The client reads nothing: the server's writes must stall once
        // the sockets' buffers are full, not be buffered without bound.
        server.set_nonblocking(true).unwrap();
        let chunk = vec![7u8; 64 * 1024];
        let mut written = 0usize;
        let started = std::time::Instant::now();
        while written < 512 * 1024 * 1024 && started.elapsed() < Duration::from_secs(10) {
            match server.write(&chunk) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(200));
                    match server.write(&chunk) {
                        Ok(n) => written += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("{e}"),
                    }
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(
            written < 64 * 1024 * 1024,
            "{written} bytes accepted for a client that reads nothing"
        );
        relay.unpair(&pair);
        drop(client);
    }

    #[test]
    fn a_closing_peer_is_seen_by_the_pooler_while_paired() {
        let Some(relay) = relay() else { return };
        let (client, mut pooler_client) = connection();
        let (pooler_server, _server) = connection();
        let pair = relay
            .pair(pooler_client.as_fd(), pooler_server.as_fd())
            .unwrap();
        drop(client);
        let mut buf = [0u8; 16];
        assert_eq!(pooler_client.read(&mut buf).unwrap(), 0, "EOF seen");
        relay.unpair(&pair);
    }
}
