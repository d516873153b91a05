//! The error every Janus RPC server returns (the shim to containerd, the agent to the shim),
//! with its gRPC code. One mapping, shared, so a runtime error reaches containerd with the
//! same code whether the container runs on the host or in a VM.

/// An RPC failure with the gRPC code containerd acts on.
#[derive(Debug, thiserror::Error)]
pub enum Status {
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
    DeadlineExceeded(String),
    #[error("{0}")]
    Internal(String),
    /// A failure with its cause kept for the chain (`source()`); Unknown to containerd.
    #[error("{context}: {source}")]
    Failed {
        context: String,
        #[source]
        source: BoxError,
    },
    /// A library's error that says it all (Display and cause are its own); Unknown.
    #[error(transparent)]
    Other(BoxError),
}

/// The cause of a [`Status::Failed`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

impl Status {
    /// The same failure (same code, same cause) with `note` added to its message.
    pub fn with_note(self, note: &str) -> Status {
        match self {
            Status::NotFound(m) => Status::NotFound(format!("{m} {note}")),
            Status::AlreadyExists(m) => Status::AlreadyExists(format!("{m} {note}")),
            Status::InvalidArgument(m) => Status::InvalidArgument(format!("{m} {note}")),
            Status::FailedPrecondition(m) => Status::FailedPrecondition(format!("{m} {note}")),
            Status::Unimplemented(m) => Status::Unimplemented(format!("{m} {note}")),
            Status::DeadlineExceeded(m) => Status::DeadlineExceeded(format!("{m} {note}")),
            Status::Internal(m) => Status::Internal(format!("{m} {note}")),
            Status::Failed { context, source } => Status::Failed {
                context: format!("{context} {note}"),
                source,
            },
            Status::Other(source) => Status::Failed {
                context: note.to_string(),
                source,
            },
        }
    }

    /// An internal failure of `context` (what was being done), keeping `source`.
    pub fn failed(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Status {
        Status::Failed {
            context: context.into(),
            source: Box::new(source),
        }
    }
}

impl From<crate::linux::Error> for Status {
    fn from(e: crate::linux::Error) -> Self {
        use crate::linux::Error as E;
        match e {
            E::InvalidSpec(_) | E::ChildRejected(_) => Status::InvalidArgument(e.to_string()),
            E::NotFound(_) => Status::NotFound(e.to_string()),
            E::Systemd(crate::linux::systemd::SystemdError::Exists { .. }) => {
                Status::AlreadyExists(e.to_string())
            }
            E::Systemd(crate::linux::systemd::SystemdError::Timeout { .. }) => {
                Status::DeadlineExceeded(e.to_string())
            }
            _ => Status::Other(Box::new(e)),
        }
    }
}

#[cfg(feature = "rpc")]
impl Status {
    pub fn code(&self) -> ttrpc::Code {
        use ttrpc::Code;
        match self {
            Status::NotFound(_) => Code::NOT_FOUND,
            Status::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Status::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            Status::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Status::Unimplemented(_) => Code::UNIMPLEMENTED,
            Status::DeadlineExceeded(_) => Code::DEADLINE_EXCEEDED,
            Status::Internal(_) | Status::Failed { .. } | Status::Other(_) => Code::UNKNOWN,
        }
    }

    /// The inverse mapping, for a status received from a peer (the shim relaying the agent).
    pub fn from_rpc(e: ttrpc::Error) -> Status {
        use ttrpc::Code;
        match e {
            ttrpc::Error::RpcStatus(s) => {
                let m = s.message().to_string();
                match s.code() {
                    Code::NOT_FOUND => Status::NotFound(m),
                    Code::ALREADY_EXISTS => Status::AlreadyExists(m),
                    Code::INVALID_ARGUMENT => Status::InvalidArgument(m),
                    Code::FAILED_PRECONDITION => Status::FailedPrecondition(m),
                    Code::UNIMPLEMENTED => Status::Unimplemented(m),
                    Code::DEADLINE_EXCEEDED => Status::DeadlineExceeded(m),
                    _ => Status::Internal(m),
                }
            }
            // A transport failure (the peer gone, a broken connection). Deadlines are the
            // caller's to bound (e.g. the shim's `VmPod::call`), typed there.
            other => Status::failed("agent connection", other),
        }
    }
}

#[cfg(feature = "rpc")]
impl From<Status> for ttrpc::Error {
    fn from(e: Status) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

#[cfg(all(test, feature = "rpc"))]
mod tests {
    use super::*;
    use ttrpc::Code;

    fn code_of(e: Status) -> Code {
        match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => s.code(),
            _ => panic!("not a status"),
        }
    }

    #[test]
    fn codes_map_both_ways() {
        let all = [
            (Status::NotFound("x".into()), Code::NOT_FOUND),
            (Status::AlreadyExists("x".into()), Code::ALREADY_EXISTS),
            (Status::InvalidArgument("x".into()), Code::INVALID_ARGUMENT),
            (
                Status::FailedPrecondition("x".into()),
                Code::FAILED_PRECONDITION,
            ),
            (Status::Unimplemented("x".into()), Code::UNIMPLEMENTED),
            (
                Status::DeadlineExceeded("x".into()),
                Code::DEADLINE_EXCEEDED,
            ),
            (Status::Internal("x".into()), Code::UNKNOWN),
        ];
        for (s, c) in all {
            let text = s.to_string();
            let back = Status::from_rpc(ttrpc::Error::from(Status::from_rpc(
                ttrpc::Error::RpcStatus(ttrpc::get_status(c, text.clone())),
            )));
            assert_eq!(code_of(back), c);
            assert_eq!(code_of(s), c);
        }
    }

    #[test]
    fn a_note_keeps_the_code() {
        let s = Status::DeadlineExceeded("agent silent".into()).with_note("(log: /x)");
        assert!(matches!(&s, Status::DeadlineExceeded(m) if m == "agent silent (log: /x)"));
        let io = std::io::Error::from_raw_os_error(libc::EIO);
        let s = Status::failed("boot", io).with_note("(log: /x)");
        assert!(s.to_string().contains("boot (log: /x)"), "{s}");
        assert!(std::error::Error::source(&s).is_some());
    }

    #[test]
    fn runtime_errors_map() {
        use crate::linux::Error as E;
        assert!(matches!(
            Status::from(E::InvalidSpec("bad".into())),
            Status::InvalidArgument(_)
        ));
        assert!(matches!(
            Status::from(E::NotFound("gone".into())),
            Status::NotFound(_)
        ));
        let s = Status::from(E::Cgroup("x".into()));
        assert!(
            matches!(&s, Status::Other(e) if e.downcast_ref::<E>().is_some()),
            "{s:?}"
        );
        let io = std::io::Error::from_raw_os_error(libc::EBUSY);
        let s = Status::failed("remove cgroup", io);
        let cause = std::error::Error::source(&s).expect("the cause is kept");
        assert!(
            cause.downcast_ref::<std::io::Error>().is_some(),
            "{cause:?}"
        );
        assert_eq!(code_of(s), Code::UNKNOWN);
    }
}
