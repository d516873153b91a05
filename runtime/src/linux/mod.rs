//! OCI spec -> Linux container, created in-process.
//!
//! Process model: the shim forks a *zygote* while it is still single-threaded (before tokio
//! starts). Containers and exec processes are forked from the zygote, never from the
//! multi-threaded shim, so the child may allocate and take locks freely. The zygote's
//! short-lived intermediate child joins namespaces that only affect children (pid, user),
//! clones the container process and exits; the container is then re-parented to the shim,
//! which is a child subreaper, so the shim reaps it and sees its exit status.

pub mod caps;
pub mod cgroups;
mod error;
pub mod features;
pub mod hooks;
mod init;
pub mod lifecycle;
pub mod mounts;
pub mod request;
pub mod seccomp;
pub mod spawn;
pub mod spec;
pub mod sync;
pub mod systemd;
pub mod zygote;

pub use error::{Error, Result};
