//! The host's view of what a test left behind: processes, mounts and cgroups.

use super::*;

/// Does `hay` contain `id` delimited by characters that can't be part of an id?
pub fn contains_token(hay: &str, id: &str) -> bool {
    let is_id = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
    let mut start = 0;
    while let Some(i) = hay[start..].find(id) {
        let a = start + i;
        let b = a + id.len();
        let before = hay[..a].chars().next_back();
        let after = hay[b..].chars().next();
        if !before.is_some_and(is_id) && !after.is_some_and(is_id) {
            return true;
        }
        start = a + 1;
    }
    false
}

pub(crate) fn contains_token_path(hay: &str, path: &str) -> bool {
    hay.split([' ', '=']).any(|t| {
        t == path || t.strip_prefix("unix://") == Some(path) || t.starts_with(&format!("{path}/"))
    })
}

pub(crate) fn unescape_mountinfo(s: &str) -> PathBuf {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(String::from_utf8_lossy(&out).into_owned())
}

/// A process seen in /proc.
#[derive(Debug, Clone)]
pub struct ProcInfo {
    pub pid: u32,
    /// Arguments joined with spaces.
    pub cmdline: String,
    pub cwd: Option<PathBuf>,
    pub root: Option<PathBuf>,
    /// Contents of /proc/PID/cgroup (host view: the test runs in the root cgroup namespace).
    pub cgroup: String,
}

/// All processes (kernel threads have an empty cmdline).
pub fn processes() -> Vec<ProcInfo> {
    let mut v = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return v;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let p = e.path();
        let Ok(raw) = fs::read(p.join("cmdline")) else {
            continue;
        };
        let cmdline = raw
            .split(|&b| b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        v.push(ProcInfo {
            pid,
            cmdline,
            cwd: fs::read_link(p.join("cwd")).ok(),
            root: fs::read_link(p.join("root")).ok(),
            cgroup: fs::read_to_string(p.join("cgroup")).unwrap_or_default(),
        });
    }
    v
}

/// Directories under /sys/fs/cgroup (any controller, any depth up to 8) named `id` or containing
/// it as a token (e.g. `janus-<id>`, `<id>.scope`).
pub fn find_cgroups(id: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, id: &str, depth: usize, out: &mut Vec<PathBuf>) {
        if depth > 8 {
            return;
        }
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if !ft.is_dir() {
                continue;
            }
            let name = e.file_name();
            let name = name.to_string_lossy();
            if contains_token(&name, id) {
                out.push(e.path());
            }
            walk(&e.path(), id, depth + 1, out);
        }
    }
    let mut out = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), id, 0, &mut out);
    out
}

pub(crate) fn rmdir_tree(p: &Path) {
    if let Ok(rd) = fs::read_dir(p) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(p);
}

/// The host path of the cgroup (v1 controller `controller`, or the v2 unified hierarchy when
/// `controller` is empty) of process `pid`.
pub fn cgroup_dir(pid: u32, controller: &str) -> Result<PathBuf> {
    cgroup_dir_of(&Path::new("/proc").join(pid.to_string()), controller)
}

/// [`cgroup_dir`] of the process whose /proc directory is `proc` (e.g. one seen through another
/// pid namespace's /proc: the paths are still the host's, as this process reads them).
pub fn cgroup_dir_of(proc: &Path, controller: &str) -> Result<PathBuf> {
    let pid = proc.display();
    let s =
        fs::read_to_string(proc.join("cgroup")).with_context(|| format!("reading {pid}/cgroup"))?;
    for l in s.lines() {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        let hit = if controller.is_empty() {
            ctrls.is_empty()
        } else {
            ctrls.split(',').any(|c| c == controller)
        };
        if hit {
            let base = if controller.is_empty() {
                let unified = Path::new("/sys/fs/cgroup/unified");
                if unified.is_dir() {
                    unified.to_path_buf()
                } else {
                    PathBuf::from("/sys/fs/cgroup")
                }
            } else {
                Path::new("/sys/fs/cgroup").join(ctrls)
            };
            return Ok(base.join(path.trim_start_matches('/')));
        }
    }
    bail!("no {controller:?} cgroup for {pid} in:\n{s}")
}

/// Is the host on cgroup v2 only (unified at /sys/fs/cgroup)?
pub fn cgroup_v2_only() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}
