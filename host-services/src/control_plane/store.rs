//! The worker's durable state in one embedded database (redb) in the data
//! directory: functions, versions, aliases, layers, function code and the
//! queue of asynchronous events. Each API call is one transaction, so a
//! crash leaves either all of a call's changes or none.

use std::ops::Bound;
use std::path::Path;

use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
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
/// `ACCOUNT/SHA256` → the code ZIP as uploaded.
pub const CODE: Docs = TableDefinition::new("code");
/// Event id → an accepted asynchronous invocation not yet done.
pub const EVENTS: Docs = TableDefinition::new("events");
/// `ACCOUNT/NAME/QUALIFIER` → a provisioned concurrency config.
pub const PROVISIONED: Docs = TableDefinition::new("provisioned");

const ALL: [Docs; 7] = [
    FUNCTIONS,
    VERSIONS,
    ALIASES,
    LAYERS,
    CODE,
    EVENTS,
    PROVISIONED,
];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] redb::Error),
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

pub struct Store {
    db: Database,
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

/// A write transaction: reads see its own writes.
pub struct Txn {
    tx: WriteTransaction,
}

impl Txn {
    pub fn get<T: DeserializeOwned>(
        &self,
        table: Docs,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        get_in(table, &self.tx.open_table(table)?, key)
    }

    pub fn scan<T: DeserializeOwned>(
        &self,
        table: Docs,
        prefix: &str,
    ) -> Result<Vec<(String, T)>, StoreError> {
        scan_in(table, &self.tx.open_table(table)?, prefix)
    }

    pub fn put<T: Serialize>(&self, table: Docs, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).expect("records serialize");
        self.put_bytes(table, key, &bytes)
    }

    pub fn put_bytes(&self, table: Docs, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.tx.open_table(table)?.insert(key, bytes)?;
        Ok(())
    }

    pub fn get_bytes(&self, table: Docs, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tx
            .open_table(table)?
            .get(key)?
            .map(|v| v.value().to_vec()))
    }

    pub fn remove(&self, table: Docs, key: &str) -> Result<(), StoreError> {
        self.tx.open_table(table)?.remove(key)?;
        Ok(())
    }

    /// Removes every record under `prefix/`.
    pub fn remove_prefix(&self, table: Docs, prefix: &str) -> Result<(), StoreError> {
        let start = format!("{prefix}/");
        self.tx
            .open_table(table)?
            .retain(|k, _| !k.starts_with(&start))?;
        Ok(())
    }
}

/// A consistent read-only view.
pub struct Snapshot {
    tx: ReadTransaction,
}

impl Snapshot {
    pub fn get<T: DeserializeOwned>(
        &self,
        table: Docs,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        get_in(table, &self.tx.open_table(table)?, key)
    }

    pub fn scan<T: DeserializeOwned>(
        &self,
        table: Docs,
        prefix: &str,
    ) -> Result<Vec<(String, T)>, StoreError> {
        scan_in(table, &self.tx.open_table(table)?, prefix)
    }

    pub fn get_bytes(&self, table: Docs, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tx
            .open_table(table)?
            .get(key)?
            .map(|v| v.value().to_vec()))
    }

    /// Every record of `table`.
    pub fn all<T: DeserializeOwned>(&self, table: Docs) -> Result<Vec<(String, T)>, StoreError> {
        let open = self.tx.open_table(table)?;
        let mut out = Vec::new();
        for entry in open.iter()? {
            let (k, v) = entry?;
            out.push((k.value().to_string(), decode(table, k.value(), v.value())?));
        }
        Ok(out)
    }
}

impl Store {
    /// Opens (or creates) `dir/state.redb`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = Database::create(dir.join("state.redb"))?;
        let tx = db.begin_write()?;
        for table in ALL {
            tx.open_table(table)?;
        }
        tx.commit()?;
        Ok(Store { db })
    }

    /// Runs `f` in one write transaction, committed only if `f` succeeds.
    pub fn write<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&Txn) -> Result<T, E>,
    ) -> Result<T, E> {
        let txn = Txn {
            tx: self.db.begin_write().map_err(StoreError::from)?,
        };
        let out = f(&txn)?;
        txn.tx.commit().map_err(StoreError::from)?;
        Ok(out)
    }

    pub fn read(&self) -> Result<Snapshot, StoreError> {
        Ok(Snapshot {
            tx: self.db.begin_read()?,
        })
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
}
