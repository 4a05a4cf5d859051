//! The pooler's in-kernel relay (`ebpf/src/socket_relay.rs`): names,
//! sizes and counters shared by the program and the agent.

/// The `sk_skb` stream verdict program.
pub const PROGRAM_SOCKET_RELAY: &str = "farol_socket_relay";

/// The sockhash: socket cookie -> the socket it is paired with.
pub const MAP_SOCKET_RELAY: &str = "SOCKET_RELAY";

/// Per-CPU counters, indexed by [`RelayCounter`].
pub const MAP_SOCKET_RELAY_STATS: &str = "SOCKET_RELAY_STATS";

/// Sockets the sockhash holds: two per relayed session.
pub const MAX_RELAYED_SOCKETS: u32 = 8192;

/// A PostgreSQL Terminate message: 'X' and its length, 4.
pub const TERMINATE_MESSAGE: [u8; 5] = [b'X', 0, 0, 0, 4];

/// What `SOCKET_RELAY_STATS` counts.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayCounter {
    /// Buffers sent on to the paired socket.
    RelayedBuffers = 0,
    /// Their bytes.
    RelayedBytes = 1,
    /// Terminate messages passed up to the pooler.
    TerminatePassed = 2,
    /// Buffers dropped because the socket had no partner in the map.
    Unpaired = 3,
}

/// Slots in `SOCKET_RELAY_STATS`.
pub const RELAY_COUNTERS: u32 = 4;
