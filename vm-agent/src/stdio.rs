//! Process stdio over the `janus.stdio` port: every stream of the VM multiplexed as
//! frames (protocols::stdio_frame), so output moves at channel speed without an RPC per chunk.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocols::stdio_frame::{decode_header, encode_header, FLAG_EOF, HEADER, MAX_PAYLOAD};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

use crate::containers::{AgentError, Result};

pub const STDIO_PORT: &str = "janus.stdio";

type Frame = (u32, u32, Vec<u8>);

#[derive(Clone)]
pub struct Mux {
    tx: Option<mpsc::UnboundedSender<Frame>>,
    stdin: Arc<Mutex<HashMap<u32, pipe::Sender>>>,
}

fn pipe2() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| AgentError::Internal(format!("pipe: {e}")))
}

fn null() -> Result<OwnedFd> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map(OwnedFd::from)
        .map_err(|e| AgentError::Internal(format!("/dev/null: {e}")))
}

impl Mux {
    /// Opens the port (if the VM has one) and starts the frame pumps.
    pub fn open() -> Mux {
        let stdin: Arc<Mutex<HashMap<u32, pipe::Sender>>> = Arc::default();
        let Some(path) = crate::find_port(STDIO_PORT, Duration::from_secs(2)) else {
            crate::log_line("no janus.stdio port: process output is discarded");
            return Mux { tx: None, stdin };
        };
        let fd: OwnedFd = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
        {
            Ok(f) => f.into(),
            Err(e) => {
                crate::log_line(&format!("open {}: {e}", path.display()));
                return Mux { tx: None, stdin };
            }
        };
        crate::set_nonblocking(&fd);
        // SAFETY: `fd` is an OwnedFd moved into the AsyncFd: open and unchanged while it lives.
        let port = match unsafe { AsyncFd::register(fd) } {
            Ok(p) => Arc::new(p),
            Err(e) => {
                crate::log_line(&format!("stdio port: {e}"));
                return Mux { tx: None, stdin };
            }
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<Frame>();
        let wport = port.clone();
        tokio::spawn(async move {
            while let Some((stream, flags, data)) = rx.recv().await {
                let h = encode_header(stream, flags, data.len());
                if crate::port_write(&wport, &h).await.is_err()
                    || crate::port_write(&wport, &data).await.is_err()
                {
                    break;
                }
            }
        });
        let map = stdin.clone();
        tokio::spawn(async move {
            let mut hdr = [0u8; HEADER];
            loop {
                if read_exact(&port, &mut hdr).await.is_err() {
                    break;
                }
                let Some((stream, flags, len)) = decode_header(&hdr) else {
                    crate::log_line("stdio port: malformed frame header, stream closed");
                    break;
                };
                let mut data = vec![0u8; len];
                if read_exact(&port, &mut data).await.is_err() {
                    break;
                }
                let w = map
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&stream);
                if let Some(mut w) = w {
                    if !data.is_empty() && w.write_all(&data).await.is_err() {
                        continue;
                    }
                    if flags & FLAG_EOF == 0 {
                        map.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(stream, w);
                    }
                }
            }
        });
        Mux {
            tx: Some(tx),
            stdin,
        }
    }

    /// The process's three fds, the output pipes to pump and the stdin pipe to feed.
    #[allow(clippy::type_complexity)]
    pub fn prepare(
        &self,
        s: &protocols::agent::StdioStreams,
    ) -> Result<(Vec<OwnedFd>, Vec<(u32, OwnedFd)>, Option<(u32, OwnedFd)>)> {
        let mut child = Vec::new();
        let mut outs = Vec::new();
        let mut input = None;
        if s.stdin != 0 {
            let (r, w) = pipe2()?;
            child.push(r);
            input = Some((s.stdin, w));
        } else {
            child.push(null()?);
        }
        for id in [s.stdout, s.stderr] {
            if id != 0 && self.tx.is_some() {
                let (r, w) = pipe2()?;
                child.push(w);
                outs.push((id, r));
            } else {
                child.push(null()?);
            }
        }
        Ok((child, outs, input))
    }

    pub fn start(&self, outs: Vec<(u32, OwnedFd)>, input: Option<(u32, OwnedFd)>) {
        if let Some((id, w)) = input {
            if let Ok(s) = pipe::Sender::from_owned_fd(w) {
                self.stdin
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, s);
            }
        }
        let Some(tx) = self.tx.clone() else { return };
        for (id, r) in outs {
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(mut rd) = pipe::Receiver::from_owned_fd(r) else {
                    let _ = tx.send((id, FLAG_EOF, Vec::new()));
                    return;
                };
                let mut buf = vec![0u8; MAX_PAYLOAD];
                loop {
                    match rd.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if tx.send((id, 0, buf[..n].to_vec())).is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = tx.send((id, FLAG_EOF, Vec::new()));
            });
        }
    }
}

async fn read_exact(port: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> std::io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        match crate::port_read(port, &mut buf[off..]).await {
            // EOF: the host side is not connected (yet, or any more): wait for it.
            Ok(0) => tokio::time::sleep(Duration::from_millis(10)).await,
            Ok(n) => off += n,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
            Err(e) => return Err(e),
        }
    }
    let _ = port.as_raw_fd();
    Ok(())
}
