//! Time from the TSC. Its rate comes from `tsc_early_khz=` on the command
//! line, which the VMM sets for guests that may run at CPL 3, where neither
//! a virtualized CPUID nor kvmclock is reachable.

use super::bootinfo::BootInfo;
use super::cpu::rdtsc;

#[derive(Clone, Copy)]
pub struct Clock {
    tsc_khz: Option<u64>,
}

impl Clock {
    pub fn from_boot(boot: &BootInfo) -> Self {
        let tsc_khz = boot
            .param("tsc_early_khz")
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&khz| khz > 0);
        Self { tsc_khz }
    }

    pub fn tsc_khz(&self) -> Option<u64> {
        self.tsc_khz
    }

    pub fn now(&self) -> u64 {
        rdtsc()
    }

    /// Microseconds in `cycles`, if the TSC rate is known.
    pub fn micros(&self, cycles: u64) -> Option<u64> {
        self.tsc_khz
            .map(|khz| (u128::from(cycles) * 1000 / u128::from(khz)) as u64)
    }
}
