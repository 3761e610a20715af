//! The hot path allocates nothing per line: parsing and aggregating twice the lines (same
//! credentials) must cost only the allocations of the extra batches, counted by a global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tally::pipeline::{
    take_in, Aggregator, CredentialLocation, CredentialMode, CredentialRule, JwtClaim, LogFormat,
    Metrics, Parser, Tailed,
};

#[path = "support/jwt.rs"]
mod jwt;
use jwt::jwt;
#[path = "support/pipeline.rs"]
mod pipeline;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The formats whose parsing is checked.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Style {
    /// NGINX's combined format, the credential in the query string.
    Combined,
    /// [`pipeline::MAIN_WITH_KEYS`], the credential in request headers.
    Main,
    /// JSON lines with the default `[sources.fields]`, the credential in the `uri`'s query.
    Json,
    /// Combined lines through [`pipeline::COMBINED_REGEX`].
    Regex,
    /// [`OIDC`]: a Bearer JWT whose `client_id` claim is the app_id.
    Oidc,
}

/// NGINX's `combined` with the Authorization header logged.
const OIDC: &str = r#"$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent "$http_referer" "$http_user_agent" "$http_authorization""#;

/// The parser of [`OIDC`] lines.
fn oidc_parser() -> Parser {
    let rule = CredentialRule {
        location: CredentialLocation::Authorization,
        jwt_claim: JwtClaim::new("client_id").unwrap(),
        ..CredentialRule::query(CredentialMode::Oidc)
    };
    let format = LogFormat::nginx(OIDC, &rule).expect("the format compiles");
    Parser::new(format, rule)
}

/// `lines` lines over 20 credentials (user_keys, app_ids, an encoded one), some without one.
fn write_log(path: &Path, lines: usize, style: Style) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for i in 0..lines {
        let (user_key, app_id) = match i % 10 {
            0 => (None, None),
            1..=5 => (Some(format!("key{}", i % 7)), None),
            6..=8 => (None, Some(format!("app{}", i % 12))),
            _ => (Some("caf%C3%A9".to_string()), None),
        };
        let (minute, second, status) = (i / 60 % 60, i % 60, [200, 404, 500][i % 3]);
        let time = format!("25/Nov/2026:10:{minute:02}:{second:02} +0000");
        let query = match (&user_key, &app_id) {
            (Some(k), _) => format!("?user_key={k}&page={i}"),
            (_, Some(a)) => format!("?app_id={a}&app_key=k"),
            _ => "?page=1".to_string(),
        };
        match style {
            Style::Main => {
                let header = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
                writeln!(
                    out,
                    "10.0.0.{} - - [{time}] \"GET /v1/x?page={i} HTTP/1.1\" {status} 512 \"-\" \"curl/8.5.0\" \"-\" 0.012 {} {}",
                    i % 250,
                    header(&user_key),
                    header(&app_id),
                )
            }
            Style::Json => writeln!(
                out,
                r#"{{"time":"2026-11-25T10:{minute:02}:{second:02}+00:00","remote_addr":"10.0.0.{}","method":"GET","uri":"/v1/x{query}","status":{status},"bytes":512,"user_agent":"curl/8.5.0"}}"#,
                i % 250
            ),
            Style::Oidc => {
                // 7 clients, each with 3 tokens over the log.
                let authorization = match (&user_key, &app_id) {
                    (None, None) => "-".to_string(),
                    _ => format!(
                        "Bearer {}",
                        jwt(&format!(r#"{{"client_id":"client{}","exp":{}}}"#, i % 7, i % 3))
                    ),
                };
                writeln!(
                    out,
                    "10.0.0.{} - - [{time}] \"GET /v1/x?page={i} HTTP/1.1\" {status} 512 \"-\" \"curl/8.5.0\" \"{authorization}\"",
                    i % 250,
                )
            }
            Style::Combined | Style::Regex => writeln!(
                out,
                "10.0.0.{} - - [{time}] \"GET /v1/x{query} HTTP/1.1\" {status} 512 \"-\" \"curl/8.5.0\"",
                i % 250,
            ),
        }
        .unwrap();
    }
    out.flush().unwrap();
}

/// Reads the file into chunks, then counts the allocations of parsing and aggregating them.
fn allocations_to_aggregate(path: &Path, style: Style) -> (u64, u64) {
    let metrics = Arc::new(Metrics::default());
    // Room for the whole file: every chunk is read before the counting starts.
    let (follower, mut rx) = pipeline::read_once(path, 100_000, metrics.clone());
    follower.join();
    let mut messages: Vec<Tailed> = Vec::new();
    while let Ok(message) = rx.try_recv() {
        messages.push(message);
    }
    let mut lines = match style {
        Style::Combined => pipeline::combined_source(),
        Style::Main => pipeline::source(pipeline::main_with_keys()),
        Style::Json => pipeline::json_source(),
        Style::Regex => pipeline::source(pipeline::combined_regex()),
        Style::Oidc => pipeline::source(oidc_parser()),
    };
    let mut aggregator = Aggregator::new(true, 1000);
    let mut warned = HashSet::with_capacity(8);
    let mut batches = Vec::with_capacity(100);
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for message in &messages {
        batches.extend(take_in(
            &mut lines,
            &mut aggregator,
            message,
            &metrics,
            &mut warned,
        ));
    }
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    let reported = batches.iter().map(|b| b.transactions.requests()).sum();
    (allocations, reported)
}

/// One test for every format: the allocation counter is the process's, so the formats take turns.
#[test]
fn parsing_and_aggregating_allocate_nothing_per_line() {
    for style in [
        Style::Combined,
        Style::Main,
        Style::Json,
        Style::Regex,
        Style::Oidc,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (small, large) = (dir.path().join("small.log"), dir.path().join("large.log"));
        write_log(&small, 20_000, style);
        write_log(&large, 40_000, style);
        let (small_allocations, small_reported) = allocations_to_aggregate(&small, style);
        let (large_allocations, large_reported) = allocations_to_aggregate(&large, style);
        // 9 lines in 10 carry a credential; full batches only (1000 transactions each).
        assert_eq!(
            (small_reported, large_reported),
            (18_000, 36_000),
            "{style:?}"
        );
        // 18 more full batches, each a few allocations (its vectors, the returned list): a single
        // allocation per line would add 20,000.
        let extra = large_allocations.saturating_sub(small_allocations);
        assert!(
            extra <= 18 * 6,
            "{style:?}: {extra} more allocations for 20,000 more lines ({small_allocations} -> {large_allocations})"
        );
    }
}
