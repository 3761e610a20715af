use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use tally::{
    Config, ExplainError, ExplainInput, ExplainOptions, Findings, LogOutput, Outcome, RunOptions,
};

/// Exit codes: 0 done, 1 an error (3scale rejects the calls, a state that cannot be read...),
/// 2 a bad configuration, 3 `--once` stopped before everything was accepted (nothing is lost: the
/// next run reads the rest again from the checkpoints).
const EXIT_BAD_CONFIG: u8 = 2;
const EXIT_UNFINISHED: u8 = 3;

/// Reports the API traffic recorded in access logs to 3scale.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Follow the configured logs and report to 3scale until stopped (SIGTERM, SIGINT).
    Run {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Print each report call (secret masked) instead of sending it.
        #[arg(long)]
        dry_run: bool,
        /// Read the files as they are now, report, and exit.
        #[arg(long)]
        once: bool,
        /// With --once: stop after this long (e.g. "10m") even if 3scale has not accepted
        /// everything yet; exits 3 then. Default: wait as long as it takes.
        #[arg(long, value_name = "DURATION", requires = "once", value_parser = parse_duration)]
        max_wait: Option<Duration>,
        /// Log JSON lines instead of text (overrides log.format).
        #[arg(long)]
        log_json: bool,
    },
    /// Validate the configuration and print it in full, secrets masked.
    Check {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Also ask 3scale (reporting nothing): whether each service takes its token and has every
        /// metric its mapping rules name, checked with credentials from the end of its logs.
        #[arg(long)]
        online: bool,
    },
    /// Show what tally reads from each line of a source's log, and what it would report, or why
    /// it skips the line and where parsing failed. Reports nothing.
    Parse {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// The `[[sources]]` entry whose format and credentials apply, from 0.
        #[arg(long, default_value_t = 0, value_name = "N")]
        source: usize,
        /// One JSON object per line, the summary last.
        #[arg(long)]
        json: bool,
        /// The lines to read: a file, or `-` for standard input. Default: the source's files.
        #[arg(value_name = "LOGFILE")]
        logfile: Option<PathBuf>,
    },
    /// Print the Response codes of a running tally (its telemetry listener), and the latest calls
    /// of a code: the page's tables, for a terminal.
    Codes {
        /// The running tally's configuration (its telemetry.listen).
        #[arg(long, short, value_name = "FILE", required_unless_present = "url")]
        config: Option<PathBuf>,
        /// Or its telemetry listener, e.g. http://127.0.0.1:9464.
        #[arg(long, conflicts_with = "config")]
        url: Option<String>,
        /// Also list the latest calls with this status code.
        #[arg(long)]
        code: Option<u16>,
        /// Only this service.
        #[arg(long)]
        service: Option<String>,
        /// How far back: 15m, 1h, 6h or 24h.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        period: Duration,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("`{text}` is not a duration ({e})"))
}

/// The configuration, or the exit code of a bad one (its error printed).
fn load(file: &Path) -> Result<Config, ExitCode> {
    Config::load(file).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_BAD_CONFIG)
    })
}

/// Prints what preflight found that stops tally; true if anything did.
fn report_errors(file: &Path, found: &Findings) -> bool {
    for e in &found.errors {
        eprintln!("error: {}: {e}", file.display());
    }
    !found.errors.is_empty()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check {
            config: file,
            online,
        } => match Config::load(&file) {
            Ok(c) => {
                let mut found = tally::inspect(&c, true);
                if online {
                    let asked = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map(|runtime| runtime.block_on(tally::check_online(&c, &mut found)));
                    match asked {
                        Ok(said) => said.iter().for_each(|line| eprintln!("{line}")),
                        Err(e) => found
                            .errors
                            .push(format!("online: cannot start the runtime: {e}")),
                    }
                }
                for w in &found.warnings {
                    eprintln!("warning: {}: {w}", file.display());
                }
                if report_errors(&file, &found) {
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
                match c.effective() {
                    Ok(text) => {
                        print!("{text}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: cannot show the effective configuration: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::Codes {
            config,
            url,
            code,
            service,
            period,
        } => {
            let url = match (url, config) {
                (Some(url), _) => url,
                (None, Some(file)) => {
                    let config = match load(&file) {
                        Ok(c) => c,
                        Err(code) => return code,
                    };
                    match config.telemetry.listen {
                        // A listener on every address answers on loopback too.
                        Some(addr) if addr.ip().is_unspecified() => {
                            format!("http://127.0.0.1:{}", addr.port())
                        }
                        Some(addr) => format!("http://{addr}"),
                        None => {
                            eprintln!("error: {}: telemetry.listen is not set, so tally serves no Response codes", file.display());
                            return ExitCode::from(EXIT_BAD_CONFIG);
                        }
                    }
                }
                (None, None) => {
                    eprintln!("error: give --config or --url");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            let query = tally::CodesQuery {
                url,
                service,
                code,
                period,
            };
            match tally::codes_report(&query) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Parse {
            config: file,
            source,
            json,
            logfile,
        } => {
            let config = match load(&file) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let input = match logfile {
                None => ExplainInput::SourceFiles,
                Some(path) if path.as_os_str() == "-" => ExplainInput::Stdin,
                Some(path) => ExplainInput::File(path),
            };
            let options = ExplainOptions {
                source,
                input,
                json,
            };
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            match tally::explain(&config, &options, &mut out, &mut std::io::stderr()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e @ ExplainError::NoSuchSource { .. }) => {
                    eprintln!("error: {}: {e}", file.display());
                    ExitCode::from(EXIT_BAD_CONFIG)
                }
                // A reader that stopped early (`| head`) is no failure.
                Err(ExplainError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run {
            config: file,
            dry_run,
            once,
            max_wait,
            log_json,
        } => {
            let config = match load(&file) {
                Ok(c) => c,
                Err(code) => return code,
            };
            // --dry-run writes no state, so its folder need not be writable.
            let found = tally::inspect(&config, !dry_run);
            if report_errors(&file, &found) {
                return ExitCode::from(EXIT_BAD_CONFIG);
            }
            tally::init_logging(
                log_json || config.log.format == LogOutput::Json,
                &config.log.level,
            );
            for w in &found.warnings {
                tracing::warn!("{w}");
            }
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let options = RunOptions {
                dry_run,
                once,
                max_wait,
            };
            match runtime.block_on(tally::run(config, options)) {
                Ok(Outcome::Complete | Outcome::Stopped) => ExitCode::SUCCESS,
                Ok(Outcome::Unfinished) => {
                    tracing::warn!("stopped before 3scale accepted everything: the rest is kept and read again from the checkpoints at the next run");
                    ExitCode::from(EXIT_UNFINISHED)
                }
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
