//! The virtio-mmio transport, version 2: the register window a driver
//! finds through `virtio_mmio.device=` on the kernel command line.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{Interrupt, QueueSnapshot, VirtioDevice, INTERRUPT_CONFIG_CHANGE, VIRTIO_F_VERSION_1};
use crate::devices::bus::{lock, BusDevice};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;

/// Register ranges (offset, length) whose writes KVM may queue instead of
/// leaving `KVM_RUN` (see `vstate::coalesced_mmio`): feature and queue
/// selection, the device status and queue set-up. Nothing observes them
/// before the driver's next register read, which leaves `KVM_RUN` and so
/// applies the queued writes first, or before the device's next event
/// (DRIVER_OK then a notification), which the event loop handles only
/// after applying them. Not QueueNotify (an ioeventfd), InterruptACK (it
/// must clear the status before the device raises the next interrupt) or
/// the config space.
pub const COALESCED_WRITES: [(u64, u32); 2] = [(REG_MAGIC, 0x50), (REG_STATUS, 0x38)];
const CONFIG_SPACE: u64 = 0x100;

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

/// A virtio-mmio device as a snapshot keeps it: the transport's
/// registers and the device's queues. Device-specific state is not kept:
/// block and entropy have none between requests, and vsock connections
/// do not survive a restore (see `Vsock::restored`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioState {
    pub device_type: u32,
    pub status: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub driver_features: u64,
    pub queue_select: u32,
    pub interrupt_status: u32,
    pub queues: Vec<QueueSnapshot>,
}

pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Interrupt,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    queue_select: u32,
    status: u32,
}

impl MmioTransport {
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Interrupt,
    ) -> Self {
        Self {
            device,
            mem,
            interrupt,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            queue_select: 0,
            status: 0,
        }
    }

    /// Routes each queue's notifications straight to its eventfd in KVM,
    /// so a notify never stops the vCPU in the VMM.
    pub fn register_ioevents(&self, vm: &VmFd, base: u64) -> Result<(), kvm_ioctls::Error> {
        let device = lock(&self.device);
        for (index, event) in device.queue_events().iter().enumerate() {
            vm.register_ioevent(
                event,
                &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY),
                index as u32,
            )?;
        }
        Ok(())
    }

    pub fn has_undelivered_output(&self) -> bool {
        lock(&self.device).has_undelivered_output()
    }

    pub fn state(&self) -> VirtioState {
        let device = lock(&self.device);
        VirtioState {
            device_type: device.device_type(),
            status: self.status,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            interrupt_status: self.interrupt.status(),
            queues: device.queues().iter().map(|q| q.state().into()).collect(),
        }
    }

    /// Takes a snapshot's state; a device the driver had started is
    /// started again on the restored queues.
    pub fn restore(&mut self, state: &VirtioState) -> Result<(), String> {
        let mut device = lock(&self.device);
        if device.device_type() != state.device_type {
            return Err(format!(
                "virtio device type {} in the snapshot, {} here",
                state.device_type,
                device.device_type()
            ));
        }
        if device.queues().len() != state.queues.len() {
            return Err(format!(
                "virtio device type {}: {} queues in the snapshot, {} here",
                state.device_type,
                state.queues.len(),
                device.queues().len()
            ));
        }
        for (i, (queue, saved)) in device
            .queues_mut()
            .iter_mut()
            .zip(&state.queues)
            .enumerate()
        {
            *queue = Queue::try_from(virtio_queue::QueueState::from(*saved))
                .map_err(|e| format!("virtio device type {}: queue {i}: {e}", state.device_type))?;
        }
        self.status = state.status;
        self.device_features_select = state.device_features_select;
        self.driver_features_select = state.driver_features_select;
        self.driver_features = state.driver_features;
        self.queue_select = state.queue_select;
        if state.status & STATUS_FEATURES_OK != 0 {
            device.ack_features(state.driver_features);
        }
        self.interrupt.restore_status(state.interrupt_status);
        if state.status & STATUS_DRIVER_OK != 0 {
            device.activate(self.mem.clone(), self.interrupt.clone());
            device.restored();
        }
        Ok(())
    }

    fn queue_register(&self, f: impl FnOnce(&Queue) -> u32) -> u32 {
        let device = lock(&self.device);
        device.queues().get(self.queue_select as usize).map_or(0, f)
    }

    /// Applies a queue configuration write, allowed only before the queue
    /// is ready and the device running.
    fn update_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if self.status & STATUS_DRIVER_OK != 0 {
            tracing::warn!("virtio-mmio: queue change after DRIVER_OK ignored");
            return;
        }
        let mut device = lock(&self.device);
        match device.queues_mut().get_mut(self.queue_select as usize) {
            Some(q) if !q.ready() => f(q),
            Some(_) => tracing::warn!("virtio-mmio: change to a ready queue ignored"),
            None => tracing::warn!("virtio-mmio: queue {} does not exist", self.queue_select),
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits; anything else is a broken driver.
        if value & self.status != self.status {
            tracing::warn!(
                "virtio-mmio: status {:#x} drops bits of {:#x}; ignored",
                value,
                self.status
            );
            return;
        }
        let added = value & !self.status;
        let mut value = value;
        if added & STATUS_FEATURES_OK != 0 {
            if self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                // FEATURES_OK is not set: the driver sees that and gives up.
                tracing::warn!("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1");
                value &= !STATUS_FEATURES_OK;
            } else {
                lock(&self.device).ack_features(self.driver_features);
            }
        }
        if added & STATUS_DRIVER_OK != 0 {
            let mut device = lock(&self.device);
            let valid = value & STATUS_FEATURES_OK != 0
                && device
                    .queues()
                    .iter()
                    .all(|q| !q.ready() || q.is_valid(&self.mem));
            if valid {
                device.activate(self.mem.clone(), self.interrupt.clone());
            } else {
                tracing::warn!("virtio-mmio: DRIVER_OK with invalid queues; device needs reset");
                value = (value & !STATUS_DRIVER_OK) | STATUS_NEEDS_RESET;
                self.interrupt.signal(INTERRUPT_CONFIG_CHANGE);
            }
        }
        self.status = value;
    }

    fn reset(&mut self) {
        lock(&self.device).reset();
        self.interrupt.ack(u32::MAX);
        self.status = 0;
        self.driver_features = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.queue_select = 0;
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            lock(&self.device).read_config(offset - CONFIG_SPACE, data);
            return;
        }
        let value = match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => lock(&self.device).device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => {
                let features = lock(&self.device).features();
                match self.device_features_select {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            REG_QUEUE_NUM_MAX => self.queue_register(|q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.queue_register(|q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => 0,
            _ => 0,
        };
        if data.len() == 4 {
            data.copy_from_slice(&value.to_le_bytes());
        } else {
            tracing::warn!("virtio-mmio: {}-byte read at {offset:#x}", data.len());
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            lock(&self.device).write_config(offset - CONFIG_SPACE, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::warn!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_select = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            REG_DRIVER_FEATURES => {
                if self.status & STATUS_FEATURES_OK != 0 {
                    tracing::warn!("virtio-mmio: features changed after FEATURES_OK ignored");
                    return;
                }
                let offered = lock(&self.device).features();
                let (shift, mask) = match self.driver_features_select {
                    0 => (0, 0xffff_ffffu64),
                    1 => (32, 0xffff_ffff_0000_0000),
                    _ => return,
                };
                // Bits the device did not offer are dropped.
                self.driver_features =
                    (self.driver_features & !mask) | ((u64::from(value) << shift) & mask & offered);
            }
            REG_QUEUE_SEL => self.queue_select = value,
            REG_QUEUE_NUM => self.update_queue(|q| q.set_size(value as u16)),
            REG_QUEUE_READY => self.update_queue(|q| q.set_ready(value == 1)),
            REG_QUEUE_DESC_LOW => {
                self.update_queue(|q| q.set_desc_table_address(Some(value), None))
            }
            REG_QUEUE_DESC_HIGH => {
                self.update_queue(|q| q.set_desc_table_address(None, Some(value)))
            }
            REG_QUEUE_DRIVER_LOW => {
                self.update_queue(|q| q.set_avail_ring_address(Some(value), None))
            }
            REG_QUEUE_DRIVER_HIGH => {
                self.update_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            REG_QUEUE_DEVICE_LOW => {
                self.update_queue(|q| q.set_used_ring_address(Some(value), None))
            }
            REG_QUEUE_DEVICE_HIGH => {
                self.update_queue(|q| q.set_used_ring_address(None, Some(value)))
            }
            // Reaches the VMM only when no ioeventfd is registered.
            REG_QUEUE_NOTIFY => {
                let device = lock(&self.device);
                if let Some(event) = device.queue_events().get(value as usize) {
                    let _ = event.write(1);
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.set_status(value),
            _ => tracing::debug!("virtio-mmio: write to {offset:#x} ignored"),
        }
    }
}
