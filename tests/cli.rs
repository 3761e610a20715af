//! `tally check` and `tally run --dry-run`, as a user runs them.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

#[path = "support/jwt.rs"]
mod jwt;
use jwt::jwt;

/// Runs the command to its end, like `output()`, but kills it and fails the test if it has not
/// ended within a minute: a hung tally must not hang the test run.
fn run(command: &mut Command) -> Output {
    run_with_stdin(command, Stdio::null())
}

/// [`run`], with `stdin` as the command's standard input.
fn run_with_stdin(command: &mut Command, stdin: Stdio) -> Output {
    use std::io::Read;
    let mut child = command
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the command");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not end within a minute");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

fn tally(args: &[&str]) -> (i32, String, String) {
    let out = run(Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .env_remove("RUST_LOG"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn check_prints_the_effective_config_with_the_secret_masked() {
    let (code, out, err) = tally(&["check", "--config", &example("example.toml")]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("service_token = \"<secret given in the configuration, 28 chars>\""),
        "{out}"
    );
    assert!(!out.contains("example-token-not-a-real-one"), "{out}");
    assert!(
        out.contains("flush_interval = \"1s\"") && out.contains("max_transactions = 1000"),
        "{out}"
    );
    assert!(
        out.contains(&format!("path = \"{}\"", example("example-access.log"))),
        "{out}"
    );
}

#[test]
fn check_accepts_the_reference_config() {
    let out = run(Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["check", "--config", &example("tally.toml")])
        .env("THREESCALE_SERVICE_TOKEN", "reference-token"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("from environment variable THREESCALE_SERVICE_TOKEN, 15 chars"),
        "{stdout}"
    );
    assert!(!stdout.contains("reference-token"));
}

#[test]
fn check_names_the_bad_key_and_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[backend]\nservice_token = \"t\"\ntimeout = \"ten seconds\"\n[[sources]]\npath = \"a\"\nservice_id = \"1\"\n",
            &["line 3", "timeout", "not a duration"][..],
        ),
        (
            "[backend]\nservice_token = \"t\"\n[[sources]]\npath = \"a\"\nservice_id = \"1\"\nread_from = \"start\"\n",
            &["line 6", "start", "beginning", "end"][..],
        ),
        (
            "[backend]\nservice_token = \"t\"\n[[sources]]\npath = \"a\"\nservice_id = \"1\"\n[report]\nmax_transactions = 2000\n",
            &["line 7", "at most 1023"][..],
        ),
        (
            "[backend]\nservice_token_file = \"missing-token-file\"\n[[sources]]\npath = \"a\"\nservice_id = \"1\"\n",
            &["tally.toml:2: backend.service_token_file: cannot read", "missing-token-file"][..],
        ),
        (
            "[backend]\nurl = \"ftp://x\"\nservice_token = \"t\"\n[[sources]]\npath = \"a\"\nservice_id = \"1\"\n",
            &["tally.toml:2: backend.url"][..],
        ),
        ("[backend\n", &["line 1", "unclosed table"][..]),
        (
            "[backend]\nservice_token = \"super-secret-value\"\n[[sources]]\npath = \"a\"\n",
            &["sources[0].service_id: give the service id, or a [proxy_config]"][..],
        ),
        (
            "[backend]\nservice_token = \"t\"\n[[sources]]\npath = \"a\"\nservice_id = \"1\"\n[telemetry]\nlisten = \"everywhere\"\n",
            &["tally.toml:7: telemetry.listen", "not an address:port"][..],
        ),
        (
            "[backend]\nservice_token = \"t\"\n[[sources]]\npath = \"a\"\nservice_id = \"1\"\n[report]\nconcurrency = 0\n",
            &["tally.toml:7: report.concurrency"][..],
        ),
        (
            "[backend]\nservice_token = \"t\"\nca_file = \"tally.toml\"\n[[sources]]\npath = \"a\"\nservice_id = \"1\"\n",
            &["tally.toml:3: backend.ca_file", "no PEM certificate"][..],
        ),
        (
            "[backend]\nservice_token = \"t\"\n[[sources]]\npath = \"a\"\nservice_id = \"1\"\n[[sources]]\npath = \"b\"\nservice_id = \"1\"\nservice_token = \"other\"\n",
            &["sources[1]", "gives other credentials"][..],
        ),
    ];
    for (text, needles) in cases {
        let config = dir.path().join("tally.toml");
        std::fs::write(&config, text).unwrap();
        let (code, out, err) = tally(&["check", "--config", config.to_str().unwrap()]);
        assert_eq!(code, 2, "{text}: {out}{err}");
        for needle in needles {
            assert!(err.contains(needle), "`{needle}` not in:\n{err}");
        }
        assert!(!err.contains("super-secret-value"), "{err}");
    }
    let (code, _, err) = tally(&["check", "--config", "/nonexistent/tally.toml"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("/nonexistent/tally.toml: cannot read the configuration"),
        "{err}"
    );
}

#[test]
fn dry_run_prints_every_report_call_and_sends_nothing() {
    // The README's first command: the sample log moved to the last minutes, then a dry run.
    let out = run(Command::new("bash")
        .arg(example("example.sh"))
        .env("TALLY_BIN", env!("CARGO_BIN_EXE_tally"))
        .env_remove("RUST_LOG"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    let log = std::fs::read_to_string(example("example-access.log")).unwrap();
    let with_credential = log
        .lines()
        .filter(|l| l.contains("?user_key=") || l.contains("?app_id="))
        .count();
    assert!(with_credential > 20);
    let count = |needle: &str| stdout.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(count("POST "), 1, "{stdout}");
    assert_eq!(count("][log][code]="), with_credential, "{stdout}");
    assert_eq!(
        count("][user_key]=") + count("][app_id]="),
        with_credential,
        "{stdout}"
    );
    assert_eq!(count("NOT SENT"), 0, "{stdout}");
    assert!(
        stdout.starts_with("POST https://su1.3scale.net/transactions.xml service_id=2555417777820"),
        "{stdout}"
    );
    assert!(stdout.contains("  service_token=***\n"), "{stdout}");
    assert!(
        stdout.contains("  transactions[0][app_id]=app-mobile\n"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("example-token-not-a-real-one")
            && !stderr.contains("example-token-not-a-real-one")
    );
    assert!(stderr.contains("skipped_malformed=1"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "skipped_no_credential={}",
            log.lines().count() - 1 - with_credential
        )),
        "{stderr}"
    );

    // The sample as shipped is older than 3scale's 24 hours: the dry run says it would send none.
    // (Run directly: a Tally would keep its logs beside the configuration, in the repository.)
    let (code, printed, logs) = tally(&[
        "run",
        "--config",
        &example("example.toml"),
        "--dry-run",
        "--once",
    ]);
    assert_eq!(code, 0, "{logs}");
    assert_eq!(
        printed.matches("NOT SENT (older than max_age)").count(),
        with_credential,
        "{printed}"
    );
    assert!(!printed.contains("POST "), "{printed}");
    assert!(
        logs.contains(&format!("dropped_too_old={with_credential}")),
        "{logs}"
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let (code, out, err) = tally(&[
        "run",
        "--config",
        &example("example.toml"),
        "--dry-run",
        "--once",
        "--log-json",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("NOT SENT "), "{out}");
    // Every line parses as a JSON object with a level, a timestamp and a message; among them the
    // skipped line's WARN, its reason a field, and the summary when done, its counters numbers.
    let events: Vec<serde_json::Value> = err
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    for event in &events {
        assert!(
            event["level"].is_string()
                && event["timestamp"].is_string()
                && event["message"].is_string(),
            "{event}"
        );
    }
    assert!(
        events
            .iter()
            .any(|e| e["level"] == "WARN" && e["reason"] == "malformed"),
        "{err}"
    );
    let summary = events
        .iter()
        .rfind(|e| e.get("lines_read").is_some())
        .unwrap_or_else(|| panic!("no summary:\n{err}"));
    assert_eq!(summary["skipped_malformed"], 1, "{summary}");
}

/// `check` looks at the machine too: a folder given as a log path and a state folder that cannot be
/// made are errors; a path that names no file yet and a file read by two sources are warnings, which
/// `run` logs as well.
#[test]
fn check_finds_paths_and_state_folders_that_cannot_work() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("logs")).unwrap();
    std::fs::write(d.join("logs/access.log"), "").unwrap();
    let config = d.join("tally.toml");
    let write = |sources: &[(&str, &str)], state: &str| {
        let mut text = "[backend]\nservice_token = \"t\"\n".to_string();
        for (path, service) in sources {
            text.push_str(&format!(
                "[[sources]]\npath = \"{path}\"\nservice_id = \"{service}\"\n"
            ));
        }
        text.push_str(&format!("[state]\ndir = \"{state}\"\n"));
        std::fs::write(&config, text).unwrap();
    };
    let check = || tally(&["check", "--config", config.to_str().unwrap()]);

    write(&[("logs", "1")], "state");
    let (code, _, err) = check();
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("tally.toml: sources[0].path: ") && err.contains("logs is a folder"),
        "{err}"
    );

    write(&[("logs/access.log", "1")], "logs/access.log/state");
    let (code, _, err) = check();
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("state.dir: ") && err.contains("is not a folder"),
        "{err}"
    );

    write(
        &[
            ("logs/*.log", "1"),
            ("logs/access.log", "2"),
            ("logs/next.log", "1"),
        ],
        "state",
    );
    let (code, out, err) = check();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("[backend]"), "{out}");
    assert!(
        err.contains("warning: ")
            && err.contains("sources[2].path: ")
            && err.contains("next.log does not exist yet"),
        "{err}"
    );
    assert!(
        err.contains("is read by sources[0] (service 1) and sources[1] (service 2)"),
        "{err}"
    );
    assert!(!d.join("state").exists(), "check creates nothing");

    // `run` refuses the same errors with the same message, before starting.
    write(&[("logs", "1")], "state");
    let (code, _, err) = tally(&["run", "--once", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("logs is a folder"), "{err}");
}

/// `tally parse` on a custom `log_format` with the credential in a header: each line's reading or
/// its skip with where and why, never a credential in full; text, `--json`, a file, the source's
/// files and stdin.
#[test]
fn parse_shows_each_line_as_tally_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = d.join("tally.toml");
    std::fs::write(
        &config,
        r#"[backend]
service_token = "t"
[[sources]]
path = "access.log"
service_id = "1"
log_format = '$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent "$http_user_agent" $host $request_time $http_x_api_key'
[sources.credentials]
location = "headers"
user_key = "X-Api-Key"
[tail]
max_line_length = 300
"#,
    )
    .unwrap();
    let long = format!(
        r#"10.0.0.7 - - [24/Nov/2026:10:15:06 +0000] "GET /{} HTTP/1.1" 200 0 "-" - 0.001 long-secret-key-7"#,
        "a".repeat(400)
    );
    let lines: Vec<&[u8]> = vec![
        br#"10.0.0.1 - - [24/Nov/2026:10:15:00 +0000] "GET /v1/words?page=2 HTTP/1.1" 200 612 "curl/8.0" api.example.com 0.012 3f9a7c21d4e8b06a5c1d"#,
        br#"10.0.0.2 - - [24/Nov/2026:10:15:01 +0100] "POST /v1/words HTTP/1.1" 000 0 "curl/8.0" - 0.020 k-secret-12"#,
        // Cut after the user agent: `" ` never ends its value.
        br#"10.0.0.3 - - [24/Nov/2026:10:15:02 +0000] "GET /v1/words HTTP/1.1" 404 0 "curl/8.0""#,
        br#"10.0.0.4 - - [24/Nov/2026:10:15:03 +0000] "GET /v1/words HTTP/1.1" 200 0 "curl/8.0" api.example.com 0.001 -"#,
        // Bytes that are not UTF-8 in the path and the user agent.
        b"10.0.0.5 - - [24/Nov/2026:10:15:04 +0000] \"GET /caf\xc3 HTTP/1.1\" 201 0 \"\xff\xfe\" api.example.com 0.001 utf8-secret-key-5",
        // A key NGINX escaped that is not UTF-8 once unescaped.
        br#"10.0.0.6 - - [24/Nov/2026:10:15:05 +0000] "GET / HTTP/1.1" 200 0 "-" - 0.001 bad\xC3\x28secret"#,
        b"",
        long.as_bytes(),
        br#"10.0.0.8 - - [24/Nov/2026:10:15:99 +0000] "GET / HTTP/1.1" 200 0 "-" - 0.001 abcdefgh-secret"#,
    ];
    let log = d.join("access.log");
    std::fs::write(&log, [lines.join(&b"\n"[..]), b"\n".to_vec()].concat()).unwrap();
    let secrets = [
        "3f9a7c21d4e8b06a5c1d",
        "k-secret-12",
        "utf8-secret-key-5",
        "C3\\x28secret",
        "long-secret-key-7",
        "abcdefgh-secret",
    ];
    let no_secret = |text: &str| {
        for secret in secrets {
            assert!(!text.contains(secret), "`{secret}` shown in:\n{text}");
        }
    };
    let config = config.to_str().unwrap();
    let expected = [
        "1: 2026-11-24T10:15:00Z GET /v1/words 200 host=api.example.com user_key=3f9a…5c1d → report to service 1: usage hits=1 code=200",
        "2: 2026-11-24T09:15:01Z POST /v1/words 000 host=- user_key=k-se… → report to service 1: usage hits=1 without code",
        "3: skipped (malformed): at byte 74: expected `\" ` to end the value that starts here; line: 10.0.0.3 - - [24/Nov/2026:10:15:02 +0000] \"GET /v1/words HTTP/1.1\" 404 0 \"…",
        "4: skipped (no_credential): expected the `X-Api-Key` request header: $http_x_api_key logged `-` or empty; line: 10.0.0.4 - - [24/Nov/2026:10:15:03 +0000] \"GET /v1/words HTTP/1.1\" 200 0 \"curl/8.0\" api.example.com 0.001 -",
        "5: 2026-11-24T10:15:04Z GET /caf\u{fffd} 201 host=api.example.com user_key=utf8…ey-5 → report to service 1: usage hits=1 code=201",
        "6: skipped (invalid_credential): expected a user_key that is UTF-8 once decoded; line: 10.0.0.6 - - [24/Nov/2026:10:15:05 +0000] \"GET / HTTP/1.1\" 200 0 \"-\" - 0.001 bad\\…cret",
        "8: skipped (too_long): at byte 300: expected the end of the line within tail.max_line_length (300 bytes)",
        "9: skipped (malformed): at byte 14: expected $time_local (like `25/Nov/2026:18:41:03 +0100`), not `24/Nov/2026:10:15:99 +0000`; line: 10.0.0.8 - - [24/Nov/2026:10:15:99 +0000] \"GET / HTTP/1.1\" 200 0 \"-\" - 0.001 abcd…",
    ];
    let summary = "summary: lines_read=8 reported=3 skipped_malformed=2 skipped_no_credential=1 skipped_invalid_credential=1 skipped_too_long=1 skipped_no_mapping_rule=0 skipped_too_many_metrics=0 skipped_unknown_host=0\n";

    // A file given; then the source's own files, each under its name.
    let (code, out, err) = tally(&["parse", "--config", config, log.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), expected, "{out}");
    assert_eq!(err, summary);
    no_secret(&out);
    let (code, out, err) = tally(&["parse", "--config", config]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().next(),
        Some(format!("==> {} <==", log.display()).as_str())
    );
    assert_eq!(out.lines().skip(1).collect::<Vec<_>>(), expected, "{out}");

    // JSON from stdin: one object per line, the summary last.
    let out = run_with_stdin(
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["parse", "--config", config, "--json", "-"])
            .env_remove("RUST_LOG"),
        Stdio::from(std::fs::File::open(&log).unwrap()),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    no_secret(&stdout);
    let objects: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert_eq!(objects.len(), 9, "{stdout}");
    assert_eq!(
        objects[0],
        serde_json::json!({
            "file": "-", "line": 1, "time": 1_795_515_300, "time_rfc3339": "2026-11-24T10:15:00Z",
            "method": "GET", "path": "/v1/words", "status": 200, "host": "api.example.com",
            "service_id": "1", "credential": { "kind": "user_key", "masked": "3f9a…5c1d" },
            "report": { "usage": { "hits": 1 }, "code": 200 },
        })
    );
    assert_eq!(objects[1]["report"]["code"], serde_json::Value::Null);
    assert_eq!(objects[1]["status"], 0);
    assert_eq!(
        (
            &objects[2]["skipped"],
            &objects[2]["at"],
            &objects[2]["expected"]
        ),
        (
            &"malformed".into(),
            &74.into(),
            &"`\" ` to end the value that starts here".into()
        )
    );
    assert_eq!(
        (&objects[3]["skipped"], &objects[3]["at"]),
        (&"no_credential".into(), &serde_json::Value::Null)
    );
    assert_eq!(objects[4]["path"], "/caf\u{fffd}");
    assert_eq!(objects[5]["skipped"], "invalid_credential");
    assert_eq!(
        (
            &objects[6]["line"],
            &objects[6]["skipped"],
            &objects[6]["at"]
        ),
        (&8.into(), &"too_long".into(), &300.into())
    );
    assert_eq!(
        (&objects[7]["line"], &objects[7]["at"]),
        (&9.into(), &14.into())
    );
    assert_eq!(
        objects[8],
        serde_json::json!({ "summary": { "lines_read": 8, "reported": 3, "skipped": {
            "malformed": 2, "no_credential": 1, "invalid_credential": 1, "too_long": 1,
            "no_mapping_rule": 0, "too_many_metrics": 0, "unknown_host": 0 } } })
    );

    // A source that does not exist is a configuration error; a file that cannot be read, an error.
    let (code, _, err) = tally(&["parse", "--config", config, "--source", "1", "-"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--source 1: the configuration has 1 source(s): 0 to 0"),
        "{err}"
    );
    let missing = d.join("missing.log");
    let (code, _, err) = tally(&["parse", "--config", config, missing.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cannot read") && err.contains("missing.log"),
        "{err}"
    );
}

#[test]
fn oidc_reads_the_app_id_from_the_bearer_token_and_never_shows_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = d.join("tally.toml");
    std::fs::write(
        &config,
        r#"[backend]
service_token = "t"
[[sources]]
path = "access.log"
service_id = "1"
log_format = '$remote_addr [$time_local] "$request" $status $body_bytes_sent "$http_authorization"'
[sources.credentials]
mode = "oidc"
location = "authorization"
jwt_claim = "client_id"
"#,
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let (code, out, err) = tally(&["check", "--config", config]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("mode = \"oidc\"\njwt_claim = \"client_id\"\n"),
        "{out}"
    );

    let good = jwt(r#"{"azp":"other","client_id":"app-0123456789","exp":1}"#);
    let without = jwt(r#"{"azp":"other","exp":1}"#);
    let line = |n: u8, authorization: &str| {
        format!(
            r#"10.0.0.{n} [24/Nov/2026:10:15:0{n} +0000] "GET /v1/words HTTP/1.1" 200 12 "{authorization}""#
        )
    };
    let log = d.join("access.log");
    let lines = [
        line(1, &format!("Bearer {good}")),
        line(2, "-"),
        line(3, &format!("Bearer {without}")),
        line(4, "Bearer opaque-secret-token"),
    ];
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();
    let (code, out, err) = tally(&["parse", "--config", config, log.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let shown: Vec<&str> = out.lines().collect();
    assert_eq!(
        shown[0],
        "1: 2026-11-24T10:15:01Z GET /v1/words 200 host=- app_id=app-… → report to service 1: usage hits=1 code=200",
        "{out}"
    );
    assert!(
        shown[1].starts_with("2: skipped (no_credential): expected a Bearer JWT in the Authorization header with claim `client_id`: $http_authorization logged `-`, empty or not Bearer;"),
        "{out}"
    );
    assert!(
        shown[2].starts_with("3: skipped (invalid_credential): expected a JWT whose payload is a JSON object with a string `client_id` claim: it has no `client_id` claim (it has azp, exp);"),
        "{out}"
    );
    assert!(
        shown[3].starts_with("4: skipped (invalid_credential): expected a Bearer JWT in the Authorization header: three base64url parts separated by dots;"),
        "{out}"
    );
    assert_eq!(
        err,
        "summary: lines_read=4 reported=1 skipped_malformed=0 skipped_no_credential=1 skipped_invalid_credential=2 skipped_too_long=0 skipped_no_mapping_rule=0 skipped_too_many_metrics=0 skipped_unknown_host=0\n"
    );
    // The tokens are secrets: no part of one is shown longer than a mask's ends.
    for token in [&good, &without] {
        for part in token.split('.') {
            assert!(!out.contains(&part[..12]), "`{part}` shown in:\n{out}");
        }
    }
    assert!(!out.contains("opaque-secret"), "{out}");
}

/// `tally parse` with mapping rules: each line's usage per metric, or why no rule matched (the
/// path as APIcast matches it).
#[test]
fn parse_shows_the_usage_of_the_mapping_rules() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tally.toml");
    std::fs::write(
        &config,
        r#"[backend]
service_token = "t"
[[sources]]
path = "access.log"
service_id = "1"
mapping_rules = [
  { method = "GET", pattern = "/products/{id}", metric = "get_product" },
  { method = "ANY", pattern = "/products", metric = "hits", delta = 2, last = true },
  { method = "ANY", pattern = "/", metric = "other" },
]
"#,
    )
    .unwrap();
    let log = dir.path().join("access.log");
    std::fs::write(
        &log,
        r#"h - - [24/Nov/2026:10:15:00 +0000] "GET /products/42?user_key=k1 HTTP/1.1" 200 1 "-" "-"
h - - [24/Nov/2026:10:15:01 +0000] "DELETE /catalog/../orders//7?user_key=k1 HTTP/1.1" 204 1 "-" "-"
h - - [24/Nov/2026:10:15:02 +0000] "GET /?user_key=k1 HTTP/1.1" 200 1 "-" "-"
"#,
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let (code, out, err) = tally(&["parse", "--config", config, log.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let shown: Vec<&str> = out.lines().collect();
    assert_eq!(
        shown[0],
        "1: 2026-11-24T10:15:00Z GET /products/42 200 host=- user_key=k… → report to service 1: usage get_product=1 hits=2 code=200",
        "{out}"
    );
    assert!(
        shown[1].starts_with("2: 2026-11-24T10:15:01Z DELETE /catalog/../orders//7 204 host=- user_key=k… → report to service 1: usage other=1 code=204"),
        "{out}"
    );
    let (code, out, err) = tally(&["parse", "--config", config, "--json", log.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines()
            .next()
            .unwrap()
            .contains(r#""usage":{"get_product":1,"hits":2}"#),
        "{out}"
    );
    // Without a catch-all, a request no rule matches is skipped, with the path APIcast matches.
    let text = std::fs::read_to_string(config).unwrap().replace(
        "  { method = \"ANY\", pattern = \"/\", metric = \"other\" },\n",
        "",
    );
    std::fs::write(config, text).unwrap();
    let (code, out, err) = tally(&["parse", "--config", config, log.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(
            "2: skipped (no_mapping_rule): expected a mapping rule that matches DELETE /orders/7;"
        ),
        "{out}"
    );
    assert!(
        err.contains("reported=1 ") && err.contains("skipped_no_mapping_rule=2 "),
        "{err}"
    );
}

/// `tally parse` on a source routed by Host: each line's service, with that service's settings, or
/// `unknown_host`.
#[test]
fn parse_shows_the_service_of_each_line_routed_by_host() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("proxy.json"),
        r#"{"services":[
            {"id":1,"backend_version":"1","backend_authentication_type":"service_token","backend_authentication_value":"t1","proxy":{"hosts":["shop.example"]}},
            {"id":2,"backend_version":"2","backend_authentication_type":"service_token","backend_authentication_value":"t2","proxy":{"hosts":["api.example"],"credentials_location":"headers","auth_app_id":"X-App-Id"}}]}"#,
    )
    .unwrap();
    let config = dir.path().join("tally.toml");
    std::fs::write(
        &config,
        "[proxy_config]\nfile = \"proxy.json\"\n[backend]\n[[sources]]\npath = \"access.log\"\nlog_format = '$host [$time_local] \"$request\" $status $http_x_app_id'\n",
    )
    .unwrap();
    let log = dir.path().join("access.log");
    std::fs::write(
        &log,
        r#"shop.example [24/Nov/2026:10:15:00 +0000] "GET /a?user_key=k1 HTTP/1.1" 200 -
API.example:443 [24/Nov/2026:10:15:01 +0000] "GET /b HTTP/1.1" 200 mobile-app
api.example [24/Nov/2026:10:15:02 +0000] "GET /b?user_key=k1 HTTP/1.1" 200 -
other.example [24/Nov/2026:10:15:03 +0000] "GET /?user_key=k1 HTTP/1.1" 200 -
"#,
    )
    .unwrap();
    let (code, out, err) = tally(&[
        "parse",
        "--config",
        config.to_str().unwrap(),
        log.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let shown: Vec<&str> = out.lines().collect();
    assert!(
        shown[0].contains("user_key=k… → report to service 1: usage hits=1"),
        "{out}"
    );
    assert!(
        shown[1].contains("app_id=mobi… → report to service 2: usage hits=1"),
        "{out}"
    );
    assert!(
        shown[2].starts_with("3: skipped (no_credential): expected the `X-App-Id` request header"),
        "{out}"
    );
    assert!(
        shown[3].starts_with("4: skipped (unknown_host): expected a Host of the proxy configuration's services (shop.example, api.example), not `other.example`"),
        "{out}"
    );
    assert!(
        err.contains("reported=2 ") && err.contains("skipped_unknown_host=1"),
        "{err}"
    );
}

/// A backfill (`run --once`) shows how it gets on: a bar on a terminal (run under `script`, which
/// gives it one), a log line elsewhere; both end with everything read.
#[test]
fn a_backfill_shows_its_progress_on_a_terminal_and_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let line = "10.0.0.1 - - [27/Nov/2026:10:00:00 +0000] \"GET /v1/words?user_key=k HTTP/1.1\" 200 5 \"-\" \"curl\"\n";
    std::fs::write(&log, line.repeat(5000)).unwrap();
    let size = std::fs::metadata(&log).unwrap().len();
    let config = dir.path().join("tally.toml");
    std::fs::write(
        &config,
        format!(
            "[backend]\nurl = \"https://su1.3scale.net\"\nservice_token = \"t\"\nvalidate_credentials = false\n\
             [[sources]]\npath = \"{}\"\nservice_id = \"1\"\nread_from = \"beginning\"\n[state]\ndir = \"{}\"\n",
            log.display(),
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    // Not a terminal: log lines, the last one with everything read.
    let (code, _, logs) = tally(&["run", "--config", &config, "--dry-run", "--once"]);
    assert_eq!(code, 0, "{logs}");
    let last = logs
        .lines()
        .find(|l| l.contains("backfill ended"))
        .unwrap_or_else(|| panic!("no progress line:\n{logs}"));
    for field in [
        format!("read_bytes={size}"),
        format!("total_bytes={size}"),
        "percent=\"100.0\"".to_string(),
        "lines=5000".to_string(),
    ] {
        assert!(last.contains(&field), "{field} in {last}");
    }
    assert!(
        !logs.contains('\r'),
        "a bar drawn where there is no terminal"
    );
    // On a terminal: the bar, ending full, on its own line.
    let Ok(script) = which("script") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "`script` (util-linux) is missing and CI is set"
        );
        eprintln!("SKIPPED the terminal half: `script` is not installed");
        return;
    };
    let typescript = dir.path().join("typescript");
    let command = format!(
        "{} run --config {config} --dry-run --once > /dev/null",
        env!("CARGO_BIN_EXE_tally")
    );
    let out = run(Command::new(script)
        .args(["-qec", &command])
        .arg(&typescript)
        .env_remove("RUST_LOG"));
    assert!(out.status.success(), "{out:?}");
    let shown = String::from_utf8_lossy(&std::fs::read(&typescript).unwrap()).into_owned();
    let full = format!(
        "\r\x1b[2K[{}] 100.0% {:.1} MB of {:.1} MB,",
        "#".repeat(30),
        size as f64 / 1e6,
        size as f64 / 1e6
    );
    assert!(shown.contains(&full), "{shown:?}");
    // And the same last state in the log, on a line of its own.
    assert!(
        shown.contains("\r\n") && shown.contains("backfill ended"),
        "{shown:?}"
    );
}

/// Where `program` is on the PATH.
fn which(program: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(program))
                .find(|p| p.is_file())
        })
        .ok_or(())
}
