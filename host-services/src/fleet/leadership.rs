//! One front end at a time does a fleet-wide job (provisioning): the one
//! whose name is under the job's key in etcd. The key lives under that
//! front end's membership lease, so when it dies or is cut off the key
//! goes with the lease, and the next front end to ask takes the job.

use etcd_client::Client;

use crate::fleet::etcd::{put_if_absent, EtcdError, ROOT};
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
        Ok(
            match put_if_absent(&self.client, &self.key, self.name.as_bytes(), Some(lease)).await? {
                None => true,
                Some(held) => held.value == self.name.as_bytes() && held.lease == lease,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::membership::{Registration, LEASE_TTL};
    use crate::fleet::test_etcd::EtcdServer;
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn one_front_end_leads_and_another_takes_over_when_it_dies() {
        let etcd = EtcdServer::start(None);
        let client = etcd.client(None).await;
        let (fe, fe2) = Registration::test_front_ends(&client).await;
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
