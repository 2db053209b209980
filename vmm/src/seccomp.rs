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
