//! The host's agent client: connects to the agent channel (the VMM's unix socket for the
//! guest's `janus.agent` port) and waits until the agent answers Health.
//!
//! virtio-serial keeps what the host writes in the socket until the guest opens the port, so
//! requests sent before the agent runs are not lost; each Health attempt still has its own
//! deadline (0.5 s, doubling to 2 s) and is repeated, and a broken connection is re-made.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use protocols::agent::{Empty, HealthResponse};
use protocols::AgentClient;
use tokio::net::UnixStream;

use super::{tail_lines, Accel, Error, Result};

/// Default wait for agent-ready: 30 s under TCG (a boot takes ~3 s on an idle host, much
/// more on a loaded one), 10 s with KVM.
pub fn default_timeout(accel: Accel) -> Duration {
    match accel {
        Accel::Kvm => Duration::from_secs(10),
        Accel::Tcg | Accel::Auto => Duration::from_secs(30),
    }
}

/// A ttrpc context with a deadline (sent to the agent too).
pub fn ctx(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(timeout.as_nanos().min(i64::MAX as u128) as i64)
}

/// A ready agent.
#[derive(Clone)]
pub struct AgentConnection {
    pub client: AgentClient,
    /// The first successful Health answer.
    pub health: HealthResponse,
    /// From the start of the wait to that answer.
    pub ready_after: Duration,
    /// Health requests sent.
    pub attempts: u32,
}

impl std::fmt::Debug for AgentConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConnection")
            .field("health", &self.health)
            .field("ready_after", &self.ready_after)
            .field("attempts", &self.attempts)
            .finish()
    }
}

/// Connects to the agent socket `sock` (retrying while it does not exist or refuses) and waits
/// until Health answers, for at most `timeout`. This version cannot tell that the VM died (it
/// only times out): a [`Vm`](super::Vm) uses [`Vm::connect_agent`](super::Vm::connect_agent),
/// which ends the wait when the VMM exits.
pub async fn connect(sock: &Path, timeout: Duration) -> Result<AgentConnection> {
    connect_with(sock, None, None, timeout, std::future::pending(), || {
        Duration::ZERO
    })
    .await
}

/// How far a boot wait stretches for a starved VMM: at most this many times its timeout.
pub const MAX_STARVED_STRETCH: u32 = 10;

/// Time the threads of process `pid` spent runnable but waiting for a CPU: the largest
/// `run_delay` of /proc/PID/task/*/schedstat (the busiest thread, i.e. the vCPU, is the one
/// whose waits delay the boot). Zero where the kernel does not report it.
pub fn run_delay(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    tasks
        .flatten()
        .filter_map(|t| {
            let s = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            s.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .max()
        .map(Duration::from_nanos)
        .unwrap_or(Duration::ZERO)
}

/// [`connect`] with an already connected `stream` to start from, the console log to quote on
/// timeout, and `died`: a future that resolves (to the error to return) when the VM is gone.
///
/// `starved` tells how long the VMM has waited for a CPU so far (e.g. [`run_delay`]): that
/// time does not count against `timeout`, so VMs booting side by side on a busy host (under
/// TCG, eight on two cores boot about ten times slower than one) are not failed for the
/// host's load; a guest that hangs idle still times out after `timeout`. The wait never
/// exceeds [`MAX_STARVED_STRETCH`] times `timeout`.
pub async fn connect_with<F>(
    sock: &Path,
    stream: Option<UnixStream>,
    console_log: Option<&Path>,
    timeout: Duration,
    died: F,
    starved: impl Fn() -> Duration,
) -> Result<AgentConnection>
where
    F: Future<Output = Error>,
{
    let start = Instant::now();
    let starved_at_start = starved();
    let mut last_error = String::new();
    let mut attempts = 0u32;
    let wait = poll_health(sock, stream, start, &mut attempts, &mut last_error);
    let deadline = async {
        let cap = timeout * MAX_STARVED_STRETCH;
        loop {
            let wall = start.elapsed();
            let used = wall.saturating_sub(starved().saturating_sub(starved_at_start));
            if used >= timeout || wall >= cap {
                return wall;
            }
            let left = (timeout - used).min(cap - wall);
            tokio::time::sleep(left.min(Duration::from_millis(500))).await;
        }
    };
    let r = tokio::select! {
        conn = wait => Ok(conn),
        after = deadline => Err(after),
        e = died => return Err(e),
    };
    match r {
        Ok(conn) => {
            log::info!(
                "vm agent: ready after {} ms ({} ms of it waiting for a CPU, {} Health \
                 attempts), agent {}",
                conn.ready_after.as_millis(),
                starved().saturating_sub(starved_at_start).as_millis(),
                conn.attempts,
                conn.health.version
            );
            Ok(conn)
        }
        Err(after) => {
            let mut console_tail = console_log.map(|p| tail_lines(p, 40)).unwrap_or_default();
            if !last_error.is_empty() {
                console_tail = format!("(last agent error: {last_error})\n{console_tail}");
            }
            Err(Error::AgentTimeout {
                after,
                socket: sock.to_path_buf(),
                console_tail,
            })
        }
    }
}

async fn poll_health(
    sock: &Path,
    mut stream: Option<UnixStream>,
    start: Instant,
    attempts: &mut u32,
    last_error: &mut String,
) -> AgentConnection {
    let mut per_try = Duration::from_millis(500);
    loop {
        let s = match stream.take() {
            Some(s) => s,
            None => connect_socket(sock, last_error).await,
        };
        let client = AgentClient::new(ttrpc::r#async::Client::new(s.into()));
        loop {
            *attempts += 1;
            let r = tokio::time::timeout(per_try, client.health(ctx(per_try), &Empty::new())).await;
            match r {
                Ok(Ok(health)) => {
                    return AgentConnection {
                        client,
                        health,
                        ready_after: start.elapsed(),
                        attempts: *attempts,
                    }
                }
                Ok(Err(ttrpc::Error::RpcStatus(s))) => {
                    // The agent runs but says no (still initializing?): ask again shortly.
                    *last_error = format!("Health: {s:?}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(_) => {
                    per_try = (per_try * 2).min(Duration::from_secs(2));
                }
                Ok(Err(ttrpc::Error::Others(m))) if m.contains("deadline") => {
                    per_try = (per_try * 2).min(Duration::from_secs(2));
                }
                Ok(Err(e)) => {
                    // The connection broke: make a new one.
                    *last_error = format!("Health: {e}");
                    log::debug!("vm agent: {last_error}; reconnecting");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    break;
                }
            }
        }
    }
}

/// Connects to a unix socket, retrying every 10 ms while it is missing or refuses; forever
/// (callers bound it).
pub(crate) async fn connect_socket(sock: &Path, last_error: &mut String) -> UnixStream {
    loop {
        match UnixStream::connect(sock).await {
            Ok(s) => return s,
            Err(e) => {
                *last_error = format!("connect {}: {e}", sock.display());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Where the agent socket of a work directory is (for tools that only have the directory).
pub fn socket_in(work_dir: &Path) -> PathBuf {
    work_dir.join(super::workdir::AGENT_SOCK)
}

/// A guest cgroup's usage as the runtime's version-neutral stats (for containerd's metrics).
pub fn stats_from_proto(p: &protocols::agent::CgroupStats) -> crate::linux::cgroups::Stats {
    // One mapping for both ends of the VM boundary: `runtime::proto`.
    crate::linux::cgroups::Stats::from_proto(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    /// A stand-in agent: Health fails with Unavailable for the first `fail` calls.
    struct Fake {
        calls: AtomicU32,
        fail: u32,
    }

    #[async_trait::async_trait]
    impl protocols::Agent for Fake {
        async fn health(
            &self,
            _ctx: &ttrpc::r#async::TtrpcContext,
            _req: Empty,
        ) -> ttrpc::Result<HealthResponse> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            if n < self.fail {
                return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                    ttrpc::Code::UNAVAILABLE,
                    "starting",
                )));
            }
            Ok(HealthResponse {
                version: "fake".into(),
                ..Default::default()
            })
        }
    }

    #[tokio::test]
    async fn waits_for_socket_and_health() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("agent.sock");
        let fake = Arc::new(Fake {
            calls: AtomicU32::new(0),
            fail: 2,
        });
        let services = protocols::create_agent(fake.clone());
        let sock2 = sock.clone();
        // The server appears only after 300 ms.
        let server = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut server = ttrpc::r#async::Server::new()
                .bind(&format!("unix://{}", sock2.display()))
                .unwrap()
                .register_service(services);
            server.start().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(server);
        });
        let conn = connect(&sock, Duration::from_secs(10)).await.unwrap();
        assert_eq!(conn.health.version, "fake");
        assert!(conn.ready_after >= Duration::from_millis(300));
        assert_eq!(conn.attempts, 3);
        server.abort();
    }

    #[tokio::test]
    async fn times_out_and_dies() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("none.sock");
        let t = Instant::now();
        let e = connect(&sock, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::AgentTimeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3));

        // A peer that accepts and never answers: the `died` future ends the wait.
        let l = std::os::unix::net::UnixListener::bind(d.path().join("mute.sock")).unwrap();
        let t = Instant::now();
        let died = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Error::Boot {
                reason: "gone".into(),
                console_tail: String::new(),
                vmm_log: String::new(),
            }
        };
        let e = connect_with(
            &d.path().join("mute.sock"),
            None,
            None,
            Duration::from_secs(60),
            died,
            || Duration::ZERO,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, Error::Boot { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3));
        drop(l);
    }
}
