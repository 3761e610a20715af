//! The TOML configuration: parsing, validation with errors that name the key and its line, and the
//! effective configuration as `tally check` prints it (secrets masked).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// The most transactions one report call may carry: the backend takes at most 4096 `key=value` pairs,
/// two go to `service_token` and `service_id`, and a transaction with a response code takes four.
pub const MAX_TRANSACTIONS_PER_CALL: usize = 1023;

pub const DEFAULT_BACKEND_URL: &str = "https://su1.3scale.net";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The OS error is in the message, not a `source`: a whole chain printed would show it twice.
    #[error("{path}: cannot read the configuration: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}:{line}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
}

/// A secret value (service token, provider key). Its `Debug` and `Display` never show it.
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

/// How tally authenticates its calls to the Service Management API.
#[derive(Debug, Clone, PartialEq, Eq)]
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

#[derive(Debug, Clone)]
pub struct Backend {
    pub url: reqwest::Url,
    pub auth: BackendAuth,
    /// How long making a connection may take.
    pub connect_timeout: Duration,
    /// How long a connected call waits for its answer (raised while 3scale is slow).
    pub timeout: Duration,
    /// Extra root certificates to trust, beside the system's: the PEM file, and its certificates
    /// (read once, when the configuration is checked).
    pub ca_file: Option<(PathBuf, Vec<reqwest::Certificate>)>,
    /// Check each new credential with an authorize call before reporting it.
    pub validate_credentials: bool,
    /// How long an authorize answer is trusted: an application that exists, one that does not.
    pub valid_credential_ttl: Duration,
    pub invalid_credential_ttl: Duration,
    /// How often a call that 3scale rejected (bad token...) is tried again.
    pub rejected_retry: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// NGINX's predefined `combined` format.
    Combined,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadFrom {
    Beginning,
    End,
}

/// Which query parameters carry the caller's credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CredentialMode {
    /// `user_key` if present, else `app_id` (with optional `app_key`).
    #[default]
    Auto,
    UserKey,
    AppId,
}

#[derive(Debug, Clone)]
pub struct Source {
    /// What the source is known by in the state (its checkpoints) and the logs: given, or its
    /// path. A name keeps the checkpoints when the path changes.
    pub name: String,
    /// A file path or a glob pattern, made absolute against the configuration file's folder.
    pub path: String,
    pub service_id: String,
    pub format: LogFormat,
    pub read_from: ReadFrom,
    pub credential: CredentialMode,
    /// This source's own service token (or provider key), instead of `[backend]`'s.
    pub auth: Option<BackendAuth>,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub flush_interval: Duration,
    pub max_transactions: usize,
    pub response_codes: bool,
    /// How long a stopping tally may take to send what it has read.
    pub shutdown_grace: Duration,
    /// Report calls under way at once, per service.
    pub concurrency: usize,
    /// Transactions older than this when their call is sent are dropped (3scale's window is 24 h).
    pub max_age: Duration,
}

#[derive(Debug, Clone)]
pub struct Tail {
    pub poll_interval: Duration,
    /// Wake on file-system events; off, the safety poll alone finds new lines.
    pub watch: bool,
    pub rotate_grace: Duration,
    pub max_line_length: usize,
}

#[derive(Debug, Clone)]
pub struct State {
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogOutput {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct Logging {
    pub format: LogOutput,
    pub level: String,
    /// How often the counters and each file's lag are logged.
    pub stats_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct Telemetry {
    /// Where /metrics, /healthz and /livez are served; None: nowhere.
    pub listen: Option<std::net::SocketAddr>,
    /// /healthz fails when a service has had nothing accepted for this long while requests wait.
    pub stalled_after: Duration,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub backend: Backend,
    pub telemetry: Telemetry,
    pub sources: Vec<Source>,
    pub report: Report,
    pub tail: Tail,
    pub state: State,
    pub log: Logging,
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
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTelemetry {
    listen: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "duration::optional")]
    stalled_after: Option<Duration>,
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
    service_id: Spanned<String>,
    format: Option<LogFormat>,
    read_from: Option<ReadFrom>,
    #[serde(default)]
    credential: CredentialMode,
    service_token: Option<Spanned<String>>,
    service_token_env: Option<Spanned<String>>,
    service_token_file: Option<Spanned<String>>,
    provider_key: Option<Spanned<String>>,
    provider_key_env: Option<Spanned<String>>,
    provider_key_file: Option<Spanned<String>>,
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
    use serde::{de::Error, Deserialize, Deserializer};
    use std::time::Duration;

    /// A humantime duration ("5s", "1m 30s"), which must be above zero.
    pub fn optional<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
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
    pub fn max_age<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let value = optional(d)?;
        if value.is_some_and(|v| v > Duration::from_secs(24 * 3600)) {
            return Err(D::Error::custom(
                "3scale drops whole calls holding transactions older than 24h: use at most 24h (default 23h 55m)",
            ));
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
}

impl Ctx<'_> {
    fn invalid(&self, key: &str, offset: usize, message: impl Into<String>) -> ConfigError {
        let line = self.text[..offset.min(self.text.len())]
            .matches('\n')
            .count()
            + 1;
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
        let url = match &b.url {
            None => reqwest::Url::parse(DEFAULT_BACKEND_URL).expect("default URL is valid"),
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
        let auth = self.auth("backend", raw.span().start, fields)?.ok_or_else(|| {
            self.invalid(
                "backend",
                raw.span().start,
                "no credentials for 3scale: set service_token, service_token_env or service_token_file",
            )
        })?;
        let ca_file = match &b.ca_file {
            None => None,
            Some(f) => {
                let path = self.resolve(f.get_ref());
                let pem = std::fs::read(&path).map_err(|e| {
                    self.invalid(
                        "backend.ca_file",
                        f.span().start,
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                let certificates = reqwest::Certificate::from_pem_bundle(&pem)
                    .ok()
                    .filter(|certs| !certs.is_empty())
                    .ok_or_else(|| {
                        self.invalid(
                            "backend.ca_file",
                            f.span().start,
                            format!("{} holds no PEM certificate", path.display()),
                        )
                    })?;
                Some((path, certificates))
            }
        };
        Ok(Backend {
            url,
            auth,
            connect_timeout: b.connect_timeout.unwrap_or(Duration::from_secs(10)),
            timeout: b.timeout.unwrap_or(Duration::from_secs(60)),
            ca_file,
            validate_credentials: b.validate_credentials.unwrap_or(true),
            valid_credential_ttl: b.valid_credential_ttl.unwrap_or(Duration::from_secs(3600)),
            invalid_credential_ttl: b.invalid_credential_ttl.unwrap_or(Duration::from_secs(300)),
            rejected_retry: b.rejected_retry.unwrap_or(Duration::from_secs(60)),
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

    fn source(&self, i: usize, raw: &Spanned<RawSource>) -> Result<Source, ConfigError> {
        let s = raw.get_ref();
        let key = |k: &str| format!("sources[{i}].{k}");
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
        let service_id = s.service_id.get_ref().trim();
        if service_id.is_empty() {
            return Err(self.invalid(
                &key("service_id"),
                s.service_id.span().start,
                "the service id is empty; copy it from the 3scale admin portal (Integration page)",
            ));
        }
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
        Ok(Source {
            name,
            path,
            service_id: service_id.to_string(),
            format: s.format.unwrap_or(LogFormat::Combined),
            read_from: s.read_from.unwrap_or(ReadFrom::End),
            credential: s.credential,
            auth,
        })
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
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: redact_excerpt(e.to_string().trim_end()),
        })?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        let ctx = Ctx {
            path,
            text,
            dir: &dir,
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
            .map(|(i, s)| ctx.source(i, s))
            .collect::<Result<Vec<_>, _>>()?;
        let report = Report {
            flush_interval: raw.report.flush_interval.unwrap_or(Duration::from_secs(5)),
            max_transactions: raw.report.max_transactions.unwrap_or(1000),
            response_codes: raw.report.response_codes.unwrap_or(true),
            shutdown_grace: raw.report.shutdown_grace.unwrap_or(Duration::from_secs(20)),
            concurrency: match &raw.report.concurrency {
                None => 2,
                Some(n) if (1..=16).contains(n.get_ref()) => *n.get_ref() as usize,
                Some(n) => {
                    return Err(ctx.invalid(
                        "report.concurrency",
                        n.span().start,
                        "give 1 to 16 calls under way at once",
                    ))
                }
            },
            max_age: raw
                .report
                .max_age
                .unwrap_or(Duration::from_secs(24 * 3600 - 300)),
        };
        // A source's name keys its checkpoints: two alike would share them.
        for (i, s) in sources.iter().enumerate() {
            if let Some(j) = sources[..i]
                .iter()
                .position(|o| o.name == s.name && o.service_id == s.service_id)
            {
                return Err(ctx.invalid(
                    &format!("sources[{i}]"),
                    raw.sources[i].span().start,
                    format!(
                        "sources[{j}] of service {} has the same name `{}` (a source without a name is named by its path): give each its own name",
                        s.service_id, s.name
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
                    &format!("sources[{i}].path"),
                    raw.sources[i].span().start,
                    format!(
                        "sources[{j}] of service {} reads the same path `{}`: each line would count twice",
                        s.service_id, s.path
                    ),
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
                    &format!("sources[{i}]"),
                    raw.sources[i].span().start,
                    format!(
                        "another source of service {} gives other credentials for it",
                        s.service_id
                    ),
                ));
            }
        }
        let telemetry = Telemetry {
            listen: match &raw.telemetry.listen {
                None => None,
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
                .unwrap_or(Duration::from_secs(300)),
        };
        let max_line_length = match &raw.tail.max_line_length {
            None => 64 * 1024,
            Some(n) if (256..=(64 << 20)).contains(n.get_ref()) => *n.get_ref() as usize,
            Some(n) => {
                return Err(ctx.invalid(
                    "tail.max_line_length",
                    n.span().start,
                    "give a number of bytes from 256 to 67108864 (64 MiB)",
                ))
            }
        };
        let tail = Tail {
            poll_interval: raw.tail.poll_interval.unwrap_or(Duration::from_secs(1)),
            watch: raw.tail.watch.unwrap_or(true),
            rotate_grace: raw.tail.rotate_grace.unwrap_or(Duration::from_secs(5)),
            max_line_length,
        };
        let state = State {
            dir: ctx.resolve(raw.state.dir.as_deref().unwrap_or("/var/lib/tally")),
        };
        let log = Logging {
            format: raw.log.format.unwrap_or_default(),
            level: raw
                .log
                .level
                .as_ref()
                .map_or_else(|| "info".to_string(), |l| l.get_ref().clone()),
            stats_interval: raw.log.stats_interval.unwrap_or(Duration::from_secs(60)),
        };
        tracing_subscriber::EnvFilter::try_new(&log.level).map_err(|e| {
            ctx.invalid(
                "log.level",
                raw.log.level.as_ref().map_or(0, |l| l.span().start),
                format!("`{}`: {e}", log.level),
            )
        })?;
        Ok(Config {
            backend,
            telemetry,
            sources,
            report,
            tail,
            state,
            log,
        })
    }

    /// The effective configuration as TOML, every default filled in and secrets masked.
    pub fn effective(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let mut line = |text: String| {
            let _ = writeln!(out, "{text}");
        };
        let b = &self.backend;
        let (field, secret) = b.auth.field();
        line("[backend]".into());
        line(format!("url = {:?}", b.url.as_str()));
        line(format!("{field} = {:?}", secret.to_string()));
        line(format!("connect_timeout = {:?}", dur(b.connect_timeout)));
        line(format!("timeout = {:?}", dur(b.timeout)));
        if let Some((ca, _)) = &b.ca_file {
            line(format!("ca_file = {:?}", ca.display().to_string()));
        }
        line(format!("validate_credentials = {}", b.validate_credentials));
        line(format!(
            "valid_credential_ttl = {:?}",
            dur(b.valid_credential_ttl)
        ));
        line(format!(
            "invalid_credential_ttl = {:?}",
            dur(b.invalid_credential_ttl)
        ));
        line(format!("rejected_retry = {:?}", dur(b.rejected_retry)));
        for s in &self.sources {
            line("\n[[sources]]".into());
            line(format!("name = {:?}", s.name));
            line(format!("path = {:?}", s.path));
            line(format!("service_id = {:?}", s.service_id));
            line(format!("format = {:?}", snake(&format!("{:?}", s.format))));
            line(format!(
                "read_from = {:?}",
                snake(&format!("{:?}", s.read_from))
            ));
            line(format!(
                "credential = {:?}",
                snake(&format!("{:?}", s.credential))
            ));
            if let Some(auth) = &s.auth {
                let (field, secret) = auth.field();
                line(format!("{field} = {:?}", secret.to_string()));
            }
        }
        let r = &self.report;
        line("\n[report]".into());
        line(format!("flush_interval = {:?}", dur(r.flush_interval)));
        line(format!("max_transactions = {}", r.max_transactions));
        line(format!("response_codes = {}", r.response_codes));
        line(format!("shutdown_grace = {:?}", dur(r.shutdown_grace)));
        line(format!("concurrency = {}", r.concurrency));
        line(format!("max_age = {:?}", dur(r.max_age)));
        let t = &self.tail;
        line("\n[tail]".into());
        line(format!("poll_interval = {:?}", dur(t.poll_interval)));
        line(format!("watch = {}", t.watch));
        line(format!("rotate_grace = {:?}", dur(t.rotate_grace)));
        line(format!("max_line_length = {}", t.max_line_length));
        line(format!(
            "\n[state]\ndir = {:?}",
            self.state.dir.display().to_string()
        ));
        line("\n[log]".into());
        line(format!(
            "format = {:?}",
            snake(&format!("{:?}", self.log.format))
        ));
        line(format!("level = {:?}", self.log.level));
        line(format!(
            "stats_interval = {:?}",
            dur(self.log.stats_interval)
        ));
        let listen = self
            .telemetry
            .listen
            .map(|l| l.to_string())
            .unwrap_or_default();
        line(format!("\n[telemetry]\nlisten = {listen:?}"));
        line(format!(
            "stalled_after = {:?}",
            dur(self.telemetry.stalled_after)
        ));
        out
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

fn dur(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// `UserKey` → `user_key`, the spelling the configuration uses.
fn snake(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
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

    #[test]
    fn defaults_fill_in() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.backend.url.as_str(), "https://su1.3scale.net/");
        assert_eq!(c.backend.timeout, Duration::from_secs(60));
        assert_eq!(c.backend.connect_timeout, Duration::from_secs(10));
        assert_eq!(c.telemetry.stalled_after, Duration::from_secs(300));
        assert_eq!(c.report.flush_interval, Duration::from_secs(5));
        assert_eq!(c.report.max_transactions, 1000);
        assert!(c.report.response_codes);
        assert_eq!(c.sources[0].read_from, ReadFrom::End);
        assert_eq!(c.sources[0].format, LogFormat::Combined);
    }

    #[test]
    fn effective_config_masks_the_token_and_parses_again() {
        let c = parse(MINIMAL).unwrap();
        let shown = c.effective();
        assert!(!shown.contains("tok-123456"), "{shown}");
        assert!(
            shown.contains("<secret given in the configuration, 10 chars>"),
            "{shown}"
        );
        assert!(!format!("{c:?}").contains("tok-123456"));
        // Everything but the masked secret survives a round trip.
        let without_secret = |t: &str| {
            t.lines()
                .filter(|l| !l.starts_with("service_token"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(
            without_secret(&parse(&shown).unwrap().effective()),
            without_secret(&shown)
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
        assert_eq!(c.backend.auth.field().1.expose(), "from-file-token");
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
    fn relative_paths_follow_the_config_file() {
        let c = parse(&MINIMAL.replace("/var/log/nginx/access.log", "logs/*.log")).unwrap();
        assert_eq!(c.sources[0].path, "/etc/tally/logs/*.log");
    }
}
