//! The host side of the serverless worker, in layers; a module uses only
//! the layers below its own (`tests/layering.rs` checks it):
//!
//! - [`api`]: the front end, Lambda's REST API and Invoke over HTTP.
//! - [`data_plane`]: where invocations run: the [`data_plane::worker`]
//!   service, the [`data_plane::router`] that places each invocation on an
//!   execution environment ([`data_plane::environment`]) of a leased
//!   worker host ([`data_plane::host`]), the Runtime API the guest talks
//!   to, the jailed VMM process behind each environment, and snapshots; in
//!   a fleet, the front end's placement across worker hosts
//!   ([`data_plane::fleet_router`]) and what a worker host serves it
//!   ([`data_plane::host_service`]).
//! - [`control_plane`]: what functions are: the model, the store (redb),
//!   functions, versions, aliases and provisioned configs, layers.
//! - [`artifacts`]: function code at rest: ZIP checks, code disks (EROFS,
//!   the bare-metal guest's Wasm image), sealed artifacts, OCI images and
//!   their convergently sealed chunks.
//! - [`security`]: accounts and SigV4, execution-role credentials, the key
//!   service and its key files.
//! - [`fleet`]: what a fleet's hosts share: mutual TLS 1.3, HTTP between
//!   hosts, etcd, and membership under leases.
//! - [`error`] and [`ids`]: Lambda's error shapes and the names every
//!   layer uses.
//!
//! Above them all, `fuzzing` (tests and the `fuzzing` feature): harnesses
//! for the parsers of bytes a guest or a caller chooses.

pub mod api;
pub mod artifacts;
pub mod control_plane;
pub mod data_plane;
pub mod error;
pub mod fleet;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod ids;
pub mod security;
