//! What this runtime implements, in the OCI runtime features format (`runc features`,
//! runtime-spec `features.md`), which containerd 2.x asks a shim for (`-info`): its CRI
//! advertises recursive read-only mounts and user namespaces per handler from it, and its task
//! manager refuses idmap mounts a runtime does not list.
//!
//! Nothing here is a hand-kept list of what works: every entry is found by asking the code
//! that implements it (the mount option parser, the namespace planner, the capability and
//! seccomp translators) about each name in the spec's vocabulary.

use oci_spec::runtime::{
    ApparmorBuilder, CgroupBuilder, Features, FeaturesBuilder, IDMapBuilder, LinuxFeatureBuilder,
    LinuxNamespaceBuilder, LinuxNamespaceType, MountExtensionsBuilder, SeccompBuilder,
    SelinuxBuilder, Spec, VERSION,
};

use super::{caps, mounts, seccomp, spec::NsPlan};

/// The OCI vocabulary of mount options (runtime-spec's `features.md` list and runc's).
const MOUNT_OPTIONS: &[&str] = &[
    "acl",
    "async",
    "atime",
    "bind",
    "defaults",
    "dev",
    "diratime",
    "dirsync",
    "exec",
    "idmap",
    "iversion",
    "lazytime",
    "loud",
    "mand",
    "noacl",
    "noatime",
    "nodev",
    "nodiratime",
    "noexec",
    "noiversion",
    "nolazytime",
    "nomand",
    "norelatime",
    "nostrictatime",
    "nosuid",
    "nosymfollow",
    "private",
    "ratime",
    "rbind",
    "rdev",
    "rdiratime",
    "relatime",
    "remount",
    "rexec",
    "ridmap",
    "rnoatime",
    "rnodev",
    "rnodiratime",
    "rnoexec",
    "rnorelatime",
    "rnostrictatime",
    "rnosuid",
    "rnosymfollow",
    "ro",
    "rprivate",
    "rrelatime",
    "rro",
    "rrw",
    "rshared",
    "rslave",
    "rstrictatime",
    "rsuid",
    "rsymfollow",
    "runbindable",
    "rw",
    "shared",
    "silent",
    "slave",
    "strictatime",
    "suid",
    "symfollow",
    "sync",
    "tmpcopyup",
    "unbindable",
];

const NAMESPACES: &[LinuxNamespaceType] = &[
    LinuxNamespaceType::Mount,
    LinuxNamespaceType::Cgroup,
    LinuxNamespaceType::Uts,
    LinuxNamespaceType::Ipc,
    LinuxNamespaceType::User,
    LinuxNamespaceType::Pid,
    LinuxNamespaceType::Network,
    LinuxNamespaceType::Time,
];

/// The runtime's features. `hooks`: the phases its callers run (both the shim and this
/// crate's container process; see `HOOK_PHASES`).
pub fn features() -> Features {
    let mount_options = MOUNT_OPTIONS
        .iter()
        .filter(|o| mounts::implements_option(o))
        .map(|o| o.to_string())
        .collect::<Vec<_>>();
    let namespaces = NAMESPACES
        .iter()
        .copied()
        .filter(|t| plans(*t))
        .collect::<Vec<_>>();
    let mut capabilities = caps::known()
        .into_iter()
        .filter(|c| caps::to_set([c]).is_ok())
        .collect::<Vec<_>>();
    capabilities.sort();
    let seccomp = SeccompBuilder::default()
        .enabled(true)
        .actions(seccomp::implemented_actions())
        .operators(seccomp::implemented_operators())
        .archs(seccomp::implemented_archs())
        .build()
        .expect("all fields set");
    let linux = LinuxFeatureBuilder::default()
        .namespaces(namespaces)
        .capabilities(capabilities)
        .cgroup(
            // cgroupfs v1 and v2; systemd-form paths are placed through cgroupfs, not by
            // asking systemd, so the systemd driver is not claimed.
            CgroupBuilder::default()
                .v1(true)
                .v2(true)
                .systemd(false)
                .systemd_user(false)
                .build()
                .expect("all fields set"),
        )
        .seccomp(seccomp)
        // Profiles and labels are accepted with a warning, never applied.
        .apparmor(
            ApparmorBuilder::default()
                .enabled(false)
                .build()
                .expect("set"),
        )
        .selinux(
            SelinuxBuilder::default()
                .enabled(false)
                .build()
                .expect("set"),
        )
        .mount_extensions(
            MountExtensionsBuilder::default()
                .idmap(
                    IDMapBuilder::default()
                        .enabled(mounts::implements_option("idmap"))
                        .build()
                        .expect("set"),
                )
                .build()
                .expect("set"),
        )
        .build()
        .expect("all fields set");
    FeaturesBuilder::default()
        .oci_version_min("1.0.0")
        .oci_version_max(VERSION)
        .hooks(
            super::hooks::PHASES
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>(),
        )
        .mount_options(mount_options)
        .linux(linux)
        .build()
        .expect("all fields set")
}

/// Whether the namespace planner accepts a new namespace of type `t`.
fn plans(t: LinuxNamespaceType) -> bool {
    let mut spec = Spec::default();
    let ns = LinuxNamespaceBuilder::default().typ(t).build();
    let linux = spec.linux().clone().unwrap_or_default();
    let Ok(ns) = ns else { return false };
    let mut linux = linux;
    linux.set_namespaces(Some(vec![ns]));
    spec.set_linux(Some(linux));
    NsPlan::from_spec(&spec).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_follow_the_code() {
        let f = features();
        let opts = f.mount_options().clone().unwrap();
        for o in ["ro", "rbind", "rslave", "nosuid", "noexec"] {
            assert!(opts.iter().any(|x| x == o), "{o} missing: {opts:?}");
        }
        // Not implemented: recursive read-only, idmapped mounts, tmpcopyup.
        for o in ["rro", "idmap", "ridmap", "tmpcopyup", "nosymfollow"] {
            assert!(!opts.iter().any(|x| x == o), "{o} claimed: {opts:?}");
        }
        let linux = f.linux().clone().unwrap();
        let ns = linux.namespaces().clone().unwrap();
        assert!(ns.contains(&LinuxNamespaceType::User));
        assert!(
            !ns.contains(&LinuxNamespaceType::Time),
            "time namespaces are refused"
        );
        let caps = linux.capabilities().clone().unwrap();
        assert!(caps.iter().any(|c| c == "CAP_SYS_ADMIN"), "{caps:?}");
        let idmap = linux
            .mount_extensions()
            .clone()
            .unwrap()
            .idmap()
            .clone()
            .unwrap();
        assert_eq!(*idmap.enabled(), Some(false));
        let sc = linux.seccomp().clone().unwrap();
        let actions: Vec<String> = sc
            .actions()
            .iter()
            .flatten()
            .map(|a| {
                serde_json::to_value(a)
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert!(actions.iter().any(|a| a == "SCMP_ACT_ERRNO"), "{actions:?}");
        assert!(
            !actions.iter().any(|a| a == "SCMP_ACT_NOTIFY"),
            "{actions:?}"
        );
    }
}
