//! Log files → chunks of complete lines, with the file they come from and the offset they end at.
//!
//! One follower thread per `[[sources]]` entry. It keeps every matching file open, wakes on
//! file-system events (notify) and on a slow safety poll, and decides what happened by comparing each
//! path's identity (device + inode) and size with what it knows: grown (read on), shrunk (truncated:
//! read again from the start), another identity (rotated: finish the old file, then read the new one
//! from its start), gone (deleted: finish it, then close it).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use notify::Watcher;
use tokio::sync::mpsc;

use crate::config::ReadFrom;
use crate::telemetry::Metrics;

/// A file's identity: the same file under whatever name it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileKey {
    pub dev: u64,
    pub ino: u64,
}

impl FileKey {
    fn of(m: &std::fs::Metadata) -> FileKey {
        FileKey {
            dev: m.dev(),
            ino: m.ino(),
        }
    }
}

/// Complete lines read from one file, each ending with `\n`.
#[derive(Debug)]
pub struct Chunk {
    pub source: usize,
    pub file: FileKey,
    /// The file offset just past the last line of `data`.
    pub end_offset: u64,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct TailOptions {
    /// Where to start in a file seen at start-up (files that appear later are read from their start).
    pub read_from: ReadFrom,
    /// The safety poll, for file systems where notify is silent.
    pub poll_interval: Duration,
    /// How long a rotated or deleted file is still read after it was replaced, since the writer keeps
    /// writing to it until it reopens its log.
    pub rotate_grace: Duration,
    /// Longer lines are skipped and counted.
    pub max_line_length: usize,
    /// Read what is there now, then finish (no following).
    pub once: bool,
}

const READ_BLOCK: usize = 256 * 1024;

/// A running follower: stop it, then join it.
pub struct Follower {
    stop: Arc<AtomicBool>,
    wake: std_mpsc::Sender<Wake>,
    thread: JoinHandle<()>,
    // Dropping the watcher would stop the events.
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Follower {
    /// Starts following `pattern` (a path or a glob), sending chunks to `out`.
    pub fn spawn(
        source: usize,
        pattern: String,
        options: TailOptions,
        out: mpsc::Sender<Chunk>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Follower> {
        let (wake, wakes) = std_mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = if options.once {
            None
        } else {
            watch(&pattern, wake.clone())
        };
        let mut state = Tail {
            source,
            pattern,
            options,
            readers: Vec::new(),
            out,
            metrics,
            stop: stop.clone(),
            started: false,
            buf: vec![0; READ_BLOCK],
        };
        let thread = std::thread::Builder::new()
            .name(format!("tail-{source}"))
            .spawn(move || state.run(wakes))?;
        Ok(Follower {
            stop,
            wake,
            thread,
            _watcher: watcher,
        })
    }

    /// Asks the follower to stop reading; lines already sent stay sent.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.send(Wake::Scan);
    }

    /// Waits for the thread to end (it ends by itself in `once` mode).
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

#[derive(Debug, Clone, Copy)]
enum Wake {
    /// A file was written: read on.
    Data,
    /// Something else happened in the folder (create, rename, delete): look at the paths again.
    Scan,
}

/// Watches the folder the pattern lives in. None when it cannot (the folder does not exist yet, or
/// inotify is unavailable): the safety poll still finds everything.
fn watch(pattern: &str, wake: std_mpsc::Sender<Wake>) -> Option<notify::RecommendedWatcher> {
    let literal: PathBuf = Path::new(pattern)
        .components()
        .take_while(|c| !c.as_os_str().to_string_lossy().contains(['*', '?', '[']))
        .collect();
    let (dir, mode) = if literal == Path::new(pattern) {
        (
            literal.parent()?.to_path_buf(),
            notify::RecursiveMode::NonRecursive,
        )
    } else if literal.join(Path::new(pattern).file_name()?) == Path::new(pattern) {
        (literal, notify::RecursiveMode::NonRecursive)
    } else {
        (literal, notify::RecursiveMode::Recursive)
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let kind = match event {
            Ok(e)
                if matches!(
                    e.kind,
                    notify::EventKind::Modify(notify::event::ModifyKind::Data(_))
                ) =>
            {
                Wake::Data
            }
            Ok(e) if matches!(e.kind, notify::EventKind::Access(_)) => return,
            _ => Wake::Scan,
        };
        let _ = wake.send(kind);
    })
    .map_err(|e| tracing::warn!(error = %e, "file events unavailable, relying on the poll"))
    .ok()?;
    match watcher.watch(&dir, mode) {
        Ok(()) => Some(watcher),
        Err(e) => {
            tracing::info!(dir = %dir.display(), error = %e, "cannot watch the folder yet, relying on the poll");
            None
        }
    }
}

/// One open file.
struct Reader {
    /// The path it is known by; None once it was rotated away or deleted.
    path: Option<PathBuf>,
    file: File,
    key: FileKey,
    /// Where the next read starts.
    offset: u64,
    /// The start of a line whose newline has not arrived yet.
    partial: Vec<u8>,
    /// In the middle of a line too long to keep: drop bytes up to the next newline.
    discarding: bool,
    /// When the path stopped pointing at this file.
    orphaned: Option<Instant>,
}

struct Tail {
    source: usize,
    pattern: String,
    options: TailOptions,
    readers: Vec<Reader>,
    out: mpsc::Sender<Chunk>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    /// Whether the first scan is done (read_from applies to files found by it only).
    started: bool,
    buf: Vec<u8>,
}

impl Tail {
    fn run(&mut self, wakes: std_mpsc::Receiver<Wake>) {
        let mut next_scan = Instant::now();
        loop {
            if Instant::now() >= next_scan {
                self.scan();
                next_scan = Instant::now() + self.options.poll_interval;
            }
            if !self.read_all() {
                return; // the pipeline is gone
            }
            self.retire();
            if self.options.once || self.stop.load(Ordering::SeqCst) {
                return;
            }
            let timeout = next_scan.saturating_duration_since(Instant::now());
            match wakes.recv_timeout(timeout) {
                Ok(first) => {
                    // Coalesce a burst of events into one pass.
                    let scan = std::iter::once(first)
                        .chain(wakes.try_iter())
                        .any(|w| matches!(w, Wake::Scan));
                    if scan {
                        next_scan = Instant::now();
                    }
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// The paths the pattern names now, with their identities.
    fn current_paths(&self) -> HashMap<PathBuf, (FileKey, u64)> {
        let paths: Vec<PathBuf> = if self.pattern.contains(['*', '?', '[']) {
            match glob::glob(&self.pattern) {
                Ok(found) => found.filter_map(Result::ok).collect(),
                Err(_) => Vec::new(), // validated by the configuration already
            }
        } else {
            vec![PathBuf::from(&self.pattern)]
        };
        paths
            .into_iter()
            .filter_map(|p| {
                let m = std::fs::metadata(&p).ok()?;
                m.is_file().then(|| (p, (FileKey::of(&m), m.len())))
            })
            .collect()
    }

    fn scan(&mut self) {
        let mut current = self.current_paths();
        for r in &mut self.readers {
            let Some(path) = r.path.clone() else { continue };
            match current.get(&path) {
                Some((key, _)) if *key == r.key => {
                    current.remove(&path);
                }
                _ => {
                    // Renamed to another matching name (access.log → access.log.1 under a glob)?
                    if let Some(new_path) = current
                        .iter()
                        .find(|(_, (key, _))| *key == r.key)
                        .map(|(p, _)| p.clone())
                    {
                        current.remove(&new_path);
                        r.path = Some(new_path);
                    } else {
                        tracing::info!(path = %path.display(), "file rotated or deleted: reading it to its end");
                        Metrics::add(&self.metrics.rotations, 1);
                        r.path = None;
                        r.orphaned = Some(Instant::now());
                    }
                }
            }
        }
        for (path, (key, len)) in current {
            if self.readers.iter().any(|r| r.key == key) {
                continue; // an orphan we still read: already open
            }
            let start = if !self.started && self.options.read_from == ReadFrom::End {
                len
            } else {
                0
            };
            match open(&path, key) {
                Ok(file) => {
                    tracing::info!(path = %path.display(), offset = start, "following file");
                    self.readers.push(Reader {
                        path: Some(path),
                        file,
                        key,
                        offset: start,
                        partial: Vec::new(),
                        discarding: false,
                        orphaned: None,
                    });
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot open log file")
                }
            }
        }
        self.started = true;
    }

    /// Reads every open file to its end. False when the receiving side is gone.
    fn read_all(&mut self) -> bool {
        for i in 0..self.readers.len() {
            if !self.read(i) {
                return false;
            }
        }
        true
    }

    fn read(&mut self, i: usize) -> bool {
        let Tail {
            readers,
            buf,
            out,
            metrics,
            options,
            stop,
            source,
            ..
        } = self;
        let r = &mut readers[i];
        if let Ok(m) = r.file.metadata() {
            if m.len() < r.offset {
                tracing::warn!(path = ?r.path, size = m.len(), offset = r.offset, "file truncated: reading it again from its start");
                Metrics::add(&metrics.truncations, 1);
                r.offset = 0;
                r.partial.clear();
                r.discarding = false;
            }
        }
        loop {
            if stop.load(Ordering::SeqCst) {
                return true;
            }
            let n = match r
                .file
                .seek(SeekFrom::Start(r.offset))
                .and_then(|_| r.file.read(buf))
            {
                Ok(0) => return true,
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(path = ?r.path, error = %e, "read failed; will try again");
                    return true;
                }
            };
            r.offset += n as u64;
            let mut new = &buf[..n];
            if r.discarding {
                match memchr::memchr(b'\n', new) {
                    Some(nl) => {
                        r.discarding = false;
                        new = &new[nl + 1..];
                    }
                    None => continue,
                }
            }
            let Some(last_nl) = memchr::memrchr(b'\n', new) else {
                r.partial.extend_from_slice(new);
                if r.partial.len() > options.max_line_length {
                    tracing::warn!(path = ?r.path, limit = options.max_line_length, "line too long: skipped");
                    metrics.skipped(crate::parse::Skip::TooLong);
                    metrics.lines_read.fetch_add(1, Ordering::Relaxed);
                    r.partial = Vec::new();
                    r.discarding = true;
                }
                continue;
            };
            let mut data = Vec::with_capacity(r.partial.len() + last_nl + 1);
            data.append(&mut r.partial);
            data.extend_from_slice(&new[..=last_nl]);
            r.partial.extend_from_slice(&new[last_nl + 1..]);
            let chunk = Chunk {
                source: *source,
                file: r.key,
                end_offset: r.offset - r.partial.len() as u64,
                data,
            };
            tracing::debug!(path = ?r.path, end_offset = chunk.end_offset, bytes = chunk.data.len(), "read lines");
            // Blocks while the pipeline is behind: the file is the buffer.
            if out.blocking_send(chunk).is_err() {
                return false;
            }
        }
    }

    /// Closes rotated or deleted files once their grace period is over and they are read to the end.
    fn retire(&mut self) {
        let grace = self.options.rotate_grace;
        let once = self.options.once;
        let mut i = 0;
        while i < self.readers.len() {
            let r = &self.readers[i];
            let expired = r.orphaned.is_some_and(|t| once || t.elapsed() >= grace);
            if !expired {
                i += 1;
                continue;
            }
            let mut r = self.readers.swap_remove(i);
            if !r.partial.is_empty() && !r.discarding {
                // The file will not grow any more: its last line is complete.
                r.partial.push(b'\n');
                let chunk = Chunk {
                    source: self.source,
                    file: r.key,
                    end_offset: r.offset,
                    data: std::mem::take(&mut r.partial),
                };
                let _ = self.out.blocking_send(chunk);
            }
            tracing::info!(offset = r.offset, "closed rotated file");
        }
    }
}

fn open(path: &Path, key: FileKey) -> std::io::Result<File> {
    let file = File::open(path)?;
    // The path may have been replaced between the stat and the open.
    if FileKey::of(&file.metadata()?) != key {
        return Err(std::io::Error::other("file replaced while opening"));
    }
    Ok(file)
}
