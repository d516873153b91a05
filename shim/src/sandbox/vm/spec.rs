//! The container's spec as the guest runs it, what a VM cannot give a spec, and the VM's
//! size for a pod.

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

use crate::error::{Result, ShimError};

/// Where the agent mounts the pod's share in the guest: one directory per container, with its
/// rootfs and host binds.
pub const GUEST_SHARED: &str = "/run/janus/shared";
/// The pod's /dev/shm in the guest: a tmpfs made at sandbox creation, bound into every
/// container that CRI gives a /dev/shm bind.
pub const GUEST_SHM: &str = "/run/janus/shm";

/// A host path the guest sees through the pod's share: bind-mounted at
/// `<shared>/<container>/mounts/<name>` on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostBind {
    pub source: PathBuf,
    pub name: String,
    pub readonly: bool,
}

/// Where one of a container's host binds appears in the guest.
fn guest_bind_path(id: &str, name: &str) -> String {
    format!("{GUEST_SHARED}/{id}/mounts/{name}")
}

/// The container's root in the guest (its snapshot, bind-mounted into the pod's share).
pub fn guest_root(id: &str) -> String {
    format!("{GUEST_SHARED}/{id}/rootfs")
}

/// The namespace file name under /proc/<pid>/ns for an OCI namespace type.
fn ns_file(typ: &str) -> Option<&'static str> {
    Some(match typ {
        "network" => "net",
        "ipc" => "ipc",
        "uts" => "uts",
        "pid" => "pid",
        "mount" => "mnt",
        "cgroup" => "cgroup",
        "user" => "user",
        _ => return None,
    })
}

/// The pod a container joins in the guest: the sandbox container's guest pid and every pid
/// containerd knows for the pod's containers (containerd only ever saw guest pids, so
/// `/proc/<pid>/ns/...` paths naming them are guest paths already).
#[derive(Debug, Default, Clone)]
pub struct PodNs {
    pub sandbox_pid: Option<i32>,
    pub known_pids: Vec<i32>,
}

/// The host namespaces a spec asks to share (the OCI way: no entry of that type), among those
/// a VM cannot give it, named as Kubernetes users know them.
pub fn host_namespaces(spec: &Spec) -> Vec<&'static str> {
    use oci_spec::runtime::LinuxNamespaceType as T;
    let have: Vec<T> = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default()
        .iter()
        .map(|n| n.typ())
        .collect();
    [
        (T::Network, "network (hostNetwork)"),
        (T::Ipc, "IPC (hostIPC)"),
        (T::Pid, "PID (hostPID)"),
    ]
    .into_iter()
    .filter(|(t, _)| !have.contains(t))
    .map(|(_, name)| name)
    .collect()
}

/// Refuses a container that asks for host namespaces a VM cannot share, unless the node config
/// allows giving it the guest's own instead (`vm.allow_host_namespaces`).
pub fn check_host_namespaces(id: &str, spec: &Spec, allow: bool) -> Result<()> {
    let host = host_namespaces(spec);
    if host.is_empty() {
        return Ok(());
    }
    let what = host.join(", ");
    if allow {
        log::warn!("container {id}: asks for the host's {what} namespace: gets the VM's own (vm.allow_host_namespaces)");
        return Ok(());
    }
    Err(ShimError::InvalidArgument(format!(
        "container {id} asks for the host's {what} namespace, which a VM cannot share: use \
         RuntimeClass janus (namespace mode) for such pods, or set vm.allow_host_namespaces = \
         true in the Janus config to give them the VM's own"
    )))
}

/// The spec as the guest runs it, and the host paths to share for it:
/// - root on the pod share (`/run/janus/shared/<id>/rootfs`);
/// - bind mounts of host paths go through the share; a bind on /dev/shm becomes the pod's
///   guest tmpfs (shared by the pod's containers, as CRI's shm bind is on the host); binds of
///   host /dev, /proc or /sys paths are dropped (the guest has its own);
/// - namespace paths join the pod's sandbox container in the guest; with no sandbox (the
///   sandbox itself, or a plain container) they are dropped and the guest makes new ones;
/// - hooks: only createContainer and startContainer stay (the guest runs them in the
///   container's namespaces, their paths looked up in the guest); the runtime-namespace phases
///   (prestart, createRuntime, poststart, poststop) run on the host (`service.rs`).
pub fn guest_spec(id: &str, spec: &Spec, pod: &PodNs) -> Result<(Vec<u8>, Vec<HostBind>)> {
    let mut v = serde_json::to_value(spec).map_err(|e| ShimError::failed("spec to JSON", e))?;
    v["root"]["path"] = serde_json::Value::String(guest_root(id));
    if let Some(h) = v.get_mut("hooks").and_then(|h| h.as_object_mut()) {
        h.retain(|phase, _| phase == "createContainer" || phase == "startContainer");
    }
    if let Some(ns) = v["linux"]["namespaces"].as_array_mut() {
        ns.retain_mut(|n| guest_namespace(id, n, pod));
    }
    let mut binds = Vec::new();
    if let Some(ms) = v["mounts"].as_array_mut() {
        let mut out = Vec::with_capacity(ms.len());
        for m in std::mem::take(ms) {
            out.extend(guest_mount(id, m, &mut binds)?);
        }
        *ms = out;
    }
    let text = serde_json::to_vec(&v).map_err(|e| ShimError::failed("spec to JSON", e))?;
    Ok((text, binds))
}

/// A namespace entry as the guest sees it (false: drop it, the guest makes a new one). A path
/// naming a pid containerd knows is a guest path already; other paths join the sandbox's.
fn guest_namespace(id: &str, n: &mut serde_json::Value, pod: &PodNs) -> bool {
    let Some(path) = n["path"].as_str().filter(|p| !p.is_empty()) else {
        return true;
    };
    let typ = n["type"].as_str().unwrap_or_default();
    let named_pid = path
        .strip_prefix("/proc/")
        .and_then(|r| r.split('/').next())
        .and_then(|p| p.parse::<i32>().ok());
    if named_pid.is_some_and(|p| pod.known_pids.contains(&p)) {
        return true;
    }
    match (pod.sandbox_pid, ns_file(typ)) {
        (Some(sb), Some(f)) => {
            n["path"] = serde_json::Value::String(format!("/proc/{sb}/ns/{f}"));
            true
        }
        _ => {
            log::info!("container {id}: {typ} namespace at host path {path}: the VM's own");
            false
        }
    }
}

/// A mount as the guest sees it (None: dropped); a host bind becomes a share path, recorded
/// in `binds` for the host side.
fn guest_mount(
    id: &str,
    mut m: serde_json::Value,
    binds: &mut Vec<HostBind>,
) -> Result<Option<serde_json::Value>> {
    let opts: Vec<String> = m["options"]
        .as_array()
        .map(|o| {
            o.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let bind =
        m["type"].as_str() == Some("bind") || opts.iter().any(|x| x == "bind" || x == "rbind");
    if !bind {
        return Ok(Some(m));
    }
    let dest = m["destination"].as_str().unwrap_or_default().to_string();
    let src = m["source"].as_str().unwrap_or_default().to_string();
    if dest == "/dev/shm" {
        m["source"] = serde_json::Value::String(GUEST_SHM.into());
        m["type"] = serde_json::Value::String("bind".into());
        m["options"] = serde_json::json!(["rbind", "nosuid", "nodev", "noexec"]);
        return Ok(Some(m));
    }
    let host_kernel = ["/dev", "/proc", "/sys"]
        .iter()
        .any(|k| Path::new(&src).starts_with(k));
    if !src.starts_with('/') || host_kernel {
        log::warn!(
            "container {id}: bind mount of host {src:?} on {dest} is not shared into the VM \
             (the guest has its own /dev, /proc and /sys)"
        );
        return Ok(None);
    }
    if opts.iter().any(|o| o == "rshared" || o == "shared") {
        return Err(ShimError::InvalidArgument(format!(
            "container {id}: bind mount of host {src:?} on {dest} asks for shared \
             (Bidirectional) propagation: mounts made in a VM cannot reach the host \
             through virtio-fs; use HostToContainer (rslave) propagation, or \
             RuntimeClass janus (namespace mode)"
        )));
    }
    let base = Path::new(&src)
        .file_name()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_default();
    let name = format!("{}-{}", binds.len(), base);
    m["source"] = serde_json::Value::String(guest_bind_path(id, &name));
    binds.push(HostBind {
        source: PathBuf::from(&src),
        name,
        readonly: opts.iter().any(|o| o == "ro"),
    });
    Ok(Some(m))
}

/// CRI's pod resource annotations (containerd >= 1.6 sets them from the pod's requests and
/// limits).
const ANN_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
const ANN_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
const ANN_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

/// The VM's size: the config's (or the defaults) for the guest kernel and agent, plus the
/// pod's CPU and memory limits from CRI's sandbox annotations when present, so the pod's
/// containers get what the pod asked for on top of the guest's own needs.
pub fn vm_size(
    base_vcpus: u32,
    base_mib: u32,
    annotations: &std::collections::HashMap<String, String>,
) -> (u32, u32) {
    let num = |k: &str| {
        annotations
            .get(k)
            .and_then(|v| v.trim().parse::<i64>().ok())
            .filter(|v| *v > 0)
    };
    let mut vcpus = base_vcpus;
    if let (Some(q), Some(p)) = (num(ANN_CPU_QUOTA), num(ANN_CPU_PERIOD)) {
        let host = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let extra = ((q + p - 1) / p) as u32;
        vcpus = (base_vcpus + extra).min(host.max(base_vcpus));
    }
    let mut mib = base_mib;
    if let Some(m) = num(ANN_MEMORY) {
        mib = base_mib.saturating_add(((m + (1 << 20) - 1) >> 20) as u32);
    }
    (vcpus, mib)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: serde_json::Value) -> Spec {
        let mut base = serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        });
        for (k, x) in v.as_object().unwrap() {
            base[k] = x.clone();
        }
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn host_namespaces_are_refused_unless_allowed() {
        let all = spec(serde_json::json!({"linux": {"namespaces": [
            {"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}
        ]}}));
        assert!(host_namespaces(&all).is_empty());
        assert!(check_host_namespaces("c", &all, false).is_ok());
        let host = spec(serde_json::json!({"linux": {"namespaces": [
            {"type": "pid"}, {"type": "mount"}
        ]}}));
        assert_eq!(
            host_namespaces(&host),
            vec!["network (hostNetwork)", "IPC (hostIPC)"]
        );
        let e = check_host_namespaces("c", &host, false).unwrap_err();
        assert!(matches!(e, ShimError::InvalidArgument(_)));
        let m = e.to_string();
        assert!(m.contains("network (hostNetwork), IPC (hostIPC)"), "{m}");
        assert!(
            m.contains("RuntimeClass janus") && m.contains("allow_host_namespaces"),
            "{m}"
        );
        assert!(check_host_namespaces("c", &host, true).is_ok());
        let nopid = spec(serde_json::json!({"linux": {"namespaces": [
            {"type": "network"}, {"type": "ipc"}
        ]}}));
        assert!(check_host_namespaces("c", &nopid, false)
            .unwrap_err()
            .to_string()
            .contains("PID (hostPID)"));
    }

    #[test]
    fn bidirectional_binds_are_refused() {
        let s = spec(serde_json::json!({"mounts": [
            {"destination": "/vol", "type": "bind", "source": "/var/lib/x",
             "options": ["rbind", "rshared", "rw"]}
        ]}));
        let e = guest_spec("c", &s, &PodNs::default()).unwrap_err();
        assert!(matches!(e, ShimError::InvalidArgument(_)), "{e}");
        assert!(e.to_string().contains("Bidirectional"), "{e}");
        let s = spec(serde_json::json!({"mounts": [
            {"destination": "/vol", "type": "bind", "source": "/var/lib/x",
             "options": ["rbind", "rslave", "rw"]}
        ]}));
        assert!(guest_spec("c", &s, &PodNs::default()).is_ok());
    }

    #[test]
    fn guest_spec_shares_binds_and_drops_host_things() {
        let s = spec(serde_json::json!({
            "hooks": {"prestart": [{"path": "/bin/true"}], "startContainer": [{"path": "/bin/true"}]},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts", "options": ["rbind", "ro"]},
                {"destination": "/data", "source": "/srv", "options": ["rbind"]},
                {"destination": "/dev/shm", "type": "bind", "source": "/run/ctd/sandboxes/p/shm", "options": ["rbind"]},
                {"destination": "/dev/fuse", "type": "bind", "source": "/dev/fuse", "options": ["bind"]},
                {"destination": "/run", "type": "tmpfs", "source": "tmpfs"}
            ],
            "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/proc/1/ns/net"}]}
        }));
        let (text, binds) = guest_spec("c", &s, &PodNs::default()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(v["root"]["path"], "/run/janus/shared/c/rootfs");
        // Runtime-namespace phases stay on the host; the container's go to the guest.
        assert_eq!(
            v["hooks"],
            serde_json::json!({"startContainer": [{"path": "/bin/true"}]})
        );
        let dests: Vec<_> = v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["destination"].as_str().unwrap(),
                    m["source"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            dests,
            [
                ("/proc", "proc"),
                ("/etc/hosts", "/run/janus/shared/c/mounts/0-hosts"),
                ("/data", "/run/janus/shared/c/mounts/1-srv"),
                ("/dev/shm", GUEST_SHM),
                ("/run", "tmpfs"),
            ]
        );
        assert_eq!(
            binds,
            [
                HostBind {
                    source: "/var/lib/x/hosts".into(),
                    name: "0-hosts".into(),
                    readonly: true
                },
                HostBind {
                    source: "/srv".into(),
                    name: "1-srv".into(),
                    readonly: false
                },
            ]
        );
        assert_eq!(
            v["linux"]["namespaces"],
            serde_json::json!([{"type": "pid"}])
        );
    }

    #[test]
    fn pod_members_join_the_sandbox_in_the_guest() {
        let s = spec(serde_json::json!({
            "linux": {"namespaces": [
                {"type": "pid", "path": "/proc/77/ns/pid"},
                {"type": "network", "path": "/proc/55/ns/net"},
                {"type": "ipc", "path": "/proc/55/ns/ipc"},
                {"type": "uts", "path": "/var/run/netns/x"},
                {"type": "mount"}
            ]}
        }));
        let pod = PodNs {
            sandbox_pid: Some(12),
            known_pids: vec![12, 77],
        };
        let (text, _) = guest_spec("c", &s, &pod).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(
            v["linux"]["namespaces"],
            serde_json::json!([
                {"type": "pid", "path": "/proc/77/ns/pid"},
                {"type": "network", "path": "/proc/12/ns/net"},
                {"type": "ipc", "path": "/proc/12/ns/ipc"},
                {"type": "uts", "path": "/proc/12/ns/uts"},
                {"type": "mount"}
            ])
        );
    }

    #[test]
    fn vm_size_adds_the_pods_resources() {
        let mut a = std::collections::HashMap::new();
        assert_eq!(vm_size(1, 256, &a), (1, 256));
        a.insert(ANN_MEMORY.to_string(), (100u64 << 20).to_string());
        a.insert(ANN_CPU_QUOTA.to_string(), "50000".to_string());
        a.insert(ANN_CPU_PERIOD.to_string(), "100000".to_string());
        assert_eq!(vm_size(1, 256, &a), (2.min(host_cpus().max(1)), 356));
        a.insert(ANN_MEMORY.to_string(), "junk".to_string());
        a.insert(ANN_CPU_QUOTA.to_string(), "-1".to_string());
        assert_eq!(vm_size(1, 256, &a), (1, 256));
    }

    fn host_cpus() -> u32 {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    }
}
