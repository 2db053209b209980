//! Where a block device's bytes live.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Storage behind a virtio-blk device. Offsets are checked against
/// [`Self::size`] before any call.
pub trait BlockBackend: Send {
    /// Size of the image in bytes.
    fn size(&self) -> u64;
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn flush(&mut self) -> io::Result<()>;
}

/// A raw image file.
pub struct RawFile {
    file: File,
    len: u64,
}

impl RawFile {
    pub fn new(file: File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Self { file, len })
    }
}

impl BlockBackend for RawFile {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}
