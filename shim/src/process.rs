//! Process records: what containerd knows of a container's init or exec process (state, pid,
//! exit status, waiters), the same in every mode, and the mode's handle on the process.

use std::sync::{Arc, MutexGuard, OnceLock};
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use oci_spec::runtime::Process as OciProcess;
use runtime::linux::lifecycle::{ProcessRecord, ProcessState};

use crate::error::{Result, ShimError};
use crate::stdio::IoPaths;

pub use runtime::linux::lifecycle::ProcessStatus as Status;

/// What a sandbox does to one process it runs (the init from Create, an exec from Start).
#[async_trait]
pub trait ProcessOps: Send + Sync {
    /// Sends `sig`; `all`: to every process of the container (init only).
    async fn signal(&self, sig: u32, all: bool) -> Result<()>;
    async fn resize_pty(&self, width: u32, height: u32) -> Result<()>;
    /// CloseIO: the process sees EOF on stdin.
    async fn close_stdin(&self) -> Result<()>;
    /// After the exit: waits (bounded) until the process's output reached containerd.
    async fn drain(&self) {}
    /// The process ended: stop copying containerd's stdin to it (a copy still waiting for a
    /// writer to open the FIFO would otherwise hold a thread, and the shim, forever).
    fn exited(&self);
}

pub struct Proc {
    pub exec_id: String,
    pub io: IoPaths,
    /// For exec processes: the process spec, used when Start spawns it.
    pub spec: Option<OciProcess>,
    /// State, pid, exit: the record runtimes keep (the agent keeps the same in the guest).
    record: ProcessRecord<()>,
    /// The sandbox's handle, attached once the process exists.
    ops: OnceLock<Arc<dyn ProcessOps>>,
}

pub fn now() -> Timestamp {
    timestamp(SystemTime::now())
}

pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

impl Proc {
    pub fn new(exec_id: &str, io: IoPaths, spec: Option<OciProcess>) -> Arc<Proc> {
        Arc::new(Proc {
            exec_id: exec_id.to_string(),
            io,
            spec,
            record: ProcessRecord::new(()),
            ops: OnceLock::new(),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, ProcessState<()>> {
        self.record.lock()
    }

    pub fn pid(&self) -> i32 {
        self.record.pid()
    }

    pub fn status(&self) -> Status {
        self.record.status()
    }

    /// The process has a pid (it may already have exited: the exit keeps it).
    pub fn set_pid(&self, pid: i32) {
        self.lock().pid = pid;
    }

    /// Start succeeded: running, unless its exit was recorded already.
    pub fn set_running(&self, pid: i32) {
        let mut st = self.lock();
        st.pid = pid;
        st.started();
    }

    pub fn attach(&self, ops: Arc<dyn ProcessOps>) -> Result<()> {
        self.ops.set(ops).map_err(|_| {
            ShimError::AlreadyExists(format!("process {:?} started twice", self.exec_id))
        })
    }

    /// The sandbox's handle; FailedPrecondition before the process exists.
    pub fn ops(&self) -> Result<Arc<dyn ProcessOps>> {
        self.ops.get().cloned().ok_or_else(|| {
            ShimError::FailedPrecondition(format!("exec {} is not started", self.exec_id))
        })
    }

    pub fn has_ops(&self) -> bool {
        self.ops.get().is_some()
    }

    /// Records the exit; returns false if it was already recorded. The sandbox's handle
    /// then stops what only a live process needs.
    pub fn set_exited(&self, code: i32) -> bool {
        if !self.record.set_exited(code, |_| {}) {
            return false;
        }
        if let Some(ops) = self.ops.get() {
            ops.exited();
        }
        true
    }

    pub async fn wait(&self) {
        self.record.wait().await
    }
}
