//! Boots the minimal Linux guest kernel from kernel-config/.
//!
//! Under this VMM on hardware KVM: the kernel reaches its init, keeps time
//! on every vCPU, takes device interrupts, powers off, panics, and the
//! no_std init serves a `lambda_runtime` function and survives snapshot
//! restores. On a PVM host these tests run in the L1 test machine
//! (docs/test-machine.md). On PVM itself a stock kernel runs in KVM's
//! instruction emulator and stops a few seconds in (shared/docs/pvm.md):
//! one test checks the VMM reports that precisely. The guest side alone
//! (kernel config, init, layers) also runs under QEMU's TCG.

use std::process::{Command, Stdio};
use std::time::Duration;

use guest_init::environ::encode;
use host_services::artifacts::cpio;
use host_services::data_plane::runtime_api::{InvokeError, Outcome, RuntimeApi};
use host_services::data_plane::vmm_process::request_snapshot;
use microvm_tests::guest_ports::{echo_lines, spawn_vmm, test_dir, GuestPorts};
use microvm_tests::lambda_client::zip_one_executable;
use microvm_tests::{
    busybox_initramfs, fixture, guest_kernel, hypervisor, linux_init_binary, marker_initramfs,
    on_hardware_kvm, run_vmm, rust_function_bootstrap, skip, HypervisorKind, VmmRun, INIT_MARKER,
};

const CMDLINE: &str =
    "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 noxsave microvm.test=linux-boot-42";

/// Boots `kernel` with `initrd` (then removed) and 256 MiB under this VMM,
/// with the VMM's `extra` flags.
fn boot_under_this_vmm(
    kernel: &std::path::Path,
    initrd: &std::path::Path,
    cmdline: &str,
    extra: &[&str],
    deadline_s: u64,
) -> VmmRun {
    let mut args = vec![
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        cmdline,
        "--mem-mib",
        "256",
    ];
    args.extend_from_slice(extra);
    let run = run_vmm(&args, Duration::from_secs(deadline_s));
    std::fs::remove_file(initrd).unwrap();
    run
}

/// Checks the kernel's banner and that it got the user's command line,
/// exactly, then the VMM's device entries.
fn assert_booted_with_cmdline(run: &VmmRun) {
    assert!(
        run.stdout.contains("Linux version 6.12"),
        "no kernel banner (exit {:?}): {}\n{}",
        run.code,
        run.stdout,
        run.stderr
    );
    assert!(
        run.stdout.contains(&format!(
            "Command line: {CMDLINE} virtio_mmio.device=4K@0xd0001000:5"
        )),
        "command line not passed exactly: {}",
        run.stdout
    );
}

#[test]
fn linux_boots_to_init_under_this_vmm() {
    on_hardware_kvm("linux_boots_to_init_under_this_vmm", || {
        let kernel = guest_kernel().unwrap_or_else(|e| panic!("{e}"));
        let run = boot_under_this_vmm(&kernel, &marker_initramfs("vmm"), CMDLINE, &[], 180);
        assert_booted_with_cmdline(&run);
        assert!(run.stdout.contains(INIT_MARKER), "{}", run.stdout);
        assert_eq!(run.code, Some(0), "{}", run.stderr);
    });
}

/// On a PVM host a kernel that is not PVM-aware runs in KVM's instruction
/// emulator and stops a few seconds in: the boot protocol worked, and the
/// VMM reports the failure precisely.
#[test]
fn linux_stops_on_an_emulation_failure_reported_precisely_on_pvm() {
    const TEST: &str = "linux_stops_on_an_emulation_failure_reported_precisely_on_pvm";
    if hypervisor() != HypervisorKind::Pvm {
        return skip(TEST, "needs a PVM host");
    }
    let kernel = guest_kernel().unwrap_or_else(|e| panic!("{e}"));
    let run = boot_under_this_vmm(&kernel, &marker_initramfs("vmm-pvm"), CMDLINE, &[], 180);
    assert_booted_with_cmdline(&run);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    let report = run
        .stderr
        .lines()
        .find(|l| l.contains("KVM_EXIT_INTERNAL_ERROR"))
        .unwrap_or_else(|| panic!("no internal error report: {}", run.stderr));
    assert!(report.contains("(emulation failure)"), "{report}");
    assert!(report.contains("RIP 0xffffffff"), "{report}");
    assert!(
        !report.contains("instruction bytes at RIP: unreadable"),
        "{report}"
    );
}

/// QEMU's microvm machine in software emulation, booting `kernel` with
/// `initrd` and `cmdline`, and `disks` as its virtio-blk drives in order;
/// it exits when the guest restarts.
fn qemu_tcg(
    kernel: &std::path::Path,
    initrd: &std::path::Path,
    cmdline: &str,
    disks: &[&std::path::Path],
) -> Command {
    let qemu = "/usr/bin/qemu-system-x86_64";
    assert!(
        std::path::Path::new(qemu).exists(),
        "{qemu} missing: scripts/test.sh installs qemu-system-x86"
    );
    let mut command = Command::new(qemu);
    command
        // Without ACPI, QEMU lists the virtio-mmio devices on the command
        // line, as this VMM does.
        .args(["-M", "microvm,acpi=off", "-accel", "tcg", "-m", "256M"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-serial", "stdio", "-monitor", "none", "-kernel"])
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", cmdline])
        .args(disks.iter().enumerate().flat_map(|(i, d)| {
            [
                "-drive".to_string(),
                format!(
                    "id=disk{i},file={},format=raw,if=none,readonly=on",
                    d.display()
                ),
                "-device".to_string(),
                format!("virtio-blk-device,drive=disk{i}"),
            ]
        }))
        .stdin(Stdio::null());
    command
}

/// Boots under [`qemu_tcg`] until the guest restarts; removes `initrd`.
/// Returns what the serial console and QEMU printed.
fn boot_under_qemu_tcg(
    kernel: &std::path::Path,
    initrd: &std::path::Path,
    cmdline: &str,
    disks: &[&std::path::Path],
) -> (String, String) {
    let out = qemu_tcg(kernel, initrd, cmdline, disks)
        .output()
        .expect("run qemu");
    std::fs::remove_file(initrd).unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn guest_kernel_config_reaches_init_under_qemu_tcg() {
    let kernel = guest_kernel().unwrap_or_else(|e| panic!("{e}"));
    let initrd = marker_initramfs("qemu");
    let (stdout, stderr) =
        boot_under_qemu_tcg(&kernel, &initrd, "console=ttyS0 reboot=t panic=-1", &[]);
    assert!(
        stdout.contains(INIT_MARKER),
        "init not reached under TCG: {stdout}\n{stderr}"
    );
}

/// An initramfs holding guest-init's Linux PID 1 as /init.
fn no_std_init_initramfs(tag: &str) -> std::path::PathBuf {
    let init = std::fs::read(linux_init_binary()).unwrap();
    let initrd = std::env::temp_dir().join(format!("no-std-init-{tag}-{}", std::process::id()));
    std::fs::write(&initrd, cpio::init_only(&init)).unwrap();
    initrd
}

/// A function's ZIP: `bootstrap`, executable, and nothing else.
fn zip_with_bootstrap(bootstrap: &std::path::Path) -> Vec<u8> {
    zip_one_executable("bootstrap", &std::fs::read(bootstrap).unwrap())
}

/// A function whose code has no bootstrap runs its runtime layer's: the
/// second disk, mounted at /opt.
#[test]
fn a_runtime_layers_bootstrap_runs_from_opt_under_qemu_tcg() {
    let kernel = guest_kernel().unwrap_or_else(|e| panic!("{e}"));
    let dir = std::env::temp_dir().join(format!("layer-disks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (code, layer) = (dir.join("code.erofs"), dir.join("layer.erofs"));
    let code_zip = zip_one_executable("handler.sh", b"#!/bin/sh\n");
    std::fs::write(
        &code,
        host_services::artifacts::erofs_image::build(&code_zip).unwrap(),
    )
    .unwrap();
    let layer_zip = zip_with_bootstrap(&fixture("bootstrap"));
    std::fs::write(
        &layer,
        host_services::artifacts::erofs_image::build(&layer_zip).unwrap(),
    )
    .unwrap();
    let (stdout, stderr) = boot_under_qemu_tcg(
        &kernel,
        &no_std_init_initramfs("layer"),
        "console=ttyS0 reboot=t panic=-1 quiet",
        &[&code, &layer],
    );
    std::fs::remove_dir_all(&dir).unwrap();
    for line in [
        "init: mounted /dev/vdb read-only at /opt (erofs)",
        "function: hello from bootstrap",
        "init: bootstrap exited with status 3",
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}\n{stderr}");
    }
}

/// What the PID 1 says once it has set the guest up.
const INIT_LINES: [&str; 3] = [
    "init: mounted /dev (devtmpfs), /proc, /tmp (tmpfs, 64 MiB)",
    "init: lo is up",
    "init: restarting the machine",
];

#[test]
fn the_no_std_init_sets_up_the_guest_under_this_vmm() {
    on_hardware_kvm("the_no_std_init_sets_up_the_guest_under_this_vmm", || {
        let kernel = guest_kernel().unwrap_or_else(|e| panic!("{e}"));
        let run = boot_under_this_vmm(
            &kernel,
            &no_std_init_initramfs("vmm"),
            "console=ttyS0 reboot=k panic=1 quiet",
            &[],
            60,
        );
        for line in INIT_LINES {
            assert!(run.stdout.contains(line), "no {line:?} in:\n{}", run.stdout);
        }
        assert_eq!(run.code, Some(0), "{}", run.stderr);
        assert!(
            run.stderr.contains("guest boot time"),
            "the init's boot-timer write was not seen: {}",
            run.stderr
        );
    });
}

#[test]
fn the_no_std_init_sets_up_the_guest_under_qemu_tcg() {
    let kernel = guest_kernel().unwrap_or_else(|e| panic!("{e}"));
    let initrd = no_std_init_initramfs("qemu");
    // The function's code as the worker would make it: a ZIP with an
    // executable bootstrap (the `bootstrap.S` fixture: two lines on
    // stdout, one on stderr, exit status 3), as an EROFS image.
    let zip = zip_with_bootstrap(&fixture("bootstrap"));
    let disk = std::env::temp_dir().join(format!("no-std-init-code-{}", std::process::id()));
    std::fs::write(
        &disk,
        host_services::artifacts::erofs_image::build(&zip).unwrap(),
    )
    .unwrap();
    let (stdout, stderr) = boot_under_qemu_tcg(
        &kernel,
        &initrd,
        "console=ttyS0 reboot=t panic=-1 quiet",
        &[&disk],
    );
    std::fs::remove_file(&disk).unwrap();
    for line in INIT_LINES.iter().chain(&[
        "init: mounted /dev/vda read-only at /var/task (erofs)",
        "function: hello from bootstrap",
        "function: second line",
        "function: an error line",
        "init: bootstrap exited with status 3",
        "init: no host over vsock",
    ]) {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}\n{stderr}");
    }
    assert!(!stdout.contains("Kernel panic"), "{stdout}");
}

fn function_environ() -> Vec<u8> {
    encode([
        ("AWS_REGION", "local"),
        ("AWS_LAMBDA_FUNCTION_NAME", "rust-echo"),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256"),
        ("_HANDLER", "bootstrap"),
    ])
    .unwrap()
}

/// Starts a guest whose init must fail under this VMM: it reports
/// `error_type` (with `needle` in its message) to the host's Runtime API,
/// and restarts the machine. Returns the console and the log stream, if
/// the guest opened one.
async fn expect_init_failure(
    name: &str,
    environ: Vec<u8>,
    error_type: &str,
    needle: &str,
) -> (String, Option<String>) {
    let dir = test_dir(name);
    let (ports, vmm, console) =
        linux_guest_under_this_vmm(&dir, &fixture("bootstrap"), environ, &[]).await;
    match tokio::time::timeout(Duration::from_secs(60), ports.api.ready()).await {
        Ok(Err(InvokeError::InitFailed {
            error_type: reported,
            body,
        })) => {
            assert_eq!(reported, error_type, "{body}");
            assert!(body.contains(needle), "{body}");
        }
        other => panic!("{name}: expected {error_type}, got {other:?}"),
    }
    let status = tokio::time::timeout(Duration::from_secs(60), vmm.wait_with_output())
        .await
        .expect("the VMM ends when the init restarts the machine")
        .unwrap()
        .status;
    let console = console.await.unwrap();
    assert_eq!(status.code(), Some(0), "{console}");
    let log = tokio::time::timeout(Duration::from_secs(5), ports.log).await;
    std::fs::remove_dir_all(&dir).unwrap();
    (console, log.ok().map(Result::unwrap))
}

/// A bootstrap that exits (the `bootstrap.S` fixture, status 3) is
/// reported to the host as an init error; a malformed start-up message
/// is refused and reported, not a crash.
#[test]
fn failures_are_reported_to_the_host_under_this_vmm() {
    on_hardware_kvm("failures_are_reported_to_the_host_under_this_vmm", || {
        block_on(async {
            let (_, log) = expect_init_failure(
                "linux-exit",
                function_environ(),
                "Runtime.ExitError",
                "bootstrap exited with status 3",
            )
            .await;
            let log = log.expect("the guest's log stream");
            assert!(log.contains("hello from bootstrap"), "{log}");

            let mut garbage = function_environ();
            garbage[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
            let (console, _) = expect_init_failure(
                "linux-garbage",
                garbage,
                "Runtime.InvalidEnvironment",
                "runs past the end",
            )
            .await;
            assert!(!console.contains("function:"), "bootstrap ran: {console}");
        })
    });
}

/// Two events answered, and one the function refuses with its own error
/// type: the init's relay carries the runtime's
/// `Lambda-Runtime-Function-Error-Type` header (`lambda_runtime` sends
/// `unhandled`) and the error body (with the function's `errorType`)
/// through to the host.
async fn serve_three_events(api: &RuntimeApi, timeout: Duration) {
    for i in 0..2 {
        let event = format!("{{\"n\":{i}}}");
        match api
            .invoke(&format!("event-{i}"), event.into(), timeout)
            .await
        {
            Ok(Outcome::Response(body)) => {
                let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(body, serde_json::json!({"echo": {"n": i}}));
            }
            other => panic!("event {i} gave {other:?}"),
        }
    }
    match api
        .invoke("failing", r#"{"fail":"not today"}"#.into(), timeout)
        .await
    {
        Ok(Outcome::FunctionError { error_type, body }) => {
            assert_eq!(error_type, "unhandled");
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body["errorType"], "Function.Refused", "{body}");
            assert_eq!(body["errorMessage"], "not today", "{body}");
        }
        other => panic!("the failing event gave {other:?}"),
    }
}

/// The function's lines reached the host's log stream, and the init's
/// report of its end.
async fn check_log_stream(log: tokio::task::JoinHandle<String>, console: &str) {
    let log = tokio::time::timeout(Duration::from_secs(10), log)
        .await
        .expect("the log stream closes")
        .unwrap();
    for expected in [
        "handling request event-0",
        "handling request event-1",
        "handling request failing",
        "function region Some(\"local\")",
    ] {
        assert!(
            log.contains(expected),
            "{expected:?} is not in the log stream:\n{log}\nconsole:\n{console}"
        );
    }
    // The host's API goes away with the runtime waiting in /next: either
    // the connection closes and the runtime exits, or the API answers 410
    // ("shutting down") first, which lambda_runtime 0.14 reads as an event
    // without a request ID and aborts on. Either way the init reports it.
    assert!(
        log.contains("init: bootstrap exited with status")
            || log.contains("init: bootstrap was killed by signal"),
        "no report of the runtime's end in the log stream:\n{log}\nconsole:\n{console}"
    );
}

/// A Linux guest under this VMM whose code disk holds `bootstrap` and
/// whose init gets `environ` from the host, with its host ports in `dir`
/// (whose name also names its initramfs, which goes there too); `extra`
/// adds VMM flags.
async fn linux_guest_under_this_vmm(
    dir: &std::path::Path,
    bootstrap: &std::path::Path,
    environ: Vec<u8>,
    extra: &[String],
) -> (
    GuestPorts,
    tokio::process::Child,
    tokio::task::JoinHandle<String>,
) {
    let kernel = guest_kernel().unwrap_or_else(|e| panic!("{e}"));
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let initrd = dir.join("initrd.cpio");
    std::fs::rename(no_std_init_initramfs(&name), &initrd).unwrap();
    let disk = dir.join("code.erofs");
    let zip = zip_with_bootstrap(bootstrap);
    std::fs::write(
        &disk,
        host_services::artifacts::erofs_image::build(&zip).unwrap(),
    )
    .unwrap();
    let ports = GuestPorts::bind(dir, Some(environ)).await;
    let mut args: Vec<String> = vec![
        "--kernel".into(),
        kernel.display().to_string(),
        "--initrd".into(),
        initrd.display().to_string(),
        "--cmdline".into(),
        "console=ttyS0 reboot=k panic=1 quiet".into(),
        "--mem-mib".into(),
        "256".into(),
        "--drive".into(),
        format!("{},ro", disk.display()),
        "--vsock".into(),
        format!("cid=3,uds={}", ports.uds.display()),
    ];
    args.extend_from_slice(extra);
    let (vmm, console) = spawn_vmm(&args, "guest");
    (ports, vmm, console)
}

/// The `lambda_runtime` function (`examples/rust-function`) as the guest's
/// bootstrap, with the variables of [`function_environ`].
async fn linux_function_under_this_vmm(
    dir: &std::path::Path,
    extra: &[String],
) -> (
    GuestPorts,
    tokio::process::Child,
    tokio::task::JoinHandle<String>,
) {
    linux_guest_under_this_vmm(dir, &rust_function_bootstrap(), function_environ(), extra).await
}

#[test]
fn a_lambda_runtime_function_serves_events_through_the_init_under_this_vmm() {
    on_hardware_kvm(
        "a_lambda_runtime_function_serves_events_through_the_init_under_this_vmm",
        || {
            block_on(async {
                let dir = test_dir("linux-vmm-vsock");
                let (ports, vmm, console) = linux_function_under_this_vmm(&dir, &[]).await;
                serve_three_events(&ports.api, Duration::from_secs(30)).await;
                drop(ports.api);
                let out = tokio::time::timeout(Duration::from_secs(30), vmm.wait_with_output())
                    .await
                    .expect("the VMM ends when the function does")
                    .unwrap();
                let console = console.await.unwrap();
                check_log_stream(ports.log, &console).await;
                assert_eq!(out.status.code(), Some(0), "{console}");
                std::fs::remove_dir_all(&dir).unwrap();
            })
        },
    );
}

/// A Linux guest snapshotted at its runtime's first `/next` and restored
/// ten times at once: in each clone the init sees the vsock transport
/// reset, reseeds the kernel's random generator, reconnects its log
/// stream and the runtime's pending `/next`, and the clone answers its own
/// events, with randomness of its own.
#[test]
fn restored_linux_clones_reconnect_and_answer_with_their_own_randomness_under_this_vmm() {
    on_hardware_kvm(
        "restored_linux_clones_reconnect_and_answer_with_their_own_randomness_under_this_vmm",
        || {
            block_on(async {
                let dir = test_dir("linux-vmm-restore");
                let control = dir.join("control");
                let (ports, mut original, _console) = linux_function_under_this_vmm(
                    &dir,
                    &["--control-sock".into(), control.display().to_string()],
                )
                .await;
                tokio::time::timeout(Duration::from_secs(60), ports.api.ready())
                    .await
                    .expect("the runtime asks for work")
                    .unwrap();
                let (state, memory) = (dir.join("vm.snap"), dir.join("vm.mem"));
                request_snapshot(&control, &state, &memory).await.unwrap();
                original.kill().await.unwrap();

                let mut clones = tokio::task::JoinSet::new();
                for clone in 0..10u32 {
                    let dir = dir.clone();
                    clones.spawn(async move { (clone, run_clone(&dir, clone).await) });
                }
                let mut randomness = std::collections::BTreeMap::new();
                while let Some(done) = clones.join_next().await {
                    let (clone, random) = done.unwrap();
                    assert_eq!(random.len(), 32, "clone {clone}: {random}");
                    randomness.insert(random, clone);
                }
                assert_eq!(
                    randomness.len(),
                    10,
                    "clones shared randomness: {randomness:?}"
                );
                std::fs::remove_dir_all(&dir).unwrap();
            })
        },
    );
}

/// Restores clone number `clone` of the snapshot in `dir`, with a CID of
/// its own: it serves the three events of [`serve_three_events`], then
/// one asking for randomness, whose answer is returned; it ends when its
/// Runtime API goes away.
async fn run_clone(dir: &std::path::Path, clone: u32) -> String {
    let clone_dir = dir.join(format!("clone-{clone}"));
    std::fs::create_dir_all(&clone_dir).unwrap();
    let ports = GuestPorts::bind(&clone_dir, None).await;
    let (mut vmm, console) = spawn_vmm(
        &[
            "--restore".into(),
            dir.join("vm.snap").display().to_string(),
            "--restore-memory".into(),
            dir.join("vm.mem").display().to_string(),
            "--drive".into(),
            format!("{},ro", dir.join("code.erofs").display()),
            "--vsock".into(),
            format!("cid={},uds={}", 10 + clone, ports.uds.display()),
        ],
        "clone",
    );
    let _log = echo_lines(vmm.stderr.take().unwrap(), "clone (vmm)");
    let timeout = Duration::from_secs(120);
    serve_three_events(&ports.api, timeout).await;
    let random = match ports
        .api
        .invoke(
            &format!("random-{clone}"),
            r#"{"random":true}"#.into(),
            timeout,
        )
        .await
    {
        Ok(Outcome::Response(body)) => {
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            body["random"].as_str().unwrap_or_default().to_string()
        }
        other => panic!("clone {clone}: the random event gave {other:?}"),
    };
    drop(ports.api);
    let status = tokio::time::timeout(Duration::from_secs(60), vmm.wait())
        .await
        .expect("the clone ends when the function does")
        .unwrap();
    let console = console.await.unwrap();
    assert!(
        console.contains("transport was reset"),
        "clone {clone}: {console}"
    );
    assert!(
        !console.contains("reseeding the random generator failed"),
        "clone {clone}: {console}"
    );
    assert_eq!(status.code(), Some(0), "clone {clone}: {console}");
    random
}

/// Runs `test` on a two-thread tokio runtime of its own.
fn block_on(test: impl std::future::Future<Output = ()>) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(test)
}

/// The busybox init's report on the machine it runs on: the CPUs online,
/// the clock devices, one `sleep 1` on each CPU with the guest's uptime
/// around it, the code disk's SHA-256, 32 bytes from the virtio-rng, and
/// the virtio devices' interrupt counts; then it restarts the machine.
fn machine_report_script(vcpus: u8) -> String {
    format!(
        r#"echo "guest: cpus online $(cat /sys/devices/system/cpu/online)"
echo "guest: clocksource $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
echo "guest: clockevent $(cat /sys/devices/system/clockevents/clockevent0/current_device)"
for cpu in $(seq 0 {last}); do
    taskset -c $cpu sh -c "a=\$(cut -d' ' -f1 /proc/uptime); sleep 1; b=\$(cut -d' ' -f1 /proc/uptime); echo guest: cpu $cpu slept from \$a to \$b"
done
echo "guest: disk $(sha256sum /dev/vda | cut -d' ' -f1)"
echo "guest: rng $(head -c 32 /dev/hwrng | hexdump -v -e '/1 "%02x"')"
grep virtio /proc/interrupts | sed 's/^/guest: irq /'
reboot -f
"#,
        last = vcpus - 1
    )
}

/// The sum of the per-CPU counts of a `/proc/interrupts` line.
fn interrupt_count(line: &str) -> u64 {
    line.split_whitespace()
        .skip(1)
        .map_while(|field| field.parse::<u64>().ok())
        .sum()
}

/// Linux with each of `machines` (vCPUs, extra command line): every CPU
/// comes online and keeps time (a `sleep 1` on each wakes after about a
/// second of guest time, on the TSC-deadline LAPIC timer, with no PIT),
/// and the virtio-mmio block and entropy devices answer through their
/// interrupts, routed by the VMM's IOAPIC, not by polling.
fn check_machine_reports(test: &str, machines: &'static [(u8, &'static str)]) {
    on_hardware_kvm(test, || {
        use sha2::Digest;
        let kernel = guest_kernel().unwrap_or_else(|e| panic!("{e}"));
        let dir = test_dir(test);
        let disk = dir.join("disk.img");
        let content: Vec<u8> = (0..1024 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&disk, &content).unwrap();
        let digest = hex::encode(sha2::Sha256::digest(&content));
        for (index, &(vcpus, extra)) in machines.iter().enumerate() {
            let initrd =
                busybox_initramfs(&format!("{test}-{index}"), &machine_report_script(vcpus));
            let run = boot_under_this_vmm(
                &kernel,
                &initrd,
                &format!("console=ttyS0 reboot=k panic=-1{extra}"),
                &[
                    "--vcpus",
                    &vcpus.to_string(),
                    "--drive",
                    &format!("{},ro", disk.display()),
                ],
                300,
            );
            let out = &run.stdout;
            let report = |key: &str| -> Vec<&str> {
                out.lines()
                    .filter_map(|l| l.split(&format!("guest: {key} ")).nth(1))
                    .collect()
            };
            let online = if vcpus == 1 {
                "0".to_string()
            } else {
                format!("0-{}", vcpus - 1)
            };
            assert_eq!(
                report("cpus online"),
                [online.as_str()],
                "{vcpus} vCPUs:\n{out}\n{}",
                run.stderr
            );
            assert_eq!(report("clockevent"), ["lapic-deadline"], "{out}");
            for cpu in 0..vcpus {
                let slept = report(&format!("cpu {cpu} slept from"));
                let [line] = slept.as_slice() else {
                    panic!(
                        "CPU {cpu} of {vcpus} did not report its sleep:\n{out}\n{}",
                        run.stderr
                    );
                };
                let (from, to) = line.split_once(" to ").unwrap();
                let slept = to.trim().parse::<f64>().unwrap() - from.parse::<f64>().unwrap();
                assert!(
                    (0.99..3.0).contains(&slept),
                    "CPU {cpu} of {vcpus} slept {slept} s of guest time:\n{out}"
                );
            }
            assert_eq!(report("disk"), [digest.as_str()], "{out}");
            let rng = report("rng");
            assert!(
                rng.len() == 1 && rng[0].len() == 64 && rng[0].chars().any(|c| c != '0'),
                "{out}"
            );
            let irqs = report("irq");
            assert_eq!(irqs.len(), 2, "block and entropy devices: {out}");
            for line in irqs {
                assert!(interrupt_count(line) > 0, "no interrupts: {line}\n{out}");
            }
            assert_eq!(run.code, Some(0), "{vcpus} vCPUs: {}", run.stderr);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    });
}

#[test]
fn linux_keeps_time_on_one_and_two_vcpus_and_its_devices_interrupt_under_this_vmm() {
    check_machine_reports(
        "linux_keeps_time_on_one_and_two_vcpus_and_its_devices_interrupt_under_this_vmm",
        &[(1, ""), (2, "")],
    );
}

/// Four vCPUs; and two with the ACPI tables ignored: the MP table is what
/// kernels built without ACPI find the CPUs and IOAPIC in. Apart from the
/// test above because SMP bring-up is where the emulated L1 machine fails
/// now and then, and each test's runs are retried apart.
#[test]
fn linux_keeps_time_on_four_vcpus_and_with_acpi_off_under_this_vmm() {
    check_machine_reports(
        "linux_keeps_time_on_four_vcpus_and_with_acpi_off_under_this_vmm",
        &[(4, ""), (2, " acpi=off")],
    );
}

/// Boots a busybox init running `script` with `cmdline`, 1 vCPU.
fn run_busybox_guest(tag: &str, script: &str, cmdline: &str) -> VmmRun {
    let kernel = guest_kernel().unwrap_or_else(|e| panic!("{e}"));
    boot_under_this_vmm(&kernel, &busybox_initramfs(tag, script), cmdline, &[], 300)
}

/// How a Linux guest ends is how the VMM ends: a reboot (through the
/// i8042) and a power-off (through the ACPI sleep registers) with exit
/// status 0, a kernel panic (told through pvpanic) with 2 and the panic's
/// text on the console, whether the kernel then restarts (`panic=-1`) or
/// hangs (`panic=0`).
#[test]
fn a_guest_reboot_power_off_and_panic_end_the_vmm_under_this_vmm() {
    on_hardware_kvm(
        "a_guest_reboot_power_off_and_panic_end_the_vmm_under_this_vmm",
        || {
            let cmdline = "console=ttyS0 reboot=k panic=-1 quiet";
            for (action, why) in [
                ("reboot -f", "guest reset (i8042 reset)"),
                ("poweroff -f", "guest shut down (ACPI power-off)"),
            ] {
                let run = run_busybox_guest("exit", &format!("{action}\n"), cmdline);
                assert_eq!(
                    run.code,
                    Some(0),
                    "{action}: {}\n{}",
                    run.stdout,
                    run.stderr
                );
                assert!(run.stderr.contains(why), "{action}: {}", run.stderr);
            }
            for panic in ["panic=-1", "panic=0"] {
                let cmdline = format!("console=ttyS0 reboot=k {panic} quiet");
                let run = run_busybox_guest("panic", "echo guest: ending init\nexit 3\n", &cmdline);
                assert_eq!(run.code, Some(2), "{panic}: {}\n{}", run.stdout, run.stderr);
                assert!(
                    run.stdout
                        .contains("Kernel panic - not syncing: Attempted to kill init!"),
                    "{panic}: {}",
                    run.stdout
                );
                assert!(
                    run.stderr.contains("the guest kernel panicked"),
                    "{panic}: {}",
                    run.stderr
                );
            }
        },
    );
}
