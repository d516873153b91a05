//! The agent's errors: the runtime's RPC status, so a failure reaches the host with the
//! same code it would have in namespace mode.

pub type AgentError = runtime::Status;
pub type Result<T> = std::result::Result<T, AgentError>;
