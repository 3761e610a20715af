//! The test backend itself enforces the contract of shared/spec/service-management-api.md.

mod support;

use support::backend::Backend;

fn post(b: &Backend, content_type: &str, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(b.addr).unwrap();
    write!(
        s,
        "POST /transactions.xml HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    (status, out)
}

const FORM: &str = "application/x-www-form-urlencoded";

#[test]
fn the_backend_enforces_the_contract() {
    let b = Backend::start(&[("42", "tok")]);
    let ok = "service_token=tok&service_id=42&transactions%5B0%5D%5Buser_key%5D=k&transactions%5B0%5D%5Busage%5D%5Bhits%5D=1";
    assert_eq!(post(&b, FORM, ok.as_bytes()).0, 202);
    assert_eq!(b.transactions()[0].user_key.as_deref(), Some("k"));
    assert_eq!(b.hits(), 1);
    let (status, body) = post(&b, "application/json", ok.as_bytes());
    assert!(
        status == 400 && body.contains("content_type_invalid"),
        "{body}"
    );
    let (status, body) = post(&b, FORM, b"service_id=42&transactions[0][user_key]=k");
    assert!(
        status == 403 && body.contains("provider_key_or_service_token_required"),
        "{body}"
    );
    let (status, body) = post(&b, FORM, b"service_token=tok&transactions[0][user_key]=k");
    assert!(
        status == 422 && body.contains("service_id_missing"),
        "{body}"
    );
    let (status, body) = post(
        &b,
        FORM,
        b"service_token=bad&service_id=42&transactions[0][user_key]=k",
    );
    assert!(
        status == 403 && body.contains("service_token_invalid"),
        "{body}"
    );
    let (status, body) = post(&b, FORM, b"service_token=tok&service_id=42");
    assert!(
        status == 400 && body.contains("transactions_is_blank"),
        "{body}"
    );
    let (status, body) = post(
        &b,
        FORM,
        b"service_token=tok&service_id=42&transactions[][user_key]=k",
    );
    assert!(
        status == 400 && body.contains("transactions_format_invalid"),
        "{body}"
    );
    let (status, body) = post(
        &b,
        FORM,
        b"service_token=tok&service_id=42&transactions[0][user_key]=%FF",
    );
    assert!(status == 422 && body.contains("not_valid_data"), "{body}");
    let many: String = (0..1100)
        .map(|i| format!("&transactions[{i}][user_key]=k&transactions[{i}][usage][hits]=1&transactions[{i}][timestamp]=1&transactions[{i}][log][code]=200"))
        .collect();
    let (status, body) = post(
        &b,
        FORM,
        format!("service_token=tok&service_id=42{many}").as_bytes(),
    );
    assert!(status == 400 && body.contains("bad_request"), "{body}");
    assert_eq!(b.reports().len(), 1);
    assert_eq!(b.refusals().len(), 8);
}

fn get(b: &Backend, target: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(b.addr).unwrap();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    (out[9..12].parse().unwrap(), out)
}

#[test]
fn authorize_tells_existing_applications_from_missing_ones() {
    let b = Backend::start(&[("42", "tok")]);
    b.set_applications(&["known", "app1"]);
    let base = "/transactions/authorize.xml?service_token=tok&service_id=42";
    assert_eq!(get(&b, &format!("{base}&user_key=known")).0, 200);
    assert_eq!(get(&b, &format!("{base}&app_id=app1")).0, 200);
    let (status, body) = get(&b, &format!("{base}&user_key=nope"));
    assert!(status == 403 && body.contains("user_key_invalid"), "{body}");
    let (status, body) = get(&b, &format!("{base}&app_id=nope"));
    assert!(
        status == 404 && body.contains("application_not_found"),
        "{body}"
    );
    let (status, body) = get(
        &b,
        "/transactions/authorize.xml?service_token=bad&service_id=42&user_key=known",
    );
    assert!(
        status == 403 && body.contains("service_token_invalid"),
        "{body}"
    );
    assert_eq!(b.authorizations(), vec!["known", "app1", "nope", "nope"]);
}

#[test]
fn one_bad_transaction_drops_the_whole_call_after_the_202() {
    let b = Backend::start(&[("42", "tok")]);
    b.set_applications(&["known"]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let call = |txs: &[(&str, &str, u64)]| {
        let body: String = txs
            .iter()
            .enumerate()
            .map(|(i, (key, metric, ts))| {
                format!("&transactions[{i}][user_key]={key}&transactions[{i}][usage][{metric}]=1&transactions[{i}][timestamp]={ts}")
            })
            .collect();
        post(
            &b,
            FORM,
            format!("service_token=tok&service_id=42{body}").as_bytes(),
        )
        .0
    };
    assert_eq!(
        call(&[("known", "hits", now), ("unknown", "hits", now)]),
        202
    );
    assert_eq!(call(&[("known", "hits", now), ("known", "nope", now)]), 202);
    assert_eq!(call(&[("known", "hits", now - 90_000)]), 202);
    assert_eq!(call(&[("known", "hits", now + 7200)]), 202);
    assert_eq!(
        call(&[("known", "hits", now), ("known", "hits", now - 3600)]),
        202
    );
    assert_eq!(b.dropped().len(), 4);
    assert!(b.dropped()[0].reason.contains("not found"));
    assert!(b.dropped()[2].reason.contains("older than"));
    assert_eq!(b.hits(), 2);
}
