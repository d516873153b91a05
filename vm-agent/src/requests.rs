//! What the agent makes of a request before it touches the guest: every check of the host's
//! input that needs no process, mount or socket, and the plan each call then carries out.
//! The service (`service.rs`, `containers.rs`, `storage.rs`, `net.rs`) runs these first;
//! the fuzz target `agent_request` runs them on whatever the host could send.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use nix::mount::MsFlags;
use oci_spec::runtime::{Linux, LinuxResources, Process, Spec};
use protocols::agent::{CreateContainerRequest, ExecProcessRequest, StdioStreams, Storage};
use runtime::linux::cgroups;
use runtime::linux::spec::{self as rtspec, NsPlan};

use crate::error::{AgentError, Result};

/// Container and exec ids: a path component of their own (cgroup, log lines).
pub fn check_id(what: &str, id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 255 || id.contains('/') || id.starts_with('.') {
        return Err(AgentError::InvalidArgument(format!("bad {what} {id:?}")));
    }
    Ok(())
}

/// A checked CreateContainer: everything `Containers::create` needs before mounting the
/// storages and spawning.
#[derive(Debug)]
pub struct CreatePlan {
    pub id: String,
    pub spec: Spec,
    pub stdio: StdioStreams,
    pub terminal: bool,
    /// The rootfs, an absolute guest path.
    pub root: PathBuf,
    pub linux: Linux,
    /// The container's cgroup, relative to the guest's cgroup root.
    pub cgroup: String,
    pub namespaces: NsPlan,
}

pub fn create_plan(req: &CreateContainerRequest) -> Result<CreatePlan> {
    let id = req.container_id.clone();
    check_id("container id", &id)?;
    let text = std::str::from_utf8(&req.oci_spec)
        .map_err(|_| AgentError::InvalidArgument("oci_spec is not UTF-8".into()))?;
    let spec = rtspec::parse(text)?;
    let stdio = req.stdio.clone().unwrap_or_default();
    let terminal = spec
        .process()
        .as_ref()
        .is_some_and(|p| p.terminal() == Some(true));
    if terminal != stdio.terminal {
        return Err(AgentError::InvalidArgument(
            "process.terminal and stdio.terminal disagree".into(),
        ));
    }
    let root = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .unwrap_or_default();
    if !root.is_absolute() {
        return Err(AgentError::InvalidArgument(
            "root.path must be an absolute guest path".into(),
        ));
    }
    let linux = spec.linux().clone().unwrap_or_default();
    let cgroup = cgroups::normalize_path(
        &linux
            .cgroups_path()
            .as_ref()
            .map(|p| p.to_string_lossy().to_string())
            .unwrap_or_default(),
        &id,
    )?;
    let namespaces = NsPlan::from_spec(&spec)?;
    for s in &req.storages {
        storage_plan(s)?;
    }
    Ok(CreatePlan {
        id,
        spec,
        stdio,
        terminal,
        root,
        linux,
        cgroup,
        namespaces,
    })
}

/// A checked ExecProcess (the container's state is checked by the caller).
#[derive(Debug)]
pub struct ExecPlan {
    pub process: Process,
    pub stdio: StdioStreams,
    pub terminal: bool,
}

pub fn exec_plan(req: &ExecProcessRequest) -> Result<ExecPlan> {
    check_id("exec id", &req.exec_id)?;
    let process: Process = serde_json::from_slice(&req.process)
        .map_err(|e| AgentError::InvalidArgument(format!("exec process spec: {e}")))?;
    rtspec::validate_process(&process, "exec process")?;
    let stdio = req.stdio.clone().unwrap_or_default();
    let terminal = process.terminal() == Some(true);
    if terminal != stdio.terminal {
        return Err(AgentError::InvalidArgument(
            "process.terminal and stdio.terminal disagree".into(),
        ));
    }
    Ok(ExecPlan {
        process,
        stdio,
        terminal,
    })
}

/// SignalProcess's signal number.
pub fn check_signal(sig: u32) -> Result<()> {
    if sig == 0 || sig > 64 {
        return Err(AgentError::InvalidArgument(format!("bad signal {sig}")));
    }
    Ok(())
}

/// UpdateContainer's resources (OCI `LinuxResources` as JSON).
pub fn parse_resources(resources: &[u8]) -> Result<LinuxResources> {
    serde_json::from_slice(resources)
        .map_err(|e| AgentError::InvalidArgument(format!("linux resources: {e}")))
}

/// ForwardPort's port.
pub fn forward_port(port: u32) -> Result<u16> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| AgentError::InvalidArgument(format!("port {port}")))
}

/// A storage to mount: where, the filesystem type (none for a bind mount), the flags.
pub fn storage_plan(s: &Storage) -> Result<(PathBuf, Option<&'static str>, MsFlags)> {
    let mp = PathBuf::from(&s.mount_point);
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
    Ok((mp, fstype, flags))
}

/// Parses "a.b.c.d/n" or "x:y::z/n" ("default" or "" is the IPv4 default, 0.0.0.0/0).
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8)> {
    if s.is_empty() || s == "default" {
        return Ok((Ipv4Addr::UNSPECIFIED.into(), 0));
    }
    let bad = || AgentError::InvalidArgument(format!("bad CIDR {s:?}"));
    let (a, n) = s.split_once('/').ok_or_else(bad)?;
    let ip: IpAddr = a.parse().map_err(|_| bad())?;
    let n: u8 = n.parse().map_err(|_| bad())?;
    if n > if ip.is_ipv4() { 32 } else { 128 } {
        return Err(bad());
    }
    Ok((ip, n))
}

/// UpdateInterface's addresses: any number of IPv6 ones, one IPv4 at most.
pub fn interface_addresses(i: &protocols::agent::Interface) -> Result<Vec<(IpAddr, u8)>> {
    let addrs = i
        .addresses
        .iter()
        .map(|a| parse_cidr(&a.address))
        .collect::<Result<Vec<_>>>()?;
    if addrs.iter().filter(|(ip, _)| ip.is_ipv4()).count() > 1 {
        return Err(AgentError::InvalidArgument(
            "one IPv4 address per interface is supported".into(),
        ));
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr("10.0.2.15/24").unwrap(),
            ("10.0.2.15".parse().unwrap(), 24)
        );
        assert_eq!(
            parse_cidr("").unwrap(),
            (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
        );
        assert_eq!(
            parse_cidr("fd00:250:7::5/64").unwrap(),
            ("fd00:250:7::5".parse().unwrap(), 64)
        );
        assert_eq!(parse_cidr("::/0").unwrap(), ("::".parse().unwrap(), 0));
        for bad in [
            "10.0.2.15",
            "10.0.2.15/33",
            "fd00::1/129",
            "x/8",
            "10.0.0.1/-1",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn requests_are_checked_before_anything_happens() {
        assert!(check_id("id", "c1").is_ok());
        for bad in ["", ".hidden", "a/b", &"x".repeat(256)] {
            assert!(check_id("id", bad).is_err(), "{bad:?}");
        }
        assert!(check_signal(9).is_ok());
        assert!(check_signal(0).is_err() && check_signal(65).is_err());
        assert_eq!(forward_port(8080).unwrap(), 8080);
        assert!(forward_port(0).is_err() && forward_port(65536).is_err());
        let s = |mp: &str, driver: &str| Storage {
            mount_point: mp.into(),
            driver: driver.into(),
            ..Default::default()
        };
        assert!(storage_plan(&s("/run/x", "virtiofs")).is_ok());
        assert!(storage_plan(&s("run/x", "bind")).is_err());
        assert!(storage_plan(&s("/run/../x", "bind")).is_err());
        assert!(storage_plan(&s("/run/x", "ext4")).is_err());
        let req = CreateContainerRequest {
            container_id: "c1".into(),
            oci_spec: b"{".to_vec(),
            ..Default::default()
        };
        assert!(create_plan(&req).is_err());
        let req = ExecProcessRequest {
            container_id: "c1".into(),
            exec_id: "e1".into(),
            process: br#"{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}}"#.to_vec(),
            ..Default::default()
        };
        let p = exec_plan(&req).unwrap();
        assert!(!p.terminal);
    }
}
