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
//!   (requests arrive, answers are lost), and on 5 or more nodes a shard
//!   majority (two of a data shard's three voters on one side, every other
//!   node on the other);
//! * `kill`: SIGKILL one node, the leader of a shard, a majority of the
//!   cluster, every node, or on 5 or more nodes a majority of one data
//!   shard's voters, and start them again from their data dirs when the
//!   fault ends;
//! * `pause`: SIGSTOP one node, a leader, a majority of the cluster or of a
//!   shard's voters; SIGCONT at the end;
//! * `clock`: shift one or more nodes' wall clocks by up to ±5 minutes
//!   through libfaketime (monotonic clocks are never faked);
//! * `webhook`: the run's webhook receiver (the app) is killed and
//!   restarted, paused (a receiver that stops answering), or cut off from
//!   every node by its proxy (held or reset).
//!
//! On more nodes than the replication factor (3) each data shard lives on
//! its own 3 voters ([`Layout`]), so the cluster-wide shapes hit shards
//! unevenly: a majority of the cluster may hold all, some or none of a
//! shard's voters. The shard-majority target and shape aim at one shard: a
//! majority of its voters is a minority of the cluster, so that shard loses
//! its quorum (killed, paused) or keeps it only on the cluster's minority
//! side (partitioned), while the other groups keep theirs unless two of
//! their voters were hit too (`no_quorum` in the history names them). On 3 nodes every node hosts every group, so a shard majority is
//! a cluster majority and the two extras are left out of the default mix
//! (which keeps the 3-node schedules of a seed as they were).
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

use crate::control::{Cluster, GatewayProcess, Layout};
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
    /// The app's webhook receiver killed, paused (slow) or cut off from
    /// the nodes (runs with a receiver only).
    Webhook,
}

impl Fault {
    /// The name used in `--nemesis` and in `start-<name>`.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Partition => "partition",
            Fault::Kill => "kill",
            Fault::Pause => "pause",
            Fault::Clock => "clock",
            Fault::Webhook => "webhook",
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
                "webhook" => Fault::Webhook,
                "all" => {
                    out.extend([Fault::Partition, Fault::Kill, Fault::Pause, Fault::Clock, Fault::Webhook]);
                    continue;
                }
                other => {
                    return Err(format!(
                        "unknown nemesis {other:?} (partition, kill, pause, clock, webhook, all)"
                    ));
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
    /// A random majority of the cluster.
    Majority,
    /// Every node.
    All,
    /// A random majority of one random data shard's voters (2 of 3): on 5
    /// or more nodes a minority of the cluster (a cluster majority if the
    /// layout is unknown).
    ShardMajority,
}

impl Target {
    /// Every target.
    pub const ALL: [Target; 5] =
        [Target::One, Target::Leader, Target::Majority, Target::All, Target::ShardMajority];

    /// The name used in `--targets` and in the history.
    pub fn name(self) -> &'static str {
        match self {
            Target::One => "one",
            Target::Leader => "leader",
            Target::Majority => "majority",
            Target::All => "all",
            Target::ShardMajority => "shard-majority",
        }
    }

    /// Parses `one,shard-majority,...` (empty: the default mix).
    pub fn parse_list(s: &str) -> Result<Vec<Target>, String> {
        parse_names(s, &Target::ALL, Target::name, "target")
    }
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
    /// A random majority of one random data shard's voters on one side,
    /// every other node on the other: the shard keeps a quorum only on the
    /// cluster's minority side (on 3 nodes: one node alone).
    ShardMajority,
}

impl Shape {
    /// Every shape, in the order of the default mix.
    pub const ALL: [Shape; 7] = [
        Shape::Isolate,
        Shape::IsolateLeader,
        Shape::Halves,
        Shape::MajoritiesRing,
        Shape::Bridge,
        Shape::OneWay,
        Shape::ShardMajority,
    ];

    /// The name used in `--shapes` and in the history.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Isolate => "isolate",
            Shape::IsolateLeader => "isolate-leader",
            Shape::Halves => "halves",
            Shape::MajoritiesRing => "majorities-ring",
            Shape::Bridge => "bridge",
            Shape::OneWay => "one-way",
            Shape::ShardMajority => "shard-majority",
        }
    }

    /// Parses `halves,bridge,...` (empty: the default mix).
    pub fn parse_list(s: &str) -> Result<Vec<Shape>, String> {
        parse_names(s, &Shape::ALL, Shape::name, "shape")
    }
}

/// Parses a comma-separated list of `all`'s names, keeping `all`'s order.
fn parse_names<T: Copy + PartialEq>(
    s: &str,
    all: &[T],
    name: fn(T) -> &'static str,
    what: &str,
) -> Result<Vec<T>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some(t) = all.iter().copied().find(|t| name(*t) == part) else {
            let names: Vec<&str> = all.iter().map(|t| name(*t)).collect();
            return Err(format!("unknown {what} {part:?} ({})", names.join(", ")));
        };
        if !out.contains(&t) {
            out.push(t);
        }
    }
    out.sort_by_key(|t| all.iter().position(|a| a == t));
    Ok(out)
}

/// Cluster size from which the default mixes include the shard-majority
/// target and shape (below it a shard majority is not a cluster minority).
pub const SHARD_MAJORITY_MIN_NODES: usize = 5;

/// The default kill and pause targets for a cluster of `nodes`, with their
/// weights. The mix of smaller clusters is the one 3-node runs always had.
pub fn target_mix(nodes: usize) -> &'static [(Target, u32)] {
    if nodes >= SHARD_MAJORITY_MIN_NODES {
        &[
            (Target::One, 3),
            (Target::Leader, 3),
            (Target::ShardMajority, 2),
            (Target::Majority, 1),
            (Target::All, 1),
        ]
    } else {
        &[(Target::One, 5), (Target::Leader, 3), (Target::Majority, 1), (Target::All, 1)]
    }
}

/// The default partition shapes for a cluster of `nodes`, equally likely:
/// all of them, the shard majority only from [`SHARD_MAJORITY_MIN_NODES`].
pub fn shape_mix(nodes: usize) -> Vec<Shape> {
    Shape::ALL
        .into_iter()
        .filter(|s| *s != Shape::ShardMajority || nodes >= SHARD_MAJORITY_MIN_NODES)
        .collect()
}

/// Draws from `mix` by weight.
fn draw<T: Copy>(mix: &[(T, u32)], rng: &mut impl Rng) -> T {
    let total: u32 = mix.iter().map(|(_, w)| w).sum();
    let mut r = rng.gen_range(0..total);
    for &(t, w) in mix {
        if r < w {
            return t;
        }
        r -= w;
    }
    unreachable!("r < total")
}

/// A majority of one data shard's voters: a random data shard of `layout`
/// (never the meta group) and ⌊v/2⌋+1 of its `v` voters, at random, as
/// `(shard, voters, chosen)` with the nodes ascending. `None` when the
/// layout lists no data shard.
pub fn shard_majority(layout: &Layout, rng: &mut impl Rng) -> Option<(u32, Vec<u64>, Vec<u64>)> {
    let shards: Vec<(u32, &[u64])> = layout.data_shards().filter(|(_, v)| !v.is_empty()).collect();
    let &(shard, voters) = shards.choose(rng)?;
    let mut chosen = voters.to_vec();
    chosen.shuffle(rng);
    chosen.truncate(voters.len() / 2 + 1);
    chosen.sort_unstable();
    Some((shard, voters.to_vec(), chosen))
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
    Webhook,
}

/// Runs the schedule until `stop` turns true, undoing the fault in effect
/// before returning. `layout` is read once at set-up: the workload never
/// changes membership, so every group keeps its voters for the whole run.
pub async fn run(
    cluster: Arc<Mutex<Cluster>>,
    recorder: Arc<Recorder>,
    opts: NemesisOptions,
    layout: Layout,
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
            apply(&mut c, &recorder, &opts, &layout, fault, &mut rng).await
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

/// The nodes a kill or pause hits, and why.
struct Pick {
    target: Target,
    nodes: Vec<u64>,
    /// For [`Target::ShardMajority`]: the shard and all its voters.
    shard: Option<(u32, Vec<u64>)>,
}

impl Pick {
    /// The history value of the fault on `nodes`: the target, the nodes,
    /// the aimed-at shard and its voters, and every group left without a
    /// quorum (when the layout is known).
    fn value(&self, nodes: &[u64], layout: &Layout) -> Value {
        let mut v = json!({ "target": self.target, "nodes": nodes });
        if let Some((shard, voters)) = &self.shard {
            v["shard"] = json!(shard);
            v["voters"] = json!(voters);
        }
        if !layout.voters.is_empty() {
            v["no_quorum"] = json!(layout.without_quorum(nodes));
        }
        v
    }
}

/// Draws a kill or pause target. With `pausing`, [`Target::All`] becomes
/// a random majority (pausing everyone only stops time).
async fn pick_targets(
    c: &mut Cluster,
    opts: &NemesisOptions,
    layout: &Layout,
    pausing: bool,
    rng: &mut StdRng,
) -> Pick {
    let ids = c.ids();
    let mut target = if opts.targets.is_empty() {
        draw(target_mix(ids.len()), rng)
    } else {
        opts.targets[rng.gen_range(0..opts.targets.len())]
    };
    let mut shuffled = ids.clone();
    shuffled.shuffle(rng);
    let majority = |shuffled: &[u64]| {
        let mut m = shuffled[..shuffled.len() / 2 + 1].to_vec();
        m.sort_unstable();
        m
    };
    let mut shard = None;
    let nodes = match target {
        Target::One => vec![shuffled[0]],
        Target::Leader => {
            let l = leaders(c).await;
            match l.choose(rng) {
                Some((_, node)) => vec![*node],
                None => vec![shuffled[0]],
            }
        }
        Target::Majority => majority(&shuffled),
        Target::All if pausing => {
            target = Target::Majority;
            majority(&shuffled)
        }
        Target::All => ids,
        Target::ShardMajority => match shard_majority(layout, rng) {
            Some((s, voters, chosen)) => {
                shard = Some((s, voters));
                chosen
            }
            None => {
                target = Target::Majority;
                majority(&shuffled)
            }
        },
    };
    Pick { target, nodes, shard }
}

async fn apply(
    c: &mut Cluster,
    recorder: &Recorder,
    opts: &NemesisOptions,
    layout: &Layout,
    fault: Fault,
    rng: &mut StdRng,
) -> Option<Active> {
    match fault {
        Fault::Partition => {
            let mesh_nodes = c.mesh()?.nodes();
            let shapes =
                if opts.shapes.is_empty() { shape_mix(mesh_nodes.len()) } else { opts.shapes.clone() };
            let mut shape = shapes[rng.gen_range(0..shapes.len())];
            let mut order = mesh_nodes.clone();
            order.shuffle(rng);
            let mut shard = None;
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
                Shape::ShardMajority => match shard_majority(layout, rng) {
                    Some((s, voters, chosen)) => {
                        shard = Some((s, voters));
                        grudge::split(&mesh_nodes, &chosen)
                    }
                    None => {
                        shape = Shape::Halves;
                        grudge::halves(&order)
                    }
                },
            };
            // A reset cuts a link both ways: a one-way partition holds.
            let reset = shape != Shape::OneWay && rng.gen_range(0..4) == 0;
            let mode = if reset { Mode::Reset } else { Mode::Hold };
            c.mesh()?.partition(&grudge, mode);
            let mut value = json!({
                "shape": shape,
                "mode": if reset { "reset" } else { "hold" },
                "grudge": grudge.iter().map(|(d, s)| (d.to_string(), json!(s))).collect::<serde_json::Map<_, _>>(),
            });
            if let Some((shard, voters)) = shard {
                value["shard"] = json!(shard);
                value["voters"] = json!(voters);
            }
            log(recorder, "start-partition", value);
            Some(Active::Partition)
        }
        Fault::Kill => {
            let pick = pick_targets(c, opts, layout, false, rng).await;
            for &n in &pick.nodes {
                c.kill(n);
            }
            log(recorder, "start-kill", pick.value(&pick.nodes, layout));
            Some(Active::Kill(pick.nodes))
        }
        Fault::Pause => {
            let pick = pick_targets(c, opts, layout, true, rng).await;
            let mut paused = Vec::new();
            for &n in &pick.nodes {
                if c.pause(n).is_ok() {
                    paused.push(n);
                }
            }
            log(recorder, "start-pause", pick.value(&paused, layout));
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
        Fault::Webhook => {
            let r = c.receiver.as_mut()?;
            let action = ["kill", "pause", "hold", "reset"][rng.gen_range(0..4)];
            match action {
                "kill" => r.proc().kill(),
                "pause" => r.proc().pause().ok()?,
                "hold" => r.set_link(Mode::Hold),
                _ => r.set_link(Mode::Reset),
            }
            log(recorder, "start-webhook", json!({ "action": action }));
            Some(Active::Webhook)
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
        Active::Webhook => {
            let error = c.receiver.as_mut().and_then(|r| r.heal().err()).map(|e| e.to_string());
            log(recorder, "stop-webhook", json!({ "error": error }));
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
    if let Some(r) = c.receiver.as_mut() {
        r.heal().map_err(|e| format!("restarting the webhook receiver: {e}"))?;
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
    use std::collections::BTreeMap;

    #[test]
    fn parses_fault_lists() {
        assert_eq!(
            Fault::parse_list("partition,kill,pause").unwrap(),
            vec![Fault::Partition, Fault::Kill, Fault::Pause]
        );
        assert_eq!(Fault::parse_list("all").unwrap().len(), 5);
        assert_eq!(Fault::parse_list("kill, kill").unwrap(), vec![Fault::Kill]);
        assert!(Fault::parse_list("none").unwrap().is_empty());
        assert!(Fault::parse_list("").unwrap().is_empty());
        let e = Fault::parse_list("partition,flood").unwrap_err();
        assert!(e.contains("flood"), "{e}");
    }

    #[test]
    fn parses_target_and_shape_lists() {
        assert_eq!(
            Target::parse_list("shard-majority, one,one").unwrap(),
            vec![Target::One, Target::ShardMajority]
        );
        assert!(Target::parse_list("").unwrap().is_empty());
        let e = Target::parse_list("minority").unwrap_err();
        assert!(e.contains("minority") && e.contains("shard-majority"), "{e}");
        assert_eq!(
            Shape::parse_list("shard-majority,halves").unwrap(),
            vec![Shape::Halves, Shape::ShardMajority]
        );
        assert!(Shape::parse_list("ring").is_err());
        // The names are the history's names.
        for t in Target::ALL {
            assert_eq!(json!(t), json!(t.name()));
            assert_eq!(Target::parse_list(t.name()).unwrap(), [t]);
        }
        for s in Shape::ALL {
            assert_eq!(json!(s), json!(s.name()));
            assert_eq!(Shape::parse_list(s.name()).unwrap(), [s]);
        }
    }

    /// 5 nodes, replication 3: the meta group on 1-3 (4 and 5 learn it),
    /// shard 1 on {1,4,5}.
    fn five_nodes_one_shard() -> Layout {
        Layout { voters: [(0, vec![1, 2, 3]), (1, vec![1, 4, 5])].into() }
    }

    #[test]
    fn a_shard_majority_is_two_of_the_shards_three_voters() {
        let layout = five_nodes_one_shard();
        let mut pairs = BTreeSet::new();
        for seed in 0..200 {
            let (shard, voters, chosen) = shard_majority(&layout, &mut StdRng::seed_from_u64(seed)).unwrap();
            assert_eq!((shard, voters.as_slice()), (1, &[1, 4, 5][..]), "never the meta group");
            assert_eq!(chosen.len(), 2, "{chosen:?}");
            assert!(chosen.windows(2).all(|w| w[0] < w[1]), "distinct, ascending: {chosen:?}");
            assert!(chosen.iter().all(|n| voters.contains(n)), "{chosen:?}");
            pairs.insert(chosen);
        }
        assert_eq!(pairs.len(), 3, "every pair of {{1,4,5}} is drawn: {pairs:?}");
    }

    #[test]
    fn a_shard_majority_draws_every_data_shard() {
        // 7 nodes, 4 shards of 3 voters each.
        let layout = Layout {
            voters: [
                (0, vec![1, 2, 3]),
                (1, vec![4, 5, 6]),
                (2, vec![1, 2, 7]),
                (3, vec![3, 4, 5]),
                (4, vec![1, 6, 7]),
            ]
            .into(),
        };
        let mut shards = BTreeSet::new();
        for seed in 0..200 {
            let (shard, voters, chosen) = shard_majority(&layout, &mut StdRng::seed_from_u64(seed)).unwrap();
            assert_eq!(voters, layout.voters[&shard]);
            assert_eq!(chosen.len(), 2);
            assert!(chosen.len() < 7 / 2 + 1, "a minority of the cluster");
            shards.insert(shard);
        }
        assert_eq!(shards, BTreeSet::from([1, 2, 3, 4]));
    }

    #[test]
    fn a_shard_majority_degenerates_sensibly() {
        let mut rng = StdRng::seed_from_u64(7);
        // 3 nodes: every group on every node, so a shard majority is a
        // cluster majority.
        let three = Layout { voters: (0..=4).map(|g| (g, vec![1, 2, 3])).collect() };
        let (_, voters, chosen) = shard_majority(&three, &mut rng).unwrap();
        assert_eq!((voters.len(), chosen.len()), (3, 2));
        // Replication 1: the one voter. Even voter counts: more than half.
        let single = Layout { voters: [(0, vec![1]), (1, vec![2])].into() };
        assert_eq!(shard_majority(&single, &mut rng).unwrap().2, vec![2]);
        let four = Layout { voters: [(1, vec![1, 2, 3, 4])].into() };
        assert_eq!(shard_majority(&four, &mut rng).unwrap().2.len(), 3);
        // No data shard known: nothing to aim at (the nemesis falls back
        // to a cluster majority).
        assert_eq!(shard_majority(&Layout::default(), &mut rng), None);
        let meta_only = Layout { voters: [(0, vec![1, 2, 3])].into() };
        assert_eq!(shard_majority(&meta_only, &mut rng), None);
    }

    #[test]
    fn a_shard_majority_partition_cuts_the_pair_from_the_rest() {
        let layout = five_nodes_one_shard();
        let (_, _, chosen) = shard_majority(&layout, &mut StdRng::seed_from_u64(3)).unwrap();
        let g = grudge::split(&[1, 2, 3, 4, 5], &chosen);
        let rest: BTreeSet<u64> = [1, 2, 3, 4, 5].into_iter().filter(|n| !chosen.contains(n)).collect();
        for n in &chosen {
            assert_eq!(g[n], rest, "{n} hears only the other chosen voter");
        }
        for n in &rest {
            assert_eq!(g[n], chosen.iter().copied().collect::<BTreeSet<_>>());
        }
        // 3 nodes: the pair against the third node is isolating that node.
        assert_eq!(grudge::split(&[1, 2, 3], &[1, 3]), grudge::isolate(&[1, 2, 3], 2));
    }

    #[test]
    fn the_default_mixes_add_the_shard_majority_from_five_nodes() {
        for nodes in [1, 3, 4] {
            assert!(!target_mix(nodes).iter().any(|(t, _)| *t == Target::ShardMajority));
            assert!(!shape_mix(nodes).contains(&Shape::ShardMajority));
        }
        for nodes in [5, 7] {
            assert!(target_mix(nodes).iter().any(|(t, w)| *t == Target::ShardMajority && *w > 0));
            assert_eq!(shape_mix(nodes).last(), Some(&Shape::ShardMajority));
            assert_eq!(shape_mix(nodes)[..6], shape_mix(3)[..]);
        }
        // Below 5 nodes a seed draws exactly what it drew before the
        // shard-majority target existed.
        for seed in 0..100 {
            let old = match StdRng::seed_from_u64(seed).gen_range(0..10) {
                0..=4 => Target::One,
                5..=7 => Target::Leader,
                8 => Target::Majority,
                _ => Target::All,
            };
            assert_eq!(draw(target_mix(3), &mut StdRng::seed_from_u64(seed)), old);
        }
    }

    #[test]
    fn draws_follow_the_weights() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
        for _ in 0..10_000 {
            *counts.entry(draw(target_mix(5), &mut rng).name()).or_default() += 1;
        }
        for (t, w) in target_mix(5) {
            let share = f64::from(counts[t.name()]) / 10_000.0;
            assert!((share - f64::from(*w) / 10.0).abs() < 0.03, "{t:?}: {share}");
        }
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
