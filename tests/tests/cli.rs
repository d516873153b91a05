//! `janus check` against a private containerd, offline with configs the shim refuses, and with
//! containerd configs that do or do not carry deploy/'s handlers; `--help` of both binaries.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use janus_tests::{
    containerd_bin_dir, containerd_major, shim_binary, workspace_root, Containerd, JANUS,
    JANUS_SHIM_NAME, JANUS_VM_SHIM_NAME,
};

fn janus_cli() -> PathBuf {
    if let Some(p) = std::env::var_os("JANUS_CLI") {
        return PathBuf::from(p);
    }
    let t = workspace_root().join("target");
    for p in [t.join("release/janus"), t.join("debug/janus")] {
        if p.is_file() {
            return p;
        }
    }
    panic!("janus CLI not built: run `cargo build --release -p cli` (hack/test.sh does)");
}

/// `janus` with `args`: exit code, stdout, stderr.
fn janus<S: AsRef<OsStr>>(args: &[S]) -> (Option<i32>, String, String) {
    let o = Command::new(janus_cli()).args(args).output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The lines of `out` at `level` ("ok  ", "warn", "FAIL").
fn lines<'a>(out: &'a str, level: &str) -> Vec<&'a str> {
    let tag = format!("[{level}] ");
    out.lines().filter(|l| l.starts_with(&tag)).collect()
}

/// The line about `what` (the column after the level), if any.
fn line<'a>(out: &'a str, what: &str) -> Option<&'a str> {
    out.lines().find(|l| {
        l.get(7..)
            .and_then(|r| r.strip_prefix(what))
            .is_some_and(|r| r.starts_with(' '))
    })
}

/// A directory with the shim under both its names, as a node installs them.
fn shim_dir() -> tempfile::TempDir {
    let shim = shim_binary().expect("shim binary");
    let d = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&shim, d.path().join(JANUS_SHIM_NAME)).unwrap();
    std::os::unix::fs::symlink(&shim, d.path().join(JANUS_VM_SHIM_NAME)).unwrap();
    d
}

/// A containerd config in `dir` importing deploy/'s drop-in for containerd `major` (janus.toml,
/// version 2, for 1.x; janus-v3.toml, version 3, for 2.x) as a node does, the handlers'
/// ConfigPaths pointing at deploy/janus/ (what a node installs as /etc/janus/).
fn config_with_dropin(dir: &Path, major: u32) -> PathBuf {
    let (dropin, version) = if major >= 2 {
        ("janus-v3.toml", 3)
    } else {
        ("janus.toml", 2)
    };
    let text =
        std::fs::read_to_string(workspace_root().join("deploy/containerd").join(dropin)).unwrap();
    let installed = format!("{}/", workspace_root().join("deploy/janus").display());
    let copy = dir.join(dropin);
    std::fs::write(&copy, text.replace("/etc/janus/", &installed)).unwrap();
    let main = dir.join("config.toml");
    std::fs::write(
        &main,
        format!("version = {version}\nimports = [\"{}\"]\n", copy.display()),
    )
    .unwrap();
    main
}

#[test]
fn check_passes_on_this_node() {
    let ctd = Containerd::for_runtime(JANUS);
    let guest = workspace_root().join("target/guest");
    assert!(
        guest.join("initramfs.cpio").is_file(),
        "{} has no guest image: run hack/build-guest.sh (hack/test.sh does, before this test)",
        guest.display()
    );
    // The instance's bin dir has the shim and its VM alias; containerd's config carries the
    // drop-in of the containerd under test.
    let dir = tempfile::tempdir().unwrap();
    let containerd_config = config_with_dropin(dir.path(), containerd_major());
    let mut args: Vec<std::ffi::OsString> = vec!["check".into(), "--address".into()];
    args.push(ctd.address.clone().into());
    args.push("--shim".into());
    args.push(ctd.dir.join("bin").join(JANUS_SHIM_NAME).into());
    args.push("--config".into());
    args.push(ctd.janus_config.clone().into());
    args.push("--containerd-config".into());
    args.push(containerd_config.into());
    args.push("--containerd".into());
    args.push(containerd_bin_dir().join("containerd").into());
    let (code, out, err) = janus(&args);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("containerd socket") && out.contains("answers"),
        "{out}"
    );
    for what in [
        "handler janus",
        "handler janus-vm",
        "shim VM alias",
        "ip",
        "tc",
    ] {
        let l = line(&out, what).unwrap_or_else(|| panic!("no {what} line:\n{out}"));
        assert!(l.starts_with("[ok  ]"), "{l}");
    }
    assert!(
        out.contains("ready for namespace mode and VM mode"),
        "{out}"
    );
    args.push("--json".into());
    let (code, out, err) = janus(&args);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let doc: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(doc["ok"], true, "{out}");
    assert_eq!(doc["namespace_ready"], true, "{out}");
    assert_eq!(doc["vm_ready"], true, "{out}");
}

/// `janus check` without a containerd, with `config` as the config file (plus `extra`
/// arguments, which win over the defaults here): its exit code and stdout. The shim is the one
/// under test, containerd's config and the guest image are absent: on a node the integration
/// tests run on, that passes with warnings, so a failure is the config's.
fn check_offline(name: &str, config: &str, extra: &[&str]) -> (Option<i32>, String) {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join(name);
    std::fs::write(&cfg, config).unwrap();
    let shim = shim_binary().expect("shim binary");
    let mut args: Vec<&OsStr> = ["check", "--address", "/nonexistent.sock", "--config"]
        .map(OsStr::new)
        .to_vec();
    args.push(cfg.as_os_str());
    args.push(OsStr::new("--shim"));
    args.push(shim.as_os_str());
    for a in [
        "--containerd-config",
        "/nonexistent/containerd.toml",
        "--guest-dir",
        "/nonexistent",
    ] {
        args.push(OsStr::new(a));
    }
    args.extend(extra.iter().map(OsStr::new));
    let (code, out, _) = janus(&args);
    (code, out)
}

/// The control for the config cases below: a good config passes offline, with what was
/// skipped as warnings, and every line that is not ok carries its fix.
#[test]
fn check_offline_passes_with_a_good_config() {
    let (code, out) = check_offline("good.toml", "mode = \"namespace\"\n", &[]);
    assert_eq!(code, Some(0), "{out}");
    let skipped = line(&out, "containerd config").unwrap_or_else(|| panic!("{out}"));
    assert!(
        skipped.starts_with("[warn]") && skipped.contains("were not checked"),
        "{skipped}"
    );
    for l in lines(&out, "warn").into_iter().chain(lines(&out, "FAIL")) {
        assert!(l.contains("; fix: "), "no fix: {l}");
    }
    let (code, out) = check_offline("good.toml", "mode = \"namespace\"\n", &["--json"]);
    assert_eq!(code, Some(0), "{out}");
    let doc: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(doc["ok"], true, "{out}");
    assert_eq!(doc["namespace_ready"], true, "{out}");
    // No guest image: VM mode is not ready.
    assert_eq!(doc["vm_ready"], false, "{out}");
    for c in doc["checks"].as_array().unwrap() {
        let level = c["level"].as_str().unwrap();
        assert!(["ok", "warn", "fail"].contains(&level), "{c}");
        assert!(c["what"].is_string() && c["detail"].is_string(), "{c}");
        assert_eq!(c["fix"].is_string(), level != "ok", "{c}");
    }
}

/// Configs the shim refuses: `janus check` fails on them, on the config line alone, naming
/// the file and the problem.
#[test]
fn check_fails_on_configs_the_shim_refuses() {
    for (config, problem) in [
        ("mode = \"kvm\"\n", "kvm"),
        ("mode = \"vm\"\nbogus_key = 1\n", "bogus_key"),
        ("[vm]\nvcpus = 0\n", "vm.vcpus = 0"),
        ("[vm]\nhypervisr = \"qemu\"\n", "hypervisr"),
    ] {
        let (code, out) = check_offline("refused.toml", config, &[]);
        assert_eq!(code, Some(1), "{config}: {out}");
        let fails = lines(&out, "FAIL");
        assert_eq!(fails.len(), 1, "{config}: {out}");
        assert!(
            fails[0].starts_with("[FAIL] config ")
                && fails[0].contains("refused.toml")
                && fails[0].contains(problem),
            "{config}: {}",
            fails[0]
        );
    }
}

#[test]
fn check_json_reports_a_bad_config() {
    let (code, out) = check_offline("bad.toml", "[vm]\nvcpus = 0\n", &["--json"]);
    assert_eq!(code, Some(1), "{out}");
    let doc: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(doc["ok"], false, "{out}");
    assert_eq!(doc["namespace_ready"], false, "{out}");
    let fails: Vec<&serde_json::Value> = doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["level"] == "fail")
        .collect();
    assert_eq!(fails.len(), 1, "{out}");
    assert_eq!(fails[0]["what"], "config", "{out}");
    let detail = fails[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("bad.toml") && detail.contains("vm.vcpus = 0"),
        "{detail}"
    );
    assert!(fails[0]["fix"].is_string(), "{out}");
}

#[test]
fn help_exits_zero_and_bad_usage_two() {
    for args in [
        &["--help"][..],
        &["-h"],
        &["help"],
        &["check", "--help"],
        &["check", "-h"],
    ] {
        let (code, out, err) = janus(args);
        assert_eq!(code, Some(0), "{args:?}: {out}{err}");
        assert!(
            out.contains("usage: janus check") && out.contains("--containerd-config"),
            "{args:?}: {out}"
        );
        assert!(err.is_empty(), "{args:?}: {err}");
    }
    for args in [
        &["bogus"][..],
        &["check", "--bogus"],
        &["check", "--config"],
    ] {
        let (code, out, err) = janus(args);
        assert_eq!(code, Some(2), "{args:?}: {out}{err}");
        assert!(
            out.is_empty() && err.contains("usage: janus check"),
            "{args:?}: {out}{err}"
        );
    }
    let shim = shim_binary().expect("shim binary");
    for flag in ["--help", "-h"] {
        let o = Command::new(&shim).arg(flag).output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{flag}: {out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            out.contains("containerd runs it") && out.contains("-info") && out.contains("-v "),
            "{flag}: {out}"
        );
    }
}

/// `janus check` against containerd `containerd` reading `config`, with a good node config,
/// the shim under both names and no guest image: exit code and stdout.
fn check_containerd(containerd: &Path, config: &Path) -> (Option<i32>, String) {
    let shims = shim_dir();
    let d = tempfile::tempdir().unwrap();
    let node = d.path().join("config.toml");
    std::fs::write(&node, "mode = \"namespace\"\n").unwrap();
    let shim = shims.path().join(JANUS_SHIM_NAME);
    let args: Vec<&OsStr> = vec![
        "check".as_ref(),
        "--address".as_ref(),
        "/nonexistent.sock".as_ref(),
        "--config".as_ref(),
        node.as_os_str(),
        "--shim".as_ref(),
        shim.as_os_str(),
        "--containerd".as_ref(),
        containerd.as_os_str(),
        "--containerd-config".as_ref(),
        config.as_os_str(),
        "--guest-dir".as_ref(),
        "/nonexistent".as_ref(),
    ];
    let (code, out, _) = janus(&args);
    (code, out)
}

fn assert_line(out: &str, what: &str, level: &str, has: &[&str]) {
    let l = line(out, what).unwrap_or_else(|| panic!("no {what} line:\n{out}"));
    assert!(l.starts_with(&format!("[{level}]")), "{l}\n{out}");
    for h in has {
        assert!(l.contains(h), "{what}: no {h:?} in {l}");
    }
}

/// The system containerd (1.6) reading a config that imports deploy/containerd/janus.toml: both
/// handlers ok; without the drop-in both fail, the fix naming it; a janus-vm ConfigPath saying
/// mode = "namespace" fails as the shim would.
#[test]
fn check_reads_containerd_handlers_1_6() {
    let containerd = Path::new("/usr/bin/containerd");
    let version = Command::new(containerd).arg("--version").output();
    let version = version.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if !version.as_deref().is_ok_and(|v| v.contains(" 1.")) {
        janus_tests::not_run(
            "check_reads_containerd_handlers_1_6",
            janus_tests::Prereq::Containerd1,
            &format!("/usr/bin/containerd is not 1.x: {version:?}"),
            false,
        );
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let config = config_with_dropin(d.path(), 1);
    let (_, out) = check_containerd(containerd, &config);
    assert_line(&out, "containerd config", "ok  ", &["config version 2"]);
    assert_line(
        &out,
        "handler janus",
        "ok  ",
        &["io.containerd.janus.v2", "namespace mode"],
    );
    assert_line(
        &out,
        "handler janus-vm",
        "ok  ",
        &["io.containerd.janus-vm.v2", "vm mode"],
    );
    assert_line(&out, "shim VM alias", "ok  ", &[]);

    let bare = d.path().join("bare.toml");
    std::fs::write(&bare, "version = 2\n").unwrap();
    let (code, out) = check_containerd(containerd, &bare);
    assert_eq!(code, Some(1), "{out}");
    for h in ["handler janus", "handler janus-vm"] {
        assert_line(&out, h, "FAIL", &["not in", "deploy/containerd/janus.toml"]);
    }

    // janus-vm's config saying namespace: the shim's ModeConflict.
    let ns = d.path().join("ns.toml");
    std::fs::write(&ns, "mode = \"namespace\"\n").unwrap();
    let conflict = d.path().join("conflict.toml");
    std::fs::write(
        &conflict,
        format!(
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.janus]\n\
             runtime_type = \"io.containerd.janus.v2\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.janus-vm]\n\
             runtime_type = \"io.containerd.janus-vm.v2\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.janus-vm.options]\n\
             ConfigPath = \"{}\"\n",
            ns.display()
        ),
    )
    .unwrap();
    let (code, out) = check_containerd(containerd, &conflict);
    assert_eq!(code, Some(1), "{out}");
    assert_line(
        &out,
        "handler janus-vm",
        "FAIL",
        &["ns.toml", "mode = \"namespace\""],
    );
}

/// containerd 2.1 reading a config that imports deploy/containerd/janus-v3.toml: both handlers
/// ok; without it both fail, the fix naming the v3 drop-in; `sandboxer = "shim"` fails.
#[test]
fn check_reads_containerd_handlers_2_1() {
    let Some(containerd) = janus_tests::containerd2_binary() else {
        janus_tests::not_run(
            "check_reads_containerd_handlers_2_1",
            janus_tests::Prereq::Containerd2,
            "no containerd 2.x (hack/test.sh fetches Debian sid's with `ensure_containerd sid`; \
             or set JANUS_CONTAINERD2_ROOT)",
            false,
        );
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let config = config_with_dropin(d.path(), 2);
    let (_, out) = check_containerd(&containerd, &config);
    assert_line(&out, "containerd config", "ok  ", &["config version 3"]);
    assert_line(
        &out,
        "handler janus",
        "ok  ",
        &["io.containerd.janus.v2", "namespace mode"],
    );
    assert_line(
        &out,
        "handler janus-vm",
        "ok  ",
        &["io.containerd.janus-vm.v2", "vm mode"],
    );

    let bare = d.path().join("bare.toml");
    std::fs::write(&bare, "version = 3\n").unwrap();
    let (code, out) = check_containerd(&containerd, &bare);
    assert_eq!(code, Some(1), "{out}");
    for h in ["handler janus", "handler janus-vm"] {
        assert_line(
            &out,
            h,
            "FAIL",
            &["not in", "deploy/containerd/janus-v3.toml"],
        );
    }

    let shim = d.path().join("sandboxer.toml");
    let dropin = std::fs::read_to_string(d.path().join("janus-v3.toml")).unwrap();
    let with_sandboxer = dropin.replace(
        "runtime_type = \"io.containerd.janus-vm.v2\"",
        "runtime_type = \"io.containerd.janus-vm.v2\"\n  sandboxer = \"shim\"",
    );
    assert_ne!(dropin, with_sandboxer);
    std::fs::write(&shim, with_sandboxer).unwrap();
    let (code, out) = check_containerd(&containerd, &shim);
    assert_eq!(code, Some(1), "{out}");
    assert_line(&out, "handler janus", "ok  ", &[]);
    assert_line(&out, "handler janus-vm", "FAIL", &["sandboxer = \"shim\""]);
}

/// With `mode = "vm"`, what VM mode needs is required: a missing guest image fails the check.
#[test]
fn check_requires_vm_assets_in_vm_mode() {
    let (code, out) = check_offline(
        "vm.toml",
        "mode = \"vm\"\n",
        &["--guest-dir", "/nonexistent"],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("[FAIL] guest image") && out.contains("build-guest.sh"),
        "{out}"
    );
}

/// The guest image is the config's vm.kernel / vm.initrd where it names them, as for the shim.
#[test]
fn check_uses_the_configs_guest_image() {
    let (code, out) = check_offline(
        "vm.toml",
        "mode = \"vm\"\n[vm]\nkernel = \"/nonexistent/vmlinux-x\"\ninitrd = \"/nonexistent/initrd-x\"\n",
        &[],
    );
    assert_eq!(code, Some(1), "{out}");
    assert_line(
        &out,
        "guest image",
        "FAIL",
        &["vm.kernel", "/nonexistent/vmlinux-x", "vm.toml"],
    );
    let guest = workspace_root().join("target/guest");
    if !guest.join("initramfs.cpio").is_file() {
        janus_tests::not_run(
            "check_uses_the_configs_guest_image",
            janus_tests::Prereq::GuestImage,
            &format!("its second half (the image found): no {}", guest.display()),
            true,
        );
        return;
    }
    // Named in the config, found although --guest-dir points nowhere.
    let config = format!(
        "[vm]\nkernel = \"{g}/vmlinux\"\ninitrd = \"{g}/initramfs.cpio\"\n",
        g = guest.display()
    );
    let (_, out) = check_offline("vm.toml", &config, &[]);
    assert_line(&out, "guest image", "ok  ", &["vm.kernel/vm.initrd of"]);
}

#[test]
fn check_fails_with_a_reason_on_a_broken_config() {
    let (code, out) = check_offline("bad.toml", "mode = \n", &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("[FAIL] config") && out.contains("bad.toml"),
        "{out}"
    );
}

/// `janus check` names the builtin driver's state: usable with KVM where the CPU has vmx/svm,
/// a failure (VM mode configured) where it has not, saying what to use instead.
#[test]
fn check_reports_the_builtin_driver() {
    let (code, out) = check_offline(
        "builtin.toml",
        "mode = \"vm\"\n[vm]\nhypervisor = \"builtin\"\n",
        &[],
    );
    let hw = runtime::vm::hardware_virtualization().is_some();
    let line = out
        .lines()
        .find(|l| l.contains("hypervisor driver"))
        .unwrap_or_else(|| panic!("no hypervisor driver line:\n{out}"));
    if hw {
        eprintln!("check_reports_the_builtin_driver: CPU has vmx/svm: expecting builtin with KVM");
        assert!(line.starts_with("[ok  ]"), "{line}");
        assert!(line.contains("builtin (janus-vmm at"), "{line}");
    } else {
        eprintln!("check_reports_the_builtin_driver: CPU has no vmx/svm: expecting a failure");
        assert_eq!(code, Some(1), "{out}");
        assert!(
            line.contains("FAIL") && line.contains("needs vmx/svm"),
            "{line}"
        );
        assert!(line.contains("hypervisor = \"qemu\""), "{line}");
    }
}
