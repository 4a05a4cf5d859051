//! Prometheus text on `/metrics`. Data-plane counters are read from the BPF
//! maps at scrape time (no copy kept in the agent), so a scrape always shows
//! what the kernel counted up to that moment.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::IntoResponse,
    routing::get,
    Router,
};
use farol_common::{MalformedReason, PacketClass};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::net::TcpListener;
use tracing::warn;

use crate::dataplane::{lb::LoadBalancerMaps, AttachMode, Counters};

mod lb;
mod text;

/// What Prometheus text 0.0.4 is served as (see text.rs).
const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen on {addr} for /metrics (is another agent or program using the port? set metrics_listen)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the metrics server failed")]
    Serve(#[source] std::io::Error),
}

/// What the data-plane collector reports besides the counters.
#[derive(Debug, Clone)]
pub struct XdpAttachment {
    pub interface: String,
    pub mode: AttachMode,
}

#[derive(Debug)]
struct XdpCollector {
    counters: Arc<Counters>,
    attachment: XdpAttachment,
}

impl Collector for XdpCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let attached = ConstGauge::new(1i64);
        let mut family = encoder.encode_descriptor(
            "farol_xdp_attached",
            "The XDP program is attached to this interface in this mode",
            None,
            attached.metric_type(),
        )?;
        attached.encode(family.encode_family(&[
            ("interface", self.attachment.interface.as_str()),
            ("mode", self.attachment.mode.label()),
        ])?)?;

        let snapshot = match self.counters.snapshot() {
            Ok(snapshot) => snapshot,
            Err(error) => {
                warn!(error = %crate::error_chain(&error), "cannot read data-plane counters for /metrics");
                return Ok(());
            }
        };
        let mut packets = encoder.encode_descriptor(
            "farol_xdp_packets",
            "Packets seen by farol_ingress, per class (an IP packet counts at its network and its transport class)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for class in PacketClass::ALL {
            ConstCounter::new(snapshot.class(class).packets)
                .encode(packets.encode_family(&[("class", class.label())])?)?;
        }
        let mut bytes = encoder.encode_descriptor(
            "farol_xdp_bytes",
            "Bytes (whole frames) seen by farol_ingress, per class",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for class in PacketClass::ALL {
            ConstCounter::new(snapshot.class(class).bytes)
                .encode(bytes.encode_family(&[("class", class.label())])?)?;
        }
        let mut malformed = encoder.encode_descriptor(
            "farol_xdp_malformed_packets",
            "Malformed packets seen by farol_ingress (passed to the kernel), per reason",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for reason in MalformedReason::ALL {
            ConstCounter::new(snapshot.malformed(reason).packets)
                .encode(malformed.encode_family(&[("reason", reason.label())])?)?;
        }
        Ok(())
    }
}

/// The agent's registry: build information plus the data-plane collectors.
pub fn registry(
    cluster: &str,
    node: &str,
    xdp: Option<(Arc<Counters>, XdpAttachment)>,
    load_balancer: Option<Arc<tokio::sync::Mutex<LoadBalancerMaps>>>,
) -> Registry {
    let mut registry = Registry::default();
    let info = prometheus_client::metrics::info::Info::new(vec![
        ("version", env!("CARGO_PKG_VERSION").to_owned()),
        ("cluster", cluster.to_owned()),
        ("node", node.to_owned()),
    ]);
    registry.register("farol_agent", "Build and identity of this agent", info);
    if let Some((counters, attachment)) = xdp {
        registry.register_collector(Box::new(XdpCollector {
            counters,
            attachment,
        }));
    }
    if let Some(maps) = load_balancer {
        registry.register_collector(Box::new(lb::LbCollector::new(maps)));
    }
    registry
}

/// Binds the metrics address; done before anything is attached, so a port
/// conflict leaves nothing behind.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// Serves `/metrics` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), MetricsError> {
    serve_with(listener, registry, Router::new(), shutdown).await
}

/// Serves `/metrics` and `extra`'s routes (the status page, the agent
/// check) until `shutdown` resolves.
pub async fn serve_with(
    listener: TcpListener,
    registry: Registry,
    extra: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), MetricsError> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(Arc::new(registry))
        .merge(extra);
    // Peers' addresses reach the handlers: the agent check records which
    // balancer read this node's admin state (see `health::AgentReads`).
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .map_err(MetricsError::Serve)
}

async fn metrics(
    State(registry): State<Arc<Registry>>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    let mut body = String::new();
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok());
    match prometheus_client::encoding::text::encode(&mut body, &registry) {
        Ok(()) if text::wants_openmetrics(accept) => {
            (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], body)
        }
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, TEXT_CONTENT_TYPE)],
            text::to_prometheus_text(&body),
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            "failed to encode metrics\n".to_owned(),
        ),
    }
}

/// Pool figures (the admin console's `SHOW POOLS`/`SHOW STATS`) at scrape
/// time.
#[derive(Debug)]
struct PoolerCollector {
    pooler: Arc<crate::pooler::Pooler>,
}

impl Collector for PoolerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::metrics::MetricType;
        use std::sync::atomic::Ordering::Relaxed;
        let pools = self.pooler.pools();
        type Figure = fn(&crate::pooler::pool::Pool) -> u64;
        let figures: [(&str, &str, MetricType, Figure); 8] = [
            (
                "farol_pooler_server_connections_active",
                "Server connections lent to clients",
                MetricType::Gauge,
                |p| p.active_count() as u64,
            ),
            (
                "farol_pooler_server_connections_idle",
                "Server connections idle in the pool",
                MetricType::Gauge,
                |p| p.idle_count() as u64,
            ),
            (
                "farol_pooler_clients_waiting",
                "Clients waiting for a server connection",
                MetricType::Gauge,
                |p| p.stats.waiting.load(Relaxed),
            ),
            (
                "farol_pooler_transactions",
                "Transactions (server lends) completed",
                MetricType::Counter,
                |p| p.stats.transactions.load(Relaxed),
            ),
            (
                "farol_pooler_queries",
                "Query and Execute messages relayed",
                MetricType::Counter,
                |p| p.stats.queries.load(Relaxed),
            ),
            (
                "farol_pooler_wait_timeouts",
                "Clients refused with 53300 after query_wait_timeout",
                MetricType::Counter,
                |p| p.stats.wait_timeouts.load(Relaxed),
            ),
            (
                "farol_pooler_server_connects",
                "Server connections opened",
                MetricType::Counter,
                |p| p.stats.server_connects.load(Relaxed),
            ),
            (
                "farol_pooler_received_bytes",
                "Bytes received from clients",
                MetricType::Counter,
                |p| p.stats.bytes_received.load(Relaxed),
            ),
        ];
        for (name, help, kind, figure) in figures {
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for pool in &pools {
                let server = pool.key.addr.to_string();
                let labels = [
                    ("database", pool.key.database.as_str()),
                    ("user", pool.key.user.as_str()),
                    ("server", server.as_str()),
                ];
                let value = figure(pool);
                match kind {
                    MetricType::Counter => {
                        ConstCounter::new(value).encode(family.encode_family(&labels)?)?
                    }
                    _ => ConstGauge::new(value as i64).encode(family.encode_family(&labels)?)?,
                }
            }
        }
        ConstCounter::new(self.pooler.primary_changes()).encode(encoder.encode_descriptor(
            "farol_pooler_primary_changes",
            "Times the pooler moved writes to another primary",
            None,
            MetricType::Counter,
        )?)?;
        let auth = &self.pooler.auth_cache.stats;
        for (name, help, value) in [
            (
                "farol_pooler_auth_query_lookups",
                "Secrets fetched from the server with auth_query",
                &auth.lookups,
            ),
            (
                "farol_pooler_auth_query_cache_hits",
                "Logins of auth_query users answered from the cache",
                &auth.cache_hits,
            ),
            (
                "farol_pooler_auth_query_failures",
                "auth_query lookups that failed (server unreachable, login or query refused)",
                &auth.failures,
            ),
        ] {
            ConstCounter::new(value.load(std::sync::atomic::Ordering::Relaxed))
                .encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)?;
        }
        let primary = self.pooler.primary();
        let readable = self.pooler.readable_standbys();
        let mut roles = encoder.encode_descriptor(
            "farol_pooler_server_role",
            "Each configured server's role as the pooler uses it (1 for the current one): primary, standby (takes reads) or unused",
            None,
            MetricType::Gauge,
        )?;
        for server in self.pooler.config.servers() {
            let role = if server == primary {
                "primary"
            } else if readable.contains(&server) {
                "standby"
            } else {
                "unused"
            };
            let server = server.to_string();
            ConstGauge::new(1i64)
                .encode(roles.encode_family(&[("server", server.as_str()), ("role", role)])?)?;
        }
        Ok(())
    }
}

/// The registry in Prometheus text format 0.0.4 (what `/metrics` serves
/// to clients that do not ask for OpenMetrics).
pub fn encode_prometheus_text(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut body = String::new();
    prometheus_client::encoding::text::encode(&mut body, registry)?;
    Ok(text::to_prometheus_text(&body))
}

/// Adds the pooler's figures to the agent's registry.
pub fn register_pooler(registry: &mut Registry, pooler: Arc<crate::pooler::Pooler>) {
    registry.register_collector(Box::new(crate::pooler::pause::PauseCollector(
        pooler.clone(),
    )));
    registry.register_collector(Box::new(crate::pooler::session_split::SplitCollector(
        pooler.clone(),
    )));
    registry.register_collector(Box::new(crate::pooler::kernel_relay::KernelRelayCollector(
        pooler.clone(),
    )));
    registry.register_collector(Box::new(PoolerCollector { pooler }));
}
