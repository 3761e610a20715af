//! The HTTP side of the Service Management API: report and authorize calls, what their answers
//! mean, and the response timeout that adapts to a slow 3scale.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::MASK;
use crate::aggregate::Application;
use crate::config::BackendAuth;
use crate::telemetry::{printable, Cause};

/// A call that failed in a way worth retrying.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub cause: Cause,
    /// What went wrong, for the log.
    pub detail: String,
    /// The request may have reached 3scale and been processed (its answer timed out, or the
    /// connection broke after it was sent): resending it may count its transactions twice.
    pub ambiguous: bool,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ReportError {
    /// The backend refused the whole call (bad token, unknown service...): retrying the same call
    /// cannot help until the configuration is fixed.
    #[error("the 3scale backend rejected the report: HTTP {status}, error code {code}: {message}")]
    Rejected {
        status: u16,
        code: String,
        message: String,
    },
    /// 5xx, timeout, connection trouble: worth retrying.
    #[error("call failed, will retry: {}", .0.detail)]
    Transient(Failure),
    /// A task of tally's own ended abnormally.
    #[error("{0}")]
    Internal(String),
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

/// The kind of credential a service authenticates with: its authentication mode (apisonator's
/// `backend_version`: `1` takes user_key, `2` and `oauth` take app_id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    UserKey,
    AppId,
}

impl Kind {
    pub(crate) fn of(application: &Application) -> Kind {
        match application {
            Application::UserKey(_) => Kind::UserKey,
            Application::AppId(_) => Kind::AppId,
        }
    }

    pub(crate) fn other(self) -> Kind {
        match self {
            Kind::UserKey => Kind::AppId,
            Kind::AppId => Kind::UserKey,
        }
    }

    /// Its name as the query parameter and the `credentials.mode` setting spell it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::UserKey => "user_key",
            Kind::AppId => "app_id",
        }
    }
}

/// What an authorize call says of a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Existence {
    /// The application exists (authorized or not: limits and suspension do not matter to a report).
    Exists,
    /// 3scale does not know it: a report holding it would be dropped whole.
    Missing,
    /// The service does not authenticate with this kind of credential: it takes the other kind.
    /// Nothing is known of the application (3scale never looked it up).
    OtherKind(Kind),
}

/// What 3scale's authorize answer means for a credential of kind `asked`. apisonator looks the
/// credential up by the service's mode only: asked about an app_id, a user_key service looks for a
/// user_key that is not there and says "user key is missing" (a user_key on an app_id service:
/// "application id is missing"): the codes of an unknown credential, with these messages
/// (apisonator's `UserKeyInvalid` and `ApplicationNotFound` of a blank key, raised by
/// `Transactor#validate`).
fn existence(status: u16, body: &str, asked: Kind) -> Result<Existence, ReportError> {
    let (code, message) = xml_error(body);
    match (status, code.as_str()) {
        // 3scale's answer about an application that exists is a <status> document; anything
        // else vouches for nothing.
        (200 | 409, _) if body.contains("<status>") => Ok(Existence::Exists),
        // The application exists but the call lacked its key or it is suspended: a report is fine.
        (403, "application_key_invalid" | "application_not_active") => Ok(Existence::Exists),
        (403 | 404, "user_key_invalid")
            if asked == Kind::AppId && message.trim() == "user key is missing" =>
        {
            Ok(Existence::OtherKind(Kind::UserKey))
        }
        (403 | 404, "application_not_found")
            if asked == Kind::UserKey && message.trim() == "application id is missing" =>
        {
            Ok(Existence::OtherKind(Kind::AppId))
        }
        (403 | 404, "user_key_invalid" | "application_not_found") => Ok(Existence::Missing),
        (400..=499, _) => Err(ReportError::Rejected {
            status,
            code,
            message,
        }),
        _ => Err(unexpected(status)),
    }
}

/// How long a connected call waits for its answer. It doubles at each timeout (up to 16 times the
/// configured value), is raised to twice any answer time seen by a probe, and decays back towards
/// the configured value as answers come in time: a 3scale that got slow gets calls that wait long
/// enough, instead of calls that give up, are processed anyway, and are sent again.
#[derive(Debug)]
pub(crate) struct ResponseTimeout {
    configured: Duration,
    current: Mutex<Duration>,
}

impl ResponseTimeout {
    const CAP_FACTOR: u32 = 16;

    pub(crate) fn new(configured: Duration) -> ResponseTimeout {
        ResponseTimeout {
            configured,
            current: Mutex::new(configured),
        }
    }

    pub(crate) fn get(&self) -> Duration {
        self.current.lock().map_or(self.configured, |c| *c)
    }

    fn update(&self, f: impl FnOnce(Duration) -> Duration) -> Duration {
        let cap = self.configured * Self::CAP_FACTOR;
        match self.current.lock() {
            Ok(mut c) => {
                *c = f(*c).clamp(self.configured, cap);
                *c
            }
            Err(_) => self.configured,
        }
    }

    /// A call made with timeout `used` timed out: wait twice that from now on. Calls under way
    /// together that time out together double it once, not once each.
    pub(crate) fn timed_out(&self, used: Duration) -> Duration {
        self.update(|c| c.max(used * 2))
    }

    /// 3scale answered in `took`: at least twice that from now on.
    pub(crate) fn answered_in(&self, took: Duration) -> Duration {
        self.update(|c| c.max(took * 2))
    }

    /// A report call was answered in time, in `took`: decay by a quarter, never below twice `took`.
    fn settle(&self, took: Duration) {
        self.update(|c| c.min((c * 3 / 4).max(took * 2)));
    }
}

/// Sends report and authorize calls over one keep-alive connection pool.
pub(crate) struct Client {
    http: reqwest::Client,
    report: reqwest::Url,
    authorize: reqwest::Url,
    pub timeout: ResponseTimeout,
}

impl Client {
    pub(crate) fn new(
        base: &reqwest::Url,
        connect_timeout: Duration,
        response_timeout: Duration,
        ca_certificates: &[reqwest::Certificate],
    ) -> anyhow::Result<Client> {
        let join = |path: &str| {
            base.join(path)
                .map_err(|e| anyhow::anyhow!("backend.url {base}: {e}"))
        };
        let mut http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .http1_only()
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("tally/", env!("CARGO_PKG_VERSION")));
        for cert in ca_certificates {
            http = http.add_root_certificate(cert.clone());
        }
        let http = http
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the HTTP client: {e}"))?;
        Ok(Client {
            http,
            report: join("transactions.xml")?,
            authorize: join("transactions/authorize.xml")?,
            timeout: ResponseTimeout::new(response_timeout),
        })
    }

    /// The client of `[backend]`'s Service Management API, with its timeouts and CA certificates.
    pub(crate) fn for_backend(backend: &crate::config::Backend) -> anyhow::Result<Client> {
        Client::new(
            &backend.url,
            backend.connect_timeout,
            backend.timeout,
            backend
                .ca_file
                .as_ref()
                .map_or(&[][..], |(_, certificates)| certificates),
        )
    }

    /// Sends a request with the current response timeout and reads the answer's status and body.
    /// The answer time of a report call (the call that matters) lets the timeout decay.
    async fn exchange(
        &self,
        request: reqwest::RequestBuilder,
        settle: bool,
    ) -> Result<(u16, String), ReportError> {
        let timeout = self.timeout.get();
        let started = Instant::now();
        let answer = async {
            let response = request.timeout(timeout).send().await?;
            let status = response.status().as_u16();
            let text = response.text().await?;
            Ok::<_, reqwest::Error>((status, text))
        }
        .await;
        match answer {
            Ok(answer) => {
                if settle {
                    self.timeout.settle(started.elapsed());
                }
                Ok(answer)
            }
            Err(e) => {
                let failure = classify(e, timeout);
                if failure.cause == Cause::Timeout {
                    self.timeout.timed_out(timeout);
                }
                Err(ReportError::Transient(failure))
            }
        }
    }

    /// One report call. `body` is an encoded [`super::ReportForm`] holding `auth`'s secret.
    pub(crate) async fn report(&self, body: &str, auth: &BackendAuth) -> Result<(), ReportError> {
        let request = self
            .http
            .post(self.report.clone())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body.to_owned());
        let (status, text) = self.exchange(request, true).await?;
        match status {
            // 3scale answers 202 and nothing else: a 200 comes from something that is not 3scale
            // (a portal, a mistyped URL), and taking it as accepted would lose the call.
            202 => Ok(()),
            400..=499 => {
                let (code, message) = xml_error(&text);
                Err(ReportError::Rejected {
                    status,
                    code,
                    message,
                }
                .redact(auth.field().1.expose()))
            }
            _ => Err(unexpected(status)),
        }
    }

    /// Asks 3scale whether an application exists.
    pub(crate) async fn authorize(
        &self,
        auth: &BackendAuth,
        service_id: &str,
        application: &Application,
    ) -> Result<Existence, ReportError> {
        let (field, secret) = auth.field();
        let (credential, value) = application.field();
        let request = self.http.get(self.authorize.clone()).query(&[
            (field, secret.expose()),
            ("service_id", service_id),
            (credential, value),
        ]);
        let (status, text) = self.exchange(request, false).await?;
        existence(status, &text, Kind::of(application)).map_err(|e| e.redact(secret.expose()))
    }

    /// Asks 3scale whether the service has `metric`: an authorize call of an application that
    /// exists, with a usage of it (it counts nothing).
    pub(crate) async fn check_metric(
        &self,
        auth: &BackendAuth,
        service_id: &str,
        application: &Application,
        metric: &str,
    ) -> Result<MetricAnswer, ReportError> {
        let (field, secret) = auth.field();
        let (credential, value) = application.field();
        let usage = format!("usage[{metric}]");
        let request = self.http.get(self.authorize.clone()).query(&[
            (field, secret.expose()),
            ("service_id", service_id),
            (credential, value),
            (usage.as_str(), "1"),
        ]);
        let (status, text) = self.exchange(request, false).await?;
        metric_answer(status, &text).map_err(|e| e.redact(secret.expose()))
    }
}

/// What an authorize call with a usage says of its metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MetricAnswer {
    /// The service has it.
    Exists,
    /// It does not (`metric_invalid`): a report naming it would be dropped whole.
    Unknown,
    /// The answer is about something else (the application, its key): ask with another one.
    Inconclusive,
}

/// apisonator checks a usage's metrics with the application's usage limits, after the
/// application itself: only an authorized answer, or one refused for its limits, vouches for the
/// metric.
fn metric_answer(status: u16, body: &str) -> Result<MetricAnswer, ReportError> {
    let (code, message) = xml_error(body);
    match (status, code.as_str()) {
        (200, _) if body.contains("<authorized>true</authorized>") => Ok(MetricAnswer::Exists),
        (409, _) if body.contains("usage limits are exceeded") => Ok(MetricAnswer::Exists),
        (200 | 409, _) if body.contains("<status>") => Ok(MetricAnswer::Inconclusive),
        (404, "metric_invalid") => Ok(MetricAnswer::Unknown),
        (
            403 | 404,
            "user_key_invalid"
            | "application_not_found"
            | "application_key_invalid"
            | "application_not_active",
        ) => Ok(MetricAnswer::Inconclusive),
        (400..=499, _) => Err(ReportError::Rejected {
            status,
            code,
            message,
        }),
        _ => Err(unexpected(status)),
    }
}

/// An answer that is neither success nor refusal: a 5xx, or one that is not 3scale's (another
/// 2xx, a 1xx/3xx, a 200 without 3scale's XML). 3scale did not take the call; try again.
fn unexpected(status: u16) -> ReportError {
    let (cause, detail) = if status >= 500 {
        (Cause::Http5xx, format!("HTTP {status}"))
    } else {
        (
            Cause::Unexpected,
            format!("HTTP {status}, not an answer of 3scale's Service Management API: check backend.url"),
        )
    };
    ReportError::Transient(Failure {
        cause,
        detail,
        ambiguous: false,
    })
}

/// What a failed exchange means. A call that never connected cannot have been processed; any other
/// failure (timed out waiting, connection broken) may have reached 3scale.
fn classify(e: reqwest::Error, timeout: Duration) -> Failure {
    let connect = e.is_connect();
    let cause = if connect {
        Cause::Connection
    } else if e.is_timeout() {
        Cause::Timeout
    } else {
        Cause::Connection
    };
    let detail = if cause == Cause::Timeout {
        format!("no answer within {}", shown(timeout))
    } else {
        describe(e)
    };
    Failure {
        cause,
        detail,
        ambiguous: !connect,
    }
}

/// A duration as logs show it: to the millisecond.
pub(super) fn shown(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64))
}

/// reqwest's error with its causes, which say what actually went wrong (refused, reset, timed out).
/// Without the URL: an authorize URL holds the service token.
pub(crate) fn describe(e: reqwest::Error) -> String {
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
    printable(&text).into_owned()
}

/// `<error code="CODE">message</error>` → (CODE, message); the raw text when the body is not that.
/// Both come from outside: control characters are escaped.
pub(crate) fn xml_error(body: &str) -> (String, String) {
    let parsed = (|| {
        let start = body.find("<error")?;
        let rest = &body[start..];
        let code_at = rest.find("code=\"")? + 6;
        let code_end = code_at + rest[code_at..].find('"')?;
        let msg_at = code_end + rest[code_end..].find('>')? + 1;
        let msg_end = msg_at + rest[msg_at..].find("</error>")?;
        Some((
            printable(&rest[code_at..code_end]).into_owned(),
            printable(&unescape(&rest[msg_at..msg_end])).into_owned(),
        ))
    })();
    parsed.unwrap_or_else(|| {
        let excerpt: String = body.chars().take(200).collect();
        ("unknown".to_string(), printable(&excerpt).into_owned())
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
    fn metric_answers_vouch_only_when_the_application_was_looked_at() {
        let status = |authorized: bool, reason: &str| {
            format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?><status><authorized>{authorized}</authorized>{reason}<plan>Basic</plan></status>")
        };
        for (code, body, expected) in [
            (200, status(true, ""), MetricAnswer::Exists),
            (
                409,
                status(false, "<reason>usage limits are exceeded</reason>"),
                MetricAnswer::Exists,
            ),
            (
                409,
                status(false, "<reason>application key is missing</reason>"),
                MetricAnswer::Inconclusive,
            ),
            (
                404,
                error("metric_invalid", "metric \"nope\" is invalid"),
                MetricAnswer::Unknown,
            ),
            (
                403,
                error("user_key_invalid", "user key \"k\" is invalid"),
                MetricAnswer::Inconclusive,
            ),
            (
                404,
                error(
                    "application_not_found",
                    "application with id=\"a\" was not found",
                ),
                MetricAnswer::Inconclusive,
            ),
        ] {
            assert_eq!(metric_answer(code, &body).unwrap(), expected, "{body}");
        }
        assert!(matches!(
            metric_answer(
                403,
                &error("service_token_invalid", "service token \"x\" is invalid")
            ),
            Err(ReportError::Rejected { .. })
        ));
        assert!(matches!(
            metric_answer(503, ""),
            Err(ReportError::Transient(_))
        ));
    }

    #[test]
    fn xml_errors_are_read() {
        assert_eq!(
            xml_error("<?xml version=\"1.0\" encoding=\"UTF-8\"?><error code=\"service_token_invalid\">service token &quot;x&quot; is invalid</error>"),
            ("service_token_invalid".into(), "service token \"x\" is invalid".into())
        );
        assert_eq!(xml_error("oops"), ("unknown".into(), "oops".into()));
        assert_eq!(
            xml_error("<error code=\"x\">a\u{1b}[31mb</error>").1,
            "a\\x1b[31mb"
        );
    }

    /// An error document as apisonator writes it (`Error#to_xml`, `lib/3scale/backend/errors.rb`).
    fn error(code: &str, message: &str) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><error code=\"{code}\">{message}</error>"
        )
    }

    #[test]
    fn authorize_answers_tell_an_unknown_credential_from_a_kind_the_service_does_not_take() {
        use Kind::{AppId, UserKey};
        let status = |authorized: bool, reason: &str| {
            format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?><status><authorized>{authorized}</authorized>{reason}<plan>Basic</plan></status>")
        };
        let cases = [
            // Known: authorized, over its limits, or lacking its app_key.
            (200, status(true, ""), UserKey, Existence::Exists),
            (200, status(true, ""), AppId, Existence::Exists),
            (
                409,
                status(false, "<reason>usage limits are exceeded</reason>"),
                AppId,
                Existence::Exists,
            ),
            (
                409,
                status(false, "<reason>application key is missing</reason>"),
                AppId,
                Existence::Exists,
            ),
            (
                403,
                error("application_not_active", "application is not active"),
                AppId,
                Existence::Exists,
            ),
            // Unknown to the service, which takes this kind.
            (
                403,
                error("user_key_invalid", "user key &quot;k-0123&quot; is invalid"),
                UserKey,
                Existence::Missing,
            ),
            (
                403,
                error("user_key_invalid", "user key \"k-0123\" is invalid"),
                UserKey,
                Existence::Missing,
            ),
            (
                404,
                error(
                    "application_not_found",
                    "application with id=&quot;a1b2c3d4&quot; was not found",
                ),
                AppId,
                Existence::Missing,
            ),
            // A user_key service asked about an app_id; an app_id (or OpenID Connect) service asked
            // about a user_key.
            (
                403,
                error("user_key_invalid", "user key is missing"),
                AppId,
                Existence::OtherKind(UserKey),
            ),
            (
                404,
                error("application_not_found", "application id is missing"),
                UserKey,
                Existence::OtherKind(AppId),
            ),
            // The same messages about the kind asked say nothing of the service's mode.
            (
                403,
                error("user_key_invalid", "user key is missing"),
                UserKey,
                Existence::Missing,
            ),
            (
                404,
                error("application_not_found", "application id is missing"),
                AppId,
                Existence::Missing,
            ),
        ];
        for (code, body, asked, expected) in cases {
            let got = existence(code, &body, asked);
            assert!(
                matches!(got, Ok(e) if e == expected),
                "{code} {body} asked {asked:?}: {got:?}"
            );
        }
        // Anything else vouches for nothing.
        assert!(matches!(
            existence(
                403,
                &error(
                    "authentication_error",
                    "either app_id or user_key is allowed, not both"
                ),
                UserKey
            ),
            Err(ReportError::Rejected { status: 403, .. })
        ));
        assert!(matches!(
            existence(200, "<html>portal</html>", UserKey),
            Err(ReportError::Transient(_))
        ));
        assert!(matches!(
            existence(503, "", AppId),
            Err(ReportError::Transient(_))
        ));
    }

    #[test]
    fn the_response_timeout_doubles_on_timeouts_and_decays_back() {
        let t = ResponseTimeout::new(Duration::from_secs(10));
        assert_eq!(t.timed_out(t.get()), Duration::from_secs(20));
        // A second call sent with the old timeout, timing out at the same moment: no compounding.
        assert_eq!(
            t.timed_out(Duration::from_secs(10)),
            Duration::from_secs(20)
        );
        assert_eq!(t.timed_out(t.get()), Duration::from_secs(40));
        // A probe answered in 50 s: wait at least twice that.
        assert_eq!(
            t.answered_in(Duration::from_secs(50)),
            Duration::from_secs(100)
        );
        // Capped at 16 times the configured value.
        for _ in 0..10 {
            t.timed_out(t.get());
        }
        assert_eq!(t.get(), Duration::from_secs(160));
        // Answers in time decay it by a quarter, never below twice the answer time...
        t.settle(Duration::from_secs(1));
        assert_eq!(t.get(), Duration::from_secs(120));
        t.settle(Duration::from_secs(55));
        assert_eq!(t.get(), Duration::from_secs(110));
        // ...nor below the configured value.
        for _ in 0..20 {
            t.settle(Duration::from_millis(10));
        }
        assert_eq!(t.get(), Duration::from_secs(10));
    }
}
