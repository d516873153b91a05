//! Offline checks of `deploy/`: the RuntimeClass and example pod YAML have the right shape,
//! kubectl's own validation accepts every Kubernetes manifest (against Kubernetes 1.32's schema,
//! served by a fake API server) and kind decodes the kind config, containerd 1.6 reads the
//! drop-in (through `imports`) into the handler we document, and the shim accepts the default
//! config.

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
        // At least what hack/bench.sh measured (README.md): shim + zygote 5.6 MiB, a VM pod
        // 268 MiB.
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

/// kind's config API, kind.x-k8s.io/v1alpha4, as kind decodes it: strictly (an unknown field
/// is an error), into these types. They copy the fields, JSON names and types of
/// kubernetes-sigs/kind's pkg/apis/config/v1alpha4/types.go (Cluster, Node, Networking,
/// PatchJSON6902, Mount, PortMapping; as of commit 00b38e3bbfdd20ec214924967fcfa7b5b0f51373).
#[allow(dead_code)] // read by serde's checks only
mod kind_v1alpha4 {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Cluster {
        pub kind: Option<String>,
        pub api_version: Option<String>,
        pub name: Option<String>,
        #[serde(default)]
        pub nodes: Vec<Node>,
        pub networking: Option<Networking>,
        pub feature_gates: Option<BTreeMap<String, bool>>,
        pub runtime_config: Option<BTreeMap<String, String>>,
        pub kubeadm_config_patches: Option<Vec<String>>,
        #[serde(rename = "kubeadmConfigPatchesJSON6902")]
        pub kubeadm_config_patches_json6902: Option<Vec<PatchJson6902>>,
        pub containerd_config_patches: Option<Vec<String>>,
        #[serde(rename = "containerdConfigPatchesJSON6902")]
        pub containerd_config_patches_json6902: Option<Vec<String>>,
    }

    #[derive(Deserialize, Debug, PartialEq)]
    pub enum NodeRole {
        #[serde(rename = "control-plane")]
        ControlPlane,
        #[serde(rename = "worker")]
        Worker,
    }

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Node {
        pub role: Option<NodeRole>,
        pub image: Option<String>,
        pub labels: Option<BTreeMap<String, String>>,
        pub extra_mounts: Option<Vec<Mount>>,
        pub extra_port_mappings: Option<Vec<PortMapping>>,
        pub gpus: Option<String>,
        pub kubeadm_config_patches: Option<Vec<String>>,
        #[serde(rename = "kubeadmConfigPatchesJSON6902")]
        pub kubeadm_config_patches_json6902: Option<Vec<PatchJson6902>>,
    }

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Networking {
        pub ip_family: Option<IpFamily>,
        #[serde(rename = "apiServerPort")]
        pub api_server_port: Option<i32>,
        #[serde(rename = "apiServerAddress")]
        pub api_server_address: Option<String>,
        pub pod_subnet: Option<String>,
        pub service_subnet: Option<String>,
        #[serde(rename = "disableDefaultCNI")]
        pub disable_default_cni: Option<bool>,
        pub kube_proxy_mode: Option<ProxyMode>,
        pub dns_search: Option<Vec<String>>,
    }

    #[derive(Deserialize, Debug)]
    #[serde(rename_all = "lowercase")]
    pub enum IpFamily {
        Ipv4,
        Ipv6,
        Dual,
    }

    #[derive(Deserialize, Debug)]
    #[serde(rename_all = "lowercase")]
    pub enum ProxyMode {
        Iptables,
        Ipvs,
    }

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    pub struct PatchJson6902 {
        pub group: String,
        pub version: String,
        pub kind: String,
        pub patch: String,
    }

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Mount {
        pub container_path: Option<String>,
        pub host_path: Option<String>,
        pub read_only: Option<bool>,
        pub selinux_relabel: Option<bool>,
        pub propagation: Option<MountPropagation>,
    }

    #[derive(Deserialize, Debug)]
    pub enum MountPropagation {
        None,
        HostToContainer,
        Bidirectional,
    }

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct PortMapping {
        pub container_port: Option<i32>,
        pub host_port: Option<i32>,
        pub listen_address: Option<String>,
        pub protocol: Option<Protocol>,
    }

    #[derive(Deserialize, Debug)]
    pub enum Protocol {
        #[serde(rename = "TCP")]
        Tcp,
        #[serde(rename = "UDP")]
        Udp,
        #[serde(rename = "SCTP")]
        Sctp,
    }

    pub fn parse(text: &str) -> Result<Cluster, serde_yaml::Error> {
        serde_yaml::from_str(text)
    }
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
    let cluster = kind_v1alpha4::parse(&text).unwrap_or_else(|e| panic!("kind/cluster.yaml: {e}"));
    assert_eq!(cluster.kind.as_deref(), Some("Cluster"));
    assert_eq!(cluster.name.as_deref(), Some("janus-e2e"));
    assert_eq!(cluster.nodes.len(), 1);
    assert_eq!(
        cluster.nodes[0].role,
        Some(kind_v1alpha4::NodeRole::ControlPlane)
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
        let e = kind_v1alpha4::parse(&text.replacen(from, to, 1))
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
// kubectl's own validation of every manifest, offline
//
// kubectl validates a manifest client-side (`apply --dry-run=client --validate=true`) against
// the OpenAPI schema that it downloads from the API server, after mapping each object's kind
// through the server's discovery documents. Here the server is a fake on 127.0.0.1 that serves
// Kubernetes 1.32's own schema and discovery documents from tests/k8s-schema/ (see its README):
// /openapi/v2 as the protobuf kubectl asks for, /api, /apis and the group-versions' resource
// lists; every other request (the GET of each object that `apply` makes, /openapi/v3) is a 404
// (the object does not exist yet; without OpenAPI v3 kubectl cannot see that the server would
// check fields itself, so it checks them, against the v2 schema).

fn k8s_schema(p: &str) -> PathBuf {
    workspace_root().join("tests/k8s-schema").join(p)
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&read(p)).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Protocol buffers wire format, for the gnostic `openapi_v2.Document` that kubectl decodes
/// (github.com/google/gnostic-models, openapiv2/OpenAPIv2.proto: the field numbers below).
mod pb {
    use serde_json::Value;

    fn varint(mut n: u64, out: &mut Vec<u8>) {
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    /// A length-delimited field (string, bytes, message).
    fn field(out: &mut Vec<u8>, num: u64, data: &[u8]) {
        varint(num << 3 | 2, out);
        varint(data.len() as u64, out);
        out.extend_from_slice(data);
    }

    fn string(out: &mut Vec<u8>, num: u64, s: &str) {
        field(out, num, s.as_bytes());
    }

    /// Any { string yaml = 2 } (JSON is YAML).
    fn any(v: &Value) -> Vec<u8> {
        let mut o = Vec::new();
        string(&mut o, 2, &v.to_string());
        o
    }

    /// NamedSchema / NamedAny { string name = 1; value = 2 }.
    fn named(name: &str, value: &[u8]) -> Vec<u8> {
        let mut o = Vec::new();
        string(&mut o, 1, name);
        field(&mut o, 2, value);
        o
    }

    fn strings(v: &Value) -> Vec<&str> {
        match v {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().map(|s| s.as_str().expect("a string")).collect(),
            _ => panic!("not a string or strings: {v}"),
        }
    }

    /// Schema. Every key of the (trimmed) document is encoded or the encoder refuses: nothing
    /// of the schema is silently left out.
    fn schema(s: &Value) -> Vec<u8> {
        let mut o = Vec::new();
        let m = s.as_object().unwrap_or_else(|| panic!("schema {s}"));
        for (k, v) in m {
            match k.as_str() {
                "$ref" => string(&mut o, 1, v.as_str().unwrap()),
                "format" => string(&mut o, 2, v.as_str().unwrap()),
                "required" => strings(v).iter().for_each(|r| string(&mut o, 19, r)),
                "additionalProperties" => {
                    // AdditionalPropertiesItem { oneof { Schema schema = 1; bool boolean = 2 } }
                    let mut ap = Vec::new();
                    match v {
                        Value::Bool(b) => {
                            varint(2 << 3, &mut ap);
                            varint(*b as u64, &mut ap);
                        }
                        _ => field(&mut ap, 1, &schema(v)),
                    }
                    field(&mut o, 21, &ap);
                }
                "type" => {
                    // TypeItem { repeated string value = 1 }
                    let mut t = Vec::new();
                    strings(v).iter().for_each(|x| string(&mut t, 1, x));
                    field(&mut o, 22, &t);
                }
                "items" => {
                    // ItemsItem { repeated Schema schema = 1 }
                    let mut it = Vec::new();
                    match v {
                        Value::Array(a) => a.iter().for_each(|x| field(&mut it, 1, &schema(x))),
                        _ => field(&mut it, 1, &schema(v)),
                    }
                    field(&mut o, 23, &it);
                }
                "properties" => {
                    // Properties { repeated NamedSchema additional_properties = 1 }
                    let mut p = Vec::new();
                    for (name, s) in v.as_object().unwrap() {
                        field(&mut p, 1, &named(name, &schema(s)));
                    }
                    field(&mut o, 25, &p);
                }
                x if x.starts_with("x-") => field(&mut o, 31, &named(x, &any(v))),
                x => panic!("schema key {x} has no encoding here: add it"),
            }
        }
        o
    }

    /// Document { swagger = 1; Info info = 2 { title = 1; version = 2 }; Definitions
    /// definitions = 9 { repeated NamedSchema additional_properties = 1 } }.
    pub fn document(d: &Value) -> Vec<u8> {
        let mut o = Vec::new();
        string(&mut o, 1, d["swagger"].as_str().unwrap());
        let mut info = Vec::new();
        string(&mut info, 1, d["info"]["title"].as_str().unwrap());
        string(&mut info, 2, d["info"]["version"].as_str().unwrap());
        field(&mut o, 2, &info);
        let mut defs = Vec::new();
        for (name, s) in d["definitions"].as_object().unwrap() {
            field(&mut defs, 1, &named(name, &schema(s)));
        }
        field(&mut o, 9, &defs);
        o
    }
}

/// The fake API server: serves what tests/k8s-schema/ holds, records the paths asked for.
struct FakeApiServer {
    addr: std::net::SocketAddr,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl FakeApiServer {
    fn start() -> FakeApiServer {
        use std::collections::BTreeMap;
        use std::io::{Read, Write};
        // path -> (content type, body)
        let mut routes: BTreeMap<String, (&'static str, Vec<u8>)> = BTreeMap::new();
        let json = "application/json";
        let openapi = read_json(&k8s_schema("swagger.json"));
        routes.insert(
            "/openapi/v2".into(),
            (
                "application/com.github.proto-openapi.spec.v2.v1.0+protobuf",
                pb::document(&openapi),
            ),
        );
        let mut groups = Vec::new();
        let mut core = Vec::new();
        let disc = k8s_schema("discovery");
        for gv in [
            "api/v1",
            "apis/apps/v1",
            "apis/rbac.authorization.k8s.io/v1",
            "apis/node.k8s.io/v1",
        ] {
            let list = read_json(&disc.join(format!("{gv}.json")));
            let group_version = list["groupVersion"].as_str().unwrap().to_string();
            match group_version.split_once('/') {
                None => core.push(group_version.clone()),
                Some((g, v)) => {
                    let ver = serde_json::json!({"groupVersion": group_version, "version": v});
                    groups.push(
                        serde_json::json!({"name": g, "versions": [ver], "preferredVersion": ver}),
                    );
                }
            }
            routes.insert(format!("/{gv}"), (json, list.to_string().into_bytes()));
        }
        let api = serde_json::json!({"kind": "APIVersions", "versions": core});
        routes.insert("/api".into(), (json, api.to_string().into_bytes()));
        let apis =
            serde_json::json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups});
        routes.insert("/apis".into(), (json, apis.to_string().into_bytes()));
        let version = serde_json::json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0"});
        routes.insert("/version".into(), (json, version.to_string().into_bytes()));
        let routes = std::sync::Arc::new(routes);

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = requests.clone();
        // Lives as long as the test binary: an idle accept() of a loopback socket.
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let (routes, seen) = (routes.clone(), seen.clone());
                std::thread::spawn(move || {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head);
                    let target = head.split_whitespace().nth(1).unwrap_or("/");
                    let path = target.split('?').next().unwrap().trim_end_matches('/');
                    seen.lock().unwrap().push(path.to_string());
                    let not_found = serde_json::json!({"kind": "Status", "apiVersion": "v1",
                        "status": "Failure", "reason": "NotFound", "code": 404})
                    .to_string()
                    .into_bytes();
                    let (status, ctype, body) = match routes.get(path) {
                        Some((t, b)) => ("200 OK", *t, b.as_slice()),
                        None => ("404 Not Found", "application/json", not_found.as_slice()),
                    };
                    let _ = write!(
                        conn,
                        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
                         Connection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = conn.write_all(body);
                });
            }
        });
        FakeApiServer { addr, requests }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// kubectl, or None (reported not run) where there is none.
fn kubectl(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("kubectl"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        janus_tests::not_run(
            test,
            janus_tests::Prereq::Kubectl,
            "no kubectl (hack/test.sh installs Debian's kubernetes-client)",
            false,
        );
    }
    found
}

/// `kubectl apply --dry-run=client --validate=true -f FILE` against `server`, with a
/// kubeconfig and caches of its own. `--validate=true` is client-side schema validation in
/// every kubectl (Debian 12's 1.20 too; `strict` in newer ones).
fn kubectl_apply_dry_run(kubectl: &Path, server: &FakeApiServer, file: &Path) -> janus_tests::Out {
    let home = tempfile::tempdir().unwrap();
    let kubeconfig = home.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\n\
             clusters: [{{name: fake, cluster: {{server: \"http://{}\"}}}}]\n\
             users: [{{name: fake, user: {{}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n\
             current-context: fake\n",
            server.addr
        ),
    )
    .unwrap();
    let mut cmd = Command::new(kubectl);
    cmd.env("HOME", home.path())
        .env_remove("KUBECONFIG")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--cache-dir")
        .arg(home.path().join("cache"))
        .args(["apply", "--dry-run=client", "--validate=true", "-f"])
        .arg(file);
    run_with_timeout(cmd, None, Duration::from_secs(120)).unwrap()
}

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

/// The (apiVersion, kind) pairs tests/k8s-schema/swagger.json has a schema for. kubectl skips
/// validation of a kind the schema lacks, so every kind we apply must be there.
fn schema_kinds() -> Vec<(String, String)> {
    let doc = read_json(&k8s_schema("swagger.json"));
    let mut v = Vec::new();
    for s in doc["definitions"].as_object().unwrap().values() {
        for gvk in s["x-kubernetes-group-version-kind"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let (g, ver, k) = (&gvk["group"], &gvk["version"], &gvk["kind"]);
            let (g, ver) = (g.as_str().unwrap(), ver.as_str().unwrap());
            let api = if g.is_empty() {
                ver.to_string()
            } else {
                format!("{g}/{ver}")
            };
            v.push((api, k.as_str().unwrap().to_string()));
        }
    }
    v
}

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
    let cases: [(&str, &str, &str, &str, &str); 9] = [
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
    for (i, (file, from, to, want, want2)) in cases.iter().enumerate() {
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
