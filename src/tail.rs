//! Log files → chunks of complete lines, with the file they come from and the offset they end at.
//!
//! One follower thread per `[[sources]]` entry. It keeps every matching file open, wakes on
//! file-system events (notify) and on a slow safety poll, and decides what happened by comparing each
//! path's identity (device + inode, confirmed by a fingerprint of the first bytes) and size with what it
//! knows: grown (read on), shrunk or other first bytes (truncated or replaced: read again from the
//! start), another identity under the path (rotated: finish the old file, then read the new one from
//! its start), gone (deleted: finish it, then close it).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use notify::Watcher;
use tokio::sync::mpsc;

use crate::identity::{FileKey, Fingerprint};
use crate::state::FileCheckpoint;
use crate::telemetry::{panic_text, shown_path, Metrics};

/// Complete lines read from one file, each ending with `\n`; or, with `closed`, the news that the
/// file is finished.
#[derive(Debug)]
pub struct Chunk {
    pub source: usize,
    pub file: FileKey,
    pub fingerprint: Fingerprint,
    pub path: Arc<Path>,
    /// The file offset just past the last line of `data`.
    pub end_offset: u64,
    data: Vec<u8>,
    /// The index of each newline in `data`. Found on the reader's thread, which mostly waits on the
    /// disk, so that the thread parsing the lines does not scan them twice.
    newlines: Vec<u32>,
    /// The file was rotated away or deleted and is now read to its end and closed.
    pub closed: bool,
}

impl Chunk {
    /// `data` holds complete lines only (and is below 4 GiB: chunks are read in small blocks).
    pub(crate) fn new(
        source: usize,
        file: FileKey,
        fingerprint: Fingerprint,
        path: Arc<Path>,
        end_offset: u64,
        data: Vec<u8>,
        closed: bool,
    ) -> Chunk {
        let newlines = memchr::memchr_iter(b'\n', &data)
            .map(|i| i as u32)
            .collect();
        Chunk {
            source,
            file,
            fingerprint,
            path,
            end_offset,
            data,
            newlines,
            closed,
        }
    }

    /// How many bytes the chunk's lines take.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// The chunk's lines, newlines included.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Each line without its newline, with the offset in the chunk just past its newline.
    pub fn lines(&self) -> impl Iterator<Item = (&[u8], usize)> {
        let mut start = 0;
        self.newlines.iter().map(move |&nl| {
            let (from, end) = (start, nl as usize);
            start = end + 1;
            (&self.data[from..end], start)
        })
    }
}

#[derive(Debug, Clone)]
pub struct TailOptions {
    /// Start at the end of files found at start-up (else at their start). Only for a source never
    /// read before; files with a checkpoint resume there, files that appear later start at 0.
    pub start_at_end: bool,
    /// Where earlier runs stopped, in the files of this source.
    pub checkpoints: Vec<FileCheckpoint>,
    /// The safety poll, for file systems where notify is silent.
    pub poll_interval: Duration,
    /// Wake on file-system events too (else the poll only).
    pub watch: bool,
    /// How long a rotated or deleted file is still read after it was replaced, since the writer keeps
    /// writing to it until it reopens its log.
    pub rotate_grace: Duration,
    /// Longer lines are skipped and counted.
    pub max_line_length: usize,
    /// Read what is there now, then finish (no following).
    pub once: bool,
}

const READ_BLOCK: usize = 256 * 1024;

/// The shortest time between two read passes woken by file events.
const MIN_PASS_INTERVAL: Duration = Duration::from_millis(100);

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
        let watcher = if options.once || !options.watch {
            None
        } else {
            watch(&pattern, wake.clone())
        };
        let mut tail = Tail {
            source,
            pattern,
            options,
            readers: Vec::new(),
            out,
            metrics,
            stop: stop.clone(),
            started: false,
        };
        let thread = std::thread::Builder::new()
            .name(format!("tail-{source}"))
            .spawn(move || {
                // A panic here would end this source's reading in silence: say it, so tally stops.
                let run = std::panic::AssertUnwindSafe(|| tail.run(wakes));
                if let Err(payload) = std::panic::catch_unwind(run) {
                    let stage = format!("follower of {}", shown_path(Path::new(&tail.pattern)));
                    tail.metrics.stage_died(&stage, &panic_text(&*payload));
                }
            })?;
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

    /// Whether the thread has ended (by itself in `once` mode, at the files' end).
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits for the thread to end (it ends by itself in `once` mode).
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

/// The files a `[[sources]]` path (a file or a glob) names now, with their identities and sizes.
pub fn matching_files(pattern: &str) -> HashMap<PathBuf, (FileKey, u64)> {
    let paths: Vec<PathBuf> = if is_glob(pattern) {
        match glob::glob(pattern) {
            Ok(found) => found.filter_map(Result::ok).collect(),
            Err(_) => Vec::new(), // validated by the configuration already
        }
    } else {
        vec![PathBuf::from(pattern)]
    };
    paths
        .into_iter()
        .filter_map(|p| {
            let m = std::fs::metadata(&p).ok()?;
            m.is_file().then(|| (p, (FileKey::of(&m), m.len())))
        })
        .collect()
}

/// Whether a `[[sources]]` path is a glob pattern rather than one file's path.
pub fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?', '['])
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
        .take_while(|c| !is_glob(&c.as_os_str().to_string_lossy()))
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
        use notify::event::{EventKind, ModifyKind};
        let kind = match event {
            Ok(e) if matches!(e.kind, EventKind::Modify(ModifyKind::Data(_))) => Wake::Data,
            Ok(e) if matches!(e.kind, EventKind::Access(_)) => return,
            _ => Wake::Scan,
        };
        let _ = wake.send(kind);
    })
    .map_err(|e| tracing::warn!(error = %e, "file events unavailable, relying on the poll"))
    .ok()?;
    match watcher.watch(&dir, mode) {
        Ok(()) => Some(watcher),
        Err(e) => {
            tracing::info!(dir = %crate::telemetry::shown_path(&dir), error = %e, "cannot watch the folder yet, relying on the poll");
            None
        }
    }
}

/// One open file.
struct Reader {
    /// The path it is known by; None once it was rotated away or deleted.
    path: Option<PathBuf>,
    /// The path its chunks carry (the last one it had).
    shown: Arc<Path>,
    file: File,
    key: FileKey,
    fingerprint: Fingerprint,
    /// Where the next read starts.
    offset: u64,
    /// The start of a line whose newline has not arrived yet.
    partial: Vec<u8>,
    /// In the middle of a line too long to keep: drop bytes up to the next newline.
    discarding: bool,
    /// When the path stopped pointing at this file.
    orphaned: Option<Instant>,
    /// The last read failed (and was reported as a problem).
    read_failing: bool,
}

impl Reader {
    /// Lines of this file (or none) ending at `end_offset`.
    fn chunk(&self, source: usize, data: Vec<u8>, end_offset: u64, closed: bool) -> Chunk {
        Chunk::new(
            source,
            self.key,
            self.fingerprint,
            self.shown.clone(),
            end_offset,
            data,
            closed,
        )
    }
}

struct Tail {
    source: usize,
    pattern: String,
    options: TailOptions,
    readers: Vec<Reader>,
    out: mpsc::Sender<Chunk>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    /// Whether the first scan is done.
    started: bool,
}

impl Tail {
    fn run(&mut self, wakes: std_mpsc::Receiver<Wake>) {
        let mut next_scan = Instant::now();
        loop {
            if Instant::now() >= next_scan {
                self.scan();
                next_scan = Instant::now() + self.options.poll_interval;
            }
            let pass = Instant::now();
            if !self.read_all() || !self.retire() {
                return; // the pipeline is gone
            }
            if self.options.once || self.stop.load(Ordering::SeqCst) {
                return;
            }
            let timeout = next_scan.saturating_duration_since(Instant::now());
            let first = match wakes.recv_timeout(timeout) {
                Ok(first) => first,
                Err(std_mpsc::RecvTimeoutError::Timeout) => continue,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            };
            // Events come with every write: gather them until the next pass is due, so a steady
            // stream costs a few passes a second, not one per write.
            let mut scan = matches!(first, Wake::Scan);
            let due = pass + MIN_PASS_INTERVAL;
            while !self.stop.load(Ordering::SeqCst) {
                let left = due.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match wakes.recv_timeout(left) {
                    Ok(w) => scan |= matches!(w, Wake::Scan),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => break,
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            if scan {
                next_scan = Instant::now();
            }
        }
    }

    fn current_paths(&self) -> HashMap<PathBuf, (FileKey, u64)> {
        matching_files(&self.pattern)
    }

    fn scan(&mut self) {
        let mut current = self.current_paths();
        for r in &mut self.readers {
            let Some(path) = r.path.clone() else { continue };
            if current.get(&path).is_some_and(|(key, _)| *key == r.key) {
                current.remove(&path);
                continue;
            }
            // Renamed to another matching name (access.log → access.log.1 under a glob)?
            if let Some(new_path) = current
                .iter()
                .find(|(_, (key, _))| *key == r.key)
                .map(|(p, _)| p.clone())
            {
                current.remove(&new_path);
                r.shown = Arc::from(new_path.as_path());
                r.path = Some(new_path);
            } else {
                tracing::info!(path = %crate::telemetry::shown_path(&path), "file rotated or deleted: reading it to its end");
                Metrics::add(&self.metrics.rotations, 1);
                r.path = None;
                r.orphaned = Some(Instant::now());
            }
        }
        if !self.started {
            self.resume(&mut current);
        }
        for (path, (key, len)) in current {
            if self.readers.iter().any(|r| r.key == key) {
                continue; // an orphan still being read: already open
            }
            let start = if !self.started && self.options.start_at_end {
                len
            } else {
                0
            };
            self.open(path, key, start, None);
        }
        self.started = true;
    }

    /// At start-up: reopens the files of the checkpoints, under their path or, if they were rotated
    /// while tally was down, under their new name in the same folder.
    fn resume(&mut self, current: &mut HashMap<PathBuf, (FileKey, u64)>) {
        for c in std::mem::take(&mut self.options.checkpoints) {
            let found = current
                .iter()
                .find(|(_, (key, _))| *key == c.key)
                .map(|(p, _)| (p.clone(), true))
                .or_else(|| find_in_folder(&c.path, c.key).map(|p| (p, false)));
            let Some((path, matched)) = found else {
                tracing::warn!(path = %crate::telemetry::shown_path(&c.path), offset = c.offset,
                    "a file read before is gone: lines written to it after the checkpoint, if any, are lost");
                self.send_closed(&c);
                continue;
            };
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(path = %crate::telemetry::shown_path(&path), error = %e, "cannot reopen a file read before");
                    continue;
                }
            };
            let same = Fingerprint::read(&file, c.fingerprint.len).ok() == Some(c.fingerprint);
            let offset = if same {
                c.offset
            } else {
                // Same identity, other first bytes: truncated and regrown, or the inode number reused
                // by a new file. Either way its content is new: read it from its start.
                tracing::info!(path = %crate::telemetry::shown_path(&path), "the file's first bytes changed since the checkpoint: reading it from its start");
                self.send_closed(&c);
                0
            };
            if matched {
                current.remove(&path);
            }
            tracing::info!(path = %crate::telemetry::shown_path(&path), offset, "resuming at the checkpoint");
            self.open(path, c.key, offset, Some(file));
            if !matched {
                // Rotated away while tally was down: finish it.
                if let Some(r) = self.readers.last_mut().filter(|r| r.key == c.key) {
                    r.path = None;
                    r.orphaned = Some(Instant::now());
                }
            }
        }
    }

    /// Tells the pipeline to forget a checkpointed file that will not be read again.
    fn send_closed(&self, c: &FileCheckpoint) {
        let _ = self.out.blocking_send(Chunk::new(
            self.source,
            c.key,
            c.fingerprint,
            Arc::from(c.path.as_path()),
            c.offset,
            Vec::new(),
            true,
        ));
    }

    fn open(&mut self, path: PathBuf, key: FileKey, offset: u64, file: Option<File>) {
        let file = match file.map_or_else(|| File::open(&path), Ok) {
            // The path may have been replaced between the stat and the open.
            Ok(f) if f.metadata().is_ok_and(|m| FileKey::of(&m) == key) => f,
            Ok(_) => return, // the next scan sees the new file
            Err(e) => {
                // Logged once, not at every poll, and shown on /healthz until it opens.
                let what = format!("log file {}", crate::telemetry::shown_path(&path));
                if self
                    .metrics
                    .set_problem(&what, Some(format!("cannot open it: {e}")))
                {
                    tracing::warn!(path = %crate::telemetry::shown_path(&path), error = %e, "cannot open log file; tally tries again at every poll");
                }
                return;
            }
        };
        self.metrics.set_problem(
            &format!("log file {}", crate::telemetry::shown_path(&path)),
            None,
        );
        let fingerprint = Fingerprint::read(&file, Fingerprint::MAX).unwrap_or_default();
        tracing::info!(path = %crate::telemetry::shown_path(&path), offset, "following file");
        let reader = Reader {
            shown: Arc::from(path.as_path()),
            path: Some(path),
            file,
            key,
            fingerprint,
            offset,
            partial: Vec::new(),
            discarding: false,
            orphaned: None,
            read_failing: false,
        };
        // Checkpoint the file as soon as it is open, even before it has lines: if it is rotated away
        // while tally is down, the checkpoint is what finds it again.
        let _ = self
            .out
            .blocking_send(reader.chunk(self.source, Vec::new(), offset, false));
        self.readers.push(reader);
    }

    /// Reads every open file to its end. False when the receiving side is gone.
    fn read_all(&mut self) -> bool {
        (0..self.readers.len()).all(|i| self.read(i))
    }

    fn read(&mut self, i: usize) -> bool {
        let Tail {
            readers,
            out,
            metrics,
            options,
            stop,
            source,
            ..
        } = self;
        let r = &mut readers[i];
        check_still_same(r, metrics);
        loop {
            if stop.load(Ordering::SeqCst) {
                return true;
            }
            // The chunk is built in place: the start of a line left from the last read, then
            // the new bytes, read straight after it (no copy of what is read).
            let mut data = std::mem::take(&mut r.partial);
            let kept = data.len();
            data.reserve(READ_BLOCK);
            let read = r
                .file
                .seek(SeekFrom::Start(r.offset))
                .and_then(|_| (&r.file).take(READ_BLOCK as u64).read_to_end(&mut data));
            let n = match read {
                Ok(0) => {
                    r.partial = data;
                    return true;
                }
                Ok(n) if r.read_failing => {
                    r.read_failing = false;
                    metrics.set_problem(
                        &format!("log file {}", crate::telemetry::shown_path(&r.shown)),
                        None,
                    );
                    n
                }
                Ok(n) => n,
                Err(e) => {
                    data.truncate(kept);
                    r.partial = data;
                    let what = format!("log file {}", crate::telemetry::shown_path(&r.shown));
                    r.read_failing = true;
                    if metrics.set_problem(&what, Some(format!("cannot read it: {e}"))) {
                        tracing::warn!(path = %crate::telemetry::shown_path(&r.shown), error = %e, "read failed; tally tries again at every pass");
                    }
                    return true;
                }
            };
            r.offset += n as u64;
            if r.fingerprint.len < Fingerprint::MAX {
                r.fingerprint =
                    Fingerprint::read(&r.file, Fingerprint::MAX).unwrap_or(r.fingerprint);
            }
            if r.discarding {
                // The rest of a line too long to keep: drop it up to its newline.
                match memchr::memchr(b'\n', &data) {
                    Some(nl) => {
                        r.discarding = false;
                        data.drain(..=nl);
                    }
                    None => {
                        data.clear();
                        r.partial = data;
                        continue;
                    }
                }
            }
            // Only the new bytes can hold a newline: the kept part had none.
            let from = kept.min(data.len());
            let Some(last_nl) = memchr::memrchr(b'\n', &data[from..]).map(|i| from + i) else {
                r.partial = data;
                if r.partial.len() > options.max_line_length {
                    tracing::warn!(path = %crate::telemetry::shown_path(&r.shown), limit = options.max_line_length, "line too long: skipped");
                    metrics.skipped(crate::parse::Skip::TooLong, 1);
                    Metrics::add(&metrics.lines_read, 1);
                    r.partial = Vec::new();
                    r.discarding = true;
                }
                continue;
            };
            r.partial = data[last_nl + 1..].to_vec();
            data.truncate(last_nl + 1);
            let chunk = r.chunk(*source, data, r.offset - r.partial.len() as u64, false);
            tracing::debug!(path = %crate::telemetry::shown_path(&r.shown), end_offset = chunk.end_offset, bytes = chunk.len(), "read lines");
            metrics.files.read(*source, r.key, &r.shown, r.offset);
            // Blocks while the pipeline is behind: the file is the buffer.
            if out.blocking_send(chunk).is_err() {
                return false;
            }
        }
    }

    /// Closes rotated or deleted files once their grace period is over and they are read to the end.
    /// False when the receiving side is gone.
    fn retire(&mut self) -> bool {
        let grace = self.options.rotate_grace;
        let once = self.options.once;
        let mut i = 0;
        while i < self.readers.len() {
            let expired = self.readers[i]
                .orphaned
                .is_some_and(|t| once || t.elapsed() >= grace);
            if !expired {
                i += 1;
                continue;
            }
            let mut r = self.readers.swap_remove(i);
            let mut data = std::mem::take(&mut r.partial);
            if !data.is_empty() && !r.discarding {
                // The file will not grow any more: its last line is complete.
                data.push(b'\n');
            } else {
                data.clear();
            }
            let chunk = r.chunk(self.source, data, r.offset, true);
            tracing::info!(path = %crate::telemetry::shown_path(&r.shown), offset = r.offset, "finished a rotated or deleted file");
            if self.out.blocking_send(chunk).is_err() {
                return false;
            }
        }
        true
    }
}

/// Detects a file truncated (copytruncate) or whose first bytes changed under the same identity
/// (truncated and regrown between two looks, or an inode reused): it is read again from the start.
fn check_still_same(r: &mut Reader, metrics: &Metrics) {
    let Ok(m) = r.file.metadata() else { return };
    let shrunk = m.len() < r.offset;
    let replaced = !shrunk
        && r.fingerprint.len > 0
        && Fingerprint::read(&r.file, r.fingerprint.len).is_ok_and(|f| f != r.fingerprint);
    if shrunk || replaced {
        tracing::warn!(path = %crate::telemetry::shown_path(&r.shown), size = m.len(), offset = r.offset,
            "file truncated or replaced in place: reading it again from its start");
        Metrics::add(&metrics.truncations, 1);
        r.offset = 0;
        r.partial.clear();
        r.discarding = false;
        r.fingerprint = Fingerprint::read(&r.file, Fingerprint::MAX).unwrap_or_default();
    }
}

/// The file with identity `key` among the rotated names of `path` in its folder (`access.log.1`,
/// `access.log-20261125`: names that start with its own).
fn find_in_folder(path: &Path, key: FileKey) -> Option<PathBuf> {
    let dir = path.parent()?;
    let name = path.file_name()?.as_encoded_bytes();
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().as_encoded_bytes().starts_with(name))
        .map(|e| e.path())
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && FileKey::of(&m) == key))
}

/// The reader checked against a model, as Vector tests its file watcher: random sequences of
/// file-system actions (write, half-write, rotate, copytruncate, delete, restart from the
/// checkpoints) run against the real reader on a temp folder; every line written must come out
/// exactly once.
#[cfg(test)]
mod model {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    #[derive(Debug, Clone)]
    enum Action {
        /// Append whole lines (and finish a half-written one first).
        Write(u8),
        /// Append the first half of a line.
        WriteHalf,
        /// Let the reader look (scan, read, retire).
        Tick,
        /// rename + create: the writer writes some lines to the old file, then reopens. A file that
        /// the reader never saw cannot be followed once renamed, so one look comes first if needed.
        Rotate(u8),
        /// The reader catches up, then the file is truncated in place.
        CopyTruncate,
        /// The reader catches up, then the file is deleted and created again.
        Delete,
        /// The reader stops; the next tick starts a new one from the checkpoints.
        Restart,
    }

    fn action() -> impl Strategy<Value = Action> {
        prop_oneof![
            4 => (1u8..6).prop_map(Action::Write),
            1 => Just(Action::WriteHalf),
            4 => Just(Action::Tick),
            1 => (0u8..4).prop_map(Action::Rotate),
            1 => Just(Action::CopyTruncate),
            1 => Just(Action::Delete),
            1 => Just(Action::Restart),
        ]
    }

    struct World {
        dir: tempfile::TempDir,
        path: PathBuf,
        writer: File,
        next_id: u64,
        /// The second half of a half-written line.
        half: Option<String>,
        rotations: u32,
        /// Whether the reader looked since the current file was created.
        current_seen: bool,
        tail: Option<Tail>,
        out: mpsc::Sender<Chunk>,
        chunks: mpsc::Receiver<Chunk>,
        /// What a reporter would have committed: the latest position of each open file.
        committed: HashMap<FileKey, FileCheckpoint>,
        seen: HashMap<u64, u32>,
        pad: u64,
    }

    impl World {
        fn new() -> World {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("access.log");
            let writer = append(&path);
            let (out, chunks) = mpsc::channel(100_000);
            World {
                dir,
                path,
                writer,
                next_id: 0,
                half: None,
                rotations: 0,
                current_seen: false,
                tail: None,
                out,
                chunks,
                committed: HashMap::new(),
                seen: HashMap::new(),
                pad: 7,
            }
        }

        fn line(&mut self) -> String {
            // Lengths vary, so fingerprints cover partial and whole first lines.
            self.pad = (self.pad * 31 + 17) % 300;
            let line = format!("id={} {}\n", self.next_id, "x".repeat(self.pad as usize));
            self.next_id += 1;
            line
        }

        fn finish_half(&mut self) {
            if let Some(rest) = self.half.take() {
                self.writer.write_all(rest.as_bytes()).unwrap();
            }
        }

        fn tick(&mut self) {
            if self.tail.is_none() {
                let checkpoints = self.committed.values().cloned().collect();
                let options = TailOptions {
                    start_at_end: false,
                    checkpoints,
                    poll_interval: Duration::from_secs(3600),
                    watch: false,
                    rotate_grace: Duration::ZERO,
                    max_line_length: 64 * 1024,
                    once: false,
                };
                self.tail = Some(Tail {
                    source: 0,
                    pattern: self.path.to_string_lossy().into_owned(),
                    options,
                    readers: Vec::new(),
                    out: self.out.clone(),
                    metrics: Arc::new(Metrics::default()),
                    stop: Arc::new(AtomicBool::new(false)),
                    started: false,
                });
            }
            let tail = self.tail.as_mut().unwrap();
            tail.scan();
            self.current_seen = true;
            assert!(tail.read_all() && tail.retire());
            while let Ok(chunk) = self.chunks.try_recv() {
                for (line, _) in chunk.lines().filter(|(l, _)| !l.is_empty()) {
                    let text = std::str::from_utf8(line).unwrap();
                    let id = text[3..].split(' ').next().unwrap().parse().unwrap();
                    *self.seen.entry(id).or_default() += 1;
                }
                if chunk.closed {
                    self.committed.remove(&chunk.file);
                } else {
                    self.committed.insert(
                        chunk.file,
                        FileCheckpoint {
                            source: self.path.to_string_lossy().into_owned(),
                            key: chunk.file,
                            fingerprint: chunk.fingerprint,
                            offset: chunk.end_offset,
                            line_time: 0,
                            path: chunk.path.to_path_buf(),
                        },
                    );
                }
            }
        }

        fn apply(&mut self, action: &Action) {
            match *action {
                Action::Write(n) => {
                    self.finish_half();
                    let text: String = (0..n).map(|_| self.line()).collect();
                    self.writer.write_all(text.as_bytes()).unwrap();
                }
                Action::WriteHalf => {
                    self.finish_half();
                    let line = self.line();
                    let (first, rest) = line.split_at(line.len() / 2);
                    self.writer.write_all(first.as_bytes()).unwrap();
                    self.half = Some(rest.to_string());
                }
                Action::Tick => self.tick(),
                Action::Rotate(extra) => {
                    self.finish_half();
                    if !self.current_seen {
                        self.tick();
                    }
                    self.rotations += 1;
                    let rotated = self
                        .dir
                        .path()
                        .join(format!("access.log.{}", self.rotations));
                    std::fs::rename(&self.path, rotated).unwrap();
                    self.apply(&Action::Write(extra));
                    self.writer = append(&self.path);
                    self.current_seen = false;
                }
                Action::CopyTruncate => {
                    self.finish_half();
                    self.tick();
                    self.writer.set_len(0).unwrap();
                }
                Action::Delete => {
                    self.finish_half();
                    self.tick();
                    std::fs::remove_file(&self.path).unwrap();
                    self.writer = append(&self.path);
                    self.current_seen = false;
                }
                Action::Restart => self.tail = None,
            }
        }
    }

    fn append(path: &Path) -> File {
        File::options()
            .create(true)
            .append(true)
            .open(path)
            .unwrap()
    }

    proptest! {
        // 96 cases by default; PROPTEST_CASES=5000 for a longer hunt.
        #![proptest_config(ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(96),
            ..ProptestConfig::default()
        })]

        #[test]
        fn every_line_comes_out_exactly_once(actions in proptest::collection::vec(action(), 1..40)) {
            let mut world = World::new();
            for a in &actions {
                world.apply(a);
            }
            world.finish_half();
            world.tick();
            world.tick(); // a file rotated at the first look is finished at the second
            let wrong: Vec<_> = world.seen.iter().filter(|(_, &n)| n != 1).collect();
            prop_assert!(wrong.is_empty(), "lines seen more than once: {:?}", wrong);
            let missing: Vec<u64> = (0..world.next_id).filter(|id| !world.seen.contains_key(id)).collect();
            prop_assert!(missing.is_empty(), "lines lost: {:?}", missing);
        }
    }
}
