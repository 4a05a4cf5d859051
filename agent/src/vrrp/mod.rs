//! VRRPv3 for IPv4 (RFC 5798): keepalived's job. Each `[[vrrp]]` instance
//! this node takes part in runs the pure state machine of `fsm.rs`; this
//! file is its IO shell: adverts on a raw socket (multicast 224.0.0.18 or
//! unicast peers), timers, tracking, and what a change of role does.
//!
//! Becoming master, in this order: the VIPs are marked owned for the data
//! plane (a watch channel the balancer applies to the maps at once; only
//! `dataplane` touches maps), gratuitous ARPs go out, then the VIPs are
//! added to the interface through netlink and notify commands start: none
//! of the slow steps sits before the ones clients need. Leaving master does
//! the reverse. The VIPs a balancer holds on `lo` for direct server return
//! stay there while it is backup (the balancer module owns those).

mod fsm;
mod metrics;
mod net;
pub mod packet;
mod tasks;

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

pub use self::{
    fsm::{Action, Fsm, Params, Reason, State, OWNER_PRIORITY, STOP_PRIORITY},
    metrics::{InstanceStats, VrrpCollector, VrrpStats},
};
use self::{
    net::{AddressManager, GarpSender, VrrpSocket},
    packet::{Advert, DropReason, VRRP_MULTICAST},
};
use crate::config::{Config, NodeConfig, VrrpConfig};

/// How often interface carriers (the VRRP interface and tracked ones) are
/// read.
const CARRIER_POLL: Duration = Duration::from_millis(100);
/// How long a stopping master keeps balancing the VIP in its data plane
/// after its backup's skew time: packets a client sends before the new
/// master's gratuitous ARP reaches it are still balanced (to the same
/// backend, by Maglev). Not used when stepping down for a higher priority:
/// the XDP program also answers ARP for a VIP it holds, and a client that
/// asks at that moment could pick the MAC of a node about to let go.
const STOP_GRACE: Duration = Duration::from_millis(50);
/// The longest VRRP waits for the balancer's first plan before it joins
/// the election anyway.
const DATAPLANE_READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum VrrpError {
    #[error("cannot {what} on {interface}")]
    Socket {
        interface: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("no interface {interface} in this network namespace")]
    NoInterface { interface: String },
    #[error("cannot read the MAC address of {interface}")]
    Mac {
        interface: String,
        #[source]
        source: crate::balancer::HostError,
    },
    #[error("cannot start the VRRP thread's runtime")]
    Runtime(#[source] std::io::Error),
    #[error("a netlink request failed")]
    NetlinkRequest(#[source] rtnetlink::Error),
    #[error("cannot open a netlink socket")]
    Netlink(#[source] std::io::Error),
    #[error("node {node}: VRRP needs an IPv4 node address, got {address}")]
    NotIpv4 { node: String, address: IpAddr },
}

/// What the balancer needs to know from VRRP.
#[derive(Debug, Clone)]
pub struct VipOwnership {
    /// VIPs whose holder VRRP decides on this node.
    pub managed: BTreeSet<IpAddr>,
    /// Of those, the ones this node is master for now.
    pub owned: watch::Receiver<BTreeSet<IpAddr>>,
    /// The balancer publishes here the VIPs the data plane holds once the
    /// maps say so: gratuitous ARPs wait for it, so that no client is sent
    /// to this node before its XDP program balances for the VIP.
    /// None until the balancer applied its first plan.
    pub applied: watch::Sender<Option<BTreeSet<IpAddr>>>,
}

/// The instances `node` takes part in.
pub fn instances_for<'a>(config: &'a Config, node: &str) -> Vec<&'a VrrpConfig> {
    config
        .vrrp
        .iter()
        .filter(|instance| instance.priority.contains_key(node))
        .collect()
}

/// `agent teardown`: removes this node's VRRP VIPs from their interfaces
/// (an agent killed while master leaves them); returns what it removed.
pub fn teardown(config: &Config, node: &NodeConfig) -> Result<Vec<(Ipv4Addr, String)>, VrrpError> {
    let instances = instances_for(config, &node.name);
    if instances.is_empty() {
        return Ok(Vec::new());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(VrrpError::Runtime)?;
    runtime.block_on(async {
        let addresses = AddressManager::open()?;
        let mut removed = Vec::new();
        for instance in instances {
            let interface = instance.interface_on(node);
            let index = net::interface_index(interface)?;
            for vip in instance.vips_v4() {
                if addresses
                    .remove(index, vip)
                    .await
                    .map_err(VrrpError::NetlinkRequest)?
                {
                    removed.push((vip, interface.to_owned()));
                }
            }
        }
        Ok(removed)
    })
}

/// The channel ends and counters of a node's VRRP, before it runs.
#[derive(Debug)]
pub struct Setup {
    pub ownership: VipOwnership,
    pub stats: Arc<VrrpStats>,
    owned: watch::Sender<BTreeSet<IpAddr>>,
    applied: watch::Receiver<Option<BTreeSet<IpAddr>>>,
    /// VIPs of `[[service]]` sections: those the data plane must hold
    /// before gratuitous ARPs go out.
    service_vips: BTreeSet<IpAddr>,
    /// The balancer's maps, for `track = [{ service = ... }]`: a service
    /// with no usable backend lowers the priority.
    pub load_balancer: Option<Arc<tokio::sync::Mutex<crate::dataplane::lb::LoadBalancerMaps>>>,
}

impl Setup {
    /// None when the node takes part in no instance.
    pub fn new(config: &Config, node: &NodeConfig) -> Option<Setup> {
        let instances = instances_for(config, &node.name);
        if instances.is_empty() {
            return None;
        }
        let managed = instances
            .iter()
            .flat_map(|instance| instance.vips.iter().copied())
            .collect();
        let (owned, receiver) = watch::channel(BTreeSet::new());
        let (applied_tx, applied) = watch::channel(None);
        Some(Setup {
            ownership: VipOwnership {
                managed,
                owned: receiver,
                applied: applied_tx,
            },
            stats: Arc::new(VrrpStats::default()),
            owned,
            applied,
            service_vips: config.services.iter().map(|service| service.vip).collect(),
            load_balancer: None,
        })
    }
}

/// One virtual router on this node.
struct Instance {
    config: VrrpConfig,
    interface: String,
    interface_index: u32,
    /// This node's address: the advert source and the tie-breaker.
    local: Ipv4Addr,
    vips: Vec<Ipv4Addr>,
    fsm: Fsm,
    base_priority: u8,
    track_failing: Vec<bool>,
    carrier: bool,
    socket: usize,
    garp: Arc<GarpSender>,
    garp_task: Option<JoinHandle<()>>,
    /// Whether the instance is master now, read by the host task.
    master: Arc<AtomicBool>,
    stats_index: usize,
}

enum Event {
    Packet {
        socket: usize,
        bytes: Vec<u8>,
        at: Instant,
    },
    Track {
        instance: usize,
        track: usize,
        failing: bool,
    },
}

enum HostOp {
    /// Waits (at most [`DATAPLANE_HOLD_WAIT`]) until the data plane holds
    /// the VIP: a VIP on the interface that XDP does not balance is one the
    /// kernel answers itself, with a reset.
    Add {
        index: u32,
        interface: String,
        vip: Ipv4Addr,
    },
    Remove {
        index: u32,
        interface: String,
        vip: Ipv4Addr,
    },
    /// After the removals queued before it: the data plane lets the VIPs
    /// go, unless the instance became master again meanwhile. Until then
    /// packets still sent here are balanced, not reset by the kernel.
    Release {
        vips: Vec<IpAddr>,
        master: Arc<AtomicBool>,
    },
}

/// How long adding a VIP and announcing it wait for the data plane: a
/// balancer that cannot apply it must not keep the LAN waiting.
const DATAPLANE_HOLD_WAIT: Duration = Duration::from_millis(100);

struct Router {
    instances: Vec<Instance>,
    sockets: Vec<Arc<VrrpSocket>>,
    owned: Arc<watch::Sender<BTreeSet<IpAddr>>>,
    applied: watch::Receiver<Option<BTreeSet<IpAddr>>>,
    service_vips: BTreeSet<IpAddr>,
    stats: Arc<VrrpStats>,
    host: mpsc::UnboundedSender<HostOp>,
}

/// Runs [`run`] on a thread of its own with a single-threaded runtime, so
/// that advert and master-down timers keep their millisecond precision
/// while the agent's main runtime is busy (a Maglev table of 65,537 map
/// writes blocks a worker for a while). The receiver yields run's result.
pub fn spawn_dedicated(
    setup: Setup,
    config: Arc<Config>,
    node: NodeConfig,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<tokio::sync::oneshot::Receiver<Result<(), VrrpError>>> {
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("vrrp".into())
        .spawn(move || {
            let outcome = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(run(setup, config, node, shutdown)),
                Err(source) => Err(VrrpError::Runtime(source)),
            };
            let _ = done.send(outcome);
        })?;
    Ok(result)
}

/// Runs every instance of `setup` until `shutdown`, then hands over (a
/// master sends priority 0) and removes the VIPs from the interfaces.
pub async fn run(
    setup: Setup,
    config: Arc<Config>,
    node: NodeConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), VrrpError> {
    let local = match node.address.addr() {
        IpAddr::V4(v4) => v4,
        address => {
            return Err(VrrpError::NotIpv4 {
                node: node.name.clone(),
                address,
            })
        }
    };
    let addresses = AddressManager::open()?;
    let (events, mut event_rx) = mpsc::channel::<Event>(1024);
    let mut sockets: Vec<Arc<VrrpSocket>> = Vec::new();
    let mut socket_of: HashMap<String, usize> = HashMap::new();
    let mut garps: HashMap<String, Arc<GarpSender>> = HashMap::new();
    let mut instances = Vec::new();
    let cluster = config;
    for config in instances_for(&cluster, &node.name) {
        let interface = config.interface_on(&node).to_owned();
        if !socket_of.contains_key(&interface) {
            // Joined when some instance on this interface has no unicast
            // peers.
            let multicast = instances_for(&cluster, &node.name).iter().any(|other| {
                other.interface_on(&node) == interface && other.unicast_peers.is_empty()
            });
            let socket = VrrpSocket::open(&interface, local, multicast)?;
            socket_of.insert(interface.clone(), sockets.len());
            sockets.push(Arc::new(socket));
            setup.stats.add_interface(&interface);
            let mac =
                crate::balancer::interface_mac(&interface).map_err(|source| VrrpError::Mac {
                    interface: interface.clone(),
                    source,
                })?;
            garps.insert(
                interface.clone(),
                Arc::new(GarpSender::open(&interface, mac)?),
            );
        }
        let priority = config.priority[&node.name];
        let interface_index = net::interface_index(&interface)?;
        let vips = config.vips_v4();
        // Left by an agent that was killed while master: not ours until
        // this node is elected again.
        for &vip in &vips {
            if let Ok(true) = addresses.remove(interface_index, vip).await {
                info!(instance = %config.name, %vip, %interface, "removed a VIP left on the interface by an earlier run");
            }
        }
        instances.push(Instance {
            fsm: Fsm::new(Params {
                priority,
                advert_interval: config.advert_interval,
                preempt: config.preempt,
                preempt_delay: config.preempt_delay,
                primary_address: local,
            }),
            base_priority: priority,
            track_failing: vec![false; config.track.len()],
            carrier: false,
            socket: socket_of[&interface],
            garp: garps[&interface].clone(),
            garp_task: None,
            master: Arc::new(AtomicBool::new(false)),
            stats_index: setup
                .stats
                .add_instance(&config.name, config.vrid, priority),
            config: config.clone(),
            interface,
            interface_index,
            local,
            vips,
        });
    }
    let receivers: Vec<JoinHandle<()>> = sockets
        .iter()
        .enumerate()
        .map(|(index, socket)| tokio::spawn(tasks::receive(index, socket.clone(), events.clone())))
        .collect();
    let mut trackers = Vec::new();
    for (i, instance) in instances.iter().enumerate() {
        for (t, track) in instance.config.track.iter().enumerate() {
            if let (Some(service), Some(maps)) = (&track.service, &setup.load_balancer) {
                trackers.push(tokio::spawn(tasks::track_service(
                    i,
                    t,
                    service.clone(),
                    track.every,
                    maps.clone(),
                    events.clone(),
                )));
            }
            if let Some(command) = &track.command {
                trackers.push(tokio::spawn(tasks::track_command(
                    i,
                    t,
                    command.clone(),
                    track.every,
                    track.directory.clone(),
                    events.clone(),
                )));
            }
        }
    }
    drop(events);
    let (host, host_rx) = mpsc::unbounded_channel();
    let owned = Arc::new(setup.owned);
    let host_task = tokio::spawn(tasks::apply_host_ops(
        host_rx,
        addresses,
        tasks::DataPlaneHold {
            owned: owned.clone(),
            applied: setup.applied.clone(),
            service_vips: setup.service_vips.clone(),
        },
    ));
    let mut router = Router {
        instances,
        sockets,
        owned,
        applied: setup.applied,
        service_vips: setup.service_vips,
        stats: setup.stats,
        host,
    };
    // A node must not win an election before its data plane can balance:
    // the balancer's first plan (a Maglev table per service) comes first.
    if !router.service_vips.is_empty() {
        let mut applied = router.applied.clone();
        tokio::select! {
            ready = tokio::time::timeout(DATAPLANE_READY_TIMEOUT, applied.wait_for(Option::is_some)) => {
                if ready.is_err() {
                    warn!("the data plane has no plan after {DATAPLANE_READY_TIMEOUT:?}; joining the election anyway");
                }
            }
            _ = shutdown.wait_for(|stop| *stop) => {}
        }
    }
    router.poll_carriers(Instant::now());

    let mut carrier_poll = tokio::time::interval(CARRIER_POLL);
    carrier_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let deadline = router
            .instances
            .iter()
            .filter_map(|instance| instance.fsm.next_deadline())
            .min();
        let timer = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            _ = timer => router.on_timers(Instant::now()),
            event = event_rx.recv() => match event {
                Some(Event::Packet { socket, bytes, at }) => router.on_packet(socket, &bytes, at),
                Some(Event::Track { instance, track, failing }) => {
                    router.on_track(instance, track, failing, Instant::now());
                }
                None => break,
            },
            _ = carrier_poll.tick() => router.poll_carriers(Instant::now()),
        }
    }
    let now = Instant::now();
    let mut grace = Duration::ZERO;
    for i in 0..router.instances.len() {
        let instance = &router.instances[i];
        if instance.fsm.state() == State::Master {
            // The backup takes over within its skew time (at most one
            // interval) of our priority 0, then announces itself.
            grace = grace.max(instance.config.advert_interval + STOP_GRACE);
        }
        let actions = router.instances[i].fsm.shutdown(now);
        router.perform(i, actions);
        if let Some(task) = router.instances[i].garp_task.take() {
            task.abort();
        }
    }
    if !grace.is_zero() {
        // The data plane keeps balancing the VIPs until the backup holds
        // them (node.rs removes it only after this task ends).
        tokio::time::sleep(grace).await;
    }

    for task in receivers.into_iter().chain(trackers) {
        task.abort();
    }
    drop(router);
    if tokio::time::timeout(Duration::from_secs(5), host_task)
        .await
        .is_err()
    {
        warn!("VIPs not removed from the interface within 5 s of stopping");
    }
    Ok(())
}

impl Router {
    fn on_timers(&mut self, now: Instant) {
        for i in 0..self.instances.len() {
            let actions = self.instances[i].fsm.on_timer(now);
            self.perform(i, actions);
        }
    }

    fn on_packet(&mut self, socket: usize, bytes: &[u8], at: Instant) {
        let interface = self.sockets[socket].interface.clone();
        let dropped = |reason: DropReason| {
            debug!(%interface, reason = reason.as_str(), "VRRP packet dropped");
            self.stats.drop_packet(&interface, reason);
        };
        let received = match packet::decode_ip(bytes) {
            Ok(received) => received,
            Err(reason) => return dropped(reason),
        };
        let advert = &received.advert;
        let Some(i) = self
            .instances
            .iter()
            .position(|instance| instance.socket == socket && instance.config.vrid == advert.vrid)
        else {
            return dropped(DropReason::Vrid);
        };
        let instance = &self.instances[i];
        if received.source == instance.local {
            return; // our own advert, looped back
        }
        if !instance.config.unicast_peers.is_empty()
            && !instance.config.unicast_peers.contains(&received.source)
        {
            return dropped(DropReason::UnknownPeer);
        }
        if advert.addresses.len() != instance.vips.len() {
            return dropped(DropReason::AddressCount);
        }
        let mut theirs = advert.addresses.clone();
        let mut ours = instance.vips.clone();
        theirs.sort_unstable();
        ours.sort_unstable();
        if theirs != ours {
            return dropped(DropReason::AddressList);
        }
        self.stats
            .update(instance.stats_index, |s| s.adverts_received += 1);
        let actions = self.instances[i].fsm.on_advert(
            at,
            received.source,
            advert.priority,
            advert.interval(),
        );
        self.perform(i, actions);
    }

    fn on_track(&mut self, instance: usize, track: usize, failing: bool, now: Instant) {
        let Some(slot) = self
            .instances
            .get_mut(instance)
            .and_then(|i| i.track_failing.get_mut(track))
        else {
            return;
        };
        if *slot != failing {
            *slot = failing;
            let config = &self.instances[instance].config;
            let what = config.track[track]
                .command
                .clone()
                .or_else(|| config.track[track].interface.clone())
                .or_else(|| {
                    config.track[track]
                        .service
                        .as_ref()
                        .map(|service| format!("service {service}"))
                })
                .unwrap_or_default();
            if failing {
                warn!(instance = %config.name, track = %what, "tracked condition failing");
            } else {
                info!(instance = %config.name, track = %what, "tracked condition recovered");
            }
            self.apply_priority(instance, now);
        }
    }

    /// The VRRP interface losing its carrier takes the instance out of the
    /// election (keepalived's FAULT): it gives the VIPs up and, when the
    /// carrier returns, starts again as backup instead of claiming them.
    fn poll_carriers(&mut self, now: Instant) {
        for i in 0..self.instances.len() {
            let carrier = net::has_carrier(&self.instances[i].interface);
            if carrier != self.instances[i].carrier {
                self.instances[i].carrier = carrier;
                let actions = if carrier {
                    info!(instance = %self.instances[i].config.name, interface = %self.instances[i].interface, "interface up: joining the election");
                    self.instances[i].fsm.startup(now)
                } else {
                    warn!(instance = %self.instances[i].config.name, interface = %self.instances[i].interface, "interface down: leaving the election");
                    self.instances[i].fsm.shutdown(now)
                };
                self.perform(i, actions);
            }
            let mut changed = false;
            for t in 0..self.instances[i].config.track.len() {
                if let Some(interface) = self.instances[i].config.track[t].interface.clone() {
                    let failing = !net::has_carrier(&interface);
                    if self.instances[i].track_failing[t] != failing {
                        self.instances[i].track_failing[t] = failing;
                        changed = true;
                        if failing {
                            warn!(instance = %self.instances[i].config.name, %interface, "tracked interface down");
                        } else {
                            info!(instance = %self.instances[i].config.name, %interface, "tracked interface up");
                        }
                    }
                }
            }
            if changed {
                self.apply_priority(i, now);
            }
        }
    }

    fn apply_priority(&mut self, i: usize, now: Instant) {
        let instance = &self.instances[i];
        let priority = if instance.base_priority == OWNER_PRIORITY {
            OWNER_PRIORITY
        } else {
            let lowered: i32 = instance
                .config
                .track
                .iter()
                .zip(&instance.track_failing)
                .filter(|(_, failing)| **failing)
                .map(|(track, _)| i32::from(track.weight))
                .sum();
            (i32::from(instance.base_priority) + lowered).clamp(1, 254) as u8
        };
        if priority != instance.fsm.priority() {
            info!(instance = %instance.config.name, vrid = instance.config.vrid, from = instance.fsm.priority(), to = priority, "VRRP priority changed by tracking");
            self.stats
                .update(instance.stats_index, |s| s.priority = priority);
            let actions = self.instances[i].fsm.set_priority(now, priority);
            self.perform(i, actions);
        }
    }

    fn perform(&mut self, i: usize, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::SendAdvert { priority } => self.send_advert(i, priority),
                Action::Transition { from, to, reason } => self.transition(i, from, to, reason),
                Action::MastersMet { peer, won } => {
                    let instance = &self.instances[i];
                    warn!(
                        instance = %instance.config.name,
                        vrid = instance.config.vrid,
                        %peer,
                        outcome = if won { "this node stays master" } else { "this node steps down" },
                        "two masters for one virtual router (split brain), healed"
                    );
                    self.stats
                        .update(instance.stats_index, |s| s.masters_met += 1);
                }
                Action::GratuitousArp => self.gratuitous_arps(i, false),
            }
        }
    }

    fn send_advert(&mut self, i: usize, priority: u8) {
        let instance = &self.instances[i];
        if !instance.carrier {
            return;
        }
        let advert = Advert {
            vrid: instance.config.vrid,
            priority,
            interval_cs: (instance.config.advert_interval.as_millis() / 10) as u16,
            addresses: instance.vips.clone(),
        };
        let socket = &self.sockets[instance.socket];
        let multicast = [VRRP_MULTICAST];
        let destinations: &[Ipv4Addr] = if instance.config.unicast_peers.is_empty() {
            &multicast
        } else {
            &instance.config.unicast_peers
        };
        let (mut sent, mut failed) = (0, 0);
        for &destination in destinations {
            match socket.send(&advert.encode_ip(instance.local, destination), destination) {
                Ok(()) => sent += 1,
                Err(error) => {
                    failed += 1;
                    debug!(instance = %instance.config.name, %destination, %error, "advert not sent");
                }
            }
        }
        self.stats.update(instance.stats_index, |s| {
            s.adverts_sent += sent;
            s.send_errors += failed;
        });
    }

    fn transition(&mut self, i: usize, from: State, to: State, reason: Reason) {
        let instance = &mut self.instances[i];
        info!(
            instance = %instance.config.name,
            vrid = instance.config.vrid,
            from = from.as_str(),
            to = to.as_str(),
            reason = reason.as_str(),
            priority = instance.fsm.priority(),
            vips = ?instance.vips,
            "VRRP state change"
        );
        self.stats.update(instance.stats_index, |s| {
            s.state = to;
            *s.transitions.entry(to.as_str()).or_insert(0) += 1;
        });
        let vips: Vec<IpAddr> = instance.vips.iter().map(|&v| IpAddr::V4(v)).collect();
        self.instances[i]
            .master
            .store(to == State::Master, Ordering::SeqCst);
        if to == State::Master {
            self.owned
                .send_modify(|owned| owned.extend(vips.iter().copied()));
            self.gratuitous_arps(i, true);
            let instance = &self.instances[i];
            for &vip in &instance.vips {
                let _ = self.host.send(HostOp::Add {
                    index: instance.interface_index,
                    interface: instance.interface.clone(),
                    vip,
                });
            }
        }
        if from == State::Master {
            let instance = &mut self.instances[i];
            if let Some(task) = instance.garp_task.take() {
                task.abort();
            }
            for &vip in &instance.vips {
                let _ = self.host.send(HostOp::Remove {
                    index: instance.interface_index,
                    interface: instance.interface.clone(),
                    vip,
                });
            }
            // On shutdown the data plane keeps the VIPs until node.rs
            // removes it, after run() waited STOP_GRACE: this only
            // matters to a node that goes on running.
            let _ = self.host.send(HostOp::Release {
                vips,
                master: instance.master.clone(),
            });
        }
        self.notify(i, to);
    }

    /// Gratuitous ARPs: a burst of `garp_count` rounds (and, on becoming
    /// master, a repeat later), from a task. The first round waits until
    /// the data plane holds the VIPs (at most [`DATAPLANE_HOLD_WAIT`]): a
    /// client sent here before XDP balances the VIP gets the kernel's
    /// reset. That holds for a split-brain win too, which can come within
    /// the same millisecond as becoming master.
    fn gratuitous_arps(&mut self, i: usize, becoming_master: bool) {
        let instance = &mut self.instances[i];
        let send_round = {
            let garp = instance.garp.clone();
            let vips = instance.vips.clone();
            let interface = instance.interface.clone();
            move || {
                for &vip in &vips {
                    if let Err(error) = garp.send(vip) {
                        debug!(%vip, %interface, %error, "gratuitous ARP not sent");
                    }
                }
            }
        };
        let needed: BTreeSet<IpAddr> = instance
            .vips
            .iter()
            .map(|&vip| IpAddr::V4(vip))
            .filter(|vip| self.service_vips.contains(vip))
            .collect();
        let mut applied = self.applied.clone();
        let count = instance.config.garp_count;
        let interval = instance.config.garp_interval;
        let repeat_after = instance.config.garp_repeat_after;
        let task = tokio::spawn(async move {
            if !tasks::wait_until_held(&mut applied, &needed).await {
                warn!(vips = ?needed, "the data plane did not hold the VIPs within {DATAPLANE_HOLD_WAIT:?}; announcing them anyway");
            }
            for round in 0..count {
                if round > 0 && !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
                send_round();
            }
            if becoming_master && !repeat_after.is_zero() {
                tokio::time::sleep(repeat_after).await;
                for round in 0..count {
                    if round > 0 && !interval.is_zero() {
                        tokio::time::sleep(interval).await;
                    }
                    send_round();
                }
            }
        });
        // The burst of a split-brain win runs beside the one (and its
        // repeat) started on becoming master, never in place of it.
        if becoming_master {
            if let Some(previous) = instance.garp_task.replace(task) {
                previous.abort();
            }
        }
    }

    /// keepalived's notify commands, started after the change is done.
    fn notify(&self, i: usize, to: State) {
        let instance = &self.instances[i];
        let word = match to {
            State::Master => "MASTER",
            State::Backup => "BACKUP",
            State::Initialize if instance.carrier => "STOP",
            State::Initialize => "FAULT",
        };
        let specific = match to {
            State::Master => instance.config.notify_master.as_ref(),
            State::Backup => instance.config.notify_backup.as_ref(),
            State::Initialize => None,
        };
        let commands = specific
            .map(|command| (command.clone(), false))
            .into_iter()
            .chain(
                instance
                    .config
                    .notify
                    .clone()
                    .map(|command| (command, true)),
            );
        for (command, with_arguments) in commands {
            let mut child = tokio::process::Command::new("sh");
            child.arg("-c").stdin(std::process::Stdio::null());
            if with_arguments {
                child.arg(format!("{command} \"$@\"")).args([
                    "sh",
                    "INSTANCE",
                    &instance.config.name,
                    word,
                    &instance.fsm.priority().to_string(),
                ]);
            } else {
                child.arg(&command);
            }
            match child.spawn() {
                Ok(mut child) => {
                    tokio::spawn(async move {
                        let _ = child.wait().await;
                    });
                }
                Err(error) => warn!(%command, %error, "cannot start a VRRP notify command"),
            }
        }
    }
}
