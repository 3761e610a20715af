//! The Response codes of the lines tally reads, kept for the local page and its API: per service
//! and status code, requests over time at four steps (10 s for 15 min, 1 min for 1 h, 10 min for
//! 6 h, 1 h for 24 h: memory independent of traffic), and the latest calls of each code in a ring.
//! The aggregation adds a chunk's lines at once (one lock per chunk, no allocation per line); a
//! call keeps its raw line, which is read again and masked only when shown.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// The steps a series is kept at, each with how many of them: 15 min, 1 h, 6 h and 24 h.
pub(crate) const STEPS: [(i64, usize); 4] = [(10, 90), (60, 60), (600, 36), (3600, 24)];

/// How much of a call's line is kept (its start: the rest is cut).
const LINE_KEPT: usize = 2048;

/// At most this many (service, code) series: past it, new codes of a service are not kept (the
/// status of a line is 3 digits, but a log may hold anything).
const MAX_SERIES: usize = 4096;

/// At most this many calls kept in all (each up to [`LINE_KEPT`] bytes: 25 MiB): the (service,
/// code) pairs that keep calls are as many as fit at `calls_per_code` each (at least 16).
const MAX_CALLS: usize = 12_800;

/// Now, in epoch seconds.
fn wall_clock() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// What became of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Sent to 3scale (or on its way).
    Reported,
    /// Not sent, for this reason (a skip's name).
    Skipped(&'static str),
}

impl Outcome {
    pub(crate) fn text(self) -> String {
        match self {
            Outcome::Reported => "reported".into(),
            Outcome::Skipped(reason) => format!("skipped: {reason}"),
        }
    }
}

/// One call as kept: shown read again from its line by the source's parser.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    /// The order calls were read in.
    pub(crate) seq: u64,
    pub(crate) time: i64,
    pub(crate) status: u16,
    pub(crate) outcome: Outcome,
    /// The source it was read from (its parser reads the line again when shown).
    pub(crate) source: usize,
    pub(crate) line: Box<[u8]>,
}

/// A line of a chunk, noted by the aggregation for [`Codes::add`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seen {
    pub(crate) time: i64,
    pub(crate) status: u16,
    pub(crate) outcome: Outcome,
    /// Where the line is in the chunk.
    pub(crate) start: usize,
    pub(crate) end: usize,
}

/// Requests per bucket of one step, in a ring: a bucket whose start is not the one asked for is
/// from an older turn of the ring (empty now).
#[derive(Debug, Clone)]
struct Ring {
    step: i64,
    buckets: Box<[(i64, u64)]>,
}

impl Ring {
    fn new(step: i64, len: usize) -> Ring {
        Ring {
            step,
            buckets: vec![(i64::MIN, 0); len].into_boxed_slice(),
        }
    }

    fn slot(&self, start: i64) -> usize {
        (start / self.step).rem_euclid(self.buckets.len() as i64) as usize
    }

    fn add(&mut self, time: i64, n: u64, newest: i64) {
        let start = time.div_euclid(self.step) * self.step;
        // Older than the ring holds: only the totals count it.
        if start <= newest - self.step * self.buckets.len() as i64 {
            return;
        }
        let slot = self.slot(start);
        let bucket = &mut self.buckets[slot];
        if bucket.0 < start {
            *bucket = (start, 0);
        }
        if bucket.0 == start {
            bucket.1 += n;
        }
    }

    fn get(&self, start: i64) -> u64 {
        let bucket = self.buckets[self.slot(start)];
        if bucket.0 == start {
            bucket.1
        } else {
            0
        }
    }
}

#[derive(Debug, Clone)]
struct Series {
    total: u64,
    rings: [Ring; 4],
}

impl Series {
    fn new() -> Series {
        Series {
            total: 0,
            rings: STEPS.map(|(step, len)| Ring::new(step, len)),
        }
    }
}

#[derive(Debug, Default)]
struct Store {
    /// (service, code) → its series.
    series: BTreeMap<(Arc<str>, u16), Series>,
    /// (service, code) → its latest calls, newest last.
    calls: HashMap<(Arc<str>, u16), VecDeque<Call>>,
    /// The newest line time seen: the rings keep what is within their span of it.
    newest: i64,
    /// Lines whose series could not be kept (past [`MAX_SERIES`]).
    untracked: u64,
    /// The last call's [`Call::seq`].
    seq: u64,
}

/// The codes of every service, shared by the aggregations and the telemetry listener.
#[derive(Debug, Default)]
pub struct Codes {
    store: Mutex<Store>,
    /// Per (service, feed), a parser of its lines, to read a call again when it is shown, and
    /// every query parameter name its credentials have had (masked in calls kept from before a
    /// new proxy configuration renamed them).
    readers: Mutex<HashMap<(String, usize), Reader>>,
    /// Whether codes are kept (the page is served).
    on: bool,
    /// Calls kept per code and service (0: none).
    calls_per_code: usize,
}

/// How the calls of one service and feed are read again.
#[derive(Debug)]
struct Reader {
    parser: crate::parse::Parser,
    names: Vec<String>,
}

/// A series as the API gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Counted {
    pub(crate) code: u16,
    pub(crate) total: u64,
    /// Requests per bucket, from the first bucket asked for.
    pub(crate) points: Vec<u64>,
}

impl Codes {
    /// Codes kept, with `calls_per_code` calls of each.
    pub(crate) fn new(calls_per_code: usize) -> Codes {
        Codes {
            on: true,
            calls_per_code,
            ..Codes::default()
        }
    }

    /// Whether codes are kept (else lines are not noted for them).
    pub(crate) fn is_on(&self) -> bool {
        self.on
    }

    /// Whether calls are kept.
    pub(crate) fn keeps_calls(&self) -> bool {
        self.on && self.calls_per_code > 0
    }

    /// Calls of `service` read from `feed` are read again with `parser` when shown (from the
    /// start, and at each new proxy configuration).
    pub(crate) fn set_reader(&self, service: &str, feed: usize, parser: crate::parse::Parser) {
        let Ok(mut readers) = self.readers.lock() else {
            return;
        };
        let names: Vec<String> = parser
            .query_credential_names()
            .iter()
            .map(|n| n.to_string())
            .collect();
        let reader = readers
            .entry((service.to_string(), feed))
            .or_insert_with(|| Reader {
                parser: parser.clone(),
                names: Vec::new(),
            });
        reader.parser = parser;
        for name in names {
            if !reader.names.contains(&name) {
                reader.names.push(name);
            }
        }
    }

    /// Runs `f` with the parser of `service`'s lines from `feed` and every credential parameter
    /// name it has had, if there is one.
    pub(crate) fn with_reader<R>(
        &self,
        service: &str,
        feed: usize,
        f: impl FnOnce(&mut crate::parse::Parser, &[&str]) -> R,
    ) -> Option<R> {
        let mut readers = self.readers.lock().ok()?;
        let reader = readers.get_mut(&(service.to_string(), feed))?;
        let names: Vec<&str> = reader.names.iter().map(String::as_str).collect();
        Some(f(&mut reader.parser, &names))
    }

    /// Adds the lines `seen` of a chunk (`data`) of `source`, reported to `service`.
    pub(crate) fn add(&self, service: &str, source: usize, data: &[u8], seen: &[Seen]) {
        if seen.is_empty() {
            return;
        }
        let service: Arc<str> = Arc::from(service);
        // Per code and 10 s bucket first (a chunk spans few of either), then one lock.
        let mut counts: Vec<(u16, i64, u64)> = Vec::new();
        for s in seen {
            let bucket = s.time.div_euclid(10) * 10;
            match counts
                .iter_mut()
                .find(|(c, b, _)| *c == s.status && *b == bucket)
            {
                Some(entry) => entry.2 += 1,
                None => counts.push((s.status, bucket, 1)),
            }
        }
        let Ok(mut store) = self.store.lock() else {
            return;
        };
        let store = &mut *store;
        // A line dated in the future (a wrong clock, a made-up time) must not move the rings past
        // the present, which would drop every line after it: the newest is at most a day ahead.
        let latest = wall_clock() + 86_400;
        store.newest = store.newest.max(
            seen.iter()
                .map(|s| s.time)
                .filter(|t| *t <= latest)
                .max()
                .unwrap_or(0),
        );
        let newest = store.newest;
        for (code, bucket, n) in counts {
            let key = (service.clone(), code);
            if !store.series.contains_key(&key) && store.series.len() >= MAX_SERIES {
                store.untracked += n;
                continue;
            }
            let series = store.series.entry(key).or_insert_with(Series::new);
            series.total += n;
            if bucket <= newest {
                for ring in &mut series.rings {
                    ring.add(bucket, n, newest);
                }
            }
        }
        if self.calls_per_code == 0 {
            return;
        }
        // The latest calls per code: the chunk's last ones (at most as many as a ring keeps).
        let mut taken: Vec<(u16, usize)> = Vec::new();
        let mut chosen: Vec<&Seen> = Vec::new();
        for s in seen.iter().rev() {
            let n = match taken.iter_mut().find(|(c, _)| *c == s.status) {
                Some((_, n)) => n,
                None => {
                    taken.push((s.status, 0));
                    &mut taken.last_mut().expect("just pushed").1
                }
            };
            if *n < self.calls_per_code {
                *n += 1;
                chosen.push(s);
            }
        }
        // Oldest first, so that each ring ends with the newest.
        for s in chosen.into_iter().rev() {
            let key = (service.clone(), s.status);
            if !store.series.contains_key(&key) {
                continue;
            }
            store.seq += 1;
            let line = &data[s.start..s.end.min(s.start + LINE_KEPT)];
            let call = Call {
                seq: store.seq,
                time: s.time,
                status: s.status,
                outcome: s.outcome,
                source,
                line: line.into(),
            };
            let rings = (MAX_CALLS / self.calls_per_code).max(16);
            if !store.calls.contains_key(&key) && store.calls.len() >= rings {
                continue;
            }
            let ring = store.calls.entry(key).or_default();
            ring.push_back(call);
            if ring.len() > self.calls_per_code {
                ring.pop_front();
            }
        }
    }

    /// The series of `service` (None: all, summed) from `from` for `count` buckets of `step`
    /// (one of [`STEPS`]), by code.
    pub(crate) fn series(
        &self,
        service: Option<&str>,
        step: i64,
        from: i64,
        count: usize,
    ) -> Vec<Counted> {
        let Some(ring) = STEPS.iter().position(|(s, _)| *s == step) else {
            return Vec::new();
        };
        let Ok(store) = self.store.lock() else {
            return Vec::new();
        };
        let mut by_code: BTreeMap<u16, Counted> = BTreeMap::new();
        for ((s, code), series) in &store.series {
            if service.is_some_and(|wanted| wanted != &**s) {
                continue;
            }
            let counted = by_code.entry(*code).or_insert_with(|| Counted {
                code: *code,
                total: 0,
                points: vec![0; count],
            });
            counted.total += series.total;
            for (i, point) in counted.points.iter_mut().enumerate() {
                *point += series.rings[ring].get(from + step * i as i64);
            }
        }
        by_code.into_values().collect()
    }

    /// The newest line time seen (0: none yet).
    pub(crate) fn newest(&self) -> i64 {
        self.store.lock().map(|s| s.newest).unwrap_or(0)
    }

    /// The services with codes.
    pub(crate) fn services(&self) -> Vec<String> {
        let Ok(store) = self.store.lock() else {
            return Vec::new();
        };
        let mut services: Vec<String> = store.series.keys().map(|(s, _)| s.to_string()).collect();
        services.dedup();
        services
    }

    /// The latest calls with `code` (None: any), of `service` (None: any), newest first, at most
    /// `limit`, with the service each was reported to. Only those are copied (under the lock the
    /// aggregation waits on).
    pub(crate) fn calls(
        &self,
        code: Option<u16>,
        service: Option<&str>,
        limit: usize,
    ) -> Vec<(String, Call)> {
        let Ok(store) = self.store.lock() else {
            return Vec::new();
        };
        let mut calls: Vec<(&Arc<str>, &Call)> = store
            .calls
            .iter()
            .filter(|((s, c), _)| {
                code.is_none_or(|wanted| wanted == *c) && service.is_none_or(|w| w == &**s)
            })
            .flat_map(|((s, _), ring)| ring.iter().map(move |call| (s, call)))
            .collect();
        // Newest first: by the order they were read in (log times may go back).
        calls.sort_by_key(|(_, c)| std::cmp::Reverse(c.seq));
        calls
            .into_iter()
            .take(limit)
            .map(|(s, c)| (s.to_string(), c.clone()))
            .collect()
    }

    /// Lines whose code could not be kept (too many distinct codes).
    pub(crate) fn untracked(&self) -> u64 {
        self.store.lock().map(|s| s.untracked).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(data: &str, lines: &[(i64, u16)]) -> Vec<Seen> {
        let mut at = 0;
        data.split('\n')
            .zip(lines)
            .map(|(line, &(time, status))| {
                let s = Seen {
                    time,
                    status,
                    outcome: Outcome::Reported,
                    start: at,
                    end: at + line.len(),
                };
                at += line.len() + 1;
                s
            })
            .collect()
    }

    /// Buckets at each step; a line older than a ring's span counts in the total only; a ring of
    /// calls keeps the latest ones across chunks, newest first.
    #[test]
    fn series_and_the_latest_calls() {
        let codes = Codes::new(2);
        let t = wall_clock() - wall_clock() % 3600 - 3600; // an hour's start, an hour ago
        let data = "a\nb\nc";
        codes.add(
            "42",
            0,
            data.as_bytes(),
            &seen(data, &[(t, 200), (t + 15, 200), (t + 15, 404)]),
        );
        // Two days before: in no ring.
        codes.add("42", 0, b"old", &seen("old", &[(t - 2 * 86_400, 200)]));
        codes.add("7", 0, b"d", &seen("d", &[(t + 20, 200)]));
        let at = |service, step, from, count| -> Vec<(u16, u64, Vec<u64>)> {
            codes
                .series(service, step, from, count)
                .into_iter()
                .map(|c| (c.code, c.total, c.points))
                .collect()
        };
        assert_eq!(
            at(Some("42"), 10, t, 3),
            vec![(200, 3, vec![1, 1, 0]), (404, 1, vec![0, 1, 0])]
        );
        assert_eq!(
            at(None, 3600, t, 1),
            vec![(200, 4, vec![3]), (404, 1, vec![1])]
        );
        assert_eq!(
            at(None, 60, t - 60, 2),
            vec![(200, 4, vec![0, 3]), (404, 1, vec![0, 1])]
        );
        let calls = |code, service| -> Vec<String> {
            codes
                .calls(Some(code), service, 10)
                .into_iter()
                .map(|(s, c)| format!("{s}:{}", String::from_utf8_lossy(&c.line)))
                .collect()
        };
        assert_eq!(calls(200, Some("42")), ["42:old", "42:b"]);
        assert_eq!(calls(200, None), ["7:d", "42:old", "42:b"]);
        assert_eq!(calls(404, None), ["42:c"]);
        assert_eq!(codes.services(), ["42", "7"]);
        assert_eq!(codes.newest(), t + 20);
        // A line ten days ahead: in the total, in no bucket, and the rings keep working.
        codes.add("7", 0, b"e", &seen("e", &[(t + 10 * 86_400, 200)]));
        codes.add("7", 0, b"f", &seen("f", &[(t + 25, 200)]));
        assert_eq!(codes.newest(), t + 25);
        assert_eq!(at(Some("7"), 10, t + 20, 1), vec![(200, 3, vec![2])]);
    }
}
