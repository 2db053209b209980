//! The worker's durable state in one embedded database (redb) in the data
//! directory: functions, versions, aliases, layers, function code and the
//! queue of asynchronous events. Each API call is one transaction, so a
//! crash leaves either all of a call's changes or none.
//!
//! A fleet's front ends share the [`SHARED`] tables: each front end's redb
//! holds a replica, kept by a [`Replication`] (etcd's, in
//! `fleet/shared_state.rs`), and a transaction that changes them is
//! committed there, only if no other front end changed them since the
//! replica it read; otherwise it runs again on the newer replica.

use std::cell::RefCell;
use std::ops::Bound;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, TableHandle, WriteTransaction,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::fleet::etcd::Contention;

type Docs = TableDefinition<'static, &'static str, &'static [u8]>;

/// `ACCOUNT/NAME` → [`crate::control_plane::functions::FunctionRecord`].
pub const FUNCTIONS: Docs = TableDefinition::new("functions");
/// `ACCOUNT/NAME/VERSION(20 digits)` → a published configuration.
pub const VERSIONS: Docs = TableDefinition::new("versions");
/// `ACCOUNT/NAME/ALIAS` → alias configuration.
pub const ALIASES: Docs = TableDefinition::new("aliases");
/// `ACCOUNT/LAYER/VERSION(20 digits)` → layer version.
pub const LAYERS: Docs = TableDefinition::new("layers");
/// Same keys → a deleted layer version, kept for the functions that
/// still use it (Lambda keeps a copy until none refers to it).
pub const DELETED_LAYERS: Docs = TableDefinition::new("deleted_layers");
/// `ACCOUNT/SHA256` → the code ZIP as uploaded.
pub const CODE: Docs = TableDefinition::new("code");
/// Event id → an accepted asynchronous invocation not yet done.
pub const EVENTS: Docs = TableDefinition::new("events");
/// `ACCOUNT/NAME/QUALIFIER` → a provisioned concurrency config.
pub const PROVISIONED: Docs = TableDefinition::new("provisioned");

/// `ACCOUNT/SHA256/HOST` → null: in a fleet, a front end that holds that
/// code. Code stays on the front end that took it (ZIPs are too large for
/// etcd's values); another one fetches it, sealed, when it first needs it.
pub const CODE_HOLDERS: Docs = TableDefinition::new("code_holders");
/// `generation` → the fleet's revision of the shared tables this replica
/// has applied (0 outside a fleet).
pub const REPLICA: Docs = TableDefinition::new("replica");

const ALL: [Docs; 10] = [
    FUNCTIONS,
    VERSIONS,
    ALIASES,
    LAYERS,
    DELETED_LAYERS,
    CODE,
    EVENTS,
    PROVISIONED,
    CODE_HOLDERS,
    REPLICA,
];

/// The tables a fleet's front ends share. The others are each front end's
/// own: the code it took, the Event invocations it accepted.
pub const SHARED: [Docs; 7] = [
    FUNCTIONS,
    VERSIONS,
    ALIASES,
    LAYERS,
    DELETED_LAYERS,
    PROVISIONED,
    CODE_HOLDERS,
];

const GENERATION: &str = "generation";

/// The shared table named `name`.
pub fn shared_table(name: &str) -> Option<Docs> {
    SHARED.into_iter().find(|t| t.name() == name)
}

/// One change a transaction made.
#[derive(Clone)]
pub struct Write {
    pub table: Docs,
    pub key: String,
    pub change: Change,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put(Vec<u8>),
    Remove,
    /// Every key under `key/`.
    RemovePrefix,
}

/// Where a fleet front end's shared tables are agreed on.
pub trait Replication: Send + Sync {
    /// Makes `writes` (all on shared tables) the fleet's, if the shared
    /// tables are still at `generation`, and returns once this replica has
    /// applied them. `Ok(false)`: another change came first; this replica
    /// has applied it when this returns, and the caller runs its
    /// transaction again.
    fn commit(&self, generation: i64, writes: &[Write]) -> Result<bool, StoreError>;
    /// This front end's name in [`CODE_HOLDERS`].
    fn holder(&self) -> &str;
    /// The sealed code stored under `key` by one of `holders`.
    fn fetch_code(&self, key: &str, holders: &[String]) -> Result<Vec<u8>, StoreError>;
}

/// The state file's name in the data directory.
pub const STATE_FILE: &str = "state.redb";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] redb::Error),
    #[error(
        "the state file {path} is damaged ({what}); nothing was changed. Restore it from a backup \
         (docs/worker.md, \"State and backups\"), or move it aside to start with no functions"
    )]
    Damaged { path: PathBuf, what: String },
    /// redb gave up on a page while serving one call (it panics on some
    /// damage it finds); the call fails, the worker goes on.
    #[error("the state file could not be read ({0}); the call was not carried out")]
    Unreadable(String),
    /// The fleet's shared state could not be reached or agreed on.
    #[error("the fleet's shared state: {0}; the call was not carried out")]
    Shared(String),
    #[error("stored record {key:?} in {table} is corrupt: {source}")]
    Corrupt {
        table: String,
        key: String,
        source: serde_json::Error,
    },
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Database(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// The state database; clones share it.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    replication: Option<Arc<dyn Replication>>,
}

/// A key for records that sort by number: versions sort numerically.
pub fn numbered(prefix: &str, n: u64) -> String {
    format!("{prefix}/{n:020}")
}

fn decode<T: DeserializeOwned>(table: Docs, key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        table: table.to_string(),
        key: key.to_string(),
        source,
    })
}

/// Runs one store operation, turning a panic inside redb into an error of
/// this call alone.
fn guarded<T>(f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("a panic without a message");
        tracing::error!("the state store failed inside redb: {what}");
        Err(StoreError::Unreadable(what.to_string()))
    })
}

fn get_in<T, R>(table: Docs, open: &R, key: &str) -> Result<Option<T>, StoreError>
where
    T: DeserializeOwned,
    R: ReadableTable<&'static str, &'static [u8]>,
{
    match open.get(key)? {
        Some(v) => decode(table, key, v.value()).map(Some),
        None => Ok(None),
    }
}

/// Every record whose key starts with `prefix/`, in key order.
fn scan_in<T, R>(table: Docs, open: &R, prefix: &str) -> Result<Vec<(String, T)>, StoreError>
where
    T: DeserializeOwned,
    R: ReadableTable<&'static str, &'static [u8]>,
{
    let start = format!("{prefix}/");
    let mut out = Vec::new();
    for entry in open.range::<&str>((Bound::Included(start.as_str()), Bound::Unbounded))? {
        let (k, v) = entry?;
        let key = k.value();
        if !key.starts_with(&start) {
            break;
        }
        out.push((key.to_string(), decode(table, key, v.value())?));
    }
    Ok(out)
}

/// The reads a write transaction and a read-only view share: both hold a
/// redb transaction in `tx` whose tables are read the same way.
macro_rules! record_reads {
    ($holder:ty) => {
        impl $holder {
            pub fn get<T: DeserializeOwned>(
                &self,
                table: Docs,
                key: &str,
            ) -> Result<Option<T>, StoreError> {
                guarded(|| get_in(table, &self.tx.open_table(table)?, key))
            }

            pub fn scan<T: DeserializeOwned>(
                &self,
                table: Docs,
                prefix: &str,
            ) -> Result<Vec<(String, T)>, StoreError> {
                guarded(|| scan_in(table, &self.tx.open_table(table)?, prefix))
            }

            pub fn get_bytes(&self, table: Docs, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
                guarded(|| {
                    Ok(self
                        .tx
                        .open_table(table)?
                        .get(key)?
                        .map(|v| v.value().to_vec()))
                })
            }

            /// Whether `table` holds `key`, without copying its value.
            pub fn contains(&self, table: Docs, key: &str) -> Result<bool, StoreError> {
                guarded(|| Ok(self.tx.open_table(table)?.get(key)?.is_some()))
            }
        }
    };
}

record_reads!(Txn);
record_reads!(Snapshot);

/// A write transaction: reads see its own writes, but for code in a
/// fleet's transaction (see [`Txn::put_bytes`]).
pub struct Txn {
    tx: WriteTransaction,
    /// Its changes, kept when they may have to be committed elsewhere.
    writes: Option<RefCell<Vec<Write>>>,
}

impl Txn {
    pub fn put<T: Serialize>(&self, table: Docs, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).expect("records serialize");
        self.put_bytes(table, key, &bytes)
    }

    /// In a fleet's transaction, code is only recorded: [`Store::write`]
    /// drops the transaction and writes this front end's own changes in
    /// one of their own, so code (up to 50 MB) put here too would be
    /// written twice. Nothing reads code back in the transaction that
    /// puts it.
    pub fn put_bytes(&self, table: Docs, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        if self.writes.is_none() || table.name() != CODE.name() {
            guarded(|| {
                self.tx.open_table(table)?.insert(key, bytes)?;
                Ok(())
            })?;
        }
        // Copied only to be sent to the fleet: code can be 50 MB.
        self.record(table, key, || Change::Put(bytes.to_vec()));
        Ok(())
    }

    pub fn remove(&self, table: Docs, key: &str) -> Result<(), StoreError> {
        guarded(|| {
            self.tx.open_table(table)?.remove(key)?;
            Ok(())
        })?;
        self.record(table, key, || Change::Remove);
        Ok(())
    }

    /// Removes every record under `prefix/`.
    pub fn remove_prefix(&self, table: Docs, prefix: &str) -> Result<(), StoreError> {
        let start = format!("{prefix}/");
        guarded(|| {
            self.tx
                .open_table(table)?
                .retain(|k, _| !k.starts_with(&start))?;
            Ok(())
        })?;
        self.record(table, prefix, || Change::RemovePrefix);
        Ok(())
    }

    /// Keeps the change for the fleet, in a transaction that records.
    fn record(&self, table: Docs, key: &str, change: impl FnOnce() -> Change) {
        if let Some(writes) = &self.writes {
            writes.borrow_mut().push(Write {
                table,
                key: key.to_string(),
                change: change(),
            });
        }
    }

    fn apply(&self, write: &Write) -> Result<(), StoreError> {
        match &write.change {
            Change::Put(bytes) => self.put_bytes(write.table, &write.key, bytes),
            Change::Remove => self.remove(write.table, &write.key),
            Change::RemovePrefix => self.remove_prefix(write.table, &write.key),
        }
    }

    /// The fleet's revision of the shared tables this transaction reads.
    fn generation(&self) -> Result<i64, StoreError> {
        Ok(self.get(REPLICA, GENERATION)?.unwrap_or(0))
    }
}

/// A consistent read-only view.
pub struct Snapshot {
    tx: ReadTransaction,
}

impl Snapshot {
    /// Every record of `table`.
    pub fn all<T: DeserializeOwned>(&self, table: Docs) -> Result<Vec<(String, T)>, StoreError> {
        guarded(|| {
            let open = self.tx.open_table(table)?;
            let mut out = Vec::new();
            for entry in open.iter()? {
                let (k, v) = entry?;
                out.push((k.value().to_string(), decode(table, k.value(), v.value())?));
            }
            Ok(out)
        })
    }
}

impl Store {
    /// Opens (or creates) `dir/state.redb`. An existing file is checked
    /// first, every page (redb's integrity check) and every record: a
    /// file redb cannot open or repair is refused with [`StoreError::Damaged`]
    /// and left as it is; a record that does not decode is logged, and only
    /// the calls that need it fail.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join(STATE_FILE);
        let existed = path.exists();
        let damaged = |what: String| StoreError::Damaged {
            path: path.clone(),
            what,
        };
        if existed {
            // redb writes while it opens and repairs; a file it then
            // refuses must be left as the operator had it, so the check
            // runs on a copy first.
            let copy = dir.join(format!(".{STATE_FILE}.check"));
            std::fs::copy(&path, &copy).map_err(|e| damaged(format!("cannot copy it: {e}")))?;
            let checked = guarded(|| Ok(Database::create(&copy)?.check_integrity()?));
            let _ = std::fs::remove_file(&copy);
            match checked {
                Ok(true) => {}
                Ok(false) => tracing::warn!(
                    "{}: redb's integrity check found damage it can repair; repairing",
                    path.display()
                ),
                Err(e) => return Err(damaged(cause(&e))),
            }
        }
        let mut db = guarded(|| Ok(Database::create(&path)?)).map_err(|e| damaged(cause(&e)))?;
        if existed {
            guarded(|| Ok(db.check_integrity()?)).map_err(|e| damaged(cause(&e)))?;
        }
        let store = Store {
            db: Arc::new(db),
            replication: None,
        };
        store
            .write(|t| {
                for table in ALL {
                    t.tx.open_table(table)?;
                }
                Ok::<_, StoreError>(())
            })
            .map_err(|e| damaged(cause(&e)))?;
        if existed {
            for (table, key, error) in store.undecodable().map_err(|e| damaged(cause(&e)))? {
                tracing::error!(
                    "{}: record {key:?} in {table} is corrupt ({error}); calls that need it will fail",
                    path.display()
                );
            }
        }
        Ok(store)
    }

    /// Every record that does not decode: (table, key, why). Code blobs
    /// are sealed bytes, checked by their own authentication when used.
    fn undecodable(&self) -> Result<Vec<(String, String, String)>, StoreError> {
        let read = self.read()?;
        guarded(|| {
            let mut bad = Vec::new();
            for table in ALL.into_iter().filter(|t| t.name() != CODE.name()) {
                for entry in read.tx.open_table(table)?.iter()? {
                    let (k, v) = entry?;
                    if let Err(e) = serde_json::from_slice::<serde_json::Value>(v.value()) {
                        bad.push((table.to_string(), k.value().to_string(), e.to_string()));
                    }
                }
            }
            Ok(bad)
        })
    }

    /// Writes every table, as one read transaction sees it, into a new
    /// database at `path`: a consistent copy while calls go on.
    pub fn copy_to(&self, path: &Path) -> Result<(), StoreError> {
        let read = self.read()?;
        guarded(|| {
            let copy = Database::create(path)?;
            let tx = copy.begin_write()?;
            for table in ALL {
                let mut to = tx.open_table(table)?;
                for entry in read.tx.open_table(table)?.iter()? {
                    let (k, v) = entry?;
                    to.insert(k.value(), v.value())?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// This store with its shared tables replicated by `replication`.
    pub fn replicated(self, replication: Arc<dyn Replication>) -> Store {
        Store {
            replication: Some(replication),
            ..self
        }
    }

    fn begin(&self, recording: bool) -> Result<Txn, StoreError> {
        Ok(Txn {
            tx: guarded(|| Ok(self.db.begin_write()?))?,
            writes: recording.then(RefCell::default),
        })
    }

    /// Runs `f` in one write transaction, committed only if `f` succeeds.
    /// In a fleet, a transaction that changes shared tables may run more
    /// than once (see the module's comment).
    pub fn write<T, E: From<StoreError>>(
        &self,
        mut f: impl FnMut(&Txn) -> Result<T, E>,
    ) -> Result<T, E> {
        let Some(replication) = &self.replication else {
            let txn = self.begin(false)?;
            let out = f(&txn)?;
            guarded(|| Ok(txn.tx.commit()?))?;
            return Ok(out);
        };
        let mut contention = Contention::default();
        loop {
            let mut txn = self.begin(true)?;
            let generation = txn.generation()?;
            let out = f(&txn)?;
            let writes = txn
                .writes
                .take()
                .map(RefCell::into_inner)
                .unwrap_or_default();
            let (mut shared, local): (Vec<Write>, Vec<Write>) =
                writes.into_iter().partition(|w| is_shared(w.table));
            // Code stays here; the fleet learns that this front end holds it.
            for write in &local {
                if is_code_put(write) {
                    shared.push(Write {
                        table: CODE_HOLDERS,
                        key: format!("{}/{}", write.key, replication.holder()),
                        change: Change::Put(b"null".to_vec()),
                    });
                }
            }
            if shared.is_empty() {
                guarded(|| Ok(txn.tx.commit()?))?;
                return Ok(out);
            }
            // The shared changes are applied here by the replica once the
            // fleet has them, not by this transaction.
            drop(txn);
            // Local changes go first: code is named by its hash, so code
            // kept by a transaction the fleet then refuses is harmless, and
            // a run after a refusal finds it written.
            let stored = self.read()?;
            let mut unwritten = Vec::with_capacity(local.len());
            for write in local {
                if !(is_code_put(&write) && stored.contains(CODE, &write.key)?) {
                    unwritten.push(write);
                }
            }
            drop(stored);
            let local = unwritten;
            if !local.is_empty() {
                self.apply(&local, None, false)?;
            }
            if replication.commit(generation, &shared)? {
                return Ok(out);
            }
            match contention.refused() {
                // A store call runs on the runtime's threads: the pause
                // lets their other tasks run.
                Some(pause) => tokio::task::block_in_place(|| std::thread::sleep(pause)),
                None => return Err(StoreError::Shared(contention.exhausted()).into()),
            }
        }
    }

    /// Applies `writes` in one transaction: the fleet's changes (then
    /// `generation` is the revision they bring the shared tables to) or
    /// this front end's own. `reset` empties the shared tables first, for
    /// a whole fresh copy.
    pub fn apply(
        &self,
        writes: &[Write],
        generation: Option<i64>,
        reset: bool,
    ) -> Result<(), StoreError> {
        let txn = self.begin(false)?;
        if reset {
            for table in SHARED {
                guarded(|| Ok(txn.tx.open_table(table)?.retain(|_, _| false)?))?;
            }
        }
        for write in writes {
            txn.apply(write)?;
        }
        if let Some(generation) = generation {
            txn.put(REPLICA, GENERATION, &generation)?;
        }
        guarded(|| Ok(txn.tx.commit()?))
    }

    /// The fleet's revision of the shared tables this replica holds.
    pub fn generation(&self) -> Result<i64, StoreError> {
        Ok(self.read()?.get(REPLICA, GENERATION)?.unwrap_or(0))
    }

    /// Whether any shared table holds a record.
    pub fn has_shared_records(&self) -> Result<bool, StoreError> {
        let read = self.read()?;
        guarded(|| {
            for table in SHARED {
                if !read.tx.open_table(table)?.is_empty()? {
                    return Ok(true);
                }
            }
            Ok(false)
        })
    }

    /// The sealed code stored under `key`: this store's, or in a fleet
    /// fetched from a front end that holds it (then kept here too, and
    /// this front end recorded as one more holder).
    pub fn code(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let read = self.read()?;
        if let Some(code) = read.get_bytes(CODE, key)? {
            return Ok(Some(code));
        }
        let Some(replication) = &self.replication else {
            return Ok(None);
        };
        let holders: Vec<String> = read
            .scan::<()>(CODE_HOLDERS, key)?
            .into_iter()
            .filter_map(|(k, ())| Some(k.rsplit_once('/')?.1.to_string()))
            .filter(|holder| holder != replication.holder())
            .collect();
        drop(read);
        if holders.is_empty() {
            return Ok(None);
        }
        let code = replication.fetch_code(key, &holders)?;
        self.write(|t| t.put_bytes(CODE, key, &code))?;
        Ok(Some(code))
    }

    pub fn read(&self) -> Result<Snapshot, StoreError> {
        guarded(|| {
            Ok(Snapshot {
                tx: self.db.begin_read()?,
            })
        })
    }
}

fn is_code_put(write: &Write) -> bool {
    write.table.name() == CODE.name() && matches!(write.change, Change::Put(_))
}

fn is_shared(table: Docs) -> bool {
    shared_table(table.name()).is_some()
}

/// What went wrong, without the wrapping [`StoreError`]'s own words.
fn cause(e: &StoreError) -> String {
    match e {
        StoreError::Database(e) => e.to_string(),
        other => other.to_string(),
    }
}

impl From<StoreError> for crate::error::ApiError {
    fn from(e: StoreError) -> Self {
        crate::error::ApiError::Service(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn records_survive_reopening_and_failed_transactions_leave_nothing() {
        let dir = temp_dir("reopen");
        {
            let store = Store::open(&dir).unwrap();
            store
                .write(|t| {
                    t.put(VERSIONS, &numbered("a/f", 2), &"two")?;
                    t.put(VERSIONS, &numbered("a/f", 10), &"ten")?;
                    t.put(VERSIONS, &numbered("a/fx", 1), &"other function")?;
                    Ok::<_, StoreError>(())
                })
                .unwrap();
            #[derive(Debug)]
            struct Refused;
            impl From<StoreError> for Refused {
                fn from(e: StoreError) -> Self {
                    panic!("the store failed: {e}")
                }
            }
            let failed: Result<(), Refused> = store.write(|t| {
                t.put(VERSIONS, &numbered("a/f", 3), &"three")?;
                Err(Refused)
            });
            assert!(failed.is_err());
        }
        let store = Store::open(&dir).unwrap();
        let versions: Vec<(String, String)> = store.read().unwrap().scan(VERSIONS, "a/f").unwrap();
        let values: Vec<&str> = versions.iter().map(|(_, v)| v.as_str()).collect();
        assert_eq!(values, ["two", "ten"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A fleet of one front end, in memory: commits apply at once,
    /// unless told to refuse the next ones; code comes from `elsewhere`.
    struct OneFrontEnd {
        store: Store,
        commits: std::sync::Mutex<Vec<Vec<(String, String)>>>,
        refuse: std::sync::atomic::AtomicUsize,
    }

    impl Replication for OneFrontEnd {
        fn commit(&self, generation: i64, writes: &[Write]) -> Result<bool, StoreError> {
            if self.refuse.load(std::sync::atomic::Ordering::SeqCst) > 0 {
                self.refuse
                    .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                // Another front end's change came first.
                self.store.apply(&[], Some(generation + 1), false)?;
                return Ok(false);
            }
            self.commits.lock().unwrap().push(
                writes
                    .iter()
                    .map(|w| (w.table.name().to_string(), w.key.clone()))
                    .collect(),
            );
            self.store.apply(writes, Some(generation + 1), false)?;
            Ok(true)
        }

        fn holder(&self) -> &str {
            "fe2"
        }

        fn fetch_code(&self, key: &str, holders: &[String]) -> Result<Vec<u8>, StoreError> {
            assert_eq!(holders, ["fe"]);
            Ok(format!("sealed {key}").into_bytes())
        }
    }

    #[test]
    fn in_a_fleet_shared_writes_commit_there_code_stays_here_and_refused_ones_run_again() {
        let dir = temp_dir("replicated");
        let plain = Store::open(&dir).unwrap();
        let fleet = Arc::new(OneFrontEnd {
            store: plain.clone(),
            commits: Default::default(),
            refuse: 2.into(),
        });
        let store = plain.clone().replicated(fleet.clone());
        let mut runs = 0;
        store
            .write(|t| {
                runs += 1;
                t.put(FUNCTIONS, "a/f", &"f")?;
                t.put_bytes(CODE, "a/sha", b"zip")?;
                // Written once, after the transaction, not into it.
                assert_eq!(t.contains(CODE, "a/sha")?, runs > 1);
                t.put(EVENTS, "e1", &"event")
            })
            .unwrap();
        assert_eq!(runs, 3, "refused twice, then committed");
        let commits = fleet.commits.lock().unwrap().clone();
        let committed: Vec<(&str, &str)> = commits[0]
            .iter()
            .map(|(t, k)| (t.as_str(), k.as_str()))
            .collect();
        assert_eq!(
            committed,
            [("functions", "a/f"), ("code_holders", "a/sha/fe2")]
        );
        let read = store.read().unwrap();
        assert_eq!(read.get_bytes(CODE, "a/sha").unwrap().unwrap(), b"zip");
        assert_eq!(read.get::<String>(EVENTS, "e1").unwrap().unwrap(), "event");
        assert_eq!(store.generation().unwrap(), 3);

        // Code another front end holds is fetched once, kept, and this
        // front end becomes a holder too.
        plain
            .apply(
                &[Write {
                    table: CODE_HOLDERS,
                    key: "a/other/fe".into(),
                    change: Change::Put(b"null".to_vec()),
                }],
                None,
                false,
            )
            .unwrap();
        assert_eq!(store.code("a/other").unwrap().unwrap(), b"sealed a/other");
        assert!(store
            .read()
            .unwrap()
            .get_bytes(CODE, "a/other")
            .unwrap()
            .is_some());
        let last = fleet.commits.lock().unwrap().last().unwrap().clone();
        assert_eq!(
            last,
            [("code_holders".to_string(), "a/other/fe2".to_string())]
        );
        assert_eq!(store.code("a/missing").unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_corrupt_record_is_named() {
        let dir = temp_dir("corrupt");
        let store = Store::open(&dir).unwrap();
        store
            .write(|t| t.put_bytes(FUNCTIONS, "a/f", b"{not json"))
            .unwrap();
        let err = store
            .read()
            .unwrap()
            .get::<String>(FUNCTIONS, "a/f")
            .unwrap_err();
        assert!(err.to_string().contains("\"a/f\" in functions"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A store with a few hundred records in several tables, closed.
    fn written_store(dir: &Path) -> Vec<(Docs, String, String)> {
        let store = Store::open(dir).unwrap();
        let mut records = Vec::new();
        for i in 0..300u64 {
            let table = [FUNCTIONS, VERSIONS, EVENTS][i as usize % 3];
            let key = numbered("111111111111/f", i);
            let value = format!("record {i} {}", "x".repeat((i % 40) as usize * 10));
            records.push((table, key, value));
        }
        store
            .write(|t| {
                for (table, key, value) in &records {
                    t.put(*table, key, value)?;
                }
                Ok::<_, StoreError>(())
            })
            .unwrap();
        records
    }

    #[test]
    fn a_flipped_byte_anywhere_is_refused_by_name_or_served_right_never_a_panic() {
        let dir = temp_dir("flips");
        let records = written_store(&dir);
        let file = dir.join(STATE_FILE);
        let pristine = std::fs::read(&file).unwrap();
        let (mut refused, mut served, mut failed_calls) = (0, 0, 0);
        let offsets: Vec<usize> = (0..pristine.len())
            .step_by(4096)
            .flat_map(|page| [page, page + 2048])
            .filter(|&o| o < pristine.len())
            .collect();
        for &offset in &offsets {
            let mut damaged = pristine.clone();
            damaged[offset] ^= 0x5a;
            std::fs::write(&file, &damaged).unwrap();
            match Store::open(&dir) {
                Err(e @ StoreError::Damaged { .. }) => {
                    let text = e.to_string();
                    assert!(text.contains(&file.display().to_string()), "{text}");
                    assert!(text.contains("backup"), "{text}");
                    refused += 1;
                }
                Err(e) => panic!("byte {offset}: not a named refusal: {e}"),
                Ok(store) => {
                    served += 1;
                    let Ok(read) = store.read() else {
                        failed_calls += 1;
                        continue;
                    };
                    for (table, key, value) in &records {
                        match read.get::<String>(*table, key) {
                            Ok(Some(got)) => assert_eq!(&got, value, "byte {offset}: {key}"),
                            Ok(None) => panic!("byte {offset}: {key} vanished without an error"),
                            Err(_) => failed_calls += 1,
                        }
                    }
                }
            }
        }
        println!(
            "{} flips: {refused} refused at start, {served} opened ({failed_calls} calls failed)",
            offsets.len()
        );
        assert!(refused > 0, "no flip was noticed: is the check running?");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_cut_or_foreign_state_file_is_refused_by_name() {
        let dir = temp_dir("cut");
        written_store(&dir);
        let file = dir.join(STATE_FILE);
        let whole = std::fs::read(&file).unwrap();
        for damaged in [
            &whole[..whole.len() / 2],
            &whole[..100],
            b"not a database at all",
        ] {
            std::fs::write(&file, damaged).unwrap();
            let err = Store::open(&dir).err().expect("a damaged file opened");
            assert!(matches!(err, StoreError::Damaged { .. }), "{err}");
            assert!(err.to_string().contains("state.redb"), "{err}");
            assert_eq!(
                std::fs::read(&file).unwrap(),
                damaged,
                "the refused file was changed"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
