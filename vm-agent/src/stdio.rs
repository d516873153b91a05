//! Process stdio over the `janus.stdio` port: every stream of the VM multiplexed as
//! frames (protocols::stdio_frame), so output moves at channel speed without an RPC per chunk.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocols::stdio_frame::{decode_header, encode_header, FLAG_EOF, HEADER, MAX_PAYLOAD};
use runtime::aio;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use crate::error::{AgentError, Result};

pub const STDIO_PORT: &str = "janus.stdio";
/// Output frames queued for the port before the processes writing them wait.
const OUTPUT_FRAMES: usize = 32;

type Frame = (u32, u32, Vec<u8>);

/// Input streams: frames for a stream are queued to a writer task per process, so a process
/// that does not read its stdin never stalls the other streams.
type Inputs = Arc<Mutex<HashMap<u32, mpsc::UnboundedSender<Vec<u8>>>>>;

#[derive(Clone)]
pub struct Mux {
    tx: Option<mpsc::Sender<Frame>>,
    stdin: Inputs,
}

/// A process's stdio before spawn: the child's three fds (none for a terminal) and our ends.
pub struct Prepared {
    pub child: Vec<OwnedFd>,
    outs: Vec<(u32, OwnedFd)>,
    input: Option<(u32, OwnedFd)>,
    streams: protocols::agent::StdioStreams,
}

/// What to pump once the process exists.
pub struct Wiring {
    outs: Vec<(u32, OwnedFd)>,
    input: Option<(u32, OwnedFd)>,
}

impl Prepared {
    /// With a terminal, both directions go through (copies of) the pty master.
    pub fn wiring(self, pty_master: Option<&OwnedFd>) -> Result<Wiring> {
        let Some(m) = pty_master else {
            return Ok(Wiring {
                outs: self.outs,
                input: self.input,
            });
        };
        let dup = || {
            m.try_clone()
                .map_err(|e| AgentError::Internal(format!("dup pty master: {e}")))
        };
        let s = &self.streams;
        Ok(Wiring {
            outs: if s.stdout != 0 {
                vec![(s.stdout, dup()?)]
            } else {
                Vec::new()
            },
            input: if s.stdin != 0 {
                Some((s.stdin, dup()?))
            } else {
                None
            },
        })
    }
}

impl Wiring {
    /// A connected socket: `streams.stdin` feeds it, `streams.stdout` carries what it sends.
    pub fn socket(sock: OwnedFd, streams: &protocols::agent::StdioStreams) -> Result<Wiring> {
        let dup = sock
            .try_clone()
            .map_err(|e| AgentError::Internal(format!("dup socket: {e}")))?;
        Ok(Wiring {
            outs: vec![(streams.stdout, sock)],
            input: Some((streams.stdin, dup)),
        })
    }
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
        let stdin: Inputs = Arc::default();
        let Some(path) = crate::find_port(STDIO_PORT, Duration::from_secs(2)) else {
            crate::log_line("no janus.stdio port: process output is discarded");
            return Mux { tx: None, stdin };
        };
        let port = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .and_then(|f| aio::register(f.into()))
        {
            Ok(p) => Arc::new(p),
            Err(e) => {
                crate::log_line(&format!("stdio port {}: {e}", path.display()));
                return Mux { tx: None, stdin };
            }
        };
        // Bounded: a process that writes faster than the port drains waits on its pipe
        // instead of piling its output up in guest memory (OUTPUT_FRAMES x 64 KiB at most).
        let (tx, mut rx) = mpsc::channel::<Frame>(OUTPUT_FRAMES);
        let wport = port.clone();
        tokio::spawn(async move {
            // Header and payload in one write: one virtqueue buffer per frame.
            let mut out = Vec::with_capacity(HEADER + MAX_PAYLOAD);
            while let Some((stream, flags, data)) = rx.recv().await {
                out.clear();
                out.extend_from_slice(&encode_header(stream, flags, data.len()));
                out.extend_from_slice(&data);
                if aio::write_all(&wport, &out).await.is_err() {
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
                    crate::log_line("stdio port: malformed frame header, input closed");
                    break;
                };
                let mut data = vec![0u8; len];
                if read_exact(&port, &mut data).await.is_err() {
                    break;
                }
                let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
                if !data.is_empty() {
                    if let Some(w) = m.get(&stream) {
                        let _ = w.send(data);
                    }
                }
                if flags & FLAG_EOF != 0 {
                    m.remove(&stream);
                }
            }
        });
        Mux {
            tx: Some(tx),
            stdin,
        }
    }

    /// The process's fds and our ends of them.
    pub fn prepare(&self, s: &protocols::agent::StdioStreams) -> Result<Prepared> {
        let mut p = Prepared {
            child: Vec::new(),
            outs: Vec::new(),
            input: None,
            streams: s.clone(),
        };
        if s.terminal {
            return Ok(p);
        }
        if s.stdin != 0 {
            let (r, w) = pipe2()?;
            p.child.push(r);
            p.input = Some((s.stdin, w));
        } else {
            p.child.push(null()?);
        }
        for id in [s.stdout, s.stderr] {
            if id != 0 && self.tx.is_some() {
                let (r, w) = pipe2()?;
                p.child.push(w);
                p.outs.push((id, r));
            } else {
                p.child.push(null()?);
            }
        }
        Ok(p)
    }

    /// Ends a process's input after what is queued (CloseStdin).
    pub fn close_input(&self, stream: u32) {
        self.stdin
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&stream);
    }

    pub fn start(&self, w: Wiring) {
        if let Some((id, fd)) = w.input {
            if let Ok(afd) = aio::register(fd) {
                let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
                self.stdin
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, tx);
                tokio::spawn(async move {
                    while let Some(data) = rx.recv().await {
                        if aio::write_all(&afd, &data).await.is_err() {
                            break;
                        }
                    }
                    // A socket's other end sees the end of input (pipes just close).
                    let _ = nix::sys::socket::shutdown(
                        afd.as_raw_fd(),
                        nix::sys::socket::Shutdown::Write,
                    );
                });
            }
        }
        let Some(tx) = self.tx.clone() else { return };
        for (id, fd) in w.outs {
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Ok(afd) = aio::register(fd) {
                    let mut buf = vec![0u8; MAX_PAYLOAD];
                    loop {
                        // A pty master reads EIO once the terminal's last user is gone.
                        match aio::read(&afd, &mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if tx.send((id, 0, buf[..n].to_vec())).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                }
                let _ = tx.send((id, FLAG_EOF, Vec::new())).await;
            });
        }
    }
}

async fn read_exact(port: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> std::io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        match aio::read(port, &mut buf[off..]).await {
            // EOF: the host side is not connected (yet, or any more): wait for it.
            Ok(0) => tokio::time::sleep(Duration::from_millis(10)).await,
            Ok(n) => off += n,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
