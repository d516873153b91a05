//! Offline checks of `deploy/`: the RuntimeClass and example pod YAML have the right shape,
//! containerd 1.6 reads the drop-in (through `imports`) into the handler we document, and the
//! shim accepts the default config.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use janus_tests::{run_with_timeout, workspace_root, Containerd, JANUS, JANUS_VM};

fn deploy(p: &str) -> PathBuf {
    workspace_root().join("deploy").join(p)
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

fn yaml_docs(p: &Path) -> Vec<serde_yaml::Value> {
    use serde::Deserialize;
    let text = read(p);
    let mut v = Vec::new();
    for d in serde_yaml::Deserializer::from_str(&text) {
        let doc = serde_yaml::Value::deserialize(d)
            .unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", p.display()));
        if !doc.is_null() {
            v.push(doc);
        }
    }
    v
}

fn s<'a>(v: &'a serde_yaml::Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for k in path {
        cur = cur.get(k)?;
    }
    cur.as_str()
}

/// A DNS-1123 label, as RuntimeClass names and handlers must be.
fn dns_label(x: &str) -> bool {
    !x.is_empty()
        && x.len() <= 63
        && x.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !x.starts_with('-')
        && !x.ends_with('-')
}

#[test]
fn runtimeclasses() {
    let p = deploy("runtimeclass.yaml");
    let docs = yaml_docs(&p);
    let mut names = Vec::new();
    for d in &docs {
        assert_eq!(s(d, &["apiVersion"]), Some("node.k8s.io/v1"), "{d:?}");
        assert_eq!(s(d, &["kind"]), Some("RuntimeClass"), "{d:?}");
        let name = s(d, &["metadata", "name"]).expect("metadata.name");
        let handler = s(d, &["handler"]).expect("handler");
        assert!(dns_label(name) && dns_label(handler), "{name} / {handler}");
        assert_eq!(name, handler, "RuntimeClass {name} has handler {handler}");
        if let Some(o) = d.get("overhead") {
            let fixed = o.get("podFixed").expect("overhead.podFixed");
            for k in ["memory", "cpu"] {
                assert!(fixed.get(k).is_some_and(|v| v.is_string()), "{k} overhead");
            }
        }
        if let Some(sel) = d.get("scheduling").and_then(|x| x.get("nodeSelector")) {
            let m = sel.as_mapping().expect("nodeSelector is a map");
            assert!(
                m.values().all(|v| v.is_string()),
                "nodeSelector values: {m:?}"
            );
        }
        names.push(name.to_string());
    }
    assert_eq!(names, ["janus", "janus-vm"], "{}", p.display());
    // Both handlers exist on the node side (the drop-in).
    let text = read(&p);
    assert!(!text.contains("NOT AVAILABLE"), "janus-vm is available now");
}

#[test]
fn example_pod() {
    let p = deploy("examples/pod-janus.yaml");
    let docs = yaml_docs(&p);
    assert_eq!(docs.len(), 1);
    let d = &docs[0];
    assert_eq!(s(d, &["apiVersion"]), Some("v1"));
    assert_eq!(s(d, &["kind"]), Some("Pod"));
    assert_eq!(s(d, &["spec", "runtimeClassName"]), Some("janus"));
    let c = d
        .get("spec")
        .and_then(|x| x.get("containers"))
        .and_then(|x| x.as_sequence())
        .expect("spec.containers");
    assert!(
        !c.is_empty()
            && c.iter()
                .all(|c| s(c, &["name"]).is_some() && s(c, &["image"]).is_some())
    );
    // The README shows the same pod.
    let readme = read(&deploy("README.md"));
    assert!(readme.contains("runtimeClassName: janus"));
}

#[test]
fn janus_config_is_namespace_mode() {
    let p = deploy("janus/config.toml");
    let v: toml::Value =
        toml::from_str(&read(&p)).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert_eq!(v.get("mode").and_then(|m| m.as_str()), Some("namespace"));
}

/// containerd 1.6 itself reads the drop-in through `imports` (`containerd config dump`).
#[test]
fn containerd_dropin_defines_janus_handler() {
    let dropin = deploy("containerd/janus.toml");
    let dir = tempfile::tempdir().unwrap();
    let main = dir.path().join("config.toml");
    std::fs::write(
        &main,
        format!(
            "version = 2\nimports = [\"{}\"]\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n",
            dropin.display(),
            d = dir.path().display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("/usr/bin/containerd");
    cmd.arg("--config").arg(&main).args(["config", "dump"]);
    let o = run_with_timeout(cmd, None, Duration::from_secs(30)).unwrap();
    assert!(o.success(), "{o}");
    let dump: toml::Value = toml::from_str(&o.stdout).unwrap_or_else(|e| panic!("{e}:\n{o}"));
    let cri = &dump["plugins"]["io.containerd.grpc.v1.cri"];
    let janus = &cri["containerd"]["runtimes"]["janus"];
    assert_eq!(janus["runtime_type"].as_str(), Some(JANUS), "{janus:?}");
    assert_eq!(
        janus["options"]["ConfigPath"].as_str(),
        Some("/etc/janus/config.toml"),
        "{janus:?}"
    );
    assert_eq!(cri["restrict_oom_score_adj"].as_bool(), Some(true));
    assert_eq!(
        cri["containerd"]["default_runtime_name"].as_str(),
        Some("runc")
    );
    assert_eq!(
        cri["containerd"]["runtimes"]["runc"]["runtime_type"].as_str(),
        Some("io.containerd.runc.v2")
    );
    // VM mode: the alias binary, with a config of its own that says so.
    let vm = &cri["containerd"]["runtimes"]["janus-vm"];
    assert_eq!(
        vm["runtime_type"].as_str(),
        Some("io.containerd.janus-vm.v2")
    );
    assert_eq!(
        vm["options"]["ConfigPath"].as_str(),
        Some("/etc/janus/vm.toml"),
        "{vm:?}"
    );
}

/// containerd 2.x's root: `$JANUS_CONTAINERD2_ROOT`, else where `hack/lib.sh`'s
/// `ensure_containerd sid` extracts it.
fn containerd2() -> Option<PathBuf> {
    let root = std::env::var_os("JANUS_CONTAINERD2_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/janus/containerd/sid/root"));
    let bin = root.join("usr/bin/containerd");
    bin.is_file().then_some(bin)
}

/// The v3 drop-in adds the two handlers and nothing else: 2.x merges imports key by key, so
/// the node's own CRI settings (here a pause image and the default runtime) survive.
#[test]
fn containerd2_dropin_adds_only_the_handlers() {
    let Some(containerd) = containerd2() else {
        janus_tests::not_run(
            "containerd2_dropin_adds_only_the_handlers",
            janus_tests::Prereq::Containerd2,
            "no containerd 2.x (hack/test.sh fetches Debian sid's with `ensure_containerd sid`; \
             or set JANUS_CONTAINERD2_ROOT)",
            false,
        );
        return;
    };
    let dropin = deploy("containerd/janus-v3.toml");
    let dir = tempfile::tempdir().unwrap();
    let main = dir.path().join("config.toml");
    std::fs::write(
        &main,
        format!(
            "version = 3\nimports = [\"{}\"]\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             [plugins.'io.containerd.cri.v1.images'.pinned_images]\n  sandbox = \"example.com/pause:9\"\n\
             [plugins.'io.containerd.cri.v1.runtime'.containerd]\n  default_runtime_name = \"runc\"\n",
            dropin.display(),
            d = dir.path().display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(&containerd);
    cmd.arg("--config").arg(&main).args(["config", "dump"]);
    let o = run_with_timeout(cmd, None, Duration::from_secs(30)).unwrap();
    assert!(o.success(), "{o}");
    let dump: toml::Value = toml::from_str(&o.stdout).unwrap_or_else(|e| panic!("{e}:\n{o}"));
    let rt = &dump["plugins"]["io.containerd.cri.v1.runtime"]["containerd"];
    for (h, ty, cfg) in [
        ("janus", JANUS, "/etc/janus/config.toml"),
        (
            "janus-vm",
            "io.containerd.janus-vm.v2",
            "/etc/janus/vm.toml",
        ),
    ] {
        let r = &rt["runtimes"][h];
        assert_eq!(r["runtime_type"].as_str(), Some(ty), "{r:?}");
        assert_eq!(r["options"]["ConfigPath"].as_str(), Some(cfg), "{r:?}");
    }
    // What the node's config.toml says is kept, and containerd's default runc handler too.
    assert_eq!(rt["default_runtime_name"].as_str(), Some("runc"), "{rt:?}");
    assert_eq!(
        rt["runtimes"]["runc"]["runtime_type"].as_str(),
        Some("io.containerd.runc.v2")
    );
    let images = &dump["plugins"]["io.containerd.cri.v1.images"];
    assert_eq!(
        images["pinned_images"]["sandbox"].as_str(),
        Some("example.com/pause:9"),
        "{images:?}"
    );
}

#[test]
fn janus_vm_config_is_vm_mode() {
    let p = deploy("janus/vm.toml");
    let v: toml::Value =
        toml::from_str(&read(&p)).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert_eq!(v.get("mode").and_then(|m| m.as_str()), Some("vm"));
}

/// The VM handler's config runs a container in the guest, through the alias.
#[test]
fn shim_runs_vm_config_in_a_vm() {
    let ctd = Containerd::for_runtime(JANUS_VM);
    let cfg = deploy("janus/vm.toml");
    let c = ctd.container("deployvm");
    let o = ctd.ctr(&ctd.run_args(
        JANUS_VM,
        &["--rm", "--runtime-config-path", cfg.to_str().unwrap()],
        &c,
        &["uname", "-r"],
    ));
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(
        o.success() && !o.stdout.trim().is_empty() && o.stdout.trim() != host.trim(),
        "{o}\n{}",
        ctd.log_tail(20)
    );
}

/// The shim runs a container with deploy/janus/config.toml as its runtime config.
#[test]
fn shim_accepts_default_config() {
    let ctd = Containerd::for_runtime(JANUS);
    let cfg = deploy("janus/config.toml");
    let c = ctd.container("deploycfg");
    let o = ctd.ctr(&ctd.run_args(
        JANUS,
        &["--rm", "--runtime-config-path", cfg.to_str().unwrap()],
        &c,
        &["echo", "hi"],
    ));
    assert!(
        o.success() && o.stdout == "hi\n",
        "{o}\n{}",
        ctd.log_tail(20)
    );
}
