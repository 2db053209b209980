//! Function code as uploaded: a ZIP, checked before it is accepted, and
//! the handler's module taken out of it for the code disk.

use std::io::{Cursor, Read};

use crate::error::ApiError;

/// Lambda's limit on a ZIP uploaded in the request.
pub const MAX_ZIP_BYTES: usize = 50 * 1024 * 1024;
/// Lambda's limit on the unzipped code.
pub const MAX_UNZIPPED_BYTES: u64 = 250 * 1024 * 1024;
pub const MAX_ENTRIES: usize = 20_000;
/// Deflate rarely beats 20:1 on code; bombs do by orders of magnitude.
pub const MAX_RATIO: u64 = 100;

fn invalid(message: String) -> ApiError {
    ApiError::InvalidZipFile(message)
}

/// Checks that `zip` is a ZIP a function can use: within the size limits,
/// no entry escaping its root, no link at all, nothing that inflates like
/// a bomb.
pub fn check_zip(zip: &[u8]) -> Result<(), ApiError> {
    if zip.len() > MAX_ZIP_BYTES {
        return Err(ApiError::RequestTooLarge(format!(
            "the ZIP is {} bytes, over the {MAX_ZIP_BYTES}-byte limit for direct upload",
            zip.len()
        )));
    }
    let mut archive = zip::ZipArchive::new(Cursor::new(zip))
        .map_err(|e| invalid(format!("Could not unzip uploaded file: {e}")))?;
    if archive.len() > MAX_ENTRIES {
        return Err(invalid(format!(
            "the ZIP has {} entries, over the limit of {MAX_ENTRIES}",
            archive.len()
        )));
    }
    let mut total: u64 = 0;
    for i in 0..archive.len() {
        let entry = archive
            .by_index(i)
            .map_err(|e| invalid(format!("ZIP entry {i}: {e}")))?;
        let name = entry
            .name()
            .map_err(|e| invalid(format!("ZIP entry {i} has a bad name: {e}")))?
            .to_string();
        if entry.enclosed_name().is_none() {
            return Err(invalid(format!(
                "ZIP entry {name:?} leaves the function's root"
            )));
        }
        if entry.is_symlink() {
            return Err(invalid(format!("ZIP entry {name:?} is a symbolic link")));
        }
        let size = entry.size();
        if size > MAX_RATIO * entry.compressed_size().max(1) && size > 1 << 20 {
            return Err(invalid(format!(
                "ZIP entry {name:?} inflates {size} bytes from {}: a compression ratio over {MAX_RATIO}:1",
                entry.compressed_size()
            )));
        }
        total = total.saturating_add(size);
        if total > MAX_UNZIPPED_BYTES {
            return Err(invalid(format!(
                "the unzipped code exceeds {MAX_UNZIPPED_BYTES} bytes"
            )));
        }
    }
    Ok(())
}

/// The file `name` from a ZIP that passed [`check_zip`]. Reads at most the
/// size the entry declares, so a lying header cannot inflate it further.
pub fn extract(zip: &[u8], name: &str) -> Result<Vec<u8>, ApiError> {
    let mut archive = zip::ZipArchive::new(Cursor::new(zip))
        .map_err(|e| invalid(format!("Could not unzip the code: {e}")))?;
    let entry = archive
        .by_name(name)
        .map_err(|_| ApiError::invalid(format!("the handler file {name:?} is not in the ZIP")))?;
    let declared = entry.size();
    let mut data = Vec::with_capacity(declared.min(MAX_UNZIPPED_BYTES) as usize);
    entry
        .take(declared.min(MAX_UNZIPPED_BYTES) + 1)
        .read_to_end(&mut data)
        .map_err(|e| invalid(format!("ZIP entry {name:?}: {e}")))?;
    if data.len() as u64 != declared {
        return Err(invalid(format!(
            "ZIP entry {name:?} holds {} bytes, not the {declared} its header says",
            data.len()
        )));
    }
    Ok(data)
}

/// The file `name` from the function's code, or else from the last of its
/// layers that has it, as it would be found in `/var/task` then `/opt`.
pub fn extract_with_layers(
    code: &[u8],
    layers: &[impl AsRef<[u8]>],
    name: &str,
) -> Result<Vec<u8>, ApiError> {
    if has_file(code, name) {
        return extract(code, name);
    }
    match layers
        .iter()
        .rev()
        .find(|layer| has_file(layer.as_ref(), name))
    {
        Some(layer) => extract(layer.as_ref(), name),
        None => Err(ApiError::invalid(format!(
            "the handler file {name:?} is in neither the code nor its layers"
        ))),
    }
}

/// A custom runtime's `bootstrap`, at the root of the code or of a layer
/// (`/var/task/bootstrap` or `/opt/bootstrap`); refused as Lambda words it.
pub fn check_bootstrap(code: &[u8], layers: &[impl AsRef<[u8]>]) -> Result<(), ApiError> {
    if has_file(code, "bootstrap") || layers.iter().any(|l| has_file(l.as_ref(), "bootstrap")) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "Couldn't find valid bootstrap(s): [/var/task/bootstrap /opt/bootstrap]",
        ))
    }
}

fn has_file(zip: &[u8], name: &str) -> bool {
    zip::ZipArchive::new(Cursor::new(zip)).is_ok_and(|a| a.index_for_name(name).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use zip::write::SimpleFileOptions;

    fn zip_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (name, data) in files {
            w.start_file(*name, SimpleFileOptions::default()).unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    #[test]
    fn a_custom_runtime_needs_a_bootstrap_in_its_code_or_a_layer() {
        let none: [Vec<u8>; 0] = [];
        let with = zip_of(&[("bootstrap", b"#!")]);
        let without = zip_of(&[("main.sh", b"#!"), ("bin/bootstrap", b"#!")]);
        assert!(check_bootstrap(&with, &none).is_ok());
        assert!(check_bootstrap(&without, std::slice::from_ref(&with)).is_ok());
        let refused = check_bootstrap(&without, std::slice::from_ref(&without)).unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("Couldn't find valid bootstrap(s)"),
            "{refused}"
        );
    }

    #[test]
    fn a_plain_zip_passes_and_yields_its_files() {
        let zip = zip_of(&[("function.wasm", b"\0asm\x01\0\0\0"), ("lib/x.txt", b"x")]);
        check_zip(&zip).unwrap();
        assert_eq!(extract(&zip, "function.wasm").unwrap(), b"\0asm\x01\0\0\0");
        let err = extract(&zip, "missing.wasm").unwrap_err();
        assert!(err.to_string().contains("\"missing.wasm\""), "{err}");
    }

    #[test]
    fn the_handler_comes_from_the_code_first_then_the_last_layer_that_has_it() {
        let code = zip_of(&[("own.wasm", b"code")]);
        let first = zip_of(&[("shared.wasm", b"first"), ("only-first.wasm", b"1")]);
        let second = zip_of(&[("shared.wasm", b"second"), ("own.wasm", b"layer")]);
        let layers = [first.as_slice(), second.as_slice()];
        assert_eq!(
            extract_with_layers(&code, &layers, "own.wasm").unwrap(),
            b"code"
        );
        assert_eq!(
            extract_with_layers(&code, &layers, "shared.wasm").unwrap(),
            b"second"
        );
        assert_eq!(
            extract_with_layers(&code, &layers, "only-first.wasm").unwrap(),
            b"1"
        );
        let err = extract_with_layers(&code, &layers, "none.wasm").unwrap_err();
        assert!(
            err.to_string().contains("neither the code nor its layers"),
            "{err}"
        );
    }

    #[test]
    fn traversal_and_garbage_are_refused_by_name() {
        let zip = zip_of(&[("../../etc/passwd", b"root")]);
        let err = check_zip(&zip).unwrap_err();
        assert!(
            err.to_string().contains("leaves the function's root"),
            "{err}"
        );
        let err = check_zip(b"PK\x03\x04 not really").unwrap_err();
        assert!(matches!(err, ApiError::InvalidZipFile(_)), "{err:?}");
    }

    #[test]
    fn bombs_are_refused() {
        let zeros = vec![0u8; 8 << 20];
        let zip = zip_of(&[("zeros.bin", &zeros)]);
        let err = check_zip(&zip).unwrap_err();
        assert!(err.to_string().contains("compression ratio"), "{err}");
    }
}
