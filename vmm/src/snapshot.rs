//! Snapshot files: everything but guest memory, which goes to a file of
//! its own so that restores can map it.
//!
//! Layout: `LMVMSNAP`, the format version (u32 LE), the writing VMM's
//! version (32 bytes, zero-padded), the state's length (u64 LE), the
//! SHA-256 of everything else (the header fields before it and the
//! state), then the state in postcard encoding. A reader
//! checks the magic and the version before anything else, then that the
//! length and the checksum match, so a file from another VMM version, cut
//! short, extended or changed in any byte is refused before it is decoded.

use std::path::{Path, PathBuf};

use kvm_bindings::kvm_clock_data;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::devices::ioapic::IoapicState;
use crate::devices::legacy::serial::SerialSnapshot;
use crate::devices::virtio::mmio::VirtioState;
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::HypervisorKind;

const MAGIC: &[u8; 8] = b"LMVMSNAP";
/// Bumped whenever the encoded state changes shape.
pub const FORMAT_VERSION: u32 = 1;
const VERSION_FIELD: usize = 32;
const CHECKSUM_AT: usize = MAGIC.len() + 4 + VERSION_FIELD + 8;
const HEADER_LEN: usize = CHECKSUM_AT + 32;
/// Far above any real state (a few KiB per vCPU); bounds what a reader
/// allocates for a hostile length field.
const MAX_STATE_LEN: u64 = 64 << 20;

/// The machine a snapshot was taken of: what a restore must rebuild
/// before it can take the state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineState {
    pub mem_mib: u64,
    pub vcpus: u8,
    pub hypervisor: HypervisorKind,
    /// One entry per drive, in order: whether it is read-only.
    pub drives_read_only: Vec<bool>,
    pub vsock: bool,
}

#[derive(Serialize, Deserialize)]
pub struct MicroVmState {
    pub machine: MachineState,
    pub clock: kvm_clock_data,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialSnapshot,
    pub ioapic: IoapicState,
    /// In the order the devices were attached.
    pub virtio: Vec<VirtioState>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {path:?}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("snapshot {path:?} is not a snapshot (no LMVMSNAP header)")]
    NotASnapshot { path: PathBuf },
    #[error(
        "snapshot {path:?} has format version {found} (written by vmm {written_by}); \
         this vmm ({}) reads version {FORMAT_VERSION}", env!("CARGO_PKG_VERSION")
    )]
    Version {
        path: PathBuf,
        found: u32,
        written_by: String,
    },
    #[error("snapshot {path:?} is truncated or extended: its header gives {expected} bytes of state, the file has {found}")]
    Length {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("snapshot {path:?} is corrupt: its checksum does not match its contents")]
    Checksum { path: PathBuf },
    #[error("snapshot {path:?}: cannot decode the state: {reason}")]
    Decode { path: PathBuf, reason: String },
    #[error("cannot encode the snapshot: {0}")]
    Encode(String),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn checksum(header: &[u8], body: &[u8]) -> [u8; 32] {
    Sha256::new()
        .chain_update(header)
        .chain_update(body)
        .finalize()
        .into()
}

/// Encodes a state into a snapshot file's bytes.
pub fn encode(state: &MicroVmState) -> Result<Vec<u8>, SnapshotError> {
    let body = postcard::to_stdvec(state).map_err(|e| SnapshotError::Encode(e.to_string()))?;
    let mut version = [0u8; VERSION_FIELD];
    let ours = env!("CARGO_PKG_VERSION").as_bytes();
    version[..ours.len().min(VERSION_FIELD)]
        .copy_from_slice(&ours[..ours.len().min(VERSION_FIELD)]);
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&version);
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    let checksum = checksum(&out, &body);
    out.extend_from_slice(&checksum);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Checks and decodes a snapshot file's bytes; `path` names it in errors.
pub fn decode(path: &Path, bytes: &[u8]) -> Result<MicroVmState, SnapshotError> {
    let path_buf = || path.to_path_buf();
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(SnapshotError::NotASnapshot { path: path_buf() });
    }
    if bytes.len() < HEADER_LEN {
        return Err(SnapshotError::Length {
            path: path_buf(),
            expected: HEADER_LEN as u64,
            found: bytes.len() as u64,
        });
    }
    let (header, body) = bytes.split_at(HEADER_LEN);
    let field = |at: usize, len: usize| &header[at..at + len];
    let found = u32::from_le_bytes(field(8, 4).try_into().expect("4 bytes"));
    if found != FORMAT_VERSION {
        let written_by = field(12, VERSION_FIELD);
        let end = written_by
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(VERSION_FIELD);
        return Err(SnapshotError::Version {
            path: path_buf(),
            found,
            written_by: String::from_utf8_lossy(&written_by[..end]).into_owned(),
        });
    }
    let expected = u64::from_le_bytes(field(12 + VERSION_FIELD, 8).try_into().expect("8 bytes"));
    if expected != body.len() as u64 || expected > MAX_STATE_LEN {
        return Err(SnapshotError::Length {
            path: path_buf(),
            expected,
            found: body.len() as u64,
        });
    }
    if checksum(&header[..CHECKSUM_AT], body) != field(CHECKSUM_AT, 32) {
        return Err(SnapshotError::Checksum { path: path_buf() });
    }
    postcard::from_bytes(body).map_err(|e| SnapshotError::Decode {
        path: path_buf(),
        reason: e.to_string(),
    })
}

pub fn write_snapshot(path: &Path, state: &MicroVmState) -> Result<u64, SnapshotError> {
    let bytes = encode(state)?;
    std::fs::write(path, &bytes).map_err(io_error(path))?;
    Ok(bytes.len() as u64)
}

/// Reads and decodes the snapshot in `file`; `name` names it in errors.
pub fn read_snapshot(mut file: std::fs::File, name: &Path) -> Result<MicroVmState, SnapshotError> {
    use std::io::Read;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io_error(name))?;
    decode(name, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> MicroVmState {
        MicroVmState {
            machine: MachineState {
                mem_mib: 128,
                vcpus: 0,
                hypervisor: HypervisorKind::Pvm,
                drives_read_only: vec![true],
                vsock: true,
            },
            clock: kvm_clock_data {
                clock: 42,
                ..Default::default()
            },
            vcpus: Vec::new(),
            serial: SerialSnapshot {
                registers: [1; 9],
                in_buffer: b"in".to_vec(),
            },
            ioapic: IoapicState {
                id: 1 << 24,
                selected: 3,
                entries: vec![1 << 16; 24],
            },
            virtio: Vec::new(),
        }
    }

    fn decode_err(bytes: &[u8]) -> String {
        match decode(Path::new("s"), bytes) {
            Ok(_) => panic!("decoded"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_snapshot_decodes_to_what_was_encoded() {
        let bytes = encode(&sample()).unwrap();
        let back = decode(Path::new("s"), &bytes).unwrap();
        assert_eq!(back.machine, sample().machine);
        assert_eq!(back.clock.clock, 42);
        assert_eq!(back.serial, sample().serial);
        assert_eq!(back.ioapic, sample().ioapic);
    }

    #[test]
    fn every_flipped_bit_cut_and_extension_is_refused() {
        let bytes = encode(&sample()).unwrap();
        for at in 0..bytes.len() {
            for bit in [0, 7] {
                let mut bad = bytes.clone();
                bad[at] ^= 1 << bit;
                assert!(decode(Path::new("s"), &bad).is_err(), "byte {at} bit {bit}");
            }
        }
        for len in [0, 7, HEADER_LEN - 1, HEADER_LEN, bytes.len() - 1] {
            let err = decode_err(&bytes[..len]);
            assert!(
                err.contains("truncated") || err.contains("not a snapshot"),
                "{len}: {err}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode_err(&longer).contains("truncated or extended"));
        let mut body_changed = bytes.clone();
        *body_changed.last_mut().unwrap() ^= 0x10;
        assert!(decode_err(&body_changed).contains("checksum does not match"));
        assert!(decode_err(b"\x7fELF\x02\x01\x01\0rest").contains("not a snapshot"));
    }

    #[test]
    fn another_format_version_is_refused_and_named() {
        let mut bytes = encode(&sample()).unwrap();
        bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
        bytes[12..12 + VERSION_FIELD].fill(0);
        bytes[12..17].copy_from_slice(b"9.9.9");
        let err = decode_err(&bytes);
        assert!(
            err.contains("format version 7 (written by vmm 9.9.9)")
                && err.contains("reads version 1"),
            "{err}"
        );
    }
}
