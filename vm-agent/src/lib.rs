//! The agent's input checks as a library: the `vm-agent` binary and the fuzz targets share
//! them (`requests`: each request's validation and plan; `error`: the status they answer
//! with). Everything that acts on the guest stays in the binary.

pub mod error;
pub mod requests;
