//! A writer for the "newc" cpio format, the one Linux unpacks as an
//! initramfs.

/// One archive member.
pub enum Entry<'a> {
    Dir {
        path: &'a str,
        mode: u32,
    },
    File {
        path: &'a str,
        mode: u32,
        data: &'a [u8],
    },
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn header(out: &mut Vec<u8>, ino: u32, mode: u32, size: usize, name: &str) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        1, // nlink
        0, // mtime
        size as u32,
        0, // devmajor
        0, // devminor
        0, // rdevmajor
        0, // rdevminor
        name.len() as u32 + 1,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
}

/// Builds an archive of `entries`, terminated by the trailer.
pub fn archive(entries: &[Entry]) -> Vec<u8> {
    const S_IFDIR: u32 = 0o040000;
    const S_IFREG: u32 = 0o100000;
    let mut out = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let ino = i as u32 + 1;
        match entry {
            Entry::Dir { path, mode } => header(&mut out, ino, S_IFDIR | mode, 0, path),
            Entry::File { path, mode, data } => {
                header(&mut out, ino, S_IFREG | mode, data.len(), path);
                out.extend_from_slice(data);
                pad4(&mut out);
            }
        }
    }
    header(&mut out, 0, 0, 0, "TRAILER!!!");
    out
}

/// An initramfs of one executable, `/init`: all a guest whose PID 1
/// does the rest needs.
pub fn init_only(init: &[u8]) -> Vec<u8> {
    archive(&[Entry::File {
        path: "init",
        mode: 0o755,
        data: init,
    }])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_aligned_and_the_archive_ends_with_the_trailer() {
        let a = archive(&[
            Entry::Dir {
                path: "dev",
                mode: 0o755,
            },
            Entry::File {
                path: "init",
                mode: 0o755,
                data: b"abc",
            },
        ]);
        assert!(a.starts_with(b"070701"));
        assert!(a.len().is_multiple_of(4));
        let init = a.windows(5).position(|w| w == b"init\0").unwrap();
        // Header (110 bytes) + "init\0" ends at a 4-byte boundary + pad.
        let data_at = (init + 5).div_ceil(4) * 4;
        assert_eq!(&a[data_at..data_at + 3], b"abc");
        let trailer = a.windows(10).rposition(|w| w == b"TRAILER!!!").unwrap();
        assert_eq!(&a[trailer - 110..trailer - 104], b"070701");
    }
}
