//! Request records and their usage → batches of 3scale transactions, each batch one report call.
//!
//! With response codes on, every request is its own transaction: the backend adds exactly one to the
//! response-code counters per transaction, whatever its usage, so folding would lose codes. With them
//! off, requests of one application and second are folded into one transaction, their usages added
//! metric by metric.
//!
//! A batch is sealed at `max_transactions`, or before the next request could take the call past
//! 3scale's limits (4096 form fields, 4 MiB): see [`Budget`].

use std::collections::HashMap;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use tokio::sync::mpsc;

use crate::codes::{Outcome, Seen};
use crate::identity::FileKey;
use crate::mapping::{HostRoute, MappingRule, MappingRules, Owner};
use crate::parse::{Credential, CredentialKind, Parser, Request, Skip};
use crate::state::{Advance, Fate};
use crate::tail::{Chunk, Tailed};
use crate::telemetry::{mask, masked_line, Metrics};
use crate::usage::{MetricNames, Usage, ONE_HIT, USAGE_METRICS};

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
    /// The requests it counts (several when folded): what the counters and logs count.
    pub requests: u64,
    /// What it counts, by metric of [`Transactions::metrics`].
    pub usage: Usage,
    /// The HTTP status, when response codes are reported.
    pub code: Option<u16>,
}

/// The applications that transactions name, by id. Append-only (ids stay valid), written by the
/// aggregation and read by the report calls under way.
pub(crate) type Applications = Arc<boxcar::Vec<Application>>;

/// The transactions of one report call.
#[derive(Debug, Default, Clone)]
pub struct Transactions {
    pub applications: Applications,
    /// The names of the metrics their usages count.
    pub metrics: MetricNames,
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
    pub fn requests(&self) -> u64 {
        self.list.iter().map(|t| t.requests).sum()
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

    /// Transactions from (application, timestamp, hits, code), one request per hit, for tests.
    #[cfg(test)]
    pub fn of(list: Vec<(Application, i64, u64, Option<u16>)>) -> Transactions {
        use crate::usage::MetricId;
        let list = list
            .into_iter()
            .map(|(a, timestamp, hits, code)| {
                (a, timestamp, hits, Usage::one(MetricId::HITS, hits), code)
            })
            .collect();
        Transactions::of_usages(MetricNames::default(), list)
    }

    /// Transactions from (application, timestamp, requests, usage, code), for tests.
    #[cfg(test)]
    pub fn of_usages(
        metrics: MetricNames,
        list: Vec<(Application, i64, u64, Usage, Option<u16>)>,
    ) -> Transactions {
        let all = Transactions {
            metrics,
            ..Transactions::default()
        };
        let list = list
            .into_iter()
            .map(|(application, timestamp, requests, usage, code)| {
                let id = match all.applications.iter().find(|(_, a)| **a == application) {
                    Some((id, _)) => id,
                    None => all.applications.push(application),
                };
                Transaction {
                    application: id as u32,
                    timestamp,
                    requests,
                    usage,
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
    /// What the call reports.
    pub transactions: Transactions,
    /// Where each file stands once the batch, and every batch before it, is accepted.
    pub advances: Vec<Advance>,
}

/// The most `key=value` pairs 3scale takes in one report body (more: 400 bad_request).
pub(crate) const MAX_FIELDS_PER_CALL: usize = 4096;
/// The largest report body 3scale takes (larger: 400 bad_request).
pub(crate) const MAX_BYTES_PER_CALL: usize = 4 << 20;
/// The call's own fields: the service token (or provider key) and the service id.
const CALL_FIELDS: usize = 2;
/// Bytes kept for the call's own fields, `service_token=…&service_id=…`. 3scale's tokens and ids
/// are tens of bytes; a secret of kilobytes, which 3scale would refuse anyway, is the only way past.
const CALL_BYTES: usize = 16 << 10;
/// The longest credential reported, percent-encoded: far above any real user_key or app_id (NGINX
/// refuses request lines over 8 KiB by default). A longer one is skipped as invalid: it bounds the
/// room a batch keeps for its next transaction, and one of several MiB could never be sent.
pub(crate) const MAX_CREDENTIAL_BYTES: usize = 64 << 10;

/// The encoded size of one transaction field, at most, as `report::form::encode` writes it:
/// `&transactions%5B<index>%5D<key>=<value>`. The index has at most four digits (a call holds fewer
/// than 4096 fields, so fewer than 4096 transactions) and a number at most 20 characters (u64 or
/// i64): a folded delta can grow after it is reckoned, and an index only shrinks (when transactions
/// are taken out before sending), so the bound holds until the call is sent.
const fn field_bytes(key: &str, value: usize) -> usize {
    "&transactions%5B".len() + 4 + "%5D".len() + key.len() + "=".len() + value
}
const NUMBER_BYTES: usize = 20;
/// `[user_key]`, the longer of the two credential keys.
const CREDENTIAL_KEY: &str = "%5Buser_key%5D";
const TIMESTAMP_BYTES: usize = field_bytes("%5Btimestamp%5D", NUMBER_BYTES);
const CODE_BYTES: usize = field_bytes("%5Blog%5D%5Bcode%5D", NUMBER_BYTES);

/// Form fields, and an upper bound of their encoded bytes (reckoned per transaction from the sizes
/// above). A batch is sealed once the largest transaction the next request can make might not fit
/// its call any more, so that no call ever passes either limit.
#[derive(Debug, Clone, Copy, Default)]
struct Budget {
    fields: usize,
    bytes: usize,
}

impl Budget {
    /// What the transactions of one call may use.
    const ROOM: Budget = Budget {
        fields: MAX_FIELDS_PER_CALL - CALL_FIELDS,
        bytes: MAX_BYTES_PER_CALL - CALL_BYTES,
    };

    fn add(&mut self, fields: usize, bytes: usize) {
        self.fields += fields;
        self.bytes += bytes;
    }
}

/// A known credential: its application's id and the encoded size of its field, at most.
#[derive(Debug, Clone, Copy)]
struct Known {
    id: u32,
    bytes: u32,
}

/// Gives each distinct credential an id, decoding it once. Bounded: an API hammered with random keys
/// must not grow tally's memory, so past the limit the tables start anew (batches under way keep the
/// old list of applications).
struct Interner {
    /// Raw credential as logged → its id, or why it cannot be reported; one table per kind of
    /// credential and encoding (the same bytes decode differently from a query and a header, or
    /// for two JWT claims), by [`table`]. Grown on demand: the encodings are a few, plus one per
    /// JWT claim configured ([`Encoding::index`]), and only those met get a table.
    tables: Vec<CredentialTable>,
    /// Each application's id in `applications`: an application met again under another raw
    /// credential (the next access token of an OIDC client, a key escaped another way) keeps its
    /// id, so that its requests fold together and 3scale is asked about it once.
    ids: FxHashMap<Application, u32>,
    applications: Applications,
    limit: usize,
}

/// Raw credentials of one kind and encoding → their id, or why they cannot be reported.
type CredentialTable = FxHashMap<Box<[u8]>, Result<Known, Skip>>;

/// The table of `credential`'s kind and encoding.
fn table(credential: &Credential<'_>) -> usize {
    let kind = match credential.kind {
        CredentialKind::UserKey => 0,
        CredentialKind::AppId => 1,
    };
    credential.encoding.index() * 2 + kind
}

impl Interner {
    fn new(limit: usize) -> Interner {
        Interner {
            tables: Vec::new(),
            ids: FxHashMap::default(),
            applications: Applications::default(),
            limit,
        }
    }

    fn id(&mut self, credential: Credential<'_>) -> Result<Known, Skip> {
        let known = self
            .tables
            .get(table(&credential))
            .and_then(|t| t.get(credential.raw));
        match known {
            Some(known) => *known,
            None => self.intern(credential),
        }
    }

    /// A credential met for the first time: decoded, measured and remembered. Out of line, so
    /// that the lookup of every request stays small.
    #[cold]
    #[inline(never)]
    fn intern(&mut self, credential: Credential<'_>) -> Result<Known, Skip> {
        let full = self.full();
        let known = credential.decode().and_then(|name| {
            let encoded: usize = form_urlencoded::byte_serialize(name.as_bytes())
                .map(str::len)
                .sum();
            if encoded > MAX_CREDENTIAL_BYTES {
                return Err(Skip::InvalidCredential);
            }
            let application = match credential.kind {
                CredentialKind::UserKey => Application::UserKey(name.into()),
                CredentialKind::AppId => Application::AppId(name.into()),
            };
            let id = *self
                .ids
                .entry(application)
                .or_insert_with_key(|a| self.applications.push(a.clone()) as u32);
            Ok(Known {
                id,
                bytes: field_bytes(CREDENTIAL_KEY, encoded) as u32,
            })
        });
        // Past the limit, an unreportable credential is not remembered: a stream of them alone
        // (which never fills a batch, so never renews the tables) must not grow them.
        if known.is_ok() || !full {
            let at = table(&credential);
            if at >= self.tables.len() {
                self.tables.resize_with(at + 1, CredentialTable::default);
            }
            self.tables[at].insert(credential.raw.into(), known);
        }
        known
    }

    /// The credentials remembered.
    fn len(&self) -> usize {
        self.tables.iter().map(|t| t.len()).sum()
    }

    fn full(&self) -> bool {
        self.len() >= self.limit
    }

    /// Starts anew; only between batches, since the open batch's ids index the current list.
    fn renew(&mut self) {
        *self = Interner::new(self.limit);
    }
}

/// Folds one service's requests into batches of transactions, sealed when full.
pub struct Aggregator {
    response_codes: bool,
    max_transactions: usize,
    /// The open batch.
    transactions: Vec<Transaction>,
    advances: Vec<Advance>,
    /// What the open batch's transactions use of their call.
    used: Budget,
    /// What every transaction uses besides its credential's field (sized per application) and its
    /// usage: the credential's and the timestamp's fields, and the code's whenever codes are on
    /// (one field too many for the rare status outside 100-599, sent without a code: still an
    /// upper bound).
    fixed: Budget,
    /// Past this, the next request might not fit: [`Budget::ROOM`] less the most one request can
    /// add, a transaction with the longest credential, a usage of as many metrics as the service's
    /// allow (each as long as the longest) and a code.
    limit: Budget,
    /// Folding index of the open batch: (application, second) → transaction.
    folded: FxHashMap<(u32, i64), usize>,
    interner: Interner,
    metrics: MetricNames,
    /// The encoded size of one usage field, at most: the longest metric name's.
    usage_bytes: usize,
}

impl Aggregator {
    /// An aggregator whose usages count `hits` alone.
    pub fn new(response_codes: bool, max_transactions: usize) -> Aggregator {
        Aggregator::with_metrics(response_codes, max_transactions, MetricNames::default())
    }

    /// An aggregator for usages of `metrics` (all of them known before the first request: a
    /// batch's room for its next request depends on them).
    pub fn with_metrics(
        response_codes: bool,
        max_transactions: usize,
        metrics: MetricNames,
    ) -> Aggregator {
        let longest = metrics.iter().map(|m| m.encoded.len()).max().unwrap_or(0);
        let usage_bytes = field_bytes("%5Busage%5D%5B%5D", longest + NUMBER_BYTES);
        let usage_fields = metrics.iter().count().min(USAGE_METRICS);
        let code = usize::from(response_codes);
        let fixed = Budget {
            fields: 2 + code,
            bytes: TIMESTAMP_BYTES + code * CODE_BYTES,
        };
        // Metric names come from the service's configuration, tens of bytes: saturating only
        // keeps absurd ones from wrapping around.
        let limit = Budget {
            fields: Budget::ROOM
                .fields
                .saturating_sub(fixed.fields + usage_fields),
            bytes: Budget::ROOM.bytes.saturating_sub(
                fixed.bytes
                    + field_bytes(CREDENTIAL_KEY, MAX_CREDENTIAL_BYTES)
                    + usage_fields * usage_bytes,
            ),
        };
        Aggregator {
            response_codes,
            max_transactions: max_transactions.max(1),
            transactions: Vec::new(),
            advances: Vec::new(),
            used: Budget::default(),
            fixed,
            limit,
            folded: FxHashMap::default(),
            interner: Interner::new(100_000),
            metrics,
            usage_bytes,
        }
    }

    /// Adds one request, which counts `usage` (of the aggregator's metrics); true when the batch is
    /// full (then [`Aggregator::advance`] and [`Aggregator::take`] it). A credential that
    /// cannot be reported is a skip.
    pub fn add(&mut self, request: &Request<'_>, usage: &Usage) -> Result<bool, Skip> {
        let application = self.interner.id(request.credential)?;
        let key = (application.id, request.timestamp);
        if !self.response_codes {
            if let Some(&i) = self.folded.get(&key) {
                let t = &mut self.transactions[i];
                let before = t.usage.len();
                if t.usage.merge(usage) {
                    t.requests += 1;
                    let added = t.usage.len() - before;
                    self.used.add(added, added * self.usage_bytes);
                    return Ok(self.full());
                }
                // The sum would not fit one usage: this request starts a transaction of its own,
                // which the next ones of its application and second fold into.
            }
            self.folded.insert(key, self.transactions.len());
        }
        // 3scale counts only three-digit codes, by class; NGINX's `000` (no response sent) and
        // other odd values are reported without a code rather than as a made-up class.
        let code = (self.response_codes && (100..=599).contains(&request.status))
            .then_some(request.status);
        self.used.add(
            self.fixed.fields + usage.len(),
            self.fixed.bytes + application.bytes as usize + usage.len() * self.usage_bytes,
        );
        self.transactions.push(Transaction {
            application: application.id,
            timestamp: request.timestamp,
            requests: 1,
            usage: *usage,
            code,
        });
        Ok(self.full())
    }

    /// Whether the open batch must be sealed: at `max_transactions`, when the next request might
    /// not fit its call, or when the credential tables must start anew.
    fn full(&self) -> bool {
        self.transactions.len() >= self.max_transactions
            || self.used.fields > self.limit.fields
            || self.used.bytes > self.limit.bytes
            || self.interner.full()
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
        self.used = Budget::default();
        if self.transactions.is_empty() && self.advances.is_empty() {
            return None;
        }
        let batch = Batch {
            transactions: Transactions {
                applications: self.interner.applications.clone(),
                metrics: self.metrics.clone(),
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

    /// Usages count `metrics` from now on; only between batches (after [`Aggregator::take`]).
    pub(crate) fn set_metrics(&mut self, metrics: MetricNames) {
        let fresh = Aggregator::with_metrics(self.response_codes, self.max_transactions, metrics);
        self.metrics = fresh.metrics;
        self.fixed = fresh.fixed;
        self.limit = fresh.limit;
        self.usage_bytes = fresh.usage_bytes;
    }

    /// The open batch's fields and bytes as reckoned, for the tests that hold them to the encoder.
    #[cfg(test)]
    pub(crate) fn reckoned(&self) -> (usize, usize) {
        (self.used.fields, self.used.bytes)
    }
}

/// What one service's aggregation loop needs.
pub struct ServiceLines {
    /// The 3scale service the lines are reported to.
    pub service_id: String,
    /// The parser of each feed (follower), by feed index (None: that feed does not feed this
    /// service).
    pub parsers: Vec<Option<Parser>>,
    /// The mapping rules of each feed's source, by feed index (none, or no rules: one hit per
    /// request).
    pub rules: Vec<MappingRules>,
    /// Of each feed's source routed by Host, the lines this service takes (none: all of them).
    pub routes: Vec<Option<HostRoute>>,
    /// Longer lines are skipped, counted as too long.
    pub max_line_length: usize,
    /// How often the open batch is sealed, full or not.
    pub flush_interval: std::time::Duration,
    /// What this service counted already in files it resumes behind (another service fed by the
    /// same file is further behind), by feed and file.
    pub counted: HashMap<(usize, FileKey), Counted>,
    /// Test-only: a chunk holding these bytes makes the aggregation panic.
    pub panic_on: Option<Vec<u8>>,
}

/// New settings of the services (a new version of the proxy configuration): per service and feed,
/// how its lines are read, mapped and routed from the next line on.
#[derive(Debug, Default)]
pub struct Reconfiguration {
    pub(crate) feeds: HashMap<(String, usize), FeedSettings>,
}

/// How one service takes one feed's lines.
#[derive(Debug, Clone)]
pub(crate) struct FeedSettings {
    pub(crate) parser: Parser,
    pub(crate) rules: Vec<MappingRule>,
    pub(crate) route: Option<HostRoute>,
}

impl ServiceLines {
    /// Takes `settings` for `feed` from the next line on. The open batch is sealed first: its
    /// usages were counted with the metrics as they were.
    fn reconfigure(
        &mut self,
        aggregator: &mut Aggregator,
        feed: usize,
        settings: &Reconfiguration,
    ) -> Option<Batch> {
        let new = settings.feeds.get(&(self.service_id.clone(), feed))?;
        let sealed = aggregator.take();
        // The metrics known so far keep their ids (other feeds' rules use them), new ones follow.
        let known = aggregator.metrics.clone();
        let mut names: Vec<&str> = known.iter().map(|m| &*m.name).collect();
        names.extend(new.rules.iter().map(|r| r.metric.trim()));
        let metrics = MetricNames::new(&names);
        match MappingRules::compile(&new.rules, &metrics) {
            Ok(rules) => {
                aggregator.set_metrics(metrics);
                if let Some(slot) = self.rules.get_mut(feed) {
                    *slot = rules;
                }
            }
            // Checked with the configuration: this would be a bug. The old rules stay.
            Err((at, e)) => tracing::error!(service_id = %self.service_id, rule = at, error = %e,
                "the new mapping rules do not compile: the old ones stay"),
        }
        if let Some(slot) = self.parsers.get_mut(feed) {
            let mut parser = new.parser.clone();
            if let Some(old) = slot.take() {
                parser.carry_over(old);
            }
            *slot = Some(parser);
        }
        if let Some(slot) = self.routes.get_mut(feed) {
            *slot = new.route.clone();
        }
        sealed
    }
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
        Tailed::Reconfigured { feed, settings } => {
            let sealed = lines.reconfigure(aggregator, *feed, settings);
            // The page reads this feed's calls with the new settings (and masks the old names too).
            if let Some(new) = settings.feeds.get(&(lines.service_id.clone(), *feed)) {
                if metrics.codes.keeps_calls() {
                    metrics.codes.set_reader(
                        &lines.service_id,
                        *feed,
                        new.parser.without_credentials(),
                    );
                }
            }
            return sealed.into_iter().collect();
        }
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
pub(crate) fn parse_chunk(
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
    // The source's parser, which caches the last time field it read.
    let mut parser = lines.parsers.get_mut(chunk.feed).and_then(Option::as_mut);
    let rules = lines.rules.get(chunk.feed).filter(|r| !r.is_empty());
    let unwrapping = parser.as_deref().is_some_and(|p| p.container().is_some());
    // A source routed by Host: one of its services counts every line read and skipped; the
    // others take their own lines and count nothing else (each line once).
    let mut route = lines.routes.get_mut(chunk.feed).and_then(Option::as_mut);
    let counts = route.as_deref().is_none_or(HostRoute::counts_all);
    let escape = parser
        .as_deref()
        .map_or(crate::parse::LogEscape::Default, Parser::escape);
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
    // The lines of this service with their status, for the Response codes page.
    let recording = metrics.codes.is_on();
    let mut seen: Vec<Seen> = Vec::new();
    for (line, next) in chunk.lines() {
        if base + (next as u64) <= counted {
            continue;
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        // A skip this service counts though it does not count the source's lines (routed by Host:
        // a line of its own whose credential it cannot read).
        let mut ours = false;
        // The line's status and time, once read.
        let mut noted: Option<(u16, i64)> = None;
        let added = match parser.as_deref_mut() {
            // A container's record is measured once joined, by the parser.
            _ if line.len() > lines.max_line_length && !unwrapping => Err(Skip::TooLong),
            Some(parser) => match parser.parse_record(line) {
                // A container record of the other stream, or a part of a line that goes on.
                Ok(None) => continue,
                Ok(Some(request)) => {
                    noted = Some((request.status, request.timestamp));
                    line_time = request.timestamp;
                    if first_line_time == 0 {
                        first_line_time = line_time;
                    }
                    match route
                        .as_deref()
                        .map(|r| r.owner_of_request(&request, escape))
                    {
                        Some(Owner::Other) => {
                            read += u64::from(counts);
                            continue;
                        }
                        Some(Owner::Nobody) => Err(Skip::UnknownHost),
                        Some(Owner::This) | None => {
                            // Its skips (no mapping rule…) are this service's to count.
                            ours = true;
                            match rules {
                                Some(rules) => rules
                                    .usage(&request, escape)
                                    .and_then(|usage| aggregator.add(&request, &usage)),
                                None => aggregator.add(&request, &ONE_HIT),
                            }
                        }
                    }
                }
                // Routed by Host, a line whose credential tally cannot read is its service's to
                // count: the Host is read again without it (the rare path).
                Err(skip @ (Skip::NoCredential | Skip::InvalidCredential)) if route.is_some() => {
                    let host = parser.host_of(line);
                    match route.as_deref_mut().map(|r| r.owner_of_line(host, line)) {
                        Some(Owner::Other) => {
                            read += u64::from(counts);
                            continue;
                        }
                        Some(Owner::Nobody) => Err(Skip::UnknownHost),
                        Some(Owner::This) | None => {
                            ours = true;
                            Err(skip)
                        }
                    }
                }
                Err(skip) => Err(skip),
            },
            None => Err(Skip::Malformed),
        };
        read += u64::from(counts);
        // A line skipped for its credential: its status as read without it.
        if recording && noted.is_none() {
            if let (Some(p), Err(Skip::NoCredential | Skip::InvalidCredential)) =
                (parser.as_deref_mut(), &added)
            {
                noted = p.failed_status();
            }
        }
        if let (true, Some((status, time))) = (recording, noted) {
            let outcome = match &added {
                Ok(_) => Some(Outcome::Reported),
                Err(skip) if counts || ours => Some(Outcome::Skipped(skip.reason())),
                Err(_) => None,
            };
            if let Some(outcome) = outcome {
                // Where the line is in the chunk (it is a slice of it).
                let start = (line.as_ptr() as usize).saturating_sub(chunk.data().as_ptr() as usize);
                seen.push(Seen {
                    time,
                    status,
                    outcome,
                    start,
                    end: start + line.len(),
                });
            }
        }
        match added {
            Ok(batch_full) => {
                if batch_full {
                    let split = base + next as u64;
                    aggregator.advance(at(from, split, line_time, Fate::Reading));
                    from = split;
                    full.extend(aggregator.take());
                }
            }
            // Counted (and logged) by the service of the source that counts its lines.
            Err(_) if !counts && !ours => {}
            Err(skip) => {
                // Shown with what may be a secret masked: query credentials, and a log_format's
                // header, argument and cookie values.
                let shown = || match parser.as_deref() {
                    Some(parser) => masked_line(&parser.hide_secrets(line, mask)),
                    None => masked_line(line),
                };
                skipped[skip as usize] += 1;
                if warned.insert(skip) {
                    tracing::warn!(service_id = %lines.service_id, reason = skip.reason(), line = %shown(),
                        "line skipped (further skips for this reason are logged at debug level and counted)");
                } else if tracing::enabled!(tracing::Level::DEBUG) {
                    tracing::debug!(service_id = %lines.service_id, reason = skip.reason(), line = %shown(), "line skipped");
                }
            }
        }
    }
    // A chunk ends where no line is under way, but for a finished file's last records.
    if parser.is_some_and(Parser::end_records) && counts {
        read += 1;
        skipped[Skip::Malformed as usize] += 1;
        tracing::warn!(service_id = %lines.service_id, path = %crate::telemetry::shown_path(&chunk.at.path),
            "the file ended inside a line split over container records (its last record never came): skipped as malformed");
    }
    // Counted once per chunk: an atomic add per line would cost more than the parsing.
    Metrics::add(&metrics.lines_read, read);
    metrics
        .codes
        .add(&lines.service_id, chunk.feed, chunk.data(), &seen);
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
pub(crate) async fn run(
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

    use crate::parse::LOGGED_HEADERS;
    use crate::usage::MetricId;

    fn request(key: &str, timestamp: i64, status: u16) -> Request<'_> {
        Request {
            timestamp,
            method: Some(b"GET"),
            path: Some(b"/"),
            query: None,
            host: None,
            headers: [None; LOGGED_HEADERS],
            status,
            credential: Credential::user_key(key.as_bytes()),
        }
    }

    type Flat = (Application, i64, u64, Option<u16>);

    /// A batch that fills up inside a chunk ends there; the next one starts there, not at the
    /// chunk's start (its byte range is what a resend or a restart says, and where a file with no
    /// checkpoint yet gets one).
    #[test]
    fn a_batch_split_inside_a_chunk_starts_at_the_split() {
        use crate::identity::{FileKey, FilePosition, Fingerprint};
        use crate::parse::{CredentialMode, CredentialRule, LogFormat};
        use crate::tail::Chunk;
        let line = "1.2.3.4 - - [10/Oct/2026:13:55:36 +0000] \"GET /?user_key=k HTTP/1.1\" 200 1 \"-\" \"a\"\n";
        let len = line.len() as u64;
        let mut lines = ServiceLines {
            service_id: "42".into(),
            parsers: vec![Some(Parser::new(
                LogFormat::Combined,
                CredentialRule::query(CredentialMode::Auto),
            ))],
            rules: Vec::new(),
            routes: Vec::new(),
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

    /// (application, timestamp, hits, code), each request one hit.
    fn flat(transactions: &Transactions) -> Vec<Flat> {
        transactions
            .iter()
            .map(|(a, t)| {
                assert_eq!(t.usage, Usage::one(MetricId::HITS, t.requests), "{t:?}");
                (a.clone(), t.timestamp, t.requests, t.code)
            })
            .collect()
    }

    #[test]
    fn with_response_codes_each_request_is_a_transaction() {
        let mut a = Aggregator::new(true, 3);
        assert!(!a.add(&request("k", 10, 200), &ONE_HIT).unwrap());
        assert!(!a.add(&request("k", 10, 200), &ONE_HIT).unwrap());
        assert!(a.add(&request("j", 10, 404), &ONE_HIT).unwrap());
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
        a.add(&request("k", 11, 500), &ONE_HIT).unwrap();
        let next = a.take().unwrap().transactions;
        assert_eq!(flat(&next), vec![tx("k", 11, 1, Some(500))]);
        // The batches share one list of applications.
        assert_eq!(next.applications.count(), 2);
    }

    #[test]
    fn without_response_codes_requests_fold_per_application_and_second() {
        let mut a = Aggregator::new(false, 1000);
        for (k, t) in [("k", 10), ("k", 10), ("j", 10), ("k", 11), ("k", 10)] {
            assert!(!a.add(&request(k, t, 200), &ONE_HIT).unwrap());
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
        assert_eq!(b.transactions.requests(), 5);
        // A new batch starts a new fold.
        a.add(&request("k", 10, 200), &ONE_HIT).unwrap();
        assert_eq!(
            flat(&a.take().unwrap().transactions),
            vec![tx("k", 10, 1, None)]
        );
    }

    #[test]
    fn user_keys_and_app_ids_never_fold_together() {
        let mut a = Aggregator::new(false, 1000);
        a.add(&request("same", 10, 200), &ONE_HIT).unwrap();
        a.add(
            &Request {
                credential: Credential::app_id(b"same"),
                ..request("", 10, 200)
            },
            &ONE_HIT,
        )
        .unwrap();
        assert_eq!(a.take().unwrap().transactions.len(), 2);
    }

    #[test]
    fn the_credential_tables_stay_bounded_and_batches_exact() {
        let mut a = Aggregator::new(true, 10_000);
        a.interner = Interner::new(10);
        let mut batches = Vec::new();
        for n in 0..1000 {
            if a.add(&request(&(n % 50).to_string(), 10, 200), &ONE_HIT)
                .unwrap()
            {
                batches.push(a.take().unwrap());
            }
            assert!(a.interner.len() <= 10);
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
                    .or_insert(0) += t.requests;
            }
        }
        assert_eq!(per_key.len(), 50);
        assert!(per_key.values().all(|&hits| hits == 20));
        // Credentials that are never reported do not grow the tables either.
        for n in 0..1000 {
            let raw = format!("%FF{n}");
            let bad = Request {
                credential: Credential::app_id(raw.as_bytes()),
                ..request("", 10, 200)
            };
            assert_eq!(a.add(&bad, &ONE_HIT), Err(Skip::InvalidCredential));
        }
        assert!(a.interner.len() <= 10);
    }

    #[test]
    fn credentials_are_decoded_once_and_bad_ones_skipped() {
        let mut a = Aggregator::new(true, 1000);
        for raw in [&b"a%2Bb+c"[..], b"a%2Bb+c", br"caf\xC3\xA9", b"%FF"] {
            let _ = a.add(
                &Request {
                    credential: Credential::user_key(raw),
                    ..request("", 10, 200)
                },
                &ONE_HIT,
            );
        }
        assert_eq!(
            a.add(
                &Request {
                    credential: Credential::user_key(b"%FF"),
                    ..request("", 10, 200)
                },
                &ONE_HIT
            ),
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
        assert_eq!(a.interner.len(), 3);
    }

    #[test]
    fn one_token_read_for_two_claims_gives_two_app_ids() {
        use crate::parse::testing::{jwt, oidc};
        use crate::parse::CredentialLocation;
        let token = jwt(r#"{"azp":"by-azp","client_id":"by-client-id"}"#);
        let authorization = format!("Bearer {token}");
        let mut a = Aggregator::new(true, 1000);
        for claim in ["azp", "client_id", "azp", "client_id"] {
            let rule = oidc(CredentialLocation::Authorization, claim);
            let credential = rule.bearer(Some(authorization.as_bytes())).unwrap();
            a.add(
                &Request {
                    credential,
                    ..request("", 10, 200)
                },
                &ONE_HIT,
            )
            .unwrap();
        }
        let names: Vec<_> = flat(&a.take().unwrap().transactions)
            .into_iter()
            .map(|t| t.0)
            .collect();
        let app = |id: &str| Application::AppId(id.into());
        assert_eq!(
            names,
            vec![
                app("by-azp"),
                app("by-client-id"),
                app("by-azp"),
                app("by-client-id")
            ]
        );
        // Each payload decoded once per claim.
        assert_eq!(a.interner.len(), 2);
    }

    #[test]
    fn an_application_met_under_new_raw_credentials_keeps_its_id() {
        use crate::parse::testing::{jwt, oidc};
        use crate::parse::CredentialLocation;
        let rule = oidc(CredentialLocation::Authorization, "azp");
        // A client's successive tokens: other payloads, one app_id.
        let tokens: Vec<String> = (0..3)
            .map(|exp| format!("Bearer {}", jwt(&format!(r#"{{"azp":"app","exp":{exp}}}"#))))
            .collect();
        let mut a = Aggregator::new(false, 1000);
        for token in &tokens {
            let credential = rule.bearer(Some(token.as_bytes())).unwrap();
            let request = Request {
                credential,
                ..request("", 10, 200)
            };
            a.add(&request, &ONE_HIT).unwrap();
        }
        // And a user_key written two ways.
        for raw in [&b"k%2Dey"[..], b"k-ey"] {
            let request = Request {
                credential: Credential::user_key(raw),
                ..request("", 10, 200)
            };
            a.add(&request, &ONE_HIT).unwrap();
        }
        assert_eq!(a.interner.len(), 5);
        let batch = a.take().unwrap();
        assert_eq!(
            flat(&batch.transactions),
            vec![
                (Application::AppId("app".into()), 10, 3, None),
                tx("k-ey", 10, 2, None)
            ]
        );
        assert_eq!(batch.transactions.applications.count(), 2);
    }

    /// Usage of each (metric, delta).
    fn usage(metrics: &MetricNames, of: &[(&str, u64)]) -> Usage {
        let mut u = Usage::default();
        for &(name, delta) in of {
            assert!(u.add(metrics.id(name).unwrap(), delta));
        }
        u
    }

    /// (application, timestamp, requests, usage by name, code).
    type Named = (String, i64, u64, Vec<(String, u64)>, Option<u16>);

    fn named(transactions: &Transactions) -> Vec<Named> {
        transactions
            .iter()
            .map(|(a, t)| {
                let usage = t
                    .usage
                    .iter()
                    .map(|(m, d)| (transactions.metrics.get(m).name.to_string(), d))
                    .collect();
                (
                    a.field().1.to_string(),
                    t.timestamp,
                    t.requests,
                    usage,
                    t.code,
                )
            })
            .collect()
    }

    fn owned(of: &[(&str, u64)]) -> Vec<(String, u64)> {
        of.iter().map(|&(m, d)| (m.to_string(), d)).collect()
    }

    #[test]
    fn folding_adds_usages_metric_by_metric_within_one_usage() {
        let metrics = MetricNames::new(&["search", "a", "b", "c", "d", "e", "f", "g"]);
        let mut a = Aggregator::with_metrics(false, 1000, metrics.clone());
        let u = |of: &[(&str, u64)]| usage(&metrics, of);
        for (k, t, of) in [
            ("k", 10, &[("hits", 1), ("search", 1)][..]),
            ("k", 10, &[("hits", 1)]),
            ("j", 10, &[("search", 2)]),
            ("k", 10, &[("hits", 1), ("a", 3)]),
            // hits, search, a, b, c, d, e and f: the eighth and last metric a usage holds.
            ("k", 10, &[("b", 1), ("c", 1), ("d", 1), ("e", 1), ("f", 1)]),
            // A ninth does not fit: a transaction of its own, which the next request folds into.
            ("k", 10, &[("g", 1), ("hits", 1)]),
            ("k", 10, &[("hits", 1), ("search", 1)]),
        ] {
            assert!(!a.add(&request(k, t, 200), &u(of)).unwrap());
        }
        assert_eq!(USAGE_METRICS, 8);
        assert_eq!(
            named(&a.take().unwrap().transactions),
            vec![
                (
                    "k".into(),
                    10,
                    4,
                    owned(&[
                        ("hits", 3),
                        ("search", 1),
                        ("a", 3),
                        ("b", 1),
                        ("c", 1),
                        ("d", 1),
                        ("e", 1),
                        ("f", 1)
                    ]),
                    None
                ),
                ("j".into(), 10, 1, owned(&[("search", 2)]), None),
                (
                    "k".into(),
                    10,
                    2,
                    owned(&[("g", 1), ("hits", 2), ("search", 1)]),
                    None
                ),
            ]
        );
    }

    /// Until a request can carry more than hits, the fields allow what `max_transactions` allowed:
    /// 1023 transactions of four fields with response codes, 1364 of three without.
    #[test]
    fn hits_alone_fill_the_fields_as_before() {
        for (response_codes, most) in [(true, 1023), (false, 1364)] {
            let mut a = Aggregator::new(response_codes, 5000);
            let mut n = 0;
            while !a.add(&request("k", n, 200), &ONE_HIT).unwrap() {
                n += 1;
            }
            assert_eq!(n + 1, most);
            assert_eq!(
                a.reckoned().0,
                most as usize * (3 + usize::from(response_codes))
            );
        }
    }

    #[test]
    fn multi_metric_usages_seal_the_batch_before_4096_fields() {
        let metrics = MetricNames::new(&["search", "a", "b"]);
        let four = usage(&metrics, &[("hits", 1), ("search", 1), ("a", 1), ("b", 1)]);
        let mut a = Aggregator::with_metrics(true, 1023, metrics);
        let mut n = 0;
        while !a.add(&request("k", 10, 200), &four).unwrap() {
            n += 1;
        }
        // Seven fields a transaction: the 585th would make 4097 with the call's own two.
        let (fields, _) = a.reckoned();
        assert_eq!((n + 1, fields), (584, 584 * 7));
        assert!(fields + CALL_FIELDS + 7 > MAX_FIELDS_PER_CALL);
        assert_eq!(a.take().unwrap().transactions.len(), 584);
    }

    #[test]
    fn long_credentials_seal_the_batch_before_4_mib() {
        let mut a = Aggregator::new(true, 1023);
        let mut n = 0;
        loop {
            // 60 KiB of `%2F` once encoded.
            let key = format!("{n:05}{}", "%2F".repeat(20 << 10));
            if a.add(&request(&key, 10, 200), &ONE_HIT).unwrap() {
                break;
            }
            n += 1;
        }
        let (_, bytes) = a.reckoned();
        assert!(n + 1 < 100, "{n}");
        assert!(bytes <= MAX_BYTES_PER_CALL - CALL_BYTES, "{bytes}");
        // No room left for one more of the longest credentials.
        assert!(bytes + (MAX_CREDENTIAL_BYTES + 200) > MAX_BYTES_PER_CALL - CALL_BYTES);
        // A credential too long for any call is skipped, not sent.
        let key = "%2F".repeat((MAX_CREDENTIAL_BYTES / 3) + 1);
        assert_eq!(
            a.add(&request(&key, 10, 200), &ONE_HIT),
            Err(Skip::InvalidCredential)
        );
        let key = "%2F".repeat(MAX_CREDENTIAL_BYTES / 3);
        assert!(a.add(&request(&key, 10, 200), &ONE_HIT).is_ok());
    }
}

#[cfg(test)]
mod container_lines {
    use super::*;
    use crate::identity::{FileKey, FilePosition, Fingerprint};
    use crate::parse::{Container, CredentialMode, CredentialRule, LogFormat, Stream, Wrapper};
    use crate::tail::Chunk;
    use std::collections::HashMap;
    use std::sync::Arc;

    /// A joined line longer than max_line_length, one of whose records alone is longer too: that
    /// record is skipped before the unwrapper sees it, and the line's other parts are joined into
    /// a shorter line that is counted.
    #[test]
    fn a_too_long_record_inside_a_joined_line_is_not_counted_as_the_rest() {
        let max = 200;
        let cri = Container {
            wrapper: Wrapper::Cri,
            stream: Stream::Stdout,
        };
        let parser = Parser::new(
            LogFormat::Combined,
            CredentialRule::query(CredentialMode::Auto),
        )
        .unwrapping(cri, max);
        let mut lines = ServiceLines {
            service_id: "42".into(),
            parsers: vec![Some(parser)],
            rules: Vec::new(),
            routes: Vec::new(),
            max_line_length: max,
            flush_interval: std::time::Duration::from_secs(1),
            counted: HashMap::new(),
            panic_on: None,
        };
        let data = format!(
            "2026-11-26T10:15:00.1Z stdout P 1.2.3.4 - - [10/Oct/2026:13:55:36 +0000] \"GET /?user_key=k&pad=\n\
             2026-11-26T10:15:00.2Z stdout P {}\n\
             2026-11-26T10:15:00.3Z stdout F  HTTP/1.1\" 200 1 \"-\" \"a\"\n",
            "x".repeat(300)
        );
        let at = FilePosition {
            key: FileKey { dev: 1, ino: 2 },
            fingerprint: Fingerprint { len: 0, hash: 0 },
            offset: data.len() as u64,
            path: Arc::from(std::path::Path::new("/c.log")),
        };
        let chunk = Chunk::new(0, at, data.into_bytes());
        let mut aggregator = Aggregator::new(false, 100);
        let (metrics, mut warned) = (Metrics::default(), Default::default());
        parse_chunk(
            &mut lines,
            &mut aggregator,
            &chunk,
            Fate::Reading,
            &metrics,
            &mut warned,
        );
        let batch = aggregator.take();
        let counted = batch.map_or(0, |b| {
            b.transactions.iter().map(|(_, t)| t.requests).sum::<u64>()
        });
        assert_eq!(counted, 0, "a line longer than max_line_length was counted");
    }
}
