//! The Response codes page's API on the telemetry listener: exact counts per code and class of
//! every line read (with or without a credential), the latest calls of each code in a ring of
//! `calls_per_code`, filters, masking, and call details off on a public listener.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

use support::{
    append, combined_line, now, poll_until, sample, telemetry_get, telemetry_port, Scenario, Tally,
};

const WAIT: Duration = Duration::from_secs(30);

/// A credential long enough that its mask (`secr…0001`) shows under half of it.
fn key(n: usize) -> String {
    format!("secret-user-key-{n:04}")
}

/// (status, how many, with a credential?) in file order; the path names the code and the line's
/// place among that code's lines.
const LINES: [(u16, usize, bool); 6] = [
    (200, 30, true),
    (201, 5, true),
    (404, 7, true),
    (404, 5, false),
    (500, 3, true),
    (503, 2, false),
];

fn write_log(s: &Scenario) -> usize {
    let t0 = now() - 120;
    let mut text = String::new();
    let mut seen: BTreeMap<u16, usize> = BTreeMap::new();
    let mut n = 0;
    for (status, count, credential) in LINES {
        for _ in 0..count {
            let i = seen.entry(status).or_default();
            let query = if credential {
                format!("?user_key={}", key(n % 3))
            } else {
                String::new()
            };
            text.push_str(&combined_line(
                t0 + n as i64,
                "GET",
                &format!("/p/{status}/{i}{query}"),
                status,
            ));
            *i += 1;
            n += 1;
        }
    }
    // Lines without a status: read, skipped as malformed, in no code.
    text.push_str("garbage\nmore garbage\n");
    append(&s.log, &text);
    n + 2
}

/// `GET path`: status, headers, body.
fn get(port: u16, path: &str) -> (u16, String, String) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: tally\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    (status, head.to_lowercase(), body.to_string())
}

fn json(port: u16, path: &str) -> serde_json::Value {
    let (status, _, body) = get(port, path);
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn start(s: &Scenario, telemetry: &str) -> (Tally, u16, usize) {
    let lines = write_log(s);
    let port = telemetry_port();
    let listen = telemetry.replace("PORT", &port.to_string());
    let config = s.config("", &format!("[telemetry]\n{listen}\n"));
    let tally = Tally::start(&config, &[]);
    poll_until(
        WAIT,
        "every line read",
        || {
            support::telemetry_try_get(port, "/metrics").is_ok_and(|(_, m)| {
                support::metric(&m, "tally_lines_read_total") == Some(lines as f64)
            })
        },
        || tally.logs(),
    );
    (tally, port, lines)
}

#[test]
fn the_api_counts_every_line_by_code_and_keeps_the_latest_calls() {
    let s = Scenario::new();
    let (tally, port, lines) = start(&s, "listen = \"127.0.0.1:PORT\"\ncalls_per_code = 4");
    let codes = json(port, "/api/codes");
    let totals: BTreeMap<u64, (u64, u64, u64)> = codes["codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let points: u64 = c["points"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_u64().unwrap())
                .sum();
            (
                c["code"].as_u64().unwrap(),
                (
                    c["total"].as_u64().unwrap(),
                    c["in_window"].as_u64().unwrap(),
                    points,
                ),
            )
        })
        .collect();
    assert_eq!(
        totals,
        BTreeMap::from([
            (200, (30, 30, 30)),
            (201, (5, 5, 5)),
            (404, (12, 12, 12)),
            (500, (3, 3, 3)),
            (503, (2, 2, 2))
        ]),
        "{codes}"
    );
    let classes: BTreeMap<String, u64> = codes["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["class"].as_str().unwrap().to_string(),
                c["total"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        classes,
        BTreeMap::from([
            ("2xx".into(), 35),
            ("3xx".into(), 0),
            ("4xx".into(), 12),
            ("5xx".into(), 5)
        ])
    );
    assert_eq!(codes["traffic"]["lines read"].as_u64(), Some(lines as u64));
    assert_eq!(codes["traffic"]["skipped: malformed"].as_u64(), Some(2));
    assert_eq!(codes["traffic"]["skipped: no_credential"].as_u64(), Some(7));
    // Every series at a 1-minute step over the last hour holds the same counts.
    let minute = json(
        port,
        &format!("/api/codes?step=60&from={}&to={}", now() - 3600, now()),
    );
    assert_eq!(minute["step"], 60);
    assert_eq!(minute["times"].as_array().unwrap().len(), 60);
    assert_eq!(
        minute["codes"][2]["in_window"].as_u64(),
        Some(12),
        "{minute}"
    );

    // The ring keeps exactly the latest 4 calls of 404, newest first; the last 5 had no credential.
    let calls = json(port, "/api/calls?code=404&limit=10");
    let paths: Vec<&str> = calls["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        ["/p/404/11", "/p/404/10", "/p/404/9", "/p/404/8"],
        "{calls}"
    );
    let newest = &calls["calls"][0];
    assert_eq!(newest["outcome"], "skipped: no_credential");
    assert_eq!(newest["application"], serde_json::Value::Null);
    assert_eq!(newest["status"], 404);
    assert_eq!(newest["method"], "GET");
    assert_eq!(
        json(port, "/api/calls?code=404&limit=2")["calls"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // By application (as logged, or as shown masked), and by service.
    let of_key = json(port, &format!("/api/calls?code=200&application={}", key(1)));
    let shown: Vec<&str> = of_key["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["application"].as_str().unwrap())
        .collect();
    assert!(
        !shown.is_empty() && shown.iter().all(|a| *a == "secr…0001"),
        "{of_key}"
    );
    let masked = json(port, "/api/calls?code=200&application=secr%E2%80%A60001");
    assert_eq!(masked["calls"], of_key["calls"]);
    assert_eq!(json(port, "/api/codes?service=42")["codes"], codes["codes"]);
    assert_eq!(
        json(port, "/api/codes?service=99")["codes"],
        serde_json::json!([])
    );
    assert_eq!(
        json(port, "/api/calls?service=99")["calls"],
        serde_json::json!([])
    );

    // No credential of the log in any answer; nothing cached.
    for path in [
        "/",
        "/?code=200",
        "/?code=404",
        "/api/codes",
        "/api/calls",
        "/api/calls?code=500",
    ] {
        let (status, head, body) = get(port, path);
        assert_eq!(status, 200, "{path}");
        assert!(head.contains("cache-control: no-store"), "{head}");
        for n in 0..3 {
            assert!(!body.contains(&key(n)), "{path} shows {}: {body}", key(n));
        }
    }
    // The page reads without JavaScript: its tables are in the HTML.
    let (_, head, page) = get(port, "/?code=500");
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(page.contains("<tr data-code=\"404\"><td><a href=\"/?code=404\">404</a></td><td class=\"n\">12</td><td class=\"n\">12</td></tr>"), "{page}");
    assert!(
        page.contains("Latest calls with code 500") && page.contains("/p/500/2"),
        "{page}"
    );
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "the page fetches nothing from elsewhere"
    );
    // Bad parameters say what is wrong.
    for (path, says) in [
        (
            "/api/codes?from=yesterday",
            "neither epoch seconds nor RFC 3339",
        ),
        ("/api/codes?step=7", "step must be one of"),
        ("/api/calls?code=abc", "is not a status code"),
    ] {
        let (status, _, body) = get(port, path);
        assert_eq!(status, 400, "{path}");
        assert!(body.contains(says), "{path}: {body}");
    }
    let metrics = telemetry_get(port, "/metrics").1;
    assert_eq!(sample(&metrics, "tally_lines_read_total"), lines as u64);
    // The same tables in a terminal.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "codes",
            "--url",
            &format!("http://127.0.0.1:{port}"),
            "--code",
            "404",
            "--period",
            "24h",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("404    4xx              12             12"),
        "{text}"
    );
    assert!(text.contains("skipped: malformed"), "{text}");
    assert_eq!(
        text.matches(" 404 (skipped: no_credential)").count(),
        4,
        "{text}"
    );
    assert!(!(0..3).any(|n| text.contains(&key(n))), "{text}");
    tally.stop(WAIT);
}

/// On a listener that is not on loopback, call details (paths) are off unless allowed; the counts
/// are served.
#[test]
fn call_details_are_off_on_a_public_listener() {
    let s = Scenario::new();
    let (tally, port, _) = start(&s, "listen = \"0.0.0.0:PORT\"");
    let calls = json(port, "/api/calls?code=200");
    assert_eq!(calls["calls"], serde_json::json!([]));
    assert!(calls["off"]
        .as_str()
        .unwrap()
        .contains("calls_on_public_listener"));
    let (_, _, page) = get(port, "/?code=200");
    assert!(page.contains("Call details are off"), "{page}");
    assert!(!page.contains("/p/200/"), "{page}");
    assert_eq!(json(port, "/api/codes")["codes"][0]["total"], 30);
    tally.stop(WAIT);
}
