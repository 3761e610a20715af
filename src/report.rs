//! Transaction batches → `POST /transactions.xml` calls to the 3scale Service Management API.

use std::time::Duration;

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use crate::aggregate::Transaction;
use crate::config::BackendAuth;

/// What masks the service token or provider key wherever a report body is shown.
pub const MASK: &str = "***";

/// The form of one report call.
pub struct ReportForm<'a> {
    pub auth: &'a BackendAuth,
    pub service_id: &'a str,
    pub transactions: &'a [Transaction],
    /// Shows the secret as [`MASK`] (for `--dry-run`).
    pub masked: bool,
}

impl Serialize for ReportForm<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut form = s.serialize_map(None)?;
        let (field, secret) = self.auth.field();
        form.serialize_entry(field, if self.masked { MASK } else { secret.expose() })?;
        form.serialize_entry("service_id", self.service_id)?;
        // One key buffer for the whole call: no allocation per transaction.
        let mut key = String::with_capacity(48);
        for (i, t) in self.transactions.iter().enumerate() {
            let (credential, value) = t.application.field();
            let credential = if credential == "user_key" {
                "[user_key]"
            } else {
                "[app_id]"
            };
            entry(&mut form, &mut key, i, credential, value)?;
            entry(&mut form, &mut key, i, "[usage][hits]", &t.hits)?;
            entry(&mut form, &mut key, i, "[timestamp]", &t.timestamp)?;
            if let Some(code) = t.code {
                entry(&mut form, &mut key, i, "[log][code]", &code)?;
            }
        }
        form.end()
    }
}

/// Writes `transactions[i]<name>=value`.
fn entry<M: SerializeMap, V: Serialize + ?Sized>(
    form: &mut M,
    key: &mut String,
    i: usize,
    name: &str,
    value: &V,
) -> Result<(), M::Error> {
    use std::fmt::Write;
    key.clear();
    let _ = write!(key, "transactions[{i}]{name}");
    form.serialize_entry(key.as_str(), value)
}

/// Encodes a report body into `out` (cleared first), reusing its allocation.
pub fn encode(form: &ReportForm<'_>, out: &mut String) -> Result<(), serde_urlencoded::ser::Error> {
    out.clear();
    let mut target = form_urlencoded::Serializer::new(out);
    form.serialize(serde_urlencoded::Serializer::new(&mut target))?;
    Ok(())
}

/// Why a report call did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The backend refused the whole call (bad token, unknown service...): retrying the same call
    /// cannot help until the configuration is fixed.
    #[error("the 3scale backend rejected the report: HTTP {status}, error code {code}: {message}")]
    Rejected {
        status: u16,
        code: String,
        message: String,
    },
    /// 5xx, timeout, connection trouble: worth retrying.
    #[error("report call failed, will retry: {0}")]
    Transient(String),
}

impl ReportError {
    /// The backend echoes a bad service token in its message: mask it before it is logged.
    fn redact(self, secret: &str) -> ReportError {
        match self {
            ReportError::Rejected {
                status,
                code,
                message,
            } => ReportError::Rejected {
                status,
                code,
                message: message.replace(secret, MASK),
            },
            other => other,
        }
    }
}

/// Sends report calls over one keep-alive connection pool.
pub struct Client {
    http: reqwest::Client,
    endpoint: reqwest::Url,
}

impl Client {
    pub fn new(base: &reqwest::Url, timeout: Duration) -> anyhow::Result<Client> {
        let endpoint = base
            .join("transactions.xml")
            .map_err(|e| anyhow::anyhow!("backend.url {base}: {e}"))?;
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("tally/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the HTTP client: {e}"))?;
        Ok(Client { http, endpoint })
    }

    /// One report call. `body` is an encoded [`ReportForm`].
    pub async fn report(&self, body: &str) -> Result<(), ReportError> {
        let response = self
            .http
            .post(self.endpoint.clone())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body.to_owned())
            .send()
            .await
            .map_err(|e| ReportError::Transient(describe(&e)))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text = response.text().await.unwrap_or_default();
        if status.is_client_error() {
            let (code, message) = xml_error(&text);
            return Err(ReportError::Rejected {
                status: status.as_u16(),
                code,
                message,
            });
        }
        Err(ReportError::Transient(format!("HTTP {}", status.as_u16())))
    }
}

/// reqwest's error with its causes, which say what actually went wrong (refused, reset, timed out).
fn describe(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        "timed out".to_string()
    } else {
        e.to_string()
    };
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// `<error code="CODE">message</error>` → (CODE, message); the raw text when the body is not that.
pub fn xml_error(body: &str) -> (String, String) {
    let parsed = (|| {
        let start = body.find("<error")?;
        let rest = &body[start..];
        let code_at = rest.find("code=\"")? + 6;
        let code_end = code_at + rest[code_at..].find('"')?;
        let msg_at = code_end + rest[code_end..].find('>')? + 1;
        let msg_end = msg_at + rest[msg_at..].find("</error>")?;
        Some((
            rest[code_at..code_end].to_string(),
            unescape(&rest[msg_at..msg_end]),
        ))
    })();
    parsed.unwrap_or_else(|| {
        let excerpt: String = body.chars().take(200).collect();
        ("unknown".to_string(), excerpt)
    })
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// Exponential backoff with full jitter, capped.
pub struct Backoff {
    next: Duration,
    first: Duration,
    cap: Duration,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff {
            next: first,
            first,
            cap,
        }
    }

    /// The wait before the next try: uniform in [half, full] of the current step, which then doubles.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.cap);
        let half = step / 2;
        half + half.mul_f64(fastrand::f64())
    }

    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// Where batches go.
pub enum Sink {
    /// The Service Management API.
    Backend(Client),
    /// Standard output, with the secret masked (`--dry-run`).
    DryRun(reqwest::Url),
}

/// What one service's report loop needs.
pub struct ServiceReport {
    pub service_id: String,
    pub auth: BackendAuth,
    pub sink: Sink,
    /// Where the checkpoints go once a call is accepted.
    pub state: crate::state::ServiceState,
    /// A rejected call (whole-request 4xx) ends the loop with an error instead of being retried
    /// slowly (for `--once`, where nobody would fix the configuration while tally waits).
    pub fail_on_rejection: bool,
}

/// How long to wait before retrying a call the backend rejected: slow, so a fixed token is picked up
/// without a restart, without hammering the backend.
const REJECTED_RETRY: Duration = Duration::from_secs(60);

/// Sends each batch until the backend accepts it, and moves the checkpoints on. Ends when the batch
/// channel closes.
pub async fn run(
    mut report: ServiceReport,
    mut batches: tokio::sync::mpsc::Receiver<crate::aggregate::Batch>,
    metrics: std::sync::Arc<crate::telemetry::Metrics>,
) -> Result<(), ReportError> {
    use crate::telemetry::Metrics;
    let mut body = String::new();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    while let Some(batch) = batches.recv().await {
        if !batch.transactions.is_empty() {
            let form = ReportForm {
                auth: &report.auth,
                service_id: &report.service_id,
                transactions: &batch.transactions,
                masked: matches!(report.sink, Sink::DryRun(_)),
            };
            if let Err(e) = encode(&form, &mut body) {
                // Only a bug can get here: every value is a string or an integer.
                tracing::error!(error = %e, "cannot encode a report; batch dropped");
                continue;
            }
            persist(&report.service_id, &mut backoff, || {
                report.state.begin(&batch.advances)
            })
            .await;
            send(
                &report,
                &body,
                batch.transactions.len(),
                &mut backoff,
                &metrics,
            )
            .await?;
            Metrics::add(
                &metrics.transactions_reported,
                batch.transactions.len() as u64,
            );
            Metrics::add(&metrics.requests_reported, batch.requests);
        }
        persist(&report.service_id, &mut backoff, || {
            report.state.commit(&batch.advances)
        })
        .await;
        for a in &batch.advances {
            if a.closed {
                metrics.files.closed(a.source, a.key);
            } else {
                metrics
                    .files
                    .committed(a.source, a.key, a.offset, a.line_time);
            }
        }
    }
    Ok(())
}

/// One call, retried until the backend accepts it.
async fn send(
    report: &ServiceReport,
    body: &str,
    transactions: usize,
    backoff: &mut Backoff,
    metrics: &crate::telemetry::Metrics,
) -> Result<(), ReportError> {
    use crate::telemetry::Metrics;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let result = match &report.sink {
            Sink::DryRun(url) => {
                print_dry_run(url, &report.service_id, transactions, body);
                Ok(())
            }
            Sink::Backend(client) => client
                .report(body)
                .await
                .map_err(|e| e.redact(report.auth.field().1.expose())),
        };
        Metrics::add(&metrics.report_calls, 1);
        match result {
            Ok(()) => {
                tracing::debug!(service_id = %report.service_id, transactions, attempt, "report accepted");
                backoff.reset();
                return Ok(());
            }
            Err(e @ ReportError::Transient(_)) => {
                Metrics::add(&metrics.report_failures, 1);
                let wait = backoff.next_delay();
                tracing::warn!(service_id = %report.service_id, error = %e, attempt, retry_in = ?wait, "report failed");
                tokio::time::sleep(wait).await;
            }
            Err(e @ ReportError::Rejected { .. }) => {
                Metrics::add(&metrics.report_rejections, 1);
                tracing::error!(service_id = %report.service_id, error = %e, attempt, retry_in = ?REJECTED_RETRY,
                    "3scale rejected the report: check backend.service_token and the service_id; the batch is kept");
                if report.fail_on_rejection {
                    return Err(e);
                }
                tokio::time::sleep(REJECTED_RETRY).await;
            }
        }
    }
}

/// Writes the state, retrying while the disk refuses: reporting on without recording it would
/// report the same lines again after a restart.
async fn persist(
    service_id: &str,
    backoff: &mut Backoff,
    mut write: impl FnMut() -> Result<(), crate::state::StateError>,
) {
    while let Err(e) = write() {
        let wait = backoff.next_delay();
        tracing::error!(service_id, error = %e, retry_in = ?wait, "cannot write the state; reporting waits");
        tokio::time::sleep(wait).await;
    }
}

/// One report call as `--dry-run` shows it: the request line, then the body decoded, one field per
/// line, the secret masked.
fn print_dry_run(url: &reqwest::Url, service_id: &str, transactions: usize, body: &str) {
    use std::io::Write;
    let endpoint = url
        .join("transactions.xml")
        .map(|u| u.to_string())
        .unwrap_or_default();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "POST {endpoint} service_id={service_id} transactions={transactions}"
    );
    for (key, value) in form_urlencoded::parse(body.as_bytes()) {
        let _ = writeln!(out, "  {key}={value}");
    }
    let _ = writeln!(out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::Application;
    use crate::config::Secret;

    fn auth() -> BackendAuth {
        let c = crate::config::Config::parse(
            std::path::Path::new("t.toml"),
            "[backend]\nservice_token = \"s3cr3t&=\"\n[[sources]]\npath = \"a\"\nservice_id = \"1\"\n",
        )
        .unwrap();
        c.backend.auth
    }

    fn secret_of(a: &BackendAuth) -> &Secret {
        a.field().1
    }

    #[test]
    fn exact_body_with_response_codes() {
        let a = auth();
        let txs = vec![
            Transaction {
                application: Application::UserKey("k1".into()),
                timestamp: 1_795_515_300,
                hits: 1,
                code: Some(200),
            },
            Transaction {
                application: Application::AppId("a+b é/&=".into()),
                timestamp: 1_795_515_301,
                hits: 3,
                code: None,
            },
        ];
        let mut body = String::from("stale content");
        encode(
            &ReportForm {
                auth: &a,
                service_id: "42",
                transactions: &txs,
                masked: false,
            },
            &mut body,
        )
        .unwrap();
        assert_eq!(
            body,
            "service_token=s3cr3t%26%3D&service_id=42\
             &transactions%5B0%5D%5Buser_key%5D=k1\
             &transactions%5B0%5D%5Busage%5D%5Bhits%5D=1\
             &transactions%5B0%5D%5Btimestamp%5D=1795515300\
             &transactions%5B0%5D%5Blog%5D%5Bcode%5D=200\
             &transactions%5B1%5D%5Bapp_id%5D=a%2Bb+%C3%A9%2F%26%3D\
             &transactions%5B1%5D%5Busage%5D%5Bhits%5D=3\
             &transactions%5B1%5D%5Btimestamp%5D=1795515301"
        );
        let decoded: Vec<(String, String)> = serde_urlencoded::from_str(&body).unwrap();
        assert_eq!(
            decoded[0],
            ("service_token".into(), secret_of(&a).expose().into())
        );
        assert_eq!(
            decoded[6],
            ("transactions[1][app_id]".into(), "a+b é/&=".into())
        );
    }

    #[test]
    fn masked_body_hides_the_secret() {
        let a = auth();
        let mut body = String::new();
        encode(
            &ReportForm {
                auth: &a,
                service_id: "42",
                transactions: &[],
                masked: true,
            },
            &mut body,
        )
        .unwrap();
        assert_eq!(body, "service_token=***&service_id=42");
    }

    #[test]
    fn xml_errors_are_read() {
        assert_eq!(
            xml_error("<?xml version=\"1.0\" encoding=\"UTF-8\"?><error code=\"service_token_invalid\">service token &quot;x&quot; is invalid</error>"),
            ("service_token_invalid".into(), "service token \"x\" is invalid".into())
        );
        assert_eq!(xml_error("oops"), ("unknown".into(), "oops".into()));
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays[7] >= Duration::from_millis(500) && delays[7] <= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
