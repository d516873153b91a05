//! Janus on the node: the node default config, read as the shim reads it, and the binaries
//! the handlers run (the shim, its VM alias, iproute2).

use std::path::{Path, PathBuf};

use janus_config::{Config, ConfigError, Mode};

use super::report::Report;
use super::{find_in_path, run};

pub const SHIM: &str = "containerd-shim-janus-v2";
pub const VM_ALIAS: &str = "containerd-shim-janus-vm-v2";

/// The node default config (`path`; absent means the defaults, as for the shim). A file the
/// shim would refuse is a failure naming the file and the key; the defaults stand in for it
/// in the checks that follow.
pub fn node_config(r: &mut Report, path: &Path) -> Config {
    match Config::load_optional(path) {
        Ok(Some(config)) => {
            let mode = match config.mode {
                Some(m) => format!("mode = \"{m}\""),
                None => "no mode (namespace)".to_string(),
            };
            r.ok(
                "config",
                format!(
                    "{}: {mode} for runtime janus; janus-vm always runs VMs",
                    path.display()
                ),
            );
            config
        }
        Ok(None) => {
            r.ok(
                "config",
                format!(
                    "{} absent: defaults (runtime janus: namespace mode; janus-vm: VM mode)",
                    path.display()
                ),
            );
            Config::default()
        }
        Err(e) => {
            r.fail("config", e.to_string(), config_fix(&e));
            Config::default()
        }
    }
}

/// What to do about a config the shim refuses.
pub fn config_fix(e: &ConfigError) -> String {
    match e {
        ConfigError::Invalid { path, .. } => format!(
            "correct {path}: the keys and their values are in deploy/janus/config.toml \
             (README.md, \"Mode\")"
        ),
        ConfigError::ModeConflict { path, .. } => format!(
            "remove the mode line from {path} (or set mode = \"vm\"); namespace-mode pods use \
             the janus handler"
        ),
        ConfigError::Read { path, .. } => format!(
            "install {path} (deploy/janus/ has one per handler) or point the handler's \
             ConfigPath at an existing file"
        ),
    }
}

/// Whether the node default asks for VM mode (runtime janus without a ConfigPath).
pub fn wants_vm(config: &Config) -> bool {
    config.mode == Some(Mode::Vm)
}

/// The shim (`shim`, else on PATH), its VM alias, and iproute2 for VM pods. `vm_wanted`: VM
/// pods are expected, so their binaries are required.
pub fn binaries(r: &mut Report, shim: Option<PathBuf>, vm_wanted: bool) {
    let shim = shim.or_else(|| find_in_path(SHIM));
    match &shim {
        Some(p) => match run(&p.display().to_string(), &["-v"]) {
            Ok(v) => {
                let version = v.lines().nth(1).unwrap_or("").trim().to_string();
                r.ok("shim", format!("{} ({version})", p.display()));
            }
            Err(e) => r.fail(
                "shim",
                format!("{} does not run: {e}", p.display()),
                "reinstall it: cargo build --release -p shim, then install -m 0755 \
                 target/release/containerd-shim-janus-v2 /usr/local/bin/",
            ),
        },
        None => r.fail(
            "shim",
            format!("{SHIM} not on PATH"),
            "install -m 0755 target/release/containerd-shim-janus-v2 /usr/local/bin/ \
             (containerd looks it up on its PATH; 1.6 ignores runtime_path)",
        ),
    }
    r.vm = true;
    vm_alias(r, shim.as_deref(), vm_wanted);
    for (tool, used) in [
        ("ip", "moves the pod's interface onto the VM's tap"),
        ("tc", "mirrors the pod's traffic between interface and tap"),
    ] {
        match find_in_path(tool) {
            Some(p) => r.ok(tool, format!("{} (VM pod networking)", p.display())),
            None => r.problem(
                vm_wanted,
                tool,
                format!("not on PATH: VM pods fail at network set-up (the shim {used})"),
                "apt-get install iproute2",
            ),
        }
    }
    r.vm = false;
}

/// `containerd-shim-janus-vm-v2` (runtime io.containerd.janus-vm.v2): next to the shim, else on
/// PATH, and the same binary (the name alone selects VM mode).
fn vm_alias(r: &mut Report, shim: Option<&Path>, vm_wanted: bool) {
    let next_to_shim = shim.map(|s| s.with_file_name(VM_ALIAS));
    let alias = next_to_shim
        .filter(|p| p.is_file())
        .or_else(|| find_in_path(VM_ALIAS));
    let dir = shim
        .and_then(Path::parent)
        .map(|d| d.display().to_string())
        .unwrap_or_else(|| "/usr/local/bin".into());
    let fix = format!("ln -sf {SHIM} {dir}/{VM_ALIAS}");
    let Some(alias) = alias else {
        r.problem(
            vm_wanted,
            "shim VM alias",
            format!("{VM_ALIAS} not found: runtime io.containerd.janus-vm.v2 (RuntimeClass janus-vm) cannot start"),
            fix,
        );
        return;
    };
    let same = match shim {
        Some(s) => same_file(s, &alias),
        // The shim check above failed already; say nothing more about the alias's target.
        None => true,
    };
    if same {
        r.ok("shim VM alias", alias.display().to_string());
    } else {
        r.problem(
            vm_wanted,
            "shim VM alias",
            format!(
                "{} is not the shim binary {}",
                alias.display(),
                shim.map(|s| s.display().to_string()).unwrap_or_default()
            ),
            fix,
        );
    }
}

/// Whether both paths lead to the same file (a symlink or a hard link to it).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_file_follows_links() {
        let d = tempfile::tempdir().unwrap();
        let shim = d.path().join(SHIM);
        std::fs::write(&shim, "x").unwrap();
        let alias = d.path().join(VM_ALIAS);
        std::os::unix::fs::symlink(SHIM, &alias).unwrap();
        assert!(same_file(&shim, &alias));
        let copy = d.path().join("copy");
        std::fs::write(&copy, "x").unwrap();
        assert!(!same_file(&shim, &copy));
        assert!(!same_file(&shim, &d.path().join("missing")));
    }

    #[test]
    fn fixes_name_the_file() {
        let p = Path::new("/etc/janus/vm.toml");
        let e = Config::parse("[vm]\nvcpus = 0\n", p).unwrap_err();
        assert!(config_fix(&e).contains("/etc/janus/vm.toml"));
        let e = janus_config::decide(
            janus_config::RuntimeName::JanusVm,
            Some(p),
            Some(Mode::Namespace),
        )
        .unwrap_err();
        assert!(config_fix(&e).contains("remove the mode line from /etc/janus/vm.toml"));
    }
}
