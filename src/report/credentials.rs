//! Which applications exist, as the authorize call said, for a while. A report holding one unknown
//! credential is dropped whole by 3scale after its 202, so a credential is checked once before it is
//! first reported, and the answer is cached (known-good and known-invalid, each with its TTL).
//!
//! Two more things are learned from the answers. Checking an unknown credential adds an entry to the
//! service's integration errors in 3scale, so a credential found missing again is re-checked less
//! and less often (its TTL doubles, up to a day). And the service's authentication mode: 3scale
//! answers about the kind of credential the service does not take with "user key is missing" /
//! "application id is missing", whatever the credential; requests of that kind cannot be checked,
//! so they are taken out, and no more checks of that kind are made.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use super::client::{Existence, Kind};
use crate::aggregate::{Application, Transactions};

/// An authorize answer, cached.
#[derive(Debug, Clone, Copy)]
struct Answer {
    exists: bool,
    until: Instant,
    /// The TTL it was given: a missing credential found missing again gets twice this.
    ttl: Duration,
}

pub(crate) struct Credentials {
    answers: FxHashMap<Application, Answer>,
    /// The same answers by application id, for the list of applications of the last batch (ids
    /// mean something only in their list): a batch is checked without hashing a name per
    /// transaction. Filled from `answers` as ids are met; emptied when an answer is recorded.
    by_id: Vec<Option<Answer>>,
    /// That list. Held weakly, which also keeps its address from being reused by another list.
    list: Weak<boxcar::Vec<Application>>,
    valid_ttl: Duration,
    invalid_ttl: Duration,
    /// The kind of credential the service does not take, once 3scale said so.
    refused: Option<Kind>,
    /// Per kind (`Kind as usize`): 3scale answered about a credential of this kind without refusing
    /// the kind. Until then only one credential of the kind is checked at a time, so that a service
    /// refusing the kind costs one check (one integration error), not one per credential.
    answered: [bool; 2],
}

/// More distinct credentials than this and the expired answers are forgotten (then all of them):
/// an API hammered with random keys must not grow tally's memory.
const LIMIT: usize = 100_000;

/// The longest a missing credential waits to be checked again, unless `invalid_credential_ttl` is
/// longer.
const MAX_INVALID_TTL: Duration = Duration::from_secs(24 * 3600);

/// What [`Credentials::take_unsendable`] took out of a batch.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Taken {
    /// Requests per application 3scale said lately does not exist.
    pub missing: Vec<(Application, u64)>,
    /// Requests whose kind of credential the service does not take.
    pub refused: u64,
}

impl Credentials {
    pub(crate) fn new(valid_ttl: Duration, invalid_ttl: Duration) -> Credentials {
        Credentials {
            answers: FxHashMap::default(),
            by_id: Vec::new(),
            list: Weak::new(),
            valid_ttl,
            invalid_ttl,
            refused: None,
            answered: [false; 2],
        }
    }

    /// The kind of credential the service takes, once 3scale's answers told.
    #[cfg(test)]
    fn takes(&self) -> Option<Kind> {
        self.refused.map(Kind::other)
    }

    /// Whether the service refuses the kind of the application of `id`.
    fn refuses(&self, transactions: &Transactions, id: u32) -> bool {
        self.refused
            .is_some_and(|k| k == Kind::of(&transactions.applications[id as usize]))
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
        self.by_id[i].filter(|a| now < a.until).map(|a| a.exists)
    }

    /// Ids index the list of `transactions`' batch: the answers by id hold for one list.
    fn use_list(&mut self, transactions: &Transactions) {
        if self.list.as_ptr() != Arc::as_ptr(&transactions.applications) {
            self.list = Arc::downgrade(&transactions.applications);
            self.by_id.clear();
        }
    }

    /// The distinct applications of `transactions` to check now: those without a fresh answer, of
    /// a kind the service is not known to refuse; of a kind not answered yet, only the first.
    pub(crate) fn unknown(
        &mut self,
        transactions: &Transactions,
        now: Instant,
    ) -> Vec<Application> {
        self.use_list(transactions);
        let mut unknown: Vec<u32> = Vec::new();
        let mut probing = [false; 2];
        for t in &transactions.list {
            if self.refuses(transactions, t.application)
                || self.fresh(transactions, t.application, now).is_some()
                || unknown.contains(&t.application)
            {
                continue;
            }
            let kind = Kind::of(&transactions.applications[t.application as usize]) as usize;
            if !self.answered[kind] {
                if probing[kind] {
                    continue;
                }
                probing[kind] = true;
            }
            unknown.push(t.application);
        }
        unknown
            .into_iter()
            .map(|id| transactions.applications[id as usize].clone())
            .collect()
    }

    /// Records 3scale's answer about `application`. Returns the kind of credential the service
    /// takes when this answer is the one that told it.
    pub(crate) fn record(
        &mut self,
        application: Application,
        existence: Existence,
        now: Instant,
    ) -> Option<Kind> {
        let kind = Kind::of(&application);
        let exists = match existence {
            Existence::Exists => true,
            Existence::Missing => false,
            Existence::OtherKind(takes) => {
                self.answered[kind as usize] = false;
                self.answered[takes as usize] = true;
                let learned = self.refused != Some(kind);
                self.refused = Some(kind);
                return learned.then_some(takes);
            }
        };
        self.answered[kind as usize] = true;
        if self.refused == Some(kind) {
            // The service takes this kind after all (its mode was changed in 3scale).
            self.refused = None;
        }
        if self.answers.len() >= LIMIT {
            self.answers.retain(|_, a| now < a.until);
            if self.answers.len() >= LIMIT {
                self.answers.clear();
            }
        }
        let ttl = match self.answers.get(&application) {
            _ if exists => self.valid_ttl,
            // Missing again: each check of an unknown credential is an integration error in 3scale.
            Some(before) if !before.exists => {
                (before.ttl * 2).clamp(self.invalid_ttl, MAX_INVALID_TTL.max(self.invalid_ttl))
            }
            _ => self.invalid_ttl,
        };
        self.answers.insert(
            application,
            Answer {
                exists,
                until: now + ttl,
                ttl,
            },
        );
        self.by_id.clear();
        None
    }

    /// Up to `n` distinct applications of `transactions` that 3scale said lately exist.
    pub(crate) fn existing(
        &mut self,
        transactions: &Transactions,
        n: usize,
        now: Instant,
    ) -> Vec<Application> {
        self.use_list(transactions);
        let mut ids: Vec<u32> = Vec::new();
        for t in &transactions.list {
            if ids.len() >= n {
                break;
            }
            if !ids.contains(&t.application)
                && self.fresh(transactions, t.application, now) == Some(true)
            {
                ids.push(t.application);
            }
        }
        ids.into_iter()
            .map(|id| transactions.applications[id as usize].clone())
            .collect()
    }

    /// Takes out the transactions of applications 3scale said lately do not exist, and those of the
    /// kind of credential the service does not take.
    pub(crate) fn take_unsendable(
        &mut self,
        transactions: &mut Transactions,
        now: Instant,
    ) -> Taken {
        self.use_list(transactions);
        let mut missing: Vec<(u32, u64)> = Vec::new();
        let mut refused = 0;
        let mut list = std::mem::take(&mut transactions.list);
        list.retain(|t| {
            if self.refuses(transactions, t.application) {
                refused += t.requests;
                return false;
            }
            if self.fresh(transactions, t.application, now) != Some(false) {
                return true;
            }
            match missing.iter_mut().find(|(id, _)| *id == t.application) {
                Some((_, requests)) => *requests += t.requests,
                None => missing.push((t.application, t.requests)),
            }
            false
        });
        transactions.list = list;
        Taken {
            missing: missing
                .into_iter()
                .map(|(id, requests)| (transactions.applications[id as usize].clone(), requests))
                .collect(),
            refused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> Application {
        Application::UserKey(k.into())
    }

    fn id(k: &str) -> Application {
        Application::AppId(k.into())
    }

    fn txs(applications: &[Application]) -> Transactions {
        Transactions::of(
            applications
                .iter()
                .map(|a| (a.clone(), 0, 1, None))
                .collect(),
        )
    }

    fn keys(keys: &[&str]) -> Transactions {
        txs(&keys.iter().map(|k| key(k)).collect::<Vec<_>>())
    }

    fn left(transactions: &Transactions) -> Vec<String> {
        transactions
            .iter()
            .map(|(a, _)| a.field().1.to_string())
            .collect()
    }

    #[test]
    fn answers_are_cached_until_their_ttl() {
        let now = Instant::now();
        let mut c = Credentials::new(Duration::from_secs(60), Duration::ZERO);
        let all = keys(&["a", "b", "a"]);
        // One user_key first: the service may not take user_keys at all.
        assert_eq!(c.unknown(&all, now), vec![key("a")]);
        c.record(key("a"), Existence::Exists, now);
        assert_eq!(c.unknown(&all, now), vec![key("b")]);
        c.record(key("b"), Existence::Missing, now);
        // b's answer expired at once (TTL 0): asked again; a is known.
        assert_eq!(c.unknown(&all, now), vec![key("b")]);
        let mut c = Credentials::new(Duration::from_secs(60), Duration::from_secs(60));
        c.record(key("a"), Existence::Exists, now);
        c.record(key("b"), Existence::Missing, now);
        let mut all = keys(&["a", "b", "a", "b", "c"]);
        assert_eq!(
            c.take_unsendable(&mut all, now),
            Taken {
                missing: vec![(key("b"), 2)],
                refused: 0
            }
        );
        assert_eq!(left(&all), ["a", "a", "c"]);
        assert!(c.unknown(&keys(&["b"]), now).is_empty());
        // Only applications that transactions still name are asked about.
        all.list.retain(|t| t.application == 0);
        assert!(c.unknown(&all, now).is_empty());
        // Both answers expire with their TTL.
        let later = now + Duration::from_secs(61);
        assert_eq!(
            c.unknown(&keys(&["a", "b"]), later),
            vec![key("a"), key("b")]
        );
    }

    #[test]
    fn answers_follow_each_batch_list_of_applications() {
        let now = Instant::now();
        let mut c = Credentials::new(Duration::from_secs(60), Duration::from_secs(60));
        c.record(key("a"), Existence::Exists, now);
        c.record(key("b"), Existence::Missing, now);
        let mut first = keys(&["a", "b"]);
        assert_eq!(c.take_unsendable(&mut first, now).missing.len(), 1);
        // Another list (after the aggregation renewed its tables): id 0 is now b.
        let mut second = keys(&["b", "a", "c"]);
        assert_eq!(c.unknown(&second, now), vec![key("c")]);
        assert_eq!(
            c.take_unsendable(&mut second, now).missing,
            vec![(key("b"), 1)]
        );
        assert_eq!(left(&second), ["a", "c"]);
        // A new answer is seen at once.
        c.record(key("c"), Existence::Missing, now);
        assert_eq!(c.take_unsendable(&mut second, now).missing.len(), 1);
    }

    #[test]
    fn checks_of_a_credential_found_missing_again_back_off_up_to_a_day() {
        let start = Instant::now();
        let five = Duration::from_secs(300);
        let mut c = Credentials::new(Duration::from_secs(3600), five);
        let batch = keys(&["gone"]);
        let mut now = start;
        let mut waits = Vec::new();
        // Each time its answer expires it is checked again, found missing again, and waits twice
        // as long as the time before.
        for _ in 0..12 {
            assert_eq!(c.unknown(&batch, now), vec![key("gone")]);
            c.record(key("gone"), Existence::Missing, now);
            let mut wait = Duration::ZERO;
            while c.unknown(&batch, now + wait).is_empty() {
                wait += Duration::from_secs(60);
            }
            waits.push(wait.as_secs() / 60);
            now += wait;
        }
        assert_eq!(
            waits,
            [5, 10, 20, 40, 80, 160, 320, 640, 1280, 1440, 1440, 1440]
        );
        // Found existing, it is trusted for valid_credential_ttl; missing again later, the backoff
        // starts over from invalid_credential_ttl.
        c.record(key("gone"), Existence::Exists, now);
        assert!(c
            .unknown(&batch, now + Duration::from_secs(3599))
            .is_empty());
        now += Duration::from_secs(3600);
        assert_eq!(c.unknown(&batch, now), vec![key("gone")]);
        c.record(key("gone"), Existence::Missing, now);
        assert!(c
            .unknown(&batch, now + five - Duration::from_secs(1))
            .is_empty());
        assert_eq!(c.unknown(&batch, now + five), vec![key("gone")]);
        // Each credential backs off on its own.
        c.record(key("new"), Existence::Missing, now);
        assert_eq!(c.unknown(&keys(&["new"]), now + five), vec![key("new")]);
        // An invalid_credential_ttl of more than a day is kept as it is, not doubled.
        let week = Duration::from_secs(7 * 24 * 3600);
        let mut c = Credentials::new(Duration::from_secs(3600), week);
        c.record(key("gone"), Existence::Missing, start);
        c.record(key("gone"), Existence::Missing, start);
        assert!(c
            .unknown(&batch, start + week - Duration::from_secs(1))
            .is_empty());
        assert_eq!(c.unknown(&batch, start + week), vec![key("gone")]);
    }

    #[test]
    fn the_service_mode_is_learned_from_the_first_answer_refusing_a_kind() {
        let now = Instant::now();
        let mut c = Credentials::new(Duration::from_secs(60), Duration::from_secs(60));
        let mut batch = txs(&[
            key("k1"),
            id("a1"),
            key("k2"),
            id("a2"),
            id("a1"),
            key("k1"),
        ]);
        // Neither kind answered yet: one of each is checked first.
        assert_eq!(c.unknown(&batch, now), vec![key("k1"), id("a1")]);
        assert_eq!(c.record(key("k1"), Existence::Exists, now), None);
        // A user_key service answers "user key is missing" about an app_id: the mode is learned
        // once.
        assert_eq!(
            c.record(id("a1"), Existence::OtherKind(Kind::UserKey), now),
            Some(Kind::UserKey)
        );
        assert_eq!(c.takes(), Some(Kind::UserKey));
        // No more app_id is checked (each check would be an integration error in 3scale); the
        // other user_keys are.
        assert_eq!(c.unknown(&batch, now), vec![key("k2")]);
        assert_eq!(
            c.record(id("a2"), Existence::OtherKind(Kind::UserKey), now),
            None,
            "told once"
        );
        c.record(key("k2"), Existence::Missing, now);
        assert!(c.unknown(&batch, now).is_empty());
        // The app_ids' requests are taken out under their own reason, the unknown user_key's under
        // its own.
        assert_eq!(
            c.take_unsendable(&mut batch, now),
            Taken {
                missing: vec![(key("k2"), 1)],
                refused: 3
            }
        );
        assert_eq!(left(&batch), ["k1", "k1"]);
        // Whatever time passes: the mode is a service's, not an answer's with a TTL.
        let mut later = txs(&[id("a3"), key("k1")]);
        let much_later = now + Duration::from_secs(86400);
        assert_eq!(c.unknown(&later, much_later), vec![key("k1")]);
        assert_eq!(c.take_unsendable(&mut later, much_later).refused, 1);
    }

    #[test]
    fn an_app_id_service_refuses_user_keys_and_a_mode_changed_in_3scale_is_followed() {
        let now = Instant::now();
        let mut c = Credentials::new(Duration::from_secs(60), Duration::from_secs(60));
        let mut batch = txs(&[key("k1"), id("a1"), id("a2")]);
        assert_eq!(c.unknown(&batch, now), vec![key("k1"), id("a1")]);
        c.record(id("a1"), Existence::Exists, now);
        assert_eq!(
            c.record(key("k1"), Existence::OtherKind(Kind::AppId), now),
            Some(Kind::AppId)
        );
        assert_eq!(c.unknown(&batch, now), vec![id("a2")]);
        c.record(id("a2"), Existence::Exists, now);
        assert_eq!(c.take_unsendable(&mut batch, now).refused, 1);
        assert_eq!(left(&batch), ["a1", "a2"]);
        // The service was switched to user_key: an app_id's answer says so, and user_keys are
        // checked again.
        let later = now + Duration::from_secs(61);
        let batch = txs(&[id("a1"), key("k1")]);
        assert_eq!(c.unknown(&batch, later), vec![id("a1")]);
        assert_eq!(
            c.record(id("a1"), Existence::OtherKind(Kind::UserKey), later),
            Some(Kind::UserKey)
        );
        assert_eq!(c.unknown(&batch, later), vec![key("k1")]);
    }
}
