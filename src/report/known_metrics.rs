//! Which metrics a service has, as 3scale said. A report naming a metric the service does not have
//! is dropped whole after its 202, so every metric a batch's usages name (but `hits`, which every
//! service has) is checked once before its first report: an authorize call of an application that
//! exists, with a usage of the metric. The answer is kept for the credential TTLs (a metric found
//! unknown is asked about again later: it may have been created meanwhile).

use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use crate::aggregate::Transactions;
use crate::usage::MetricId;

pub(crate) struct KnownMetrics {
    /// Metric name → what 3scale said of it, and until when that is not asked again.
    answers: FxHashMap<Box<str>, (Answer, Instant)>,
    valid_ttl: Duration,
    invalid_ttl: Duration,
}

/// What 3scale said of a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// The service has it.
    Exists,
    /// It does not.
    Unknown,
    /// No answer was about it (every application asked was refused for another reason: an app_id
    /// service requiring app_keys answers "application key is missing" before it looks at a
    /// metric): reported unchecked, asked again after the TTL of unknown credentials.
    Unchecked,
}

/// What [`KnownMetrics::take_unknown`] took out of a batch.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Stripped {
    /// Per unknown metric, the transactions whose usage named it.
    pub usages: Vec<(String, u64)>,
    /// Requests left with no usage at all (not sent: they would record nothing).
    pub emptied: u64,
}

impl KnownMetrics {
    pub(crate) fn new(valid_ttl: Duration, invalid_ttl: Duration) -> KnownMetrics {
        KnownMetrics {
            answers: FxHashMap::default(),
            valid_ttl,
            invalid_ttl,
        }
    }

    /// What 3scale said of `name`, if the answer is fresh.
    fn fresh(&self, name: &str, now: Instant) -> Option<Answer> {
        self.answers
            .get(name)
            .filter(|(_, until)| now < *until)
            .map(|(answer, _)| *answer)
    }

    /// The metrics `transactions` name (but `hits`) without a fresh answer.
    pub(crate) fn unchecked(&self, transactions: &Transactions, now: Instant) -> Vec<String> {
        let mut ids: Vec<MetricId> = transactions
            .list
            .iter()
            .flat_map(|t| t.usage.iter().map(|(m, _)| m))
            .filter(|&m| m != MetricId::HITS)
            .collect();
        ids.sort_unstable_by_key(|m| transactions.metrics.get(*m).name.clone());
        ids.dedup();
        ids.into_iter()
            .map(|m| transactions.metrics.get(m).name.to_string())
            .filter(|name| self.fresh(name, now).is_none())
            .collect()
    }

    pub(crate) fn record(&mut self, name: &str, answer: Answer, now: Instant) {
        let ttl = match answer {
            Answer::Exists => self.valid_ttl,
            Answer::Unknown | Answer::Unchecked => self.invalid_ttl,
        };
        self.answers.insert(name.into(), (answer, now + ttl));
    }

    /// Takes the metrics 3scale last said the service does not have out of `transactions`'
    /// usages (stale or not: until a new check says otherwise); a transaction left without usage
    /// is taken out.
    pub(crate) fn take_unknown(&self, transactions: &mut Transactions) -> Stripped {
        let unknown: Vec<MetricId> = transactions
            .metrics
            .iter()
            .filter(|m| matches!(self.answers.get(&*m.name), Some((Answer::Unknown, _))))
            .filter_map(|m| transactions.metrics.id(&m.name))
            .collect();
        let mut stripped = Stripped::default();
        if unknown.is_empty() {
            return stripped;
        }
        let mut counts = vec![0u64; unknown.len()];
        transactions.list.retain_mut(|t| {
            for (i, &metric) in unknown.iter().enumerate() {
                if t.usage.remove(metric).is_some() {
                    counts[i] += 1;
                }
            }
            if t.usage.is_empty() {
                stripped.emptied += t.requests;
                return false;
            }
            true
        });
        stripped.usages = unknown
            .iter()
            .zip(counts)
            .filter(|(_, n)| *n > 0)
            .map(|(&m, n)| (transactions.metrics.get(m).name.to_string(), n))
            .collect();
        stripped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::Application;
    use crate::usage::{MetricNames, Usage};

    #[test]
    fn unknown_metrics_are_taken_out_and_emptied_transactions_with_them() {
        let metrics = MetricNames::new(&["search", "nope", "other"]);
        let id = |name: &str| metrics.id(name).unwrap();
        let usage = |of: &[(&str, u64)]| {
            let mut u = Usage::default();
            for (m, d) in of {
                assert!(u.add(id(m), *d));
            }
            u
        };
        let key = |k: &str| Application::UserKey(k.into());
        let mut transactions = Transactions::of_usages(
            metrics.clone(),
            vec![
                (
                    key("a"),
                    10,
                    1,
                    usage(&[("hits", 1), ("nope", 2), ("search", 1)]),
                    Some(200),
                ),
                (key("b"), 10, 3, usage(&[("nope", 1)]), Some(200)),
                (key("a"), 11, 1, usage(&[("other", 1)]), Some(404)),
            ],
        );
        let now = Instant::now();
        let mut known = KnownMetrics::new(Duration::from_secs(60), Duration::from_secs(5));
        // hits is never asked about; each other metric once.
        assert_eq!(
            known.unchecked(&transactions, now),
            vec!["nope", "other", "search"]
        );
        known.record("nope", Answer::Unknown, now);
        known.record("search", Answer::Exists, now);
        assert_eq!(known.unchecked(&transactions, now), vec!["other"]);
        known.record("other", Answer::Unchecked, now);
        let stripped = known.take_unknown(&mut transactions);
        assert_eq!(
            stripped,
            Stripped {
                usages: vec![("nope".into(), 2)],
                emptied: 3,
            }
        );
        let left: Vec<Vec<(String, u64)>> = transactions
            .list
            .iter()
            .map(|t| {
                t.usage
                    .iter()
                    .map(|(m, d)| (metrics.get(m).name.to_string(), d))
                    .collect()
            })
            .collect();
        assert_eq!(
            left,
            vec![
                vec![("hits".into(), 1), ("search".into(), 1)],
                vec![("other".into(), 1)]
            ]
        );
        // An answer is asked again once its TTL is over (the metric may exist by then).
        let later = now + Duration::from_secs(6);
        let again = Transactions::of_usages(
            metrics.clone(),
            vec![(key("a"), 10, 1, usage(&[("nope", 1), ("search", 1)]), None)],
        );
        assert_eq!(known.unchecked(&again, later), vec!["nope"]);
    }
}

#[cfg(test)]
mod answer_ages {
    use super::*;
    use crate::aggregate::Application;
    use crate::usage::{MetricNames, Usage};

    /// keep_known_metrics asks `unchecked` at one instant and `take_unknown` at a later one (after
    /// the authorize calls, which may wait through a backend outage): a metric found unknown whose
    /// answer expires in between is neither checked again nor taken out, and is sent.
    #[test]
    fn a_metric_known_unknown_when_checked_is_not_sent_after_the_checks() {
        let metrics = MetricNames::new(&["nope", "new"]);
        let mut u = Usage::default();
        assert!(u.add(metrics.id("nope").unwrap(), 1));
        assert!(u.add(metrics.id("new").unwrap(), 1));
        let mut transactions = Transactions::of_usages(
            metrics.clone(),
            vec![(Application::UserKey("k".into()), 10, 1, u, None)],
        );
        let t0 = Instant::now();
        let mut known = KnownMetrics::new(Duration::from_secs(60), Duration::from_secs(5));
        known.record("nope", Answer::Unknown, t0);
        // The batch's checks start at t0 + 4 s: only `new` is asked about.
        let before = t0 + Duration::from_secs(4);
        assert_eq!(known.unchecked(&transactions, before), vec!["new"]);
        // `new`'s check takes 2 s (retries): `nope`'s answer is stale when the batch is stripped.
        let after = t0 + Duration::from_secs(6);
        known.record("new", Answer::Exists, after);
        let stripped = known.take_unknown(&mut transactions);
        assert_eq!(
            stripped.usages,
            vec![("nope".to_string(), 1)],
            "nope is sent"
        );
    }
}
