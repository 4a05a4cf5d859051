//! `farol_socket_relay`: the pooler's in-kernel relay (session mode).
//!
//! An `sk_skb` stream verdict program (no stream parser) attached to
//! `SOCKET_RELAY`, a sockhash that stores, under each relayed socket's
//! cookie, the socket it is paired with. What arrives on a client socket
//! leaves by its server's egress and the other way round: the pooler
//! process is not woken per message.
//!
//! One exception: a buffer that is exactly a Terminate message ('X' and
//! length 4) is passed to its own socket's receive queue, so the pooler
//! reads it, takes the pair back, and resets and reuses the server. A
//! bare FIN (no bytes) is passed up too.

use aya_ebpf::{
    bindings::sk_action,
    btf_maps::{PerCpuArray, SockHash},
    helpers::bpf_get_socket_cookie,
    macros::{btf_map, stream_verdict},
    programs::SkBuffContext,
};
use farol_common::socket_relay::{
    RelayCounter, MAX_RELAYED_SOCKETS, RELAY_COUNTERS, TERMINATE_MESSAGE,
};

/// Socket cookie -> the socket paired with it (written by the agent).
#[btf_map]
pub(crate) static SOCKET_RELAY: SockHash<u64, { MAX_RELAYED_SOCKETS as usize }> = SockHash::new();

/// Per-CPU counters, indexed by `RelayCounter`.
#[btf_map]
pub(crate) static SOCKET_RELAY_STATS: PerCpuArray<u64, { RELAY_COUNTERS as usize }> =
    PerCpuArray::new();

#[inline(always)]
fn add(counter: RelayCounter, value: u64) {
    if let Some(slot) = SOCKET_RELAY_STATS.get_ptr_mut(counter as u32) {
        // SAFETY: this CPU's slot from a successful lookup; one program
        // invocation at a time runs on a CPU.
        unsafe { *slot += value };
    }
}

#[stream_verdict]
pub fn farol_socket_relay(ctx: SkBuffContext) -> u32 {
    let len = ctx.len();
    if len == 0 {
        // A bare FIN: stays with its own socket, where the pooler sees
        // the close. Redirected, it would shut the partner's sending side
        // down, and the server could not be reset and reused.
        return sk_action::SK_PASS;
    }
    if len as usize == TERMINATE_MESSAGE.len() {
        let mut head = [0u8; TERMINATE_MESSAGE.len()];
        if ctx.load_bytes(0, &mut head).is_ok() && head == TERMINATE_MESSAGE {
            add(RelayCounter::TerminatePassed, 1);
            return sk_action::SK_PASS;
        }
    }
    // SAFETY: the helper only reads the socket of the context's skb.
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let verdict = SOCKET_RELAY.redirect_skb(&ctx, &mut cookie, 0) as u32;
    if verdict == sk_action::SK_PASS {
        add(RelayCounter::RelayedBuffers, 1);
        add(RelayCounter::RelayedBytes, u64::from(len));
    } else {
        // No partner (it closed and left the map): dropped, as the
        // partner's peer is gone; the pooler sees the close.
        add(RelayCounter::Unpaired, 1);
    }
    verdict
}
