//! cgroups v1 and v2: create, apply resources, add processes, freeze, stats, OOM, destroy.
//!
//! The host here is v1 (hybrid, cgroupfs, no systemd); v2 runs in the VM guest. Both share
//! one interface so callers do not care which one the host has. Where systemd runs the host, a
//! systemd-form cgroupsPath is a transient scope ([`super::systemd`]) at the same directory.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType, LinuxResources};

use super::error::{Error, Result};
use super::systemd::{self, Unit};

const ROOT: &str = "/sys/fs/cgroup";

/// v1 controllers Janus manages (named hierarchies like name=systemd are left alone).
const V1_CONTROLLERS: &[&str] = &[
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "devices",
    "freezer",
    "blkio",
    "pids",
    "hugetlb",
    "net_cls",
    "net_prio",
    "perf_event",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    V1,
    V2,
}

/// Which cgroup version this host runs. Hybrid hosts (v1 controllers plus an empty
/// `unified` mount) count as v1.
pub fn host_mode() -> Mode {
    match nix::sys::statfs::statfs(ROOT) {
        Ok(s) if s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC => Mode::V2,
        _ => Mode::V1,
    }
}

/// Validates an OCI `cgroupsPath` and returns it relative to the hierarchy root.
pub fn normalize_path(path: &str, id: &str) -> Result<String> {
    if path.is_empty() {
        return Ok(format!("janus/{id}"));
    }
    if path.contains(':') && !path.starts_with('/') {
        return systemd_path(path);
    }
    let rel = path.trim_start_matches('/');
    if rel.split('/').any(|c| c == "..") {
        return Err(Error::InvalidSpec(format!(
            "linux.cgroupsPath {path:?} must not contain '..'"
        )));
    }
    if rel.is_empty() {
        return Err(Error::InvalidSpec(
            "linux.cgroupsPath must not be the root cgroup".into(),
        ));
    }
    Ok(rel.to_string())
}

/// A container's cgroup from its spec's `cgroupsPath`: a systemd scope where systemd runs the
/// host and the path has the systemd form, else a cgroupfs directory (the same one).
pub fn spec_cgroup(spec: &oci_spec::runtime::Spec, id: &str) -> Result<Cgroup> {
    let path = spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().as_ref())
        .map(|p| p.to_string_lossy().to_string())
        .unwrap_or_default();
    let rel = normalize_path(&path, id)?;
    let unit = Unit::from_cgroups_path(&path).filter(|_| systemd::booted());
    Ok(Cgroup::new(&rel)?.owned_by(unit))
}

/// The cgroupfs path systemd gives a `slice:prefix:name` cgroupsPath (the systemd cgroup
/// driver's form: kubelet with `cgroupDriver: systemd`, containerd's CRI whenever the pod's
/// cgroup parent is a `.slice`): the slice expanded into its nesting
/// (`kubepods-besteffort-pod1.slice` -> `kubepods.slice/kubepods-besteffort.slice/
/// kubepods-besteffort-pod1.slice`), then the unit `<prefix>-<name>.scope` (or `name` itself
/// when it is a slice). Janus drives cgroupfs itself: the container gets the directory
/// systemd would have made for the scope.
fn systemd_path(path: &str) -> Result<String> {
    let bad = |why: &str| {
        Err(Error::InvalidSpec(format!(
            "linux.cgroupsPath {path:?}: systemd form slice:prefix:name: {why}"
        )))
    };
    let mut parts = path.split(':');
    let (Some(slice), Some(prefix), Some(name), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return bad("three fields separated by ':'");
    };
    if name.is_empty() || name.contains('/') || prefix.contains('/') {
        return bad("the name must be a non-empty unit name without '/'");
    }
    let slice = if slice.is_empty() {
        "system.slice"
    } else {
        slice
    };
    let Some(stem) = slice.strip_suffix(".slice") else {
        return bad("the slice must end in .slice");
    };
    let mut dirs = Vec::new();
    // "-.slice" is the root slice: no directory of its own.
    if stem != "-" {
        if stem.is_empty() || stem.contains('/') || stem.split('-').any(|p| p.is_empty()) {
            return bad("not a valid slice name");
        }
        let mut acc = String::new();
        for p in stem.split('-') {
            if !acc.is_empty() {
                acc.push('-');
            }
            acc.push_str(p);
            dirs.push(format!("{acc}.slice"));
        }
    }
    dirs.push(match (name.ends_with(".slice"), prefix.is_empty()) {
        (true, _) => name.to_string(),
        (false, true) => format!("{name}.scope"),
        (false, false) => format!("{prefix}-{name}.scope"),
    });
    Ok(dirs.join("/"))
}

/// A container's cgroup.
#[derive(Debug, Clone)]
pub enum Cgroup {
    V1 {
        rel: String,
        /// controller -> directory of this cgroup in that controller's hierarchy
        dirs: BTreeMap<String, PathBuf>,
        /// The systemd scope that owns it, where systemd runs the host.
        unit: Option<Unit>,
    },
    V2 {
        rel: String,
        dir: PathBuf,
        unit: Option<Unit>,
    },
}

/// Resource usage in a version-neutral shape; the shim converts it to containerd's types.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub memory_usage: u64,
    pub memory_max_usage: u64,
    pub memory_limit: u64,
    pub memory_failcnt: u64,
    pub swap_usage: u64,
    pub swap_limit: u64,
    pub memory_stat: BTreeMap<String, u64>,
    pub cpu_usage_ns: u64,
    pub cpu_user_ns: u64,
    pub cpu_system_ns: u64,
    pub cpu_percpu_ns: Vec<u64>,
    pub cpu_nr_periods: u64,
    pub cpu_nr_throttled: u64,
    pub cpu_throttled_ns: u64,
    pub pids_current: u64,
    pub pids_limit: u64,
    /// (major, minor, op, value) from blkio / io.stat
    pub io_bytes: Vec<(u64, u64, String, u64)>,
    pub oom_kills: u64,
    pub memory_events: BTreeMap<String, u64>,
}

fn write(dir: &Path, file: &str, value: &str) -> Result<()> {
    let p = dir.join(file);
    fs::write(&p, value)
        .map_err(|e| Error::Cgroup(format!("write {value:?} to {}: {e}", p.display())))
}

fn read(dir: &Path, file: &str) -> Option<String> {
    fs::read_to_string(dir.join(file)).ok()
}

fn read_u64(dir: &Path, file: &str) -> u64 {
    read(dir, file)
        .and_then(|s| {
            let s = s.trim();
            if s == "max" {
                Some(u64::MAX)
            } else {
                s.parse().ok()
            }
        })
        .unwrap_or(0)
}

/// Parses `key value` lines (memory.stat, cpu.stat, memory.events...).
pub fn parse_kv(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

/// Finds v1 controller mount points from mountinfo text.
pub fn v1_mounts(mountinfo: &str) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let mut post = post.split_whitespace();
        if post.next() != Some("cgroup") {
            continue;
        }
        let _src = post.next();
        let opts = post.next().unwrap_or("");
        let Some(mp) = pre.split_whitespace().nth(4) else {
            continue;
        };
        for o in opts.split(',') {
            if V1_CONTROLLERS.contains(&o) {
                out.entry(o.to_string())
                    .or_insert_with(|| PathBuf::from(mp));
            }
        }
    }
    out
}

/// Converts cpu shares (v1, 2..262144) to cpu.weight (v2, 1..10000) as runc does.
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    1 + ((shares.saturating_sub(2)) * 9999) / 262142
}

/// Converts a v1 blkio weight (10..1000) to io.weight (1..10000).
pub fn blkio_to_io_weight(w: u16) -> u64 {
    if w == 0 {
        return 0;
    }
    1 + ((w as u64).saturating_sub(10)) * 9999 / 990
}

/// The device rules every container needs besides its spec's (runc's default allow list).
pub fn default_device_rules() -> Vec<String> {
    [
        "c *:* m",
        "b *:* m",
        "c 1:3 rwm",
        "c 1:5 rwm",
        "c 1:7 rwm",
        "c 1:8 rwm",
        "c 1:9 rwm",
        "c 5:0 rwm",
        "c 5:1 rwm",
        "c 5:2 rwm",
        "c 136:* rwm",
        "c 10:200 rwm",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Renders an OCI device cgroup rule as a v1 `devices.allow/deny` line.
pub fn device_rule(d: &LinuxDeviceCgroup) -> String {
    let t = match d.typ() {
        Some(LinuxDeviceType::C) => "c",
        Some(LinuxDeviceType::B) => "b",
        _ => "a",
    };
    let num = |n: Option<i64>| n.map(|v| v.to_string()).unwrap_or_else(|| "*".into());
    let access = d.access().clone().unwrap_or_else(|| "rwm".into());
    if t == "a" && d.major().is_none() && d.minor().is_none() {
        return format!("a *:* {access}");
    }
    format!("{t} {}:{} {access}", num(d.major()), num(d.minor()))
}

impl Cgroup {
    /// Resolves the cgroup for `cgroups_path` (already normalized) on this host.
    pub fn new(rel: &str) -> Result<Cgroup> {
        Self::new_with_mode(rel, host_mode())
    }

    pub fn new_with_mode(rel: &str, mode: Mode) -> Result<Cgroup> {
        match mode {
            Mode::V2 => Ok(Cgroup::V2 {
                rel: rel.to_string(),
                dir: Path::new(ROOT).join(rel),
                unit: None,
            }),
            Mode::V1 => {
                let mi = fs::read_to_string("/proc/self/mountinfo")
                    .map_err(|e| Error::Cgroup(format!("read mountinfo: {e}")))?;
                let dirs = v1_mounts(&mi)
                    .into_iter()
                    .map(|(c, mp)| (c, mp.join(rel)))
                    .collect::<BTreeMap<_, _>>();
                if dirs.is_empty() {
                    return Err(Error::Cgroup("no cgroup v1 controllers mounted".into()));
                }
                Ok(Cgroup::V1 {
                    rel: rel.to_string(),
                    dirs,
                    unit: None,
                })
            }
        }
    }

    /// This cgroup, as the systemd scope `unit` (if any).
    pub fn owned_by(mut self, owner: Option<Unit>) -> Cgroup {
        match &mut self {
            Cgroup::V1 { unit, .. } | Cgroup::V2 { unit, .. } => *unit = owner,
        }
        self
    }

    /// The systemd scope that owns this cgroup, if any.
    pub fn unit(&self) -> Option<&Unit> {
        match self {
            Cgroup::V1 { unit, .. } | Cgroup::V2 { unit, .. } => unit.as_ref(),
        }
    }

    /// A systemd scope that has not started yet: its directory comes with its first process
    /// ([`Cgroup::enter`]).
    fn scope_pending(&self) -> bool {
        self.unit().is_some() && !self.exists()
    }

    pub fn rel(&self) -> &str {
        match self {
            Cgroup::V1 { rel, .. } | Cgroup::V2 { rel, .. } => rel,
        }
    }

    pub fn mode(&self) -> Mode {
        match self {
            Cgroup::V1 { .. } => Mode::V1,
            Cgroup::V2 { .. } => Mode::V2,
        }
    }

    fn v1(&self, ctrl: &str) -> Option<&Path> {
        match self {
            Cgroup::V1 { dirs, .. } => dirs.get(ctrl).map(|p| p.as_path()),
            Cgroup::V2 { .. } => None,
        }
    }

    /// The directory used for process listing and membership.
    pub fn main_dir(&self) -> PathBuf {
        match self {
            Cgroup::V1 { dirs, .. } => dirs
                .get("memory")
                .or_else(|| dirs.get("pids"))
                .or_else(|| dirs.values().next())
                .cloned()
                .unwrap_or_default(),
            Cgroup::V2 { dir, .. } => dir.clone(),
        }
    }

    /// Host directories of this cgroup (for mounting into the container).
    pub fn dirs(&self) -> Vec<(String, PathBuf)> {
        match self {
            Cgroup::V1 { dirs, .. } => dirs.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Cgroup::V2 { dir, .. } => vec![(String::new(), dir.clone())],
        }
    }

    pub fn exists(&self) -> bool {
        self.main_dir().exists()
    }

    /// Creates the cgroup directories (and parents). A systemd scope is made by systemd with
    /// its first process instead ([`Cgroup::enter`]).
    pub fn create(&self) -> Result<()> {
        if self.unit().is_some() {
            return Ok(());
        }
        self.mkdirs()
    }

    fn mkdirs(&self) -> Result<()> {
        match self {
            Cgroup::V1 { dirs, .. } => {
                for (ctrl, dir) in dirs {
                    if ctrl == "cpuset" {
                        create_cpuset(dir)?;
                    } else {
                        fs::create_dir_all(dir)
                            .map_err(|e| Error::Cgroup(format!("create {}: {e}", dir.display())))?;
                    }
                }
                Ok(())
            }
            Cgroup::V2 { dir, rel, .. } => {
                // Enable every available controller down the path so limits can be set.
                let mut cur = PathBuf::from(ROOT);
                for comp in Path::new(rel).components() {
                    let avail = read(&cur, "cgroup.controllers").unwrap_or_default();
                    let enable: Vec<String> =
                        avail.split_whitespace().map(|c| format!("+{c}")).collect();
                    if !enable.is_empty() {
                        let _ = write(&cur, "cgroup.subtree_control", &enable.join(" "));
                    }
                    cur = cur.join(comp);
                    if !cur.exists() {
                        fs::create_dir(&cur)
                            .map_err(|e| Error::Cgroup(format!("create {}: {e}", cur.display())))?;
                    }
                }
                debug_assert_eq!(&cur, dir);
                Ok(())
            }
        }
    }

    /// Puts `pid` in this cgroup. A systemd scope that has not started starts now, with `pid`
    /// as its first process and `res` as its unit properties; on v1 the controllers systemd
    /// leaves alone (cpuset, devices, freezer...) then get their directories as on cgroupfs.
    pub fn enter(&self, pid: i32, res: Option<&LinuxResources>) -> Result<()> {
        if let (true, Some(unit)) = (self.scope_pending(), self.unit()) {
            let v2 = self.mode() == Mode::V2;
            let props = res
                .map(|r| systemd::resource_props(r, v2))
                .unwrap_or_default();
            systemd::start_scope(unit, pid as u32, &props, v2)?;
            if !v2 {
                self.mkdirs()?;
            }
        }
        self.add_proc(pid)
    }

    pub fn add_proc(&self, pid: i32) -> Result<()> {
        match self {
            Cgroup::V1 { dirs, .. } => {
                for dir in dirs.values() {
                    write(dir, "cgroup.procs", &pid.to_string())?;
                }
                Ok(())
            }
            Cgroup::V2 { dir, .. } => write(dir, "cgroup.procs", &pid.to_string()),
        }
    }

    /// Makes the process `cmd` starts begin its life in this cgroup (it writes itself into
    /// each `cgroup.procs` between fork and exec), so all it allocates is charged here from its
    /// first page. The cgroup must exist, except a systemd scope not started yet: then nothing
    /// happens here and the caller's [`Cgroup::enter`] with the new pid starts it.
    pub fn place_child(&self, cmd: &mut std::process::Command) -> Result<()> {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        if self.scope_pending() {
            return Ok(());
        }
        let files = self
            .dirs()
            .into_iter()
            .map(|(_, dir)| {
                let p = dir.join("cgroup.procs");
                fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .map_err(|e| Error::Cgroup(format!("open {}: {e}", p.display())))
            })
            .collect::<Result<Vec<fs::File>>>()?;
        // SAFETY: write(2) is async-signal-safe; the files are owned by the closure (so they
        // outlive the fork) and CLOEXEC, so the child does not inherit them past exec.
        unsafe {
            cmd.pre_exec(move || {
                for f in &files {
                    // "0": the writing process itself.
                    if libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        Ok(())
    }

    pub fn procs(&self) -> Result<Vec<i32>> {
        let dir = self.main_dir();
        let text = fs::read_to_string(dir.join("cgroup.procs"))
            .map_err(|e| Error::Cgroup(format!("read {}/cgroup.procs: {e}", dir.display())))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Applies resource limits. `update` skips what may only be set at creation (devices).
    pub fn apply(&self, res: &LinuxResources, update: bool) -> Result<()> {
        if let (true, Some(unit)) = (update, self.unit()) {
            // What systemd re-applies from its own properties must be the new values too.
            systemd::set_properties(unit, &systemd::resource_props(res, self.mode() == Mode::V2))?;
        }
        match self {
            Cgroup::V1 { .. } => self.apply_v1(res, update),
            Cgroup::V2 { dir, .. } => apply_v2(dir, res),
        }
    }

    fn apply_v1(&self, res: &LinuxResources, update: bool) -> Result<()> {
        if res.unified().as_ref().is_some_and(|u| !u.is_empty()) {
            return Err(Error::InvalidSpec(
                "linux.resources.unified needs cgroup v2; this host runs cgroup v1".into(),
            ));
        }
        if let (Some(mem), Some(dir)) = (res.memory(), self.v1("memory")) {
            let swap_supported = dir.join("memory.memsw.limit_in_bytes").exists();
            let limit = mem.limit();
            let swap = mem.swap();
            // Raising the limit must precede raising memsw and the reverse when lowering;
            // try both orders as runc does.
            let set_limit = |v: i64| write(dir, "memory.limit_in_bytes", &v.to_string());
            let set_swap = |v: i64| write(dir, "memory.memsw.limit_in_bytes", &v.to_string());
            match (limit, swap) {
                (Some(l), Some(s)) if swap_supported => {
                    if set_limit(l).is_err() {
                        set_swap(s)?;
                        set_limit(l)?;
                    } else {
                        set_swap(s)?;
                    }
                }
                (Some(l), _) => {
                    if let Err(e) = set_limit(l) {
                        // With memsw set lower than the new limit the write fails: lift it.
                        if swap_supported && set_swap(-1).is_ok() {
                            set_limit(l)?;
                        } else {
                            return Err(e);
                        }
                    }
                }
                (None, Some(s)) if swap_supported => set_swap(s)?,
                _ => {}
            }
            if let Some(r) = mem.reservation() {
                write(dir, "memory.soft_limit_in_bytes", &r.to_string())?;
            }
            if let Some(s) = mem.swappiness() {
                if s > 100 {
                    return Err(Error::InvalidSpec(format!(
                        "linux.resources.memory.swappiness {s} must be 0..100"
                    )));
                }
                write(dir, "memory.swappiness", &s.to_string())?;
            }
            if let Some(true) = mem.disable_oom_killer() {
                write(dir, "memory.oom_control", "1")?;
            }
        }
        if let Some(cpu) = res.cpu() {
            if let Some(dir) = self.v1("cpu") {
                if let Some(s) = cpu.shares() {
                    write(dir, "cpu.shares", &s.to_string())?;
                }
                if let Some(p) = cpu.period() {
                    write(dir, "cpu.cfs_period_us", &p.to_string())?;
                }
                if let Some(q) = cpu.quota() {
                    write(dir, "cpu.cfs_quota_us", &q.to_string())?;
                }
                if let Some(r) = cpu.realtime_period() {
                    write(dir, "cpu.rt_period_us", &r.to_string())?;
                }
                if let Some(r) = cpu.realtime_runtime() {
                    write(dir, "cpu.rt_runtime_us", &r.to_string())?;
                }
            }
            if let Some(dir) = self.v1("cpuset") {
                if let Some(c) = cpu.cpus().as_deref().filter(|c| !c.is_empty()) {
                    write(dir, "cpuset.cpus", c)?;
                }
                if let Some(m) = cpu.mems().as_deref().filter(|m| !m.is_empty()) {
                    write(dir, "cpuset.mems", m)?;
                }
            }
        }
        if let (Some(p), Some(dir)) = (res.pids(), self.v1("pids")) {
            let v = if p.limit() > 0 {
                p.limit().to_string()
            } else {
                "max".into()
            };
            write(dir, "pids.max", &v)?;
        }
        if let (Some(b), Some(dir)) = (res.block_io(), self.v1("blkio")) {
            if let Some(w) = b.weight() {
                // Some kernels (BFQ-less) lack blkio.weight; a weight is advisory.
                if dir.join("blkio.weight").exists() {
                    write(dir, "blkio.weight", &w.to_string())?;
                }
            }
        }
        if let (Some(h), Some(dir)) = (res.hugepage_limits(), self.v1("hugetlb")) {
            for l in h {
                write(
                    dir,
                    &format!("hugetlb.{}.limit_in_bytes", l.page_size()),
                    &l.limit().to_string(),
                )?;
            }
        }
        if let Some(n) = res.network() {
            if let (Some(id), Some(dir)) = (n.class_id(), self.v1("net_cls")) {
                write(dir, "net_cls.classid", &id.to_string())?;
            }
            if let (Some(prios), Some(dir)) = (n.priorities(), self.v1("net_prio")) {
                for p in prios {
                    write(
                        dir,
                        "net_prio.ifpriomap",
                        &format!("{} {}", p.name(), p.priority()),
                    )?;
                }
            }
        }
        if !update {
            if let Some(dir) = self.v1("devices") {
                write(dir, "devices.deny", "a")?;
                let mut rules: Vec<(bool, String)> = Vec::new();
                for d in res.devices().iter().flatten() {
                    rules.push((d.allow(), device_rule(d)));
                }
                rules.extend(default_device_rules().into_iter().map(|r| (true, r)));
                for (allow, rule) in rules {
                    if rule.starts_with("a ") && !allow {
                        // "deny all" is the starting point already.
                        continue;
                    }
                    let file = if allow {
                        "devices.allow"
                    } else {
                        "devices.deny"
                    };
                    write(dir, file, &rule)?;
                }
            }
        }
        Ok(())
    }

    pub fn freeze(&self) -> Result<()> {
        self.set_frozen(true)
    }

    pub fn thaw(&self) -> Result<()> {
        self.set_frozen(false)
    }

    fn set_frozen(&self, frozen: bool) -> Result<()> {
        match self {
            Cgroup::V1 { .. } => {
                let dir = self
                    .v1("freezer")
                    .ok_or_else(|| Error::Cgroup("freezer controller not mounted".into()))?;
                let want = if frozen { "FROZEN" } else { "THAWED" };
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    write(dir, "freezer.state", want)?;
                    if read(dir, "freezer.state")
                        .map(|s| s.trim() == want)
                        .unwrap_or(false)
                    {
                        return Ok(());
                    }
                    if Instant::now() > deadline {
                        return Err(Error::Cgroup(format!("freezer did not reach {want}")));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Cgroup::V2 { dir, .. } => {
                write(dir, "cgroup.freeze", if frozen { "1" } else { "0" })?;
                let want = if frozen { "frozen 1" } else { "frozen 0" };
                let deadline = Instant::now() + Duration::from_secs(10);
                while !read(dir, "cgroup.events")
                    .map(|s| s.lines().any(|l| l.trim() == want))
                    .unwrap_or(true)
                {
                    if Instant::now() > deadline {
                        return Err(Error::Cgroup(format!("cgroup.events did not show {want}")));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(())
            }
        }
    }

    pub fn is_frozen(&self) -> bool {
        match self {
            Cgroup::V1 { .. } => self
                .v1("freezer")
                .and_then(|d| read(d, "freezer.state"))
                .map(|s| s.trim() == "FROZEN")
                .unwrap_or(false),
            Cgroup::V2 { dir, .. } => read(dir, "cgroup.freeze")
                .map(|s| s.trim() == "1")
                .unwrap_or(false),
        }
    }

    /// Sends `sig` to every process in the cgroup. Frozen processes get the signal on thaw,
    /// so SIGKILL is delivered under a freeze to stop forks racing the kill.
    pub fn kill_all(&self, sig: i32) -> Result<()> {
        let freeze = sig == libc::SIGKILL && self.freeze().is_ok();
        for pid in self.procs().unwrap_or_default() {
            // A stale pid yields ESRCH: it is gone, which is what was asked.
            let _ = super::lifecycle::signal::send(pid, sig);
        }
        if freeze || self.is_frozen() && sig == libc::SIGKILL {
            let _ = self.thaw();
        }
        Ok(())
    }

    /// Kills what is left and removes the directories (and the systemd scope). Idempotent.
    pub fn destroy(&self) -> Result<()> {
        let r = self.remove();
        if let Some(unit) = self.unit() {
            // Empty, the scope stops by itself; this makes it certain (and forgets a failed one).
            if let Err(e) = systemd::stop(unit) {
                log::warn!("cgroup {}: {e}", self.rel());
            }
        }
        r
    }

    fn remove(&self) -> Result<()> {
        if !self.exists() {
            // Still clean other controllers' directories below.
            self.rmdirs();
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let procs = self.procs().unwrap_or_default();
            if procs.is_empty() {
                break;
            }
            let _ = self.kill_all(libc::SIGKILL);
            if Instant::now() > deadline {
                return Err(Error::Cgroup(format!(
                    "processes {procs:?} still in cgroup {} after SIGKILL",
                    self.rel()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.thaw();
        self.rmdirs();
        if self.exists() {
            return Err(Error::Cgroup(format!(
                "could not remove cgroup {}",
                self.rel()
            )));
        }
        Ok(())
    }

    fn rmdirs(&self) {
        for (_, dir) in self.dirs() {
            // Zombies may hold the cgroup for a moment after their kill is delivered.
            for _ in 0..200 {
                match fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }
    }

    pub fn stats(&self) -> Result<Stats> {
        let mut s = Stats::default();
        match self {
            Cgroup::V1 { .. } => {
                if let Some(d) = self.v1("memory") {
                    s.memory_usage = read_u64(d, "memory.usage_in_bytes");
                    s.memory_max_usage = read_u64(d, "memory.max_usage_in_bytes");
                    s.memory_limit = read_u64(d, "memory.limit_in_bytes");
                    s.memory_failcnt = read_u64(d, "memory.failcnt");
                    s.swap_usage = read_u64(d, "memory.memsw.usage_in_bytes");
                    s.swap_limit = read_u64(d, "memory.memsw.limit_in_bytes");
                    s.memory_stat = parse_kv(&read(d, "memory.stat").unwrap_or_default());
                    let oc = parse_kv(&read(d, "memory.oom_control").unwrap_or_default());
                    s.oom_kills = oc.get("oom_kill").copied().unwrap_or(0);
                }
                if let Some(d) = self.v1("cpuacct") {
                    s.cpu_usage_ns = read_u64(d, "cpuacct.usage");
                    s.cpu_percpu_ns = read(d, "cpuacct.usage_percpu")
                        .unwrap_or_default()
                        .split_whitespace()
                        .filter_map(|v| v.parse().ok())
                        .collect();
                    let st = parse_kv(&read(d, "cpuacct.stat").unwrap_or_default());
                    // cpuacct.stat is in USER_HZ ticks.
                    // SAFETY: sysconf has no memory effects.
                    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
                    s.cpu_user_ns = st.get("user").copied().unwrap_or(0) * 1_000_000_000 / hz;
                    s.cpu_system_ns = st.get("system").copied().unwrap_or(0) * 1_000_000_000 / hz;
                }
                if let Some(d) = self.v1("cpu") {
                    let st = parse_kv(&read(d, "cpu.stat").unwrap_or_default());
                    s.cpu_nr_periods = st.get("nr_periods").copied().unwrap_or(0);
                    s.cpu_nr_throttled = st.get("nr_throttled").copied().unwrap_or(0);
                    s.cpu_throttled_ns = st.get("throttled_time").copied().unwrap_or(0);
                }
                if let Some(d) = self.v1("pids") {
                    s.pids_current = read_u64(d, "pids.current");
                    s.pids_limit = read_u64(d, "pids.max");
                }
                if let Some(d) = self.v1("blkio") {
                    for l in read(d, "blkio.throttle.io_service_bytes_recursive")
                        .unwrap_or_default()
                        .lines()
                    {
                        let f: Vec<&str> = l.split_whitespace().collect();
                        if f.len() == 3 {
                            if let (Some((ma, mi)), Ok(v)) = (f[0].split_once(':'), f[2].parse()) {
                                if let (Ok(ma), Ok(mi)) = (ma.parse(), mi.parse()) {
                                    s.io_bytes.push((ma, mi, f[1].to_string(), v));
                                }
                            }
                        }
                    }
                }
            }
            Cgroup::V2 { dir, .. } => {
                let d = dir.as_path();
                s.memory_usage = read_u64(d, "memory.current");
                s.memory_max_usage = read_u64(d, "memory.peak");
                s.memory_limit = read_u64(d, "memory.max");
                s.swap_usage = read_u64(d, "memory.swap.current");
                s.swap_limit = read_u64(d, "memory.swap.max");
                s.memory_stat = parse_kv(&read(d, "memory.stat").unwrap_or_default());
                s.memory_events = parse_kv(&read(d, "memory.events").unwrap_or_default());
                s.oom_kills = s.memory_events.get("oom_kill").copied().unwrap_or(0);
                let st = parse_kv(&read(d, "cpu.stat").unwrap_or_default());
                s.cpu_usage_ns = st.get("usage_usec").copied().unwrap_or(0) * 1000;
                s.cpu_user_ns = st.get("user_usec").copied().unwrap_or(0) * 1000;
                s.cpu_system_ns = st.get("system_usec").copied().unwrap_or(0) * 1000;
                s.cpu_nr_periods = st.get("nr_periods").copied().unwrap_or(0);
                s.cpu_nr_throttled = st.get("nr_throttled").copied().unwrap_or(0);
                s.cpu_throttled_ns = st.get("throttled_usec").copied().unwrap_or(0) * 1000;
                s.pids_current = read_u64(d, "pids.current");
                s.pids_limit = read_u64(d, "pids.max");
                for l in read(d, "io.stat").unwrap_or_default().lines() {
                    let mut it = l.split_whitespace();
                    let Some((ma, mi)) = it.next().and_then(|x| x.split_once(':')) else {
                        continue;
                    };
                    let (Ok(ma), Ok(mi)) = (ma.parse(), mi.parse()) else {
                        continue;
                    };
                    for kv in it {
                        if let Some((k, v)) = kv.split_once('=') {
                            if let Ok(v) = v.parse() {
                                s.io_bytes.push((ma, mi, k.to_string(), v));
                            }
                        }
                    }
                }
            }
        }
        Ok(s)
    }

    /// The cgroup's OOM-kill counter, if the kernel keeps one.
    pub fn oom_kill_count(&self) -> Option<u64> {
        match self {
            Cgroup::V1 { .. } => {
                let d = self.v1("memory")?;
                parse_kv(&read(d, "memory.oom_control")?)
                    .get("oom_kill")
                    .copied()
            }
            Cgroup::V2 { dir, .. } => parse_kv(&read(dir, "memory.events")?)
                .get("oom_kill")
                .copied(),
        }
    }

    /// Starts watching for OOM kills. Returns a blocking watcher; each `wait()` returns when
    /// the cgroup saw a new OOM kill, `false` once the cgroup is gone.
    pub fn oom_watcher(&self) -> Result<OomWatcher> {
        match self {
            Cgroup::V1 { .. } => {
                let dir = self
                    .v1("memory")
                    .ok_or_else(|| Error::Cgroup("memory controller not mounted".into()))?
                    .to_path_buf();
                let oc = fs::File::open(dir.join("memory.oom_control"))
                    .map_err(|e| Error::Cgroup(format!("open memory.oom_control: {e}")))?;
                // SAFETY: eventfd(2) returns a new descriptor or -1.
                let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
                if efd < 0 {
                    return Err(Error::io("eventfd", io::Error::last_os_error()));
                }
                // SAFETY: efd was just created and is owned here.
                let efd = unsafe { OwnedFd::from_raw_fd(efd) };
                write(
                    &dir,
                    "cgroup.event_control",
                    &format!("{} {}", efd.as_raw_fd(), oc.as_raw_fd()),
                )?;
                Ok(OomWatcher::V1 {
                    efd,
                    _oc: oc,
                    dir,
                    seen: Arc::new(AtomicU64::new(0)),
                })
            }
            Cgroup::V2 { dir, .. } => Ok(OomWatcher::V2 {
                dir: dir.clone(),
                seen: Arc::new(AtomicU64::new(0)),
            }),
        }
    }
}

/// Blocking OOM watcher, run on its own thread by the shim.
///
/// `seen` is the count of OOM kills already reported. It is shared so that the exit path can
/// report a kill the watcher has not got to yet (the cgroup may be gone by then): whoever
/// raises it with `claim` reports the event, so each kill is reported once.
pub enum OomWatcher {
    V1 {
        efd: OwnedFd,
        _oc: fs::File,
        dir: PathBuf,
        seen: Arc<AtomicU64>,
    },
    V2 {
        dir: PathBuf,
        seen: Arc<AtomicU64>,
    },
}

/// Raises the reported count to `count`; true if that reports new kills.
pub fn claim(seen: &AtomicU64, count: u64) -> bool {
    seen.fetch_max(count, Ordering::SeqCst) < count
}

impl OomWatcher {
    pub fn counter(&self) -> Arc<AtomicU64> {
        match self {
            OomWatcher::V1 { seen, .. } | OomWatcher::V2 { seen, .. } => seen.clone(),
        }
    }

    /// Blocks until a new OOM kill (true) or until the cgroup is removed (false).
    pub fn wait(&mut self) -> bool {
        match self {
            OomWatcher::V1 { efd, dir, seen, .. } => loop {
                let mut buf = [0u8; 8];
                // SAFETY: efd is a valid eventfd; the view below borrows it for one read.
                let mut f =
                    unsafe { std::mem::ManuallyDrop::new(fs::File::from_raw_fd(efd.as_raw_fd())) };
                if f.read_exact(&mut buf).is_err() {
                    return false;
                }
                // The eventfd also fires when the cgroup is removed.
                if !dir.exists() {
                    return false;
                }
                let oc = parse_kv(&read(dir, "memory.oom_control").unwrap_or_default());
                let kills = oc.get("oom_kill").copied();
                match kills {
                    // Kernels without the counter: every notification is an OOM.
                    None => return true,
                    Some(k) if claim(seen, k) => return true,
                    _ => {}
                }
            },
            OomWatcher::V2 { dir, seen } => loop {
                // memory.events changes raise a file-modified notification; poll it with
                // inotify so that nothing is missed between reads.
                let events = match read(dir, "memory.events") {
                    Some(e) => parse_kv(&e),
                    None => return false,
                };
                let k = events.get("oom_kill").copied().unwrap_or(0);
                if claim(seen, k) {
                    return true;
                }
                if !wait_modified(&dir.join("memory.events")) {
                    return false;
                }
            },
        }
    }
}

fn wait_modified(path: &Path) -> bool {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let Ok(ino) = Inotify::init(InitFlags::IN_CLOEXEC) else {
        std::thread::sleep(Duration::from_millis(200));
        return path.exists();
    };
    if ino
        .add_watch(
            path,
            AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_DELETE_SELF,
        )
        .is_err()
    {
        return false;
    }
    match ino.read_events() {
        Ok(evs) => !evs.iter().any(|e| {
            e.mask.contains(AddWatchFlags::IN_IGNORED)
                || e.mask.contains(AddWatchFlags::IN_DELETE_SELF)
        }),
        Err(_) => false,
    }
}

fn apply_v2(dir: &Path, res: &LinuxResources) -> Result<()> {
    // linux.resources.unified: raw cgroup v2 files, applied last so they override.
    let unified = |dir: &Path| -> Result<()> {
        for (k, v) in res.unified().iter().flatten() {
            if k.contains('/') || k.starts_with('.') {
                return Err(Error::InvalidSpec(format!(
                    "linux.resources.unified: bad key {k:?}"
                )));
            }
            if !dir.join(k).exists() {
                return Err(Error::InvalidSpec(format!(
                    "linux.resources.unified: {k} does not exist in this cgroup (controller not enabled?)"
                )));
            }
            write(dir, k, v)?;
        }
        Ok(())
    };
    apply_v2_typed(dir, res)?;
    unified(dir)
}

fn apply_v2_typed(dir: &Path, res: &LinuxResources) -> Result<()> {
    if let Some(mem) = res.memory() {
        let fmt = |v: i64| {
            if v < 0 {
                "max".to_string()
            } else {
                v.to_string()
            }
        };
        if let Some(l) = mem.limit() {
            write(dir, "memory.max", &fmt(l))?;
        }
        if let Some(r) = mem.reservation() {
            write(dir, "memory.low", &fmt(r))?;
        }
        if let Some(s) = mem.swap() {
            // OCI swap is memory+swap; v2's swap.max is swap alone.
            let v = match (s, mem.limit()) {
                (s, _) if s < 0 => "max".to_string(),
                (s, Some(l)) if l >= 0 => (s - l).max(0).to_string(),
                (s, _) => s.to_string(),
            };
            if dir.join("memory.swap.max").exists() {
                write(dir, "memory.swap.max", &v)?;
            }
        }
        if let Some(true) = mem.disable_oom_killer() {
            return Err(Error::InvalidSpec(
                "linux.resources.memory.disableOOMKiller is not supported on cgroup v2".into(),
            ));
        }
    }
    if let Some(cpu) = res.cpu() {
        if let Some(s) = cpu.shares() {
            write(dir, "cpu.weight", &shares_to_weight(s).to_string())?;
        }
        if cpu.quota().is_some() || cpu.period().is_some() {
            let q = match cpu.quota() {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".into(),
            };
            let p = cpu.period().unwrap_or(100_000);
            write(dir, "cpu.max", &format!("{q} {p}"))?;
        }
        if let Some(c) = cpu.cpus().as_deref().filter(|c| !c.is_empty()) {
            write(dir, "cpuset.cpus", c)?;
        }
        if let Some(m) = cpu.mems().as_deref().filter(|m| !m.is_empty()) {
            write(dir, "cpuset.mems", m)?;
        }
    }
    if let Some(p) = res.pids() {
        let v = if p.limit() > 0 {
            p.limit().to_string()
        } else {
            "max".into()
        };
        write(dir, "pids.max", &v)?;
    }
    if let Some(w) = res.block_io().as_ref().and_then(|b| b.weight()) {
        if dir.join("io.weight").exists() {
            write(
                dir,
                "io.weight",
                &format!("default {}", blkio_to_io_weight(w)),
            )?;
        }
    }
    if let Some(h) = res.hugepage_limits() {
        for l in h {
            write(
                dir,
                &format!("hugetlb.{}.max", l.page_size()),
                &l.limit().to_string(),
            )?;
        }
    }
    Ok(())
}

/// A new cpuset cgroup starts with empty cpus/mems; copy them down from the first
/// ancestor that has them, or no task can join.
fn create_cpuset(dir: &Path) -> Result<()> {
    let mut missing = Vec::new();
    let mut cur = dir.to_path_buf();
    while !cur.exists() {
        missing.push(cur.clone());
        if !cur.pop() {
            break;
        }
    }
    for d in missing.into_iter().rev() {
        fs::create_dir(&d).or_else(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                Ok(())
            } else {
                Err(Error::Cgroup(format!("create {}: {e}", d.display())))
            }
        })?;
        let parent = d.parent().unwrap_or(Path::new("/"));
        for f in ["cpuset.cpus", "cpuset.mems"] {
            if read(&d, f).map(|s| s.trim().is_empty()).unwrap_or(true) {
                if let Some(v) = read(parent, f) {
                    write(&d, f, v.trim())?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::LinuxDeviceCgroupBuilder;

    #[test]
    fn normalize_paths() {
        assert_eq!(
            normalize_path("/default/abc", "abc").unwrap(),
            "default/abc"
        );
        assert_eq!(normalize_path("", "abc").unwrap(), "janus/abc");
        assert!(normalize_path("/a/../b", "x").is_err());
        // The systemd driver's form, expanded as systemd names the scope's directory.
        assert_eq!(
            normalize_path("kubepods-besteffort-pod12ab.slice:cri-containerd:c1", "c1").unwrap(),
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12ab.slice/\
             cri-containerd-c1.scope"
        );
        assert_eq!(
            normalize_path("system.slice:docker:abc", "x").unwrap(),
            "system.slice/docker-abc.scope"
        );
        assert_eq!(
            normalize_path(":cri:abc", "x").unwrap(),
            "system.slice/cri-abc.scope"
        );
        assert_eq!(normalize_path("-.slice::abc", "x").unwrap(), "abc.scope");
        assert_eq!(
            normalize_path("a-b.slice:p:c.slice", "x").unwrap(),
            "a.slice/a-b.slice/c.slice"
        );
        for bad in [
            "kubepods.slice:cri",
            "kubepods:cri:abc",
            "a--b.slice:cri:abc",
            "a.slice:cri:",
            "a.slice:cri:x/y",
            "a.slice:c:d:e",
        ] {
            assert!(normalize_path(bad, "x").is_err(), "{bad} accepted");
        }
        assert!(normalize_path("/", "x").is_err());
    }

    #[test]
    fn parses_mountinfo_controllers() {
        let mi = "30 25 0:26 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu\n\
                  31 25 0:27 / /sys/fs/cgroup/memory rw,relatime shared:10 - cgroup cgroup rw,memory\n\
                  32 25 0:28 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                  33 25 0:29 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n\
                  34 25 0:30 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        let m = v1_mounts(mi);
        assert_eq!(m["cpu"], PathBuf::from("/sys/fs/cgroup/cpu"));
        assert_eq!(m["cpuacct"], PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(m["memory"], PathBuf::from("/sys/fs/cgroup/memory"));
        assert!(!m.contains_key("name=systemd"));
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn v2_conversions() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262144), 10000);
        assert_eq!(blkio_to_io_weight(10), 1);
        assert_eq!(blkio_to_io_weight(1000), 10000);
    }

    #[test]
    fn device_rules_render() {
        let all = LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .access("rwm")
            .build()
            .unwrap();
        assert_eq!(device_rule(&all), "a *:* rwm");
        let one = LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .typ(LinuxDeviceType::C)
            .major(1)
            .minor(3)
            .access("rw")
            .build()
            .unwrap();
        assert_eq!(device_rule(&one), "c 1:3 rw");
        let wild = LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .typ(LinuxDeviceType::C)
            .major(136)
            .build()
            .unwrap();
        assert_eq!(device_rule(&wild), "c 136:* rwm");
    }

    #[test]
    fn oom_claims_once() {
        let seen = AtomicU64::new(0);
        assert!(claim(&seen, 1));
        assert!(!claim(&seen, 1));
        assert!(claim(&seen, 3));
        assert!(!claim(&seen, 2));
    }

    #[test]
    fn kv_parsing() {
        let m = parse_kv("low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n");
        assert_eq!(m["oom_kill"], 2);
        assert_eq!(m["max"], 3);
    }

    #[test]
    fn v2_apply_writes_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(d.join("memory.swap.max"), "").unwrap();
        let res: LinuxResources = serde_json::from_str(
            r#"{"memory":{"limit":1048576,"swap":2097152},"cpu":{"shares":1024,"quota":50000,"period":100000},"pids":{"limit":10}}"#,
        )
        .unwrap();
        apply_v2(d, &res).unwrap();
        assert_eq!(fs::read_to_string(d.join("memory.max")).unwrap(), "1048576");
        assert_eq!(
            fs::read_to_string(d.join("memory.swap.max")).unwrap(),
            "1048576"
        );
        assert_eq!(fs::read_to_string(d.join("cpu.weight")).unwrap(), "39");
        assert_eq!(
            fs::read_to_string(d.join("cpu.max")).unwrap(),
            "50000 100000"
        );
        assert_eq!(fs::read_to_string(d.join("pids.max")).unwrap(), "10");
    }

    #[test]
    fn v2_unified_overrides_and_checks_keys() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(d.join("memory.high"), "max").unwrap();
        let res: LinuxResources =
            serde_json::from_str(r#"{"unified":{"memory.high":"1048576"}}"#).unwrap();
        apply_v2(d, &res).unwrap();
        assert_eq!(
            fs::read_to_string(d.join("memory.high")).unwrap(),
            "1048576"
        );
        let bad: LinuxResources = serde_json::from_str(r#"{"unified":{"../escape":"1"}}"#).unwrap();
        assert!(apply_v2(d, &bad).is_err());
        let missing: LinuxResources =
            serde_json::from_str(r#"{"unified":{"io.max":"1"}}"#).unwrap();
        assert!(apply_v2(d, &missing).is_err());
    }

    #[test]
    fn v2_stats_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(d.join("memory.current"), "4096\n").unwrap();
        fs::write(d.join("memory.max"), "max\n").unwrap();
        fs::write(
            d.join("memory.events"),
            "low 0\nhigh 0\nmax 1\noom 1\noom_kill 1\n",
        )
        .unwrap();
        fs::write(
            d.join("cpu.stat"),
            "usage_usec 10\nuser_usec 6\nsystem_usec 4\n",
        )
        .unwrap();
        fs::write(d.join("pids.current"), "2\n").unwrap();
        let cg = Cgroup::V2 {
            rel: "x".into(),
            dir: d.to_path_buf(),
            unit: None,
        };
        let s = cg.stats().unwrap();
        assert_eq!(s.memory_usage, 4096);
        assert_eq!(s.memory_limit, u64::MAX);
        assert_eq!(s.oom_kills, 1);
        assert_eq!(s.cpu_usage_ns, 10_000);
        assert_eq!(s.pids_current, 2);
    }

    #[test]
    fn v2_oom_watcher_counts_kills() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        fs::write(d.join("memory.events"), "oom 1\noom_kill 1\n").unwrap();
        let mut w = OomWatcher::V2 {
            dir: d.clone(),
            seen: Arc::new(AtomicU64::new(0)),
        };
        assert!(w.wait());
        let d2 = d.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            fs::write(d2.join("memory.events"), "oom 2\noom_kill 2\n").unwrap();
        });
        assert!(w.wait());
        t.join().unwrap();
    }
}
