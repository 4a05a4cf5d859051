//! Farol's kernel side: the XDP program on every node's LAN interface.
//!
//! `farol_ingress` is the packet path:
//! - Ethernet, then up to two VLAN tags (802.1Q, 802.1ad);
//! - ARP: checked and counted;
//! - IPv4 (options included) and IPv6 (extension headers walked): checked
//!   against the frame, counted, then TCP, UDP, ICMP/ICMPv6 checked and counted;
//! - everything else: counted as non-IP.
//!
//! - ARP requests for a VIP this node holds: answered here (XDP_TX);
//! - TCP and UDP to a VIP: balanced (`balance.rs`): sent to a backend's MAC
//!   (XDP_TX, DSR), passed up when the backend is this node, dropped and
//!   counted when no backend can take the flow;
//! - NAT services and replies to NAT ports: `farol_nat` (`nat.rs`), by a
//!   tail call;
//! - everything else is passed to the kernel (XDP_PASS).
//!
//! A packet is counted under each layer it completed; one whose headers are
//! cut short or contradict themselves is also counted under `Malformed` with
//! its reason and passed, never aborted.
#![no_std]
#![no_main]
// Atomic adds on map values: see balance.rs::add_active. The crate is
// built with RUSTC_BOOTSTRAP=1 for -Z build-std already (TOOLCHAIN.md).
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod balance;
mod maps;
mod nat;
mod parse;
mod socket_relay;
mod stats;
mod vip;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use farol_common::MalformedReason;

use crate::parse::{Network, Packet, Transport};

#[xdp]
pub fn farol_ingress(ctx: XdpContext) -> u32 {
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    let mut slot = core::mem::MaybeUninit::uninit();
    let packet = Packet::zero(&mut slot);
    let verdict = try_farol_ingress(&ctx, packet, frame_len);
    stats::count_packet(packet, frame_len);
    match verdict {
        Ok(nat::HANDOFF) => nat::hand_off(&ctx),
        Ok(action) => action,
        Err(reason) => {
            stats::count_malformed(reason, frame_len);
            xdp_action::XDP_PASS
        }
    }
}

fn try_farol_ingress(
    ctx: &XdpContext,
    packet: &mut Packet,
    frame_len: u64,
) -> Result<u32, MalformedReason> {
    parse::classify(ctx, packet)?;
    Ok(match (packet.network, packet.transport) {
        (Network::Arp, _) => vip::answer_arp(ctx, packet.l3_offset),
        (Network::Ipv4 | Network::Ipv6, Transport::Tcp | Transport::Udp) => {
            balance::forward(ctx, packet, frame_len)
        }
        (Network::Ipv4 | Network::Ipv6, Transport::Icmp) => {
            balance::forward_icmp_error(ctx, packet, frame_len)
        }
        _ => xdp_action::XDP_PASS,
    })
}

/// A bare XDP_PASS, the per-packet benchmark's baseline (`cargo xtask bench
/// xdp`); never attached.
#[xdp]
pub fn farol_baseline(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that reaches here; this only satisfies
    // the compiler.
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
