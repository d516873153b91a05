//! Capabilities from the spec, applied with the `caps` crate.

use std::collections::HashSet;
use std::str::FromStr;

use caps::{CapSet, Capability, CapsHashSet};
use oci_spec::runtime::LinuxCapabilities;

use super::error::{Error, Result};

/// Converts spec capability names to `caps` values; unknown names are an error naming them.
pub fn to_set<I, S>(names: I) -> Result<CapsHashSet>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut out = HashSet::new();
    for n in names {
        let n = n.as_ref();
        let c = Capability::from_str(n).map_err(|_| {
            Error::InvalidSpec(format!("process.capabilities: unknown capability {n:?}"))
        })?;
        out.insert(c);
    }
    Ok(out)
}

/// Every capability name this build knows (`CAP_...`), whether the kernel has it or not.
pub fn known() -> Vec<String> {
    caps::all().into_iter().map(|c| c.to_string()).collect()
}

fn names(set: &Option<oci_spec::runtime::Capabilities>) -> Vec<String> {
    set.iter()
        .flatten()
        .map(|c| {
            let s = c.to_string();
            if s.starts_with("CAP_") {
                s
            } else {
                format!("CAP_{}", s.to_uppercase())
            }
        })
        .collect()
}

/// The five sets of a process, resolved.
#[derive(Debug, Default, Clone)]
pub struct ProcessCaps {
    pub bounding: CapsHashSet,
    pub effective: CapsHashSet,
    pub permitted: CapsHashSet,
    pub inheritable: CapsHashSet,
    pub ambient: CapsHashSet,
}

impl ProcessCaps {
    pub fn from_spec(c: &LinuxCapabilities) -> Result<Self> {
        Ok(ProcessCaps {
            bounding: to_set(names(c.bounding()))?,
            effective: to_set(names(c.effective()))?,
            permitted: to_set(names(c.permitted()))?,
            inheritable: to_set(names(c.inheritable()))?,
            ambient: to_set(names(c.ambient()))?,
        })
    }

    /// Drops everything outside the bounding set. Needs CAP_SETPCAP, so runs before the
    /// switch to the container user.
    pub fn apply_bounding(&self) -> Result<()> {
        for c in caps::all() {
            if !self.bounding.contains(&c)
                && caps::has_cap(None, CapSet::Bounding, c).unwrap_or(false)
            {
                caps::drop(None, CapSet::Bounding, c)
                    .map_err(|e| Error::Child(format!("drop bounding capability {c}: {e}")))?;
            }
        }
        Ok(())
    }

    /// Sets effective, permitted, inheritable and ambient after the user switch.
    pub fn apply(&self) -> Result<()> {
        let set = |s: CapSet, v: &CapsHashSet| {
            caps::set(None, s, v).map_err(|e| Error::Child(format!("set {s:?} capabilities: {e}")))
        };
        // Effective must stay within permitted at every step: narrow effective first.
        // Inheritable goes first, while we still hold every permitted capability.
        set(CapSet::Inheritable, &self.inheritable)?;
        let eff: CapsHashSet = self
            .effective
            .intersection(&self.permitted)
            .cloned()
            .collect();
        set(CapSet::Effective, &eff)?;
        set(CapSet::Permitted, &self.permitted)?;
        // Ambient capabilities must be both permitted and inheritable; skip the rest quietly
        // as runc does.
        let _ = caps::clear(None, CapSet::Ambient);
        for c in &self.ambient {
            let _ = caps::raise(None, CapSet::Ambient, *c);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_convert() {
        let s = to_set(["CAP_CHOWN", "CAP_NET_BIND_SERVICE"]).unwrap();
        assert!(s.contains(&Capability::CAP_CHOWN));
        assert_eq!(s.len(), 2);
        assert!(to_set(["CAP_BOGUS"]).is_err());
    }

    #[test]
    fn spec_caps_resolve() {
        let c: LinuxCapabilities = serde_json::from_str(
            r#"{"bounding":["CAP_KILL","CAP_CHOWN"],"effective":["CAP_KILL"],"permitted":["CAP_KILL"]}"#,
        )
        .unwrap();
        let p = ProcessCaps::from_spec(&c).unwrap();
        assert_eq!(p.bounding.len(), 2);
        assert!(p.effective.contains(&Capability::CAP_KILL));
        assert!(p.ambient.is_empty());
    }
}
