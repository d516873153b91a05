//! Host side of guest processes' stdio: containerd's FIFOs, log-driver pipes, files and
//! terminals wired to streams of the VM's stdio plane.

use std::os::fd::OwnedFd;

use protocols::agent as pa;
use runtime::aio;
use runtime::vm::StdioPlane;
use tokio::task::JoinHandle;

use crate::error::{Result, ShimError};
use crate::stdio::{self, IoPaths};

/// Host side of one guest process's stdio.
#[derive(Default)]
pub struct ProcIo {
    /// Output copies; they end at the stream's EOF frame (or when the VM goes).
    pub outs: Vec<JoinHandle<()>>,
    pub stdin_task: Option<JoinHandle<()>>,
    /// Closing (or dropping) it ends the copy from containerd's stdin FIFO (CloseIO).
    pub stdin_close: Option<tokio::sync::oneshot::Sender<()>>,
    /// Input waiting for the guest process to exist (the agent drops frames for streams it
    /// does not know yet, and ctr writes stdin before Create).
    pending_in: Option<(Input, u32)>,
}

enum Input {
    Fd(OwnedFd),
    /// A terminal's stdin FIFO, opened when the copy starts.
    Fifo(String),
}

impl ProcIo {
    /// Stops the copies (the process was never created).
    pub fn abort(self) {
        for h in self.outs {
            h.abort();
        }
        if let Some(t) = self.stdin_task {
            t.abort();
        }
    }

    /// Starts the stdin copy; call once the agent has created the process.
    pub fn start_input(&mut self, plane: &StdioPlane) {
        let Some((input, sid)) = self.pending_in.take() else {
            return;
        };
        let plane = plane.clone();
        self.stdin_task = Some(tokio::spawn(async move {
            let fd = match input {
                Input::Fd(fd) => fd,
                Input::Fifo(path) => {
                    match std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&path)
                    {
                        Ok(f) => f.into(),
                        Err(_) => return,
                    }
                }
            };
            copy_in(fd, plane, sid).await
        }));
    }
}

/// Wires a process's stdio (FIFOs, `binary://`, `file://`, or a terminal) to fresh streams
/// on the plane; subscribed before the process exists.
pub async fn wire(
    plane: &StdioPlane,
    io: &IoPaths,
    ns: &str,
    id: &str,
) -> Result<(pa::StdioStreams, ProcIo)> {
    let mut s = pa::StdioStreams {
        terminal: io.terminal,
        ..Default::default()
    };
    let mut pio = ProcIo::default();
    if io.terminal {
        if !io.stdout.is_empty() {
            s.stdout = plane.alloc();
            let rx = plane.subscribe(s.stdout);
            let path = io.stdout.clone();
            pio.outs.push(tokio::spawn(async move {
                let Ok(f) = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                else {
                    return;
                };
                copy_out(rx, f.into()).await
            }));
        }
        if !io.stdin.is_empty() {
            s.stdin = plane.alloc();
            pio.pending_in = Some((Input::Fifo(io.stdin.clone()), s.stdin));
        }
        return Ok((s, pio));
    }
    let (io2, ns2, id2) = (io.clone(), ns.to_string(), id.to_string());
    let prepared = tokio::task::spawn_blocking(move || stdio::prepare(&io2, &ns2, &id2))
        .await
        .map_err(|e| ShimError::failed("blocking task", e))??;
    let mut child = prepared.child.into_iter();
    let (Some(stdin_r), Some(out), Some(err)) = (child.next(), child.next(), child.next()) else {
        return Err(ShimError::Internal("stdio: missing descriptors".into()));
    };
    let mut stdin_close = None;
    if let Some(w) = prepared.stdin_pipe {
        // containerd's FIFO -> pipe (CloseIO ends it) -> our reader -> frames.
        stdin_close = Some(stdio::copy_stdin(io.stdin.clone(), w));
        s.stdin = plane.alloc();
        pio.pending_in = Some((Input::Fd(stdin_r), s.stdin));
    }
    for (path, fd, slot) in [
        (&io.stdout, out, &mut s.stdout),
        (&io.stderr, err, &mut s.stderr),
    ] {
        if path.is_empty() {
            continue;
        }
        *slot = plane.alloc();
        let rx = plane.subscribe(*slot);
        pio.outs.push(tokio::spawn(copy_out(rx, fd)));
    }
    pio.stdin_close = stdin_close;
    Ok((s, pio))
}

/// Frames of one stream -> a host descriptor (FIFO, pipe to a log driver, or a file, which
/// epoll cannot watch: then a plain thread writes it).
async fn copy_out(mut rx: tokio::sync::mpsc::Receiver<Vec<u8>>, fd: OwnedFd) {
    let spare = fd.try_clone().ok();
    match aio::register(fd) {
        Ok(afd) => {
            while let Some(d) = rx.recv().await {
                if aio::write_all(&afd, &d).await.is_err() {
                    break;
                }
            }
        }
        Err(_) => {
            let Some(spare) = spare else { return };
            let _ = tokio::task::spawn_blocking(move || {
                use std::io::Write;
                let mut f = std::fs::File::from(spare);
                while let Some(d) = rx.blocking_recv() {
                    if f.write_all(&d).is_err() {
                        break;
                    }
                }
            })
            .await;
        }
    }
}

/// A host descriptor (stdin pipe or terminal FIFO) -> frames; EOF becomes an EOF frame.
async fn copy_in(fd: OwnedFd, plane: StdioPlane, stream: u32) {
    if let Ok(afd) = aio::register(fd) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match aio::read(&afd, &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if plane.write(stream, &buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
    let _ = plane.close(stream).await;
}
