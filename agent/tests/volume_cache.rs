//! The kernel caches attributes, names, absent names and pages of a volume
//! (`attr_timeout`, `entry_timeout`, `negative_timeout`, kept pages), and a
//! change made through another node's mount is still read fresh at once:
//! the peer's change invalidates what this node's kernel holds before the
//! writer is answered. The timeouts here are long (30 s), so a missed
//! invalidation shows as a stale read, not as a slow one; the test first
//! shows that the kernel does cache (a change made on a brick behind the
//! agent's back is not seen through the mount).

mod support;
mod volume_cluster;

use std::{
    fs,
    io::{Read, Seek, SeekFrom, Write},
    os::unix::fs::{FileExt, PermissionsExt},
    path::Path,
};

use volume_cluster::{assert_bricks_identical, mode, Cluster};

const LONG_CACHE: &str =
    "attr_timeout = \"30s\"\nentry_timeout = \"30s\"\nnegative_timeout = \"30s\"\n";

fn not_found(path: &Path) -> bool {
    matches!(fs::symlink_metadata(path), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn changes_on_one_mount_are_read_fresh_on_another_with_caching_on() {
    if !support::fuse_privileged("changes_on_one_mount_are_read_fresh_on_another_with_caching_on") {
        return;
    }
    let mut cluster = Cluster::new("cache", 3, LONG_CACHE);
    cluster.start_all();
    let (a, b) = (cluster.mount(0), cluster.mount(1));
    let brick_b = cluster.brick(1);

    // The kernel caches: node B's mount keeps what it looked up, even when
    // B's brick is changed behind the agent's back (no invalidation then).
    fs::write(a.join("page.html"), b"one").unwrap();
    fs::set_permissions(a.join("page.html"), fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(fs::read(b.join("page.html")).unwrap(), b"one");
    assert_eq!(mode(&b.join("page.html")), 0o644);
    fs::set_permissions(brick_b.join("page.html"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        mode(&b.join("page.html")),
        0o644,
        "attributes are cached (attr_timeout)"
    );
    assert!(not_found(&b.join("absent.txt")));
    fs::write(brick_b.join("absent.txt"), b"behind the agent's back").unwrap();
    assert!(
        not_found(&b.join("absent.txt")),
        "an absent name is cached (negative_timeout)"
    );
    // Put B's brick back as the others hold it.
    fs::remove_file(brick_b.join("absent.txt")).unwrap();
    fs::set_permissions(brick_b.join("page.html"), fs::Permissions::from_mode(0o644)).unwrap();

    // An overwrite on A: new content and size on B at once.
    fs::write(a.join("page.html"), b"second, longer version").unwrap();
    assert_eq!(
        fs::read(b.join("page.html")).unwrap(),
        b"second, longer version"
    );
    assert_eq!(fs::metadata(b.join("page.html")).unwrap().len(), 22);

    // A file held open on B sees A's later writes (its pages and size are
    // invalidated, not only the next open's).
    let mut held = fs::File::open(b.join("page.html")).unwrap();
    let mut text = String::new();
    held.read_to_string(&mut text).unwrap();
    assert_eq!(text, "second, longer version");
    let mut append = fs::OpenOptions::new()
        .append(true)
        .open(a.join("page.html"))
        .unwrap();
    append.write_all(b" + tail").unwrap();
    drop(append);
    assert_eq!(held.metadata().unwrap().len(), 29);
    let mut buf = vec![0u8; 64];
    let n = held.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..n], b"second, longer version + tail");
    held.seek(SeekFrom::Start(0)).unwrap();
    drop(held);

    // chmod on A: B's cached attributes are dropped.
    fs::set_permissions(a.join("page.html"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(mode(&b.join("page.html")), 0o640);

    // A name B looked up as absent (cached negative) is created on A.
    assert!(not_found(&b.join("new.txt")));
    fs::write(a.join("new.txt"), b"created on A").unwrap();
    assert_eq!(fs::read(b.join("new.txt")).unwrap(), b"created on A");

    // Rename on A: the old name is gone on B, the new one is there.
    fs::rename(a.join("new.txt"), a.join("renamed.txt")).unwrap();
    assert!(not_found(&b.join("new.txt")));
    assert_eq!(fs::read(b.join("renamed.txt")).unwrap(), b"created on A");

    // Atomic replace on A (write a temporary file, rename it over): B,
    // which holds the old name, reads the new file.
    fs::write(a.join(".renamed.tmp"), b"replaced atomically").unwrap();
    fs::rename(a.join(".renamed.tmp"), a.join("renamed.txt")).unwrap();
    assert_eq!(
        fs::read(b.join("renamed.txt")).unwrap(),
        b"replaced atomically"
    );

    // Unlink on A: gone on B, for stat, open and listing.
    fs::remove_file(a.join("renamed.txt")).unwrap();
    assert!(not_found(&b.join("renamed.txt")));
    assert!(fs::File::open(b.join("renamed.txt")).is_err());
    assert_eq!(names(&b), vec!["page.html".to_owned()]);

    // Directories: created, filled, renamed and removed on A.
    fs::create_dir(a.join("dir")).unwrap();
    assert!(fs::metadata(b.join("dir")).unwrap().is_dir());
    assert!(not_found(&b.join("dir/inner.txt")));
    fs::write(a.join("dir/inner.txt"), b"inner").unwrap();
    assert_eq!(fs::read(b.join("dir/inner.txt")).unwrap(), b"inner");
    fs::rename(a.join("dir"), a.join("moved")).unwrap();
    assert!(not_found(&b.join("dir")));
    assert_eq!(fs::read(b.join("moved/inner.txt")).unwrap(), b"inner");
    fs::remove_file(a.join("moved/inner.txt")).unwrap();
    fs::remove_dir(a.join("moved")).unwrap();
    assert!(not_found(&b.join("moved")));

    // And the other way round: B's changes are fresh on A, which cached
    // everything above as well.
    fs::write(b.join("page.html"), b"from B").unwrap();
    assert_eq!(fs::read(a.join("page.html")).unwrap(), b"from B");
    assert_eq!(fs::metadata(a.join("page.html")).unwrap().len(), 6);

    for node in 1..3 {
        assert_bricks_identical(&cluster.brick(0), &cluster.brick(node));
    }
}

/// A replica that missed changes while its mount stayed up is healed;
/// what its kernel cached from before is dropped, so its mount shows the
/// healed files (and names it had seen absent).
#[test]
fn a_healed_replica_reads_the_healed_files_with_caching_on() {
    if !support::fuse_privileged("a_healed_replica_reads_the_healed_files_with_caching_on") {
        return;
    }
    // The longest timeouts allowed, so the kernel still holds what it
    // cached when the heal is done, however slow the machine.
    let mut cluster = Cluster::new(
        "cache-heal",
        3,
        "attr_timeout = \"60s\"\nentry_timeout = \"60s\"\nnegative_timeout = \"60s\"\n",
    );
    cluster.start_all();
    let (a, c) = (cluster.mount(0), cluster.mount(2));
    fs::write(a.join("doc.txt"), b"before").unwrap();
    assert_eq!(fs::read(c.join("doc.txt")).unwrap(), b"before");
    assert!(not_found(&c.join("later.txt")));

    // C freezes (its mount stays, with what its kernel cached); A and B
    // go on without it (C is recorded for heal), then C comes back.
    cluster.pause(2);
    fs::write(a.join("doc.txt"), b"after, longer").unwrap();
    fs::write(a.join("later.txt"), b"later").unwrap();
    assert!(
        !cluster.brick(2).join("later.txt").exists(),
        "C missed the changes while frozen"
    );
    cluster.resume(2);
    cluster.wait_connected(&[0, 1, 2]);
    cluster.wait_healed(&[0, 1, 2]);
    assert_eq!(fs::read(c.join("doc.txt")).unwrap(), b"after, longer");
    assert_eq!(fs::metadata(c.join("doc.txt")).unwrap().len(), 13);
    assert_eq!(fs::read(c.join("later.txt")).unwrap(), b"later");
    for node in 1..3 {
        assert_bricks_identical(&cluster.brick(0), &cluster.brick(node));
    }
}
