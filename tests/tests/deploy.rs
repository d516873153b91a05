//! Offline checks of `deploy/`: the RuntimeClass and example pod YAML have the right shape,
//! kubectl's own validation accepts every Kubernetes manifest (against Kubernetes 1.32's schema,
//! served by a fake API server) and kind decodes the kind config, containerd 1.6 reads the
//! drop-in (through `imports`) into the handler we document, and the shim accepts the default
//! config.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use janus_tests::kube_api::{kubectl, kubectl_apply_dry_run, schema_kinds, FakeApiServer};
use janus_tests::{kind_config, run_with_timeout, workspace_root, Containerd, JANUS, JANUS_VM};

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

/// The v3 drop-in adds the two handlers and nothing else: 2.x merges imports key by key, so
/// the node's own CRI settings (here a pause image and the default runtime) survive.
#[test]
fn containerd2_dropin_adds_only_the_handlers() {
    let Some(containerd) = janus_tests::containerd2_binary() else {
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

// ---------------------------------------------------------------------------------------------
// The installer DaemonSet (deploy/installer/), the kind e2e (deploy/kind/, hack/kind-e2e.sh)

fn seq<'a>(v: &'a serde_yaml::Value, path: &[&str]) -> &'a Vec<serde_yaml::Value> {
    let mut cur = v;
    for k in path {
        cur = cur.get(k).unwrap_or_else(|| panic!("no {k} in {path:?}"));
    }
    cur.as_sequence()
        .unwrap_or_else(|| panic!("{path:?} is not a list"))
}

/// Every YAML document of every file under `deploy/<dir>`.
fn docs_under(dir: &str) -> Vec<serde_yaml::Value> {
    let mut files: Vec<_> = std::fs::read_dir(deploy(dir))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML under deploy/{dir}");
    files.iter().flat_map(|p| yaml_docs(p)).collect()
}

fn of_kind<'a>(docs: &'a [serde_yaml::Value], kind: &str) -> Vec<&'a serde_yaml::Value> {
    docs.iter()
        .filter(|d| s(d, &["kind"]) == Some(kind))
        .collect()
}

fn one<'a>(docs: &'a [serde_yaml::Value], kind: &str) -> &'a serde_yaml::Value {
    let v = of_kind(docs, kind);
    assert_eq!(v.len(), 1, "one {kind} expected");
    v[0]
}

/// The node label `janus install` sets (cli/src/install.rs's `LABEL`).
fn installer_label() -> String {
    let src = read(&workspace_root().join("cli/src/install.rs"));
    let line = src
        .lines()
        .find(|l| l.starts_with("pub const LABEL: &str = "))
        .expect("LABEL in cli/src/install.rs");
    line.split('"').nth(1).unwrap().to_string()
}

/// A Kubernetes memory quantity in MiB (the forms used here: Mi, Gi).
fn mib(q: &str) -> u64 {
    if let Some(n) = q.strip_suffix("Mi") {
        n.parse().unwrap()
    } else if let Some(n) = q.strip_suffix("Gi") {
        n.parse::<u64>().unwrap() * 1024
    } else {
        panic!("memory quantity {q}: use Mi or Gi")
    }
}

#[test]
fn installer_rbac_is_nodes_get_patch_only() {
    let docs = docs_under("installer");
    let ns = s(one(&docs, "Namespace"), &["metadata", "name"]).unwrap();
    assert_eq!(ns, "janus-system");
    let sa = one(&docs, "ServiceAccount");
    assert_eq!(s(sa, &["metadata", "namespace"]), Some(ns));
    let role = one(&docs, "ClusterRole");
    let rules: serde_yaml::Value =
        serde_yaml::from_str("[{apiGroups: [\"\"], resources: [nodes], verbs: [get, patch]}]")
            .unwrap();
    assert_eq!(role.get("rules"), Some(&rules), "ClusterRole rules");
    let b = one(&docs, "ClusterRoleBinding");
    assert_eq!(s(b, &["roleRef", "kind"]), Some("ClusterRole"));
    assert_eq!(s(b, &["roleRef", "name"]), s(role, &["metadata", "name"]));
    let subj = seq(b, &["subjects"]);
    assert_eq!(subj.len(), 1);
    assert_eq!(s(&subj[0], &["kind"]), Some("ServiceAccount"));
    assert_eq!(s(&subj[0], &["name"]), s(sa, &["metadata", "name"]));
    assert_eq!(s(&subj[0], &["namespace"]), Some(ns));
    // Nothing else gets a role.
    assert!(of_kind(&docs, "Role").is_empty() && of_kind(&docs, "RoleBinding").is_empty());
}

#[test]
fn installer_daemonset() {
    let docs = docs_under("installer");
    let ds = one(&docs, "DaemonSet");
    assert_eq!(s(ds, &["apiVersion"]), Some("apps/v1"));
    assert_eq!(s(ds, &["metadata", "namespace"]), Some("janus-system"));
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"].as_bool(), Some(true), "hostPID");
    let sa = one(&docs, "ServiceAccount");
    assert_eq!(
        s(pod, &["serviceAccountName"]),
        s(sa, &["metadata", "name"])
    );
    assert!(
        pod["terminationGracePeriodSeconds"]
            .as_u64()
            .is_some_and(|g| g >= 60),
        "terminationGracePeriodSeconds: time for the uninstall"
    );
    // The selector matches the template.
    let sel = ds["spec"]["selector"]["matchLabels"].as_mapping().unwrap();
    let labels = ds["spec"]["template"]["metadata"]["labels"]
        .as_mapping()
        .unwrap();
    assert!(sel.iter().all(|(k, v)| labels.get(k) == Some(v)));
    // The host's / at /host.
    let vols = seq(pod, &["volumes"]);
    let host = vols
        .iter()
        .find(|v| s(v, &["hostPath", "path"]) == Some("/"))
        .expect("a hostPath / volume");
    let c = seq(pod, &["containers"]);
    assert_eq!(c.len(), 1);
    let c = &c[0];
    let mount = seq(c, &["volumeMounts"])
        .iter()
        .find(|m| m["name"] == host["name"])
        .expect("the hostPath / volume mounted");
    assert_eq!(s(mount, &["mountPath"]), Some("/host"));
    assert_eq!(
        c["securityContext"]["privileged"].as_bool(),
        Some(true),
        "privileged"
    );
    let env = seq(c, &["env"]);
    let node = env
        .iter()
        .find(|e| s(e, &["name"]) == Some("NODE_NAME"))
        .expect("env NODE_NAME");
    assert_eq!(
        s(node, &["valueFrom", "fieldRef", "fieldPath"]),
        Some("spec.nodeName")
    );
    // The locally built image, never pulled from a registry that does not have it.
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        s(c, &["image"]),
        Some(format!("janus.dev/janus-installer:{version}").as_str())
    );
    assert!(matches!(
        s(c, &["imagePullPolicy"]),
        Some("Never" | "IfNotPresent")
    ));
    // Entrypoint (the image's, unless the DaemonSet sets a command) + args.
    let words = |k: &str| -> Vec<String> {
        c.get(k)
            .and_then(|v| v.as_sequence())
            .map(|v| v.iter().map(|x| x.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    let mut argv = words("command");
    if argv.is_empty() {
        argv = image_entrypoint();
    }
    argv.extend(words("args"));
    let line = argv.join(" ");
    assert!(line.contains("install --stay"), "{line}");
    assert!(line.contains("--host-root /host"), "{line}");
    let i = argv
        .iter()
        .position(|a| a == "--restart")
        .expect("--restart");
    let restart = &argv[i + 1];
    assert!(
        restart.starts_with("nsenter --target 1 --mount --uts --ipc --net --pid -- ")
            && restart.ends_with("systemctl restart containerd"),
        "{restart}"
    );
}

/// hack/build-installer.sh's ENTRYPOINT.
fn image_entrypoint() -> Vec<String> {
    let script = read(&workspace_root().join("hack/build-installer.sh"));
    let line = script
        .lines()
        .find_map(|l| l.strip_prefix("ENTRYPOINT='"))
        .expect("ENTRYPOINT= in hack/build-installer.sh");
    serde_json::from_str(line.trim_end_matches('\'')).unwrap()
}

#[test]
fn installer_runtimeclasses() {
    let docs = docs_under("installer");
    let label = installer_label();
    let rcs = of_kind(&docs, "RuntimeClass");
    let handlers: Vec<_> = rcs.iter().map(|d| s(d, &["handler"]).unwrap()).collect();
    assert_eq!(handlers, ["janus", "janus-vm"]);
    for rc in &rcs {
        let h = s(rc, &["handler"]).unwrap();
        assert_eq!(s(rc, &["metadata", "name"]), Some(h));
        let sel = rc["scheduling"]["nodeSelector"].as_mapping().unwrap();
        assert_eq!(sel.len(), 1, "{h}: nodeSelector {sel:?}");
        assert_eq!(
            sel.get(label.as_str()).and_then(|v| v.as_str()),
            Some("true"),
            "{h}: nodeSelector on {label}"
        );
        let fixed = &rc["overhead"]["podFixed"];
        let (mem, cpu) = (s(fixed, &["memory"]), s(fixed, &["cpu"]));
        assert!(mem.is_some() && cpu.is_some(), "{h}: overhead.podFixed");
        // At least what hack/bench.sh measured: shim + zygote 5.6-6.4 MiB, a VM pod 268 MiB
        // with Debian's kernel (172 MiB with ours).
        let measured = if h == "janus" { 6 } else { 268 };
        assert!(mib(mem.unwrap()) >= measured, "{h}: overhead {mem:?}");
    }
    // deploy/runtimeclass.yaml (nodes set up by hand) has the same objects.
    let manual = yaml_docs(&deploy("runtimeclass.yaml"));
    let same: Vec<_> = rcs.into_iter().cloned().collect();
    assert_eq!(
        manual, same,
        "deploy/runtimeclass.yaml and the installer's differ"
    );
}

#[test]
fn kind_cluster_config() {
    let docs = docs_under("kind");
    let c = one(&docs, "Cluster");
    assert_eq!(s(c, &["apiVersion"]), Some("kind.x-k8s.io/v1alpha4"));
    assert!(!seq(c, &["nodes"]).is_empty());
    // The installer configures containerd, not kind.
    assert!(c.get("containerdConfigPatches").is_none());
    // Decoded as kind decodes it.
    let text = read(&deploy("kind/cluster.yaml"));
    let cluster = kind_config::parse(&text).unwrap_or_else(|e| panic!("kind/cluster.yaml: {e}"));
    assert_eq!(cluster.kind.as_deref(), Some("Cluster"));
    assert_eq!(cluster.name.as_deref(), Some("janus-e2e"));
    assert_eq!(cluster.nodes.len(), 1);
    assert_eq!(
        cluster.nodes[0].role,
        Some(kind_config::NodeRole::ControlPlane)
    );
    // ... which rejects what kind rejects: an unknown field, a role kind does not have, a
    // wrong type.
    for (from, to, want) in [
        (
            "  - role: control-plane",
            "  - role: control-plane\n    extraMount: []",
            "unknown field `extraMount`",
        ),
        (
            "  - role: control-plane",
            "  - role: controlplane",
            "unknown variant `controlplane`",
        ),
        (
            "name: janus-e2e",
            "name: janus-e2e\nnetworking: {apiServerPort: high}",
            "invalid type",
        ),
        (
            "name: janus-e2e",
            "name: janus-e2e\nnode: []",
            "unknown field `node`",
        ),
    ] {
        assert!(text.contains(from), "{from:?}");
        let e = kind_config::parse(&text.replacen(from, to, 1))
            .expect_err(to)
            .to_string();
        assert!(e.contains(want), "{to:?}: {e}");
    }
}

fn kind_e2e() -> PathBuf {
    workspace_root().join("hack/kind-e2e.sh")
}

#[test]
fn kind_e2e_script_parses() {
    let o = Command::new("bash")
        .arg("-n")
        .arg(kind_e2e())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Without kind it says so and succeeds, unless kind is required.
#[test]
fn kind_e2e_without_kind_is_not_run() {
    let run = |require: &str| {
        let mut cmd = Command::new(kind_e2e());
        cmd.env("JANUS_KIND", "/nonexistent/kind")
            .env("JANUS_REQUIRE", require);
        run_with_timeout(cmd, None, Duration::from_secs(30)).unwrap()
    };
    let o = run("");
    assert!(o.success() && o.stdout.starts_with("NOT RUN: "), "{o}");
    let o = run("kind");
    assert!(!o.success() && o.stdout.starts_with("NOT RUN: "), "{o}");
}

/// The live kind cluster: hack/kind-e2e.sh end to end where kind and a container engine are
/// there; elsewhere (this CI machine) counted as not run, by name.
#[test]
fn kind_e2e_live() {
    let mut cmd = Command::new(kind_e2e());
    cmd.env_remove("JANUS_REQUIRE");
    let o = run_with_timeout(cmd, None, Duration::from_secs(1800)).unwrap();
    if let Some(reason) = o.stdout.strip_prefix("NOT RUN: ") {
        janus_tests::not_run(
            "kind_e2e_live",
            janus_tests::Prereq::Kind,
            reason.trim(),
            false,
        );
        return;
    }
    assert!(o.success(), "{o}");
}

/// A fake node: a root with a containerd 1.x config of its own.
fn fake_node() -> tempfile::TempDir {
    let root = tempfile::Builder::new()
        .prefix("janus-fake-node-")
        .tempdir()
        .unwrap();
    std::fs::create_dir_all(root.path().join("etc/containerd")).unwrap();
    std::fs::write(
        root.path().join("etc/containerd/config.toml"),
        "version = 2\n# the node's own\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"example.com/pause:9\"\n",
    )
    .unwrap();
    root
}

/// `janus install --stay` installs, waits, and on SIGTERM uninstalls and exits 0.
#[test]
fn install_stay_uninstalls_on_sigterm() {
    let janus = janus_tests::shim_binary().unwrap().with_file_name("janus");
    let node = fake_node();
    let payload = tempfile::tempdir().unwrap();
    for (p, src) in [
        ("bin/containerd-shim-janus-v2", janus.as_path()),
        ("bin/janus", janus.as_path()),
        ("guest/vmlinux", janus.as_path()),
        ("guest/initramfs.cpio", janus.as_path()),
        ("etc/config.toml", &deploy("janus/config.toml")),
        ("etc/vm.toml", &deploy("janus/vm.toml")),
    ] {
        let to = payload.path().join(p);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(src, to).unwrap();
    }
    let before = janus_tests::file_tree(node.path());
    let mut cmd = Command::new(&janus);
    cmd.args(["install", "--stay", "--host-root"])
        .arg(node.path())
        .arg("--node-root")
        .arg(node.path())
        .arg("--from")
        .arg(payload.path())
        .args(["--restart", "none", "--node", ""]);
    let mut bg = janus_tests::Background::spawn(cmd).unwrap();
    let stays = janus_tests::poll(Duration::from_secs(30), || {
        let l = bg.stderr_lines();
        l.iter()
            .any(|l| l.contains("uninstalling on SIGTERM"))
            .then_some(())
    });
    assert!(stays.is_some(), "{:?}", bg.stderr_lines());
    assert!(node
        .path()
        .join("usr/local/bin/containerd-shim-janus-v2")
        .is_file());
    assert!(bg.try_status().is_none(), "it did not stay");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(bg.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let o = bg.wait(Duration::from_secs(30)).unwrap();
    assert!(o.success(), "{o}");
    assert_eq!(
        janus_tests::file_tree(node.path()),
        before,
        "the node is not as it was"
    );
}

/// The installer image (hack/build-installer.sh), imported into a private containerd by its
/// own name and run with `ctr run` against a fake node root bind-mounted at /host: `janus
/// install` lands the payload, `janus uninstall` puts the root back as it was.
#[test]
fn installer_image_installs_and_uninstalls() {
    let guest = janus_tests::guest_dir();
    let kernel = ["vmlinux", "vmlinuz"]
        .iter()
        .any(|k| guest.join(k).is_file());
    if !kernel || !guest.join("initramfs.cpio").is_file() {
        janus_tests::not_run(
            "installer_image_installs_and_uninstalls",
            janus_tests::Prereq::GuestImage,
            &format!(
                "no guest image in {} (hack/build-guest.sh, or set JANUS_GUEST_DIR)",
                guest.display()
            ),
            false,
        );
        return;
    }
    let shim = janus_tests::shim_binary().unwrap();
    let target = shim.parent().unwrap().parent().unwrap();
    let tar = janus_tests::image_tar_path().with_file_name("janus-installer.tar");
    let mut cmd = Command::new(workspace_root().join("hack/build-installer.sh"));
    cmd.arg(&tar)
        .env("CARGO_TARGET_DIR", target)
        .env("JANUS_GUEST_DIR", &guest);
    let o = run_with_timeout(cmd, None, Duration::from_secs(600)).unwrap();
    assert!(o.success(), "{o}");
    let image = o.stdout.trim().lines().last().unwrap().to_string();
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(image, format!("janus.dev/janus-installer:{version}"));

    let ctd = Containerd::for_runtime(RUNC);
    // No --base-name: the image names itself (as `kind load image-archive` imports it).
    let o = ctd.ctr(&["images", "import", tar.to_str().unwrap()]);
    assert!(o.success(), "{o}");
    let ls = ctd.ctr_ok(&["images", "ls", "-q"]);
    assert!(ls.lines().any(|l| l.trim() == image), "{ls}");

    let node = fake_node();
    let before = janus_tests::file_tree(node.path());
    let root = node.path().to_str().unwrap();
    let mount = format!("type=bind,src={root},dst=/host,options=rbind:rw");
    let run = |cmd: &str, id: &str| {
        let c = ctd.container(id);
        let args = [
            "run",
            "--rm",
            "--runtime",
            RUNC,
            "--mount",
            &mount,
            &image,
            &c,
            "/opt/janus/bin/janus",
            cmd,
            "--host-root",
            "/host",
            "--node-root",
            root,
            "--restart",
            "none",
            "--node",
            "",
        ];
        let o = ctd.ctr_timeout(&args, Duration::from_secs(120));
        assert!(
            o.success(),
            "janus {cmd} in the installer image: {o}\n{}",
            ctd.log_tail(20)
        );
    };
    run("install", "inst");
    for p in [
        "usr/local/bin/containerd-shim-janus-v2",
        "usr/local/bin/janus",
        "usr/share/janus/guest/initramfs.cpio",
        "etc/janus/vm.toml",
        "var/lib/janus/install/manifest.json",
    ] {
        assert!(node.path().join(p).exists(), "{p} not installed");
    }
    let cfg = read(&node.path().join("etc/containerd/config.toml"));
    assert!(
        cfg.contains("janus-vm") && cfg.contains("example.com/pause:9"),
        "{cfg}"
    );
    // The image carries the shim as built.
    let installed = node.path().join("usr/local/bin/containerd-shim-janus-v2");
    assert!(std::fs::read(installed).unwrap() == std::fs::read(&shim).unwrap());
    run("uninstall", "uninst");
    assert_eq!(
        janus_tests::file_tree(node.path()),
        before,
        "the node is not as it was"
    );
}

const RUNC: &str = "io.containerd.runc.v2";

// ---------------------------------------------------------------------------------------------
// kubectl's own validation of every manifest, offline, against a fake API server serving
// Kubernetes 1.32's schema (janus_tests::kube_api)

/// Every Kubernetes manifest in deploy/, and the VM pod hack/kind-e2e.sh derives from the
/// example pod: (name, YAML).
fn k8s_manifests() -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = [
        "installer/installer.yaml",
        "runtimeclass.yaml",
        "examples/pod-janus.yaml",
    ]
    .iter()
    .map(|p| (p.to_string(), read(&deploy(p))))
    .collect();
    // hack/kind-e2e.sh: sed -e 's/name: hello-janus/name: hello-janus-vm/'
    //   -e 's/runtimeClassName: janus$/runtimeClassName: janus-vm/' pod-janus.yaml
    let script = read(&kind_e2e());
    assert!(
        script.contains("-e 's/name: hello-janus/name: hello-janus-vm/' -e 's/runtimeClassName: janus$/runtimeClassName: janus-vm/'"),
        "hack/kind-e2e.sh derives its VM pod differently now: update k8s_manifests()"
    );
    let pod = read(&deploy("examples/pod-janus.yaml"))
        .replace("name: hello-janus\n", "name: hello-janus-vm\n")
        .replace("runtimeClassName: janus\n", "runtimeClassName: janus-vm\n");
    assert!(pod.contains("runtimeClassName: janus-vm\n"));
    v.push(("kind-e2e.sh's pod-janus-vm.yaml".into(), pod));
    // Nothing else in deploy/ is Kubernetes YAML (kind/cluster.yaml is kind's own config).
    let mut yaml = Vec::new();
    let mut dirs = vec![deploy("")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                yaml.push(p.strip_prefix(deploy("")).unwrap().display().to_string());
            }
        }
    }
    yaml.sort();
    assert_eq!(
        yaml,
        [
            "examples/pod-janus.yaml",
            "installer/installer.yaml",
            "kind/cluster.yaml",
            "runtimeclass.yaml"
        ],
        "a new YAML file in deploy/: validate it here"
    );
    v
}

/// `text` as a file for `kubectl -f`, named after it: kubectl's messages name the file.
fn write_temp(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name.replace(['/', ' ', '\''], "_"));
    std::fs::write(&p, text).unwrap();
    p
}

/// kubectl validates every manifest against Kubernetes 1.32's schema and accepts it.
#[test]
fn manifests_pass_kubectl_validation() {
    let Some(kubectl) = kubectl("manifests_pass_kubectl_validation") else {
        return;
    };
    let server = FakeApiServer::start();
    let kinds = schema_kinds();
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in k8s_manifests() {
        let docs: Vec<serde_yaml::Value> = {
            use serde::Deserialize;
            serde_yaml::Deserializer::from_str(&text)
                .map(|d| serde_yaml::Value::deserialize(d).unwrap())
                .filter(|d| !d.is_null())
                .collect()
        };
        for d in &docs {
            let k = (
                s(d, &["apiVersion"]).unwrap_or_default().to_string(),
                s(d, &["kind"]).unwrap_or_default().to_string(),
            );
            assert!(
                kinds.contains(&k),
                "{name}: no schema for {k:?}: add it to tests/k8s-schema/refresh.py"
            );
        }
        let before = server.requests().len();
        let o = kubectl_apply_dry_run(&kubectl, &server, &write_temp(dir.path(), &name, &text));
        assert!(o.success(), "{name}:\n{o}");
        let created = o
            .stdout
            .lines()
            .filter(|l| l.ends_with(" created (dry run)"))
            .count();
        assert_eq!(created, docs.len(), "{name}:\n{o}");
        // It did validate: it downloaded the schema.
        assert!(
            server.requests()[before..]
                .iter()
                .any(|p| p == "/openapi/v2"),
            "{name}: kubectl never asked for /openapi/v2: {:?}\n{o}",
            server.requests()
        );
    }
}

/// (file, from, to, want, want2): `from` replaced by `to` in `file` is rejected with an error
/// that says both `want` and `want2`.
const BROKEN_MANIFESTS: [(&str, &str, &str, &str, &str); 9] = [
    (
        "installer",
        "hostPID: true",
        "hostPid: true",
        r#"unknown field "hostPid""#,
        "",
    ),
    (
        "installer",
        "hostPID: true",
        "hostPID: \"yes\"",
        "hostPID",
        r#"got "string", expected "boolean""#,
    ),
    (
        "installer",
        "terminationGracePeriodSeconds: 120",
        "terminationGracePeriodSeconds: 2m",
        "terminationGracePeriodSeconds",
        r#"expected "integer""#,
    ),
    (
        "installer",
        "maxUnavailable: 1",
        "maxUnavailable: [1]",
        "IntOrString",
        r#"got "array""#,
    ),
    (
        "installer",
        "        - name: installer",
        "        - nme: installer",
        r#"missing required field "name""#,
        "Container",
    ),
    (
        "installer",
        "apiVersion: apps/v1",
        "apiVersion: apps/v2",
        r#"no matches for kind "DaemonSet" in version "apps/v2""#,
        "",
    ),
    (
        "runtimeclass",
        "handler: janus-vm",
        "handler: [janus-vm]",
        "handler",
        r#"got "array""#,
    ),
    (
        "runtimeclass",
        "  podFixed:",
        "  podFixd:",
        r#"unknown field "podFixd""#,
        "Overhead",
    ),
    (
        "pod",
        "runAsUser: 1000",
        "runAsUsr: 1000",
        r#"unknown field "runAsUsr""#,
        "SecurityContext",
    ),
];

/// The same validation rejects broken manifests: unknown fields, wrong types, a missing
/// required field, an API version or kind the server does not have.
#[test]
fn kubectl_validation_rejects_broken_manifests() {
    let Some(kubectl) = kubectl("kubectl_validation_rejects_broken_manifests") else {
        return;
    };
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let installer = read(&deploy("installer/installer.yaml"));
    let rc = read(&deploy("runtimeclass.yaml"));
    let pod = read(&deploy("examples/pod-janus.yaml"));
    for (i, (file, from, to, want, want2)) in BROKEN_MANIFESTS.iter().enumerate() {
        let orig = match *file {
            "installer" => &installer,
            "runtimeclass" => &rc,
            _ => &pod,
        };
        assert!(orig.contains(from), "{file}: no {from:?}");
        let broken = orig.replacen(from, to, 1);
        let o = kubectl_apply_dry_run(
            &kubectl,
            &server,
            &write_temp(dir.path(), &format!("broken-{i}.yaml"), &broken),
        );
        assert!(
            !o.success() && o.stderr.contains(want) && o.stderr.contains(want2),
            "{file} with {to:?} instead of {from:?}: not rejected with {want:?} {want2:?}:\n{o}"
        );
    }
}
