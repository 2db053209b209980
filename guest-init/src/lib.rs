//! The guest side (PID 1 and the bare-metal guest). Not implemented yet: see the README status table.
