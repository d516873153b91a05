//! A container's OOM kills, each reported once: a thread reports them as they happen, and
//! the init's exit claims any the thread has not got to yet, so the kill is reported before
//! the exit (CRI derives a container's OOMKilled reason from that order), and the cgroup may
//! be gone by the time the thread would look.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::linux::cgroups::{self, Cgroup};
use crate::linux::error::{Error, Result};

/// The watcher thread only reads cgroup files and calls `report`.
const STACK: usize = 64 * 1024;

/// A running OOM watch on one cgroup. Dropping it does not stop the thread: that ends when
/// the cgroup is removed.
#[derive(Debug, Clone)]
pub struct OomMonitor {
    cgroup: Cgroup,
    /// OOM kills already reported (by the thread or by `claim_unreported`).
    seen: Arc<AtomicU64>,
}

impl OomMonitor {
    /// Starts a thread that calls `report` on every new OOM kill in `cgroup`; `report` may
    /// block, and returns false to stop watching.
    pub fn start(
        cgroup: &Cgroup,
        mut report: impl FnMut() -> bool + Send + 'static,
    ) -> Result<OomMonitor> {
        let mut w = cgroup.oom_watcher()?;
        let seen = w.counter();
        std::thread::Builder::new()
            .name("oom".into())
            .stack_size(STACK)
            .spawn(move || {
                while w.wait() {
                    if !report() {
                        break;
                    }
                }
            })
            .map_err(|e| Error::io("start the OOM watcher thread", e))?;
        Ok(OomMonitor {
            cgroup: cgroup.clone(),
            seen,
        })
    }

    /// At the init's exit: true if the cgroup had OOM kills not reported yet, which the
    /// caller then reports with the exit (they count as reported from here on).
    pub fn claim_unreported(&self) -> bool {
        self.cgroup
            .oom_kill_count()
            .is_some_and(|k| cgroups::claim(&self.seen, k))
    }
}
