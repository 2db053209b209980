//! Device benchmark: vsock round-trip latency and throughput, and block
//! read throughput, each next to the same operation without a VM: a Unix
//! socket pair with an echo thread, and reads of the same file on the host
//! (the physical limit). The bare-metal guest is the VM side. The disk is
//! read twice, raw and sealed (AES-256-GCM chunks decrypted by the VMM as
//! the guest reads them): the ratio is what encryption at rest costs.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use microvm_tests::{baremetal_guest, hypervisor, vmm_binary};
use vmm::devices::virtio::block::sealed;
use vmm::devices::virtio::block::{BlockBackend, RawFile};

const PINGS: usize = 2000;
const STREAM_BYTES: usize = 64 << 20;
const DISK_BYTES: usize = 64 << 20;
const CHUNK: usize = 64 << 10;

fn scratch(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("device-bench-{}-{name}", std::process::id()))
}

/// The bare-metal guest with `args`; `stdin` is what the VMM reads there
/// (a sealed drive's key).
fn spawn_guest(args: &[&str], stdin: &str) -> Child {
    let guest = baremetal_guest();
    let mut child = Command::new(vmm_binary())
        .arg("--kernel")
        .arg(guest)
        .args(["--log-level", "warn"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn vmm");
    let mut pipe = child.stdin.take().expect("piped stdin");
    pipe.write_all(stdin.as_bytes())
        .expect("write the VMM's stdin");
    child
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Round trips of one byte, then a bulk echo; returns (median RTT, MiB/s
/// of payload each way).
fn measure_echo(stream: UnixStream) -> (Duration, f64) {
    let mut s = stream;
    let mut byte = [0u8; 1];
    let mut rtts = Vec::with_capacity(PINGS);
    for i in 0..PINGS {
        let t = Instant::now();
        s.write_all(&[i as u8]).unwrap();
        s.read_exact(&mut byte).unwrap();
        rtts.push(t.elapsed());
    }
    let mut writer = s.try_clone().unwrap();
    let start = Instant::now();
    let sender = std::thread::spawn(move || {
        let chunk = vec![0x5au8; CHUNK];
        for _ in 0..STREAM_BYTES / CHUNK {
            writer.write_all(&chunk).unwrap();
        }
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0usize;
    while got < STREAM_BYTES {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "echo ended early at {got} bytes");
        got += n;
    }
    let secs = start.elapsed().as_secs_f64();
    sender.join().unwrap();
    (median(rtts), STREAM_BYTES as f64 / secs / (1 << 20) as f64)
}

fn vsock_in_vm() -> (Duration, f64) {
    let uds = scratch("vsock");
    let listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    let vsock = format!("cid=3,uds={}", uds.display());
    let mut child = spawn_guest(
        &[
            "--vsock",
            &vsock,
            "--cmdline",
            "baremetal.run=vsock-echo:5000",
        ],
        "",
    );
    let (stream, _) = listener.accept().unwrap();
    let result = measure_echo(stream);
    let _ = child.wait();
    let _ = std::fs::remove_file(format!("{}_5000", uds.display()));
    result
}

fn unix_pair() -> (Duration, f64) {
    let (a, mut b) = UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = b.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            b.write_all(&buf[..n]).unwrap();
        }
    });
    let result = measure_echo(a);
    echo.join().unwrap();
    result
}

/// MiB/s of the guest reading its whole first disk, `drive` (a --drive
/// value), with `key` on the VMM's stdin.
fn block_in_vm(drive: &str, key: &str) -> f64 {
    let child = spawn_guest(
        &["--drive", drive, "--cmdline", "baremetal.run=blk-check"],
        key,
    );
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let us: f64 = stdout
        .split(" in ")
        .nth(1)
        .and_then(|r| r.split(" us").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no timing in {stdout}"));
    DISK_BYTES as f64 / (us / 1e6) / (1 << 20) as f64
}

/// MiB/s of reading the whole image on the host through a block backend
/// (the raw file, page cache warm, or the sealed one), in 64 KiB reads.
fn block_on_host(backend: &mut dyn BlockBackend) -> f64 {
    let mut buf = vec![0u8; CHUNK];
    let start = Instant::now();
    for i in 0..DISK_BYTES / CHUNK {
        backend.read_at(&mut buf, (i * CHUNK) as u64).unwrap();
    }
    DISK_BYTES as f64 / start.elapsed().as_secs_f64() / (1 << 20) as f64
}

fn main() {
    println!(
        "device benchmark on {}: {PINGS} one-byte round trips, {} MiB echo, {} MiB disk read",
        hypervisor(),
        STREAM_BYTES >> 20,
        DISK_BYTES >> 20
    );
    let (vm_rtt, vm_mibs) = vsock_in_vm();
    let (pair_rtt, pair_mibs) = unix_pair();
    println!(
        "vsock round trip (median):   vm {:8.1} us   unix socket pair {:8.1} us   ratio {:.1}x",
        vm_rtt.as_secs_f64() * 1e6,
        pair_rtt.as_secs_f64() * 1e6,
        vm_rtt.as_secs_f64() / pair_rtt.as_secs_f64()
    );
    println!(
        "vsock echo throughput:        vm {vm_mibs:8.1} MiB/s unix socket pair {pair_mibs:8.1} MiB/s ratio {:.2}",
        vm_mibs / pair_mibs
    );
    let image = scratch("disk.img");
    let mut data = vec![0u8; DISK_BYTES];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(&image, &data).unwrap();
    let host = block_on_host(&mut RawFile::new(std::fs::File::open(&image).unwrap()).unwrap());
    let vm = block_in_vm(&image.display().to_string(), "");
    println!(
        "block read throughput:        vm {vm:8.1} MiB/s host file read  {host:8.1} MiB/s ratio {:.2}",
        vm / host
    );
    let (artifact, key) = ([0x11u8; 16], [0x22u8; 32]);
    let sealed_path = scratch("disk.sealed");
    let mut sealed_bytes = Vec::with_capacity(DISK_BYTES + DISK_BYTES / 1000 + 64);
    let mut nonce = 0u64;
    sealed::seal(
        &mut &data[..],
        DISK_BYTES as u64,
        &mut sealed_bytes,
        artifact,
        &key,
        CHUNK as u32,
        || {
            nonce += 1;
            let mut n = [0u8; sealed::NONCE_LEN];
            n[..8].copy_from_slice(&nonce.to_le_bytes());
            n
        },
    )
    .unwrap();
    std::fs::write(&sealed_path, &sealed_bytes).unwrap();
    let host_sealed = block_on_host(
        &mut sealed::SealedImage::open(std::fs::File::open(&sealed_path).unwrap(), &artifact, &key)
            .unwrap(),
    );
    let vm_sealed = block_in_vm(
        &format!("{},ro,key-fd=0", sealed_path.display()),
        &sealed::key_line(&artifact, &key),
    );
    std::fs::remove_file(&image).unwrap();
    std::fs::remove_file(&sealed_path).unwrap();
    println!(
        "sealed read, host:            decrypting {host_sealed:8.1} MiB/s host file read  {host:8.1} MiB/s ratio {:.2}",
        host_sealed / host
    );
    println!(
        "sealed read, vm:              sealed {vm_sealed:8.1} MiB/s raw {vm:8.1} MiB/s ratio {:.2}",
        vm_sealed / vm
    );
}
