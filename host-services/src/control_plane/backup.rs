//! Backups an operator can restore: a consistent copy of the state file
//! (one read transaction, taken while the worker serves) and the key files
//! that open the sealed code in it, together in a directory of their own
//! under `DIR/backups/`. Restoring is copying both into a data directory
//! (docs/worker.md, "State and backups"); sealed code disks are rebuilt
//! from the stored ZIPs on first use, snapshots by the next cold start.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::control_plane::store::{Store, StoreError, STATE_FILE};

/// Backups kept; older ones are removed after a new one is complete.
pub const KEPT: usize = 3;
/// A backup being written; never taken for a complete one.
const PARTIAL: &str = ".partial-";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("backup {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("backup of the state: {0}")]
    Store(#[from] StoreError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a backup of `store` and the files of `keys_dir` into a new
/// directory of `backups_dir`, named by the time in milliseconds, and
/// removes all but the newest [`KEPT`]. Returns the new backup's path.
pub fn write_backup(
    store: &Store,
    keys_dir: &Path,
    backups_dir: &Path,
) -> Result<PathBuf, BackupError> {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let name = format!("{millis:016}");
    let partial = backups_dir.join(format!("{PARTIAL}{name}"));
    let done = backups_dir.join(&name);
    std::fs::create_dir_all(partial.join("keys")).map_err(io(&partial))?;
    store.copy_to(&partial.join(STATE_FILE))?;
    for entry in std::fs::read_dir(keys_dir).map_err(io(keys_dir))? {
        let from = entry.map_err(io(keys_dir))?.path();
        if from.is_file() {
            let to = partial
                .join("keys")
                .join(from.file_name().unwrap_or_default());
            // std::fs::copy keeps the key files' 0600 mode.
            std::fs::copy(&from, &to).map_err(io(&from))?;
        }
    }
    std::fs::rename(&partial, &done).map_err(io(&done))?;
    prune(backups_dir)?;
    Ok(done)
}

/// Removes complete backups beyond the newest [`KEPT`], and partial ones
/// other than the one being written (left by a crash).
fn prune(backups_dir: &Path) -> Result<(), BackupError> {
    let mut complete = Vec::new();
    for entry in std::fs::read_dir(backups_dir).map_err(io(backups_dir))? {
        let path = entry.map_err(io(backups_dir))?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with(PARTIAL) {
            std::fs::remove_dir_all(&path).map_err(io(&path))?;
        } else if name.chars().all(|c| c.is_ascii_digit()) {
            complete.push(path);
        }
    }
    complete.sort();
    let excess = complete.len().saturating_sub(KEPT);
    for old in &complete[..excess] {
        std::fs::remove_dir_all(old).map_err(io(old))?;
    }
    Ok(())
}

/// Writes a backup every `every`, first after one period, on a blocking
/// thread; a failed backup is logged and the next one tried.
pub fn spawn_backups(store: Store, keys_dir: PathBuf, backups_dir: PathBuf, every: Duration) {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let (store, keys, backups) = (store.clone(), keys_dir.clone(), backups_dir.clone());
            match tokio::task::spawn_blocking(move || write_backup(&store, &keys, &backups)).await {
                Ok(Ok(path)) => tracing::info!("state backed up to {}", path.display()),
                Ok(Err(e)) => tracing::error!("{e}; the next backup is tried in {every:?}"),
                Err(e) => tracing::error!("the backup stopped: {e}"),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control_plane::store::FUNCTIONS;

    #[test]
    fn a_backup_holds_the_state_and_keys_and_only_the_newest_are_kept() {
        let dir = std::env::temp_dir().join(format!("backup-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (data, keys, backups) = (dir.join("data"), dir.join("keys"), dir.join("backups"));
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(&keys).unwrap();
        std::fs::write(keys.join("master-1.key"), [7u8; 32]).unwrap();
        let store = Store::open(&data).unwrap();
        let mut written = Vec::new();
        for i in 0..5 {
            store
                .write(|t| t.put(FUNCTIONS, "a/f", &format!("revision {i}")))
                .unwrap();
            written.push(write_backup(&store, &keys, &backups).unwrap());
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let mut left: Vec<PathBuf> = std::fs::read_dir(&backups)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        left.sort();
        assert_eq!(left, written[2..], "the newest three, nothing partial");
        let newest = left.last().unwrap();
        assert_eq!(
            std::fs::read(newest.join("keys/master-1.key")).unwrap(),
            [7u8; 32]
        );
        let restored = Store::open(newest).unwrap();
        let got: Option<String> = restored.read().unwrap().get(FUNCTIONS, "a/f").unwrap();
        assert_eq!(got.as_deref(), Some("revision 4"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
