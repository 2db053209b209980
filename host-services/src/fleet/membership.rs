//! Which hosts are in the fleet. Each host puts its record in etcd under
//! a lease it keeps alive; a host that crashes or is cut off stops
//! renewing it, etcd deletes the record when the lease lapses (within
//! [`LEASE_TTL`]), and every watcher sees it go.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use etcd_client::{
    Client, EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::fleet::etcd::{EtcdError, ROOT};

/// How long a host's record outlives its last renewal. etcd's shortest
/// lease is about 2 s with its default timings.
pub const LEASE_TTL: Duration = Duration::from_secs(3);

/// How often a host renews its lease: three times per lease, so one lost
/// renewal does not drop it.
const RENEW_EVERY: Duration = Duration::from_secs(1);

fn hosts_prefix() -> String {
    format!("{ROOT}hosts/")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    FrontEnd,
    WorkerHost,
}

/// What a host tells the fleet about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// The name its certificate carries.
    pub name: String,
    pub role: Role,
    /// Where it serves the fleet's endpoints.
    pub address: SocketAddr,
    /// Environments it can hold.
    pub capacity: usize,
}

impl HostRecord {
    /// The record of a front end named `name` that serves nothing, for
    /// tests that join etcd as one.
    #[cfg(test)]
    pub(crate) fn test_front_end(name: &str) -> Self {
        HostRecord {
            name: name.to_string(),
            role: Role::FrontEnd,
            address: "127.0.0.1:1".parse().expect("an address"),
            capacity: 0,
        }
    }
}

/// The lease a host's records live under, as it is now: a host that
/// joins again after its lease lapsed holds a new one.
#[derive(Clone)]
pub struct HeldLease(Arc<AtomicI64>);

impl HeldLease {
    pub fn id(&self) -> i64 {
        self.0.load(Ordering::Acquire)
    }
}

/// This host's place in the fleet, kept while the value lives: dropping
/// it stops the renewals (the record then lapses); [`Registration::leave`]
/// removes the record at once.
pub struct Registration {
    client: Client,
    lease: Arc<AtomicI64>,
    renewer: tokio::task::JoinHandle<()>,
}

/// Grants a lease and puts `record` under it.
async fn register(client: &mut Client, record: &HostRecord) -> Result<i64, EtcdError> {
    let lease = client
        .lease_grant(LEASE_TTL.as_secs() as i64, None)
        .await?
        .id();
    let value = serde_json::to_vec(record).expect("host records serialize");
    client
        .put(
            format!("{}{}", hosts_prefix(), record.name),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )
        .await?;
    Ok(lease)
}

impl Registration {
    /// Joins the fleet as `record`. When etcd loses the lease (the host
    /// was cut off longer than [`LEASE_TTL`]), the host registers again as
    /// soon as etcd answers.
    pub async fn join(client: &Client, record: HostRecord) -> Result<Self, EtcdError> {
        let mut client = client.clone();
        let first = register(&mut client, &record).await?;
        let lease = Arc::new(AtomicI64::new(first));
        let held = lease.clone();
        let mut renewing = client.clone();
        let renewer = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(RENEW_EVERY);
            // One keep-alive stream serves every renewal of a lease.
            let mut open: Option<(LeaseKeeper, LeaseKeepAliveStream)> = None;
            loop {
                ticks.tick().await;
                let id = held.load(Ordering::Acquire);
                let alive = async {
                    if open.as_ref().is_none_or(|(keeper, _)| keeper.id() != id) {
                        match renewing.lease_keep_alive(id).await {
                            Ok(stream) => open = Some(stream),
                            // The client's words for a lease etcd no
                            // longer has, when a stream for it opens.
                            Err(etcd_client::Error::LeaseKeepAliveError(m))
                                if m.contains("not found") =>
                            {
                                return Ok(false)
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    let (keeper, answers) = open.as_mut().expect("opened above");
                    keeper.keep_alive().await?;
                    let answer = tokio::time::timeout(RENEW_EVERY, answers.message())
                        .await
                        .map_err(|_| {
                            etcd_client::Error::LeaseKeepAliveError("no answer".into())
                        })??;
                    Ok::<_, EtcdError>(answer.is_some_and(|a| a.ttl() > 0))
                }
                .await;
                match alive {
                    Ok(true) => {}
                    Ok(false) => {
                        open = None;
                        tracing::warn!("fleet: the lease of {} lapsed; joining again", record.name);
                        match register(&mut renewing, &record).await {
                            Ok(id) => held.store(id, Ordering::Release),
                            Err(e) => tracing::warn!("fleet: joining again: {e}"),
                        }
                    }
                    Err(e) => {
                        open = None;
                        tracing::warn!("fleet: renewing the lease of {}: {e}", record.name);
                    }
                }
            }
        });
        Ok(Registration {
            client,
            lease,
            renewer,
        })
    }

    /// The lease this host's records live under.
    pub fn lease(&self) -> HeldLease {
        HeldLease(self.lease.clone())
    }

    /// Leaves the fleet now, rather than when the lease lapses.
    pub async fn leave(mut self) -> Result<(), EtcdError> {
        self.renewer.abort();
        let id = self.lease.load(Ordering::Acquire);
        self.client.lease_revoke(id).await?;
        Ok(())
    }

    /// Front ends "fe" and "fe2" joined to the etcd `client` speaks to.
    #[cfg(test)]
    pub(crate) async fn test_front_ends(client: &Client) -> (Registration, Registration) {
        let join = async |name| {
            Registration::join(client, HostRecord::test_front_end(name))
                .await
                .expect("joining etcd")
        };
        (join("fe").await, join("fe2").await)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

/// The fleet's hosts as etcd has them, kept current by a watch.
#[derive(Clone)]
pub struct Members {
    hosts: Arc<RwLock<BTreeMap<String, HostRecord>>>,
    changed: watch::Receiver<u64>,
}

impl Members {
    /// Reads the hosts and follows their changes. A broken watch is
    /// started again from a fresh read, so nothing is missed.
    pub async fn follow(client: &Client) -> Result<Self, EtcdError> {
        let mut client = client.clone();
        let hosts = Arc::new(RwLock::new(BTreeMap::new()));
        let (tell, changed) = watch::channel(0);
        let revision = reload(&mut client, &hosts).await?;
        tell.send_modify(|n| *n += 1);
        let held = hosts.clone();
        tokio::spawn(async move {
            let mut revision = revision;
            loop {
                if let Err(e) = follow_from(&mut client, &held, &tell, revision).await {
                    tracing::warn!("fleet: watching the hosts: {e}");
                }
                if tell.is_closed() {
                    return;
                }
                tokio::time::sleep(RENEW_EVERY).await;
                match reload(&mut client, &held).await {
                    Ok(r) => {
                        revision = r;
                        tell.send_modify(|n| *n += 1);
                    }
                    Err(e) => tracing::warn!("fleet: reading the hosts: {e}"),
                }
            }
        });
        Ok(Members { hosts, changed })
    }

    /// The hosts now, by name.
    pub fn hosts(&self) -> BTreeMap<String, HostRecord> {
        self.hosts.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until the hosts change.
    pub async fn changed(&mut self) {
        let _ = self.changed.changed().await;
    }
}

fn decode(key: &[u8], value: &[u8]) -> Option<HostRecord> {
    match serde_json::from_slice(value) {
        Ok(record) => Some(record),
        Err(e) => {
            tracing::warn!(
                "fleet: the host record {} is not one: {e}",
                String::from_utf8_lossy(key)
            );
            None
        }
    }
}

/// Reads every host record; returns the revision read at.
async fn reload(
    client: &mut Client,
    hosts: &RwLock<BTreeMap<String, HostRecord>>,
) -> Result<i64, EtcdError> {
    let read = client
        .get(hosts_prefix(), Some(GetOptions::new().with_prefix()))
        .await?;
    let fresh: BTreeMap<String, HostRecord> = read
        .kvs()
        .iter()
        .filter_map(|kv| decode(kv.key(), kv.value()))
        .map(|r| (r.name.clone(), r))
        .collect();
    *hosts.write().unwrap_or_else(|e| e.into_inner()) = fresh;
    Ok(read.header().map_or(0, |h| h.revision()))
}

/// Applies the changes after `revision` until the watch ends.
async fn follow_from(
    client: &mut Client,
    hosts: &RwLock<BTreeMap<String, HostRecord>>,
    tell: &watch::Sender<u64>,
    revision: i64,
) -> Result<(), EtcdError> {
    let prefix = hosts_prefix();
    let mut stream = client
        .watch(
            prefix.as_str(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        )
        .await?;
    while let Some(answer) = stream.message().await? {
        if answer.canceled() {
            return Ok(());
        }
        {
            let mut hosts = hosts.write().unwrap_or_else(|e| e.into_inner());
            for event in answer.events() {
                let Some(kv) = event.kv() else { continue };
                let name = String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned();
                match event.event_type() {
                    EventType::Put => {
                        if let Some(record) = decode(kv.key(), kv.value()) {
                            if hosts.insert(name.clone(), record).is_none() {
                                tracing::info!("fleet: host {name} joined");
                            }
                        }
                    }
                    EventType::Delete => {
                        if hosts.remove(&name).is_some() {
                            tracing::info!("fleet: host {name} left");
                        }
                    }
                }
            }
        }
        if tell.send(answer.events().len() as u64).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::etcd::connect;
    use crate::fleet::test_etcd::EtcdServer;
    use crate::fleet::testing::{fleet_certs, temp_dir};
    use crate::fleet::tls::FleetTls;
    use std::time::Instant;

    fn record(name: &str, port: u16) -> HostRecord {
        HostRecord {
            name: name.into(),
            role: Role::WorkerHost,
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            capacity: 10,
        }
    }

    async fn until(members: &mut Members, what: impl Fn(&BTreeMap<String, HostRecord>) -> bool) {
        tokio::time::timeout(Duration::from_secs(15), async {
            while !what(&members.hosts()) {
                members.changed().await;
            }
        })
        .await
        .expect("the hosts did not change as expected");
    }

    #[tokio::test]
    async fn hosts_join_leave_and_lapse() {
        let etcd = EtcdServer::start(None);
        let client = etcd.client(None).await;
        let mut members = Members::follow(&client).await.unwrap();
        assert!(members.hosts().is_empty());

        let h1 = Registration::join(&client, record("h1", 1)).await.unwrap();
        let h2 = Registration::join(&client, record("h2", 2)).await.unwrap();
        until(&mut members, |h| h.len() == 2).await;
        assert_eq!(members.hosts()["h2"], record("h2", 2));
        // Renewals keep them past their lease.
        tokio::time::sleep(LEASE_TTL + Duration::from_secs(1)).await;
        assert_eq!(members.hosts().len(), 2);

        h1.leave().await.unwrap();
        until(&mut members, |h| !h.contains_key("h1")).await;

        // A host that stops renewing (as a killed one does) is gone within
        // its lease, and no sooner than the renewal period.
        let stopped = Instant::now();
        drop(h2);
        until(&mut members, |h| h.is_empty()).await;
        let gone = stopped.elapsed();
        assert!(
            gone >= RENEW_EVERY && gone <= LEASE_TTL + Duration::from_secs(2),
            "{gone:?}"
        );

        // A follower that joined late sees the hosts as they are.
        let _h3 = Registration::join(&client, record("h3", 3)).await.unwrap();
        let mut late = Members::follow(&client).await.unwrap();
        until(&mut late, |h| h.keys().eq(["h3"])).await;
    }

    #[tokio::test]
    async fn a_host_cut_off_past_its_lease_joins_again() {
        let etcd = EtcdServer::start(None);
        let client = etcd.client(None).await;
        let mut members = Members::follow(&client).await.unwrap();
        let _h1 = Registration::join(&client, record("h1", 1)).await.unwrap();
        until(&mut members, |h| h.len() == 1).await;
        // etcd ends the lease, as it does for a host it has not heard from.
        let mut admin = client.clone();
        let leases = admin.leases().await.unwrap();
        for lease in leases.leases() {
            admin.lease_revoke(lease.id()).await.unwrap();
        }
        until(&mut members, |h| h.is_empty()).await;
        until(&mut members, |h| h.len() == 1).await;
    }

    #[tokio::test]
    async fn etcd_over_the_fleets_tls_serves_members_only() {
        let dir = temp_dir("etcd-tls");
        fleet_certs(&dir.join("fleet"), &["etcd=127.0.0.1", "h1"]);
        fleet_certs(&dir.join("other"), &["h1"]);
        let etcd = EtcdServer::start(Some(&dir.join("fleet")));
        let h1 = FleetTls::load(&dir.join("fleet"), "h1").unwrap();
        let mut member = etcd.client(Some(&h1)).await;
        member.put("k", "v", None).await.unwrap();
        let read = member.get("k", None).await.unwrap();
        assert_eq!(read.kvs()[0].value(), b"v");

        let endpoints = std::slice::from_ref(&etcd.endpoint);
        let stranger = FleetTls::load(&dir.join("other"), "h1").unwrap();
        let mut outsider = connect(endpoints, Some(&stranger)).await.unwrap();
        assert!(outsider.get("k", None).await.is_err());
        let mut plain = connect(endpoints, None).await.unwrap();
        assert!(plain.get("k", None).await.is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_dead_endpoint_is_passed_over() {
        let etcd = EtcdServer::start(None);
        let _ready = etcd.client(None).await;
        // A port nothing listens on any more, as a stopped etcd leaves.
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let mut client = connect(&[dead, etcd.endpoint.clone()], None).await.unwrap();
        client.put("k", "v", None).await.unwrap();
    }
}
