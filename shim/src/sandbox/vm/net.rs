//! A pod's network in its VM. CNI set up an interface (a veth end) in the pod's network
//! namespace; the VM gets it as a virtio-net device: a tap device next to it in the same
//! namespace, tc ingress redirects both ways between the two (every frame, any protocol), QEMU
//! started inside that namespace on the tap, and the agent giving the guest NIC the
//! interface's MAC, IPv4 addresses, MTU and routes. The namespace's own stack never sees the
//! pod's traffic (ingress is redirected before it). Dual-stack pods: the interface's global
//! IPv6 addresses and IPv6 routes go to the guest too.
//!
//! The host side uses iproute2's `ip` and `tc` run inside the namespace: tc filters with a
//! mirred action are a handful of commands there, while the netlink crates would need their tc
//! action support hand-assembled for it.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use protocols::agent as pa;

use crate::error::{Result, ShimError};

/// The tap device in the pod's namespace (one VM per namespace).
pub const TAP: &str = "tap0_janus";

/// What the guest gets.
#[derive(Debug, Clone)]
pub struct PodNet {
    pub netns: PathBuf,
    /// The CNI interface mirrored to the tap.
    pub host_if: String,
    pub iface: pa::Interface,
    pub routes: Vec<pa::Route>,
}

/// Runs `prog args` inside the network namespace `netns`; its stdout.
pub fn run_in(netns: &Path, prog: &str, args: &[&str]) -> Result<String> {
    let f = std::fs::File::open(netns).map_err(|e| {
        ShimError::FailedPrecondition(format!("pod network namespace {}: {e}", netns.display()))
    })?;
    let mut cmd = Command::new(prog);
    cmd.args(args);
    // SAFETY: setns(2) is async-signal-safe; the closure owns `f`, which is CLOEXEC.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (code, out, err) = crate::command::output(&mut cmd).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ShimError::FailedPrecondition(format!(
                "{prog}: {e} (VM-mode pod networking needs iproute2: apt-get install iproute2)"
            ))
        } else {
            ShimError::failed(prog, e)
        }
    })?;
    if code != 0 {
        return Err(ShimError::Internal(format!(
            "{prog} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&err).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Reads the pod's interface from `ip -j` output: the first Ethernet interface with an IP
/// address.
fn parse_interface(addrs: &str) -> Option<(String, pa::Interface)> {
    let v: serde_json::Value = serde_json::from_str(addrs).ok()?;
    v.as_array()?.iter().find_map(|l| {
        let name = l["ifname"].as_str()?;
        if name == "lo" || l["link_type"].as_str() != Some("ether") || name == TAP {
            return None;
        }
        let addresses: Vec<pa::IPAddress> = l["addr_info"]
            .as_array()?
            .iter()
            .filter(|a| match a["family"].as_str() {
                Some("inet") => true,
                // The guest makes its own link-local address.
                Some("inet6") => a["scope"].as_str() == Some("global"),
                _ => false,
            })
            .filter_map(|a| {
                Some(pa::IPAddress {
                    address: format!("{}/{}", a["local"].as_str()?, a["prefixlen"].as_u64()?),
                    ..Default::default()
                })
            })
            .collect();
        if addresses.is_empty() {
            return None;
        }
        Some((
            name.to_string(),
            pa::Interface {
                name: name.to_string(),
                mac: l["address"].as_str()?.to_string(),
                addresses,
                mtu: l["mtu"].as_u64().unwrap_or(1500) as u32,
                ..Default::default()
            },
        ))
    })
}

/// The routes the guest needs beyond the prefix routes its addresses bring (from `ip -j -4`
/// or `-6` `route show`; `default` is spelt per family, as the agent reads it).
fn parse_routes(routes: &str, dev: &str, v6: bool) -> Vec<pa::Route> {
    let v: serde_json::Value = serde_json::from_str(routes).unwrap_or_default();
    let mut out: Vec<pa::Route> = v
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .filter(|r| r["protocol"].as_str() != Some("kernel"))
        .filter_map(|r| {
            let dst = r["dst"].as_str()?;
            Some(pa::Route {
                destination: match (dst, v6) {
                    ("default", false) => "",
                    ("default", true) => "::/0",
                    _ => dst,
                }
                .to_string(),
                gateway: r["gateway"].as_str().unwrap_or_default().to_string(),
                device: dev.to_string(),
                ..Default::default()
            })
        })
        .collect();
    // Routes through a gateway need the gateway's link route first.
    out.sort_by_key(|r| !r.gateway.is_empty());
    out
}

/// Mirrors the pod's CNI interface to a tap for the VM. `None` when the namespace has no
/// interface with an IP address (nothing to give the guest).
pub fn setup(netns: &Path) -> Result<Option<PodNet>> {
    // (Not `-4`: with it, ip leaves out the link type and MAC.)
    let addrs = run_in(netns, "ip", &["-j", "addr", "show"])?;
    let Some((host_if, iface)) = parse_interface(&addrs) else {
        log::info!(
            "no interface with an IP address in {}: the VM gets no network device",
            netns.display()
        );
        return Ok(None);
    };
    let mut routes = Vec::new();
    for (family, v6) in [("-4", false), ("-6", true)] {
        let r = run_in(
            netns,
            "ip",
            &["-j", family, "route", "show", "dev", &host_if],
        )?;
        routes.extend(parse_routes(&r, &host_if, v6));
    }
    // Routes through a gateway need the gateway's link route first.
    routes.sort_by_key(|r| !r.gateway.is_empty());
    // Left over from a crashed shim: start clean.
    let _ = run_in(netns, "ip", &["link", "del", TAP]);
    let _ = run_in(netns, "tc", &["qdisc", "del", "dev", &host_if, "ingress"]);
    let mtu = iface.mtu.to_string();
    let steps: [&[&str]; 3] = [
        &["tuntap", "add", "dev", TAP, "mode", "tap"],
        &["link", "set", TAP, "mtu", &mtu],
        &["link", "set", TAP, "up"],
    ];
    let res = (|| {
        for s in steps {
            run_in(netns, "ip", s)?;
        }
        for (from, to) in [(host_if.as_str(), TAP), (TAP, host_if.as_str())] {
            run_in(netns, "tc", &["qdisc", "add", "dev", from, "ingress"])?;
            run_in(
                netns,
                "tc",
                &[
                    "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32",
                    "match", "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
                ],
            )?;
        }
        Ok(())
    })();
    if let Err(e) = res {
        teardown(netns, &host_if);
        return Err(e);
    }
    log::info!(
        "pod network: {host_if} ({}, {}) mirrored to {TAP} in {}",
        iface.mac,
        iface
            .addresses
            .iter()
            .map(|a| a.address.as_str())
            .collect::<Vec<_>>()
            .join(" "),
        netns.display()
    );
    Ok(Some(PodNet {
        netns: netns.to_path_buf(),
        host_if,
        iface,
        routes,
    }))
}

/// Removes the tap and the redirect (best effort: the namespace may be gone already).
pub fn teardown(netns: &Path, host_if: &str) {
    if !netns.exists() {
        return;
    }
    let _ = run_in(netns, "ip", &["link", "del", TAP]);
    let _ = run_in(netns, "tc", &["qdisc", "del", "dev", host_if, "ingress"]);
}

impl PodNet {
    /// The VM's network device: the tap, with the interface's MAC.
    pub fn device(&self) -> runtime::vm::NetDevice {
        runtime::vm::NetDevice {
            tap: TAP.into(),
            mac: self.iface.mac.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_and_routes_from_ip_json() {
        let addrs = r#"[
            {"ifindex":1,"ifname":"lo","link_type":"loopback","address":"00:00:00:00:00:00","mtu":65536,
             "addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8}]},
            {"ifindex":3,"ifname":"eth0","link_type":"ether","address":"aa:bb:cc:dd:ee:ff","mtu":1450,
             "addr_info":[{"family":"inet","local":"10.250.3.7","prefixlen":24}]}
        ]"#;
        let (name, i) = parse_interface(addrs).unwrap();
        assert_eq!(name, "eth0");
        assert_eq!(i.mac, "aa:bb:cc:dd:ee:ff");
        assert_eq!(i.mtu, 1450);
        assert_eq!(i.addresses[0].address, "10.250.3.7/24");
        assert!(parse_interface("[]").is_none());
        assert!(parse_interface("junk").is_none());
        let routes = r#"[
            {"dst":"default","gateway":"10.250.3.1","flags":[]},
            {"dst":"10.250.3.0/24","protocol":"kernel","scope":"link","prefsrc":"10.250.3.7"},
            {"dst":"10.99.0.0/16","scope":"link"}
        ]"#;
        let r = parse_routes(routes, "eth0", false);
        let got: Vec<_> = r
            .iter()
            .map(|r| (r.destination.as_str(), r.gateway.as_str()))
            .collect();
        assert_eq!(got, [("10.99.0.0/16", ""), ("", "10.250.3.1")]);
    }

    #[test]
    fn dual_stack_interface_and_routes() {
        let addrs = r#"[
            {"ifindex":3,"ifname":"eth0","link_type":"ether","address":"aa:bb:cc:dd:ee:ff","mtu":1500,
             "addr_info":[{"family":"inet","local":"10.250.3.7","prefixlen":24,"scope":"global"},
                          {"family":"inet6","local":"fd00:250:3::7","prefixlen":64,"scope":"global"},
                          {"family":"inet6","local":"fe80::a8bb:ccff:fedd:eeff","prefixlen":64,"scope":"link"}]}
        ]"#;
        let (_, i) = parse_interface(addrs).unwrap();
        let got: Vec<_> = i.addresses.iter().map(|a| a.address.as_str()).collect();
        assert_eq!(got, ["10.250.3.7/24", "fd00:250:3::7/64"]);
        // IPv6 only is a network too.
        let v6 = addrs.replace(
            r#"{"family":"inet","local":"10.250.3.7","prefixlen":24,"scope":"global"},"#,
            "",
        );
        assert_eq!(parse_interface(&v6).unwrap().1.addresses.len(), 1);
        let routes = r#"[
            {"dst":"fd00:250:3::/64","protocol":"kernel","metric":256},
            {"dst":"fe80::/64","protocol":"kernel","metric":256},
            {"dst":"default","gateway":"fd00:250:3::1","metric":1024}
        ]"#;
        let r = parse_routes(routes, "eth0", true);
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].destination.as_str(), r[0].gateway.as_str()),
            ("::/0", "fd00:250:3::1")
        );
    }
}
