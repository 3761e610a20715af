//! Why a line is skipped, and where it stopped being what its format says: for `tally parse`.
//!
//! Out of the hot path: [`Parser::parse`] stays as it is, and a line it skips is walked again here,
//! step by step, to find the position and what was expected there.

use super::credential::{claim_value, ACCESS_TOKEN};
use super::nginx::{self, Variable};
use super::{
    closing_quote, msec, request_line, status, status_digits, time_iso8601, time_local,
    CredentialKind, CredentialLocation, CredentialMode, Encoding, LogFormat, NginxFormat, Parser,
    Request, Skip, Slot,
};

/// Why a line is not reported: the reason, and where it failed when that is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub(crate) skip: Skip,
    /// The byte offset in the line where parsing stopped.
    pub(crate) at: Option<usize>,
    /// What was expected there (or, without a position, what was looked for), in words.
    pub(crate) expected: String,
}

impl Failure {
    fn new(skip: Skip, at: Option<usize>, expected: impl Into<String>) -> Failure {
        Failure {
            skip,
            at,
            expected: expected.into(),
        }
    }
}

/// An example of each time variable, for messages.
const TIME_LOCAL: &str = "$time_local (like `25/Nov/2026:18:41:03 +0100`)";
const TIME_ISO8601: &str = "$time_iso8601 (like `2026-11-25T18:41:03+01:00`)";
const MSEC: &str = "$msec (like `1764092463.123`)";

impl Parser {
    /// [`Parser::parse`], explained: the request with its credential decoded, or why the line is
    /// skipped (every reason but `too_long`, which the reader decides) and where it failed.
    pub(crate) fn explain<'a>(&mut self, line: &'a [u8]) -> Result<(Request<'a>, String), Failure> {
        let request = match self.parse(line) {
            Ok(request) => request,
            Err(Skip::Malformed) => return Err(self.malformed(line)),
            Err(Skip::NoCredential) => {
                return Err(Failure::new(Skip::NoCredential, None, self.looked_for()))
            }
            // Found, but not in a form that can be a credential: a token that is not a JWT.
            Err(skip) => return Err(Failure::new(skip, None, self.token_looked_for(true))),
        };
        match request.credential.decode() {
            Ok(credential) => Ok((request, credential)),
            // An Authorization value that is not Basic, or Basic without a user.
            Err(Skip::NoCredential) => {
                Err(Failure::new(Skip::NoCredential, None, self.looked_for()))
            }
            Err(skip) => {
                let expected = match request.credential.encoding {
                    Encoding::BasicUser(_) => {
                        "Basic credentials whose base64 decodes to a UTF-8 user".to_string()
                    }
                    Encoding::JwtClaim(claim) => {
                        let claim = claim.name();
                        let why = claim_value(request.credential.raw, claim)
                            .err()
                            .map_or(String::new(), |p| format!(": {}", p.describe(claim)));
                        format!("a JWT whose payload is a JSON object with a string `{claim}` claim{why}")
                    }
                    _ => format!(
                        "a {} that is UTF-8 once decoded",
                        request.credential.kind.name()
                    ),
                };
                Err(Failure::new(skip, None, expected))
            }
        }
    }

    /// Where a line `parse` found malformed stops matching, walking the same steps.
    fn malformed(&self, line: &[u8]) -> Failure {
        let (at, expected) = match &self.format {
            LogFormat::Combined | LogFormat::Common => combined_failure(line),
            LogFormat::Nginx(format) => nginx_failure(format, line),
            // The JSON reader does not say where it stopped yet: say what it needs.
            LogFormat::Json(_) => (
                None,
                "a JSON object with the `time` and `status` fields of [sources.fields], each of its type"
                    .into(),
            ),
            LogFormat::Regex(format) => format.failure(line),
        };
        Failure::new(Skip::Malformed, at, expected)
    }

    /// What `oidc` mode looks for, for a line without a token or, `malformed`, one that is not a
    /// JWT.
    fn token_looked_for(&self, malformed: bool) -> String {
        let claim = self.credentials.jwt_claim.name();
        let arg_logged = matches!(&self.format,
            LogFormat::Nginx(f) if matches!(f.slots.app_id, Some(Slot::AccessToken(_))));
        let (jwt, place, logged) = match self.credentials.reads() {
            CredentialLocation::Query if arg_logged => (
                "a JWT",
                format!("the `{ACCESS_TOKEN}` parameter"),
                format!("$arg_{ACCESS_TOKEN} logged `-` or empty"),
            ),
            CredentialLocation::Query => (
                "a JWT",
                format!("the `{ACCESS_TOKEN}` parameter"),
                format!("no `{ACCESS_TOKEN}=` with a value in the query string"),
            ),
            _ => {
                let logged = match &self.format {
                    LogFormat::Json(f) => format!("`{}` missing", f.fields.authorization),
                    _ => "$http_authorization logged `-`".into(),
                };
                (
                    "a Bearer JWT",
                    "the Authorization header".into(),
                    format!("{logged}, empty or not Bearer"),
                )
            }
        };
        if malformed {
            format!("{jwt} in {place}: three base64url parts separated by dots")
        } else {
            format!("{jwt} in {place} with claim `{claim}`: {logged}")
        }
    }

    /// What the credentials settings look for, for a line without a credential.
    fn looked_for(&self) -> String {
        let rule = &self.credentials;
        let wanted: &[CredentialKind] = match rule.mode {
            CredentialMode::Auto => &[CredentialKind::UserKey, CredentialKind::AppId],
            CredentialMode::UserKey => &[CredentialKind::UserKey],
            CredentialMode::AppId => &[CredentialKind::AppId],
            CredentialMode::Oidc => return self.token_looked_for(false),
        };
        // A log_format reads only the `$http_`/`$arg_` variables it logs.
        let slots = match &self.format {
            LogFormat::Nginx(f) => Some(f.slots),
            LogFormat::Combined | LogFormat::Common | LogFormat::Json(_) | LogFormat::Regex(_) => {
                None
            }
        };
        let logged = |kind: &&CredentialKind| match (slots, kind) {
            (None, _) => true,
            (Some(s), CredentialKind::UserKey) => s.user_key.is_some(),
            (Some(s), CredentialKind::AppId) => s.app_id.is_some(),
        };
        let kinds: Vec<&CredentialKind> = wanted.iter().filter(logged).collect();
        let name = |kind: &CredentialKind| match kind {
            CredentialKind::UserKey => rule.user_key.as_str(),
            CredentialKind::AppId => rule.app_id.as_str(),
        };
        let list = |shown: &dyn Fn(&str) -> String| {
            kinds
                .iter()
                .map(|k| shown(name(k)))
                .collect::<Vec<_>>()
                .join(" or ")
        };
        let names = list(&|n| format!("`{n}`"));
        let variables = |prefix: &str| {
            list(&|n| format!("${prefix}{}", n.to_ascii_lowercase().replace('-', "_")))
        };
        let logs_args = slots.is_some_and(|s| s.user_key.is_some() || s.app_id.is_some());
        match rule.location {
            CredentialLocation::Query if logs_args => {
                format!("the {names} parameter: {} logged `-` or empty", variables("arg_"))
            }
            CredentialLocation::Query => {
                let names = list(&|n| format!("`{n}=`"));
                format!("{names} with a value in the query string")
            }
            CredentialLocation::Headers => format!(
                "the {names} request header: {} logged `-` or empty",
                variables("http_")
            ),
            CredentialLocation::Authorization => {
                "a Basic user in the Authorization header: $http_authorization logged `-`, empty or not Basic"
                    .into()
            }
        }
    }
}

/// A value from the line, shown in a message: short, lossy, control characters escaped, query
/// credentials masked.
pub(super) fn shown(value: &[u8]) -> String {
    let cut = value.len().min(40);
    let mut text = crate::telemetry::masked_line(&value[..cut]);
    if cut < value.len() {
        text.push('…');
    }
    text
}

/// The steps of `combined` (the function), with their positions: where the line stops being `combined` (or
/// `common`), and what was expected there.
fn combined_failure(line: &[u8]) -> (Option<usize>, String) {
    let fail = |at: usize, expected: &str| (Some(at), expected.to_string());
    let Some(open) = memchr::memchr(b'[', line) else {
        return fail(line.len(), "`[` and the time, `[$time_local]`");
    };
    let time_at = open + 1;
    let Some(time) = line.get(time_at..time_at + 26) else {
        return fail(time_at, TIME_LOCAL);
    };
    let request_at = time_at + 26 + 3;
    if !line[time_at + 26..].starts_with(b"] \"") {
        return fail(time_at + 26, "`] \"` after the time");
    }
    let rest = &line[request_at..];
    let method_end = rest.iter().position(|b| !b.is_ascii_uppercase());
    let Some(m) = method_end.filter(|&m| m > 0 && rest[m] == b' ') else {
        return fail(
            request_at,
            "the request: a method in capitals and a space (`GET /path HTTP/1.1`)",
        );
    };
    let target_at = request_at + m + 1;
    let Some(end) = closing_quote(&line[target_at..]) else {
        return fail(line.len(), "`\"` closing the request");
    };
    // The target is the request without its protocol, as `combined` takes it.
    let request = &line[target_at..target_at + end];
    let target = match request.iter().rposition(|&b| b == b' ') {
        Some(last) if request[last + 1..].starts_with(b"HTTP/") => &request[..last],
        _ => request,
    };
    if target.is_empty() {
        return fail(target_at, "a request target (`/path`)");
    }
    let after = target_at + end + 1;
    if !line[after..].starts_with(b" ") {
        return fail(after, "a space and the status after the request");
    }
    if status(&line[after + 1..]).is_none() {
        return fail(after + 1, "a 3-digit status");
    }
    if time.try_into().ok().and_then(time_local).is_none() {
        return (
            Some(time_at),
            format!("{TIME_LOCAL}, not `{}`", shown(time)),
        );
    }
    // Not reached for a line `parse` found malformed: the steps above are all of its checks.
    (None, "a line in this format".into())
}

/// Where a line of a compiled `log_format` stops matching, or which of its values tally cannot read.
fn nginx_failure(format: &NginxFormat, line: &[u8]) -> (Option<usize>, String) {
    let v = match format.format.scan(line) {
        Ok(v) => v,
        Err(nginx::Mismatch { at, expected }) => {
            let start = at == 0 && format.text.starts_with(&expected);
            let expected = crate::telemetry::printable(&expected).into_owned();
            // Past the start, `at` is where a value starts that nothing after ends as the format says.
            let expected = if start {
                format!("`{expected}` (the format's start)")
            } else {
                format!("`{expected}` to end the value that starts here")
            };
            return (Some(at), expected);
        }
    };
    // Values are slices of the line: their offset is where they start.
    let at = |value: &[u8]| Some(value.as_ptr() as usize - line.as_ptr() as usize);
    match v.time {
        None => return (None, "a time: the line logs `-` for it".into()),
        Some((variable, t)) => {
            let (ok, name) = match variable {
                Variable::TimeLocal => (t.try_into().ok().and_then(time_local), TIME_LOCAL),
                Variable::TimeIso8601 => (time_iso8601(t), TIME_ISO8601),
                _ => (msec(t), MSEC),
            };
            if ok.is_none() {
                return (at(t), format!("{name}, not `{}`", shown(t)));
            }
        }
    }
    match v.status() {
        None => return (None, "a 3-digit $status, not `-`".into()),
        Some(s) if status_digits(s).is_none() => {
            return (at(s), format!("a 3-digit $status, not `{}`", shown(s)))
        }
        Some(_) => {}
    }
    if let Some(request) = v.request().filter(|r| request_line(r).is_none()) {
        return (
            at(request),
            "$request as `METHOD /path HTTP/1.1`".to_string(),
        );
    }
    (None, "a line in this format".into())
}

#[cfg(test)]
mod tests {
    use super::super::{CredentialRule, LogEscape};
    use super::*;

    fn why(parser: &mut Parser, line: &str) -> (Skip, Option<usize>, String) {
        let f = parser.explain(line.as_bytes()).unwrap_err();
        (f.skip, f.at, f.expected)
    }

    fn combined_parser() -> Parser {
        Parser::new(
            LogFormat::Combined,
            CredentialRule::query(CredentialMode::Auto),
        )
    }

    #[test]
    fn combined_lines_say_where_they_stop() {
        let mut p = combined_parser();
        let good =
            r#"h - - [24/Nov/2026:10:15:00 +0000] "GET /a?user_key=k1 HTTP/1.1" 200 5 "-" "ua""#;
        let (r, credential) = p.explain(good.as_bytes()).unwrap();
        assert_eq!((r.status, credential.as_str()), (200, "k1"));
        let cases: &[(&str, Option<usize>, &str)] = &[
            ("garbage", Some(7), "`[` and the time"),
            ("h - - [24/Nov/2026", Some(7), "$time_local (like"),
            (
                r#"h - - [24/Nov/2026:10:15:00 +0000] GET / HTTP/1.1" 200"#,
                Some(33),
                "`] \"` after the time",
            ),
            (
                r#"h - - [24/Nov/2026:10:15:00 +0000] "get / HTTP/1.1" 200"#,
                Some(36),
                "a method in capitals",
            ),
            (
                r#"h - - [24/Nov/2026:10:15:00 +0000] "GET /?user_key=k"#,
                Some(52),
                "`\"` closing the request",
            ),
            (
                r#"h - - [24/Nov/2026:10:15:00 +0000] "GET " 400"#,
                Some(40),
                "a request target",
            ),
            (
                r#"h - - [24/Nov/2026:10:15:00 +0000] "GET / HTTP/1.1"200"#,
                Some(51),
                "a space and the status",
            ),
            (
                r#"h - - [24/Nov/2026:10:15:00 +0000] "GET / HTTP/1.1" 20 1"#,
                Some(52),
                "a 3-digit status",
            ),
            (
                r#"h - - [24/Nov/2026:10:15:99 +0000] "GET / HTTP/1.1" 200 1"#,
                Some(7),
                "$time_local (like `25/Nov/2026:18:41:03 +0100`), not `24/Nov/2026:10:15:99 +0000`",
            ),
        ];
        for (line, at, expected) in cases {
            let (skip, got_at, got) = why(&mut p, line);
            assert_eq!(skip, Skip::Malformed, "{line}");
            assert_eq!(got_at, *at, "{line}: {got}");
            assert!(got.contains(expected), "{line}: {got}");
        }
        assert_eq!(
            why(
                &mut p,
                r#"h - - [24/Nov/2026:10:15:00 +0000] "GET /?x=1 HTTP/1.1" 200"#
            ),
            (
                Skip::NoCredential,
                None,
                "`user_key=` or `app_id=` with a value in the query string".into()
            )
        );
        assert_eq!(
            why(
                &mut p,
                r#"h - - [24/Nov/2026:10:15:00 +0000] "GET /?user_key=%FF HTTP/1.1" 200"#
            ),
            (
                Skip::InvalidCredential,
                None,
                "a user_key that is UTF-8 once decoded".into()
            )
        );
    }

    use crate::parse::testing::headers;

    fn nginx(format: &str, rule: CredentialRule) -> Parser {
        crate::parse::testing::nginx(format, LogEscape::Default, rule)
    }

    #[test]
    fn log_format_lines_say_where_they_stop() {
        let mut p = nginx(
            r#"$remote_addr [$time_local] "$request" $status $http_x_api_key $http_x_app_id"#,
            headers(CredentialMode::Auto),
        );
        let line = r#"1.2.3.4 [24/Nov/2026:10:15:00 +0000] "GET /a HTTP/1.1" 200 key1 -"#;
        assert_eq!(p.explain(line.as_bytes()).unwrap().1, "key1");
        // The literal after $status is missing: the mismatch is where $status starts.
        assert_eq!(
            why(
                &mut p,
                r#"1.2.3.4 [24/Nov/2026:10:15:00 +0000] "GET /a HTTP/1.1" 200"#
            ),
            (
                Skip::Malformed,
                Some(55),
                "` ` to end the value that starts here".into()
            )
        );
        let mut bracketed = nginx(
            r#"[$time_local] $status $http_x_api_key"#,
            headers(CredentialMode::UserKey),
        );
        assert_eq!(
            why(&mut bracketed, "24/Nov/2026:10:15:00 +0000] 200 k"),
            (Skip::Malformed, Some(0), "`[` (the format's start)".into())
        );
        assert_eq!(
            why(&mut p, "1.2.3.4 24/Nov"),
            (
                Skip::Malformed,
                Some(0),
                "` [` to end the value that starts here".into()
            )
        );
        assert_eq!(
            why(&mut p, r#"1.2.3.4 [yesterday] "GET /a HTTP/1.1" 200 k -"#),
            (
                Skip::Malformed,
                Some(9),
                "$time_local (like `25/Nov/2026:18:41:03 +0100`), not `yesterday`".into()
            )
        );
        assert_eq!(
            why(
                &mut p,
                r#"1.2.3.4 [24/Nov/2026:10:15:00 +0000] "GET /a HTTP/1.1" 20x k -"#
            ),
            (
                Skip::Malformed,
                Some(55),
                "a 3-digit $status, not `20x`".into()
            )
        );
        assert_eq!(
            why(
                &mut p,
                r#"1.2.3.4 [24/Nov/2026:10:15:00 +0000] "\x16\x03" 400 k -"#
            ),
            (
                Skip::Malformed,
                Some(38),
                "$request as `METHOD /path HTTP/1.1`".into()
            )
        );
        assert_eq!(
            why(&mut p, r#"1.2.3.4 [24/Nov/2026:10:15:00 +0000] "GET /a HTTP/1.1" 200 - -"#),
            (
                Skip::NoCredential,
                None,
                "the `X-Api-Key` or `X-App-Id` request header: $http_x_api_key or $http_x_app_id logged `-` or empty".into()
            )
        );
        // Other time variables, and the query's $arg_.
        let mut p = nginx(
            "$time_iso8601 $status $arg_user_key",
            CredentialRule::query(CredentialMode::UserKey),
        );
        assert_eq!(
            why(&mut p, "2026-11-24 200 k"),
            (
                Skip::Malformed,
                Some(0),
                "$time_iso8601 (like `2026-11-25T18:41:03+01:00`), not `2026-11-24`".into()
            )
        );
        assert_eq!(
            why(&mut p, "2026-11-24T10:15:00Z 200 -"),
            (
                Skip::NoCredential,
                None,
                "the `user_key` parameter: $arg_user_key logged `-` or empty".into()
            )
        );
        let mut p = nginx(
            "$msec $status $request",
            CredentialRule::query(CredentialMode::Auto),
        );
        assert_eq!(
            why(&mut p, "- 200 GET /"),
            (
                Skip::Malformed,
                None,
                "a time: the line logs `-` for it".into()
            )
        );
        assert_eq!(why(&mut p, "1.5 - GET /").2, "a 3-digit $status, not `-`");
    }

    #[test]
    fn authorization_that_is_not_basic_is_no_credential() {
        let mut p = nginx(
            r#"[$time_local] $status "$http_authorization""#,
            CredentialRule {
                location: CredentialLocation::Authorization,
                ..CredentialRule::query(CredentialMode::Auto)
            },
        );
        let (skip, at, expected) = why(&mut p, r#"[24/Nov/2026:10:15:00 +0000] 200 "Bearer abc""#);
        assert_eq!((skip, at), (Skip::NoCredential, None));
        assert!(expected.contains("$http_authorization"), "{expected}");
        let line = r#"[24/Nov/2026:10:15:00 +0000] 200 "Basic dXNlcjpwYXNz""#;
        assert_eq!(p.explain(line.as_bytes()).unwrap().1, "user");
        assert_eq!(
            why(&mut p, r#"[24/Nov/2026:10:15:00 +0000] 200 "Basic %%%""#),
            (
                Skip::InvalidCredential,
                None,
                "Basic credentials whose base64 decodes to a UTF-8 user".into()
            )
        );
    }

    #[test]
    fn oidc_lines_say_what_token_was_expected() {
        use crate::parse::testing::{jwt, oidc};
        use crate::parse::{JsonFields, JsonFormat};
        let token = jwt(r#"{"azp":"app-1","exp":1}"#);
        let line = |auth: &str| format!(r#"[24/Nov/2026:10:15:00 +0000] 200 "{auth}""#);
        let format = r#"[$time_local] $status "$http_authorization""#;
        let mut p = nginx(format, oidc(CredentialLocation::Authorization, "azp"));
        let good = line(&format!("Bearer {token}"));
        let (r, app_id) = p.explain(good.as_bytes()).unwrap();
        assert_eq!(
            (r.credential.kind, app_id.as_str()),
            (CredentialKind::AppId, "app-1")
        );
        assert_eq!(
            why(&mut p, &line("-")),
            (
                Skip::NoCredential,
                None,
                "a Bearer JWT in the Authorization header with claim `azp`: $http_authorization logged `-`, empty or not Bearer".into()
            )
        );
        assert_eq!(
            why(&mut p, &line("Bearer a.b")),
            (
                Skip::InvalidCredential,
                None,
                "a Bearer JWT in the Authorization header: three base64url parts separated by dots"
                    .into()
            )
        );
        // The token is a secret: the line is shown without it.
        let shown =
            String::from_utf8(p.hide_secrets(good.as_bytes(), crate::telemetry::mask)).unwrap();
        assert!(
            !shown.contains(&token[8..]) && shown.contains("Bear…"),
            "{shown}"
        );
        let mut p = nginx(format, oidc(CredentialLocation::Authorization, "client_id"));
        assert_eq!(
            why(&mut p, &good),
            (
                Skip::InvalidCredential,
                None,
                "a JWT whose payload is a JSON object with a string `client_id` claim: it has no `client_id` claim (it has azp, exp)".into()
            )
        );
        // In the query: $arg_access_token, or the query string.
        let mut p = nginx(
            "[$time_local] $status $arg_access_token",
            oidc(CredentialLocation::Query, "azp"),
        );
        assert_eq!(
            why(&mut p, "[24/Nov/2026:10:15:00 +0000] 200 -").2,
            "a JWT in the `access_token` parameter with claim `azp`: $arg_access_token logged `-` or empty"
        );
        let mut p = Parser::new(LogFormat::Combined, oidc(CredentialLocation::Query, "azp"));
        assert_eq!(
            why(
                &mut p,
                r#"h - - [24/Nov/2026:10:15:00 +0000] "GET /?access_token=opaque HTTP/1.1" 200"#
            )
            .2,
            "a JWT in the `access_token` parameter: three base64url parts separated by dots"
        );
        assert_eq!(
            why(&mut p, r#"h - - [24/Nov/2026:10:15:00 +0000] "GET /?user_key=k HTTP/1.1" 200"#).2,
            "a JWT in the `access_token` parameter with claim `azp`: no `access_token=` with a value in the query string"
        );
        // JSON lines name the field.
        let rule = oidc(CredentialLocation::Headers, "azp");
        let fields = JsonFields {
            authorization: "request.headers.authorization".into(),
            ..JsonFields::default()
        };
        let format = JsonFormat::compile(fields, &rule).unwrap();
        let mut p = Parser::new(LogFormat::Json(std::sync::Arc::new(format)), rule);
        assert_eq!(
            why(&mut p, r#"{"time":1795515300,"status":200}"#).2,
            "a Bearer JWT in the Authorization header with claim `azp`: `request.headers.authorization` missing, empty or not Bearer"
        );
    }

    proptest::proptest! {
        /// Whatever the bytes, explain agrees with parse and never panics.
        #[test]
        fn explain_agrees_with_parse(cut in 0usize..90, at in 0usize..90, byte in proptest::prelude::any::<u8>()) {
            let mut line = br#"10.0.0.1 - - [24/Nov/2026:10:15:00 +0000] "GET /v1/x?user_key=k HTTP/1.1" 200 5"#.to_vec();
            if at < line.len() {
                line[at] = byte;
            }
            line.truncate(cut.min(line.len()));
            let mut p = combined_parser();
            let parsed = p.parse(&line).map(|r| r.status);
            let explained = p.explain(&line);
            match (&parsed, &explained) {
                (Ok(_), Ok(_)) => {}
                (Err(skip), Err(f)) => {
                    proptest::prop_assert_eq!(*skip, f.skip);
                    // A malformed line always gets a position.
                    proptest::prop_assert!(f.skip != Skip::Malformed || f.at.is_some(), "{:?}", f);
                }
                (Ok(_), Err(f)) => proptest::prop_assert_eq!(f.skip, Skip::InvalidCredential),
                _ => proptest::prop_assert!(false, "{:?} / {:?}", parsed, explained),
            }
        }
    }
}
