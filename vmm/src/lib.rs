//! Janus's KVM microVM monitor, on the rust-vmm crates: guest memory (`memory`), vCPU setup
//! (`cpu`), kernel loading and boot information (`boot`), ACPI tables (`acpi`), legacy devices
//! (`devices`), interrupt lines (`irq`), virtio devices (`virtio`) served by the device event
//! loop (`events`), and the run loop (`vm`). The `janus-vmm` binary runs one VM per process,
//! so a crash of the VMM cannot take the shim down.

pub mod acpi;
pub mod boot;
pub mod cpu;
pub mod devices;
pub mod error;
pub mod events;
pub mod irq;
pub mod layout;
pub mod memory;
pub mod seccomp;
pub mod virtio;
pub mod vm;

pub use error::{Error, Result};
pub use vm::{Vm, VmConfig, VmExit};
