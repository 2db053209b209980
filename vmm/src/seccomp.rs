//! Per-thread seccomp filters: the VMM's event-loop thread and each vCPU
//! thread may make only the system calls, and the ioctls, that they use.
//! Anything else kills the process with SIGSYS, which its parent sees and
//! reports. The policy is `seccomp/x86_64.json`; `build.rs` compiles it.

use seccompiler::{apply_filter, sock_filter, BpfProgram};

/// The compiled filters, in `build.rs`'s order.
const COMPILED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp.bpf"));

/// Which filter a thread gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The event loop: devices, host sockets, the end of the run.
    Vmm = 0,
    /// `KVM_RUN` and the device emulation that runs on its exits.
    Vcpu = 1,
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("the built-in seccomp filters are malformed")]
    Malformed,
    #[error("cannot install the {0:?} seccomp filter: {1}")]
    Install(ThreadKind, seccompiler::Error),
}

/// The filter for `kind`, decoded from the build's output.
fn program(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let mut rest = COMPILED;
    for index in 0..=kind as usize {
        let count = rest
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or(SeccompError::Malformed)? as usize;
        let body = rest.get(4..4 + count * 8).ok_or(SeccompError::Malformed)?;
        if index == kind as usize {
            return Ok(body
                .chunks_exact(8)
                .map(|i| sock_filter {
                    code: u16::from_le_bytes([i[0], i[1]]),
                    jt: i[2],
                    jf: i[3],
                    k: u32::from_le_bytes([i[4], i[5], i[6], i[7]]),
                })
                .collect());
        }
        rest = &rest[4 + count * 8..];
    }
    Err(SeccompError::Malformed)
}

/// Installs `kind`'s filter on the calling thread, for good.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let program = program(kind)?;
    apply_filter(&program).map_err(|e| SeccompError::Install(kind, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `body` in a forked child with `kind`'s filter and returns how
    /// the child ended.
    fn in_filtered_child(kind: ThreadKind, body: fn()) -> libc::c_int {
        // SAFETY: the child only installs the filter, makes raw system
        // calls and exits; it touches no lock another thread could hold.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            if install(kind).is_err() {
                // SAFETY: ends the child without running the parent's
                // destructors.
                unsafe { libc::_exit(2) };
            }
            body();
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        status
    }

    fn killed_by_sigsys(status: libc::c_int) -> bool {
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
    }

    /// Every KVM ioctl the filters name has the number the kernel's
    /// headers give it, computed here from the bindings' struct sizes.
    #[test]
    fn the_filters_kvm_ioctl_numbers_match_the_abi() {
        use kvm_bindings::*;
        use std::mem::size_of;
        let ior = |nr: u32, size: usize| (2u32 << 30) | ((size as u32) << 16) | (KVMIO << 8) | nr;
        let iow = |nr: u32, size: usize| (1u32 << 30) | ((size as u32) << 16) | (KVMIO << 8) | nr;
        let iowr = |nr: u32, size: usize| (3u32 << 30) | ((size as u32) << 16) | (KVMIO << 8) | nr;
        let expected: std::collections::HashMap<&str, u32> = [
            ("KVM_RUN", (KVMIO << 8) | 0x80),
            ("KVM_GET_REGS", ior(0x81, size_of::<kvm_regs>())),
            ("KVM_GET_SREGS", ior(0x83, size_of::<kvm_sregs>())),
            ("KVM_TRANSLATE", iowr(0x85, size_of::<kvm_translation>())),
            ("KVM_GET_MSRS", iowr(0x88, size_of::<kvm_msrs>())),
            ("KVM_GET_LAPIC", ior(0x8e, size_of::<kvm_lapic_state>())),
            ("KVM_GET_MP_STATE", ior(0x98, size_of::<kvm_mp_state>())),
            (
                "KVM_GET_VCPU_EVENTS",
                ior(0x9f, size_of::<kvm_vcpu_events>()),
            ),
            ("KVM_GET_DEBUGREGS", ior(0xa1, size_of::<kvm_debugregs>())),
            ("KVM_GET_XSAVE", ior(0xa4, size_of::<kvm_xsave>())),
            ("KVM_GET_XCRS", ior(0xa6, size_of::<kvm_xcrs>())),
            ("KVM_GET_CLOCK", ior(0x7c, size_of::<kvm_clock_data>())),
            (
                "KVM_SET_GSI_ROUTING",
                iow(0x6a, size_of::<kvm_irq_routing>()),
            ),
        ]
        .into_iter()
        .collect();
        let json: serde_json::Value =
            serde_json::from_str(include_str!("../seccomp/x86_64.json")).unwrap();
        let mut checked = 0;
        for thread in ["vmm", "vcpu"] {
            for rule in json[thread]["filter"].as_array().unwrap() {
                for arg in rule["args"].as_array().into_iter().flatten() {
                    let name = arg["comment"].as_str().unwrap_or("");
                    if let Some(&number) = expected.get(name) {
                        assert_eq!(arg["val"].as_u64(), Some(u64::from(number)), "{name}");
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked >= expected.len(), "only {checked} KVM ioctls named");
    }

    /// Runs `program` on a `struct seccomp_data` as the kernel would, for
    /// the instructions seccompiler and `build.rs` emit.
    fn run_bpf(program: &[sock_filter], data: &[u8; 64]) -> u32 {
        let (mut pc, mut a) = (0usize, 0u32);
        loop {
            let i = &program[pc];
            let k = i.k;
            pc += 1;
            match i.code {
                0x20 => {
                    let at = k as usize;
                    a = u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
                }
                0x05 => pc += k as usize,
                0x15 | 0x25 | 0x35 | 0x45 => {
                    let taken = match i.code {
                        0x15 => a == k,
                        0x25 => a > k,
                        0x35 => a >= k,
                        _ => a & k != 0,
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                0x06 => return k,
                code => panic!("instruction {code:#x} not modelled"),
            }
        }
    }

    /// The filters `build.rs` lays out as a search over syscall numbers
    /// decide every call as seccompiler's single chain of the same policy
    /// does: every syscall number of both architectures the kernel asks
    /// about, with each argument value the policy names, and without.
    #[test]
    fn the_searched_filters_decide_as_the_policy_compiled_as_one_chain() {
        const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
        const AUDIT_ARCH_I386: u32 = 0x4000_0003;
        let policy = include_str!("../seccomp/x86_64.json");
        let chains =
            seccompiler::compile_from_json(policy.as_bytes(), seccompiler::TargetArch::x86_64)
                .unwrap();
        let json: serde_json::Value = serde_json::from_str(policy).unwrap();
        for (kind, name) in [(ThreadKind::Vmm, "vmm"), (ThreadKind::Vcpu, "vcpu")] {
            let searched = program(kind).unwrap();
            let chain = &chains[name];
            let mut args: Vec<(usize, u64)> = vec![(0, 0)];
            for rule in json[name]["filter"].as_array().unwrap() {
                for arg in rule["args"].as_array().into_iter().flatten() {
                    let (index, val) =
                        (arg["index"].as_u64().unwrap(), arg["val"].as_u64().unwrap());
                    args.push((index as usize, val));
                    args.push((index as usize, val | 1 << 32));
                    args.push((index as usize, val + 1));
                }
            }
            let numbers = (0..600u32).chain([0x4000_0000, 0x4000_0010, 0x4000_0200, u32::MAX]);
            let mut allowed = 0;
            for nr in numbers {
                for arch in [AUDIT_ARCH_X86_64, AUDIT_ARCH_I386] {
                    for &(index, val) in &args {
                        let mut data = [0u8; 64];
                        data[0..4].copy_from_slice(&nr.to_le_bytes());
                        data[4..8].copy_from_slice(&arch.to_le_bytes());
                        let at = 16 + 8 * index;
                        data[at..at + 8].copy_from_slice(&val.to_le_bytes());
                        let action = run_bpf(&searched, &data);
                        assert_eq!(
                            action,
                            run_bpf(chain, &data),
                            "{name}: nr {nr}, arch {arch:#x}, arg {index} = {val:#x}"
                        );
                        allowed += usize::from(action == 0x7fff_0000);
                    }
                }
            }
            assert!(allowed > 0, "{name}: nothing allowed, so nothing compared");
        }
    }

    #[test]
    fn both_filters_decode() {
        assert!(!program(ThreadKind::Vmm).unwrap().is_empty());
        assert!(!program(ThreadKind::Vcpu).unwrap().is_empty());
    }

    #[test]
    fn a_vcpu_thread_that_opens_a_file_dies_with_sigsys() {
        let status = in_filtered_child(ThreadKind::Vcpu, || {
            // SAFETY: a plain system call on a static path.
            unsafe { libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY) };
        });
        assert!(killed_by_sigsys(status), "status {status:#x}");
    }

    #[test]
    fn the_event_loop_may_not_open_inet_sockets_or_exec() {
        let status = in_filtered_child(ThreadKind::Vmm, || {
            // SAFETY: a plain system call.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        });
        assert!(killed_by_sigsys(status), "AF_INET socket: {status:#x}");
        let status = in_filtered_child(ThreadKind::Vmm, || {
            // SAFETY: a plain system call on static arguments.
            unsafe { libc::execve(c"/bin/true".as_ptr(), std::ptr::null(), std::ptr::null()) };
        });
        assert!(killed_by_sigsys(status), "execve: {status:#x}");
    }

    #[test]
    fn the_event_loop_may_start_the_vm_release_helper_but_not_fork() {
        let status = in_filtered_child(ThreadKind::Vmm, || {
            // A pipe stands for the VM; the helper holds its read end.
            let mut fds = [0; 2];
            // SAFETY: a two-element array for the pipe's ends.
            unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
            if crate::vstate::release::after_process_exit(fds[0]).is_err() {
                // SAFETY: ends the child.
                unsafe { libc::_exit(3) };
            }
        });
        assert_eq!(
            (libc::WIFEXITED(status), libc::WEXITSTATUS(status)),
            (true, 0)
        );
        let status = in_filtered_child(ThreadKind::Vmm, || {
            // SAFETY: a fork whose child, if there were one, exits at once.
            if unsafe { libc::fork() } == 0 {
                unsafe { libc::_exit(0) };
            }
        });
        assert!(killed_by_sigsys(status), "fork: {status:#x}");
    }

    #[test]
    fn what_the_threads_need_is_allowed() {
        let status = in_filtered_child(ThreadKind::Vmm, || {
            // SAFETY: plain system calls; the socket is closed again.
            unsafe {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                libc::close(fd);
            }
        });
        assert_eq!(
            (libc::WIFEXITED(status), libc::WEXITSTATUS(status)),
            (true, 0)
        );
        let status = in_filtered_child(ThreadKind::Vcpu, || {
            // SAFETY: a write of a static buffer to stderr.
            unsafe { libc::write(2, b"".as_ptr().cast(), 0) };
        });
        assert_eq!(
            (libc::WIFEXITED(status), libc::WEXITSTATUS(status)),
            (true, 0)
        );
    }
}
