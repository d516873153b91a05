//! Which accelerator a VM gets, and the one check for hardware virtualization (vmx/svm) that
//! the drivers, the shim, `janus check` and the tests share.
//!
//! A software KVM (nested, such as PVM) opens /dev/kvm but cannot run a Linux guest to the
//! end, so KVM is only chosen automatically when the CPU shows vmx or svm as well.

use std::fs;

use super::{Accel, Error, Result};

/// The accelerator chosen for a VM and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccelChoice {
    pub accel: Accel,
    pub reason: String,
}

/// Resolves `wanted` on this host: `Auto` becomes KVM only when the CPU shows vmx/svm and
/// /dev/kvm opens. `Kvm` fails when /dev/kvm cannot be opened (and warns without vmx/svm).
pub fn choose_accel(wanted: Accel) -> Result<AccelChoice> {
    decide_accel(wanted, hardware_virtualization(), open_kvm())
}

fn decide_accel(
    wanted: Accel,
    virt: Option<&str>,
    kvm: std::result::Result<(), String>,
) -> Result<AccelChoice> {
    let choice = |accel, reason: String| Ok(AccelChoice { accel, reason });
    match (wanted, virt, kvm) {
        (Accel::Tcg, _, _) => choice(Accel::Tcg, "tcg requested by the configuration".into()),
        (Accel::Kvm, _, Err(e)) => Err(Error::Config(format!(
            "accel = kvm, but /dev/kvm is not usable: {e}"
        ))),
        (Accel::Kvm, None, Ok(())) => {
            log::warn!("vm: accel = kvm requested although the CPU shows neither vmx nor svm");
            choice(
                Accel::Kvm,
                "kvm requested by the configuration (no vmx/svm flag)".into(),
            )
        }
        (Accel::Kvm, Some(f), Ok(())) => choice(Accel::Kvm, format!("kvm requested; CPU has {f}")),
        (Accel::Auto, Some(f), Ok(())) => {
            choice(Accel::Kvm, format!("CPU has {f} and /dev/kvm opens"))
        }
        (Accel::Auto, Some(f), Err(e)) => choice(
            Accel::Tcg,
            format!("CPU has {f} but /dev/kvm is not usable ({e})"),
        ),
        (Accel::Auto, None, _) => choice(
            Accel::Tcg,
            "no vmx/svm flag in /proc/cpuinfo (a nested or software KVM cannot boot Linux)".into(),
        ),
    }
}

/// "vmx" or "svm" when the CPU shows hardware virtualization in /proc/cpuinfo.
pub fn hardware_virtualization() -> Option<&'static str> {
    cpu_virt_flag(&fs::read_to_string("/proc/cpuinfo").unwrap_or_default())
}

/// "vmx" or "svm" when a `flags` line of /proc/cpuinfo lists it.
fn cpu_virt_flag(cpuinfo: &str) -> Option<&'static str> {
    for line in cpuinfo.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        if key.trim() != "flags" {
            continue;
        }
        for f in value.split_whitespace() {
            match f {
                "vmx" => return Some("vmx"),
                "svm" => return Some("svm"),
                _ => {}
            }
        }
    }
    None
}

fn open_kvm() -> std::result::Result<(), String> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accel_decisions() {
        let ok = || Ok(());
        let no = || Err("Permission denied".to_string());
        let d = |w, v, k| decide_accel(w, v, k).map(|c| c.accel);
        assert_eq!(d(Accel::Auto, Some("vmx"), ok()).unwrap(), Accel::Kvm);
        assert_eq!(d(Accel::Auto, Some("svm"), no()).unwrap(), Accel::Tcg);
        // This machine: PVM's /dev/kvm opens but there is no vmx/svm.
        assert_eq!(d(Accel::Auto, None, ok()).unwrap(), Accel::Tcg);
        assert_eq!(d(Accel::Tcg, Some("vmx"), ok()).unwrap(), Accel::Tcg);
        assert_eq!(d(Accel::Kvm, None, ok()).unwrap(), Accel::Kvm);
        assert!(d(Accel::Kvm, Some("vmx"), no()).is_err());
    }

    #[test]
    fn virt_flags() {
        let ci = "processor\t: 0\nflags\t\t: fpu vme sse2 vmx ept\nbugs\t: x\n";
        assert_eq!(cpu_virt_flag(ci), Some("vmx"));
        assert_eq!(cpu_virt_flag("flags\t: fpu svm\n"), Some("svm"));
        assert_eq!(cpu_virt_flag("flags\t: fpu vmxx\nvmx flags\t: ept\n"), None);
    }
}
