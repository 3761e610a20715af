//! The caller's credential: where a source's requests carry it (`[sources.credentials]`, with
//! APIcast's names), how it was written, and how it is decoded (once per distinct value, by the
//! aggregation).

use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize, Serializer};

use super::nginx::LogEscape;
use super::{find_short, Skip};
use crate::telemetry::printable;

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
    /// OpenID Connect: the app_id is a claim of the request's JWT access token (`jwt_claim`),
    /// read without checking the token's signature (the gateway or the API did).
    Oidc,
}

impl CredentialMode {
    /// Its name in the configuration.
    pub(crate) fn name(self) -> &'static str {
        match self {
            CredentialMode::Auto => "auto",
            CredentialMode::UserKey => "user_key",
            CredentialMode::AppId => "app_id",
            CredentialMode::Oidc => "oidc",
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
    /// In the `Authorization` header, logged as `$http_authorization`: Basic (user_key = user, or
    /// app_id = user and app_key = password), or in `oidc` mode a Bearer JWT.
    Authorization,
}

/// Where a source's credentials are and what they are called (`[sources.credentials]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CredentialRule {
    /// Where.
    pub location: CredentialLocation,
    /// Which credential counts.
    pub mode: CredentialMode,
    /// In `oidc` mode, the claim of the access token that holds the app_id.
    pub jwt_claim: JwtClaim,
    /// The parameter or header that carries the user_key.
    pub user_key: String,
    /// The parameter or header that carries the app_id.
    pub app_id: String,
    /// The parameter or header that carries the app_key (never reported: a report names the
    /// application by its app_id).
    pub app_key: String,
    /// A missing credential is an empty one (see [`CredentialRule::optional`]).
    #[serde(skip)]
    pub optional: bool,
}

impl CredentialRule {
    /// Credentials in the query string under APIcast's default names, in `mode`.
    pub fn query(mode: CredentialMode) -> CredentialRule {
        CredentialRule {
            location: CredentialLocation::Query,
            mode,
            jwt_claim: JwtClaim::DEFAULT,
            user_key: "user_key".into(),
            app_id: "app_id".into(),
            app_key: "app_key".into(),
            optional: false,
        }
    }

    /// This rule, reading a line whose credential is missing or unreadable as one with an empty
    /// credential: for what else the line says (its status, for the Response codes page).
    pub(crate) fn optional(&self) -> CredentialRule {
        CredentialRule {
            optional: true,
            ..self.clone()
        }
    }

    /// No credential: a skip, or, [`CredentialRule::optional`], an empty one.
    fn missing<'a>(&self, skip: Skip) -> Result<Credential<'a>, Skip> {
        if self.optional {
            Ok(Credential::new(
                CredentialKind::UserKey,
                b"",
                Encoding::Query(LogEscape::None),
            ))
        } else {
            Err(skip)
        }
    }

    /// Where the credential is read: `location`, except that in `oidc` mode the token is in the
    /// Authorization header whether it says `headers` or `authorization`, as APIcast reads it.
    pub(crate) fn reads(&self) -> CredentialLocation {
        match (self.mode, self.location) {
            (CredentialMode::Oidc, CredentialLocation::Headers) => {
                CredentialLocation::Authorization
            }
            (_, location) => location,
        }
    }

    /// The kind of a Basic Authorization's user: the app_id in `app_id` mode, else the user_key.
    pub(crate) fn basic_kind(&self) -> CredentialKind {
        match self.mode {
            CredentialMode::AppId => CredentialKind::AppId,
            _ => CredentialKind::UserKey,
        }
    }

    /// Whether a credential of `kind` counts in this mode (in `auto`, a user_key wins). In `oidc`
    /// mode neither parameter counts: the token does, read apart.
    fn wants(&self, kind: CredentialKind) -> bool {
        match self.mode {
            CredentialMode::Auto => true,
            CredentialMode::UserKey => kind == CredentialKind::UserKey,
            CredentialMode::AppId => kind == CredentialKind::AppId,
            CredentialMode::Oidc => false,
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
        match user_key.or(app_id) {
            Some(credential) => Ok(credential),
            None => self.missing(Skip::NoCredential),
        }
    }

    /// The first non-empty user_key and app_id parameters of a query string, as NGINX's `$arg_`
    /// variables would give them (in `oidc` mode, the `access_token` parameter).
    #[inline]
    pub(crate) fn in_query<'a>(
        &self,
        query: &'a [u8],
        escape: LogEscape,
    ) -> Result<Credential<'a>, Skip> {
        if self.mode == CredentialMode::Oidc {
            return self.access_token(pairs(query).find_map(|pair| value_of(pair, ACCESS_TOKEN)));
        }
        let (mut user_key, mut app_id) = (None, None);
        let take_user_key = self.wants(CredentialKind::UserKey);
        for pair in pairs(query) {
            if user_key.is_none() {
                if let Some(v) = value_of(pair, &self.user_key) {
                    user_key = Some(v);
                    if take_user_key {
                        // Nothing later in the query can change the answer.
                        break;
                    }
                    continue;
                }
            }
            if app_id.is_none() {
                app_id = value_of(pair, &self.app_id);
            }
        }
        let encoding = Encoding::Query(escape);
        self.pick(
            user_key.map(|raw| Credential::new(CredentialKind::UserKey, raw, encoding)),
            app_id.map(|raw| Credential::new(CredentialKind::AppId, raw, encoding)),
        )
    }

    /// In `oidc` mode, the credential of an `Authorization` value, `Bearer <JWT>`; without one
    /// (another scheme, `-`, nothing), none.
    #[inline]
    pub(crate) fn bearer<'a>(
        &self,
        authorization: Option<&'a [u8]>,
    ) -> Result<Credential<'a>, Skip> {
        match authorization
            .and_then(|value| scheme(value, b"bearer "))
            .filter(|token| !token.is_empty())
        {
            Some(token) => self.jwt(token),
            None => self.missing(Skip::NoCredential),
        }
    }

    /// In `oidc` mode, the credential of an `access_token` parameter's value.
    #[inline]
    pub(crate) fn access_token<'a>(&self, value: Option<&'a [u8]>) -> Result<Credential<'a>, Skip> {
        match value.filter(|v| !v.is_empty()) {
            Some(token) => self.jwt(token),
            None => self.missing(Skip::NoCredential),
        }
    }

    /// A JWT's credential: its payload, whose claim is read when the credential is decoded (once
    /// per distinct payload). Only the payload is kept: it is all the claim needs, it is hashed on
    /// every line (the signature would double that), and without its signature it is no usable
    /// token in tally's tables. A JWT is base64url and dots, which no log escaping or URL
    /// encoding changes: it is read as logged (an escaped one is no JWT). Not three parts: a
    /// credential that is not valid.
    #[inline]
    fn jwt<'a>(&self, token: &'a [u8]) -> Result<Credential<'a>, Skip> {
        let Some(payload) = jwt_payload(token) else {
            return self.missing(Skip::InvalidCredential);
        };
        Ok(Credential::new(
            CredentialKind::AppId,
            payload,
            Encoding::JwtClaim(self.jwt_claim),
        ))
    }
}

/// The query parameter of an OAuth access token (RFC 6750), as APIcast reads it.
pub(crate) const ACCESS_TOKEN: &str = "access_token";

/// The `name=value` pairs of a query string.
#[inline]
fn pairs(query: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = query;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = find_short(rest, b'&').unwrap_or(rest.len());
        let pair = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or_default();
        Some(pair)
    })
}

/// The value of `pair` when it is the parameter `name` with a value.
#[inline]
fn value_of<'a>(pair: &'a [u8], name: &str) -> Option<&'a [u8]> {
    pair.strip_prefix(name.as_bytes())
        .and_then(|p| p.strip_prefix(b"="))
        .filter(|v| !v.is_empty())
}

/// The part after `scheme` (lower case, with its space: `basic `) of an Authorization value in
/// that scheme, trimmed; schemes are matched ignoring case (RFC 9110).
fn scheme<'a>(value: &'a [u8], scheme: &[u8]) -> Option<&'a [u8]> {
    value
        .split_at_checked(scheme.len())
        .filter(|(name, _)| name.eq_ignore_ascii_case(scheme))
        .map(|(_, rest)| rest.trim_ascii())
}

/// The payload of a JWT (JWS compact serialization, RFC 7515: three non-empty parts separated by
/// dots), not decoded.
#[inline]
fn jwt_payload(token: &[u8]) -> Option<&[u8]> {
    let first = memchr::memchr(b'.', token)?;
    let rest = &token[first + 1..];
    let second = memchr::memchr(b'.', rest)?;
    let (payload, signature) = (&rest[..second], &rest[second + 1..]);
    let three = first > 0
        && !payload.is_empty()
        && !signature.is_empty()
        && memchr::memchr(b'.', signature).is_none();
    three.then_some(payload)
}

/// The claim of an access token that holds the app_id (`credentials.jwt_claim`).
///
/// A credential names it in its [`Encoding`], which every request record carries: so it is a
/// one-byte id into a process-wide list of the claim names registered, not the name itself.
/// [`Credential::decode`], which has no configuration at hand, finds the name there, and the
/// aggregation keeps one table per id ([`Encoding::index`]), so that the same token read for two
/// claims gives two app_ids. Each distinct name is registered, and its text leaked, once: the list
/// holds the distinct names configured since start, at most 256.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct JwtClaim(u8);

/// The claim names registered besides the default, whose id is 0: the one at `i` has id `i + 1`.
static CLAIMS: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());

/// The default claim's name.
const DEFAULT_CLAIM: &str = crate::config::defaults::sources::JWT_CLAIM;

impl JwtClaim {
    /// `azp` (authorized party: the client the token was issued to, as Keycloak and APIcast read
    /// it).
    pub const DEFAULT: JwtClaim = JwtClaim(0);

    /// The claim `name`, registered on its first use; an error past 256 distinct names.
    pub fn new(name: &str) -> Result<JwtClaim, String> {
        if name == DEFAULT_CLAIM {
            return Ok(JwtClaim::DEFAULT);
        }
        let mut claims = CLAIMS.lock().unwrap_or_else(PoisonError::into_inner);
        let at = match claims.iter().position(|c| *c == name) {
            Some(at) => at,
            None if claims.len() < usize::from(u8::MAX) => {
                claims.push(Box::leak(name.into()));
                claims.len() - 1
            }
            None => return Err("at most 256 different jwt_claim names".into()),
        };
        // Below 255: checked above.
        Ok(JwtClaim(at as u8 + 1))
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self.0 {
            0 => DEFAULT_CLAIM,
            id => {
                let claims = CLAIMS.lock().unwrap_or_else(PoisonError::into_inner);
                // Ids come from `new` alone, so every one is in the list.
                claims
                    .get(usize::from(id) - 1)
                    .copied()
                    .unwrap_or(DEFAULT_CLAIM)
            }
        }
    }
}

impl std::fmt::Debug for JwtClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JwtClaim({:?})", self.name())
    }
}

impl Serialize for JwtClaim {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// What a format with named values (JSON lines' fields, a regex's groups) logs of the credential.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NamedValues {
    pub(crate) user_key: bool,
    pub(crate) app_id: bool,
    /// The request target or the query string.
    pub(crate) query: bool,
    pub(crate) authorization: bool,
}

/// Where the lines of a format with named values carry the credential.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Carried {
    /// The query string's parameters.
    QueryString,
    /// The user_key and app_id values, written as `encoding` says.
    Values(Encoding),
    /// The authorization value's Basic user.
    Basic(CredentialKind),
    /// The authorization value's Bearer JWT (`oidc` mode).
    Bearer,
}

/// What a format with named values lacks to carry the credential the settings ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lacks<'r> {
    /// The request target or the query string (in `oidc` mode: for the `access_token`).
    Query { oidc: bool },
    /// The value of this credential's header (`user_key` or `app_id`, and the header's name).
    Header(&'static str, &'r str),
    /// The Authorization header (in `oidc` mode: for a Bearer JWT).
    Authorization { oidc: bool },
}

impl CredentialRule {
    /// Where the credential is among what a format logs, its values escaped as `escape` says.
    pub(crate) fn carried(
        &self,
        logs: NamedValues,
        escape: LogEscape,
    ) -> Result<Carried, Lacks<'_>> {
        let oidc = self.mode == CredentialMode::Oidc;
        Ok(match self.reads() {
            // In oidc mode the token is the `access_token` parameter, not these.
            CredentialLocation::Query if !oidc && (logs.user_key || logs.app_id) => {
                Carried::Values(Encoding::Query(escape))
            }
            CredentialLocation::Query if logs.query => Carried::QueryString,
            CredentialLocation::Query => return Err(Lacks::Query { oidc }),
            CredentialLocation::Headers => {
                let missing = match self.mode {
                    CredentialMode::UserKey => {
                        (!logs.user_key).then_some(("user_key", &self.user_key))
                    }
                    CredentialMode::AppId => (!logs.app_id).then_some(("app_id", &self.app_id)),
                    // oidc reads the Authorization header, never these.
                    CredentialMode::Auto | CredentialMode::Oidc => {
                        (!logs.user_key && !logs.app_id).then_some(("user_key", &self.user_key))
                    }
                };
                if let Some((key, header)) = missing {
                    return Err(Lacks::Header(key, header));
                }
                Carried::Values(Encoding::Header(escape))
            }
            CredentialLocation::Authorization if logs.authorization && oidc => Carried::Bearer,
            CredentialLocation::Authorization if logs.authorization => {
                Carried::Basic(self.basic_kind())
            }
            CredentialLocation::Authorization => return Err(Lacks::Authorization { oidc }),
        })
    }

    /// A line's credential, from its values as logged (`-` or empty: none).
    #[inline]
    pub(crate) fn in_values<'a>(
        &self,
        carried: Carried,
        query: Option<&'a [u8]>,
        user_key: Option<&'a [u8]>,
        app_id: Option<&'a [u8]>,
        authorization: Option<&'a [u8]>,
        escape: LogEscape,
    ) -> Result<Credential<'a>, Skip> {
        let given = |v: Option<&'a [u8]>| v.filter(|raw| !raw.is_empty() && *raw != b"-");
        match carried {
            Carried::QueryString => self.in_query(query.unwrap_or_default(), escape),
            Carried::Values(encoding) => self.pick(
                given(user_key).map(|raw| Credential::new(CredentialKind::UserKey, raw, encoding)),
                given(app_id).map(|raw| Credential::new(CredentialKind::AppId, raw, encoding)),
            ),
            Carried::Basic(kind) => match given(authorization) {
                Some(raw) => Ok(Credential::new(kind, raw, Encoding::BasicUser(escape))),
                None => self.missing(Skip::NoCredential),
            },
            Carried::Bearer => self.bearer(authorization),
        }
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
    /// A JWT's payload: the value of this claim, once base64url-decoded.
    JwtClaim(JwtClaim),
}

impl Encoding {
    /// How many encodings there are besides [`Encoding::JwtClaim`]'s, which come after them.
    const FIXED: usize = 9;

    /// A dense number, for tables by encoding: below [`Encoding::FIXED`] for a query's, a
    /// header's and a Basic user's, under each escaping; then one per JWT claim (at most 256).
    pub(crate) fn index(self) -> usize {
        let (kind, escape) = match self {
            Encoding::Query(e) => (0, e),
            Encoding::Header(e) => (1, e),
            Encoding::BasicUser(e) => (2, e),
            Encoding::JwtClaim(claim) => return Encoding::FIXED + usize::from(claim.0),
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
    /// JSON's) and the query string's (`%HH`, `+` for space), or decodes a Basic value or a JWT's
    /// claim.
    pub(crate) fn decode(&self) -> Result<String, Skip> {
        let raw = self.raw;
        let bytes = match self.encoding {
            Encoding::JwtClaim(claim) => {
                return claim_value(raw, claim.name()).map_err(|_| Skip::InvalidCredential)
            }
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

/// A query-string value (or name) as logged, unescaped: the log's escaping, then `%HH` and `+`
/// (a JSON escape that is not one is kept as written).
pub(crate) fn query_value(raw: &[u8], escape: LogEscape) -> Vec<u8> {
    match escape {
        LogEscape::Default => unescape(raw, true, true),
        LogEscape::None => unescape(raw, true, false),
        LogEscape::Json => unescape(
            &json_unescape(raw).unwrap_or_else(|_| raw.to_vec()),
            true,
            false,
        ),
    }
}

/// A value as logged with the log's escaping undone (a JSON escape that is not one is kept as
/// written).
pub(crate) fn logged_value(raw: &[u8], escape: LogEscape) -> Vec<u8> {
    logged(raw, escape).unwrap_or_else(|_| raw.to_vec())
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
    let token = scheme(value, b"basic ").ok_or(Skip::NoCredential)?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token)
        .map_err(|_| Skip::InvalidCredential)?;
    let user = decoded.split(|&b| b == b':').next().unwrap_or_default();
    if user.is_empty() {
        return Err(Skip::NoCredential);
    }
    Ok(user.to_vec())
}

/// Why a JWT's payload gives no app_id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum JwtProblem {
    /// The payload is not base64url.
    NotBase64url,
    /// Decoded, it is not a JSON object.
    NotAnObject,
    /// The claim is not there; the names of the first claims that are.
    Missing(Vec<String>),
    /// The claim is not a string, or an empty one.
    NotAString,
}

impl JwtProblem {
    /// In words, for `tally parse` (claim names from the token: control characters escaped).
    pub(crate) fn describe(&self, claim: &str) -> String {
        match self {
            JwtProblem::NotBase64url => "its payload is not base64url".into(),
            JwtProblem::NotAnObject => "its payload is not a JSON object".into(),
            JwtProblem::Missing(names) if names.is_empty() => {
                format!("it has no `{claim}` claim, nor any other")
            }
            JwtProblem::Missing(names) => {
                let names: Vec<_> = names.iter().map(|n| printable(n)).collect();
                format!("it has no `{claim}` claim (it has {})", names.join(", "))
            }
            JwtProblem::NotAString => format!("its `{claim}` claim is not a non-empty string"),
        }
    }
}

/// The value of the claim `claim` of a JWT's `payload` (base64url, padding optional, of a JSON
/// object): a non-empty string.
pub(crate) fn claim_value(payload: &[u8], claim: &str) -> Result<String, JwtProblem> {
    use base64::engine::{general_purpose, DecodePaddingMode, GeneralPurpose};
    use base64::Engine;
    // RFC 7515 leaves the padding out, some issuers keep it; the unused bits of the last
    // character are not checked either: the token was checked where it was received.
    const BASE64URL: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        general_purpose::NO_PAD
            .with_decode_padding_mode(DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    );
    let json = BASE64URL
        .decode(payload)
        .map_err(|_| JwtProblem::NotBase64url)?;
    let mut object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&json).map_err(|_| JwtProblem::NotAnObject)?;
    match object.remove(claim) {
        Some(serde_json::Value::String(value)) if !value.is_empty() => Ok(value),
        Some(_) => Err(JwtProblem::NotAString),
        None => Err(JwtProblem::Missing(
            object.keys().take(12).cloned().collect(),
        )),
    }
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
                assert!(e.index() < Encoding::FIXED && seen.insert(e.index()));
            }
        }
        // Then one per claim, the same for the same name.
        let index = |claim| Encoding::JwtClaim(JwtClaim::new(claim).unwrap()).index();
        for claim in ["azp", "client_id", "https://example.com/app"] {
            assert!(index(claim) >= Encoding::FIXED && seen.insert(index(claim)));
        }
        assert_eq!(index("client_id"), index("client_id"));
        assert_eq!(JwtClaim::new("azp"), Ok(JwtClaim::DEFAULT));
        assert_eq!(JwtClaim::new("client_id").unwrap().name(), "client_id");
    }

    use crate::parse::testing::{jwt, oidc};

    /// (the kind, the app_id) the rule finds in an Authorization value, or why not.
    fn bearer(rule: &CredentialRule, authorization: Option<&str>) -> Result<String, Skip> {
        let credential = rule.bearer(authorization.map(str::as_bytes))?;
        assert_eq!(credential.kind, CredentialKind::AppId);
        credential.decode()
    }

    #[test]
    fn a_bearer_jwt_gives_its_claim_as_the_app_id() {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine;
        let azp = oidc(CredentialLocation::Authorization, "azp");
        let client_id = oidc(CredentialLocation::Authorization, "client_id");
        let token = jwt(r#"{"iss":"https://sso","azp":"my-app","client_id":"other","exp":1}"#);
        let header = format!("Bearer {token}");
        let with_payload = |payload: &str| {
            let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
            parts[1] = payload.to_string();
            format!("Bearer {}", parts.join("."))
        };
        let b64 = |text: &str| URL_SAFE_NO_PAD.encode(text);
        let cases: Vec<(&CredentialRule, Option<String>, Result<String, Skip>)> = vec![
            (&azp, Some(header.clone()), Ok("my-app".into())),
            (&client_id, Some(header.clone()), Ok("other".into())),
            // The scheme in any case, spaces around the token, padding kept.
            (&azp, Some(format!("bearer  {token} ")), Ok("my-app".into())),
            (
                &azp,
                Some(with_payload(
                    &base64::engine::general_purpose::URL_SAFE.encode(r#"{"azp":"padded"}"#),
                )),
                Ok("padded".into()),
            ),
            // base64url, not base64: `-` and `_` decode.
            (
                &azp,
                Some(with_payload(&b64(r#"{"azp":"a>?b"}"#))),
                Ok("a>?b".into()),
            ),
            // No token: nothing, `-` (as a JSON log may write it), another scheme, no token.
            (&azp, None, Err(Skip::NoCredential)),
            (&azp, Some("-".into()), Err(Skip::NoCredential)),
            (
                &azp,
                Some("Basic dXNlcjpwYXNz".into()),
                Err(Skip::NoCredential),
            ),
            (&azp, Some(token.clone()), Err(Skip::NoCredential)),
            (&azp, Some("Bearer ".into()), Err(Skip::NoCredential)),
            (&azp, Some("Bearer".into()), Err(Skip::NoCredential)),
            // Not a JWT: two parts, four, an empty one, an opaque token.
            (
                &azp,
                Some("Bearer a.b".into()),
                Err(Skip::InvalidCredential),
            ),
            (
                &azp,
                Some(format!("{header}.x")),
                Err(Skip::InvalidCredential),
            ),
            (&azp, Some(with_payload("")), Err(Skip::InvalidCredential)),
            (
                &azp,
                Some(format!("Bearer .{}.x", b64(r#"{"azp":"a"}"#))),
                Err(Skip::InvalidCredential),
            ),
            (
                &azp,
                Some(format!("Bearer x.{}.", b64(r#"{"azp":"a"}"#))),
                Err(Skip::InvalidCredential),
            ),
            (
                &azp,
                Some("Bearer 2YotnFZFEjr1zCsicMWpAA".into()),
                Err(Skip::InvalidCredential),
            ),
            // A JWT whose payload gives no app_id: not base64url, not JSON, not an object, the
            // claim missing, a number, null, empty.
            (
                &azp,
                Some(with_payload("e30!")),
                Err(Skip::InvalidCredential),
            ),
            (
                &azp,
                Some(with_payload(&b64(r#"{"azp":"a""#))),
                Err(Skip::InvalidCredential),
            ),
            (
                &azp,
                Some(with_payload(&b64("not json"))),
                Err(Skip::InvalidCredential),
            ),
            (
                &azp,
                Some(with_payload(&b64(r#"["azp"]"#))),
                Err(Skip::InvalidCredential),
            ),
            (
                &azp,
                Some(with_payload(&b64(r#"{"sub":"a"}"#))),
                Err(Skip::InvalidCredential),
            ),
            (
                &azp,
                Some(with_payload(&b64(r#"{"azp":42}"#))),
                Err(Skip::InvalidCredential),
            ),
            (
                &azp,
                Some(with_payload(&b64(r#"{"azp":null}"#))),
                Err(Skip::InvalidCredential),
            ),
            (
                &azp,
                Some(with_payload(&b64(r#"{"azp":""}"#))),
                Err(Skip::InvalidCredential),
            ),
        ];
        for (rule, authorization, expected) in cases {
            assert_eq!(
                bearer(rule, authorization.as_deref()),
                expected,
                "{authorization:?} for {:?}",
                rule.jwt_claim
            );
        }
    }

    #[test]
    fn an_access_token_in_the_query_string() {
        let rule = oidc(CredentialLocation::Query, "azp");
        let token = jwt(r#"{"azp":"from-query"}"#);
        let found = |query: &str| {
            rule.in_query(query.as_bytes(), LogEscape::Default)
                .and_then(|c| c.decode())
        };
        assert_eq!(
            found(&format!("a=1&access_token={token}")),
            Ok("from-query".into())
        );
        assert_eq!(
            found(&format!("access_token=&access_token={token}&user_key=k")),
            Ok("from-query".into())
        );
        // The user_key and app_id parameters do not count in oidc mode.
        assert_eq!(found("user_key=k&app_id=i"), Err(Skip::NoCredential));
        assert_eq!(found("xaccess_token=a.b.c"), Err(Skip::NoCredential));
        assert_eq!(found("access_token=opaque"), Err(Skip::InvalidCredential));
        assert_eq!(rule.access_token(None), Err(Skip::NoCredential));
    }

    #[test]
    fn what_a_jwt_lacks_is_told() {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine;
        let payload = |text: &str| URL_SAFE_NO_PAD.encode(text);
        assert_eq!(
            claim_value(payload(r#"{"sub":"s","exp":1}"#).as_bytes(), "azp"),
            Err(JwtProblem::Missing(vec!["exp".into(), "sub".into()]))
        );
        let missing = JwtProblem::Missing(vec!["exp".into(), "a\x1b".into()]);
        assert_eq!(
            missing.describe("azp"),
            "it has no `azp` claim (it has exp, a\\x1b)"
        );
        assert_eq!(
            claim_value(b"%%", "azp").map_err(|p| p.describe("azp")),
            Err("its payload is not base64url".into())
        );
        assert_eq!(
            claim_value(payload("[]").as_bytes(), "azp"),
            Err(JwtProblem::NotAnObject)
        );
        assert_eq!(
            claim_value(payload(r#"{"azp":{"a":1}}"#).as_bytes(), "azp"),
            Err(JwtProblem::NotAString)
        );
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
        fn any_bytes_decode_or_fail(raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), which in 0usize..10) {
            let escape = [LogEscape::Default, LogEscape::Json, LogEscape::None][which % 3];
            let encoding = [
                Encoding::Query(escape),
                Encoding::Header(escape),
                Encoding::BasicUser(escape),
                Encoding::JwtClaim(JwtClaim::DEFAULT),
            ][which / 3];
            let _ = Credential::new(CredentialKind::AppId, &raw, encoding).decode();
        }

        /// Any bytes as a token, in an Authorization header or the query string: a credential
        /// that decodes or fails, or none; never a panic.
        #[test]
        fn any_token_is_read_or_skipped(token in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let bearer = [&b"Bearer "[..], &token].concat();
            let rule = oidc(CredentialLocation::Authorization, "azp");
            for value in [&token, &bearer] {
                let _ = rule.bearer(Some(value)).and_then(|c| c.decode());
            }
            let query = [&b"access_token="[..], &token].concat();
            let rule = oidc(CredentialLocation::Query, "azp");
            let _ = rule.in_query(&query, LogEscape::Default).and_then(|c| c.decode());
        }

        /// Tokens that look like JWTs (base64url parts and dots), whose payloads reach the
        /// decoder.
        #[test]
        fn jwt_ish_tokens_are_read_or_skipped(token in "[A-Za-z0-9_=.-]{0,120}") {
            let rule = oidc(CredentialLocation::Authorization, "azp");
            let _ = rule.bearer(Some(format!("Bearer {token}").as_bytes())).and_then(|c| c.decode());
        }
    }
}
