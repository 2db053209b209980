//! Event invocations a front end accepted, mirrored in etcd, so that
//! another front end runs them if this one is lost for good.
//!
//! A front end queues an accepted event in its own store first (a restart
//! finds it there), then mirrors it here in the background: the event's
//! record under `events/ID`, and `event-holders/ID` naming the front end
//! under its membership lease. A front end that dies stops renewing the
//! lease, its holder keys go with it, and the others adopt its events (an
//! etcd transaction that takes the holder key only if nobody has it) and
//! run them. An event ends with both keys deleted; an adopted one leaves
//! `events-ended/ID` too, so that the front end it came from, if it comes
//! back, drops it rather than run it again (and then deletes the mark).
//!
//! Events run at least once, as Lambda's do: one that a front end was
//! running when it was cut off from etcd past its lease may run again
//! where it was adopted.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::sync::mpsc;

use crate::fleet::etcd::{EtcdError, ROOT};
use crate::fleet::membership::HeldLease;

/// etcd takes at most 128 operations in a transaction; each event's
/// change is at most three.
const BATCH: usize = 40;

/// Pause before a mirroring transaction that failed is sent again.
const RETRY_EVERY: Duration = Duration::from_millis(200);

/// Events adopted in one pass, so that a front end taking over a lost
/// one's backlog does not take all of it at once.
const ADOPT_AT_ONCE: usize = 200;

fn events_prefix() -> String {
    format!("{ROOT}events/")
}

fn holders_prefix() -> String {
    format!("{ROOT}event-holders/")
}

fn ended_prefix() -> String {
    format!("{ROOT}events-ended/")
}

/// The change an event's mirror needs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    /// Its record as it is now (accepted, or retried), held here.
    Keep(Vec<u8>),
    /// It ended; `adopted`: here, taken over from another front end.
    Done { adopted: bool },
    /// Its front end, back, dropped it: the end mark goes.
    Forget,
}

impl Change {
    fn ops(&self, id: &str, holder: &str, lease: i64) -> Vec<TxnOp> {
        let event = format!("{}{id}", events_prefix());
        let held = format!("{}{id}", holders_prefix());
        let ended = format!("{}{id}", ended_prefix());
        match self {
            Change::Keep(record) => vec![
                TxnOp::put(event, record.clone(), None),
                TxnOp::put(held, holder, Some(PutOptions::new().with_lease(lease))),
            ],
            Change::Done { adopted } => {
                let mut ops = vec![TxnOp::delete(event, None), TxnOp::delete(held, None)];
                if *adopted {
                    ops.push(TxnOp::put(ended, holder, None));
                }
                ops
            }
            Change::Forget => vec![TxnOp::delete(ended, None)],
        }
    }
}

pub struct EventLedger {
    client: Client,
    lease: HeldLease,
    holder: String,
    changes: mpsc::UnboundedSender<(String, Change)>,
}

impl EventLedger {
    /// The ledger of the front end named `holder`, mirroring under `lease`.
    pub fn start(client: Client, lease: HeldLease, holder: &str) -> Self {
        let (changes, queue) = mpsc::unbounded_channel();
        tokio::spawn(mirror(
            client.clone(),
            lease.clone(),
            holder.to_string(),
            queue,
        ));
        EventLedger {
            client,
            lease,
            holder: holder.to_string(),
            changes,
        }
    }

    /// Mirrors event `id`'s `record`, kept in this front end's store.
    pub fn keep(&self, id: &str, record: Vec<u8>) {
        let _ = self.changes.send((id.to_string(), Change::Keep(record)));
    }

    /// Event `id` ended; `adopted`: it was taken over from another front
    /// end.
    pub fn done(&self, id: &str, adopted: bool) {
        let _ = self
            .changes
            .send((id.to_string(), Change::Done { adopted }));
    }

    /// This front end, back, dropped `ids`, which another one took over.
    pub fn forget(&self, ids: &[String]) {
        for id in ids {
            let _ = self.changes.send((id.clone(), Change::Forget));
        }
    }

    /// Events that no front end holds any more (their holder's lease
    /// lapsed), now held by this one: (id, record).
    pub async fn adopt_orphans(&self) -> Result<Vec<(String, Vec<u8>)>, EtcdError> {
        let mut client = self.client.clone();
        let keys_only = || Some(GetOptions::new().with_prefix().with_keys_only());
        let ids = |read: &etcd_client::GetResponse, prefix: &str| -> BTreeSet<String> {
            read.kvs()
                .iter()
                .filter_map(|kv| Some(kv.key_str().ok()?.strip_prefix(prefix)?.to_string()))
                .collect()
        };
        let events = ids(
            &client.get(events_prefix(), keys_only()).await?,
            &events_prefix(),
        );
        let held = ids(
            &client.get(holders_prefix(), keys_only()).await?,
            &holders_prefix(),
        );
        let mut adopted = Vec::new();
        for id in events.difference(&held).take(ADOPT_AT_ONCE) {
            let (event, holder) = (
                format!("{}{id}", events_prefix()),
                format!("{}{id}", holders_prefix()),
            );
            let adopt = Txn::new()
                .when([
                    Compare::create_revision(holder.as_str(), CompareOp::Equal, 0),
                    Compare::create_revision(event.as_str(), CompareOp::Greater, 0),
                ])
                .and_then([
                    TxnOp::put(
                        holder.as_str(),
                        self.holder.as_str(),
                        Some(PutOptions::new().with_lease(self.lease.id())),
                    ),
                    TxnOp::get(event.as_str(), None),
                ]);
            let done = client.txn(adopt).await?;
            if !done.succeeded() {
                continue;
            }
            let record = done.op_responses().into_iter().find_map(|op| match op {
                TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            });
            if let Some(record) = record {
                adopted.push((id.clone(), record));
            }
        }
        Ok(adopted)
    }

    /// Of `ids`, this front end's queued events, those another front end
    /// took over while this one was away: it holds them, or ran them.
    pub async fn taken_over(&self, ids: &[String]) -> Result<Vec<String>, EtcdError> {
        let mut client = self.client.clone();
        let mut marks: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for prefix in [ended_prefix(), holders_prefix()] {
            let read = client
                .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
                .await?;
            marks.extend(read.kvs().iter().filter_map(|kv| {
                let id = kv.key_str().ok()?.strip_prefix(&prefix)?;
                Some((id.to_string(), kv.value().to_vec()))
            }));
        }
        Ok(ids
            .iter()
            .filter(|id| {
                marks
                    .get(id.as_str())
                    .is_some_and(|holder| holder != self.holder.as_bytes())
            })
            .cloned()
            .collect())
    }
}

/// Sends the ledger's changes to etcd in order, several events per
/// transaction, each sent again until etcd takes it.
async fn mirror(
    mut client: Client,
    lease: HeldLease,
    holder: String,
    mut queue: mpsc::UnboundedReceiver<(String, Change)>,
) {
    while let Some(first) = queue.recv().await {
        // The last change of each event wins: an event accepted and done
        // before its mirror went out needs nothing in etcd at all, but a
        // delete is harmless.
        let mut batch: BTreeMap<String, Change> = BTreeMap::new();
        let mut next = Some(first);
        while let Some((id, change)) = next {
            batch.insert(id, change);
            next = match batch.len() < BATCH {
                true => queue.try_recv().ok(),
                false => None,
            };
        }
        let mut failing = false;
        loop {
            let ops: Vec<TxnOp> = batch
                .iter()
                .flat_map(|(id, change)| change.ops(id, &holder, lease.id()))
                .collect();
            match client.txn(Txn::new().and_then(ops)).await {
                Ok(_) => break,
                Err(e) => {
                    if !failing {
                        tracing::warn!(
                            "fleet: mirroring {} events in etcd: {e}; trying again",
                            batch.len()
                        );
                        failing = true;
                    }
                    tokio::time::sleep(RETRY_EVERY).await;
                }
            }
        }
        if failing {
            tracing::info!("fleet: events mirrored in etcd again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::membership::{Registration, LEASE_TTL};
    use crate::fleet::test_etcd::EtcdServer;
    use std::time::Instant;

    async fn mirrored(client: &Client) -> BTreeSet<String> {
        let read = client
            .clone()
            .get(events_prefix(), Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        read.kvs()
            .iter()
            .map(|kv| kv.key_str().unwrap()[events_prefix().len()..].to_string())
            .collect()
    }

    async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
        let started = Instant::now();
        while !done().await {
            assert!(started.elapsed() < LEASE_TTL * 4, "{what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn a_lost_front_ends_events_are_adopted_once_and_ended_ones_are_gone() {
        let etcd = EtcdServer::start(None);
        let client = etcd.client(None).await;
        let (fe, fe2) = Registration::test_front_ends(&client).await;
        let first = EventLedger::start(client.clone(), fe.lease(), "fe");
        let second = EventLedger::start(client.clone(), fe2.lease(), "fe2");
        for i in 0..100 {
            first.keep(&format!("e{i:03}"), format!("event {i}").into_bytes());
        }
        first.keep("e000", b"event 0, retried".to_vec());
        first.keep("quick", b"accepted and done".to_vec());
        first.done("quick", false);
        first.done("e099", false);
        until("fe's events mirrored", async || {
            mirrored(&client).await.len() == 99
        })
        .await;
        // fe is alive: nothing is anybody else's to take.
        assert!(second.adopt_orphans().await.unwrap().is_empty());
        let queued: Vec<String> = vec!["e001".into(), "e002".into(), "e003".into()];
        assert!(first.taken_over(&queued).await.unwrap().is_empty());

        // fe is lost: once its lease lapses fe2 adopts every event, each
        // with its last record, and nobody adopts them again.
        drop(fe);
        let mut adopted = Vec::new();
        until("fe's events adopted", async || {
            adopted.extend(second.adopt_orphans().await.unwrap());
            adopted.len() >= 99
        })
        .await;
        let ids: BTreeSet<&str> = adopted.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids.len(), 99);
        assert!(!ids.contains("e099") && !ids.contains("quick"));
        let e000 = adopted.iter().find(|(id, _)| id == "e000").unwrap();
        assert_eq!(e000.1, b"event 0, retried");
        assert!(second.adopt_orphans().await.unwrap().is_empty());
        // fe2 runs them; fe, back, finds them taken over, whether fe2
        // still holds them or has run them already.
        second.done("e001", true);
        until("e001 ended", async || {
            !mirrored(&client).await.contains("e001")
        })
        .await;
        assert_eq!(first.taken_over(&queued).await.unwrap(), queued);
        first.forget(&queued);
        for (id, _) in &adopted {
            second.done(id, true);
        }
        until("the adopted events ended", async || {
            mirrored(&client).await.is_empty()
        })
        .await;
        first.forget(&adopted.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>());
        until("their end marks forgotten", async || {
            let ended = client
                .clone()
                .get(
                    ended_prefix(),
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                )
                .await
                .unwrap();
            ended.kvs().is_empty()
        })
        .await;
    }
}
