//! The live progress line on stderr and a bounded error tally.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::json::Json;

/// A line redrawn on stderr about once a second (a new line per update when
/// stderr is not a terminal) until [`finish`](Progress::finish) or drop.
pub struct Progress {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Progress {
    /// Starts redrawing `[label] f(elapsed)`.
    pub fn start(label: &'static str, mut f: impl FnMut(Duration) -> String + Send + 'static) -> Progress {
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let tty = std::io::stderr().is_terminal();
            let t0 = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let line = f(t0.elapsed());
                        if tty { eprint!("\r[{label}] {line}\x1b[K") } else { eprintln!("[{label}] {line}") }
                    }
                    _ = &mut stopped => {
                        let line = f(t0.elapsed());
                        if tty { eprintln!("\r[{label}] {line}\x1b[K") } else { eprintln!("[{label}] {line}") }
                        return;
                    }
                }
            }
        });
        Progress { stop: Some(stop), task: Some(task) }
    }

    /// Prints the final line and stops.
    pub async fn finish(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Most distinct error kinds kept; later new kinds count as "other".
const MAX_KINDS: usize = 32;

/// Errors counted by kind (bounded).
#[derive(Default)]
pub struct Tally(Mutex<BTreeMap<String, u64>>);

impl Tally {
    /// Counts one error of `kind`.
    pub fn add(&self, kind: impl Into<String>) {
        let mut m = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut kind = kind.into();
        if !m.contains_key(&kind) && m.len() >= MAX_KINDS {
            kind = "other".into();
        }
        *m.entry(kind).or_default() += 1;
    }

    /// All errors counted.
    pub fn total(&self) -> u64 {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).values().sum()
    }

    /// `{kind: count}`.
    pub fn to_json(&self) -> Json {
        let m = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        Json::Obj(m.iter().map(|(k, v)| (k.clone(), Json::from(*v))).collect())
    }
}

/// The name of an error code number, for tallies.
pub fn code_name(code: i32) -> String {
    let c = rim_proto::error::code_from_number(code);
    if c as i32 == code { c.as_str_name().to_string() } else { format!("code {code}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_is_bounded() {
        let t = Tally::default();
        for i in 0..100 {
            t.add(format!("kind {i}"));
        }
        t.add("kind 0");
        assert_eq!(t.total(), 101);
        let Json::Obj(fields) = t.to_json() else { panic!("not an object") };
        assert_eq!(fields.len(), MAX_KINDS + 1);
        assert!(fields.iter().any(|(k, v)| k == "other" && *v == Json::Int(68)));
    }
}
