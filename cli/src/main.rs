//! `janus`: operator commands. `janus check` tells what is wrong on a node.

mod check;
mod install;
mod stay;
mod vm;

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
usage: janus check [--config FILE] [--containerd-config FILE] [--containerd BIN]
                   [--address CONTAINERD_SOCKET] [--shim PATH] [--guest-dir DIR] [--json]
       janus install [--host-root DIR] [--node-root DIR] [--from DIR] [--containerd-config FILE]
                     [--containerd-major N] [--restart CMD|none] [--node NAME] [--stay]
       janus uninstall (the same options but --stay)
       janus vm list [--run-dir DIR]
       janus vm console VM [--tail N] [--run-dir DIR]
       janus version
       janus help

  install    put Janus on this node: binaries, guest image, Janus configs, containerd's
             janus and janus-vm handlers, containerd restart, node label (DaemonSet: --host-root
             /host); every file it makes or replaces is recorded
             --stay: then wait for SIGTERM or SIGINT and uninstall (the DaemonSet's way)
  uninstall  take it off again: the node byte for byte as before install
  vm list    the VMs the shim runs here (name = the container that booted it, VMM pid, console)
  vm console what a VM's guest printed (kernel, agent); VM = its name or work directory
  check   report what this node needs for Janus and whether it is there: one line per
          check ([ok  ], [warn], [FAIL] with the fix); exit code 1 when a check fails
    --config FILE             node default Janus config (default /etc/janus/config.toml),
                              read as the shim reads it
    --containerd-config FILE  containerd's config (default /etc/containerd/config.toml): the
                              janus and janus-vm handlers in it, and their ConfigPath files
    --containerd BIN          the containerd that reads it (default: containerd on PATH)
    --address SOCKET          containerd's socket (default /run/containerd/containerd.sock)
    --shim PATH               the shim binary (default: containerd-shim-janus-v2 on PATH)
    --guest-dir DIR           VM guest image when the config names no vm.kernel/vm.initrd
    --json                    one JSON document: ok, namespace_ready, vm_ready, checks
";

/// `--help`: usage on stdout, success.
fn help() -> ExitCode {
    print!("{USAGE}");
    ExitCode::SUCCESS
}

/// A command line we do not understand: usage on stderr, exit code 2.
fn usage() -> ExitCode {
    eprint!("{USAGE}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        return usage();
    };
    match cmd.as_str() {
        "-h" | "--help" | "help" => help(),
        "check" => {
            let mut o = check::Options::default();
            let mut it = args[1..].iter();
            while let Some(flag) = it.next() {
                match flag.as_str() {
                    "-h" | "--help" => return help(),
                    "--json" => o.json = true,
                    _ => {
                        let Some(v) = it.next() else {
                            return usage();
                        };
                        match flag.as_str() {
                            "--address" => o.address = v.clone(),
                            "--config" => o.config = PathBuf::from(v),
                            "--shim" => o.shim = Some(PathBuf::from(v)),
                            "--guest-dir" => o.guest_dir = PathBuf::from(v),
                            "--containerd-config" => o.containerd_config = PathBuf::from(v),
                            "--containerd" => o.containerd = v.clone(),
                            _ => return usage(),
                        }
                    }
                }
            }
            check::check(&o)
        }
        "install" | "uninstall" => match install_opts(&args[1..]) {
            Some(o) if o.stay && cmd == "uninstall" => usage(),
            Some(o) => report(cmd, run_install(cmd, &o)),
            None => usage(),
        },
        "vm" => vm_command(&args[1..]),
        "-v" | "--version" | "version" => {
            println!("janus {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => usage(),
    }
}

/// `janus install/uninstall` options.
struct InstallOpts {
    target: install::Target,
    payload: PathBuf,
    /// `install --stay`: wait for SIGTERM/SIGINT after installing, then uninstall.
    stay: bool,
}

fn run_install(cmd: &str, o: &InstallOpts) -> anyhow::Result<()> {
    match (cmd, o.stay) {
        ("install", true) => {
            // Caught before installing: a signal during the install is not lost.
            let signals = stay::StopSignals::catch()?;
            stay::install_and_stay(&o.target, &o.payload, || signals.wait())
        }
        ("install", false) => install::install(&o.target, &o.payload),
        _ => install::uninstall(&o.target),
    }
}

fn report(cmd: &str, r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("janus {cmd}: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Parses them (defaults: this host is the node, its containerd is a systemd service, the
/// payload is the installer image's /opt/janus, `$NODE_NAME` is labelled).
fn install_opts(args: &[String]) -> Option<InstallOpts> {
    let mut t = install::Target {
        host_root: PathBuf::from("/"),
        node_root: PathBuf::from("/"),
        containerd_config: PathBuf::from("/etc/containerd/config.toml"),
        containerd_major: None,
        restart: Some("systemctl restart containerd".into()),
        node: std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()),
    };
    let (mut payload, mut stay) = (PathBuf::from("/opt/janus"), false);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--stay" {
            stay = true;
            continue;
        }
        let v = it.next()?;
        match a.as_str() {
            "--host-root" => t.host_root = PathBuf::from(v),
            "--node-root" => t.node_root = PathBuf::from(v),
            "--from" => payload = PathBuf::from(v),
            "--containerd-config" => t.containerd_config = PathBuf::from(v),
            "--containerd-major" => t.containerd_major = Some(v.parse().ok()?),
            "--restart" => t.restart = (v != "none").then(|| v.clone()),
            "--node" => t.node = (!v.is_empty()).then(|| v.clone()),
            _ => return None,
        }
    }
    Some(InstallOpts {
        target: t,
        payload,
        stay,
    })
}

/// `janus vm list|console ...`.
fn vm_command(args: &[String]) -> ExitCode {
    let (mut which, mut tail, mut run_dir) = (None, None, None);
    let Some(sub) = args.first() else {
        return usage();
    };
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        match (a.as_str(), which.is_none()) {
            ("--tail", _) => match it.next().and_then(|n| n.parse::<usize>().ok()) {
                Some(n) => tail = Some(n),
                None => return usage(),
            },
            ("--run-dir", _) => run_dir = it.next(),
            ("-h" | "--help", _) => return help(),
            (v, true) if !v.starts_with('-') => which = Some(v.to_string()),
            _ => return usage(),
        }
    }
    let base = vm::run_dir(run_dir);
    match (sub.as_str(), which) {
        ("list", None) => vm::list(&base),
        ("console", Some(w)) => vm::console(&base, &w, tail),
        _ => usage(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Option<InstallOpts> {
        install_opts(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn stay_is_a_flag_anywhere() {
        let o = parse(&["--stay", "--host-root", "/host", "--restart", "none"]).unwrap();
        assert!(o.stay && o.target.restart.is_none());
        assert_eq!(o.target.host_root, PathBuf::from("/host"));
        let o = parse(&["--host-root", "/host", "--stay"]).unwrap();
        assert!(o.stay);
        assert!(!parse(&["--host-root", "/host"]).unwrap().stay);
    }

    #[test]
    fn bad_options_are_refused() {
        assert!(parse(&["--host-root"]).is_none());
        assert!(parse(&["--bogus", "x"]).is_none());
        assert!(parse(&["--containerd-major", "two"]).is_none());
    }
}
