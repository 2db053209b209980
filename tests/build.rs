//! Assembles the fixture guests in `fixtures/` with the system's gcc and
//! ld: freestanding ELF kernels, and one bzImage made flat with objcopy.

use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (install gcc and binutils)"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn assemble(fixtures: &Path, out: &Path, name: &str) -> PathBuf {
    let object = out.join(format!("{name}.o"));
    run(Command::new("gcc")
        .arg("-c")
        .arg("-I")
        .arg(fixtures)
        .arg(fixtures.join(format!("{name}.S")))
        .arg("-o")
        .arg(&object));
    object
}

fn link(fixtures: &Path, script: &str, object: &Path, output: &Path) {
    run(Command::new("ld")
        .args([
            "-nostdlib",
            "-static",
            "-z",
            "noexecstack",
            "--no-warn-rwx-segments",
        ])
        .arg("-T")
        .arg(fixtures.join(script))
        .arg("-o")
        .arg(output)
        .arg(object));
}

fn main() {
    let fixtures = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("fixtures");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed=fixtures");

    for name in ["linux64", "pvh", "int3", "idle", "native"] {
        let object = assemble(&fixtures, &out, name);
        link(
            &fixtures,
            "elf.ld",
            &object,
            &out.join(format!("{name}.elf")),
        );
    }

    // Userspace programs (a marker init, a function's bootstrap), linked
    // with ld's default script for executables.
    for name in ["init", "bootstrap"] {
        let object = assemble(&fixtures, &out, name);
        run(Command::new("ld")
            .args(["-static", "-z", "noexecstack", "-e", "_start", "-o"])
            .arg(out.join(name))
            .arg(&object));
    }

    let object = assemble(&fixtures, &out, "bzimage");
    let elf = out.join("bzimage.elf");
    link(&fixtures, "bzimage.ld", &object, &elf);
    run(Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(&elf)
        .arg(out.join("bzImage")));
}
