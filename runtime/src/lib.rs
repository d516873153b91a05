//! Janus container runtime library.
//!
//! `linux` turns an OCI runtime spec into a Linux container in-process (no runc binary):
//! namespaces, mounts, pivot_root, cgroups, capabilities, rlimits and process management.
//! `vm` (cargo feature `vm`, off by default so the in-guest agent does not link it) is the
//! host side of VM mode: the hypervisor trait, its drivers (QEMU, janus-vmm), virtiofsd and the
//! agent client. `linux::lifecycle` is the process bookkeeping the shim and the in-guest agent
//! share; `proto` (feature `proto`) converts runtime types to and from the agent API's messages.

#[cfg(feature = "aio")]
pub mod aio;
pub mod linux;
#[cfg(feature = "proto")]
pub mod proto;
pub mod status;
#[cfg(feature = "vm")]
pub mod vm;

pub use status::Status;
