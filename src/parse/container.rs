//! Container runtime log files (`wrapper = "cri"` or `"docker"`): each physical line is a record
//! around a part of the container's output, and a long line is split into several parts
//! (`P`…`P` `F` for CRI; `log` values without their final `\n` for Docker's json-file). The
//! records of one stream are unwrapped and their parts joined into the line the format reads.
//!
//! The reader never cuts a chunk (so never sets a checkpoint) inside a line whose parts are not all
//! there ([`Container::complete`]): since only one stream is read, no counted line ever lies past the
//! start of an unfinished one, and a restart resumes at a line's first part.

use serde::{Deserialize, Serialize};

use super::{json, Skip};

/// The runtime's log file layout (`wrapper`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Wrapper {
    /// CRI (containerd, CRI-O; `/var/log/containers/*.log`):
    /// `<RFC 3339 time> <stdout|stderr> <P|F> <message>`.
    Cri,
    /// Docker's json-file driver: `{"log":"<message>\n","stream":"stdout","time":"…"}`.
    Docker,
}

/// The output stream a source keeps (`stream`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// Standard output (where NGINX images write their access log).
    Stdout,
    /// Standard error.
    Stderr,
}

impl Stream {
    fn name(self) -> &'static [u8] {
        match self {
            Stream::Stdout => b"stdout",
            Stream::Stderr => b"stderr",
        }
    }
}

/// A wrapper with the stream kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Container {
    /// The layout.
    pub wrapper: Wrapper,
    /// The stream kept; the other's records are passed over.
    pub stream: Stream,
}

/// One physical line, unwrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Record<'a> {
    /// Of the other stream.
    Other,
    /// A part of a line that goes on in a later record; the message as written (for Docker, still
    /// JSON-escaped).
    Part(&'a [u8]),
    /// The last (or only) part of a line.
    Last(&'a [u8]),
    /// Not a record of this layout.
    Malformed,
}

impl crate::tail::Records for Container {
    fn complete(&self, lines: &[u8]) -> usize {
        Container::complete(self, lines)
    }

    fn finishing(&self, lines: &[u8]) -> Option<usize> {
        Container::finishing(self, lines)
    }

    fn start(&self, record: &[u8]) -> crate::tail::RecordStart {
        use crate::tail::RecordStart;
        match self.wrapper {
            // `<time> <stream> <tag> `: enough of it is there whenever the record is too long.
            Wrapper::Cri => match self.cri(record.get(..80).unwrap_or(record)) {
                Record::Part(_) => RecordStart::KeptPart,
                Record::Last(_) => RecordStart::KeptLast,
                Record::Other => RecordStart::OtherStream,
                Record::Malformed => RecordStart::Unknown,
            },
            Wrapper::Docker => RecordStart::Unknown,
        }
    }
}

impl Container {
    fn record<'a>(&self, line: &'a [u8]) -> Record<'a> {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        match self.wrapper {
            Wrapper::Cri => self.cri(line.strip_suffix(b"\r").unwrap_or(line)),
            Wrapper::Docker => self.docker(line),
        }
    }

    /// What a record of `stream` is when it is not of the kept stream: the other's, or not a
    /// stream at all.
    fn other_stream(&self, stream: &[u8]) -> Option<Record<'static>> {
        match stream {
            s if s == self.stream.name() => None,
            b"stdout" | b"stderr" => Some(Record::Other),
            _ => Some(Record::Malformed),
        }
    }

    /// `<time> <stream> <tag> <message>`: the message is everything after the tag's space (a
    /// record of an empty line has none).
    fn cri<'a>(&self, line: &'a [u8]) -> Record<'a> {
        let mut fields = line.splitn(4, |&b| b == b' ');
        let (Some(time), Some(stream), Some(tag)) = (fields.next(), fields.next(), fields.next())
        else {
            return Record::Malformed;
        };
        if time.len() < 20 || time.get(4) != Some(&b'-') {
            return Record::Malformed;
        }
        let message = fields.next().unwrap_or_default();
        if let Some(other) = self.other_stream(stream) {
            return other;
        }
        match tag {
            b"P" => Record::Part(message),
            b"F" => Record::Last(message),
            _ => Record::Malformed,
        }
    }

    /// `{"log":"…","stream":"…","time":"…"}`, keys in any order: a `log` that does not end with
    /// an escaped newline is a part (Docker splits lines at 16 KiB).
    fn docker<'a>(&self, line: &'a [u8]) -> Record<'a> {
        let Some((log, stream)) = json::log_and_stream(line) else {
            return Record::Malformed;
        };
        if let Some(other) = self.other_stream(stream) {
            return other;
        }
        match log.strip_suffix(br"\n") {
            // An odd run of backslashes before the `n`: the last one escapes it.
            Some(message) if !escaped_end(message) => {
                // `\r` before it, unless its backslash is itself escaped.
                let crlf = message.strip_suffix(br"\r").filter(|m| !escaped_end(m));
                Record::Last(crlf.unwrap_or(message))
            }
            _ => Record::Part(log),
        }
    }

    /// How much of `lines` (whole physical lines) holds no unfinished line of the stream: a chunk
    /// may end there.
    pub fn complete(&self, lines: &[u8]) -> usize {
        let mut open = None;
        let mut at = 0;
        for line in lines.split_inclusive(|&b| b == b'\n') {
            match self.record(line) {
                Record::Part(_) => {
                    open.get_or_insert(at);
                }
                Record::Last(_) => open = None,
                Record::Other | Record::Malformed => {}
            }
            at += line.len();
        }
        open.unwrap_or(lines.len())
    }

    /// The length of `lines`' prefix up to the record that ends the stream's line under way, if
    /// it is there (to drop a line too long to keep).
    pub fn finishing(&self, lines: &[u8]) -> Option<usize> {
        let mut at = 0;
        for line in lines.split_inclusive(|&b| b == b'\n') {
            at += line.len();
            if line.ends_with(b"\n") && matches!(self.record(line), Record::Last(_)) {
                return Some(at);
            }
        }
        None
    }
}

/// Whether `s` ends inside an escape: an odd run of backslashes at its end (the last one then
/// escapes what follows).
fn escaped_end(s: &[u8]) -> bool {
    s.iter().rev().take_while(|&&b| b == b'\\').count() % 2 == 1
}

/// Joins the parts of a source's lines, record after record. Its buffer is kept from line to line,
/// so that joining allocates only while lines grow longer than any before.
#[derive(Debug, Clone)]
pub(crate) struct Unwrapper {
    container: Container,
    /// Longer joined lines are skipped as `too_long`.
    limit: usize,
    /// The parts so far of the line under way, unescaped.
    joined: Vec<u8>,
    /// The line under way passed the limit (or a part was not valid JSON text): its parts are
    /// dropped until its last, which is skipped for this reason.
    spoiled: Option<Skip>,
    /// `joined` holds a finished line, returned last time.
    done: bool,
}

impl Unwrapper {
    pub(crate) fn new(container: Container, limit: usize) -> Unwrapper {
        Unwrapper {
            container,
            limit,
            joined: Vec::new(),
            spoiled: None,
            done: false,
        }
    }

    /// The line that `record` finishes, or None when it is of the other stream or a part of a
    /// line that goes on.
    pub(crate) fn line<'a>(&'a mut self, record: &'a [u8]) -> Result<Option<&'a [u8]>, Skip> {
        if std::mem::take(&mut self.done) {
            self.joined.clear();
        }
        let (message, last) = match self.container.record(record) {
            Record::Other => return Ok(None),
            Record::Malformed => return Err(Skip::Malformed),
            Record::Part(message) => (message, false),
            Record::Last(message) => (message, true),
        };
        let docker = self.container.wrapper == Wrapper::Docker;
        let escaped = docker && memchr::memchr(b'\\', message).is_some();
        // The common case: a whole line in one record, needing no unescaping.
        if last && self.joined.is_empty() && self.spoiled.is_none() && !escaped {
            return if message.len() > self.limit {
                Err(Skip::TooLong)
            } else {
                Ok(Some(message))
            };
        }
        if self.spoiled.is_none() {
            let appended = if escaped {
                super::credential::json_unescape_into(message, &mut self.joined)
                    .map_err(|_| Skip::Malformed)
            } else {
                self.joined.extend_from_slice(message);
                Ok(())
            };
            let spoiled = match appended {
                Err(skip) => Some(skip),
                Ok(()) if self.joined.len() > self.limit => Some(Skip::TooLong),
                Ok(()) => None,
            };
            if spoiled.is_some() {
                self.spoiled = spoiled;
                self.joined.clear();
            }
        }
        if !last {
            return Ok(None);
        }
        self.done = true;
        match self.spoiled.take() {
            Some(skip) => Err(skip),
            None => Ok(Some(&self.joined)),
        }
    }

    pub(crate) fn container(&self) -> Container {
        self.container
    }

    /// Drops a line under way (its last record will not come); true if there was one.
    pub(crate) fn end(&mut self) -> bool {
        let under_way = !self.done && (!self.joined.is_empty() || self.spoiled.is_some());
        self.joined.clear();
        self.spoiled = None;
        self.done = false;
        under_way
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CRI: Container = Container {
        wrapper: Wrapper::Cri,
        stream: Stream::Stdout,
    };
    const DOCKER: Container = Container {
        wrapper: Wrapper::Docker,
        stream: Stream::Stdout,
    };

    /// The lines an unwrapper makes of `records` (one per physical line), with the skips.
    fn lines(container: Container, limit: usize, records: &str) -> Vec<Result<String, Skip>> {
        let mut u = Unwrapper::new(container, limit);
        let mut out = Vec::new();
        for record in records.lines() {
            match u.line(record.as_bytes()) {
                Ok(Some(line)) => out.push(Ok(String::from_utf8_lossy(line).into_owned())),
                Ok(None) => {}
                Err(skip) => out.push(Err(skip)),
            }
        }
        if u.end() {
            out.push(Err(Skip::Malformed));
        }
        out
    }

    #[test]
    fn cri_parts_are_joined_per_stream() {
        let records = "\
2026-11-26T10:15:00.1Z stdout F whole line
2026-11-26T10:15:00.2Z stdout P first 
2026-11-26T10:15:00.3Z stderr F an error between the parts
2026-11-26T10:15:00.4Z stdout P second 
2026-11-26T10:15:00.5Z stdout F third
2026-11-26T10:15:00.6Z stdout F
garbage
2026-11-26T10:15:00.7Z stdout X tag
2026-11-26T10:15:00.8Z stdout P unfinished";
        assert_eq!(
            lines(CRI, 100, records),
            vec![
                Ok("whole line".into()),
                Ok("first second third".into()),
                Ok(String::new()),
                Err(Skip::Malformed),
                Err(Skip::Malformed),
                Err(Skip::Malformed),
            ]
        );
        let stderr = Container {
            stream: Stream::Stderr,
            ..CRI
        };
        assert_eq!(
            lines(stderr, 100, records)[..1],
            [Ok("an error between the parts".to_string())]
        );
        // A line whose parts pass the limit is too long; the next is read.
        let long = "\
2026-11-26T10:15:00.1Z stdout P 0123456789
2026-11-26T10:15:00.2Z stdout P 0123456789
2026-11-26T10:15:00.3Z stdout F 0123456789
2026-11-26T10:15:00.4Z stdout F next";
        assert_eq!(
            lines(CRI, 25, long),
            vec![Err(Skip::TooLong), Ok("next".into())]
        );
    }

    #[test]
    fn docker_records_are_unescaped_and_joined() {
        let records = r#"{"log":"GET \"/a\" 200\n","stream":"stdout","time":"2026-11-26T10:15:00Z"}
{"log":"part one, ","stream":"stdout","time":"2026-11-26T10:15:00Z"}
{"stream":"stderr","log":"oops\n","time":"2026-11-26T10:15:00Z"}
{"log":"part two \\n not the end\r\n","stream":"stdout","time":"2026-11-26T10:15:00Z"}
{"log":"plain\n","stream":"stdout"}
{"log":"a backslash at the end \\\\\n","stream":"stdout"}
{"log":42,"stream":"stdout"}
not json"#;
        assert_eq!(
            lines(DOCKER, 100, records),
            vec![
                Ok(r#"GET "/a" 200"#.into()),
                Ok(r"part one, part two \n not the end".into()),
                Ok("plain".into()),
                Ok(r"a backslash at the end \\".into()),
                Err(Skip::Malformed),
                Err(Skip::Malformed),
            ]
        );
    }

    #[test]
    fn chunks_end_only_where_no_line_is_under_way() {
        let text = "\
2026-11-26T10:15:00.1Z stdout F one
2026-11-26T10:15:00.2Z stdout P two-a
2026-11-26T10:15:00.3Z stderr F noise
2026-11-26T10:15:00.4Z stdout F two-b
2026-11-26T10:15:00.5Z stdout P three-a
2026-11-26T10:15:00.6Z stderr F noise
";
        let first = text.find("2026-11-26T10:15:00.2Z").unwrap();
        let third = text.find("2026-11-26T10:15:00.5Z").unwrap();
        let fourth_end = text.find("2026-11-26T10:15:00.5Z").unwrap();
        assert_eq!(CRI.complete(text.as_bytes()), third);
        assert_eq!(CRI.complete(&text.as_bytes()[..first]), first);
        assert_eq!(CRI.complete(b""), 0);
        // Dropping a line: up to the record that finishes it.
        assert_eq!(
            CRI.finishing(&text.as_bytes()[first..]),
            Some(fourth_end - first)
        );
        assert_eq!(CRI.finishing(&text.as_bytes()[third..]), None);
    }

    proptest::proptest! {
        /// Any bytes as records: lines, skips or parts, never a panic.
        #[test]
        fn any_bytes_unwrap_or_skip(records in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..60), 0..8)) {
            for container in [CRI, DOCKER] {
                let mut u = Unwrapper::new(container, 40);
                for record in &records {
                    let _ = u.line(record);
                }
                let joined: Vec<u8> = records.iter().flat_map(|r| r.iter().copied().chain([b'\n'])).collect();
                let complete = container.complete(&joined);
                proptest::prop_assert!(complete <= joined.len());
                let _ = container.finishing(&joined);
            }
        }
    }
}

#[cfg(test)]
mod escapes {
    use super::*;

    const DOCKER: Container = Container {
        wrapper: Wrapper::Docker,
        stream: Stream::Stdout,
    };

    /// A record whose `log` holds an escape the unescaper refuses leaves its bytes in `joined`:
    /// the next, valid line comes out with them in front.
    #[test]
    fn a_bad_escape_does_not_spoil_the_next_line() {
        let mut u = Unwrapper::new(DOCKER, 1000);
        assert_eq!(
            u.line(br#"{"log":"bad \x escape\n","stream":"stdout"}"#),
            Err(Skip::Malformed)
        );
        let next = u
            .line(br#"{"log":"GET \"/a\" 200\n","stream":"stdout"}"#)
            .map(|l| l.map(<[u8]>::to_vec));
        assert_eq!(next, Ok(Some(br#"GET "/a" 200"#.to_vec())));
        assert!(!u.end());
    }

    /// A message ending with an escaped backslash then `r` (text `...\r`, not a CR) loses its `r`
    /// and becomes a dangling escape.
    #[test]
    fn an_escaped_backslash_before_r_is_not_a_carriage_return() {
        let mut u = Unwrapper::new(DOCKER, 1000);
        let line = u
            .line(br#"{"log":"path C:\\r\n","stream":"stdout"}"#)
            .map(|l| l.map(<[u8]>::to_vec));
        assert_eq!(line, Ok(Some(br"path C:\r".to_vec())));
    }
}
