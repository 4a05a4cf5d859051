//! The pooler's connection to a PostgreSQL server: TCP, or the server's
//! Unix socket when it runs on this host and `unix_socket_dir` is set
//! (libpq's `host=/DIR`): the same server, reached without the TCP
//! loopback path, which costs the pooler and the server less per message.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpStream, UnixStream},
};

/// A connected server, by either transport.
#[derive(Debug)]
pub enum ServerStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl ServerStream {
    /// Connects to `addr`, through `DIR/.s.PGSQL.PORT` when `unix_dir` is
    /// given and `addr` is on this host.
    pub async fn connect(addr: SocketAddr, unix_dir: Option<&Path>) -> io::Result<ServerStream> {
        if let Some(path) = unix_dir.and_then(|dir| local_socket(dir, addr)) {
            return UnixStream::connect(&path)
                .await
                .map(ServerStream::Unix)
                .map_err(|error| {
                    io::Error::new(error.kind(), format!("{}: {error}", path.display()))
                });
        }
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(ServerStream::Tcp(stream))
    }

    /// As the sockets' `try_read`: reads what is there without waiting.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ServerStream::Tcp(stream) => stream.try_read(buf),
            ServerStream::Unix(stream) => stream.try_read(buf),
        }
    }

    pub fn is_unix(&self) -> bool {
        matches!(self, ServerStream::Unix(_))
    }
}

/// Points a tokio-postgres login (role checks, `auth_query`) at `addr` by
/// the same way [`ServerStream::connect`] takes: the server's socket in
/// `unix_dir` when it is on this host, else TCP. A server that listens
/// only on its socket then works for every connection the pooler opens.
pub fn aim_login(config: &mut tokio_postgres::Config, addr: SocketAddr, unix_dir: Option<&Path>) {
    match unix_dir.filter(|dir| local_socket(dir, addr).is_some()) {
        Some(dir) => config.host_path(dir),
        None => config.host(addr.ip().to_string()),
    };
    config.port(addr.port());
}

/// The socket path for `addr` when it is an address of this host.
fn local_socket(dir: &Path, addr: SocketAddr) -> Option<PathBuf> {
    is_local(addr.ip()).then(|| dir.join(format!(".s.PGSQL.{}", addr.port())))
}

/// Loopback, or an address a socket can bind here (one of this node's).
fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

impl AsyncRead for ServerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tcp(stream) => Pin::new(stream).poll_read(cx, buf),
            ServerStream::Unix(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerStream::Tcp(stream) => Pin::new(stream).poll_write(cx, buf),
            ServerStream::Unix(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tcp(stream) => Pin::new(stream).poll_flush(cx),
            ServerStream::Unix(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tcp(stream) => Pin::new(stream).poll_shutdown(cx),
            ServerStream::Unix(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerStream::Tcp(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            ServerStream::Unix(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ServerStream::Tcp(stream) => stream.is_write_vectored(),
            ServerStream::Unix(stream) => stream.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_addresses_of_this_host_use_the_socket() {
        let dir = Path::new("/run/postgresql");
        let local = SocketAddr::from(([127, 0, 0, 1], 5432));
        assert_eq!(
            local_socket(dir, local),
            Some(PathBuf::from("/run/postgresql/.s.PGSQL.5432"))
        );
        // TEST-NET-3: never an address of a test machine.
        let remote = SocketAddr::from(([203, 0, 113, 7], 5432));
        assert_eq!(local_socket(dir, remote), None);
    }

    #[test]
    fn logins_take_the_socket_only_for_servers_on_this_host() {
        let dir = Path::new("/run/postgresql");
        let mut local = tokio_postgres::Config::new();
        aim_login(
            &mut local,
            SocketAddr::from(([127, 0, 0, 1], 5433)),
            Some(dir),
        );
        assert_eq!(
            local.get_hosts(),
            [tokio_postgres::config::Host::Unix(dir.to_path_buf())]
        );
        assert_eq!(local.get_ports(), [5433]);

        let mut remote = tokio_postgres::Config::new();
        aim_login(
            &mut remote,
            SocketAddr::from(([203, 0, 113, 7], 5432)),
            Some(dir),
        );
        assert_eq!(
            remote.get_hosts(),
            [tokio_postgres::config::Host::Tcp("203.0.113.7".into())]
        );

        let mut tcp = tokio_postgres::Config::new();
        aim_login(&mut tcp, SocketAddr::from(([127, 0, 0, 1], 5432)), None);
        assert_eq!(
            tcp.get_hosts(),
            [tokio_postgres::config::Host::Tcp("127.0.0.1".into())]
        );
    }
}
