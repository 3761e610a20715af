//! One access-log line → one request record (time, method, path, query, host, status, credential,
//! logged header values).
//!
//! The record borrows from the line and parsing allocates nothing: the credential stays as the log
//! wrote it, and is decoded ([`Credential::decode`]) once per distinct credential by the aggregation.

use crate::config::{CredentialMode, LogFormat};

/// The caller's credential, as written in the log (still escaped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Credential<'a> {
    UserKey(&'a [u8]),
    /// The app_key that may come with it is not part of a report, so it is not read.
    AppId(&'a [u8]),
}

impl Credential<'_> {
    /// Undoes the log's escaping (`\xHH`, which NGINX writes for bytes it does not print) and the
    /// query string's (`%HH`, `+` for space).
    pub fn decode(&self) -> Result<String, Skip> {
        let (Credential::UserKey(raw) | Credential::AppId(raw)) = *self;
        let mut out = Vec::with_capacity(raw.len());
        let mut i = 0;
        while i < raw.len() {
            let escaped = match raw[i] {
                b'%' => hex_pair(raw.get(i + 1..i + 3)).map(|b| (b, 3)),
                b'\\' if raw.get(i + 1) == Some(&b'x') => {
                    hex_pair(raw.get(i + 2..i + 4)).map(|b| (b, 4))
                }
                _ => None,
            };
            match escaped {
                Some((byte, len)) => {
                    out.push(byte);
                    i += len;
                }
                None => {
                    out.push(if raw[i] == b'+' { b' ' } else { raw[i] });
                    i += 1;
                }
            }
        }
        String::from_utf8(out).map_err(|_| Skip::InvalidCredential)
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
#[derive(Debug, Clone, Copy)]
pub struct Parser {
    format: LogFormat,
    credential: CredentialMode,
    /// The last time field parsed and its value: consecutive lines mostly share their second.
    last_time: (TimeField, i64),
}

impl Parser {
    /// A parser of lines in `format`, reading the credential as `credential` says.
    pub fn new(format: LogFormat, credential: CredentialMode) -> Parser {
        Parser {
            format,
            credential,
            last_time: ([0; 26], 0),
        }
    }

    /// `line` is without its newline. Inlined, with the format's and the credential's parsing,
    /// into the aggregation loop: the record is then built where it is used instead of copied
    /// there (it is larger than a copy the compiler inlines).
    #[inline]
    pub fn parse<'a>(&mut self, line: &'a [u8]) -> Result<Request<'a>, Skip> {
        let fields = match self.format {
            LogFormat::Combined => combined(line).ok_or(Skip::Malformed)?,
        };
        let timestamp = if *fields.time == self.last_time.0 {
            self.last_time.1
        } else {
            let t = time_local(fields.time).ok_or(Skip::Malformed)?;
            self.last_time = (*fields.time, t);
            t
        };
        let (path, query) = match memchr::memchr(b'?', fields.target) {
            Some(q) => (&fields.target[..q], &fields.target[q + 1..]),
            None => (fields.target, &b""[..]),
        };
        Ok(Request {
            timestamp,
            method: Some(fields.method),
            path: Some(path),
            query: Some(query),
            host: None,
            headers: [None; LOGGED_HEADERS],
            status: fields.status,
            credential: credential(query, self.credential)?,
        })
    }
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

/// The first non-empty `user_key`, or `app_id`, of the query string, as NGINX's `$arg_` variables
/// would give them.
#[inline]
fn credential(query: &[u8], mode: CredentialMode) -> Result<Credential<'_>, Skip> {
    let (mut user_key, mut app_id) = (None, None);
    let mut rest = query;
    while !rest.is_empty() {
        let end = find_short(rest, b'&').unwrap_or(rest.len());
        let pair = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or_default();
        if let Some(value) = pair.strip_prefix(b"user_key=") {
            if user_key.is_none() && !value.is_empty() {
                user_key = Some(value);
                if mode != CredentialMode::AppId {
                    // Nothing later in the query can change the answer.
                    break;
                }
            }
        } else if let Some(value) = pair.strip_prefix(b"app_id=") {
            if app_id.is_none() && !value.is_empty() {
                app_id = Some(value);
                if mode == CredentialMode::AppId {
                    break;
                }
            }
        }
    }
    let use_user_key = match mode {
        CredentialMode::Auto => user_key.is_some(),
        CredentialMode::UserKey => true,
        CredentialMode::AppId => false,
    };
    if use_user_key {
        user_key.map(Credential::UserKey)
    } else {
        app_id.map(Credential::AppId)
    }
    .ok_or(Skip::NoCredential)
}

fn hex_pair(digits: Option<&[u8]>) -> Option<u8> {
    let d = digits?;
    let v = |c: u8| (c as char).to_digit(16);
    Some((v(d[0])? * 16 + v(d[1])?) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Request<'_>, Skip> {
        Parser::new(LogFormat::Combined, CredentialMode::Auto).parse(line.as_bytes())
    }

    fn user_key(k: &str) -> Credential<'_> {
        Credential::UserKey(k.as_bytes())
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
        assert_eq!(r.credential, Credential::AppId(b"id1"));
        // NGINX's own escaping, HTTP/0.9 (no protocol), a 499, nothing after the status.
        let r =
            parse(r#"::1 - - [24/Nov/2026:10:15:00 +0000] "GET /x\x22y?user_key=k" 499"#).unwrap();
        assert_eq!((r.status, r.path), (499, Some(&br"/x\x22y"[..])));
        // Extra fields after the user agent ($request_time and friends).
        let r = parse(r#"10.0.0.1 - - [24/Nov/2026:10:15:00 +0000] "DELETE /?app_id=a HTTP/1.1" 503 1 "-" "ua" 0.002 "x""#).unwrap();
        assert_eq!(r.status, 503);
        assert_eq!((r.path, r.query), (Some(&b"/"[..]), Some(&b"app_id=a"[..])));
        assert_eq!(r.credential, Credential::AppId(b"a"));
    }

    #[test]
    fn one_parser_reads_many_lines_with_its_time_cache() {
        let mut p = Parser::new(LogFormat::Combined, CredentialMode::Auto);
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
            parse(&line(q)).and_then(|r| match r.credential {
                Credential::UserKey(_) => r.credential.decode().map(|k| format!("user_key {k}")),
                Credential::AppId(_) => r.credential.decode().map(|k| format!("app_id {k}")),
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
            Parser::new(LogFormat::Combined, mode)
                .parse(line)
                .map(|r| r.credential)
        };
        assert_eq!(with(CredentialMode::Auto), Ok(user_key("u")));
        assert_eq!(with(CredentialMode::UserKey), Ok(user_key("u")));
        assert_eq!(with(CredentialMode::AppId), Ok(Credential::AppId(b"i")));
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
        let r = Parser::new(LogFormat::Combined, CredentialMode::Auto)
            .parse(&line)
            .unwrap();
        assert_eq!(r.credential, user_key("k"));
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
        /// The word-at-a-time search finds what a plain search finds.
        #[test]
        fn find_short_is_a_search(hay in proptest::collection::vec(proptest::sample::select(vec![b'&', b'a', 0x80, 0xff, 0x00, 0x26 ^ 0x80]), 0..40), needle in proptest::sample::select(vec![b'&', b'a', 0x80, 0x00])) {
            proptest::prop_assert_eq!(find_short(&hay, needle), hay.iter().position(|&b| b == needle));
        }

        /// Whatever the bytes, a line parses or is skipped with a reason: never a panic.
        #[test]
        fn any_bytes_parse_or_skip(line in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = Parser::new(LogFormat::Combined, CredentialMode::Auto).parse(&line);
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
                let _ = Parser::new(LogFormat::Combined, mode).parse(&line);
            }
        }
    }
}
