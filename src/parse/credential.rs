//! The caller's credential: where a source's requests carry it (`[sources.credentials]`, with
//! APIcast's names), how it was written, and how it is decoded (once per distinct value, by the
//! aggregation).

use serde::{Deserialize, Serialize};

use super::nginx::LogEscape;
use super::{find_short, Skip};

/// Which credential a source's requests carry (`credentials.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialMode {
    /// `user_key` if present, else `app_id` (with optional `app_key`).
    Auto,
    /// `user_key` only.
    UserKey,
    /// `app_id` only.
    AppId,
}

impl CredentialMode {
    /// Its name in the configuration.
    pub(crate) fn name(self) -> &'static str {
        match self {
            CredentialMode::Auto => "auto",
            CredentialMode::UserKey => "user_key",
            CredentialMode::AppId => "app_id",
        }
    }
}

/// Where the credential is (`credentials.location`), as APIcast names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialLocation {
    /// In the query string (from the request line, `$args` or `$arg_<name>`).
    Query,
    /// In request headers of the configured names, logged as `$http_<name>`.
    Headers,
    /// In the `Authorization` header, Basic (user_key = user, or app_id = user and app_key =
    /// password), logged as `$http_authorization`.
    Authorization,
}

/// Where a source's credentials are and what they are called (`[sources.credentials]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CredentialRule {
    /// Where.
    pub location: CredentialLocation,
    /// Which credential counts.
    pub mode: CredentialMode,
    /// The parameter or header that carries the user_key.
    pub user_key: String,
    /// The parameter or header that carries the app_id.
    pub app_id: String,
    /// The parameter or header that carries the app_key (never reported: a report names the
    /// application by its app_id).
    pub app_key: String,
}

impl CredentialRule {
    /// Credentials in the query string under APIcast's default names, in `mode`.
    pub fn query(mode: CredentialMode) -> CredentialRule {
        CredentialRule {
            location: CredentialLocation::Query,
            mode,
            user_key: "user_key".into(),
            app_id: "app_id".into(),
            app_key: "app_key".into(),
        }
    }

    /// Whether a credential of `kind` counts in this mode (in `auto`, a user_key wins).
    fn wants(&self, kind: CredentialKind) -> bool {
        match self.mode {
            CredentialMode::Auto => true,
            CredentialMode::UserKey => kind == CredentialKind::UserKey,
            CredentialMode::AppId => kind == CredentialKind::AppId,
        }
    }

    /// The credential among the values found for each kind, as the mode says.
    pub(crate) fn pick<'a>(
        &self,
        user_key: Option<Credential<'a>>,
        app_id: Option<Credential<'a>>,
    ) -> Result<Credential<'a>, Skip> {
        let user_key = user_key.filter(|_| self.wants(CredentialKind::UserKey));
        let app_id = app_id.filter(|_| self.wants(CredentialKind::AppId));
        user_key.or(app_id).ok_or(Skip::NoCredential)
    }

    /// The first non-empty user_key and app_id parameters of a query string, as NGINX's `$arg_`
    /// variables would give them.
    #[inline]
    pub(crate) fn in_query<'a>(
        &self,
        query: &'a [u8],
        escape: LogEscape,
    ) -> Result<Credential<'a>, Skip> {
        let (mut user_key, mut app_id) = (None, None);
        let mut rest = query;
        let take_user_key = self.wants(CredentialKind::UserKey);
        while !rest.is_empty() {
            let end = find_short(rest, b'&').unwrap_or(rest.len());
            let pair = &rest[..end];
            rest = rest.get(end + 1..).unwrap_or_default();
            let value = |name: &str| {
                pair.strip_prefix(name.as_bytes())
                    .and_then(|p| p.strip_prefix(b"="))
                    .filter(|v| !v.is_empty())
            };
            if user_key.is_none() {
                if let Some(v) = value(&self.user_key) {
                    user_key = Some(v);
                    if take_user_key {
                        // Nothing later in the query can change the answer.
                        break;
                    }
                    continue;
                }
            }
            if app_id.is_none() {
                app_id = value(&self.app_id);
            }
        }
        let encoding = Encoding::Query(escape);
        self.pick(
            user_key.map(|raw| Credential::new(CredentialKind::UserKey, raw, encoding)),
            app_id.map(|raw| Credential::new(CredentialKind::AppId, raw, encoding)),
        )
    }
}

/// How a credential was written, which says how to decode it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Encoding {
    /// A query-string value: the log's escaping, then `%HH` and `+` for space.
    Query(LogEscape),
    /// A request header's value: the log's escaping only.
    Header(LogEscape),
    /// An `Authorization: Basic` value: its user, once base64-decoded.
    BasicUser(LogEscape),
}

impl Encoding {
    /// How many encodings there are: [`Encoding::index`] is below this.
    pub(crate) const COUNT: usize = 9;

    /// A dense number, for tables by encoding.
    pub(crate) fn index(self) -> usize {
        let (kind, escape) = match self {
            Encoding::Query(e) => (0, e),
            Encoding::Header(e) => (1, e),
            Encoding::BasicUser(e) => (2, e),
        };
        kind * 3 + escape as usize
    }
}

/// Which application credential it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum CredentialKind {
    /// A user_key.
    UserKey,
    /// An app_id (the app_key that may come with it is not part of a report, so it is not
    /// read).
    AppId,
}

impl CredentialKind {
    /// Its name in a report and in messages.
    pub(crate) fn name(self) -> &'static str {
        match self {
            CredentialKind::UserKey => "user_key",
            CredentialKind::AppId => "app_id",
        }
    }
}

/// The caller's credential, as written in the log (still escaped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Credential<'a> {
    pub(crate) kind: CredentialKind,
    pub(crate) raw: &'a [u8],
    pub(crate) encoding: Encoding,
}

impl<'a> Credential<'a> {
    pub(crate) fn new(kind: CredentialKind, raw: &'a [u8], encoding: Encoding) -> Credential<'a> {
        Credential {
            kind,
            raw,
            encoding,
        }
    }

    /// A user_key from a query string NGINX logged with its default escaping.
    #[cfg(test)]
    pub(crate) fn user_key(raw: &'a [u8]) -> Credential<'a> {
        Credential::new(
            CredentialKind::UserKey,
            raw,
            Encoding::Query(LogEscape::Default),
        )
    }

    /// An app_id from a query string NGINX logged with its default escaping.
    #[cfg(test)]
    pub(crate) fn app_id(raw: &'a [u8]) -> Credential<'a> {
        Credential::new(
            CredentialKind::AppId,
            raw,
            Encoding::Query(LogEscape::Default),
        )
    }
}

impl Credential<'_> {
    /// Undoes the log's escaping (`\xHH`, which NGINX writes for bytes it does not print, or
    /// JSON's) and the query string's (`%HH`, `+` for space), or decodes a Basic value.
    pub(crate) fn decode(&self) -> Result<String, Skip> {
        let raw = self.raw;
        let bytes = match self.encoding {
            // One pass for both, as NGINX and APIcast read them.
            Encoding::Query(LogEscape::Default) => unescape(raw, true, true),
            Encoding::Query(LogEscape::None) => unescape(raw, true, false),
            Encoding::Query(LogEscape::Json) => unescape(&json_unescape(raw)?, true, false),
            Encoding::Header(escape) => logged(raw, escape)?,
            Encoding::BasicUser(escape) => basic_user(&logged(raw, escape)?)?,
        };
        String::from_utf8(bytes).map_err(|_| Skip::InvalidCredential)
    }
}

/// A value as the log's escaping wrote it, unescaped.
fn logged(raw: &[u8], escape: LogEscape) -> Result<Vec<u8>, Skip> {
    match escape {
        LogEscape::Default => Ok(unescape(raw, false, true)),
        LogEscape::Json => json_unescape(raw),
        LogEscape::None => Ok(raw.to_vec()),
    }
}

/// Undoes `%HH` and `+` (`percent`) and `\xHH` (`hex`) in one pass.
fn unescape(raw: &[u8], percent: bool, hex: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let escaped = match raw[i] {
            b'%' if percent => hex_pair(raw.get(i + 1..i + 3)).map(|b| (b, 3)),
            b'\\' if hex && raw.get(i + 1) == Some(&b'x') => {
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
                out.push(if percent && raw[i] == b'+' {
                    b' '
                } else {
                    raw[i]
                });
                i += 1;
            }
        }
    }
    out
}

fn hex_pair(digits: Option<&[u8]>) -> Option<u8> {
    let d = digits?;
    let v = |c: u8| (c as char).to_digit(16);
    Some((v(d[0])? * 16 + v(d[1])?) as u8)
}

/// Undoes JSON string escapes (`\"`, `\\`, `\/`, `\b\f\n\r\t`, `\uHHHH` with surrogate pairs).
fn json_unescape(raw: &[u8]) -> Result<Vec<u8>, Skip> {
    let mut out = Vec::with_capacity(raw.len());
    json_unescape_into(raw, &mut out)?;
    Ok(out)
}

/// [`json_unescape`], appending to `out`.
pub(super) fn json_unescape_into(raw: &[u8], out: &mut Vec<u8>) -> Result<(), Skip> {
    let hex4 = |at: usize| -> Result<u32, Skip> {
        let digits = raw.get(at..at + 4).ok_or(Skip::InvalidCredential)?;
        let text = std::str::from_utf8(digits).map_err(|_| Skip::InvalidCredential)?;
        u32::from_str_radix(text, 16).map_err(|_| Skip::InvalidCredential)
    };
    let mut i = 0;
    while i < raw.len() {
        if raw[i] != b'\\' {
            out.push(raw[i]);
            i += 1;
            continue;
        }
        let simple = match raw.get(i + 1).ok_or(Skip::InvalidCredential)? {
            b'"' => b'"',
            b'\\' => b'\\',
            b'/' => b'/',
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'u' => {
                let high = hex4(i + 2)?;
                let (code, len) = if (0xd800..0xdc00).contains(&high) {
                    if raw.get(i + 6..i + 8) != Some(b"\\u") {
                        return Err(Skip::InvalidCredential);
                    }
                    let low = hex4(i + 8)?;
                    if !(0xdc00..0xe000).contains(&low) {
                        return Err(Skip::InvalidCredential);
                    }
                    (0x10000 + ((high - 0xd800) << 10) + (low - 0xdc00), 12)
                } else {
                    (high, 6)
                };
                let c = char::from_u32(code).ok_or(Skip::InvalidCredential)?;
                let mut buf = [0; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                i += len;
                continue;
            }
            _ => return Err(Skip::InvalidCredential),
        };
        out.push(simple);
        i += 2;
    }
    Ok(())
}

/// The user of a `Basic` Authorization value (`Basic base64(user:password)`).
fn basic_user(value: &[u8]) -> Result<Vec<u8>, Skip> {
    use base64::Engine;
    let token = value
        .split_at_checked(6)
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case(b"basic "))
        .map(|(_, token)| token.trim_ascii())
        .ok_or(Skip::NoCredential)?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token)
        .map_err(|_| Skip::InvalidCredential)?;
    let user = decoded.split(|&b| b == b':').next().unwrap_or_default();
    if user.is_empty() {
        return Err(Skip::NoCredential);
    }
    Ok(user.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(raw: &str, encoding: Encoding) -> Result<String, Skip> {
        Credential::new(CredentialKind::UserKey, raw.as_bytes(), encoding).decode()
    }

    #[test]
    fn each_encoding_decodes_as_it_was_written() {
        use LogEscape::{Default, Json, None};
        assert_eq!(
            decoded("a%2Bb+c", Encoding::Query(Default)),
            Ok("a+b c".into())
        );
        assert_eq!(
            decoded(r"caf\xC3\xA9", Encoding::Query(Default)),
            Ok("café".into())
        );
        assert_eq!(
            decoded(r"a\u0022b%21", Encoding::Query(Json)),
            Ok("a\"b!".into())
        );
        assert_eq!(
            decoded(r"a\xC3\xA9", Encoding::Query(None)),
            Ok(r"a\xC3\xA9".into())
        );
        // A header's value is not a query string: `%` and `+` are themselves.
        assert_eq!(
            decoded("a%2Bb+c", Encoding::Header(Default)),
            Ok("a%2Bb+c".into())
        );
        assert_eq!(
            decoded(r"k\x22y", Encoding::Header(Default)),
            Ok("k\"y".into())
        );
        assert_eq!(
            decoded(r#"k\"y\u00e9\ud83d\ude00"#, Encoding::Header(Json)),
            Ok("k\"yé😀".into())
        );
        assert_eq!(
            decoded(r"k\q", Encoding::Header(Json)),
            Err(Skip::InvalidCredential)
        );
        assert_eq!(
            decoded(r"\ud83d", Encoding::Header(Json)),
            Err(Skip::InvalidCredential)
        );
        // Basic: user:password, base64.
        assert_eq!(
            decoded("Basic dXNlcjpwYXNz", Encoding::BasicUser(Default)),
            Ok("user".into())
        );
        assert_eq!(
            decoded("basic  dXNlcjpwYXNz ", Encoding::BasicUser(Default)),
            Ok("user".into())
        );
        assert_eq!(
            decoded("Basic OnBhc3M=", Encoding::BasicUser(Default)),
            Err(Skip::NoCredential)
        );
        assert_eq!(
            decoded("Bearer abc", Encoding::BasicUser(Default)),
            Err(Skip::NoCredential)
        );
        assert_eq!(
            decoded("Basic !!!", Encoding::BasicUser(Default)),
            Err(Skip::InvalidCredential)
        );
    }

    #[test]
    fn every_encoding_has_its_own_index() {
        let mut seen = std::collections::HashSet::new();
        for escape in [LogEscape::Default, LogEscape::Json, LogEscape::None] {
            for e in [
                Encoding::Query(escape),
                Encoding::Header(escape),
                Encoding::BasicUser(escape),
            ] {
                assert!(e.index() < Encoding::COUNT && seen.insert(e.index()));
            }
        }
    }

    #[test]
    fn query_parameters_under_other_names() {
        let rule = CredentialRule {
            user_key: "api_key".into(),
            ..CredentialRule::query(CredentialMode::Auto)
        };
        let found = rule.in_query(b"x_api_key=no&api_key=yes", LogEscape::Default);
        assert_eq!(found.map(|c| c.raw), Ok(&b"yes"[..]));
        let app = CredentialRule::query(CredentialMode::AppId);
        let found = app.in_query(b"user_key=u&app_id=i&app_key=k", LogEscape::Default);
        assert_eq!(
            found.map(|c| (c.kind, c.raw)),
            Ok((CredentialKind::AppId, &b"i"[..]))
        );
    }

    proptest::proptest! {
        /// Any bytes under any encoding decode or fail cleanly.
        #[test]
        fn any_bytes_decode_or_fail(raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), which in 0usize..9) {
            let escape = [LogEscape::Default, LogEscape::Json, LogEscape::None][which % 3];
            let encoding = [Encoding::Query(escape), Encoding::Header(escape), Encoding::BasicUser(escape)][which / 3];
            let _ = Credential::new(CredentialKind::AppId, &raw, encoding).decode();
        }
    }
}
