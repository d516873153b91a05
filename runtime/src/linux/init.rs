//! Runs inside the new container process (forked from the zygote's intermediate): finishes
//! namespace setup, builds the root filesystem, drops privileges and execs the process.
//! Every failure is reported to the shim over the sync channel before exiting.

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::unshare;
use nix::sys::stat::{mknod, Mode, SFlag};
use nix::unistd::{chdir, pivot_root, sethostname, Gid, Uid};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType, LinuxNamespaceType, Mount, Process, Spec};

use super::caps::ProcessCaps;
use super::error::{Error, IoContext, Result};
use super::mounts::{parse_options, secure_join};
use super::request::{SpawnKind, SpawnRequest};
use super::spec::{find_executable, ns_flag, rlimit_name, rlimit_resource, NsPlan};
use super::sync::{Channel, Msg};

fn fail(sync: &Channel, e: Error) -> ! {
    let _ = sync.send(&Msg::failure(&e), &[]);
    std::process::exit(1)
}

/// Waits for the shim's `Go` (cgroup joined, id maps written).
fn wait_go(sync: &Channel) {
    match sync.recv::<Msg>() {
        Ok(Some((Msg::Go, _))) => {}
        _ => std::process::exit(1),
    }
}

pub(crate) fn run_init(
    req: SpawnRequest,
    sync: &Channel,
    stdio: Vec<OwnedFd>,
    joins: Vec<(LinuxNamespaceType, OwnedFd)>,
    plan: NsPlan,
) -> ! {
    wait_go(sync);
    if let Err(e) = init(&req, sync, stdio, joins, &plan) {
        fail(sync, e)
    }
    unreachable!()
}

pub(crate) fn run_exec(req: SpawnRequest, sync: &Channel, stdio: Vec<OwnedFd>) -> ! {
    wait_go(sync);
    let r = (|| {
        setup_stdio(&req, sync, stdio, false)?;
        finish_and_exec(&req.process, req.seccomp.as_ref(), sync, &|| Ok(()))
    })();
    if let Err(e) = r {
        fail(sync, e)
    }
    unreachable!()
}

fn init(
    req: &SpawnRequest,
    sync: &Channel,
    stdio: Vec<OwnedFd>,
    joins: Vec<(LinuxNamespaceType, OwnedFd)>,
    plan: &NsPlan,
) -> Result<()> {
    let SpawnKind::Init {
        id,
        bundle,
        spec,
        rootfs,
        cgroup_dirs,
    } = &req.kind
    else {
        return Err(Error::Child("init called for an exec".into()));
    };
    if plan.new_user() {
        // The maps are written: become root of the new namespace.
        nix::unistd::setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0))
            .ctx(|| "setresgid 0 in user namespace".into())?;
        nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0))
            .ctx(|| "setresuid 0 in user namespace".into())?;
    }
    let order = [
        LinuxNamespaceType::Network,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Cgroup,
        LinuxNamespaceType::Mount,
    ];
    for t in order {
        for (jt, fd) in &joins {
            if *jt == t {
                nix::sched::setns(fd, ns_flag(t)).ctx(|| format!("join {t:?} namespace"))?;
            }
        }
    }
    drop(joins);
    unshare(plan.unshare_flags()).ctx(|| "unshare namespaces".into())?;

    let linux = spec.linux().as_ref();
    // /proc is still the host's here: this is our pid as the shim and hooks see it.
    let host_pid: i32 = fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_string_lossy().parse().ok())
        .unwrap_or(0);
    let state = |status: &str| {
        super::hooks::state_json(id, status, host_pid, bundle, spec.annotations().as_ref())
    };
    let hooks = spec.hooks().clone().unwrap_or_default();
    let before_pivot = || -> Result<()> {
        let runtime_hooks = hooks.prestart().as_ref().is_some_and(|h| !h.is_empty())
            || hooks
                .create_runtime()
                .as_ref()
                .is_some_and(|h| !h.is_empty());
        if runtime_hooks {
            sync.send(&Msg::Hooks, &[])?;
            match sync.recv::<Msg>()? {
                Some((Msg::Go, _)) => {}
                _ => std::process::exit(1),
            }
        }
        if let Some(h) = hooks.create_container() {
            super::hooks::run_all(h, &state("created"), "createContainer")?;
        }
        Ok(())
    };
    setup_rootfs(spec, rootfs, cgroup_dirs, plan, &before_pivot)?;

    if plan.new.contains(&LinuxNamespaceType::Uts) {
        if let Some(h) = spec.hostname().as_deref().filter(|h| !h.is_empty()) {
            sethostname(h).ctx(|| format!("sethostname {h:?}"))?;
        }
        if let Some(d) = spec.domainname().as_deref().filter(|d| !d.is_empty()) {
            // SAFETY: the pointer and length describe a live byte slice.
            if unsafe { libc::setdomainname(d.as_ptr().cast(), d.len()) } != 0 {
                return Err(Error::io("setdomainname", std::io::Error::last_os_error()));
            }
        }
    }
    if let Some(p) = linux.and_then(|l| l.personality().as_ref()) {
        let domain = match p.domain() {
            oci_spec::runtime::LinuxPersonalityDomain::PerLinux32 => 0x0008, // PER_LINUX32
            oci_spec::runtime::LinuxPersonalityDomain::PerLinux => 0x0000,
        };
        // SAFETY: personality(2) takes a plain integer.
        if unsafe { libc::personality(domain) } < 0 {
            return Err(Error::io("personality", std::io::Error::last_os_error()));
        }
    }
    setup_stdio(req, sync, stdio, true)?;
    let start_hooks = hooks.start_container().clone().unwrap_or_default();
    let st = state("running");
    finish_and_exec(&req.process, req.seccomp.as_ref(), sync, &|| {
        super::hooks::run_all(&start_hooks, &st, "startContainer")
    })
}

fn setup_rootfs(
    spec: &Spec,
    rootfs: &Path,
    cgroup_dirs: &[(String, PathBuf)],
    plan: &NsPlan,
    before_pivot: &dyn Fn() -> Result<()>,
) -> Result<()> {
    let linux = spec.linux().as_ref();
    let prop = linux
        .and_then(|l| l.rootfs_propagation().as_deref())
        .map(|p| parse_options(&[p]).propagation)
        .and_then(|v| v.first().copied());
    // The propagation the spec asks for (runc's order): by default a slave, so host mount
    // events reach us and ours never leak out; rshared keeps our copies of the host's shared
    // mounts peers of them, so a Bidirectional volume's mounts cross both ways. Only the
    // volumes do: the rootfs's parent mount is made private before the rootfs bind.
    let root_prop = prop.unwrap_or(MsFlags::MS_SLAVE | MsFlags::MS_REC);
    mount(None::<&str>, "/", None::<&str>, root_prop, None::<&str>)
        .ctx(|| "set / propagation".into())?;
    super::mounts::make_parent_private(rootfs)?;
    // pivot_root needs the new root to be a mount point.
    mount(
        Some(rootfs),
        rootfs,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .ctx(|| format!("bind rootfs {}", rootfs.display()))?;

    let mut dev_is_tmpfs = false;
    for m in spec.mounts().iter().flatten() {
        if m.destination() == Path::new("/dev") && m.typ().as_deref() != Some("bind") {
            dev_is_tmpfs = true;
        }
        mount_one(rootfs, m, cgroup_dirs, plan)?;
    }
    let dev = rootfs.join("dev");
    if dev_is_tmpfs {
        for d in default_devices() {
            create_device(&dev, &d, plan.new_user())?;
        }
        let links = [
            ("/proc/self/fd", "fd"),
            ("/proc/self/fd/0", "stdin"),
            ("/proc/self/fd/1", "stdout"),
            ("/proc/self/fd/2", "stderr"),
        ];
        for (target, name) in links {
            let _ = symlink(target, dev.join(name));
        }
        if Path::new("/proc/kcore").exists() {
            let _ = symlink("/proc/kcore", dev.join("core"));
        }
    }
    for d in linux
        .and_then(|l| l.devices().as_ref())
        .into_iter()
        .flatten()
    {
        let dst = secure_join(rootfs, d.path())?;
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent).ctx(|| format!("create {}", parent.display()))?;
        }
        create_device_at(&dst, d, plan.new_user())?;
    }
    // After the spec's devices (a privileged spec lists the host's /dev/ptmx): the
    // container's ptmx is its own devpts instance's.
    if dev.join("pts/ptmx").exists() {
        let ptmx = dev.join("ptmx");
        if fs::symlink_metadata(&ptmx).is_ok() {
            let _ = fs::remove_file(&ptmx);
        }
        let _ = symlink("pts/ptmx", &ptmx);
    }

    before_pivot()?;
    // pivot_root(".", ".") stacks the old root on top of the new one; unmounting "."
    // then drops it without needing a directory for it inside the rootfs.
    let newroot = fs::File::open(rootfs).ctx(|| format!("open {}", rootfs.display()))?;
    let oldroot = fs::File::open("/").ctx(|| "open /".into())?;
    nix::unistd::fchdir(&newroot).ctx(|| "fchdir rootfs".into())?;
    match pivot_root(".", ".") {
        Ok(()) => {
            nix::unistd::fchdir(&oldroot).ctx(|| "fchdir old root".into())?;
            mount(
                None::<&str>,
                ".",
                None::<&str>,
                MsFlags::MS_SLAVE | MsFlags::MS_REC,
                None::<&str>,
            )
            .ctx(|| "make old root a slave".into())?;
            umount2(".", MntFlags::MNT_DETACH).ctx(|| "unmount old root".into())?;
        }
        // The initial ramfs (a VM guest booted from its initramfs) cannot be pivoted away
        // from: move the new root over / and chroot into it instead, as runc's no-pivot
        // mode does. The VM is the isolation boundary there.
        Err(nix::errno::Errno::EINVAL) if is_initramfs_root() => {
            mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .ctx(|| "move rootfs over /".into())?;
            nix::unistd::chroot(".").ctx(|| "chroot".into())?;
        }
        Err(e) => return Err(Error::sys("pivot_root", e)),
    }
    chdir("/").ctx(|| "chdir /".into())?;
    drop((newroot, oldroot));

    if let Some(p) = prop {
        mount(None::<&str>, "/", None::<&str>, p, None::<&str>)
            .ctx(|| "set rootfs propagation".into())?;
    }
    // sysctls before readonlyPaths, which usually include /proc/sys.
    if let Some(sysctl) = linux.and_then(|l| l.sysctl().as_ref()) {
        for (k, v) in sysctl {
            let p = PathBuf::from("/proc/sys").join(k.replace('.', "/"));
            fs::write(&p, v)
                .map_err(|e| Error::InvalidSpec(format!("linux.sysctl {k}={v}: {e}")))?;
        }
    }
    if let Some(l) = linux {
        for p in l.masked_paths().iter().flatten() {
            mask_path(Path::new(p))?;
        }
        for p in l.readonly_paths().iter().flatten() {
            readonly_path(Path::new(p))?;
        }
    }
    if spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false)
    {
        remount_ro(Path::new("/"))?;
    }
    Ok(())
}

/// Whether / is the kernel's initial rootfs (ramfs/tmpfs), where pivot_root(2) says EINVAL.
fn is_initramfs_root() -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .map(|mi| {
            mi.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(4) == Some(&"/")
                    && l.split(" - ")
                        .nth(1)
                        .is_some_and(|t| t.starts_with("rootfs ") || t.starts_with("ramfs "))
            })
        })
        .unwrap_or(false)
}

fn mount_one(
    rootfs: &Path,
    m: &Mount,
    cgroup_dirs: &[(String, PathBuf)],
    plan: &NsPlan,
) -> Result<()> {
    let typ = m.typ().clone().unwrap_or_default();
    let opts = parse_options(m.options().as_deref().unwrap_or(&[]));
    let dest = secure_join(rootfs, m.destination())?;
    let bind = opts.bind || typ == "bind";
    let source = m.source().clone().unwrap_or_default();
    if bind {
        let md = fs::metadata(&source).map_err(|e| {
            Error::InvalidSpec(format!(
                "mounts: source {} of {}: {e}",
                source.display(),
                m.destination().display()
            ))
        })?;
        if md.is_dir() {
            fs::create_dir_all(&dest).ctx(|| format!("create {}", dest.display()))?;
        } else {
            if let Some(p) = dest.parent() {
                fs::create_dir_all(p).ctx(|| format!("create {}", p.display()))?;
            }
            if !dest.exists() {
                fs::File::create(&dest).ctx(|| format!("create {}", dest.display()))?;
            }
        }
        let mut flags = MsFlags::MS_BIND;
        if opts.recursive {
            flags |= MsFlags::MS_REC;
        }
        mount(Some(&source), &dest, None::<&str>, flags, None::<&str>)
            .ctx(|| format!("bind {} on {}", source.display(), m.destination().display()))?;
        if !opts.flags.is_empty() {
            let f = opts.flags | MsFlags::MS_BIND | MsFlags::MS_REMOUNT | statvfs_flags(&dest);
            mount(
                None::<&str>,
                &dest,
                None::<&str>,
                f & !locked_clear(opts.flags),
                None::<&str>,
            )
            .ctx(|| format!("remount {}", m.destination().display()))?;
        }
    } else {
        fs::create_dir_all(&dest).ctx(|| format!("create {}", dest.display()))?;
        if typ == "cgroup" || typ == "cgroup2" {
            mount_cgroup(&dest, &opts, cgroup_dirs, plan)?;
        } else {
            let data = (!opts.data.is_empty()).then_some(opts.data.as_str());
            let r = mount(Some(&source), &dest, Some(typ.as_str()), opts.flags, data);
            match r {
                // sysfs cannot be mounted without owning the network namespace: fall back
                // to the host's, read-only, as runc does.
                Err(nix::errno::Errno::EPERM) if typ == "sysfs" => {
                    mount(
                        Some("/sys"),
                        &dest,
                        None::<&str>,
                        MsFlags::MS_BIND | MsFlags::MS_REC,
                        None::<&str>,
                    )
                    .ctx(|| "bind /sys".into())?;
                    let _ = mount(
                        None::<&str>,
                        &dest,
                        None::<&str>,
                        MsFlags::MS_BIND
                            | MsFlags::MS_REMOUNT
                            | MsFlags::MS_RDONLY
                            | statvfs_flags(&dest),
                        None::<&str>,
                    );
                }
                r => r.ctx(|| format!("mount {typ} on {}", m.destination().display()))?,
            }
        }
    }
    for p in &opts.propagation {
        mount(None::<&str>, &dest, None::<&str>, *p, None::<&str>)
            .ctx(|| format!("propagation of {}", m.destination().display()))?;
    }
    Ok(())
}

/// Flags we may not clear on a bind remount (the kernel refuses EPERM otherwise).
fn locked_clear(_requested: MsFlags) -> MsFlags {
    MsFlags::empty()
}

fn statvfs_flags(p: &Path) -> MsFlags {
    use nix::sys::statvfs::{statvfs, FsFlags};
    let mut out = MsFlags::empty();
    if let Ok(s) = statvfs(p) {
        let f = s.flags();
        if f.contains(FsFlags::ST_NOSUID) {
            out |= MsFlags::MS_NOSUID;
        }
        if f.contains(FsFlags::ST_NODEV) {
            out |= MsFlags::MS_NODEV;
        }
        if f.contains(FsFlags::ST_NOEXEC) {
            out |= MsFlags::MS_NOEXEC;
        }
    }
    out
}

fn mount_cgroup(
    dest: &Path,
    opts: &super::mounts::MountOptions,
    cgroup_dirs: &[(String, PathBuf)],
    plan: &NsPlan,
) -> Result<()> {
    let ro = opts.flags.contains(MsFlags::MS_RDONLY);
    let base = opts.flags & !MsFlags::MS_RDONLY;
    let v2 = cgroup_dirs.len() == 1 && cgroup_dirs[0].0.is_empty();
    if v2 {
        if plan.new.contains(&LinuxNamespaceType::Cgroup) {
            mount(
                Some("cgroup2"),
                dest,
                Some("cgroup2"),
                opts.flags,
                None::<&str>,
            )
            .ctx(|| "mount cgroup2".into())?;
        } else if let Some((_, dir)) = cgroup_dirs.first() {
            mount(
                Some(dir),
                dest,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .ctx(|| "bind cgroup2".into())?;
            if ro {
                remount_ro(dest)?;
            }
        }
        return Ok(());
    }
    // v1: a tmpfs holding one bind mount per controller, each showing only this
    // container's cgroup.
    mount(Some("tmpfs"), dest, Some("tmpfs"), base, Some("mode=755"))
        .ctx(|| "mount cgroup tmpfs".into())?;
    for (ctrl, dir) in cgroup_dirs {
        let d = dest.join(ctrl);
        fs::create_dir_all(&d).ctx(|| format!("create {}", d.display()))?;
        mount(Some(dir), &d, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .ctx(|| format!("bind cgroup {ctrl}"))?;
        if ro {
            remount_ro(&d)?;
        }
    }
    if ro {
        remount_ro(dest)?;
    }
    Ok(())
}

fn remount_ro(p: &Path) -> Result<()> {
    mount(
        None::<&str>,
        p,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | statvfs_flags(p),
        None::<&str>,
    )
    .ctx(|| format!("remount {} read-only", p.display()))
}

fn mask_path(p: &Path) -> Result<()> {
    match fs::metadata(p) {
        Err(_) => Ok(()),
        Ok(md) if md.is_dir() => mount(
            Some("tmpfs"),
            p,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .ctx(|| format!("mask {}", p.display())),
        Ok(_) => match mount(
            Some("/dev/null"),
            p,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        ) {
            Err(nix::errno::Errno::ENOENT) => Ok(()),
            r => r.ctx(|| format!("mask {}", p.display())),
        },
    }
}

fn readonly_path(p: &Path) -> Result<()> {
    match mount(
        Some(p),
        p,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    ) {
        Err(nix::errno::Errno::ENOENT) => return Ok(()),
        r => r.ctx(|| format!("bind {}", p.display()))?,
    }
    remount_ro(p)
}

fn default_devices() -> Vec<LinuxDevice> {
    [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ]
    .iter()
    .map(|(n, ma, mi)| {
        serde_json::from_value(serde_json::json!({
            "path": format!("/dev/{n}"), "type": "c", "major": ma, "minor": mi,
            "fileMode": 0o666, "uid": 0, "gid": 0
        }))
        .expect("static device")
    })
    .collect()
}

fn create_device(dev: &Path, d: &LinuxDevice, userns: bool) -> Result<()> {
    let name = d.path().file_name().unwrap_or_default();
    create_device_at(&dev.join(name), d, userns)
}

fn create_device_at(dst: &Path, d: &LinuxDevice, userns: bool) -> Result<()> {
    if fs::symlink_metadata(dst).is_ok() {
        let _ = fs::remove_file(dst);
    }
    let kind = match d.typ() {
        LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
        LinuxDeviceType::B => SFlag::S_IFBLK,
        LinuxDeviceType::P => SFlag::S_IFIFO,
        LinuxDeviceType::A => {
            return Err(Error::InvalidSpec(format!(
                "linux.devices: {} has type 'a'",
                d.path().display()
            )))
        }
    };
    let mode = d.file_mode().unwrap_or(0o666);
    let devnum = nix::sys::stat::makedev(d.major() as u64, d.minor() as u64);
    let made = if userns {
        Err(nix::errno::Errno::EPERM)
    } else {
        mknod(dst, kind, Mode::from_bits_truncate(mode), devnum)
    };
    match made {
        Ok(()) => {
            // mknod applies the umask; set the exact mode.
            let _ = fs::set_permissions(dst, fs::Permissions::from_mode(mode));
            let _ = nix::unistd::chown(dst, d.uid().map(Uid::from_raw), d.gid().map(Gid::from_raw));
            Ok(())
        }
        // Already there (e.g. listed twice, or a node the rootfs ships): keep it, as runc does.
        Err(nix::errno::Errno::EEXIST) => Ok(()),
        Err(nix::errno::Errno::EPERM) => {
            // In a user namespace mknod is refused: bind the host's node instead.
            fs::File::create(dst).ctx(|| format!("create {}", dst.display()))?;
            mount(
                Some(d.path()),
                dst,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .ctx(|| format!("bind device {}", d.path().display()))
        }
        Err(e) => Err(Error::sys(format!("mknod {}", dst.display()), e)),
    }
}

fn dup_to(fd: RawFd, target: RawFd) -> Result<()> {
    // SAFETY: dup2 on descriptors we own; the target is replaced atomically.
    if unsafe { libc::dup2(fd, target) } < 0 {
        return Err(Error::io("dup2", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn setup_stdio(
    req: &SpawnRequest,
    sync: &Channel,
    stdio: Vec<OwnedFd>,
    is_init: bool,
) -> Result<()> {
    if req.terminal {
        let master = nix::pty::posix_openpt(
            nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_NOCTTY | nix::fcntl::OFlag::O_CLOEXEC,
        )
        .ctx(|| "open /dev/ptmx".into())?;
        nix::pty::grantpt(&master).ctx(|| "grantpt".into())?;
        nix::pty::unlockpt(&master).ctx(|| "unlockpt".into())?;
        let name = nix::pty::ptsname_r(&master).ctx(|| "ptsname".into())?;
        let slave = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&name)
            .ctx(|| format!("open {name}"))?;
        if let Some(u) = req.process.user().uid().into() {
            let _ = nix::unistd::chown(name.as_str(), Some(Uid::from_raw(u)), None);
        }
        sync.send(&Msg::Pty, &[master.as_raw_fd()])?;
        drop(master);
        nix::unistd::setsid().ctx(|| "setsid".into())?;
        // SAFETY: TIOCSCTTY takes an int argument; the fd is our open pty slave.
        if unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) } < 0 {
            return Err(Error::io(
                "set controlling terminal",
                std::io::Error::last_os_error(),
            ));
        }
        for t in 0..3 {
            dup_to(slave.as_raw_fd(), t)?;
        }
        if let Some(ws) = req.process.console_size() {
            let w = libc::winsize {
                ws_row: ws.height() as u16,
                ws_col: ws.width() as u16,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCSWINSZ reads a winsize struct we own.
            unsafe { libc::ioctl(0, libc::TIOCSWINSZ, &w) };
        }
    } else {
        if stdio.len() != 3 {
            return Err(Error::Child(format!(
                "expected 3 stdio fds, got {}",
                stdio.len()
            )));
        }
        for (i, fd) in stdio.iter().enumerate() {
            dup_to(fd.as_raw_fd(), i as RawFd)?;
        }
        if is_init {
            nix::unistd::setsid().ctx(|| "setsid".into())?;
        }
    }
    Ok(())
}

/// Process attributes, then wait for Start and exec.
fn finish_and_exec(
    p: &Process,
    seccomp: Option<&oci_spec::runtime::LinuxSeccomp>,
    sync: &Channel,
    after_start: &dyn Fn() -> Result<()>,
) -> Result<()> {
    let nnp = p.no_new_privileges().unwrap_or(false);
    for r in p.rlimits().iter().flatten() {
        let res = rlimit_resource(&rlimit_name(r.typ()))?;
        let lim = libc::rlimit {
            rlim_cur: r.soft(),
            rlim_max: r.hard(),
        };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(res, &lim) } != 0 {
            return Err(Error::io(
                format!("setrlimit {}", rlimit_name(r.typ())),
                std::io::Error::last_os_error(),
            ));
        }
    }
    if let Some(score) = p.oom_score_adj() {
        // Lowering the score needs CAP_SYS_RESOURCE, which some hosts withhold: tolerated.
        let _ = fs::write("/proc/self/oom_score_adj", score.to_string());
    }
    let user = p.user();
    if let Some(m) = user.umask() {
        // SAFETY: umask only changes this process's mask.
        unsafe { libc::umask(m as libc::mode_t) };
    }
    let caps = match p.capabilities() {
        Some(c) => Some(ProcessCaps::from_spec(c)?),
        None => None,
    };
    // Without no_new_privs, installing a filter needs CAP_SYS_ADMIN: do it while we still
    // have it (as runc does); the few syscalls left before exec are in any sane profile.
    if let (Some(sc), false) = (seccomp, nnp) {
        super::seccomp::load(sc)?;
    }
    if let Some(c) = &caps {
        c.apply_bounding()?;
    }
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
    let groups: Vec<Gid> = user
        .additional_gids()
        .iter()
        .flatten()
        .map(|g| Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&groups).ctx(|| "setgroups".into())?;
    let gid = Gid::from_raw(user.gid());
    nix::unistd::setresgid(gid, gid, gid).ctx(|| format!("setgid {}", user.gid()))?;
    let uid = Uid::from_raw(user.uid());
    nix::unistd::setresuid(uid, uid, uid).ctx(|| format!("setuid {}", user.uid()))?;
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
    match &caps {
        Some(c) => c.apply()?,
        None => {
            if user.uid() != 0 {
                let _ = caps::clear(None, caps::CapSet::Effective);
                let _ = caps::clear(None, caps::CapSet::Permitted);
            }
        }
    }
    if nnp {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(Error::io("no_new_privs", std::io::Error::last_os_error()));
        }
    }
    chdir(p.cwd())
        .map_err(|e| Error::InvalidSpec(format!("process.cwd {}: {e}", p.cwd().display())))?;

    let env: Vec<String> = p.env().clone().unwrap_or_default();
    let args: Vec<String> = p.args().clone().unwrap_or_default();
    let prog = find_executable(&args[0], &env)?;
    let cstr =
        |s: &str| CString::new(s).map_err(|_| Error::InvalidSpec(format!("NUL byte in {s:?}")));
    let c_prog = cstr(&prog.to_string_lossy())?;
    let c_args = args.iter().map(|a| cstr(a)).collect::<Result<Vec<_>>>()?;
    let c_env = env.iter().map(|e| cstr(e)).collect::<Result<Vec<_>>>()?;

    sync.send(&Msg::Ready, &[])?;
    match sync.recv::<Msg>() {
        Ok(Some((Msg::Start, _))) => {}
        _ => std::process::exit(1),
    }
    after_start()?;
    // Everything but stdio closes on exec, the sync channel too: its EOF tells the shim
    // that exec succeeded.
    // SAFETY: close_range only marks descriptors close-on-exec.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    // SIGPIPE and friends were set up by the shim's runtime: give the process defaults.
    reset_signals();
    if let (Some(sc), true) = (seccomp, nnp) {
        // Last, so that only execve runs under the filter.
        super::seccomp::load(sc)?;
    }
    let e = nix::unistd::execve(&c_prog, &c_args, &c_env).unwrap_err();
    Err(Error::InvalidSpec(format!("exec {}: {e}", prog.display())))
}

fn reset_signals() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for s in Signal::iterator() {
        if s == Signal::SIGKILL || s == Signal::SIGSTOP {
            continue;
        }
        // SAFETY: installing SIG_DFL is always sound.
        let _ = unsafe { sigaction(s, &dfl) };
    }
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&SigSet::empty()),
        None,
    );
}
