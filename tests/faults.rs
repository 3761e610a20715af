//! Fault injection end to end: the real `tally` binary reporting through a fault-injecting proxy
//! (`tests/support/proxy.rs`) to the test 3scale backend, and a state folder that cannot be written.
//! Every test ends with exact totals: every line written arrives exactly once, matched by
//! credential, code and timestamp (or, where a duplicate is possible, exactly as tally said).

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use support::backend::Backend;
use support::proxy::{Endpoint, Fault, Proxy};
use support::{
    combined_line, events_with, metric, now, poll_until, sample, telemetry_get, telemetry_port,
    telemetry_try_get, write_config_with, Scenario, Tally, JSON_LOGS,
};

const WAIT: Duration = Duration::from_secs(90);
const REPORT: &str = "/transactions.xml";

/// (credential, code, timestamp): what identifies a transaction here.
type Seen = (String, String, i64);

/// A scenario (test backend, access log) with a proxy in front of the backend and tally's telemetry
/// on a port of its own.
struct World {
    s: Scenario,
    proxy: Proxy,
    port: u16,
    t0: i64,
}

impl World {
    fn new() -> World {
        let s = Scenario::new();
        let proxy = Proxy::start(s.backend.addr);
        World {
            s,
            proxy,
            port: telemetry_port(),
            t0: now() - 60,
        }
    }

    fn backend(&self) -> &Backend {
        &self.s.backend
    }

    /// A configuration reporting the access log to service 42 through the proxy, tally logging
    /// JSON. A `timeout` in `backend_extra` replaces the helper's own.
    fn config(&self, backend_extra: &str, extra: &str) -> PathBuf {
        self.config_with(backend_extra, extra, "")
    }

    /// The same, with `telemetry_extra` keys in the [telemetry] table.
    fn config_with(&self, backend_extra: &str, extra: &str, telemetry_extra: &str) -> PathBuf {
        let config = write_config_with(
            self.s.dir.path(),
            &self.proxy.url(),
            "tok",
            backend_extra,
            &[(&self.s.log, "42")],
            &format!(
                "{extra}\n[telemetry]\nlisten = \"127.0.0.1:{}\"\n{telemetry_extra}{JSON_LOGS}",
                self.port
            ),
        );
        config
    }

    /// Appends lines `from..from + n` (7 credentials, 5 codes, times over 20 s) and returns what
    /// each must arrive as.
    fn append(&self, from: usize, n: usize) -> Vec<Seen> {
        let mut text = String::new();
        let mut seen = Vec::new();
        for i in from..from + n {
            let key = format!("key-{}", i % 7);
            let code = [200, 404, 500, 201, 503][i % 5];
            let t = self.t0 + (i % 20) as i64;
            text += &combined_line(t, "GET", &format!("/v1/x?user_key={key}&i={i}"), code);
            seen.push((key, code.to_string(), t));
        }
        self.s.append(&text);
        seen
    }

    fn metrics(&self) -> String {
        let (status, body) = telemetry_get(self.port, "/metrics");
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Polls /healthz until it answers `status` with a body holding `needle`; the body.
    fn wait_for_health(&self, status: u16, needle: &str) -> String {
        support::wait_for_health(self.port, status, needle, WAIT)
    }

    /// `tally_file_lag_seconds` of the access log.
    fn lag_seconds(&self) -> u64 {
        self.file_gauge("tally_file_lag_seconds")
    }

    /// A per-file gauge of the access log.
    fn file_gauge(&self, gauge: &str) -> u64 {
        let name = format!("{gauge}{{path=\"{}\"}}", self.s.log.display());
        sample(&self.metrics(), &name)
    }
}

/// What the backend accepted, sorted.
fn received(b: &Backend) -> Vec<Seen> {
    let mut seen: Vec<Seen> = b
        .transactions()
        .iter()
        .map(|t| {
            assert_eq!(t.hits(), 1, "one transaction per request: {t:?}");
            (
                t.credential(),
                t.code.clone().unwrap_or_default(),
                t.timestamp(),
            )
        })
        .collect();
    seen.sort();
    seen
}

fn sorted(mut v: Vec<Seen>) -> Vec<Seen> {
    v.sort();
    v
}

/// Failed calls tally counted for `endpoint` ("report", "authorize") and `cause` ("timeout",
/// "connection", "http_5xx", "http_4xx").
fn failures(metrics: &str, endpoint: &str, cause: &str) -> u64 {
    sample(
        metrics,
        &format!("tally_call_failures_total{{endpoint=\"{endpoint}\",cause=\"{cause}\"}}"),
    )
}

fn resends(metrics: &str) -> u64 {
    sample(metrics, "tally_ambiguous_resends_total")
}

/// What tally logs for each report call it sends again after it got no answer: a WARN with the
/// file's path, the byte range and the response timeout now in force.
const RESENDING: &[(&str, &str)] = &[
    ("service_id", "42"),
    ("path", "*"),
    ("from", "*"),
    ("to", "*"),
    ("timeout", "*"),
];

/// The (from, to) byte ranges tally logged as resent.
fn resent_ranges(logs: &str) -> Vec<(u64, u64)> {
    events_with(logs, "WARN", RESENDING)
        .iter()
        .map(|e| (support::number(e, "from"), support::number(e, "to")))
        .collect()
}

/// Checks tally's failure counters against what the proxy served the report endpoint: each fault
/// counted once under its cause, and each fault after which the call may have reached 3scale (no
/// answer, a broken connection, an answer that is not HTTP) resent once, logged with its range.
fn assert_report_failures_counted(w: &World, metrics: &str, logs: &str, faults: &[Fault]) {
    let cause = |f: Fault| match f {
        Fault::Status500 | Fault::Status500Text => "http_5xx",
        Fault::Reset | Fault::ProcessThenReset | Fault::Garbage => "connection",
        Fault::Hang => "timeout",
        other => panic!("no cause for {other:?}"),
    };
    for c in ["timeout", "connection", "http_5xx", "http_4xx"] {
        let served: u64 = faults
            .iter()
            .filter(|&&f| cause(f) == c)
            .map(|&f| w.proxy.applied(Endpoint::Report, f) as u64)
            .sum();
        assert_eq!(
            failures(metrics, "report", c),
            served,
            "report calls failed for {c}: the proxy served {faults:?} {:?} times\n{metrics}",
            faults
                .iter()
                .map(|&f| w.proxy.applied(Endpoint::Report, f))
                .collect::<Vec<_>>()
        );
    }
    let ambiguous: u64 = faults
        .iter()
        .filter(|&&f| {
            matches!(
                f,
                Fault::Reset | Fault::ProcessThenReset | Fault::Garbage | Fault::Hang
            )
        })
        .map(|&f| w.proxy.applied(Endpoint::Report, f) as u64)
        .sum();
    assert_eq!(resends(metrics), ambiguous, "{metrics}");
    assert_eq!(
        resent_ranges(logs).len() as u64,
        ambiguous,
        "one resend event per resend:\n{logs}"
    );
}

/// Checks the authorize failures: every round of checks the proxy failed shows, and never more
/// than it served (a failed round abandons the calls still under way, uncounted).
fn assert_authorize_failures_counted(w: &World, metrics: &str, faults: &[(Fault, &str)]) {
    for &(fault, cause) in faults {
        let served = w.proxy.applied(Endpoint::Authorize, fault) as u64;
        let counted = failures(metrics, "authorize", cause);
        assert!(
            counted >= 1 && counted <= served,
            "authorize failures for {cause}: {counted}, the proxy served {fault:?} {served} times\n{metrics}"
        );
    }
}

/// The common course of the fault tests: 40 lines; `authorize_faults` one after the other (each until
/// the proxy has served it `times` times: the batch waits on its credential check, so no report
/// call may be made), then the checks pass and `report_faults` follow (each `times` times; nothing
/// may arrive),
/// then everything passes; 20 more lines. While the last report fault holds, `/healthz` must say
/// the service is stalled (`stalled_after` is 1 s here) with its last failure, and the file's lag
/// in seconds must grow; once everything passes, health and lag come back. Every line must arrive
/// exactly once. Returns tally's metrics once everything is accepted, and its log.
fn faults_then_pass(
    w: &World,
    backend_extra: &str,
    authorize_faults: &[Fault],
    report_faults: &[Fault],
    times: usize,
) -> (String, String) {
    let first = authorize_faults
        .first()
        .or(report_faults.first())
        .copied()
        .unwrap_or(Fault::Pass);
    w.proxy.set(first);
    let mut expected = w.append(0, 40);
    let tally = Tally::start(
        &w.config_with(
            backend_extra,
            "[report]\nflush_interval = \"100ms\"\nmax_transactions = 10\n",
            "stalled_after = \"1s\"\n",
        ),
        &[],
    );
    tally.wait_for_log("tally started", WAIT);
    // A failed check fails its whole round of authorize calls (one per new credential): rounds are
    // counted in tally's log, the calls at the proxy.
    let mut rounds = 0;
    for &fault in authorize_faults {
        w.proxy.set_for(Endpoint::Authorize, fault);
        w.proxy.set_for(Endpoint::Report, fault);
        let before = w.proxy.applied(Endpoint::Authorize, fault);
        rounds += times;
        // The calls at the proxy first: a round under way at the switch fails under the previous
        // fault, and its log line would count for this one.
        w.proxy
            .wait_until(WAIT, "authorize calls under this fault", |p| {
                p.applied(Endpoint::Authorize, fault) >= before + times
            });
        tally.wait_for_logs(
            "cannot check new credentials; the batch waits",
            rounds,
            WAIT,
        );
        assert_eq!(
            w.proxy.requests(REPORT),
            0,
            "a report call while its credentials could not be checked:\n{}",
            tally.logs()
        );
    }
    w.proxy.set_for(Endpoint::Authorize, Fault::Pass);
    for &fault in report_faults {
        w.proxy.set_for(Endpoint::Report, fault);
        let before = w.proxy.applied(Endpoint::Report, fault);
        w.proxy.wait_until(
            WAIT,
            &format!("{times} report calls given {fault:?}"),
            |p| p.applied(Endpoint::Report, fault) >= before + times,
        );
    }
    let health = w.wait_for_health(503, "service 42: nothing accepted by 3scale for");
    assert!(health.contains("last failure: report call"), "{health}");
    // The oldest line waiting was logged at t0, a minute before the start.
    let lag = w.lag_seconds();
    let most = (now() - w.t0) as u64;
    assert!(
        (60..=most).contains(&lag),
        "the lines wait since t0: lag {lag} s, expected 60..={most}"
    );
    poll_until(
        WAIT,
        "the lag to grow",
        || w.lag_seconds() > lag,
        || format!("the lag stays at {lag} s"),
    );
    assert!(
        w.backend().transactions().is_empty(),
        "nothing was forwarded, yet the backend has {:?}",
        w.backend().transactions()
    );
    w.proxy.set(Fault::Pass);
    w.backend()
        .wait_until(WAIT, "the first 40 lines", |b| b.transactions().len() >= 40);
    expected.extend(w.append(40, 20));
    w.backend()
        .wait_until(WAIT, "all 60 lines", |b| b.transactions().len() >= 60);
    let metrics = wait_until_all_accepted(w);
    assert_eq!(w.lag_seconds(), 0, "{metrics}");
    w.wait_for_health(200, "");
    let logs = tally.stop(WAIT);
    assert_eq!(
        received(w.backend()),
        sorted(expected),
        "every line exactly once; tally's log:\n{logs}"
    );
    assert!(
        w.backend().dropped().is_empty(),
        "{:?}",
        w.backend().dropped()
    );
    assert!(
        w.backend().refusals().is_empty(),
        "{:?}",
        w.backend().refusals()
    );
    w.proxy
        .wait_until(WAIT, "no call open at the proxy once tally stopped", |p| {
            p.open() == 0
        });
    (metrics, logs)
}

#[test]
fn http_500s_on_authorize_and_report_then_pass_deliver_every_line_once() {
    let w = World::new();
    let (metrics, logs) = faults_then_pass(&w, "", &[Fault::Status500], &[Fault::Status500], 3);
    assert_report_failures_counted(&w, &metrics, &logs, &[Fault::Status500]);
    assert_authorize_failures_counted(&w, &metrics, &[(Fault::Status500, "http_5xx")]);
}

#[test]
fn connection_resets_then_pass_deliver_every_line_once() {
    let w = World::new();
    let (metrics, logs) = faults_then_pass(&w, "", &[Fault::Reset], &[Fault::Reset], 3);
    assert_report_failures_counted(&w, &metrics, &logs, &[Fault::Reset]);
    assert_authorize_failures_counted(&w, &metrics, &[(Fault::Reset, "connection")]);
}

#[test]
fn a_backend_that_hangs_then_passes_delivers_every_line_once() {
    let w = World::new();
    let (metrics, logs) =
        faults_then_pass(&w, "timeout = \"1s\"\n", &[Fault::Hang], &[Fault::Hang], 3);
    assert_report_failures_counted(&w, &metrics, &logs, &[Fault::Hang]);
    assert_authorize_failures_counted(&w, &metrics, &[(Fault::Hang, "timeout")]);
}

#[test]
fn garbage_answers_then_pass_deliver_every_line_once() {
    let w = World::new();
    let faults = [Fault::Garbage, Fault::Status500Text];
    let (metrics, logs) = faults_then_pass(&w, "", &faults, &faults, 2);
    assert_report_failures_counted(&w, &metrics, &logs, &faults);
    assert_authorize_failures_counted(
        &w,
        &metrics,
        &[
            (Fault::Garbage, "connection"),
            (Fault::Status500Text, "http_5xx"),
        ],
    );
}

/// Sets tally's soft `RLIMIT_FSIZE` (the hard limit is kept, so raising it back needs no
/// privilege). Err when prlimit is not permitted here.
fn set_file_size_limit(pid: i32, soft: u64) -> std::io::Result<()> {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a plain system call on valid pointers.
    if unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, std::ptr::null(), &mut old) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let new = libc::rlimit {
        rlim_cur: soft.min(old.rlim_max),
        rlim_max: old.rlim_max,
    };
    // SAFETY: as above.
    if unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &new, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether prlimit works on a child of ours here; when it does not, the test is skipped with a
/// message (and fails when `CI` is set: there it must run).
fn prlimit_permitted() -> bool {
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("start sleep");
    let result = set_file_size_limit(child.id() as i32, 1 << 20);
    let _ = child.kill();
    let _ = child.wait();
    match result {
        Ok(()) => true,
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("prlimit(RLIMIT_FSIZE) on a child is not permitted here ({e}), and CI is set")
        }
        Err(e) => {
            eprintln!("skipped: prlimit(RLIMIT_FSIZE) on a child is not permitted here: {e}");
            false
        }
    }
}

/// `tally run --config CONFIG` with stderr through a pipe (tally's file-size limit must not apply
/// to its own log) and, when `ignore_sigxfsz`, SIGXFSZ ignored.
fn start_piped(w: &World, config: &std::path::Path, ignore_sigxfsz: bool) -> support::PipedTally {
    let args = [
        std::ffi::OsStr::new("run"),
        std::ffi::OsStr::new("--config"),
        config.as_os_str(),
    ];
    Tally::start_with(w.s.dir.path(), &args, "tally=debug", |command| {
        if ignore_sigxfsz {
            use std::os::unix::process::CommandExt;
            // SAFETY: only an async-signal-safe call between fork and exec. An ignored signal
            // stays ignored across exec.
            unsafe {
                command.pre_exec(|| {
                    libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                    Ok(())
                });
            }
        }
    })
}

/// The state folder "fills up": state writes fail (EFBIG under a lowered RLIMIT_FSIZE). `/healthz`
/// must turn 503 naming the state, no report call may go out without its in-flight record, and once
/// writes work again every line arrives exactly once, with a checkpoint a second run agrees with.
///
/// A full disk fails writes with ENOSPC and no signal. A file-size limit is the only way to make
/// tally's writes fail without privileges, and it also sends SIGXFSZ, whose default action kills
/// the process: that signal belongs to the simulation, not to a full disk, so here tally starts with
/// SIGXFSZ ignored (inherited across exec) and sees the plain write error. Whether tally survives
/// the signal itself is `a_file_size_limit_does_not_kill_tally`.
#[test]
fn a_state_folder_that_cannot_be_written_holds_reporting_and_says_so() {
    if !prlimit_permitted() {
        return;
    }
    let w = World::new();
    let mut expected = w.append(0, 30);
    let config = w.config("", "[report]\nflush_interval = \"100ms\"\n");
    let mut tally = start_piped(&w, &config, true);
    w.backend()
        .wait_until(WAIT, "the first 30 lines", |b| b.transactions().len() >= 30);
    let reports_before = w.proxy.requests(REPORT);
    set_file_size_limit(tally.pid(), 16).expect("lower tally's RLIMIT_FSIZE");
    expected.extend(w.append(30, 20));
    let body = w.wait_for_health(503, "");
    assert!(
        body.contains("state of service 42") && body.contains("cannot write the state"),
        "{body}"
    );
    // Reporting waits: the new lines' call needs its in-flight record first. Each failed write is
    // an ERROR with its retry: three of them are three chances tally had to send the call, and
    // did not take.
    tally.wait_for_events(
        "ERROR",
        &[("service_id", "42"), ("error", "*"), ("retry_in", "*")],
        3,
        WAIT,
    );
    assert_eq!(
        w.backend().transactions().len(),
        30,
        "a report went out while its state could not be written"
    );
    assert_eq!(
        w.proxy.requests(REPORT),
        reports_before,
        "a report call went out"
    );
    assert!(
        tally.child.try_wait().expect("try_wait").is_none(),
        "tally died while its state could not be written:\n{}",
        tally.logs()
    );
    set_file_size_limit(tally.pid(), u64::MAX).expect("raise tally's RLIMIT_FSIZE again");
    w.backend()
        .wait_until(WAIT, "all 50 lines", |b| b.transactions().len() >= 50);
    w.wait_for_health(200, "");
    tally.signal("TERM");
    let status = tally.wait(WAIT);
    assert!(status.success(), "tally exited {status}:\n{}", tally.logs());
    assert_eq!(
        received(w.backend()),
        sorted(expected.clone()),
        "{}",
        tally.logs()
    );
    // The checkpoint written once the folder recovered is where a second run starts: nothing more.
    let calls = w.proxy.requests(REPORT);
    Tally::run_once(&config);
    assert_eq!(
        w.proxy.requests(REPORT),
        calls,
        "a second run sent a report call again"
    );
    assert_eq!(received(w.backend()), sorted(expected));
}

/// Under a file-size limit (`ulimit -f`, systemd's `LimitFSIZE=`) a state write past the limit
/// sends SIGXFSZ, whose default action kills the process with a core dump. tally must treat that
/// write like any failed write (503 on /healthz, reporting waits) and live on.
#[test]
fn a_file_size_limit_does_not_kill_tally() {
    if !prlimit_permitted() {
        return;
    }
    let w = World::new();
    let mut expected = w.append(0, 10);
    let config = w.config("", "[report]\nflush_interval = \"100ms\"\n");
    let mut tally = start_piped(&w, &config, false);
    w.backend()
        .wait_until(WAIT, "the first 10 lines", |b| b.transactions().len() >= 10);
    set_file_size_limit(tally.pid(), 16).expect("lower tally's RLIMIT_FSIZE");
    expected.extend(w.append(10, 10));
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = tally.child.try_wait().expect("try_wait") {
            use std::os::unix::process::ExitStatusExt;
            panic!(
                "tally died ({status}, signal {:?}; SIGXFSZ is {}) when a state write went past its \
                 file-size limit, instead of reporting the failed write:\n{}",
                status.signal(),
                libc::SIGXFSZ,
                tally.logs()
            );
        }
        // tally may die between the two looks: an unanswered GET is looked at again.
        if matches!(telemetry_try_get(w.port, "/healthz"), Ok((503, _))) {
            break;
        }
        assert!(Instant::now() < deadline, "/healthz never turned 503");
        std::thread::sleep(Duration::from_millis(50));
    }
    set_file_size_limit(tally.pid(), u64::MAX).expect("raise tally's RLIMIT_FSIZE again");
    w.backend()
        .wait_until(WAIT, "all 20 lines", |b| b.transactions().len() >= 20);
    tally.signal("TERM");
    assert!(tally.wait(WAIT).success(), "{}", tally.logs());
    assert_eq!(received(w.backend()), sorted(expected));
}

/// An authorize answer that is not 3scale's (`200 OK` with a body that is not its XML, as from a
/// captive proxy, a maintenance page or a misrouted URL) says nothing about a credential: taken as
/// "exists", it would let an unknown credential into a report call, which 3scale then drops whole
/// (valid lines included), and cache that for `valid_credential_ttl`. tally must treat it as a failed
/// check (the batch waits), then, with real answers, report the known credentials only.
#[test]
fn a_200_that_is_not_an_authorize_answer_vouches_for_no_credential() {
    let w = World::new();
    // key-6 does not exist in 3scale.
    w.backend()
        .set_applications(&["key-0", "key-1", "key-2", "key-3", "key-4", "key-5"]);
    w.proxy.set_for(Endpoint::Authorize, Fault::Ok200Garbage);
    let all = w.append(0, 40);
    let tally = Tally::start(
        &w.config(
            "",
            "[report]\nflush_interval = \"100ms\"\nmax_transactions = 10\n",
        ),
        &[],
    );
    // Two failed rounds of checks, counted as such: after the first, a tally that took the answers
    // for "exists" would have sent its report call instead of checking again.
    poll_until(
        WAIT,
        "two failed rounds of credential checks",
        || {
            // Not listening yet is not an answer.
            telemetry_try_get(w.port, "/metrics")
                .is_ok_and(|(_, m)| failures(&m, "authorize", "unexpected_answer") >= 2)
        },
        || format!("{:?}", telemetry_try_get(w.port, "/metrics")),
    );
    assert_eq!(
        w.proxy.requests(REPORT),
        0,
        "a report call with unchecked credentials:\n{}",
        tally.logs()
    );
    assert!(
        w.backend().dropped().is_empty(),
        "tally took a 200 that was no authorize answer for \"exists\": 3scale dropped {} calls whole \
         ({} lines, valid ones included)",
        w.backend().dropped().len(),
        w.backend().dropped().iter().map(|d| d.transactions.len()).sum::<usize>()
    );
    w.proxy.set(Fault::Pass);
    let expected: Vec<Seen> = all.into_iter().filter(|(k, _, _)| k != "key-6").collect();
    let n = expected.len();
    w.backend()
        .wait_until(WAIT, "the known credentials' lines", |b| {
            b.transactions().len() >= n
        });
    let logs = tally.stop(WAIT);
    assert_eq!(received(w.backend()), sorted(expected), "{logs}");
    assert!(
        w.backend().dropped().is_empty(),
        "{:?}",
        w.backend().dropped()
    );
}

/// A report is accepted with `202 Accepted` (the spec: "Success: 202 Accepted, empty body"). A
/// `200 OK` with a body that is not 3scale's comes from something else on the way (a captive proxy,
/// a maintenance page) and the report never reached 3scale: taken as accepted, its lines are lost.
#[test]
fn a_200_that_is_not_a_report_answer_does_not_count_as_accepted() {
    let w = World::new();
    w.proxy.set_for(Endpoint::Report, Fault::Ok200Garbage);
    let expected = w.append(0, 20);
    let tally = Tally::start(
        &w.config(
            "",
            "[report]\nflush_interval = \"100ms\"\nmax_transactions = 10\n",
        ),
        &[],
    );
    w.proxy
        .wait_until(WAIT, "2 report calls answered 200 garbage", |p| {
            p.applied(Endpoint::Report, Fault::Ok200Garbage) >= 2
        });
    w.proxy.set(Fault::Pass);
    // Everything accepted by tally's own account: a 200 taken for accepted would be counted here
    // too, and missing at the backend.
    wait_until_all_accepted(&w);
    let logs = tally.stop(WAIT);
    assert_eq!(
        received(w.backend()),
        sorted(expected),
        "lines answered `200 OK` by something that is not 3scale were taken as reported:\n{logs}"
    );
}

/// Lines that each name themselves by their timestamp (`t0 + i`), with their byte ranges in the
/// access log, so that each transaction the backend accepted maps back to its line and its bytes.
struct Numbered {
    t0: i64,
    /// (what line i must arrive as, its first byte, just past its last byte)
    lines: Vec<(Seen, u64, u64)>,
    end: u64,
}

impl Numbered {
    fn new() -> Numbered {
        Numbered {
            t0: now() - 3000,
            lines: Vec::new(),
            end: 0,
        }
    }

    fn append(&mut self, w: &World, n: usize) {
        let mut text = String::new();
        for _ in 0..n {
            let i = self.lines.len();
            let key = format!("key-{}", i % 7);
            let code = [200, 404, 500, 201, 503][i % 5];
            let t = self.t0 + i as i64;
            let line = combined_line(t, "GET", &format!("/v1/x?user_key={key}"), code);
            let start = self.end;
            self.end += line.len() as u64;
            self.lines
                .push(((key, code.to_string(), t), start, self.end));
            text += &line;
        }
        w.s.append(&text);
    }

    fn len(&self) -> usize {
        self.lines.len()
    }

    /// Holds what arrived to what tally said: every line arrived, and at most once more per resent
    /// range it lies in (exactly once more when `processed`: every try reached the backend). No
    /// other transaction arrived. Returns the duplicates.
    fn check(&self, b: &Backend, ranges: &[(u64, u64)], processed: bool, logs: &str) -> usize {
        let mut count = vec![0usize; self.len()];
        for t in b.transactions() {
            let i = usize::try_from(t.timestamp() - self.t0)
                .ok()
                .filter(|&i| i < self.len())
                .unwrap_or_else(|| panic!("a transaction of no line: {t:?}"));
            let (seen, _, _) = &self.lines[i];
            assert_eq!(
                (t.credential(), t.code.clone().unwrap_or_default()),
                (seen.0.clone(), seen.1.clone()),
                "line {i} arrived changed"
            );
            count[i] += 1;
        }
        let mut duplicates = 0;
        for (i, (_, start, end)) in self.lines.iter().enumerate() {
            let resent = ranges
                .iter()
                .filter(|(from, to)| from <= start && end <= to)
                .count();
            let expected = if processed {
                1 + resent..=1 + resent
            } else {
                1..=1 + resent
            };
            assert!(
                expected.contains(&count[i]),
                "line {i} (bytes {start}..{end}) arrived {} times, in {resent} resent ranges \
                 {ranges:?}; expected {expected:?}\n{logs}",
                count[i]
            );
            duplicates += count[i] - 1;
        }
        duplicates
    }
}

/// Polls /metrics until every byte of the access log is accepted (no call under way any more).
fn wait_until_all_accepted(w: &World) -> String {
    let deadline = Instant::now() + WAIT;
    let path = w.s.log.display().to_string();
    loop {
        let metrics = w.metrics();
        let lag = metric(
            &metrics,
            &format!("tally_file_lag_bytes{{path=\"{path}\"}}"),
        );
        if lag == Some(0.0) {
            return metrics;
        }
        assert!(
            Instant::now() < deadline,
            "not everything accepted (lag {lag:?}):\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The slow-3scale case: 3scale takes 1.5 s to answer, tally's response timeout is 1 s. The first
/// calls time out after 3scale processed them and are resent once (logged, counted), then the
/// raised timeout lets every later call get its answer. So the duplicates are the lines of the calls
/// that were under way when 3scale slowed down (at most `concurrency` calls, each resent once), and
/// they do not grow with the length of the slow period (here at least 12 calls long; before the
/// ambiguous-call handling every try timed out and was processed again: 1.3x-5.8x).
fn a_slow_3scale(all_endpoints: bool) {
    const CONCURRENCY: u64 = 2;
    const MAX_TRANSACTIONS: u64 = 10;
    const SLOW_CALLS: usize = 12;
    let w = World::new();
    let mut lines = Numbered::new();
    lines.append(&w, 40);
    let tally = Tally::start(
        &w.config(
            "timeout = \"1s\"\n",
            &format!(
                "[report]\nflush_interval = \"100ms\"\nmax_transactions = {MAX_TRANSACTIONS}\nconcurrency = {CONCURRENCY}\n"
            ),
        ),
        &[],
    );
    w.backend()
        .wait_until(WAIT, "the first 40 lines", |b| b.transactions().len() >= 40);
    let slow = Fault::Delay(Duration::from_millis(1500));
    if all_endpoints {
        w.proxy.set(slow);
    } else {
        w.proxy.set_for(Endpoint::Report, slow);
    }
    // Lines keep coming while 3scale is slow, for at least SLOW_CALLS report calls.
    let deadline = Instant::now() + WAIT;
    while w.proxy.applied(Endpoint::Report, slow) < SLOW_CALLS {
        lines.append(&w, 5);
        assert!(
            Instant::now() < deadline,
            "only {} slow report calls:\n{}",
            w.proxy.applied(Endpoint::Report, slow),
            tally.logs()
        );
        std::thread::sleep(Duration::from_millis(200)); // the pace of the writes
    }
    w.proxy.set(Fault::Pass);
    lines.append(&w, 10);
    let metrics = wait_until_all_accepted(&w);
    let logs = tally.stop(WAIT);
    let resent = resends(&metrics);
    let ranges = resent_ranges(&logs);
    let duplicates = lines.check(w.backend(), &ranges, true, &logs);
    assert!(
        resent >= 1,
        "no call timed out: the test did not make 3scale slow\n{logs}"
    );
    assert!(
        resent <= CONCURRENCY,
        "{resent} resends: more than the {CONCURRENCY} calls under way when 3scale slowed down \
         (the slow period was {} report calls long)\n{logs}",
        w.proxy.applied(Endpoint::Report, slow)
    );
    assert_eq!(
        ranges.len() as u64,
        resent,
        "one resend event per resend\n{logs}"
    );
    assert_eq!(
        failures(&metrics, "report", "timeout"),
        resent,
        "each report timeout, and only they, resent once\n{metrics}"
    );
    assert!(duplicates as u64 <= resent * MAX_TRANSACTIONS);
    assert_eq!(
        w.backend().transactions().len(),
        lines.len() + duplicates,
        "lines written + duplicates"
    );
    assert!(w.backend().dropped().is_empty());
}

#[test]
fn a_slow_3scale_duplicates_only_the_calls_under_way_when_it_slowed_down() {
    a_slow_3scale(true);
}

#[test]
fn a_slow_report_endpoint_duplicates_only_the_calls_under_way_when_it_slowed_down() {
    a_slow_3scale(false);
}

/// Connections broken after 3scale processed the call (a load balancer or a backend that dies after
/// the work, before the answer): each try may count. tally cannot avoid counting the calls it
/// resends, but it must resend with the backoff the README promises for connection errors (0.5 s
/// doubling), not at once in a loop: over 4 s of this fault a handful of tries, each logged as
/// resent, and every line arriving once more per resend that covered it.
#[test]
fn connections_broken_after_processing_are_retried_with_backoff() {
    let w = World::new();
    let mut lines = Numbered::new();
    lines.append(&w, 10);
    let tally = Tally::start(
        &w.config(
            "",
            "[report]\nflush_interval = \"100ms\"\nmax_transactions = 10\n",
        ),
        &[],
    );
    w.backend()
        .wait_until(WAIT, "the first 10 lines", |b| b.transactions().len() >= 10);
    let fault_set = Instant::now();
    w.proxy.set_for(Endpoint::Report, Fault::ProcessThenReset);
    lines.append(&w, 10);
    w.proxy
        .wait_until(WAIT, "a report call broken after processing", |p| {
            p.applied(Endpoint::Report, Fault::ProcessThenReset) >= 1
        });
    // The fault holds for 4 s: a sleep that sets the window in which the tries are counted, not a
    // synchronization (the bound below follows from the window measured).
    std::thread::sleep(Duration::from_secs(4));
    w.proxy.set(Fault::Pass);
    let window = fault_set.elapsed();
    let tries = w.proxy.applied(Endpoint::Report, Fault::ProcessThenReset) as u64;
    let metrics = wait_until_all_accepted(&w);
    let logs = tally.stop(WAIT);
    let ranges = resent_ranges(&logs);
    // Each broken call is resent (logged with its range) at least once: the calls are the ranges.
    let calls = ranges
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .len() as u64;
    // The backoff starts at 0.5 s and doubles, each wait at least half its step: n tries of one
    // call take at least 0.25 s * (2^(n-1) - 1). The most tries that fit in the window, per call:
    let mut per_call = 1u64;
    while Duration::from_millis(250) * ((1u32 << per_call) - 1) <= window {
        per_call += 1;
    }
    assert!(
        calls >= 1 && tries <= calls * per_call,
        "{tries} report calls of {calls} broken calls in {window:?} of broken connections (at \
         most {per_call} each with the backoff; {} authorize probes): no backoff between resends",
        w.proxy.requests("/transactions/authorize.xml"),
    );
    assert_eq!(resends(&metrics), ranges.len() as u64, "{metrics}");
    lines.check(w.backend(), &ranges, true, &logs);
}

/// `--once --max-wait` as a backfill job against a 3scale whose report endpoint hangs (a call that
/// would wait for its 10 s response timeout): it gives up at `--max-wait` plus the shutdown grace
/// with exit code 3, the call under way recorded as such; the next run says so, and, 3scale
/// answering again, delivers every line once (the hung call never reached the backend).
#[test]
fn once_with_max_wait_gives_up_on_a_hanging_3scale_and_the_next_run_delivers_everything() {
    let w = World::new();
    let expected = w.append(0, 30);
    w.proxy.set_for(Endpoint::Report, Fault::Hang);
    let config = w.config(
        "timeout = \"10s\"\n",
        "[report]\nflush_interval = \"100ms\"\nshutdown_grace = \"1s\"\n",
    );
    let started = Instant::now();
    let mut tally = Tally::start(&config, &["--once", "--max-wait", "2s"]);
    let status = tally.wait(WAIT);
    let took = started.elapsed();
    let logs = tally.logs();
    assert_eq!(status.code(), Some(3), "{logs}");
    assert!(
        took < Duration::from_secs(10),
        "--max-wait 2s and a 1 s grace took {took:?}:\n{logs}"
    );
    assert!(w.proxy.applied(Endpoint::Report, Fault::Hang) >= 1);
    assert!(w.backend().transactions().is_empty());
    w.proxy.set(Fault::Pass);
    let next = Tally::run_once(&config);
    // The next run says which bytes were under way (they may count twice): the whole file, in
    // one call, a WARN with the service, the path and the range.
    let len = std::fs::metadata(&w.s.log).unwrap().len().to_string();
    let path = w.s.log.display().to_string();
    let under_way = [
        ("service_id", "42"),
        ("path", path.as_str()),
        ("from", "0"),
        ("to", len.as_str()),
    ];
    assert_eq!(
        events_with(&next.logs(), "WARN", &under_way).len(),
        1,
        "{}",
        next.logs()
    );
    assert_eq!(received(w.backend()), sorted(expected));
    w.proxy
        .wait_until(WAIT, "no call open at the proxy", |p| p.open() == 0);
}

/// Admission (the credential check) is a step of its own: while a new credential's check hangs,
/// a report call that finishes meanwhile is checkpointed all the same.
#[test]
fn a_call_that_finishes_is_checkpointed_while_a_credential_check_hangs() {
    let w = World::new();
    let t = now();
    let first = combined_line(t, "GET", "/?user_key=known", 200);
    let second = combined_line(t, "GET", "/?user_key=newcomer", 200);
    // Calls take 2 s to answer; a hanging check fails only after 4 s.
    w.proxy
        .set_for(Endpoint::Report, Fault::Delay(Duration::from_secs(2)));
    let tally = Tally::start(
        &w.config(
            "timeout = \"4s\"\n",
            "[report]\nflush_interval = \"100ms\"\n",
        ),
        &[],
    );
    w.s.append(&first);
    w.proxy
        .wait_until(WAIT, "the first report call", |p| p.requests(REPORT) >= 1);
    w.proxy.set_for(Endpoint::Authorize, Fault::Hang);
    w.s.append(&second);
    w.proxy.wait_until(WAIT, "the newcomer's check", |p| {
        p.applied(Endpoint::Authorize, Fault::Hang) >= 1
    });
    // The first call ends 2 s after it was sent: its checkpoint follows, the check still hanging.
    poll_until(
        WAIT,
        "the first call's checkpoint while the second batch's credential check hangs",
        || w.file_gauge("tally_file_lag_bytes") == second.len() as u64,
        || w.metrics(),
    );
    assert_eq!(
        w.proxy.requests(REPORT),
        1,
        "the newcomer was not reported unchecked"
    );
    w.proxy.set(Fault::Pass);
    w.backend()
        .wait_until(WAIT, "both lines", |b| b.transactions().len() >= 2);
    tally.stop(WAIT);
    let keys = w.backend().credentials();
    assert_eq!(keys, ["known", "newcomer"]);
}
