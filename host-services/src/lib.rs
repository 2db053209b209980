//! The host side of the serverless worker: Lambda's control plane and
//! Invoke API ([`api`], [`control`]), the execution environments that run
//! functions in microVMs ([`environment`]) on leased workers ([`host`]),
//! the router that places invocations on them ([`router`]), the Runtime
//! API each environment's runtime talks to ([`runtime_api`]), and the
//! jailed VMM process behind each environment ([`vmm_process`]).

pub mod api;
pub mod artifacts;
pub mod auth;
pub mod chunk_store;
pub mod code;
pub mod control;
pub mod environment;
pub mod erofs_image;
pub mod host;
pub mod key_file;
pub mod key_service;
pub mod layers;
pub mod lifecycle;
pub mod model;
pub mod oci;
pub mod role_credentials;
pub mod router;
pub mod runtime_api;
pub mod snapshots;
pub mod store;
pub mod vmm_process;
pub mod wasm_image;
pub mod worker;
