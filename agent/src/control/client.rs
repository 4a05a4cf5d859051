//! The CLI side of the control socket: `agent status`, `agent backend ...`,
//! `agent reload`.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use tokio::net::UnixStream;

use super::{status::Status, Reply};
use crate::health::http::{exchange, exchange_with_token, Response};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent's control socket {path} (is `agent run` running? --socket or FAROL_CONTROL_SOCKET name another)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the agent")]
    Http(#[from] crate::health::http::HttpError),
    #[error("the agent answered something unreadable: {0}")]
    Decode(String),
    #[error("{0}")]
    Refused(String),
}

/// Where the agent's control API is.
#[derive(Debug, Clone)]
pub enum Target {
    /// The local Unix socket.
    Socket(PathBuf),
    /// The HTTP port, `http://HOST:PORT`, with the bearer token.
    Tcp { url: String, token: String },
}

pub(crate) async fn call(
    target: &Target,
    method: &str,
    path: &str,
) -> Result<Response, ClientError> {
    let body = (method == "POST").then(Bytes::new);
    match target {
        Target::Socket(socket) => {
            let stream =
                UnixStream::connect(socket)
                    .await
                    .map_err(|source| ClientError::Connect {
                        path: socket.to_owned(),
                        source,
                    })?;
            Ok(exchange(stream, method, path, "localhost", body).await?)
        }
        Target::Tcp { url, token } => {
            let authority = url
                .strip_prefix("http://")
                .unwrap_or(url)
                .trim_end_matches('/');
            let stream = tokio::net::TcpStream::connect(authority)
                .await
                .map_err(|source| ClientError::Connect {
                    path: PathBuf::from(url),
                    source,
                })?;
            let path = format!("{}{path}", super::CONTROL_PREFIX);
            Ok(exchange_with_token(stream, method, &path, authority, body, Some(token)).await?)
        }
    }
}

pub async fn status(socket: &Path) -> Result<Status, ClientError> {
    status_over(&Target::Socket(socket.to_owned())).await
}

pub async fn status_over(target: &Target) -> Result<Status, ClientError> {
    let response = call(target, "GET", "/status").await?;
    if response.status != 200 {
        return Err(ClientError::Refused(format!(
            "HTTP {}: {}",
            response.status,
            String::from_utf8_lossy(&response.body)
        )));
    }
    serde_json::from_slice(&response.body).map_err(|error| ClientError::Decode(error.to_string()))
}

/// POSTs to `path` and reads the API's `Reply`: its message when ok, a
/// refusal with it otherwise.
pub(crate) async fn write(target: &Target, path: &str) -> Result<String, ClientError> {
    let response = call(target, "POST", path).await?;
    let reply: Reply = serde_json::from_slice(&response.body).map_err(|error| {
        ClientError::Decode(format!(
            "HTTP {}: {error}: {}",
            response.status,
            String::from_utf8_lossy(&response.body)
        ))
    })?;
    if reply.ok {
        Ok(reply.message)
    } else {
        Err(ClientError::Refused(reply.message))
    }
}

/// Query values are names (letters, digits, '-', '_', '.', ':').
pub(crate) fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.:".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

pub async fn backend(
    socket: &Path,
    action: &str,
    name: &str,
    service: Option<&str>,
    weight: Option<u32>,
) -> Result<String, ClientError> {
    backend_over(
        &Target::Socket(socket.to_owned()),
        action,
        name,
        service,
        weight,
    )
    .await
}

pub async fn backend_over(
    target: &Target,
    action: &str,
    name: &str,
    service: Option<&str>,
    weight: Option<u32>,
) -> Result<String, ClientError> {
    let mut path = format!("/backend/{}/{}", encode(name), encode(action));
    let mut query = Vec::new();
    if let Some(service) = service {
        query.push(format!("service={}", encode(service)));
    }
    if let Some(weight) = weight {
        query.push(format!("weight={weight}"));
    }
    if !query.is_empty() {
        path.push('?');
        path.push_str(&query.join("&"));
    }
    write(target, &path).await
}

pub async fn reload(socket: &Path) -> Result<String, ClientError> {
    reload_over(&Target::Socket(socket.to_owned())).await
}

pub async fn reload_over(target: &Target) -> Result<String, ClientError> {
    write(target, "/reload").await
}

/// Asks the agent to stop (drain, stop children, remove the data plane).
pub async fn stop_over(target: &Target) -> Result<String, ClientError> {
    write(target, "/stop").await
}

/// What the CLI talks to: --url with --token-file (TCP), else --socket,
/// else the node's `control_socket` in the cluster file, else
/// /run/farol/NODE.sock.
pub fn target(args: &crate::cli::ControlArgs) -> Result<Target, String> {
    if let Some(url) = &args.url {
        let Some(file) = &args.token_file else {
            return Err("--url needs --token-file (the cluster's control_token_file)".into());
        };
        let token =
            super::read_token(file).map_err(|error| format!("{}: {error}", file.display()))?;
        return Ok(Target::Tcp {
            url: url.clone(),
            token,
        });
    }
    socket_path(args).map(Target::Socket)
}

fn socket_path(args: &crate::cli::ControlArgs) -> Result<PathBuf, String> {
    if let Some(socket) = &args.socket {
        return Ok(socket.clone());
    }
    let node = match &args.node {
        Some(node) => node.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_owned())
            .map_err(|_| {
                "cannot tell which node this is: pass --node NAME or --socket PATH".to_owned()
            })?,
    };
    let config = crate::config::Config::load(&args.config).ok();
    let configured = config
        .as_ref()
        .and_then(|config| config.nodes.iter().find(|n| n.name == node));
    if let Some(socket) = configured.and_then(|n| n.control_socket.clone()) {
        return Ok(socket);
    }
    let pin_dir = match (&args.pin_dir, config.as_ref(), configured) {
        (Some(pin_dir), _, _) => pin_dir.clone(),
        (None, Some(config), Some(node)) => config.pin_dir(node),
        _ => PathBuf::from(crate::config::DEFAULT_PIN_DIR),
    };
    Ok(super::default_socket(&node, &pin_dir))
}

/// Runs `future` on a small runtime; prints the error and fails on error.
pub(crate) fn block<T>(
    args: &crate::cli::ControlArgs,
    call: impl FnOnce(
        Target,
    )
        -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, ClientError>>>>,
    show: impl FnOnce(T),
) -> std::process::ExitCode {
    let socket = match target(args) {
        Ok(target) => target,
        Err(error) => {
            eprintln!("{error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(call(socket)) {
        Ok(value) => {
            show(value);
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{}", crate::error_chain(&error));
            std::process::ExitCode::FAILURE
        }
    }
}

/// `agent status`.
pub fn main_status(args: &crate::cli::ControlArgs) -> std::process::ExitCode {
    let json = args.json;
    block(
        args,
        |target| Box::pin(async move { status_over(&target).await }),
        |status| {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).unwrap_or_default()
                );
            } else {
                print!("{}", super::status::render_table(&status));
            }
        },
    )
}

/// `agent backend ACTION NAME [WEIGHT] [--service S]`.
pub fn main_backend(args: &crate::cli::BackendArgs) -> std::process::ExitCode {
    let action = args.action.label();
    let name = args.backend.clone();
    let service = args.service.clone();
    let weight = args.weight;
    block(
        &args.control,
        move |socket| {
            Box::pin(async move {
                backend_over(&socket, action, &name, service.as_deref(), weight).await
            })
        },
        |message| println!("{message}"),
    )
}

/// `agent reload`.
pub fn main_stop(args: &crate::cli::ControlArgs) -> std::process::ExitCode {
    block(
        args,
        |target| Box::pin(async move { stop_over(&target).await }),
        |message| println!("stopping: {message}"),
    )
}

pub fn main_reload(args: &crate::cli::ControlArgs) -> std::process::ExitCode {
    block(
        args,
        |target| Box::pin(async move { reload_over(&target).await }),
        |message| println!("reloaded: {message}"),
    )
}
