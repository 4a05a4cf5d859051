//! A brick: the local directory that holds this node's replica of a volume.
//! Paths inside a brick are relative, `/`-separated UTF-8 strings (`""` is
//! the root). `.farol/` at the brick root holds the agent's own state (the
//! change log) and is invisible through the mount.
//!
//! This module applies replicated changes ([`Op`]), captures and installs
//! whole entries for self-heal ([`Entry`]), and lists a brick for the
//! full-scan heal ([`ManifestEntry`]). Everything here is blocking std/libc
//! IO; callers run it on FUSE threads or `spawn_blocking`.

use std::{
    ffi::CString,
    fs::{self, File, OpenOptions},
    io::{self, Read, Seek, SeekFrom, Write},
    os::unix::{
        ffi::OsStrExt,
        fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::trash::Trash;

/// The agent's state directory at the brick root (hidden from the mount).
pub const STATE_DIR: &str = ".farol";

/// A change to a brick, replicated to every replica in the same order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// Create (or, on a replica that has a stale copy, truncate) a file.
    Create {
        path: String,
        mode: u32,
        uid: u32,
        gid: u32,
        /// Chosen by the originator, so every replica's copy agrees.
        mtime_ns: i64,
    },
    Mkdir {
        path: String,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Symlink {
        path: String,
        target: String,
        uid: u32,
        gid: u32,
    },
    Link {
        from: String,
        to: String,
    },
    Write {
        path: String,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        /// Chosen by the originator, so every replica's copy agrees.
        mtime_ns: i64,
    },
    /// Times are resolved by the originating node, so replicas agree.
    SetAttr {
        path: String,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime_ns: Option<i64>,
        mtime_ns: Option<i64>,
    },
    Unlink {
        path: String,
    },
    Rmdir {
        path: String,
    },
    Rename {
        from: String,
        to: String,
        noreplace: bool,
    },
    SetXattr {
        path: String,
        name: String,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        flags: i32,
    },
    RemoveXattr {
        path: String,
        name: String,
    },
    /// Make earlier changes to `path` durable.
    Fsync {
        path: String,
    },
}

impl Op {
    /// The paths whose state this change alters (what a replica that
    /// misses it must have healed).
    pub fn paths(&self) -> Vec<&str> {
        match self {
            Op::Create { path, .. }
            | Op::Mkdir { path, .. }
            | Op::Symlink { path, .. }
            | Op::Write { path, .. }
            | Op::SetAttr { path, .. }
            | Op::Unlink { path }
            | Op::Rmdir { path }
            | Op::SetXattr { path, .. }
            | Op::RemoveXattr { path, .. } => vec![path],
            Op::Link { to, .. } => vec![to],
            Op::Rename { from, to, .. } => vec![from, to],
            // A missed fsync changes nothing visible: the writes it made
            // durable are recorded themselves.
            Op::Fsync { .. } => vec![],
        }
    }
}

/// The read size of [`Brick::digest`].
const CAPTURE_CHUNK: usize = 1 << 20;

/// Ownership, mode, times and extended attributes of an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub xattrs: Vec<(String, serde_bytes::ByteBuf)>,
}

/// The whole state of one path, as self-heal sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    Absent,
    /// A directory and the names it holds (others are removed).
    Dir {
        meta: Meta,
        children: Vec<String>,
    },
    /// A file, in chunks: `offset` 0 starts it, `last` installs it.
    File {
        meta: Meta,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        last: bool,
    },
    Symlink {
        meta: Meta,
        target: String,
    },
}

impl Entry {
    /// Modification time for the split-brain policy (absent: never).
    pub fn mtime_ns(&self) -> i64 {
        match self {
            Entry::Absent => i64::MIN,
            Entry::Dir { meta, .. } | Entry::File { meta, .. } | Entry::Symlink { meta, .. } => {
                meta.mtime_ns
            }
        }
    }
}

/// One line of a brick listing, compared across replicas by full heal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub path: String,
    /// 0 file, 1 directory, 2 symlink.
    pub kind: u8,
    pub mode: u32,
    pub mtime_ns: i64,
    /// SHA-256 of the content (file) or target (symlink); zero for dirs.
    pub digest: [u8; 32],
}

impl ManifestEntry {
    /// Whether two replicas hold the same thing (times aside).
    pub fn same_content(&self, other: &ManifestEntry) -> bool {
        self.kind == other.kind && self.mode == other.mode && self.digest == other.digest
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BrickError {
    #[error("brick {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A brick directory.
#[derive(Debug, Clone)]
pub struct Brick {
    root: PathBuf,
    /// Where unlinked files wait for their blocks to be freed.
    trash: Arc<Trash>,
}

impl Brick {
    /// Opens (creating if needed) the brick at `root` and its state dir.
    pub fn open(root: &Path) -> Result<Brick, BrickError> {
        let state = root.join(STATE_DIR);
        fs::create_dir_all(&state).map_err(|source| BrickError::Open {
            path: state.clone(),
            source,
        })?;
        let trash = Trash::open(&state).map_err(|source| BrickError::Open {
            path: state.join(super::trash::TRASH_DIR),
            source,
        })?;
        Ok(Brick {
            root: root.to_owned(),
            trash: Arc::new(trash),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root.join(STATE_DIR)
    }

    /// The absolute path of `rel` (`""` is the root).
    pub fn abs(&self, rel: &str) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }

    /// Applies a replicated change; on a replica it must leave the same
    /// state as on the originator.
    pub fn apply(&self, op: &Op) -> io::Result<()> {
        match op {
            Op::Create {
                path,
                mode,
                uid,
                gid,
                mtime_ns,
            } => {
                let abs = self.abs(path);
                if let Ok(meta) = fs::symlink_metadata(&abs) {
                    if meta.is_dir() {
                        fs::remove_dir_all(&abs)?;
                    } else if !meta.is_file() {
                        fs::remove_file(&abs)?;
                    }
                }
                let file = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(*mode)
                    .open(&abs)?;
                own_new_file(&file, *mode, *uid, *gid)?;
                set_file_times(&file, None, Some(*mtime_ns))
            }
            Op::Mkdir {
                path,
                mode,
                uid,
                gid,
            } => {
                let abs = self.abs(path);
                fs::create_dir(&abs)?;
                fs::set_permissions(&abs, fs::Permissions::from_mode(*mode & 0o7777))?;
                std::os::unix::fs::lchown(&abs, Some(*uid), Some(*gid))
            }
            Op::Symlink {
                path,
                target,
                uid,
                gid,
            } => {
                let abs = self.abs(path);
                std::os::unix::fs::symlink(target, &abs)?;
                std::os::unix::fs::lchown(&abs, Some(*uid), Some(*gid))
            }
            Op::Link { from, to } => fs::hard_link(self.abs(from), self.abs(to)),
            Op::Write {
                path,
                offset,
                data,
                mtime_ns,
            } => {
                let abs = self.abs(path);
                let file = OpenOptions::new().write(true).open(&abs)?;
                file.write_all_at(data, *offset)?;
                start_writeback(&file, *offset, data.len());
                set_file_times(&file, None, Some(*mtime_ns))
            }
            Op::SetAttr {
                path,
                mode,
                uid,
                gid,
                size,
                atime_ns,
                mtime_ns,
            } => self.set_attr(path, *mode, *uid, *gid, *size, *atime_ns, *mtime_ns),
            Op::Unlink { path } => self.trash.unlink(&self.abs(path)),
            Op::Rmdir { path } => fs::remove_dir(self.abs(path)),
            Op::Rename {
                from,
                to,
                noreplace,
            } => {
                let (from, to) = (self.abs(from), self.abs(to));
                if *noreplace && fs::symlink_metadata(&to).is_ok() {
                    return Err(io::Error::from_raw_os_error(libc::EEXIST));
                }
                fs::rename(from, to)
            }
            Op::SetXattr {
                path,
                name,
                value,
                flags,
            } => set_xattr(&self.abs(path), name, value, *flags),
            Op::RemoveXattr { path, name } => remove_xattr(&self.abs(path), name),
            Op::Fsync { path } => File::open(self.abs(path))?.sync_all(),
        }
    }

    #[expect(clippy::too_many_arguments, reason = "mirrors setattr(2)'s fields")]
    pub fn set_attr(
        &self,
        path: &str,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime_ns: Option<i64>,
        mtime_ns: Option<i64>,
    ) -> io::Result<()> {
        let abs = self.abs(path);
        if let Some(size) = size {
            OpenOptions::new().write(true).open(&abs)?.set_len(size)?;
        }
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::lchown(&abs, uid, gid)?;
        }
        if let Some(mode) = mode {
            fs::set_permissions(&abs, fs::Permissions::from_mode(mode & 0o7777))?;
        }
        if atime_ns.is_some() || mtime_ns.is_some() {
            set_times(&abs, atime_ns, mtime_ns)?;
        }
        Ok(())
    }

    /// Metadata of `rel` for self-heal.
    pub fn meta(&self, rel: &str) -> io::Result<Meta> {
        let abs = self.abs(rel);
        let stat = fs::symlink_metadata(&abs)?;
        let mut xattrs = Vec::new();
        if !stat.file_type().is_symlink() {
            for name in list_xattrs(&abs)? {
                match get_xattr(&abs, &name) {
                    Ok(value) => xattrs.push((name, serde_bytes::ByteBuf::from(value))),
                    Err(error) if error.raw_os_error() == Some(libc::ENODATA) => {}
                    Err(error) => return Err(error),
                }
            }
        }
        Ok(Meta {
            mode: stat.mode() & 0o7777,
            uid: stat.uid(),
            gid: stat.gid(),
            atime_ns: stat.atime() * 1_000_000_000 + stat.atime_nsec(),
            mtime_ns: stat.mtime() * 1_000_000_000 + stat.mtime_nsec(),
            xattrs,
        })
    }

    /// The entries of `rel` for self-heal: one for a directory, symlink
    /// or absent path, one per chunk of at most `chunk` bytes for a file.
    /// `visit` gets each in order and returns false to stop early.
    pub fn capture(
        &self,
        rel: &str,
        chunk: usize,
        visit: &mut dyn FnMut(Entry) -> bool,
    ) -> io::Result<()> {
        let abs = self.abs(rel);
        let stat = match fs::symlink_metadata(&abs) {
            Ok(stat) => stat,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                visit(Entry::Absent);
                return Ok(());
            }
            Err(error) => return Err(error),
        };
        let meta = self.meta(rel)?;
        let kind = stat.file_type();
        if kind.is_dir() {
            let children = self.children(rel)?;
            visit(Entry::Dir { meta, children });
        } else if kind.is_symlink() {
            let target = fs::read_link(&abs)?;
            let target = target.to_str().ok_or_else(non_utf8)?.to_owned();
            visit(Entry::Symlink { meta, target });
        } else if kind.is_file() {
            let mut file = File::open(&abs)?;
            let mut offset = 0u64;
            loop {
                let mut data = Vec::with_capacity(chunk.min(stat.len() as usize + 1));
                (&mut file).take(chunk as u64).read_to_end(&mut data)?;
                let last = data.len() < chunk;
                let read = data.len() as u64;
                if !visit(Entry::File {
                    meta: meta.clone(),
                    offset,
                    data,
                    last,
                }) || last
                {
                    break;
                }
                offset += read;
            }
        } else {
            // Devices, fifos and sockets are never created through the
            // mount; a brick edited behind our back may hold one.
            visit(Entry::Absent);
        }
        Ok(())
    }

    /// A digest of what a heal of `rel` would install (every chunk, with
    /// the access time left out: reads move it). Two replicas with the
    /// same digest hold the same entry.
    pub fn digest(&self, rel: &str) -> io::Result<[u8; 32]> {
        let mut hasher = Sha256::new();
        let mut encoded = Ok(());
        self.capture(rel, CAPTURE_CHUNK, &mut |mut entry| {
            if let Entry::Dir { meta, .. }
            | Entry::File { meta, .. }
            | Entry::Symlink { meta, .. } = &mut entry
            {
                meta.atime_ns = 0;
            }
            match postcard::to_allocvec(&entry) {
                Ok(bytes) => {
                    hasher.update(&bytes);
                    true
                }
                Err(error) => {
                    encoded = Err(io::Error::other(error));
                    false
                }
            }
        })?;
        encoded?;
        Ok(hasher.finalize().into())
    }

    /// Names in directory `rel` (the state dir excluded), sorted.
    pub fn children(&self, rel: &str) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(self.abs(rel))? {
            let name = entry?.file_name();
            let Some(name) = name.to_str() else { continue };
            if rel.is_empty() && name == STATE_DIR {
                continue;
            }
            names.push(name.to_owned());
        }
        names.sort();
        Ok(names)
    }

    /// Installs one heal entry at `rel`; `tmp` is where file chunks gather
    /// until the last one (one per sending peer, since each peer's heal
    /// requests are applied in order).
    pub fn install(&self, rel: &str, entry: &Entry, tmp: &Path) -> io::Result<()> {
        let abs = self.abs(rel);
        match entry {
            Entry::Absent => remove_any(&abs),
            Entry::Dir { meta, children } => {
                match fs::symlink_metadata(&abs) {
                    Ok(stat) if stat.is_dir() => {}
                    Ok(_) => {
                        remove_any(&abs)?;
                        fs::create_dir_all(&abs)?;
                    }
                    Err(_) => fs::create_dir_all(&abs)?,
                }
                for name in self.children(rel)? {
                    if children.binary_search(&name).is_err() {
                        remove_any(&abs.join(&name))?;
                    }
                }
                apply_meta(&abs, meta, false)
            }
            Entry::Symlink { meta, target } => {
                remove_any(&abs)?;
                if let Some(parent) = abs.parent() {
                    fs::create_dir_all(parent)?;
                }
                std::os::unix::fs::symlink(target, &abs)?;
                apply_meta(&abs, meta, true)
            }
            Entry::File {
                meta,
                offset,
                data,
                last,
            } => {
                let mut file = if *offset == 0 {
                    File::create(tmp)?
                } else {
                    OpenOptions::new().write(true).open(tmp)?
                };
                file.seek(SeekFrom::Start(*offset))?;
                file.write_all(data)?;
                if *last {
                    // Not synced here: the healer ends each batch with
                    // `HealSync` (one syncfs) before it counts it healed.
                    drop(file);
                    apply_meta(tmp, meta, false)?;
                    if fs::symlink_metadata(&abs).is_ok_and(|stat| stat.is_dir()) {
                        fs::remove_dir_all(&abs)?;
                    }
                    if let Some(parent) = abs.parent() {
                        fs::create_dir_all(parent)?;
                    }
                    fs::rename(tmp, &abs)?;
                }
                Ok(())
            }
        }
    }

    /// Makes everything written to the brick's file system durable.
    pub fn sync_fs(&self) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let root = File::open(&self.root)?;
        // SAFETY: syncfs(2) on a descriptor we own for the call.
        if unsafe { libc::syncfs(root.as_raw_fd()) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Every entry of the brick (state dir excluded), for full heal.
    pub fn manifest(&self) -> io::Result<Vec<ManifestEntry>> {
        let mut out = Vec::new();
        let mut stack = vec![String::new()];
        while let Some(dir) = stack.pop() {
            for name in self.children(&dir)? {
                let rel = join(&dir, &name);
                let abs = self.abs(&rel);
                let stat = match fs::symlink_metadata(&abs) {
                    Ok(stat) => stat,
                    Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                    Err(error) => return Err(error),
                };
                let kind = stat.file_type();
                let (kind, digest) = if kind.is_dir() {
                    stack.push(rel.clone());
                    (1, [0; 32])
                } else if kind.is_symlink() {
                    let target = fs::read_link(&abs)?;
                    (2, Sha256::digest(target.as_os_str().as_bytes()).into())
                } else if kind.is_file() {
                    let mut hasher = Sha256::new();
                    io::copy(&mut File::open(&abs)?, &mut hasher)?;
                    (0, hasher.finalize().into())
                } else {
                    continue;
                };
                out.push(ManifestEntry {
                    path: rel,
                    kind,
                    mode: stat.mode() & 0o7777,
                    mtime_ns: stat.mtime() * 1_000_000_000 + stat.mtime_nsec(),
                    digest,
                });
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }
}

/// `dir/name`, or `name` at the root.
pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

/// The parent of `rel` (`""` for top-level names).
pub fn parent(rel: &str) -> &str {
    rel.rsplit_once('/').map_or("", |(dir, _)| dir)
}

fn non_utf8() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

fn remove_any(abs: &Path) -> io::Result<()> {
    let result = match fs::symlink_metadata(abs) {
        Ok(stat) if stat.is_dir() => fs::remove_dir_all(abs),
        Ok(_) => fs::remove_file(abs),
        Err(error) => Err(error),
    };
    match result {
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn apply_meta(abs: &Path, meta: &Meta, symlink: bool) -> io::Result<()> {
    std::os::unix::fs::lchown(abs, Some(meta.uid), Some(meta.gid))?;
    if !symlink {
        fs::set_permissions(abs, fs::Permissions::from_mode(meta.mode))?;
        let wanted: Vec<&str> = meta.xattrs.iter().map(|(name, _)| name.as_str()).collect();
        for name in list_xattrs(abs)? {
            if !wanted.contains(&name.as_str()) {
                remove_xattr(abs, &name)?;
            }
        }
        for (name, value) in &meta.xattrs {
            set_xattr(abs, name, value, 0)?;
        }
    }
    set_times(abs, Some(meta.atime_ns), Some(meta.mtime_ns))
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| non_utf8())
}

fn c_name(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| non_utf8())
}

// time_t and c_long are i32 on 32-bit ARM (armhf), i64 elsewhere; times
// past 2038 saturate there rather than wrap.
#[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
fn timespec(ns: Option<i64>) -> libc::timespec {
    match ns {
        Some(ns) => libc::timespec {
            tv_sec: libc::time_t::try_from(ns.div_euclid(1_000_000_000))
                .unwrap_or(libc::time_t::MAX),
            tv_nsec: ns.rem_euclid(1_000_000_000) as libc::c_long,
        },
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    }
}

/// From this size on, a write starts its own writeback at once.
const WRITEBACK_FROM: usize = 256 * 1024;

/// Starts writing a large write's pages to disk without waiting for it
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): a stream of large writes
/// is then mostly on disk when its `fsync` comes, instead of leaving the
/// whole file (on every replica's disk at once) to the `fsync`. Small
/// writes stay in the page cache, where rewrites of a page coalesce.
/// Only a hint: errors show at `fsync`.
pub fn start_writeback(file: &File, offset: u64, len: usize) {
    use std::os::fd::AsRawFd;
    if len < WRITEBACK_FROM {
        return;
    }
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range(2) on a descriptor alive for the call.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// How much of a file [`prefetch`] asks the disk for (the kernel's FUSE
/// readahead asks for this much at most in its first READ).
const PREFETCH_BYTES: i64 = 128 * 1024;

/// Starts reading the head of a file just opened for reading into the page
/// cache (`posix_fadvise(WILLNEED)`, which does not wait for the disk):
/// the kernel's first READ follows the open's answer a FUSE round trip
/// later, and finds the data on its way or there. Only a hint.
pub fn prefetch(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise(2) on a descriptor alive for the call.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            0,
            PREFETCH_BYTES,
            libc::POSIX_FADV_WILLNEED,
        );
    }
}

/// utimensat(2) without following a final symlink.
pub fn set_times(abs: &Path, atime_ns: Option<i64>, mtime_ns: Option<i64>) -> io::Result<()> {
    let path = c_path(abs)?;
    let times = [timespec(atime_ns), timespec(mtime_ns)];
    // SAFETY: `path` is a NUL-terminated string and `times` two timespecs,
    // both alive for the call.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            path.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// futimens(2): [`set_times`] through an open file (no path walk, and the
/// file written is the one whose time is set, whatever its name is now).
pub fn set_file_times(file: &File, atime_ns: Option<i64>, mtime_ns: Option<i64>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let times = [timespec(atime_ns), timespec(mtime_ns)];
    // SAFETY: a descriptor and two timespecs, alive for the call.
    if unsafe { libc::futimens(file.as_raw_fd(), times.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Gives a file just created (or truncated) `mode`, `uid` and `gid`,
/// changing only what differs (each change is a journaled inode update;
/// a file created by root with the usual umask needs none).
pub fn own_new_file(file: &File, mode: u32, uid: u32, gid: u32) -> io::Result<()> {
    let meta = file.metadata()?;
    if meta.mode() & 0o7777 != mode & 0o7777 {
        file.set_permissions(fs::Permissions::from_mode(mode & 0o7777))?;
    }
    if meta.uid() != uid || meta.gid() != gid {
        std::os::unix::fs::fchown(file, Some(uid), Some(gid))?;
    }
    Ok(())
}

pub fn set_xattr(abs: &Path, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
    let (path, name) = (c_path(abs)?, c_name(name)?);
    // SAFETY: NUL-terminated strings and a slice, alive for the call.
    let rc = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub fn remove_xattr(abs: &Path, name: &str) -> io::Result<()> {
    let (path, name) = (c_path(abs)?, c_name(name)?);
    // SAFETY: NUL-terminated strings alive for the call.
    let rc = unsafe { libc::lremovexattr(path.as_ptr(), name.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub fn get_xattr(abs: &Path, name: &str) -> io::Result<Vec<u8>> {
    let (path, name) = (c_path(abs)?, c_name(name)?);
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: NUL-terminated strings and a buffer of buf.len() bytes.
        let rc = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if rc >= 0 {
            buf.truncate(rc as usize);
            return Ok(buf);
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::ERANGE) && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return Err(error);
    }
}

pub fn list_xattrs(abs: &Path) -> io::Result<Vec<String>> {
    let path = c_path(abs)?;
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: a NUL-terminated string and a buffer of buf.len() bytes.
        let rc = unsafe { libc::llistxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if rc >= 0 {
            buf.truncate(rc as usize);
            return Ok(buf
                .split(|b| *b == 0)
                .filter(|name| !name.is_empty())
                .filter_map(|name| std::str::from_utf8(name).ok().map(str::to_owned))
                .collect());
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::ERANGE) && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return Err(error);
    }
}

/// The raw list for listxattr(2) replies: names, each NUL-terminated.
pub fn list_xattrs_raw(abs: &Path) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    for name in list_xattrs(abs)? {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_and_parent_handle_the_root() {
        assert_eq!(join("", "a"), "a");
        assert_eq!(join("a", "b"), "a/b");
        assert_eq!(parent("a/b/c"), "a/b");
        assert_eq!(parent("a"), "");
    }
}
