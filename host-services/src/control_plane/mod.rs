//! What the functions are: their model and wire shapes, the redb store
//! (and, in a fleet, its replication across front ends), functions,
//! versions, aliases, concurrency and provisioned configs, and layers, and
//! backups of the state.

pub mod account;
pub mod backup;
pub mod event_config;
pub mod functions;
pub mod images;
pub mod layers;
pub mod model;
pub mod policy;
pub mod shared_state;
pub mod store;
pub mod tags;
