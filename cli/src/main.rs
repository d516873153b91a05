//! `janus`: operator commands. `janus check` tells what is wrong on a node.

mod check;

use std::path::PathBuf;
use std::process::ExitCode;

use check::{check, default_guest_dir, DEFAULT_ADDRESS, DEFAULT_CONFIG};

fn usage() -> ExitCode {
    eprintln!(
        "usage: janus check [--address CONTAINERD_SOCKET] [--config FILE] [--shim PATH] [--guest-dir DIR]\n\
         \n  check   report what this node needs for Janus and whether it is there"
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
        "-v" | "--version" | "version" => {
            println!("janus {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => usage(),
    }
}
