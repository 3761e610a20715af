//! Transaction batches → `POST /transactions.xml` calls to the 3scale Service Management API, and
//! the checkpoints moved on once 3scale accepts them.
//!
//! A batch is never sent when part of it is known to be bad, since 3scale answers 202 and then drops
//! the whole call: transactions outside 3scale's time window and those of credentials 3scale does not
//! know are taken out (and counted). Up to `concurrency` calls are under way at once; checkpoints
//! advance in batch order, so a slow call never lets a later one skip it.

mod client;
mod credentials;
mod form;
mod known_metrics;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio::task::JoinSet;

pub(crate) use client::{describe, Client, Existence, Failure, Kind, MetricAnswer, ReportError};
pub(crate) use credentials::Credentials;
pub(crate) use form::{encode, ReportForm};
use known_metrics::{Answer as MetricKnown, KnownMetrics};

use crate::aggregate::{Application, Batch, Transaction, Transactions};
use crate::config::BackendAuth;
use crate::reclaim::Reclaim;
use crate::state::{Advance, InFlight, ServiceState, StateError};
use crate::telemetry::{mask, printable, Cause, Endpoint, Metrics};
use crate::usage::MetricNames;

/// What masks the service token or provider key wherever a report body is shown.
pub(crate) const MASK: &str = "***";

/// How far in the future 3scale accepts a timestamp (1 h), less a margin for clock skew.
const MAX_AHEAD: i64 = 3600 - 300;
/// Authorize calls under way at once when a batch brings many new credentials.
const AUTHORIZE_CONCURRENCY: usize = 8;

/// Exponential backoff with full jitter, capped.
pub(crate) struct Backoff {
    next: Duration,
    first: Duration,
    cap: Duration,
}

impl Backoff {
    pub(crate) fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff {
            next: first,
            first,
            cap,
        }
    }

    /// The standard one for calls to 3scale: 0.5 s doubling to 30 s.
    fn for_calls() -> Backoff {
        Backoff::new(Duration::from_millis(500), Duration::from_secs(30))
    }

    /// The wait before the next try: uniform in [half, full] of the current step, which then doubles.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.cap);
        let half = step / 2;
        half + half.mul_f64(fastrand::f64())
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.first;
    }
}

/// Where batches go.
pub(crate) enum Sink {
    /// The Service Management API.
    Backend(Arc<Client>),
    /// Standard output, with the secret masked (`--dry-run`).
    DryRun(reqwest::Url),
}

/// How one service reports.
pub(crate) struct Settings {
    /// Report calls under way at once.
    pub concurrency: usize,
    /// Transactions older than this when sent are dropped.
    pub max_age: Duration,
    /// How often a rejected call is tried again.
    pub rejected_retry: Duration,
    /// A rejected call ends the loop with an error instead of being retried slowly (for `--once`,
    /// where nobody would fix the configuration while tally waits).
    pub fail_on_rejection: bool,
    /// Check new credentials with authorize, caching the answers for (valid, invalid) TTLs.
    pub validation: Option<(Duration, Duration)>,
}

/// What one service's report loop needs.
pub(crate) struct ServiceReport {
    pub service_id: String,
    pub auth: BackendAuth,
    pub sink: Sink,
    /// Where the checkpoints go once a call is accepted.
    pub state: ServiceState,
    pub settings: Settings,
    /// Told where each file stands once accepted, to free its space (`tail.reclaim`).
    pub reclaim: Option<Arc<Reclaim>>,
}

/// What the calls of one service share.
struct Shared {
    service_id: String,
    /// Read again from its file when 3scale rejects it, so a fixed Secret resumes reporting.
    auth: Mutex<BackendAuth>,
    settings: Settings,
    metrics: Arc<Metrics>,
    /// Report bodies, reused from call to call (one per call under way).
    bodies: Mutex<Vec<String>>,
    reclaim: Option<Arc<Reclaim>>,
}

impl Shared {
    fn rejection_key(&self) -> String {
        format!("service {}", self.service_id)
    }

    fn auth(&self) -> BackendAuth {
        self.auth
            .lock()
            .map(|a| a.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// Counts a failed call, by cause, as the service's last failure (the callers log it).
    fn failed(&self, endpoint: Endpoint, e: &ReportError) {
        let (cause, detail) = match e {
            ReportError::Transient(f) => (f.cause, f.detail.as_str()),
            ReportError::Rejected { .. } => (Cause::Http4xx, "rejected"),
            ReportError::Internal(_) => return,
        };
        self.metrics
            .call_failed(&self.service_id, endpoint, cause, detail);
    }

    /// After a rejection: counts it, marks the service unhealthy, then either gives up (`--once`:
    /// nobody would fix the configuration while tally waits) or waits and picks up a changed secret.
    async fn after_rejection(&self, e: ReportError) -> Result<(), ReportError> {
        Metrics::add(&self.metrics.report_rejections, 1);
        if self.settings.fail_on_rejection {
            return Err(e);
        }
        self.metrics.set_problem(
            &self.rejection_key(),
            Some(format!("3scale rejects its reports: {e}")),
        );
        tracing::error!(service_id = %self.service_id, error = %e, retry_in = ?self.settings.rejected_retry,
            "3scale rejected the call: check the service token and the service_id; nothing is lost, reporting waits");
        tokio::time::sleep(self.settings.rejected_retry).await;
        let changed = self.auth().reread();
        if let Some(new) = changed {
            tracing::info!(service_id = %self.service_id, "the secret's file changed: using it");
            if let Ok(mut auth) = self.auth.lock() {
                *auth = new;
            }
        }
        Ok(())
    }
}

/// A batch dispatched, waiting for its call (and every call before it) to finish.
struct Pending {
    seq: u64,
    advances: Vec<Advance>,
    done: bool,
}

/// Sends each batch until the backend accepts it, and moves the checkpoints on. Ends when the batch
/// channel closes and every call is finished.
///
/// Two steps run side by side: admission (the time window, the credential checks) and dispatch
/// (calls, checkpoints in order). A slow credential check holds the next batch, never the
/// checkpoints of the calls that finished meanwhile.
pub(crate) async fn run(
    report: ServiceReport,
    batches: mpsc::Receiver<Batch>,
    metrics: Arc<Metrics>,
) -> Result<(), ReportError> {
    let ServiceReport {
        service_id,
        auth,
        sink,
        state,
        settings,
        reclaim,
    } = report;
    let credentials = settings
        .validation
        .map(|(valid, invalid)| Credentials::new(valid, invalid));
    let (valid, invalid) = settings.validation.unwrap_or(METRIC_TTLS);
    let known_metrics = KnownMetrics::new(valid, invalid);
    let concurrency = match sink {
        Sink::DryRun(_) => 1, // keeps the printed calls in order
        Sink::Backend(_) => settings.concurrency,
    };
    let shared = Arc::new(Shared {
        service_id,
        auth: Mutex::new(auth),
        settings,
        metrics,
        bodies: Mutex::new(Vec::new()),
        reclaim,
    });
    let (admitted_tx, admitted) = mpsc::channel(1);
    tokio::try_join!(
        admit(
            batches,
            admitted_tx,
            &shared,
            &sink,
            credentials,
            known_metrics
        ),
        dispatch(admitted, &shared, &sink, state, concurrency),
    )?;
    Ok(())
}

/// Takes out of each batch what must not be sent (see [`keep_sendable`]) and passes it on, in order.
async fn admit(
    mut batches: mpsc::Receiver<Batch>,
    admitted: mpsc::Sender<Batch>,
    shared: &Arc<Shared>,
    sink: &Sink,
    mut credentials: Option<Credentials>,
    mut known_metrics: KnownMetrics,
) -> Result<(), ReportError> {
    while let Some(mut batch) = batches.recv().await {
        if !batch.transactions.is_empty() {
            shared.metrics.waiting(&shared.service_id);
        }
        keep_sendable(shared, &mut batch.transactions, sink, credentials.as_mut()).await?;
        if let Sink::Backend(client) = sink {
            keep_known_metrics(
                client,
                shared,
                &mut batch.transactions,
                credentials.as_mut(),
                &mut known_metrics,
            )
            .await?;
        }
        if admitted.send(batch).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// Sends the admitted batches, `concurrency` at most under way, and moves the checkpoints on in
/// batch order.
async fn dispatch(
    mut batches: mpsc::Receiver<Batch>,
    shared: &Arc<Shared>,
    sink: &Sink,
    mut state: ServiceState,
    concurrency: usize,
) -> Result<(), ReportError> {
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut calls: JoinSet<(u64, Result<(), ReportError>)> = JoinSet::new();
    let mut seq = 0u64;
    let mut open = true;
    let mut backoff = Backoff::for_calls();
    while open || !pending.is_empty() {
        tokio::select! {
            // Counted in `pending`, not in `calls`: a call accepted behind a slower one stays in the
            // state as under way until that one is accepted too (checkpoints advance in order), and
            // a crash would send it again. So at most `concurrency` calls can count twice, however
            // slow one call is.
            batch = batches.recv(), if open && pending.len() < concurrency => {
                let Some(batch) = batch else {
                    open = false;
                    continue;
                };
                seq += 1;
                let done = batch.transactions.is_empty();
                persist(shared, &mut backoff, || state.begin(seq, &batch.advances, !done)).await;
                if !done {
                    match sink {
                        Sink::DryRun(url) => {
                            print_dry_run(url, shared, &batch.transactions);
                            count_reported(&shared.metrics, &batch.transactions);
                            calls.spawn(async move { (seq, Ok(())) });
                        }
                        Sink::Backend(client) => {
                            let call = Call {
                                transactions: batch.transactions,
                                ranges: state.call_ranges(seq),
                            };
                            let (client, shared) = (client.clone(), shared.clone());
                            calls.spawn(async move { (seq, send(&client, &shared, call).await) });
                        }
                    }
                }
                pending.push_back(Pending { seq, advances: batch.advances, done });
            }
            Some(finished) = calls.join_next() => {
                let (finished_seq, result) = finished.map_err(|e| ReportError::Internal(format!("a report task failed: {e}")))?;
                result?;
                if let Some(p) = pending.iter_mut().find(|p| p.seq == finished_seq) {
                    p.done = true;
                }
            }
        }
        let mut committed = false;
        while pending.front().is_some_and(|p| p.done) {
            let p = pending.pop_front().expect("checked");
            persist(shared, &mut backoff, || state.commit(p.seq, &p.advances)).await;
            committed = true;
            // A file feeding several services stands where the one furthest behind does.
            for a in &p.advances {
                match state.watermark(a.feed, a.key) {
                    Some((offset, line_time)) => {
                        shared
                            .metrics
                            .files
                            .committed(a.feed, a.key, offset, line_time);
                        if let Some(reclaim) = &shared.reclaim {
                            reclaim.committed(&a.path, a.key, offset);
                        }
                    }
                    None => {
                        shared.metrics.files.closed(a.feed, a.key);
                        if let Some(reclaim) = &shared.reclaim {
                            reclaim.forget(a.key);
                        }
                    }
                }
            }
        }
        if committed {
            shared
                .metrics
                .accepted(&shared.service_id, !pending.is_empty());
        }
    }
    Ok(())
}

/// One report call's transactions, and the byte ranges of the files they come from (for the log
/// when the call is sent again).
struct Call {
    transactions: Transactions,
    ranges: Vec<InFlight>,
}

/// One call, retried until 3scale accepts it: transient failures with backoff, rejections slowly.
/// Before each try, transactions that have left 3scale's time window meanwhile are taken out.
async fn send(client: &Client, shared: &Shared, mut call: Call) -> Result<(), ReportError> {
    let mut body = shared
        .bodies
        .lock()
        .ok()
        .and_then(|mut b| b.pop())
        .unwrap_or_default();
    let result = send_with(client, shared, &mut call, &mut body).await;
    if let Ok(mut bodies) = shared.bodies.lock() {
        bodies.push(body);
    }
    result
}

async fn send_with(
    client: &Client,
    shared: &Shared,
    call: &mut Call,
    body: &mut String,
) -> Result<(), ReportError> {
    // The batch was taken through the time window when it was dispatched.
    let mut backoff = Backoff::for_calls();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let auth = shared.auth();
        let transactions = &mut call.transactions;
        let form = ReportForm {
            auth: &auth,
            service_id: &shared.service_id,
            transactions,
            masked: false,
        };
        if let Err(e) = encode(&form, body) {
            // Only a bug can get here: every value is a string or an integer.
            tracing::error!(error = %e, "cannot encode a report; its transactions are dropped");
            return Ok(());
        }
        Metrics::add(&shared.metrics.report_calls, 1);
        match client.report(body, &auth).await {
            Ok(()) => {
                tracing::debug!(service_id = %shared.service_id, transactions = transactions.len(), attempt, "report accepted");
                shared.metrics.set_problem(&shared.rejection_key(), None);
                count_reported(&shared.metrics, transactions);
                return Ok(());
            }
            Err(
                e @ ReportError::Transient(Failure {
                    ambiguous: true, ..
                }),
            ) => {
                shared.failed(Endpoint::Report, &e);
                tracing::warn!(service_id = %shared.service_id, error = %e, attempt,
                    "a report call got no answer: 3scale may have processed it; it is sent again once 3scale answers");
                wait_for_an_answer(client, shared, transactions).await?;
                // 3scale answers other calls, but this one may keep failing the same way (a
                // connection broken after 3scale processed it): not faster than the backoff.
                tokio::time::sleep(backoff.next_delay()).await;
                drop_outside_window(shared, transactions);
                if transactions.is_empty() {
                    return Ok(());
                }
                Metrics::add(&shared.metrics.ambiguous_resends, 1);
                let timeout = client::shown(client.timeout.get());
                for r in &call.ranges {
                    tracing::warn!(service_id = %shared.service_id, path = %crate::telemetry::shown_path(&r.path), from = r.from, to = r.to, %timeout,
                        "resending a report call that got no answer: if 3scale processed the first one, these lines count twice");
                }
                continue;
            }
            Err(e @ ReportError::Transient(_)) => {
                shared.failed(Endpoint::Report, &e);
                let wait = backoff.next_delay();
                tracing::warn!(service_id = %shared.service_id, error = %e, attempt, retry_in = ?wait, "report failed");
                tokio::time::sleep(wait).await;
            }
            Err(e @ ReportError::Rejected { .. }) => {
                shared.failed(Endpoint::Report, &e);
                shared.after_rejection(e).await?
            }
            Err(e @ ReportError::Internal(_)) => return Err(e),
        }
        // Before the next try: what left 3scale's time window while this one failed.
        drop_outside_window(shared, &mut call.transactions);
        if call.transactions.is_empty() {
            return Ok(());
        }
    }
}

/// After a report call got no answer: probes 3scale with an authorize call for one of the call's
/// applications (it counts nothing) until 3scale answers, however it answers, and raises the
/// response timeout to at least twice the time that answer took. Sending the call again before
/// that would risk one more duplicate per try.
async fn wait_for_an_answer(
    client: &Client,
    shared: &Shared,
    transactions: &Transactions,
) -> Result<(), ReportError> {
    let Some((application, _)) = transactions.iter().next() else {
        return Ok(());
    };
    let mut backoff = Backoff::for_calls();
    loop {
        Metrics::add(&shared.metrics.authorize_calls, 1);
        let started = Instant::now();
        match client
            .authorize(&shared.auth(), &shared.service_id, application)
            .await
        {
            Ok(_) | Err(ReportError::Rejected { .. }) => {
                let took = started.elapsed();
                let timeout = client.timeout.answered_in(took);
                tracing::info!(service_id = %shared.service_id, answered_in = %client::shown(took), timeout = %client::shown(timeout),
                    "3scale answers again");
                return Ok(());
            }
            Err(e @ ReportError::Transient(_)) => {
                shared.failed(Endpoint::Authorize, &e);
                let wait = backoff.next_delay();
                tracing::warn!(service_id = %shared.service_id, error = %e, retry_in = ?wait,
                    "3scale does not answer yet; the report call waits");
                tokio::time::sleep(wait).await;
            }
            Err(e @ ReportError::Internal(_)) => return Err(e),
        }
    }
}

fn count_reported(metrics: &Metrics, transactions: &Transactions) {
    Metrics::add(&metrics.transactions_reported, transactions.len() as u64);
    Metrics::add(&metrics.requests_reported, transactions.requests());
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Takes out transactions 3scale would refuse for their time (older than `max_age`, or more than an
/// hour ahead), counting them loudly: one of them would make 3scale drop the whole call. Returns
/// them, with why.
fn drop_outside_window(
    shared: &Shared,
    transactions: &mut Transactions,
) -> Vec<(Application, Transaction, &'static str)> {
    let now = unix_now();
    let oldest = now - shared.settings.max_age.as_secs() as i64;
    let (mut old, mut ahead) = (0u64, 0u64);
    let mut dropped = Vec::new();
    transactions.retain(|application, t| {
        let why = if t.timestamp < oldest {
            old += t.requests;
            "older than max_age"
        } else if t.timestamp > now + MAX_AHEAD {
            ahead += t.requests;
            "more than an hour ahead"
        } else {
            return true;
        };
        dropped.push((application.clone(), *t, why));
        false
    });
    if old > 0 {
        Metrics::add(&shared.metrics.dropped_too_old, old);
        tracing::warn!(service_id = %shared.service_id, requests = old, max_age = ?shared.settings.max_age,
            "requests too old for 3scale (its window is 24 h) are dropped, not reported");
    }
    if ahead > 0 {
        Metrics::add(&shared.metrics.dropped_too_new, ahead);
        tracing::warn!(service_id = %shared.service_id, requests = ahead,
            "requests timestamped more than an hour ahead are dropped, not reported: check the clocks");
    }
    dropped
}

/// Takes out what must not be sent: transactions outside the time window, and those of credentials
/// 3scale does not know (checked with authorize when new). If an authorize call fails, the batch
/// waits and tries again: nothing is dropped for want of an answer.
async fn keep_sendable(
    shared: &Arc<Shared>,
    transactions: &mut Transactions,
    sink: &Sink,
    credentials: Option<&mut Credentials>,
) -> Result<(), ReportError> {
    let dropped = drop_outside_window(shared, transactions);
    let client = match sink {
        Sink::DryRun(_) => {
            print_dropped(&dropped, &transactions.metrics);
            return Ok(());
        }
        Sink::Backend(client) => client,
    };
    let Some(credentials) = credentials else {
        return Ok(());
    };
    let mut backoff = Backoff::for_calls();
    loop {
        let unknown = credentials.unknown(transactions, Instant::now());
        if unknown.is_empty() {
            break;
        }
        match authorize_all(client, shared, unknown).await {
            Ok(answers) => {
                for (application, existence) in answers {
                    if existence == Existence::Missing {
                        tracing::warn!(service_id = %shared.service_id, credential = %mask(application.field().1),
                            "3scale does not know this credential: its requests are counted, not reported");
                    }
                    if let Some(takes) = credentials.record(application, existence, Instant::now())
                    {
                        mode_hint(shared, takes);
                    }
                }
                shared.metrics.set_problem(&shared.rejection_key(), None);
            }
            Err(e @ ReportError::Transient(_)) => {
                let wait = backoff.next_delay();
                tracing::warn!(service_id = %shared.service_id, error = %e, retry_in = ?wait,
                    "cannot check new credentials; the batch waits");
                tokio::time::sleep(wait).await;
            }
            Err(e @ ReportError::Rejected { .. }) => shared.after_rejection(e).await?,
            Err(e @ ReportError::Internal(_)) => return Err(e),
        }
        // The wait may have taken some transactions out of 3scale's time window.
        drop_outside_window(shared, transactions);
    }
    let taken = credentials.take_unsendable(transactions, Instant::now());
    for (application, requests) in taken.missing {
        shared
            .metrics
            .invalid_credential(application.field().1, requests);
    }
    if taken.refused > 0 {
        Metrics::add(&shared.metrics.dropped_wrong_credential_kind, taken.refused);
        tracing::debug!(service_id = %shared.service_id, requests = taken.refused,
            "requests with a kind of credential the service does not take are counted, not reported");
    }
    Ok(())
}

/// How long what 3scale said of a metric is kept when credentials are not checked (else their
/// TTLs are used): (found, not found).
const METRIC_TTLS: (Duration, Duration) = (Duration::from_secs(3600), Duration::from_secs(300));

/// How many applications of a batch a metric is checked with, at most, when 3scale's answers are
/// about the application rather than the metric.
const METRIC_WITNESSES: usize = 3;

/// Takes out of a batch's usages the metrics the service does not have (3scale would drop the
/// whole call), checking each new metric first with an authorize call of an application that
/// exists (see [`known_metrics`]). If a check fails, the batch waits and tries again.
async fn keep_known_metrics(
    client: &Arc<Client>,
    shared: &Arc<Shared>,
    transactions: &mut Transactions,
    credentials: Option<&mut Credentials>,
    known: &mut KnownMetrics,
) -> Result<(), ReportError> {
    let unchecked = known.unchecked(transactions, Instant::now());
    if !unchecked.is_empty() {
        // Applications 3scale said exist first; without credential checks, the batch's own.
        let mut witnesses = match credentials {
            Some(c) => c.existing(transactions, METRIC_WITNESSES, Instant::now()),
            None => Vec::new(),
        };
        for t in &transactions.list {
            let application = &transactions.applications[t.application as usize];
            if witnesses.len() >= METRIC_WITNESSES {
                break;
            }
            if !witnesses.contains(application) {
                witnesses.push(application.clone());
            }
        }
        for metric in unchecked {
            let answer = check_metric(client, shared, &witnesses, &metric).await?;
            match answer {
                MetricKnown::Exists => {}
                MetricKnown::Unknown => {
                    tracing::warn!(service_id = %shared.service_id, metric = %printable(&metric),
                    "the service has no such metric: the mapping rules' usage of it is counted (unknown_metric), not reported; create the metric in 3scale or fix the rule")
                }
                MetricKnown::Unchecked => {
                    tracing::warn!(service_id = %shared.service_id, metric = %printable(&metric),
                    "cannot check this metric: no answer of 3scale was about it (applications unknown, or needing their app_key); it is reported unchecked")
                }
            }
            known.record(&metric, answer, Instant::now());
        }
    }
    let stripped = known.take_unknown(transactions);
    for (metric, usages) in &stripped.usages {
        shared
            .metrics
            .unknown_metric(&shared.service_id, metric, *usages);
    }
    Metrics::add(&shared.metrics.dropped_unknown_metric, stripped.emptied);
    Ok(())
}

/// Whether the service has `metric`, asked with each of `witnesses` in turn until an answer is
/// about the metric. Transient failures wait and try again.
async fn check_metric(
    client: &Client,
    shared: &Shared,
    witnesses: &[Application],
    metric: &str,
) -> Result<MetricKnown, ReportError> {
    let mut backoff = Backoff::for_calls();
    for witness in witnesses {
        loop {
            Metrics::add(&shared.metrics.authorize_calls, 1);
            let answer = client
                .check_metric(&shared.auth(), &shared.service_id, witness, metric)
                .await;
            match answer {
                Ok(MetricAnswer::Exists) => return Ok(MetricKnown::Exists),
                Ok(MetricAnswer::Unknown) => return Ok(MetricKnown::Unknown),
                Ok(MetricAnswer::Inconclusive) => break,
                Err(e @ ReportError::Transient(_)) => {
                    shared.failed(Endpoint::Authorize, &e);
                    let wait = backoff.next_delay();
                    tracing::warn!(service_id = %shared.service_id, error = %e, retry_in = ?wait,
                        "cannot check a metric; the batch waits");
                    tokio::time::sleep(wait).await;
                }
                Err(e @ ReportError::Rejected { .. }) => shared.after_rejection(e).await?,
                Err(e @ ReportError::Internal(_)) => return Err(e),
            }
        }
    }
    Ok(MetricKnown::Unchecked)
}

/// 3scale said the service authenticates with `takes` only: says once what to configure. The
/// requests with the other kind cannot be checked (3scale's authorize looks up only the kind the
/// service takes) and APIcast refuses them for that service, so they are not reported.
fn mode_hint(shared: &Shared, takes: Kind) {
    let other = takes.other();
    tracing::warn!(service_id = %shared.service_id, credential_mode = takes.name(), refused = other.name(),
        hint = %format!("set credentials.mode = \"{}\" in the source's [sources.credentials]", takes.name()),
        "the service authenticates with {} only: its requests with the other kind of credential ({}) are counted as dropped (wrong_credential_kind), not reported",
        takes.name(), other.name());
}

/// Authorize calls for `applications`, a few at a time; the first failure fails them all.
async fn authorize_all(
    client: &Arc<Client>,
    shared: &Arc<Shared>,
    applications: Vec<Application>,
) -> Result<Vec<(Application, Existence)>, ReportError> {
    let mut answers = Vec::with_capacity(applications.len());
    let mut todo = applications.into_iter();
    let mut calls = JoinSet::new();
    loop {
        while calls.len() < AUTHORIZE_CONCURRENCY {
            let Some(application) = todo.next() else {
                break;
            };
            let (client, shared) = (client.clone(), shared.clone());
            calls.spawn(async move {
                Metrics::add(&shared.metrics.authorize_calls, 1);
                let auth = shared.auth();
                let existence = client
                    .authorize(&auth, &shared.service_id, &application)
                    .await;
                (application, existence)
            });
        }
        let Some(done) = calls.join_next().await else {
            return Ok(answers);
        };
        let (application, existence) =
            done.map_err(|e| ReportError::Internal(format!("an authorize task failed: {e}")))?;
        if let Err(e) = &existence {
            shared.failed(Endpoint::Authorize, e);
        }
        answers.push((application, existence?));
    }
}

/// Writes the state, retrying while the disk refuses: reporting on without recording it would
/// report the same lines again after a restart.
async fn persist(
    shared: &Shared,
    backoff: &mut Backoff,
    mut write: impl FnMut() -> Result<(), StateError>,
) {
    let what = format!("state of service {}", shared.service_id);
    while let Err(e) = write() {
        let wait = backoff.next_delay();
        tracing::error!(service_id = %shared.service_id, error = %e, retry_in = ?wait, "cannot write the state; reporting waits");
        shared
            .metrics
            .set_problem(&what, Some(format!("cannot write the state: {e}")));
        tokio::time::sleep(wait).await;
    }
    shared.metrics.set_problem(&what, None);
    backoff.reset();
}

/// One report call as `--dry-run` shows it: the request line, then the body decoded, one field per
/// line, the secret masked.
fn print_dry_run(url: &reqwest::Url, shared: &Shared, transactions: &Transactions) {
    use std::io::Write;
    let auth = shared.auth();
    let form = ReportForm {
        auth: &auth,
        service_id: &shared.service_id,
        transactions,
        masked: true,
    };
    let mut body = String::new();
    if encode(&form, &mut body).is_err() {
        return;
    }
    let endpoint = url
        .join("transactions.xml")
        .map(|u| u.to_string())
        .unwrap_or_default();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "POST {endpoint} service_id={} transactions={}",
        shared.service_id,
        transactions.len()
    );
    for (key, value) in form_urlencoded::parse(body.as_bytes()) {
        let _ = writeln!(out, "  {key}={value}");
    }
    let _ = writeln!(out);
}

/// What `--dry-run` would not send for its time.
fn print_dropped(dropped: &[(Application, Transaction, &str)], metrics: &MetricNames) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for (application, t, why) in dropped {
        let (field, value) = application.field();
        let usage: String = t
            .usage
            .iter()
            .map(|(metric, delta)| format!(" usage[{}]={delta}", metrics.get(metric).name))
            .collect();
        let code = t
            .code
            .map(|c| format!(" log[code]={c}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "NOT SENT ({why}): {field}={value}{usage} timestamp={}{code}",
            t.timestamp
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays[7] >= Duration::from_millis(500) && delays[7] <= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
