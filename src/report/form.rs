//! The body of a report call: `application/x-www-form-urlencoded`, indexed transactions.

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use crate::aggregate::Transaction;
use crate::config::BackendAuth;

use super::MASK;

/// The form of one report call.
pub struct ReportForm<'a> {
    pub auth: &'a BackendAuth,
    pub service_id: &'a str,
    pub transactions: &'a [Transaction],
    /// Shows the secret as [`MASK`] (for `--dry-run`).
    pub masked: bool,
}

impl Serialize for ReportForm<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut form = s.serialize_map(None)?;
        let (field, secret) = self.auth.field();
        form.serialize_entry(field, if self.masked { MASK } else { secret.expose() })?;
        form.serialize_entry("service_id", self.service_id)?;
        // One key buffer for the whole call: no allocation per transaction.
        let mut key = String::with_capacity(48);
        for (i, t) in self.transactions.iter().enumerate() {
            let (credential, value) = t.application.field();
            let credential = if credential == "user_key" {
                "[user_key]"
            } else {
                "[app_id]"
            };
            entry(&mut form, &mut key, i, credential, value)?;
            entry(&mut form, &mut key, i, "[usage][hits]", &t.hits)?;
            entry(&mut form, &mut key, i, "[timestamp]", &t.timestamp)?;
            if let Some(code) = t.code {
                entry(&mut form, &mut key, i, "[log][code]", &code)?;
            }
        }
        form.end()
    }
}

/// Writes `transactions[i]<name>=value`.
fn entry<M: SerializeMap, V: Serialize + ?Sized>(
    form: &mut M,
    key: &mut String,
    i: usize,
    name: &str,
    value: &V,
) -> Result<(), M::Error> {
    use std::fmt::Write;
    key.clear();
    let _ = write!(key, "transactions[{i}]{name}");
    form.serialize_entry(key.as_str(), value)
}

/// Encodes a report body into `out` (cleared first), reusing its allocation.
pub fn encode(form: &ReportForm<'_>, out: &mut String) -> Result<(), serde_urlencoded::ser::Error> {
    out.clear();
    let mut target = form_urlencoded::Serializer::new(out);
    form.serialize(serde_urlencoded::Serializer::new(&mut target))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::Application;
    use crate::config::Secret;

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
        let txs = vec![
            Transaction {
                application: Application::UserKey("k1".into()),
                timestamp: 1_795_515_300,
                hits: 1,
                code: Some(200),
            },
            Transaction {
                application: Application::AppId("a+b é/&=".into()),
                timestamp: 1_795_515_301,
                hits: 3,
                code: None,
            },
        ];
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
                transactions: &[],
                masked: true,
            },
            &mut body,
        )
        .unwrap();
        assert_eq!(body, "service_token=***&service_id=42");
    }
}
