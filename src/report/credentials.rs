//! Which applications exist, as the authorize call said, for a while. A report holding one unknown
//! credential is dropped whole by 3scale after its 202, so a credential is checked once before it is
//! first reported, and the answer is cached (known-good and known-invalid, each with its TTL).

use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use crate::aggregate::{Application, Transactions};

pub struct Credentials {
    answers: FxHashMap<Application, (bool, Instant)>,
    valid_ttl: Duration,
    invalid_ttl: Duration,
}

/// More distinct credentials than this and the expired answers are forgotten (then all of them):
/// an API hammered with random keys must not grow tally's memory.
const LIMIT: usize = 100_000;

impl Credentials {
    pub fn new(valid_ttl: Duration, invalid_ttl: Duration) -> Credentials {
        Credentials {
            answers: FxHashMap::default(),
            valid_ttl,
            invalid_ttl,
        }
    }

    fn fresh(&self, application: &Application, now: Instant) -> Option<bool> {
        self.answers
            .get(application)
            .filter(|(_, until)| now < *until)
            .map(|(exists, _)| *exists)
    }

    /// The distinct applications of `transactions` without a fresh answer.
    pub fn unknown(&self, transactions: &Transactions) -> Vec<Application> {
        let now = Instant::now();
        transactions
            .named()
            .filter(|a| self.fresh(a, now).is_none())
            .cloned()
            .collect()
    }

    pub fn record(&mut self, application: Application, exists: bool) {
        if self.answers.len() >= LIMIT {
            let now = Instant::now();
            self.answers.retain(|_, (_, until)| now < *until);
            if self.answers.len() >= LIMIT {
                self.answers.clear();
            }
        }
        let ttl = if exists {
            self.valid_ttl
        } else {
            self.invalid_ttl
        };
        self.answers
            .insert(application, (exists, Instant::now() + ttl));
    }

    /// Takes out the transactions of applications 3scale said lately do not exist; returns the
    /// requests taken out per application.
    pub fn take_missing(&self, transactions: &mut Transactions) -> Vec<(Application, u64)> {
        let now = Instant::now();
        // Asked once per application, not per transaction.
        let mut missing: FxHashMap<u32, bool> = FxHashMap::default();
        for t in &transactions.list {
            missing
                .entry(t.application)
                .or_insert_with(|| self.fresh(transactions.application(t), now) == Some(false));
        }
        let mut taken: FxHashMap<u32, u64> = FxHashMap::default();
        transactions.list.retain(|t| {
            let keep = !missing.get(&t.application).copied().unwrap_or(false);
            if !keep {
                *taken.entry(t.application).or_default() += t.hits;
            }
            keep
        });
        let mut taken: Vec<(Application, u64)> = taken
            .into_iter()
            .map(|(id, hits)| (transactions.applications[id as usize].clone(), hits))
            .collect();
        taken.sort_by(|a, b| a.0.field().cmp(&b.0.field()));
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txs(keys: &[&str]) -> Transactions {
        Transactions::of(
            keys.iter()
                .map(|k| (Application::UserKey((*k).into()), 0, 1, None))
                .collect(),
        )
    }

    #[test]
    fn answers_are_cached_until_their_ttl() {
        let mut c = Credentials::new(Duration::from_secs(60), Duration::ZERO);
        let all = txs(&["a", "b", "a"]);
        assert_eq!(c.unknown(&all).len(), 2);
        c.record(Application::UserKey("a".into()), true);
        c.record(Application::UserKey("b".into()), false);
        // b's answer expired at once (TTL 0): asked again; a is known.
        assert_eq!(c.unknown(&all), vec![Application::UserKey("b".into())]);
        let mut c = Credentials::new(Duration::from_secs(60), Duration::from_secs(60));
        c.record(Application::UserKey("a".into()), true);
        c.record(Application::UserKey("b".into()), false);
        let mut all = txs(&["a", "b", "a", "b", "c"]);
        assert_eq!(
            c.take_missing(&mut all),
            vec![(Application::UserKey("b".into()), 2)]
        );
        let left: Vec<_> = all.iter().map(|(a, _)| a.field().1.to_string()).collect();
        assert_eq!(left, ["a", "a", "c"]);
        assert!(c.unknown(&txs(&["b"])).is_empty());
        // Only applications that transactions still name are asked about.
        all.list.retain(|t| t.application == 0);
        assert!(c.unknown(&all).is_empty());
    }
}
