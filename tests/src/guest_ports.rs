//! The host side of a bare-metal guest's vsock ports, for tests that
//! play the worker: the Runtime API, the log stream and the environment
//! message, each on its `<uds>_<port>` socket.

use std::path::{Path, PathBuf};

use guest_init::environ::ENVIRON_PORT;
use host_services::artifacts::wasm_image;
use host_services::data_plane::runtime_api::RuntimeApi;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

use crate::ECHO_WAT;

pub struct GuestPorts {
    /// The VMM's `--vsock` socket path; the ports are `<uds>_<port>`.
    pub uds: PathBuf,
    pub api: RuntimeApi,
    /// Everything the guest wrote to its log stream, once it closes it.
    pub log: JoinHandle<String>,
}

impl GuestPorts {
    /// Binds the ports in `dir`. The guest gets `environ` when it asks
    /// for its environment; a restored guest does not ask.
    pub async fn bind(dir: &Path, environ: Option<Vec<u8>>) -> GuestPorts {
        let uds = dir.join("vsock");
        let port = |p: u32| PathBuf::from(format!("{}_{p}", uds.display()));
        let api = RuntimeApi::bind(
            &port(9001),
            None,
            "arn:aws:lambda:local:000000000000:function:echo",
        )
        .await
        .unwrap();
        let log_listener = tokio::net::UnixListener::bind(port(9002)).unwrap();
        let log = tokio::spawn(async move {
            let (mut stream, _) = log_listener.accept().await.unwrap();
            let mut all = String::new();
            let _ = stream.read_to_string(&mut all).await;
            all
        });
        if let Some(environ) = environ {
            let listener = tokio::net::UnixListener::bind(port(ENVIRON_PORT)).unwrap();
            tokio::spawn(async move {
                let (mut stream, _) = listener.accept().await.unwrap();
                stream.write_all(&environ).await.unwrap();
            });
        }
        GuestPorts { uds, api, log }
    }
}

/// Writes the echo function's code disk into `dir`.
pub fn echo_code_disk(dir: &Path, fuel: u64) -> PathBuf {
    wat_code_disk(dir, ECHO_WAT, fuel, 0)
}

/// Writes the code disk of the function `wat` into `dir`, its module grown
/// by a custom section of `padding` bytes (none for 0), which Wasm ignores.
pub fn wat_code_disk(dir: &Path, wat: &str, fuel: u64, padding: usize) -> PathBuf {
    let mut module = wat::parse_str(wat).unwrap();
    if padding > 0 {
        let name = b"padding";
        module.push(0); // custom section
        leb128(&mut module, 1 + name.len() + padding);
        leb128(&mut module, name.len());
        module.extend_from_slice(name);
        module.resize(module.len() + padding, 0xa5);
    }
    let image = dir.join("code.img");
    std::fs::write(&image, wasm_image::build(&module, fuel).unwrap()).unwrap();
    image
}

fn leb128(out: &mut Vec<u8>, mut value: usize) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            return out.push(byte);
        }
        out.push(byte | 0x80);
    }
}

/// A fresh directory for one test's files.
pub fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Starts a VMM with `args`; its console (stdout) is echoed line by line
/// as `prefix: ...` and kept. Stderr is piped for the caller.
pub fn spawn_vmm(
    args: &[String],
    prefix: &'static str,
) -> (tokio::process::Child, JoinHandle<String>) {
    let mut vmm = tokio::process::Command::new(crate::vmm_binary())
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let console = echo_lines(vmm.stdout.take().unwrap(), prefix);
    (vmm, console)
}

/// Echoes what `stream` says, line by line as `prefix: ...`, as it comes,
/// and keeps it.
pub fn echo_lines(
    stream: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    prefix: &'static str,
) -> JoinHandle<String> {
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stream).lines();
        let mut all = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            println!("{prefix}: {line}");
            all.push_str(&line);
            all.push('\n');
        }
        all
    })
}
