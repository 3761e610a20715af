//! What tally must remember across restarts: per service, per file, the offset just past the last line
//! whose report 3scale accepted (or that needed no report), and the report call in flight.
//!
//! One state file per service in `[state] dir`, rewritten whole (temp file, rename) before each report
//! call (marking it in flight) and after each acceptance (advancing the offsets). The rename makes each
//! write atomic for a process crash or kill -9; an fsync of the file and the folder, at most once a
//! second, makes it durable against a power loss. A lock file keeps a second tally off the folder.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::identity::{FileKey, Fingerprint};

const HEADER: &str = "tally-state 1";
/// How often the state is made durable against a power loss (a crash loses nothing written).
const SYNC_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    // The OS error is part of the message and deliberately not a `source`: an error chain printed
    // whole (`{:#}`) would show it twice.
    #[error("state folder {dir}: {message}: {error}")]
    Io {
        dir: PathBuf,
        message: String,
        error: std::io::Error,
    },
    #[error("state folder {0}: another tally is using it (a second tally would report the same lines twice)")]
    Locked(PathBuf),
    #[error(
        "state file {path} is corrupt ({reason}); tally will not guess where to resume. Move the file \
         away to start over: its sources are then read again according to read_from"
    )]
    Corrupt { path: PathBuf, reason: String },
}

/// Where one file stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCheckpoint {
    /// The `[[sources]]` path pattern the file was read for.
    pub source: String,
    pub key: FileKey,
    pub fingerprint: Fingerprint,
    /// Just past the last line accounted for.
    pub offset: u64,
    /// The log time of the last reported line (for the lag), or 0.
    pub line_time: i64,
    /// The path it was last read under.
    pub path: PathBuf,
}

/// How far a batch takes one file: its checkpoint once the batch is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advance {
    /// The index of the `[[sources]]` entry.
    pub source: usize,
    pub key: FileKey,
    pub fingerprint: Fingerprint,
    /// Where the batch's data of this file starts.
    pub from: u64,
    pub offset: u64,
    /// The log time of the last line parsed up to `offset`, or 0 if unknown.
    pub line_time: i64,
    pub path: Arc<Path>,
    /// The file was closed for good (rotated away and finished, or deleted): forget it.
    pub closed: bool,
}

/// A report call that was under way when tally stopped: its lines are read and sent again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    pub path: PathBuf,
    pub from: u64,
    pub to: u64,
}

/// The state folder, locked for this process.
pub struct StateDir {
    dir: PathBuf,
    _lock: Option<File>,
}

impl StateDir {
    /// Opens (creating it) and locks the folder. Read-only (`--dry-run`) neither creates nor locks.
    pub fn open(dir: &Path, read_only: bool) -> Result<StateDir, StateError> {
        let io = |message: &str| {
            let message = message.to_string();
            move |error| StateError::Io {
                dir: dir.to_path_buf(),
                message,
                error,
            }
        };
        if read_only {
            return Ok(StateDir {
                dir: dir.to_path_buf(),
                _lock: None,
            });
        }
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
        Ok(StateDir {
            dir: dir.to_path_buf(),
            _lock: Some(lock),
        })
    }

    /// Loads one service's state (empty if it has none yet). `patterns` are the names of all
    /// `[[sources]]`, by index (a source's name is its path pattern unless it is given one).
    pub fn service(
        &self,
        service_id: &str,
        patterns: Vec<String>,
    ) -> Result<ServiceState, StateError> {
        let path = self
            .dir
            .join(format!("service-{}.state", escape(service_id)));
        let mut state = ServiceState {
            dir: self.dir.clone(),
            path: path.clone(),
            read_only: self._lock.is_none(),
            patterns,
            sources: Vec::new(),
            files: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            last_sync: None,
        };
        match std::fs::read(&path) {
            Ok(bytes) => std::str::from_utf8(&bytes)
                .map_err(|_| "it is not text (invalid UTF-8)".to_string())
                .and_then(|text| state.parse(text))
                .map_err(|reason| StateError::Corrupt {
                    path: path.clone(),
                    // It quotes the file's lines, which may hold anything.
                    reason: crate::telemetry::printable(&reason).into_owned(),
                })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(StateError::Io {
                    dir: self.dir.clone(),
                    message: format!("cannot read {}", path.display()),
                    error: e,
                })
            }
        }
        // A temp file is what a crash during a write leaves: the state file itself is intact.
        let _ = std::fs::remove_file(state.temp_path());
        Ok(state)
    }
}

/// One service's checkpoints.
pub struct ServiceState {
    dir: PathBuf,
    path: PathBuf,
    read_only: bool,
    /// The path pattern of each `[[sources]]` entry, by index.
    patterns: Vec<String>,
    /// Sources that have been read before: read_from no longer applies to them.
    sources: Vec<String>,
    files: BTreeMap<(String, FileKey), FileCheckpoint>,
    /// The report calls under way, by batch number (those of an earlier run under 0).
    in_flight: BTreeMap<u64, Vec<InFlight>>,
    last_sync: Option<Instant>,
}

impl ServiceState {
    /// Whether the source was read in an earlier run.
    pub fn knows_source(&self, source: &str) -> bool {
        self.sources.iter().any(|s| s == source)
    }

    pub fn checkpoints(&self, source: &str) -> Vec<FileCheckpoint> {
        self.files
            .values()
            .filter(|c| c.source == source)
            .cloned()
            .collect()
    }

    /// The report calls under way (at start-up: those under way when tally last stopped).
    pub fn in_flight(&self) -> Vec<InFlight> {
        self.in_flight.values().flatten().cloned().collect()
    }

    /// A source that was known by its path and is now given a name keeps its checkpoints: they
    /// move to the name (once; the state is written at the next change).
    pub fn adopt(&mut self, name: &str, path: &str) {
        if name == path || self.knows_source(name) || !self.knows_source(path) {
            return;
        }
        for s in &mut self.sources {
            if s == path {
                *s = name.to_string();
            }
        }
        let moved: Vec<(String, FileKey)> = self
            .files
            .keys()
            .filter(|(source, _)| source == path)
            .cloned()
            .collect();
        for key in moved {
            if let Some(mut c) = self.files.remove(&key) {
                c.source = name.to_string();
                self.files.insert((name.to_string(), key.1), c);
            }
        }
    }

    /// Records that these sources are being read, so read_from never applies to them again.
    pub fn start_sources(&mut self, sources: &[String]) -> Result<(), StateError> {
        let before = self.sources.len();
        for s in sources {
            if !self.knows_source(s) {
                self.sources.push(s.clone());
            }
        }
        if self.sources.len() != before {
            self.write()?;
        }
        Ok(())
    }

    fn pattern(&self, source: usize) -> String {
        self.patterns.get(source).cloned().unwrap_or_default()
    }

    /// Records what must hold before anything of batch `seq` is sent: a file of which nothing has
    /// been accepted yet gets a checkpoint at the batch's start in it, so that a crash before its
    /// first acceptance reads it again (even rotated away meanwhile: it is found by its identity);
    /// and, when `sending`, the call as under way with the byte ranges it covers.
    pub fn begin(
        &mut self,
        seq: u64,
        advances: &[Advance],
        sending: bool,
    ) -> Result<(), StateError> {
        let mut changed = false;
        for a in advances {
            let source = self.pattern(a.source);
            if let std::collections::btree_map::Entry::Vacant(entry) =
                self.files.entry((source.clone(), a.key))
            {
                entry.insert(FileCheckpoint {
                    source,
                    key: a.key,
                    fingerprint: a.fingerprint,
                    offset: a.from,
                    line_time: 0,
                    path: a.path.to_path_buf(),
                });
                changed = true;
            }
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
            self.in_flight.insert(seq, ranges);
            changed = true;
        }
        if changed {
            self.write()
        } else {
            Ok(())
        }
    }

    /// The byte ranges of report call `seq`, recorded by [`ServiceState::begin`].
    pub fn call_ranges(&self, seq: u64) -> Vec<InFlight> {
        self.in_flight.get(&seq).cloned().unwrap_or_default()
    }

    /// Batch `seq`, and every batch before it, is accepted (or had nothing to send): advance the
    /// offsets.
    pub fn commit(&mut self, seq: u64, advances: &[Advance]) -> Result<(), StateError> {
        for a in advances {
            let key = (self.pattern(a.source), a.key);
            if a.closed {
                self.files.remove(&key);
                continue;
            }
            let line_time = match (a.line_time, self.files.get(&key)) {
                (0, Some(old)) => old.line_time,
                (t, _) => t,
            };
            let checkpoint = FileCheckpoint {
                source: key.0.clone(),
                key: a.key,
                fingerprint: a.fingerprint,
                offset: a.offset,
                line_time,
                path: a.path.to_path_buf(),
            };
            self.files.insert(key, checkpoint);
        }
        self.in_flight.remove(&seq);
        // What was under way when tally last stopped is settled by the first commit.
        self.in_flight.remove(&0);
        self.write()
    }

    fn temp_path(&self) -> PathBuf {
        self.path.with_extension("state.tmp")
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
        std::fs::rename(&temp, &self.path).map_err(|e| io("cannot replace the state file", e))?;
        if sync {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io("cannot sync the folder", e))?;
            self.last_sync = Some(Instant::now());
        }
        Ok(())
    }

    /// The file format: a header, one line per known source, file and in-flight range, each field
    /// escaped, and a final line with the length of what precedes it, which catches a truncated file.
    fn render(&self) -> String {
        let mut out = format!("{HEADER}\n");
        for s in &self.sources {
            let _ = writeln!(out, "source {}", escape(s));
        }
        for c in self.files.values() {
            let _ = writeln!(
                out,
                "file {} {} {} {} {} {} {} {}",
                escape(&c.source),
                c.key.dev,
                c.key.ino,
                c.fingerprint.len,
                c.fingerprint.hash,
                c.offset,
                c.line_time,
                escape(&c.path.to_string_lossy())
            );
        }
        for f in self.in_flight.values().flatten() {
            let _ = writeln!(
                out,
                "in_flight {} {} {}",
                f.from,
                f.to,
                escape(&f.path.to_string_lossy())
            );
        }
        let len = out.len();
        let _ = writeln!(out, "end {len}");
        out
    }

    fn parse(&mut self, text: &str) -> Result<(), String> {
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
        if lines.next() != Some(HEADER) {
            return Err(format!("the first line is not `{HEADER}`"));
        }
        for (n, line) in lines.enumerate() {
            let fields: Vec<&str> = line.split(' ').collect();
            let bad = || format!("line {}: `{line}`", n + 2);
            let num = |i: usize| {
                fields
                    .get(i)
                    .and_then(|f| f.parse::<u64>().ok())
                    .ok_or_else(bad)
            };
            match fields.first().copied() {
                Some("source") if fields.len() == 2 => {
                    self.sources.push(unescape(fields[1]).ok_or_else(bad)?)
                }
                Some("file") if fields.len() == 9 => {
                    let c = FileCheckpoint {
                        source: unescape(fields[1]).ok_or_else(bad)?,
                        key: FileKey {
                            dev: num(2)?,
                            ino: num(3)?,
                        },
                        fingerprint: Fingerprint {
                            len: num(4)?,
                            hash: num(5)?,
                        },
                        offset: num(6)?,
                        line_time: fields[7].parse().map_err(|_| bad())?,
                        path: PathBuf::from(unescape(fields[8]).ok_or_else(bad)?),
                    };
                    self.files.insert((c.source.clone(), c.key), c);
                }
                Some("in_flight") if fields.len() == 4 => {
                    self.in_flight.entry(0).or_default().push(InFlight {
                        from: num(1)?,
                        to: num(2)?,
                        path: PathBuf::from(unescape(fields[3]).ok_or_else(bad)?),
                    })
                }
                _ => return Err(bad()),
            }
        }
        Ok(())
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

    fn advance(source: usize, ino: u64, offset: u64, closed: bool) -> Advance {
        Advance {
            source,
            key: FileKey { dev: 1, ino },
            fingerprint: Fingerprint { len: 10, hash: 99 },
            from: offset.saturating_sub(50),
            offset,
            line_time: 1_700_000_000,
            path: Arc::from(Path::new("/logs/a b%.log")),
            closed,
        }
    }

    fn patterns() -> Vec<String> {
        vec!["/logs/*.log".into(), "/other dir/x.log".into()]
    }

    #[test]
    fn checkpoints_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let d = StateDir::open(dir.path(), false).unwrap();
            let mut s = d.service("42", patterns()).unwrap();
            assert!(!s.knows_source("/logs/*.log"));
            s.start_sources(&patterns()).unwrap();
            s.begin(1, &[advance(0, 7, 100, false)], true).unwrap();
            s.commit(1, &[advance(0, 7, 100, false), advance(1, 8, 5, false)])
                .unwrap();
            s.begin(2, &[advance(0, 7, 250, false)], true).unwrap();
            s.begin(3, &[advance(0, 7, 300, false)], true).unwrap();
        }
        let d = StateDir::open(dir.path(), false).unwrap();
        let s = d.service("42", patterns()).unwrap();
        assert!(s.knows_source("/logs/*.log") && s.knows_source("/other dir/x.log"));
        let c = s.checkpoints("/logs/*.log");
        assert_eq!(c.len(), 1);
        assert_eq!(
            (c[0].offset, c[0].key.ino, c[0].path.to_str()),
            (100, 7, Some("/logs/a b%.log"))
        );
        assert_eq!(c[0].fingerprint, Fingerprint { len: 10, hash: 99 });
        assert_eq!(s.checkpoints("/other dir/x.log")[0].offset, 5);
        let range = |from, to| InFlight {
            path: "/logs/a b%.log".into(),
            from,
            to,
        };
        assert_eq!(s.in_flight(), vec![range(200, 250), range(250, 300)]);
    }

    /// A file read but never accepted yet, then rotated away: without a checkpoint a crash would
    /// forget it. The first batch that touches it records one at the batch's start.
    #[test]
    fn a_file_gets_a_checkpoint_before_its_first_batch_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        {
            let d = StateDir::open(dir.path(), false).unwrap();
            let mut s = d.service("42", patterns()).unwrap();
            // A batch with nothing to send still records it; a later one does not move it.
            s.begin(1, &[advance(0, 7, 100, false)], false).unwrap();
            s.begin(2, &[advance(0, 7, 300, false)], true).unwrap();
            assert_eq!(s.call_ranges(1), vec![]);
            assert_eq!(s.call_ranges(2).len(), 1);
        }
        let d = StateDir::open(dir.path(), false).unwrap();
        let s = d.service("42", patterns()).unwrap();
        let c = s.checkpoints("/logs/*.log");
        assert_eq!((c.len(), c[0].offset), (1, 50));
    }

    /// Naming a source that was known by its path keeps its checkpoints.
    #[test]
    fn a_source_given_a_name_keeps_its_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let d = StateDir::open(dir.path(), false).unwrap();
        {
            let mut s = d.service("42", patterns()).unwrap();
            s.start_sources(&patterns()).unwrap();
            s.commit(1, &[advance(0, 7, 100, false)]).unwrap();
        }
        let names = vec!["edge".to_string(), "/other dir/x.log".to_string()];
        let mut s = d.service("42", names.clone()).unwrap();
        s.adopt("edge", "/logs/*.log");
        assert!(s.knows_source("edge") && !s.knows_source("/logs/*.log"));
        assert_eq!(s.checkpoints("edge")[0].offset, 100);
        assert!(s.checkpoints("/logs/*.log").is_empty());
        s.start_sources(&names).unwrap();
        s.commit(2, &[advance(0, 7, 150, false)]).unwrap();
        let s = d.service("42", names).unwrap();
        assert_eq!(s.checkpoints("edge")[0].offset, 150);
    }

    #[test]
    fn closed_files_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let d = StateDir::open(dir.path(), false).unwrap();
        let mut s = d.service("42", patterns()).unwrap();
        s.commit(1, &[advance(0, 7, 100, false)]).unwrap();
        s.commit(2, &[advance(0, 7, 120, true)]).unwrap();
        assert!(s.checkpoints("/logs/*.log").is_empty());
        assert!(d
            .service("42", patterns())
            .unwrap()
            .checkpoints("/logs/*.log")
            .is_empty());
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
        let mut s = d.service("42", patterns()).unwrap();
        s.commit(1, &[advance(0, 7, 100, false)]).unwrap();
        let path = dir.path().join("service-42.state");
        let good = std::fs::read_to_string(&path).unwrap();
        for bad in [
            good[..good.len() - 5].to_string(),
            good[..good.len() / 2].to_string(),
            good.replace("file ", "flie "),
            good.replace(" 100 ", " 1x0 "),
            String::new(),
            "\u{0}\u{1}garbage".to_string(),
        ] {
            std::fs::write(&path, &bad).unwrap();
            let e = d.service("42", patterns()).err().expect(&bad).to_string();
            assert!(
                e.contains("is corrupt") && e.contains("Move the file away"),
                "{e}"
            );
            assert!(!e.chars().any(char::is_control), "{e:?}");
        }
        // Random bytes, not even text.
        std::fs::write(&path, [0xff, 0xfe, 0x00, 0x9b, 0x1b, b'\n', 0xc3]).unwrap();
        let e = d
            .service("42", patterns())
            .err()
            .expect("bytes")
            .to_string();
        assert!(
            e.contains("is corrupt (it is not text") && e.contains("Move the file away"),
            "{e}"
        );
        // A temp file left by a crash mid-write is ignored and removed.
        std::fs::write(&path, &good).unwrap();
        std::fs::write(dir.path().join("service-42.state.tmp"), "half").unwrap();
        assert_eq!(
            d.service("42", patterns())
                .unwrap()
                .checkpoints("/logs/*.log")[0]
                .offset,
            100
        );
        assert!(!dir.path().join("service-42.state.tmp").exists());
    }

    #[test]
    fn escaping_round_trips() {
        for s in ["", "plain", "a b\tc\nd%e", "café ü", "%", "%25"] {
            assert_eq!(unescape(&escape(s)).as_deref(), Some(s));
            assert!(!escape(s).contains([' ', '\n', '\t']));
        }
    }

    fn empty() -> ServiceState {
        ServiceState {
            dir: PathBuf::new(),
            path: PathBuf::new(),
            read_only: true,
            patterns: Vec::new(),
            sources: Vec::new(),
            files: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            last_sync: None,
        }
    }

    const RECORDS: &str = "(source [a-z%0-9]{0,5}\n|file [0-9a-z% -]{0,40}\n|in_flight [0-9 ]{0,12}[a-z]{0,3}\n|end [0-9]{0,4}\n|[ -~]{0,20}\n){0,6}";

    proptest::proptest! {
        /// A state file damaged in any way is an error or a state, never a panic.
        #[test]
        fn any_state_text_loads_or_fails_cleanly(text in format!("(tally-state 1\n)?{RECORDS}").as_str()) {
            let _ = empty().parse(&text);
        }

        /// The same with the right `end` line, so that the records themselves are parsed.
        #[test]
        fn any_records_behind_a_right_end_line_load_or_fail_cleanly(body in format!("tally-state 1\n{RECORDS}").as_str()) {
            let _ = empty().parse(&format!("{body}end {}\n", body.len()));
        }

        /// Any checkpoint and in-flight range written is read back as it was.
        #[test]
        fn checkpoints_round_trip(
            source in "[ -~]{0,12}",
            numbers in proptest::array::uniform6(0u64..u64::MAX),
            line_time in proptest::num::i64::ANY,
            path in "[^\u{0}]{0,16}",
            range in (0u64..u64::MAX, 0u64..u64::MAX),
        ) {
            let mut s = empty();
            let c = FileCheckpoint {
                source: source.clone(),
                key: FileKey { dev: numbers[0], ino: numbers[1] },
                fingerprint: Fingerprint { len: numbers[2], hash: numbers[3] },
                offset: numbers[4],
                line_time,
                path: PathBuf::from(&path),
            };
            s.sources.push(source.clone());
            s.files.insert((source, c.key), c);
            let flight = InFlight { path: PathBuf::from(&path), from: range.0, to: range.1 };
            s.in_flight.insert(0, vec![flight]);
            let mut back = empty();
            back.parse(&s.render()).expect("what tally writes, it reads");
            proptest::prop_assert_eq!(back.sources, s.sources);
            proptest::prop_assert_eq!(back.files, s.files);
            proptest::prop_assert_eq!(back.in_flight, s.in_flight);
        }
    }
}
