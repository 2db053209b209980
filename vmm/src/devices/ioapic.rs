//! A userspace IOAPIC for KVM's split irqchip.
//!
//! With `KVM_CAP_SPLIT_IRQCHIP` the LAPICs stay in the kernel and the
//! IOAPIC moves to the VMM. Devices still signal through irqfds, one GSI per
//! IOAPIC pin; this device keeps KVM's GSI routing table in step with the
//! guest's redirection entries, so each unmasked pin is delivered as the MSI
//! its entry describes, without a trip through the VMM. A masked pin has no
//! route and its edges are dropped, as on hardware. The MP table declares
//! every pin edge-triggered, so remote IRR and EOI handling are not needed.

use serde::{Deserialize, Serialize};

use super::BusDevice;
use crate::arch::x86_64::layout::IOAPIC_PINS;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const REG_ID: u8 = 0x00;
const REG_VERSION: u8 = 0x01;
const REG_ARBITRATION: u8 = 0x02;
const REG_REDIRECTION_BASE: u8 = 0x10;
const VERSION: u32 = 0x11 | ((IOAPIC_PINS - 1) << 16);

const ENTRY_MASKED: u64 = 1 << 16;
/// Bits the guest may write: vector, delivery mode, destination mode,
/// polarity, trigger mode, mask and destination.
const ENTRY_WRITABLE: u64 = 0xff00_0000_0001_afff;

/// An MSI as KVM's GSI routing table takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiRoute {
    pub gsi: u32,
    pub address: u64,
    pub data: u32,
}

/// Installs the full set of pin routes; implemented over `KVM_SET_GSI_ROUTING`.
pub trait MsiRouter: Send {
    fn set_routes(&mut self, routes: &[MsiRoute]) -> std::io::Result<()>;
}

/// The registers a snapshot keeps; the routes follow from the entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoapicState {
    pub id: u32,
    pub selected: u8,
    pub entries: Vec<u64>,
}

pub struct Ioapic<R: MsiRouter> {
    id: u32,
    selected: u8,
    entries: [u64; IOAPIC_PINS as usize],
    router: R,
}

impl<R: MsiRouter> Ioapic<R> {
    pub fn new(id: u8, router: R) -> Self {
        Self {
            id: u32::from(id) << 24,
            selected: 0,
            entries: [ENTRY_MASKED; IOAPIC_PINS as usize],
            router,
        }
    }

    pub fn state(&self) -> IoapicState {
        IoapicState {
            id: self.id,
            selected: self.selected,
            entries: self.entries.to_vec(),
        }
    }

    /// Takes the registers of a snapshot and installs their routes.
    pub fn restore(&mut self, state: &IoapicState) -> Result<(), String> {
        self.entries = state.entries.as_slice().try_into().map_err(|_| {
            format!(
                "the IOAPIC state has {} pins, this IOAPIC {IOAPIC_PINS}",
                state.entries.len()
            )
        })?;
        self.id = state.id;
        self.selected = state.selected;
        self.update_routes();
        Ok(())
    }

    /// The MSI equivalent of a redirection entry, per the IOAPIC and LAPIC
    /// architecture: destination and destination mode go to the address,
    /// vector, delivery mode and trigger mode to the data.
    fn route_of(pin: usize, entry: u64) -> Option<MsiRoute> {
        if entry & ENTRY_MASKED != 0 {
            return None;
        }
        let destination = (entry >> 56) & 0xff;
        let logical = (entry >> 11) & 1;
        let vector = (entry & 0xff) as u32;
        let delivery_mode = ((entry >> 8) & 0x7) as u32;
        let level = ((entry >> 15) & 1) as u32;
        Some(MsiRoute {
            gsi: pin as u32,
            address: 0xfee0_0000 | (destination << 12) | (logical << 2),
            data: vector | (delivery_mode << 8) | (level << 15),
        })
    }

    fn update_routes(&mut self) {
        let routes: Vec<MsiRoute> = self
            .entries
            .iter()
            .enumerate()
            .filter_map(|(pin, &entry)| Self::route_of(pin, entry))
            .collect();
        if let Err(e) = self.router.set_routes(&routes) {
            tracing::error!("ioapic: cannot update interrupt routes: {e}");
        }
    }

    fn read_register(&self) -> u32 {
        match self.selected {
            REG_ID => self.id,
            REG_VERSION => VERSION,
            REG_ARBITRATION => self.id,
            reg if reg >= REG_REDIRECTION_BASE => {
                let index = usize::from(reg - REG_REDIRECTION_BASE);
                match self.entries.get(index / 2) {
                    Some(entry) if index % 2 == 0 => *entry as u32,
                    Some(entry) => (*entry >> 32) as u32,
                    None => 0,
                }
            }
            _ => 0,
        }
    }

    fn write_register(&mut self, value: u32) {
        match self.selected {
            REG_ID => self.id = value & 0x0f00_0000,
            reg if reg >= REG_REDIRECTION_BASE => {
                let index = usize::from(reg - REG_REDIRECTION_BASE);
                let Some(entry) = self.entries.get_mut(index / 2) else {
                    return;
                };
                let (shift, half) = if index % 2 == 0 {
                    (0, 0xffff_ffffu64)
                } else {
                    (32, 0xffff_ffff_0000_0000)
                };
                let old = *entry;
                *entry = (old & !(half & ENTRY_WRITABLE))
                    | ((u64::from(value) << shift) & half & ENTRY_WRITABLE);
                if *entry != old {
                    self.update_routes();
                }
            }
            _ => {}
        }
    }
}

impl<R: MsiRouter> BusDevice for Ioapic<R> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            IOREGSEL => u32::from(self.selected),
            IOWIN => self.read_register(),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(bytes);
        match offset {
            IOREGSEL => self.selected = value as u8,
            IOWIN => self.write_register(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Vec<MsiRoute>>>>);

    impl MsiRouter for Recorder {
        fn set_routes(&mut self, routes: &[MsiRoute]) -> std::io::Result<()> {
            self.0.lock().unwrap().push(routes.to_vec());
            Ok(())
        }
    }

    fn write_reg(ioapic: &mut Ioapic<Recorder>, reg: u8, value: u32) {
        ioapic.write(IOREGSEL, &[reg]);
        ioapic.write(IOWIN, &value.to_le_bytes());
    }

    fn read_reg(ioapic: &mut Ioapic<Recorder>, reg: u8) -> u32 {
        ioapic.write(IOREGSEL, &[reg]);
        let mut data = [0u8; 4];
        ioapic.read(IOWIN, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn reports_its_version_pin_count_and_id() {
        let mut ioapic = Ioapic::new(2, Recorder::default());
        assert_eq!(read_reg(&mut ioapic, REG_VERSION), 0x0017_0011);
        assert_eq!(read_reg(&mut ioapic, REG_ID), 2 << 24);
        // Every pin starts masked.
        assert_eq!(read_reg(&mut ioapic, 0x10 + 2 * 5), ENTRY_MASKED as u32);
    }

    #[test]
    fn unmasking_a_pin_installs_its_msi_route() {
        let recorder = Recorder::default();
        let mut ioapic = Ioapic::new(1, recorder.clone());
        // Pin 4: vector 0x24, fixed delivery, physical destination APIC 3.
        write_reg(&mut ioapic, 0x10 + 2 * 4 + 1, 3 << 24);
        write_reg(&mut ioapic, 0x10 + 2 * 4, 0x24);
        let history = recorder.0.lock().unwrap();
        let last = history.last().unwrap();
        assert_eq!(
            last,
            &vec![MsiRoute {
                gsi: 4,
                address: 0xfee0_3000,
                data: 0x24
            }]
        );
    }

    #[test]
    fn logical_level_lowest_priority_entries_translate_bit_for_bit() {
        let entry = 0x0f00_0000_0000_0000 | (1 << 15) | (1 << 11) | (1 << 8) | 0x31;
        let route = Ioapic::<Recorder>::route_of(9, entry).unwrap();
        assert_eq!(route.address, 0xfee0_f004);
        assert_eq!(route.data, 0x31 | (1 << 8) | (1 << 15));
    }

    #[test]
    fn masking_removes_the_route_and_read_only_bits_stay_clear() {
        let recorder = Recorder::default();
        let mut ioapic = Ioapic::new(1, recorder.clone());
        write_reg(&mut ioapic, 0x10, 0x30);
        // Delivery status (bit 12) and remote IRR (bit 14) are read-only.
        write_reg(&mut ioapic, 0x10, 0x30 | (1 << 12) | (1 << 14));
        assert_eq!(read_reg(&mut ioapic, 0x10), 0x30);
        write_reg(&mut ioapic, 0x10, 0x30 | ENTRY_MASKED as u32);
        assert!(recorder.0.lock().unwrap().last().unwrap().is_empty());
    }

    #[test]
    fn a_restored_ioapic_reads_back_and_routes_like_the_saved_one() {
        let mut saved = Ioapic::new(1, Recorder::default());
        write_reg(&mut saved, 0x10 + 2 * 3, 0x41);
        let recorder = Recorder::default();
        let mut restored = Ioapic::new(1, recorder.clone());
        restored.restore(&saved.state()).unwrap();
        assert_eq!(read_reg(&mut restored, 0x10 + 2 * 3), 0x41);
        assert_eq!(recorder.0.lock().unwrap().last().unwrap()[0].gsi, 3);
        let mut short = saved.state();
        short.entries.pop();
        assert!(restored.restore(&short).unwrap_err().contains("23 pins"));
    }

    #[test]
    fn out_of_range_registers_are_ignored() {
        let recorder = Recorder::default();
        let mut ioapic = Ioapic::new(1, recorder.clone());
        write_reg(&mut ioapic, 0x10 + 2 * 24, 0x40);
        write_reg(&mut ioapic, 0xff, 0x40);
        assert_eq!(read_reg(&mut ioapic, 0xff), 0);
        assert!(recorder.0.lock().unwrap().is_empty());
        // Odd sizes and offsets do not fault either.
        ioapic.write(0x20, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut wide = [0u8; 8];
        ioapic.read(IOWIN, &mut wide);
    }
}
