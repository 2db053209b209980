//! The control socket (`--control-sock PATH`): one JSON request per
//! connection, one JSON reply.
//!
//! ```text
//! {"action": "snapshot", "state": "/run/vm.snap", "memory": "/run/vm.mem"}
//! -> {"ok": true, "paused_us": 2100, "state_bytes": 19000, "memory_bytes": 3100000}
//! -> {"ok": false, "error": "..."}
//! ```
//!
//! A snapshot pauses the vCPUs, writes the state and the memory file, and
//! resumes them: the VM runs on as if nothing happened. The request is
//! read here; the run loop carries it out, between two rounds of device
//! events, so no device changes guest memory while it is saved.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::devices::host_socket::HostSocket;
use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};

/// A request line is never longer.
const MAX_REQUEST: u64 = 4096;
/// How long a client may take to send its request; the event loop waits.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    Snapshot { state: PathBuf, memory: PathBuf },
}

/// What a snapshot took.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotReport {
    /// From the pause request to the vCPUs running again.
    pub paused_us: u64,
    pub state_bytes: u64,
    /// Bytes of guest memory written (the file is sparse).
    pub memory_bytes: u64,
}

pub struct ControlSocket {
    listener: HostSocket,
    pending: Option<(ControlRequest, UnixStream)>,
}

impl ControlSocket {
    /// The socket at `path`, bound once the event loop watches it.
    pub fn new(path: &Path) -> Self {
        Self {
            listener: HostSocket::new(path, "the control socket"),
            pending: None,
        }
    }

    /// The request read last, with the connection its reply goes to.
    pub fn take_pending(&mut self) -> Option<(ControlRequest, UnixStream)> {
        self.pending.take()
    }

    fn accept(&mut self) {
        let Ok(stream) = self.listener.accept() else {
            return;
        };
        match read_request(&stream) {
            Ok(request) => self.pending = Some((request, stream)),
            Err(e) => reply(stream, Err(e)),
        }
    }
}

fn read_request(stream: &UnixStream) -> Result<ControlRequest, String> {
    stream
        .set_nonblocking(false)
        .and_then(|_| stream.set_read_timeout(Some(REQUEST_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(stream.take(MAX_REQUEST))
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the request: {e}"))?;
    serde_json::from_str(&line).map_err(|e| format!("malformed request {:?}: {e}", line.trim()))
}

/// Sends the reply for a request and closes the connection.
pub fn reply(mut stream: UnixStream, result: Result<SnapshotReport, String>) {
    let body = match result {
        Ok(report) => {
            let mut value = serde_json::to_value(report).unwrap_or_default();
            value["ok"] = true.into();
            value
        }
        Err(error) => serde_json::json!({"ok": false, "error": error}),
    };
    let _ = stream.write_all(format!("{body}\n").as_bytes());
}

impl MutEventSubscriber for ControlSocket {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.accept();
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.listener.listen(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_unknown_ones_are_named() {
        let request: ControlRequest =
            serde_json::from_str(r#"{"action":"snapshot","state":"/s","memory":"/m"}"#).unwrap();
        assert_eq!(
            request,
            ControlRequest::Snapshot {
                state: "/s".into(),
                memory: "/m".into()
            }
        );
        let err = serde_json::from_str::<ControlRequest>(r#"{"action":"reboot"}"#).unwrap_err();
        assert!(
            err.to_string().contains("unknown variant `reboot`"),
            "{err}"
        );
        let err = serde_json::from_str::<ControlRequest>(
            r#"{"action":"snapshot","state":"/s","memory":"/m","x":1}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `x`"), "{err}");
    }
}
