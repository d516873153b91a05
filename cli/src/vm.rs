//! `janus vm`: the VMs the shim runs on this node, and what their guests print. A VM pod's
//! console (the guest kernel and agent) is the first thing to read when a pod misbehaves
//! inside its VM; the console of a VM that never came up is kept in the shim's
//! /var/log/janus/failed-boots.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use runtime::vm::{find_vms, FoundVm, RUN_DIR};

/// `janus vm list`: one line per VM work directory.
pub fn list(base: &Path) -> ExitCode {
    let vms = find_vms(base);
    if vms.is_empty() {
        println!("no VMs under {}", base.display());
    }
    for vm in vms {
        let state = match vm.vmm_pid {
            Some(pid) => format!("running (VMM pid {pid})"),
            None => "not running".into(),
        };
        println!(
            "{}  {}  {}  console: {}",
            vm.name.as_deref().unwrap_or("-"),
            state,
            vm.dir.display(),
            vm.console_log.display()
        );
    }
    ExitCode::SUCCESS
}

/// The VM `which` names: its work directory's name or path, or the container name its VMM
/// runs under (a pod's sandbox id).
fn find(base: &Path, which: &str) -> Option<FoundVm> {
    find_vms(base).into_iter().find(|vm| {
        vm.dir == Path::new(which)
            || vm.dir.file_name().is_some_and(|n| n == which)
            || vm.name.as_deref() == Some(which)
    })
}

/// `janus vm console WHICH [--tail N]`: the guest's console log (the last N lines).
pub fn console(base: &Path, which: &str, tail: Option<usize>) -> ExitCode {
    let Some(vm) = find(base, which) else {
        eprintln!(
            "janus vm console: no VM {which:?} under {} (`janus vm list` shows them; a VM that \
             failed to boot left its console in /var/log/janus/failed-boots)",
            base.display()
        );
        return ExitCode::from(1);
    };
    match std::fs::read_to_string(&vm.console_log) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let from = tail.map_or(0, |n| lines.len().saturating_sub(n));
            for l in &lines[from..] {
                println!("{l}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("janus vm console: {}: {e}", vm.console_log.display());
            ExitCode::from(1)
        }
    }
}

/// Where to look: `--run-dir DIR` (tests), else the shim's.
pub fn run_dir(arg: Option<&String>) -> PathBuf {
    arg.map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(RUN_DIR))
}
