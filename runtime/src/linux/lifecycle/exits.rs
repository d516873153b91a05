//! Exit bookkeeping for a process that reaps its children: which owner a reaped pid belongs
//! to, and the exits of pids reaped before their owner registered them (a process can exit
//! during setup, between the zygote reporting its pid and the caller recording it).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// Early exits kept at most. Reaped pids that nobody registers (orphans of a container
/// without its own pid namespace, re-parented to us) land in the same table, so it is
/// cleared when it grows past this; a pid in setup is registered long before 1024 other
/// exits come by.
const MAX_EARLY: usize = 1024;

struct Table<T> {
    owners: HashMap<i32, T>,
    early: HashMap<i32, i32>,
}

/// pid -> owner (`T`: whatever finds the process record again), plus early exits. One lock
/// for both, so an exit cannot slip between `register`'s check and its insert.
pub struct ExitTable<T> {
    table: Mutex<Table<T>>,
}

impl<T> Default for ExitTable<T> {
    fn default() -> Self {
        ExitTable {
            table: Mutex::new(Table {
                owners: HashMap::new(),
                early: HashMap::new(),
            }),
        }
    }
}

impl<T> ExitTable<T> {
    fn lock(&self) -> MutexGuard<'_, Table<T>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `owner` for `pid`, unless the pid was reaped already: then its exit code is
    /// returned and nothing is recorded (the caller fails the setup with it).
    pub fn register(&self, pid: i32, owner: T) -> Option<i32> {
        let mut t = self.lock();
        if let Some(code) = t.early.remove(&pid) {
            return Some(code);
        }
        t.owners.insert(pid, owner);
        None
    }

    /// Forgets `pid` (its setup failed after `register`; it is being killed).
    pub fn unregister(&self, pid: i32) -> Option<T> {
        self.lock().owners.remove(&pid)
    }

    /// The reaper saw `pid` exit with `code`: returns its owner, or remembers the exit for a
    /// `register` still to come.
    pub fn exited(&self, pid: i32, code: i32) -> Option<T> {
        let mut t = self.lock();
        if let Some(owner) = t.owners.remove(&pid) {
            return Some(owner);
        }
        if t.early.len() > MAX_EARLY {
            t.early.clear();
        }
        t.early.insert(pid, code);
        None
    }
}

/// Reaps every child that has exited, without blocking (call it on SIGCHLD): `on_exit(pid,
/// code)` for each, with code 128 + signal for a child killed by a signal, as a shell reports it.
pub fn reap(mut on_exit: impl FnMut(i32, i32)) {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => on_exit(pid.as_raw(), code),
            Ok(WaitStatus::Signaled(pid, sig, _)) => on_exit(pid.as_raw(), 128 + sig as i32),
            Ok(WaitStatus::StillAlive) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_pid_finds_its_owner() {
        let t = ExitTable::default();
        assert_eq!(t.register(10, "init"), None);
        assert_eq!(t.exited(10, 3), Some("init"));
        // Reaped once: a second exit of the same pid number is someone else's.
        assert_eq!(t.exited(10, 0), None);
    }

    #[test]
    fn exit_before_register_is_handed_to_register() {
        let t = ExitTable::default();
        assert_eq!(t.exited(20, 137), None);
        assert_eq!(t.register(20, "exec"), Some(137));
        // Not recorded: the pid is gone.
        assert_eq!(t.unregister(20), None);
    }

    #[test]
    fn unregistered_pid_exit_is_early() {
        let t = ExitTable::default();
        assert_eq!(t.register(30, ()), None);
        assert_eq!(t.unregister(30), Some(()));
        assert_eq!(t.exited(30, 1), None);
    }

    #[test]
    fn early_exits_are_bounded() {
        let t = ExitTable::<()>::default();
        for pid in 0..(3 * MAX_EARLY as i32) {
            t.exited(pid, 0);
        }
        assert!(t.lock().early.len() <= MAX_EARLY + 1);
    }
}
