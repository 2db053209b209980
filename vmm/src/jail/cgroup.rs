//! The jailed VMM's control group: memory, CPU and process limits. cgroup
//! v2 when its unified hierarchy has the controllers; else the v1
//! hierarchies, which hosts that mount cgroup v2 without controllers
//! (this project's development machines among them) still use.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default)]
pub struct CgroupLimits {
    /// A memory controller group, whose limit the launch sets (see
    /// [`MemoryLimit`]).
    pub memory: bool,
    /// CPU time per period: (quota, period), in microseconds.
    pub cpu_max: Option<(u64, u64)>,
    pub pids_max: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup hierarchy with the {0} controller under /sys/fs/cgroup")]
    NoController(&'static str),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One group per controller hierarchy the limits need (a single one on
/// cgroup v2).
pub struct Cgroup {
    dirs: Vec<PathBuf>,
    /// The memory controller's group.
    memory: Option<PathBuf>,
    unified: bool,
}

/// The group's memory limit files, open: a jail made ahead of time learns
/// its VMM's size only when it is launched, after its root was pivoted
/// away from `/sys/fs/cgroup`.
pub struct MemoryLimit {
    /// The limit, then on v1 the memory+swap limit (which must not fall
    /// below it), or on v2 the swap limit.
    files: Vec<(OwnedFd, PathBuf)>,
    unified: bool,
}

impl MemoryLimit {
    /// Caps memory, page cache included, at `bytes`, with no swap.
    pub fn set(&self, bytes: u64) -> Result<(), CgroupError> {
        for (index, (fd, path)) in self.files.iter().enumerate() {
            let value = if self.unified && index == 1 {
                "0".to_string()
            } else {
                bytes.to_string()
            };
            // SAFETY: writes a local buffer to an open descriptor.
            let written =
                unsafe { libc::write(fd.as_raw_fd(), value.as_ptr().cast(), value.len()) };
            if written != value.len() as isize {
                return Err(io(path)(std::io::Error::last_os_error()));
            }
        }
        Ok(())
    }
}

/// The v1 groups' `tasks` files, open for a process to move itself in.
/// Moving another process (its PID into `cgroup.procs`) takes the kernel's
/// thread-group lock for writing, which waits for an RCU grace period:
/// 5-16 ms per move on this project's development hosts, once per jailed
/// start. A thread moving itself (`0` into `tasks`) does not take it, and a
/// single-threaded process that moves its one thread has moved whole
/// (0.3 ms).
pub struct SelfPlacement {
    tasks: Vec<OwnedFd>,
}

impl SelfPlacement {
    /// Moves the calling thread into every group. Makes system calls only,
    /// for a child between clone and exec.
    pub fn join(&self) -> std::io::Result<()> {
        for fd in &self.tasks {
            // SAFETY: writes one byte from a static buffer to an open fd.
            if unsafe { libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) } != 1 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

const ROOT: &str = "/sys/fs/cgroup";

/// The v2 hierarchy, if it has every controller `wanted` names.
fn unified(wanted: &[&'static str]) -> Option<PathBuf> {
    for root in [PathBuf::from(ROOT), Path::new(ROOT).join("unified")] {
        let Ok(controllers) = std::fs::read_to_string(root.join("cgroup.controllers")) else {
            continue;
        };
        let have: Vec<&str> = controllers.split_whitespace().collect();
        if wanted.iter().all(|w| have.contains(w)) {
            return Some(root);
        }
    }
    None
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    std::fs::write(&path, value).map_err(io(&path))
}

/// Enables `wanted` in `dir`'s children, those it does not already.
fn delegate(dir: &Path, wanted: &[&str]) -> Result<(), CgroupError> {
    let path = dir.join("cgroup.subtree_control");
    let enabled = std::fs::read_to_string(&path).map_err(io(&path))?;
    let missing: Vec<String> = wanted
        .iter()
        .filter(|c| !enabled.split_whitespace().any(|e| e == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    write(dir, "cgroup.subtree_control", &missing.join(" "))
}

impl Cgroup {
    /// Creates `parent/name` in each hierarchy and sets `limits` there.
    pub fn create(parent: &str, name: &str, limits: &CgroupLimits) -> Result<Self, CgroupError> {
        let mut wanted = Vec::new();
        if limits.memory {
            wanted.push("memory");
        }
        if limits.cpu_max.is_some() {
            wanted.push("cpu");
        }
        if limits.pids_max.is_some() {
            wanted.push("pids");
        }
        if let Some(root) = unified(&wanted) {
            let parent_dir = root.join(parent);
            std::fs::create_dir_all(&parent_dir).map_err(io(&parent_dir))?;
            // Children get only the controllers their parent delegates, so
            // every level from the root down delegates them (a host without
            // systemd delegates none at its root).
            let mut level = root.clone();
            delegate(&level, &wanted)?;
            for part in Path::new(parent) {
                level.push(part);
                delegate(&level, &wanted)?;
            }
            let dir = parent_dir.join(name);
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            if let Some((quota, period)) = limits.cpu_max {
                write(&dir, "cpu.max", &format!("{quota} {period}"))?;
            }
            if let Some(n) = limits.pids_max {
                write(&dir, "pids.max", &n.to_string())?;
            }
            return Ok(Cgroup {
                memory: limits.memory.then(|| dir.clone()),
                dirs: vec![dir],
                unified: true,
            });
        }
        let mut dirs = Vec::new();
        let mut memory = None;
        let mut group = |controller: &'static str| -> Result<PathBuf, CgroupError> {
            let hierarchy = Path::new(ROOT).join(controller);
            if !hierarchy.join("cgroup.procs").exists() {
                return Err(CgroupError::NoController(controller));
            }
            let dir = hierarchy.join(parent).join(name);
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            dirs.push(dir.clone());
            Ok(dir)
        };
        if limits.memory {
            memory = Some(group("memory")?);
        }
        if let Some((quota, period)) = limits.cpu_max {
            let dir = group("cpu")?;
            write(&dir, "cpu.cfs_period_us", &period.to_string())?;
            write(&dir, "cpu.cfs_quota_us", &quota.to_string())?;
        }
        if let Some(n) = limits.pids_max {
            let dir = group("pids")?;
            write(&dir, "pids.max", &n.to_string())?;
        }
        Ok(Cgroup {
            dirs,
            memory,
            unified: false,
        })
    }

    /// The memory limit's files of the group `parent/name` that a jailer
    /// made, for its owner (root, outside the jail) to set once it knows
    /// the size of the microVM a VMM on standby there will hold. `None`
    /// without a memory controller group.
    pub fn memory_limit_of(parent: &str, name: &str) -> Result<Option<MemoryLimit>, CgroupError> {
        let (dir, unified) = match unified(&["memory"]) {
            Some(root) => (root.join(parent).join(name), true),
            None => (
                Path::new(ROOT).join("memory").join(parent).join(name),
                false,
            ),
        };
        if !dir.is_dir() {
            return Ok(None);
        }
        Cgroup {
            dirs: Vec::new(),
            memory: Some(dir),
            unified,
        }
        .memory_limit()
    }

    /// The memory limit's files, if the group has the memory controller.
    pub fn memory_limit(&self) -> Result<Option<MemoryLimit>, CgroupError> {
        let Some(dir) = &self.memory else {
            return Ok(None);
        };
        let names: &[&str] = if self.unified {
            &["memory.max", "memory.swap.max"]
        } else {
            &["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
        };
        let mut files = Vec::new();
        for (index, name) in names.iter().enumerate() {
            let path = dir.join(name);
            match OpenOptions::new().write(true).open(&path) {
                Ok(file) => files.push((OwnedFd::from(file), path)),
                // Without swap accounting the second file is absent;
                // nothing to cap.
                Err(e) if index == 1 && e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&path)(e)),
            }
        }
        Ok(Some(MemoryLimit {
            files,
            unified: self.unified,
        }))
    }

    /// On cgroup v1, the groups' `tasks` files, for the jailed process to
    /// join them itself (see [`SelfPlacement`]); on v2, where a process's
    /// own move takes the same lock, `None`: the jailer [`add`](Self::add)s it.
    pub fn self_placement(&self) -> Result<Option<SelfPlacement>, CgroupError> {
        if self.unified {
            return Ok(None);
        }
        let tasks = self
            .dirs
            .iter()
            .map(|dir| {
                let path = dir.join("tasks");
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map(OwnedFd::from)
                    .map_err(io(&path))
            })
            .collect::<Result<_, _>>()?;
        Ok(Some(SelfPlacement { tasks }))
    }

    /// Moves process `pid` into the group, in every hierarchy.
    pub fn add(&self, pid: u32) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            write(dir, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    /// The group's directories, one per hierarchy.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Removes the (empty) groups.
    pub fn remove(self) {
        for dir in self.dirs {
            if let Err(e) = std::fs::remove_dir(&dir) {
                tracing::warn!("cannot remove the cgroup {}: {e}", dir.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_level_is_asked_only_for_the_controllers_it_does_not_delegate_yet() {
        let dir = std::env::temp_dir().join(format!("cgroup-delegate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let control = dir.join("cgroup.subtree_control");
        std::fs::write(&control, "cpu pids\n").unwrap();
        delegate(&dir, &["memory", "cpu", "pids"]).unwrap();
        assert_eq!(std::fs::read_to_string(&control).unwrap(), "+memory");
        std::fs::write(&control, "memory cpu\n").unwrap();
        delegate(&dir, &["memory", "cpu"]).unwrap();
        assert_eq!(std::fs::read_to_string(&control).unwrap(), "memory cpu\n");
        let missing = delegate(&dir.join("absent"), &["memory"]).unwrap_err();
        assert!(missing.to_string().contains("absent"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
