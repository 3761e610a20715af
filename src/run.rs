//! Wires the stages for `tally run`: followers → per-service aggregation → per-service reporting,
//! and the orderly stop on SIGTERM / SIGINT.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::aggregate::{self, Aggregator, ServiceLines};
use crate::config::Config;
use crate::config::ReadFrom;
use crate::parse::Parser;
use crate::report::{self, ServiceReport, Sink};
use crate::state::StateDir;
use crate::tail::{Follower, TailOptions};
use crate::telemetry::{self, Metrics};

#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Print each report call instead of sending it.
    pub dry_run: bool,
    /// Read the files as they are now, report, and exit.
    pub once: bool,
}

pub async fn run(config: Config, options: RunOptions) -> anyhow::Result<()> {
    // Listen first: a SIGTERM that arrives while tally starts must stop it in order too.
    let mut stop_signals = StopSignals::listen()?;
    let metrics = Arc::new(Metrics::default());
    // --dry-run reads the checkpoints (it shows what would be sent next) but writes none.
    let state_dir = StateDir::open(&config.state.dir, options.dry_run)?;
    let patterns: Vec<String> = config.sources.iter().map(|s| s.path.clone()).collect();
    // Sources that report to the same service share its batches.
    let mut services: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, s) in config.sources.iter().enumerate() {
        services.entry(s.service_id.as_str()).or_default().push(i);
    }
    // One client, so one keep-alive connection pool, for every service.
    let client = Arc::new(report::Client::new(
        &config.backend.url,
        config.backend.timeout,
        config.backend.ca_file.as_deref(),
    )?);
    if let Some(listen) = config.telemetry.listen {
        telemetry::serve(listen, metrics.clone())
            .await
            .with_context(|| format!("telemetry.listen {listen}"))?;
    }
    let mut reporters = JoinSet::new();
    let mut followers = Vec::new();
    for (service_id, sources) in services {
        let (chunk_tx, chunk_rx) = mpsc::channel(4);
        let (batch_tx, batch_rx) = mpsc::channel(2);
        let parsers = config
            .sources
            .iter()
            .enumerate()
            .map(|(i, s)| {
                sources
                    .contains(&i)
                    .then(|| Parser::new(s.format, s.credential))
            })
            .collect();
        let lines = ServiceLines {
            service_id: service_id.to_string(),
            parsers,
            max_line_length: config.tail.max_line_length,
            flush_interval: config.report.flush_interval,
        };
        let aggregator =
            Aggregator::new(config.report.response_codes, config.report.max_transactions);
        let mut state = state_dir.service(service_id, patterns.clone())?;
        for f in state.in_flight() {
            tracing::warn!(service_id, path = %f.path.display(), from = f.from, to = f.to,
                "a report call was under way when tally stopped: its lines are sent again (if 3scale had \
                 processed that call, they count twice)");
        }
        // read_from applies to a source's first run only.
        let first_run: Vec<bool> = sources
            .iter()
            .map(|&i| !state.knows_source(&patterns[i]))
            .collect();
        let checkpoints: Vec<_> = sources
            .iter()
            .map(|&i| state.checkpoints(&patterns[i]))
            .collect();
        let started: Vec<String> = sources.iter().map(|&i| patterns[i].clone()).collect();
        state.start_sources(&started)?;
        tokio::spawn(aggregate::run(
            lines,
            aggregator,
            chunk_rx,
            batch_tx,
            metrics.clone(),
        ));
        let sink = if options.dry_run {
            Sink::DryRun(config.backend.url.clone())
        } else {
            Sink::Backend(client.clone())
        };
        // A source's own credentials win over [backend]'s (the configuration checked that the
        // sources of one service agree).
        let auth = sources
            .iter()
            .find_map(|&i| config.sources[i].auth.clone())
            .unwrap_or_else(|| config.backend.auth.clone());
        let service = ServiceReport {
            service_id: service_id.to_string(),
            auth,
            sink,
            state,
            settings: report::Settings {
                concurrency: config.report.concurrency,
                max_age: config.report.max_age,
                rejected_retry: config.backend.rejected_retry,
                fail_on_rejection: options.once,
                validation: config.backend.validate_credentials.then_some((
                    config.backend.valid_credential_ttl,
                    config.backend.invalid_credential_ttl,
                )),
            },
        };
        reporters.spawn(report::run(service, batch_rx, metrics.clone()));
        for ((i, first_run), checkpoints) in sources.into_iter().zip(first_run).zip(checkpoints) {
            let source = &config.sources[i];
            let tail = TailOptions {
                start_at_end: first_run && source.read_from == ReadFrom::End,
                checkpoints,
                poll_interval: config.tail.poll_interval,
                watch: config.tail.watch,
                rotate_grace: config.tail.rotate_grace,
                max_line_length: config.tail.max_line_length,
                once: options.once,
            };
            let follower = Follower::spawn(
                i,
                source.path.clone(),
                tail,
                chunk_tx.clone(),
                metrics.clone(),
            )
            .with_context(|| format!("cannot start following {}", source.path))?;
            followers.push(follower);
        }
    }
    tracing::info!(
        sources = config.sources.len(),
        dry_run = options.dry_run,
        once = options.once,
        "tally started"
    );

    let mut summary = tokio::time::interval(config.log.stats_interval);
    summary.tick().await;
    tokio::select! {
        result = drain(&mut reporters) => {
            // Only in --once mode do the reporters finish by themselves.
            metrics.log_summary("done");
            return result;
        }
        _ = stop_signals.recv() => {}
        _ = async { loop { summary.tick().await; metrics.log_summary("running"); metrics.files.log(); } } => {}
    }
    tracing::info!(
        grace = ?config.report.shutdown_grace,
        "stopping: no more reading, sending what was read"
    );
    let stop = async {
        for f in &followers {
            f.stop();
        }
        let joined =
            tokio::task::spawn_blocking(move || followers.into_iter().for_each(Follower::join));
        let _ = joined.await;
        drain(&mut reporters).await
    };
    match tokio::time::timeout(config.report.shutdown_grace, stop).await {
        Ok(result) => {
            metrics.log_summary("stopped");
            result
        }
        Err(_) => {
            metrics.log_summary("stopped");
            tracing::error!(
                grace = ?config.report.shutdown_grace,
                "the grace period ended before everything read was reported; unsent requests are lost"
            );
            Ok(())
        }
    }
}

/// Waits for every reporter; the first error wins.
async fn drain(reporters: &mut JoinSet<Result<(), report::ReportError>>) -> anyhow::Result<()> {
    while let Some(done) = reporters.join_next().await {
        done.context("a report task failed")??;
    }
    Ok(())
}

/// SIGTERM (Kubernetes, systemd) and SIGINT (Ctrl-C).
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn listen() -> anyhow::Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals {
            term: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
