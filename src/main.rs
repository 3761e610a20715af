use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use tally::config::{Config, LogOutput};
use tally::run::{run, RunOptions};

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
        /// Log JSON lines instead of text (overrides log.format).
        #[arg(long)]
        log_json: bool,
    },
    /// Validate the configuration and print it in full, secrets masked.
    Check {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                print!("{}", c.effective());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Run {
            config,
            dry_run,
            once,
            log_json,
        } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            tally::telemetry::init_logging(
                log_json || config.log.format == LogOutput::Json,
                &config.log.level,
            );
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
            match runtime.block_on(run(config, RunOptions { dry_run, once })) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
