//! containerd's config for the Janus handlers, as containerd itself reads it: `containerd
//! --config FILE config dump` merges the imports (and 2.x migrates a version 2 file to 3), so
//! the check sees what containerd would run with, not what one file says.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use janus_config::{Mode, ModeSource, RuntimeName};
use toml::{Table, Value};

use super::node::config_fix;
use super::report::Report;
use super::{find_binary, run_timeout};

/// `config dump` only reads files: anything longer is a containerd that hangs.
const DUMP_TIMEOUT: Duration = Duration::from_secs(10);

/// The CRI runtime handlers Janus installs (deploy/containerd/, RuntimeClasses in
/// deploy/runtimeclass.yaml), by the runtime name each must run as.
const HANDLERS: [(&str, RuntimeName); 2] = [
    ("janus", RuntimeName::Janus),
    ("janus-vm", RuntimeName::JanusVm),
];

/// Where a config version keeps the CRI runtime handlers, and the drop-in that adds ours.
#[derive(Debug, PartialEq, Eq)]
struct Layout {
    version: i64,
    /// The plugin whose `containerd.runtimes` table holds the handlers.
    plugin: &'static str,
    /// Plugins that, disabled, leave the handlers unused.
    cri_plugins: &'static [&'static str],
    dropin: &'static str,
    containerd: &'static str,
}

impl Layout {
    /// containerd 1.6/1.7 dump version 2 (even of a version 1 file), 2.x version 3.
    fn of(dump: &Table) -> Layout {
        let version = dump.get("version").and_then(Value::as_integer).unwrap_or(1);
        if version >= 3 {
            Layout {
                version,
                plugin: "io.containerd.cri.v1.runtime",
                cri_plugins: &["io.containerd.cri.v1.runtime", "io.containerd.grpc.v1.cri"],
                dropin: "deploy/containerd/janus-v3.toml",
                containerd: "containerd 2.x",
            }
        } else {
            Layout {
                version,
                plugin: "io.containerd.grpc.v1.cri",
                cri_plugins: &["io.containerd.grpc.v1.cri"],
                dropin: "deploy/containerd/janus.toml",
                containerd: "containerd 1.6/1.7",
            }
        }
    }

    fn install_fix(&self, file: &Path) -> String {
        let mut fix = format!(
            "install {} as /etc/containerd/conf.d/janus.toml, import it from {} (imports = \
             [\"/etc/containerd/conf.d/*.toml\"]) and restart containerd ({}, config version \
             {}; deploy/README.md)",
            self.dropin,
            file.display(),
            self.containerd,
            self.version
        );
        // containerd 2.x migrates a version 2 file on load, but one that imports a version 3
        // drop-in loses its own CRI settings (deploy/README.md).
        if self.version >= 3 && file_version(file).is_some_and(|v| v < 3) {
            fix.push_str(&format!(
                "; {} is version 2: migrate it first (containerd config migrate > \
                 config.toml.new)",
                file.display()
            ));
        }
        fix
    }

    fn runtimes<'a>(&self, dump: &'a Table) -> Option<&'a Table> {
        [self.plugin, "containerd", "runtimes"]
            .iter()
            .try_fold(dump.get("plugins")?, |v, key| v.get(key))?
            .as_table()
    }
}

/// Checks the Janus handlers in containerd's config `file` with the containerd binary
/// `containerd`. Returns whether a handler runs VM pods (then VM mode is wanted).
pub fn handlers(r: &mut Report, containerd: &str, file: &Path) -> bool {
    let Some(dump) = dump(r, containerd, file) else {
        return false;
    };
    let layout = Layout::of(&dump);
    if let Some(id) = disabled_cri(&dump, &layout) {
        r.fail(
            "containerd CRI",
            format!(
                "{id} is in disabled_plugins of {}: no handler is served",
                file.display()
            ),
            format!("remove \"{id}\" from disabled_plugins and restart containerd"),
        );
        return false;
    }
    let runtimes = layout.runtimes(&dump);
    let mut vm = false;
    for (name, runtime) in HANDLERS {
        r.vm = runtime == RuntimeName::JanusVm;
        let entry = runtimes.and_then(|t| t.get(name)).and_then(Value::as_table);
        let Some(entry) = entry else {
            r.fail(
                &format!("handler {name}"),
                format!(
                    "runtime handler {name} is not in {} as containerd reads it (config version {})",
                    file.display(),
                    layout.version
                ),
                layout.install_fix(file),
            );
            continue;
        };
        // A janus-vm handler means VM pods are expected, even one whose config is broken.
        let mode = handler(r, name, runtime, entry);
        vm |= mode == Some(Mode::Vm) || runtime == RuntimeName::JanusVm;
    }
    r.vm = false;
    vm
}

/// The `version` the file itself says (containerd's dump says the version it migrated to).
fn file_version(file: &Path) -> Option<i64> {
    let text = std::fs::read_to_string(file).ok()?;
    let table: Table = toml::from_str(&text).ok()?;
    Some(
        table
            .get("version")
            .and_then(Value::as_integer)
            .unwrap_or(1),
    )
}

/// `containerd --config file config dump`, parsed; `None` (after a line saying why) when it
/// cannot be had.
fn dump(r: &mut Report, containerd: &str, file: &Path) -> Option<Table> {
    let what = "containerd config";
    if !file.exists() {
        r.warn(
            what,
            format!(
                "{} not found: the Janus handlers were not checked",
                file.display()
            ),
            "pass --containerd-config FILE (the file containerd runs with, its --config)",
        );
        return None;
    }
    let Some(bin) = find_binary(containerd) else {
        r.warn(
            what,
            format!(
                "{containerd} not found: the Janus handlers in {} were not checked",
                file.display()
            ),
            "pass --containerd BIN (the containerd binary the node runs)",
        );
        return None;
    };
    let mut cmd = Command::new(&bin);
    cmd.arg("--config").arg(file).args(["config", "dump"]);
    let shown = format!("{} --config {} config dump", bin.display(), file.display());
    let out = match run_timeout(cmd, DUMP_TIMEOUT) {
        Ok(out) => out,
        Err(e) => {
            r.warn(
                what,
                format!("`{shown}`: {e}: the Janus handlers were not checked"),
                "run the command by hand to see why it fails",
            );
            return None;
        }
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        r.fail(
            what,
            format!("`{shown}` failed: {}", err.trim()),
            format!(
                "correct {}: containerd does not start with it",
                file.display()
            ),
        );
        return None;
    }
    match toml::from_str::<Table>(&String::from_utf8_lossy(&out.stdout)) {
        Ok(dump) => {
            let version = Layout::of(&dump).version;
            r.ok(
                what,
                format!(
                    "{} (config version {version}, read by {})",
                    file.display(),
                    bin.display()
                ),
            );
            Some(dump)
        }
        Err(e) => {
            r.warn(
                what,
                format!("`{shown}` printed no TOML this check reads ({e}): the Janus handlers were not checked"),
                "check the handlers by hand: containerd config dump | grep -A8 'runtimes.janus'",
            );
            None
        }
    }
}

/// The CRI plugin id the dump lists as disabled, if any.
fn disabled_cri(dump: &Table, layout: &Layout) -> Option<&'static str> {
    let disabled = dump.get("disabled_plugins").and_then(Value::as_array)?;
    layout
        .cri_plugins
        .iter()
        .copied()
        .find(|id| disabled.iter().any(|d| d.as_str() == Some(id)))
}

/// One handler's entry: runtime type, sandboxer, and its config as the shim would load it.
/// Returns the mode its pods get, `None` where they would fail.
fn handler(r: &mut Report, name: &str, runtime: RuntimeName, entry: &Table) -> Option<Mode> {
    let what = format!("handler {name}");
    let get = |key: &str| entry.get(key).and_then(Value::as_str).unwrap_or("");
    if let Err(detail) = runtime_type_ok(get("runtime_type"), runtime) {
        let fix = format!("set runtime_type = \"{}\" for {name}", runtime.runtime_id());
        r.fail(&what, detail, fix);
        return None;
    }
    if get("sandboxer") == "shim" {
        r.fail(
            &what,
            "sandboxer = \"shim\": Janus does not implement containerd's sandbox API, its pods \
             fail with Unimplemented",
            format!("remove the sandboxer line of {name} (the default, podsandbox, works)"),
        );
        return None;
    }
    // The shim takes an empty ConfigPath as none (shim/src/node.rs, config_path).
    let explicit = entry
        .get("options")
        .and_then(|o| o.get("ConfigPath"))
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from);
    match janus_config::resolve(runtime, explicit.as_deref()) {
        Ok((mode, source, _)) => {
            let config = match &explicit {
                Some(p) => format!("ConfigPath {}", p.display()),
                None => format!(
                    "no ConfigPath (node default {})",
                    janus_config::DEFAULT_PATH
                ),
            };
            r.ok(
                &what,
                format!(
                    "{}, {config}: {mode} mode ({})",
                    runtime.runtime_id(),
                    source_words(source)
                ),
            );
            Some(mode)
        }
        Err(e) => {
            r.fail(&what, e.to_string(), config_fix(&e));
            None
        }
    }
}

/// Whether `runtime_type` starts the shim as `runtime`: its runtime id, or an absolute path to
/// the binary (containerd runs it as is; the shim takes its runtime name from the file name).
fn runtime_type_ok(runtime_type: &str, runtime: RuntimeName) -> Result<(), String> {
    if runtime_type == runtime.runtime_id() {
        return Ok(());
    }
    let path = Path::new(runtime_type);
    if path.is_absolute() && RuntimeName::from_binary(runtime_type) == runtime {
        return if path.is_file() {
            Ok(())
        } else {
            Err(format!("runtime_type = {runtime_type:?}: no such file"))
        };
    }
    Err(format!(
        "runtime_type = {runtime_type:?}: this handler must run {}",
        runtime.runtime_id()
    ))
}

fn source_words(source: ModeSource) -> &'static str {
    match source {
        ModeSource::ConfigPath => "the mode of its ConfigPath",
        ModeSource::RuntimeName => "its runtime name",
        ModeSource::DefaultFile => "the mode of the node default",
        ModeSource::Default => "the default",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dump(text: &str) -> Table {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn layout_by_version() {
        let v2 = dump("version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.janus]\nruntime_type = \"x\"\n");
        let l = Layout::of(&v2);
        assert_eq!(l.dropin, "deploy/containerd/janus.toml");
        assert!(l.runtimes(&v2).unwrap().contains_key("janus"));
        let v3 = dump("version = 3\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.janus-vm]\nruntime_type = \"x\"\n");
        let l = Layout::of(&v3);
        assert_eq!(l.dropin, "deploy/containerd/janus-v3.toml");
        assert!(l.runtimes(&v3).unwrap().contains_key("janus-vm"));
        // A v2 layout read as v3 finds nothing (and the other way round).
        assert!(Layout::of(&v3).runtimes(&v2).is_none());
        assert!(l
            .install_fix(Path::new("/etc/containerd/config.toml"))
            .contains("janus-v3.toml"));
    }

    #[test]
    fn disabled_cri_plugin() {
        let d = dump("version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n");
        assert_eq!(
            disabled_cri(&d, &Layout::of(&d)),
            Some("io.containerd.grpc.v1.cri")
        );
        let d = dump("version = 3\ndisabled_plugins = [\"io.containerd.snapshotter.v1.btrfs\"]\n");
        assert_eq!(disabled_cri(&d, &Layout::of(&d)), None);
    }

    #[test]
    fn runtime_types() {
        use RuntimeName::*;
        assert!(runtime_type_ok("io.containerd.janus.v2", Janus).is_ok());
        assert!(runtime_type_ok("io.containerd.janus-vm.v2", JanusVm).is_ok());
        assert!(runtime_type_ok("io.containerd.janus.v2", JanusVm).is_err());
        assert!(runtime_type_ok("io.containerd.runc.v2", Janus).is_err());
        assert!(runtime_type_ok("", Janus).is_err());
        let e = runtime_type_ok("/nonexistent/containerd-shim-janus-vm-v2", JanusVm).unwrap_err();
        assert!(e.contains("no such file"), "{e}");
        let e = runtime_type_ok("/nonexistent/containerd-shim-janus-vm-v2", Janus).unwrap_err();
        assert!(e.contains("io.containerd.janus.v2"), "{e}");
    }
}
