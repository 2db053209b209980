//! Sealed code disks, end to end: a real worker stores each function's
//! code disk encrypted, and its microVMs read it through the VMM's
//! decrypting block device. Tampering on disk is caught, never served.

use std::path::{Path, PathBuf};

use microvm_tests::worker::{client_runtime, data_dir, RunningWorker};
use microvm_tests::{files_under, ECHO_WAT};

/// The sealed files in the worker's artifact store.
fn sealed_files(data: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(data.join("artifacts"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "sealed"));
    files.sort();
    files
}

/// The one sealed file `create` added.
fn added_by(data: &Path, create: impl FnOnce()) -> PathBuf {
    let before = sealed_files(data);
    create();
    let mut after = sealed_files(data);
    after.retain(|p| !before.contains(p));
    assert_eq!(after.len(), 1, "CreateFunction sealed {after:?}");
    after.remove(0)
}

#[test]
fn code_is_sealed_at_rest_and_tampering_is_refused_not_served() {
    let data = data_dir("lambda-artifacts");
    let worker = RunningWorker::start(&data, &[], "info");
    let client = worker.client();
    let wasm = wat::parse_str(ECHO_WAT).unwrap();
    let rt = client_runtime();
    // Different timeouts make different code disks of the same module.
    let create = |name: &'static str, timeout: u32| {
        let client = client.clone();
        let wasm = wasm.clone();
        added_by(&data, || {
            rt.block_on(client.create_wasm_function(name, &wasm, timeout))
                .unwrap()
        })
    };
    let good = create("sealed-good", 10);
    let flipped = create("sealed-flipped", 11);
    let replayed = create("sealed-replayed", 12);

    // The module's bytes appear nowhere in the data directory: not in
    // the sealed disks, not in the store that keeps the uploaded ZIPs.
    for file in files_under(&data) {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !bytes.windows(wasm.len()).any(|w| w == wasm),
            "the code is on disk in the clear in {}",
            file.display()
        );
    }

    let rt = client_runtime();
    let invoke = |name: &str| {
        rt.block_on(client.invoke(name, r#""sealed""#.into()))
            .unwrap()
    };
    let ok = invoke("sealed-good");
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(&ok.body[..], br#"{"echo":"sealed"}"#);

    // One bit of ciphertext in the middle of the first chunk.
    let mut bytes = std::fs::read(&flipped).unwrap();
    bytes[64 + 12 + 1000] ^= 0x04;
    std::fs::write(&flipped, &bytes).unwrap();
    let r = invoke("sealed-flipped");
    println!(
        "a flipped bit: {} {:?} {}",
        r.status,
        r.function_error,
        String::from_utf8_lossy(&r.body)
    );
    assert!(
        r.status != 200 || r.function_error.is_some(),
        "a tampered disk was served: {r:?}"
    );
    assert!(!r.body.windows(6).any(|w| w == b"sealed"), "{r:?}");
    let log = worker.log();
    assert!(
        log.contains("failed authentication"),
        "the worker's log does not name the failure:\n{log}"
    );

    // Another function's sealed disk, put in place of this one's.
    std::fs::copy(&good, &replayed).unwrap();
    let r = invoke("sealed-replayed");
    assert!(r.status != 200 || r.function_error.is_some(), "{r:?}");
    let log = worker.log();
    assert!(
        log.contains("an older or another artifact was put in its place"),
        "{log}"
    );

    // The untouched function still works.
    assert_eq!(invoke("sealed-good").status, 200);
    worker.stop();
    std::fs::remove_dir_all(&data).unwrap();
}
