//! The contract between Farol's kernel programs (`ebpf/`) and the agent.
//!
//! Everything here is `no_std`, `#[repr(C)]` and `Copy`, so one definition
//! serves both sides: the eBPF crate builds it for `bpfel-unknown-none`, the
//! agent with the `user` feature, which adds `aya::Pod`. Layouts are pinned
//! with compile-time size assertions; a change that moves a field breaks the
//! build on both sides rather than the data at run time.
#![no_std]

pub mod lb;
pub mod maps;
pub mod socket_relay;
pub mod stats;

pub use maps::PacketStats;
pub use stats::{MalformedReason, PacketClass};
