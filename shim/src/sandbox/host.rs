//! What both sandboxes do on the host for a container: its rootfs (containerd's snapshot,
//! mounted where the spec's root says); blocking work goes through `runtime::aio::blocking`.

use std::path::{Path, PathBuf};

use containerd_shim_protos::api::CreateTaskRequest;
use oci_spec::runtime::Spec;
use runtime::linux::mounts;

use crate::error::Result;
pub use runtime::aio::blocking;

/// The spec's root, absolute (relative roots are in the bundle).
pub fn rootfs_path(spec: &Spec, bundle: &Path) -> PathBuf {
    let root = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .unwrap_or_default();
    if root.is_absolute() {
        root
    } else {
        bundle.join(root)
    }
}

/// Mounts containerd's snapshot layers on `rootfs` (blocking); undone on failure. Returns
/// whether anything was mounted.
pub fn mount_rootfs(req: &CreateTaskRequest, rootfs: &Path) -> Result<bool> {
    let mut mounted = false;
    for m in &req.rootfs {
        if let Err(e) = mounts::mount_rootfs_layer(&m.type_, &m.source, &m.options, rootfs) {
            if mounted {
                let _ = mounts::unmount_all(rootfs);
            }
            return Err(e.into());
        }
        mounted = true;
    }
    Ok(mounted)
}
