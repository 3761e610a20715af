//! tally's cost, measured in one run against `wc -l` on the same file:
//!
//! 1. a realistic NGINX combined log of N lines (TALLY_BENCH_LINES, default 2,000,000);
//! 2. `wc -l` on it (the machine's reading speed);
//! 3. tally's parse + aggregate path alone, in this process; then the same lines as JSON lines, and
//!    the time per line of each parser alone, JSON's relative to combined's;
//! 4. tally end to end (`tally run --once`, response codes on, credentials checked) into a local
//!    backend that accepts everything and counts what arrives, the state folder on the disk (the
//!    temp folder's file system), then on tmpfs (`/dev/shm`);
//! 5. tally following a stream of 10,000 lines/s, then idle;
//! 6. tally with the Response codes page on, over N lines of 40 codes: its RSS after each quarter.
//!
//! Run: `cargo bench --bench throughput` (TALLY_BENCH_LINES=500000 for a quicker run,
//! TALLY_BENCH_PARSE_ONLY=1 to stop after step 3, e.g. under a profiler).

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tally::pipeline::{civil_from_days, take_in, Aggregator, Container, Metrics, Stream, Wrapper};

#[path = "../tests/support/pipeline.rs"]
mod pipeline;

fn main() {
    let lines: u64 = std::env::var("TALLY_BENCH_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("access.log");
    let json_log = dir.join("access.json.log");
    let main_log = dir.join("access.main.log");
    let credentialed = generate(&log, &json_log, &main_log, lines);
    let bytes = std::fs::metadata(&log).unwrap().len();
    let mb = bytes as f64 / 1e6;
    println!(
        "machine: {} cores; file: {lines} lines, {mb:.0} MB, {credentialed} with a credential",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // wc -l, best of three (the file is in the page cache after the first).
    let wc = (0..3)
        .map(|_| time_command(Command::new("wc").arg("-l").arg(&log)))
        .fold(f64::MAX, f64::min);
    row("wc -l", lines, mb, wc, None, None, wc);

    // Parse + aggregate, best of three.
    let (best, best_cpu) = best_parse_and_aggregate(&log, false, credentialed);
    row(
        "parse + aggregate",
        lines,
        mb,
        best,
        Some(best_cpu),
        None,
        wc,
    );
    let json_mb = std::fs::metadata(&json_log).unwrap().len() as f64 / 1e6;
    let (json_best, json_cpu) = best_parse_and_aggregate(&json_log, true, credentialed);
    row(
        "JSON lines",
        lines,
        json_mb,
        json_best,
        Some(json_cpu),
        None,
        wc,
    );
    let combined_ns = parse_alone(&log, pipeline::combined_parser());
    let main_ns = parse_alone(&main_log, pipeline::main_with_keys());
    let json_ns = parse_alone(&json_log, pipeline::json_parser());
    let regex_ns = parse_alone(&log, pipeline::combined_regex());
    let cri_log = dir.join("access.cri.log");
    cri_wrapped(&log, &cri_log);
    let cri = Container {
        wrapper: Wrapper::Cri,
        stream: Stream::Stdout,
    };
    // Per line, not per record: a split line is three records.
    let records_per_line = count_lines(&cri_log) as f64 / lines as f64;
    let cri_ns = records_per_line
        * parse_alone(
            &cri_log,
            pipeline::combined_parser().unwrapping(cri, 1 << 16),
        );
    println!(
        "  parser alone: combined {combined_ns:.0} ns/line, log_format main + keys {main_ns:.0} ns/line ({:.2}x), JSON lines {json_ns:.0} ns/line ({:.2}x), regex (combined lines) {regex_ns:.0} ns/line ({:.2}x), CRI-wrapped combined (1 line in 10 split in two) {cri_ns:.0} ns/line ({:.2}x); JSON with aggregation {:.2}x",
        main_ns / combined_ns,
        json_ns / combined_ns,
        regex_ns / combined_ns,
        cri_ns / combined_ns,
        json_best / best
    );
    if std::env::var_os("TALLY_BENCH_PARSE_ONLY").is_some() {
        return;
    }

    // End to end into a local backend, the state folder on the disk (the temp folder's file
    // system), then on tmpfs: each report call writes the state.
    let backend = CountingBackend::start();
    let shm = tempfile::tempdir_in("/dev/shm").ok();
    let mut states = vec![("disk", dir.join("state"))];
    if let Some(shm) = &shm {
        states.push(("tmpfs", shm.path().join("state")));
    }
    for (fs, state) in states {
        let config = write_config(
            &dir.join(format!("tally-{fs}.toml")),
            &backend,
            &log,
            &state,
            "read_from = \"beginning\"\n",
            "",
        );
        let (before, calls, authorizations) = (
            backend.transactions(),
            backend.reports.load(Ordering::Relaxed),
            backend.authorizations.load(Ordering::Relaxed),
        );
        let start = Instant::now();
        let child = Command::new(env!("CARGO_BIN_EXE_tally"))
            // A run that cannot finish (the local backend refusing it) ends with an error, not a hang.
            .args(["run", "--once", "--max-wait", "10m", "--config"])
            .arg(&config)
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let (ok, cpu, rss_kib) = wait_with_usage(child);
        let wall = start.elapsed().as_secs_f64();
        assert!(ok, "tally failed");
        assert_eq!(
            backend.transactions() - before,
            credentialed,
            "end to end lost or added transactions"
        );
        row(
            &format!("end to end, {fs}"),
            lines,
            mb,
            wall,
            Some(cpu),
            Some(rss_kib),
            wc,
        );
        println!(
            "  state in {}: {} report calls, {} authorize calls, {} transactions at the backend",
            state.display(),
            backend.reports.load(Ordering::Relaxed) - calls,
            backend.authorizations.load(Ordering::Relaxed) - authorizations,
            backend.transactions() - before
        );
    }

    stream_and_idle(&dir, &backend);
    page_memory(&dir, &backend, lines);
}

fn row(
    what: &str,
    lines: u64,
    mb: f64,
    wall: f64,
    cpu: Option<f64>,
    rss_kib: Option<u64>,
    wc: f64,
) {
    let cpu = cpu.map_or("-".to_string(), |c| {
        format!("{:.3}", c / (lines as f64 / 1e6))
    });
    let rss = rss_kib.map_or("-".to_string(), |k| format!("{:.1}", k as f64 / 1024.0));
    println!(
        "{what:<20} {:>7.2} M lines/s {:>7.0} MB/s  {:>5.1}x wc -l  CPU s per M lines: {cpu:>6}  peak RSS MiB: {rss}",
        lines as f64 / wall / 1e6,
        mb / wall,
        wall / wc
    );
}

/// A combined log: ~1,000 credentials of skewed popularity (user_keys and app_ids), query strings,
/// long user agents, a realistic status mix, some lines without credentials, increasing times over
/// the last hour. Returns how many lines carry a credential.
/// The same lines are written to `json_path` as JSON lines with the default keys, as an NGINX
/// `log_format … escape=json` would log them.
/// And to `main_path` in NGINX's `main` format plus `$request_time` and the key headers
/// ([`pipeline::MAIN_WITH_KEYS`]), the credential in headers instead of the query string.
fn generate(path: &Path, json_path: &Path, main_path: &Path, lines: u64) -> u64 {
    let file =
        |p: &Path| std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(p).unwrap());
    let (mut out, mut json, mut main) = (file(path), file(json_path), file(main_path));
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let agents = [
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
        "okhttp/4.12.0",
        "python-requests/2.31.0",
        "Go-http-client/2.0",
    ];
    let paths = [
        "/v1/words",
        "/v1/words/search",
        "/v2/orders",
        "/v2/orders/12345/items",
        "/health",
        "/v1/stats/daily",
    ];
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let start = now - 3600;
    let mut credentialed = 0;
    for i in 0..lines {
        let t = start + (i as i64 * 3600 / lines as i64);
        let (y, mo, d) = civil_from_days(t.div_euclid(86_400));
        let s = t.rem_euclid(86_400);
        // Skewed popularity: squaring a uniform number favours low ids.
        let r = (next() % 1000) as f64 / 1000.0;
        let who = (r * r * 1000.0) as u64;
        let roll = next() % 100;
        let (user_key, app_id) = (
            format!("{:032x}", who.wrapping_mul(0x9e37_79b9)),
            format!("app{who:05}"),
        );
        let page = next() % 50;
        let (query, main_query, headers) = match roll {
            0..=59 => (
                format!("?user_key={user_key}&page={page}"),
                format!("?page={page}"),
                format!("{user_key} -"),
            ),
            60..=89 => (
                format!("?app_id={app_id}&app_key={:016x}&lang=en", who * 7919),
                "?lang=en".to_string(),
                format!("- {app_id}"),
            ),
            _ => (
                "?page=2".to_string(),
                "?page=2".to_string(),
                "- -".to_string(),
            ),
        };
        if roll < 90 {
            credentialed += 1;
        }
        let status = match next() % 100 {
            0..=84 => 200,
            85..=89 => 201,
            90..=93 => 404,
            94..=95 => 403,
            96..=97 => 500,
            98 => 503,
            _ => 304,
        };
        let address = format!("10.{}.{}.{}", next() % 256, next() % 256, next() % 256);
        let (h, m, sec) = (s / 3600, s / 60 % 60, s % 60);
        let path = paths[(next() % paths.len() as u64) as usize];
        let bytes = next() % 20_000;
        let agent = agents[(next() % agents.len() as u64) as usize];
        writeln!(
            out,
            "{address} - - [{d:02}/{}/{y}:{h:02}:{m:02}:{sec:02} +0000] \"GET {path}{query} HTTP/1.1\" {status} {bytes} \"https://example.com/app\" \"{agent}\"",
            months[mo as usize - 1],
        )
        .unwrap();
        writeln!(
            main,
            "{address} - - [{d:02}/{}/{y}:{h:02}:{m:02}:{sec:02} +0000] \"GET {path}{main_query} HTTP/1.1\" {status} {bytes} \"https://example.com/app\" \"{agent}\" \"-\" 0.012 {headers}",
            months[mo as usize - 1],
        )
        .unwrap();
        writeln!(
            json,
            r#"{{"time":"{y}-{mo:02}-{d:02}T{h:02}:{m:02}:{sec:02}+00:00","remote_addr":"{address}","host":"api.example.com","method":"GET","uri":"{path}{query}","status":{status},"body_bytes_sent":{bytes},"http_referer":"https://example.com/app","http_user_agent":"{agent}","request_time":0.012}}"#
        )
        .unwrap();
    }
    out.flush().unwrap();
    json.flush().unwrap();
    main.flush().unwrap();
    credentialed
}

/// The best of three [`parse_and_aggregate`] runs: (wall, CPU) seconds.
fn best_parse_and_aggregate(log: &Path, json: bool, credentialed: u64) -> (f64, f64) {
    let (mut best, mut best_cpu) = (f64::MAX, 0.0);
    for _ in 0..3 {
        let cpu0 = self_cpu();
        let start = Instant::now();
        let (reported, batches) = parse_and_aggregate(log, json);
        let wall = start.elapsed().as_secs_f64();
        assert_eq!(reported, credentialed, "parse + aggregate lost requests");
        assert!(batches > 0);
        if wall < best {
            best = wall;
            best_cpu = self_cpu() - cpu0;
        }
    }
    (best, best_cpu)
}

fn count_lines(path: &Path) -> usize {
    std::fs::read(path)
        .unwrap()
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
}

/// `log`'s lines as a container runtime writes them (CRI): one `F` record each, but every tenth
/// line split into a `P` and an `F` record, with a stderr record between them.
fn cri_wrapped(log: &Path, cri: &Path) {
    let text = std::fs::read(log).unwrap();
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(cri).unwrap());
    let prefix =
        |stream: &str, tag: &str| format!("2026-11-26T10:15:00.123456789Z {stream} {tag} ");
    for (i, line) in text
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        if i % 10 == 9 {
            let half = line.len() / 2;
            out.write_all(prefix("stdout", "P").as_bytes()).unwrap();
            out.write_all(&line[..half]).unwrap();
            out.write_all(b"\n").unwrap();
            out.write_all(prefix("stderr", "F").as_bytes()).unwrap();
            out.write_all(b"upstream timed out\n").unwrap();
            out.write_all(prefix("stdout", "F").as_bytes()).unwrap();
            out.write_all(&line[half..]).unwrap();
        } else {
            out.write_all(prefix("stdout", "F").as_bytes()).unwrap();
            out.write_all(line).unwrap();
        }
        out.write_all(b"\n").unwrap();
    }
    out.flush().unwrap();
}

/// The parser alone over the file's lines in memory (as combined or `json` lines): nanoseconds
/// per line, best of three.
fn parse_alone(log: &Path, mut parser: tally::pipeline::Parser) -> f64 {
    let text = std::fs::read(log).unwrap();
    let lines: Vec<&[u8]> = text
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    (0..3)
        .map(|_| {
            let start = Instant::now();
            let mut statuses = 0u64;
            for line in &lines {
                statuses += match parser.parse_record(line) {
                    Ok(Some(r)) => u64::from(r.status),
                    _ => 0,
                };
            }
            std::hint::black_box(statuses);
            start.elapsed().as_secs_f64() * 1e9 / lines.len() as f64
        })
        .fold(f64::MAX, f64::min)
}

/// tally's tailer (`--once`: the file as it is) feeding tally's parse + aggregate step, as in
/// `tally run` but without reporting (`json`: JSON lines). Returns (requests in sealed batches,
/// batches).
fn parse_and_aggregate(log: &Path, json: bool) -> (u64, u64) {
    let mut lines = if json {
        pipeline::json_source()
    } else {
        pipeline::combined_source()
    };
    let mut aggregator = Aggregator::new(true, 1000);
    let metrics = Arc::new(Metrics::default());
    let mut warned = HashSet::new();
    // A small queue, as in `tally run`: the reader waits while parsing is behind.
    let (follower, mut rx) = pipeline::read_once(log, 4, metrics.clone());
    let (mut reported, mut batches) = (0u64, 0u64);
    let mut count = |batch: tally::pipeline::Batch| {
        reported += batch.transactions.requests();
        batches += 1;
    };
    while let Some(message) = rx.blocking_recv() {
        for batch in take_in(&mut lines, &mut aggregator, &message, &metrics, &mut warned) {
            count(batch);
        }
    }
    follower.join();
    if let Some(batch) = aggregator.take() {
        count(batch);
    }
    (reported, batches)
}

fn time_command(cmd: &mut Command) -> f64 {
    let start = Instant::now();
    let status = cmd.stdout(Stdio::null()).status().unwrap();
    assert!(status.success());
    start.elapsed().as_secs_f64()
}

/// CPU seconds (user + system) this process used so far.
fn self_cpu() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn tv(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 / 1e6
}

/// Waits for a child (with wait4, for its CPU time): (success, CPU seconds, peak RSS in KiB). The
/// peak RSS is the child's own `VmHWM`, watched in `/proc` while it runs: wait4's `ru_maxrss`
/// also counts what the child had before its exec (this process's pages, the test files read into
/// memory), which is not tally's.
fn wait_with_usage(child: std::process::Child) -> (bool, f64, u64) {
    let pid = child.id();
    let watcher = std::thread::spawn(move || {
        let mut peak = 0u64;
        // The status file loses its memory lines when the process exits (its memory is gone).
        while let Some(hwm) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
        {
            peak = peak.max(hwm);
            std::thread::sleep(Duration::from_millis(20));
        }
        peak
    });
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child, writing into structs we own.
    let r = unsafe { libc::wait4(pid as i32, &mut status, 0, &mut usage) };
    assert_eq!(r, pid as i32, "wait4 failed");
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    let peak = watcher.join().expect("the RSS watcher");
    (ok, tv(usage.ru_utime) + tv(usage.ru_stime), peak)
}

/// CPU seconds a running process used so far, from /proc.
fn proc_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// tally following a file written at 10,000 lines/s for 10 s, then 10 s without new lines.
fn stream_and_idle(dir: &Path, backend: &CountingBackend) {
    let log = dir.join("stream.log");
    std::fs::write(&log, "").unwrap();
    let config = write_config(
        &dir.join("stream.toml"),
        backend,
        &log,
        &dir.join("stream-state"),
        "",
        "",
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["run", "--config"])
        .arg(&config)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let before = backend.transactions();
    let mut file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    let line = format!(
        "10.0.0.1 - - [{}] \"GET /v1/words?user_key=0000000000000000000000000000abcd HTTP/1.1\" 200 512 \"-\" \"okhttp/4.12.0\"\n",
        time_local_now()
    );
    let cpu0 = proc_cpu(child.id());
    let start = Instant::now();
    let seconds = 10;
    // 100 writes of 100 lines per second.
    for tick in 0..(seconds * 100) {
        file.write_all(line.repeat(100).as_bytes()).unwrap();
        let due = start + Duration::from_millis(10 * (tick + 1));
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    }
    let busy = proc_cpu(child.id()) - cpu0;
    let elapsed = start.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(30);
    while backend.transactions() < before + seconds * 10_000 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let idle0 = proc_cpu(child.id());
    std::thread::sleep(Duration::from_secs(10));
    let idle = proc_cpu(child.id()) - idle0;
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "stream 10,000 lines/s  {:.2}% of one core ({:.3} CPU s over {elapsed:.1} s); {} lines arrived",
        busy / elapsed * 100.0,
        busy,
        backend.transactions() - before
    );
    println!(
        "idle 10 s              {:.2}% of one core ({idle:.3} CPU s)",
        idle / 10.0 * 100.0
    );
}

/// A backend that accepts everything and only counts: so that the benchmark measures tally.
struct CountingBackend {
    addr: std::net::SocketAddr,
    transactions: Arc<AtomicU64>,
    reports: Arc<AtomicU64>,
    authorizations: Arc<AtomicU64>,
}

impl CountingBackend {
    fn start() -> CountingBackend {
        use http_body_util::{BodyExt, Full};
        use hyper::body::Bytes;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let backend = CountingBackend {
            addr,
            transactions: Arc::default(),
            reports: Arc::default(),
            authorizations: Arc::default(),
        };
        let (txs, reports, auths) = (
            backend.transactions.clone(),
            backend.reports.clone(),
            backend.authorizations.clone(),
        );
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let (txs, reports, auths) = (txs.clone(), reports.clone(), auths.clone());
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(
                            move |req: hyper::Request<hyper::body::Incoming>| {
                                let (txs, reports, auths) =
                                    (txs.clone(), reports.clone(), auths.clone());
                                async move {
                                    // As 3scale answers: an authorize <status> document, an
                                    // empty 202 to a report.
                                    let (status, answer) = if req
                                        .uri()
                                        .path()
                                        .starts_with("/transactions/authorize")
                                    {
                                        auths.fetch_add(1, Ordering::Relaxed);
                                        (
                                            200,
                                            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><status><authorized>true</authorized></status>",
                                        )
                                    } else {
                                        let body = req
                                            .into_body()
                                            .collect()
                                            .await
                                            .map(|b| b.to_bytes())
                                            .unwrap_or_default();
                                        let n =
                                            memchr::memmem::find_iter(&body, b"%5Btimestamp%5D=")
                                                .count();
                                        txs.fetch_add(n as u64, Ordering::Relaxed);
                                        reports.fetch_add(1, Ordering::Relaxed);
                                        (202, "")
                                    };
                                    Ok::<_, std::convert::Infallible>(
                                        hyper::Response::builder()
                                            .status(status)
                                            .body(Full::new(Bytes::from_static(answer.as_bytes())))
                                            .unwrap(),
                                    )
                                }
                            },
                        );
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        });
        backend
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn transactions(&self) -> u64 {
        self.transactions.load(Ordering::Relaxed)
    }
}

/// The Response codes page on, over a long stream of lines with 40 codes and a distinct path each:
/// tally's resident memory after each quarter (the page and its API asked each time) stays flat.
fn page_memory(dir: &Path, backend: &CountingBackend, lines: u64) {
    let log = dir.join("page.log");
    std::fs::write(&log, "").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = write_config(
        &dir.join("page.toml"),
        backend,
        &log,
        &dir.join("page-state"),
        "read_from = \"beginning\"\n",
        &format!("[telemetry]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["run", "--config"])
        .arg(&config)
        .spawn()
        .unwrap();
    let get = |path: &str| -> String {
        use std::io::Read;
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return String::new();
        };
        let _ = write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"
        );
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    };
    let read = || -> u64 {
        get("/metrics")
            .lines()
            .find_map(|l| l.strip_prefix("tally_lines_read_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let rss = |pid: u32| -> f64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            })
            .unwrap_or(0.0)
            / 1024.0
    };
    let time = time_local_now();
    let codes: Vec<u16> = (200..210)
        .chain(300..310)
        .chain(400..410)
        .chain(500..510)
        .collect();
    let mut file =
        std::io::BufWriter::new(std::fs::OpenOptions::new().append(true).open(&log).unwrap());
    let quarter = lines / 4;
    let mut shown = Vec::new();
    let cpu0 = proc_cpu(child.id());
    let deadline = Instant::now() + Duration::from_secs(600);
    for q in 1..=4u64 {
        for i in (q - 1) * quarter..q * quarter {
            let code = codes[(i % codes.len() as u64) as usize];
            let key = i % 1000;
            writeln!(
                file,
                "10.0.0.1 - - [{time}] \"GET /v1/items/{i}?user_key=key-{key:012} HTTP/1.1\" {code} 512 \"-\" \"okhttp/4.12.0\""
            )
            .unwrap();
        }
        file.flush().unwrap();
        while read() < q * quarter && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for path in [
            "/",
            "/?code=404&period=24h",
            "/api/codes",
            "/api/calls?limit=1000",
        ] {
            get(path);
        }
        shown.push(format!("{:.1}", rss(child.id())));
    }
    let cpu = proc_cpu(child.id()) - cpu0;
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "page on, {lines} lines (40 codes, a path each): RSS MiB after each quarter: {}; CPU s per M lines: {:.3}",
        shown.join(", "),
        cpu / (lines as f64 / 1e6)
    );
}

/// Now as NGINX's `$time_local` writes it (UTC).
fn time_local_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (y, mo, d) = civil_from_days(now.div_euclid(86_400));
    let s = now.rem_euclid(86_400);
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{d:02}/{}/{y}:{:02}:{:02}:{:02} +0000",
        months[mo as usize - 1],
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// A configuration at `path` reporting `log` to service 1 of `backend`, the state in `state`;
/// `source_extra` adds keys to the source, `extra` tables after it.
fn write_config(
    path: &Path,
    backend: &CountingBackend,
    log: &Path,
    state: &Path,
    source_extra: &str,
    extra: &str,
) -> PathBuf {
    std::fs::write(
        path,
        format!(
            "[backend]\nurl = \"{}\"\nservice_token = \"bench\"\n[[sources]]\npath = \"{}\"\nservice_id = \"1\"\n{source_extra}\
             [state]\ndir = \"{}\"\n[log]\nlevel = \"warn\"\n{extra}",
            backend.url(),
            log.display(),
            state.display()
        ),
    )
    .unwrap();
    path.to_path_buf()
}
