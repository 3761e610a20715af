//! What `tally check --online` asks 3scale, without reporting anything: whether each service takes
//! its token, and whether it has each metric its mapping rules name (a report naming one it does
//! not have is dropped whole). An authorize call needs an application that exists: the newest
//! credentials of the service's own logs are tried.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use crate::aggregate::Application;
use crate::config::{Config, Source};
use crate::mapping::Owner;
use crate::parse::CredentialKind;
use crate::preflight::Findings;
use crate::report::{Client, Existence, MetricAnswer, ReportError};
use crate::tail::matching_files;
use crate::telemetry::{mask, printable};

/// How much of the end of each log file is read for credentials.
const TAIL_BYTES: u64 = 4 << 20;
/// How many distinct credentials of a service's logs are asked about, at most (each unknown one
/// adds an entry to the service's integration errors in 3scale).
const CANDIDATES: usize = 5;

/// Asks 3scale about every service of `config`; what it says goes into `found`, and a line per
/// service into `said` (for the terminal).
pub async fn check_online(config: &Config, found: &mut Findings) -> Vec<String> {
    let mut said = Vec::new();
    let client = match Client::for_backend(&config.backend) {
        Ok(c) => c,
        Err(e) => {
            found.errors.push(format!("online: {e:#}"));
            return said;
        }
    };
    for service_id in config.services() {
        let sources: Vec<&Source> = config
            .sources
            .iter()
            .filter(|s| s.service_id == service_id)
            .collect();
        let Some(auth) = sources
            .iter()
            .find_map(|s| s.auth.clone())
            .or_else(|| config.backend.auth.clone())
        else {
            continue;
        };
        let prefix = format!("online: service {service_id}");
        let candidates = credentials_in_logs(&sources, config.tail.max_line_length);
        if candidates.is_empty() {
            found.warnings.push(format!(
                "{prefix}: no credential in the end of its logs, so neither its token nor its metrics can be checked (an authorize call needs an application)"
            ));
            continue;
        }
        let mut witness = None;
        let mut unknown = 0;
        for application in &candidates {
            match client.authorize(&auth, &service_id, application).await {
                Ok(Existence::Exists) => {
                    witness = Some(application.clone());
                    break;
                }
                Ok(_) => unknown += 1,
                Err(ReportError::Rejected { code, message, .. }) => {
                    found.errors.push(format!(
                        "{prefix}: 3scale rejects the call: {code} ({})",
                        printable(&message)
                    ));
                    break;
                }
                Err(e) => {
                    found
                        .errors
                        .push(format!("{prefix}: cannot ask 3scale: {e}"));
                    break;
                }
            }
        }
        let Some(witness) = witness else {
            if unknown == candidates.len() {
                found.warnings.push(format!(
                    "{prefix}: its token is accepted, but 3scale knows none of the {unknown} newest credentials of its logs: its metrics cannot be checked"
                ));
            }
            continue;
        };
        let (kind, value) = witness.field();
        let mut exist = Vec::new();
        for metric in config.metrics_of(&service_id).iter() {
            let name = &*metric.name;
            match client
                .check_metric(&auth, &service_id, &witness, name)
                .await
            {
                Ok(MetricAnswer::Exists) => exist.push(name.to_string()),
                Ok(MetricAnswer::Unknown) => found.errors.push(format!(
                    "{prefix}: it has no metric `{}`: the usage of the rules naming it would be dropped (create the metric or method in 3scale, or fix the rule)",
                    printable(name)
                )),
                Ok(MetricAnswer::Inconclusive) => found.warnings.push(format!(
                    "{prefix}: metric `{}` cannot be checked (3scale answered about the application, e.g. a missing app_key)",
                    printable(name)
                )),
                Err(e) => found
                    .errors
                    .push(format!("{prefix}: cannot ask 3scale about metric `{}`: {e}", printable(name))),
            }
        }
        said.push(format!(
            "{prefix}: the token is accepted; checked with {kind} {} from its logs; metrics that exist: {}",
            mask(value),
            exist.join(", ")
        ));
    }
    said
}

/// The newest distinct credentials of the service's lines in the end of its sources' files.
fn credentials_in_logs(sources: &[&Source], max_line_length: usize) -> Vec<Application> {
    // Distinct, the most recently seen last; read forwards (a container's split lines join in
    // file order).
    let mut seen: Vec<Application> = Vec::new();
    for source in sources {
        let mut parser = source.parser(max_line_length);
        let escape = parser.escape();
        let route = source.route.as_ref().map(|r| &r.hosts);
        for path in matching_files(&source.path).into_keys() {
            let Some(end) = file_end(&path) else { continue };
            for line in end.split(|&b| b == b'\n') {
                let Ok(Some(request)) = parser.parse_record(line) else {
                    continue;
                };
                if route.is_some_and(|r| r.owner_of_request(&request, escape) != Owner::This) {
                    continue;
                }
                let Ok(name) = request.credential.decode() else {
                    continue;
                };
                let application = match request.credential.kind {
                    CredentialKind::UserKey => Application::UserKey(Arc::from(name)),
                    CredentialKind::AppId => Application::AppId(Arc::from(name)),
                };
                seen.retain(|a| *a != application);
                seen.push(application);
                if seen.len() > 4 * CANDIDATES {
                    seen.remove(0);
                }
            }
        }
    }
    seen.into_iter().rev().take(CANDIDATES).collect()
}

/// The last [`TAIL_BYTES`] of a file, from its first whole line.
fn file_end(path: &Path) -> Option<Vec<u8>> {
    let mut file = std::fs::File::open(path).ok()?;
    let size = file.metadata().ok()?.len();
    let from = size.saturating_sub(TAIL_BYTES);
    file.seek(SeekFrom::Start(from)).ok()?;
    let mut data = Vec::new();
    file.take(TAIL_BYTES).read_to_end(&mut data).ok()?;
    if from > 0 {
        let first = memchr::memchr(b'\n', &data).map_or(data.len(), |i| i + 1);
        data.drain(..first);
    }
    Some(data)
}
