//! OCI runtime spec coverage through `ctr run --config <spec.json> ID`: a full spec (from
//! `ctr oci spec`, edited per test) with a busybox rootfs made here. Janus unless noted;
//! a few cases also run on runc to show the expectation is runc's behaviour.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use janus_tests::{Containerd, Out, JANUS, JANUS_VM, RUNC};
use serde_json::{json, Value};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A busybox rootfs with hard-linked applets, in a temp dir that lives as long as the value.
struct Rootfs {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn rootfs() -> Rootfs {
    let dir = tempfile::Builder::new()
        .prefix("janus-oci-")
        .tempdir()
        .unwrap();
    let path = dir.path().join("rootfs");
    for d in ["bin", "tmp", "proc", "dev", "sys", "etc", "root", "run"] {
        fs::create_dir_all(path.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", path.join("bin/busybox")).unwrap();
    let list = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .unwrap();
    for a in String::from_utf8_lossy(&list.stdout).lines() {
        if a != "busybox" && !a.is_empty() {
            let _ = fs::hard_link(path.join("bin/busybox"), path.join("bin").join(a));
        }
    }
    fs::write(
        path.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/tmp:/bin/sh\n",
    )
    .unwrap();
    fs::write(path.join("etc/group"), "root:x:0:\nuser:x:1000:\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    Rootfs { _dir: dir, path }
}

/// containerd's default spec for this containerd, rooted at `rootfs`, running `args`.
fn base_spec(ctd: &Containerd, rootfs: &Path, args: &[&str]) -> Value {
    let o = ctd.ctr(&["oci", "spec"]);
    assert!(o.success(), "{o}");
    let mut s: Value = serde_json::from_str(&o.stdout).unwrap();
    s["root"] = json!({"path": rootfs, "readonly": false});
    s["process"]["args"] = json!(args);
    s["process"]["env"] = json!(["PATH=/bin"]);
    s["process"]["terminal"] = json!(false);
    s
}

fn run_spec(ctd: &Containerd, rt: &str, id: &str, spec: &Value) -> Out {
    let p = ctd.dir.join(format!("{id}.json"));
    fs::write(&p, serde_json::to_vec_pretty(spec).unwrap()).unwrap();
    let p = p.display().to_string();
    ctd.ctr_timeout(
        &["run", "--rm", "--runtime", rt, "--config", &p, id],
        secs(60),
    )
}

#[track_caller]
fn ok(ctd: &Containerd, o: &Out) -> String {
    assert!(
        o.success(),
        "{o}\n--- containerd log ---\n{}",
        ctd.log_tail(30)
    );
    o.stdout.clone()
}

/// A hook that writes its state document to `<dir>/<name>.json` (a host path).
fn state_hook(dir: &Path, name: &str) -> Value {
    let o = dir.display();
    json!([{"path": "/bin/sh", "args": ["sh", "-c", format!("cat > {o}/{name}.json")]}])
}

/// The state document a hook of `phase` wrote to `p`; it names container `id`.
fn hook_state(p: &Path, phase: &str, id: &str) -> Value {
    let st: Value = serde_json::from_str(
        &fs::read_to_string(p).unwrap_or_else(|e| panic!("{phase} hook did not run: {e}")),
    )
    .unwrap();
    assert_eq!(st["id"], id, "{phase}: {st}");
    st
}

/// A runtime-namespace hook's state: also the container's pid and bundle.
fn runtime_hook_state(dir: &Path, phase: &str, id: &str) {
    let st = hook_state(&dir.join(format!("{phase}.json")), phase, id);
    assert!(st["pid"].as_i64().unwrap_or(0) > 0, "{phase}: {st}");
    assert!(st["bundle"].as_str().unwrap().contains(id), "{phase}: {st}");
}

#[test]
fn hooks_run_in_every_phase_with_state() {
    let ctd = Containerd::for_runtime(JANUS);
    let c = ctd.container("hooks");
    let r = rootfs();
    let out = tempfile::tempdir().unwrap();
    let hook = |name: &str| state_hook(out.path(), name);
    let mut s = base_spec(&ctd, &r.path, &["sh", "-c", "echo main"]);
    s["hooks"] = json!({
        "prestart": hook("prestart"),
        "createRuntime": hook("createRuntime"),
        "createContainer": hook("createContainer"),
        "poststart": hook("poststart"),
        "poststop": hook("poststop"),
        // startContainer runs inside the container: its path resolves in the rootfs.
        "startContainer": [{"path": "/bin/sh", "args": ["sh", "-c", "cat > /tmp/startContainer.json"]}],
    });
    assert_eq!(ok(&ctd, &run_spec(&ctd, JANUS, &c, &s)), "main\n");
    for phase in [
        "prestart",
        "createRuntime",
        "createContainer",
        "poststart",
        "poststop",
    ] {
        runtime_hook_state(out.path(), phase, &c);
    }
    assert!(
        r.path.join("tmp/startContainer.json").exists(),
        "startContainer hook did not run"
    );
    ctd.assert_no_leaks(&c, secs(10));
}

/// VM mode: the runtime-namespace phases (prestart, createRuntime, poststart, poststop) run on
/// the host with the container's state; createContainer and startContainer run in the guest,
/// in the container's namespaces, their paths looked up there (createContainer before
/// pivot_root, where the container's root is the share's `<id>/rootfs`; startContainer inside
/// the container's root).
#[test]
fn vm_hooks_run_where_their_phase_means() {
    let ctd = Containerd::for_runtime(JANUS_VM);
    let c = ctd.container("vmhooks");
    let r = rootfs();
    let out = tempfile::tempdir().unwrap();
    let hook = |name: &str| state_hook(out.path(), name);
    let guest_root = format!("/run/janus/shared/{}/rootfs", &*c);
    let mut s = base_spec(&ctd, &r.path, &["sh", "-c", "echo main"]);
    s["hooks"] = json!({
        "prestart": hook("prestart"),
        "createRuntime": hook("createRuntime"),
        "poststart": hook("poststart"),
        "poststop": hook("poststop"),
        "createContainer": [{"path": format!("{guest_root}/bin/sh"),
            "args": ["sh", "-c", format!("cat > {guest_root}/tmp/createContainer.json")]}],
        "startContainer": [{"path": "/bin/sh", "args": ["sh", "-c", "cat > /tmp/startContainer.json"]}],
    });
    assert_eq!(ok(&ctd, &run_spec(&ctd, JANUS_VM, &c, &s)), "main\n");
    for phase in ["prestart", "createRuntime", "poststart", "poststop"] {
        runtime_hook_state(out.path(), phase, &c);
    }
    // The guest's hooks wrote into the container's root, which is this directory (virtio-fs).
    for phase in ["createContainer", "startContainer"] {
        hook_state(&r.path.join(format!("tmp/{phase}.json")), phase, &c);
    }
    ctd.assert_no_leaks(&c, secs(10));
}

#[test]
fn failing_create_hook_fails_create_and_leaves_nothing() {
    failing_create_hook(JANUS)
}

/// In VM mode too: the container made in the guest is removed, the VM ended.
#[test]
fn vm_failing_create_hook_fails_create_and_leaves_nothing() {
    failing_create_hook(JANUS_VM)
}

fn failing_create_hook(rt: &str) {
    let ctd = Containerd::for_runtime(rt);
    let c = ctd.container("badhook");
    let r = rootfs();
    let mut s = base_spec(&ctd, &r.path, &["true"]);
    s["hooks"] = json!({"createRuntime": [{"path": "/bin/sh", "args": ["sh", "-c", "echo nope >&2; exit 7"]}]});
    let o = run_spec(&ctd, rt, &c, &s);
    assert!(!o.success(), "{o}");
    assert!(o.stderr.contains("createRuntime hook"), "{o}");
    ctd.assert_no_leaks(&c, secs(10));
}

#[test]
fn user_namespace_with_mappings() {
    let ctd = Containerd::for_runtime(JANUS);
    let c = ctd.container("userns");
    let r = rootfs();
    let mut s = base_spec(
        &ctd,
        &r.path,
        &[
            "sh",
            "-c",
            "id -u; cat /proc/self/uid_map; cat /proc/self/status | grep '^Uid'",
        ],
    );
    s["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "user"}));
    s["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    s["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    let out = ok(&ctd, &run_spec(&ctd, JANUS, &c, &s));
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("0"), "{out}");
    let map: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(map, ["0", "100000", "65536"], "{out}");
    ctd.assert_no_leaks(&c, secs(10));
}

#[test]
fn process_attributes() {
    let ctd = Containerd::for_runtime(JANUS);
    let c = ctd.container("attrs");
    let r = rootfs();
    let mut s = base_spec(
        &ctd,
        &r.path,
        &["sh", "-c", "id; umask; ulimit -n; hostname; pwd; cat /proc/self/status | grep -E '^(NoNewPrivs|CapEff)'"],
    );
    s["process"]["user"] =
        json!({"uid": 1000, "gid": 1000, "additionalGids": [10, 20], "umask": 63});
    s["process"]["cwd"] = json!("/tmp");
    s["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 2048, "soft": 1234}]);
    s["process"]["noNewPrivileges"] = json!(true);
    s["hostname"] = json!("janus-test-host");
    let out = ok(&ctd, &run_spec(&ctd, JANUS, &c, &s));
    assert!(
        out.contains("uid=1000(user) gid=1000(user) groups=10,20"),
        "{out}"
    );
    assert!(out.contains("0077"), "{out}");
    assert!(out.contains("\n1234\n"), "{out}");
    assert!(out.contains("janus-test-host"), "{out}");
    assert!(out.contains("/tmp"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
}

#[test]
fn masked_readonly_paths_sysctl_readonly_root() {
    let ctd = Containerd::for_runtime(JANUS);
    let c = ctd.container("paths");
    let r = rootfs();
    let mut s = base_spec(
        &ctd,
        &r.path,
        &[
            "sh",
            "-c",
            "echo timer_list=$(wc -c < /proc/timer_list); \
             (echo 1 > /proc/sys/kernel/domainname) 2>/dev/null && echo sys-writable || echo sys-readonly; \
             echo shm=$(cat /proc/sys/kernel/shm_rmid_forced); \
             (touch /newfile) 2>/dev/null && echo root-writable || echo root-readonly; \
             touch /tmp/x 2>/dev/null; echo tmp-done",
        ],
    );
    s["linux"]["sysctl"] = json!({"kernel.shm_rmid_forced": "1"});
    s["root"]["readonly"] = json!(true);
    // a writable /tmp on the read-only root
    s["mounts"].as_array_mut().unwrap().push(json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}));
    let out = ok(&ctd, &run_spec(&ctd, JANUS, &c, &s));
    assert!(out.contains("timer_list=0"), "{out}");
    assert!(out.contains("sys-readonly"), "{out}");
    assert!(out.contains("shm=1"), "{out}");
    assert!(out.contains("root-readonly"), "{out}");
    assert!(out.contains("tmp-done"), "{out}");
}

#[test]
fn devices_personality_and_seccomp() {
    let ctd = Containerd::for_runtime(JANUS);
    let c = ctd.container("devs");
    let r = rootfs();
    let mut s = base_spec(
        &ctd,
        &r.path,
        &["sh", "-c", "ls -l /dev/kmsg /dev/null; uname -m; grep Seccomp: /proc/self/status; echo x > /dev/null && echo null-ok"],
    );
    s["linux"]["devices"] = json!([{"path": "/dev/kmsg", "type": "c", "major": 1, "minor": 11, "fileMode": 420, "uid": 0, "gid": 0}]);
    s["linux"]["resources"]["devices"] = json!([{"allow": false, "access": "rwm"}, {"allow": true, "type": "c", "major": 1, "minor": 11, "access": "r"}]);
    s["linux"]["personality"] = json!({"domain": "LINUX32"});
    s["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["sethostname"], "action": "SCMP_ACT_ERRNO"}]});
    let out = ok(&ctd, &run_spec(&ctd, JANUS, &c, &s));
    assert!(
        out.contains("crw-r--r--") && out.contains("1,  11"),
        "{out}"
    );
    assert!(out.contains("i686"), "{out}");
    assert!(out.contains("Seccomp:\t2"), "{out}");
    assert!(out.contains("null-ok"), "{out}");
}

fn rejects(rt: &str, edit: impl Fn(&mut Value), needle: &str) {
    let ctd = Containerd::for_runtime(rt);
    let c = ctd.container("bad");
    let r = rootfs();
    let mut s = base_spec(&ctd, &r.path, &["true"]);
    edit(&mut s);
    let o = run_spec(&ctd, rt, &c, &s);
    assert!(!o.success(), "{o}");
    assert!(
        o.stderr.contains(needle),
        "expected {needle:?} in the error:\n{o}"
    );
    ctd.assert_no_leaks(&c, secs(10));
}

#[test]
fn bad_spec_empty_args() {
    rejects(JANUS, |s| s["process"]["args"] = json!([]), "process.args");
}

#[test]
fn bad_spec_unknown_capability() {
    rejects(
        JANUS,
        |s| s["process"]["capabilities"]["bounding"] = json!(["CAP_NOT_A_CAP"]),
        "CAP_NOT_A_CAP",
    );
}

#[test]
fn bad_spec_relative_cgroups_escape() {
    rejects(
        JANUS,
        |s| s["linux"]["cgroupsPath"] = json!("/a/../../b"),
        "cgroupsPath",
    );
}

#[test]
fn bad_spec_missing_executable() {
    rejects(
        JANUS,
        |s| s["process"]["args"] = json!(["no-such-binary"]),
        "executable file not found",
    );
}

#[test]
fn bad_spec_missing_executable_runc_too() {
    rejects(
        RUNC,
        |s| s["process"]["args"] = json!(["no-such-binary"]),
        "executable file not found",
    );
}

#[test]
fn bad_config_file_names_file_and_line() {
    let ctd = Containerd::for_runtime(JANUS);
    let c = ctd.container("badcfg");
    let cfg = ctd.write_janus_config("mode = \"namespace\"\nbogus = 1\n");
    let o = ctd.run_rm_with_config(JANUS, &c, &["true"]);
    assert!(!o.success(), "{o}");
    assert!(
        o.stderr.contains(&cfg.display().to_string()) && o.stderr.contains("line 2"),
        "{o}"
    );
    assert!(
        janus_tests::ctr_error_has_code(&o.stderr, "invalid argument"),
        "containerd should see InvalidArgument: {o}"
    );
    ctd.assert_no_leaks(&c, secs(10));
}

/// `mode = "vm"` in the runtime config runs the container in a VM (the guest kernel answers).
#[test]
fn vm_mode_from_config_runs_in_a_vm() {
    let ctd = Containerd::for_runtime(JANUS);
    let c = ctd.container("vmcfg");
    ctd.write_janus_config("mode = \"vm\"\n");
    let o = ctd.run_rm_with_config(JANUS, &c, &["uname", "-r"]);
    assert!(o.success(), "{o}");
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(
        !o.stdout.trim().is_empty() && o.stdout.trim() != host.trim(),
        "not the guest kernel: {o}"
    );
    ctd.assert_no_leaks(&c, secs(10));
}
