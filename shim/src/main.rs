//! containerd-shim-janus-v2: one containerd shim v2 binary for namespace and VM pods.

mod command;
// The config file's parser and rules, shared with `janus check`.
use janus_config as config;
mod error;
mod events;
mod hooks;
mod metrics;
mod node;
mod process;
mod sandbox;
mod sandboxer;
mod stdio;
mod task;
// Shared with the fuzz targets (src/lib.rs).
use shim::options;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;

use containerd_shim::{ExitSignal, Flags};
use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::sandbox_async::create_sandbox;
use containerd_shim_protos::shim_async::create_task;
use containerd_shim_protos::ttrpc::r#async::Server;

use crate::hooks::ZYGOTE;
use crate::node::Node;
use crate::sandbox::linux::LinuxSandbox;
use crate::task::{TaskService, SANDBOX_ID_ANNOTATION};

pub const RUNTIME_ID: &str = "io.containerd.janus.v2";

/// Reads the pod grouping key from the bundle's spec: containers of one pod share a shim.
fn grouping(id: &str) -> String {
    let Ok(text) = std::fs::read_to_string("config.json") else {
        return id.to_string();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return id.to_string();
    };
    v.get("annotations")
        .and_then(|a| a.get(SANDBOX_ID_ANNOTATION))
        .and_then(|s| s.as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or(id)
        .to_string()
}

fn socket_path(address: &str) -> &str {
    address.strip_prefix("unix://").unwrap_or(address)
}

/// `containerd-shim-janus-v2 delete`: cleanup after the shim is gone, run in the bundle.
fn delete_shim(flags: &Flags) -> anyhow::Result<Vec<u8>> {
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir()?
    } else {
        PathBuf::from(&flags.bundle)
    };
    let (pid, status) = node::cleanup_bundle(&bundle, &flags.id);
    // A shim that died (SIGKILL) leaves its socket: remove it unless a live shim still
    // serves it (another container of the same pod).
    let group = grouping(&flags.id);
    let address = containerd_shim::socket_address(&flags.address, &flags.namespace, &group);
    let sock = socket_path(&address);
    if UnixStream::connect(sock).is_err() {
        let _ = std::fs::remove_file(sock);
    }
    let resp = DeleteResponse {
        pid,
        exit_status: status,
        exited_at: MessageField::some(process::now()),
        ..Default::default()
    };
    Ok(resp.write_to_bytes()?)
}

/// The runtime name we were started as: the `containerd-shim-janus-vm-v2` alias (runtime
/// `io.containerd.janus-vm.v2`) always runs VM pods (see `config::resolve`).
fn runtime_name() -> config::RuntimeName {
    config::RuntimeName::from_binary(&std::env::args().next().unwrap_or_default())
}

/// Reaps every exited child and hands its status to whoever waits for it: a VMM, a helper
/// command, or a namespace-mode container process.
async fn reap(linux: &LinuxSandbox) {
    let mut exits = Vec::new();
    runtime::linux::lifecycle::reap(|pid, code| exits.push((pid, code)));
    for (pid, code) in exits {
        if runtime::vm::record_reaped(pid, code) || command::record_exit(pid, code) {
            continue;
        }
        linux.on_exit(pid, code).await;
    }
}

/// The long-running shim server: serves the Task API on `flags.socket`.
async fn serve(flags: Flags) -> anyhow::Result<()> {
    use anyhow::Context;
    use tokio::signal::unix::{signal, SignalKind};
    let ttrpc_address = std::env::var("TTRPC_ADDRESS").unwrap_or_default();
    if let Err(e) = containerd_shim::logger::init(flags.debug, "info", &flags.namespace, &flags.id)
    {
        eprintln!("logger: {e}");
    }
    // SAFETY: prctl with integer arguments on our own process.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let mut sigchld = signal(SignalKind::child()).context("SIGCHLD handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let publisher = events::Publisher::connect(&ttrpc_address)
        .with_context(|| format!("connect to containerd events at {ttrpc_address}"))?;
    let exit = Arc::new(ExitSignal::default());
    let events = events::Events::start(publisher, flags.namespace.clone());
    let linux = LinuxSandbox::new(flags.namespace.clone(), events.clone());
    let node = Node {
        runtime_name: runtime_name(),
        namespace: flags.namespace.clone(),
        linux: linux.clone(),
        events: events.clone(),
    };
    let service = TaskService::new(Arc::new(node), events, exit.clone());

    let path = socket_path(&flags.socket).to_string();
    if let Some(dir) = std::path::Path::new(&path).parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    if UnixStream::connect(&path).is_ok() {
        // Another server for this pod won the race; start() will use it.
        let _ = std::fs::write("address", &flags.socket);
        return Ok(());
    }
    let _ = std::fs::remove_file(&path);
    // containerd 1.6 calls the Task service by its v2 name, 2.x by v3: same messages.
    let mut services = create_task(Arc::new(service.clone()));
    if let Some(v3) = create_task(Arc::new(service.clone())).remove("containerd.task.v3.Task") {
        services.insert("containerd.task.v2.Task".to_string(), v3);
    }
    let sandbox_api = sandboxer::SandboxApi {
        tasks: service.clone(),
        exit: exit.clone(),
    };
    let mut server = Server::new()
        .bind(&format!("unix://{path}"))
        .with_context(|| format!("listen on {path}"))?
        .register_service(services)
        .register_service(create_sandbox(Arc::new(sandbox_api)));
    server.start().await.context("start ttrpc server")?;
    // Tell `start` we listen: its pipe on our stdout closes.
    // SAFETY: dup2 onto our own stdout.
    unsafe { libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO) };
    log::info!("janus shim serving on {path}");
    loop {
        tokio::select! {
            _ = sigchld.recv() => reap(&linux).await,
            _ = sigterm.recv() => {
                if service.is_empty() {
                    break;
                }
            }
            _ = exit.wait() => break,
        }
    }
    // Let the reply to Shutdown (or the last Delete) reach containerd before the
    // connections close.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let _ = server.shutdown().await;
    let _ = std::fs::remove_file(&path);
    if let Some(z) = ZYGOTE.get() {
        z.stop();
    }
    Ok(())
}

/// `containerd-shim-janus-v2 start`: finds or launches the pod's shim server and prints its
/// address. Done without the crate's async bootstrap: it is on every container's critical
/// path, and containerd 1.6 expects the bare address (not the JSON newer crates print).
fn start_shim(mut flags: Flags) -> anyhow::Result<String> {
    use anyhow::Context;
    use std::os::fd::AsRawFd;
    // containerd passes the runtime options on stdin; they matter at Create, not here.
    let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
    let group = grouping(&flags.id);
    let address = containerd_shim::socket_address(&flags.address, &flags.namespace, &group);
    if UnixStream::connect(socket_path(&address)).is_ok() {
        let _ = std::fs::write("address", &address);
        return Ok(address);
    }
    // The server is a fork of this process, not a new exec of the binary: that saves the
    // exec, the dynamic linking and relocation of a large binary (about a millisecond and a
    // half of every pod's start). Its end of the pipe is its stdout until it listens.
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe")?;
    // SAFETY: no other thread exists in `start` (nothing has spawned one), so the child
    // inherits no lock held elsewhere.
    match unsafe { nix::unistd::fork() }.context("fork shim server")? {
        nix::unistd::ForkResult::Child => {
            drop(ready_r);
            // containerd reads our stdout until EOF: the server must not keep it open.
            // SAFETY: open and dup2 on descriptors of our own; failure leaves a descriptor
            // that only costs an EOF later.
            unsafe {
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
                if null >= 0 {
                    libc::dup2(null, libc::STDIN_FILENO);
                    libc::dup2(null, libc::STDERR_FILENO);
                    libc::close(null);
                }
                libc::dup2(ready_w.as_raw_fd(), libc::STDOUT_FILENO);
            }
            drop(ready_w);
            flags.socket = address;
            run_server(flags)
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(ready_w);
            adjust_oom_score(child.as_raw() as u32);
            // The server points its stdout elsewhere once it listens: EOF means ready (or
            // dead).
            let mut out = std::fs::File::from(ready_r);
            let mut sink = Vec::new();
            let _ = out.read_to_end(&mut sink);
            if UnixStream::connect(socket_path(&address)).is_err() {
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                anyhow::bail!("shim server for {} did not come up at {address}", flags.id);
            }
            let _ = std::fs::write("address", &address);
            Ok(address)
        }
    }
}

/// Puts the shim server one above containerd in OOM-kill order, like other shims. Hosts
/// without CAP_SYS_RESOURCE refuse some writes: a warning, never a failure.
fn adjust_oom_score(pid: u32) {
    let parent = std::fs::read_to_string(format!(
        "/proc/{}/oom_score_adj",
        std::os::unix::process::parent_id()
    ))
    .ok()
    .and_then(|s| s.trim().parse::<i64>().ok())
    .unwrap_or(0);
    let score = (parent + 1).min(1000);
    if let Err(e) = std::fs::write(format!("/proc/{pid}/oom_score_adj"), score.to_string()) {
        eprintln!("warning: set oom_score_adj {score} for shim {pid}: {e}");
    }
}

/// containerd's type URL for the OCI runtime features document (JSON inside the Any).
const FEATURES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/features/Features";

/// `-info` (containerd 2.x): the runtime name this binary runs as (the VM alias reports its
/// own), the version, and the OCI features of what the runtime implements.
fn runtime_info() -> containerd_shim_protos::types::introspection::RuntimeInfo {
    use containerd_shim_protos::protobuf::well_known_types::any::Any;
    use containerd_shim_protos::types::introspection::{RuntimeInfo, RuntimeVersion};
    let features = serde_json::to_vec(&runtime::linux::features::features()).ok();
    RuntimeInfo {
        name: runtime_name().runtime_id().to_string(),
        version: MessageField::some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        }),
        features: MessageField::from_option(features.map(|value| Any {
            type_url: FEATURES_TYPE_URL.into(),
            value,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// `--help`: containerd_shim's flag parser knows no such flag ("flag provided but not
/// defined"), so it is answered before that parser sees the arguments.
fn help() {
    println!(
        "containerd-shim-janus-v2 {}: the Janus containerd shim v2, one binary for namespace-mode \
         and VM-mode pods.\n\
         containerd runs it (runtime {RUNTIME_ID}, or io.containerd.janus-vm.v2 as the alias \
         containerd-shim-janus-vm-v2, which always runs VMs); it is not meant to be run by hand.\n\
         \n\
         usage:\n  \
           containerd-shim-janus-v2 -v      print the version\n  \
           containerd-shim-janus-v2 -info   print the runtime info containerd 2.x asks for \
         (a RuntimeInfo protobuf)\n  \
           containerd-shim-janus-v2 -h      this help\n\
         \n\
         Whether a node is ready for it: janus check.",
        env!("CARGO_PKG_VERSION")
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // containerd never passes these: ids and namespaces cannot start with '-'.
    if args
        .iter()
        .skip(1)
        .any(|a| a == "-h" || a == "--help" || a == "-help")
    {
        help();
        return;
    }
    if args
        .iter()
        .any(|a| a == "-v" || a == "-version" || a == "--version")
    {
        println!(
            "containerd-shim-janus-v2:\n  Version: {}\n  Runtime: {RUNTIME_ID} (namespace and VM mode)",
            env!("CARGO_PKG_VERSION")
        );
        return;
    }
    let action = args.last().map(String::as_str).unwrap_or("");
    if args.iter().any(|a| a == "-info" || a == "--info") {
        match runtime_info().write_to_bytes() {
            Ok(b) => {
                let _ = std::io::Write::write_all(&mut std::io::stdout(), &b);
                return;
            }
            Err(e) => {
                eprintln!("containerd-shim-janus-v2 -info: {e}");
                std::process::exit(1);
            }
        }
    }
    if action == "start" {
        let res = containerd_shim::parse(&args[1..])
            .map_err(anyhow::Error::from)
            .and_then(start_shim);
        match res {
            Ok(addr) => {
                print!("{addr}");
                let _ = std::io::Write::flush(&mut std::io::stdout());
                return;
            }
            Err(e) => {
                eprintln!("containerd-shim-janus-v2 start: {e:#}");
                std::process::exit(1);
            }
        }
    }
    let flags = match containerd_shim::parse(&args[1..]) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("containerd-shim-janus-v2: {e}");
            std::process::exit(2);
        }
    };
    if action == "delete" {
        match delete_shim(&flags) {
            Ok(b) => {
                let _ = std::io::Write::write_all(&mut std::io::stdout(), &b);
            }
            Err(e) => {
                eprintln!("containerd-shim-janus-v2 delete: {e:#}");
                std::process::exit(1);
            }
        }
        return;
    }
    if flags.socket.is_empty() {
        eprintln!("containerd-shim-janus-v2: -socket is required to serve");
        std::process::exit(2);
    }
    // `start` forks the server; serving when run with -socket stays for a `start` of an
    // older version that executes this binary during an upgrade.
    run_server(flags)
}

/// The long-running server: the zygote, then the async runtime serving `flags.socket`.
/// Runs in a single-threaded process.
fn run_server(flags: Flags) -> ! {
    // One malloc arena: the shim is mostly idle and small; per-thread arenas only add RSS.
    // SAFETY: mallopt only tunes the allocator; called before other threads exist.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    // Large buffers go to mmap and back to the kernel when freed, instead of growing a heap
    // that never shrinks (glibc raises this threshold dynamically otherwise).
    // SAFETY: as above.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024) };
    {
        // SAFETY: no other thread exists yet: the async runtime starts below.
        match unsafe { runtime::linux::zygote::Zygote::start() } {
            Ok(z) => {
                let _ = ZYGOTE.set(z);
            }
            Err(e) => {
                eprintln!("containerd-shim-janus-v2: start zygote: {e}");
                std::process::exit(1);
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(16)
        .thread_stack_size(256 * 1024)
        .thread_keep_alive(std::time::Duration::from_secs(2))
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("containerd-shim-janus-v2: tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(serve(flags)) {
        log::error!("{e:#}");
        eprintln!("containerd-shim-janus-v2: {e:#}");
        std::process::exit(1);
    }
    drop(rt);
    std::process::exit(0)
}
