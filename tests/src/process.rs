//! Running commands with timeouts: their output, background processes read line by line, a
//! pseudo-terminal for `ctr run -t`.

use super::*;

/// Output of a finished command.
#[derive(Debug, Clone)]
pub struct Out {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// Command line, for messages.
    pub cmdline: String,
}

impl Out {
    /// Exit code; a death by signal N is reported as 128+N (like a shell).
    pub fn code(&self) -> i32 {
        exit_code(&self.status)
    }
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

impl fmt::Display for Out {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "$ {}\n[exit {}]\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline,
            self.code(),
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// Exit code with signal deaths mapped to 128+N.
pub fn exit_code(s: &ExitStatus) -> i32 {
    match (s.code(), s.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        _ => -1,
    }
}

pub(crate) fn cmdline_of(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"$;|&<>()".contains(c)) {
            s.push_str(&format!(" '{}'", a.replace('\'', "'\\''")));
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    s
}

pub(crate) fn spawn_reader<R: Read + Send + 'static>(mut r: R) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

/// Run `cmd`, feeding `stdin` (or /dev/null), collecting output, killing it after `timeout`.
pub fn run_with_timeout(mut cmd: Command, stdin: Option<&[u8]>, timeout: Duration) -> Result<Out> {
    let cmdline = cmdline_of(&cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmdline}"))?;
    if let Some(data) = stdin {
        let mut w = child.stdin.take().unwrap();
        let data = data.to_vec();
        thread::spawn(move || {
            let _ = w.write_all(&data);
        });
    }
    let out_rx = spawn_reader(child.stdout.take().unwrap());
    let err_rx = spawn_reader(child.stderr.take().unwrap());
    let status = wait_timeout(&mut child, timeout)?;
    let status = match status {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out_rx
                .recv_timeout(Duration::from_secs(2))
                .unwrap_or_default();
            let stderr = err_rx
                .recv_timeout(Duration::from_secs(2))
                .unwrap_or_default();
            bail!(
                "timed out after {:?}: {cmdline}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                timeout,
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        }
    };
    // A grandchild may keep the pipes open; do not wait forever for EOF.
    let stdout = out_rx
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_default();
    let stderr = err_rx
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_default();
    Ok(Out {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        cmdline,
    })
}

/// Wait for `child` up to `timeout`; `None` when it is still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    let mut sleep = Duration::from_millis(2);
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(sleep);
        sleep = (sleep * 2).min(Duration::from_millis(50));
    }
}

/// Poll `f` until it returns `Some`, or `timeout` passes.
pub fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// Background processes (ctr events, a foreground `ctr run` we signal from elsewhere...)

/// A process running in the background whose stdout/stderr lines are collected.
pub struct Background {
    child: Child,
    cmdline: String,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    readers: Vec<thread::JoinHandle<()>>,
    status: Option<ExitStatus>,
}

pub(crate) fn line_reader<R: Read + Send + 'static>(
    r: R,
    sink: Arc<Mutex<Vec<String>>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\n', '\r'])
                        .to_string();
                    sink.lock().unwrap().push(line);
                }
            }
        }
    })
}

impl Background {
    /// Spawn `cmd` with stdin from /dev/null.
    pub fn spawn(cmd: Command) -> Result<Self> {
        Self::spawn_with_stdin(cmd, Stdio::null())
    }

    pub(crate) fn spawn_with_stdin(mut cmd: Command, stdin: Stdio) -> Result<Self> {
        let cmdline = cmdline_of(&cmd);
        cmd.stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("spawning {cmdline}"))?;
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            line_reader(child.stdout.take().unwrap(), stdout.clone()),
            line_reader(child.stderr.take().unwrap(), stderr.clone()),
        ];
        Ok(Background {
            child,
            cmdline,
            stdout,
            stderr,
            readers,
            status: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The stdin pipe, when spawned with one.
    pub fn stdin(&mut self) -> Option<&mut std::process::ChildStdin> {
        self.child.stdin.as_mut()
    }

    /// Close stdin (EOF for the process).
    pub fn close_stdin(&mut self) {
        self.child.stdin.take();
    }

    /// Stdout lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Stderr lines so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Wait until a stdout line satisfies `pred`; returns it.
    pub fn wait_for_line(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<String> {
        poll(timeout, || {
            self.stdout
                .lock()
                .unwrap()
                .iter()
                .find(|l| pred(l))
                .cloned()
        })
    }

    /// Has it exited? (non-blocking)
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Wait for exit (up to `timeout`), then return everything it printed.
    pub fn wait(&mut self, timeout: Duration) -> Result<Out> {
        let status = match self.status {
            Some(s) => s,
            None => match wait_timeout(&mut self.child, timeout)? {
                Some(s) => s,
                None => bail!(
                    "still running after {timeout:?}: {}\n--- stdout so far ---\n{}\n--- stderr so far ---\n{}",
                    self.cmdline,
                    self.lines().join("\n"),
                    self.stderr_lines().join("\n")
                ),
            },
        };
        self.status = Some(status);
        for h in self.readers.drain(..) {
            // Readers end at EOF; a leaked grandchild could hold the pipe: don't hang.
            let deadline = Instant::now() + Duration::from_secs(5);
            while !h.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
        Ok(Out {
            status,
            stdout: join_lines(&self.lines()),
            stderr: join_lines(&self.stderr_lines()),
            cmdline: self.cmdline.clone(),
        })
    }

    /// SIGKILL it (if still running) and reap it.
    pub fn kill(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            if let Ok(s) = self.child.wait() {
                self.status = Some(s);
            }
        }
    }
}

pub(crate) fn join_lines(l: &[String]) -> String {
    let mut s = l.join("\n");
    if !s.is_empty() {
        s.push('\n');
    }
    s
}

impl Drop for Background {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// PTY

/// Run `cmd` with a new pseudo-terminal as its controlling terminal and stdin/stdout/stderr,
/// as an interactive user would (needed by `ctr run -t`). `input` is written to the terminal
/// first. Returns the exit status and everything read from the terminal (with `\r\n`s).
pub fn run_in_pty(mut cmd: Command, input: &[u8], timeout: Duration) -> Result<Out> {
    use nix::pty::{openpty, Winsize};
    let cmdline = cmdline_of(&cmd);
    let ws = Winsize {
        ws_row: 24,
        ws_col: 80,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = openpty(Some(&ws), None).context("openpty")?;
    let slave: OwnedFd = pty.slave;
    let master: OwnedFd = pty.master;
    cmd.stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave.try_clone()?));
    cmd.env("TERM", "xterm");
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmdline}"))?;
    // The Command keeps its Stdio (slave fds) until dropped: without this the master never
    // sees EOF/EIO.
    drop(cmd);
    drop(slave);
    let mut master_file = fs::File::from(master);
    if !input.is_empty() {
        master_file.write_all(input)?;
    }
    let (tx, rx) = mpsc::channel();
    let reader = master_file.try_clone()?;
    thread::spawn(move || {
        let mut r = reader;
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break, // EIO once every slave fd is closed
            }
        }
        let _ = tx.send(all);
    });
    let status = match wait_timeout(&mut child, timeout)? {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("timed out after {timeout:?} (in a pty): {cmdline}");
        }
    };
    let data = rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
    drop(master_file);
    Ok(Out {
        status,
        stdout: String::from_utf8_lossy(&data).into_owned(),
        stderr: String::new(),
        cmdline,
    })
}
