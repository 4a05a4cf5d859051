//! The HTTP/1.1 check (HAProxy's `option httpchk`), and the small client it
//! shares with the agent check and the `agent` CLI's control socket: one
//! request per connection through hyper's client connection API.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{client::conn::http1, Request};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use super::{tcp::describe_connect_error, CheckFailure, Passed};
use crate::config::HealthCheckConfig;

/// Bodies larger than this are cut (a check reads a status page, not a file).
pub const BODY_LIMIT: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("invalid request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("{}", describe_hyper(.0))]
    Exchange(#[from] hyper::Error),
    #[error("body over {BODY_LIMIT} bytes or unreadable: {0}")]
    Body(String),
}

/// What a peer did wrong, in words an operator understands.
fn describe_hyper(error: &hyper::Error) -> String {
    let mut cause = String::new();
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(error);
    while let Some(inner) = source {
        cause = inner.to_string();
        source = inner.source();
    }
    if error.is_parse() {
        "not an HTTP response (garbage on the wire)".to_owned()
    } else if error.is_incomplete_message() {
        "connection closed before a complete response".to_owned()
    } else if cause.is_empty() {
        error.to_string()
    } else {
        format!("{error}: {cause}")
    }
}

/// A response: status and (possibly cut) body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Bytes,
}

/// Sends one request on `io` and reads the response (body up to
/// [`BODY_LIMIT`]). The connection is closed afterwards.
pub async fn exchange<IO>(
    io: IO,
    method: &str,
    path: &str,
    host: &str,
    body: Option<Bytes>,
) -> Result<Response, HttpError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    exchange_with_token(io, method, path, host, body, None).await
}

/// [`exchange`] with `Authorization: Bearer TOKEN` (the control API over
/// TCP).
pub async fn exchange_with_token<IO>(
    io: IO,
    method: &str,
    path: &str,
    host: &str,
    body: Option<Bytes>,
    token: Option<&str>,
) -> Result<Response, HttpError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = http1::handshake(TokioIo::new(io)).await?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::USER_AGENT, "farol-health/1")
        .header(hyper::header::CONNECTION, "close");
    if body.is_some() {
        request = request.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    if let Some(token) = token {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request.body(Full::new(body.unwrap_or_default()))?;
    let result = async {
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), BODY_LIMIT)
            .collect()
            .await
            .map_err(|error| HttpError::Body(error.to_string()))?
            .to_bytes();
        Ok(Response { status, body })
    }
    .await;
    driver.abort();
    result
}

/// One HTTP check of `target` (the caller bounds it with the timeout).
pub async fn check(target: SocketAddr, config: &HealthCheckConfig) -> Result<Passed, CheckFailure> {
    let stream = TcpStream::connect(target)
        .await
        .map_err(|error| CheckFailure::new(describe_connect_error(&error)))?;
    let host = config.host.clone().unwrap_or_else(|| match target {
        SocketAddr::V4(v4) if v4.port() == 80 => v4.ip().to_string(),
        SocketAddr::V6(v6) if v6.port() == 80 => format!("[{}]", v6.ip()),
        other => other.to_string(),
    });
    let method = config.method();
    let response = exchange(stream, method, config.path(), &host, None)
        .await
        .map_err(|error| CheckFailure::new(error.to_string()))?;
    let expected = config.expect_status();
    if !expected.contains(response.status) {
        return Err(CheckFailure::new(format!(
            "HTTP status {} not in {expected}",
            response.status
        )));
    }
    if let Some(wanted) = &config.expect_body {
        let found = response
            .body
            .windows(wanted.len())
            .any(|window| window == wanted.as_bytes());
        if !found {
            return Err(CheckFailure::new(format!(
                "HTTP {} but the body lacks {wanted:?}",
                response.status
            )));
        }
    }
    Ok(Passed::new(format!("HTTP {}", response.status)))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;
    use crate::{config::CheckKind, health::run_check};

    /// A server that answers every connection with `behave`.
    async fn server<F, Fut>(behave: F) -> SocketAddr
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(behave(stream));
            }
        });
        addr
    }

    /// Reads the request head, then writes `reply`.
    async fn reply_with(mut stream: TcpStream, reply: &'static [u8]) {
        let mut buffer = vec![0; 4096];
        let mut seen = Vec::new();
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buffer[..n]),
            }
        }
        let _ = stream.write_all(reply).await;
        let _ = stream.shutdown().await;
    }

    fn config() -> HealthCheckConfig {
        let mut config = HealthCheckConfig::new(CheckKind::Http);
        config.timeout = Some(Duration::from_millis(300));
        config
    }

    async fn outcome(addr: SocketAddr, config: &HealthCheckConfig) -> Result<Passed, CheckFailure> {
        run_check(addr, config).await
    }

    #[tokio::test]
    async fn a_healthy_server_passes_with_its_status() {
        let addr =
            server(|s| reply_with(s, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")).await;
        let mut config = config();
        config.expect_body = Some("ok".into());
        let passed = outcome(addr, &config).await.unwrap();
        assert_eq!(passed.detail, "HTTP 200");
    }

    #[tokio::test]
    async fn a_wrong_status_fails_and_says_which() {
        let addr = server(|s| {
            reply_with(
                s,
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
            )
        })
        .await;
        let failure = outcome(addr, &config()).await.unwrap_err();
        assert_eq!(failure.reason, "HTTP status 503 not in 200-399");
    }

    #[tokio::test]
    async fn a_missing_body_string_fails() {
        let addr =
            server(|s| reply_with(s, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nerror")).await;
        let mut config = config();
        config.expect_body = Some("ok".into());
        let failure = outcome(addr, &config).await.unwrap_err();
        assert!(failure.reason.contains("lacks \"ok\""), "{failure:?}");
    }

    #[tokio::test]
    async fn garbage_fails_as_not_http() {
        let addr = server(|s| reply_with(s, b"\x00\x01SSH-2.0-nonsense\r\n\r\n")).await;
        let failure = outcome(addr, &config()).await.unwrap_err();
        assert!(
            failure.reason.contains("not an HTTP response"),
            "{failure:?}"
        );
    }

    #[tokio::test]
    async fn a_slow_server_times_out() {
        let addr = server(|s| async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            reply_with(s, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await
        })
        .await;
        let started = std::time::Instant::now();
        let failure = outcome(addr, &config()).await.unwrap_err();
        assert!(failure.reason.starts_with("timeout after"), "{failure:?}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn a_half_open_server_that_accepts_and_never_answers_times_out() {
        // Accepts and holds the socket open without reading or writing.
        let addr = server(|s| async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            drop(s);
        })
        .await;
        let failure = outcome(addr, &config()).await.unwrap_err();
        assert!(failure.reason.starts_with("timeout after"), "{failure:?}");
    }

    #[tokio::test]
    async fn a_reset_fails_as_closed_or_reset() {
        let addr = server(|s| async move {
            // SO_LINGER 0: close sends RST instead of FIN.
            let std = s.into_std().unwrap();
            socket2::SockRef::from(&std)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(std);
        })
        .await;
        let failure = outcome(addr, &config()).await.unwrap_err();
        assert!(
            failure.reason.contains("reset") || failure.reason.contains("closed"),
            "{failure:?}"
        );
    }

    #[tokio::test]
    async fn a_closed_port_fails_as_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let failure = outcome(addr, &config()).await.unwrap_err();
        assert_eq!(failure.reason, "connection refused");
    }

    #[tokio::test]
    async fn method_path_and_host_are_sent() {
        let (tx, rx) = tokio::sync::oneshot::channel::<String>();
        let tx = std::sync::Mutex::new(Some(tx));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buffer = vec![0; 4096];
            let n = stream.read(&mut buffer).await.unwrap();
            let head = String::from_utf8_lossy(&buffer[..n]).into_owned();
            let _ = stream.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await;
            if let Some(tx) = tx.lock().unwrap().take() {
                let _ = tx.send(head);
            }
        });
        let mut config = config();
        config.method = Some("HEAD".into());
        config.path = Some("/health?deep=1".into());
        config.host = Some("www.example".into());
        outcome(addr, &config).await.unwrap();
        let head = rx.await.unwrap();
        assert!(
            head.starts_with("HEAD /health?deep=1 HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.to_lowercase().contains("host: www.example\r\n"),
            "{head}"
        );
    }
}
