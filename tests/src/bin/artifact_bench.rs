//! Artifact ingest benchmark: the optimize-once path a 50 MB ZIP takes on
//! CreateFunction, stage by stage: checking the archive (limits,
//! traversal, bombs), extracting the handler, building the code disk, and
//! sealing it into the artifact store (AES-256-GCM chunks, written once).

use std::sync::Arc;
use std::time::{Duration, Instant};

use host_services::artifacts::code::{self, MAX_ZIP_BYTES};
use host_services::artifacts::sealed::ArtifactStore;
use host_services::artifacts::wasm_image;
use host_services::security::key_service::KeyService;
use microvm_tests::lambda_client::zip_one;

/// A wasm module whose data segment is `data`.
fn module_with_data(data: &[u8]) -> Vec<u8> {
    fn leb(mut n: u64, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    let pages = (data.len() as u64).div_ceil(65536);
    let mut memory = vec![1, 0];
    leb(pages, &mut memory);
    m.push(5);
    leb(memory.len() as u64, &mut m);
    m.extend_from_slice(&memory);
    let mut segment = vec![1, 0, 0x41, 0, 0x0b];
    leb(data.len() as u64, &mut segment);
    segment.extend_from_slice(data);
    m.push(11);
    leb(segment.len() as u64, &mut m);
    m.extend_from_slice(&segment);
    m
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let mut data = vec![0u8; MAX_ZIP_BYTES - (64 << 10)];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let zip = zip_one("function.wasm", &module_with_data(&data));
    drop(data);
    let dir = std::env::temp_dir().join(format!("artifact-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let keys = Arc::new(KeyService::open(&dir.join("keys")).expect("key service"));
    let store = ArtifactStore::open(&dir.join("artifacts"), keys).expect("artifact store");

    let start = Instant::now();
    code::check_zip(&zip).expect("a valid ZIP");
    let checked = start.elapsed();
    let module = code::extract(&zip, "function.wasm").expect("the handler");
    let extracted = start.elapsed();
    let image = wasm_image::build(&module, 1 << 40).expect("a code disk");
    let built = start.elapsed();
    let artifact = store.put("bench", &image).expect("sealed");
    let sealed = start.elapsed();
    let on_disk = std::fs::metadata(&artifact.path).map_or(0, |m| m.len());
    println!(
        "ingest of a {:.1} MB ZIP (one incompressible {:.1} MB module): {:.1} ms",
        zip.len() as f64 / 1e6,
        module.len() as f64 / 1e6,
        ms(sealed)
    );
    println!(
        "  check {:.1} ms, extract {:.1} ms, build the code disk {:.1} ms, seal and write {:.1} ms ({:.0} MB/s)",
        ms(checked),
        ms(extracted - checked),
        ms(built - extracted),
        ms(sealed - built),
        image.len() as f64 / 1e6 / (sealed - built).as_secs_f64()
    );
    println!(
        "  sealed artifact: {on_disk} bytes for a {}-byte image (+{:.3} %)",
        image.len(),
        (on_disk as f64 / image.len() as f64 - 1.0) * 100.0
    );
    std::fs::remove_dir_all(&dir).expect("clean up");
}
