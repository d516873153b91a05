//! OCI hooks of the runtime namespace (prestart, createRuntime, poststart, poststop): both
//! modes run them on the host, through the zygote (a small single-threaded process that can
//! fork safely), with the container's state document on stdin.

use std::path::Path;
use std::sync::OnceLock;

use oci_spec::runtime::Spec;
use runtime::linux::hooks;
use runtime::linux::zygote::Zygote;

use crate::error::{Result, ShimError};

/// The shim's zygote, started before the async runtime (it must fork single-threaded).
pub static ZYGOTE: OnceLock<Zygote> = OnceLock::new();

pub fn zygote() -> Result<&'static Zygote> {
    ZYGOTE
        .get()
        .ok_or_else(|| ShimError::Internal("zygote not running".into()))
}

/// Phases of the runtime namespace, in the order OCI runs them.
#[derive(Debug, Clone, Copy)]
pub enum Phase {
    Prestart,
    CreateRuntime,
    Poststart,
    Poststop,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Prestart => "prestart",
            Phase::CreateRuntime => "createRuntime",
            Phase::Poststart => "poststart",
            Phase::Poststop => "poststop",
        }
    }
}

/// Runs the spec's hooks of `phase` for container `id` (blocking); a failure is an error
/// (the runtime's own, so a hook failing inside the zygote's setup handshake keeps its kind).
pub fn run(
    spec: &Spec,
    id: &str,
    bundle: &Path,
    phase: Phase,
    pid: i32,
    status: &str,
) -> runtime::linux::Result<()> {
    let Some(h) = spec.hooks() else { return Ok(()) };
    let list = match phase {
        Phase::Prestart => h.prestart(),
        Phase::CreateRuntime => h.create_runtime(),
        Phase::Poststart => h.poststart(),
        Phase::Poststop => h.poststop(),
    }
    .clone()
    .unwrap_or_default();
    if list.is_empty() {
        return Ok(());
    }
    let state = hooks::state_json(id, status, pid, bundle, spec.annotations().as_ref());
    let z = ZYGOTE
        .get()
        .ok_or_else(|| runtime::linux::Error::Child("zygote not running".into()))?;
    z.run_hooks(list, state, phase.name())
}

/// Poststart and poststop: OCI says a failure only warrants a warning.
pub fn run_warn(spec: &Spec, id: &str, bundle: &Path, phase: Phase, pid: i32, status: &str) {
    if let Err(e) = run(spec, id, bundle, phase, pid, status) {
        log::warn!("container {id}: {e}");
    }
}

/// prestart then createRuntime, with the container "creating" (its pid known).
pub fn run_create(spec: &Spec, id: &str, bundle: &Path, pid: i32) -> runtime::linux::Result<()> {
    run(spec, id, bundle, Phase::Prestart, pid, "creating")?;
    run(spec, id, bundle, Phase::CreateRuntime, pid, "creating")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_phases_run_here_are_the_ones_features_lists() {
        for p in [
            Phase::Prestart,
            Phase::CreateRuntime,
            Phase::Poststart,
            Phase::Poststop,
        ] {
            assert!(hooks::PHASES.contains(&p.name()), "{p:?}");
        }
    }
}
