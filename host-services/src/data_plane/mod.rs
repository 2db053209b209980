//! Where invocations run: the worker service, the router that places each
//! invocation on an execution environment of a leased worker host, the
//! environments' lifecycle log, the lines a guest sends, the Runtime API each guest talks to over
//! vsock, the jailed VMM process behind each environment, and snapshots
//! for cold starts.

pub mod environment;
pub mod host;
pub mod lifecycle;
pub mod log_stream;
pub mod router;
pub mod runtime_api;
pub mod snapshots;
pub mod start_trace;
pub mod vmm_process;
pub mod worker;
