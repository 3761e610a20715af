//! `tally codes`: the Response codes page's tables in a terminal, for hosts without a browser,
//! read from a running tally's API (`/api/codes`, `/api/calls`).

use std::io::{Read, Write};
use std::time::Duration;

use serde::Deserialize;

/// What `tally codes` asks for.
#[derive(Debug, Clone, Default)]
pub struct CodesQuery {
    /// The telemetry listener, `http://host:port`.
    pub url: String,
    /// Only this service.
    pub service: Option<String>,
    /// Also list the latest calls with this code.
    pub code: Option<u16>,
    /// How far back: 15m, 1h, 6h or 24h.
    pub period: Duration,
}

#[derive(Deserialize)]
struct CodesAnswer {
    step: i64,
    codes: Vec<CodeRow>,
    traffic: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct CodeRow {
    code: u16,
    class: String,
    total: u64,
    in_window: u64,
}

#[derive(Deserialize)]
struct CallsAnswer {
    calls: Vec<CallRow>,
    off: Option<String>,
}

#[derive(Deserialize)]
struct CallRow {
    time_text: String,
    service: String,
    application: Option<String>,
    method: String,
    path: String,
    status: u16,
    outcome: String,
    line: String,
}

/// The codes table (and the calls of `query.code`), as text.
pub fn codes_report(query: &CodesQuery) -> Result<String, String> {
    let service = query
        .service
        .as_ref()
        .map(|s| {
            format!(
                "&service={}",
                form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
            )
        })
        .unwrap_or_default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let from = now.saturating_sub(query.period.as_secs().max(1) - 1);
    let body = get(
        &query.url,
        &format!("/api/codes?from={from}&to={now}{service}"),
    )?;
    let codes: CodesAnswer = serde_json::from_str(&body)
        .map_err(|e| format!("{}: not tally's /api/codes answer: {e}", query.url))?;
    let mut out = format!(
        "Response codes, last {} ({} s steps), service {}\n{:<6} {:<6} {:>12} {:>14}\n",
        humantime::format_duration(query.period),
        codes.step,
        query.service.as_deref().unwrap_or("all"),
        "code",
        "class",
        "in period",
        "since start"
    );
    for c in &codes.codes {
        out.push_str(&format!(
            "{:<6} {:<6} {:>12} {:>14}\n",
            c.code, c.class, c.in_window, c.total
        ));
    }
    if codes.codes.is_empty() {
        out.push_str("(no request read yet)\n");
    }
    out.push_str("\nWhat tally did with the lines:\n");
    for (name, n) in &codes.traffic {
        let n = n.as_u64().unwrap_or(0);
        if n > 0 || name.starts_with("lines") || name.starts_with("requests") {
            out.push_str(&format!("  {name:<60} {n:>12}\n"));
        }
    }
    if let Some(code) = query.code {
        let body = get(&query.url, &format!("/api/calls?code={code}{service}"))?;
        let calls: CallsAnswer = serde_json::from_str(&body)
            .map_err(|e| format!("{}: not tally's /api/calls answer: {e}", query.url))?;
        out.push_str(&format!("\nLatest calls with code {code}:\n"));
        if let Some(off) = calls.off {
            out.push_str(&format!("  {off}\n"));
        }
        for c in &calls.calls {
            out.push_str(&format!(
                "  {} service {} {} {} {} {} ({})\n    {}\n",
                c.time_text,
                c.service,
                c.application.as_deref().unwrap_or("(no credential)"),
                c.method,
                c.path,
                c.status,
                c.outcome,
                c.line
            ));
        }
        if calls.calls.is_empty() {
            out.push_str("  (none kept)\n");
        }
    }
    Ok(out)
}

/// `GET path` on the listener at `url` (plain HTTP, as tally serves it): the body of a 200.
fn get(url: &str, path: &str) -> Result<String, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    let host = parsed
        .host_str()
        .ok_or_else(|| format!("`{url}` has no host"))?;
    let port = parsed.port_or_known_default().unwrap_or(80);
    let mut stream = std::net::TcpStream::connect((host, port)).map_err(|e| {
        format!("cannot reach tally at {url}: {e} (is it running, with telemetry.listen set?)")
    })?;
    let timeout = Some(Duration::from_secs(10));
    let _ = stream.set_read_timeout(timeout);
    let _ = stream.set_write_timeout(timeout);
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("{url}: {e}"))?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .map_err(|e| format!("{url}: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{url}: not an HTTP answer"))?;
    let status = head.split(' ').nth(1).unwrap_or_default();
    if status != "200" {
        return Err(format!("{url}{path}: HTTP {status}: {}", body.trim()));
    }
    Ok(body.to_string())
}
