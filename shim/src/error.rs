//! Shim errors and their containerd (gRPC/ttrpc) codes: the runtime's `Status`, shared with
//! the agent so a failure has the same code whether the container runs on the host or in a VM
//! (the code mapping and its tests live in `runtime::status`).

/// The shim's errors are the runtime's RPC status.
pub type ShimError = runtime::Status;

pub type Result<T> = std::result::Result<T, ShimError>;

impl From<crate::config::ConfigError> for ShimError {
    fn from(e: crate::config::ConfigError) -> Self {
        ShimError::InvalidArgument(e.to_string())
    }
}
