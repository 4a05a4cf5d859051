//! The pooler's Unix socket for clients on this node
//! (`pooler.listen_socket_dir`): `DIR/.s.PGSQL.PORT`, the path libpq's
//! `host=DIR port=PORT` opens, as PostgreSQL and PgBouncer lay it out.

use std::{
    io,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
};

use tokio::net::{UnixListener, UnixStream};

use super::PoolerError;

/// The bound socket; its file is removed when dropped.
#[derive(Debug)]
pub struct ClientSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ClientSocket {
    /// Binds `DIR/.s.PGSQL.PORT`. A socket file left by a pooler that
    /// died is replaced; one that still answers, or a file that is not a
    /// socket, is an error that names the path.
    pub fn bind(dir: &Path, port: u16) -> Result<ClientSocket, PoolerError> {
        let path = dir.join(format!(".s.PGSQL.{port}"));
        let error = |source: io::Error| PoolerError::BindSocket {
            path: path.clone(),
            source,
        };
        if let Ok(metadata) = std::fs::symlink_metadata(&path) {
            if !metadata.file_type().is_socket() {
                return Err(error(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is in the way",
                )));
            }
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                return Err(error(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process listens on it",
                )));
            }
            std::fs::remove_file(&path).map_err(error)?;
        }
        let listener = UnixListener::bind(&path).map_err(error)?;
        // Every local user may connect, as to PostgreSQL's own socket:
        // the login checks who they are.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).map_err(error)?;
        Ok(ClientSocket { listener, path })
    }

    pub async fn accept(&self) -> io::Result<UnixStream> {
        self.listener.accept().await.map(|(stream, _)| stream)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ClientSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Removes the test's directory, also when the test fails.
    struct Dir(PathBuf);

    impl Dir {
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_live_one_is_not_taken_over() {
        let dir = std::env::temp_dir().join(format!("farol-listen-socket-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dir = Dir(dir);
        // Left by a process that died: bound, never removed.
        let stale = dir.path().join(".s.PGSQL.6432");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let socket = ClientSocket::bind(dir.path(), 6432).unwrap();
        let mode = std::fs::metadata(socket.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o777);

        let error = ClientSocket::bind(dir.path(), 6432).unwrap_err();
        assert!(
            crate::error_chain(&error).contains("another process listens on it"),
            "{}",
            crate::error_chain(&error)
        );
        let path = socket.path().to_owned();
        drop(socket);
        assert!(!path.exists(), "removed when the pooler stops");

        std::fs::write(&path, b"not a socket").unwrap();
        let error = ClientSocket::bind(dir.path(), 6432).unwrap_err();
        assert!(crate::error_chain(&error).contains("not a socket"));
        assert!(crate::error_chain(&error).contains(".s.PGSQL.6432"));
    }
}
