//! Counters of everything tally reads, skips and reports, and the log setup.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::parse::Skip;

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
