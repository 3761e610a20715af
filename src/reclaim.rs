//! Gives back the disk space of what 3scale has accepted (`tail.reclaim`): holes punched in the
//! committed prefix of a log file, so that a log in a size-limited volume (a sidecar's `emptyDir`)
//! never fills it, without renaming the file or signalling the writer.
//!
//! NGINX keeps appending (`O_APPEND`) at the file's end; the apparent size keeps growing while the
//! blocks before the committed offset are freed. The first block stays, so the fingerprint tally
//! knows the file by still matches. The watermark (the offset every service fed by the file has
//! committed) is the limit, so nothing a service may still need is freed.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use crate::identity::{FileKey, Fingerprint};
use crate::telemetry::Metrics;

/// Holes are punched once this much more is committed (fewer, larger calls).
const STEP: u64 = 1 << 20;

/// One per pipeline: every service reporter tells it where its files stand.
pub(crate) struct Reclaim {
    metrics: Arc<Metrics>,
    /// Per file: where the last hole ends, or None once it refused (logged once).
    files: Mutex<HashMap<FileKey, Option<u64>>>,
}

impl Reclaim {
    pub(crate) fn new(metrics: Arc<Metrics>) -> Reclaim {
        Reclaim {
            metrics,
            files: Mutex::new(HashMap::new()),
        }
    }

    /// Every service fed by the file `key` (last seen at `path`) has committed it up to
    /// `watermark`: free what lies before, a whole number of blocks after the first.
    pub(crate) fn committed(&self, path: &Path, key: FileKey, watermark: u64) {
        let mut files = self
            .files
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let done = files.entry(key).or_insert(Some(0));
        let Some(punched) = *done else {
            return; // refused before
        };
        if watermark < punched + STEP {
            return;
        }
        match punch(path, key, punched, watermark) {
            Ok(Some((start, end))) => {
                self.metrics.reclaimed_bytes.fetch_add(end - start, Relaxed);
                *done = Some(end);
            }
            // Another file has the name now (rotated): this one's space comes back when it is
            // deleted.
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(path = %crate::telemetry::shown_path(path), error = %e,
                    "tail.reclaim: cannot free the space of the lines 3scale accepted in this file \
                     (it needs write permission on it and a file system that can punch holes, as ext4, \
                     xfs and tmpfs can): it stays whole");
                *done = None;
            }
        }
    }

    /// Forgets a file read to its end (it is deleted or rotated away).
    pub(crate) fn forget(&self, key: FileKey) {
        if let Ok(mut files) = self.files.lock() {
            files.remove(&key);
        }
    }
}

/// Punches a hole from the end of the first block (or `from`) to the last block boundary before
/// `to`, in the file at `path` if it is still `key`; the hole, None if the path names another file
/// now.
fn punch(path: &Path, key: FileKey, from: u64, to: u64) -> std::io::Result<Option<(u64, u64)>> {
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    let meta = file.metadata()?;
    if FileKey::of(&meta) != key {
        return Ok(None);
    }
    let block = meta.blksize().max(Fingerprint::MAX);
    let start = from.max(block).next_multiple_of(block);
    let end = to / block * block;
    if end <= start {
        return Ok(Some((from, from)));
    }
    let (Ok(offset), Ok(len)) = (
        libc::off_t::try_from(start),
        libc::off_t::try_from(end - start),
    ) else {
        return Ok(Some((from, from)));
    };
    // SAFETY: fallocate on a descriptor this function owns; it reads no memory of ours.
    let done = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    };
    if done != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Some((start, end)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn allocated(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    /// Only whole blocks after the first and before the watermark are freed; the content around
    /// them and the size stay.
    #[test]
    fn the_committed_blocks_are_freed_and_the_rest_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let mut file = std::fs::File::create(&path).unwrap();
        let line =
            b"127.0.0.1 - - [27/Nov/2026:10:00:00 +0000] \"GET /?user_key=k HTTP/1.1\" 200 5\n";
        let lines = (8 << 20) / line.len();
        for _ in 0..lines {
            file.write_all(line).unwrap();
        }
        file.sync_all().unwrap();
        let size = std::fs::metadata(&path).unwrap().len();
        let key = FileKey::of(&std::fs::metadata(&path).unwrap());
        let before = allocated(&path);
        let reclaim = Reclaim::new(Arc::new(Metrics::default()));
        // Less than a step: nothing yet.
        reclaim.committed(&path, key, STEP / 2);
        assert_eq!(allocated(&path), before);
        let watermark = 6 << 20;
        reclaim.committed(&path, key, watermark + 100);
        let freed = before - allocated(&path);
        assert!(
            ((6 << 20) - 2 * 4096..=6 << 20).contains(&freed),
            "freed {freed} of {before}"
        );
        let after = std::fs::read(&path).unwrap();
        assert_eq!(after.len() as u64, size);
        let block = std::fs::metadata(&path).unwrap().blksize() as usize;
        assert_eq!(&after[..line.len()], line, "the first block stays");
        assert!(after[block..watermark as usize].iter().all(|&b| b == 0));
        let tail = &after[watermark as usize..];
        let first = tail.iter().position(|&b| b == b'\n').unwrap() + 1;
        assert!(tail[first..]
            .chunks(line.len())
            .all(|l| l == &line[..l.len()]));
        assert_eq!(
            reclaim.metrics.reclaimed_bytes.load(Relaxed),
            watermark / block as u64 * block as u64 - block as u64
        );
    }

    /// Without write permission (or on a file system that cannot punch holes) it says so once and
    /// leaves the file whole.
    #[test]
    fn a_file_that_cannot_be_punched_stays_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        std::fs::write(&path, vec![b'x'; 4 << 20]).unwrap();
        let key = FileKey::of(&std::fs::metadata(&path).unwrap());
        let reclaim = Reclaim::new(Arc::new(Metrics::default()));
        // Another file under the name: nothing happens to either.
        reclaim.committed(&path, FileKey { dev: 0, ino: 1 }, 3 << 20);
        assert_eq!(reclaim.metrics.reclaimed_bytes.load(Relaxed), 0);
        // A directory in its place stands for a file tally cannot open for writing (tests run as
        // root, whom permissions do not stop).
        let moved = dir.path().join("moved.log");
        std::fs::rename(&path, &moved).unwrap();
        std::fs::create_dir(&path).unwrap();
        reclaim.committed(&path, key, 3 << 20);
        assert_eq!(reclaim.files.lock().unwrap().get(&key), Some(&None));
        // Refused once: not tried again.
        std::fs::remove_dir(&path).unwrap();
        std::fs::rename(&moved, &path).unwrap();
        reclaim.committed(&path, key, 4 << 20);
        assert_eq!(reclaim.metrics.reclaimed_bytes.load(Relaxed), 0);
        assert_eq!(std::fs::read(&path).unwrap(), vec![b'x'; 4 << 20]);
    }
}
