//! What a runtime keeps about the processes it spawns, shared by the shim (host containers)
//! and the agent (guest containers), which both reap their children as a subreaper or PID 1:
//!
//! - `exits`: the reaper and the pid -> owner table, with exits seen before registration;
//! - `process`: a process record (state, exit status, waiters);
//! - `oom`: a cgroup's OOM kills, each reported once (as they happen, or with the exit);
//! - `signal`: kill(2) for any signal number, with the codes containerd expects.

pub mod exits;
pub mod oom;
#[cfg(feature = "aio")]
pub mod process;
pub mod signal;

pub use exits::{reap, ExitTable};
pub use oom::OomMonitor;
#[cfg(feature = "aio")]
pub use process::{ProcessRecord, ProcessState, ProcessStatus};
