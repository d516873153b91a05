//! Guest-side mounts of a container's or the sandbox's storages (virtio-fs shares, bind
//! sources, the pod's /dev/shm).

use std::path::PathBuf;

use nix::mount::mount;

use crate::error::{AgentError, Result};

/// Mounts `storages` in order; on a failure, what was mounted is unmounted again.
pub fn mount_storages(id: &str, storages: &[protocols::agent::Storage]) -> Result<Vec<PathBuf>> {
    let mut mounted = Vec::new();
    for s in storages {
        let res = (|| {
            let (mp, fstype, flags) = crate::requests::storage_plan(s)?;
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
            })?;
            Ok(mp)
        })();
        match res {
            Ok(mp) => mounted.push(mp),
            Err(e) => {
                unmount_all(&mounted);
                return Err(e);
            }
        }
    }
    Ok(mounted)
}

/// Unmounts in reverse order, detached: a mount still in use goes once its last user does.
pub fn unmount_all(mounts: &[PathBuf]) {
    for m in mounts.iter().rev() {
        let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
    }
}
