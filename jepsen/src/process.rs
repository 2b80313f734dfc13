//! One OS process under the harness's control ([`Proc`]): spawned in its own
//! process group under a tiny `sh` watchdog (it SIGKILLs the process when
//! the harness's end of its stdin pipe closes, so nothing outlives a harness
//! that dies without unwinding), its stdout and stderr appended to a log
//! file with a header per run; signals go to the whole group through the
//! `kill` command (no `unsafe`, no libc). Plus [`http_get`], the minimal
//! HTTP client used for `/healthz` and `/metrics`.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::{Error, Result, io_err};

/// The last `n` lines of a file (or why it cannot be read).
pub fn tail(path: &Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// Sends `sig` (`KILL`, `STOP`, `CONT`, `TERM`) to process group `pgid`.
pub fn signal_group(pgid: u32, sig: &str) -> Result<()> {
    signal(&format!("-{pgid}"), sig)
}

/// Sends `sig` to `target` (a pid, or `-pgid`) with the `kill` command.
fn signal(target: &str, sig: &str) -> Result<()> {
    let what = format!("kill -s {sig} -- {target}");
    let status = Command::new("kill")
        .args(["-s", sig, "--", target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(io_err(what.clone()))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Io { what, source: std::io::Error::other(format!("exited with {status}")) })
    }
}

/// The watchdog: runs `"$@"` in the background, SIGKILLs it when stdin
/// (the harness's pipe) reaches EOF, forwards SIGTERM to it, and exits
/// with its status. A background list's stdin is /dev/null unless
/// redirected, hence fd 3.
const WATCHDOG: &str = r#"exec 3<&0
"$@" </dev/null 3<&- &
child=$!
( read -r line <&3; kill -9 "$child" 2>/dev/null ) &
exec 3<&-
trap 'kill -TERM "$child" 2>/dev/null' TERM
wait "$child"; st=$?
while kill -0 "$child" 2>/dev/null; do wait "$child"; st=$?; done
exit $st
"#;

/// One process (running or not) with its log file, in its own process group.
#[derive(Debug)]
pub struct Proc {
    pub(crate) name: String,
    bin: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    guard: Option<ChildStdin>,
    exited: Option<ExitStatus>,
    paused: bool,
    /// Spawns so far (the log header numbers runs).
    pub(crate) runs: u32,
}

impl Proc {
    /// A process description; nothing is started yet.
    pub fn new(name: &str, bin: &Path, args: Vec<String>, env: Vec<(String, String)>, log: PathBuf) -> Proc {
        Proc {
            name: name.into(),
            bin: bin.to_path_buf(),
            args,
            env,
            log,
            child: None,
            guard: None,
            exited: None,
            paused: false,
            runs: 0,
        }
    }

    /// `node 2`, `gateway`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The log file (stdout and stderr of every run, appended).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log, n)
    }

    /// The command-line arguments after the binary.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Starts the process (no inherited `RIM_*` variables), with the same
    /// arguments as any earlier run.
    pub fn spawn(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        self.runs += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(io_err(format!("opening {}", self.log.display())))?;
        let _ = writeln!(
            log,
            "===== run {} of {}: {} {} =====",
            self.runs,
            self.name,
            self.bin.display(),
            self.args.join(" ")
        );
        let err = log.try_clone().map_err(io_err("cloning the log handle"))?;
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(WATCHDOG).arg("rim-watchdog").arg(&self.bin).args(&self.args);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("RIM_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.env("NO_COLOR", "1").stdin(Stdio::piped()).stdout(Stdio::from(log)).stderr(Stdio::from(err));
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().map_err(io_err(format!("spawning {}", self.name)))?;
        self.guard = child.stdin.take();
        self.child = Some(child);
        self.exited = None;
        self.paused = false;
        Ok(())
    }

    /// The process group id (the watchdog's pid) while running.
    pub fn pgid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is running (paused counts as running); reaps
    /// it if it exited on its own.
    pub fn is_running(&mut self) -> bool {
        self.check().is_ok() && self.child.is_some()
    }

    /// Whether it is paused by [`Proc::pause`].
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// How the last run ended, if it exited on its own.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.exited
    }

    /// An error if the process exited on its own (it is then reaped).
    pub fn check(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            let _ = self.kill_group();
            self.child = None;
            self.guard = None;
            self.exited = Some(status);
        }
        match self.exited {
            Some(status) if self.child.is_none() => {
                Err(Error::Exited { name: self.name.clone(), status, log_tail: self.log_tail(40) })
            }
            _ => Ok(()),
        }
    }

    fn kill_group(&self) -> Result<()> {
        match self.pgid() {
            Some(pg) => signal_group(pg, "KILL"),
            None => Ok(()),
        }
    }

    /// SIGKILL to the process group, then reap. A no-op when not running.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = signal_group(c.id(), "KILL");
            self.guard = None;
            let _ = c.kill();
            let _ = c.wait();
        }
        self.paused = false;
        self.exited = None;
    }

    /// SIGTERM (a graceful stop), then SIGKILL if it is still running
    /// after `grace`. Returns the exit status if it stopped by itself.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        let c = self.child.as_mut()?;
        if self.paused {
            let _ = signal_group(c.id(), "CONT");
        }
        // To the watchdog only, which forwards it to the process.
        let _ = signal(&c.id().to_string(), "TERM");
        let deadline = Instant::now() + grace;
        let mut status = None;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = c.try_wait() {
                status = Some(s);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        status
    }

    /// SIGSTOP to the process group.
    pub fn pause(&mut self) -> Result<()> {
        self.check()?;
        let pg = self.pgid().ok_or_else(|| Error::NotRunning(self.name.clone()))?;
        signal_group(pg, "STOP")?;
        self.paused = true;
        Ok(())
    }

    /// SIGCONT to the process group.
    pub fn resume(&mut self) -> Result<()> {
        let pg = self.pgid().ok_or_else(|| Error::NotRunning(self.name.clone()))?;
        signal_group(pg, "CONT")?;
        self.paused = false;
        Ok(())
    }

    /// Polls `http://{addr}{path}` until it answers 200, the process exits,
    /// or `timeout` passes.
    pub async fn wait_http_ok(&mut self, addr: SocketAddr, path: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check()?;
            if self.child.is_none() {
                return Err(Error::NotRunning(self.name.clone()));
            }
            let last = match http_get(addr, path, Duration::from_secs(2)).await {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => format!("{code} {}", body.trim()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(Error::Unhealthy {
                    name: self.name.clone(),
                    within: timeout,
                    last,
                    log_tail: self.log_tail(40),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A minimal HTTP/1.0 GET with a deadline: (status, body).
pub async fn http_get(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> std::result::Result<(u16, String), String> {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        Ok::<_, String>(String::from_utf8_lossy(&buf).into_owned())
    };
    let text = tokio::time::timeout(timeout, io).await.map_err(|_| "timeout".to_string())??;
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("bad response {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}
