//! `time_format` (strftime-like, as `strptime` reads it): compiled once into steps, then each time
//! value is read by walking them, without allocation.

use super::days_from_civil;

/// A compiled `time_format`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TimeFormat {
    steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// This byte, exactly.
    Literal(u8),
    /// Any run of spaces and tabs, or none (as `strptime` reads a blank in its format).
    Blank,
    /// A number of `min..=max` digits into a field.
    Number { field: Field, min: u8, max: u8 },
    /// `%e`: a day of one or two digits, perhaps after a space.
    PaddedDay,
    /// `%b` / `%h` / `%B`: a month's English name, its first three letters or whole.
    MonthName,
    /// `%a` / `%A`: a weekday's English name, read and ignored.
    WeekdayName,
    /// `%p`: AM or PM.
    Meridiem,
    /// `%z`: `+hhmm`, `+hh:mm`, `+hh` or `Z`.
    Offset,
    /// `%Z`: a zone name; only the ones that mean UTC are known.
    ZoneName,
    /// `%f`: digits of a fraction of a second, ignored.
    Fraction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Year,
    /// Two digits: 69–99 are 19xx, 00–68 20xx (POSIX).
    ShortYear,
    Month,
    Day,
    Hour,
    Hour12,
    Minute,
    Second,
    Epoch,
}

/// A time being read.
#[derive(Default)]
struct Parts {
    year: i64,
    month: i64,
    day: i64,
    hour: i64,
    minute: i64,
    second: i64,
    pm: Option<bool>,
    offset: i64,
    epoch: Option<i64>,
}

const MONTHS: [&[u8]; 12] = [
    b"january",
    b"february",
    b"march",
    b"april",
    b"may",
    b"june",
    b"july",
    b"august",
    b"september",
    b"october",
    b"november",
    b"december",
];

const WEEKDAYS: [&[u8]; 7] = [
    b"monday",
    b"tuesday",
    b"wednesday",
    b"thursday",
    b"friday",
    b"saturday",
    b"sunday",
];

impl TimeFormat {
    /// Compiles `text`; the error names the directive it does not know, or what the format lacks
    /// to make a time.
    pub(crate) fn compile(text: &str) -> Result<TimeFormat, String> {
        let mut steps = Vec::new();
        let number = |field, min, max| Step::Number { field, min, max };
        let mut bytes = text.bytes();
        while let Some(b) = bytes.next() {
            if b == b' ' || b == b'\t' {
                if steps.last() != Some(&Step::Blank) {
                    steps.push(Step::Blank);
                }
                continue;
            }
            if b != b'%' {
                steps.push(Step::Literal(b));
                continue;
            }
            let Some(directive) = bytes.next() else {
                return Err("it ends with a lone `%` (write `%%` for a percent sign)".into());
            };
            let two = |field| number(field, 1, 2);
            match directive {
                b'Y' => steps.push(number(Field::Year, 4, 4)),
                b'y' => steps.push(number(Field::ShortYear, 2, 2)),
                b'm' => steps.push(two(Field::Month)),
                b'd' => steps.push(two(Field::Day)),
                b'e' => steps.push(Step::PaddedDay),
                b'H' => steps.push(two(Field::Hour)),
                b'I' => steps.push(two(Field::Hour12)),
                b'M' => steps.push(two(Field::Minute)),
                b'S' => steps.push(two(Field::Second)),
                b's' => steps.push(number(Field::Epoch, 1, 12)),
                b'b' | b'h' | b'B' => steps.push(Step::MonthName),
                b'a' | b'A' => steps.push(Step::WeekdayName),
                b'p' => steps.push(Step::Meridiem),
                b'z' => steps.push(Step::Offset),
                b'Z' => steps.push(Step::ZoneName),
                b'f' => steps.push(Step::Fraction),
                b'T' => steps.extend([
                    two(Field::Hour),
                    Step::Literal(b':'),
                    two(Field::Minute),
                    Step::Literal(b':'),
                    two(Field::Second),
                ]),
                b'R' => steps.extend([two(Field::Hour), Step::Literal(b':'), two(Field::Minute)]),
                b'F' => steps.extend([
                    number(Field::Year, 4, 4),
                    Step::Literal(b'-'),
                    two(Field::Month),
                    Step::Literal(b'-'),
                    two(Field::Day),
                ]),
                b'D' => steps.extend([
                    two(Field::Month),
                    Step::Literal(b'/'),
                    two(Field::Day),
                    Step::Literal(b'/'),
                    number(Field::ShortYear, 2, 2),
                ]),
                b'n' | b't' => steps.push(Step::Blank),
                b'%' => steps.push(Step::Literal(b'%')),
                other => {
                    return Err(format!(
                        "unknown directive `%{}`: tally reads %Y %y %m %d %e %H %I %M %S %p %b %B %h %a %A %z %Z %f %s %T %R %F %D %n %t %%",
                        char::from(other)
                    ))
                }
            }
        }
        let has = |wanted: &[Field]| {
            steps
                .iter()
                .any(|s| matches!(s, Step::Number { field, .. } if wanted.contains(field)))
        };
        let has_step = |wanted: &Step| steps.contains(wanted);
        if !has(&[Field::Epoch]) {
            let lacks = [
                (has(&[Field::Year, Field::ShortYear]), "a year (%Y or %y)"),
                (
                    has(&[Field::Month]) || has_step(&Step::MonthName),
                    "a month (%m or %b)",
                ),
                (
                    has(&[Field::Day]) || has_step(&Step::PaddedDay),
                    "a day (%d or %e)",
                ),
                (
                    has(&[Field::Hour, Field::Hour12]),
                    "an hour (%H, or %I with %p)",
                ),
                (has(&[Field::Minute]), "minutes (%M)"),
            ];
            if let Some((_, what)) = lacks.iter().find(|(present, _)| !present) {
                return Err(format!("it lacks {what}"));
            }
        }
        if has(&[Field::Hour12]) != has_step(&Step::Meridiem) {
            return Err("%I (a 12-hour clock) needs %p (AM or PM), and %p needs %I".into());
        }
        Ok(TimeFormat { steps })
    }

    /// `t` read as the format says → epoch seconds; None when it does not match. A time without
    /// an offset (`%z`) is UTC.
    pub(crate) fn parse(&self, t: &[u8]) -> Option<i64> {
        let mut p = Parts {
            month: 1,
            day: 1,
            ..Parts::default()
        };
        let mut i = 0;
        for step in &self.steps {
            i = step.read(t, i, &mut p)?;
        }
        if i != t.len() {
            return None;
        }
        if let Some(epoch) = p.epoch {
            return Some(epoch);
        }
        if let Some(pm) = p.pm {
            if !(1..=12).contains(&p.hour) {
                return None;
            }
            p.hour = p.hour % 12 + if pm { 12 } else { 0 };
        }
        if !(1..=12).contains(&p.month)
            || !(1..=31).contains(&p.day)
            || p.hour > 23
            || p.minute > 59
            || p.second > 60
        {
            return None;
        }
        Some(
            days_from_civil(p.year, p.month, p.day) * 86_400
                + p.hour * 3600
                + p.minute * 60
                + p.second
                - p.offset,
        )
    }
}

impl Step {
    /// Reads this step of `t` at `i` into `p`; the index past it.
    fn read(&self, t: &[u8], i: usize, p: &mut Parts) -> Option<usize> {
        match *self {
            Step::Literal(b) => (t.get(i) == Some(&b)).then_some(i + 1),
            Step::Blank => Some(
                i + t[i..]
                    .iter()
                    .take_while(|&&b| b == b' ' || b == b'\t')
                    .count(),
            ),
            Step::Number { field, min, max } => {
                let (n, end) = digits(t, i, min, max)?;
                match field {
                    Field::Year => p.year = n,
                    Field::ShortYear => p.year = if n >= 69 { 1900 + n } else { 2000 + n },
                    Field::Month => p.month = n,
                    Field::Day => p.day = n,
                    Field::Hour | Field::Hour12 => p.hour = n,
                    Field::Minute => p.minute = n,
                    Field::Second => p.second = n,
                    Field::Epoch => p.epoch = Some(n),
                }
                Some(end)
            }
            Step::PaddedDay => {
                let i = if t.get(i) == Some(&b' ') { i + 1 } else { i };
                let (n, end) = digits(t, i, 1, 2)?;
                p.day = n;
                Some(end)
            }
            Step::MonthName => {
                let (month, end) = name(t, i, &MONTHS)?;
                p.month = month as i64 + 1;
                Some(end)
            }
            Step::WeekdayName => name(t, i, &WEEKDAYS).map(|(_, end)| end),
            Step::Meridiem => {
                let two = t.get(i..i + 2)?;
                p.pm = Some(match two.to_ascii_uppercase().as_slice() {
                    b"AM" => false,
                    b"PM" => true,
                    _ => return None,
                });
                Some(i + 2)
            }
            Step::Offset => {
                let (offset, end) = offset(t, i)?;
                p.offset = offset;
                Some(end)
            }
            Step::ZoneName => {
                let len = t[i..]
                    .iter()
                    .take_while(|b| b.is_ascii_alphabetic())
                    .count();
                let zone = &t[i..i + len];
                ["UTC", "GMT", "Z", "UT"]
                    .iter()
                    .any(|z| zone.eq_ignore_ascii_case(z.as_bytes()))
                    .then_some(i + len)
            }
            Step::Fraction => {
                let len = t[i..].iter().take_while(|b| b.is_ascii_digit()).count();
                (len > 0).then_some(i + len)
            }
        }
    }
}

/// `min..=max` digits at `i` (as many as there are, up to `max`) → their number and the index
/// past them.
fn digits(t: &[u8], i: usize, min: u8, max: u8) -> Option<(i64, usize)> {
    let len = t[i.min(t.len())..]
        .iter()
        .take(usize::from(max))
        .take_while(|b| b.is_ascii_digit())
        .count();
    if len < usize::from(min) {
        return None;
    }
    let n = t[i..i + len]
        .iter()
        .fold(0i64, |n, d| n * 10 + i64::from(d - b'0'));
    Some((n, i + len))
}

/// One of `names` at `i`, whole or its first three letters, any case → its index and the index
/// past it.
fn name(t: &[u8], i: usize, names: &[&[u8]]) -> Option<(usize, usize)> {
    let rest = t.get(i..)?;
    names.iter().enumerate().find_map(|(n, full)| {
        let starts = |len: usize| {
            rest.get(..len)
                .is_some_and(|r| r.eq_ignore_ascii_case(&full[..len]))
        };
        if starts(full.len()) {
            Some((n, i + full.len()))
        } else if starts(3) {
            Some((n, i + 3))
        } else {
            None
        }
    })
}

/// `Z`, `+hh`, `+hhmm` or `+hh:mm` at `i` → seconds east of UTC and the index past it.
fn offset(t: &[u8], i: usize) -> Option<(i64, usize)> {
    let sign = match t.get(i)? {
        b'Z' | b'z' => return Some((0, i + 1)),
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let (hours, mut end) = digits(t, i + 1, 2, 2)?;
    if t.get(end) == Some(&b':') {
        end += 1;
    }
    let (minutes, end) = match digits(t, end, 2, 2) {
        Some(m) => m,
        None if t.get(end - 1) != Some(&b':') => (0, end),
        None => return None,
    };
    (hours <= 23 && minutes <= 59).then_some((sign * (hours * 3600 + minutes * 60), end))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_795_515_300; // 2026-11-24 10:15:00 UTC

    fn at(format: &str, t: &str) -> Option<i64> {
        TimeFormat::compile(format).unwrap().parse(t.as_bytes())
    }

    #[test]
    fn common_layouts() {
        for (format, t) in [
            ("%d/%b/%Y:%H:%M:%S %z", "24/Nov/2026:10:15:00 +0000"),
            ("%d/%b/%Y:%H:%M:%S %z", "24/Nov/2026:11:15:00 +0100"),
            ("%Y-%m-%dT%H:%M:%S%z", "2026-11-24T05:15:00-05:00"),
            ("%Y-%m-%d %H:%M:%S.%f", "2026-11-24 10:15:00.123456"),
            ("%F %T", "2026-11-24 10:15:00"),
            ("%F %T %Z", "2026-11-24 10:15:00 UTC"),
            ("%a %b %e %T %Y", "Tue Nov 24 10:15:00 2026"),
            (
                "%A, %d %B %Y %I:%M:%S %p",
                "Tuesday, 24 November 2026 10:15:00 AM",
            ),
            ("%D %I:%M %p", "11/24/26 10:15 am"),
            ("%s", "1795515300"),
            ("%s.%f", "1795515300.250"),
            ("[%d/%b/%Y:%T %z]", "[24/nov/2026:10:15:00 Z]"),
        ] {
            assert_eq!(at(format, t), Some(T), "{format} on {t}");
        }
        // %e pads with a space; a blank in the format takes any run of blanks.
        assert_eq!(
            at("%b %e %T %Y", "Nov  4 10:15:00 2026"),
            Some(T - 20 * 86_400)
        );
        assert_eq!(
            at("%I:%M %p %F", "12:15 AM 2026-11-24"),
            Some(T - 10 * 3600)
        );
        assert_eq!(at("%I:%M %p %F", "12:15 PM 2026-11-24"), Some(T + 2 * 3600));
    }

    #[test]
    fn times_that_do_not_match_are_none() {
        for (format, t) in [
            ("%F %T", "2026-11-24 10:15"),
            ("%F %T", "2026-11-24 10:15:00 extra"),
            ("%F %T", "2026-13-24 10:15:00"),
            ("%F %T", "2026-11-24 24:15:00"),
            ("%d/%b/%Y %R", "24/Foo/2026 10:15"),
            ("%F %T %Z", "2026-11-24 10:15:00 CET"),
            ("%F %T%z", "2026-11-24 10:15:00+25:00"),
            ("%I:%M %p %F", "13:15 PM 2026-11-24"),
            ("%s", ""),
            ("%s", "-5"),
        ] {
            assert_eq!(at(format, t), None, "{format} on {t}");
        }
    }

    #[test]
    fn formats_that_cannot_make_a_time_are_refused() {
        for (format, says) in [
            ("%H:%M:%S", "a year"),
            ("%Y-%d %H:%M", "a month"),
            ("%Y-%m %H:%M", "a day"),
            ("%F %M", "an hour"),
            ("%F %H", "minutes"),
            ("%F %I:%M", "%p"),
            ("%F %Q", "%Q"),
            ("%F %T %", "lone"),
        ] {
            let e = TimeFormat::compile(format).unwrap_err();
            assert!(e.contains(says), "{format}: {e}");
        }
    }

    proptest::proptest! {
        /// Any bytes, in any format: a time or None, never a panic.
        #[test]
        fn any_bytes_read_or_none(t in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40)) {
            for format in ["%d/%b/%Y:%T %z", "%a %b %e %T %Y", "%s.%f", "%D %I:%M %p %Z"] {
                let _ = at(format, &String::from_utf8_lossy(&t));
            }
        }
    }
}
