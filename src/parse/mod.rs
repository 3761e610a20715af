//! One access-log line → one request record (time, method, path, query, host, status, credential,
//! logged header values).
//!
//! The record borrows from the line and parsing allocates nothing: the credential stays as the log
//! wrote it, and is decoded ([`Credential::decode`]) once per distinct credential by the aggregation.

mod container;
mod credential;
mod failure;
mod json;
mod nginx;
mod pattern;
mod strftime;

use std::sync::Arc;

pub(crate) use container::Unwrapper;
pub use container::{Container, Stream, Wrapper};
pub(crate) use credential::{
    logged_value, query_value, Carried, Credential, CredentialKind, Encoding, Lacks, NamedValues,
};
pub use credential::{CredentialLocation, CredentialMode, CredentialRule, JwtClaim};
pub(crate) use failure::Failure;
pub use json::{JsonFields, JsonFormat};
pub(crate) use nginx::LogEscape;
pub use pattern::RegexFormat;

/// How the lines of a source are written.
#[derive(Debug, Clone)]
pub enum LogFormat {
    /// NGINX's predefined `combined` format.
    Combined,
    /// The Common Log Format (`combined` without the referer and the user agent).
    Common,
    /// A `log_format` from nginx.conf, compiled.
    Nginx(Arc<NginxFormat>),
    /// JSON lines, with the keys of `[sources.fields]`, compiled.
    Json(Arc<JsonFormat>),
    /// A regular expression with named groups, compiled.
    Regex(Arc<RegexFormat>),
}

impl LogFormat {
    /// An NGINX `log_format` (NGINX's default escaping), compiled for credentials found as `rule`
    /// says; the error says what the format lacks.
    pub fn nginx(text: &str, rule: &CredentialRule) -> Result<LogFormat, String> {
        NginxFormat::compile(text, LogEscape::Default, rule).map(|f| LogFormat::Nginx(Arc::new(f)))
    }

    /// A regular expression with named groups, its time read as `time_format` says (or as a
    /// time tally knows); the error says what is wrong.
    pub fn regex(
        text: &str,
        time_format: Option<&str>,
        rule: &CredentialRule,
    ) -> Result<LogFormat, String> {
        RegexFormat::compile(text, time_format, LogEscape::Default, rule)
            .map(|f| LogFormat::Regex(Arc::new(f)))
            .map_err(|(key, e)| format!("{key}: {e}"))
    }

    /// Whether its lines say the request's Host (to route them to services by it).
    pub(crate) fn logs_host(&self) -> bool {
        match self {
            LogFormat::Combined | LogFormat::Common => false,
            LogFormat::Nginx(f) => f.format.logs(|v| matches!(v, nginx::Variable::Host(_))),
            LogFormat::Json(f) => f.logs_host(),
            LogFormat::Regex(f) => f.logs_host(),
        }
    }

    /// Its name in the configuration (`format`).
    pub(crate) fn name(&self) -> &'static str {
        match self {
            LogFormat::Combined => "combined",
            LogFormat::Common => "common",
            LogFormat::Nginx(_) => "nginx",
            LogFormat::Json(_) => "json",
            LogFormat::Regex(_) => "regex",
        }
    }
}

/// A `log_format` compiled for one source's credentials.
#[derive(Debug)]
pub struct NginxFormat {
    format: nginx::Format,
    /// The `log_format` as given (for `tally check`).
    pub(crate) text: String,
    /// Where the credentials are among the format's values.
    slots: Slots,
}

/// Which of a format's values hold the user_key and the app_id (in `oidc` mode, the token, which
/// gives the app_id).
#[derive(Debug, Default, Clone, Copy)]
struct Slots {
    user_key: Option<Slot>,
    app_id: Option<Slot>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// `$http_<name>`.
    Header(u8),
    /// `$arg_<name>`.
    Arg(u8),
    /// `$http_authorization`, whose Basic user is the credential.
    BasicUser(u8),
    /// `$http_authorization`, whose Bearer JWT's claim is the app_id.
    Bearer(u8),
    /// `$arg_access_token`, a JWT whose claim is the app_id.
    AccessToken(u8),
}

impl NginxFormat {
    /// Compiles `text` for credentials found as `rule` says; the error says what is missing.
    pub(crate) fn compile(
        text: &str,
        escape: LogEscape,
        rule: &CredentialRule,
    ) -> Result<NginxFormat, String> {
        let variable = |name: &str| name.to_ascii_lowercase().replace('-', "_");
        let oidc = rule.mode == CredentialMode::Oidc;
        let location = rule.reads();
        let names = [variable(&rule.user_key), variable(&rule.app_id)];
        let (headers, args) = match location {
            CredentialLocation::Query if oidc => {
                (Vec::new(), vec![credential::ACCESS_TOKEN.to_string()])
            }
            CredentialLocation::Query => (Vec::new(), names.to_vec()),
            CredentialLocation::Headers => (names.to_vec(), Vec::new()),
            CredentialLocation::Authorization => (vec!["authorization".to_string()], Vec::new()),
        };
        let format = nginx::Format::compile(text, escape, &headers, &args)?;
        let position = |list: &[String], name: &str| list.iter().position(|n| n == name);
        let slot = |name: &str| match location {
            CredentialLocation::Query => position(&format.args, name).map(|i| {
                if oidc {
                    Slot::AccessToken(i as u8)
                } else {
                    Slot::Arg(i as u8)
                }
            }),
            CredentialLocation::Headers => {
                position(&format.headers, name).map(|i| Slot::Header(i as u8))
            }
            CredentialLocation::Authorization => {
                position(&format.headers, "authorization").map(|i| {
                    if oidc {
                        Slot::Bearer(i as u8)
                    } else {
                        Slot::BasicUser(i as u8)
                    }
                })
            }
        };
        let slots = match oidc {
            // The token gives the app_id.
            true => Slots {
                user_key: None,
                app_id: slot(credential::ACCESS_TOKEN),
            },
            false => Slots {
                user_key: slot(&names[0]),
                app_id: slot(&names[1]),
            },
        };
        match location {
            CredentialLocation::Query => {
                let query = format.logs(|v| {
                    matches!(
                        v,
                        nginx::Variable::Request
                            | nginx::Variable::RequestUri
                            | nginx::Variable::Args
                    )
                });
                if !query && slots.user_key.is_none() && slots.app_id.is_none() {
                    let arg = if oidc {
                        credential::ACCESS_TOKEN
                    } else {
                        &names[0]
                    };
                    return Err(format!(
                        "it logs no query string, so no credential: add $request, $request_uri, $args or $arg_{arg}",
                    ));
                }
            }
            CredentialLocation::Headers => {
                // The headers the mode reads: in auto, either will do (oidc reads the
                // Authorization header, never these).
                let needed: &[(Option<Slot>, &String)] = match rule.mode {
                    CredentialMode::UserKey => &[(slots.user_key, &names[0])],
                    CredentialMode::AppId => &[(slots.app_id, &names[1])],
                    CredentialMode::Auto | CredentialMode::Oidc
                        if slots.user_key.is_some() || slots.app_id.is_some() =>
                    {
                        &[]
                    }
                    CredentialMode::Auto | CredentialMode::Oidc => &[(None, &names[0])],
                };
                if let Some((_, name)) = needed.iter().find(|(found, _)| found.is_none()) {
                    return Err(format!(
                        "credentials are read from request headers, and it does not log this one: add $http_{name}",
                    ));
                }
            }
            CredentialLocation::Authorization => {
                if slots.user_key.is_none() && slots.app_id.is_none() {
                    let what = if oidc { " (a Bearer JWT)" } else { "" };
                    return Err(format!(
                        "credentials are read from the Authorization header{what}, and it does not log it: add $http_authorization"
                    ));
                }
            }
        }
        Ok(NginxFormat {
            format,
            text: text.to_string(),
            slots,
        })
    }

    /// The escaping the format was compiled for.
    pub(crate) fn escape(&self) -> LogEscape {
        self.format.escape
    }
}

/// The most request headers one log format can log (`$http_…` variables) for tally to read.
pub(crate) const LOGGED_HEADERS: usize = 4;

/// What tally needs of one request. The optional fields are None when the log format does not log
/// them (a format without the request line has no method; only some log the Host); mapping rules
/// and Host routing read them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    /// Epoch seconds, from the line's own time.
    pub timestamp: i64,
    pub method: Option<&'a [u8]>,
    /// The path without its query string, as logged (still escaped).
    pub path: Option<&'a [u8]>,
    /// The query string without its `?` (empty when the request had none), as logged.
    pub query: Option<&'a [u8]>,
    /// The Host header (or `$host`), as logged.
    pub host: Option<&'a [u8]>,
    /// The raw values of the request headers the format logs, by their position among the
    /// format's logged headers (the format knows their names). Filled by the formats that log
    /// headers (JSON lines, `log_format`, regex: the next step); `combined` logs none.
    pub headers: [Option<&'a [u8]>; LOGGED_HEADERS],
    pub status: u16,
    pub credential: Credential<'a>,
}

/// Every reason a line is skipped, declared once, one line each: what it means (its doc, the help),
/// the [`Skip`] variant, its label (`reason` in `tally_lines_skipped_total`) and its field in the
/// log summary (tracing takes field names only as written). Hands the list to `$then!`, after
/// `$pass`: [`Skip`] here and the summary in `telemetry` are generated from it.
macro_rules! for_each_skip {
    ($then:ident! { $($pass:tt)* }) => {
        $then! { $($pass)*
            /// The line is not in the configured format (garbage, truncated, another format).
            Malformed = "malformed", skipped_malformed;
            /// The request carries no credential, so 3scale could not attribute it.
            NoCredential = "no_credential", skipped_no_credential;
            /// The credential is not valid UTF-8 once decoded (the backend would reject the whole
            /// call), or too long to report (`aggregate::MAX_CREDENTIAL_BYTES`).
            InvalidCredential = "invalid_credential", skipped_invalid_credential;
            /// The line is longer than `max_line_length`.
            TooLong = "too_long", skipped_too_long;
            /// No mapping rule of the source matches the request (APIcast would have answered 404
            /// and reported nothing).
            NoMappingRule = "no_mapping_rule", skipped_no_mapping_rule;
            /// The rules that match name more metrics than one transaction holds.
            TooManyMetrics = "too_many_metrics", skipped_too_many_metrics;
            /// Routed by Host, the request's Host is none of the proxy configuration's services'.
            UnknownHost = "unknown_host", skipped_unknown_host;
        }
    };
}
pub(crate) use for_each_skip;

/// Declares [`Skip`] from [`for_each_skip`]'s list.
macro_rules! declare_skip {
    ($( $(#[doc = $doc:literal])+ $variant:ident = $label:literal, $field:ident; )+) => {
        /// Why a line is not reported. Every skip is counted under its reason.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(usize)]
        pub enum Skip {
            $( $(#[doc = $doc])+ $variant, )+
        }

        impl Skip {
            /// Every reason: the per-chunk tallies, the counters and `/metrics` iterate this.
            pub const ALL: [Skip; [$(Skip::$variant),+].len()] = [$(Skip::$variant),+];

            /// Its label: `reason` in `tally_lines_skipped_total` and in the logs.
            pub fn reason(self) -> &'static str {
                match self {
                    $( Skip::$variant => $label, )+
                }
            }

            /// What it means, for `/metrics`' help.
            pub fn description(self) -> &'static str {
                match self {
                    $( Skip::$variant => concat!($($doc),+).trim_ascii_start(), )+
                }
            }
        }
    };
}
for_each_skip!(declare_skip! {});

/// `$time_local` as written: `25/Nov/2026:18:41:03 +0100`.
type TimeField = [u8; 26];

/// Parses the lines of one source.
#[derive(Debug, Clone)]
pub struct Parser {
    format: LogFormat,
    credentials: CredentialRule,
    /// The last `$time_local` parsed and its value: consecutive lines mostly share their second.
    last_time: (TimeField, i64),
    /// A regex format's capture slots, reused line after line.
    captures: Option<regex::bytes::CaptureLocations>,
    /// A container runtime's records, unwrapped and joined before the format reads them.
    unwrapper: Option<Unwrapper>,
    /// With [`Parser::noting_failures`]: the credentials rule that reads a line without its
    /// credential, and the status and time of the last line skipped for its credential.
    noting: Option<Box<Noting>>,
}

/// The status and time of `line` read with `noting`'s rule (no credential needed). Out of line,
/// so that the aggregation loop holds one copy of `read` (the rare path pays the call).
#[cold]
#[inline(never)]
fn status_without_credential(
    format: &LogFormat,
    noting: &Noting,
    last_time: &mut (TimeField, i64),
    captures: &mut Option<regex::bytes::CaptureLocations>,
    line: &[u8],
) -> Option<(u16, i64)> {
    read(format, &noting.0, last_time, captures, line, |r| {
        (r.status, r.timestamp)
    })
    .ok()
}

/// What a parser noting its credential failures keeps: the rule without credential, and the
/// status and time of the last line skipped for its credential.
#[derive(Debug, Clone)]
struct Noting(CredentialRule, Option<(u16, i64)>);

impl Parser {
    /// A parser of lines in `format`, reading the credential as `credentials` says (a compiled
    /// `log_format` was compiled for them).
    pub fn new(format: LogFormat, credentials: CredentialRule) -> Parser {
        let captures = match &format {
            LogFormat::Regex(f) => Some(f.capture_locations()),
            _ => None,
        };
        Parser {
            format,
            credentials,
            last_time: ([0; 26], 0),
            captures,
            unwrapper: None,
            noting: None,
        }
    }

    /// This parser, noting the status and time of the lines it skips for their credential (for
    /// the Response codes page): see [`Parser::failed_status`].
    pub(crate) fn noting_failures(mut self) -> Parser {
        self.noting = Some(Box::new(Noting(self.credentials.optional(), None)));
        self
    }

    /// A parser of the same lines that reads a line whose credential is missing or unreadable
    /// with an empty one (to show what else it says).
    pub(crate) fn without_credentials(&self) -> Parser {
        Parser {
            credentials: self.credentials.optional(),
            noting: None,
            ..self.clone()
        }
    }

    /// The status and time of the last line [`Parser::parse_record`] skipped for its credential
    /// (no credential, or an unreadable one), when noting them.
    pub(crate) fn failed_status(&mut self) -> Option<(u16, i64)> {
        self.noting.as_mut().and_then(|n| n.1.take())
    }

    /// This parser, for lines wrapped in `container`'s records; joined lines longer than `limit`
    /// are skipped as `too_long`.
    pub fn unwrapping(mut self, container: Container, limit: usize) -> Parser {
        self.unwrapper = Some(Unwrapper::new(container, limit));
        self
    }

    /// A physical line of the source's file (without its newline): with a container wrapper,
    /// unwrapped and joined with its parts first. None when it is no line of its own (a record of
    /// the other stream, or a part of a line that goes on). Always inlined, with [`read`], into
    /// the aggregation loop: the request is then built where it is used, not copied there (left
    /// to the compiler, parse + aggregate took a third longer).
    #[inline(always)]
    pub fn parse_record<'a>(&'a mut self, record: &'a [u8]) -> Result<Option<Request<'a>>, Skip> {
        let Parser {
            format,
            credentials,
            last_time,
            captures,
            unwrapper,
            noting,
        } = self;
        let line = match unwrapper {
            None => record,
            Some(unwrapper) => match unwrapper.line(record)? {
                Some(line) => line,
                None => return Ok(None),
            },
        };
        match read(format, credentials, last_time, captures, line, Some) {
            Err(skip @ (Skip::NoCredential | Skip::InvalidCredential)) => {
                if let Some(noting) = noting {
                    noting.1 = status_without_credential(format, noting, last_time, captures, line);
                }
                Err(skip)
            }
            read => read,
        }
    }

    /// Takes over what `old` (the parser this one replaces) holds of lines under way: a line whose
    /// container records are partly read goes on across the switch.
    pub(crate) fn carry_over(&mut self, old: Parser) {
        if self.unwrapper.is_some() {
            self.unwrapper = old.unwrapper;
        }
        if old.noting.is_some() {
            self.noting = Some(Box::new(Noting(self.credentials.optional(), None)));
        }
    }

    /// The line a physical line of the source's file makes, for `tally parse`: unwrapped and
    /// joined (a copy) with a container wrapper; None as for [`Parser::parse_record`].
    pub(crate) fn unwrap(&mut self, record: &[u8]) -> Result<Option<Vec<u8>>, Skip> {
        match &mut self.unwrapper {
            None => Ok(Some(record.to_vec())),
            Some(unwrapper) => Ok(unwrapper.line(record)?.map(<[u8]>::to_vec)),
        }
    }

    /// The Host `line` logs, read without its credential (to route a line whose credential
    /// cannot be read). Not for container records (routing by Host does not take them).
    pub(crate) fn host_of<'a>(&self, line: &'a [u8]) -> Option<&'a [u8]> {
        match &self.format {
            LogFormat::Combined | LogFormat::Common => None,
            LogFormat::Nginx(f) => {
                let mut values = nginx::Values::default();
                f.format.read(line, &mut values).ok()?;
                values.host.map(|(_, host)| host)
            }
            LogFormat::Json(f) => f.host(line),
            LogFormat::Regex(f) => f.host(line),
        }
    }

    /// The query parameter names its credentials may be under (masked wherever a line is shown).
    pub(crate) fn query_credential_names(&self) -> [&str; 3] {
        [
            &self.credentials.user_key,
            &self.credentials.app_id,
            &self.credentials.app_key,
        ]
    }

    /// How the values of its lines are escaped.
    pub(crate) fn escape(&self) -> LogEscape {
        match &self.format {
            LogFormat::Combined | LogFormat::Common => LogEscape::Default,
            LogFormat::Nginx(f) => f.escape(),
            LogFormat::Json(_) => LogEscape::Json,
            LogFormat::Regex(f) => f.escape,
        }
    }

    /// The container records the parser unwraps, if any.
    pub(crate) fn container(&self) -> Option<Container> {
        self.unwrapper.as_ref().map(Unwrapper::container)
    }

    /// Ends a chunk of records: a line still under way (its last record never came, as at the
    /// end of a rotated file) is dropped; true if there was one.
    pub(crate) fn end_records(&mut self) -> bool {
        self.unwrapper.as_mut().is_some_and(Unwrapper::end)
    }

    /// `line` is without its newline. Inlined, with the format's and the credential's parsing,
    /// into the aggregation loop: the record is then built where it is used instead of copied
    /// there (it is larger than a copy the compiler inlines).
    #[inline]
    pub fn parse<'a>(&mut self, line: &'a [u8]) -> Result<Request<'a>, Skip> {
        let Parser {
            format,
            credentials,
            last_time,
            captures,
            unwrapper: _,
            noting: _,
        } = self;
        read(
            format,
            credentials,
            last_time,
            captures,
            line,
            std::convert::identity,
        )
    }
}

/// One line in `format`, with the parser's state, its request given to `wrap` for what the caller
/// returns. The request of a combined line is built in `wrap`'s result: built first, then moved
/// into `Some` by [`Parser::parse_record`], it was copied there (146 bytes through `memcpy` per
/// line, read back right after they were written), which cost parse + aggregate some 5%.
#[inline(always)]
fn read<'a, T>(
    format: &LogFormat,
    credentials: &CredentialRule,
    last_time: &mut (TimeField, i64),
    captures: &mut Option<regex::bytes::CaptureLocations>,
    line: &'a [u8],
    wrap: impl FnOnce(Request<'a>) -> T,
) -> Result<T, Skip> {
    match format {
        LogFormat::Combined | LogFormat::Common => {
            let fields = combined(line).ok_or(Skip::Malformed)?;
            let timestamp = cached_time_local(last_time, fields.time)?;
            let (path, query) = split_target(fields.target);
            Ok(wrap(Request {
                timestamp,
                method: Some(fields.method),
                path: Some(path),
                query: Some(query),
                host: None,
                headers: [None; LOGGED_HEADERS],
                status: fields.status,
                credential: credentials.in_query(query, LogEscape::Default)?,
            }))
        }
        LogFormat::Nginx(format) => nginx_line(format, credentials, last_time, line).map(wrap),
        LogFormat::Json(format) => json::line(format, credentials, last_time, line).map(wrap),
        LogFormat::Regex(format) => {
            let captures = captures.get_or_insert_with(|| format.capture_locations());
            pattern::line(format, credentials, last_time, captures, line).map(wrap)
        }
    }
}

impl Parser {
    /// `line` with what may be a secret in it (the values of logged request headers, query
    /// arguments and cookies, a JSON line's credential fields, and whatever does not match the
    /// format) replaced by `mask` of it; query-string credentials are masked by the caller.
    pub(crate) fn hide_secrets(&self, line: &[u8], mask: impl Fn(&str) -> String) -> Vec<u8> {
        let (spans, cut) = match &self.format {
            LogFormat::Nginx(format) => format.format.secrets(line),
            LogFormat::Json(format) => format.secrets(line),
            LogFormat::Regex(format) => format.secrets(line),
            LogFormat::Combined | LogFormat::Common => return line.to_vec(),
        };
        let end = cut.unwrap_or(line.len());
        let mut out = Vec::with_capacity(line.len());
        let mut at = 0;
        for span in spans {
            out.extend_from_slice(&line[at..span.start]);
            out.extend_from_slice(mask(&String::from_utf8_lossy(&line[span.clone()])).as_bytes());
            at = span.end;
        }
        out.extend_from_slice(&line[at..end]);
        if cut.is_some_and(|c| c < line.len()) {
            out.extend_from_slice("…".as_bytes());
        }
        out
    }
}

/// `$time_local`, through the cache of the last one.
#[inline]
fn cached_time_local(last: &mut (TimeField, i64), time: &TimeField) -> Result<i64, Skip> {
    if same_time(time, &last.0) {
        return Ok(last.1);
    }
    let t = time_local(time).ok_or(Skip::Malformed)?;
    *last = (*time, t);
    Ok(t)
}

/// `t` read by `read`, through the parser's cache of the last time read (for the formats whose
/// times are not `$time_local`): up to 25 bytes are the key, its length in the last byte.
#[inline]
fn cached(
    last: &mut (TimeField, i64),
    t: &[u8],
    read: impl FnOnce(&[u8]) -> Option<i64>,
) -> Option<i64> {
    if !(1..26).contains(&t.len()) {
        return read(t);
    }
    let mut key = [0u8; 26];
    key[..t.len()].copy_from_slice(t);
    key[25] = t.len() as u8;
    if key == last.0 {
        return Some(last.1);
    }
    let at = read(t)?;
    *last = (key, at);
    Some(at)
}

/// Whether two `$time_local` fields are the same, compared as words: the comparison of every line,
/// where a call to `memcmp` would cost more than it.
#[inline]
fn same_time(a: &TimeField, b: &TimeField) -> bool {
    let word = |t: &TimeField, at: usize| {
        u64::from_ne_bytes([
            t[at],
            t[at + 1],
            t[at + 2],
            t[at + 3],
            t[at + 4],
            t[at + 5],
            t[at + 6],
            t[at + 7],
        ])
    };
    word(a, 0) == word(b, 0)
        && word(a, 8) == word(b, 8)
        && word(a, 16) == word(b, 16)
        && a[24] == b[24]
        && a[25] == b[25]
}

/// A request target → its path and its query string (empty when it has none).
#[inline]
fn split_target(target: &[u8]) -> (&[u8], &[u8]) {
    match memchr::memchr(b'?', target) {
        Some(q) => (&target[..q], &target[q + 1..]),
        None => (target, &b""[..]),
    }
}

/// A line of a compiled `log_format`.
#[inline]
fn nginx_line<'a>(
    format: &NginxFormat,
    rule: &CredentialRule,
    last_time: &mut (TimeField, i64),
    line: &'a [u8],
) -> Result<Request<'a>, Skip> {
    let mut v = nginx::Values::default();
    format
        .format
        .read(line, &mut v)
        .map_err(|_| Skip::Malformed)?;
    let timestamp = match v.time.ok_or(Skip::Malformed)? {
        (nginx::Variable::TimeLocal, t) => {
            cached_time_local(last_time, t.try_into().map_err(|_| Skip::Malformed)?)?
        }
        (nginx::Variable::TimeIso8601, t) => time_iso8601(t).ok_or(Skip::Malformed)?,
        (_, t) => msec(t).ok_or(Skip::Malformed)?,
    };
    let status = v.status().and_then(status_digits).ok_or(Skip::Malformed)?;
    // `$request` is `METHOD TARGET PROTOCOL`; without it, its parts may be logged one by one.
    let (method, target) = match v.request().map(request_line) {
        Some(Some((method, target))) => (Some(method), Some(target)),
        Some(None) => return Err(Skip::Malformed),
        None => (v.method(), v.request_uri()),
    };
    let (path, query) = match target.map(split_target) {
        Some((path, query)) => (Some(path), Some(query)),
        None => (v.uri(), v.args()),
    };
    let escape = format.format.escape;
    let value = |slot, kind| slot_credential(&v, slot, kind, escape);
    let credential = match (rule.location, format.slots) {
        // oidc: a JWT, whose claim is the app_id.
        (
            _,
            Slots {
                app_id: Some(Slot::Bearer(i)),
                ..
            },
        ) => rule.bearer(v.header(i))?,
        (
            _,
            Slots {
                app_id: Some(Slot::AccessToken(i)),
                ..
            },
        ) => rule.access_token(v.arg_value(i))?,
        // `$arg_<name>` logged: its value; else the query string's parameter.
        (
            CredentialLocation::Query,
            Slots {
                user_key: None,
                app_id: None,
            },
        ) => rule.in_query(query.unwrap_or_default(), escape)?,
        // Basic: the user is the user_key, or the app_id (the password its app_key).
        (CredentialLocation::Authorization, slots) => {
            value(slots.user_key, rule.basic_kind()).ok_or(Skip::NoCredential)?
        }
        (_, slots) => rule.pick(
            value(slots.user_key, CredentialKind::UserKey),
            value(slots.app_id, CredentialKind::AppId),
        )?,
    };
    let mut headers = [None; LOGGED_HEADERS];
    headers[..nginx::SLOTS.min(LOGGED_HEADERS)]
        .copy_from_slice(&v.headers()[..nginx::SLOTS.min(LOGGED_HEADERS)]);
    Ok(Request {
        timestamp,
        method,
        path,
        query,
        host: v.host.map(|(_, host)| host),
        headers,
        status,
        credential,
    })
}

/// The credential of `kind` in the value of `slot`, if logged and not empty. Always inlined:
/// called as a closure of its own (the compiler's choice), the line took some 40 instructions
/// more.
#[inline(always)]
fn slot_credential<'a>(
    v: &nginx::Values<'a>,
    slot: Option<Slot>,
    kind: CredentialKind,
    escape: LogEscape,
) -> Option<Credential<'a>> {
    let (raw, encoding) = match slot? {
        Slot::Header(i) => (v.header(i)?, Encoding::Header(escape)),
        Slot::Arg(i) => (v.arg_value(i)?, Encoding::Query(escape)),
        Slot::BasicUser(i) => (v.header(i)?, Encoding::BasicUser(escape)),
        // Read apart: a token that is not a JWT is no credential to pick.
        Slot::Bearer(_) | Slot::AccessToken(_) => return None,
    };
    (!raw.is_empty()).then(|| Credential::new(kind, raw, encoding))
}

/// `METHOD SP TARGET [SP PROTOCOL]` → method and target.
fn request_line(request: &[u8]) -> Option<(&[u8], &[u8])> {
    let m = request.iter().position(|b| !b.is_ascii_uppercase())?;
    if m == 0 || request[m] != b' ' {
        return None;
    }
    let rest = &request[m + 1..];
    let target = match rest.split_last_chunk::<9>() {
        // ` HTTP/1.1` and the like: the last space, found without a loop over the protocol.
        Some((target, [b' ', b'H', b'T', b'T', b'P', b'/', version @ ..]))
            if !version.contains(&b' ') =>
        {
            target
        }
        _ => match rest.iter().rposition(|&b| b == b' ') {
            Some(last) if rest[last + 1..].starts_with(b"HTTP/") => &rest[..last],
            _ => rest,
        },
    };
    (!target.is_empty()).then_some((&request[..m], target))
}

/// Three digits, alone.
fn status_digits(s: &[u8]) -> Option<u16> {
    (s.len() == 3).then_some(())?;
    status(s)
}

/// `2026-11-25T18:41:03+01:00` (or `Z`, or fractions of a second) → epoch seconds.
fn time_iso8601(t: &[u8]) -> Option<i64> {
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        t.get(r)?.iter().try_fold(0i64, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + i64::from(d - b'0'))
        })
    };
    let sep = |i: usize, c: u8| t.get(i) == Some(&c);
    if !(sep(4, b'-') && sep(7, b'-') && sep(10, b'T') && sep(13, b':') && sep(16, b':')) {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, m, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 {
        return None;
    }
    let mut rest = &t[19..];
    if let Some(fraction) = rest.strip_prefix(b".") {
        let digits = fraction.iter().take_while(|b| b.is_ascii_digit()).count();
        rest = &fraction[digits..];
    }
    let offset = match rest {
        b"Z" => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let two = |a: u8, b: u8| {
                (a.is_ascii_digit() && b.is_ascii_digit())
                    .then(|| i64::from(a - b'0') * 10 + i64::from(b - b'0'))
            };
            let offset = two(*h1, *h2)? * 3600 + two(*m1, *m2)? * 60;
            if *sign == b'-' {
                -offset
            } else {
                offset
            }
        }
        _ => return None,
    };
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s - offset)
}

/// `$msec`: `1764092463.123` → whole epoch seconds.
fn msec(t: &[u8]) -> Option<i64> {
    let whole = t.split(|&b| b == b'.').next()?;
    if whole.is_empty() || whole.len() > 12 || !whole.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let fraction = &t[whole.len()..];
    let fraction_ok = match fraction.split_first() {
        None => true,
        Some((dot, digits)) => *dot == b'.' && digits.iter().all(u8::is_ascii_digit),
    };
    if !fraction_ok {
        return None;
    }
    Some(whole.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
}

struct Fields<'a> {
    /// `$time_local`, not yet parsed.
    time: &'a TimeField,
    method: &'a [u8],
    /// The request target (path and query), without the protocol.
    target: &'a [u8],
    status: u16,
}

/// `$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent "$http_referer"
/// "$http_user_agent"`; only the time, request and status are read, so anything may follow the
/// status (extra fields, a truncated user agent).
#[inline]
fn combined(line: &[u8]) -> Option<Fields<'_>> {
    let open = find_short(line, b'[')?;
    let time = line.get(open + 1..open + 27)?.try_into().ok()?;
    let rest = line[open + 27..].strip_prefix(b"] \"")?;
    // `METHOD SP TARGET [SP PROTOCOL]`
    let m = rest.iter().position(|b| !b.is_ascii_uppercase())?;
    if m == 0 || rest[m] != b' ' {
        return None;
    }
    let method = &rest[..m];
    let rest = &rest[m + 1..];
    let end = closing_quote(rest)?;
    let request = &rest[..end];
    let target = match request.iter().rposition(|&b| b == b' ') {
        Some(last) if request[last + 1..].starts_with(b"HTTP/") => &request[..last],
        _ => request,
    };
    if target.is_empty() {
        return None;
    }
    let status = status(rest[end + 1..].strip_prefix(b" ")?)?;
    Some(Fields {
        time,
        method,
        target,
        status,
    })
}

/// The index of the first `"` not escaped by a backslash (Apache writes `\"`, NGINX `\x22`): a
/// quote is escaped when an odd run of backslashes precedes it.
fn closing_quote(s: &[u8]) -> Option<usize> {
    let mut from = 0;
    loop {
        let at = from + memchr::memchr(b'"', &s[from..])?;
        let backslashes = s[..at].iter().rev().take_while(|&&b| b == b'\\').count();
        if backslashes % 2 == 0 {
            return Some(at);
        }
        from = at + 1;
    }
}

fn status(s: &[u8]) -> Option<u16> {
    let digits = s.get(..3)?;
    if !digits.iter().all(u8::is_ascii_digit) || s.get(3).is_some_and(|&b| b != b' ') {
        return None;
    }
    Some(
        digits
            .iter()
            .fold(0u16, |n, d| n * 10 + u16::from(d - b'0')),
    )
}

/// The index of the first `needle` in `hay`, eight bytes at a time: for the short fields of a line,
/// where calling out to a vectorised search costs more than the search.
#[inline]
fn find_short(hay: &[u8], needle: u8) -> Option<usize> {
    const LOW: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    let pattern = LOW * u64::from(needle);
    let (words, tail) = hay.as_chunks::<8>();
    for (i, word) in words.iter().enumerate() {
        let x = u64::from_le_bytes(*word) ^ pattern;
        // A zero byte of x is a match; the lowest flagged byte is always a true one.
        let zero = x.wrapping_sub(LOW) & !x & HIGH;
        if zero != 0 {
            return Some(i * 8 + (zero.trailing_zeros() / 8) as usize);
        }
    }
    let at = words.len() * 8;
    tail.iter().position(|&b| b == needle).map(|i| at + i)
}

/// The index of the last `needle` in `hay`, eight bytes at a time from the end: for the values a
/// `log_format` reads backward (a key, a time), where a byte-at-a-time loop is the cost.
#[inline]
pub(crate) fn rfind_short(hay: &[u8], needle: u8) -> Option<usize> {
    const LOW: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    let pattern = LOW * u64::from(needle);
    let (head, words) = hay.as_rchunks::<8>();
    for (i, word) in words.iter().enumerate().rev() {
        let x = u64::from_le_bytes(*word) ^ pattern;
        // A flagged byte may be a false one above a true one: the word is searched byte by byte.
        if x.wrapping_sub(LOW) & !x & HIGH != 0 {
            let at = head.len() + i * 8;
            return word.iter().rposition(|&b| b == needle).map(|j| at + j);
        }
    }
    head.iter().rposition(|&b| b == needle)
}

/// `25/Nov/2026:18:41:03 +0100` → epoch seconds.
fn time_local(t: &TimeField) -> Option<i64> {
    if t[2] != b'/' || t[6] != b'/' || t[11] != b':' || t[20] != b' ' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        t[r].iter().try_fold(0i64, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + i64::from(d - b'0'))
        })
    };
    let day = num(0..2)?;
    let month = match &t[3..6] {
        b"Jan" => 1,
        b"Feb" => 2,
        b"Mar" => 3,
        b"Apr" => 4,
        b"May" => 5,
        b"Jun" => 6,
        b"Jul" => 7,
        b"Aug" => 8,
        b"Sep" => 9,
        b"Oct" => 10,
        b"Nov" => 11,
        b"Dec" => 12,
        _ => return None,
    };
    let year = num(7..11)?;
    let (h, m, s) = (num(12..14)?, num(15..17)?, num(18..20)?);
    if t[14] != b':' || t[17] != b':' || !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 {
        return None;
    }
    let sign = match t[21] {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let offset = sign * (num(22..24)? * 3600 + num(24..26)? * 60);
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s - offset)
}

/// The proleptic Gregorian date (year, month, day) of a day since 1970-01-01 (Howard Hinnant's
/// civil-from-days).
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// A Unix time as RFC 3339 in UTC, to the second (`2026-11-24T10:15:00Z`), for any year.
pub(crate) fn rfc3339(t: i64) -> String {
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Builders the parse tests share.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A source's parser for a `log_format`, credentials found as `rule` says.
    pub(crate) fn nginx(format: &str, escape: LogEscape, rule: CredentialRule) -> Parser {
        let format = NginxFormat::compile(format, escape, &rule).unwrap();
        Parser::new(LogFormat::Nginx(Arc::new(format)), rule)
    }

    /// What tally reports of a line: (credential kind and decoded value, status, time).
    pub(crate) fn reported(
        parser: &mut Parser,
        line: &str,
    ) -> Result<(CredentialKind, String, u16, i64), Skip> {
        let r = parser.parse(line.as_bytes())?;
        Ok((
            r.credential.kind,
            r.credential.decode()?,
            r.status,
            r.timestamp,
        ))
    }

    /// Credentials in the `X-Api-Key` and `X-App-Id` request headers.
    pub(crate) fn headers(mode: CredentialMode) -> CredentialRule {
        CredentialRule {
            location: CredentialLocation::Headers,
            user_key: "X-Api-Key".into(),
            app_id: "X-App-Id".into(),
            ..CredentialRule::query(mode)
        }
    }

    /// `oidc` mode: the app_id is the access token's `claim`, the token where `location` says.
    pub(crate) fn oidc(location: CredentialLocation, claim: &str) -> CredentialRule {
        CredentialRule {
            location,
            jwt_claim: JwtClaim::new(claim).unwrap(),
            ..CredentialRule::query(CredentialMode::Oidc)
        }
    }

    /// A JWT whose payload is `claims` (JSON text), as issuers write it: base64url without
    /// padding. Its signature is not checked, so any base64url will do.
    pub(crate) fn jwt(claims: &str) -> String {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine;
        let part = |text: &str| URL_SAFE_NO_PAD.encode(text);
        format!(
            "{}.{}.{}",
            part(r#"{"alg":"RS256","typ":"JWT"}"#),
            part(claims),
            part("not checked")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Request<'_>, Skip> {
        Parser::new(
            LogFormat::Combined,
            CredentialRule::query(CredentialMode::Auto),
        )
        .parse(line.as_bytes())
    }

    fn user_key(k: &str) -> Credential<'_> {
        Credential::user_key(k.as_bytes())
    }

    #[test]
    fn a_plain_combined_line() {
        let r = parse(r#"192.168.1.20 - - [24/Nov/2026:10:15:00 +0000] "GET /v1/words?user_key=abc123&x=1 HTTP/1.1" 200 612 "-" "curl/8.0""#).unwrap();
        assert_eq!(r.timestamp, 1_795_515_300);
        assert_eq!(r.method, Some(&b"GET"[..]));
        assert_eq!(r.path, Some(&b"/v1/words"[..]));
        assert_eq!(r.query, Some(&b"user_key=abc123&x=1"[..]));
        assert_eq!((r.host, r.headers), (None, [None; LOGGED_HEADERS]));
        assert_eq!(r.status, 200);
        assert_eq!(r.credential, user_key("abc123"));
    }

    #[test]
    fn time_zones_and_calendar() {
        let at = |t: &str| time_local(t.as_bytes().try_into().ok()?);
        assert_eq!(at("01/Jan/1970:00:00:00 +0000"), Some(0));
        assert_eq!(at("01/Jan/1970:01:00:00 +0100"), Some(0));
        assert_eq!(at("31/Dec/1969:19:00:00 -0500"), Some(0));
        assert_eq!(at("29/Feb/2024:12:00:00 +0000"), Some(1_709_208_000));
        assert_eq!(
            at("24/Nov/2026:10:15:00 +0530"),
            Some(1_795_515_300 - 19_800)
        );
        assert_eq!(at("24/Foo/2026:10:15:00 +0000"), None);
        assert_eq!(at("24/Nov/2026:25:15:00 +0000"), None);
        assert_eq!(at("24/Nov/2026:10:15:00"), None);
    }

    #[test]
    fn odd_but_valid_lines() {
        // IPv6 client, a remote user, escaped quotes in the user agent and the request.
        let r = parse(r#"2001:db8::1 - alice [24/Nov/2026:10:15:00 +0000] "POST /a\"b?app_id=id1&app_key=k1 HTTP/2.0" 201 0 "http://x/?q=\"1\"" "Mozilla \"quoted\" [x]""#).unwrap();
        assert_eq!(r.method, Some(&b"POST"[..]));
        assert_eq!(r.path, Some(&br#"/a\"b"#[..]));
        assert_eq!(r.query, Some(&b"app_id=id1&app_key=k1"[..]));
        assert_eq!(r.status, 201);
        assert_eq!(r.credential, Credential::app_id(b"id1"));
        // NGINX's own escaping, HTTP/0.9 (no protocol), a 499, nothing after the status.
        let r =
            parse(r#"::1 - - [24/Nov/2026:10:15:00 +0000] "GET /x\x22y?user_key=k" 499"#).unwrap();
        assert_eq!((r.status, r.path), (499, Some(&br"/x\x22y"[..])));
        // Extra fields after the user agent ($request_time and friends).
        let r = parse(r#"10.0.0.1 - - [24/Nov/2026:10:15:00 +0000] "DELETE /?app_id=a HTTP/1.1" 503 1 "-" "ua" 0.002 "x""#).unwrap();
        assert_eq!(r.status, 503);
        assert_eq!((r.path, r.query), (Some(&b"/"[..]), Some(&b"app_id=a"[..])));
        assert_eq!(r.credential, Credential::app_id(b"a"));
    }

    #[test]
    fn one_parser_reads_many_lines_with_its_time_cache() {
        let mut p = Parser::new(
            LogFormat::Combined,
            CredentialRule::query(CredentialMode::Auto),
        );
        let line = |t: &str| format!(r#"h - - [{t}] "GET /?user_key=k HTTP/1.1" 200 1 "-" "-""#);
        let times = [
            "24/Nov/2026:10:15:00 +0000",
            "24/Nov/2026:10:15:00 +0000",
            "24/Nov/2026:10:15:01 +0000",
            "24/Nov/2026:10:15:00 +0100",
        ];
        let got: Vec<i64> = times
            .iter()
            .map(|t| p.parse(line(t).as_bytes()).unwrap().timestamp)
            .collect();
        assert_eq!(
            got,
            vec![1_795_515_300, 1_795_515_300, 1_795_515_301, 1_795_511_700]
        );
        assert_eq!(
            p.parse(line("24/Nov/2026:10:15:99 +0000").as_bytes()),
            Err(Skip::Malformed)
        );
    }

    #[test]
    fn credentials_are_found_then_decoded() {
        let line = |q: &str| {
            format!(r#"h - - [24/Nov/2026:10:15:00 +0000] "GET /p?{q} HTTP/1.1" 200 1 "-" "-""#)
        };
        let key = |q: &str| {
            parse(&line(q)).and_then(|r| match r.credential.kind {
                CredentialKind::UserKey => r.credential.decode().map(|k| format!("user_key {k}")),
                CredentialKind::AppId => r.credential.decode().map(|k| format!("app_id {k}")),
            })
        };
        assert_eq!(key("user_key=a%2Bb+c"), Ok("user_key a+b c".into()));
        assert_eq!(key("user_key=caf%C3%A9"), Ok("user_key café".into()));
        assert_eq!(key(r"user_key=caf\xC3\xA9"), Ok("user_key café".into()));
        assert_eq!(key("user_key=%ZZ"), Ok("user_key %ZZ".into()));
        assert_eq!(key("user_key=%4"), Ok("user_key %4".into()));
        assert_eq!(key("user_key=%FF"), Err(Skip::InvalidCredential));
        assert_eq!(
            key("user_key=first&user_key=second"),
            Ok("user_key first".into())
        );
        assert_eq!(
            key("user_key=&user_key=second"),
            Ok("user_key second".into())
        );
        assert_eq!(key("user_key=&app_id=x"), Ok("app_id x".into()));
        assert_eq!(
            key("app_id=x&app_key=k&user_key=u"),
            Ok("user_key u".into())
        );
        assert_eq!(key("app_id=&app_id=y"), Ok("app_id y".into()));
        assert_eq!(key("page=1&&app_id=x&"), Ok("app_id x".into()));
        assert_eq!(key("app_key=only"), Err(Skip::NoCredential));
        assert_eq!(key("foo=bar"), Err(Skip::NoCredential));
        assert_eq!(key("xuser_key=a"), Err(Skip::NoCredential));
        assert_eq!(key("user_key"), Err(Skip::NoCredential));
        assert_eq!(key(""), Err(Skip::NoCredential));
    }

    #[test]
    fn credential_mode_picks_the_parameter() {
        let line = br#"h - - [24/Nov/2026:10:15:00 +0000] "GET /p?user_key=u&app_id=i HTTP/1.1" 200 1 "-" "-""#;
        let with = |mode| {
            Parser::new(LogFormat::Combined, CredentialRule::query(mode))
                .parse(line)
                .map(|r| r.credential)
        };
        assert_eq!(with(CredentialMode::Auto), Ok(user_key("u")));
        assert_eq!(with(CredentialMode::UserKey), Ok(user_key("u")));
        assert_eq!(with(CredentialMode::AppId), Ok(Credential::app_id(b"i")));
    }

    #[test]
    fn missing_fields_and_garbage_are_malformed() {
        for line in [
            "",
            "garbage",
            r#"h - - [24/Nov/2026:10:15:00 +0000] "GET /?user_key=k HTTP/1.1""#,
            r#"h - - [24/Nov/2026:10:15:00 +0000] "GET /?user_key=k HTTP/1.1" 20"#,
            r#"h - - [24/Nov/2026:10:15:00 +0000] "GET /?user_key=k HTTP/1.1" 2000 1"#,
            r#"h - - [24/Nov/2026:10:15:00 +0000] "GET /?user_key=k"#,
            r#"h - - [24/Nov/2026:10:15 +0000] "GET /?user_key=k HTTP/1.1" 200 1"#,
            r#"h - - [24/Nov/2026:10:15:00 +0000] "-" 400 0 "-" "-""#,
            r#"h - - [24/Nov/2026:10:15:00 +0000] "\x16\x03\x01" 400 0 "-" "-""#,
            r#"h - - [24/Nov/2026:10:15:00 +0000] "GET " 400 0 "-" "-""#,
            "h - - [24/Nov/2026:10:15:00 +0000] \"GET /?user_key=k\\",
        ] {
            assert_eq!(parse(line), Err(Skip::Malformed), "{line}");
        }
        // Bytes that are not UTF-8 around the fields do not matter.
        let mut line =
            br#"h - - [24/Nov/2026:10:15:00 +0000] "GET /?user_key=k HTTP/1.1" 200 1 "-" ""#
                .to_vec();
        line.extend_from_slice(&[0xff, 0xfe, b'"']);
        let r = Parser::new(
            LogFormat::Combined,
            CredentialRule::query(CredentialMode::Auto),
        )
        .parse(&line)
        .unwrap();
        assert_eq!(r.credential, user_key("k"));
    }

    use super::testing::{headers, nginx, reported};

    const MAIN: &str = r#"$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent "$http_referer" "$http_user_agent" $request_time $http_x_api_key $http_x_app_id"#;

    #[test]
    fn a_main_log_format_with_credentials_in_headers() {
        let mut p = nginx(MAIN, LogEscape::Default, headers(CredentialMode::Auto));
        let line = |key: &str, app: &str| {
            format!(
                r#"10.0.0.1 - - [24/Nov/2026:10:15:00 +0000] "GET /v1/words?page=2 HTTP/1.1" 200 612 "-" "curl/8.0" 0.012 {key} {app}"#
            )
        };
        assert_eq!(
            reported(&mut p, &line("k%2B1", "-")),
            Ok((CredentialKind::UserKey, "k%2B1".into(), 200, 1_795_515_300))
        );
        assert_eq!(
            reported(&mut p, &line("-", r"app\x22")),
            Ok((CredentialKind::AppId, "app\"".into(), 200, 1_795_515_300))
        );
        assert_eq!(reported(&mut p, &line("-", "-")), Err(Skip::NoCredential));
        let text = line("k", "-");
        let r = p.parse(text.as_bytes()).unwrap();
        assert_eq!(
            (r.method, r.path, r.query),
            (
                Some(&b"GET"[..]),
                Some(&b"/v1/words"[..]),
                Some(&b"page=2"[..])
            )
        );
        // The mode decides which header counts.
        let mut app_only = nginx(MAIN, LogEscape::Default, headers(CredentialMode::AppId));
        assert_eq!(
            reported(&mut app_only, &line("k", "a")).map(|r| r.1),
            Ok("a".into())
        );
        assert_eq!(reported(&mut p, "garbage"), Err(Skip::Malformed));
    }

    #[test]
    fn a_format_that_cannot_carry_the_credential_is_refused_with_what_to_add() {
        let e = NginxFormat::compile(
            "[$time_local] \"$request\" $status",
            LogEscape::Default,
            &headers(CredentialMode::UserKey),
        )
        .unwrap_err();
        assert!(e.contains("$http_x_api_key"), "{e}");
        let e = NginxFormat::compile(
            "[$time_local] $status",
            LogEscape::Default,
            &CredentialRule::query(CredentialMode::Auto),
        )
        .unwrap_err();
        assert!(e.contains("$request") && e.contains("$arg_user_key"), "{e}");
        let e = NginxFormat::compile(
            "[$time_local] $status",
            LogEscape::Default,
            &CredentialRule {
                location: CredentialLocation::Authorization,
                ..CredentialRule::query(CredentialMode::Auto)
            },
        )
        .unwrap_err();
        assert!(e.contains("$http_authorization"), "{e}");
    }

    #[test]
    fn json_escaped_formats_times_args_and_authorization() {
        // escape=json, ISO 8601 time, the credential from $arg_user_key.
        let mut p = nginx(
            r#"{"t":"$time_iso8601","m":"$request_method","u":"$request_uri","s":$status,"k":"$arg_user_key"}"#,
            LogEscape::Json,
            CredentialRule::query(CredentialMode::Auto),
        );
        let line = r#"{"t":"2026-11-24T11:15:00+01:00","m":"POST","u":"/a?user_key=ignored","s":201,"k":"caf\u00e9%21"}"#;
        assert_eq!(
            reported(&mut p, line),
            Ok((CredentialKind::UserKey, "café!".into(), 201, 1_795_515_300))
        );
        // $msec; without $arg_, the query string of $request.
        let mut p = nginx(
            "$msec \"$request\" $status",
            LogEscape::Default,
            CredentialRule::query(CredentialMode::Auto),
        );
        assert_eq!(
            reported(
                &mut p,
                r#"1795515300.999 "GET /?app_id=a1&app_key=k HTTP/1.1" 404"#
            ),
            Ok((CredentialKind::AppId, "a1".into(), 404, 1_795_515_300))
        );
        // Basic authorization: the user is the user_key (or, in app_id mode, the app_id).
        let basic = |mode| CredentialRule {
            location: CredentialLocation::Authorization,
            ..CredentialRule::query(mode)
        };
        let line = r#"[24/Nov/2026:10:15:00 +0000] "GET / HTTP/1.1" 200 "Basic dXNlcjpwYXNz""#;
        let format = r#"[$time_local] "$request" $status "$http_authorization""#;
        let mut p = nginx(format, LogEscape::Default, basic(CredentialMode::Auto));
        assert_eq!(
            reported(&mut p, line).map(|r| (r.0, r.1)),
            Ok((CredentialKind::UserKey, "user".into()))
        );
        let mut p = nginx(format, LogEscape::Default, basic(CredentialMode::AppId));
        assert_eq!(
            reported(&mut p, line).map(|r| (r.0, r.1)),
            Ok((CredentialKind::AppId, "user".into()))
        );
        let bearer = line.replace("Basic dXNlcjpwYXNz", "Bearer abc");
        assert_eq!(reported(&mut p, &bearer), Err(Skip::NoCredential));
    }

    use super::testing::{jwt, oidc};

    #[test]
    fn oidc_reads_the_app_id_from_a_jwt_where_the_format_logs_it() {
        use CredentialLocation::{Authorization, Headers, Query};
        let token = jwt(r#"{"azp":"app-1","client_id":"client-1"}"#);
        let app_id = |p: &mut Parser, line: &str| {
            reported(p, line).map(|(kind, app_id, _, _)| {
                assert_eq!(kind, CredentialKind::AppId);
                app_id
            })
        };
        // $http_authorization, for location = "authorization" or "headers", either claim.
        let format = r#"[$time_local] "$request" $status "$http_authorization""#;
        let line = |authorization: &str| {
            format!(
                r#"[24/Nov/2026:10:15:00 +0000] "GET /?user_key=u HTTP/1.1" 200 "{authorization}""#
            )
        };
        let bearer = line(&format!("Bearer {token}"));
        for location in [Authorization, Headers] {
            let mut p = nginx(format, LogEscape::Default, oidc(location, "azp"));
            assert_eq!(app_id(&mut p, &bearer), Ok("app-1".into()));
            assert_eq!(app_id(&mut p, &line("-")), Err(Skip::NoCredential));
            assert_eq!(
                app_id(&mut p, &line("Basic dXNlcjpwYXNz")),
                Err(Skip::NoCredential)
            );
            assert_eq!(
                app_id(&mut p, &line("Bearer a.b")),
                Err(Skip::InvalidCredential)
            );
        }
        let mut p = nginx(format, LogEscape::Json, oidc(Authorization, "client_id"));
        assert_eq!(app_id(&mut p, &bearer), Ok("client-1".into()));
        // $arg_access_token, or the query string of $request.
        let mut p = nginx(
            "$msec $status $arg_access_token",
            LogEscape::Default,
            oidc(Query, "azp"),
        );
        assert_eq!(
            app_id(&mut p, &format!("1795515300.5 200 {token}")),
            Ok("app-1".into())
        );
        assert_eq!(
            app_id(&mut p, "1795515300.5 200 -"),
            Err(Skip::NoCredential)
        );
        let request = format!(r#"1795515300.5 "GET /v1?page=1&access_token={token} HTTP/1.1" 200"#);
        let mut p = nginx(
            "$msec \"$request\" $status",
            LogEscape::Default,
            oidc(Query, "azp"),
        );
        assert_eq!(app_id(&mut p, &request), Ok("app-1".into()));
        // And combined.
        let mut p = Parser::new(LogFormat::Combined, oidc(Query, "client_id"));
        let line = format!(
            r#"h - - [24/Nov/2026:10:15:00 +0000] "GET /v1?access_token={token} HTTP/1.1" 200 1 "-" "-""#
        );
        assert_eq!(app_id(&mut p, &line), Ok("client-1".into()));
        assert_eq!(
            app_id(&mut p, &line.replace("access_token", "user_key")),
            Err(Skip::NoCredential)
        );
    }

    #[test]
    fn an_oidc_format_without_the_token_is_refused_with_what_to_add() {
        let compile = |format: &str, location| {
            NginxFormat::compile(format, LogEscape::Default, &oidc(location, "azp")).unwrap_err()
        };
        for location in [
            CredentialLocation::Authorization,
            CredentialLocation::Headers,
        ] {
            let e = compile(
                r#"[$time_local] "$request" $status $http_x_api_key"#,
                location,
            );
            assert!(
                e.contains("Bearer JWT") && e.contains("add $http_authorization"),
                "{e}"
            );
        }
        let e = compile(
            "[$time_local] $status $arg_user_key",
            CredentialLocation::Query,
        );
        assert!(
            e.contains("$request") && e.contains("$arg_access_token"),
            "{e}"
        );
    }

    #[test]
    fn times_as_nginx_writes_them() {
        assert_eq!(
            time_iso8601(b"2026-11-24T10:15:00+00:00"),
            Some(1_795_515_300)
        );
        assert_eq!(time_iso8601(b"2026-11-24T10:15:00Z"), Some(1_795_515_300));
        assert_eq!(
            time_iso8601(b"2026-11-24T05:15:00.123-05:00"),
            Some(1_795_515_300)
        );
        assert_eq!(time_iso8601(b"2026-13-24T10:15:00+00:00"), None);
        assert_eq!(time_iso8601(b"2026-11-24 10:15:00+00:00"), None);
        assert_eq!(time_iso8601(b"2026-11-24T10:15:00+0000"), None);
        assert_eq!(msec(b"1795515300.123"), Some(1_795_515_300));
        assert_eq!(msec(b"1795515300"), Some(1_795_515_300));
        assert_eq!(msec(b"17955.15300.1"), None);
        assert_eq!(msec(b".5"), None);
        assert_eq!(msec(b"-1"), None);
    }

    #[test]
    fn common_is_combined_without_the_last_fields() {
        let mut p = Parser::new(
            LogFormat::Common,
            CredentialRule::query(CredentialMode::Auto),
        );
        assert_eq!(
            reported(
                &mut p,
                r#"h - - [24/Nov/2026:10:15:00 +0000] "GET /?user_key=k HTTP/1.1" 200 12"#
            ),
            Ok((CredentialKind::UserKey, "k".into(), 200, 1_795_515_300))
        );
    }

    proptest::proptest! {
        /// Any bytes into a compiled format's parser: a request or a skip, never a panic.
        #[test]
        fn any_bytes_parse_or_skip_in_a_log_format(line in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = nginx(MAIN, LogEscape::Default, headers(CredentialMode::Auto)).parse(&line);
            let _ = nginx(MAIN, LogEscape::Json, headers(CredentialMode::Auto)).parse(&line);
        }
    }

    #[test]
    fn escaped_quotes_in_the_request() {
        for (request, end) in [
            (r#"a" x"#, 1),
            (r#"a\"b" x"#, 4),
            (r#"a\\" x"#, 3),
            (r#"a\\\"b" x"#, 6),
            (r#"\"""#, 2),
        ] {
            assert_eq!(closing_quote(request.as_bytes()), Some(end), "{request}");
        }
        assert_eq!(closing_quote(br#"a\""#), None);
        assert_eq!(closing_quote(b"abc"), None);
    }

    proptest::proptest! {
        /// The word-at-a-time backward search finds what a plain one finds.
        #[test]
        fn rfind_short_is_a_search(hay in proptest::collection::vec(proptest::sample::select(vec![b' ', b'a', 0x80, 0xff, 0x00, 0x01, 0x21, 0x20 ^ 0x80]), 0..40), needle in proptest::sample::select(vec![b' ', b'a', 0x80, 0x00])) {
            proptest::prop_assert_eq!(rfind_short(&hay, needle), hay.iter().rposition(|&b| b == needle));
        }

        /// The protocol found at the end of a request finds the target a search for its last
        /// space finds.
        #[test]
        fn request_line_is_a_search(pieces in proptest::collection::vec(proptest::sample::select(vec![
            "GET", " ", "/a", "HTTP/", "1.1", " HTTP/1.1", "HTTP/2.0", "x y", "2 ",
        ]), 0..8)) {
            let request = pieces.concat();
            fn plain(request: &[u8]) -> Option<(&[u8], &[u8])> {
                let m = request.iter().position(|b| !b.is_ascii_uppercase())?;
                (m > 0 && request[m] == b' ').then_some(())?;
                let rest = &request[m + 1..];
                let target = match rest.iter().rposition(|&b| b == b' ') {
                    Some(last) if rest[last + 1..].starts_with(b"HTTP/") => &rest[..last],
                    _ => rest,
                };
                (!target.is_empty()).then_some((&request[..m], target))
            }
            proptest::prop_assert_eq!(request_line(request.as_bytes()), plain(request.as_bytes()));
        }

        /// The word-at-a-time search finds what a plain search finds.
        #[test]
        fn find_short_is_a_search(hay in proptest::collection::vec(proptest::sample::select(vec![b'&', b'a', 0x80, 0xff, 0x00, 0x26 ^ 0x80]), 0..40), needle in proptest::sample::select(vec![b'&', b'a', 0x80, 0x00])) {
            proptest::prop_assert_eq!(find_short(&hay, needle), hay.iter().position(|&b| b == needle));
        }

        /// Whatever the bytes, a line parses or is skipped with a reason: never a panic.
        #[test]
        fn any_bytes_parse_or_skip(line in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = Parser::new(LogFormat::Combined, CredentialRule::query(CredentialMode::Auto)).parse(&line);
        }

        /// A line with a JWT, cut anywhere, with a byte changed anywhere: the token's
        /// payload decodes or the line is skipped.
        #[test]
        fn damaged_jwt_lines_parse_or_skip(cut in 0usize..400, at in 0usize..400, byte in proptest::prelude::any::<u8>()) {
            let mut line = format!(
                r#"[24/Nov/2026:10:15:00 +0000] "GET / HTTP/1.1" 200 "Bearer {}""#,
                jwt(r#"{"azp":"app-1","scope":"openid"}"#)
            )
            .into_bytes();
            if at < line.len() {
                line[at] = byte;
            }
            line.truncate(cut.min(line.len()));
            let mut p = nginx(
                r#"[$time_local] "$request" $status "$http_authorization""#,
                LogEscape::Default,
                oidc(CredentialLocation::Authorization, "azp"),
            );
            let _ = p.parse(&line).and_then(|r| r.credential.decode());
        }

        /// Mangled real lines, too: cut anywhere, with a byte changed anywhere.
        #[test]
        fn damaged_lines_parse_or_skip(cut in 0usize..120, at in 0usize..120, byte in proptest::prelude::any::<u8>()) {
            let mut line = br#"10.0.0.1 - - [24/Nov/2026:10:15:00 +0000] "GET /v1/x?user_key=ab%41c&app_id=z HTTP/1.1" 200 5 "-" "ua""#.to_vec();
            if at < line.len() {
                line[at] = byte;
            }
            line.truncate(cut.min(line.len()));
            for mode in [CredentialMode::Auto, CredentialMode::UserKey, CredentialMode::AppId] {
                let _ = Parser::new(LogFormat::Combined, CredentialRule::query(mode)).parse(&line);
            }
        }
    }
}
