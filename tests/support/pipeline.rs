//! tally's own read → parse + aggregate path for one source (combined, or JSON lines) read once from
//! its start, without reporting: shared by `tests/allocation.rs` and `benches/throughput.rs`
//! (included by path).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tally::pipeline::{
    CredentialMode, CredentialRule, Follower, JsonFields, JsonFormat, LogFormat, Metrics, Parser,
    ServiceLines, TailEvents, TailOptions, Tailed,
};

const MAX_LINE_LENGTH: usize = 64 * 1024;

/// What the parse step needs for source 0, as `tally run` sets it up with the defaults.
pub fn combined_source() -> ServiceLines {
    source(LogFormat::Combined)
}

/// The same for JSON lines with the default `[sources.fields]` (credentials in the `uri`'s query).
pub fn json_source() -> ServiceLines {
    let rule = CredentialRule::query(CredentialMode::Auto);
    let format = JsonFormat::compile(JsonFields::default(), &rule).expect("the default fields");
    source(LogFormat::Json(Arc::new(format)))
}

fn source(format: LogFormat) -> ServiceLines {
    ServiceLines {
        service_id: "1".into(),
        parsers: vec![Some(Parser::new(
            format,
            CredentialRule::query(CredentialMode::Auto),
        ))],
        max_line_length: MAX_LINE_LENGTH,
        flush_interval: Duration::from_secs(5),
        counted: Default::default(),
        panic_on: None,
    }
}

/// tally's tailer reading `log` as it is (`--once`), what it reads in a channel of `capacity`.
pub fn read_once(
    log: &Path,
    capacity: usize,
    metrics: Arc<Metrics>,
) -> (Follower, tokio::sync::mpsc::Receiver<Tailed>) {
    let (tx, rx) = tokio::sync::mpsc::channel(capacity);
    let options = TailOptions {
        start_at_end: false,
        checkpoints: Vec::new(),
        poll_interval: Duration::from_secs(1),
        watch: false,
        rotate_grace: Duration::ZERO,
        max_line_length: MAX_LINE_LENGTH,
        once: true,
    };
    let events: Arc<dyn TailEvents> = metrics;
    let follower = Follower::spawn(0, log.display().to_string(), options, vec![tx], events)
        .expect("the tailer starts");
    (follower, rx)
}
