//! Containers in transient systemd scopes, for nodes where systemd manages the cgroups
//! (kubelet's `cgroupDriver: systemd`): a `slice:prefix:name` cgroupsPath becomes the scope
//! `<prefix>-<name>.scope` in `slice`, started through systemd's D-Bus API with the container's
//! first process (a scope cannot exist empty) and `Delegate=yes`, as runc and youki do.
//!
//! The scope's cgroup directory is the cgroupfs expansion of the same path
//! ([`super::cgroups::normalize_path`]), so everything after the start (resources, stats,
//! freeze, OOM) works on cgroupfs as on a node without systemd. Resource limits are also given
//! as unit properties: systemd rewrites a unit's cgroup attributes from its own properties
//! whenever it re-applies them (daemon-reload, a sibling's change), and a limit it does not
//! know of would silently go.
//!
//! The D-Bus client is behind the `systemd` feature (the shim has it; the guest agent, where no
//! systemd runs, does not).

use oci_spec::runtime::LinuxResources;

/// A transient scope unit: what a `slice:prefix:name` cgroupsPath names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    /// The slice it lives in (`kubepods-besteffort-pod<uid>.slice`).
    pub slice: String,
    /// The scope's name (`cri-containerd-<id>.scope`).
    pub name: String,
}

impl Unit {
    /// The scope a systemd-form cgroupsPath names; `None` for a cgroupfs path or a path that
    /// names a slice (which systemd makes itself, without a process). The form itself is
    /// validated by [`super::cgroups::normalize_path`].
    pub fn from_cgroups_path(path: &str) -> Option<Unit> {
        if path.starts_with('/') {
            return None;
        }
        let mut parts = path.split(':');
        let (slice, prefix, name) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || name.is_empty() || name.ends_with(".slice") {
            return None;
        }
        let slice = if slice.is_empty() {
            "system.slice"
        } else {
            slice
        };
        let name = if prefix.is_empty() {
            format!("{name}.scope")
        } else {
            format!("{prefix}-{name}.scope")
        };
        Some(Unit {
            slice: slice.to_string(),
            name,
        })
    }
}

/// Whether systemd is the init system here (`sd_booted(3)`: it made `/run/systemd/system`).
pub fn host_runs_systemd() -> bool {
    std::path::Path::new("/run/systemd/system").is_dir()
}

/// Whether containers go into systemd scopes: systemd runs the host and this build can ask it.
pub fn booted() -> bool {
    cfg!(feature = "systemd") && host_runs_systemd()
}

/// The system bus socket the scopes are asked for on (the default address zbus uses).
pub const SYSTEM_BUS_SOCKET: &str = "/run/dbus/system_bus_socket";

/// Why systemd did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("systemd D-Bus call {call} for {unit}: {source}")]
    Bus {
        call: &'static str,
        unit: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("systemd job for {unit} ended with result {result:?}")]
    Job { unit: String, result: String },
    #[error("systemd did not finish starting {unit} within {0:?}", JOB_TIMEOUT)]
    Timeout { unit: String },
    #[error("{unit} already exists")]
    Exists { unit: String },
    #[error("this build has no systemd support (feature `systemd`)")]
    Unsupported,
}

/// How long a start job may take (runc waits 30 s as well).
pub const JOB_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// One unit property, as StartTransientUnit and SetUnitProperties take them.
#[derive(Debug, Clone, PartialEq)]
pub enum Prop {
    Bool(&'static str, bool),
    U64(&'static str, u64),
}

/// The unit properties of `res` for this cgroup version (`v2`): memory limit, CPU weight and
/// quota, tasks limit (runc's set).
pub fn resource_props(res: &LinuxResources, v2: bool) -> Vec<Prop> {
    let mut props = Vec::new();
    if let Some(limit) = res
        .memory()
        .as_ref()
        .and_then(|m| m.limit())
        .filter(|l| *l > 0)
    {
        let name = if v2 { "MemoryMax" } else { "MemoryLimit" };
        props.push(Prop::U64(name, limit as u64));
    }
    if let Some(cpu) = res.cpu() {
        if let Some(shares) = cpu.shares().filter(|s| *s > 0) {
            if v2 {
                let w = super::cgroups::shares_to_weight(shares);
                props.push(Prop::U64("CPUWeight", w));
            } else {
                props.push(Prop::U64("CPUShares", shares));
            }
        }
        if let Some(quota) = cpu.quota().filter(|q| *q > 0) {
            let period = cpu.period().filter(|p| *p > 0).unwrap_or(100_000);
            // systemd keeps the quota per second at 10 ms granularity, rounding down: round
            // up so the container never gets less CPU than asked.
            let per_sec = (quota as u64 * 1_000_000).div_ceil(period).div_ceil(10_000) * 10_000;
            props.push(Prop::U64("CPUQuotaPerSecUSec", per_sec));
        }
    }
    if let Some(pids) = res.pids().as_ref().map(|p| p.limit()).filter(|l| *l > 0) {
        props.push(Prop::U64("TasksMax", pids as u64));
    }
    props
}

#[cfg(feature = "systemd")]
pub use dbus::{set_properties, start_scope, stop};

#[cfg(not(feature = "systemd"))]
pub fn start_scope(_: &Unit, _: u32, _: &[Prop], _: bool) -> Result<(), SystemdError> {
    Err(SystemdError::Unsupported)
}

#[cfg(not(feature = "systemd"))]
pub fn set_properties(_: &Unit, _: &[Prop]) -> Result<(), SystemdError> {
    Err(SystemdError::Unsupported)
}

#[cfg(not(feature = "systemd"))]
pub fn stop(_: &Unit) -> Result<(), SystemdError> {
    Err(SystemdError::Unsupported)
}

#[cfg(feature = "systemd")]
mod dbus {
    use futures_lite::StreamExt;
    use zbus::zvariant::{OwnedObjectPath, Value};
    use zbus::{Connection, MatchRule, MessageStream};

    use super::{Prop, SystemdError, Unit, JOB_TIMEOUT};

    const DEST: &str = "org.freedesktop.systemd1";
    const PATH: &str = "/org/freedesktop/systemd1";
    const MANAGER: &str = "org.freedesktop.systemd1.Manager";

    fn bus<'a>(
        call: &'static str,
        unit: &'a Unit,
    ) -> impl FnOnce(zbus::Error) -> SystemdError + 'a {
        move |e| SystemdError::Bus {
            call,
            unit: unit.name.clone(),
            source: Box::new(e),
        }
    }

    fn is_error(e: &zbus::Error, name: &str) -> bool {
        matches!(e, zbus::Error::MethodError(n, _, _) if n.as_str() == name)
    }

    fn values(props: &[Prop]) -> Vec<(&'static str, Value<'static>)> {
        props
            .iter()
            .map(|p| match *p {
                Prop::Bool(k, v) => (k, Value::from(v)),
                Prop::U64(k, v) => (k, Value::from(v)),
            })
            .collect()
    }

    /// Starts `unit` with `pid` in it (plus `props`, `Delegate=yes` and accounting) and waits
    /// for the start job. `v2`: the host's cgroup version (which accounting properties exist).
    pub fn start_scope(
        unit: &Unit,
        pid: u32,
        props: &[Prop],
        v2: bool,
    ) -> Result<(), SystemdError> {
        async_io::block_on(async {
            let conn = Connection::system().await.map_err(bus("connect", unit))?;
            // Listen for the job's end before it can happen.
            let rule = MatchRule::builder()
                .msg_type(zbus::message::Type::Signal)
                .sender(DEST)
                .and_then(|r| r.interface(MANAGER))
                .and_then(|r| r.member("JobRemoved"))
                .map_err(bus("match JobRemoved", unit))?
                .build();
            let mut jobs = MessageStream::for_match_rule(rule, &conn, Some(64))
                .await
                .map_err(bus("AddMatch", unit))?;
            // systemd emits job signals only while some client is subscribed.
            conn.call_method(Some(DEST), PATH, Some(MANAGER), "Subscribe", &())
                .await
                .map_err(bus("Subscribe", unit))?;
            let mut all = vec![
                (
                    "Description",
                    Value::from(format!("janus container {}", unit.name)),
                ),
                ("Slice", Value::from(unit.slice.clone())),
                ("Delegate", Value::from(true)),
                ("DefaultDependencies", Value::from(false)),
                ("PIDs", Value::from(vec![pid])),
                ("MemoryAccounting", Value::from(true)),
                ("CPUAccounting", Value::from(true)),
                ("TasksAccounting", Value::from(true)),
                (
                    if v2 {
                        "IOAccounting"
                    } else {
                        "BlockIOAccounting"
                    },
                    Value::from(true),
                ),
            ];
            all.extend(values(props));
            let aux: Vec<(&str, Vec<(&str, Value)>)> = Vec::new();
            let args = (unit.name.as_str(), "replace", all, aux);
            let reply = conn
                .call_method(Some(DEST), PATH, Some(MANAGER), "StartTransientUnit", &args)
                .await
                .map_err(|e| {
                    if is_error(&e, "org.freedesktop.systemd1.UnitExists") {
                        SystemdError::Exists {
                            unit: unit.name.clone(),
                        }
                    } else {
                        bus("StartTransientUnit", unit)(e)
                    }
                })?;
            let job: OwnedObjectPath = reply
                .body()
                .deserialize()
                .map_err(bus("StartTransientUnit reply", unit))?;
            let wait = async {
                while let Some(msg) = jobs.next().await {
                    let msg = msg.map_err(bus("JobRemoved", unit))?;
                    let body = msg.body();
                    let Ok((_, path, _, result)) =
                        body.deserialize::<(u32, OwnedObjectPath, String, String)>()
                    else {
                        continue;
                    };
                    if path == job {
                        return match result.as_str() {
                            "done" => Ok(()),
                            _ => Err(SystemdError::Job {
                                unit: unit.name.clone(),
                                result,
                            }),
                        };
                    }
                }
                Err(SystemdError::Job {
                    unit: unit.name.clone(),
                    result: "(bus closed)".into(),
                })
            };
            let timeout = async {
                async_io::Timer::after(JOB_TIMEOUT).await;
                Err(SystemdError::Timeout {
                    unit: unit.name.clone(),
                })
            };
            futures_lite::future::or(wait, timeout).await
        })
    }

    /// Changes a running unit's properties (at runtime: not persisted).
    pub fn set_properties(unit: &Unit, props: &[Prop]) -> Result<(), SystemdError> {
        if props.is_empty() {
            return Ok(());
        }
        async_io::block_on(async {
            let conn = Connection::system().await.map_err(bus("connect", unit))?;
            let args = (unit.name.as_str(), true, values(props));
            conn.call_method(Some(DEST), PATH, Some(MANAGER), "SetUnitProperties", &args)
                .await
                .map_err(bus("SetUnitProperties", unit))?;
            Ok(())
        })
    }

    /// Stops the unit (its processes are dead by then; this makes systemd forget it). A unit
    /// systemd no longer knows is fine.
    pub fn stop(unit: &Unit) -> Result<(), SystemdError> {
        async_io::block_on(async {
            let conn = Connection::system().await.map_err(bus("connect", unit))?;
            let stop = conn
                .call_method(
                    Some(DEST),
                    PATH,
                    Some(MANAGER),
                    "StopUnit",
                    &(unit.name.as_str(), "replace"),
                )
                .await;
            match stop {
                Err(e) if is_error(&e, "org.freedesktop.systemd1.NoSuchUnit") => {}
                r => {
                    r.map_err(bus("StopUnit", unit))?;
                }
            }
            // A scope whose processes were killed may be left "failed": reset it.
            let reset = conn
                .call_method(
                    Some(DEST),
                    PATH,
                    Some(MANAGER),
                    "ResetFailedUnit",
                    &(unit.name.as_str(),),
                )
                .await;
            match reset {
                Err(e) if !is_error(&e, "org.freedesktop.systemd1.NoSuchUnit") => {
                    log::debug!("ResetFailedUnit {}: {e}", unit.name)
                }
                _ => {}
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{
        LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResourcesBuilder,
    };

    #[test]
    fn unit_of_a_systemd_path() {
        let u = Unit::from_cgroups_path("kubepods-besteffort-pod1.slice:cri-containerd:abc");
        assert_eq!(
            u,
            Some(Unit {
                slice: "kubepods-besteffort-pod1.slice".into(),
                name: "cri-containerd-abc.scope".into()
            })
        );
        let u = Unit::from_cgroups_path(":janus:x").unwrap();
        assert_eq!(
            (u.slice.as_str(), u.name.as_str()),
            ("system.slice", "janus-x.scope")
        );
        assert_eq!(Unit::from_cgroups_path("/kubepods/pod1/abc"), None);
        assert_eq!(Unit::from_cgroups_path("a.slice:p:b.slice"), None);
    }

    #[test]
    fn resource_props_per_version() {
        let res = LinuxResourcesBuilder::default()
            .memory(
                LinuxMemoryBuilder::default()
                    .limit(64 << 20)
                    .build()
                    .unwrap(),
            )
            .cpu(
                LinuxCpuBuilder::default()
                    .shares(512u64)
                    .quota(25_000i64)
                    .period(100_000u64)
                    .build()
                    .unwrap(),
            )
            .pids(LinuxPidsBuilder::default().limit(32).build().unwrap())
            .build()
            .unwrap();
        assert_eq!(
            resource_props(&res, false),
            vec![
                Prop::U64("MemoryLimit", 64 << 20),
                Prop::U64("CPUShares", 512),
                Prop::U64("CPUQuotaPerSecUSec", 250_000),
                Prop::U64("TasksMax", 32),
            ]
        );
        let v2 = resource_props(&res, true);
        assert!(v2.contains(&Prop::U64("MemoryMax", 64 << 20)), "{v2:?}");
        assert!(v2.contains(&Prop::U64(
            "CPUWeight",
            super::super::cgroups::shares_to_weight(512)
        )));
        // 1 ms of every 30 ms rounds up to 40 ms per second, not down to 30.
        let odd = LinuxResourcesBuilder::default()
            .cpu(
                LinuxCpuBuilder::default()
                    .quota(1_000i64)
                    .period(30_000u64)
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        assert_eq!(
            resource_props(&odd, true),
            vec![Prop::U64("CPUQuotaPerSecUSec", 40_000)]
        );
        assert!(resource_props(&LinuxResources::default(), true).is_empty());
    }
}
