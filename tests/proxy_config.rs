//! The 3scale proxy configuration fetched from the admin portal (pages, token, environment), saved
//! for a start while the portal is down, refreshed while tally runs, and a new version applied
//! from one line on without losing or repeating a line.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use support::backend::Backend;
use support::portal::{Asked, Portal};
use support::{
    append, combined_line, now, poll_until, sample, telemetry_get, telemetry_port, wait_for_health,
    Tally, JSON_LOGS,
};

const WAIT: Duration = Duration::from_secs(30);

/// A service as the admin portal has it: user_key in the query, its Host names, its rules
/// (method, pattern, metric).
fn service(id: u64, hosts: &[&str], rules: &[(&str, &str, &str)]) -> serde_json::Value {
    json!({
        "id": id,
        "backend_version": "1",
        "backend_authentication_type": "service_token",
        "backend_authentication_value": format!("tok-{id}"),
        "proxy": {
            "hosts": hosts,
            "credentials_location": "query",
            "auth_user_key": "user_key",
            "proxy_rules": rules.iter().enumerate().map(|(i, (method, pattern, metric))| json!({
                "http_method": method, "pattern": pattern, "metric_system_name": metric,
                "delta": 1, "last": false, "position": i + 1,
            })).collect::<Vec<_>>(),
        }
    })
}

/// 500 other services (a full first page), then service 42 with `rules`: only a second page has it.
fn account(rules: &[(&str, &str, &str)]) -> Vec<serde_json::Value> {
    let mut list: Vec<_> = (1000..1500)
        .map(|id| service(id, &[], &[("GET", "/", "hits")]))
        .collect();
    list.push(service(42, &["api.example"], rules));
    list
}

/// Usage per metric name over every transaction the backend has.
fn usage_totals(backend: &Backend) -> BTreeMap<String, u64> {
    let mut totals = BTreeMap::new();
    for t in backend.transactions() {
        for (metric, delta) in t.usage {
            *totals.entry(metric).or_default() += delta.parse::<u64>().unwrap();
        }
    }
    totals
}

fn totals(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(m, n)| (m.to_string(), *n)).collect()
}

fn wait_for_transactions(backend: &Backend, n: usize, tally: &Tally) {
    poll_until(
        WAIT,
        &format!("{n} transactions at the backend"),
        || backend.transactions().len() >= n,
        || {
            format!(
                "the backend has {:?}; tally's log:\n{}",
                usage_totals(backend),
                tally.logs()
            )
        },
    );
}

fn wait_for_refreshes(port: u16, result: &str, n: u64, tally: &Tally) {
    let name = format!("tally_proxy_config_refreshes_total{{result=\"{result}\"}}");
    poll_until(
        WAIT,
        &format!("{n} refreshes {result}"),
        || sample(&telemetry_get(port, "/metrics").1, &name) >= n,
        || format!("tally's log:\n{}", tally.logs()),
    );
}

/// A configuration in `dir` following a source (`source`: its keys) from its beginning, with the
/// proxy configuration `proxy` (its keys) refreshed every 200 ms, reports flushed every 100 ms, and
/// telemetry on `port`.
fn write_config(dir: &Path, backend: &Backend, proxy: &str, source: &str, port: u16) -> PathBuf {
    let config = dir.join("tally.toml");
    std::fs::write(
        &config,
        format!(
            "[backend]\nurl = \"{}\"\ntimeout = \"20s\"\n\
             [proxy_config]\n{proxy}\nrefresh = \"200ms\"\n\
             [[sources]]\n{source}\nread_from = \"beginning\"\n\
             [report]\nflush_interval = \"100ms\"\n[state]\ndir = \"{}\"\n\
             [telemetry]\nlisten = \"127.0.0.1:{port}\"\n{JSON_LOGS}",
            backend.url(),
            dir.join("state").display()
        ),
    )
    .unwrap();
    config
}

fn lines(n: usize, target: &str) -> String {
    let t = now() - 5;
    (0..n)
        .map(|_| combined_line(t, "GET", target, 200))
        .collect()
}

/// The portal's configuration, from two pages; a new version applied from the next line on; a
/// malformed one refused with the last good one kept; a start while the portal is down from the
/// saved copy. Every line counted once, with the metrics of the version it was read under.
#[test]
fn the_portals_configuration_is_paged_refreshed_saved_and_applied_from_one_line_on() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(&[("42", "tok-42")]);
    backend.set_metrics(&["metric_a", "metric_b"]);
    let portal = Portal::start("portal-secret");
    portal.set_services(account(&[("GET", "/a", "metric_a")]));
    std::fs::write(dir.path().join("portal-token"), "portal-secret\n").unwrap();
    let log = dir.path().join("access.log");
    let port = telemetry_port();
    let config = write_config(
        dir.path(),
        &backend,
        &format!(
            "url = \"{}\"\naccess_token_file = \"portal-token\"",
            portal.url()
        ),
        &format!("path = \"{}\"\nservice_id = \"42\"", log.display()),
        port,
    );
    append(&log, &lines(5, "/a?user_key=k1"));
    let tally = Tally::start(&config, &[]);
    wait_for_transactions(&backend, 5, &tally);
    let asked = portal.asked();
    let page = |page| Asked {
        environment: "production".into(),
        page,
        per_page: 500,
        version: Some("latest".into()),
    };
    assert_eq!(asked[..2], [page(1), page(2)], "{asked:?}");
    let saved = dir.path().join("state/proxy-config.json");
    let copy = std::fs::read_to_string(&saved).unwrap();
    assert!(
        copy.contains("metric_a") && copy.contains("\"id\":1499"),
        "{copy}"
    );

    // A new version: the lines read after it count its metric.
    portal.set_services(account(&[("GET", "/a", "metric_b")]));
    wait_for_refreshes(port, "applied", 1, &tally);
    append(&log, &lines(7, "/a?user_key=k1"));
    wait_for_transactions(&backend, 12, &tally);
    assert_eq!(
        usage_totals(&backend),
        totals(&[("metric_a", 5), ("metric_b", 7)])
    );
    poll_until(
        WAIT,
        "the new version saved",
        || std::fs::read_to_string(&saved).is_ok_and(|c| c.contains("metric_b")),
        String::new,
    );

    // A malformed answer: counted, shown, and the last good version stays.
    portal.set_malformed(r#"{"proxy_configs": 42}"#);
    wait_for_refreshes(port, "failed", 1, &tally);
    let health = wait_for_health(
        port,
        200,
        "warning: proxy_config: the last refresh failed",
        WAIT,
    );
    assert!(health.starts_with("ok\n"), "{health}");
    append(&log, &lines(3, "/a?user_key=k1"));
    wait_for_transactions(&backend, 15, &tally);
    assert_eq!(
        usage_totals(&backend),
        totals(&[("metric_a", 5), ("metric_b", 10)])
    );
    tally.stop(WAIT);

    // The portal down at start: the saved copy (the last good version) is used.
    portal.set_down(true);
    let tally = Tally::start(&config, &[]);
    tally.wait_for_log("using the copy saved at", WAIT);
    append(&log, &lines(2, "/a?user_key=k1"));
    wait_for_transactions(&backend, 17, &tally);
    assert_eq!(
        usage_totals(&backend),
        totals(&[("metric_a", 5), ("metric_b", 12)])
    );
    wait_for_health(port, 200, "warning: proxy_config: ", WAIT);
    // Back, with the version in use: nothing to apply, nothing to warn of.
    portal.set_down(false);
    portal.set_services(account(&[("GET", "/a", "metric_b")]));
    wait_for_refreshes(port, "unchanged", 1, &tally);
    wait_for_health(port, 200, "ok\n", WAIT);
    assert_eq!(telemetry_get(port, "/healthz").1, "ok\n");
    let logs = tally.stop(WAIT);
    assert_eq!(backend.transactions().len(), 17, "{logs}");
    assert!(backend.refusals().is_empty(), "{:?}", backend.refusals());
    assert!(!logs.contains("portal-secret"), "{logs}");
}

/// Two services routed by Host from a proxy configuration file; a new version of the file moves a
/// Host from one to the other: both switch at the same line, and every line counts once. A version
/// that adds a service restarts the pipeline in order, and the new service gets its lines.
#[test]
fn a_host_moved_between_services_switches_at_one_line_for_both() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(&[("1", "tok-1"), ("2", "tok-2"), ("3", "tok-3")]);
    let write_proxy = |services: Vec<serde_json::Value>| {
        let temp = dir.path().join("proxy.json.tmp");
        std::fs::write(&temp, json!({ "services": services }).to_string()).unwrap();
        std::fs::rename(&temp, dir.path().join("proxy.json")).unwrap();
    };
    let rules = [("ANY", "/", "hits")];
    write_proxy(vec![
        service(1, &["a.example", "c.example"], &rules),
        service(2, &["b.example"], &rules),
    ]);
    let log = dir.path().join("access.log");
    let port = telemetry_port();
    let config = write_config(
        dir.path(),
        &backend,
        "file = \"proxy.json\"",
        &format!(
            "path = \"{}\"\nlog_format = '$host [$time_local] \"$request\" $status'",
            log.display()
        ),
        port,
    );
    let t = support::time_local(now() - 5);
    let at = |host: &str, n: usize| -> String {
        (0..n)
            .map(|_| format!("{host} [{t}] \"GET /?user_key=k HTTP/1.1\" 200\n"))
            .collect()
    };
    append(
        &log,
        &[at("a.example", 2), at("b.example", 2), at("c.example", 3)].concat(),
    );
    let tally = Tally::start(&config, &[]);
    wait_for_transactions(&backend, 7, &tally);
    write_proxy(vec![
        service(1, &["a.example"], &rules),
        service(2, &["b.example", "c.example"], &rules),
    ]);
    wait_for_refreshes(port, "applied", 1, &tally);
    append(&log, &[at("c.example", 4), at("a.example", 1)].concat());
    wait_for_transactions(&backend, 12, &tally);
    let count = |s: &str| backend.transactions_of(s).len();
    assert_eq!((count("1"), count("2")), (6, 6), "{}", tally.logs());

    // A third service: the pipeline stops in order and starts again with it.
    write_proxy(vec![
        service(1, &["a.example"], &rules),
        service(2, &["b.example", "c.example"], &rules),
        service(3, &["d.example"], &rules),
    ]);
    wait_for_refreshes(port, "restarted", 1, &tally);
    tally.wait_for_log("starting again with the new configuration", WAIT);
    tally.wait_for_logs("tally started", 2, WAIT);
    append(&log, &[at("c.example", 1), at("d.example", 2)].concat());
    wait_for_transactions(&backend, 15, &tally);
    let logs = tally.stop(WAIT);
    assert_eq!((count("1"), count("2"), count("3")), (6, 7, 2), "{logs}");
    // Nothing read again: every line was accepted before the restart.
    assert!(!logs.contains("sent again"), "{logs}");
    assert_eq!(backend.transactions().len(), 15, "{logs}");
}

/// `tally check` against the portal: staging is the API's `sandbox`; a refused token, with no
/// saved copy, is a configuration error that says so and never shows the token.
#[test]
fn check_fetches_from_the_portal_and_explains_a_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let portal = Portal::start("right-token");
    portal.set_services(vec![service(42, &["api.example"], &[("GET", "/", "hits")])]);
    let config = |token: &str| {
        let path = dir.path().join("tally.toml");
        std::fs::write(
            &path,
            format!(
                "[backend]\n[proxy_config]\nurl = \"{}\"\naccess_token = \"{token}\"\nenvironment = \"staging\"\n\
                 [[sources]]\npath = \"access.log\"\nservice_id = \"42\"\n[state]\ndir = \"state\"\n",
                portal.url()
            ),
        )
        .unwrap();
        path
    };
    let check = |path: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["check", "--config"])
            .arg(path)
            .output()
            .unwrap()
    };
    let ok = check(&config("right-token"));
    let out = String::from_utf8_lossy(&ok.stdout).to_string();
    assert!(
        ok.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(out.contains("environment = \"staging\""), "{out}");
    assert!(!out.contains("right-token"), "{out}");
    assert_eq!(portal.asked()[0].environment, "sandbox");

    let refused = check(&config("wrong-token-123"));
    let err = String::from_utf8_lossy(&refused.stderr).to_string();
    assert_eq!(refused.status.code(), Some(2), "{err}");
    assert!(
        err.contains("proxy_config.url")
            && err.contains("HTTP 403")
            && err.contains("the access token was refused")
            && err.contains("no saved copy"),
        "{err}"
    );
    assert!(!err.contains("wrong-token-123"), "{err}");
}
