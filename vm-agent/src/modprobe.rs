//! Kernel modules in the guest: the boot set (`modules.order`, loaded by PID 1) and the
//! on-demand set, loaded when the kernel asks for them.
//!
//! The kernel asks for a module by running its usermode helper, `/sbin/modprobe -q -- NAME`
//! (NAME is a module name or an alias such as `rtnl-link-bridge` or `nft-chain-2-nat`). The
//! initramfs links `/sbin/modprobe` to this binary, which then resolves NAME through the
//! `modules.alias` and `modules.dep` that depmod wrote for the modules the image carries, and
//! loads the module after its dependencies. So `ip link add br0 type bridge` or `iptables` in a
//! NET_ADMIN container load exactly what they use, and the boot pays for none of it.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("module {0} not found in {1}")]
    NotFound(String, String),
    #[error("read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("load module {name}: {source}")]
    Load {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// `/lib/modules/<running release>`.
pub fn module_dir() -> PathBuf {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    Path::new("/lib/modules").join(release.trim())
}

/// A module's name from its file path (`kernel/net/8021q/8021q.ko` -> `8021q`), with dashes
/// as underscores, as the kernel names modules.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// Loads one module file; one already loaded counts as loaded.
pub fn load_file(path: &Path) -> Result<(), Error> {
    let name = module_name(&path.to_string_lossy());
    let f = std::fs::File::open(path).map_err(|source| Error::Load {
        name: name.clone(),
        source,
    })?;
    let params = CString::default();
    // SAFETY: finit_module(2) reads the module from an open fd; params is a valid C string.
    let r = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
    let err = std::io::Error::last_os_error();
    if r == 0 || err.raw_os_error() == Some(libc::EEXIST) {
        Ok(())
    } else {
        Err(Error::Load { name, source: err })
    }
}

/// What depmod wrote for the image's modules.
pub struct Index {
    dir: PathBuf,
    /// module name -> (file, its dependencies' files)
    deps: HashMap<String, (String, Vec<String>)>,
    /// (pattern, module name), in file order
    aliases: Vec<(String, String)>,
}

impl Index {
    pub fn read(dir: &Path) -> Result<Index, Error> {
        let read = |f: &str| {
            let p = dir.join(f);
            std::fs::read_to_string(&p).map_err(|source| Error::Read {
                path: p.display().to_string(),
                source,
            })
        };
        Ok(Index::parse(
            dir,
            &read("modules.dep")?,
            &read("modules.alias")?,
        ))
    }

    pub fn parse(dir: &Path, dep: &str, alias: &str) -> Index {
        let deps = dep
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(file, ds)| {
                let ds = ds.split_whitespace().map(String::from).collect();
                (module_name(file), (file.to_string(), ds))
            })
            .collect();
        let aliases = alias
            .lines()
            .filter_map(|l| l.strip_prefix("alias "))
            .filter_map(|l| l.rsplit_once(' '))
            .map(|(pat, m)| (pat.trim().to_string(), m.trim().replace('-', "_")))
            .collect();
        Index {
            dir: dir.to_path_buf(),
            deps,
            aliases,
        }
    }

    /// The files to load for NAME (a module name or an alias), dependencies first.
    pub fn resolve(&self, name: &str) -> Result<Vec<String>, Error> {
        let wanted = name.replace('-', "_");
        let module = if self.deps.contains_key(&wanted) {
            wanted
        } else {
            self.aliases
                .iter()
                .find(|(pat, m)| {
                    self.deps.contains_key(m)
                        && glob::Pattern::new(pat).is_ok_and(|p| p.matches(name))
                })
                .map(|(_, m)| m.clone())
                .ok_or_else(|| Error::NotFound(name.into(), self.dir.display().to_string()))?
        };
        let (file, deps) = &self.deps[&module];
        // depmod lists every (transitive) dependency, each before the modules needing it when
        // read from the end.
        let mut out: Vec<String> = deps.iter().rev().cloned().collect();
        out.push(file.clone());
        Ok(out)
    }

    pub fn load(&self, name: &str) -> Result<(), Error> {
        for f in self.resolve(name)? {
            load_file(&self.dir.join(f))?;
        }
        Ok(())
    }
}

/// Entry point when run as `/sbin/modprobe` by the kernel: `modprobe [-q] [--] NAME`.
pub fn main(args: &[String]) -> i32 {
    let quiet = args.iter().any(|a| a == "-q");
    let Some(name) = args.iter().skip(1).rfind(|a| !a.starts_with('-')) else {
        eprintln!("modprobe: no module named");
        return 1;
    };
    match Index::read(&module_dir()).and_then(|i| i.load(name)) {
        Ok(()) => 0,
        Err(e) => {
            if !quiet {
                eprintln!("modprobe: {e}");
            }
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/net/bridge/bridge.ko: kernel/net/802/stp.ko kernel/net/llc/llc.ko
kernel/net/802/stp.ko: kernel/net/llc/llc.ko
kernel/net/llc/llc.ko:
kernel/net/8021q/8021q.ko: kernel/net/802/garp.ko kernel/net/802/mrp.ko kernel/net/802/stp.ko kernel/net/llc/llc.ko
kernel/drivers/net/veth.ko:
kernel/net/netfilter/nf_conntrack-x.ko:
";
    const ALIAS: &str = "\
# Aliases extracted from modules themselves.
alias rtnl-link-bridge bridge
alias rtnl-link-veth veth
alias nf_conntrack-x* nf_conntrack-x
alias rtnl-link-vxlan vxlan
";

    fn index() -> Index {
        Index::parse(Path::new("/lib/modules/r"), DEP, ALIAS)
    }

    #[test]
    fn resolves_names_and_aliases_dependencies_first() {
        let i = index();
        assert_eq!(
            i.resolve("rtnl-link-bridge").unwrap(),
            [
                "kernel/net/llc/llc.ko",
                "kernel/net/802/stp.ko",
                "kernel/net/bridge/bridge.ko"
            ]
        );
        assert_eq!(i.resolve("veth").unwrap(), ["kernel/drivers/net/veth.ko"]);
        assert_eq!(
            i.resolve("8021q").unwrap().last().unwrap(),
            "kernel/net/8021q/8021q.ko"
        );
        // Dashes and underscores name the same module; aliases may be patterns.
        assert_eq!(
            i.resolve("nf_conntrack_x").unwrap(),
            ["kernel/net/netfilter/nf_conntrack-x.ko"]
        );
        assert_eq!(
            i.resolve("nf_conntrack-x-42").unwrap(),
            ["kernel/net/netfilter/nf_conntrack-x.ko"]
        );
    }

    #[test]
    fn unknown_names_and_aliases_of_absent_modules_are_not_found() {
        let i = index();
        assert!(matches!(
            i.resolve("rtnl-link-nope"),
            Err(Error::NotFound(..))
        ));
        assert!(matches!(
            i.resolve("rtnl-link-vxlan"),
            Err(Error::NotFound(..))
        ));
    }
}
