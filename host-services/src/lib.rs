//! The host services (control plane, Invoke routing, execution environments). Not implemented yet: see the README status table.
