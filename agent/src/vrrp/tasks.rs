//! The VRRP thread's helper tasks: the socket reader, track commands and
//! the netlink queue that adds and removes VIPs off the failover path.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::{
    net::{AddressManager, VrrpSocket},
    Event, HostOp, DATAPLANE_HOLD_WAIT,
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

/// What the host task needs to order VIP changes with the data plane.
pub(super) struct DataPlaneHold {
    pub owned: Arc<watch::Sender<BTreeSet<IpAddr>>>,
    pub applied: watch::Receiver<Option<BTreeSet<IpAddr>>>,
    /// Only these VIPs are balanced; others need no wait.
    pub service_vips: BTreeSet<IpAddr>,
}

/// Whether the balancer applied a plan holding every VIP of `needed`
/// within [`DATAPLANE_HOLD_WAIT`] (at once when `needed` is empty).
pub(super) async fn wait_until_held(
    applied: &mut watch::Receiver<Option<BTreeSet<IpAddr>>>,
    needed: &BTreeSet<IpAddr>,
) -> bool {
    if needed.is_empty() {
        return true;
    }
    let held = applied.wait_for(|applied| {
        applied
            .as_ref()
            .is_some_and(|applied| needed.is_subset(applied))
    });
    matches!(
        tokio::time::timeout(DATAPLANE_HOLD_WAIT, held).await,
        Ok(Ok(_))
    )
}

/// Adds and removes VIPs on interfaces, in order, off the failover path.
pub(super) async fn apply_host_ops(
    mut ops: mpsc::UnboundedReceiver<HostOp>,
    addresses: AddressManager,
    mut hold: DataPlaneHold,
) {
    while let Some(op) = ops.recv().await {
        match op {
            HostOp::Add {
                index,
                interface,
                vip,
            } => {
                let needed: BTreeSet<IpAddr> = [IpAddr::V4(vip)]
                    .into_iter()
                    .filter(|vip| hold.service_vips.contains(vip))
                    .collect();
                if !wait_until_held(&mut hold.applied, &needed).await {
                    warn!(%vip, "the data plane did not hold the VIP within {DATAPLANE_HOLD_WAIT:?}; adding it to the interface anyway");
                }
                match addresses.add(index, vip).await {
                    Ok(()) => info!(%vip, %interface, "VIP added to the interface"),
                    Err(error) => {
                        warn!(%vip, %interface, %error, "cannot add the VIP to the interface")
                    }
                }
            }
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
            HostOp::Release { vips, master } => {
                hold.owned.send_if_modified(|owned| {
                    if master.load(Ordering::SeqCst) {
                        return false;
                    }
                    let before = owned.len();
                    owned.retain(|vip| !vips.contains(vip));
                    owned.len() != before
                });
            }
        }
    }
}

/// Checks every `every` whether `service` has a backend that can take a new
/// flow in the balancer's applied plan: failing while it has none.
pub(super) async fn track_service(
    instance: usize,
    track: usize,
    service: String,
    every: Duration,
    maps: std::sync::Arc<tokio::sync::Mutex<crate::dataplane::lb::LoadBalancerMaps>>,
    events: mpsc::Sender<Event>,
) {
    loop {
        let failing = {
            let maps = maps.lock().await;
            !has_usable_backend(maps.applied(), &service)
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

/// True when `service` has a backend that takes new flows in `plan`:
/// alive, weight above 0, and served here or reachable at L2.
pub(super) fn has_usable_backend(plan: &crate::dataplane::lb::LbPlan, service: &str) -> bool {
    plan.services
        .iter()
        .filter(|s| s.name == service)
        .flat_map(|s| s.backends.iter())
        .any(|b| b.alive && b.weight > 0 && (b.local || b.mac.is_some()))
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::has_usable_backend;
    use crate::{
        config::{Forwarding, Protocol, Scheduler},
        dataplane::lb::{BackendPlan, LbPlan, ServicePlan},
    };

    fn plan(backends: Vec<(bool, u32, bool)>) -> LbPlan {
        LbPlan {
            services: vec![ServicePlan {
                index: 0,
                name: "web".into(),
                vip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 100)),
                ports: vec![80],
                protocol: Protocol::Tcp,
                scheduler: Scheduler::Maglev,
                forwarding: Forwarding::Dsr,
                seed: "t/web".into(),
                backends: backends
                    .into_iter()
                    .enumerate()
                    .map(|(slot, (alive, weight, resolved))| BackendPlan {
                        slot: slot as u32,
                        name: format!("n{slot}"),
                        addr: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 11 + slot as u8)),
                        port: 80,
                        mac: resolved.then_some([2, 0, 0, 0, 0, slot as u8]),
                        weight,
                        local: false,
                        alive,
                    })
                    .collect(),
            }],
            ..LbPlan::default()
        }
    }

    #[test]
    fn a_service_fails_its_track_when_no_backend_can_take_a_flow() {
        assert!(has_usable_backend(
            &plan(vec![(false, 100, true), (true, 100, true)]),
            "web"
        ));
        assert!(
            !has_usable_backend(&plan(vec![(false, 100, true), (true, 0, true)]), "web"),
            "dead or drained"
        );
        assert!(
            !has_usable_backend(&plan(vec![(true, 100, false)]), "web"),
            "unresolved"
        );
        assert!(
            !has_usable_backend(&plan(vec![(true, 100, true)]), "db"),
            "unknown service"
        );
    }
}
