//! The nemesis (`reference/jepsen.md` §6.2 item 3): a seeded schedule of
//! faults applied to the real cluster and logged into the history.
//!
//! The schedule alternates a quiet period and one fault, each lasting
//! 0.5-1.5 × `interval` (drawn from the seed), so the cluster is healthy
//! about half of the time and faults never pile up. Faults:
//!
//! * `partition`: a grudge over the proxy mesh, black-holing (`hold`) or, one
//!   time in four, resetting the links: isolate one node, isolate the
//!   current leader of a shard, halves, majorities ring, bridge, one-way
//!   (requests arrive, answers are lost);
//! * `kill`: SIGKILL one node, the leader of a shard, a majority, or every
//!   node, and start them again from their data dirs when the fault ends;
//! * `pause`: SIGSTOP one node, a leader or a majority; SIGCONT at the end;
//! * `clock`: shift one or more nodes' wall clocks by up to ±5 minutes
//!   through libfaketime (monotonic clocks are never faked).
//!
//! Each fault is an `info` op of process `nemesis`: `start-<fault>` with
//! the targets when applied, `stop-<fault>` when undone. The final phase
//! ([`final_phase`]) heals the network, resumes and restarts every node,
//! resets clocks, logs `final-heal`, waits until every node and the gateway
//! report healthy (logging `recovered`, or `recovery-failed` with why).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::sync::{Mutex, watch};

use crate::control::{Cluster, GatewayProcess};
use crate::history::{OpBody, OpType, Process};
use crate::proxy::{Grudge, Mode, grudge};
use crate::recorder::Recorder;

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fault {
    /// Network partitions through the proxies.
    Partition,
    /// SIGKILL and restart.
    Kill,
    /// SIGSTOP and SIGCONT.
    Pause,
    /// Wall-clock offsets (libfaketime).
    Clock,
}

impl Fault {
    /// The name used in `--nemesis` and in `start-<name>`.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Partition => "partition",
            Fault::Kill => "kill",
            Fault::Pause => "pause",
            Fault::Clock => "clock",
        }
    }

    /// Parses `partition,kill,...` (`none` or empty: no faults).
    pub fn parse_list(s: &str) -> Result<Vec<Fault>, String> {
        let mut out = BTreeSet::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty() && *p != "none") {
            out.insert(match part {
                "partition" => Fault::Partition,
                "kill" => Fault::Kill,
                "pause" => Fault::Pause,
                "clock" => Fault::Clock,
                "all" => {
                    out.extend([Fault::Partition, Fault::Kill, Fault::Pause, Fault::Clock]);
                    continue;
                }
                other => {
                    return Err(format!("unknown nemesis {other:?} (partition, kill, pause, clock, all)"));
                }
            });
        }
        Ok(out.into_iter().collect())
    }
}

/// Which nodes a kill or pause hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// A random node.
    One,
    /// The leader of a random shard (a random node if none is known).
    Leader,
    /// A random majority.
    Majority,
    /// Every node.
    All,
}

/// Partition shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    /// One random node alone.
    Isolate,
    /// The leader of a random shard alone.
    IsolateLeader,
    /// Minority half against majority half.
    Halves,
    /// Every node sees a different majority.
    MajoritiesRing,
    /// Two halves joined by one node.
    Bridge,
    /// One-way: node `a` drops everything from node `b`, so `a`'s requests
    /// to `b` arrive and take effect but their answers never come back.
    OneWay,
}

/// Nemesis settings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NemesisOptions {
    /// Faults to draw from (empty: the nemesis only waits).
    pub faults: Vec<Fault>,
    /// Mean length of a quiet period and of a fault.
    pub interval: Duration,
    /// Seed of the schedule.
    pub seed: u64,
    /// Restrict partitions to these shapes (empty: all).
    pub shapes: Vec<Shape>,
    /// Restrict kills and pauses to these targets (empty: the default mix).
    pub targets: Vec<Target>,
}

/// A fault in effect, to be undone.
enum Active {
    Partition,
    Kill(Vec<u64>),
    Pause(Vec<u64>),
    Clock(Vec<u64>),
}

/// Runs the schedule until `stop` turns true, undoing the fault in effect
/// before returning.
pub async fn run(
    cluster: Arc<Mutex<Cluster>>,
    recorder: Arc<Recorder>,
    opts: NemesisOptions,
    mut stop: watch::Receiver<bool>,
) {
    let mut rng = StdRng::seed_from_u64(opts.seed);
    if opts.faults.is_empty() {
        let _ = stop.wait_for(|s| *s).await;
        return;
    }
    loop {
        if sleep_or_stop(&mut stop, period(&mut rng, opts.interval)).await {
            return;
        }
        let fault = opts.faults[rng.gen_range(0..opts.faults.len())];
        let active = {
            let mut c = cluster.lock().await;
            apply(&mut c, &recorder, &opts, fault, &mut rng).await
        };
        let stopped = sleep_or_stop(&mut stop, period(&mut rng, opts.interval)).await;
        if let Some(active) = active {
            let mut c = cluster.lock().await;
            undo(&mut c, &recorder, active);
        }
        if stopped {
            return;
        }
    }
}

/// 0.5-1.5 × `interval`.
fn period(rng: &mut StdRng, interval: Duration) -> Duration {
    interval.mul_f64(rng.gen_range(0.5..1.5))
}

/// Sleeps `d`; true if `stop` turned true first.
async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = stop.wait_for(|s| *s) => return true,
    }
    *stop.borrow()
}

fn log(recorder: &Recorder, f: &str, value: Value) {
    recorder.record(OpType::Info, Process::nemesis(), OpBody::Other { f: f.into(), value }, None, None);
}

/// The leaders of every group any running node leads, as `(group, node)`.
async fn leaders(c: &mut Cluster) -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    for id in c.ids() {
        let n = c.node_mut(id);
        if !n.is_running() || n.proc().is_paused() {
            continue;
        }
        if let Ok(groups) = n.raft().await {
            out.extend(groups.iter().filter(|(_, g)| g.is_leader).map(|(group, _)| (*group, id)));
        }
    }
    out
}

async fn pick_targets(c: &mut Cluster, opts: &NemesisOptions, rng: &mut StdRng) -> (Target, Vec<u64>) {
    let ids = c.ids();
    let target = if opts.targets.is_empty() {
        match rng.gen_range(0..10) {
            0..=4 => Target::One,
            5..=7 => Target::Leader,
            8 => Target::Majority,
            _ => Target::All,
        }
    } else {
        opts.targets[rng.gen_range(0..opts.targets.len())]
    };
    let mut shuffled = ids.clone();
    shuffled.shuffle(rng);
    let nodes = match target {
        Target::One => vec![shuffled[0]],
        Target::Leader => {
            let l = leaders(c).await;
            match l.choose(rng) {
                Some((_, node)) => vec![*node],
                None => vec![shuffled[0]],
            }
        }
        Target::Majority => shuffled[..ids.len() / 2 + 1].to_vec(),
        Target::All => ids,
    };
    (target, nodes)
}

async fn apply(
    c: &mut Cluster,
    recorder: &Recorder,
    opts: &NemesisOptions,
    fault: Fault,
    rng: &mut StdRng,
) -> Option<Active> {
    match fault {
        Fault::Partition => {
            let mesh_nodes = c.mesh()?.nodes();
            let shapes = if opts.shapes.is_empty() {
                vec![
                    Shape::Isolate,
                    Shape::IsolateLeader,
                    Shape::Halves,
                    Shape::MajoritiesRing,
                    Shape::Bridge,
                    Shape::OneWay,
                ]
            } else {
                opts.shapes.clone()
            };
            let shape = shapes[rng.gen_range(0..shapes.len())];
            let mut order = mesh_nodes.clone();
            order.shuffle(rng);
            let grudge: Grudge = match shape {
                Shape::Isolate => grudge::isolate(&mesh_nodes, order[0]),
                Shape::IsolateLeader => {
                    let l = leaders(c).await;
                    let node = l.choose(rng).map_or(order[0], |(_, n)| *n);
                    grudge::isolate(&mesh_nodes, node)
                }
                Shape::Halves => grudge::halves(&order),
                Shape::MajoritiesRing => grudge::majorities_ring(&order),
                Shape::Bridge => grudge::bridge(&order),
                Shape::OneWay if order.len() >= 2 => [(order[0], [order[1]].into())].into(),
                Shape::OneWay => Grudge::new(),
            };
            // A reset cuts a link both ways: a one-way partition holds.
            let reset = shape != Shape::OneWay && rng.gen_range(0..4) == 0;
            let mode = if reset { Mode::Reset } else { Mode::Hold };
            c.mesh()?.partition(&grudge, mode);
            let value = json!({
                "shape": shape,
                "mode": if reset { "reset" } else { "hold" },
                "grudge": grudge.iter().map(|(d, s)| (d.to_string(), json!(s))).collect::<serde_json::Map<_, _>>(),
            });
            log(recorder, "start-partition", value);
            Some(Active::Partition)
        }
        Fault::Kill => {
            let (target, nodes) = pick_targets(c, opts, rng).await;
            for &n in &nodes {
                c.kill(n);
            }
            log(recorder, "start-kill", json!({ "target": target, "nodes": nodes }));
            Some(Active::Kill(nodes))
        }
        Fault::Pause => {
            let (mut target, mut nodes) = pick_targets(c, opts, rng).await;
            if target == Target::All {
                // Pausing everyone only stops time; take a majority instead.
                nodes.truncate(nodes.len() / 2 + 1);
                target = Target::Majority;
            }
            let mut paused = Vec::new();
            for &n in &nodes {
                if c.pause(n).is_ok() {
                    paused.push(n);
                }
            }
            log(recorder, "start-pause", json!({ "target": target, "nodes": paused }));
            Some(Active::Pause(paused))
        }
        Fault::Clock => {
            let mut ids = c.ids();
            ids.shuffle(rng);
            let count = rng.gen_range(1..=ids.len());
            let mut offsets = serde_json::Map::new();
            let mut shifted = Vec::new();
            for &n in &ids[..count] {
                let offset: i64 = rng.gen_range(-300..=300);
                if c.set_clock_offset(n, offset).is_ok() {
                    offsets.insert(n.to_string(), json!(offset));
                    shifted.push(n);
                }
            }
            log(recorder, "start-clock", json!({ "nodes": shifted, "offsets_s": offsets }));
            Some(Active::Clock(shifted))
        }
    }
}

fn undo(c: &mut Cluster, recorder: &Recorder, active: Active) {
    match active {
        Active::Partition => {
            if let Some(m) = c.mesh() {
                m.heal();
            }
            log(recorder, "stop-partition", json!({}));
        }
        Active::Kill(nodes) => {
            let mut errors = Vec::new();
            for &n in &nodes {
                if let Err(e) = c.start_node(n) {
                    errors.push(format!("node {n}: {e}"));
                }
            }
            log(recorder, "stop-kill", json!({ "nodes": nodes, "errors": errors }));
        }
        Active::Pause(nodes) => {
            for &n in &nodes {
                let _ = c.resume(n);
            }
            log(recorder, "stop-pause", json!({ "nodes": nodes }));
        }
        Active::Clock(nodes) => {
            for &n in &nodes {
                let _ = c.set_clock_offset(n, 0);
            }
            log(recorder, "stop-clock", json!({ "nodes": nodes }));
        }
    }
}

/// Heals everything, restarts every node that is down, and waits (at most
/// `timeout`) until every node and the gateway are healthy. Returns an
/// error text when recovery failed.
pub async fn final_phase(
    cluster: &Mutex<Cluster>,
    gateway: &mut GatewayProcess,
    recorder: &Recorder,
    timeout: Duration,
) -> Result<(), String> {
    let mut c = cluster.lock().await;
    if let Some(m) = c.mesh() {
        m.heal();
    }
    let mut restarted = Vec::new();
    for id in c.ids() {
        let _ = c.resume(id);
        let _ = c.set_clock_offset(id, 0);
        if !c.node_mut(id).is_running() {
            if let Err(e) = c.start_node(id) {
                return Err(format!("restarting node {id}: {e}"));
            }
            restarted.push(id);
        }
    }
    log(recorder, "final-heal", json!({ "restarted": restarted }));
    let waited = async {
        c.wait_healthy(timeout).await.map_err(|e| e.to_string())?;
        gateway.wait_healthy(timeout).await.map_err(|e| e.to_string())
    };
    match waited.await {
        Ok(()) => {
            log(recorder, "recovered", json!({}));
            Ok(())
        }
        Err(e) => {
            log(recorder, "recovery-failed", json!({ "error": e }));
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fault_lists() {
        assert_eq!(
            Fault::parse_list("partition,kill,pause").unwrap(),
            vec![Fault::Partition, Fault::Kill, Fault::Pause]
        );
        assert_eq!(Fault::parse_list("all").unwrap().len(), 4);
        assert_eq!(Fault::parse_list("kill, kill").unwrap(), vec![Fault::Kill]);
        assert!(Fault::parse_list("none").unwrap().is_empty());
        assert!(Fault::parse_list("").unwrap().is_empty());
        let e = Fault::parse_list("partition,flood").unwrap_err();
        assert!(e.contains("flood"), "{e}");
    }

    #[test]
    fn periods_stay_within_half_and_one_and_a_half_intervals() {
        let mut rng = StdRng::seed_from_u64(1);
        let interval = Duration::from_secs(4);
        for _ in 0..1000 {
            let p = period(&mut rng, interval);
            assert!(p >= Duration::from_secs(2) && p < Duration::from_secs(6), "{p:?}");
        }
    }
}
