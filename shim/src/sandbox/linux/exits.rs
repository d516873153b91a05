//! Namespace mode's exits: the shim is the subreaper of every container process, so an exit
//! arrives as a pid from the SIGCHLD reaper. A process is registered with its record while it
//! is spawned; an exit seen before that (a process that dies at once) is kept until then.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::process::Proc;

/// Who a pid is: the container's exit handling and the process record.
#[derive(Clone)]
pub struct Owner {
    pub container: Arc<super::container::ExitScope>,
    pub proc: Arc<Proc>,
}

/// Early exits kept at most; more means nobody will claim them (not our processes).
const EARLY_MAX: usize = 1024;

#[derive(Default)]
pub struct PidTable {
    inner: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    owners: HashMap<i32, Owner>,
    early: HashMap<i32, i32>,
}

impl PidTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `pid`; returns its exit code when it already exited.
    pub fn register(&self, pid: i32, owner: Owner) -> Option<i32> {
        let mut t = self.lock();
        if let Some(code) = t.early.remove(&pid) {
            return Some(code);
        }
        t.owners.insert(pid, owner);
        None
    }

    pub fn unregister(&self, pid: i32) {
        self.lock().owners.remove(&pid);
    }

    /// The owner of an exited pid, or None (then the exit is kept for a later register).
    pub fn exited(&self, pid: i32, code: i32) -> Option<Owner> {
        let mut t = self.lock();
        if let Some(o) = t.owners.remove(&pid) {
            return Some(o);
        }
        if t.early.len() >= EARLY_MAX {
            t.early.clear();
        }
        t.early.insert(pid, code);
        None
    }
}
