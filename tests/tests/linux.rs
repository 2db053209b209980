//! Boots the minimal Linux guest kernel from kernel-config/.
//!
//! Under this VMM on hardware KVM the kernel must reach the initramfs init.
//! On a PVM host a stock kernel runs in KVM's instruction emulator and stops
//! on an emulation failure a few seconds in (see shared/docs/pvm.md): there
//! the test checks that the boot protocol worked (the banner and the exact
//! command line) and that the VMM reports the failure precisely. The
//! kernel config itself is proven to reach init under QEMU's TCG.

use std::process::{Command, Stdio};
use std::time::Duration;

use microvm_tests::{
    cpio, fixture, guest_kernel, hypervisor, linux_init_binary, marker_initramfs, run_vmm,
    skip_unless_hardware_kvm, HypervisorKind, VmmRun, INIT_MARKER,
};

const CMDLINE: &str =
    "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 noxsave microvm.test=linux-boot-42";

/// Boots `kernel` with `initrd` (then removed) and 256 MiB under this VMM.
fn boot_under_this_vmm(
    kernel: &std::path::Path,
    initrd: &std::path::Path,
    cmdline: &str,
    deadline_s: u64,
) -> VmmRun {
    let run = run_vmm(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--cmdline",
            cmdline,
            "--mem-mib",
            "256",
        ],
        Duration::from_secs(deadline_s),
    );
    std::fs::remove_file(initrd).unwrap();
    run
}

#[test]
fn linux_boots_under_this_vmm() {
    let kernel = guest_kernel().unwrap_or_else(|e| panic!("{e}"));
    let run = boot_under_this_vmm(&kernel, &marker_initramfs("vmm"), CMDLINE, 180);
    assert!(
        run.stdout.contains("Linux version 6.12"),
        "no kernel banner: {}\n{}",
        run.stdout,
        run.stderr
    );
    // The user's command line, exactly, then the VMM's device entries.
    assert!(
        run.stdout.contains(&format!(
            "Command line: {CMDLINE} virtio_mmio.device=4K@0xd0001000:5"
        )),
        "command line not passed exactly: {}",
        run.stdout
    );
    match hypervisor() {
        HypervisorKind::Hardware => {
            assert!(run.stdout.contains(INIT_MARKER), "{}", run.stdout);
            assert_eq!(run.code, Some(0), "{}", run.stderr);
        }
        HypervisorKind::Pvm => {
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
            println!("PVM: the kernel stopped as expected: {report}");
            println!("SKIPPED: needs hardware KVM (Linux reaching init under this VMM)");
        }
    }
}

/// Boots `kernel` with `initrd` under QEMU's microvm machine in software
/// emulation, until the guest restarts; removes `initrd`. Returns what the
/// serial console and QEMU printed.
fn boot_under_qemu_tcg(
    kernel: &std::path::Path,
    initrd: &std::path::Path,
    cmdline: &str,
    disk: Option<&std::path::Path>,
) -> (String, String) {
    let qemu = "/usr/bin/qemu-system-x86_64";
    assert!(
        std::path::Path::new(qemu).exists(),
        "{qemu} missing: scripts/test.sh installs qemu-system-x86"
    );
    let out = Command::new(qemu)
        // Without ACPI, QEMU lists the virtio-mmio devices on the command
        // line, as this VMM does.
        .args(["-M", "microvm,acpi=off", "-accel", "tcg", "-m", "256M"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-serial", "stdio", "-monitor", "none", "-kernel"])
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", cmdline])
        .args(disk.map_or(vec![], |d| {
            vec![
                "-drive".to_string(),
                format!(
                    "id=code,file={},format=raw,if=none,readonly=on",
                    d.display()
                ),
                "-device".to_string(),
                "virtio-blk-device,drive=code".to_string(),
            ]
        }))
        .stdin(Stdio::null())
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
        boot_under_qemu_tcg(&kernel, &initrd, "console=ttyS0 reboot=t panic=-1", None);
    assert!(
        stdout.contains(INIT_MARKER),
        "init not reached under TCG: {stdout}\n{stderr}"
    );
}

/// An initramfs holding guest-init's Linux PID 1 as /init.
fn no_std_init_initramfs(tag: &str) -> std::path::PathBuf {
    let init = std::fs::read(linux_init_binary()).unwrap();
    let initrd = std::env::temp_dir().join(format!("no-std-init-{tag}-{}", std::process::id()));
    std::fs::write(
        &initrd,
        cpio::archive(&[cpio::Entry::File {
            path: "init",
            mode: 0o755,
            data: &init,
        }]),
    )
    .unwrap();
    initrd
}

/// A function's ZIP: an executable `bootstrap` (the `bootstrap.S`
/// fixture: two lines on stdout, one on stderr, exit status 3).
fn zip_with_bootstrap() -> Vec<u8> {
    use std::io::Write;
    let mut out = std::io::Cursor::new(Vec::new());
    let mut zip = zip::ZipWriter::new(&mut out);
    let options = zip::write::SimpleFileOptions::default().unix_permissions(0o755);
    zip.start_file("bootstrap", options).unwrap();
    zip.write_all(&std::fs::read(fixture("bootstrap")).unwrap())
        .unwrap();
    zip.finish().unwrap();
    out.into_inner()
}

/// What the PID 1 says once it has set the guest up.
const INIT_LINES: [&str; 3] = [
    "init: mounted /dev (devtmpfs), /proc, /tmp (tmpfs, 64 MiB)",
    "init: lo is up",
    "init: nothing more to run yet; restarting the machine",
];

#[test]
fn the_no_std_init_sets_up_the_guest_under_this_vmm() {
    if skip_unless_hardware_kvm("Linux reaching the no_std init under this VMM") {
        return;
    }
    let kernel = guest_kernel().unwrap_or_else(|e| panic!("{e}"));
    let run = boot_under_this_vmm(
        &kernel,
        &no_std_init_initramfs("vmm"),
        "console=ttyS0 reboot=k panic=1 quiet",
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
}

#[test]
fn the_no_std_init_sets_up_the_guest_under_qemu_tcg() {
    let kernel = guest_kernel().unwrap_or_else(|e| panic!("{e}"));
    let initrd = no_std_init_initramfs("qemu");
    // The function's code as the worker would make it: a ZIP with an
    // executable bootstrap, as an EROFS image.
    let zip = zip_with_bootstrap();
    let disk = std::env::temp_dir().join(format!("no-std-init-code-{}", std::process::id()));
    std::fs::write(&disk, host_services::erofs_image::build(&zip).unwrap()).unwrap();
    let (stdout, stderr) = boot_under_qemu_tcg(
        &kernel,
        &initrd,
        "console=ttyS0 reboot=t panic=-1 quiet",
        Some(&disk),
    );
    std::fs::remove_file(&disk).unwrap();
    for line in INIT_LINES.iter().chain(&[
        "init: mounted the code disk read-only at /var/task (erofs)",
        "function: hello from bootstrap",
        "function: second line",
        "function: an error line",
        "init: bootstrap exited with status 3",
    ]) {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}\n{stderr}");
    }
    assert!(!stdout.contains("Kernel panic"), "{stdout}");
}
