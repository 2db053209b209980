//! The log of the VMM and of the jailer that runs it: plain lines on
//! stderr, which their owner reads.

use std::io::IsTerminal;

/// Sends `tracing` events up to `max_level` to stderr, without timestamps
/// or targets (the owner adds its own), coloured only on a terminal.
pub fn log_to_stderr(max_level: tracing::Level) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // A reader that went away must not take the process with it: the
        // subscriber would otherwise report the failed write with
        // `eprintln!`, which panics on a closed stderr.
        .log_internal_errors(false)
        .with_max_level(max_level)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .without_time()
        .init();
}
