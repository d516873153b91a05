//! Errors of the VM host side.

use std::path::PathBuf;
use std::time::Duration;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Something the VM needs is not on this host (kernel, initrd, QEMU binary, /dev/kvm...).
    /// `hint` says what to do about it.
    #[error("{what} not found at {}: {hint}", path.display())]
    MissingAsset {
        what: String,
        path: PathBuf,
        hint: String,
    },

    /// The configuration cannot work (bad sizes, socket path too long, KVM forced but unusable).
    #[error("invalid VM configuration: {0}")]
    Config(String),

    /// The VM did not come up, or died: the VMM refused to start, exited, or was killed.
    /// `console_tail` is the end of the guest console log, `vmm_log` the end of the VMM's own
    /// stderr (QEMU's or janus-vmm's: its argument and device errors land there).
    #[error(
        "VM boot failed: {reason}{}{}",
        section("the VMM said", vmm_log),
        section("guest console (tail)", console_tail)
    )]
    Boot {
        reason: String,
        console_tail: String,
        vmm_log: String,
    },

    /// The guest is running but the agent did not answer Health in time.
    #[error("agent on {} not ready after {after:?}{}", socket.display(), section("guest console (tail)", console_tail))]
    AgentTimeout {
        after: Duration,
        socket: PathBuf,
        console_tail: String,
    },

    /// A ttrpc call to the agent failed (transport error or an error status from the agent).
    #[error("agent: {0}")]
    Agent(#[from] ttrpc::Error),

    /// No hypervisor driver of this name (see [`driver`](super::driver)).
    #[error("vm.hypervisor = {0:?}: \"qemu\" or \"builtin\"")]
    UnknownDriver(String),

    /// The pod's cgroup for the VM could not be used.
    #[error("VM cgroup: {0}")]
    Cgroup(#[source] crate::linux::Error),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

fn section(title: &str, body: &str) -> String {
    if body.trim().is_empty() {
        String::new()
    } else {
        format!("\n--- {title} ---\n{}", body.trim_end())
    }
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The guest console tail carried by this error, if any.
    pub fn console_tail(&self) -> Option<&str> {
        match self {
            Error::Boot { console_tail, .. } | Error::AgentTimeout { console_tail, .. } => {
                Some(console_tail)
            }
            _ => None,
        }
    }
}

/// Adds context to io errors: `fs::read(p).ctx(|| format!("read {p}"))`.
pub(crate) trait IoContext<T> {
    fn ctx<C: Into<String>>(self, f: impl FnOnce() -> C) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx<C: Into<String>>(self, f: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| Error::io(f(), e))
    }
}
