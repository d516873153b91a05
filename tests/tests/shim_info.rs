//! `containerd-shim-janus-v2 -info`, as containerd 2.x calls it: the runtime name per alias
//! and the OCI runtime features of what Janus implements.

use std::process::Command;

use janus_tests::{shim_binary, JANUS_VM_SHIM_NAME};

/// containerd's `RuntimeInfo` (types/introspection.proto), the fields read here.
#[derive(Clone, PartialEq, prost::Message)]
struct RuntimeInfo {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, optional, tag = "2")]
    version: Option<RuntimeVersion>,
    #[prost(message, optional, tag = "4")]
    features: Option<Any>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RuntimeVersion {
    #[prost(string, tag = "1")]
    version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Any {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

fn info(binary: &std::path::Path) -> RuntimeInfo {
    let out = Command::new(binary).arg("-info").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    <RuntimeInfo as prost::Message>::decode(out.stdout.as_slice()).unwrap()
}

#[test]
fn info_names_the_runtime_and_its_features() {
    let shim = shim_binary().unwrap();
    let i = info(&shim);
    assert_eq!(i.name, "io.containerd.janus.v2");
    assert!(!i.version.unwrap().version.is_empty());
    let f = i.features.expect("features");
    assert_eq!(
        f.type_url,
        "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
    );
    let v: serde_json::Value = serde_json::from_slice(&f.value).unwrap();
    let list = |p: &str| -> Vec<String> {
        v.pointer(p)
            .and_then(|x| x.as_array())
            .unwrap_or_else(|| panic!("{p} missing: {v}"))
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    let opts = list("/mountOptions");
    for o in ["rbind", "ro", "rslave", "nosuid"] {
        assert!(opts.contains(&o.to_string()), "{o}: {opts:?}");
    }
    // Recursive read-only mounts are not implemented: containerd 2.x's CRI must not
    // advertise them for this handler.
    assert!(!opts.contains(&"rro".to_string()), "{opts:?}");
    assert!(list("/hooks").contains(&"createRuntime".to_string()));
    assert!(list("/linux/namespaces").contains(&"user".to_string()));
    assert!(list("/linux/capabilities").contains(&"CAP_NET_ADMIN".to_string()));
    assert!(list("/linux/seccomp/actions").contains(&"SCMP_ACT_ERRNO".to_string()));
    // containerd refuses idmap mounts for a runtime that does not enable them.
    assert_eq!(
        v.pointer("/linux/mountExtensions/idmap/enabled"),
        Some(&serde_json::Value::Bool(false)),
        "{v}"
    );
}

#[test]
fn the_vm_alias_reports_its_own_name() {
    let shim = shim_binary().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let alias = dir.path().join(JANUS_VM_SHIM_NAME);
    std::os::unix::fs::symlink(&shim, &alias).unwrap();
    assert_eq!(info(&alias).name, "io.containerd.janus-vm.v2");
}
