//! Replicated volumes (GlusterFS replica volumes' job): each volume's files
//! live on a brick directory of every node in its replica set, are mounted
//! with FUSE on each of those nodes, and heal themselves after a node was
//! away.
//!
//! # Layout
//! - `brick.rs`: the local brick: replicated changes, heal entries, listings.
//! - `fs.rs`: the FUSE file system over the local brick; `kernel_cache.rs`:
//!   what the kernel caches of it, invalidated on peers' changes and heals.
//! - `replica.rs`: quorum writes, currentness, split-brain resolution.
//! - `protocol.rs` + `auth.rs`: framed, HMAC-authenticated messages.
//! - `net.rs`: peer connections and the listener.
//! - `heal.rs`: the change log and background heal; `full_heal.rs`: the
//!   full-scan heal.
//! - `metrics.rs`: the `/metrics` collector; `cli.rs`: `agent volume ...`.
//!
//! Not here: membership/consensus (peers are the configured replica set),
//! distributed locks (two nodes writing the same byte range at once may
//! apply in different orders), and hard links across heals (a healed link
//! becomes a copy).

pub mod auth;
pub mod brick;
pub mod cli;
pub mod dir_sync;
pub mod fs;
mod full_heal;
pub mod heal;
pub mod kernel_cache;
pub mod metrics;
pub mod net;
pub mod protocol;
pub mod replica;
pub mod trash;
pub mod write_behind;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::config::{Config, VolumeConfig};

use self::{
    auth::{AuthError, FrameKey},
    brick::{Brick, BrickError},
    heal::{ChangeLog, HealError},
    replica::{Volume, VolumeSetup},
};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("volume {volume}: cannot read the cluster secret")]
    Secret {
        volume: String,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {volume}: no cluster secret (set cluster.secret_file)")]
    NoSecret { volume: String },
    #[error("volume {volume}: bad cluster secret")]
    Auth {
        volume: String,
        #[source]
        source: AuthError,
    },
    #[error("volume {volume}")]
    Brick {
        volume: String,
        #[source]
        source: BrickError,
    },
    #[error("volume {volume}")]
    Log {
        volume: String,
        #[source]
        source: HealError,
    },
    #[error("volume {volume}: cannot listen on {addr} (another agent on this port?)")]
    Bind {
        volume: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {volume}: cannot mount on {mount}")]
    Mount {
        volume: String,
        mount: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {volume}: node {node} holds no replica")]
    NoReplica { volume: String, node: String },
}

/// Where the cluster secret comes from.
#[derive(Debug, Clone)]
pub struct SecretSource {
    pub secret: Option<String>,
    pub file: Option<PathBuf>,
}

impl SecretSource {
    pub fn read(&self, volume: &str) -> Result<FrameKey, StorageError> {
        let bytes = if let Some(secret) = &self.secret {
            secret.as_bytes().to_vec()
        } else if let Some(file) = &self.file {
            let text = std::fs::read(file).map_err(|source| StorageError::Secret {
                volume: volume.to_owned(),
                source,
            })?;
            let end = text
                .iter()
                .rposition(|b| !b.is_ascii_whitespace())
                .map_or(0, |i| i + 1);
            text[..end].to_vec()
        } else {
            return Err(StorageError::NoSecret {
                volume: volume.to_owned(),
            });
        };
        FrameKey::new(&bytes).map_err(|source| StorageError::Auth {
            volume: volume.to_owned(),
            source,
        })
    }
}

/// One volume as this node runs it.
#[derive(Debug, Clone)]
pub struct VolumePlan {
    pub volume: VolumeConfig,
    pub node: String,
    pub listen: SocketAddr,
    pub brick: PathBuf,
    pub mount: PathBuf,
    pub peers: Vec<(String, SocketAddr)>,
    pub secret: SecretSource,
}

/// The volumes `node` holds a replica of (validated config: every replica
/// has an address and a mount point).
pub fn plans(config: &Config, node: &str) -> Vec<VolumePlan> {
    let secret = SecretSource {
        secret: config.cluster.secret.clone(),
        file: config.cluster.secret_file.clone(),
    };
    config
        .volumes
        .iter()
        .filter_map(|volume| {
            let replica = volume.replica(node)?;
            let listen = volume.listen(replica, &config.nodes)?;
            let mount = volume.mount_point(replica)?;
            let peers = volume
                .replicas
                .iter()
                .filter(|other| other.node != node)
                .filter_map(|other| {
                    Some((other.node.clone(), volume.listen(other, &config.nodes)?))
                })
                .collect();
            Some(VolumePlan {
                volume: volume.clone(),
                node: node.to_owned(),
                listen,
                brick: replica.brick.clone(),
                mount,
                peers,
                secret: secret.clone(),
            })
        })
        .collect()
}

/// The running volumes of this node.
#[derive(Debug)]
pub struct Service {
    volumes: Vec<Arc<Volume>>,
    mounts: Vec<(PathBuf, fuser::BackgroundSession)>,
    tasks: Vec<JoinHandle<()>>,
    heal_threads: Vec<std::thread::JoinHandle<()>>,
}

impl Service {
    /// Opens the bricks, binds the listeners, connects to peers, starts
    /// heal, and mounts. Tasks stop when `shutdown` turns true; call
    /// [`Service::stop`] then to unmount and join.
    pub async fn start(
        plans: Vec<VolumePlan>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Service, StorageError> {
        let mut service = Service {
            volumes: Vec::new(),
            mounts: Vec::new(),
            tasks: Vec::new(),
            heal_threads: Vec::new(),
        };
        for plan in plans {
            if let Err(error) = service.start_one(plan, shutdown.clone()).await {
                service.stop().await;
                return Err(error);
            }
        }
        Ok(service)
    }

    async fn start_one(
        &mut self,
        plan: VolumePlan,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(), StorageError> {
        let name = plan.volume.name.clone();
        let key = plan.secret.read(&name)?;
        let brick = Brick::open(&plan.brick).map_err(|source| StorageError::Brick {
            volume: name.clone(),
            source,
        })?;
        let log = ChangeLog::open(&brick.state_dir()).map_err(|source| StorageError::Log {
            volume: name.clone(),
            source,
        })?;
        let listener =
            TcpListener::bind(plan.listen)
                .await
                .map_err(|source| StorageError::Bind {
                    volume: name.clone(),
                    addr: plan.listen,
                    source,
                })?;
        let root_ino = std::fs::metadata(brick.root())
            .map(|meta| std::os::unix::fs::MetadataExt::ino(&meta))
            .map_err(|source| StorageError::Mount {
                volume: name.clone(),
                mount: plan.mount.clone(),
                source,
            })?;
        let kernel = Arc::new(kernel_cache::KernelCache::new(
            root_ino,
            kernel_cache::Timeouts {
                attr: plan.volume.attr_timeout,
                entry: plan.volume.entry_timeout,
                negative: plan.volume.negative_timeout,
            },
        ));
        let setup = VolumeSetup {
            name: name.clone(),
            node: plan.node.clone(),
            brick,
            quorum: plan.volume.quorum(),
            peers: plan.peers.clone(),
            log,
            policy: plan.volume.split_brain,
            source: plan.volume.split_brain_source.clone(),
            heal_rate: u64::from(plan.volume.heal_rate_mib) * 1024 * 1024,
            timeout: plan.volume.peer_timeout,
            kernel,
        };
        let (volume, receivers) = Volume::new(setup, tokio::runtime::Handle::current());
        self.volumes.push(Arc::clone(&volume));
        self.tasks.push(tokio::spawn(net::serve(
            listener,
            Arc::clone(&volume),
            key.clone(),
            shutdown.clone(),
        )));
        for (peer, rx) in receivers.into_iter().enumerate() {
            self.tasks.push(tokio::spawn(net::run_peer(
                Arc::clone(&volume),
                peer,
                key.clone(),
                rx,
                shutdown.clone(),
            )));
            let heal_volume = Arc::clone(&volume);
            let thread = std::thread::Builder::new()
                .name(format!("heal-{}", volume.peer_name(peer)))
                .spawn(move || heal::heal_loop(heal_volume, peer))
                .map_err(|source| StorageError::Mount {
                    volume: name.clone(),
                    mount: plan.mount.clone(),
                    source,
                })?;
            self.heal_threads.push(thread);
        }
        let session = mount(&volume, &plan.mount)
            .await
            .map_err(|source| StorageError::Mount {
                volume: name.clone(),
                mount: plan.mount.clone(),
                source,
            })?;
        info!(
            volume = %name, node = %plan.node, listen = %plan.listen,
            brick = %plan.brick.display(), mount = %plan.mount.display(),
            quorum = volume.quorum(), replicas = plan.peers.len() + 1,
            "volume mounted"
        );
        self.mounts.push((plan.mount, session));
        Ok(())
    }

    pub fn volumes(&self) -> &[Arc<Volume>] {
        &self.volumes
    }

    /// The `/metrics` collector for these volumes.
    pub fn collector(&self) -> metrics::StorageCollector {
        metrics::StorageCollector::new(self.volumes.clone())
    }

    /// Unmounts, stops heal, and waits for the connection tasks (which end
    /// on the shutdown signal given to `start`).
    pub async fn stop(self) {
        for (mount, session) in self.mounts {
            let shown = mount.display().to_string();
            let joined = tokio::task::spawn_blocking(move || session.umount_and_join()).await;
            match joined {
                Ok(Ok(())) => info!(mount = %shown, "volume unmounted"),
                Ok(Err(error)) => {
                    warn!(mount = %shown, %error, "unmount failed; detaching lazily");
                    lazy_unmount(Path::new(&shown));
                }
                Err(error) => warn!(mount = %shown, %error, "unmount task failed"),
            }
        }
        for volume in &self.volumes {
            volume.stop();
        }
        for task in self.tasks {
            match tokio::time::timeout(Duration::from_secs(5), task).await {
                Ok(_) => {}
                Err(_) => warn!("a volume task did not stop within 5s"),
            }
        }
        for thread in self.heal_threads {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// Detaches whatever is mounted at `path` (a stale mount of a killed agent).
pub fn lazy_unmount(path: &Path) {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: a NUL-terminated path alive for the call.
    unsafe {
        libc::umount2(c.as_ptr(), libc::MNT_DETACH);
    }
}

async fn mount(volume: &Arc<Volume>, mount: &Path) -> std::io::Result<fuser::BackgroundSession> {
    let volume = Arc::clone(volume);
    let mount = mount.to_owned();
    tokio::task::spawn_blocking(move || {
        // A killed agent leaves its mount behind ("transport endpoint is
        // not connected"); take it away first.
        if let Err(error) = std::fs::metadata(&mount) {
            if error.raw_os_error() == Some(libc::ENOTCONN) {
                warn!(mount = %mount.display(), "removing a stale mount");
                lazy_unmount(&mount);
            }
        }
        std::fs::create_dir_all(&mount)?;
        let fs = fs::VolumeFs::new(Arc::clone(&volume))?;
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName(format!("farol:{}", volume.name())),
            fuser::MountOption::Subtype("farol".into()),
            fuser::MountOption::DefaultPermissions,
        ];
        config.acl = fuser::SessionACL::All;
        config.n_threads = Some(4);
        let session = fuser::Session::new(fs, &mount, &config)?;
        // Before any request is served, so nothing the kernel caches is
        // missed by an invalidation.
        volume.kernel_cache().set_notifier(session.notifier());
        session.spawn()
    })
    .await
    .map_err(std::io::Error::other)?
}
