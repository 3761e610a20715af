//! Exact tailing: every rotation mode, restarts, kill -9, replaced and truncated files, bad state.
//! Every line carries its own user_key (`u<N>`), so the backend's record shows exactly which lines
//! arrived, how often. Each scenario runs with file events and in poll-only mode.

mod support;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::{combined_line, now, write_config_with, Scenario, Tally};

const WAIT: Duration = Duration::from_secs(60);

/// Runs a scenario with file events (`watch`) and with the poll alone (`poll`).
macro_rules! both_modes {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn watch() {
                super::$name(true)
            }
            #[test]
            fn poll() {
                super::$name(false)
            }
        }
    )*};
}

both_modes!(
    rename_and_create_rotation,
    copytruncate_rotation,
    deleted_file_is_finished_and_closed,
    files_that_appear_later_and_glob_matches,
    long_lines_and_invalid_utf8_do_not_stop_reading,
    kill_9_at_many_moments_loses_and_duplicates_nothing,
);

/// A [`Scenario`] whose sources are named per test, with the checks of exactness.
struct Setup(Scenario);

impl std::ops::Deref for Setup {
    type Target = Scenario;
    fn deref(&self) -> &Scenario {
        &self.0
    }
}

impl Setup {
    fn new() -> Setup {
        Setup(Scenario::new())
    }

    /// A configuration following `pattern` (relative to the test folder) for service 42; `tail`
    /// adds keys to the [tail] table, `extra` adds tables.
    fn config(&self, pattern: &str, watch: bool, tail: &str, extra: &str) -> PathBuf {
        self.config_for(&["42"], pattern, watch, tail, extra)
    }

    /// The same, `pattern` feeding each of `services` (which the backend knows, with token `tok`).
    fn config_for(
        &self,
        services: &[&str],
        pattern: &str,
        watch: bool,
        tail: &str,
        extra: &str,
    ) -> PathBuf {
        // Without events only the poll finds lines: poll often so the tests stay quick.
        let mut table = format!("[tail]\nrotate_grace = \"1s\"\nwatch = {watch}\n{tail}");
        if !watch && !tail.contains("poll_interval") {
            table.push_str("poll_interval = \"100ms\"\n");
        }
        let report = if extra.contains("[report]") {
            String::new()
        } else {
            "[report]\nflush_interval = \"100ms\"\n".to_string()
        };
        // Every line has its own user_key here: checking each with authorize would only slow the
        // tests (the credential checks have tests of their own).
        let path = self.path(pattern);
        let sources: Vec<(&Path, &str)> = services.iter().map(|s| (path.as_path(), *s)).collect();
        for service_id in services {
            self.backend.set_token(service_id, "tok");
        }
        write_config_with(
            self.dir.path(),
            &self.backend.url(),
            "tok",
            "validate_credentials = false\n",
            &sources,
            &format!("{report}{table}{extra}"),
        )
    }

    /// How often each `u<N>` arrived.
    fn counts(&self) -> BTreeMap<u64, u64> {
        counts(self.backend.transactions())
    }

    /// How often each `u<N>` arrived for `service_id`.
    fn counts_of(&self, service_id: &str) -> BTreeMap<u64, u64> {
        counts(self.backend.transactions_of(service_id))
    }

    fn wait_for(&self, lines: usize) {
        self.backend
            .wait_until(WAIT, &format!("{lines} transactions"), |b| {
                b.transactions().len() >= lines
            });
    }

    /// Asserts that lines `0..n` each arrived exactly once, and nothing else.
    fn assert_exactly_once(&self, n: u64) {
        let counts = self.counts();
        let wrong: Vec<_> = counts.iter().filter(|(_, &c)| c != 1).collect();
        let missing: Vec<_> = (0..n).filter(|i| !counts.contains_key(i)).collect();
        assert!(wrong.is_empty(), "lines counted more than once: {wrong:?}");
        assert!(missing.is_empty(), "lines lost: {missing:?}");
        assert_eq!(counts.len() as u64, n, "unexpected lines: {counts:?}");
    }
}

/// How often each `u<N>` arrived among `transactions`.
fn counts(transactions: Vec<support::backend::Transaction>) -> BTreeMap<u64, u64> {
    let mut m = BTreeMap::new();
    for t in transactions {
        let n = t
            .credential()
            .trim_start_matches('u')
            .parse()
            .expect("u<N> keys only");
        *m.entry(n).or_default() += t.hits();
    }
    m
}

/// Writes log lines as NGINX does: through an open descriptor, reopened only when told (USR1).
struct Writer {
    path: PathBuf,
    file: File,
    next: u64,
}

impl Writer {
    fn open(path: &Path) -> Writer {
        Writer {
            path: path.to_path_buf(),
            file: append_to(path),
            next: 0,
        }
    }

    fn line(&mut self) -> String {
        let line = combined_line(now(), "GET", &format!("/v1/x?user_key=u{}", self.next), 200);
        self.next += 1;
        line
    }

    fn write(&mut self, lines: u64) {
        let text: String = (0..lines).map(|_| self.line()).collect();
        self.file.write_all(text.as_bytes()).unwrap();
    }

    fn reopen(&mut self) {
        self.file = append_to(&self.path);
    }
}

fn append_to(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
}

/// A counter of the summary tally logs when it stops (`stopped lines_read=... truncations=...`).
fn final_counter(logs: &str, name: &str) -> u64 {
    let summary = logs
        .lines()
        .rfind(|l| l.contains(" stopped lines_read="))
        .unwrap_or_else(|| panic!("no final summary in tally's log:\n{logs}"));
    field(summary, name).unwrap_or_else(|| panic!("no number {name}= in {summary}"))
}

/// The number in field `name=` of a log line (text format).
fn field(line: &str, name: &str) -> Option<u64> {
    line.split(&format!(" {name}="))
        .nth(1)?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

/// `tail.reclaim`: a long stream through one file, as in a sidecar's emptyDir. The space of what
/// 3scale accepted is given back while the file's size grows, and a restart half-way resumes
/// exactly (the first block, which the fingerprint reads, stays).
#[test]
fn reclaim_keeps_a_growing_file_small_and_counts_every_line_once() {
    const ROUNDS: u64 = 12;
    const LINES: u64 = 10_000;
    // What may stay allocated: a step (1 MiB) not freed yet, the first block, and some slack for the
    // file system's own allocation.
    const BOUND: u64 = 2 << 20;
    let s = Setup::new();
    let log = s.path("access.log");
    let config = s.config("access.log", true, "reclaim = true\n", "");
    let mut w = Writer::open(&log);
    let mut tally = Some(Tally::start(&config, &[]));
    let allocated = || {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&log).unwrap().blocks() * 512
    };
    for round in 1..=ROUNDS {
        w.write(LINES);
        w.file.sync_all().unwrap();
        s.wait_for((round * LINES) as usize);
        let deadline = Instant::now() + WAIT;
        while allocated() > BOUND {
            assert!(
                Instant::now() < deadline,
                "round {round}: {} bytes still allocated of {} written:\n{}",
                allocated(),
                std::fs::metadata(&log).unwrap().len(),
                tally.as_ref().unwrap().logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if round == ROUNDS / 2 {
            tally.take().unwrap().stop(WAIT);
            tally = Some(Tally::start(&config, &[]));
        }
    }
    let size = std::fs::metadata(&log).unwrap().len();
    assert!(size > 6 * BOUND, "the file grew to {size} bytes");
    let logs = tally.take().unwrap().stop(WAIT);
    assert!(!logs.contains("cannot free the space"), "{logs}");
    s.assert_exactly_once(ROUNDS * LINES);
}

fn rename_and_create_rotation(watch: bool) {
    let s = Setup::new();
    let log = s.path("access.log");
    let mut w = Writer::open(&log);
    w.write(50);
    let tally = Tally::start(&s.config("access.log", watch, "", ""), &[]);
    let following = format!("following file path={}", log.display());
    for round in 0..3 {
        // A log file lives much longer than tally takes to notice it; here, just long enough.
        tally.wait_for_logs(&following, round + 1, WAIT);
        w.write(30);
        // logrotate: shift the old ones, rename the live file; NGINX writes on until USR1.
        if s.path("access.log.1").exists() {
            std::fs::rename(s.path("access.log.1"), s.path("access.log.2")).unwrap();
        }
        std::fs::rename(&log, s.path("access.log.1")).unwrap();
        w.write(20);
        // A last line still without its newline when the writer reopens.
        let last = w.line();
        w.file
            .write_all(&last.as_bytes()[..last.len() - 1])
            .unwrap();
        w.reopen();
        w.write(10 + round as u64);
    }
    s.wait_for(w.next as usize);
    let logs = tally.stop(WAIT);
    s.assert_exactly_once(w.next);
    // Each rotation is seen once (each round waits until the new file is followed), as a rotation.
    assert_eq!(final_counter(&logs, "rotations"), 3, "{logs}");
    assert_eq!(final_counter(&logs, "truncations"), 0, "{logs}");
}

fn copytruncate_rotation(watch: bool) {
    let s = Setup::new();
    let log = s.path("access.log");
    let mut w = Writer::open(&log);
    let tally = Tally::start(&s.config("access.log", watch, "", ""), &[]);
    for _ in 0..3 {
        w.write(40);
        // copytruncate loses what the writer adds between the copy and the truncation, whoever
        // reads: the test lets tally catch up first, as the real race is not tally's to win.
        s.wait_for(w.next as usize);
        std::fs::copy(&log, s.path("access.log.1")).unwrap();
        w.file.set_len(0).unwrap();
        w.write(5);
    }
    s.wait_for(w.next as usize);
    let logs = tally.stop(WAIT);
    s.assert_exactly_once(w.next);
    // Each truncation is seen once (each round waits for its lines before the next), as such.
    assert_eq!(final_counter(&logs, "truncations"), 3, "{logs}");
    assert_eq!(final_counter(&logs, "rotations"), 0, "{logs}");
}

/// Poll-only, not in `both_modes!`: the point is a change tally does not see happen, and file events
/// would show it the truncation.
#[test]
fn truncated_and_regrown_between_two_looks() {
    let s = Setup::new();
    let log = s.path("access.log");
    let mut w = Writer::open(&log);
    w.write(30);
    // A slow poll and no events: the truncation and the regrowth both happen between two looks.
    let tally = Tally::start(
        &s.config("access.log", false, "poll_interval = \"3s\"\n", ""),
        &[],
    );
    s.wait_for(30);
    w.file.set_len(0).unwrap();
    w.write(60); // more bytes than before the truncation
    s.wait_for(90);
    let logs = tally.stop(WAIT);
    s.assert_exactly_once(90);
    assert_eq!(final_counter(&logs, "truncations"), 1, "{logs}");
}

fn deleted_file_is_finished_and_closed(watch: bool) {
    let s = Setup::new();
    let log = s.path("access.log");
    let mut w = Writer::open(&log);
    w.write(40);
    let tally = Tally::start(&s.config("access.log", watch, "", ""), &[]);
    s.wait_for(40);
    std::fs::remove_file(&log).unwrap();
    w.write(15); // the writer still holds the deleted file open
    s.wait_for(55);
    // Once finished, tally closes it, so the disk space can be freed.
    let fds = format!("/proc/{}/fd", tally.child.id());
    let deadline = Instant::now() + WAIT;
    loop {
        let open_deleted = std::fs::read_dir(&fds)
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
            .any(|target| target.to_string_lossy().contains("access.log (deleted)"));
        if !open_deleted {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tally keeps the deleted file open"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A new file under the same name is read from its start.
    let mut w2 = Writer::open(&log);
    w2.next = 55;
    w2.write(5);
    s.wait_for(60);
    let logs = tally.stop(WAIT);
    s.assert_exactly_once(60);
    // The deletion is seen once; the new file is a new file, not a truncation of the old one.
    assert_eq!(final_counter(&logs, "rotations"), 1, "{logs}");
    assert_eq!(final_counter(&logs, "truncations"), 0, "{logs}");
}

fn files_that_appear_later_and_glob_matches(watch: bool) {
    let s = Setup::new();
    std::fs::create_dir(s.path("logs")).unwrap();
    // read_from = end applies to files found at start-up only, not to files that appear later.
    let config = s
        .config("logs/*.log", watch, "", "")
        .to_string_lossy()
        .into_owned();
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("read_from = \"beginning\"", "read_from = \"end\"");
    std::fs::write(&config, text).unwrap();
    let mut existing = Writer::open(&s.path("logs/old.log"));
    existing.next = 1000;
    existing.write(10); // before start, read_from = end: never reported
    let tally = Tally::start(Path::new(&config), &[]);
    tally.wait_for_log("following file", WAIT);
    let mut a = Writer::open(&s.path("logs/a.log"));
    a.write(20);
    s.wait_for(20);
    // The file the pattern does not match comes first: were it followed, it would be read no later
    // than b.log, so before b.log's lines arrive and tally is stopped.
    let mut ignored = Writer::open(&s.path("logs/b.txt"));
    ignored.next = 5000;
    ignored.write(3);
    let mut b = Writer::open(&s.path("logs/b.log"));
    b.next = 20;
    b.write(15);
    s.wait_for(35);
    let logs = tally.stop(WAIT);
    s.assert_exactly_once(35);
    // Not even read: neither old.log's lines from before the start nor b.txt's.
    assert_eq!(final_counter(&logs, "lines_read"), 35, "{logs}");
}

fn long_lines_and_invalid_utf8_do_not_stop_reading(watch: bool) {
    let s = Setup::new();
    let log = s.path("access.log");
    let mut w = Writer::open(&log);
    let tally = Tally::start(
        &s.config("access.log", watch, "max_line_length = 4096\n", ""),
        &[],
    );
    w.write(5);
    w.file.write_all(&vec![b'x'; 1_000_000]).unwrap(); // a 1 MB line, in pieces
    w.file.write_all(b"\n").unwrap();
    w.write(5);
    w.file.write_all(b"\xff\xfe garbage \xc3\x28\n").unwrap();
    w.file
        .write_all(format!("{}\n", "y".repeat(5000)).as_bytes())
        .unwrap(); // over the limit, whole
    w.write(5);
    s.wait_for(15);
    let logs = tally.stop(WAIT);
    s.assert_exactly_once(15);
    // The 1 MB line (dropped while read) and the 5000-byte one (whole, dropped when parsed) are
    // too long, the garbage is malformed: 15 + 3 lines read.
    assert_eq!(final_counter(&logs, "skipped_too_long"), 2, "{logs}");
    assert_eq!(final_counter(&logs, "skipped_malformed"), 1, "{logs}");
    assert_eq!(final_counter(&logs, "lines_read"), 18, "{logs}");
}

/// kill -9 at random moments over a steady stream of writes: after the last restart, every line has
/// arrived at least once (no loss), and at most once more per kill during which a report call
/// covering it was under way (tally says so at the next start, with the byte range): the one case no
/// client of an API without idempotency keys can settle (README, "Exactness").
fn kill_9_at_many_moments_loses_and_duplicates_nothing(watch: bool) {
    kill_9_at_many_moments(watch, &["42"]);
}

/// The same with one file feeding two services, whose reporting fails independently (each is down
/// in some runs, up in others): each service counts every line, exactly as bounded above.
#[test]
fn kill_9_with_one_file_feeding_two_services_that_fail_independently() {
    kill_9_at_many_moments(true, &["42", "43"]);
}

/// tally's test switch for the length at which its state journal is compacted.
const COMPACT_AFTER_VAR: &str = "TALLY_TEST_STATE_COMPACT_BYTES";

fn kill_9_at_many_moments(watch: bool, services: &[&str]) {
    const KILLS: usize = 24;
    let s = Setup::new();
    let log = s.path("access.log");
    let config = s.config_for(
        services,
        "access.log",
        watch,
        "",
        "[report]\nflush_interval = \"50ms\"\nmax_transactions = 40\n",
    );
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writer = {
        let writing = writing.clone();
        let log = log.clone();
        std::thread::spawn(move || {
            let mut w = Writer::open(&log);
            while writing.load(std::sync::atomic::Ordering::SeqCst) {
                w.write(3);
                std::thread::sleep(Duration::from_millis(2));
            }
            w.next
        })
    };
    // The log of each run, in order: run k + 1 says what was under way at kill k.
    let mut runs = Vec::new();
    let mut cut_compactions = 0;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for _ in 0..KILLS {
        // With several services, each one's reporting is down in a third of the runs.
        if services.len() > 1 {
            for service_id in services {
                s.backend.set_down(service_id, next() % 3 == 0);
            }
        }
        // The state journal is folded into a fresh snapshot every few entries, so that kills
        // also land in the middle of compactions.
        let tally = Tally::start_env(&config, &[], &[(COMPACT_AFTER_VAR, "800")]);
        // This sleep chooses the moment of the kill; nothing waits on it.
        std::thread::sleep(Duration::from_millis(30 + next() % 400));
        tally.signal("KILL");
        let mut tally = tally;
        tally.wait(WAIT);
        runs.push(tally.logs());
        // A temp file left behind: this kill stopped a compaction half-way.
        cut_compactions += ["tally.state.tmp", "tally.journal.tmp"]
            .iter()
            .filter(|f| s.path("state").join(f).exists())
            .count();
    }
    writing.store(false, std::sync::atomic::Ordering::SeqCst);
    let written = writer.join().expect("the writer thread");
    for service_id in services {
        s.backend.set_down(service_id, false);
    }
    let tally = Tally::start(&config, &[]);
    s.backend
        .wait_until(WAIT, "every line written, for every service", |_| {
            services
                .iter()
                .all(|id| s.counts_of(id).len() as u64 >= written)
        });
    let last_log = tally.log.clone();
    tally.stop(WAIT);
    runs.push(std::fs::read_to_string(&last_log).expect("read the last run's log"));
    let content = std::fs::read(&log).expect("read the access log");
    // Where each line starts and ends in the file, to place it in the ranges under way.
    let mut spans = Vec::new();
    let mut start = 0u64;
    for line in content.split_inclusive(|&b| b == b'\n') {
        spans.push((start, start + line.len() as u64));
        start += line.len() as u64;
    }
    assert_eq!(spans.len() as u64, written, "lines in the file");
    for service_id in services {
        assert!(
            under_way_ranges(&runs[0], service_id).is_empty(),
            "{}",
            runs[0]
        );
        // Per restart (per kill), the ranges it logged. A range stays in the state until the first
        // commit of the next run, so one range may be logged at two restarts: each counts once.
        let restarts: Vec<Vec<(u64, u64)>> = runs[1..]
            .iter()
            .map(|l| under_way_ranges(l, service_id))
            .collect();
        let counts = s.counts_of(service_id);
        let unexpected: Vec<_> = counts.keys().filter(|&&n| n >= written).collect();
        assert!(unexpected.is_empty(), "lines never written: {unexpected:?}");
        let mut wrong = Vec::new();
        let mut times = BTreeMap::<u64, u64>::new();
        for (n, &(from, to)) in spans.iter().enumerate() {
            let count = counts.get(&(n as u64)).copied().unwrap_or(0);
            *times.entry(count).or_default() += 1;
            let kills = restarts
                .iter()
                .filter(|ranges| ranges.iter().any(|&(f, t)| f <= from && to <= t))
                .count() as u64;
            if count == 0 || count > 1 + kills {
                wrong.push(format!(
                    "line {n} (bytes {from}..{to}) counted {count} times, under way at {kills} kills"
                ));
            }
        }
        let ranges: usize = restarts.iter().map(Vec::len).sum();
        eprintln!(
            "service {service_id}: {written} lines, {KILLS} kills ({cut_compactions} in a compaction), {ranges} ranges under way logged at {} restarts, lines counted 2x: {}, 3x: {}, more: {}",
            restarts.iter().filter(|r| !r.is_empty()).count(),
            times.get(&2).unwrap_or(&0),
            times.get(&3).unwrap_or(&0),
            times.range(4..).map(|(_, n)| n).sum::<u64>(),
        );
        assert!(
            wrong.is_empty(),
            "service {service_id}: {} lines lost or counted more often than the kills allow:\n{}\nranges under way, per restart: {restarts:?}",
            wrong.len(),
            wrong.iter().take(20).cloned().collect::<Vec<_>>().join("\n"),
        );
    }
}

/// The byte ranges (`from`, `to`) of the report calls of `service_id` that a run's log says were
/// under way when tally last stopped.
fn under_way_ranges(logs: &str, service_id: &str) -> Vec<(u64, u64)> {
    logs.lines()
        .filter(|l| l.contains("a report call was under way when tally stopped"))
        .filter(|l| {
            l.contains(&format!(" service_id=\"{service_id}\""))
                || l.contains(&format!(" service_id={service_id} "))
        })
        .map(|l| {
            let number =
                |name| field(l, name).unwrap_or_else(|| panic!("no number {name}= in {l}"));
            (number("from"), number("to"))
        })
        .collect()
}

#[test]
fn restart_resumes_at_the_checkpoint_and_read_from_applies_once() {
    let s = Setup::new();
    let log = s.path("access.log");
    let mut w = Writer::open(&log);
    let mut before = Writer::open(&log);
    before.next = 9000;
    before.write(10); // there before the first start, read_from = end: never reported
                      // A line being written when tally starts at the end: its rest is no line of its own.
    let half = combined_line(now(), "GET", "/?user_key=u8999", 200);
    let (head, rest) = half.split_at(half.len() / 2);
    append_to(&log).write_all(head.as_bytes()).unwrap();
    let config = s
        .config("access.log", true, "", "")
        .to_string_lossy()
        .into_owned();
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("read_from = \"beginning\"", "read_from = \"end\"");
    std::fs::write(&config, text).unwrap();
    let tally = Tally::start(Path::new(&config), &[]);
    tally.wait_for_log("following file", WAIT);
    append_to(&log).write_all(rest.as_bytes()).unwrap();
    w.write(5);
    s.wait_for(5);
    let logs = tally.stop(WAIT);
    assert_eq!(final_counter(&logs, "skipped_malformed"), 0, "{logs}");
    w.write(7); // while tally is down
    let tally = Tally::start(Path::new(&config), &[]);
    s.wait_for(12);
    let logs = tally.stop(WAIT);
    s.assert_exactly_once(12);
    assert!(logs.contains("resuming at the checkpoint"), "{logs}");
}

#[test]
fn a_file_rotated_while_tally_was_down_is_finished_first() {
    let s = Setup::new();
    let log = s.path("access.log");
    let config = s.config("access.log", true, "", "");
    let mut w = Writer::open(&log);
    w.write(20);
    Tally::run_once(&config);
    w.write(10); // written after the checkpoint, then rotated away while tally is down
    std::fs::rename(&log, s.path("access.log.1")).unwrap();
    w.reopen();
    w.write(15);
    Tally::run_once(&config);
    s.assert_exactly_once(45);
}

#[test]
fn a_different_file_under_the_same_name_or_inode_is_read_from_its_start() {
    let s = Setup::new();
    let log = s.path("access.log");
    let config = s.config("access.log", true, "", "");
    let mut w = Writer::open(&log);
    w.write(20);
    Tally::run_once(&config);
    // Same inode, other content, longer than the checkpoint: only the fingerprint can tell.
    w.file.set_len(0).unwrap();
    w.write(40);
    Tally::run_once(&config);
    s.assert_exactly_once(60);
    // Deleted and created again while tally is down (the file system may well reuse the inode).
    std::fs::remove_file(&log).unwrap();
    let mut w2 = Writer::open(&log);
    w2.next = 60;
    w2.write(25);
    Tally::run_once(&config);
    s.assert_exactly_once(85);
}

#[test]
fn a_corrupt_state_file_is_a_clear_error_and_a_half_written_one_is_ignored() {
    let s = Setup::new();
    let log = s.path("access.log");
    let config = s.config("access.log", true, "", "");
    let mut w = Writer::open(&log);
    w.write(10);
    Tally::run_once(&config);
    let state = s.path("state/tally.state");
    let good = std::fs::read_to_string(&state).unwrap();
    // A temp file left by a crash in the middle of a write: ignored, nothing re-sent.
    std::fs::write(s.path("state/tally.state.tmp"), &good[..good.len() / 2]).unwrap();
    w.write(5);
    Tally::run_once(&config);
    s.assert_exactly_once(15);
    // The state file itself cut short: tally refuses to guess, and says what to do.
    std::fs::write(&state, &good[..good.len() / 2]).unwrap();
    let mut bad = Tally::start(&config, &["--once"]);
    let status = bad.wait(WAIT);
    assert!(!status.success());
    let logs = bad.logs();
    assert!(
        logs.contains("is corrupt") && logs.contains("to start over"),
        "{logs}"
    );
    assert!(!logs.contains("panicked"), "{logs}");
    s.assert_exactly_once(15);
}

#[test]
fn a_second_tally_on_the_same_state_is_refused() {
    let s = Setup::new();
    let config = s.config("access.log", true, "", "");
    let first = Tally::start(&config, &[]);
    first.wait_for_log("tally started", WAIT);
    let mut second = Tally::start(&config, &[]);
    assert!(!second.wait(WAIT).success());
    assert!(
        second.logs().contains("another tally is using it"),
        "{}",
        second.logs()
    );
    first.stop(WAIT);
}

#[test]
fn a_backend_outage_stops_reading_ahead_and_memory_stays_bounded() {
    let s = Setup::new();
    s.backend.fail_next(usize::MAX, 503);
    let log = s.path("access.log");
    let mut w = Writer::open(&log);
    w.write(200_000); // ~25 MB of log
    let tally = Tally::start(
        &s.config(
            "access.log",
            true,
            "",
            "[log]\nstats_interval = \"200ms\"\n",
        ),
        &[],
    );
    tally.wait_for_log("HTTP 503", WAIT);
    // Measured once reading has stopped, when the queues are as full as they get: the file's
    // progress line (every 200 ms) shows the same read offset three times in a row.
    let deadline = Instant::now() + WAIT;
    let unread = loop {
        let logs = tally.logs();
        let progress: Vec<(u64, u64)> = logs
            .lines()
            .filter(|l| l.contains("file progress"))
            .filter_map(|l| Some((field(l, "read")?, field(l, "unread_bytes")?)))
            .collect();
        if let [.., (a, _), (b, _), (c, unread)] = progress[..] {
            if a == b && b == c {
                break unread;
            }
        }
        assert!(
            Instant::now() < deadline,
            "tally did not stop reading within {WAIT:?} while the backend was down:\n{logs}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let status = std::fs::read_to_string(format!("/proc/{}/status", tally.child.id()))
        .expect("read tally's /proc status");
    let rss_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .expect("VmRSS in /proc status");
    assert!(
        unread > 10_000_000,
        "tally read ahead of a backend that is down:\n{}",
        tally.logs()
    );
    assert!(
        rss_kib < 64 * 1024,
        "RSS {rss_kib} KiB while the backend is down"
    );
    // When the backend returns, everything arrives, once.
    s.backend.fail_next(0, 503);
    s.backend
        .wait_until(WAIT, "the backlog", |b| b.transactions().len() >= 200_000);
    tally.stop(WAIT);
    s.assert_exactly_once(200_000);
}

/// A container runtime's log: records around the lines, a long line split over several records
/// (`P` parts, or Docker's `log` without its `\n`) with the other stream's records between them.
/// A restart while a line's last part has not come resumes at its first: every line once.
fn container_records(wrapper: &str, record: fn(&str, bool, &str) -> String) {
    let s = Setup::new();
    let log = s.path("container.log");
    let config = s.config("container.log", true, "", "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "service_id = \"42\"",
        &format!("service_id = \"42\"\nwrapper = \"{wrapper}\""),
    );
    std::fs::write(&config, text).unwrap();
    let line = |n: u64| {
        combined_line(now(), "GET", &format!("/v1/x?user_key=u{n}"), 200)
            .trim_end()
            .to_string()
    };
    let mut file = append_to(&log);
    let mut write = |text: String| file.write_all(text.as_bytes()).unwrap();
    let (l1, l3) = (line(1), line(3));
    write(record("stdout", true, &line(0)));
    write(record("stdout", false, &l1[..20]));
    write(record(
        "stderr",
        true,
        "a warning between the parts, user_key=u900",
    ));
    write(record("stdout", false, &l1[20..50]));
    write(record("stdout", true, &l1[50..]));
    write(record("stderr", true, &line(901)));
    write(record("stdout", true, &line(2)));
    write(record("stdout", false, &l3[..30]));
    let logs = Tally::run_once(&config).logs();
    s.assert_exactly_once(3);
    assert!(logs.contains(" lines_read=3 "), "{logs}");
    assert!(logs.contains(" skipped_malformed=0 "), "{logs}");
    // The rest of line 3, and line 4: line 3 is read again from its first part.
    write(record("stderr", true, "more noise"));
    write(record("stdout", false, &l3[30..40]));
    write(record("stdout", true, &l3[40..]));
    write(record("stdout", true, &line(4)));
    let logs = Tally::run_once(&config).logs();
    s.assert_exactly_once(5);
    assert!(logs.contains(" skipped_malformed=0 "), "{logs}");
}

#[test]
fn cri_records_with_split_lines_count_each_line_once() {
    container_records("cri", |stream, last, message| {
        let tag = if last { "F" } else { "P" };
        format!("2026-11-26T10:15:00.123456789Z {stream} {tag} {message}\n")
    });
}

#[test]
fn docker_json_file_records_with_split_lines_count_each_line_once() {
    container_records("docker", |stream, last, message| {
        let log =
            serde_json::to_string(&format!("{message}{}", if last { "\n" } else { "" })).unwrap();
        format!(r#"{{"log":{log},"stream":"{stream}","time":"2026-11-26T10:15:00.123456789Z"}}"#)
            + "\n"
    });
}
