//! Loading and checking an OCI runtime spec, and the namespace plan derived from it.

use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;
use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};
use serde::{Deserialize, Serialize};

use super::error::{Error, Result};

/// Reads `config.json` from a bundle.
pub fn load(bundle: &Path) -> Result<Spec> {
    let p = bundle.join("config.json");
    let text =
        std::fs::read_to_string(&p).map_err(|e| Error::io(format!("read {}", p.display()), e))?;
    parse(&text)
}

pub fn parse(text: &str) -> Result<Spec> {
    // from_slice, not from_str: the zygote decodes the spec (inside its SpawnRequest) with
    // from_slice, and each reader type gets its own copy of the whole (large) Spec decoder;
    // one copy means fewer code pages in the binary and resident in the shim.
    let spec: Spec = serde_json::from_slice(text.as_bytes())
        .map_err(|e| Error::InvalidSpec(format!("config.json: {e}")))?;
    validate(&spec)?;
    Ok(spec)
}

/// Host-independent checks; a spec failing them never produces a half-made container.
pub fn validate(spec: &Spec) -> Result<()> {
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| Error::InvalidSpec("process is missing".into()))?;
    validate_process(process, "process")?;
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| Error::InvalidSpec("root is missing".into()))?;
    if root.path().as_os_str().is_empty() {
        return Err(Error::InvalidSpec("root.path is empty".into()));
    }
    let linux = spec
        .linux()
        .as_ref()
        .ok_or_else(|| Error::InvalidSpec("linux is missing".into()))?;
    let plan = NsPlan::from_spec(spec)?;
    if !plan.has(LinuxNamespaceType::Mount) {
        return Err(Error::InvalidSpec(
            "linux.namespaces must contain a mount namespace".into(),
        ));
    }
    if plan.new_user()
        && (linux.uid_mappings().as_ref().is_none_or(|m| m.is_empty())
            || linux.gid_mappings().as_ref().is_none_or(|m| m.is_empty()))
    {
        {
            return Err(Error::InvalidSpec(
                "a new user namespace needs linux.uidMappings and linux.gidMappings".into(),
            ));
        }
    }
    for m in spec.mounts().iter().flatten() {
        if !m.destination().is_absolute() {
            return Err(Error::InvalidSpec(format!(
                "mounts: destination {:?} must be absolute",
                m.destination()
            )));
        }
        // An idmapped mount this runtime cannot make must fail, not run with the files'
        // host ownership (containerd 2.x checks `features` first; 1.x does not).
        let idmapped = m.uid_mappings().is_some()
            || m.gid_mappings().is_some()
            || m.options()
                .iter()
                .flatten()
                .any(|o| o == "idmap" || o == "ridmap");
        if idmapped {
            return Err(Error::InvalidSpec(format!(
                "mounts: {:?} asks for an idmapped mount, which Janus does not implement",
                m.destination()
            )));
        }
    }
    if let Some(sc) = linux.seccomp() {
        // Compile once here so a bad profile fails Create, not the container process.
        super::seccomp::build(sc)?;
    }
    if let Some(s) = linux.sysctl() {
        for k in s.keys() {
            if k.contains('/') || k.contains("..") {
                return Err(Error::InvalidSpec(format!("linux.sysctl: bad key {k:?}")));
            }
        }
    }
    Ok(())
}

pub fn validate_process(p: &Process, field: &str) -> Result<()> {
    if p.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(Error::InvalidSpec(format!(
            "{field}.args must not be empty"
        )));
    }
    if !p.cwd().is_absolute() {
        return Err(Error::InvalidSpec(format!(
            "{field}.cwd {:?} must be an absolute path",
            p.cwd()
        )));
    }
    if let Some(c) = p.capabilities() {
        super::caps::ProcessCaps::from_spec(c)?;
    }
    for r in p.rlimits().iter().flatten() {
        rlimit_resource(&rlimit_name(r.typ()))?;
        if r.soft() > r.hard() {
            return Err(Error::InvalidSpec(format!(
                "{field}.rlimits: soft limit of {} above its hard limit",
                rlimit_name(r.typ())
            )));
        }
    }
    Ok(())
}

pub fn rlimit_name(t: impl Serialize) -> String {
    serde_json::to_value(t)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

pub fn rlimit_resource(name: &str) -> Result<libc::__rlimit_resource_t> {
    Ok(match name {
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        other => {
            return Err(Error::InvalidSpec(format!(
                "process.rlimits: unknown type {other:?}"
            )))
        }
    })
}

/// Short name of a namespace type as in /proc/<pid>/ns/.
pub fn ns_proc_name(t: LinuxNamespaceType) -> &'static str {
    match t {
        LinuxNamespaceType::Mount => "mnt",
        LinuxNamespaceType::Cgroup => "cgroup",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::User => "user",
        LinuxNamespaceType::Pid => "pid",
        LinuxNamespaceType::Network => "net",
        LinuxNamespaceType::Time => "time",
    }
}

pub fn ns_flag(t: LinuxNamespaceType) -> CloneFlags {
    match t {
        LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
        LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
        LinuxNamespaceType::User => CloneFlags::CLONE_NEWUSER,
        LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
        LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
        // CLONE_NEWTIME shares CSIGNAL's bit space and is not in nix; unsupported below.
        LinuxNamespaceType::Time => CloneFlags::empty(),
    }
}

/// Which namespaces a container creates and which it joins by path.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NsPlan {
    pub new: Vec<LinuxNamespaceType>,
    pub join: Vec<(LinuxNamespaceType, PathBuf)>,
}

impl NsPlan {
    pub fn from_spec(spec: &Spec) -> Result<NsPlan> {
        let mut plan = NsPlan::default();
        let Some(linux) = spec.linux() else {
            return Ok(plan);
        };
        for ns in linux.namespaces().iter().flatten() {
            let t = ns.typ();
            if t == LinuxNamespaceType::Time {
                return Err(Error::InvalidSpec(
                    "linux.namespaces: time namespaces are not supported".into(),
                ));
            }
            if plan.has(t) {
                return Err(Error::InvalidSpec(format!(
                    "linux.namespaces: {} listed twice",
                    ns_proc_name(t)
                )));
            }
            match ns.path() {
                Some(p) if !p.as_os_str().is_empty() => plan.join.push((t, p.clone())),
                _ => plan.new.push(t),
            }
        }
        Ok(plan)
    }

    /// Every namespace the container has apart from the host's (new or joined): what an exec
    /// process enters through the container's init.
    pub fn types(&self) -> Vec<LinuxNamespaceType> {
        self.new
            .iter()
            .copied()
            .chain(self.join.iter().map(|(t, _)| *t))
            .collect()
    }

    pub fn has(&self, t: LinuxNamespaceType) -> bool {
        self.new.contains(&t) || self.join.iter().any(|(j, _)| *j == t)
    }

    pub fn new_user(&self) -> bool {
        self.new.contains(&LinuxNamespaceType::User)
    }

    pub fn new_pid(&self) -> bool {
        self.new.contains(&LinuxNamespaceType::Pid)
    }

    /// Namespaces created with clone(2) itself: user (so the others belong to it) and pid
    /// (only children enter a new pid namespace).
    pub fn clone_flags(&self) -> CloneFlags {
        let mut f = CloneFlags::empty();
        for t in [LinuxNamespaceType::User, LinuxNamespaceType::Pid] {
            if self.new.contains(&t) {
                f |= ns_flag(t);
            }
        }
        f
    }

    /// Namespaces the container process unshares after its cgroup is set up.
    pub fn unshare_flags(&self) -> CloneFlags {
        let mut f = CloneFlags::empty();
        for t in &self.new {
            if !matches!(t, LinuxNamespaceType::User | LinuxNamespaceType::Pid) {
                f |= ns_flag(*t);
            }
        }
        f
    }
}

/// Resolves the program like execvp(3), against the process environment's PATH.
pub fn find_executable(prog: &str, env: &[String]) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let is_exec = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if prog.contains('/') {
        let p = PathBuf::from(prog);
        if is_exec(&p) {
            return Ok(p);
        }
        return Err(Error::InvalidSpec(format!(
            "exec: {prog:?}: no such executable file"
        )));
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let c = Path::new(dir).join(prog);
        if is_exec(&c) {
            return Ok(c);
        }
    }
    Err(Error::InvalidSpec(format!(
        "exec: {prog:?}: executable file not found in $PATH"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"{
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs"},
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "network", "path": "/proc/1/ns/net"}]}
    }"#;

    #[test]
    fn minimal_spec_plan() {
        let s = parse(MIN).unwrap();
        let p = NsPlan::from_spec(&s).unwrap();
        assert!(p.new_pid());
        assert!(!p.new_user());
        assert_eq!(p.clone_flags(), CloneFlags::CLONE_NEWPID);
        assert_eq!(p.unshare_flags(), CloneFlags::CLONE_NEWNS);
        assert_eq!(p.join[0].0, LinuxNamespaceType::Network);
    }

    #[test]
    fn rejects_bad_specs() {
        assert!(matches!(parse("{"), Err(Error::InvalidSpec(_))));
        let no_args = MIN.replace(r#""args": ["sh"]"#, r#""args": []"#);
        assert!(parse(&no_args)
            .unwrap_err()
            .to_string()
            .contains("process.args"));
        let rel_cwd = MIN.replace(r#""cwd": "/""#, r#""cwd": "tmp""#);
        assert!(parse(&rel_cwd).unwrap_err().to_string().contains("cwd"));
        let no_mnt = MIN.replace(r#"{"type": "mount"}, "#, "");
        assert!(parse(&no_mnt)
            .unwrap_err()
            .to_string()
            .contains("mount namespace"));
        let user = MIN.replace(r#"{"type": "pid"}"#, r#"{"type": "pid"}, {"type": "user"}"#);
        assert!(parse(&user)
            .unwrap_err()
            .to_string()
            .contains("uidMappings"));
        let dup = MIN.replace(r#"{"type": "pid"}"#, r#"{"type": "pid"}, {"type": "pid"}"#);
        assert!(parse(&dup).unwrap_err().to_string().contains("twice"));
        let bad_cap = MIN.replace(
            r#""cwd": "/""#,
            r#""cwd": "/", "capabilities": {"bounding": ["CAP_NOPE"]}"#,
        );
        assert!(parse(&bad_cap).is_err());
        let idmap = MIN.replacen(
            "\"linux\"",
            r#""mounts": [{"destination": "/data", "type": "bind", "source": "/tmp", "options": ["rbind", "idmap"]}], "linux""#,
            1,
        );
        assert!(parse(&idmap).unwrap_err().to_string().contains("idmapped"));
    }

    #[test]
    fn executable_lookup() {
        let env = vec!["PATH=/nonexistent:/bin:/usr/bin".to_string()];
        assert!(find_executable("sh", &env).unwrap().ends_with("sh"));
        assert!(find_executable("definitely-not-here", &env).is_err());
        assert!(find_executable("/bin/sh", &[]).is_ok());
    }

    #[test]
    fn rlimit_names() {
        assert_eq!(
            rlimit_resource("RLIMIT_NOFILE").unwrap(),
            libc::RLIMIT_NOFILE
        );
        assert!(rlimit_resource("RLIMIT_FOO").is_err());
    }
}
