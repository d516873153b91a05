//! CRI port-forward into a VM pod.
//!
//! containerd's CRI serves `kubectl port-forward` by dialing 127.0.0.1:PORT inside the pod's
//! network namespace on the host. In VM mode nothing listens there: the pod's servers are in
//! the guest. So that namespace gets one listener on 127.0.0.1 (an ephemeral port) and a NAT
//! rule redirecting every other loopback TCP connection to it; the listener reads the port
//! that was dialed (SO_ORIGINAL_DST) and asks the agent to connect to 127.0.0.1:PORT in the
//! guest (the pod's loopback), relaying the bytes over two streams of the stdio plane.
//! Nothing else uses that namespace's loopback: the pod's traffic is redirected to the VM
//! before the namespace's own stack sees it (see `vmnet`).

use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use protocols::agent as pa;
use runtime::vm::{agent, AgentClient, StdioPlane};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

use crate::error::{Result, ShimError};

/// The forwarder of one VM pod: its accept loop, and the rule to remove.
pub struct PortForward {
    netns: PathBuf,
    port: u16,
    task: JoinHandle<()>,
}

/// Binds 127.0.0.1:0 in the network namespace `netns` (a socket stays in the namespace it
/// was made in; the thread that made it ends there).
fn listen_in(netns: &Path) -> Result<TcpListener> {
    let f = std::fs::File::open(netns).map_err(|e| {
        ShimError::FailedPrecondition(format!("pod network namespace {}: {e}", netns.display()))
    })?;
    std::thread::spawn(move || {
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)?;
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
    })
    .join()
    .map_err(|_| ShimError::Internal("port-forward listener thread panicked".into()))?
    .map_err(|e| ShimError::failed("port-forward listener", e))
}

/// The NAT rule sending loopback TCP (but our own port) to the listener.
fn rule(op: &str, port: &str) -> Vec<String> {
    [
        "-w",
        "-t",
        "nat",
        op,
        "OUTPUT",
        "-o",
        "lo",
        "-p",
        "tcp",
        "-d",
        "127.0.0.1/32",
        "!",
        "--dport",
        port,
        "-j",
        "REDIRECT",
        "--to-ports",
        port,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn iptables(netns: &Path, args: &[String]) -> Result<String> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    super::net::run_in(netns, "iptables", &args)
}

impl PortForward {
    /// Starts forwarding in the pod's namespace `netns` to the guest.
    pub fn start(
        netns: &Path,
        agent: AgentClient,
        plane: StdioPlane,
        timeout: std::time::Duration,
    ) -> Result<PortForward> {
        let std_listener = listen_in(netns)?;
        let port = std_listener
            .local_addr()
            .map_err(|e| ShimError::failed("port-forward listener", e))?
            .port();
        iptables(netns, &rule("-A", &port.to_string()))?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| ShimError::failed("port-forward listener", e))?;
        let listener = tokio::net::TcpListener::from_std(std_listener)
            .map_err(|e| ShimError::failed("port-forward listener", e))?;
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (agent, plane) = (agent.clone(), plane.clone());
                tokio::spawn(async move {
                    if let Err(e) = relay(conn, agent, plane, timeout).await {
                        log::warn!("port-forward: {e}");
                    }
                });
            }
        });
        log::info!("port-forward: loopback of {} -> the VM", netns.display());
        Ok(PortForward {
            netns: netns.to_path_buf(),
            port,
            task,
        })
    }

    /// Stops accepting and removes the rule (the namespace may be gone already).
    pub fn stop(&self) {
        self.task.abort();
        if self.netns.exists() {
            let _ = iptables(&self.netns, &rule("-D", &self.port.to_string()));
        }
    }
}

/// One forwarded connection: the port it was for, the agent's connection in the guest, and
/// the bytes both ways until each side ends (an end is passed on as a half-close).
async fn relay(
    conn: tokio::net::TcpStream,
    agent: AgentClient,
    plane: StdioPlane,
    timeout: std::time::Duration,
) -> Result<()> {
    let dst = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::OriginalDst)
        .map_err(|e| ShimError::failed("original destination", e))?;
    let port = u16::from_be(dst.sin_port);
    let (to_guest, from_guest) = (plane.alloc(), plane.alloc());
    let mut rx = plane.subscribe(from_guest);
    let req = pa::ForwardPortRequest {
        port: port.into(),
        streams: containerd_shim_protos::protobuf::MessageField::some(pa::StdioStreams {
            stdin: to_guest,
            stdout: from_guest,
            ..Default::default()
        }),
        ..Default::default()
    };
    if let Err(e) = agent.forward_port(agent::ctx(timeout), &req).await {
        plane.unsubscribe(from_guest);
        return Err(runtime::Status::from_rpc(e));
    }
    log::debug!(
        "port-forward: connection {} -> guest 127.0.0.1:{port}",
        conn.as_raw_fd()
    );
    let (mut rd, mut wr) = conn.into_split();
    let out = tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            if wr.write_all(&d).await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if plane.write(to_guest, &buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = plane.close(to_guest).await;
    let _ = out.await;
    Ok(())
}
