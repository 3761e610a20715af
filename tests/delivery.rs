//! Delivery against the test backend's after-202 behaviour: no poisoned call, outages, rejections,
//! time window, credential checks, concurrency, telemetry.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::backend::Backend;
use support::{
    combined_line, events_with, has_fields, last_summary, now, number, sample, telemetry_get,
    telemetry_port, wait_for_health, write_config_with, Scenario, Tally, JSON_LOGS,
};

const WAIT: Duration = Duration::from_secs(60);

/// credential → hits accepted.
fn hits(s: &Scenario) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for t in s.backend.transactions() {
        *m.entry(t.credential()).or_default() += t.hits();
    }
    m
}

/// Appends (time, target, status) lines to the access log.
fn append(s: &Scenario, lines: &[(i64, &str, u16)]) {
    let text: String = lines
        .iter()
        .map(|(t, target, status)| combined_line(*t, "GET", target, *status))
        .collect();
    s.append(&text);
}

fn expect(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

#[test]
fn an_unknown_credential_never_reaches_3scale_and_the_rest_of_its_batch_does() {
    let s = Scenario::new();
    s.backend.set_applications(&["good-key-1234", "app-ok"]);
    let t = now();
    append(
        &s,
        &[
            (t, "/?user_key=good-key-1234", 200),
            (t, "/?user_key=unknown-key-5678", 200),
            (t, "/?app_id=app-ok", 404),
            (t, "/?user_key=unknown-key-5678", 500),
            (t, "/?app_id=missing-app-999", 200),
            (t, "/?user_key=good-key-1234", 201),
        ],
    );
    let port = telemetry_port();
    let tally = Tally::start(
        &s.config(
            "",
            &format!("[telemetry]\nlisten = \"127.0.0.1:{port}\"\n{JSON_LOGS}"),
        ),
        &[],
    );
    s.backend.wait_until(WAIT, "the known credentials", |b| {
        b.transactions().len() >= 3
    });
    let (_, metrics) = telemetry_get(port, "/metrics");
    let logs = tally.stop(WAIT);
    assert_eq!(hits(&s), expect(&[("good-key-1234", 2), ("app-ok", 1)]));
    assert!(
        s.backend.dropped().is_empty(),
        "a call was poisoned: {:?}",
        s.backend.dropped()
    );
    // Each credential is checked once, then cached.
    let mut asked = s.backend.authorizations();
    asked.sort();
    assert_eq!(
        asked,
        vec![
            "app-ok",
            "good-key-1234",
            "missing-app-999",
            "unknown-key-5678"
        ]
    );
    // Each unknown credential is said once, masked, as a WARN of its service.
    for masked in ["unkn…5678", "miss…"] {
        let said = [("service_id", "42"), ("credential", masked)];
        assert_eq!(events_with(&logs, "WARN", &said).len(), 1, "{logs}");
    }
    assert!(
        !logs.contains("unknown-key-5678"),
        "credentials are masked in logs:\n{logs}"
    );
    let summary = last_summary(&logs);
    assert_eq!(
        number(&summary, "dropped_invalid_credential"),
        3,
        "{summary}"
    );
    assert!(
        metrics.contains("tally_invalid_credential_requests_total{credential=\"unkn…5678\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tally_invalid_credential_requests_total{credential=\"miss…\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tally_requests_dropped_total{reason=\"invalid_credential\"} 3"),
        "{metrics}"
    );
}

#[test]
fn a_failing_credential_check_holds_the_batch_without_dropping_it() {
    let s = Scenario::new();
    s.backend.set_applications(&["k1", "k2"]);
    s.backend.fail_next(3, 503);
    let t = now();
    append(
        &s,
        &[
            (t, "/?user_key=k1", 200),
            (t, "/?user_key=k2", 200),
            (t, "/?user_key=k1", 503),
        ],
    );
    let tally = Tally::run_once(&s.config("", JSON_LOGS));
    assert_eq!(hits(&s), expect(&[("k1", 2), ("k2", 1)]));
    // The checks failed (each of the 3 failures the backend served counted at most once: a failed
    // round abandons its other calls), and the batch went out once, after them, without a failure.
    let summary = last_summary(&tally.logs());
    assert!(
        (1..=3).contains(&number(&summary, "authorize_failures")),
        "{summary}"
    );
    assert_eq!(number(&summary, "report_failures"), 0, "{summary}");
    assert_eq!(number(&summary, "report_calls"), 1, "{summary}");
}

#[test]
fn lines_older_than_the_window_are_dropped_loudly_and_never_sent() {
    let s = Scenario::new();
    let t = now();
    append(
        &s,
        &[
            (t - 25 * 3600, "/?user_key=old", 200),
            (t - 3600, "/?user_key=recent", 200),
            (t - 24 * 3600 + 60, "/?user_key=edge", 200), // inside 24 h, outside the 5-minute margin
            (t + 3 * 3600, "/?user_key=future", 200),
            (t, "/?user_key=now", 200),
        ],
    );
    let tally = Tally::run_once(&s.config("", JSON_LOGS));
    assert_eq!(hits(&s), expect(&[("recent", 1), ("now", 1)]));
    assert!(s.backend.dropped().is_empty(), "{:?}", s.backend.dropped());
    let logs = tally.logs();
    // Loudly: a WARN for the 2 too old (with the window), one for the 1 too new; and counted.
    let too_old = [("service_id", "42"), ("requests", "2"), ("max_age", "*")];
    assert_eq!(events_with(&logs, "WARN", &too_old).len(), 1, "{logs}");
    let too_new = [("service_id", "42"), ("requests", "1")];
    assert_eq!(events_with(&logs, "WARN", &too_new).len(), 1, "{logs}");
    let summary = last_summary(&logs);
    assert_eq!(number(&summary, "dropped_too_old"), 2, "{summary}");
    assert_eq!(number(&summary, "dropped_too_new"), 1, "{summary}");
}

#[test]
fn outages_short_and_long_lose_nothing_and_catch_up() {
    let s = Scenario::new();
    s.backend.fail_next(usize::MAX, 503);
    let config = s.config(
        "",
        &format!("[report]\nflush_interval = \"100ms\"\nmax_transactions = 10\n{JSON_LOGS}"),
    );
    let tally = Tally::start(&config, &[]);
    let t = now();
    let keys: Vec<String> = (0..120).map(|i| format!("/?user_key=k{}", i % 7)).collect();
    for (i, k) in keys.iter().enumerate() {
        append(&s, &[(t, k, if i % 3 == 0 { 500 } else { 200 })]);
    }
    // Many flush intervals of outage, with reading held back: three failed calls, each a WARN of
    // the service with its retry.
    tally.wait_for_events("WARN", &[("service_id", "42"), ("retry_in", "*")], 3, WAIT);
    assert!(s.backend.transactions().is_empty());
    s.backend.fail_next(0, 503);
    s.backend
        .wait_until(WAIT, "120 transactions", |b| b.transactions().len() >= 120);
    // A short one: a few failures, then the rest.
    s.backend.fail_next(2, 502);
    append(&s, &[(t, "/?user_key=late", 200)]);
    s.backend
        .wait_until(WAIT, "121 transactions", |b| b.transactions().len() >= 121);
    tally.stop(WAIT);
    assert_eq!(s.backend.transactions().len(), 121);
    let mut codes = BTreeMap::new();
    for tx in s.backend.transactions() {
        *codes.entry(tx.code.clone().unwrap()).or_insert(0) += 1;
        assert_eq!(tx.timestamp(), t, "the original timestamp is reported");
    }
    assert_eq!(
        codes,
        [("200".to_string(), 81), ("500".to_string(), 40)]
            .into_iter()
            .collect()
    );
}

#[test]
fn flapping_503s_and_connection_resets_lose_and_duplicate_nothing() {
    let s = Scenario::new();
    s.backend.set_flapping(true);
    let t = now();
    let lines: Vec<(i64, String, u16)> = (0..300)
        .map(|i| (t, format!("/?user_key=k{}", i % 11), 200))
        .collect();
    let refs: Vec<(i64, &str, u16)> = lines.iter().map(|(t, k, c)| (*t, k.as_str(), *c)).collect();
    append(&s, &refs);
    let mut tally = Tally::start(
        &s.config(
            "validate_credentials = false\n",
            "[report]\nmax_transactions = 25\n",
        ),
        &["--once"],
    );
    assert!(tally.wait(WAIT).success(), "{}", tally.logs());
    s.backend.set_flapping(false);
    s.backend.drop_next(3);
    append(&s, &[(t, "/?user_key=after", 200)]);
    Tally::run_once(&s.config("validate_credentials = false\n", ""));
    assert_eq!(s.backend.hits(), 301);
    assert_eq!(s.backend.reports().len(), 13);
}

#[test]
fn a_rejected_token_marks_tally_unhealthy_keeps_the_data_and_resumes_once_fixed() {
    let s = Scenario::new();
    s.backend.set_token("42", "the-new-token");
    let token_file = s.dir.path().join("token");
    std::fs::write(&token_file, "tok\n").unwrap();
    let port = telemetry_port();
    let config = write_config_with(
        s.dir.path(),
        &s.backend.url(),
        "unused",
        "rejected_retry = \"300ms\"\n",
        &[(&s.log, "42")],
        &format!("[telemetry]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    // The token comes from a file (a Kubernetes Secret), which is then fixed.
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "service_token = \"unused\"",
        &format!("service_token_file = \"{}\"", token_file.display()),
    );
    std::fs::write(&config, text).unwrap();
    let text = std::fs::read_to_string(&config).unwrap() + JSON_LOGS;
    std::fs::write(&config, text).unwrap();
    let t = now();
    append(&s, &[(t, "/?user_key=a", 200), (t, "/?user_key=b", 404)]);
    let tally = Tally::start(&config, &[]);
    // Rejections, each an ERROR of the service with its retry.
    let rejected = [("service_id", "42"), ("retry_in", "300ms")];
    tally.wait_for_events("ERROR", &rejected, 4, WAIT);
    let (status, body) = telemetry_get(port, "/healthz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("service 42") && body.contains("service_token_invalid"),
        "{body}"
    );
    assert!(!body.contains("the-new-token") && !tally.logs().contains("\"tok\""));
    assert_eq!(telemetry_get(port, "/livez").0, 200);
    assert!(s.backend.transactions().is_empty());
    // Slow retries, not a tight loop: a round of checks (a call per credential, 2 here) per
    // rejection, and the rejections rejected_retry (300 ms) apart at least, by tally's clock.
    let calls = s.backend.calls();
    let logs = tally.logs();
    let rejections: Vec<f64> = events_with(&logs, "ERROR", &rejected)
        .iter()
        .map(support::seconds)
        .collect();
    assert!(
        calls <= 2 * (rejections.len() + 1),
        "{calls} calls for {} rejections",
        rejections.len()
    );
    for pair in rejections.windows(2) {
        let apart = (pair[1] - pair[0]).rem_euclid(86_400.0); // across midnight too
        assert!(
            apart >= 0.3,
            "rejections {apart:.3} s apart, under rejected_retry (300 ms):\n{logs}"
        );
    }
    std::fs::write(&token_file, "the-new-token\n").unwrap();
    s.backend
        .wait_until(WAIT, "both requests", |b| b.transactions().len() >= 2);
    wait_for_health(port, 200, "", WAIT);
    let (_, metrics) = telemetry_get(port, "/metrics");
    assert!(metrics.contains("tally_healthy 1"), "{metrics}");
    let logs = tally.stop(WAIT);
    // Accepted with the new token only (the backend knows no other): the file was read again.
    assert_eq!(hits(&s), expect(&[("a", 1), ("b", 1)]));
    assert!(!logs.contains("the-new-token"), "{logs}");
}

#[test]
fn a_token_fixed_in_3scale_resumes_reporting_without_restart() {
    let s = Scenario::new();
    s.backend.set_token("42", "other");
    let t = now();
    append(&s, &[(t, "/?user_key=a", 200)]);
    let tally = Tally::start(&s.config("rejected_retry = \"200ms\"\n", ""), &[]);
    tally.wait_for_log("service_token_invalid", WAIT);
    s.backend.set_token("42", "tok");
    s.backend
        .wait_until(WAIT, "the request", |b| b.transactions().len() == 1);
    tally.stop(WAIT);
    assert_eq!(hits(&s), expect(&[("a", 1)]));
}

#[test]
fn reserved_and_non_ascii_characters_in_credentials_arrive_intact() {
    let s = Scenario::new();
    let t = now();
    append(
        &s,
        &[
            (t, "/?user_key=caf%C3%A9%26%3D%3F%23%25+x", 200),
            (t, "/?app_id=%E6%97%A5%E6%9C%AC/%2B", 200),
            (t, r"/?user_key=\xC3\xBC-nginx-escaped", 200),
        ],
    );
    Tally::run_once(&s.config("", ""));
    assert_eq!(
        hits(&s),
        expect(&[("café&=?#% x", 1), ("日本/+", 1), ("ü-nginx-escaped", 1)])
    );
    assert!(s.backend.refusals().is_empty());
}

#[test]
fn concurrent_calls_checkpoint_in_order() {
    let s = Scenario::new();
    s.backend.set_delay(Duration::from_millis(150));
    let t = now();
    let lines: Vec<(i64, String, u16)> = (0..400)
        .map(|i| (t, format!("/?user_key=k{}", i % 5), 200))
        .collect();
    let refs: Vec<(i64, &str, u16)> = lines.iter().map(|(t, k, c)| (*t, k.as_str(), *c)).collect();
    append(&s, &refs);
    let config = s.config(
        "validate_credentials = false\n",
        "[report]\nmax_transactions = 20\nconcurrency = 4\n",
    );
    Tally::run_once(&config);
    assert_eq!(s.backend.hits(), 400);
    let most = s.backend.max_concurrent();
    assert!((2..=4).contains(&most), "{most} calls at once");
    // The checkpoint is at the end of the file: a second run sends nothing.
    let calls = s.backend.calls();
    Tally::run_once(&config);
    assert_eq!(s.backend.calls(), calls);
    assert_eq!(s.backend.hits(), 400);
}

#[test]
fn sources_with_their_own_token_report_to_their_service() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(&[("1", "token-one"), ("2", "token-two")]);
    let (a, b) = (dir.path().join("a.log"), dir.path().join("b.log"));
    std::fs::write(&a, combined_line(now(), "GET", "/?user_key=ka", 200)).unwrap();
    std::fs::write(&b, combined_line(now(), "GET", "/?user_key=kb", 200)).unwrap();
    let config = write_config_with(
        dir.path(),
        &backend.url(),
        "token-one",
        "",
        &[(&a, "1"), (&b, "2")],
        "",
    );
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "service_id = \"2\"",
        "service_id = \"2\"\nservice_token = \"token-two\"",
    );
    std::fs::write(&config, text).unwrap();
    let tally = Tally::run_once(&config);
    let mut got: Vec<(String, String)> = backend
        .reports()
        .iter()
        .flat_map(|r| {
            r.transactions
                .iter()
                .map(|t| (r.service_id.clone(), t.credential()))
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![("1".into(), "ka".into()), ("2".into(), "kb".into())]
    );
    assert!(!tally.logs().contains("token-two"));
}

/// Every call failing (authorize and report) is visible: failures counted by endpoint and cause,
/// the lag of lines held in memory grows, and /healthz fails once nothing has been accepted for
/// `stalled_after`, naming the last failure. Then everything arrives, exactly once.
#[test]
fn an_outage_shows_in_metrics_lag_and_health() {
    let s = Scenario::new();
    s.backend.fail_next(usize::MAX, 500);
    let port = telemetry_port();
    let config = s.config(
        "",
        &format!(
            "[report]\nflush_interval = \"100ms\"\n[telemetry]\nlisten = \"127.0.0.1:{port}\"\nstalled_after = \"1s\"\n"
        ),
    );
    let t = now() - 40;
    append(&s, &[(t, "/?user_key=a", 200), (t, "/?user_key=b", 500)]);
    let tally = Tally::start(&config, &[]);
    let body = wait_for_health(port, 503, "", WAIT);
    assert!(
        body.contains("service 42: nothing accepted by 3scale for")
            && body.contains("last failure: authorize call: HTTP 500"),
        "{body}"
    );
    let (_, metrics) = telemetry_get(port, "/metrics");
    // Each failed check counted, at most once per call the backend failed (a failed round abandons
    // its other calls).
    let failed = sample(
        &metrics,
        "tally_call_failures_total{endpoint=\"authorize\",cause=\"http_5xx\"}",
    );
    assert!(
        (1..=s.backend.calls() as u64).contains(&failed),
        "{failed} of {} calls:\n{metrics}",
        s.backend.calls()
    );
    assert_eq!(
        sample(
            &metrics,
            "tally_call_failures_total{endpoint=\"report\",cause=\"http_5xx\"}"
        ),
        0
    );
    let lag = metrics
        .lines()
        .find(|l| l.starts_with("tally_file_lag_seconds{"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .expect("a lag sample");
    let most = (now() - t) as u64;
    assert!(
        (40..=most).contains(&lag),
        "the waiting lines are 40 s old (at most {most} s by now), lag {lag}:\n{metrics}"
    );
    s.backend.fail_next(0, 500);
    s.backend
        .wait_until(WAIT, "both requests", |b| b.transactions().len() >= 2);
    wait_for_health(port, 200, "", WAIT);
    // A credential known by now: its report calls fail, and are counted as such.
    s.backend.fail_next(3, 503);
    append(&s, &[(now(), "/?user_key=a", 200)]);
    s.backend
        .wait_until(WAIT, "the third request", |b| b.transactions().len() >= 3);
    let (_, metrics) = telemetry_get(port, "/metrics");
    assert_eq!(
        sample(
            &metrics,
            "tally_call_failures_total{endpoint=\"report\",cause=\"http_5xx\"}"
        ),
        3
    );
    assert_eq!(sample(&metrics, "tally_ambiguous_resends_total"), 0);
    tally.stop(WAIT);
    assert_eq!(hits(&s), expect(&[("a", 2), ("b", 1)]));
}

/// NGINX logs `000` when it sent no response; 3scale counts only three-digit codes of the known
/// classes, so such a request is reported (its hit counts) without a code.
#[test]
fn a_status_outside_100_to_599_is_reported_without_a_code() {
    let s = Scenario::new();
    let t = now();
    s.append(&combined_line(t, "GET", "/?user_key=a", 200));
    s.append(&combined_line(t, "GET", "/?user_key=a", 200).replace(" 200 ", " 000 "));
    s.append(&combined_line(t, "GET", "/?user_key=a", 200).replace(" 200 ", " 999 "));
    Tally::run_once(&s.config("", ""));
    let mut codes: Vec<Option<String>> = s
        .backend
        .transactions()
        .into_iter()
        .map(|t| t.code)
        .collect();
    codes.sort();
    assert_eq!(codes, vec![None, None, Some("200".to_string())]);
    assert_eq!(hits(&s), expect(&[("a", 3)]));
}

/// A line from anything but NGINX may hold terminal control sequences: tally's text log shows them
/// escaped, never raw.
#[test]
fn control_characters_from_a_line_never_reach_the_log_raw() {
    let s = Scenario::new();
    s.append("\u{1b}]0;owned\u{7}\u{1b}[2J garbage \u{0} line\n");
    s.append(&combined_line(now(), "GET", "/?user_key=a", 200));
    let tally = Tally::run_once(&s.config("", ""));
    let log = std::fs::read(&tally.log).unwrap();
    assert!(
        !log.iter().any(|&b| b == 0x1b || b == 0x07 || b == 0),
        "{}",
        tally.logs()
    );
    assert!(
        tally
            .logs()
            .contains(r"\x1b]0;owned\x07\x1b[2J garbage \x00 line"),
        "{}",
        tally.logs()
    );
    assert_eq!(hits(&s), expect(&[("a", 1)]));

    // A file name is text from outside too: a glob finds what is there.
    let dir = s.path("logs");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("x\u{1b}[2Jy.log"),
        combined_line(now(), "GET", "/?user_key=b", 200),
    )
    .unwrap();
    let config = write_config_with(
        s.dir.path(),
        &s.backend.url(),
        "tok",
        "",
        &[(&dir.join("*.log"), "42")],
        "",
    );
    let tally = Tally::run_once(&config);
    let log = std::fs::read(&tally.log).unwrap();
    assert!(!log.contains(&0x1b), "{}", tally.logs());
    assert!(tally.logs().contains(r"x\x1b[2Jy.log"), "{}", tally.logs());
    assert_eq!(hits(&s), expect(&[("a", 1), ("b", 1)]));
}

/// A service that authenticates with `mode` (`user_key` or `app_id`), read in `auto` from a log
/// holding both kinds: `known` and `unknown` are of the service's kind, `others` of the other.
/// 3scale answers about the other kind "user key is missing" / "application id is missing",
/// which says nothing of the application: those requests are taken out under their own reason,
/// never as unknown credentials, and the configuration hint is logged once.
fn a_service_of_one_kind(mode: &str, known: [&str; 2], unknown: &str, others: [&str; 2]) {
    let (kind, other) = match mode {
        "user_key" => ("user_key", "app_id"),
        _ => ("app_id", "user_key"),
    };
    let s = Scenario::new();
    s.backend.set_credential_mode(mode);
    s.backend
        .set_applications(&[known[0], known[1], others[0], others[1]]);
    let t = now();
    let target = |param: &str, value: &str| format!("/?{param}={value}");
    let lines = [
        // Three transactions per call: the first call holds both kinds.
        (target(kind, known[0]), 200),
        (target(other, others[0]), 200),
        (target(kind, known[0]), 201),
        (target(other, others[1]), 200),
        (target(kind, known[1]), 200),
        (target(kind, unknown), 404),
        (target(other, others[0]), 500),
        (target(other, others[1]), 200),
        (target(kind, known[1]), 200),
    ];
    let lines: Vec<(i64, &str, u16)> = lines.iter().map(|(p, c)| (t, p.as_str(), *c)).collect();
    append(&s, &lines);
    let tally =
        Tally::run_once(&s.config("", &format!("[report]\nmax_transactions = 3\n{JSON_LOGS}")));
    let logs = tally.logs();
    // The service's own kind is delivered exactly; nothing poisoned a call.
    assert_eq!(hits(&s), expect(&[(known[0], 2), (known[1], 2)]));
    assert!(s.backend.dropped().is_empty(), "{:?}", s.backend.dropped());
    // One credential of the other kind was checked, to learn the mode: no more (each check is an
    // integration error in 3scale).
    let asked = s.backend.authorizations();
    let asked_others: Vec<&String> = asked
        .iter()
        .filter(|a| others.contains(&a.as_str()))
        .collect();
    assert_eq!(asked_others, [&others[0].to_string()], "{asked:?}");
    // The hint, once, naming the service and the mode to set.
    let hint = [
        ("service_id", "42"),
        ("credential_mode", kind),
        ("hint", "*"),
    ];
    assert_eq!(events_with(&logs, "WARN", &hint).len(), 1, "{logs}");
    // The other kind's requests are counted under their own reason, not as unknown credentials.
    let summary = last_summary(&logs);
    assert_eq!(
        number(&summary, "dropped_wrong_credential_kind"),
        4,
        "{summary}"
    );
    assert_eq!(
        number(&summary, "dropped_invalid_credential"),
        1,
        "{summary}"
    );
    assert_eq!(number(&summary, "requests_reported"), 4, "{summary}");
    // Only the unknown credential of the service's kind is said to be unknown: once, masked yet
    // recognisable (an 8-character credential shows its first half).
    let masked = format!("{}…", &unknown[..unknown.len() / 2]);
    let said = events_with(&logs, "WARN", &[("credential", "*")]);
    assert_eq!(said.len(), 1, "{logs}");
    assert!(
        has_fields(&said[0], &[("service_id", "42"), ("credential", &masked)]),
        "{logs}"
    );
    for secret in known.iter().chain(&others).chain([&unknown]) {
        assert!(
            !logs.contains(secret),
            "{secret} is masked in logs:\n{logs}"
        );
    }
}

#[test]
fn a_user_key_service_reports_its_user_keys_and_counts_the_app_ids_apart() {
    a_service_of_one_kind(
        "user_key",
        ["good-key-1234", "other-key-5678"],
        "bad0c0de",
        ["a1b2c3d4", "e5f6a7b8"],
    );
}

#[test]
fn an_app_id_service_reports_its_app_ids_and_counts_the_user_keys_apart() {
    a_service_of_one_kind(
        "app_id",
        ["a1b2c3d4", "e5f6a7b8"],
        "deadbeef",
        ["good-key-1234", "other-key-5678"],
    );
}
