//! The 3scale proxy configuration (what APIcast downloads): per service, its credentials settings,
//! its mapping rules, its Host names and its backend token, so that tally takes them from the same
//! place as the gateway would. Read from a file: the admin portal's
//! `/admin/api/account/proxy_configs/<environment>.json`
//! (`{"proxy_configs":[{"proxy_config":{"content":{…}}}]}`), one service's
//! (`{"proxy_config":{"content":{…}}}`), or APIcast's own configuration file (`{"services":[…]}`).

use std::path::Path;

use serde::Deserialize;

use crate::mapping::MappingRule;
use crate::parse::{CredentialLocation, CredentialMode, CredentialRule};

/// The services of a proxy configuration.
#[derive(Debug, Clone, Default)]
pub(crate) struct ProxyConfig {
    pub(crate) services: Vec<ProxyService>,
}

/// One service of it, as tally uses it.
#[derive(Debug, Clone)]
pub(crate) struct ProxyService {
    pub(crate) id: String,
    /// Where and under which names its requests carry their credential, and which kind.
    pub(crate) credentials: Result<CredentialRule, String>,
    pub(crate) rules: Vec<MappingRule>,
    /// `proxy.hosts`: the Host names it is reached by (for routing by Host).
    pub(crate) hosts: Vec<String>,
    /// `backend_authentication_type` (`service_token` or `provider_key`) and its value.
    pub(crate) backend_auth: Option<(String, String)>,
    /// `proxy.backend.endpoint`: the Service Management API it reports to.
    pub(crate) backend_endpoint: Option<String>,
}

impl ProxyConfig {
    /// Reads and checks `path`; the error says what is wrong with it.
    pub(crate) fn load(path: &Path) -> Result<ProxyConfig, String> {
        let text =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        ProxyConfig::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Reads a proxy configuration document.
    pub(crate) fn parse(text: &[u8]) -> Result<ProxyConfig, String> {
        let document: Document = serde_json::from_slice(text)
            .map_err(|e| format!("not a proxy configuration (JSON): {e}"))?;
        let contents: Vec<Content> = match document {
            Document {
                proxy_configs: Some(list),
                ..
            } => list.into_iter().map(|c| c.proxy_config.content).collect(),
            Document {
                proxy_config: Some(one),
                ..
            } => vec![one.content],
            Document {
                services: Some(services),
                ..
            } => services,
            _ => return Err(
                "not a proxy configuration: expected `proxy_configs`, `proxy_config` or `services`"
                    .into(),
            ),
        };
        let mut services: Vec<ProxyService> = Vec::with_capacity(contents.len());
        for content in contents {
            let service = content.service()?;
            // The admin portal's list may hold several versions of one service: the last wins.
            services.retain(|s| s.id != service.id);
            services.push(service);
        }
        Ok(ProxyConfig { services })
    }

    /// The service of `id`, if the configuration has it.
    pub(crate) fn service(&self, id: &str) -> Option<&ProxyService> {
        self.services.iter().find(|s| s.id == id)
    }
}

#[derive(Deserialize)]
struct Document {
    proxy_configs: Option<Vec<Listed>>,
    proxy_config: Option<Wrapped>,
    services: Option<Vec<Content>>,
}

#[derive(Deserialize)]
struct Listed {
    proxy_config: Wrapped,
}

#[derive(Deserialize)]
struct Wrapped {
    content: Content,
}

/// A service as the proxy configuration has it (only what tally reads).
#[derive(Deserialize)]
struct Content {
    id: serde_json::Value,
    #[serde(default)]
    backend_version: Option<serde_json::Value>,
    backend_authentication_type: Option<String>,
    backend_authentication_value: Option<String>,
    #[serde(default)]
    proxy: Proxy,
}

#[derive(Deserialize, Default)]
struct Proxy {
    #[serde(default)]
    hosts: Vec<String>,
    credentials_location: Option<String>,
    auth_user_key: Option<String>,
    auth_app_id: Option<String>,
    auth_app_key: Option<String>,
    authentication_method: Option<serde_json::Value>,
    jwt_claim_with_client_id: Option<String>,
    jwt_claim_with_client_id_type: Option<String>,
    #[serde(default)]
    proxy_rules: Vec<ProxyRule>,
    backend: Option<BackendEndpoint>,
}

#[derive(Deserialize)]
struct ProxyRule {
    http_method: String,
    pattern: String,
    metric_system_name: String,
    delta: Option<serde_json::Value>,
    #[serde(default)]
    last: bool,
}

#[derive(Deserialize)]
struct BackendEndpoint {
    endpoint: Option<String>,
}

/// A JSON number or string as text (ids and versions come as either).
fn text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.trim().to_string()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl Content {
    fn service(self) -> Result<ProxyService, String> {
        let id = text(&self.id)
            .filter(|id| !id.is_empty())
            .ok_or("a service without an id")?;
        let proxy = self.proxy;
        let rules = proxy
            .proxy_rules
            .into_iter()
            .map(|r| {
                let delta = match &r.delta {
                    None => Ok(1),
                    Some(d) => text(d).and_then(|d| d.parse::<u64>().ok()).ok_or_else(|| {
                        format!("service {id}: a rule's delta is not a number: {d}")
                    }),
                }?;
                Ok(MappingRule {
                    method: r.http_method,
                    pattern: r.pattern,
                    metric: r.metric_system_name,
                    delta,
                    last: r.last,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        // APIcast takes the authentication method, or the backend version before it.
        let method = proxy
            .authentication_method
            .as_ref()
            .or(self.backend_version.as_ref())
            .and_then(text)
            .unwrap_or_else(|| "1".into());
        let credentials = credentials(
            &id,
            &method,
            &proxy.credentials_location,
            [proxy.auth_user_key, proxy.auth_app_id, proxy.auth_app_key],
            proxy.jwt_claim_with_client_id,
            proxy.jwt_claim_with_client_id_type,
        );
        let backend_auth = match (
            self.backend_authentication_type,
            self.backend_authentication_value,
        ) {
            (Some(kind), Some(value)) if !value.trim().is_empty() => Some((kind, value)),
            _ => None,
        };
        Ok(ProxyService {
            id,
            credentials,
            rules,
            hosts: proxy.hosts,
            backend_auth,
            backend_endpoint: proxy
                .backend
                .and_then(|b| b.endpoint)
                .filter(|e| !e.is_empty()),
        })
    }
}

/// The credentials settings of a service: `1` (user_key), `2` (app_id and app_key) or `oidc`,
/// read where `credentials_location` says under the `auth_*` names.
fn credentials(
    id: &str,
    method: &str,
    location: &Option<String>,
    [user_key, app_id, app_key]: [Option<String>; 3],
    jwt_claim: Option<String>,
    jwt_claim_type: Option<String>,
) -> Result<CredentialRule, String> {
    let mode = match method {
        "1" => CredentialMode::UserKey,
        "2" => CredentialMode::AppId,
        "oidc" => CredentialMode::Oidc,
        "oauth" => {
            return Err(format!(
                "service {id} authenticates with 3scale's OAuth: its access tokens name no application a log can tell"
            ))
        }
        other => return Err(format!("service {id}: unknown authentication method `{other}`")),
    };
    let location = match location.as_deref().unwrap_or("query") {
        "query" => CredentialLocation::Query,
        "headers" => CredentialLocation::Headers,
        "authorization" => CredentialLocation::Authorization,
        other => {
            return Err(format!(
                "service {id}: unknown credentials_location `{other}`"
            ))
        }
    };
    let mut rule = CredentialRule::query(mode);
    rule.location = location;
    let name = |given: Option<String>, default: String| {
        given
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .unwrap_or(default)
    };
    rule.user_key = name(user_key, rule.user_key.clone());
    rule.app_id = name(app_id, rule.app_id.clone());
    rule.app_key = name(app_key, rule.app_key.clone());
    if mode == CredentialMode::Oidc {
        if let Some(claim) = jwt_claim.filter(|c| !c.trim().is_empty()) {
            if jwt_claim_type.as_deref().is_some_and(|t| t != "plain") {
                return Err(format!(
                    "service {id}: jwt_claim_with_client_id is a Liquid template; tally reads plain claim names only"
                ));
            }
            rule.jwt_claim = crate::parse::JwtClaim::new(claim.trim())
                .map_err(|e| format!("service {id}: jwt_claim_with_client_id: {e}"))?;
        }
    }
    Ok(rule)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service as the admin portal's proxy configuration has it (trimmed).
    fn service(id: &str, version: &str, extra_proxy: &str) -> String {
        let name = id.trim_matches('"');
        format!(
            r#"{{"id":{id},"backend_version":"{version}","backend_authentication_type":"service_token","backend_authentication_value":"tok-{name}",
               "proxy":{{"hosts":["api-{name}.example.com"],"credentials_location":"headers","auth_user_key":"X-Api-Key","auth_app_id":"X-App-Id","auth_app_key":"X-App-Key",
               "backend":{{"endpoint":"https://backend.example.com:443","host":"backend.example.com"}},
               "proxy_rules":[{{"http_method":"GET","pattern":"/products/{{id}}","metric_system_name":"get_product","delta":2,"last":false,"position":1}},
                              {{"http_method":"ANY","pattern":"/","metric_system_name":"hits","delta":"1","last":true,"position":2}}]{extra_proxy}}}}}"#
        )
    }

    #[test]
    fn the_admin_portals_list_one_service_and_apicasts_file() {
        let admin = format!(
            r#"{{"proxy_configs":[{{"proxy_config":{{"id":1,"version":3,"environment":"production","content":{}}}}},{{"proxy_config":{{"content":{}}}}}]}}"#,
            service("42", "1", ""),
            service("\"43\"", "2", "")
        );
        let apicast = format!(r#"{{"services":[{}]}}"#, service("42", "1", ""));
        let one = format!(
            r#"{{"proxy_config":{{"content":{}}}}}"#,
            service("42", "1", "")
        );
        for text in [&admin, &apicast, &one] {
            let config = ProxyConfig::parse(text.as_bytes()).unwrap();
            let s = config.service("42").unwrap();
            let rule = s.credentials.as_ref().unwrap();
            assert_eq!(
                (
                    rule.location,
                    rule.mode,
                    rule.user_key.as_str(),
                    rule.app_id.as_str()
                ),
                (
                    CredentialLocation::Headers,
                    CredentialMode::UserKey,
                    "X-Api-Key",
                    "X-App-Id"
                )
            );
            assert_eq!(
                s.rules,
                vec![
                    MappingRule {
                        method: "GET".into(),
                        pattern: "/products/{id}".into(),
                        metric: "get_product".into(),
                        delta: 2,
                        last: false
                    },
                    MappingRule {
                        method: "ANY".into(),
                        pattern: "/".into(),
                        metric: "hits".into(),
                        delta: 1,
                        last: true
                    },
                ]
            );
            assert_eq!(
                s.backend_auth,
                Some(("service_token".into(), "tok-42".into()))
            );
            assert_eq!(
                s.backend_endpoint.as_deref(),
                Some("https://backend.example.com:443")
            );
        }
        let config = ProxyConfig::parse(admin.as_bytes()).unwrap();
        assert_eq!(
            config
                .service("43")
                .unwrap()
                .credentials
                .as_ref()
                .unwrap()
                .mode,
            CredentialMode::AppId
        );
        assert!(config.service("44").is_none());
    }

    #[test]
    fn oidc_oauth_and_bad_documents() {
        let oidc = ProxyConfig::parse(
            format!(
                r#"{{"services":[{}]}}"#,
                service("7", "oauth", r#","authentication_method":"oidc","jwt_claim_with_client_id":"client_id","jwt_claim_with_client_id_type":"plain""#)
            )
            .as_bytes(),
        )
        .unwrap();
        let rule = oidc.service("7").unwrap().credentials.clone().unwrap();
        assert_eq!(
            (rule.mode, rule.jwt_claim.name()),
            (CredentialMode::Oidc, "client_id")
        );
        let oauth = ProxyConfig::parse(
            format!(r#"{{"services":[{}]}}"#, service("8", "oauth", "")).as_bytes(),
        )
        .unwrap();
        let e = oauth.service("8").unwrap().credentials.clone().unwrap_err();
        assert!(e.contains("OAuth"), "{e}");
        for (text, says) in [
            ("not json", "not a proxy configuration (JSON)"),
            ("{}", "expected `proxy_configs`"),
            (r#"{"services":[{"proxy":{}}]}"#, "missing field `id`"),
            (r#"{"services":[{"id":null}]}"#, "without an id"),
            (
                r#"{"services":[{"id":1,"proxy":{"proxy_rules":[{"http_method":"GET","pattern":"/","metric_system_name":"hits","delta":"x"}]}}]}"#,
                "delta is not a number",
            ),
        ] {
            let e = ProxyConfig::parse(text.as_bytes()).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }
}
