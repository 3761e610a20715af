//! tally's own read → parse + aggregate path for one source read once from its start, without
//! reporting: shared by `tests/allocation.rs` and `benches/throughput.rs` (included by path).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tally::pipeline::{
    CredentialLocation, CredentialMode, CredentialRule, Follower, JsonFields, JsonFormat,
    LogFormat, Metrics, Parser, ServiceLines, TailEvents, TailOptions, Tailed,
};

const MAX_LINE_LENGTH: usize = 64 * 1024;

/// What the parse step needs for source 0, as `tally run` sets it up with the defaults.
pub fn combined_source() -> ServiceLines {
    source(combined_parser())
}

/// The parser of combined lines with the default credentials settings.
pub fn combined_parser() -> Parser {
    Parser::new(
        LogFormat::Combined,
        CredentialRule::query(CredentialMode::Auto),
    )
}

/// NGINX's `main` log_format and `$request_time $http_x_api_key $http_x_app_id`: the credential in
/// request headers.
pub const MAIN_WITH_KEYS: &str = r#"$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent "$http_referer" "$http_user_agent" "$http_x_forwarded_for" $request_time $http_x_api_key $http_x_app_id"#;

/// The parser of [`MAIN_WITH_KEYS`] lines.
pub fn main_with_keys() -> Parser {
    let rule = CredentialRule {
        location: CredentialLocation::Headers,
        user_key: "X-Api-Key".into(),
        app_id: "X-App-Id".into(),
        ..CredentialRule::query(CredentialMode::Auto)
    };
    let format = LogFormat::nginx(MAIN_WITH_KEYS, &rule).expect("the main format compiles");
    Parser::new(format, rule)
}

/// The same for JSON lines with the default `[sources.fields]` (credentials in the `uri`'s query).
pub fn json_source() -> ServiceLines {
    source(json_parser())
}

/// The parser of JSON lines with the default `[sources.fields]`.
pub fn json_parser() -> Parser {
    let rule = CredentialRule::query(CredentialMode::Auto);
    let format = JsonFormat::compile(JsonFields::default(), &rule).expect("the default fields");
    Parser::new(LogFormat::Json(Arc::new(format)), rule)
}

/// NGINX's combined format written as a regex (the time read without a `time_format`).
pub const COMBINED_REGEX: &str =
    r#"^\S+ \S+ \S+ \[(?P<time>[^\]]+)\] "(?P<request>[^"]*)" (?P<status>\d{3}) "#;

/// The parser of combined lines through [`COMBINED_REGEX`], credentials from the query string.
pub fn combined_regex() -> Parser {
    let rule = CredentialRule::query(CredentialMode::Auto);
    let format = LogFormat::regex(COMBINED_REGEX, None, &rule).expect("the regex compiles");
    Parser::new(format, rule)
}

/// What the parse step needs for source 0 read with `parser`.
pub fn source(parser: Parser) -> ServiceLines {
    ServiceLines {
        service_id: "1".into(),
        parsers: vec![Some(parser)],
        rules: Vec::new(),
        routes: Vec::new(),
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
        records: None,
        reconfigurations: None,
    };
    let events: Arc<dyn TailEvents> = metrics;
    let follower = Follower::spawn(0, log.display().to_string(), options, vec![tx], events)
        .expect("the tailer starts");
    (follower, rx)
}
