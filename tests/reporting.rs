//! tally as a process, following real files and reporting to the test backend.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use support::backend::Backend;
use support::{
    append, combined_line, events_with, last_summary, now, number, poll_until, write_config,
    Scenario, Tally, JSON_LOGS,
};

const WAIT: Duration = Duration::from_secs(30);

/// (credential, code) → count, of what the backend accepted.
fn by_credential_and_code(b: &Backend) -> BTreeMap<(String, String), u64> {
    let mut m = BTreeMap::new();
    for t in b.transactions() {
        *m.entry((t.credential(), t.code.clone().unwrap_or_default()))
            .or_default() += t.hits();
    }
    m
}

fn key(c: &str, code: &str) -> (String, String) {
    (c.to_string(), code.to_string())
}

#[test]
fn every_request_is_reported_once_with_its_code_and_time() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(&[("42", "tok-42")]);
    let log = dir.path().join("access.log");
    let t0 = now() - 60;
    let mut text = String::new();
    text += &combined_line(t0, "GET", "/a?user_key=alpha", 200);
    text += &combined_line(t0, "GET", "/a?user_key=alpha", 200);
    text += &combined_line(t0 + 1, "POST", "/b?app_id=app1&app_key=secret", 201);
    text += &combined_line(t0 + 1, "GET", "/c?user_key=beta", 404);
    text += &combined_line(t0 + 2, "GET", "/no-credential", 200);
    text += "garbage that is not a log line\n";
    append(&log, &text);
    let config = write_config(
        dir.path(),
        &backend.url(),
        "tok-42",
        &[(&log, "42")],
        "[report]\nflush_interval = \"200ms\"\n",
    );
    let mut tally = Tally::start(&config, &[]);
    backend.wait_until(WAIT, "the first 4 transactions", |b| {
        b.transactions().len() >= 4
    });

    // Lines appended while tally runs, one without its newline yet.
    append(&log, &combined_line(t0 + 3, "GET", "/d?user_key=beta", 500));
    append(
        &log,
        &combined_line(t0 + 3, "GET", "/d?user_key=a%2Bb", 503),
    );
    let last = combined_line(t0 + 4, "GET", "/e?app_id=app1", 403);
    append(&log, &last[..20]);
    backend.wait_until(WAIT, "6 transactions", |b| b.transactions().len() >= 6);
    append(&log, &last[20..]);
    backend.wait_until(WAIT, "7 transactions", |b| b.transactions().len() >= 7);

    tally.signal("TERM");
    assert!(tally.wait(WAIT).success(), "{}", tally.logs());

    let expected: BTreeMap<_, _> = [
        (key("alpha", "200"), 2),
        (key("app1", "201"), 1),
        (key("beta", "404"), 1),
        (key("beta", "500"), 1),
        (key("a+b", "503"), 1),
        (key("app1", "403"), 1),
    ]
    .into_iter()
    .collect();
    assert_eq!(by_credential_and_code(&backend), expected);
    let txs = backend.transactions();
    assert_eq!(txs.len(), 7);
    // (credential, time) of each transaction; calls under way together may arrive in any order.
    let mut seen: Vec<(String, i64)> = txs
        .iter()
        .map(|t| (t.credential(), t.timestamp()))
        .collect();
    seen.sort();
    let mut expected: Vec<(String, i64)> = [
        ("alpha", t0),
        ("alpha", t0),
        ("app1", t0 + 1),
        ("beta", t0 + 1),
        ("beta", t0 + 3),
        ("a+b", t0 + 3),
        ("app1", t0 + 4),
    ]
    .into_iter()
    .map(|(c, t)| (c.to_string(), t))
    .collect();
    expected.sort();
    assert_eq!(seen, expected);
    assert!(txs.iter().all(|t| t.usage.len() == 1 && t.hits() == 1));
    let app1 = txs.iter().find(|t| t.credential() == "app1").unwrap();
    assert_eq!(app1.app_id.as_deref(), Some("app1"));
    assert_eq!(app1.user_key, None);
    assert!(backend.reports().iter().all(|r| r.service_id == "42"));
    assert!(backend.refusals().is_empty());
    let logs = tally.logs();
    assert!(
        logs.contains("reason=\"no_credential\"") && logs.contains("reason=\"malformed\""),
        "{logs}"
    );
    assert!(
        logs.contains("skipped_malformed=1") && logs.contains("skipped_no_credential=1"),
        "{logs}"
    );
    assert!(
        !logs.contains("tok-42"),
        "the token leaked into the log:\n{logs}"
    );
}

#[test]
fn without_response_codes_requests_fold_per_application_and_second() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(&[("7", "t")]);
    let log = dir.path().join("access.log");
    let t0 = now() - 30;
    let mut text = String::new();
    for (offset, k, status) in [
        (0, "k1", 200),
        (0, "k1", 404),
        (0, "k2", 200),
        (1, "k1", 500),
        (0, "k1", 200),
    ] {
        text += &combined_line(t0 + offset, "GET", &format!("/?user_key={k}"), status);
    }
    append(&log, &text);
    let config = write_config(
        dir.path(),
        &backend.url(),
        "t",
        &[(&log, "7")],
        "[report]\nresponse_codes = false\n",
    );
    Tally::run_once(&config);
    let txs = backend.transactions();
    let summary: Vec<(String, i64, u64, Option<String>)> = txs
        .iter()
        .map(|t| (t.credential(), t.timestamp(), t.hits(), t.code.clone()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("k1".into(), t0, 3, None),
            ("k2".into(), t0, 1, None),
            ("k1".into(), t0 + 1, 1, None),
        ]
    );
}

#[test]
fn large_batches_are_split_within_the_backend_limit() {
    let s = Scenario::new();
    let backend = &s.backend;
    let t0 = now() - 100;
    let text: String = (0..2500)
        .map(|i| combined_line(t0 + i / 100, "GET", &format!("/?user_key=k{}", i % 37), 200))
        .collect();
    s.append(&text);
    let config = s.config(
        "",
        "[report]\nmax_transactions = 1023\nflush_interval = \"1h\"\n",
    );
    Tally::run_once(&config);
    // Two calls may be under way at once, so they may arrive in either order.
    let mut sizes: Vec<usize> = backend
        .reports()
        .iter()
        .map(|r| r.transactions.len())
        .collect();
    sizes.sort_unstable();
    assert_eq!(sizes, vec![454, 1023, 1023]);
    assert_eq!(backend.hits(), 2500);
    assert!(backend.refusals().is_empty());
}

/// 50 requests ten seconds ago, 10 for each of the user_keys `k0` to `k4`.
fn append_fifty_requests_of_five_keys(s: &Scenario) {
    let t0 = now() - 10;
    let text: String = (0..50)
        .map(|i| combined_line(t0, "GET", &format!("/?user_key=k{}", i % 5), 200))
        .collect();
    s.append(&text);
}

#[test]
fn transient_failures_are_retried_without_loss_or_duplicates() {
    let s = Scenario::new();
    let backend = &s.backend;
    backend.fail_next(3, 503);
    backend.drop_next(2);
    append_fifty_requests_of_five_keys(&s);
    // Credentials unchecked, so every call counted here is a report call.
    let config = s.config("validate_credentials = false\n", JSON_LOGS);
    let tally = Tally::run_once(&config);
    assert_eq!(backend.hits(), 50);
    assert_eq!(backend.reports().len(), 1);
    // A dropped connection may have been processed (no answer came), so tally waits until 3scale
    // answers a probe (an authorize call) before it sends the call again: the report is dropped,
    // so is the first probe, three probes get 503, the fourth is answered, the report goes through.
    assert_eq!(backend.calls(), 7);
    assert_eq!(
        backend.authorizations().len(),
        1,
        "the probe that was answered"
    );
    // tally counted what happened: the dropped report, the dropped probe and the three 503s, one
    // resend, and said which bytes it resent.
    let logs = tally.logs();
    let summary = last_summary(&logs);
    assert_eq!(number(&summary, "report_failures"), 1, "{summary}");
    assert_eq!(number(&summary, "authorize_failures"), 4, "{summary}");
    assert_eq!(number(&summary, "ambiguous_resends"), 1, "{summary}");
    assert_resent_once(&s, &logs);
}

/// tally logged one resend (a WARN with the timeout then in force) of the whole access log, which
/// the test wrote before the start: that range may count twice.
fn assert_resent_once(s: &Scenario, logs: &str) {
    let len = std::fs::metadata(&s.log).unwrap().len().to_string();
    let log = s.log.display().to_string();
    let resent = events_with(
        logs,
        "WARN",
        &[("timeout", "*"), ("from", "*"), ("to", "*")],
    );
    assert_eq!(resent.len(), 1, "{logs}");
    assert!(
        support::has_fields(
            &resent[0],
            &[
                ("service_id", "42"),
                ("path", &log),
                ("from", "0"),
                ("to", &len)
            ]
        ),
        "{}",
        resent[0]
    );
}

#[test]
fn a_failing_report_is_retried_and_not_resent_as_ambiguous() {
    let s = Scenario::new();
    let backend = &s.backend;
    backend.fail_next(3, 503);
    append_fifty_requests_of_five_keys(&s);
    let config = s.config("validate_credentials = false\n", JSON_LOGS);
    let tally = Tally::run_once(&config);
    assert_eq!(backend.hits(), 50);
    assert_eq!(
        backend.calls(),
        4,
        "3 failures, then the call that went through"
    );
    // Three failed report calls counted, none taken as ambiguous, none resent.
    let logs = tally.logs();
    let summary = last_summary(&logs);
    assert_eq!(number(&summary, "report_failures"), 3, "{summary}");
    assert_eq!(number(&summary, "authorize_failures"), 0, "{summary}");
    assert_eq!(number(&summary, "ambiguous_resends"), 0, "{summary}");
    assert!(
        events_with(&logs, "WARN", &[("timeout", "*"), ("from", "*")]).is_empty(),
        "{logs}"
    );
}

/// 3scale processes a call but answers after the timeout: the call is ambiguous. tally probes until
/// 3scale answers, raises its timeout, and sends the call once more: one duplicate for the one call
/// that was under way, not one per retry.
#[test]
fn a_timeout_is_resent_once_after_3scale_answers_again() {
    let s = Scenario::new();
    let backend = &s.backend;
    backend.set_delay(Duration::from_secs(3));
    s.append(&combined_line(now(), "GET", "/?user_key=slow", 200));
    // Credentials unchecked: the first call is the report.
    let config = s.config(
        "validate_credentials = false
timeout = \"2s\"
",
        JSON_LOGS,
    );
    let tally = Tally::start(&config, &["--once"]);
    // The first try failed (timed out: the only failure here).
    tally.wait_for_events("WARN", &[("service_id", "42"), ("attempt", "1")], 1, WAIT);
    backend.set_delay(Duration::ZERO);
    let mut tally = tally;
    assert!(tally.wait(WAIT).success(), "{}", tally.logs());
    // The backend processed the first call after its delay, then the resent one.
    assert_eq!(backend.transactions().len(), 2);
    let logs = tally.logs();
    let summary = last_summary(&logs);
    assert_eq!(number(&summary, "ambiguous_resends"), 1, "{summary}");
    assert_eq!(number(&summary, "report_failures"), 1, "{summary}");
    assert_resent_once(&s, &logs);
}

/// A 3scale slower than tally's timeout for the whole run: before, every retry of a processed call
/// was processed again (1.3x to 5.8x the log's hits). Now the first timeout raises the timeout past
/// 3scale's answer time, so only the calls under way at that moment are sent twice.
#[test]
fn a_3scale_slower_than_the_timeout_costs_one_duplicate_per_call_under_way() {
    const LINES: usize = 200;
    const PER_CALL: usize = 20;
    let s = Scenario::new();
    let backend = &s.backend;
    backend.set_delay(Duration::from_millis(1500));
    let t0 = now() - 10;
    // One user_key per line: a duplicate shows which line it is.
    let text: String = (0..LINES)
        .map(|i| combined_line(t0, "GET", &format!("/?user_key=line{i}"), 200))
        .collect();
    s.append(&text);
    let config = s.config(
        "validate_credentials = false\ntimeout = \"1s\"\n",
        &format!("[report]\nmax_transactions = {PER_CALL}\nconcurrency = 2\n{JSON_LOGS}"),
    );
    let tally = Tally::run_once(&config);
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for t in backend.transactions() {
        *counts.entry(t.credential()).or_default() += 1;
    }
    assert_eq!(counts.len(), LINES, "every line arrived");
    let logs = tally.logs();
    let resends = number(&last_summary(&logs), "ambiguous_resends") as usize;
    // Each resend logged with its range.
    assert_eq!(
        events_with(
            &logs,
            "WARN",
            &[("timeout", "*"), ("from", "*"), ("to", "*")]
        )
        .len(),
        resends,
        "{logs}"
    );
    let duplicated = counts.values().filter(|&&c| c == 2).count();
    assert!(counts.values().all(|&c| c <= 2), "{counts:?}");
    // At most one duplicate per call under way at the first timeout (concurrency 2), each of
    // them resent once, and the resent calls' lines are exactly the duplicates.
    assert!((1..=2).contains(&resends), "{resends} resends:\n{logs}");
    assert_eq!(duplicated, resends * PER_CALL, "{counts:?}\n{logs}");
}

#[test]
fn a_rejected_token_is_logged_with_the_backend_code_and_not_hammered() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(&[("42", "right-token")]);
    let log = dir.path().join("access.log");
    append(&log, &combined_line(now(), "GET", "/?user_key=k", 200));
    let config = write_config(
        dir.path(),
        &backend.url(),
        "wrong-token",
        &[(&log, "42")],
        "[report]\nflush_interval = \"100ms\"\nshutdown_grace = \"1s\"\n\
         [log]\nformat = \"json\"\nstats_interval = \"100ms\"\n",
    );
    let mut tally = Tally::start(&config, &[]);
    // An ERROR naming the service and the backend's code, and the next try a minute away.
    let rejected = [("service_id", "42"), ("retry_in", "60s")];
    tally.wait_for_events("ERROR", &rejected, 1, WAIT);
    let logs = tally.logs();
    let event = &events_with(&logs, "ERROR", &rejected)[0];
    assert!(
        event["error"]
            .as_str()
            .is_some_and(|e| e.contains("HTTP 403")),
        "{event}"
    );
    assert!(!logs.contains("wrong-token"), "the token leaked:\n{logs}");
    // Several flush intervals later it has still tried only once: tally's own summaries (one per
    // 100 ms stats interval, as often as the flush) show that it ran on for five more intervals.
    let summaries_by_then = summaries(&logs);
    poll_until(
        WAIT,
        "five more summaries after the rejection",
        || summaries(&tally.logs()) >= summaries_by_then + 5,
        || tally.logs(),
    );
    assert_eq!(backend.calls(), 1);
    assert!(backend.transactions().is_empty());
    tally.signal("TERM");
    tally.wait(WAIT);
    assert_eq!(backend.calls(), 1);
}

/// How many summaries of the counters tally has logged.
fn summaries(logs: &str) -> usize {
    support::events(logs)
        .iter()
        .filter(|e| support::has_fields(e, &[("lines_read", "*"), ("authorize_failures", "*")]))
        .count()
}

#[test]
fn sigterm_flushes_what_was_read_and_exits_zero() {
    let s = Scenario::new();
    let backend = &s.backend;
    let text: String = (0..5)
        .map(|i| combined_line(now(), "GET", &format!("/?user_key=k{i}"), 200))
        .collect();
    s.append(&text);
    let config = s.config("", "[report]\nflush_interval = \"1h\"\n");
    let mut tally = Tally::start(&config, &[]);
    tally.wait_for_log(&format!("end_offset={}", text.len()), WAIT);
    assert!(
        backend.transactions().is_empty(),
        "nothing is sent before the flush"
    );
    tally.signal("TERM");
    assert!(tally.wait(WAIT).success(), "{}", tally.logs());
    assert_eq!(backend.hits(), 5);
}

#[test]
fn sigint_with_the_backend_down_exits_within_the_grace_period() {
    let s = Scenario::new();
    let backend = &s.backend;
    backend.fail_next(usize::MAX, 503);
    s.append(&combined_line(now(), "GET", "/?user_key=k", 200));
    let config = s.config(
        "",
        &format!("[report]\nflush_interval = \"100ms\"\nshutdown_grace = \"1s\"\n{JSON_LOGS}"),
    );
    let mut tally = Tally::start(&config, &[]);
    // A failed credential check: what was read waits for 3scale.
    tally.wait_for_events("WARN", &[("service_id", "42"), ("retry_in", "*")], 1, WAIT);
    tally.signal("INT");
    assert!(tally.wait(WAIT).success(), "{}", tally.logs());
    let logs = tally.logs();
    // The grace period ended (a WARN with it), and what was not accepted is kept: the file's range
    // behind the checkpoint, the whole line.
    assert_eq!(
        events_with(&logs, "WARN", &[("grace", "1s")]).len(),
        1,
        "{logs}"
    );
    assert_kept(&s, &logs);
}

/// tally said, once, that the whole access log (written before the start) is kept behind the
/// checkpoint: a WARN with its path and byte range.
fn assert_kept(s: &Scenario, logs: &str) {
    let len = std::fs::metadata(&s.log).unwrap().len().to_string();
    let log = s.log.display().to_string();
    let kept = events_with(logs, "WARN", &[("path", &log), ("from", "*"), ("to", "*")]);
    assert_eq!(kept.len(), 1, "{logs}");
    assert!(
        support::has_fields(&kept[0], &[("from", "0"), ("to", &len)]),
        "{}",
        kept[0]
    );
}

/// `--once` as a backfill job with 3scale down: `--max-wait` ends it, with exit code 3 and what is
/// kept; so does a SIGTERM. The next run delivers everything, once.
#[test]
fn once_stopped_before_everything_was_accepted_exits_3_and_keeps_the_rest() {
    let s = Scenario::new();
    s.backend.fail_next(usize::MAX, 503);
    let t = now();
    s.append(&combined_line(t, "GET", "/?user_key=k", 200).repeat(3));
    let config = s.config(
        "",
        &format!("[report]\nflush_interval = \"100ms\"\nshutdown_grace = \"1s\"\n{JSON_LOGS}"),
    );
    let mut tally = Tally::start(&config, &["--once", "--max-wait", "1s"]);
    let status = tally.wait(WAIT);
    let logs = tally.logs();
    assert_eq!(status.code(), Some(3), "{logs}");
    assert_eq!(
        events_with(&logs, "INFO", &[("why", "--max-wait 1s passed")]).len(),
        1,
        "{logs}"
    );
    assert_kept(&s, &logs);
    // Stopped by a signal: the same.
    let tally = Tally::start(&config, &["--once"]);
    tally.wait_for_events("WARN", &[("service_id", "42"), ("retry_in", "*")], 1, WAIT);
    tally.signal("TERM");
    let mut tally = tally;
    assert_eq!(tally.wait(WAIT).code(), Some(3), "{}", tally.logs());
    assert_kept(&s, &tally.logs());
    assert!(s.backend.transactions().is_empty());
    s.backend.fail_next(0, 503);
    Tally::run_once(&config);
    assert_eq!(s.backend.hits(), 3);
    assert_eq!(s.backend.transactions().len(), 3);
}

/// A `[[sources]]` table for `path`, of service 42, read from its beginning, then `rules` (its
/// mapping rules' tables).
fn source_table(path: &Path, rules: &str) -> String {
    format!(
        "\n[[sources]]\npath = \"{}\"\nservice_id = \"42\"\nread_from = \"beginning\"\n{rules}",
        path.display()
    )
}

/// The reload tests' start: tally running on a scenario's log, the line of `before` accepted; with
/// the configuration's path and text.
fn running_with_a_first_line() -> (Scenario, std::path::PathBuf, String, Tally) {
    let s = Scenario::new();
    let config = s.config("", "[report]\nflush_interval = \"100ms\"\n");
    let good = std::fs::read_to_string(&config).unwrap();
    let tally = Tally::start(&config, &[]);
    tally.wait_for_log("tally started", WAIT);
    s.append(&combined_line(now(), "GET", "/?user_key=before", 200));
    s.backend
        .wait_until(WAIT, "the first line", |b| b.hits() >= 1);
    (s, config, good, tally)
}

/// A closed terminal or a logrotate script's SIGHUP never stops tally.
#[test]
fn sighup_reloads_the_configuration_and_keeps_it_when_the_new_one_is_bad() {
    let (s, config, good, tally) = running_with_a_first_line();
    // A bad file: said with its line and key, and the configuration in use stays.
    std::fs::write(&config, good.replace("flush_interval", "flush_intervall")).unwrap();
    tally.signal("HUP");
    tally.wait_for_log("the configuration was not reloaded", WAIT);
    let logs = tally.logs();
    assert!(
        logs.contains("tally.toml") && logs.contains("flush_intervall"),
        "{logs}"
    );
    s.append(&combined_line(now(), "GET", "/?user_key=still", 200));
    s.backend
        .wait_until(WAIT, "the line after the bad reload", |b| b.hits() >= 2);
    // A second log file: read from the reload on, the first one from where it was.
    let other = s.path("other.log");
    std::fs::write(&config, format!("{good}{}", source_table(&other, ""))).unwrap();
    tally.signal("HUP");
    tally.wait_for_log("starting again with the new configuration", WAIT);
    tally.wait_for_logs("tally started", 2, WAIT);
    s.append(&combined_line(now(), "GET", "/?user_key=after", 200));
    support::append(
        &other,
        &combined_line(now(), "GET", "/?user_key=other", 200),
    );
    s.backend
        .wait_until(WAIT, "both lines after the reload", |b| b.hits() >= 4);
    let logs = tally.stop(WAIT);
    assert_eq!(
        s.backend.credentials(),
        ["after", "before", "other", "still"],
        "{logs}"
    );
}

/// A reload under a steady stream of writes to three files: one source kept with its settings
/// changed (a mapping rule that counts 2 hits from the reload on), one removed, one added. Every
/// line of the kept and the added file counts once; the removed file's lines count once each up to
/// where it stood at the reload, none after.
#[test]
fn a_reload_under_a_steady_stream_loses_and_repeats_nothing() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(&[("42", "tok")]);
    let [a, b, c] = ["a", "b", "c"].map(|f| dir.path().join(format!("{f}.log")));
    let head = format!(
        "[backend]\nurl = \"{}\"\nservice_token = \"tok\"\ntimeout = \"20s\"\nvalidate_credentials = false\n\
         [report]\nflush_interval = \"100ms\"\n[state]\ndir = \"{}\"\n",
        backend.url(),
        dir.path().join("state").display()
    );
    let config = dir.path().join("tally.toml");
    std::fs::write(
        &config,
        format!("{head}{}{}", source_table(&a, ""), source_table(&b, "")),
    )
    .unwrap();
    // Each file gets a line every 2 ms or so, its credential its file and number.
    let writing = Arc::new(AtomicBool::new(true));
    let written: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
    let writer = {
        let (writing, written) = (writing.clone(), written.clone());
        let files = [a.clone(), b.clone(), c.clone()];
        std::thread::spawn(move || {
            while writing.load(SeqCst) {
                for (i, (file, name)) in files.iter().zip(["a", "b", "c"]).enumerate() {
                    let n = written[i].load(SeqCst);
                    append(
                        file,
                        &combined_line(now(), "GET", &format!("/?user_key={name}{n}"), 200),
                    );
                    written[i].store(n + 1, SeqCst);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let tally = Tally::start(&config, &[]);
    tally.wait_for_log("tally started", WAIT);
    backend.wait_until(WAIT, "lines of a and b", |backend| {
        let keys = backend.credentials();
        keys.iter().any(|k| k.starts_with('a')) && keys.iter().any(|k| k.starts_with('b'))
    });
    let rule = "[[sources.mapping_rules]]\nmethod = \"GET\"\npattern = \"/\"\nmetric = \"hits\"\ndelta = 2\n";
    std::fs::write(
        &config,
        format!("{head}{}{}", source_table(&a, rule), source_table(&c, "")),
    )
    .unwrap();
    let b_before_reload = written[1].load(SeqCst);
    tally.signal("HUP");
    tally.wait_for_log("starting again with the new configuration", WAIT);
    tally.wait_for_logs("tally started", 2, WAIT);
    backend.wait_until(WAIT, "a line of a counted 2 hits", |backend| {
        backend
            .transactions()
            .iter()
            .any(|t| t.credential().starts_with('a') && t.hits() == 2)
    });
    writing.store(false, SeqCst);
    writer.join().unwrap();
    let [wa, _, wc] = [0, 1, 2].map(|i| written[i].load(SeqCst));
    backend.wait_until(WAIT, "every line of a and c", |b| {
        let keys = b.credentials();
        keys.iter().filter(|k| k.starts_with('a')).count() as u64 >= wa
            && keys.iter().filter(|k| k.starts_with('c')).count() as u64 >= wc
    });
    let logs = tally.stop(WAIT);
    // Per file, the numbers counted (how often each) and the hits of each line of a.
    let mut counted: BTreeMap<(char, u64), u64> = BTreeMap::new();
    let mut hits_of_a = BTreeMap::new();
    for t in backend.transactions() {
        let key = t.credential();
        let file = key.chars().next().unwrap();
        let n: u64 = key[1..].parse().unwrap();
        *counted.entry((file, n)).or_default() += 1;
        if file == 'a' {
            hits_of_a.insert(n, t.hits());
        }
    }
    let twice: Vec<_> = counted.iter().filter(|(_, &c)| c != 1).collect();
    assert!(
        twice.is_empty(),
        "counted more than once: {twice:?}\n{logs}"
    );
    let numbers = |file: char| -> Vec<u64> {
        counted
            .keys()
            .filter(|(f, _)| *f == file)
            .map(|(_, n)| *n)
            .collect()
    };
    assert_eq!(numbers('a'), (0..wa).collect::<Vec<_>>(), "{logs}");
    assert_eq!(numbers('c'), (0..wc).collect::<Vec<_>>(), "{logs}");
    let of_b = numbers('b');
    assert_eq!(
        of_b,
        (0..of_b.len() as u64).collect::<Vec<_>>(),
        "b: not a prefix"
    );
    assert!(
        of_b.len() as u64 >= b_before_reload,
        "b: {} of the {b_before_reload} lines written before the reload",
        of_b.len()
    );
    // The new settings apply from one line on: 1 hit before it, 2 from it.
    let switch = hits_of_a.values().position(|&h| h == 2).unwrap();
    assert!(
        hits_of_a.values().take(switch).all(|&h| h == 1),
        "{hits_of_a:?}"
    );
    assert!(
        hits_of_a.values().skip(switch).all(|&h| h == 2),
        "{hits_of_a:?}"
    );
}

/// A changed configuration file is reloaded without a signal (a Kubernetes ConfigMap swaps a
/// symlink): here a second source, its lines delivered once, the first file's too.
#[test]
fn a_changed_configuration_file_is_reloaded_without_a_signal() {
    let (s, config, good, tally) = running_with_a_first_line();
    let other = s.path("other.log");
    support::append(
        &other,
        &combined_line(now(), "GET", "/?user_key=other", 200),
    );
    // Replaced whole, as a ConfigMap's symlink swap or an editor's save does.
    let temp = s.path("tally.toml.new");
    std::fs::write(&temp, format!("{good}{}", source_table(&other, ""))).unwrap();
    std::fs::rename(&temp, &config).unwrap();
    tally.wait_for_log("the configuration file changed", WAIT);
    tally.wait_for_logs("tally started", 2, WAIT);
    s.append(&combined_line(now(), "GET", "/?user_key=after", 200));
    s.backend.wait_until(WAIT, "every line", |b| b.hits() >= 3);
    let logs = tally.stop(WAIT);
    assert_eq!(
        s.backend.credentials(),
        ["after", "before", "other"],
        "{logs}"
    );
}

#[test]
fn several_services_are_reported_separately() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(&[("1", "tok"), ("2", "tok")]);
    let a = dir.path().join("a.log");
    let b = dir.path().join("b.log");
    append(
        &a,
        &combined_line(now(), "GET", "/?user_key=ka", 200).repeat(3),
    );
    append(
        &b,
        &combined_line(now(), "GET", "/?user_key=kb", 404).repeat(2),
    );
    let config = write_config(
        dir.path(),
        &backend.url(),
        "tok",
        &[(&a, "1"), (&b, "2")],
        "",
    );
    Tally::run_once(&config);
    let mut per_service: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in backend.reports() {
        per_service
            .entry(r.service_id.clone())
            .or_default()
            .extend(r.transactions.iter().map(|t| t.credential()));
    }
    assert_eq!(per_service["1"], vec!["ka"; 3]);
    assert_eq!(per_service["2"], vec!["kb"; 2]);
}

/// A path that names no file is said at start and again at every stats interval, until the file
/// appears; then it is read.
#[test]
fn a_path_that_names_no_file_is_logged_until_it_appears() {
    let s = Scenario::new();
    let config = s.config(
        "",
        "[report]\nflush_interval = \"100ms\"\n[log]\nstats_interval = \"200ms\"\n",
    );
    let tally = Tally::start(&config, &[]);
    tally.wait_for_logs("access.log does not exist yet", 3, WAIT);
    s.append(&combined_line(now(), "GET", "/?user_key=k", 200));
    s.backend.wait_until(WAIT, "the line", |b| b.hits() >= 1);
    tally.stop(WAIT);
    assert_eq!(s.backend.hits(), 1);
}

/// A stage that panics must not look like the logs' end: tally logs it, exits non-zero (for its
/// supervisor to restart it), and the restart loses and duplicates nothing. The test-only hook
/// `TALLY_TEST_PANIC_ON` makes the aggregation panic on a chunk holding its value.
#[test]
fn a_panicking_stage_stops_tally_with_an_error_and_a_restart_loses_nothing() {
    let s = Scenario::new();
    let config = s.config(
        "",
        &format!("[report]\nflush_interval = \"100ms\"\n{JSON_LOGS}"),
    );
    let t = now();
    let first: String = (0..10)
        .map(|i| combined_line(t, "GET", &format!("/?user_key=k{i}"), 200))
        .collect();
    s.append(&first);
    let mut tally = Tally::start_with(
        s.dir.path(),
        &["run".as_ref(), "--config".as_ref(), config.as_os_str()],
        "tally=debug",
        |c| {
            c.env("TALLY_TEST_PANIC_ON", "PANIC-HERE");
        },
    );
    s.backend
        .wait_until(WAIT, "the first 10 lines", |b| b.hits() >= 10);
    let rest: String = std::iter::once(combined_line(t, "GET", "/PANIC-HERE?user_key=p", 200))
        .chain((10..20).map(|i| combined_line(t, "GET", &format!("/?user_key=k{i}"), 200)))
        .collect();
    s.append(&rest);
    let status = tally.wait(WAIT);
    let logs = tally.logs();
    assert_eq!(status.code(), Some(1), "{logs}");
    // One ERROR naming the stage, with the panic's message (the test hook's) as its error.
    let died = events_with(&logs, "ERROR", &[("stage", "aggregation of service 42")]);
    assert_eq!(died.len(), 1, "{logs}");
    assert!(
        died[0]["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("test hook")),
        "{}",
        died[0]
    );
    assert_eq!(s.backend.hits(), 10);
    // Restarted as a supervisor would (without the hook): the rest, once.
    let tally = Tally::start(&config, &[]);
    s.backend
        .wait_until(WAIT, "all 21 lines", |b| b.hits() >= 21);
    tally.stop(WAIT);
    let mut expected: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
    expected.push("p".into());
    expected.sort();
    assert_eq!(s.backend.credentials(), expected);
}

/// Checkpoints belong to a source's name (its path by default), not to its place in the list:
/// reordering the sources, then naming one and changing its path, reads nothing twice and loses
/// nothing.
#[test]
fn reordered_and_renamed_sources_keep_their_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(&[("42", "tok")]);
    let (a, b) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let t = now();
    let line = |key: &str| combined_line(t, "GET", &format!("/?user_key={key}"), 200);
    append(&a, &(line("a1") + &line("a2")));
    append(&b, &line("b1"));
    let config = write_config(
        dir.path(),
        &backend.url(),
        "tok",
        &[(&a, "42"), (&b, "42")],
        "",
    );
    Tally::run_once(&config);
    // The same sources, the other way round.
    write_config(
        dir.path(),
        &backend.url(),
        "tok",
        &[(&b, "42"), (&a, "42")],
        "",
    );
    append(&a, &line("a3"));
    append(&b, &line("b2"));
    Tally::run_once(&config);
    // a.log's source gets a name, then its path changes: the name keeps the checkpoint.
    let named = |path: &str| {
        let text = std::fs::read_to_string(&config).unwrap().replacen(
            &format!("path = \"{}\"", a.display()),
            &format!("name = \"edge\"\npath = \"{path}\""),
            1,
        );
        std::fs::write(&config, text).unwrap();
    };
    named(&a.display().to_string());
    append(&a, &line("a4"));
    Tally::run_once(&config);
    write_config(
        dir.path(),
        &backend.url(),
        "tok",
        &[(&b, "42"), (&a, "42")],
        "",
    );
    named(&dir.path().join("a*.log").display().to_string());
    append(&a, &line("a5"));
    Tally::run_once(&config);
    let keys = backend.credentials();
    assert_eq!(keys, ["a1", "a2", "a3", "a4", "a5", "b1", "b2"]);
}

/// Mapping rules make each transaction's usage: every matching rule in order, `last` stopping, a
/// request no rule matches skipped and counted; with response codes off, folded usages are summed.
#[test]
fn mapping_rules_make_the_usage_of_each_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let t0 = now() - 30;
    let mut text = String::new();
    for (method, target) in [
        ("GET", "/products/42?user_key=k1"),
        ("GET", "/products/42/reviews?user_key=k1"),
        ("GET", "/search?q=shoes&lang=en&user_key=k2"),
        ("GET", "/search?q=shoes&lang=fr&user_key=k2"),
        ("DELETE", "/products/42?user_key=k1"),
        ("GET", "/products//7?user_key=k2"),
        // Only a metric the service does not have: not sent (it would drop the whole call).
        ("GET", "/orphan?user_key=k1"),
    ] {
        text += &combined_line(t0, method, target, 200);
    }
    append(&log, &text);
    let rules = r#"
[[sources.mapping_rules]]
method = "GET"
pattern = "/orphan$"
metric = "nope"
last = true

[[sources.mapping_rules]]
method = "GET"
pattern = "/products/{id}"
metric = "get_product"

[[sources.mapping_rules]]
method = "GET"
pattern = "/products/{id}/reviews"
metric = "nope"

[[sources.mapping_rules]]
method = "GET"
pattern = "/products/{id}/reviews$"
metric = "reviews"
delta = 3
last = true

[[sources.mapping_rules]]
method = "GET"
pattern = "/search?q={term}&lang=en"
metric = "search"

[[sources.mapping_rules]]
method = "GET"
pattern = "/"
metric = "hits"
"#;
    let usage = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(m, d)| (m.to_string(), d.to_string()))
            .collect()
    };
    for (response_codes, expected) in [
        (
            true,
            vec![
                ("k1", usage(&[("get_product", "1"), ("hits", "1")])),
                ("k1", usage(&[("get_product", "1"), ("reviews", "3")])),
                ("k2", usage(&[("hits", "1"), ("search", "1")])),
                ("k2", usage(&[("hits", "1")])),
                ("k2", usage(&[("get_product", "1"), ("hits", "1")])),
            ],
        ),
        (
            false,
            vec![
                (
                    "k1",
                    usage(&[("get_product", "2"), ("hits", "1"), ("reviews", "3")]),
                ),
                (
                    "k2",
                    usage(&[("get_product", "1"), ("hits", "3"), ("search", "1")]),
                ),
            ],
        ),
    ] {
        let backend = Backend::start(&[("7", "t")]);
        backend.set_metrics(&["get_product", "reviews", "search"]);
        let state = dir.path().join(format!("state-{response_codes}"));
        let config = write_config(
            dir.path(),
            &backend.url(),
            "t",
            &[(&log, "7")],
            &format!(
                "{rules}\n[report]\nresponse_codes = {response_codes}\n[state]\ndir = \"{}\"\n{JSON_LOGS}",
                state.display()
            ),
        );
        let logs = Tally::run_once(&config).logs();
        let mut got: Vec<(String, BTreeMap<String, String>)> = backend
            .transactions()
            .into_iter()
            .map(|t| (t.credential(), t.usage))
            .collect();
        got.sort();
        let mut expected: Vec<(String, BTreeMap<String, String>)> = expected
            .into_iter()
            .map(|(k, u)| (k.to_string(), u))
            .collect();
        expected.sort();
        assert_eq!(got, expected, "response_codes = {response_codes}\n{logs}");
        // The DELETE matches no rule.
        assert_eq!(
            number(&last_summary(&logs), "skipped_no_mapping_rule"),
            1,
            "{logs}"
        );
    }
}

/// A proxy configuration gives the service its token, its endpoint, its credentials settings and its
/// rules: the configuration names only the log and the service.
#[test]
fn the_proxy_configuration_gives_token_endpoint_credentials_and_rules() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(&[("42", "tok-42")]);
    backend.set_metrics(&["get_product"]);
    let proxy = format!(
        r#"{{"proxy_configs":[{{"proxy_config":{{"content":{{"id":42,"backend_version":"2","backend_authentication_type":"service_token","backend_authentication_value":"tok-42",
            "proxy":{{"credentials_location":"query","auth_app_id":"client","auth_app_key":"secret","backend":{{"endpoint":"{}"}},
            "proxy_rules":[{{"http_method":"GET","pattern":"/products/{{id}}$","metric_system_name":"get_product","delta":1,"last":true,"position":1}},
                           {{"http_method":"ANY","pattern":"/","metric_system_name":"hits","delta":1,"last":false,"position":2}}]}}}}}}}}]}}"#,
        backend.url()
    );
    std::fs::write(dir.path().join("proxy.json"), proxy).unwrap();
    let log = dir.path().join("access.log");
    let t0 = now() - 30;
    append(
        &log,
        &[
            combined_line(t0, "GET", "/products/7?client=app1&secret=s", 200),
            combined_line(t0, "POST", "/orders?client=app2", 201),
            combined_line(t0, "GET", "/products/7?user_key=not-this-mode", 200),
        ]
        .concat(),
    );
    let config = dir.path().join("tally.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy_config]\nfile = \"proxy.json\"\n[backend]\n[[sources]]\npath = \"{}\"\nservice_id = \"42\"\nread_from = \"beginning\"\n[state]\ndir = \"{}\"\n{JSON_LOGS}",
            log.display(),
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let logs = Tally::run_once(&config).logs();
    let mut got: Vec<(Option<String>, BTreeMap<String, String>)> = backend
        .transactions()
        .into_iter()
        .map(|t| (t.app_id, t.usage))
        .collect();
    got.sort();
    let usage = |m: &str| BTreeMap::from([(m.to_string(), "1".to_string())]);
    assert_eq!(
        got,
        vec![
            (Some("app1".into()), usage("get_product")),
            (Some("app2".into()), usage("hits")),
        ],
        "{logs}"
    );
    assert_eq!(
        number(&last_summary(&logs), "skipped_no_credential"),
        1,
        "{logs}"
    );
}

/// One log, two 3scale services told apart by Host (the proxy configuration's `proxy.hosts`): each
/// line reaches its service, with that service's token, credentials and rules; a line of a host no
/// service has is skipped once; every line is counted once.
#[test]
fn lines_are_routed_to_services_by_host() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(&[("1", "t1"), ("2", "t2")]);
    backend.set_metrics(&["search"]);
    let proxy = format!(
        r#"{{"services":[
          {{"id":1,"backend_version":"1","backend_authentication_type":"service_token","backend_authentication_value":"t1",
            "proxy":{{"hosts":["shop.example"],"credentials_location":"query","backend":{{"endpoint":"{url}"}},
            "proxy_rules":[{{"http_method":"GET","pattern":"/search","metric_system_name":"search","delta":1}},
                           {{"http_method":"ANY","pattern":"/","metric_system_name":"hits","delta":1}}]}}}},
          {{"id":2,"backend_version":"2","backend_authentication_type":"service_token","backend_authentication_value":"t2",
            "proxy":{{"hosts":["api.example"],"credentials_location":"headers","auth_app_id":"X-App-Id",
            "proxy_rules":[{{"http_method":"ANY","pattern":"/v1","metric_system_name":"hits","delta":1}}]}}}}]}}"#,
        url = backend.url()
    );
    std::fs::write(dir.path().join("proxy.json"), proxy).unwrap();
    let log = dir.path().join("access.log");
    let t = support::time_local(now() - 30);
    let line = |host: &str, target: &str, app: &str| {
        format!("{host} [{t}] \"GET {target} HTTP/1.1\" 200 {app}\n")
    };
    append(
        &log,
        &[
            line("shop.example", "/search?q=x&user_key=k1", "-"),
            line("SHOP.example:443", "/cart?user_key=k1", "-"),
            line("api.example", "/v1/orders", "mobile"),
            line("api.example", "/v1/orders/7", "web"),
            line("api.example", "/v1/orders?user_key=k1", "-"),
            // Service 2's (which does not count the source's lines): no rule of its matches.
            line("api.example", "/admin", "web"),
            line("unknown.example", "/?user_key=k1", "-"),
            line("unknown.example", "/", "-"),
            "garbage\n".to_string(),
        ]
        .concat(),
    );
    let config = dir.path().join("tally.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy_config]\nfile = \"proxy.json\"\n[backend]\n[[sources]]\npath = \"{}\"\nread_from = \"beginning\"\nlog_format = '$host [$time_local] \"$request\" $status $http_x_app_id'\n[state]\ndir = \"{}\"\n{JSON_LOGS}",
            log.display(),
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let logs = Tally::run_once(&config).logs();
    let of = |service: &str| -> Vec<(String, BTreeMap<String, String>)> {
        let mut list: Vec<_> = backend
            .transactions_of(service)
            .into_iter()
            .map(|t| (t.credential(), t.usage))
            .collect();
        list.sort();
        list
    };
    let usage = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(m, d)| (m.to_string(), d.to_string()))
            .collect()
    };
    assert_eq!(
        of("1"),
        vec![
            ("k1".into(), usage(&[("hits", "1")])),
            ("k1".into(), usage(&[("hits", "1"), ("search", "1")])),
        ],
        "{logs}"
    );
    assert_eq!(
        of("2"),
        vec![
            ("mobile".into(), usage(&[("hits", "1")])),
            ("web".into(), usage(&[("hits", "1")]))
        ],
        "{logs}"
    );
    let summary = last_summary(&logs);
    assert_eq!(number(&summary, "lines_read"), 9, "{logs}");
    assert_eq!(number(&summary, "skipped_unknown_host"), 2, "{logs}");
    assert_eq!(number(&summary, "skipped_no_mapping_rule"), 1, "{logs}");
    assert_eq!(number(&summary, "skipped_malformed"), 1, "{logs}");
    // The api.example line with a user_key: service 2 reads app_ids from a header (the lines of
    // api.example without a user_key are service 2's, not skips of service 1).
    assert_eq!(number(&summary, "skipped_no_credential"), 1, "{logs}");
    assert!(backend.refusals().is_empty(), "{:?}", backend.refusals());
}

/// `tally check --online` asks 3scale, reporting nothing: the token is accepted, the metrics the
/// rules name exist or not (checked with an application of the log that 3scale knows, the newest
/// unknown one passed over), and a wrong token is an error that shows no token.
#[test]
fn check_online_lists_the_metrics_a_service_does_not_have() {
    let s = Scenario::new();
    s.backend.set_metrics(&["get_product"]);
    s.backend.set_applications(&["k1"]);
    let t = now() - 30;
    append(
        &s.log,
        &[
            combined_line(t, "GET", "/products/1?user_key=k1", 200),
            combined_line(t, "GET", "/products/2?user_key=nobody", 200),
        ]
        .concat(),
    );
    let rules = "[[sources.mapping_rules]]\nmethod = \"GET\"\npattern = \"/products/{id}\"\nmetric = \"get_product\"\n\
                 [[sources.mapping_rules]]\nmethod = \"ANY\"\npattern = \"/\"\nmetric = \"no_such_metric\"\n";
    let config = s.config("", rules);
    let check = |config: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["check", "--online", "--config"])
            .arg(config)
            .output()
            .unwrap()
    };
    let out = check(&config);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("online: service 42: it has no metric `no_such_metric`"),
        "{err}"
    );
    assert!(
        err.contains(
            "online: service 42: the token is accepted; checked with user_key k… from its logs"
        ) && err.contains("metrics that exist: hits, get_product"),
        "{err}"
    );
    assert!(s.backend.reports().is_empty());
    assert_eq!(s.backend.authorizations()[..2], ["nobody", "k1"]);

    let wrong = std::fs::read_to_string(&config).unwrap().replace(
        "service_token = \"tok\"",
        "service_token = \"wrong-token-9\"",
    );
    std::fs::write(&config, wrong).unwrap();
    let out = check(&config);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("online: service 42: 3scale rejects the call: service_token_invalid"),
        "{err}"
    );
    assert!(!err.contains("wrong-token-9"), "{err}");
}

/// APIcast's path routing: two services share a Host and are told apart by their mapping rules
/// (the first whose rules match; none matching, the first); each reads its own kind of
/// credential; every line is reported or skipped once.
#[test]
fn path_routing_tells_services_of_one_host_apart_by_their_rules() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(&[("1", "t1"), ("2", "t2")]);
    backend.set_metrics(&["orders", "products"]);
    let proxy = format!(
        r#"{{"services":[
          {{"id":1,"backend_version":"1","backend_authentication_type":"service_token","backend_authentication_value":"t1",
            "proxy":{{"hosts":["api.example"],"credentials_location":"query","backend":{{"endpoint":"{url}"}},
            "proxy_rules":[{{"http_method":"GET","pattern":"/orders","metric_system_name":"orders","delta":1}}]}}}},
          {{"id":2,"backend_version":"2","backend_authentication_type":"service_token","backend_authentication_value":"t2",
            "proxy":{{"hosts":["api.example"],"credentials_location":"headers","auth_app_id":"X-App-Id",
            "proxy_rules":[{{"http_method":"GET","pattern":"/products","metric_system_name":"products","delta":1}}]}}}}]}}"#,
        url = backend.url()
    );
    std::fs::write(dir.path().join("proxy.json"), proxy).unwrap();
    let log = dir.path().join("access.log");
    let t = support::time_local(now() - 30);
    let line = |target: &str, app: &str| {
        format!("api.example [{t}] \"GET {target} HTTP/1.1\" 200 {app}\n")
    };
    append(
        &log,
        &[
            line("/orders/1?user_key=k1", "-"),
            line("/products/7", "web"),
            line("/products/8", "web"),
            // Service 2's path, a user_key: service 2's, without its credential.
            line("/products/9?user_key=k1", "-"),
            // No rule matches: service 1's (the first of the Host), which has no rule for it.
            line("/health?user_key=k1", "-"),
        ]
        .concat(),
    );
    let config = dir.path().join("tally.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy_config]\nfile = \"proxy.json\"\npath_routing = true\n[backend]\n[[sources]]\npath = \"{}\"\nread_from = \"beginning\"\nlog_format = '$host [$time_local] \"$request\" $status $http_x_app_id'\n[state]\ndir = \"{}\"\n{JSON_LOGS}",
            log.display(),
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let logs = Tally::run_once(&config).logs();
    let of = |service: &str| -> Vec<(String, Vec<String>)> {
        let mut list: Vec<_> = backend
            .transactions_of(service)
            .into_iter()
            .map(|t| (t.credential(), t.usage.into_keys().collect()))
            .collect();
        list.sort();
        list
    };
    assert_eq!(
        of("1"),
        vec![("k1".into(), vec!["orders".into()])],
        "{logs}"
    );
    assert_eq!(
        of("2"),
        vec![
            ("web".into(), vec!["products".into()]),
            ("web".into(), vec!["products".into()])
        ],
        "{logs}"
    );
    let summary = last_summary(&logs);
    assert_eq!(number(&summary, "lines_read"), 5, "{logs}");
    assert_eq!(number(&summary, "skipped_no_credential"), 1, "{logs}");
    assert_eq!(number(&summary, "skipped_no_mapping_rule"), 1, "{logs}");
}
