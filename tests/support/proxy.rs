//! A fault-injecting HTTP/1.1 proxy on loopback, between tally and the test backend.
//!
//! It reads each request from tally itself (a raw TCP server with a minimal HTTP/1.1 reader, so that
//! it can also answer with bytes that are not HTTP or reset the connection), then, by the fault set
//! for the request's endpoint at the moment the request was read whole:
//!
//! - [`Fault::Pass`] forwards it to the backend and returns the backend's answer;
//! - [`Fault::Delay`] forwards it at once (the backend processes it and records its transactions) and
//!   returns the answer only after the delay, by which time tally may have given up on it;
//! - [`Fault::Hang`] never answers and never forwards (the connection stays open until tally closes it);
//! - [`Fault::Reset`] closes the connection with a TCP RST (SO_LINGER 0), without forwarding;
//!   [`Fault::ProcessThenReset`] does so once the backend has processed it;
//! - [`Fault::Status500`] answers 500 with a 3scale-style XML error body, [`Fault::Status500Text`] 500
//!   with an HTML body, [`Fault::Garbage`] bytes that are not HTTP (then closes), and
//!   [`Fault::Ok200Garbage`] a `200 OK` whose body is not XML; none of them forwards.
//!
//! Every request read whole is counted by path, and every fault applied by endpoint and kind, so
//! that a test can compare tally's failure counters with what it was served. The proxy stops, its
//! listener and every connection closed, when it is dropped.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What the proxy does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward it, return the backend's answer.
    Pass,
    /// Forward it at once, return the backend's answer after this long.
    Delay(Duration),
    /// Read it, never answer, never forward.
    Hang,
    /// Read it, then close the connection with a TCP RST, without forwarding.
    Reset,
    /// Forward it (the backend processes it), then close the connection to tally with a TCP RST
    /// instead of returning the answer.
    ProcessThenReset,
    /// Answer 500 with an XML error body, without forwarding.
    Status500,
    /// Answer 500 with a body that is not XML, without forwarding.
    Status500Text,
    /// Answer with bytes that are not HTTP, then close, without forwarding.
    Garbage,
    /// Answer `200 OK` with a body that is not XML, without forwarding (meant for authorize: a
    /// report answered 2xx counts as accepted, and this one never reached the backend).
    Ok200Garbage,
}

impl Fault {
    /// The fault's kind, the delay left out: what the counters are kept by.
    fn kind(self) -> Fault {
        match self {
            Fault::Delay(_) => Fault::Delay(Duration::ZERO),
            other => other,
        }
    }
}

/// Which call of the Service Management API a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Endpoint {
    /// `POST /transactions.xml`
    Report,
    /// `GET /transactions/authorize.xml`
    Authorize,
    /// Anything else.
    Other,
}

impl Endpoint {
    pub fn of(path: &str) -> Endpoint {
        match path.split('?').next().unwrap_or("") {
            "/transactions.xml" => Endpoint::Report,
            "/transactions/authorize.xml" => Endpoint::Authorize,
            _ => Endpoint::Other,
        }
    }
}

#[derive(Debug)]
struct State {
    report: Fault,
    authorize: Fault,
    other: Fault,
    /// Requests read whole, by path (without the query).
    requests: BTreeMap<String, usize>,
    /// Faults applied (Pass included), by endpoint and kind.
    applied: BTreeMap<(Endpoint, String), usize>,
    /// Requests read whole whose answer has not been written (or given up on) yet.
    open: usize,
}

impl State {
    fn fault(&self, endpoint: Endpoint) -> Fault {
        match endpoint {
            Endpoint::Report => self.report,
            Endpoint::Authorize => self.authorize,
            Endpoint::Other => self.other,
        }
    }
}

/// A running proxy. Dropping it stops it.
pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Starts a proxy to `backend`, passing everything through.
    pub fn start(backend: SocketAddr) -> Proxy {
        let state = Arc::new(Mutex::new(State {
            report: Fault::Pass,
            authorize: Fault::Pass,
            other: Fault::Pass,
            requests: BTreeMap::new(),
            applied: BTreeMap::new(),
            open: 0,
        }));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("proxy address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shared = state.clone();
        let thread = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("proxy runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    tokio::select! {
                        _ = accept(listener, backend, shared) => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime drops every connection task, and with it every socket.
                drop(rt);
            })
            .expect("start the proxy thread");
        Proxy {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    /// The same fault for every endpoint, from the next request read on.
    pub fn set(&self, fault: Fault) {
        self.with(|s| {
            s.report = fault;
            s.authorize = fault;
            s.other = fault;
        });
    }

    /// A fault for one endpoint only.
    pub fn set_for(&self, endpoint: Endpoint, fault: Fault) {
        self.with(|s| match endpoint {
            Endpoint::Report => s.report = fault,
            Endpoint::Authorize => s.authorize = fault,
            Endpoint::Other => s.other = fault,
        });
    }

    /// Requests read whole for `path` (without query), whatever was done with them.
    pub fn requests(&self, path: &str) -> usize {
        self.with(|s| s.requests.get(path).copied().unwrap_or(0))
    }

    /// Requests to `endpoint` that got `fault` (of that kind: a Delay's duration is ignored).
    pub fn applied(&self, endpoint: Endpoint, fault: Fault) -> usize {
        let key = (endpoint, format!("{:?}", fault.kind()));
        self.with(|s| s.applied.get(&key).copied().unwrap_or(0))
    }

    /// Requests read whole and not yet answered (or abandoned): a hung or delayed call counts until
    /// tally closes its connection or the answer is written.
    pub fn open(&self) -> usize {
        self.with(|s| s.open)
    }

    /// Polls until `done` holds, or panics with `what` after `timeout`.
    pub fn wait_until(&self, timeout: Duration, what: &str, done: impl Fn(&Proxy) -> bool) {
        super::poll_until(
            timeout,
            what,
            || done(self),
            || {
                format!(
                    "the proxy saw {:?}",
                    self.with(|s| (s.requests.clone(), s.applied.clone()))
                )
            },
        );
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept(listener: tokio::net::TcpListener, backend: SocketAddr, state: Arc<Mutex<State>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(connection(stream, backend, state.clone()));
    }
}

/// One HTTP/1.1 message, as read off a connection.
struct Message {
    /// The request line or the status line.
    start: String,
    /// The whole message: head and body, as received.
    bytes: Vec<u8>,
    /// The sender asked to close the connection after this message.
    close: bool,
}

/// Reads one message (head, then a body of `Content-Length`, or to the end of the stream for an
/// answer without one). None at a clean end of stream before a message began.
async fn read_message(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    to_eof_without_length: bool,
) -> std::io::Result<Option<Message>> {
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if buffer.len() > 64 * 1024 {
            return Err(invalid("head over 64 KiB"));
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            if buffer.is_empty() {
                return Ok(None);
            }
            return Err(invalid("end of stream inside a message head"));
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let start = lines.next().unwrap_or("").to_string();
    let (mut length, mut close) = (None, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match name.as_str() {
            "content-length" => {
                length = Some(
                    value
                        .parse::<usize>()
                        .map_err(|_| invalid("bad content-length"))?,
                )
            }
            "transfer-encoding" => {
                return Err(invalid(
                    "chunked bodies are not supported by the test proxy",
                ))
            }
            "connection" => close = value.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    let total = match length {
        Some(n) => head_end + n,
        None if to_eof_without_length => {
            stream.read_to_end(buffer).await?;
            close = true;
            buffer.len()
        }
        None => head_end,
    };
    while buffer.len() < total {
        let mut chunk = [0u8; 64 * 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(invalid("end of stream inside a message body"));
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    let bytes: Vec<u8> = buffer.drain(..total).collect();
    Ok(Some(Message {
        start,
        bytes,
        close,
    }))
}

/// A request that is open (read, not answered) while this lives.
struct Open(Arc<Mutex<State>>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.lock().unwrap().open -= 1;
    }
}

/// Serves one connection from tally: one request at a time, as HTTP/1.1 keep-alive does.
async fn connection(mut client: TcpStream, backend: SocketAddr, state: Arc<Mutex<State>>) {
    let mut buffer = Vec::new();
    loop {
        let request = match read_message(&mut client, &mut buffer, false).await {
            Ok(Some(r)) => r,
            Ok(None) | Err(_) => return,
        };
        let path = request.start.split(' ').nth(1).unwrap_or("").to_string();
        let path = path.split('?').next().unwrap_or("").to_string();
        let endpoint = Endpoint::of(&path);
        let fault = {
            let mut s = state.lock().unwrap();
            *s.requests.entry(path).or_default() += 1;
            let fault = s.fault(endpoint);
            *s.applied
                .entry((endpoint, format!("{:?}", fault.kind())))
                .or_default() += 1;
            s.open += 1;
            fault
        };
        let _open = Open(state.clone());
        let answer: Vec<u8> = match fault {
            Fault::Pass | Fault::Delay(_) => {
                let started = Instant::now();
                let Some(answer) = forward(backend, &request.bytes).await else {
                    // The backend dropped the connection (one of its own failure modes): so do we.
                    return;
                };
                if let Fault::Delay(delay) = fault {
                    tokio::time::sleep(delay.saturating_sub(started.elapsed())).await;
                }
                if answer.close {
                    let _ = client.write_all(&answer.bytes).await;
                    return;
                }
                answer.bytes
            }
            Fault::Hang => {
                // Hold the connection until tally gives up on it (or the proxy stops).
                let mut sink = [0u8; 4096];
                while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
                return;
            }
            Fault::Reset => {
                let _ = client.set_zero_linger();
                return; // dropping the socket with SO_LINGER 0 sends a RST
            }
            Fault::ProcessThenReset => {
                let _ = forward(backend, &request.bytes).await;
                let _ = client.set_zero_linger();
                return;
            }
            Fault::Status500 => response(
                "500 Internal Server Error",
                "application/vnd.3scale-v2.0+xml",
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><error code=\"internal_error\">injected by the test proxy</error>",
            ),
            Fault::Status500Text => response(
                "500 Internal Server Error",
                "text/html",
                "<html><body><h1>502 Bad Gateway</h1>upstream exploded &amp; so on</body></html>",
            ),
            Fault::Ok200Garbage => response("200 OK", "application/octet-stream", "\u{1}\u{2}not xml at all {]"),
            Fault::Garbage => {
                let _ = client
                    .write_all(b"\x00\x17\xfe\xffSSH-2.0-garbage this is not HTTP\r\n\r\n")
                    .await;
                let _ = client.shutdown().await;
                return;
            }
        };
        if client.write_all(&answer).await.is_err() || request.close {
            return;
        }
    }
}

/// Sends `request` to the backend on a connection of its own and reads its answer (a fresh
/// connection each time, so that a stale kept-alive one never fails a request the test let pass).
async fn forward(backend: SocketAddr, request: &[u8]) -> Option<Message> {
    let mut stream = TcpStream::connect(backend).await.ok()?;
    stream.write_all(request).await.ok()?;
    let mut buffer = Vec::new();
    // The connection to the backend ends here; the one to tally stays open unless the backend
    // said to close it.
    read_message(&mut stream, &mut buffer, true).await.ok()?
}

fn response(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}
