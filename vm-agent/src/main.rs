//! vm-agent: PID 1 of a Janus VM.
//!
//! Boot: mount the pseudo filesystems (cgroup2 only), load the kernel modules listed in the
//! initramfs, find the `janus.agent` virtio-serial port, then serve the agent API (ttrpc)
//! on it. The ttrpc server listens on a unix socket inside the guest and a small pump joins
//! that socket to the port: ttrpc needs a connection, the port is a character device.

mod containers;
mod init;
mod modprobe;
mod net;
mod process;
mod service;
mod stdio;
mod storage;

// Shared with the fuzz targets (src/lib.rs).
use vm_agent::{error, requests};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runtime::aio;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

pub const AGENT_PORT: &str = "janus.agent";
const SERVER_SOCKET: &str = "/run/janus-agent.sock";

fn log_line(msg: &str) {
    // The serial console is the only log a guest has; keep lines short and prefixed.
    eprintln!("janus-agent: {msg}");
}

/// Finds the character device of a named virtio-serial port (no udev in the guest).
pub fn find_port(name: &str, timeout: Duration) -> Option<PathBuf> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(dir) = std::fs::read_dir("/sys/class/virtio-ports") {
            for e in dir.flatten() {
                let n = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
                if n.trim() == name {
                    return Some(Path::new("/dev").join(e.file_name()));
                }
            }
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Joins the port to the in-guest ttrpc server, one connection per host session: the port
/// reads EOF while the host side is not connected.
async fn pump(port_path: PathBuf) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&port_path)?;
    let port = Arc::new(aio::register(f.into())?);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Wait for the host to send something (EOF = nobody connected yet).
        let n = match aio::read(&port, &mut buf).await {
            Ok(0) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
            Err(e) => return Err(e),
        };
        let conn = UnixStream::connect(SERVER_SOCKET).await?;
        let (mut rd, mut wr) = conn.into_split();
        wr.write_all(&buf[..n]).await?;
        let p2 = port.clone();
        let to_host = tokio::spawn(async move {
            aio::pump(&mut rd, &p2, 64 * 1024).await;
        });
        loop {
            match aio::read(&port, &mut buf).await {
                Ok(0) => break, // host went away: next session gets a fresh connection
                Ok(n) => {
                    if wr.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
                Err(_) => break,
            }
        }
        to_host.abort();
    }
}

async fn serve() -> Result<(), String> {
    let port = tokio::task::spawn_blocking(|| find_port(AGENT_PORT, Duration::from_secs(30)))
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("virtio-serial port {AGENT_PORT} not found"))?;
    let _ = std::fs::remove_file(SERVER_SOCKET);
    net::loopback_up();
    let svc = service::AgentService::new(stdio::Mux::open());
    let containers = svc.containers();
    // Reap everything (we are PID 1): container exits go to their records.
    tokio::spawn(async move {
        let Ok(mut sig) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
        else {
            return;
        };
        loop {
            sig.recv().await;
            runtime::linux::lifecycle::reap(|pid, code| containers.on_exit(pid, code));
        }
    });
    // SIGTERM: power off cleanly. SIGQUIT: exit at once, as if the agent had been killed
    // (PID 1 cannot be SIGKILLed from inside the guest); the kernel then panics and QEMU
    // ends (panic=-1, -no-reboot), which is how the host learns the agent is gone.
    tokio::spawn(async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut quit)) =
            (signal(SignalKind::terminate()), signal(SignalKind::quit()))
        else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {
                log_line("SIGTERM: powering off");
                init::power_off(std::process::id() == 1);
            }
            _ = quit.recv() => {
                log_line("SIGQUIT: exiting now");
                std::process::exit(131);
            }
        }
    });
    let services = protocols::create_agent(Arc::new(svc));
    let mut server = ttrpc::r#async::Server::new()
        .bind(&format!("unix://{SERVER_SOCKET}"))
        .map_err(|e| format!("bind {SERVER_SOCKET}: {e}"))?
        .register_service(services);
    server
        .start()
        .await
        .map_err(|e| format!("start server: {e}"))?;
    log_line(&format!("ready on {}", port.display()));
    pump(port).await.map_err(|e| format!("agent port: {e}"))
}

fn main() {
    // The kernel's module helper (/sbin/modprobe links to us in the initramfs).
    let args: Vec<String> = std::env::args().collect();
    if args
        .first()
        .is_some_and(|a| a.rsplit('/').next() == Some("modprobe"))
    {
        std::process::exit(modprobe::main(&args));
    }
    let pid1 = std::process::id() == 1;
    if pid1 {
        init::early();
    }
    // SAFETY: mallopt tunes the allocator; single-threaded here.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    // Containers are forked from a zygote made while we are still single-threaded.
    // SAFETY: no thread exists yet.
    match unsafe { runtime::linux::zygote::Zygote::start() } {
        Ok(z) => {
            let _ = containers::ZYGOTE.set(z);
        }
        Err(e) => log_line(&format!("zygote: {e}")),
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log_line(&format!("runtime: {e}"));
            init::power_off(pid1)
        }
    };
    if let Err(e) = rt.block_on(serve()) {
        log_line(&e);
    }
    init::power_off(pid1)
}
