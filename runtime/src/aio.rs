//! Async reads and writes on raw descriptors (pty masters, virtio-serial ports, pipes) that
//! tokio has no type for, through `AsyncFd` readiness; and blocking work run from an RPC
//! handler (`blocking`).

use std::os::fd::{AsRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;

use crate::Status;

pub fn set_nonblocking(fd: &impl AsRawFd) {
    // SAFETY: fcntl flag changes on a descriptor the caller holds open.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}

/// Makes `fd` non-blocking and registers it with the reactor.
pub fn register(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    set_nonblocking(&fd);
    // SAFETY: `fd` is an OwnedFd moved into the AsyncFd: open and unchanged while it lives.
    unsafe { AsyncFd::register(fd) }.map_err(|e| std::io::Error::other(e.to_string()))
}

/// One read; `Ok(0)` is end of file (or, for a virtio-serial port, no host connected).
pub async fn read(afd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        let mut g = afd.readable().await?;
        match g.try_io(|inner| {
            // SAFETY: reading into a live buffer of the given length.
            let n = unsafe { libc::read(inner.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        }) {
            Ok(r) => return r,
            Err(_would_block) => continue,
        }
    }
}

/// Runs blocking work (syscalls, cgroup files, the setup handshake) on tokio's blocking pool,
/// so an RPC handler does not stall the runtime's threads; a panic there answers Internal.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::failed("blocking task", e))?
}

/// Writes all of `buf`.
pub async fn write_all(afd: &AsyncFd<OwnedFd>, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        let mut g = afd.writable().await?;
        match g.try_io(|inner| {
            // SAFETY: writing from a live buffer of the given length.
            let n = unsafe { libc::write(inner.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        }) {
            Ok(Ok(n)) => buf = &buf[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

/// Copies `from` into `to` until `from` ends or either side fails (a closed peer ends a
/// copy, it is not an error to report); returns the bytes copied.
pub async fn pump<R>(from: &mut R, to: &AsyncFd<OwnedFd>, buf_size: usize) -> u64
where
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; buf_size];
    let mut total = 0;
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return total,
            Ok(n) => {
                if write_all(to, &buf[..n]).await.is_err() {
                    return total;
                }
                total += n as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn pipe_round_trip() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let (r, w) = (register(r).unwrap(), register(w).unwrap());
        write_all(&w, b"hello").await.unwrap();
        drop(w);
        let mut buf = [0u8; 16];
        let n = read(&r, &mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(read(&r, &mut buf).await.unwrap(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn pump_copies_until_the_source_ends() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let (r, w) = (register(r).unwrap(), register(w).unwrap());
        let mut from: &[u8] = &[7u8; 100_000];
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match read(&r, &mut buf).await.unwrap() {
                    0 => return got,
                    n => got.extend_from_slice(&buf[..n]),
                }
            }
        });
        assert_eq!(pump(&mut from, &w, 1024).await, 100_000);
        drop(w);
        assert_eq!(reader.await.unwrap(), vec![7u8; 100_000]);
    }
}
