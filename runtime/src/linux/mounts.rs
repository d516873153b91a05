//! Mount option parsing and helpers shared by the shim (rootfs from containerd's snapshot
//! mounts) and the container init (mounts from the spec).

use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::error::{Error, IoContext, Result};

/// Parsed mount options.
#[derive(Debug, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: MsFlags,
    /// Propagation changes applied after the mount (MS_PRIVATE, MS_SLAVE... | MS_REC).
    pub propagation: Vec<MsFlags>,
    /// Filesystem-specific options, passed as mount data.
    pub data: String,
    pub bind: bool,
    pub recursive: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            flags: MsFlags::empty(),
            propagation: Vec::new(),
            data: String::new(),
            bind: false,
            recursive: false,
        }
    }
}

/// OCI mount options this parser recognises but does not implement (they are dropped).
const NOT_IMPLEMENTED: &[&str] = &["tmpcopyup", "idmap", "ridmap"];

/// Whether `option` is one this runtime implements: the parser turns it into flags or a bind
/// (not filesystem data), and it is not one it only drops.
pub fn implements_option(option: &str) -> bool {
    let m = parse_options(&[option]);
    m.data.is_empty() && !NOT_IMPLEMENTED.contains(&option)
}

/// Splits an options list into mount flags, propagation flags and data, as mount(8) does.
pub fn parse_options<S: AsRef<str>>(opts: &[S]) -> MountOptions {
    let mut m = MountOptions::default();
    let mut data = Vec::new();
    for o in opts {
        let o = o.as_ref();
        let (clear, flag) = match o {
            "defaults" => (false, MsFlags::empty()),
            "ro" => (false, MsFlags::MS_RDONLY),
            "rw" => (true, MsFlags::MS_RDONLY),
            "nosuid" => (false, MsFlags::MS_NOSUID),
            "suid" => (true, MsFlags::MS_NOSUID),
            "nodev" => (false, MsFlags::MS_NODEV),
            "dev" => (true, MsFlags::MS_NODEV),
            "noexec" => (false, MsFlags::MS_NOEXEC),
            "exec" => (true, MsFlags::MS_NOEXEC),
            "sync" => (false, MsFlags::MS_SYNCHRONOUS),
            "async" => (true, MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (false, MsFlags::MS_DIRSYNC),
            "remount" => (false, MsFlags::MS_REMOUNT),
            "mand" => (false, MsFlags::MS_MANDLOCK),
            "nomand" => (true, MsFlags::MS_MANDLOCK),
            "noatime" => (false, MsFlags::MS_NOATIME),
            "atime" => (true, MsFlags::MS_NOATIME),
            "nodiratime" => (false, MsFlags::MS_NODIRATIME),
            "diratime" => (true, MsFlags::MS_NODIRATIME),
            "relatime" => (false, MsFlags::MS_RELATIME),
            "norelatime" => (true, MsFlags::MS_RELATIME),
            "strictatime" => (false, MsFlags::MS_STRICTATIME),
            "nostrictatime" => (true, MsFlags::MS_STRICTATIME),
            "bind" => {
                m.bind = true;
                continue;
            }
            "rbind" => {
                m.bind = true;
                m.recursive = true;
                continue;
            }
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable" => {
                let mut f = match o.trim_start_matches('r') {
                    "private" => MsFlags::MS_PRIVATE,
                    "shared" => MsFlags::MS_SHARED,
                    "slave" => MsFlags::MS_SLAVE,
                    _ => MsFlags::MS_UNBINDABLE,
                };
                if o.starts_with('r') {
                    f |= MsFlags::MS_REC;
                }
                m.propagation.push(f);
                continue;
            }
            // containerd/runc extensions that are not kernel options (not implemented; see
            // `implements_option`).
            o if NOT_IMPLEMENTED.contains(&o) => continue,
            other => {
                data.push(other.to_string());
                continue;
            }
        };
        if clear {
            m.flags.remove(flag);
        } else {
            m.flags.insert(flag);
        }
    }
    m.data = data.join(",");
    m
}

/// Joins `path` under `root` without letting `..` or symlinks escape it: every symlink met
/// is resolved relative to `root`, as runc's securejoin does.
pub fn secure_join(root: &Path, path: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    let mut pending: Vec<PathBuf> = path
        .components()
        .rev()
        .map(|c| PathBuf::from(c.as_os_str()))
        .collect();
    let mut links = 0;
    while let Some(c) = pending.pop() {
        match c.components().next() {
            None | Some(Component::RootDir) | Some(Component::CurDir) => continue,
            Some(Component::ParentDir) => {
                out.pop();
                continue;
            }
            _ => {}
        }
        let candidate = out.join(&c);
        let full = root.join(&candidate);
        match std::fs::symlink_metadata(&full) {
            Ok(md) if md.file_type().is_symlink() => {
                links += 1;
                if links > 255 {
                    return Err(Error::InvalidSpec(format!(
                        "too many symlinks resolving {}",
                        path.display()
                    )));
                }
                let target =
                    std::fs::read_link(&full).ctx(|| format!("readlink {}", full.display()))?;
                if target.is_absolute() {
                    out = PathBuf::new();
                }
                for t in target.components().rev() {
                    pending.push(PathBuf::from(t.as_os_str()));
                }
            }
            _ => out = candidate,
        }
    }
    Ok(root.join(out))
}

/// Mounts one of containerd's rootfs mounts (`type`, `source`, `options`) on `target`.
pub fn mount_rootfs_layer(
    typ: &str,
    source: &str,
    options: &[String],
    target: &Path,
) -> Result<()> {
    let o = parse_options(options);
    let mut flags = o.flags;
    if o.bind || typ == "bind" {
        flags |= MsFlags::MS_BIND;
        if o.recursive {
            flags |= MsFlags::MS_REC;
        }
    }
    let data = (!o.data.is_empty()).then_some(o.data.as_str());
    let fstype = (!typ.is_empty() && typ != "bind").then_some(typ);
    mount(Some(source), target, fstype, flags, data)
        .ctx(|| format!("mount {typ} {source} on {}", target.display()))?;
    if flags.contains(MsFlags::MS_BIND)
        && flags.intersects(
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        )
    {
        mount(
            None::<&str>,
            target,
            None::<&str>,
            flags | MsFlags::MS_REMOUNT,
            None::<&str>,
        )
        .ctx(|| format!("remount {}", target.display()))?;
    }
    for p in o.propagation {
        mount(None::<&str>, target, None::<&str>, p, None::<&str>)
            .ctx(|| format!("set propagation on {}", target.display()))?;
    }
    Ok(())
}

/// Unmounts everything mounted at or below `target`, deepest first. Idempotent.
pub fn unmount_all(target: &Path) -> Result<()> {
    let Ok(target) = std::fs::canonicalize(target) else {
        return Ok(());
    };
    let mi = std::fs::read_to_string("/proc/self/mountinfo").ctx(|| "read mountinfo".into())?;
    let mut points: Vec<PathBuf> = mi
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(&target))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    for p in points {
        // Overlay stacks may be mounted several times on one point: repeat until gone.
        for _ in 0..16 {
            match umount2(&p, MntFlags::MNT_DETACH) {
                Ok(()) => continue,
                Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => break,
                Err(e) => return Err(Error::sys(format!("unmount {}", p.display()), e)),
            }
        }
    }
    Ok(())
}

/// The mount that holds `path` (the last-mounted entry whose mount point is the longest prefix
/// of it) in mountinfo text, and whether that mount is shared (a `shared:N` optional field).
pub fn enclosing_mount(mountinfo: &str, path: &Path) -> Option<(PathBuf, bool)> {
    let mut best: Option<(PathBuf, bool)> = None;
    for line in mountinfo.lines() {
        let (head, _) = line.split_once(" - ").unwrap_or((line, ""));
        let fields: Vec<&str> = head.split_whitespace().collect();
        let Some(point) = fields.get(4).map(|p| PathBuf::from(unescape_mountinfo(p))) else {
            continue;
        };
        if !path.starts_with(&point) {
            continue;
        }
        let shared = fields.iter().skip(6).any(|f| f.starts_with("shared:"));
        // Later lines are mounted on top of earlier ones at the same point.
        if best
            .as_ref()
            .is_none_or(|(b, _)| point.components().count() >= b.components().count())
        {
            best = Some((point, shared));
        }
    }
    best
}

/// Makes the mount holding `path` private if it is shared, as runc does before binding the
/// rootfs: with a shared root propagation (rootfsPropagation rshared), that bind and every
/// mount made under the new root would otherwise propagate to the host's copy of it (and
/// pivot_root(2) refuses a new root whose parent mount is shared).
pub fn make_parent_private(path: &Path) -> Result<()> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").ctx(|| "read mountinfo".into())?;
    if let Some((point, true)) = enclosing_mount(&mi, path) {
        mount(
            None::<&str>,
            &point,
            None::<&str>,
            MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .ctx(|| format!("make {} private", point.display()))?;
    }
    Ok(())
}

fn unescape_mountinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v as char);
                i += 4;
                continue;
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_enclosing_mount_and_its_propagation() {
        let mi = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:40 / /run rw shared:5 - tmpfs tmpfs rw
31 30 0:41 / /run/c/b\\040x/rootfs rw - overlay overlay rw
32 30 0:42 / /run/c rw master:3 - tmpfs tmpfs rw
";
        let f = |p: &str| enclosing_mount(mi, Path::new(p));
        assert_eq!(
            f("/run/c/b x/rootfs"),
            Some((PathBuf::from("/run/c/b x/rootfs"), false))
        );
        assert_eq!(
            f("/run/c/b x/rootfs/etc"),
            Some((PathBuf::from("/run/c/b x/rootfs"), false))
        );
        assert_eq!(f("/run/c/other"), Some((PathBuf::from("/run/c"), false)));
        assert_eq!(f("/run/x"), Some((PathBuf::from("/run"), true)));
        assert_eq!(f("/var"), Some((PathBuf::from("/"), true)));
        // "/run" is not a prefix of "/runner".
        assert_eq!(f("/runner"), Some((PathBuf::from("/"), true)));
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let o = parse_options(&["nosuid", "noexec", "nodev", "mode=755", "size=65536k"]);
        assert_eq!(
            o.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV
        );
        assert_eq!(o.data, "mode=755,size=65536k");
        assert!(!o.bind);
        let o = parse_options(&["rbind", "ro", "rprivate"]);
        assert!(o.bind && o.recursive);
        assert_eq!(o.flags, MsFlags::MS_RDONLY);
        assert_eq!(o.propagation, vec![MsFlags::MS_PRIVATE | MsFlags::MS_REC]);
        let o = parse_options(&["ro", "rw"]);
        assert_eq!(o.flags, MsFlags::empty());
    }

    #[test]
    fn secure_join_stays_inside() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("link")).unwrap();
        std::os::unix::fs::symlink("../../..", root.join("up")).unwrap();
        assert_eq!(
            secure_join(root, Path::new("/a/b")).unwrap(),
            root.join("a/b")
        );
        assert_eq!(
            secure_join(root, Path::new("../../x")).unwrap(),
            root.join("x")
        );
        assert_eq!(
            secure_join(root, Path::new("/link/passwd")).unwrap(),
            root.join("etc/passwd")
        );
        assert_eq!(
            secure_join(root, Path::new("/up/etc")).unwrap(),
            root.join("etc")
        );
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
    }
}
