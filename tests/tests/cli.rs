//! `janus check` against a private containerd.

use std::path::PathBuf;
use std::process::Command;

use janus_tests::{shim_binary, workspace_root, Containerd, JANUS};

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

#[test]
fn check_passes_on_this_node() {
    let ctd = Containerd::for_runtime(JANUS);
    let shim = shim_binary().expect("shim binary");
    let guest = workspace_root().join("target/guest");
    assert!(
        guest.join("initramfs.cpio").is_file(),
        "{} has no guest image: run hack/build-guest.sh (hack/test.sh does, before this test)",
        guest.display()
    );
    let o = Command::new(janus_cli())
        .args(["check", "--address"])
        .arg(&ctd.address)
        .arg("--shim")
        .arg(&shim)
        .arg("--config")
        .arg(&ctd.janus_config)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("containerd socket") && out.contains("answers"),
        "{out}"
    );
    assert!(
        out.contains("ready for namespace mode and VM mode"),
        "{out}"
    );
}

/// `janus check` without a containerd, with `config` as the config file (plus `extra`
/// arguments): its exit code and stdout.
fn check_offline(name: &str, config: &str, extra: &[&str]) -> (Option<i32>, String) {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join(name);
    std::fs::write(&cfg, config).unwrap();
    let o = Command::new(janus_cli())
        .args(["check", "--address", "/nonexistent.sock", "--config"])
        .arg(&cfg)
        .args(extra)
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
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
