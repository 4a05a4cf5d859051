//! Patroni-compatible health endpoints, so HAProxy configurations written
//! for Patroni (`option httpchk GET /primary`, `/replica?lag=10MB`) keep
//! working against Farol's agents:
//!
//! - `GET /primary` (and Patroni's older `/master`, `/read-write`): 200 if
//!   this node runs a primary that accepts writes (the agent wants it
//!   primary and the fence is down), else 503;
//! - `GET /replica`: 200 if a standby streaming from its upstream; with
//!   `?lag=<bytes>` (`16777216` or `16MB`), 503 beyond that replay lag or
//!   when the lag is unknown;
//! - `GET /health`: 200 if PostgreSQL answers.
//!
//! Each answers from a fresh look at the server, with a JSON body in the
//! shape of Patroni's (`state`, `role`, `timeline`, `xlog`).

use std::net::SocketAddr;

use axum::{
    extract::{RawQuery, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use super::{
    local::{ObservedRole, PgStatus},
    Pgha, PghaError, Role,
};
use crate::config::pgha::parse_byte_size;

/// The routes, for the agent's own listener or another router.
pub fn routes(pgha: Pgha) -> Router {
    Router::new()
        .route("/primary", get(primary))
        .route("/master", get(primary))
        .route("/read-write", get(primary))
        .route("/replica", get(replica))
        .route("/health", get(health))
        .route("/patroni", get(health))
        .with_state(pgha)
}

/// Binds `addr` (done before anything else starts, so a port conflict
/// leaves nothing behind).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, PghaError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| PghaError::Io {
            what: format!(
                "cannot listen on {addr} for /primary and /replica (set postgres.api_listen)"
            ),
            source,
        })
}

/// Serves the routes until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    pgha: Pgha,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), PghaError> {
    axum::serve(listener, routes(pgha))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| PghaError::Io {
            what: "the PostgreSQL health endpoint failed".into(),
            source,
        })
}

fn body(pgha: &Pgha, status: &PgStatus) -> Value {
    let desired = pgha.desired();
    let role = match status.role {
        ObservedRole::Primary => "primary",
        ObservedRole::Standby => "replica",
        ObservedRole::Down => "unknown",
    };
    let xlog = match status.role {
        ObservedRole::Primary => json!({ "location": status.lsn.map(|l| l.0) }),
        _ => json!({
            "received_location": status.receive_lsn.map(|l| l.0),
            "replayed_location": status.replay_lsn.map(|l| l.0),
            "streaming": status.streaming,
        }),
    };
    json!({
        "state": if status.role == ObservedRole::Down { "stopped" } else { "running" },
        "role": role,
        "timeline": status.timeline,
        "xlog": xlog,
        "lsn": status.lsn.map(|l| l.to_string()),
        "lag": status.lag_bytes,
        "fenced": status.fenced,
        "replication": status.replication,
        "node": pgha.plan().node,
        "desired_role": desired.role.to_string(),
        "epoch": desired.epoch,
        "error": status.error,
    })
}

fn answer(ok: bool, body: Value) -> Response {
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(code, &body)
}

/// A JSON response (axum's `Json` needs a feature that pulls in more).
fn json_response(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The `lag` parameter of a query string, if any.
fn lag_parameter(query: Option<&str>) -> Option<String> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("lag="))
        .map(|value| value.replace('+', " ").replace("%20", " "))
}

async fn primary(State(pgha): State<Pgha>) -> Response {
    let status = pgha.observe_now(false).await;
    let ok = status.role == ObservedRole::Primary
        && !status.fenced
        && pgha.desired().role == Role::Primary;
    answer(ok, body(&pgha, &status))
}

async fn replica(State(pgha): State<Pgha>, RawQuery(query): RawQuery) -> Response {
    let bound = match lag_parameter(query.as_deref())
        .as_deref()
        .map(parse_byte_size)
    {
        None => None,
        Some(Ok(bytes)) => Some(bytes),
        Some(Err(why)) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                &json!({ "error": format!("lag: {why}") }),
            )
        }
    };
    let status = pgha.observe_now(true).await;
    let within = match bound {
        None => true,
        Some(bound) => status.lag_bytes.is_some_and(|lag| lag <= bound),
    };
    let ok = status.role == ObservedRole::Standby && status.streaming && within;
    answer(ok, body(&pgha, &status))
}

async fn health(State(pgha): State<Pgha>) -> Response {
    let status = pgha.observe_now(false).await;
    answer(status.role != ObservedRole::Down, body(&pgha, &status))
}

#[cfg(test)]
mod tests {
    use super::lag_parameter;

    #[test]
    fn the_lag_parameter_is_found_among_others() {
        assert_eq!(lag_parameter(Some("lag=10MB")).as_deref(), Some("10MB"));
        assert_eq!(lag_parameter(Some("x=1&lag=1+MB")).as_deref(), Some("1 MB"));
        assert_eq!(lag_parameter(Some("x=1")), None);
        assert_eq!(lag_parameter(None), None);
    }
}
