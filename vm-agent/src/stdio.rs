//! Process stdio over the `janus.stdio` port: every stream of the VM multiplexed as
//! frames (protocols::stdio_frame), so output moves at channel speed without an RPC per chunk.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use protocols::stdio_frame::{decode_header, encode_header, FLAG_EOF, HEADER, MAX_PAYLOAD};
use runtime::aio;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use crate::error::{AgentError, Result};

pub const STDIO_PORT: &str = "janus.stdio";
/// Output frames queued for the port before the processes writing them wait.
const OUTPUT_FRAMES: usize = 32;

/// Input frames queued per stream before the frame reader waits (64 KiB each at most).
const INPUT_FRAMES: usize = 4;

type Frame = (u32, u32, Vec<u8>);

/// Input streams by id, each written to its process by a task of its own.
///
/// Backpressure: a stream's queue holds INPUT_FRAMES; when it is full (the process does not
/// read its stdin), the frame reader waits for room and reads nothing more from the port
/// meanwhile, so the host's writes to the port wait in turn. Input is never dropped, and
/// guest memory stays bounded. The price is head-of-line blocking: one port carries every
/// input stream of the VM, so the other streams' input waits too. We accept it: without
/// per-stream credit in the frame protocol the only other choices are unbounded buffering
/// or dropping input. The queue absorbs bursts, so a process that reads slowly stalls no
/// one for long, and the wait ends when the process reads or when the last holder of its
/// stdin is gone (the pipe breaks, the writer task ends, the queue closes). CloseStdin does
/// not end it: it closes the input after what is queued, and that is what is stuck. Output
/// flows the other way on the port and never waits on input.
#[derive(Clone, Default)]
struct Inputs(Arc<Mutex<HashMap<u32, mpsc::Sender<Vec<u8>>>>>);

impl Inputs {
    fn map(&self) -> MutexGuard<'_, HashMap<u32, mpsc::Sender<Vec<u8>>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts feeding `stream` into `fd`.
    fn add(&self, stream: u32, fd: AsyncFd<OwnedFd>) {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(INPUT_FRAMES);
        self.map().insert(stream, tx);
        tokio::spawn(async move {
            while let Some(data) = rx.recv().await {
                if aio::write_all(&fd, &data).await.is_err() {
                    break;
                }
            }
            // A socket's other end sees the end of input (pipes just close).
            let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Write);
        });
    }

    /// Ends a stream's input after what is queued.
    fn close(&self, stream: u32) {
        self.map().remove(&stream);
    }

    /// Hands one frame to its stream, waiting while the stream's queue is full.
    async fn deliver(&self, stream: u32, flags: u32, data: Vec<u8>) {
        if !data.is_empty() {
            // A clone, so the map's lock is not held while waiting.
            let tx = self.map().get(&stream).cloned();
            if let Some(tx) = tx {
                // Fails only when the writer task has ended: its process is gone.
                let _ = tx.send(data).await;
            }
        }
        if flags & FLAG_EOF != 0 {
            self.close(stream);
        }
    }
}

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
        let stdin = Inputs::default();
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
        let inputs = stdin.clone();
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
                inputs.deliver(stream, flags, data).await;
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
        self.stdin.close(stream);
    }

    pub fn start(&self, w: Wiring) {
        if let Some((id, fd)) = w.input {
            if let Ok(afd) = aio::register(fd) {
                self.stdin.add(id, afd);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A process that does not read its stdin: the frame reader waits once the stream's
    /// queue is full (it does not buffer on), and nothing is lost once the process reads.
    #[tokio::test(flavor = "current_thread")]
    async fn stalled_stdin_holds_the_reader_and_loses_nothing() {
        const FRAME: usize = 16 * 1024;
        const FRAMES: usize = 64;
        let (r, w) = pipe2().unwrap();
        let pipe_frames =
            nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_GETPIPE_SZ).unwrap() as usize / FRAME;
        let inputs = Inputs::default();
        inputs.add(1, aio::register(w).unwrap());
        let delivered = Arc::new(AtomicUsize::new(0));
        let reader = tokio::spawn({
            let (inputs, delivered) = (inputs.clone(), delivered.clone());
            async move {
                for i in 0..FRAMES {
                    inputs.deliver(1, 0, vec![i as u8; FRAME]).await;
                    delivered.fetch_add(1, Ordering::SeqCst);
                }
                inputs.deliver(1, FLAG_EOF, Vec::new()).await;
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let stalled = delivered.load(Ordering::SeqCst);
        // The pipe, the writer task's frame in hand and the queue: then the reader waits.
        assert!(
            stalled <= pipe_frames + 1 + INPUT_FRAMES + 1,
            "{stalled} frames taken while nobody reads"
        );
        assert!(!reader.is_finished());

        let r = aio::register(r).unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match aio::read(&r, &mut buf).await.unwrap() {
                0 => break,
                n => got.extend_from_slice(&buf[..n]),
            }
        }
        reader.await.unwrap();
        assert_eq!(got.len(), FRAMES * FRAME);
        for (i, frame) in got.chunks(FRAME).enumerate() {
            assert!(
                frame.iter().all(|b| *b == i as u8),
                "frame {i} out of order"
            );
        }
    }
}
