use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("/dev/kvm: {0}")]
    Kvm(#[source] kvm_ioctls::Error),
    #[error("{what}: {source}")]
    KvmCall {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("kernel {path}: {msg}")]
    Kernel { path: String, msg: String },
    #[error("{0}")]
    Config(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Context for KVM calls.
pub trait KvmContext<T> {
    fn kvm(self, what: &'static str) -> Result<T>;
}

impl<T> KvmContext<T> for std::result::Result<T, kvm_ioctls::Error> {
    fn kvm(self, what: &'static str) -> Result<T> {
        self.map_err(|source| Error::KvmCall { what, source })
    }
}

pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}
