//! virtio devices on the virtio-mmio transport (version 2), built on
//! rust-vmm's virtio-queue. The transport (`mmio.rs`) owns the register
//! interface and the driver handshake; each device owns its queues and
//! their processing, which runs on the event loop.

pub mod block;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod mmio;
pub mod rng;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::guest_wake::GuestWake;

/// Offered by every device: the modern (non-legacy) interface.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;

/// Interrupt status bits.
pub const INTERRUPT_USED_RING: u32 = 1 << 0;
pub const INTERRUPT_CONFIG_CHANGE: u32 = 1 << 1;

/// How a device tells the driver it has used buffers: the interrupt status
/// register the transport exposes, and the irqfd behind the device's GSI.
#[derive(Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    irqfd: Arc<EventFd>,
    wake: Option<GuestWake>,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: Arc::new(AtomicU32::new(0)),
            irqfd: Arc::new(irqfd),
            wake: None,
        }
    }

    /// Each interrupt also ends an idle vCPU's sleep.
    pub fn waking(self, wake: GuestWake) -> Self {
        Self {
            wake: Some(wake),
            ..self
        }
    }

    pub fn signal(&self, reason: u32) {
        self.status.fetch_or(reason, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("virtio: cannot raise the interrupt: {e}");
        }
        if let Some(wake) = &self.wake {
            wake.notify();
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Puts back a snapshot's status, and raises the line for any bit the
    /// driver had not acknowledged yet.
    pub fn restore_status(&self, status: u32) {
        self.status.store(0, Ordering::SeqCst);
        if status != 0 {
            self.signal(status);
        }
    }
}

/// A queue's configuration and ring positions, as a snapshot keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// What the transport needs from a device.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Features offered, `VIRTIO_F_VERSION_1` included.
    fn features(&self) -> u64;
    /// Records what the driver accepted, a subset of [`Self::features`].
    fn ack_features(&mut self, features: u64);
    fn queues(&self) -> &[Queue];
    fn queues_mut(&mut self) -> &mut [Queue];
    /// One eventfd per queue, registered as the queue's ioeventfd.
    fn queue_events(&self) -> &[EventFd];
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Called when the driver sets DRIVER_OK with valid queues.
    fn activate(&mut self, mem: GuestMemoryMmap, interrupt: Interrupt);
    fn is_activated(&self) -> bool;
    /// Back to the state before the driver found the device.
    fn reset(&mut self);
    /// Called once a restored device is active again, in a VM that runs
    /// on as a clone of the one snapshotted.
    fn restored(&mut self) {}
    /// Whether the device holds guest data the host has not taken yet (a
    /// vsock stream's bytes waiting for a slow reader): the VMM keeps its
    /// event loop going a little after the guest ended, so that a guest's
    /// last words reach the host.
    fn has_undelivered_output(&self) -> bool {
        false
    }
}

/// Reads a little-endian config space from a byte image, bounds-checked:
/// bytes past the end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(offset..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}
