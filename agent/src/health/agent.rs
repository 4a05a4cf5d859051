//! Admin states and the agent check.
//!
//! # Why an agent check, not a fan-out
//!
//! A drain asked for on a backend node (its Apache is about to stop, issue
//! 8) must reach every balancer that sends it traffic within one check
//! interval. Two designs were weighed:
//!
//! - a fan-out: the node tells every balancer over an authenticated
//!   channel. It needs a list of balancers that is right at that moment
//!   (VRRP may move the VIP), retries for a balancer that is restarting,
//!   and a secret; a balancer that missed the message never learns it.
//! - a pull, HAProxy's `agent-check`: every agent serves its own admin
//!   state at `GET /agent` on its HTTP (metrics) port, and every balancer's
//!   checks of a node's backends read it at each check. Nothing to keep in
//!   sync: a balancer that starts, restarts or takes over the VIP learns the
//!   state at its next check, and the delay is bounded by the interval.
//!
//! Farol pulls. The answer is one word, `ready`, `drain` or `maint`, so
//! `curl NODE:9477/agent` shows it too. A node whose agent does not answer
//! keeps its last known admin state (as HAProxy does when the agent port is
//! closed): the service check alone then decides up or down. A backend
//! given by address (not a node) has no agent to ask.
//!
//! # Applied, not only read
//!
//! Reading a drain is not acting on it: the balancer still has to rebuild
//! its plan and write its maps (a Maglev table is 65537 map writes, slow on
//! a starved CPU). So each balancer tells the node, in its request, which
//! of the node's admin states its maps hold: `GET /agent?applied=drain`
//! (`pending` while a state it read is not applied yet), and right after it
//! applies a change it asks once more just to say so. A drain on the node
//! waits for `applied=drain` from every balancer instead of guessing how
//! long an apply takes (see `crate::supervise::drain`).
//!
//! The admin state read this way is combined with any state set locally on
//! the balancer (`agent backend drain NODE` run on the balancer itself);
//! the most restrictive wins (maint over drain over ready), so `enable` on a
//! balancer cannot undo a drain the node asked for.

use std::{net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use super::{http::exchange, tcp::describe_connect_error};

/// The path every agent answers its own admin state on.
pub const AGENT_PATH: &str = "/agent";

/// What an operator (or the node itself) wants of a backend.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    /// Takes flows as its checks and weight say.
    #[default]
    Ready,
    /// No new flows (weight 0); established flows finish.
    Drain,
    /// Out of service (HAProxy's MAINT): like a failed check, established
    /// flows are moved to other backends.
    Maint,
}

impl AdminState {
    pub const ALL: [AdminState; 3] = [AdminState::Ready, AdminState::Drain, AdminState::Maint];

    pub fn label(self) -> &'static str {
        match self {
            AdminState::Ready => "ready",
            AdminState::Drain => "drain",
            AdminState::Maint => "maint",
        }
    }

    pub fn parse(text: &str) -> Option<AdminState> {
        AdminState::ALL
            .into_iter()
            .find(|state| state.label() == text.trim())
    }
}

/// What a balancer's maps hold of a node's admin state, told to the node
/// with each agent check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// A state read from the node is not in the maps yet.
    Pending,
    /// The maps hold this state.
    State(AdminState),
}

impl Applied {
    pub fn label(self) -> &'static str {
        match self {
            Applied::Pending => "pending",
            Applied::State(state) => state.label(),
        }
    }

    pub fn parse(text: &str) -> Option<Applied> {
        match text {
            "pending" => Some(Applied::Pending),
            other => AdminState::parse(other).map(Applied::State),
        }
    }

    /// The `applied=` parameter of an agent request's query, if any.
    pub fn from_query(query: Option<&str>) -> Result<Option<Applied>, String> {
        let Some(value) = query
            .unwrap_or_default()
            .split('&')
            .find_map(|pair| pair.strip_prefix("applied="))
        else {
            return Ok(None);
        };
        Applied::parse(value).map(Some).ok_or_else(|| {
            format!("applied: expected ready, drain, maint or pending, not {value:?}")
        })
    }
}

/// Asks the agent at `addr` for its node's admin state, telling it what
/// this node's maps hold of it.
pub async fn query(
    addr: SocketAddr,
    timeout: Duration,
    applied: Applied,
) -> Result<AdminState, String> {
    let attempt = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|error| describe_connect_error(&error))?;
        let path = format!("{AGENT_PATH}?applied={}", applied.label());
        let response = exchange(stream, "GET", &path, &addr.to_string(), None)
            .await
            .map_err(|error| error.to_string())?;
        if response.status != 200 {
            return Err(format!("agent answered HTTP {}", response.status));
        }
        let text = String::from_utf8_lossy(&response.body);
        AdminState::parse(&text).ok_or_else(|| format!("agent answered {:?}", text.trim()))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("agent check timed out after {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_order_from_least_to_most_restrictive() {
        assert!(AdminState::Ready < AdminState::Drain);
        assert!(AdminState::Drain < AdminState::Maint);
        assert_eq!(AdminState::parse("drain\n"), Some(AdminState::Drain));
        assert_eq!(AdminState::parse("up"), None);
    }

    #[test]
    fn the_applied_report_is_read_from_the_query() {
        assert_eq!(Applied::from_query(None), Ok(None));
        assert_eq!(Applied::from_query(Some("x=1")), Ok(None));
        assert_eq!(
            Applied::from_query(Some("applied=drain")),
            Ok(Some(Applied::State(AdminState::Drain)))
        );
        assert_eq!(
            Applied::from_query(Some("a=b&applied=pending")),
            Ok(Some(Applied::Pending))
        );
        let error = Applied::from_query(Some("applied=soon")).unwrap_err();
        assert!(
            error.contains("applied") && error.contains("soon"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_garbage_agent_answer_is_an_error_not_a_state() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buffer = [0; 1024];
            let _ = stream.read(&mut buffer).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nmaybe")
                .await;
        });
        let error = query(addr, Duration::from_secs(1), Applied::Pending)
            .await
            .unwrap_err();
        assert!(error.contains("maybe"), "{error}");
    }
}
