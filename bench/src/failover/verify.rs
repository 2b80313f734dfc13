//! The read-back after the run (the losses of [`super`]): every pair's
//! sender and recipient lists are read over gRPC `MessageService.Sync`
//! from the surviving nodes, and each acked `client_msg_id` must be in
//! both exactly once.
//!
//! Invariants:
//!
//! * Lists are read again (every 500 ms) only for the pairs still missing
//!   an acked message, until the timeout; at most [`VERIFY_CONCURRENCY`]
//!   pairs at once. The recipient's copy arrives through the outbox relay,
//!   so a first read may legitimately miss it.
//! * A list is read forward page by page from seq 0 (each page after the
//!   last seq of the one before), with at most as many pages as the run
//!   could have sent messages; each call has a 10 s timeout, retryable
//!   errors are retried until the deadline, any other error fails the check.
//! * `lost` counts acked messages missing from either list, `duplicated`
//!   ids of the pair's prefix more than once in a list, `unacked_stored`
//!   messages in the sender's list that were never acked (allowed: their
//!   outcome was unknown); at most [`EXAMPLES`] example
//!   ids per kind.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rim_proto::v1::SyncInput;
use rim_proto::v1::message_service_client::MessageServiceClient;
use tokio::task::JoinSet;

use super::load::SenderReport;
use super::{EXAMPLES, MAX_MESSAGES, Pair};
use crate::accounts::{Api, Cred};
use crate::json::Json;

/// Entries per read-back page (the server's maximum).
const SYNC_PAGE: u32 = 500;
/// Lists read back at once.
const VERIFY_CONCURRENCY: usize = 8;

/// The read-back check.
#[derive(Default)]
pub(super) struct Check {
    pub(super) acked: u64,
    found: u64,
    pub(super) lost: u64,
    lost_sender_copy: u64,
    lost_recipient_copy: u64,
    pub(super) duplicated: u64,
    unacked_stored: u64,
    unexpected_entries: u64,
    lists_read: u64,
    rounds: u32,
    lost_examples: Vec<String>,
    duplicated_examples: Vec<String>,
}

impl Check {
    pub(super) fn to_json(&self) -> Json {
        Json::obj()
            .with("acked", self.acked)
            .with("found", self.found)
            .with("lost", self.lost)
            .with("lost_sender_copy", self.lost_sender_copy)
            .with("lost_recipient_copy", self.lost_recipient_copy)
            .with("duplicated", self.duplicated)
            .with("unacked_stored", self.unacked_stored)
            .with("unexpected_entries", self.unexpected_entries)
            .with("lists_read", self.lists_read)
            .with("rounds", self.rounds)
            .with("lost_examples", self.lost_examples.clone())
            .with("duplicated_examples", self.duplicated_examples.clone())
    }
}

/// Occurrences of one pair's message numbers in a list, and entries that
/// are not that pair's messages.
#[derive(Default, Clone)]
struct ListCount {
    counts: HashMap<u32, u32>,
    unexpected: u64,
}

/// Reads every pair's two lists back (again for the pairs still missing
/// an acked message, until `timeout`) and checks each acked message is in
/// both exactly once.
pub(super) async fn verify(
    api: &Arc<Api>,
    pairs: &[Pair],
    reports: &[SenderReport],
    prefix: &str,
    timeout: Duration,
) -> anyhow::Result<Check> {
    let deadline = Instant::now() + timeout;
    let mut lists: Vec<Option<(ListCount, ListCount)>> = vec![None; pairs.len()];
    let complete = |r: &SenderReport, l: &(ListCount, ListCount)| {
        r.acked.iter().all(|a| l.0.counts.contains_key(&a.n) && l.1.counts.contains_key(&a.n))
    };
    let mut check = Check::default();
    loop {
        let todo: Vec<usize> = (0..pairs.len())
            .filter(|i| lists[*i].as_ref().is_none_or(|l| !complete(&reports[*i], l)))
            .collect();
        if todo.is_empty() {
            break;
        }
        check.rounds += 1;
        if check.rounds > 1 {
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let sem = Arc::new(tokio::sync::Semaphore::new(VERIFY_CONCURRENCY));
        let mut tasks = JoinSet::new();
        for i in todo {
            let (api, sem) = (api.clone(), sem.clone());
            let (s, r) = (pairs[i].sender.clone(), pairs[i].recipient.clone());
            let cmid_prefix = format!("{prefix}-{i}-");
            tasks.spawn(async move {
                let _permit = sem.acquire_owned().await?;
                let sender = read_list(&api, &s, &cmid_prefix, deadline).await?;
                let recipient = read_list(&api, &r, &cmid_prefix, deadline).await?;
                anyhow::Ok((i, sender, recipient))
            });
        }
        while let Some(r) = tasks.join_next().await {
            let (i, s, r) = r.context("a read-back task panicked")??;
            lists[i] = Some((s, r));
            check.lists_read += 2;
        }
    }
    for (i, (r, l)) in reports.iter().zip(&lists).enumerate() {
        let Some((s_list, r_list)) = l else { bail!("pair {i}: lists not read") };
        let acked: BTreeSet<u32> = r.acked.iter().map(|a| a.n).collect();
        check.acked += acked.len() as u64;
        for &n in &acked {
            let (in_s, in_r) = (s_list.counts.contains_key(&n), r_list.counts.contains_key(&n));
            check.lost_sender_copy += u64::from(!in_s);
            check.lost_recipient_copy += u64::from(!in_r);
            if in_s && in_r {
                check.found += 1;
            } else {
                check.lost += 1;
                if check.lost_examples.len() < EXAMPLES {
                    let missing = if in_s {
                        "recipient"
                    } else if in_r {
                        "sender"
                    } else {
                        "both"
                    };
                    check.lost_examples.push(format!("{prefix}-{i}-{n} (missing from {missing} list)"));
                }
            }
        }
        let dup: BTreeSet<u32> =
            s_list.counts.iter().chain(&r_list.counts).filter(|(_, c)| **c > 1).map(|(n, _)| *n).collect();
        check.duplicated += dup.len() as u64;
        for n in dup.iter().take(EXAMPLES.saturating_sub(check.duplicated_examples.len())) {
            check.duplicated_examples.push(format!("{prefix}-{i}-{n}"));
        }
        check.unacked_stored += s_list.counts.keys().filter(|n| !acked.contains(n)).count() as u64;
        check.unexpected_entries += s_list.unexpected + r_list.unexpected;
    }
    Ok(check)
}

/// Reads `c`'s whole list over gRPC (retrying retryable errors until
/// `deadline`) and counts the entries `<cmid_prefix><n>`.
async fn read_list(api: &Api, c: &Cred, cmid_prefix: &str, deadline: Instant) -> anyhow::Result<ListCount> {
    let mut out = ListCount::default();
    let mut after_seq = 0;
    // Bounded: a list holds at most the run's messages.
    for _ in 0..(MAX_MESSAGES as u64 / u64::from(SYNC_PAGE) + 2) {
        let page = loop {
            let mut req = tonic::Request::new(SyncInput { after_seq, limit: SYNC_PAGE });
            req.set_timeout(Duration::from_secs(10));
            let md = req.metadata_mut();
            md.insert(rim_proto::metadata::USER_ID_METADATA_KEY, c.user.0.into());
            md.insert(rim_proto::metadata::DEVICE_ID_METADATA_KEY, c.device.0.into());
            md.insert(
                rim_proto::metadata::TOKEN_METADATA_KEY,
                c.token.parse().context("token is not valid metadata")?,
            );
            match MessageServiceClient::new(api.channel()).sync(req).await {
                Ok(r) => break r.into_inner(),
                Err(s) => {
                    let code = rim_proto::error::code_of_status(&s);
                    if !code.is_retryable() || Instant::now() >= deadline {
                        bail!(
                            "reading back user {}'s list: {} ({})",
                            c.user,
                            code.as_str_name(),
                            s.message()
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        for m in &page.messages {
            match m.client_msg_id.strip_prefix(cmid_prefix).and_then(|n| n.parse::<u32>().ok()) {
                Some(n) => *out.counts.entry(n).or_default() += 1,
                None => out.unexpected += 1,
            }
        }
        match page.messages.last() {
            Some(m) if page.has_more => after_seq = m.seq,
            _ => return Ok(out),
        }
    }
    bail!("reading back user {}'s list: more pages than the run sent messages", c.user)
}
