//! Process records: state, exit status and waiters.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use oci_spec::runtime::Process as OciProcess;
use runtime::linux::sync::Channel;
use tokio::sync::watch;

use crate::stdio::{IoPaths, Tty};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Stopped,
}

pub struct ProcState {
    pub status: Status,
    pub pid: i32,
    pub exit_status: u32,
    pub exited_at: Option<Timestamp>,
    /// The sync channel to a created (not yet started) process.
    pub sync: Option<Channel>,
    /// Closing (or dropping) it ends the stdin copy: the process sees EOF.
    pub stdin_close: Option<tokio::sync::oneshot::Sender<()>>,
    pub tty: Option<Tty>,
    /// VM mode: the host side of the process's stdio streams.
    pub vm_io: Option<crate::vm::ProcIo>,
}

pub struct Proc {
    pub exec_id: String,
    pub io: IoPaths,
    /// For exec processes: the process spec, used when Start spawns it.
    pub spec: Option<OciProcess>,
    pub state: Mutex<ProcState>,
    exited: watch::Sender<bool>,
}

pub fn now() -> Timestamp {
    let d = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

impl Proc {
    pub fn new(exec_id: &str, io: IoPaths, spec: Option<OciProcess>) -> Arc<Proc> {
        let (tx, _) = watch::channel(false);
        Arc::new(Proc {
            exec_id: exec_id.to_string(),
            io,
            spec,
            state: Mutex::new(ProcState {
                status: Status::Created,
                pid: 0,
                exit_status: 0,
                exited_at: None,
                sync: None,
                stdin_close: None,
                tty: None,
                vm_io: None,
            }),
            exited: tx,
        })
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, ProcState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn pid(&self) -> i32 {
        self.lock().pid
    }

    pub fn status(&self) -> Status {
        self.lock().status
    }

    /// Records the exit; returns false if it was already recorded.
    pub fn set_exited(&self, code: i32) -> bool {
        let mut st = self.lock();
        if st.status == Status::Stopped {
            return false;
        }
        st.status = Status::Stopped;
        st.exit_status = code as u32;
        st.exited_at = Some(now());
        st.sync = None;
        st.stdin_close = None;
        drop(st);
        // send_replace stores the value even when nobody waits yet; send() would drop it.
        self.exited.send_replace(true);
        true
    }

    pub async fn wait(&self) {
        let mut rx = self.exited.subscribe();
        let _ = rx.wait_for(|e| *e).await;
    }
}
