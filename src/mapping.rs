//! Request record → usage: a source's mapping rules, with APIcast's semantics (its
//! `mapping_rule.lua` and `mapping_rules_matcher.lua`). Every rule, in the order given, whose
//! method, path pattern and query parameters match adds its delta to its metric; a matching rule
//! with `last` ends the walk; no rule matching means APIcast would have answered 404 and reported
//! nothing. Without rules, each request is one hit.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::parse::{LogEscape, Request, Skip};
use crate::usage::{MetricId, MetricNames, Usage, ONE_HIT};

/// A mapping rule as configured (`[[sources.mapping_rules]]`, or a proxy rule of the 3scale
/// proxy configuration).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MappingRule {
    /// `GET`, `POST`… or `ANY`.
    pub method: String,
    /// The path pattern (`/products/{id}`, `/status$`), with optional query parameters
    /// (`/search?q={term}&lang=en`).
    pub pattern: String,
    /// The metric (or method) system name the delta is added to.
    pub metric: String,
    /// What a match adds.
    #[serde(default = "one")]
    pub delta: u64,
    /// Stop after this rule when it matches.
    #[serde(default)]
    pub last: bool,
}

fn one() -> u64 {
    1
}

/// The lines one service takes of a source routed by Host (`proxy.hosts` of the 3scale proxy
/// configuration): exact names, compared as APIcast does (any case, without the port).
#[derive(Debug, Clone)]
pub struct HostRoute {
    /// This service's names, lower case, without a port.
    pub(crate) hosts: Vec<String>,
    /// Every service's, on the one service of the source that counts the lines read and skipped:
    /// a line whose host is none of them is skipped there as `unknown_host`.
    pub(crate) all_hosts: Option<std::sync::Arc<Vec<String>>>,
    /// With APIcast's path routing: every service of the source, so that each service chooses
    /// a line's service as every other does.
    pub(crate) path_routing: Option<PathRouting>,
}

/// APIcast's path routing: of the services that list a line's Host, in the configuration's order,
/// the first one whose mapping rules match the request; none matching, the first one.
#[derive(Debug, Clone)]
pub(crate) struct PathRouting {
    /// This service's place among the source's services.
    pub(crate) me: usize,
    /// Per Host, the services listing it (by place), with their rules compiled for matching.
    pub(crate) by_host: std::sync::Arc<HashMap<String, Vec<(usize, MappingRules)>>>,
    /// This service's parser reading lines without their credential: a line whose credential it
    /// cannot read is read again with it for its method and path (the rare path).
    pub(crate) reader: crate::parse::Parser,
}

/// Whose a line routed by Host is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    /// This service's.
    This,
    /// Another service's.
    Other,
    /// No service's (counted by the service that counts the lines).
    Nobody,
}

impl HostRoute {
    /// Whether this service counts the source's lines read and skipped.
    pub(crate) fn counts_all(&self) -> bool {
        self.all_hosts.is_some()
    }

    /// Whose a line of `host` (as logged) is, by its Host alone.
    pub(crate) fn owner(&self, host: Option<&[u8]>) -> Owner {
        self.owner_by(&name_of(host), |_| None)
    }

    /// Whose `request` is (with path routing, by its method, path and query too).
    pub(crate) fn owner_of_request(&self, request: &Request<'_>, escape: LogEscape) -> Owner {
        self.owner_by(&name_of(request.host), |services| {
            services
                .iter()
                .find(|(_, rules)| rules.matches(request, escape))
                .map(|(place, _)| *place)
        })
    }

    /// Whose `line` is, read without this service's credential (which it lacks): with path
    /// routing, by its request read without any credential (a line that cannot be read: by its
    /// Host).
    pub(crate) fn owner_of_line(&mut self, host: Option<&[u8]>, line: &[u8]) -> Owner {
        let name = name_of(host);
        let Some(routing) = &mut self.path_routing else {
            return self.owner(host);
        };
        let escape = routing.reader.escape();
        let chosen = match routing.reader.parse_record(line) {
            Ok(Some(request)) => routing.by_host.get(&name).and_then(|services| {
                services
                    .iter()
                    .find(|(_, rules)| rules.matches(&request, escape))
                    .map(|(place, _)| *place)
            }),
            _ => None,
        };
        self.owner_by(&name, |_| chosen)
    }

    /// Whose a line of Host `name` is, `matching` choosing among the services of that Host with
    /// path routing (None: the first one).
    fn owner_by(
        &self,
        name: &str,
        matching: impl FnOnce(&[(usize, MappingRules)]) -> Option<usize>,
    ) -> Owner {
        if let Some(routing) = &self.path_routing {
            return match routing.by_host.get(name) {
                Some(services) => {
                    let first = services.first().map(|(place, _)| *place);
                    if matching(services).or(first) == Some(routing.me) {
                        Owner::This
                    } else {
                        Owner::Other
                    }
                }
                None if self.counts_all() => Owner::Nobody,
                None => Owner::Other,
            };
        }
        if self.hosts.iter().any(|h| h == name) {
            return Owner::This;
        }
        match &self.all_hosts {
            Some(all) if !all.iter().any(|h| h == name) => Owner::Nobody,
            _ => Owner::Other,
        }
    }
}

/// A logged Host as APIcast compares it (none: the empty name, which no service has).
fn name_of(host: Option<&[u8]>) -> String {
    host.map(|h| host_name(&String::from_utf8_lossy(h)))
        .unwrap_or_default()
}

/// A Host name as APIcast compares it: lower case, without a port.
pub(crate) fn host_name(host: &str) -> String {
    let host = host.trim();
    let bare = match host.rsplit_once(':') {
        // `name:port`, or `[v6]:port`; a bare IPv6 address has colons and no port.
        Some((name, port))
            if !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (name.ends_with(']') || !name.contains(':')) =>
        {
            name
        }
        _ => host,
    };
    bare.to_ascii_lowercase()
}

/// A source's rules, compiled against its service's metrics.
#[derive(Debug, Clone, Default)]
pub struct MappingRules {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
struct Rule {
    /// None: `ANY`.
    method: Option<Box<[u8]>>,
    /// The path pattern as APIcast makes it a regular expression, anchored at the start.
    path: regex::bytes::Regex,
    /// The query parameters the rule asks for.
    query: Vec<(Box<[u8]>, Expected)>,
    metric: MetricId,
    delta: u64,
    last: bool,
}

/// What a rule asks of a query parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expected {
    /// `{placeholder}`: present, with any value.
    Present,
    /// This value, decoded.
    Equal(Box<[u8]>),
}

impl MappingRules {
    /// Compiles `rules`, whose metrics must be among `metrics`; the error gives the rule (by its
    /// place, from 0) and what is wrong with it.
    pub fn compile(
        rules: &[MappingRule],
        metrics: &MetricNames,
    ) -> Result<MappingRules, (usize, String)> {
        let rules = rules
            .iter()
            .enumerate()
            .map(|(i, rule)| Rule::compile(rule, metrics).map_err(|e| (i, e)))
            .collect::<Result<_, _>>()?;
        Ok(MappingRules { rules })
    }

    /// Checks `rules` on their own (their metrics as the service's, which 3scale checks later):
    /// the error gives the rule and what is wrong with it.
    pub(crate) fn check(rules: &[MappingRule]) -> Result<(), (usize, String)> {
        MappingRules::on_their_own(rules).map(|_| ())
    }

    /// `rules` compiled against their own metrics: for matching requests, not for their usage.
    pub(crate) fn on_their_own(rules: &[MappingRule]) -> Result<MappingRules, (usize, String)> {
        let metrics: Vec<&str> = rules.iter().map(|r| r.metric.trim()).collect();
        MappingRules::compile(rules, &MetricNames::new(&metrics))
    }

    /// Whether a rule matches `request`'s method and path: APIcast's path routing asks this of a
    /// service, without the query (its `find_service` passes no arguments to the matcher, so a
    /// rule that asks for query parameters never chooses a service).
    pub(crate) fn matches(&self, request: &Request<'_>, escape: LogEscape) -> bool {
        let without_query = Request {
            query: Some(b""),
            ..request.clone()
        };
        !self.rules.is_empty()
            && !matches!(
                self.matched(&without_query, escape),
                Err(Skip::NoMappingRule)
            )
    }

    /// Whether there are rules (without, each request is one hit).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The usage APIcast would have reported for `request`, whose values are escaped as `escape`
    /// says; `no_mapping_rule` when no rule matches, `too_many_metrics` when the rules that match
    /// name more metrics than a transaction holds.
    #[inline]
    pub(crate) fn usage(&self, request: &Request<'_>, escape: LogEscape) -> Result<Usage, Skip> {
        if self.rules.is_empty() {
            return Ok(ONE_HIT);
        }
        self.matched(request, escape)
    }

    #[inline(never)]
    fn matched(&self, request: &Request<'_>, escape: LogEscape) -> Result<Usage, Skip> {
        // A `#` ends NGINX's URI, path or arguments.
        let logged = request.path.unwrap_or(b"/");
        let (logged, query) = match memchr::memchr(b'#', logged) {
            Some(hash) => (&logged[..hash], &b""[..]),
            None => {
                let query = request.query.unwrap_or_default();
                (
                    logged,
                    &query[..memchr::memchr(b'#', query).unwrap_or(query.len())],
                )
            }
        };
        let path = apicast_path(logged, escape);
        let mut usage = Usage::default();
        let mut matched = false;
        for rule in &self.rules {
            let method_matches = match &rule.method {
                None => true,
                Some(m) => request.method == Some(&**m),
            };
            if !(method_matches
                && rule.path.is_match(&path)
                && rule
                    .query
                    .iter()
                    .all(|(name, expected)| arg_matches(query, name, expected, escape)))
            {
                continue;
            }
            matched = true;
            if !usage.add(rule.metric, rule.delta) {
                return Err(Skip::TooManyMetrics);
            }
            if rule.last {
                break;
            }
        }
        if matched {
            Ok(usage)
        } else {
            Err(Skip::NoMappingRule)
        }
    }
}

impl Rule {
    fn compile(rule: &MappingRule, metrics: &MetricNames) -> Result<Rule, String> {
        let method = match rule.method.trim().to_ascii_uppercase().as_str() {
            "ANY" => None,
            "" => return Err("method is empty: give GET, POST… or ANY".into()),
            m if m.bytes().all(|b| b.is_ascii_uppercase()) => Some(m.as_bytes().into()),
            m => return Err(format!("method `{m}` is not an HTTP method (or ANY)")),
        };
        if !rule.pattern.starts_with('/') {
            return Err(format!(
                "pattern `{}` does not start with `/`",
                rule.pattern
            ));
        }
        let (path, query) = match rule.pattern.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (rule.pattern.as_str(), None),
        };
        let expression = format!("(?-u)^{}", regexpify(path));
        let path = regex::bytes::Regex::new(&expression).map_err(|e| {
            format!(
                "pattern `{}` is not one APIcast can match: {e}",
                rule.pattern
            )
        })?;
        let query = query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                let expected = if is_placeholder(value) {
                    Expected::Present
                } else {
                    Expected::Equal(value.as_bytes().into())
                };
                (name.as_bytes().into(), expected)
            })
            .collect();
        let metric = metrics
            .id(rule.metric.trim())
            .ok_or_else(|| format!("metric `{}` is not among the service's", rule.metric))?;
        Ok(Rule {
            method,
            path,
            query,
            metric,
            delta: rule.delta,
            last: rule.last,
        })
    }
}

/// A pattern's path as APIcast turns it into a regular expression: runs of `/` are one, each
/// `{name}` is one or more characters of a path segment, `.` is a dot; everything else is kept
/// as written (so `$` at the end anchors it, and `+`, `*`, `(`… act as they do in a regular
/// expression, as they do in APIcast).
fn regexpify(path: &str) -> String {
    let mut out = String::with_capacity(path.len() * 2);
    let mut rest = path;
    while let Some(c) = rest.chars().next() {
        match c {
            '/' => {
                out.push('/');
                rest = rest.trim_start_matches('/');
                continue;
            }
            // `\{.+?\}`: to the first `}` with at least one character before it.
            '{' => {
                if let Some(close) = rest.bytes().skip(2).position(|b| b == b'}') {
                    out.push_str(PLACEHOLDER);
                    rest = &rest[close + 3..];
                    continue;
                }
                out.push('{');
            }
            '.' => out.push_str(r"\."),
            c => out.push(c),
        }
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// What a `{name}` of a path matches: APIcast's class of path segment characters.
const PLACEHOLDER: &str = r"([\w\-.~%!$&'()*+,;=@:]+)";

/// Whether a pattern's query value is a placeholder: it holds `{name}` somewhere (APIcast's
/// unanchored `\{[-\w_]+\}`), whatever is around it.
fn is_placeholder(value: &str) -> bool {
    let bytes = value.as_bytes();
    bytes.iter().enumerate().any(|(i, &b)| {
        b == b'{' && {
            let name = bytes[i + 1..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_' || **c == b'-')
                .count();
            name > 0 && bytes.get(i + 1 + name) == Some(&b'}')
        }
    })
}

/// NGINX's `get_uri_args` reads this many arguments, the rest not at all.
const MAX_ARGS: usize = 100;

/// Whether the query string's last `name` parameter (names and values decoded, as NGINX's
/// `get_uri_args` gives them) is as expected: present for a placeholder (a parameter without `=`
/// counts), equal to the value otherwise.
fn arg_matches(query: &[u8], name: &[u8], expected: &Expected, escape: LogEscape) -> bool {
    let mut last: Option<Option<&[u8]>> = None;
    for pair in query
        .split(|&b| b == b'&')
        .filter(|p| !p.is_empty())
        .take(MAX_ARGS)
    {
        let (key, value) = match pair.iter().position(|&b| b == b'=') {
            Some(eq) => (&pair[..eq], Some(&pair[eq + 1..])),
            None => (pair, None),
        };
        if *decoded(key, escape) == *name {
            last = Some(value);
        }
    }
    match (last, expected) {
        (None, _) => false,
        (Some(_), Expected::Present) => true,
        (Some(None), Expected::Equal(_)) => false,
        (Some(Some(value)), Expected::Equal(want)) => *decoded(value, escape) == **want,
    }
}

/// A query value (or name) as logged, unescaped: the log's escaping, then `%HH` and `+`.
fn decoded(raw: &[u8], escape: LogEscape) -> std::borrow::Cow<'_, [u8]> {
    if !raw.iter().any(|&b| matches!(b, b'%' | b'+' | b'\\')) {
        return std::borrow::Cow::Borrowed(raw);
    }
    std::borrow::Cow::Owned(crate::parse::query_value(raw, escape))
}

/// The path as APIcast matches it: NGINX's `$uri` (the request's path percent-decoded, runs of
/// `/` merged, `.` and `..` segments resolved) escaped again as `ngx_escape_uri` does (space, `#`,
/// `%`, `?`, control and non-ASCII bytes as `%HH`). A path with nothing to change is not copied.
pub(crate) fn apicast_path(logged: &[u8], escape: LogEscape) -> std::borrow::Cow<'_, [u8]> {
    let logged = &logged[..memchr::memchr(b'#', logged).unwrap_or(logged.len())];
    let plain = logged.first() == Some(&b'/')
        && logged.windows(2).all(|w| w != b"//" && w != b"/.")
        && !logged
            .iter()
            .any(|&b| b == b'%' || b == b'\\' || needs_escape(b));
    if plain {
        return std::borrow::Cow::Borrowed(logged);
    }
    let unlogged = crate::parse::logged_value(logged, escape);
    // An absolute URI in the request line (`GET http://host/path`): NGINX's `$uri` is its path.
    let path = match unlogged.iter().position(|&b| b == b'/') {
        Some(at) if at > 0 && unlogged[..at].ends_with(b":") => {
            let after_host = unlogged[at..]
                .strip_prefix(b"//")
                .unwrap_or(&unlogged[at..]);
            match after_host.iter().position(|&b| b == b'/') {
                Some(slash) => &after_host[slash..],
                None => b"/",
            }
        }
        _ => &unlogged[..],
    };
    let decoded = percent_decode(path);
    // Segments, runs of `/` merged, `.` dropped and `..` taking one back, as NGINX resolves them.
    let mut segments: Vec<&[u8]> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded.split(|&b| b == b'/').skip(1) {
        trailing_slash = matches!(segment, b"" | b"." | b"..");
        match segment {
            b"" | b"." => {}
            b".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = Vec::with_capacity(decoded.len() + 8);
    for segment in &segments {
        out.push(b'/');
        for &b in *segment {
            if needs_escape(b) {
                out.extend_from_slice(format!("%{b:02X}").as_bytes());
            } else {
                out.push(b);
            }
        }
    }
    if trailing_slash || out.is_empty() {
        out.push(b'/');
    }
    std::borrow::Cow::Owned(out)
}

/// The bytes `ngx_escape_uri` escapes in a URI (its `NGX_ESCAPE_URI` table).
fn needs_escape(b: u8) -> bool {
    matches!(b, 0..=0x20 | b'#' | b'%' | b'?' | 0x7f..=0xff)
}

fn percent_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if s[i] == b'%' {
            if let (Some(h), Some(l)) = (
                s.get(i + 1).and_then(|&c| hex(c)),
                s.get(i + 2).and_then(|&c| hex(c)),
            ) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::{Credential, LOGGED_HEADERS};

    fn rule(method: &str, pattern: &str, metric: &str, delta: u64, last: bool) -> MappingRule {
        MappingRule {
            method: method.into(),
            pattern: pattern.into(),
            metric: metric.into(),
            delta,
            last,
        }
    }

    fn compiled(rules: &[MappingRule]) -> (MappingRules, MetricNames) {
        let names: Vec<&str> = rules.iter().map(|r| r.metric.as_str()).collect();
        let metrics = MetricNames::new(&names);
        (MappingRules::compile(rules, &metrics).unwrap(), metrics)
    }

    /// The usage of `method target` as (metric, delta) sorted, or the skip.
    fn usage_of(
        rules: &(MappingRules, MetricNames),
        method: &str,
        target: &str,
    ) -> Result<Vec<(String, u64)>, Skip> {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let request = Request {
            timestamp: 0,
            method: (!method.is_empty()).then_some(method.as_bytes()),
            path: Some(path.as_bytes()),
            query: Some(query.as_bytes()),
            host: None,
            headers: [None; LOGGED_HEADERS],
            status: 200,
            credential: Credential::user_key(b"k"),
        };
        let usage = rules.0.usage(&request, LogEscape::Default)?;
        let mut list: Vec<(String, u64)> = usage
            .iter()
            .map(|(m, d)| (rules.1.get(m).name.to_string(), d))
            .collect();
        list.sort();
        Ok(list)
    }

    fn of(pairs: &[(&str, u64)]) -> Result<Vec<(String, u64)>, Skip> {
        let mut list: Vec<(String, u64)> = pairs.iter().map(|(m, d)| (m.to_string(), *d)).collect();
        list.sort();
        Ok(list)
    }

    #[test]
    fn apicast_semantics_order_last_anchors_and_methods() {
        let rules = compiled(&[
            rule("GET", "/products/{id}", "get_product", 1, false),
            rule("GET", "/products/{id}/reviews$", "reviews", 1, true),
            rule("ANY", "/", "hits", 1, false),
            rule("POST", "/products", "hits", 2, false),
        ]);
        for (method, target, expected) in [
            (
                "GET",
                "/products/42",
                of(&[("get_product", 1), ("hits", 1)]),
            ),
            // Prefix match, then `last` stops before the catch-all.
            (
                "GET",
                "/products/42/reviews",
                of(&[("get_product", 1), ("reviews", 1)]),
            ),
            (
                "GET",
                "/products/42/reviews/7",
                of(&[("get_product", 1), ("hits", 1)]),
            ),
            // `{id}` needs at least one character, and does not cross a `/`.
            ("GET", "/products/", of(&[("hits", 1)])),
            // NGINX merges the slashes: `reviews` is the id.
            (
                "GET",
                "/products//reviews",
                of(&[("get_product", 1), ("hits", 1)]),
            ),
            // Two rules on one metric add up; a method must be the rule's (or ANY).
            ("POST", "/products/42", of(&[("hits", 3)])),
            ("DELETE", "/products/42", of(&[("hits", 1)])),
            // A format without the method: only ANY rules.
            ("", "/products/42", of(&[("hits", 1)])),
        ] {
            assert_eq!(
                usage_of(&rules, method, target),
                expected,
                "{method} {target}"
            );
        }
        let rules = compiled(&[rule("GET", "/v1.0/items", "items", 1, false)]);
        assert_eq!(
            usage_of(&rules, "GET", "/v1x0/items"),
            Err(Skip::NoMappingRule)
        );
        assert_eq!(
            usage_of(&rules, "GET", "/v1.0/items?x=1"),
            of(&[("items", 1)])
        );
        assert_eq!(
            usage_of(&rules, "GET", "/v1.0/item"),
            Err(Skip::NoMappingRule)
        );
    }

    #[test]
    fn paths_are_matched_as_apicast_sees_them() {
        let rules = compiled(&[
            rule("GET", "/foo/100%25/bar$", "percent", 1, false),
            rule("GET", "/a%20b$", "space", 1, false),
            rule("GET", "/caf%C3%A9$", "cafe", 1, false),
            rule("GET", "/x//y$", "merged", 1, false),
            rule("GET", "/users/{email}/items$", "email", 1, false),
            rule("GET", "/say-hello+$", "plus", 1, false),
        ]);
        for (target, expected) in [
            ("/foo/100%25/bar", of(&[("percent", 1)])),
            ("/foo/100%2525/bar", Err(Skip::NoMappingRule)),
            ("/a%20b", of(&[("space", 1)])),
            (r"/a\x20b", of(&[("space", 1)])),
            ("/caf%c3%a9", of(&[("cafe", 1)])),
            (r"/caf\xC3\xA9", of(&[("cafe", 1)])),
            ("/x/y", of(&[("merged", 1)])),
            ("//x///y", of(&[("merged", 1)])),
            ("/x/./z/../y", of(&[("merged", 1)])),
            ("/users/me@example.com/items", of(&[("email", 1)])),
            ("/users/a%2Fb/items", Err(Skip::NoMappingRule)),
            // `+` is a regular expression's, as in APIcast.
            ("/say-hellooo", of(&[("plus", 1)])),
            ("/say-hello+", Err(Skip::NoMappingRule)),
            ("http://api.example.com/x/y", of(&[("merged", 1)])),
        ] {
            assert_eq!(usage_of(&rules, "GET", target), expected, "{target}");
        }
        assert_eq!(&*apicast_path(b"/a/b/..", LogEscape::Default), b"/a/");
        assert_eq!(&*apicast_path(b"/a/b/.", LogEscape::Default), b"/a/b/");
        assert_eq!(&*apicast_path(b"/../..", LogEscape::Default), b"/");
        assert_eq!(&*apicast_path(b"/a?b#c", LogEscape::Default), b"/a%3Fb");
        assert_eq!(&*apicast_path(b"/a%23b", LogEscape::Default), b"/a%23b");
    }

    #[test]
    fn query_parameters_of_a_pattern() {
        let rules = compiled(&[rule("GET", "/search?q={term}&lang=en", "search", 1, false)]);
        for (target, matches) in [
            ("/search?q=x&lang=en", true),
            ("/search?lang=en&q=x&page=2", true),
            ("/search/more?q=x&lang=en", true),
            ("/search?lang=en", false),
            ("/search?q=&lang=en", true),
            ("/search?q&lang=en", true),
            ("/search?q=x&lang=fr", false),
            ("/search?q=x&lang=fr&lang=en", true),
            ("/search?q=x&lang=en&lang=fr", false),
            ("/search?q=x&lang=e%6E", true),
            ("/search?q=x&la%6Eg=en", true),
            ("/search?q=x&lang", false),
            ("/search", false),
        ] {
            let expected = if matches {
                of(&[("search", 1)])
            } else {
                Err(Skip::NoMappingRule)
            };
            assert_eq!(usage_of(&rules, "GET", target), expected, "{target}");
        }
    }

    #[test]
    fn no_rules_is_one_hit_and_bad_rules_are_refused() {
        let (none, metrics) = compiled(&[]);
        assert!(none.is_empty());
        let request = Request {
            timestamp: 0,
            method: None,
            path: None,
            query: None,
            host: None,
            headers: [None; LOGGED_HEADERS],
            status: 200,
            credential: Credential::user_key(b"k"),
        };
        assert_eq!(none.usage(&request, LogEscape::Default), Ok(ONE_HIT));
        for (bad, says) in [
            (rule("FETCH!", "/", "hits", 1, false), "not an HTTP method"),
            (rule("", "/", "hits", 1, false), "method is empty"),
            (
                rule("GET", "products", "hits", 1, false),
                "does not start with `/`",
            ),
            (
                rule("GET", "/a(", "hits", 1, false),
                "not one APIcast can match",
            ),
            (rule("GET", "/", "nope", 1, false), "metric `nope`"),
        ] {
            let (at, e) =
                MappingRules::compile(&[rule("GET", "/", "hits", 1, false), bad], &metrics)
                    .unwrap_err();
            assert_eq!(at, 1);
            assert!(e.contains(says), "{e}");
        }
        // More metrics than a transaction holds, all matching: counted, not cut short.
        let many: Vec<MappingRule> = (0..9)
            .map(|i| rule("ANY", "/", &format!("m{i}"), 1, false))
            .collect();
        assert_eq!(
            usage_of(&compiled(&many), "GET", "/"),
            Err(Skip::TooManyMetrics)
        );
    }

    #[test]
    fn hosts_are_compared_as_apicast_does() {
        assert_eq!(host_name("API.Example.com:8443"), "api.example.com");
        assert_eq!(host_name("[::1]:8080"), "[::1]");
        assert_eq!(host_name("::1"), "::1");
        assert_eq!(host_name("api.example.com:"), "api.example.com:");
        let all = std::sync::Arc::new(vec!["a.example".to_string(), "b.example".to_string()]);
        let counting = HostRoute {
            hosts: vec!["a.example".into()],
            all_hosts: Some(all),
            path_routing: None,
        };
        let other = HostRoute {
            hosts: vec!["b.example".into()],
            all_hosts: None,
            path_routing: None,
        };
        assert_eq!(counting.owner(Some(b"A.example:80")), Owner::This);
        assert_eq!(counting.owner(Some(b"b.example")), Owner::Other);
        assert_eq!(counting.owner(Some(b"c.example")), Owner::Nobody);
        assert_eq!(counting.owner(None), Owner::Nobody);
        assert_eq!(other.owner(Some(b"c.example")), Owner::Other);
        assert_eq!(other.owner(Some(b"b.example")), Owner::This);
    }

    /// APIcast's path routing: of the services of a Host, the first whose rules match the request's
    /// method and path, else the first; every service chooses the same one for every line, its own
    /// credential readable or not.
    #[test]
    fn path_routing_chooses_the_same_service_from_every_service() {
        use crate::parse::testing::{headers, nginx};
        use crate::parse::{CredentialMode, CredentialRule};
        let format = "$host [$time_local] \"$request\" $status $http_x_app_id";
        let rule = |pattern: &str| MappingRule {
            method: "GET".into(),
            pattern: pattern.into(),
            metric: "hits".into(),
            delta: 1,
            last: false,
        };
        // A: user_key in the query, GET /a; B: app_id in a header, GET /b (both api.example);
        // C: other.example, no rules.
        let services: [(CredentialRule, Vec<MappingRule>, &[&str]); 3] = [
            (
                CredentialRule::query(CredentialMode::UserKey),
                vec![rule("/a")],
                &["api.example"],
            ),
            (
                headers(CredentialMode::AppId),
                vec![rule("/b")],
                &["api.example"],
            ),
            (
                CredentialRule::query(CredentialMode::UserKey),
                vec![],
                &["other.example"],
            ),
        ];
        let mut by_host: HashMap<String, Vec<(usize, MappingRules)>> = HashMap::new();
        let mut parsers = Vec::new();
        for (place, (credentials, rules, hosts)) in services.iter().enumerate() {
            for host in *hosts {
                by_host
                    .entry(host.to_string())
                    .or_default()
                    .push((place, MappingRules::on_their_own(rules).unwrap()));
            }
            parsers.push(nginx(format, LogEscape::Default, credentials.clone()));
        }
        let by_host = std::sync::Arc::new(by_host);
        let mut routes: Vec<(crate::parse::Parser, HostRoute)> = (0..3)
            .map(|me| {
                let route = HostRoute {
                    hosts: services[me].2.iter().map(|h| h.to_string()).collect(),
                    all_hosts: (me == 0).then(|| {
                        std::sync::Arc::new(vec!["api.example".into(), "other.example".into()])
                    }),
                    path_routing: Some(PathRouting {
                        me,
                        by_host: by_host.clone(),
                        reader: parsers[me].without_credentials(),
                    }),
                };
                (parsers[me].clone(), route)
            })
            .collect();
        let line = |host: &str, target: &str, app: &str| {
            format!("{host} [26/Nov/2026:10:00:00 +0000] \"GET {target} HTTP/1.1\" 200 {app}")
        };
        for (line, owner) in [
            (line("api.example", "/a?user_key=k", "-"), Some(0)),
            (line("API.example:443", "/b", "app"), Some(1)),
            // No rule matches: the first service of the Host.
            (line("api.example", "/c?user_key=k", "-"), Some(0)),
            // B's path, A's kind of credential: B's (which cannot read it).
            (line("api.example", "/b?user_key=k", "-"), Some(1)),
            // No credential any service can read: by its path still.
            (line("api.example", "/b", "-"), Some(1)),
            // Query parameters play no part in choosing (APIcast passes none to the matcher).
            (line("api.example", "/c?user_key=k&x=/b", "-"), Some(0)),
            (line("other.example", "/x?user_key=k", "-"), Some(2)),
            (line("unknown.example", "/a?user_key=k", "-"), None),
        ] {
            let owners: Vec<Owner> = routes
                .iter_mut()
                .map(|(parser, route)| {
                    let escape = parser.escape();
                    let host = parser.host_of(line.as_bytes());
                    match parser.parse_record(line.as_bytes()) {
                        Ok(Some(request)) => route.owner_of_request(&request, escape),
                        _ => route.owner_of_line(host, line.as_bytes()),
                    }
                })
                .collect();
            let expected: Vec<Owner> = (0..3)
                .map(|place| match owner {
                    Some(o) if o == place => Owner::This,
                    None if place == 0 => Owner::Nobody,
                    _ => Owner::Other,
                })
                .collect();
            assert_eq!(owners, expected, "{line}");
        }
    }

    /// An independent reference: APIcast's steps written plainly, on paths without escapes.
    fn reference(rules: &[MappingRule], method: &str, path: &str) -> Option<Vec<(String, u64)>> {
        // NGINX merges slashes; pattern literals are compared as they are.
        let mut merged = String::new();
        for c in path.chars() {
            if !(c == '/' && merged.ends_with('/')) {
                merged.push(c);
            }
        }
        let mut sums: Vec<(String, u64)> = Vec::new();
        let mut matched = false;
        for r in rules {
            if r.method != "ANY" && r.method != method {
                continue;
            }
            let (pattern, anchored) = match r.pattern.strip_suffix('$') {
                Some(p) => (p, true),
                None => (r.pattern.as_str(), false),
            };
            // Pattern parts are literal segments or `{x}` (one or more non-`/` characters of the
            // class: the generated paths use only letters and digits).
            let parts: Vec<&str> = pattern.split('/').skip(1).collect();
            let segments: Vec<&str> = merged.split('/').skip(1).collect();
            let fits = |i: usize, part: &str| {
                let seg = segments.get(i).copied();
                let last_part = i + 1 == parts.len();
                match seg {
                    None => false,
                    Some(seg) if part.starts_with('{') => !seg.is_empty(),
                    // The last part of an unanchored pattern is a prefix of its segment.
                    Some(seg) if last_part && !anchored => seg.starts_with(part),
                    Some(seg) => seg == part,
                }
            };
            let ok = parts.iter().enumerate().all(|(i, p)| fits(i, p))
                && (!anchored || segments.len() == parts.len());
            if !ok {
                continue;
            }
            matched = true;
            match sums.iter_mut().find(|(m, _)| *m == r.metric) {
                Some((_, d)) => *d += r.delta,
                None => sums.push((r.metric.clone(), r.delta)),
            }
            if r.last {
                break;
            }
        }
        sums.sort();
        matched.then_some(sums)
    }

    proptest::proptest! {
        /// Generated rules and requests: the usage is the reference's.
        #[test]
        fn generated_rules_match_as_the_reference_says(
            rules in proptest::collection::vec(
                (
                    proptest::sample::select(vec!["GET", "POST", "ANY"]),
                    proptest::collection::vec(proptest::sample::select(vec!["a", "b", "ab", "{x}", "{y}"]), 1..4),
                    proptest::prelude::any::<bool>(),
                    proptest::sample::select(vec!["m1", "m2", "m3"]),
                    1u64..4,
                    proptest::prelude::any::<bool>(),
                ),
                1..6,
            ),
            method in proptest::sample::select(vec!["GET", "POST"]),
            segments in proptest::collection::vec(proptest::sample::select(vec!["a", "b", "ab", "abc", "", "7"]), 0..5),
        ) {
            let rules: Vec<MappingRule> = rules
                .into_iter()
                .map(|(m, parts, anchored, metric, delta, last)| {
                    let pattern = format!("/{}{}", parts.join("/"), if anchored { "$" } else { "" });
                    rule(m, &pattern, metric, delta, last)
                })
                .collect();
            let path = format!("/{}", segments.join("/"));
            let got = usage_of(&compiled(&rules), method, &path).ok();
            proptest::prop_assert_eq!(got, reference(&rules, method, &path), "{:?} {}", rules, path);
        }
    }
}

#[cfg(test)]
mod nginx_uri {
    use super::*;

    /// APIcast: `re_match(expected, '\{[-\w_]+\}')`, unanchored, at least one character.
    #[test]
    fn query_placeholders_as_apicast_tells_them() {
        assert!(
            !is_placeholder("{}x"),
            "`{{}}x` has no placeholder in APIcast: it is a literal"
        );
        assert!(
            is_placeholder("v{id}"),
            "APIcast finds `{{id}}` anywhere in the value"
        );
    }

    /// NGINX's $uri ends at a `#` (the fragment is not part of it).
    #[test]
    fn a_fragment_is_not_part_of_the_uri() {
        assert_eq!(&*apicast_path(b"/a#frag", LogEscape::Default), b"/a");
    }
}
