//! Compiles the seccomp policy (`seccomp/x86_64.json`, readable and
//! reviewed as text) into BPF at build time, so that the VMM installs its
//! filters without parsing JSON on every start. Output: for each thread
//! kind in [`THREADS`] order, an instruction count (u32 LE) and the
//! instructions (code u16, jt u8, jf u8, k u32, all LE).

const POLICY: &str = "seccomp/x86_64.json";
/// Must match `vmm::seccomp::ThreadKind`.
const THREADS: [&str; 2] = ["vmm", "vcpu"];

fn main() {
    println!("cargo::rerun-if-changed={POLICY}");
    let policy = std::fs::File::open(POLICY).unwrap_or_else(|e| panic!("{POLICY}: {e}"));
    let filters = seccompiler::compile_from_json(policy, seccompiler::TargetArch::x86_64)
        .unwrap_or_else(|e| panic!("{POLICY}: {e}"));
    let mut out = Vec::new();
    for thread in THREADS {
        let program = filters
            .get(thread)
            .unwrap_or_else(|| panic!("{POLICY} has no \"{thread}\" filter"));
        out.extend_from_slice(&(program.len() as u32).to_le_bytes());
        for instruction in program {
            out.extend_from_slice(&instruction.code.to_le_bytes());
            out.push(instruction.jt);
            out.push(instruction.jf);
            out.extend_from_slice(&instruction.k.to_le_bytes());
        }
    }
    let dest =
        std::path::Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("seccomp.bpf");
    std::fs::write(&dest, out).unwrap_or_else(|e| panic!("{}: {e}", dest.display()));
}
