//! A process in the guest (a container's init or an exec): the shared process record
//! (`runtime::linux::lifecycle`) plus what the agent keeps beside it.

use std::os::fd::OwnedFd;
use std::sync::{Arc, MutexGuard};
use std::time::SystemTime;

use runtime::linux::lifecycle::{OomMonitor, ProcessRecord, ProcessState, ProcessStatus};

use crate::error::{AgentError, Result};

/// The agent's part of a process record.
#[derive(Debug, Default)]
pub struct GuestProc {
    /// An OOM kill claimed at exit (reported with the exit, not by GetOOMEvent).
    pub oom_killed: bool,
    pub pty: Option<Arc<OwnedFd>>,
}

pub struct GProc {
    pub exec_id: String,
    record: ProcessRecord<GuestProc>,
    /// The stdio stream that feeds its stdin (0: none).
    pub stdin_stream: u32,
    /// The container's OOM monitor, claimed when the init exits.
    oom: Option<OomMonitor>,
}

impl GProc {
    pub fn new(exec_id: &str, stdin_stream: u32, oom: Option<OomMonitor>) -> Arc<GProc> {
        Arc::new(GProc {
            exec_id: exec_id.to_string(),
            record: ProcessRecord::new(GuestProc::default()),
            stdin_stream,
            oom,
        })
    }

    pub fn st(&self) -> MutexGuard<'_, ProcessState<GuestProc>> {
        self.record.lock()
    }

    pub fn status(&self) -> ProcessStatus {
        self.record.status()
    }

    pub fn pid(&self) -> i32 {
        self.record.pid()
    }

    /// Reaper callback for this process.
    pub fn set_exited(&self, code: i32) {
        // Claim a kill the watcher has not reported yet so it travels with the exit.
        let oom = self.oom.as_ref().is_some_and(|m| m.claim_unreported());
        self.record.set_exited(code, |x| x.oom_killed = oom);
    }

    pub async fn wait(&self) -> protocols::agent::WaitResponse {
        self.record.wait().await;
        let s = self.st();
        protocols::agent::WaitResponse {
            exit_status: s.exit_status,
            exited_at_unix_nanos: s
                .exited_at
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos() as i64)
                .unwrap_or(0),
            oom_killed: s.oom_killed,
            ..Default::default()
        }
    }

    pub fn signal(&self, sig: u32) -> Result<()> {
        let (status, pid) = {
            let s = self.st();
            (s.status, s.pid)
        };
        if status == ProcessStatus::Stopped || pid <= 0 {
            return Err(AgentError::NotFound("process already finished".into()));
        }
        runtime::linux::lifecycle::signal::signal(pid, sig)
    }
}
