//! One front end at a time does a fleet-wide job (provisioning): the one
//! whose name is under the job's key in etcd. The key lives under that
//! front end's membership lease, so when it dies or is cut off the key
//! goes with the lease, and the next front end to ask takes the job.

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};

use crate::fleet::etcd::{EtcdError, ROOT};
use crate::fleet::membership::HeldLease;

#[derive(Clone)]
pub struct Leadership {
    client: Client,
    lease: HeldLease,
    name: String,
    key: String,
}

impl Leadership {
    /// Leadership of `job`, asked for as `name` under `lease`.
    pub fn new(client: Client, lease: HeldLease, name: &str, job: &str) -> Self {
        Leadership {
            client,
            lease,
            name: name.to_string(),
            key: format!("{ROOT}leaders/{job}"),
        }
    }

    /// Whether this front end leads the job now, taking it if nobody
    /// does. A front end that joined again after its lease lapsed holds a
    /// new lease: it leads again only once the old key is gone.
    pub async fn held(&self) -> Result<bool, EtcdError> {
        let lease = self.lease.id();
        let take = Txn::new()
            .when([Compare::create_revision(
                self.key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(
                self.key.as_str(),
                self.name.as_str(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(self.key.as_str(), None)]);
        let done = self.client.clone().txn(take).await?;
        if done.succeeded() {
            return Ok(true);
        }
        Ok(done.op_responses().into_iter().any(|op| match op {
            TxnOpResponse::Get(get) => get
                .kvs()
                .first()
                .is_some_and(|kv| kv.value() == self.name.as_bytes() && kv.lease() == lease),
            _ => false,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::membership::{HostRecord, Registration, LEASE_TTL};
    use crate::fleet::test_etcd::EtcdServer;
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn one_front_end_leads_and_another_takes_over_when_it_dies() {
        let etcd = EtcdServer::start(None);
        let client = etcd.client(None).await;
        let fe = Registration::join(&client, HostRecord::test_front_end("fe"))
            .await
            .unwrap();
        let fe2 = Registration::join(&client, HostRecord::test_front_end("fe2"))
            .await
            .unwrap();
        let leads =
            |r: &Registration, name| Leadership::new(client.clone(), r.lease(), name, "job");
        let (first, second) = (leads(&fe, "fe"), leads(&fe2, "fe2"));
        assert!(first.held().await.unwrap());
        assert!(!second.held().await.unwrap());
        assert!(first.held().await.unwrap(), "asking again keeps it");

        // fe dies (its renewals stop): fe2 leads once the lease lapses.
        let died = Instant::now();
        drop(fe);
        while !second.held().await.unwrap() {
            assert!(died.elapsed() < LEASE_TTL + Duration::from_secs(3));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!first.held().await.unwrap());
    }
}
