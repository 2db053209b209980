//! The jailer, as root on this machine: what a jailed VMM can see and do.
//! It is observed from outside, through /proc, while it runs.

use std::os::fd::AsRawFd;
use std::os::unix::fs::chown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use host_services::data_plane::vmm_process::{jailers_of, process_state};
use microvm_tests::worker::{client_runtime, data_dir, lifecycle, RunningWorker};
use microvm_tests::{
    baremetal_guest, is_root, jailer_binary, run_binary, skip, vmm_binary, ECHO_WAT,
};

const NOBODY: u32 = 65534;
const CGROUP_PARENT: &str = "lambda-microvm-test";

fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    skip(test, "needs root, to build namespaces and cgroups");
    true
}

/// The scratch directory `name` of a test that builds jails; `None`,
/// the test skipped, when not root.
fn jail_scratch(test: &str, name: &str) -> Option<PathBuf> {
    (!skip_unless_root(test)).then(|| scratch(name))
}

/// `name` made this test process's own (a jail id, a scratch file's
/// name), so that runs never share one.
fn jail_id(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(jail_id(name));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The jailer's arguments that name jail `id` under `base`, its VMM and
/// its uid and cgroup.
fn site_args(id: &str, base: &Path) -> Vec<String> {
    [
        "--id",
        id,
        "--exec-file",
        &vmm_binary().display().to_string(),
        "--uid",
        &NOBODY.to_string(),
        "--gid",
        &NOBODY.to_string(),
        "--chroot-base",
        &base.join("jails").display().to_string(),
        "--cgroup-parent",
        CGROUP_PARENT,
    ]
    .map(str::to_string)
    .to_vec()
}

/// The jailer's arguments for `id` under `base`, up to and with `--`.
fn jail_args(id: &str, base: &Path, memory_mib: u64, mounts: &[String]) -> Vec<String> {
    let mut args = site_args(id, base);
    args.extend([
        "--memory-mib".to_string(),
        memory_mib.to_string(),
        "--mount".to_string(),
        format!("{}:/kernel:ro", baremetal_guest().display()),
    ]);
    for m in mounts {
        args.extend(["--mount".to_string(), m.clone()]);
    }
    args.push("--".into());
    args
}

/// A running jailer, stopped (SIGTERM, so that it cleans up) if a failed
/// assertion leaves it running.
struct JailerProcess(Child);

impl Drop for JailerProcess {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            // SAFETY: signals the child process this struct owns.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let _ = self.0.wait();
        }
    }
}

/// A process's real, effective, saved and filesystem uids, as
/// `/proc/PID/status` shows them.
fn uids_of(pid: u32) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace()
        .skip(1)
        .map(str::to_string)
        .collect()
}

fn wait_for_pid(file: &Path, jailer: &mut Child) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(pid) = std::fs::read_to_string(file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return pid;
        }
        assert!(
            jailer.try_wait().unwrap().is_none(),
            "the jailer ended before it started the VMM"
        );
        assert!(Instant::now() < deadline, "no {}", file.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_jailed_vmm_sees_only_its_files_runs_unprivileged_and_has_no_network() {
    let Some(base) = jail_scratch("jailer namespaces", "jail-view") else {
        return;
    };
    let run = base.join("run");
    std::fs::create_dir_all(&run).unwrap();
    chown(&run, Some(NOBODY), Some(NOBODY)).unwrap();
    // Another microVM's socket, next to this one's directory on the host.
    let _other = std::os::unix::net::UnixListener::bind(base.join("other-vmm.sock")).unwrap();
    let id = jail_id("view");
    let mut args = jail_args(&id, &base, 512, &[format!("{}:/run", run.display())]);
    args.extend(
        [
            "--kernel",
            "/kernel",
            "--vsock",
            "cid=3,uds=/run/vsock",
            "--serial",
            "off",
            "--cmdline",
            "baremetal.run=vsock-serve:5000",
        ]
        .map(str::to_string),
    );
    let mut jailer = JailerProcess(
        Command::new(jailer_binary())
            .args(&args)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pid = wait_for_pid(&base.join("jails").join(&id).join("vmm.pid"), &mut jailer.0);
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    // The pid is known before the jail is built; the VMM's socket shows
    // that it runs.
    wait_for_vsock(&run);

    let uids = uids_of(pid);
    assert_eq!(
        uids, ["65534"; 4],
        "the VMM does not run as nobody: {uids:?}"
    );

    let mut root: Vec<String> = std::fs::read_dir(proc_dir.join("root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    root.sort();
    assert_eq!(
        root,
        ["kernel", "run"],
        "the jail's root holds only what was mounted"
    );
    assert!(!proc_dir.join("root/etc/passwd").exists());
    // Its own socket is there; the other VMM's is not.
    assert!(!proc_dir.join("root/other-vmm.sock").exists());
    assert!(!proc_dir.join("root/run/other-vmm.sock").exists());

    let own = std::fs::read_link("/proc/self/ns/net").unwrap();
    let jailed = std::fs::read_link(proc_dir.join("ns/net")).unwrap();
    assert_ne!(own, jailed, "the VMM shares the host's network namespace");
    let interfaces: Vec<String> = std::fs::read_to_string(proc_dir.join("net/dev"))
        .unwrap()
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|n| n.trim().to_string()))
        .collect();
    assert_eq!(interfaces, ["lo"], "the jail has no network but loopback");
    for ns in ["mnt", "pid", "ipc", "uts"] {
        assert_ne!(
            std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap(),
            std::fs::read_link(proc_dir.join(format!("ns/{ns}"))).unwrap(),
            "{ns} namespace shared"
        );
    }
    let cgroups = std::fs::read_to_string(proc_dir.join("cgroup")).unwrap();
    assert!(
        cgroups.contains(&format!("/{CGROUP_PARENT}/{id}")),
        "not in its cgroup: {cgroups}"
    );

    // SIGTERM to the jailer stops the VMM and cleans up.
    // SAFETY: signals the child process this test spawned.
    unsafe { libc::kill(jailer.0.id() as i32, libc::SIGTERM) };
    let status = jailer.0.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGKILL), "{status}");
    assert!(!proc_dir.exists(), "the VMM outlived its jailer");
    assert!(
        !base.join("jails").join(&id).exists(),
        "the jail was not removed"
    );
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn the_cgroup_caps_the_memory_a_guest_can_make_its_vmm_use() {
    let Some(base) = jail_scratch("jailer cgroup", "jail-memory") else {
        return;
    };
    let guest = [
        "--kernel",
        "/kernel",
        "--mem-mib",
        "256",
        "--cmdline",
        "baremetal.run=touch:96",
    ];
    let run = |memory_mib: u64| {
        let id = jail_id(&format!("memory-{memory_mib}"));
        let mut args = jail_args(&id, &base, memory_mib, &[]);
        args.extend(guest.map(str::to_string));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_binary(&jailer_binary(), &args, Duration::from_secs(60))
    };
    let roomy = run(256);
    assert_eq!(roomy.code, Some(0), "{roomy:?}");
    assert!(roomy.stdout.contains("touched 96 MiB"), "{roomy:?}");
    let capped = run(48);
    assert_eq!(capped.code, Some(128 + libc::SIGKILL), "{capped:?}");
    assert!(!capped.stdout.contains("touched"), "{capped:?}");
    assert!(capped.stderr.contains("killed by SIGKILL"), "{capped:?}");
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn bad_jailer_input_is_named() {
    let base = scratch("jail-input");
    let jail = |extra: &[&str]| {
        let mut args = vec![
            "--id",
            "input",
            "--uid",
            "65534",
            "--gid",
            "65534",
            "--chroot-base",
            base.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        run_binary(&jailer_binary(), &args, Duration::from_secs(10))
    };
    let missing = jail(&["--exec-file", "/no/such/vmm"]);
    assert_eq!(missing.code, Some(125));
    if is_root() {
        assert!(missing.stderr.contains("/no/such/vmm"), "{missing:?}");
    }
    let relative = jail(&["--exec-file", "/bin/true", "--mount", "/etc:etc"]);
    assert!(relative.stderr.contains("absolute"), "{relative:?}");
    let root = run_binary(
        &jailer_binary(),
        &[
            "--id",
            "x",
            "--uid",
            "0",
            "--gid",
            "0",
            "--exec-file",
            "/bin/true",
        ],
        Duration::from_secs(10),
    );
    assert_eq!(root.code, Some(125));
    assert!(root.stderr.contains("--uid 0"), "{root:?}");
    let bad_id = jail(&["--exec-file", "/bin/true", "--id", "../x"]);
    assert!(bad_id.code != Some(0), "{bad_id:?}");
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn the_worker_starts_every_environment_through_the_jailer() {
    if skip_unless_root("the worker's jailer") {
        return;
    }
    let data = data_dir("lambda-jailed");
    let worker = RunningWorker::start(&data, &[], "info");
    let client = worker.client();
    let wasm = wat::parse_str(ECHO_WAT).unwrap();
    let jails = data.join("jails");
    client_runtime().block_on(async {
        for function in ["jailed-a", "jailed-b"] {
            client
                .create_wasm_function(function, &wasm, 10)
                .await
                .unwrap();
            for round in 0..2 {
                let r = client
                    .invoke(function, r#""in jail""#.into())
                    .await
                    .unwrap();
                assert_eq!(r.status, 200, "{r:?}\n{}", worker.log());
                assert_eq!(&r.body[..], br#"{"echo":"in jail"}"#);
                assert_eq!(r.cold_start_ms().is_some(), round == 0, "{r:?}");
            }
        }
    });
    let events = lifecycle(&data);
    assert_eq!(events.len(), 2, "{events:?}");
    let mut uids = Vec::new();
    for event in &events {
        let jail = event.jail.clone().expect("the environment has a jail");
        assert!(
            worker
                .log()
                .contains(&format!("through the jailer, in jail {jail}")),
            "{}",
            worker.log()
        );
        // The idle (frozen) environment's VMM, seen from outside.
        let pid: u32 = std::fs::read_to_string(jails.join(&jail).join("vmm.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let all = uids_of(pid);
        assert!(all.iter().all(|u| *u == all[0]), "{all:?}");
        // Started ahead at SCHED_IDLE, raised at its launch.
        let policies = policies_of(pid);
        assert!(
            policies.iter().all(|&p| p == libc::SCHED_OTHER),
            "{policies:?}"
        );
        uids.push(all[0].clone());
        assert_ne!(
            std::fs::read_link("/proc/self/ns/net").unwrap(),
            std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap()
        );
        let mut root: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        root.sort();
        // Its files came as descriptors; the root holds its sockets'
        // directory and the (sealed) chunk store of container images.
        assert_eq!(root, ["chunks", "run"]);
    }
    assert!(uids.iter().all(|u| u != "0"), "{uids:?}");
    for said in ["no VMM started ahead", "stays at SCHED_IDLE"] {
        assert!(!worker.log().contains(said), "{}", worker.log());
    }
    assert_ne!(uids[0], uids[1], "two microVMs share a uid");
    // A clean stop takes the jails and their cgroups with it.
    let log = worker.stop();
    for dir in [jails, data.join("run").join("jails")] {
        let left: Vec<_> = std::fs::read_dir(&dir).map_or(vec![], |d| d.flatten().collect());
        assert!(left.is_empty(), "left behind in {dir:?}: {left:?}\n{log}");
    }
    for event in &events {
        let jail = event.jail.as_deref().unwrap();
        for hierarchy in ["", "memory/", "cpu/", "pids/"] {
            let group = format!("/sys/fs/cgroup/{hierarchy}lambda-microvm/{jail}");
            assert!(
                !std::path::Path::new(&group).exists(),
                "{group} left behind"
            );
        }
    }
    std::fs::remove_dir_all(&data).unwrap();
}

/// The jailers of the worker with `data`, with their jails' ids.
fn jailers_with_ids(data: &Path) -> Vec<(i32, String)> {
    jailers_of(&jailer_binary(), &data.join("jails"))
        .into_iter()
        .filter_map(|(pid, args)| {
            let at = args.iter().position(|a| a == "--id")?;
            Some((pid, args.get(at + 1)?.to_string_lossy().into_owned()))
        })
        .collect()
}

/// A worker killed outright while it held its pool's starting VMMs for a
/// cold start (stopped, with their death signal pending) leaves them
/// stopped; the next worker on the same data ends them, and with them
/// their jails and cgroups.
#[test]
fn a_worker_killed_while_it_held_its_pool_leaves_nothing_after_its_restart() {
    if skip_unless_root("the worker's jail pool") {
        return;
    }
    let data = data_dir("lambda-killed-pool");
    let mut worker = RunningWorker::start(&data, &[], "info");
    let started = Instant::now();
    let held = loop {
        let jailers = jailers_with_ids(&data);
        if jailers.len() == 2 || started.elapsed() > Duration::from_secs(10) {
            break jailers;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        held.len(),
        2,
        "the pool of 2 never filled\n{}",
        worker.log()
    );
    for (pid, _) in &held {
        // SAFETY: stops a jailer the worker started, as a cold start does.
        unsafe { libc::kill(*pid, libc::SIGSTOP) };
    }
    // A stop takes effect when the jailer next runs (at SCHED_IDLE).
    let stopping = Instant::now();
    while held.iter().any(|(pid, _)| process_state(*pid) != Some('T'))
        && stopping.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    worker.kill();
    std::thread::sleep(Duration::from_millis(200));
    for (pid, _) in &held {
        assert_eq!(
            process_state(*pid),
            Some('T'),
            "jailer {pid} is not stopped"
        );
    }
    let restarted = RunningWorker::start(&data, &[], "info");
    for (pid, id) in &held {
        // Ended: gone, or a zombie until init reaps it.
        assert!(
            matches!(process_state(*pid), None | Some('Z')),
            "jailer {pid} outlived the restart\n{}",
            restarted.log()
        );
        for hierarchy in ["", "memory/", "cpu/", "pids/"] {
            let group = format!("/sys/fs/cgroup/{hierarchy}lambda-microvm/{id}");
            assert!(
                !std::path::Path::new(&group).exists(),
                "{group} left behind"
            );
        }
    }
    restarted.stop();
    std::fs::remove_dir_all(&data).unwrap();
}

#[test]
fn a_full_worker_evicts_its_least_recently_used_environment() {
    if skip_unless_root("the worker's jailer") {
        return;
    }
    let data = data_dir("lambda-evicts");
    let worker = RunningWorker::start(&data, &["--max-environments", "1"], "info");
    let client = worker.client();
    let wasm = wat::parse_str(ECHO_WAT).unwrap();
    client_runtime().block_on(async {
        for function in ["full-a", "full-b"] {
            client
                .create_wasm_function(function, &wasm, 10)
                .await
                .unwrap();
        }
        // a, then b in a's place, then a again: three cold starts.
        for function in ["full-a", "full-b", "full-a"] {
            let r = client.invoke(function, r#""x""#.into()).await.unwrap();
            assert_eq!(r.status, 200, "{r:?}\n{}", worker.log());
            assert!(r.cold_start_ms().is_some(), "{function} was warm: {r:?}");
        }
    });
    let log = worker.stop();
    let events = lifecycle(&data);
    let made: Vec<_> = events.iter().filter(|e| e.created.is_some()).collect();
    assert_eq!(made.len(), 3, "{events:?}");
    let evicted: Vec<&str> = events
        .iter()
        .filter(|e| format!("{:?}", e.destroyed) == "Some(Rebalancing)")
        .map(|e| e.environment.as_str())
        .collect();
    // The first two environments each made room for the next.
    assert_eq!(
        evicted,
        [made[0].environment.as_str(), made[1].environment.as_str()],
        "{events:?}"
    );
    let left: Vec<_> =
        std::fs::read_dir(data.join("jails")).map_or(vec![], |d| d.flatten().collect());
    assert!(left.is_empty(), "jails left behind: {left:?}\n{log}");
    std::fs::remove_dir_all(&data).unwrap();
}

/// A `SOCK_SEQPACKET` pair: the test's end, and the jailer's (inherited).
fn launch_socket_pair() -> (UnixStream, UnixStream) {
    let (ours, theirs) = vmm::jail::seqpacket_pair().unwrap();
    vmm::jail::inheritable(&theirs).unwrap();
    (ours, theirs)
}

/// Starts a jailer that builds jail `id` and waits for its launch; with
/// the socket to launch it on, and how /proc names the jailer's end.
fn jail_made_ahead(id: &str, base: &Path) -> (JailerProcess, UnixStream, PathBuf) {
    let (ours, theirs) = launch_socket_pair();
    let theirs_name = std::fs::read_link(format!("/proc/self/fd/{}", theirs.as_raw_fd())).unwrap();
    let jailer = Command::new(jailer_binary())
        .args(site_args(id, base))
        .args(["--launch-fd".to_string(), theirs.as_raw_fd().to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (JailerProcess(jailer), ours, theirs_name)
}

/// [`jail_made_ahead`], once it waits: with the directory to mount as its
/// VMM's `/run` (its uid's) and the pid it waits as.
fn waiting_jail(id: &str, base: &Path) -> (JailerProcess, UnixStream, PathBuf, PathBuf, u32) {
    let (mut jailer, socket, jailer_end) = jail_made_ahead(id, base);
    let run = base.join("run");
    std::fs::create_dir_all(&run).unwrap();
    chown(&run, Some(NOBODY), Some(NOBODY)).unwrap();
    let pid = wait_for_pid(&base.join("jails").join(id).join("vmm.pid"), &mut jailer.0);
    (jailer, socket, jailer_end, run, pid)
}

/// The scheduling policy of each thread of process `pid`.
fn policies_of(pid: u32) -> Vec<libc::c_int> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| task.ok()?.file_name().to_str()?.parse::<i32>().ok())
        // SAFETY: a plain system call about a thread of the VMM.
        .map(|tid| unsafe { libc::sched_getscheduler(tid) })
        .collect()
}

/// The memory limit of process `pid`'s memory cgroup, in bytes.
fn memory_limit_of(pid: u32) -> u64 {
    let groups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let (dir, file) = match groups.lines().find_map(|l| l.split_once(":memory:")) {
        Some((_, path)) => (
            format!("/sys/fs/cgroup/memory{path}"),
            "memory.limit_in_bytes",
        ),
        None => {
            let path = groups.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
            let root = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
                .into_iter()
                .find(|r| Path::new(&format!("{r}{path}")).join("memory.max").exists())
                .unwrap();
            (format!("{root}{path}"), "memory.max")
        }
    };
    std::fs::read_to_string(Path::new(&dir).join(file))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn a_jail_made_ahead_waits_for_its_launch_and_places_its_descriptors() {
    let Some(base) = jail_scratch("jails made ahead", "jail-ahead") else {
        return;
    };
    // Never launched: its owner closes the socket, and it removes the jail.
    let idle_id = jail_id("ahead-idle");
    let (mut idle, socket, _) = jail_made_ahead(&idle_id, &base);
    let waiting = wait_for_pid(
        &base.join("jails").join(&idle_id).join("vmm.pid"),
        &mut idle.0,
    );
    // Its namespaces are built before any launch.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_link("/proc/self/ns/net").unwrap()
        == std::fs::read_link(format!("/proc/{waiting}/ns/net")).unwrap()
    {
        assert!(Instant::now() < deadline, "no network namespace");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(socket);
    let status = idle.0.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(!base.join("jails").join(&idle_id).exists());

    // Launched: its mounts, memory limit and descriptors, and nothing of
    // the socket it came on.
    let id = jail_id("ahead-run");
    let (mut jailer, socket, jailer_end, run, pid) = waiting_jail(&id, &base);
    let marker = tempfile_with("the launch's descriptor");
    let launch = vmm::jail::Launch {
        mounts: vec![
            format!("{}:/kernel:ro", baremetal_guest().display())
                .parse()
                .unwrap(),
            format!("{}:/run", run.display()).parse().unwrap(),
        ],
        memory_max: Some(96 << 20),
        vmm_args: vsock_serving_args("/kernel"),
        fds: vec![9],
        ..vmm::jail::Launch::default()
    };
    // A jail made at SCHED_IDLE runs its VMM at the normal policy.
    vmm::jail::set_policy(pid as i32, libc::SCHED_IDLE).unwrap();
    launch.send(&socket, &[marker.as_raw_fd()]).unwrap();
    wait_for_vsock(&run);
    assert!(policies_of(pid).iter().all(|&p| p == libc::SCHED_OTHER));
    // The same open file: /proc names it alike for both.
    let link = |path: String| std::fs::read_link(path).unwrap();
    assert_eq!(
        link(format!("/proc/{pid}/fd/9")),
        link(format!("/proc/self/fd/{}", marker.as_raw_fd()))
    );
    let held: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .collect();
    assert!(
        !held.contains(&jailer_end),
        "the VMM holds the launch socket: {held:?}"
    );
    assert_eq!(uids_of(pid), ["65534"; 4]);
    assert_eq!(memory_limit_of(pid), 96 << 20);

    // SAFETY: signals the child process this test spawned.
    unsafe { libc::kill(jailer.0.id() as i32, libc::SIGTERM) };
    jailer.0.wait().unwrap();
    assert!(!base.join("jails").join(&id).exists());

    // A launch that is not one is named, and the jail still removed.
    let bad_id = jail_id("ahead-bad");
    let (mut bad, socket, _) = jail_made_ahead(&bad_id, &base);
    std::io::Write::write_all(&mut &socket, b"{\"mounts\": 7}").unwrap();
    let stderr = bad.0.stderr.take().unwrap();
    let status = bad.0.wait().unwrap();
    let said = std::io::read_to_string(stderr).unwrap();
    assert_eq!(status.code(), Some(125), "{said}");
    assert!(said.contains("a malformed launch"), "{said}");
    assert!(!base.join("jails").join(&bad_id).exists());
    std::fs::remove_dir_all(&base).unwrap();
}

/// The VMM arguments of a 32 MiB bare-metal guest booted from `kernel`
/// that serves on vsock, with its socket in the jail's `/run`.
fn vsock_serving_args(kernel: &str) -> Vec<String> {
    [
        "--kernel",
        kernel,
        "--mem-mib",
        "32",
        "--vsock",
        "cid=3,uds=/run/vsock",
        "--serial",
        "off",
        "--cmdline",
        "baremetal.run=vsock-serve:5000",
    ]
    .map(str::to_string)
    .to_vec()
}

/// Waits until the VMM has made its vsock socket in `run`: it booted.
fn wait_for_vsock(run: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !run.join("vsock").exists() {
        assert!(Instant::now() < deadline, "the VMM never made its socket");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A file in the scratch directory holding `text`, open for reading.
fn tempfile_with(text: &str) -> std::fs::File {
    let path = std::env::temp_dir().join(jail_id("jail-marker"));
    std::fs::write(&path, text).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    file
}

#[test]
fn a_vmm_on_standby_in_a_jail_makes_its_vm_first_and_boots_from_the_descriptors_of_its_launch() {
    let Some(base) = jail_scratch("a VMM on standby in a jail", "jail-standby") else {
        return;
    };
    let id = jail_id("standby");
    let (mut jailer, jail_socket, _, run, pid) = waiting_jail(&id, &base);

    // Made ahead at SCHED_IDLE, as a worker's pool makes its jails.
    vmm::jail::set_policy(pid as i32, libc::SCHED_IDLE).unwrap();
    // The jail's own launch: only what is the same for every microVM; the
    // VMM execs and waits on its socket, at 3, at SCHED_IDLE still.
    let (vmm_socket, vmm_end) = vmm::jail::seqpacket_pair().unwrap();
    let standby = vmm::jail::Launch {
        mounts: vec![format!("{}:/run", run.display()).parse().unwrap()],
        memory_max: Some(96 << 20),
        vmm_args: ["--standby-fd", "3"].map(str::to_string).to_vec(),
        fds: vec![3],
        keep_sched_idle: true,
    };
    standby.send(&jail_socket, &[vmm_end.as_raw_fd()]).unwrap();
    drop(vmm_end);
    let fds_of = |pid: u32| -> Vec<String> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                    .map(|l| l.display().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !fds_of(pid).iter().any(|f| f == "anon_inode:kvm-vm") {
        if Instant::now() > deadline || jailer.0.try_wait().unwrap().is_some() {
            // SAFETY: signals the child process this test spawned.
            unsafe { libc::kill(jailer.0.id() as i32, libc::SIGTERM) };
            let said = std::io::read_to_string(jailer.0.stderr.take().unwrap()).unwrap();
            panic!("the VMM on standby made no VM: {:?}\n{said}", fds_of(pid));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(uids_of(pid), ["65534"; 4]);
    assert!(!run.join("vsock").exists(), "no microVM before the launch");
    assert_eq!(
        policies_of(pid),
        [libc::SCHED_IDLE; 2],
        "the main thread and vCPU 0's wait at SCHED_IDLE"
    );

    // The microVM's launch, to the VMM itself: its files as descriptors,
    // since nothing more can be mounted in its root.
    let kernel = std::fs::File::open(baremetal_guest()).unwrap();
    // Raised as a worker raises it, before its launch.
    vmm::jail::set_process_policy(pid as i32, libc::SCHED_OTHER).unwrap();
    let launch = vmm::jail::Launch {
        vmm_args: vsock_serving_args("fd:60"),
        fds: vec![60],
        ..vmm::jail::Launch::default()
    };
    launch.send(&vmm_socket, &[kernel.as_raw_fd()]).unwrap();
    wait_for_vsock(&run);
    assert_eq!(memory_limit_of(pid), 96 << 20);
    let running = policies_of(pid);
    assert!(
        running.len() >= 3 && running.iter().all(|&p| p == libc::SCHED_OTHER),
        "every thread of the microVM, the new ones too, runs at the normal policy: {running:?}"
    );

    // SAFETY: signals the child process this test spawned.
    unsafe { libc::kill(jailer.0.id() as i32, libc::SIGTERM) };
    jailer.0.wait().unwrap();
    assert!(!base.join("jails").join(&id).exists());
    std::fs::remove_dir_all(&base).unwrap();
}
