//! The hot path allocates nothing per line: parsing and aggregating twice the lines (same
//! credentials) must cost only the allocations of the extra batches, counted by a global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tally::pipeline::{take_in, Aggregator, Metrics, Tailed};

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

/// `lines` lines over 20 credentials (user_keys, app_ids, an encoded one), some without one: in
/// the combined format with the credential in the query string, or (`main`) in
/// [`pipeline::MAIN_WITH_KEYS`] with the credential in request headers.
fn write_log(path: &Path, lines: usize, main: bool) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for i in 0..lines {
        let (user_key, app_id) = match i % 10 {
            0 => (None, None),
            1..=5 => (Some(format!("key{}", i % 7)), None),
            6..=8 => (None, Some(format!("app{}", i % 12))),
            _ => (Some("caf%C3%A9".to_string()), None),
        };
        let time = format!("25/Nov/2026:10:{:02}:{:02} +0000", i / 60 % 60, i % 60);
        let status = [200, 404, 500][i % 3];
        if main {
            let header = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
            writeln!(
                out,
                "10.0.0.{} - - [{time}] \"GET /v1/x?page={i} HTTP/1.1\" {status} 512 \"-\" \"curl/8.5.0\" \"-\" 0.012 {} {}",
                i % 250,
                header(&user_key),
                header(&app_id),
            )
            .unwrap();
            continue;
        }
        let query = match (user_key, app_id) {
            (Some(k), _) => format!("?user_key={k}&page={i}"),
            (_, Some(a)) => format!("?app_id={a}&app_key=k"),
            _ => "?page=1".to_string(),
        };
        writeln!(
            out,
            "10.0.0.{} - - [{time}] \"GET /v1/x{query} HTTP/1.1\" {status} 512 \"-\" \"curl/8.5.0\"",
            i % 250,
        )
        .unwrap();
    }
    out.flush().unwrap();
}

/// Reads the file into chunks, then counts the allocations of parsing and aggregating them.
fn allocations_to_aggregate(path: &Path, main: bool) -> (u64, u64) {
    let metrics = Arc::new(Metrics::default());
    // Room for the whole file: every chunk is read before the counting starts.
    let (follower, mut rx) = pipeline::read_once(path, 100_000, metrics.clone());
    follower.join();
    let mut messages: Vec<Tailed> = Vec::new();
    while let Ok(message) = rx.try_recv() {
        messages.push(message);
    }
    let mut lines = if main {
        pipeline::source(pipeline::main_with_keys())
    } else {
        pipeline::combined_source()
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
    for main in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (small, large) = (dir.path().join("small.log"), dir.path().join("large.log"));
        write_log(&small, 20_000, main);
        write_log(&large, 40_000, main);
        let (small_allocations, small_reported) = allocations_to_aggregate(&small, main);
        let (large_allocations, large_reported) = allocations_to_aggregate(&large, main);
        let format = if main { "main log_format" } else { "combined" };
        // 9 lines in 10 carry a credential; full batches only (1000 transactions each).
        assert_eq!(
            (small_reported, large_reported),
            (18_000, 36_000),
            "{format}"
        );
        // 18 more full batches, each a few allocations (its vectors, the returned list): a single
        // allocation per line would add 20,000.
        let extra = large_allocations.saturating_sub(small_allocations);
        assert!(
            extra <= 18 * 6,
            "{format}: {extra} more allocations for 20,000 more lines ({small_allocations} -> {large_allocations})"
        );
    }
}
