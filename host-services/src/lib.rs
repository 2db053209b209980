//! The host side of the serverless worker: Lambda's control plane and
//! Invoke API ([`api`], [`control`]), the execution environments that run
//! functions in microVMs ([`environment`], [`router`]), and the Runtime
//! API each environment's runtime talks to ([`runtime_api`]).

pub mod api;
pub mod auth;
pub mod code;
pub mod control;
pub mod environment;
pub mod model;
pub mod router;
pub mod runtime_api;
pub mod store;
pub mod wasm_image;
pub mod worker;
