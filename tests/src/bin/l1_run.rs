//! Runs a shell command in the L1 test machine (see
//! `microvm_tests::l1_machine`): a Linux VM under QEMU's TCG with
//! `kvm_amd` on emulated AMD SVM, the host's root shared read-only and a
//! fresh /tmp. Prints the machine's console as it comes and exits with
//! the command's status.
//!
//!   l1_run [--timeout SECONDS] [--env NAME]... -- COMMAND...

use std::time::Duration;

use microvm_tests::l1_machine::L1Machine;

fn usage() -> ! {
    eprintln!("usage: l1_run [--timeout SECONDS] [--env NAME]... -- COMMAND...");
    std::process::exit(2);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut timeout = Duration::from_secs(600);
    let mut env = Vec::new();
    loop {
        match args.next().as_deref() {
            Some("--timeout") => match args.next().and_then(|s| s.parse().ok()) {
                Some(seconds) => timeout = Duration::from_secs(seconds),
                None => usage(),
            },
            Some("--env") => {
                let Some(name) = args.next() else { usage() };
                let value = std::env::var(&name).unwrap_or_else(|_| {
                    eprintln!("l1_run: --env {name}: not set here");
                    std::process::exit(2)
                });
                env.push((name, value));
            }
            Some("--") => break,
            _ => usage(),
        }
    }
    let command: Vec<String> = args.collect();
    if command.is_empty() {
        usage();
    }
    let machine = L1Machine::find().unwrap_or_else(|e| {
        eprintln!("l1_run: {e}");
        std::process::exit(1)
    });
    let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    match machine.run(&command.join(" "), &env, timeout) {
        Ok(run) => std::process::exit(run.code),
        Err(e) => {
            eprintln!("l1_run: {e}");
            std::process::exit(1)
        }
    }
}
