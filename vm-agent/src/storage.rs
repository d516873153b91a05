//! Guest-side mounts of a container's or the sandbox's storages (virtio-fs shares, bind
//! sources, the pod's /dev/shm).

use std::path::PathBuf;

use nix::mount::{mount, MsFlags};

use crate::error::{AgentError, Result};

/// Mounts `storages` in order; on a failure, what was mounted is unmounted again.
pub fn mount_storages(id: &str, storages: &[protocols::agent::Storage]) -> Result<Vec<PathBuf>> {
    let mut mounted = Vec::new();
    for s in storages {
        let mp = PathBuf::from(&s.mount_point);
        let res = (|| {
            if !mp.is_absolute() || s.mount_point.contains("..") {
                return Err(AgentError::InvalidArgument(format!(
                    "storage mount point {:?} must be an absolute guest path",
                    s.mount_point
                )));
            }
            let (fstype, flags) = match s.driver.as_str() {
                "virtiofs" => (Some("virtiofs"), MsFlags::empty()),
                "bind" => (None, MsFlags::MS_BIND),
                // The pod's /dev/shm.
                "tmpfs" => (Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV),
                other => {
                    return Err(AgentError::InvalidArgument(format!(
                        "storage driver {other:?} is not supported"
                    )))
                }
            };
            std::fs::create_dir_all(&mp)
                .map_err(|e| AgentError::Internal(format!("create {}: {e}", mp.display())))?;
            crate::log_line(&format!(
                "container {id}: mount {} {} on {}",
                s.driver,
                s.source,
                mp.display()
            ));
            let data = s.options.join(",");
            let data = (!data.is_empty()).then_some(data.as_str());
            mount(Some(s.source.as_str()), &mp, fstype, flags, data).map_err(|e| {
                AgentError::Internal(format!(
                    "mount {} {} on {}: {e}",
                    s.driver,
                    s.source,
                    mp.display()
                ))
            })
        })();
        if let Err(e) = res {
            unmount_all(&mounted);
            return Err(e);
        }
        mounted.push(mp);
    }
    Ok(mounted)
}

/// Unmounts in reverse order, detached: a mount still in use goes once its last user does.
pub fn unmount_all(mounts: &[PathBuf]) {
    for m in mounts.iter().rev() {
        let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
    }
}
