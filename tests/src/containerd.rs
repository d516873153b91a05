//! A private containerd per test ([`Containerd`]), the concurrency limit across the tests of a
//! process, and the gRPC calls ctr lacks.

use super::*;

/// The concurrency limit across the tests of one process.
pub(crate) struct Permits {
    used: Mutex<usize>,
    cv: Condvar,
}

static PERMITS: Permits = Permits {
    used: Mutex::new(0),
    cv: Condvar::new(),
};

pub(crate) fn max_parallel() -> usize {
    std::env::var("JANUS_TEST_PARALLEL")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or(2)
}

pub(crate) struct Permit;

impl Permit {
    fn acquire() -> Permit {
        let max = max_parallel();
        let mut used = PERMITS.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used >= max {
            used = PERMITS.cv.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += 1;
        Permit
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut used = PERMITS.used.lock().unwrap_or_else(|e| e.into_inner());
        *used -= 1;
        PERMITS.cv.notify_one();
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

pub(crate) fn next_seq() -> u64 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// A container id unique on this machine (name, test process pid, sequence number).
pub fn unique_id(name: &str) -> String {
    format!("{name}-{}-{}", std::process::id(), next_seq())
}

// ---------------------------------------------------------------------------------------------
// Private containerd

/// A private containerd, stopped and cleaned up on drop.
pub struct Containerd {
    /// Instance directory (config, sockets, root, state, bin, logs).
    pub dir: PathBuf,
    pub root: PathBuf,
    pub state: PathBuf,
    /// gRPC socket.
    pub address: PathBuf,
    /// The containerd namespace all helpers use (unique per instance; `k8s.io` with CRI).
    pub namespace: String,
    /// Unique name of this instance (`jt-<pid>-<seq>`): log file names, CRI cgroup root.
    pub name: String,
    /// CRI set-up (CNI network, cgroup root...), when started with [`Options::cri`].
    pub cri_env: Option<cri::CriEnv>,
    /// Janus runtime config file (`mode = "namespace"`).
    pub janus_config: PathBuf,
    /// The shim binary linked into containerd's PATH, when one was found.
    pub shim: Option<PathBuf>,
    child: Option<Child>,
    /// containerd's command line (launcher first) and PATH: [`Self::restart`] runs it again.
    launch: Vec<std::ffi::OsString>,
    path_env: String,
    log: PathBuf,
    /// Container ids handed out or removed through this instance (for socket cleanup).
    ids: Mutex<Vec<String>>,
    _permit: Permit,
}

/// What [`Containerd::start`] needs.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Fail unless the Janus shim binary is found.
    pub require_janus: bool,
    /// Enable the CRI plugin (namespace `k8s.io`, CNI bridge network, pause image): see [`cri`].
    pub cri: bool,
    /// CRI pods get an IPv6 address too (dual-stack).
    pub dual_stack: bool,
    /// With `cri`: Janus's handlers come from this deploy/ drop-in, imported the way a node
    /// imports it (see [`cri::import_dropin`]), instead of from the harness's own CRI config.
    pub dropin: Option<PathBuf>,
    /// A command prefix containerd runs under (e.g. [`systemd_node::SystemdNode::launcher`]);
    /// empty: containerd is our child.
    pub launcher: Vec<std::ffi::OsString>,
    /// With `cri`: a node's root (a directory standing for `/`). containerd reads its config
    /// from `<root>/etc/containerd/config.toml`, which the harness writes without Janus's
    /// handlers (version 3 for containerd 2.x) and then hands to `prepare` (e.g. `janus
    /// install`); the shim comes from `<root>/usr/local/bin` on containerd's PATH.
    pub node_root: Option<PathBuf>,
    pub prepare: Option<Prepare>,
}

/// A step run on a node root before containerd starts ([`Options::prepare`]).
#[derive(Clone)]
pub struct Prepare(pub std::sync::Arc<PrepareFn>);

/// What [`Prepare`] runs, given the node root.
pub type PrepareFn = dyn Fn(&Path) -> Result<()> + Send + Sync;

impl std::fmt::Debug for Prepare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Prepare(..)")
    }
}

impl Options {
    /// Options for tests of `runtime` (requires the Janus shim for Janus runtimes).
    pub fn for_runtime(runtime: &str) -> Self {
        Options {
            require_janus: runtime.contains("janus"),
            cri: false,
            dual_stack: false,
            dropin: None,
            launcher: Vec::new(),
            node_root: None,
            prepare: None,
        }
    }
}

impl Containerd {
    /// Start a private containerd suited to tests of `runtime` and import [`IMAGE`].
    /// Panics with a clear message on failure.
    pub fn for_runtime(runtime: &str) -> Containerd {
        match Self::start(Options::for_runtime(runtime)) {
            Ok(c) => c,
            Err(e) => panic!("starting a private containerd for {runtime}: {e:#}"),
        }
    }

    pub fn start(opts: Options) -> Result<Containerd> {
        if !nix::unistd::geteuid().is_root() {
            bail!("the integration tests need root (they run containerd, mount and use cgroups)");
        }
        for bin in [
            containerd_binary(),
            ctr_binary(),
            PathBuf::from("/usr/sbin/runc"),
        ] {
            if !is_executable(&bin) {
                bail!(
                    "{} is missing: install Debian's containerd and runc \
                     (hack/test.sh does), e.g. `apt-get install -y containerd runc`",
                    bin.display()
                );
            }
        }
        let shim = match shim_binary() {
            Ok(p) => Some(p),
            Err(e) if opts.require_janus => return Err(e),
            Err(_) => None,
        };
        let image = ensure_image()?;
        if opts.cri {
            ensure_pause_image()?;
        }
        let permit = Permit::acquire();

        let dir = tempfile::Builder::new()
            .prefix("janus-ctd-")
            .tempdir()
            .context("creating instance dir")?
            .keep();
        let name = format!("jt-{}-{}", std::process::id(), next_seq());
        // CRI works in containerd's `k8s.io` namespace; its isolation comes from the cgroup
        // root, runc root, CNI network and bridge of the instance instead (see `cri::CriEnv`).
        let namespace = if opts.cri {
            cri::CRI_NAMESPACE.to_string()
        } else {
            name.clone()
        };
        let root = dir.join("root");
        let state = dir.join("state");
        let bin = dir.join("bin");
        let address = dir.join("containerd.sock");
        let log = dir.join("containerd.log");
        for d in [&root, &state, &bin] {
            fs::create_dir_all(d)?;
        }
        if let (Some(shim), None) = (&shim, &opts.node_root) {
            symlink(shim, bin.join(JANUS_SHIM_NAME))?;
            symlink(shim, bin.join(JANUS_VM_SHIM_NAME))?;
        }
        let janus_config = dir.join("janus.toml");
        fs::write(&janus_config, "mode = \"namespace\"\n")?;
        let config = match &opts.node_root {
            Some(r) => r.join("etc/containerd/config.toml"),
            None => dir.join("config.toml"),
        };
        let mut config_text = containerd_config(&dir, &root, &state, &address, opts.cri);
        let cri_env = if opts.cri {
            let env = cri::CriEnv::setup(&dir, &name, opts.dual_stack)?;
            let handlers = opts.dropin.is_none() && opts.node_root.is_none();
            let cri_text = env.containerd_config(&janus_config, handlers);
            if let Some(dropin) = &opts.dropin {
                config_text = cri::import_dropin(&dir, config_text, &cri_text, dropin)?;
            } else if opts.node_root.is_some() && containerd_major() >= 2 {
                config_text = cri::migrate_v3(&dir, &format!("{config_text}{cri_text}"))?;
            } else {
                config_text.push_str(&cri_text);
            }
            Some(env)
        } else {
            None
        };
        if let Some(parent) = config.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&config, config_text)?;
        if let (Some(r), Some(prepare)) = (&opts.node_root, &opts.prepare) {
            (prepare.0)(r)?;
        }
        let node_bin = opts
            .node_root
            .as_ref()
            .map(|r| format!("{}:", r.join("usr/local/bin").display()))
            .unwrap_or_default();

        let mut launch: Vec<std::ffi::OsString> = opts.launcher.clone();
        launch.push(containerd_binary().into_os_string());
        launch.push("--config".into());
        launch.push(config.clone().into_os_string());
        let path_env = format!(
            "{node_bin}{}:{}:{SYS_PATH}",
            bin.display(),
            containerd_bin_dir().display()
        );
        fs::File::create(&log)?;
        let child = spawn_containerd(&launch, &path_env, &log)?;

        let mut ctd = Containerd {
            dir,
            root,
            state,
            address,
            namespace,
            name,
            cri_env,
            janus_config,
            shim,
            child: Some(child),
            launch,
            path_env,
            log,
            ids: Mutex::new(Vec::new()),
            _permit: permit,
        };
        ctd.wait_ready()?;
        if !opts.cri {
            // (CRI instances import once the CRI plugin is ready: `cri::Cri::start`.)
            ctd.import_image(&image, IMAGE)?;
        }
        Ok(ctd)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(st) = child.try_wait()? {
                    bail!(
                        "containerd exited during startup ({st}); log:\n{}",
                        self.log_tail(40)
                    );
                }
            }
            if self.address.exists() {
                let mut cmd = Command::new(ctr_binary());
                cmd.arg("--address").arg(&self.address).arg("version");
                if let Ok(o) = run_with_timeout(cmd, None, Duration::from_secs(5)) {
                    if o.success() {
                        return Ok(());
                    }
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "containerd did not answer on {} within 30s; log:\n{}",
                    self.address.display(),
                    self.log_tail(40)
                );
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    pub(crate) fn import_image(&self, tar: &Path, image: &str) -> Result<()> {
        let base = image.rsplit_once(':').map(|(b, _)| b).unwrap_or(image);
        let o = self.ctr(&[
            "images",
            "import",
            "--base-name",
            base,
            tar.to_str().unwrap(),
        ]);
        if !o.success() {
            bail!("importing {}:\n{o}", tar.display());
        }
        let ls = self.ctr(&["images", "ls", "-q"]);
        if !ls.stdout.lines().any(|l| l.trim() == image) {
            bail!("{image} missing after import:\n{ls}");
        }
        Ok(())
    }

    /// Last `n` lines of containerd's log (shim logs end up there too), minus plugin loading.
    pub fn log_tail(&self, n: usize) -> String {
        let s = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s
            .lines()
            .filter(|l| !l.contains("loading plugin"))
            .collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Path of containerd's log.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// PID of containerd.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends `signal` to containerd and waits (up to 30 s) until it has exited. Its shims keep
    /// running (they are in process groups of their own). [`Self::start_again`] brings it back.
    pub fn stop_daemon(&mut self, signal: nix::sys::signal::Signal) -> Result<ExitStatus> {
        let child = self.child.as_mut().context("containerd is not running")?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, signal).context("signalling containerd")?;
        let status = wait_timeout(child, Duration::from_secs(30))?
            .ok_or_else(|| anyhow!("containerd still running 30 s after {signal}"))?;
        self.child = None;
        Ok(status)
    }

    /// Starts containerd again on the same config, root, state and sockets (after
    /// [`Self::stop_daemon`]) and waits until it answers. Its log goes on in the same file.
    pub fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("containerd is still running");
        }
        let child = spawn_containerd(&self.launch, &self.path_env, &self.log)?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// [`Self::stop_daemon`] with SIGTERM, then [`Self::start_again`]: a containerd restart.
    pub fn restart(&mut self) -> Result<()> {
        self.stop_daemon(nix::sys::signal::Signal::SIGTERM)?;
        self.start_again()
    }

    /// A `ctr --address SOCK -n NS ARGS` command.
    pub fn ctr_cmd<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut cmd = Command::new(ctr_binary());
        cmd.arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(&self.namespace)
            .args(args);
        cmd
    }

    /// Run ctr (stdin /dev/null, default timeout). Panics only if it can't run or times out.
    pub fn ctr<S: AsRef<OsStr>>(&self, args: &[S]) -> Out {
        self.ctr_timeout(args, cmd_timeout())
    }

    /// Run ctr with an explicit timeout.
    pub fn ctr_timeout<S: AsRef<OsStr>>(&self, args: &[S], timeout: Duration) -> Out {
        match run_with_timeout(self.ctr_cmd(args), None, timeout) {
            Ok(o) => o,
            Err(e) => panic!("{e:#}\n--- containerd log ---\n{}", self.log_tail(30)),
        }
    }

    /// Run ctr, panic unless it exits 0; returns stdout.
    pub fn ctr_ok<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        let o = self.ctr(args);
        if !o.success() {
            panic!(
                "ctr failed:\n{o}\n--- containerd log ---\n{}",
                self.log_tail(30)
            );
        }
        o.stdout
    }

    /// Run ctr with `input` on a stdin pipe. ctr 1.6 only forwards EOF (CloseIO) once the task
    /// exists (a fast EOF is lost: ctr sets its stdin closer after NewTask returns), so the pipe
    /// is kept open until task `id` is RUNNING (or ctr exits), then closed.
    pub fn ctr_stdin<S: AsRef<OsStr>>(&self, args: &[S], input: &[u8], id: &str) -> Out {
        let r = (|| -> Result<Out> {
            let mut bg = Background::spawn_with_stdin(self.ctr_cmd(args), Stdio::piped())?;
            bg.stdin().unwrap().write_all(input)?;
            poll(cmd_timeout(), || {
                if bg.try_status().is_some() {
                    return Some(());
                }
                (self.task_status(id).as_deref() == Some("RUNNING")).then_some(())
            });
            bg.close_stdin();
            bg.wait(cmd_timeout())
        })();
        match r {
            Ok(o) => o,
            Err(e) => panic!("{e:#}\n--- containerd log ---\n{}", self.log_tail(30)),
        }
    }

    /// Run ctr in a pseudo-terminal (for `-t`).
    pub fn ctr_tty<S: AsRef<OsStr>>(&self, args: &[S]) -> Out {
        match run_in_pty(self.ctr_cmd(args), b"", cmd_timeout()) {
            Ok(o) => o,
            Err(e) => panic!("{e:#}\n--- containerd log ---\n{}", self.log_tail(30)),
        }
    }

    /// Start ctr in the background (output collected line by line).
    pub fn ctr_background<S: AsRef<OsStr>>(&self, args: &[S]) -> Background {
        Background::spawn(self.ctr_cmd(args)).expect("spawning ctr")
    }

    /// Start `ctr events` and return once it is subscribed (a namespace label change was seen).
    pub fn events(&self) -> Background {
        let mut bg = self.ctr_background(&["events"]);
        let token = format!("janus.sync={}", next_seq());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.ctr_ok(&["namespaces", "label", &self.namespace, &token]);
            let want = token.replace('=', "\":\"");
            if bg
                .wait_for_line(Duration::from_millis(300), |l| {
                    l.contains("/namespaces/update") && l.contains(&want)
                })
                .is_some()
            {
                return bg;
            }
            if bg.try_status().is_some() || Instant::now() > deadline {
                let o = bg.wait(Duration::from_secs(1));
                panic!("ctr events did not start: {o:?}");
            }
        }
    }

    /// `ctr run` arguments: `run [--runtime RT] EXTRA... IMAGE ID CMD...`.
    pub fn run_args(&self, runtime: &str, extra: &[&str], id: &str, cmd: &[&str]) -> Vec<String> {
        let mut v = vec!["run".to_string(), "--runtime".into(), runtime.into()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v.push(IMAGE.into());
        v.push(id.into());
        v.extend(cmd.iter().map(|s| s.to_string()));
        v
    }

    /// `ctr run --rm` (foreground) of `cmd` in a new container `id`.
    pub fn run_rm(&self, runtime: &str, id: &str, cmd: &[&str]) -> Out {
        self.ctr(&self.run_args(runtime, &["--rm"], id, cmd))
    }

    /// `ctr run -d`: start `cmd` detached, panic on failure; waits until RUNNING.
    pub fn run_detached(&self, runtime: &str, extra: &[&str], id: &str, cmd: &[&str]) {
        let mut e = vec!["-d"];
        e.extend_from_slice(extra);
        self.ctr_ok(&self.run_args(runtime, &e, id, cmd));
        self.wait_status(id, "RUNNING", Duration::from_secs(20));
    }

    /// Write the Janus runtime config file (default content: `mode = "namespace"`).
    pub fn write_janus_config(&self, contents: &str) -> PathBuf {
        fs::write(&self.janus_config, contents).expect("writing janus.toml");
        self.janus_config.clone()
    }

    /// `ctr run --rm --runtime RT --runtime-config-path <janus.toml> IMAGE ID CMD...`.
    pub fn run_rm_with_config(&self, runtime: &str, id: &str, cmd: &[&str]) -> Out {
        let cfg = self.janus_config.to_str().unwrap().to_string();
        self.ctr(&self.run_args(runtime, &["--rm", "--runtime-config-path", &cfg], id, cmd))
    }

    /// Tasks as (id, pid, status) from `ctr task ls`.
    pub fn tasks(&self) -> Vec<(String, u32, String)> {
        let o = self.ctr(&["task", "ls"]);
        o.stdout
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 3).then(|| (f[0].to_string(), f[1].parse().unwrap_or(0), f[2].into()))
            })
            .collect()
    }

    /// Status column of `ctr task ls` for `id`.
    pub fn task_status(&self, id: &str) -> Option<String> {
        self.tasks().into_iter().find(|t| t.0 == id).map(|t| t.2)
    }

    /// PID column of `ctr task ls` for `id`.
    pub fn task_pid(&self, id: &str) -> Option<u32> {
        self.tasks().into_iter().find(|t| t.0 == id).map(|t| t.1)
    }

    /// Wait until `ctr task ls` shows `status` for `id`; panics otherwise.
    pub fn wait_status(&self, id: &str, status: &str, timeout: Duration) {
        let mut last = None;
        let ok = poll(timeout, || {
            last = self.task_status(id);
            (last.as_deref() == Some(status)).then_some(())
        });
        if ok.is_none() {
            panic!(
                "task {id} did not become {status} within {timeout:?} (last: {last:?})\n--- containerd log ---\n{}",
                self.log_tail(30)
            );
        }
    }

    /// Best-effort removal of container `id` and its task, whatever state they are in.
    pub fn force_remove(&self, id: &str) {
        self.remember(id);
        let t = Duration::from_secs(10);
        let ctr = |args: &[&str]| run_with_timeout(self.ctr_cmd(args), None, t).ok();
        if let Some(st) = self.task_status(id) {
            if st == "PAUSED" || st == "PAUSING" {
                ctr(&["task", "resume", id]);
            }
            if st != "STOPPED" {
                ctr(&["task", "kill", "-a", "-s", "SIGKILL", id]);
                poll(Duration::from_secs(5), || {
                    matches!(self.task_status(id).as_deref(), None | Some("STOPPED")).then_some(())
                });
            }
            // Plain delete once stopped; `-f` (kill + wait, then delete) only if that fails.
            if !ctr(&["task", "rm", id]).is_some_and(|o| o.success()) {
                ctr(&["task", "rm", "-f", id]);
            }
        }
        ctr(&["containers", "rm", id]);
    }

    /// A guard that force-removes container `name-<unique>` when dropped (also on panic).
    pub fn container(&self, name: &str) -> ContainerGuard<'_> {
        let id = unique_id(name);
        self.remember(&id);
        ContainerGuard { ctd: self, id }
    }

    pub(crate) fn remember(&self, id: &str) {
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        if !ids.iter().any(|i| i == id) {
            ids.push(id.to_string());
        }
    }

    /// Bundle dir the runtime v2 manager makes for `id`.
    pub fn bundle_dir(&self, id: &str) -> PathBuf {
        self.state
            .join("io.containerd.runtime.v2.task")
            .join(&self.namespace)
            .join(id)
    }

    /// Socket containerd 1.6 assigns to the shim of `id` (`/run/containerd/s/<sha256>`).
    pub fn shim_socket(&self, id: &str) -> PathBuf {
        use sha2::{Digest, Sha256};
        let key = format!("{}/{}/{}", self.address.display(), self.namespace, id);
        let d = Sha256::digest(key.as_bytes());
        let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
        PathBuf::from("/run/containerd/s").join(hex)
    }

    /// Everything container `id` left behind: mounts, cgroups, processes, shims, bundle, socket.
    pub fn leaks(&self, id: &str) -> Vec<String> {
        let mut v = Vec::new();
        let bundle = self.bundle_dir(id);
        if let Ok(mi) = fs::read_to_string("/proc/self/mountinfo") {
            for l in mi.lines() {
                let mp = l.split(' ').nth(4).unwrap_or("");
                if contains_token(l, id) || Path::new(mp).starts_with(&bundle) {
                    v.push(format!("mount: {l}"));
                }
            }
        }
        for d in find_cgroups(id) {
            v.push(format!("cgroup: {}", d.display()));
        }
        for p in processes() {
            if p.pid == std::process::id() {
                continue;
            }
            let under = |x: &Option<PathBuf>| x.as_ref().is_some_and(|x| x.starts_with(&bundle));
            // Container processes: in a cgroup named after the container (/proc/PID/root and
            // cwd read as "/" from here once they pivot_root into another mount namespace).
            if contains_token(&p.cmdline, id)
                || contains_token(&p.cgroup, id)
                || under(&p.cwd)
                || under(&p.root)
            {
                let what = if p.cmdline.contains("containerd-shim") {
                    "shim process"
                } else {
                    "process"
                };
                v.push(format!("{what} {}: {}", p.pid, p.cmdline));
            }
        }
        if bundle.exists() {
            v.push(format!("bundle dir: {}", bundle.display()));
        }
        let sock = self.shim_socket(id);
        if sock.exists() {
            v.push(format!("shim socket: {}", sock.display()));
        }
        v
    }

    /// Wait (up to `timeout`) until [`Self::leaks`] is empty; panic listing what is left.
    pub fn assert_no_leaks(&self, id: &str, timeout: Duration) {
        let mut last = Vec::new();
        if poll(timeout, || {
            last = self.leaks(id);
            last.is_empty().then_some(())
        })
        .is_none()
        {
            panic!(
                "container {id} left things behind after delete:\n  {}\n--- containerd log ---\n{}",
                last.join("\n  "),
                self.log_tail(30)
            );
        }
    }

    /// Tasks.Update over containerd's gRPC API (ctr 1.6 has no `task update`): `resources`
    /// is an OCI `LinuxResources` JSON object, e.g. `{"memory":{"limit":67108864}}`.
    pub fn update_task(&self, id: &str, resources: &serde_json::Value) -> Result<()> {
        grpc::update_task(&self.address, &self.namespace, id, resources)
    }

    fn shutdown(&mut self) {
        let alive = self
            .child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none());
        if alive {
            // Containers first, while containerd and the shims can still clean up properly.
            let t = Duration::from_secs(10);
            let ids: Vec<String> = run_with_timeout(self.ctr_cmd(&["c", "ls", "-q"]), None, t)
                .map(|o| o.stdout.lines().map(|s| s.trim().to_string()).collect())
                .unwrap_or_default();
            for id in ids.iter().filter(|s| !s.is_empty()) {
                self.force_remove(id);
            }
        }
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            if !matches!(
                wait_timeout(&mut child, Duration::from_secs(10)),
                Ok(Some(_))
            ) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // Leftover shims (their command line names our socket) and container processes
        // (their root or cwd is under our state dir, or their cgroup is ours: named after our
        // namespace, or under our CRI cgroup root).
        let addr = self.address.display().to_string();
        let cg_token = match &self.cri_env {
            Some(env) => env.cgroup_root.clone(),
            None => self.namespace.clone(),
        };
        for _ in 0..3 {
            let mut killed = 0;
            for p in processes() {
                if p.pid == std::process::id() {
                    continue;
                }
                let ours = contains_token_path(&p.cmdline, &addr)
                    || contains_token(&p.cgroup, &cg_token)
                    || p.root.as_ref().is_some_and(|r| r.starts_with(&self.dir))
                    || p.cwd.as_ref().is_some_and(|r| r.starts_with(&self.dir));
                if ours {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p.pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    killed += 1;
                }
            }
            if killed == 0 {
                break;
            }
            thread::sleep(Duration::from_millis(200));
        }
        // Sockets of the shims killed above (shims normally remove their own).
        for id in self.ids.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = fs::remove_file(self.shim_socket(id));
        }
        // Mounts under our dir, deepest first.
        let mut mounts: Vec<PathBuf> = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(unescape_mountinfo))
            .filter(|p| p.starts_with(&self.dir))
            .collect();
        mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in &mounts {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
        // cgroups of our namespace (runc: /sys/fs/cgroup/<ctrl>/<ns>/<id>), or our CRI cgroup
        // root (/sys/fs/cgroup/<ctrl>/<root>/<pod>/<id>).
        if let Ok(rd) = fs::read_dir("/sys/fs/cgroup") {
            for c in rd.flatten() {
                let p = c.path().join(&cg_token);
                if p.is_dir() {
                    rmdir_tree(&p);
                }
            }
        }
        if self.cri_env.is_none() {
            // (CRI instances give runc a root of their own under `dir`: `k8s.io` is shared.)
            let _ = fs::remove_dir_all(Path::new("/run/containerd/runc").join(&self.namespace));
        }
        if let Some(env) = &self.cri_env {
            env.teardown();
        }
        let still_mounted = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(unescape_mountinfo))
            .any(|p| p.starts_with(&self.dir));
        if thread::panicking() {
            let keep = workspace_target()
                .join("janus-test")
                .join("logs")
                .join(format!("{}.containerd.log", self.name));
            if fs::create_dir_all(keep.parent().unwrap()).is_ok()
                && fs::copy(&self.log, &keep).is_ok()
            {
                eprintln!("containerd log kept: {}", keep.display());
            }
        }
        if std::env::var_os("JANUS_TEST_KEEP").is_some() {
            eprintln!("JANUS_TEST_KEEP: keeping {}", self.dir.display());
        } else if still_mounted {
            eprintln!(
                "not removing {}: mounts remain under it",
                self.dir.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Force-removes its container on drop.
pub struct ContainerGuard<'a> {
    ctd: &'a Containerd,
    pub id: String,
}

impl ContainerGuard<'_> {
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl std::ops::Deref for ContainerGuard<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.id
    }
}

impl Drop for ContainerGuard<'_> {
    fn drop(&mut self) {
        self.ctd.force_remove(&self.id);
    }
}

/// Spawns containerd (`launch`: launcher and containerd's command line) in a process group of
/// its own, its output appended to `log`.
pub(crate) fn spawn_containerd(
    launch: &[std::ffi::OsString],
    path_env: &str,
    log: &Path,
) -> Result<Child> {
    let (first, rest) = launch.split_first().context("empty containerd command")?;
    let log_file = fs::OpenOptions::new().append(true).create(true).open(log)?;
    let mut cmd = Command::new(first);
    cmd.args(rest)
        .env("PATH", path_env)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .process_group(0);
    cmd.spawn().context("spawning containerd")
}

pub(crate) fn containerd_config(
    dir: &Path,
    root: &Path,
    state: &Path,
    address: &Path,
    cri: bool,
) -> String {
    let level = std::env::var("JANUS_TEST_LOG_LEVEL").unwrap_or_else(|_| "info".into());
    format!(
        r#"# Private containerd for Janus integration tests.
version = 2
root = "{root}"
state = "{state}"
oom_score = 0
# CRI only where asked for (see below); the snapshotters that can't work here only add noise
# and start time.
disabled_plugins = [
  {cri_plugin}
  # NRI listens on one fixed socket (/var/run/nri/nri.sock): containerd 2.x enables it, and two
  # instances side by side collide. Janus's tests do not use it.
  "io.containerd.nri.v1.nri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
]

[grpc]
  address = "{address}"

[ttrpc]
  address = "{address}.ttrpc"

[debug]
  address = "{dir}/debug.sock"
  level = "{level}"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/opt"

# Runtimes: ctr passes the runtime type (--runtime) straight to the v2 task manager, which
# runs `containerd-shim-runc-v2` / `containerd-shim-janus-v2` found on containerd's PATH
# (the instance's bin/ dir comes first). No per-runtime tables are needed without CRI.
[plugins."io.containerd.runtime.v2.task"]
  platforms = ["linux/amd64"]
"#,
        root = root.display(),
        state = state.display(),
        address = address.display(),
        dir = dir.display(),
        cri_plugin = if cri {
            ""
        } else {
            "\"io.containerd.grpc.v1.cri\","
        },
    )
}

// ---------------------------------------------------------------------------------------------
// containerd gRPC (only what ctr lacks)

pub(crate) mod grpc {
    use super::*;

    /// google.protobuf.Any
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Any {
        #[prost(string, tag = "1")]
        pub type_url: String,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }

    /// containerd.services.tasks.v1.UpdateTaskRequest
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct UpdateTaskRequest {
        #[prost(string, tag = "1")]
        pub container_id: String,
        #[prost(message, optional, tag = "2")]
        pub resources: Option<Any>,
        #[prost(map = "string, string", tag = "3")]
        pub annotations: HashMap<String, String>,
    }

    /// Type URL containerd registers for specs.LinuxResources (JSON-encoded value).
    const LINUX_RESOURCES: &str =
        "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";

    /// A gRPC channel to containerd's socket (`unix://` through a connector: tonic speaks
    /// HTTP/2 over any stream); the CRI client uses it too.
    pub async fn channel(socket: PathBuf) -> Result<tonic::transport::Channel> {
        tonic::transport::Endpoint::try_from("http://containerd.invalid")?
            .connect_timeout(Duration::from_secs(10))
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let socket = socket.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(socket).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await
            .with_context(|| "connecting to containerd's gRPC socket".to_string())
    }

    pub fn update_task(
        socket: &Path,
        namespace: &str,
        id: &str,
        resources: &serde_json::Value,
    ) -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let socket = socket.to_path_buf();
        let req = UpdateTaskRequest {
            container_id: id.to_string(),
            resources: Some(Any {
                type_url: LINUX_RESOURCES.into(),
                value: serde_json::to_vec(resources)?,
            }),
            annotations: HashMap::new(),
        };
        let ns = namespace.to_string();
        rt.block_on(async move {
            let channel = channel(socket).await?;
            let mut client = tonic::client::Grpc::new(channel);
            client.ready().await.context("gRPC channel not ready")?;
            let mut request = tonic::Request::new(req);
            request
                .metadata_mut()
                .insert("containerd-namespace", ns.parse()?);
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(
                "/containerd.services.tasks.v1.Tasks/Update",
            );
            let codec = tonic_prost::ProstCodec::<UpdateTaskRequest, ()>::default();
            client
                .unary(request, path, codec)
                .await
                .map_err(|s| anyhow!("Tasks.Update({id}): {:?}: {}", s.code(), s.message()))?;
            Ok(())
        })
    }
}
