//! Shim errors and their containerd (gRPC/ttrpc) codes: the runtime's `Status`, shared with
//! the agent so a failure has the same code whether the container runs on the host or in a VM
//! (the code mapping and its tests live in `runtime::status`).

/// The shim's errors are the runtime's RPC status.
pub type ShimError = runtime::Status;

pub type Result<T> = std::result::Result<T, ShimError>;
// (A bad config file is InvalidArgument: `janus_config` maps its errors to `Status`.)
