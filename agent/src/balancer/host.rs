//! What DSR needs from the host: the interface's MAC, backends' MACs from
//! the neighbour table, the VIPs on `lo`, and ARP for them suppressed on the
//! LAN (LVS-DR's `arp_ignore=1`, `arp_announce=2`), undone on stop.
//!
//! Addresses on `lo` are set with iproute2's `ip` and the neighbour table is
//! read from /proc/net/arp: both are per network namespace, as the lab
//! needs. (A netlink crate would do the same without a child process; see
//! the closing note of the load balancer issue.)

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
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

/// Finds backends' MACs: a datagram to the discard port makes the kernel
/// resolve the address; the answer lands in the neighbour table.
pub(super) struct NeighborResolver {
    iface: String,
    table: HashMap<IpAddr, [u8; 6]>,
}

impl NeighborResolver {
    pub(super) fn new(iface: &str) -> NeighborResolver {
        NeighborResolver {
            iface: iface.to_owned(),
            table: HashMap::new(),
        }
    }

    pub(super) async fn resolve_all(&mut self, addresses: &[IpAddr]) {
        for attempt in 0..10 {
            self.table = read_arp_table(&self.iface);
            let missing: Vec<IpAddr> = addresses
                .iter()
                .copied()
                .filter(|addr| !self.table.contains_key(addr))
                .collect();
            if missing.is_empty() {
                return;
            }
            if attempt == 0 || attempt == 5 {
                if let Ok(socket) = tokio::net::UdpSocket::bind("0.0.0.0:0").await {
                    for addr in &missing {
                        // Discard port: nothing listens; the point is the ARP.
                        let _ = socket.send_to(&[], SocketAddr::new(*addr, 9)).await;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(super) fn mac(&self, addr: IpAddr) -> Option<[u8; 6]> {
        self.table.get(&addr).copied()
    }
}

/// Complete IPv4 entries of /proc/net/arp on `iface`.
fn read_arp_table(iface: &str) -> HashMap<IpAddr, [u8; 6]> {
    const ATF_COM: u32 = 0x2;
    let text = std::fs::read_to_string("/proc/net/arp").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [ip, _hw_type, flags, mac, _mask, device] = fields[..] else {
                return None;
            };
            let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).ok()?;
            if device != iface || flags & ATF_COM == 0 {
                return None;
            }
            let ip: Ipv4Addr = ip.parse().ok()?;
            let mut octets = mac.split(':').map(|part| u8::from_str_radix(part, 16));
            let mac: [u8; 6] =
                std::array::from_fn(|_| octets.next().and_then(Result::ok).unwrap_or(0));
            Some((IpAddr::V4(ip), mac))
        })
        .collect()
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
