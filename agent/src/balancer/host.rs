//! What DSR needs from the host: the interface's MAC, backends' MACs from
//! the neighbour table, the VIPs on `lo`, and ARP for them suppressed on the
//! LAN (LVS-DR's `arp_ignore=1`, `arp_announce=2`), undone on stop.
//!
//! The neighbour table (ARP and NDP) is read over rtnetlink; addresses on
//! `lo` are still set with iproute2's `ip`. Both are per network namespace,
//! as the lab needs.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    process::Command,
    time::Duration,
};

use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot read the MAC address of {iface}")]
    InterfaceMac {
        iface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("cannot run `ip`")]
    IpSpawn(#[source] std::io::Error),
    #[error("cannot set {path}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The MAC of `iface` in this network namespace (SIOCGIFHWADDR; sysfs would
/// show the namespace that mounted /sys, not ours).
pub(crate) fn interface_mac(iface: &str) -> Result<[u8; 6], HostError> {
    let error = |source| HostError::InterfaceMac {
        iface: iface.to_owned(),
        source,
    };
    // SAFETY: plain socket call; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(error(std::io::Error::last_os_error()));
    }
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request
        .ifr_name
        .iter_mut()
        .zip(iface.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    // SAFETY: fd is a valid socket and request a valid ifreq for this ioctl.
    let result = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut request) };
    let io_error = std::io::Error::last_os_error();
    // SAFETY: fd is ours and closed once.
    unsafe { libc::close(fd) };
    if result < 0 {
        return Err(error(io_error));
    }
    // SAFETY: SIOCGIFHWADDR filled ifru_hwaddr.
    let data = unsafe { request.ifr_ifru.ifru_hwaddr.sa_data };
    Ok(std::array::from_fn(|i| data[i] as u8))
}

/// Finds backends' MACs (IPv4 through ARP, IPv6 through NDP): a datagram
/// to the discard port makes the kernel resolve the address; the answer
/// lands in the neighbour table, read over rtnetlink.
pub(super) struct NeighborResolver {
    iface_index: u32,
    netlink: Option<(rtnetlink::Handle, tokio::task::JoinHandle<()>)>,
    table: HashMap<IpAddr, [u8; 6]>,
}

impl NeighborResolver {
    /// Needs a tokio runtime (the netlink connection runs as a task).
    pub(super) fn new(iface: &str) -> NeighborResolver {
        let iface_index = std::ffi::CString::new(iface)
            // SAFETY: a valid NUL-terminated name; the call only reads it.
            .map(|name| unsafe { libc::if_nametoindex(name.as_ptr()) })
            .unwrap_or(0);
        let netlink = match rtnetlink::new_connection() {
            Ok((connection, handle, _)) => Some((handle, tokio::spawn(connection))),
            Err(error) => {
                warn!(%error, "cannot open a netlink socket: backends stay unresolved");
                None
            }
        };
        NeighborResolver {
            iface_index,
            netlink,
            table: HashMap::new(),
        }
    }

    pub(super) async fn resolve_all(&mut self, addresses: &[IpAddr]) {
        for attempt in 0..10 {
            self.table = self.read_neighbours().await;
            let missing: Vec<IpAddr> = addresses
                .iter()
                .copied()
                .filter(|addr| !self.table.contains_key(addr))
                .collect();
            if missing.is_empty() {
                return;
            }
            if attempt == 0 || attempt == 5 {
                kick_resolution(&missing).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(super) fn mac(&self, addr: IpAddr) -> Option<[u8; 6]> {
        self.table.get(&addr).copied()
    }

    /// Usable entries of the neighbour table (ARP and NDP) on our interface.
    async fn read_neighbours(&self) -> HashMap<IpAddr, [u8; 6]> {
        use futures_util::TryStreamExt;
        use rtnetlink::packet_route::neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourState,
        };
        let mut table = HashMap::new();
        let Some((handle, _)) = &self.netlink else {
            return table;
        };
        let mut dump = handle.neighbours().get().execute();
        loop {
            let message = match dump.try_next().await {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(error) => {
                    warn!(%error, "reading the neighbour table failed");
                    break;
                }
            };
            let usable = matches!(
                message.header.state,
                NeighbourState::Reachable
                    | NeighbourState::Stale
                    | NeighbourState::Delay
                    | NeighbourState::Probe
                    | NeighbourState::Permanent
                    | NeighbourState::Noarp
            );
            if message.header.ifindex != self.iface_index || !usable {
                continue;
            }
            let (mut addr, mut mac) = (None, None);
            for attribute in message.attributes {
                match attribute {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                        addr = Some(IpAddr::V4(v4))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                        addr = Some(IpAddr::V6(v6))
                    }
                    NeighbourAttribute::LinkLayerAddress(bytes) => {
                        mac = <[u8; 6]>::try_from(bytes.as_slice()).ok()
                    }
                    _ => {}
                }
            }
            if let (Some(addr), Some(mac)) = (addr, mac) {
                table.insert(addr, mac);
            }
        }
        table
    }
}

impl Drop for NeighborResolver {
    fn drop(&mut self) {
        if let Some((_, task)) = &self.netlink {
            task.abort();
        }
    }
}

/// Makes the kernel resolve `addresses` (ARP or NDP) by sending each an
/// empty datagram to the discard port, where nothing listens.
async fn kick_resolution(addresses: &[IpAddr]) {
    for family in [true, false] {
        let bind = if family { "0.0.0.0:0" } else { "[::]:0" };
        let Ok(socket) = tokio::net::UdpSocket::bind(bind).await else {
            continue;
        };
        for addr in addresses.iter().filter(|addr| addr.is_ipv4() == family) {
            let _ = socket.send_to(&[], SocketAddr::new(*addr, 9)).await;
        }
    }
}

/// The VIPs on `lo` and the ARP sysctls, with what to restore.
#[derive(Debug, Default)]
pub(super) struct DsrHost {
    added: Vec<IpAddr>,
    sysctls: Vec<(String, String)>,
}

fn ip(args: &[&str]) -> Result<String, HostError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(HostError::IpSpawn)?;
    if !out.status.success() {
        return Err(HostError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn host_prefix(vip: IpAddr) -> String {
    match vip {
        IpAddr::V4(v4) => format!("{v4}/32"),
        IpAddr::V6(v6) => format!("{v6}/128"),
    }
}

impl DsrHost {
    /// Puts `vips` on `lo` and stops this node from answering ARP for them
    /// (only the VIP's owner answers, from the XDP program).
    pub(super) fn prepare(iface: &str, vips: &[IpAddr]) -> Result<DsrHost, HostError> {
        let mut host = DsrHost::default();
        if vips.is_empty() {
            return Ok(host);
        }
        for (key, value) in [("arp_ignore", "1"), ("arp_announce", "2")] {
            for scope in ["all", iface] {
                let path = format!("/proc/sys/net/ipv4/conf/{scope}/{key}");
                let old = std::fs::read_to_string(&path).map_err(|source| HostError::Sysctl {
                    path: path.clone(),
                    source,
                })?;
                std::fs::write(&path, value).map_err(|source| HostError::Sysctl {
                    path: path.clone(),
                    source,
                })?;
                host.sysctls.push((path, old.trim().to_owned()));
            }
        }
        let present = ip(&["-o", "addr", "show", "dev", "lo"])?;
        for &vip in vips {
            let prefix = host_prefix(vip);
            // A VIP already there was left by an earlier agent (crash or
            // upgrade): it is ours to remove on a clean stop as well.
            if !present.contains(&format!(" {prefix} ")) {
                ip(&["addr", "add", &prefix, "dev", "lo"])?;
                info!(%vip, "VIP added to lo for direct server return");
            }
            host.added.push(vip);
        }
        Ok(host)
    }

    /// Leaves the VIPs and sysctls in place for the next agent.
    pub(super) fn keep(&mut self) {
        self.added.clear();
        self.sysctls.clear();
    }

    /// Removes what `prepare` added and restores the sysctls.
    pub(super) fn restore(&mut self) {
        for vip in self.added.drain(..) {
            match ip(&["addr", "del", &host_prefix(vip), "dev", "lo"]) {
                Ok(_) => info!(%vip, "VIP removed from lo"),
                Err(error) => warn!(%vip, %error, "could not remove VIP from lo"),
            }
        }
        for (path, old) in self.sysctls.drain(..).rev() {
            if let Err(error) = std::fs::write(&path, &old) {
                warn!(%path, %error, "could not restore sysctl");
            }
        }
    }
}

impl Drop for DsrHost {
    fn drop(&mut self) {
        self.restore();
    }
}

/// Removes `vips` from `lo` where present (`agent teardown`); returns those
/// removed.
pub fn remove_vips_from_lo(vips: &[IpAddr]) -> Result<Vec<IpAddr>, HostError> {
    let present = ip(&["-o", "addr", "show", "dev", "lo"])?;
    let mut removed = Vec::new();
    for &vip in vips {
        let prefix = host_prefix(vip);
        if present.contains(&format!(" {prefix} ")) {
            ip(&["addr", "del", &prefix, "dev", "lo"])?;
            removed.push(vip);
        }
    }
    Ok(removed)
}
