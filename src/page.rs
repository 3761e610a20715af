//! The Response codes page (`GET /` on the telemetry listener) and its JSON API (`/api/codes`,
//! `/api/calls`): what [`crate::codes`] keeps, shown as 3scale's Analytics > Response codes does,
//! with the calls behind each code and what tally did with the traffic. Self-contained (no CDN,
//! fonts or external scripts: a sidecar has no internet); the tables and the chart are drawn on
//! the server, so the page reads without JavaScript, which only refreshes it.

use std::fmt::Write;

use crate::codes::{Call, Counted, STEPS};
use crate::parse::Skip;
use crate::telemetry::{mask, masked_line_with, printable, Metrics};

/// The periods the page offers: (name, seconds, step).
const PERIODS: [(&str, i64, i64); 4] = [
    ("15m", 900, 10),
    ("1h", 3600, 60),
    ("6h", 21_600, 600),
    ("24h", 86_400, 3600),
];

/// How many calls the API gives by default, and at most.
const CALLS_DEFAULT: usize = 50;
const CALLS_MAX: usize = 1000;

/// The query parameters of a request target.
struct Query(Vec<(String, String)>);

impl Query {
    fn of(target: &[u8]) -> Query {
        let query = target
            .iter()
            .position(|&b| b == b'?')
            .map_or(&b""[..], |i| &target[i + 1..]);
        Query(form_urlencoded::parse(query).into_owned().collect())
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| v.as_str())
    }
}

/// A time parameter: epoch seconds or RFC 3339.
fn time_param(value: &str) -> Result<i64, String> {
    if let Ok(n) = value.trim().parse::<i64>() {
        return Ok(n);
    }
    humantime::parse_rfc3339_weak(value.trim())
        .map(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
        })
        .map_err(|e| format!("`{value}` is neither epoch seconds nor RFC 3339: {e}"))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The class of a code: `2xx`…
fn class(code: u16) -> String {
    format!("{}xx", code / 100)
}

/// A window of the series: its first bucket, step and number of buckets.
#[derive(Debug, Clone, Copy)]
struct Window {
    from: i64,
    step: i64,
    count: usize,
}

impl Window {
    /// The buckets from `from` to `to` at `step` (None: the finest step whose ring spans them),
    /// within what is kept.
    fn new(from: i64, to: i64, step: Option<i64>) -> Result<Window, String> {
        let span = (to - from).max(1);
        let (step, len) = match step {
            Some(step) => *STEPS.iter().find(|(s, _)| *s == step).ok_or_else(|| {
                format!("step must be one of 10, 60, 600 or 3600 seconds, not {step}")
            })?,
            None => *STEPS
                .iter()
                .find(|(s, len)| s * *len as i64 >= span)
                .unwrap_or(&STEPS[STEPS.len() - 1]),
        };
        let last = to.div_euclid(step) * step;
        let first = from.div_euclid(step) * step;
        let count = (((last - first) / step) as usize + 1).min(len);
        Ok(Window {
            from: last - step * (count as i64 - 1),
            step,
            count,
        })
    }

    fn times(&self) -> impl Iterator<Item = i64> + '_ {
        (0..self.count).map(|i| self.from + self.step * i as i64)
    }
}

/// `GET /api/codes`: requests per code and class over time (JSON).
pub(crate) fn api_codes(metrics: &Metrics, target: &[u8]) -> Result<String, String> {
    let q = Query::of(target);
    let to = q.get("to").map(time_param).transpose()?;
    let from = q.get("from").map(time_param).transpose()?;
    let step = q
        .get("step")
        .map(|s| {
            humantime::parse_duration(s)
                .map(|d| d.as_secs() as i64)
                .or_else(|_| s.parse::<i64>())
                .map_err(|_| {
                    format!("step `{s}`: give seconds (10, 60, 600, 3600) or a duration (1m)")
                })
        })
        .transpose()?;
    // Times a log can hold (to year 36812): the window's arithmetic never overflows.
    let sane = |t: i64| t.clamp(0, 1 << 40);
    let to = sane(to.unwrap_or_else(|| now().max(metrics.codes.newest())));
    let from = sane(from.unwrap_or(to - 86_400 + 1));
    if from > to {
        return Err("from is after to".into());
    }
    let window = Window::new(from, to, step)?;
    let service = q.get("service");
    let series = metrics
        .codes
        .series(service, window.step, window.from, window.count);
    let mut out = String::with_capacity(1024);
    let _ = write!(
        out,
        "{{\"service\":{},\"from\":{},\"to\":{},\"step\":{},\"times\":[{}],\"codes\":[",
        service.map_or("null".to_string(), json_string),
        window.from,
        window.from + window.step * window.count as i64,
        window.step,
        window
            .times()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    let points = |p: &[u64]| p.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    for (i, c) in series.iter().enumerate() {
        let _ = write!(
            out,
            "{}{{\"code\":{},\"class\":\"{}\",\"total\":{},\"in_window\":{},\"points\":[{}]}}",
            if i > 0 { "," } else { "" },
            c.code,
            class(c.code),
            c.total,
            c.points.iter().sum::<u64>(),
            points(&c.points)
        );
    }
    out.push_str("],\"classes\":[");
    for (i, (name, total, p)) in classes(&series, window.count).iter().enumerate() {
        let _ = write!(
            out,
            "{}{{\"class\":\"{name}\",\"total\":{total},\"in_window\":{},\"points\":[{}]}}",
            if i > 0 { "," } else { "" },
            p.iter().sum::<u64>(),
            points(p)
        );
    }
    let _ = write!(out, "],\"traffic\":{}}}", traffic_json(metrics));
    Ok(out)
}

/// The series summed per class (2xx…5xx, and others seen), each with its total since start.
fn classes(series: &[Counted], count: usize) -> Vec<(String, u64, Vec<u64>)> {
    let mut out: Vec<(String, u64, Vec<u64>)> = ["2xx", "3xx", "4xx", "5xx"]
        .iter()
        .map(|c| (c.to_string(), 0, vec![0; count]))
        .collect();
    for c in series {
        let name = class(c.code);
        let i = match out.iter().position(|(n, _, _)| *n == name) {
            Some(i) => i,
            None => {
                out.push((name, 0, vec![0; count]));
                out.len() - 1
            }
        };
        out[i].1 += c.total;
        for (sum, p) in out[i].2.iter_mut().zip(&c.points) {
            *sum += p;
        }
    }
    out
}

/// What tally did with the lines: read, reported, skipped and dropped by reason.
fn traffic(metrics: &Metrics) -> Vec<(String, u64)> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut rows = vec![
        ("lines read".to_string(), metrics.lines_read.load(Relaxed)),
        (
            "requests reported (accepted by 3scale)".to_string(),
            metrics.requests_reported.load(Relaxed),
        ),
    ];
    for skip in Skip::ALL {
        rows.push((format!("skipped: {}", skip.reason()), metrics.skips(skip)));
    }
    for (reason, field) in [
        ("too_old", &metrics.dropped_too_old),
        ("too_new", &metrics.dropped_too_new),
        ("invalid_credential", &metrics.dropped_invalid_credential),
        (
            "wrong_credential_kind",
            &metrics.dropped_wrong_credential_kind,
        ),
        ("unknown_metric", &metrics.dropped_unknown_metric),
    ] {
        rows.push((format!("dropped: {reason}"), field.load(Relaxed)));
    }
    rows.push((
        "not on this page: past 4096 distinct codes".to_string(),
        metrics.codes.untracked(),
    ));
    rows
}

fn traffic_json(metrics: &Metrics) -> String {
    let fields: Vec<String> = traffic(metrics)
        .iter()
        .map(|(name, n)| format!("{}:{n}", json_string(name)))
        .collect();
    format!("{{{}}}", fields.join(","))
}

/// One call as shown: read again with its source's parser, credentials masked.
struct Shown {
    service: String,
    time: i64,
    status: u16,
    outcome: String,
    application: Option<String>,
    method: String,
    path: String,
    host: String,
    line: String,
}

fn shown(metrics: &Metrics, service: String, call: &Call) -> Shown {
    let mut shown = Shown {
        service,
        time: call.time,
        status: call.status,
        outcome: call.outcome.text(),
        application: None,
        method: String::new(),
        path: String::new(),
        host: String::new(),
        line: String::new(),
    };
    let text =
        |v: Option<&[u8]>| printable(&String::from_utf8_lossy(v.unwrap_or_default())).into_owned();
    let read = metrics
        .codes
        .with_reader(&shown.service, call.source, |parser, names| {
            let hidden = parser.hide_secrets(&call.line, mask);
            let line = masked_line_with(&hidden, hidden.len(), names);
            let request = match parser.parse_record(&call.line) {
                Ok(Some(r)) => Some((
                    // Read without its credential: an empty one.
                    Some(&r.credential)
                        .filter(|c| !c.raw.is_empty())
                        .and_then(|c| c.decode().ok())
                        .map(|c| mask(&c)),
                    text(r.method),
                    text(r.path),
                    text(r.host),
                )),
                _ => None,
            };
            (line, request)
        });
    match read {
        Some((line, request)) => {
            shown.line = line;
            if let Some((application, method, path, host)) = request {
                (shown.application, shown.method, shown.path, shown.host) =
                    (application, method, path, host);
            }
        }
        None => shown.line = masked_line_with(&call.line, call.line.len(), &[]),
    }
    shown
}

/// The calls a request asks for: code, service, application (the credential as logged or as
/// shown masked), newest first.
fn calls(metrics: &Metrics, q: &Query) -> Result<Vec<Shown>, String> {
    let code = q
        .get("code")
        .map(|c| {
            c.parse::<u16>()
                .map_err(|_| format!("code `{c}` is not a status code"))
        })
        .transpose()?;
    let limit = q
        .get("limit")
        .map(|l| {
            l.parse::<usize>()
                .map_err(|_| format!("limit `{l}` is not a number"))
        })
        .transpose()?
        .unwrap_or(CALLS_DEFAULT)
        .min(CALLS_MAX);
    let application = q.get("application");
    let service = q.get("service");
    let mut out = Vec::new();
    // Filtered by application after reading each again: a larger window to fill `limit` from.
    let window = if application.is_some() {
        CALLS_MAX
    } else {
        limit
    };
    for (service, call) in metrics.codes.calls(code, service, window) {
        if out.len() >= limit {
            break;
        }
        let call = shown(metrics, service, &call);
        if let Some(wanted) = application {
            let matches = call.application.as_deref() == Some(wanted)
                || call.application.as_deref() == Some(mask(wanted).as_str());
            if !matches {
                continue;
            }
        }
        out.push(call);
    }
    Ok(out)
}

/// `GET /api/calls`: the latest calls (JSON).
pub(crate) fn api_calls(metrics: &Metrics, target: &[u8], details: bool) -> Result<String, String> {
    if !details {
        return Ok("{\"calls\":[],\"off\":\"call details are off: telemetry.calls_per_code is 0, or the listener is not on loopback and telemetry.calls_on_public_listener is false\"}".into());
    }
    let list = calls(metrics, &Query::of(target))?;
    let items: Vec<String> = list
        .iter()
        .map(|c| {
            format!(
                "{{\"time\":{},\"time_text\":{},\"service\":{},\"application\":{},\"method\":{},\"path\":{},\"host\":{},\"status\":{},\"outcome\":{},\"line\":{}}}",
                c.time,
                json_string(&time_text(c.time)),
                json_string(&c.service),
                c.application.as_deref().map_or("null".into(), json_string),
                json_string(&c.method),
                json_string(&c.path),
                json_string(&c.host),
                c.status,
                json_string(&c.outcome),
                json_string(&c.line)
            )
        })
        .collect();
    Ok(format!("{{\"calls\":[{}]}}", items.join(",")))
}

fn time_text(t: i64) -> String {
    // RFC 3339 has no year past 9999 (a log may say anything): then the epoch seconds.
    const YEAR_10000: i64 = 253_402_300_800;
    if t >= YEAR_10000 {
        return t.to_string();
    }
    crate::parse::rfc3339(t.max(0))
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Text for HTML.
fn html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A link to the page with `changes` made to the current query.
fn link(q: &Query, changes: &[(&str, Option<&str>)]) -> String {
    let mut pairs: Vec<(String, String)> =
        q.0.iter()
            .filter(|(k, _)| !changes.iter().any(|(c, _)| c == k))
            .cloned()
            .collect();
    for (k, v) in changes {
        if let Some(v) = v {
            pairs.push((k.to_string(), v.to_string()));
        }
    }
    let query: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    html(&format!("/?{query}"))
}

const COLORS: [(&str, &str); 4] = [
    ("2xx", "#2e7d32"),
    ("3xx", "#1565c0"),
    ("4xx", "#ef6c00"),
    ("5xx", "#c62828"),
];

/// A class's color in the chart (grey for a class outside 2xx to 5xx).
fn color_of(class: &str) -> &'static str {
    COLORS
        .iter()
        .find(|(c, _)| *c == class)
        .map_or("#777", |(_, color)| color)
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}\
header,main{padding:8px 16px;max-width:1100px;margin:auto}h1{font-size:20px;margin:8px 0}\
h2{font-size:16px;margin:16px 0 6px}nav a{margin-right:10px}nav a.on{font-weight:bold;text-decoration:none;color:#000}\
table{border-collapse:collapse;width:100%;background:#fff}th,td{text-align:left;padding:4px 6px;border-bottom:1px solid #ddd;vertical-align:top}\
td.n,th.n{text-align:right}code{font-size:12px;word-break:break-all}svg{width:100%;height:auto;background:#fff;border:1px solid #ddd}\
.legend span{display:inline-block;margin-right:12px}.legend i{display:inline-block;width:10px;height:10px;margin-right:4px}\
.wide{overflow-x:auto}.note{color:#666}form{display:inline}";

/// `GET /`: the page.
pub(crate) fn page(metrics: &Metrics, target: &[u8], details: bool) -> String {
    let q = Query::of(target);
    let period = q
        .get("period")
        .and_then(|p| PERIODS.iter().find(|(name, _, _)| *name == p))
        .unwrap_or(&PERIODS[1]);
    let service = q.get("service");
    let code = q.get("code").and_then(|c| c.parse::<u16>().ok());
    let to = now();
    let window = Window::new(to - period.1 + 1, to, Some(period.2)).unwrap_or(Window {
        from: to,
        step: 60,
        count: 1,
    });
    let series = metrics
        .codes
        .series(service, window.step, window.from, window.count);
    let mut out = String::with_capacity(16 * 1024);
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>tally: Response codes</title><style>{STYLE}</style></head><body><header><h1>Response codes</h1><nav id=\"periods\">"
    );
    for (name, _, _) in PERIODS {
        let on = if name == period.0 {
            " class=\"on\""
        } else {
            ""
        };
        let _ = write!(
            out,
            "<a{on} href=\"{}\">last {name}</a>",
            link(&q, &[("period", Some(name))])
        );
    }
    out.push_str("</nav><nav id=\"services\">Service: ");
    let all_on = if service.is_none() {
        " class=\"on\""
    } else {
        ""
    };
    let _ = write!(
        out,
        "<a{all_on} href=\"{}\">all</a>",
        link(&q, &[("service", None), ("code", None)])
    );
    for s in metrics.codes.services() {
        let on = if service == Some(s.as_str()) {
            " class=\"on\""
        } else {
            ""
        };
        let _ = write!(
            out,
            "<a{on} href=\"{}\">{}</a>",
            link(&q, &[("service", Some(&s)), ("code", None)]),
            html(&s)
        );
    }
    out.push_str("</nav></header><main id=\"main\">");
    chart(&mut out, &series, window);
    // The codes of the period.
    out.push_str("<h2>Codes</h2><div class=\"wide\"><table id=\"codes\"><thead><tr><th>Code</th><th class=\"n\">Requests in the period</th><th class=\"n\">Since tally started</th></tr></thead><tbody>");
    for c in &series {
        let _ = write!(
            out,
            "<tr data-code=\"{0}\"><td><a href=\"{1}\">{0}</a></td><td class=\"n\">{2}</td><td class=\"n\">{3}</td></tr>",
            c.code,
            link(&q, &[("code", Some(&c.code.to_string()))]),
            c.points.iter().sum::<u64>(),
            c.total
        );
    }
    if series.is_empty() {
        out.push_str("<tr><td colspan=\"3\" class=\"note\">No request read yet.</td></tr>");
    }
    out.push_str("</tbody></table></div>");
    // What tally did.
    out.push_str(
        "<h2>What tally did with the lines</h2><div class=\"wide\"><table id=\"traffic\"><tbody>",
    );
    for (name, n) in traffic(metrics) {
        if n > 0 || name.starts_with("lines") || name.starts_with("requests") {
            let _ = write!(
                out,
                "<tr><td>{}</td><td class=\"n\">{n}</td></tr>",
                html(&name)
            );
        }
    }
    out.push_str("</tbody></table></div>");
    // The calls of a code.
    if let Some(code) = code {
        let _ = write!(
            out,
            "<h2 id=\"calls-title\">Latest calls with code {code}</h2>"
        );
        if !details {
            out.push_str("<p class=\"note\">Call details are off: <code>telemetry.calls_per_code</code> is 0, or the listener is not on loopback and <code>telemetry.calls_on_public_listener</code> is false.</p>");
        } else {
            match calls(metrics, &q) {
                Ok(list) => calls_table(&mut out, &q, &list),
                Err(e) => {
                    let _ = write!(out, "<p class=\"note\">{}</p>", html(&e));
                }
            }
        }
    } else {
        out.push_str("<p class=\"note\">Click a code to list its latest calls.</p>");
    }
    let _ = write!(
        out,
        "<p class=\"note\">Updated {} (times are the log's, UTC).</p></main>\
         <script>setInterval(function(){{fetch(location.href,{{cache:'no-store'}}).then(function(r){{return r.text()}}).then(function(t){{\
         var d=new DOMParser().parseFromString(t,'text/html');var m=d.getElementById('main');if(m){{document.getElementById('main').replaceWith(m)}}}}).catch(function(){{}})}},10000)</script></body></html>",
        html(&time_text(to))
    );
    out
}

fn calls_table(out: &mut String, q: &Query, list: &[Shown]) {
    out.push_str("<div class=\"wide\"><table id=\"calls\"><thead><tr><th>Time</th><th>Service</th><th>Application</th><th>Method</th><th>Path</th><th>Host</th><th>Status</th><th>What tally did</th><th>Line</th></tr></thead><tbody>");
    for c in list {
        let application = match &c.application {
            Some(a) => format!(
                "<a href=\"{}\">{}</a>",
                link(q, &[("application", Some(a))]),
                html(a)
            ),
            None => "<span class=\"note\">none</span>".into(),
        };
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{application}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            html(&time_text(c.time)),
            html(&c.service),
            html(&c.method),
            html(&c.path),
            html(&c.host),
            c.status,
            html(&c.outcome),
            html(&c.line)
        );
    }
    if list.is_empty() {
        out.push_str("<tr><td colspan=\"9\" class=\"note\">No call kept with this code.</td></tr>");
    }
    out.push_str("</tbody></table></div>");
}

/// A stacked bar chart of requests per class and bucket, as inline SVG.
fn chart(out: &mut String, series: &[Counted], window: Window) {
    let classes = classes(series, window.count);
    let (width, height, top, bottom) = (1000.0f64, 260.0f64, 10.0f64, 30.0f64);
    let totals: Vec<u64> = (0..window.count)
        .map(|i| classes.iter().map(|(_, _, p)| p[i]).sum())
        .collect();
    let max = totals.iter().copied().max().unwrap_or(0).max(1);
    let bar = width / window.count.max(1) as f64;
    let scale = (height - top - bottom) / max as f64;
    let _ = write!(
        out,
        "<div id=\"chart\"><svg viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"Requests per code class over time\">"
    );
    for i in 0..window.count {
        let mut y = height - bottom;
        for (name, _, points) in &classes {
            let n = points[i];
            if n == 0 {
                continue;
            }
            let h = n as f64 * scale;
            y -= h;
            let color = color_of(name);
            let _ = write!(
                out,
                "<rect class=\"bar c{}\" x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{color}\"><title>{} {}: {n}</title></rect>",
                html(name),
                i as f64 * bar,
                (bar * 0.9).max(0.5),
                html(&time_text(window.from + window.step * i as i64)),
                html(name)
            );
        }
    }
    let _ = write!(
        out,
        "<line x1=\"0\" y1=\"{0}\" x2=\"{width}\" y2=\"{0}\" stroke=\"#999\"/>\
         <text x=\"2\" y=\"{1}\" font-size=\"12\">{2}</text><text x=\"{width}\" y=\"{1}\" font-size=\"12\" text-anchor=\"end\">{3}</text>\
         <text x=\"2\" y=\"{4}\" font-size=\"12\">{max} requests per {5} s</text></svg>",
        height - bottom,
        height - 10.0,
        html(&time_text(window.from)),
        html(&time_text(window.from + window.step * window.count as i64)),
        top + 12.0,
        window.step
    );
    out.push_str("<div class=\"legend\">");
    for (name, total, points) in &classes {
        let color = color_of(name);
        let _ = write!(
            out,
            "<span data-class=\"{0}\"><i style=\"background:{color}\"></i>{0}: {1} ({total} since start)</span>",
            html(name),
            points.iter().sum::<u64>()
        );
    }
    out.push_str("</div></div>");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever a log says: times past year 9999 are shown as epoch seconds; windows of any
    /// bounds are built without overflow.
    #[test]
    fn times_and_windows_from_any_input() {
        assert_eq!(time_text(0), "1970-01-01T00:00:00Z");
        assert_eq!(time_text(300_000_000_000), "300000000000");
        assert_eq!(time_text(253_402_300_799), "9999-12-31T23:59:59Z");
        assert_eq!(time_text(253_402_300_800), "253402300800");
        assert_eq!(time_text(-5), "1970-01-01T00:00:00Z");
        let w = Window::new(0, 1 << 40, None).unwrap();
        assert_eq!((w.step, w.count), (3600, 24));
        let w = Window::new(100, 100, Some(10)).unwrap();
        assert_eq!((w.from, w.count), (100, 1));
        assert!(Window::new(0, 10, Some(7)).is_err());
    }
}
