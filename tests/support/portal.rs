//! A stand-in for the 3scale admin portal's proxy configuration API
//! (`GET /admin/api/account/proxy_configs/<environment>.json`, see
//! `shared/spec/service-management-api.md`): a real HTTP server on loopback that takes an access
//! token (HTTP Basic as APIcast sends it, or `access_token`), pages the list (`page`, `per_page` up
//! to 500), answers 403 / 404 / 422 as the portal does, records each request, and can be told to
//! serve a malformed document or to be down.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::Engine;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};

/// One request as the portal read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asked {
    pub environment: String,
    pub page: usize,
    pub per_page: usize,
    pub version: Option<String>,
}

#[derive(Default)]
struct State {
    token: String,
    /// Each service's latest configuration (`content`), by environment name in the API.
    services: Vec<serde_json::Value>,
    /// Served instead of the list, with 200, when set.
    malformed: Option<String>,
    /// Answers 503 to everything while set.
    down: bool,
    asked: Vec<Asked>,
}

/// A running test portal; it stops when the test process ends.
#[derive(Clone)]
pub struct Portal {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl Portal {
    /// A portal whose access token is `token`, with no services yet.
    pub fn start(token: &str) -> Portal {
        let state = Arc::new(Mutex::new(State {
            token: token.to_string(),
            ..State::default()
        }));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the test portal");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let shared = state.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("test portal runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let state = shared.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let answer = answer(&req, &state);
                            async move { Ok::<_, std::convert::Infallible>(answer) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        });
        Portal { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The services' latest configurations (the `content` of each).
    pub fn set_services(&self, services: Vec<serde_json::Value>) {
        let mut s = self.state.lock().unwrap();
        s.services = services;
        s.malformed = None;
    }

    /// Serves `body` (200) instead of the list until the services are set again.
    pub fn set_malformed(&self, body: &str) {
        self.state.lock().unwrap().malformed = Some(body.to_string());
    }

    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
    }

    pub fn asked(&self) -> Vec<Asked> {
        self.state.lock().unwrap().asked.clone()
    }
}

fn json(status: u16, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .expect("response")
}

fn answer(req: &Request<Incoming>, state: &Mutex<State>) -> Response<Full<Bytes>> {
    let mut s = state.lock().unwrap();
    if s.down {
        return json(503, r#"{"error":"down for the test"}"#.into());
    }
    let query: Vec<(String, String)> = req
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let basic = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok());
    // APIcast's way: the token as the user, no password.
    let token_ok = basic.as_deref() == Some(&format!("{}:", s.token))
        || param("access_token").as_deref() == Some(s.token.as_str());
    if !token_ok {
        return json(403, r#"{"error":"Access denied"}"#.into());
    }
    let path = req.uri().path();
    let Some(environment) = path
        .strip_prefix("/admin/api/account/proxy_configs/")
        .and_then(|p| p.strip_suffix(".json"))
    else {
        return json(404, r#"{"status":"Not found"}"#.into());
    };
    if !matches!(environment, "production" | "sandbox") {
        return json(422, r#"{"error":"invalid environment"}"#.into());
    }
    let page: usize = param("page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(1)
        .max(1);
    let per_page: usize = param("per_page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(100)
        .clamp(1, 500);
    s.asked.push(Asked {
        environment: environment.to_string(),
        page,
        per_page,
        version: param("version"),
    });
    if let Some(body) = &s.malformed {
        return json(200, body.clone());
    }
    let listed: Vec<serde_json::Value> = s
        .services
        .iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .enumerate()
        .map(|(i, content)| {
            serde_json::json!({"proxy_config": {
                "id": (page - 1) * per_page + i + 1,
                "version": 1,
                "environment": environment,
                "content": content,
            }})
        })
        .collect();
    json(
        200,
        serde_json::json!({ "proxy_configs": listed }).to_string(),
    )
}
