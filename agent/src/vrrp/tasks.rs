//! The VRRP thread's helper tasks: the socket reader, track commands and
//! the netlink queue that adds and removes VIPs off the failover path.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{
    net::{AddressManager, VrrpSocket},
    Event, HostOp,
};

pub(super) async fn receive(index: usize, socket: Arc<VrrpSocket>, events: mpsc::Sender<Event>) {
    let mut buffer = vec![0u8; 2048];
    loop {
        match socket.recv(&mut buffer).await {
            Ok(len) => {
                let event = Event::Packet {
                    socket: index,
                    bytes: buffer[..len].to_vec(),
                    at: Instant::now(),
                };
                if events.send(event).await.is_err() {
                    return;
                }
            }
            Err(error) => {
                warn!(interface = %socket.interface, %error, "VRRP receive failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Runs a track command every `every` (its own timeout too): failing
/// while it exits non-zero or hangs.
pub(super) async fn track_command(
    instance: usize,
    track: usize,
    command: String,
    every: Duration,
    directory: Option<std::path::PathBuf>,
    events: mpsc::Sender<Event>,
) {
    loop {
        let mut child = tokio::process::Command::new("sh");
        child
            .arg("-c")
            .arg(&command)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true);
        if let Some(directory) = &directory {
            child.current_dir(directory);
        }
        let failing = match child.spawn() {
            Ok(mut child) => !matches!(
                tokio::time::timeout(every, child.wait()).await,
                Ok(Ok(status)) if status.success()
            ),
            Err(error) => {
                warn!(%command, %error, "cannot run a VRRP track command");
                true
            }
        };
        let event = Event::Track {
            instance,
            track,
            failing,
        };
        if events.send(event).await.is_err() {
            return;
        }
        tokio::time::sleep(every).await;
    }
}

/// Adds and removes VIPs on interfaces, in order, off the failover path.
pub(super) async fn apply_host_ops(
    mut ops: mpsc::UnboundedReceiver<HostOp>,
    addresses: AddressManager,
) {
    while let Some(op) = ops.recv().await {
        match op {
            HostOp::Add {
                index,
                interface,
                vip,
            } => match addresses.add(index, vip).await {
                Ok(()) => info!(%vip, %interface, "VIP added to the interface"),
                Err(error) => {
                    warn!(%vip, %interface, %error, "cannot add the VIP to the interface")
                }
            },
            HostOp::Remove {
                index,
                interface,
                vip,
            } => match addresses.remove(index, vip).await {
                Ok(true) => info!(%vip, %interface, "VIP removed from the interface"),
                Ok(false) => {}
                Err(error) => {
                    warn!(%vip, %interface, %error, "cannot remove the VIP from the interface")
                }
            },
        }
    }
}
