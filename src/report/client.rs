//! The HTTP side of the Service Management API: report and authorize calls, and what their answers
//! mean.

use std::time::Duration;

use super::MASK;
use crate::aggregate::Application;
use crate::config::BackendAuth;

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

/// What an authorize call says of a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existence {
    /// The application exists (authorized or not: limits and suspension do not matter to a report).
    Exists,
    /// 3scale does not know it: a report holding it would be dropped whole.
    Missing,
}

/// Sends report and authorize calls over one keep-alive connection pool.
pub struct Client {
    http: reqwest::Client,
    report: reqwest::Url,
    authorize: reqwest::Url,
}

impl Client {
    pub fn new(
        base: &reqwest::Url,
        timeout: Duration,
        ca_file: Option<&std::path::Path>,
    ) -> anyhow::Result<Client> {
        let join = |path: &str| {
            base.join(path)
                .map_err(|e| anyhow::anyhow!("backend.url {base}: {e}"))
        };
        let mut http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .http1_only()
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("tally/", env!("CARGO_PKG_VERSION")));
        if let Some(file) = ca_file {
            let pem = std::fs::read(file)
                .map_err(|e| anyhow::anyhow!("backend.ca_file {}: {e}", file.display()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| anyhow::anyhow!("backend.ca_file {}: {e}", file.display()))?
            {
                http = http.add_root_certificate(cert);
            }
        }
        let http = http
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the HTTP client: {e}"))?;
        Ok(Client {
            http,
            report: join("transactions.xml")?,
            authorize: join("transactions/authorize.xml")?,
        })
    }

    /// One report call. `body` is an encoded [`super::ReportForm`] holding `auth`'s secret.
    pub async fn report(&self, body: &str, auth: &BackendAuth) -> Result<(), ReportError> {
        let response = self
            .http
            .post(self.report.clone())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body.to_owned())
            .send()
            .await
            .map_err(|e| ReportError::Transient(describe(e)))?;
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
            }
            .redact(auth.field().1.expose()));
        }
        Err(ReportError::Transient(format!("HTTP {}", status.as_u16())))
    }

    /// Asks 3scale whether an application exists.
    pub async fn authorize(
        &self,
        auth: &BackendAuth,
        service_id: &str,
        application: &Application,
    ) -> Result<Existence, ReportError> {
        let (field, secret) = auth.field();
        let (credential, value) = application.field();
        let response = self
            .http
            .get(self.authorize.clone())
            .query(&[
                (field, secret.expose()),
                ("service_id", service_id),
                (credential, value),
            ])
            .send()
            .await
            .map_err(|e| ReportError::Transient(describe(e)))?;
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        let (code, message) = xml_error(&text);
        match (status, code.as_str()) {
            (200 | 409, _) => Ok(Existence::Exists),
            // The application exists but the call lacked its key or it is suspended: a report is fine.
            (403, "application_key_invalid" | "application_not_active") => Ok(Existence::Exists),
            (403 | 404, "user_key_invalid" | "application_not_found") => Ok(Existence::Missing),
            (400..=499, _) => Err(ReportError::Rejected {
                status,
                code,
                message,
            }
            .redact(secret.expose())),
            _ => Err(ReportError::Transient(format!("HTTP {status}"))),
        }
    }
}

/// reqwest's error with its causes, which say what actually went wrong (refused, reset, timed out).
/// Without the URL: an authorize URL holds the service token.
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = if e.is_timeout() {
        "timed out".to_string()
    } else {
        e.to_string()
    };
    let mut cause = std::error::Error::source(&e);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_errors_are_read() {
        assert_eq!(
            xml_error("<?xml version=\"1.0\" encoding=\"UTF-8\"?><error code=\"service_token_invalid\">service token &quot;x&quot; is invalid</error>"),
            ("service_token_invalid".into(), "service token \"x\" is invalid".into())
        );
        assert_eq!(xml_error("oops"), ("unknown".into(), "oops".into()));
    }
}
