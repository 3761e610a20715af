//! What a file is, whatever its name: its identity (device + inode) and a fingerprint of its first
//! bytes. A leaf: the reader, the state and the telemetry all speak of files in these terms.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};

/// A file's identity: the same file under whatever name it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileKey {
    pub dev: u64,
    pub ino: u64,
}

impl FileKey {
    pub(crate) fn of(m: &std::fs::Metadata) -> FileKey {
        FileKey {
            dev: m.dev(),
            ino: m.ino(),
        }
    }
}

/// A hash of a file's first bytes (up to [`Fingerprint::MAX`]), which tells a file from another that
/// got the same inode number, or from its own content replaced in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fingerprint {
    /// How many bytes it covers.
    pub len: u64,
    pub hash: u64,
}

impl Fingerprint {
    pub const MAX: u64 = 256;

    /// The fingerprint of the first `len` bytes of `file` (fewer if it is shorter).
    pub(crate) fn read(file: &File, len: u64) -> std::io::Result<Fingerprint> {
        let mut buf = [0u8; Fingerprint::MAX as usize];
        let want = len.min(Fingerprint::MAX) as usize;
        let mut got = 0;
        while got < want {
            match file.read_at(&mut buf[got..want], got as u64)? {
                0 => break,
                n => got += n,
            }
        }
        Ok(Fingerprint::of(&buf[..got]))
    }

    pub(crate) fn of(bytes: &[u8]) -> Fingerprint {
        // FNV-1a: stable across Rust versions, unlike the standard hasher.
        let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        Fingerprint {
            len: bytes.len() as u64,
            hash,
        }
    }
}

/// Where a reader stands in a file: which file (identity, fingerprint), the offset, and the path
/// it was last seen under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilePosition {
    pub key: FileKey,
    pub fingerprint: Fingerprint,
    pub offset: u64,
    pub path: std::sync::Arc<std::path::Path>,
}
