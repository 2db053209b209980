//! The devices the ACPI tables describe (`arch::x86_64::acpi`): the PM1
//! registers a guest powers off through, and the pvpanic port a panicking
//! kernel writes to.

pub mod pm1;
pub mod pvpanic;
