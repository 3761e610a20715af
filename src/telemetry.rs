//! Counters of everything tally reads, skips and reports, and the log setup.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use crate::parse::Skip;
use crate::tail::FileKey;

/// Process-wide counters. Every line read ends up counted as reported or as skipped under a reason.
#[derive(Debug, Default)]
pub struct Metrics {
    pub lines_read: AtomicU64,
    pub skipped_malformed: AtomicU64,
    pub skipped_no_credential: AtomicU64,
    pub skipped_invalid_credential: AtomicU64,
    pub skipped_too_long: AtomicU64,
    pub requests_reported: AtomicU64,
    pub transactions_reported: AtomicU64,
    pub report_calls: AtomicU64,
    pub report_failures: AtomicU64,
    pub report_rejections: AtomicU64,
    pub truncations: AtomicU64,
    pub rotations: AtomicU64,
    /// Where each followed file stands.
    pub files: Progress,
}

impl Metrics {
    pub fn skipped(&self, reason: Skip) {
        let counter = match reason {
            Skip::Malformed => &self.skipped_malformed,
            Skip::NoCredential => &self.skipped_no_credential,
            Skip::InvalidCredential => &self.skipped_invalid_credential,
            Skip::TooLong => &self.skipped_too_long,
        };
        counter.fetch_add(1, Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Logs the counters in one structured line.
    pub fn log_summary(&self, message: &str) {
        let g = |c: &AtomicU64| c.load(Relaxed);
        tracing::info!(
            lines_read = g(&self.lines_read),
            requests_reported = g(&self.requests_reported),
            transactions_reported = g(&self.transactions_reported),
            skipped_malformed = g(&self.skipped_malformed),
            skipped_no_credential = g(&self.skipped_no_credential),
            skipped_invalid_credential = g(&self.skipped_invalid_credential),
            skipped_too_long = g(&self.skipped_too_long),
            report_calls = g(&self.report_calls),
            report_failures = g(&self.report_failures),
            report_rejections = g(&self.report_rejections),
            rotations = g(&self.rotations),
            truncations = g(&self.truncations),
            "{message}"
        );
    }
}

/// Where each followed file stands, for the lag report. The tail updates what it has read, the
/// reporter what 3scale has accepted; the summary, which neither of them can block, logs it.
#[derive(Debug, Default)]
pub struct Progress {
    files: Mutex<BTreeMap<(usize, FileKey), FileProgress>>,
}

#[derive(Debug, Clone)]
struct FileProgress {
    path: Arc<Path>,
    read: u64,
    committed: u64,
    /// The log time of the last accepted line, 0 if none yet.
    line_time: i64,
}

impl Progress {
    fn with(&self, f: impl FnOnce(&mut BTreeMap<(usize, FileKey), FileProgress>)) {
        if let Ok(mut files) = self.files.lock() {
            f(&mut files);
        }
    }

    pub fn read(&self, source: usize, key: FileKey, path: &Arc<Path>, offset: u64) {
        self.with(|files| {
            let entry = files.entry((source, key)).or_insert_with(|| FileProgress {
                path: path.clone(),
                read: 0,
                committed: 0,
                line_time: 0,
            });
            entry.path = path.clone();
            entry.read = offset;
        });
    }

    pub fn committed(&self, source: usize, key: FileKey, offset: u64, line_time: i64) {
        self.with(|files| {
            if let Some(entry) = files.get_mut(&(source, key)) {
                entry.committed = offset;
                if line_time != 0 {
                    entry.line_time = line_time;
                }
            }
        });
    }

    pub fn closed(&self, source: usize, key: FileKey) {
        self.with(|files| {
            files.remove(&(source, key));
        });
    }

    /// Logs, per file, the bytes not yet accepted by 3scale (`lag_bytes`, of which `unread_bytes`
    /// are not even read: backpressure) and the age of the last accepted line when behind.
    pub fn log(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let files = match self.files.lock() {
            Ok(files) => files.clone(),
            Err(_) => return,
        };
        for ((_, key), f) in files {
            use std::os::unix::fs::MetadataExt;
            let size = std::fs::metadata(&f.path)
                .ok()
                .filter(|m| m.dev() == key.dev && m.ino() == key.ino)
                .map_or(f.read, |m| m.len());
            let lag_bytes = size.saturating_sub(f.committed);
            let lag_seconds = if lag_bytes > 0 && f.line_time > 0 {
                (now - f.line_time).max(0)
            } else {
                0
            };
            tracing::info!(
                path = %f.path.display(),
                size,
                read = f.read,
                committed = f.committed,
                lag_bytes,
                unread_bytes = size.saturating_sub(f.read),
                lag_seconds,
                "file progress"
            );
        }
    }
}

/// Sets up logging to stderr, human-readable or JSON lines. `RUST_LOG`, when set, overrides `level`.
pub fn init_logging(json: bool, level: &str) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
        .or_else(|| tracing_subscriber::EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}
