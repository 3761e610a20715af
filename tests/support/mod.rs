//! Shared parts of the integration tests: the test 3scale backend and a tally process under test.
#![allow(dead_code)] // each test binary uses its own subset

pub mod backend;
pub mod nginx;
pub mod portal;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A tally process, its stderr captured to a file for the assertions and for failure reports.
pub struct Tally {
    pub child: Child,
    pub log: PathBuf,
    pub stdout: PathBuf,
}

/// Drop kills tally when a test ends or panics; this covers a test process that is killed itself
/// (a CI timeout), which runs no Drop. The signal follows the spawning thread: the test's, which
/// outlives the process value.
fn die_with_the_test(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches nothing of the parent's memory.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(command, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl Tally {
    /// Starts `tally run --config CONFIG EXTRA...`. Each start logs to files of its own.
    pub fn start(config: &Path, extra: &[&str]) -> Tally {
        Tally::start_env(config, extra, &[])
    }

    /// [`Tally::start`] with these environment variables set.
    pub fn start_env(config: &Path, extra: &[&str], env: &[(&str, &str)]) -> Tally {
        static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = config.parent().expect("config in a folder");
        let log = dir.join(format!("tally-{n}.stderr"));
        let stdout = dir.join(format!("tally-{n}.stdout"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
        command
            .args(["run", "--config"])
            .arg(config)
            .args(extra)
            .env("RUST_LOG", "tally=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&log).expect("stderr file"));
        die_with_the_test(&mut command);
        let child = command.spawn().expect("start tally");
        Tally { child, log, stdout }
    }

    /// Runs `tally run --once --config CONFIG` to its end and asserts that it succeeded.
    pub fn run_once(config: &Path) -> Tally {
        let mut tally = Tally::start(config, &["--once"]);
        let status = tally.wait(Duration::from_secs(60));
        assert!(
            status.success(),
            "tally --once failed ({status}):\n{}",
            tally.logs()
        );
        tally
    }

    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{name} failed");
    }

    /// Stops tally with SIGTERM, asserts that it exited 0 within `timeout`; returns its log.
    pub fn stop(mut self, timeout: Duration) -> String {
        self.signal("TERM");
        let status = self.wait(timeout);
        assert!(status.success(), "tally exited {status}:\n{}", self.logs());
        self.logs()
    }

    /// Waits for the process to exit, or panics after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "tally did not exit within {timeout:?}; its log:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Polls the log until it contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        self.wait_for_logs(needle, 1, timeout);
    }

    /// Polls the log until it contains `needle` `times` times.
    pub fn wait_for_logs(&self, needle: &str, times: usize, timeout: Duration) {
        poll_until(
            timeout,
            &format!("{times} times `{needle}` in tally's log"),
            || self.logs().matches(needle).count() >= times,
            || format!("tally's log:\n{}", self.logs()),
        );
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tally configuration for tests: one source per `(path, service_id)`; `extra` adds tables.
pub fn write_config(
    dir: &Path,
    backend_url: &str,
    token: &str,
    sources: &[(&Path, &str)],
    extra: &str,
) -> PathBuf {
    write_config_with(dir, backend_url, token, "", sources, extra)
}

/// The same, with `backend_extra` keys in the [backend] table.
pub fn write_config_with(
    dir: &Path,
    backend_url: &str,
    token: &str,
    backend_extra: &str,
    sources: &[(&Path, &str)],
    extra: &str,
) -> PathBuf {
    // Far beyond a loaded machine's stalls: a call that times out after the backend processed it is
    // sent again and counts twice (README, "Exactness"), which the tests' exact counts would take
    // for a bug. A test of timeouts sets its own.
    let timeout = if backend_extra
        .lines()
        .any(|l| l.trim_start().starts_with("timeout"))
    {
        ""
    } else {
        "timeout = \"20s\"\n"
    };
    let mut text = format!(
        "[backend]\nurl = \"{backend_url}\"\nservice_token = \"{token}\"\n{timeout}{backend_extra}"
    );
    for (path, service_id) in sources {
        text.push_str(&format!(
            "\n[[sources]]\npath = \"{}\"\nservice_id = \"{service_id}\"\nread_from = \"beginning\"\n",
            path.display()
        ));
    }
    text.push_str(extra);
    if !extra.contains("[state]") {
        text.push_str(&format!(
            "\n[state]\ndir = \"{}\"\n",
            dir.join("state").display()
        ));
    }
    let config = dir.join("tally.toml");
    std::fs::write(&config, text).expect("write config");
    config
}

/// The first of `candidates` (paths of the program `name`, a Debian package's) that exists, or None
/// and a message when `test` should be skipped; with `require` set in the environment (CI sets it),
/// a missing program fails the test instead.
pub fn program_or_skip(
    test: &str,
    name: &str,
    candidates: &[&str],
    require: &str,
) -> Option<PathBuf> {
    let found = candidates.iter().map(PathBuf::from).find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var_os(require).is_none(),
            "{require} is set but {name} is not installed"
        );
        eprintln!("SKIPPED {test}: {name} is not installed (apt-get install {name})");
    }
    found
}

/// Appends `text` to the file at `path` (created if need be).
pub fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open the log");
    f.write_all(text.as_bytes()).expect("append to the log");
}

/// A combined-format line.
pub fn combined_line(epoch: i64, method: &str, target: &str, status: u16) -> String {
    format!("203.0.113.9 - - [{}] \"{method} {target} HTTP/1.1\" {status} 12 \"-\" \"test-agent/1.0\"\n", time_local(epoch))
}

/// Epoch seconds → `dd/Mon/yyyy:HH:MM:SS +0000`, written independently of tally's parser.
pub fn time_local(epoch: i64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = epoch.div_euclid(86_400);
    let secs = epoch.rem_euclid(86_400);
    // Walk the calendar from 1970: slow, obviously right.
    let (mut year, mut day) = (1970, days);
    let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    while day >= if leap(year) { 366 } else { 365 } {
        day -= if leap(year) { 366 } else { 365 };
        year += 1;
    }
    let lengths = [
        31,
        if leap(year) { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let mut month = 0;
    while day >= lengths[month] {
        day -= lengths[month];
        month += 1;
    }
    format!(
        "{:02}/{}/{}:{:02}:{:02}:{:02} +0000",
        day + 1,
        MONTHS[month],
        year,
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// One test's world: a temp folder (kept if the test fails), a test backend that knows service 42
/// with token `tok`, and `access.log` in the folder.
pub struct Scenario {
    pub dir: tempfile::TempDir,
    pub backend: backend::Backend,
    pub log: PathBuf,
}

impl Scenario {
    pub fn new() -> Scenario {
        let dir = tempfile::tempdir().expect("temp folder");
        let log = dir.path().join("access.log");
        Scenario {
            dir,
            backend: backend::Backend::start(&[("42", "tok")]),
            log,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Appends text to the access log.
    pub fn append(&self, text: &str) {
        append(&self.log, text);
    }

    /// A configuration reporting the access log to service 42 with token `tok`.
    pub fn config(&self, backend_extra: &str, extra: &str) -> PathBuf {
        write_config_with(
            self.dir.path(),
            &self.backend.url(),
            "tok",
            backend_extra,
            &[(&self.log, "42")],
            extra,
        )
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let kept =
                std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp folder")).keep();
            eprintln!("the failed test's files are kept in {}", kept.display());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fault injection and telemetry helpers (tests/faults.rs, tests/secrets.rs).
// ---------------------------------------------------------------------------------------------

pub mod proxy;

/// A tally started by [`Tally::start_with`]: its stderr goes through a pipe that a thread copies to
/// the log file, so that a file-size limit set on tally never applies to its own log. It derefs to
/// the [`Tally`]; `wait` also waits for the last log bytes to be copied.
pub struct PipedTally {
    pub tally: Tally,
    copier: Option<std::thread::JoinHandle<()>>,
}

impl PipedTally {
    /// Waits for the process to exit (or panics after `timeout`) and for its log to be copied.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let status = self.tally.wait(timeout);
        if let Some(copier) = self.copier.take() {
            let _ = copier.join();
        }
        status
    }

    pub fn pid(&self) -> i32 {
        self.tally.child.id() as i32
    }
}

impl std::ops::Deref for PipedTally {
    type Target = Tally;
    fn deref(&self) -> &Tally {
        &self.tally
    }
}

impl std::ops::DerefMut for PipedTally {
    fn deref_mut(&mut self) -> &mut Tally {
        &mut self.tally
    }
}

impl Tally {
    /// Starts `tally ARGS...` (the whole command line after the binary) with `RUST_LOG=rust_log`,
    /// after `setup` has adjusted the command. stdout goes to a file, stderr through a pipe.
    pub fn start_with(
        dir: &Path,
        args: &[&std::ffi::OsStr],
        rust_log: &str,
        setup: impl FnOnce(&mut Command),
    ) -> PipedTally {
        static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let log = dir.join(format!("tally-piped-{n}.stderr"));
        let stdout = dir.join(format!("tally-piped-{n}.stdout"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
        command
            .args(args)
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(Stdio::piped());
        setup(&mut command);
        die_with_the_test(&mut command);
        let mut child = command.spawn().expect("start tally");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let mut file = std::fs::File::create(&log).expect("stderr file");
        let copier = std::thread::spawn(move || {
            let _ = std::io::copy(&mut stderr, &mut file);
        });
        PipedTally {
            tally: Tally { child, log, stdout },
            copier: Some(copier),
        }
    }
}

/// A loopback port free a moment ago (bound, then released), for tally's telemetry.
pub fn telemetry_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local addr")
        .port()
}

/// `GET path` on tally's telemetry port over a plain TCP stream: (status, body). Panics on no
/// answer within 10 s.
pub fn telemetry_get(port: u16, path: &str) -> (u16, String) {
    telemetry_try_get(port, path).unwrap_or_else(|e| panic!("GET {path} on tally's telemetry: {e}"))
}

/// The same, an error instead of a panic when tally does not answer (it may have died).
pub fn telemetry_try_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: tally\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let answer = String::from_utf8_lossy(&answer).to_string();
    let status = answer
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not an HTTP answer: {answer:?}"),
            )
        })?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Polls `done` every 20 ms until it holds; past `timeout`, panics with what it waited for and what
/// `state` says of the world then. The tests' one way to wait for something.
pub fn poll_until(
    timeout: Duration,
    what: &str,
    mut done: impl FnMut() -> bool,
    state: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; {}",
            state()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `/healthz` on tally's telemetry port (not listening yet is not an answer) until it answers
/// `status` with a body holding `needle`; returns the body.
pub fn wait_for_health(port: u16, status: u16, needle: &str, timeout: Duration) -> String {
    let last = std::cell::RefCell::new(None);
    poll_until(
        timeout,
        &format!("/healthz to answer {status} with `{needle}`"),
        || {
            let answer = telemetry_try_get(port, "/healthz");
            let done =
                matches!(&answer, Ok((got, body)) if *got == status && body.contains(needle));
            *last.borrow_mut() = Some(answer);
            done
        },
        || format!("its last answer: {:?}", last.borrow()),
    );
    match last.into_inner() {
        Some(Ok((_, body))) => body,
        _ => unreachable!("poll_until returns on an answer"),
    }
}

/// The value of the `/metrics` sample `name` (labels as tally writes them); panics without it.
pub fn sample(metrics: &str, name: &str) -> u64 {
    metric(metrics, name).unwrap_or_else(|| panic!("no {name} in /metrics:\n{metrics}")) as u64
}

/// The value of the Prometheus sample `name` (with its labels, exactly as tally writes them, e.g.
/// `tally_call_failures_total{endpoint="report",cause="timeout"}`), if the text has it.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

// ---------------------------------------------------------------------------------------------
// tally's JSON log (`[log] format = "json"`): each line one event, its fields at the top level
// beside `level`, `message` and `target`. The tests look at an event's level and fields, which
// stay when a message is reworded.
// ---------------------------------------------------------------------------------------------

/// The `[log]` table that makes tally log JSON lines, for a configuration's `extra`.
pub const JSON_LOGS: &str = "\n[log]\nformat = \"json\"\n";

/// The events of a JSON log, in order. Lines that are not JSON objects (a panic's message, written
/// by the runtime) are left out; a line that starts as one and does not parse fails the test.
pub fn events(logs: &str) -> Vec<serde_json::Value> {
    logs.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON event ({e}): {l}")))
        .collect()
}

/// Whether `event` has each of `fields` with that value: a string field compares as itself, any
/// other value as its JSON text (`"from", "0"` matches the number 0). A value `*` only asks that
/// the field be there.
pub fn has_fields(event: &serde_json::Value, fields: &[(&str, &str)]) -> bool {
    fields.iter().all(|(name, want)| match event.get(name) {
        None => false,
        Some(_) if *want == "*" => true,
        Some(serde_json::Value::String(s)) => s == want,
        Some(other) => *want == other.to_string().as_str(),
    })
}

/// The events at `level` (`"WARN"`, ...) with each of `fields` (see [`has_fields`]).
pub fn events_with(logs: &str, level: &str, fields: &[(&str, &str)]) -> Vec<serde_json::Value> {
    events(logs)
        .into_iter()
        .filter(|e| e["level"] == level && has_fields(e, fields))
        .collect()
}

/// When an event was logged: seconds since midnight UTC, from its `timestamp`
/// (`2024-05-01T12:34:56.789012Z`), for the time between two events of one test.
pub fn seconds(event: &serde_json::Value) -> f64 {
    let stamp = event["timestamp"]
        .as_str()
        .unwrap_or_else(|| panic!("no timestamp in {event}"));
    let time = stamp
        .split_once('T')
        .and_then(|(_, t)| t.strip_suffix('Z'))
        .unwrap_or_else(|| panic!("not an RFC 3339 UTC timestamp: {stamp}"));
    let parts: Vec<f64> = time
        .split(':')
        .map(|p| {
            p.parse()
                .unwrap_or_else(|_| panic!("bad timestamp {stamp}"))
        })
        .collect();
    parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]
}

/// A number field of an event; panics without it.
pub fn number(event: &serde_json::Value, name: &str) -> u64 {
    event[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {name} in {event}"))
}

/// The last summary of the counters tally logged (at every stats interval, and when it stops: the
/// event with every counter, `lines_read` to `authorize_failures`).
pub fn last_summary(logs: &str) -> serde_json::Value {
    events(logs)
        .into_iter()
        .rfind(|e| has_fields(e, &[("lines_read", "*"), ("authorize_failures", "*")]))
        .unwrap_or_else(|| panic!("no summary of the counters in tally's log:\n{logs}"))
}

impl Tally {
    /// Polls the (JSON) log until it has `times` events at `level` with `fields`.
    pub fn wait_for_events(
        &self,
        level: &str,
        fields: &[(&str, &str)],
        times: usize,
        timeout: Duration,
    ) {
        poll_until(
            timeout,
            &format!("{times} {level} events with {fields:?} in tally's log"),
            || events_with(&self.logs(), level, fields).len() >= times,
            || format!("tally's log:\n{}", self.logs()),
        );
    }
}
