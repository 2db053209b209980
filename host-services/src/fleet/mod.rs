//! A fleet of hosts: front ends that take the Lambda API and route each
//! invocation to a worker host on another machine, worker hosts that run
//! the execution environments, and etcd between them for membership,
//! leases, the front ends' shared state (`control_plane::shared_state`),
//! the provisioner's leadership, Event invocations mirrored for another
//! front end to take over, and reserved concurrency counted across front
//! ends. Every
//! connection between hosts is mutual TLS 1.3 with AES-256-GCM, etcd's
//! included.

pub mod concurrency;
pub mod etcd;
pub mod event_ledger;
pub mod leadership;
pub mod membership;
pub mod peers;
#[cfg(any(test, feature = "testing"))]
pub mod test_etcd;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tls;
pub mod transport;
