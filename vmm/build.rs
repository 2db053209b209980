//! Compiles the seccomp policy (`seccomp/x86_64.json`, readable and
//! reviewed as text) into BPF at build time, so that the VMM installs its
//! filters without parsing JSON on every start. Output: for each thread
//! kind in [`THREADS`] order, an instruction count (u32 LE) and the
//! instructions (code u16, jt u8, jf u8, k u32, all LE).
//!
//! seccompiler compiles a policy into one chain that tests the syscall
//! number against each allowed syscall in turn. Installing a filter, the
//! kernel runs it for every syscall number to find the ones it always
//! allows (its action cache), so a chain costs about 3.5 ns per syscall
//! number per instruction walked: 110 us for the vCPU threads' filter and
//! 150 us for the event loop's on a PVM host, on the way to the guest's
//! first instruction. So each syscall's rules are compiled alone, by
//! seccompiler, and a binary search over the syscall numbers, built here,
//! jumps to the one for the number asked: about 15 instructions for any
//! number instead of up to 100.

use seccompiler::{sock_filter, BpfProgram, TargetArch};
use serde_json::{Map, Value};

const POLICY: &str = "seccomp/x86_64.json";
/// Must match `vmm::seccomp::ThreadKind`.
const THREADS: [&str; 2] = ["vmm", "vcpu"];

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JA: u16 = 0x05;
const BPF_JMP_JEQ_K: u16 = 0x15;
const BPF_JMP_JGE_K: u16 = 0x35;
/// `seccomp_data.nr`, `seccomp_data.arch`.
const OFFSET_NR: u32 = 0;
const OFFSET_ARCH: u32 = 4;

fn main() {
    println!("cargo::rerun-if-changed={POLICY}");
    let text = std::fs::read_to_string(POLICY).unwrap_or_else(|e| panic!("{POLICY}: {e}"));
    let policy: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{POLICY}: {e}"));
    let mut out = Vec::new();
    for thread in THREADS {
        let filter = policy
            .get(thread)
            .unwrap_or_else(|| panic!("{POLICY} has no \"{thread}\" filter"));
        let program = searched(thread, filter);
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

/// `thread`'s filter: the architecture check, the syscall number loaded,
/// a binary search over the allowed numbers, then one seccompiler program
/// per syscall, each without its own architecture check and load of the
/// number (its first four instructions, which nothing jumps back to: BPF
/// jumps only forward). The search enters the one for the largest allowed
/// number not above the number asked, with the number loaded; it compares
/// the number first, so it refuses any other with the policy's default.
/// Every instruction costs about 0.17 us to install, so none is repeated.
fn searched(thread: &str, filter: &Value) -> BpfProgram {
    let rules = filter["filter"]
        .as_array()
        .unwrap_or_else(|| panic!("{POLICY}: \"{thread}\" has no rule list"));
    let mut syscalls: Vec<(&str, Vec<Value>)> = Vec::new();
    for rule in rules {
        let name = rule["syscall"]
            .as_str()
            .unwrap_or_else(|| panic!("{POLICY}: a \"{thread}\" rule names no syscall"));
        match syscalls.iter_mut().find(|(n, _)| *n == name) {
            Some((_, same)) => same.push(rule.clone()),
            None => syscalls.push((name, vec![rule.clone()])),
        }
    }
    let mut programs: Vec<(u32, BpfProgram)> = syscalls
        .into_iter()
        .map(|(name, rules)| {
            let mut alone: Map<String, Value> = filter.as_object().cloned().unwrap_or_default();
            alone.insert("filter".into(), Value::Array(rules));
            let mut policy = Map::new();
            policy.insert(thread.into(), Value::Object(alone));
            let json = Value::Object(policy).to_string();
            let mut compiled = seccompiler::compile_from_json(json.as_bytes(), TargetArch::x86_64)
                .unwrap_or_else(|e| panic!("{POLICY}: {thread} {name}: {e}"));
            let program = compiled.remove(thread).expect("the filter just compiled");
            (syscall_number(thread, name, &program), program)
        })
        .collect();
    programs.sort_by_key(|(nr, _)| *nr);

    // Header: the architecture check, as seccompiler writes it, so a
    // foreign architecture's numbers never reach the search.
    let mut out: BpfProgram = programs[0].1[..3].to_vec();
    out.push(stmt(BPF_LD_W_ABS, OFFSET_NR));
    let numbers: Vec<u32> = programs.iter().map(|(nr, _)| *nr).collect();
    let mut entries = Vec::new();
    search(&numbers, 0, &mut out, &mut entries);
    let mut starts = Vec::new();
    for (_, program) in &programs {
        starts.push(out.len());
        out.extend_from_slice(&program[NUMBER_COMPARED..]);
    }
    for (at, index) in entries {
        out[at].k = u32::try_from(starts[index] - at - 1).expect("a short filter");
    }
    assert!(
        out.len() <= 4096,
        "{POLICY}: \"{thread}\" compiles to {} instructions, more than BPF allows",
        out.len()
    );
    out
}

/// Emits the search over `numbers` (sorted; the first is entry `first`):
/// a `JGE` on the middle number splits them until one is left, where an
/// unconditional jump, whose target `entries` records, enters its program.
fn search(numbers: &[u32], first: usize, out: &mut BpfProgram, entries: &mut Vec<(usize, usize)>) {
    if numbers.len() == 1 {
        entries.push((out.len(), first));
        out.push(stmt(BPF_JMP_JA, 0));
        return;
    }
    let mid = numbers.len() / 2;
    let branch = out.len();
    out.push(sock_filter {
        code: BPF_JMP_JGE_K,
        jt: 0,
        jf: 0,
        k: numbers[mid],
    });
    search(&numbers[..mid], first, out, entries);
    out[branch].jt = u8::try_from(out.len() - branch - 1).expect("a shallow search");
    search(&numbers[mid..], first + mid, out, entries);
}

/// Where seccompiler's program of one syscall compares the number.
const NUMBER_COMPARED: usize = 4;

/// The number seccompiler tests for a program of one syscall: it starts
/// with the architecture check (three instructions), loads the number and
/// compares it.
fn syscall_number(thread: &str, name: &str, program: &[sock_filter]) -> u32 {
    match program {
        [arch, _, _, load, compare, ..]
            if (arch.code, arch.k) == (BPF_LD_W_ABS, OFFSET_ARCH)
                && (load.code, load.k) == (BPF_LD_W_ABS, OFFSET_NR)
                && compare.code == BPF_JMP_JEQ_K =>
        {
            compare.k
        }
        _ => panic!("{POLICY}: {thread} {name}: seccompiler's program has an unknown layout"),
    }
}

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}
