fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    println!("cargo:rerun-if-changed=baremetal.ld");
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--no-dynamic-linker",
        "-Wl,-z,noexecstack",
    ] {
        println!("cargo:rustc-link-arg-bin=baremetal={arg}");
    }
    println!("cargo:rustc-link-arg-bin=baremetal=-Wl,-T,{dir}/baremetal.ld");
    // The Linux PID 1: a static executable with its own _start, no libc.
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,-z,noexecstack",
    ] {
        println!("cargo:rustc-link-arg-bin=init={arg}");
    }
}
