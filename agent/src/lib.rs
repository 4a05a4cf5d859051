//! Farol's node agent as a library, so the binary, the integration tests and
//! xtask drive the same code.
//!
//! # Layout
//! - [`config`]: the cluster file, parsed and validated.
//! - [`dataplane`]: the eBPF side (load, attach, pin, counters); the only
//!   module that touches BPF maps.
//! - [`balancer`]: `[[service]]` to a kernel plan, DSR host set-up.
//! - [`health`]: health checks, admin states, the agent check.
//! - [`control`]: control socket, status page, reload.
//! - [`metrics`]: Prometheus text on `/metrics`.
//! - [`node`]: what `agent run` does on one node.
//! - [`storage`]: replicated volumes (FUSE mount, replication, self-heal).
//! - [`pgha`]: PostgreSQL run and replicated by the agents (roles, failover operations).
//! - [`pooler`]: the PostgreSQL connection pooler.
//! - [`supervise`]: child processes such as Apache (start, restart, drain, stop).
//! - [`cli`]: the command line.
//! - [`vrrp`]: VRRPv3 (RFC 5798): which node holds the VIPs.

pub mod balancer;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod health;
pub mod metrics;
pub mod node;
pub mod pgha;
pub mod pooler;
pub mod storage;
pub mod supervise;
pub mod vrrp;

/// Renders an error with its chain of causes: "a: b: c".
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
