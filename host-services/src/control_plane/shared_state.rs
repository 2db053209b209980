//! The state a fleet's front ends share, in etcd: functions, versions,
//! aliases, layers, provisioned concurrency and who holds which code.
//!
//! Each front end keeps a replica of it in its own redb (the
//! `SHARED` tables of the store), so every read is local and as fast as in one
//! process, and follows etcd with a watch. A write is one etcd
//! transaction that applies only if the shared state is still at the
//! generation the writer's replica had read (the generation is a key
//! every write puts, so its revision orders all of them); when another
//! front end wrote first, the writer catches up and runs its transaction
//! again. Writes are control-plane calls, rare next to invocations, so
//! ordering all of them costs nothing that matters.
//!
//! Code itself is not in etcd (a ZIP may be 50 MB, etcd's values are kept
//! under 1.5 MB): etcd records which front ends hold it, and each front
//! end fetches what it lacks from a holder, still sealed, as soon as it
//! sees it recorded (or, first, when it needs it), so that the code
//! outlives the front end that took it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, EventType, GetOptions, Txn, TxnOp, WatchOptions,
};
use redb::TableHandle;
use tokio::sync::watch;

use crate::control_plane::store::{
    shared_table, Change, Replication, Store, StoreError, Write, CODE, CODE_HOLDERS,
};
use crate::fleet::etcd::{put_if_absent, Contention, EtcdError, ROOT};
use crate::fleet::peers::PeerSet;

/// The fleet endpoint a front end serves its code at, to other front ends.
pub const STORED_CODE: &str = "/fleet/v1/code";

/// How long a write waits for its own change to come back through the
/// watch before it reports the state as unreachable.
const APPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause before a broken watch is started again from a fresh read.
const RETRY_EVERY: Duration = Duration::from_secs(1);

fn state_prefix() -> String {
    format!("{ROOT}state/")
}

fn generation_key() -> String {
    format!("{ROOT}state/generation")
}

/// The fingerprint of the key service every front end must hold.
fn keys_key() -> String {
    format!("{ROOT}front-end-keys")
}

fn records_prefix() -> String {
    format!("{ROOT}state/records/")
}

fn record_key(table: &str, key: &str) -> String {
    format!("{}{table}/{key}", records_prefix())
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "this front end's keys (DATA_DIR/keys) are not the fleet's: its front ends share one key \
         service, so copy DATA_DIR/keys and DATA_DIR/issuer.key from one of them before this one \
         first starts"
    )]
    ForeignKeys,
    #[error(
        "this front end's state file holds functions, and the fleet's etcd holds none: a front \
         end joins a fleet with an empty data directory (its functions would be lost), or etcd's \
         data must be restored"
    )]
    Diverged,
}

/// This front end's replica of the fleet's shared state.
pub struct StateReplica {
    client: Client,
    /// The redb the replica lives in (without replication: applying the
    /// fleet's changes must not send them back).
    store: Store,
    host: String,
    peers: Arc<PeerSet>,
    /// The generation applied to `store`.
    applied: watch::Sender<i64>,
    runtime: tokio::runtime::Handle,
}

impl StateReplica {
    /// Copies the fleet's shared state into `store` and follows it from
    /// then on. A front end whose key service is not the fleet's (by its
    /// `keys` fingerprint: it could open none of the fleet's code), or
    /// whose store holds functions that the fleet does not know, is
    /// refused rather than emptied.
    pub async fn start(
        client: Client,
        store: Store,
        host: &str,
        peers: Arc<PeerSet>,
        keys: &str,
    ) -> Result<Arc<Self>, ReplicaError> {
        check_keys(&client, keys).await?;
        let (applied, _) = watch::channel(store.generation()?);
        let replica = Arc::new(StateReplica {
            client,
            store,
            host: host.to_string(),
            peers,
            applied,
            runtime: tokio::runtime::Handle::current(),
        });
        let revision = replica.reload(true).await?;
        let follower = replica.clone();
        tokio::spawn(async move {
            let mut revision = revision;
            loop {
                if let Err(e) = follower.follow_from(revision).await {
                    tracing::warn!("fleet: watching the shared state: {e}");
                }
                tokio::time::sleep(RETRY_EVERY).await;
                match follower.reload(false).await {
                    Ok(r) => revision = r,
                    Err(e) => tracing::warn!("fleet: reading the shared state: {e}"),
                }
            }
        });
        Ok(replica)
    }

    /// Replaces the replica with etcd's state as it is now; returns the
    /// revision read at.
    async fn reload(self: &Arc<Self>, starting: bool) -> Result<i64, ReplicaError> {
        let read = self
            .client
            .clone()
            .get(state_prefix(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(EtcdError::from)?;
        let revision = read.header().map_or(0, |h| h.revision());
        let generation = read
            .kvs()
            .iter()
            .find(|kv| kv.key() == generation_key().as_bytes())
            .map(|kv| kv.mod_revision());
        let writes: Vec<Write> = read
            .kvs()
            .iter()
            .filter_map(|kv| to_write(kv.key(), Change::Put(kv.value().to_vec())))
            .collect();
        if generation.is_none() && self.store.has_shared_records()? {
            if starting {
                return Err(ReplicaError::Diverged);
            }
            // etcd lost its data while this front end ran: its replica is
            // kept (and served) rather than emptied, and writes fail until
            // etcd is restored.
            tracing::error!("fleet: {}", ReplicaError::Diverged);
            return Ok(revision);
        }
        let generation = generation.unwrap_or(0);
        self.store.apply(&writes, Some(generation), true)?;
        self.applied.send_replace(generation);
        tracing::info!(
            "fleet: shared state read at generation {generation} ({} records)",
            writes.len()
        );
        self.copy_missing_code(&writes);
        Ok(revision)
    }

    /// Fetches, in the background, the code that `writes` record other
    /// front ends holding and that this one lacks.
    fn copy_missing_code(self: &Arc<Self>, writes: &[Write]) {
        let missing: Vec<(String, String)> = writes
            .iter()
            .filter(|w| w.table.name() == CODE_HOLDERS.name() && w.change != Change::Remove)
            .filter_map(|w| {
                let (code, holder) = w.key.rsplit_once('/')?;
                (holder != self.host).then(|| (code.to_string(), holder.to_string()))
            })
            .collect();
        if missing.is_empty() {
            return;
        }
        let replica = self.clone();
        tokio::spawn(async move {
            for (key, holder) in missing {
                if let Err(e) = replica.copy_code(&key, &holder).await {
                    tracing::warn!("fleet: copying code {key} from {holder}: {e}");
                }
            }
        });
    }

    /// Makes this front end one more holder of the code under `key`.
    async fn copy_code(&self, key: &str, holder: &str) -> Result<(), StoreError> {
        if self.store.read()?.get_bytes(CODE, key)?.is_some() {
            return Ok(());
        }
        let code = self.fetch_code_async(key, &[holder.to_string()]).await?;
        let held = Write {
            table: CODE_HOLDERS,
            key: format!("{key}/{}", self.host),
            change: Change::Put(b"null".to_vec()),
        };
        self.store.apply(
            &[Write {
                table: CODE,
                key: key.to_string(),
                change: Change::Put(code),
            }],
            None,
            false,
        )?;
        let mut contention = Contention::default();
        loop {
            let generation = self.store.generation()?;
            if self
                .commit_async(generation, std::slice::from_ref(&held))
                .await?
            {
                return Ok(());
            }
            match contention.refused() {
                Some(pause) => tokio::time::sleep(pause).await,
                None => return Err(StoreError::Shared(contention.exhausted())),
            }
        }
    }

    /// Applies etcd's changes after `revision` until the watch ends.
    async fn follow_from(self: &Arc<Self>, revision: i64) -> Result<(), ReplicaError> {
        let mut stream = self
            .client
            .clone()
            .watch(
                state_prefix(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            )
            .await
            .map_err(EtcdError::from)?;
        while let Some(answer) = stream.message().await.map_err(EtcdError::from)? {
            if answer.canceled() {
                return Ok(());
            }
            let mut generation = None;
            let mut writes = Vec::new();
            for event in answer.events() {
                let Some(kv) = event.kv() else { continue };
                if kv.key() == generation_key().as_bytes() {
                    generation = Some(kv.mod_revision());
                    continue;
                }
                let change = match event.event_type() {
                    EventType::Put => Change::Put(kv.value().to_vec()),
                    EventType::Delete => Change::Remove,
                };
                writes.extend(to_write(kv.key(), change));
            }
            self.store.apply(&writes, generation, false)?;
            if let Some(generation) = generation {
                self.applied.send_replace(generation);
            }
            self.copy_missing_code(&writes);
        }
        Ok(())
    }

    /// Waits until the replica has applied `generation` or later.
    async fn caught_up(&self, generation: i64) -> Result<(), StoreError> {
        let mut applied = self.applied.subscribe();
        let reached = tokio::time::timeout(APPLY_TIMEOUT, applied.wait_for(|g| *g >= generation))
            .await
            .is_ok_and(|r| r.is_ok());
        match reached {
            true => Ok(()),
            false => Err(StoreError::Shared(format!(
                "this front end's replica did not reach generation {generation} within {} s",
                APPLY_TIMEOUT.as_secs()
            ))),
        }
    }

    async fn commit_async(&self, generation: i64, writes: &[Write]) -> Result<bool, StoreError> {
        let mut ops: Vec<TxnOp> = writes
            .iter()
            .map(|w| {
                let key = record_key(w.table.name(), &w.key);
                match &w.change {
                    Change::Put(bytes) => TxnOp::put(key, bytes.clone(), None),
                    Change::Remove => TxnOp::delete(key, None),
                    Change::RemovePrefix => {
                        TxnOp::delete(format!("{key}/"), Some(DeleteOptions::new().with_prefix()))
                    }
                }
            })
            .collect();
        ops.push(TxnOp::put(generation_key(), self.host.as_str(), None));
        let txn = Txn::new()
            .when([Compare::mod_revision(
                generation_key(),
                CompareOp::Equal,
                generation,
            )])
            .and_then(ops);
        let done = self
            .client
            .clone()
            .txn(txn)
            .await
            .map_err(|e| StoreError::Shared(format!("etcd: {e}")))?;
        // Committed: this write's own revision; refused: whatever came
        // first, at least one past what was read.
        let target = match done.succeeded() {
            true => done.header().map_or(generation + 1, |h| h.revision()),
            false => generation + 1,
        };
        self.caught_up(target).await?;
        Ok(done.succeeded())
    }

    async fn fetch_code_async(&self, key: &str, holders: &[String]) -> Result<Vec<u8>, StoreError> {
        let mut failures = Vec::new();
        for holder in holders {
            let Some(peer) = self.peers.named(holder) else {
                failures.push(format!("{holder} is not in the fleet"));
                continue;
            };
            match peer.post(STORED_CODE, Bytes::from(key.to_string())).await {
                Ok(code) => return Ok(code.to_vec()),
                Err(e) => failures.push(format!("{holder}: {e}")),
            }
        }
        Err(StoreError::Shared(format!(
            "code {key} could not be fetched from the front ends that hold it ({})",
            failures.join("; ")
        )))
    }

    /// Runs `work` to its end from synchronous store code, which runs on
    /// the runtime's worker threads.
    fn block_on<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        tokio::task::block_in_place(|| self.runtime.block_on(work))
    }
}

/// Records `keys` as the fleet's key fingerprint if it has none yet, or
/// checks it against the one it has.
async fn check_keys(client: &Client, keys: &str) -> Result<(), ReplicaError> {
    match put_if_absent(client, &keys_key(), keys.as_bytes(), None).await? {
        Some(fleets) if fleets.value != keys.as_bytes() => Err(ReplicaError::ForeignKeys),
        _ => Ok(()),
    }
}

/// The shared table record etcd's `key` holds, changed by `change`.
fn to_write(key: &[u8], change: Change) -> Option<Write> {
    let key = std::str::from_utf8(key).ok()?;
    let (table, key) = key.strip_prefix(&records_prefix())?.split_once('/')?;
    let Some(table) = shared_table(table) else {
        tracing::warn!("fleet: shared state has a record of no table here: {key:?}");
        return None;
    };
    Some(Write {
        table,
        key: key.to_string(),
        change,
    })
}

impl Replication for StateReplica {
    fn commit(&self, generation: i64, writes: &[Write]) -> Result<bool, StoreError> {
        self.block_on(self.commit_async(generation, writes))
    }

    fn holder(&self) -> &str {
        &self.host
    }

    fn fetch_code(&self, key: &str, holders: &[String]) -> Result<Vec<u8>, StoreError> {
        self.block_on(self.fetch_code_async(key, holders))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control_plane::store::{FUNCTIONS, VERSIONS};
    use crate::fleet::membership::Members;
    use crate::fleet::test_etcd::EtcdServer;
    use crate::fleet::testing::{fleet_certs, temp_dir};
    use crate::fleet::tls::FleetTls;
    use std::path::Path;

    struct Fleet {
        _etcd: EtcdServer,
        client: Client,
        peers: Arc<PeerSet>,
        dir: std::path::PathBuf,
    }

    impl Fleet {
        async fn start() -> Self {
            let etcd = EtcdServer::start(None);
            let client = etcd.client(None).await;
            let dir = temp_dir("shared-state");
            fleet_certs(&dir.join("certs"), &["fe"]);
            let peers = Arc::new(PeerSet::new(
                FleetTls::load(&dir.join("certs"), "fe").unwrap(),
                Members::follow(&client).await.unwrap(),
            ));
            Fleet {
                _etcd: etcd,
                client,
                peers,
                dir,
            }
        }

        async fn front_end(&self, name: &str, keys: &str) -> Result<Store, ReplicaError> {
            std::fs::create_dir_all(self.dir.join(name)).unwrap();
            let store = Store::open(&self.dir.join(name)).unwrap();
            let replica = StateReplica::start(
                self.client.clone(),
                store.clone(),
                name,
                self.peers.clone(),
                keys,
            )
            .await?;
            Ok(store.replicated(replica))
        }
    }

    impl Drop for Fleet {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn counter(store: &Store) -> Option<u64> {
        store.read().unwrap().get(FUNCTIONS, "a/counter").unwrap()
    }

    async fn until_seen(store: &Store, what: impl Fn(&Store) -> bool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !what(store) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the front end's replica never showed the change");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn front_ends_see_each_others_writes_and_racing_writes_all_land() {
        let fleet = Fleet::start().await;
        let fe = fleet.front_end("fe", "keys").await.unwrap();
        let fe2 = fleet.front_end("fe2", "keys").await.unwrap();
        fe.write(|t| t.put(FUNCTIONS, "a/counter", &0u64)).unwrap();
        // A write is on its own front end when it returns.
        assert_eq!(counter(&fe), Some(0));
        until_seen(&fe2, |s| counter(s) == Some(0)).await;

        // Read-modify-write from both front ends at once: each increment
        // reads a replica the other may have moved past, and must land
        // exactly once anyway.
        const EACH: u64 = 40;
        let racers: Vec<_> = [fe.clone(), fe2.clone()]
            .into_iter()
            .map(|store| {
                tokio::spawn(async move {
                    for _ in 0..EACH {
                        store
                            .write(|t| {
                                let n: u64 = t.get(FUNCTIONS, "a/counter")?.unwrap();
                                t.put(FUNCTIONS, "a/counter", &(n + 1))
                            })
                            .unwrap();
                    }
                })
            })
            .collect();
        for racer in racers {
            racer.await.unwrap();
        }
        until_seen(&fe, |s| counter(s) == Some(2 * EACH)).await;
        until_seen(&fe2, |s| counter(s) == Some(2 * EACH)).await;

        // Removals by prefix reach the other front end; a front end's own
        // tables (its events) stay its own.
        fe2.write(|t| {
            t.put(VERSIONS, "a/f/1", &"one")?;
            t.put(VERSIONS, "a/f/2", &"two")?;
            t.put(VERSIONS, "a/g/1", &"other function")
        })
        .unwrap();
        fe.write(|t| t.remove_prefix(VERSIONS, "a/f")).unwrap();
        let versions = |s: &Store| {
            s.read()
                .unwrap()
                .all::<String>(VERSIONS)
                .unwrap()
                .into_iter()
                .map(|(k, _)| k)
                .collect::<Vec<_>>()
        };
        until_seen(&fe2, |s| versions(s) == ["a/g/1"]).await;
        fe.write(|t| t.put(crate::control_plane::store::EVENTS, "e1", &"event"))
            .unwrap();
        assert!(fe2
            .read()
            .unwrap()
            .get::<String>(crate::control_plane::store::EVENTS, "e1")
            .unwrap()
            .is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_front_end_with_other_keys_or_its_own_functions_is_refused() {
        let fleet = Fleet::start().await;
        // Functions from before the fleet, which etcd does not know.
        let before = fleet.dir.join("old");
        std::fs::create_dir_all(&before).unwrap();
        Store::open(&before)
            .unwrap()
            .write(|t| t.put(FUNCTIONS, "a/f", &"from before"))
            .unwrap();
        let error = fleet.front_end("old", "keys").await.err().unwrap();
        assert!(matches!(error, ReplicaError::Diverged), "{error}");
        let kept: Option<String> = Store::open(Path::new(&before))
            .unwrap()
            .read()
            .unwrap()
            .get(FUNCTIONS, "a/f")
            .unwrap();
        assert_eq!(kept.as_deref(), Some("from before"));

        fleet.front_end("fe", "keys").await.unwrap();
        let error = fleet.front_end("fe2", "other keys").await.err().unwrap();
        assert!(matches!(error, ReplicaError::ForeignKeys), "{error}");
        assert!(error.to_string().contains("DATA_DIR/keys"), "{error}");
    }
}
