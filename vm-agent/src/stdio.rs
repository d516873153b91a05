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
/// Size of the pipes that carry a process's output to the agent.
const OUTPUT_PIPE: usize = 256 * 1024;

/// Input frames queued per stream before the frame reader waits (64 KiB each at most).
const INPUT_FRAMES: usize = 4;

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
    out: Option<Arc<OutPort>>,
    stdin: Inputs,
}

/// The write side of the port, shared by every output stream. Each stream's pump writes its
/// frames itself, a whole frame under `lock` so frames never interleave; the lock is fair
/// (FIFO), so streams take turns. Backpressure: a pump waiting for the lock or for the port
/// holds at most one frame, and the process behind it waits on its full pipe; guest memory
/// stays bounded without a queue.
///
/// Output from a pipe goes to the port by splice, without passing through the agent's memory:
/// under TCG every byte copied in the guest costs emulated instructions, and copying costs
/// each byte at least two copies (pipe to agent, agent to the port's kernel buffer, in 32 KiB
/// writes). Splice moves pipe pages by reference: the header, then the payload from the
/// source pipe, into the staging pipe, then all of it to the port, where the virtio console
/// driver hands the pages themselves to the host as one virtqueue buffer per frame.
struct OutPort {
    fd: Arc<AsyncFd<OwnedFd>>,
    /// The staging pipe (read end, write end), used by the lock's holder only and empty
    /// between frames. `None`: it could not be made, or a frame failed halfway; frames are
    /// then copied.
    lock: tokio::sync::Mutex<Option<(OwnedFd, OwnedFd)>>,
}

impl OutPort {
    fn new(fd: Arc<AsyncFd<OwnedFd>>) -> OutPort {
        let staging = pipe2().ok().map(|(r, w)| {
            aio::set_nonblocking(&w);
            // Room for the header's buffer and a payload's (16 pages, 17 when it starts
            // mid-page) so that a frame goes to the port in one piece; best effort, a frame
            // that does not fit goes in several (splice_frame drains as it stages).
            let _ = nix::fcntl::fcntl(
                &w,
                nix::fcntl::FcntlArg::F_SETPIPE_SZ(2 * MAX_PAYLOAD as i32),
            );
            (r, w)
        });
        OutPort {
            fd,
            lock: tokio::sync::Mutex::new(staging),
        }
    }

    /// A frame from memory (EOF frames, and output that is not a pipe).
    async fn write_frame(&self, frame: &[u8]) -> std::io::Result<()> {
        let _turn = self.lock.lock().await;
        aio::write_all(&self.fd, frame).await
    }

    /// Sends the next `n` bytes of `src` as one frame; `src` holds at least that much, and
    /// nothing else reads it.
    async fn splice_frame(&self, id: u32, src: &OwnedFd, n: usize) -> std::io::Result<()> {
        let mut turn = self.lock.lock().await;
        let header = encode_header(id, 0, n);
        let Some((sr, sw)) = turn.as_ref() else {
            return self.copy_frame(header, src, n).await;
        };
        let r = self.stage_and_send(sr, sw, header, src, n).await;
        if r.is_err() {
            // Whatever is left in the staging pipe would corrupt the next frame.
            *turn = None;
        }
        r
    }

    async fn stage_and_send(
        &self,
        sr: &OwnedFd,
        sw: &OwnedFd,
        header: [u8; HEADER],
        src: &OwnedFd,
        n: usize,
    ) -> std::io::Result<()> {
        // The staging pipe is empty: the header (at most PIPE_BUF bytes, all or nothing) fits.
        if nix::unistd::write(sw, &header)? != HEADER {
            return Err(std::io::Error::other("short header write to a pipe"));
        }
        let mut staged = HEADER;
        let mut left = n;
        while left > 0 {
            match splice(src.as_raw_fd(), sw.as_raw_fd(), left) {
                Ok(m) if m > 0 => {
                    left -= m;
                    staged += m;
                }
                // The data is there, so only a full staging pipe stops the move: make room.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    staged -= self.send_some(sr, staged).await?;
                }
                // Should not happen (a pipe's data moving to a pipe); the frame still gets
                // the bytes its header announced.
                _ => {
                    while staged > 0 {
                        staged -= self.send_some(sr, staged).await?;
                    }
                    let mut rest = vec![0u8; left];
                    read_now(src, &mut rest)?;
                    return aio::write_all(&self.fd, &rest).await;
                }
            }
        }
        while staged > 0 {
            staged -= self.send_some(sr, staged).await?;
        }
        Ok(())
    }

    /// One splice of up to `staged` bytes from the staging pipe to the port, once it takes
    /// some; how many it took.
    async fn send_some(&self, sr: &OwnedFd, staged: usize) -> std::io::Result<usize> {
        if staged == 0 {
            return Err(std::io::Error::other(
                "staging pipe full but nothing staged",
            ));
        }
        loop {
            let mut g = self.fd.writable().await?;
            match g.try_io(|p| splice(sr.as_raw_fd(), p.as_raw_fd(), staged)) {
                Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// splice_frame without a staging pipe.
    async fn copy_frame(
        &self,
        header: [u8; HEADER],
        src: &OwnedFd,
        n: usize,
    ) -> std::io::Result<()> {
        let mut frame = vec![0u8; HEADER + n];
        frame[..HEADER].copy_from_slice(&header);
        read_now(src, &mut frame[HEADER..])?;
        aio::write_all(&self.fd, &frame).await
    }
}

/// Fills `buf` from `fd`, which holds that much already.
fn read_now(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        match nix::unistd::read(fd, &mut buf[off..])? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            k => off += k,
        }
    }
    Ok(())
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
            return Mux { out: None, stdin };
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
                return Mux { out: None, stdin };
            }
        };
        let inputs = stdin.clone();
        let rport = port.clone();
        tokio::spawn(async move {
            let mut hdr = [0u8; HEADER];
            loop {
                if read_exact(&rport, &mut hdr).await.is_err() {
                    break;
                }
                let Some((stream, flags, len)) = decode_header(&hdr) else {
                    crate::log_line("stdio port: malformed frame header, input closed");
                    break;
                };
                let mut data = vec![0u8; len];
                if read_exact(&rport, &mut data).await.is_err() {
                    break;
                }
                inputs.deliver(stream, flags, data).await;
            }
        });
        Mux {
            out: Some(Arc::new(OutPort::new(port))),
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
            if id != 0 && self.out.is_some() {
                let (r, w) = pipe2()?;
                // A bigger pipe than the default 64 KiB: the process writes several frames'
                // worth before it waits for the pump, so the (single) vCPU switches between
                // the two less often; every switch also flushes TCG's software TLB.
                let _ =
                    nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(OUTPUT_PIPE as i32));
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
        let Some(port) = self.out.clone() else { return };
        for (id, fd) in w.outs {
            tokio::spawn(pump_out(port.clone(), id, fd));
        }
    }
}

/// Carries one output stream to the port as frames, then its EOF frame.
async fn pump_out(port: Arc<OutPort>, id: u32, fd: OwnedFd) {
    if let Ok(src) = aio::register(fd) {
        let is_pipe = nix::sys::stat::fstat(src.get_ref())
            .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFIFO);
        if is_pipe {
            let _ = splice_out(&port, id, &src).await;
        } else {
            // A pty master or a socket: no splice from those.
            copy_out(&port, id, &src).await;
        }
    }
    let _ = port.write_frame(&encode_header(id, FLAG_EOF, 0)).await;
}

/// The pump for a pipe: frames of what the pipe holds, moved by splice (OutPort).
async fn splice_out(port: &OutPort, id: u32, src: &AsyncFd<OwnedFd>) -> std::io::Result<()> {
    loop {
        let mut g = src.readable().await?;
        let mut held: libc::c_int = 0;
        // SAFETY: FIONREAD stores one int through the pointer, which is to a live c_int.
        if unsafe { libc::ioctl(src.as_raw_fd(), libc::FIONREAD, &mut held) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if held > 0 {
            let n = (held as usize).min(MAX_PAYLOAD);
            port.splice_frame(id, src.get_ref(), n).await?;
            continue;
        }
        // Readable but empty: the end (every writer gone), or stale readiness (all read);
        // a read tells which (and clears stale readiness). What it reads, if output came
        // meanwhile, goes as a frame of its own.
        let mut frame = [0u8; HEADER + 1024];
        let r = g.try_io(|s| {
            nix::unistd::read(s.get_ref(), &mut frame[HEADER..]).map_err(std::io::Error::from)
        });
        match r {
            Ok(Ok(0)) => return Ok(()),
            Ok(Ok(k)) => {
                frame[..HEADER].copy_from_slice(&encode_header(id, 0, k));
                port.write_frame(&frame[..HEADER + k]).await?;
            }
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
}

/// The copying pump: read into the frame after its header, write the frame.
async fn copy_out(port: &OutPort, id: u32, src: &AsyncFd<OwnedFd>) {
    let mut frame = vec![0u8; HEADER + MAX_PAYLOAD];
    loop {
        // A pty master reads EIO once the terminal's last user is gone.
        let n = match aio::read(src, &mut frame[HEADER..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        frame[..HEADER].copy_from_slice(&encode_header(id, 0, n));
        if port.write_frame(&frame[..HEADER + n]).await.is_err() {
            return;
        }
    }
}

/// One non-blocking splice of up to `len` bytes.
fn splice(from: std::os::fd::RawFd, to: std::os::fd::RawFd, len: usize) -> std::io::Result<usize> {
    // SAFETY: plain descriptors and null offsets (both ends are pipes or a character device).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
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

    /// Reads frames off `r` until `stream`'s EOF frame: the payloads, concatenated, and the
    /// largest payload.
    async fn frames(r: OwnedFd, stream: u32) -> (Vec<u8>, usize) {
        let r = aio::register(r).unwrap();
        let (mut got, mut largest) = (Vec::new(), 0);
        loop {
            let mut h = [0u8; HEADER];
            read_exact(&r, &mut h).await.unwrap();
            let (s, flags, len) = decode_header(&h).unwrap();
            assert_eq!(s, stream);
            let mut d = vec![0u8; len];
            read_exact(&r, &mut d).await.unwrap();
            got.extend_from_slice(&d);
            largest = largest.max(len);
            if flags & FLAG_EOF != 0 {
                assert_eq!(len, 0);
                return (got, largest);
            }
        }
    }

    fn out_port(w: OwnedFd) -> Arc<OutPort> {
        Arc::new(OutPort::new(Arc::new(aio::register(w).unwrap())))
    }

    /// Output from a pipe (the splice path; also with a staging pipe too small for a frame,
    /// so frames go to the port in pieces) and from a socket (the copying path) arrives whole,
    /// in order, in frames of at most MAX_PAYLOAD, then EOF.
    #[tokio::test(flavor = "current_thread")]
    async fn output_is_framed_whole_and_in_order() {
        let data: Vec<u8> = (0..3 * MAX_PAYLOAD + 1234)
            .map(|i| (i % 251) as u8)
            .collect();
        for (socket, small_staging) in [(false, false), (false, true), (true, false)] {
            let (src_r, src_w): (OwnedFd, OwnedFd) = if socket {
                let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
                (a.into(), b.into())
            } else {
                pipe2().unwrap()
            };
            let (port_r, port_w) = pipe2().unwrap();
            let port = out_port(port_w);
            if small_staging {
                let staging = port.lock.try_lock().unwrap();
                let (_, w) = staging.as_ref().unwrap();
                nix::fcntl::fcntl(w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(4096)).unwrap();
            }
            let pump = tokio::spawn(pump_out(port, 9, src_r));
            let writer = {
                let data = data.clone();
                tokio::task::spawn_blocking(move || {
                    use std::io::Write;
                    let mut f = std::fs::File::from(src_w);
                    // Uneven writes, so frames do not line up with them.
                    for chunk in data.chunks(10_000) {
                        f.write_all(chunk).unwrap();
                    }
                })
            };
            let (got, largest) = frames(port_r, 9).await;
            writer.await.unwrap();
            pump.await.unwrap();
            assert!(largest <= MAX_PAYLOAD);
            assert!(
                got == data,
                "socket={socket} small_staging={small_staging}: output differs"
            );
        }
    }
}
