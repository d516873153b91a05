//! OCI lifecycle hooks: the state JSON on stdin, timeouts, failure semantics.
//!
//! Hooks that run in the runtime's namespaces (prestart, createRuntime, poststart,
//! poststop) are run by a zygote child, so the shim's reaper never races a hook's exit
//! status; createContainer and startContainer run from the container process itself.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::Hook;

use super::error::{Error, Result};

/// The OCI hook phases Janus runs: the runtime-namespace ones by its callers through the
/// zygote (the shim's `hooks::Phase`), createContainer and startContainer by the container
/// process (`init`).
pub const PHASES: [&str; 6] = [
    "prestart",
    "createRuntime",
    "createContainer",
    "startContainer",
    "poststart",
    "poststop",
];

/// The state document hooks receive on stdin (runtime-spec "state").
pub fn state_json(
    id: &str,
    status: &str,
    pid: i32,
    bundle: &Path,
    annotations: Option<&HashMap<String, String>>,
) -> String {
    serde_json::json!({
        "ociVersion": "1.0.2",
        "id": id,
        "status": status,
        "pid": pid,
        "bundle": bundle,
        "annotations": annotations.cloned().unwrap_or_default(),
    })
    .to_string()
}

/// Runs hooks in order; the first failure stops the rest.
pub fn run_all(hooks: &[Hook], state: &str, phase: &str) -> Result<()> {
    for (i, h) in hooks.iter().enumerate() {
        run_one(h, state).map_err(|e| {
            Error::Child(format!("{phase} hook #{i} ({}): {e}", h.path().display()))
        })?;
    }
    Ok(())
}

fn run_one(h: &Hook, state: &str) -> std::result::Result<(), String> {
    let args = h.args().clone().unwrap_or_default();
    let mut cmd = Command::new(h.path());
    if let Some(a0) = args.first() {
        cmd.arg0(a0);
        cmd.args(&args[1..]);
    }
    cmd.env_clear();
    for kv in h.env().iter().flatten() {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("start: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook may exit without reading its stdin: EPIPE is not a failure.
        let _ = stdin.write_all(state.as_bytes());
    }
    let deadline = h
        .timeout()
        .filter(|t| *t > 0)
        .map(|t| Instant::now() + Duration::from_secs(t as u64));
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return Ok(()),
            Ok(Some(st)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                return Err(format!("{st}: {}", err.trim()));
            }
            Ok(None) => {}
            Err(e) => return Err(format!("wait: {e}")),
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("timed out after {}s", h.timeout().unwrap_or(0)));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(json: &str) -> Hook {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn state_reaches_stdin_and_failures_are_reported() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("state");
        let h = hook(&format!(
            r#"{{"path": "/bin/sh", "args": ["sh", "-c", "cat > {}"]}}"#,
            out.display()
        ));
        let st = state_json("c1", "creating", 42, Path::new("/b"), None);
        run_all(&[h], &st, "createRuntime").unwrap();
        let got: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        assert_eq!(got["id"], "c1");
        assert_eq!(got["pid"], 42);
        let bad = hook(r#"{"path": "/bin/sh", "args": ["sh", "-c", "echo boom >&2; exit 3"]}"#);
        let e = run_all(&[bad], &st, "prestart").unwrap_err().to_string();
        assert!(e.contains("prestart hook #0") && e.contains("boom"), "{e}");
    }

    #[test]
    fn timeouts_kill_the_hook() {
        let h = hook(r#"{"path": "/bin/sleep", "args": ["sleep", "10"], "timeout": 1}"#);
        let t = Instant::now();
        let e = run_all(&[h], "{}", "poststart").unwrap_err().to_string();
        assert!(e.contains("timed out"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn env_is_exactly_the_hooks() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("env");
        let h = hook(&format!(
            r#"{{"path": "/bin/sh", "args": ["sh", "-c", "env > {}"], "env": ["FOO=bar"]}}"#,
            out.display()
        ));
        run_all(&[h], "{}", "poststop").unwrap();
        let env = std::fs::read_to_string(&out).unwrap();
        assert!(env.contains("FOO=bar"));
        assert!(!env.contains("HOME="));
    }
}
