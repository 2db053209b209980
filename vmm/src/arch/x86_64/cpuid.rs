//! Guest CPUID, built from `KVM_GET_SUPPORTED_CPUID`.
//!
//! KVM reports what it *can* virtualize; the VMM narrows that to what this
//! machine model really offers. The filter:
//!
//! * leaf 0x1: initial APIC ID and logical CPU count from the vCPU topology,
//!   the hypervisor bit set (and the TSC-deadline timer, which KVM offers
//!   through a capability instead, added by [`offer_tsc_deadline_timer`]), and the features that need a device or an MSR
//!   the VMM does not emulate hidden: DTES64, MONITOR/MWAIT, DS-CPL, VMX, SMX,
//!   EST, TM2, xTPR, PDCM (ECX); DS, ACPI thermal, TM, PBE (EDX);
//! * leaf 0x4: the cores-per-package field matches the vCPU count;
//! * leaf 0x6 (thermal and power): all hidden except ARAT, which KVM's
//!   LAPIC timer honours;
//! * leaf 0xa (architectural PMU): hidden, the VMM exposes no counters;
//! * leaves 0xb and 0x1f (extended topology): one thread per core, as many
//!   cores as vCPUs, and the vCPU's x2APIC ID.
//!
//! Everything else (including the KVM paravirtual leaves at 0x4000_0000,
//! which give the guest kvmclock) passes through as KVM reported it.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_THERMAL_POWER: u32 = 0x6;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;

const ECX_HIDDEN: u32 = (1 << 2)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 7)
    | (1 << 8)
    | (1 << 14)
    | (1 << 15);
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HIDDEN: u32 = (1 << 21) | (1 << 22) | (1 << 29) | (1 << 31);
const EDX_HTT: u32 = 1 << 28;
const EAX_ARAT: u32 = 1 << 2;

const ECX_TSC_DEADLINE: u32 = 1 << 24;

/// Sets the TSC-deadline timer bit in leaf 0x1, which KVM's in-kernel
/// LAPIC provides but `KVM_GET_SUPPORTED_CPUID` does not list.
pub fn offer_tsc_deadline_timer(cpuid: &mut CpuId) {
    for entry in cpuid.as_mut_slice().iter_mut() {
        if entry.function == LEAF_FEATURES {
            entry.ecx |= ECX_TSC_DEADLINE;
        }
    }
}

/// Bits needed to number `count` logical CPUs.
fn id_bits(count: u8) -> u32 {
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

/// Narrows KVM's supported CPUID for vCPU `index` of `count`.
pub fn filter_cpuid(cpuid: &mut CpuId, index: u8, count: u8) {
    for entry in cpuid.as_mut_slice().iter_mut() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (u32::from(index) << 24) | (u32::from(count) << 16) | (8 << 8);
                entry.ecx = (entry.ecx & !ECX_HIDDEN) | ECX_HYPERVISOR;
                entry.edx &= !EDX_HIDDEN;
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS if entry.eax != 0 => {
                entry.eax = (entry.eax & 0x03ff_ffff) | (u32::from(count - 1) << 26);
            }
            LEAF_THERMAL_POWER => {
                entry.eax &= EAX_ARAT;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            LEAF_PMU => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                entry.edx = u32::from(index);
                match entry.index {
                    // SMT level: one thread per core.
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = 1 << 8;
                    }
                    // Core level: every vCPU is a core of one package.
                    1 => {
                        entry.eax = id_bits(count);
                        entry.ebx = u32::from(count);
                        entry.ecx = (2 << 8) | 1;
                    }
                    n => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = n;
                    }
                }
            }
            _ => {}
        }
    }
}

/// The registers that enumerate instruction-set features: a guest that
/// saw a bit set here may be using the instructions behind it.
const FEATURE_REGISTERS: [(u32, u32, usize, &str); 8] = [
    (0x1, 0, 2, "ecx"),
    (0x1, 0, 3, "edx"),
    (0x7, 0, 1, "ebx"),
    (0x7, 0, 2, "ecx"),
    (0x7, 0, 3, "edx"),
    (0xd, 1, 0, "eax"),
    (0x8000_0001, 0, 2, "ecx"),
    (0x8000_0001, 0, 3, "edx"),
];

fn registers(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> [u32; 4] {
    entries
        .iter()
        .find(|e| e.function == function && e.index == index)
        .map_or([0; 4], |e| [e.eax, e.ebx, e.ecx, e.edx])
}

/// Checks that a guest which ran with `saved` CPUID can go on running on
/// this host, whose CPUID for the same vCPU is `host`: same vendor, and
/// no feature the guest saw is missing here.
pub fn check_compatible(saved: &[kvm_cpuid_entry2], host: &CpuId) -> Result<(), String> {
    let host = host.as_slice();
    let vendor = |e: &[kvm_cpuid_entry2]| {
        let [_, b, c, d] = registers(e, 0, 0);
        [b, d, c]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .map(char::from)
            .collect::<String>()
    };
    if vendor(saved) != vendor(host) {
        return Err(format!(
            "CPU vendor {:?} in the snapshot, {:?} on this host",
            vendor(saved),
            vendor(host)
        ));
    }
    for (function, index, register, name) in FEATURE_REGISTERS {
        let missing = registers(saved, function, index)[register]
            & !registers(host, function, index)[register];
        if missing != 0 {
            return Err(format!(
                "CPUID leaf {function:#x} subleaf {index} {name}: the snapshot's guest saw feature bits {missing:#010x} that this host lacks"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: u32::MAX,
            ebx: u32::MAX,
            ecx: u32::MAX,
            edx: u32::MAX,
            ..Default::default()
        }
    }

    fn filtered(index: u8, count: u8) -> CpuId {
        let mut cpuid = CpuId::from_entries(&[
            leaf(0x1, 0),
            leaf(0x6, 0),
            leaf(0xa, 0),
            leaf(0xb, 0),
            leaf(0xb, 1),
        ])
        .unwrap();
        filter_cpuid(&mut cpuid, index, count);
        cpuid
    }

    #[test]
    fn leaf1_carries_the_apic_id_and_hides_unemulated_features() {
        let cpuid = filtered(3, 4);
        let e = cpuid.as_slice()[0];
        assert_eq!(e.ebx >> 24, 3, "initial APIC ID");
        assert_eq!((e.ebx >> 16) & 0xff, 4, "logical CPU count");
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(e.ecx & (1 << 3), 0, "MONITOR hidden");
        assert_eq!(e.ecx & (1 << 5), 0, "VMX hidden");
        assert_ne!(e.edx & EDX_HTT, 0);
    }

    #[test]
    fn the_tsc_deadline_timer_is_offered_in_leaf_1_only() {
        let mut cpuid = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 0x1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x7,
                ..Default::default()
            },
        ])
        .unwrap();
        offer_tsc_deadline_timer(&mut cpuid);
        assert_eq!(cpuid.as_slice()[0].ecx, 1 << 24);
        assert_eq!(cpuid.as_slice()[1].ecx, 0);
        filter_cpuid(&mut cpuid, 0, 1);
        assert_ne!(
            cpuid.as_slice()[0].ecx & ECX_TSC_DEADLINE,
            0,
            "kept by the filter"
        );
    }

    #[test]
    fn power_management_and_pmu_are_hidden() {
        let cpuid = filtered(0, 1);
        assert_eq!(cpuid.as_slice()[1].eax, EAX_ARAT);
        assert_eq!(cpuid.as_slice()[2].eax, 0);
    }

    #[test]
    fn topology_reports_one_core_per_vcpu() {
        let cpuid = filtered(2, 3);
        let smt = cpuid.as_slice()[3];
        let core = cpuid.as_slice()[4];
        assert_eq!((smt.ebx, smt.edx), (1, 2));
        assert_eq!((core.eax, core.ebx, core.edx), (2, 3, 2));
    }

    #[test]
    fn a_missing_feature_or_another_vendor_is_incompatible() {
        let vendor = |ebx| kvm_cpuid_entry2 {
            function: 0,
            ebx,
            ..Default::default()
        };
        let features = |ebx| kvm_cpuid_entry2 {
            function: 7,
            ebx,
            ..Default::default()
        };
        let host = CpuId::from_entries(&[vendor(0x756e_6547), features(0b1011)]).unwrap();
        check_compatible(&[vendor(0x756e_6547), features(0b0011)], &host).unwrap();
        let err = check_compatible(&[vendor(0x756e_6547), features(0b0111)], &host).unwrap_err();
        assert!(
            err.contains("leaf 0x7 subleaf 0 ebx") && err.contains("0x00000004"),
            "{err}"
        );
        let err = check_compatible(&[vendor(0x6874_7541), features(0)], &host).unwrap_err();
        assert!(err.contains("CPU vendor"), "{err}");
    }
}
