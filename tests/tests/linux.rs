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
    guest_kernel, hypervisor, marker_initramfs, run_vmm, HypervisorKind, INIT_MARKER,
};

const CMDLINE: &str =
    "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 noxsave microvm.test=linux-boot-42";

#[test]
fn linux_boots_under_this_vmm() {
    let kernel = guest_kernel().unwrap_or_else(|e| panic!("{e}"));
    let initrd = marker_initramfs("vmm");
    let run = run_vmm(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--cmdline",
            CMDLINE,
            "--mem-mib",
            "256",
        ],
        Duration::from_secs(180),
    );
    std::fs::remove_file(&initrd).unwrap();
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

#[test]
fn guest_kernel_config_reaches_init_under_qemu_tcg() {
    let kernel = guest_kernel().unwrap_or_else(|e| panic!("{e}"));
    let initrd = marker_initramfs("qemu");
    let qemu = "/usr/bin/qemu-system-x86_64";
    assert!(
        std::path::Path::new(qemu).exists(),
        "{qemu} missing: scripts/test.sh installs qemu-system-x86"
    );
    let out = Command::new(qemu)
        .args(["-M", "microvm", "-accel", "tcg", "-m", "256M", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-serial", "stdio", "-monitor", "none", "-kernel"])
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 reboot=t panic=-1"])
        .stdin(Stdio::null())
        .output()
        .expect("run qemu");
    std::fs::remove_file(&initrd).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(INIT_MARKER),
        "init not reached under TCG: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
