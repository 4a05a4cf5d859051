//! The FUSE file system of a volume (fuser, no libfuse): reads come from
//! the local brick (once it is current), changes go through
//! [`Volume::submit`], which applies them here and on a quorum of peers.
//!
//! Inode numbers are the brick's own (the brick root is swapped with
//! FUSE's root inode 1), so hard links share an inode. A table
//! ([`KernelCache`]) maps each inode the kernel knows to one brick path and
//! counts the kernel's lookups of it. The kernel caches attributes, names
//! and pages for the volume's timeouts; what changes behind its back is
//! invalidated (see `kernel_cache.rs`). `readdir` serves a snapshot taken
//! at `opendir` (and at a rewind), so offsets stay valid while the
//! directory changes.

use std::{
    collections::HashMap,
    ffi::OsStr,
    fs::{self, File, OpenOptions},
    io,
    os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt},
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use fuser::{
    BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use super::{
    brick::{self, Op, STATE_DIR},
    kernel_cache::{KernelCache, Stamp, Timeouts},
    replica::Volume,
    write_behind::WriteBehind,
};

/// A regular file up to this size that the kernel looks up has its data
/// read into the page cache right after the LOOKUP is answered, as
/// GlusterFS's quick-read does for files up to 64 KiB: a lookup of a small
/// file is mostly followed by an open and a read, and the disk read then
/// overlaps the OPEN's round trip instead of following it. A hint
/// (`posix_fadvise(WILLNEED)`), not waited for; lookups the kernel answers
/// from its own cache never reach the agent.
const LOOKUP_PREFETCH_MAX: u64 = 64 * 1024;

#[derive(Debug)]
enum Handle {
    File {
        file: Arc<File>,
        append: bool,
    },
    Dir {
        entries: Vec<DirEntry>,
        served: bool,
    },
}

/// One name of a directory snapshot, with its attributes (for readdirplus).
#[derive(Debug)]
struct DirEntry {
    ino: u64,
    kind: FileType,
    name: String,
    /// None for "." and "..", and where the name vanished meanwhile.
    attr: Option<FileAttr>,
}

/// A volume mounted with FUSE.
#[derive(Debug)]
pub struct VolumeFs {
    volume: Arc<Volume>,
    cache: Arc<KernelCache>,
    ttl: Timeouts,
    handles: Mutex<HashMap<u64, Handle>>,
    next_handle: AtomicU64,
    behind: WriteBehind,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each critical section leaves its map consistent.
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

fn io_errno(error: &io::Error) -> Errno {
    Errno::from_i32(error.raw_os_error().unwrap_or(libc::EIO))
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

fn time_ns(time: TimeOrNow) -> i64 {
    match time {
        TimeOrNow::Now => now_ns(),
        TimeOrNow::SpecificTime(t) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i64,
            Err(e) => -(e.duration().as_nanos() as i64),
        },
    }
}

fn system_time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsecs as u64)
    }
}

impl VolumeFs {
    pub fn new(volume: Arc<Volume>) -> io::Result<VolumeFs> {
        let cache = Arc::clone(volume.kernel_cache());
        Ok(VolumeFs {
            behind: WriteBehind::new(Arc::clone(&volume)),
            ttl: cache.timeouts(),
            cache,
            volume,
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
        })
    }

    fn fuse_ino(&self, st_ino: u64) -> u64 {
        self.cache.fuse_ino(st_ino)
    }

    fn path(&self, ino: INodeNo) -> Result<String, Errno> {
        self.cache.path(ino.0).ok_or(Errno::ESTALE)
    }

    /// Replies with a new entry, counting the kernel's lookup of it.
    fn reply_entry(&self, reply: ReplyEntry, rel: &str, attr: &FileAttr) {
        self.cache.looked_up(attr.ino.0, rel);
        reply.entry_with_ttls(&self.ttl.attr, &self.ttl.entry, attr, Generation(0));
    }

    /// The brick path of `name` in directory `parent`, refusing names the
    /// volume cannot hold (the state dir, non-UTF-8).
    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<String, Errno> {
        let dir = self.path(parent)?;
        let name = name.to_str().ok_or(Errno::EINVAL)?;
        if name.is_empty() || name == "." || name == ".." || name.contains('/') {
            return Err(Errno::EINVAL);
        }
        if dir.is_empty() && name == STATE_DIR {
            return Err(Errno::EPERM);
        }
        Ok(brick::join(&dir, name))
    }

    fn attr_of(&self, meta: &fs::Metadata) -> FileAttr {
        let kind = FileType::from_std(meta.file_type()).unwrap_or(FileType::RegularFile);
        FileAttr {
            ino: INodeNo(self.fuse_ino(meta.ino())),
            size: meta.size(),
            blocks: meta.blocks(),
            atime: system_time(meta.atime(), meta.atime_nsec()),
            mtime: system_time(meta.mtime(), meta.mtime_nsec()),
            ctime: system_time(meta.ctime(), meta.ctime_nsec()),
            crtime: UNIX_EPOCH,
            kind,
            perm: (meta.mode() & 0o7777) as u16,
            nlink: meta.nlink() as u32,
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: meta.rdev() as u32,
            blksize: meta.blksize() as u32,
            flags: 0,
        }
    }

    /// lstat of a brick path, remembering its inode.
    fn stat(&self, rel: &str) -> Result<FileAttr, Errno> {
        let meta = fs::symlink_metadata(self.volume.brick().abs(rel)).map_err(|e| io_errno(&e))?;
        let attr = self.attr_of(&meta);
        self.cache.remember(attr.ino.0, rel);
        Ok(attr)
    }

    fn readable(&self) -> Result<(), Errno> {
        if self.volume.readable() {
            Ok(())
        } else {
            Err(Errno::EAGAIN)
        }
    }

    fn submit<T>(
        &self,
        op: Op,
        local: impl FnOnce(&brick::Brick) -> io::Result<T>,
    ) -> Result<T, Errno> {
        self.volume.submit(op, local).map_err(Errno::from_i32)
    }

    /// Applies `op` (the same change here as on peers) and returns the
    /// attributes of `rel` afterwards.
    fn change(&self, op: Op, rel: &str) -> Result<FileAttr, Errno> {
        self.submit(op.clone(), |brick| brick.apply(&op))?;
        self.stat(rel)
    }

    fn new_handle(&self, handle: Handle) -> u64 {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, handle);
        fh
    }

    fn with_file<T>(
        &self,
        fh: FileHandle,
        f: impl FnOnce(&File, bool) -> Result<T, Errno>,
    ) -> Result<T, Errno> {
        let handles = lock(&self.handles);
        match handles.get(&fh.0) {
            Some(Handle::File { file, append }) => {
                let file = Arc::clone(file);
                let append = *append;
                drop(handles);
                f(&file, append)
            }
            _ => Err(Errno::EBADF),
        }
    }

    fn snapshot_dir(&self, ino: INodeNo) -> Result<Vec<DirEntry>, Errno> {
        let rel = self.path(ino)?;
        let names = self
            .volume
            .brick()
            .children(&rel)
            .map_err(|e| io_errno(&e))?;
        let dot = |name: &str| DirEntry {
            ino: ino.0,
            kind: FileType::Directory,
            name: name.to_owned(),
            attr: None,
        };
        let mut entries = vec![dot("."), dot("..")];
        for name in names {
            let child = brick::join(&rel, &name);
            let Ok(meta) = fs::symlink_metadata(self.volume.brick().abs(&child)) else {
                continue;
            };
            let attr = self.attr_of(&meta);
            entries.push(DirEntry {
                ino: attr.ino.0,
                kind: attr.kind,
                name,
                attr: Some(attr),
            });
        }
        Ok(entries)
    }

    /// A rewind (offset 0 after entries were served) takes a new
    /// snapshot; any other offset indexes the one taken at opendir.
    fn rewind_if_served(&self, ino: INodeNo, fh: FileHandle, offset: u64) -> Result<(), Errno> {
        if offset != 0 {
            return Ok(());
        }
        let served = matches!(
            lock(&self.handles).get(&fh.0),
            Some(Handle::Dir { served: true, .. })
        );
        if served {
            let fresh = self.snapshot_dir(ino)?;
            if let Some(Handle::Dir { entries, .. }) = lock(&self.handles).get_mut(&fh.0) {
                *entries = fresh;
            }
        }
        Ok(())
    }

    /// Attributes for "no inode" (negative entries, "." and "..").
    fn attr_of_nothing(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo(0),
            size: 0,
            blocks: 0,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: FileType::RegularFile,
            perm: 0,
            nlink: 0,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

impl Filesystem for VolumeFs {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> io::Result<()> {
        // One write request never exceeds a protocol chunk (the kernel's
        // default limit is 1 MiB as well).
        let _ = config.set_max_write(1 << 20);
        // Lookups and listings of one directory in parallel; readdirplus
        // when the kernel sees it pays (`ls -l`, rsync); pages dropped when
        // a refreshed mtime or size shows a change nobody invalidated (a
        // brick edited behind the agent's back).
        for wanted in [
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_AUTO_INVAL_DATA,
        ] {
            if let Err(missing) = config.add_capabilities(wanted) {
                tracing::debug!(?missing, "the kernel lacks a FUSE capability");
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let result = self
            .readable()
            .and_then(|()| self.child(parent, name))
            .map_err(|e| if e == Errno::EPERM { Errno::ENOENT } else { e })
            .and_then(|rel| Ok((self.stat(&rel)?, rel)));
        match result {
            Ok((attr, rel)) => {
                self.reply_entry(reply, &rel, &attr);
                if attr.kind == FileType::RegularFile
                    && attr.size > 0
                    && attr.size <= LOOKUP_PREFETCH_MAX
                {
                    // Answered already: the disk read starts while the
                    // kernel sends the OPEN (see LOOKUP_PREFETCH_MAX).
                    if let Ok(file) = File::open(self.volume.brick().abs(&rel)) {
                        brick::prefetch(&file);
                    }
                }
            }
            Err(e) if e == Errno::ENOENT && !self.ttl.negative.is_zero() => {
                // Inode 0: the name does not exist, for this long (a
                // peer's create invalidates it).
                let mut none = self.attr_of_nothing();
                none.ino = INodeNo(0);
                reply.entry_with_ttls(&Duration::ZERO, &self.ttl.negative, &none, Generation(0));
            }
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.cache.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        // Through an open file when there is one: it stays right after a
        // rename or unlink elsewhere.
        let open_file = fh.and_then(|fh| match lock(&self.handles).get(&fh.0) {
            Some(Handle::File { file, .. }) => Some(Arc::clone(file)),
            _ => None,
        });
        let result = self.readable().and_then(|()| match open_file {
            Some(file) => file
                .metadata()
                .map(|meta| self.attr_of(&meta))
                .map_err(|e| io_errno(&e)),
            None => self.path(ino).and_then(|rel| self.stat(&rel)),
        });
        match result {
            Ok(attr) => reply.attr(&self.ttl.attr, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let result = self.path(ino).and_then(|rel| {
            let mtime_ns = mtime.map(time_ns).or_else(|| size.map(|_| now_ns()));
            let op = Op::SetAttr {
                path: rel.clone(),
                mode: mode.map(|m| m & 0o7777),
                uid,
                gid,
                size,
                atime_ns: atime.map(time_ns),
                mtime_ns,
            };
            self.change(op, &rel)
        });
        match result {
            Ok(attr) => reply.attr(&self.ttl.attr, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let result = self
            .readable()
            .and_then(|()| self.path(ino))
            .and_then(|rel| fs::read_link(self.volume.brick().abs(&rel)).map_err(|e| io_errno(&e)));
        match result {
            Ok(target) => reply.data(target.as_os_str().as_encoded_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let _busy = self.cache.busy(&[parent.0]);
        let result = self.child(parent, name).and_then(|rel| {
            let op = Op::Mkdir {
                path: rel.clone(),
                mode: mode & !umask & 0o7777,
                uid: req.uid(),
                gid: req.gid(),
            };
            Ok((self.change(op, &rel)?, rel))
        });
        match result {
            Ok((attr, rel)) => self.reply_entry(reply, &rel, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _busy = self.cache.busy(&[parent.0]);
        let result = self.child(parent, name).and_then(|rel| {
            let op = Op::Unlink { path: rel.clone() };
            self.submit(op.clone(), |brick| brick.apply(&op))?;
            self.cache.removed(&rel);
            Ok(())
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _busy = self.cache.busy(&[parent.0]);
        let result = self.child(parent, name).and_then(|rel| {
            let op = Op::Rmdir { path: rel.clone() };
            self.submit(op.clone(), |brick| brick.apply(&op))?;
            self.cache.removed(&rel);
            Ok(())
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _busy = self.cache.busy(&[parent.0]);
        let result = self.child(parent, link_name).and_then(|rel| {
            let target = target.to_str().ok_or(Errno::EINVAL)?.to_owned();
            let op = Op::Symlink {
                path: rel.clone(),
                target,
                uid: req.uid(),
                gid: req.gid(),
            };
            Ok((self.change(op, &rel)?, rel))
        });
        match result {
            Ok((attr, rel)) => self.reply_entry(reply, &rel, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _busy = self.cache.busy(&[parent.0, newparent.0]);
        let result = (|| {
            let from = self.child(parent, name)?;
            let to = self.child(newparent, newname)?;
            let bits = flags.bits();
            if bits & !libc::RENAME_NOREPLACE != 0 {
                // RENAME_EXCHANGE and RENAME_WHITEOUT are not replicated.
                return Err(Errno::EINVAL);
            }
            let op = Op::Rename {
                from: from.clone(),
                to: to.clone(),
                noreplace: bits & libc::RENAME_NOREPLACE != 0,
            };
            self.submit(op.clone(), |brick| brick.apply(&op))?;
            self.cache.renamed(&from, &to);
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _busy = self.cache.busy(&[newparent.0]);
        let result = self.path(ino).and_then(|from| {
            let to = self.child(newparent, newname)?;
            let op = Op::Link {
                from,
                to: to.clone(),
            };
            Ok((self.change(op, &to)?, to))
        });
        match result {
            Ok((attr, to)) => self.reply_entry(reply, &to, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let result = self
            .readable()
            .and_then(|()| self.path(ino))
            .and_then(|rel| {
                let raw = flags.0;
                let access = raw & libc::O_ACCMODE;
                let file = OpenOptions::new()
                    .read(access == libc::O_RDONLY || access == libc::O_RDWR)
                    .write(access == libc::O_WRONLY || access == libc::O_RDWR)
                    .custom_flags(raw & libc::O_NOFOLLOW)
                    .open(self.volume.brick().abs(&rel))
                    .map_err(|e| io_errno(&e))?;
                let mut flags = FopenFlags::empty();
                // Pages the kernel cached stay when the file is as it was
                // at the last open (a change from elsewhere changes its
                // ctime; it also invalidates them at once).
                let unchanged = file
                    .metadata()
                    .is_ok_and(|meta| self.cache.opened(ino.0, Stamp::of(&meta)));
                if unchanged && !self.ttl.attr.is_zero() {
                    flags |= FopenFlags::FOPEN_KEEP_CACHE;
                }
                if access == libc::O_RDONLY {
                    // Nothing to flush: no write goes through this file.
                    flags |= FopenFlags::FOPEN_NOFLUSH;
                }
                if access != libc::O_WRONLY && !flags.contains(FopenFlags::FOPEN_KEEP_CACHE) {
                    // The kernel holds none of its pages: READs come next.
                    brick::prefetch(&file);
                }
                let fh = self.new_handle(Handle::File {
                    file: Arc::new(file),
                    append: raw & libc::O_APPEND != 0,
                });
                Ok((fh, flags))
            });
        match result {
            Ok((fh, flags)) => reply.opened(FileHandle(fh), flags),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _busy = self.cache.busy(&[parent.0]);
        let result = self.child(parent, name).and_then(|rel| {
            let mode = mode & !umask & 0o7777;
            let mtime_ns = now_ns();
            let op = Op::Create {
                path: rel.clone(),
                mode,
                uid: req.uid(),
                gid: req.gid(),
                mtime_ns,
            };
            let (uid, gid) = (req.uid(), req.gid());
            // Write-behind like the writes that follow it: applied here and
            // queued (in order) to the peers; its quorum is waited for, and
            // a miss reported, at the file's flush (close) or fsync, with
            // those writes', so a create + write + fsync waits for the
            // peers once.
            let (file, behind) = self
                .volume
                .submit_behind(op, |brick| {
                    let abs = brick.abs(&rel);
                    let file = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create_new(true)
                        .mode(mode)
                        .open(&abs)?;
                    brick::own_new_file(&file, mode, uid, gid)?;
                    brick::set_file_times(&file, None, Some(mtime_ns))?;
                    Ok(file)
                })
                .map_err(Errno::from_i32)?;
            let meta = file.metadata().map_err(|e| io_errno(&e));
            let attr = match meta {
                Ok(meta) => self.attr_of(&meta),
                Err(e) => {
                    let _ = self.volume.wait_behind(behind);
                    return Err(e);
                }
            };
            self.behind.queue(attr.ino.0, behind, 0);
            let fh = self.new_handle(Handle::File {
                file: Arc::new(file),
                append: flags & libc::O_APPEND != 0,
            });
            self.cache.looked_up(attr.ino.0, &rel);
            Ok((attr, fh))
        });
        match result {
            Ok((attr, fh)) => reply.created(
                &self.ttl.entry.min(self.ttl.attr),
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let result = self.readable().and_then(|()| {
            self.with_file(fh, |file, _| {
                let mut buf = vec![0u8; size as usize];
                let mut filled = 0;
                while filled < buf.len() {
                    match file.read_at(&mut buf[filled..], offset + filled as u64) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(io_errno(&e)),
                    }
                }
                buf.truncate(filled);
                Ok(buf)
            })
        });
        match result {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let result = self.path(ino).and_then(|rel| {
            self.with_file(fh, |file, append| {
                let offset = if append {
                    file.metadata().map_err(|e| io_errno(&e))?.len()
                } else {
                    offset
                };
                let mtime_ns = now_ns();
                let op = Op::Write {
                    path: rel.clone(),
                    offset,
                    data: data.to_vec(),
                    mtime_ns,
                };
                let ((), behind) = self
                    .volume
                    .submit_behind(op, |_| {
                        file.write_all_at(data, offset)?;
                        brick::start_writeback(file, offset, data.len());
                        brick::set_file_times(file, None, Some(mtime_ns))
                    })
                    .map_err(Errno::from_i32)?;
                self.behind.queue(ino.0, behind, data.len() as u64);
                Ok(())
            })
        });
        match result {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2): every write is on a quorum of replicas, or the error
        // is reported here.
        match self.behind.drain(ino.0) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(Errno::from_i32(errno)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Normally drained by flush already; writes through a mapping that
        // outlived its descriptor end here, with nobody left to tell.
        if let Err(errno) = self.behind.drain(ino.0) {
            tracing::warn!(volume = %self.volume.name(), ino = ino.0, errno, "writes of a released file missed their quorum");
        }
        lock(&self.handles).remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let result = self.path(ino).and_then(|rel| {
            self.with_file(fh, |file, _| {
                self.volume
                    .submit_sync(
                        Op::Fsync { path: rel.clone() },
                        |_| file.sync_all(),
                        || self.behind.drain(ino.0),
                    )
                    .map_err(Errno::from_i32)
            })
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.readable().and_then(|()| self.snapshot_dir(ino)) {
            Ok(entries) => {
                let fh = self.new_handle(Handle::Dir {
                    entries,
                    served: false,
                });
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if let Err(e) = self.rewind_if_served(ino, fh, offset) {
            return reply.error(e);
        }
        let mut handles = lock(&self.handles);
        let Some(Handle::Dir { entries, served }) = handles.get_mut(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        *served = true;
        for (index, entry) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(
                INodeNo(entry.ino),
                index as u64 + 1,
                entry.kind,
                &entry.name,
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        // As readdir, with each entry's attributes: `ls -l`, rsync and git
        // need no lookup per name. Every entry but "." and ".." counts as
        // a lookup in the kernel.
        let Some(dir) = self.path(ino).ok() else {
            return reply.error(Errno::ESTALE);
        };
        if let Err(e) = self.rewind_if_served(ino, fh, offset) {
            return reply.error(e);
        }
        let mut handles = lock(&self.handles);
        let Some(Handle::Dir { entries, served }) = handles.get_mut(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        *served = true;
        for (index, entry) in entries.iter().enumerate().skip(offset as usize) {
            let next = index as u64 + 1;
            let full = match &entry.attr {
                Some(attr) => {
                    let rel = brick::join(&dir, &entry.name);
                    self.cache.looked_up(attr.ino.0, &rel);
                    let full = reply.add(
                        INodeNo(entry.ino),
                        next,
                        &entry.name,
                        &self.ttl.entry.min(self.ttl.attr),
                        attr,
                        Generation(0),
                    );
                    if full {
                        // Not sent: the kernel does not hold it.
                        self.cache.forget(attr.ino.0, 1);
                    }
                    full
                }
                None => {
                    // "." and "..": the kernel takes no lookup of them
                    // (it skips them by name), and lists their inode.
                    let mut none = self.attr_of_nothing();
                    none.ino = INodeNo(entry.ino);
                    none.kind = entry.kind;
                    reply.add(
                        INodeNo(entry.ino),
                        next,
                        &entry.name,
                        &Duration::ZERO,
                        &none,
                        Generation(0),
                    )
                }
            };
            if full {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        lock(&self.handles).remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Durable on a quorum: the directory is synced here and on peers.
        let result = self.path(ino).and_then(|rel| {
            self.volume
                .submit_sync(
                    Op::Fsync { path: rel.clone() },
                    |_| self.volume.sync_dir(&rel),
                    || Ok(()),
                )
                .map_err(Errno::from_i32)
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    // The counts are u32 on 32-bit ARM (armhf) and u64 elsewhere.
    #[allow(clippy::useless_conversion)]
    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match statvfs(self.volume.brick().root()) {
            Ok(s) => reply.statfs(
                u64::from(s.f_blocks),
                u64::from(s.f_bfree),
                u64::from(s.f_bavail),
                u64::from(s.f_files),
                u64::from(s.f_ffree),
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(io_errno(&e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let result = self.path(ino).and_then(|rel| {
            let name = name.to_str().ok_or(Errno::EINVAL)?.to_owned();
            let op = Op::SetXattr {
                path: rel,
                name,
                value: value.to_vec(),
                flags,
            };
            self.submit(op.clone(), |brick| brick.apply(&op))
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let result = self
            .readable()
            .and_then(|()| self.path(ino))
            .and_then(|rel| {
                let name = name.to_str().ok_or(Errno::NO_XATTR)?;
                brick::get_xattr(&self.volume.brick().abs(&rel), name).map_err(|e| io_errno(&e))
            });
        reply_xattr(result, size, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let result = self
            .readable()
            .and_then(|()| self.path(ino))
            .and_then(|rel| {
                brick::list_xattrs_raw(&self.volume.brick().abs(&rel)).map_err(|e| io_errno(&e))
            });
        reply_xattr(result, size, reply);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = self.path(ino).and_then(|rel| {
            let name = name.to_str().ok_or(Errno::NO_XATTR)?.to_owned();
            let op = Op::RemoveXattr { path: rel, name };
            self.submit(op.clone(), |brick| brick.apply(&op))
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

fn reply_xattr(result: Result<Vec<u8>, Errno>, size: u32, reply: ReplyXattr) {
    match result {
        Ok(data) if size == 0 => reply.size(data.len() as u32),
        Ok(data) if data.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(data) => reply.data(&data),
        Err(e) => reply.error(e),
    }
}

fn statvfs(path: &Path) -> io::Result<libc::statvfs> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: statvfs is plain data; all-zero is a valid value to overwrite.
    let mut out: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `out` a valid statvfs, both alive
    // for the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut out) } == 0 {
        Ok(out)
    } else {
        Err(io::Error::last_os_error())
    }
}
