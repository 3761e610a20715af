//! Request records → batches of 3scale transactions, one batch at most `max_transactions` long.
//!
//! With response codes on, every request is its own transaction: the backend adds exactly one to the
//! response-code counters per transaction, whatever its usage, so folding would lose codes. With them
//! off, requests of one application and second are folded into one transaction.

use std::sync::Arc;

use rustc_hash::FxHashMap;

use tokio::sync::mpsc;

use crate::parse::{Credential, Parser, Request, Skip};
use crate::state::Advance;
use crate::tail::Chunk;
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub application: Application,
    /// Epoch seconds.
    pub timestamp: i64,
    pub hits: u64,
    /// The HTTP status, when response codes are reported.
    pub code: Option<u16>,
}

/// A sealed batch, ready for one report call.
#[derive(Debug, Default)]
pub struct Batch {
    pub transactions: Vec<Transaction>,
    /// Where each file stands once the batch, and every batch before it, is accepted.
    pub advances: Vec<Advance>,
}

/// Decodes each distinct credential once and shares one allocation per application. Bounded: an API
/// hammered with random keys must not grow tally's memory, so a table is cleared when it reaches its
/// limit.
struct Interner {
    /// Raw credential as logged → its decoded name, or why it cannot be reported.
    user_keys: FxHashMap<Box<[u8]>, Result<Arc<str>, Skip>>,
    app_ids: FxHashMap<Box<[u8]>, Result<Arc<str>, Skip>>,
    limit: usize,
}

impl Interner {
    fn application(&mut self, credential: Credential<'_>) -> Result<Application, Skip> {
        let (table, raw) = match credential {
            Credential::UserKey(raw) => (&mut self.user_keys, raw),
            Credential::AppId(raw) => (&mut self.app_ids, raw),
        };
        let name = match table.get(raw) {
            Some(known) => known.clone(),
            None => {
                if table.len() >= self.limit {
                    table.clear();
                }
                let name = credential.decode().map(Arc::from);
                table.insert(raw.into(), name.clone());
                name
            }
        }?;
        Ok(match credential {
            Credential::UserKey(_) => Application::UserKey(name),
            Credential::AppId(_) => Application::AppId(name),
        })
    }
}

pub struct Aggregator {
    response_codes: bool,
    max_transactions: usize,
    batch: Batch,
    /// Folding index of the open batch: (application, second) → transaction.
    folded: FxHashMap<(Application, i64), usize>,
    interner: Interner,
}

impl Aggregator {
    pub fn new(response_codes: bool, max_transactions: usize) -> Aggregator {
        Aggregator {
            response_codes,
            max_transactions: max_transactions.max(1),
            batch: Batch::default(),
            folded: FxHashMap::default(),
            interner: Interner {
                user_keys: FxHashMap::default(),
                app_ids: FxHashMap::default(),
                limit: 100_000,
            },
        }
    }

    /// Adds one request; true when the batch is full (then [`Aggregator::advance`] and
    /// [`Aggregator::take`] it). A credential that cannot be reported is a skip.
    pub fn add(&mut self, request: &Request<'_>) -> Result<bool, Skip> {
        let application = self.interner.application(request.credential)?;
        if !self.response_codes {
            let key = (application, request.timestamp);
            if let Some(&i) = self.folded.get(&key) {
                self.batch.transactions[i].hits += 1;
                return Ok(false);
            }
            self.folded
                .insert(key.clone(), self.batch.transactions.len());
            self.batch.transactions.push(Transaction {
                application: key.0,
                timestamp: request.timestamp,
                hits: 1,
                code: None,
            });
        } else {
            self.batch.transactions.push(Transaction {
                application,
                timestamp: request.timestamp,
                hits: 1,
                code: Some(request.status),
            });
        }
        Ok(self.batch.transactions.len() >= self.max_transactions)
    }

    /// Records how far the open batch takes a file (the latest position of a file wins).
    pub fn advance(&mut self, advance: Advance) {
        let advances = &mut self.batch.advances;
        match advances
            .iter_mut()
            .find(|a| a.source == advance.source && a.key == advance.key)
        {
            Some(a) => *a = advance,
            None => advances.push(advance),
        }
    }

    /// Seals the open batch, if it counts anything or moves a file on.
    pub fn take(&mut self) -> Option<Batch> {
        self.folded.clear();
        if self.batch.transactions.is_empty() && self.batch.advances.is_empty() {
            return None;
        }
        // The next batch gets its full size at once, instead of growing by copies.
        let next = Batch {
            transactions: Vec::with_capacity(self.max_transactions),
            advances: Vec::new(),
        };
        Some(std::mem::replace(&mut self.batch, next))
    }
}

/// What one service's aggregation loop needs.
pub struct ServiceLines {
    pub service_id: String,
    /// The parser of each source, by source index (None: that source belongs to another service).
    pub parsers: Vec<Option<Parser>>,
    pub max_line_length: usize,
    pub flush_interval: std::time::Duration,
}

/// Parses one chunk's lines into the aggregator; returns the batches they filled.
pub fn parse_chunk(
    lines: &ServiceLines,
    aggregator: &mut Aggregator,
    chunk: &Chunk,
    metrics: &Metrics,
    warned: &mut std::collections::HashSet<Skip>,
) -> Vec<Batch> {
    let mut full = Vec::new();
    let base = chunk.end_offset - chunk.len() as u64;
    let mut line_time = 0;
    // A copy per chunk: the parser caches the last time field it read.
    let mut parser = lines.parsers.get(chunk.source).copied().flatten();
    let at = |offset: u64, line_time: i64, closed: bool| Advance {
        source: chunk.source,
        key: chunk.file,
        fingerprint: chunk.fingerprint,
        offset,
        line_time,
        path: chunk.path.clone(),
        closed,
    };
    let (mut read, mut skipped) = (0u64, [0u64; 4]);
    for (line, next) in chunk.lines() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        read += 1;
        let added = match parser.as_mut() {
            _ if line.len() > lines.max_line_length => Err(Skip::TooLong),
            Some(parser) => parser.parse(line).and_then(|request| {
                line_time = request.timestamp;
                aggregator.add(&request)
            }),
            None => Err(Skip::Malformed),
        };
        match added {
            Ok(batch_full) => {
                if batch_full {
                    aggregator.advance(at(base + next as u64, line_time, false));
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
    for skip in [
        Skip::Malformed,
        Skip::NoCredential,
        Skip::InvalidCredential,
        Skip::TooLong,
    ] {
        metrics.skipped(skip, skipped[skip as usize]);
    }
    aggregator.advance(at(chunk.end_offset, line_time, chunk.closed));
    full
}

/// Parses the chunks of one service's sources into batches, sealed when full or at each flush
/// interval. Ends, after sealing what it holds, when every follower is gone.
pub async fn run(
    lines: ServiceLines,
    mut aggregator: Aggregator,
    mut chunks: mpsc::Receiver<Chunk>,
    batches: mpsc::Sender<Batch>,
    metrics: std::sync::Arc<Metrics>,
) {
    let mut flush = tokio::time::interval(lines.flush_interval);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    flush.tick().await; // the first tick is immediate
    let mut warned = std::collections::HashSet::new();
    loop {
        let full = tokio::select! {
            chunk = chunks.recv() => match chunk {
                Some(chunk) => parse_chunk(&lines, &mut aggregator, &chunk, &metrics, &mut warned),
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

    fn tx(key: &str, timestamp: i64, hits: u64, code: Option<u16>) -> Transaction {
        Transaction {
            application: Application::UserKey(key.into()),
            timestamp,
            hits,
            code,
        }
    }

    #[test]
    fn with_response_codes_each_request_is_a_transaction() {
        let mut a = Aggregator::new(true, 3);
        assert!(!a.add(&request("k", 10, 200)).unwrap());
        assert!(!a.add(&request("k", 10, 200)).unwrap());
        assert!(a.add(&request("j", 10, 404)).unwrap());
        let full = a.take().unwrap();
        assert_eq!(
            full.transactions,
            vec![
                tx("k", 10, 1, Some(200)),
                tx("k", 10, 1, Some(200)),
                tx("j", 10, 1, Some(404))
            ]
        );
        assert!(a.take().is_none());
        a.add(&request("k", 11, 500)).unwrap();
        assert_eq!(
            a.take().unwrap().transactions,
            vec![tx("k", 11, 1, Some(500))]
        );
    }

    #[test]
    fn without_response_codes_requests_fold_per_application_and_second() {
        let mut a = Aggregator::new(false, 1000);
        for (k, t) in [("k", 10), ("k", 10), ("j", 10), ("k", 11), ("k", 10)] {
            assert!(!a.add(&request(k, t, 200)).unwrap());
        }
        let b = a.take().unwrap();
        assert_eq!(
            b.transactions,
            vec![
                tx("k", 10, 3, None),
                tx("j", 10, 1, None),
                tx("k", 11, 1, None)
            ]
        );
        assert_eq!(b.transactions.iter().map(|t| t.hits).sum::<u64>(), 5);
        // A new batch starts a new fold.
        a.add(&request("k", 10, 200)).unwrap();
        assert_eq!(a.take().unwrap().transactions, vec![tx("k", 10, 1, None)]);
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
    fn the_interner_stays_bounded() {
        let mut i = Interner {
            user_keys: FxHashMap::default(),
            app_ids: FxHashMap::default(),
            limit: 10,
        };
        for n in 0..1000 {
            i.application(Credential::UserKey(n.to_string().as_bytes()))
                .unwrap();
        }
        assert!(i.user_keys.len() <= 10);
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
        let names: Vec<_> = a
            .take()
            .unwrap()
            .transactions
            .into_iter()
            .map(|t| t.application)
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
