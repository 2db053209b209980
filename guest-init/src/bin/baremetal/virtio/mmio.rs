//! The driver side of the virtio-mmio transport, version 2.

use super::queue::VirtQueue;

const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC: u64 = 0x080;
const REG_QUEUE_DRIVER: u64 = 0x090;
const REG_QUEUE_DEVICE: u64 = 0x0a0;
pub const REG_CONFIG: u64 = 0x100;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;

#[derive(Debug)]
pub enum InitError {
    NotModern(u32),
    FeaturesRefused,
    QueueUnavailable(u16),
}

impl core::fmt::Display for InitError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            InitError::NotModern(v) => write!(f, "virtio-mmio version {v}, not 2"),
            InitError::FeaturesRefused => f.write_str("the device refused VIRTIO_F_VERSION_1"),
            InitError::QueueUnavailable(q) => write!(f, "queue {q} is not available"),
        }
    }
}

/// One virtio-mmio register window.
#[derive(Debug, Clone, Copy)]
pub struct Transport {
    base: u64,
    device_id: u32,
}

impl Transport {
    /// The device at `base`, which the command line declares. Only its ID
    /// is read here: each register read is a VM exit (about 26 us on a PVM
    /// host), and the transport version is checked by `begin_init` on the
    /// devices the guest uses. Nothing answering reads as 0 or all ones.
    pub fn probe(base: u64) -> Option<Self> {
        let device_id = Transport { base, device_id: 0 }.read(REG_DEVICE_ID);
        (device_id != 0 && device_id != u32::MAX).then_some(Transport { base, device_id })
    }

    pub fn device_id(&self) -> u32 {
        self.device_id
    }

    pub fn read(&self, offset: u64) -> u32 {
        // SAFETY: the window is identity mapped device memory.
        unsafe { core::ptr::read_volatile((self.base + offset) as *const u32) }
    }

    pub fn write(&self, offset: u64, value: u32) {
        // SAFETY: as `read`.
        unsafe { core::ptr::write_volatile((self.base + offset) as *mut u32, value) }
    }

    pub fn config_u32(&self, offset: u64) -> u32 {
        self.read(REG_CONFIG + offset)
    }

    pub fn config_u64(&self, offset: u64) -> u64 {
        u64::from(self.read(REG_CONFIG + offset))
            | (u64::from(self.read(REG_CONFIG + offset + 4)) << 32)
    }

    /// Checks the transport version, then: reset, ACKNOWLEDGE, DRIVER and
    /// FEATURES_OK with only `VIRTIO_F_VERSION_1` accepted. Every modern
    /// device offers that feature, so the offer is not read (one exit
    /// less); a device that refuses says so in the status read back.
    pub fn begin_init(&self) -> Result<(), InitError> {
        match self.read(REG_VERSION) {
            2 => {}
            other => return Err(InitError::NotModern(other)),
        }
        self.write(REG_STATUS, 0);
        self.write(REG_STATUS, STATUS_ACKNOWLEDGE);
        self.write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.write(REG_DRIVER_FEATURES_SEL, 0);
        self.write(REG_DRIVER_FEATURES, VIRTIO_F_VERSION_1 as u32);
        self.write(REG_DRIVER_FEATURES_SEL, 1);
        self.write(REG_DRIVER_FEATURES, (VIRTIO_F_VERSION_1 >> 32) as u32);
        let status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.write(REG_STATUS, status);
        if self.read(REG_STATUS) & STATUS_FEATURES_OK == 0 {
            return Err(InitError::FeaturesRefused);
        }
        Ok(())
    }

    /// Sets up queue `index` with up to `size` entries.
    pub fn setup_queue(&self, index: u16, size: u16) -> Result<VirtQueue, InitError> {
        self.write(REG_QUEUE_SEL, u32::from(index));
        let max = self.read(REG_QUEUE_NUM_MAX) as u16;
        if max == 0 {
            return Err(InitError::QueueUnavailable(index));
        }
        let size = size.min(max);
        let queue = VirtQueue::new(size, self.base + REG_QUEUE_NOTIFY, index);
        self.write(REG_QUEUE_NUM, u32::from(size));
        for (reg, addr) in [
            (REG_QUEUE_DESC, queue.desc_addr()),
            (REG_QUEUE_DRIVER, queue.avail_addr()),
            (REG_QUEUE_DEVICE, queue.used_addr()),
        ] {
            self.write(reg, addr as u32);
            self.write(reg + 4, (addr >> 32) as u32);
        }
        self.write(REG_QUEUE_READY, 1);
        Ok(queue)
    }

    pub fn finish_init(&self) {
        self.write(
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
    }
}
