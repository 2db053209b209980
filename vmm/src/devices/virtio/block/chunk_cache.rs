//! Read-only images made of chunks that are decrypted (and, for chunked
//! images, fetched) on demand: the block backend over any source of
//! chunks, with a bounded cache of the decrypted ones.

use std::collections::VecDeque;
use std::io;

use super::BlockBackend;

/// Where an image's chunks come from, decrypted and checked.
pub trait ChunkSource: Send {
    /// Every chunk is this long but the last, which holds the rest.
    fn chunk_size(&self) -> u64;
    /// The image's length in bytes.
    fn image_len(&self) -> u64;
    /// Chunk `index`; an error when it cannot be read or fails its
    /// checks, never wrong bytes.
    fn load(&mut self, index: u64) -> io::Result<Vec<u8>>;
}

/// A [`ChunkSource`] as a read-only block device.
pub struct ChunkCache<S> {
    source: S,
    capacity: usize,
    /// Recently used chunks, most recent last.
    cache: VecDeque<(u64, Vec<u8>)>,
    loaded: u64,
}

impl<S: ChunkSource> ChunkCache<S> {
    pub fn new(source: S, capacity: usize) -> Self {
        ChunkCache {
            source,
            capacity: capacity.max(1),
            cache: VecDeque::with_capacity(capacity),
            loaded: 0,
        }
    }

    /// Chunks loaded from the source so far (cache misses).
    pub fn loaded(&self) -> u64 {
        self.loaded
    }

    /// How many chunks the image has.
    pub fn chunks(&self) -> u64 {
        self.source.image_len().div_ceil(self.source.chunk_size())
    }

    fn chunk(&mut self, index: u64) -> io::Result<&[u8]> {
        if let Some(at) = self.cache.iter().position(|(i, _)| *i == index) {
            let hit = self.cache.remove(at).expect("a cached chunk");
            self.cache.push_back(hit);
        } else {
            let plain = self.source.load(index)?;
            self.loaded += 1;
            if self.cache.len() == self.capacity {
                self.cache.pop_front();
            }
            self.cache.push_back((index, plain));
        }
        Ok(&self.cache.back().expect("the chunk just cached").1)
    }
}

impl<S: ChunkSource> BlockBackend for ChunkCache<S> {
    fn size(&self) -> u64 {
        self.source.image_len()
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > self.source.image_len())
        {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "a read past the end of the image",
            ));
        }
        let size = self.source.chunk_size();
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let (index, within) = (at / size, (at % size) as usize);
            let chunk = self.chunk(index)?;
            if within >= chunk.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("chunk {index} is shorter than the image says"),
                ));
            }
            let n = (chunk.len() - within).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&chunk[within..within + n]);
            done += n;
        }
        Ok(())
    }

    fn write_at(&mut self, _: &[u8], _: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "this image is read-only",
        ))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
