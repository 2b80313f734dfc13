//! Facts about processes and the machine, read from `/proc`, plus the small
//! parsing helpers the flags need.

use std::path::Path;
use std::time::Duration;

use super::json::Json;

/// Resident set size of process `pid` in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(&format!("/proc/{pid}/status"), "VmRSS:")
}

/// Resident set size of this process in KiB.
pub fn self_rss_kib() -> Option<u64> {
    status_kib("/proc/self/status", "VmRSS:")
}

/// A `Key:   1234 kB` line of a `/proc` file, in KiB.
fn status_kib(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    kib_field(&text, key)
}

fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// A `/proc/meminfo` entry in KiB (e.g. `"MemTotal:"`, `"Slab:"`).
pub fn meminfo_kib(key: &str) -> Option<u64> {
    status_kib("/proc/meminfo", key)
}

/// Soft and hard `RLIMIT_NOFILE` of process `pid` (`None` for this process).
pub fn nofile_limits(pid: Option<u32>) -> Option<(u64, u64)> {
    let path = pid.map_or_else(|| "/proc/self/limits".to_string(), |p| format!("/proc/{p}/limits"));
    let text = std::fs::read_to_string(path).ok()?;
    parse_nofile(&text)
}

fn parse_nofile(limits: &str) -> Option<(u64, u64)> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut it = line["Max open files".len()..].split_whitespace();
    let num = |s: Option<&str>| s.map(|s| if s == "unlimited" { u64::MAX } else { s.parse().unwrap_or(0) });
    Some((num(it.next())?, num(it.next())?))
}

/// Fails with a clear message unless this process may open `need` descriptors.
pub fn check_nofile(need: u64, who: &str) -> anyhow::Result<()> {
    let Some((soft, hard)) = nofile_limits(None) else { return Ok(()) };
    if soft < need {
        anyhow::bail!(
            "the open-file limit (`ulimit -n`) is {soft} (hard limit {hard}), but {who} need about {need} \
             descriptors. Raise it in this shell first, e.g. `ulimit -n {need}` (above the hard limit only \
             as root); a spawned gateway inherits it."
        );
    }
    Ok(())
}

/// Machine facts for the result file.
pub fn machine() -> Json {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|t| {
        t.lines().find_map(|l| {
            l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
        })
    });
    Json::obj()
        .with("cores", std::thread::available_parallelism().map(|n| n.get()).ok())
        .with("mem_total_bytes", meminfo_kib("MemTotal:").map(|k| k * 1024))
        .with("cpu_model", cpu)
        .with("kernel", read_trimmed("/proc/sys/kernel/osrelease"))
        .with("loadavg", loadavg())
}

/// The 1-minute load average (the machine is shared: record how busy it was).
pub fn loadavg() -> Option<f64> {
    read_trimmed("/proc/loadavg")?.split_whitespace().next()?.parse().ok()
}

fn read_trimmed(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// `git rev-parse --short HEAD` of the working directory (else of the
/// source tree this binary was built from), with `-dirty` if tracked files
/// have changes; `None` if neither is a repository.
pub fn git_revision() -> Option<String> {
    git_revision_in(".").or_else(|| git_revision_in(env!("CARGO_MANIFEST_DIR")))
}

fn git_revision_in(dir: &str) -> Option<String> {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let rev = run(&["rev-parse", "--short", "HEAD"])?;
    let dirty = run(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty { format!("{rev}-dirty") } else { rev })
}

/// The build profile of this binary.
pub fn build_profile() -> &'static str {
    if cfg!(debug_assertions) { "dev (debug assertions on)" } else { "release" }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Parses `500ms`, `10s`, `2m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&s[..i], s[i..].trim()),
        None => (s, "s"),
    };
    let v: f64 = num.parse().map_err(|_| format!("bad duration {s:?} (e.g. 500ms, 10s, 2m)"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s or m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("bad duration {s:?}: {e}"))
}

/// KiB as MiB.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_text() {
        let status = "Name:\trim\nVmHWM:\t  9000 kB\nVmRSS:\t   12345 kB\nThreads: 4\n";
        assert_eq!(kib_field(status, "VmRSS:"), Some(12345));
        assert_eq!(kib_field(status, "VmSwap:"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            20000                unlimited            files     \n";
        assert_eq!(parse_nofile(limits), Some((20000, u64::MAX)));
    }

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("10h").is_err());
        assert!(parse_duration("abc").is_err());
    }
}
