//! JSON lines (`format = "json"`): one object per line, from any logger. `[sources.fields]` names
//! the key of each value tally reads; the key paths are compiled once into a small tree, and each
//! line is walked once, without recursion or allocation: the objects on a configured path are
//! entered, every other value is skipped, and the walk stops as soon as every configured value is
//! found. Values are kept as logged (strings still JSON-escaped), like every format's.

use serde::Serialize;

use super::{
    cached, split_target, status_digits, time_iso8601, Carried, CredentialRule, Lacks, LogEscape,
    NamedValues, Request, Skip, TimeField, LOGGED_HEADERS,
};

/// The JSON key of each value tally reads (`[sources.fields]`): dots between the keys of nested
/// objects (`request.headers.x-api-key`); empty, not read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JsonFields {
    /// The request's time: RFC 3339, or epoch seconds, milliseconds, microseconds or nanoseconds.
    pub time: String,
    /// The response status: a number, or a string of three digits.
    pub status: String,
    /// The request method.
    pub method: String,
    /// The request target, path and query string (`$request_uri`).
    pub uri: String,
    /// The path without the query string; wins over the `uri`'s.
    pub path: String,
    /// The query string; wins over the `uri`'s.
    pub query: String,
    /// The Host.
    pub host: String,
    /// The user_key's value (a logged header, or a query argument logged on its own).
    pub user_key: String,
    /// The app_id's value (a logged header, or a query argument logged on its own).
    pub app_id: String,
    /// The Authorization header's value.
    pub authorization: String,
}

impl Default for JsonFields {
    fn default() -> JsonFields {
        use crate::config::defaults::sources::fields as d;
        JsonFields {
            time: d::TIME.into(),
            status: d::STATUS.into(),
            method: d::METHOD.into(),
            uri: d::URI.into(),
            path: d::PATH.into(),
            query: d::QUERY.into(),
            host: d::HOST.into(),
            user_key: d::USER_KEY.into(),
            app_id: d::APP_ID.into(),
            authorization: d::AUTHORIZATION.into(),
        }
    }
}

// The values, by their place in `JsonFields` (and in a line's `Values`).
const TIME: usize = 0;
const STATUS: usize = 1;
const METHOD: usize = 2;
const URI: usize = 3;
const PATH: usize = 4;
const QUERY: usize = 5;
const HOST: usize = 6;
const USER_KEY: usize = 7;
const APP_ID: usize = 8;
const AUTHORIZATION: usize = 9;
const FIELDS: usize = 10;

/// The most keys in one path: with a key that has dots in it matched too, a path of n keys makes
/// up to 2^(n-1) nodes.
const MAX_LEVELS: usize = 8;

/// JSON lines with the key paths of `[sources.fields]`, compiled for one source's credentials.
#[derive(Debug)]
pub struct JsonFormat {
    /// As given (for `tally check`).
    pub(crate) fields: JsonFields,
    /// The tree of key paths; the line's object is `nodes[0]`.
    nodes: Box<[Node]>,
    /// The values read (a bit per field): the walk stops once it has them all.
    wanted: u16,
    credentials: Carried,
}

/// The keys of one object on a configured path.
#[derive(Debug, Default)]
struct Node {
    /// Each key lower case, with what it leads to.
    keys: Vec<(Box<[u8]>, Edge)>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Edge {
    /// The fields whose value this key's is (a bit per field).
    fields: u16,
    /// The node of this key's object, when a path goes on into it.
    inner: Option<u16>,
}

/// A value as the line has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Value<'a> {
    Missing,
    Null,
    /// Between its quotes, still escaped.
    Str(&'a [u8]),
    /// As written.
    Num(&'a [u8]),
    /// `true`, `false`, an object, or an array that does not start with a string.
    Other,
}

impl JsonFormat {
    /// Compiles `fields` for credentials found as `rule` says; the error says what is missing or
    /// wrong.
    pub fn compile(fields: JsonFields, rule: &CredentialRule) -> Result<JsonFormat, String> {
        let keys: [(&str, &str); FIELDS] = [
            ("time", &fields.time),
            ("status", &fields.status),
            ("method", &fields.method),
            ("uri", &fields.uri),
            ("path", &fields.path),
            ("query", &fields.query),
            ("host", &fields.host),
            ("user_key", &fields.user_key),
            ("app_id", &fields.app_id),
            ("authorization", &fields.authorization),
        ];
        let mut nodes = vec![Node::default()];
        let mut wanted = 0u16;
        for (field, (name, path)) in keys.iter().enumerate() {
            if path.is_empty() {
                continue;
            }
            let parts: Vec<&str> = path.split('.').collect();
            if parts.iter().any(|p| p.is_empty())
                || path
                    .bytes()
                    .any(|b| b == b'"' || b == b'\\' || b.is_ascii_control())
            {
                return Err(format!(
                    "fields.{name} = \"{path}\": give the JSON key, with a dot between nested keys (request.headers.x-api-key)"
                ));
            }
            if parts.len() > MAX_LEVELS {
                return Err(format!(
                    "fields.{name} = \"{path}\": at most {MAX_LEVELS} nested keys"
                ));
            }
            insert(&mut nodes, 0, &parts, 1 << field);
            wanted |= 1 << field;
        }
        for (field, name) in [(TIME, "time"), (STATUS, "status")] {
            if wanted & (1 << field) == 0 {
                return Err(format!(
                    "fields.{name} is empty: give the JSON key of the request's {name}"
                ));
            }
        }
        if nodes.len() > usize::from(u16::MAX) {
            return Err("too many keys in fields".into());
        }
        let has = |field: usize| wanted & (1 << field) != 0;
        let logs = NamedValues {
            user_key: has(USER_KEY),
            app_id: has(APP_ID),
            query: has(URI) || has(QUERY),
            authorization: has(AUTHORIZATION),
        };
        let credentials = rule.carried(logs, LogEscape::Json).map_err(|lacks| match lacks {
            Lacks::Query { oidc: true } => {
                "the access token is read from the query string, and fields names none: give fields.uri or fields.query".to_string()
            }
            Lacks::Query { oidc: false } => format!(
                "credentials are read from the query string, and fields names none: give fields.uri, fields.query or fields.user_key (the JSON key of the {} argument)",
                rule.user_key
            ),
            Lacks::Header(key, header) => format!(
                "credentials are read from request headers: give fields.{key}, the JSON key of the {header} header (e.g. \"request.headers.{}\")",
                header.to_ascii_lowercase()
            ),
            Lacks::Authorization { oidc } => format!(
                "credentials are read from the Authorization header{}: give fields.authorization, its JSON key (e.g. \"request.headers.authorization\")",
                if oidc { " (a Bearer JWT)" } else { "" }
            ),
        })?;
        Ok(JsonFormat {
            fields,
            nodes: nodes.into_boxed_slice(),
            wanted,
            credentials,
        })
    }

    /// The Host of `line`, if it is JSON and has it.
    pub(crate) fn host<'a>(&self, line: &'a [u8]) -> Option<&'a [u8]> {
        text(self.scan(line).ok()?[HOST]).ok()?
    }

    /// Whether it reads the Host.
    pub(crate) fn logs_host(&self) -> bool {
        self.wanted & (1 << HOST) != 0
    }

    /// The configured values of `line`, or the offset where it is not JSON.
    fn scan<'a>(&self, line: &'a [u8]) -> Result<[Value<'a>; FIELDS], usize> {
        let mut values = [Value::Missing; FIELDS];
        let mut found = 0u16;
        // The nodes of the objects entered: at most one per key of a path.
        let mut stack = [0u16; MAX_LEVELS];
        let mut depth = 0;
        let mut node = 0usize;
        let mut i = ws(line, 0);
        if line.get(i) != Some(&b'{') {
            return Err(i);
        }
        i = ws(line, i + 1);
        // Whether `i` is at a member (else at what follows a value: `,` or `}`).
        let mut member = line.get(i) != Some(&b'}');
        loop {
            if member {
                if line.get(i) != Some(&b'"') {
                    return Err(i);
                }
                let end = string_end(line, i + 1).ok_or(i)?;
                let key = &line[i + 1..end];
                i = ws(line, end + 1);
                if line.get(i) != Some(&b':') {
                    return Err(i);
                }
                i = ws(line, i + 1);
                let edge = self.nodes.get(node).and_then(|n| n.find(key));
                if let (
                    Some(b'{'),
                    Some(Edge {
                        inner: Some(inner), ..
                    }),
                ) = (line.get(i), edge)
                {
                    *stack.get_mut(depth).ok_or(i)? = node as u16;
                    depth += 1;
                    node = usize::from(inner);
                    i = ws(line, i + 1);
                    member = line.get(i) != Some(&b'}');
                    continue;
                }
                let (value, end) = value(line, i).ok_or(i)?;
                if let Some(edge) = edge {
                    let new = edge.fields & !found;
                    if new != 0 {
                        let mut bits = new;
                        while bits != 0 {
                            values[bits.trailing_zeros() as usize] = value;
                            bits &= bits - 1;
                        }
                        found |= new;
                        if found == self.wanted {
                            return Ok(values);
                        }
                    }
                }
                i = ws(line, end);
            }
            match line.get(i) {
                Some(b',') => {
                    i = ws(line, i + 1);
                    member = true;
                }
                Some(b'}') if depth == 0 => {
                    let end = ws(line, i + 1);
                    return if end == line.len() {
                        Ok(values)
                    } else {
                        Err(end)
                    };
                }
                Some(b'}') => {
                    depth -= 1;
                    node = usize::from(stack[depth]);
                    i = ws(line, i + 1);
                    member = false;
                }
                _ => return Err(i),
            }
        }
    }

    /// Where `line`'s credential values are (to mask them wherever tally shows the line), and
    /// the offset past which it is not JSON, if it is not.
    pub(crate) fn secrets(&self, line: &[u8]) -> (Vec<std::ops::Range<usize>>, Option<usize>) {
        let values = match self.scan(line) {
            Ok(values) => values,
            Err(at) => return (Vec::new(), Some(at)),
        };
        let start = line.as_ptr() as usize;
        let spans = [USER_KEY, APP_ID, AUTHORIZATION]
            .into_iter()
            .filter_map(|field| match values[field] {
                Value::Str(s) if !s.is_empty() => {
                    let at = s.as_ptr() as usize - start;
                    Some(at..at + s.len())
                }
                _ => None,
            })
            .collect();
        (spans, None)
    }
}

/// Adds the path `parts` of `fields` under `node`: as nested keys, and as keys with dots in them
/// (`"http.request.method"` written flat) at every level.
fn insert(nodes: &mut Vec<Node>, node: usize, parts: &[&str], fields: u16) {
    for n in 1..=parts.len() {
        let key = parts[..n].join(".").to_ascii_lowercase().into_bytes();
        let at = match nodes[node].keys.iter().position(|(k, _)| **k == *key) {
            Some(at) => at,
            None => {
                nodes[node].keys.push((key.into(), Edge::default()));
                nodes[node].keys.len() - 1
            }
        };
        if n == parts.len() {
            nodes[node].keys[at].1.fields |= fields;
            continue;
        }
        let inner = match nodes[node].keys[at].1.inner {
            Some(inner) => usize::from(inner),
            None => {
                nodes.push(Node::default());
                // Checked after compiling: the count saturates rather than wraps meanwhile.
                let inner = u16::try_from(nodes.len() - 1).unwrap_or(u16::MAX);
                nodes[node].keys[at].1.inner = Some(inner);
                usize::from(inner)
            }
        };
        if inner < nodes.len() {
            insert(nodes, inner, &parts[n..], fields);
        }
    }
}

impl Node {
    /// What the key written as `raw` (between its quotes) leads to. Keys are matched ignoring
    /// ASCII case, as header names are.
    #[inline]
    fn find(&self, raw: &[u8]) -> Option<Edge> {
        let plain = self
            .keys
            .iter()
            .find(|(k, _)| k.len() == raw.len() && k.eq_ignore_ascii_case(raw));
        match plain {
            Some((_, edge)) => Some(*edge),
            // Configured keys have no backslash, so an escaped key never matched as written.
            None if memchr::memchr(b'\\', raw).is_some() => self
                .keys
                .iter()
                .find(|(k, _)| escaped_key_is(raw, k))
                .map(|(_, edge)| *edge),
            None => None,
        }
    }
}

/// Whether the JSON-escaped key `raw` is `key` (ignoring ASCII case), decoding as it compares.
fn escaped_key_is(raw: &[u8], key: &[u8]) -> bool {
    let hex4 = |at: usize| -> Option<u32> {
        let digits = raw.get(at..at + 4)?;
        digits
            .iter()
            .try_fold(0u32, |n, &d| Some(n * 16 + (d as char).to_digit(16)?))
    };
    let (mut i, mut j) = (0, 0);
    while i < raw.len() {
        let mut buf = [0u8; 4];
        let (bytes, len): (&[u8], usize) = match raw[i] {
            b'\\' => match raw.get(i + 1) {
                Some(b'"') => (b"\"", 2),
                Some(b'\\') => (b"\\", 2),
                Some(b'/') => (b"/", 2),
                Some(b'b') => (b"\x08", 2),
                Some(b'f') => (b"\x0c", 2),
                Some(b'n') => (b"\n", 2),
                Some(b'r') => (b"\r", 2),
                Some(b't') => (b"\t", 2),
                Some(b'u') => {
                    let Some(high) = hex4(i + 2) else {
                        return false;
                    };
                    let (code, len) = if (0xd800..0xdc00).contains(&high) {
                        match (raw.get(i + 6..i + 8), hex4(i + 8)) {
                            (Some(b"\\u"), Some(low)) if (0xdc00..0xe000).contains(&low) => {
                                (0x10000 + ((high - 0xd800) << 10) + (low - 0xdc00), 12)
                            }
                            _ => return false,
                        }
                    } else {
                        (high, 6)
                    };
                    let Some(c) = char::from_u32(code) else {
                        return false;
                    };
                    (c.encode_utf8(&mut buf).as_bytes(), len)
                }
                _ => return false,
            },
            _ => (&raw[i..i + 1], 1),
        };
        match key.get(j..j + bytes.len()) {
            Some(k) if k.eq_ignore_ascii_case(bytes) => {}
            _ => return false,
        }
        i += len;
        j += bytes.len();
    }
    j == key.len()
}

/// Past the whitespace at `i`.
#[inline]
fn ws(line: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = line.get(i) {
        i += 1;
    }
    i
}

/// The index of the quote that ends the string whose text starts at `from`.
#[inline]
fn string_end(line: &[u8], mut from: usize) -> Option<usize> {
    loop {
        let at = from + quote_or_backslash(line.get(from..)?)?;
        if line[at] == b'"' {
            return Some(at);
        }
        // A backslash escapes the next byte (`\uHHHH`'s digits need no care).
        from = at + 2;
    }
}

/// The index of the first `"` or `\` in `hay`, eight bytes at a time: keys and most values are
/// short, where calling out to a vectorised search costs more than the search.
#[inline]
fn quote_or_backslash(hay: &[u8]) -> Option<usize> {
    const LOW: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    let (words, tail) = hay.as_chunks::<8>();
    for (i, word) in words.iter().enumerate() {
        let word = u64::from_le_bytes(*word);
        let (q, b) = (
            word ^ (LOW * u64::from(b'"')),
            word ^ (LOW * u64::from(b'\\')),
        );
        // A zero byte of q or b is a match; the lowest flagged byte of each is a true one.
        let zero = (q.wrapping_sub(LOW) & !q | b.wrapping_sub(LOW) & !b) & HIGH;
        if zero != 0 {
            return Some(i * 8 + (zero.trailing_zeros() / 8) as usize);
        }
    }
    let at = words.len() * 8;
    tail.iter()
        .position(|&b| b == b'"' || b == b'\\')
        .map(|i| at + i)
}

/// The value at `i` and the index past it. An array that starts with a string is that string
/// (Caddy logs each header as a list of its values). Values inside others are skipped, not
/// checked.
#[inline]
fn value(line: &[u8], i: usize) -> Option<(Value<'_>, usize)> {
    let literal = |text: &[u8], v| line[i..].starts_with(text).then_some((v, i + text.len()));
    match *line.get(i)? {
        b'"' => {
            let end = string_end(line, i + 1)?;
            Some((Value::Str(&line[i + 1..end]), end + 1))
        }
        b'-' | b'0'..=b'9' => {
            let len = line[i..]
                .iter()
                .position(|b| !matches!(b, b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-'))
                .unwrap_or(line.len() - i);
            Some((Value::Num(&line[i..i + len]), i + len))
        }
        b'[' => {
            let first = ws(line, i + 1);
            match line.get(first)? {
                b']' => Some((Value::Null, first + 1)),
                b'"' => {
                    let end = string_end(line, first + 1)?;
                    Some((Value::Str(&line[first + 1..end]), skip(line, end + 1, 1)?))
                }
                _ => Some((Value::Other, skip(line, i + 1, 1)?)),
            }
        }
        b'{' => Some((Value::Other, skip(line, i + 1, 1)?)),
        b't' => literal(b"true", Value::Other),
        b'f' => literal(b"false", Value::Other),
        b'n' => literal(b"null", Value::Null),
        _ => None,
    }
}

/// The index past the object or array that is `open` levels deep at `i`: brackets are counted
/// (not matched), strings skipped. A count, not a stack: no nesting is too deep.
fn skip(line: &[u8], mut i: usize, mut open: usize) -> Option<usize> {
    while open > 0 {
        match *line.get(i)? {
            b'"' => i = string_end(line, i + 1)?,
            b'{' | b'[' => open += 1,
            b'}' | b']' => open -= 1,
            _ => {}
        }
        i += 1;
    }
    Some(i)
}

/// A Docker json-file record's `log` (between its quotes, still escaped) and `stream` values.
pub(super) fn log_and_stream(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let (mut log, mut stream) = (None, None);
    let mut i = ws(line, 0);
    if line.get(i) != Some(&b'{') {
        return None;
    }
    i = ws(line, i + 1);
    while line.get(i) == Some(&b'"') {
        let end = string_end(line, i + 1)?;
        let key = &line[i + 1..end];
        i = ws(line, end + 1);
        if line.get(i) != Some(&b':') {
            return None;
        }
        let (v, end) = value(line, ws(line, i + 1))?;
        match (key, v) {
            (b"log", Value::Str(s)) => log = Some(s),
            (b"stream", Value::Str(s)) => stream = Some(s),
            _ => {}
        }
        i = ws(line, end);
        match line.get(i) {
            Some(b',') => i = ws(line, i + 1),
            Some(b'}') => return Some((log?, stream?)),
            _ => return None,
        }
    }
    None
}

/// A line of JSON lines.
#[inline]
pub(super) fn line<'a>(
    format: &JsonFormat,
    rule: &CredentialRule,
    last_time: &mut (TimeField, i64),
    line: &'a [u8],
) -> Result<Request<'a>, Skip> {
    let values = format.scan(line).map_err(|_| Skip::Malformed)?;
    let timestamp = cached_time(last_time, values[TIME]).ok_or(Skip::Malformed)?;
    let status = match values[STATUS] {
        Value::Num(s) | Value::Str(s) => status_digits(s).ok_or(Skip::Malformed)?,
        _ => return Err(Skip::Malformed),
    };
    let (mut path, mut query) = match text(values[URI])?.map(split_target) {
        Some((path, query)) => (Some(path), Some(query)),
        None => (None, None),
    };
    if let Some(p) = text(values[PATH])? {
        path = Some(p);
    }
    if let Some(q) = text(values[QUERY])? {
        query = Some(q.strip_prefix(b"?").unwrap_or(q));
    }
    let credential = rule.in_values(
        format.credentials,
        query,
        text(values[USER_KEY])?,
        text(values[APP_ID])?,
        text(values[AUTHORIZATION])?,
        LogEscape::Json,
    )?;
    Ok(Request {
        timestamp,
        method: text(values[METHOD])?,
        path,
        query,
        host: text(values[HOST])?,
        headers: [None; LOGGED_HEADERS],
        status,
        credential,
    })
}

/// [`time`], through the parser's cache of the last time read: consecutive lines mostly share
/// their second.
#[inline]
fn cached_time(last: &mut (TimeField, i64), value: Value<'_>) -> Option<i64> {
    match value {
        Value::Str(t) => cached(last, t, rfc3339_or_epoch),
        _ => time(value),
    }
}

/// A string's text; None when missing or null; another type is malformed.
#[inline]
fn text(value: Value<'_>) -> Result<Option<&[u8]>, Skip> {
    match value {
        Value::Str(s) => Ok(Some(s)),
        Value::Missing | Value::Null => Ok(None),
        Value::Num(_) | Value::Other => Err(Skip::Malformed),
    }
}

/// RFC 3339 (`T`, `t` or a space between date and time; `Z` or `z` or an offset), or epoch time
/// as a number or a string of one.
#[inline]
fn time(value: Value<'_>) -> Option<i64> {
    match value {
        Value::Str(t) => rfc3339_or_epoch(t),
        Value::Num(t) => epoch(t),
        _ => None,
    }
}

/// RFC 3339, or epoch time written as a string.
pub(super) fn rfc3339_or_epoch(t: &[u8]) -> Option<i64> {
    if t.get(4) == Some(&b'-') {
        rfc3339(t)
    } else {
        epoch(t)
    }
}

/// RFC 3339, with `t` or a space between date and time and `z` allowed.
fn rfc3339(t: &[u8]) -> Option<i64> {
    if matches!(t.get(10), Some(b'T')) && !t.ends_with(b"z") {
        return time_iso8601(t);
    }
    // `time_iso8601` reads the upper-case form: a copy on the stack, rewritten.
    let mut buf = [0u8; 64];
    let copy = buf.get_mut(..t.len())?;
    copy.copy_from_slice(t);
    if let Some(sep @ (b't' | b' ')) = copy.get_mut(10) {
        *sep = b'T';
    }
    if let Some(z @ b'z') = copy.last_mut() {
        *z = b'Z';
    }
    time_iso8601(copy)
}

/// Epoch time, its unit told by its size: below 10^11 seconds (until the year 5138), below 10^14
/// milliseconds, below 10^17 microseconds, else nanoseconds. Fractions are dropped.
pub(super) fn epoch(t: &[u8]) -> Option<i64> {
    let digits = t.iter().take_while(|b| b.is_ascii_digit()).count();
    let rest = &t[digits..];
    let plain = match rest.split_first() {
        None => true,
        Some((b'.', fraction)) => !fraction.is_empty() && fraction.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    let whole = if plain && (1..=19).contains(&digits) {
        t[..digits]
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'))
    } else if rest.iter().any(|&b| b == b'e' || b == b'E') {
        // An exponent (`1.7955153e9`): rare enough for the float parser.
        let f: f64 = std::str::from_utf8(t).ok()?.parse().ok()?;
        if !(0.0..1e19).contains(&f) || t.first().is_some_and(|b| !b.is_ascii_digit()) {
            return None;
        }
        f as u64
    } else {
        return None;
    };
    let seconds = match whole {
        0..100_000_000_000 => whole,
        100_000_000_000..100_000_000_000_000 => whole / 1_000,
        100_000_000_000_000..100_000_000_000_000_000 => whole / 1_000_000,
        _ => whole / 1_000_000_000,
    };
    i64::try_from(seconds).ok()
}

#[cfg(test)]
mod tests {
    use super::super::{CredentialKind, CredentialLocation, CredentialMode, LogFormat, Parser};
    use super::*;
    use std::sync::Arc;

    const T: i64 = 1_795_515_300;

    fn parser(fields: JsonFields, rule: CredentialRule) -> Parser {
        let format = JsonFormat::compile(fields, &rule).unwrap();
        Parser::new(LogFormat::Json(Arc::new(format)), rule)
    }

    fn query() -> CredentialRule {
        CredentialRule::query(CredentialMode::Auto)
    }

    use crate::parse::testing::headers;

    /// (method, path, query, host, status, time, credential kind and decoded value)
    type Seen = (
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        u16,
        i64,
        CredentialKind,
        String,
    );

    fn seen(p: &mut Parser, line: &str) -> Result<Seen, Skip> {
        let r = p.parse(line.as_bytes())?;
        let s = |v: Option<&[u8]>| v.map(|v| String::from_utf8_lossy(v).into_owned());
        Ok((
            s(r.method),
            s(r.path),
            s(r.query),
            s(r.host),
            r.status,
            r.timestamp,
            r.credential.kind,
            r.credential.decode()?,
        ))
    }

    #[test]
    fn a_line_with_the_default_keys() {
        let mut p = parser(JsonFields::default(), query());
        let line = r#"{"time":"2026-11-24T10:15:00+00:00","remote_addr":"10.0.0.1","host":"api.example.com","method":"GET","uri":"/v1/words?user_key=k%2B1&page=2","status":200,"bytes":12,"ua":"curl \"8\""}"#;
        assert_eq!(
            seen(&mut p, line),
            Ok((
                Some("GET".into()),
                Some("/v1/words".into()),
                Some("user_key=k%2B1&page=2".into()),
                Some("api.example.com".into()),
                200,
                T,
                CredentialKind::UserKey,
                "k+1".into()
            ))
        );
        // Whitespace anywhere JSON allows it, keys in any order and case, a string status.
        let line =
            " { \"STATUS\" : \"404\" ,\n \"uri\" : \"/?app_id=a\" , \"time\" : 1795515300 } ";
        let r = seen(&mut p, line).unwrap();
        assert_eq!((r.0, r.3, r.4, r.5, r.7), (None, None, 404, T, "a".into()));
    }

    #[test]
    fn nested_keys_flat_keys_with_dots_and_arrays() {
        let fields = JsonFields {
            time: "ts".into(),
            status: "status".into(),
            method: "request.method".into(),
            uri: "request.uri".into(),
            host: "request.host".into(),
            user_key: "request.headers.x-api-key".into(),
            ..JsonFields::default()
        };
        let mut p = parser(fields, headers(CredentialMode::Auto));
        // Caddy: nested objects, headers as lists, epoch seconds with a fraction.
        let caddy = r#"{"level":"info","ts":1795515300.5321,"logger":"http.log.access","request":{"remote_ip":"::1","proto":"HTTP/1.1","method":"GET","host":"h","uri":"/a?b=1","headers":{"User-Agent":["curl/8"],"X-Api-Key":["k1","k2"]},"tls":{"x":[1,{"y":"}"}]}},"bytes_read":0,"status":201}"#;
        assert_eq!(
            seen(&mut p, caddy),
            Ok((
                Some("GET".into()),
                Some("/a".into()),
                Some("b=1".into()),
                Some("h".into()),
                201,
                T,
                CredentialKind::UserKey,
                "k1".into()
            ))
        );
        // The same keys written flat, with dots in them (ECS), or half and half.
        let flat = r#"{"ts":"1795515300","request.method":"PUT","request":{"headers.x-api-key":"k3"},"status":200}"#;
        let r = seen(&mut p, flat).unwrap();
        assert_eq!((r.0, r.1, r.7), (Some("PUT".into()), None, "k3".into()));
        // The header missing, null, empty, `-`, or an empty list: no credential.
        for header in [
            r#""x":1"#,
            r#""x-api-key":null"#,
            r#""x-api-key":"""#,
            r#""x-api-key":"-""#,
            r#""x-api-key":[]"#,
        ] {
            let line =
                format!(r#"{{"ts":1795515300,"status":200,"request":{{"headers":{{{header}}}}}}}"#);
            assert_eq!(seen(&mut p, &line), Err(Skip::NoCredential), "{line}");
        }
        // An object where a path goes on is entered only on it; elsewhere it is skipped.
        let line = r#"{"x":{"request":{"method":"NO"}},"ts":1795515300,"status":200,"request":{"headers":{"x-api-key":"k"}}}"#;
        assert_eq!(seen(&mut p, line).map(|r| r.0), Ok(None));
    }

    #[test]
    fn escapes_in_keys_and_values() {
        let mut p = parser(
            JsonFields {
                user_key: "h.x-api-key".into(),
                ..JsonFields::default()
            },
            headers(CredentialMode::UserKey),
        );
        let line = |h: &str| {
            format!(
                r#"{{"time":"2026-11-24T10:15:00Z","status":200,"uri":"/p\"q\u0022?user_key=no","h":{h}}}"#
            )
        };
        // The value is unescaped once decoded; the path stays as logged.
        let r = seen(&mut p, &line(r#"{"x-api-key":"k\"1\u00e9"}"#)).unwrap();
        assert_eq!((r.1, r.7), (Some(r#"/p\"q\u0022"#.into()), "k\"1é".into()));
        // Keys written with escapes are the same keys.
        for key in [
            r#"x\u002dapi-key"#,
            r#"X\u002DAPI\u002dKey"#,
            r#"x-api\u002dkey"#,
        ] {
            let r = seen(&mut p, &line(&format!(r#"{{"{key}":"k"}}"#)));
            assert_eq!(r.map(|r| r.7), Ok("k".into()), "{key}");
        }
        for key in [
            r#"x\u002dapi-ke"#,
            r#"x\u002dapi-keyy"#,
            r#"x\qapi-key"#,
            r#"x\u00"#,
            r#"x\ud800-api-key"#,
        ] {
            let r = seen(&mut p, &line(&format!(r#"{{"{key}":"k"}}"#)));
            assert_eq!(r, Err(Skip::NoCredential), "{key}");
        }
        // A backslash-quote inside a skipped string does not end it.
        let r = seen(&mut p, &line(r#"{"a":"\\\"x-api-key\":","x-api-key":"k"}"#));
        assert_eq!(r.map(|r| r.7), Ok("k".into()));
    }

    #[test]
    fn wrong_types_missing_values_and_garbage_are_malformed() {
        let mut p = parser(JsonFields::default(), query());
        let ok = r#""time":1795515300,"status":200,"uri":"/?user_key=k""#;
        assert!(p.parse(format!("{{{ok}}}").as_bytes()).is_ok());
        for line in [
            "",
            "garbage",
            "[]",
            "{",
            r#"{"time":1795515300,"status":200,"uri":"/?user_key=k""#,
            r#"{"time":1795515300,"status":200,"uri":"/?user_key=k",}"#,
            r#"{"time":1795515300,"status":200,"uri":"/?user_key=k"} x"#,
            r#"{"time":1795515300,"status":200,"uri":"/?user_key=k}"#,
            r#"{"time":1795515300 "status":200}"#,
            r#"{"time":1795515300,"status":{"code":200},"uri":"/?user_key=k"}"#,
            r#"{"time":1795515300,"status":[200],"uri":"/?user_key=k"}"#,
            r#"{"time":1795515300,"status":true,"uri":"/?user_key=k"}"#,
            r#"{"time":1795515300,"status":200.0,"uri":"/?user_key=k"}"#,
            r#"{"time":1795515300,"status":"20","uri":"/?user_key=k"}"#,
            r#"{"time":1795515300,"uri":"/?user_key=k"}"#,
            r#"{"time":null,"status":200,"uri":"/?user_key=k"}"#,
            r#"{"time":{"s":1},"status":200,"uri":"/?user_key=k"}"#,
            r#"{"time":"yesterday","status":200,"uri":"/?user_key=k"}"#,
            r#"{"status":200,"uri":"/?user_key=k"}"#,
            r#"{"time":1795515300,"status":200,"uri":7}"#,
            r#"{"time":1795515300,"status":200,"uri":"/?user_key=k","method":false}"#,
            r#"{"time":1795515300,"status":200,"uri":"/?user_key=k","host":{}}"#,
            r#"{"time":1795515300,"status":200,"uri":"/?user_key=k","x":tru}"#,
            r#"{"time":1795515300,"status":200,"uri":"/?user_key=k","x":@}"#,
        ] {
            assert_eq!(p.parse(line.as_bytes()), Err(Skip::Malformed), "{line}");
        }
        // Values not configured are skipped whatever their type; null is no value.
        let line = format!(r#"{{"a":[1,{{"b":null}}],"method":null,{ok}}}"#);
        let r = p.parse(line.as_bytes());
        assert_eq!(r.map(|r| r.method), Ok(None));
        assert_eq!(
            p.parse(br#"{"time":1795515300,"status":200,"uri":"/?page=1"}"#),
            Err(Skip::NoCredential)
        );
        assert_eq!(
            p.parse(br#"{"time":1795515300,"status":200}"#),
            Err(Skip::NoCredential)
        );
    }

    #[test]
    fn times_in_each_form() {
        for (time, at) in [
            (r#""2026-11-24T10:15:00Z""#, T),
            (r#""2026-11-24T10:15:00.123456789Z""#, T),
            (r#""2026-11-24t10:15:00z""#, T),
            (r#""2026-11-24 11:15:00+01:00""#, T),
            (r#""2026-11-24T05:15:00.5-05:00""#, T),
            ("1795515300", T),
            ("1795515300.999", T),
            (r#""1795515300.25""#, T),
            ("1795515300999", T),
            ("1795515300999.5", T),
            ("1795515300999999", T),
            ("1795515300999999999", T),
            ("1.7955153e9", T),
            ("0", 0),
        ] {
            let line = format!(r#"{{"time":{time},"status":200,"uri":"/?app_id=a"}}"#);
            let r = parser(JsonFields::default(), query()).parse(line.as_bytes());
            assert_eq!(r.map(|r| r.timestamp), Ok(at), "{time}");
        }
        // One parser's cache of the last time: hit, missed, never mixed up.
        let mut p = parser(JsonFields::default(), query());
        for (time, at) in [
            ("2026-11-24T10:15:00Z", T),
            ("2026-11-24T10:15:00Z", T),
            ("2026-11-24T10:15:01Z", T + 1),
            ("2026-11-24T10:15:01+00:00", T + 1),
            ("2026-11-24T10:15:01+01:00", T + 1 - 3600),
            ("1795515300", T),
            ("2026-11-24T10:15:01+01:00", T + 1 - 3600),
        ] {
            let line = format!(r#"{{"time":"{time}","status":200,"uri":"/?app_id=a"}}"#);
            assert_eq!(
                p.parse(line.as_bytes()).map(|r| r.timestamp),
                Ok(at),
                "{time}"
            );
        }
        assert_eq!(
            p.parse(br#"{"time":"2026-11-24T10:15:61+01:00","status":200,"uri":"/?app_id=a"}"#),
            Err(Skip::Malformed)
        );
        for time in [
            r#""2026-11-24T10:15:00""#,
            r#""2026-11-24T10:15:00+0100""#,
            r#""2026-11-24""#,
            r#""""#,
            "-1795515300",
            "1795515300.",
            "1e400",
            "-1e3",
            "17955153001234567890",
            r#""1795515300x""#,
            "true",
        ] {
            let line = format!(r#"{{"time":{time},"status":200,"uri":"/?app_id=a"}}"#);
            let r = parser(JsonFields::default(), query()).parse(line.as_bytes());
            assert_eq!(r, Err(Skip::Malformed), "{time}");
        }
    }

    #[test]
    fn credentials_from_headers_arguments_authorization_and_separate_query() {
        let fields = JsonFields {
            user_key: "http_x_api_key".into(),
            app_id: "http_x_app_id".into(),
            ..JsonFields::default()
        };
        let line = |key: &str, app: &str| {
            format!(
                r#"{{"time":1795515300,"status":200,"uri":"/?user_key=q","http_x_api_key":"{key}","http_x_app_id":"{app}"}}"#
            )
        };
        let mut auto = parser(fields.clone(), headers(CredentialMode::Auto));
        let mut app = parser(fields.clone(), headers(CredentialMode::AppId));
        let got = |p: &mut Parser, l: &str| seen(p, l).map(|r| (r.6, r.7));
        assert_eq!(
            got(&mut auto, &line("a%2B", "i")),
            Ok((CredentialKind::UserKey, "a%2B".into()))
        );
        assert_eq!(
            got(&mut auto, &line("", "i")),
            Ok((CredentialKind::AppId, "i".into()))
        );
        assert_eq!(
            got(&mut app, &line("k", "i")),
            Ok((CredentialKind::AppId, "i".into()))
        );
        assert_eq!(got(&mut app, &line("k", "-")), Err(Skip::NoCredential));
        // With location = query, the fields are arguments: `%` decoded.
        let mut args = parser(fields, query());
        assert_eq!(
            got(&mut args, &line("a%2B", "")),
            Ok((CredentialKind::UserKey, "a+".into()))
        );
        // Authorization: Basic.
        let mut basic = parser(
            JsonFields {
                authorization: "auth".into(),
                ..JsonFields::default()
            },
            CredentialRule {
                location: CredentialLocation::Authorization,
                ..query()
            },
        );
        let line = |auth: &str| format!(r#"{{"time":1795515300,"status":200,"auth":"{auth}"}}"#);
        assert_eq!(
            got(&mut basic, &line("Basic dXNlcjpwYXNz")),
            Ok((CredentialKind::UserKey, "user".into()))
        );
        assert_eq!(got(&mut basic, &line("Bearer x")), Err(Skip::NoCredential));
        assert_eq!(got(&mut basic, &line("")), Err(Skip::NoCredential));
        // A query logged apart (NGINX's $uri and $args): it and the path win over the uri's.
        let mut apart = parser(
            JsonFields {
                path: "path".into(),
                query: "args".into(),
                ..JsonFields::default()
            },
            query(),
        );
        let r = seen(&mut apart, r#"{"time":1795515300,"status":200,"uri":"/u?user_key=no","path":"/p","args":"?app_id=x%21"}"#).unwrap();
        assert_eq!(
            (r.1, r.2, r.7),
            (Some("/p".into()), Some("app_id=x%21".into()), "x!".into())
        );
        let r = seen(
            &mut apart,
            r#"{"time":1795515300,"status":200,"uri":"/u?user_key=u"}"#,
        )
        .unwrap();
        assert_eq!((r.1, r.7), (Some("/u".into()), "u".into()));
    }

    #[test]
    fn oidc_reads_a_bearer_jwt_or_an_access_token() {
        use crate::parse::testing::{jwt, oidc};
        let token = jwt(r#"{"azp":"app-1","client_id":"client-1"}"#);
        let got = |p: &mut Parser, line: &str| seen(p, line).map(|r| (r.6, r.7));
        let fields = JsonFields {
            authorization: "request.headers.Authorization".into(),
            ..JsonFields::default()
        };
        let line = |auth: &str| {
            format!(
                r#"{{"time":1795515300,"status":200,"uri":"/?user_key=u","request":{{"headers":{{"authorization":{auth}}}}}}}"#
            )
        };
        let bearer = line(&format!(r#"["Bearer {token}"]"#));
        for (location, claim, app_id) in [
            (CredentialLocation::Authorization, "azp", "app-1"),
            (CredentialLocation::Headers, "client_id", "client-1"),
        ] {
            let mut p = parser(fields.clone(), oidc(location, claim));
            assert_eq!(
                got(&mut p, &bearer),
                Ok((CredentialKind::AppId, app_id.into()))
            );
            for none in [r#""-""#, "null", r#""""#, r#""Basic dXNlcjpwYXNz""#] {
                assert_eq!(got(&mut p, &line(none)), Err(Skip::NoCredential), "{none}");
            }
            assert_eq!(
                got(&mut p, &line(r#""Bearer a.b""#)),
                Err(Skip::InvalidCredential)
            );
        }
        // The access_token parameter, from the query string; the user_key fields do not count.
        let mut p = parser(
            JsonFields {
                user_key: "k".into(),
                ..JsonFields::default()
            },
            oidc(CredentialLocation::Query, "azp"),
        );
        let line = format!(
            r#"{{"time":1795515300,"status":200,"k":"u","uri":"/p?access_token={token}"}}"#
        );
        assert_eq!(
            got(&mut p, &line),
            Ok((CredentialKind::AppId, "app-1".into()))
        );
        assert_eq!(
            got(
                &mut p,
                r#"{"time":1795515300,"status":200,"k":"u","uri":"/p"}"#
            ),
            Err(Skip::NoCredential)
        );
        // A field that cannot carry the token: what to give.
        let err = JsonFormat::compile(
            JsonFields::default(),
            &oidc(CredentialLocation::Headers, "azp"),
        )
        .unwrap_err();
        assert!(
            err.contains("Bearer JWT") && err.contains("give fields.authorization"),
            "{err}"
        );
        let err = JsonFormat::compile(
            JsonFields {
                uri: String::new(),
                user_key: "k".into(),
                ..JsonFields::default()
            },
            &oidc(CredentialLocation::Query, "azp"),
        )
        .unwrap_err();
        assert!(err.contains("fields.uri or fields.query"), "{err}");
    }

    #[test]
    fn fields_that_cannot_work_are_refused_with_what_to_give() {
        let e = |fields: JsonFields, rule: CredentialRule| {
            JsonFormat::compile(fields, &rule).unwrap_err()
        };
        let err = e(JsonFields::default(), headers(CredentialMode::UserKey));
        assert!(
            err.contains("fields.user_key") && err.contains("request.headers.x-api-key"),
            "{err}"
        );
        let err = e(JsonFields::default(), headers(CredentialMode::AppId));
        assert!(
            err.contains("fields.app_id") && err.contains("X-App-Id"),
            "{err}"
        );
        let err = e(
            JsonFields::default(),
            CredentialRule {
                location: CredentialLocation::Authorization,
                ..query()
            },
        );
        assert!(err.contains("fields.authorization"), "{err}");
        let err = e(
            JsonFields {
                uri: String::new(),
                ..JsonFields::default()
            },
            query(),
        );
        assert!(err.contains("fields.uri"), "{err}");
        let err = e(
            JsonFields {
                time: String::new(),
                ..JsonFields::default()
            },
            query(),
        );
        assert!(err.contains("fields.time"), "{err}");
        for bad in ["a..b", ".a", "a.", r#"a"b"#, r"a\b", "a.b.c.d.e.f.g.h.i"] {
            let err = e(
                JsonFields {
                    status: bad.into(),
                    ..JsonFields::default()
                },
                query(),
            );
            assert!(err.contains("fields.status"), "{err}");
        }
    }

    #[test]
    fn secrets_are_where_the_credential_fields_are() {
        let rule = headers(CredentialMode::Auto);
        let format = JsonFormat::compile(
            JsonFields {
                user_key: "h.key".into(),
                app_id: "app".into(),
                ..JsonFields::default()
            },
            &rule,
        )
        .unwrap();
        let line = br#"{"time":1,"h":{"key":"secret1"},"status":200,"app":"secret2"}"#;
        let (spans, cut) = format.secrets(line);
        assert_eq!(cut, None);
        let shown: Vec<&[u8]> = spans.iter().map(|r| &line[r.clone()]).collect();
        assert_eq!(shown, vec![&b"secret1"[..], &b"secret2"[..]]);
        assert_eq!(
            format.secrets(br#"{"time":1,"h":{"key":"s"#),
            (vec![], Some(21))
        );
    }

    proptest::proptest! {
        /// The word-at-a-time search finds what a plain search finds.
        #[test]
        fn quote_or_backslash_is_a_search(hay in proptest::collection::vec(proptest::sample::select(vec![b'"', b'\\', b'a', 0x22 ^ 0x80, 0x5c ^ 0x80, 0x00, 0xff, 0x21, 0x5d]), 0..40)) {
            proptest::prop_assert_eq!(quote_or_backslash(&hay), hay.iter().position(|&b| b == b'"' || b == b'\\'));
        }
    }

    /// The values a test line is built from.
    fn texts() -> impl proptest::strategy::Strategy<Value = String> {
        proptest::string::string_regex("[a-zA-Z0-9 \"\\\\/%+é\u{1F600}\u{7}-]{0,12}").unwrap()
    }

    proptest::proptest! {
        /// Any bytes: a request or a skip, never a panic.
        #[test]
        fn any_bytes_parse_or_skip(line in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = parser(JsonFields::default(), query()).parse(&line);
        }

        /// JSON-ish bytes, which go deeper into the scanner.
        #[test]
        fn json_ish_bytes_parse_or_skip(line in proptest::string::string_regex(r#"[{}\[\]":, \\tu0-9a-z.]{0,80}"#).unwrap()) {
            let mut p = parser(JsonFields { user_key: "a.b".into(), ..JsonFields::default() }, headers(CredentialMode::Auto));
            let _ = p.parse(line.as_bytes());
            let _ = parser(JsonFields::default(), query()).parse(line.as_bytes());
        }

        /// A line serde_json writes from random values reads back as those values.
        #[test]
        fn a_written_line_reads_back(
            method in "[A-Z]{1,7}",
            path in texts(),
            key in texts(),
            host in proptest::option::of(texts()),
            status in 100u16..1000,
            // From 1973: epoch milliseconds are told from seconds by their size.
            seconds in 100_000_000i64..4_000_000_000,
            millis in 0i64..1000,
            as_text in proptest::prelude::any::<bool>(),
            noise in proptest::collection::vec((texts(), texts()), 0..4),
        ) {
            let mut fields = serde_json::Map::new();
            for (k, v) in noise {
                fields.insert(format!("n{k}"), serde_json::json!({ "v": [v, 1.5, null, {"k": k}] }));
            }
            let time = if as_text { serde_json::json!(format!("{seconds}.{millis:03}")) } else { serde_json::json!(seconds * 1000 + millis) };
            fields.insert("time".into(), time);
            fields.insert("status".into(), serde_json::json!(status));
            fields.insert("request".into(), serde_json::json!({
                "method": method,
                "path": format!("/{path}"),
                "headers": { "X-Api-Key": key },
                "host": host,
            }));
            let line = serde_json::to_string(&serde_json::Value::Object(fields)).unwrap();
            let mut p = parser(
                JsonFields {
                    method: "request.method".into(),
                    uri: String::new(),
                    path: "request.path".into(),
                    host: "request.host".into(),
                    user_key: "request.headers.x-api-key".into(),
                    ..JsonFields::default()
                },
                headers(CredentialMode::UserKey),
            );
            let r = p.parse(line.as_bytes());
            if key.is_empty() || key == "-" {
                proptest::prop_assert_eq!(r, Err(Skip::NoCredential));
                return Ok(());
            }
            let r = r.unwrap();
            let unescaped = |raw: &[u8]| serde_json::from_slice::<String>(&[b"\"", raw, b"\""].concat()).unwrap();
            proptest::prop_assert_eq!(r.timestamp, seconds);
            proptest::prop_assert_eq!(r.status, status);
            proptest::prop_assert_eq!(r.method, Some(method.as_bytes()));
            proptest::prop_assert_eq!(r.path.map(unescaped), Some(format!("/{path}")));
            proptest::prop_assert_eq!(r.host.map(unescaped), host);
            proptest::prop_assert_eq!(r.credential.decode(), Ok(key));
        }
    }
}
