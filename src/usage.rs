//! What a transaction counts: its usage, metric → delta, in 3scale's words. Metric names are
//! interned per service, so a transaction holds small ids and adding one copies no name.

use std::sync::Arc;

/// A metric, by its position in its service's [`MetricNames`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MetricId(u32);

impl MetricId {
    /// `hits`, every 3scale service's own metric: always the first name of a [`MetricNames`].
    pub const HITS: MetricId = MetricId(0);

    fn index(self) -> usize {
        self.0 as usize
    }
}

/// One metric of a service.
#[derive(Debug, Clone)]
pub struct Metric {
    pub name: Box<str>,
    /// The name percent-encoded as a form key writes it: encoded once, written in every transaction.
    pub encoded: Box<str>,
}

/// A service's metrics by id, `hits` first. Fixed once its aggregation starts (the room a batch
/// keeps for the next request depends on the metrics a usage can hold); batches share it.
#[derive(Debug, Clone)]
pub struct MetricNames(Arc<[Metric]>);

impl MetricNames {
    /// `hits`, then `names` (each once).
    pub fn new(names: &[&str]) -> MetricNames {
        let mut list: Vec<Metric> = Vec::with_capacity(names.len() + 1);
        for name in std::iter::once("hits").chain(names.iter().copied()) {
            if !list.iter().any(|m| &*m.name == name) {
                list.push(Metric {
                    name: name.into(),
                    encoded: form_urlencoded::byte_serialize(name.as_bytes()).collect(),
                });
            }
        }
        MetricNames(list.into())
    }

    pub fn id(&self, name: &str) -> Option<MetricId> {
        let i = self.0.iter().position(|m| &*m.name == name)?;
        Some(MetricId(i as u32))
    }

    /// The metric of an id of this table. Ids come from the table itself, so an id past its end
    /// is a bug.
    pub fn get(&self, id: MetricId) -> &Metric {
        &self.0[id.index()]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Metric> {
        self.0.iter()
    }
}

impl Default for MetricNames {
    /// `hits` alone: the usage of every request until mapping rules come.
    fn default() -> MetricNames {
        MetricNames::new(&[])
    }
}

/// The most metrics one usage holds. A request's mapping rules name one metric or a few (3scale
/// adds a child metric to its parent itself), and a usage that would need more is not folded.
pub(crate) const USAGE_METRICS: usize = 8;

/// Metric → delta, each metric once, held inline: a transaction's usage allocates nothing. Slots
/// past `len` keep their defaults, so usages built in the same order compare equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    len: u8,
    metrics: [MetricId; USAGE_METRICS],
    deltas: [u64; USAGE_METRICS],
}

/// The usage of one request until mapping rules come: `hits = 1`.
pub(crate) const ONE_HIT: Usage = Usage::one(MetricId::HITS, 1);

impl Usage {
    pub const fn one(metric: MetricId, delta: u64) -> Usage {
        let mut usage = Usage {
            len: 1,
            metrics: [MetricId(0); USAGE_METRICS],
            deltas: [0; USAGE_METRICS],
        };
        usage.metrics[0] = metric;
        usage.deltas[0] = delta;
        usage
    }

    /// The metrics it counts.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Each metric with its delta, in the order they were first added.
    pub fn iter(&self) -> impl Iterator<Item = (MetricId, u64)> + '_ {
        self.metrics[..self.len()]
            .iter()
            .copied()
            .zip(self.deltas[..self.len()].iter().copied())
    }

    /// Adds `delta` to `metric`. False, and the usage unchanged, when that needs more metrics than
    /// [`USAGE_METRICS`] or overflows the delta.
    pub fn add(&mut self, metric: MetricId, delta: u64) -> bool {
        let len = self.len();
        match self.metrics[..len].iter().position(|&m| m == metric) {
            Some(i) => match self.deltas[i].checked_add(delta) {
                Some(sum) => {
                    self.deltas[i] = sum;
                    true
                }
                None => false,
            },
            None if len < USAGE_METRICS => {
                self.metrics[len] = metric;
                self.deltas[len] = delta;
                self.len += 1;
                true
            }
            None => false,
        }
    }

    /// Takes `metric` out; its delta, if it was there.
    pub(crate) fn remove(&mut self, metric: MetricId) -> Option<u64> {
        let len = self.len();
        let i = self.metrics[..len].iter().position(|&m| m == metric)?;
        let delta = self.deltas[i];
        self.metrics.copy_within(i + 1..len, i);
        self.deltas.copy_within(i + 1..len, i);
        self.len -= 1;
        Some(delta)
    }

    /// Adds `other` metric by metric: all of it, or nothing (false) when the sum does not fit.
    pub fn merge(&mut self, other: &Usage) -> bool {
        let mut sum = *self;
        for (metric, delta) in other.iter() {
            if !sum.add(metric, delta) {
                return false;
            }
        }
        *self = sum;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_interned_once_hits_first_and_encoded() {
        let names = MetricNames::new(&["search", "hits", "a b/é", "search"]);
        let listed: Vec<(&str, &str)> = names.iter().map(|m| (&*m.name, &*m.encoded)).collect();
        assert_eq!(
            listed,
            vec![
                ("hits", "hits"),
                ("search", "search"),
                ("a b/é", "a+b%2F%C3%A9")
            ]
        );
        assert_eq!(names.id("hits"), Some(MetricId::HITS));
        assert_eq!(names.id("a b/é"), Some(MetricId(2)));
        assert_eq!(names.id("nope"), None);
        assert_eq!(&*MetricNames::default().get(MetricId::HITS).name, "hits");
    }

    #[test]
    fn usages_add_metric_by_metric_within_their_room() {
        let (a, b) = (MetricId(1), MetricId(2));
        let mut u = ONE_HIT;
        assert!(u.add(a, 2) && u.add(MetricId::HITS, 1));
        assert_eq!(
            u.iter().collect::<Vec<_>>(),
            vec![(MetricId::HITS, 2), (a, 2)]
        );
        assert!(u.merge(&Usage::one(b, 5)));
        assert_eq!(u.len(), 3);
        // One metric more than a usage holds does not fit: the merge leaves the usage as it was.
        let mut full = u;
        let mut next = 3;
        while full.len() < USAGE_METRICS {
            assert!(full.add(MetricId(next), 1));
            next += 1;
        }
        let before = full;
        let mut more = Usage::one(MetricId::HITS, 1);
        assert!(more.add(MetricId(next), 1));
        assert!(!full.merge(&more));
        assert_eq!(full, before);
        // Nor does a delta past u64.
        assert!(!u.add(b, u64::MAX));
        assert_eq!(u.iter().nth(2), Some((b, 5)));
        assert!(Usage::default().is_empty());
    }
}
