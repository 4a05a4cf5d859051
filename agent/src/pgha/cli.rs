//! `agent pg ...` and its control route, `POST /pg/switchover/NODE`.

use std::sync::Arc;

use axum::{
    extract::{Path as UrlPath, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
};
use clap::Subcommand;

use crate::control::{
    client::{self, ClientError, Target},
    Control, Reply,
};

/// `agent pg ...`.
#[derive(Debug, clap::Args)]
pub struct PgArgs {
    #[command(subcommand)]
    pub command: PgCommand,
}

#[derive(Debug, Subcommand)]
pub enum PgCommand {
    /// Planned switchover: the primary stops accepting writes, NODE (a
    /// caught-up standby) replays everything it wrote and becomes the
    /// primary; the others follow it and the old primary rejoins as a
    /// standby. No committed transaction is lost. Refused without a
    /// quorum, or when NODE is not a streaming standby within
    /// postgres.max_lag_bytes.
    Switchover {
        /// The standby to make primary.
        #[arg(value_name = "NODE")]
        target: String,
        #[command(flatten)]
        control: crate::cli::ControlArgs,
    },
}

fn reply(status: StatusCode, ok: bool, message: String) -> Response {
    let body = serde_json::to_string(&Reply { ok, message }).unwrap_or_default();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `POST /pg/switchover/{node}`.
pub async fn switchover_route(
    State(control): State<Arc<Control>>,
    UrlPath(node): UrlPath<String>,
) -> Response {
    let Some(service) = control.pg_switchover.get() else {
        return reply(
            StatusCode::NOT_FOUND,
            false,
            "this agent runs no PostgreSQL on the cluster state (the config needs [postgres] with this node, and [cluster_state])".into(),
        );
    };
    match service.request(&node).await {
        Ok(message) => reply(StatusCode::OK, true, message),
        Err(message) => reply(StatusCode::CONFLICT, false, message),
    }
}

async fn request_switchover(target: &Target, node: &str) -> Result<String, ClientError> {
    let path = format!("/pg/switchover/{}", client::encode(node));
    client::write(target, &path).await
}

/// `agent pg ...`.
pub fn main(args: &PgArgs) -> std::process::ExitCode {
    match &args.command {
        PgCommand::Switchover { target, control } => {
            let node = target.clone();
            client::block(
                control,
                move |target| Box::pin(async move { request_switchover(&target, &node).await }),
                |message| println!("{message}"),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::PgCommand;
    use crate::cli::{Cli, Command};

    #[test]
    fn switchover_parses_its_target_and_the_control_flags() {
        // clap checks the whole command tree here (a duplicate argument
        // name panics at parse time, in the field).
        Cli::command().debug_assert();
        let cli =
            Cli::try_parse_from(["agent", "pg", "switchover", "nuster2", "--node", "nuster3"])
                .unwrap();
        match cli.command {
            Command::Pg(args) => match args.command {
                PgCommand::Switchover { target, control } => {
                    assert_eq!(target, "nuster2");
                    assert_eq!(control.node.as_deref(), Some("nuster3"));
                }
            },
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["agent", "pg", "switchover"]).is_err());
    }
}
