//! What each of a Linux guest's disks holds, as the host tells the init on
//! the kernel command line (`lambda_disks=task,root,opt`): the n-th name
//! is the n-th virtio block device, `/dev/vda` onwards. The kernel hands
//! a parameter it does not know to PID 1 as an environment variable.
//! Without the parameter, the disks are the code and then the layers.

/// The kernel command line parameter.
pub const PARAM: &str = "lambda_disks";

/// The most disks a guest is given.
pub const MAX: usize = 3;

/// A disk's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disk {
    /// The function's code, for /var/task.
    Task,
    /// A runtime's root file system (an interpreter and the libraries it
    /// loads), under the init's own root.
    Root,
    /// The function's layers, merged, for /opt.
    Opt,
    /// A container image's file system: the function's root.
    Image,
}

impl Disk {
    pub fn name(self) -> &'static str {
        match self {
            Disk::Task => "task",
            Disk::Root => "root",
            Disk::Opt => "opt",
            Disk::Image => "image",
        }
    }

    fn from_name(name: &str) -> Option<Disk> {
        [Disk::Task, Disk::Root, Disk::Opt, Disk::Image]
            .into_iter()
            .find(|d| d.name() == name)
    }
}

/// The disks when the command line does not say.
pub const DEFAULT: &str = "task,opt";

/// The disks a `lambda_disks` value names, in device order; `None` for a
/// value that names an unknown disk, one twice, or more than [`MAX`].
pub fn parse(value: &str) -> Option<([Option<Disk>; MAX], usize)> {
    let mut disks = [None; MAX];
    let mut count = 0;
    for name in value.split(',') {
        let disk = Disk::from_name(name)?;
        if count == MAX || disks[..count].contains(&Some(disk)) {
            return None;
        }
        disks[count] = Some(disk);
        count += 1;
    }
    Some((disks, count))
}

/// The device the `index`-th disk is (`/dev/vda` for 0), NUL-terminated.
pub fn device(index: usize) -> [u8; 9] {
    let mut path = *b"/dev/vda\0";
    path[7] += index as u8;
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_in_device_order_and_bad_ones_are_refused() {
        let (disks, n) = parse("task,root,opt").unwrap();
        assert_eq!(
            &disks[..n],
            &[Some(Disk::Task), Some(Disk::Root), Some(Disk::Opt)]
        );
        let (disks, n) = parse("task").unwrap();
        assert_eq!(&disks[..n], &[Some(Disk::Task)]);
        for bad in [
            "",
            "task,,opt",
            "task,task",
            "task,usr",
            "task,root,opt,task",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        let (disks, n) = parse(DEFAULT).unwrap();
        assert_eq!(&disks[..n], &[Some(Disk::Task), Some(Disk::Opt)]);
    }

    #[test]
    fn devices_count_from_vda() {
        assert_eq!(&device(0), b"/dev/vda\0");
        assert_eq!(&device(2), b"/dev/vdc\0");
    }
}
