//! Parsing of virtio-blk requests: a readable header, data, and a
//! writable status byte at the very end of the chain.

use vm_memory::ByteValued;

pub const SECTOR_SIZE: u64 = 512;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Length of the device id GET_ID returns.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestHeader {
    pub request_type: u32,
    pub reserved: u32,
    pub sector: u64,
}

// SAFETY: plain integers, no padding.
unsafe impl ByteValued for RequestHeader {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(raw: u32) -> Self {
        match raw {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            other => RequestType::Unsupported(other),
        }
    }
}

/// Why a data request is refused before any I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("length {0} is not a multiple of the sector size")]
    Unaligned(u64),
    #[error("sector {sector} + {len} bytes is beyond the {capacity}-byte image")]
    OutOfBounds {
        sector: u64,
        len: u64,
        capacity: u64,
    },
}

/// The byte offset of a `len`-byte transfer at `sector`, if it lies within
/// a `capacity`-byte image. No arithmetic here can overflow.
pub fn checked_range(sector: u64, len: u64, capacity: u64) -> Result<u64, RangeError> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(RangeError::Unaligned(len));
    }
    sector
        .checked_mul(SECTOR_SIZE)
        .filter(|offset| offset.checked_add(len).is_some_and(|end| end <= capacity))
        .ok_or(RangeError::OutOfBounds {
            sector,
            len,
            capacity,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_inside_the_image_are_accepted() {
        assert_eq!(checked_range(0, 512, 4096), Ok(0));
        assert_eq!(checked_range(7, 512, 4096), Ok(3584));
        assert_eq!(checked_range(8, 0, 4096), Ok(4096));
    }

    #[test]
    fn ranges_past_the_end_or_overflowing_are_refused() {
        assert!(checked_range(8, 512, 4096).is_err());
        assert!(checked_range(7, 1024, 4096).is_err());
        assert!(checked_range(u64::MAX / 256, 512, u64::MAX).is_err());
        assert!(checked_range(u64::MAX / 512, 1024, u64::MAX).is_err());
        assert_eq!(checked_range(0, 100, 4096), Err(RangeError::Unaligned(100)));
    }

    #[test]
    fn request_types_decode() {
        assert_eq!(RequestType::from(0), RequestType::In);
        assert_eq!(RequestType::from(1), RequestType::Out);
        assert_eq!(RequestType::from(4), RequestType::Flush);
        assert_eq!(RequestType::from(8), RequestType::GetId);
        assert_eq!(RequestType::from(99), RequestType::Unsupported(99));
    }
}
