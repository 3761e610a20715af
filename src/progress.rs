//! How a backfill (`tally run --once`) gets on: on a terminal, a bar on stderr redrawn a few times
//! a second (bytes read of bytes to read, lines/s, ETA); elsewhere a log line every few seconds.
//! Both end with a last one when the run ends.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::telemetry::Metrics;

/// Whether a bar is on the terminal's last line: a log line clears it first (see [`LogWriter`]).
static BAR_SHOWN: AtomicBool = AtomicBool::new(false);

/// How often the bar is redrawn, and how often the plain line is logged.
const BAR_EVERY: Duration = Duration::from_millis(250);
const LINE_EVERY: Duration = Duration::from_secs(5);

/// Where a run stands: bytes read by this run, bytes left in the files now, lines read.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Backfill {
    read: u64,
    left: u64,
    lines: u64,
    elapsed: Duration,
}

impl Backfill {
    fn now(metrics: &Metrics, started: Instant) -> Backfill {
        let (read, left) = metrics.files.backlog();
        Backfill {
            read,
            left,
            lines: metrics.lines_read.load(Relaxed),
            elapsed: started.elapsed(),
        }
    }

    fn percent(&self) -> f64 {
        match self.read + self.left {
            0 => 100.0,
            total => self.read as f64 * 100.0 / total as f64,
        }
    }

    fn lines_per_second(&self) -> f64 {
        self.lines as f64 / self.elapsed.as_secs_f64().max(0.001)
    }

    /// At the pace so far; None before anything was read.
    fn eta(&self) -> Option<Duration> {
        let pace = self.read as f64 / self.elapsed.as_secs_f64().max(0.001);
        (self.read > 0).then(|| Duration::from_secs_f64(self.left as f64 / pace))
    }

    /// The bar's line, `width` characters of bar.
    fn bar(&self, width: usize) -> String {
        let done = ((self.percent() / 100.0) * width as f64).round() as usize;
        let done = done.min(width);
        let eta = self
            .eta()
            .map_or_else(|| "-".to_string(), |d| format_seconds(d.as_secs()));
        format!(
            "[{}{}] {:5.1}% {} of {}, {:.0} lines/s, ETA {eta}",
            "#".repeat(done),
            "-".repeat(width - done),
            self.percent(),
            megabytes(self.read),
            megabytes(self.read + self.left),
            self.lines_per_second(),
        )
    }

    fn log(&self, message: &str) {
        tracing::info!(
            read_bytes = self.read,
            total_bytes = self.read + self.left,
            percent = format!("{:.1}", self.percent()),
            lines = self.lines,
            lines_per_second = self.lines_per_second().round() as u64,
            eta_seconds = self.eta().map(|d| d.as_secs()),
            "{message}"
        );
    }
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn format_seconds(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// The progress shown while it lives; dropped (the run ends), it shows the last state.
pub(crate) struct Shown {
    task: tokio::task::JoinHandle<()>,
    metrics: Arc<Metrics>,
    started: Instant,
    terminal: bool,
}

impl Shown {
    /// `bar`: a bar may be drawn on a terminal (not where the report calls of `--dry-run` are
    /// printed to the same terminal, which would write through it).
    pub(crate) fn start(metrics: Arc<Metrics>, bar: bool) -> Shown {
        let started = Instant::now();
        let terminal = bar && std::io::stderr().is_terminal();
        let task = tokio::spawn(show(metrics.clone(), started, terminal));
        Shown {
            task,
            metrics,
            started,
            terminal,
        }
    }
}

impl Drop for Shown {
    fn drop(&mut self) {
        self.task.abort();
        let now = Backfill::now(&self.metrics, self.started);
        if self.terminal {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "\r\x1b[2K{}", now.bar(BAR_WIDTH));
            BAR_SHOWN.store(false, Relaxed);
        }
        now.log("backfill ended");
    }
}

const BAR_WIDTH: usize = 30;

async fn show(metrics: Arc<Metrics>, started: Instant, terminal: bool) {
    let mut ticks = tokio::time::interval(if terminal { BAR_EVERY } else { LINE_EVERY });
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let now = Backfill::now(&metrics, started);
        if terminal {
            // Redrawn in place; a log line clears it first.
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K{}", now.bar(BAR_WIDTH));
            BAR_SHOWN.store(true, Relaxed);
        } else {
            now.log("backfill progress");
        }
    }
}

/// Writes tally's log to stderr, clearing the progress bar's line first if one is shown.
pub(crate) struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut err = std::io::stderr().lock();
        if BAR_SHOWN.swap(false, Relaxed) {
            err.write_all(b"\r\x1b[2K")?;
        }
        err.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_says_how_far_and_how_long() {
        let b = Backfill {
            read: 50_000_000,
            left: 150_000_000,
            lines: 200_000,
            elapsed: Duration::from_secs(10),
        };
        assert_eq!(
            b.bar(20),
            "[#####---------------]  25.0% 50.0 MB of 200.0 MB, 20000 lines/s, ETA 30s"
        );
        let done = Backfill { left: 0, ..b };
        assert!(
            done.bar(10).starts_with("[##########] 100.0%"),
            "{}",
            done.bar(10)
        );
        let nothing = Backfill {
            read: 0,
            left: 0,
            lines: 0,
            elapsed: Duration::ZERO,
        };
        assert!(nothing.bar(4).starts_with("[####] 100.0%"));
        assert!(nothing.bar(4).ends_with("ETA -"));
        assert_eq!(format_seconds(4000), "1h06m");
        assert_eq!(format_seconds(75), "1m15s");
    }
}
