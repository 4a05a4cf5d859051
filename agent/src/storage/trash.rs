//! Unlinks whose blocks are freed later.
//!
//! Freeing a file's blocks is the slow part of an unlink: on a file system
//! mounted with `discard` (SSDs, SD cards, and this project's test disk)
//! without a journal, ext4 sends the discard to the device inside the
//! `unlink` call and waits for it (a 4 KB file: 6 µs to unlink when empty,
//! 93 µs with its block, up to milliseconds on a busy disk). A replicated
//! unlink waits for that on this brick and on every peer. So a regular
//! file with one link and blocks is moved into `.farol/trash` instead (a
//! rename: the name is gone from its directory, which is what the unlink
//! and a following `fsyncdir` promise), and a thread of its own unlinks
//! it from there right after. Space comes back a moment later, as with
//! file systems that free in the background. Anything else (other links
//! to the inode, no blocks, a directory, a rename that fails) is unlinked
//! in place. Leftovers of a crash are removed when the brick opens.

use std::{
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Mutex,
    },
};

/// The trash directory's name in the brick's state dir.
pub const TRASH_DIR: &str = "trash";

/// How long the purging thread gathers parked files before freeing them.
const PURGE_PAUSE: std::time::Duration = std::time::Duration::from_millis(20);

/// One brick's trash.
#[derive(Debug)]
pub struct Trash {
    dir: PathBuf,
    next: AtomicU64,
    /// Where the purging thread takes names from (started at first use;
    /// it ends when the brick is dropped).
    purger: Mutex<Option<mpsc::Sender<PathBuf>>>,
}

impl Trash {
    /// The trash in `state_dir`, created if needed; what a crash left
    /// there is purged in the background.
    pub fn open(state_dir: &Path) -> io::Result<Trash> {
        let dir = state_dir.join(TRASH_DIR);
        fs::create_dir_all(&dir)?;
        let trash = Trash {
            dir,
            next: AtomicU64::new(0),
            purger: Mutex::new(None),
        };
        for entry in fs::read_dir(&trash.dir)? {
            trash.purge_later(entry?.path());
        }
        Ok(trash)
    }

    /// Unlinks `abs`: moved into the trash and purged later when that
    /// saves the unlink its block freeing, else removed in place.
    pub fn unlink(&self, abs: &Path) -> io::Result<()> {
        let meta = fs::symlink_metadata(abs)?;
        if !meta.is_file() || meta.nlink() != 1 || meta.blocks() == 0 {
            return fs::remove_file(abs);
        }
        let parked = self.dir.join(format!(
            "{}-{}",
            meta.ino(),
            self.next.fetch_add(1, Ordering::Relaxed)
        ));
        match fs::rename(abs, &parked) {
            Ok(()) => {
                self.purge_later(parked);
                Ok(())
            }
            // Another file system below the brick, a trash gone: in place.
            Err(_) => fs::remove_file(abs),
        }
    }

    fn purge_later(&self, parked: PathBuf) {
        let mut purger = self.purger.lock().unwrap_or_else(|p| p.into_inner());
        let parked = match purger.as_ref() {
            Some(tx) => match tx.send(parked) {
                Ok(()) => return,
                // The thread is gone: a new one takes over.
                Err(mpsc::SendError(parked)) => parked,
            },
            None => parked,
        };
        let (tx, rx) = mpsc::channel::<PathBuf>();
        let spawned = std::thread::Builder::new()
            .name("farol-trash".into())
            .spawn(move || {
                // Woken by the first file of a batch only: it waits a
                // moment for more, so a stream of unlinks wakes this
                // thread (and makes the disk free blocks) once per
                // PURGE_PAUSE, not once per file on every replica while
                // the next unlinks are on their way.
                while let Ok(first) = rx.recv() {
                    std::thread::sleep(PURGE_PAUSE);
                    for parked in std::iter::once(first).chain(rx.try_iter()) {
                        if let Err(error) = fs::remove_file(&parked) {
                            tracing::warn!(path = %parked.display(), %error, "cannot purge an unlinked file");
                        }
                    }
                }
            });
        match spawned {
            Ok(_) => {
                let _ = tx.send(parked);
                *purger = Some(tx);
            }
            Err(_) => {
                let _ = fs::remove_file(&parked);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        os::unix::fs::MetadataExt,
        time::{Duration, Instant},
    };

    fn scratch(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("farol-trash-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn trash_is_empty_soon(trash: &Path) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if fs::read_dir(trash).unwrap().next().is_none() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn a_file_with_blocks_leaves_its_directory_at_once_and_the_trash_soon() {
        let dir = scratch("blocks");
        let trash = Trash::open(&dir.join("state")).unwrap();
        let file = dir.join("f");
        fs::write(&file, vec![7u8; 4096]).unwrap();
        let held = fs::File::open(&file).unwrap();
        trash.unlink(&file).unwrap();
        assert!(fs::symlink_metadata(&file).is_err(), "the name is gone");
        assert!(trash_is_empty_soon(&dir.join("state").join(TRASH_DIR)));
        // An open file stays readable, as after unlink(2).
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut &held, &mut data).unwrap();
        assert_eq!(data.len(), 4096);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hard_links_and_empty_files_are_unlinked_in_place() {
        let dir = scratch("links");
        let trash = Trash::open(&dir.join("state")).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        fs::write(&a, vec![1u8; 4096]).unwrap();
        fs::hard_link(&a, &b).unwrap();
        trash.unlink(&a).unwrap();
        // The other name's link count is right at once.
        assert_eq!(fs::metadata(&b).unwrap().nlink(), 1);
        let empty = dir.join("empty");
        fs::write(&empty, b"").unwrap();
        trash.unlink(&empty).unwrap();
        assert!(fs::symlink_metadata(&empty).is_err());
        assert_eq!(
            fs::read_dir(dir.join("state").join(TRASH_DIR))
                .unwrap()
                .count(),
            0,
            "nothing was parked"
        );
        // A missing name is an error, as unlink(2)'s.
        let missing = trash.unlink(&dir.join("missing")).unwrap_err();
        assert_eq!(missing.raw_os_error(), Some(libc::ENOENT));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn leftovers_of_a_crash_are_purged_at_open() {
        let dir = scratch("leftovers");
        let parked = dir.join("state").join(TRASH_DIR);
        fs::create_dir_all(&parked).unwrap();
        fs::write(parked.join("12-0"), b"left").unwrap();
        let _trash = Trash::open(&dir.join("state")).unwrap();
        assert!(trash_is_empty_soon(&parked));
        fs::remove_dir_all(&dir).unwrap();
    }
}
