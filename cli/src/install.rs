//! `janus install` / `janus uninstall`: put Janus on a node and take it off again, leaving the
//! node byte for byte as it was. The installer DaemonSet (deploy/installer/) runs them with the
//! host's root mounted at `--host-root`.
//!
//! Install copies the payload (`--from`: bin/, guest/, etc/) to the host, adds Janus's two CRI
//! runtime handlers to containerd's config, restarts containerd and labels the node. What it
//! changed is recorded in a manifest under the host's /var/lib/janus/install: every file and
//! directory it made, and a copy of every file it replaced. Uninstall undoes exactly that.
//! Installing again first undoes the previous install, so the recorded originals stay the
//! node's own.
//!
//! containerd's config, by what the node has:
//! - version 3 (containerd 2.x): a drop-in with only the handlers (2.x merges imports key by key)
//!   and its path added to `imports`;
//! - version 2 (containerd 1.6/1.7, also read by 2.x): the handlers written into config.toml
//!   itself, since 1.x replaces a whole plugin section with an imported one;
//! - no config.toml: one is made for the containerd version found (`--containerd-major`, else
//!   the host's `containerd --version`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Where the manifest and the replaced files' copies live (host path).
const STATE: &str = "/var/lib/janus/install";
/// The node label a RuntimeClass's nodeSelector can use.
pub const LABEL: &str = "janus.runtime/installed";
const SHIM: &str = "containerd-shim-janus-v2";
const SHIM_VM: &str = "containerd-shim-janus-vm-v2";

/// Where things go, and how the node sees them.
#[derive(Debug, Clone)]
pub struct Target {
    /// The host's root as this process sees it (`/host` in the DaemonSet).
    pub host_root: PathBuf,
    /// The host's root as containerd and the shim see it (`/` on a node; tests use a
    /// directory): the paths written into configs start here.
    pub node_root: PathBuf,
    /// containerd's config, a host path.
    pub containerd_config: PathBuf,
    /// containerd's major version if known (else found from the host's binary).
    pub containerd_major: Option<u32>,
    /// Shell command that restarts containerd; `None`: do not.
    pub restart: Option<String>,
    /// Node to label (`$NODE_NAME` in the DaemonSet); `None`: do not.
    pub node: Option<String>,
}

impl Target {
    fn host(&self, p: &str) -> PathBuf {
        self.host_root.join(p.trim_start_matches('/'))
    }
    fn node_view(&self, p: &str) -> PathBuf {
        self.node_root.join(p.trim_start_matches('/'))
    }
}

/// What an install changed (host paths, relative to the host root).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Manifest {
    /// Files and links it made, in order.
    created: Vec<String>,
    /// Directories it made, in order.
    dirs: Vec<String>,
    /// Files it replaced: (path, copy of the original under STATE).
    replaced: Vec<(String, String)>,
}

/// Records changes as they are made.
struct Changes<'a> {
    t: &'a Target,
    m: Manifest,
}

impl Changes<'_> {
    fn mkdirs(&mut self, p: &str) -> Result<()> {
        let mut acc = PathBuf::from("/");
        for c in Path::new(p).components().skip(1) {
            acc.push(c);
            let host = self.t.host(&acc.to_string_lossy());
            if !host.exists() {
                fs::create_dir(&host).with_context(|| format!("mkdir {}", host.display()))?;
                self.m.dirs.push(acc.to_string_lossy().into());
            }
        }
        Ok(())
    }

    /// Writes `bytes` at host path `p` (mode `mode`), keeping a copy of what was there.
    fn write(&mut self, p: &str, bytes: &[u8], mode: u32) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let host = self.t.host(p);
        self.mkdirs(&parent(p))?;
        match fs::symlink_metadata(&host) {
            Ok(_) if fs::read(&host).is_ok_and(|old| old == bytes) => return Ok(()),
            Ok(_) => self.keep(p)?,
            Err(_) => self.m.created.push(p.into()),
        }
        fs::write(&host, bytes).with_context(|| format!("write {}", host.display()))?;
        fs::set_permissions(&host, fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {}", host.display()))
    }

    fn symlink(&mut self, target: &str, p: &str) -> Result<()> {
        let host = self.t.host(p);
        if fs::read_link(&host).is_ok_and(|l| l == Path::new(target)) {
            return Ok(());
        }
        if fs::symlink_metadata(&host).is_ok() {
            self.keep(p)?;
            fs::remove_file(&host)?;
        } else {
            self.m.created.push(p.into());
        }
        std::os::unix::fs::symlink(target, &host)
            .with_context(|| format!("symlink {}", host.display()))
    }

    /// Copies the node's own file at `p` aside (restored by uninstall).
    fn keep(&mut self, p: &str) -> Result<()> {
        let n = self.m.replaced.len();
        let copy = format!("{STATE}/orig/{n}");
        self.mkdirs(&format!("{STATE}/orig"))?;
        let (from, to) = (self.t.host(p), self.t.host(&copy));
        // A symlink is kept as a symlink, a file with its bytes and mode.
        match fs::read_link(&from) {
            Ok(l) => std::os::unix::fs::symlink(l, &to)?,
            Err(_) => {
                fs::copy(&from, &to).with_context(|| format!("copy {}", from.display()))?;
            }
        }
        self.m.replaced.push((p.into(), copy));
        Ok(())
    }
}

fn parent(p: &str) -> String {
    Path::new(p)
        .parent()
        .map(|d| d.to_string_lossy().into())
        .unwrap_or_else(|| "/".into())
}

/// `janus install`.
pub fn install(t: &Target, payload: &Path) -> Result<()> {
    if t.host(&format!("{STATE}/manifest.json")).exists() {
        // Again: back to the node's own state first, so the kept originals stay its own.
        undo(t)?;
    }
    let mut c = Changes {
        t,
        m: Manifest::default(),
    };
    let r = put_payload(&mut c, payload).and_then(|()| configure_containerd(&mut c));
    // Whatever happened, what was changed is recorded: uninstall can undo it.
    save(&c)?;
    r?;
    restart(t)?;
    label(t, true)
}

/// `janus uninstall`. The label goes first (no new Janus pods are scheduled here meanwhile, and
/// the installer pod's credentials may not outlive its deletion for long); the files are
/// restored even when that fails, whose error is returned after.
pub fn uninstall(t: &Target) -> Result<()> {
    let unlabel = label(t, false);
    if t.host(&format!("{STATE}/manifest.json")).exists() {
        undo(t)?;
        restart(t)?;
    } else {
        eprintln!("janus uninstall: nothing installed here (no {STATE}/manifest.json)");
    }
    unlabel
}

fn save(c: &Changes) -> Result<()> {
    let mut c2 = Changes {
        t: c.t,
        m: Manifest::default(),
    };
    c2.mkdirs(STATE)?;
    let mut m = Manifest {
        created: c.m.created.clone(),
        dirs: c.m.dirs.clone(),
        replaced: c.m.replaced.clone(),
    };
    // The state dir itself is ours too (made last, removed first).
    m.dirs.extend(c2.m.dirs);
    let path = c.t.host(&format!("{STATE}/manifest.json"));
    fs::write(&path, serde_json::to_vec_pretty(&m)?)
        .with_context(|| format!("write {}", path.display()))
}

/// Restores what the manifest says, then forgets it.
fn undo(t: &Target) -> Result<()> {
    let path = t.host(&format!("{STATE}/manifest.json"));
    let m: Manifest = serde_json::from_slice(&fs::read(&path)?)
        .with_context(|| format!("read {}", path.display()))?;
    for (p, copy) in m.replaced.iter().rev() {
        let (to, from) = (t.host(p), t.host(copy));
        let _ = fs::remove_file(&to);
        match fs::read_link(&from) {
            Ok(l) => std::os::unix::fs::symlink(l, &to)?,
            Err(_) => {
                fs::copy(&from, &to).with_context(|| format!("restore {}", to.display()))?;
            }
        }
    }
    for p in m.created.iter().rev() {
        let _ = fs::remove_file(t.host(p));
    }
    let _ = fs::remove_dir_all(t.host(&format!("{STATE}/orig")));
    fs::remove_file(&path)?;
    for d in m.dirs.iter().rev() {
        // Only if empty: something the node put there since stays.
        let _ = fs::remove_dir(t.host(d));
    }
    Ok(())
}

/// Binaries, the alias, the guest image and the Janus configs.
fn put_payload(c: &mut Changes, payload: &Path) -> Result<()> {
    for (name, required) in [(SHIM, true), ("janus", true), ("janus-vmm", false)] {
        let src = payload.join("bin").join(name);
        match fs::read(&src) {
            Ok(b) => c.write(&format!("/usr/local/bin/{name}"), &b, 0o755)?,
            Err(_) if !required => {}
            Err(e) => bail!("payload {}: {e}", src.display()),
        }
    }
    c.symlink(SHIM, &format!("/usr/local/bin/{SHIM_VM}"))?;
    let guest = payload.join("guest");
    let entries = fs::read_dir(&guest).with_context(|| format!("payload {}", guest.display()))?;
    for e in entries.flatten().filter(|e| e.path().is_file()) {
        let name = e.file_name().to_string_lossy().to_string();
        c.write(
            &format!("/usr/share/janus/guest/{name}"),
            &fs::read(e.path())?,
            0o644,
        )?;
    }
    // The guest image as the node sees it, explicit in the configs (the shim's default is
    // /usr/share/janus/guest, which is only right where the node root is /).
    let kernel = ["vmlinux", "vmlinuz"]
        .into_iter()
        .find(|k| guest.join(k).is_file())
        .with_context(|| format!("payload {}: no vmlinux or vmlinuz", guest.display()))?;
    let dir = c.t.node_view("/usr/share/janus/guest");
    let (kernel, initrd) = (dir.join(kernel), dir.join("initramfs.cpio"));
    for name in ["config.toml", "vm.toml"] {
        let src = payload.join("etc").join(name);
        let text =
            fs::read_to_string(&src).with_context(|| format!("payload {}", src.display()))?;
        let text = pin_guest(&text, &kernel, &initrd)
            .with_context(|| format!("payload {}", src.display()))?;
        c.write(&format!("/etc/janus/{name}"), text.as_bytes(), 0o644)?;
    }
    Ok(())
}

/// A Janus config with `vm.kernel` and `vm.initrd` set (comments and the rest kept).
fn pin_guest(text: &str, kernel: &Path, initrd: &Path) -> Result<String> {
    let mut doc: toml_edit::DocumentMut = text.parse()?;
    let vm = table_at(doc.as_table_mut(), &["vm"]);
    vm.insert(
        "kernel",
        toml_edit::value(kernel.to_string_lossy().to_string()),
    );
    vm.insert(
        "initrd",
        toml_edit::value(initrd.to_string_lossy().to_string()),
    );
    Ok(doc.to_string())
}

/// The handlers, in whatever form this node's containerd reads.
fn configure_containerd(c: &mut Changes) -> Result<()> {
    let cfg = c.t.containerd_config.to_string_lossy().to_string();
    let host = c.t.host(&cfg);
    let existing = fs::read_to_string(&host).ok();
    let mut doc: toml_edit::DocumentMut = match &existing {
        Some(text) => text
            .parse()
            .with_context(|| format!("containerd config {}", host.display()))?,
        None => toml_edit::DocumentMut::new(),
    };
    let version = match doc.get("version").and_then(|v| v.as_integer()) {
        Some(v) => v,
        None if existing.is_some() => 1,
        None if containerd_major(c.t)? >= 2 => 3,
        None => 2,
    };
    match version {
        3 => {
            let dropin = "/etc/containerd/conf.d/janus.toml";
            c.write(dropin, handlers_v3(c.t).as_bytes(), 0o644)?;
            add_import(&mut doc, &c.t.node_view(dropin).to_string_lossy());
            doc["version"] = toml_edit::value(3);
        }
        2 => {
            handlers_v2(&mut doc, c.t);
            doc["version"] = toml_edit::value(2);
        }
        v => bail!(
            "containerd config {} is version {v}: Janus installs into versions 2 and 3 \
             (run `containerd config migrate`)",
            host.display()
        ),
    }
    c.write(&cfg, doc.to_string().as_bytes(), 0o644)
}

fn handlers() -> [(&'static str, &'static str, &'static str); 2] {
    [
        ("janus", "io.containerd.janus.v2", "/etc/janus/config.toml"),
        (
            "janus-vm",
            "io.containerd.janus-vm.v2",
            "/etc/janus/vm.toml",
        ),
    ]
}

/// containerd 2.x's drop-in: only the handlers.
fn handlers_v3(t: &Target) -> String {
    let mut s = String::from(
        "# Written by `janus install` (removed by `janus uninstall`): Janus's CRI runtime \
         handlers.\nversion = 3\n",
    );
    for (h, ty, cfg) in handlers() {
        let cfg = t.node_view(cfg);
        s.push_str(&format!(
            "\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.{h}]\n  \
             runtime_type = \"{ty}\"\n  \
             [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.{h}.options]\n    \
             ConfigPath = \"{}\"\n",
            cfg.display()
        ));
    }
    s
}

/// containerd 1.x's config.toml gets the handlers itself.
fn handlers_v2(doc: &mut toml_edit::DocumentMut, t: &Target) {
    let path = [
        "plugins",
        "io.containerd.grpc.v1.cri",
        "containerd",
        "runtimes",
    ];
    let runtimes = table_at(doc.as_table_mut(), &path);
    for (h, ty, cfg) in handlers() {
        let mut table = toml_edit::Table::new();
        table["runtime_type"] = toml_edit::value(ty);
        let mut opts = toml_edit::Table::new();
        opts["ConfigPath"] = toml_edit::value(t.node_view(cfg).to_string_lossy().to_string());
        table.insert("options", toml_edit::Item::Table(opts));
        runtimes.insert(h, toml_edit::Item::Table(table));
    }
}

/// The (standard, not inline) table at `path`, made where missing (without a header of its
/// own while it holds only tables).
fn table_at<'a>(mut t: &'a mut toml_edit::Table, path: &[&str]) -> &'a mut toml_edit::Table {
    for k in path {
        let item = t.entry(k).or_insert_with(|| {
            let mut new = toml_edit::Table::new();
            new.set_implicit(true);
            toml_edit::Item::Table(new)
        });
        if !item.is_table() {
            // An inline table (`containerd = { ... }`) becomes a standard one, same keys.
            let inline = std::mem::take(item);
            *item = match inline.into_table() {
                Ok(tbl) => toml_edit::Item::Table(tbl),
                Err(_) => toml_edit::Item::Table(toml_edit::Table::new()),
            };
        }
        t = item.as_table_mut().expect("made a table above");
    }
    t
}

fn add_import(doc: &mut toml_edit::DocumentMut, path: &str) {
    let imports = doc
        .entry("imports")
        .or_insert(toml_edit::value(toml_edit::Array::new()));
    if let Some(a) = imports.as_array_mut() {
        if !a.iter().any(|v| v.as_str() == Some(path)) {
            a.push(path);
        }
    }
}

/// containerd's major version: given, or from the host's binary.
fn containerd_major(t: &Target) -> Result<u32> {
    if let Some(m) = t.containerd_major {
        return Ok(m);
    }
    for bin in ["/usr/bin/containerd", "/usr/local/bin/containerd"] {
        let p = t.host(bin);
        let Ok(o) = Command::new(&p).arg("--version").output() else {
            continue;
        };
        // "containerd github.com/containerd/containerd/v2 2.1.9 ..." / "... 1.6.20~ds1 ..."
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        if let Some(m) = text
            .split_whitespace()
            .nth(2)
            .and_then(|v| v.split('.').next())
            .and_then(|m| m.parse().ok())
        {
            return Ok(m);
        }
    }
    bail!(
        "no containerd config and no containerd binary to ask its version: pass \
         --containerd-major (1 or 2)"
    )
}

fn restart(t: &Target) -> Result<()> {
    let Some(cmd) = &t.restart else {
        return Ok(());
    };
    let st = Command::new("sh").args(["-c", cmd]).status()?;
    if !st.success() {
        bail!("restarting containerd with `{cmd}`: {st}");
    }
    Ok(())
}

fn label(t: &Target, on: bool) -> Result<()> {
    let Some(node) = &t.node else {
        return Ok(());
    };
    let arg = if on {
        format!("{LABEL}=true")
    } else {
        format!("{LABEL}-")
    };
    let st = Command::new("kubectl")
        .args(["label", "node", node, &arg, "--overwrite"])
        .status()
        .context("kubectl")?;
    if !st.success() {
        bail!("kubectl label node {node} {arg}: {st}");
    }
    Ok(())
}
