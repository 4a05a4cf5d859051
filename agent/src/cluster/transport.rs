//! Agent-to-agent messages over HTTP/1.1 on `[cluster_state] port`: Raft's
//! RPCs (append entries, vote, snapshot), writes forwarded to the Raft
//! leader, liveness pings, and the primary lease's promises and
//! revocations (`super::promise`). One request per connection (a handful of
//! nodes on a LAN), JSON bodies.
//!
//! Every request and every response carries `x-farol-node` (the sender)
//! and `x-farol-mac`: HMAC-SHA256 with the cluster secret over a domain
//! tag, the path, the sender and the body. A message without a valid tag,
//! larger than [`MAX_MESSAGE`], or unreadable is refused, logged (at most
//! once a second per reason) and counted; it never reaches Raft.
//! Replays are not detected: a replayed Raft RPC is harmless to Raft, and
//! a replayed write is a compare-and-set that fails once the epoch moved.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use axum::{
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
    Router,
};
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{client::conn::http1, Request as HttpRequest};
use hyper_util::rt::TokioIo;
use serde::{de::DeserializeOwned, Serialize};
use sha2::Sha256;
use tokio::net::TcpStream;
use tracing::warn;

/// The largest message either side accepts (Raft batches are small; the
/// snapshot travels in chunks well below this).
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024;

const NODE_HEADER: &str = "x-farol-node";
const MAC_HEADER: &str = "x-farol-mac";

/// The cluster secret, ready to sign and check messages.
#[derive(Clone)]
pub(crate) struct MessageKey(Hmac<Sha256>);

impl std::fmt::Debug for MessageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MessageKey(..)")
    }
}

impl MessageKey {
    pub(crate) fn new(secret: &[u8]) -> Option<MessageKey> {
        if secret.is_empty() {
            return None;
        }
        Hmac::<Sha256>::new_from_slice(secret).ok().map(MessageKey)
    }

    fn mac(&self, direction: &str, path: &str, node: &str, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.0.clone();
        for part in ["farol-cluster-v1", direction, path, node] {
            mac.update(part.as_bytes());
            mac.update(b"\n");
        }
        mac.update(body);
        mac
    }

    fn sign(&self, direction: &str, path: &str, node: &str, body: &[u8]) -> String {
        hex(&self
            .mac(direction, path, node, body)
            .finalize()
            .into_bytes())
    }

    fn verify(&self, direction: &str, path: &str, node: &str, body: &[u8], tag: &str) -> bool {
        match unhex(tag) {
            Some(tag) => self
                .mac(direction, path, node, body)
                .verify_slice(&tag)
                .is_ok(),
            None => false,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Why a message was refused, the `reason` label of
/// `farol_cluster_rejected_messages_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// No tag, a wrong tag or an unknown sender.
    Unauthenticated,
    /// Over [`MAX_MESSAGE`].
    Oversized,
    /// Authenticated but not a message of this protocol.
    Malformed,
}

impl Rejection {
    pub const ALL: [Rejection; 3] = [
        Rejection::Unauthenticated,
        Rejection::Oversized,
        Rejection::Malformed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Rejection::Unauthenticated => "unauthenticated",
            Rejection::Oversized => "oversized",
            Rejection::Malformed => "malformed",
        }
    }
}

/// Refused messages, by reason; the last log time keeps logs bounded.
#[derive(Debug, Default)]
pub struct Rejections {
    counts: [AtomicU64; 3],
    last_logged: Mutex<HashMap<&'static str, Instant>>,
}

impl Rejections {
    pub fn count(&self, reason: Rejection) -> u64 {
        self.counts[reason as usize].load(Ordering::Relaxed)
    }

    pub(crate) fn record(&self, reason: Rejection, path: &str, detail: &str) {
        self.counts[reason as usize].fetch_add(1, Ordering::Relaxed);
        let mut last = self
            .last_logged
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let now = Instant::now();
        let due = last
            .get(reason.label())
            .is_none_or(|at| now.duration_since(*at) >= Duration::from_secs(1));
        if due {
            last.insert(reason.label(), now);
            warn!(reason = reason.label(), path, detail, "cluster message refused (counted in farol_cluster_rejected_messages_total; further ones this second not logged)");
        }
    }
}

/// What a request to a peer can run into.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("HTTP exchange with {addr} failed: {detail}")]
    Exchange { addr: String, detail: String },
    #[error("{addr} answered HTTP {status}: {body}")]
    Status {
        addr: String,
        status: u16,
        body: String,
    },
    #[error("{addr} answered without a valid authentication tag (another cluster secret?)")]
    Unauthenticated { addr: String },
    #[error("{addr} answered something unreadable: {detail}")]
    Decode { addr: String, detail: String },
}

impl TransportError {
    /// True when the peer could not be reached at all (Raft backs off).
    pub(crate) fn is_unreachable(&self) -> bool {
        matches!(
            self,
            TransportError::Connect { .. } | TransportError::Timeout { .. }
        )
    }
}

/// The client side: signs requests, checks responses.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    pub(crate) node: String,
    pub(crate) key: MessageKey,
}

impl Client {
    /// POSTs `request` to `path` on `addr` and decodes the answer.
    pub(crate) async fn call<Q: Serialize, A: DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        request: &Q,
        timeout: Duration,
    ) -> Result<A, TransportError> {
        let body = serde_json::to_vec(request).map_err(|error| TransportError::Decode {
            addr: addr.to_owned(),
            detail: error.to_string(),
        })?;
        let exchange = self.exchange(addr, path, body);
        let (status, node, tag, body) = match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(TransportError::Timeout {
                    addr: addr.to_owned(),
                    timeout,
                })
            }
        };
        if status != 200 {
            return Err(TransportError::Status {
                addr: addr.to_owned(),
                status,
                body: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            });
        }
        if !self.key.verify("response", path, &node, &body, &tag) {
            return Err(TransportError::Unauthenticated {
                addr: addr.to_owned(),
            });
        }
        serde_json::from_slice(&body).map_err(|error| TransportError::Decode {
            addr: addr.to_owned(),
            detail: error.to_string(),
        })
    }

    async fn exchange(
        &self,
        addr: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, String, String, Bytes), TransportError> {
        let failed = |detail: String| TransportError::Exchange {
            addr: addr.to_owned(),
            detail,
        };
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| TransportError::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|error| failed(error.to_string()))?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        let tag = self.key.sign("request", path, &self.node, &body);
        let request = HttpRequest::builder()
            .method("POST")
            .uri(path)
            .header(hyper::header::HOST, addr)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::CONNECTION, "close")
            .header(NODE_HEADER, &self.node)
            .header(MAC_HEADER, tag)
            .body(Full::new(Bytes::from(body)))
            .map_err(|error| failed(error.to_string()))?;
        let result = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|error| failed(error.to_string()))?;
            let status = response.status().as_u16();
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|value| value.to_str().ok())
                    .unwrap_or_default()
                    .to_owned()
            };
            let (node, tag) = (header(NODE_HEADER), header(MAC_HEADER));
            let body = Limited::new(response.into_body(), MAX_MESSAGE)
                .collect()
                .await
                .map_err(|error| failed(format!("body: {error}")))?
                .to_bytes();
            Ok((status, node, tag, body))
        }
        .await;
        driver.abort();
        result
    }
}

/// What the server side hands an authenticated message to.
pub(crate) trait Handler: Send + Sync + 'static {
    /// Handles one authenticated message on `path`; `Err` is a malformed
    /// message (logged and counted by the caller).
    fn handle(
        self: Arc<Self>,
        path: &'static str,
        sender: String,
        body: Bytes,
    ) -> impl std::future::Future<Output = Result<Vec<u8>, String>> + Send;
}

struct ServerState<H> {
    node: String,
    key: MessageKey,
    known: Vec<String>,
    rejections: Arc<Rejections>,
    handler: Arc<H>,
}

/// The routes of the cluster port.
pub(crate) fn routes<H: Handler>(
    node: String,
    key: MessageKey,
    known: Vec<String>,
    rejections: Arc<Rejections>,
    handler: Arc<H>,
    paths: &[&'static str],
) -> Router {
    let state = Arc::new(ServerState {
        node,
        key,
        known,
        rejections,
        handler,
    });
    let mut router = Router::new();
    for &path in paths {
        router = router.route(
            path,
            post(
                move |State(state): State<Arc<ServerState<H>>>,
                      headers: HeaderMap,
                      body: Result<Bytes, axum::extract::rejection::BytesRejection>| async move {
                    serve(state, path, headers, body).await
                },
            ),
        );
    }
    router
        .layer(DefaultBodyLimit::max(MAX_MESSAGE))
        .with_state(state)
}

async fn serve<H: Handler>(
    state: Arc<ServerState<H>>,
    path: &'static str,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            let (reason, status) = if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                (Rejection::Oversized, StatusCode::PAYLOAD_TOO_LARGE)
            } else {
                (Rejection::Malformed, StatusCode::BAD_REQUEST)
            };
            state
                .rejections
                .record(reason, path, &rejection.body_text());
            return (status, rejection.body_text()).into_response();
        }
    };
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (sender, tag) = (header(NODE_HEADER), header(MAC_HEADER));
    if !state.known.contains(&sender) || !state.key.verify("request", path, &sender, &body, &tag) {
        let detail = if tag.is_empty() {
            "no authentication tag".to_owned()
        } else if !state.known.contains(&sender) {
            format!("sender {sender:?} is not a node of the cluster")
        } else {
            format!("bad authentication tag from {sender:?} (another cluster secret?)")
        };
        state
            .rejections
            .record(Rejection::Unauthenticated, path, &detail);
        return (StatusCode::UNAUTHORIZED, "unauthenticated\n").into_response();
    }
    match state.handler.clone().handle(path, sender, body).await {
        Ok(answer) => {
            let tag = state.key.sign("response", path, &state.node, &answer);
            let mut response = (
                StatusCode::OK,
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                answer,
            )
                .into_response();
            if let (Ok(node), Ok(tag)) = (
                HeaderValue::from_str(&state.node),
                HeaderValue::from_str(&tag),
            ) {
                response.headers_mut().insert(NODE_HEADER, node);
                response.headers_mut().insert(MAC_HEADER, tag);
            }
            response
        }
        Err(detail) => {
            state.rejections.record(Rejection::Malformed, path, &detail);
            (StatusCode::BAD_REQUEST, format!("malformed: {detail}\n")).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_verifies_only_with_the_same_secret_path_sender_and_body() {
        let key = MessageKey::new(b"a cluster secret 0123").unwrap();
        let other = MessageKey::new(b"another secret 012345").unwrap();
        let tag = key.sign("request", "/raft/vote", "nuster1", b"{}");
        assert!(key.verify("request", "/raft/vote", "nuster1", b"{}", &tag));
        assert!(!other.verify("request", "/raft/vote", "nuster1", b"{}", &tag));
        assert!(!key.verify("request", "/raft/append", "nuster1", b"{}", &tag));
        assert!(!key.verify("request", "/raft/vote", "nuster2", b"{}", &tag));
        assert!(!key.verify("request", "/raft/vote", "nuster1", b"{ }", &tag));
        assert!(!key.verify("response", "/raft/vote", "nuster1", b"{}", &tag));
        assert!(!key.verify("request", "/raft/vote", "nuster1", b"{}", "zz"));
        assert!(!key.verify("request", "/raft/vote", "nuster1", b"{}", ""));
        assert!(MessageKey::new(b"").is_none());
    }
}
