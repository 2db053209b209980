//! KVM's coalesced MMIO ring: guest writes to registered zones are queued
//! by KVM in a page shared with the VMM instead of each leaving `KVM_RUN`.
//!
//! A write that leaves `KVM_RUN` costs about 26 us on a PVM host and one
//! that KVM queues about 3 us (measured with the bare-metal guest), so the
//! virtio-mmio registers whose writes have no immediate effect are queued
//! (see `devices::virtio::mmio::COALESCED_WRITES`). Every vCPU applies the
//! queue to the MMIO bus, oldest first, each time it leaves `KVM_RUN` and
//! before it handles why; so a device sees the writes in program order and
//! before any read or un-queued write that follows them.
//!
//! A queue notification does not leave `KVM_RUN` either (an ioeventfd), so
//! the event loop applies the queue too before a device handles any event
//! ([`QueuedWritesFirst`]): a device learns that the driver started it
//! before it hears from the queue the driver then notified.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_coalesced_mmio, kvm_coalesced_mmio_ring, KVM_COALESCED_MMIO_PAGE_OFFSET};
use kvm_ioctls::VcpuFd;
use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};

use crate::devices::bus::lock;
use crate::devices::Bus;
use crate::microvm::Subscriber;

/// The VM's ring, mapped once and shared by its vCPUs.
pub struct CoalescedMmio {
    ring: NonNull<kvm_coalesced_mmio_ring>,
    page_size: usize,
    /// Entries in the ring, as KVM computes it from the page size.
    capacity: u32,
    /// One consumer at a time: vCPUs share the ring.
    consumer: Mutex<()>,
}

// SAFETY: the mapping lives as long as the value; the consumer index is
// only written under `consumer`, and KVM's producer index is read
// atomically.
unsafe impl Send for CoalescedMmio {}
// SAFETY: as above.
unsafe impl Sync for CoalescedMmio {}

impl CoalescedMmio {
    /// Maps the VM's ring through one of its vCPUs.
    pub fn map(vcpu: &VcpuFd) -> std::io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page_size = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            n if n > 0 => n as usize,
            _ => return Err(std::io::Error::last_os_error()),
        };
        // SAFETY: a fresh shared mapping of one page of the vCPU file at the
        // offset KVM documents for the ring; checked for failure below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                (KVM_COALESCED_MMIO_PAGE_OFFSET as usize * page_size) as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ring = NonNull::new(addr.cast()).ok_or_else(std::io::Error::last_os_error)?;
        let capacity = ((page_size - size_of::<kvm_coalesced_mmio_ring>())
            / size_of::<kvm_coalesced_mmio>()) as u32;
        Ok(Self {
            ring,
            page_size,
            capacity,
            consumer: Mutex::new(()),
        })
    }

    fn index(&self, field: *mut u32) -> &AtomicU32 {
        // SAFETY: `field` points into the live, aligned ring page.
        unsafe { AtomicU32::from_ptr(field) }
    }

    /// Applies every queued write to `bus`, oldest first.
    pub fn drain(&self, bus: &Bus) {
        let ring = self.ring.as_ptr();
        // SAFETY: fields of the live ring page.
        let (first, last) = unsafe {
            (
                self.index(std::ptr::addr_of_mut!((*ring).first)),
                self.index(std::ptr::addr_of_mut!((*ring).last)),
            )
        };
        if first.load(Ordering::Relaxed) == last.load(Ordering::Acquire) {
            return;
        }
        let _consumer = self
            .consumer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        loop {
            let head = first.load(Ordering::Relaxed);
            if head == last.load(Ordering::Acquire) {
                break;
            }
            if head >= self.capacity {
                // Only KVM and this consumer write the indices; an index
                // out of range means the page is not what it should be.
                tracing::error!("coalesced MMIO ring index {head} out of range; ring dropped");
                first.store(last.load(Ordering::Acquire), Ordering::Release);
                break;
            }
            // SAFETY: `head` is within the ring, whose entries KVM wrote
            // before it published `last`.
            let entry = unsafe {
                std::ptr::addr_of!((*ring).coalesced_mmio)
                    .cast::<kvm_coalesced_mmio>()
                    .add(head as usize)
                    .read_volatile()
            };
            let len = (entry.len as usize).min(entry.data.len());
            bus.write(entry.phys_addr, &entry.data[..len]);
            first.store((head + 1) % self.capacity, Ordering::Release);
        }
    }
}

/// A device on the event loop that sees the queued writes before each of
/// its events, as a vCPU's device accesses do.
pub struct QueuedWritesFirst {
    ring: Arc<CoalescedMmio>,
    bus: Arc<Bus>,
    device: Subscriber,
}

impl QueuedWritesFirst {
    pub fn new(ring: Arc<CoalescedMmio>, bus: Arc<Bus>, device: Subscriber) -> Self {
        Self { ring, bus, device }
    }
}

impl MutEventSubscriber for QueuedWritesFirst {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        // Before the device's lock: applying a write may take it.
        self.ring.drain(&self.bus);
        lock(&self.device).process(events, ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        lock(&self.device).init(ops);
    }
}

impl Drop for CoalescedMmio {
    fn drop(&mut self) {
        // SAFETY: the page mapped in `map`, unmapped once.
        unsafe { libc::munmap(self.ring.as_ptr().cast(), self.page_size) };
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, EventSet, SubscriberOps};
    use kvm_bindings::kvm_userspace_memory_region;
    use kvm_ioctls::{Cap, IoEventAddress, Kvm, NoDatamatch, VcpuExit, VmFd};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::BusDevice;

    /// One access: (offset, written byte or None for a read).
    type Access = (u64, Option<u8>);

    /// Every access in arrival order.
    #[derive(Default)]
    struct Log(Vec<Access>);

    impl BusDevice for Log {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            self.0.push((offset, None));
            data.fill(0);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.first().copied()));
        }
    }

    /// A VM whose vCPU runs `code` in real mode from address 0. The memory
    /// comes first: bindings drop in reverse, so it outlives the VM.
    fn real_mode_vm(kvm: &Kvm, code: &[u8]) -> (GuestMemoryMmap, VmFd, VcpuFd) {
        assert!(kvm.check_extension(Cap::CoalescedMmio));
        let vm = kvm.create_vm().unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4096)]).unwrap();
        mem.write_slice(code, GuestAddress(0)).unwrap();
        let region = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: 4096,
            userspace_addr: mem.get_host_address(GuestAddress(0)).unwrap() as u64,
            flags: 0,
        };
        // SAFETY: `mem` outlives the VM: the caller's bindings drop in
        // reverse order, the memory last.
        unsafe { vm.set_user_memory_region(region) }.unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        sregs.ds.base = 0;
        sregs.ds.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = 0;
        regs.rflags = 2;
        vcpu.set_regs(&regs).unwrap();
        (mem, vm, vcpu)
    }

    /// A real-mode guest writes two registers KVM queues, then reads one it
    /// does not: the device must see both writes, in order, before the read.
    #[test]
    fn queued_writes_reach_the_device_in_order_before_the_next_exit() {
        let Ok(kvm) = Kvm::new() else {
            println!("SKIPPED: no /dev/kvm");
            return;
        };
        #[rustfmt::skip]
        let code: [u8; 14] = [
            0xc6, 0x06, 0x00, 0x20, 0x01, // mov byte [0x2000], 1
            0xc6, 0x06, 0x04, 0x20, 0x02, // mov byte [0x2004], 2
            0xa0, 0x08, 0x20,             // mov al, [0x2008]
            0xf4,                         // hlt
        ];
        let (_mem, vm, mut vcpu) = real_mode_vm(&kvm, &code);
        vm.register_coalesced_mmio(IoEventAddress::Mmio(0x2000), 8)
            .unwrap();

        let ring = CoalescedMmio::map(&vcpu).unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let mut bus = Bus::new();
        bus.insert(log.clone(), 0x2000, 0x10).unwrap();
        let mut exits = Vec::new();
        loop {
            let exit = vcpu.run().unwrap();
            ring.drain(&bus);
            match exit {
                VcpuExit::MmioRead(addr, data) => {
                    exits.push(addr);
                    bus.read(addr, data);
                }
                VcpuExit::MmioWrite(addr, data) => {
                    exits.push(addr);
                    bus.write(addr, data);
                }
                VcpuExit::Hlt => break,
                other => panic!("unexpected exit {other:?}"),
            }
        }
        assert_eq!(exits, [0x2008], "only the read left KVM_RUN");
        assert_eq!(
            log.lock().unwrap().0,
            [(0, Some(1)), (4, Some(2)), (8, None)]
        );
    }

    /// Started, then notified: the guest's status write is queued and its
    /// notification (an ioeventfd) never leaves `KVM_RUN`. The device must
    /// still see the write before it handles the notification.
    #[test]
    fn the_event_loop_applies_queued_writes_before_a_device_event() {
        let Ok(kvm) = Kvm::new() else {
            println!("SKIPPED: no /dev/kvm");
            return;
        };
        #[rustfmt::skip]
        let code: [u8; 11] = [
            0xc6, 0x06, 0x00, 0x20, 0x04, // mov byte [0x2000], 4
            0xc6, 0x06, 0x00, 0x30, 0x01, // mov byte [0x3000], 1
            0xf4,                         // hlt
        ];
        let (_mem, vm, mut vcpu) = real_mode_vm(&kvm, &code);
        vm.register_coalesced_mmio(IoEventAddress::Mmio(0x2000), 8)
            .unwrap();
        let notified = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        vm.register_ioevent(&notified, &IoEventAddress::Mmio(0x3000), NoDatamatch)
            .unwrap();
        let ring = Arc::new(CoalescedMmio::map(&vcpu).unwrap());
        let log = Arc::new(Mutex::new(Log::default()));
        let mut bus = Bus::new();
        bus.insert(log.clone(), 0x2000, 0x10).unwrap();
        assert!(matches!(vcpu.run().unwrap(), VcpuExit::Hlt));

        /// Records what the device had seen when its queue was notified.
        struct Device {
            notified: EventFd,
            log: Arc<Mutex<Log>>,
            seen: Arc<Mutex<Option<Vec<Access>>>>,
        }
        impl MutEventSubscriber for Device {
            fn process(&mut self, _: Events, _: &mut EventOps) {
                let _ = self.notified.read();
                *self.seen.lock().unwrap() = Some(self.log.lock().unwrap().0.clone());
            }
            fn init(&mut self, ops: &mut EventOps) {
                ops.add(Events::new(&self.notified, EventSet::IN)).unwrap();
            }
        }
        let seen = Arc::new(Mutex::new(None));
        let device: Subscriber = Arc::new(Mutex::new(Device {
            notified,
            log,
            seen: seen.clone(),
        }));
        let mut event_loop = EventManager::<Subscriber>::new().unwrap();
        event_loop.add_subscriber(Arc::new(Mutex::new(QueuedWritesFirst::new(
            ring,
            Arc::new(bus),
            device,
        ))));
        event_loop.run_with_timeout(5000).unwrap();
        assert_eq!(*seen.lock().unwrap(), Some(vec![(0, Some(4))]));
    }
}
