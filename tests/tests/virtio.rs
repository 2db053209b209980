//! virtio devices end to end: the bare-metal guest drives vsock and block
//! under this VMM, and the host side of each check runs here.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use microvm_tests::{baremetal_guest, run_vmm, VmmRun};

const DEADLINE: Duration = Duration::from_secs(60);

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("virtio-test-{}-{name}", std::process::id()))
}

/// Deterministic bytes that no two offsets of a small window share.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn run_guest(args: &[&str]) -> VmmRun {
    let guest = baremetal_guest();
    let mut all = vec!["--kernel", guest.to_str().unwrap()];
    all.extend_from_slice(args);
    run_vmm(&all, DEADLINE)
}

/// Sends `data` on `stream` while reading the echo back; returns the echo.
/// Sends `data` and reads the echo; a reader that `pauses_after` so many
/// bytes stops a while, as a busy host program would.
fn echo_through(mut stream: UnixStream, data: Vec<u8>, pauses_after: Option<usize>) -> Vec<u8> {
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        writer.write_all(&data).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut echoed = Vec::new();
    if let Some(n) = pauses_after {
        (&mut stream)
            .take(n as u64)
            .read_to_end(&mut echoed)
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    stream.read_to_end(&mut echoed).unwrap();
    sender.join().unwrap();
    echoed
}

#[test]
fn vsock_guest_to_host_connection_echoes_1_mib() {
    let uds = scratch("g2h.sock");
    let listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    let data = pattern(1 << 20, 1);
    let expected = data.clone();
    let host = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        // The guest sends its last bytes, and exits, while the reader
        // pauses: the VMM must still hand them over.
        echo_through(stream, data, Some(768 << 10))
    });
    let vsock = format!("cid=3,uds={}", uds.display());
    let run = run_guest(&[
        "--vsock",
        &vsock,
        "--cmdline",
        "baremetal.run=vsock-echo:5000",
    ]);
    let echoed = host.join().unwrap();
    let _ = std::fs::remove_file(format!("{}_5000", uds.display()));
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("vsock echoed 1048576 bytes"),
        "{}",
        run.stdout
    );
    assert!(
        echoed == expected,
        "echo differs ({} bytes back)",
        echoed.len()
    );
}

#[test]
fn vsock_host_to_guest_connection_echoes_1_mib() {
    let uds = scratch("h2g.sock");
    let vsock = format!("cid=7,uds={}", uds.display());
    let guest = std::thread::spawn(move || {
        run_guest(&[
            "--vsock",
            &vsock,
            "--cmdline",
            "baremetal.run=vsock-serve:6000",
        ])
    });
    let stream = (0..500)
        .find_map(|_| {
            UnixStream::connect(&uds).ok().or_else(|| {
                std::thread::sleep(Duration::from_millis(10));
                None
            })
        })
        .expect("the VMM's vsock socket appears");
    let mut s = stream;
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(b"CONNECT 6000\n").unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte != [b'\n'] {
        s.read_exact(&mut byte).unwrap();
        line.push(byte[0]);
    }
    let line = String::from_utf8(line).unwrap();
    assert!(line.starts_with("OK ") && line.ends_with('\n'), "{line:?}");
    let data = pattern(1 << 20, 2);
    let echoed = echo_through(s, data.clone(), None);
    let run = guest.join().unwrap();
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("vsock cid 7 listening on 6000"),
        "{}",
        run.stdout
    );
    assert!(echoed == data, "echo differs ({} bytes back)", echoed.len());
}

/// The guest's FNV-1a 64 of the disk, recomputed here.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[test]
fn block_reads_and_writes_are_exact() {
    let image = scratch("rw.img");
    let original = pattern(2 << 20, 3);
    std::fs::write(&image, &original).unwrap();
    let drive = image.display().to_string();
    let run = run_guest(&["--drive", &drive, "--cmdline", "baremetal.run=blk-check"]);
    let after = std::fs::read(&image).unwrap();
    std::fs::remove_file(&image).unwrap();
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains(&format!(
            "block read {} bytes, fnv1a64 {:016x}",
            original.len(),
            fnv1a(&original)
        )),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("block write verified"),
        "{}",
        run.stdout
    );
    // Exactly the 4 KiB at sector 8 changed, to the guest's pattern.
    let written: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 13) as u8).collect();
    assert_eq!(after[4096..8192], written[..]);
    assert_eq!(after[..4096], original[..4096]);
    assert_eq!(after[8192..], original[8192..]);
}

#[test]
fn a_read_only_drive_refuses_writes() {
    let image = scratch("ro.img");
    let original = pattern(1 << 20, 4);
    std::fs::write(&image, &original).unwrap();
    let drive = format!("{},ro", image.display());
    let run = run_guest(&["--drive", &drive, "--cmdline", "baremetal.run=blk-check"]);
    let after = std::fs::read(&image).unwrap();
    std::fs::remove_file(&image).unwrap();
    assert!(
        run.stdout.contains("block write refused: device status 1"),
        "{}",
        run.stdout
    );
    assert!(after == original, "a read-only image changed");
}
