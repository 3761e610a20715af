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
    combined_line, metric, now, telemetry_get, telemetry_port, write_config_with, Scenario, Tally,
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

    /// A configuration reporting the access log to service 42 through the proxy. A `timeout` in
    /// `backend_extra` replaces the helper's own.
    fn config(&self, backend_extra: &str, extra: &str) -> PathBuf {
        let config = write_config_with(
            self.s.dir.path(),
            &self.proxy.url(),
            "tok",
            backend_extra,
            &[(&self.s.log, "42")],
            &format!(
                "{extra}\n[telemetry]\nlisten = \"127.0.0.1:{}\"\n",
                self.port
            ),
        );
        if backend_extra
            .lines()
            .any(|l| l.trim_start().starts_with("timeout "))
        {
            let text = std::fs::read_to_string(&config).expect("read the configuration");
            std::fs::write(&config, text.replacen("timeout = \"2s\"\n", "", 1))
                .expect("write the configuration");
        }
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

    fn healthz(&self) -> (u16, String) {
        telemetry_get(self.port, "/healthz")
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

/// SIGTERM, then a clean exit; the log.
fn stop(mut tally: Tally) -> String {
    tally.signal("TERM");
    let status = tally.wait(WAIT);
    assert!(status.success(), "tally exited {status}:\n{}", tally.logs());
    tally.logs()
}

fn value(metrics: &str, name: &str) -> u64 {
    metric(metrics, name).unwrap_or_else(|| panic!("no {name} in /metrics:\n{metrics}")) as u64
}

/// Report failures tally counted.
fn report_failures(metrics: &str) -> u64 {
    value(metrics, "tally_report_failures_total")
}

/// The common course of the fault tests: 40 lines; `authorize_faults` one after the other (each until
/// the proxy has served it `times` times: the batch waits on its credential check, so no report
/// call may be made), then the checks pass and `report_faults` follow (each `times` times; nothing
/// may arrive),
/// then everything passes; 20 more lines. Every line must arrive exactly once. Returns tally's
/// metrics at the end and its log.
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
        &w.config(
            backend_extra,
            "[report]\nflush_interval = \"100ms\"\nmax_transactions = 10\n",
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
        tally.wait_for_logs(
            "cannot check new credentials; the batch waits",
            rounds,
            WAIT,
        );
        assert!(w.proxy.applied(Endpoint::Authorize, fault) >= before + times);
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
    let metrics = w.metrics();
    let logs = stop(tally);
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

/// The number of times the proxy served `faults` to report calls.
fn served(w: &World, endpoint: Endpoint, faults: &[Fault]) -> u64 {
    faults
        .iter()
        .map(|&f| w.proxy.applied(endpoint, f) as u64)
        .sum()
}

#[test]
fn http_500s_on_authorize_and_report_then_pass_deliver_every_line_once() {
    let w = World::new();
    let (metrics, logs) = faults_then_pass(&w, "", &[Fault::Status500], &[Fault::Status500], 3);
    assert_eq!(
        report_failures(&metrics),
        served(&w, Endpoint::Report, &[Fault::Status500]),
        "every 500 answered to a report call is counted:\n{metrics}"
    );
    assert!(logs.contains("HTTP 500"), "{logs}");
}

#[test]
fn connection_resets_then_pass_deliver_every_line_once() {
    let w = World::new();
    let (metrics, _) = faults_then_pass(&w, "", &[Fault::Reset], &[Fault::Reset], 3);
    assert_eq!(
        report_failures(&metrics),
        served(&w, Endpoint::Report, &[Fault::Reset]),
        "{metrics}"
    );
}

#[test]
fn a_backend_that_hangs_then_passes_delivers_every_line_once() {
    let w = World::new();
    let (metrics, logs) =
        faults_then_pass(&w, "timeout = \"1s\"\n", &[Fault::Hang], &[Fault::Hang], 3);
    assert_eq!(
        report_failures(&metrics),
        served(&w, Endpoint::Report, &[Fault::Hang]),
        "{metrics}"
    );
    assert!(logs.contains("timed out"), "{logs}");
}

#[test]
fn garbage_answers_then_pass_deliver_every_line_once() {
    let w = World::new();
    let report_faults = [Fault::Garbage, Fault::Status500Text];
    let (metrics, _) = faults_then_pass(
        &w,
        "",
        &[Fault::Garbage, Fault::Status500Text],
        &report_faults,
        2,
    );
    assert_eq!(
        report_failures(&metrics),
        served(&w, Endpoint::Report, &report_faults),
        "{metrics}"
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
    set_file_size_limit(tally.pid(), 16).expect("lower tally's RLIMIT_FSIZE");
    expected.extend(w.append(30, 20));
    let deadline = Instant::now() + WAIT;
    let body = loop {
        let (status, body) = w.healthz();
        if status == 503 {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz stayed {status} with state writes failing:\n{body}\n{}",
            tally.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        body.contains("state of service 42") && body.contains("cannot write the state"),
        "{body}"
    );
    tally.wait_for_log("cannot write the state; reporting waits", WAIT);
    // Reporting waits: the new lines' call needs its in-flight record first. Kept failing for a
    // while (a sleep that holds the fault, not a synchronization).
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        w.backend().transactions().len(),
        30,
        "a report went out while its state could not be written"
    );
    assert!(
        tally.child.try_wait().expect("try_wait").is_none(),
        "tally died while its state could not be written:\n{}",
        tally.logs()
    );
    set_file_size_limit(tally.pid(), u64::MAX).expect("raise tally's RLIMIT_FSIZE again");
    w.backend()
        .wait_until(WAIT, "all 50 lines", |b| b.transactions().len() >= 50);
    let deadline = Instant::now() + WAIT;
    while w.healthz().0 != 200 {
        assert!(
            Instant::now() < deadline,
            "still unhealthy: {:?}",
            w.healthz()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
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
        if w.healthz().0 == 503 {
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
    w.proxy.wait_until(WAIT, "a round of authorize calls", |p| {
        p.applied(Endpoint::Authorize, Fault::Ok200Garbage) >= 7
    });
    // Held for a while (a sleep that keeps the fault, not a synchronization).
    std::thread::sleep(Duration::from_millis(1500));
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
    let logs = stop(tally);
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
    let deadline = Instant::now() + Duration::from_secs(20);
    while w.backend().transactions().len() < 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let logs = stop(tally);
    assert_eq!(
        received(w.backend()),
        sorted(expected),
        "lines answered `200 OK` by something that is not 3scale were taken as reported:\n{logs}"
    );
}
