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

/// `lines` lines over 20 credentials (user_keys, app_ids, an encoded one), some without one; as
/// JSON lines with the default keys when `json`.
fn write_log(path: &Path, lines: usize, json: bool) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for i in 0..lines {
        let query = match i % 10 {
            0 => "?page=1".to_string(),
            1..=5 => format!("?user_key=key{}&page={i}", i % 7),
            6..=8 => format!("?app_id=app{}&app_key=k", i % 12),
            _ => "?user_key=caf%C3%A9".to_string(),
        };
        let (minute, second, status) = (i / 60 % 60, i % 60, [200, 404, 500][i % 3]);
        if json {
            writeln!(
                out,
                r#"{{"time":"2026-11-25T10:{minute:02}:{second:02}+00:00","remote_addr":"10.0.0.{}","method":"GET","uri":"/v1/x{query}","status":{status},"bytes":512,"user_agent":"curl/8.5.0"}}"#,
                i % 250
            )
        } else {
            writeln!(
                out,
                "10.0.0.{} - - [25/Nov/2026:10:{minute:02}:{second:02} +0000] \"GET /v1/x{query} HTTP/1.1\" {status} 512 \"-\" \"curl/8.5.0\"",
                i % 250,
            )
        }
        .unwrap();
    }
    out.flush().unwrap();
}

/// Reads the file into chunks, then counts the allocations of parsing (as `json` lines or
/// combined) and aggregating them.
fn allocations_to_aggregate(path: &Path, json: bool) -> (u64, u64) {
    let metrics = Arc::new(Metrics::default());
    // Room for the whole file: every chunk is read before the counting starts.
    let (follower, mut rx) = pipeline::read_once(path, 100_000, metrics.clone());
    follower.join();
    let mut messages: Vec<Tailed> = Vec::new();
    while let Ok(message) = rx.try_recv() {
        messages.push(message);
    }
    let mut lines = if json {
        pipeline::json_source()
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

#[test]
fn parsing_and_aggregating_allocate_nothing_per_line() {
    for json in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (small, large) = (dir.path().join("small.log"), dir.path().join("large.log"));
        write_log(&small, 20_000, json);
        write_log(&large, 40_000, json);
        let (small_allocations, small_reported) = allocations_to_aggregate(&small, json);
        let (large_allocations, large_reported) = allocations_to_aggregate(&large, json);
        // 9 lines in 10 carry a credential; full batches only (1000 transactions each).
        assert_eq!(
            (small_reported, large_reported),
            (18_000, 36_000),
            "json: {json}"
        );
        // 18 more full batches, each a few allocations (its vectors, the returned list): a single
        // allocation per line would add 20,000.
        let extra = large_allocations.saturating_sub(small_allocations);
        assert!(
            extra <= 18 * 6,
            "json: {json}: {extra} more allocations for 20,000 more lines ({small_allocations} -> {large_allocations})"
        );
    }
}
