//! What `tally check` and `tally run` verify of this machine before starting, beyond the
//! configuration file itself: that each source's path can name log files, which ones it names now,
//! and that the state folder can be written.

use std::collections::BTreeMap;
use std::path::Path;

use crate::config::Config;
use crate::identity::FileKey;
use crate::tail::{is_glob, matching_files};
use crate::telemetry::printable;

/// What was found: errors stop tally; warnings are worth a look.
#[derive(Debug, Default)]
pub struct Findings {
    /// What makes tally fail (`tally check` exits 1).
    pub errors: Vec<String>,
    /// What is probably not what was meant.
    pub warnings: Vec<String>,
}

/// Looks at every source's path and, when `state` is set (tally will write it), the state folder.
pub fn inspect(config: &Config, state: bool) -> Findings {
    let mut found = Findings::default();
    for source in config.entries() {
        let i = source.index;
        if !is_glob(&source.path) && Path::new(&source.path).is_dir() {
            found.errors.push(format!(
                "sources[{i}].path: {} is a folder: name the log file in it, or a glob such as {}/*access.log",
                printable(&source.path),
                printable(source.path.trim_end_matches('/'))
            ));
        }
    }
    found.warnings.extend(config.deprecated.iter().cloned());
    found.warnings.extend(
        config
            .proxy_config
            .as_ref()
            .and_then(|p| p.loaded.fallback.clone()),
    );
    found.warnings.extend(unmatched(config));
    found.warnings.extend(shared_files(config));
    if state {
        if let Err(e) = writable(&config.state.dir) {
            found.errors.push(format!("state.dir: {e}"));
        }
    }
    found
}

/// Sources whose path names no file now (tally follows them as soon as one appears).
pub(crate) fn unmatched(config: &Config) -> Vec<String> {
    config
        .entries()
        .filter(|s| !Path::new(&s.path).is_dir() && matching_files(&s.path).is_empty())
        .map(|s| {
            let i = s.index;
            let path = printable(&s.path);
            if is_glob(&s.path) {
                format!("sources[{i}].path: no file matches {path} yet; tally reads files as they appear")
            } else {
                format!("sources[{i}].path: {path} does not exist yet; tally reads it when it appears")
            }
        })
        .collect()
}

/// Files that more than one source names: each source reads them, so each line is reported once
/// per source.
fn shared_files(config: &Config) -> Vec<String> {
    let mut by_file: BTreeMap<FileKey, (String, Vec<usize>)> = BTreeMap::new();
    for (i, s) in config.sources.iter().enumerate() {
        // The services of a source routed by Host share its lines: no line is counted twice.
        if s.route.as_ref().is_some_and(|r| !r.hosts.counts_all()) {
            continue;
        }
        for (path, (key, _)) in matching_files(&s.path) {
            let entry = by_file
                .entry(key)
                .or_insert_with(|| (path.display().to_string(), Vec::new()));
            if !entry.1.contains(&i) {
                entry.1.push(i);
            }
        }
    }
    by_file
        .into_values()
        .filter(|(_, sources)| sources.len() > 1)
        .map(|(path, sources)| {
            let named: Vec<String> = sources
                .iter()
                .map(|&i| {
                    let s = &config.sources[i];
                    match &s.route {
                        Some(_) => format!("sources[{}] (routed by Host)", s.index),
                        None => format!("sources[{}] (service {})", s.index, s.service_id),
                    }
                })
                .collect();
            let services: std::collections::BTreeSet<&str> = sources
                .iter()
                .map(|&i| config.sources[i].service_id.as_str())
                .collect();
            let effect = if services.len() < sources.len() {
                "its lines are counted more than once by the same service"
            } else {
                "its lines are reported to each of these services"
            };
            format!(
                "{} is read by {}: {effect}",
                printable(&path),
                named.join(" and ")
            )
        })
        .collect()
}

/// Whether tally can create (if need be) and write the state folder: tries a file in it, or in
/// the nearest folder above it that exists. Leaves nothing behind.
fn writable(dir: &Path) -> Result<(), String> {
    let shown = printable(&dir.to_string_lossy()).into_owned();
    let mut existing = dir;
    while !existing.exists() {
        existing = existing
            .parent()
            .ok_or_else(|| format!("{shown}: no folder of its path exists"))?;
    }
    if !existing.is_dir() {
        return Err(format!(
            "{shown}: {} is not a folder",
            printable(&existing.to_string_lossy())
        ));
    }
    let probe = existing.join(format!(".tally-check-{}", std::process::id()));
    let what = if existing == dir {
        "cannot write in it"
    } else {
        "cannot create it"
    };
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|e| format!("{shown}: {what} ({e})"))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, sources: &[(&str, &str)], state: &Path) -> Config {
        let mut text = "[backend]\nservice_token = \"t\"\n".to_string();
        for (path, service) in sources {
            text.push_str(&format!(
                "[[sources]]\npath = \"{path}\"\nservice_id = \"{service}\"\n"
            ));
        }
        text.push_str(&format!("[state]\ndir = \"{}\"\n", state.display()));
        Config::parse(&dir.join("tally.toml"), &text).expect("valid configuration")
    }

    #[test]
    fn folders_missing_files_and_shared_files_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("logs")).unwrap();
        std::fs::write(d.join("logs/a.log"), "x\n").unwrap();
        let c = config(
            d,
            &[
                ("logs", "1"),
                ("logs/*.log", "1"),
                ("logs/a.log", "2"),
                ("logs/missing.log", "1"),
                ("other/*.log", "1"),
            ],
            &d.join("state"),
        );
        let found = inspect(&c, true);
        assert_eq!(found.errors.len(), 1, "{found:?}");
        assert!(
            found.errors[0].starts_with("sources[0].path: ")
                && found.errors[0].contains("is a folder"),
            "{found:?}"
        );
        let w = found.warnings.join("\n");
        assert_eq!(found.warnings.len(), 3, "{w}");
        assert!(
            w.contains("sources[3].path: ") && w.contains("missing.log does not exist yet"),
            "{w}"
        );
        assert!(w.contains("sources[4].path: no file matches"), "{w}");
        assert!(
            w.contains("read by sources[1] (service 1) and sources[2] (service 2): its lines are reported to each"),
            "{w}"
        );
        // The same file twice for one service is worse: counted twice.
        let c = config(
            d,
            &[("logs/*.log", "1"), ("logs/a.log", "1")],
            &d.join("state"),
        );
        assert!(inspect(&c, false).warnings[0].contains("counted more than once"));
    }

    #[test]
    fn a_state_folder_that_cannot_be_made_or_written_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("log"), "").unwrap();
        // Not yet there, but can be created: fine, and nothing is left behind.
        let c = config(d, &[("log", "1")], &d.join("a/b/state"));
        assert!(inspect(&c, true).errors.is_empty());
        assert!(!d.join("a").exists());
        assert_eq!(std::fs::read_dir(d).unwrap().count(), 1);
        // Under a file: cannot be created.
        let c = config(d, &[("log", "1")], &d.join("log/state"));
        let e = inspect(&c, true).errors.join("\n");
        assert!(
            e.starts_with("state.dir: ") && e.contains("is not a folder"),
            "{e}"
        );
        // Not checked when tally will not write it (--dry-run).
        assert!(inspect(&c, false).errors.is_empty());
    }
}
