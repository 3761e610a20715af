//! An NGINX `log_format`, compiled once at start into a byte scanner: the literal text between
//! variables is matched exactly, and each variable's value runs to the next literal. No regex, no
//! allocation per line.

use serde::{Deserialize, Serialize};

/// How NGINX escaped the values (its `log_format … escape=` parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum LogEscape {
    /// `"`, `\` and bytes outside printable ASCII as `\xHH`.
    #[default]
    Default,
    /// JSON string escapes (`\"`, `\\`, `\u00HH`).
    Json,
    /// Values as they are.
    None,
}

/// What a variable is to tally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Variable {
    /// `$time_local`: `25/Nov/2026:18:41:03 +0100`.
    TimeLocal,
    /// `$time_iso8601`: `2026-11-25T18:41:03+01:00`.
    TimeIso8601,
    /// `$msec`: epoch seconds with milliseconds.
    Msec,
    /// `$request`: method, URI and protocol.
    Request,
    /// `$request_method`.
    Method,
    /// `$request_uri`: path and query as the client sent them.
    RequestUri,
    /// `$uri`: the path, normalized, without the query.
    Uri,
    /// `$args` or `$query_string`.
    Args,
    /// `$status`.
    Status,
    /// `$host`, `$http_host` or `$server_name`: the lower, the better.
    Host(u8),
    /// `$http_<name>` that tally reads, by slot.
    Header(u8),
    /// `$arg_<name>` that tally reads, by slot.
    Arg(u8),
    /// Any other variable: its value is skipped.
    Other,
}

impl Variable {
    /// The width NGINX always writes the value at, if it has one.
    #[inline]
    fn width(self) -> Option<usize> {
        match self {
            Variable::TimeLocal => Some(26),
            Variable::Status => Some(3),
            _ => None,
        }
    }

    /// Where [`Values`] keeps its value among its fields; None: apart (a time, a host, which
    /// another variable may outrank) or nowhere.
    fn field(self) -> Option<u8> {
        match self {
            Variable::Request => Some(REQUEST),
            Variable::Method => Some(METHOD),
            Variable::RequestUri => Some(REQUEST_URI),
            Variable::Uri => Some(URI),
            Variable::Args => Some(ARGS),
            Variable::Status => Some(STATUS),
            Variable::Header(slot) => Some(HEADERS + slot),
            Variable::Arg(slot) => Some(ARG_VALUES + slot),
            Variable::TimeLocal
            | Variable::TimeIso8601
            | Variable::Msec
            | Variable::Host(_)
            | Variable::Other => None,
        }
    }
}

/// The most `$http_…` and `$arg_…` variables tally reads from one format (each).
pub(crate) const SLOTS: usize = 4;

/// The fields of [`Values`], by variable: stored by index, a line's values are kept without a
/// branch on each one's variable.
const REQUEST: u8 = 0;
const METHOD: u8 = 1;
const REQUEST_URI: u8 = 2;
const URI: u8 = 3;
const ARGS: u8 = 4;
const STATUS: u8 = 5;
const HEADERS: u8 = 6;
const ARG_VALUES: u8 = HEADERS + SLOTS as u8;
const FIELDS: usize = ARG_VALUES as usize + SLOTS;

/// A variable of a format and what follows it.
#[derive(Debug)]
struct Step {
    variable: Variable,
    /// Where [`Values`] keeps its value: [`Variable::field`].
    field: Option<u8>,
    /// Whether its value may be a secret (a request header, a query argument, a cookie): masked
    /// wherever tally shows a line.
    sensitive: bool,
    /// The literal text after it (empty: to the end of the line).
    literal: Literal,
    /// The width NGINX always writes its value at, if it has one: [`Variable::width`].
    width: Option<usize>,
}

/// Literal text of a format, ready to be found in lines.
#[derive(Debug)]
struct Literal {
    bytes: Box<[u8]>,
    /// Its first eight bytes as a little-endian word, and the mask of the bytes it has there:
    /// compared with a line in one go, where a loop over a few bytes is a branch on each.
    head: u64,
    mask: u64,
    /// Whether it starts with a quote that escape=json writes escaped (`\"`) inside a value.
    quote: bool,
}

/// A compiled `log_format`.
#[derive(Debug)]
pub(crate) struct Format {
    /// The literal text before the first variable.
    prefix: Box<[u8]>,
    steps: Box<[Step]>,
    /// Steps `a..b` are values tally does not use (the referer, the user agent…): a line is read
    /// forward up to them and backward from its end down to them, never through them.
    gap: (usize, usize),
    /// Whether it starts as NGINX's `main` and `combined` formats do, [`LEAD`]: those steps are
    /// read at once, see [`Format::lead`].
    lead: bool,
    /// The byte before each value read backward, when it is one and the same for all (a space,
    /// as in NGINX's formats): those values are read at once, see [`Format::tail`].
    separator: Option<u8>,
    pub(crate) escape: LogEscape,
    /// The names of the `$http_…` variables read, by slot (lower case, `_` for `-`).
    pub(crate) headers: Vec<String>,
    /// The names of the `$arg_…` variables read, by slot.
    pub(crate) args: Vec<String>,
}

/// The values of one line, as logged (still escaped); None: the format does not log it, or NGINX
/// logged `-` (no value).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Values<'a> {
    pub(crate) time: Option<(Variable, &'a [u8])>,
    /// The best host variable logged, with its rank.
    pub(crate) host: Option<(u8, &'a [u8])>,
    /// The others, by [`Variable::field`].
    fields: [Option<&'a [u8]>; FIELDS],
}

/// A value and where it starts in its line.
type Placed<'a> = (usize, &'a [u8]);

/// The time, the request and the status of a line's [`LEAD`].
type Lead<'a> = [Placed<'a>; 3];

/// What follows the values walked forward, with the values of a [`LEAD`] read at once; or where
/// the line stopped matching and the literal text expected there.
type Walked<'a, 's> = Result<(&'a [u8], Option<Lead<'a>>), (usize, &'s [u8])>;

/// Where a line stopped matching its format, for `tally parse` and the first malformed line's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mismatch {
    /// The byte offset in the line.
    pub(crate) at: usize,
    /// The literal text the format expects there.
    pub(crate) expected: String,
}

impl Format {
    /// Compiles `format` (the quoted parts of NGINX's `log_format` directive, concatenated). Of
    /// the `$http_…` and `$arg_…` variables, those named in `headers` and `args` are read (lower
    /// case, `_` for `-`); the others are skipped like any variable tally does not use.
    pub(crate) fn compile(
        format: &str,
        escape: LogEscape,
        headers: &[String],
        args: &[String],
    ) -> Result<Format, String> {
        let mut prefix = Vec::new();
        let mut steps: Vec<(Variable, Vec<u8>)> = Vec::new();
        let mut sensitive = Vec::new();
        let mut read_headers = Vec::new();
        let mut read_args = Vec::new();
        let bytes = format.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let name = match bytes[i] {
                b'$' => variable_name(&bytes[i + 1..]),
                _ => None,
            };
            let Some((name, len)) = name else {
                match steps.last_mut() {
                    Some((_, literal)) => literal.push(bytes[i]),
                    None => prefix.push(bytes[i]),
                }
                i += 1;
                continue;
            };
            i += 1 + len;
            if let Some((previous, literal)) = steps.last() {
                if literal.is_empty() {
                    return Err(format!(
                        "`${name}` follows `{}` with nothing between them: tally cannot tell where one ends; put a space or other text between them",
                        previous_name(format, steps.len())
                            .unwrap_or_else(|| format!("{previous:?}"))
                    ));
                }
            }
            let slot = |names: &mut Vec<String>, wanted: &[String], key: &str| {
                if !wanted.iter().any(|w| w == key) {
                    return Ok(None);
                }
                if let Some(at) = names.iter().position(|n| n == key) {
                    return Ok(Some(at as u8));
                }
                if names.len() == SLOTS {
                    return Err(format!("tally reads at most {SLOTS} of these variables"));
                }
                names.push(key.to_string());
                Ok(Some((names.len() - 1) as u8))
            };
            let variable = match name.as_str() {
                "time_local" => Variable::TimeLocal,
                "time_iso8601" => Variable::TimeIso8601,
                "msec" => Variable::Msec,
                "request" => Variable::Request,
                "request_method" => Variable::Method,
                "request_uri" => Variable::RequestUri,
                "uri" | "document_uri" => Variable::Uri,
                "args" | "query_string" => Variable::Args,
                "status" => Variable::Status,
                "host" => Variable::Host(0),
                "http_host" => Variable::Host(1),
                "server_name" => Variable::Host(2),
                _ => match (name.strip_prefix("http_"), name.strip_prefix("arg_")) {
                    (Some(header), _) => slot(&mut read_headers, headers, header)?
                        .map_or(Variable::Other, Variable::Header),
                    (_, Some(arg)) => {
                        slot(&mut read_args, args, arg)?.map_or(Variable::Other, Variable::Arg)
                    }
                    _ => Variable::Other,
                },
            };
            steps.push((variable, Vec::new()));
            let harmless = [
                "http_host",
                "http_referer",
                "http_user_agent",
                "http_x_forwarded_for",
            ];
            sensitive.push(
                ["http_", "arg_", "cookie_", "sent_http_"]
                    .iter()
                    .any(|p| name.starts_with(p))
                    && !harmless.contains(&name.as_str()),
            );
        }
        let has = |f: &dyn Fn(Variable) -> bool| steps.iter().any(|(v, _)| f(*v));
        if !has(&|v| {
            matches!(
                v,
                Variable::TimeLocal | Variable::TimeIso8601 | Variable::Msec
            )
        }) {
            return Err(
                "it logs no time tally can read: add $time_local, $time_iso8601 or $msec".into(),
            );
        }
        if !has(&|v| v == Variable::Status) {
            return Err("it logs no $status: add it".into());
        }
        let gap = widest_gap(&steps);
        let lead = prefix.is_empty()
            && steps.len() >= LEAD.len()
            && steps
                .iter()
                .zip(LEAD)
                .all(|((v, literal), (lead, text))| *v == lead && literal == text)
            // Its first two values are not given to those walking the steps: not secrets either.
            && !sensitive[0]
            && !sensitive[1];
        // The literals before the values read backward (the first value after the gap has one).
        let separator = match &steps[gap.1.saturating_sub(1)..steps.len().saturating_sub(1)] {
            [(_, first), others @ ..] => match **first {
                // A quote escape=json writes escaped inside a value is not where a value ends.
                [byte]
                    if !(byte == b'"' && escape == LogEscape::Json)
                        && others.iter().all(|(_, literal)| **literal == [byte]) =>
                {
                    Some(byte)
                }
                _ => None,
            },
            [] => None,
        };
        Ok(Format {
            gap,
            lead,
            separator,
            prefix: prefix.into(),
            steps: steps
                .into_iter()
                .zip(sensitive)
                .map(|((variable, literal), sensitive)| Step {
                    variable,
                    field: variable.field(),
                    sensitive,
                    literal: Literal::new(literal, escape),
                    width: variable.width(),
                })
                .collect(),
            escape,
            headers: read_headers,
            args: read_args,
        })
    }

    /// Whether the format logs a variable that `wanted` accepts.
    pub(crate) fn logs(&self, wanted: impl Fn(Variable) -> bool) -> bool {
        self.steps.iter().any(|s| wanted(s.variable))
    }

    /// Where `line` holds values that may be secrets, and where it stops matching the format (what
    /// follows is not known, so not shown either).
    pub(crate) fn secrets(&self, line: &[u8]) -> (Vec<std::ops::Range<usize>>, Option<usize>) {
        let mut spans = Vec::new();
        // A lead's values (a time, a request, a status) are no secrets.
        let walked = self.forward(line, self.steps.len(), |step, start, value| {
            if step.sensitive && value != b"-" {
                spans.push(start..start + value.len());
            }
        });
        (spans, walked.err().map(|(at, _)| at))
    }

    /// The values of `line`, or where it stopped matching, reading it from its start to its end
    /// (the slow path of `tally parse`: the first place that goes wrong is the one to show).
    pub(crate) fn scan<'a>(&self, line: &'a [u8]) -> Result<Values<'a>, Mismatch> {
        let mut values = Values::default();
        self.forward(line, self.steps.len(), |step, _, value| {
            values.record(step, value)
        })
        .map(|(_, lead)| {
            values.lead(lead);
            values
        })
        .map_err(|(at, literal)| Mismatch {
            at,
            expected: String::from_utf8_lossy(literal).into_owned(),
        })
    }

    /// Walks the first `steps` values of `line`, giving each (its step, where it starts, its
    /// bytes) to `each`, but for those of a [`LEAD`] read at once, returned; returns what follows
    /// them, or where the line stopped matching and the literal text expected there.
    #[inline]
    fn forward<'a, 's>(
        &'s self,
        line: &'a [u8],
        steps: usize,
        mut each: impl FnMut(&'s Step, usize, &'a [u8]),
    ) -> Walked<'a, 's> {
        let (mut rest, first, lead) = match self.lead(line, steps) {
            Some((lead, rest)) => (rest, LEAD.len(), Some(lead)),
            None => {
                let prefix = &*self.prefix;
                match line.split_at_checked(prefix.len()) {
                    Some((head, rest)) if same(head, prefix) => (rest, 0, None),
                    _ => return Err((0, prefix)),
                }
            }
        };
        for step in &self.steps[first..steps] {
            let literal = &step.literal;
            let start = line.len() - rest.len();
            let value = if literal.bytes.is_empty() {
                std::mem::take(&mut rest)
            } else {
                // A value NGINX always writes at one width ends there: the literal is checked
                // there, not searched for. (Anything else would not read as that value anyway.)
                let end = match step.width {
                    Some(w) if literal.is_at(rest, w) => w,
                    _ => literal.find(rest).ok_or((start, &*literal.bytes))?,
                };
                let (value, after) = rest.split_at(end);
                rest = &after[literal.bytes.len()..];
                value
            };
            each(step, start, value);
        }
        Ok((rest, lead))
    }

    /// The time, the request and the status of the [`LEAD`] the format starts with (where each
    /// starts, its bytes), and what follows the status: the same values as step by step, read
    /// without a loop over steps and with the time and the status at their widths, as the combined
    /// parser reads them. None: the line is to be read step by step (a format without that lead,
    /// or an unusual line). Always inlined: as a call of its own, which the compiler chose in the
    /// benchmark's build, the line took some 5% longer.
    #[inline(always)]
    fn lead<'a>(&self, line: &'a [u8], steps: usize) -> Option<(Lead<'a>, &'a [u8])> {
        if !self.lead || steps < LEAD.len() {
            return None;
        }
        // Step by step, `$remote_addr` ends at the first ` - `: at the first space, when it is one
        // (an address has no space).
        let space = super::find_short(line, b' ')?;
        if !self.steps[0].literal.is_at(line, space) {
            return None;
        }
        // `$remote_user` ends at the first ` [` after it: right there when it is `-` (no user),
        // else at the line's first `[` if a space is before it, and after the ` - `.
        let open = if line.get(space + 3..space + 6) == Some(b"- [") {
            space + 5
        } else {
            let open = super::find_short(line, b'[')?;
            if space + 3 >= open || line[open - 1] != b' ' {
                return None;
            }
            open
        };
        let time = open + 1;
        let request = time + 29;
        if !self.steps[2].literal.is_at(line, request - 3) {
            return None;
        }
        let status = request + self.steps[3].literal.find(line.get(request..)?)? + 2;
        let rest = status + 4;
        if !self.steps[4].literal.is_at(line, rest - 1) {
            return None;
        }
        Some((
            [
                (time, &line[time..request - 3]),
                (request, &line[request..status - 2]),
                (status, &line[status..rest - 1]),
            ],
            &line[rest..],
        ))
    }

    /// Reads the values of `line` into `values`, or says where it stopped matching and which
    /// literal text was expected there. The hot path: nothing allocated, nothing copied. Not
    /// inlined: as a function of its own, its loops keep their state in registers (inlined into
    /// the aggregation loop, it measured 5% slower).
    #[inline(never)]
    pub(crate) fn read<'a, 's>(
        &'s self,
        line: &'a [u8],
        values: &mut Values<'a>,
    ) -> Result<(), (usize, &'s [u8])> {
        let (a, b) = self.gap;
        let (rest, lead) = self.forward(line, a, |step, _, value| values.record(step, value))?;
        values.lead(lead);
        if b == a {
            return Ok(());
        }
        // Backward from the end of the line, down to the gap.
        let floor = line.len() - rest.len();
        let last = &self.steps[self.steps.len() - 1].literal.bytes;
        let mut end = if last.is_empty() {
            line.len()
        } else if line.len() >= floor + last.len() && same(&line[line.len() - last.len()..], last) {
            line.len() - last.len()
        } else {
            return Err((line.len(), &**last));
        };
        if let Some(separator) = self.separator {
            return self.tail(line, floor, end, separator, values);
        }
        for i in (b..self.steps.len()).rev() {
            let before = &self.steps[i - 1].literal;
            let at = before
                .rfind(line, floor, end)
                .ok_or((floor, &*before.bytes))?;
            let start = at + before.bytes.len();
            values.record(&self.steps[i], &line[start..end]);
            end = at;
        }
        Ok(())
    }

    /// Reads the values after the gap backward from `end` (where the last one ends) down to
    /// `floor` (where the line was read forward to), when the one byte `separator` is before each:
    /// a word of the line at a time from `end`, the separators in each word found at once, where
    /// a search for each value's start would set up a search per value. It reads what that search
    /// reads: each value starts after the last separator before the end of the value after it.
    #[inline]
    fn tail<'a, 's>(
        &'s self,
        line: &'a [u8],
        floor: usize,
        mut end: usize,
        separator: u8,
        values: &mut Values<'a>,
    ) -> Result<(), (usize, &'s [u8])> {
        const LOW7: u64 = u64::from_ne_bytes([0x7f; 8]);
        let pattern = u64::from_ne_bytes([separator; 8]);
        let steps = &self.steps[self.gap.1..];
        let mut left = steps.len();
        // The bytes before `pos` are yet to be read; the separators of the word read last, which
        // starts at `pos`, not yet taken (the high bit of each).
        let mut pos = end;
        let mut hits = 0u64;
        loop {
            // The next separator before `end`: in the word read last, else in the word before it
            // (while a word is above `floor`), else in the byte before it.
            let at = if hits != 0 {
                let bit = 63 - hits.leading_zeros();
                hits ^= 1 << bit;
                pos + bit as usize / 8
            } else if let Some(word) = line[..pos].last_chunk::<8>().filter(|_| pos >= floor + 8) {
                pos -= 8;
                let x = u64::from_le_bytes(*word) ^ pattern;
                // The high bit of exactly the separators (no carry crosses a byte).
                hits = !((x & LOW7).wrapping_add(LOW7) | x | LOW7);
                continue;
            } else if pos > floor {
                pos -= 1;
                if line[pos] != separator {
                    continue;
                }
                pos
            } else {
                break;
            };
            left -= 1;
            values.record(&steps[left], &line[at + 1..end]);
            if left == 0 {
                return Ok(());
            }
            end = at;
        }
        Err((floor, &self.steps[self.gap.1 + left - 2].literal.bytes))
    }
}

impl<'a> Values<'a> {
    /// The values of a line's [`LEAD`], if it was read at once: kept as [`Values::record`]
    /// keeps them, without a look at their steps (its time is the line's first, and neither
    /// the time nor the status, at their widths, can be `-`).
    #[inline]
    fn lead(&mut self, lead: Option<Lead<'a>>) {
        if let Some([(_, time), (_, request), (_, status)]) = lead {
            self.time = Some((Variable::TimeLocal, time));
            self.fields[usize::from(REQUEST)] = (request != b"-").then_some(request);
            self.fields[usize::from(STATUS)] = Some(status);
        }
    }

    /// The value of one step of the line.
    #[inline]
    fn record(&mut self, step: &Step, value: &'a [u8]) {
        // NGINX logs `-` for a variable without a value.
        let value = (value != b"-").then_some(value);
        let Some(field) = step.field else {
            return self.record_apart(step.variable, value);
        };
        self.fields[usize::from(field)] = value;
    }

    /// The value of a time or a host variable: the first time logged is the line's, the best
    /// host (the lowest rank) its host. Other values are not kept.
    fn record_apart(&mut self, variable: Variable, value: Option<&'a [u8]>) {
        match variable {
            Variable::Host(rank) => {
                if let Some(v) = value.filter(|v| !v.is_empty()) {
                    if self.host.is_none_or(|(r, _)| rank < r) {
                        self.host = Some((rank, v));
                    }
                }
            }
            Variable::TimeLocal | Variable::TimeIso8601 | Variable::Msec => {
                if let (None, Some(v)) = (self.time, value) {
                    self.time = Some((variable, v));
                }
            }
            _ => {}
        }
    }

    pub(crate) fn request(&self) -> Option<&'a [u8]> {
        self.fields[usize::from(REQUEST)]
    }

    pub(crate) fn method(&self) -> Option<&'a [u8]> {
        self.fields[usize::from(METHOD)]
    }

    pub(crate) fn request_uri(&self) -> Option<&'a [u8]> {
        self.fields[usize::from(REQUEST_URI)]
    }

    pub(crate) fn uri(&self) -> Option<&'a [u8]> {
        self.fields[usize::from(URI)]
    }

    pub(crate) fn args(&self) -> Option<&'a [u8]> {
        self.fields[usize::from(ARGS)]
    }

    pub(crate) fn status(&self) -> Option<&'a [u8]> {
        self.fields[usize::from(STATUS)]
    }

    /// The `$http_…` values read, by slot.
    pub(crate) fn headers(&self) -> [Option<&'a [u8]>; SLOTS] {
        std::array::from_fn(|slot| self.fields[usize::from(HEADERS) + slot])
    }

    /// The `$http_…` value of `slot`.
    pub(crate) fn header(&self, slot: u8) -> Option<&'a [u8]> {
        self.fields[usize::from(HEADERS + slot)]
    }

    /// The `$arg_…` value of `slot`.
    pub(crate) fn arg_value(&self, slot: u8) -> Option<&'a [u8]> {
        self.fields[usize::from(ARG_VALUES + slot)]
    }
}

/// How NGINX's `main` and `combined` formats start, `$remote_addr - $remote_user [$time_local]
/// "$request" $status `: the steps and the literal text after each.
const LEAD: [(Variable, &[u8]); 5] = [
    (Variable::Other, b" - "),
    (Variable::Other, b" ["),
    (Variable::TimeLocal, b"] \""),
    (Variable::Request, b"\" "),
    (Variable::Status, b" "),
];

/// The widest run of steps whose values tally does not use, as `(a, b)` (steps `a..b`), with the
/// steps after it read backward; `(n, n)`, no gap, if every value is used. A run reaching the end
/// of the line ends the reading there.
fn widest_gap(steps: &[(Variable, Vec<u8>)]) -> (usize, usize) {
    let n = steps.len();
    let mut best = (n, n);
    let mut i = 0;
    while i < n {
        if steps[i].0 != Variable::Other {
            i += 1;
            continue;
        }
        let start = i;
        while i < n && steps[i].0 == Variable::Other {
            i += 1;
        }
        // The first step has no literal before it to find backward.
        if start > 0 && i - start >= best.1 - best.0 {
            best = (start, i);
        }
    }
    best
}

/// A variable's name at the start of `s` (after its `$`): `name` or `{name}`, and the bytes it
/// takes.
fn variable_name(s: &[u8]) -> Option<(String, usize)> {
    let name_len = |s: &[u8]| {
        s.iter()
            .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_')
            .count()
    };
    if let Some(braced) = s.strip_prefix(b"{") {
        let n = name_len(braced);
        (n > 0 && braced.get(n) == Some(&b'}'))
            .then(|| (String::from_utf8_lossy(&braced[..n]).into_owned(), n + 2))
    } else {
        let n = name_len(s);
        (n > 0).then(|| (String::from_utf8_lossy(&s[..n]).into_owned(), n))
    }
}

/// The name of the `n`th variable of `format`, for messages.
fn previous_name(format: &str, n: usize) -> Option<String> {
    let bytes = format.as_bytes();
    let mut seen = 0;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' {
            if let Some((name, len)) = variable_name(&bytes[i + 1..]) {
                seen += 1;
                if seen == n {
                    return Some(format!("${name}"));
                }
                i += 1 + len;
                continue;
            }
        }
        i += 1;
    }
    None
}

/// Whether two short byte strings are equal, compared in line: literals are a few bytes, for
/// which a call to `memcmp` costs more than the comparison.
#[inline]
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

impl Literal {
    fn new(bytes: Vec<u8>, escape: LogEscape) -> Literal {
        let n = bytes.len().min(8);
        let mut head = [0; 8];
        head[..n].copy_from_slice(&bytes[..n]);
        Literal {
            head: u64::from_le_bytes(head),
            mask: u64::MAX.checked_shr(64 - 8 * n as u32).unwrap_or(0),
            quote: bytes.first() == Some(&b'"') && escape == LogEscape::Json,
            bytes: bytes.into(),
        }
    }

    /// Whether it is at `at` in `s`.
    #[inline]
    fn is_at(&self, s: &[u8], at: usize) -> bool {
        let Some(rest) = s.get(at..) else {
            return false;
        };
        match rest.first_chunk::<8>() {
            Some(word) => {
                u64::from_le_bytes(*word) & self.mask == self.head
                    && (self.bytes.len() <= 8
                        || rest
                            .get(8..self.bytes.len())
                            .is_some_and(|r| same(r, &self.bytes[8..])))
            }
            // Near the end of the line.
            None => rest
                .get(..self.bytes.len())
                .is_some_and(|r| same(r, &self.bytes)),
        }
    }

    /// Whether a quote at `at` in `s` is escaped (`\"`): an odd run of backslashes before it
    /// (from `from`).
    #[inline]
    fn escaped(&self, s: &[u8], from: usize, at: usize) -> bool {
        self.quote
            && s[from..at]
                .iter()
                .rev()
                .take_while(|&&b| b == b'\\')
                .count()
                % 2
                == 1
    }

    /// Where it next occurs in `s`. A quote escaped by a backslash (escape=json writes `\"`) is
    /// part of the value, not the end of it. Always inlined: the lead's search for the end of
    /// the request, as a call, measured 1-2% slower per line.
    #[inline(always)]
    fn find(&self, s: &[u8]) -> Option<usize> {
        let first = *self.bytes.first()?;
        let mut from = 0;
        loop {
            // Most values are short: a word-at-a-time search beats memchr's setup there.
            let at = from + super::find_short(s.get(from..)?, first)?;
            if !self.escaped(s, 0, at) && self.is_at(s, at) {
                return Some(at);
            }
            from = at + 1;
        }
    }

    /// Where it last occurs in `s[from..end]`, with the same care for escaped quotes as
    /// [`Literal::find`]. The search does not wait for `from` (where a line read forward
    /// stopped): it only bounds what is found, so the processor reads both ends of a line at once.
    /// (What follows `end` is read only to compare words at once.)
    #[inline]
    fn rfind(&self, s: &[u8], from: usize, mut end: usize) -> Option<usize> {
        let last = *self.bytes.last()?;
        // One byte, not a quote escape=json may write inside a value: where it is found.
        if self.bytes.len() == 1 && !self.quote {
            return super::rfind_short(s.get(..end)?, last).filter(|&at| at >= from);
        }
        loop {
            // The values read backward are short (a time, a key): a word-at-a-time loop beats
            // memrchr's setup.
            let at = super::rfind_short(s.get(..end)?, last)?;
            end = at;
            let start = (at + 1).checked_sub(self.bytes.len())?;
            if start < from {
                return None;
            }
            // A one-byte literal is where its byte was found.
            if !self.escaped(s, from, start) && (self.bytes.len() == 1 || self.is_at(s, start)) {
                return Some(start);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAIN: &str = r#"$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent "$http_referer" "$http_user_agent" "$http_x_forwarded_for" $request_time $http_x_api_key"#;

    /// Values read backward after the gap, a space before each.
    const TAIL: &str = r#"$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent "$http_user_agent" $request_time $http_x_api_key $arg_user_key $host"#;

    /// The same, in lines that may be shorter than a word.
    const SHORT: &str = "$msec $status $remote_addr $http_x_api_key $host";

    fn compile(format: &str) -> Format {
        Format::compile(
            format,
            LogEscape::Default,
            &["x_api_key".into(), "authorization".into()],
            &["user_key".into()],
        )
        .unwrap()
    }

    #[test]
    fn a_main_format_with_a_header() {
        let f = compile(MAIN);
        let line = br#"10.1.2.3 - - [24/Nov/2026:10:15:00 +0000] "GET /v1/words?x=1 HTTP/1.1" 200 612 "-" "curl/8.0 \"q\"" "-" 0.012 abc123"#;
        let v = f.scan(line).unwrap();
        assert_eq!(
            v.time,
            Some((Variable::TimeLocal, &b"24/Nov/2026:10:15:00 +0000"[..]))
        );
        assert_eq!(v.request(), Some(&b"GET /v1/words?x=1 HTTP/1.1"[..]));
        assert_eq!(v.status(), Some(&b"200"[..]));
        assert_eq!(v.headers()[0], Some(&b"abc123"[..]));
        assert_eq!(f.headers, vec!["x_api_key".to_string()]);
        // Read through the shortcut for the lead it shares with NGINX's `main`.
        assert!(f.lead(line, f.steps.len()).is_some());
        // A header the request did not send is logged as `-`.
        let line = br#"10.1.2.3 - - [24/Nov/2026:10:15:00 +0000] "GET / HTTP/1.1" 404 0 "-" "-" "-" 0.001 -"#;
        assert_eq!(f.scan(line).unwrap().headers()[0], None);
    }

    #[test]
    fn every_variable_tally_reads() {
        let f = compile(
            "$msec|$time_iso8601|$request_method|$request_uri|$uri|$args|$status|$server_name|$http_host|$host|$http_authorization|${arg_user_key}|$arg_other",
        );
        let v = f
            .scan(b"1764092463.123|2026-11-25T18:41:03+01:00|POST|/a?b=1|/a|b=1|201|srv|h.example:8080|h.example|Basic dTpw|k1|zz")
            .unwrap();
        assert_eq!(v.time, Some((Variable::Msec, &b"1764092463.123"[..])));
        assert_eq!(v.method(), Some(&b"POST"[..]));
        assert_eq!(v.request_uri(), Some(&b"/a?b=1"[..]));
        assert_eq!((v.uri(), v.args()), (Some(&b"/a"[..]), Some(&b"b=1"[..])));
        assert_eq!(v.status(), Some(&b"201"[..]));
        assert_eq!(v.host, Some((0, &b"h.example"[..])));
        assert_eq!(v.headers()[0], Some(&b"Basic dTpw"[..]));
        assert_eq!(v.arg_value(0), Some(&b"k1"[..]));
        assert_eq!(f.args, vec!["user_key".to_string()]);
    }

    #[test]
    fn json_escaped_quotes_stay_inside_values() {
        let f = Format::compile(
            r#"{"time":"$time_iso8601","request":"$request","status":$status,"key":"$http_x_api_key","ua":"$http_user_agent"}"#,
            LogEscape::Json,
            &["x_api_key".into()],
            &[],
        )
        .unwrap();
        let v = f
            .scan(br#"{"time":"2026-11-25T18:41:03+00:00","request":"GET /\"x\" HTTP/1.1","status":200,"key":"k\"1","ua":"a \"b\", c"}"#)
            .unwrap();
        assert_eq!(v.request(), Some(&br#"GET /\"x\" HTTP/1.1"#[..]));
        assert_eq!(v.headers()[0], Some(&br#"k\"1"#[..]));
        assert_eq!(v.status(), Some(&b"200"[..]));
    }

    #[test]
    fn lines_that_do_not_match_say_where() {
        let f = compile(MAIN);
        assert_eq!(
            f.scan(b"10.1.2.3 - - 24/Nov").unwrap_err(),
            Mismatch {
                at: 11,
                expected: " [".into()
            }
        );
        let e = f
            .scan(br#"10.1.2.3 - - [24/Nov/2026:10:15:00 +0000] "GET / HTTP/1.1" 200"#)
            .unwrap_err();
        // Where `$status` ends: the space after it is missing.
        assert_eq!((e.at, e.expected.as_str()), (59, " "));
    }

    #[test]
    fn secrets_are_found_where_the_format_logs_them() {
        let f = compile(MAIN);
        let line = br#"10.1.2.3 - - [24/Nov/2026:10:15:00 +0000] "GET / HTTP/1.1" 200 612 "-" "curl" "1.2.3.4" 0.012 abc123"#;
        let (spans, cut) = f.secrets(line);
        assert_eq!(cut, None);
        assert_eq!(
            spans.iter().map(|r| &line[r.clone()]).collect::<Vec<_>>(),
            vec![&b"abc123"[..]]
        );
        // Past where the line stops matching, nothing is known.
        assert_eq!(f.secrets(b"10.1.2.3 - - 24/Nov"), (vec![], Some(11)));
    }

    #[test]
    fn values_read_backward_at_once_after_one_same_byte() {
        assert_eq!(compile(MAIN).separator, Some(b' '));
        // Another byte before one of them, a literal of two bytes, a quote escape=json escapes.
        for format in [
            "$msec $status $remote_addr $http_x_api_key|$host",
            "$msec $status $remote_addr $http_x_api_key, $host",
        ] {
            assert_eq!(compile(format).separator, None, "{format}");
        }
        let json = |escape| {
            Format::compile(
                "$msec $status \"$remote_addr\"$http_x_api_key\"$host",
                escape,
                &[],
                &[],
            )
            .unwrap()
            .separator
        };
        assert_eq!(json(LogEscape::Default), Some(b'"'));
        assert_eq!(json(LogEscape::Json), None);
        // The line's last value is read after the separator before it.
        let f = compile(TAIL);
        let line = br#"1.2.3.4 - - [24/Nov/2026:10:15:00 +0000] "GET / HTTP/1.1" 200 5 "a b" 0.001 k - h.example"#;
        let v = f.scan(line).unwrap();
        let mut read = Values::default();
        f.read(line, &mut read).unwrap();
        assert_eq!(read, v);
        assert_eq!(
            (v.header(0), v.arg_value(0), v.host),
            (Some(&b"k"[..]), None, Some((0, &b"h.example"[..])))
        );
    }

    #[test]
    fn formats_tally_cannot_use_are_errors_that_say_why() {
        let e = |format: &str| {
            Format::compile(format, LogEscape::Default, &[], &[])
                .err()
                .unwrap()
        };
        assert!(e("$remote_addr $status").contains("$time_local"));
        assert!(e("[$time_local] $request").contains("$status"));
        let adjacent = e("[$time_local] $status$body_bytes_sent");
        assert!(
            adjacent.contains("$body_bytes_sent") && adjacent.contains("$status"),
            "{adjacent}"
        );
    }

    proptest::proptest! {
        /// Any bytes into a compiled format: values or a mismatch, never a panic.
        #[test]
        fn any_line_scans_or_fails_cleanly(line in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = compile(MAIN).scan(&line);
        }

        /// Lines ending in values separated by spaces (and lines shorter than a word): read at
        /// once, the values after the gap are those the search for each value's start finds.
        #[test]
        fn the_tail_reads_as_the_steps_do(
            format in proptest::sample::select(vec![TAIL, SHORT]),
            tail in proptest::collection::vec(proptest::sample::select(vec![b' ', b'-', b'a', b'"']), 0..40),
        ) {
            let fast = compile(format);
            proptest::prop_assert_eq!(fast.separator, Some(b' '));
            let steps = Format { separator: None, ..compile(format) };
            let head: &[u8] = if format == TAIL {
                br#"1.2.3.4 - - [24/Nov/2026:10:15:00 +0000] "GET / HTTP/1.1" 200 5 "a b" "#
            } else {
                b"1 200 "
            };
            let line = [head, &tail].concat();
            let (mut a, mut b) = (Values::default(), Values::default());
            proptest::prop_assert_eq!(fast.read(&line, &mut a), steps.read(&line, &mut b));
            proptest::prop_assert_eq!(a, b);
        }

        /// A `main` line with pieces of its lead inserted or bytes removed here and there: the
        /// lead's shortcut reads what the step-by-step walk reads, or leaves the line to it.
        #[test]
        fn the_lead_reads_as_the_steps_do(edits in proptest::collection::vec((0..120usize, proptest::sample::select(vec![
            " - ", " [", "] \"", "\" ", " ", "-", "[", "\"", "\\", "1.2.3.4", "24/Nov/2026:10:15:00 +0000", "200",
        ]), proptest::bool::ANY), 0..4)) {
            let mut line = br#"10.1.2.3 - - [24/Nov/2026:10:15:00 +0000] "GET / HTTP/1.1" 200 612 "-" "curl" "-" 0.012 abc123"#.to_vec();
            for (at, piece, insert) in edits {
                let at = at.min(line.len());
                if insert {
                    line.splice(at..at, piece.bytes());
                } else {
                    line.drain(at..(at + piece.len()).min(line.len()));
                }
            }
            let lead = compile(MAIN);
            let steps = Format { lead: false, ..compile(MAIN) };
            proptest::prop_assert_eq!(lead.scan(&line), steps.scan(&line));
            proptest::prop_assert_eq!(lead.secrets(&line), steps.secrets(&line));
            let (mut a, mut b) = (Values::default(), Values::default());
            proptest::prop_assert_eq!(lead.read(&line, &mut a), steps.read(&line, &mut b));
            proptest::prop_assert_eq!(a, b);
        }

        /// A line built from random values through a format gives those values back.
        #[test]
        fn values_round_trip(
            method in "[A-Z]{1,7}",
            path in "/[a-z0-9/._~%-]{0,20}",
            key in "[A-Za-z0-9_.~][A-Za-z0-9_.~-]{0,29}",
            status in 100u16..600,
        ) {
            let f = compile(MAIN);
            let line = format!(r#"1.2.3.4 - - [24/Nov/2026:10:15:00 +0000] "{method} {path} HTTP/1.1" {status} 5 "-" "ua" "-" 0.001 {key}"#);
            let v = f.scan(line.as_bytes()).unwrap();
            // The hot path, which skips the values tally does not use, reads the same.
            let mut read = Values::default();
            proptest::prop_assert!(f.read(line.as_bytes(), &mut read).is_ok());
            proptest::prop_assert_eq!(read, v);
            let request = format!("{method} {path} HTTP/1.1");
            let status = status.to_string();
            proptest::prop_assert_eq!(v.request(), Some(request.as_bytes()));
            proptest::prop_assert_eq!(v.status(), Some(status.as_bytes()));
            proptest::prop_assert_eq!(v.headers()[0], Some(key.as_bytes()));
        }
    }
}
