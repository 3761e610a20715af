//! The body of a report call: `application/x-www-form-urlencoded`, indexed transactions.
//!
//! The call's own parameters go through serde_urlencoded; the transactions, a million a second at
//! full speed, are written straight into the reused buffer: their keys are constants already
//! percent-encoded, metric names were encoded once when interned, their numbers are plain digits,
//! and only the credential needs encoding (with form_urlencoded, the encoder serde_urlencoded
//! itself uses). A test holds both ways to the same bytes; the aggregation's size bound for a
//! transaction (`aggregate::field_bytes`) follows this layout.

use crate::aggregate::{Application, Transactions};
use crate::config::BackendAuth;

use super::MASK;

/// The form of one report call.
pub(crate) struct ReportForm<'a> {
    pub auth: &'a BackendAuth,
    pub service_id: &'a str,
    pub transactions: &'a Transactions,
    /// Shows the secret as [`MASK`] (for `--dry-run`).
    pub masked: bool,
}

/// Encodes a report body into `out` (cleared first), reusing its allocation.
pub(crate) fn encode(
    form: &ReportForm<'_>,
    out: &mut String,
) -> Result<(), serde_urlencoded::ser::Error> {
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
        // `&transactions[i]`, brackets as %5B and %5D; the field's own key and `=` follow.
        let field = |out: &mut String, key: &str| {
            out.push_str("&transactions%5B");
            out.push_str(i);
            out.push_str("%5D");
            out.push_str(key);
        };
        let (credential, value) = match application {
            Application::UserKey(key) => ("%5Buser_key%5D=", key),
            Application::AppId(id) => ("%5Bapp_id%5D=", id),
        };
        field(out, credential);
        out.extend(form_urlencoded::byte_serialize(value.as_bytes()));
        for (metric, delta) in t.usage.iter() {
            field(out, "%5Busage%5D%5B");
            out.push_str(&form.transactions.metrics.get(metric).encoded);
            out.push_str("%5D=");
            out.push_str(number.format(delta));
        }
        field(out, "%5Btimestamp%5D=");
        out.push_str(number.format(t.timestamp));
        if let Some(code) = t.code {
            field(out, "%5Blog%5D%5Bcode%5D=");
            out.push_str(number.format(code));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use crate::usage::{MetricNames, Usage, USAGE_METRICS};
    use proptest::prelude::any;

    fn auth() -> BackendAuth {
        let c = crate::config::Config::parse(
            std::path::Path::new("t.toml"),
            "[backend]\nservice_token = \"s3cr3t&=\"\n[[sources]]\npath = \"a\"\nservice_id = \"1\"\n",
        )
        .unwrap();
        c.backend.auth.unwrap()
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
            for (metric, delta) in t.usage.iter() {
                let name = &txs.metrics.get(metric).name;
                pairs.push((
                    format!("transactions[{i}][usage][{name}]"),
                    delta.to_string(),
                ));
            }
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

    /// (credential, user_key or app_id, usage as (any name's index, delta), timestamp, code).
    type Random = (String, bool, Vec<(usize, u64)>, i64, Option<u16>);

    /// Transactions of random credentials, usages of `names` and codes.
    fn transactions(names: &[String], txs: Vec<Random>) -> Transactions {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let metrics = MetricNames::new(&names);
        let list = txs
            .into_iter()
            .map(|(key, user_key, of, timestamp, code)| {
                let application = if user_key {
                    Application::UserKey(key.into())
                } else {
                    Application::AppId(key.into())
                };
                let mut usage = Usage::default();
                for (name, delta) in of {
                    let metric = metrics.id(names[name % names.len()]).unwrap();
                    // A sum past u64 leaves the usage as it was: any usage will do.
                    let _ = usage.add(metric, delta);
                }
                (application, timestamp, 1, usage, code)
            })
            .collect();
        Transactions::of_usages(metrics, list)
    }

    /// The (key, value) pairs of a body, and its size.
    fn measure(body: &str) -> (usize, usize) {
        (body.split('&').count(), body.len())
    }

    /// A credential as logged: `len` times one piece (plain, escaped by the form, escaped by the
    /// log, multi-byte, not UTF-8 once decoded).
    fn logged_credential(piece: usize, len: usize) -> String {
        ["a", "/", "%2F", "é", "+", "%FF"][piece % 6].repeat(len)
    }

    proptest::proptest! {
        #[test]
        fn the_fast_encoder_writes_what_serde_urlencoded_writes(
            names in proptest::collection::vec(any::<String>(), 1..6),
            txs in proptest::collection::vec(
                (
                    any::<String>(),
                    any::<bool>(),
                    proptest::collection::vec((any::<usize>(), any::<u64>()), 0..=USAGE_METRICS),
                    any::<i64>(),
                    proptest::option::of(100u16..600),
                ),
                0..40,
            ),
            service_id in "[0-9a-z&=%+ ]{1,12}",
        ) {
            let txs = transactions(&names, txs);
            let a = auth();
            let mut body = String::new();
            encode(&ReportForm { auth: &a, service_id: &service_id, transactions: &txs, masked: false }, &mut body).unwrap();
            proptest::prop_assert_eq!(body, slow(&a, &service_id, &txs));
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

        /// Whatever the requests (credentials up to past the longest reported, usages of up to four
        /// metrics, folded or not), every sealed batch encodes within 3scale's 4096 fields and
        /// 4 MiB, and within what the aggregation reckoned for it.
        #[test]
        fn sealed_batches_fit_one_call(
            response_codes in any::<bool>(),
            max_transactions in proptest::sample::select(vec![1usize, 7, 1000, 1023, 100_000]),
            names in proptest::collection::vec("[a-z_/ é]{1,30}", 0..5),
            credentials in proptest::collection::vec(
                (any::<usize>(), proptest::prop_oneof![3 => 0usize..40, 1 => 5_000usize..25_000]),
                1..8,
            ),
            requests in proptest::collection::vec(
                (any::<usize>(), 0i64..3, proptest::collection::vec((any::<usize>(), 1u64..1000), 1..=USAGE_METRICS), 100u16..600),
                0..2500,
            ),
        ) {
            use crate::aggregate::{Aggregator, MAX_BYTES_PER_CALL, MAX_FIELDS_PER_CALL};
            use crate::parse::{Credential, Request, LOGGED_HEADERS};
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let metrics = MetricNames::new(&names);
            let ids: Vec<_> = metrics.iter().map(|m| metrics.id(&m.name).unwrap()).collect();
            let credentials: Vec<String> = credentials
                .into_iter()
                .map(|(piece, len)| logged_credential(piece, len))
                .collect();
            let a = auth();
            let mut aggregator = Aggregator::with_metrics(response_codes, max_transactions, metrics);
            let (mut body, mut counted) = (String::new(), 0u64);
            let mut check = |aggregator: &mut Aggregator| -> Result<(), proptest::test_runner::TestCaseError> {
                let (fields, bytes) = aggregator.reckoned();
                let Some(batch) = aggregator.take() else {
                    return Ok(());
                };
                let txs = &batch.transactions;
                proptest::prop_assert!(txs.len() <= max_transactions);
                counted += txs.requests();
                encode(&ReportForm { auth: &a, service_id: "42", transactions: txs, masked: false }, &mut body).unwrap();
                let call = "service_token=s3cr3t%26%3D&service_id=42".len();
                let (pairs, size) = measure(&body);
                proptest::prop_assert!(pairs <= MAX_FIELDS_PER_CALL && size <= MAX_BYTES_PER_CALL, "{pairs} fields, {size} bytes");
                proptest::prop_assert_eq!(pairs, fields + 2);
                proptest::prop_assert!(size <= call + bytes, "{size} > {call} + {bytes}");
                Ok(())
            };
            let mut added = 0u64;
            for (who, timestamp, of, status) in requests {
                let mut usage = Usage::default();
                for (metric, delta) in of {
                    usage.add(ids[metric % ids.len()], delta);
                }
                let request = Request {
                    timestamp,
                    method: None,
                    path: None,
                    query: None,
                    host: None,
                    headers: [None; LOGGED_HEADERS],
                    status,
                    credential: Credential::user_key(credentials[who % credentials.len()].as_bytes()),
                };
                match aggregator.add(&request, &usage) {
                    Ok(full) => {
                        added += 1;
                        if full {
                            check(&mut aggregator)?;
                        }
                    }
                    Err(skip) => proptest::prop_assert_eq!(skip, crate::parse::Skip::InvalidCredential),
                }
            }
            check(&mut aggregator)?;
            proptest::prop_assert_eq!(counted, added);
        }
    }
}
