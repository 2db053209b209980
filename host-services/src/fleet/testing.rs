//! For the fleet's tests (here and end to end): the fleet's certificates,
//! made by the project's own script, and scratch directories.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Certificates for `names` (`NAME` or `NAME=IP,...`) under the authority
/// in `dir`, made by `scripts/fleet-certs.sh`.
pub fn fleet_certs(dir: &Path, names: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/fleet-certs.sh");
    let out = Command::new(script).arg(dir).args(names).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A new directory under the system's temporary one.
pub fn temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fleet-{what}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
