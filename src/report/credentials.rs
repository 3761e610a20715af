//! Which applications exist, as the authorize call said, for a while. A report holding one unknown
//! credential is dropped whole by 3scale after its 202, so a credential is checked once before it is
//! first reported, and the answer is cached (known-good and known-invalid, each with its TTL).

use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use crate::aggregate::{Application, Transaction};

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
    pub fn unknown(&self, transactions: &[Transaction]) -> Vec<Application> {
        let now = Instant::now();
        let mut unknown: Vec<Application> = Vec::new();
        for t in transactions {
            if self.fresh(&t.application, now).is_none() && !unknown.contains(&t.application) {
                unknown.push(t.application.clone());
            }
        }
        unknown
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

    /// Takes out the transactions of applications 3scale said lately do not exist; returns them.
    pub fn take_missing(&self, transactions: &mut Vec<Transaction>) -> Vec<Transaction> {
        let now = Instant::now();
        let mut missing = Vec::new();
        transactions.retain(|t| {
            let keep = self.fresh(&t.application, now) != Some(false);
            if !keep {
                missing.push(t.clone());
            }
            keep
        });
        missing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx(key: &str) -> Transaction {
        Transaction {
            application: Application::UserKey(key.into()),
            timestamp: 0,
            hits: 1,
            code: None,
        }
    }

    #[test]
    fn answers_are_cached_until_their_ttl() {
        let mut c = Credentials::new(Duration::from_secs(60), Duration::ZERO);
        let txs = [tx("a"), tx("b"), tx("a")];
        assert_eq!(c.unknown(&txs).len(), 2);
        c.record(Application::UserKey("a".into()), true);
        c.record(Application::UserKey("b".into()), false);
        // b's answer expired at once (TTL 0): asked again; a is known.
        assert_eq!(c.unknown(&txs), vec![Application::UserKey("b".into())]);
        let mut c = Credentials::new(Duration::from_secs(60), Duration::from_secs(60));
        c.record(Application::UserKey("a".into()), true);
        c.record(Application::UserKey("b".into()), false);
        let mut txs = vec![tx("a"), tx("b"), tx("a")];
        assert_eq!(c.take_missing(&mut txs), vec![tx("b")]);
        assert_eq!(txs, vec![tx("a"), tx("a")]);
        assert!(c.unknown(&[tx("b")]).is_empty());
    }
}
