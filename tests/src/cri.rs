//! CRI variant of the harness: a private containerd with its CRI plugin, driven over gRPC the way
//! kubelet drives it (`runtime.v1` through the `k8s-cri` crate), plus a client for the CRI
//! streaming server (Exec/Attach over WebSocket, k8s remotecommand `v4.channel.k8s.io`).
//!
//! Isolation between instances (CRI always works in containerd's `k8s.io` namespace):
//! - cgroups: every pod gets `cgroup_parent = /<cgroup_root>/pod<uid>` with a per-instance
//!   `cgroup_root` (`janus-jt-<pid>-<seq>`), so with the cgroupfs driver runc and Janus put
//!   containers at `/sys/fs/cgroup/<ctrl>/<cgroup_root>/pod<uid>/<container id>`;
//! - runc state: the `runc` handler's `options.Root` is under the instance dir;
//! - network: a CNI conflist of its own (bridge `jtbr<N>`, host-local `10.250.<N>.0/24`,
//!   loopback), N chosen under a lock in `/run/janus-tests/`, network namespaces under the
//!   instance's state dir (`netns_mounts_under_state_dir`). Pods get no default route: their
//!   traffic stays on the bridge (the host reaches them through it, nothing is forwarded).
//!
//! Everything a pod leaves behind is listed by [`Cri::leaks`]; [`Cri`]'s drop stops and removes
//! every pod through CRI before the containerd instance is torn down.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::net::{IpAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use k8s_cri::v1 as api;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

use crate::{
    cmd_timeout, containerd_binary, containerd_major, contains_token, poll, processes,
    run_with_timeout, unescape_mountinfo, unique_id, workspace_root, Containerd, Options, IMAGE,
    JANUS_SHIM_NAME, PAUSE_IMAGE,
};

/// The containerd namespace the CRI plugin uses.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// CRI runtime handler of our shim (RuntimeClass `janus`).
pub const JANUS_HANDLER: &str = "janus";
/// CRI runtime handler of our shim in VM mode (RuntimeClass `janus-vm`: the alias binary,
/// no config file).
pub const JANUS_VM_HANDLER: &str = "janus-vm";
/// CRI runtime handler of containerd's runc shim (proves the harness).
pub const RUNC_HANDLER: &str = "runc";
/// Where CNI plugins live on Debian (`containernetworking-plugins`).
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// Lock files for the per-instance /24s.
const SUBNET_LOCK_DIR: &str = "/run/janus-tests";
/// libcni's cache of ADD results (containerd 1.6 keeps the default).
const CNI_CACHE_RESULTS: &str = "/var/lib/cni/results";

// ---------------------------------------------------------------------------------------------
// Per-instance CRI environment (lives in `Containerd::cri_env`)

/// What a CRI instance owns besides containerd's own dirs.
#[derive(Debug)]
pub struct CriEnv {
    /// Third octet of the pod subnet `10.250.<subnet>.0/24`.
    pub subnet: u8,
    /// CNI bridge device (`jtbr<subnet>`).
    pub bridge: String,
    /// CNI network name (`janus-test-<subnet>`).
    pub network: String,
    pub cni_conf_dir: PathBuf,
    /// host-local's `dataDir`.
    pub ipam_dir: PathBuf,
    /// First component of every pod's cgroup parent.
    pub cgroup_root: String,
    /// `options.Root` of the runc handler.
    pub runc_root: PathBuf,
    /// Parent of the pods' `log_directory`.
    pub pod_logs: PathBuf,
    _lock: fs::File,
}

impl CriEnv {
    /// Pick a free /24 (under a lock held as long as the instance), write the CNI conflist;
    /// with `dual_stack`, pods also get an address in `fd00:250:<subnet, hex>::/64`.
    pub(crate) fn setup(dir: &Path, name: &str, dual_stack: bool) -> Result<CriEnv> {
        for bin in ["bridge", "host-local", "loopback"] {
            let p = Path::new(CNI_BIN_DIR).join(bin);
            if !p.exists() {
                bail!(
                    "{} is missing: install Debian's containernetworking-plugins \
                     (hack/test.sh does)",
                    p.display()
                );
            }
        }
        if !Path::new("/usr/sbin/ip").exists() && !Path::new("/sbin/ip").exists() {
            bail!("`ip` (iproute2) is missing: install iproute2");
        }
        let (subnet, lock) = lock_subnet()?;
        let bridge = format!("jtbr{subnet}");
        // We hold the lock: a device of that name is a leftover of a killed run.
        if Path::new("/sys/class/net").join(&bridge).exists() {
            let _ = run_ip(&["link", "del", &bridge]);
        }
        let network = format!("janus-test-{subnet}");
        let cni_conf_dir = dir.join("cni").join("net.d");
        let ipam_dir = dir.join("cni").join("ipam");
        let pod_logs = dir.join("pods");
        let runc_root = dir.join("runc");
        for d in [&cni_conf_dir, &ipam_dir, &pod_logs, &runc_root] {
            fs::create_dir_all(d)?;
        }
        let mut ranges = vec![serde_json::json!([{ "subnet": format!("10.250.{subnet}.0/24") }])];
        if dual_stack {
            ranges.push(serde_json::json!([{ "subnet": format!("fd00:250:{subnet:x}::/64") }]));
        }
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": network,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": bridge,
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        // No "routes": pods get no default route, only the bridge's subnets.
                        "ranges": ranges,
                        "dataDir": ipam_dir,
                    }
                },
                { "type": "loopback" }
            ]
        });
        fs::write(
            cni_conf_dir.join("10-janus-test.conflist"),
            serde_json::to_string_pretty(&conflist)?,
        )?;
        Ok(CriEnv {
            subnet,
            bridge,
            network,
            cni_conf_dir,
            ipam_dir,
            cgroup_root: format!("janus-{name}"),
            runc_root,
            pod_logs,
            _lock: lock,
        })
    }

    /// The pod subnet, e.g. `10.250.7.0/24`.
    pub fn cidr(&self) -> String {
        format!("10.250.{}.0/24", self.subnet)
    }

    /// Is `ip` inside this instance's pod subnet (IPv4, or the dual-stack IPv6 one)?
    pub fn in_subnet(&self, ip: &str) -> bool {
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => {
                let o = a.octets();
                o[0] == 10 && o[1] == 250 && o[2] == self.subnet && o[3] != 0 && o[3] != 255
            }
            Ok(IpAddr::V6(a)) => {
                let s = a.segments();
                s[..4] == [0xfd00, 0x250, u16::from(self.subnet), 0] && s[4..] != [0; 4]
            }
            Err(_) => false,
        }
    }

    /// The CRI part of the containerd config (appended to the base config).
    /// The CRI plugin's config (version 2); Janus's handlers only with `janus_handlers`.
    pub(crate) fn containerd_config(&self, janus_config: &Path, janus_handlers: bool) -> String {
        let handlers = if janus_handlers {
            format!(
                r#"    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.janus]
      runtime_type = "io.containerd.janus.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.janus.options]
        ConfigPath = "{}"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.janus-vm]
      runtime_type = "io.containerd.janus-vm.v2"
"#,
                janus_config.display()
            )
        } else {
            String::new()
        };
        format!(
            r#"
# ---- CRI (kubelet's view of containerd) -------------------------------------------------
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # Root here lacks CAP_SYS_RESOURCE: oom_score_adj can't go below containerd's own.
  restrict_oom_score_adj = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_tcp_service = true
  systemd_cgroup = false
  # Pod network namespaces under our state dir, not /var/run/netns.
  netns_mounts_under_state_dir = true
  enable_unprivileged_ports = false
  enable_unprivileged_icmp = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{runc_root}"
{handlers}  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
"#,
            pause = PAUSE_IMAGE,
            runc_root = self.runc_root.display(),
            cni_bin = CNI_BIN_DIR,
            cni_conf = self.cni_conf_dir.display(),
        )
    }

    /// Remove the bridge and libcni's cached results of our network (best effort).
    pub(crate) fn teardown(&self) {
        if Path::new("/sys/class/net").join(&self.bridge).exists() {
            if let Err(e) = run_ip(&["link", "del", &self.bridge]) {
                eprintln!("removing bridge {}: {e:#}", self.bridge);
            }
        }
        for f in self.cni_cache_files() {
            let _ = fs::remove_file(f);
        }
    }

    /// libcni result cache files of our network.
    pub fn cni_cache_files(&self) -> Vec<PathBuf> {
        let prefix = format!("{}-", self.network);
        fs::read_dir(CNI_CACHE_RESULTS)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The config of a containerd whose Janus handlers come from the deploy/ drop-in `dropin`,
/// imported as a node imports it. `main` is the instance's config and `cri` its CRI section
/// without Janus's handlers (both version 2). The drop-in is copied with its `/etc/janus/`
/// ConfigPaths pointing at deploy/janus/ (the files a node installs there).
///
/// - containerd 2.x merges imports key by key: the main config is the instance's, migrated to
///   version 3 by this containerd itself (a version 2 file cannot import a version 3 one), and
///   imports the drop-in as written.
/// - containerd 1.x replaces a whole plugin section with the imported one: as the drop-in's
///   header tells operators, the node's CRI settings (here the instance's CNI, pause image and
///   runc root) go into the drop-in; its Janus entries stay as written.
pub(crate) fn import_dropin(dir: &Path, main: String, cri: &str, dropin: &Path) -> Result<String> {
    let text = fs::read_to_string(dropin).with_context(|| format!("{}", dropin.display()))?;
    let installed = format!("{}/", workspace_root().join("deploy/janus").display());
    let text = text.replace("/etc/janus/", &installed);
    let copy = dir.join("janus-dropin.toml");
    if containerd_major() >= 2 {
        fs::write(&copy, text)?;
        let v3 = migrate_v3(dir, &format!("{main}{cri}"))?;
        let imports = format!("\nimports = ['{}']\n", copy.display());
        return Ok(v3.replacen("\nimports = []\n", &imports, 1));
    }
    let mut node: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}", dropin.display()))?;
    let ours: toml::Table = toml::from_str(cri).context("the instance's CRI config")?;
    overlay(&mut node, ours);
    fs::write(&copy, toml::to_string(&node)?)?;
    let imports = format!("version = 2\nimports = [\"{}\"]\n", copy.display());
    if !main.contains("\nversion = 2\n") {
        bail!("the instance's config has no `version = 2` line:\n{main}");
    }
    Ok(main.replacen("version = 2\n", &imports, 1))
}

/// A version 2 config as containerd 2.x migrates it to version 3 (containerd itself does it:
/// `config migrate`), with an empty `imports = []` line.
pub(crate) fn migrate_v3(dir: &Path, v2_text: &str) -> Result<String> {
    let v2 = dir.join("config-v2.toml");
    fs::write(&v2, v2_text)?;
    let mut cmd = Command::new(containerd_binary());
    cmd.arg("--config").arg(&v2).args(["config", "migrate"]);
    let o = run_with_timeout(cmd, None, Duration::from_secs(30))?;
    if !o.success() || !o.stdout.contains("\nimports = []\n") {
        bail!("containerd config migrate:\n{o}");
    }
    Ok(o.stdout)
}

/// `top`'s keys into `base`, tables merged key by key, `top` winning elsewhere.
fn overlay(base: &mut toml::Table, top: toml::Table) {
    for (k, v) in top {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => overlay(b, t),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn run_ip(args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    let o = run_with_timeout(cmd, None, Duration::from_secs(10))?;
    if !o.success() {
        bail!("{o}");
    }
    Ok(o.stdout)
}

/// A /24 of 10.250.0.0/16 nobody else uses: locked by us (flock on
/// `/run/janus-tests/cni-subnet-N.lock`, held until the returned file is dropped) and without an
/// address or route on this machine (unless on our own stale bridge).
fn lock_subnet() -> Result<(u8, fs::File)> {
    fs::create_dir_all(SUBNET_LOCK_DIR)?;
    let addrs = run_ip(&["-4", "-o", "addr", "show"]).unwrap_or_default();
    let routes = run_ip(&["-4", "-o", "route", "show", "table", "all"]).unwrap_or_default();
    let start = (std::process::id() as usize * 7 + crate::next_seq() as usize) % 254;
    for i in 0..254usize {
        let n = ((start + i) % 254 + 1) as u8;
        let own = format!("jtbr{n}");
        let prefix = format!("10.250.{n}.");
        let used = addrs
            .lines()
            .chain(routes.lines())
            .any(|l| l.contains(&prefix) && !contains_token(l, &own));
        if used {
            continue;
        }
        let path = Path::new(SUBNET_LOCK_DIR).join(format!("cni-subnet-{n}.lock"));
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: plain flock(2) on an fd we own.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            return Ok((n, f));
        }
    }
    bail!("no free /24 in 10.250.0.0/16 (all locked in {SUBNET_LOCK_DIR} or in use)")
}

// ---------------------------------------------------------------------------------------------
// The CRI client

/// A pod made by [`Cri::run_pod`].
#[derive(Debug, Clone)]
pub struct Pod {
    pub id: String,
    pub config: api::PodSandboxConfig,
}

impl Pod {
    pub fn name(&self) -> &str {
        self.config
            .metadata
            .as_ref()
            .map(|m| m.name.as_str())
            .unwrap_or("")
    }
}

/// Result of ExecSync.
#[derive(Debug, Clone)]
pub struct ExecResult {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
}

impl std::fmt::Display for ExecResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[exit {}]\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.exit_code,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// What a remotecommand (Exec/Attach) WebSocket session received.
#[derive(Debug, Clone, Default)]
pub struct StreamOutput {
    /// The subprotocol the server chose.
    pub protocol: String,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Channel 3: a JSON `metav1.Status` in v4.
    pub error: Vec<u8>,
    /// The server closed the session (vs. we stopped reading).
    pub closed_by_server: bool,
}

impl StreamOutput {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    /// The status JSON of channel 3, if any.
    pub fn status(&self) -> Option<serde_json::Value> {
        if self.error.is_empty() {
            return None;
        }
        serde_json::from_slice(&self.error).ok()
    }
    /// Exit code per the v4 status: `Success` → 0, `NonZeroExitCode` → its `ExitCode` cause.
    pub fn exit_code(&self) -> Option<i32> {
        let st = self.status()?;
        if st.get("status").and_then(|s| s.as_str()) == Some("Success") {
            return Some(0);
        }
        st.pointer("/details/causes")?
            .as_array()?
            .iter()
            .find(|c| c.get("reason").and_then(|r| r.as_str()) == Some("ExitCode"))?
            .get("message")?
            .as_str()?
            .parse()
            .ok()
    }
}

impl std::fmt::Display for StreamOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[protocol {:?}, closed by server: {}]\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- status (channel 3) ---\n{}",
            self.protocol,
            self.closed_by_server,
            self.stdout_str().trim_end(),
            self.stderr_str().trim_end(),
            String::from_utf8_lossy(&self.error)
        )
    }
}

/// A private containerd with CRI, and a CRI client to it. Every pod this makes uses `handler`.
pub struct Cri {
    /// CRI runtime handler of every pod (`janus` or `runc`).
    pub handler: String,
    rt: tokio::runtime::Runtime,
    runtime_client: RuntimeServiceClient<Channel>,
    image_client: ImageServiceClient<Channel>,
    /// Dropped last: containerd stops after the pods are gone.
    pub ctd: Containerd,
}

impl Cri {
    /// Start a CRI containerd for pods of `handler` (`janus` or `runc`); panics with the reason.
    pub fn start(handler: &str) -> Cri {
        Self::start_with(handler, false)
    }

    /// Like [`Self::start`], with dual-stack pods (an IPv6 address besides the IPv4 one).
    pub fn start_dual_stack(handler: &str) -> Cri {
        Self::start_with(handler, true)
    }

    fn start_with(handler: &str, dual_stack: bool) -> Cri {
        match Self::try_start_with(handler, dual_stack) {
            Ok(c) => c,
            Err(e) => panic!("starting a private containerd with CRI for handler {handler}: {e:#}"),
        }
    }

    /// Like [`Self::start`], with Janus's handlers from the deploy/ drop-in `dropin` (see
    /// [`import_dropin`]); `handler` can be changed between pods.
    pub fn start_with_dropin(handler: &str, dropin: &Path) -> Cri {
        let opts = Options {
            require_janus: true,
            cri: true,
            dual_stack: false,
            dropin: Some(dropin.to_path_buf()),
            ..Options::default()
        };
        match Self::try_start_opts(handler, opts) {
            Ok(c) => c,
            Err(e) => panic!("starting a CRI containerd with {}: {e:#}", dropin.display()),
        }
    }

    /// Like [`Self::start`], with containerd run under `launcher` (e.g. in a systemd node).
    pub fn start_under(handler: &str, launcher: Vec<std::ffi::OsString>) -> Result<Cri> {
        let opts = Options {
            require_janus: true,
            cri: true,
            dual_stack: false,
            launcher,
            ..Options::default()
        };
        Self::try_start_opts(handler, opts)
    }

    /// Like [`Self::start`], on a node root prepared by `prepare` (see [`Options::node_root`]).
    pub fn start_on_node(handler: &str, root: &Path, prepare: crate::Prepare) -> Result<Cri> {
        let opts = Options {
            require_janus: true,
            cri: true,
            node_root: Some(root.to_path_buf()),
            prepare: Some(prepare),
            ..Options::default()
        };
        Self::try_start_opts(handler, opts)
    }

    pub fn try_start(handler: &str) -> Result<Cri> {
        Self::try_start_with(handler, false)
    }

    fn try_start_with(handler: &str, dual_stack: bool) -> Result<Cri> {
        let opts = Options {
            require_janus: handler.contains("janus"),
            cri: true,
            dual_stack,
            ..Options::default()
        };
        Self::try_start_opts(handler, opts)
    }

    fn try_start_opts(handler: &str, opts: Options) -> Result<Cri> {
        let ctd = Containerd::start(opts)?;
        if handler.starts_with(JANUS_HANDLER) && ctd.shim.is_none() {
            bail!("{JANUS_SHIM_NAME} not found");
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let socket = ctd.address.clone();
        let channel = rt.block_on(crate::containerd::grpc::channel(socket))?;
        let cri = Cri {
            handler: handler.to_string(),
            runtime_client: RuntimeServiceClient::new(channel.clone()),
            image_client: ImageServiceClient::new(channel),
            rt,
            ctd,
        };
        cri.wait_ready()?;
        Ok(cri)
    }

    /// The instance's CRI environment.
    pub fn env(&self) -> &CriEnv {
        self.ctd
            .cri_env
            .as_ref()
            .expect("a CRI instance has a CriEnv")
    }

    /// Last lines of containerd's log (shim logs included).
    pub fn log_tail(&self, n: usize) -> String {
        self.ctd.log_tail(n)
    }

    /// Panic with `e` and containerd's log.
    #[track_caller]
    pub fn fail(&self, e: impl std::fmt::Display) -> ! {
        panic!("{e}\n--- containerd log (tail) ---\n{}", self.log_tail(40))
    }

    fn call<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T> {
        let timeout = cmd_timeout();
        self.rt.block_on(async {
            match tokio::time::timeout(timeout, f).await {
                Err(_) => Err(anyhow!("CRI {what}: no answer within {timeout:?}")),
                Ok(Err(s)) => Err(anyhow!("CRI {what}: {:?}: {}", s.code(), s.message())),
                Ok(Ok(r)) => Ok(r.into_inner()),
            }
        })
    }

    fn rc(&self) -> RuntimeServiceClient<Channel> {
        self.runtime_client.clone()
    }

    /// CRI up, runtime and network ready, version runtime.v1; then the images imported into
    /// `k8s.io` and seen by CRI.
    fn wait_ready(&self) -> Result<()> {
        let v = self.call(
            "Version",
            self.rc().version(api::VersionRequest {
                version: "v1".into(),
            }),
        )?;
        if v.runtime_api_version != "v1" {
            bail!(
                "CRI serves runtime API {:?}, want v1: {v:?}",
                v.runtime_api_version
            );
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let st = self.call(
                "Status",
                self.rc().status(api::StatusRequest { verbose: false }),
            )?;
            let conds = st.status.map(|s| s.conditions).unwrap_or_default();
            let ready = |t: &str| conds.iter().any(|c| c.r#type == t && c.status);
            if ready("RuntimeReady") && ready("NetworkReady") {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "CRI not ready within 30s: {conds:?}\n--- containerd log ---\n{}",
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Import only now: CRI learns about images from containerd's image events.
        self.ctd
            .import_image(&crate::ensure_image()?, IMAGE)
            .context("importing the busybox image into k8s.io")?;
        self.ctd
            .import_image(&crate::ensure_pause_image()?, PAUSE_IMAGE)
            .context("importing the pause image into k8s.io")?;
        for image in [IMAGE, PAUSE_IMAGE] {
            let seen = poll(Duration::from_secs(20), || {
                let r = self
                    .call(
                        "ImageStatus",
                        self.image_client
                            .clone()
                            .image_status(api::ImageStatusRequest {
                                image: Some(api::ImageSpec {
                                    image: image.into(),
                                    ..Default::default()
                                }),
                                verbose: false,
                            }),
                    )
                    .ok()?;
                r.image.map(|_| ())
            });
            if seen.is_none() {
                bail!(
                    "CRI ImageStatus does not know {image} after `ctr -n k8s.io images import`\n\
                     --- containerd log ---\n{}",
                    self.log_tail(40)
                );
            }
        }
        Ok(())
    }

    // ---- pods ----------------------------------------------------------------------------

    /// A kubelet-like pod config: metadata (unique uid), hostname, log directory, cgroup parent
    /// under the instance's cgroup root, pod network/IPC, container PID namespaces, seccomp
    /// Unconfined (kubelet's default without SeccompDefault).
    pub fn pod_config(&self, name: &str) -> api::PodSandboxConfig {
        let uid = unique_id("uid").replace('-', "");
        let env = self.env();
        let log_dir = env.pod_logs.join(format!("default_{name}_{uid}"));
        let mut labels = HashMap::new();
        labels.insert("io.kubernetes.pod.name".to_string(), name.to_string());
        labels.insert("io.kubernetes.pod.namespace".to_string(), "default".into());
        labels.insert("io.kubernetes.pod.uid".to_string(), uid.clone());
        api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: name.into(),
                uid: uid.clone(),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: log_dir.display().to_string(),
            labels,
            linux: Some(api::LinuxPodSandboxConfig {
                cgroup_parent: format!("/{}/pod{uid}", env.cgroup_root),
                security_context: Some(api::LinuxSandboxSecurityContext {
                    namespace_options: Some(api::NamespaceOption {
                        network: api::NamespaceMode::Pod as i32,
                        pid: api::NamespaceMode::Container as i32,
                        ipc: api::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    seccomp: Some(profile(api::security_profile::ProfileType::Unconfined)),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// RunPodSandbox with this instance's handler; panics on error.
    pub fn run_pod(&self, config: api::PodSandboxConfig) -> Pod {
        self.try_run_pod(config)
            .unwrap_or_else(|e| self.fail(format!("{e:#}")))
    }

    pub fn try_run_pod(&self, config: api::PodSandboxConfig) -> Result<Pod> {
        fs::create_dir_all(&config.log_directory)?;
        let r = self.call(
            "RunPodSandbox",
            self.rc().run_pod_sandbox(api::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: self.handler.clone(),
            }),
        )?;
        // (For the socket cleanup of shims killed at teardown.)
        self.ctd.remember(&r.pod_sandbox_id);
        Ok(Pod {
            id: r.pod_sandbox_id,
            config,
        })
    }

    pub fn try_pod_status(&self, id: &str) -> Result<api::PodSandboxStatusResponse> {
        self.call(
            "PodSandboxStatus",
            self.rc().pod_sandbox_status(api::PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: true,
            }),
        )
    }

    pub fn pod_status(&self, id: &str) -> api::PodSandboxStatus {
        self.try_pod_status(id)
            .unwrap_or_else(|e| self.fail(format!("{e:#}")))
            .status
            .unwrap_or_else(|| self.fail(format!("PodSandboxStatus({id}) without status")))
    }

    /// The pod's IP (PodSandboxStatus.network.ip); panics when empty.
    /// Every IP of the pod (PodSandboxStatus: the primary, then the additional ones).
    pub fn pod_ips(&self, id: &str) -> Vec<String> {
        let n = self.pod_status(id).network.unwrap_or_default();
        std::iter::once(n.ip)
            .chain(n.additional_ips.into_iter().map(|a| a.ip))
            .filter(|ip| !ip.is_empty())
            .collect()
    }

    pub fn pod_ip(&self, id: &str) -> String {
        let st = self.pod_status(id);
        let ip = st.network.map(|n| n.ip).unwrap_or_default();
        if ip.is_empty() {
            self.fail(format!("pod {id} has no IP in PodSandboxStatus"));
        }
        ip
    }

    pub fn try_stop_pod(&self, id: &str) -> Result<()> {
        self.call(
            "StopPodSandbox",
            self.rc().stop_pod_sandbox(api::StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            }),
        )
        .map(|_| ())
    }

    pub fn try_remove_pod(&self, id: &str) -> Result<()> {
        self.call(
            "RemovePodSandbox",
            self.rc().remove_pod_sandbox(api::RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            }),
        )
        .map(|_| ())
    }

    /// StopPodSandbox + RemovePodSandbox, then (as kubelet does) remove the pod cgroup dirs.
    pub fn stop_remove_pod(&self, pod: &Pod) {
        if let Err(e) = self.try_stop_pod(&pod.id) {
            self.fail(format!("{e:#}"));
        }
        if let Err(e) = self.try_remove_pod(&pod.id) {
            self.fail(format!("{e:#}"));
        }
        self.remove_pod_cgroups(pod);
    }

    /// Remove the (empty) pod-level cgroup dirs under the cgroup parent, kubelet's job.
    pub fn remove_pod_cgroups(&self, pod: &Pod) {
        let parent = pod
            .config
            .linux
            .as_ref()
            .map(|l| l.cgroup_parent.trim_start_matches('/').to_string())
            .unwrap_or_default();
        if parent.is_empty() {
            return;
        }
        for d in cgroup_controller_dirs() {
            let _ = fs::remove_dir(d.join(&parent));
        }
    }

    pub fn list_pods(&self) -> Vec<api::PodSandbox> {
        self.call(
            "ListPodSandbox",
            self.rc()
                .list_pod_sandbox(api::ListPodSandboxRequest { filter: None }),
        )
        .map(|r| r.items)
        .unwrap_or_else(|e| self.fail(format!("{e:#}")))
    }

    pub fn list_containers(&self) -> Vec<api::Container> {
        self.call(
            "ListContainers",
            self.rc()
                .list_containers(api::ListContainersRequest { filter: None }),
        )
        .map(|r| r.containers)
        .unwrap_or_else(|e| self.fail(format!("{e:#}")))
    }

    // ---- containers ------------------------------------------------------------------------

    /// A kubelet-like container config running `cmd` (as the image entrypoint override) in the
    /// busybox image, logging to `<name>/0.log`, kubelet's BestEffort resources.
    pub fn container_config(&self, name: &str, cmd: &[&str]) -> api::ContainerConfig {
        api::ContainerConfig {
            metadata: Some(api::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(api::ImageSpec {
                image: IMAGE.into(),
                ..Default::default()
            }),
            command: cmd.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}/0.log"),
            linux: Some(api::LinuxContainerConfig {
                resources: Some(api::LinuxContainerResources {
                    cpu_period: 100_000,
                    cpu_shares: 2,
                    oom_score_adj: 1000,
                    ..Default::default()
                }),
                security_context: Some(api::LinuxContainerSecurityContext {
                    namespace_options: Some(api::NamespaceOption {
                        network: api::NamespaceMode::Pod as i32,
                        pid: api::NamespaceMode::Container as i32,
                        ipc: api::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    seccomp: Some(profile(api::security_profile::ProfileType::Unconfined)),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }
    }

    /// Host path of a container's CRI log file.
    pub fn log_file(&self, pod: &Pod, config: &api::ContainerConfig) -> PathBuf {
        Path::new(&pod.config.log_directory).join(&config.log_path)
    }

    pub fn try_create_container(&self, pod: &Pod, config: api::ContainerConfig) -> Result<String> {
        // kubelet creates the container's log dir.
        if let Some(parent) = self.log_file(pod, &config).parent() {
            fs::create_dir_all(parent)?;
        }
        let r = self.call(
            "CreateContainer",
            self.rc().create_container(api::CreateContainerRequest {
                pod_sandbox_id: pod.id.clone(),
                config: Some(config),
                sandbox_config: Some(pod.config.clone()),
            }),
        )?;
        self.ctd.remember(&r.container_id);
        Ok(r.container_id)
    }

    pub fn try_start_container(&self, id: &str) -> Result<()> {
        self.call(
            "StartContainer",
            self.rc().start_container(api::StartContainerRequest {
                container_id: id.into(),
            }),
        )
        .map(|_| ())
    }

    /// CreateContainer + StartContainer; panics on error.
    pub fn run_container(&self, pod: &Pod, config: api::ContainerConfig) -> String {
        let id = self
            .try_create_container(pod, config)
            .unwrap_or_else(|e| self.fail(format!("{e:#}")));
        if let Err(e) = self.try_start_container(&id) {
            self.fail(format!("{e:#}"));
        }
        id
    }

    pub fn try_container_status(&self, id: &str) -> Result<api::ContainerStatusResponse> {
        self.call(
            "ContainerStatus",
            self.rc().container_status(api::ContainerStatusRequest {
                container_id: id.into(),
                verbose: true,
            }),
        )
    }

    pub fn container_status(&self, id: &str) -> api::ContainerStatus {
        self.try_container_status(id)
            .unwrap_or_else(|e| self.fail(format!("{e:#}")))
            .status
            .unwrap_or_else(|| self.fail(format!("ContainerStatus({id}) without status")))
    }

    /// The verbose `info` JSON of ContainerStatus (pid, runtimeSpec, ...).
    pub fn container_info(&self, id: &str) -> serde_json::Value {
        let r = self
            .try_container_status(id)
            .unwrap_or_else(|e| self.fail(format!("{e:#}")));
        let raw = r.info.get("info").cloned().unwrap_or_default();
        serde_json::from_str(&raw)
            .unwrap_or_else(|e| self.fail(format!("ContainerStatus info of {id}: {e}: {raw}")))
    }

    /// Host pid of the container's init process.
    pub fn container_pid(&self, id: &str) -> u32 {
        let info = self.container_info(id);
        match info.get("pid").and_then(|p| p.as_u64()) {
            Some(p) if p > 0 => p as u32,
            _ => self.fail(format!("no pid in ContainerStatus info of {id}: {info}")),
        }
    }

    /// Wait until the container is in `state`; panics with its last status otherwise.
    pub fn wait_container_state(
        &self,
        id: &str,
        state: api::ContainerState,
        timeout: Duration,
    ) -> api::ContainerStatus {
        let mut last = None;
        let ok = poll(timeout, || {
            let st = self.container_status(id);
            let hit = st.state == state as i32;
            last = Some(st.clone());
            hit.then_some(st)
        });
        ok.unwrap_or_else(|| {
            self.fail(format!(
                "container {id} not {state:?} within {timeout:?}; last status: {last:#?}"
            ))
        })
    }

    /// Wait for CONTAINER_EXITED.
    pub fn wait_exited(&self, id: &str) -> api::ContainerStatus {
        self.wait_container_state(id, api::ContainerState::ContainerExited, cmd_timeout())
    }

    /// Wait for CONTAINER_RUNNING.
    pub fn wait_running(&self, id: &str) -> api::ContainerStatus {
        self.wait_container_state(id, api::ContainerState::ContainerRunning, cmd_timeout())
    }

    pub fn try_stop_container(&self, id: &str, timeout_s: i64) -> Result<()> {
        self.call(
            "StopContainer",
            self.rc().stop_container(api::StopContainerRequest {
                container_id: id.into(),
                timeout: timeout_s,
            }),
        )
        .map(|_| ())
    }

    pub fn try_remove_container(&self, id: &str) -> Result<()> {
        self.call(
            "RemoveContainer",
            self.rc().remove_container(api::RemoveContainerRequest {
                container_id: id.into(),
            }),
        )
        .map(|_| ())
    }

    pub fn try_update_resources(
        &self,
        id: &str,
        resources: api::LinuxContainerResources,
    ) -> Result<()> {
        self.call(
            "UpdateContainerResources",
            self.rc()
                .update_container_resources(api::UpdateContainerResourcesRequest {
                    container_id: id.into(),
                    linux: Some(resources),
                    ..Default::default()
                }),
        )
        .map(|_| ())
    }

    // ---- exec ------------------------------------------------------------------------------

    pub fn try_exec_sync(&self, id: &str, cmd: &[&str]) -> Result<ExecResult> {
        let r = self.call(
            "ExecSync",
            self.rc().exec_sync(api::ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: cmd_timeout().as_secs() as i64 - 5,
            }),
        )?;
        Ok(ExecResult {
            stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
            exit_code: r.exit_code,
        })
    }

    /// ExecSync; panics on a CRI error (not on a non-zero exit code).
    pub fn exec_sync(&self, id: &str, cmd: &[&str]) -> ExecResult {
        self.try_exec_sync(id, cmd)
            .unwrap_or_else(|e| self.fail(format!("ExecSync {cmd:?} in {id}: {e:#}")))
    }

    /// ExecSync that must exit 0; returns stdout.
    #[track_caller]
    pub fn exec_ok(&self, id: &str, cmd: &[&str]) -> String {
        let r = self.exec_sync(id, cmd);
        if r.exit_code != 0 {
            self.fail(format!("ExecSync {cmd:?} in {id} failed:\n{r}"));
        }
        r.stdout
    }

    /// CRI Exec: the streaming URL.
    pub fn exec_url(&self, req: api::ExecRequest) -> String {
        self.call("Exec", self.rc().exec(req))
            .unwrap_or_else(|e| self.fail(format!("{e:#}")))
            .url
    }

    /// CRI Attach: the streaming URL.
    pub fn attach_url(&self, req: api::AttachRequest) -> String {
        self.call("Attach", self.rc().attach(req))
            .unwrap_or_else(|e| self.fail(format!("{e:#}")))
            .url
    }

    /// CRI PortForward: the streaming URL for `port` of the pod.
    pub fn port_forward_url(&self, pod: &Pod, port: i32) -> String {
        let req = api::PortForwardRequest {
            pod_sandbox_id: pod.id.clone(),
            port: vec![port],
        };
        self.call("PortForward", self.rc().port_forward(req))
            .unwrap_or_else(|e| self.fail(format!("{e:#}")))
            .url
    }

    /// One port-forward connection over WebSocket (k8s portforward, channel 0 data and 1
    /// error per port, each channel's first message the port number): send `input`, collect
    /// what comes back until `until` holds or the server ends it. (data, error text).
    pub fn port_forward(
        &self,
        url: &str,
        input: &[u8],
        until: impl Fn(&[u8]) -> bool,
        timeout: Duration,
    ) -> Result<(Vec<u8>, String)> {
        self.rt
            .block_on(port_forward_session(url, input, until, timeout))
    }

    /// Talk remotecommand (`v4.channel.k8s.io`) over WebSocket to a streaming `url`: send
    /// `stdin` (if not empty) on channel 0, collect channels 1-3 until the server closes or
    /// `until` holds (then we close).
    pub fn stream(
        &self,
        url: &str,
        stdin: &[u8],
        until: impl Fn(&StreamOutput) -> bool,
        timeout: Duration,
    ) -> Result<StreamOutput> {
        self.rt.block_on(remotecommand(url, stdin, until, timeout))
    }

    // ---- leaks -----------------------------------------------------------------------------

    /// Everything left of this instance's pods: CRI objects, containerd containers, shims and
    /// container processes, mounts, container cgroups, netns, CNI state and bridge ports,
    /// bundles, shim sockets, CRI dirs. `ids`: pod and container ids that existed.
    pub fn leaks(&self, ids: &[String]) -> Vec<String> {
        let mut v = Vec::new();
        let env = self.env();
        let ctd = &self.ctd;
        for p in self.list_pods() {
            v.push(format!("CRI pod sandbox {} ({:?})", p.id, p.metadata));
        }
        for c in self.list_containers() {
            v.push(format!("CRI container {} ({:?})", c.id, c.metadata));
        }
        let o = ctd.ctr(&["containers", "ls", "-q"]);
        for l in o.stdout.lines().filter(|l| !l.trim().is_empty()) {
            v.push(format!("containerd container {l}"));
        }
        let addr = ctd.address.display().to_string();
        for p in processes() {
            if p.pid == std::process::id() {
                continue;
            }
            if crate::contains_token_path(&p.cmdline, &addr) {
                v.push(format!("shim process {}: {}", p.pid, p.cmdline));
            } else if contains_token(&p.cgroup, &env.cgroup_root)
                || ids
                    .iter()
                    .any(|id| contains_token(&p.cgroup, id) || contains_token(&p.cmdline, id))
            {
                v.push(format!("process {}: {}", p.pid, p.cmdline));
            }
        }
        if let Ok(mi) = fs::read_to_string("/proc/self/mountinfo") {
            for l in mi.lines() {
                let mp = l
                    .split(' ')
                    .nth(4)
                    .map(unescape_mountinfo)
                    .unwrap_or_default();
                if mp.starts_with(&ctd.dir) || ids.iter().any(|id| contains_token(l, id)) {
                    v.push(format!("mount: {l}"));
                }
            }
        }
        // Container cgroups: /<root>/<pod>/<container> (pod dirs are kubelet's, removed by
        // `stop_remove_pod`).
        for c in cgroup_controller_dirs() {
            let root = c.join(&env.cgroup_root);
            for pod in read_dirs(&root) {
                for ctr in read_dirs(&pod) {
                    v.push(format!("cgroup: {}", ctr.display()));
                }
            }
        }
        if !ids.is_empty() {
            for d in find_cgroups_any(ids) {
                if !d.starts_with("/sys/fs/cgroup")
                    || !contains_token(&d.display().to_string(), &env.cgroup_root)
                {
                    v.push(format!("cgroup (outside the pod parent): {}", d.display()));
                }
            }
        }
        // netns_mounts_under_state_dir: <CRI state dir>/netns/cni-<uuid>.
        for netns in [
            ctd.state.join("io.containerd.grpc.v1.cri").join("netns"),
            ctd.state.join("netns"),
        ] {
            for e in read_entries(&netns) {
                v.push(format!("netns: {}", e.display()));
            }
        }
        for f in env.cni_cache_files() {
            v.push(format!("CNI cache: {}", f.display()));
        }
        for f in read_entries(&env.ipam_dir.join(&env.network)) {
            let n = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if n != "lock" && !n.starts_with("last_reserved_ip") {
                v.push(format!("host-local reservation: {}", f.display()));
            }
        }
        for f in read_entries(&Path::new("/sys/class/net").join(&env.bridge).join("brif")) {
            v.push(format!("bridge port: {}", f.display()));
        }
        for id in ids {
            let bundle = ctd.bundle_dir(id);
            if bundle.exists() {
                v.push(format!("bundle dir: {}", bundle.display()));
            }
            let sock = ctd.shim_socket(id);
            if sock.exists() {
                v.push(format!("shim socket: {}", sock.display()));
            }
            for base in [&ctd.root, &ctd.state] {
                for kind in ["sandboxes", "containers"] {
                    let d = base.join("io.containerd.grpc.v1.cri").join(kind).join(id);
                    if d.exists() {
                        v.push(format!("CRI dir: {}", d.display()));
                    }
                }
            }
        }
        v
    }

    /// Shim processes of this containerd (their command line names its socket): pid,
    /// executable, command line.
    pub fn shim_processes(&self) -> Vec<(u32, PathBuf, String)> {
        let addr = self.ctd.address.display().to_string();
        processes()
            .into_iter()
            .filter(|p| {
                p.pid != std::process::id() && crate::contains_token_path(&p.cmdline, &addr)
            })
            .map(|p| {
                let exe = fs::read_link(format!("/proc/{}/exe", p.pid)).unwrap_or_default();
                (p.pid, exe, p.cmdline)
            })
            .collect()
    }

    /// Wait (up to `timeout`) for [`Self::leaks`] to be empty; panic listing what is left.
    pub fn assert_no_leaks(&self, ids: &[String], timeout: Duration) {
        let mut last = Vec::new();
        if poll(timeout, || {
            last = self.leaks(ids);
            last.is_empty().then_some(())
        })
        .is_none()
        {
            self.fail(format!(
                "pods left things behind after StopPodSandbox/RemovePodSandbox:\n  {}",
                last.join("\n  ")
            ));
        }
    }

    /// Check that traffic to `ip` stays on our bridge (the route goes through it), before the
    /// host sends anything there.
    pub fn assert_route_via_bridge(&self, ip: &str) {
        let env = self.env();
        if !env.in_subnet(ip) {
            self.fail(format!("pod IP {ip} is not in our subnet {}", env.cidr()));
        }
        let r = ip_route_get(ip).unwrap_or_else(|e| self.fail(format!("ip route get {ip}: {e:#}")));
        if !contains_token(&r, &env.bridge) {
            self.fail(format!(
                "the route to {ip} does not go through bridge {} (refusing to send): {r}",
                env.bridge
            ));
        }
    }

    /// Connect from the host to `ip:port` (after [`Self::assert_route_via_bridge`]) and read
    /// until EOF; retries connection refusals until `timeout`.
    pub fn host_read_tcp(&self, ip: &str, port: u16, timeout: Duration) -> Result<String> {
        self.assert_route_via_bridge(ip);
        let addr = std::net::SocketAddr::new(ip.parse()?, port);
        let deadline = Instant::now() + timeout;
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(mut s) => {
                    s.set_read_timeout(Some(Duration::from_secs(5)))?;
                    let mut buf = String::new();
                    s.read_to_string(&mut buf)
                        .with_context(|| format!("reading from {addr}"))?;
                    return Ok(buf);
                }
                Err(_) if Instant::now() < deadline => {
                    // Not listening yet.
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(anyhow!("connecting to {addr} from the host: {e}")),
            }
        }
    }
}

impl Drop for Cri {
    fn drop(&mut self) {
        // Pods first, through CRI, while containerd and the shims can clean up properly.
        let pods = self
            .call(
                "ListPodSandbox",
                self.rc()
                    .list_pod_sandbox(api::ListPodSandboxRequest { filter: None }),
            )
            .map(|r| r.items)
            .unwrap_or_default();
        for p in pods {
            if let Err(e) = self.try_stop_pod(&p.id) {
                eprintln!("cleanup: {e:#}");
            }
            if let Err(e) = self.try_remove_pod(&p.id) {
                eprintln!("cleanup: {e:#}");
            }
        }
    }
}

/// A seccomp/AppArmor profile of `t`.
pub fn profile(t: api::security_profile::ProfileType) -> api::SecurityProfile {
    api::SecurityProfile {
        profile_type: t as i32,
        localhost_ref: String::new(),
    }
}

fn ip_route_get(ip: &str) -> Result<String> {
    let family = if ip.contains(':') { "-6" } else { "-4" };
    run_ip(&[family, "route", "get", ip])
}

pub fn cgroup_controller_dirs() -> Vec<PathBuf> {
    read_dirs(Path::new("/sys/fs/cgroup"))
}

fn read_entries(d: &Path) -> Vec<PathBuf> {
    fs::read_dir(d)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

fn read_dirs(d: &Path) -> Vec<PathBuf> {
    fs::read_dir(d)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// cgroup dirs (any controller, depth <= 8) whose name contains one of `ids` as a token.
fn find_cgroups_any(ids: &[String]) -> Vec<PathBuf> {
    fn walk(dir: &Path, ids: &[String], depth: usize, out: &mut Vec<PathBuf>) {
        if depth > 8 {
            return;
        }
        for d in read_dirs(dir) {
            let name = d
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if ids.iter().any(|id| contains_token(&name, id)) {
                out.push(d.clone());
            }
            walk(&d, ids, depth + 1, out);
        }
    }
    let mut out = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), ids, 0, &mut out);
    out
}

// ---------------------------------------------------------------------------------------------
// remotecommand over WebSocket

/// The k8s remotecommand subprotocol we speak (binary frames, channel byte first, status JSON
/// on channel 3).
pub const REMOTECOMMAND_PROTOCOL: &str = "v4.channel.k8s.io";

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket to the local streaming server at `url` (an `http://127.0.0.1:...` URL from
/// CRI), speaking the k8s channel subprotocol; with the protocol the server chose.
async fn ws_connect(url: &str) -> Result<(Ws, String)> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::HeaderValue;

    // Only ever talk to the local streaming server.
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("streaming URL {url:?} is not http://"))?;
    let host = rest.split('/').next().unwrap_or("");
    if !(host.starts_with("127.0.0.1:") || host.starts_with("[::1]:")) {
        bail!("streaming URL {url:?} is not on the loopback address (refusing)");
    }
    let ws_url = format!("ws://{rest}");
    let mut req = ws_url
        .as_str()
        .into_client_request()
        .with_context(|| format!("building a WebSocket request for {ws_url}"))?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(REMOTECOMMAND_PROTOCOL),
    );
    let (ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .with_context(|| format!("WebSocket connect to {ws_url}"))?;
    let protocol = resp
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    Ok((ws, protocol))
}

async fn port_forward_session(
    url: &str,
    input: &[u8],
    until: impl Fn(&[u8]) -> bool,
    timeout: Duration,
) -> Result<(Vec<u8>, String)> {
    use tokio_tungstenite::tungstenite::Message;

    let (mut data, mut error) = (Vec::new(), Vec::new());
    let session = async {
        let (mut ws, _) = ws_connect(url).await?;
        let mut seen_port = [false; 2];
        if !input.is_empty() {
            let mut m = vec![0u8];
            m.extend_from_slice(input);
            ws.send(Message::Binary(m.into()))
                .await
                .context("sending")?;
        }
        while !until(&data) {
            match ws.next().await {
                None | Some(Ok(Message::Close(_))) => break,
                Some(Err(e)) => {
                    use tokio_tungstenite::tungstenite::Error as E;
                    match e {
                        E::ConnectionClosed | E::AlreadyClosed | E::Protocol(_) | E::Io(_) => break,
                        e => return Err(anyhow!("WebSocket read: {e}")),
                    }
                }
                Some(Ok(Message::Binary(b))) => {
                    let Some((&ch, rest)) = b.split_first() else {
                        continue;
                    };
                    let Some(seen) = seen_port.get_mut(ch as usize) else {
                        continue;
                    };
                    if !*seen {
                        // The port number, little-endian, opens each channel.
                        *seen = true;
                        continue;
                    }
                    if ch == 0 {
                        data.extend_from_slice(rest)
                    } else {
                        error.extend_from_slice(rest)
                    }
                }
                Some(Ok(_)) => {}
            }
        }
        let _ = ws.close(None).await;
        Ok::<_, anyhow::Error>(())
    };
    match tokio::time::timeout(timeout, session).await {
        Ok(Ok(())) => Ok((data, String::from_utf8_lossy(&error).into_owned())),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(anyhow!(
            "port-forward did not finish within {timeout:?}; data {:?}, error {:?}",
            String::from_utf8_lossy(&data),
            String::from_utf8_lossy(&error)
        )),
    }
}

async fn remotecommand(
    url: &str,
    stdin: &[u8],
    until: impl Fn(&StreamOutput) -> bool,
    timeout: Duration,
) -> Result<StreamOutput> {
    use tokio_tungstenite::tungstenite::Message;

    let mut out = StreamOutput::default();
    let session = async {
        let (mut ws, protocol) = ws_connect(url).await?;
        out.protocol = protocol;
        if !stdin.is_empty() {
            let mut m = Vec::with_capacity(stdin.len() + 1);
            m.push(0u8);
            m.extend_from_slice(stdin);
            ws.send(Message::Binary(m.into()))
                .await
                .context("sending stdin")?;
        }
        loop {
            if until(&out) {
                let _ = ws.close(None).await;
                break;
            }
            match ws.next().await {
                None => {
                    out.closed_by_server = true;
                    break;
                }
                Some(Err(e)) => {
                    use tokio_tungstenite::tungstenite::Error as E;
                    match e {
                        E::ConnectionClosed | E::AlreadyClosed | E::Protocol(_) | E::Io(_) => {
                            out.closed_by_server = true;
                            break;
                        }
                        e => return Err(anyhow!("WebSocket read: {e}")),
                    }
                }
                Some(Ok(Message::Binary(b))) => {
                    if let Some((&ch, data)) = b.split_first() {
                        match ch {
                            1 => out.stdout.extend_from_slice(data),
                            2 => out.stderr.extend_from_slice(data),
                            3 => out.error.extend_from_slice(data),
                            _ => {}
                        }
                    }
                }
                Some(Ok(Message::Close(_))) => {
                    out.closed_by_server = true;
                    break;
                }
                Some(Ok(_)) => {}
            }
        }
        Ok::<_, anyhow::Error>(())
    };
    match tokio::time::timeout(timeout, session).await {
        Ok(Ok(())) => Ok(out),
        Ok(Err(e)) => Err(e.context(format!("remotecommand session so far: {out}"))),
        Err(_) => Err(anyhow!(
            "remotecommand session did not finish within {timeout:?}; so far: {out}"
        )),
    }
}
