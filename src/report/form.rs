//! The body of a report call: `application/x-www-form-urlencoded`, indexed transactions.
//!
//! The call's own parameters go through serde_urlencoded; the transactions, a million a second at
//! full speed, are written straight into the reused buffer: their keys are constants already
//! percent-encoded, their numbers plain digits, and only the credential needs encoding (with
//! form_urlencoded, the encoder serde_urlencoded itself uses). A test holds both ways to the same
//! bytes.

use crate::aggregate::{Application, Transactions};
use crate::config::BackendAuth;

use super::MASK;

/// The form of one report call.
pub struct ReportForm<'a> {
    pub auth: &'a BackendAuth,
    pub service_id: &'a str,
    pub transactions: &'a Transactions,
    /// Shows the secret as [`MASK`] (for `--dry-run`).
    pub masked: bool,
}

/// Encodes a report body into `out` (cleared first), reusing its allocation.
pub fn encode(form: &ReportForm<'_>, out: &mut String) -> Result<(), serde_urlencoded::ser::Error> {
    out.clear();
    let (field, secret) = form.auth.field();
    let secret = if form.masked { MASK } else { secret.expose() };
    out.push_str(&serde_urlencoded::to_string([
        (field, secret),
        ("service_id", form.service_id),
    ])?);
    out.reserve(form.transactions.len() * 160);
    let (mut index, mut number) = (itoa::Buffer::new(), itoa::Buffer::new());
    for (i, (application, t)) in form.transactions.iter().enumerate() {
        let i = index.format(i);
        // `&transactions[i][name]=`, brackets as %5B and %5D.
        let field = |out: &mut String, name: &str| {
            out.push_str("&transactions%5B");
            out.push_str(i);
            out.push_str("%5D");
            out.push_str(name);
            out.push('=');
        };
        let (credential, value) = match application {
            Application::UserKey(key) => ("%5Buser_key%5D", key),
            Application::AppId(id) => ("%5Bapp_id%5D", id),
        };
        field(out, credential);
        out.extend(form_urlencoded::byte_serialize(value.as_bytes()));
        field(out, "%5Busage%5D%5Bhits%5D");
        out.push_str(number.format(t.hits));
        field(out, "%5Btimestamp%5D");
        out.push_str(number.format(t.timestamp));
        if let Some(code) = t.code {
            field(out, "%5Blog%5D%5Bcode%5D");
            out.push_str(number.format(code));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use proptest::prelude::any;

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
        let txs = Transactions::of(vec![
            (
                Application::UserKey("k1".into()),
                1_795_515_300,
                1,
                Some(200),
            ),
            (
                Application::AppId("a+b é/&=".into()),
                1_795_515_301,
                3,
                None,
            ),
        ]);
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
                transactions: &Transactions::default(),
                masked: true,
            },
            &mut body,
        )
        .unwrap();
        assert_eq!(body, "service_token=***&service_id=42");
    }

    /// The body as serde_urlencoded alone would write it: the oracle for the fast path.
    fn slow(auth: &BackendAuth, service_id: &str, txs: &Transactions) -> String {
        let (field, secret) = auth.field();
        let mut pairs = vec![
            (field.to_string(), secret.expose().to_string()),
            ("service_id".to_string(), service_id.to_string()),
        ];
        for (i, (application, t)) in txs.iter().enumerate() {
            let (credential, value) = application.field();
            pairs.push((
                format!("transactions[{i}][{credential}]"),
                value.to_string(),
            ));
            pairs.push((
                format!("transactions[{i}][usage][hits]"),
                t.hits.to_string(),
            ));
            pairs.push((
                format!("transactions[{i}][timestamp]"),
                t.timestamp.to_string(),
            ));
            if let Some(code) = t.code {
                pairs.push((format!("transactions[{i}][log][code]"), code.to_string()));
            }
        }
        serde_urlencoded::to_string(pairs).unwrap()
    }

    proptest::proptest! {
        #[test]
        fn the_fast_encoder_writes_what_serde_urlencoded_writes(
            txs in proptest::collection::vec(
                (any::<String>(), any::<bool>(), 1u64..10_000, any::<i64>(), proptest::option::of(100u16..600)),
                0..40,
            ),
            service_id in "[0-9a-z&=%+ ]{1,12}",
        ) {
            let txs = Transactions::of(txs
                .into_iter()
                .map(|(key, user_key, hits, timestamp, code)| {
                    let application = if user_key { Application::UserKey(key.into()) } else { Application::AppId(key.into()) };
                    (application, timestamp, hits, code)
                })
                .collect());
            let a = auth();
            let mut body = String::new();
            encode(&ReportForm { auth: &a, service_id: &service_id, transactions: &txs, masked: false }, &mut body).unwrap();
            proptest::prop_assert_eq!(body, slow(&a, &service_id, &txs));
        }
    }
}
