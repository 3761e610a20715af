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
