//! Machine configuration, from the command line and/or a JSON file, and
//! its validation. Every error names the field and the value at fault.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

use crate::arch::x86_64::layout::{CMDLINE_MAX_SIZE, IOAPIC_PINS, MIN_MEM_BYTES, VIRTIO_IRQ_BASE};
use crate::arch::x86_64::mptable::MAX_VCPUS;

pub const DEFAULT_MEM_MIB: u64 = 128;
pub const DEFAULT_VCPUS: u64 = 1;
/// Linux on a console, rebooting through the i8042 and on panic.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.dumbkbd";

/// Where the guest's COM1 output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialConfig {
    Stdout,
    File(PathBuf),
    Off,
}

impl FromStr for SerialConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdout" => Ok(SerialConfig::Stdout),
            "off" => Ok(SerialConfig::Off),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(SerialConfig::File(PathBuf::from(path))),
                _ => Err("expected stdout, off or file:PATH".to_string()),
            },
        }
    }
}

/// A virtio-blk drive: a raw image file; a sealed (encrypted) one whose
/// artifact id and key the VMM reads from an inherited descriptor; or a
/// chunked one, whose path is the chunk store and whose manifest the VMM
/// reads from a file or descriptor. An image file may be an inherited
/// descriptor (`fd:N`, read-only).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    pub path: FileSource,
    #[serde(default)]
    pub read_only: bool,
    /// A descriptor holding `ARTIFACT_ID_HEX KEY_HEX`: the drive is sealed.
    #[serde(default)]
    pub key_fd: Option<i32>,
    /// The chunk manifest: the drive is chunked and `path` its store.
    #[serde(default)]
    pub manifest: Option<FileSource>,
}

impl FromStr for DriveConfig {
    type Err = String;

    /// `PATH[,ro|,rw][,key-fd=N][,manifest=PATH|fd:N]`, as on the command
    /// line.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut path = s;
        let (mut read_only, mut key_fd, mut manifest) = (false, None, None);
        while let Some((rest, option)) = path.rsplit_once(',') {
            match option {
                "ro" => read_only = true,
                "rw" => read_only = false,
                _ => match (
                    option.strip_prefix("key-fd="),
                    option.strip_prefix("manifest="),
                ) {
                    (Some(fd), _) => {
                        key_fd = Some(fd.parse::<u16>().map_err(|_| {
                            format!("key-fd={fd:?}: expected a file descriptor number")
                        })?);
                    }
                    (_, Some(source)) => manifest = Some(source.parse()?),
                    _ => {
                        return Err(format!(
                        "unknown drive option {option:?} (ro, rw, key-fd=N or manifest=PATH|fd:N)"
                    ))
                    }
                },
            }
            path = rest;
        }
        if path.is_empty() {
            return Err("empty path".into());
        }
        Ok(DriveConfig {
            path: path.parse()?,
            read_only,
            key_fd: key_fd.map(i32::from),
            manifest,
        })
    }
}

/// The vsock device: the guest's CID and the host Unix socket behind it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
    /// Host ends made before the guest asks: its first connection to
    /// each port takes the stream, with no connect and no wake-up of
    /// the program behind `<uds_path>_<port>`.
    #[serde(default)]
    pub connected: Vec<ConnectedPort>,
}

/// Values the JSON config gives as the strings the command line takes.
macro_rules! deserialize_from_str {
    ($($ty:ty),*) => {$(
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?
                    .parse()
                    .map_err(serde::de::Error::custom)
            }
        }
    )*};
}
deserialize_from_str!(ConnectedPort, FileSource);

/// `PORT:fd:N`: a connected Unix stream socket the VMM's owner left open
/// at descriptor N, the host end of the guest's first connection to PORT.
/// What the owner wrote into it before is there for the guest to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectedPort {
    pub port: u32,
    pub fd: i32,
}

impl FromStr for ConnectedPort {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let expected = || format!("{s:?}: expected PORT:fd:N");
        let (port, fd) = s.split_once(':').ok_or_else(expected)?;
        let port = port.parse().map_err(|_| expected())?;
        match fd.parse().map_err(|_| expected())? {
            FileSource::Fd(fd) => Ok(ConnectedPort { port, fd }),
            FileSource::Path(_) => Err(expected()),
        }
    }
}

impl std::fmt::Display for ConnectedPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:fd:{}", self.port, self.fd)
    }
}

impl ConnectedPort {
    /// Takes ownership of the descriptor, which validation found to be an
    /// open socket.
    pub fn take(&self) -> std::io::Result<UnixStream> {
        // SAFETY: an open socket the owner passed for this port alone; it
        // is taken once, when the device is made.
        let stream = unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(self.fd) };
        stream.set_nonblocking(true)?;
        Ok(stream)
    }

    fn check(&self) -> Result<(), ConfigError> {
        // SAFETY: fstat fills a zeroed stat struct; the descriptor is only
        // looked at.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(self.fd, &mut stat) } < 0 {
            return Err(invalid("vsock.connected", self, "not an open descriptor"));
        }
        if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
            return Err(invalid("vsock.connected", self, "not a socket"));
        }
        Ok(())
    }
}

impl FromStr for VsockConfig {
    type Err = String;

    /// `cid=N,uds=PATH[,connected=PORT:fd:N]...`, as on the command line.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mut cid, mut uds, mut connected) = (None, None, Vec::new());
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("cid", v)) => {
                    cid = Some(
                        v.parse()
                            .map_err(|_| format!("cid {v:?} is not a number"))?,
                    )
                }
                Some(("uds", v)) if !v.is_empty() => uds = Some(PathBuf::from(v)),
                Some(("connected", v)) => connected.push(v.parse()?),
                _ => {
                    return Err(format!(
                        "unexpected {part:?}; expected cid=N,uds=PATH[,connected=PORT:fd:N]"
                    ))
                }
            }
        }
        match (cid, uds) {
            (Some(guest_cid), Some(uds_path)) => Ok(VsockConfig {
                guest_cid,
                uds_path,
                connected,
            }),
            _ => Err("expected cid=N,uds=PATH".into()),
        }
    }
}

/// Lowest CID a guest may have: 0-2 are reserved for the hypervisor and
/// the host.
pub const MIN_GUEST_CID: u64 = 3;

/// The fields as given, before defaults and validation. Both the CLI and
/// the JSON file produce one; the CLI's values win.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfigInput {
    pub kernel: Option<FileSource>,
    pub initrd: Option<FileSource>,
    pub cmdline: Option<String>,
    pub mem_mib: Option<u64>,
    pub vcpus: Option<u64>,
    pub serial: Option<String>,
    pub drives: Option<Vec<DriveConfig>>,
    pub vsock: Option<VsockConfig>,
    pub control_sock: Option<PathBuf>,
}

impl VmConfigInput {
    pub fn from_json_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadConfig {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ConfigError::ParseConfig {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Fields set in `over` replace those in `self`.
    pub fn overridden_by(self, over: VmConfigInput) -> Self {
        Self {
            kernel: over.kernel.or(self.kernel),
            initrd: over.initrd.or(self.initrd),
            cmdline: over.cmdline.or(self.cmdline),
            mem_mib: over.mem_mib.or(self.mem_mib),
            vcpus: over.vcpus.or(self.vcpus),
            serial: over.serial.or(self.serial),
            drives: over.drives.or(self.drives),
            vsock: over.vsock.or(self.vsock),
            control_sock: over.control_sock.or(self.control_sock),
        }
    }
}

/// A validated machine configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: FileSource,
    pub initrd: Option<FileSource>,
    pub cmdline: String,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub devices: DeviceConfig,
}

/// The host side of a microVM's devices, whether it boots or is restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    pub serial: SerialConfig,
    pub drives: Vec<DriveConfig>,
    pub vsock: Option<VsockConfig>,
    /// Where the VMM takes control requests (snapshots).
    pub control_sock: Option<PathBuf>,
}

/// A microVM to restore from a snapshot: the snapshot fixes the guest,
/// its memory size and vCPUs; the devices' host ends are new.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreConfig {
    pub state: FileSource,
    pub memory: FileSource,
    pub devices: DeviceConfig,
}

/// A file given by path, or as `fd:N`, a descriptor the VMM's owner left
/// open for it (a jailed VMM sees no host paths).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileSource {
    Path(PathBuf),
    Fd(i32),
}

impl FromStr for FileSource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.strip_prefix("fd:") {
            Some(n) => n
                .parse::<u16>()
                .map(|fd| FileSource::Fd(i32::from(fd)))
                .map_err(|_| format!("{s:?}: expected fd:N with N a descriptor number")),
            None if s.is_empty() => Err("empty path".into()),
            None => Ok(FileSource::Path(PathBuf::from(s))),
        }
    }
}

impl std::fmt::Display for FileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileSource::Path(path) => write!(f, "{}", path.display()),
            FileSource::Fd(fd) => write!(f, "fd:{fd}"),
        }
    }
}

impl FileSource {
    /// Opens the file, or takes ownership of the descriptor.
    pub fn open(&self) -> std::io::Result<std::fs::File> {
        match self {
            FileSource::Path(path) => std::fs::File::open(path),
            FileSource::Fd(fd) => {
                // SAFETY: F_GETFD only asks whether `fd` is open.
                if unsafe { libc::fcntl(*fd, libc::F_GETFD) } < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: an open descriptor the owner passed for this file
                // alone; it is opened once.
                Ok(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(*fd) })
            }
        }
    }

    fn check(&self, field: &'static str) -> Result<(), ConfigError> {
        match self {
            FileSource::Path(path) => check_readable_file(field, path),
            // SAFETY: F_GETFD only asks whether the descriptor is open.
            FileSource::Fd(fd) if unsafe { libc::fcntl(*fd, libc::F_GETFD) } < 0 => {
                Err(invalid(field, self, "not an open descriptor"))
            }
            FileSource::Fd(_) => Ok(()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("missing {0}: give --{1} or set \"{0}\" in the config file")]
    Missing(&'static str, &'static str),
    #[error("invalid {field} {value:?}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("cannot read config file {path}: {source}")]
    ReadConfig {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    ParseConfig {
        path: PathBuf,
        source: serde_json::Error,
    },
}

fn invalid(field: &'static str, value: impl ToString, reason: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        field,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

fn check_readable_file(field: &'static str, path: &Path) -> Result<(), ConfigError> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| invalid(field, &shown, e))?;
    if !meta.is_file() {
        return Err(invalid(field, &shown, "not a regular file"));
    }
    std::fs::File::open(path).map_err(|e| invalid(field, &shown, e))?;
    Ok(())
}

/// A socket the VMM will create: its directory must exist.
fn check_socket_dir(field: &'static str, path: &Path) -> Result<(), ConfigError> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(invalid(
            field,
            path.display(),
            "its directory does not exist",
        ));
    }
    Ok(())
}

/// Physical memory of the host, the most a guest may be given.
fn host_memory_mib() -> u64 {
    // SAFETY: sysinfo only writes the struct it is given.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return u64::MAX;
    }
    (info.totalram as u64).saturating_mul(u64::from(info.mem_unit)) >> 20
}

impl VmConfigInput {
    pub fn validate(self) -> Result<VmConfig, ConfigError> {
        let kernel = self
            .kernel
            .clone()
            .ok_or(ConfigError::Missing("kernel", "kernel"))?;
        kernel.check("kernel")?;
        if let Some(initrd) = &self.initrd {
            initrd.check("initrd")?;
        }

        let mem_mib = self.mem_mib.unwrap_or(DEFAULT_MEM_MIB);
        let min_mib = MIN_MEM_BYTES >> 20;
        if mem_mib < min_mib {
            return Err(invalid(
                "mem_mib",
                mem_mib,
                format!("must be at least {min_mib}"),
            ));
        }
        let host_mib = host_memory_mib();
        if mem_mib > host_mib {
            return Err(invalid(
                "mem_mib",
                mem_mib,
                format!("more than the host's {host_mib} MiB of memory"),
            ));
        }

        let vcpus = self.vcpus.unwrap_or(DEFAULT_VCPUS);
        if vcpus == 0 || vcpus > u64::from(MAX_VCPUS) {
            return Err(invalid("vcpus", vcpus, format!("must be 1 to {MAX_VCPUS}")));
        }

        let cmdline = self
            .cmdline
            .clone()
            .unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
        if cmdline.len() >= CMDLINE_MAX_SIZE {
            return Err(invalid(
                "cmdline",
                format!("{}...", &cmdline[..cmdline.floor_char_boundary(32)]),
                format!(
                    "{} bytes, at most {} allowed",
                    cmdline.len(),
                    CMDLINE_MAX_SIZE - 1
                ),
            ));
        }
        if !cmdline.is_ascii() || cmdline.contains('\0') {
            return Err(invalid(
                "cmdline",
                &cmdline,
                "must be printable ASCII without NUL",
            ));
        }

        Ok(VmConfig {
            devices: self.devices()?,
            kernel,
            initrd: self.initrd,
            cmdline,
            mem_mib,
            vcpus: vcpus as u8,
        })
    }

    /// For a restore from `state` and `memory`: only device fields may be
    /// set.
    pub fn validate_restore(
        self,
        state: FileSource,
        memory: FileSource,
    ) -> Result<RestoreConfig, ConfigError> {
        for (set, field) in [
            (self.kernel.is_some(), "kernel"),
            (self.initrd.is_some(), "initrd"),
            (self.cmdline.is_some(), "cmdline"),
            (self.mem_mib.is_some(), "mem_mib"),
            (self.vcpus.is_some(), "vcpus"),
        ] {
            if set {
                return Err(invalid(
                    field,
                    "(set)",
                    "cannot be given with a snapshot to restore: the snapshot fixes it",
                ));
            }
        }
        state.check("restore")?;
        memory.check("restore_memory")?;
        Ok(RestoreConfig {
            state,
            memory,
            devices: self.devices()?,
        })
    }

    fn devices(&self) -> Result<DeviceConfig, ConfigError> {
        let serial = match &self.serial {
            None => SerialConfig::Stdout,
            Some(s) => s.parse().map_err(|reason| invalid("serial", s, reason))?,
        };

        let drives = self.drives.clone().unwrap_or_default();
        for drive in &drives {
            if let Some(manifest) = &drive.manifest {
                let store = match &drive.path {
                    FileSource::Path(store) => store.is_dir(),
                    FileSource::Fd(_) => false,
                };
                if !store || !drive.read_only || drive.key_fd.is_some() {
                    return Err(invalid(
                        "drive",
                        &drive.path,
                        "a chunked drive (manifest=) is read-only (,ro), without key-fd, and its path is the chunk store directory",
                    ));
                }
                manifest.check("drive.manifest")?;
                continue;
            }
            drive.path.check("drive")?;
            if drive.key_fd.is_some() && !drive.read_only {
                return Err(invalid(
                    "drive",
                    &drive.path,
                    "a sealed drive (key-fd) is read-only: add ,ro",
                ));
            }
            match &drive.path {
                _ if drive.read_only => {}
                FileSource::Path(path) => {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(path)
                        .map_err(|e| invalid("drive", path.display(), e))?;
                }
                FileSource::Fd(_) => {
                    return Err(invalid(
                        "drive",
                        &drive.path,
                        "a drive given as a descriptor is read-only: add ,ro",
                    ))
                }
            }
        }
        if let Some(vsock) = &self.vsock {
            if vsock.guest_cid < MIN_GUEST_CID || vsock.guest_cid > u64::from(u32::MAX - 1) {
                return Err(invalid(
                    "vsock.guest_cid",
                    vsock.guest_cid,
                    format!("must be {MIN_GUEST_CID} to {}", u32::MAX - 1),
                ));
            }
            check_socket_dir("vsock.uds_path", &vsock.uds_path)?;
            for (i, connected) in vsock.connected.iter().enumerate() {
                connected.check()?;
                if vsock.connected[..i]
                    .iter()
                    .any(|c| c.port == connected.port)
                {
                    return Err(invalid(
                        "vsock.connected",
                        connected,
                        "a second stream for the port",
                    ));
                }
            }
        }
        // One IRQ each, after COM1; the entropy device takes one too.
        let max_devices = (IOAPIC_PINS - VIRTIO_IRQ_BASE) as usize - 1;
        let devices = drives.len() + usize::from(self.vsock.is_some());
        if devices > max_devices {
            return Err(invalid(
                "drives",
                devices,
                format!("at most {max_devices} drives and vsock devices together"),
            ));
        }

        if let Some(path) = &self.control_sock {
            check_socket_dir("control_sock", path)?;
        }
        Ok(DeviceConfig {
            serial,
            drives,
            vsock: self.vsock.clone(),
            control_sock: self.control_sock.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_file() -> tempfile_path::TempPath {
        tempfile_path::TempPath::with_contents(b"\x7fELF")
    }

    /// A file removed on drop, without pulling in a crate for it.
    mod tempfile_path {
        use std::path::PathBuf;
        pub struct TempPath(pub PathBuf);
        impl TempPath {
            pub fn with_contents(bytes: &[u8]) -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let path = std::env::temp_dir().join(format!(
                    "vmm-config-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::write(&path, bytes).unwrap();
                TempPath(path)
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn input(kernel: &Path) -> VmConfigInput {
        VmConfigInput {
            kernel: Some(FileSource::Path(kernel.to_path_buf())),
            ..Default::default()
        }
    }

    fn error_text(input: VmConfigInput) -> String {
        input.validate().unwrap_err().to_string()
    }

    #[test]
    fn defaults_fill_what_is_not_given() {
        let k = kernel_file();
        let config = input(&k.0).validate().unwrap();
        assert_eq!(config.mem_mib, 128);
        assert_eq!(config.vcpus, 1);
        assert_eq!(config.devices.serial, SerialConfig::Stdout);
        assert_eq!(config.cmdline, DEFAULT_CMDLINE);
    }

    #[test]
    fn errors_name_the_field_and_the_value() {
        let k = kernel_file();
        let e = error_text(VmConfigInput {
            mem_mib: Some(4),
            ..input(&k.0)
        });
        assert!(e.contains("mem_mib") && e.contains('4'), "{e}");
        let e = error_text(VmConfigInput {
            mem_mib: Some(1 << 40),
            ..input(&k.0)
        });
        assert!(e.contains("mem_mib") && e.contains("host"), "{e}");
        let e = error_text(VmConfigInput {
            vcpus: Some(0),
            ..input(&k.0)
        });
        assert!(e.contains("vcpus") && e.contains("\"0\""), "{e}");
        let e = error_text(VmConfigInput {
            vcpus: Some(1000),
            ..input(&k.0)
        });
        assert!(e.contains("vcpus") && e.contains("1000"), "{e}");
        let e = error_text(VmConfigInput {
            serial: Some("tcp:1".into()),
            ..input(&k.0)
        });
        assert!(e.contains("serial") && e.contains("tcp:1"), "{e}");
        let e = error_text(input(Path::new("/nonexistent/vmlinux")));
        assert!(
            e.contains("kernel") && e.contains("/nonexistent/vmlinux"),
            "{e}"
        );
        let e = error_text(input(Path::new("/")));
        assert!(e.contains("not a regular file"), "{e}");
        let e = error_text(VmConfigInput {
            cmdline: Some("x".repeat(5000)),
            ..input(&k.0)
        });
        assert!(e.contains("cmdline") && e.contains("5000 bytes"), "{e}");
        assert!(VmConfigInput::default()
            .validate()
            .unwrap_err()
            .to_string()
            .contains("missing kernel"));
    }

    #[test]
    fn drives_and_vsock_parse_and_validate() {
        assert_eq!(
            "/a/b.img,ro".parse(),
            Ok(DriveConfig {
                path: FileSource::Path("/a/b.img".into()),
                read_only: true,
                key_fd: None,
                manifest: None,
            })
        );
        assert_eq!(
            "/a/s.img,ro,key-fd=0".parse(),
            Ok(DriveConfig {
                path: FileSource::Path("/a/s.img".into()),
                read_only: true,
                key_fd: Some(0),
                manifest: None,
            })
        );
        assert_eq!(
            "/store,ro,manifest=fd:5"
                .parse::<DriveConfig>()
                .map(|d| d.manifest),
            Ok(Some(FileSource::Fd(5)))
        );
        assert!("/store,ro,manifest=fd:x"
            .parse::<DriveConfig>()
            .unwrap_err()
            .contains("expected fd:N"));
        let rw_chunked = VmConfigInput {
            kernel: Some(FileSource::Path("/proc/self/exe".into())),
            drives: Some(vec!["/tmp,manifest=/etc/hostname".parse().unwrap()]),
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(rw_chunked.contains("a chunked drive"), "{rw_chunked}");
        // An image given as a descriptor: open, and read-only.
        let stdin_drive = |drive: &str| {
            VmConfigInput {
                kernel: Some(FileSource::Path("/proc/self/exe".into())),
                drives: Some(vec![drive.parse().unwrap()]),
                ..Default::default()
            }
            .validate()
            .map(|c| c.devices.drives[0].path.clone())
            .map_err(|e| e.to_string())
        };
        assert_eq!(stdin_drive("fd:0,ro"), Ok(FileSource::Fd(0)));
        assert!(stdin_drive("fd:0").unwrap_err().contains("read-only"));
        assert!(stdin_drive("fd:999,ro")
            .unwrap_err()
            .contains("not an open descriptor"));
        assert!("s.img,ro,key-fd=x"
            .parse::<DriveConfig>()
            .unwrap_err()
            .contains("key-fd=\"x\""));
        assert_eq!(
            "x.img".parse::<DriveConfig>().map(|d| d.read_only),
            Ok(false)
        );
        assert!("x.img,fast".parse::<DriveConfig>().is_err());
        assert_eq!(
            "cid=7,uds=/tmp/v.sock".parse(),
            Ok(VsockConfig {
                guest_cid: 7,
                uds_path: "/tmp/v.sock".into(),
                connected: Vec::new(),
            })
        );
        assert_eq!(
            "cid=3,uds=/tmp/v,connected=9003:fd:20,connected=9001:fd:21"
                .parse::<VsockConfig>()
                .map(|v| v.connected),
            Ok(vec![
                ConnectedPort { port: 9003, fd: 20 },
                ConnectedPort { port: 9001, fd: 21 }
            ])
        );
        for bad in ["9003", "9003:20", "x:fd:20", "9003:fd:x", "9003:/tmp/s"] {
            let e = format!("cid=3,uds=/tmp/v,connected={bad}")
                .parse::<VsockConfig>()
                .unwrap_err();
            assert!(e.contains("expected PORT:fd:N"), "{bad}: {e}");
        }
        assert!("cid=x,uds=/tmp/v".parse::<VsockConfig>().is_err());
        assert!("uds=/tmp/v".parse::<VsockConfig>().is_err());

        let k = kernel_file();
        let e = error_text(VmConfigInput {
            drives: Some(vec!["/nonexistent.img".parse().unwrap()]),
            ..input(&k.0)
        });
        assert!(e.contains("drive") && e.contains("/nonexistent.img"), "{e}");
        let e = error_text(VmConfigInput {
            vsock: Some("cid=2,uds=/tmp/v.sock".parse().unwrap()),
            ..input(&k.0)
        });
        assert!(e.contains("vsock.guest_cid") && e.contains("\"2\""), "{e}");
        let e = error_text(VmConfigInput {
            vsock: Some("cid=3,uds=/nonexistent/dir/v.sock".parse().unwrap()),
            ..input(&k.0)
        });
        assert!(e.contains("vsock.uds_path"), "{e}");
        // A stream made ahead must be an open socket, one per port.
        let (_ours, theirs) = UnixStream::pair().unwrap();
        let socket = std::os::fd::AsRawFd::as_raw_fd(&theirs);
        let connected = |list: &str| {
            error_text(VmConfigInput {
                vsock: Some(format!("cid=3,uds=/tmp/v.sock,{list}").parse().unwrap()),
                ..input(&k.0)
            })
        };
        let e = connected("connected=9003:fd:999");
        assert!(
            e.contains("9003:fd:999") && e.contains("not an open descriptor"),
            "{e}"
        );
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        let file = std::os::fd::AsRawFd::as_raw_fd(&file);
        let e = connected(&format!("connected=9003:fd:{file}"));
        assert!(
            e.contains("vsock.connected") && e.contains("not a socket"),
            "{e}"
        );
        let e = connected(&format!(
            "connected=9003:fd:{socket},connected=9003:fd:{socket}"
        ));
        assert!(e.contains("a second stream for the port"), "{e}");
    }

    #[test]
    fn serial_destinations_parse() {
        assert_eq!("off".parse(), Ok(SerialConfig::Off));
        assert_eq!(
            "file:/tmp/x".parse(),
            Ok(SerialConfig::File(PathBuf::from("/tmp/x")))
        );
        assert!("file:".parse::<SerialConfig>().is_err());
    }

    #[test]
    fn json_file_rejects_unknown_fields_and_cli_wins() {
        let k = kernel_file();
        let good = tempfile_path::TempPath::with_contents(
            format!(
                r#"{{"kernel": "{}", "mem_mib": 64, "vcpus": 2}}"#,
                k.0.display()
            )
            .as_bytes(),
        );
        let from_file = VmConfigInput::from_json_file(&good.0).unwrap();
        let merged = from_file.overridden_by(VmConfigInput {
            vcpus: Some(3),
            ..Default::default()
        });
        let config = merged.validate().unwrap();
        assert_eq!((config.mem_mib, config.vcpus), (64, 3));

        let bad = tempfile_path::TempPath::with_contents(br#"{"kernel": "x", "memory": 64}"#);
        let e = VmConfigInput::from_json_file(&bad.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `memory`"), "{e}");
        let e = VmConfigInput::from_json_file(Path::new("/nonexistent.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent.json"), "{e}");
    }
}
