pub mod arch;
pub mod builder;
pub mod config;
pub mod control;
pub mod devices;
pub mod jail;
pub mod loader;
pub mod log;
pub mod microvm;
pub mod seccomp;
pub mod snapshot;
pub mod standby;
pub mod vstate;

pub use builder::{build_microvm, BuildError};
pub use config::{VmConfig, VmConfigInput};
pub use microvm::{MicroVm, VmOutcome};
