//! The shipped logrotate snippet (`deploy/logrotate/tally-nginx`) run for real: Debian's `logrotate`
//! rotates a real NGINX's access log several times while requests flow, and tally, following the
//! log, delivers every request exactly once.
//!
//! Skipped with a message when nginx or logrotate is not installed, unless TALLY_REQUIRE_NGINX or
//! TALLY_REQUIRE_LOGROTATE is set (CI sets both), in which case a missing one fails the test.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use support::backend::Backend;
use support::nginx::{nginx_or_skip, Nginx};
use support::{poll_until, write_config, Tally};

const WAIT: Duration = Duration::from_secs(30);

/// The snippet as shipped, its paths moved into the test's folders. Panics if a path it should
/// hold is gone: the test would no longer run the snippet's own directives.
fn logrotate_conf(dir: &Path, logs: &Path) -> PathBuf {
    let snippet = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/logrotate/tally-nginx");
    let text = std::fs::read_to_string(&snippet).expect("read deploy/logrotate/tally-nginx");
    for path in ["/var/log/nginx/*.log", "/run/nginx.pid"] {
        assert!(text.contains(path), "the snippet no longer names {path}");
    }
    let text = text
        .replace("/var/log/nginx/", &format!("{}/", logs.display()))
        .replace(
            "/run/nginx.pid",
            &dir.join("nginx.pid").display().to_string(),
        );
    let conf = dir.join("logrotate.conf");
    std::fs::write(&conf, text).unwrap();
    conf
}

/// `logrotate -f -s STATE CONF`: rotates now, whatever the schedule.
fn rotate(logrotate: &Path, dir: &Path, conf: &Path) {
    let out = Command::new(logrotate)
        .arg("-f")
        .arg("-s")
        .arg(dir.join("logrotate.state"))
        .arg(conf)
        .output()
        .expect("run logrotate");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "logrotate failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The lines of a log file, decompressing a `.gz` one.
fn lines_of(path: &Path) -> usize {
    let text = if path.extension().is_some_and(|e| e == "gz") {
        let out = Command::new("gzip")
            .arg("-dc")
            .arg(path)
            .output()
            .expect("run gzip");
        assert!(out.status.success(), "gzip -dc {}", path.display());
        out.stdout
    } else {
        std::fs::read(path).unwrap()
    };
    text.iter().filter(|&&b| b == b'\n').count()
}

/// The test's folder, kept (and named) when the test fails, for its logs.
struct KeptOnFailure(Option<tempfile::TempDir>);

impl Drop for KeptOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(dir) = self.0.take() {
                eprintln!(
                    "the failed test's files are kept in {}",
                    dir.keep().display()
                );
            }
        }
    }
}

#[test]
fn the_logrotate_snippet_rotating_a_live_nginx_log_loses_and_duplicates_nothing() {
    let test = "the_logrotate_snippet_rotating_a_live_nginx_log_loses_and_duplicates_nothing";
    let Some(nginx_binary) = nginx_or_skip(test) else {
        return;
    };
    let Some(logrotate) = support::program_or_skip(
        test,
        "logrotate",
        &["/usr/sbin/logrotate", "/usr/bin/logrotate"],
        "TALLY_REQUIRE_LOGROTATE",
    ) else {
        return;
    };
    const ROTATIONS: usize = 4;
    const PER_PHASE: usize = 100;

    let dir = KeptOnFailure(Some(tempfile::tempdir().unwrap()));
    let dir = dir.0.as_ref().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let access_log = logs.join("access.log");
    let backend = Backend::start(&[("42", "tok")]);
    // The error log stays out of the rotated folder: the snippet rotates every *.log there.
    let nginx = Nginx::start_logging_to(
        &nginx_binary,
        dir.path(),
        &access_log,
        "listen 127.0.0.1:{port};\n        location /ok { return 200 \"ok\\n\"; }",
        "combined",
        "",
    );
    let conf = logrotate_conf(dir.path(), &logs);
    let config = write_config(
        dir.path(),
        &backend.url(),
        "tok",
        &[(&access_log, "42")],
        "[report]\nflush_interval = \"200ms\"\n",
    );
    let mut tally = Tally::start(&config, &[]);
    tally.wait_for_log("following file", WAIT);

    let sent = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        // The traffic: one request after the other, each with a credential of its own, until told.
        let traffic = scope.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                let i = sent.load(Ordering::SeqCst);
                assert_eq!(nginx.get(&format!("/ok?user_key=k{i}")), 200);
                sent.store(i + 1, Ordering::SeqCst);
            }
        });
        let at_least = |n: usize| {
            poll_until(
                WAIT,
                &format!("{n} requests sent"),
                || sent.load(Ordering::SeqCst) >= n || traffic.is_finished(),
                || format!("{} sent", sent.load(Ordering::SeqCst)),
            );
            assert!(!traffic.is_finished(), "the traffic stopped early");
        };
        for phase in 1..=ROTATIONS {
            at_least(phase * PER_PHASE);
            rotate(&logrotate, dir.path(), &conf);
            // NGINX writes to the new file once it has reopened its logs (USR1, asynchronous):
            // rotating before that would find it empty.
            poll_until(
                WAIT,
                "NGINX to write to the new access.log",
                || std::fs::metadata(&access_log).is_ok_and(|m| m.len() > 0),
                || format!("{} sent", sent.load(Ordering::SeqCst)),
            );
            // Rotations are a day apart, not milliseconds: the next one waits until tally follows
            // the new file. (A file made and rotated away between two of tally's looks, ~100 ms
            // apart, is never opened: the test first ran 4 rotations in 100 ms and lost 3 files.)
            tally.wait_for_logs("following file", phase + 1, WAIT);
        }
        at_least((ROTATIONS + 1) * PER_PHASE);
        stop.store(true, Ordering::SeqCst);
        traffic.join().expect("the traffic thread");
    });
    let sent = sent.into_inner();

    // What the snippet left: the live log, the last rotated one uncompressed (delaycompress), the
    // older ones compressed; together they hold every request once.
    let mut files: Vec<String> = std::fs::read_dir(&logs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let mut expected_files = vec!["access.log".to_string(), "access.log.1".to_string()];
    expected_files.extend((2..=ROTATIONS).map(|n| format!("access.log.{n}.gz")));
    expected_files.sort();
    assert_eq!(files, expected_files);
    let logged: usize = files.iter().map(|f| lines_of(&logs.join(f))).sum();
    assert_eq!(logged, sent, "NGINX logged every request once");

    backend.wait_until(WAIT, &format!("{sent} transactions"), |b| {
        b.transactions().len() >= sent
    });
    tally.signal("TERM");
    let status = tally.wait(WAIT);
    assert!(status.success(), "tally exited {status}:\n{}", tally.logs());
    let mut expected: Vec<String> = (0..sent).map(|i| format!("k{i}")).collect();
    expected.sort();
    assert_eq!(
        backend.credentials(),
        expected,
        "every request exactly once"
    );
    assert!(backend.refusals().is_empty(), "{:?}", backend.refusals());
    let logs_text = tally.logs();
    assert!(
        logs_text.contains(&format!("rotations={ROTATIONS}")),
        "{logs_text}"
    );
}
