//! The TOML configuration: parsing, validation with errors that name the key and its line, and the
//! effective configuration as `tally check` prints it: the typed configuration serialized back to
//! TOML, secrets masked.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};
use toml::Spanned;

use crate::mapping::{host_name, HostRoute, MappingRule, MappingRules, PathRouting};
use crate::proxy_config::{ProxyConfig, ProxyService};
use crate::usage::MetricNames;
use std::sync::Arc;

use crate::parse::{
    Container, CredentialLocation, CredentialMode, CredentialRule, JsonFields, JsonFormat,
    JwtClaim, LogEscape, LogFormat, NginxFormat, RegexFormat, Stream, Wrapper,
};

/// The most transactions one report call may carry: the backend takes at most 4096 `key=value` pairs,
/// two go to `service_token` and `service_id`, and a transaction with a response code takes four.
pub(crate) const MAX_TRANSACTIONS_PER_CALL: usize = 1023;

/// Each key's default, named by its section and key. The parser takes them from here only; tests
/// hold `config/tally.toml` and the README's table of keys to them.
pub(crate) mod defaults {
    pub(crate) mod backend {
        use std::time::Duration;
        pub(crate) const URL: &str = "https://su1.3scale.net";
        pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
        pub(crate) const TIMEOUT: Duration = Duration::from_secs(60);
        pub(crate) const VALIDATE_CREDENTIALS: bool = true;
        pub(crate) const VALID_CREDENTIAL_TTL: Duration = Duration::from_secs(3600);
        pub(crate) const INVALID_CREDENTIAL_TTL: Duration = Duration::from_secs(300);
        pub(crate) const REJECTED_RETRY: Duration = Duration::from_secs(60);
    }

    /// Each `[[sources]]` table's; its name is its path unless given.
    pub(crate) mod sources {
        use crate::config::ReadFrom;
        use crate::parse::{CredentialLocation, CredentialMode, LogEscape};
        /// `format`: a name of [`crate::parse::LogFormat`].
        pub(crate) const FORMAT: &str = "combined";
        pub(crate) const LOG_ESCAPE: LogEscape = LogEscape::Default;
        pub(crate) const READ_FROM: ReadFrom = ReadFrom::End;
        pub(crate) const CREDENTIALS_LOCATION: CredentialLocation = CredentialLocation::Query;
        pub(crate) const CREDENTIALS_MODE: CredentialMode = CredentialMode::Auto;
        /// The container output kept with a `wrapper`.
        pub(crate) const STREAM: crate::parse::Stream = crate::parse::Stream::Stdout;
        /// APIcast's default names of the credential parameters (and headers).
        pub(crate) const USER_KEY: &str = "user_key";
        pub(crate) const APP_ID: &str = "app_id";
        pub(crate) const APP_KEY: &str = "app_key";
        /// The access token's claim that holds the app_id, in `oidc` mode.
        pub(crate) const JWT_CLAIM: &str = "azp";

        /// `[sources.fields]` (format = "json"): the JSON key of each value; empty, not read.
        pub(crate) mod fields {
            pub(crate) const TIME: &str = "time";
            pub(crate) const STATUS: &str = "status";
            pub(crate) const METHOD: &str = "method";
            pub(crate) const URI: &str = "uri";
            pub(crate) const PATH: &str = "";
            pub(crate) const QUERY: &str = "";
            pub(crate) const HOST: &str = "host";
            pub(crate) const USER_KEY: &str = "";
            pub(crate) const APP_ID: &str = "";
            pub(crate) const AUTHORIZATION: &str = "";
        }
    }

    pub(crate) mod report {
        use std::time::Duration;
        pub(crate) const FLUSH_INTERVAL: Duration = Duration::from_secs(5);
        pub(crate) const MAX_TRANSACTIONS: usize = 1000;
        pub(crate) const RESPONSE_CODES: bool = true;
        pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
        pub(crate) const CONCURRENCY: usize = 2;
        /// Five minutes of margin under 3scale's 24 hours.
        pub(crate) const MAX_AGE: Duration = Duration::from_secs(24 * 3600 - 300);
    }

    pub(crate) mod tail {
        use std::time::Duration;
        pub(crate) const POLL_INTERVAL: Duration = Duration::from_secs(1);
        pub(crate) const WATCH: bool = true;
        pub(crate) const ROTATE_GRACE: Duration = Duration::from_secs(5);
        pub(crate) const MAX_LINE_LENGTH: usize = 64 * 1024;
        pub(crate) const RECLAIM: bool = false;
    }

    pub(crate) mod state {
        pub(crate) const DIR: &str = "/var/lib/tally";
    }

    pub(crate) mod log {
        use std::time::Duration;
        pub(crate) const FORMAT: crate::config::LogOutput = crate::config::LogOutput::Text;
        pub(crate) const LEVEL: &str = "info";
        pub(crate) const STATS_INTERVAL: Duration = Duration::from_secs(60);
    }

    pub(crate) mod proxy_config {
        use std::time::Duration;
        pub(crate) const ENVIRONMENT: &str = "production";
        pub(crate) const REFRESH: Duration = Duration::from_secs(300);
        pub(crate) const PATH_ROUTING: bool = false;
    }
    pub(crate) mod telemetry {
        use std::time::Duration;
        /// Not served.
        pub(crate) const LISTEN: Option<std::net::SocketAddr> = None;
        pub(crate) const STALLED_AFTER: Duration = Duration::from_secs(300);
        pub(crate) const CALLS_PER_CODE: usize = 50;
        pub(crate) const CALLS_ON_PUBLIC_LISTENER: bool = false;
    }
}

/// Why a configuration cannot be used; the message names the file, and the line and key when
/// there is one.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The OS error is in the message, not a `source`: a whole chain printed would show it twice.
    /// The file cannot be read.
    #[error("{path}: cannot read the configuration: {error}")]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The file is not valid TOML (the message quotes the line, secrets masked).
    #[error("{path}: {message}")]
    Syntax {
        /// The configuration file.
        path: PathBuf,
        /// The TOML parser's message.
        message: String,
    },
    /// A key has a value tally cannot use.
    #[error("{path}:{line}: {key}: {message}")]
    Invalid {
        /// The configuration file.
        path: PathBuf,
        /// The key's line.
        line: usize,
        /// The key, as a path (`sources[1].path`).
        key: String,
        /// What is wrong, and what would be right.
        message: String,
    },
}

/// A secret value (service token, provider key). Its `Debug`, `Display` and `Serialize` never show
/// it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    value: String,
    origin: String,
    /// The file it was read from, read again when 3scale rejects it (a rotated Kubernetes Secret).
    file: Option<PathBuf>,
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.value
    }

    /// The secret as its file holds it now, if it comes from a file and changed.
    pub fn reread(&self) -> Option<Secret> {
        let file = self.file.as_ref()?;
        let value = std::fs::read_to_string(file).ok()?.trim_end().to_string();
        (!value.is_empty() && value != self.value).then(|| Secret {
            value,
            ..self.clone()
        })
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "<secret {}, {} chars>",
            self.origin,
            self.value.chars().count()
        )
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Serialized as its mask, like `Display`: no serialization shows the value.
impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// How tally authenticates its calls to the Service Management API. Serialized flattened into its
/// table, as the key that gives it: `service_token = ...` or `provider_key = ...`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendAuth {
    ServiceToken(Secret),
    /// Deprecated by 3scale, still accepted.
    ProviderKey(Secret),
}

impl BackendAuth {
    /// The credentials as their file holds them now, if they come from a file and changed.
    pub fn reread(&self) -> Option<BackendAuth> {
        match self {
            BackendAuth::ServiceToken(s) => s.reread().map(BackendAuth::ServiceToken),
            BackendAuth::ProviderKey(s) => s.reread().map(BackendAuth::ProviderKey),
        }
    }

    /// The form field name and the secret.
    pub fn field(&self) -> (&'static str, &Secret) {
        match self {
            BackendAuth::ServiceToken(s) => ("service_token", s),
            BackendAuth::ProviderKey(s) => ("provider_key", s),
        }
    }
}

// The typed configuration serializes to the file's own sections and keys (the effective
// configuration), so that it parses again.

#[derive(Debug, Clone, Serialize)]
pub struct Backend {
    #[serde(serialize_with = "as_text")]
    pub url: reqwest::Url,
    /// The token of every service without one of its own (none: each has its own, from its source
    /// or the proxy configuration).
    #[serde(flatten)]
    pub auth: Option<BackendAuth>,
    /// How long making a connection may take.
    #[serde(serialize_with = "duration::serialize")]
    pub connect_timeout: Duration,
    /// How long a connected call waits for its answer (raised while 3scale is slow).
    #[serde(serialize_with = "duration::serialize")]
    pub timeout: Duration,
    /// Extra root certificates to trust, beside the system's: the PEM file, and its certificates
    /// (read once, when the configuration is checked). Shown as the file's path.
    #[serde(serialize_with = "ca_file", skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<(PathBuf, Vec<reqwest::Certificate>)>,
    /// Check each new credential with an authorize call before reporting it.
    pub validate_credentials: bool,
    /// How long an authorize answer is trusted: an application that exists, one that does not.
    #[serde(serialize_with = "duration::serialize")]
    pub valid_credential_ttl: Duration,
    #[serde(serialize_with = "duration::serialize")]
    pub invalid_credential_ttl: Duration,
    /// How often a call that 3scale rejected (bad token...) is tried again.
    #[serde(serialize_with = "duration::serialize")]
    pub rejected_retry: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadFrom {
    /// Read the files there at the first start from their start.
    Beginning,
    /// Skip what they hold at the first start.
    End,
}

#[derive(Debug, Clone, Serialize)]
pub struct Source {
    /// What the source is known by in the state (its checkpoints) and the logs: given, or its
    /// path. A name keeps the checkpoints when the path changes.
    pub name: String,
    /// A file path or a glob pattern, made absolute against the configuration file's folder.
    pub path: String,
    /// The 3scale service its requests are reported to.
    pub service_id: String,
    /// How its lines are written (`format`, or `log_format` and `log_escape`; JSON lines'
    /// `[sources.fields]`).
    #[serde(flatten, serialize_with = "log_format")]
    pub format: LogFormat,
    /// Where the first run starts in the files there.
    pub read_from: ReadFrom,
    /// Where its requests carry their credential (`[sources.credentials]`).
    pub credentials: CredentialRule,
    /// The container runtime's records its lines are wrapped in (`wrapper`, `stream`).
    #[serde(flatten)]
    pub container: Option<Container>,
    /// How its requests count (`[[sources.mapping_rules]]`; none: one hit each).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mapping_rules: Vec<MappingRule>,
    /// This source's own service token (or provider key), instead of `[backend]`'s.
    #[serde(flatten)]
    pub auth: Option<BackendAuth>,
    /// Without a `service_id`: the lines of which hosts are this service's.
    #[serde(skip)]
    pub(crate) route: Option<Route>,
    /// Its place among the `[[sources]]` entries (a source routed by Host is one per service).
    #[serde(skip)]
    pub(crate) index: usize,
}

/// What a source routed by Host takes for one of its services.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    /// The lines of which hosts are this service's.
    pub(crate) hosts: HostRoute,
    /// What the source gives itself (the rest comes from the proxy configuration): shown by
    /// `tally check`.
    given: Given,
}

#[derive(Debug, Clone, Copy)]
struct Given {
    credentials: bool,
    mapping_rules: bool,
    auth: bool,
}

impl Config {
    /// One source per `[[sources]]` entry (of a source routed by Host, the first of its
    /// services).
    pub(crate) fn entries(&self) -> impl Iterator<Item = &Source> {
        self.sources
            .iter()
            .filter(|s| s.route.as_ref().is_none_or(|r| r.hosts.counts_all()))
    }

    /// The services reported to, each once, in the order of the sources.
    pub(crate) fn services(&self) -> Vec<String> {
        let mut ids: Vec<String> = Vec::new();
        for s in &self.sources {
            if !ids.contains(&s.service_id) {
                ids.push(s.service_id.clone());
            }
        }
        ids
    }

    /// Every metric the mapping rules of `service_id`'s sources name (and `hits`).
    pub(crate) fn metrics_of(&self, service_id: &str) -> MetricNames {
        let names: Vec<&str> = self
            .sources
            .iter()
            .filter(|s| s.service_id == service_id)
            .flat_map(|s| s.mapping_rules.iter().map(|r| r.metric.trim()))
            .collect();
        MetricNames::new(&names)
    }
}

impl Source {
    /// The parser of its lines (longer lines are skipped as too long).
    pub(crate) fn parser(&self, max_line_length: usize) -> crate::parse::Parser {
        let parser = crate::parse::Parser::new(self.format.clone(), self.credentials.clone());
        match self.container {
            Some(container) => parser.unwrapping(container, max_line_length),
            None => parser,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    #[serde(serialize_with = "duration::serialize")]
    pub flush_interval: Duration,
    pub max_transactions: usize,
    pub response_codes: bool,
    /// How long a stopping tally may take to send what it has read.
    #[serde(serialize_with = "duration::serialize")]
    pub shutdown_grace: Duration,
    /// Report calls under way at once, per service.
    pub concurrency: usize,
    /// Transactions older than this when their call is sent are dropped (3scale's window is 24 h).
    #[serde(serialize_with = "duration::serialize")]
    pub max_age: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct Tail {
    #[serde(serialize_with = "duration::serialize")]
    pub poll_interval: Duration,
    /// Wake on file-system events; off, the safety poll alone finds new lines.
    pub watch: bool,
    #[serde(serialize_with = "duration::serialize")]
    pub rotate_grace: Duration,
    pub max_line_length: usize,
    /// Punch holes in what 3scale has accepted (tally is the log's only reader).
    pub reclaim: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct State {
    #[serde(serialize_with = "path_text")]
    pub dir: PathBuf,
}

/// How tally writes its own log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogOutput {
    /// One line of `key=value` fields per event.
    Text,
    /// One JSON object per event, for log pipelines.
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, Serialize)]
pub struct Logging {
    /// Text or JSON.
    pub format: LogOutput,
    /// A tracing filter (`info`, `tally=debug`); `RUST_LOG` overrides it.
    pub level: String,
    /// How often the counters and each file's lag are logged.
    #[serde(serialize_with = "duration::serialize")]
    pub stats_interval: Duration,
}

/// `[telemetry]`.
#[derive(Debug, Clone, Serialize)]
pub struct Telemetry {
    /// Where /metrics, /healthz and /livez are served; None: nowhere, shown as `""` (which the
    /// file accepts for it too).
    #[serde(serialize_with = "listen")]
    pub listen: Option<std::net::SocketAddr>,
    /// /healthz fails when a service has had nothing accepted for this long while requests wait.
    #[serde(serialize_with = "duration::serialize")]
    pub stalled_after: Duration,
    /// The latest calls the Response codes page keeps per code and service (0: none).
    pub calls_per_code: usize,
    /// Whether the page shows call details (paths) on a listener that is not on loopback.
    pub calls_on_public_listener: bool,
}

impl Telemetry {
    /// The calls kept per code: none without a listener, nor on a public one unless allowed.
    pub(crate) fn calls_kept(&self) -> usize {
        match self.listen {
            Some(addr) if addr.ip().is_loopback() || self.calls_on_public_listener => {
                self.calls_per_code
            }
            _ => 0,
        }
    }
}

/// The fields in the order `tally check` shows the sections.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// `[backend]`: where and how to call 3scale.
    pub backend: Backend,
    /// `[[sources]]`: the logs and the services they report to (a source routed by Host is one
    /// per service here).
    #[serde(serialize_with = "sources_as_given")]
    pub sources: Vec<Source>,
    /// `[report]`: batching and sending.
    pub report: Report,
    /// `[tail]`: following the files.
    pub tail: Tail,
    /// `[state]`: the checkpoints.
    pub state: State,
    /// `[log]`: tally's own log.
    pub log: Logging,
    /// `[telemetry]`: metrics and health.
    pub telemetry: Telemetry,
    /// `[proxy_config]`: the 3scale proxy configuration the services' settings come from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_config: Option<ProxyConfigSettings>,
    #[serde(skip)]
    pub(crate) origin: Origin,
    /// Keys given under an older name: they work, and `tally check` says what to write instead.
    #[serde(skip)]
    pub(crate) deprecated: Vec<String>,
}

/// `[proxy_config]`: a file, or the admin portal.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyConfigSettings {
    /// The file, as the admin portal or APIcast has it.
    #[serde(
        serialize_with = "optional_path",
        skip_serializing_if = "Option::is_none"
    )]
    pub file: Option<PathBuf>,
    /// The admin portal it is fetched from (without credentials).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_token: Option<Secret>,
    /// `production` or `staging`, with a url.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    /// How often the file is read again or the portal asked again.
    #[serde(serialize_with = "duration::serialize")]
    pub refresh: Duration,
    #[serde(serialize_with = "ca_file", skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<(PathBuf, Vec<reqwest::Certificate>)>,
    /// APIcast's path routing, for sources routed by Host.
    pub path_routing: bool,
    /// Where it is fetched from, with a url.
    #[serde(skip)]
    pub(crate) portal: Option<crate::proxy_config::Portal>,
    /// The document in use, and where it came from.
    #[serde(skip)]
    pub(crate) loaded: Loaded,
}

/// The proxy configuration document tally runs with.
#[derive(Debug, Clone, Default)]
pub(crate) struct Loaded {
    pub(crate) document: Arc<[u8]>,
    /// When the admin portal could not give it at start: why, and that the saved copy is used.
    pub(crate) fallback: Option<String>,
}

/// The configuration file as read, to be resolved again with a new proxy configuration.
#[derive(Debug, Clone, Default)]
pub(crate) struct Origin {
    pub(crate) path: PathBuf,
    pub(crate) text: String,
}

fn optional_path<S: Serializer>(value: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(p) => path_text(p, s),
        None => s.serialize_none(),
    }
}

/// The sources as the file gives them: a source routed by Host once, without a service id, and
/// without what its services take from the proxy configuration.
fn sources_as_given<S: Serializer>(sources: &[Source], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::{Error, SerializeSeq};
    let mut seq = s.serialize_seq(None)?;
    for source in sources {
        match &source.route {
            None => seq.serialize_element(source)?,
            Some(route) if route.hosts.counts_all() => {
                let mut table = toml::Table::try_from(source).map_err(S::Error::custom)?;
                table.remove("service_id");
                let given = route.given;
                let from_proxy = [
                    (!given.credentials, &["credentials"][..]),
                    (!given.mapping_rules, &["mapping_rules"][..]),
                    (!given.auth, &["service_token", "provider_key"][..]),
                ];
                for key in from_proxy
                    .iter()
                    .filter(|(drop, _)| *drop)
                    .flat_map(|(_, k)| *k)
                {
                    table.remove(*key);
                }
                seq.serialize_element(&table)?;
            }
            Some(_) => {}
        }
    }
    seq.end()
}

fn as_text<S: Serializer>(value: &impl fmt::Display, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

/// A path as text even if it is not UTF-8 (shown, not sent anywhere).
fn path_text<S: Serializer>(value: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&value.display())
}

/// The file's path, not its certificates.
fn ca_file<S: Serializer>(
    value: &Option<(PathBuf, Vec<reqwest::Certificate>)>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some((file, _)) => path_text(file, s),
        None => s.serialize_none(),
    }
}

/// A source's format as the file gives it: `format`, for a `log_format` its text and escaping, for
/// JSON lines its `[sources.fields]`.
fn log_format<S: Serializer>(format: &LogFormat, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(None)?;
    map.serialize_entry("format", format.name())?;
    match format {
        LogFormat::Nginx(nginx) => {
            map.serialize_entry("log_format", &nginx.text)?;
            map.serialize_entry("log_escape", &nginx.escape())?;
        }
        LogFormat::Json(json) => map.serialize_entry("fields", &json.fields)?,
        LogFormat::Regex(regex) => {
            map.serialize_entry("regex", &regex.text)?;
            if let Some(time_format) = &regex.time_format_text {
                map.serialize_entry("time_format", time_format)?;
            }
            map.serialize_entry("log_escape", &regex.escape)?;
        }
        LogFormat::Combined | LogFormat::Common => {}
    }
    map.end()
}

fn listen<S: Serializer>(value: &Option<std::net::SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(address) => s.collect_str(address),
        None => s.serialize_str(""),
    }
}

// ---- the file as written -------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    backend: Spanned<RawBackend>,
    #[serde(default)]
    sources: Vec<Spanned<RawSource>>,
    #[serde(default)]
    report: RawReport,
    #[serde(default)]
    tail: RawTail,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    telemetry: RawTelemetry,
    proxy_config: Option<Spanned<RawProxyConfig>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxyConfig {
    file: Option<Spanned<String>>,
    url: Option<Spanned<String>>,
    access_token: Option<Spanned<String>>,
    access_token_env: Option<Spanned<String>>,
    access_token_file: Option<Spanned<String>>,
    environment: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "duration::optional")]
    refresh: Option<Duration>,
    ca_file: Option<Spanned<String>>,
    path_routing: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTelemetry {
    listen: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "duration::optional")]
    stalled_after: Option<Duration>,
    calls_per_code: Option<Spanned<i64>>,
    calls_on_public_listener: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    url: Option<Spanned<String>>,
    service_token: Option<Spanned<String>>,
    service_token_env: Option<Spanned<String>>,
    service_token_file: Option<Spanned<String>>,
    provider_key: Option<Spanned<String>>,
    provider_key_env: Option<Spanned<String>>,
    provider_key_file: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "duration::optional")]
    connect_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration::optional")]
    timeout: Option<Duration>,
    ca_file: Option<Spanned<String>>,
    validate_credentials: Option<bool>,
    #[serde(default, deserialize_with = "duration::optional")]
    valid_credential_ttl: Option<Duration>,
    #[serde(default, deserialize_with = "duration::optional")]
    invalid_credential_ttl: Option<Duration>,
    #[serde(default, deserialize_with = "duration::optional")]
    rejected_retry: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: Option<Spanned<String>>,
    path: Spanned<String>,
    service_id: Option<Spanned<String>>,
    format: Option<Spanned<String>>,
    log_format: Option<Spanned<String>>,
    log_escape: Option<LogEscape>,
    wrapper: Option<Wrapper>,
    stream: Option<Spanned<Stream>>,
    mapping_rules: Option<Spanned<Vec<MappingRule>>>,
    /// For format = "regex".
    regex: Option<Spanned<String>>,
    time_format: Option<Spanned<String>>,
    read_from: Option<ReadFrom>,
    /// Before `[sources.credentials]`: the mode alone.
    credential: Option<Spanned<CredentialMode>>,
    credentials: Option<Spanned<RawCredentials>>,
    /// For format = "json".
    fields: Option<Spanned<RawFields>>,
    service_token: Option<Spanned<String>>,
    service_token_env: Option<Spanned<String>>,
    service_token_file: Option<Spanned<String>>,
    provider_key: Option<Spanned<String>>,
    provider_key_env: Option<Spanned<String>>,
    provider_key_file: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFields {
    time: Option<String>,
    status: Option<String>,
    method: Option<String>,
    uri: Option<String>,
    path: Option<String>,
    query: Option<String>,
    host: Option<String>,
    user_key: Option<String>,
    app_id: Option<String>,
    authorization: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCredentials {
    location: Option<CredentialLocation>,
    mode: Option<CredentialMode>,
    jwt_claim: Option<String>,
    user_key: Option<String>,
    app_id: Option<String>,
    app_key: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawReport {
    #[serde(default, deserialize_with = "duration::optional")]
    flush_interval: Option<Duration>,
    #[serde(default, deserialize_with = "max_transactions")]
    max_transactions: Option<usize>,
    response_codes: Option<bool>,
    #[serde(default, deserialize_with = "duration::optional")]
    shutdown_grace: Option<Duration>,
    concurrency: Option<Spanned<i64>>,
    #[serde(default, deserialize_with = "duration::max_age")]
    max_age: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTail {
    #[serde(default, deserialize_with = "duration::optional")]
    poll_interval: Option<Duration>,
    #[serde(default, deserialize_with = "duration::optional")]
    rotate_grace: Option<Duration>,
    max_line_length: Option<Spanned<i64>>,
    watch: Option<bool>,
    reclaim: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawState {
    dir: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<LogOutput>,
    level: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "duration::optional")]
    stats_interval: Option<Duration>,
}

mod duration {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    /// As the file gives it: "10s", "1m", "23h 55m".
    pub(super) fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*value))
    }

    /// A humantime duration ("5s", "1m 30s"), which must be above zero.
    pub(super) fn optional<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(d)?;
        let value = humantime::parse_duration(&text).map_err(|e| {
            D::Error::custom(format!(
                "`{text}` is not a duration ({e}); write e.g. \"5s\" or \"1m 30s\""
            ))
        })?;
        if value.is_zero() {
            return Err(D::Error::custom("the duration must be above zero"));
        }
        Ok(Some(value))
    }

    /// `report.max_age`: a duration of at most 24 h (the error points at the key's line).
    pub(super) fn max_age<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let value = optional(d)?;
        if value.is_some_and(|v| v > Duration::from_secs(24 * 3600)) {
            return Err(D::Error::custom(format!(
                "3scale drops whole calls holding transactions older than 24h: use at most 24h (default {})",
                humantime::format_duration(super::defaults::report::MAX_AGE)
            )));
        }
        Ok(value)
    }
}

fn max_transactions<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    use serde::de::Error;
    let n = i64::deserialize(d)?;
    if n < 1 || n > MAX_TRANSACTIONS_PER_CALL as i64 {
        return Err(D::Error::custom(format!(
            "{n} is out of range: the 3scale backend takes at most {MAX_TRANSACTIONS_PER_CALL} \
             transactions per report call (4096 form fields), so use 1 to {MAX_TRANSACTIONS_PER_CALL}"
        )));
    }
    Ok(Some(n as usize))
}

// ---- validation ----------------------------------------------------------------------------

struct Ctx<'a> {
    path: &'a Path,
    text: &'a str,
    dir: &'a Path,
    /// The proxy configuration, if one is given.
    proxy: Option<ProxyConfig>,
    /// `proxy_config.path_routing`.
    path_routing: bool,
}

impl Ctx<'_> {
    /// The line number of a byte offset in the file.
    fn line(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .matches('\n')
            .count()
            + 1
    }

    fn invalid(&self, key: &str, offset: usize, message: impl Into<String>) -> ConfigError {
        let line = self.line(offset);
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line,
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn resolve(&self, value: &str) -> PathBuf {
        let p = Path::new(value);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }

    /// A secret given one of three ways: literally, by environment variable name, or by file.
    fn secret(
        &self,
        table: &str,
        name: &str,
        [literal, env, file]: [Option<&Spanned<String>>; 3],
    ) -> Result<Option<Secret>, ConfigError> {
        let key = |suffix: &str| format!("{table}.{name}{suffix}");
        let given: Vec<(&str, &Spanned<String>)> = [("", literal), ("_env", env), ("_file", file)]
            .into_iter()
            .filter_map(|(s, v)| v.map(|v| (s, v)))
            .collect();
        let (suffix, value) = match given.as_slice() {
            [] => return Ok(None),
            [one] => *one,
            [_, (suffix, second), ..] => {
                return Err(self.invalid(
                    &key(suffix),
                    second.span().start,
                    format!("give only one of {name}, {name}_env and {name}_file"),
                ))
            }
        };
        let at = value.span().start;
        let secret = match suffix {
            "" => Secret {
                value: value.get_ref().clone(),
                origin: "given in the configuration".into(),
                file: None,
            },
            "_env" => {
                let var = value.get_ref();
                let v = std::env::var(var).map_err(|e| {
                    self.invalid(&key(suffix), at, format!("environment variable {var}: {e}"))
                })?;
                Secret {
                    value: v,
                    origin: format!("from environment variable {var}"),
                    file: None,
                }
            }
            _ => {
                let file = self.resolve(value.get_ref());
                let v = std::fs::read_to_string(&file).map_err(|e| {
                    self.invalid(
                        &key(suffix),
                        at,
                        format!("cannot read {}: {e}", file.display()),
                    )
                })?;
                Secret {
                    // Kubernetes Secret files and `echo` leave a trailing newline.
                    value: v.trim_end().to_string(),
                    origin: format!("from file {}", file.display()),
                    file: Some(file),
                }
            }
        };
        if secret.value.trim().is_empty() {
            return Err(self.invalid(&key(suffix), at, "the secret is empty"));
        }
        Ok(Some(secret))
    }

    fn backend(&self, raw: &Spanned<RawBackend>) -> Result<Backend, ConfigError> {
        let b = raw.get_ref();
        // Without a url, the proxy configuration's backend endpoint (APIcast's), else 3scale's.
        let endpoint = self
            .proxy
            .as_ref()
            .and_then(|p| p.services.iter().find_map(|s| s.backend_endpoint.clone()))
            .and_then(|e| reqwest::Url::parse(&e).ok())
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
        let url = match &b.url {
            None => endpoint.unwrap_or_else(|| {
                reqwest::Url::parse(defaults::backend::URL).expect("default URL is valid")
            }),
            Some(u) => {
                let parsed = reqwest::Url::parse(u.get_ref()).map_err(|e| {
                    self.invalid(
                        "backend.url",
                        u.span().start,
                        format!("`{}` is not a URL: {e}", u.get_ref()),
                    )
                })?;
                if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
                    return Err(self.invalid(
                        "backend.url",
                        u.span().start,
                        "use an http:// or https:// URL with a host, e.g. https://su1.3scale.net",
                    ));
                }
                parsed
            }
        };
        let fields = [
            [
                &b.service_token,
                &b.service_token_env,
                &b.service_token_file,
            ],
            [&b.provider_key, &b.provider_key_env, &b.provider_key_file],
        ];
        let auth = self.auth("backend", raw.span().start, fields)?;
        if auth.is_none() && self.proxy.is_none() {
            return Err(self.invalid(
                "backend",
                raw.span().start,
                "no credentials for 3scale: set service_token, service_token_env or service_token_file",
            ));
        }
        let ca_file = self.ca_file("backend.ca_file", &b.ca_file)?;
        Ok(Backend {
            url,
            auth,
            connect_timeout: b
                .connect_timeout
                .unwrap_or(defaults::backend::CONNECT_TIMEOUT),
            timeout: b.timeout.unwrap_or(defaults::backend::TIMEOUT),
            ca_file,
            validate_credentials: b
                .validate_credentials
                .unwrap_or(defaults::backend::VALIDATE_CREDENTIALS),
            valid_credential_ttl: b
                .valid_credential_ttl
                .unwrap_or(defaults::backend::VALID_CREDENTIAL_TTL),
            invalid_credential_ttl: b
                .invalid_credential_ttl
                .unwrap_or(defaults::backend::INVALID_CREDENTIAL_TTL),
            rejected_retry: b
                .rejected_retry
                .unwrap_or(defaults::backend::REJECTED_RETRY),
        })
    }

    /// A count given as `key`, within `range` (the error, `message`, points at its line), or
    /// `default` when not given.
    fn count(
        &self,
        key: &str,
        given: &Option<Spanned<i64>>,
        range: std::ops::RangeInclusive<i64>,
        default: usize,
        message: &str,
    ) -> Result<usize, ConfigError> {
        match given {
            None => Ok(default),
            Some(n) if range.contains(n.get_ref()) => Ok(*n.get_ref() as usize),
            Some(n) => Err(self.invalid(key, n.span().start, message)),
        }
    }

    /// The PEM certificates of a `ca_file` key.
    fn ca_file(
        &self,
        key: &str,
        given: &Option<Spanned<String>>,
    ) -> Result<Option<(PathBuf, Vec<reqwest::Certificate>)>, ConfigError> {
        let Some(f) = given else { return Ok(None) };
        let path = self.resolve(f.get_ref());
        let pem = std::fs::read(&path).map_err(|e| {
            self.invalid(
                key,
                f.span().start,
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        let certificates = reqwest::Certificate::from_pem_bundle(&pem)
            .ok()
            .filter(|certs| !certs.is_empty())
            .ok_or_else(|| {
                self.invalid(
                    key,
                    f.span().start,
                    format!("{} holds no PEM certificate", path.display()),
                )
            })?;
        Ok(Some((path, certificates)))
    }

    /// `[proxy_config]`, and the document it gives: `given` (a refresh), else the file's, else the
    /// admin portal's, else (the portal failing) the copy saved in `state_dir`.
    fn proxy_config(
        &mut self,
        raw: &Spanned<RawProxyConfig>,
        state_dir: &Path,
        given: Option<Arc<[u8]>>,
    ) -> Result<ProxyConfigSettings, ConfigError> {
        let p = raw.get_ref();
        let at = raw.span().start;
        let only_with_url = [
            ("environment", &p.environment),
            ("ca_file", &p.ca_file),
            ("access_token", &p.access_token),
            ("access_token_env", &p.access_token_env),
            ("access_token_file", &p.access_token_file),
        ];
        let refresh = p.refresh.unwrap_or(defaults::proxy_config::REFRESH);
        let path_routing = p
            .path_routing
            .unwrap_or(defaults::proxy_config::PATH_ROUTING);
        self.path_routing = path_routing;
        let (file, url) = match (&p.file, &p.url) {
            (None, None) => {
                return Err(self.invalid(
                    "proxy_config",
                    at,
                    "give the file (file = \"proxy-config.json\") or the admin portal (url = \"https://ACCOUNT-admin.3scale.net\")",
                ))
            }
            (Some(_), Some(u)) => {
                return Err(self.invalid(
                    "proxy_config.url",
                    u.span().start,
                    "give the file or the admin portal's url, not both",
                ))
            }
            (Some(f), None) => (Some(f), None),
            (None, Some(u)) => (None, Some(u)),
        };
        if let Some(f) = file {
            if let Some((key, v)) = only_with_url
                .iter()
                .find_map(|(k, v)| v.as_ref().map(|v| (k, v)))
            {
                return Err(self.invalid(
                    &format!("proxy_config.{key}"),
                    v.span().start,
                    "only with the admin portal's url (the file is read as it is)",
                ));
            }
            let path = self.resolve(f.get_ref());
            let document: Arc<[u8]> = match given {
                Some(d) => d,
                None => std::fs::read(&path)
                    .map_err(|e| {
                        self.invalid(
                            "proxy_config.file",
                            f.span().start,
                            format!("cannot read {}: {e}", path.display()),
                        )
                    })?
                    .into(),
            };
            let parsed = ProxyConfig::parse(&document).map_err(|e| {
                self.invalid(
                    "proxy_config.file",
                    f.span().start,
                    format!("{}: {e}", path.display()),
                )
            })?;
            self.proxy = Some(parsed);
            return Ok(ProxyConfigSettings {
                file: Some(path),
                url: None,
                access_token: None,
                environment: None,
                refresh,
                ca_file: None,
                path_routing,
                portal: None,
                loaded: Loaded {
                    document,
                    fallback: None,
                },
            });
        }
        let u = url.expect("one of file and url");
        let url_at = u.span().start;
        let mut parsed = reqwest::Url::parse(u.get_ref().trim())
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| {
                self.invalid(
                    "proxy_config.url",
                    url_at,
                    "use the admin portal's http:// or https:// URL, e.g. https://ACCOUNT-admin.3scale.net",
                )
            })?;
        // APIcast's THREESCALE_PORTAL_ENDPOINT carries the token as the URL's user.
        let in_url = (!parsed.username().is_empty()).then(|| Secret {
            value: parsed.username().to_string(),
            origin: "given in proxy_config.url".into(),
            file: None,
        });
        let _ = parsed.set_username("");
        let _ = parsed.set_password(None);
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(self.invalid(
                "proxy_config.url",
                url_at,
                "give the admin portal's address alone, without a query or fragment (the token goes in access_token)",
            ));
        }
        let token = self.secret(
            "proxy_config",
            "access_token",
            [
                p.access_token.as_ref(),
                p.access_token_env.as_ref(),
                p.access_token_file.as_ref(),
            ],
        )?;
        let access_token = match (in_url, token) {
            (Some(_), Some(_)) => {
                return Err(self.invalid(
                    "proxy_config.url",
                    url_at,
                    "the URL holds a token and access_token gives one too: give one",
                ))
            }
            (Some(t), None) | (None, Some(t)) => t,
            (None, None) => {
                return Err(self.invalid(
                    "proxy_config",
                    at,
                    "the admin portal needs an access token (Account Management API, read): set access_token, access_token_env or access_token_file",
                ))
            }
        };
        let (environment, path_name) = match p.environment.as_ref().map(|e| (e, e.get_ref().trim()))
        {
            None => (defaults::proxy_config::ENVIRONMENT, "production"),
            Some((_, "production")) => ("production", "production"),
            // The API calls the staging environment `sandbox`.
            Some((_, "staging" | "sandbox")) => ("staging", "sandbox"),
            Some((e, other)) => {
                return Err(self.invalid(
                    "proxy_config.environment",
                    e.span().start,
                    format!("`{other}` is no environment: give \"production\" or \"staging\""),
                ))
            }
        };
        let ca_file = self.ca_file("proxy_config.ca_file", &p.ca_file)?;
        let portal = crate::proxy_config::Portal {
            url: parsed.clone(),
            access_token: access_token.clone(),
            environment: path_name,
            ca_certificates: ca_file.as_ref().map(|(_, c)| c.clone()).unwrap_or_default(),
        };
        let saved = crate::proxy_config::saved_copy(state_dir);
        let (document, proxy, fallback) = match given {
            Some(document) => {
                let proxy = ProxyConfig::parse(&document)
                    .map_err(|e| self.invalid("proxy_config.url", url_at, e))?;
                (document, proxy, None)
            }
            None => {
                let fetched = portal.fetch_now().and_then(|d| {
                    let proxy = ProxyConfig::parse(&d)
                        .map_err(|e| format!("the admin portal's answer: {e}"))?;
                    Ok((Arc::<[u8]>::from(d), proxy))
                });
                match fetched {
                    Ok((document, proxy)) => (document, proxy, None),
                    Err(why) => {
                        let copy = std::fs::read(&saved)
                            .map_err(|e| format!("{}: {e}", saved.display()))
                            .and_then(|d| {
                                let proxy = ProxyConfig::parse(&d)
                                    .map_err(|e| format!("{}: {e}", saved.display()))?;
                                Ok((Arc::<[u8]>::from(d), proxy))
                            });
                        match copy {
                            Ok((document, proxy)) => (
                                document,
                                proxy,
                                Some(format!(
                                    "proxy_config.url: cannot fetch the proxy configuration ({why}): using the copy saved at {}",
                                    saved.display()
                                )),
                            ),
                            Err(no_copy) => {
                                return Err(self.invalid(
                                    "proxy_config.url",
                                    url_at,
                                    format!(
                                        "cannot fetch the proxy configuration ({why}), and there is no saved copy to start from ({no_copy})"
                                    ),
                                ))
                            }
                        }
                    }
                }
            }
        };
        self.proxy = Some(proxy);
        Ok(ProxyConfigSettings {
            file: None,
            url: Some(parsed.to_string()),
            access_token: Some(access_token),
            environment: Some(environment.to_string()),
            refresh,
            ca_file,
            path_routing,
            portal: Some(portal),
            loaded: Loaded { document, fallback },
        })
    }

    /// A service token or a provider key, each given one of three ways; None when neither is given.
    fn auth(
        &self,
        table: &str,
        at: usize,
        [token, key]: [[&Option<Spanned<String>>; 3]; 2],
    ) -> Result<Option<BackendAuth>, ConfigError> {
        let token = self.secret(table, "service_token", token.map(Option::as_ref))?;
        let key = self.secret(table, "provider_key", key.map(Option::as_ref))?;
        match (token, key) {
            (Some(t), None) => Ok(Some(BackendAuth::ServiceToken(t))),
            (None, Some(k)) => Ok(Some(BackendAuth::ProviderKey(k))),
            (Some(_), Some(_)) => Err(self.invalid(
                table,
                at,
                "give a service_token or a provider_key, not both",
            )),
            (None, None) => Ok(None),
        }
    }

    /// The source `i`: one, or, without a `service_id`, one per service of the proxy
    /// configuration that has Host names, each taking the lines of its hosts.
    fn sources(&self, i: usize, raw: &Spanned<RawSource>) -> Result<Vec<Source>, ConfigError> {
        let s = raw.get_ref();
        if let Some(service_id) = &s.service_id {
            let id = service_id.get_ref().trim();
            if id.is_empty() {
                return Err(self.invalid(
                    &format!("sources[{i}].service_id"),
                    service_id.span().start,
                    "the service id is empty; copy it from the 3scale admin portal (Integration page)",
                ));
            }
            return Ok(vec![self.source(i, raw, id, None)?]);
        }
        let routed: Vec<&ProxyService> = self
            .proxy
            .as_ref()
            .map(|p| p.services.iter().filter(|s| !s.hosts.is_empty()).collect())
            .unwrap_or_default();
        if routed.is_empty() {
            return Err(self.invalid(
                &format!("sources[{i}].service_id"),
                raw.span().start,
                "give the service id, or a [proxy_config] whose services' Host names (proxy.hosts) route each line to its service",
            ));
        }
        // Without path routing, a Host listed by several services is the first's, as APIcast
        // finds a service by Host: a line never goes to two services. With it, each line's
        // service is chosen among those of its Host (see `PathRouting`).
        let mut claimed: Vec<String> = Vec::new();
        let mut owned: Vec<(&ProxyService, Vec<String>)> = Vec::new();
        for service in routed {
            let mut hosts = Vec::new();
            for host in service.hosts.iter().map(|h| host_name(h)) {
                if !claimed.contains(&host) {
                    claimed.push(host.clone());
                    hosts.push(host);
                } else if self.path_routing && !hosts.contains(&host) {
                    hosts.push(host);
                }
            }
            if !hosts.is_empty() {
                owned.push((service, hosts));
            }
        }
        let all: Arc<Vec<String>> = Arc::new(claimed);
        let mut sources = Vec::with_capacity(owned.len());
        for (k, (service, hosts)) in owned.into_iter().enumerate() {
            let route = Route {
                hosts: HostRoute {
                    hosts,
                    // One of them counts the lines read and skipped (each line once).
                    all_hosts: (k == 0).then(|| all.clone()),
                    path_routing: None,
                },
                given: Given {
                    credentials: s.credentials.is_some() || s.credential.is_some(),
                    mapping_rules: s.mapping_rules.is_some(),
                    auth: [
                        &s.service_token,
                        &s.service_token_env,
                        &s.service_token_file,
                        &s.provider_key,
                        &s.provider_key_env,
                        &s.provider_key_file,
                    ]
                    .iter()
                    .any(|f| f.is_some()),
                },
            };
            let source = self.source(i, raw, &service.id, Some(route))?;
            if source.container.is_some() {
                return Err(self.invalid(
                    &format!("sources[{i}].wrapper"),
                    raw.span().start,
                    "routing container records by Host is not supported yet: give the service id",
                ));
            }
            if !source.format.logs_host() {
                return Err(self.invalid(
                    &format!("sources[{i}].service_id"),
                    raw.span().start,
                    "lines are routed to services by Host, and the format logs none: add $host to the log_format (or the host field or group), or give the service id",
                ));
            }
            sources.push(source);
        }
        if self.path_routing {
            path_routing(&mut sources);
        }
        Ok(sources)
    }

    fn source(
        &self,
        i: usize,
        raw: &Spanned<RawSource>,
        service_id: &str,
        route: Option<Route>,
    ) -> Result<Source, ConfigError> {
        let s = raw.get_ref();
        let key = |k: &str| format!("sources[{i}].{k}");
        let sid_at = s
            .service_id
            .as_ref()
            .map_or(raw.span().start, |sid| sid.span().start);
        let path = s.path.get_ref().trim();
        if path.is_empty() {
            return Err(self.invalid(&key("path"), s.path.span().start, "the path is empty"));
        }
        let path = self.resolve(path).to_string_lossy().into_owned();
        glob::Pattern::new(&path).map_err(|e| {
            self.invalid(
                &key("path"),
                s.path.span().start,
                format!("not a valid glob pattern: {e}"),
            )
        })?;
        let fields = [
            [
                &s.service_token,
                &s.service_token_env,
                &s.service_token_file,
            ],
            [&s.provider_key, &s.provider_key_env, &s.provider_key_file],
        ];
        let auth = self.auth(&format!("sources[{i}]"), raw.span().start, fields)?;
        let name = match &s.name {
            None => path.clone(),
            Some(n) if n.get_ref().trim().is_empty() || n.get_ref().chars().any(char::is_control) => {
                return Err(self.invalid(
                    &key("name"),
                    n.span().start,
                    "give a name of printable characters, or leave it out (the path is the name then)",
                ))
            }
            Some(n) => n.get_ref().trim().to_string(),
        };
        let proxied = self.proxy.as_ref().and_then(|p| p.service(service_id));
        if let (Some(p), None) = (&self.proxy, proxied) {
            return Err(self.invalid(
                &key("service_id"),
                sid_at,
                format!(
                    "the proxy configuration has no service {service_id} (it has {})",
                    p.services
                        .iter()
                        .map(|s| s.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        // The proxy configuration's settings, where the source gives none of its own.
        let credentials = match proxied {
            Some(p) if s.credentials.is_none() && s.credential.is_none() => {
                p.credentials.clone().map_err(|e| {
                    self.invalid(
                        &key("service_id"),
                        sid_at,
                        format!("proxy configuration: {e}"),
                    )
                })?
            }
            _ => self.credentials(i, s)?,
        };
        let auth = match (auth, proxied.and_then(|p| p.backend_auth.as_ref())) {
            (Some(auth), _) => Some(auth),
            (None, Some((kind, value))) => {
                let secret = Secret {
                    value: value.trim().to_string(),
                    origin: format!("from the proxy configuration (service {service_id})"),
                    file: None,
                };
                Some(match kind.as_str() {
                    "provider_key" => BackendAuth::ProviderKey(secret),
                    _ => BackendAuth::ServiceToken(secret),
                })
            }
            (None, None) => None,
        };
        let format = self.format(i, s, &credentials)?;
        let container = match (s.wrapper, &s.stream) {
            (Some(wrapper), stream) => Some(Container {
                wrapper,
                stream: stream
                    .as_ref()
                    .map_or(defaults::sources::STREAM, |s| *s.get_ref()),
            }),
            (None, Some(stream)) => return Err(self.invalid(
                &key("stream"),
                stream.span().start,
                "stream is the container output kept: give wrapper = \"cri\" or \"docker\" with it",
            )),
            (None, None) => None,
        };
        let mapping_rules = match &s.mapping_rules {
            None => {
                match proxied {
                    Some(p) => {
                        MappingRules::check(&p.rules).map_err(|(at, e)| {
                        self.invalid(
                            &key("service_id"),
                            sid_at,
                            format!("proxy configuration: service {service_id}: proxy_rules[{at}]: {e}"),
                        )
                    })?;
                        p.rules.clone()
                    }
                    None => Vec::new(),
                }
            }
            Some(rules) => {
                MappingRules::check(rules.get_ref()).map_err(|(at, e)| {
                    self.invalid(&key(&format!("mapping_rules[{at}]")), rules.span().start, e)
                })?;
                rules.get_ref().clone()
            }
        };
        Ok(Source {
            name,
            path,
            service_id: service_id.to_string(),
            format,
            read_from: s.read_from.unwrap_or(defaults::sources::READ_FROM),
            credentials,
            container,
            mapping_rules,
            auth,
            route,
            index: i,
        })
    }

    /// `[sources.credentials]`, or the mode of the older `credential` key.
    fn credentials(&self, i: usize, s: &RawSource) -> Result<CredentialRule, ConfigError> {
        use defaults::sources as d;
        let raw = s.credentials.as_ref().map(Spanned::get_ref);
        if let (Some(old), Some(new)) = (&s.credential, &s.credentials) {
            if new.get_ref().mode.is_some() {
                return Err(self.invalid(
                    &format!("sources[{i}].credential"),
                    old.span().start,
                    "give credentials.mode only (credential is its older name)",
                ));
            }
        }
        let invalid = |key: &str, message: String| {
            self.invalid(
                &format!("sources[{i}].credentials.{key}"),
                s.credentials.as_ref().map_or(0, |c| c.span().start),
                message,
            )
        };
        let name = |value: Option<&String>, default: &str, key: &str| {
            let value = value.map_or(default, |v| v.trim());
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid(
                    key,
                    "give the parameter or header name, as in the 3scale product's settings".into(),
                ));
            }
            Ok(value.to_string())
        };
        let claim = raw
            .and_then(|c| c.jwt_claim.as_deref())
            .map_or(d::JWT_CLAIM, str::trim);
        if claim.is_empty() || claim.chars().any(char::is_control) {
            return Err(invalid(
                "jwt_claim",
                "give the access token's claim that holds the app_id (azp, client_id…)".into(),
            ));
        }
        let jwt_claim = JwtClaim::new(claim).map_err(|e| invalid("jwt_claim", e))?;
        Ok(CredentialRule {
            location: raw
                .and_then(|c| c.location)
                .unwrap_or(d::CREDENTIALS_LOCATION),
            mode: raw
                .and_then(|c| c.mode)
                .or(s.credential.as_ref().map(|m| *m.get_ref()))
                .unwrap_or(d::CREDENTIALS_MODE),
            jwt_claim,
            user_key: name(
                raw.and_then(|c| c.user_key.as_ref()),
                d::USER_KEY,
                "user_key",
            )?,
            app_id: name(raw.and_then(|c| c.app_id.as_ref()), d::APP_ID, "app_id")?,
            app_key: name(raw.and_then(|c| c.app_key.as_ref()), d::APP_KEY, "app_key")?,
            optional: false,
        })
    }

    /// `format`, or a `log_format` compiled for the source's credentials.
    fn format(
        &self,
        i: usize,
        s: &RawSource,
        credentials: &CredentialRule,
    ) -> Result<LogFormat, ConfigError> {
        let key = |k: &str| format!("sources[{i}].{k}");
        let name = s.format.as_ref().map(|f| f.get_ref().as_str());
        let fixed = |format: LogFormat| {
            if credentials.location != CredentialLocation::Query {
                let variable = match credentials.mode {
                    CredentialMode::Oidc => "$http_authorization",
                    _ => "$http_…",
                };
                return Err(self.invalid(
                    &key("credentials.location"),
                    s.credentials.as_ref().map_or(0, |c| c.span().start),
                    format!(
                        "the {} format logs no request headers: give a log_format that logs them ({variable})",
                        format.name()
                    ),
                ));
            }
            Ok(format)
        };
        if let (Some(fields), false) = (&s.fields, name == Some("json")) {
            return Err(self.invalid(
                &key("fields"),
                fields.span().start,
                "fields are the keys of JSON lines: give format = \"json\" with them",
            ));
        }
        for (given, what) in [(&s.regex, "regex"), (&s.time_format, "time_format")] {
            if let (Some(given), false) = (given, name == Some("regex")) {
                return Err(self.invalid(
                    &key(what),
                    given.span().start,
                    format!("{what} is for format = \"regex\": give that format with it"),
                ));
            }
        }
        match (name, &s.log_format) {
            (Some("regex"), None) => {
                let Some(text) = &s.regex else {
                    return Err(self.invalid(
                        &key("regex"),
                        s.format.as_ref().map_or(0, |f| f.span().start),
                        "format regex needs the expression: regex = '...' with named groups (time, status, ...)",
                    ));
                };
                let time_format = s.time_format.as_ref();
                let escape = s.log_escape.unwrap_or(defaults::sources::LOG_ESCAPE);
                RegexFormat::compile(
                    text.get_ref(),
                    time_format.map(|t| t.get_ref().as_str()),
                    escape,
                    credentials,
                )
                .map(|f| LogFormat::Regex(std::sync::Arc::new(f)))
                .map_err(|(which, e)| {
                    let at = match (which, time_format) {
                        ("time_format", Some(t)) => t.span().start,
                        _ => text.span().start,
                    };
                    self.invalid(&key(which), at, e)
                })
            }
            (Some("json"), None) => {
                let raw = s.fields.as_ref().map(Spanned::get_ref);
                let d = JsonFields::default();
                let given = |f: fn(&RawFields) -> &Option<String>, default: String| {
                    raw.and_then(|r| f(r).as_ref())
                        .map_or(default, |v| v.trim().to_string())
                };
                let fields = JsonFields {
                    time: given(|r| &r.time, d.time),
                    status: given(|r| &r.status, d.status),
                    method: given(|r| &r.method, d.method),
                    uri: given(|r| &r.uri, d.uri),
                    path: given(|r| &r.path, d.path),
                    query: given(|r| &r.query, d.query),
                    host: given(|r| &r.host, d.host),
                    user_key: given(|r| &r.user_key, d.user_key),
                    app_id: given(|r| &r.app_id, d.app_id),
                    authorization: given(|r| &r.authorization, d.authorization),
                };
                let at = match (&s.fields, &s.format) {
                    (Some(f), _) => f.span().start,
                    (None, Some(f)) => f.span().start,
                    (None, None) => 0,
                };
                JsonFormat::compile(fields, credentials)
                    .map(|f| LogFormat::Json(std::sync::Arc::new(f)))
                    .map_err(|e| self.invalid(&key("fields"), at, e))
            }
            (None | Some("nginx"), Some(text)) => {
                let escape = s.log_escape.unwrap_or(defaults::sources::LOG_ESCAPE);
                NginxFormat::compile(text.get_ref(), escape, credentials)
                    .map(|f| LogFormat::Nginx(std::sync::Arc::new(f)))
                    .map_err(|e| self.invalid(&key("log_format"), text.span().start, e))
            }
            (Some(other), Some(text)) => Err(self.invalid(
                &key("format"),
                text.span().start,
                format!("give format = \"{other}\" or a log_format, not both"),
            )),
            (Some("nginx"), None) => Err(self.invalid(
                &key("format"),
                s.format.as_ref().map_or(0, |f| f.span().start),
                "format nginx needs the log_format itself: log_format = '...' (from nginx.conf)",
            )),
            (None, None) => fixed(match defaults::sources::FORMAT {
                "common" => LogFormat::Common,
                _ => LogFormat::Combined,
            }),
            (Some("combined"), None) => fixed(LogFormat::Combined),
            (Some("common"), None) => fixed(LogFormat::Common),
            (Some(other), None) => Err(self.invalid(
                &key("format"),
                s.format.as_ref().map_or(0, |f| f.span().start),
                format!("unknown format `{other}`: give combined, common, json, regex, or a log_format = '...' from nginx.conf"),
            )),
        }
    }
}

impl Config {
    /// Reads and validates the configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Config::parse(path, &text)
    }

    /// Validates `text` as the content of the file at `path` (relative paths in it are taken
    /// against that file's folder).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        Config::resolve(path, text, None)
    }

    /// This configuration with another proxy configuration document (a refresh of its
    /// `[proxy_config]`): the file as it was read at start, resolved again.
    pub(crate) fn with_proxy_document(&self, document: Arc<[u8]>) -> Result<Config, ConfigError> {
        Config::resolve(&self.origin.path, &self.origin.text, Some(document))
    }

    fn resolve(
        path: &Path,
        text: &str,
        proxy_document: Option<Arc<[u8]>>,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: redact_excerpt(e.to_string().trim_end()),
        })?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        let mut ctx = Ctx {
            path,
            text,
            dir: &dir,
            proxy: None,
            path_routing: false,
        };
        let state_dir = ctx.resolve(raw.state.dir.as_deref().unwrap_or(defaults::state::DIR));
        let proxy_config = match &raw.proxy_config {
            None => None,
            Some(p) => Some(ctx.proxy_config(p, &state_dir, proxy_document)?),
        };
        let backend = ctx.backend(&raw.backend)?;
        if raw.sources.is_empty() {
            return Err(ctx.invalid(
                "sources",
                text.len(),
                "no [[sources]]: add at least one log file to follow",
            ));
        }
        let sources = raw
            .sources
            .iter()
            .enumerate()
            .map(|(i, s)| ctx.sources(i, s))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .flatten()
            .collect::<Vec<_>>();
        let report = Report {
            flush_interval: raw
                .report
                .flush_interval
                .unwrap_or(defaults::report::FLUSH_INTERVAL),
            max_transactions: raw
                .report
                .max_transactions
                .unwrap_or(defaults::report::MAX_TRANSACTIONS),
            response_codes: raw
                .report
                .response_codes
                .unwrap_or(defaults::report::RESPONSE_CODES),
            shutdown_grace: raw
                .report
                .shutdown_grace
                .unwrap_or(defaults::report::SHUTDOWN_GRACE),
            concurrency: ctx.count(
                "report.concurrency",
                &raw.report.concurrency,
                1..=16,
                defaults::report::CONCURRENCY,
                "give 1 to 16 calls under way at once",
            )?,
            max_age: raw.report.max_age.unwrap_or(defaults::report::MAX_AGE),
        };
        // A source's name keys its checkpoints: two alike would share them.
        for (i, s) in sources.iter().enumerate() {
            if let Some(j) = sources[..i]
                .iter()
                .position(|o| o.name == s.name && o.service_id == s.service_id)
            {
                return Err(ctx.invalid(
                    &format!("sources[{}]", s.index),
                    raw.sources[s.index].span().start,
                    format!(
                        "sources[{}] of service {} has the same name `{}` (a source without a name is named by its path): give each its own name",
                        sources[j].index, s.service_id, s.name
                    ),
                ));
            }
        }
        // One path is read once, for every service it feeds: twice for one service would count
        // each of its lines twice.
        for (i, s) in sources.iter().enumerate() {
            if let Some(j) = sources[..i]
                .iter()
                .position(|o| o.path == s.path && o.service_id == s.service_id)
            {
                return Err(ctx.invalid(
                    &format!("sources[{}].path", s.index),
                    raw.sources[s.index].span().start,
                    format!(
                        "sources[{}] of service {} reads the same path `{}`: each line would count twice",
                        sources[j].index, s.service_id, s.path
                    ),
                ));
            }
        }
        // One path is read once for all its sources: they must agree on how its records are wrapped.
        for (i, s) in sources.iter().enumerate() {
            if let Some(other) = sources[..i]
                .iter()
                .position(|o| o.path == s.path && o.container != s.container)
            {
                return Err(ctx.invalid(
                    &format!("sources[{}].wrapper", s.index),
                    raw.sources[s.index].span().start,
                    format!("sources[{}] reads the same path with another wrapper or stream: give both the same", sources[other].index),
                ));
            }
        }
        // Sources of one service must agree on its credentials.
        for (i, s) in sources.iter().enumerate() {
            let other = sources[..i]
                .iter()
                .find(|o| o.service_id == s.service_id && o.auth != s.auth);
            if other.is_some() {
                return Err(ctx.invalid(
                    &format!("sources[{}]", s.index),
                    raw.sources[s.index].span().start,
                    format!(
                        "another source of service {} gives other credentials for it",
                        s.service_id
                    ),
                ));
            }
        }
        let telemetry = Telemetry {
            listen: match &raw.telemetry.listen {
                None => defaults::telemetry::LISTEN,
                Some(l) if l.get_ref().is_empty() => None,
                Some(l) => Some(l.get_ref().parse().map_err(|e| {
                    ctx.invalid(
                        "telemetry.listen",
                        l.span().start,
                        format!("`{}` is not an address:port ({e})", l.get_ref()),
                    )
                })?),
            },
            stalled_after: raw
                .telemetry
                .stalled_after
                .unwrap_or(defaults::telemetry::STALLED_AFTER),
            calls_per_code: ctx.count(
                "telemetry.calls_per_code",
                &raw.telemetry.calls_per_code,
                0..=10_000,
                defaults::telemetry::CALLS_PER_CODE,
                "give 0 (no call details) to 10000 calls kept per code",
            )?,
            calls_on_public_listener: raw
                .telemetry
                .calls_on_public_listener
                .unwrap_or(defaults::telemetry::CALLS_ON_PUBLIC_LISTENER),
        };
        let max_line_length = ctx.count(
            "tail.max_line_length",
            &raw.tail.max_line_length,
            256..=(64 << 20),
            defaults::tail::MAX_LINE_LENGTH,
            "give a number of bytes from 256 to 67108864 (64 MiB)",
        )?;
        let tail = Tail {
            poll_interval: raw
                .tail
                .poll_interval
                .unwrap_or(defaults::tail::POLL_INTERVAL),
            watch: raw.tail.watch.unwrap_or(defaults::tail::WATCH),
            rotate_grace: raw
                .tail
                .rotate_grace
                .unwrap_or(defaults::tail::ROTATE_GRACE),
            max_line_length,
            reclaim: raw.tail.reclaim.unwrap_or(defaults::tail::RECLAIM),
        };
        let state = State { dir: state_dir };
        let log = Logging {
            format: raw.log.format.unwrap_or(defaults::log::FORMAT),
            level: raw
                .log
                .level
                .as_ref()
                .map_or(defaults::log::LEVEL, |l| l.get_ref())
                .to_string(),
            stats_interval: raw
                .log
                .stats_interval
                .unwrap_or(defaults::log::STATS_INTERVAL),
        };
        tracing_subscriber::EnvFilter::try_new(&log.level).map_err(|e| {
            ctx.invalid(
                "log.level",
                raw.log.level.as_ref().map_or(0, |l| l.span().start),
                format!("`{}`: {e}", log.level),
            )
        })?;
        let deprecated = raw
            .sources
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let old = s.get_ref().credential.as_ref()?;
                Some(format!(
                    "{}:{}: sources[{i}].credential is the older name of credentials.mode: write [sources.credentials] mode = \"{}\"",
                    ctx.path.display(),
                    ctx.line(old.span().start),
                    crate::parse::CredentialMode::name(*old.get_ref()),
                ))
            })
            .collect();
        // Every service needs a token: its source's, its proxy configuration's, or [backend]'s.
        if backend.auth.is_none() {
            if let Some(i) = sources.iter().position(|s| s.auth.is_none()) {
                return Err(ctx.invalid(
                    "backend",
                    raw.backend.span().start,
                    format!(
                        "no credentials for 3scale for service {} (sources[{}]): set service_token, service_token_env or service_token_file",
                        sources[i].service_id, sources[i].index
                    ),
                ));
            }
        }
        Ok(Config {
            backend,
            telemetry,
            proxy_config,
            origin: Origin {
                path: path.to_path_buf(),
                text: text.to_string(),
            },
            sources,
            report,
            tail,
            state,
            log,
            deprecated,
        })
    }

    /// The effective configuration as TOML, every default filled in and secrets masked: the file's
    /// sections and keys, so that it parses again (a secret then as its mask). An optional key
    /// that is unset is left out, or shown as the value that means unset where the file has one.
    pub fn effective(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }
}

/// Gives each service of a source routed by Host what APIcast's path routing needs: every
/// service's Host names and rules, in the configuration's order, and a parser of its lines that
/// reads them without their credential.
fn path_routing(sources: &mut [Source]) {
    let mut by_host: std::collections::HashMap<String, Vec<(usize, MappingRules)>> =
        std::collections::HashMap::new();
    for (place, source) in sources.iter().enumerate() {
        // Checked with the source: they compile.
        let rules = MappingRules::on_their_own(&source.mapping_rules).unwrap_or_default();
        for host in source.route.iter().flat_map(|r| &r.hosts.hosts) {
            by_host
                .entry(host.clone())
                .or_default()
                .push((place, rules.clone()));
        }
    }
    let by_host = Arc::new(by_host);
    for (place, source) in sources.iter_mut().enumerate() {
        // Routed sources have no container wrapper: the line length limit plays no part.
        let reader = source
            .parser(defaults::tail::MAX_LINE_LENGTH)
            .without_credentials();
        if let Some(route) = &mut source.route {
            route.hosts.path_routing = Some(PathRouting {
                me: place,
                by_host: by_host.clone(),
                reader,
            });
        }
    }
}

/// A TOML error quotes the line it is about: when that line sets a secret (a key naming a token,
/// key, secret or password, even misspelt), its value is masked.
fn redact_excerpt(message: &str) -> String {
    let secret_key = |key: &str| {
        let key = key.to_ascii_lowercase();
        ["tok", "key", "secret", "pass"]
            .iter()
            .any(|word| key.contains(word))
    };
    message
        .lines()
        .map(|line| {
            // The excerpt's lines look like `12 | key = value`.
            let excerpt = line
                .split_once(" | ")
                .filter(|(number, _)| number.trim().parse::<usize>().is_ok());
            match excerpt {
                Some((number, content)) => match content.split_once('=') {
                    Some((key, _)) if secret_key(key) => format!("{number} | {key}= ***"),
                    _ => line.to_string(),
                },
                None => line.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/tally/tally.toml"), text)
    }

    const MINIMAL: &str = r#"
[backend]
service_token = "tok-123456"

[[sources]]
path = "/var/log/nginx/access.log"
service_id = "42"
"#;

    /// Only the keys without a default yields the typed defaults, every one of them.
    #[test]
    fn defaults_fill_in() {
        let c = parse(MINIMAL).unwrap();
        let b = &c.backend;
        assert_eq!(b.url.as_str(), format!("{}/", defaults::backend::URL));
        assert_eq!(b.connect_timeout, defaults::backend::CONNECT_TIMEOUT);
        assert_eq!(b.timeout, defaults::backend::TIMEOUT);
        assert!(b.ca_file.is_none());
        assert_eq!(
            b.validate_credentials,
            defaults::backend::VALIDATE_CREDENTIALS
        );
        assert_eq!(
            b.valid_credential_ttl,
            defaults::backend::VALID_CREDENTIAL_TTL
        );
        assert_eq!(
            b.invalid_credential_ttl,
            defaults::backend::INVALID_CREDENTIAL_TTL
        );
        assert_eq!(b.rejected_retry, defaults::backend::REJECTED_RETRY);
        let s = &c.sources[0];
        assert_eq!(s.name, s.path);
        assert_eq!(s.format.name(), defaults::sources::FORMAT);
        assert_eq!(s.read_from, defaults::sources::READ_FROM);
        assert_eq!(
            s.credentials,
            CredentialRule::query(defaults::sources::CREDENTIALS_MODE)
        );
        assert!(s.auth.is_none());
        let r = &c.report;
        assert_eq!(r.flush_interval, defaults::report::FLUSH_INTERVAL);
        assert_eq!(r.max_transactions, defaults::report::MAX_TRANSACTIONS);
        assert_eq!(r.response_codes, defaults::report::RESPONSE_CODES);
        assert_eq!(r.shutdown_grace, defaults::report::SHUTDOWN_GRACE);
        assert_eq!(r.concurrency, defaults::report::CONCURRENCY);
        assert_eq!(r.max_age, defaults::report::MAX_AGE);
        let t = &c.tail;
        assert_eq!(t.poll_interval, defaults::tail::POLL_INTERVAL);
        assert_eq!(t.watch, defaults::tail::WATCH);
        assert_eq!(t.rotate_grace, defaults::tail::ROTATE_GRACE);
        assert_eq!(t.max_line_length, defaults::tail::MAX_LINE_LENGTH);
        assert_eq!(c.state.dir, Path::new(defaults::state::DIR));
        assert_eq!(c.log.format, defaults::log::FORMAT);
        assert_eq!(c.log.level, defaults::log::LEVEL);
        assert_eq!(c.log.stats_interval, defaults::log::STATS_INTERVAL);
        assert_eq!(c.telemetry.listen, defaults::telemetry::LISTEN);
        assert_eq!(
            c.telemetry.stalled_after,
            defaults::telemetry::STALLED_AFTER
        );
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = MINIMAL.replace(
            "[[sources]]",
            "[report]\nflush_intervall = \"1s\"\n\n[[sources]]",
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("line 6"), "{e}");
        assert!(e.contains("flush_intervall"), "{e}");
    }

    /// A syntax error on a secret's line (a token left unquoted, a misspelt key) must not print
    /// the secret with the excerpt of the line.
    #[test]
    fn a_syntax_error_never_quotes_a_secret() {
        for text in [
            "[backend]\nservice_token = tok-SECRET-7f3a9c\n",
            "[backend]\nservice_tokn = \"tok-SECRET-7f3a9c\"\n",
            "[backend]\nprovider_key = \"tok-SECRET-7f3a9c\n",
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains("line 2"), "{e}");
            assert!(!e.contains("SECRET"), "{e}");
        }
        // Other lines are quoted as they are.
        let e = parse("[backend]\ntimeout = 5s\n").unwrap_err().to_string();
        assert!(e.contains("timeout = 5s"), "{e}");
    }

    #[test]
    fn bad_duration_and_range_are_explained() {
        let e = parse(&format!(
            "{MINIMAL}\n[report]\nflush_interval = \"5 parsecs\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a duration") && e.contains("line 10"), "{e}");
        let e = parse(&format!("{MINIMAL}\n[report]\nmax_transactions = 5000\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most 1023"), "{e}");
        // The line of the key itself, whatever the text before it says.
        let e = parse(&format!(
            "# max_age and level are explained below\n{MINIMAL}\n[report]\nmax_age = \"25h\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("at most 24h") && e.contains("line 11"), "{e}");
        let e = parse(&format!(
            "# max_age and level are explained below\n{MINIMAL}\n[log]\nlevel = \"tally=loud\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains(":11: log.level"), "{e}");
    }

    #[test]
    fn secret_sources() {
        let e = parse(&MINIMAL.replace(
            "service_token = \"tok-123456\"",
            "service_token_env = \"TALLY_TEST_SURELY_UNSET_VAR\"",
        ))
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "/etc/tally/tally.toml:3: backend.service_token_env: environment variable \
             TALLY_TEST_SURELY_UNSET_VAR: environment variable not found"
        );
        let e = parse(&MINIMAL.replace(
            "service_token = \"tok-123456\"",
            "service_token = \"a\"\nprovider_key = \"b\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("not both") && !e.contains("\"a\""), "{e}");
        let e = parse(&MINIMAL.replace(
            "service_token = \"tok-123456\"",
            "service_token = \"a\"\nservice_token_file = \"t\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(":4: backend.service_token_file: give only one"),
            "{e}"
        );

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "from-file-token\n").unwrap();
        let c = Config::parse(
            &dir.path().join("tally.toml"),
            &MINIMAL.replace(
                "service_token = \"tok-123456\"",
                "service_token_file = \"token\"",
            ),
        )
        .unwrap();
        assert_eq!(
            c.backend.auth.as_ref().unwrap().field().1.expose(),
            "from-file-token"
        );
    }

    /// With a proxy configuration, a source takes its service's credentials settings, mapping
    /// rules and token (and [backend] its endpoint) where it gives none of its own.
    #[test]
    fn a_proxy_configuration_gives_the_services_settings() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tally.toml");
        std::fs::write(
            dir.path().join("proxy.json"),
            r#"{"proxy_configs":[{"proxy_config":{"content":{"id":42,"backend_version":"2","backend_authentication_type":"service_token","backend_authentication_value":"tok-from-proxy",
                "proxy":{"credentials_location":"headers","auth_app_id":"X-App-Id","auth_app_key":"X-App-Key","backend":{"endpoint":"http://backend.internal:3001"},
                "proxy_rules":[{"http_method":"GET","pattern":"/p/{id}","metric_system_name":"get_p","delta":1,"last":false,"position":1}]}}}}]}"#,
        )
        .unwrap();
        let text = "[proxy_config]\nfile = \"proxy.json\"\n[backend]\n[[sources]]\npath = \"a.log\"\nservice_id = \"42\"\nlog_format = '[$time_local] \"$request\" $status $http_x_app_id'\n";
        let c = Config::parse(&file, text).unwrap();
        let s = &c.sources[0];
        assert_eq!(
            (
                s.credentials.location,
                s.credentials.mode,
                s.credentials.app_id.as_str()
            ),
            (
                CredentialLocation::Headers,
                CredentialMode::AppId,
                "X-App-Id"
            )
        );
        assert_eq!(s.mapping_rules.len(), 1);
        assert_eq!(
            s.auth.as_ref().unwrap().field().1.expose(),
            "tok-from-proxy"
        );
        assert!(c.backend.auth.is_none());
        assert_eq!(c.backend.url.as_str(), "http://backend.internal:3001/");
        // Shown as settings of the source (the token masked), and read back the same.
        let effective = c.effective().unwrap();
        assert!(!effective.contains("tok-from-proxy"), "{effective}");
        assert!(effective.contains("[proxy_config]\nfile = "), "{effective}");
        assert!(effective.contains("pattern = \"/p/{id}\""), "{effective}");
        // The source's own settings win.
        let own = text.to_string() + "[sources.credentials]\nlocation = \"query\"\n";
        let c = Config::parse(&file, &own).unwrap();
        assert_eq!(c.sources[0].credentials.location, CredentialLocation::Query);
        // A service the proxy configuration does not have; a file that is not one.
        let e = Config::parse(&file, &text.replace("\"42\"", "\"43\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "sources[0].service_id: the proxy configuration has no service 43 (it has 42)"
            ),
            "{e}"
        );
        std::fs::write(dir.path().join("proxy.json"), "{}").unwrap();
        let e = Config::parse(&file, text).unwrap_err().to_string();
        assert!(
            e.contains("proxy_config.file: ") && e.contains("expected `proxy_configs`"),
            "{e}"
        );
        // Without a proxy configuration, [backend] needs a token.
        let e = parse("[backend]\n[[sources]]\npath = \"a.log\"\nservice_id = \"1\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no credentials for 3scale"), "{e}");
    }

    /// A source without a service id is routed by Host: one source per service of the proxy
    /// configuration with hosts, shown back once, as given.
    #[test]
    fn a_source_without_a_service_id_is_routed_by_host() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tally.toml");
        std::fs::write(
            dir.path().join("proxy.json"),
            r#"{"services":[
                {"id":1,"backend_version":"1","backend_authentication_type":"service_token","backend_authentication_value":"t1","proxy":{"hosts":["a.example"],"proxy_rules":[{"http_method":"GET","pattern":"/","metric_system_name":"hits","delta":1}]}},
                {"id":2,"backend_version":"2","backend_authentication_type":"service_token","backend_authentication_value":"t2","proxy":{"hosts":["B.example","b2.example"]}},
                {"id":3,"backend_version":"1","proxy":{"hosts":[]}},
                {"id":4,"backend_version":"1","backend_authentication_type":"service_token","backend_authentication_value":"t4","proxy":{"hosts":["b.example:8080","A.EXAMPLE"]}}]}"#,
        )
        .unwrap();
        let text = "[proxy_config]\nfile = \"proxy.json\"\n[backend]\n[[sources]]\npath = \"a.log\"\nlog_format = '$host [$time_local] \"$request\" $status'\n";
        let c = Config::parse(&file, text).unwrap();
        let routed: Vec<(&str, Vec<String>, bool, CredentialMode, usize)> = c
            .sources
            .iter()
            .map(|s| {
                let r = s.route.as_ref().unwrap();
                (
                    s.service_id.as_str(),
                    r.hosts.hosts.clone(),
                    r.hosts.counts_all(),
                    s.credentials.mode,
                    s.mapping_rules.len(),
                )
            })
            .collect();
        assert_eq!(
            routed,
            vec![
                (
                    "1",
                    vec!["a.example".to_string()],
                    true,
                    CredentialMode::UserKey,
                    1
                ),
                (
                    "2",
                    vec!["b.example".to_string(), "b2.example".to_string()],
                    false,
                    CredentialMode::AppId,
                    0
                ),
            ]
        );
        assert_eq!(c.entries().count(), 1);
        let effective = c.effective().unwrap();
        assert_eq!(effective.matches("[[sources]]").count(), 1, "{effective}");
        assert!(!effective.contains("service_id"), "{effective}");
        assert!(
            !effective.contains("mapping_rules") && !effective.contains("[sources.credentials]"),
            "{effective}"
        );
        let again = Config::parse(&file, &effective).unwrap();
        assert_eq!(again.sources.len(), 2);
        // The format must log the Host; without a proxy configuration, a service id is needed.
        let e = Config::parse(&file, &text.replace("$host ", ""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("routed to services by Host, and the format logs none: add $host"),
            "{e}"
        );
        let e = parse("[backend]\nservice_token = \"t\"\n[[sources]]\npath = \"a.log\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sources[0].service_id: give the service id, or a [proxy_config]"),
            "{e}"
        );
    }

    #[test]
    fn sources_are_checked() {
        let e = parse(&MINIMAL.replace("service_id = \"42\"", "service_id = \" \""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(":7: sources[0].service_id: the service id is empty"),
            "{e}"
        );
        let e = parse(&MINIMAL.replace("path = \"/var/log/nginx/access.log\"", "path = \"/x/[a\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sources[0].path: not a valid glob"), "{e}");
        let e = parse(&MINIMAL.replace("[[sources]]", "[[sources]]\nformat = \"apache\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("apache") && e.contains("combined"), "{e}");
        // JSON lines: the fields' defaults, shown; fields without format = "json"; a credential
        // header without its key.
        let json = MINIMAL.replace("[[sources]]", "[[sources]]\nformat = \"json\"");
        let effective = parse(&json).unwrap().effective().unwrap();
        assert!(
            effective.contains("[sources.fields]\ntime = \"time\"\nstatus = \"status\""),
            "{effective}"
        );
        let e = parse(&format!("{MINIMAL}\n[sources.fields]\ntime = \"ts\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sources[0].fields: fields are the keys of JSON lines"),
            "{e}"
        );
        let e = parse(&format!(
            "{json}\n[sources.credentials]\nlocation = \"headers\"\nuser_key = \"X-Api-Key\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("sources[0].fields: credentials are read from request headers: give fields.user_key"),
            "{e}"
        );
        let e = parse(&format!("{json}\n[sources.fields]\nstatus = \"\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("fields.status is empty"), "{e}");
        let e = parse("[backend]\nservice_token = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no [[sources]]"), "{e}");
        // Names key the checkpoints: unique per service, printable, not blank.
        let twice = format!(
            "{MINIMAL}\n[[sources]]\npath = \"/var/log/nginx/access.log\"\nservice_id = \"42\"\n"
        );
        let e = parse(&twice).unwrap_err().to_string();
        assert!(
            e.contains("sources[1]: sources[0] of service 42 has the same name"),
            "{e}"
        );
        let named = twice.replacen("[[sources]]\npath", "[[sources]]\nname = \"edge\"\npath", 1);
        // One path twice for one service would count its lines twice.
        let e = parse(&named).unwrap_err().to_string();
        assert!(
            e.contains("sources[1].path: sources[0] of service 42 reads the same path"),
            "{e}"
        );
        let named = format!(
            "{}other.log\"\nservice_id = \"42\"\n",
            named
                .strip_suffix("access.log\"\nservice_id = \"42\"\n")
                .unwrap()
        );
        assert_eq!(parse(&named).unwrap().sources[0].name, "edge");
        assert_eq!(
            parse(&named).unwrap().sources[1].name,
            "/var/log/nginx/other.log"
        );
        let e = parse(&MINIMAL.replace("[[sources]]", "[[sources]]\nname = \" \""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sources[0].name: give a name"), "{e}");
    }

    #[test]
    fn oidc_reads_a_claim_of_the_token_where_the_format_logs_it() {
        let oidc = |extra: &str| {
            parse(&format!(
                "{MINIMAL}{extra}\n[sources.credentials]\nmode = \"oidc\"\n"
            ))
        };
        // combined: the access_token parameter; the claim's default shown by `tally check`.
        let c = oidc("").unwrap();
        assert_eq!(c.sources[0].credentials.mode, CredentialMode::Oidc);
        assert_eq!(
            c.sources[0].credentials.jwt_claim.name(),
            defaults::sources::JWT_CLAIM
        );
        let effective = c.effective().unwrap();
        assert!(
            effective.contains("mode = \"oidc\"\njwt_claim = \"azp\"\n"),
            "{effective}"
        );
        let c = parse(&format!(
            "{MINIMAL}\n[sources.credentials]\nmode = \"oidc\"\njwt_claim = \" client_id \"\n"
        ))
        .unwrap();
        assert_eq!(c.sources[0].credentials.jwt_claim.name(), "client_id");
        assert!(c.effective().unwrap().contains("jwt_claim = \"client_id\""));
        // A format that cannot carry the token: what to add.
        let e = parse(&format!(
            "{MINIMAL}\n[sources.credentials]\nmode = \"oidc\"\nlocation = \"authorization\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(
                "sources[0].credentials.location: the combined format logs no request headers"
            ) && e.contains("$http_authorization"),
            "{e}"
        );
        let e = parse(&format!(
            "{}\n[sources.credentials]\nmode = \"oidc\"\nlocation = \"headers\"\n",
            MINIMAL.replace(
                "[[sources]]",
                "[[sources]]\nlog_format = '[$time_local] \"$request\" $status $http_x_api_key'"
            )
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("sources[0].log_format: credentials are read from the Authorization header (a Bearer JWT), and it does not log it: add $http_authorization"),
            "{e}"
        );
        for bad in ["", " ", "a\\tb"] {
            let e = parse(&format!(
                "{MINIMAL}\n[sources.credentials]\nmode = \"oidc\"\njwt_claim = \"{bad}\"\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("sources[0].credentials.jwt_claim: give the access token's claim"),
                "{e}"
            );
        }
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let c = parse(&MINIMAL.replace("/var/log/nginx/access.log", "logs/*.log")).unwrap();
        assert_eq!(c.sources[0].path, "/etc/tally/logs/*.log");
    }

    /// `[proxy_config]` with the admin portal: each wrong combination of keys says which key is
    /// wrong; a token in the URL (APIcast's THREESCALE_PORTAL_ENDPOINT) is the access token, shown
    /// masked and never in the URL; a portal that cannot be reached at start falls back to the
    /// saved copy.
    #[test]
    fn a_proxy_configuration_from_the_admin_portal() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tally.toml");
        let config = |proxy: &str| {
            format!("[proxy_config]\n{proxy}\n[backend]\n[[sources]]\npath = \"a.log\"\nservice_id = \"42\"\n[state]\ndir = \"state\"\n")
        };
        // Port 1 refuses connections at once.
        let portal = "url = \"http://127.0.0.1:1\"";
        for (proxy, says) in [
            ("refresh = \"1m\"", "proxy_config: give the file (file = "),
            (
                &format!("file = \"p.json\"\n{portal}"),
                "proxy_config.url: give the file or the admin portal's url, not both",
            ),
            (
                "file = \"p.json\"\nenvironment = \"staging\"",
                "proxy_config.environment: only with the admin portal's url",
            ),
            (portal, "proxy_config: the admin portal needs an access token"),
            (
                "url = \"http://t0ken@127.0.0.1:1\"\naccess_token = \"x\"",
                "proxy_config.url: the URL holds a token and access_token gives one too",
            ),
            (
                "url = \"ftp://portal.example\"\naccess_token = \"x\"",
                "proxy_config.url: use the admin portal's http:// or https:// URL",
            ),
            (
                &format!("{portal}\naccess_token = \"x\"\nenvironment = \"prod\""),
                "proxy_config.environment: `prod` is no environment",
            ),
            (
                &format!("{portal}\naccess_token = \"s3cr3t-tok\""),
                "proxy_config.url: cannot fetch the proxy configuration (GET http://127.0.0.1:1/admin/api/account/proxy_configs/production.json page 1: ",
            ),
        ] {
            let e = Config::parse(&file, &config(proxy)).unwrap_err().to_string();
            assert!(e.contains(says), "{proxy}: {e}");
            assert!(!e.contains("s3cr3t") && !e.contains("t0ken"), "{e}");
        }
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        std::fs::write(
            dir.path().join("state/proxy-config.json"),
            r#"{"proxy_configs":[{"proxy_config":{"content":{"id":42,"backend_authentication_type":"service_token","backend_authentication_value":"tok-42"}}}]}"#,
        )
        .unwrap();
        let c = Config::parse(
            &file,
            &config("url = \"http://s3cr3t-tok@127.0.0.1:1/\"\nenvironment = \"staging\""),
        )
        .unwrap();
        let settings = c.proxy_config.as_ref().unwrap();
        let fallback = settings.loaded.fallback.clone().unwrap();
        assert!(
            fallback.contains("sandbox.json") && fallback.contains("using the copy saved at"),
            "{fallback}"
        );
        assert_eq!(
            settings.portal.as_ref().unwrap().access_token.expose(),
            "s3cr3t-tok"
        );
        let effective = c.effective().unwrap();
        assert!(
            effective.contains(
                "url = \"http://127.0.0.1:1/\"\naccess_token = \"<secret given in proxy_config.url"
            ),
            "{effective}"
        );
        assert!(
            !effective.contains("s3cr3t") && !fallback.contains("s3cr3t"),
            "{effective}"
        );
    }

    /// Every key set, none to its default (a source's own token in the second source).
    fn full(dir: &Path) -> String {
        // Certificates are only decoded from PEM here; the TLS client checks them.
        std::fs::write(
            dir.join("ca.pem"),
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        // The services' settings are all given here: the proxy configuration only lists them.
        let services = r#"{"services":[{"id":42},{"id":43},{"id":44},{"id":45},{"id":46}]}"#;
        std::fs::write(dir.join("proxy.json"), services).unwrap();
        // And as the admin portal's saved copy, for the configuration that fetches it.
        std::fs::create_dir_all(dir.join("state")).unwrap();
        std::fs::write(dir.join("state/proxy-config.json"), services).unwrap();
        r#"
[proxy_config]
file = "proxy.json"
refresh = "1m"
path_routing = true

[backend]
url = "http://backend.example:3001/"
service_token = "tok-123456"
connect_timeout = "3s"
timeout = "2m"
ca_file = "ca.pem"
validate_credentials = false
valid_credential_ttl = "2h"
invalid_credential_ttl = "1m"
rejected_retry = "30s"

[[sources]]
name = "edge"
path = "logs/*.log"
service_id = "42"
format = "common"
read_from = "beginning"

[sources.credentials]
location = "query"
mode = "user_key"
user_key = "api_key"
app_id = "application"
app_key = "application_key"

[[sources]]
path = "other.log"
service_id = "43"
log_format = '[$time_local] "$request" $status $http_x_app_id'
log_escape = "json"
service_token = "tok-of-43"

[sources.credentials]
location = "headers"
mode = "app_id"
app_id = "X-App-Id"

[[sources]]
path = "caddy.log"
service_id = "44"
format = "json"

[sources.fields]
time = "ts"
status = "resp.status"
method = "request.method"
uri = "request.uri"
path = "request.path"
query = "request.args"
host = "request.host"
user_key = "request.headers.x-api-key"
app_id = "request.headers.x-app-id"
authorization = "request.headers.authorization"

[sources.credentials]
location = "headers"
mode = "oidc"
jwt_claim = "client_id"

[[sources]]
path = "containers/*.log"
service_id = "46"
wrapper = "cri"
stream = "stderr"

[[sources.mapping_rules]]
method = "GET"
pattern = "/products/{id}$"
metric = "get_product"
delta = 2
last = true

[[sources.mapping_rules]]
method = "ANY"
pattern = "/"
metric = "hits"
delta = 1
last = false

[sources.credentials]
location = "query"
mode = "auto"
user_key = "user_key"
app_id = "app_id"
app_key = "app_key"

[[sources]]
path = "app.log"
service_id = "45"
format = "regex"
regex = '^(?P<time>\S+ \S+) (?P<status>\d{3}) (?P<method>[A-Z]+) (?P<uri>\S+)$'
time_format = "%F %T"
log_escape = "none"

[sources.credentials]
location = "query"
mode = "auto"
user_key = "user_key"
app_id = "app_id"
app_key = "app_key"

[report]
flush_interval = "2s"
max_transactions = 500
response_codes = false
shutdown_grace = "10s"
concurrency = 4
max_age = "12h"

[tail]
poll_interval = "3s"
watch = false
rotate_grace = "7s"
max_line_length = 4096
reclaim = true

[state]
dir = "state"

[log]
format = "json"
level = "tally=debug,warn"
stats_interval = "30s"

[telemetry]
listen = "127.0.0.1:9464"
stalled_after = "10m"
calls_per_code = 20
calls_on_public_listener = true
"#
        .to_string()
    }

    /// The keys of a configuration as `section.key` (`sources.key` for any source).
    fn keys(text: &str) -> std::collections::BTreeSet<String> {
        let table: toml::Table = toml::from_str(text).unwrap();
        let mut keys = std::collections::BTreeSet::new();
        for (section, value) in table {
            let tables = match value {
                toml::Value::Table(t) => vec![t],
                toml::Value::Array(a) => a
                    .into_iter()
                    .filter_map(|v| v.as_table().cloned())
                    .collect(),
                other => panic!("{section} = {other} is not a section"),
            };
            keys.extend(
                tables
                    .iter()
                    .flat_map(|t| t.keys().map(|k| format!("{section}.{k}"))),
            );
        }
        keys
    }

    /// The keys the parser accepts, from its own field lists: serde names them when it refuses an
    /// unknown one. Other ways to give a key (`service_token_env`, `_file`) are left out.
    fn accepted() -> std::collections::BTreeSet<String> {
        let expected = |text: &str| -> Vec<String> {
            let e = parse(text).unwrap_err().to_string();
            let list = e
                .split_once("unknown field `not_a_key`, expected ")
                .map(|(_, list)| list.lines().next().unwrap_or_default())
                .unwrap_or_else(|| panic!("no list of fields in {e}"));
            let names: Vec<String> = list
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect();
            assert!(!names.is_empty(), "{e}");
            names
        };
        // `sources.credential` is the older name of `credentials.mode`: shown under the new one.
        let mut keys = std::collections::BTreeSet::new();
        for section in expected(&format!("not_a_key = 1\n{MINIMAL}")) {
            let probe = match section.as_str() {
                "backend" => MINIMAL.replace("[backend]", "[backend]\nnot_a_key = 1"),
                "sources" => MINIMAL.replace("[[sources]]", "[[sources]]\nnot_a_key = 1"),
                _ => format!("{MINIMAL}\n[{section}]\nnot_a_key = 1\n"),
            };
            let fields = expected(&probe);
            keys.extend(
                fields
                    .iter()
                    .filter(|f| {
                        let other_way = |suffix| {
                            f.strip_suffix(suffix)
                                .is_some_and(|key| fields.iter().any(|g| g == key))
                        };
                        !other_way("_env") && !other_way("_file")
                    })
                    .map(|f| format!("{section}.{f}"))
                    .filter(|k| k != "sources.credential"),
            );
        }
        keys
    }

    /// The effective configuration shows every key the parser accepts, so a new key cannot be left
    /// out of `tally check`; and a configuration with every key set parses back to itself.
    #[test]
    fn effective_config_shows_every_key_and_parses_back() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tally.toml");
        let with_token = full(dir.path());
        // The token and the provider key exclude each other, and so do the proxy configuration's
        // file and url: one configuration shows each (the portal, unreachable, from its saved copy).
        let with_key = with_token.replace("service_token", "provider_key").replace(
            "file = \"proxy.json\"",
            "url = \"http://127.0.0.1:1\"\naccess_token = \"tok-portal\"\nenvironment = \"staging\"\nca_file = \"ca.pem\"",
        );
        let mut shown = std::collections::BTreeSet::new();
        for text in [&with_token, &with_key] {
            let effective = Config::parse(&file, text).unwrap().effective().unwrap();
            assert!(!effective.contains("tok-"), "{effective}");
            assert_eq!(keys(&effective), keys(text), "{effective}");
            shown.extend(keys(&effective));
            let again = Config::parse(&file, &effective)
                .unwrap()
                .effective()
                .unwrap();
            // The masked secrets are read back as secrets of other lengths.
            let without_secrets = |t: &str| {
                t.lines()
                    .filter(|l| !l.contains("<secret"))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            assert_eq!(without_secrets(&again), without_secrets(&effective));
        }
        assert_eq!(shown, accepted());
    }

    /// `config/tally.toml` says it sets every key to its default: with all but its required and
    /// example keys taken out, it is the same configuration.
    #[test]
    fn the_reference_config_shows_the_defaults() {
        let reference = include_str!("../config/tally.toml").replace(
            "service_token_env = \"THREESCALE_SERVICE_TOKEN\"",
            "service_token = \"t\"",
        );
        let examples = [
            "backend.service_token",
            "sources.path",
            "sources.service_id",
            "telemetry.listen",
        ];
        let mut bare: toml::Table = toml::from_str(&reference).unwrap();
        for (section, value) in bare.iter_mut() {
            let keep = |t: &mut toml::Table| {
                t.retain(|key, _| examples.contains(&format!("{section}.{key}").as_str()))
            };
            match value {
                toml::Value::Table(t) => keep(t),
                toml::Value::Array(a) => {
                    a.iter_mut().filter_map(|v| v.as_table_mut()).for_each(keep)
                }
                _ => {}
            }
        }
        let bare = toml::to_string(&bare).unwrap();
        let defaults = parse(&bare).unwrap().effective().unwrap();
        let reference_effective = parse(&reference).unwrap().effective().unwrap();
        for (default, given) in defaults.lines().zip(reference_effective.lines()) {
            assert_eq!(
                given, default,
                "config/tally.toml does not give the default"
            );
        }
        assert_eq!(
            reference_effective.lines().count(),
            defaults.lines().count()
        );
        // And it names every key, set or in a comment.
        for key in accepted() {
            let (_, key) = key.split_once('.').unwrap();
            assert!(reference.contains(&format!("{key} = ")), "{key}");
        }
    }

    /// The README's table of keys gives each default as the parser has it, and names every key.
    #[test]
    fn the_readme_shows_the_defaults() {
        let readme = include_str!("../README.md");
        let effective: toml::Table =
            toml::from_str(&parse(MINIMAL).unwrap().effective().unwrap()).unwrap();
        let value = |key: &str| {
            let (section, key) = key.split_once('.').unwrap();
            let section = &effective[section.trim_end_matches("[]")];
            let mut value = section.as_array().map_or(section, |a| &a[0]);
            // `credentials.mode`: a key of a table in the section.
            for part in key.split('.') {
                value = value.get(part)?;
            }
            Some(value.clone())
        };
        let ticked = |cell: &str| -> Option<Vec<String>> {
            cell.split(" / ")
                .map(|v| {
                    let v = v.trim().strip_prefix('`')?.strip_suffix('`')?;
                    (!v.contains('`')).then(|| v.to_string())
                })
                .collect()
        };
        let mut compared = 0;
        for row in readme.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = row.split(" | ").collect();
            let (Some(keys), Some(defaults)) = (ticked(&cells[0][2..]), ticked(cells[1])) else {
                continue;
            };
            if keys.len() != defaults.len() || !keys[0].contains('.') {
                continue;
            }
            // `a.b.c` / `d`: `d` is `a.b.d`.
            let table = keys[0].rsplit_once('.').unwrap().0;
            for (key, readme_value) in keys.iter().zip(&defaults) {
                let key = if key.contains('.') {
                    key.clone()
                } else {
                    format!("{table}.{key}")
                };
                let shown = value(&key).unwrap_or_else(|| panic!("{key} is not a key"));
                let same = match &shown {
                    toml::Value::String(s) => {
                        s == readme_value
                            || humantime::parse_duration(s).ok().is_some()
                                && humantime::parse_duration(s).ok()
                                    == humantime::parse_duration(readme_value).ok()
                            || reqwest::Url::parse(s).ok().is_some()
                                && reqwest::Url::parse(s).ok()
                                    == reqwest::Url::parse(readme_value).ok()
                    }
                    other => other.to_string() == *readme_value,
                };
                assert!(
                    same,
                    "README: {key} defaults to `{readme_value}`, tally to {shown}"
                );
                compared += 1;
            }
        }
        assert!(
            compared >= 20,
            "only {compared} defaults found in the README"
        );
        for key in accepted() {
            let (section, name) = key.split_once('.').unwrap();
            assert!(
                [
                    format!("`{key}`"),
                    format!("`{section}[].{name}`"),
                    format!("`{name}`")
                ]
                .iter()
                .any(|k| readme.contains(k.as_str())),
                "{key} is not in the README"
            );
        }
    }
}
