//! The pin directory on bpffs: mounted when missing, guarded by a lock so
//! two agents never share one, cleaned on a clean stop.

use std::{
    fs::File,
    io,
    os::{fd::AsRawFd, unix::ffi::OsStrExt},
    path::{Path, PathBuf},
};

use tracing::{info, warn};

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is mounted by convention; the agent mounts it there when a
/// pin directory below it has no bpffs yet (a fresh boot, a container).
const BPFFS_MOUNT_POINT: &str = "/sys/fs/bpf";
/// Lock files, one per pin directory, so a second agent on the same
/// directory is refused instead of stealing the first one's maps.
const LOCK_DIR: &str = "/run/farol";

#[derive(Debug, thiserror::Error)]
pub enum BpfFsError {
    #[error("pin_dir {path} is not on a bpffs (mount one with `mount -t bpf bpf {path}` or choose a directory under {BPFFS_MOUNT_POINT})")]
    NotBpfFs { path: PathBuf },
    #[error("failed to mount bpffs at {BPFFS_MOUNT_POINT}")]
    Mount {
        #[source]
        source: io::Error,
    },
    #[error("failed to create pin directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to inspect {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("another agent is using pin_dir {path} (lock {lock}); stop it or give this node its own pin_dir")]
    InUse { path: PathBuf, lock: PathBuf },
    #[error("failed to lock {lock}")]
    Lock {
        lock: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The pin of the bpf_link that keeps `farol_ingress` attached.
pub(crate) const LINK_PIN: &str = "INGRESS_LINK";

/// The pin directory of one agent.
#[derive(Debug)]
pub(crate) struct Pins {
    dir: PathBuf,
    created_dirs: Vec<PathBuf>,
    /// Set once the data plane runs; until then a failed start removes
    /// what it pinned (unless it was adopting someone else's).
    committed: bool,
    /// False while pins of an earlier agent are present and may be adopted:
    /// a failed start must not tear down a data plane still serving.
    ours: bool,
    /// Held for the agent's lifetime; the kernel drops the lock on exit.
    _lock: File,
}

impl Pins {
    pub(crate) fn prepare(dir: &Path) -> Result<Pins, BpfFsError> {
        let lock = lock_pin_dir(dir)?;
        ensure_bpffs(dir)?;
        let mut created_dirs = Vec::new();
        for ancestor in dir.ancestors().collect::<Vec<_>>().into_iter().rev() {
            if ancestor.as_os_str().is_empty() || ancestor.exists() {
                continue;
            }
            std::fs::create_dir(ancestor).map_err(|source| BpfFsError::CreateDir {
                path: ancestor.to_owned(),
                source,
            })?;
            created_dirs.push(ancestor.to_owned());
        }
        let ours = !dir.join(LINK_PIN).exists()
            && !farol_common::maps::PINNED_MAPS
                .iter()
                .any(|name| dir.join(name).exists());
        Ok(Pins {
            dir: dir.to_owned(),
            created_dirs,
            committed: false,
            ours,
            _lock: lock,
        })
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn path_for(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub(crate) fn link_path(&self) -> PathBuf {
        self.dir.join(LINK_PIN)
    }

    /// The data plane runs: from now on only an explicit stop removes pins.
    pub(crate) fn commit(&mut self) {
        self.committed = true;
    }

    /// Unpins the link and every map, and removes the directories this
    /// agent created (a shared parent holding other nodes' pins stays).
    pub(crate) fn remove_all(&mut self) {
        remove_pins(&self.dir);
        self.ours = true;
        while let Some(dir) = self.created_dirs.pop() {
            if std::fs::remove_dir(&dir).is_err() {
                break;
            }
        }
        info!(pin_dir = %self.dir.display(), "maps unpinned");
    }
}

/// Removes the link pin and every map pin in `dir`, then `dir` if empty;
/// returns what it removed.
pub(crate) fn remove_pins(dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for name in std::iter::once(LINK_PIN).chain(farol_common::maps::PINNED_MAPS.iter().copied()) {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => warn!(path = %path.display(), %error, "failed to unpin"),
        }
    }
    let _ = std::fs::remove_dir(dir);
    removed
}

impl Drop for Pins {
    /// A start that fails after pinning leaves nothing behind, unless it
    /// found a running data plane to adopt: that one keeps serving.
    fn drop(&mut self) {
        if !self.committed && self.ours {
            self.remove_all();
        }
    }
}

fn lock_pin_dir(dir: &Path) -> Result<File, BpfFsError> {
    let name: String = dir
        .as_os_str()
        .as_bytes()
        .iter()
        .map(|&byte| {
            if byte.is_ascii_alphanumeric() {
                byte as char
            } else {
                '_'
            }
        })
        .collect();
    let lock = Path::new(LOCK_DIR).join(format!("pin{name}.lock"));
    let error = |source| BpfFsError::Lock {
        lock: lock.clone(),
        source,
    };
    std::fs::create_dir_all(LOCK_DIR).map_err(error)?;
    let file = File::create(&lock).map_err(error)?;
    // SAFETY: the fd is valid for the life of `file`; flock has no memory effects.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if locked != 0 {
        let source = io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(BpfFsError::InUse {
                path: dir.to_owned(),
                lock,
            });
        }
        return Err(error(source));
    }
    Ok(file)
}

fn ensure_bpffs(dir: &Path) -> Result<(), BpfFsError> {
    let existing = dir
        .ancestors()
        .find(|ancestor| ancestor.exists())
        .unwrap_or(Path::new("/"));
    if is_bpffs(existing)? {
        return Ok(());
    }
    let mount_point = Path::new(BPFFS_MOUNT_POINT);
    if dir.starts_with(mount_point) && mount_point.is_dir() && !is_bpffs(mount_point)? {
        mount_bpffs()?;
        info!("mounted bpffs at {BPFFS_MOUNT_POINT}");
        if is_bpffs(dir.ancestors().find(|a| a.exists()).unwrap_or(mount_point))? {
            return Ok(());
        }
    }
    Err(BpfFsError::NotBpfFs {
        path: dir.to_owned(),
    })
}

fn is_bpffs(path: &Path) -> Result<bool, BpfFsError> {
    let stat_error = |source| BpfFsError::Stat {
        path: path.to_owned(),
        source,
    };
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| stat_error(io::Error::from(io::ErrorKind::InvalidInput)))?;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: c_path is NUL-terminated; stat points to writable memory of the right type.
    let result = unsafe { libc::statfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if result != 0 {
        return Err(stat_error(io::Error::last_os_error()));
    }
    // SAFETY: statfs returned 0, so it filled `stat`.
    let stat = unsafe { stat.assume_init() };
    #[expect(
        clippy::unnecessary_cast,
        reason = "f_type is i64 on x86_64 but u32/i32 on 32-bit ARM"
    )]
    Ok(stat.f_type as i64 == BPF_FS_MAGIC)
}

fn mount_bpffs() -> Result<(), BpfFsError> {
    let source = c"bpf";
    let target = c"/sys/fs/bpf";
    let fstype = c"bpf";
    // SAFETY: all strings are NUL-terminated literals; data may be null.
    let result = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if result != 0 {
        return Err(BpfFsError::Mount {
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}
