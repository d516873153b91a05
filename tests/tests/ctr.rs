//! `ctr` against a private containerd, once per runtime: `runc::*` (containerd's Go runc shim,
//! proves the harness) and `janus::*` (our shim). `janus_only::*` covers Janus-specific options.
//!
//! Run: `cargo test -p janus-tests` (all), `cargo test -p janus-tests -- runc` (harness check),
//! `cargo test -p janus-tests -- janus` (our shim). Needs root, containerd, runc, busybox-static.

use std::time::Duration;

use janus_tests::{cgroup_dir, cgroup_v2_only, Containerd, JANUS, JANUS_VM, RUNC};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Assert `ctr` exited with `code`, printing everything otherwise.
#[track_caller]
fn assert_code(ctd: &Containerd, o: &janus_tests::Out, code: i32) {
    assert_eq!(
        o.code(),
        code,
        "expected exit code {code}:\n{o}\n--- containerd log ---\n{}",
        ctd.log_tail(30)
    );
}

// ---------------------------------------------------------------------------------------------
// ctr run --rm: output and exit codes

fn run_echo(rt: &str) {
    let ctd = Containerd::for_runtime(rt);
    let c = ctd.container("echo");
    let o = ctd.run_rm(rt, &c, &["echo", "hi"]);
    assert_code(&ctd, &o, 0);
    assert_eq!(o.stdout, "hi\n", "{o}");
    ctd.assert_no_leaks(&c, secs(10));
}

fn run_exit_0(rt: &str) {
    let ctd = Containerd::for_runtime(rt);
    let c = ctd.container("exit0");
    let o = ctd.run_rm(rt, &c, &["true"]);
    assert_code(&ctd, &o, 0);
}

fn run_exit_1(rt: &str) {
    let ctd = Containerd::for_runtime(rt);
    let c = ctd.container("exit1");
    let o = ctd.run_rm(rt, &c, &["false"]);
    assert_code(&ctd, &o, 1);
}

fn run_exit_3(rt: &str) {
    let ctd = Containerd::for_runtime(rt);
    let c = ctd.container("exit3");
    let o = ctd.run_rm(rt, &c, &["sh", "-c", "exit 3"]);
    assert_code(&ctd, &o, 3);
}

/// A process that kills itself with SIGKILL. It can't be the container's init: the kernel
/// drops signals without a handler, SIGKILL included, that init gets from inside its own PID
/// namespace (`sh -c 'kill -9 $$'` as PID 1 just exits 0). So a child shell kills itself and
/// init returns the child's status (137). Death of init itself by SIGKILL is covered by
/// `kill_sigkill` and `oom`.
fn run_exit_137(rt: &str) {
    let ctd = Containerd::for_runtime(rt);
    let c = ctd.container("exit137");
    let o = ctd.run_rm(rt, &c, &["sh", "-c", "sh -c 'kill -9 $$'; exit $?"]);
    assert_code(&ctd, &o, 137);
}

// ---------------------------------------------------------------------------------------------
// stdio

fn stdin_pipe(rt: &str) {
    let ctd = Containerd::for_runtime(rt);
    let c = ctd.container("stdin");
    // ctr 1.6 has no -i on `run`: stdin is always forwarded (EOF via CloseIO).
    let o = ctd.ctr_stdin(&ctd.run_args(rt, &["--rm"], &c, &["cat"]), b"hello\n", &c);
    assert_code(&ctd, &o, 0);
    assert_eq!(o.stdout, "hello\n", "{o}");
}

fn tty(rt: &str) {
    let ctd = Containerd::for_runtime(rt);
    let c = ctd.container("tty");
    let o = ctd.ctr_tty(&ctd.run_args(rt, &["--rm", "-t"], &c, &["sh", "-c", "tty; echo ok"]));
    assert_code(&ctd, &o, 0);
    assert_tty_output(&o);
}

/// Output of `sh -c 'tty; echo ok'` read from a terminal: lines end in CR LF (ONLCR).
#[track_caller]
fn assert_tty_output(o: &janus_tests::Out) {
    let lines: Vec<&str> = o
        .stdout
        .split('\n')
        .map(|l| l.trim_matches(|c| c == '\r' || c == '\0'))
        .collect();
    assert!(
        lines.iter().any(|l| l.starts_with("/dev/pts/")),
        "no /dev/pts/N from tty:\n{o}"
    );
    assert!(lines.contains(&"ok"), "no ok line:\n{o}");
    assert!(
        o.stdout.contains("\r\n"),
        "no CR LF: not a terminal?\n{o:?}"
    );
}

fn log_uri_file(rt: &str) {
    let ctd = Containerd::for_runtime(rt);
    let c = ctd.container("loguri");
    let log = ctd.dir.join(format!("{}.log", c.id));
    let uri = format!("file://{}", log.display());
    let args = ctd.run_args(
        rt,
        &["-d", "--log-uri", &uri],
        &c,
        &["sh", "-c", "echo to-stdout; echo to-stderr >&2"],
    );
    ctd.ctr_ok(&args);
    ctd.wait_status(&c, "STOPPED", secs(20));
    // The copy into the file may finish a little after the exit is reported.
    let mut text = String::new();
    janus_tests::poll(secs(10), || {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        (text.contains("to-stdout") && text.contains("to-stderr")).then_some(())
    });
    // containerd 1.6's runc shim copies both streams into the one file and sometimes loses
    // stderr ("error copying stderr" in its log: its stdout copy closes the shared file
    // first). That is the reference runtime's bug, not the harness's: say so and go on.
    if rt == RUNC
        && text.contains("to-stdout")
        && !text.contains("to-stderr")
        && ctd.log_tail(200).contains("error copying stderr")
    {
        eprintln!("runc::log_uri_file: the runc shim lost stderr (its known file-copy race)");
        return;
    }
    assert!(
        text.contains("to-stdout") && text.contains("to-stderr"),
        "log file {} has {text:?}",
        log.display()
    );
}

// ---------------------------------------------------------------------------------------------
// exec

fn exec(rt: &str) {
    let ctd = Containerd::for_runtime(rt);
    let c = ctd.container("exec");
    ctd.run_detached(rt, &[], &c, &["sleep", "1000"]);
    let o = ctd.ctr(&["task", "exec", "--exec-id", "e1", &c, "echo", "hi"]);
    assert_code(&ctd, &o, 0);
    assert_eq!(o.stdout, "hi\n", "{o}");
    // The exec id is free again once the exec is done.
    let o = ctd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        &c,
        "sh",
        "-c",
        "echo again",
    ]);
    assert_code(&ctd, &o, 0);
    assert_eq!(o.stdout, "again\n", "{o}");
}

fn exec_tty(rt: &str) {
    let ctd = Containerd::for_runtime(rt);
    let c = ctd.container("exectty");
    ctd.run_detached(rt, &[], &c, &["sleep", "1000"]);
    let o = ctd.ctr_tty(&[
        "task",
        "exec",
        "-t",
        "--exec-id",
        "t1",
        &c,
        "sh",
        "-c",
        "tty; echo ok",
    ]);
    assert_code(&ctd, &o, 0);
    assert_tty_output(&o);
}

fn exec_exit_code(rt: &str) {
    let ctd = Containerd::for_runtime(rt);
    let c = ctd.container("execexit");
    ctd.run_detached(rt, &[], &c, &["sleep", "1000"]);
    let o = ctd.ctr(&["task", "exec", "--exec-id", "x7", &c, "sh", "-c", "exit 7"]);
    assert_code(&ctd, &o, 7);
    // Container still fine.
    assert_eq!(ctd.task_status(&c).as_deref(), Some("RUNNING"));
}

// ---------------------------------------------------------------------------------------------
// signals

fn kill_signals(rt: &str) {
    let ctd = Containerd::for_runtime(rt);
    let c = ctd.container("kill");
    let script = "trap 'echo got USR1' USR1; trap 'echo got TERM; exit 0' TERM; \
                  echo ready; while :; do sleep 0.1; done";
    let mut run = ctd.ctr_background(&ctd.run_args(rt, &["--rm"], &c, &["sh", "-c", script]));
    assert!(
        run.wait_for_line(secs(30), |l| l == "ready").is_some(),
        "container never printed ready: {:?} {:?}\n{}",
        run.lines(),
        run.stderr_lines(),
        ctd.log_tail(30)
    );
    ctd.ctr_ok(&["task", "kill", "-s", "SIGUSR1", &c]);
    assert!(
        run.wait_for_line(secs(10), |l| l == "got USR1").is_some(),
        "SIGUSR1 not seen by the container: {:?}",
        run.lines()
    );
    // Default signal of `ctr task kill` is SIGTERM.
    ctd.ctr_ok(&["task", "kill", &c]);
    let o = run.wait(secs(30)).unwrap();
    assert_code(&ctd, &o, 0);
    assert!(o.stdout.contains("got TERM"), "SIGTERM not seen:\n{o}");
}

fn kill_sigkill(rt: &str) {
    let ctd = Containerd::for_runtime(rt);
    let c = ctd.container("sigkill");
    let mut run = ctd.ctr_background(&ctd.run_args(rt, &["--rm"], &c, &["sleep", "1000"]));
    ctd.wait_status(&c, "RUNNING", secs(30));
    ctd.ctr_ok(&["task", "kill", "-s", "SIGKILL", &c]);
    let o = run.wait(secs(30)).unwrap();
    assert_code(&ctd, &o, 137);
    ctd.assert_no_leaks(&c, secs(10));
}

// ---------------------------------------------------------------------------------------------
// task state, pause/resume, metrics, update

fn detached_ls_ps(rt: &str) {
    let ctd = Containerd::for_runtime(rt);
    let c = ctd.container("detached");
    ctd.run_detached(rt, &[], &c, &["sleep", "1000"]);
    let tasks = ctd.tasks();
    let t = tasks
        .iter()
        .find(|t| t.0 == c.id)
        .unwrap_or_else(|| panic!("{} not in task ls: {tasks:?}", c.id));
    assert_eq!(t.2, "RUNNING", "{tasks:?}");
    assert!(t.1 > 0, "task pid: {tasks:?}");
    // The pid is a real host process running sleep (in VM mode: a guest pid).
    if rt != JANUS_VM {
        let cmd = std::fs::read(format!("/proc/{}/cmdline", t.1)).unwrap_or_default();
        assert!(
            String::from_utf8_lossy(&cmd).contains("sleep"),
            "pid {} is not sleep: {:?}",
            t.1,
            String::from_utf8_lossy(&cmd)
        );
    }
    let ps = ctd.ctr_ok(&["task", "ps", &c]);
    let pids: Vec<u32> = ps
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(pids.contains(&t.1), "task ps does not list {}:\n{ps}", t.1);
}

fn pause_resume(rt: &str) {
    let ctd = Containerd::for_runtime(rt);
    let c = ctd.container("pause");
    ctd.run_detached(rt, &[], &c, &["sleep", "1000"]);
    ctd.ctr_ok(&["task", "pause", &c]);
    ctd.wait_status(&c, "PAUSED", secs(10));
    ctd.ctr_ok(&["task", "resume", &c]);
    ctd.wait_status(&c, "RUNNING", secs(10));
    let o = ctd.ctr(&["task", "exec", "--exec-id", "after", &c, "echo", "alive"]);
    assert_code(&ctd, &o, 0);
    assert_eq!(o.stdout, "alive\n", "{o}");
}

fn metrics(rt: &str) {
    let ctd = Containerd::for_runtime(rt);
    let c = ctd.container("metrics");
    // Burn a little CPU and memory first so both counters are clearly non-zero.
    ctd.run_detached(
        rt,
        &[],
        &c,
        &[
            "sh",
            "-c",
            "x=$(head -c 2000000 /dev/zero | tr '\\0' a); sleep 1000",
        ],
    );
    // Until memory use and CPU time are counted (both read from the task's cgroup; a
    // missing counter never passes).
    let t = std::time::Instant::now();
    let table = loop {
        let table = ctd.ctr_ok(&["task", "metrics", &c]);
        let json = ctd.ctr_ok(&["task", "metrics", "--format", "json", &c]);
        let v: serde_json::Value =
            serde_json::from_str(&json).unwrap_or_else(|e| panic!("metrics json: {e}:\n{json}"));
        let num = |p: &str| v.pointer(p).and_then(|x| x.as_u64());
        // cgroup v1 (containerd v1.Metrics) or v2 (v2.Metrics) layouts.
        let mem = num("/memory/usage/usage").or_else(|| num("/memory/usage"));
        let cpu = num("/cpu/usage/total").or_else(|| num("/cpu/usage_usec"));
        if mem.is_some_and(|m| m > 0) && cpu.is_some_and(|c| c > 0) {
            break table;
        }
        assert!(
            t.elapsed() < secs(20),
            "metrics never showed memory use and CPU time:\n{json}\n{table}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        table.contains("memory") && (table.contains("cpuacct.usage") || table.contains("cpu.")),
        "table output:\n{table}"
    );
}

fn update_memory(rt: &str) {
    let ctd = Containerd::for_runtime(rt);
    let c = ctd.container("update");
    ctd.run_detached(rt, &[], &c, &["sleep", "1000"]);
    let pid = ctd.task_pid(&c).expect("task pid");
    let limit: u64 = 64 << 20;
    // ctr 1.6 has no `task update`: Tasks.Update over containerd's gRPC API.
    ctd.update_task(&c, &serde_json::json!({ "memory": { "limit": limit } }))
        .unwrap_or_else(|e| panic!("{e:#}\n--- containerd log ---\n{}", ctd.log_tail(30)));
    let file = if cgroup_v2_only() {
        cgroup_dir(pid, "").unwrap().join("memory.max")
    } else {
        cgroup_dir(pid, "memory")
            .unwrap()
            .join("memory.limit_in_bytes")
    };
    let got = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
    assert_eq!(got.trim(), limit.to_string(), "{}", file.display());
}

fn oom(rt: &str) {
    let ctd = Containerd::for_runtime(rt);
    let c = ctd.container("oom");
    let mut events = ctd.events();
    // The shell itself holds the 100 MB it reads: it is the one the OOM killer picks.
    let o = ctd.ctr(&ctd.run_args(
        rt,
        &["--rm", "--memory-limit", "33554432"],
        &c,
        &[
            "sh",
            "-c",
            "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo survived",
        ],
    ));
    assert!(!o.stdout.contains("survived"), "not OOM-killed:\n{o}");
    assert_code(&ctd, &o, 137);
    let want = format!("\"container_id\":\"{}\"", c.id);
    let line = events.wait_for_line(secs(10), |l| l.contains("/tasks/oom") && l.contains(&want));
    assert!(
        line.is_some(),
        "no /tasks/oom event for {}; events:\n{}",
        c.id,
        events.lines().join("\n")
    );
    let exit = events.wait_for_line(secs(10), |l| l.contains("/tasks/exit") && l.contains(&want));
    assert!(
        exit.as_deref()
            .is_some_and(|l| l.contains("\"exit_status\":137")),
        "exit event {exit:?}; events:\n{}",
        events.lines().join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// cleanup

fn no_leaks_after_delete(rt: &str) {
    let ctd = Containerd::for_runtime(rt);
    let c = ctd.container("leak");
    ctd.run_detached(rt, &[], &c, &["sh", "-c", "sleep 1000 & sleep 1000"]);
    let bundle = ctd.bundle_dir(&c);
    assert!(bundle.is_dir(), "no bundle dir {}", bundle.display());
    // While it runs the checks must see it (proves they look in the right places).
    let live = ctd.leaks(&c);
    let shim = live.iter().any(|l| l.starts_with("shim process"));
    let procs = live.iter().filter(|l| l.starts_with("process")).count();
    let cg = live.iter().any(|l| l.starts_with("cgroup"));
    let mounts = live.iter().any(|l| l.starts_with("mount"));
    assert!(
        shim && procs >= 2 && cg && mounts,
        "leak detector misses the live container (shim {shim}, processes {procs}, cgroup {cg}, \
         mounts {mounts}):\n{}",
        live.join("\n")
    );
    ctd.ctr_ok(&["task", "kill", "-s", "SIGKILL", &c]);
    ctd.wait_status(&c, "STOPPED", secs(20));
    ctd.ctr_ok(&["task", "rm", &c]);
    ctd.ctr_ok(&["containers", "rm", &c]);
    ctd.assert_no_leaks(&c, secs(10));
}

/// `ctr task rm -f` of a running task: ctr's WithProcessKill = Wait, Kill(SIGKILL, all), wait
/// for the exit, then Delete.
fn force_delete_running(rt: &str) {
    let ctd = Containerd::for_runtime(rt);
    let c = ctd.container("rmfrun");
    ctd.run_detached(rt, &[], &c, &["sleep", "1000"]);
    let o = ctd.ctr_timeout(&["task", "rm", "-f", &c], secs(20));
    assert_code(&ctd, &o, 0);
    assert_eq!(ctd.task_status(&c), None, "task still listed");
    ctd.ctr_ok(&["containers", "rm", &c]);
    ctd.assert_no_leaks(&c, secs(10));
}

/// `ctr task rm -f` of a task that already exited: Wait must return at once and Kill must
/// report NotFound/FailedPrecondition (or succeed) instead of hanging.
fn force_delete_stopped(rt: &str) {
    let ctd = Containerd::for_runtime(rt);
    let c = ctd.container("rmfstop");
    let args = ctd.run_args(rt, &["-d"], &c, &["true"]);
    ctd.ctr_ok(&args);
    ctd.wait_status(&c, "STOPPED", secs(20));
    let o = ctd.ctr_timeout(&["task", "rm", "-f", &c], secs(20));
    assert_code(&ctd, &o, 0);
    assert_eq!(ctd.task_status(&c), None, "task still listed");
    ctd.ctr_ok(&["containers", "rm", &c]);
    ctd.assert_no_leaks(&c, secs(10));
}

// ---------------------------------------------------------------------------------------------

/// One test module: each case run against `$rt`.
macro_rules! suite {
    ($m:ident, $rt:ident; $($name:ident),* $(,)?) => {
        mod $m {
            $( #[test] fn $name() { super::$name(super::$rt) } )*
        }
    };
}

/// The cases every runtime and mode runs, plus `$extra` for some.
macro_rules! cases {
    ($m:ident, $rt:ident; $($extra:ident),* $(,)?) => {
        suite!(
            $m, $rt;
            run_echo,
            run_exit_0,
            run_exit_1,
            run_exit_3,
            run_exit_137,
            stdin_pipe,
            tty,
            log_uri_file,
            exec,
            exec_tty,
            exec_exit_code,
            kill_signals,
            kill_sigkill,
            detached_ls_ps,
            pause_resume,
            metrics,
            oom,
            force_delete_running,
            force_delete_stopped
            $(, $extra)*
        );
    };
}

// containerd's Go runc shim (proves the harness) and our shim in namespace mode: these also
// look at the host's cgroups.
cases!(runc, RUNC; update_memory, no_leaks_after_delete);
cases!(janus, JANUS; update_memory, no_leaks_after_delete);
// VM mode (`io.containerd.janus-vm.v2`: a plain ctr container gets a QEMU VM of its own with
// our kernel and agent); `janus_vm_only` covers cgroups and leaks for VMs.
cases!(janus_vm, JANUS_VM;);

mod janus_vm_only {
    use super::*;

    /// `janus vm list` shows a running VM under the container's name with its console log;
    /// `janus vm console NAME --tail N` prints that log's last lines (what the guest printed).
    #[test]
    fn janus_vm_list_and_console() {
        let ctd = Containerd::for_runtime(JANUS_VM);
        let c = ctd.container("vmlist");
        ctd.run_detached(JANUS_VM, &[], &c, &["sleep", "1000"]);
        ctd.wait_status(&c, "RUNNING", secs(60));
        let janus = janus_tests::shim_binary().unwrap().with_file_name("janus");
        let run = |args: &[&str]| {
            let o = std::process::Command::new(&janus)
                .args(args)
                .output()
                .unwrap();
            assert!(o.status.success(), "janus {args:?}: {o:?}");
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        let list = run(&["vm", "list"]);
        let line = list
            .lines()
            .find(|l| l.starts_with(&format!("{}  running (VMM pid ", c.id())))
            .unwrap_or_else(|| panic!("{} not listed as running:\n{list}", c.id()));
        let log = line.rsplit("console: ").next().unwrap();
        let text = std::fs::read_to_string(log).unwrap();
        let want: Vec<&str> = text.lines().collect();
        assert!(!want.is_empty(), "{log} is empty");
        let n = want.len().min(5);
        let got = run(&["vm", "console", c.id(), "--tail", &n.to_string()]);
        assert_eq!(
            got.lines().collect::<Vec<_>>(),
            want[want.len() - n..],
            "{log}"
        );
        ctd.force_remove(&c);
        let after = run(&["vm", "list"]);
        assert!(!after.contains(&format!("{}  running", c.id())), "{after}");
    }

    /// The container runs on the guest kernel, not the host's.
    #[test]
    fn uname_is_the_guest_kernel() {
        let ctd = Containerd::for_runtime(JANUS_VM);
        let c = ctd.container("uname");
        let o = ctd.run_rm(JANUS_VM, &c, &["uname", "-r"]);
        assert_code(&ctd, &o, 0);
        let guest = std::fs::read_to_string(janus_tests::guest_dir().join("kernel.release"))
            .expect("kernel.release of the guest image (hack/build-guest.sh)");
        let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        assert_eq!(o.stdout.trim(), guest.trim(), "{o}");
        assert_ne!(o.stdout.trim(), host.trim());
        ctd.assert_no_leaks(&c, secs(10));
    }

    /// The VM runtime name is a promise of isolation: a node default config saying
    /// `mode = "namespace"` (what deploy/ installs) does not turn it into namespace mode.
    #[test]
    fn alias_stays_in_a_vm_under_a_namespace_node_default() {
        let _node = janus_tests::NodeConfig::install("mode = \"namespace\"\n");
        let ctd = Containerd::for_runtime(JANUS_VM);
        let c = ctd.container("nodedefault");
        let o = ctd.run_rm(JANUS_VM, &c, &["uname", "-r"]);
        assert_code(&ctd, &o, 0);
        let guest = std::fs::read_to_string(janus_tests::guest_dir().join("kernel.release"))
            .expect("kernel.release of the guest image (hack/build-guest.sh)");
        assert_eq!(o.stdout.trim(), guest.trim(), "{o}");
        // The same node default still means namespace mode for the plain runtime name.
        let n = ctd.container("nodedefault-ns");
        let o = ctd.run_rm(JANUS, &n, &["uname", "-r"]);
        assert_code(&ctd, &o, 0);
        let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        assert_eq!(o.stdout.trim(), host.trim(), "{o}");
        ctd.assert_no_leaks(&c, secs(10));
        ctd.assert_no_leaks(&n, secs(10));
    }

    /// A config file given to the VM runtime that says namespace mode is refused, not obeyed.
    #[test]
    fn alias_refuses_an_explicit_namespace_config() {
        let ctd = Containerd::for_runtime(JANUS_VM);
        ctd.write_janus_config("mode = \"namespace\"\n");
        let c = ctd.container("conflict");
        let o = ctd.run_rm_with_config(JANUS_VM, &c, &["true"]);
        assert_ne!(o.code(), 0, "{o}");
        assert!(
            janus_tests::ctr_error_has_code(&o.stderr, "invalid argument")
                && o.stderr.contains("runs pods in VMs"),
            "{o}"
        );
        let _ = ctd.ctr(&["containers", "rm", &c]);
        ctd.assert_no_leaks(&c, secs(10));
    }

    /// A VM cannot share the host's namespaces: `ctr run --net-host` is refused, by name.
    #[test]
    fn host_network_is_refused() {
        let ctd = Containerd::for_runtime(JANUS_VM);
        let c = ctd.container("nethost");
        let o = ctd.ctr(&ctd.run_args(JANUS_VM, &["--rm", "--net-host"], &c, &["true"]));
        assert_ne!(o.code(), 0, "{o}");
        assert!(
            janus_tests::ctr_error_has_code(&o.stderr, "invalid argument")
                && o.stderr.contains("network (hostNetwork)"),
            "{o}"
        );
        assert!(o.stderr.contains("RuntimeClass janus"), "{o}");
        let _ = ctd.ctr(&["containers", "rm", &c]);
        ctd.assert_no_leaks(&c, secs(10));
    }

    /// Tasks.Update reaches the guest cgroup: the v2 metrics report the new memory limit.
    #[test]
    fn update_memory_in_guest() {
        let ctd = Containerd::for_runtime(JANUS_VM);
        let c = ctd.container("vmupdate");
        ctd.run_detached(JANUS_VM, &[], &c, &["sleep", "1000"]);
        let limit: u64 = 64 << 20;
        ctd.update_task(&c, &serde_json::json!({ "memory": { "limit": limit } }))
            .unwrap_or_else(|e| panic!("{e:#}\n--- containerd log ---\n{}", ctd.log_tail(30)));
        let json = ctd.ctr_ok(&["task", "metrics", "--format", "json", &c]);
        let v: serde_json::Value =
            serde_json::from_str(&json).unwrap_or_else(|e| panic!("metrics json: {e}:\n{json}"));
        assert_eq!(
            v.pointer("/memory/usage_limit").and_then(|x| x.as_u64()),
            Some(limit),
            "{json}"
        );
        ctd.ctr_ok(&["task", "kill", "-s", "SIGKILL", &c]);
        ctd.wait_status(&c, "STOPPED", secs(20));
        ctd.ctr_ok(&["task", "rm", &c]);
    }

    /// After delete: no qemu or virtiofsd of the container, no mounts, no VM work dir.
    #[test]
    fn no_vm_leaks_after_delete() {
        let ctd = Containerd::for_runtime(JANUS_VM);
        let c = ctd.container("vmleak");
        ctd.run_detached(JANUS_VM, &[], &c, &["sleep", "1000"]);
        // QEMU is named after the container and names virtiofsd's socket.
        let sock = janus_tests::vm_share_socket(&c.id).expect("QEMU of the container");
        let shared = sock.replace(".vfs.sock", ".shared");
        assert!(std::path::Path::new(&shared).is_dir(), "no share {shared}");
        let vm_procs = || {
            let (q, v) = janus_tests::vm_pids(&sock);
            (q.len(), v.len())
        };
        let (q, v) = vm_procs();
        assert!(q == 1 && v >= 1, "qemu {q}, virtiofsd {v} for {}", c.id);
        ctd.ctr_ok(&["task", "kill", "-s", "SIGKILL", &c]);
        ctd.wait_status(&c, "STOPPED", secs(20));
        ctd.ctr_ok(&["task", "rm", &c]);
        ctd.ctr_ok(&["containers", "rm", &c]);
        ctd.assert_no_leaks(&c, secs(10));
        assert_eq!(vm_procs(), (0, 0), "qemu or virtiofsd left");
        // `shim delete` removes the socket after the processes are gone: wait for that too.
        let removed = janus_tests::poll(secs(5), || {
            (!std::path::Path::new(&sock).exists()).then_some(())
        });
        assert!(removed.is_some(), "virtiofsd socket left");
        assert!(
            !std::path::Path::new(&shared).exists(),
            "share {shared} left"
        );
    }
}

mod janus_vm_faults {
    use super::*;

    /// QEMU killed with SIGKILL: the task exits 137 promptly (TaskExit), and delete leaves
    /// nothing behind.
    #[test]
    fn vmm_sigkill_exits_137() {
        let ctd = Containerd::for_runtime(JANUS_VM);
        let c = ctd.container("vmkill");
        ctd.run_detached(JANUS_VM, &[], &c, &["sleep", "1000"]);
        let ps = janus_tests::processes();
        let sock = janus_tests::vm_share_socket(&c.id).expect("QEMU of the container");
        let qemu = ps
            .iter()
            .find(|p| p.cmdline.contains("qemu-system") && p.cmdline.contains(&sock))
            .expect("qemu of the container")
            .pid;
        let mut events = ctd.events();
        let t = std::time::Instant::now();
        // SAFETY: kill(2) on the QEMU found above.
        assert_eq!(unsafe { libc::kill(qemu as i32, libc::SIGKILL) }, 0);
        let want = format!("\"container_id\":\"{}\"", c.id);
        let exit =
            events.wait_for_line(secs(10), |l| l.contains("/tasks/exit") && l.contains(&want));
        let took = t.elapsed();
        assert!(
            exit.as_deref()
                .is_some_and(|l| l.contains("\"exit_status\":137")),
            "exit event {exit:?}; events:\n{}",
            events.lines().join("\n")
        );
        eprintln!("janus_vm_faults: TaskExit {took:?} after SIGKILL to QEMU");
        assert!(took < secs(2), "TaskExit took {took:?} (goal: within 2 s)");
        ctd.wait_status(&c, "STOPPED", secs(5));
        ctd.ctr_ok(&["task", "rm", &c]);
        ctd.ctr_ok(&["containers", "rm", &c]);
        ctd.assert_no_leaks(&c, secs(10));
    }

    /// The shim killed with SIGKILL: containerd runs `shim delete`, which stops the VM and
    /// virtiofsd the dead shim left.
    #[test]
    fn shim_sigkill_leaves_no_vm() {
        let ctd = Containerd::for_runtime(JANUS_VM);
        let c = ctd.container("shimkill");
        ctd.run_detached(JANUS_VM, &[], &c, &["sleep", "1000"]);
        let ps = janus_tests::processes();
        let sock = janus_tests::vm_share_socket(&c.id).expect("QEMU of the container");
        let id_arg = format!("-id {}", c.id);
        let shim = ps
            .iter()
            .find(|p| p.cmdline.contains("containerd-shim-janus") && p.cmdline.contains(&id_arg))
            .expect("shim server of the container")
            .pid;
        let (q, v) = janus_tests::vm_pids(&sock);
        assert!(q.len() == 1 && !v.is_empty(), "qemu {q:?}, virtiofsd {v:?}");
        // SAFETY: kill(2) on the shim found above.
        assert_eq!(unsafe { libc::kill(shim as i32, libc::SIGKILL) }, 0);
        let gone = janus_tests::poll(secs(20), || {
            let (q, v) = janus_tests::vm_pids(&sock);
            let left = q.len() + v.len();
            (left == 0).then_some(())
        });
        assert!(
            gone.is_some(),
            "qemu/virtiofsd still running 20 s after the shim died\n{}",
            ctd.log_tail(30)
        );
        // `shim delete` removes the socket after the processes are gone: wait for that too.
        let removed = janus_tests::poll(secs(5), || {
            (!std::path::Path::new(&sock).exists()).then_some(())
        });
        assert!(removed.is_some(), "virtiofsd socket left");
        let shared = sock.replace(".vfs.sock", ".shared");
        let gone = janus_tests::poll(secs(5), || {
            (!std::path::Path::new(&shared).exists()).then_some(())
        });
        assert!(gone.is_some(), "share {shared} left");
        let _ = ctd.ctr(&["task", "rm", "-f", &c]);
        let _ = ctd.ctr(&["containers", "rm", &c]);
        ctd.assert_no_leaks(&c, secs(10));
    }

    /// A guest that stops answering (QEMU stopped with SIGSTOP): calls fail with a deadline
    /// error after `vm.agent_timeout_ms`, none hangs; after SIGCONT everything works again.
    #[test]
    fn agent_not_answering_times_out() {
        let ctd = Containerd::for_runtime(JANUS);
        let cfg = ctd.write_janus_config("mode = \"vm\"\n[vm]\nagent_timeout_ms = 2000\n");
        let c = ctd.container("hung");
        let cfg_s = cfg.to_str().unwrap().to_string();
        let args = ctd.run_args(
            JANUS,
            &["-d", "--runtime-config-path", &cfg_s],
            &c,
            &["sleep", "1000"],
        );
        ctd.ctr_ok(&args);
        ctd.wait_status(&c, "RUNNING", secs(20));
        let ps = janus_tests::processes();
        let sock = janus_tests::vm_share_socket(&c.id).expect("QEMU of the container");
        let qemu = ps
            .iter()
            .find(|p| p.cmdline.contains("qemu-system") && p.cmdline.contains(&sock))
            .expect("qemu of the container")
            .pid as i32;
        // SAFETY: kill(2) on the QEMU found above.
        assert_eq!(unsafe { libc::kill(qemu, libc::SIGSTOP) }, 0);
        let t = std::time::Instant::now();
        let o = ctd.ctr_timeout(&["task", "ps", &c], secs(30));
        let took = t.elapsed();
        // SAFETY: as above.
        unsafe { libc::kill(qemu, libc::SIGCONT) };
        assert_ne!(o.code(), 0, "task ps answered from a stopped VM: {o}");
        assert!(o.stderr.contains("deadline"), "{o}");
        assert!(took < secs(10), "took {took:?}");
        eprintln!(
            "janus_vm_faults: agent call failed after {took:?} with: {}",
            o.stderr.trim()
        );
        let ps = ctd.ctr_ok(&["task", "ps", &c]);
        assert!(ps.lines().count() >= 2, "{ps}");
        ctd.ctr_ok(&["task", "kill", "-s", "SIGKILL", &c]);
        ctd.wait_status(&c, "STOPPED", secs(20));
        ctd.ctr_ok(&["task", "rm", &c]);
        ctd.ctr_ok(&["containers", "rm", &c]);
        ctd.assert_no_leaks(&c, secs(10));
    }

    /// 20 VM containers run and deleted one after another: no qemu or virtiofsd process,
    /// socket, mount or temp dir of theirs remains.
    #[test]
    fn twenty_vm_containers_leave_nothing() {
        let ctd = Containerd::for_runtime(JANUS_VM);
        let procs = || -> usize {
            janus_tests::processes()
                .iter()
                .filter(|p| {
                    p.cmdline.contains(&*ctd.dir.to_string_lossy())
                        && (p.cmdline.contains("virtiofsd") || p.cmdline.contains("qemu-system"))
                })
                .count()
        };
        let mut ids = Vec::new();
        for i in 0..20 {
            let c = ctd.container(&format!("many{i}"));
            let o = ctd.run_rm(JANUS_VM, &c, &["sh", "-c", "echo $((6 * 7))"]);
            assert_code(&ctd, &o, 0);
            assert_eq!(o.stdout, "42\n", "{o}");
            ids.push(c);
        }
        for c in &ids {
            ctd.assert_no_leaks(c, secs(10));
        }
        assert_eq!(procs(), 0, "qemu/virtiofsd left");
        // Each VM's directory (QEMU's sockets, logs) and virtiofsd's socket are named after
        // the container and go with it.
        let left: Vec<String> = std::fs::read_dir("/run/janus/vm")
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .filter(|n| ids.iter().any(|c| janus_tests::contains_token(n, &c.id)))
                    .collect()
            })
            .unwrap_or_default();
        assert!(left.is_empty(), "VM dirs left: {left:?}");
    }

    /// A missing guest kernel fails Create with FailedPrecondition naming the path.
    #[test]
    fn missing_kernel_is_a_failed_precondition() {
        let ctd = Containerd::for_runtime(JANUS);
        ctd.write_janus_config(
            "mode = \"vm\"\n[vm]\nkernel = \"/nonexistent/vmlinux\"\ninitrd = \"/nonexistent/initramfs.cpio\"\n",
        );
        let c = ctd.container("nokernel");
        let o = ctd.run_rm_with_config(JANUS, &c, &["true"]);
        assert_ne!(o.code(), 0, "{o}");
        assert!(
            o.stderr.contains("/nonexistent/vmlinux")
                && janus_tests::ctr_error_has_code(&o.stderr, "failed precondition"),
            "{o}"
        );
        assert!(o.stderr.contains("build-guest.sh"), "says what to do: {o}");
        let _ = ctd.ctr(&["containers", "rm", &c]);
        ctd.assert_no_leaks(&c, secs(10));
    }

    /// A guest that dies before its agent answers (here: no init, a kernel panic) fails
    /// Create, and its whole console log outlives the VM's directory where the error says.
    #[test]
    fn failed_boot_keeps_console_log() {
        let ctd = Containerd::for_runtime(JANUS);
        ctd.write_janus_config("mode = \"vm\"\n[vm]\nkernel_params = [\"rdinit=/nonexistent\"]\n");
        let c = ctd.container("noinit");
        let kept = std::path::Path::new("/var/log/janus/failed-boots")
            .join(format!("{}.console.log", c.id()));
        let _ = std::fs::remove_file(&kept);
        let o = ctd.run_rm_with_config(JANUS, &c, &["true"]);
        assert_ne!(o.code(), 0, "{o}");
        assert!(
            o.stderr
                .contains(&format!("guest console log: {}", kept.display())),
            "{o}"
        );
        let log = std::fs::read_to_string(&kept).unwrap_or_default();
        assert!(log.contains("Kernel panic"), "{}:\n{log}", kept.display());
        let _ = std::fs::remove_file(&kept);
        let _ = ctd.ctr(&["containers", "rm", &c]);
        ctd.assert_no_leaks(&c, secs(10));
    }
}

/// The builtin hypervisor driver (janus-vmm) through containerd. It boots Linux only with
/// hardware virtualization: where the CPU has vmx/svm a container runs in it end to end; where
/// it has not (these CI machines), the shim must refuse at once with FailedPrecondition instead
/// of hanging in a boot that cannot finish, and that is what runs here.
mod janus_vm_builtin {
    use super::*;

    use runtime::vm::hardware_virtualization as hw_virt;

    #[test]
    fn builtin_without_hardware_virtualization_is_a_failed_precondition() {
        if let Some(f) = hw_virt() {
            janus_tests::not_run(
                "builtin_without_hardware_virtualization_is_a_failed_precondition",
                janus_tests::Prereq::NoVmx,
                &format!("the CPU has {f} (builtin_runs_a_container covers this host)"),
                false,
            );
            return;
        }
        let ctd = Containerd::for_runtime(JANUS);
        ctd.write_janus_config("mode = \"vm\"\n[vm]\nhypervisor = \"builtin\"\n");
        let c = ctd.container("builtin-nohw");
        let t = std::time::Instant::now();
        let o = ctd.run_rm_with_config(JANUS, &c, &["true"]);
        assert_ne!(o.code(), 0, "{o}");
        assert!(
            janus_tests::ctr_error_has_code(&o.stderr, "failed precondition")
                && o.stderr.contains("vmx nor svm"),
            "{o}"
        );
        assert!(
            o.stderr.contains("hypervisor = \"qemu\""),
            "says what to do: {o}"
        );
        assert!(t.elapsed() < secs(30), "took {:?}", t.elapsed());
        let _ = ctd.ctr(&["containers", "rm", &c]);
        ctd.assert_no_leaks(&c, secs(10));
    }

    #[test]
    fn unknown_hypervisor_is_an_invalid_argument() {
        let ctd = Containerd::for_runtime(JANUS);
        ctd.write_janus_config("mode = \"vm\"\n[vm]\nhypervisor = \"firecracker\"\n");
        let c = ctd.container("badhv");
        let o = ctd.run_rm_with_config(JANUS, &c, &["true"]);
        assert_ne!(o.code(), 0, "{o}");
        assert!(
            janus_tests::ctr_error_has_code(&o.stderr, "invalid argument")
                && o.stderr.contains("firecracker"),
            "{o}"
        );
        let _ = ctd.ctr(&["containers", "rm", &c]);
        ctd.assert_no_leaks(&c, secs(10));
    }

    /// Full Linux boot under janus-vmm to agent-ready, a container run in it (guest kernel,
    /// stdout, exit code), and nothing left after delete (no janus-vmm, virtiofsd, VM dir).
    #[test]
    fn builtin_runs_a_container() {
        let Some(f) = hw_virt() else {
            janus_tests::not_run(
                "builtin_runs_a_container",
                janus_tests::Prereq::Vmx,
                "the CPU shows neither vmx nor svm, so no Linux guest can boot under KVM here \
                 (builtin_without_hardware_virtualization_is_a_failed_precondition ran \
                 instead; vmm's test guests cover the devices)",
                false,
            );
            return;
        };
        eprintln!("builtin_runs_a_container: CPU has {f}");
        let ctd = Containerd::for_runtime(JANUS);
        ctd.write_janus_config("mode = \"vm\"\n[vm]\nhypervisor = \"builtin\"\n");
        let c = ctd.container("builtin");
        let t = std::time::Instant::now();
        let o = ctd.run_rm_with_config(JANUS, &c, &["sh", "-c", "uname -r; exit 7"]);
        eprintln!(
            "builtin_runs_a_container: ctr run --rm took {:?}",
            t.elapsed()
        );
        assert_eq!(o.code(), 7, "{o}");
        let guest = std::fs::read_to_string(janus_tests::guest_dir().join("kernel.release"))
            .unwrap_or_default();
        assert!(o.stdout.starts_with(guest.trim()), "guest kernel: {o}");
        let left: Vec<_> = janus_tests::processes()
            .into_iter()
            .filter(|p| p.cmdline.contains("janus-vmm") && p.cmdline.contains(&c.id))
            .collect();
        assert!(left.is_empty(), "janus-vmm left: {left:?}");
        ctd.assert_no_leaks(&c, secs(10));
    }
}

mod janus_only {
    use super::*;

    /// `--runtime-config-path` selects the config file (runtimeoptions.v1.Options.ConfigPath).
    #[test]
    fn runtime_config_path() {
        let ctd = Containerd::for_runtime(JANUS);
        let cfg = ctd.write_janus_config("mode = \"namespace\"\n");
        assert!(cfg.is_file());
        let c = ctd.container("cfgpath");
        let o = ctd.run_rm_with_config(JANUS, &c, &["echo", "hi"]);
        assert_code(&ctd, &o, 0);
        assert_eq!(o.stdout, "hi\n", "{o}");
        ctd.assert_no_leaks(&c, secs(10));
    }
}

#[test]
fn harness_image_is_busybox_with_hard_links() {
    // Runtime independent sanity check of the test image, through runc.
    let ctd = Containerd::for_runtime(RUNC);
    let c = ctd.container("image");
    let o = ctd.run_rm(
        RUNC,
        &c,
        &[
            "sh",
            "-c",
            "stat -c '%h %i' /bin/busybox /bin/ls /bin/sh; id user; id nobody",
        ],
    );
    assert_code(&ctd, &o, 0);
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert!(lines.len() >= 5, "{o}");
    let inode = |l: &str| l.split_whitespace().nth(1).map(str::to_string);
    assert_eq!(
        inode(lines[0]),
        inode(lines[1]),
        "applets are not hard links:\n{o}"
    );
    assert_eq!(
        inode(lines[0]),
        inode(lines[2]),
        "applets are not hard links:\n{o}"
    );
    assert!(lines[3].starts_with("uid=1000(user) gid=1000(user)"), "{o}");
    assert!(lines[4].starts_with("uid=65534(nobody)"), "{o}");
}
