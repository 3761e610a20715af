//! What tally must remember across restarts: per `[[sources]]` entry and file, the offset just past
//! the last line whose report 3scale accepted (or that needed no report), and the report calls in
//! flight.
//!
//! One file can feed several services (two `[[sources]]` entries with one path; later, Host
//! routing). Each service keeps its own checkpoint of the file, moved on as its batches are accepted;
//! the file's *watermark*, where its follower resumes, is the lowest of them, and a service that is
//! further on skips what it already counted.
//!
//! One state file, `tally.state` in `[state] dir`, rewritten whole (temp file, rename) before each
//! report call (marking it in flight) and after each acceptance. The rename makes each write atomic
//! for a process crash or kill -9; an fsync of the file and the folder, at most once a second, makes
//! it durable against a power loss. A lock file keeps a second tally off the folder. The state files
//! of earlier versions (one per service) are read once and replaced.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::identity::{FileKey, FilePosition, Fingerprint};

const HEADER: &str = "tally-state 2";
/// The per-service files of tally before 0.2 (`service-<id>.state`), migrated at the first start.
const HEADER_V1: &str = "tally-state 1";
const FILE_NAME: &str = "tally.state";
/// How often the state is made durable against a power loss (a crash loses nothing written).
const SYNC_EVERY: Duration = Duration::from_secs(1);

/// The state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StateError {
    // The OS error is part of the message and deliberately not a `source`: an error chain printed
    // whole (`{:#}`) would show it twice.
    /// A file-system operation failed.
    #[error("state folder {dir}: {message}: {error}")]
    Io {
        dir: PathBuf,
        message: String,
        error: std::io::Error,
    },
    /// Another process holds the lock.
    #[error("state folder {0}: another tally is using it (a second tally would report the same lines twice)")]
    Locked(PathBuf),
    /// The state file cannot be understood.
    #[error(
        "state file {path} is corrupt ({reason}); tally will not guess where to resume. Move the file \
         away to start over: its sources are then read again according to read_from"
    )]
    Corrupt { path: PathBuf, reason: String },
}

/// A `[[sources]]` entry as the state knows it: its service and its name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct SourceId {
    pub service_id: String,
    pub name: String,
}

/// Where one source stands in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileCheckpoint {
    pub key: FileKey,
    pub fingerprint: Fingerprint,
    /// Just past the last line accounted for.
    pub offset: u64,
    /// The log time of the last reported line (for the lag), or 0.
    pub line_time: i64,
    /// The path it was last read under.
    pub path: PathBuf,
    /// The file was rotated away or deleted and this source has read it to its end; the checkpoint
    /// stays until every source of the file is done with it.
    pub finished: bool,
}

/// What becomes of a file's checkpoint when a batch is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Still read: the checkpoint moves on.
    Reading,
    /// Read to its end after a rotation or deletion.
    Finished,
    /// Gone, or replaced under the same identity: what the checkpoint says no longer applies.
    Forgotten,
}

/// How far a batch takes one file: its checkpoint once the batch is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advance {
    /// The follower (`[[sources]]` path) that read the file.
    pub feed: usize,
    pub key: FileKey,
    pub fingerprint: Fingerprint,
    /// Where the batch's data of this file starts.
    pub from: u64,
    pub offset: u64,
    /// The log time of the last line parsed up to `offset`, or 0 if unknown.
    pub line_time: i64,
    pub path: Arc<Path>,
    pub fate: Fate,
    /// The batch holds the file's opening: the file may be new under an identity that an earlier
    /// batch, not yet accepted, finishes or forgets (an inode number reused).
    pub opened: bool,
}

/// A report call that was under way when tally stopped: its lines are read and sent again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InFlight {
    pub path: PathBuf,
    pub from: u64,
    pub to: u64,
}

/// Where a follower resumes and what each service it feeds has counted already.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Resume {
    /// Where the follower reads from, in the files read before: the lowest offset any of its
    /// sources needs.
    pub checkpoints: Vec<FilePosition>,
    /// Start at the end of the files found at start-up (no source of the path was read before and
    /// all of them read from the end).
    pub start_at_end: bool,
    /// Per source of the feed (in the order given): the offset up to which it has counted a file
    /// already, where that is past where the follower resumes.
    pub counted: Vec<HashMap<FileKey, u64>>,
}

/// The state folder, locked for this process, and its state.
pub(crate) struct StateDir {
    store: Arc<Mutex<Store>>,
    _lock: Option<File>,
}

impl StateDir {
    /// Opens (creating it) and locks the folder, and reads the state. Read-only (`--dry-run`)
    /// neither creates nor locks nor writes.
    pub(crate) fn open(dir: &Path, read_only: bool) -> Result<StateDir, StateError> {
        let io = |message: &str| {
            let message = message.to_string();
            move |error| StateError::Io {
                dir: dir.to_path_buf(),
                message,
                error,
            }
        };
        let lock = if read_only {
            None
        } else {
            std::fs::create_dir_all(dir).map_err(io("cannot create it"))?;
            let lock = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join("lock"))
                .map_err(io("cannot open its lock file"))?;
            match lock.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(StateError::Locked(dir.to_path_buf()))
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io("cannot lock it")(e)),
            }
            Some(lock)
        };
        let store = Store::load(dir, read_only)?;
        Ok(StateDir {
            store: Arc::new(Mutex::new(store)),
            _lock: lock,
        })
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    /// Whether the source was read in an earlier run.
    #[cfg(test)]
    fn knows_source(&self, source: &SourceId) -> bool {
        self.store().sources.contains(source)
    }

    /// A source that was known by its path and is now given a name keeps its checkpoints: they
    /// move to the name (written at the next change).
    pub(crate) fn adopt(&self, source: &SourceId, path: &str) {
        let old = SourceId {
            service_id: source.service_id.clone(),
            name: path.to_string(),
        };
        let mut store = self.store();
        if source.name == path || store.sources.contains(source) || !store.sources.remove(&old) {
            return;
        }
        store.sources.insert(source.clone());
        let moved: Vec<FileKey> = store
            .files
            .keys()
            .filter(|(s, _)| *s == old)
            .map(|(_, key)| *key)
            .collect();
        for key in moved {
            if let Some(c) = store.files.remove(&(old.clone(), key)) {
                store.files.insert((source.clone(), key), c);
            }
        }
    }

    /// Plans where the follower of one path resumes, given the sources it feeds (with whether each
    /// reads a new file from its end), the files the path names now (`matching`: path → identity
    /// and size) and whether a checkpoint's file still holds what it held (`holds`: None if gone).
    ///
    /// A checkpoint whose file was replaced since (its first bytes changed) no longer applies: its
    /// source reads the file's new content from the start.
    pub(crate) fn resume(
        &self,
        sources: &[(SourceId, bool)],
        matching: &HashMap<PathBuf, (FileKey, u64)>,
        holds: impl Fn(&FileCheckpoint) -> Option<bool>,
    ) -> Resume {
        let mut store = self.store();
        let size_now = |key: FileKey| matching.values().find(|(k, _)| *k == key).map(|(_, l)| *l);
        // Where a source with no checkpoint of a file starts in it: a new source that reads from
        // the end starts at the end of what is there now (a file rotated away: nothing of it).
        let start = |s: &SourceId, from_end: bool, key: FileKey| match from_end
            && !store.sources.contains(s)
        {
            true => size_now(key).unwrap_or(u64::MAX),
            false => 0,
        };
        let recorded: BTreeSet<FileKey> = store
            .files
            .keys()
            .filter(|(s, _)| sources.iter().any(|(source, _)| source == s))
            .map(|(_, key)| *key)
            .collect();
        let mut plan = Resume {
            counted: vec![HashMap::new(); sources.len()],
            ..Resume::default()
        };
        let mut starts = Vec::new();
        for &key in &recorded {
            let records: Vec<Option<&FileCheckpoint>> = sources
                .iter()
                .map(|(s, _)| store.files.get(&(s.clone(), key)))
                .collect();
            // A file finished is rotated away or deleted: under the path again, it is a new file
            // that got its inode number.
            let under_path = matching.values().any(|(k, _)| *k == key);
            let stale: Vec<bool> = records
                .iter()
                .map(|c| c.is_some_and(|c| (c.finished && under_path) || holds(c) == Some(false)))
                .collect();
            let wanted: Vec<u64> = sources
                .iter()
                .zip(&records)
                .zip(&stale)
                .map(|(((s, from_end), c), &stale)| match c {
                    Some(_) if stale => 0,
                    Some(c) if c.finished => u64::MAX,
                    Some(c) => c.offset,
                    None => start(s, *from_end, key),
                })
                .collect();
            let lowest = wanted.iter().copied().min().unwrap_or(u64::MAX);
            // The checkpoint the follower checks the file against: the live one furthest behind;
            // if the file holds something else now, any (the follower forgets it and reads the
            // file from its start).
            let live = records
                .iter()
                .zip(&stale)
                .filter_map(|(c, &stale)| c.filter(|c| !c.finished && !stale));
            let behind = live.min_by_key(|c| c.offset).or_else(|| {
                records
                    .iter()
                    .zip(&stale)
                    .find_map(|(c, &stale)| c.filter(|_| stale))
            });
            let Some(behind) = behind.cloned() else {
                continue; // every source is done with it
            };
            plan.checkpoints.push(FilePosition {
                key,
                fingerprint: behind.fingerprint,
                offset: lowest,
                path: Arc::from(behind.path.as_path()),
            });
            for (i, (s, _)) in sources.iter().enumerate() {
                if wanted[i] > lowest {
                    plan.counted[i].insert(key, wanted[i]);
                }
                if !store.files.contains_key(&(s.clone(), key)) {
                    starts.push((s.clone(), key, wanted[i]));
                }
            }
        }
        // Files never read: the follower starts at their end only if every source wants that.
        plan.start_at_end = sources
            .iter()
            .all(|(s, from_end)| *from_end && !store.sources.contains(s));
        for (key, len) in matching.values() {
            if recorded.contains(key) || plan.start_at_end {
                continue;
            }
            for (i, (s, from_end)) in sources.iter().enumerate() {
                if *from_end && !store.sources.contains(s) && *len > 0 {
                    plan.counted[i].insert(*key, *len);
                    starts.push((s.clone(), *key, *len));
                }
            }
        }
        for (s, key, offset) in starts {
            store.starts.insert((s, key), offset);
        }
        plan
    }

    /// Records that these sources are being read, so read_from never applies to them again.
    pub(crate) fn start_sources(&self, sources: &[SourceId]) -> Result<(), StateError> {
        let mut store = self.store();
        let before = store.sources.len();
        store.sources.extend(sources.iter().cloned());
        if store.sources.len() != before {
            store.write()?;
        }
        Ok(())
    }

    /// The report calls under way when tally last stopped, by service.
    pub(crate) fn in_flight(&self, service_id: &str) -> Vec<InFlight> {
        self.store()
            .in_flight
            .range((service_id.to_string(), 0)..=(service_id.to_string(), u64::MAX))
            .flat_map(|(_, ranges)| ranges.clone())
            .collect()
    }

    /// One service's handle on the state. `sources`: the name of its source on each feed (follower)
    /// that feeds it; `feeds`: every source of each feed, across services.
    pub(crate) fn service(
        &self,
        service_id: &str,
        sources: HashMap<usize, String>,
        feeds: Arc<Vec<Vec<SourceId>>>,
    ) -> ServiceState {
        ServiceState {
            service_id: service_id.to_string(),
            sources,
            feeds,
            store: self.store.clone(),
            reopened: HashMap::new(),
        }
    }
}

fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    // A panic while holding the lock leaves a store whose every write is whole: keep using it.
    store
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One service's view of the state: its checkpoints and its report calls.
pub(crate) struct ServiceState {
    service_id: String,
    /// Its source on each feed.
    sources: HashMap<usize, String>,
    /// Every source of each feed.
    feeds: Arc<Vec<Vec<SourceId>>>,
    store: Arc<Mutex<Store>>,
    /// Files opened by a batch under way, by feed and identity: that batch's number and where it
    /// starts in them. An earlier batch that finishes or forgets the same identity (a file deleted,
    /// its inode number reused) leaves this checkpoint instead of its own when it is accepted.
    reopened: HashMap<(usize, FileKey), (u64, FileCheckpoint)>,
}

impl ServiceState {
    fn source(&self, feed: usize) -> SourceId {
        SourceId {
            service_id: self.service_id.clone(),
            name: self.sources.get(&feed).cloned().unwrap_or_default(),
        }
    }

    /// Records what must hold before anything of batch `seq` is sent: a file of which nothing has
    /// been accepted yet gets a checkpoint at the batch's start in it, for every source it feeds, so
    /// that a crash before its first acceptance reads it again (even rotated away meanwhile: it is
    /// found by its identity); and, when `sending`, the call as under way with the byte ranges it
    /// covers.
    pub(crate) fn begin(
        &mut self,
        seq: u64,
        advances: &[Advance],
        sending: bool,
    ) -> Result<(), StateError> {
        let mut store = lock(&self.store);
        let mut changed = false;
        for a in advances.iter().filter(|a| a.fate == Fate::Reading) {
            if a.opened {
                self.reopened
                    .insert((a.feed, a.key), (seq, FileCheckpoint::at(a, a.from)));
            }
            let me = self.source(a.feed);
            if store
                .files
                .get(&(me.clone(), a.key))
                .is_some_and(|c| !c.finished)
            {
                continue;
            }
            let others = self.feeds.get(a.feed).into_iter().flatten();
            for s in others.filter(|s| **s != me) {
                if !store.files.contains_key(&(s.clone(), a.key)) {
                    let start = store.starts.get(&(s.clone(), a.key)).copied().unwrap_or(0);
                    store
                        .files
                        .insert((s.clone(), a.key), FileCheckpoint::at(a, a.from.max(start)));
                }
            }
            store
                .files
                .insert((me, a.key), FileCheckpoint::at(a, a.from));
            changed = true;
        }
        if sending {
            let ranges = advances
                .iter()
                .map(|a| InFlight {
                    path: a.path.to_path_buf(),
                    from: a.from,
                    to: a.offset,
                })
                .collect();
            store
                .in_flight
                .insert((self.service_id.clone(), seq), ranges);
            changed = true;
        }
        if changed {
            store.write()
        } else {
            Ok(())
        }
    }

    /// The byte ranges of report call `seq`, recorded by [`ServiceState::begin`].
    pub(crate) fn call_ranges(&self, seq: u64) -> Vec<InFlight> {
        lock(&self.store)
            .in_flight
            .get(&(self.service_id.clone(), seq))
            .cloned()
            .unwrap_or_default()
    }

    /// Batch `seq`, and every batch before it, is accepted (or had nothing to send): move this
    /// service's checkpoints on.
    pub(crate) fn commit(&mut self, seq: u64, advances: &[Advance]) -> Result<(), StateError> {
        let mut store = lock(&self.store);
        for a in advances {
            let me = self.source(a.feed);
            let key = (me, a.key);
            let reopened = match self.reopened.get(&(a.feed, a.key)) {
                Some((later, c)) if *later > seq => Some(c.clone()),
                Some(_) => {
                    self.reopened.remove(&(a.feed, a.key));
                    None
                }
                None => None,
            };
            match (a.fate, reopened) {
                // A later batch opened a new file under this identity: it stands there.
                (Fate::Forgotten | Fate::Finished, Some(c)) => {
                    store.files.insert(key, c);
                }
                (Fate::Forgotten, None) => {
                    store.files.remove(&key);
                }
                (Fate::Reading | Fate::Finished, _) => {
                    let line_time = match (a.line_time, store.files.get(&key)) {
                        (0, Some(old)) => old.line_time,
                        (t, _) => t,
                    };
                    let checkpoint = FileCheckpoint {
                        line_time,
                        finished: a.fate == Fate::Finished,
                        ..FileCheckpoint::at(a, a.offset)
                    };
                    store.files.insert(key, checkpoint);
                }
            }
            // Once every source of the file is done with it, it is forgotten.
            let sources = self.feeds.get(a.feed).map_or(&[][..], Vec::as_slice);
            let done = sources.iter().all(|s| {
                store
                    .files
                    .get(&(s.clone(), a.key))
                    .is_none_or(|c| c.finished)
            });
            if done {
                for s in sources {
                    store.files.remove(&(s.clone(), a.key));
                }
            }
        }
        store.in_flight.remove(&(self.service_id.clone(), seq));
        // What was under way when tally last stopped is settled by the first commit.
        store.in_flight.remove(&(self.service_id.clone(), 0));
        store.write()
    }

    /// Where a file stands for every source it feeds: the lowest live checkpoint (offset, line
    /// time), or None once the file is forgotten.
    pub(crate) fn watermark(&self, feed: usize, key: FileKey) -> Option<(u64, i64)> {
        let store = lock(&self.store);
        self.feeds
            .get(feed)?
            .iter()
            .filter_map(|s| store.files.get(&(s.clone(), key)))
            .filter(|c| !c.finished)
            .map(|c| (c.offset, c.line_time))
            .min()
    }
}

impl FileCheckpoint {
    fn at(a: &Advance, offset: u64) -> FileCheckpoint {
        FileCheckpoint {
            key: a.key,
            fingerprint: a.fingerprint,
            offset,
            line_time: 0,
            path: a.path.to_path_buf(),
            finished: false,
        }
    }
}

/// Everything the state file holds.
struct Store {
    dir: PathBuf,
    read_only: bool,
    /// Sources read before: read_from no longer applies to them.
    sources: BTreeSet<SourceId>,
    files: BTreeMap<(SourceId, FileKey), FileCheckpoint>,
    /// The report calls under way, by service and batch number (those of an earlier run under 0).
    in_flight: BTreeMap<(String, u64), Vec<InFlight>>,
    /// Where a source with no checkpoint of a file starts, if not at 0 (planned at start-up).
    starts: HashMap<(SourceId, FileKey), u64>,
    last_sync: Option<Instant>,
}

impl Store {
    fn empty(dir: &Path, read_only: bool) -> Store {
        Store {
            dir: dir.to_path_buf(),
            read_only,
            sources: BTreeSet::new(),
            files: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            starts: HashMap::new(),
            last_sync: None,
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    fn temp_path(&self) -> PathBuf {
        self.dir.join(format!("{FILE_NAME}.tmp"))
    }

    /// Reads `tally.state`, or, without one, the state files of earlier versions (then writes the
    /// new one and removes them).
    fn load(dir: &Path, read_only: bool) -> Result<Store, StateError> {
        let mut store = Store::empty(dir, read_only);
        let path = store.path();
        if let Some(text) = read_text(dir, &path)? {
            store.parse(&text).map_err(corrupt(&path))?;
        } else {
            let old = store.migrate()?;
            if !old.is_empty() && !read_only {
                store.write()?;
                for path in old {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        // A temp file is what a crash during a write leaves: the state file itself is intact.
        if !read_only {
            let _ = std::fs::remove_file(store.temp_path());
        }
        Ok(store)
    }

    /// Reads every `service-<id>.state` of tally before 0.2; returns their paths.
    fn migrate(&mut self) -> Result<Vec<PathBuf>, StateError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(StateError::Io {
                    dir: self.dir.clone(),
                    message: "cannot list it".into(),
                    error: e,
                })
            }
        };
        let mut migrated = Vec::new();
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            let Some(service_id) = name
                .to_str()
                .and_then(|n| n.strip_prefix("service-")?.strip_suffix(".state"))
                .and_then(unescape)
            else {
                continue;
            };
            let path = entry.path();
            if let Some(text) = read_text(&self.dir, &path)? {
                self.parse_v1(&service_id, &text).map_err(corrupt(&path))?;
                migrated.push(path);
            }
        }
        if !migrated.is_empty() {
            tracing::info!(dir = %crate::telemetry::shown_path(&self.dir), files = migrated.len(),
                "state of an earlier tally version found: it is carried over into tally.state");
        }
        Ok(migrated)
    }

    fn write(&mut self) -> Result<(), StateError> {
        if self.read_only {
            return Ok(());
        }
        let text = self.render();
        let temp = self.temp_path();
        let sync = self.last_sync.is_none_or(|t| t.elapsed() >= SYNC_EVERY);
        let io = |message: &str, error| StateError::Io {
            dir: self.dir.clone(),
            message: message.to_string(),
            error,
        };
        let mut file = File::create(&temp).map_err(|e| io("cannot write its temp file", e))?;
        file.write_all(text.as_bytes())
            .map_err(|e| io("cannot write its temp file", e))?;
        if sync {
            file.sync_data()
                .map_err(|e| io("cannot sync its temp file", e))?;
        }
        drop(file);
        std::fs::rename(&temp, self.path()).map_err(|e| io("cannot replace the state file", e))?;
        if sync {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io("cannot sync the folder", e))?;
            self.last_sync = Some(Instant::now());
        }
        Ok(())
    }

    /// The file format: a header, one line per known source, checkpoint and in-flight range, each
    /// field escaped, and a final line with the length of what precedes it, which catches a
    /// truncated file.
    fn render(&self) -> String {
        let mut out = format!("{HEADER}\n");
        for s in &self.sources {
            let _ = writeln!(out, "source {} {}", escape(&s.service_id), escape(&s.name));
        }
        for ((s, _), c) in &self.files {
            let _ = writeln!(
                out,
                "file {} {} {} {} {} {} {} {} {} {}",
                escape(&s.service_id),
                escape(&s.name),
                c.key.dev,
                c.key.ino,
                c.fingerprint.len,
                c.fingerprint.hash,
                c.offset,
                c.line_time,
                if c.finished { "finished" } else { "reading" },
                escape(&c.path.to_string_lossy())
            );
        }
        for ((service_id, _), ranges) in &self.in_flight {
            for f in ranges {
                let _ = writeln!(
                    out,
                    "in_flight {} {} {} {}",
                    escape(service_id),
                    f.from,
                    f.to,
                    escape(&f.path.to_string_lossy())
                );
            }
        }
        let len = out.len();
        let _ = writeln!(out, "end {len}");
        out
    }

    fn parse(&mut self, text: &str) -> Result<(), String> {
        for (n, fields) in records(text, HEADER)? {
            let record = Record { n, fields: &fields };
            match fields[0] {
                "source" if fields.len() == 3 => {
                    self.sources.insert(record.source(1)?);
                }
                "file" if fields.len() == 11 => {
                    let finished = match fields[9] {
                        "finished" => true,
                        "reading" => false,
                        _ => return Err(record.bad()),
                    };
                    let c = FileCheckpoint {
                        finished,
                        ..record.checkpoint(3, 10)?
                    };
                    self.files.insert((record.source(1)?, c.key), c);
                }
                "in_flight" if fields.len() == 5 => {
                    let service_id = record.text(1)?;
                    self.in_flight
                        .entry((service_id, 0))
                        .or_default()
                        .push(record.in_flight(2)?)
                }
                _ => return Err(record.bad()),
            }
        }
        Ok(())
    }

    /// The format of tally before 0.2: one file per service, sources by name.
    fn parse_v1(&mut self, service_id: &str, text: &str) -> Result<(), String> {
        let source = |name: String| SourceId {
            service_id: service_id.to_string(),
            name,
        };
        for (n, fields) in records(text, HEADER_V1)? {
            let record = Record { n, fields: &fields };
            match fields[0] {
                "source" if fields.len() == 2 => {
                    self.sources.insert(source(record.text(1)?));
                }
                "file" if fields.len() == 9 => {
                    let c = record.checkpoint(2, 8)?;
                    self.files.insert((source(record.text(1)?), c.key), c);
                }
                "in_flight" if fields.len() == 4 => self
                    .in_flight
                    .entry((service_id.to_string(), 0))
                    .or_default()
                    .push(record.in_flight(1)?),
                _ => return Err(record.bad()),
            }
        }
        Ok(())
    }
}

/// The text of a state file, None if there is none.
fn read_text(dir: &Path, path: &Path) -> Result<Option<String>, StateError> {
    match std::fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| "it is not text (invalid UTF-8)".to_string())
            .map_err(corrupt(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StateError::Io {
            dir: dir.to_path_buf(),
            message: format!("cannot read {}", path.display()),
            error: e,
        }),
    }
}

fn corrupt(path: &Path) -> impl Fn(String) -> StateError + '_ {
    move |reason| StateError::Corrupt {
        path: path.to_path_buf(),
        // It quotes the file's lines, which may hold anything.
        reason: crate::telemetry::printable(&reason).into_owned(),
    }
}

/// The records of a state file with header `header`, each split into its fields, with its line
/// number; checks the `end` line first.
fn records<'a>(text: &'a str, header: &str) -> Result<Vec<(usize, Vec<&'a str>)>, String> {
    let body_len = text
        .trim_end_matches('\n')
        .rfind('\n')
        .map(|i| i + 1)
        .ok_or("no end line")?;
    let end = text[body_len..].trim_end();
    if end != format!("end {body_len}") {
        return Err(format!(
            "it ends with `{end}` instead of `end {body_len}`: truncated?"
        ));
    }
    let mut lines = text[..body_len].lines();
    if lines.next() != Some(header) {
        return Err(format!("the first line is not `{header}`"));
    }
    Ok(lines
        .enumerate()
        .map(|(n, line)| (n + 2, line.split(' ').collect()))
        .collect())
}

/// One line of a state file, read field by field.
struct Record<'a> {
    n: usize,
    fields: &'a [&'a str],
}

impl Record<'_> {
    fn bad(&self) -> String {
        format!("line {}: `{}`", self.n, self.fields.join(" "))
    }

    fn number(&self, i: usize) -> Result<u64, String> {
        self.fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| self.bad())
    }

    fn text(&self, i: usize) -> Result<String, String> {
        self.fields
            .get(i)
            .and_then(|f| unescape(f))
            .ok_or_else(|| self.bad())
    }

    fn source(&self, i: usize) -> Result<SourceId, String> {
        Ok(SourceId {
            service_id: self.text(i)?,
            name: self.text(i + 1)?,
        })
    }

    /// `dev ino fingerprint_len fingerprint_hash offset line_time` from field `i`, the path at
    /// field `path`.
    fn checkpoint(&self, i: usize, path: usize) -> Result<FileCheckpoint, String> {
        Ok(FileCheckpoint {
            key: FileKey {
                dev: self.number(i)?,
                ino: self.number(i + 1)?,
            },
            fingerprint: Fingerprint {
                len: self.number(i + 2)?,
                hash: self.number(i + 3)?,
            },
            offset: self.number(i + 4)?,
            line_time: self
                .fields
                .get(i + 5)
                .and_then(|f| f.parse().ok())
                .ok_or_else(|| self.bad())?,
            path: PathBuf::from(self.text(path)?),
            finished: false,
        })
    }

    /// `from to path` from field `i`.
    fn in_flight(&self, i: usize) -> Result<InFlight, String> {
        Ok(InFlight {
            from: self.number(i)?,
            to: self.number(i + 1)?,
            path: PathBuf::from(self.text(i + 2)?),
        })
    }
}

/// Percent-escapes what would break the space-separated format (and the `%` itself); `%` alone
/// stands for the empty string.
fn escape(s: &str) -> String {
    if s.is_empty() {
        return "%".to_string();
    }
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c <= ' ' || c == '%' || c == '\u{7f}' {
            let _ = write!(out, "%{:02X}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

fn unescape(s: &str) -> Option<String> {
    if s == "%" {
        return Some(String::new());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "/logs/a b%.log";

    fn advance(ino: u64, offset: u64, fate: Fate) -> Advance {
        Advance {
            feed: 0,
            key: FileKey { dev: 1, ino },
            fingerprint: Fingerprint { len: 10, hash: 99 },
            from: offset.saturating_sub(50),
            offset,
            line_time: 1_700_000_000,
            path: Arc::from(Path::new(LOG)),
            fate,
            opened: false,
        }
    }

    fn reading(ino: u64, offset: u64) -> Advance {
        advance(ino, offset, Fate::Reading)
    }

    fn source(service_id: &str) -> SourceId {
        SourceId {
            service_id: service_id.into(),
            name: "/logs/*.log".into(),
        }
    }

    /// Feed 0 feeds the source `/logs/*.log` of each of `services`.
    fn feeds(services: &[&str]) -> Arc<Vec<Vec<SourceId>>> {
        Arc::new(vec![services.iter().map(|s| source(s)).collect()])
    }

    fn service(d: &StateDir, service_id: &str, services: &[&str]) -> ServiceState {
        let names = HashMap::from([(0, "/logs/*.log".to_string())]);
        d.service(service_id, names, feeds(services))
    }

    /// Where the follower of feed 0 resumes, for `services` (none reading from the end).
    fn resume(d: &StateDir, services: &[&str]) -> Resume {
        let sources: Vec<_> = services.iter().map(|s| (source(s), false)).collect();
        d.resume(&sources, &HashMap::new(), |_| None)
    }

    fn offsets(plan: &Resume) -> Vec<(u64, u64)> {
        plan.checkpoints
            .iter()
            .map(|c| (c.key.ino, c.offset))
            .collect()
    }

    #[test]
    fn checkpoints_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let d = StateDir::open(dir.path(), false).unwrap();
            assert!(!d.knows_source(&source("42")));
            d.start_sources(&[source("42")]).unwrap();
            let mut s = service(&d, "42", &["42"]);
            s.begin(1, &[reading(7, 100)], true).unwrap();
            s.commit(1, &[reading(7, 100), reading(8, 5)]).unwrap();
            s.begin(2, &[reading(7, 250)], true).unwrap();
            s.begin(3, &[reading(7, 300)], true).unwrap();
        }
        let d = StateDir::open(dir.path(), false).unwrap();
        assert!(d.knows_source(&source("42")));
        let plan = resume(&d, &["42"]);
        assert_eq!(offsets(&plan), vec![(7, 100), (8, 5)]);
        let c = &plan.checkpoints[0];
        assert_eq!(c.path.to_str(), Some(LOG));
        assert_eq!(c.fingerprint, Fingerprint { len: 10, hash: 99 });
        assert!(plan.counted[0].is_empty() && !plan.start_at_end);
        let range = |from, to| InFlight {
            path: LOG.into(),
            from,
            to,
        };
        assert_eq!(d.in_flight("42"), vec![range(200, 250), range(250, 300)]);
        assert!(d.in_flight("4").is_empty());
    }

    /// A file read but never accepted yet, then rotated away: without a checkpoint a crash would
    /// forget it. The first batch that touches it records one at the batch's start.
    #[test]
    fn a_file_gets_a_checkpoint_before_its_first_batch_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        {
            let d = StateDir::open(dir.path(), false).unwrap();
            let mut s = service(&d, "42", &["42"]);
            // A batch with nothing to send still records it; a later one does not move it.
            s.begin(1, &[reading(7, 100)], false).unwrap();
            s.begin(2, &[reading(7, 300)], true).unwrap();
            assert_eq!(s.call_ranges(1), vec![]);
            assert_eq!(s.call_ranges(2).len(), 1);
        }
        let d = StateDir::open(dir.path(), false).unwrap();
        assert_eq!(offsets(&resume(&d, &["42"])), vec![(7, 50)]);
    }

    /// Naming a source that was known by its path keeps its checkpoints.
    #[test]
    fn a_source_given_a_name_keeps_its_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let d = StateDir::open(dir.path(), false).unwrap();
        d.start_sources(&[source("42")]).unwrap();
        service(&d, "42", &["42"])
            .commit(1, &[reading(7, 100)])
            .unwrap();
        let edge = SourceId {
            service_id: "42".into(),
            name: "edge".into(),
        };
        d.adopt(&edge, "/logs/*.log");
        assert!(d.knows_source(&edge) && !d.knows_source(&source("42")));
        let plan = d.resume(&[(edge.clone(), false)], &HashMap::new(), |_| None);
        assert_eq!(offsets(&plan), vec![(7, 100)]);
        assert!(resume(&d, &["42"]).checkpoints.is_empty());
    }

    #[test]
    fn finished_and_forgotten_files_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let d = StateDir::open(dir.path(), false).unwrap();
        let mut s = service(&d, "42", &["42"]);
        s.commit(1, &[reading(7, 100), reading(8, 10)]).unwrap();
        s.commit(2, &[advance(7, 120, Fate::Finished)]).unwrap();
        s.commit(3, &[advance(8, 10, Fate::Forgotten)]).unwrap();
        assert_eq!(s.watermark(0, FileKey { dev: 1, ino: 7 }), None);
        assert!(resume(&d, &["42"]).checkpoints.is_empty());
        drop(d);
        let d = StateDir::open(dir.path(), false).unwrap();
        assert!(resume(&d, &["42"]).checkpoints.is_empty());
    }

    /// One file feeding two services: it resumes where the service furthest behind stands, the
    /// other skips what it counted; it is forgotten once both are done with it.
    #[test]
    fn a_file_feeding_two_services_resumes_at_its_watermark() {
        let dir = tempfile::tempdir().unwrap();
        let both = ["1", "2"];
        let key = FileKey { dev: 1, ino: 7 };
        {
            let d = StateDir::open(dir.path(), false).unwrap();
            let (mut one, mut two) = (service(&d, "1", &both), service(&d, "2", &both));
            // The first service to send anything of the file checkpoints it for both.
            one.begin(1, &[reading(7, 300)], true).unwrap();
            assert_eq!(two.watermark(0, key), Some((250, 0)));
            one.commit(1, &[reading(7, 300)]).unwrap();
            assert_eq!(one.watermark(0, key), Some((250, 0)));
            two.commit(1, &[reading(7, 100)]).unwrap();
            assert_eq!(one.watermark(0, key).map(|w| w.0), Some(100));
        }
        let d = StateDir::open(dir.path(), false).unwrap();
        let plan = resume(&d, &both);
        assert_eq!(offsets(&plan), vec![(7, 100)]);
        assert_eq!(
            plan.counted,
            vec![HashMap::from([(key, 300)]), HashMap::new()]
        );
        // The first is done with the rotated file, the second not yet: it stays.
        let (mut one, mut two) = (service(&d, "1", &both), service(&d, "2", &both));
        one.commit(2, &[advance(7, 400, Fate::Finished)]).unwrap();
        assert_eq!(one.watermark(0, key).map(|w| w.0), Some(100));
        let plan = resume(&d, &both);
        assert_eq!(offsets(&plan), vec![(7, 100)]);
        assert_eq!(plan.counted[0], HashMap::from([(key, u64::MAX)]));
        two.commit(2, &[advance(7, 400, Fate::Finished)]).unwrap();
        assert_eq!(one.watermark(0, key), None);
        assert!(resume(&d, &both).checkpoints.is_empty());
        // Forgotten (gone, or replaced): each service drops its own checkpoint.
        one.commit(3, &[reading(8, 40)]).unwrap();
        two.commit(3, &[reading(8, 60)]).unwrap();
        one.commit(4, &[advance(8, 40, Fate::Forgotten)]).unwrap();
        let plan = resume(&d, &both);
        assert_eq!(offsets(&plan), vec![(8, 0)]);
        assert_eq!(
            plan.counted,
            vec![
                HashMap::new(),
                HashMap::from([(FileKey { dev: 1, ino: 8 }, 60)])
            ]
        );
    }

    /// A source added beside one already read from the same path starts as its read_from says,
    /// without moving the other.
    #[test]
    fn a_new_source_on_a_path_read_before_starts_as_read_from_says() {
        let dir = tempfile::tempdir().unwrap();
        let d = StateDir::open(dir.path(), false).unwrap();
        d.start_sources(&[source("1")]).unwrap();
        service(&d, "1", &["1"])
            .commit(1, &[reading(7, 300)])
            .unwrap();
        let key = FileKey { dev: 1, ino: 7 };
        let new_key = FileKey { dev: 1, ino: 9 };
        let matching = HashMap::from([
            (PathBuf::from("/logs/a.log"), (key, 500)),
            (PathBuf::from("/logs/b.log"), (new_key, 80)),
        ]);
        // From the beginning: the follower goes back to 0 for it; the first skips what it counted.
        let plan = d.resume(
            &[(source("1"), false), (source("2"), false)],
            &matching,
            |_| Some(true),
        );
        assert_eq!(offsets(&plan), vec![(7, 0)]);
        assert_eq!(
            plan.counted,
            vec![HashMap::from([(key, 300)]), HashMap::new()]
        );
        assert!(!plan.start_at_end);
        // From the end: it skips what is there now, in every file.
        let plan = d.resume(
            &[(source("1"), false), (source("2"), true)],
            &matching,
            |_| Some(true),
        );
        assert_eq!(offsets(&plan), vec![(7, 300)]);
        assert_eq!(
            plan.counted,
            vec![HashMap::new(), HashMap::from([(key, 500), (new_key, 80)])]
        );
        // Its checkpoint, created by the first batch of the other service, starts there too.
        let mut one = service(&d, "1", &["1", "2"]);
        one.begin(2, &[reading(9, 10)], true).unwrap();
        let two = d.service(
            "2",
            HashMap::from([(0, "/logs/*.log".to_string())]),
            feeds(&["1", "2"]),
        );
        assert_eq!(two.watermark(0, new_key).map(|w| w.0), Some(0));
        assert_eq!(lock(&d.store).files[&(source("2"), new_key)].offset, 80);
    }

    /// The state files of tally before 0.2 (one per service) are carried over, then removed.
    #[test]
    fn the_state_of_an_earlier_version_is_carried_over() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = "tally-state 1\nsource /logs/*.log\nsource edge\n\
                  file /logs/*.log 1 7 10 99 100 1700000000 /logs/a%20b%25.log\n\
                  file edge 1 8 10 98 5 0 /other/x.log\n\
                  in_flight 100 250 /logs/a%20b%25.log\n";
        let v1 = format!("{v1}end {}\n", v1.len());
        std::fs::write(dir.path().join("service-42.state"), &v1).unwrap();
        std::fs::write(
            dir.path().join("service-a%20b.state"),
            "tally-state 1\nend 14\n",
        )
        .unwrap();
        let d = StateDir::open(dir.path(), false).unwrap();
        assert!(d.knows_source(&source("42")));
        assert_eq!(offsets(&resume(&d, &["42"])), vec![(7, 100)]);
        let edge = SourceId {
            service_id: "42".into(),
            name: "edge".into(),
        };
        let plan = d.resume(&[(edge, false)], &HashMap::new(), |_| None);
        assert_eq!(offsets(&plan), vec![(8, 5)]);
        assert_eq!(d.in_flight("42").len(), 1);
        assert!(dir.path().join(FILE_NAME).exists());
        assert!(!dir.path().join("service-42.state").exists());
        assert!(!dir.path().join("service-a%20b.state").exists());
        drop(d);
        // Read again from tally.state alone.
        let d = StateDir::open(dir.path(), false).unwrap();
        assert_eq!(offsets(&resume(&d, &["42"])), vec![(7, 100)]);
    }

    #[test]
    fn a_second_tally_cannot_use_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let _first = StateDir::open(dir.path(), false).unwrap();
        let second = StateDir::open(dir.path(), false).err().unwrap();
        assert!(
            second.to_string().contains("another tally is using it"),
            "{second}"
        );
        // --dry-run only reads.
        assert!(StateDir::open(dir.path(), true).is_ok());
    }

    #[test]
    fn corrupt_or_truncated_state_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let d = StateDir::open(dir.path(), false).unwrap();
        service(&d, "42", &["42"])
            .commit(1, &[reading(7, 100)])
            .unwrap();
        drop(d);
        let path = dir.path().join(FILE_NAME);
        let good = std::fs::read_to_string(&path).unwrap();
        for bad in [
            good[..good.len() - 5].to_string(),
            good[..good.len() / 2].to_string(),
            good.replace("file ", "flie "),
            good.replace(" 100 ", " 1x0 "),
            good.replace(" reading ", " readin "),
            String::new(),
            "\u{0}\u{1}garbage".to_string(),
        ] {
            std::fs::write(&path, &bad).unwrap();
            let e = StateDir::open(dir.path(), false)
                .err()
                .expect(&bad)
                .to_string();
            assert!(
                e.contains("is corrupt") && e.contains("Move the file away"),
                "{e}"
            );
            assert!(!e.chars().any(char::is_control), "{e:?}");
        }
        // Random bytes, not even text.
        std::fs::write(&path, [0xff, 0xfe, 0x00, 0x9b, 0x1b, b'\n', 0xc3]).unwrap();
        let e = StateDir::open(dir.path(), false)
            .err()
            .expect("bytes")
            .to_string();
        assert!(
            e.contains("is corrupt (it is not text") && e.contains("Move the file away"),
            "{e}"
        );
        // A temp file left by a crash mid-write is ignored and removed.
        std::fs::write(&path, &good).unwrap();
        let temp = dir.path().join(format!("{FILE_NAME}.tmp"));
        std::fs::write(&temp, "half").unwrap();
        let d = StateDir::open(dir.path(), false).unwrap();
        assert_eq!(offsets(&resume(&d, &["42"])), vec![(7, 100)]);
        assert!(!temp.exists());
    }

    #[test]
    fn escaping_round_trips() {
        for s in ["", "plain", "a b\tc\nd%e", "café ü", "%", "%25"] {
            assert_eq!(unescape(&escape(s)).as_deref(), Some(s));
            assert!(!escape(s).contains([' ', '\n', '\t']));
        }
    }

    fn empty() -> Store {
        Store::empty(Path::new(""), true)
    }

    const RECORDS: &str = "(source [a-z%0-9]{0,3} [a-z%0-9]{0,3}\n|file [0-9a-z% -]{0,40}( reading| finished)?[ a-z]{0,3}\n|in_flight [a-z0-9]{0,2} [0-9 ]{0,12}[a-z]{0,3}\n|end [0-9]{0,4}\n|[ -~]{0,20}\n){0,6}";

    proptest::proptest! {
        /// A state file damaged in any way is an error or a state, never a panic.
        #[test]
        fn any_state_text_loads_or_fails_cleanly(text in format!("(tally-state [12]\n)?{RECORDS}").as_str()) {
            let _ = empty().parse(&text);
            let _ = empty().parse_v1("42", &text);
        }

        /// The same with the right `end` line, so that the records themselves are parsed.
        #[test]
        fn any_records_behind_a_right_end_line_load_or_fail_cleanly(body in format!("tally-state 2\n{RECORDS}").as_str()) {
            let _ = empty().parse(&format!("{body}end {}\n", body.len()));
            let v1 = body.replacen("tally-state 2", "tally-state 1", 1);
            let _ = empty().parse_v1("42", &format!("{v1}end {}\n", v1.len()));
        }

        /// Any checkpoint and in-flight range written is read back as it was.
        #[test]
        fn checkpoints_round_trip(
            service_id in "[ -~]{0,6}",
            name in "[ -~]{0,12}",
            numbers in proptest::array::uniform6(0u64..u64::MAX),
            line_time in proptest::num::i64::ANY,
            finished in proptest::bool::ANY,
            path in "[^\u{0}]{0,16}",
            range in (0u64..u64::MAX, 0u64..u64::MAX),
        ) {
            let mut s = empty();
            let source = SourceId { service_id: service_id.clone(), name };
            let c = FileCheckpoint {
                key: FileKey { dev: numbers[0], ino: numbers[1] },
                fingerprint: Fingerprint { len: numbers[2], hash: numbers[3] },
                offset: numbers[4],
                line_time,
                path: PathBuf::from(&path),
                finished,
            };
            s.sources.insert(source.clone());
            s.files.insert((source, c.key), c);
            let flight = InFlight { path: PathBuf::from(&path), from: range.0, to: range.1 };
            s.in_flight.insert((service_id, 0), vec![flight]);
            let mut back = empty();
            back.parse(&s.render()).expect("what tally writes, it reads");
            proptest::prop_assert_eq!(back.sources, s.sources);
            proptest::prop_assert_eq!(back.files, s.files);
            proptest::prop_assert_eq!(back.in_flight, s.in_flight);
        }
    }
}
