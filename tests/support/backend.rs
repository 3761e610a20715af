//! A stand-in for the 3scale Service Management API: a real HTTP server on loopback that enforces the
//! request rules of `shared/spec/service-management-api.md`, answers with its status codes and XML
//! error bodies, records every report it accepts, and can be told to fail.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};

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
    reports: Vec<Report>,
    refusals: Vec<Refusal>,
    /// Answer the next N calls with this status (and a plain body).
    fail_next: Option<(usize, u16)>,
    /// Close the connection of the next N calls without answering.
    drop_next: usize,
    /// Wait this long before answering each call.
    delay: Duration,
    calls: usize,
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

    pub fn set_delay(&self, delay: Duration) {
        self.with(|s| s.delay = delay);
    }

    pub fn set_token(&self, service_id: &str, token: &str) {
        self.with(|s| s.tokens.insert(service_id.to_string(), token.to_string()));
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
        let deadline = Instant::now() + timeout;
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; backend has {} transactions, {} calls, refusals {:?}",
                self.transactions().len(),
                self.calls(),
                self.refusals()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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
        let failure = match &mut s.fail_next {
            Some((n, status)) if *n > 0 && !drop => {
                *n -= 1;
                Some(*status)
            }
            _ => None,
        };
        (s.delay, failure, drop)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if drop {
        return Err(DropConnection);
    }
    if let Some(status) = failure {
        return Ok(plain(status, "injected failure"));
    }
    let answer = report(req, &state).await;
    if answer.status() != StatusCode::ACCEPTED {
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

async fn report(req: Request<Incoming>, state: &Arc<Mutex<State>>) -> Answer {
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
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let service_id = get("service_id");
    let service_id = match (get("service_token"), get("provider_key")) {
        (None, None) => {
            return xml_error(
                403,
                "provider_key_or_service_token_required",
                "Provider key or service token are required",
            )
        }
        (Some(token), _) => {
            let Some(service_id) = service_id else {
                return xml_error(422, "service_id_missing", "Service ID is missing");
            };
            let valid = state.lock().unwrap().tokens.get(&service_id) == Some(&token);
            if !valid {
                return xml_error(
                    403,
                    "service_token_invalid",
                    &format!("service token \"{token}\" is invalid"),
                );
            }
            service_id
        }
        (None, Some(_)) => {
            return xml_error(403, "provider_key_invalid", "provider key is invalid")
        }
    };
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
    state.lock().unwrap().reports.push(Report {
        service_id,
        transactions: transactions.into_values().collect(),
    });
    Response::builder()
        .status(202)
        .body(Full::new(Bytes::new()))
        .expect("response")
}
