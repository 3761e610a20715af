//! A stand-in for the 3scale Service Management API: a real HTTP server on loopback that enforces the
//! request rules of `shared/spec/service-management-api.md`, answers with its status codes and XML
//! error bodies, records every report it accepts, and can be told to fail.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};

/// The backend's limits on one report call.
pub const MAX_PAIRS: usize = 4096;
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// One transaction as the backend received it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Transaction {
    pub user_key: Option<String>,
    pub app_id: Option<String>,
    pub usage: BTreeMap<String, String>,
    pub timestamp: Option<String>,
    pub code: Option<String>,
}

impl Transaction {
    /// user_key or app_id, whichever it has.
    pub fn credential(&self) -> String {
        self.user_key
            .clone()
            .or_else(|| self.app_id.clone())
            .unwrap_or_default()
    }

    pub fn hits(&self) -> u64 {
        self.usage
            .get("hits")
            .and_then(|h| h.parse().ok())
            .unwrap_or(0)
    }

    pub fn timestamp(&self) -> i64 {
        self.timestamp
            .as_deref()
            .and_then(|t| t.parse().ok())
            .unwrap_or(-1)
    }
}

/// One accepted report call.
#[derive(Debug, Clone)]
pub struct Report {
    pub service_id: String,
    pub transactions: Vec<Transaction>,
}

/// A call answered 202 and then dropped whole while processing, as 3scale does when one of its
/// transactions is bad.
#[derive(Debug, Clone)]
pub struct Dropped {
    pub reason: String,
    pub transactions: Vec<Transaction>,
}

/// A call the backend answered with an error.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: u16,
    pub code: String,
}

#[derive(Default)]
struct State {
    /// service_id → its valid service token.
    tokens: HashMap<String, String>,
    /// The applications that exist (user_keys and app_ids alike); None: every credential exists.
    applications: Option<std::collections::HashSet<String>>,
    /// The kind of credential the service authenticates with (`user_key` or `app_id`, apisonator's
    /// backend_version 1 or 2); None: both (no real service does, but most tests need not care).
    credential_mode: Option<String>,
    /// The metrics that exist.
    metrics: std::collections::HashSet<String>,
    reports: Vec<Report>,
    dropped: Vec<Dropped>,
    authorizations: Vec<String>,
    refusals: Vec<Refusal>,
    /// Answer the next N calls with this status (and a plain body).
    fail_next: Option<(usize, u16)>,
    /// Close the connection of the next N calls without answering.
    drop_next: usize,
    /// Wait this long before answering each call.
    delay: Duration,
    /// Answer every other call with 503.
    flapping: bool,
    /// Services whose report calls are answered 503 (an outage of one service's reporting).
    down: std::collections::HashSet<String>,
    calls: usize,
    /// Report calls being answered now, and the most there were at once.
    concurrent: usize,
    max_concurrent: usize,
}

/// A running test backend. It stops when the test process ends.
#[derive(Clone)]
pub struct Backend {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl Backend {
    /// Starts a backend that knows `services`, each a (service_id, service_token) pair.
    pub fn start(services: &[(&str, &str)]) -> Backend {
        let state = Arc::new(Mutex::new(State {
            tokens: services
                .iter()
                .map(|(s, t)| (s.to_string(), t.to_string()))
                .collect(),
            metrics: ["hits".to_string()].into_iter().collect(),
            ..State::default()
        }));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the test backend");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("local addr");
        let shared = state.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("test backend runtime");
            rt.block_on(serve(listener, shared));
        });
        Backend { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    pub fn fail_next(&self, calls: usize, status: u16) {
        self.with(|s| s.fail_next = Some((calls, status)));
    }

    pub fn drop_next(&self, calls: usize) {
        self.with(|s| s.drop_next = calls);
    }

    /// Every call is processed (recorded) at once, and answered `delay` later: a slow 3scale, whose
    /// late answers may come after the client gave up on a call that was processed all the same.
    pub fn set_delay(&self, delay: Duration) {
        self.with(|s| s.delay = delay);
    }

    pub fn set_flapping(&self, on: bool) {
        self.with(|s| s.flapping = on);
    }

    /// Answers the report calls of `service_id` with 503 while `down`.
    pub fn set_down(&self, service_id: &str, down: bool) {
        self.with(|s| {
            if down {
                s.down.insert(service_id.to_string());
            } else {
                s.down.remove(service_id);
            }
        });
    }

    /// The transactions of `service_id` that 3scale accepted.
    pub fn transactions_of(&self, service_id: &str) -> Vec<Transaction> {
        self.reports()
            .into_iter()
            .filter(|r| r.service_id == service_id)
            .flat_map(|r| r.transactions)
            .collect()
    }

    /// The most report calls that were under way at once.
    pub fn max_concurrent(&self) -> usize {
        self.with(|s| s.max_concurrent)
    }

    pub fn set_token(&self, service_id: &str, token: &str) {
        self.with(|s| s.tokens.insert(service_id.to_string(), token.to_string()));
    }

    /// These metrics exist (and `hits`, which every service has): a report call naming another is
    /// accepted, then dropped whole, as 3scale does.
    pub fn set_metrics(&self, names: &[&str]) {
        self.with(|s| {
            s.metrics = std::iter::once("hits")
                .chain(names.iter().copied())
                .map(str::to_string)
                .collect()
        });
    }

    /// Only these applications (user_keys or app_ids) exist from now on.
    pub fn set_applications(&self, credentials: &[&str]) {
        self.with(|s| s.applications = Some(credentials.iter().map(|c| c.to_string()).collect()));
    }

    /// The service authenticates with `mode` (`user_key` or `app_id`): authorize answers about the
    /// other kind as apisonator does (`Transactor#validate`), whatever the credential. Reports are
    /// not affected: apisonator's report job looks an app_id up whatever the mode.
    pub fn set_credential_mode(&self, mode: &str) {
        self.with(|s| s.credential_mode = Some(mode.to_string()));
    }

    /// Calls accepted with 202 and then dropped whole.
    pub fn dropped(&self) -> Vec<Dropped> {
        self.with(|s| s.dropped.clone())
    }

    /// The credentials of every authorize call, in order.
    pub fn authorizations(&self) -> Vec<String> {
        self.with(|s| s.authorizations.clone())
    }

    /// Every call that reached the backend, answered or not.
    pub fn calls(&self) -> usize {
        self.with(|s| s.calls)
    }

    pub fn reports(&self) -> Vec<Report> {
        self.with(|s| s.reports.clone())
    }

    pub fn refusals(&self) -> Vec<Refusal> {
        self.with(|s| s.refusals.clone())
    }

    /// Every accepted transaction, in arrival order.
    /// The credential of every transaction accepted, sorted.
    pub fn credentials(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .transactions()
            .iter()
            .map(Transaction::credential)
            .collect();
        all.sort();
        all
    }

    pub fn transactions(&self) -> Vec<Transaction> {
        self.with(|s| {
            s.reports
                .iter()
                .flat_map(|r| r.transactions.clone())
                .collect()
        })
    }

    /// Total hits accepted.
    pub fn hits(&self) -> u64 {
        self.transactions().iter().map(Transaction::hits).sum()
    }

    /// Polls until `done` holds, or panics with `what` after `timeout`.
    pub fn wait_until(&self, timeout: Duration, what: &str, done: impl Fn(&Backend) -> bool) {
        super::poll_until(
            timeout,
            what,
            || done(self),
            || {
                format!(
                    "backend has {} transactions, {} calls, refusals {:?}",
                    self.transactions().len(),
                    self.calls(),
                    self.refusals()
                )
            },
        );
    }
}

async fn serve(listener: std::net::TcpListener, state: Arc<Mutex<State>>) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(req, state.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// An error from the service makes hyper close the connection without an answer.
#[derive(Debug)]
struct DropConnection;

impl std::fmt::Display for DropConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped on purpose")
    }
}

impl std::error::Error for DropConnection {}

type Answer = Response<Full<Bytes>>;

async fn handle(
    req: Request<Incoming>,
    state: Arc<Mutex<State>>,
) -> Result<Answer, DropConnection> {
    let (delay, failure, drop) = {
        let mut s = state.lock().unwrap();
        s.calls += 1;
        let drop = s.drop_next > 0;
        if drop {
            s.drop_next -= 1;
        }
        let flap = s.flapping && s.calls.is_multiple_of(2);
        let failure = match &mut s.fail_next {
            Some((n, status)) if *n > 0 && !drop => {
                *n -= 1;
                Some(*status)
            }
            _ if flap => Some(503),
            _ => None,
        };
        s.concurrent += 1;
        s.max_concurrent = s.max_concurrent.max(s.concurrent);
        (s.delay, failure, drop)
    };
    let answer = answer(req, &state, failure, drop).await;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    state.lock().unwrap().concurrent -= 1;
    answer
}

async fn answer(
    req: Request<Incoming>,
    state: &Arc<Mutex<State>>,
    failure: Option<u16>,
    drop: bool,
) -> Result<Answer, DropConnection> {
    if drop {
        return Err(DropConnection);
    }
    if let Some(status) = failure {
        return Ok(plain(status, "injected failure"));
    }
    let answer = report(req, state).await;
    if answer.status().is_client_error() || answer.status().is_server_error() {
        let body = answer.body().clone();
        let text = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let code = text
            .split("code=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("")
            .to_string();
        state.lock().unwrap().refusals.push(Refusal {
            status: answer.status().as_u16(),
            code,
        });
    }
    Ok(answer)
}

fn plain(status: u16, text: &str) -> Answer {
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::from(text.to_string())))
        .expect("response")
}

fn xml_error(status: u16, code: &str, message: &str) -> Answer {
    Response::builder()
        .status(status)
        .header("content-type", "application/vnd.3scale-v2.0+xml")
        .body(Full::new(Bytes::from(format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><error code=\"{code}\">{message}</error>"
        ))))
        .expect("response")
}

/// Decodes a form body into pairs, failing on invalid UTF-8 as the backend does.
fn decode_form(body: &[u8]) -> Result<Vec<(String, String)>, ()> {
    let decode = |s: &[u8]| -> Result<String, ()> {
        let mut out = Vec::with_capacity(s.len());
        let mut i = 0;
        while i < s.len() {
            match s[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < s.len()
                    && s[i + 1].is_ascii_hexdigit()
                    && s[i + 2].is_ascii_hexdigit() =>
                {
                    let hex = std::str::from_utf8(&s[i + 1..i + 3]).map_err(|_| ())?;
                    out.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
                    i += 2;
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8(out).map_err(|_| ())
    };
    body.split(|&b| b == b'&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let mut kv = pair.splitn(2, |&b| b == b'=');
            let k = decode(kv.next().unwrap_or_default())?;
            let v = decode(kv.next().unwrap_or_default())?;
            Ok((k, v))
        })
        .collect()
}

/// Checks service_token + service_id (or provider_key) as the backend does; the service id, or the
/// error answer.
fn authenticate(
    pairs: &[(String, String)],
    state: &Arc<Mutex<State>>,
) -> Result<String, Box<Answer>> {
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    match (get("service_token"), get("provider_key")) {
        (None, None) => Err(Box::new(xml_error(
            403,
            "provider_key_or_service_token_required",
            "Provider key or service token are required",
        ))),
        (Some(token), _) => {
            let Some(service_id) = get("service_id") else {
                return Err(Box::new(xml_error(
                    422,
                    "service_id_missing",
                    "Service ID is missing",
                )));
            };
            let valid = state.lock().unwrap().tokens.get(&service_id) == Some(&token);
            if !valid {
                return Err(Box::new(xml_error(
                    403,
                    "service_token_invalid",
                    &format!("service token \"{token}\" is invalid"),
                )));
            }
            Ok(service_id)
        }
        (None, Some(_)) => Err(Box::new(xml_error(
            403,
            "provider_key_invalid",
            "provider key is invalid",
        ))),
    }
}

/// `GET /transactions/authorize.xml`: 200 for an application that exists, 403 `user_key_invalid` or
/// 404 `application_not_found` for one that does not; with a usage of a metric the service does not
/// have, 404 `metric_invalid` (for an application that exists).
fn authorize(req: &Request<Incoming>, state: &Arc<Mutex<State>>) -> Answer {
    let query = req.uri().query().unwrap_or("");
    let Ok(pairs) = decode_form(query.as_bytes()) else {
        return xml_error(422, "not_valid_data", "all data must be valid UTF8");
    };
    if let Err(answer) = authenticate(&pairs, state) {
        return *answer;
    }
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let (credential, missing) = match (get("user_key"), get("app_id")) {
        (Some(k), None) => (
            k.clone(),
            xml_error(
                403,
                "user_key_invalid",
                &format!("user key \"{k}\" is invalid"),
            ),
        ),
        (None, Some(id)) => (
            id.clone(),
            xml_error(
                404,
                "application_not_found",
                &format!("application with id=\"{id}\" was not found"),
            ),
        ),
        _ => {
            return xml_error(
                403,
                "authentication_error",
                "either app_id or user_key is allowed, not both",
            )
        }
    };
    let mut s = state.lock().unwrap();
    s.authorizations.push(credential.clone());
    // A user_key service looks up the user_key, which an app_id call lacks; an app_id service the
    // app_id, which a user_key call lacks.
    match (s.credential_mode.as_deref(), get("user_key").is_some()) {
        (Some("user_key"), false) => {
            return xml_error(403, "user_key_invalid", "user key is missing");
        }
        (Some("app_id"), true) => {
            return xml_error(404, "application_not_found", "application id is missing");
        }
        _ => {}
    }
    let exists = s
        .applications
        .as_ref()
        .is_none_or(|apps| apps.contains(&credential));
    if !exists {
        return missing;
    }
    // A usage naming a metric the service does not have: apisonator's `MetricInvalid`.
    if let Some((name, _)) = pairs.iter().find(|(key, _)| {
        key.strip_prefix("usage[")
            .and_then(|m| m.strip_suffix(']'))
            .is_some_and(|m| !s.metrics.contains(m))
    }) {
        let metric = &name["usage[".len()..name.len() - 1];
        return xml_error(
            404,
            "metric_invalid",
            &format!("metric \"{metric}\" is invalid"),
        );
    }
    Response::builder()
        .status(200)
        .header("content-type", "application/vnd.3scale-v2.0+xml")
        .body(Full::new(Bytes::from(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><status><authorized>true</authorized><plan>Basic</plan></status>",
        )))
        .expect("response")
}

/// What 3scale checks while processing an accepted call: the first bad transaction drops it whole.
fn processing_error(s: &State, transactions: &[Transaction]) -> Option<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for t in transactions {
        let credential = t.credential();
        if s.applications
            .as_ref()
            .is_some_and(|apps| !apps.contains(&credential))
        {
            return Some(format!("application {credential} not found"));
        }
        if t.user_key.is_some() == t.app_id.is_some() {
            return Some("exactly one of user_key and app_id".into());
        }
        for (metric, value) in &t.usage {
            if !s.metrics.contains(metric) {
                return Some(format!("metric {metric} is invalid"));
            }
            if value.parse::<u64>().is_err() {
                return Some(format!("usage value {value} is invalid"));
            }
        }
        if let Some(ts) = &t.timestamp {
            let Ok(ts) = ts.parse::<i64>() else {
                return Some(format!("timestamp {ts} is not an integer"));
            };
            if ts < now - 24 * 3600 {
                return Some(
                    "reporting transactions older than 86400 seconds is not allowed".into(),
                );
            }
            if ts > now + 3600 {
                return Some(
                    "reporting transactions more than 3600 seconds in the future is not allowed"
                        .into(),
                );
            }
        }
    }
    None
}

async fn report(req: Request<Incoming>, state: &Arc<Mutex<State>>) -> Answer {
    if req.method() == hyper::Method::GET && req.uri().path() == "/transactions/authorize.xml" {
        return authorize(&req, state);
    }
    if req.method() != hyper::Method::POST || req.uri().path() != "/transactions.xml" {
        return plain(404, "not found");
    }
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return xml_error(400, "bad_request", "request too large"),
    };
    if !content_type.starts_with("application/x-www-form-urlencoded") {
        return xml_error(400, "content_type_invalid", "wrong content type");
    }
    let Ok(pairs) = decode_form(&body) else {
        return xml_error(422, "not_valid_data", "invalid UTF-8 in the request");
    };
    if pairs.len() > MAX_PAIRS {
        return xml_error(400, "bad_request", "too many parameters");
    }
    let service_id = match authenticate(&pairs, state) {
        Ok(id) => id,
        Err(answer) => return *answer,
    };
    if state.lock().unwrap().down.contains(&service_id) {
        return plain(503, "service unavailable");
    }
    let mut transactions: BTreeMap<usize, Transaction> = BTreeMap::new();
    for (key, value) in &pairs {
        if key == "user_id" || key.ends_with("[user_id]") {
            return xml_error(400, "bad_request", "user_id is not allowed");
        }
        let Some(rest) = key.strip_prefix("transactions[") else {
            continue;
        };
        let Some((index, field)) = rest.split_once(']') else {
            return xml_error(
                400,
                "transactions_format_invalid",
                "transactions parameter format is invalid",
            );
        };
        let Ok(index) = index.parse::<usize>() else {
            return xml_error(
                400,
                "transactions_format_invalid",
                "transactions parameter format is invalid",
            );
        };
        let t = transactions.entry(index).or_default();
        match field {
            "[user_key]" => t.user_key = Some(value.clone()),
            "[app_id]" => t.app_id = Some(value.clone()),
            "[timestamp]" => t.timestamp = Some(value.clone()),
            "[log][code]" => t.code = Some(value.clone()),
            f if f.starts_with("[usage][") && f.ends_with(']') => {
                t.usage.insert(f[8..f.len() - 1].to_string(), value.clone());
            }
            _ => {}
        }
    }
    if transactions.is_empty() {
        return xml_error(400, "transactions_is_blank", "transactions are blank");
    }
    let transactions: Vec<Transaction> = transactions.into_values().collect();
    let mut s = state.lock().unwrap();
    match processing_error(&s, &transactions) {
        Some(reason) => s.dropped.push(Dropped {
            reason,
            transactions,
        }),
        None => s.reports.push(Report {
            service_id,
            transactions,
        }),
    }
    Response::builder()
        .status(202)
        .body(Full::new(Bytes::new()))
        .expect("response")
}
