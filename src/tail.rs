//! Log files → chunks of complete lines, with the file they come from and the offset they end at.
//!
//! One follower thread per `[[sources]]` entry. It keeps every matching file open, wakes on
//! file-system events (inotify, see `watch`) and on a slow safety poll, and decides what happened
//! by comparing each path's identity (device + inode, confirmed by a fingerprint of the first bytes)
//! and size with what it knows: grown (read on), shrunk or other first bytes (truncated or replaced:
//! read again from the start), another identity under the path (rotated: finish the old file, then
//! read the new one from its start), gone (deleted: finish it, then close it). Asked to stop, it
//! reads each file up to where it stands, then ends.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::identity::{FileKey, FilePosition, Fingerprint};
use crate::watch::{Change, FolderWatch, Waker};

/// What a follower tells the services it feeds, in file order.
#[derive(Debug, Clone)]
pub enum Tailed {
    /// A file is open at `at.offset`. It is checkpointed before its first lines: if it is rotated
    /// away while tally is down, the checkpoint is what finds it again.
    Opened {
        /// The follower (`[[sources]]` path).
        feed: usize,
        /// The file, and where reading starts.
        at: FilePosition,
    },
    /// Complete lines of a file.
    Lines(Arc<Chunk>),
    /// A rotated or deleted file read to its end, with its last lines (maybe none): it is closed,
    /// and its checkpoint can go.
    Finished(Arc<Chunk>),
    /// The checkpoint `at` no longer applies: its file is `gone`, or holds something else now (its
    /// first bytes changed; it is then read again from its start).
    Forget {
        /// The follower (`[[sources]]` path).
        feed: usize,
        /// The checkpoint.
        at: FilePosition,
        /// The file is gone (else replaced).
        gone: bool,
    },
    /// The services' settings change (a new proxy configuration) for the lines that follow: every
    /// service the follower feeds switches at the same line.
    Reconfigured {
        /// The follower (`[[sources]]` path).
        feed: usize,
        /// Per service and feed, what it reads the lines with.
        settings: Arc<crate::aggregate::Reconfiguration>,
    },
}

/// Complete lines read from one file, each ending with `\n`.
#[derive(Debug)]
pub struct Chunk {
    /// The follower that read it (a `[[sources]]` path, shared by the services it feeds).
    pub feed: usize,
    /// The file, and the offset just past the last line of `data`.
    pub at: FilePosition,
    data: Vec<u8>,
    /// The index of each newline in `data`. Found on the reader's thread, which mostly waits on the
    /// disk, so that the threads parsing the lines do not scan them again.
    newlines: Vec<u32>,
}

impl Chunk {
    /// `data` holds complete lines only (and is below 4 GiB: chunks are read in small blocks).
    pub fn new(feed: usize, at: FilePosition, data: Vec<u8>) -> Chunk {
        let newlines = memchr::memchr_iter(b'\n', &data)
            .map(|i| i as u32)
            .collect();
        Chunk {
            feed,
            at,
            data,
            newlines,
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

    /// Whether it holds no line.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Where the chunk's first line starts in the file.
    pub fn start_offset(&self) -> u64 {
        self.at.offset - self.data.len() as u64
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

/// What happens to the files a follower reads, for the logs, the counters and `/healthz`
/// (telemetry implements it; the tailer only reports).
pub trait TailEvents: Send + Sync {
    /// A file (`key`, of follower `feed`) is open and read from `offset` (`resumed`: at a checkpoint
    /// of an earlier run).
    fn following(&self, feed: usize, key: FileKey, path: &Arc<Path>, offset: u64, resumed: bool);
    /// A file cannot be opened; tried again at every poll. Cleared by [`TailEvents::following`].
    fn open_failed(&self, path: &Path, error: &std::io::Error);
    /// A checkpointed file is gone for good: what was written to it after the checkpoint is lost.
    fn gone(&self, path: &Path, offset: u64);
    /// A checkpointed file's first bytes changed: it is read again from its start.
    fn replaced_while_stopped(&self, path: &Path);
    /// A file was rotated away or deleted: it is read to its end.
    fn rotated(&self, path: &Path);
    /// A rotated or deleted file is read to its end and closed.
    fn finished(&self, path: &Path, offset: u64);
    /// A file shrank or its first bytes changed in place: it is read again from its start.
    fn truncated(&self, path: &Path, size: u64, offset: u64);
    /// A line longer than `limit` bytes is skipped.
    fn line_too_long(&self, path: &Path, limit: usize);
    /// Reading a file failed (`Some`), or works again (`None`).
    fn read_failed(&self, path: &Path, error: Option<&std::io::Error>);
    /// A file has been read up to `offset`.
    fn read(&self, feed: usize, key: FileKey, path: &Arc<Path>, offset: u64);
    /// File events are unavailable for `dir` (`None`: at all): the poll alone finds changes.
    fn unwatched(&self, dir: Option<&Path>, error: &std::io::Error);
    /// The follower of `pattern` stopped abnormally (a panic with this payload): tally must stop.
    fn died(&self, pattern: &str, panic: &(dyn std::any::Any + Send));
}

/// How a follower reads.
#[derive(Debug, Clone)]
pub struct TailOptions {
    /// Start at the end of files found at start-up (else at their start). Only for a source never
    /// read before; files with a checkpoint resume there, files that appear later start at 0.
    pub start_at_end: bool,
    /// Where to resume, in the files read before (the lowest offset any service fed by them needs).
    pub checkpoints: Vec<FilePosition>,
    /// The safety poll, for file systems where inotify is silent.
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
    /// How physical lines make up lines, when a line may be split over several (a container
    /// runtime's log); None: each physical line is a line.
    pub records: Option<Arc<dyn Records>>,
    /// New settings of the services, passed on before the next lines read.
    pub reconfigurations: Option<Reconfigurations>,
}

/// Where a follower learns of new settings of the services it feeds.
pub(crate) type Reconfigurations =
    tokio::sync::watch::Receiver<Option<Arc<crate::aggregate::Reconfiguration>>>;

/// How a feed's physical lines make up its lines, when one may be split over several records: a
/// chunk (and so a checkpoint) never ends inside a line whose records are not all there.
pub trait Records: Send + Sync + std::fmt::Debug {
    /// How much of `lines` (whole physical lines) holds no unfinished line: a chunk may end there.
    fn complete(&self, lines: &[u8]) -> usize;
    /// The length of `lines`' prefix up to the record that finishes the line under way, if it is
    /// there.
    fn finishing(&self, lines: &[u8]) -> Option<usize>;
    /// What a record is, from its first bytes (it may be cut).
    fn start(&self, record: &[u8]) -> RecordStart;
}

/// What a record is, as far as its first bytes tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordStart {
    /// A part of a line of the kept stream that goes on in a later record.
    KeptPart,
    /// The last (or only) part of a line of the kept stream.
    KeptLast,
    /// A record of the other stream.
    OtherStream,
    /// Its first bytes do not tell (a Docker record says whether its line goes on at its end).
    Unknown,
}

const READ_BLOCK: usize = 256 * 1024;

/// The shortest time between two read passes woken by file events.
const MIN_PASS_INTERVAL: Duration = Duration::from_millis(100);

/// A running follower: stop it, then join it. One per `[[sources]]` path, however many services
/// it feeds.
pub struct Follower {
    stop: Arc<AtomicBool>,
    waker: Waker,
    thread: JoinHandle<()>,
}

impl Follower {
    /// Starts following `pattern` (a path or a glob), telling each of `out` what it reads.
    pub fn spawn(
        feed: usize,
        pattern: String,
        options: TailOptions,
        out: Vec<mpsc::Sender<Tailed>>,
        events: Arc<dyn TailEvents>,
    ) -> std::io::Result<Follower> {
        let stop = Arc::new(AtomicBool::new(false));
        let (watch, waker) =
            FolderWatch::new(&pattern, options.watch && !options.once, |dir, e| {
                events.unwatched(dir, e)
            })?;
        let mut tail = Tail {
            feed,
            pattern,
            options,
            readers: Vec::new(),
            out,
            events,
            stop: stop.clone(),
            started: false,
        };
        let thread = std::thread::Builder::new()
            .name(format!("tail-{feed}"))
            .spawn(move || {
                // A panic here would end this source's reading in silence: say it, so tally stops.
                let run = std::panic::AssertUnwindSafe(|| tail.run(watch));
                if let Err(payload) = std::panic::catch_unwind(run) {
                    tail.events.died(&tail.pattern, &*payload);
                }
            })?;
        Ok(Follower {
            stop,
            waker,
            thread,
        })
    }

    /// Asks the follower to stop reading; lines already sent stay sent.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.waker.wake();
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
pub(crate) fn matching_files(pattern: &str) -> HashMap<PathBuf, (FileKey, u64)> {
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

/// Whether the file of a checkpoint still holds what it held then (the same first bytes), found by
/// its identity among `matching` (see [`matching_files`]) or, rotated away, beside its old path;
/// None if it is gone.
pub(crate) fn still_holds(
    matching: &HashMap<PathBuf, (FileKey, u64)>,
    key: FileKey,
    fingerprint: Fingerprint,
    path: &Path,
) -> Option<bool> {
    let (found, _) = locate(matching, key, path)?;
    let file = File::open(found).ok()?;
    Some(Fingerprint::read(&file, fingerprint.len).ok()? == fingerprint)
}

/// Where the file of identity `key`, last seen at `path`, is now: among `matching` (true), or
/// rotated away beside `path` (false); None if it is gone.
fn locate(
    matching: &HashMap<PathBuf, (FileKey, u64)>,
    key: FileKey,
    path: &Path,
) -> Option<(PathBuf, bool)> {
    matching
        .iter()
        .find(|(_, (k, _))| *k == key)
        .map(|(p, _)| (p.clone(), true))
        .or_else(|| find_in_folder(path, key).map(|p| (p, false)))
}

/// Whether a `[[sources]]` path is a glob pattern rather than one file's path.
pub(crate) fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?', '['])
}

/// One open file.
struct Reader {
    life: Life,
    /// The path its messages carry (the last one it had).
    shown: Arc<Path>,
    file: File,
    key: FileKey,
    fingerprint: Fingerprint,
    /// Where the next read starts.
    offset: u64,
    /// The start of a line whose newline has not arrived yet.
    partial: Vec<u8>,
    /// In the middle of a line too long to keep.
    discarding: Discard,
    /// The last read failed (and was reported as a problem).
    read_failing: bool,
    /// Once stopping: the file's size when the stop came, where reading ends.
    stop_at: Option<u64>,
}

/// What a reader drops of a line too long to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Discard {
    Nothing,
    /// The bytes up to the next newline.
    ToNewline,
    /// The records up to the one that finishes the line ([`Records::finishing`]).
    ToLastRecord,
    /// The rest of one record, then the records up to the one that finishes its line.
    ToNewlineThenLastRecord,
}

/// In a feed of records, the most bytes kept for one line: twice `max_line_length` (a record's
/// wrapping and escaping take room; the joined line is measured against `max_line_length` when it
/// is parsed), and never less than what runtimes split lines at.
fn records_limit(max_line_length: usize) -> usize {
    max_line_length.saturating_mul(2).max(64 * 1024)
}

/// Whether a path still leads to a reader's file.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Life {
    /// The file is known by this path.
    Following { path: PathBuf },
    /// Rotated away or deleted at `since`: read on until the grace period is over, then closed.
    Orphaned { since: Instant },
}

impl Reader {
    /// Where the reader stands after `end_offset`.
    fn at(&self, end_offset: u64) -> FilePosition {
        FilePosition {
            key: self.key,
            fingerprint: self.fingerprint,
            offset: end_offset,
            path: self.shown.clone(),
        }
    }

    fn orphan(&mut self) {
        self.life = Life::Orphaned {
            since: Instant::now(),
        };
    }
}

struct Tail {
    feed: usize,
    pattern: String,
    options: TailOptions,
    readers: Vec<Reader>,
    /// The services this follower feeds.
    out: Vec<mpsc::Sender<Tailed>>,
    events: Arc<dyn TailEvents>,
    stop: Arc<AtomicBool>,
    /// Whether the first scan is done.
    started: bool,
}

/// Tells every service fed by the follower, after new settings if there are any; blocks while one
/// of them is behind (the file is the buffer). False when a service is gone.
fn send(
    out: &[mpsc::Sender<Tailed>],
    feed: usize,
    reconfigurations: &mut Option<Reconfigurations>,
    message: Tailed,
) -> bool {
    let tell = |message: Tailed| {
        out.iter()
            .all(|service| service.blocking_send(message.clone()).is_ok())
    };
    if let Some(changes) = reconfigurations {
        if changes.has_changed().unwrap_or(false) {
            if let Some(settings) = changes.borrow_and_update().clone() {
                if !tell(Tailed::Reconfigured { feed, settings }) {
                    return false;
                }
            }
        }
    }
    tell(message)
}

impl Tail {
    fn run(&mut self, mut watch: FolderWatch) {
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
            if self.options.once {
                return;
            }
            if self.stop.load(Ordering::SeqCst) {
                // A file created just before (a rotation) is read too, up to where it stands.
                self.scan();
                self.read_all();
                return;
            }
            // File events come with every write: they wait until the next pass is due, so a steady
            // stream costs a few passes a second, not one per write.
            if watch.pause(pass + MIN_PASS_INTERVAL) {
                continue; // woken to stop
            }
            let timeout = next_scan.saturating_duration_since(Instant::now());
            if watch.wait(timeout) == Change::Paths {
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
            let Life::Following { path } = &r.life else {
                continue;
            };
            if current.get(path).is_some_and(|(key, _)| *key == r.key) {
                current.remove(path);
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
                r.life = Life::Following { path: new_path };
            } else {
                self.events.rotated(path);
                r.orphan();
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
            self.open(path, key, start, None, false);
        }
        self.started = true;
    }

    /// At start-up: reopens the files of the checkpoints, under their path or, if they were rotated
    /// while tally was down, under their new name in the same folder.
    fn resume(&mut self, current: &mut HashMap<PathBuf, (FileKey, u64)>) {
        for c in std::mem::take(&mut self.options.checkpoints) {
            let Some((path, matched)) = locate(current, c.key, &c.path) else {
                self.events.gone(&c.path, c.offset);
                self.forget(c, true);
                continue;
            };
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) => {
                    self.events.open_failed(&path, &e);
                    continue;
                }
            };
            let same = Fingerprint::read(&file, c.fingerprint.len).ok() == Some(c.fingerprint);
            let offset = if same {
                c.offset
            } else {
                // Same identity, other first bytes: truncated and regrown, or the inode number reused
                // by a new file. Either way its content is new: read it from its start.
                self.events.replaced_while_stopped(&path);
                self.forget(c.clone(), false);
                0
            };
            if matched {
                current.remove(&path);
            }
            self.open(path, c.key, offset, Some(file), true);
            if !matched {
                // Rotated away while tally was down: finish it.
                if let Some(r) = self.readers.last_mut().filter(|r| r.key == c.key) {
                    r.orphan();
                }
            }
        }
    }

    /// Tells the pipeline that a checkpoint no longer applies.
    fn forget(&mut self, at: FilePosition, gone: bool) {
        send(
            &self.out,
            self.feed,
            &mut self.options.reconfigurations,
            Tailed::Forget {
                feed: self.feed,
                at,
                gone,
            },
        );
    }

    /// Opens a file and reads it from `offset` (`resumed`: a checkpoint's).
    fn open(
        &mut self,
        path: PathBuf,
        key: FileKey,
        offset: u64,
        file: Option<File>,
        resumed: bool,
    ) {
        let file = match file.map_or_else(|| File::open(&path), Ok) {
            // The path may have been replaced between the stat and the open.
            Ok(f) if f.metadata().is_ok_and(|m| FileKey::of(&m) == key) => f,
            Ok(_) => return, // the next scan sees the new file
            Err(e) => {
                self.events.open_failed(&path, &e);
                return;
            }
        };
        let shown: Arc<Path> = Arc::from(path.as_path());
        self.events
            .following(self.feed, key, &shown, offset, resumed);
        let fingerprint = Fingerprint::read(&file, Fingerprint::MAX).unwrap_or_default();
        // Started at a file's end (read_from = "end") while a line is being written: its start is
        // before tally's, so the rest of it is not a line of its own.
        let mid_line = offset > 0 && !resumed && {
            let mut last = [0u8];
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut last, offset - 1).is_ok()
                && last[0] != b'\n'
        };
        let reader = Reader {
            shown,
            life: Life::Following { path },
            file,
            key,
            fingerprint,
            offset,
            partial: Vec::new(),
            discarding: if mid_line {
                Discard::ToNewline
            } else {
                Discard::Nothing
            },
            read_failing: false,
            stop_at: None,
        };
        send(
            &self.out,
            self.feed,
            &mut self.options.reconfigurations,
            Tailed::Opened {
                feed: self.feed,
                at: reader.at(offset),
            },
        );
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
            events,
            options,
            stop,
            feed,
            ..
        } = self;
        let r = &mut readers[i];
        check_still_same(r, &**events);
        loop {
            if stop.load(Ordering::SeqCst) {
                // Stopping: the file is read up to where it stands now. A native sidecar stops
                // after the API's NGINX, so these are its last lines; what a writer adds after is
                // left for the next start.
                let end = *r
                    .stop_at
                    .get_or_insert_with(|| r.file.metadata().map_or(0, |m| m.len()));
                if r.offset >= end {
                    return true;
                }
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
                Ok(n) => {
                    if std::mem::take(&mut r.read_failing) {
                        events.read_failed(&r.shown, None);
                    }
                    n
                }
                Err(e) => {
                    data.truncate(kept);
                    r.partial = data;
                    r.read_failing = true;
                    events.read_failed(&r.shown, Some(&e));
                    return true;
                }
            };
            r.offset += n as u64;
            if r.fingerprint.len < Fingerprint::MAX {
                r.fingerprint =
                    Fingerprint::read(&r.file, Fingerprint::MAX).unwrap_or(r.fingerprint);
            }
            let mut from = kept;
            // What is left of a line too long to keep is dropped first.
            let mut waiting = false;
            while !waiting {
                match (r.discarding, &options.records) {
                    (Discard::Nothing, _) => break,
                    (Discard::ToNewline | Discard::ToNewlineThenLastRecord, _) => {
                        // While this drops, nothing is kept from before: the newline is new.
                        match memchr::memchr(b'\n', &data) {
                            Some(nl) => {
                                data.drain(..=nl);
                                from = 0;
                                r.discarding = match r.discarding {
                                    Discard::ToNewlineThenLastRecord => Discard::ToLastRecord,
                                    _ => Discard::Nothing,
                                };
                            }
                            None => {
                                data.clear();
                                waiting = true;
                            }
                        }
                    }
                    (Discard::ToLastRecord, Some(records)) => match records.finishing(&data) {
                        Some(end) => {
                            data.drain(..end);
                            from = 0;
                            r.discarding = Discard::Nothing;
                        }
                        None => {
                            // Whole records of the line are dropped; a record's start is kept.
                            let whole = memchr::memrchr(b'\n', &data).map_or(0, |nl| nl + 1);
                            data.drain(..whole);
                            if data.len() > records_limit(options.max_line_length) {
                                data.clear();
                                r.discarding = Discard::ToNewlineThenLastRecord;
                            }
                            waiting = true;
                        }
                    },
                    (Discard::ToLastRecord, None) => r.discarding = Discard::Nothing,
                }
            }
            if waiting {
                r.partial = data;
                continue;
            }
            // Where the chunk ends (what follows is kept for the next read), and, when a line is too
            // long to keep, where what is dropped from there ends.
            let (cut, dropped) = match &options.records {
                None => {
                    // Only the new bytes can hold a newline: the kept part had none.
                    let from = from.min(data.len());
                    let cut = memchr::memrchr(b'\n', &data[from..]).map_or(0, |i| from + i + 1);
                    if data.len() - cut > options.max_line_length {
                        events.line_too_long(&r.shown, options.max_line_length);
                        r.discarding = Discard::ToNewline;
                        (cut, Some(data.len()))
                    } else {
                        (cut, None)
                    }
                }
                Some(records) => {
                    let whole = memchr::memrchr(b'\n', &data).map_or(0, |nl| nl + 1);
                    let cut = records.complete(&data[..whole]);
                    let limit = records_limit(options.max_line_length);
                    let open = cut < whole;
                    let dropped = if whole - cut > limit {
                        // The records of the line under way, without its last, are too long.
                        events.line_too_long(&r.shown, options.max_line_length);
                        r.discarding = Discard::ToLastRecord;
                        Some(whole)
                    } else if data.len() - whole > limit {
                        // One record too long to keep, still without its newline: it belongs to
                        // the line under way, if there is one.
                        let start = records.start(&data[whole..]);
                        if open || start != RecordStart::OtherStream {
                            events.line_too_long(&r.shown, options.max_line_length);
                        }
                        r.discarding = if open || start == RecordStart::KeptPart {
                            Discard::ToNewlineThenLastRecord
                        } else {
                            Discard::ToNewline
                        };
                        Some(data.len())
                    } else {
                        None
                    };
                    (cut, dropped)
                }
            };
            // The file offset of an index of `data`.
            let offset_of = |i: usize| r.offset - (data.len() - i) as u64;
            let chunk_end = offset_of(cut);
            // What follows the chunk, less what is dropped (which starts where the chunk ends).
            r.partial = data[dropped.unwrap_or(cut)..].to_vec();
            data.truncate(cut);
            if data.is_empty() {
                continue;
            }
            let chunk = Chunk::new(*feed, r.at(chunk_end), data);
            events.read(*feed, r.key, &r.shown, r.offset);
            if !send(
                out,
                *feed,
                &mut options.reconfigurations,
                Tailed::Lines(Arc::new(chunk)),
            ) {
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
            let expired = match self.readers[i].life {
                Life::Orphaned { since } => once || since.elapsed() >= grace,
                Life::Following { .. } => false,
            };
            if !expired {
                i += 1;
                continue;
            }
            let mut r = self.readers.swap_remove(i);
            let mut data = std::mem::take(&mut r.partial);
            if !data.is_empty() && r.discarding == Discard::Nothing {
                // The file will not grow any more: its last line is complete.
                data.push(b'\n');
            } else {
                data.clear();
            }
            self.events.finished(&r.shown, r.offset);
            let chunk = Chunk::new(self.feed, r.at(r.offset), data);
            if !send(
                &self.out,
                self.feed,
                &mut self.options.reconfigurations,
                Tailed::Finished(Arc::new(chunk)),
            ) {
                return false;
            }
        }
        true
    }
}

/// Detects a file truncated (copytruncate) or whose first bytes changed under the same identity
/// (truncated and regrown between two looks, or an inode reused): it is read again from the start.
fn check_still_same(r: &mut Reader, events: &dyn TailEvents) {
    let Ok(m) = r.file.metadata() else { return };
    let shrunk = m.len() < r.offset;
    let replaced = !shrunk
        && r.fingerprint.len > 0
        && Fingerprint::read(&r.file, r.fingerprint.len).is_ok_and(|f| f != r.fingerprint);
    if shrunk || replaced {
        events.truncated(&r.shown, m.len(), r.offset);
        r.offset = 0;
        r.partial.clear();
        r.discarding = Discard::Nothing;
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
/// file-system actions (write, half-write, rotate, copytruncate, delete, a kill -9 and restart
/// from the checkpoints) run against the real reader on a temp folder, feeding two services through
/// the real aggregation and state, whose backends accept their batches independently (each one
/// may be far behind the other at a crash). Every line written must be counted exactly once by
/// each service.
#[cfg(test)]
mod model {
    use super::*;
    use crate::aggregate::{take_in, Aggregator, Application, Batch, Counted, ServiceLines};
    use crate::parse::Parser;
    use crate::parse::{CredentialMode, CredentialRule, LogFormat};
    use crate::state::{ServiceState, SourceId, StateDir};
    use crate::telemetry::Metrics;
    use proptest::prelude::*;
    use std::collections::VecDeque;
    use std::io::Write;

    #[derive(Debug, Clone)]
    enum Action {
        /// Append whole lines (and finish a half-written one first).
        Write(u8),
        /// Append the first half of a line.
        WriteHalf,
        /// Let the reader look (scan, read, retire) and the services take in what it read.
        Tick,
        /// rename + create: the writer writes some lines to the old file, then reopens. A file that
        /// the reader never saw cannot be followed once renamed, so one look comes first if needed.
        Rotate(u8),
        /// The reader catches up, then the file is truncated in place.
        CopyTruncate,
        /// The reader catches up, then the file is deleted and created again.
        Delete,
        /// The backend of service 0 or 1 accepts up to this many of its oldest batches.
        Accept(u8, u8),
        /// kill -9: what is not accepted is lost from memory; the next tick starts anew from the
        /// state.
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
            3 => (0u8..2, 1u8..4).prop_map(|(s, n)| Action::Accept(s, n)),
            1 => Just(Action::Restart),
        ]
    }

    const SERVICES: [&str; 2] = ["1", "2"];

    /// One service fed by the file: its aggregation, its batches sent but not accepted, its state.
    struct Service {
        lines: ServiceLines,
        aggregator: Aggregator,
        inbox: mpsc::Receiver<Tailed>,
        sent: VecDeque<(u64, Batch)>,
        seq: u64,
        state: ServiceState,
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
        running: Option<(Tail, Vec<Service>, StateDir)>,
        /// How many times each service counted each line.
        counted: [HashMap<u64, u32>; 2],
        pad: u64,
    }

    fn source(service_id: &str) -> SourceId {
        SourceId {
            service_id: service_id.into(),
            name: "access".into(),
        }
    }

    impl World {
        fn new() -> World {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("access.log");
            let writer = append(&path);
            World {
                dir,
                path,
                writer,
                next_id: 0,
                half: None,
                rotations: 0,
                current_seen: false,
                running: None,
                counted: [HashMap::new(), HashMap::new()],
                pad: 7,
            }
        }

        fn line(&mut self) -> String {
            // Lengths vary, so fingerprints cover partial and whole first lines.
            self.pad = (self.pad * 31 + 17) % 200;
            let line = format!(
                "1.2.3.4 - - [10/Oct/2026:13:55:36 +0000] \"GET /?user_key=id{} HTTP/1.1\" 200 1 \"-\" \"{}\"\n",
                self.next_id,
                "x".repeat(self.pad as usize)
            );
            self.next_id += 1;
            line
        }

        fn finish_half(&mut self) {
            if let Some(rest) = self.half.take() {
                self.writer.write_all(rest.as_bytes()).unwrap();
            }
        }

        /// Starts the reader and the services from the state, as `tally run` does.
        fn start(&mut self) -> (Tail, Vec<Service>, StateDir) {
            let state = StateDir::open(&self.dir.path().join("state"), false).unwrap();
            let sources: Vec<SourceId> = SERVICES.iter().map(|s| source(s)).collect();
            let pattern = self.path.to_string_lossy().into_owned();
            let with_ends: Vec<_> = sources.iter().map(|s| (s.clone(), false)).collect();
            let matching = matching_files(&pattern);
            let plan = state.resume(&with_ends, &matching, |c| {
                still_holds(&matching, c.key, c.fingerprint, &c.path)
            });
            state.start_sources(&sources).unwrap();
            let feeds = Arc::new(vec![sources]);
            let mut out = Vec::new();
            let services = SERVICES
                .iter()
                .zip(&plan.counted)
                .map(|(service_id, counted)| {
                    let (tx, inbox) = mpsc::channel(100_000);
                    out.push(tx);
                    let names = HashMap::from([(0, "access".to_string())]);
                    Service {
                        lines: ServiceLines {
                            service_id: service_id.to_string(),
                            parsers: vec![Some(Parser::new(
                                LogFormat::Combined,
                                CredentialRule::query(CredentialMode::Auto),
                            ))],
                            rules: Vec::new(),
                            routes: Vec::new(),
                            max_line_length: 64 * 1024,
                            flush_interval: Duration::from_secs(1),
                            counted: counted
                                .iter()
                                .map(|(&key, &up_to)| ((0, key), Counted { up_to, seen: 0 }))
                                .collect(),
                            panic_on: None,
                        },
                        // Small batches: splits inside chunks, several batches per tick.
                        aggregator: Aggregator::new(true, 3),
                        inbox,
                        sent: VecDeque::new(),
                        seq: 0,
                        state: state.service(service_id, names, feeds.clone()),
                    }
                })
                .collect();
            let options = TailOptions {
                start_at_end: plan.start_at_end,
                checkpoints: plan.checkpoints,
                poll_interval: Duration::from_secs(3600),
                watch: false,
                rotate_grace: Duration::ZERO,
                max_line_length: 64 * 1024,
                once: false,
                records: None,
                reconfigurations: None,
            };
            let tail = Tail {
                feed: 0,
                pattern,
                options,
                readers: Vec::new(),
                out,
                events: Arc::new(Metrics::default()),
                stop: Arc::new(AtomicBool::new(false)),
                started: false,
            };
            (tail, services, state)
        }

        fn tick(&mut self) {
            if self.running.is_none() {
                self.running = Some(self.start());
            }
            let (tail, services, _) = self.running.as_mut().unwrap();
            tail.scan();
            self.current_seen = true;
            assert!(tail.read_all() && tail.retire());
            let metrics = Metrics::default();
            for s in services {
                let mut warned = std::collections::HashSet::new();
                let mut batches = Vec::new();
                while let Ok(message) = s.inbox.try_recv() {
                    batches.extend(take_in(
                        &mut s.lines,
                        &mut s.aggregator,
                        &message,
                        &metrics,
                        &mut warned,
                    ));
                }
                batches.extend(s.aggregator.take());
                for batch in batches {
                    s.seq += 1;
                    s.state.begin(s.seq, &batch.advances, true).unwrap();
                    s.sent.push_back((s.seq, batch));
                }
            }
        }

        /// Service `which`'s backend accepts its `n` oldest batches.
        fn accept(&mut self, which: usize, n: u8) {
            let Some((_, services, _)) = self.running.as_mut() else {
                return;
            };
            let s = &mut services[which];
            for _ in 0..n {
                let Some((seq, batch)) = s.sent.pop_front() else {
                    return;
                };
                for (application, _) in batch.transactions.iter() {
                    let Application::UserKey(key) = application else {
                        panic!("{application:?}")
                    };
                    let id = key.strip_prefix("id").unwrap().parse().unwrap();
                    *self.counted[which].entry(id).or_default() += 1;
                }
                s.state.commit(seq, &batch.advances).unwrap();
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
                // What a truncation or a deletion takes away is only safe once accepted by
                // both: no reader can do better.
                Action::CopyTruncate => {
                    self.catch_up();
                    self.writer.set_len(0).unwrap();
                }
                Action::Delete => {
                    self.catch_up();
                    std::fs::remove_file(&self.path).unwrap();
                    self.writer = append(&self.path);
                    self.current_seen = false;
                }
                Action::Accept(which, n) => self.accept(which as usize, n),
                Action::Restart => self.running = None,
            }
        }

        /// Everything is read and accepted.
        fn catch_up(&mut self) {
            self.finish_half();
            self.tick();
            self.tick(); // a file rotated at the first look is finished at the second
            for which in 0..2 {
                self.accept(which, u8::MAX);
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
        fn every_line_is_counted_exactly_once_by_each_service(actions in proptest::collection::vec(action(), 1..40)) {
            let mut world = World::new();
            for a in &actions {
                world.apply(a);
            }
            world.catch_up();
            for (which, counted) in world.counted.iter().enumerate() {
                let wrong: Vec<_> = counted.iter().filter(|(_, &n)| n != 1).collect();
                prop_assert!(wrong.is_empty(), "service {}: lines counted more than once: {:?}", which, wrong);
                let missing: Vec<u64> = (0..world.next_id).filter(|id| !counted.contains_key(id)).collect();
                prop_assert!(missing.is_empty(), "service {}: lines lost: {:?}", which, missing);
            }
        }
    }
}

#[cfg(test)]
mod container_records {
    use super::*;
    use crate::parse::{Container, Stream, Wrapper};
    use crate::telemetry::Metrics;
    use std::io::Write;

    const CRI: Container = Container {
        wrapper: Wrapper::Cri,
        stream: Stream::Stdout,
    };

    fn record(stream: &str, tag: &str, message: &str) -> String {
        format!("2026-11-26T10:15:00.1Z {stream} {tag} {message}\n")
    }

    /// A follower of `path` with CRI records and `max` as max_line_length; its chunks' lines are
    /// unwrapped into what the format would read.
    struct Fixture {
        tail: Tail,
        inbox: mpsc::Receiver<Tailed>,
        metrics: Arc<Metrics>,
        unwrapper: crate::parse::Unwrapper,
        lines: Vec<Result<String, crate::parse::Skip>>,
    }

    impl Fixture {
        fn new(path: &Path, max: usize) -> Fixture {
            let (tx, inbox) = mpsc::channel(1000);
            let metrics = Arc::new(Metrics::default());
            let options = TailOptions {
                start_at_end: false,
                checkpoints: Vec::new(),
                poll_interval: Duration::from_secs(3600),
                watch: false,
                rotate_grace: Duration::ZERO,
                max_line_length: max,
                once: false,
                records: Some(Arc::new(CRI)),
                reconfigurations: None,
            };
            let tail = Tail {
                feed: 0,
                pattern: path.to_string_lossy().into_owned(),
                options,
                readers: Vec::new(),
                out: vec![tx],
                events: metrics.clone(),
                stop: Arc::new(AtomicBool::new(false)),
                started: false,
            };
            Fixture {
                tail,
                inbox,
                metrics,
                unwrapper: crate::parse::Unwrapper::new(CRI, max),
                lines: Vec::new(),
            }
        }

        fn tick(&mut self) {
            self.tail.scan();
            assert!(self.tail.read_all());
            while let Ok(message) = self.inbox.try_recv() {
                if let Tailed::Lines(chunk) = message {
                    for (line, _) in chunk.lines() {
                        match self.unwrapper.line(line) {
                            Ok(Some(l)) => {
                                self.lines.push(Ok(String::from_utf8_lossy(l).into_owned()))
                            }
                            Ok(None) => {}
                            Err(e) => self.lines.push(Err(e)),
                        }
                    }
                }
            }
        }
    }

    /// A long record of the *other* stream (or a malformed one), read while it is still being
    /// written, puts the reader in ToLastRecord: it then drops the next complete line of the kept
    /// stream, which had nothing to do with it.
    #[test]
    fn a_long_stderr_record_does_not_drop_the_next_stdout_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let mut file = File::create(&path).unwrap();
        let mut f = Fixture::new(&path, 100);
        let long = record("stderr", "F", &"e".repeat(150));
        file.write_all(record("stdout", "F", "one").as_bytes())
            .unwrap();
        file.write_all(&long.as_bytes()[..120]).unwrap();
        f.tick();
        file.write_all(&long.as_bytes()[120..]).unwrap();
        file.write_all(record("stdout", "F", "two").as_bytes())
            .unwrap();
        file.write_all(record("stdout", "F", "three").as_bytes())
            .unwrap();
        f.tick();
        assert_eq!(
            f.lines,
            vec![Ok("one".into()), Ok("two".into()), Ok("three".into())]
        );
    }

    /// The same with a stderr record past what the reader keeps: dropped as it comes, not counted
    /// (it is not the source's), and the kept stream's lines around it are read.
    #[test]
    fn a_stderr_record_past_what_the_reader_keeps_is_dropped_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let mut file = File::create(&path).unwrap();
        let mut f = Fixture::new(&path, 100);
        let long = record("stderr", "F", &"e".repeat(100_000));
        file.write_all(record("stdout", "F", "one").as_bytes())
            .unwrap();
        file.write_all(&long.as_bytes()[..70_000]).unwrap();
        f.tick();
        file.write_all(&long.as_bytes()[70_000..]).unwrap();
        file.write_all(record("stdout", "F", "two").as_bytes())
            .unwrap();
        f.tick();
        assert_eq!(f.lines, vec![Ok("one".into()), Ok("two".into())]);
        assert_eq!(f.metrics.skips(crate::parse::Skip::TooLong), 0);
    }

    /// A line whose parts pass max_line_length once joined is one `too_long`, whatever the reads:
    /// its last part never comes out as a line of its own.
    #[test]
    fn a_too_long_split_line_does_not_leave_its_last_part_as_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let mut file = File::create(&path).unwrap();
        let mut f = Fixture::new(&path, 200);
        file.write_all(record("stdout", "P", &"a".repeat(80)).as_bytes())
            .unwrap();
        file.write_all(record("stdout", "P", &"b".repeat(80)).as_bytes())
            .unwrap();
        f.tick();
        let third = record("stdout", "P", &"c".repeat(80));
        file.write_all(&third.as_bytes()[..60]).unwrap();
        f.tick();
        file.write_all(&third.as_bytes()[60..]).unwrap();
        file.write_all(record("stdout", "F", "the end of the long line").as_bytes())
            .unwrap();
        file.write_all(record("stdout", "F", "next").as_bytes())
            .unwrap();
        f.tick();
        assert_eq!(
            f.lines,
            vec![Err(crate::parse::Skip::TooLong), Ok("next".into())]
        );
    }

    /// Past what the reader keeps for one line (twice max_line_length, at least 64 KiB), the
    /// line's records are dropped as they come, up to its last: one `too_long`, then the next line.
    #[test]
    fn a_line_past_what_the_reader_keeps_is_dropped_up_to_its_last_record() {
        for split_last_record in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("c.log");
            let mut file = File::create(&path).unwrap();
            let mut f = Fixture::new(&path, 200);
            for _ in 0..4 {
                file.write_all(record("stdout", "P", &"p".repeat(20_000)).as_bytes())
                    .unwrap();
                file.write_all(record("stderr", "F", "noise").as_bytes())
                    .unwrap();
                f.tick();
            }
            let last = record("stdout", "F", "the end");
            if split_last_record {
                file.write_all(&last.as_bytes()[..10]).unwrap();
                f.tick();
                file.write_all(&last.as_bytes()[10..]).unwrap();
            } else {
                file.write_all(last.as_bytes()).unwrap();
            }
            file.write_all(record("stdout", "F", "next").as_bytes())
                .unwrap();
            f.tick();
            assert_eq!(
                f.lines,
                vec![Ok("next".into())],
                "split: {split_last_record}"
            );
            let too_long = f.metrics.skips(crate::parse::Skip::TooLong);
            assert_eq!(too_long, 1, "one too_long, split: {split_last_record}");
        }
    }
}
