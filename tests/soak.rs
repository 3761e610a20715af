//! The soak: a stream of writes with rotations every few seconds, random `kill -9`s and backend
//! faults (503s, dropped connections, a 3scale slower than tally's timeout), for as long as asked;
//! then every line written is compared with what arrived, and the duplicates with the documented
//! bound. Not part of `cargo test`'s default run:
//!
//! ```sh
//! TALLY_SOAK_SECS=600 cargo test --release --test soak -- --ignored --nocapture
//! ```

mod support;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{combined_line, now, write_config_with, Scenario, Tally};

/// Transactions per report call: the most one duplicated call can count twice.
const PER_CALL: u64 = 50;

/// A small xorshift: reproducible runs from `TALLY_SOAK_SEED`.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn append_to(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open the log")
}

#[test]
#[ignore = "a long run: TALLY_SOAK_SECS=600 cargo test --release --test soak -- --ignored --nocapture"]
fn soak() {
    let secs: u64 = std::env::var("TALLY_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let seed: u64 = std::env::var("TALLY_SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| now() as u64 | 1);
    eprintln!("soak: {secs} s, seed {seed} (TALLY_SOAK_SEED={seed} repeats the fault schedule)");
    let s = Scenario::new();
    let log = s.path("access.log");
    let config = write_config_with(
        s.dir.path(),
        &s.backend.url(),
        "tok",
        "validate_credentials = false\ntimeout = \"1s\"\n",
        &[(&log, "42")],
        &format!(
            "[report]\nflush_interval = \"100ms\"\nmax_transactions = {PER_CALL}\n\
             [tail]\nrotate_grace = \"1s\"\n"
        ),
    );
    let end = Instant::now() + Duration::from_secs(secs);

    // The writer: ~2,000 lines/s, rename + create rotations every 2-5 s, NGINX writing a little more
    // to the renamed file before it reopens (as on USR1). Not copytruncate: it loses the lines
    // written between the copy and the truncation for every reader (its own tests cover it).
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (writing, log, dir) = (writing.clone(), log.clone(), s.dir.path().to_path_buf());
        std::thread::spawn(move || {
            let mut rng = Random(seed ^ 0x9e37_79b9_7f4a_7c15);
            let mut file = append_to(&log);
            let (mut next, mut rotations) = (0u64, 0u64);
            let mut rotate_at = Instant::now() + Duration::from_millis(2000 + rng.below(3000));
            // 20 lines `u<next>`…, written through `file` as NGINX would.
            let write_20 = |file: &mut File, next: &mut u64| {
                let text: String = (*next..*next + 20)
                    .map(|n| combined_line(now(), "GET", &format!("/x?user_key=u{n}"), 200))
                    .collect();
                file.write_all(text.as_bytes()).expect("write the log");
                *next += 20;
            };
            while writing.load(Ordering::SeqCst) {
                write_20(&mut file, &mut next);
                if Instant::now() >= rotate_at {
                    let rotated = dir.join(format!("access.log.{rotations}"));
                    std::fs::rename(&log, rotated).expect("rotate");
                    // NGINX writes to the renamed file until it reopens.
                    write_20(&mut file, &mut next);
                    file = append_to(&log);
                    rotations += 1;
                    rotate_at = Instant::now() + Duration::from_millis(2000 + rng.below(3000));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (next, rotations)
        })
    };

    // Faults and kills, until the end.
    let mut rng = Random(seed);
    let mut logs = String::new();
    let (mut kills, mut faults) = (0u64, BTreeMap::<&str, u64>::new());
    while Instant::now() < end {
        let tally = Tally::start(&config, &[]);
        let life = Instant::now() + Duration::from_millis(500 + rng.below(4000));
        while Instant::now() < life.min(end) {
            let fault = match rng.below(6) {
                0 => {
                    s.backend.fail_next(1 + rng.below(5) as usize, 503);
                    "503s"
                }
                1 => {
                    s.backend.drop_next(1 + rng.below(3) as usize);
                    "dropped connections"
                }
                2 => {
                    // Slower than the 1 s timeout: processed, answered late.
                    s.backend
                        .set_delay(Duration::from_millis(1200 + rng.below(800)));
                    "slow 3scale"
                }
                _ => {
                    s.backend.set_delay(Duration::ZERO);
                    "none"
                }
            };
            *faults.entry(fault).or_default() += 1;
            std::thread::sleep(Duration::from_millis(300 + rng.below(1500)));
        }
        s.backend.set_delay(Duration::ZERO);
        if Instant::now() < end {
            tally.signal("KILL");
            kills += 1;
        } else {
            tally.signal("TERM");
        }
        let mut tally = tally;
        tally.wait(Duration::from_secs(60));
        logs.push_str(&tally.logs());
    }
    writing.store(false, Ordering::SeqCst);
    let (written, rotations) = writer.join().expect("the writer");

    // A last run without faults delivers the rest.
    s.backend.fail_next(0, 503);
    s.backend.drop_next(0);
    s.backend.set_delay(Duration::ZERO);
    let tally = Tally::start(&config, &[]);
    let deadline = Instant::now() + Duration::from_secs(120);
    let distinct = |b: &support::backend::Backend| {
        b.transactions()
            .iter()
            .map(|t| t.credential())
            .collect::<std::collections::BTreeSet<_>>()
            .len() as u64
    };
    while distinct(&s.backend) < written && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    tally.signal("TERM");
    let mut tally = tally;
    tally.wait(Duration::from_secs(60));
    logs.push_str(&tally.logs());

    let mut counts: BTreeMap<u64, u64> = BTreeMap::new();
    for t in s.backend.transactions() {
        let n = t
            .credential()
            .trim_start_matches('u')
            .parse()
            .expect("u<N> keys only");
        *counts.entry(n).or_default() += t.hits();
    }
    let lost: Vec<u64> = (0..written).filter(|n| !counts.contains_key(n)).collect();
    let twice = counts.values().filter(|&&c| c == 2).count();
    let more = counts.values().filter(|&&c| c > 2).count();
    let duplicates: u64 = counts.values().map(|c| c - 1).sum();
    let in_flight_at_kills = logs
        .matches("a report call was under way when tally stopped")
        .count() as u64;
    let ambiguous = logs.matches("a report call got no answer").count() as u64;
    let bound = (in_flight_at_kills + ambiguous) * PER_CALL;
    eprintln!(
        "soak: {written} lines written, {rotations} rotations, {kills} kill -9, faults {faults:?}\n\
         soak: {} lines arrived, {} lost, {twice} counted twice, {more} counted 3+ times, {duplicates} duplicates\n\
         soak: bound: ({in_flight_at_kills} calls under way at a kill + {ambiguous} calls without an answer) x {PER_CALL} transactions = {bound}: {}",
        counts.len(),
        lost.len(),
        if duplicates <= bound { "within" } else { "EXCEEDED" }
    );
    assert!(lost.is_empty(), "lines lost: {}", spans(&lost));
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates over the bound {bound}"
    );
}

/// `[3, 4, 5, 9]` → `3..=5, 9`.
fn spans(numbers: &[u64]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < numbers.len() {
        let start = numbers[i];
        while i + 1 < numbers.len() && numbers[i + 1] == numbers[i] + 1 {
            i += 1;
        }
        out.push(if numbers[i] == start {
            start.to_string()
        } else {
            format!("{start}..={}", numbers[i])
        });
        i += 1;
    }
    out.join(", ")
}
