//! Where invocations run: the worker service, the router that places each
//! invocation on an execution environment of a leased worker host, the
//! environments' lifecycle log, the lines a guest sends, the Runtime API each guest talks to over
//! vsock, the jailed VMM process behind each environment, and snapshots
//! for cold starts. In a fleet, a front end's placement across worker
//! hosts and what the two say to each other.

pub mod environment;
pub mod fleet_router;
pub mod fleet_wire;
pub mod host;
pub mod host_service;
pub mod lifecycle;
pub mod log_stream;
pub mod placement;
pub mod router;
pub mod runtime_api;
pub mod snapshots;
pub mod start_trace;
pub mod vmm_process;
pub mod worker;
