//! Which applications exist, as the authorize call said, for a while. A report holding one unknown
//! credential is dropped whole by 3scale after its 202, so a credential is checked once before it is
//! first reported, and the answer is cached (known-good and known-invalid, each with its TTL).

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use crate::aggregate::{Application, Transactions};

pub(crate) struct Credentials {
    answers: FxHashMap<Application, (bool, Instant)>,
    /// The same answers by application id, for the list of applications of the last batch (ids
    /// mean something only in their list): a batch is checked without hashing a name per
    /// transaction. Filled from `answers` as ids are met; emptied when an answer is recorded.
    by_id: Vec<Option<(bool, Instant)>>,
    /// That list. Held weakly, which also keeps its address from being reused by another list.
    list: Weak<boxcar::Vec<Application>>,
    valid_ttl: Duration,
    invalid_ttl: Duration,
}

/// More distinct credentials than this and the expired answers are forgotten (then all of them):
/// an API hammered with random keys must not grow tally's memory.
const LIMIT: usize = 100_000;

impl Credentials {
    pub(crate) fn new(valid_ttl: Duration, invalid_ttl: Duration) -> Credentials {
        Credentials {
            answers: FxHashMap::default(),
            by_id: Vec::new(),
            list: Weak::new(),
            valid_ttl,
            invalid_ttl,
        }
    }

    /// Whether the application of `id` exists, if the answer is fresh.
    fn fresh(&mut self, transactions: &Transactions, id: u32, now: Instant) -> Option<bool> {
        let i = id as usize;
        if i >= self.by_id.len() {
            self.by_id.resize(i + 1, None);
        }
        if self.by_id[i].is_none() {
            self.by_id[i] = self.answers.get(&transactions.applications[i]).copied();
        }
        self.by_id[i]
            .filter(|(_, until)| now < *until)
            .map(|(exists, _)| exists)
    }

    /// Ids index the list of `transactions`' batch: the answers by id hold for one list.
    fn use_list(&mut self, transactions: &Transactions) {
        if self.list.as_ptr() != Arc::as_ptr(&transactions.applications) {
            self.list = Arc::downgrade(&transactions.applications);
            self.by_id.clear();
        }
    }

    /// The distinct applications of `transactions` without a fresh answer.
    pub(crate) fn unknown(&mut self, transactions: &Transactions) -> Vec<Application> {
        self.use_list(transactions);
        let now = Instant::now();
        let mut unknown: Vec<u32> = Vec::new();
        for t in &transactions.list {
            if self.fresh(transactions, t.application, now).is_none()
                && !unknown.contains(&t.application)
            {
                unknown.push(t.application);
            }
        }
        unknown
            .into_iter()
            .map(|id| transactions.applications[id as usize].clone())
            .collect()
    }

    pub(crate) fn record(&mut self, application: Application, exists: bool) {
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
        self.by_id.clear();
    }

    /// Takes out the transactions of applications 3scale said lately do not exist; returns the
    /// requests taken out per application.
    pub(crate) fn take_missing(
        &mut self,
        transactions: &mut Transactions,
    ) -> Vec<(Application, u64)> {
        self.use_list(transactions);
        let now = Instant::now();
        let mut taken: Vec<(u32, u64)> = Vec::new();
        let mut list = std::mem::take(&mut transactions.list);
        list.retain(|t| {
            if self.fresh(transactions, t.application, now) != Some(false) {
                return true;
            }
            match taken.iter_mut().find(|(id, _)| *id == t.application) {
                Some((_, requests)) => *requests += t.requests,
                None => taken.push((t.application, t.requests)),
            }
            false
        });
        transactions.list = list;
        taken
            .into_iter()
            .map(|(id, requests)| (transactions.applications[id as usize].clone(), requests))
            .collect()
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

    #[test]
    fn answers_follow_each_batch_list_of_applications() {
        let mut c = Credentials::new(Duration::from_secs(60), Duration::from_secs(60));
        c.record(Application::UserKey("a".into()), true);
        c.record(Application::UserKey("b".into()), false);
        let mut first = txs(&["a", "b"]);
        assert_eq!(c.take_missing(&mut first).len(), 1);
        // Another list (after the aggregation renewed its tables): id 0 is now b.
        let mut second = txs(&["b", "a", "c"]);
        assert_eq!(c.unknown(&second), vec![Application::UserKey("c".into())]);
        assert_eq!(
            c.take_missing(&mut second),
            vec![(Application::UserKey("b".into()), 1)]
        );
        let left: Vec<_> = second
            .iter()
            .map(|(a, _)| a.field().1.to_string())
            .collect();
        assert_eq!(left, ["a", "c"]);
        // A new answer is seen at once.
        c.record(Application::UserKey("c".into()), false);
        assert_eq!(c.take_missing(&mut second).len(), 1);
    }
}
