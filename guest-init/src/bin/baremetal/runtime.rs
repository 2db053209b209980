//! The function runtime: the WebAssembly module on the code disk, run once
//! per event that the host's Runtime API hands out over vsock.
//!
//! Code disk layout (sector 0 is a header, the module follows at 512):
//! `b"LMBDWASM"`, module length (u64 LE), fuel per invocation (u64 LE, 0
//! for the default).

use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use guest_init::environ;
use guest_init::http::{ByteStream, StreamError};
use guest_init::runtime_api::{Invocation, RuntimeClient};
use wasmi::{Config, Engine, Instance, Linker, Module, Store, TypedResumableCall};

use crate::clock::Clock;
use crate::virtio::blk::{BlockDevice, BlockError, SECTOR};
use crate::virtio::rng::Entropy;
use crate::virtio::vsock::{VsockDriver, VsockError};
use crate::virtio::{Devices, DEVICE_BLOCK, DEVICE_VSOCK};
use crate::wasi::{self, Io};

/// The Runtime API's vsock port on the host, as 127.0.0.1:9001 is on Lambda.
pub const RUNTIME_API_PORT: u32 = 9001;
/// The host's port for the function's log stream: its stderr lines, then
/// `END RequestId: <id>` once an invocation is over. Not the serial
/// console, where every byte costs the guest a VM exit.
pub const LOG_PORT: u32 = 9002;
const IMAGE_MAGIC: &[u8; 8] = b"LMBDWASM";
const DEFAULT_FUEL: u64 = 2_000_000_000;
/// What the first read of the code disk takes: the header sector and up
/// to 64 KiB of module after it.
const READ_AHEAD_SECTORS: u64 = 128;
/// Fuel between two deadline checks.
const FUEL_SLICE: u64 = 20_000_000;

/// A vsock stream as the HTTP client's byte stream. The driver is shared
/// with the log stream.
struct VsockStream<'a> {
    driver: &'a RefCell<VsockDriver>,
    id: usize,
}

impl ByteStream for VsockStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, StreamError> {
        Ok(self.driver.borrow_mut().recv(self.id, buf))
    }

    fn write_all(&mut self, data: &[u8]) -> Result<(), StreamError> {
        self.driver
            .borrow_mut()
            .send(self.id, data)
            .map_err(|e| StreamError(format!("{e}")))
    }
}

/// Reads the start-up message from the host on stream `id`, opened to its
/// environment port: the function's environment, as WASI hands it out
/// (`KEY=VALUE\0` each).
fn read_environ(driver: &RefCell<VsockDriver>, id: usize) -> Result<Vec<Vec<u8>>, String> {
    let id = driver
        .borrow_mut()
        .established(id)
        .map_err(|e| format!("cannot reach the host's environment port: {e}"))?;
    let mut message = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let n = driver.borrow_mut().recv(id, &mut buf);
        if n == 0 {
            break;
        }
        message.extend_from_slice(&buf[..n]);
        if message.len() > environ::MAX_MESSAGE {
            driver.borrow_mut().close(id);
            return Err(format!(
                "the environment message is over {} bytes",
                environ::MAX_MESSAGE
            ));
        }
    }
    driver.borrow_mut().close(id);
    let variables = environ::decode(&message).map_err(|e| format!("{e}"))?;
    Ok(variables
        .into_iter()
        .map(|(k, v)| format!("{k}={v}\0").into_bytes())
        .collect())
}

/// The function as the code disk holds it.
struct FunctionImage {
    module: Vec<u8>,
    fuel: u64,
}

fn read_image(devices: &Devices) -> Result<FunctionImage, String> {
    let transport = devices
        .find(DEVICE_BLOCK)
        .ok_or("no code disk (virtio-blk)")?;
    let mut disk = BlockDevice::new(transport).map_err(|e| format!("code disk: {e}"))?;
    // Each request is a round trip through the VMM's event loop: the
    // header comes with up to 64 KiB after it, which holds a small module
    // whole. Only the capacity's low half is read, a lower bound (one VM
    // exit), so that the request stays on the disk. A module longer than
    // the disk fails its read past the end.
    let ahead = disk.sectors_at_least().clamp(1, READ_AHEAD_SECTORS) as usize;
    let mut head = disk
        .read_new(0, ahead * SECTOR)
        .map_err(|e| format!("code disk header: {e}"))?;
    if &head[..8] != IMAGE_MAGIC {
        return Err("code disk has no LMBDWASM header".into());
    }
    let len = u64::from_le_bytes(head[8..16].try_into().unwrap_or([0; 8]));
    let fuel = u64::from_le_bytes(head[16..24].try_into().unwrap_or([0; 8]));
    if len == 0 {
        return Err("code disk holds an empty module".into());
    }
    let too_long = || format!("module length {len} does not fit the guest's memory");
    let len = usize::try_from(len).map_err(|_| too_long())?;
    let module = if len <= head.len() - SECTOR {
        head.drain(..SECTOR);
        head.truncate(len);
        head
    } else {
        let padded = len.checked_next_multiple_of(SECTOR).ok_or_else(too_long)?;
        let mut module = disk.read_new(1, padded).map_err(|e| match e {
            BlockError::NoMemory(_) => too_long(),
            e => format!("code disk read: {e}"),
        })?;
        module.truncate(len);
        module
    };
    Ok(FunctionImage {
        module,
        fuel: if fuel == 0 { DEFAULT_FUEL } else { fuel },
    })
}

/// How an invocation failed: the Lambda error type and message.
struct Failure {
    error_type: &'static str,
    message: String,
}

fn fail(error_type: &'static str, message: String) -> Failure {
    Failure {
        error_type,
        message,
    }
}

/// The function's module, compiled and linked to WASI.
struct CompiledFunction {
    engine: Engine,
    module: Module,
    linker: Linker<Io>,
    fuel: u64,
}

impl CompiledFunction {
    fn compile(engine: Engine, image: FunctionImage) -> Result<Self, String> {
        let module = Module::new(&engine, &image.module).map_err(|e| format!("{e}"))?;
        let mut linker = Linker::<Io>::new(&engine);
        wasi::link(&mut linker).map_err(|e| format!("{e}"))?;
        Ok(CompiledFunction {
            engine,
            module,
            linker,
            fuel: image.fuel,
        })
    }

    /// A new instance in a store of its own holding `fuel`; the module's
    /// start function runs here, on that fuel (it cannot be resumed, so
    /// that is all it gets).
    fn instantiate(&self, io: Io, fuel: u64) -> Result<(Store<Io>, Instance), Failure> {
        let mut store = Store::new(&self.engine, io);
        store
            .set_fuel(fuel)
            .map_err(|e| fail("Runtime.FuelError", format!("{e}")))?;
        let instance = self
            .linker
            .instantiate_and_start(&mut store, &self.module)
            .map_err(|e| fail("Runtime.InstantiationError", format!("{e}")))?;
        Ok((store, instance))
    }
}

/// The function, ready to run: compiled, with its environment.
struct Function {
    compiled: CompiledFunction,
    environ: Rc<Vec<Vec<u8>>>,
    entropy: Rc<RefCell<Entropy>>,
}

impl Function {
    /// Instantiates the module once, for nothing, while the host answers
    /// the first `/next`, so that the first event finds the instantiation
    /// code and the heap's pages for a linear memory touched (a first
    /// invocation took 475 us, the next ones 50-56). With no fuel, a start
    /// function traps before its first instruction: none of the
    /// function's code runs.
    fn warm_up(&self, clock: &Clock) {
        let entropy = Rc::new(RefCell::new(Entropy::Absent));
        let io = Io::new(Vec::new(), *clock, entropy, self.environ.clone());
        let _ = self.compiled.instantiate(io, 0);
    }
}

/// Runs the module's `_start` with the event as stdin.
fn invoke(
    function: &Function,
    invocation: &Invocation,
    clock: &Clock,
    stderr: &mut Vec<u8>,
) -> Result<Vec<u8>, Failure> {
    let fuel = function.compiled.fuel;
    let deadline = invocation
        .remaining_ms
        .zip(clock.tsc_khz())
        .map(|(ms, khz)| clock.now() + ms.saturating_mul(khz));
    let io = Io::new(
        invocation.payload.clone(),
        *clock,
        function.entropy.clone(),
        function.environ.clone(),
    );
    // The start function, if any, runs on the first slice.
    let mut budget = fuel;
    let mut slice = budget.min(FUEL_SLICE);
    budget -= slice;
    let (mut store, instance) = function.compiled.instantiate(io, slice)?;
    let start = instance
        .get_typed_func::<(), ()>(&store, "_start")
        .map_err(|e| fail("Runtime.NoStart", format!("no _start export: {e}")))?;
    let mut call = start
        .call_resumable(&mut store, ())
        .map_err(|e| fail("Runtime.Trap", format!("{e}")))?;
    let exit = loop {
        match call {
            TypedResumableCall::Finished(()) => break 0,
            TypedResumableCall::OutOfFuel(pending) => {
                if deadline.is_some_and(|d| clock.now() >= d) {
                    return Err(fail(
                        "Sandbox.Timedout",
                        format!(
                            "Task timed out after {} ms",
                            invocation.remaining_ms.unwrap_or(0)
                        ),
                    ));
                }
                if budget == 0 {
                    return Err(fail(
                        "Runtime.FuelExhausted",
                        format!("the function used all of its {fuel} units of fuel"),
                    ));
                }
                slice = budget.min(FUEL_SLICE);
                budget -= slice;
                store
                    .set_fuel(slice)
                    .map_err(|e| fail("Runtime.FuelError", format!("{e}")))?;
                call = pending
                    .resume(&mut store)
                    .map_err(|e| fail("Runtime.Trap", format!("{e}")))?;
            }
            TypedResumableCall::HostTrap(trap) => match trap.host_error().i32_exit_status() {
                Some(status) => break status,
                None => return Err(fail("Runtime.Trap", format!("{}", trap.host_error()))),
            },
        }
    };
    let io = store.into_data();
    *stderr = io.stderr;
    match exit {
        0 => Ok(io.stdout),
        status => Err(fail("Runtime.ExitError", format!("exit status {status}"))),
    }
}

/// Asks for the Runtime API and log streams.
fn open_streams(driver: &RefCell<VsockDriver>) -> (usize, usize) {
    let mut driver = driver.borrow_mut();
    (driver.open(RUNTIME_API_PORT), driver.open(LOG_PORT))
}

/// Waits for the streams of [`open_streams`].
fn await_streams(
    driver: &RefCell<VsockDriver>,
    (api, log): (usize, usize),
) -> Result<(usize, usize), String> {
    let established = |id| driver.borrow_mut().established(id);
    let reason = |what: &str, e: VsockError| format!("cannot reach the {what}: {e}");
    let api = established(api).map_err(|e| reason("Runtime API", e))?;
    let log = established(log).map_err(|e| reason("log stream", e))?;
    Ok((api, log))
}

/// Serves invocations until the host closes the Runtime API connection.
pub fn serve(clock: &Clock, devices: &'static Devices, booted_at: u64) {
    let Some(vsock) = devices.find(DEVICE_VSOCK) else {
        println!("runtime: no vsock device; nothing to serve");
        return;
    };
    let driver = match VsockDriver::new(vsock) {
        Ok(d) => RefCell::new(d),
        Err(e) => return println!("runtime: vsock: {e}"),
    };
    // The code disk first: its reads go through the VMM's event loop, which
    // the host's side of three connections would hold for 0.3-1.3 ms
    // (their listeners wake and take the CPUs). Then all three streams
    // are asked for at once, and the host answers while the guest compiles.
    let image = read_image(devices);
    let streams = open_streams(&driver);
    let environ_stream = driver.borrow_mut().open(environ::ENVIRON_PORT);
    let mut config = Config::default();
    config.consume_fuel(true);
    let compiled = image.and_then(|image| CompiledFunction::compile(Engine::new(&config), image));
    let (id, mut log) = match await_streams(&driver, streams) {
        Ok(streams) => streams,
        Err(e) => return println!("runtime: {e}"),
    };
    let mut client = RuntimeClient::new(VsockStream {
        driver: &driver,
        id,
    });
    let entropy = Rc::new(RefCell::new(Entropy::Unsought(devices)));
    let prepared = read_environ(&driver, environ_stream)
        .map_err(|e| ("Runtime.InvalidEnvironment", e))
        .and_then(|environ| {
            compiled
                .map(|compiled| Function {
                    compiled,
                    environ: Rc::new(environ),
                    entropy,
                })
                .map_err(|e| ("Runtime.InvalidFunction", e))
        });
    let function = match prepared {
        Ok(p) => p,
        Err((error_type, message)) => {
            println!("runtime: init failed: {error_type}: {message}");
            if let Err(e) = client.init_error(error_type, &message) {
                println!("runtime: cannot report the init error: {e}");
            }
            return;
        }
    };
    let ready_us = clock.micros(clock.now() - booted_at).unwrap_or(0);
    info!("runtime: ready {ready_us} us after entry; first /next");
    let mut resets = driver.borrow().resets();
    let mut first = true;
    loop {
        let next = match core::mem::take(&mut first) {
            true => client.ask_next().and_then(|()| {
                function.warm_up(clock);
                client.await_next()
            }),
            false => client.next_invocation(),
        };
        let invocation = match next {
            Ok(inv) => inv,
            // The VM was restored from a snapshot taken while it waited
            // here: its streams went with the VMM that took it. The
            // entropy device needs nothing: it keeps no state to reseed.
            Err(_) if driver.borrow().resets() != resets => {
                resets = driver.borrow().resets();
                match await_streams(&driver, open_streams(&driver)) {
                    Ok((api, new_log)) => {
                        info!("runtime: transport reset (a restored snapshot); reconnected");
                        client = RuntimeClient::new(VsockStream {
                            driver: &driver,
                            id: api,
                        });
                        log = new_log;
                        continue;
                    }
                    Err(e) => return println!("runtime: after a transport reset: {e}"),
                }
            }
            Err(e) => {
                println!("runtime: /next failed: {e}; stopping");
                return;
            }
        };
        let mut lines = Vec::new();
        let result = invoke(&function, &invocation, clock, &mut lines);
        lines.retain(|&b| b != b'\r');
        if !lines.is_empty() && !lines.ends_with(b"\n") {
            lines.push(b'\n');
        }
        if let Err(f) = &result {
            lines.extend_from_slice(format!("{}: {}\n", f.error_type, f.message).as_bytes());
        }
        // Before the result goes out, so that the host has the whole
        // invocation's log once it has the result.
        lines.extend_from_slice(format!("END RequestId: {}\n", invocation.request_id).as_bytes());
        if let Err(e) = driver.borrow_mut().send(log, &lines) {
            println!("runtime: the log stream failed: {e}; stopping");
            return;
        }
        let posted = match &result {
            Ok(output) => client.respond(&invocation.request_id, output),
            Err(f) => client.error(&invocation.request_id, f.error_type, &f.message),
        };
        if let Err(e) = posted {
            println!("runtime: posting the result failed: {e}; stopping");
            return;
        }
    }
}
