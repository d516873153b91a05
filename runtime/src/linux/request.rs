//! What a spawn asks the zygote for. The parent builds it (`spawn`), the zygote carries it
//! to its intermediate child, and the new process acts on it (`init`); a module of its own so
//! that none of those depends on another just for the shape of the request.

use std::path::PathBuf;

use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};
use serde::{Deserialize, Serialize};

/// What to create.
#[derive(Debug, Serialize, Deserialize)]
pub enum SpawnKind {
    /// A container's init process.
    Init {
        id: String,
        bundle: PathBuf,
        spec: Box<Spec>,
        /// Absolute host path of the (already mounted) rootfs.
        rootfs: PathBuf,
        /// The container's cgroup directories on the host, for its /sys/fs/cgroup.
        cgroup_dirs: Vec<(String, PathBuf)>,
    },
    /// Runs hooks in the runtime's namespaces and reports `Ready` or `Error`.
    Hooks {
        hooks: Vec<oci_spec::runtime::Hook>,
        state: String,
        phase: String,
    },
    /// An extra process in the namespaces of a running container.
    Exec {
        init_pid: i32,
        namespaces: Vec<LinuxNamespaceType>,
    },
}

/// A request to the zygote. File descriptors travel alongside: first the child's end of
/// the sync channel, then stdin, stdout and stderr unless `terminal` is set.
#[derive(Debug, Serialize, Deserialize)]
pub struct SpawnRequest {
    pub kind: SpawnKind,
    pub process: Process,
    pub terminal: bool,
    /// The container's seccomp filter (exec processes get the container's too).
    pub seccomp: Option<oci_spec::runtime::LinuxSeccomp>,
}
