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
    /// Metric name → whether the service has it, until when.
    answers: FxHashMap<Box<str>, (bool, Instant)>,
    valid_ttl: Duration,
    invalid_ttl: Duration,
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
    fn fresh(&self, name: &str, now: Instant) -> Option<bool> {
        self.answers
            .get(name)
            .filter(|(_, until)| now < *until)
            .map(|(exists, _)| *exists)
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

    pub(crate) fn record(&mut self, name: &str, exists: bool, now: Instant) {
        let ttl = if exists {
            self.valid_ttl
        } else {
            self.invalid_ttl
        };
        self.answers.insert(name.into(), (exists, now + ttl));
    }

    /// Takes the metrics 3scale said the service does not have out of `transactions`' usages;
    /// a transaction left without usage is taken out.
    pub(crate) fn take_unknown(&self, transactions: &mut Transactions, now: Instant) -> Stripped {
        let unknown: Vec<MetricId> = transactions
            .metrics
            .iter()
            .filter(|m| self.fresh(&m.name, now) == Some(false))
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
        known.record("nope", false, now);
        known.record("search", true, now);
        assert_eq!(known.unchecked(&transactions, now), vec!["other"]);
        known.record("other", true, now);
        let stripped = known.take_unknown(&mut transactions, now);
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
