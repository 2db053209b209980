//! Chunked code disks, the way container images reach a microVM: the disk
//! is stored as convergently sealed 512 KiB chunks in a content-addressed
//! store, and the VMM fetches and decrypts a chunk only when the guest
//! first reads it. An altered chunk is an I/O error for the guest, never
//! wrong bytes.

use std::path::Path;
use std::time::Duration;

use guest_init::environ::encode;
use host_services::artifacts::chunk_store::ChunkStore;
use host_services::artifacts::wasm_image;
use host_services::data_plane::runtime_api::{InvokeError, Outcome};
use microvm_tests::guest_ports::{spawn_vmm, test_dir, GuestPorts};
use microvm_tests::{baremetal_guest, ECHO_WAT};
use vmm::devices::virtio::block::chunked::chunk_path;

const TIMEOUT: Duration = Duration::from_secs(30);
/// What one invocation never reads: most of a container image.
const FILLER: usize = 8 << 20;

/// Boots the bare-metal guest on the chunked disk in `dir`, invokes it
/// once, and returns the outcome and what the VMM logged.
async fn boot_and_invoke(dir: &Path, run: &'static str) -> (Result<Outcome, InvokeError>, String) {
    let run_dir = dir.join(run);
    std::fs::create_dir_all(&run_dir).unwrap();
    let ports = GuestPorts::bind(&run_dir, Some(encode([("AWS_REGION", "local")]).unwrap())).await;
    let (vmm, _console) = spawn_vmm(
        &[
            "--kernel".into(),
            baremetal_guest().display().to_string(),
            "--drive".into(),
            format!(
                "{},ro,manifest={}",
                dir.join("chunks").display(),
                dir.join("manifest").display()
            ),
            "--vsock".into(),
            format!("cid=3,uds={}", ports.uds.display()),
            "--log-level".into(),
            "info".into(),
        ],
        run,
    );
    let outcome = ports
        .api
        .invoke("chunked", "{\"n\":1}".into(), TIMEOUT)
        .await;
    drop(ports);
    let out = tokio::time::timeout(TIMEOUT, vmm.wait_with_output())
        .await
        .expect("the VM stops once its Runtime API is gone")
        .unwrap();
    (outcome, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_code_disk_is_fetched_lazily_and_tampering_is_an_io_error() {
    let dir = test_dir("chunked-disk");
    let module = wat::parse_str(ECHO_WAT).unwrap();
    let mut image = wasm_image::build(&module, 0).unwrap();
    image.extend((0..FILLER).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    let store = ChunkStore::open(&dir.join("chunks"), &dir.join("convergence.key")).unwrap();
    let stored = store.put(&image).unwrap();
    std::fs::write(dir.join("manifest"), stored.manifest.encode()).unwrap();

    let (outcome, log) = boot_and_invoke(&dir, "first").await;
    assert_eq!(
        outcome.unwrap(),
        Outcome::Response("{\"echo\":{\"n\":1}}".into()),
        "{log}"
    );
    let fetched = log
        .split("chunked image: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or_else(|| panic!("no chunk count in the VMM's log:\n{log}"));
    let total = stored.manifest.chunks.len();
    println!("a cold start fetched {fetched} of the disk's {total} chunks");
    assert!(fetched >= 1 && fetched < total / 4, "{fetched} of {total}");

    // The chunk holding the module, altered in the store.
    let first = chunk_path(&dir.join("chunks"), &stored.manifest.chunks[0].address);
    let mut bytes = std::fs::read(&first).unwrap();
    bytes[1000] ^= 1;
    std::fs::write(&first, bytes).unwrap();
    let (outcome, log) = boot_and_invoke(&dir, "tampered").await;
    match outcome {
        Err(InvokeError::InitFailed { error_type, body }) => {
            assert_eq!(error_type, "Runtime.InvalidFunction", "{body}");
        }
        other => panic!("a tampered disk gave {other:?}\n{log}"),
    }
    assert!(log.contains("altered or swapped"), "{log}");
    std::fs::remove_dir_all(&dir).unwrap();
}
