//! What VRRP needs from the host: the raw IP protocol 112 socket, gratuitous
//! ARPs on an AF_PACKET socket, the VIP on the interface through netlink,
//! and the interface's carrier. Everything here is per network namespace.

use std::{
    io::Read,
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use futures_util::TryStreamExt;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;

use super::{packet::VRRP_MULTICAST, VrrpError};

/// A raw socket for VRRP on one interface: sends whole IP packets
/// (IP_HDRINCL, so source, TTL 255 and TOS are ours) and receives every
/// protocol-112 packet that reaches the interface.
#[derive(Debug)]
pub(super) struct VrrpSocket {
    socket: AsyncFd<Socket>,
    pub(super) interface: String,
}

impl VrrpSocket {
    /// Opens the socket on `interface`, joined to 224.0.0.18 as `local`
    /// when `multicast`.
    pub(super) fn open(
        interface: &str,
        local: Ipv4Addr,
        multicast: bool,
    ) -> Result<VrrpSocket, VrrpError> {
        let error = |what: &'static str| {
            let interface = interface.to_owned();
            move |source| VrrpError::Socket {
                interface,
                what,
                source,
            }
        };
        let socket = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(i32::from(super::packet::VRRP_PROTOCOL))),
        )
        .map_err(error("open a raw IP socket for protocol 112"))?;
        socket
            .bind_device(Some(interface.as_bytes()))
            .map_err(error("bind to the interface"))?;
        socket
            .set_header_included_v4(true)
            .map_err(error("set IP_HDRINCL"))?;
        if multicast {
            socket
                .set_multicast_loop_v4(false)
                .map_err(error("turn multicast loop off"))?;
            socket
                .set_multicast_if_v4(&local)
                .map_err(error("choose the multicast interface"))?;
            socket
                .join_multicast_v4(&VRRP_MULTICAST, &local)
                .map_err(error("join 224.0.0.18"))?;
        }
        socket
            .set_nonblocking(true)
            .map_err(error("set non-blocking"))?;
        // SAFETY: the socket is owned by the AsyncFd from here on and is
        // closed only when it is dropped (the I/O safety `register` asks).
        let socket =
            unsafe { AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE) }
                .map_err(|registration| error("register with tokio")(registration.into()))?;
        Ok(VrrpSocket {
            socket,
            interface: interface.to_owned(),
        })
    }

    /// Receives one IP packet into `buffer`; returns its length.
    pub(super) async fn recv(&self, buffer: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut guard = self.socket.readable().await?;
            match guard.try_io(|socket| socket.get_ref().read(buffer)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Sends a whole IP packet to `destination` (never blocks for long: a
    /// full send buffer is an error, counted by the caller).
    pub(super) fn send(&self, packet: &[u8], destination: Ipv4Addr) -> std::io::Result<()> {
        let address = SockAddr::from(SocketAddrV4::new(destination, 0));
        self.socket.get_ref().send_to(packet, &address).map(|_| ())
    }
}

/// The interface's index in this namespace.
pub(super) fn interface_index(interface: &str) -> Result<u32, VrrpError> {
    let name = std::ffi::CString::new(interface).map_err(|_| VrrpError::NoInterface {
        interface: interface.to_owned(),
    })?;
    // SAFETY: name is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(VrrpError::NoInterface {
            interface: interface.to_owned(),
        });
    }
    Ok(index)
}

/// True while `interface` is up with a carrier (IFF_UP and IFF_RUNNING):
/// SIOCGIFFLAGS, which answers for this network namespace.
pub(super) fn has_carrier(interface: &str) -> bool {
    // SAFETY: plain socket call; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return false;
    }
    // SAFETY: fd is a fresh socket we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request
        .ifr_name
        .iter_mut()
        .zip(interface.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    // SAFETY: fd is a valid socket and request a valid ifreq for this ioctl.
    let result = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) };
    if result < 0 {
        return false;
    }
    // SAFETY: SIOCGIFFLAGS filled ifru_flags.
    let flags = i32::from(unsafe { request.ifr_ifru.ifru_flags });
    flags & libc::IFF_UP != 0 && flags & libc::IFF_RUNNING != 0
}

/// Sends gratuitous ARP requests (sender and target address both the VIP,
/// to the broadcast MAC), as keepalived does, from an AF_PACKET socket.
#[derive(Debug)]
pub(super) struct GarpSender {
    fd: OwnedFd,
    mac: [u8; 6],
}

const ETH_P_ARP: u16 = 0x0806;

impl GarpSender {
    pub(super) fn open(interface: &str, mac: [u8; 6]) -> Result<GarpSender, VrrpError> {
        let error = |what: &'static str| {
            let interface = interface.to_owned();
            move |source| VrrpError::Socket {
                interface,
                what,
                source,
            }
        };
        let index = interface_index(interface)?;
        // SAFETY: plain socket call; the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                i32::from(ETH_P_ARP.to_be()),
            )
        };
        if fd < 0 {
            return Err(error("open an AF_PACKET socket")(
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: fd is a fresh socket we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_protocol = ETH_P_ARP.to_be();
        address.sll_ifindex = index as i32;
        // SAFETY: address is a valid sockaddr_ll of the given length.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&address as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if bound < 0 {
            return Err(error("bind the AF_PACKET socket")(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(GarpSender { fd, mac })
    }

    /// One gratuitous ARP for `vip`.
    pub(super) fn send(&self, vip: Ipv4Addr) -> std::io::Result<()> {
        let frame = garp_frame(self.mac, vip);
        // SAFETY: frame is a valid buffer of its length; fd is bound.
        let sent =
            unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if sent < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Ethernet broadcast + ARP request "who has VIP, tell VIP" (RFC 5227 §3's
/// announcement form, which Linux accepts as an update of existing entries).
pub(super) fn garp_frame(mac: [u8; 6], vip: Ipv4Addr) -> [u8; 42] {
    let mut frame = [0u8; 42];
    frame[0..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    // Ethernet, IPv4, 6-byte and 4-byte addresses, request.
    frame[14..22].copy_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    frame[22..28].copy_from_slice(&mac);
    frame[28..32].copy_from_slice(&vip.octets());
    // Target MAC stays zero.
    frame[38..42].copy_from_slice(&vip.octets());
    frame
}

/// Adds and removes VIPs on the VRRP interface through rtnetlink.
#[derive(Debug, Clone)]
pub(super) struct AddressManager {
    handle: rtnetlink::Handle,
}

impl AddressManager {
    /// Opens a netlink connection in this namespace; its driver task runs
    /// on the current runtime.
    pub(super) fn open() -> Result<AddressManager, VrrpError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(VrrpError::Netlink)?;
        tokio::spawn(connection);
        Ok(AddressManager { handle })
    }

    /// Adds `vip/32` to the interface; an address already there is fine.
    pub(super) async fn add(&self, index: u32, vip: Ipv4Addr) -> Result<(), rtnetlink::Error> {
        match self
            .handle
            .address()
            .add(index, IpAddr::V4(vip), 32)
            .execute()
            .await
        {
            Err(rtnetlink::Error::NetlinkError(message)) if message.raw_code() == -libc::EEXIST => {
                Ok(())
            }
            other => other,
        }
    }

    /// Removes `vip/32` from the interface if present.
    pub(super) async fn remove(&self, index: u32, vip: Ipv4Addr) -> Result<bool, rtnetlink::Error> {
        let mut addresses = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(IpAddr::V4(vip))
            .set_prefix_length_filter(32)
            .execute();
        let mut removed = false;
        while let Some(message) = addresses.try_next().await? {
            self.handle.address().del(message).execute().await?;
            removed = true;
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gratuitous_arp_announces_the_vip_with_our_mac() {
        let mac = [0x02, 0, 0, 0, 0, 0x11];
        let vip = Ipv4Addr::new(192, 0, 2, 100);
        let frame = garp_frame(mac, vip);
        let parsed = etherparse::SlicedPacket::from_ethernet(&frame).unwrap();
        let Some(etherparse::NetSlice::Arp(arp)) = parsed.net else {
            panic!("not ARP: {parsed:?}");
        };
        assert_eq!(arp.operation(), etherparse::ArpOperation::REQUEST);
        assert_eq!(arp.sender_hw_addr(), &mac);
        assert_eq!(arp.sender_protocol_addr(), &vip.octets());
        assert_eq!(arp.target_protocol_addr(), &vip.octets());
        assert_eq!(&frame[..6], &[0xff; 6], "broadcast");
    }
}
