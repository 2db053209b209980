//! A Unix socket the VMM listens on for host programs: the vsock device's
//! `uds_path` and the control socket.
//!
//! Binding one creates a file, 0.12 ms on this host's ext4, which the guest
//! does not need: host programs find the socket when it appears (as with
//! Firecracker, they wait for the file). So the socket is bound when the
//! event loop first watches it, which the run loop does once the vCPUs
//! run, before its seccomp filter is in.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use event_manager::{EventOps, Events};
use vmm_sys_util::epoll::EventSet;

use crate::devices::watch::{record_failure, watch};

pub struct HostSocket {
    path: PathBuf,
    /// What the socket is, for errors: "the vsock uds_path".
    what: &'static str,
    listener: Option<UnixListener>,
}

impl HostSocket {
    /// The socket at `path`, not bound yet.
    pub fn new(path: &Path, what: &'static str) -> Self {
        HostSocket {
            path: path.to_path_buf(),
            what,
            listener: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Binds the socket, replacing a stale one from an earlier run, and
    /// watches it for connections. A failure is kept for the run loop to
    /// report (see `watch`), naming the path.
    pub fn listen(&mut self, ops: &mut EventOps) {
        let _ = std::fs::remove_file(&self.path);
        match UnixListener::bind(&self.path).and_then(|l| l.set_nonblocking(true).map(|_| l)) {
            Ok(listener) => {
                let events = Events::new_raw(listener.as_raw_fd(), EventSet::IN);
                self.listener = Some(listener);
                watch(ops, events, self.what);
            }
            Err(e) => record_failure(format!(
                "cannot listen on {} {:?}: {e}",
                self.what, self.path
            )),
        }
    }

    /// The listening socket's descriptor, once bound.
    pub fn fd(&self) -> Option<RawFd> {
        self.listener.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// A waiting connection; `WouldBlock` when there is none, or the
    /// socket is not bound yet.
    pub fn accept(&self) -> io::Result<UnixStream> {
        match &self.listener {
            Some(listener) => listener.accept().map(|(stream, _)| stream),
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Drop for HostSocket {
    fn drop(&mut self) {
        if self.listener.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::watch::take_failures;
    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    use std::sync::{Arc, Mutex};

    struct Listening(HostSocket);

    impl MutEventSubscriber for Listening {
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {}

        fn init(&mut self, ops: &mut EventOps) {
            self.0.listen(ops);
        }
    }

    fn scratch(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("host-socket-{tag}-{}", std::process::id()))
    }

    #[test]
    fn binds_when_watched_replaces_a_stale_file_and_removes_its_own() {
        let path = scratch("bind");
        std::fs::write(&path, b"stale").unwrap();
        let socket = HostSocket::new(&path, "the test socket");
        assert!(socket.fd().is_none());
        assert_eq!(
            socket.accept().unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        let mut manager = EventManager::<Arc<Mutex<Listening>>>::new().unwrap();
        let listening = Arc::new(Mutex::new(Listening(socket)));
        manager.add_subscriber(listening.clone());
        assert!(take_failures().is_empty());
        assert!(listening.lock().unwrap().0.fd().is_some());
        let _client = UnixStream::connect(&path).expect("the socket is bound");
        assert!(listening.lock().unwrap().0.accept().is_ok());
        drop(manager);
        drop(listening);
        assert!(!path.exists(), "the socket file is removed with it");
    }

    #[test]
    fn a_path_that_cannot_be_bound_is_reported_by_name() {
        let path = scratch("missing").join("dir").join("sock");
        let mut manager = EventManager::<Arc<Mutex<Listening>>>::new().unwrap();
        manager.add_subscriber(Arc::new(Mutex::new(Listening(HostSocket::new(
            &path,
            "the test socket",
        )))));
        let failures = take_failures();
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(
            failures[0].starts_with("cannot listen on the test socket \"")
                && failures[0].contains("missing"),
            "{failures:?}"
        );
    }
}
