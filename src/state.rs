//! What tally must remember across restarts: per `[[sources]]` entry and file, the offset just past
//! the last line whose report 3scale accepted (or that needed no report), and the report calls in
//! flight.
//!
//! One file can feed several services (two `[[sources]]` entries with one path; later, Host
//! routing). Each service keeps its own checkpoint of the file, moved on as its batches are accepted;
//! the file's *watermark*, where its follower resumes, is the lowest of them, and a service that is
//! further on skips what it already counted.
//!
//! Two files in `[state] dir`: `tally.state`, a snapshot, and `tally.journal`, the changes since.
//! Before each report call (marking it in flight) and after each acceptance, the change is appended
//! to the journal as one entry with a checksum: no file is replaced per call (a rename on ext4
//! flushes the file's data, and two per call made catching up on a disk five times slower). An
//! fdatasync, at most once a second, makes the journal durable against a power loss. A crash can
//! only cut the last entry short, and such an entry is ignored: its write never returned, so nothing
//! was sent on its account. The journal is folded into a fresh snapshot (temp file, rename) at each
//! start and stop and once it holds a few MiB. A lock file keeps a second tally off the folder. The
//! state files of earlier versions (`tally.state` rewritten whole, one file per service before that)
//! are read once and replaced.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::identity::{FileKey, FilePosition, Fingerprint};

/// The snapshot's first line.
const HEADER: &str = "tally-state 3";
/// The whole state, rewritten at each change, of tally before the journal.
const HEADER_V2: &str = "tally-state 2";
/// The per-service files of tally before 0.2 (`service-<id>.state`), migrated at the first start.
const HEADER_V1: &str = "tally-state 1";
const FILE_NAME: &str = "tally.state";
const JOURNAL_NAME: &str = "tally.journal";
/// The journal's first line: this, then the generation of the snapshot it follows.
const JOURNAL_HEADER: &str = "tally-journal";
/// A journal this long is folded into a fresh snapshot at the next write.
const COMPACT_AFTER: u64 = 4 << 20;
/// Tests set a shorter journal, so that compactions happen often (and crashes hit them).
const COMPACT_AFTER_VAR: &str = "TALLY_TEST_STATE_COMPACT_BYTES";
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
        "state file {path} is corrupt ({reason}); tally will not guess where to resume. Move \
         tally.state and tally.journal away to start over: its sources are then read again according \
         to read_from"
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
}

impl StateDir {
    /// Opens (creating it) and locks the folder, and reads the state. Read-only (`--dry-run`)
    /// neither creates nor locks nor writes.
    pub(crate) fn open(dir: &Path, read_only: bool) -> Result<StateDir, StateError> {
        let io = |message: &str| io_failed(dir, message);
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
        let store = Store::load(dir, read_only, lock)?;
        Ok(StateDir {
            store: Arc::new(Mutex::new(store)),
        })
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    /// Whether the source was read in an earlier run.
    #[cfg(test)]
    fn knows_source(&self, source: &SourceId) -> bool {
        self.store().now.sources.contains(source)
    }

    /// A source that was known by its path and is now given a name keeps its checkpoints: they
    /// move to the name (written at the next change).
    pub(crate) fn adopt(&self, source: &SourceId, path: &str) {
        let old = SourceId {
            service_id: source.service_id.clone(),
            name: path.to_string(),
        };
        let mut store = self.store();
        if source.name == path
            || store.now.sources.contains(source)
            || !store.now.sources.remove(&old)
        {
            return;
        }
        store.now.sources.insert(source.clone());
        let moved: Vec<FileKey> = store
            .now
            .files
            .keys()
            .filter(|(s, _)| *s == old)
            .map(|(_, key)| *key)
            .collect();
        for key in moved {
            if let Some(c) = store.now.files.remove(&(old.clone(), key)) {
                store.now.files.insert((source.clone(), key), c);
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
            && !store.now.sources.contains(s)
        {
            true => size_now(key).unwrap_or(u64::MAX),
            false => 0,
        };
        let recorded: BTreeSet<FileKey> = store
            .now
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
                .map(|(s, _)| store.now.files.get(&(s.clone(), key)))
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
                if !store.now.files.contains_key(&(s.clone(), key)) {
                    starts.push((s.clone(), key, wanted[i]));
                }
            }
        }
        // Files never read: the follower starts at their end only if every source wants that.
        plan.start_at_end = sources
            .iter()
            .all(|(s, from_end)| *from_end && !store.now.sources.contains(s));
        for (key, len) in matching.values() {
            if recorded.contains(key) || plan.start_at_end {
                continue;
            }
            for (i, (s, from_end)) in sources.iter().enumerate() {
                if *from_end && !store.now.sources.contains(s) && *len > 0 {
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
        let before = store.now.sources.len();
        store.now.sources.extend(sources.iter().cloned());
        if store.now.sources.len() != before {
            store.write()?;
        }
        Ok(())
    }

    /// The report calls under way when tally last stopped, by service.
    pub(crate) fn in_flight(&self, service_id: &str) -> Vec<InFlight> {
        self.store()
            .now
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
                .now
                .files
                .get(&(me.clone(), a.key))
                .is_some_and(|c| !c.finished)
            {
                continue;
            }
            let others = self.feeds.get(a.feed).into_iter().flatten();
            for s in others.filter(|s| **s != me) {
                if !store.now.files.contains_key(&(s.clone(), a.key)) {
                    let start = store.starts.get(&(s.clone(), a.key)).copied().unwrap_or(0);
                    store
                        .now
                        .files
                        .insert((s.clone(), a.key), FileCheckpoint::at(a, a.from.max(start)));
                }
            }
            store
                .now
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
                .now
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
            .now
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
                    store.now.files.insert(key, c);
                }
                (Fate::Forgotten, None) => {
                    store.now.files.remove(&key);
                }
                (Fate::Reading | Fate::Finished, _) => {
                    let line_time = match (a.line_time, store.now.files.get(&key)) {
                        (0, Some(old)) => old.line_time,
                        (t, _) => t,
                    };
                    let checkpoint = FileCheckpoint {
                        line_time,
                        finished: a.fate == Fate::Finished,
                        ..FileCheckpoint::at(a, a.offset)
                    };
                    store.now.files.insert(key, checkpoint);
                }
            }
            // Once every source of the file is done with it, it is forgotten.
            let sources = self.feeds.get(a.feed).map_or(&[][..], Vec::as_slice);
            let done = sources.iter().all(|s| {
                store
                    .now
                    .files
                    .get(&(s.clone(), a.key))
                    .is_none_or(|c| c.finished)
            });
            if done {
                for s in sources {
                    store.now.files.remove(&(s.clone(), a.key));
                }
            }
        }
        store.now.in_flight.remove(&(self.service_id.clone(), seq));
        // What was under way when tally last stopped is settled by the first commit.
        store.now.in_flight.remove(&(self.service_id.clone(), 0));
        store.write()
    }

    /// Where a file stands for every source it feeds: the lowest live checkpoint (offset, line
    /// time), or None once the file is forgotten.
    pub(crate) fn watermark(&self, feed: usize, key: FileKey) -> Option<(u64, i64)> {
        let store = lock(&self.store);
        self.feeds
            .get(feed)?
            .iter()
            .filter_map(|s| store.now.files.get(&(s.clone(), key)))
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

/// What the state holds: what its files say, and what is kept in memory.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Records {
    /// Sources read before: read_from no longer applies to them.
    sources: BTreeSet<SourceId>,
    files: BTreeMap<(SourceId, FileKey), FileCheckpoint>,
    /// The report calls under way, by service and batch number (those of an earlier run under 0).
    in_flight: BTreeMap<(String, u64), Vec<InFlight>>,
}

/// The journal being appended to.
struct Journal {
    file: File,
    /// Its length: what a failed append is cut back to.
    len: u64,
    /// Entries appended since the last compaction.
    entries: u64,
}

/// The state folder's content, in memory.
struct Store {
    dir: PathBuf,
    read_only: bool,
    now: Records,
    /// What the snapshot and the journal hold: each write appends the difference from `now`.
    written: Records,
    /// Where writes go; None until the first compaction and after a failed append, so that the
    /// next write starts a fresh snapshot instead.
    journal: Option<Journal>,
    /// The snapshot's generation; its journal carries the same, an older one is left over.
    generation: u64,
    /// A journal this long is folded into a fresh snapshot at the next write.
    compact_after: u64,
    /// Where a source with no checkpoint of a file starts, if not at 0 (planned at start-up).
    starts: HashMap<(SourceId, FileKey), u64>,
    last_sync: Option<Instant>,
    /// Under test: the compaction step that fails, as a crash there would stop it.
    #[cfg(test)]
    crash_at_step: Option<usize>,
    /// Held as long as the store lives, until after its last compaction.
    _lock: Option<File>,
}

/// What a record may be, by where it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// `tally-state 2`: the whole state, rewritten at each change (tally before the journal).
    StateV2,
    /// `tally-state 3`: the snapshot of a generation.
    State,
    /// An entry of `tally.journal`.
    Journal,
}

impl Store {
    fn empty(dir: &Path, read_only: bool) -> Store {
        Store {
            dir: dir.to_path_buf(),
            read_only,
            now: Records::default(),
            written: Records::default(),
            journal: None,
            generation: 0,
            compact_after: std::env::var(COMPACT_AFTER_VAR)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(COMPACT_AFTER),
            starts: HashMap::new(),
            last_sync: None,
            #[cfg(test)]
            crash_at_step: None,
            _lock: None,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Reads the snapshot and replays its journal (or, without a snapshot, reads the state files of
    /// earlier versions), then, unless read-only, compacts: a fresh snapshot and an empty journal,
    /// so each run's journal is its own.
    fn load(dir: &Path, read_only: bool, lock: Option<File>) -> Result<Store, StateError> {
        let mut store = Store::empty(dir, read_only);
        store._lock = lock;
        let snapshot = store.path(FILE_NAME);
        let mut migrated = Vec::new();
        let found = match read_text(dir, &snapshot)? {
            Some(text) => {
                store.parse(&text).map_err(corrupt(&snapshot))?;
                true
            }
            None => {
                migrated = store.migrate()?;
                false
            }
        };
        let journal = store.path(JOURNAL_NAME);
        if let Some(bytes) = read_file(dir, &journal)? {
            if !found {
                return Err(corrupt(&journal)(format!(
                    "there is no {FILE_NAME} beside it"
                )));
            }
            match store.replay(&bytes).map_err(corrupt(&journal))? {
                Replayed::Whole | Replayed::Older => {}
                Replayed::CutShort { bytes } => tracing::warn!(
                    path = %crate::telemetry::shown_path(&journal), bytes,
                    "the state journal ends with an entry cut short (tally stopped while writing \
                     it, before anything depended on it): ignored"
                ),
            }
        }
        // The calls under way are an earlier run's now.
        let calls = std::mem::take(&mut store.now.in_flight);
        for ((service_id, _), ranges) in calls {
            store
                .now
                .in_flight
                .entry((service_id, 0))
                .or_default()
                .extend(ranges);
        }
        if !read_only {
            store.compact()?;
            for path in migrated {
                let _ = std::fs::remove_file(&path);
            }
        }
        Ok(store)
    }

    /// Reads every `service-<id>.state` of tally before 0.2; returns their paths.
    fn migrate(&mut self) -> Result<Vec<PathBuf>, StateError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io("cannot list it")(e)),
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

    fn io(&self, message: &str) -> impl FnOnce(std::io::Error) -> StateError {
        io_failed(&self.dir, message)
    }

    /// Makes what changed since the last write durable against a crash (and, at most once a
    /// second, against a power loss): one entry appended to the journal, or, once the journal is
    /// long (or after a failed append), a compaction.
    fn write(&mut self) -> Result<(), StateError> {
        if self.read_only {
            return Ok(());
        }
        match &self.journal {
            Some(j) if j.len < self.compact_after => self.append(),
            _ => self.compact(),
        }
    }

    /// Appends the difference between `now` and `written` as one entry: a line `entry <records>
    /// <checksum>`, then its records. A crash can only cut the last entry short, and a cut-short
    /// entry is one whose write never returned: nothing was sent on its account.
    fn append(&mut self) -> Result<(), StateError> {
        let mut records = String::new();
        let n = changes(&self.now, &mut self.written, &mut records);
        if n == 0 {
            return Ok(());
        }
        let entry = format!(
            "entry {n} {:016x}\n{records}",
            Fingerprint::of(records.as_bytes()).hash
        );
        let sync = self.last_sync.is_none_or(|t| t.elapsed() >= SYNC_EVERY);
        let Some(journal) = self.journal.as_mut() else {
            return self.compact();
        };
        let written = (&journal.file).write_all(entry.as_bytes()).and_then(|()| {
            if sync {
                journal.file.sync_data()
            } else {
                Ok(())
            }
        });
        match written {
            Ok(()) => {
                journal.len += entry.len() as u64;
                journal.entries += 1;
                if sync {
                    self.last_sync = Some(Instant::now());
                }
                Ok(())
            }
            Err(e) => {
                // Cut off what reached the file if possible; either way the next write starts a
                // fresh snapshot, which does not depend on the journal.
                let _ = journal.file.set_len(journal.len);
                self.journal = None;
                Err(self.io("cannot append to its journal")(e))
            }
        }
    }

    /// Folds the journal into the snapshot of the next generation: that snapshot replaces the
    /// old one, then an empty journal of its generation replaces the old journal, each by a temp
    /// file, fsync, rename and fsync of the folder. Cut short anywhere, the folder loads as it
    /// was: before the first rename, the old snapshot and its journal; after it, the new snapshot,
    /// beside which a journal of an older generation is ignored.
    fn compact(&mut self) -> Result<(), StateError> {
        let generation = self.generation + 1;
        let mut snapshot = format!("{HEADER}\ngeneration {generation}\n");
        changes(&self.now, &mut Records::default(), &mut snapshot);
        let len = snapshot.len();
        let _ = writeln!(snapshot, "end {len}");
        self.replace(FILE_NAME, &snapshot)?;
        self.generation = generation;
        let header = format!("{JOURNAL_HEADER} {generation}\n");
        let file = self.replace(JOURNAL_NAME, &header)?;
        self.journal = Some(Journal {
            file,
            len: header.len() as u64,
            entries: 0,
        });
        self.written = self.now.clone();
        self.last_sync = Some(Instant::now());
        Ok(())
    }

    /// Replaces the file `name` with `text`, durably; returns it open for appending.
    fn replace(&mut self, name: &str, text: &str) -> Result<File, StateError> {
        let temp = self.path(&format!("{name}.tmp"));
        let _ = std::fs::remove_file(&temp);
        let mut file = File::options()
            .append(true)
            .create_new(true)
            .open(&temp)
            .map_err(self.io("cannot write a temp file"))?;
        self.step()?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_data())
            .map_err(self.io("cannot write a temp file"))?;
        self.step()?;
        std::fs::rename(&temp, self.path(name))
            .map_err(self.io(&format!("cannot replace {name}")))?;
        self.step()?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(self.io("cannot sync the folder"))?;
        Ok(file)
    }

    /// One step of a compaction done; under test, a crash at the step asked for.
    fn step(&mut self) -> Result<(), StateError> {
        #[cfg(test)]
        if let Some(step) = self.crash_at_step.as_mut() {
            if *step == 0 {
                return Err(self.io("crashed (test)")(std::io::ErrorKind::Other.into()));
            }
            *step -= 1;
        }
        Ok(())
    }

    /// Reads a snapshot (`tally-state 3`) or the whole state of tally before the journal
    /// (`tally-state 2`).
    fn parse(&mut self, text: &str) -> Result<(), String> {
        let (header, format) = match text.split('\n').next() {
            Some(HEADER_V2) => (HEADER_V2, Format::StateV2),
            _ => (HEADER, Format::State),
        };
        for (n, fields) in records(text, header)? {
            let record = Record { n, fields: &fields };
            if format == Format::State && fields[0] == "generation" && fields.len() == 2 {
                self.generation = record.number(1)?;
            } else {
                self.apply(&record, format)?;
            }
        }
        if format == Format::State && self.generation == 0 {
            return Err("it has no `generation` line".into());
        }
        Ok(())
    }

    /// Applies one record of a snapshot or a journal entry.
    fn apply(&mut self, record: &Record, format: Format) -> Result<(), String> {
        let now = &mut self.now;
        let journal = format == Format::Journal;
        let fields = record.fields;
        match (fields[0], fields.len()) {
            ("source", 3) => {
                now.sources.insert(record.source(1)?);
            }
            ("source_gone", 3) if journal => {
                if !now.sources.remove(&record.source(1)?) {
                    return Err(record.bad());
                }
            }
            ("file", 11) => {
                let finished = match fields[9] {
                    "finished" => true,
                    "reading" => false,
                    _ => return Err(record.bad()),
                };
                let c = FileCheckpoint {
                    finished,
                    ..record.checkpoint(3, 10)?
                };
                now.files.insert((record.source(1)?, c.key), c);
            }
            ("file_gone", 5) if journal => {
                let key = FileKey {
                    dev: record.number(3)?,
                    ino: record.number(4)?,
                };
                if now.files.remove(&(record.source(1)?, key)).is_none() {
                    return Err(record.bad());
                }
            }
            ("in_flight", 5) if format == Format::StateV2 => now
                .in_flight
                .entry((record.text(1)?, 0))
                .or_default()
                .push(record.in_flight(2)?),
            ("call", 3) if format != Format::StateV2 => {
                now.in_flight
                    .insert((record.text(1)?, record.number(2)?), Vec::new());
            }
            ("in_flight", 6) if format != Format::StateV2 => now
                .in_flight
                .get_mut(&(record.text(1)?, record.number(2)?))
                .ok_or_else(|| record.bad())?
                .push(record.in_flight(3)?),
            ("settled", 3) if journal => {
                let call = (record.text(1)?, record.number(2)?);
                if now.in_flight.remove(&call).is_none() {
                    return Err(record.bad());
                }
            }
            _ => return Err(record.bad()),
        }
        Ok(())
    }

    /// Replays a journal: its header line `tally-journal <generation>`, then entries, each a line
    /// `entry <records> <checksum>` and its records.
    fn replay(&mut self, bytes: &[u8]) -> Result<Replayed, String> {
        let (header, mut rest) = split_line(bytes).ok_or("it has no header line")?;
        let generation = std::str::from_utf8(header)
            .ok()
            .and_then(|h| h.strip_prefix(JOURNAL_HEADER)?.strip_prefix(' '))
            .and_then(|g| g.parse::<u64>().ok())
            .ok_or_else(|| format!("the first line is not `{JOURNAL_HEADER} <generation>`"))?;
        if generation < self.generation {
            return Ok(Replayed::Older); // left by a compaction cut short: the snapshot holds it
        }
        if generation > self.generation {
            return Err(format!(
                "its generation {generation} is newer than {FILE_NAME}'s {}",
                self.generation
            ));
        }
        let mut line = 2;
        while !rest.is_empty() {
            let whole = rest.len();
            let Some((head, after)) = split_line(rest) else {
                return Ok(Replayed::CutShort { bytes: whole });
            };
            let bad = || {
                format!(
                    "line {line}: `{}` is not an entry",
                    String::from_utf8_lossy(head)
                )
            };
            let head = std::str::from_utf8(head).map_err(|_| bad())?;
            let (count, checksum) = match head.split(' ').collect::<Vec<_>>()[..] {
                ["entry", count, checksum] => (count, checksum),
                _ => return Err(bad()),
            };
            let count: usize = count.parse().ok().filter(|&c| c > 0).ok_or_else(bad)?;
            let checksum = u64::from_str_radix(checksum, 16).map_err(|_| bad())?;
            // Its records: `count` whole lines, or it was cut short.
            let mut len = 0;
            for _ in 0..count {
                match after[len..].iter().position(|&b| b == b'\n') {
                    Some(end) => len += end + 1,
                    None => return Ok(Replayed::CutShort { bytes: whole }),
                }
            }
            let body = &after[..len];
            if Fingerprint::of(body).hash != checksum {
                return Err(format!(
                    "line {line}: the entry's checksum does not match its records"
                ));
            }
            let body = std::str::from_utf8(body)
                .map_err(|_| format!("line {line}: the entry is not text (invalid UTF-8)"))?;
            for text in body.lines() {
                line += 1;
                let fields: Vec<&str> = text.split(' ').collect();
                self.apply(
                    &Record {
                        n: line,
                        fields: &fields,
                    },
                    Format::Journal,
                )?;
            }
            line += 1;
            rest = &after[len..];
        }
        Ok(Replayed::Whole)
    }

    /// The format of tally before 0.2: one file per service, sources by name.
    fn parse_v1(&mut self, service_id: &str, text: &str) -> Result<(), String> {
        let source = |name: String| SourceId {
            service_id: service_id.to_string(),
            name,
        };
        let now = &mut self.now;
        for (n, fields) in records(text, HEADER_V1)? {
            let record = Record { n, fields: &fields };
            match fields[0] {
                "source" if fields.len() == 2 => {
                    now.sources.insert(source(record.text(1)?));
                }
                "file" if fields.len() == 9 => {
                    let c = record.checkpoint(2, 8)?;
                    now.files.insert((source(record.text(1)?), c.key), c);
                }
                "in_flight" if fields.len() == 4 => now
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

impl Drop for Store {
    fn drop(&mut self) {
        // At stop the journal is folded in: the next start reads one small file. (A store whose
        // loading failed has no journal and writes nothing.)
        if self.journal.as_ref().is_some_and(|j| j.entries > 0) {
            if let Err(e) = self.compact() {
                tracing::warn!(error = %e, "cannot fold the state journal into tally.state at stop: it is read at the next start");
            }
        }
    }
}

/// How much of a journal was replayed.
#[derive(Debug, PartialEq, Eq)]
enum Replayed {
    Whole,
    /// All but its last entry, cut short by a crash while it was written: that many bytes.
    CutShort {
        bytes: usize,
    },
    /// None: it is older than the snapshot, which holds what it says.
    Older,
}

/// The first line of `bytes` (without its newline) and what follows; None if it has no newline.
fn split_line(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = bytes.iter().position(|&b| b == b'\n')?;
    Some((&bytes[..end], &bytes[end + 1..]))
}

/// Writes to `out` the records that take `written` to `now`, and applies them to `written`;
/// returns how many. From an empty `written`, they are the whole state: a snapshot's records.
fn changes(now: &Records, written: &mut Records, out: &mut String) -> usize {
    let mut n = 0;
    let mut record = |out: &mut String, fields: std::fmt::Arguments| {
        let _ = writeln!(out, "{fields}");
        n += 1;
    };
    let source = |s: &SourceId| format!("{} {}", escape(&s.service_id), escape(&s.name));
    if now.sources != written.sources {
        for s in now.sources.difference(&written.sources) {
            record(out, format_args!("source {}", source(s)));
        }
        for s in written.sources.difference(&now.sources) {
            record(out, format_args!("source_gone {}", source(s)));
        }
        written.sources.clone_from(&now.sources);
    }
    for ((s, key), c) in &now.files {
        let at = (s.clone(), *key);
        if written.files.get(&at) == Some(c) {
            continue;
        }
        record(
            out,
            format_args!(
                "file {} {} {} {} {} {} {} {} {}",
                source(s),
                c.key.dev,
                c.key.ino,
                c.fingerprint.len,
                c.fingerprint.hash,
                c.offset,
                c.line_time,
                if c.finished { "finished" } else { "reading" },
                escape(&c.path.to_string_lossy())
            ),
        );
        written.files.insert(at, c.clone());
    }
    written.files.retain(|(s, key), _| {
        let kept = now.files.contains_key(&(s.clone(), *key));
        if !kept {
            record(
                out,
                format_args!("file_gone {} {} {}", source(s), key.dev, key.ino),
            );
        }
        kept
    });
    for ((service_id, seq), ranges) in &now.in_flight {
        let call = (service_id.clone(), *seq);
        match written.in_flight.get(&call) {
            Some(old) if old == ranges => continue,
            Some(_) => record(out, format_args!("settled {} {seq}", escape(service_id))),
            None => {}
        }
        record(out, format_args!("call {} {seq}", escape(service_id)));
        for f in ranges {
            record(
                out,
                format_args!(
                    "in_flight {} {seq} {} {} {}",
                    escape(service_id),
                    f.from,
                    f.to,
                    escape(&f.path.to_string_lossy())
                ),
            );
        }
        written.in_flight.insert(call, ranges.clone());
    }
    written.in_flight.retain(|(service_id, seq), _| {
        let kept = now.in_flight.contains_key(&(service_id.clone(), *seq));
        if !kept {
            record(out, format_args!("settled {} {seq}", escape(service_id)));
        }
        kept
    });
    n
}

/// How an operation on the state folder `dir` failed, `message` saying which.
fn io_failed(dir: &Path, message: &str) -> impl FnOnce(std::io::Error) -> StateError {
    let dir = dir.to_path_buf();
    let message = message.to_string();
    move |error| StateError::Io {
        dir,
        message,
        error,
    }
}

/// The bytes of a state file, None if there is none.
fn read_file(dir: &Path, path: &Path) -> Result<Option<Vec<u8>>, StateError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_failed(dir, &format!("cannot read {}", path.display()))(
            e,
        )),
    }
}

/// The text of a state file (its snapshot or an earlier version's), None if there is none.
fn read_text(dir: &Path, path: &Path) -> Result<Option<String>, StateError> {
    read_file(dir, path)?
        .map(|bytes| {
            String::from_utf8(bytes)
                .map_err(|_| "it is not text (invalid UTF-8)".to_string())
                .map_err(corrupt(path))
        })
        .transpose()
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
    use std::os::unix::fs::MetadataExt;

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
        // The folder stays locked as long as a service's handle could write.
        drop(d);
        assert!(StateDir::open(dir.path(), false).is_err());
        drop(s);
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
        assert_eq!(lock(&d.store).now.files[&(source("2"), new_key)].offset, 80);
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
                e.contains("is corrupt") && e.contains("to start over"),
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
            e.contains("is corrupt (it is not text") && e.contains("to start over"),
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

    /// What a store holds, as the next start reads it (calls under way are then an earlier run's).
    fn as_loaded(records: &Records) -> Records {
        let mut r = records.clone();
        let calls = std::mem::take(&mut r.in_flight);
        for ((service_id, _), ranges) in calls {
            r.in_flight
                .entry((service_id, 0))
                .or_default()
                .extend(ranges);
        }
        r
    }

    /// What the state folder holds, read as a `--dry-run` would (the folder stays as it is).
    fn on_disk(dir: &Path) -> Result<Records, StateError> {
        StateDir::open(dir, true).map(|d| lock(&d.store).now.clone())
    }

    /// A tally that dies: no compaction at stop, the lock released.
    fn crash(d: StateDir) {
        let mut store = lock(&d.store);
        store.journal = None;
        store._lock = None;
    }

    /// A run of batches over two services and two files: begun, accepted, finished, forgotten.
    fn some_batches(d: &StateDir, mut after_each: impl FnMut(&StateDir)) {
        let both = ["1", "2"];
        d.start_sources(&[source("1"), source("2")]).unwrap();
        after_each(d);
        let (mut one, mut two) = (service(d, "1", &both), service(d, "2", &both));
        for round in 0..4u64 {
            let at = 100 * (round + 1);
            one.begin(round + 1, &[reading(7, at)], true).unwrap();
            after_each(d);
            two.begin(round + 1, &[reading(7, at), reading(8, at / 2)], true)
                .unwrap();
            after_each(d);
            one.commit(round + 1, &[reading(7, at)]).unwrap();
            after_each(d);
        }
        two.commit(4, &[advance(8, 220, Fate::Finished)]).unwrap();
        after_each(d);
        one.commit(5, &[advance(7, 450, Fate::Forgotten)]).unwrap();
        after_each(d);
    }

    /// Every write is one journal entry; the next start reads the snapshot and replays them all.
    #[test]
    fn the_journal_holds_every_write_and_no_file_is_replaced_per_call() {
        let dir = tempfile::tempdir().unwrap();
        let d = StateDir::open(dir.path(), false).unwrap();
        let snapshot = std::fs::metadata(dir.path().join(FILE_NAME)).unwrap();
        let mut entries = 0;
        some_batches(&d, |d| {
            entries += 1;
            let store = lock(&d.store);
            assert_eq!(store.journal.as_ref().map(|j| j.entries), Some(entries));
            assert_eq!(store.written, store.now);
            drop(store);
            let now = lock(&d.store).now.clone();
            assert_eq!(on_disk(dir.path()).unwrap(), as_loaded(&now));
        });
        // The snapshot was not touched: every change went to the journal.
        let same = std::fs::metadata(dir.path().join(FILE_NAME)).unwrap();
        assert_eq!((snapshot.ino(), snapshot.len()), (same.ino(), same.len()));
        let expected = as_loaded(&lock(&d.store).now);
        crash(d);
        // Read again (and compacted at this start): the same state.
        let d = StateDir::open(dir.path(), false).unwrap();
        assert_eq!(lock(&d.store).now, expected);
        assert_eq!(lock(&d.store).generation, 2);
        assert_eq!(
            std::fs::read_to_string(dir.path().join(JOURNAL_NAME)).unwrap(),
            format!("{JOURNAL_HEADER} 2\n")
        );
    }

    /// A crash can cut the journal's last entry anywhere: cut at every byte of the last entries,
    /// the folder loads as it was after the last whole entry, never anything else.
    #[test]
    fn a_journal_cut_at_any_byte_of_its_last_entries_loads_as_it_was_before_them() {
        let dir = tempfile::tempdir().unwrap();
        let d = StateDir::open(dir.path(), false).unwrap();
        let journal = dir.path().join(JOURNAL_NAME);
        // The journal's length and the state after each entry.
        let mut after = vec![(
            std::fs::metadata(&journal).unwrap().len(),
            Records::default(),
        )];
        some_batches(&d, |d| {
            let len = std::fs::metadata(&journal).unwrap().len();
            after.push((len, as_loaded(&lock(&d.store).now)));
        });
        let whole = std::fs::read(&journal).unwrap();
        crash(d);
        let last_ones = after[after.len() - 4].0 as usize;
        for cut in last_ones..=whole.len() {
            std::fs::write(&journal, &whole[..cut]).unwrap();
            let expected = after
                .iter()
                .rev()
                .find(|(len, _)| *len as usize <= cut)
                .map(|(_, r)| r)
                .unwrap();
            assert_eq!(&on_disk(dir.path()).unwrap(), expected, "cut at {cut}");
        }
        // The header line itself cut short: a journal tally never wrote (it is created whole).
        std::fs::write(&journal, &whole[..5]).unwrap();
        let e = on_disk(dir.path()).err().unwrap().to_string();
        assert!(e.contains("tally.journal is corrupt"), "{e}");
    }

    /// A compaction stopped at any of its steps (a crash there) leaves a folder that loads as it
    /// was before the write that compacted or as it was after it, as the rename of the snapshot
    /// decides; the next start goes on from there.
    #[test]
    fn a_compaction_cut_short_at_any_step_loads_as_before_or_after_it() {
        for crash_at in 0..7 {
            let dir = tempfile::tempdir().unwrap();
            let d = StateDir::open(dir.path(), false).unwrap();
            let mut s = service(&d, "42", &["42"]);
            s.begin(1, &[reading(7, 100)], true).unwrap();
            s.commit(1, &[reading(7, 100)]).unwrap();
            s.begin(2, &[reading(7, 200)], true).unwrap();
            let before = as_loaded(&lock(&d.store).now);
            {
                let mut store = lock(&d.store);
                store.compact_after = 0;
                store.crash_at_step = Some(crash_at);
            }
            let written = s.commit(2, &[reading(7, 200)]);
            let after = as_loaded(&lock(&d.store).now);
            assert_ne!(before, after);
            assert_eq!(written.is_ok(), crash_at == 6, "step {crash_at}");
            crash(d);
            // The snapshot is renamed at the third step.
            let expected = if crash_at < 2 { &before } else { &after };
            assert_eq!(&on_disk(dir.path()).unwrap(), expected, "step {crash_at}");
            let d = StateDir::open(dir.path(), false).unwrap();
            assert_eq!(&lock(&d.store).now, expected, "step {crash_at}");
            let mut s = service(&d, "42", &["42"]);
            s.commit(3, &[reading(7, 300)]).unwrap();
            drop((s, d));
            assert_eq!(
                offsets(&resume(&StateDir::open(dir.path(), true).unwrap(), &["42"])),
                vec![(7, 300)]
            );
        }
    }

    /// A failed append (a full disk) leaves nothing half written behind it: the next write starts
    /// a fresh snapshot.
    #[test]
    fn after_a_failed_append_the_next_write_starts_a_fresh_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let d = StateDir::open(dir.path(), false).unwrap();
        let mut s = service(&d, "42", &["42"]);
        s.commit(1, &[reading(7, 100)]).unwrap();
        {
            // The journal's descriptor, made read-only: the append fails as on a full disk.
            let mut store = lock(&d.store);
            let path = dir.path().join(JOURNAL_NAME);
            store.journal.as_mut().unwrap().file = File::open(&path).unwrap();
        }
        let e = s.commit(2, &[reading(7, 200)]).err().unwrap().to_string();
        assert!(e.contains("cannot append to its journal"), "{e}");
        assert!(lock(&d.store).journal.is_none());
        s.commit(3, &[reading(7, 300)]).unwrap();
        assert_eq!(lock(&d.store).generation, 2);
        crash(d);
        let d = StateDir::open(dir.path(), false).unwrap();
        assert_eq!(offsets(&resume(&d, &["42"])), vec![(7, 300)]);
    }

    /// The whole state file of the version before the journal is carried over at the first start.
    #[test]
    fn the_state_file_of_the_version_before_the_journal_is_carried_over() {
        let dir = tempfile::tempdir().unwrap();
        let v2 = "tally-state 2\nsource 42 /logs/*.log\n\
                  file 42 /logs/*.log 1 7 10 99 100 1700000000 reading /logs/a%20b%25.log\n\
                  file 42 /logs/*.log 1 8 10 98 5 0 finished /logs/a.log.1\n\
                  in_flight 42 100 250 /logs/a%20b%25.log\n";
        std::fs::write(
            dir.path().join(FILE_NAME),
            format!("{v2}end {}\n", v2.len()),
        )
        .unwrap();
        let d = StateDir::open(dir.path(), false).unwrap();
        assert!(d.knows_source(&source("42")));
        assert_eq!(offsets(&resume(&d, &["42"])), vec![(7, 100)]);
        assert_eq!(d.in_flight("42").len(), 1);
        let snapshot = std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        assert!(
            snapshot.starts_with("tally-state 3\ngeneration 1\n"),
            "{snapshot}"
        );
        assert!(snapshot.contains(" finished /logs/a.log.1\n"), "{snapshot}");
        crash(d);
        let d = StateDir::open(dir.path(), false).unwrap();
        assert_eq!(offsets(&resume(&d, &["42"])), vec![(7, 100)]);
        assert_eq!(d.in_flight("42").len(), 1);
    }

    /// Whatever damaged the journal, other than a last entry cut short, is an error that names it.
    #[test]
    fn a_damaged_journal_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let d = StateDir::open(dir.path(), false).unwrap();
        some_batches(&d, |_| {});
        let journal = dir.path().join(JOURNAL_NAME);
        let good = std::fs::read_to_string(&journal).unwrap();
        crash(d);
        let second_entry = good.match_indices("\nentry ").nth(1).unwrap().0;
        let mut flipped = good.clone().into_bytes();
        // A record of the first entry changed: its checksum no longer matches.
        let at = good.find(" reading ").unwrap();
        flipped[at + 1] = b'R';
        for (bad, says) in [
            (
                String::from_utf8(flipped).unwrap(),
                "checksum does not match",
            ),
            (
                good.replacen("tally-journal 1", "tally-journal 7", 1),
                "newer than",
            ),
            (
                good.replacen("tally-journal 1", "tally-journl 1", 1),
                "first line",
            ),
            (
                format!(
                    "{}\nnot an entry{}",
                    &good[..second_entry],
                    &good[second_entry..]
                ),
                "is not an entry",
            ),
        ] {
            std::fs::write(&journal, &bad).unwrap();
            let e = StateDir::open(dir.path(), false)
                .err()
                .expect(says)
                .to_string();
            assert!(
                e.contains("tally.journal is corrupt") && e.contains(says),
                "{e}"
            );
            assert!(e.contains("to start over"), "{e}");
        }
        // A journal without its snapshot: the snapshot was moved away, not the journal.
        std::fs::write(&journal, &good).unwrap();
        std::fs::remove_file(dir.path().join(FILE_NAME)).unwrap();
        let e = StateDir::open(dir.path(), false).err().unwrap().to_string();
        assert!(e.contains("no tally.state beside it"), "{e}");
    }

    const RECORDS: &str = "(source [a-z%0-9]{0,3} [a-z%0-9]{0,3}\n|file [0-9a-z% -]{0,40}( reading| finished)?[ a-z]{0,3}\n|(in_flight|call|settled|generation) [a-z0-9]{0,2} [0-9 ]{0,12}[a-z]{0,3}\n|end [0-9]{0,4}\n|[ -~]{0,20}\n){0,6}";

    fn any_records() -> impl proptest::strategy::Strategy<Value = Records> {
        use proptest::prelude::*;
        let source = ("[a-c]{0,2}", "[ -~]{0,4}")
            .prop_map(|(service_id, name)| SourceId { service_id, name });
        let checkpoint = (
            source.clone(),
            0u64..3,
            proptest::array::uniform4(0u64..u64::MAX),
            proptest::num::i64::ANY,
            any::<bool>(),
            "[^\u{0}]{0,8}",
        )
            .prop_map(|(s, ino, numbers, line_time, finished, path)| {
                let c = FileCheckpoint {
                    key: FileKey { dev: 1, ino },
                    fingerprint: Fingerprint {
                        len: numbers[0],
                        hash: numbers[1],
                    },
                    offset: numbers[2],
                    line_time,
                    path: PathBuf::from(path),
                    finished,
                };
                ((s, c.key), c)
            });
        let range =
            (0u64..u64::MAX, 0u64..u64::MAX, "[^\u{0}]{0,8}").prop_map(|(from, to, path)| {
                InFlight {
                    path: PathBuf::from(path),
                    from,
                    to,
                }
            });
        let call = (
            ("[a-c]{0,2}", 0u64..4),
            proptest::collection::vec(range, 0..3),
        );
        (
            proptest::collection::btree_set(source, 0..4),
            proptest::collection::vec(checkpoint, 0..5),
            proptest::collection::vec(call, 0..4),
        )
            .prop_map(|(sources, files, in_flight)| Records {
                sources,
                files: files.into_iter().collect(),
                in_flight: in_flight.into_iter().collect(),
            })
    }

    proptest::proptest! {
        /// A state file damaged in any way is an error or a state, never a panic.
        #[test]
        fn any_state_text_loads_or_fails_cleanly(text in format!("(tally-state [123]\n)?{RECORDS}").as_str()) {
            let _ = empty().parse(&text);
            let _ = empty().parse_v1("42", &text);
        }

        /// The same with the right `end` line, so that the records themselves are parsed.
        #[test]
        fn any_records_behind_a_right_end_line_load_or_fail_cleanly(body in format!("tally-state [23]\n{RECORDS}").as_str()) {
            let _ = empty().parse(&format!("{body}end {}\n", body.len()));
            let v1 = body.replacen("tally-state 2", "tally-state 1", 1);
            let _ = empty().parse_v1("42", &format!("{v1}end {}\n", v1.len()));
        }

        /// Any bytes after a journal's header are replayed or refused, never a panic.
        #[test]
        fn any_journal_replays_or_fails_cleanly(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            entry in format!("entry [0-9]{{1,2}} [0-9a-f]{{16}}\n{RECORDS}").as_str(),
        ) {
            let mut store = empty();
            let _ = store.replay(&[b"tally-journal 0\n", &body[..]].concat());
            let _ = empty().replay(format!("tally-journal 0\n{entry}").as_bytes());
        }

        /// The records of any change take any state to any other; a snapshot holds any state.
        #[test]
        fn changes_and_snapshots_round_trip(from in any_records(), to in any_records()) {
            let mut written = from.clone();
            let mut records = String::new();
            let n = changes(&to, &mut written, &mut records);
            proptest::prop_assert_eq!(&written, &to);
            let mut replayed = empty();
            replayed.now = from.clone();
            let entry = format!("tally-journal 0\nentry {n} {:016x}\n{records}", Fingerprint::of(records.as_bytes()).hash);
            let whole = if n == 0 { Replayed::CutShort { bytes: records.len() + 24 } } else { Replayed::Whole };
            if n > 0 {
                proptest::prop_assert_eq!(replayed.replay(entry.as_bytes()), Ok(whole));
                proptest::prop_assert_eq!(&replayed.now, &to);
            }
            let mut snapshot = String::from("tally-state 3\ngeneration 9\n");
            changes(&to, &mut Records::default(), &mut snapshot);
            let len = snapshot.len();
            let mut back = empty();
            back.parse(&format!("{snapshot}end {len}\n")).expect("what tally writes, it reads");
            proptest::prop_assert_eq!(&back.now, &to);
            proptest::prop_assert_eq!(back.generation, 9);
        }
    }
}
