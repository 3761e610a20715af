//! Wires the stages for `tally run`: followers → per-service aggregation → per-service reporting,
//! and the orderly stop on SIGTERM / SIGINT.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::aggregate::{self, Aggregator, Counted, FeedSettings, Reconfiguration, ServiceLines};
use crate::config::Config;
use crate::config::ReadFrom;
use crate::mapping::MappingRules;
use crate::preflight;
use crate::report::{self, ServiceReport, Sink};
use crate::state::{Resume, SourceId, StateDir};
use crate::tail::{Follower, TailEvents, TailOptions, Tailed};
use crate::telemetry::{self, Metrics};

/// How `tally run` runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Print each report call instead of sending it.
    pub dry_run: bool,
    /// Read the files as they are now, report, and exit.
    pub once: bool,
    /// With `once`: stop (as on SIGTERM) after this long, whatever is left.
    pub max_wait: Option<Duration>,
}

/// How a run ended, without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `--once`: everything in the files was read and accepted (or needed no report).
    Complete,
    /// Stopped by a signal while following: what was not accepted is kept for the next start.
    Stopped,
    /// `--once` stopped (a signal, `--max-wait`) before everything was read and accepted; the rest
    /// is kept for the next run.
    Unfinished,
}

/// `tally run`: follows the sources and reports to 3scale until a signal (or, `--once`, until
/// everything read is accepted); an error when a stage fails.
pub async fn run(mut config: Config, options: RunOptions) -> anyhow::Result<Outcome> {
    // Listen first: a SIGTERM that arrives while tally starts must stop it in order too.
    let mut signals = Signals::listen()?;
    let metrics = Metrics::new(config.telemetry.stalled_after);
    // The Response codes page is served with the other telemetry.
    let metrics = Arc::new(match config.telemetry.listen {
        Some(listen) => {
            let kept = config.telemetry.calls_kept();
            if kept == 0 && config.telemetry.calls_per_code > 0 {
                tracing::info!(%listen, "the Response codes page shows no call details: the listener is not on loopback (set telemetry.calls_on_public_listener = true to show them)");
            }
            metrics.with_codes(kept)
        }
        None => metrics,
    });
    // --dry-run reads the checkpoints (it shows what would be sent next) but writes none.
    let state_dir = StateDir::open(&config.state.dir, options.dry_run)?;
    if let Some(listen) = config.telemetry.listen {
        telemetry::serve(listen, metrics.clone())
            .await
            .with_context(|| format!("telemetry.listen {listen}"))?;
    }
    // A new proxy configuration that changes the services, or a reloaded configuration file,
    // restarts the pipeline, in order.
    loop {
        match pipeline(&config, options, &mut signals, &metrics, &state_dir).await? {
            Ended::Run(outcome) => return Ok(outcome),
            Ended::Restart(new) => {
                tracing::info!(
                    services = new.services().len(),
                    sources = new.sources.len(),
                    "starting again with the new configuration"
                );
                config = *new;
            }
        }
    }
}

/// How a pipeline ended.
enum Ended {
    /// As `run` ends.
    Run(Outcome),
    /// Stopped in order to start again with this configuration.
    Restart(Box<Config>),
}

/// Why the main loop stopped.
enum Stop {
    /// A signal or --max-wait: its name.
    Asked(String),
    /// A new proxy configuration.
    Restart(Box<Config>),
}

/// The followers, aggregations and reporters of `config`, until they end, a signal, or a new
/// proxy configuration that needs them started again.
async fn pipeline(
    config: &Config,
    options: RunOptions,
    signals: &mut Signals,
    metrics: &Arc<Metrics>,
    state_dir: &StateDir,
) -> anyhow::Result<Ended> {
    // Checkpoints are kept by source name (by default the path): a reordered list keeps them.
    let source_ids: Vec<SourceId> = config
        .sources
        .iter()
        .map(|s| SourceId {
            service_id: s.service_id.clone(),
            name: s.name.clone(),
        })
        .collect();
    for (id, s) in source_ids.iter().zip(&config.sources) {
        // Unless another source of the service is named by that path (it keeps its own).
        if !source_ids
            .iter()
            .any(|o| o.service_id == id.service_id && o.name == s.path)
        {
            state_dir.adopt(id, &s.path);
        }
    }
    // One follower per path (a feed), however many services it feeds: each file is read once.
    let mut feeds: Vec<Vec<usize>> = Vec::new();
    for (i, s) in config.sources.iter().enumerate() {
        match feeds
            .iter_mut()
            .find(|f| config.sources[f[0]].path == s.path)
        {
            Some(feed) => feed.push(i),
            None => feeds.push(vec![i]),
        }
    }
    let feed_of = |i: usize| feeds.iter().position(|f| f.contains(&i)).unwrap_or(0);
    let feed_sources: Arc<Vec<Vec<SourceId>>> = Arc::new(
        feeds
            .iter()
            .map(|f| f.iter().map(|&i| source_ids[i].clone()).collect())
            .collect(),
    );
    // Where each follower resumes, and what each source counted already past that (planned before
    // the sources are recorded as read: read_from applies to a source's first run only).
    let plans: Vec<Resume> = feeds
        .iter()
        .map(|f| {
            let sources: Vec<(SourceId, bool)> = f
                .iter()
                .map(|&i| {
                    let from_end = config.sources[i].read_from == ReadFrom::End;
                    (source_ids[i].clone(), from_end)
                })
                .collect();
            let matching = crate::tail::matching_files(&config.sources[f[0]].path);
            state_dir.resume(&sources, &matching, |c| {
                crate::tail::still_holds(&matching, c.key, c.fingerprint, &c.path)
            })
        })
        .collect();
    state_dir.start_sources(&source_ids)?;
    // Sources that report to the same service share its batches.
    let mut services: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, s) in config.sources.iter().enumerate() {
        services.entry(s.service_id.as_str()).or_default().push(i);
    }
    // One client, so one keep-alive connection pool, for every service.
    let client = Arc::new(report::Client::for_backend(&config.backend)?);
    // Shared: a file feeding several services is freed up to where all of them stand.
    let reclaim = (config.tail.reclaim && !options.dry_run)
        .then(|| Arc::new(crate::reclaim::Reclaim::new(metrics.clone())));
    let mut reporters = JoinSet::new();
    // Every aggregation task: a panic there must stop tally, not close the service's batches as if
    // its logs had ended. Tasks are named by id, for the message.
    let mut aggregations = JoinSet::new();
    let mut stage_of = std::collections::HashMap::new();
    let panic_on = std::env::var_os(PANIC_HOOK).map(|v| v.into_encoded_bytes());
    // The services each feed tells what it reads.
    let mut feed_out: Vec<Vec<mpsc::Sender<Tailed>>> = vec![Vec::new(); feeds.len()];
    for (service_id, sources) in services {
        let (tailed_tx, tailed_rx) = mpsc::channel(4);
        let (batch_tx, batch_rx) = mpsc::channel(2);
        let mut parsers = vec![None; feeds.len()];
        let mut rules = vec![MappingRules::default(); feeds.len()];
        let mut routes = vec![None; feeds.len()];
        // Every metric the service's rules name: a batch's room depends on them.
        let metric_names = config.metrics_of(service_id);
        let mut counted = std::collections::HashMap::new();
        let mut names = std::collections::HashMap::new();
        for &i in &sources {
            let feed = feed_of(i);
            let s = &config.sources[i];
            let parser = s.parser(config.tail.max_line_length);
            if metrics.codes.keeps_calls() {
                metrics
                    .codes
                    .set_reader(service_id, feed, parser.without_credentials());
            }
            // The Response codes page counts the lines without a credential too.
            parsers[feed] = Some(if metrics.codes.is_on() {
                parser.noting_failures()
            } else {
                parser
            });
            routes[feed] = s.route.as_ref().map(|r| r.hosts.clone());
            rules[feed] =
                MappingRules::compile(&s.mapping_rules, &metric_names).map_err(|(at, e)| {
                    anyhow::anyhow!("sources[{}].mapping_rules[{at}]: {e}", s.index)
                })?;
            names.insert(feed, s.name.clone());
            feed_out[feed].push(tailed_tx.clone());
            let place = feeds[feed].iter().position(|&j| j == i).unwrap_or(0);
            for (&key, &up_to) in &plans[feed].counted[place] {
                counted.insert((feed, key), Counted { up_to, seen: 0 });
            }
        }
        let lines = ServiceLines {
            service_id: service_id.to_string(),
            parsers,
            rules,
            routes,
            max_line_length: config.tail.max_line_length,
            flush_interval: config.report.flush_interval,
            counted,
            panic_on: panic_on.clone(),
        };
        let aggregator = Aggregator::with_metrics(
            config.report.response_codes,
            config.report.max_transactions,
            metric_names,
        );
        for f in state_dir.in_flight(service_id) {
            tracing::warn!(service_id, path = %crate::telemetry::shown_path(&f.path), from = f.from, to = f.to,
                "a report call was under way when tally stopped: its lines are sent again (if 3scale had \
                 processed that call, they count twice)");
        }
        let state = state_dir.service(service_id, names, feed_sources.clone());
        let task = aggregations.spawn(aggregate::run(
            lines,
            aggregator,
            tailed_rx,
            batch_tx,
            metrics.clone(),
        ));
        stage_of.insert(task.id(), format!("aggregation of service {service_id}"));
        let sink = if options.dry_run {
            Sink::DryRun(config.backend.url.clone())
        } else {
            Sink::Backend(client.clone())
        };
        // A source's own credentials (or its proxy configuration's) win over [backend]'s; the
        // configuration checked that the sources of one service agree, and that each service has
        // one or the other.
        let auth = sources
            .iter()
            .find_map(|&i| config.sources[i].auth.clone())
            .or_else(|| config.backend.auth.clone())
            .with_context(|| format!("no credentials for 3scale for service {service_id}"))?;
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
            reclaim: reclaim.clone(),
        };
        let task = reporters.spawn(report::run(service, batch_rx, metrics.clone()));
        stage_of.insert(task.id(), format!("reporting of service {service_id}"));
    }
    // A refreshed proxy configuration reaches the services through their followers, so that all
    // the services of a file switch at the same line.
    let (reconfigure, reconfigurations) = tokio::sync::watch::channel(None);
    let (restart, mut restarts) = mpsc::channel::<Box<Config>>(1);
    let feed_paths: Vec<String> = feeds
        .iter()
        .map(|f| config.sources[f[0]].path.clone())
        .collect();
    let refresher = config.proxy_config.as_ref().map(|settings| {
        // Logged with the configuration's other warnings.
        if let Some(why) = &settings.loaded.fallback {
            metrics.set_warning("proxy_config", Some(why.clone()));
        } else if settings.portal.is_some() && !options.dry_run {
            save_proxy_config(&config.state.dir, &settings.loaded.document, metrics);
        }
        tokio::spawn(refresh_proxy_config(ProxyRefresh {
            config: config.clone(),
            feeds: feed_paths,
            reconfigure,
            restart: (!options.once).then_some(restart),
            metrics: metrics.clone(),
            save: !options.dry_run,
        }))
    });
    let mut followers = Vec::new();
    for (feed, ((sources, plan), out)) in feeds.iter().zip(plans).zip(feed_out).enumerate() {
        let path = &config.sources[sources[0]].path;
        let tail = TailOptions {
            start_at_end: plan.start_at_end,
            checkpoints: plan.checkpoints,
            poll_interval: config.tail.poll_interval,
            watch: config.tail.watch,
            rotate_grace: config.tail.rotate_grace,
            max_line_length: config.tail.max_line_length,
            once: options.once,
            // The sources of one path agree on it (checked with the configuration).
            records: config.sources[sources[0]]
                .container
                .map(|c| Arc::new(c) as Arc<dyn crate::tail::Records>),
            reconfigurations: refresher.as_ref().map(|_| reconfigurations.clone()),
        };
        let events: Arc<dyn TailEvents> = metrics.clone();
        let follower = Follower::spawn(feed, path.clone(), tail, out, events)
            .with_context(|| format!("cannot start following {path}"))?;
        followers.push(follower);
    }
    tracing::info!(
        sources = config.sources.len(),
        dry_run = options.dry_run,
        once = options.once,
        "tally started"
    );
    // A backfill shows how it gets on, until this pipeline ends.
    let _progress = options.once.then(|| {
        let printing = options.dry_run && std::io::IsTerminal::is_terminal(&std::io::stdout());
        crate::progress::Shown::start(metrics.clone(), !printing)
    });

    // --once logs what it waits for more often: someone is usually waiting for it to end.
    let every = if options.once {
        config.log.stats_interval.min(Duration::from_secs(10))
    } else {
        config.log.stats_interval
    };
    let mut summary = tokio::time::interval(every);
    summary.tick().await;
    let deadline = options.max_wait.map(|d| tokio::time::Instant::now() + d);
    // The configuration file, looked at every few seconds (a Kubernetes ConfigMap is updated by
    // swapping a symlink: no event is sure to say so): a change reloads it as SIGHUP does.
    let mut file_check = tokio::time::interval(CONFIG_FILE_CHECK);
    file_check.tick().await;
    let mut looked_at = config.origin.text.clone();
    let why = loop {
        tokio::select! {
            result = drain(&mut reporters, &stage_of) => {
                // Only in --once mode do the reporters finish by themselves: after every
                // aggregation, which must have ended well.
                result?;
                watch_aggregations(&mut aggregations, &stage_of, metrics).await;
                if let Some(death) = metrics.first_death() {
                    anyhow::bail!("{death}");
                }
                metrics.log_summary("done");
                return Ok(Ended::Run(Outcome::Complete));
            }
            death = metrics.a_stage_died() => anyhow::bail!("{death}"),
            _ = watch_aggregations(&mut aggregations, &stage_of, metrics), if !aggregations.is_empty() => {}
            signal = signals.recv() => match signal {
                Signal::Hangup if options.once => tracing::warn!(
                    "SIGHUP received: --once goes on with the configuration it started with"
                ),
                Signal::Hangup => match reload(config, options, metrics, "SIGHUP received").await {
                    Some(new) => break Stop::Restart(Box::new(new)),
                    None => continue,
                },
                Signal::Stop(name) => break Stop::Asked(name.to_string()),
            },
            Some(new) = restarts.recv() => break Stop::Restart(new),
            _ = file_check.tick(), if !options.once => {
                // Unreadable for a moment (being replaced): looked at again next time.
                let Ok(text) = std::fs::read_to_string(&config.origin.path) else { continue };
                if text != looked_at {
                    looked_at = text;
                    if let Some(new) = reload(config, options, metrics, "the configuration file changed").await {
                        break Stop::Restart(Box::new(new));
                    }
                }
            }
            _ = sleep_until(deadline) => {
                break Stop::Asked(format!("--max-wait {} passed", humantime::format_duration(options.max_wait.unwrap_or_default())));
            }
            _ = summary.tick() => {
                metrics.log_summary("running");
                metrics.files.log();
                for warning in preflight::unmatched(config) {
                    tracing::warn!("{warning}");
                }
                if options.once {
                    log_waiting(metrics);
                }
            }
        }
    };
    if let Some(refresher) = &refresher {
        refresher.abort();
    }
    let read_everything = followers.iter().all(Follower::is_finished);
    let reason = match &why {
        Stop::Asked(reason) => reason.clone(),
        Stop::Restart(_) => "a new configuration changes the services or their sources".to_string(),
    };
    tracing::info!(
        why = reason,
        grace = ?config.report.shutdown_grace,
        "stopping: reading the files up to where they stand, then sending what was read"
    );
    let stop = async {
        for f in &followers {
            f.stop();
        }
        let joined =
            tokio::task::spawn_blocking(move || followers.into_iter().for_each(Follower::join));
        let _ = joined.await;
        drain(&mut reporters, &stage_of).await
    };
    let drained = tokio::time::timeout(config.report.shutdown_grace, stop).await;
    metrics.log_summary("stopped");
    let kept = metrics.files.unaccepted();
    let drained = match drained {
        Ok(result) => {
            result?;
            true
        }
        Err(_) => {
            tracing::warn!(
                grace = ?config.report.shutdown_grace,
                "the grace period ended before 3scale accepted everything read"
            );
            false
        }
    };
    log_kept(&kept);
    if let Stop::Restart(new) = why {
        // Nothing of this pipeline may touch the state once the next one reads it: a call still
        // under way is abandoned (its lines are in flight, sent again: "Exactness").
        reporters.abort_all();
        while reporters.join_next().await.is_some() {}
        aggregations.abort_all();
        while aggregations.join_next().await.is_some() {}
        return Ok(Ended::Restart(new));
    }
    if !options.once {
        return Ok(Ended::Run(Outcome::Stopped));
    }
    Ok(Ended::Run(
        if read_everything && drained && kept.is_empty() {
            Outcome::Complete
        } else {
            Outcome::Unfinished
        },
    ))
}

/// How often the configuration file is looked at for a change.
const CONFIG_FILE_CHECK: Duration = Duration::from_secs(2);

/// SIGHUP, or a changed file: reads the configuration file again. A valid one that tally can take without a new
/// process is returned, to start the pipeline again with; else the error is logged (the file, line
/// and key) and counted, and the configuration in use stays.
async fn reload(
    config: &Config,
    options: RunOptions,
    metrics: &Metrics,
    why: &str,
) -> Option<Config> {
    let path = config.origin.path.clone();
    tracing::info!(path = %path.display(), "{why}: reading the configuration again");
    // Reading it may fetch the proxy configuration from the admin portal: off the runtime.
    let loaded = tokio::task::spawn_blocking(move || Config::load(&path)).await;
    let new = match loaded {
        Ok(Ok(new)) => new,
        Ok(Err(e)) => return reload_failed(metrics, &e.to_string()),
        Err(e) => return reload_failed(metrics, &format!("the reading stopped abnormally: {e}")),
    };
    // --dry-run writes no state: its folder need not be writable.
    let found = crate::preflight::inspect(&new, !options.dry_run);
    if let Some(e) = found.errors.first() {
        return reload_failed(metrics, e);
    }
    // What belongs to the process, not to the pipeline.
    if new.state.dir != config.state.dir {
        return reload_failed(
            metrics,
            "state.dir cannot change while tally runs (its lock and checkpoints): restart tally",
        );
    }
    for (key, same) in [
        (
            "telemetry.listen",
            new.telemetry.listen == config.telemetry.listen,
        ),
        (
            "telemetry.calls_per_code",
            new.telemetry.calls_kept() == config.telemetry.calls_kept(),
        ),
        (
            "log",
            new.log.level == config.log.level && new.log.format == config.log.format,
        ),
    ] {
        if !same {
            tracing::warn!(key, "this setting applies at the next start of the process; the rest of the new configuration applies now");
        }
    }
    for w in &found.warnings {
        tracing::warn!("{w}");
    }
    Metrics::add(&metrics.reloads_applied, 1);
    metrics.set_warning("reload", None);
    Some(new)
}

/// A reload that failed: logged, counted, shown by /healthz; the configuration in use stays.
fn reload_failed(metrics: &Metrics, why: &str) -> Option<Config> {
    Metrics::add(&metrics.reloads_failed, 1);
    tracing::error!(error = %why, "the configuration was not reloaded: the one in use stays");
    metrics.set_warning(
        "reload",
        Some(format!(
            "the last reload failed ({why}): the configuration in use stays"
        )),
    );
    None
}

/// What refreshes the proxy configuration.
struct ProxyRefresh {
    /// The configuration in use.
    config: Config,
    /// The path of each follower, by feed.
    feeds: Vec<String>,
    reconfigure: tokio::sync::watch::Sender<Option<Arc<Reconfiguration>>>,
    /// Where a version that changes the services goes (None with --once: it waits).
    restart: Option<mpsc::Sender<Box<Config>>>,
    metrics: Arc<Metrics>,
    /// Keep a copy of what the admin portal gives (not with --dry-run).
    save: bool,
}

/// Every `refresh`: reads the proxy configuration again and, when it changed, passes it to the
/// followers. A failure keeps the last good one (and says so on /healthz); a new version that
/// changes what runs (services, their backend credentials) restarts the pipeline.
async fn refresh_proxy_config(mut r: ProxyRefresh) {
    let Some(settings) = r.config.proxy_config.clone() else {
        return;
    };
    let client = match settings.portal.as_ref().map(|p| p.client()).transpose() {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "the proxy configuration cannot be refreshed");
            return;
        }
    };
    let mut in_use = settings.loaded.document.clone();
    let mut ticks = tokio::time::interval(settings.refresh);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let fetched = match (&settings.portal, &client, &settings.file) {
            (Some(portal), Some(client), _) => portal.fetch(client).await,
            // A small file, read once per refresh.
            (_, _, Some(file)) => {
                std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))
            }
            _ => return,
        };
        let document: Arc<[u8]> = match fetched {
            Ok(d) => d.into(),
            Err(e) => {
                proxy_config_failed(&r.metrics, &e);
                continue;
            }
        };
        if document == in_use {
            r.metrics.proxy_config_unchanged.fetch_add(1, Relaxed);
            r.metrics.set_warning("proxy_config", None);
            continue;
        }
        let new = match r.config.with_proxy_document(document.clone()) {
            Ok(new) => new,
            Err(e) => {
                proxy_config_failed(&r.metrics, &format!("the new version is not usable: {e}"));
                continue;
            }
        };
        if let Some(change) = needs_restart(&r.config, &new) {
            if let Some(restart) = &r.restart {
                // Its batches, reporters and checkpoints are set up at start: start again, in
                // order (as on SIGTERM, within the process).
                r.metrics.proxy_config_restarted.fetch_add(1, Relaxed);
                r.metrics.set_warning("proxy_config", None);
                tracing::info!("proxy configuration: a new version {change}: stopping in order to start again with it");
                if r.save && settings.portal.is_some() {
                    save_proxy_config(&r.config.state.dir, &document, &r.metrics);
                }
                let _ = restart.send(Box::new(new)).await;
                return;
            }
            r.metrics.proxy_config_not_applied.fetch_add(1, Relaxed);
            let why = format!(
                "a new version {change}: it applies when --once ends (the one in use stays)"
            );
            tracing::warn!("proxy configuration: {why}");
            r.metrics.set_warning("proxy_config", Some(why));
            continue;
        }
        let feeds = new
            .sources
            .iter()
            .filter_map(|s| {
                let feed = r.feeds.iter().position(|p| *p == s.path)?;
                let settings = FeedSettings {
                    parser: s.parser(new.tail.max_line_length),
                    rules: s.mapping_rules.clone(),
                    route: s.route.as_ref().map(|route| route.hosts.clone()),
                };
                Some(((s.service_id.clone(), feed), settings))
            })
            .collect();
        if r.save && settings.portal.is_some() {
            save_proxy_config(&r.config.state.dir, &document, &r.metrics);
        }
        let _ = r
            .reconfigure
            .send(Some(Arc::new(Reconfiguration { feeds })));
        r.metrics.proxy_config_applied.fetch_add(1, Relaxed);
        r.metrics.set_warning("proxy_config", None);
        tracing::info!(
            services = new.services().len(),
            "proxy configuration: a new version, in use from the next line read"
        );
        in_use = document;
        r.config = new;
    }
}

/// A refresh that failed: the last good proxy configuration stays.
fn proxy_config_failed(metrics: &Metrics, why: &str) {
    metrics.proxy_config_failed.fetch_add(1, Relaxed);
    tracing::warn!(error = %why, "proxy configuration: the refresh failed, the last good one stays");
    metrics.set_warning(
        "proxy_config",
        Some(format!(
            "the last refresh failed ({why}): the last good one stays"
        )),
    );
}

/// Saves the admin portal's proxy configuration in the state folder, for a start while it is down.
fn save_proxy_config(dir: &std::path::Path, document: &[u8], metrics: &Metrics) {
    if let Err(e) = crate::proxy_config::save(dir, document) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot save the proxy configuration");
        metrics.set_warning(
            "proxy_config",
            Some(format!("cannot save a copy in {}: {e}", dir.display())),
        );
    }
}

/// What in `new` cannot change while tally runs, if anything does: the services and the files
/// they read, and how each authenticates with 3scale.
fn needs_restart(old: &Config, new: &Config) -> Option<String> {
    let layout = |c: &Config| {
        c.sources
            .iter()
            .map(|s| (s.service_id.clone(), s.path.clone()))
            .collect::<std::collections::BTreeSet<_>>()
    };
    let (before, after) = (old.services(), new.services());
    let added: Vec<&str> = after
        .iter()
        .filter(|s| !before.contains(s))
        .map(|s| s.as_str())
        .collect();
    let removed: Vec<&str> = before
        .iter()
        .filter(|s| !after.contains(s))
        .map(|s| s.as_str())
        .collect();
    if !added.is_empty() || !removed.is_empty() {
        return Some(format!(
            "changes the services reported to (added: [{}], removed: [{}])",
            added.join(", "),
            removed.join(", ")
        ));
    }
    if layout(old) != layout(new) {
        return Some("changes which files feed which services".into());
    }
    if old.backend.url != new.backend.url {
        return Some("changes the backend endpoint".into());
    }
    // The backend credentials the proxy configuration gives (the TOML's are read again by a
    // refresh, and a rotated token file is the reporter's to pick up: not a change of version).
    let proxy = |c: &Config| {
        c.proxy_config
            .as_ref()
            .and_then(|p| crate::proxy_config::ProxyConfig::parse(&p.loaded.document).ok())
            .unwrap_or_default()
    };
    let (old_proxy, new_proxy) = (proxy(old), proxy(new));
    let auth = |p: &crate::proxy_config::ProxyConfig, service: &str| {
        p.service(service).and_then(|s| s.backend_auth.clone())
    };
    before
        .iter()
        .find(|s| auth(&old_proxy, s) != auth(&new_proxy, s))
        .map(|s| format!("changes the backend credentials of service {s}"))
}

/// The name of the test-only hook: a line holding its value makes the aggregation panic, so that a
/// test can check that tally stops with an error and loses nothing when restarted.
const PANIC_HOOK: &str = "TALLY_TEST_PANIC_ON";

/// The stage a task ran, by task id.
type Stages = std::collections::HashMap<tokio::task::Id, String>;

/// A task that ended abnormally: which stage, and why (a panic's message).
fn died(e: tokio::task::JoinError, stages: &Stages) -> (String, String) {
    let stage = stages.get(&e.id()).cloned().unwrap_or_default();
    let why = if e.is_panic() {
        crate::telemetry::panic_text(&*e.into_panic())
    } else {
        e.to_string()
    };
    (stage, why)
}

/// Joins aggregation tasks as they end (until none is left); one that panicked is a stage death.
async fn watch_aggregations(aggregations: &mut JoinSet<()>, stages: &Stages, metrics: &Metrics) {
    while let Some(ended) = aggregations.join_next().await {
        if let Err(e) = ended {
            let (stage, why) = died(e, stages);
            metrics.stage_died(&stage, &why);
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// `--once`: what it waits for, when 3scale has not accepted what was read.
fn log_waiting(metrics: &Metrics) {
    if let Some((service_id, waited, last_failure)) = metrics.longest_wait() {
        let waited = humantime::format_duration(Duration::from_secs(waited.as_secs()));
        let bytes: u64 = metrics
            .files
            .unaccepted()
            .iter()
            .map(|(_, c, r)| r - c)
            .sum();
        tracing::info!(service_id, %waited, bytes_not_accepted = bytes, last_failure = last_failure.as_deref().unwrap_or("none"),
            "--once: waiting for 3scale to accept what was read (--max-wait sets a limit)");
    }
}

/// At a stop: what 3scale has not accepted stays behind the checkpoints, so the next start reads
/// it again. Nothing is lost; say so, with where.
fn log_kept(kept: &[(Arc<std::path::Path>, u64, u64)]) {
    for (path, committed, read) in kept {
        tracing::warn!(path = %crate::telemetry::shown_path(path), from = committed, to = read,
            "not accepted by 3scale yet: kept, and read again from the checkpoint at the next start (a report call under way now may count twice)");
    }
}

/// Waits for every reporter; the first error wins.
async fn drain(
    reporters: &mut JoinSet<Result<(), report::ReportError>>,
    stages: &Stages,
) -> anyhow::Result<()> {
    while let Some(done) = reporters.join_next().await {
        match done {
            Ok(result) => result?,
            Err(e) => {
                let (stage, why) = died(e, stages);
                anyhow::bail!("{stage} stopped abnormally: {why}");
            }
        }
    }
    Ok(())
}

/// The signals tally acts on.
enum Signal {
    /// SIGTERM (Kubernetes, systemd) or SIGINT (Ctrl-C): stop in order.
    Stop(&'static str),
    /// SIGHUP (a closed terminal, a logrotate script): never a reason to stop.
    Hangup,
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    /// Caught and never acted on: a write past a file-size limit (`ulimit -f`, systemd's
    /// `LimitFSIZE=`) then fails with an error tally reports, instead of killing it.
    _file_too_large: tokio::signal::unix::Signal,
}

impl Signals {
    fn listen() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
            hup: signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?,
            _file_too_large: signal(SignalKind::from_raw(libc::SIGXFSZ))
                .context("cannot listen for SIGXFSZ")?,
        })
    }

    async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop("SIGTERM"),
            _ = self.int.recv() => Signal::Stop("SIGINT"),
            _ = self.hup.recv() => Signal::Hangup,
        }
    }
}
