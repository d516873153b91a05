//! Guest network setup: the host names an interface by MAC and gives it a name, addresses
//! (one IPv4, any IPv6: dual-stack pods) and an MTU, then routes.
//!
//! Done with the classic ioctls (SIOCSIF*, SIOCADDRT, on an AF_INET or AF_INET6 socket)
//! rather than netlink: address and route setup is all a pod's guest needs, the ioctls are a
//! few lines each, and they keep the static PID-1 binary free of an async netlink stack.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::error::{AgentError, Result};
use crate::requests::parse_cidr;

fn sock() -> Result<OwnedFd> {
    sock_of(libc::AF_INET)
}

fn sock_of(family: libc::c_int) -> Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the fd is owned right away.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(AgentError::Internal(format!(
            "socket: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: fd was just returned by socket(2) and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
        return Err(AgentError::InvalidArgument(format!(
            "bad interface name {name:?}"
        )));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(r)
}

fn ioctl(fd: &OwnedFd, req: libc::Ioctl, arg: *mut libc::c_void, what: &str) -> Result<()> {
    // SAFETY: `arg` points to a live ifreq/rtentry of the type `req` expects.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) } < 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::EEXIST) | Some(libc::ENETUNREACH) => {
                AgentError::InvalidArgument(format!("{what}: {e}"))
            }
            Some(libc::ENODEV) => AgentError::NotFound(format!("{what}: {e}")),
            _ => AgentError::Internal(format!("{what}: {e}")),
        });
    }
    Ok(())
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the bytes are a valid sockaddr.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn in6_addr(ip: Ipv6Addr) -> libc::in6_addr {
    libc::in6_addr {
        s6_addr: ip.octets(),
    }
}

fn ifindex(name: &str) -> Result<libc::c_int> {
    std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| AgentError::NotFound(format!("no interface {name}")))
}

/// Adds an IPv6 address (with its prefix route). Duplicate address detection is off for it:
/// CNI gave the pod this address, and the host side of the pod's interface, which holds it
/// too, never sees the guest's frames.
fn add_ipv6(name: &str, ip: Ipv6Addr, n: u8) -> Result<()> {
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/accept_dad"), "0");
    let fd = sock_of(libc::AF_INET6)?;
    let mut r = libc::in6_ifreq {
        ifr6_addr: in6_addr(ip),
        ifr6_prefixlen: n.into(),
        ifr6_ifindex: ifindex(name)?,
    };
    ioctl(
        &fd,
        libc::SIOCSIFADDR,
        (&mut r as *mut libc::in6_ifreq).cast(),
        &format!("{name} address {ip}/{n}"),
    )
}

/// `struct in6_rtmsg` of <linux/ipv6_route.h> (SIOCADDRT on an AF_INET6 socket). The libc
/// crate has it with private fields, so it is spelt out here.
#[repr(C)]
struct In6Rtmsg {
    rtmsg_dst: libc::in6_addr,
    rtmsg_src: libc::in6_addr,
    rtmsg_gateway: libc::in6_addr,
    rtmsg_type: u32,
    rtmsg_dst_len: u16,
    rtmsg_src_len: u16,
    rtmsg_metric: u32,
    rtmsg_info: libc::c_ulong,
    rtmsg_flags: u32,
    rtmsg_ifindex: libc::c_int,
}

fn add_ipv6_route(dst: Ipv6Addr, n: u8, gateway: &str, device: &str) -> Result<()> {
    let fd = sock_of(libc::AF_INET6)?;
    let unspecified = in6_addr(Ipv6Addr::UNSPECIFIED);
    let mut m = In6Rtmsg {
        rtmsg_dst: unspecified,
        rtmsg_src: unspecified,
        rtmsg_gateway: unspecified,
        rtmsg_type: 0,
        rtmsg_dst_len: 0,
        rtmsg_src_len: 0,
        rtmsg_metric: 0,
        rtmsg_info: 0,
        rtmsg_flags: 0,
        rtmsg_ifindex: 0,
    };
    m.rtmsg_dst = in6_addr(dst);
    m.rtmsg_dst_len = n.into();
    m.rtmsg_metric = 1;
    m.rtmsg_flags = libc::RTF_UP as u32;
    if !gateway.is_empty() {
        let gw: Ipv6Addr = gateway
            .parse()
            .map_err(|_| AgentError::InvalidArgument(format!("bad IPv6 gateway {gateway:?}")))?;
        m.rtmsg_gateway = in6_addr(gw);
        m.rtmsg_flags |= libc::RTF_GATEWAY as u32;
    }
    if !device.is_empty() {
        m.rtmsg_ifindex = ifindex(device)?;
    }
    ioctl(
        &fd,
        libc::SIOCADDRT,
        (&mut m as *mut In6Rtmsg).cast(),
        &format!("route {dst}/{n} via {gateway:?}"),
    )
}

fn mask(n: u8) -> Ipv4Addr {
    Ipv4Addr::from(if n == 0 { 0 } else { u32::MAX << (32 - n) })
}

fn by_mac(mac: &str) -> Result<String> {
    let want = mac.to_ascii_lowercase();
    for e in std::fs::read_dir("/sys/class/net")
        .map_err(|e| AgentError::Internal(format!("/sys/class/net: {e}")))?
        .flatten()
    {
        let a = std::fs::read_to_string(e.path().join("address")).unwrap_or_default();
        if a.trim() == want {
            return Ok(e.file_name().to_string_lossy().to_string());
        }
    }
    Err(AgentError::NotFound(format!(
        "no guest interface has MAC {mac}"
    )))
}

fn set_up(fd: &OwnedFd, name: &str, up: bool) -> Result<()> {
    let mut r = ifreq(name)?;
    ioctl(
        fd,
        libc::SIOCGIFFLAGS,
        (&mut r as *mut libc::ifreq).cast(),
        &format!("{name} flags"),
    )?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe {
        if up {
            r.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        } else {
            r.ifr_ifru.ifru_flags &= !(libc::IFF_UP as libc::c_short);
        }
    }
    ioctl(
        fd,
        libc::SIOCSIFFLAGS,
        (&mut r as *mut libc::ifreq).cast(),
        &format!("{name} up"),
    )
}

/// Brings the loopback interface up (containers sharing the guest's network use it).
pub fn loopback_up() {
    if let Ok(fd) = sock() {
        let _ = set_up(&fd, "lo", true);
    }
}

/// Configures the interface with `mac`: name, MTU, addresses, up.
pub fn update_interface(i: &protocols::agent::Interface) -> Result<String> {
    let addrs = crate::requests::interface_addresses(i)?;
    let fd = sock()?;
    let mut name = by_mac(&i.mac)?;
    if !i.name.is_empty() && i.name != name {
        set_up(&fd, &name, false)?;
        let mut r = ifreq(&name)?;
        let new = ifreq(&i.name)?;
        r.ifr_ifru.ifru_newname = new.ifr_name;
        ioctl(
            &fd,
            libc::SIOCSIFNAME,
            (&mut r as *mut libc::ifreq).cast(),
            &format!("rename {name}"),
        )?;
        name = i.name.clone();
    }
    if i.mtu != 0 {
        let mut r = ifreq(&name)?;
        r.ifr_ifru.ifru_mtu = i.mtu as libc::c_int;
        ioctl(
            &fd,
            libc::SIOCSIFMTU,
            (&mut r as *mut libc::ifreq).cast(),
            &format!("{name} mtu {}", i.mtu),
        )?;
    }
    set_up(&fd, &name, true)?;
    for (ip, n) in addrs {
        let ip = match ip {
            IpAddr::V4(ip) => ip,
            IpAddr::V6(ip) => {
                add_ipv6(&name, ip, n)?;
                continue;
            }
        };
        let mut r = ifreq(&name)?;
        r.ifr_ifru.ifru_addr = sockaddr(ip);
        ioctl(
            &fd,
            libc::SIOCSIFADDR,
            (&mut r as *mut libc::ifreq).cast(),
            &format!("{name} address {ip}"),
        )?;
        let mut r = ifreq(&name)?;
        r.ifr_ifru.ifru_netmask = sockaddr(mask(n));
        ioctl(
            &fd,
            libc::SIOCSIFNETMASK,
            (&mut r as *mut libc::ifreq).cast(),
            &format!("{name} netmask /{n}"),
        )?;
    }
    crate::log_line(&format!("net: {} is {name}, up", i.mac));
    Ok(name)
}

/// Adds routes (destination "" = the IPv4 default, "::/0" the IPv6 one).
pub fn add_routes(routes: &[protocols::agent::Route]) -> Result<()> {
    let fd = sock()?;
    for rt in routes {
        let (dst, n) = match parse_cidr(&rt.destination)? {
            (IpAddr::V4(dst), n) => (dst, n),
            (IpAddr::V6(dst), n) => {
                add_ipv6_route(dst, n, &rt.gateway, &rt.device)?;
                continue;
            }
        };
        // SAFETY: rtentry is plain old data; all-zero is a valid value.
        let mut e: libc::rtentry = unsafe { std::mem::zeroed() };
        e.rt_dst = sockaddr(dst);
        e.rt_genmask = sockaddr(mask(n));
        e.rt_flags = libc::RTF_UP;
        if n == 32 {
            e.rt_flags |= libc::RTF_HOST;
        }
        if !rt.gateway.is_empty() {
            let gw: Ipv4Addr = rt.gateway.parse().map_err(|_| {
                AgentError::InvalidArgument(format!("bad IPv4 gateway {:?}", rt.gateway))
            })?;
            e.rt_gateway = sockaddr(gw);
            e.rt_flags |= libc::RTF_GATEWAY;
        }
        // rt_dev must outlive the ioctl.
        let dev = std::ffi::CString::new(rt.device.clone())
            .map_err(|_| AgentError::InvalidArgument("bad route device".into()))?;
        if !rt.device.is_empty() {
            ifreq(&rt.device)?;
            e.rt_dev = dev.as_ptr() as *mut libc::c_char;
        }
        ioctl(
            &fd,
            libc::SIOCADDRT,
            (&mut e as *mut libc::rtentry).cast(),
            &format!("route {} via {:?}", rt.destination, rt.gateway),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(mask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(mask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(mask(32), Ipv4Addr::BROADCAST);
    }
}
