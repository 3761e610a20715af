//! `tally parse`: each line of a source's log as tally reads it (what it extracts and what it would
//! report) or why it is skipped (where parsing stopped and what was expected there). The tool for
//! getting a format right; nothing is reported and no state is read or written.

use std::io::{self, BufRead, BufReader, Write};
use std::path::PathBuf;

use crate::aggregate::MAX_CREDENTIAL_BYTES;
use crate::config::Config;
use crate::mapping::{apicast_path, host_name, HostRoute, MappingRules, Owner};
use crate::parse::{rfc3339, Failure, Parser, Request, Skip, Wrapper};
use crate::telemetry::{mask, masked_line, printable, shown_path};
use crate::usage::{MetricNames, Usage};

/// The lines `tally parse` reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExplainInput {
    /// The files the source's `path` names now, each from its start.
    SourceFiles,
    /// Standard input (`-`).
    Stdin,
    /// This file.
    File(PathBuf),
}

/// What `tally parse` was asked.
#[derive(Debug, Clone)]
pub struct ExplainOptions {
    /// The index of the `[[sources]]` entry whose format and credentials settings apply.
    pub source: usize,
    /// Where the lines come from.
    pub input: ExplainInput,
    /// One JSON object per line (and the summary last) instead of text.
    pub json: bool,
}

/// Why `tally parse` stopped.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// `--source` names no `[[sources]]` entry: a configuration error.
    #[error("--source {given}: the configuration has {count} source(s): 0 to {}", count.saturating_sub(1))]
    NoSuchSource {
        /// The index given.
        given: usize,
        /// How many sources there are.
        count: usize,
    },
    /// The lines could not be read (a file, standard input, or no file matches the source's path).
    #[error("{0}")]
    Unreadable(String),
    /// The output could not be written (a closed pipe).
    #[error("cannot write the output: {0}")]
    Output(#[source] io::Error),
}

/// Reads the lines `options` names with the parser of the source it names, and writes to `out` one
/// line (or JSON object) per log line; the summary goes to `err` as text, or last to `out` in JSON.
pub fn explain(
    config: &Config,
    options: &ExplainOptions,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), ExplainError> {
    // By its place among the [[sources]] entries (a source routed by Host: its first service's
    // settings).
    let source = config
        .entries()
        .nth(options.source)
        .ok_or(ExplainError::NoSuchSource {
            given: options.source,
            count: config.entries().count(),
        })?;
    // A source routed by Host: each of its services, the line going to the one of its Host.
    let services = config
        .sources
        .iter()
        .filter(|s| s.index == source.index)
        .map(|s| {
            let metrics = config.metrics_of(&s.service_id);
            let rules = MappingRules::compile(&s.mapping_rules, &metrics)
                .map_err(|(at, e)| ExplainError::Unreadable(format!("mapping_rules[{at}]: {e}")))?;
            Ok(Service {
                id: s.service_id.clone(),
                parser: s.parser(config.tail.max_line_length),
                rules,
                metrics,
                route: s.route.as_ref().map(|r| r.hosts.clone()),
            })
        })
        .collect::<Result<Vec<_>, ExplainError>>()?;
    let mut lines = Lines {
        services,
        current: 0,
        max_line_length: config.tail.max_line_length,
        response_codes: config.report.response_codes,
        json: options.json,
        summary: Summary::default(),
        out,
    };
    match &options.input {
        ExplainInput::Stdin => lines.read(&mut io::stdin().lock(), "-", false)?,
        ExplainInput::File(path) => {
            let file = std::fs::File::open(path).map_err(|e| unreadable(&shown_path(path), e))?;
            lines.read(&mut BufReader::new(file), &shown_path(path), false)?;
        }
        ExplainInput::SourceFiles => {
            let mut files: Vec<PathBuf> = crate::tail::matching_files(&source.path)
                .into_keys()
                .collect();
            if files.is_empty() {
                return Err(ExplainError::Unreadable(format!(
                    "sources[{}].path: no file matches {}",
                    options.source,
                    printable(&source.path)
                )));
            }
            files.sort();
            for path in files {
                let name = shown_path(&path);
                let file = std::fs::File::open(&path).map_err(|e| unreadable(&name, e))?;
                lines.read(&mut BufReader::new(file), &name, true)?;
            }
        }
    }
    let Lines { summary, out, .. } = lines;
    if options.json {
        writeln!(out, "{}", summary.json()).map_err(ExplainError::Output)?;
    } else {
        writeln!(err, "{}", summary.text()).map_err(ExplainError::Output)?;
    }
    out.flush().map_err(ExplainError::Output)
}

fn unreadable(name: &str, e: io::Error) -> ExplainError {
    ExplainError::Unreadable(format!("cannot read {name}: {e}"))
}

/// Counts, as tally's own summary names them.
#[derive(Debug, Default)]
struct Summary {
    lines_read: u64,
    reported: u64,
    skipped: [u64; Skip::ALL.len()],
}

impl Summary {
    fn text(&self) -> String {
        let mut text = format!(
            "summary: lines_read={} reported={}",
            self.lines_read, self.reported
        );
        for skip in Skip::ALL {
            text.push_str(&format!(
                " skipped_{}={}",
                skip.reason(),
                self.skipped[skip as usize]
            ));
        }
        text
    }

    fn json(&self) -> serde_json::Value {
        let skipped: serde_json::Map<String, serde_json::Value> = Skip::ALL
            .iter()
            .map(|&s| (s.reason().to_string(), self.skipped[s as usize].into()))
            .collect();
        serde_json::json!({
            "summary": {
                "lines_read": self.lines_read,
                "reported": self.reported,
                "skipped": skipped,
            }
        })
    }
}

/// A service a source's lines go to, with how it reads them.
struct Service {
    id: String,
    parser: Parser,
    rules: MappingRules,
    metrics: MetricNames,
    /// Routed by Host: the lines it takes.
    route: Option<HostRoute>,
}

struct Lines<'w> {
    services: Vec<Service>,
    /// The service of the line being read.
    current: usize,
    max_line_length: usize,
    response_codes: bool,
    json: bool,
    summary: Summary,
    out: &'w mut dyn Write,
}

impl Lines<'_> {
    fn service(&self) -> &Service {
        &self.services[self.current]
    }

    fn parser_mut(&mut self) -> &mut Parser {
        &mut self.services[self.current].parser
    }

    /// Chooses the service of `line` (routed by Host: the one of its Host, or with path routing
    /// the one its request goes to; a line whose Host cannot be read is explained with the first's
    /// settings), or says no service has its Host.
    fn route(&mut self, line: &[u8]) -> Result<(), Failure> {
        self.current = 0;
        let Some(first) = self.services.first() else {
            return Ok(());
        };
        let Some(route) = &first.route else {
            return Ok(());
        };
        let Some(host) = first.parser.host_of(line) else {
            return Ok(());
        };
        let known = route
            .all_hosts
            .as_deref()
            .map(|h| h.join(", "))
            .unwrap_or_default();
        for (i, service) in self.services.iter_mut().enumerate() {
            if let Some(route) = &mut service.route {
                if route.owner_of_line(Some(host), line) == Owner::This {
                    self.current = i;
                    return Ok(());
                }
            }
        }
        Err(Failure {
            skip: Skip::UnknownHost,
            at: None,
            expected: format!(
                "a Host of the proxy configuration's services ({known}), not `{}`",
                printable(&host_name(&String::from_utf8_lossy(host)))
            ),
        })
    }

    /// Every line of `input`; `header`: name the file first (a source's path may name several).
    fn read(
        &mut self,
        input: &mut dyn BufRead,
        name: &str,
        header: bool,
    ) -> Result<(), ExplainError> {
        if header && !self.json {
            writeln!(self.out, "==> {name} <==").map_err(ExplainError::Output)?;
        }
        // Room for the line and a `\r`: longer is too long whatever follows.
        let cap = self.max_line_length.saturating_add(1);
        let mut buf = Vec::new();
        let mut number = 0u64;
        while let Some(cut) = next_line(input, &mut buf, cap).map_err(|e| unreadable(name, e))? {
            number += 1;
            let line = buf.strip_suffix(b"\r").unwrap_or(&buf);
            // As the aggregation does: an empty line is no request, and not counted.
            if line.is_empty() {
                continue;
            }
            let routed = self.route(line);
            // A container's record: its line, once its last part is there.
            let unwrapped = match self.parser_mut().unwrap(line) {
                Ok(None) => continue,
                Ok(Some(unwrapped)) => Ok(unwrapped),
                Err(skip) => Err(Failure {
                    skip,
                    at: None,
                    expected: match self.service().parser.container().map(|c| c.wrapper) {
                        Some(Wrapper::Cri) => "a CRI record: `<time> <stdout|stderr> <P|F> <line>`, whole lines within tail.max_line_length".into(),
                        _ => "a Docker json-file record: `{\"log\":\"<line>\\n\",\"stream\":\"stdout\",…}`, whole lines within tail.max_line_length".into(),
                    },
                }),
            };
            self.summary.lines_read += 1;
            let result = if cut || line.len() > self.max_line_length {
                Err(Failure {
                    skip: Skip::TooLong,
                    at: Some(self.max_line_length),
                    expected: format!(
                        "the end of the line within tail.max_line_length ({} bytes)",
                        self.max_line_length
                    ),
                })
            } else if let Err(failure) = routed {
                Err(failure)
            } else {
                match &unwrapped {
                    Ok(unwrapped) => self
                        .parser_mut()
                        .explain(unwrapped)
                        .and_then(reportable)
                        .and_then(|(request, credential)| {
                            let usage = self.usage(&request)?;
                            Ok((request, credential, usage))
                        }),
                    Err(failure) => Err(failure.clone()),
                }
            };
            let shown = match result {
                Ok((request, credential, usage)) => {
                    self.summary.reported += 1;
                    self.reported(name, number, &request, &credential, &usage)
                }
                Err(failure) => {
                    self.summary.skipped[failure.skip as usize] += 1;
                    // A too-long line is not shown: only part of it was read.
                    let shown = unwrapped.as_deref().unwrap_or(line);
                    let excerpt = (failure.skip != Skip::TooLong)
                        .then(|| masked_line(&self.service().parser.hide_secrets(shown, mask)));
                    self.skipped(name, number, &failure, excerpt)
                }
            };
            writeln!(self.out, "{shown}").map_err(ExplainError::Output)?;
        }
        Ok(())
    }

    /// The usage the source's mapping rules give the request, or why none.
    fn usage(&self, request: &Request<'_>) -> Result<Usage, Failure> {
        let service = self.service();
        service
            .rules
            .usage(request, service.parser.escape())
            .map_err(|skip| Failure {
                skip,
                at: None,
                expected: match skip {
                    Skip::NoMappingRule => format!(
                        "a mapping rule that matches {} {}",
                        request
                            .method
                            .map_or("(no method)".into(), |m| String::from_utf8_lossy(m)
                                .into_owned()),
                        String::from_utf8_lossy(&apicast_path(
                            request.path.unwrap_or(b"/"),
                            service.parser.escape()
                        )),
                    ),
                    _ => "at most 8 metrics from the rules that match".into(),
                },
            })
    }

    fn reported(
        &self,
        file: &str,
        number: u64,
        r: &Request<'_>,
        credential: &str,
        usage: &Usage,
    ) -> String {
        let kind = r.credential.kind.name();
        let code = (self.response_codes && (100..=599).contains(&r.status)).then_some(r.status);
        let text =
            |v: Option<&[u8]>| v.map(|v| printable(&String::from_utf8_lossy(v)).into_owned());
        let (method, path, host) = (text(r.method), text(r.path), text(r.host));
        let time = rfc3339(r.timestamp);
        let masked = mask(credential);
        let named: Vec<(&str, u64)> = usage
            .iter()
            .map(|(metric, delta)| (&*self.service().metrics.get(metric).name, delta))
            .collect();
        if self.json {
            let usage_json: serde_json::Map<String, serde_json::Value> = named
                .iter()
                .map(|(name, delta)| (name.to_string(), (*delta).into()))
                .collect();
            return serde_json::json!({
                "file": file,
                "line": number,
                "time": r.timestamp,
                "time_rfc3339": time,
                "method": method,
                "path": path,
                "status": r.status,
                "host": host,
                "service_id": self.service().id,
                "credential": { "kind": kind, "masked": masked },
                "report": { "usage": usage_json, "code": code },
            })
            .to_string();
        }
        let dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        let code = code.map_or("without code".to_string(), |c| format!("code={c}"));
        let usage: Vec<String> = named
            .iter()
            .map(|(name, delta)| format!("{}={delta}", printable(name)))
            .collect();
        format!(
            "{number}: {time} {} {} {:03} host={} {kind}={masked} → report to service {}: usage {} {code}",
            dash(method),
            dash(path),
            r.status,
            dash(host),
            printable(&self.service().id),
            usage.join(" "),
        )
    }

    fn skipped(
        &self,
        file: &str,
        number: u64,
        failure: &Failure,
        excerpt: Option<String>,
    ) -> String {
        let reason = failure.skip.reason();
        if self.json {
            return serde_json::json!({
                "file": file,
                "line": number,
                "skipped": reason,
                "at": failure.at,
                "expected": failure.expected,
                "excerpt": excerpt,
            })
            .to_string();
        }
        let at = failure
            .at
            .map_or(String::new(), |at| format!("at byte {at}: "));
        let excerpt = excerpt.map_or(String::new(), |e| format!("; line: {e}"));
        format!(
            "{number}: skipped ({reason}): {at}expected {}{excerpt}",
            failure.expected
        )
    }
}

/// A credential is reported only if it fits in a call, as the aggregation checks.
fn reportable<'a>(
    (request, credential): (Request<'a>, String),
) -> Result<(Request<'a>, String), Failure> {
    let encoded: usize = form_urlencoded::byte_serialize(credential.as_bytes())
        .map(str::len)
        .sum();
    if encoded > MAX_CREDENTIAL_BYTES {
        return Err(Failure {
            skip: Skip::InvalidCredential,
            at: None,
            expected: format!("a credential of at most {MAX_CREDENTIAL_BYTES} bytes once encoded"),
        });
    }
    Ok((request, credential))
}

/// Reads the next line into `buf` without its `\n`, keeping at most `cap` bytes of it: the rest of
/// a longer line is read and dropped, so that one huge line cannot take the memory. None at the
/// end; else whether the line was cut.
fn next_line(input: &mut dyn BufRead, buf: &mut Vec<u8>, cap: usize) -> io::Result<Option<bool>> {
    buf.clear();
    let (mut any, mut cut) = (false, false);
    loop {
        let chunk = match input.fill_buf() {
            Ok(chunk) => chunk,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            return Ok(any.then_some(cut));
        }
        any = true;
        let (end, newline) = match memchr::memchr(b'\n', chunk) {
            Some(i) => (i, true),
            None => (chunk.len(), false),
        };
        let room = cap.saturating_sub(buf.len());
        cut |= end > room;
        buf.extend_from_slice(&chunk[..end.min(room)]);
        input.consume(end + usize::from(newline));
        if newline {
            return Ok(Some(cut));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_in_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_515_300), "2026-11-24T10:15:00Z");
        assert_eq!(rfc3339(1_709_208_000), "2024-02-29T12:00:00Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn long_lines_are_cut_and_the_rest_dropped() {
        let text = b"short\r\n0123456789abcdef\nlast";
        let mut input = &text[..];
        let mut buf = Vec::new();
        let mut got = Vec::new();
        while let Some(cut) = next_line(&mut input, &mut buf, 8).unwrap() {
            got.push((String::from_utf8_lossy(&buf).into_owned(), cut));
        }
        assert_eq!(
            got,
            vec![
                ("short\r".to_string(), false),
                ("01234567".to_string(), true),
                ("last".to_string(), false),
            ]
        );
        // Through a reader that hands the bytes over a few at a time.
        let mut small = BufReader::with_capacity(3, &text[..]);
        assert_eq!(next_line(&mut small, &mut buf, 8).unwrap(), Some(false));
        assert_eq!(next_line(&mut small, &mut buf, 8).unwrap(), Some(true));
        assert_eq!(buf, b"01234567");
    }
}
