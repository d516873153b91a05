//! A process record: the state a runtime keeps for each process it spawned (a container's
//! init or an exec) and the waiters of its exit. The caller's own per-process state (stdio,
//! terminal, ...) rides along as `X`, under the same lock.

use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use tokio::sync::watch;

use crate::linux::sync::Channel;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessStatus {
    Created,
    Running,
    Stopped,
}

/// What a record holds under its lock. `extra` is the caller's part; the state derefs to it,
/// so its fields read as the record's own.
#[derive(Debug)]
pub struct ProcessState<X> {
    pub status: ProcessStatus,
    /// 0 until the process exists.
    pub pid: i32,
    pub exit_status: u32,
    pub exited_at: Option<SystemTime>,
    /// The setup channel of a created, not yet started process (`spawn::release` takes it).
    pub sync: Option<Channel>,
    pub extra: X,
}

impl<X> ProcessState<X> {
    /// Start went through: Created -> Running. An exit recorded in the meantime stands.
    pub fn started(&mut self) {
        if self.status == ProcessStatus::Created {
            self.status = ProcessStatus::Running;
        }
    }
}

impl<X> Deref for ProcessState<X> {
    type Target = X;
    fn deref(&self) -> &X {
        &self.extra
    }
}

impl<X> DerefMut for ProcessState<X> {
    fn deref_mut(&mut self) -> &mut X {
        &mut self.extra
    }
}

#[derive(Debug)]
pub struct ProcessRecord<X> {
    state: Mutex<ProcessState<X>>,
    exited: watch::Sender<bool>,
}

impl<X> ProcessRecord<X> {
    pub fn new(extra: X) -> Self {
        let (exited, _) = watch::channel(false);
        ProcessRecord {
            state: Mutex::new(ProcessState {
                status: ProcessStatus::Created,
                pid: 0,
                exit_status: 0,
                exited_at: None,
                sync: None,
                extra,
            }),
            exited,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, ProcessState<X>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn pid(&self) -> i32 {
        self.lock().pid
    }

    pub fn status(&self) -> ProcessStatus {
        self.lock().status
    }

    /// Records the exit, once: returns false if it was recorded already. `also` runs under
    /// the same lock, for the caller's part (drop what only a live process needs, note how
    /// it ended); the setup channel is dropped here.
    pub fn set_exited(&self, code: i32, also: impl FnOnce(&mut X)) -> bool {
        {
            let mut st = self.lock();
            if st.status == ProcessStatus::Stopped {
                return false;
            }
            st.status = ProcessStatus::Stopped;
            st.exit_status = code as u32;
            st.exited_at = Some(SystemTime::now());
            st.sync = None;
            also(&mut st.extra);
        }
        // send_replace stores the value even when nobody waits yet; send() would drop it.
        self.exited.send_replace(true);
        true
    }

    /// Returns once the exit is recorded (at once if it is).
    pub async fn wait(&self) {
        let mut rx = self.exited.subscribe();
        let _ = rx.wait_for(|e| *e).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Extra {
        stdin_open: bool,
    }

    #[tokio::test(flavor = "current_thread")]
    async fn exit_is_recorded_once_and_wakes_waiters() {
        let r = std::sync::Arc::new(ProcessRecord::new(Extra { stdin_open: true }));
        r.lock().pid = 42;
        r.lock().started();
        assert_eq!(r.status(), ProcessStatus::Running);
        let r2 = r.clone();
        let waiter = tokio::spawn(async move { r2.wait().await });
        assert!(r.set_exited(3, |x| x.stdin_open = false));
        assert!(!r.set_exited(9, |_| panic!("second exit recorded")));
        waiter.await.unwrap();
        let st = r.lock();
        assert_eq!(
            (st.status, st.pid, st.exit_status),
            (ProcessStatus::Stopped, 42, 3)
        );
        assert!(st.exited_at.is_some());
        assert!(!st.stdin_open);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn wait_after_exit_returns() {
        let r = ProcessRecord::new(Extra::default());
        r.set_exited(0, |_| {});
        r.wait().await;
        // An exit before Start keeps the process stopped.
        r.lock().started();
        assert_eq!(r.status(), ProcessStatus::Stopped);
    }
}
