//! Where the worker's invocations run: on this process's own leased
//! workers ([`InvokeRouter`]), or on a fleet's worker hosts
//! ([`FleetRouter`]) when this process is a front end.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::data_plane::environment::Launch;
use crate::data_plane::fleet_router::FleetRouter;
use crate::data_plane::fleet_wire::Retire;
use crate::data_plane::host::SnapStartError;
use crate::data_plane::lifecycle::DestroyReason;
use crate::data_plane::router::{InvokeRouter, RouteError, Routed};
use crate::error::ApiError;
use crate::fleet::event_ledger::EventLedger;
use crate::ids::VersionKey;

#[derive(Clone)]
pub enum Placement {
    Local(Arc<InvokeRouter>),
    Fleet(Arc<FleetRouter>),
}

impl Placement {
    /// Runs one invocation of `key` in an environment of its own; one
    /// started for it is made of what `launch` puts together.
    pub async fn invoke(
        &self,
        key: &VersionKey,
        launch: impl FnOnce() -> Result<Launch, ApiError>,
        reserved: Option<u32>,
        request_id: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Routed, RouteError> {
        match self {
            Placement::Local(router) => {
                router
                    .invoke(key, launch, reserved, request_id, payload, timeout)
                    .await
            }
            Placement::Fleet(fleet) => {
                fleet
                    .invoke(key, launch, reserved, request_id, payload, timeout)
                    .await
            }
        }
    }

    /// Stops the idle environments `retire` covers, and forgets their
    /// snapshots, wherever they are.
    pub async fn retire(&self, retire: Retire) {
        match self {
            Placement::Local(router) => retire_local(router, &retire).await,
            Placement::Fleet(fleet) => fleet.retire(retire).await,
        }
    }

    /// Provisioned environments of `key` now.
    pub fn provisioned(&self, key: &VersionKey) -> usize {
        match self {
            Placement::Local(router) => router.provisioned(key),
            Placement::Fleet(fleet) => fleet.provisioned(key),
        }
    }

    /// Where accepted Event invocations are mirrored for another front end
    /// to take over: in a fleet only.
    pub fn event_ledger(&self) -> Option<&EventLedger> {
        match self {
            Placement::Local(_) => None,
            Placement::Fleet(fleet) => Some(fleet.events()),
        }
    }

    /// Environments the fleet's worker hosts can hold, when they are
    /// elsewhere (this process's own are counted by its flags).
    pub fn fleet_capacity(&self) -> Option<usize> {
        match self {
            Placement::Local(_) => None,
            Placement::Fleet(fleet) => Some(fleet.capacity()),
        }
    }

    /// Whether this process keeps provisioned environments itself, or
    /// only learns what the fleet's leading front end keeps.
    pub async fn leads_provisioning(&self) -> bool {
        match self {
            Placement::Local(_) => true,
            Placement::Fleet(fleet) => fleet.leads_provisioning().await,
        }
    }

    /// Learns what is provisioned of `keys`, changing nothing.
    pub async fn observe_provisioned(&self, keys: &[VersionKey]) {
        match self {
            // Its own router's count is always current.
            Placement::Local(_) => {}
            Placement::Fleet(fleet) => fleet.observe_provisioned(keys).await,
        }
    }

    /// Brings each version's provisioned environments to its target;
    /// returns the versions that could not be brought there.
    pub async fn reconcile_provisioned(
        &self,
        targets: &[(Launch, usize)],
    ) -> Vec<(VersionKey, RouteError)> {
        match self {
            Placement::Local(router) => router.reconcile_provisioned(targets).await,
            Placement::Fleet(fleet) => fleet.reconcile_provisioned(targets).await,
        }
    }

    /// Initializes and snapshots a SnapStart version.
    pub async fn snap_start(&self, launch: &Launch) -> Result<(), SnapStartError> {
        match self {
            Placement::Local(router) => router.snap_start(launch).await,
            Placement::Fleet(_) => Err(SnapStartError::NotInFleet),
        }
    }
}

/// Retires on this process's own workers.
pub async fn retire_local(router: &InvokeRouter, retire: &Retire) {
    if let Some(snapshots) = router.snapshots() {
        snapshots.remove(
            &retire.account,
            &retire.function,
            (!retire.deleted).then_some(crate::control_plane::model::LATEST),
        );
    }
    router
        .retire(|k| retire.covers(k), DestroyReason::FunctionUpdated)
        .await;
}
