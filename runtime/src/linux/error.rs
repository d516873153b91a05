use std::io;

/// Errors of the Linux runtime. The shim maps them to containerd error codes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec asks for something malformed or that this host cannot do.
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    /// A system call or file operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The container process reported a failure during setup or exec.
    #[error("{0}")]
    Child(String),
    /// The container process rejected its spec during setup (already worded for the user).
    #[error("{0}")]
    ChildRejected(String),
    /// A cgroup operation failed.
    #[error("cgroup: {0}")]
    Cgroup(String),
    /// systemd refused or failed a scope's start, change or stop.
    #[error("cgroup: {0}")]
    Systemd(#[from] super::systemd::SystemdError),
    /// Something that does not exist (a process, a cgroup).
    #[error("not found: {0}")]
    NotFound(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn sys(context: impl Into<String>, errno: nix::errno::Errno) -> Self {
        Error::Io {
            context: context.into(),
            source: io::Error::from_raw_os_error(errno as i32),
        }
    }
}

/// Adds context to `io::Result`s.
pub trait IoContext<T> {
    fn ctx(self, f: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, f: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(f(), e))
    }
}

impl<T> IoContext<T> for nix::Result<T> {
    fn ctx(self, f: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::sys(f(), e))
    }
}
