//! `janus`: operator commands. `janus check` tells what is wrong on a node.

mod check;
mod install;
mod stay;

use std::path::PathBuf;
use std::process::ExitCode;

use check::{check, default_guest_dir, DEFAULT_ADDRESS, DEFAULT_CONFIG};

fn usage() -> ExitCode {
    eprintln!(
        "usage: janus check [--address CONTAINERD_SOCKET] [--config FILE] [--shim PATH] [--guest-dir DIR]\n\
         \n       janus install [--host-root DIR] [--node-root DIR] [--from DIR] [--containerd-config FILE]\n\
         \x20                    [--containerd-major N] [--restart CMD|none] [--node NAME] [--stay]\n\
         \n       janus uninstall (the same options but --stay)\n\
         \n  check      report what this node needs for Janus and whether it is there\
         \n  install    put Janus on this node (binaries, guest image, containerd handlers)\
         \n             --stay: then wait for SIGTERM or SIGINT and uninstall (the DaemonSet's way)\
         \n  uninstall  take it off again, restoring every file it changed"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        return usage();
    };
    match cmd.as_str() {
        "check" => {
            let mut address = DEFAULT_ADDRESS.to_string();
            let mut config = PathBuf::from(DEFAULT_CONFIG);
            let mut shim = None;
            let mut guest_dir = default_guest_dir();
            let mut it = args[1..].iter();
            while let Some(a) = it.next() {
                match (a.as_str(), it.next()) {
                    ("--address", Some(v)) => address = v.clone(),
                    ("--config", Some(v)) => config = PathBuf::from(v),
                    ("--shim", Some(v)) => shim = Some(PathBuf::from(v)),
                    ("--guest-dir", Some(v)) => guest_dir = PathBuf::from(v),
                    _ => return usage(),
                }
            }
            check(&address, &config, shim, &guest_dir)
        }
        "install" | "uninstall" => match install_opts(&args[1..]) {
            Some(o) if o.stay && cmd == "uninstall" => usage(),
            Some(o) => report(cmd, run_install(cmd, &o)),
            None => usage(),
        },
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
