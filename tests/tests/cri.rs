//! The Kubernetes path: containerd's CRI plugin driven over gRPC (`runtime.v1`) as kubelet
//! drives it, every pod with `runtime_handler` `janus` (`janus::*`), `janus-vm` (`janus_vm::*`,
//! one VM per pod) or, to prove the harness and the expectations, `runc` (`runc::*`,
//! containerd's Go runc shim).
//!
//! Run: `cargo test -p janus-tests --test cri` (all), `... --test cri -- janus::` (our shim),
//! `... --test cri -- runc::` (harness check). Needs root, containerd, runc, busybox-static,
//! containernetworking-plugins, iproute2 (hack/test.sh installs them).
//!
//! Network safety: pods get addresses in a /24 of 10.250.0.0/16 on a bridge of their own and
//! no default route; the host only ever connects to a pod IP after checking that the route to it
//! goes through that bridge.

use std::collections::HashSet;
use std::time::Duration;

use janus_tests::cri::{self, profile, Cri, Pod};
use janus_tests::systemd_node::{self, SystemdNode};
use janus_tests::{cgroup_dir, poll};
use k8s_cri::v1 as api;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A pod with defaults, modified by `f`.
fn pod_with(c: &Cri, name: &str, f: impl FnOnce(&mut api::PodSandboxConfig)) -> Pod {
    let mut cfg = c.pod_config(name);
    f(&mut cfg);
    c.run_pod(cfg)
}

fn pod(c: &Cri, name: &str) -> Pod {
    pod_with(c, name, |_| {})
}

/// A container running `cmd` with defaults, modified by `f`; created and started.
fn ctr_with(
    c: &Cri,
    pod: &Pod,
    name: &str,
    cmd: &[&str],
    f: impl FnOnce(&mut api::ContainerConfig),
) -> String {
    let mut cfg = c.container_config(name, cmd);
    f(&mut cfg);
    c.run_container(pod, cfg)
}

/// A running `sleep` container.
fn sleeper(c: &Cri, pod: &Pod, name: &str) -> String {
    let id = ctr_with(c, pod, name, &["sleep", "100000"], |_| {});
    c.wait_running(&id);
    id
}

/// The container's security context (always present in our configs).
fn sc(cfg: &mut api::ContainerConfig) -> &mut api::LinuxContainerSecurityContext {
    cfg.linux
        .as_mut()
        .unwrap()
        .security_context
        .as_mut()
        .unwrap()
}

/// The pod's security context.
fn pod_sc(cfg: &mut api::PodSandboxConfig) -> &mut api::LinuxSandboxSecurityContext {
    cfg.linux
        .as_mut()
        .unwrap()
        .security_context
        .as_mut()
        .unwrap()
}

fn ns_link(path: &str) -> String {
    std::fs::read_link(path)
        .unwrap_or_else(|e| panic!("readlink {path}: {e}"))
        .display()
        .to_string()
}

/// `/proc/self/status` field of a process in the container (via ExecSync).
fn status_field(c: &Cri, id: &str, field: &str) -> String {
    let out = c.exec_ok(id, &["cat", "/proc/self/status"]);
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| c.fail(format!("no {field}: in /proc/self/status:\n{out}")))
}

fn cap_mask(c: &Cri, id: &str, field: &str) -> u64 {
    let v = status_field(c, id, field);
    u64::from_str_radix(&v, 16).unwrap_or_else(|e| c.fail(format!("{field} {v:?}: {e}")))
}

// CAP_* bit numbers.
const CAP_CHOWN: u32 = 0;
const CAP_KILL: u32 = 5;
const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_TIME: u32 = 25;

fn has(mask: u64, cap: u32) -> bool {
    mask & (1 << cap) != 0
}

// ---------------------------------------------------------------------------------------------
// Pods

/// RunPodSandbox, PodSandboxStatus (ready, handler, IP in our subnet), StopPodSandbox
/// (not ready), RemovePodSandbox (gone), nothing left behind.
fn pod_lifecycle(h: &str) {
    let c = Cri::start(h);
    let p = pod(&c, "lifecycle");
    let st = c.pod_status(&p.id);
    assert_eq!(
        st.state,
        api::PodSandboxState::SandboxReady as i32,
        "pod not ready: {st:#?}"
    );
    assert_eq!(st.runtime_handler, h, "{st:#?}");
    let ip = st
        .network
        .as_ref()
        .map(|n| n.ip.clone())
        .unwrap_or_default();
    assert!(
        c.env().in_subnet(&ip),
        "pod IP {ip:?} not in {}: {st:#?}",
        c.env().cidr()
    );
    // The sandbox container runs under the handler's shim (by executable: the Janus shim may
    // re-exec itself under its resolved path).
    let shims = c.shim_processes();
    let want = if h.starts_with(cri::JANUS_HANDLER) {
        std::fs::canonicalize(c.ctd.shim.as_ref().unwrap()).unwrap()
    } else {
        // containerd's own Go shim, of the containerd under test.
        janus_tests::containerd_bin_dir().join("containerd-shim-runc-v2")
    };
    assert!(
        !shims.is_empty() && shims.iter().all(|s| s.1 == want),
        "shims of handler {h} should all be {}: {shims:#?}",
        want.display()
    );
    c.try_stop_pod(&p.id)
        .unwrap_or_else(|e| c.fail(format!("{e:#}")));
    let st = c.pod_status(&p.id);
    assert_eq!(
        st.state,
        api::PodSandboxState::SandboxNotready as i32,
        "pod still ready after StopPodSandbox: {st:#?}"
    );
    c.try_remove_pod(&p.id)
        .unwrap_or_else(|e| c.fail(format!("{e:#}")));
    c.remove_pod_cgroups(&p);
    match c.try_pod_status(&p.id) {
        Err(e) => assert!(format!("{e}").contains("NotFound"), "{e:#}"),
        Ok(r) => c.fail(format!("pod still there after RemovePodSandbox: {r:#?}")),
    }
    c.assert_no_leaks(std::slice::from_ref(&p.id), secs(15));
}

// ---------------------------------------------------------------------------------------------
// Containers: exit codes and reasons

fn exit_status(h: &str, name: &str, cmd: &[&str], memory: i64) -> api::ContainerStatus {
    let c = Cri::start(h);
    let p = pod(&c, name);
    let id = ctr_with(&c, &p, name, cmd, |cfg| {
        if memory > 0 {
            let r = cfg.linux.as_mut().unwrap().resources.as_mut().unwrap();
            r.memory_limit_in_bytes = memory;
            r.memory_swap_limit_in_bytes = memory;
        }
    });
    let st = c.wait_exited(&id);
    // The reason can come a moment after the exit (the OOM event is separate).
    if memory > 0 {
        poll(secs(5), || {
            (c.container_status(&id).reason == "OOMKilled").then_some(())
        });
        return c.container_status(&id);
    }
    st
}

fn container_exit_completed(h: &str) {
    let st = exit_status(h, "completed", &["true"], 0);
    assert_eq!(
        (st.exit_code, st.reason.as_str()),
        (0, "Completed"),
        "{st:#?}"
    );
    // (containerd may record the exit a little before the start: don't compare them.)
    assert!(st.started_at > 0 && st.finished_at > 0, "{st:#?}");
}

fn container_exit_error(h: &str) {
    let st = exit_status(h, "error", &["sh", "-c", "exit 3"], 0);
    assert_eq!((st.exit_code, st.reason.as_str()), (3, "Error"), "{st:#?}");
}

/// A memory-limit kill: reason OOMKilled, exit code 137.
fn container_oom_killed(h: &str) {
    let st = exit_status(
        h,
        "oom",
        &[
            "sh",
            "-c",
            "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo survived",
        ],
        32 << 20,
    );
    assert_eq!(
        (st.exit_code, st.reason.as_str()),
        (137, "OOMKilled"),
        "{st:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Exec, attach, logs

fn exec_sync(h: &str) {
    let c = Cri::start(h);
    let p = pod(&c, "execsync");
    let id = sleeper(&c, &p, "app");
    let r = c.exec_sync(&id, &["sh", "-c", "echo to-out; echo to-err >&2; exit 7"]);
    assert_eq!(r.stdout, "to-out\n", "{r}");
    assert_eq!(r.stderr, "to-err\n", "{r}");
    assert_eq!(r.exit_code, 7, "{r}");
    let r = c.exec_sync(&id, &["echo", "ok"]);
    assert_eq!((r.stdout.as_str(), r.exit_code), ("ok\n", 0), "{r}");
    // A command that does not exist: an error exit code or a CRI error, never a hang.
    match c.try_exec_sync(&id, &["/no/such/binary"]) {
        Ok(r) => assert_ne!(r.exit_code, 0, "{r}"),
        Err(e) => eprintln!("exec of a missing binary: CRI error (accepted): {e:#}"),
    }
}

/// Exec through the streaming URL (WebSocket, v4.channel.k8s.io): stdin, stdout, stderr, exit
/// status.
fn exec_stream(h: &str) {
    let c = Cri::start(h);
    let p = pod(&c, "execstream");
    let id = sleeper(&c, &p, "app");
    let url = c.exec_url(api::ExecRequest {
        container_id: id.clone(),
        cmd: ["sh", "-c", "read l; echo got:$l; echo to-err >&2; exit 3"]
            .map(String::from)
            .to_vec(),
        tty: false,
        stdin: true,
        stdout: true,
        stderr: true,
    });
    let o = c
        .stream(&url, b"hello\n", |_| false, secs(30))
        .unwrap_or_else(|e| c.fail(format!("exec stream {url}: {e:#}")));
    assert_eq!(o.protocol, cri::REMOTECOMMAND_PROTOCOL, "{o}");
    assert_eq!(o.stdout_str(), "got:hello\n", "{o}");
    assert_eq!(o.stderr_str(), "to-err\n", "{o}");
    assert_eq!(o.exit_code(), Some(3), "{o}");
    // Exit 0 → Success status.
    let url = c.exec_url(api::ExecRequest {
        container_id: id.clone(),
        cmd: vec!["echo".into(), "fine".into()],
        stdout: true,
        stderr: true,
        ..Default::default()
    });
    let o = c
        .stream(&url, b"", |_| false, secs(30))
        .unwrap_or_else(|e| c.fail(format!("exec stream {url}: {e:#}")));
    assert_eq!(o.stdout_str(), "fine\n", "{o}");
    assert_eq!(o.exit_code(), Some(0), "{o}");
}

/// Attach through the streaming URL to a container reading its stdin.
fn attach_stream(h: &str) {
    let c = Cri::start(h);
    let p = pod(&c, "attach");
    let id = ctr_with(
        &c,
        &p,
        "reader",
        &[
            "sh",
            "-c",
            "while read l; do echo got:$l; echo err:$l >&2; done",
        ],
        |cfg| cfg.stdin = true,
    );
    c.wait_running(&id);
    let url = c.attach_url(api::AttachRequest {
        container_id: id.clone(),
        stdin: true,
        tty: false,
        stdout: true,
        stderr: true,
    });
    let o = c
        .stream(
            &url,
            b"hello\n",
            |o| o.stdout_str().contains("got:hello") && o.stderr_str().contains("err:hello"),
            secs(30),
        )
        .unwrap_or_else(|e| c.fail(format!("attach stream {url}: {e:#}")));
    assert!(o.stdout_str().contains("got:hello\n"), "{o}");
    assert!(o.stderr_str().contains("err:hello\n"), "{o}");
    // Still running after the client went away.
    let st = c.container_status(&id);
    assert_eq!(
        st.state,
        api::ContainerState::ContainerRunning as i32,
        "{st:#?}"
    );
}

/// Is `s` an RFC 3339 timestamp with (nano)seconds, as containerd writes them?
fn is_rfc3339nano(s: &str) -> bool {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| r.clone().all(|i| b.get(i).is_some_and(u8::is_ascii_digit));
    if b.len() < 20 || !digits(0..4) || b[4] != b'-' || !digits(5..7) || b[7] != b'-' {
        return false;
    }
    if !digits(8..10) || b[10] != b'T' || !digits(11..13) || b[13] != b':' || !digits(14..16) {
        return false;
    }
    if b[16] != b':' || !digits(17..19) {
        return false;
    }
    let rest = &s[19..];
    let rest = match rest.strip_prefix('.') {
        Some(r) => r.trim_start_matches(|c: char| c.is_ascii_digit()),
        None => rest,
    };
    rest == "Z" || (rest.len() == 6 && (rest.starts_with('+') || rest.starts_with('-')))
}

/// Container output lands in the CRI log path in CRI format.
fn container_logs(h: &str) {
    let c = Cri::start(h);
    let p = pod(&c, "logs");
    let cfg = c.container_config(
        "logger",
        &["sh", "-c", "echo line-1; echo err-1 >&2; echo line-2"],
    );
    let file = c.log_file(&p, &cfg);
    let id = c.run_container(&p, cfg);
    let st = c.wait_exited(&id);
    assert_eq!(st.exit_code, 0, "{st:#?}");
    assert_eq!(st.log_path, file.display().to_string(), "{st:#?}");
    let mut text = String::new();
    poll(secs(10), || {
        text = std::fs::read_to_string(&file).unwrap_or_default();
        (text.lines().count() >= 3).then_some(())
    });
    let mut seen = Vec::new();
    for l in text.lines() {
        let mut f = l.splitn(4, ' ');
        let (ts, stream, tag, msg) = (
            f.next().unwrap_or(""),
            f.next().unwrap_or(""),
            f.next().unwrap_or(""),
            f.next().unwrap_or(""),
        );
        assert!(
            is_rfc3339nano(ts),
            "bad timestamp {ts:?} in {}:\n{text}",
            file.display()
        );
        assert!(
            stream == "stdout" || stream == "stderr",
            "bad stream {stream:?}:\n{text}"
        );
        assert_eq!(tag, "F", "bad tag in {l:?}:\n{text}");
        seen.push((stream.to_string(), msg.to_string()));
    }
    let want = [
        ("stdout".to_string(), "line-1".to_string()),
        ("stderr".to_string(), "err-1".to_string()),
        ("stdout".to_string(), "line-2".to_string()),
    ];
    for w in &want {
        assert!(
            seen.contains(w),
            "{w:?} missing from {}:\n{text}",
            file.display()
        );
    }
    let pos = |w: &(String, String)| seen.iter().position(|s| s == w).unwrap();
    assert!(pos(&want[0]) < pos(&want[2]), "stdout order:\n{text}");
}

// ---------------------------------------------------------------------------------------------
// Pod networking and IPC

/// Two containers of one pod: localhost TCP between them, one IPC namespace and /dev/shm, one
/// network namespace, all different from the host's.
fn pod_shared_net_ipc(h: &str) {
    let c = Cri::start(h);
    let p = pod(&c, "shared");
    let server = ctr_with(
        &c,
        &p,
        "server",
        &[
            "sh",
            "-c",
            "echo shared-data > /dev/shm/janus-ipc; exec nc -ll -p 8080 -e echo hello-from-server",
        ],
        |_| {},
    );
    c.wait_running(&server);
    let client = sleeper(&c, &p, "client");
    let r = c.exec_sync(
        &client,
        &[
            "sh",
            "-c",
            "for i in $(seq 100); do nc 127.0.0.1 8080 && exit 0; sleep 0.1; done; exit 1",
        ],
    );
    assert_eq!(
        (r.exit_code, r.stdout.as_str()),
        (0, "hello-from-server\n"),
        "localhost between containers of a pod:\n{r}"
    );
    let shm = c.exec_ok(&client, &["cat", "/dev/shm/janus-ipc"]);
    assert_eq!(shm, "shared-data\n");
    for ns in ["ipc", "net", "uts"] {
        let path = format!("/proc/self/ns/{ns}");
        let a = c.exec_ok(&server, &["readlink", &path]);
        let b = c.exec_ok(&client, &["readlink", &path]);
        assert_eq!(a, b, "{ns} namespace differs between the pod's containers");
        assert_ne!(a.trim(), ns_link(&path), "{ns} namespace is the host's");
    }
    // Container PID namespaces (kubelet default: CONTAINER) differ.
    let a = c.exec_ok(&server, &["readlink", "/proc/self/ns/pid"]);
    let b = c.exec_ok(&client, &["readlink", "/proc/self/ns/pid"]);
    assert_ne!(a, b, "pid namespaces should be per container");
    let hn = c.exec_ok(&client, &["hostname"]);
    assert_eq!(hn.trim(), "shared");
}

/// A server in the pod answers the host on the pod IP, through the bridge.
fn pod_ip_from_host(h: &str) {
    let c = Cri::start(h);
    let p = pod(&c, "hostreach");
    let ip = c.pod_ip(&p.id);
    let id = ctr_with(
        &c,
        &p,
        "server",
        &["nc", "-ll", "-p", "8080", "-e", "echo", "hello-from-pod"],
        |_| {},
    );
    c.wait_running(&id);
    // The pod sees the IP on its eth0.
    let addrs = c.exec_ok(&id, &["ip", "-4", "-o", "addr", "show"]);
    assert!(
        addrs.contains(&format!("{ip}/24")),
        "pod IP {ip} not in:\n{addrs}"
    );
    let got = c
        .host_read_tcp(&ip, 8080, secs(10))
        .unwrap_or_else(|e| c.fail(format!("{e:#}")));
    assert_eq!(got, "hello-from-pod\n");
}

// ---------------------------------------------------------------------------------------------
// securityContext

fn run_as_user_group(h: &str) {
    let c = Cri::start(h);
    let p = pod(&c, "runas");
    let id = ctr_with(&c, &p, "app", &["sleep", "100000"], |cfg| {
        let s = sc(cfg);
        s.run_as_user = Some(api::Int64Value { value: 1000 });
        s.run_as_group = Some(api::Int64Value { value: 3000 });
    });
    c.wait_running(&id);
    let out = c.exec_ok(&id, &["id"]);
    assert!(
        out.starts_with("uid=1000(user) gid=3000"),
        "exec `id` in a runAsUser 1000 / runAsGroup 3000 container: {out}"
    );
    let pid = c.container_pid(&id);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |f: &str| {
        status
            .lines()
            .find(|l| l.starts_with(f))
            .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(field("Uid:"), ["1000"; 4], "init's Uid:\n{status}");
    assert_eq!(field("Gid:"), ["3000"; 4], "init's Gid:\n{status}");
}

fn readonly_rootfs(h: &str) {
    let c = Cri::start(h);
    let p = pod(&c, "rofs");
    let id = ctr_with(&c, &p, "app", &["sleep", "100000"], |cfg| {
        sc(cfg).readonly_rootfs = true;
    });
    c.wait_running(&id);
    let r = c.exec_sync(&id, &["sh", "-c", "echo x > /probe"]);
    assert_ne!(
        r.exit_code, 0,
        "write to / succeeded on a read-only rootfs:\n{r}"
    );
    assert!(r.stderr.contains("Read-only file system"), "{r}");
    let r = c.exec_sync(&id, &["sh", "-c", "echo x > /tmp/probe"]);
    assert_ne!(
        r.exit_code, 0,
        "write to /tmp succeeded on a read-only rootfs:\n{r}"
    );
    let mounts = c.exec_ok(&id, &["cat", "/proc/mounts"]);
    let root = mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == Some("/"))
        .unwrap_or_else(|| c.fail(format!("no / in /proc/mounts:\n{mounts}")));
    let opts = root.split(' ').nth(3).unwrap_or("");
    assert!(opts.split(',').any(|o| o == "ro"), "/ not ro: {root}");
    // Volumes that are writable stay so (/dev/shm is the pod's).
    c.exec_ok(&id, &["sh", "-c", "echo x > /dev/shm/probe"]);
}

fn capabilities_add_drop(h: &str) {
    let c = Cri::start(h);
    let p = pod(&c, "caps");
    let id = ctr_with(&c, &p, "app", &["sleep", "100000"], |cfg| {
        sc(cfg).capabilities = Some(api::Capability {
            add_capabilities: vec!["NET_ADMIN".into(), "SYS_TIME".into()],
            drop_capabilities: vec!["NET_RAW".into(), "CHOWN".into()],
            ..Default::default()
        });
    });
    c.wait_running(&id);
    for field in ["CapEff", "CapPrm", "CapBnd"] {
        let m = cap_mask(&c, &id, field);
        assert!(
            has(m, CAP_NET_ADMIN) && has(m, CAP_SYS_TIME),
            "{field} {m:#x}: added caps missing"
        );
        assert!(
            !has(m, CAP_NET_RAW) && !has(m, CAP_CHOWN),
            "{field} {m:#x}: dropped caps present"
        );
        assert!(has(m, CAP_KILL), "{field} {m:#x}: default CAP_KILL missing");
        assert!(
            !has(m, CAP_SYS_ADMIN),
            "{field} {m:#x}: CAP_SYS_ADMIN present"
        );
    }
    // And they act: NET_ADMIN can bring lo down/up; no CHOWN means chown fails.
    c.exec_ok(
        &id,
        &["sh", "-c", "ip link set lo down && ip link set lo up"],
    );
    let r = c.exec_sync(&id, &["sh", "-c", "touch /tmp/f && chown 1000 /tmp/f"]);
    assert_ne!(r.exit_code, 0, "chown without CAP_CHOWN succeeded:\n{r}");
}

fn privileged(h: &str) {
    let c = Cri::start(h);
    let p = pod_with(&c, "privileged", |cfg| pod_sc(cfg).privileged = true);
    let id = ctr_with(&c, &p, "app", &["sleep", "100000"], |cfg| {
        sc(cfg).privileged = true;
    });
    c.wait_running(&id);
    // Every capability of the host's bounding set (root here lacks CAP_SYS_RESOURCE).
    let host_bnd = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    assert_eq!(
        cap_mask(&c, &id, "CapEff"),
        host_bnd,
        "privileged CapEff is not the host's whole bounding set"
    );
    assert_eq!(
        status_field(&c, &id, "Seccomp"),
        "0",
        "privileged container has seccomp"
    );
    // (Not checked: /sys. The spec asks for rw, but runc 1.1 here mounts it ro in a pod with a
    // network namespace of its own, so there is no reference behaviour.)
    // Host devices are there and usable by the device cgroup.
    let dev = ["kvm", "loop-control", "net/tun", "mem"]
        .into_iter()
        .find(|d| std::path::Path::new("/dev").join(d).exists())
        .expect("none of /dev/kvm, loop-control, net/tun, mem on the host");
    c.exec_ok(&id, &["test", "-e", &format!("/dev/{dev}")]);
    let pid = c.container_pid(&id);
    if !janus_tests::cgroup_v2_only() {
        let list = cgroup_dir(pid, "devices").unwrap().join("devices.list");
        let l = std::fs::read_to_string(&list).unwrap_or_default();
        assert_eq!(l.trim(), "a *:* rwm", "{}", list.display());
    } else {
        janus_tests::not_run(
            &format!("privileged ({h}): devices.list check"),
            janus_tests::Prereq::CgroupV1,
            "cgroup v2 host: no devices controller file; device access is an eBPF program",
            true,
        );
    }
    // Not masked: /proc/kcore is readable-sized (masked paths are bind-mounted /dev/null).
    let r = c.exec_ok(
        &id,
        &["sh", "-c", "grep -c ' /proc/kcore ' /proc/mounts || true"],
    );
    assert_eq!(
        r.trim(),
        "0",
        "/proc/kcore is masked in a privileged container"
    );
}

fn seccomp_runtime_default(h: &str) {
    let c = Cri::start(h);
    let p = pod(&c, "seccompdefault");
    let id = ctr_with(&c, &p, "app", &["sleep", "100000"], |cfg| {
        sc(cfg).seccomp = Some(profile(api::security_profile::ProfileType::RuntimeDefault));
    });
    c.wait_running(&id);
    assert_eq!(
        status_field(&c, &id, "Seccomp"),
        "2",
        "seccomp RuntimeDefault: no filter in /proc/self/status (runtimeSpec.linux.seccomp: {})",
        c.container_info(&id)
            .pointer("/runtimeSpec/linux/seccomp/defaultAction")
            .cloned()
            .unwrap_or_default()
    );
    // The container's init too, seen from the host.
    let pid = c.container_pid(&id);
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(st.contains("Seccomp:\t2"), "init of the container:\n{st}");
}

fn seccomp_unconfined(h: &str) {
    let c = Cri::start(h);
    let p = pod(&c, "seccompunconfined");
    let id = sleeper(&c, &p, "app"); // our default config: Unconfined
    assert_eq!(status_field(&c, &id, "Seccomp"), "0");
}

fn sysctls(h: &str) {
    let c = Cri::start(h);
    let host_port =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start").unwrap();
    let host_shm = std::fs::read_to_string("/proc/sys/kernel/shm_rmid_forced").unwrap();
    let p = pod_with(&c, "sysctls", |cfg| {
        let s = &mut cfg.linux.as_mut().unwrap().sysctls;
        s.insert("net.ipv4.ip_unprivileged_port_start".into(), "80".into());
        s.insert("kernel.shm_rmid_forced".into(), "1".into());
    });
    let id = sleeper(&c, &p, "app");
    let v = c.exec_ok(
        &id,
        &["cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start"],
    );
    assert_eq!(
        v.trim(),
        "80",
        "net.ipv4.ip_unprivileged_port_start in the pod"
    );
    let v = c.exec_ok(&id, &["cat", "/proc/sys/kernel/shm_rmid_forced"]);
    assert_eq!(v.trim(), "1", "kernel.shm_rmid_forced in the pod");
    // The host's are untouched.
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start").unwrap(),
        host_port
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/shm_rmid_forced").unwrap(),
        host_shm
    );
}

/// Sets namespace `ns` ("net", "pid" or "ipc") to the node's.
fn use_node_ns(o: &mut api::NamespaceOption, ns: &str) {
    let mode = api::NamespaceMode::Node as i32;
    match ns {
        "net" => o.network = mode,
        "pid" => o.pid = mode,
        "ipc" => o.ipc = mode,
        _ => unreachable!(),
    }
}

fn host_namespace(h: &str, ns: &str) {
    let c = Cri::start(h);
    let p = pod_with(&c, &format!("host{ns}"), |cfg| {
        if ns == "net" {
            // CRI: the hostname may (and with runc must) be empty with the node's network
            // (no UTS namespace of the pod's own).
            cfg.hostname.clear();
        }
        use_node_ns(pod_sc(cfg).namespace_options.as_mut().unwrap(), ns);
    });
    // With the host's PID namespace, a child left behind by the container's init does not die
    // with it: the runtime must kill what is left in the container's cgroup (runc does).
    let id = ctr_with(
        &c,
        &p,
        "app",
        &["sh", "-c", "sleep 100000 & exec sleep 100001"],
        |cfg| use_node_ns(sc(cfg).namespace_options.as_mut().unwrap(), ns),
    );
    c.wait_running(&id);
    let path = format!("/proc/self/ns/{ns}");
    let inside = c.exec_ok(&id, &["readlink", &path]);
    assert_eq!(
        inside.trim(),
        ns_link(&path),
        "host{ns}: the container's {ns} namespace is not the host's"
    );
    match ns {
        "pid" => {
            // The test process is visible.
            c.exec_ok(
                &id,
                &["test", "-d", &format!("/proc/{}", std::process::id())],
            );
        }
        "net" => {
            // The host's interfaces are there.
            let links = c.exec_ok(&id, &["ip", "-o", "link", "show"]);
            for dev in std::fs::read_dir("/sys/class/net").unwrap().flatten() {
                let name = dev.file_name().to_string_lossy().into_owned();
                assert!(
                    links.contains(&format!(" {name}:")) || links.contains(&format!(" {name}@")),
                    "host network: no {name} in:\n{links}"
                );
            }
        }
        _ => {}
    }
    // The other namespaces are still the pod's own.
    for other in ["net", "pid", "ipc"].into_iter().filter(|o| *o != ns) {
        let path = format!("/proc/self/ns/{other}");
        let inside = c.exec_ok(&id, &["readlink", &path]);
        assert_ne!(
            inside.trim(),
            ns_link(&path),
            "host{ns}: {other} namespace is the host's too"
        );
    }
    // Nothing outlives the pod.
    c.stop_remove_pod(&p);
    c.assert_no_leaks(&[p.id.clone(), id], secs(15));
}

fn host_network(h: &str) {
    host_namespace(h, "net")
}

fn host_pid(h: &str) {
    host_namespace(h, "pid")
}

fn host_ipc(h: &str) {
    host_namespace(h, "ipc")
}

// ---------------------------------------------------------------------------------------------
// Resources

fn update_container_resources(h: &str) {
    let c = Cri::start(h);
    let p = pod(&c, "update");
    let id = sleeper(&c, &p, "app");
    let pid = c.container_pid(&id);
    let limit: i64 = 64 << 20;
    c.try_update_resources(
        &id,
        api::LinuxContainerResources {
            memory_limit_in_bytes: limit,
            cpu_period: 100_000,
            cpu_quota: 50_000,
            cpu_shares: 512,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| c.fail(format!("{e:#}")));
    if janus_tests::cgroup_v2_only() {
        let d = cgroup_dir(pid, "").unwrap();
        let got = std::fs::read_to_string(d.join("memory.max")).unwrap_or_default();
        assert_eq!(got.trim(), limit.to_string(), "{}", d.display());
        janus_tests::not_run(
            &format!("update_container_resources ({h}): cpu quota/shares checks"),
            janus_tests::Prereq::CgroupV1,
            "they read v1 files; this is a cgroup v2 host",
            true,
        );
        return;
    }
    let mem = cgroup_dir(pid, "memory").unwrap();
    let got = std::fs::read_to_string(mem.join("memory.limit_in_bytes")).unwrap_or_default();
    assert_eq!(
        got.trim(),
        limit.to_string(),
        "{}/memory.limit_in_bytes",
        mem.display()
    );
    assert!(
        mem.display().to_string().contains(&c.env().cgroup_root),
        "container cgroup {} not under the pod's cgroup parent",
        mem.display()
    );
    let cpu = cgroup_dir(pid, "cpu").unwrap();
    let quota = std::fs::read_to_string(cpu.join("cpu.cfs_quota_us")).unwrap_or_default();
    let shares = std::fs::read_to_string(cpu.join("cpu.shares")).unwrap_or_default();
    assert_eq!(quota.trim(), "50000", "{}/cpu.cfs_quota_us", cpu.display());
    assert_eq!(shares.trim(), "512", "{}/cpu.shares", cpu.display());
    // Still running, and the limit is enforced inside.
    let out = c.exec_ok(&id, &["cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]);
    assert_eq!(
        out.trim(),
        limit.to_string(),
        "limit seen inside the container"
    );
}

// ---------------------------------------------------------------------------------------------
// Scale and cleanup

/// 10 pods at once (created concurrently), each with a running container; then all stopped
/// and removed: no shim, process, mount, cgroup, netns or CNI state left.
fn many_pods(h: &str) {
    const N: usize = 10;
    let c = Cri::start(h);
    let pods: Vec<(Pod, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..N)
            .map(|i| {
                let c = &c;
                s.spawn(move || {
                    let p = pod(c, &format!("many-{i}"));
                    let id = ctr_with(c, &p, "app", &["sleep", "100000"], |_| {});
                    (p, id)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("pod thread"))
            .collect()
    });
    let mut ips = HashSet::new();
    for (p, id) in &pods {
        c.wait_running(id);
        let ip = c.pod_ip(&p.id);
        assert!(c.env().in_subnet(&ip), "pod IP {ip}");
        assert!(ips.insert(ip.clone()), "duplicate pod IP {ip}");
    }
    assert_eq!(c.list_pods().len(), N);
    assert_eq!(c.list_containers().len(), N);
    // While they run the leak detector sees them (proves it looks in the right places).
    let ids: Vec<String> = pods
        .iter()
        .flat_map(|(p, id)| [p.id.clone(), id.clone()])
        .collect();
    let live = c.leaks(&ids);
    for what in [
        "shim process",
        "mount:",
        "cgroup:",
        "netns:",
        "bridge port:",
    ] {
        assert!(
            live.iter().any(|l| l.starts_with(what)),
            "leak detector misses {what:?} of live pods:\n{}",
            live.join("\n")
        );
    }
    std::thread::scope(|s| {
        for (p, _) in &pods {
            let c = &c;
            s.spawn(move || c.stop_remove_pod(p));
        }
    });
    c.assert_no_leaks(&ids, secs(20));
}

/// StopContainer + RemoveContainer inside a pod that stays; the pod still works after.
fn container_stop_remove(h: &str) {
    let c = Cri::start(h);
    let p = pod(&c, "stoprm");
    let id = ctr_with(
        &c,
        &p,
        "app",
        &[
            "sh",
            "-c",
            "trap 'exit 0' TERM; touch /tmp/trap-set; while :; do sleep 0.1; done",
        ],
        |_| {},
    );
    c.wait_running(&id);
    // PID 1 ignores SIGTERM until its trap exists: stop only once the shell has set it.
    let deadline = std::time::Instant::now() + secs(10);
    while c.exec_sync(&id, &["test", "-f", "/tmp/trap-set"]).exit_code != 0 {
        if std::time::Instant::now() > deadline {
            c.fail("the container never set its TERM trap");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    c.try_stop_container(&id, 10)
        .unwrap_or_else(|e| c.fail(format!("{e:#}")));
    let st = c.container_status(&id);
    assert_eq!(
        (st.state, st.exit_code),
        (api::ContainerState::ContainerExited as i32, 0),
        "SIGTERM should end it with 0: {st:#?}"
    );
    c.try_remove_container(&id)
        .unwrap_or_else(|e| c.fail(format!("{e:#}")));
    assert!(
        c.try_container_status(&id).is_err(),
        "container still known"
    );
    let id2 = sleeper(&c, &p, "app2");
    assert_eq!(c.exec_ok(&id2, &["echo", "ok"]), "ok\n");
    c.stop_remove_pod(&p);
    c.assert_no_leaks(&[p.id.clone(), id, id2], secs(15));
}

// ---------------------------------------------------------------------------------------------

/// shareProcessNamespace: the pod's containers share one pid namespace (the pause
/// container's); all of a pod's containers are served by one shim (their init processes
/// have the same parent, the shim, as subreaper); killing the pause process from the host
/// ends the pod as it does with runc: the sandbox turns NotReady and, with a shared pid
/// namespace, the containers exit.
fn pod_shared_pid_one_shim_pause_killed(h: &str) {
    let c = Cri::start(h);
    let p = pod_with(&c, "sharedpid", |cfg| {
        pod_sc(cfg).namespace_options.as_mut().unwrap().pid = api::NamespaceMode::Pod as i32;
    });
    // kubelet sets the pod's pid mode in each container's namespace options too.
    let shared = |name: &str| {
        let id = ctr_with(&c, &p, name, &["sleep", "100000"], |cfg| {
            let o = sc(cfg)
                .namespace_options
                .get_or_insert_with(Default::default);
            o.pid = api::NamespaceMode::Pod as i32;
        });
        c.wait_running(&id);
        id
    };
    let a = shared("a");
    let b = shared("b");
    let na = c.exec_ok(&a, &["readlink", "/proc/self/ns/pid"]);
    let nb = c.exec_ok(&b, &["readlink", "/proc/self/ns/pid"]);
    assert_eq!(na, nb, "shareProcessNamespace: pid namespaces differ");
    // b sees a's sleep (and the pause process as pid 1).
    let ps = c.exec_ok(
        &b,
        &[
            "sh",
            "-c",
            "cat /proc/1/cmdline | tr '\\0' ' '; echo; ls /proc | grep -c '^[0-9]'",
        ],
    );
    let n: usize = ps.lines().last().unwrap_or("0").trim().parse().unwrap_or(0);
    assert!(
        n >= 3,
        "expected pause, a and b in one pid namespace:\n{ps}"
    );

    let ppid = |pid: u32| -> u32 {
        let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        st.rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().nth(1))
            .and_then(|x| x.parse().ok())
            .unwrap_or(0)
    };
    let (pa, pb) = (c.container_pid(&a), c.container_pid(&b));
    let shim = ppid(pa);
    assert!(
        shim > 1 && shim == ppid(pb),
        "containers of one pod have different parents: {} vs {}",
        ppid(pa),
        ppid(pb)
    );
    let cmd = std::fs::read_to_string(format!("/proc/{shim}/cmdline")).unwrap_or_default();
    assert!(
        cmd.contains("containerd-shim"),
        "parent {shim} is not a shim: {cmd}"
    );
    // The pause process: the shim's other child that is neither a nor b (pid 1 of the pod).
    let pause = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|&pid| {
            pid != pa && pid != pb && ppid(pid) == shim && {
                let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                // children of the shim in the pod's pid namespace: NSpid has two entries, the
                // last being 1 for the pause process.
                st.lines()
                    .any(|l| l.starts_with("NSpid:") && l.split_whitespace().last() == Some("1"))
            }
        })
        .unwrap_or_else(|| c.fail("pause process not found among the shim's children"));
    // SAFETY: kill(2) on a pid we just found; no memory effects.
    unsafe { libc::kill(pause as i32, libc::SIGKILL) };
    let deadline = std::time::Instant::now() + secs(20);
    loop {
        let st = c.pod_status(&p.id).state;
        let ea = c.container_status(&a).state;
        let eb = c.container_status(&b).state;
        let exited = api::ContainerState::ContainerExited as i32;
        if st == api::PodSandboxState::SandboxNotready as i32 && ea == exited && eb == exited {
            break;
        }
        if std::time::Instant::now() > deadline {
            c.fail(format!(
                "after killing pause: sandbox state {st}, containers {ea} {eb}"
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------------------------------------
// VM mode (handler `janus-vm`): one VM per pod

/// The virtiofsd socket of the pod's VM (QEMU is named after the sandbox).
fn pod_vm_socket(c: &Cri, pod: &Pod) -> String {
    janus_tests::vm_share_socket(&pod.id)
        .unwrap_or_else(|| c.fail(format!("no QEMU named after pod sandbox {}", pod.id)))
}

fn qemus_serving(sock: &str) -> usize {
    janus_tests::processes()
        .iter()
        .filter(|p| p.cmdline.contains("qemu-system") && p.cmdline.contains(sock))
        .count()
}

/// A pod's containers run in the one VM its sandbox booted, on the guest kernel, with the
/// pod's host volumes (read-write and read-only) and CRI's own binds (/etc/hostname) shared
/// in through virtio-fs; removing the pod leaves no QEMU, socket, share or mount.
fn vm_pod_one_vm(h: &str) {
    let c = Cri::start(h);
    let vol = c.ctd.dir.join("vol");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::write(vol.join("in.txt"), "from-host\n").unwrap();
    let p = pod(&c, "vmpod");
    let sock = pod_vm_socket(&c, &p);
    let shared = sock.replace(".vfs.sock", ".shared");
    let a = ctr_with(&c, &p, "a", &["sleep", "100000"], |cfg| {
        for (path, ro) in [("/vol", false), ("/rovol", true)] {
            cfg.mounts.push(api::Mount {
                container_path: path.into(),
                host_path: vol.display().to_string(),
                readonly: ro,
                ..Default::default()
            });
        }
    });
    c.wait_running(&a);
    let b = sleeper(&c, &p, "b");
    assert_eq!(qemus_serving(&sock), 1, "one QEMU for the pod");
    for id in [&a, &b] {
        assert!(
            janus_tests::vm_share_socket(id).is_none(),
            "container {id} got a VM of its own"
        );
    }
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let ka = c.exec_ok(&a, &["uname", "-r"]);
    let kb = c.exec_ok(&b, &["uname", "-r"]);
    assert_ne!(
        ka.trim(),
        host_kernel.trim(),
        "container a runs on the host kernel"
    );
    assert_eq!(ka, kb, "the pod's containers run on different kernels");
    assert_eq!(c.exec_ok(&a, &["cat", "/vol/in.txt"]), "from-host\n");
    c.exec_ok(&a, &["sh", "-c", "echo from-guest > /vol/out.txt"]);
    assert_eq!(
        std::fs::read_to_string(vol.join("out.txt")).unwrap_or_default(),
        "from-guest\n",
        "a write to the volume in the guest does not reach the host"
    );
    let r = c.exec_sync(&a, &["sh", "-c", "echo x > /rovol/nope"]);
    assert_ne!(r.exit_code, 0, "wrote to a read-only volume:\n{r}");
    assert!(!vol.join("nope").exists());
    assert_eq!(c.exec_ok(&b, &["cat", "/etc/hostname"]).trim(), "vmpod");
    c.stop_remove_pod(&p);
    let gone = poll(secs(20), || {
        (qemus_serving(&sock) == 0
            && !std::path::Path::new(&sock).exists()
            && !std::path::Path::new(&shared).exists())
        .then_some(())
    });
    assert!(
        gone.is_some(),
        "after RemovePodSandbox: qemu {}, socket {}, share {}",
        qemus_serving(&sock),
        std::path::Path::new(&sock).exists(),
        std::path::Path::new(&shared).exists()
    );
    c.assert_no_leaks(&[p.id.clone(), a, b], secs(15));
    assert_eq!(
        std::fs::read_to_string(vol.join("in.txt")).unwrap(),
        "from-host\n"
    );
}

/// CRI's pod resources (containerd's sandbox annotations) size the VM on top of the
/// configured base (256 MiB, 1 vCPU).
fn vm_pod_sized_by_annotations(h: &str) {
    let c = Cri::start(h);
    let p = pod_with(&c, "vmsize", |cfg| {
        cfg.linux.as_mut().unwrap().resources = Some(api::LinuxContainerResources {
            memory_limit_in_bytes: 256 << 20,
            cpu_period: 100_000,
            cpu_quota: 100_000,
            ..Default::default()
        });
    });
    let a = sleeper(&c, &p, "a");
    let mem = c.exec_ok(&a, &["grep", "MemTotal", "/proc/meminfo"]);
    let kib: u64 = mem
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| c.fail(format!("MemTotal: {mem:?}")));
    // 512 MiB of guest RAM less the kernel's reservations; 256 MiB would show < 256 MiB.
    assert!(
        kib > 400 << 10,
        "guest MemTotal {kib} KiB: the pod's memory was not added"
    );
    let host = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let n: usize = c.exec_ok(&a, &["nproc"]).trim().parse().unwrap_or(0);
    assert_eq!(n, 2.min(host), "guest vCPUs");
}

// ---------------------------------------------------------------------------------------------
// Conformance cases where VM mode once differed from runc (each runs on every handler that can
// do it; VM-mode refusals are their own cases below)

/// Pausing one container of a pod pauses that one only (through ctr, as an operator would:
/// CRI has no pause call); resuming the other is refused.
fn pause_one_of_two(h: &str) {
    let c = Cri::start(h);
    let p = pod(&c, "pausetwo");
    let a = sleeper(&c, &p, "a");
    let b = sleeper(&c, &p, "b");
    c.ctd.ctr_ok(&["task", "pause", &a]);
    assert_eq!(c.ctd.task_status(&a).as_deref(), Some("PAUSED"));
    assert_eq!(c.ctd.task_status(&b).as_deref(), Some("RUNNING"));
    let o = c.ctd.ctr(&["task", "resume", &b]);
    assert_ne!(o.code(), 0, "resumed a container that is not paused: {o}");
    // The other one still runs processes.
    c.exec_ok(&b, &["true"]);
    c.ctd.ctr_ok(&["task", "resume", &a]);
    assert_eq!(c.ctd.task_status(&a).as_deref(), Some("RUNNING"));
    c.exec_ok(&a, &["true"]);
    c.stop_remove_pod(&p);
    c.assert_no_leaks(&[p.id.clone(), a, b], secs(15));
}

/// `kubectl port-forward`: CRI's streaming server reaches a server listening in the pod (on
/// the pod's loopback too: in VM mode, the guest's), for two connections in a row.
fn port_forward_loopback(h: &str) {
    let c = Cri::start(h);
    let p = pod(&c, "portfwd");
    let id = ctr_with(
        &c,
        &p,
        "srv",
        &["nc", "-ll", "-p", "8080", "-e", "echo", "hi from the pod"],
        |_| {},
    );
    c.wait_running(&id);
    // The server listens once nc has bound: wait on that, not on time.
    let bound = poll(secs(20), || {
        c.exec_sync(&id, &["sh", "-c", "netstat -ltn | grep -q ':8080 '"])
            .exit_code
            .eq(&0)
            .then_some(())
    });
    assert!(bound.is_some(), "nc never listened on 8080");
    for _ in 0..2 {
        let url = c.port_forward_url(&p, 8080);
        let (data, err) = c
            .port_forward(&url, b"", |d| d.ends_with(b"\n"), secs(30))
            .unwrap_or_else(|e| c.fail(format!("{e:#}")));
        assert_eq!(
            String::from_utf8_lossy(&data),
            "hi from the pod\n",
            "port-forward error channel: {err}"
        );
    }
    c.stop_remove_pod(&p);
    c.assert_no_leaks(&[p.id.clone(), id], secs(15));
}

/// A dual-stack pod answers on its IPv4 and its IPv6 address (in VM mode: the guest NIC got
/// both from the pod's interface).
fn dual_stack_pod(h: &str) {
    let c = Cri::start_dual_stack(h);
    let p = pod(&c, "dualstack");
    let id = ctr_with(
        &c,
        &p,
        "srv",
        &["nc", "-ll", "-p", "8080", "-e", "echo", "hi"],
        |_| {},
    );
    c.wait_running(&id);
    let ips = c.pod_ips(&p.id);
    let v6 = ips.iter().find(|ip| ip.contains(':'));
    let v4 = ips.iter().find(|ip| ip.contains('.'));
    let (Some(v4), Some(v6)) = (v4, v6) else {
        c.fail(format!("pod IPs {ips:?}: want one IPv4 and one IPv6"))
    };
    for ip in [v4, v6] {
        let got = c
            .host_read_tcp(ip, 8080, secs(30))
            .unwrap_or_else(|e| c.fail(format!("{e:#}")));
        assert_eq!(got, "hi\n", "from {ip}");
    }
    c.stop_remove_pod(&p);
    c.assert_no_leaks(&[p.id.clone(), id], secs(15));
}

/// What a network-admin container does in its pod: a bridge with a veth port.
fn make_bridge(c: &Cri, id: &str) {
    for cmd in [
        "ip link add br0 type bridge",
        "ip link add v0 type veth",
        "ip link set v0 master br0",
        "ip link set br0 up",
    ] {
        let r = c.exec_sync(id, &["sh", "-c", cmd]);
        assert_eq!(r.exit_code, 0, "{cmd}:\n{r}");
    }
    let links = c.exec_ok(id, &["ip", "-o", "link", "show"]);
    assert!(
        links.contains(" br0:") && links.contains("master br0"),
        "{links}"
    );
}

fn net_admin_bridge(h: &str) {
    let c = Cri::start(h);
    let p = pod(&c, "netadmin");
    let id = ctr_with(&c, &p, "app", &["sleep", "100000"], |cfg| {
        sc(cfg).capabilities = Some(api::Capability {
            add_capabilities: vec!["NET_ADMIN".into()],
            ..Default::default()
        });
    });
    c.wait_running(&id);
    make_bridge(&c, &id);
    c.stop_remove_pod(&p);
    c.assert_no_leaks(&[p.id.clone(), id], secs(15));
}

fn privileged_bridge(h: &str) {
    let c = Cri::start(h);
    let p = pod_with(&c, "privbridge", |cfg| pod_sc(cfg).privileged = true);
    let id = ctr_with(&c, &p, "app", &["sleep", "100000"], |cfg| {
        sc(cfg).privileged = true;
    });
    c.wait_running(&id);
    make_bridge(&c, &id);
    c.stop_remove_pod(&p);
    c.assert_no_leaks(&[p.id.clone(), id], secs(15));
}

/// A host directory that is a shared mount point (what Kubernetes requires of the source of a
/// Bidirectional or HostToContainer volume), unmounted with everything under it on drop.
struct SharedDir(std::path::PathBuf);

impl SharedDir {
    fn new(c: &Cri, name: &str) -> SharedDir {
        let d = c.ctd.dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let run = |args: &[&str]| {
            let o = std::process::Command::new("mount")
                .args(args)
                .output()
                .unwrap();
            assert!(o.status.success(), "mount {args:?}: {o:?}");
        };
        let p = d.to_str().unwrap();
        run(&["--bind", p, p]);
        run(&["--make-shared", p]);
        SharedDir(d)
    }

    fn tmpfs_with_file(&self, sub: &str, text: &str) {
        let d = self.0.join(sub);
        std::fs::create_dir_all(&d).unwrap();
        let o = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "tmpfs", d.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        std::fs::write(d.join("f"), text).unwrap();
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .args(["-R", "-l"])
            .arg(&self.0)
            .status();
    }
}

fn propagation_ctr(c: &Cri, p: &Pod, dir: &SharedDir, prop: api::MountPropagation) -> String {
    let id = ctr_with(c, p, "app", &["sleep", "100000"], |cfg| {
        sc(cfg).privileged = true;
        cfg.mounts.push(api::Mount {
            container_path: "/vol".into(),
            host_path: dir.0.display().to_string(),
            propagation: prop as i32,
            ..Default::default()
        });
    });
    c.wait_running(&id);
    id
}

/// Bidirectional (rshared): a mount made in the container shows on the host, and one made on
/// the host after the container started shows in it.
fn propagation_bidirectional(h: &str) {
    let c = Cri::start(h);
    let dir = SharedDir::new(&c, "bidir");
    let p = pod_with(&c, "bidir", |cfg| pod_sc(cfg).privileged = true);
    let id = propagation_ctr(
        &c,
        &p,
        &dir,
        api::MountPropagation::PropagationBidirectional,
    );
    c.exec_ok(
        &id,
        &[
            "sh",
            "-c",
            "mkdir -p /vol/fromc && mount -t tmpfs tmpfs /vol/fromc && echo c > /vol/fromc/f",
        ],
    );
    assert_eq!(
        std::fs::read_to_string(dir.0.join("fromc/f")).unwrap_or_default(),
        "c\n",
        "the container's mount did not reach the host"
    );
    dir.tmpfs_with_file("fromh", "h\n");
    assert_eq!(c.exec_ok(&id, &["cat", "/vol/fromh/f"]), "h\n");
    c.stop_remove_pod(&p);
    // (The test's own mounts are not the pod's.)
    drop(dir);
    c.assert_no_leaks(&[p.id.clone(), id], secs(15));
}

/// HostToContainer (rslave): host mounts reach the container, the container's do not leave it.
fn propagation_host_to_container(h: &str) {
    let c = Cri::start(h);
    let dir = SharedDir::new(&c, "h2c");
    let p = pod_with(&c, "h2c", |cfg| pod_sc(cfg).privileged = true);
    let id = propagation_ctr(
        &c,
        &p,
        &dir,
        api::MountPropagation::PropagationHostToContainer,
    );
    dir.tmpfs_with_file("fromh", "h\n");
    assert_eq!(c.exec_ok(&id, &["cat", "/vol/fromh/f"]), "h\n");
    c.exec_ok(
        &id,
        &[
            "sh",
            "-c",
            "mkdir -p /vol/fromc && mount -t tmpfs tmpfs /vol/fromc && echo c > /vol/fromc/f",
        ],
    );
    assert!(
        !dir.0.join("fromc/f").exists(),
        "a mount made in a HostToContainer volume reached the host"
    );
    c.stop_remove_pod(&p);
    // (The test's own mounts are not the pod's.)
    drop(dir);
    c.assert_no_leaks(&[p.id.clone(), id], secs(15));
}

// ---------------------------------------------------------------------------------------------
// VM mode only: what a VM cannot share with the host is refused, by name

/// The node default config (what deploy/ installs: namespace mode) does not take the VM away
/// from a `janus-vm` pod.
fn vm_pod_under_namespace_node_default(h: &str) {
    let _node = janus_tests::NodeConfig::install("mode = \"namespace\"\n");
    let c = Cri::start(h);
    let p = pod(&c, "nodedefault");
    let id = sleeper(&c, &p, "app");
    let guest = std::fs::read_to_string(janus_tests::guest_dir().join("kernel.release"))
        .expect("kernel.release of the guest image");
    assert_eq!(c.exec_ok(&id, &["uname", "-r"]).trim(), guest.trim());
    assert!(
        janus_tests::vm_share_socket(&p.id).is_some(),
        "no VM for the pod"
    );
    c.stop_remove_pod(&p);
    c.assert_no_leaks(&[p.id.clone(), id], secs(15));
}

/// The VM (QEMU and virtiofsd) runs in the pod sandbox's cgroup, under the pod's cgroup
/// parent, so the pod is charged for its memory: the cgroup's usage covers QEMU's anonymous and
/// guest-RAM (shmem) pages. Removing the pod removes that cgroup.
fn vm_pod_charged_to_pod_cgroup(h: &str) {
    let c = Cri::start(h);
    let p = pod(&c, "vmcgroup");
    let id = sleeper(&c, &p, "app");
    let sock = pod_vm_socket(&c, &p);
    let (qemu, vfs) = janus_tests::vm_pids(&sock);
    assert_eq!(qemu.len(), 1, "one QEMU for the pod");
    assert!(!vfs.is_empty(), "no virtiofsd for the pod");
    let ctrl = if janus_tests::cgroup_v2_only() {
        ""
    } else {
        "memory"
    };
    let dir = cgroup_dir(qemu[0], ctrl).unwrap();
    let d = dir.display().to_string();
    assert!(
        d.contains(&p.id) && d.contains("/pod"),
        "QEMU is in cgroup {d}, not the pod's"
    );
    for v in &vfs {
        assert_eq!(
            cgroup_dir(*v, ctrl).unwrap(),
            dir,
            "virtiofsd {v} elsewhere"
        );
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", qemu[0])).unwrap();
    let kib = |k: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} in /proc/PID/status:\n{status}"))
    };
    let qemu_bytes = (kib("RssAnon:") + kib("RssShmem:")) * 1024;
    let file = if ctrl.is_empty() {
        "memory.current"
    } else {
        "memory.usage_in_bytes"
    };
    let usage: u64 = std::fs::read_to_string(dir.join(file))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        usage >= qemu_bytes * 95 / 100 && qemu_bytes > 32 << 20,
        "pod VM cgroup {d} uses {usage} bytes; QEMU holds {qemu_bytes} anonymous + guest RAM"
    );
    c.stop_remove_pod(&p);
    c.assert_no_leaks(&[p.id.clone(), id], secs(15));
    assert!(!dir.exists(), "VM cgroup {d} left after RemovePodSandbox");
}

fn vm_refuses_host_namespace(h: &str, ns: &str) {
    let c = Cri::start(h);
    let mut cfg = c.pod_config(&format!("vmhost{ns}"));
    if ns == "net" {
        cfg.hostname.clear();
    }
    use_node_ns(pod_sc(&mut cfg).namespace_options.as_mut().unwrap(), ns);
    let name = match ns {
        "net" => "network (hostNetwork)",
        "pid" => "PID (hostPID)",
        _ => "IPC (hostIPC)",
    };
    let e = match c.try_run_pod(cfg) {
        Ok(p) => c.fail(format!(
            "pod {} with the host's {ns} namespace ran in a VM",
            p.id
        )),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("invalid argument") || e.contains("InvalidArgument"),
        "not InvalidArgument: {e}"
    );
    assert!(e.contains(name) && e.contains("RuntimeClass janus"), "{e}");
    assert!(c
        .list_pods()
        .iter()
        .all(|p| p.state != api::PodSandboxState::SandboxReady as i32));
}

fn vm_refuses_host_network(h: &str) {
    vm_refuses_host_namespace(h, "net")
}

fn vm_refuses_host_pid(h: &str) {
    vm_refuses_host_namespace(h, "pid")
}

fn vm_refuses_host_ipc(h: &str) {
    vm_refuses_host_namespace(h, "ipc")
}

/// A mount made in a VM cannot reach the host through virtio-fs: Bidirectional is refused.
fn vm_refuses_bidirectional(h: &str) {
    let c = Cri::start(h);
    let dir = SharedDir::new(&c, "vmbidir");
    let p = pod_with(&c, "vmbidir", |cfg| pod_sc(cfg).privileged = true);
    let mut cfg = c.container_config("app", &["sleep", "100000"]);
    cfg.mounts.push(api::Mount {
        container_path: "/vol".into(),
        host_path: dir.0.display().to_string(),
        propagation: api::MountPropagation::PropagationBidirectional as i32,
        ..Default::default()
    });
    let e = match c
        .try_create_container(&p, cfg)
        .and_then(|id| c.try_start_container(&id))
    {
        Ok(()) => c.fail("a Bidirectional volume was accepted in VM mode"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("Bidirectional") && e.contains("virtio-fs"),
        "{e}"
    );
    c.stop_remove_pod(&p);
}

/// A NET_ADMIN container builds a bridge with a veth port and a VLAN in the guest (8021q,
/// which this CI host cannot load for runc). With a modular guest kernel (Debian's) the
/// modules its tools ask for load on demand and show in `/proc/modules`; our own kernel has
/// them built in and no module support (no `/proc/modules`): the links must work all the same.
fn vm_net_modules_on_demand(h: &str) {
    let c = Cri::start(h);
    let p = pod(&c, "vmmods");
    let id = ctr_with(&c, &p, "app", &["sleep", "100000"], |cfg| {
        sc(cfg).capabilities = Some(api::Capability {
            add_capabilities: vec!["NET_ADMIN".into()],
            ..Default::default()
        });
    });
    c.wait_running(&id);
    make_bridge(&c, &id);
    c.exec_ok(
        &id,
        &[
            "ip", "link", "add", "link", "br0", "name", "br0.5", "type", "vlan", "id", "5",
        ],
    );
    // The 8021q driver's own table: the VLAN device, its id and its parent.
    let vlan = c.exec_ok(&id, &["cat", "/proc/net/vlan/config"]);
    assert!(
        vlan.lines()
            .any(|l| l.split('|').map(str::trim).eq(["br0.5", "5", "br0"])),
        "{vlan}"
    );
    let modular = c.exec_sync(&id, &["test", "-e", "/proc/modules"]).exit_code == 0;
    if modular {
        let mods = c.exec_ok(&id, &["cat", "/proc/modules"]);
        for m in ["bridge ", "veth ", "8021q "] {
            assert!(mods.contains(m), "{m}not loaded in the guest:\n{mods}");
        }
    } else {
        eprintln!("vm_net_modules_on_demand: the guest kernel has no module support (built in)");
    }
    c.stop_remove_pod(&p);
    c.assert_no_leaks(&[p.id.clone(), id], secs(15));
}

/// The systemd cgroup driver's form: containerd's CRI hands the runtime
/// `<slice>:cri-containerd:<id>` whenever the pod's cgroup parent is a `.slice` (kubelet with
/// `cgroupDriver: systemd`). This host has no systemd: the container gets the directory
/// systemd would have made, the slice expanded into its nesting, then the scope. In VM mode
/// the VM sits in the sandbox's scope on the host and the container in its own in the guest.
fn systemd_cgroup_path(h: &str) {
    let c = Cri::start(h);
    let top = janus_tests::unique_id("jt").replace('-', "");
    let mut base = String::new();
    let p = pod_with(&c, "sdcgroup", |cfg| {
        let uid = cfg.metadata.as_ref().unwrap().uid.clone();
        base = format!("/{top}.slice/{top}-besteffort.slice/{top}-besteffort-pod{uid}.slice");
        cfg.linux.as_mut().unwrap().cgroup_parent = base.clone();
    });
    let id = sleeper(&c, &p, "app");
    let ctrl = if janus_tests::cgroup_v2_only() {
        ""
    } else {
        "memory"
    };
    let scope = |cid: &str| format!("{base}/cri-containerd-{cid}.scope");
    let host_pid = if h == cri::JANUS_VM_HANDLER {
        let inside = c.exec_ok(&id, &["cat", "/proc/self/cgroup"]);
        assert!(
            inside.lines().any(|l| l.ends_with(&scope(&id))),
            "guest cgroup of the container is not {}:\n{inside}",
            scope(&id)
        );
        let sock = pod_vm_socket(&c, &p);
        let procs = janus_tests::processes();
        let vmm = procs
            .iter()
            .find(|x| x.cmdline.contains("qemu-system") && x.cmdline.contains(&sock))
            .expect("the pod's QEMU");
        (vmm.pid, p.id.clone())
    } else {
        (c.container_pid(&id), id.clone())
    };
    let dir = cgroup_dir(host_pid.0, ctrl).unwrap();
    assert!(
        dir.ends_with(scope(&host_pid.1).trim_start_matches('/')),
        "host cgroup {} is not {}",
        dir.display(),
        scope(&host_pid.1)
    );
    c.stop_remove_pod(&p);
    // Janus removed the scopes; the slices are kubelet's to remove.
    let rel = base.trim_start_matches('/');
    for d in cri::cgroup_controller_dirs() {
        for cid in [&id, &p.id] {
            let s = d.join(scope(cid).trim_start_matches('/'));
            assert!(!s.exists(), "{} left behind", s.display());
        }
        let mut slice = std::path::PathBuf::from(rel);
        loop {
            let _ = std::fs::remove_dir(d.join(&slice));
            if !slice.pop() || slice.as_os_str().is_empty() {
                break;
            }
        }
    }
    c.assert_no_leaks(&[p.id.clone(), id], secs(15));
}

/// Under a real systemd (a node container with systemd as PID 1 and dbus, as kind's nodes
/// have): a pod with a `.slice` cgroup parent gets the systemd form of cgroupsPath, and Janus
/// starts each container (VM mode: the pod's VM, QEMU and virtiofsd) in a transient scope
/// through systemd's D-Bus API, its memory limit a unit property as well as the cgroup's;
/// removing the pod stops the scopes (systemd no longer knows them) and removes their groups.
fn systemd_node_scopes(h: &str) {
    if let Err(why) = systemd_node::available() {
        let test = format!("systemd_node_scopes ({h})");
        janus_tests::not_run(&test, janus_tests::Prereq::Systemd, &why, false);
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("janus-node-")
        .tempdir()
        .unwrap();
    let node = SystemdNode::boot(dir.path()).unwrap_or_else(|e| panic!("{e:#}"));
    let launcher = node.launcher(&format!("jt-containerd-{}", std::process::id()));
    let c = Cri::start_under(h, launcher)
        .unwrap_or_else(|e| panic!("containerd in the node: {e:#}\n{}", node.logs()));
    let top = janus_tests::unique_id("sd").replace('-', "");
    let mut base = String::new();
    let p = pod_with(&c, "sdnode", |cfg| {
        let uid = cfg.metadata.as_ref().unwrap().uid.clone();
        base = format!("/{top}.slice/{top}-burstable.slice/{top}-burstable-pod{uid}.slice");
        cfg.linux.as_mut().unwrap().cgroup_parent = base.clone();
    });
    let limit: i64 = 96 << 20;
    let id = ctr_with(&c, &p, "app", &["sleep", "100000"], |cfg| {
        let r = cfg
            .linux
            .as_mut()
            .unwrap()
            .resources
            .get_or_insert_with(Default::default);
        r.memory_limit_in_bytes = limit;
    });
    c.wait_running(&id);
    let scope = |cid: &str| format!("cri-containerd-{cid}.scope");
    let show = |unit: &str| {
        node.show(
            unit,
            &["LoadState", "ActiveState", "ControlGroup", "MemoryLimit"],
        )
        .unwrap_or_else(|e| panic!("{e:#}"))
    };
    // (unit, /proc directories of the processes that must be in it)
    let mut held = Vec::new();
    if h == cri::JANUS_VM_HANDLER {
        let sock = pod_vm_socket(&c, &p);
        let procs: Vec<std::path::PathBuf> = janus_tests::processes()
            .iter()
            // QEMU names the socket; virtiofsd (which inherits it) names the share.
            .filter(|x| {
                x.cmdline.contains(&sock)
                    || x.cmdline.contains(&sock.replace(".vfs.sock", ".shared"))
                    || x.cmdline.contains(&p.id)
            })
            .filter(|x| x.cmdline.contains("qemu-system") || x.cmdline.contains("virtiofsd"))
            .map(|x| std::path::PathBuf::from(format!("/proc/{}", x.pid)))
            .collect();
        assert!(
            procs.len() >= 2,
            "QEMU and virtiofsd of pod {}: {procs:?}",
            p.id
        );
        held.push((scope(&p.id), procs));
    } else {
        // containerd reports the pid in the node's pid namespace.
        held.push((scope(&id), vec![node.proc_dir(c.container_pid(&id))]));
        // The limit: the unit's property and the cgroup's file agree.
        let props = show(&scope(&id));
        assert!(props.contains(&format!("MemoryLimit={limit}")), "{props}");
    }
    for (unit, procs) in &held {
        let props = show(unit);
        let group = format!("{base}/{unit}");
        assert!(
            props.contains("ActiveState=active")
                && props.contains(&format!("ControlGroup={group}")),
            "{unit} in the node's systemd:\n{props}"
        );
        // Every controller, systemd's and those it leaves alone (devices, freezer...).
        for ctrl in ["memory", "pids", "devices", "freezer"] {
            for proc in procs {
                let d = janus_tests::cgroup_dir_of(proc, ctrl).unwrap();
                assert!(
                    d.ends_with(format!("{}{group}", node.cgroup)),
                    "{} in {ctrl} cgroup {}, not {group} of the node",
                    proc.display(),
                    d.display()
                );
            }
        }
        if h != cri::JANUS_VM_HANDLER {
            let d = janus_tests::cgroup_dir_of(&procs[0], "memory").unwrap();
            let got = std::fs::read_to_string(d.join("memory.limit_in_bytes")).unwrap();
            assert_eq!(got.trim(), limit.to_string(), "{}", d.display());
        }
    }
    c.stop_remove_pod(&p);
    for (unit, _) in &held {
        let props = show(unit);
        assert!(
            props.contains("LoadState=not-found"),
            "{unit} after the pod's removal:\n{props}"
        );
        let d = format!("/sys/fs/cgroup/memory/{}{base}/{unit}", node.cgroup);
        assert!(!std::path::Path::new(&d).exists(), "{d} left behind");
    }
    drop(c);
    drop(node);
}

/// The installer's payload as the installer image holds it (hack/build-installer.sh): the
/// release binaries, the guest image, deploy/janus's configs.
fn installer_payload(dir: &std::path::Path) -> std::path::PathBuf {
    let shim = janus_tests::shim_binary().unwrap();
    let bins = shim.parent().unwrap();
    for (d, files) in [
        ("bin", vec![shim.clone(), bins.join("janus")]),
        (
            "guest",
            vec![
                janus_tests::guest_dir().join("vmlinux"),
                janus_tests::guest_dir().join("initramfs.cpio"),
            ],
        ),
        (
            "etc",
            vec![
                janus_tests::workspace_root().join("deploy/janus/config.toml"),
                janus_tests::workspace_root().join("deploy/janus/vm.toml"),
            ],
        ),
    ] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
        for f in files {
            let to = dir.join(d).join(f.file_name().unwrap());
            std::fs::copy(&f, &to).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        }
    }
    dir.to_path_buf()
}

/// `janus install` on a node (a directory standing for its root; the containerd under test
/// reads its config from it): twice in a row (the same result), both handlers run pods through
/// CRI with what it installed (namespace mode on the host's kernel, VM mode on the guest's),
/// and `janus uninstall` leaves the node byte for byte as it was (containerd 1.x: handlers in
/// config.toml; 2.x: a drop-in and an `imports` entry).
#[test]
fn installer_round_trip() {
    let node = tempfile::Builder::new()
        .prefix("janus-node-root-")
        .tempdir()
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let payload = installer_payload(work.path());
    let janus = janus_tests::shim_binary().unwrap().with_file_name("janus");
    let run = {
        let janus = janus.clone();
        move |cmd: &str, root: &std::path::Path| {
            let o = std::process::Command::new(&janus)
                .arg(cmd)
                .arg("--host-root")
                .arg(root)
                .arg("--node-root")
                .arg(root)
                .arg("--from")
                .arg(&payload)
                .args(["--restart", "none", "--node", ""])
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "janus {cmd}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    };
    let before = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let prepare = {
        let (before, run) = (before.clone(), run.clone());
        janus_tests::Prepare(std::sync::Arc::new(move |root: &std::path::Path| {
            *before.lock().unwrap() = janus_tests::file_tree(root);
            run("install", root);
            let once = janus_tests::file_tree(root);
            run("install", root);
            assert_eq!(
                janus_tests::file_tree(root),
                once,
                "a second install changed the node"
            );
            assert_ne!(once, *before.lock().unwrap(), "install changed nothing");
            Ok(())
        }))
    };
    let mut c = Cri::start_on_node(cri::JANUS_HANDLER, node.path(), prepare)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut ids = Vec::new();
    for h in [cri::JANUS_HANDLER, cri::JANUS_VM_HANDLER] {
        c.handler = h.to_string();
        let p = pod(&c, &format!("installed-{h}"));
        let id = sleeper(&c, &p, "app");
        // The installed shim ran it (containerd's PATH has no other).
        let shims: Vec<_> = c.shim_processes().into_iter().map(|s| s.2).collect();
        assert!(
            shims
                .iter()
                .any(|s| s.starts_with(node.path().join("usr/local/bin").to_str().unwrap())),
            "{shims:?}"
        );
        let kernel = c.exec_ok(&id, &["uname", "-r"]);
        let in_vm = kernel.trim() != host.trim();
        assert_eq!(in_vm, h == cri::JANUS_VM_HANDLER, "{h}: kernel {kernel}");
        c.stop_remove_pod(&p);
        ids.extend([p.id.clone(), id]);
    }
    c.assert_no_leaks(&ids, secs(20));
    drop(c);
    run("uninstall", node.path());
    assert_eq!(
        janus_tests::file_tree(node.path()),
        *before.lock().unwrap(),
        "uninstall left the node changed"
    );
}

/// The deploy/ drop-in for this containerd (version 2 for 1.x, version 3 for 2.x), imported as
/// a node imports it, is all that defines Janus's handlers: a pod on each runs, in its mode.
#[test]
fn deploy_dropin_runs_both_handlers() {
    let dropin = if janus_tests::containerd_major() >= 2 {
        "deploy/containerd/janus-v3.toml"
    } else {
        "deploy/containerd/janus.toml"
    };
    let mut c = Cri::start_with_dropin(
        cri::JANUS_HANDLER,
        &janus_tests::workspace_root().join(dropin),
    );
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut ids = Vec::new();
    for h in [cri::JANUS_HANDLER, cri::JANUS_VM_HANDLER] {
        c.handler = h.to_string();
        let p = pod(&c, &format!("dropin-{h}"));
        let id = sleeper(&c, &p, "app");
        let kernel = c.exec_ok(&id, &["uname", "-r"]);
        // Namespace mode shares the host's kernel; VM mode runs the guest's.
        let in_vm = kernel.trim() != host.trim();
        assert_eq!(
            in_vm,
            h == cri::JANUS_VM_HANDLER,
            "{h} (with {dropin}): kernel {kernel}"
        );
        c.stop_remove_pod(&p);
        ids.extend([p.id.clone(), id]);
    }
    c.assert_no_leaks(&ids, secs(20));
}

/// containerd 2.x can hand a pod's sandbox to the shim (`sandboxer = "shim"`: the
/// `containerd.runtime.sandbox.v1.Sandbox` ttrpc service, no pause container). Janus does not
/// implement it (docs/architecture.md, "containerd's sandbox API", says why and what it
/// takes): a handler configured so must fail RunPodSandbox as Unimplemented with the fix, and
/// leave no shim behind (containerd's cleanup sends ShutdownSandbox, never a Task Shutdown);
/// the default sandboxer (`podsandbox`, a pause container) is what every other `janus-vm`
/// test runs.
#[test]
fn vm_sandboxer_shim_is_refused_cleanly() {
    if janus_tests::containerd_major() < 2 {
        janus_tests::not_run(
            "vm_sandboxer_shim_is_refused_cleanly",
            janus_tests::Prereq::Containerd2,
            "the sandbox API needs containerd 2.x (hack/test.sh runs this suite on 2.1 too)",
            false,
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let deployed = janus_tests::workspace_root().join("deploy/containerd/janus-v3.toml");
    let text = std::fs::read_to_string(&deployed).unwrap();
    let vm_type = "runtime_type = \"io.containerd.janus-vm.v2\"";
    assert!(text.contains(vm_type), "{}", deployed.display());
    let dropin = dir.path().join("janus-sandboxer.toml");
    let with = format!("{vm_type}\n  sandboxer = \"shim\"");
    std::fs::write(&dropin, text.replace(vm_type, &with)).unwrap();
    let c = Cri::start_with_dropin(cri::JANUS_VM_HANDLER, &dropin);
    let err = match c.try_run_pod(c.pod_config("sandboxer")) {
        Ok(p) => c.fail(format!("pod {} ran with sandboxer = shim", p.id)),
        Err(e) => format!("{e:#}"),
    };
    // The code and the fix reach the CRI client.
    assert!(
        err.contains("Unimplemented")
            && err.contains("Janus does not implement containerd's sandbox API")
            && err.contains("remove `sandboxer`"),
        "{err}"
    );
    assert!(c.list_pods().is_empty(), "{:?}", c.list_pods());
    // containerd shut the shim down and ran its `delete`: no shim is left.
    let ok = poll(secs(10), || c.shim_processes().is_empty().then_some(()));
    assert!(ok.is_some(), "shims left: {:?}", c.shim_processes());
}

/// One test module: each case run with CRI runtime handler `$h`.
macro_rules! suite {
    ($m:ident, $h:ident; $($name:ident),* $(,)?) => {
        mod $m {
            $( #[test] fn $name() { super::$name(super::cri::$h) } )*
        }
    };
}

/// The pod cases every handler runs, plus `$extra` for some.
macro_rules! cases {
    ($m:ident, $h:ident; $($extra:ident),* $(,)?) => {
        suite!(
            $m, $h;
            pod_lifecycle,
            container_exit_completed,
            container_exit_error,
            container_oom_killed,
            container_stop_remove,
            exec_sync,
            exec_stream,
            attach_stream,
            container_logs,
            pod_shared_net_ipc,
            pod_ip_from_host,
            readonly_rootfs,
            pause_one_of_two,
            port_forward_loopback,
            dual_stack_pod,
            net_admin_bridge,
            privileged_bridge
            $(, $extra)*
        );
    };
}

/// Everything, with the cases that look at host processes and cgroups.
macro_rules! host_cases {
    ($m:ident, $h:ident) => {
        cases!(
            $m, $h;
            pod_shared_pid_one_shim_pause_killed,
            run_as_user_group,
            capabilities_add_drop,
            privileged,
            seccomp_runtime_default,
            seccomp_unconfined,
            sysctls,
            host_network,
            host_pid,
            host_ipc,
            update_container_resources,
            many_pods,
            propagation_bidirectional,
            propagation_host_to_container,
        );
    };
}

// containerd's Go runc shim (proves the harness and the expectations), and our shim in
// namespace mode (`janus`).
host_cases!(runc, RUNC_HANDLER);
host_cases!(janus, JANUS_HANDLER);
// Our shim in VM mode (`janus-vm`): the containers are in the guest; plus the VM-only cases.
cases!(
    janus_vm, JANUS_VM_HANDLER;
    vm_pod_one_vm,
    vm_pod_sized_by_annotations,
    vm_pod_under_namespace_node_default,
    vm_refuses_host_network,
    vm_refuses_host_pid,
    vm_refuses_host_ipc,
    vm_refuses_bidirectional,
    vm_net_modules_on_demand,
    propagation_host_to_container,
    vm_pod_charged_to_pod_cgroup,
    systemd_cgroup_path,
    systemd_node_scopes,
);
// The systemd driver's cgroup paths (runc's Go shim here runs the cgroupfs driver).
suite!(janus_systemd, JANUS_HANDLER; systemd_cgroup_path, systemd_node_scopes);
