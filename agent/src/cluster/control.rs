//! The cluster state on the control API (`GET /cluster`,
//! `POST /cluster/primary/NODE[?epoch=N]`) and its CLI, `agent cluster
//! status` and `agent cluster set-primary NODE` (what `agent pg
//! switchover` builds on).

use std::sync::Arc;

use axum::{
    extract::{Path as UrlPath, RawQuery, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
};
use clap::Subcommand;
use serde::Serialize;

use super::{ClusterError, ClusterStatus};
use crate::control::{
    client::{self, ClientError, Target},
    Control, Reply,
};

/// `agent cluster ...`.
#[derive(Debug, clap::Args)]
pub struct ClusterArgs {
    #[command(subcommand)]
    pub command: ClusterCommand,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Show the primary record, the lease, the Raft leader and which
    /// members this agent reaches.
    Status(crate::cli::ControlArgs),
    /// Make NODE the primary through consensus (a compare-and-set on the
    /// epoch; refused without a quorum or while the current primary may
    /// still hold its lease). Run on the current primary, it hands over.
    SetPrimary {
        /// The node to make primary.
        #[arg(value_name = "NODE")]
        primary: String,
        /// The epoch the change is based on (default: the one this agent
        /// sees now).
        #[arg(long)]
        epoch: Option<u64>,
        #[command(flatten)]
        control: crate::cli::ControlArgs,
    },
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_string(value) {
        Ok(body) => (status, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

fn no_cluster() -> Response {
    json(
        StatusCode::NOT_FOUND,
        &Reply {
            ok: false,
            message: "this agent keeps no cluster state (the config has no [cluster_state])".into(),
        },
    )
}

/// `GET /cluster`.
pub async fn status(State(control): State<Arc<Control>>) -> Response {
    match control.cluster_state.get() {
        Some(cluster) => json(StatusCode::OK, &cluster.status()),
        None => no_cluster(),
    }
}

/// `POST /cluster/primary/{node}[?epoch=N]`.
pub async fn set_primary(
    State(control): State<Arc<Control>>,
    UrlPath(node): UrlPath<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let Some(cluster) = control.cluster_state.get() else {
        return no_cluster();
    };
    let epoch = match query.as_deref().and_then(|q| q.strip_prefix("epoch=")) {
        Some(text) => match text.parse::<u64>() {
            Ok(epoch) => epoch,
            Err(_) => {
                return json(
                    StatusCode::BAD_REQUEST,
                    &Reply {
                        ok: false,
                        message: format!("epoch: expected a number, got {text:?}"),
                    },
                )
            }
        },
        None if query.as_deref().is_some_and(|q| !q.is_empty()) => {
            return json(
                StatusCode::BAD_REQUEST,
                &Reply {
                    ok: false,
                    message: "expected no query or ?epoch=N".into(),
                },
            )
        }
        None => cluster.primary().borrow().as_ref().map_or(0, |r| r.epoch),
    };
    match cluster.set_primary(&node, epoch).await {
        Ok(record) => json(
            StatusCode::OK,
            &Reply {
                ok: true,
                message: format!("primary: {} (epoch {})", record.node, record.epoch),
            },
        ),
        Err(error) => {
            let status = match error {
                ClusterError::UnknownNode(_) => StatusCode::NOT_FOUND,
                ClusterError::EpochMoved { .. } | ClusterError::LeaseHeld { .. } => {
                    StatusCode::CONFLICT
                }
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            json(
                status,
                &Reply {
                    ok: false,
                    message: error.to_string(),
                },
            )
        }
    }
}

async fn fetch_status(target: &Target) -> Result<ClusterStatus, ClientError> {
    let response = client::call(target, "GET", "/cluster").await?;
    if response.status != 200 {
        return Err(ClientError::Refused(format!(
            "HTTP {}: {}",
            response.status,
            String::from_utf8_lossy(&response.body)
        )));
    }
    serde_json::from_slice(&response.body).map_err(|error| ClientError::Decode(error.to_string()))
}

async fn request_primary(
    target: &Target,
    node: &str,
    epoch: Option<u64>,
) -> Result<String, ClientError> {
    let mut path = format!("/cluster/primary/{}", client::encode(node));
    if let Some(epoch) = epoch {
        path.push_str(&format!("?epoch={epoch}"));
    }
    client::write(target, &path).await
}

/// A table for people.
pub fn render(status: &ClusterStatus) -> String {
    let membership = &status.membership;
    let primary = match &status.primary {
        Some(record) => format!("{} (epoch {})", record.node, record.epoch),
        None => "none yet".into(),
    };
    format!(
        "node:        {} ({})\nprimary:     {primary}\nlease held:  {}\nraft:        {} in term {}, leader {}\nvoters:      {}\nlearners:    {}\nreachable:   {}\nquorum:      {}\n",
        status.node,
        if status.is_voter { "voter" } else { "learner" },
        if status.holds_lease { "yes" } else { "no" },
        status.raft_state,
        status.raft_term,
        membership.raft_leader.as_deref().unwrap_or("unknown"),
        membership.voters.join(", "),
        membership.learners.join(", "),
        membership.reachable.join(", "),
        if membership.has_quorum { "yes" } else { "NO" },
    )
}

/// `agent cluster ...`.
pub fn main(args: &ClusterArgs) -> std::process::ExitCode {
    match &args.command {
        ClusterCommand::Status(control) => {
            let json = control.json;
            client::block(
                control,
                |target| Box::pin(async move { fetch_status(&target).await }),
                |status| {
                    if json {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&status).unwrap_or_default()
                        );
                    } else {
                        print!("{}", render(&status));
                    }
                },
            )
        }
        ClusterCommand::SetPrimary {
            primary,
            epoch,
            control,
        } => {
            let (node, epoch) = (primary.clone(), *epoch);
            client::block(
                control,
                move |target| Box::pin(async move { request_primary(&target, &node, epoch).await }),
                |message| println!("{message}"),
            )
        }
    }
}
