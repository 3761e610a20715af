//! A real NGINX (Debian's package) for the end-to-end tests: started on a loopback port with a
//! configuration of the test's, stopped with everything it started.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

/// A running NGINX. Its master leads a process group of its own, so that stopping it reaches its
/// workers too: a SIGKILL to the master alone leaves them running.
pub struct Nginx {
    pub child: Child,
    pub port: u16,
    pub access_log: PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            // A second panic while unwinding would abort the test binary and hide the first one.
            if std::thread::panicking() {
                eprintln!("{e}");
            } else {
                panic!("{e}");
            }
        }
    }
}

impl Nginx {
    /// NGINX serving the API the tests call: a status per path.
    pub fn start(binary: &Path, dir: &Path) -> Nginx {
        Nginx::start_with(
            binary,
            dir,
            "listen 127.0.0.1:{port};
        location /ok { return 200 \"ok\\n\"; }
        location /created { return 201 \"created\\n\"; }
        location /forbidden { return 403; }
        location /error { return 500; }
        location /unavailable { return 503; }
        location / { return 404; }",
        )
    }

    /// NGINX with `server` as its one server block (`{port}` stands for its port).
    pub fn start_with(binary: &Path, dir: &Path, server: &str) -> Nginx {
        Nginx::start_logging(binary, dir, server, "combined", "")
    }

    /// The API's NGINX, writing its access log in `format` (a name; `log_format` defines it, with
    /// `{d}` for the folder).
    pub fn start_logging(
        binary: &Path,
        dir: &Path,
        server: &str,
        format: &str,
        log_format: &str,
    ) -> Nginx {
        Nginx::start_logging_to(
            binary,
            dir,
            &dir.join("access.log"),
            server,
            format,
            log_format,
        )
    }

    /// The same, writing its access log to `access_log` (its other files stay in `dir`).
    pub fn start_logging_to(
        binary: &Path,
        dir: &Path,
        access_log: &Path,
        server: &str,
        format: &str,
        log_format: &str,
    ) -> Nginx {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = server.replace("{port}", &port.to_string());
        let d = dir.display();
        let log_format = log_format.replace("{d}", &d.to_string());
        let access_log = access_log.to_path_buf();
        let a = access_log.display();
        let conf = format!(
            r#"daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    {log_format}
    access_log {a} {format};
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        {server}
    }}
}}
"#
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut command = Command::new(binary);
        command
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("nginx.stderr")).expect("nginx.stderr file"))
            .process_group(0);
        // Out of the terminal's process group, NGINX no longer gets its Ctrl-C: should the test
        // process die without running Drop, the master gets SIGQUIT, which stops its workers.
        // (The signal follows the thread that spawns it: the test's, which outlives this value.)
        // SAFETY: prctl is async-signal-safe and touches nothing of the parent's memory.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("start nginx");
        let nginx = Nginx {
            child,
            port,
            access_log,
        };
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on {port}: {}",
                std::fs::read_to_string(dir.join("nginx.stderr")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        nginx
    }

    /// Stops NGINX as `nginx -s quit` does (SIGQUIT: the master lets its workers finish and waits
    /// for them), then SIGKILLs whatever is left of its process group and checks that none of it
    /// remains. An error if the graceful stop took longer than WAIT or a process survived.
    pub fn stop(&mut self) -> Result<(), String> {
        let pgid = libc::pid_t::try_from(self.child.id()).expect("a pid fits pid_t");
        // SAFETY: kill has no memory effects.
        unsafe { libc::kill(pgid, libc::SIGQUIT) };
        // An error here still goes on to the SIGKILL, so that nothing is left in any case.
        let exited = wait_for_exit_unreaped(pgid, WAIT);
        // The master is a zombie now (or still running): until it is reaped its pid, which is the
        // group's id, cannot be reused, so this reaches only what NGINX started (workers of a
        // master that did not stop in time, or that died without stopping them).
        // SAFETY: as above; ESRCH (nothing left) is the expected case.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        self.child
            .wait()
            .map_err(|e| format!("cannot reap nginx (pid {pgid}): {e}"))?;
        // Workers orphaned by the SIGKILL are reaped by init, not at once: poll.
        let deadline = Instant::now() + WAIT;
        loop {
            // SAFETY: signal 0 only checks that a process of the group exists.
            if unsafe { libc::kill(-pgid, 0) } == -1 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ESRCH) {
                    break;
                }
                return Err(format!("cannot check nginx's process group {pgid}: {e}"));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "processes of nginx's group {pgid} are still there {WAIT:?} after SIGKILL"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !exited? {
            return Err(format!(
                "nginx (pid {pgid}) did not stop within {WAIT:?} of SIGQUIT; it was killed"
            ));
        }
        Ok(())
    }

    /// Sends one GET and returns the status NGINX answered.
    pub fn get(&self, target: &str) -> u16 {
        self.get_with(target, &[])
    }

    /// Sends one GET with extra request `headers` and returns the status NGINX answered.
    pub fn get_with(&self, target: &str, headers: &[(&str, &str)]) -> u16 {
        self.get_from("api.test", target, headers)
    }

    /// The same, for the server name `host`.
    pub fn get_from(&self, host: &str, target: &str, headers: &[(&str, &str)]) -> u16 {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let extra: String = headers
            .iter()
            .map(|(name, value)| format!("{name}: {value}\r\n"))
            .collect();
        write!(s, "GET {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tally-e2e \"quoted\"\r\n{extra}Connection: close\r\n\r\n").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer[9..12].parse().unwrap()
    }
}

/// Polls until child `pid` has exited, leaving it unreaped (a zombie), or `timeout` passes. True if
/// it exited.
fn wait_for_exit_unreaped(pid: libc::pid_t, timeout: Duration) -> Result<bool, String> {
    let deadline = Instant::now() + timeout;
    loop {
        // SAFETY: siginfo_t is plain data; waitid writes to it only.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
        // SAFETY: `info` is a valid siginfo_t.
        if unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) } == -1 {
            let e = std::io::Error::last_os_error();
            return Err(format!("cannot wait for nginx (pid {pid}): {e}"));
        }
        // With WNOHANG, si_pid stays 0 while the child runs.
        // SAFETY: waitid filled `info` in (or left it zeroed).
        if unsafe { info.si_pid() } != 0 {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The nginx binary, or None (and a message) when the test should be skipped.
pub fn nginx_or_skip(test: &str) -> Option<PathBuf> {
    super::program_or_skip(
        test,
        "nginx",
        &["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"],
        "TALLY_REQUIRE_NGINX",
    )
}
