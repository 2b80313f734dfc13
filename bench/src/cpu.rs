//! Where the CPU went during a measured window: CPU seconds of every
//! process of the run (the spawned nodes and gateway, and the bench
//! itself) and of the whole machine, read from `/proc` at the window's
//! start and end.
//!
//! Divided by the messages of the window this gives CPU microseconds per
//! message per process: the cost model behind a throughput ceiling. On a
//! machine whose cores are all busy, `cores / total µs per message` is the
//! most the cluster can do, whatever the latency bound.

use super::json::Json;
use super::sys;
use super::target::Target;

/// The processes to account for.
pub struct CpuMeter {
    /// Name and PID (`None`: the bench itself).
    procs: Vec<(String, Option<u32>)>,
}

/// CPU seconds at one instant.
pub struct CpuSample {
    procs: Vec<Option<f64>>,
    machine: Option<(f64, f64)>,
}

impl CpuMeter {
    /// The spawned children (or the given gateway) and the bench.
    pub fn new(target: &Target) -> CpuMeter {
        let mut procs: Vec<(String, Option<u32>)> = match &target.spawned {
            Some(sp) => sp.pids().into_iter().map(|(n, p)| (n, Some(p))).collect(),
            None => target.gateway_pid.map(|p| ("gateway".to_string(), Some(p))).into_iter().collect(),
        };
        procs.push(("bench".to_string(), None));
        CpuMeter { procs }
    }

    /// Reads the counters now.
    pub fn sample(&self) -> CpuSample {
        CpuSample {
            procs: self.procs.iter().map(|(_, pid)| sys::cpu_seconds(*pid)).collect(),
            machine: sys::machine_cpu_seconds(),
        }
    }

    /// The use between two samples `secs` apart, per message of `messages`:
    /// the JSON figures and a short line for the summary.
    pub fn used(&self, a: &CpuSample, b: &CpuSample, secs: f64, messages: u64) -> (Json, String) {
        let per_msg =
            |cpu: f64| if messages == 0 { Json::Null } else { Json::from(cpu * 1e6 / messages as f64) };
        let mut procs = Json::obj();
        let mut sum = 0.0;
        let mut parts = Vec::new();
        for (i, (name, _)) in self.procs.iter().enumerate() {
            let (Some(x), Some(y)) = (a.procs[i], b.procs[i]) else { continue };
            let cpu = (y - x).max(0.0);
            sum += cpu;
            if messages > 0 {
                parts.push(format!("{name} {:.0}", cpu * 1e6 / messages as f64));
            }
            procs.set(
                name,
                Json::obj()
                    .with("cpu_seconds", cpu)
                    .with("cores", cpu / secs)
                    .with("cpu_us_per_message", per_msg(cpu)),
            );
        }
        let mut busy = None;
        let machine = match (a.machine, b.machine) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                busy = Some((b1 - b0) / (t1 - t0));
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
                Json::obj()
                    .with("busy_fraction", (b1 - b0) / (t1 - t0))
                    .with("busy_cores", (b1 - b0) / (t1 - t0) * cores)
            }
            _ => Json::Null,
        };
        let line = match (messages, busy) {
            (0, _) => "CPU: no messages".to_string(),
            (m, busy) => format!(
                "CPU {:.0} µs/msg ({}), machine busy {}",
                sum * 1e6 / m as f64,
                parts.join(", "),
                busy.map_or("?".to_string(), |b| format!("{:.0}%", b * 100.0))
            ),
        };
        let json = Json::obj()
            .with("window_seconds", secs)
            .with("messages", messages)
            .with("processes", procs)
            .with("run_cpu_seconds", sum)
            .with("run_cpu_us_per_message", per_msg(sum))
            .with("machine", machine);
        (json, line)
    }
}
