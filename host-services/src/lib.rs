//! The host side of the serverless worker. So far: the AWS Lambda Runtime
//! API server an execution environment's runtime talks to. The control
//! plane, Invoke routing, leases and credentials are not written yet (see
//! the README's status table).

pub mod runtime_api;
pub mod wasm_image;
