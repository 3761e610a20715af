//! tally follows access logs and reports the traffic they record to 3scale.
//!
//! The data path, one module per step: [`tail`] (log file → lines) → [`parse`] (line → request) →
//! [`aggregate`] (requests and their [`usage`] → transaction batches) → [`report`] (batch → report
//! call), with [`config`], [`telemetry`] and [`run`] (the wiring) beside them.

pub mod aggregate;
pub mod config;
pub mod identity;
pub mod parse;
pub mod preflight;
pub mod report;
pub mod run;
pub mod state;
pub mod tail;
pub mod telemetry;
pub mod usage;
