//! Fault matrix (issue 16): what the shim does when the things around it fail. Every case
//! waits on the condition it is about (with a deadline) and ends by checking that nothing of
//! the container is left: no shim, VMM or virtiofsd process, no mount, cgroup, socket or VM
//! directory.
//!
//! Covered elsewhere (tests/tests/ctr.rs, `janus_vm_faults`): the shim killed with SIGKILL
//! (`shim_sigkill_leaves_no_vm`), QEMU killed (`vmm_sigkill_exits_137`), a wedged agent
//! (`agent_not_answering_times_out`: DeadlineExceeded, then the VM recovers, and delete leaves
//! nothing), 20 VMs one after another (`twenty_vm_containers_leave_nothing`).
//!
//! Run: `cargo test -p janus-tests --test faults -- --nocapture`. Needs root, containerd, runc,
//! QEMU, virtiofsd and the guest image (hack/build-guest.sh). Every test's name starts with
//! `fault_matrix::`: hack/test.sh runs them once, against the system's containerd 1.6, and
//! skips them in its containerd 2.1 run.

mod fault_matrix {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use nix::sys::signal::Signal;

    use janus_tests::{
        poll, processes, unique_id, vm_pids, vm_share_socket, Background, Containerd, Options, Out,
        JANUS, JANUS_VM,
    };

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[track_caller]
    fn assert_code(ctd: &Containerd, o: &Out, code: i32) {
        assert_eq!(
            o.code(),
            code,
            "expected exit code {code}:\n{o}\n--- containerd log ---\n{}",
            ctd.log_tail(40)
        );
    }

    /// PID of the shim server of container `id` (`containerd-shim-janus... -id <id>`).
    fn shim_pid(id: &str) -> Option<u32> {
        let arg = format!("-id {id} ");
        processes()
            .into_iter()
            .find(|p| p.cmdline.contains("containerd-shim-janus") && p.cmdline.contains(&arg))
            .map(|p| p.pid)
    }

    /// The VM of a deleted container is gone: no QEMU or virtiofsd, no socket, share or work dir.
    #[track_caller]
    fn assert_vm_gone(ctd: &Containerd, sock: &str) {
        let work_dir = sock.trim_end_matches(".vfs.sock").to_string();
        let shared = format!("{work_dir}.shared");
        let mut left = Vec::new();
        let gone = poll(secs(10), || {
            left.clear();
            let (q, v) = vm_pids(sock);
            left.extend(q.iter().map(|p| format!("qemu {p}")));
            left.extend(v.iter().map(|p| format!("virtiofsd {p}")));
            for p in [sock, &shared, &work_dir] {
                if Path::new(p).exists() {
                    left.push(p.to_string());
                }
            }
            left.is_empty().then_some(())
        });
        assert!(
            gone.is_some(),
            "the VM left: {left:?}\n--- containerd log ---\n{}",
            ctd.log_tail(40)
        );
    }

    /// The event `topic` (`/tasks/exit`...) of the init process of container `id` from `events`
    /// (waits up to `timeout`): its line.
    fn wait_event(
        events: &mut Background,
        topic: &str,
        id: &str,
        timeout: Duration,
    ) -> Option<String> {
        let c = format!("\"container_id\":\"{id}\"");
        // TaskExit of init: `"id":"<container id>"` (an exec's has its exec id); TaskDelete has
        // no `id`.
        let init = format!("\"id\":\"{id}\"");
        events.wait_for_line(timeout, |l| {
            l.contains(topic) && l.contains(&c) && (topic != "/tasks/exit" || l.contains(&init))
        })
    }

    /// The TaskExit of container `id`'s init process.
    fn wait_exit_event(events: &mut Background, id: &str, timeout: Duration) -> Option<String> {
        wait_event(events, "/tasks/exit", id, timeout)
    }

    /// Delete a stopped task and its container, then check nothing is left. Returns `task rm`'s
    /// output.
    #[track_caller]
    fn delete_and_check(ctd: &Containerd, id: &str, sock: Option<&str>) -> Out {
        let o = ctd.ctr(&["task", "rm", id]);
        // ctr 1.x exits with the task's exit code after deleting it; a failure says "ctr: ...".
        assert!(
            !o.stderr.contains("ctr: ") || o.stderr.trim().is_empty(),
            "task rm failed:\n{o}\n{}",
            ctd.log_tail(40)
        );
        assert_eq!(ctd.task_status(id), None, "task still listed");
        ctd.ctr_ok(&["containers", "rm", id]);
        ctd.assert_no_leaks(id, secs(10));
        if let Some(sock) = sock {
            assert_vm_gone(ctd, sock);
        }
        o
    }

    // ---------------------------------------------------------------------------------------------
    // 1. containerd restarted while tasks run

    /// containerd stopped (SIGTERM) and started again on the same root, state and sockets while a
    /// task runs: the task survives (same shim, same pid, RUNNING), exec works through the
    /// reconnected shim, an exit after the restart reaches containerd (TaskExit with its code, ctr
    /// shows STOPPED), and delete leaves nothing.
    fn containerd_restart_keeps_tasks(rt: &str) {
        let mut ctd = Containerd::for_runtime(rt);
        let id = unique_id("restart");
        let script = "trap 'exit 7' USR1; echo up; while :; do sleep 0.1; done";
        ctd.run_detached(rt, &[], &id, &["sh", "-c", script]);
        let pid = ctd.task_pid(&id).expect("task pid");
        let shim = shim_pid(&id).expect("shim of the task");
        let sock = (rt == JANUS_VM).then(|| vm_share_socket(&id).expect("QEMU of the container"));

        let t = Instant::now();
        ctd.restart()
            .unwrap_or_else(|e| panic!("restarting containerd: {e:#}\n{}", ctd.log_tail(40)));
        eprintln!("{rt}: containerd restarted in {:?}", t.elapsed());

        assert_eq!(shim_pid(&id), Some(shim), "the shim did not survive");
        let tasks = ctd.tasks();
        let t = tasks.iter().find(|t| t.0 == id);
        assert_eq!(
            t.map(|t| (t.1, t.2.as_str())),
            Some((pid, "RUNNING")),
            "after the restart: {tasks:?}\n{}",
            ctd.log_tail(40)
        );
        let o = ctd.ctr(&["task", "exec", "--exec-id", "after", &id, "echo", "alive"]);
        assert_code(&ctd, &o, 0);
        assert_eq!(o.stdout, "alive\n", "{o}");
        let ps = ctd.ctr_ok(&["task", "ps", &id]);
        assert!(ps.contains(&pid.to_string()), "task ps:\n{ps}");

        // An exit after the restart reaches the new containerd.
        let mut events = ctd.events();
        ctd.ctr_ok(&["task", "kill", "-s", "SIGUSR1", &id]);
        let exit = wait_exit_event(&mut events, &id, secs(20));
        assert!(
            exit.as_deref()
                .is_some_and(|l| l.contains("\"exit_status\":7")),
            "TaskExit after the restart: {exit:?}; events:\n{}\n--- containerd log ---\n{}",
            events.lines().join("\n"),
            ctd.log_tail(40)
        );
        ctd.wait_status(&id, "STOPPED", secs(10));
        delete_and_check(&ctd, &id, sock.as_deref());
        // The exit code containerd recorded for the task (TaskDelete carries it).
        let deleted = wait_event(&mut events, "/tasks/delete", &id, secs(10));
        assert!(
            deleted
                .as_deref()
                .is_some_and(|l| l.contains("\"exit_status\":7")),
            "TaskDelete: {deleted:?}"
        );
    }

    #[test]
    fn containerd_restart_keeps_tasks_namespace() {
        containerd_restart_keeps_tasks(JANUS);
    }

    #[test]
    fn containerd_restart_keeps_tasks_vm() {
        containerd_restart_keeps_tasks(JANUS_VM);
    }

    // ---------------------------------------------------------------------------------------------
    // 2. containerd killed mid-create

    /// containerd killed with SIGKILL while a VM-mode `ctr run -d` boots its VM, then started
    /// again: the container is either there (its task deletable) or cleaned up; after deleting
    /// whatever is left, no shim, QEMU, virtiofsd, mount, cgroup or VM directory remains.
    #[test]
    fn containerd_killed_mid_create_vm() {
        let mut ctd = Containerd::for_runtime(JANUS_VM);
        let id = unique_id("midcreate");
        let mut run = ctd.ctr_background(&ctd.run_args(JANUS_VM, &["-d"], &id, &["sleep", "1000"]));
        // QEMU exists once the shim is in Create, booting.
        let sock = poll(secs(60), || vm_share_socket(&id)).unwrap_or_else(|| {
            panic!(
                "no QEMU for {id} within 60 s: {:?}\n{}",
                run.stderr_lines(),
                ctd.log_tail(40)
            )
        });
        let booted = ctd.task_status(&id);
        ctd.stop_daemon(Signal::SIGKILL)
            .expect("killing containerd");
        let o = run.wait(secs(30)).expect("ctr run after containerd died");
        eprintln!(
            "containerd_killed_mid_create_vm: killed with the task {booted:?}; ctr run: exit {}",
            o.code()
        );
        ctd.start_again()
            .unwrap_or_else(|e| panic!("restarting containerd: {e:#}\n{}", ctd.log_tail(40)));
        // Whatever containerd made of it: a task (whose shim answers: the create it was in the
        // middle of goes on to the end), or no task and no shim.
        let status = poll(secs(90), || match ctd.task_status(&id) {
            Some(s) => Some(Some(s)),
            None => shim_pid(&id).is_none().then_some(None),
        })
        .unwrap_or_else(|| {
            panic!(
                "90 s after the restart the shim runs on without a task containerd lists:\n{}",
                ctd.log_tail(40)
            )
        });
        eprintln!("containerd_killed_mid_create_vm: after the restart the task is {status:?}");
        assert_ne!(status.as_deref(), Some("UNKNOWN"), "{}", ctd.log_tail(40));
        if status.is_some() {
            let o = ctd.ctr_timeout(&["task", "rm", "-f", &id], secs(60));
            assert_code(&ctd, &o, 0);
        }
        assert_eq!(ctd.task_status(&id), None, "task still listed");
        let containers = ctd.ctr_ok(&["containers", "ls", "-q"]);
        if containers.lines().any(|l| l.trim() == id) {
            ctd.ctr_ok(&["containers", "rm", &id]);
        }
        ctd.assert_no_leaks(&id, secs(20));
        assert_vm_gone(&ctd, &sock);
    }

    // ---------------------------------------------------------------------------------------------
    // 3. virtiofsd killed

    /// virtiofsd of a running VM container killed: the container fails (TaskExit, STOPPED) within
    /// a deadline instead of running on without its root file system; delete leaves nothing.
    #[test]
    fn virtiofsd_killed_fails_the_task() {
        let ctd = Containerd::for_runtime(JANUS_VM);
        let c = ctd.container("vfskill");
        ctd.run_detached(JANUS_VM, &[], &c, &["sleep", "1000"]);
        let sock = vm_share_socket(&c.id).expect("QEMU of the container");
        let (_, vfs) = vm_pids(&sock);
        assert!(!vfs.is_empty(), "no virtiofsd for {}", c.id);
        let mut events = ctd.events();
        let t = Instant::now();
        for p in &vfs {
            // SAFETY: kill(2) on the virtiofsd processes found above.
            unsafe { libc::kill(*p as i32, libc::SIGKILL) };
        }
        let exit = wait_exit_event(&mut events, &c.id, secs(10));
        let took = t.elapsed();
        assert!(
            exit.is_some(),
            "no TaskExit within 10 s of virtiofsd's death; events:\n{}\n--- containerd log ---\n{}",
            events.lines().join("\n"),
            ctd.log_tail(40)
        );
        eprintln!("virtiofsd_killed_fails_the_task: TaskExit {took:?} after: {exit:?}");
        assert!(
            !exit.as_deref().unwrap().contains("\"exit_status\":0,")
                && exit.as_deref().unwrap().contains("exit_status"),
            "a failed VM must not look like a clean exit: {exit:?}"
        );
        ctd.wait_status(&c, "STOPPED", secs(5));
        delete_and_check(&ctd, &c.id, Some(&sock));
    }

    // ---------------------------------------------------------------------------------------------
    // 4. guest kernel panic

    /// A guest kernel panic (sysrq `c` from a privileged container) ends QEMU (`panic=-1`,
    /// `-no-reboot`): TaskExit within 2 s of the panic, and delete leaves nothing.
    #[test]
    fn guest_panic_exits_within_2s() {
        let ctd = Containerd::for_runtime(JANUS_VM);
        let c = ctd.container("panic");
        ctd.run_detached(JANUS_VM, &["--privileged"], &c, &["sleep", "1000"]);
        let sock = vm_share_socket(&c.id).expect("QEMU of the container");
        let o = ctd.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "probe",
            &c,
            "sh",
            "-c",
            "test -w /proc/sysrq-trigger && echo writable",
        ]);
        assert_eq!(o.stdout, "writable\n", "no writable sysrq-trigger: {o}");
        let mut events = ctd.events();
        // The exec never returns (the VM dies under it): run it in the background. The time is
        // measured from just before the exec is sent, an upper bound of the time since the panic.
        let t = Instant::now();
        let mut exec = ctd.ctr_background(&[
            "task",
            "exec",
            "--exec-id",
            "panic",
            &c,
            "sh",
            "-c",
            "echo c > /proc/sysrq-trigger",
        ]);
        let exit = wait_exit_event(&mut events, &c.id, secs(30));
        let took = t.elapsed();
        exec.kill();
        assert!(
            exit.is_some(),
            "no TaskExit within 30 s of the panic; events:\n{}\n--- containerd log ---\n{}",
            events.lines().join("\n"),
            ctd.log_tail(40)
        );
        eprintln!("guest_panic_exits_within_2s: TaskExit {took:?} after sysrq-c: {exit:?}");
        assert!(
            took < secs(2),
            "TaskExit took {took:?} after the panic (goal: 2 s)"
        );
        ctd.wait_status(&c, "STOPPED", secs(5));
        delete_and_check(&ctd, &c.id, Some(&sock));
    }

    // ---------------------------------------------------------------------------------------------
    // 6. the VM work directory full

    /// Everything under `dir` that the process `pid` sees mounted (its mount namespace's view).
    fn mounts_seen_by(pid: u32, needle: &str) -> Vec<String> {
        std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
            .unwrap_or_default()
            .lines()
            .filter(|l| janus_tests::contains_token(l, needle))
            .map(str::to_string)
            .collect()
    }

    /// Fill the file system at `dir`: its blocks (one big file) and its inodes (empty files).
    fn fill(dir: &Path) -> Vec<PathBuf> {
        let mut made = Vec::new();
        let big = dir.join("fill.big");
        if let Ok(mut f) = std::fs::File::create(&big) {
            made.push(big.clone());
            let chunk = vec![0u8; 64 << 10];
            while f.write_all(&chunk).is_ok() {}
        }
        for i in 0.. {
            let p = dir.join(format!("fill.{i}"));
            if std::fs::File::create(&p).is_err() {
                break;
            }
            made.push(p);
        }
        made
    }

    /// The shim's VM work directories (`/run/janus/vm`) on a full file system: containerd (and so
    /// its shims) runs in a mount namespace of its own where a 1 MiB tmpfs is mounted there and
    /// filled (blocks and inodes). Create fails with an error naming the cause, nothing of the
    /// half-made container is left; with space again, the next container runs.
    #[test]
    fn full_vm_work_dir_fails_create_cleanly() {
        let run_dir = Path::new("/run/janus/vm");
        std::fs::create_dir_all(run_dir).unwrap();
        let launcher: Vec<std::ffi::OsString> = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount -t tmpfs -o size=1m,nr_inodes=64,mode=0755 janus-full /run/janus/vm && exec \"$@\"",
        "sh",
    ]
    .iter()
    .map(|s| s.into())
    .collect();
        let opts = Options {
            launcher,
            ..Options::for_runtime(JANUS_VM)
        };
        let ctd = Containerd::start(opts)
            .unwrap_or_else(|e| panic!("starting containerd in a mount namespace: {e:#}"));
        let ctd_pid = ctd.pid().expect("containerd pid");
        // The instance's view of /run/janus/vm, from the host.
        let view = PathBuf::from(format!("/proc/{ctd_pid}/root/run/janus/vm"));
        assert!(
            mounts_seen_by(ctd_pid, "janus-full")
                .iter()
                .any(|l| l.contains(" /run/janus/vm ")),
            "no tmpfs at /run/janus/vm in containerd's mount namespace"
        );
        let filler = fill(&view);
        assert!(!filler.is_empty(), "could not fill {}", view.display());

        let c = ctd.container("full");
        let t = Instant::now();
        let o = ctd.run_rm(JANUS_VM, &c, &["true"]);
        eprintln!(
            "full_vm_work_dir_fails_create_cleanly: create failed after {:?}: {}",
            t.elapsed(),
            o.stderr.trim()
        );
        assert_ne!(o.code(), 0, "ran on a full file system: {o}");
        assert!(
            o.stderr.contains("No space left on device") && o.stderr.contains("/run/janus/vm"),
            "the error does not say what is full:\n{o}"
        );
        assert_eq!(ctd.task_status(&c), None, "a task was left");
        let _ = ctd.ctr(&["containers", "rm", &c]);
        ctd.assert_no_leaks(&c, secs(10));
        let inside = mounts_seen_by(ctd_pid, &c.id);
        assert!(
            inside.is_empty(),
            "mounts left in containerd's namespace: {inside:?}"
        );
        let left: Vec<String> = std::fs::read_dir(&view)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| !n.starts_with("fill."))
            .collect();
        assert!(left.is_empty(), "left in the VM dir: {left:?}");

        // Space again: the next container runs.
        for f in &filler {
            std::fs::remove_file(f).unwrap();
        }
        let c2 = ctd.container("notfull");
        let o = ctd.run_rm(JANUS_VM, &c2, &["echo", "ok"]);
        assert_code(&ctd, &o, 0);
        assert_eq!(o.stdout, "ok\n", "{o}");
        ctd.assert_no_leaks(&c2, secs(10));
        let inside = mounts_seen_by(ctd_pid, &c2.id);
        assert!(inside.is_empty(), "mounts left: {inside:?}");
    }

    // ---------------------------------------------------------------------------------------------
    // 7. 8 VMs booting at once

    /// 8 VM containers created at once on this 2-core machine (QEMU under TCG): all reach RUNNING,
    /// then all are deleted and nothing is left. Eight TCG boots side by side take about ten times
    /// as long as one (7-25 s instead of 2-4 s here); the boot timeout is set to 5 s, which one
    /// boot fits in many times over but the herd's wall time does not: it passes only because
    /// the time a VMM waits for a CPU does not count against it (`vm.boot_timeout_ms`).
    #[test]
    fn eight_vms_at_once() {
        const N: usize = 8;
        let ctd = Containerd::for_runtime(JANUS);
        let cfg = ctd.write_janus_config("mode = \"vm\"\n[vm]\nboot_timeout_ms = 5000\n");
        let cfg = cfg.to_str().unwrap().to_string();
        let ids: Vec<_> = (0..N).map(|i| ctd.container(&format!("herd{i}"))).collect();
        let t = Instant::now();
        let mut runs: Vec<Background> = ids
            .iter()
            .map(|c| {
                let args = ctd.run_args(
                    JANUS,
                    &["-d", "--runtime-config-path", &cfg],
                    c,
                    &["sleep", "1000"],
                );
                ctd.ctr_background(&args)
            })
            .collect();
        // `ctr run -d` returns once its task started: when each returns is its boot time.
        let mut took: Vec<Option<Duration>> = vec![None; N];
        let deadline = Instant::now() + secs(240);
        while took.iter().any(Option::is_none) && Instant::now() < deadline {
            for (i, r) in runs.iter_mut().enumerate() {
                if took[i].is_none() && r.try_status().is_some() {
                    took[i] = Some(t.elapsed());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let ready: Vec<String> = std::fs::read_to_string(ctd.log_path())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("vm agent: ready after"))
            .filter_map(|l| Some(l.split("msg=\"").nth(1)?.trim_end_matches('"').to_string()))
            .collect();
        eprintln!(
            "eight_vms_at_once: ctr run -d returned after {:?}; boots:\n  {}",
            took,
            ready.join("\n  ")
        );
        for r in runs.iter_mut() {
            let o = r
                .wait(secs(1))
                .expect("ctr run -d still running after 240 s");
            assert_code(&ctd, &o, 0);
        }
        for c in &ids {
            assert_eq!(ctd.task_status(c).as_deref(), Some("RUNNING"), "{}", c.id);
        }
        let socks: Vec<String> = ids
            .iter()
            .map(|c| vm_share_socket(&c.id).expect("QEMU of the container"))
            .collect();
        for c in &ids {
            ctd.ctr_ok(&["task", "kill", "-s", "SIGKILL", c]);
        }
        for (c, sock) in ids.iter().zip(&socks) {
            ctd.wait_status(c, "STOPPED", secs(30));
            delete_and_check(&ctd, &c.id, Some(sock));
        }
    }

    // ---------------------------------------------------------------------------------------------
    // 8. malformed ttrpc frames at the shim's socket

    /// Resident (`VmRSS`) or mapped (`VmSize`) memory of `pid` in KiB.
    fn mem_kib(pid: u32, what: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(what)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("{what} of the shim"))
    }

    /// Connect to `sock`, write `bytes`, then read until the shim closes or 300 ms pass (a
    /// shim waiting for the rest of a frame keeps the connection).
    fn send_raw(sock: &Path, bytes: &[u8], close_write: bool) {
        let mut s = UnixStream::connect(sock).expect("connecting to the shim's socket");
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let _ = s.write_all(bytes);
        if close_write {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
    }

    /// ttrpc frame header: length (BE u32), stream id (BE u32), type, flags.
    fn header(len: u32, stream: u32, kind: u8, flags: u8) -> Vec<u8> {
        let mut h = len.to_be_bytes().to_vec();
        h.extend_from_slice(&stream.to_be_bytes());
        h.push(kind);
        h.push(flags);
        h
    }

    /// Garbage, truncated headers, a huge declared length and random bytes, each on a fresh
    /// connection to the shim's ttrpc socket: the shim keeps serving (exec and ps work, the task
    /// runs on) and its memory does not grow with the declared length.
    #[test]
    fn malformed_ttrpc_frames() {
        let ctd = Containerd::for_runtime(JANUS);
        let c = ctd.container("ttrpc");
        ctd.run_detached(JANUS, &[], &c, &["sleep", "1000"]);
        let sock = ctd.shim_socket(&c.id);
        assert!(sock.exists(), "no shim socket at {}", sock.display());
        let shim = shim_pid(&c.id).expect("shim of the container");
        let pid = ctd.task_pid(&c).expect("task pid");
        let rss_before = mem_kib(shim, "VmRSS");
        let size_before = mem_kib(shim, "VmSize");

        let mut rng: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
        let mut random = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng as u8
                })
                .collect()
        };
        let mut cases: Vec<(&str, Vec<u8>, bool)> = vec![
            (
                "text",
                b"GET / HTTP/1.1\r\nHost: shim\r\n\r\n".to_vec(),
                false,
            ),
            ("truncated header", vec![0, 0, 0], true),
            ("header only, no body", header(64, 1, 1, 0), true),
            // 4 GiB - 1 declared, a few bytes sent: must be refused, not allocated.
            (
                "huge length",
                {
                    let mut v = header(u32::MAX, 1, 1, 0);
                    v.extend_from_slice(&[0xAA; 32]);
                    v
                },
                false,
            ),
            (
                "huge length, held open",
                header(0x7fff_ffff, 3, 1, 0),
                false,
            ),
            (
                "unknown type",
                {
                    let mut v = header(4, 1, 0x7f, 0);
                    v.extend_from_slice(&[1, 2, 3, 4]);
                    v
                },
                false,
            ),
            (
                "request with garbage protobuf",
                {
                    let mut v = header(16, 1, 1, 0);
                    v.extend_from_slice(&[0xff; 16]);
                    v
                },
                false,
            ),
            (
                "even stream id",
                {
                    let mut v = header(2, 2, 1, 0);
                    v.extend_from_slice(&[0x0a, 0x00]);
                    v
                },
                false,
            ),
        ];
        for i in 0..8 {
            let n = 1 + (i * 997) % 4096;
            cases.push(("random bytes", random(n), i % 2 == 0));
        }
        for (what, bytes, close) in &cases {
            send_raw(&sock, bytes, *close);
            assert!(
                shim_pid(&c.id) == Some(shim),
                "the shim died after {what}\n{}",
                ctd.log_tail(40)
            );
        }
        // Many huge declared lengths at once, connections held open while the shim reads them.
        let held: Vec<UnixStream> = (0..32)
            .map(|i| {
                let mut s = UnixStream::connect(&sock).expect("connect");
                let _ = s.write_all(&header(0xffff_0000 - i, 1, 1, 0));
                let _ = s.write_all(&[0u8; 1024]);
                s
            })
            .collect();
        let o = ctd.ctr(&["task", "exec", "--exec-id", "after", &c, "echo", "still"]);
        assert_code(&ctd, &o, 0);
        assert_eq!(o.stdout, "still\n", "{o}");
        let ps = ctd.ctr_ok(&["task", "ps", &c]);
        assert!(ps.contains(&pid.to_string()), "task ps:\n{ps}");
        let rss_after = mem_kib(shim, "VmRSS");
        let size_after = mem_kib(shim, "VmSize");
        drop(held);
        eprintln!(
            "malformed_ttrpc_frames: shim RSS {rss_before} -> {rss_after} KiB, \
             VmSize {size_before} -> {size_after} KiB"
        );
        assert!(
            rss_after < rss_before + 16 * 1024,
            "shim RSS grew from {rss_before} KiB to {rss_after} KiB"
        );
        // A buffer of the declared length, even untouched, would show here (32 x ~4 GiB).
        assert!(
            size_after < size_before + 1024 * 1024,
            "shim VmSize grew from {size_before} KiB to {size_after} KiB"
        );
        assert_eq!(ctd.task_status(&c).as_deref(), Some("RUNNING"));
        assert_eq!(ctd.task_pid(&c), Some(pid));
        ctd.ctr_ok(&["task", "kill", "-s", "SIGKILL", &c]);
        ctd.wait_status(&c, "STOPPED", secs(20));
        delete_and_check(&ctd, &c.id, None);
    }
}
