//! A VMM on standby: started ahead of its microVM, it has exec'd, opened
//! KVM and made an empty VM, and waits for its launch on an inherited
//! `SOCK_SEQPACKET` socket. What is left when the launch comes is the
//! microVM's own set-up: its memory, the guest's images, devices and
//! vCPUs. The process's start and the VM's creation (about 1.2 ms of a
//! boot here, and `KVM_CREATE_VM` alone sometimes 2.5 ms) are then off a
//! cold start's path.
//!
//! The launch is the jailer's [`Launch`]: the VMM's remaining arguments,
//! and descriptors to be found at the numbers those arguments name. So
//! that those numbers are free, the VMM holds every low number before it
//! opens anything, and what it opens while it waits goes above them.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use crate::jail::{JailError, Launch, FD_FLOOR};

#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    #[error("holding the low descriptor numbers: {0}")]
    Hold(std::io::Error),
    #[error("--standby-fd {0} is not an open descriptor")]
    NoSocket(RawFd),
    #[error(transparent)]
    Launch(#[from] JailError),
    #[error("a launch for a VMM on standby has {0}: only a jailer can apply it")]
    JailOnly(&'static str),
    #[error("the launch names descriptor {0}, which the VMM already uses")]
    InUse(RawFd),
    #[error("placing descriptor {0}: {1}")]
    Place(RawFd, std::io::Error),
}

/// The free descriptor numbers below [`FD_FLOOR`], held open until a
/// launch's descriptors take their places.
pub struct LowFds {
    held: Vec<OwnedFd>,
}

impl LowFds {
    /// Holds every free number below [`FD_FLOOR`]; the inherited ones
    /// (the standard streams, the launch socket, a jailer's KVM
    /// descriptor) stay as they are.
    pub fn hold() -> Result<Self, StandbyError> {
        // An eventfd, not /dev/null: a jail's root has no /dev.
        // SAFETY: makes a new descriptor, owned below.
        let placeholder = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if placeholder < 0 {
            return Err(StandbyError::Hold(std::io::Error::last_os_error()));
        }
        // SAFETY: as above.
        let placeholder = unsafe { OwnedFd::from_raw_fd(placeholder) };
        let mut held = Vec::new();
        let mut next = 0;
        while next < FD_FLOOR {
            // The lowest free number from `next` on, taken in one step:
            // no other thread's descriptor can be taken over.
            // SAFETY: duplicates a descriptor this process owns.
            let fd = unsafe { libc::fcntl(placeholder.as_raw_fd(), libc::F_DUPFD_CLOEXEC, next) };
            if fd < 0 {
                return Err(StandbyError::Hold(std::io::Error::last_os_error()));
            }
            // SAFETY: the copy just made is this process's own.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            next = fd.as_raw_fd() + 1;
            if fd.as_raw_fd() < FD_FLOOR {
                held.push(fd);
            }
        }
        // The eventfd itself may sit on a low number: it is held too.
        held.push(placeholder);
        Ok(LowFds { held })
    }

    /// Puts each of `fds` at its number in `numbers`, which must be one
    /// this holds, and frees the rest.
    fn place(mut self, fds: Vec<OwnedFd>, numbers: &[RawFd]) -> Result<(), StandbyError> {
        for (fd, &number) in fds.into_iter().zip(numbers) {
            let Some(at) = self.held.iter().position(|h| h.as_raw_fd() == number) else {
                return Err(StandbyError::InUse(number));
            };
            // dup2 replaces the placeholder at `number` in one step; the
            // placeholder's owner must not close the number afterwards.
            let _ = self.held.swap_remove(at).into_raw_fd();
            // SAFETY: both descriptors are this process's own; `number`
            // is taken over by the launch's descriptor.
            if unsafe { libc::dup2(fd.as_raw_fd(), number) } < 0 {
                return Err(StandbyError::Place(number, std::io::Error::last_os_error()));
            }
        }
        Ok(())
    }
}

/// What a VMM on standby sends its owner once its VM is made: the owner
/// may then set what the jail's own launch set before (a jailer raises
/// the memory limit for a VMM of any size; its owner lowers it to the
/// microVM's).
pub const READY: &[u8] = b"ready";

/// The owner's side of [`READY`]: waits up to `timeout` for the VMM on
/// standby at the other end of `socket` to say its VM is made; the error
/// says what came instead.
pub fn await_ready(socket: &UnixStream, timeout: std::time::Duration) -> Result<(), String> {
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut message = [0u8; 16];
    let read = std::io::Read::read(&mut &*socket, &mut message).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!("no word within {timeout:?}")
        }
        _ => e.to_string(),
    })?;
    match &message[..read] {
        READY => Ok(()),
        [] => Err("the VMM ended before it was ready".into()),
        other => Err(format!("it said {:?}", String::from_utf8_lossy(other))),
    }
}

/// Whether the VMM on standby at the other end of `socket` has said
/// [`READY`] (or anything), without waiting or taking the word: an owner
/// choosing among several takes one whose VM is made.
pub fn has_spoken(socket: &UnixStream) -> bool {
    let mut byte = 0u8;
    // SAFETY: peeks at most one byte into `byte`; nothing is consumed.
    let peeked = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            (&raw mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    peeked > 0
}

/// Tells the owner on `socket` that the VM is made ([`READY`]), waits for
/// the launch, places its descriptors and returns the VMM's arguments it
/// carries; `None` when the socket closed without one (a pool of VMMs
/// shrinking).
pub fn wait_for_launch(socket: RawFd, low: LowFds) -> Result<Option<Vec<String>>, StandbyError> {
    // SAFETY: only asks whether `socket` is open.
    if unsafe { libc::fcntl(socket, libc::F_GETFD) } < 0 {
        return Err(StandbyError::NoSocket(socket));
    }
    // SAFETY: the socket was handed to this process to own (checked open
    // above); it is closed once the launch is read.
    let socket = UnixStream::from(unsafe { OwnedFd::from_raw_fd(socket) });
    // An owner that sent its launch and left hears nothing: the launch
    // still waits in the socket.
    let _ = (&socket).write_all(READY);
    let Some((launch, fds)) = Launch::receive(&socket)? else {
        return Ok(None);
    };
    if !launch.mounts.is_empty() {
        return Err(StandbyError::JailOnly("mounts"));
    }
    if launch.memory_max.is_some() {
        return Err(StandbyError::JailOnly("a memory limit"));
    }
    low.place(fds, &launch.fds)?;
    Ok(Some(launch.vmm_args))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jail::seqpacket_pair;
    use std::io::{Read, Seek};

    /// One test: the descriptor table is the process's, shared by the
    /// test threads, so the numbers it holds must not move under another.
    #[test]
    fn a_launch_gets_its_arguments_and_its_descriptors_at_their_numbers_or_a_clear_refusal() {
        let (ours, theirs) = seqpacket_pair().unwrap();
        let low = LowFds::hold().unwrap();
        let free = low.held[0].as_raw_fd();
        let mut secret = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        secret.write_all(b"key").unwrap();
        let launch = Launch {
            vmm_args: vec!["--kernel".into(), "/k".into()],
            fds: vec![free],
            ..Launch::default()
        };
        launch.send(&ours, &[secret.as_raw_fd()]).unwrap();
        assert!(!has_spoken(&ours), "nothing said before the VMM waits");
        let args = wait_for_launch(theirs.into_raw_fd(), low).unwrap().unwrap();
        assert_eq!(args, ["--kernel", "/k"]);
        assert!(has_spoken(&ours), "its ready waits to be read");
        assert!(has_spoken(&ours), "a look takes nothing");
        await_ready(&ours, std::time::Duration::from_secs(1)).unwrap();
        assert!(!has_spoken(&ours));
        // SAFETY: the launch placed its descriptor at `free`.
        let mut placed = unsafe { std::fs::File::from_raw_fd(free) };
        placed.rewind().unwrap();
        let mut read = String::new();
        placed.read_to_string(&mut read).unwrap();
        assert_eq!(read, "key");

        // A number the VMM uses, or mounts: refused by name. A socket closed
        // without a launch dismisses the VMM.
        let in_use = ours.as_raw_fd();
        for (launch, expected) in [
            (
                Launch {
                    fds: vec![in_use],
                    ..Launch::default()
                },
                format!("descriptor {in_use}, which the VMM already uses"),
            ),
            (
                Launch {
                    mounts: vec!["/a:/b".parse().unwrap()],
                    ..Launch::default()
                },
                "has mounts".to_string(),
            ),
        ] {
            let (ours, theirs) = seqpacket_pair().unwrap();
            let fds: Vec<RawFd> = launch.fds.iter().map(|_| secret.as_raw_fd()).collect();
            launch.send(&ours, &fds).unwrap();
            let error = wait_for_launch(theirs.into_raw_fd(), LowFds::hold().unwrap())
                .unwrap_err()
                .to_string();
            assert!(error.contains(&expected), "{error}");
        }
        let (ours, theirs) = seqpacket_pair().unwrap();
        drop(ours);
        let dismissed = wait_for_launch(theirs.into_raw_fd(), LowFds::hold().unwrap()).unwrap();
        assert_eq!(dismissed, None, "a socket closed without a launch");
        let error = wait_for_launch(4000, LowFds::hold().unwrap()).unwrap_err();
        assert!(matches!(error, StandbyError::NoSocket(_)), "{error}");
    }
}
