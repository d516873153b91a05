//! Janus container runtime library.
//!
//! `linux` turns an OCI runtime spec into a Linux container in-process (no runc binary):
//! namespaces, mounts, pivot_root, cgroups, capabilities, rlimits and process management.
//! The VM sandbox (`vm`) arrives with the VM-mode issues.

pub mod linux;
