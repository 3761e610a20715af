//! Request records → batches of 3scale transactions, one batch at most `max_transactions` long.
//!
//! With response codes on, every request is its own transaction: the backend adds exactly one to the
//! response-code counters per transaction, whatever its usage, so folding would lose codes. With them
//! off, requests of one application and second are folded into one transaction.

use std::collections::HashMap;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use tokio::sync::mpsc;

use crate::identity::FileKey;
use crate::parse::{Credential, Parser, Request, Skip};
use crate::state::{Advance, Fate};
use crate::tail::{Chunk, Tailed};
use crate::telemetry::{masked_line, Metrics};

/// How 3scale identifies the application in a report. The app_key is not part of a report.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Application {
    UserKey(Arc<str>),
    AppId(Arc<str>),
}

impl Application {
    /// The transaction field and its value.
    pub fn field(&self) -> (&'static str, &str) {
        match self {
            Application::UserKey(k) => ("user_key", k),
            Application::AppId(id) => ("app_id", id),
        }
    }
}

/// One transaction of a report call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transaction {
    /// Its application, by id in [`Transactions::applications`]: an id, not a shared name, so that
    /// adding a transaction costs no reference count.
    pub application: u32,
    /// Epoch seconds.
    pub timestamp: i64,
    pub hits: u64,
    /// The HTTP status, when response codes are reported.
    pub code: Option<u16>,
}

/// The applications that transactions name, by id. Append-only (ids stay valid), written by the
/// aggregation and read by the report calls under way.
pub type Applications = Arc<boxcar::Vec<Application>>;

/// The transactions of one report call.
#[derive(Debug, Default, Clone)]
pub struct Transactions {
    pub applications: Applications,
    pub list: Vec<Transaction>,
}

impl Transactions {
    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The requests they count.
    pub fn hits(&self) -> u64 {
        self.list.iter().map(|t| t.hits).sum()
    }

    pub fn application(&self, t: &Transaction) -> &Application {
        &self.applications[t.application as usize]
    }

    /// Each transaction with its application.
    pub fn iter(&self) -> impl Iterator<Item = (&Application, &Transaction)> {
        self.list.iter().map(|t| (self.application(t), t))
    }

    /// Keeps the transactions `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&Application, &Transaction) -> bool) {
        let applications = &self.applications;
        self.list
            .retain(|t| keep(&applications[t.application as usize], t));
    }

    /// Transactions from (application, timestamp, hits, code), for tests.
    #[cfg(test)]
    pub fn of(list: Vec<(Application, i64, u64, Option<u16>)>) -> Transactions {
        let all = Transactions::default();
        let list = list
            .into_iter()
            .map(|(application, timestamp, hits, code)| {
                let id = match all.applications.iter().find(|(_, a)| **a == application) {
                    Some((id, _)) => id,
                    None => all.applications.push(application),
                };
                Transaction {
                    application: id as u32,
                    timestamp,
                    hits,
                    code,
                }
            })
            .collect();
        Transactions { list, ..all }
    }
}

/// A sealed batch, ready for one report call.
#[derive(Debug, Default)]
pub struct Batch {
    pub transactions: Transactions,
    /// Where each file stands once the batch, and every batch before it, is accepted.
    pub advances: Vec<Advance>,
}

/// Gives each distinct credential an id, decoding it once. Bounded: an API hammered with random keys
/// must not grow tally's memory, so past the limit the tables start anew (batches under way keep the
/// old list of applications).
struct Interner {
    /// Raw credential as logged → its id, or why it cannot be reported.
    user_keys: FxHashMap<Box<[u8]>, Result<u32, Skip>>,
    app_ids: FxHashMap<Box<[u8]>, Result<u32, Skip>>,
    applications: Applications,
    limit: usize,
}

impl Interner {
    fn new(limit: usize) -> Interner {
        Interner {
            user_keys: FxHashMap::default(),
            app_ids: FxHashMap::default(),
            applications: Applications::default(),
            limit,
        }
    }

    fn id(&mut self, credential: Credential<'_>) -> Result<u32, Skip> {
        let full = self.full();
        let (table, raw) = match credential {
            Credential::UserKey(raw) => (&mut self.user_keys, raw),
            Credential::AppId(raw) => (&mut self.app_ids, raw),
        };
        if let Some(known) = table.get(raw) {
            return *known;
        }
        let id = credential.decode().map(|name| {
            let application = match credential {
                Credential::UserKey(_) => Application::UserKey(name.into()),
                Credential::AppId(_) => Application::AppId(name.into()),
            };
            self.applications.push(application) as u32
        });
        // Past the limit, an unreportable credential is not remembered: a stream of them alone
        // (which never fills a batch, so never renews the tables) must not grow them.
        if id.is_ok() || !full {
            table.insert(raw.into(), id);
        }
        id
    }

    fn full(&self) -> bool {
        self.user_keys.len() + self.app_ids.len() >= self.limit
    }

    /// Starts anew; only between batches, since the open batch's ids index the current list.
    fn renew(&mut self) {
        *self = Interner::new(self.limit);
    }
}

pub struct Aggregator {
    response_codes: bool,
    max_transactions: usize,
    /// The open batch.
    transactions: Vec<Transaction>,
    advances: Vec<Advance>,
    /// Folding index of the open batch: (application, second) → transaction.
    folded: FxHashMap<(u32, i64), usize>,
    interner: Interner,
}

impl Aggregator {
    pub fn new(response_codes: bool, max_transactions: usize) -> Aggregator {
        Aggregator {
            response_codes,
            max_transactions: max_transactions.max(1),
            transactions: Vec::new(),
            advances: Vec::new(),
            folded: FxHashMap::default(),
            interner: Interner::new(100_000),
        }
    }

    /// Adds one request; true when the batch is full (then [`Aggregator::advance`] and
    /// [`Aggregator::take`] it). A credential that cannot be reported is a skip.
    pub fn add(&mut self, request: &Request<'_>) -> Result<bool, Skip> {
        let application = self.interner.id(request.credential)?;
        if !self.response_codes {
            let key = (application, request.timestamp);
            if let Some(&i) = self.folded.get(&key) {
                self.transactions[i].hits += 1;
                return Ok(false);
            }
            self.folded.insert(key, self.transactions.len());
        }
        self.transactions.push(Transaction {
            application,
            timestamp: request.timestamp,
            hits: 1,
            // 3scale counts only three-digit codes, by class; NGINX's `000` (no response sent) and
            // other odd values are reported without a code rather than as a made-up class.
            code: (self.response_codes && (100..=599).contains(&request.status))
                .then_some(request.status),
        });
        Ok(self.transactions.len() >= self.max_transactions || self.interner.full())
    }

    /// Records how far the open batch takes a file (the latest position of a file wins; the batch's
    /// data of the file starts at the earliest).
    pub fn advance(&mut self, advance: Advance) {
        match self
            .advances
            .iter_mut()
            .find(|a| a.feed == advance.feed && a.key == advance.key)
        {
            Some(a) => {
                let from = a.from.min(advance.from);
                let opened = a.opened || advance.opened;
                *a = Advance {
                    from,
                    opened,
                    ..advance
                };
            }
            None => self.advances.push(advance),
        }
    }

    /// Seals the open batch, if it counts anything or moves a file on.
    pub fn take(&mut self) -> Option<Batch> {
        self.folded.clear();
        if self.transactions.is_empty() && self.advances.is_empty() {
            return None;
        }
        let batch = Batch {
            transactions: Transactions {
                applications: self.interner.applications.clone(),
                // The next batch gets its full size at once, instead of growing by copies.
                list: std::mem::replace(
                    &mut self.transactions,
                    Vec::with_capacity(self.max_transactions),
                ),
            },
            advances: std::mem::take(&mut self.advances),
        };
        if self.interner.full() {
            self.interner.renew();
        }
        Some(batch)
    }
}

/// What one service's aggregation loop needs.
pub struct ServiceLines {
    pub service_id: String,
    /// The parser of each feed (follower), by feed index (None: that feed does not feed this
    /// service).
    pub parsers: Vec<Option<Parser>>,
    pub max_line_length: usize,
    pub flush_interval: std::time::Duration,
    /// What this service counted already in files it resumes behind (another service fed by the
    /// same file is further behind), by feed and file.
    pub counted: HashMap<(usize, FileKey), Counted>,
    /// Test-only: a chunk holding these bytes makes the aggregation panic.
    pub panic_on: Option<Vec<u8>>,
}

/// A file this service counted up to `up_to` in an earlier run: its lines up to there are skipped.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counted {
    pub up_to: u64,
    /// The end of the last chunk of the file seen: offsets that go back tell a truncation.
    pub seen: u64,
}

/// Takes one message of a follower into the aggregator; returns the batches it filled.
pub fn take_in(
    lines: &mut ServiceLines,
    aggregator: &mut Aggregator,
    tailed: &Tailed,
    metrics: &Metrics,
    warned: &mut std::collections::HashSet<Skip>,
) -> Vec<Batch> {
    let (feed, at, fate) = match tailed {
        Tailed::Lines(chunk) => {
            return parse_chunk(lines, aggregator, chunk, Fate::Reading, metrics, warned)
        }
        Tailed::Finished(chunk) => {
            return parse_chunk(lines, aggregator, chunk, Fate::Finished, metrics, warned)
        }
        Tailed::Opened { feed, at } => (*feed, at, Fate::Reading),
        Tailed::Forget { feed, at, gone } => {
            // A file replaced: what this service counted of it is of its new content (checked at
            // start-up), so the forgotten checkpoint was another service's.
            if lines.counted.contains_key(&(*feed, at.key)) && !gone {
                return Vec::new();
            }
            lines.counted.remove(&(*feed, at.key));
            (*feed, at, Fate::Forgotten)
        }
    };
    // Opened where this service counted further already: its checkpoint stands.
    if lines
        .counted
        .get(&(feed, at.key))
        .is_none_or(|counted| counted.up_to <= at.offset)
    {
        aggregator.advance(Advance {
            feed,
            key: at.key,
            fingerprint: at.fingerprint,
            from: at.offset,
            offset: at.offset,
            line_time: 0,
            path: at.path.clone(),
            fate,
            opened: matches!(tailed, Tailed::Opened { .. }),
        });
    }
    Vec::new()
}

/// Parses one chunk's lines into the aggregator; returns the batches they filled. `fate`: what
/// becomes of the file once they are accepted.
pub fn parse_chunk(
    lines: &mut ServiceLines,
    aggregator: &mut Aggregator,
    chunk: &Chunk,
    fate: Fate,
    metrics: &Metrics,
    warned: &mut std::collections::HashSet<Skip>,
) -> Vec<Batch> {
    if let Some(marker) = &lines.panic_on {
        if memchr::memmem::find(chunk.data(), marker).is_some() {
            panic!("test hook: a line holds the panic marker");
        }
    }
    let mut full = Vec::new();
    let base = chunk.start_offset();
    let file = (chunk.feed, chunk.at.key);
    // Lines this service counted in an earlier run (the follower resumed behind it for another).
    let counted = lines.counted.get(&file).copied().unwrap_or_default();
    let counted = if base < counted.seen {
        // Offsets went back: the file was truncated, and what it holds now is new.
        lines.counted.remove(&file);
        0
    } else if chunk.at.offset >= counted.up_to {
        lines.counted.remove(&file);
        counted.up_to
    } else {
        lines.counted.insert(
            file,
            Counted {
                seen: chunk.at.offset,
                ..counted
            },
        );
        counted.up_to
    };
    if counted >= chunk.at.offset && fate == Fate::Reading {
        return full;
    }
    let mut line_time = 0;
    // A copy per chunk: the parser caches the last time field it read.
    let mut parser = lines.parsers.get(chunk.feed).copied().flatten();
    // Where the open batch's data of this chunk starts: the chunk's start, then each split point.
    let mut from = base.max(counted).min(chunk.at.offset);
    let at = |from: u64, offset: u64, line_time: i64, fate: Fate| Advance {
        feed: chunk.feed,
        key: chunk.at.key,
        fingerprint: chunk.at.fingerprint,
        from,
        offset,
        line_time,
        path: chunk.at.path.clone(),
        fate,
        opened: false,
    };
    let (mut read, mut skipped) = (0u64, [0u64; Skip::ALL.len()]);
    let mut first_line_time = 0;
    for (line, next) in chunk.lines() {
        if base + (next as u64) <= counted {
            continue;
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        read += 1;
        let added = match parser.as_mut() {
            _ if line.len() > lines.max_line_length => Err(Skip::TooLong),
            Some(parser) => parser.parse(line).and_then(|request| {
                line_time = request.timestamp;
                if first_line_time == 0 {
                    first_line_time = line_time;
                }
                aggregator.add(&request)
            }),
            None => Err(Skip::Malformed),
        };
        match added {
            Ok(batch_full) => {
                if batch_full {
                    let split = base + next as u64;
                    aggregator.advance(at(from, split, line_time, Fate::Reading));
                    from = split;
                    full.extend(aggregator.take());
                }
            }
            Err(skip) => {
                skipped[skip as usize] += 1;
                if warned.insert(skip) {
                    tracing::warn!(service_id = %lines.service_id, reason = skip.reason(), line = %masked_line(line),
                        "line skipped (further skips for this reason are logged at debug level and counted)");
                } else if tracing::enabled!(tracing::Level::DEBUG) {
                    tracing::debug!(service_id = %lines.service_id, reason = skip.reason(), line = %masked_line(line), "line skipped");
                }
            }
        }
    }
    // Counted once per chunk: an atomic add per line would cost more than the parsing.
    Metrics::add(&metrics.lines_read, read);
    metrics
        .files
        .parsed(chunk.feed, chunk.at.key, first_line_time);
    for skip in Skip::ALL {
        metrics.skipped(skip, skipped[skip as usize]);
    }
    aggregator.advance(at(from, chunk.at.offset, line_time, fate));
    full
}

/// Parses the chunks of one service's sources into batches, sealed when full or at each flush
/// interval. Ends, after sealing what it holds, when every follower is gone.
pub async fn run(
    mut lines: ServiceLines,
    mut aggregator: Aggregator,
    mut tailed: mpsc::Receiver<Tailed>,
    batches: mpsc::Sender<Batch>,
    metrics: std::sync::Arc<Metrics>,
) {
    let mut flush = tokio::time::interval(lines.flush_interval);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    flush.tick().await; // the first tick is immediate
    let mut warned = std::collections::HashSet::new();
    loop {
        let full = tokio::select! {
            message = tailed.recv() => match message {
                Some(message) => take_in(&mut lines, &mut aggregator, &message, &metrics, &mut warned),
                None => {
                    if let Some(last) = aggregator.take() {
                        let _ = batches.send(last).await;
                    }
                    return;
                }
            },
            _ = flush.tick() => aggregator.take().into_iter().collect(),
        };
        for batch in full {
            if batches.send(batch).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(key: &str, timestamp: i64, status: u16) -> Request<'_> {
        Request {
            timestamp,
            method: b"GET",
            path: b"/",
            status,
            credential: Credential::UserKey(key.as_bytes()),
        }
    }

    type Flat = (Application, i64, u64, Option<u16>);

    /// A batch that fills up inside a chunk ends there; the next one starts there, not at the
    /// chunk's start (its byte range is what a resend or a restart says, and where a file with no
    /// checkpoint yet gets one).
    #[test]
    fn a_batch_split_inside_a_chunk_starts_at_the_split() {
        use crate::config::{CredentialMode, LogFormat};
        use crate::identity::{FileKey, FilePosition, Fingerprint};
        use crate::tail::Chunk;
        let line = "1.2.3.4 - - [10/Oct/2026:13:55:36 +0000] \"GET /?user_key=k HTTP/1.1\" 200 1 \"-\" \"a\"\n";
        let len = line.len() as u64;
        let mut lines = ServiceLines {
            service_id: "42".into(),
            parsers: vec![Some(Parser::new(LogFormat::Combined, CredentialMode::Auto))],
            max_line_length: 1 << 16,
            flush_interval: std::time::Duration::from_secs(1),
            counted: HashMap::new(),
            panic_on: None,
        };
        let chunk = |from: u64, n: usize| {
            let at = FilePosition {
                key: FileKey { dev: 1, ino: 2 },
                fingerprint: Fingerprint { len: 0, hash: 0 },
                offset: from + n as u64 * len,
                path: Arc::from(std::path::Path::new("/access.log")),
            };
            Chunk::new(0, at, line.repeat(n).into_bytes())
        };
        let mut aggregator = Aggregator::new(true, 2);
        let (metrics, mut warned) = (Metrics::default(), Default::default());
        let full = parse_chunk(
            &mut lines,
            &mut aggregator,
            &chunk(0, 3),
            Fate::Reading,
            &metrics,
            &mut warned,
        );
        let range = |b: &Batch| (b.advances[0].from, b.advances[0].offset);
        assert_eq!(
            full.iter().map(range).collect::<Vec<_>>(),
            vec![(0, 2 * len)]
        );
        let full = parse_chunk(
            &mut lines,
            &mut aggregator,
            &chunk(3 * len, 1),
            Fate::Reading,
            &metrics,
            &mut warned,
        );
        assert_eq!(
            full.iter().map(range).collect::<Vec<_>>(),
            vec![(2 * len, 4 * len)]
        );
    }

    fn tx(key: &str, timestamp: i64, hits: u64, code: Option<u16>) -> Flat {
        (Application::UserKey(key.into()), timestamp, hits, code)
    }

    fn flat(transactions: &Transactions) -> Vec<Flat> {
        transactions
            .iter()
            .map(|(a, t)| (a.clone(), t.timestamp, t.hits, t.code))
            .collect()
    }

    #[test]
    fn with_response_codes_each_request_is_a_transaction() {
        let mut a = Aggregator::new(true, 3);
        assert!(!a.add(&request("k", 10, 200)).unwrap());
        assert!(!a.add(&request("k", 10, 200)).unwrap());
        assert!(a.add(&request("j", 10, 404)).unwrap());
        let full = a.take().unwrap();
        assert_eq!(
            flat(&full.transactions),
            vec![
                tx("k", 10, 1, Some(200)),
                tx("k", 10, 1, Some(200)),
                tx("j", 10, 1, Some(404))
            ]
        );
        assert!(a.take().is_none());
        a.add(&request("k", 11, 500)).unwrap();
        let next = a.take().unwrap().transactions;
        assert_eq!(flat(&next), vec![tx("k", 11, 1, Some(500))]);
        // The batches share one list of applications.
        assert_eq!(next.applications.count(), 2);
    }

    #[test]
    fn without_response_codes_requests_fold_per_application_and_second() {
        let mut a = Aggregator::new(false, 1000);
        for (k, t) in [("k", 10), ("k", 10), ("j", 10), ("k", 11), ("k", 10)] {
            assert!(!a.add(&request(k, t, 200)).unwrap());
        }
        let b = a.take().unwrap();
        assert_eq!(
            flat(&b.transactions),
            vec![
                tx("k", 10, 3, None),
                tx("j", 10, 1, None),
                tx("k", 11, 1, None)
            ]
        );
        assert_eq!(b.transactions.hits(), 5);
        // A new batch starts a new fold.
        a.add(&request("k", 10, 200)).unwrap();
        assert_eq!(
            flat(&a.take().unwrap().transactions),
            vec![tx("k", 10, 1, None)]
        );
    }

    #[test]
    fn user_keys_and_app_ids_never_fold_together() {
        let mut a = Aggregator::new(false, 1000);
        a.add(&request("same", 10, 200)).unwrap();
        a.add(&Request {
            credential: Credential::AppId(b"same"),
            ..request("", 10, 200)
        })
        .unwrap();
        assert_eq!(a.take().unwrap().transactions.len(), 2);
    }

    #[test]
    fn the_credential_tables_stay_bounded_and_batches_exact() {
        let mut a = Aggregator::new(true, 10_000);
        a.interner = Interner::new(10);
        let mut batches = Vec::new();
        for n in 0..1000 {
            if a.add(&request(&(n % 50).to_string(), 10, 200)).unwrap() {
                batches.push(a.take().unwrap());
            }
            assert!(a.interner.user_keys.len() <= 10);
            assert!(a.interner.applications.count() <= 10);
        }
        batches.extend(a.take());
        // Each batch is sealed when the table fills up; the sealed ones keep their own list.
        assert!(batches.len() >= 100);
        let mut per_key = std::collections::BTreeMap::new();
        for b in &batches {
            for (application, t) in b.transactions.iter() {
                *per_key
                    .entry(application.field().1.to_string())
                    .or_insert(0) += t.hits;
            }
        }
        assert_eq!(per_key.len(), 50);
        assert!(per_key.values().all(|&hits| hits == 20));
        // Credentials that are never reported do not grow the tables either.
        for n in 0..1000 {
            let raw = format!("%FF{n}");
            let bad = Request {
                credential: Credential::AppId(raw.as_bytes()),
                ..request("", 10, 200)
            };
            assert_eq!(a.add(&bad), Err(Skip::InvalidCredential));
        }
        assert!(a.interner.app_ids.len() <= 10);
    }

    #[test]
    fn credentials_are_decoded_once_and_bad_ones_skipped() {
        let mut a = Aggregator::new(true, 1000);
        for raw in [&b"a%2Bb+c"[..], b"a%2Bb+c", br"caf\xC3\xA9", b"%FF"] {
            let _ = a.add(&Request {
                credential: Credential::UserKey(raw),
                ..request("", 10, 200)
            });
        }
        assert_eq!(
            a.add(&Request {
                credential: Credential::UserKey(b"%FF"),
                ..request("", 10, 200)
            }),
            Err(Skip::InvalidCredential)
        );
        let names: Vec<_> = flat(&a.take().unwrap().transactions)
            .into_iter()
            .map(|t| t.0)
            .collect();
        assert_eq!(
            names,
            vec![
                Application::UserKey("a+b c".into()),
                Application::UserKey("a+b c".into()),
                Application::UserKey("café".into()),
            ]
        );
        assert_eq!(a.interner.user_keys.len(), 3);
    }
}
