//! The pod's share: the host directory virtiofsd exports to the guest, holding one directory
//! per container with bind mounts of its rootfs and host binds (no copy).

use std::path::Path;

use super::spec::HostBind;
use crate::error::{Result, ShimError};

/// Makes a container's rootfs and host binds visible in the pod's share (blocking). Undone by
/// [`unshare_container`], also on failure here.
pub fn share_container(shared: &Path, id: &str, rootfs: &Path, binds: &[HostBind]) -> Result<()> {
    let res = (|| {
        let dir = shared.join(id);
        let root = dir.join("rootfs");
        mkdir(&root)?;
        bind(rootfs, &root, false)?;
        for b in binds {
            let meta = std::fs::metadata(&b.source).map_err(|e| {
                ShimError::InvalidArgument(format!(
                    "container {id}: bind mount source {}: {e}",
                    b.source.display()
                ))
            })?;
            let target = dir.join("mounts").join(&b.name);
            if meta.is_dir() {
                mkdir(&target)?;
            } else {
                mkdir(&dir.join("mounts"))?;
                std::fs::File::create(&target)
                    .map_err(|e| ShimError::failed(format!("create {}", target.display()), e))?;
            }
            bind(&b.source, &target, b.readonly)?;
        }
        Ok(())
    })();
    if res.is_err() {
        unshare_container(shared, id);
    }
    res
}

pub(super) fn mkdir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(|e| ShimError::failed(format!("create {}", p.display()), e))
}

/// A recursive bind, remounted read-only on the host too when asked (the guest's own ro bind
/// alone would leave the host file system writable to a guest that ignores it).
fn bind(src: &Path, dst: &Path, readonly: bool) -> Result<()> {
    use nix::mount::{mount, MsFlags};
    let flags = MsFlags::MS_BIND | MsFlags::MS_REC;
    mount(Some(src), dst, None::<&str>, flags, None::<&str>).map_err(|e| {
        ShimError::failed(format!("bind {} on {}", src.display(), dst.display()), e)
    })?;
    if readonly {
        mount(
            None::<&str>,
            dst,
            None::<&str>,
            flags | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|e| ShimError::failed(format!("remount {} ro", dst.display()), e))?;
    }
    Ok(())
}

/// Removes a container's part of the pod's share (blocking, idempotent).
pub fn unshare_container(shared: &Path, id: &str) {
    remove_share(&shared.join(id));
}

/// Unmounts everything under `dir`, then deletes it, but only once nothing is mounted there
/// any more: deleting through a live bind would delete the user's data.
pub(super) fn remove_share(dir: &Path) {
    if !dir.exists() {
        return;
    }
    if let Err(e) = runtime::linux::mounts::unmount_all(dir) {
        log::warn!("unmount {}: {e}", dir.display());
    }
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let busy = mi
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .any(|m| Path::new(m).starts_with(dir));
    if busy {
        log::warn!("{} still has mounts: left in place", dir.display());
        return;
    }
    let _ = std::fs::remove_dir_all(dir);
}
