//! The service token never appears in anything tally writes or serves: its logs at `trace` for
//! every crate (normal runs with authorize calls, a backend that rejects the token and echoes it
//! back as 3scale does, connections reset and hung), `tally check`, `--dry-run`, `/metrics` and
//! `/healthz`.

mod support;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::backend::Backend;
use support::proxy::{Endpoint, Fault, Proxy};
use support::{
    combined_line, now, telemetry_get, telemetry_port, write_config_with, PipedTally, Tally,
};

const WAIT: Duration = Duration::from_secs(90);
/// A distinctive token, so that any appearance of it is a leak.
const TOKEN: &str = "tok-SECRET-7f3a9c";
/// What is searched for: the token's middle, so that a token cut short or framed differently (in
/// a URL, quoted, escaped) is found as well; a mask that keeps only its ends is not.
const NEEDLE: &str = "SECRET-7f3a";

/// Panics, showing the line, if `text` holds the token.
fn assert_clean(what: &str, text: &str) {
    if let Some(at) = text.find(NEEDLE) {
        let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
        let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
        panic!(
            "the service token appears in {what} ({} occurrences), first in:\n{}",
            text.matches(NEEDLE).count(),
            &text[start..end]
        );
    }
}

struct World {
    dir: tempfile::TempDir,
    backend: Backend,
    log: PathBuf,
    port: u16,
}

impl World {
    /// A backend that knows service 42 with `TOKEN`, and 12 lines of 6 credentials in the log.
    fn new() -> World {
        let dir = tempfile::tempdir().expect("temp folder");
        // The access log in a folder of its own: tally's trace log, written beside it, would wake
        // the folder's watch at every line (and notify logs each wake-up at trace: a loop).
        std::fs::create_dir(dir.path().join("logs")).expect("logs folder");
        let log = dir.path().join("logs").join("access.log");
        let t = now() - 30;
        let text: String = (0..12)
            .map(|i| {
                combined_line(
                    t + i,
                    "GET",
                    &format!("/p?user_key=key-{}&x={i}", i % 6),
                    200,
                )
            })
            .collect();
        std::fs::write(&log, text).expect("write the log");
        World {
            dir,
            backend: Backend::start(&[("42", TOKEN)]),
            log,
            port: telemetry_port(),
        }
    }

    fn config(&self, url: &str, backend_extra: &str, extra: &str) -> PathBuf {
        let config = write_config_with(
            self.dir.path(),
            url,
            TOKEN,
            backend_extra,
            &[(&self.log, "42")],
            &format!(
                "{extra}\n[report]\nflush_interval = \"100ms\"\n[telemetry]\nlisten = \"127.0.0.1:{}\"\n",
                self.port
            ),
        );
        config
    }

    /// `tally ARGS...` with every crate logging at trace.
    fn start(&self, args: &[&OsStr]) -> PipedTally {
        Tally::start_with(self.dir.path(), args, "trace", |_| {})
    }

    fn run(&self, config: &Path, extra: &[&str]) -> PipedTally {
        let mut args = vec![
            OsStr::new("run"),
            OsStr::new("--config"),
            config.as_os_str(),
        ];
        args.extend(extra.iter().map(OsStr::new));
        self.start(&args)
    }

    /// `/metrics`, `/healthz` and `/livez` bodies, each checked.
    fn check_telemetry(&self) -> (u16, String) {
        let (_, metrics) = telemetry_get(self.port, "/metrics");
        assert!(metrics.contains("tally_lines_read_total"), "{metrics}");
        assert_clean("/metrics", &metrics);
        let (_, live) = telemetry_get(self.port, "/livez");
        assert_clean("/livez", &live);
        let (status, health) = telemetry_get(self.port, "/healthz");
        assert_clean("/healthz", &health);
        (status, health)
    }
}

/// Stops a running tally and checks everything it wrote.
fn stop_and_check(mut tally: PipedTally) -> String {
    if std::env::var_os("TALLY_KEEP_TRACE").is_some() {
        let _ = std::fs::copy(&tally.log, "/tmp/tally-trace.log");
    }
    tally.signal("TERM");
    let status = tally.wait(WAIT);
    assert!(status.success(), "tally exited {status}:\n{}", tally.logs());
    let logs = tally.logs();
    assert!(logs.contains("TRACE"), "not logging at trace:\n{logs}");
    assert_clean("tally's stderr at RUST_LOG=trace", &logs);
    assert_clean("tally's stdout", &tally.output());
    logs
}

#[test]
fn a_normal_run_with_authorize_calls_shows_no_token_even_at_trace() {
    let w = World::new();
    let tally = w.run(&w.config(&w.backend.url(), "", ""), &[]);
    w.backend
        .wait_until(WAIT, "the 12 lines", |b| b.transactions().len() >= 12);
    let (status, health) = w.check_telemetry();
    assert_eq!(status, 200, "{health}");
    stop_and_check(tally);
    assert_eq!(
        w.backend.authorizations().len(),
        6,
        "each credential checked"
    );
    assert_eq!(w.backend.transactions().len(), 12);

    // The same with --once, which ends by itself.
    let w = World::new();
    let mut tally = w.run(&w.config(&w.backend.url(), "", ""), &["--once"]);
    assert!(tally.wait(WAIT).success(), "{}", tally.logs());
    assert_clean("tally --once's stderr at trace", &tally.logs());
    assert_clean("tally --once's stdout", &tally.output());
    assert_eq!(w.backend.transactions().len(), 12);
}

#[test]
fn a_rejected_token_echoed_back_by_the_backend_shows_nowhere() {
    let w = World::new();
    // 3scale's answer to a bad token quotes it: `service token "tok-..." is invalid`.
    w.backend.set_token("42", "the-right-one");
    let tally = w.run(
        &w.config(&w.backend.url(), "rejected_retry = \"300ms\"\n", ""),
        &[],
    );
    // The credential checks (authorize) are rejected first.
    tally.wait_for_logs("service_token_invalid", 2, WAIT);
    let (status, health) = w.check_telemetry();
    assert_eq!(status, 503, "{health}");
    assert!(health.contains("service_token_invalid"), "{health}");
    stop_and_check(tally);
    assert!(w.backend.refusals().len() >= 2);

    // The report calls themselves rejected (no credential checks), with --once (exits 1).
    let w = World::new();
    w.backend.set_token("42", "the-right-one");
    let mut tally = w.run(
        &w.config(&w.backend.url(), "validate_credentials = false\n", ""),
        &["--once"],
    );
    let status = tally.wait(WAIT);
    assert_eq!(status.code(), Some(1), "{}", tally.logs());
    let logs = tally.logs();
    assert!(logs.contains("service_token_invalid"), "{logs}");
    assert_clean("tally --once's stderr at trace, token rejected", &logs);
    assert_clean("tally --once's stdout", &tally.output());
    assert!(w.backend.authorizations().is_empty());
    assert!(!w.backend.refusals().is_empty());
}

#[test]
fn resets_and_hangs_show_no_token_even_at_trace() {
    let w = World::new();
    let proxy = Proxy::start(w.backend.addr);
    proxy.set(Fault::Reset);
    let tally = w.run(&w.config(&proxy.url(), "timeout = \"1s\"\n", ""), &[]);
    // Credential checks, then report calls, each reset, hung, answered with garbage and with 500.
    for endpoint in [Endpoint::Authorize, Endpoint::Report] {
        for fault in [
            Fault::Reset,
            Fault::Hang,
            Fault::Garbage,
            Fault::Status500Text,
        ] {
            proxy.set_for(endpoint, fault);
            proxy.wait_until(
                WAIT,
                &format!("an {endpoint:?} call given {fault:?}"),
                |p| p.applied(endpoint, fault) >= 1,
            );
        }
        proxy.set_for(endpoint, Fault::Pass);
    }
    w.backend
        .wait_until(WAIT, "the 12 lines", |b| b.transactions().len() >= 12);
    w.check_telemetry();
    stop_and_check(tally);
    assert_eq!(w.backend.transactions().len(), 12);
}

#[test]
fn check_and_dry_run_show_no_token() {
    let w = World::new();
    let config = w.config(&w.backend.url(), "", "");
    let check = |config: &Path, env: Option<(&str, &str)>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
        command.args(["check", "--config"]).arg(config);
        if let Some((k, v)) = env {
            command.env(k, v);
        }
        let out = command.output().expect("run tally check");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        );
        assert!(out.status.success(), "{stdout}{stderr}");
        assert!(stdout.contains("service_token = "), "{stdout}");
        assert_clean("tally check's stdout", &stdout);
        assert_clean("tally check's stderr", &stderr);
    };
    check(&config, None);
    // Given by environment variable and by file, the same.
    let text = std::fs::read_to_string(&config).unwrap();
    let by_env = w.dir.path().join("env.toml");
    std::fs::write(
        &by_env,
        text.replace(
            &format!("service_token = \"{TOKEN}\""),
            "service_token_env = \"TALLY_TEST_TOKEN\"",
        ),
    )
    .unwrap();
    check(&by_env, Some(("TALLY_TEST_TOKEN", TOKEN)));
    let token_file = w.dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let by_file = w.dir.path().join("file.toml");
    std::fs::write(
        &by_file,
        text.replace(
            &format!("service_token = \"{TOKEN}\""),
            &format!("service_token_file = \"{}\"", token_file.display()),
        ),
    )
    .unwrap();
    check(&by_file, None);

    // --dry-run --once prints every report call, the token masked.
    let mut tally = w.run(&config, &["--dry-run", "--once"]);
    assert!(tally.wait(WAIT).success(), "{}", tally.logs());
    let printed = tally.output();
    assert!(
        printed.contains("POST ") && printed.matches("[user_key]=key-").count() == 12,
        "{printed}"
    );
    assert_clean("--dry-run's stdout", &printed);
    assert_clean("--dry-run's stderr at trace", &tally.logs());
    assert_eq!(w.backend.calls(), 0, "a dry run calls nobody");
}

#[test]
fn a_configuration_error_on_the_token_line_does_not_echo_it() {
    let w = World::new();
    let config = w.config(&w.backend.url(), "", "");
    // A token left unquoted: TOML's error quotes the line it is on.
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &format!("service_token = \"{TOKEN}\""),
        &format!("service_token = {TOKEN}"),
    );
    std::fs::write(&config, text).unwrap();
    for args in [vec!["check", "--config"], vec!["run", "--config"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(&args)
            .arg(&config)
            .output()
            .expect("run tally");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("tally.toml"),
            "the error names the file: {stderr}"
        );
        assert_clean(&format!("`tally {}`'s error", args[0]), &stderr);
        assert_clean(
            &format!("`tally {}`'s stdout", args[0]),
            &String::from_utf8_lossy(&out.stdout),
        );
    }
}
