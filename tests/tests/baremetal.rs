//! The bare-metal guest from guest-init, booted by this VMM.

use std::time::Duration;

use microvm_tests::{baremetal_guest, hypervisor, run_vmm, HypervisorKind};

#[test]
fn boots_reports_its_mode_and_runs_at_native_speed_on_pvm() {
    let guest = baremetal_guest();
    let run = run_vmm(
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--cmdline",
            "baremetal.run=spin:100000000",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let expected = match hypervisor() {
        HypervisorKind::Pvm => "entered through the PVM user-mode entry; mode: pvm-native",
        HypervisorKind::Hardware => "entered through the PVH entry; mode: cpl0",
    };
    assert!(run.stdout.contains(expected), "{}", run.stdout);
    // The VMM passes the TSC rate, so the guest reports real time.
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with("baremetal: spin 100000000 iterations: "))
        .unwrap_or_else(|| panic!("no spin result: {}", run.stdout));
    assert!(line.ends_with(" us"), "{line}");
    assert!(run.stderr.contains("guest boot time: "), "{}", run.stderr);
    println!("{line}");
}

#[test]
fn the_guest_finds_its_heap_in_the_e820_map() {
    let guest = baremetal_guest();
    let run = run_vmm(
        &["--kernel", guest.to_str().unwrap(), "--mem-mib", "64"],
        Duration::from_secs(60),
    );
    let heap_kib: u64 = run
        .stdout
        .split("heap ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no heap line: {}", run.stdout));
    // All of the 64 MiB but the first 2 MiB, the image with its stack
    // (2 MiB from there) and what the e820 map keeps at the top.
    assert!(heap_kib > 59 << 10 && heap_kib < 62 << 10, "{heap_kib}");
}
