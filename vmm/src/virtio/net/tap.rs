//! The host side of virtio-net: a tap device carrying virtio-net headers.

use std::fs::File;
use std::os::fd::AsRawFd;

use super::device::HDR_LEN;

/// Opens (or creates) tap `name` in the calling process's network namespace, with virtio-net
/// headers of `HDR_LEN` bytes.
pub fn open_tap(name: &str) -> std::io::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("tap name {name:?}: 1 to {} bytes", libc::IFNAMSIZ - 1),
        ));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    // SAFETY: TUNSETIFF reads an ifreq we own; the fd is the tun device we opened.
    if unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &ifr) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let size: libc::c_int = HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads an int we own.
    if unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f)
}
