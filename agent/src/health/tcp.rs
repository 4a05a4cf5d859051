//! The TCP check: the three-way handshake completes (HAProxy's plain
//! `check`). A server whose process is gone answers RST; a dead host does
//! not answer and the check times out.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::{CheckFailure, Passed};

/// A connect error in an operator's words.
pub fn describe_connect_error(error: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match error.kind() {
        ConnectionRefused => "connection refused".to_owned(),
        ConnectionReset => "connection reset".to_owned(),
        HostUnreachable | NetworkUnreachable => format!("unreachable: {error}"),
        _ => format!("connect failed: {error}"),
    }
}

pub async fn check(target: SocketAddr) -> Result<Passed, CheckFailure> {
    let stream = TcpStream::connect(target)
        .await
        .map_err(|error| CheckFailure::new(describe_connect_error(&error)))?;
    drop(stream);
    Ok(Passed::new("TCP connect"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpListener;

    use crate::{
        config::{CheckKind, HealthCheckConfig},
        health::run_check,
    };

    #[tokio::test]
    async fn a_listening_port_passes_and_a_closed_one_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = HealthCheckConfig::new(CheckKind::Tcp);
        let passed = run_check(addr, &config).await.unwrap();
        assert_eq!(passed.detail, "TCP connect");
        drop(listener);
        let failure = run_check(addr, &config).await.unwrap_err();
        assert_eq!(failure.reason, "connection refused");
    }

    #[tokio::test]
    async fn a_full_accept_queue_times_out() {
        // A listener that never accepts, with a backlog of one, fills up:
        // further SYNs are dropped and the connect hangs.
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(
                &"127.0.0.1:0"
                    .parse::<std::net::SocketAddr>()
                    .unwrap()
                    .into(),
            )
            .unwrap();
        socket.listen(0).unwrap();
        let addr = socket.local_addr().unwrap().as_socket().unwrap();
        let mut held = Vec::new();
        for _ in 0..4 {
            if let Ok(Ok(stream)) = tokio::time::timeout(
                Duration::from_millis(200),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            {
                held.push(stream);
            }
        }
        let mut config = HealthCheckConfig::new(CheckKind::Tcp);
        config.timeout = Some(Duration::from_millis(300));
        let failure = run_check(addr, &config).await.unwrap_err();
        assert!(failure.reason.starts_with("timeout after"), "{failure:?}");
        drop(socket);
    }
}
