//! The fleet's hosts as peers to call: membership says who is there and
//! where, and each is called over the fleet's TLS on connections kept for
//! it.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::fleet::membership::{HostRecord, Members, Role};
use crate::fleet::tls::FleetTls;
use crate::fleet::transport::Peer;

pub struct PeerSet {
    pub tls: FleetTls,
    pub members: Members,
    peers: Mutex<HashMap<String, Peer>>,
}

impl PeerSet {
    pub fn new(tls: FleetTls, members: Members) -> Self {
        PeerSet {
            tls,
            members,
            peers: Mutex::default(),
        }
    }

    /// The hosts in `role` now, by name.
    pub fn hosts(&self, role: Role) -> Vec<HostRecord> {
        self.members
            .hosts()
            .into_values()
            .filter(|h| h.role == role)
            .collect()
    }

    /// The peer for `record`, with the connections kept for it (new ones
    /// if it moved).
    pub fn peer(&self, record: &HostRecord) -> Peer {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        match peers.get(&record.name) {
            Some(peer) if peer.address == record.address => peer.clone(),
            _ => {
                let peer = Peer::new(&record.name, record.address, &self.tls);
                peers.insert(record.name.clone(), peer.clone());
                peer
            }
        }
    }

    /// The peer named `name`, if it is in the fleet now.
    pub fn named(&self, name: &str) -> Option<Peer> {
        let record = self.members.hosts().remove(name)?;
        Some(self.peer(&record))
    }
}
