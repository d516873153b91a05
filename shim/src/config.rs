//! The Janus config file (TOML): which mode a pod runs in, and VM settings.

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

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub mode: Mode,
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
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u32>,
    #[serde(default)]
    pub kernel_params: Vec<String>,
    /// Longest an agent call may take before it fails with DeadlineExceeded (default 60 s).
    pub agent_timeout_ms: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {message}")]
    Invalid { path: String, message: String },
    #[error("config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Config {
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: path.display().to_string(),
            // toml's message already says "TOML parse error at line N, column M".
            message: e.to_string().trim_end().replace('\n', " "),
        })
    }

    /// Loads the config: an explicit path must exist; the default path may be absent, which
    /// means the defaults (namespace mode).
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let (path, required) = match explicit {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_PATH), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Config::parse(&text, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                Ok(Config::default())
            }
            Err(e) => Err(ConfigError::Read {
                path: path.display().to_string(),
                source: e,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_modes() {
        let p = Path::new("x.toml");
        assert_eq!(Config::parse("", p).unwrap().mode, Mode::Namespace);
        assert_eq!(Config::parse("mode = \"vm\"", p).unwrap().mode, Mode::Vm);
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
    fn missing_default_is_fine_missing_explicit_is_not() {
        assert!(Config::load(Some(Path::new("/nonexistent/janus.toml"))).is_err());
    }
}
