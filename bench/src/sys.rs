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

/// CPU time (user + system) of process `pid` (`None`: this process) in
/// seconds, from `/proc/PID/stat` (clock ticks of 1/100 s, Linux's USER_HZ).
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = pid.map_or_else(|| "/proc/self/stat".to_string(), |p| format!("/proc/{p}/stat"));
    let text = std::fs::read_to_string(path).ok()?;
    parse_stat_cpu(&text)
}

/// `utime + stime` of a `/proc/PID/stat` line, in seconds. The command name
/// (field 2) may hold spaces, so fields are counted after its closing `)`.
fn parse_stat_cpu(text: &str) -> Option<f64> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11); // state is field 3; utime is 14
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// Busy and total CPU time of the whole machine in seconds (the `cpu` line
/// of `/proc/stat`; idle and iowait count as not busy).
pub fn machine_cpu_seconds() -> Option<(f64, f64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    parse_proc_stat(&text)
}

fn parse_proc_stat(text: &str) -> Option<(f64, f64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if v.len() < 5 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v[4];
    Some(((total - idle) as f64 / 100.0, total as f64 / 100.0))
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
    fn cpu_times_parse() {
        let stat = "4242 (rim node x) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 1 1 1";
        assert_eq!(parse_stat_cpu(stat), Some(3.0));
        assert_eq!(parse_stat_cpu("garbage"), None);
        let proc_stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\n";
        assert_eq!(parse_proc_stat(proc_stat), Some((1.5, 10.0)));
        assert!(cpu_seconds(None).is_some());
        let (busy, total) = machine_cpu_seconds().expect("/proc/stat");
        assert!(busy <= total);
    }

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
