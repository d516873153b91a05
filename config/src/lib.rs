//! The Janus config file (TOML): which mode a pod runs in, and VM settings, and how the mode
//! is decided (`resolve`). The shim and `janus check` both read configs through this crate, so
//! the check fails exactly where the shim would.
//!
//! The mode comes from, in this order:
//! 1. the file containerd names (`ConfigPath` in the runtime options): its `mode`, if it has one;
//! 2. the runtime name the shim was started as: `containerd-shim-janus-vm-v2`
//!    (`io.containerd.janus-vm.v2`, RuntimeClass `janus-vm`) means VM mode;
//! 3. the node default file `/etc/janus/config.toml`: its `mode`, for the plain `janus` runtime;
//! 4. namespace mode.
//!
//! The VM runtime name is a promise of VM isolation: no file may turn it into namespace mode. An
//! explicit `ConfigPath` saying `mode = "namespace"` under it is an error (InvalidArgument), and
//! the node default's `mode` does not apply to it (its `[vm]` settings do).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the config is read from when containerd passes no `ConfigPath`.
pub const DEFAULT_PATH: &str = "/etc/janus/config.toml";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Namespace,
    Vm,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Namespace => "namespace",
            Mode::Vm => "vm",
        })
    }
}

/// The runtime name the shim binary was started as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeName {
    /// `containerd-shim-janus-v2` (`io.containerd.janus.v2`): the mode comes from the config.
    Janus,
    /// `containerd-shim-janus-vm-v2` (`io.containerd.janus-vm.v2`): always VM mode.
    JanusVm,
}

impl RuntimeName {
    /// From the file name of the binary (argv[0]): the alias is a link to the same binary.
    pub fn from_binary(argv0: &str) -> RuntimeName {
        let name = Path::new(argv0)
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if name.contains("janus-vm") {
            RuntimeName::JanusVm
        } else {
            RuntimeName::Janus
        }
    }

    pub fn runtime_id(self) -> &'static str {
        match self {
            RuntimeName::Janus => "io.containerd.janus.v2",
            RuntimeName::JanusVm => "io.containerd.janus-vm.v2",
        }
    }

    /// The mode this name promises, if any.
    fn pinned(self) -> Option<Mode> {
        match self {
            RuntimeName::Janus => None,
            RuntimeName::JanusVm => Some(Mode::Vm),
        }
    }
}

/// The config file as written: `mode` is `None` where the file does not say.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub mode: Option<Mode>,
    #[serde(default)]
    pub vm: VmConfig,
}

/// VM mode settings.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub hypervisor: Option<String>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// QEMU's binary (`hypervisor = "qemu"`); default: `qemu-system-x86_64` on PATH.
    pub qemu: Option<PathBuf>,
    /// virtiofsd's binary; default: the distributions' places, then PATH.
    pub virtiofsd: Option<PathBuf>,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u32>,
    /// QEMU under TCG: the translated-code cache in MiB (`-accel tcg,tb-size=`); unset:
    /// QEMU's own (grows to ~40 MiB per VM). Smaller saves memory and costs boot time.
    pub tcg_tb_mib: Option<u32>,
    #[serde(default)]
    pub kernel_params: Vec<String>,
    /// Longest an agent call may take before it fails with DeadlineExceeded (default 60 s).
    pub agent_timeout_ms: Option<u64>,
    /// Longest a guest may take from VMM start to its agent answering (default 30 s under
    /// TCG, 10 s with KVM). Time the VMM spends waiting for a CPU (a busy host, many VMs
    /// booting at once) does not count, up to ten times this in all.
    pub boot_timeout_ms: Option<u64>,
    /// A VM cannot share the host's network, IPC or PID namespace: a pod asking for one
    /// (hostNetwork, hostIPC, hostPID) is refused with InvalidArgument unless this is true,
    /// in which case it gets the VM's own (the guest's) namespace instead.
    #[serde(default)]
    pub allow_host_namespaces: bool,
}

impl VmConfig {
    /// The values the types let through but a VM cannot have.
    fn check(&self) -> Result<(), String> {
        if let Some(h) = &self.hypervisor {
            if !runtime::vm::DRIVERS.contains(&h.as_str()) {
                return Err(format!(
                    "vm.hypervisor = {h:?}: not a hypervisor driver (one of {})",
                    runtime::vm::DRIVERS.join(", ")
                ));
            }
        }
        match self.vcpus {
            Some(n) if n == 0 || n > MAX_VCPUS => {
                return Err(format!("vm.vcpus = {n}: must be 1 to {MAX_VCPUS}"))
            }
            _ => {}
        }
        match self.memory_mib {
            Some(m) if m < MIN_MEMORY_MIB => {
                return Err(format!(
                    "vm.memory_mib = {m}: must be at least {MIN_MEMORY_MIB} (the guest kernel \
                     and agent need it)"
                ))
            }
            _ => {}
        }
        if let Some(t) = self.tcg_tb_mib.filter(|t| *t < MIN_TCG_TB_MIB) {
            return Err(format!(
                "vm.tcg_tb_mib = {t}: must be at least {MIN_TCG_TB_MIB} (a smaller cache is \
                 flushed so often that the guest hardly runs)"
            ));
        }
        if self.agent_timeout_ms == Some(0) {
            return Err("vm.agent_timeout_ms = 0: every agent call would time out".into());
        }
        if self.boot_timeout_ms == Some(0) {
            return Err("vm.boot_timeout_ms = 0: every boot would time out".into());
        }
        for (key, p) in [
            ("vm.kernel", &self.kernel),
            ("vm.initrd", &self.initrd),
            ("vm.qemu", &self.qemu),
            ("vm.virtiofsd", &self.virtiofsd),
        ] {
            if let Some(p) = p.as_ref().filter(|p| !p.is_absolute()) {
                return Err(format!(
                    "{key} = {:?}: must be an absolute path (the shim's working directory is \
                     containerd's bundle)",
                    p.display()
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {message}")]
    Invalid { path: String, message: String },
    #[error(
        "runtime {runtime} runs pods in VMs, but its config file {path} says mode = \"{mode}\": \
         remove that line (or set mode = \"vm\"), or use RuntimeClass/runtime janus \
         (io.containerd.janus.v2) for namespace mode"
    )]
    ModeConflict {
        runtime: &'static str,
        path: String,
        mode: Mode,
    },
    #[error("config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The smallest VM the guest kernel and agent boot in.
pub const MIN_MEMORY_MIB: u32 = 64;
/// The smallest `vm.tcg_tb_mib`: below it QEMU retranslates the guest's code all the time.
pub const MIN_TCG_TB_MIB: u32 = 4;
/// The most vCPUs a VM may have (QEMU's microvm and janus-vmm both stay far below).
pub const MAX_VCPUS: u32 = 64;

/// A bad config reaches containerd as InvalidArgument, with the file and the fix.
impl From<ConfigError> for runtime::Status {
    fn from(e: ConfigError) -> Self {
        runtime::Status::InvalidArgument(e.to_string())
    }
}

impl Config {
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.display().to_string(),
            message,
        };
        let config: Config = toml::from_str(text).map_err(|e| {
            // toml's message already says "TOML parse error at line N, column M".
            invalid(e.to_string().trim_end().replace('\n', " "))
        })?;
        config.vm.check().map_err(invalid)?;
        Ok(config)
    }

    /// Loads the config: an explicit path must exist; the default path may be absent, which
    /// means the defaults.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        match explicit {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
                    path: path.display().to_string(),
                    source: e,
                })?;
                Config::parse(&text, path)
            }
            None => Ok(Config::load_optional(Path::new(DEFAULT_PATH))?.unwrap_or_default()),
        }
    }

    /// Loads a file that may be absent, as the node default is (`None`: absent, which the shim
    /// takes as the defaults). `janus check` reads a node default at another path with it.
    pub fn load_optional(path: &Path) -> Result<Option<Config>, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ConfigError::Read {
                path: path.display().to_string(),
                source: e,
            }),
        }
    }
}

/// Where the mode came from (for the log: an operator reading why a pod got its mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeSource {
    ConfigPath,
    RuntimeName,
    DefaultFile,
    Default,
}

/// Loads the config for a container and decides its mode (rules in the module doc).
pub fn resolve(
    name: RuntimeName,
    explicit: Option<&Path>,
) -> Result<(Mode, ModeSource, Config), ConfigError> {
    let config = Config::load(explicit)?;
    let (mode, source) = decide(name, explicit, config.mode)?;
    Ok((mode, source, config))
}

/// The mode rules on their own: `file_mode` is what the loaded file says (explicit or default).
pub fn decide(
    name: RuntimeName,
    explicit: Option<&Path>,
    file_mode: Option<Mode>,
) -> Result<(Mode, ModeSource), ConfigError> {
    match (explicit, file_mode, name.pinned()) {
        (Some(path), Some(m), Some(pinned)) if m != pinned => Err(ConfigError::ModeConflict {
            runtime: name.runtime_id(),
            path: path.display().to_string(),
            mode: m,
        }),
        (Some(_), Some(m), _) => Ok((m, ModeSource::ConfigPath)),
        (_, _, Some(pinned)) => Ok((pinned, ModeSource::RuntimeName)),
        (None, Some(m), None) => Ok((m, ModeSource::DefaultFile)),
        (_, None, None) => Ok((Mode::Namespace, ModeSource::Default)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_modes() {
        let p = Path::new("x.toml");
        assert_eq!(Config::parse("", p).unwrap().mode, None);
        assert_eq!(
            Config::parse("mode = \"vm\"", p).unwrap().mode,
            Some(Mode::Vm)
        );
        let c = Config::parse("mode = \"vm\"\n[vm]\nvcpus = 2\nkernel = \"/k\"\n", p).unwrap();
        assert_eq!(c.vm.vcpus, Some(2));
    }

    #[test]
    fn errors_name_file_and_line() {
        let p = Path::new("/etc/janus/bad.toml");
        let e = Config::parse("mode = \"namespace\"\nbogus = 1\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc/janus/bad.toml"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        assert!(e.contains("bogus"), "{e}");
        let e = Config::parse("mode = \"kvm\"", p).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        let e = Config::parse("mode = ", p).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn vm_values_a_vm_cannot_have() {
        let p = Path::new("/etc/janus/vm.toml");
        let bad = |t: &str, want: &str| {
            let e = Config::parse(t, p).unwrap_err().to_string();
            assert!(
                e.contains("/etc/janus/vm.toml") && e.contains(want),
                "{t}: {e}"
            );
        };
        bad("[vm]\nvcpus = 0\n", "vm.vcpus = 0");
        bad("[vm]\nvcpus = 1000\n", "vm.vcpus = 1000");
        bad("[vm]\nmemory_mib = 0\n", "vm.memory_mib = 0");
        bad("[vm]\ntcg_tb_mib = 2\n", "vm.tcg_tb_mib = 2");
        bad("[vm]\nhypervisor = \"kvm\"\n", "qemu, builtin");
        bad("[vm]\nagent_timeout_ms = 0\n", "agent_timeout_ms");
        bad("[vm]\nboot_timeout_ms = 0\n", "boot_timeout_ms");
        bad("[vm]\nkernel = \"vmlinux\"\n", "absolute");
        bad("[vm]\nvirtiofsd = \"virtiofsd\"\n", "vm.virtiofsd");
        // A misspelt key is refused by name.
        bad("[vm]\nhypervisr = \"qemu\"\n", "hypervisr");
        let ok = "[vm]\nvcpus = 2\nmemory_mib = 64\nhypervisor = \"builtin\"\nkernel = \"/k\"\n";
        assert!(Config::parse(ok, p).is_ok());
    }

    #[test]
    fn missing_default_is_fine_missing_explicit_is_not() {
        let missing = Path::new("/nonexistent/janus.toml");
        let e = Config::load(Some(missing)).unwrap_err();
        assert!(
            matches!(&e, ConfigError::Read { path, .. } if path == "/nonexistent/janus.toml"),
            "{e}"
        );
        // The OS's words, as the shim has always said them.
        assert!(e.to_string().contains("No such file"), "{e}");
        assert_eq!(Config::load_optional(missing).unwrap(), None);
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("config.toml");
        std::fs::write(&f, "mode = \"vm\"\n").unwrap();
        let c = Config::load_optional(&f).unwrap().unwrap();
        assert_eq!(c.mode, Some(Mode::Vm));
        std::fs::write(&f, "mode = \"kvm\"\n").unwrap();
        let e = Config::load_optional(&f).unwrap_err();
        assert!(matches!(e, ConfigError::Invalid { .. }), "{e}");
    }

    #[test]
    fn runtime_name_from_binary() {
        use RuntimeName::*;
        assert_eq!(
            RuntimeName::from_binary("/usr/local/bin/containerd-shim-janus-v2"),
            Janus
        );
        assert_eq!(
            RuntimeName::from_binary("containerd-shim-janus-vm-v2"),
            JanusVm
        );
        assert_eq!(
            RuntimeName::from_binary("/opt/x/containerd-shim-janus-vm-v2"),
            JanusVm
        );
    }

    /// Every combination of runtime name, file kind and file mode.
    #[test]
    fn mode_rules() {
        use Mode::*;
        use ModeSource as S;
        use RuntimeName::*;
        let cp = Some(Path::new("/etc/janus/handler.toml"));
        let ok = |n, e, m| decide(n, e, m).unwrap();
        // The plain name follows the files, explicit first.
        assert_eq!(ok(Janus, cp, Some(Vm)), (Vm, S::ConfigPath));
        assert_eq!(ok(Janus, cp, Some(Namespace)), (Namespace, S::ConfigPath));
        assert_eq!(ok(Janus, cp, None), (Namespace, S::Default));
        assert_eq!(ok(Janus, None, Some(Vm)), (Vm, S::DefaultFile));
        assert_eq!(
            ok(Janus, None, Some(Namespace)),
            (Namespace, S::DefaultFile)
        );
        assert_eq!(ok(Janus, None, None), (Namespace, S::Default));
        // The VM name is never downgraded: the node default's mode does not apply to it ...
        assert_eq!(ok(JanusVm, None, Some(Namespace)), (Vm, S::RuntimeName));
        assert_eq!(ok(JanusVm, None, Some(Vm)), (Vm, S::RuntimeName));
        assert_eq!(ok(JanusVm, None, None), (Vm, S::RuntimeName));
        assert_eq!(ok(JanusVm, cp, None), (Vm, S::RuntimeName));
        assert_eq!(ok(JanusVm, cp, Some(Vm)), (Vm, S::ConfigPath));
        // ... and its own file saying namespace is an error that says what to do.
        let e = decide(JanusVm, cp, Some(Namespace)).unwrap_err();
        assert!(matches!(e, ConfigError::ModeConflict { .. }));
        let m = e.to_string();
        assert!(
            m.contains("/etc/janus/handler.toml") && m.contains("io.containerd.janus-vm.v2"),
            "{m}"
        );
        assert!(
            m.contains("mode = \"namespace\"") && m.contains("janus (io.containerd.janus.v2)"),
            "{m}"
        );
    }
}
