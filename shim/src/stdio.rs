//! Process stdio: containerd FIFOs, `binary://` log drivers, `file://` URIs and terminals.
//!
//! Without a terminal the process gets the FIFO (or file, or log-driver pipe) descriptors
//! themselves: its output goes to containerd without a copy through the shim. Only stdin
//! keeps a second writer in the shim, so the process sees EOF exactly when containerd
//! calls CloseIO. With a terminal the shim copies between the pty master and the FIFOs.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio as PStdio};
use std::sync::Arc;
use std::time::Duration;

use runtime::aio;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::error::{Result, ShimError};

#[derive(Debug, Clone, Default)]
pub struct IoPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// Descriptors prepared for a new process.
pub struct Prepared {
    /// stdin, stdout, stderr for the process (empty with a terminal).
    pub child: Vec<OwnedFd>,
    /// Write end of the process's stdin pipe, fed from the stdin FIFO by `copy_stdin`.
    pub stdin_pipe: Option<OwnedFd>,
}

enum Target {
    Null,
    Fifo(String),
    File(String),
    Binary { path: String, args: Vec<String> },
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_target(uri: &str) -> Result<Target> {
    if uri.is_empty() {
        return Ok(Target::Null);
    }
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Ok(Target::Fifo(uri.to_string()));
    };
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    // binary:///abs/path has an empty host; binary://host/path is not meaningful here.
    if !path.starts_with('/') {
        return Err(ShimError::InvalidArgument(format!(
            "stdio URI {uri:?}: path must be absolute"
        )));
    }
    let path = percent_decode(path);
    match scheme {
        "fifo" => Ok(Target::Fifo(path)),
        "file" => Ok(Target::File(path)),
        "binary" => {
            let mut args = Vec::new();
            for kv in query.split('&').filter(|s| !s.is_empty()) {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                args.push(percent_decode(k));
                if !v.is_empty() {
                    args.push(percent_decode(v));
                }
            }
            Ok(Target::Binary { path, args })
        }
        other => Err(ShimError::InvalidArgument(format!(
            "stdio URI {uri:?}: unsupported scheme {other:?} (fifo path, binary:// or file://)"
        ))),
    }
}

fn io_err(what: &str, path: &str, e: std::io::Error) -> ShimError {
    if e.kind() == std::io::ErrorKind::NotFound {
        ShimError::InvalidArgument(format!("{what} {path}: {e}"))
    } else {
        ShimError::failed(format!("{what} {path}"), e)
    }
}

fn open_null() -> Result<OwnedFd> {
    Ok(OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| io_err("open", "/dev/null", e))?
        .into())
}

/// An `O_PATH` handle on a FIFO: the FIFO can be reopened through it (`/proc/self/fd/N`)
/// with any access, even after its path was unlinked or replaced.
fn fifo_handle(path: &str) -> std::io::Result<Arc<OwnedFd>> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(path)?;
    Ok(Arc::new(f.into()))
}

/// Opens the FIFO behind `handle` with `flags` (no O_CLOEXEC needed: std sets it).
fn reopen(handle: &OwnedFd, read: bool, write: bool, flags: i32) -> std::io::Result<OwnedFd> {
    let p = format!("/proc/self/fd/{}", handle.as_raw_fd());
    let f = OpenOptions::new()
        .read(read)
        .write(write)
        .custom_flags(flags)
        .open(p)?;
    Ok(f.into())
}

/// Ends a blocking open of the FIFO behind `handle`, pending or about to start: while a
/// read-write descriptor is held, both ends have a partner, so such an open returns at
/// once. The caller holds the returned descriptor until the opener has returned.
fn unblock(handle: &OwnedFd) -> Option<OwnedFd> {
    // O_RDWR on a FIFO never blocks (Linux): it is a reader and a writer at once.
    reopen(handle, true, true, 0).ok()
}

/// Opens an output FIFO for the process: read-write (the process never gets EPIPE once the
/// client has gone), but only after the client's reader has the FIFO open. A FIFO's buffer
/// lives only while someone has it open: a process that wrote and exited (and the shim that
/// closed its copy) before the reader's open would take its output with it (`ctr tasks exec
/// ... echo ok` printed nothing, about 1 exec in 100 with 4 at once). A blocking write-only
/// open waits for the reader; after 10s without one the FIFO is opened anyway.
fn open_out_fifo(path: &str) -> Result<OwnedFd> {
    let rw = |h: &OwnedFd| reopen(h, true, true, 0).map_err(|e| io_err("open stdio fifo", path, e));
    // Not a FIFO, or not there: the open says why.
    let handle = fifo_handle(path).map_err(|e| io_err("open stdio fifo", path, e))?;
    // The usual case: the reader is already there (ENXIO from a non-blocking write-only
    // open means it is not).
    if let Ok(_reader_present) = reopen(&handle, false, true, libc::O_NONBLOCK) {
        return rw(&handle);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let h = handle.clone();
    let opener = std::thread::spawn(move || {
        let _ = tx.send(reopen(&h, false, true, 0));
    });
    if rx.recv_timeout(Duration::from_secs(10)).is_err() {
        log::warn!("stdio fifo {path}: no reader after 10s, opening it anyway");
        let _partner = unblock(&handle);
        let _ = opener.join();
    }
    rw(&handle)
}

fn open_file(path: &str) -> Result<OwnedFd> {
    if let Some(parent) = Path::new(path).parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| io_err("create", &parent.display().to_string(), e))?;
    }
    Ok(OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .map_err(|e| io_err("open log file", path, e))?
        .into())
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| ShimError::failed("pipe", e))
}

/// Starts a containerd logging binary: fd 3 = stdout, fd 4 = stderr, fd 5 = "ready" pipe
/// the driver closes once it is set up. Returns the write ends for the process.
fn start_binary(path: &str, args: &[String], ns: &str, id: &str) -> Result<(OwnedFd, OwnedFd)> {
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (ready_r, ready_w) = pipe()?;
    let fds = [out_r.as_raw_fd(), err_r.as_raw_fd(), ready_w.as_raw_fd()];
    let mut cmd = Command::new(path);
    cmd.args(args)
        .env("CONTAINER_ID", id)
        .env("CONTAINER_NAMESPACE", ns)
        .stdin(PStdio::null())
        .stdout(PStdio::null())
        .stderr(PStdio::null());
    // SAFETY: only async-signal-safe dup2 calls run between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Move the sources out of the way first so dup2 cannot clobber one with another.
            let mut hi = [0; 3];
            for (i, fd) in fds.iter().enumerate() {
                hi[i] = libc::fcntl(*fd, libc::F_DUPFD, 10);
                if hi[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, fd) in hi.iter().enumerate() {
                if libc::dup2(*fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    // The log driver is reaped by the shim's reaper like any other child.
    cmd.spawn()
        .map_err(|e| io_err("start logging binary", path, e))?;
    drop((out_r, err_r, ready_w));
    // Wait (bounded) until the driver closes its ready pipe.
    let mut f = File::from(ready_r);
    let fd = f.as_raw_fd();
    let mut pfd = [nix::poll::PollFd::new(
        // SAFETY: fd belongs to `f`, alive for this call.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
        nix::poll::PollFlags::POLLIN,
    )];
    let ready = nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(10_000u16)).unwrap_or(0);
    if ready == 0 {
        return Err(ShimError::Internal(format!(
            "logging binary {path} did not signal readiness within 10s"
        )));
    }
    let mut b = [0u8; 1];
    let _ = std::io::Read::read(&mut f, &mut b);
    Ok((out_w, err_w))
}

/// Opens everything a process needs. Blocking (waits for a log driver): call from a
/// blocking context.
pub fn prepare(io: &IoPaths, ns: &str, id: &str) -> Result<Prepared> {
    let mut stdin_pipe = None;
    if io.terminal {
        return Ok(Prepared {
            child: Vec::new(),
            stdin_pipe,
        });
    }
    let stdin = if io.stdin.is_empty() {
        open_null()?
    } else {
        // The FIFO is copied into a pipe: the process sees EOF when containerd's writer
        // closes or on CloseIO, whichever comes first, and never before the writer opened.
        let (r, w) = pipe()?;
        stdin_pipe = Some(w);
        r
    };
    let out_t = parse_target(&io.stdout)?;
    let err_t = parse_target(&io.stderr)?;
    let (stdout, stderr) = match (&out_t, &err_t) {
        (Target::Binary { path, args }, _) => start_binary(path, args, ns, id)?,
        (Target::File(p), Target::File(q)) if p == q => {
            let f = open_file(p)?;
            let g = f.try_clone().map_err(|e| io_err("dup", p, e))?;
            (f, g)
        }
        _ => (open_target(&out_t)?, open_target(&err_t)?),
    };
    Ok(Prepared {
        child: vec![stdin, stdout, stderr],
        stdin_pipe,
    })
}

fn open_target(t: &Target) -> Result<OwnedFd> {
    match t {
        Target::Null => open_null(),
        Target::Fifo(p) => open_out_fifo(p),
        Target::File(p) => open_file(p),
        Target::Binary { .. } => Err(ShimError::InvalidArgument(
            "binary:// must be given for stdout".into(),
        )),
    }
}

/// Copies the stdin FIFO into the process's stdin pipe until EOF, or until the returned
/// sender is used or dropped (CloseIO, process exit).
pub fn copy_stdin(path: String, pipe_w: OwnedFd) -> tokio::sync::oneshot::Sender<()> {
    let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let Ok(handle) = fifo_handle(&path) else {
            return;
        };
        // Opening a FIFO for reading blocks until a writer appears: that is the point (the
        // process must not see EOF before containerd's writer came and went).
        let h = handle.clone();
        let mut open = tokio::task::spawn_blocking(move || reopen(&h, true, false, 0));
        let reader = tokio::select! {
            r = &mut open => r,
            _ = &mut rx => {
                // The client may never open its end (it gave up, or already came and
                // went): end the open, whether it is pending or not yet started, so no
                // thread is left blocked in it (they used to pile up until the blocking
                // pool was exhausted and the shim wedged).
                let _partner = unblock(&handle);
                let _ = open.await;
                return;
            }
        };
        let Ok(Ok(reader)) = reader else { return };
        copy_until_closed(reader, pipe_w, rx).await;
    });
    tx
}

async fn copy_until_closed(
    reader: OwnedFd,
    pipe_w: OwnedFd,
    mut rx: tokio::sync::oneshot::Receiver<()>,
) {
    let (Ok(reader), Ok(writer)) = (aio::register(reader), aio::register(pipe_w)) else {
        return;
    };
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = tokio::select! {
            r = aio::read(&reader, &mut buf) => r,
            _ = &mut rx => break,
        };
        match n {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                tokio::select! {
                    r = aio::write_all(&writer, &buf[..n]) => if r.is_err() { break },
                    _ = &mut rx => break,
                }
            }
        }
    }
}

/// A running terminal copy: the master (for resizes) and completion.
pub struct Tty {
    pub master: Arc<OwnedFd>,
    pub done: watch::Receiver<bool>,
    pub stdin_task: Option<tokio::task::JoinHandle<()>>,
}

/// Starts copying between a pty master and the stdio FIFOs.
pub fn start_tty(master: OwnedFd, io: &IoPaths) -> Result<Tty> {
    let dup = |fd: &OwnedFd| {
        fd.try_clone()
            .map_err(|e| ShimError::failed("dup pty master", e))
    };
    let reader = dup(&master)?;
    let writer = dup(&master)?;
    let master = Arc::new(master);
    let (tx, rx) = watch::channel(false);
    let out_path = io.stdout.clone();
    let reader = aio::register(reader).map_err(|e| ShimError::failed("pty", e))?;
    tokio::spawn(async move {
        let mut out = if out_path.is_empty() {
            None
        } else {
            tokio::net::unix::pipe::OpenOptions::new()
                .read_write(true)
                .open_sender(&out_path)
                .ok()
        };
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match aio::read(&reader, &mut buf).await {
                Ok(0) | Err(_) => break, // EIO once the last slave fd closes
                Ok(n) => {
                    if let Some(o) = out.as_mut() {
                        if o.write_all(&buf[..n]).await.is_err() {
                            out = None;
                        }
                    }
                }
            }
        }
        drop(out);
        tx.send_replace(true);
    });
    let stdin_task = if io.stdin.is_empty() {
        None
    } else {
        let in_path = io.stdin.clone();
        let writer = aio::register(writer).map_err(|e| ShimError::failed("pty", e))?;
        Some(tokio::spawn(async move {
            let Ok(mut inp) = tokio::net::unix::pipe::OpenOptions::new()
                .read_write(true)
                .open_receiver(&in_path)
            else {
                return;
            };
            aio::pump(&mut inp, &writer, 32 * 1024).await;
        }))
    };
    Ok(Tty {
        master,
        done: rx,
        stdin_task,
    })
}

/// Waits (bounded) until a terminal copy has drained.
pub async fn wait_done(mut done: watch::Receiver<bool>, limit: Duration) {
    let _ = tokio::time::timeout(limit, done.wait_for(|d| *d)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse() {
        assert!(matches!(parse_target("").unwrap(), Target::Null));
        assert!(
            matches!(parse_target("/run/x/stdout").unwrap(), Target::Fifo(p) if p == "/run/x/stdout")
        );
        assert!(
            matches!(parse_target("file:///var/log/a%20b.log").unwrap(), Target::File(p) if p == "/var/log/a b.log")
        );
        match parse_target("binary:///usr/bin/logger?id=1&flag").unwrap() {
            Target::Binary { path, args } => {
                assert_eq!(path, "/usr/bin/logger");
                assert_eq!(args, vec!["id", "1", "flag"]);
            }
            _ => panic!(),
        }
        assert!(parse_target("http://x/y").is_err());
        assert!(parse_target("file://relative").is_err());
    }

    #[test]
    fn file_uri_gets_both_streams() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("logs/out.log");
        let io = IoPaths {
            stdout: format!("file://{}", p.display()),
            stderr: format!("file://{}", p.display()),
            ..Default::default()
        };
        let prep = prepare(&io, "ns", "id").unwrap();
        assert_eq!(prep.child.len(), 3);
        let mut f = File::from(prep.child[1].try_clone().unwrap());
        std::io::Write::write_all(&mut f, b"hello\n").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "hello\n");
    }

    #[tokio::test]
    async fn stdin_fifo_copied_until_writer_closes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("stdin");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let io = IoPaths {
            stdin: p.display().to_string(),
            ..Default::default()
        };
        let mut prep = prepare(&io, "ns", "id").unwrap();
        let rd = prep.child.remove(0);
        let _keep = copy_stdin(io.stdin.clone(), prep.stdin_pipe.take().unwrap());
        let p2 = p.clone();
        std::thread::spawn(move || {
            let mut w = OpenOptions::new().write(true).open(&p2).unwrap();
            std::io::Write::write_all(&mut w, b"xyz").unwrap();
        });
        let s = tokio::task::spawn_blocking(move || {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut File::from(rd), &mut s).unwrap();
            s
        })
        .await
        .unwrap();
        assert_eq!(s, "xyz");
    }

    /// A stdin copy ended before its open ran (the process exited, the client never
    /// opened its end) must not leave a thread blocked in that open: with one blocking
    /// thread, the next blocking job still runs.
    #[test]
    fn cancelled_stdin_copy_leaves_no_blocked_open() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let next_ran = rt.block_on(async {
            let d = tempfile::tempdir().unwrap();
            let p = d.path().join("stdin");
            nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
            // Hold the only blocking thread so the copy's open is queued, not started.
            let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
            let busy = tokio::task::spawn_blocking(move || gate_rx.recv());
            let (_r, w) = pipe().unwrap();
            let close = copy_stdin(p.display().to_string(), w);
            drop(close);
            // Let the copy task run up to its cancellation while its open is queued.
            for _ in 0..8 {
                tokio::task::yield_now().await;
            }
            gate_tx.send(()).unwrap();
            busy.await.unwrap().unwrap();
            let next = tokio::task::spawn_blocking(|| 42);
            matches!(
                tokio::time::timeout(Duration::from_secs(5), next).await,
                Ok(Ok(42))
            )
        });
        // A thread stuck in the open would also hold up a plain drop of the runtime.
        rt.shutdown_timeout(Duration::from_secs(1));
        assert!(
            next_ran,
            "a cancelled stdin open still holds the blocking thread"
        );
    }
}
