//! The worker's durable state in one embedded database (redb) in the data
//! directory: functions, versions, aliases, layers, function code and the
//! queue of asynchronous events. Each API call is one transaction, so a
//! crash leaves either all of a call's changes or none.

use std::ops::Bound;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, TableHandle,
    WriteTransaction,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

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

const ALL: [Docs; 8] = [
    FUNCTIONS,
    VERSIONS,
    ALIASES,
    LAYERS,
    DELETED_LAYERS,
    CODE,
    EVENTS,
    PROVISIONED,
];

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
        }
    };
}

record_reads!(Txn);
record_reads!(Snapshot);

/// A write transaction: reads see its own writes.
pub struct Txn {
    tx: WriteTransaction,
}

impl Txn {
    pub fn put<T: Serialize>(&self, table: Docs, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).expect("records serialize");
        self.put_bytes(table, key, &bytes)
    }

    pub fn put_bytes(&self, table: Docs, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        guarded(|| {
            self.tx.open_table(table)?.insert(key, bytes)?;
            Ok(())
        })
    }

    pub fn remove(&self, table: Docs, key: &str) -> Result<(), StoreError> {
        guarded(|| {
            self.tx.open_table(table)?.remove(key)?;
            Ok(())
        })
    }

    /// Removes every record under `prefix/`.
    pub fn remove_prefix(&self, table: Docs, prefix: &str) -> Result<(), StoreError> {
        guarded(|| {
            let start = format!("{prefix}/");
            self.tx
                .open_table(table)?
                .retain(|k, _| !k.starts_with(&start))?;
            Ok(())
        })
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
        let store = Store { db: Arc::new(db) };
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

    /// Runs `f` in one write transaction, committed only if `f` succeeds.
    pub fn write<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&Txn) -> Result<T, E>,
    ) -> Result<T, E> {
        let txn = Txn {
            tx: guarded(|| Ok(self.db.begin_write()?))?,
        };
        let out = f(&txn)?;
        guarded(|| Ok(txn.tx.commit()?))?;
        Ok(out)
    }

    pub fn read(&self) -> Result<Snapshot, StoreError> {
        guarded(|| {
            Ok(Snapshot {
                tx: self.db.begin_read()?,
            })
        })
    }
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
