//! The Linux guest's code disk: a function's ZIP (or a flattened
//! container image, see `oci`) as an EROFS image, the read-only
//! filesystem the guest kernel mounts at /var/task. EROFS is
//! built for this (read-only, compact for small files, no journal to
//! replay); Debian's `mkfs.erofs` makes it, with fixed timestamps, owner
//! and UUID so that the same ZIP always gives the same image.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::artifacts::code::MAX_UNZIPPED_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum ErofsError {
    #[error("the ZIP: {0}")]
    Zip(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mkfs.erofs: {0} (scripts/setup.sh installs erofs-utils)")]
    Mkfs(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ErofsError + '_ {
    move |source| ErofsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Builds the image of `zip` (checked by `code::check_zip`).
pub fn build(zip: &[u8]) -> Result<Vec<u8>, ErofsError> {
    build_with(|tree| extract_all(zip, tree))
}

/// Builds the image of a function's layers (each checked by
/// `code::check_zip`), extracted in order into one tree: a later layer's
/// file replaces an earlier one's, as in Lambda's /opt.
pub fn build_layers(zips: &[impl AsRef<[u8]>]) -> Result<Vec<u8>, ErofsError> {
    build_with(|tree| {
        zips.iter()
            .try_for_each(|zip| extract_all(zip.as_ref(), tree))
    })
}

/// Builds an image of the tree `fill` writes into an empty directory. The
/// files pass through a scratch directory in RAM when the host has one
/// (`/dev/shm`), and it is removed before this returns.
pub fn build_with<E>(fill: impl FnOnce(&Path) -> Result<(), E>) -> Result<Vec<u8>, E>
where
    E: From<ErofsError>,
{
    let base = Path::new("/dev/shm");
    let base = if base.is_dir() {
        base.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let scratch = base.join(format!("erofs-{}", uuid::Uuid::new_v4()));
    let tree = scratch.join("tree");
    let result = std::fs::create_dir_all(&tree)
        .map_err(|e| E::from(io(&tree)(e)))
        .and_then(|()| fill(&tree))
        .and_then(|()| mkfs(&tree, &scratch.join("image.erofs")).map_err(E::from));
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// `mkfs.erofs` with fixed timestamps, owner and UUID.
fn mkfs(tree: &Path, image: &Path) -> Result<Vec<u8>, ErofsError> {
    let out = Command::new("mkfs.erofs")
        .args([
            "--quiet",
            "-T0",
            "--all-root",
            "-U00000000-0000-0000-0000-000000000000",
        ])
        .arg(image)
        .arg(tree)
        .output()
        .map_err(|e| ErofsError::Mkfs(e.to_string()))?;
    if !out.status.success() {
        return Err(ErofsError::Mkfs(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    std::fs::read(image).map_err(io(image))
}

/// Writes every entry of `zip` under `root`, with the executable bits
/// its Unix mode gives and nothing else of it (no set-id bits, no links).
fn extract_all(zip: &[u8], root: &Path) -> Result<(), ErofsError> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(zip))
        .map_err(|e| ErofsError::Zip(e.to_string()))?;
    let mut budget = MAX_UNZIPPED_BYTES;
    for i in 0..archive.len() {
        let mut entry = archive
            .by_index(i)
            .map_err(|e| ErofsError::Zip(e.to_string()))?;
        let Some(relative) = entry.enclosed_name() else {
            return Err(ErofsError::Zip(format!(
                "{:?} leaves the code's root",
                entry.name()
            )));
        };
        let path = root.join(relative);
        if entry.is_dir() {
            std::fs::create_dir_all(&path).map_err(io(&path))?;
            continue;
        }
        if entry.is_symlink() {
            return Err(ErofsError::Zip(format!("{:?} is a link", entry.name())));
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let mut data = Vec::new();
        (&mut entry)
            .take(budget + 1)
            .read_to_end(&mut data)
            .map_err(|e| ErofsError::Zip(format!("{:?}: {e}", entry.name())))?;
        budget = budget
            .checked_sub(data.len() as u64)
            .ok_or_else(|| ErofsError::Zip("the code unzips past its limit".into()))?;
        std::fs::write(&path, &data).map_err(io(&path))?;
        let executable = entry.unix_mode().is_some_and(|m| m & 0o111 != 0);
        let mode = if executable { 0o755 } else { 0o644 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(io(&path))?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    fn zip_of(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        let mut zip = zip::ZipWriter::new(&mut out);
        for (name, data, mode) in files {
            let options = zip::write::SimpleFileOptions::default().unix_permissions(*mode);
            zip.start_file(*name, options).unwrap();
            zip.write_all(data).unwrap();
        }
        zip.finish().unwrap();
        out.into_inner()
    }

    pub(crate) fn mkfs_present() -> bool {
        if Command::new("mkfs.erofs").arg("--help").output().is_ok() {
            return true;
        }
        println!("SKIPPED: mkfs.erofs is not installed (scripts/test.sh installs erofs-utils)");
        false
    }

    #[test]
    fn a_zip_becomes_the_same_erofs_image_every_time_and_fsck_reads_it_back() {
        if !mkfs_present() {
            return;
        }
        let zip = zip_of(&[
            ("bootstrap", b"#!/bin/sh\necho hi\n", 0o755),
            ("lib/handler.txt", b"the handler", 0o644),
        ]);
        let image = build(&zip).unwrap();
        assert_eq!(
            &image[1024..1028],
            &0xe0f5_e1e2u32.to_le_bytes(),
            "EROFS magic"
        );
        assert_eq!(build(&zip).unwrap(), image, "not reproducible");
        // Extract it with the filesystem's own checker and compare.
        let dir = std::env::temp_dir().join(format!("erofs-check-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("code.erofs");
        std::fs::write(&img, &image).unwrap();
        let out = Command::new("fsck.erofs")
            .arg(format!("--extract={}", dir.join("x").display()))
            .arg(&img)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let bootstrap = dir.join("x/bootstrap");
        assert_eq!(std::fs::read(&bootstrap).unwrap(), b"#!/bin/sh\necho hi\n");
        let mode = std::fs::metadata(&bootstrap).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(
            std::fs::read(dir.join("x/lib/handler.txt")).unwrap(),
            b"the handler"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn entries_leaving_the_root_are_refused() {
        let zip = zip_of(&[("../evil", b"x", 0o644)]);
        let err = build(&zip).unwrap_err();
        assert!(err.to_string().contains("leaves the code's root"), "{err}");
    }
}
