//! The 3scale proxy configuration (what APIcast downloads): per service, its credentials settings,
//! its mapping rules, its Host names and its backend token, so that tally takes them from the same
//! place as the gateway would. Read from a file: the admin portal's
//! `/admin/api/account/proxy_configs/<environment>.json`
//! (`{"proxy_configs":[{"proxy_config":{"content":{…}}}]}`), one service's
//! (`{"proxy_config":{"content":{…}}}`), or APIcast's own configuration file (`{"services":[…]}`);
//! or fetched from the admin portal as APIcast does, page by page, and saved in the state folder
//! so that a start while the portal is down still has it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::mapping::MappingRule;
use crate::parse::{CredentialLocation, CredentialMode, CredentialRule};

/// The services of a proxy configuration.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ProxyConfig {
    pub(crate) services: Vec<ProxyService>,
}

/// One service of it, as tally uses it.
#[derive(Debug, Clone, PartialEq)]
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

/// The admin portal's proxy configuration of one environment, fetched as APIcast fetches it.
#[derive(Debug, Clone)]
pub(crate) struct Portal {
    /// The admin portal (`https://ACCOUNT-admin.3scale.net`), without credentials.
    pub(crate) url: reqwest::Url,
    /// An access token with read access to the Account Management API.
    pub(crate) access_token: crate::config::Secret,
    /// The environment's name in the API: `production`, or `sandbox` for staging.
    pub(crate) environment: &'static str,
    /// Extra root certificates (a portal behind a private CA).
    pub(crate) ca_certificates: Vec<reqwest::Certificate>,
}

/// Pages of 500 configurations, as APIcast asks for (the API's largest page).
const PER_PAGE: usize = 500;
/// A portal that ignores `page` would be asked forever; 200 pages are 100,000 services.
const MAX_PAGES: usize = 200;
/// Per page: the portal answers in well under a second; a minute means it is in trouble.
const PAGE_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Deserialize)]
struct Page {
    #[serde(default)]
    proxy_configs: Vec<serde_json::Value>,
}

impl Portal {
    /// The HTTP client for it (one, so one connection pool, for every refresh).
    pub(crate) fn client(&self) -> Result<reqwest::Client, String> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(PAGE_TIMEOUT)
            .user_agent(concat!("tally/", env!("CARGO_PKG_VERSION")));
        for certificate in &self.ca_certificates {
            builder = builder.add_root_certificate(certificate.clone());
        }
        builder
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))
    }

    /// Every service's latest configuration in the environment, every page's list joined into one
    /// document (`{"proxy_configs":[…]}`, the shape [`ProxyConfig::parse`] reads and the saved
    /// copy keeps). The error never holds the token.
    pub(crate) async fn fetch(&self, client: &reqwest::Client) -> Result<Vec<u8>, String> {
        let mut base = self.url.clone();
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        let endpoint = base
            .join(&format!(
                "admin/api/account/proxy_configs/{}.json",
                self.environment
            ))
            .map_err(|e| format!("{}: {e}", self.url))?;
        let mut all: Vec<serde_json::Value> = Vec::new();
        let mut previous_first: Option<serde_json::Value> = None;
        for page in 1..=MAX_PAGES {
            let mut url = endpoint.clone();
            url.query_pairs_mut()
                .append_pair("version", "latest")
                .append_pair("page", &page.to_string())
                .append_pair("per_page", &PER_PAGE.to_string());
            // As APIcast sends it (the token as the user of HTTP Basic): not in the URL, which
            // proxies and the portal's access log keep.
            let answer = client
                .get(url.clone())
                .basic_auth(self.access_token.expose(), Some(""))
                .send()
                .await
                .map_err(|e| {
                    format!("GET {endpoint} page {page}: {}", crate::report::describe(e))
                })?;
            let status = answer.status();
            let body = answer.bytes().await.map_err(|e| {
                format!("GET {endpoint} page {page}: {}", crate::report::describe(e))
            })?;
            if !status.is_success() {
                return Err(refused(&endpoint, status, &body));
            }
            let listed: Page = serde_json::from_slice(&body).map_err(|e| {
                format!("GET {endpoint} page {page}: not a list of proxy configurations: {e}")
            })?;
            let count = listed.proxy_configs.len();
            let first = listed.proxy_configs.first().cloned();
            // A portal without pagination answers every page alike: its second page is its first.
            if page > 1 && first.is_some() && first == previous_first {
                break;
            }
            all.extend(listed.proxy_configs);
            if count < PER_PAGE {
                break;
            }
            if page == MAX_PAGES {
                return Err(format!(
                    "GET {endpoint}: still full pages after {MAX_PAGES} pages of {PER_PAGE}"
                ));
            }
            previous_first = first;
        }
        serde_json::to_vec(&serde_json::json!({ "proxy_configs": all }))
            .map_err(|e| format!("cannot encode the proxy configuration: {e}"))
    }

    /// [`Portal::fetch`] from code that is not async (the configuration's loading), on a thread
    /// of its own so that it works inside a runtime or outside of one.
    pub(crate) fn fetch_now(&self) -> Result<Vec<u8>, String> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| format!("cannot start a runtime: {e}"))?;
                    runtime.block_on(async { self.fetch(&self.client()?).await })
                })
                .join()
                .unwrap_or_else(|_| Err("the fetch stopped abnormally".into()))
        })
    }
}

/// What a refusal of the portal means, with the start of its answer (3scale's errors are short).
fn refused(endpoint: &reqwest::Url, status: reqwest::StatusCode, body: &[u8]) -> String {
    let hint = match status.as_u16() {
        401 | 403 => {
            ": the access token was refused (it needs read access to the Account Management API)"
        }
        404 => {
            ": no such page (is the URL the admin portal's, e.g. https://ACCOUNT-admin.3scale.net?)"
        }
        422 => ": the portal does not know this environment",
        _ => "",
    };
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
    format!(
        "GET {endpoint}: HTTP {status}{hint}: {}",
        text.trim().replace('\n', " ")
    )
}

/// The copy of the last proxy configuration fetched, in the state folder.
pub(crate) fn saved_copy(state_dir: &Path) -> PathBuf {
    state_dir.join("proxy-config.json")
}

/// Saves `document` as the last good copy: whole or not at all (a temp file renamed over it).
pub(crate) fn save(state_dir: &Path, document: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = saved_copy(state_dir);
    let temp = state_dir.join(format!("proxy-config.json.{}.tmp", std::process::id()));
    // It holds every service's backend token: for tally's user alone.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)?;
    file.write_all(document)?;
    file.sync_data()?;
    drop(file);
    std::fs::rename(&temp, &path)
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
