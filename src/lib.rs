//! tally follows access logs and reports the traffic they record to 3scale.
//!
//! The data path, one module per step: `tail` (log file → lines) → `parse` (line → request) →
//! `mapping` (request → usage, by the mapping rules) → `aggregate` (requests and their `usage` → transaction batches) → `report` (batch → report
//! call), with `state` (checkpoints), `config`, `telemetry` and `run` (the wiring) beside them.
//! Inside, everything is crate-private; what the binary, the tests and the benchmark use is
//! re-exported below.

#![warn(missing_docs, unreachable_pub)]

mod aggregate;
mod codes;
mod codes_cli;
mod config;
mod explain;
mod identity;
mod mapping;
mod online;
mod page;
mod parse;
mod preflight;
mod progress;
mod proxy_config;
mod reclaim;
mod report;
mod run;
mod state;
mod tail;
mod telemetry;
mod usage;
mod watch;

// What the `tally` binary runs.
pub use codes_cli::{codes_report, CodesQuery};
pub use config::{Config, ConfigError, LogOutput};
pub use explain::{explain, ExplainError, ExplainInput, ExplainOptions};
pub use online::check_online;
pub use preflight::{inspect, Findings};
pub use run::{run, Outcome, RunOptions};
pub use telemetry::init_logging;

/// tally's read → parse → aggregate path, driven directly by the allocation test and the
/// benchmark.
pub mod pipeline {
    pub use crate::aggregate::{take_in, Aggregator, Batch, ServiceLines};
    pub use crate::mapping::HostRoute;
    pub use crate::parse::{civil_from_days, Parser};
    pub use crate::parse::{
        Container, CredentialLocation, CredentialMode, CredentialRule, JsonFields, JsonFormat,
        JwtClaim, LogFormat, RegexFormat, Stream, Wrapper,
    };
    pub use crate::tail::{Follower, Records, TailEvents, TailOptions, Tailed};
    pub use crate::telemetry::Metrics;
}
