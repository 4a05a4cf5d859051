//! Readiness of a started child: a TCP connect, or an HTTP/1.1 GET that
//! must get an answer with a status below 500 (a 404 still shows the server
//! serves; whether the content is right is for health checks). Only "is it serving yet"; health checks of
//! running backends belong to `health`.

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// A check, expanded for this node.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadyCheck {
    pub host: String,
    pub port: u16,
    pub http_path: Option<String>,
    pub timeout: Duration,
    pub interval: Duration,
}

/// Longest time one attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

impl ReadyCheck {
    /// One attempt: Ok, or why not.
    pub async fn probe(&self) -> Result<(), String> {
        let attempt = async {
            let mut stream = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|error| format!("connect to {}:{}: {error}", self.host, self.port))?;
            let Some(path) = &self.http_path else {
                return Ok(());
            };
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: farol-agent\r\nConnection: close\r\n\r\n",
                self.host
            );
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|error| format!("send GET {path}: {error}"))?;
            // The status line is all we need.
            let mut head = [0u8; 64];
            let mut read = 0;
            while read < 12 {
                let n = stream
                    .read(&mut head[read..])
                    .await
                    .map_err(|error| format!("read the answer to GET {path}: {error}"))?;
                if n == 0 {
                    break;
                }
                read += n;
            }
            parse_status(&head[..read])
                .filter(|status| (100..500).contains(status))
                .map(|_| ())
                .ok_or_else(|| {
                    format!(
                        "GET {path} answered {:?}",
                        String::from_utf8_lossy(&head[..read])
                            .lines()
                            .next()
                            .unwrap_or("")
                    )
                })
        };
        tokio::time::timeout(ATTEMPT_TIMEOUT.min(self.timeout), attempt)
            .await
            .unwrap_or_else(|_| Err("no answer in time".into()))
    }

    /// Probes every `interval` until one attempt succeeds or `timeout`
    /// passes; the error is the last attempt's.
    pub async fn wait(&self) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let last = match self.probe().await {
                Ok(()) => return Ok(()),
                Err(why) => why,
            };
            if tokio::time::Instant::now() + self.interval > deadline {
                return Err(last);
            }
            tokio::time::sleep(self.interval).await;
        }
    }
}

/// The status code of an `HTTP/1.x NNN` status line.
fn parse_status(head: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(head.get(..12)?).ok()?;
    let rest = text.strip_prefix("HTTP/1.")?;
    rest.get(2..5)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    async fn server(answer: &'static [u8]) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 512];
                let _ = socket.read(&mut buf).await;
                let _ = socket.write_all(answer).await;
            }
        });
        port
    }

    fn check(port: u16, http: Option<&str>) -> ReadyCheck {
        ReadyCheck {
            host: "127.0.0.1".into(),
            port,
            http_path: http.map(str::to_owned),
            timeout: Duration::from_millis(500),
            interval: Duration::from_millis(50),
        }
    }

    #[test]
    fn status_lines_parse() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(parse_status(b"HTTP/1.0 503 x"), Some(503));
        assert_eq!(parse_status(b"HTTP/1.1 2"), None);
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH_9"), None);
    }

    #[tokio::test]
    async fn http_check_wants_an_answer_below_500() {
        let ok = server(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        let moved = server(b"HTTP/1.1 301 Moved\r\nContent-Length: 0\r\n\r\n").await;
        let broken = server(b"HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\n\r\n").await;
        let garbage = server(b"hello").await;
        let missing = server(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n").await;
        assert_eq!(check(missing, Some("/")).probe().await, Ok(()));
        assert_eq!(check(ok, Some("/")).probe().await, Ok(()));
        assert_eq!(check(moved, Some("/")).probe().await, Ok(()));
        let why = check(broken, Some("/x")).probe().await.unwrap_err();
        assert!(why.contains("503"), "{why}");
        assert!(check(garbage, Some("/")).probe().await.is_err());
        // A TCP check only connects.
        assert_eq!(check(broken, None).probe().await, Ok(()));
    }

    #[tokio::test]
    async fn wait_gives_up_after_the_timeout_with_the_last_reason() {
        // A port nobody listens on: bind, learn the port, close.
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let started = std::time::Instant::now();
        let why = check(port, None).wait().await.unwrap_err();
        assert!(why.contains("connect to 127.0.0.1"), "{why}");
        assert!(started.elapsed() >= Duration::from_millis(400));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
