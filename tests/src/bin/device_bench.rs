//! Device benchmark: vsock round-trip latency and throughput, and block
//! read throughput, each next to the same operation without a VM: a Unix
//! socket pair with an echo thread, and reads of the same file on the host
//! (the physical limit). The bare-metal guest is the VM side.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use microvm_tests::{baremetal_guest, hypervisor, vmm_binary};

const PINGS: usize = 2000;
const STREAM_BYTES: usize = 64 << 20;
const DISK_BYTES: usize = 64 << 20;
const CHUNK: usize = 64 << 10;

fn scratch(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("device-bench-{}-{name}", std::process::id()))
}

fn spawn_guest(args: &[&str]) -> Child {
    let guest = baremetal_guest();
    Command::new(vmm_binary())
        .arg("--kernel")
        .arg(guest)
        .args(["--log-level", "warn"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn vmm")
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
    let mut child = spawn_guest(&[
        "--vsock",
        &vsock,
        "--cmdline",
        "baremetal.run=vsock-echo:5000",
    ]);
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

/// MiB/s of the guest reading its whole first disk.
fn block_in_vm(image: &std::path::Path) -> f64 {
    let drive = image.display().to_string();
    let child = spawn_guest(&["--drive", &drive, "--cmdline", "baremetal.run=blk-check"]);
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

/// MiB/s of reading the same file on the host, page cache warm.
fn block_on_host(image: &std::path::Path) -> f64 {
    let file = std::fs::File::open(image).unwrap();
    let mut buf = vec![0u8; CHUNK];
    let start = Instant::now();
    for i in 0..DISK_BYTES / CHUNK {
        file.read_exact_at(&mut buf, (i * CHUNK) as u64).unwrap();
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
    let host = block_on_host(&image);
    let vm = block_in_vm(&image);
    std::fs::remove_file(&image).unwrap();
    println!(
        "block read throughput:        vm {vm:8.1} MiB/s host file read  {host:8.1} MiB/s ratio {:.2}",
        vm / host
    );
}
