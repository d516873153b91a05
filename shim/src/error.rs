//! Shim errors and their containerd (gRPC/ttrpc) codes.

use containerd_shim_protos::ttrpc::{self, Code};
use runtime::linux::Error as RtError;

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, ShimError>;

impl ShimError {
    pub fn code(&self) -> Code {
        match self {
            ShimError::NotFound(_) => Code::NOT_FOUND,
            ShimError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            ShimError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            ShimError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            ShimError::Unimplemented(_) => Code::UNIMPLEMENTED,
            ShimError::Internal(_) => Code::UNKNOWN,
        }
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(e: ShimError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

impl From<RtError> for ShimError {
    fn from(e: RtError) -> Self {
        match e {
            RtError::InvalidSpec(_) => ShimError::InvalidArgument(e.to_string()),
            RtError::NotFound(_) => ShimError::NotFound(e.to_string()),
            _ => ShimError::Internal(e.to_string()),
        }
    }
}

impl From<crate::config::ConfigError> for ShimError {
    fn from(e: crate::config::ConfigError) -> Self {
        ShimError::InvalidArgument(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(e: ShimError) -> Code {
        match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => s.code(),
            _ => panic!("not a status"),
        }
    }

    #[test]
    fn codes_map() {
        assert_eq!(code_of(ShimError::NotFound("x".into())), Code::NOT_FOUND);
        assert_eq!(
            code_of(ShimError::AlreadyExists("x".into())),
            Code::ALREADY_EXISTS
        );
        assert_eq!(
            code_of(ShimError::InvalidArgument("x".into())),
            Code::INVALID_ARGUMENT
        );
        assert_eq!(
            code_of(ShimError::FailedPrecondition("x".into())),
            Code::FAILED_PRECONDITION
        );
        assert_eq!(
            code_of(ShimError::Unimplemented("x".into())),
            Code::UNIMPLEMENTED
        );
    }

    #[test]
    fn runtime_errors_map() {
        let e: ShimError = RtError::InvalidSpec("bad".into()).into();
        assert!(matches!(e, ShimError::InvalidArgument(_)));
        let e: ShimError = RtError::NotFound("gone".into()).into();
        assert!(matches!(e, ShimError::NotFound(_)));
        let e: ShimError = RtError::Cgroup("x".into()).into();
        assert!(matches!(e, ShimError::Internal(_)));
    }
}
