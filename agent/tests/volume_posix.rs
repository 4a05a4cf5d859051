//! POSIX operations through a real FUSE mount of a three-replica volume
//! (three `agent volume serve` processes on loopback): every operation a
//! web root and ordinary tools need, with the right errnos, reaching every
//! brick, and readdir offsets that survive concurrent changes.

mod support;
mod volume_cluster;

use std::{
    collections::HashSet,
    ffi::CString,
    fs,
    io::{Read, Seek, SeekFrom, Write},
    os::unix::{ffi::OsStrExt, fs::PermissionsExt},
    path::Path,
    process::Command,
};

use volume_cluster::{assert_bricks_identical, mode, Cluster};

fn errno_of(result: std::io::Result<impl Sized>) -> i32 {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(error) => error.raw_os_error().expect("an OS error"),
    }
}

fn c(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> i32 {
    let name = CString::new(name).unwrap();
    // SAFETY: NUL-terminated strings and a slice alive for the call.
    unsafe {
        libc::setxattr(
            c(path).as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    }
}

fn get_xattr(path: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let name = CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: NUL-terminated strings and a buffer of buf.len() bytes.
    let rc = unsafe {
        libc::getxattr(
            c(path).as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap());
    }
    buf.truncate(rc as usize);
    Ok(buf)
}

fn list_xattrs(path: &Path) -> Vec<String> {
    let mut buf = vec![0u8; 1024];
    // SAFETY: a NUL-terminated string and a buffer of buf.len() bytes.
    let rc = unsafe { libc::listxattr(c(path).as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(rc >= 0, "listxattr: {}", std::io::Error::last_os_error());
    buf.truncate(rc as usize);
    buf.split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect()
}

/// Every operation the issue lists, on node 1's mount; checked on node 2's
/// mount and on every brick.
#[test]
fn posix_operations_work_through_the_mount_and_reach_every_brick() {
    if !support::fuse_privileged("posix_operations_work_through_the_mount_and_reach_every_brick") {
        return;
    }
    let mut cluster = Cluster::new("posix", 3, "");
    cluster.start_all();
    let m = cluster.mount(0);
    let other = cluster.mount(1);

    // create / write / read, visible through another node's mount
    fs::write(m.join("index.html"), b"<h1>hello</h1>\n").unwrap();
    assert_eq!(
        fs::read(other.join("index.html")).unwrap(),
        b"<h1>hello</h1>\n"
    );
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.join("index.html"))
        .unwrap();
    file.seek(SeekFrom::Start(4)).unwrap();
    file.write_all(b"HELLO").unwrap();
    file.sync_all().unwrap();
    drop(file);
    assert_eq!(
        fs::read_to_string(other.join("index.html")).unwrap(),
        "<h1>HELLO</h1>\n"
    );
    // append
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(m.join("index.html"))
        .unwrap();
    file.write_all(b"tail\n").unwrap();
    drop(file);
    assert_eq!(
        fs::read_to_string(other.join("index.html")).unwrap(),
        "<h1>HELLO</h1>\ntail\n"
    );

    // rename over an existing file
    fs::write(m.join("new.html"), b"new version").unwrap();
    fs::rename(m.join("new.html"), m.join("index.html")).unwrap();
    assert_eq!(fs::read(other.join("index.html")).unwrap(), b"new version");
    assert_eq!(errno_of(fs::metadata(other.join("new.html"))), libc::ENOENT);

    // mkdir / readdir / rmdir with errnos
    fs::create_dir(m.join("css")).unwrap();
    assert_eq!(errno_of(fs::create_dir(m.join("css"))), libc::EEXIST);
    fs::write(m.join("css/site.css"), b"body{}").unwrap();
    assert_eq!(errno_of(fs::remove_dir(m.join("css"))), libc::ENOTEMPTY);
    assert_eq!(
        errno_of(fs::remove_dir(m.join("index.html"))),
        libc::ENOTDIR
    );
    let mut names: Vec<String> = fs::read_dir(other.join("css"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["site.css"]);
    fs::create_dir(m.join("empty")).unwrap();
    fs::remove_dir(m.join("empty")).unwrap();
    assert!(!other.join("empty").exists());

    // rename a directory, then read through the new name
    fs::rename(m.join("css"), m.join("styles")).unwrap();
    assert_eq!(fs::read(other.join("styles/site.css")).unwrap(), b"body{}");

    // unlink
    fs::write(m.join("gone"), b"x").unwrap();
    fs::remove_file(m.join("gone")).unwrap();
    assert_eq!(errno_of(fs::metadata(other.join("gone"))), libc::ENOENT);
    assert_eq!(errno_of(fs::remove_file(m.join("gone"))), libc::ENOENT);
    assert_eq!(errno_of(fs::File::open(m.join("missing"))), libc::ENOENT);

    // symlink / readlink
    std::os::unix::fs::symlink("styles/site.css", m.join("link")).unwrap();
    assert_eq!(
        fs::read_link(other.join("link")).unwrap(),
        Path::new("styles/site.css")
    );
    assert_eq!(fs::read(other.join("link")).unwrap(), b"body{}");

    // hard link
    fs::hard_link(m.join("index.html"), m.join("hard.html")).unwrap();
    assert_eq!(fs::read(other.join("hard.html")).unwrap(), b"new version");

    // truncate (grow and shrink)
    let file = fs::OpenOptions::new()
        .write(true)
        .open(m.join("hard.html"))
        .unwrap();
    file.set_len(3).unwrap();
    drop(file);
    assert_eq!(fs::read(other.join("hard.html")).unwrap(), b"new");
    Command::new("truncate")
        .args(["-s", "10"])
        .arg(m.join("hard.html"))
        .status()
        .unwrap();
    assert_eq!(fs::metadata(other.join("hard.html")).unwrap().len(), 10);

    // chmod, and the kernel enforces it for other users (default_permissions)
    fs::set_permissions(m.join("index.html"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(mode(&other.join("index.html")), 0o640);

    // utimes
    let status = Command::new("touch")
        .args(["-d", "2001-02-03 04:05:06"])
        .arg(m.join("index.html"))
        .status()
        .unwrap();
    assert!(status.success());
    let mtime = fs::metadata(other.join("index.html"))
        .unwrap()
        .modified()
        .unwrap();
    let secs = mtime
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!((981_000_000..981_300_000).contains(&secs), "mtime {secs}");

    // extended attributes
    assert_eq!(set_xattr(&m.join("index.html"), "user.origin", b"farol"), 0);
    assert_eq!(
        get_xattr(&other.join("index.html"), "user.origin").unwrap(),
        b"farol"
    );
    assert!(list_xattrs(&other.join("index.html")).contains(&"user.origin".to_owned()));
    assert_eq!(
        get_xattr(&m.join("index.html"), "user.none"),
        Err(libc::ENODATA)
    );
    let name = CString::new("user.origin").unwrap();
    // SAFETY: NUL-terminated strings alive for the call.
    assert_eq!(
        unsafe { libc::removexattr(c(&m.join("index.html")).as_ptr(), name.as_ptr()) },
        0
    );
    assert_eq!(
        get_xattr(&other.join("index.html"), "user.origin"),
        Err(libc::ENODATA)
    );

    // statfs
    // SAFETY: statvfs is plain data; zeroed is valid before the call fills it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid statvfs.
    assert_eq!(unsafe { libc::statvfs(c(&m).as_ptr(), &mut st) }, 0);
    assert!(st.f_blocks > 0 && st.f_bsize > 0 && st.f_namemax >= 255);

    // the agent's state directory is invisible and cannot be created
    assert_eq!(errno_of(fs::metadata(m.join(".farol"))), libc::ENOENT);
    assert_eq!(errno_of(fs::create_dir(m.join(".farol"))), libc::EPERM);

    // ordinary tools: cp -r, cat, ls -l
    let out = Command::new("cp")
        .args(["-L", "/etc/os-release"])
        .arg(m.join("os-release"))
        .status()
        .unwrap();
    assert!(out.success());
    let mut text = String::new();
    fs::File::open(other.join("os-release"))
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, fs::read_to_string("/etc/os-release").unwrap());
    let ls = Command::new("ls").arg("-la").arg(&other).output().unwrap();
    assert!(String::from_utf8_lossy(&ls.stdout).contains("index.html"));

    for node in 1..3 {
        assert_bricks_identical(&cluster.brick(0), &cluster.brick(node));
    }
    for node in 0..3 {
        cluster.stop(node);
    }
}

/// A directory listed while files are created and removed: every file
/// present throughout shows exactly once, nothing twice.
#[test]
fn readdir_offsets_survive_concurrent_changes() {
    if !support::fuse_privileged("readdir_offsets_survive_concurrent_changes") {
        return;
    }
    let mut cluster = Cluster::new("readdir", 3, "");
    cluster.start_all();
    let dir = cluster.mount(0).join("many");
    fs::create_dir(&dir).unwrap();
    for i in 0..300 {
        fs::write(dir.join(format!("keep-{i:03}")), b"k").unwrap();
    }
    for i in 0..50 {
        fs::write(dir.join(format!("drop-{i:03}")), b"d").unwrap();
    }
    let other = cluster.mount(1).join("many");
    let mut seen = HashSet::new();
    let mut iter = fs::read_dir(&dir).unwrap();
    let mut count = 0;
    for entry in iter.by_ref() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(seen.insert(name.clone()), "{name} listed twice");
        count += 1;
        if count == 20 {
            // Change the directory in the middle of the listing, through
            // this mount and another node's.
            for i in 0..50 {
                fs::remove_file(dir.join(format!("drop-{i:03}"))).unwrap();
                fs::write(other.join(format!("new-{i:03}")), b"n").unwrap();
            }
        }
    }
    for i in 0..300 {
        assert!(
            seen.contains(&format!("keep-{i:03}")),
            "keep-{i:03} missing from the listing"
        );
    }
    for node in 0..3 {
        cluster.stop(node);
    }
}

/// An unlink moves a file with blocks into each brick's `.farol/trash`,
/// which is purged right after: the name is gone everywhere once unlink
/// returns, a descriptor held open on another node's mount still reads
/// the data (as after unlink(2)), the space comes back (the trash
/// empties), a hard link's other name has the right link count at once,
/// and a directory sync after unlinks succeeds on every replica.
#[test]
fn unlinked_files_leave_every_brick_and_their_trash() {
    if !support::fuse_privileged("unlinked_files_leave_every_brick_and_their_trash") {
        return;
    }
    let mut cluster = Cluster::new("trash", 3, "");
    cluster.start_all();
    let m = cluster.mount(0);
    let data = vec![0x5au8; 64 << 10];
    fs::create_dir(m.join("d")).unwrap();
    volume_cluster::write_synced(&m.join("d/big"), &data).unwrap();
    let mut held = fs::File::open(cluster.mount(1).join("d/big")).unwrap();
    fs::write(m.join("d/a"), b"linked").unwrap();
    fs::hard_link(m.join("d/a"), m.join("d/b")).unwrap();

    let dir = fs::File::open(m.join("d")).unwrap();
    for name in ["big", "a"] {
        fs::remove_file(m.join("d").join(name)).unwrap();
        dir.sync_all().unwrap();
    }
    for node in 0..3 {
        let brick = cluster.brick(node);
        for name in ["big", "a"] {
            assert!(
                fs::symlink_metadata(brick.join("d").join(name)).is_err(),
                "d/{name} still on brick {node}"
            );
        }
        let b = fs::metadata(brick.join("d/b")).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::nlink(&b), 1, "brick {node}");
        assert!(!cluster.mount(node).join("d/big").exists());
    }
    let mut read = Vec::new();
    held.read_to_end(&mut read).unwrap();
    assert_eq!(read, data, "an open file outlives its unlink");
    for node in 0..3 {
        let trash = cluster.brick(node).join(".farol/trash");
        volume_cluster::wait_until(
            &format!("brick {node}'s trash to be purged"),
            std::time::Duration::from_secs(20),
            || fs::read_dir(&trash).is_ok_and(|mut entries| entries.next().is_none()),
        );
    }
    assert_bricks_identical(&cluster.brick(0), &cluster.brick(2));
    for node in 0..3 {
        cluster.stop(node);
    }
}
