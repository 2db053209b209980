//! Reserved concurrency counted across the fleet's front ends, in etcd.
//!
//! A function with `limit` reserved has `limit` numbered slots under its
//! prefix; an invocation holds one for as long as it runs. A slot is
//! taken by a transaction that puts it only if nobody holds it and no
//! slot at or past `limit` is held (one left from a higher limit), so no
//! two invocations ever share a slot and no more than `limit` run once
//! the limit is lowered and the old holders are done. Slots live under
//! the front end's membership lease: those of a front end that crashed
//! go when its lease lapses.
//!
//! Why slots and not one counter: two front ends taking different slots
//! do not conflict, so etcd's optimistic transactions rarely retry; a
//! counter would serialize every invocation of the function.

use std::collections::BTreeSet;

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};

use crate::fleet::etcd::{EtcdError, ROOT};
use crate::fleet::membership::HeldLease;

/// Transactions tried before an invocation is throttled as if the
/// function were at its limit: they fail only while other invocations of
/// it take or free slots at the same moment.
const ATTEMPTS: usize = 8;

#[derive(Clone)]
pub struct FleetConcurrency {
    client: Client,
    lease: HeldLease,
    /// The name slots are held in, for whoever reads them in etcd.
    holder: String,
}

/// One slot of a function's reserved concurrency, given back when
/// dropped.
pub struct ConcurrencySlot {
    client: Client,
    key: String,
    /// The slot's create revision: only this holder's slot is deleted,
    /// not one taken again after this holder's lease lapsed.
    revision: i64,
}

/// Slot keys sort by number, so that the slots past a limit are one range.
fn slot_key(prefix: &str, slot: u32) -> String {
    format!("{prefix}{slot:010}")
}

fn function_prefix(account: &str, function: &str) -> String {
    format!("{ROOT}concurrency/{account}/{function}/")
}

/// The key just past every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    // Prefixes here end in '/', never in 0xff.
    *end.last_mut().expect("a non-empty prefix") += 1;
    end
}

impl FleetConcurrency {
    pub fn new(client: Client, lease: HeldLease, holder: &str) -> Self {
        FleetConcurrency {
            client,
            lease,
            holder: holder.to_string(),
        }
    }

    /// A slot for one invocation of `account`'s `function`, if fewer than
    /// `limit` invocations of it hold one across the fleet; None when it
    /// is at its limit.
    pub async fn take(
        &self,
        account: &str,
        function: &str,
        limit: u32,
    ) -> Result<Option<ConcurrencySlot>, EtcdError> {
        if limit == 0 {
            return Ok(None);
        }
        let prefix = function_prefix(account, function);
        let past_limit = slot_key(&prefix, limit);
        let end = prefix_end(&prefix);
        let mut client = self.client.clone();
        for _ in 0..ATTEMPTS {
            let held = client
                .get(
                    prefix.as_str(),
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                )
                .await?;
            let held: BTreeSet<u32> = held
                .kvs()
                .iter()
                .filter_map(|kv| kv.key_str().ok()?.strip_prefix(&prefix)?.parse().ok())
                .collect();
            let free: Vec<u32> = (0..limit).filter(|slot| !held.contains(slot)).collect();
            if free.is_empty() || held.len() >= limit as usize {
                return Ok(None);
            }
            // Concurrent takers that start at different free slots
            // rarely collide.
            let pick = free[random_index() % free.len()];
            let key = slot_key(&prefix, pick);
            let put = Txn::new()
                .when([
                    Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                    Compare::version(past_limit.as_str(), CompareOp::Equal, 0)
                        .with_range(end.clone()),
                ])
                .and_then([TxnOp::put(
                    key.as_str(),
                    self.holder.as_str(),
                    Some(PutOptions::new().with_lease(self.lease.id())),
                )]);
            let done = client.txn(put).await?;
            if done.succeeded() {
                let revision = done.header().map(|h| h.revision()).unwrap_or_default();
                return Ok(Some(ConcurrencySlot {
                    client: self.client.clone(),
                    key,
                    revision,
                }));
            }
        }
        Ok(None)
    }
}

fn random_index() -> usize {
    let mut bytes = [0u8; 8];
    // A failed read only makes collisions likelier.
    let _ = getrandom::fill(&mut bytes);
    u64::from_le_bytes(bytes) as usize
}

impl ConcurrencySlot {
    /// Gives the slot back before the invocation's answer goes out, so
    /// that the caller's next invocation finds it free.
    pub async fn free(mut self) {
        let (client, free) = self.release();
        free_slot(client, free).await;
    }

    fn release(&mut self) -> (Client, Option<(String, Txn)>) {
        let key = std::mem::take(&mut self.key);
        let txn = (!key.is_empty()).then(|| {
            let txn = Txn::new()
                .when([Compare::create_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    self.revision,
                )])
                .and_then([TxnOp::delete(key.as_str(), None)]);
            (key, txn)
        });
        (self.client.clone(), txn)
    }
}

async fn free_slot(mut client: Client, free: Option<(String, Txn)>) {
    if let Some((key, txn)) = free {
        if let Err(e) = client.txn(txn).await {
            tracing::warn!(
                "freeing reserved concurrency slot {key}: {e}; it lapses with the lease"
            );
        }
    }
}

/// A slot dropped without [`ConcurrencySlot::free`] (its invocation was
/// cancelled) is freed in the background, or, with no runtime left, when
/// the front end's lease lapses.
impl Drop for ConcurrencySlot {
    fn drop(&mut self) {
        let (client, free) = self.release();
        if free.is_some() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(free_slot(client, free));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_past_a_limit_are_one_range_of_keys() {
        let prefix = function_prefix("123456789012", "f");
        let end = prefix_end(&prefix);
        let (nine, ten, eleven) = (
            slot_key(&prefix, 9),
            slot_key(&prefix, 10),
            slot_key(&prefix, 11),
        );
        assert!(nine < ten && ten < eleven);
        assert!(eleven.as_bytes() < end.as_slice());
        // Another function's slots fall outside the range.
        assert!(function_prefix("123456789012", "f2").as_bytes() > end.as_slice());
        assert!(function_prefix("123456789012", "f-").as_bytes() < prefix.as_bytes());
    }
}
