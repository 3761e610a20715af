//! What wakes a follower: file events (inotify) in the folders of its pattern, a stop, or a timeout.
//!
//! The follower's own thread reads the events, and only when it is ready for its next pass: until
//! then they wait in the kernel, which merges repeats. A log written a hundred times a second costs
//! a few wakeups a second, not two per write (a watcher thread reading each event as it comes, then
//! waking the follower, spent most of tally's CPU on a steady stream).

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::tail::is_glob;

const WOKEN: Token = Token(0);
const FILE_EVENTS: Token = Token(1);

/// What changed in the watched folders while the follower waited (in growing order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Change {
    /// Nothing (the timeout passed, or a stop woke it).
    Nothing,
    /// A file was written: read on.
    Data,
    /// Something else (create, rename, delete, a lost event): look at the paths again.
    Paths,
}

/// Wakes the follower from another thread (to stop it).
#[derive(Clone)]
pub(crate) struct Waker(Arc<mio::Waker>);

impl Waker {
    pub(crate) fn wake(&self) {
        // A failed wake leaves the follower to its timeout (its poll interval) at most.
        let _ = self.0.wake();
    }
}

/// The follower's side: the folders watched, and the wait.
pub(crate) struct FolderWatch {
    poll: Poll,
    events: Events,
    /// None without file events (not asked for, or unavailable): the timeout alone paces reading.
    inotify: Option<Inotify>,
    /// Watched folders, with their depth under the pattern's literal folder.
    folders: HashMap<WatchDescriptor, (PathBuf, usize)>,
    /// The deepest folder that can hold a file of the pattern (0: the literal folder only).
    max_depth: usize,
    buffer: Vec<u8>,
}

impl FolderWatch {
    /// Watches the folders `pattern` lives in (when `watch`); `unwatched` hears why it cannot
    /// (None: file events are unavailable at all; Some: this folder, which may not exist yet).
    pub(crate) fn new(
        pattern: &str,
        watch: bool,
        unwatched: impl Fn(Option<&Path>, &std::io::Error),
    ) -> std::io::Result<(FolderWatch, Waker)> {
        let poll = Poll::new()?;
        let waker = Waker(Arc::new(mio::Waker::new(poll.registry(), WOKEN)?));
        let (dir, max_depth) = folders_of(pattern);
        let mut me = FolderWatch {
            poll,
            events: Events::with_capacity(4),
            inotify: None,
            folders: HashMap::new(),
            max_depth,
            buffer: vec![0; 16 * 1024],
        };
        if watch {
            match Inotify::init() {
                Ok(inotify) => {
                    me.poll.registry().register(
                        &mut SourceFd(&inotify.as_raw_fd()),
                        FILE_EVENTS,
                        Interest::READABLE,
                    )?;
                    me.inotify = Some(inotify);
                    if let Err(e) = me.add(&dir, 0) {
                        unwatched(Some(&dir), &e);
                    }
                }
                Err(e) => unwatched(None, &e),
            }
        }
        Ok((me, waker))
    }

    /// Watches `dir` and, up to the pattern's depth, the folders under it.
    fn add(&mut self, dir: &Path, depth: usize) -> std::io::Result<()> {
        let Some(inotify) = &self.inotify else {
            return Ok(());
        };
        let mask = WatchMask::MODIFY
            | WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::MOVED_FROM
            | WatchMask::MOVED_TO
            | WatchMask::DELETE_SELF
            | WatchMask::MOVE_SELF
            | WatchMask::ONLYDIR;
        let wd = inotify.watches().add(dir, mask)?;
        self.folders.insert(wd, (dir.to_path_buf(), depth));
        if depth < self.max_depth {
            let subdirs = std::fs::read_dir(dir)?
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path());
            for sub in subdirs.collect::<Vec<_>>() {
                // A folder removed meanwhile is no error: its creation's event will not come.
                let _ = self.add(&sub, depth + 1);
            }
        }
        Ok(())
    }

    /// Waits until `until` for a wake only: file events wait in the kernel meanwhile. True if
    /// woken.
    pub(crate) fn pause(&mut self, until: Instant) -> bool {
        let fd = self.inotify.as_ref().map(|i| i.as_raw_fd());
        if let Some(fd) = fd {
            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        }
        let mut woken = false;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || woken {
                break;
            }
            woken = self.poll_once(left).0;
        }
        // Registered again, events already there are reported at once by the next wait.
        if let Some(fd) = fd {
            if self
                .poll
                .registry()
                .register(&mut SourceFd(&fd), FILE_EVENTS, Interest::READABLE)
                .is_err()
            {
                // Without it the timeout alone paces reading: still correct, just slower.
                self.inotify = None;
            }
        }
        woken
    }

    /// Waits at most `timeout` for a file event or a wake, then reads every event there is.
    pub(crate) fn wait(&mut self, timeout: Duration) -> Change {
        let (_, file_events) = self.poll_once(timeout);
        if !file_events {
            return Change::Nothing;
        }
        self.read_events()
    }

    /// One wait: (woken, file events ready).
    fn poll_once(&mut self, timeout: Duration) -> (bool, bool) {
        if let Err(e) = self.poll.poll(&mut self.events, Some(timeout)) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                // epoll_wait failing otherwise is a bug; wait out the timeout so as not to spin.
                std::thread::sleep(timeout);
            }
            return (false, false);
        }
        let mut ready = (false, false);
        for event in self.events.iter() {
            match event.token() {
                WOKEN => ready.0 = true,
                _ => ready.1 = true,
            }
        }
        ready
    }

    /// Reads every event waiting, watching new folders on the way.
    fn read_events(&mut self) -> Change {
        let mut change = Change::Nothing;
        let mut new_folders = Vec::new();
        let Some(inotify) = self.inotify.as_mut() else {
            return change;
        };
        loop {
            let events = match inotify.read_events(&mut self.buffer) {
                Ok(events) => events,
                // WouldBlock: all read. Anything else: look at the paths, as after a lost event.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => return Change::Paths,
            };
            for event in events {
                if event.mask == EventMask::MODIFY {
                    change = change.max(Change::Data);
                    continue;
                }
                change = Change::Paths;
                if event.mask.contains(EventMask::IGNORED) {
                    self.folders.remove(&event.wd);
                } else if event.mask.contains(EventMask::ISDIR)
                    && event
                        .mask
                        .intersects(EventMask::CREATE | EventMask::MOVED_TO)
                {
                    if let (Some((dir, depth)), Some(name)) =
                        (self.folders.get(&event.wd), event.name)
                    {
                        if *depth < self.max_depth {
                            new_folders.push((dir.join(name), depth + 1));
                        }
                    }
                }
            }
        }
        for (dir, depth) in new_folders {
            let _ = self.add(&dir, depth);
        }
        change
    }
}

/// The folder a pattern's files live in or under (its literal part), and how deep under it they
/// may be: a plain path or `dir/*.log` are in the folder itself; `pods/*/nginx/*.log` two folders
/// down; `**` any depth.
fn folders_of(pattern: &str) -> (PathBuf, usize) {
    let path = Path::new(pattern);
    let literal: PathBuf = path
        .components()
        .take_while(|c| !is_glob(&c.as_os_str().to_string_lossy()))
        .collect();
    if literal == path {
        let parent = path.parent().unwrap_or(Path::new("/"));
        return (parent.to_path_buf(), 0);
    }
    let rest: Vec<_> = path
        .components()
        .skip(literal.components().count())
        .collect();
    let depth = if rest.iter().any(|c| c.as_os_str() == "**") {
        usize::MAX
    } else {
        rest.len().saturating_sub(1)
    };
    (literal, depth)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_folders_of_a_pattern() {
        for (pattern, dir, depth) in [
            ("/var/log/nginx/access.log", "/var/log/nginx", 0),
            ("/var/log/nginx/*.log", "/var/log/nginx", 0),
            ("/var/log/pods/*/nginx/*.log", "/var/log/pods", 2),
            ("/var/log/**/access.log", "/var/log", usize::MAX),
        ] {
            assert_eq!(
                folders_of(pattern),
                (PathBuf::from(dir), depth),
                "{pattern}"
            );
        }
    }

    fn watching(pattern: &str) -> (FolderWatch, Waker) {
        FolderWatch::new(pattern, true, |dir, e| panic!("cannot watch {dir:?}: {e}")).unwrap()
    }

    /// Writes while the follower pauses make one wakeup; a new folder under a glob is watched.
    #[test]
    fn events_wait_for_the_follower_and_new_folders_are_watched() {
        let dir = tempfile::tempdir().unwrap();
        let pattern = format!("{}/*/app/*.log", dir.path().display());
        let (mut watch, _waker) = watching(&pattern);
        assert_eq!(watch.wait(Duration::from_millis(10)), Change::Nothing);
        std::fs::create_dir_all(dir.path().join("pod-1/app")).unwrap();
        assert_eq!(watch.wait(Duration::from_secs(5)), Change::Paths);
        // pod-1 was watched on its creation event, and app under it when found there (or on its own
        // event): a file created in it is seen.
        let log = dir.path().join("pod-1/app/a.log");
        let deadline = Instant::now() + Duration::from_secs(5);
        std::fs::write(&log, "one\n").unwrap();
        while watch.wait(Duration::from_millis(100)) != Change::Paths {
            assert!(Instant::now() < deadline, "the new file's event never came");
        }
        let mut file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        watch.pause(Instant::now() + Duration::from_millis(20));
        for _ in 0..50 {
            std::io::Write::write_all(&mut file, b"line\n").unwrap();
        }
        assert!(!watch.pause(Instant::now() + Duration::from_millis(20)));
        assert_eq!(watch.wait(Duration::from_secs(5)), Change::Data);
        assert_eq!(watch.wait(Duration::from_millis(10)), Change::Nothing);
    }

    /// A wake ends a pause and a wait at once.
    #[test]
    fn a_wake_ends_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let (mut watch, waker) = watching(&format!("{}/a.log", dir.path().display()));
        let started = Instant::now();
        waker.wake();
        assert!(watch.pause(started + Duration::from_secs(30)));
        waker.wake();
        assert_eq!(watch.wait(Duration::from_secs(30)), Change::Nothing);
        assert!(started.elapsed() < Duration::from_secs(20));
    }
}
