//! Boots the fixture guests under /dev/kvm through each entry path and
//! checks what they print and how the VMM exits.

use std::time::Duration;

use std::os::fd::{AsRawFd, RawFd};

use microvm_tests::{boot_time_logged, fixture, hypervisor, run_vmm, HypervisorKind, VmmRun};
use vmm::jail::{inheritable, seqpacket_pair, Launch};

const DEADLINE: Duration = Duration::from_secs(30);
/// What the VMM appends to every command line: the entropy device, the
/// only virtio device these guests get.
const DEVICES: &str = " virtio_mmio.device=4K@0xd0001000:5";

fn boot(kernel: &str, extra: &[&str]) -> VmmRun {
    let kernel = fixture(kernel);
    let mut args = vec!["--kernel", kernel.to_str().unwrap()];
    args.extend_from_slice(extra);
    run_vmm(&args, DEADLINE)
}

fn assert_clean_reset(run: &VmmRun) {
    assert_eq!(
        run.code,
        Some(0),
        "stdout: {}\nstderr: {}",
        run.stdout,
        run.stderr
    );
    assert!(
        run.stderr.contains("guest reset (i8042 reset)"),
        "{}",
        run.stderr
    );
}

#[test]
fn linux64_entry_gets_zero_page_cmdline_e820_and_mptable() {
    let cmdline = "console=ttyS0 reboot=k panic=1 some.option=42";
    let run = boot("linux64.elf", &["--cmdline", cmdline]);
    assert_clean_reset(&run);
    assert_eq!(
        run.stdout,
        format!("fixture: linux64 entry\ncmdline: {cmdline}{DEVICES}\ne820 entries: 3\nmptable cpus: 1\n")
    );
}

#[test]
fn pvh_note_selects_the_pvh_entry() {
    let run = boot("pvh.elf", &["--cmdline", "pvh line"]);
    assert_clean_reset(&run);
    assert_eq!(
        run.stdout,
        format!("fixture: pvh entry\ncmdline: pvh line{DEVICES}\nmemmap entries: 3\n")
    );
}

#[test]
fn bzimage_enters_at_its_64bit_entry_with_its_setup_header() {
    let run = boot("bzImage", &["--cmdline", "bz"]);
    assert_clean_reset(&run);
    assert_eq!(
        run.stdout,
        format!("fixture: bzImage 64-bit entry\ncmdline: bz{DEVICES}\n")
    );
}

#[test]
fn every_vcpu_is_in_the_mp_table() {
    let run = boot("linux64.elf", &["--vcpus", "4", "--cmdline", "x"]);
    assert_clean_reset(&run);
    assert!(run.stdout.ends_with("mptable cpus: 4\n"), "{}", run.stdout);
}

#[test]
fn memory_above_the_device_hole_adds_an_e820_entry() {
    let run = boot("linux64.elf", &["--mem-mib", "4608", "--cmdline", "x"]);
    assert_clean_reset(&run);
    assert!(run.stdout.contains("e820 entries: 4\n"), "{}", run.stdout);
}

#[test]
fn boot_timer_logs_for_port_and_mmio_writes() {
    // linux64 signals through port 0x3f0, pvh through the MMIO page.
    for kernel in ["linux64.elf", "pvh.elf"] {
        let run = boot(kernel, &[]);
        let (us, _) = boot_time_logged(&run.stderr)
            .unwrap_or_else(|| panic!("{kernel}: no well-formed boot time in {}", run.stderr));
        assert!(us > 0 && us < DEADLINE.as_micros() as u64, "{us}");
    }
}

#[test]
fn reports_which_hypervisor_it_runs_on() {
    let run = boot("linux64.elf", &[]);
    let expected = match hypervisor() {
        HypervisorKind::Pvm => "running on PVM (paravirtual KVM)",
        HypervisorKind::Hardware => "running on hardware KVM",
    };
    assert!(run.stderr.contains(expected), "{}", run.stderr);
}

#[test]
fn int3_without_idt_is_a_reset_on_hardware_and_an_emulation_failure_on_pvm() {
    let run = boot("int3.elf", &[]);
    assert_eq!(run.stdout, "fixture: before int3\n");
    match hypervisor() {
        HypervisorKind::Hardware => {
            assert_eq!(run.code, Some(0), "{}", run.stderr);
            assert!(
                run.stderr.contains("guest reset (triple fault)"),
                "{}",
                run.stderr
            );
        }
        HypervisorKind::Pvm => {
            assert_eq!(run.code, Some(1), "{}", run.stderr);
            let report = run
                .stderr
                .lines()
                .find(|l| l.contains("KVM_EXIT_INTERNAL_ERROR"))
                .unwrap_or_else(|| panic!("no internal error report: {}", run.stderr));
            assert!(
                report.contains("suberror 1 (emulation failure)"),
                "{report}"
            );
            // The INT3 is the fixture's instruction at 0x100000 + its offset.
            assert!(report.contains("RIP 0x1000"), "{report}");
            assert!(report.contains("instruction bytes at RIP: cc "), "{report}");
        }
    }
}

#[test]
fn serial_goes_to_a_file_or_nowhere() {
    let path = std::env::temp_dir().join(format!("vmm-serial-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let dest = format!("file:{}", path.display());
    let run = boot("linux64.elf", &["--serial", &dest, "--cmdline", "to file"]);
    assert_clean_reset(&run);
    assert_eq!(run.stdout, "");
    let written = std::fs::read_to_string(&path).unwrap();
    assert!(
        written.contains(&format!("cmdline: to file{DEVICES}\n")),
        "{written}"
    );
    std::fs::remove_file(&path).unwrap();

    let run = boot("linux64.elf", &["--serial", "off"]);
    assert_clean_reset(&run);
    assert_eq!(run.stdout, "");
}

#[test]
fn a_closed_log_or_console_reader_does_not_kill_the_vmm() {
    use std::process::{Command, Stdio};
    let mut vmm = Command::new(microvm_tests::vmm_binary())
        .arg("--kernel")
        .arg(fixture("pvh.elf"))
        .args(["--log-level", "debug"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Both readers go away before the VMM has written anything.
    drop(vmm.stdout.take());
    drop(vmm.stderr.take());
    let status = vmm.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status}");
}

#[test]
fn json_config_holds_the_same_fields_and_flags_override_it() {
    let path = std::env::temp_dir().join(format!("vmm-config-{}.json", std::process::id()));
    let config = format!(
        r#"{{"kernel": "{}", "cmdline": "from json", "mem_mib": 64, "vcpus": 2, "serial": "stdout"}}"#,
        fixture("linux64.elf").display()
    );
    std::fs::write(&path, config).unwrap();
    let run = run_vmm(&["--config", path.to_str().unwrap()], DEADLINE);
    assert_clean_reset(&run);
    assert!(
        run.stdout
            .contains(&format!("cmdline: from json{DEVICES}\n")),
        "{}",
        run.stdout
    );
    assert!(run.stdout.ends_with("mptable cpus: 2\n"), "{}", run.stdout);

    let run = run_vmm(
        &["--config", path.to_str().unwrap(), "--vcpus", "3"],
        DEADLINE,
    );
    assert!(run.stdout.ends_with("mptable cpus: 3\n"), "{}", run.stdout);

    std::fs::write(&path, r#"{"kernel": "x", "vcpu": 2}"#).unwrap();
    let run = run_vmm(&["--config", path.to_str().unwrap()], DEADLINE);
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr.contains("unknown field `vcpu`"),
        "{}",
        run.stderr
    );
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn bad_input_fails_with_a_message_naming_field_and_value() {
    let kernel = fixture("linux64.elf");
    let not_a_kernel = fixture("linux64.o");
    let kernel_cases: &[(&str, &str)] = &[
        (
            "/nonexistent",
            "invalid kernel \"/nonexistent\": No such file",
        ),
        (
            not_a_kernel.to_str().unwrap(),
            "ELF type 1, expected an executable",
        ),
        ("/etc/hostname", "not a kernel"),
    ];
    for (path, expected) in kernel_cases {
        let run = run_vmm(&["--kernel", path], DEADLINE);
        assert_eq!(run.code, Some(1), "{path}: {}", run.stderr);
        assert!(run.stderr.contains(expected), "{path}: {}", run.stderr);
    }
    let cases: &[(&[&str], &str)] = &[
        (&["--mem-mib", "8"], "invalid mem_mib \"8\""),
        (&["--mem-mib", "100000000"], "invalid mem_mib \"100000000\""),
        (&["--vcpus", "0"], "invalid vcpus \"0\""),
        (&["--vcpus", "200"], "invalid vcpus \"200\""),
        (&["--serial", "udp"], "invalid serial \"udp\""),
        (
            &["--initrd", "/nonexistent"],
            "invalid initrd \"/nonexistent\"",
        ),
        // Host sockets are bound once the vCPUs run; one that cannot be
        // made (procfs takes no sockets) still ends the VMM, naming it.
        (
            &["--vsock", "cid=3,uds=/proc/v.sock"],
            "cannot listen on the vsock uds_path \"/proc/v.sock\"",
        ),
        (
            &["--control-sock", "/proc/c.sock"],
            "cannot listen on the control socket \"/proc/c.sock\"",
        ),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["--kernel", kernel.to_str().unwrap()];
        args.extend_from_slice(extra);
        let run = run_vmm(&args, DEADLINE);
        assert_eq!(run.code, Some(1), "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains(expected), "{args:?}: {}", run.stderr);
        assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    }
    // clap rejects malformed numbers and unknown flags, naming them.
    let run = run_vmm(&["--kernel", "k", "--mem-mib", "lots"], DEADLINE);
    assert_eq!(run.code, Some(2));
    assert!(run.stderr.contains("'lots'") && run.stderr.contains("--mem-mib"));
    let run = run_vmm(&["--kernel", "k", "--memory", "1"], DEADLINE);
    assert_eq!(run.code, Some(2));
    assert!(run.stderr.contains("--memory"));
}

#[test]
fn an_elf_that_does_not_fit_in_memory_is_refused() {
    // 16 MiB of guest memory, initrd sized to leave no room below the top.
    let big = std::env::temp_dir().join(format!("vmm-initrd-{}", std::process::id()));
    std::fs::write(&big, vec![0u8; 15 << 20]).unwrap();
    let run = boot(
        "linux64.elf",
        &["--mem-mib", "16", "--initrd", big.to_str().unwrap()],
    );
    std::fs::remove_file(&big).unwrap();
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("invalid initrd"), "{}", run.stderr);
    assert!(run.stderr.contains("does not fit"), "{}", run.stderr);
}

/// The cycle count the `native` fixture prints for its 100M iterations.
fn loop_cycles(stdout: &str) -> u64 {
    let hex = stdout
        .split("cycles: 0x")
        .nth(1)
        .and_then(|rest| rest.get(..16))
        .unwrap_or_else(|| panic!("no cycle count in {stdout:?}"));
    u64::from_str_radix(hex, 16).unwrap_or_else(|e| panic!("{hex:?}: {e}"))
}

#[test]
fn a_guest_that_declares_pvm_user_mode_runs_natively_on_pvm() {
    let run = boot("native.elf", &[]);
    assert_clean_reset(&run);
    match hypervisor() {
        HypervisorKind::Pvm => {
            assert!(
                run.stdout.starts_with("mode: pvm user mode (cpl 3)\n"),
                "{}",
                run.stdout
            );
            assert!(
                run.stderr
                    .contains("the guest runs in PVM user mode, natively"),
                "{}",
                run.stderr
            );
            // The loop really ran (a 2-instruction body retires at most a
            // few iterations per TSC tick), and finished far sooner than
            // KVM's instruction emulator could (about 75 s).
            assert!(loop_cycles(&run.stdout) > 20_000_000, "{}", run.stdout);
            assert!(run.elapsed < Duration::from_secs(10), "{:?}", run.elapsed);
        }
        HypervisorKind::Hardware => {
            assert!(
                run.stdout.starts_with("mode: pvh entry (cpl 0)\n"),
                "{}",
                run.stdout
            );
            assert!(
                run.stdout.contains("100M iterations done\n"),
                "{}",
                run.stdout
            );
        }
    }
    assert!(run.stderr.contains("guest boot time: "), "{}", run.stderr);
}

#[test]
fn a_guest_without_the_note_keeps_its_privileged_entry() {
    // linux64.elf has no MicroVM note: it enters at CPL 0 everywhere.
    let run = boot("linux64.elf", &[]);
    assert!(!run.stderr.contains("PVM user mode"), "{}", run.stderr);
}

/// Starts the VMM on standby with `initial` arguments, sends it `launch`
/// with its descriptors (or dismisses it, with `None`) and waits for its
/// end.
fn on_standby(initial: &[&str], launch: Option<(Launch, &[RawFd])>) -> VmmRun {
    let (ours, theirs) = seqpacket_pair().unwrap();
    inheritable(&theirs).unwrap();
    let socket = theirs.as_raw_fd().to_string();
    let mut args = vec!["--standby-fd", socket.as_str()];
    args.extend_from_slice(initial);
    let run = std::thread::scope(|s| {
        let vmm = s.spawn(|| run_vmm(&args, DEADLINE));
        // The VMM makes its VM first; the launch waits in the socket.
        if let Some((launch, fds)) = launch {
            launch.send(&ours, fds).unwrap();
        }
        drop(ours);
        vmm.join().unwrap()
    });
    drop(theirs);
    run
}

#[test]
fn a_vmm_on_standby_boots_what_its_launch_names_and_refuses_a_bad_launch_by_name() {
    let kernel = fixture("linux64.elf");
    let launch = |args: &[&str]| Launch {
        vmm_args: args.iter().map(|a| a.to_string()).collect(),
        ..Launch::default()
    };
    // The kernel comes as a descriptor, as a jailed VMM's files do.
    let kernel_file = std::fs::File::open(&kernel).unwrap();
    let with_kernel = Launch {
        fds: vec![60],
        ..launch(&["--kernel", "fd:60"])
    };
    let run = on_standby(&[], Some((with_kernel, &[kernel_file.as_raw_fd()])));
    assert_clean_reset(&run);
    assert!(
        run.stdout.starts_with("fixture: linux64 entry\n"),
        "{}",
        run.stdout
    );
    assert!(boot_time_logged(&run.stderr).is_some(), "{}", run.stderr);

    for (initial, args, expected) in [
        (
            &[][..],
            &["--kernel", kernel.to_str().unwrap(), "--mem-mib", "8"][..],
            "invalid mem_mib \"8\"",
        ),
        (
            &["--no-seccomp"][..],
            &["--kernel", kernel.to_str().unwrap(), "--no-seccomp"][..],
            "--no-seccomp' cannot be used multiple times",
        ),
        (
            &[][..],
            &["--kernel", kernel.to_str().unwrap(), "--hypervisor", "pvm"][..],
            "--kvm-fd and --hypervisor belong to the VMM's start",
        ),
    ] {
        let run = on_standby(initial, Some((launch(args), &[])));
        assert_eq!(run.code, Some(1), "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains(expected), "{args:?}: {}", run.stderr);
        assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    }
    let mounts = Launch {
        mounts: vec!["/a:/b".parse().unwrap()],
        ..launch(&["--kernel", kernel.to_str().unwrap()])
    };
    let run = on_standby(&[], Some((mounts, &[])));
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr.contains("only a jailer can apply it"),
        "{}",
        run.stderr
    );

    // Dismissed without a launch: a pool letting a VMM go.
    let run = on_standby(&[], None);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stdout.is_empty(), "{}", run.stdout);
}
