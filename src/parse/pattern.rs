//! `format = "regex"`: any line layout, read by a regular expression with named groups (`time`,
//! `status`, `method`, `uri` or `path` and `query`, or `request`, `host`, and the credential's
//! groups). Compiled once; each line is matched into reused capture slots, so a line allocates
//! nothing. The one format allowed to be slower than the byte scanners.

use regex::bytes::{CaptureLocations, Regex};
use regex_automata::hybrid::dfa::DFA;
use regex_automata::{Anchored, Input};

use super::failure::shown;
use super::strftime::TimeFormat;
use super::{
    cached, json, request_line, split_target, status_digits, time_local, Carried, CredentialRule,
    Lacks, LogEscape, NamedValues, Request, Skip, TimeField, LOGGED_HEADERS,
};

/// The names of the groups tally reads, by their place in [`RegexFormat::groups`].
pub(crate) const GROUPS: [&str; 11] = [
    "time",
    "status",
    "request",
    "method",
    "uri",
    "path",
    "query",
    "host",
    "user_key",
    "app_id",
    "authorization",
];
const TIME: usize = 0;
const STATUS: usize = 1;
const REQUEST: usize = 2;
const METHOD: usize = 3;
const URI: usize = 4;
const PATH: usize = 5;
const QUERY: usize = 6;
const HOST: usize = 7;
const USER_KEY: usize = 8;
const APP_ID: usize = 9;
const AUTHORIZATION: usize = 10;

/// A `regex` with its `time_format`, compiled for one source's credentials.
#[derive(Debug)]
pub struct RegexFormat {
    regex: Regex,
    /// The same expression as a lazy DFA, to tell where a line stops matching (`tally parse`);
    /// None when the expression has what a DFA cannot run (Unicode word boundaries).
    dfa: Option<DFA>,
    /// As given (for `tally check`).
    pub(crate) text: String,
    pub(crate) time_format: Option<TimeFormat>,
    /// `time_format` as given.
    pub(crate) time_format_text: Option<String>,
    pub(crate) escape: LogEscape,
    /// Each group tally reads → its index among the expression's groups.
    groups: [Option<usize>; GROUPS.len()],
    credentials: Carried,
}

impl RegexFormat {
    /// Compiles `text` (and `time_format`) for credentials found as `rule` says; the error says
    /// what is wrong or missing, and which key it is about (`regex` or `time_format`).
    pub(crate) fn compile(
        text: &str,
        time_format: Option<&str>,
        escape: LogEscape,
        rule: &CredentialRule,
    ) -> Result<RegexFormat, (&'static str, String)> {
        let regex = Regex::new(text).map_err(|e| ("regex", e.to_string()))?;
        let mut groups = [None; GROUPS.len()];
        for (index, name) in regex.capture_names().enumerate() {
            let Some(name) = name else { continue };
            match GROUPS.iter().position(|g| *g == name) {
                Some(at) => groups[at] = Some(index),
                None => {
                    return Err((
                        "regex",
                        format!(
                            "unknown group name `{name}`: tally reads the groups {}; make the others unnamed, (...) or (?:...)",
                            GROUPS.join(", ")
                        ),
                    ))
                }
            }
        }
        let has = |group: usize| groups[group].is_some();
        for (group, what) in [
            (TIME, "the request's time"),
            (STATUS, "the response status"),
        ] {
            if !has(group) {
                return Err((
                    "regex",
                    format!(
                        "it has no group `{}`: give (?P<{0}>...) around {what}",
                        GROUPS[group]
                    ),
                ));
            }
        }
        let compiled_time = time_format
            .map(TimeFormat::compile)
            .transpose()
            .map_err(|e| ("time_format", e))?;
        let logs = NamedValues {
            user_key: has(USER_KEY),
            app_id: has(APP_ID),
            query: has(URI) || has(QUERY) || has(REQUEST),
            authorization: has(AUTHORIZATION),
        };
        let credentials = rule.carried(logs, escape).map_err(|lacks| {
            let text = match lacks {
                Lacks::Query { oidc: true } => "the access token is read from the query string, and it has no group for it: give (?P<uri>...), (?P<query>...) or (?P<request>...)".to_string(),
                Lacks::Query { oidc: false } => "credentials are read from the query string, and it has no group for it: give (?P<uri>...), (?P<query>...), (?P<request>...) or (?P<user_key>...)".to_string(),
                Lacks::Header(group, header) => format!("credentials are read from request headers: give (?P<{group}>...) around the logged {header} header"),
                Lacks::Authorization { oidc } => format!(
                    "credentials are read from the Authorization header{}: give (?P<authorization>...) around the logged header",
                    if oidc { " (a Bearer JWT)" } else { "" }
                ),
            };
            ("regex", text)
        })?;
        Ok(RegexFormat {
            dfa: DFA::new(text).ok(),
            regex,
            text: text.to_string(),
            time_format: compiled_time,
            time_format_text: time_format.map(str::to_string),
            escape,
            groups,
            credentials,
        })
    }

    /// The `host` group of `line`, if it matches.
    pub(crate) fn host<'a>(&self, line: &'a [u8]) -> Option<&'a [u8]> {
        let captures = self.regex.captures(line)?;
        Some(captures.get(self.groups[HOST]?)?.as_bytes())
    }

    /// Whether it has a `host` group.
    pub(crate) fn logs_host(&self) -> bool {
        self.groups[HOST].is_some()
    }

    /// Capture slots for this expression, reused line after line.
    pub(crate) fn capture_locations(&self) -> CaptureLocations {
        self.regex.capture_locations()
    }

    /// The values of the groups tally reads, or None when the line does not match.
    fn values<'a>(
        &self,
        captures: &mut CaptureLocations,
        line: &'a [u8],
    ) -> Option<[Option<&'a [u8]>; GROUPS.len()]> {
        self.regex.captures_read(captures, line)?;
        Some(self.groups.map(|index| {
            let (start, end) = captures.get(index?)?;
            Some(&line[start..end])
        }))
    }

    /// Where a line that does not match stops matching, read from its start; the line's length
    /// when it ends before the expression does.
    pub(crate) fn stops_at(&self, line: &[u8]) -> Option<usize> {
        let dfa = self.dfa.as_ref()?;
        let mut cache = dfa.create_cache();
        let input = Input::new(line).anchored(Anchored::Yes);
        let mut state = dfa.start_state_forward(&mut cache, &input).ok()?;
        for (at, &byte) in line.iter().enumerate() {
            state = dfa.next_state(&mut cache, state, byte).ok()?;
            if state.is_dead() {
                return Some(at);
            }
            if state.is_quit() {
                return None;
            }
        }
        Some(line.len())
    }

    /// Where a line [`line`] found malformed stops matching, or which group's value tally cannot
    /// read, and what was expected there (for `tally parse`).
    pub(super) fn failure(&self, line: &[u8]) -> (Option<usize>, String) {
        let Some(captures) = self.regex.captures(line) else {
            return match self.stops_at(line) {
                Some(at) if at == line.len() => {
                    (Some(at), "more: the line ends before the regex does".into())
                }
                Some(at) => (
                    Some(at),
                    "what the regex has here (matched from the line's start, it stops here)".into(),
                ),
                None => (None, "a line that the regex matches".into()),
            };
        };
        let group = |g: usize| self.groups[g].and_then(|i| captures.get(i));
        let not = |m: regex::bytes::Match<'_>, what: &str| {
            (
                Some(m.start()),
                format!("{what}, not `{}`", shown(m.as_bytes())),
            )
        };
        if let Some(time) = group(TIME) {
            let t = time.as_bytes();
            let ok = match &self.time_format {
                Some(f) => f.parse(t),
                None => any_time(t),
            };
            if ok.is_none() {
                let what = match &self.time_format_text {
                    Some(f) => format!("the time group as time_format `{f}` says"),
                    None => "the time group: `25/Nov/2026:18:41:03 +0100`, RFC 3339 or epoch seconds (else give time_format)".into(),
                };
                return not(time, &what);
            }
        }
        match group(STATUS) {
            Some(s) if status_digits(s.as_bytes()).is_none() => {
                not(s, "the status group: 3 digits")
            }
            None => (
                None,
                "the status group: it did not take part in the match".into(),
            ),
            Some(_) => match group(REQUEST) {
                Some(r) if request_line(r.as_bytes()).is_none() => {
                    not(r, "the request group as `METHOD /path HTTP/1.1`")
                }
                _ => (None, "a line that the regex matches".into()),
            },
        }
    }

    /// Where `line`'s credential values are (to mask them wherever tally shows the line), and
    /// the offset past which it cannot be shown: a line that does not match shows only what
    /// comes before it stops matching, and nothing when the expression has credential groups
    /// (their values could be anywhere).
    pub(crate) fn secrets(&self, line: &[u8]) -> (Vec<std::ops::Range<usize>>, Option<usize>) {
        let Some(captures) = self.regex.captures(line) else {
            let credential_groups = [USER_KEY, APP_ID, AUTHORIZATION]
                .iter()
                .any(|&g| self.groups[g].is_some());
            let cut = if credential_groups {
                Some(0)
            } else {
                self.stops_at(line).or(Some(0))
            };
            return (Vec::new(), cut);
        };
        let spans = [USER_KEY, APP_ID, AUTHORIZATION]
            .iter()
            .filter_map(|&g| captures.get(self.groups[g]?))
            .filter(|m| !m.is_empty())
            .map(|m| m.range())
            .collect();
        (spans, None)
    }
}

/// A line of a `regex` format.
#[inline]
pub(super) fn line<'a>(
    format: &RegexFormat,
    rule: &CredentialRule,
    last_time: &mut (TimeField, i64),
    captures: &mut CaptureLocations,
    line: &'a [u8],
) -> Result<Request<'a>, Skip> {
    let v = format.values(captures, line).ok_or(Skip::Malformed)?;
    let time = v[TIME].ok_or(Skip::Malformed)?;
    let timestamp = match &format.time_format {
        Some(f) => cached(last_time, time, |t| f.parse(t)),
        None => cached(last_time, time, any_time),
    }
    .ok_or(Skip::Malformed)?;
    let status = v[STATUS].and_then(status_digits).ok_or(Skip::Malformed)?;
    let (method, target) = match v[REQUEST].map(request_line) {
        Some(Some((method, target))) => (Some(method), Some(target)),
        Some(None) => return Err(Skip::Malformed),
        None => (v[METHOD], v[URI]),
    };
    let (mut path, mut query) = match target.map(split_target) {
        Some((path, query)) => (Some(path), Some(query)),
        None => (None, None),
    };
    if let Some(p) = v[PATH] {
        path = Some(p);
    }
    if let Some(q) = v[QUERY] {
        query = Some(q.strip_prefix(b"?").unwrap_or(q));
    }
    let credential = rule.in_values(
        format.credentials,
        query,
        v[USER_KEY],
        v[APP_ID],
        v[AUTHORIZATION],
        format.escape,
    )?;
    Ok(Request {
        timestamp,
        method,
        path,
        query,
        host: v[HOST].filter(|host| *host != b"-"),
        headers: [None; LOGGED_HEADERS],
        status,
        credential,
    })
}

/// A time without a `time_format`: NGINX's `$time_local`, RFC 3339 / ISO 8601, or epoch time.
pub(crate) fn any_time(t: &[u8]) -> Option<i64> {
    match <&TimeField>::try_from(t) {
        Ok(local) if t[2] == b'/' => time_local(local),
        _ => json::rfc3339_or_epoch(t),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{CredentialKind, CredentialLocation, CredentialMode, LogFormat, Parser};
    use super::*;
    use crate::parse::testing::{headers, reported as got};
    use std::sync::Arc;

    const T: i64 = 1_795_515_300; // 2026-11-24 10:15:00 UTC

    /// NGINX's combined format as a regex, its time read without a time_format.
    const COMBINED: &str =
        r#"^(\S+) \S+ \S+ \[(?P<time>[^\]]+)\] "(?P<request>[^"]*)" (?P<status>\d{3}) \S+"#;

    fn parser(text: &str, time_format: Option<&str>, rule: CredentialRule) -> Parser {
        let format = LogFormat::regex(text, time_format, &rule).unwrap();
        Parser::new(format, rule)
    }

    fn query() -> CredentialRule {
        CredentialRule::query(CredentialMode::Auto)
    }

    #[test]
    fn combined_lines_through_a_regex() {
        let mut p = parser(COMBINED, None, query());
        let line = r#"10.0.0.1 - - [24/Nov/2026:11:15:00 +0100] "GET /v1/x?page=2&user_key=k%21 HTTP/1.1" 404 12 "-" "ua""#;
        assert_eq!(
            got(&mut p, line),
            Ok((CredentialKind::UserKey, "k!".into(), 404, T))
        );
        let r = p.parse(line.as_bytes()).unwrap();
        assert_eq!(
            (r.method, r.path, r.query),
            (
                Some(&b"GET"[..]),
                Some(&b"/v1/x"[..]),
                Some(&b"page=2&user_key=k%21"[..])
            )
        );
        // The same second again (the cache), then another.
        assert_eq!(got(&mut p, line).map(|r| r.3), Ok(T));
        let later = line.replace("11:15:00", "11:15:07");
        assert_eq!(got(&mut p, &later).map(|r| r.3), Ok(T + 7));
        for bad in [
            "garbage",
            r#"10.0.0.1 - - [24/Nov/2026:11:15:00 +0100] "GET /?user_key=k HTTP/1.1" 4040 1"#,
            r#"10.0.0.1 - - [yesterday] "GET /?user_key=k HTTP/1.1" 200 1"#,
            r#"10.0.0.1 - - [24/Nov/2026:11:15:00 +0100] "-" 400 0"#,
        ] {
            assert_eq!(got(&mut p, bad), Err(Skip::Malformed), "{bad}");
        }
        assert_eq!(
            got(&mut p, &line.replace("user_key", "other")),
            Err(Skip::NoCredential)
        );
    }

    #[test]
    fn a_time_format_separate_fields_and_header_credentials() {
        // A custom application log: `2026-11-24 10:15:00.123 | POST /orders ?a=1 | 201 | key=-  app=app1`.
        let text = r"^(?P<time>\S+ \S+) \| (?P<method>[A-Z]+) (?P<path>\S+) (?P<query>\S*) \| (?P<status>\d+) \| key=(?P<user_key>\S+) +app=(?P<app_id>\S+)$";
        let mut p = parser(
            text,
            Some("%Y-%m-%d %H:%M:%S.%f"),
            headers(CredentialMode::Auto),
        );
        let line = |key: &str, app: &str| {
            format!("2026-11-24 10:15:00.123 | POST /orders ?a=1 | 201 | key={key}  app={app}")
        };
        assert_eq!(
            got(&mut p, &line("-", "app1")),
            Ok((CredentialKind::AppId, "app1".into(), 201, T))
        );
        assert_eq!(
            got(&mut p, &line(r"k\x22", "app1")),
            Ok((CredentialKind::UserKey, "k\"".into(), 201, T))
        );
        assert_eq!(got(&mut p, &line("-", "-")), Err(Skip::NoCredential));
        let text = line("k", "-");
        let r = p.parse(text.as_bytes()).unwrap();
        assert_eq!(
            (r.method, r.path, r.query),
            (Some(&b"POST"[..]), Some(&b"/orders"[..]), Some(&b"a=1"[..]))
        );
        // The time group as time_format does not say is malformed.
        assert_eq!(
            got(&mut p, &text.replace("10:15:00.123", "10:15:00")),
            Err(Skip::Malformed)
        );
    }

    #[test]
    fn times_without_a_time_format_and_basic_authorization() {
        let rule = CredentialRule {
            location: CredentialLocation::Authorization,
            ..query()
        };
        let mut p = parser(
            r#"^(?P<time>\S+) (?P<status>\d+) "(?P<authorization>[^"]*)"$"#,
            None,
            rule,
        );
        for time in [
            "2026-11-24T10:15:00Z",
            "2026-11-24T11:15:00.5+01:00",
            "1795515300",
            "1795515300123",
            "24/Nov/2026:10:15:00",
        ] {
            let line = format!(r#"{time} 200 "Basic dXNlcjpwYXNz""#);
            let expected = if time.contains('/') {
                Err(Skip::Malformed)
            } else {
                Ok((CredentialKind::UserKey, "user".into(), 200, T))
            };
            assert_eq!(got(&mut p, &line), expected, "{time}");
        }
        assert_eq!(
            got(&mut p, r#"1795515300 200 "Bearer abc""#),
            Err(Skip::NoCredential)
        );
        assert_eq!(
            got(&mut p, r#"1795515300 200 "-""#),
            Err(Skip::NoCredential)
        );
    }

    #[test]
    fn oidc_tokens_from_the_authorization_group_or_the_query() {
        use crate::parse::testing::{jwt, oidc};
        let token = jwt(r#"{"azp":"app-1","client_id":"client-1"}"#);
        let mut p = parser(
            r#"^(?P<time>\S+) (?P<status>\d+) (?P<uri>\S+) "(?P<authorization>[^"]*)"$"#,
            None,
            oidc(CredentialLocation::Authorization, "client_id"),
        );
        let line = |auth: &str| format!(r#"1795515300 200 /x?access_token=no "{auth}""#);
        assert_eq!(
            got(&mut p, &line(&format!("Bearer {token}"))),
            Ok((CredentialKind::AppId, "client-1".into(), 200, T))
        );
        assert_eq!(
            got(&mut p, &line("Basic dXNlcjpwYXNz")),
            Err(Skip::NoCredential)
        );
        assert_eq!(
            got(&mut p, &line("Bearer a.b")),
            Err(Skip::InvalidCredential)
        );
        let mut p = parser(COMBINED, None, oidc(CredentialLocation::Query, "azp"));
        let line = format!(
            r#"h - - [24/Nov/2026:10:15:00 +0000] "GET /x?access_token={token} HTTP/1.1" 200 1"#
        );
        assert_eq!(
            got(&mut p, &line),
            Ok((CredentialKind::AppId, "app-1".into(), 200, T))
        );
        let (key, e) = RegexFormat::compile(
            COMBINED,
            None,
            LogEscape::Default,
            &oidc(CredentialLocation::Headers, "azp"),
        )
        .unwrap_err();
        assert_eq!(key, "regex");
        assert!(
            e.contains("Bearer JWT") && e.contains("(?P<authorization>"),
            "{e}"
        );
    }

    #[test]
    fn expressions_that_cannot_work_are_refused_with_the_key_and_what_to_give() {
        let refused = |text: &str, time_format: Option<&str>, rule: CredentialRule| {
            RegexFormat::compile(text, time_format, LogEscape::Default, &rule).unwrap_err()
        };
        let (key, e) = refused("(?P<time>", None, query());
        assert_eq!(key, "regex");
        assert!(e.contains("unclosed"), "{e}");
        let (key, e) = refused(r"(?P<time>\S+) (?P<stat>\d+)", None, query());
        assert_eq!(key, "regex");
        assert!(e.contains("`stat`") && e.contains("status"), "{e}");
        let (_, e) = refused(r"(?P<time>\S+) (?P<uri>\S+)", None, query());
        assert!(e.contains("(?P<status>"), "{e}");
        let (_, e) = refused(r"(?P<time>\S+) (?P<status>\d+)", None, query());
        assert!(e.contains("(?P<uri>"), "{e}");
        let (_, e) = refused(
            r"(?P<time>\S+) (?P<status>\d+) (?P<uri>\S+)",
            None,
            headers(CredentialMode::AppId),
        );
        assert!(e.contains("(?P<app_id>") && e.contains("X-App-Id"), "{e}");
        let (key, e) = refused(
            r"(?P<time>\S+) (?P<status>\d+) (?P<uri>\S+)",
            Some("%H:%M"),
            query(),
        );
        assert_eq!(key, "time_format");
        assert!(e.contains("year"), "{e}");
    }

    #[test]
    fn where_a_line_stops_matching() {
        let mut p = parser(COMBINED, None, query());
        let why = |p: &mut Parser, line: &str| {
            let f = p.explain(line.as_bytes()).unwrap_err();
            (f.skip, f.at, f.expected)
        };
        // `[` expected where the time should start.
        let (skip, at, expected) = why(&mut p, r#"10.0.0.1 - - 24/Nov/2026"#);
        assert_eq!((skip, at), (Skip::Malformed, Some(13)));
        assert!(expected.contains("stops here"), "{expected}");
        let (_, at, expected) = why(&mut p, r#"10.0.0.1 - - [24/Nov/2026:11:15:00 +0100] "GET"#);
        assert_eq!(at, Some(46));
        assert!(expected.contains("ends before"), "{expected}");
        let (_, at, expected) = why(
            &mut p,
            r#"10.0.0.1 - - [24/Nov/2026:99:15:00 +0100] "GET /?user_key=k HTTP/1.1" 200 1"#,
        );
        assert_eq!(at, Some(14));
        assert!(expected.contains("time group"), "{expected}");
        let (_, at, expected) = why(
            &mut p,
            r#"10.0.0.1 - - [24/Nov/2026:10:15:00 +0100] "\x16\x03" 200 1"#,
        );
        assert_eq!(at, Some(43));
        assert!(expected.contains("request group"), "{expected}");
    }

    #[test]
    fn credential_groups_are_secrets() {
        let text = r"^(?P<time>\S+) (?P<status>\d+) (?P<uri>\S+) (?P<user_key>\S+)$";
        let format = RegexFormat::compile(
            text,
            None,
            LogEscape::Default,
            &headers(CredentialMode::Auto),
        )
        .unwrap();
        let line = b"1795515300 200 /x secret-key";
        let (spans, cut) = format.secrets(line);
        assert_eq!(
            (spans.len(), spans.first(), cut),
            (1, Some(&(18..28)), None)
        );
        // A line that does not match: where the key is cannot be told, so none of it is shown.
        assert_eq!(format.secrets(b"1795515300 200"), (vec![], Some(0)));
        let no_groups = RegexFormat::compile(COMBINED, None, LogEscape::Default, &query()).unwrap();
        assert_eq!(
            no_groups.secrets(b"10.0.0.1 - - 24/Nov"),
            (vec![], Some(13))
        );
    }

    proptest::proptest! {
        /// Any bytes: a request or a skip, never a panic (nor in the explanation).
        #[test]
        fn any_bytes_parse_or_skip(line in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let mut p = parser(COMBINED, None, query());
            let _ = p.parse(&line);
            let _ = p.explain(&line);
        }

        /// A line written from random values reads back as those values.
        #[test]
        fn values_round_trip(
            path in "/[a-z0-9/._-]{0,20}",
            key in "[A-Za-z0-9]{1,20}",
            status in 100u16..600,
            offset_minutes in -720i64..=840,
            seconds in 0i64..86_400 * 365,
        ) {
            let mut p = parser(COMBINED, None, query());
            let at = T + seconds;
            let local = at + offset_minutes * 60;
            let (days, rest) = (local.div_euclid(86_400), local.rem_euclid(86_400));
            let (y, m, d) = crate::parse::civil_from_days(days);
            let month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"][m as usize - 1];
            let sign = if offset_minutes < 0 { '-' } else { '+' };
            let line = format!(
                r#"10.1.2.3 - - [{d:02}/{month}/{y}:{:02}:{:02}:{:02} {sign}{:02}{:02}] "GET {path}?user_key={key} HTTP/1.1" {status} 5 "-" "-""#,
                rest / 3600, rest / 60 % 60, rest % 60,
                offset_minutes.abs() / 60, offset_minutes.abs() % 60,
            );
            let r = p.parse(line.as_bytes()).unwrap();
            proptest::prop_assert_eq!(r.timestamp, at);
            proptest::prop_assert_eq!(r.status, status);
            proptest::prop_assert_eq!(r.path, Some(path.as_bytes()));
            proptest::prop_assert_eq!(r.credential.decode(), Ok(key));
        }
    }

    #[test]
    fn the_parser_keeps_its_capture_slots() {
        let format = RegexFormat::compile(COMBINED, None, LogEscape::Default, &query()).unwrap();
        let mut p = Parser::new(LogFormat::Regex(Arc::new(format)), query());
        for _ in 0..3 {
            assert!(p
                .parse(br#"h - - [24/Nov/2026:10:15:00 +0000] "GET /?user_key=k HTTP/1.1" 200 1"#)
                .is_ok());
        }
    }
}
