//! The VMM confines itself before running the guest: every vCPU thread, and then the main
//! thread, installs a seccomp filter (seccompiler) allowing only the system calls the run loop
//! makes (KVM_RUN and the other ioctls on its own fds, device IO on already open files, thread
//! exit, signals to kick vCPUs, timers).
//! Anything else kills the process: a guest that took over a device model cannot open files,
//! sockets or processes.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

use crate::error::{Error, Result};

/// What the run loop calls (vCPU threads and the main thread waiting for them).
const ALLOWED: &[libc::c_long] = &[
    // KVM_RUN, register access, irqfd writes.
    libc::SYS_ioctl,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    // Block devices.
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_lseek,
    // Memory (allocator, thread stacks).
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    // Synchronisation (threads are started before the filter is on).
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_getpid,
    libc::SYS_gettid,
    // vCPU kicks and signal handling.
    libc::SYS_tgkill,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    // Timing.
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    // The device event loop (epoll, with a timeout); the console takes one peer at a time.
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_accept4,
    libc::SYS_accept,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_nanosleep,
    // Ending a console peer that a newer one replaces.
    libc::SYS_shutdown,
    // vhost-user messages (virtio-fs) from the vCPU that sets DRIVER_OK, with fds attached.
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    // Teardown, and dup'ing an accepted console peer.
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

pub fn filter() -> Result<BpfProgram> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        ALLOWED.iter().map(|&n| (n, Vec::new())).collect();
    let f = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| Error::Config(format!("seccomp filter: {e}")))?;
    f.try_into()
        .map_err(|e: seccompiler::BackendError| Error::Config(format!("seccomp filter: {e}")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn filter_compiles() {
        let p = super::filter().unwrap();
        assert!(p.len() > super::ALLOWED.len());
    }
}
