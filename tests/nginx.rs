//! End to end with a real NGINX (Debian's package) serving on loopback and writing a real access log.
//!
//! Skipped with a message when nginx is not installed, unless TALLY_REQUIRE_NGINX is set (CI sets it),
//! in which case a missing nginx fails the test.

mod support;

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::backend::Backend;
use support::nginx::{nginx_or_skip, Nginx};
use support::{now, write_config, write_config_with, Tally};

const WAIT: Duration = Duration::from_secs(30);

/// NGINX serving the API, the test backend, and tally following NGINX's access log.
struct Stack {
    backend: Backend,
    nginx: Nginx,
    tally: Tally,
    dir: tempfile::TempDir,
}

/// The stack, tally configured with `extra` tables; None when nginx is missing (and may be).
fn stack(test: &str, extra: &str) -> Option<Stack> {
    let binary = nginx_or_skip(test)?;
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(&[("42", "tok")]);
    let nginx = Nginx::start(&binary, dir.path());
    let config = write_config(
        dir.path(),
        &backend.url(),
        "tok",
        &[(&nginx.access_log, "42")],
        extra,
    );
    let tally = Tally::start(&config, &[]);
    tally.wait_for_log("following file", WAIT);
    Some(Stack {
        backend,
        nginx,
        tally,
        dir,
    })
}

#[test]
fn nginx_traffic_reaches_3scale_with_its_response_codes() {
    let Some(Stack {
        backend,
        nginx,
        mut tally,
        dir: _dir,
    }) = stack(
        "nginx_traffic_reaches_3scale_with_its_response_codes",
        "[report]\nflush_interval = \"200ms\"\n",
    )
    else {
        return;
    };

    // (target, expected status, expected credential or None)
    let requests: Vec<(&str, u16, Option<&str>)> = vec![
        ("/ok?user_key=alpha", 200, Some("alpha")),
        ("/ok?user_key=alpha&page=2", 200, Some("alpha")),
        ("/created?user_key=beta", 201, Some("beta")),
        ("/nothing-here?user_key=alpha", 404, Some("alpha")),
        (
            "/forbidden?app_id=mobile&app_key=s3cr3t",
            403,
            Some("mobile"),
        ),
        ("/error?app_id=mobile", 500, Some("mobile")),
        ("/unavailable?user_key=beta", 503, Some("beta")),
        ("/ok", 200, None),
        ("/ok?foo=bar", 200, None),
        ("/ok?app_id=web%20app", 200, Some("web app")),
        ("/error?user_key=gamma", 500, Some("gamma")),
        ("/unavailable?user_key=gamma", 503, Some("gamma")),
        ("/created?app_id=mobile", 201, Some("mobile")),
        ("/forbidden", 403, None),
    ];
    let mut expected = Vec::new();
    for (target, status, credential) in &requests {
        let before = now();
        assert_eq!(nginx.get(target), *status, "{target}");
        let after = now();
        if let Some(c) = credential {
            expected.push((c.to_string(), status.to_string(), before, after));
        }
    }
    backend.wait_until(WAIT, "every credentialed request", |b| {
        b.transactions().len() >= expected.len()
    });
    tally.signal("TERM");
    assert!(tally.wait(WAIT).success(), "{}", tally.logs());

    let got = backend.transactions();
    assert_eq!(got.len(), expected.len(), "{got:?}");
    // Calls under way together may arrive in any order: match each transaction to a request.
    for t in &got {
        assert_eq!(t.hits(), 1);
        let at = expected
            .iter()
            .position(|(credential, code, before, after)| {
                &t.credential() == credential
                    && t.code.as_deref() == Some(code.as_str())
                    && (*before..=*after).contains(&t.timestamp())
            });
        let Some(at) = at else {
            panic!("no request matches {t:?}; left: {expected:?}");
        };
        expected.remove(at);
    }
    assert!(expected.is_empty());
    assert!(backend.refusals().is_empty());
    let logs = tally.logs();
    assert!(logs.contains("skipped_no_credential=3"), "{logs}");
    assert!(logs.contains("skipped_malformed=0"), "{logs}");
    assert!(
        logs.contains(&format!("lines_read={}", requests.len())),
        "{logs}"
    );
}

/// logrotate's default with NGINX: rename the log, NGINX writes on to the renamed file until it gets
/// USR1 (`nginx -s reopen`), then to a new file. Requests in all three phases arrive, once.
#[test]
fn nginx_log_rotation_with_reopen_loses_and_duplicates_nothing() {
    let Some(Stack {
        backend,
        nginx,
        mut tally,
        dir,
    }) = stack(
        "nginx_log_rotation_with_reopen_loses_and_duplicates_nothing",
        "[report]\nflush_interval = \"200ms\"\n[tail]\nrotate_grace = \"2s\"\n",
    )
    else {
        return;
    };
    let mut sent = 0;
    let mut send = |n: usize| {
        for _ in 0..n {
            assert_eq!(nginx.get(&format!("/ok?user_key=k{sent}")), 200);
            sent += 1;
        }
    };
    send(30);
    std::fs::rename(&nginx.access_log, dir.path().join("access.log.1")).unwrap();
    send(20); // still written to the renamed file
    let reopened = Command::new("kill")
        .args(["-USR1", &nginx.child.id().to_string()])
        .status()
        .unwrap();
    assert!(reopened.success());
    let deadline = Instant::now() + WAIT;
    while !nginx.access_log.exists() {
        assert!(Instant::now() < deadline, "nginx did not reopen its log");
        std::thread::sleep(Duration::from_millis(20));
    }
    send(25);
    backend.wait_until(WAIT, "75 transactions", |b| b.transactions().len() >= 75);
    tally.signal("TERM");
    assert!(tally.wait(WAIT).success(), "{}", tally.logs());
    let keys = backend.credentials();
    let mut expected: Vec<String> = (0..75).map(|i| format!("k{i}")).collect();
    expected.sort();
    assert_eq!(keys, expected);
    assert!(tally.logs().contains("rotations=1"), "{}", tally.logs());
}

/// tally as a native sidecar: Kubernetes stops the API's NGINX first and sends tally SIGTERM only
/// once NGINX has exited. The requests NGINX served last, which tally had not read yet, are read at
/// the stop and reported before tally exits. (Here tally has no file events and polls once an
/// hour, so it reads NGINX's lines only at the stop: without that, none would arrive.)
#[test]
fn at_a_stop_after_nginx_the_last_requests_are_read_and_reported() {
    let Some(Stack {
        backend,
        nginx,
        mut tally,
        dir: _dir,
    }) = stack(
        "at_a_stop_after_nginx_the_last_requests_are_read_and_reported",
        "[report]\nflush_interval = \"200ms\"\n[tail]\nwatch = false\npoll_interval = \"1h\"\n",
    )
    else {
        return;
    };
    for i in 0..25 {
        assert_eq!(nginx.get(&format!("/ok?user_key=k{i}")), 200);
    }
    let written = std::fs::read_to_string(&nginx.access_log).unwrap();
    assert_eq!(written.lines().count(), 25);
    // NGINX stops (its preStop and graceful quit), then tally gets its SIGTERM.
    drop(nginx);
    assert!(
        backend.transactions().is_empty(),
        "tally read before the stop"
    );
    tally.signal("TERM");
    assert!(tally.wait(WAIT).success(), "{}", tally.logs());
    let mut expected: Vec<String> = (0..25).map(|i| format!("k{i}")).collect();
    expected.sort();
    assert_eq!(backend.credentials(), expected, "{}", tally.logs());
}

/// A backend route behind TLS with a private CA (on-premises 3scale): NGINX terminates TLS in front
/// of the test backend. With `backend.ca_file` the reports arrive; without it, tally refuses the
/// certificate, says so, and keeps the data.
#[test]
fn a_tls_backend_with_a_private_ca() {
    let Some(binary) = nginx_or_skip("a_tls_backend_with_a_private_ca") else {
        return;
    };
    if Command::new("openssl").arg("version").output().is_err() {
        assert!(
            std::env::var_os("TALLY_REQUIRE_NGINX").is_none(),
            "TALLY_REQUIRE_NGINX is set but openssl is not installed"
        );
        eprintln!("SKIPPED a_tls_backend_with_a_private_ca: openssl is not installed (apt-get install openssl)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(d)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=tally test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(
        d.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    ]);
    let backend = Backend::start(&[("42", "tok")]);
    let proxy = Nginx::start_with(
        &binary,
        d,
        &format!(
            "listen 127.0.0.1:{{port}} ssl;
        ssl_certificate {0}/server.pem;
        ssl_certificate_key {0}/server.key;
        location / {{ proxy_pass {1}; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}",
            d.display(),
            backend.url()
        ),
    );
    let log = d.join("api.log");
    std::fs::write(
        &log,
        support::combined_line(now(), "GET", "/?user_key=over-tls", 200),
    )
    .unwrap();
    let url = format!("https://127.0.0.1:{}", proxy.port);

    // Without the CA: refused, said, retried; nothing lost.
    let untrusted = write_config(
        d,
        &url,
        "tok",
        &[(&log, "42")],
        "[report]\nshutdown_grace = \"1s\"\n",
    );
    let mut tally = Tally::start(&untrusted, &[]);
    tally.wait_for_log("certificate", WAIT);
    tally.signal("TERM");
    assert!(tally.wait(WAIT).success(), "{}", tally.logs());
    assert!(backend.transactions().is_empty());

    // With it: delivered.
    let trusted = write_config_with(
        d,
        &url,
        "tok",
        &format!("ca_file = \"{}/ca.pem\"\n", d.display()),
        &[(&log, "42")],
        "",
    );
    Tally::run_once(&trusted);
    let got: Vec<String> = backend
        .transactions()
        .iter()
        .map(|t| t.credential())
        .collect();
    assert_eq!(got, vec!["over-tls"]);
}

/// A request of the tests with their own `log_format`: its target and headers, the status NGINX
/// answers, and the credential tally must report (kind and value), if any.
type Call<'a> = (
    &'a str,
    Vec<(&'a str, &'a str)>,
    u16,
    Option<(&'a str, &'a str)>,
);

/// NGINX logging with `log_format` (named `custom`), tally following it with `source` keys (its
/// format and credentials); every call is sent, then the backend must hold exactly the transactions
/// of the calls with a credential: kind, value, code, and the second of the request.
fn custom_format(test: &str, log_format: &str, source: &str, calls: &[Call<'_>]) {
    let Some(binary) = nginx_or_skip(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(&[("42", "tok")]);
    let nginx = Nginx::start_logging(
        &binary,
        dir.path(),
        "listen 127.0.0.1:{port};
        location /ok { return 200 \"ok\\n\"; }
        location /created { return 201 \"created\\n\"; }
        location /error { return 500; }
        location / { return 404; }",
        "custom",
        log_format,
    );
    let config = write_config(
        dir.path(),
        &backend.url(),
        "tok",
        &[(&nginx.access_log, "42")],
        &format!("{source}\n[report]\nflush_interval = \"200ms\"\n"),
    );
    let mut tally = Tally::start(&config, &[]);
    tally.wait_for_log("following file", WAIT);
    let mut expected = Vec::new();
    for (target, headers, status, credential) in calls {
        let before = now();
        assert_eq!(nginx.get_with(target, headers), *status, "{target}");
        let after = now();
        if let Some((kind, value)) = credential {
            expected.push((*kind, value.to_string(), status.to_string(), before, after));
        }
    }
    backend.wait_until(WAIT, "every credentialed request", |b| {
        b.transactions().len() >= expected.len()
    });
    tally.signal("TERM");
    assert!(tally.wait(WAIT).success(), "{}", tally.logs());
    let got = backend.transactions();
    assert_eq!(got.len(), expected.len(), "{got:?}");
    for t in &got {
        let (kind, value) = match (&t.user_key, &t.app_id) {
            (Some(k), None) => ("user_key", k.clone()),
            (None, Some(id)) => ("app_id", id.clone()),
            _ => panic!("{t:?}"),
        };
        let at = expected.iter().position(|(k, v, code, before, after)| {
            *k == kind
                && *v == value
                && t.code.as_deref() == Some(code.as_str())
                && (*before..=*after).contains(&t.timestamp())
        });
        let Some(at) = at else {
            panic!("no request matches {t:?}; left: {expected:?}");
        };
        expected.remove(at);
    }
    assert!(backend.refusals().is_empty());
    let logs = tally.logs();
    let without = calls.iter().filter(|c| c.3.is_none()).count();
    assert!(
        logs.contains(&format!("skipped_no_credential={without}")),
        "{logs}"
    );
    assert!(logs.contains("skipped_malformed=0"), "{logs}");
}

/// A `main`-style log_format with the key in a request header (`$http_x_api_key`), NGINX's default
/// escaping (`\x22` for a quote).
#[test]
fn a_custom_log_format_with_credentials_in_headers() {
    let key = |v| vec![("X-Api-Key", v)];
    custom_format(
        "a_custom_log_format_with_credentials_in_headers",
        r#"log_format custom '$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent "$http_referer" "$http_user_agent" $request_time $http_x_api_key $http_x_app_id';"#,
        r#"log_format = '$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent "$http_referer" "$http_user_agent" $request_time $http_x_api_key $http_x_app_id'
[sources.credentials]
location = "headers"
user_key = "X-Api-Key"
app_id = "X-App-Id""#,
        &[
            ("/ok", key("alpha"), 200, Some(("user_key", "alpha"))),
            (
                "/created?user_key=ignored",
                key("alpha"),
                201,
                Some(("user_key", "alpha")),
            ),
            (
                "/error",
                key("b\"eta+%41"),
                500,
                Some(("user_key", "b\"eta+%41")),
            ),
            (
                "/missing",
                vec![("X-App-Id", "mobile")],
                404,
                Some(("app_id", "mobile")),
            ),
            ("/ok?user_key=not-a-header", vec![], 200, None),
            ("/ok", vec![("X-Other", "x")], 200, None),
        ],
    );
}

/// A JSON-shaped log_format with `escape=json`, ISO 8601 times, the request's parts one by one and
/// Basic credentials in the Authorization header.
#[test]
fn a_json_escaped_log_format_with_basic_credentials() {
    let basic = |v| vec![("Authorization", v)];
    custom_format(
        "a_json_escaped_log_format_with_basic_credentials",
        r#"log_format custom escape=json '{"time":"$time_iso8601","method":"$request_method","uri":"$request_uri","status":$status,"auth":"$http_authorization","ua":"$http_user_agent"}';"#,
        r#"log_format = '{"time":"$time_iso8601","method":"$request_method","uri":"$request_uri","status":$status,"auth":"$http_authorization","ua":"$http_user_agent"}'
log_escape = "json"
[sources.credentials]
location = "authorization"
mode = "user_key""#,
        &[
            // base64("alpha:x"), base64("be\"ta:pw")
            (
                "/ok",
                basic("Basic YWxwaGE6eA=="),
                200,
                Some(("user_key", "alpha")),
            ),
            (
                "/created",
                basic("Basic YmUidGE6cHc="),
                201,
                Some(("user_key", "be\"ta")),
            ),
            (
                "/error?q=1",
                basic("Basic YWxwaGE6eA=="),
                500,
                Some(("user_key", "alpha")),
            ),
            ("/ok", basic("Bearer eyJhbGciOi"), 200, None),
            ("/ok", vec![], 200, None),
        ],
    );
}

/// A pipe-separated log_format read with `format = "regex"`: its time as `time_format` says, the
/// app_id from a request header.
#[test]
fn a_regex_format_with_a_time_format_and_an_app_id_header() {
    let app = |v| vec![("X-App-Id", v)];
    custom_format(
        "a_regex_format_with_a_time_format_and_an_app_id_header",
        r#"log_format custom '$remote_addr | $time_local | $request_method $request_uri | $status | app=$http_x_app_id | $request_time';"#,
        r#"format = "regex"
regex = '^\S+ \| (?P<time>[^|]+) \| (?P<method>[A-Z]+) (?P<uri>\S+) \| (?P<status>\d{3}) \| app=(?P<app_id>.*?) \| \S+$'
time_format = "%d/%b/%Y:%H:%M:%S %z"
[sources.credentials]
location = "headers"
mode = "app_id"
app_id = "X-App-Id""#,
        &[
            ("/ok", app("mobile"), 200, Some(("app_id", "mobile"))),
            ("/created?x=1", app("web"), 201, Some(("app_id", "web"))),
            ("/error", app("we b"), 500, Some(("app_id", "we b"))),
            ("/missing", app("mobile"), 404, Some(("app_id", "mobile"))),
            ("/ok?app_id=not-a-header", vec![], 200, None),
        ],
    );
}

/// NGINX writing JSON lines (`escape=json`), read with `format = "json"` and `[sources.fields]`:
/// epoch milliseconds, the credential in the `uri`'s query string.
#[test]
fn json_lines_with_fields_and_query_credentials() {
    custom_format(
        "json_lines_with_fields_and_query_credentials",
        r#"log_format custom escape=json '{"ts":$msec,"req":{"method":"$request_method","uri":"$request_uri"},"code":"$status","ua":"$http_user_agent"}';"#,
        r#"format = "json"
[sources.fields]
time = "ts"
status = "code"
method = "req.method"
uri = "req.uri""#,
        &[
            (
                "/ok?user_key=alpha",
                vec![],
                200,
                Some(("user_key", "alpha")),
            ),
            (
                "/created?app_id=app%201&app_key=k",
                vec![],
                201,
                Some(("app_id", "app 1")),
            ),
            (
                "/error?user_key=b%22eta",
                vec![],
                500,
                Some(("user_key", "b\"eta")),
            ),
            ("/ok?page=2", vec![], 200, None),
        ],
    );
}

/// One NGINX, two server names, each a 3scale service of the proxy configuration with its own token,
/// credentials (query for one, a header for the other) and rules; the lines go to their service by
/// Host. One service's backend is down for a while: the other's requests arrive meanwhile, and both
/// are exact at the end, per service, application, metric and code.
#[test]
fn two_server_names_two_services_routed_by_host() {
    let Some(binary) = nginx_or_skip("two_server_names_two_services_routed_by_host") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(&[("1", "t1"), ("2", "t2")]);
    backend.set_metrics(&["search"]);
    std::fs::write(
        dir.path().join("proxy.json"),
        format!(
            r#"{{"proxy_configs":[
              {{"proxy_config":{{"content":{{"id":1,"backend_version":"1","backend_authentication_type":"service_token","backend_authentication_value":"t1",
                "proxy":{{"hosts":["shop.test"],"credentials_location":"query","backend":{{"endpoint":"{url}"}},
                "proxy_rules":[{{"http_method":"GET","pattern":"/search","metric_system_name":"search","delta":1,"last":false}},
                               {{"http_method":"ANY","pattern":"/","metric_system_name":"hits","delta":1,"last":false}}]}}}}}}}},
              {{"proxy_config":{{"content":{{"id":2,"backend_version":"2","backend_authentication_type":"service_token","backend_authentication_value":"t2",
                "proxy":{{"hosts":["api.test"],"credentials_location":"headers","auth_app_id":"X-App-Id"}}}}}}}}]}}"#,
            url = backend.url()
        ),
    )
    .unwrap();
    let nginx = Nginx::start_logging(
        &binary,
        dir.path(),
        "listen 127.0.0.1:{port};
        server_name shop.test api.test;
        location /missing { return 404; }
        location / { return 200 \"ok\\n\"; }",
        "custom",
        r#"log_format custom '$host [$time_local] "$request" $status $http_x_app_id';"#,
    );
    let config = dir.path().join("tally.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy_config]\nfile = \"proxy.json\"\n[backend]\n[[sources]]\npath = \"{}\"\nlog_format = '$host [$time_local] \"$request\" $status $http_x_app_id'\n[report]\nflush_interval = \"200ms\"\n[state]\ndir = \"{}\"\n",
            nginx.access_log.display(),
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    backend.set_down("2", true);
    let mut tally = Tally::start(&config, &[]);
    tally.wait_for_log("following file", WAIT);
    let app = |id| vec![("X-App-Id", id)];
    for (host, target, headers, status) in [
        ("shop.test", "/search?q=x&user_key=k1", vec![], 200),
        ("shop.test", "/cart?user_key=k1", vec![], 200),
        ("shop.test", "/missing?user_key=k2", vec![], 404),
        ("api.test", "/v1/orders", app("mobile"), 200),
        ("api.test", "/missing", app("mobile"), 404),
        ("api.test", "/v1/orders", app("web"), 200),
        ("other.test", "/?user_key=k1", vec![], 200),
    ] {
        assert_eq!(
            nginx.get_from(host, target, &headers),
            status,
            "{host}{target}"
        );
    }
    // Service 1's requests arrive while service 2's backend is down.
    backend.wait_until(WAIT, "service 1's three requests", |b| {
        b.transactions_of("1").len() >= 3
    });
    assert!(backend.transactions_of("2").is_empty());
    backend.set_down("2", false);
    backend.wait_until(WAIT, "service 2's three requests", |b| {
        b.transactions_of("2").len() >= 3
    });
    tally.signal("TERM");
    assert!(tally.wait(WAIT).success(), "{}", tally.logs());
    let of = |service: &str| -> Vec<(String, String, String)> {
        let mut list: Vec<(String, String, String)> = backend
            .transactions_of(service)
            .into_iter()
            .map(|t| {
                let usage: Vec<String> = t.usage.iter().map(|(m, d)| format!("{m}={d}")).collect();
                (
                    t.credential(),
                    usage.join("&"),
                    t.code.clone().unwrap_or_default(),
                )
            })
            .collect();
        list.sort();
        list
    };
    let row = |a: &str, u: &str, c: &str| (a.to_string(), u.to_string(), c.to_string());
    assert_eq!(
        of("1"),
        vec![
            row("k1", "hits=1", "200"),
            row("k1", "hits=1&search=1", "200"),
            row("k2", "hits=1", "404"),
        ]
    );
    assert_eq!(
        of("2"),
        vec![
            row("mobile", "hits=1", "200"),
            row("mobile", "hits=1", "404"),
            row("web", "hits=1", "200"),
        ]
    );
    assert!(
        backend.dropped().is_empty(),
        "{:?}",
        backend.dropped().len()
    );
    // Only the outage's answers were refusals (nothing was dropped for a bad metric or key).
    assert!(
        backend.refusals().iter().all(|r| r.status == 503),
        "{:?}",
        backend.refusals()
    );
    let logs = tally.logs();
    assert!(logs.contains("skipped_unknown_host=1"), "{logs}");
    assert!(logs.contains("lines_read=7"), "{logs}");
}

/// Debian's Chromium, or None (and a message) when the test should be skipped; CI installs it and
/// sets TALLY_REQUIRE_CHROMIUM, which makes a missing one a failure.
fn chromium_or_skip(test: &str) -> Option<PathBuf> {
    support::program_or_skip(
        test,
        "chromium",
        &["/usr/bin/chromium", "/usr/bin/chromium-browser"],
        "TALLY_REQUIRE_CHROMIUM",
    )
}

/// Runs headless Chromium on `url` with `args` (no network beyond loopback: a dead proxy for
/// everything else); returns its stdout. Killed past a minute.
fn chromium(binary: &Path, profile: &Path, url: &str, args: &[&str]) -> String {
    let mut child = Command::new(binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--proxy-server=http://127.0.0.1:9",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start chromium");
    let mut out = String::new();
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().expect("wait for chromium").is_some() {
            break;
        }
        if Instant::now() > deadline {
            // Its renderer and GPU processes are in its group.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            panic!("chromium did not finish within a minute on {url}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Helpers it started may outlive it briefly: none may be left behind.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    reader.join().expect("chromium's output")
}

/// The Response codes page in a real browser (headless Chromium, no internet), against tally fed by
/// a real NGINX: the chart is drawn, the codes table holds the exact counts, following a code's link
/// (a click) lists its calls, credentials masked. Screenshots go to target/tmp (a CI artifact).
#[test]
fn the_response_codes_page_in_a_real_browser() {
    let test = "the_response_codes_page_in_a_real_browser";
    let Some(browser) = chromium_or_skip(test) else {
        return;
    };
    let port = support::telemetry_port();
    let Some(Stack {
        nginx,
        tally,
        dir,
        backend: _backend,
    }) = stack(
        test,
        &format!("[telemetry]\nlisten = \"127.0.0.1:{port}\"\ncalls_per_code = 10\n"),
    )
    else {
        return;
    };
    let requests: [(&str, usize, u16); 5] = [
        ("/ok?user_key=alpha-key-000000001", 5, 200),
        ("/created?user_key=beta-key-0000000002", 2, 201),
        ("/nothing-here?user_key=alpha-key-000000001", 3, 404),
        ("/ok", 2, 200),
        ("/error?app_id=mobile-app-000003", 1, 500),
    ];
    let mut total = 0;
    for (target, n, status) in requests {
        for _ in 0..n {
            assert_eq!(nginx.get(target), status, "{target}");
            total += 1;
        }
    }
    support::poll_until(
        WAIT,
        "tally to read every line",
        || {
            support::telemetry_try_get(port, "/metrics").is_ok_and(|(_, m)| {
                support::metric(&m, "tally_lines_read_total") == Some(total as f64)
            })
        },
        || tally.logs(),
    );
    let profile = dir.path().join("chromium");
    let base = format!("http://127.0.0.1:{port}");
    let dom = chromium(
        &browser,
        &profile,
        &format!("{base}/?period=15m"),
        &["--dump-dom"],
    );
    assert!(
        dom.contains("<svg") && dom.contains("class=\"bar c2xx\""),
        "no chart: {dom}"
    );
    assert!(
        dom.contains("class=\"bar c4xx\"") && dom.contains("class=\"bar c5xx\""),
        "{dom}"
    );
    for (code, count) in [(200, 7), (201, 2), (404, 3), (500, 1)] {
        let row = format!("<tr data-code=\"{code}\"><td><a href=\"/?period=15m&amp;code={code}\">{code}</a></td><td class=\"n\">{count}</td>");
        assert!(dom.contains(&row), "no {row} in {dom}");
    }
    // The click: the 404 row's link, as the browser resolves it.
    let href = dom
        .split("<tr data-code=\"404\"><td><a href=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the 404 row's link")
        .replace("&amp;", "&");
    let calls = chromium(
        &browser,
        &profile,
        &format!("{base}{href}"),
        &["--dump-dom"],
    );
    assert!(calls.contains("Latest calls with code 404"), "{calls}");
    let rows = calls.matches("<td><code>/nothing-here</code></td>").count();
    assert_eq!(rows, 3, "{calls}");
    assert!(calls.contains("alph…0001"), "{calls}");
    for secret in [
        "alpha-key-000000001",
        "beta-key-0000000002",
        "mobile-app-000003",
    ] {
        assert!(
            !dom.contains(secret) && !calls.contains(secret),
            "{secret} shown"
        );
    }
    // Screenshots, desktop and phone width.
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR"));
    for (name, size) in [
        ("response-codes.png", "1200,1000"),
        ("response-codes-phone.png", "390,844"),
    ] {
        let path = shots.join(name);
        let _ = std::fs::remove_file(&path);
        chromium(
            &browser,
            &profile,
            &format!("{base}{href}"),
            &[
                &format!("--screenshot={}", path.display()),
                &format!("--window-size={size}"),
                "--hide-scrollbars",
            ],
        );
        let png = std::fs::read(&path).unwrap_or_default();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{name}: {} bytes",
            png.len()
        );
    }
    drop(tally);
}
