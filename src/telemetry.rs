//! Counters of everything tally reads, skips and reports, and the log setup.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::identity::FileKey;
use crate::parse::{for_each_skip, Skip};

/// Why a call failed, as `tally_call_failures_total` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Connected, but the answer did not come within the response timeout.
    Timeout,
    /// The connection could not be made, or broke.
    Connection,
    /// 3scale (or a proxy in front of it) answered 5xx.
    Http5xx,
    /// 3scale refused the call as a whole (4xx).
    Http4xx,
    /// An answer that is not 3scale's (a report answered other than 202, an authorize answer that
    /// is not its XML): something else answers at `backend.url`.
    Unexpected,
}

impl Cause {
    pub const ALL: [Cause; 5] = [
        Cause::Timeout,
        Cause::Connection,
        Cause::Http5xx,
        Cause::Http4xx,
        Cause::Unexpected,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Cause::Timeout => "timeout",
            Cause::Connection => "connection",
            Cause::Http5xx => "http_5xx",
            Cause::Http4xx => "http_4xx",
            Cause::Unexpected => "unexpected_answer",
        }
    }
}

/// The calls tally makes to 3scale, as `tally_call_failures_total` labels them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Report,
    Authorize,
}

impl Endpoint {
    pub const ALL: [Endpoint; 2] = [Endpoint::Report, Endpoint::Authorize];

    pub fn label(self) -> &'static str {
        match self {
            Endpoint::Report => "report",
            Endpoint::Authorize => "authorize",
        }
    }
}

/// A metric's type in `/metrics`.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// A family of [`Metrics::COUNTERS`]: what `/metrics` shows of it.
struct Family {
    /// Its name in `/metrics`, after `tally_`.
    name: &'static str,
    kind: Kind,
    help: &'static str,
    samples: &'static [Sample],
}

/// A sample of a [`Family`], one per field: its labels (`{reason="too_old"}`, or none) and the field.
type Sample = (&'static str, fn(&Metrics) -> &AtomicU64);

/// Declares [`Metrics`] from its table of counters and [`for_each_skip`]'s reasons: the fields,
/// [`Metrics::COUNTERS`] (which `/metrics` iterates) and [`Metrics::log_summary`] (tracing takes
/// field names only as written, so the macro writes them out).
macro_rules! declare_metrics {
    (
        counters {
            $( $kind:ident $family:ident $help:literal {
                $( $field:ident $( ($key:ident = $value:literal) )? ),+ $(,)?
            } )+
        }
        $(#[$attr:meta])*
        pub struct Metrics { $($rest:tt)* }
        $( $(#[doc = $skip_doc:literal])+ $skip:ident = $skip_label:literal, $skip_field:ident; )+
    ) => {
        $(#[$attr])*
        pub struct Metrics {
            $($(
                #[doc = concat!($help $(, " This field: `", stringify!($key), "=\"", $value, "\"`.")?)]
                pub $field: AtomicU64,
            )+)+
            $($rest)*
        }

        impl Metrics {
            /// The counters' families, in the table's order.
            const COUNTERS: &[Family] = &[$(
                Family {
                    name: stringify!($family),
                    kind: Kind::$kind,
                    help: $help,
                    samples: &[$((
                        concat!("" $(, "{", stringify!($key), "=\"", $value, "\"}")?),
                        |m| &m.$field,
                    )),+],
                },
            )+];

            /// Logs the counters in one structured line: every field of the table, the skips by
            /// reason and the failed calls by endpoint.
            pub fn log_summary(&self, message: &str) {
                tracing::info!(
                    $($( $field = self.$field.load(Relaxed), )+)+
                    $( $skip_field = self.skips(Skip::$skip), )+
                    report_failures = self.failures(Endpoint::Report),
                    authorize_failures = self.failures(Endpoint::Authorize),
                    "{message}"
                );
            }
        }
    };
}

// The process-wide counters, declared once. A family: its kind, its name in `/metrics` (after
// `tally_`), its help, and the fields that count it, one per label value. Each field is logged in
// the summary under its own name (dashboards and log queries use both names: keep them).
for_each_skip!(declare_metrics! {
    counters {
        Counter lines_read_total "Log lines read." { lines_read }
        Counter requests_reported_total "Requests 3scale accepted." { requests_reported }
        Counter transactions_reported_total "Transactions 3scale accepted." { transactions_reported }
        Counter requests_dropped_total
            "Requests not sent, by reason: 3scale would drop their whole call (too_old, too_new, invalid_credential), the service does not take their kind of credential (wrong_credential_kind: see credentials.mode), or their usage named only metrics the service does not have (unknown_metric)." {
            dropped_too_old(reason = "too_old"),
            dropped_too_new(reason = "too_new"),
            dropped_invalid_credential(reason = "invalid_credential"),
            dropped_wrong_credential_kind(reason = "wrong_credential_kind"),
            dropped_unknown_metric(reason = "unknown_metric"),
        }
        Counter report_calls_total "Report calls made." { report_calls }
        Counter ambiguous_resends_total
            "Report calls sent again after their answer did not come (3scale may have processed them: each may count twice)."
            { ambiguous_resends }
        Counter report_rejections_total
            "Calls 3scale rejected as a whole (bad token, unknown service)." { report_rejections }
        Counter authorize_calls_total "Authorize calls checking new credentials." { authorize_calls }
        Counter rotations_total "Log files rotated or deleted." { rotations }
        Counter truncations_total "Log files truncated or replaced in place." { truncations }
        Counter reclaimed_bytes_total
            "Bytes of log files given back to the file system after 3scale accepted their lines (tail.reclaim)."
            { reclaimed_bytes }
        Counter proxy_config_refreshes_total
            "Refreshes of the 3scale proxy configuration, by result: applied (a new version, in use from the next line), restarted (a new version that adds or removes services, or changes their backend credentials: the pipeline stopped in order and started again with it), unchanged, failed (unreachable, refused or invalid: the last good one stays), not_applied (such a version during --once: it waits)." {
            proxy_config_applied(result = "applied"),
            proxy_config_restarted(result = "restarted"),
            proxy_config_unchanged(result = "unchanged"),
            proxy_config_failed(result = "failed"),
            proxy_config_not_applied(result = "not_applied"),
        }
        Counter reloads_total
            "Reloads of the configuration file (SIGHUP), by result: applied (the pipeline stopped in order and started again with it), failed (invalid, or a change that needs a new process: the configuration in use stays)." {
            reloads_applied(result = "applied"),
            reloads_failed(result = "failed"),
        }
    }

    /// Process-wide counters. Every line read ends up counted as reported or as skipped under a
    /// reason.
    #[derive(Debug, Default)]
    pub struct Metrics {
        /// Lines skipped, by reason (`Skip as usize`).
        skipped: [AtomicU64; Skip::ALL.len()],
        /// Failed calls by endpoint and cause (`Endpoint as usize`, `Cause as usize`).
        call_failures: [[AtomicU64; Cause::ALL.len()]; Endpoint::ALL.len()],
        /// Where each followed file stands.
        pub files: Progress,
        /// The Response codes of the lines read, for the page (off without a listener).
        pub codes: crate::codes::Codes,
        /// Transactions not sent per (masked) credential that 3scale does not know.
        pub invalid_credentials: Mutex<BTreeMap<String, u64>>,
        /// Per (service, metric) the service does not have: the transactions whose usage of it was
        /// taken out.
        unknown_metrics: Mutex<BTreeMap<(String, String), u64>>,
        /// What keeps tally from doing its job now (a service 3scale rejects, a state it cannot write, a
        /// log it cannot open), by what it is about.
        problems: Mutex<BTreeMap<String, String>>,
        /// What `/healthz` shows without failing (tally reports, but something needs a look), by
        /// what it is about.
        warnings: Mutex<BTreeMap<String, String>>,
        /// Per service: since when requests wait with nothing accepted, and the last failure.
        services: Mutex<BTreeMap<String, Waiting>>,
        /// Stages that stopped abnormally (a panic), and a wake-up for whoever waits for one.
        deaths: Mutex<Vec<String>>,
        died: tokio::sync::Notify,
        stalled_after: StalledAfter,
    }
});

/// How long a service may have requests waiting with nothing accepted before `/healthz` says so.
#[derive(Debug)]
struct StalledAfter(Duration);

impl Default for StalledAfter {
    fn default() -> StalledAfter {
        StalledAfter(Duration::from_secs(300))
    }
}

#[derive(Debug, Default)]
struct Waiting {
    since: Option<Instant>,
    last_failure: Option<String>,
}

impl Metrics {
    /// Metrics whose health turns bad when a service accepts nothing for `stalled_after` while
    /// requests wait.
    pub fn new(stalled_after: Duration) -> Metrics {
        Metrics {
            stalled_after: StalledAfter(stalled_after),
            ..Metrics::default()
        }
    }

    /// These metrics, keeping the Response codes of the lines read (`calls_per_code` calls of
    /// each) for the page.
    pub(crate) fn with_codes(self, calls_per_code: usize) -> Metrics {
        Metrics {
            codes: crate::codes::Codes::new(calls_per_code),
            ..self
        }
    }

    /// A stage of the pipeline stopped abnormally: logged, `/healthz` fails, and tally must stop with
    /// an error (its supervisor restarts it; it resumes from its checkpoints).
    pub fn stage_died(&self, stage: &str, why: &str) {
        tracing::error!(stage, error = %printable(why),
            "a stage of tally stopped abnormally: tally stops with an error (restarted, it resumes from its checkpoints)");
        self.set_problem(
            stage,
            Some(format!("stopped abnormally: {}", printable(why))),
        );
        if let Ok(mut deaths) = self.deaths.lock() {
            deaths.push(format!("{stage} stopped abnormally: {why}"));
        }
        self.died.notify_one();
    }

    /// The first stage that stopped abnormally, if one did.
    pub fn first_death(&self) -> Option<String> {
        self.deaths.lock().ok()?.first().cloned()
    }

    /// Waits until a stage stops abnormally; returns the first.
    pub async fn a_stage_died(&self) -> String {
        loop {
            if let Some(death) = self.first_death() {
                return death;
            }
            self.died.notified().await;
        }
    }

    /// Counts a failed call to 3scale, and remembers it as the service's last failure.
    pub fn call_failed(&self, service_id: &str, endpoint: Endpoint, cause: Cause, detail: &str) {
        self.call_failures[endpoint as usize][cause as usize].fetch_add(1, Relaxed);
        self.with_service(service_id, |w| {
            w.last_failure = Some(format!("{} call: {detail}", endpoint.label()));
        });
    }

    /// How many calls to `endpoint` failed for `cause`.
    pub fn call_failures(&self, endpoint: Endpoint, cause: Cause) -> u64 {
        self.call_failures[endpoint as usize][cause as usize].load(Relaxed)
    }

    fn with_service(&self, service_id: &str, f: impl FnOnce(&mut Waiting)) {
        if let Ok(mut services) = self.services.lock() {
            f(services.entry(service_id.to_string()).or_default());
        }
    }

    /// Requests of the service wait for 3scale (from now, unless they already did).
    pub fn waiting(&self, service_id: &str) {
        self.with_service(service_id, |w| {
            w.since.get_or_insert_with(Instant::now);
        });
    }

    /// 3scale accepted a call of the service: `still_waiting` tells whether more requests wait.
    pub fn accepted(&self, service_id: &str, still_waiting: bool) {
        self.with_service(service_id, |w| {
            w.since = still_waiting.then(Instant::now);
            w.last_failure = None;
        });
    }

    /// Services whose requests have waited longer than `stalled_after` with nothing accepted.
    fn stalls(&self) -> Vec<String> {
        let Ok(services) = self.services.lock() else {
            return Vec::new();
        };
        services
            .iter()
            .filter_map(|(service_id, w)| {
                let waited = w.since?.elapsed();
                (waited > self.stalled_after.0).then(|| {
                    let waited = humantime::format_duration(Duration::from_secs(waited.as_secs()));
                    let why = w.last_failure.as_deref().unwrap_or("no answer yet");
                    format!("service {service_id}: nothing accepted by 3scale for {waited} while requests wait (last failure: {why})")
                })
            })
            .collect()
    }

    /// What waits for 3scale now, for the `--once` progress line: the service waiting longest,
    /// how long, and its last failure.
    pub fn longest_wait(&self) -> Option<(String, Duration, Option<String>)> {
        let services = self.services.lock().ok()?;
        services
            .iter()
            .filter_map(|(id, w)| Some((id.clone(), w.since?.elapsed(), w.last_failure.clone())))
            .max_by_key(|(_, waited, _)| *waited)
    }

    /// Counts `n` lines skipped for `reason`.
    pub fn skipped(&self, reason: Skip, n: u64) {
        self.skipped[reason as usize].fetch_add(n, Relaxed);
    }

    /// Lines skipped so far for `reason`.
    pub fn skips(&self, reason: Skip) -> u64 {
        self.skipped[reason as usize].load(Relaxed)
    }

    /// Adds `n` to one of the counters.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Counts transactions of a credential 3scale does not know (labels capped, the rest as "other").
    pub fn invalid_credential(&self, credential: &str, n: u64) {
        Metrics::add(&self.dropped_invalid_credential, n);
        if let Ok(mut m) = self.invalid_credentials.lock() {
            let label = mask(credential);
            let label = if m.len() < 1000 || m.contains_key(&label) {
                label
            } else {
                "other".to_string()
            };
            *m.entry(label).or_default() += n;
        }
    }

    /// Counts the transactions whose usage of `metric`, which `service_id` does not have, was
    /// taken out (labels capped, as credentials are).
    pub fn unknown_metric(&self, service_id: &str, metric: &str, n: u64) {
        if let Ok(mut m) = self.unknown_metrics.lock() {
            let key = (service_id.to_string(), metric.to_string());
            let key = if m.len() < 1000 || m.contains_key(&key) {
                key
            } else {
                (service_id.to_string(), "other".to_string())
            };
            *m.entry(key).or_default() += n;
        }
    }

    /// Records a problem about `what` (None: it is over). Returns whether that changed anything,
    /// so that callers log a lasting problem once, not at every retry.
    pub fn set_problem(&self, what: &str, why: Option<String>) -> bool {
        let Ok(mut m) = self.problems.lock() else {
            return false;
        };
        match why {
            Some(why) if m.get(what) != Some(&why) => {
                m.insert(what.to_string(), why);
                true
            }
            None => m.remove(what).is_some(),
            Some(_) => false,
        }
    }

    /// Sets (or, with None, clears) a warning `/healthz` shows while it stays healthy.
    pub fn set_warning(&self, what: &str, why: Option<String>) {
        if let Ok(mut m) = self.warnings.lock() {
            match why {
                Some(why) => m.insert(what.to_string(), why),
                None => m.remove(what),
            };
        }
    }

    /// The warnings `/healthz` shows.
    pub fn warnings(&self) -> Vec<String> {
        self.warnings
            .lock()
            .map(|m| {
                m.iter()
                    .map(|(what, why)| format!("{what}: {why}"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Why the process is unhealthy, if it is.
    pub fn problems(&self) -> Vec<String> {
        let mut problems: Vec<String> = self
            .problems
            .lock()
            .map(|m| {
                m.iter()
                    .map(|(what, why)| format!("{what}: {why}"))
                    .collect()
            })
            .unwrap_or_default();
        problems.extend(self.stalls());
        problems
    }

    /// How many calls to `endpoint` failed, whatever the cause.
    fn failures(&self, endpoint: Endpoint) -> u64 {
        Cause::ALL
            .iter()
            .map(|&cause| self.call_failures(endpoint, cause))
            .sum()
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
    /// Where this run started reading it.
    start: u64,
    read: u64,
    committed: u64,
    /// The log time of the oldest line read but not yet accepted, 0 if none waits.
    oldest_waiting: i64,
}

impl Progress {
    fn with(&self, f: impl FnOnce(&mut BTreeMap<(usize, FileKey), FileProgress>)) {
        if let Ok(mut files) = self.files.lock() {
            f(&mut files);
        }
    }

    /// A file is open, read from `offset` on.
    fn opened(&self, source: usize, key: FileKey, path: &Arc<Path>, offset: u64) {
        self.with(|files| {
            files.entry((source, key)).or_insert_with(|| FileProgress {
                path: path.clone(),
                start: offset,
                read: offset,
                committed: offset,
                oldest_waiting: 0,
            });
        });
    }

    pub fn read(&self, source: usize, key: FileKey, path: &Arc<Path>, offset: u64) {
        self.with(|files| {
            let entry = files.entry((source, key)).or_insert_with(|| FileProgress {
                path: path.clone(),
                start: 0,
                read: 0,
                committed: 0,
                oldest_waiting: 0,
            });
            entry.path = path.clone();
            entry.read = offset;
        });
    }

    /// What this run has read of the files it follows, and what is left to read in them now.
    pub fn backlog(&self) -> (u64, u64) {
        self.snapshot().iter().fold((0, 0), |(read, left), f| {
            (read + f.read.saturating_sub(f.start), left + f.unread_bytes)
        })
    }

    /// Lines of the file were parsed, the first of them logged at `first_line_time` (0: unknown).
    pub fn parsed(&self, source: usize, key: FileKey, first_line_time: i64) {
        self.with(|files| {
            if let Some(entry) = files.get_mut(&(source, key)) {
                if entry.oldest_waiting == 0 {
                    entry.oldest_waiting = first_line_time;
                }
            }
        });
    }

    /// 3scale accepted the file up to `offset`, whose last line was logged at `line_time`.
    pub fn committed(&self, source: usize, key: FileKey, offset: u64, line_time: i64) {
        self.with(|files| {
            if let Some(entry) = files.get_mut(&(source, key)) {
                entry.committed = offset;
                // Lines read past `offset` are at least as new as the last accepted one: its time
                // stands for theirs (a lag a little too high, never too low) until they are accepted.
                entry.oldest_waiting = if offset >= entry.read {
                    0
                } else if line_time != 0 {
                    line_time
                } else {
                    entry.oldest_waiting
                };
            }
        });
    }

    /// The files with lines read but not accepted yet: (path, committed offset, read offset).
    pub fn unaccepted(&self) -> Vec<(Arc<Path>, u64, u64)> {
        let Ok(files) = self.files.lock() else {
            return Vec::new();
        };
        files
            .values()
            .filter(|f| f.read > f.committed)
            .map(|f| (f.path.clone(), f.committed, f.read))
            .collect()
    }

    pub fn closed(&self, source: usize, key: FileKey) {
        self.with(|files| {
            files.remove(&(source, key));
        });
    }

    /// Where each file stands now.
    fn snapshot(&self) -> Vec<FileStatus> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let files = match self.files.lock() {
            Ok(files) => files.clone(),
            Err(_) => return Vec::new(),
        };
        files
            .into_iter()
            .map(|((_, key), f)| {
                use std::os::unix::fs::MetadataExt;
                let size = std::fs::metadata(&f.path)
                    .ok()
                    .filter(|m| m.dev() == key.dev && m.ino() == key.ino)
                    .map_or(f.read, |m| m.len());
                let lag_bytes = size.saturating_sub(f.committed);
                FileStatus {
                    path: shown_path(&f.path),
                    size,
                    start: f.start,
                    read: f.read,
                    committed: f.committed,
                    lag_bytes,
                    unread_bytes: size.saturating_sub(f.read),
                    lag_seconds: if f.oldest_waiting > 0 {
                        (now - f.oldest_waiting).max(0)
                    } else {
                        0
                    },
                }
            })
            .collect()
    }

    /// Logs, per file, the bytes not yet accepted by 3scale (`lag_bytes`, of which `unread_bytes`
    /// are not even read: backpressure) and the age of the oldest line read but not accepted.
    pub fn log(&self) {
        for f in self.snapshot() {
            tracing::info!(
                path = %f.path,
                size = f.size,
                read = f.read,
                committed = f.committed,
                lag_bytes = f.lag_bytes,
                unread_bytes = f.unread_bytes,
                lag_seconds = f.lag_seconds,
                "file progress"
            );
        }
    }
}

struct FileStatus {
    path: String,
    size: u64,
    start: u64,
    read: u64,
    committed: u64,
    lag_bytes: u64,
    unread_bytes: u64,
    lag_seconds: i64,
}

/// A credential as logs and metrics show it: its ends only (`abcd…wxyz`), or a short one's first
/// half at most (`a1b2…` of an 8-character app_id), so that it stays recognisable without ever
/// being shown whole.
pub(crate) fn mask(credential: &str) -> String {
    let chars: Vec<char> = credential.chars().collect();
    // Never more than half of it: its ends when long, a prefix when short.
    if chars.len() >= 16 {
        let head: String = chars[..4].iter().collect();
        let tail: String = chars[chars.len() - 4..].iter().collect();
        return printable(&format!("{head}…{tail}")).into_owned();
    }
    let shown = (chars.len() / 2).min(4);
    if shown == 0 {
        return "***".to_string();
    }
    let head: String = chars[..shown].iter().collect();
    printable(&format!("{head}…")).into_owned()
}

/// Text from outside (a log line, a file name, a backend's message) as tally's logs show it: control
/// characters escaped (`\x1b`), so that a crafted line cannot drive the terminal that reads the log.
pub(crate) fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            use std::fmt::Write;
            // Control characters (C0, DEL, C1) all fit in one byte.
            let _ = write!(out, "\\x{:02x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// What a panic said, from its payload.
pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

/// A file's path as logs show it: file names come from outside too (a glob matches what it finds).
pub(crate) fn shown_path(path: &Path) -> String {
    printable(&path.to_string_lossy()).into_owned()
}

/// A log line as tally's own logs show it: at most 200 bytes, lossy UTF-8, control characters
/// escaped, and the values of the credential parameters (`user_key`, `app_id`, `app_key`,
/// `access_token`) masked.
pub(crate) fn masked_line(line: &[u8]) -> String {
    masked_line_with(line, 200, &[])
}

/// A log line as [`masked_line`] shows it, at most `limit` bytes, with the values of the query
/// parameters `names` masked too (a source's own credential parameter names).
pub(crate) fn masked_line_with(line: &[u8], limit: usize, names: &[&str]) -> String {
    let lossy = String::from_utf8_lossy(&line[..line.len().min(limit)]);
    let text = printable(&lossy);
    let mut out = String::with_capacity(text.len());
    let mut rest: &str = &text;
    let names: Vec<String> = ["user_key", "app_id", "app_key", "access_token"]
        .iter()
        .chain(names)
        .filter(|n| !n.is_empty())
        .map(|n| format!("{n}="))
        .collect();
    while let Some(at) = names
        .iter()
        .filter_map(|name| rest.find(name.as_str()).map(|i| i + name.len()))
        .min()
    {
        out.push_str(&rest[..at]);
        let value_end = rest[at..]
            .find(['&', ' ', '"', '#'])
            .map_or(rest.len(), |e| at + e);
        out.push_str(&mask(&rest[at..value_end]));
        rest = &rest[value_end..];
    }
    out.push_str(rest);
    out
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
        .with_writer(|| crate::progress::LogWriter);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

/// Serves `/metrics` (Prometheus), `/healthz` (503 with the reasons while 3scale rejects a service's
/// reports) and `/livez` (200 while tally runs) on `listen`, in the background.
pub(crate) async fn serve(
    listen: std::net::SocketAddr,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(%listen, "serving /metrics, /healthz and /livez");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let deadline = std::time::Duration::from_secs(5);
                let _ = tokio::time::timeout(deadline, answer(stream, &metrics)).await;
            });
        }
    });
    Ok(())
}

/// One HTTP/1.x exchange: reads the request head (8 KiB at most), answers, closes.
async fn answer(mut stream: tokio::net::TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    let details = metrics.codes.keeps_calls();
    let json = |answer: Result<String, String>| match answer {
        Ok(body) => ("200 OK", "application/json", body),
        Err(e) => (
            "400 Bad Request",
            "application/json",
            format!(
                "{{\"error\":{}}}",
                serde_json::to_string(&e).unwrap_or_default()
            ),
        ),
    };
    let (status, content_type, body) = match (method, path) {
        (b"GET", b"/") if metrics.codes.is_on() => (
            "200 OK",
            "text/html; charset=utf-8",
            crate::page::page(metrics, target, details),
        ),
        (b"GET", b"/api/codes") if metrics.codes.is_on() => {
            json(crate::page::api_codes(metrics, target))
        }
        (b"GET", b"/api/calls") if metrics.codes.is_on() => {
            json(crate::page::api_calls(metrics, target, details))
        }
        (b"GET", b"/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            prometheus(metrics),
        ),
        (b"GET", b"/livez") => ("200 OK", "text/plain", "ok\n".to_string()),
        (b"GET", b"/healthz") => match metrics.problems() {
            problems if problems.is_empty() => (
                "200 OK",
                "text/plain",
                std::iter::once("ok".to_string())
                    .chain(
                        metrics
                            .warnings()
                            .into_iter()
                            .map(|w| format!("warning: {w}")),
                    )
                    .collect::<Vec<_>>()
                    .join("\n")
                    + "\n",
            ),
            problems => (
                "503 Service Unavailable",
                "text/plain",
                problems.join("\n") + "\n",
            ),
        },
        (b"GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /, /api/codes, /api/calls, /metrics, /healthz or /livez\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
    };
    // Nothing here is to be kept by a cache, framed, or fetched from elsewhere.
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\ncache-control: no-store\r\n\
         x-content-type-options: nosniff\r\ncontent-security-policy: default-src 'none'; style-src 'unsafe-inline'; \
         script-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// The Prometheus text exposition of every counter, each file's progress and the health.
fn prometheus(m: &Metrics) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(4096);
    let mut metric = |name: &str, kind: Kind, help: &str, samples: &[(String, u64)]| {
        let kind = kind.name();
        let _ = writeln!(
            out,
            "# HELP tally_{name} {help}\n# TYPE tally_{name} {kind}"
        );
        for (labels, value) in samples {
            let _ = writeln!(out, "tally_{name}{labels} {value}");
        }
    };
    let one = |v: u64| vec![(String::new(), v)];
    for family in Metrics::COUNTERS {
        let samples: Vec<(String, u64)> = family
            .samples
            .iter()
            .map(|(labels, field)| (labels.to_string(), field(m).load(Relaxed)))
            .collect();
        metric(family.name, family.kind, family.help, &samples);
    }
    let reasons: Vec<String> = Skip::ALL
        .iter()
        .map(|r| format!("{}: {}", r.reason(), r.description()))
        .collect();
    metric(
        "lines_skipped_total",
        Kind::Counter,
        &format!("Log lines not reported, by reason. {}", reasons.join(" ")),
        &Skip::ALL.map(|r| (format!("{{reason=\"{}\"}}", r.reason()), m.skips(r))),
    );
    let failures: Vec<(String, u64)> = Endpoint::ALL
        .iter()
        .flat_map(|&e| {
            Cause::ALL.iter().map(move |&c| {
                (
                    format!("{{endpoint=\"{}\",cause=\"{}\"}}", e.label(), c.label()),
                    m.call_failures(e, c),
                )
            })
        })
        .collect();
    metric(
        "call_failures_total",
        Kind::Counter,
        "Calls to 3scale that failed, by endpoint and cause (report calls are retried; http_4xx is a rejection).",
        &failures,
    );
    let invalid: Vec<(String, u64)> = m
        .invalid_credentials
        .lock()
        .map(|c| {
            c.iter()
                .map(|(k, v)| (format!("{{credential=\"{}\"}}", label(k)), *v))
                .collect()
        })
        .unwrap_or_default();
    metric(
        "invalid_credential_requests_total",
        Kind::Counter,
        "Requests not reported because 3scale does not know their credential (masked).",
        &invalid,
    );
    let unknown: Vec<(String, u64)> = m
        .unknown_metrics
        .lock()
        .map(|c| {
            c.iter()
                .map(|((service, metric), v)| {
                    (
                        format!(
                            "{{service_id=\"{}\",metric=\"{}\"}}",
                            label(service),
                            label(metric)
                        ),
                        *v,
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    metric(
        "unknown_metric_usages_total",
        Kind::Counter,
        "Transactions whose usage of a metric the service does not have was taken out (3scale would have dropped their whole call).",
        &unknown,
    );
    let files = m.files.snapshot();
    let per_file = |f: fn(&FileStatus) -> u64| -> Vec<(String, u64)> {
        files
            .iter()
            .map(|s| (format!("{{path=\"{}\"}}", label(&s.path)), f(s)))
            .collect()
    };
    metric(
        "file_size_bytes",
        Kind::Gauge,
        "Size of each followed file.",
        &per_file(|f| f.size),
    );
    metric(
        "file_lag_bytes",
        Kind::Gauge,
        "Bytes of each file not yet accepted by 3scale.",
        &per_file(|f| f.lag_bytes),
    );
    metric(
        "file_unread_bytes",
        Kind::Gauge,
        "Bytes of each file not yet read.",
        &per_file(|f| f.unread_bytes),
    );
    metric(
        "file_lag_seconds",
        Kind::Gauge,
        "Age of the oldest line of each file read but not yet accepted by 3scale (0 when none waits).",
        &per_file(|f| f.lag_seconds as u64),
    );
    let healthy = u64::from(m.problems().is_empty());
    metric(
        "healthy",
        Kind::Gauge,
        "1 unless something keeps tally from reporting (see /healthz).",
        &one(healthy),
    );
    metric(
        "warnings",
        Kind::Gauge,
        "Things that need a look though tally reports (a proxy configuration that cannot be refreshed or applied): listed by /healthz.",
        &one(m.warnings().len() as u64),
    );
    out
}

/// A Prometheus label value, escaped.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The tailer's news, logged and counted.
impl crate::tail::TailEvents for Metrics {
    fn following(&self, feed: usize, key: FileKey, path: &Arc<Path>, offset: u64, resumed: bool) {
        self.files.opened(feed, key, path, offset);
        self.set_problem(&format!("log file {}", shown_path(path)), None);
        if resumed {
            tracing::info!(path = %shown_path(path), offset, "resuming at the checkpoint");
        } else {
            tracing::info!(path = %shown_path(path), offset, "following file");
        }
    }

    fn open_failed(&self, path: &Path, error: &std::io::Error) {
        // Logged once, not at every poll, and shown on /healthz until it opens.
        let what = format!("log file {}", shown_path(path));
        if self.set_problem(&what, Some(format!("cannot open it: {error}"))) {
            tracing::warn!(path = %shown_path(path), %error, "cannot open log file; tally tries again at every poll");
        }
    }

    fn gone(&self, path: &Path, offset: u64) {
        tracing::warn!(path = %shown_path(path), offset,
            "a file read before is gone: lines written to it after the checkpoint, if any, are lost");
    }

    fn replaced_while_stopped(&self, path: &Path) {
        tracing::info!(path = %shown_path(path), "the file's first bytes changed since the checkpoint: reading it from its start");
    }

    fn rotated(&self, path: &Path) {
        tracing::info!(path = %shown_path(path), "file rotated or deleted: reading it to its end");
        Metrics::add(&self.rotations, 1);
    }

    fn finished(&self, path: &Path, offset: u64) {
        tracing::info!(path = %shown_path(path), offset, "finished a rotated or deleted file");
    }

    fn truncated(&self, path: &Path, size: u64, offset: u64) {
        tracing::warn!(path = %shown_path(path), size, offset,
            "file truncated or replaced in place: reading it again from its start");
        Metrics::add(&self.truncations, 1);
    }

    fn line_too_long(&self, path: &Path, limit: usize) {
        tracing::warn!(path = %shown_path(path), limit, "line too long: skipped");
        self.skipped(Skip::TooLong, 1);
        Metrics::add(&self.lines_read, 1);
    }

    fn read_failed(&self, path: &Path, error: Option<&std::io::Error>) {
        let what = format!("log file {}", shown_path(path));
        match error {
            Some(error) => {
                if self.set_problem(&what, Some(format!("cannot read it: {error}"))) {
                    tracing::warn!(path = %shown_path(path), %error, "read failed; tally tries again at every pass");
                }
            }
            None => {
                self.set_problem(&what, None);
            }
        }
    }

    fn read(&self, feed: usize, key: FileKey, path: &Arc<Path>, offset: u64) {
        tracing::debug!(path = %shown_path(path), end_offset = offset, "read lines");
        self.files.read(feed, key, path, offset);
    }

    fn unwatched(&self, dir: Option<&Path>, error: &std::io::Error) {
        match dir {
            Some(dir) => {
                tracing::info!(dir = %shown_path(dir), %error, "cannot watch the folder yet, relying on the poll")
            }
            None => tracing::warn!(%error, "file events unavailable, relying on the poll"),
        }
    }

    fn died(&self, pattern: &str, panic: &(dyn std::any::Any + Send)) {
        let stage = format!("follower of {}", shown_path(Path::new(pattern)));
        self.stage_died(&stage, &panic_text(panic));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_masked_in_logged_lines() {
        assert_eq!(mask("0123456789abcdef"), "0123…cdef");
        // Short ones show their first half at most: an 8-character app_id stays recognisable.
        assert_eq!(mask("a1b2c3d4"), "a1b2…");
        assert_eq!(mask("short"), "sh…");
        assert_eq!(mask("ab"), "a…");
        assert_eq!(mask("x"), "***");
        assert_eq!(mask(""), "***");
        assert_eq!(mask("\x1b[3m"), r"\x1b[…");
        // Never more than half: 9 to 15 characters show at most 4, the start.
        assert_eq!(mask("supersecretkey"), "supe…");
        assert_eq!(mask("123456789"), "1234…");
        let line = br#"1.2.3.4 - - [x] "GET /p?user_key=0123456789abcdef&x=1&app_key=supersecretkey HTTP/1.1" 200"#;
        assert_eq!(
            masked_line(line),
            r#"1.2.3.4 - - [x] "GET /p?user_key=0123…cdef&x=1&app_key=supe… HTTP/1.1" 200"#
        );
        // An OAuth access token in the query string (oidc mode) too.
        assert_eq!(
            masked_line(b"GET /p?access_token=eyJhbGciOi.eyJhenAiOi.c2lnbmF0dXJl#x"),
            "GET /p?access_token=eyJh…dXJl#x"
        );
        assert_eq!(masked_line(b"garbage \xff"), "garbage \u{fffd}");
        assert_eq!(
            masked_line(b"bell\x07 esc\x1b[2J nul\x00 del\x7f"),
            r"bell\x07 esc\x1b[2J nul\x00 del\x7f"
        );
        assert_eq!(printable("a\u{9b}b\tc"), r"a\x9bb\x09c");
        assert_eq!(mask("\x1b[31mkey-0123"), r"\x1b[31…");
        assert!(masked_line(&[b'a'; 1000]).len() == 200);
    }

    /// What `log_summary` logs, in the text format.
    fn summary(m: &Metrics) -> String {
        #[derive(Clone)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink(Arc::default());
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || m.log_summary("summary"));
        let bytes = sink.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    /// The `name=value` fields of a text log line.
    fn fields(line: &str) -> BTreeMap<&str, &str> {
        line.split_whitespace()
            .filter_map(|field| field.split_once('='))
            .collect()
    }

    #[test]
    fn every_skip_reason_is_exposed_with_its_label_and_logged_in_the_summary() {
        let m = Metrics::default();
        for (n, reason) in (1..).zip(Skip::ALL) {
            m.skipped(reason, n);
        }
        let text = prometheus(&m);
        let summary = summary(&m);
        let logged = fields(&summary);
        for (n, reason) in (1..).zip(Skip::ALL) {
            let label = reason.reason();
            let sample = format!("\ntally_lines_skipped_total{{reason=\"{label}\"}} {n}\n");
            assert!(text.contains(&sample), "{label} in {text}");
            assert!(text.contains(reason.description()), "{label} in {text}");
            let field = format!("skipped_{label}");
            assert_eq!(
                logged.get(field.as_str()),
                Some(&&*n.to_string()),
                "{summary}"
            );
        }
        assert_eq!(
            text.matches("\ntally_lines_skipped_total{").count(),
            Skip::ALL.len()
        );
    }

    #[test]
    fn the_summary_logs_every_counter_under_its_established_name() {
        let m = Metrics::default();
        let summary = summary(&m);
        let logged = fields(&summary);
        // Log queries and dashboards use these names: new counters may come, these stay.
        for name in [
            "lines_read",
            "requests_reported",
            "transactions_reported",
            "skipped_malformed",
            "skipped_no_credential",
            "skipped_invalid_credential",
            "skipped_too_long",
            "report_calls",
            "report_failures",
            "authorize_failures",
            "ambiguous_resends",
            "report_rejections",
            "dropped_too_old",
            "dropped_too_new",
            "dropped_invalid_credential",
            "dropped_wrong_credential_kind",
            "rotations",
            "truncations",
        ] {
            assert_eq!(logged.get(name), Some(&"0"), "{name} in {summary}");
        }
        // The tests find the final summary by its start.
        assert!(summary.contains("summary lines_read=0 "), "{summary}");
    }

    #[test]
    fn every_metric_has_help_and_type_and_is_documented_in_the_readme() {
        let m = Metrics::default();
        for family in Metrics::COUNTERS {
            for (n, (_, field)) in (1..).zip(family.samples) {
                field(&m).store(n, Relaxed);
            }
        }
        let text = prometheus(&m);
        let readme = include_str!("../README.md");
        let mut described = Vec::new();
        for line in text.lines() {
            if let Some(help) = line.strip_prefix("# HELP ") {
                let (name, help) = help.split_once(' ').unwrap();
                assert!(!help.is_empty(), "{line}");
                described.push(name);
            } else if let Some(kind) = line.strip_prefix("# TYPE ") {
                let (name, kind) = kind.split_once(' ').unwrap();
                assert_eq!(described.last(), Some(&name), "HELP before TYPE: {text}");
                assert!(["counter", "gauge"].contains(&kind), "{line}");
            } else {
                let name = line.split(['{', ' ']).next().unwrap();
                assert_eq!(
                    described.last(),
                    Some(&name),
                    "HELP and TYPE before: {line}"
                );
            }
        }
        for name in &described {
            assert!(
                readme.contains(&format!("`{name}`")) || readme.contains(&format!("`{name}{{")),
                "{name} is not in the README's list of metrics"
            );
        }
        for family in Metrics::COUNTERS {
            assert!(described.contains(&&*format!("tally_{}", family.name)));
            for (n, (labels, _)) in (1..).zip(family.samples) {
                let sample = format!("\ntally_{}{labels} {n}\n", family.name);
                assert!(text.contains(&sample), "{sample} in {text}");
            }
        }
    }

    #[test]
    fn a_lasting_problem_is_reported_once_and_cleared() {
        let m = Metrics::default();
        assert!(m.problems().is_empty());
        assert!(m.set_problem("log file /x", Some("cannot open it: denied".into())));
        assert!(!m.set_problem("log file /x", Some("cannot open it: denied".into())));
        assert!(m.set_problem("log file /x", Some("cannot open it: gone".into())));
        assert_eq!(m.problems(), vec!["log file /x: cannot open it: gone"]);
        assert!(prometheus(&m).contains("tally_healthy 0"));
        assert!(m.set_problem("log file /x", None));
        assert!(!m.set_problem("log file /x", None));
        assert!(prometheus(&m).contains("tally_healthy 1"));
    }
}
